//! Real load generators — wrk, redis-benchmark, pgbench — and readers of
//! what they print, for the overhead benchmark and the soak run. The
//! readers are pure and tested on captured output.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context, bail};

use crate::db::{Postgres, Redis};

/// What one load run measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadResult {
    /// Completed requests (transactions for pgbench, commands for Redis).
    pub requests: u64,
    /// Length of the run as the tool measured it.
    pub seconds: f64,
    /// Median latency, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
    /// Failed requests (socket errors, non-2xx/3xx answers, failed transactions).
    pub errors: u64,
}

impl LoadResult {
    /// Requests per second.
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            0.0
        }
    }
}

pub fn output(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {what} (is it installed? `cargo xtask setup`)"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `wrk -t1 -cCONNECTIONS -dSECONDS --latency [-H HEADER…] URL`: one thread,
/// keep-alive connections.
pub fn wrk(
    url: &str,
    connections: u32,
    duration: Duration,
    headers: &[&str],
) -> anyhow::Result<LoadResult> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", &format!("-c{connections}")])
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("--latency");
    for h in headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(url);
    let text = output(&mut cmd, "wrk")?;
    parse_wrk(&text).with_context(|| format!("reading wrk's output:\n{text}"))
}

/// `redis-benchmark -t get -c CONNECTIONS -n REQUESTS --csv` against `redis`.
pub fn redis_benchmark(
    redis: &Redis,
    connections: u32,
    requests: u64,
) -> anyhow::Result<LoadResult> {
    let text = redis.benchmark(&[
        "-t",
        "get",
        "-c",
        &connections.to_string(),
        "-n",
        &requests.to_string(),
        "--csv",
    ])?;
    let r = parse_redis_csv(&text).with_context(|| format!("reading:\n{text}"))?;
    // The CSV gives the rate, not the run length.
    Ok(LoadResult {
        requests,
        seconds: requests as f64 / r.rps,
        p50_ms: r.p50_ms,
        p99_ms: r.p99_ms,
        errors: 0,
    })
}

/// `pgbench -S -n -c CONNECTIONS -j 1 -T SECONDS -l`: select-only
/// transactions (one `SELECT` by primary key each) over TCP; the latency
/// percentiles come from pgbench's per-transaction log.
pub fn pgbench(pg: &Postgres, connections: u32, duration: Duration) -> anyhow::Result<LoadResult> {
    let logs = tempfile::tempdir()?;
    let prefix = logs.path().join("pgbench_log");
    let text = pg.pgbench(&[
        "-S",
        "-n",
        "-c",
        &connections.to_string(),
        "-j",
        "1",
        "-T",
        &duration.as_secs().max(1).to_string(),
        "-l",
        "--log-prefix",
        &prefix.to_string_lossy(),
    ])?;
    let mut r =
        parse_pgbench(&text).with_context(|| format!("reading pgbench's output:\n{text}"))?;
    let mut latencies_us = Vec::new();
    for entry in std::fs::read_dir(logs.path())? {
        let log = std::fs::read_to_string(entry?.path())?;
        latencies_us.extend(pgbench_log_latencies(&log));
    }
    let (p50, p99) =
        percentiles(&mut latencies_us).context("pgbench's transaction log is empty")?;
    r.p50_ms = p50 / 1000.0;
    r.p99_ms = p99 / 1000.0;
    Ok(r)
}

/// `pgbench -i -s SCALE`: the tables the select-only script reads.
pub fn pgbench_init(pg: &Postgres, scale: u32) -> anyhow::Result<()> {
    pg.pgbench(&["-i", "-q", "-s", &scale.to_string()])
        .map(drop)
}

/// "635.00us", "2.19ms", "1.01s" → milliseconds.
fn wrk_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (number, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    Some(number.parse::<f64>().ok()? * scale)
}

/// Reads wrk's `--latency` report.
pub fn parse_wrk(text: &str) -> anyhow::Result<LoadResult> {
    let mut r = LoadResult::default();
    let mut have = (false, false, false);
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            // "123456 requests in 10.00s, 45.67MB read"
            [n, "requests", "in", secs, ..] => {
                r.requests = n.parse().context("request count")?;
                r.seconds =
                    wrk_duration_ms(secs.trim_end_matches(',')).context("run length")? / 1000.0;
                have.0 = true;
            }
            ["50%", v] => {
                r.p50_ms = wrk_duration_ms(v).context("p50")?;
                have.1 = true;
            }
            ["99%", v] => {
                r.p99_ms = wrk_duration_ms(v).context("p99")?;
                have.2 = true;
            }
            // "Socket errors: connect 0, read 1, write 0, timeout 2"
            ["Socket", "errors:", rest @ ..] => {
                r.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => {
                r.errors += n.parse::<u64>().context("non-2xx count")?;
            }
            _ => {}
        }
    }
    if have != (true, true, true) {
        bail!("no request count, p50 or p99 (run with --latency)");
    }
    Ok(r)
}

