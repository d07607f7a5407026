//! `cargo xtask setup`: installs what building and testing zerotrace need, and
//! skips whatever is already there.
//!
//! Toolchain: rustup's `nightly` with `rust-src` (agent/build.rs builds
//! agent-ebpf with `-Z build-std=core --target bpfel-unknown-none`) and a
//! `bpf-linker` linked against nightly's own libLLVM, and cargo-fuzz (`cargo
//! xtask fuzz` and the fuzz smoke of `cargo xtask test`). System: the Debian
//! packages the end-to-end tests use (among them PostgreSQL, MariaDB and
//! Redis servers and clients), and a Python venv with the OpenTelemetry SDK,
//! its OTLP exporters and the rotel collector (the tests' real OTLP exporter
//! and collector) plus what the test apps in tests/apps import (FastAPI,
//! uvicorn, Flask, psycopg, PyMySQL, redis-py) and the Kubernetes manifest
//! validator the deployment tests use (kubernetes-validate). And one
//! OpenSSL built with control-flow protection (Ubuntu 22.04's libssl3), for
//! the test of where the TLS probes go on such builds.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::say;
use crate::util::{Ctx, output, run};

/// Debian packages the end-to-end tests use. `postgresql` brings PostgreSQL
/// 15 with psql and pgbench (tests/src/db.rs runs /usr/lib/postgresql/15/bin/*),
/// `mariadb-server` MariaDB 10.11 with mariadb-install-db, `mariadb-client`
/// the `mariadb` CLI and mysqlslap, `redis-tools` redis-cli and redis-benchmark.
pub const PACKAGES: &[&str] = &[
    "bpftool",
    "curl",
    "python3",
    "python3-venv",
    "redis-server",
    "redis-tools",
    "procps",
    "iproute2",
    "nginx",
    // `cargo xtask bench overhead` and `soak`: the HTTP load generator.
    "wrk",
    // `cargo xtask bench micro`: counts each benchmark's instructions.
    "valgrind",
    "postgresql",
    "mariadb-server",
    "mariadb-client",
    // `cargo xtask dist`: musl-gcc compiles C code in dependencies for the
    // static musl build; buildah builds the image; the dist test reads the
    // binary's program headers with readelf.
    "musl-tools",
    "buildah",
    "binutils",
    // systemd-analyze: tests/tests/deploy.rs verifies deploy/systemd/zerotrace.service.
    "systemd",
];

/// The nightly toolchain as found (or installed).
pub struct Nightly {
    pub release: String,
    pub llvm_version: String,
    pub llvm_major: u32,
    pub sysroot: PathBuf,
}

