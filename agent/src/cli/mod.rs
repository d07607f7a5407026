//! Command line: `zerotrace run | events | check`.

mod bench;
mod check;
mod events;
mod otlp;
mod run;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::{
    config::{CaptureConfig, ConfigError},
    kernel::{
        kfunc::KfuncChoice,
        loader::{
            DEFAULT_PENDING_SLOTS, LoadOptions, ReceiveArgsChoice, Transport, TransportChoice,
        },
    },
    pipeline::default_buffer_bytes,
    runtime::follow::RuntimeChoice,
};

#[derive(Parser, Debug)]
#[command(name = "zerotrace", version, about = "eBPF zero-code tracing agent")]
pub struct Cli {
    /// Log level: error, warn, info, debug, trace (or RUST_LOG syntax).
    #[arg(long, global = true, env = "ZEROTRACE_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent: trace the HTTP traffic of selected processes and export spans.
    Run(Box<run::RunArgs>),
    /// Print captured socket events, one per line.
    Events(events::EventsArgs),
    /// Probe the running kernel for what the agent needs.
    Check(check::CheckArgs),
    /// Measure capture throughput against a loopback load generator.
    #[command(hide = true)]
    BenchCapture(bench::BenchArgs),
    /// Loopback traffic for bench-capture (waits for a line on stdin).
    #[command(hide = true)]
    Loadgen(bench::LoadgenArgs),
    /// The overhead benchmark's floor: an empty program on the agent's
    /// tracepoints; prints its run count and time per line read on stdin.
    #[command(hide = true)]
    BenchFloor(bench::FloorArgs),
}

/// What to capture and how; shared by `run` and `events`.
#[derive(Args, Debug, Clone)]
pub struct CaptureArgs {
    /// Trace this process and its descendants (repeatable). Default: all processes.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Trace processes running this executable (name, repeatable).
    #[arg(long = "exe", value_name = "NAME")]
    pub exes: Vec<String>,
    /// Kernel → user transport [default: auto].
    #[arg(long, value_enum, env = "ZEROTRACE_TRANSPORT")]
    pub transport: Option<TransportChoice>,
    /// Payload bytes copied per syscall (max 32768) [default: 8192].
    #[arg(long,
          value_parser = clap::value_parser!(u32).range(0..=agent_common::MAX_CAPTURE_BYTES as i64),
          env = "ZEROTRACE_CAPTURE_BYTES")]
    pub capture_bytes: Option<u32>,
    /// Ring buffer bytes, or perf buffer bytes per CPU [default: 8 MiB ring, 1 MiB perf].
    #[arg(long, value_name = "BYTES", env = "ZEROTRACE_BUFFER_SIZE")]
    pub buffer_size: Option<usize>,
    /// Probes on kernel socket functions (sendfile and other traffic that
    /// bypasses read/write) [default: auto = fentry, else kprobe, else none].
    #[arg(long, value_enum, env = "ZEROTRACE_KERNEL_FUNCTIONS")]
    pub kernel_functions: Option<KfuncChoice>,
    /// Runtimes whose units of work are followed to nest calls under their
    /// requests: auto, off, or a list (cpython) [default: auto].
    #[arg(long, value_name = "auto|off|LIST", env = "ZEROTRACE_RUNTIMES")]
    pub runtimes: Option<RuntimeChoice>,
    /// Read the plaintext of TLS connections from their library (OpenSSL):
    /// auto or off [default: auto].
    #[arg(long, value_name = "auto|off", env = "ZEROTRACE_TLS")]
    pub tls: Option<crate::tls::TlsChoice>,
    /// Count each eBPF program's runs and run time (kernel BPF statistics,
    /// for /metrics and the ebpf.execute spans): on or off [default: off;
    /// while on, every BPF program on the host pays two clock reads per run].
    #[arg(long, value_name = "on|off", env = "ZEROTRACE_PROGRAM_STATS",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub program_stats: Option<bool>,
    /// Per-thread call slots in the kernel, a power of two (tests make
    /// threads share them: a thread whose slot another holds uses a hash
    /// map instead).
    #[arg(long, hide = true, env = "ZEROTRACE_PENDING_SLOTS",
          default_value_t = DEFAULT_PENDING_SLOTS, value_parser = pending_slots)]
    pub pending_slots: u32,
    #[command(flatten)]
    pub receive_args: ReceiveArgsFlag,
}

