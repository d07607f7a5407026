//! `cargo xtask bench nesting`: how client spans nest under their requests
//! under concurrency (`workloads nesting`), written to bench/nesting.md.

use std::fmt::Write as _;
use std::fs;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{Machine, num, raw_json};
use crate::{say, util::Ctx};

pub fn nesting(ctx: &Ctx, seconds: u32) -> Result<()> {
    let cells = super::workloads(
        ctx,
        &["nesting".into(), "--seconds".into(), seconds.to_string()],
        None,
        parse_cell,
    )?;
    let facts = Machine::gather(ctx);
    let md = render(&cells, &facts, seconds);
    let dir = ctx.root.join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let file = dir.join("nesting.md");
    fs::write(&file, md).with_context(|| format!("cannot write {}", file.display()))?;
    let wrong: f64 = cells.iter().map(|c| num(c, "wrong")).sum();
    let misses: Vec<String> = cells
        .iter()
        .filter(|c| c["kind"] != "cost" && num(c, "connections") >= 16.0 && share(c) < 0.99)
        .map(label)
        .collect();
    say!(
        "bench",
        "wrote {}: {} wrong parents; cells at 16+ connections below 99 % right: {}",
        ctx.rel(&file),
        wrong,
        if misses.is_empty() {
            "none".to_owned()
        } else {
            misses.join(", ")
        }
    );
    Ok(())
}

fn parse_cell(line: &str) -> Result<Value> {
    let v: Value = serde_json::from_str(line)?;
    let Some(kind) = v.get("kind").and_then(Value::as_str) else {
        bail!("no kind");
    };
    let keys: &[&str] = match kind {
        "cost" => &["round", "requests", "rps", "app_cpu_us_per_request"],
        _ => &["connections", "client_spans", "right", "root", "wrong"],
    };
    for key in keys {
        if v.get(key).and_then(Value::as_f64).is_none() {
            bail!("no number {key:?}");
        }
    }
    Ok(v)
}

fn share(c: &Value) -> f64 {
    let n = num(c, "client_spans");
    if n > 0.0 { num(c, "right") / n } else { 0.0 }
}

fn label(c: &Value) -> String {
    match c["kind"].as_str() {
        Some("nginx") => format!(
            "nginx keepalive {} c{}",
            num(c, "keepalive"),
            num(c, "connections")
        ),
        _ => format!(
            "{} {} /{} c{}",
            c["interpreter"].as_str().unwrap_or("?"),
            c["loop"].as_str().unwrap_or("?"),
            c["handler"].as_str().unwrap_or("?"),
            num(c, "connections")
        ),
    }
}

fn row(md: &mut String, first: &str, c: &Value) {
    let _ = writeln!(
        md,
        "| {first} | {} | {:.0} | {} | {} | {} | {} | **{:.2} %** |",
        num(c, "connections"),
        c["rps"].as_f64().unwrap_or(0.0),
        num(c, "client_spans"),
        num(c, "right"),
        num(c, "root"),
        num(c, "wrong"),
        100.0 * share(c)
    );
}

