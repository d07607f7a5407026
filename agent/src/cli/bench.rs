//! `zerotrace bench-capture`: capture capacity on loopback traffic.
//!
//! A child load generator (`zerotrace loadgen`) sends small messages over a
//! loopback TCP connection as fast as it can; the agent traces only that
//! child and reports delivered events/s, losses and kernel ns per probe run.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, ExitCode, Stdio},
    sync::atomic::AtomicBool,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Args;
use serde_json::json;

use super::ReceiveArgsFlag;
use crate::{
    kernel::{
        kfunc::KfuncChoice,
        loader::{DEFAULT_PENDING_SLOTS, Floor, LoadOptions, Transport, TransportChoice},
    },
    pipeline::{Discard, Pipeline, default_buffer_bytes},
};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value = "auto")]
    transport: TransportChoice,
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Buffer size (default: the agent's defaults).
    #[arg(long)]
    buffer_size: Option<usize>,
    /// Bytes per message written by the load generator.
    #[arg(long, default_value_t = 64)]
    message_size: usize,
    #[command(flatten)]
    receive_args: ReceiveArgsFlag,
}

#[derive(Args, Debug)]
pub struct LoadgenArgs {
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    #[arg(long, default_value_t = 64)]
    message_size: usize,
}

/// Writes fixed-size messages to a loopback peer that reads them, for
/// `seconds`; prints the syscall count as JSON.
pub fn loadgen(args: &LoadgenArgs) -> anyhow::Result<ExitCode> {
    let mut go = String::new();
    std::io::stdin().read_line(&mut go)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let size = args.message_size.max(1);
    let reader = std::thread::spawn(move || -> u64 {
        let Ok((mut conn, _)) = listener.accept() else {
            return 0;
        };
        let mut buf = vec![0u8; size];
        let mut reads = 0;
        while matches!(conn.read(&mut buf), Ok(n) if n > 0) {
            reads += 1;
        }
        reads
    });
    let mut conn = TcpStream::connect(addr)?;
    conn.set_nodelay(true)?;
    let message = vec![b'x'; size];
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut writes = 0u64;
    while Instant::now() < deadline {
        for _ in 0..256 {
            conn.write_all(&message)?;
            writes += 1;
        }
    }
    drop(conn);
    let reads = reader.join().unwrap_or(0);
    println!(
        "{}",
        json!({ "writes": writes, "reads": reads, "syscalls": writes + reads })
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub struct FloorArgs {
    /// On the raw sys_enter and sys_exit tracepoints instead of the agent's.
    #[arg(long)]
    raw: bool,
    /// Leave the kernel's run-time statistics off: `run_ns` grows only while
    /// the caller turns them on (`sysctl kernel.bpf_stats_enabled=1`), so
    /// the load in between runs without their cost.
    #[arg(long)]
    no_stats: bool,
    #[command(flatten)]
    receive_args: ReceiveArgsFlag,
}

/// `zerotrace bench-floor`: attaches the floor (see [`Floor`]), prints
/// `{"runs":…,"run_ns":…}` at start and for every line read on stdin, and
/// detaches at end of input.
pub fn floor(args: &FloorArgs) -> anyhow::Result<ExitCode> {
    let floor = Floor::attach(args.raw, args.receive_args.choice, !args.no_stats)?;
    let report = || -> anyhow::Result<()> {
        let stats = floor.stats()?;
        println!(
            "{}",
            json!({ "runs": stats.run_count, "run_ns": stats.run_time_ns })
        );
        Ok(())
    };
    report()?;
    for line in std::io::stdin().lines() {
        line?;
        report()?;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn bench(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["loadgen", "--seconds", &args.seconds.to_string()])
        .args(["--message-size", &args.message_size.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the load generator")?;
    let opts = LoadOptions {
        transport: args.transport,
        capture_bytes: agent_common::DEFAULT_CAPTURE_BYTES,
        buffer_bytes: args
            .buffer_size
            .unwrap_or_else(|| default_buffer_bytes(Transport::resolve(args.transport))),
        pids: vec![child.id()],
        exes: Vec::new(),
        kernel_functions: KfuncChoice::Auto,
        runtimes: Default::default(),
        tls: Default::default(),
        // The capture benchmark reports the programs' run time.
        program_stats: true,
        pending_slots: DEFAULT_PENDING_SLOTS,
        receive_args: args.receive_args.choice,
    };
    let mut pipeline = Pipeline::start(&opts)?;
    let before = pipeline.probes.program_stats();
    let cpu_before = process_cpu_seconds();

    child
        .stdin
        .take()
        .context("loadgen stdin")?
        .write_all(b"go\n")?;
    let started = Instant::now();
    let stop = AtomicBool::new(false);
    let deadline = started + Duration::from_secs(args.seconds) + Duration::from_millis(500);
    pipeline.run(&stop, Some(deadline), &mut Discard)?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("loadgen stdout")?).read_line(&mut line)?;
    child.wait()?;
    // Records still in flight after the generator stopped.
    pipeline.step(Duration::from_millis(200), &mut Discard)?;
    let elapsed = started
        .elapsed()
        .as_secs_f64()
        .min(args.seconds as f64)
        .max(0.001);
    let cpu = process_cpu_seconds() - cpu_before;

    let stats = pipeline.stats();
    let loadgen: serde_json::Value = serde_json::from_str(line.trim()).unwrap_or_default();
    let mut kernel_ns = serde_json::Map::new();
    for after in pipeline.probes.program_stats() {
        let prior = before.iter().find(|b| b.program == after.program);
        let runs = after.run_count - prior.map_or(0, |p| p.run_count);
        let ns = after.run_time_ns - prior.map_or(0, |p| p.run_time_ns);
        if runs > 0 {
            kernel_ns.insert(after.program, json!((ns as f64 / runs as f64).round()));
        }
    }
    let result = json!({
        "transport": pipeline.transport().name(),
        "seconds": elapsed,
        "events_delivered": stats.data_events,
        "events_per_sec": (stats.data_events as f64 / elapsed).round(),
        "events_lost": stats.lost(),
        "bytes_delivered": stats.payload_bytes,
        "agent_cpu_seconds": cpu,
        "largest_batch": stats.reader.largest_batch,
        "kernel_ns_per_run": kernel_ns,
        "loadgen_syscalls": loadgen["syscalls"],
    });
    println!("{result}");
    Ok(ExitCode::SUCCESS)
}

/// CPU time (user + system) this process has used.
fn process_cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
        return 0.0;
    }
    // SAFETY: initialised by the successful call.
    let u = unsafe { usage.assume_init() };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}
