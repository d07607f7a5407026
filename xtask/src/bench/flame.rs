//! `cargo xtask bench flame`: where the agent's CPU goes at a workload's
//! saturation. The overhead harness runs the workload once with the agent
//! on while `perf record -e cpu-clock` samples the agent with DWARF call
//! graphs; `perf script` and inferno turn the samples into
//! bench/flame-WORKLOAD.svg, one box per function, as wide as its share of
//! the agent's CPU (both threads: the capture and tracing loop, and the
//! exporter).

use std::{fs, io::BufReader, path::PathBuf};

use anyhow::{Context, Result, bail};
use inferno::{
    collapse::{Collapse, perf::Folder},
    flamegraph,
};

use super::{Machine, num};
use crate::{say, util::Ctx, util::output};

pub struct Options {
    pub seconds: u64,
    /// Overhead workloads; nginx when empty.
    pub only: Vec<String>,
    /// An agent binary to profile instead of this tree's release build
    /// (another commit's, for a before/after pair).
    pub agent: Option<PathBuf>,
}

pub fn flame(ctx: &Ctx, opts: &Options) -> Result<()> {
    let workloads = if opts.only.is_empty() {
        vec!["nginx".to_string()]
    } else {
        opts.only.clone()
    };
    if output(ctx.cmd("perf").arg("--version")).is_err() {
        bail!(
            "perf is not installed: `apt install linux-perf` (Debian) or \
             `apt install linux-tools-$(uname -r)` (Ubuntu)"
        );
    }
    let dir = ctx.target_dir().join("bench/profile");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut args = vec![
        "overhead".to_string(),
        "--rounds".into(),
        "1".into(),
        "--seconds".into(),
        opts.seconds.to_string(),
        "--profile".into(),
        dir.display().to_string(),
    ];
    for w in &workloads {
        args.extend(["--workload".to_string(), w.clone()]);
    }
    let runs = super::workloads(ctx, &args, opts.agent.as_deref(), |line| {
        serde_json::from_str(line).map_err(Into::into)
    })?;
    let facts = Machine::gather(ctx);
    let out_dir = ctx.root.join("bench");
    for w in &workloads {
        let data = dir.join(format!("{w}-1.perf.data"));
        let script = output(
            ctx.as_root("perf", "reading the profile")?
                .args(["script", "--no-inline", "-i"])
                .arg(&data),
        )
        .with_context(|| format!("perf script -i {}", data.display()))?;
        let mut folded = Vec::new();
        Folder::default()
            .collapse(BufReader::new(script.as_bytes()), &mut folded)
            .context("folding the perf samples")?;
        let which = match &opts.agent {
            Some(path) => path.display().to_string(),
            None => format!("commit {}", facts.commit),
        };
        // What the profiled run measured, so two graphs compare per request.
        let run = runs
            .iter()
            .find(|r| r["workload"] == w.as_str() && r["mode"] == "on");
        let measured = run.map_or_else(String::new, |r| {
            format!(
                "; {} requests/s, agent CPU {:.1} µs per request",
                super::grouped(num(r, "rps")),
                num(r, "agent_cpu_us_per_request")
            )
        });
        let mut options = flamegraph::Options::default();
        options.title = format!("zerotrace agent CPU, {w} at saturation");
        options.subtitle = Some(format!(
            "{} s of perf record -e cpu-clock (which adds its own cost), {which}, Linux {}, \
             {} CPUs, {}{measured}",
            opts.seconds, facts.kernel, facts.cpus, facts.date
        ));
        say!("bench", "{w}{measured}");
        options.count_name = "ns".into();
        let svg = out_dir.join(format!("flame-{w}.svg"));
        let file =
            fs::File::create(&svg).with_context(|| format!("cannot write {}", svg.display()))?;
        flamegraph::from_reader(&mut options, &folded[..], file)
            .with_context(|| format!("rendering {}", svg.display()))?;
        say!("bench", "wrote {}", ctx.rel(&svg));
    }
    Ok(())
}