/// Full setup: toolchain, system packages, kernel report.
pub fn full(ctx: &Ctx) -> Result<()> {
    let start = Instant::now();
    toolchain(ctx, true)?;
    cargo_fuzz(ctx, true)?;
    packages(ctx)?;
    musl(ctx)?;
    otel_venv(ctx)?;
    cet_libssl(ctx)?;
    kernel_report();
    say!("setup", "done in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}

/// Makes sure the toolchain pieces are there. `verbose` prints one line per
/// step; otherwise only actions and a one-line summary are printed.
pub fn toolchain(ctx: &Ctx, verbose: bool) -> Result<Nightly> {
    if ctx.path_fixed {
        say!(
            "setup",
            "{}/bin is not on PATH; using it for this run (add it to your shell's PATH)",
            ctx.cargo_home.display()
        );
    }

    let Some(rustup) = ctx.which("rustup") else {
        bail!("rustup not found on PATH; install it from https://rustup.rs and run again");
    };
    if verbose {
        let v = output(ctx.cmd(&rustup).arg("--version"))?;
        say!("setup", "rustup: {}", first_line(&v));
    }

    let nightly = nightly(ctx)?;
    if verbose {
        say!(
            "setup",
            "nightly toolchain: present (rustc {}, LLVM {})",
            nightly.release,
            nightly.llvm_version
        );
    }

    let core = nightly.sysroot.join("lib/rustlib/src/rust/library/core");
    if core.is_dir() {
        if verbose {
            say!("setup", "rust-src (nightly): present");
        }
    } else {
        say!("setup", "rust-src (nightly): missing, adding it…");
        run(ctx
            .cmd("rustup")
            .args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
        if !core.is_dir() {
            bail!(
                "rust-src was added but {} does not exist; check `rustup component list --toolchain nightly`",
                core.display()
            );
        }
        say!("setup", "rust-src (nightly): added");
    }

    let linker = bpf_linker(ctx, &nightly, verbose)?;
    if !verbose {
        say!(
            "setup",
            "toolchain ok: nightly {} (LLVM {}), rust-src, {linker}",
            nightly.release,
            nightly.llvm_major
        );
    }
    Ok(nightly)
}

pub fn nightly(ctx: &Ctx) -> Result<Nightly> {
    let probe = || output(ctx.cmd("rustup").args(["run", "nightly", "rustc", "-vV"]));
    let vv = match probe() {
        Ok(vv) => vv,
        Err(_) => {
            say!(
                "setup",
                "nightly toolchain: missing, installing (profile minimal)…"
            );
            run(ctx.cmd("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]))?;
            probe().context("nightly was installed but `rustc -vV` still fails")?
        }
    };
    let field = |name: &str| {
        vv.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    let release = field("release:").unwrap_or_else(|| "?".into());
    let llvm_version =
        field("LLVM version:").context("`rustc +nightly -vV` shows no LLVM version")?;
    let llvm_major = llvm_major(&llvm_version)
        .with_context(|| format!("cannot read the LLVM major version from {llvm_version:?}"))?;
    let sysroot = output(
        ctx.cmd("rustup")
            .args(["run", "nightly", "rustc", "--print", "sysroot"]),
    )?;
    Ok(Nightly {
        release,
        llvm_version,
        llvm_major,
        sysroot: PathBuf::from(sysroot.trim()),
    })
}

/// "22.1.4" → 22.
fn llvm_major(version: &str) -> Option<u32> {
    let digits: String = version.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The libLLVM major a binary is dynamically linked against, from `ldd`
/// (`libLLVM.so.22.1-rust-…` or `libLLVM-22…`). None if static or unknown.
fn linked_llvm_major(ldd: &str) -> Option<u32> {
    ldd.split_whitespace().find_map(|tok| {
        let name = tok.rsplit('/').next()?;
        let rest = name
            .strip_prefix("libLLVM.so.")
            .or_else(|| name.strip_prefix("libLLVM-"))?;
        llvm_major(rest)
    })
}

enum Linker {
    Ok(String),
    Missing,
    Broken(String),
}

fn probe_linker(ctx: &Ctx, want_major: u32) -> Linker {
    let Some(path) = ctx.which("bpf-linker") else {
        return Linker::Missing;
    };
    let version = match output(ctx.cmd(&path).arg("--version")) {
        Ok(v) => first_line(&v).to_string(),
        Err(e) => return Linker::Broken(format!("{} does not run: {e:#}", path.display())),
    };
    if let Ok(ldd) = output(ctx.cmd("ldd").arg(&path))
        && let Some(major) = linked_llvm_major(&ldd)
        && major != want_major
    {
        return Linker::Broken(format!(
            "{} uses LLVM {major}, nightly uses LLVM {want_major}",
            path.display()
        ));
    }
    Linker::Ok(version)
}

/// Ensures a working bpf-linker built against nightly's LLVM; returns its version.
fn bpf_linker(ctx: &Ctx, nightly: &Nightly, verbose: bool) -> Result<String> {
    let major = nightly.llvm_major;
    match probe_linker(ctx, major) {
        Linker::Ok(version) => {
            if verbose {
                say!("setup", "bpf-linker: present (LLVM {major}, {version})");
            }
            return Ok(version);
        }
        Linker::Missing => say!("setup", "bpf-linker: missing"),
        Linker::Broken(why) => say!("setup", "bpf-linker: {why}; rebuilding"),
    }
    say!(
        "setup",
        "building bpf-linker against nightly LLVM {major} (~2 min)…"
    );
    let prefix = llvm_prefix(nightly)?;
    let mut install = ctx.cmd("cargo");
    install
        .args(["install", "bpf-linker", "--locked", "--force"])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix)
        .current_dir(&ctx.cargo_home);
    run(&mut install).context("building bpf-linker failed")?;
    match probe_linker(ctx, major) {
        Linker::Ok(version) => {
            say!("setup", "bpf-linker: built (LLVM {major}, {version})");
            Ok(version)
        }
        Linker::Missing => bail!(
            "bpf-linker was installed but is not on PATH (expected in {}/bin)",
            ctx.cargo_home.display()
        ),
        Linker::Broken(why) => bail!("bpf-linker was rebuilt but still fails: {why}"),
    }
}

/// Ensures `cargo fuzz` runs (the fuzz targets under agent/fuzz; they build
/// with the nightly toolchain `toolchain` installs); returns its version.
pub fn cargo_fuzz(ctx: &Ctx, verbose: bool) -> Result<String> {
    let probe = || output(ctx.cmd("cargo").args(["fuzz", "--version"]));
    if let Ok(v) = probe() {
        let v = first_line(&v).to_string();
        if verbose {
            say!("setup", "cargo-fuzz: present ({v})");
        }
        return Ok(v);
    }
    say!("setup", "cargo-fuzz: missing, installing (~2 min)…");
    let mut install = ctx.cmd("cargo");
    install
        .args(["install", "cargo-fuzz", "--locked"])
        .current_dir(&ctx.cargo_home);
    run(&mut install).context("installing cargo-fuzz failed")?;
    let v = probe().context("cargo-fuzz was installed but `cargo fuzz --version` still fails")?;
    let v = first_line(&v).to_string();
    say!("setup", "cargo-fuzz: installed ({v})");
    Ok(v)
}

/// `~/.cache/zerotrace/llvm-N` with `lib/libLLVM.so` pointing at nightly's
/// libLLVM. bpf-linker's rpath points here, so this directory must stay.
fn llvm_prefix(nightly: &Nightly) -> Result<PathBuf> {
    let lib_dir = nightly.sysroot.join("lib");
    let lib = fs::read_dir(&lib_dir)
        .with_context(|| format!("cannot read {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("nightly has no libLLVM.so.* in {}", lib_dir.display()))?;
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .context("HOME is not set")?;
    let prefix = home
        .join(".cache/zerotrace")
        .join(format!("llvm-{}", nightly.llvm_major));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    let target = lib_dir.join(&lib);
    for name in ["libLLVM.so", lib.as_str()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("cannot link {} → {}", link.display(), target.display()))?;
    }
    Ok(prefix)
}

/// Installs the Debian packages that are missing.
pub fn packages(ctx: &Ctx) -> Result<()> {
    let list = PACKAGES.join(" ");
    if ctx.which("dpkg-query").is_none() || ctx.which("apt-get").is_none() {
        say!(
            "setup",
            "system packages: not a Debian/Ubuntu system; install these (names may differ) yourself: {list}"
        );
        return Ok(());
    }
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(ctx, p))
        .collect();
    if missing.is_empty() {
        say!("setup", "debian packages: present ({list})");
        return Ok(());
    }
    apt_install(ctx, &missing)?;
    say!("setup", "debian packages: installed {}", missing.join(" "));
    Ok(())
}

/// Installs `missing` with apt-get (through sudo when not root), keeping the
/// packages from starting services, and checks that they are installed.
fn apt_install(ctx: &Ctx, missing: &[&str]) -> Result<()> {
    let missing_list = missing.join(" ");
    let via = if ctx.is_root {
        String::new()
    } else {
        ctx.require_sudo(&format!("installing {missing_list}"))
            .with_context(|| format!("missing Debian packages: {missing_list}"))?;
        " with sudo".to_string()
    };
    say!(
        "setup",
        "debian packages: missing {missing_list}; installing{via}…"
    );
    let apt = |args: &[&str]| -> Result<()> {
        let mut c = ctx.as_root("env", "apt-get")?;
        c.args(["DEBIAN_FRONTEND=noninteractive", "apt-get"])
            .args(args);
        run(&mut c)
    };
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(missing);
    let no_starts = NoServiceStarts::begin(ctx)?;
    let installed = apt(&args);
    drop(no_starts);
    installed?;
    let still: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(ctx, p))
        .collect();
    if !still.is_empty() {
        bail!(
            "apt-get finished but these are still not installed: {}",
            still.join(" ")
        );
    }
    Ok(())
}

/// What `cargo xtask dist` needs besides the eBPF toolchain: the musl target
/// for the toolchain cargo builds with here, and `musl-gcc` (Debian
/// `musl-tools`) for C code in dependencies.
pub fn musl(ctx: &Ctx) -> Result<()> {
    let target = crate::dist::TARGET;
    let sysroot = PathBuf::from(output(ctx.cmd("rustc").args(["--print", "sysroot"]))?.trim());
    // rustup keeps each toolchain in a directory named after it.
    let toolchain = sysroot
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("rustc's sysroot has no name")?;
    let std = sysroot.join("lib/rustlib").join(target).join("lib");
    if std.is_dir() {
        say!("setup", "rust target {target} ({toolchain}): present");
    } else {
        say!(
            "setup",
            "rust target {target} ({toolchain}): missing, adding it…"
        );
        run(ctx
            .cmd("rustup")
            .args(["target", "add", target, "--toolchain", &toolchain]))?;
        if !std.is_dir() {
            bail!(
                "`rustup target add {target}` succeeded but {} does not exist",
                std.display()
            );
        }
        say!("setup", "rust target {target} ({toolchain}): added");
    }
    if ctx.which("musl-gcc").is_none() {
        if ctx.which("apt-get").is_none() {
            bail!("musl-gcc not found: install musl's gcc wrapper (Debian/Ubuntu: musl-tools)");
        }
        say!("setup", "musl-gcc: missing; installing musl-tools…");
        apt_install(ctx, &["musl-tools"])?;
    }
    Ok(())
}

/// Debian packages `cargo xtask vm-test` needs: QEMU (software emulation)
/// and a static busybox for the guests' initramfs. Kept apart from
/// [`PACKAGES`] so a plain `setup` does not pull QEMU in.
pub const VM_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    // The pinned kernels are fetched with curl and checked with sha256sum;
    // apt verifies the others against Debian's archive keyring.
    "curl",
    "coreutils",
    "debian-archive-keyring",
];

/// Installs the [`VM_PACKAGES`] that are missing (the kernel matrix runs on a
/// fresh machine too). QEMU's maintainer scripts start no services.
pub fn vm_packages(ctx: &Ctx) -> Result<()> {
    let list = VM_PACKAGES.join(" ");
    if ctx.which("dpkg-query").is_none() || ctx.which("apt-get").is_none() {
        if ctx.which("qemu-system-x86_64").is_some() && Path::new("/bin/busybox").is_file() {
            return Ok(());
        }
        bail!(
            "not a Debian/Ubuntu system: install QEMU (qemu-system-x86_64) and a static busybox yourself"
        );
    }
    let missing: Vec<&str> = VM_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(ctx, p))
        .collect();
    if missing.is_empty() {
        say!("setup", "vm packages: present ({list})");
        return Ok(());
    }
    apt_install(ctx, &missing)?;
    say!("setup", "vm packages: installed {}", missing.join(" "));
    Ok(())
}

/// Ubuntu 22.04's libssl3 as released (the release pocket never changes),
/// built with `-fcf-protection`: its functions begin with `endbr64`, where
/// Debian's do not. tests/tests/tls.rs runs a client on it through
/// `LD_LIBRARY_PATH` to check that the TLS probes skip the `endbr64`.
const CET_LIBSSL_DEB: &str = "libssl3_3.0.2-0ubuntu1_amd64.deb";
const CET_LIBSSL_SHA256: &str = "11a83260542e05aebbbafce9164d594287d2584be80972e08708528fe06f80d3";
const CET_LIBSSL_MIRRORS: &[&str] = &[
    "http://archive.ubuntu.com/ubuntu/pool/main/o/openssl/",
    "http://security.ubuntu.com/ubuntu/pool/main/o/openssl/",
];

/// `~/.cache/zerotrace/cet-libssl`: `lib/libssl.so.3` and `lib/libcrypto.so.3`.
pub fn cet_libssl_dir() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache/zerotrace/cet-libssl"))
}

/// Fetches and unpacks [`CET_LIBSSL_DEB`] unless it is there; the package
/// is checked against its pinned SHA-256 before use.
pub fn cet_libssl(ctx: &Ctx) -> Result<()> {
    let dir = cet_libssl_dir()?;
    let lib = dir.join("lib");
    if lib.join("libssl.so.3").is_file() && lib.join("libcrypto.so.3").is_file() {
        say!("setup", "CET-built libssl: present ({})", lib.display());
        return Ok(());
    }
    let work = dir.with_extension("partial");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let deb = work.join(CET_LIBSSL_DEB);
    let mut errors = Vec::new();
    for mirror in CET_LIBSSL_MIRRORS {
        let url = format!("{mirror}{CET_LIBSSL_DEB}");
        let fetched = run(ctx
            .cmd("curl")
            .args(["-fsSL", "--retry", "3", "--max-time", "300", "-o"])
            .arg(&deb)
            .arg(&url));
        match fetched {
            Ok(()) => break,
            Err(e) => {
                let _ = fs::remove_file(&deb);
                errors.push(format!("{url}: {e:#}"));
            }
        }
    }
    if !deb.is_file() {
        bail!(
            "cannot download Ubuntu's libssl3 (a test fixture): {}",
            errors.join("; ")
        );
    }
    let sum = output(ctx.cmd("sha256sum").arg(&deb))?;
    if sum.split_whitespace().next() != Some(CET_LIBSSL_SHA256) {
        bail!(
            "{} has SHA-256 {sum}, not {CET_LIBSSL_SHA256}",
            deb.display()
        );
    }
    let root = work.join("root");
    run(ctx.cmd("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let unpacked = root.join("usr/lib/x86_64-linux-gnu");
    let staged = work.join("lib");
    fs::create_dir_all(&staged)?;
    for name in ["libssl.so.3", "libcrypto.so.3"] {
        fs::copy(unpacked.join(name), staged.join(name))
            .with_context(|| format!("{name} missing from {CET_LIBSSL_DEB}"))?;
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    fs::rename(&staged, &lib)?;
    let _ = fs::remove_dir_all(&work);
    say!("setup", "CET-built libssl: installed ({})", lib.display());
    Ok(())
}

/// What the OTel venv holds: the Python SDK and OTLP exporters (a real
/// exporter for the tests' in-process receiver) and rotel, a Rust OTLP
/// collector whose wheel ships `site-packages/rotel/rotel-agent`. rotel is
/// pinned: the tests read its debug-log layout. Then what the test apps in
/// tests/apps run on (tests/src/db.rs starts them with this venv's python):
/// FastAPI under uvicorn (asyncio loop with h11, or uvloop with httptools),
/// Flask, psycopg 3 with its binary libpq, PyMySQL, redis-py, httpx and
/// requests.
pub const OTEL_VENV_REQUIREMENTS: &[&str] = &[
    "opentelemetry-sdk~=1.45",
    "opentelemetry-exporter-otlp-proto-grpc~=1.45",
    "opentelemetry-exporter-otlp-proto-http~=1.45",
    "rotel==0.0.1a15",
    "fastapi~=0.165",
    "uvicorn~=0.54",
    "flask~=3.1",
    "psycopg[binary]~=3.3",
    "pymysql~=1.2",
    "redis~=8.1",
    "httpx~=0.28",
    // An HTTPS client of the TLS tests (tests/src/tls.rs), next to httpx.
    "requests~=2.32",
    "uvloop~=0.23",
    "httptools~=0.9",
    // The reference parser for the Prometheus text format (the /metrics test).
    "prometheus-client~=0.26",
    // Kubernetes OpenAPI schemas (strict: unknown fields are errors) and
    // PyYAML; tests/tests/deploy.rs validates deploy/kubernetes with them.
    "kubernetes-validate~=1.37",
];

/// Written into the venv after a successful install; a different list means reinstall.
const OTEL_VENV_STAMP: &str = ".zerotrace-requirements";

/// The OTel venv: `$ZEROTRACE_VENV`, else `~/.cache/zerotrace/venv-otel`
/// (tests/src/otlp.rs looks in the same places; `cargo xtask test` exports it).
pub fn otel_venv_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("ZEROTRACE_VENV").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").context("neither ZEROTRACE_VENV nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/zerotrace/venv-otel"))
}

/// `lib/python3.*/site-packages/rotel/rotel-agent` inside the venv.
fn rotel_agent(venv: &Path) -> Option<PathBuf> {
    fs::read_dir(venv.join("lib"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/rotel/rotel-agent"))
        .find(|p| p.is_file())
}

/// Ok(rotel version) when the venv has this requirement list installed and working.
fn probe_otel_venv(ctx: &Ctx, venv: &Path) -> Result<String> {
    let python = venv.join("bin/python");
    if !python.is_file() {
        bail!("missing");
    }
    let stamp = fs::read_to_string(venv.join(OTEL_VENV_STAMP)).unwrap_or_default();
    if stamp.trim_end() != OTEL_VENV_REQUIREMENTS.join("\n") {
        bail!("requirements changed");
    }
    output(ctx.cmd(&python).args([
        "-c",
        "import opentelemetry.sdk.trace, \
         opentelemetry.exporter.otlp.proto.grpc.trace_exporter, \
         opentelemetry.exporter.otlp.proto.http.trace_exporter, \
         fastapi, uvicorn, flask, psycopg, pymysql, redis, httpx, requests, uvloop, httptools, prometheus_client.parser, \
         kubernetes_validate, yaml; \
         psycopg.pq.version()",
    ]))?;
    let rotel = rotel_agent(venv).context("rotel-agent missing")?;
    let version = output(ctx.cmd(&rotel).arg("version"))?;
    Ok(first_line(&version).to_string())
}

/// Creates (or repairs) the OTel venv unless it is present and working.
pub fn otel_venv(ctx: &Ctx) -> Result<()> {
    let venv = otel_venv_dir()?;
    let why = match probe_otel_venv(ctx, &venv) {
        Ok(rotel) => {
            say!(
                "setup",
                "otel venv: present ({}, rotel {rotel})",
                venv.display()
            );
            return Ok(());
        }
        Err(e) => format!("{e:#}"),
    };
    say!(
        "setup",
        "otel venv {}: {why}; installing the OpenTelemetry SDK, OTLP exporters, rotel and the test apps' packages (~15 s)…",
        venv.display()
    );
    let start = Instant::now();
    if !venv.join("bin/python").is_file() || !venv.join("bin/pip").is_file() {
        if venv.exists() {
            fs::remove_dir_all(&venv)
                .with_context(|| format!("cannot remove the broken venv {}", venv.display()))?;
        }
        if let Some(parent) = venv.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        // Debian's python3 (its venv module is the python3-venv package), not
        // whatever python3 a version manager puts first on PATH.
        let system = Path::new("/usr/bin/python3");
        let python = if system.is_file() {
            system.to_path_buf()
        } else {
            ctx.which("python3")
                .context("python3 not found (it is in the Debian package list)")?
        };
        run(ctx.cmd(&python).arg("-m").arg("venv").arg(&venv))
            .with_context(|| format!("creating the venv {}", venv.display()))?;
    }
    let _ = fs::remove_file(venv.join(OTEL_VENV_STAMP));
    run(ctx
        .cmd(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(OTEL_VENV_REQUIREMENTS))
    .context("pip install into the otel venv failed")?;
    fs::write(
        venv.join(OTEL_VENV_STAMP),
        OTEL_VENV_REQUIREMENTS.join("\n") + "\n",
    )?;
    match probe_otel_venv(ctx, &venv) {
        Ok(rotel) => {
            say!(
                "setup",
                "otel venv: installed in {:.1}s ({}, rotel {rotel})",
                start.elapsed().as_secs_f64(),
                venv.display()
            );
            Ok(())
        }
        Err(e) => bail!(
            "the otel venv {} was installed but does not work: {e:#}",
            venv.display()
        ),
    }
}

/// The file through which Debian's maintainer scripts ask whether they may
/// start services (invoke-rc.d, deb-systemd-invoke); exit status 101 = no.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// The second line of the policy-rc.d that [`NoServiceStarts`] writes.
const POLICY_RC_D_MARK: &str =
    "# written by `cargo xtask setup` for the length of one apt-get install";

/// Keeps the packages' maintainer scripts from starting services while
/// `apt-get install` runs on a machine without a running systemd.
///
/// There, invoke-rc.d runs the SysV init scripts itself, so installing
/// postgresql, mariadb-server, redis-server or nginx would start default
/// instances (5432, 3306, 6379, 80), and a start that fails makes the
/// package's postinst fail (`invoke-rc.d … start || exit 1`). The tests start
/// their own servers on free ports and need none of them. Under a running
/// systemd, and where a policy-rc.d already exists (Docker images and these
/// machines ship one that says no), nothing is changed.
struct NoServiceStarts<'a> {
    ctx: &'a Ctx,
    written: bool,
}

impl<'a> NoServiceStarts<'a> {
    fn begin(ctx: &'a Ctx) -> Result<Self> {
        let mut guard = NoServiceStarts {
            ctx,
            written: false,
        };
        match fs::read_to_string(POLICY_RC_D) {
            // Left behind by an interrupted run: remove it, then decide afresh.
            Ok(s) if s.contains(POLICY_RC_D_MARK) => {
                guard.written = true;
                guard.remove();
            }
            _ if Path::new(POLICY_RC_D).exists() => return Ok(guard),
            _ => {}
        }
        if Path::new("/run/systemd/system").is_dir() {
            return Ok(guard);
        }
        let script = format!("#!/bin/sh\n{POLICY_RC_D_MARK}\nexit 101\n");
        let mut c = ctx.as_root("sh", "writing /usr/sbin/policy-rc.d")?;
        c.arg("-c")
            .arg(format!(
                "printf '%s' \"$1\" > {POLICY_RC_D} && chmod 755 {POLICY_RC_D}"
            ))
            .arg("sh")
            .arg(script);
        run(&mut c).context("writing a temporary /usr/sbin/policy-rc.d")?;
        guard.written = true;
        say!(
            "setup",
            "no systemd running: a temporary {POLICY_RC_D} keeps the packages from starting default services"
        );
        Ok(guard)
    }

    /// Removes the policy-rc.d again if this run wrote it.
    fn remove(&mut self) {
        if !std::mem::take(&mut self.written) {
            return;
        }
        let ours = fs::read_to_string(POLICY_RC_D).is_ok_and(|s| s.contains(POLICY_RC_D_MARK));
        if !ours {
            return;
        }
        let removed = self
            .ctx
            .as_root("rm", "removing /usr/sbin/policy-rc.d")
            .and_then(|mut c| run(c.args(["-f", POLICY_RC_D])));
        if let Err(e) = removed {
            say!("setup", "WARNING: could not remove {POLICY_RC_D}: {e:#}");
        }
    }
}

impl Drop for NoServiceStarts<'_> {
    fn drop(&mut self) {
        self.remove();
    }
}

fn dpkg_installed(ctx: &Ctx, package: &str) -> bool {
    output(ctx.cmd("dpkg-query").args(["-W", "-f=${Status}", package]))
        .map(|s| s.trim_end().ends_with(" installed") && !s.starts_with("deinstall"))
        .unwrap_or(false)
}

/// One informational line about the kernel; missing BTF is a warning only.
fn kernel_report() {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        say!("setup", "kernel: {release}, BTF present");
    } else {
        say!(
            "setup",
            "kernel: {release}, WARNING: no /sys/kernel/btf/vmlinux; zerotrace needs a kernel with BTF (CONFIG_DEBUG_INFO_BTF)"
        );
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("").trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_majors() {
        assert_eq!(llvm_major("22.1.4"), Some(22));
        assert_eq!(llvm_major("x"), None);
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
            \tlibLLVM.so.22.1-rust-1.97.0-nightly => /root/.cache/zerotrace/llvm-22/lib/libLLVM.so.22.1-rust-1.97.0-nightly (0x00007f)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n";
        assert_eq!(linked_llvm_major(ldd), Some(22));
        assert_eq!(
            linked_llvm_major("\tlibLLVM-19.so => /usr/lib/libLLVM-19.so\n"),
            Some(19)
        );
        assert_eq!(linked_llvm_major("\tlibc.so.6 => /lib/libc.so.6\n"), None);
    }
}
