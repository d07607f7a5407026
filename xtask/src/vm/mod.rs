//! `cargo xtask vm-test`: the kernel matrix. Boots Debian's 5.10, 6.1 and
//! 6.12 cloud kernels under QEMU software emulation (TCG; no KVM needed)
//! with an initramfs holding busybox, the release `zerotrace` binary and the
//! guest check (tests/src/bin/vm_guest.rs). The guest runs every
//! kernel-function path (fentry, kprobe) × transport (ringbuf, perf,
//! `zerotrace run`'s own spans, and `churn`: two agents attaching and
//! detaching the same probes at once while traffic runs through them) and
//! reports one `ZT-VMTEST` line per cell on the serial console; this side collects them into a table and fails when a
//! cell fails or never reports.
//!
//! A hang is a failure, not a timeout: the console is watched for the
//! kernel's own reports (soft lockup, RCU stall, hung task, `BUG:`, Oops,
//! panic). The first one fails the cell and step the guest was in, the
//! console from there on (the locked CPU's stack; with
//! `softlockup_all_cpu_backtrace` every CPU's) is quoted, and the guest is
//! stopped.
//!
//! Kernels are pinned package versions by default (`kernels.rs`);
//! `--newest` boots the newest the archive offers. `--repeat N` boots every
//! kernel N times, rotating the order of the cells, and reports every
//! failure and lock-up it saw (a soak for intermittent kernel hangs).

mod archive;
mod console;
mod emulator;
mod initramfs;
mod kernels;

use std::collections::BTreeMap;
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
use crate::util::{Ctx, run};
use console::{Cell, Guest};
use emulator::Emulator;
use kernels::{Choice, Kernel, Origin};

/// The kernel-function paths each guest checks.
const PATHS: [&str; 2] = ["fentry", "kprobe"];
/// Capture over each transport, `zerotrace run`'s own spans, then two
/// agents attaching and detaching at once under traffic (`churn`).
const TRANSPORTS: [&str; 4] = ["ringbuf", "perf", "self-spans", "churn"];
/// How long the console is still read after a kernel fault (for the
/// stacks that follow the first line) before QEMU is stopped.
const FAULT_GRACE: Duration = Duration::from_secs(15);
/// Console lines quoted from a fault on.
const FAULT_LINES: usize = 160;

#[derive(Args, Debug)]
pub struct VmTestArgs {
    /// Kernel series to boot (repeatable) [default: all].
    #[arg(long = "kernel", value_name = "SERIES", value_parser = ["5.10", "6.1", "6.12"])]
    kernels: Vec<String>,
    /// Boot the newest kernel of each series the Debian archive offers
    /// instead of the pinned versions.
    #[arg(long)]
    newest: bool,
    /// Boot every kernel N times (the cells' order rotates each boot) and
    /// report every failure and lock-up seen: a soak for intermittent hangs.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Run only these cells, e.g. `fentry/churn,kprobe/churn` [default: all].
    #[arg(long, value_name = "PATH/TRANSPORT", value_delimiter = ',')]
    cells: Vec<String>,
    /// Virtual CPUs per guest.
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=8))]
    smp: u32,
    /// Boot with the system's QEMU instead of the pinned QEMU 10.0 (Debian
    /// 12's QEMU 7.2 hangs guests now and then; see xtask/src/vm/emulator.rs).
    #[arg(long)]
    system_qemu: bool,
    /// Seconds one guest may run (boot + all cells) before QEMU is killed.
    #[arg(long, value_name = "SECONDS", default_value_t = 420,
          value_parser = clap::value_parser!(u64).range(10..))]
    timeout: u64,
    /// Echo every guest's serial console.
    #[arg(long, short)]
    verbose: bool,
}

