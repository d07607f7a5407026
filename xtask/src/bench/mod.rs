//! `cargo xtask bench`: the benchmarks whose results are committed under
//! `bench/`, and what their reports share (machine facts, number formatting).

pub mod capture;
pub mod micro;

use std::fs;

use serde_json::Value;

use crate::util::{Ctx, output};

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
