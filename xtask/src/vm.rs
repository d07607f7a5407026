//! `cargo xtask vm-test`: the kernel matrix. Boots Debian bookworm's 6.1 and
//! 6.12 cloud kernels under QEMU software emulation (TCG; no KVM needed) with
//! an initramfs holding busybox, the release `zerotrace` binary with the
//! shared libraries it links, and the guest check (tests/src/bin/vm_guest.rs).
//! The guest runs every kernel-function path (fentry, kprobe) × transport
//! (ringbuf, perf) and reports one `ZT-VMTEST` line per cell on the serial
//! console; this side collects them into a table and fails when a cell fails
//! or never reports.
//!
//! Kernels are the newest `linux-image-6.1.0-N-cloud-amd64` and
//! `linux-image-6.12.N+deb12-cloud-amd64` apt knows, fetched with
//! `apt-get download` and unpacked with `dpkg -x` into
//! `~/.cache/zerotrace/vm/<package>/` (only the vmlinuz and config are kept).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::say;
use crate::setup;
use crate::util::{Ctx, output, run};

/// The cells each guest must report.
const PATHS: [&str; 2] = ["fentry", "kprobe"];
/// Capture over each transport, then `zerotrace run`'s own spans.
const TRANSPORTS: [&str; 3] = ["ringbuf", "perf", "self-spans"];

/// Console lines the guest prints start with this.
const MARK: &str = "ZT-VMTEST ";
const LOG_MARK: &str = "ZT-VMTEST-LOG ";

#[derive(Args, Debug)]
pub struct VmTestArgs {
    /// Kernel series to boot (repeatable) [default: all].
    #[arg(long = "kernel", value_name = "SERIES", value_parser = ["6.1", "6.12"])]
    kernels: Vec<String>,
    /// Seconds one guest may run (boot + all cells) before QEMU is killed.
    #[arg(long, value_name = "SECONDS", default_value_t = 180,
          value_parser = clap::value_parser!(u64).range(10..))]
    timeout: u64,
    /// Echo every guest's serial console.
    #[arg(long, short)]
    verbose: bool,
}

impl Default for VmTestArgs {
    /// Every kernel, the default time limit, quiet.
    fn default() -> Self {
        Self {
            kernels: Vec::new(),
            timeout: 180,
            verbose: false,
        }
    }
}

/// A Debian kernel package family.
struct Series {
    name: &'static str,
    prefix: &'static str,
    suffix: &'static str,
}

const SERIES: [Series; 2] = [
    Series {
        name: "6.1",
        prefix: "linux-image-6.1.0-",
        suffix: "-cloud-amd64",
    },
    Series {
        name: "6.12",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-cloud-amd64",
    },
];

impl Series {
    /// The ABI / patch number of a package of this family, e.g. 56 for
    /// linux-image-6.1.0-56-cloud-amd64.
    fn number(&self, package: &str) -> Option<u32> {
        package
            .strip_prefix(self.prefix)?
            .strip_suffix(self.suffix)?
            .parse()
            .ok()
    }

    /// The newest package of this family among `names`.
    fn newest<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Option<String> {
        names
            .into_iter()
            .filter_map(|n| Some((self.number(n.trim())?, n.trim())))
            .max_by_key(|(n, _)| *n)
            .map(|(_, name)| name.to_string())
    }
}

/// An unpacked kernel ready to boot.
struct Kernel {
    series: &'static str,
    /// `uname -r` inside the guest, e.g. 6.1.0-56-cloud-amd64.
    release: String,
    vmlinuz: PathBuf,
}

/// Boots every kernel and runs every cell; fails unless all pass.
pub fn run_matrix(ctx: &Ctx, args: &VmTestArgs) -> Result<()> {
    let cells = matrix(ctx, args)?;
    if cells.failed > 0 {
        bail!(
            "{} of {} kernel-matrix cells failed or missing",
            cells.failed,
            cells.passed + cells.failed
        );
    }
    Ok(())
}

/// Cells of the matrix that passed and that failed (or never reported).
#[derive(Clone, Copy, Debug, Default)]
pub struct CellCounts {
    pub passed: u64,
    pub failed: u64,
}

