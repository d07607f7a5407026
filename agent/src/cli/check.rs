//! `zerotrace check`: what this kernel allows, row by row.

use std::process::ExitCode;

use clap::Args;

use crate::{
    kernel::{
        features::{self, Report, Row},
        kfunc::KfuncChoice,
        loader::{DEFAULT_PENDING_SLOTS, LoadOptions, Probes, ReceiveArgs, TransportChoice},
    },
    runtime::follow::{self, Follower, RuntimeChoice},
    tls::{self, TlsChoice, TlsFollower},
};

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Loads and attaches every program for real (tracing no process) and
/// records which kernel-function method the agent would use: only a real
/// load settles it, as kernels may list a program type and still refuse it.
fn trial_load(report: &mut Report) {
    let opts = LoadOptions {
        transport: TransportChoice::Auto,
        capture_bytes: 0,
        buffer_bytes: 4096,
        // No process has this pid: nothing is captured during the trial.
        pids: vec![u32::MAX],
        exes: Vec::new(),
        kernel_functions: KfuncChoice::Auto,
        runtimes: Default::default(),
        tls: Default::default(),
        program_stats: false,
        pending_slots: DEFAULT_PENDING_SLOTS,
        receive_args: Default::default(),
    };
    // The runtime and TLS probes are loaded on every kernel check runs on,
    // whether or not an interpreter or a TLS library is in use.
    let loaded = Probes::load(&opts).and_then(|mut p| {
        p.load_unit_probe()?;
        p.load_tls_probes()?;
        Ok(p)
    });
    let mut receives = None;
    let (programs, layer) = match loaded {
        Ok(mut probes) => {
            // Runtime probes go on every interpreter running now (the
            // processes themselves are not traced: no pid is selected).
            let mut runtimes = Follower::new(RuntimeChoice::Auto);
            runtimes.scan(&mut probes);
            report.runtimes = runtimes.reports.clone();
            // So are the TLS probes, on every TLS library mapped now.
            let mut tls = TlsFollower::new(TlsChoice::Auto);
            tls.scan(
                crate::conn::seed::selected_or_all(&[], &[]),
                true,
                &mut probes,
            );
            report.tls = tls.reports.clone();
            let attached = probes
                .attachments
                .iter()
                .filter(|a| a.outcome.is_ok())
                .count();
            let layer = probes.kernel_functions.clone();
            receives = Some(probes.receives);
            (
                Ok(format!(
                    "{} programs verified, {attached} probes attached",
                    probes.loads.iter().filter(|l| l.error.is_none()).count()
                )),
                match layer.active {
                    Some(method) => Ok(method.to_owned()),
                    None => Err(format!(
                        "none: syscall tracepoints only ({})",
                        layer.notes.join("; ")
                    )),
                },
            )
        }
        Err(e) => (
            Err(format!("{e:#}")),
            Err("not tried: the programs did not load".to_owned()),
        ),
    };
    report.capture_ready &= programs.is_ok();
    report.rows.push(Row::new("eBPF programs", true, programs));
    report.kernel_function_layer = layer.as_ref().ok().cloned();
    report
        .rows
        .push(Row::new("kernel-function layer", false, layer));
    let receives = match receives {
        Some(ReceiveArgs::Registers) => Ok(ReceiveArgs::Registers.as_str().to_owned()),
        Some(ReceiveArgs::Saved) => Err(format!(
            "{} (reading them at exit needs bpf_task_pt_regs, Linux 5.15+ on x86-64)",
            ReceiveArgs::Saved.as_str()
        )),
        None => Err("not tried: the programs did not load".to_owned()),
    };
    report
        .rows
        .push(Row::new("receives without enter hooks", false, receives));
}

pub fn run(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let mut report = features::probe();
    if report.capture_ready {
        trial_load(&mut report);
    }
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
        if let Some(row) = report.get("kernel-function layer") {
            println!("kernel-function layer: {}", row.detail);
        }
        if report.runtimes.is_empty() {
            println!("runtimes: no CPython process running");
        }
        for r in &report.runtimes {
            println!("runtime {}", follow::describe(r));
        }
        if report.tls.is_empty() {
            println!("tls: no process maps a TLS library");
        }
        for r in &report.tls {
            println!("tls {}", tls::describe(r));
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
