//! `cargo xtask bench micro`: runs the criterion benchmarks of the userspace
//! hot path (`agent/benches/hotpath.rs`) and writes `bench/micro.md` and
//! `bench/results/micro.json` from criterion's estimates.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::{Machine, grouped};
use crate::say;
use crate::util::{Ctx, output, run};

/// The criterion bench target in the `agent` package.
const BENCH: &str = "hotpath";

/// What one element is in each group (everything else counts kernel records).
const UNITS: &[(&str, &str)] = &[
    ("sql_sanitize", "statement"),
    ("span_build", "request"),
    ("export", "span"),
];

/// Runs the benchmarks, writes the report and the results file; returns the
/// results: a list of `{group, bench, ns_per_iter, elements_per_iter,
/// elements_per_sec}` (the file adds the machine's facts).
pub fn micro(ctx: &Ctx) -> Result<Value> {
    crate::setup::toolchain(ctx, false)?;
    let criterion = ctx.target_dir().join("criterion");
    // Earlier runs' results stay next to this one's: only files written
    // from now on count (a little slack for coarse file system clocks).
    let started = SystemTime::now() - std::time::Duration::from_secs(2);
    // The bench appends its allocation counts here (see `bench_counted`).
    let bench_dir = ctx.target_dir().join("bench");
    fs::create_dir_all(&bench_dir)
        .with_context(|| format!("cannot create {}", bench_dir.display()))?;
    let allocations_file = bench_dir.join("micro-allocations.jsonl");
    let _ = fs::remove_file(&allocations_file);
    say!("bench", "micro: cargo bench -p agent --bench {BENCH}…");
    run(ctx
        .cargo()
        .args(["bench", "-p", "agent", "--bench", BENCH])
        .env("HOTPATH_ALLOCATIONS", &allocations_file)
        // With the real eBPF object, like every other release build: bench
        // artifacts share target/release with the agent binary, and a
        // different AYA_BUILD_SKIP would rebuild (and empty) it.
        // Where criterion writes, whatever the bench's working directory.
        .env("CRITERION_HOME", &criterion))?;

    let mut results = Vec::new();
    for dir in new_dirs(&criterion)? {
        if !fs::metadata(dir.join("estimates.json"))
            .and_then(|m| m.modified())
            .is_ok_and(|t| t >= started)
        {
            continue;
        }
        let read = |name: &str| {
            let file = dir.join(name);
            fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))
        };
        let result = parse_bench(&read("benchmark.json")?, &read("estimates.json")?)
            .with_context(|| format!("criterion results in {}", dir.display()))?;
        results.push(result);
    }
    if results.is_empty() {
        bail!("criterion wrote no results under {}", criterion.display());
    }
    let counts = fs::read_to_string(&allocations_file)
        .with_context(|| format!("cannot read {}", allocations_file.display()))?;
    add_allocations(&mut results, &counts)?;
    results.sort_by_key(order_key);
    add_instructions(ctx, &bench_dir, &mut results)?;

    let facts = Machine::gather(ctx);
    let value = json!({
        "machine": {
            "kernel": facts.kernel,
            "cpus": facts.cpus,
            "cpu_model": facts.cpu_model,
            "date": facts.date,
            "commit": facts.commit,
        },
        "benchmarks": results,
    });
    let dir = ctx.root.join("bench");
    fs::create_dir_all(dir.join("results"))
        .with_context(|| format!("cannot create {}/results", dir.display()))?;
    let md_file = dir.join("micro.md");
    fs::write(&md_file, render(&results, &facts))
        .with_context(|| format!("cannot write {}", md_file.display()))?;
    let json_file = dir.join("results").join("micro.json");
    fs::write(&json_file, format!("{value:#}\n"))
        .with_context(|| format!("cannot write {}", json_file.display()))?;
    println!("{}", table(&results));
    say!(
        "bench",
        "wrote {} and {}",
        ctx.rel(&md_file),
        ctx.rel(&json_file)
    );
    Ok(Value::Array(results))
}

