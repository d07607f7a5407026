//! `cargo xtask bench capture`: runs `zerotrace bench-capture` once per
//! transport and writes `bench/capture.md`.

use std::fmt::Write as _;
use std::fs;
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{Machine, cell, grouped, num, opt};
use crate::say;
use crate::util::{ChildFailed, Ctx, describe, run};

pub const TRANSPORTS: &[&str] = &["ringbuf", "perf"];

/// Number keys a result line must carry; the others in the table
/// (`seconds`, `events_per_sec`, `bytes_delivered`, `agent_cpu_seconds`,
/// `loadgen_syscalls`) show "–" when absent or null.
const REQUIRED_NUMBERS: &[&str] = &["events_delivered", "events_lost"];

pub fn capture(ctx: &Ctx, seconds: u32) -> Result<()> {
    crate::setup::toolchain(ctx, false)?;
    run(ctx.cargo().args(["build", "--release", "-p", "agent"]))?;
    let bin = ctx.zerotrace_bin(true);
    if !bin.is_file() {
        bail!("{} was not built", bin.display());
    }

    let mut results = Vec::new();
    for transport in TRANSPORTS {
        say!("bench", "capture: transport {transport}, {seconds} s…");
        let mut c = ctx.as_root(&bin, "bench-capture")?;
        c.args(["bench-capture", "--transport", transport, "--seconds"])
            .arg(seconds.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let what = describe(&c);
        let out = c
            .output()
            .with_context(|| format!("cannot start `{what}`"))?;
        if !out.status.success() {
            return Err(ChildFailed {
                what,
                status: out.status,
            }
            .into());
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .with_context(|| format!("`{what}` printed nothing on stdout"))?;
        let result =
            parse_result(last).with_context(|| format!("`{what}`: bad result line {last:?}"))?;
        results.push(result);
    }

    let facts = Machine::gather(ctx);
    let md = render(&results, &facts, seconds);
    let dir = ctx.root.join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let file = dir.join("capture.md");
    fs::write(&file, &md).with_context(|| format!("cannot write {}", file.display()))?;
    println!("{}", summary_table(&results));
    say!("bench", "wrote {}", ctx.rel(&file));
    Ok(())
}

fn parse_result(line: &str) -> Result<Value> {
    let v: Value = serde_json::from_str(line)?;
    if !v.is_object() {
        bail!("not a JSON object");
    }
    if v.get("transport").and_then(Value::as_str).is_none() {
        bail!("no string \"transport\"");
    }
    for key in REQUIRED_NUMBERS {
        if v.get(key).and_then(Value::as_f64).is_none() {
            bail!("no number {key:?}");
        }
    }
    Ok(v)
}

fn summary_table(results: &[Value]) -> String {
    let mut t = String::from(
        "| transport | seconds | events delivered | events/s | events lost | loss | bytes delivered | agent CPU s | load-gen syscalls |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for r in results {
        let delivered = num(r, "events_delivered");
        let lost = num(r, "events_lost");
        let loss = if delivered + lost > 0.0 {
            format!("{:.2} %", 100.0 * lost / (delivered + lost))
        } else {
            "–".into()
        };
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.get("transport").and_then(Value::as_str).unwrap_or("?"),
            cell(opt(r, "seconds"), |s| format!("{s:.1}")),
            grouped(delivered),
            cell(opt(r, "events_per_sec"), grouped),
            grouped(lost),
            loss,
            cell(opt(r, "bytes_delivered"), grouped),
            cell(opt(r, "agent_cpu_seconds"), |s| format!("{s:.2}")),
            cell(opt(r, "loadgen_syscalls"), grouped),
        );
    }
    t
}

/// Programs as rows, transports as columns.
fn kernel_table(results: &[Value]) -> String {
    let mut programs: Vec<&str> = Vec::new();
    for r in results {
        let Some(kernel) = r.get("kernel_ns_per_run").and_then(Value::as_object) else {
            continue;
        };
        for name in kernel.keys() {
            if !programs.contains(&name.as_str()) {
                programs.push(name);
            }
        }
    }
    let mut t = String::from("| program |");
    for r in results {
        let _ = write!(
            t,
            " {} |",
            r.get("transport").and_then(Value::as_str).unwrap_or("?")
        );
    }
    t.push_str("\n|---|");
    t.push_str(&"--:|".repeat(results.len()));
    t.push('\n');
    for p in programs {
        let _ = write!(t, "| `{p}` |");
        for r in results {
            let cell = r
                .get("kernel_ns_per_run")
                .and_then(|k| k.get(p))
                .and_then(Value::as_f64)
                .map_or_else(|| "–".to_string(), |ns| format!("{ns:.1}"));
            let _ = write!(t, " {cell} |");
        }
        t.push('\n');
    }
    t
}

fn render(results: &[Value], m: &Machine, seconds: u32) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Capture benchmark\n");
    let _ = writeln!(
        md,
        "Generated by `cargo xtask bench capture --seconds {seconds}` on {} (commit {}).\n",
        m.date, m.commit
    );
    let _ = writeln!(
        md,
        "Machine: Linux {}, {} CPUs, {}.\n",
        m.kernel, m.cpus, m.cpu_model
    );
    let _ = writeln!(
        md,
        "Each row is one run of `zerotrace bench-capture --transport T --seconds {seconds}` \
         (release build, as root); the raw result lines are at the end.\n"
    );
    md.push_str(&summary_table(results));
    let _ = writeln!(md, "\n## Kernel time per program run (ns)\n");
    md.push_str(&kernel_table(results));
    super::raw_json(&mut md, "Raw results", results);
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Value> {
        [
            r#"{"transport":"ringbuf","seconds":5.0,"agent_cpu_seconds":1.234,"events_delivered":1000000,"events_per_sec":200000.4,"events_lost":0,"bytes_delivered":64000000,"kernel_ns_per_run":{"sys_enter_write":80.4,"sys_exit_write":300},"loadgen_syscalls":1000000}"#,
            r#"{"transport":"perf","seconds":5,"events_delivered":900000,"events_per_sec":180000,"events_lost":100000,"bytes_delivered":57600000,"kernel_ns_per_run":{"sys_exit_write":350,"sys_exit_read":90},"loadgen_syscalls":null}"#,
        ]
        .iter()
        .map(|l| parse_result(l).unwrap())
        .collect()
    }

    #[test]
    fn grouping() {
        assert_eq!(grouped(0.0), "0");
        assert_eq!(grouped(999.0), "999");
        assert_eq!(grouped(1000.0), "1,000");
        assert_eq!(grouped(1234567.8), "1,234,568");
        assert_eq!(grouped(-4321.0), "-4,321");
    }

    #[test]
    fn tables() {
        let r = sample();
        let s = summary_table(&r);
        let ringbuf =
            "| ringbuf | 5.0 | 1,000,000 | 200,000 | 0 | 0.00 % | 64,000,000 | 1.23 | 1,000,000 |";
        assert!(s.contains(ringbuf), "{s}");
        let perf = "| perf | 5.0 | 900,000 | 180,000 | 100,000 | 10.00 % | 57,600,000 | – | – |";
        assert!(s.contains(perf), "{s}");
        let k = kernel_table(&r);
        assert!(k.contains("| `sys_enter_write` | 80.4 | – |"), "{k}");
        assert!(k.contains("| `sys_exit_read` | – | 90.0 |"), "{k}");
        let m = Machine {
            kernel: "6.18.0".into(),
            cpus: 2,
            cpu_model: "Test CPU".into(),
            date: "2026-01-01 00:00 UTC".into(),
            commit: "abc1234".into(),
        };
        let md = render(&r, &m, 5);
        assert!(md.contains("Machine: Linux 6.18.0, 2 CPUs, Test CPU."));
        assert!(md.contains("```json\n{\"transport\":\"ringbuf\""));
    }

    #[test]
    fn kernel_programs_keep_first_seen_order() {
        let k = kernel_table(&sample());
        let rows: Vec<&str> = k.lines().skip(2).collect();
        assert_eq!(
            rows,
            [
                "| `sys_enter_write` | 80.4 | – |",
                "| `sys_exit_write` | 300.0 | 350.0 |",
                "| `sys_exit_read` | – | 90.0 |",
            ],
            "{k}"
        );
        assert!(k.starts_with("| program | ringbuf | perf |\n|---|--:|--:|\n"));
    }

    #[test]
    fn raw_results_keep_key_order() {
        let line = r#"{"transport":"perf","seconds":5,"events_delivered":9,"events_lost":1,"kernel_ns_per_run":{"z":1,"a":2.5},"note":null,"tags":["a","\u00e9\n"]}"#;
        let r = vec![parse_result(line).unwrap()];
        let m = Machine {
            kernel: "k".into(),
            cpus: 1,
            cpu_model: "c".into(),
            date: "d".into(),
            commit: "x".into(),
        };
        let md = render(&r, &m, 5);
        let expected = r#"{"transport":"perf","seconds":5,"events_delivered":9,"events_lost":1,"kernel_ns_per_run":{"z":1,"a":2.5},"note":null,"tags":["a","é\n"]}"#;
        assert!(md.contains(&format!("```json\n{expected}\n```\n")), "{md}");
        // Optional fields that are absent or null show "–".
        let s = summary_table(&r);
        assert!(
            s.contains("| perf | 5.0 | 9 | – | 1 | 10.00 % | – | – | – |"),
            "{s}"
        );
    }

    #[test]
    fn rejects_incomplete_results() {
        for bad in [
            r#"{"transport":"perf"}"#,
            r#"{"transport":"perf","events_delivered":1}"#,
            r#"{"transport":"perf","events_delivered":1,"events_lost":null}"#,
            r#"{"transport":"perf","events_delivered":"1","events_lost":0}"#,
            r#"{"events_delivered":1,"events_lost":0}"#,
            r#"{"transport":"perf","events_delivered":1,"events_lost":0} x"#,
            "[1,2]",
            "",
            "not json",
        ] {
            assert!(parse_result(bad).is_err(), "{bad:?}");
        }
        assert!(
            parse_result(r#"{"transport":"perf","events_delivered":1,"events_lost":0}"#).is_ok()
        );
    }
}
