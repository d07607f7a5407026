//! `cargo xtask fuzz`: the cargo-fuzz targets under agent/fuzz (the protocol
//! parsers and the kernel-record decoder), each for a fixed time.
//!
//! Per target: first the committed regression inputs
//! (agent/fuzz/regressions/TARGET/*) are replayed one by one, so a bug found
//! before fails the run again; then they seed the target's working corpus
//! (agent/fuzz/corpus/TARGET, git-ignored) and libFuzzer runs for
//! `--seconds`. A crash leaves its input under agent/fuzz/artifacts/TARGET/.
//! `cargo xtask test` runs the same thing briefly ([`smoke`]).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::util::{Ctx, describe, output, run};
use crate::{say, setup};

/// Seconds per target in the smoke `cargo xtask test` runs; the environment
/// variable [`SMOKE_SECONDS_ENV`] overrides it.
pub const SMOKE_SECONDS: u32 = 10;
pub const SMOKE_SECONDS_ENV: &str = "ZEROTRACE_FUZZ_SECONDS";
/// libFuzzer's memory ceiling per target, and the time one input may take.
const RSS_LIMIT_MB: u32 = 2048;
const INPUT_TIMEOUT_S: u32 = 20;

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Targets to run [default: all that `cargo fuzz list` shows].
    pub targets: Vec<String>,
    /// Seconds of fuzzing per target.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
    pub seconds: u32,
}

/// How one target went.
pub struct Outcome {
    pub target: String,
    /// Regression inputs replayed.
    pub regressions: usize,
    /// Executions libFuzzer reported at the end (none after a crash).
    pub runs: Option<u64>,
    pub corpus: usize,
    /// `None`: no crash; else what failed, naming the input.
    pub failure: Option<String>,
}

impl Outcome {
    fn line(&self) -> String {
        let runs = self.runs.map_or("-".to_string(), |r| r.to_string());
        let result = self.failure.as_deref().unwrap_or("ok");
        format!(
            "{:<9} runs {:>10}  corpus {:>5}  regressions {:>2}  {result}",
            self.target, runs, self.corpus, self.regressions
        )
    }
}

fn fuzz_dir(ctx: &Ctx) -> PathBuf {
    ctx.root.join("agent/fuzz")
}

/// `cargo +nightly fuzz ARGS` in agent/fuzz, with its own target dir and no
/// eBPF build (the targets never load eBPF).
fn cargo_fuzz(ctx: &Ctx) -> Command {
    let mut c = ctx.cmd("cargo");
    c.args(["+nightly", "fuzz"])
        .current_dir(fuzz_dir(ctx))
        .env("AYA_BUILD_SKIP", "1")
        .env_remove("CARGO_TARGET_DIR");
    c
}

/// The `cargo xtask fuzz` task.
pub fn fuzz(ctx: &Ctx, args: &FuzzArgs) -> Result<()> {
    let outcomes = run_targets(ctx, &args.targets, args.seconds)?;
    let failed = outcomes.iter().filter(|o| o.failure.is_some()).count();
    if failed > 0 {
        bail!("{failed} of {} fuzz targets failed", outcomes.len());
    }
    Ok(())
}

/// The smoke `cargo xtask test` runs: every target for [`SMOKE_SECONDS`]
/// (or `$ZEROTRACE_FUZZ_SECONDS`).
pub fn smoke(ctx: &Ctx) -> Result<Vec<Outcome>> {
    let seconds = match std::env::var(SMOKE_SECONDS_ENV) {
        Ok(s) => s
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|&n| n > 0)
            .with_context(|| format!("{SMOKE_SECONDS_ENV}={s:?} is not a positive number"))?,
        Err(_) => SMOKE_SECONDS,
    };
    run_targets(ctx, &[], seconds)
}