/// Every `…/new` directory under criterion's output (one per benchmark).
fn new_dirs(criterion: &Path) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                continue;
            }
            let path = entry.path();
            if entry.file_name() == "new" {
                out.push(path);
            } else if entry.file_name() != "base" && entry.file_name() != "report" {
                walk(&path, out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(criterion, &mut out).with_context(|| format!("cannot list {}", criterion.display()))?;
    Ok(out)
}

/// One benchmark from criterion's `benchmark.json` (its id and throughput)
/// and `estimates.json` (nanoseconds per iteration).
fn parse_bench(benchmark: &str, estimates: &str) -> Result<Value> {
    let b: Value = serde_json::from_str(benchmark).context("benchmark.json")?;
    let e: Value = serde_json::from_str(estimates).context("estimates.json")?;
    let Some(group) = b.get("group_id").and_then(Value::as_str) else {
        bail!("benchmark.json: no string \"group_id\"");
    };
    let bench = b
        .get("function_id")
        .and_then(Value::as_str)
        .or_else(|| b.get("value_str").and_then(Value::as_str))
        .unwrap_or("");
    let Some(elements) = b
        .get("throughput")
        .and_then(|t| t.get("Elements"))
        .and_then(Value::as_u64)
        .filter(|n| *n > 0)
    else {
        bail!("{group}/{bench}: no Elements throughput");
    };
    let median = e.get("median");
    let Some(ns) = median
        .and_then(|m| m.get("point_estimate"))
        .and_then(Value::as_f64)
        .filter(|ns| *ns > 0.0)
    else {
        bail!("{group}/{bench}: no positive median estimate");
    };
    let bound = |key: &str| {
        median
            .and_then(|m| m.get("confidence_interval"))
            .and_then(|ci| ci.get(key))
            .and_then(Value::as_f64)
    };
    Ok(json!({
        "group": group,
        "bench": bench,
        "ns_per_iter": ns,
        "elements_per_iter": elements,
        "elements_per_sec": elements as f64 * 1e9 / ns,
        "ns_per_iter_ci95": [bound("lower_bound"), bound("upper_bound")],
    }))
}

/// Adds each `{group, bench, allocations_per_iter}` line of `counts` to the
/// result of the same benchmark.
fn add_allocations(results: &mut [Value], counts: &str) -> Result<()> {
    for line in counts.lines().filter(|l| !l.trim().is_empty()) {
        let count: Value =
            serde_json::from_str(line).with_context(|| format!("allocation count {line:?}"))?;
        let Some(n) = count.get("allocations_per_iter").and_then(Value::as_f64) else {
            bail!("allocation count {line:?}: no allocations_per_iter");
        };
        let same = |r: &&mut Value| {
            text(r, "group") == text(&count, "group") && text(r, "bench") == text(&count, "bench")
        };
        match results.iter_mut().find(same) {
            Some(r) => r["allocations_per_iter"] = json!(n),
            None => bail!("allocation count {line:?}: no such benchmark"),
        }
    }
    Ok(())
}

/// Benchmarks whose routine cannot be counted alone: criterion prepares
/// each call's input outside the timing, a count would include it.
const NOT_COUNTED: &[(&str, &str)] = &[("export", "otlp_convert_then_encode")];

/// Adds `instructions_per_iter` to each result: the bench binary calls one
/// routine a few and then many times under valgrind's cachegrind
/// (`HOTPATH_COUNT`, see agent/benches/hotpath.rs), and the difference in
/// instructions, divided by the difference in calls, is one call's. Set-up
/// and start-up are the same in both runs and drop out.
fn add_instructions(ctx: &Ctx, dir: &Path, results: &mut [Value]) -> Result<()> {
    let Some(valgrind) = ctx.which("valgrind") else {
        bail!("valgrind not found: `cargo xtask setup` installs it");
    };
    let exe = bench_executable(ctx)?;
    let log = dir.join("micro-count.log");
    say!("bench", "micro: counting instructions under valgrind…");
    for r in results.iter_mut() {
        let (group, bench) = (text(r, "group").to_owned(), text(r, "bench").to_owned());
        if NOT_COUNTED.contains(&(group.as_str(), bench.as_str())) {
            continue;
        }
        // A 512-span batch per call in `export`: fewer calls.
        let (few, many) = if group == "export" {
            (4, 24)
        } else {
            (1000, 6000)
        };
        let count = |calls: u64| -> Result<u64> {
            let _ = fs::remove_file(&log);
            output(
                ctx.cmd(&valgrind)
                    .args(["--tool=cachegrind", "--cache-sim=no"])
                    .arg("--cachegrind-out-file=/dev/null")
                    .arg(format!("--log-file={}", log.display()))
                    .arg(&exe)
                    .arg("--bench")
                    .env("HOTPATH_COUNT", format!("{group}/{bench}:{calls}")),
            )?;
            let text = fs::read_to_string(&log)
                .with_context(|| format!("cannot read {}", log.display()))?;
            instructions(&text)
                .with_context(|| format!("{group}/{bench}: no instruction count in {text:?}"))
        };
        let (a, b) = (count(few)?, count(many)?);
        r["instructions_per_iter"] = json!(b.saturating_sub(a) as f64 / (many - few) as f64);
    }
    Ok(())
}

/// The bench binary cargo built (its path from cargo's JSON messages).
fn bench_executable(ctx: &Ctx) -> Result<PathBuf> {
    let messages = output(ctx.cargo().args([
        "bench",
        "-p",
        "agent",
        "--bench",
        BENCH,
        "--no-run",
        "--message-format=json",
    ]))?;
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["target"]["name"] == BENCH)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo named no executable for the {BENCH} bench"))
}