/// One row of `redis-benchmark --csv`.
#[derive(Debug, PartialEq)]
pub struct RedisRow {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Reads `redis-benchmark --csv` (Redis 7: rps, then latencies in ms).
pub fn parse_redis_csv(text: &str) -> anyhow::Result<RedisRow> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<String> = split_csv(lines.next().context("no CSV header")?);
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("no column {name:?} in {header:?}"))
    };
    let (rps, p50, p99) = (col("rps")?, col("p50_latency_ms")?, col("p99_latency_ms")?);
    let row = split_csv(lines.next().context("no result row")?);
    let num = |i: usize| -> anyhow::Result<f64> {
        row.get(i)
            .and_then(|v| v.parse().ok())
            .filter(|v: &f64| v.is_finite() && *v >= 0.0)
            .with_context(|| format!("bad value in column {i} of {row:?}"))
    };
    let row = RedisRow {
        rps: num(rps)?,
        p50_ms: num(p50)?,
        p99_ms: num(p99)?,
    };
    if row.rps <= 0.0 {
        bail!("no requests per second in {row:?}");
    }
    Ok(row)
}

fn split_csv(line: &str) -> Vec<String> {
    line.split(',')
        .map(|f| f.trim().trim_matches('"').to_owned())
        .collect()
}

/// Reads pgbench's summary: transactions processed, failed, and the run
/// length (`duration: N s`).
pub fn parse_pgbench(text: &str) -> anyhow::Result<LoadResult> {
    let mut r = LoadResult::default();
    let value = |line: &str| -> Option<f64> {
        line.split_once(':')?
            .1
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let mut have = (false, false);
    for line in text.lines().map(str::trim) {
        if line.starts_with("number of transactions actually processed:") {
            r.requests = value(line).context("transactions")? as u64;
            have.0 = true;
        } else if line.starts_with("number of failed transactions:") {
            r.errors = value(line).context("failed transactions")? as u64;
        } else if line.starts_with("duration:") {
            r.seconds = value(line).context("duration")?;
            have.1 = true;
        }
    }
    if have != (true, true) {
        bail!("no transaction count or duration");
    }
    Ok(r)
}

/// Latencies (µs, third column) of a pgbench per-transaction log
/// (`client_id transaction_no time script_no time_epoch time_us`).
pub fn pgbench_log_latencies(log: &str) -> Vec<f64> {
    log.lines()
        .filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
        .collect()
}

/// Median and 99th percentile (nearest rank) of `values`; sorts them.
pub fn percentiles(values: &mut [f64]) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let i = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len());
        values[i - 1]
    };
    Some((rank(0.50), rank(0.99)))
}

/// Whether `tool` is on PATH.
pub fn installed(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| Path::new(&dir).join(tool).is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 10s test @ http://127.0.0.1:40000/a.txt
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.52ms  412.00us  12.01ms   90.12%
    Req/Sec    21.20k     1.10k   23.00k    81.00%
  Latency Distribution
     50%    1.43ms
     75%    1.61ms
     90%    1.90ms
     99%    3.10ms
  211000 requests in 10.01s, 120.50MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  21078.92
Transfer/sec:     12.04MB
";

    #[test]
    fn wrk_report() {
        let r = parse_wrk(WRK).unwrap();
        assert_eq!(r.requests, 211_000);
        assert!((r.seconds - 10.01).abs() < 1e-9);
        assert!((r.p50_ms - 1.43).abs() < 1e-9);
        assert!((r.p99_ms - 3.10).abs() < 1e-9);
        assert_eq!(r.errors, 7);
        assert!((r.rate() - 21078.92).abs() < 1.0);
        assert!(parse_wrk(&WRK.replace("  Latency Distribution", "")).is_ok());
        assert!(parse_wrk(&WRK.replace("99%", "98%")).is_err());
        assert!(parse_wrk("").is_err());
    }

    #[test]
    fn wrk_units() {
        assert_eq!(wrk_duration_ms("635.00us"), Some(0.635));
        assert_eq!(wrk_duration_ms("2.00ms"), Some(2.0));
        assert_eq!(wrk_duration_ms("1.50s"), Some(1500.0));
        assert_eq!(wrk_duration_ms("1.00m"), Some(60_000.0));
        assert_eq!(wrk_duration_ms("fast"), None);
    }

    #[test]
    fn redis_csv() {
        let text = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                    \"GET\",\"52356.02\",\"0.502\",\"0.096\",\"0.479\",\"0.727\",\"1.015\",\"4.135\"\n";
        let r = parse_redis_csv(text).unwrap();
        assert!((r.rps - 52356.02).abs() < 1e-9);
        assert!((r.p50_ms - 0.479).abs() < 1e-9);
        assert!((r.p99_ms - 1.015).abs() < 1e-9);
        assert!(parse_redis_csv("\"test\",\"rps\"\n\"GET\",\"1\"\n").is_err());
        assert!(parse_redis_csv("").is_err());
    }

    #[test]
    fn pgbench_summary_and_log() {
        let text = "transaction type: <builtin: select only>
scaling factor: 1
query mode: simple
number of clients: 8
number of threads: 1
maximum number of tries: 1
duration: 10 s
number of transactions actually processed: 98765
number of failed transactions: 0 (0.000%)
latency average = 0.810 ms
initial connection time = 12.345 ms
tps = 9876.543210 (without initial connection time)
";
        let r = parse_pgbench(text).unwrap();
        assert_eq!((r.requests, r.errors), (98_765, 0));
        assert_eq!(r.seconds, 10.0);
        assert!(parse_pgbench("tps = 1").is_err());
        let log = "0 1 812 0 1763000000 123456\n1 1 1200 0 1763000000 123999\nbad\n";
        assert_eq!(pgbench_log_latencies(log), vec![812.0, 1200.0]);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentiles(&mut v), Some((50.0, 99.0)));
        assert_eq!(percentiles(&mut [7.0]), Some((7.0, 7.0)));
        assert_eq!(percentiles(&mut []), None);
    }
}