/// Checks the tools, builds every target once, then replays and fuzzes each.
fn run_targets(ctx: &Ctx, wanted: &[String], seconds: u32) -> Result<Vec<Outcome>> {
    setup::nightly(ctx)?;
    setup::cargo_fuzz(ctx, false)?;
    let listed = output(cargo_fuzz(ctx).arg("list"))?;
    let all: Vec<String> = listed.split_whitespace().map(str::to_string).collect();
    let targets = if wanted.is_empty() {
        all
    } else {
        if let Some(bad) = wanted.iter().find(|t| !all.contains(t)) {
            bail!("no fuzz target {bad:?} (targets: {})", all.join(", "));
        }
        wanted.to_vec()
    };
    say!(
        "fuzz",
        "building {} targets (cargo +nightly fuzz build; the first build takes a few minutes)…",
        targets.len()
    );
    let start = Instant::now();
    // `cargo fuzz build` takes one target or none (all).
    if wanted.is_empty() {
        run(cargo_fuzz(ctx).arg("build"))?;
    } else {
        for target in &targets {
            run(cargo_fuzz(ctx).args(["build", target]))?;
        }
    }
    say!("fuzz", "built in {:.0}s", start.elapsed().as_secs_f64());

    let mut outcomes = Vec::new();
    for target in &targets {
        let outcome = one_target(ctx, target, seconds)?;
        say!("fuzz", "{}", outcome.line());
        outcomes.push(outcome);
    }
    println!("fuzz summary ({seconds} s per target):");
    for o in &outcomes {
        println!("  {}", o.line());
    }
    Ok(outcomes)
}

fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    match fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                let path = e?.path();
                if path.is_file() {
                    files.push(path);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    }
    files.sort();
    Ok(files)
}

fn one_target(ctx: &Ctx, target: &str, seconds: u32) -> Result<Outcome> {
    let dir = fuzz_dir(ctx);
    let log_dir = dir.join("target/xtask-fuzz");
    fs::create_dir_all(&log_dir)?;
    let mut outcome = Outcome {
        target: target.to_string(),
        regressions: 0,
        runs: None,
        corpus: 0,
        failure: None,
    };

    // 1. Replay the committed regression inputs; libFuzzer runs files given
    //    as paths once each and fails on the first crash.
    let corpus = dir.join("corpus").join(target);
    outcome.corpus = files_in(&corpus)?.len();
    let regressions = files_in(&dir.join("regressions").join(target))?;
    outcome.regressions = regressions.len();
    if !regressions.is_empty() {
        say!(
            "fuzz",
            "{target}: replaying {} regression inputs",
            regressions.len()
        );
        let mut c = cargo_fuzz(ctx);
        c.args(["run", target]).args(&regressions).arg("--");
        c.arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
            .arg(format!("-timeout={INPUT_TIMEOUT_S}"));
        let log = log_dir.join(format!("{target}-regressions.log"));
        let (ok, lines) = logged(&mut c, &log, target, None)?;
        if !ok {
            let input = lines
                .iter()
                .rev()
                .find_map(|l| l.strip_prefix("Running: "))
                .map(|p| ctx.rel(Path::new(p)).to_string())
                .unwrap_or_else(|| "(see the log)".into());
            show_tail(&lines);
            outcome.failure = Some(format!(
                "FAILED: regression input {input} (log {})",
                ctx.rel(&log)
            ));
            return Ok(outcome);
        }
    }

    // 2. Fuzz from the working corpus, seeded with the regression inputs.
    fs::create_dir_all(&corpus)?;
    for file in &regressions {
        if let Some(name) = file.file_name() {
            fs::copy(file, corpus.join(name))?;
        }
    }
    let artifacts = dir.join("artifacts").join(target);
    fs::create_dir_all(&artifacts)?;
    let mut c = cargo_fuzz(ctx);
    c.args(["run", target]).arg(&corpus).arg("--");
    let dict = dir.join(format!("{target}.dict"));
    if dict.is_file() {
        c.arg(format!("-dict={}", dict.display()));
    }
    c.arg(format!("-max_total_time={seconds}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_S}"))
        .arg("-print_final_stats=1");
    say!("fuzz", "{target}: fuzzing for {seconds}s");
    let log = log_dir.join(format!("{target}.log"));
    let (ok, lines) = logged(&mut c, &log, target, Some(seconds))?;
    outcome.runs = lines.iter().rev().find_map(|l| final_runs(l));
    outcome.corpus = files_in(&corpus)?.len();
    if !ok {
        let artifact = lines
            .iter()
            .rev()
            .find_map(|l| artifact_path(l))
            .map(|p| ctx.rel(&dir.join(p)).to_string())
            .unwrap_or_else(|| "(no artifact written; see the log)".into());
        show_tail(&lines);
        outcome.failure = Some(format!("CRASHED: {artifact} (log {})", ctx.rel(&log)));
    }
    Ok(outcome)
}