/// Runs the matrix and prints its table; a failing cell is counted, not an error.
pub fn matrix(ctx: &Ctx, args: &VmTestArgs) -> Result<CellCounts> {
    let start = Instant::now();
    setup::vm_packages(ctx)?;
    let qemu = ctx
        .which("qemu-system-x86_64")
        .context("qemu-system-x86_64 not found on PATH after installing qemu-system-x86")?;
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("busybox not found (package busybox-static)")?;

    // Release builds: a tenth of the debug binary's size, and TCG runs them far faster.
    crate::build(ctx, true)?;
    run(ctx.cargo().args([
        "build",
        "--release",
        "-p",
        "zerotrace-tests",
        "--bin",
        "vm_guest",
    ]))?;
    let agent = ctx.zerotrace_bin(true);
    let guest = ctx.target_dir().join("release/vm_guest");
    if !guest.is_file() {
        bail!("cargo build succeeded but {} is missing", guest.display());
    }

    let cache = cache_dir()?;
    let mut kernels = Vec::new();
    for series in SERIES
        .iter()
        .filter(|s| args.kernels.is_empty() || args.kernels.iter().any(|k| k == s.name))
    {
        kernels.push(fetch_kernel(ctx, series, &cache)?);
    }

    let initrd = ctx.target_dir().join("vm-test/initramfs.cpio");
    build_initramfs(ctx, &busybox, &agent, &guest, &initrd)?;

    let mut boots = Vec::new();
    for kernel in &kernels {
        boots.push(boot(&qemu, kernel, &initrd, args)?);
    }
    Ok(report(&kernels, &boots, start.elapsed()))
}

fn cache_dir() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache/zerotrace/vm"))
}

fn apt_package_names(ctx: &Ctx, prefix: &str) -> Result<String> {
    output(ctx.cmd("apt-cache").args(["pkgnames", prefix]))
}

/// Resolves the newest package of `series`, downloading and unpacking it
/// unless the cache has it.
fn fetch_kernel(ctx: &Ctx, series: &'static Series, cache: &Path) -> Result<Kernel> {
    let mut package = series.newest(apt_package_names(ctx, series.prefix)?.lines());
    if package.is_none() {
        say!(
            "vm-test",
            "kernel {}: no {}N{} in apt's lists; running apt-get update…",
            series.name,
            series.prefix,
            series.suffix
        );
        let mut c = ctx.as_root("env", "apt-get update")?;
        run(c.args(["DEBIAN_FRONTEND=noninteractive", "apt-get", "update", "-q"]))?;
        package = series.newest(apt_package_names(ctx, series.prefix)?.lines());
    }
    let package = match package {
        Some(p) => p,
        None => {
            // Offline: the newest kernel of this series already in the cache.
            let cached: Vec<String> = fs::read_dir(cache)
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| cache.join(n).join("vmlinuz").is_file())
                        .collect()
                })
                .unwrap_or_default();
            series
                .newest(cached.iter().map(String::as_str))
                .with_context(|| {
                    format!(
                        "apt knows no {}N{} package (is bookworm in the apt sources?)",
                        series.prefix, series.suffix
                    )
                })?
        }
    };

    let dir = cache.join(&package);
    let vmlinuz = dir.join("vmlinuz");
    let release_file = dir.join("release");
    if vmlinuz.is_file()
        && let Ok(release) = fs::read_to_string(&release_file)
    {
        say!("vm-test", "kernel {}: {package} (cached)", series.name);
        return Ok(Kernel {
            series: series.name,
            release: release.trim().to_string(),
            vmlinuz,
        });
    }

    let started = Instant::now();
    say!(
        "vm-test",
        "kernel {}: downloading {package} (apt-get download)…",
        series.name
    );
    let tmp = cache.join(format!(".download-{package}"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    // As root, apt would otherwise try to download as `_apt`, which cannot
    // write under root's home, and warn.
    output(
        ctx.cmd("apt-get")
            .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
            .arg(&package)
            .current_dir(&tmp),
    )
    .with_context(|| format!("downloading {package}"))?;
    let deb = fs::read_dir(&tmp)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", tmp.display()))?;
    let deb_mib = deb.metadata().map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0;
    say!(
        "vm-test",
        "kernel {}: unpacking {} ({deb_mib:.0} MiB)…",
        series.name,
        deb.file_name().unwrap_or_default().to_string_lossy()
    );
    let root = tmp.join("root");
    output(ctx.cmd("dpkg").arg("-x").arg(&deb).arg(&root))
        .with_context(|| format!("dpkg -x {}", deb.display()))?;
    let boot_dir = root.join("boot");
    let image = fs::read_dir(&boot_dir)
        .with_context(|| format!("{package} has no /boot"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("vmlinuz-"))
        .with_context(|| format!("{package} has no /boot/vmlinuz-*"))?;
    let release = image["vmlinuz-".len()..].to_string();
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    fs::rename(boot_dir.join(&image), &vmlinuz)?;
    let config = boot_dir.join(format!("config-{release}"));
    if config.is_file() {
        fs::rename(&config, dir.join("config"))?;
    }
    fs::write(&release_file, format!("{release}\n"))?;
    fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    // Older kernels of this series are not booted again.
    for entry in fs::read_dir(cache)?.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != package && series.number(&name).is_some() {
            let _ = fs::remove_dir_all(entry.path());
            say!(
                "vm-test",
                "kernel {}: removed the older {name}",
                series.name
            );
        }
    }
    say!(
        "vm-test",
        "kernel {}: {release} ready in {:.1}s ({})",
        series.name,
        started.elapsed().as_secs_f64(),
        vmlinuz.display()
    );
    Ok(Kernel {
        series: series.name,
        release,
        vmlinuz,
    })
}

/// A newc ("070701") cpio archive, the format the kernel unpacks as initramfs.
struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
    files: usize,
}

