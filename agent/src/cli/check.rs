//! `zerotrace check`: what this kernel allows, row by row.

use std::process::ExitCode;

use clap::Args;

use crate::kernel::features;

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let report = features::probe();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let width = report.rows.iter().map(|r| r.name.len()).max().unwrap_or(0);
        println!("{:width$}  {:3}  DETAIL", "FEATURE", "OK");
        for row in &report.rows {
            let ok = if row.available { "yes" } else { "no" };
            println!("{:width$}  {ok:3}  {}", row.name, row.detail);
        }
        println!();
        match report.kernel_function_layer {
            Some(layer) => println!("kernel-function layer: {layer}"),
            None => println!(
                "kernel-function layer: unavailable (neither fentry nor kprobes); syscall tracepoints only"
            ),
        }
    }
    if report.capture_ready {
        if !args.json {
            println!("capture: ready");
        }
        Ok(ExitCode::SUCCESS)
    } else {
        let reasons: Vec<String> = report
            .blockers()
            .iter()
            .map(|r| format!("{}: {}", r.name, r.detail))
            .chain(
                (report.get("ring buffer").is_some_and(|r| !r.available)
                    && report.get("perf event array").is_some_and(|r| !r.available))
                .then(|| "no transport: neither ring buffer nor perf event array".to_owned()),
            )
            .collect();
        eprintln!(
            "zerotrace cannot capture on this host: {}",
            reasons.join("; ")
        );
        Ok(ExitCode::from(1))
    }
}
