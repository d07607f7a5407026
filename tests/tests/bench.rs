//! The measuring behind `cargo xtask bench overhead` and `cargo xtask soak`
//! works on this machine: real servers, real load generators, the agent off
//! and on, and every figure the reports need present and plausible. Short
//! runs: this checks the tool, the committed reports carry the numbers.

use std::process::{Command, Stdio};

use serde_json::Value;
use zerotrace_tests::{agent_bin, can_trace};

fn workloads(args: &[&str]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_workloads"))
        .args(args)
        .env("ZEROTRACE_BIN", agent_bin())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("running workloads");
    assert!(out.status.success(), "workloads {args:?}: {}", out.status);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {key} in {v}"))
}

#[test]
fn overhead_runs_measure_off_floor_and_on_and_the_agent() {
    if !can_trace() {
        return;
    }
    let sysctl = "/proc/sys/kernel/bpf_stats_enabled";
    let counting_before = std::fs::read_to_string(sysctl).unwrap();
    let runs = workloads(&[
        "overhead",
        "--rounds",
        "1",
        "--seconds",
        "2",
        "--workload",
        "nginx",
        "--workload",
        "redis",
    ]);
    assert_eq!(runs.len(), 6, "{runs:?}");
    // The kernel window turned the host's statistics on and back.
    assert_eq!(std::fs::read_to_string(sysctl).unwrap(), counting_before);
    for w in ["nginx", "redis"] {
        for mode in ["off", "floor", "on"] {
            let r = runs
                .iter()
                .find(|r| r["workload"] == w && r["mode"] == mode)
                .unwrap_or_else(|| panic!("no {w} {mode} run: {runs:?}"));
            assert!(num(r, "requests") >= 1000.0, "{r}");
            assert!(num(r, "rps") > 0.0 && num(r, "p50_ms") > 0.0, "{r}");
            assert!(num(r, "p99_ms") >= num(r, "p50_ms"), "{r}");
            assert!(num(r, "host_cpu_us_per_request") > 0.0, "{r}");
            assert_eq!(num(r, "errors"), 0.0, "{r}");
            if mode == "off" {
                assert!(r.get("agent_cpu_seconds").is_none(), "{r}");
                continue;
            }
            if mode == "floor" {
                // The empty program ran on the load's syscalls and cost less
                // than the agent's programs on the same load.
                assert!(r.get("agent_cpu_seconds").is_none(), "{r}");
                assert!(num(r, "bpf_runs") >= num(r, "requests"), "{r}");
                let on = runs
                    .iter()
                    .find(|o| o["workload"] == w && o["mode"] == "on")
                    .unwrap();
                let floor_ns = num(r, "kernel_ns_per_request");
                assert!(floor_ns > 0.0, "{r}");
                assert!(floor_ns < num(on, "kernel_ns_per_request"), "{r} vs {on}");
                continue;
            }
            // The agent traced the load and the receiver got its spans.
            // The debug agent cannot keep up with a saturating load on
            // every machine; then the shortfall must be counted as loss.
            assert!(num(r, "spans_made") > 0.0, "{r}");
            assert!(
                num(r, "spans_made") >= num(r, "requests") || num(r, "events_lost") > 0.0,
                "fewer spans than requests and no loss counted: {r}"
            );
            assert!(num(r, "spans_received") > 0.0, "{r}");
            assert!(num(r, "agent_cpu_seconds") > 0.0, "{r}");
            assert!(num(r, "agent_peak_rss_kib") > 1024.0, "{r}");
            // The kernel columns are of the window's own load.
            assert!(num(r, "kernel_window_requests") >= 1000.0, "{r}");
            assert!(
                num(r, "bpf_runs") >= num(r, "kernel_window_requests"),
                "{r}"
            );
            assert!(num(r, "kernel_ns_per_request") > 0.0, "{r}");
            let programs = r["kernel_ns_per_request_by_program"].as_object().unwrap();
            assert!(programs.contains_key("sys_exit_data"), "{r}");
        }
    }
}

#[test]
fn soak_samples_the_agent_over_time() {
    if !can_trace() {
        return;
    }
    let samples = workloads(&["soak", "--minutes", "1", "--sample-seconds", "5"]);
    assert!(
        samples.len() >= 10,
        "{} samples: {samples:?}",
        samples.len()
    );
    let (first, last) = (&samples[0], &samples[samples.len() - 1]);
    assert!(num(last, "t_s") >= 55.0, "{last}");
    assert!(num(last, "requests") > num(first, "requests"), "{last}");
    assert!(num(last, "events") > num(first, "events"), "{last}");
    assert!(
        num(last, "cpu_seconds") > num(first, "cpu_seconds"),
        "{last}"
    );
    assert!(num(last, "spans_received") > 0.0, "{last}");
    for s in &samples {
        assert!(
            num(s, "rss_kib") > 1024.0 && num(s, "peak_rss_kib") >= num(s, "rss_kib"),
            "{s}"
        );
    }
}
