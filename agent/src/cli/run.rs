//! `zerotrace run`: the agent.

use std::{process::ExitCode, time::Duration};

use clap::Args;

use super::CaptureArgs;
use crate::pipeline::{Pipeline, stop_on_signals};

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    capture: CaptureArgs,
    /// Seconds between statistics lines on stderr.
    #[arg(long, default_value_t = 10, env = "ZEROTRACE_STATS_INTERVAL")]
    stats_interval: u64,
}

pub fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let stop = stop_on_signals()?;
    let mut pipeline = Pipeline::start(&args.capture.load_options())?;
    eprintln!(
        "zerotrace: capturing ({} transport, {} probes attached); Ctrl-C to stop",
        pipeline.transport().name(),
        pipeline
            .probes
            .attachments
            .iter()
            .filter(|a| a.outcome.is_ok())
            .count()
    );
    let report = |p: &Pipeline| {
        let s = p.stats();
        log::info!(
            "{} data events, {} payload bytes, {} lost, {} connections open",
            s.data_events,
            s.payload_bytes,
            s.lost(),
            s.connections_open
        );
    };
    pipeline.run(
        &stop,
        None,
        Duration::from_secs(args.stats_interval.max(1)),
        &mut |_| {},
        &mut |p| report(p),
    )?;
    report(&pipeline);
    eprintln!("zerotrace: stopped, probes detached");
    Ok(ExitCode::SUCCESS)
}