impl Cpio {
    fn new() -> Self {
        Self {
            out: Vec::new(),
            ino: 0,
            dirs: BTreeSet::new(),
            files: 0,
        }
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            u32::try_from(data.len()).expect("initramfs member under 4 GiB"),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).expect("short name"),
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    /// `path` (absolute or not) and its parents, once each.
    fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.dirs.insert(path.to_string());
        self.entry(path, 0o040755, &[], (0, 0));
    }

    fn parent(&mut self, path: &str) -> String {
        let path = path.trim_start_matches('/').to_string();
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        path
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        let path = self.parent(path);
        self.files += 1;
        self.entry(&path, 0o100000 | mode, data, (0, 0));
    }

    fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        let path = self.parent(path);
        self.entry(&path, 0o020000 | mode, &[], (major, minor));
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        while !self.out.len().is_multiple_of(512) {
            self.out.push(0);
        }
        self.out
    }
}

/// Absolute paths of the shared objects in `ldd` output, the dynamic loader
/// included (the vDSO is not a file).
fn ldd_paths(ldd: &str) -> Vec<String> {
    ldd.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line,
            };
            let path = path.split(" (").next().unwrap_or("").trim();
            path.starts_with('/').then(|| path.to_string())
        })
        .collect()
}

fn shared_libraries(ctx: &Ctx, binary: &Path) -> Result<Vec<String>> {
    // A static binary makes ldd exit non-zero ("not a dynamic executable").
    let out = ctx
        .cmd("ldd")
        .arg(binary)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run ldd {}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("not a dynamic") {
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(ldd_paths(&text))
}

/// The guest's /init: mounts, loopback, the check, power off.
fn init_script(guest_args: &str) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t bpf bpf /sys/fs/bpf
mount -t tmpfs tmpfs /tmp
ip link set lo up
echo "ZT-VMTEST boot kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"
/bin/vm_guest {guest_args}
echo "ZT-VMTEST guest-exit status=$? uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
echo o > /proc/sysrq-trigger
"#
    )
}