/// The instructions valgrind counted in the process it started (the first
/// `Command:` line names it; a forked child reports its own count too).
fn instructions(log: &str) -> Option<u64> {
    let pid = |line: &str| {
        line.strip_prefix("==")?
            .split_once("==")
            .map(|(p, _)| p.to_owned())
    };
    let main = log.lines().find(|l| l.contains("Command:")).and_then(pid)?;
    log.lines()
        .filter(|l| pid(l).as_deref() == Some(main.as_str()))
        .find_map(|l| {
            l.split_once("I   refs:")
                .or_else(|| l.split_once("I refs:"))
        })
        .and_then(|(_, n)| n.trim().replace(',', "").parse().ok())
}

fn text<'a>(r: &'a Value, key: &str) -> &'a str {
    r.get(key).and_then(Value::as_str).unwrap_or("?")
}

/// Groups in the order the bench file runs them, then by name.
fn order_key(r: &Value) -> (usize, String, String) {
    const GROUPS: &[&str] = &[
        "decode",
        "http",
        "postgres",
        "mysql",
        "redis",
        "sql_sanitize",
        "span_build",
        "export",
    ];
    let group = text(r, "group");
    (
        GROUPS
            .iter()
            .position(|g| *g == group)
            .unwrap_or(GROUPS.len()),
        group.to_string(),
        text(r, "bench").to_string(),
    )
}

fn unit(group: &str) -> Option<&'static str> {
    UNITS.iter().find(|(g, _)| *g == group).map(|(_, u)| *u)
}

fn table(results: &[Value]) -> String {
    let mut t = String::from(
        "| benchmark | ns per event | events/s (one core) | instructions per event | heap allocations per event |\n\
         |---|--:|--:|--:|--:|\n",
    );
    for r in results {
        let group = text(r, "group");
        let per = r.get("elements_per_iter").and_then(Value::as_f64);
        let ns = r.get("ns_per_iter").and_then(Value::as_f64);
        let (ns_per, per_sec) = match (per, ns) {
            (Some(per), Some(ns)) if per > 0.0 && ns > 0.0 => {
                (format!("{:.1}", ns / per), grouped(per * 1e9 / ns))
            }
            _ => ("–".into(), "–".into()),
        };
        let name = match unit(group) {
            Some(u) => format!("`{group}/{}` (per {u})", text(r, "bench")),
            None => format!("`{group}/{}`", text(r, "bench")),
        };
        let per_event = |key: &str, digits: usize| match (r.get(key).and_then(Value::as_f64), per) {
            (Some(n), Some(per)) if per > 0.0 => format!("{:.*}", digits, n / per),
            _ => "–".into(),
        };
        let instructions = per_event("instructions_per_iter", 0);
        let allocations = per_event("allocations_per_iter", 1);
        let _ = writeln!(
            t,
            "| {name} | {ns_per} | {per_sec} | {instructions} | {allocations} |"
        );
    }
    t
}

