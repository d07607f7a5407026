//! `cargo xtask dist` and `cargo xtask image`: a release of the agent that
//! runs on any x86-64 Linux distribution.
//!
//! The agent is built for `x86_64-unknown-linux-musl` in the `dist` profile
//! (release, symbols stripped), with the eBPF object embedded (agent/build.rs;
//! `AYA_BUILD_SKIP` is removed from the build's environment). C code in
//! dependencies is compiled with `musl-gcc` (Debian `musl-tools`). The binary
//! must be static, with no `PT_INTERP` and no `DT_NEEDED`, or the dist fails.
//!
//! Artifacts under `dist/` (git-ignored):
//! `zerotrace-<version>-x86_64-linux-musl/` (the binary, README, licenses,
//! the deploy files), its `.tar.gz` and the tarball's `.sha256`. The image
//! (`deploy/Containerfile`, `FROM scratch`) is built with that directory as
//! its context and also written as an OCI archive next to the tarball.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::util::{Ctx, output, run};
use crate::{elf, say, setup};

/// The Rust target of release builds.
pub const TARGET: &str = "x86_64-unknown-linux-musl";
/// The cargo profile of release builds (workspace Cargo.toml).
const PROFILE: &str = "dist";
/// Files and directories of the workspace that go into the release
/// directory, each where it exists.
const EXTRAS: &[&str] = &[
    "README.md",
    "LICENSE",
    "LICENSE-MIT",
    "LICENSE-APACHE",
    "deploy/README.md",
    "deploy/zerotrace.yaml",
    "deploy/systemd",
    "deploy/kubernetes",
    "deploy/Containerfile",
];
/// The Containerfile, relative to the workspace root and to the release directory.
const CONTAINERFILE: &str = "deploy/Containerfile";

/// What `cargo xtask dist` produced.
pub struct Dist {
    pub version: String,
    /// `dist/zerotrace-<version>-x86_64-linux-musl`
    pub dir: PathBuf,
    /// The static binary inside `dir`.
    pub bin: PathBuf,
}

/// The workspace version (the agent's, from `cargo metadata`).
fn version(ctx: &Ctx) -> Result<String> {
    let meta = output(
        ctx.cargo()
            .args(["metadata", "--no-deps", "--format-version", "1"]),
    )?;
    let meta: serde_json::Value = serde_json::from_str(&meta).context("cargo metadata")?;
    meta["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "agent"))
        .and_then(|p| p["version"].as_str())
        .map(str::to_owned)
        .context("cargo metadata lists no `agent` package with a version")
}

fn mib(bytes: u64) -> String {
    format!(
        "{:.1} MiB ({bytes} bytes)",
        bytes as f64 / (1024.0 * 1024.0)
    )
}

/// Builds the static binary and packs the release directory and tarball.
pub fn dist(ctx: &Ctx) -> Result<Dist> {
    let start = Instant::now();
    setup::toolchain(ctx, false)?;
    setup::musl(ctx)?;
    let version = version(ctx)?;

    say!(
        "dist",
        "building zerotrace {version} for {TARGET} (profile {PROFILE}, eBPF object embedded)…"
    );
    let mut c = ctx.cargo();
    c.args([
        "build",
        "-p",
        "agent",
        "--profile",
        PROFILE,
        "--target",
        TARGET,
    ]);
    // A skipped eBPF build would embed an empty object.
    c.env_remove("AYA_BUILD_SKIP");
    // C code in dependencies (ring, …) must be compiled against musl, not glibc.
    let cc_var = format!("CC_{}", TARGET.replace('-', "_"));
    c.env(&cc_var, "musl-gcc");
    run(&mut c)?;
    let built = ctx
        .target_dir()
        .join(TARGET)
        .join(PROFILE)
        .join("zerotrace");
    let data = fs::read(&built).with_context(|| format!("reading {}", built.display()))?;

    let linkage = elf::linkage(&data).with_context(|| format!("reading {}", built.display()))?;
    if !linkage.is_static() {
        bail!(
            "{} is not static ({}); a release must run without the host's libraries",
            built.display(),
            linkage.describe()
        );
    }
    say!("dist", "{}", linkage.describe());
    if !elf::embeds_bpf_object(&data) {
        bail!(
            "{} holds no eBPF object (was the eBPF build skipped?)",
            built.display()
        );
    }
    let reported = output(ctx.cmd(&built).arg("--version"))?;
    if !reported.split_whitespace().any(|w| w == version) {
        bail!("`zerotrace --version` says {reported:?}, the workspace is {version}");
    }
    say!("dist", "runs here: {}", reported.trim());

    let name = format!("zerotrace-{version}-x86_64-linux-musl");
    let out = ctx.root.join("dist");
    let dir = out.join(&name);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let bin = dir.join("zerotrace");
    fs::copy(&built, &bin).with_context(|| format!("copying to {}", bin.display()))?;
    for extra in EXTRAS {
        let from = ctx.root.join(extra);
        if from.exists() {
            copy_tree(&from, &dir.join(extra))?;
        }
    }

    let tarball = out.join(format!("{name}.tar.gz"));
    let mut tar = ctx.cmd("tar");
    // Same commit, same bytes: fixed owner, order and time, no gzip timestamp.
    tar.args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
        .arg(format!("--mtime=@{}", source_date_epoch(ctx)))
        .args(["--use-compress-program=gzip -9n", "-cf"])
        .arg(&tarball)
        .arg("-C")
        .arg(&out)
        .arg(&name);
    run(&mut tar)?;
    let sum = output(
        ctx.cmd("sha256sum")
            .arg(tarball.file_name().unwrap())
            .current_dir(&out),
    )?;
    let sha_file = out.join(format!("{name}.tar.gz.sha256"));
    fs::write(&sha_file, &sum)?;
    let bin_sum = output(ctx.cmd("sha256sum").arg(&bin))?;

    let size = |p: &Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    say!(
        "dist",
        "binary   {} — {}, sha256 {}",
        ctx.rel(&bin),
        mib(size(&bin)),
        bin_sum.split_whitespace().next().unwrap_or("?")
    );
    say!(
        "dist",
        "tarball  {} — {}",
        ctx.rel(&tarball),
        mib(size(&tarball))
    );
    say!("dist", "sha256   {}", ctx.rel(&sha_file));
    say!("dist", "done in {:.1}s", start.elapsed().as_secs_f64());
    Ok(Dist { version, dir, bin })
}

/// `$SOURCE_DATE_EPOCH`, else the last commit's time, else now.
fn source_date_epoch(ctx: &Ctx) -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .or_else(|| output(ctx.cmd("git").args(["log", "-1", "--format=%ct"])).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        })
}

