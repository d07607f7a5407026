//! `cargo xtask bench`: the benchmarks whose results are committed under
//! `bench/`, and what their reports share (machine facts, number formatting).

pub mod capture;
pub mod flame;
pub mod micro;
pub mod nesting;
pub mod overhead;
pub mod soak;

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader};
use std::process::Stdio;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::say;
use crate::util::{ChildFailed, Ctx, describe, output, run};

/// Builds the release agent and the tests crate's `workloads` binary (with
/// `unix_pingpong`, which it runs from beside itself), runs `workloads
/// ARGS` as root against that agent (or against `agent`, another build),
/// and reads one JSON object per stdout line with `parse` (its progress
/// goes to our stderr).
pub fn workloads(
    ctx: &Ctx,
    args: &[String],
    agent: Option<&std::path::Path>,
    parse: fn(&str) -> Result<Value>,
) -> Result<Vec<Value>> {
    crate::setup::toolchain(ctx, false)?;
    crate::setup::packages(ctx)?;
    crate::setup::otel_venv(ctx)?;
    run(ctx.cargo().args(["build", "--release", "-p", "agent"]))?;
    run(ctx.cargo().args([
        "build",
        "--release",
        "-p",
        "zerotrace-tests",
        "--bin",
        "workloads",
        "--bin",
        "unix_pingpong",
    ]))?;
    let bin = ctx.target_dir().join("release/workloads");
    let mut c = ctx.as_root(&bin, "the workload benchmarks")?;
    c.args(args)
        .env(
            "ZEROTRACE_BIN",
            agent.map_or_else(|| ctx.zerotrace_bin(true), std::path::Path::to_path_buf),
        )
        .env("ZEROTRACE_VENV", crate::setup::otel_venv_dir()?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let what = describe(&c);
    say!("bench", "{what}");
    let mut child = c
        .spawn()
        .with_context(|| format!("cannot start `{what}`"))?;
    let mut out = Vec::new();
    for line in BufReader::new(child.stdout.take().context("no stdout")?).lines() {
        let line = line?;
        out.push(parse(&line).with_context(|| format!("bad result line {line:?}"))?);
    }
    let status = child.wait()?;
    if !status.success() {
        return Err(ChildFailed { what, status }.into());
    }
    Ok(out)
}

pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub date: String,
    pub commit: String,
}

impl Machine {
    pub fn gather(ctx: &Ctx) -> Self {
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        let cpu_model = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, m)| m.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let date = output(ctx.cmd("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let commit = output(ctx.cmd("git").args(["rev-parse", "--short", "HEAD"]))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "uncommitted".into());
        Self {
            kernel,
            cpus,
            cpu_model,
            date,
            commit,
        }
    }
}

pub fn num(v: &Value, key: &str) -> f64 {
    opt(v, key).unwrap_or(0.0)
}

pub fn opt(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

pub fn cell(v: Option<f64>, fmt: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "–".to_string(), fmt)
}

/// 1234567.8 → "1,234,568".
pub fn grouped(n: f64) -> String {
    let digits = format!("{:.0}", n.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0.0 && digits != "0" {
        out.insert(0, '-');
    }
    out
}

/// Appends "## HEADING" and one JSON line per value in a json block: the
/// raw results at the end of every report.
pub fn raw_json(md: &mut String, heading: &str, values: &[Value]) {
    let _ = writeln!(md, "\n## {heading}\n\n```json");
    for v in values {
        let _ = writeln!(md, "{v}");
    }
    md.push_str("```\n");
}

/// The opening of a report chart: an SVG of `w`×`h` on white with a bold
/// `title` at (`left`, 22). Hand-written SVG: two simple charts do not
/// justify a plotting crate and its font stack.
pub fn svg_open(w: f64, h: f64, left: f64, title: &str) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="22" font-size="14" font-weight="bold">{}</text>"#,
        xml(title)
    );
    svg
}

/// `s` escaped for SVG text and attributes.
pub fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