fn build_initramfs(
    ctx: &Ctx,
    busybox: &Path,
    agent: &Path,
    guest: &Path,
    dest: &Path,
) -> Result<()> {
    let started = Instant::now();
    say!("vm-test", "building the initramfs…");
    let mut cpio = Cpio::new();
    for d in ["bin", "dev", "proc", "sys", "tmp", "run", "etc", "root"] {
        cpio.dir(d);
    }
    // The kernel opens /dev/console for init's stdio before /init runs.
    cpio.char_dev("/dev/console", 0o600, 5, 1);
    cpio.char_dev("/dev/null", 0o666, 1, 3);
    let read = |p: &Path| fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    cpio.file("/bin/busybox", 0o755, &read(busybox)?);
    cpio.file("/bin/zerotrace", 0o755, &read(agent)?);
    cpio.file("/bin/vm_guest", 0o755, &read(guest)?);
    let mut libs = BTreeSet::new();
    for binary in [agent, guest] {
        libs.extend(shared_libraries(ctx, binary)?);
    }
    // Each at the absolute path the binaries ask for (the loader's is baked
    // into them), with the symlinks resolved into regular files.
    for lib in &libs {
        cpio.file(lib, 0o755, &read(Path::new(lib))?);
    }
    cpio.file("/init", 0o755, init_script("").as_bytes());
    cpio.file("/etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    let files = cpio.files;
    let bytes = cpio.finish();
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    fs::write(dest, &bytes).with_context(|| format!("cannot write {}", dest.display()))?;
    say!(
        "vm-test",
        "initramfs: {files} files ({}), {:.1} MiB in {:.1}s → {}",
        libs.iter().cloned().collect::<Vec<_>>().join(" "),
        bytes.len() as f64 / 1048576.0,
        started.elapsed().as_secs_f64(),
        ctx.rel(dest)
    );
    Ok(())
}

/// One cell as the guest reported it.
#[derive(Clone, Debug, PartialEq)]
struct Cell {
    kernel: String,
    path: String,
    transport: String,
    pass: bool,
    detail: String,
}

/// What one guest printed that we act on.
#[derive(Debug, PartialEq)]
enum Guest {
    Boot(String),
    Info(String),
    Start {
        path: String,
        transport: String,
    },
    Cell(Cell),
    Log {
        path: String,
        transport: String,
        line: String,
    },
    Error(String),
    Exit(String),
    Done,
}

/// `key=value` pairs up to (not including) `detail=`, and the detail.
fn fields(s: &str) -> (BTreeMap<&str, &str>, &str) {
    let (head, detail) = match s.find("detail=") {
        Some(i) => (&s[..i], &s[i + "detail=".len()..]),
        None => (s, ""),
    };
    let map = head
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    (map, detail.trim())
}

/// Parses one console line (kernel messages may share the line).
fn parse_line(line: &str) -> Option<Guest> {
    if let Some(i) = line.find(LOG_MARK) {
        let rest = &line[i + LOG_MARK.len()..];
        let (head, text) = rest.split_once(" | ").unwrap_or((rest, ""));
        let (f, _) = fields(head);
        return Some(Guest::Log {
            path: f.get("path")?.to_string(),
            transport: f.get("transport")?.to_string(),
            line: text.to_string(),
        });
    }
    let rest = &line[line.find(MARK)? + MARK.len()..];
    let (word, args) = rest.split_once(' ').unwrap_or((rest, ""));
    Some(match word {
        "boot" => Guest::Boot(args.to_string()),
        "info" => Guest::Info(args.to_string()),
        "error" => Guest::Error(args.to_string()),
        "guest-exit" => Guest::Exit(args.to_string()),
        "done" => Guest::Done,
        "start" => {
            let (f, _) = fields(args);
            Guest::Start {
                path: f.get("path")?.to_string(),
                transport: f.get("transport")?.to_string(),
            }
        }
        _ => {
            let (f, detail) = fields(rest);
            Guest::Cell(Cell {
                kernel: f.get("kernel")?.to_string(),
                path: f.get("path")?.to_string(),
                transport: f.get("transport")?.to_string(),
                pass: *f.get("result")? == "PASS",
                detail: detail.to_string(),
            })
        }
    })
}

/// What one boot produced.
struct Boot {
    cells: Vec<Cell>,
    logs: BTreeMap<(String, String), Vec<String>>,
    console: Vec<String>,
    booted: bool,
    done: bool,
    /// Why the run ended early, if it did.
    problem: Option<String>,
    elapsed: Duration,
}

fn boot(qemu: &Path, kernel: &Kernel, initrd: &Path, args: &VmTestArgs) -> Result<Boot> {
    let label = &kernel.release;
    say!(
        "vm-test",
        "booting {label} (QEMU TCG, timeout {}s)…",
        args.timeout
    );
    let started = Instant::now();
    let mut c = Command::new(qemu);
    c.args(["-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "2"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=4"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .with_context(|| format!("cannot start {}", qemu.display()))?;

    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    for (pipe, prefix) in [
        (
            Box::new(child.stdout.take().expect("piped")) as Box<dyn Read + Send>,
            "",
        ),
        (Box::new(child.stderr.take().expect("piped")), "qemu: "),
    ] {
        let tx = tx.clone();
        readers.push(thread::spawn(move || read_lines(pipe, prefix, &tx)));
    }
    drop(tx);

    let deadline = started + Duration::from_secs(args.timeout);
    let mut b = Boot {
        cells: Vec::new(),
        logs: BTreeMap::new(),
        console: Vec::new(),
        booted: false,
        done: false,
        problem: None,
        elapsed: Duration::ZERO,
    };
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                let _ = child.kill();
                break;
            }
        };
        if args.verbose {
            eprintln!("  {label} | {line}");
        }
        let t = started.elapsed().as_secs_f64();
        match parse_line(&line) {
            Some(Guest::Boot(_)) => {
                b.booted = true;
                say!("vm-test", "{label}: booted, /init running ({t:.1}s)");
            }
            Some(Guest::Info(info)) => say!("vm-test", "{label}: zerotrace check: {info}"),
            Some(Guest::Start { path, transport }) => {
                say!("vm-test", "{label}: {path}/{transport} running… ({t:.1}s)");
            }
            Some(Guest::Cell(cell)) => {
                say!(
                    "vm-test",
                    "{label}: {}/{} {} ({t:.1}s)",
                    cell.path,
                    cell.transport,
                    if cell.pass { "PASS" } else { "FAIL" }
                );
                if cell.kernel != kernel.release {
                    say!(
                        "vm-test",
                        "WARNING: the guest reports kernel {}, expected {}",
                        cell.kernel,
                        kernel.release
                    );
                }
                b.cells.push(cell);
            }
            Some(Guest::Log {
                path,
                transport,
                line,
            }) => b.logs.entry((path, transport)).or_default().push(line),
            Some(Guest::Error(e)) => {
                say!("vm-test", "{label}: guest error: {e}");
                b.problem.get_or_insert(format!("guest error: {e}"));
            }
            Some(Guest::Exit(s)) if !s.starts_with("status=0 ") && s != "status=0" => {
                b.problem.get_or_insert(format!("guest check exited: {s}"));
            }
            Some(Guest::Done) => b.done = true,
            Some(Guest::Exit(_)) | None => {}
        }
        b.console.push(line);
    }
    let status: Option<ExitStatus> = child.wait().ok();
    for r in readers {
        let _ = r.join();
    }
    b.elapsed = started.elapsed();
    if timed_out {
        b.problem = Some(format!(
            "QEMU timeout: {label} did not finish within {}s (--timeout); killed",
            args.timeout
        ));
    } else if !b.booted {
        b.problem = Some(format!(
            "boot failure: {label} never ran /init (QEMU exited: {})",
            status.map_or("?".into(), |s| s.to_string())
        ));
    } else if !b.done {
        b.problem.get_or_insert(format!(
            "the guest stopped before `ZT-VMTEST done` (QEMU exited: {})",
            status.map_or("?".into(), |s| s.to_string())
        ));
    }
    say!(
        "vm-test",
        "{label}: {} in {:.1}s",
        b.problem.as_deref().unwrap_or("guest finished"),
        b.elapsed.as_secs_f64()
    );
    Ok(b)
}