/// Runs `c`, writing its output to `log` and keeping the lines; prints a
/// progress line about every 10 s. Returns whether it exited with success.
fn logged(
    c: &mut Command,
    log: &Path,
    target: &str,
    seconds: Option<u32>,
) -> Result<(bool, Vec<String>)> {
    let what = describe(c);
    let mut file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    writeln!(file, "$ {what}")?;
    let mut child = c
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{what}`"))?;
    let err = child.stderr.take().expect("piped stderr");
    let start = Instant::now();
    let mut next = start + Duration::from_secs(10);
    let mut lines = Vec::new();
    for line in BufReader::new(err).lines() {
        let line = line?;
        writeln!(file, "{line}")?;
        if let Some(total) = seconds
            && Instant::now() >= next
            && line.starts_with('#')
        {
            next += Duration::from_secs(10);
            say!(
                "fuzz",
                "{target}: {:.0}/{total}s {}",
                start.elapsed().as_secs_f64(),
                line.split_whitespace().collect::<Vec<_>>().join(" ")
            );
        }
        lines.push(line);
    }
    let status = child.wait()?;
    Ok((status.success(), lines))
}

fn show_tail(lines: &[String]) {
    for l in &lines[lines.len().saturating_sub(30)..] {
        eprintln!("    {l}");
    }
}

/// Executions from libFuzzer's last lines: `Done 123 runs in 20 second(s)`
/// or `#123\tDONE   cov: …`.
fn final_runs(line: &str) -> Option<u64> {
    if let Some(rest) = line.strip_prefix("Done ") {
        return rest.split_whitespace().next()?.parse().ok();
    }
    let rest = line.strip_prefix('#')?;
    let mut words = rest.split_whitespace();
    let n = words.next()?.parse().ok()?;
    (words.next()? == "DONE").then_some(n)
}

/// The input libFuzzer saved: `… Test unit written to ./artifacts/x/crash-…`.
fn artifact_path(line: &str) -> Option<PathBuf> {
    let (_, path) = line.split_once("Test unit written to ")?;
    Some(PathBuf::from(path.trim().trim_start_matches("./")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libfuzzer_lines() {
        assert_eq!(
            final_runs("Done 1234567 runs in 21 second(s)"),
            Some(1234567)
        );
        assert_eq!(
            final_runs("#991\tDONE   cov: 512 ft: 1200 corp: 80/2Kb exec/s: 47"),
            Some(991)
        );
        assert_eq!(final_runs("#512\tpulse  cov: 1 ft: 1"), None);
        assert_eq!(final_runs("stat::number_of_executed_units: 5"), None);
        assert_eq!(
            artifact_path(
                "artifact_prefix='/w/agent/fuzz/artifacts/http/'; Test unit written to /w/agent/fuzz/artifacts/http/crash-ab12"
            ),
            Some(PathBuf::from("/w/agent/fuzz/artifacts/http/crash-ab12"))
        );
        assert_eq!(
            artifact_path("Test unit written to ./artifacts/sql/oom-1"),
            Some(PathBuf::from("artifacts/sql/oom-1"))
        );
    }
}
