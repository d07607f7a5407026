//! Command line: `zerotrace run | events | check`.

mod bench;
mod check;
mod events;
mod run;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::{
    kernel::loader::{LoadOptions, Transport, TransportChoice},
    pipeline::default_buffer_bytes,
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
    /// Run the agent: capture socket traffic of selected processes.
    Run(run::RunArgs),
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
    /// Kernel → user transport.
    #[arg(long, value_enum, default_value = "auto", env = "ZEROTRACE_TRANSPORT")]
    pub transport: TransportChoice,
    /// Payload bytes copied per syscall (max 32768).
    #[arg(long, default_value_t = agent_common::DEFAULT_CAPTURE_BYTES,
          value_parser = clap::value_parser!(u32).range(0..=agent_common::MAX_CAPTURE_BYTES as i64),
          env = "ZEROTRACE_CAPTURE_BYTES")]
    pub capture_bytes: u32,
    /// Ring buffer bytes, or perf buffer bytes per CPU [default: 8 MiB ring, 1 MiB perf].
    #[arg(long, value_name = "BYTES", env = "ZEROTRACE_BUFFER_SIZE")]
    pub buffer_size: Option<usize>,
}

impl CaptureArgs {
    pub fn load_options(&self) -> LoadOptions {
        let default = default_buffer_bytes(Transport::resolve(self.transport));
        LoadOptions {
            transport: self.transport,
            capture_bytes: self.capture_bytes,
            buffer_bytes: self.buffer_size.unwrap_or(default),
            pids: self.pids.clone(),
            exes: self.exes.clone(),
        }
    }
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
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("zerotrace: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