/// The hidden `--receive-args` switch of every command that loads the
/// programs. auto: receives go without enter hooks where the kernel lends
/// their exit hook the thread's registers; enter: always with enter hooks
/// (side-by-side measurements, tests of the fallback).
#[derive(Args, Debug, Clone, Copy)]
pub struct ReceiveArgsFlag {
    #[arg(
        long = "receive-args",
        value_name = "auto|enter",
        hide = true,
        value_enum,
        env = "ZEROTRACE_RECEIVE_ARGS",
        default_value = "auto"
    )]
    pub choice: ReceiveArgsChoice,
}

fn pending_slots(value: &str) -> Result<u32, String> {
    match value.parse::<u32>() {
        Ok(n) if n.is_power_of_two() && n <= 1 << 22 => Ok(n),
        _ => Err(format!("{value:?} is not a power of two up to 4194304")),
    }
}

impl CaptureArgs {
    /// Flags and environment over the file's `capture` section.
    pub fn load_options_over(&self, file: &CaptureConfig) -> LoadOptions {
        let transport = self
            .transport
            .or(file.transport)
            .unwrap_or(TransportChoice::Auto);
        let default = default_buffer_bytes(Transport::resolve(transport));
        LoadOptions {
            transport,
            capture_bytes: self
                .capture_bytes
                .or(file.capture_bytes)
                .unwrap_or(agent_common::DEFAULT_CAPTURE_BYTES),
            buffer_bytes: self.buffer_size.or(file.buffer_size).unwrap_or(default),
            pids: flag_or_file(&self.pids, &file.pids),
            exes: flag_or_file(&self.exes, &file.exes),
            kernel_functions: self
                .kernel_functions
                .or(file.kernel_functions)
                .unwrap_or_default(),
            runtimes: self
                .runtimes
                .clone()
                .or_else(|| file.runtimes.clone())
                .unwrap_or_default(),
            tls: self.tls.or(file.tls).unwrap_or_default(),
            program_stats: self.program_stats.or(file.program_stats).unwrap_or(false),
            pending_slots: self.pending_slots,
            receive_args: self.receive_args.choice,
        }
    }

    pub fn load_options(&self) -> LoadOptions {
        self.load_options_over(&CaptureConfig::default())
    }
}

/// A list given by flags (or their environment variable) replaces the file's.
fn flag_or_file<T: Clone>(flag: &[T], file: &[T]) -> Vec<T> {
    if flag.is_empty() { file } else { flag }.to_vec()
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .parse_filters(&cli.log)
        .format_target(false)
        .init();
    let result = match cli.command {
        Command::Run(args) => run::run(&args),
        Command::Events(args) => events::run(&args),
        Command::Check(args) => check::run(&args),
        Command::BenchCapture(args) => bench::bench(&args),
        Command::Loadgen(args) => bench::loadgen(&args),
        Command::BenchFloor(args) => bench::floor(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<ConfigError>().is_some() => {
            eprintln!("zerotrace: configuration error: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("zerotrace: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pending_slots;

    #[test]
    fn pending_slots_takes_powers_of_two_only() {
        assert_eq!(pending_slots("1"), Ok(1));
        assert_eq!(pending_slots("32768"), Ok(32_768));
        assert_eq!(pending_slots("4194304"), Ok(1 << 22));
        for bad in ["0", "3", "1000", "8388608", "-1", "many"] {
            let err = pending_slots(bad).unwrap_err();
            assert!(err.contains("power of two"), "{bad}: {err}");
        }
    }
}