fn render(cells: &[Value], m: &Machine, seconds: u32) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Nesting under concurrency\n");
    let _ = writeln!(
        md,
        "Written by `cargo xtask bench nesting` on {} (commit {}), kernel {}, {} × {}.\n",
        m.date, m.commit, m.kernel, m.cpus, m.cpu_model
    );
    md.push_str(
        "`tests/apps/nesting_app.py` (FastAPI under uvicorn) serves `/async/ID` \
         (`async def`: redis.asyncio, psycopg `AsyncConnection`, httpx `AsyncClient`, \
         then an `asyncio.gather` of a Redis GET and an HTTP GET) and `/sync/ID` \
         (`def`, run in FastAPI's thread pool: redis-py, psycopg, `httpx.Client`). \
         Every call carries its request's id (Redis key, SQL column alias, URL path), \
         so the right parent of each client span is known without the agent. wrk sends \
         a fresh id per request for ",
    );
    let _ = writeln!(
        md,
        "{seconds} s per cell; one agent with default settings traces everything.\n"
    );
    md.push_str(
        "*right*: the client span's parent is its own request's server span; *root*: \
         no parent (ownership unknown); *wrong*: any other parent. Goal: ≥ 99 % right \
         and 0 wrong at 16 and 64 connections.\n\n",
    );
    let _ = writeln!(md, "## FastAPI app\n");
    let _ = writeln!(
        md,
        "| interpreter, loop, handler | connections | req/s | client spans | right | root | wrong | right share |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for c in cells.iter().filter(|c| c["kind"] == "app") {
        let first = format!(
            "{} {} `/{}`",
            c["interpreter"].as_str().unwrap_or("?"),
            c["loop"].as_str().unwrap_or("?"),
            c["handler"].as_str().unwrap_or("?")
        );
        row(&mut md, &first, c);
    }
    let _ = writeln!(md, "\n## nginx as a reverse proxy in front of the app\n");
    md.push_str(
        "nginx (one worker) proxies `/backend/ID` to the app (Debian's python3.11, \
         uvloop). keepalive 0: a new upstream connection per request (HTTP/1.0); \
         keepalive 32: kept-alive upstream connections. Scored: nginx's upstream CLIENT \
         spans against its downstream SERVER spans.\n\n",
    );
    let _ = writeln!(
        md,
        "| upstream | connections | req/s | client spans | right | root | wrong | right share |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for c in cells.iter().filter(|c| c["kind"] == "nginx") {
        row(&mut md, &format!("keepalive {}", num(c, "keepalive")), c);
    }
    let cost: Vec<&Value> = cells.iter().filter(|c| c["kind"] == "cost").collect();
    if !cost.is_empty() {
        let _ = writeln!(md, "\n## Cost of following the runtime\n");
        md.push_str(
            "The app (Debian's python3.11, asyncio, `/async`, wrk -c16) with the agent's \
             `--runtimes off` and `auto`, alternating over three rounds. App CPU per \
             request includes the uprobe traps; the probe's own BPF time and the extra \
             reads in the data exit hooks (`sys_exit_data`, `sys_exit_receive`) are from the kernel's run-time statistics.\n\n",
        );
        let _ = writeln!(
            md,
            "| round | runtimes | req/s | app CPU µs/req | agent CPU µs/req | unit probe runs/req | unit probe ns/req | data exits ns/req |"
        );
        let _ = writeln!(md, "|---:|---|---:|---:|---:|---:|---:|---:|");
        for c in &cost {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} |",
                num(c, "round"),
                c["runtimes"].as_str().unwrap_or("?"),
                num(c, "rps"),
                num(c, "app_cpu_us_per_request"),
                num(c, "agent_cpu_us_per_request"),
                num(c, "unit_probe_runs_per_request"),
                num(c, "unit_probe_ns_per_request"),
                num(c, "sys_exit_data_ns_per_request"),
            );
        }
        let mean = |mode: &str, key: &str| {
            let v: Vec<f64> = cost
                .iter()
                .filter(|c| c["runtimes"] == mode)
                .map(|c| num(c, key))
                .collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        };
        let _ = writeln!(
            md,
            "\nMeans: app CPU per request {:.1} µs off → {:.1} µs on ({:+.1} µs); throughput {:.0} → {:.0} req/s ({:+.1} %).",
            mean("off", "app_cpu_us_per_request"),
            mean("auto", "app_cpu_us_per_request"),
            mean("auto", "app_cpu_us_per_request") - mean("off", "app_cpu_us_per_request"),
            mean("off", "rps"),
            mean("auto", "rps"),
            100.0 * (mean("auto", "rps") / mean("off", "rps").max(1.0) - 1.0)
        );
    }
    let examples: Vec<String> = cells
        .iter()
        .filter(|c| num(c, "wrong") > 0.0)
        .flat_map(|c| {
            c["wrong_examples"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e.as_str().map(|e| format!("- {}: {e}", label(c))))
        })
        .collect();
    if !examples.is_empty() {
        let _ = writeln!(md, "\n## Wrong parents\n\n{}", examples.join("\n"));
    }
    raw_json(&mut md, "Raw results", cells);
    md
}