impl Default for VmTestArgs {
    /// Every pinned kernel once, the default time limit, quiet.
    fn default() -> Self {
        Self {
            kernels: Vec::new(),
            newest: false,
            repeat: 1,
            cells: Vec::new(),
            smp: 2,
            system_qemu: false,
            timeout: 420,
            verbose: false,
        }
    }
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

/// Every (path, transport) cell in the guest's default order.
fn all_cells() -> Vec<(&'static str, &'static str)> {
    PATHS
        .iter()
        .flat_map(|p| TRANSPORTS.iter().map(move |t| (*p, *t)))
        .collect()
}

/// The cells `--cells` names (all when none), in the default order.
fn selected_cells(names: &[String]) -> Result<Vec<(&'static str, &'static str)>> {
    let all = all_cells();
    for name in names {
        if !all.iter().any(|(p, t)| *name == format!("{p}/{t}")) {
            let known: Vec<String> = all.iter().map(|(p, t)| format!("{p}/{t}")).collect();
            bail!("unknown cell {name:?} (cells: {})", known.join(", "));
        }
    }
    Ok(all
        .into_iter()
        .filter(|(p, t)| names.is_empty() || names.iter().any(|n| *n == format!("{p}/{t}")))
        .collect())
}

/// The cells of boot `round` in the order the guest runs them: the default
/// order first, then rotated by one cell per boot.
fn cell_order(
    cells: &[(&'static str, &'static str)],
    round: u32,
) -> Vec<(&'static str, &'static str)> {
    let mut cells = cells.to_vec();
    let n = cells.len().max(1);
    cells.rotate_left(round as usize % n);
    cells
}

/// Runs the matrix and prints its table; a failing cell is counted, not an error.
pub fn matrix(ctx: &Ctx, args: &VmTestArgs) -> Result<CellCounts> {
    let start = Instant::now();
    let cells = selected_cells(&args.cells)?;
    setup::vm_packages(ctx)?;
    let qemu = emulator::resolve(ctx, args.system_qemu)?;
    say!("vm-test", "emulator: {}", qemu.describe);
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("busybox not found (package busybox-static)")?;

    let choice = if args.newest {
        Choice::Newest
    } else {
        Choice::Pinned
    };
    let kernels = kernels::resolve(ctx, &args.kernels, choice)?;

    // Release builds: a tenth of the debug binary's size, and TCG runs them far faster.
    crate::build(ctx, true)?;
    say!("vm-test", "building the guest check (vm_guest)…");
    run(ctx.cargo().args([
        "build",
        "--release",
        "--quiet",
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
    let initrd = ctx.target_dir().join("vm-test/initramfs.cpio");
    initramfs::build_initramfs(ctx, &busybox, &agent, &guest, &initrd)?;

    let mut boots = Vec::new();
    for round in 0..args.repeat {
        for (k, kernel) in kernels.iter().enumerate() {
            let order = cell_order(&cells, round);
            if args.repeat > 1 {
                say!(
                    "vm-test",
                    "boot {} of {} on {}",
                    round + 1,
                    args.repeat,
                    kernel.release
                );
            }
            let boot = boot(&qemu, kernel, &initrd, args, &order)?;
            boots.push(BootRun {
                kernel: k,
                round,
                boot,
            });
        }
    }
    println!();
    println!("emulator: {}, {} vCPUs", qemu.describe, args.smp);
    Ok(if args.repeat > 1 {
        soak_report(&kernels, &boots, &cells, start.elapsed())
    } else {
        report(&kernels, &boots, &cells, start.elapsed())
    })
}

/// One boot of one kernel.
struct BootRun {
    kernel: usize,
    round: u32,
    boot: Boot,
}

/// Where the guest was: a cell and the step within it (`check` before the cells).
#[derive(Clone, Debug, Default, PartialEq)]
struct Position {
    path: String,
    transport: String,
    step: String,
    /// Seconds since QEMU started when this step began.
    since: f64,
}

impl Position {
    fn describe(&self) -> String {
        if self.path.is_empty() {
            format!("step `{}` (from {:.1}s)", self.step, self.since)
        } else {
            format!(
                "{}/{} step `{}` (from {:.1}s)",
                self.path, self.transport, self.step, self.since
            )
        }
    }
}

/// A hang or crash the kernel reported.
#[derive(Clone, Debug)]
struct Fault {
    kind: &'static str,
    /// The kernel's first report line.
    line: String,
    /// Seconds since QEMU started.
    at: f64,
    /// What the guest was doing.
    during: Position,
    /// The console from the report on.
    console: Vec<String>,
}

/// What one boot produced.
struct Boot {
    cells: Vec<Cell>,
    logs: BTreeMap<(String, String), Vec<String>>,
    console: Vec<String>,
    /// Kernel warnings (`WARNING: CPU: …`), reported but not failed.
    warnings: Vec<String>,
    fault: Option<Fault>,
    booted: bool,
    done: bool,
    /// Why the run ended early, if it did.
    problem: Option<String>,
    elapsed: Duration,
}

impl Boot {
    /// The result of `cell`: its own report, else why there is none.
    fn cell(&self, path: &str, transport: &str) -> (&'static str, String) {
        if let Some(c) = self
            .cells
            .iter()
            .find(|c| c.path == path && c.transport == transport)
        {
            return (if c.pass { "PASS" } else { "FAIL" }, c.detail.clone());
        }
        if let Some(f) = &self.fault {
            if f.during.path == path && f.during.transport == transport {
                return (
                    "FAIL",
                    format!(
                        "KERNEL {} during step `{}` ({:.1}s after it began): {}",
                        f.kind.to_uppercase(),
                        f.during.step,
                        f.at - f.during.since,
                        console::kernel_message(&f.line).unwrap_or(&f.line).trim()
                    ),
                );
            }
            return (
                "MISSING",
                format!(
                    "not run: the kernel reported a {} during {}",
                    f.kind,
                    f.during.describe()
                ),
            );
        }
        (
            "MISSING",
            self.problem
                .clone()
                .unwrap_or_else(|| "the guest did not report this cell".into()),
        )
    }
}

/// The kernel command line: serial console, no reboot loop, and every hang
/// detector loud: the soft-lockup report carries every CPU's stack and
/// then panics (QEMU exits at once with -no-reboot), the hung-task check
/// runs after 30 s instead of 120, log level 5 lets the stacks (printed at
/// the default level 4) through.
fn kernel_command_line(order: &[(&str, &str)]) -> String {
    let cells: Vec<String> = order.iter().map(|(p, t)| format!("{p}/{t}")).collect();
    format!(
        "console=ttyS0 panic=-1 loglevel=5 softlockup_panic=1 \
         softlockup_all_cpu_backtrace=1 sysctl.kernel.hung_task_timeout_secs=30 ztcells={}",
        cells.join(",")
    )
}

fn boot(
    qemu: &Emulator,
    kernel: &Kernel,
    initrd: &Path,
    args: &VmTestArgs,
    order: &[(&str, &str)],
) -> Result<Boot> {
    let label = &kernel.release;
    say!(
        "vm-test",
        "booting {label} (QEMU TCG, {} vCPUs, timeout {}s)…",
        args.smp,
        args.timeout
    );
    let started = Instant::now();
    let mut c = Command::new(&qemu.binary);
    c.args(qemu.data_args())
        .args(["-accel", "tcg", "-cpu", "max", "-m", "1024"])
        .arg("-smp")
        .arg(args.smp.to_string())
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(kernel_command_line(order))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .with_context(|| format!("cannot start {}", qemu.binary.display()))?;

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
        readers.push(thread::spawn(move || {
            console::read_lines(pipe, prefix, &tx)
        }));
    }
    drop(tx);

    let mut deadline = started + Duration::from_secs(args.timeout);
    let mut b = Boot {
        cells: Vec::new(),
        logs: BTreeMap::new(),
        console: Vec::new(),
        warnings: Vec::new(),
        fault: None,
        booted: false,
        done: false,
        problem: None,
        elapsed: Duration::ZERO,
    };
    let mut position = Position {
        step: "boot".into(),
        ..Position::default()
    };
    let mut timed_out = false;
    let mut stopped_after_fault = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if b.fault.is_some() {
                    stopped_after_fault = true;
                } else {
                    timed_out = true;
                }
                let _ = child.kill();
                break;
            }
        };
        if args.verbose {
            eprintln!("  {label} | {line}");
        }
        let t = started.elapsed().as_secs_f64();
        if let Some(fault) = &mut b.fault {
            if fault.console.len() < FAULT_LINES {
                fault.console.push(line.clone());
            }
        } else if let Some(kind) = console::fault_kind(&line) {
            say!(
                "vm-test",
                "{label}: KERNEL {} during {} at {t:.1}s: {}",
                kind.to_uppercase(),
                position.describe(),
                console::kernel_message(&line).unwrap_or(&line).trim()
            );
            b.fault = Some(Fault {
                kind,
                line: line.clone(),
                at: t,
                during: position.clone(),
                console: vec![line.clone()],
            });
            // The stacks follow the first line; then stop the guest.
            deadline = deadline.min(Instant::now() + FAULT_GRACE);
        } else if console::is_warning(&line) {
            say!(
                "vm-test",
                "{label}: kernel warning during {}: {}",
                position.describe(),
                console::kernel_message(&line).unwrap_or(&line).trim()
            );
            b.warnings.push(line.clone());
        }
        match console::parse_line(&line) {
            Some(Guest::Boot(info)) => {
                b.booted = true;
                position = Position {
                    step: "check".into(),
                    since: t,
                    ..Position::default()
                };
                say!(
                    "vm-test",
                    "{label}: booted ({info}), /init running ({t:.1}s)"
                );
            }
            Some(Guest::Info(info)) => say!("vm-test", "{label}: zerotrace check: {info}"),
            Some(Guest::Start { path, transport }) => {
                position = Position {
                    path: path.clone(),
                    transport: transport.clone(),
                    step: "start".into(),
                    since: t,
                };
                say!("vm-test", "{label}: {path}/{transport} running… ({t:.1}s)");
            }
            Some(Guest::Step {
                path,
                transport,
                step,
            }) => {
                position = Position {
                    path,
                    transport,
                    step,
                    since: t,
                };
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
                position = Position {
                    step: "between cells".into(),
                    since: t,
                    ..Position::default()
                };
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
    if let Some(f) = &b.fault {
        b.problem = Some(format!(
            "kernel {} during {}{}",
            f.kind,
            f.during.describe(),
            if stopped_after_fault {
                "; QEMU stopped"
            } else {
                ""
            }
        ));
    } else if timed_out {
        b.problem = Some(format!(
            "QEMU timeout: {label} did not finish within {}s (--timeout), last in {}; killed \
             (no kernel report of a hang on the console)",
            args.timeout,
            position.describe()
        ));
    } else if !b.booted {
        b.problem = Some(format!(
            "boot failure: {label} never ran /init (QEMU exited: {})",
            status.map_or("?".into(), |s| s.to_string())
        ));
    } else if !b.done {
        b.problem.get_or_insert(format!(
            "the guest stopped before `ZT-VMTEST done` in {} (QEMU exited: {})",
            position.describe(),
            status.map_or("?".into(), |s| s.to_string())
        ));
    }
    say!(
        "vm-test",
        "{label}: {} in {:.1}s",
        b.problem.as_deref().unwrap_or("guest finished"),
        b.elapsed.as_secs_f64()
    );
    // At once, not only in the report at the end: a soak may run for hours.
    if let Some(f) = &b.fault {
        print_fault(kernel, f);
    }
    Ok(b)
}

/// Prints a fault's console excerpt.
fn print_fault(kernel: &Kernel, f: &Fault) {
    println!(
        "KERNEL {} on {} during {} at {:.1}s; console from the report on:",
        f.kind.to_uppercase(),
        kernel.release,
        f.during.describe(),
        f.at
    );
    for line in &f.console {
        println!("  | {line}");
    }
}

/// The table, the reasons, and the verdict.
fn report(
    kernels: &[Kernel],
    boots: &[BootRun],
    cells: &[(&'static str, &'static str)],
    elapsed: Duration,
) -> CellCounts {
    struct Row<'a> {
        kernel: &'a str,
        path: &'static str,
        transport: &'static str,
        result: &'static str,
        detail: String,
    }
    let mut rows = Vec::new();
    for run in boots {
        let kernel = &kernels[run.kernel];
        for &(path, transport) in cells {
            let (result, detail) = run.boot.cell(path, transport);
            rows.push(Row {
                kernel: &kernel.release,
                path,
                transport,
                result,
                detail,
            });
        }
    }
    let kw = print_kernels(kernels);
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
    for run in boots {
        let kernel = &kernels[run.kernel];
        let boot = &run.boot;
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
        if boot.fault.is_some() {
            // Printed when the boot ended.
        } else if let Some(problem) = &boot.problem {
            println!(
                "{} ({}): {problem}; last console lines:",
                kernel.release, kernel.series
            );
            let skip = boot.console.len().saturating_sub(40);
            for line in &boot.console[skip..] {
                println!("  | {line}");
            }
        }
        for w in &boot.warnings {
            println!("kernel warning on {}: {w}", kernel.release);
        }
    }
    let boot_times: Vec<String> = boots
        .iter()
        .map(|r| {
            format!(
                "{} {:.0}s",
                kernels[r.kernel].release,
                r.boot.elapsed.as_secs_f64()
            )
        })
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

/// One line per kernel (package, version, provenance); returns the width
/// of the kernel column.
fn print_kernels(kernels: &[Kernel]) -> usize {
    let kw = kernels
        .iter()
        .map(|k| k.release.len())
        .max()
        .unwrap_or(6)
        .max(6);
    for k in kernels {
        println!("{:kw$}  {}", k.release, kernel_line(k));
    }
    println!();
    kw
}

/// Version and provenance of a kernel, for the report header.
fn kernel_line(k: &Kernel) -> String {
    let mut s = format!("{} {}", k.package, k.version);
    match &k.origin {
        Origin::Pinned => s.push_str(" (pinned, SHA-256 verified)"),
        Origin::Newest => s.push_str(" (--newest: the newest the archive offers)"),
        Origin::Fallback { pinned, why } => s.push_str(&format!(
            " (NOT PINNED: the pin {pinned} could not be fetched: {why})"
        )),
    }
    s
}

/// `--repeat`: per kernel and cell, how many boots passed; every failing
/// boot and every kernel fault.
fn soak_report(
    kernels: &[Kernel],
    boots: &[BootRun],
    cells: &[(&'static str, &'static str)],
    elapsed: Duration,
) -> CellCounts {
    let rounds = boots.iter().map(|b| b.round).max().map_or(0, |r| r + 1);
    let mut counts = CellCounts::default();
    let kw = print_kernels(kernels);
    println!(
        "{:kw$}  {:6}  {:10}  {:>9}  failing boots",
        "kernel", "path", "transport", "passed"
    );
    for (ki, kernel) in kernels.iter().enumerate() {
        let runs: Vec<&BootRun> = boots.iter().filter(|b| b.kernel == ki).collect();
        for &(path, transport) in cells {
            let mut passed = 0;
            let mut failing = Vec::new();
            for run in &runs {
                match run.boot.cell(path, transport) {
                    ("PASS", _) => passed += 1,
                    (result, _) => failing.push(format!("#{} {result}", run.round + 1)),
                }
            }
            counts.passed += passed;
            counts.failed += (runs.len() as u64).saturating_sub(passed);
            println!(
                "{:kw$}  {:6}  {:10}  {:>9}  {}",
                kernel.release,
                path,
                transport,
                format!("{passed}/{}", runs.len()),
                failing.join(" ")
            );
        }
    }
    println!();
    let mut faults = 0;
    for run in boots {
        let kernel = &kernels[run.kernel];
        let failed: Vec<String> = cells
            .iter()
            .filter_map(|&(p, t)| match run.boot.cell(p, t) {
                ("PASS", _) => None,
                (result, detail) => Some(format!("{p}/{t} {result}: {detail}")),
            })
            .collect();
        if failed.is_empty() && run.boot.fault.is_none() {
            continue;
        }
        println!("boot #{} on {}:", run.round + 1, kernel.release);
        for f in &failed {
            println!("  {f}");
        }
        if let Some(f) = &run.boot.fault {
            faults += 1;
            println!(
                "  KERNEL {} during {} at {:.1}s: {} (console above, after the boot)",
                f.kind.to_uppercase(),
                f.during.describe(),
                f.at,
                console::kernel_message(&f.line).unwrap_or(&f.line).trim()
            );
        }
    }
    for k in kernels.iter().enumerate() {
        let n = boots
            .iter()
            .filter(|b| b.kernel == k.0 && b.boot.fault.is_some())
            .count();
        say!(
            "vm-test",
            "{}: {rounds} boots, {n} with a kernel lock-up or crash",
            k.1.release
        );
    }
    say!(
        "vm-test",
        "soak: {} boots in {:.0}s, {} cells passed, {} failed or missing, {faults} kernel faults",
        boots.len(),
        elapsed.as_secs_f64(),
        counts.passed,
        counts.failed
    );
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boots_rotate_the_cell_order() {
        let all = all_cells();
        let first = cell_order(&all, 0);
        assert_eq!(first, all);
        assert_eq!(first[0], ("fentry", "ringbuf"));
        let second = cell_order(&all, 1);
        assert_eq!(second[0], ("fentry", "perf"));
        assert_eq!(second[7], ("fentry", "ringbuf"));
        assert_eq!(cell_order(&all, 8), first);
        let churn = selected_cells(&["kprobe/churn".into(), "fentry/churn".into()]).unwrap();
        assert_eq!(churn, [("fentry", "churn"), ("kprobe", "churn")]);
        assert!(selected_cells(&["fentry/nope".into()]).is_err());
        let line = kernel_command_line(&second);
        assert!(
            line.contains(" ztcells=fentry/perf,fentry/self-spans,fentry/churn,kprobe/ringbuf,")
        );
        assert!(line.contains("softlockup_panic=1"));
    }

    fn boot_with_fault() -> Boot {
        Boot {
            cells: vec![Cell {
                kernel: "k".into(),
                path: "fentry".into(),
                transport: "ringbuf".into(),
                pass: true,
                detail: "ok".into(),
            }],
            logs: BTreeMap::new(),
            console: Vec::new(),
            warnings: Vec::new(),
            fault: Some(Fault {
                kind: "soft lockup",
                line: "[   36.555980] watchdog: BUG: soft lockup - CPU#0 stuck for 27s! [zerotrace:145]"
                    .into(),
                at: 36.5,
                during: Position {
                    path: "fentry".into(),
                    transport: "perf".into(),
                    step: "traffic".into(),
                    since: 10.0,
                },
                console: Vec::new(),
            }),
            booted: true,
            done: false,
            problem: None,
            elapsed: Duration::from_secs(40),
        }
    }

    #[test]
    fn a_fault_fails_its_cell_and_leaves_the_rest_missing() {
        let b = boot_with_fault();
        assert_eq!(b.cell("fentry", "ringbuf").0, "PASS");
        let (result, detail) = b.cell("fentry", "perf");
        assert_eq!(result, "FAIL");
        assert!(
            detail.starts_with("KERNEL SOFT LOCKUP during step `traffic` (26.5s after it began): watchdog: BUG: soft lockup"),
            "{detail}"
        );
        let (result, detail) = b.cell("kprobe", "perf");
        assert_eq!(result, "MISSING");
        assert!(detail.contains("fentry/perf step `traffic`"), "{detail}");
    }
}