fn render(results: &[Value], m: &Machine) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Userspace hot path micro-benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `cargo xtask bench micro` on {} (commit {}): criterion runs \
         `cargo bench -p agent --bench {BENCH}` (`agent/benches/{BENCH}.rs`, release profile).\n",
        m.date, m.commit
    );
    let _ = writeln!(
        md,
        "Machine: Linux {}, {} CPUs, {}.\n",
        m.kernel, m.cpus, m.cpu_model
    );
    md.push_str(&table(results));
    md.push_str(
        "\nCriterion runs every benchmark on one thread, so events/s is what one core \
         does; the columns are criterion's median time per iteration divided by the \
         elements the iteration handles. An event is one kernel record: in `decode`, \
         records decoded from raw ring-buffer bytes; in `http`, `postgres`, `mysql` and \
         `redis`, the data events (syscalls) of one request and its response fed to the \
         connection's protocol session, past detection and handshake. Rows marked \
         \"per statement\" count SQL statements sanitized, rows marked \"per request\" \
         count whole requests taken from raw records through decoding, the connection \
         table, the protocol session and the tracer to a finished span in the export \
         queue (`http_keepalive`: two data records; `http_connection`: open, two data \
         records and close; `redis_set_get`: two commands, four data records). Rows \
         marked \"per span\" count spans of a 512-span batch made into one OTLP \
         request's protobuf bytes, the exporter's work before the network: \
         `otlp_encode` writes them straight from the span records (what the \
         exporter does; their attributes were encoded when the tracer made them, \
         so that part is in `span_build`), `otlp_convert_then_encode` converts \
         them to the SDK's and then opentelemetry-proto's messages first and has \
         prost encode those (what it did before; the two give the same bytes).\n\n\
         Instructions and heap allocations per event are counted, not timed, \
         so unlike the times they do not move with the machine's load: the \
         instructions under valgrind's cachegrind (each routine called a few and \
         then many times, the difference divided by the difference in calls), \
         the allocations by a counting global allocator in the bench over 1,000 \
         calls. Compare builds by them first.\n\n\
         The raw results add criterion's 95 % confidence interval of each median \
         (`ns_per_iter_ci95`). It says how steady one run was, not how much runs \
         differ: on a shared or virtual machine, compare runs before trusting a \
         difference of a few tens of percent.\n",
    );
    super::raw_json(&mut md, "Raw results", results);
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    const BENCHMARK: &str = r#"{"group_id":"decode","function_id":"data","value_str":null,"throughput":{"Elements":10},"full_id":"decode/data","directory_name":"decode/data","title":"decode/data"}"#;
    const ESTIMATES: &str = r#"{"mean":{"confidence_interval":{"confidence_level":0.95,"lower_bound":210.0,"upper_bound":230.0},"point_estimate":220.5,"standard_error":4.1},"median":{"confidence_interval":{"confidence_level":0.95,"lower_bound":195.0,"upper_bound":205.0},"point_estimate":200.0,"standard_error":2.0},"median_abs_dev":{"confidence_interval":{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":3.0},"point_estimate":2.0,"standard_error":0.5},"slope":null,"std_dev":{"confidence_interval":{"confidence_level":0.95,"lower_bound":5.0,"upper_bound":9.0},"point_estimate":7.0,"standard_error":1.0}}"#;

    fn machine() -> Machine {
        Machine {
            kernel: "6.18.0".into(),
            cpus: 2,
            cpu_model: "Test CPU".into(),
            date: "2026-01-01 00:00 UTC".into(),
            commit: "abc1234".into(),
        }
    }

    fn estimates(median_ns: f64) -> String {
        ESTIMATES.replace(
            "200.0,\"standard_error\":2.0",
            &format!("{median_ns},\"standard_error\":2.0"),
        )
    }

    #[test]
    fn reads_criterion_json() {
        let r = parse_bench(BENCHMARK, ESTIMATES).unwrap();
        assert_eq!(text(&r, "group"), "decode");
        assert_eq!(text(&r, "bench"), "data");
        assert_eq!(r["ns_per_iter"], 200.0);
        assert_eq!(r["elements_per_iter"], 10);
        assert_eq!(r["elements_per_sec"], 50_000_000.0);
        assert_eq!(r["ns_per_iter_ci95"], json!([195.0, 205.0]));
        let no_ci = ESTIMATES.replace(
            r#""median":{"confidence_interval":{"confidence_level":0.95,"lower_bound":195.0,"upper_bound":205.0},"#,
            r#""median":{"#,
        );
        let r = parse_bench(BENCHMARK, &no_ci).unwrap();
        assert_eq!(r["ns_per_iter_ci95"], json!([null, null]));
    }

    #[test]
    fn rejects_incomplete_criterion_json() {
        let no_throughput =
            BENCHMARK.replace(r#""throughput":{"Elements":10}"#, r#""throughput":null"#);
        let bytes = BENCHMARK.replace("Elements", "Bytes");
        let zero = BENCHMARK.replace(r#"{"Elements":10}"#, r#"{"Elements":0}"#);
        let no_group = BENCHMARK.replace("group_id", "group");
        for bad in [&no_throughput, &bytes, &zero, &no_group] {
            assert!(parse_bench(bad, ESTIMATES).is_err(), "{bad}");
        }
        for bad in ["{}", r#"{"median":{"point_estimate":0.0}}"#, "not json"] {
            assert!(parse_bench(BENCHMARK, bad).is_err(), "{bad}");
        }
        assert!(parse_bench("", ESTIMATES).is_err());
    }

    #[test]
    fn table_per_event_and_per_request() {
        let span = BENCHMARK
            .replace(r#""decode""#, r#""span_build""#)
            .replace(r#""data""#, r#""http_keepalive""#)
            .replace(r#"{"Elements":10}"#, r#"{"Elements":1}"#);
        let mut results = vec![
            parse_bench(&span, &estimates(2500.0)).unwrap(),
            parse_bench(BENCHMARK, ESTIMATES).unwrap(),
        ];
        results.sort_by_key(order_key);
        add_allocations(
            &mut results,
            "{\"group\":\"span_build\",\"bench\":\"http_keepalive\",\"allocations_per_iter\":12.0}\n",
        )
        .unwrap();
        for bad in [
            "{\"group\":\"span_build\",\"bench\":\"nope\",\"allocations_per_iter\":1}",
            "{\"group\":\"span_build\",\"bench\":\"http_keepalive\"}",
            "not json",
        ] {
            assert!(add_allocations(&mut results, bad).is_err(), "{bad}");
        }
        results[0]["instructions_per_iter"] = json!(1234.0);
        let t = table(&results);
        let rows: Vec<&str> = t.lines().collect();
        assert_eq!(
            rows,
            [
                "| benchmark | ns per event | events/s (one core) | instructions per event | heap allocations per event |",
                "|---|--:|--:|--:|--:|",
                "| `decode/data` | 20.0 | 50,000,000 | 123 | – |",
                "| `span_build/http_keepalive` (per request) | 2500.0 | 400,000 | – | 12.0 |",
            ],
            "{t}"
        );
        let md = render(&results, &machine());
        assert!(md.starts_with("# Userspace hot path micro-benchmarks\n"));
        assert!(md.contains("on 2026-01-01 00:00 UTC (commit abc1234)"));
        assert!(md.contains("Machine: Linux 6.18.0, 2 CPUs, Test CPU."));
        assert!(md.contains(&t));
        assert!(md.contains(
            "```json\n{\"group\":\"decode\",\"bench\":\"data\",\"ns_per_iter\":200.0,\"elements_per_iter\":10,\"elements_per_sec\":50000000.0,\"ns_per_iter_ci95\":[195.0,205.0],\"instructions_per_iter\":1234.0}\n"
        ), "{md}");
    }

    #[test]
    fn reads_the_started_process_instruction_count() {
        let log = "==11909== Cachegrind, a cache and branch-prediction profiler\n\
                   ==11909== Command: /t/hotpath-1 --bench\n\
                   --11909-- warning: L3 cache found, using its data for the LL simulation.\n\
                   ==11912== I   refs:      576,110\n\
                   ==11909== I   refs:      18,438,175\n";
        assert_eq!(instructions(log), Some(18_438_175));
        assert_eq!(
            instructions(&log.replace("==11909== I", "==11913== I")),
            None
        );
        assert_eq!(instructions("==1== Command: x\n"), None);
        assert_eq!(instructions(""), None);
    }

    #[test]
    fn finds_new_dirs_only() {
        let root = std::env::temp_dir().join(format!("xtask-micro-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for d in ["g/a/new", "g/a/base", "g/a/report", "h/b/new", "h/b/change"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        let mut found: Vec<String> = new_dirs(&root)
            .unwrap()
            .iter()
            .map(|p| p.strip_prefix(&root).unwrap().display().to_string())
            .collect();
        found.sort();
        assert_eq!(found, ["g/a/new", "h/b/new"]);
        fs::remove_dir_all(&root).unwrap();
        assert!(new_dirs(&root).is_err());
    }
}