/// Copies a file, or a directory with everything in it.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    if from.is_dir() {
        fs::create_dir_all(to)?;
        for entry in fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else {
        fs::copy(from, to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

/// What `cargo xtask image` produced.
pub struct Image {
    /// `zerotrace:<version>` in the builder's local storage.
    pub tag: String,
    /// The same image as an OCI archive (`podman load -i`, `skopeo copy`).
    pub archive: PathBuf,
}

/// Builds the `FROM scratch` image on the dist directory with buildah (or
/// podman) and writes it as an OCI archive next to the tarball.
pub fn image(ctx: &Ctx, dist: &Dist) -> Result<Image> {
    let start = Instant::now();
    let Some(tool) = ["buildah", "podman"]
        .into_iter()
        .find(|t| ctx.which(t).is_some())
    else {
        bail!("neither buildah nor podman is installed (`cargo xtask setup` installs buildah)");
    };
    let tag = format!("zerotrace:{}", dist.version);
    let containerfile = dist.dir.join(CONTAINERFILE);
    if !containerfile.is_file() {
        bail!("{} is missing", containerfile.display());
    }
    say!(
        "image",
        "building {tag} with {tool} (context {})…",
        ctx.rel(&dist.dir)
    );
    // The previous build of this tag would stay behind as an untagged image.
    if let Ok(mut rmi) = ctx.as_root(tool, "removing the previous image") {
        let _ = output(rmi.args(["rmi", &tag]));
    }
    let mut build = ctx.as_root(tool, "building the image")?;
    // chroot isolation: no container runtime is needed (nothing is RUN anyway).
    build
        .args(["build", "--isolation", "chroot", "--file"])
        .arg(&containerfile)
        .arg("--build-arg")
        .arg(format!("VERSION={}", dist.version));
    let git = |args: &[&str]| {
        output(ctx.cmd("git").args(args))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    for (arg, value) in [
        ("REVISION", git(&["rev-parse", "HEAD"])),
        ("SOURCE", git(&["config", "--get", "remote.origin.url"])),
    ] {
        build.arg("--build-arg").arg(format!("{arg}={value}"));
    }
    build.arg("--tag").arg(&tag).arg(&dist.dir);
    run(&mut build)?;

    let name = dist
        .dir
        .file_name()
        .context("dist directory has no name")?
        .to_string_lossy();
    let archive = dist.dir.with_file_name(format!("{name}.oci.tar"));
    let _ = fs::remove_file(&archive);
    let mut push = ctx.as_root(tool, "exporting the image")?;
    push.arg("push")
        .arg(&tag)
        .arg(format!("oci-archive:{}:{tag}", archive.display()));
    run(&mut push)?;
    say!(
        "image",
        "{tag} built in {:.1}s; OCI archive {} — {}",
        start.elapsed().as_secs_f64(),
        ctx.rel(&archive),
        mib(fs::metadata(&archive).map(|m| m.len()).unwrap_or(0))
    );
    Ok(Image { tag, archive })
}