/// A console line without terminal control sequences (SeaBIOS clears the
/// screen; the kernel may print CRs).
fn printable(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ parameters final-byte; otherwise ESC + one char.
                if chars.next_if_eq(&'[').is_some() {
                    while chars.next().is_some_and(|c| !('@'..='~').contains(&c)) {}
                } else {
                    chars.next();
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Sends each line of `pipe` (control sequences removed, lossy UTF-8) with `prefix`.
fn read_lines(mut pipe: Box<dyn Read + Send>, prefix: &str, tx: &mpsc::Sender<String>) {
    let mut pending = Vec::new();
    let mut buf = [0u8; 8192];
    let send = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        let _ = tx.send(format!("{prefix}{}", printable(&text)));
    };
    loop {
        match pipe.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=i).collect();
                    send(&line);
                }
            }
        }
    }
    if !pending.is_empty() {
        send(&pending);
    }
}

/// The table, the reasons, and the verdict.
fn report(kernels: &[Kernel], boots: &[Boot], elapsed: Duration) -> CellCounts {
    struct Row<'a> {
        kernel: &'a str,
        path: &'static str,
        transport: &'static str,
        result: &'static str,
        detail: String,
    }
    let mut rows = Vec::new();
    for (kernel, boot) in kernels.iter().zip(boots) {
        for path in PATHS {
            for transport in TRANSPORTS {
                let cell = boot
                    .cells
                    .iter()
                    .find(|c| c.path == path && c.transport == transport);
                let (result, detail) = match cell {
                    Some(c) => (if c.pass { "PASS" } else { "FAIL" }, c.detail.clone()),
                    None => (
                        "MISSING",
                        boot.problem
                            .clone()
                            .unwrap_or_else(|| "the guest did not report this cell".into()),
                    ),
                };
                rows.push(Row {
                    kernel: &kernel.release,
                    path,
                    transport,
                    result,
                    detail,
                });
            }
        }
    }
    let kw = rows
        .iter()
        .map(|r| r.kernel.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!();
    println!(
        "{:kw$}  {:6}  {:10}  {:7}  detail",
        "kernel", "path", "transport", "result"
    );
    for r in &rows {
        println!(
            "{:kw$}  {:6}  {:10}  {:7}  {}",
            r.kernel, r.path, r.transport, r.result, r.detail
        );
    }
    println!();

    let bad: Vec<&Row> = rows.iter().filter(|r| r.result != "PASS").collect();
    for (kernel, boot) in kernels.iter().zip(boots) {
        for r in bad.iter().filter(|r| r.kernel == kernel.release) {
            if r.result != "FAIL" {
                continue;
            }
            println!("FAIL {} {}/{}: {}", r.kernel, r.path, r.transport, r.detail);
            if let Some(log) = boot
                .logs
                .get(&(r.path.to_string(), r.transport.to_string()))
            {
                let skip = log.len().saturating_sub(40);
                println!(
                    "  agent stderr{}:",
                    if skip > 0 { " (last 40 lines)" } else { "" }
                );
                for line in &log[skip..] {
                    println!("    {line}");
                }
            }
        }
        if let Some(problem) = &boot.problem {
            println!(
                "{} ({}): {problem}; last console lines:",
                kernel.release, kernel.series
            );
            let skip = boot.console.len().saturating_sub(40);
            for line in &boot.console[skip..] {
                println!("  | {line}");
            }
        }
    }
    let boot_times: Vec<String> = kernels
        .iter()
        .zip(boots)
        .map(|(k, b)| format!("{} {:.0}s", k.release, b.elapsed.as_secs_f64()))
        .collect();
    if bad.is_empty() {
        say!(
            "vm-test",
            "all {} cells passed in {:.0}s ({})",
            rows.len(),
            elapsed.as_secs_f64(),
            boot_times.join(", ")
        );
    } else {
        say!(
            "vm-test",
            "{} of {} cells failed or missing ({:.0}s: {})",
            bad.len(),
            rows.len(),
            elapsed.as_secs_f64(),
            boot_times.join(", ")
        );
    }
    CellCounts {
        passed: (rows.len() - bad.len()) as u64,
        failed: bad.len() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_newest_kernel_package() {
        let names = "linux-image-6.1.0-9-cloud-amd64\nlinux-image-6.1.0-56-cloud-amd64\n\
                     linux-image-6.1.0-56-cloud-amd64-unsigned\nlinux-image-6.1.0-55-cloud-amd64\n\
                     linux-image-6.1.0-56-cloud-amd64-dbg\nlinux-image-6.1.0-56-amd64\n";
        assert_eq!(
            SERIES[0].newest(names.lines()).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        let names = [
            "linux-image-6.12.99+deb12-cloud-amd64",
            "linux-image-6.12.117+deb12-cloud-amd64",
            "linux-image-6.12-cloud-amd64",
            "linux-image-6.12.117+deb12-amd64",
        ];
        assert_eq!(
            SERIES[1].newest(names).as_deref(),
            Some("linux-image-6.12.117+deb12-cloud-amd64")
        );
        assert_eq!(SERIES[1].newest(["linux-image-6.1.0-56-cloud-amd64"]), None);
    }

    #[test]
    fn reads_ldd_output() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            ldd_paths(ldd),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
        assert!(ldd_paths("\tstatically linked\n").is_empty());
    }

    #[test]
    fn writes_newc_cpio() {
        let mut c = Cpio::new();
        c.file("/a/b/f", 0o644, b"hello");
        let bytes = c.finish();
        assert_eq!(bytes.len() % 512, 0);
        let text = String::from_utf8_lossy(&bytes);
        // Parents first, each once, then the file, then the trailer.
        let a = text.find("a\0").unwrap();
        let ab = text.find("a/b\0").unwrap();
        let f = text.find("a/b/f\0").unwrap();
        let t = text.find("TRAILER!!!\0").unwrap();
        assert!(a < ab && ab < f && f < t);
        assert_eq!(text.matches("070701").count(), 4);
        // The file's header: mode 0100644, size 5, name size 6 ("a/b/f\0").
        let h = &text[f - 110..f];
        assert!(h.starts_with("070701"));
        assert_eq!(&h[14..22], "000081A4");
        assert_eq!(&h[54..62], "00000005");
        assert_eq!(&h[94..102], "00000006");
        // 110-byte header + 6-byte name is already 4-aligned: the data follows.
        assert_eq!(&bytes[f + 6..f + 6 + 5], b"hello");
    }

    #[test]
    fn parses_guest_lines() {
        let l = "[   12.3] random: ZT-VMTEST kernel=6.1.0-56-cloud-amd64 path=kprobe \
                 transport=perf result=FAIL detail=no open event with local=1 (3.0s)";
        assert_eq!(
            parse_line(l),
            Some(Guest::Cell(Cell {
                kernel: "6.1.0-56-cloud-amd64".into(),
                path: "kprobe".into(),
                transport: "perf".into(),
                pass: false,
                detail: "no open event with local=1 (3.0s)".into(),
            }))
        );
        assert_eq!(
            parse_line("ZT-VMTEST-LOG path=fentry transport=ringbuf | zerotrace: error: x | y"),
            Some(Guest::Log {
                path: "fentry".into(),
                transport: "ringbuf".into(),
                line: "zerotrace: error: x | y".into()
            })
        );
        assert_eq!(
            parse_line("ZT-VMTEST start path=fentry transport=perf"),
            Some(Guest::Start {
                path: "fentry".into(),
                transport: "perf".into()
            })
        );
        assert_eq!(parse_line("ZT-VMTEST done"), Some(Guest::Done));
        assert_eq!(
            printable("\x1bc\x1b[?7l\x1b[2JZT-VMTEST done\r\n"),
            "ZT-VMTEST done"
        );
        assert_eq!(parse_line("Run /init as init process"), None);
        assert_eq!(parse_line("ZT-VMTEST kernel=x path=y"), None);
    }
}
