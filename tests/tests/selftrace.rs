//! End-to-end: the agent's own telemetry — the startup trace, interval
//! spans (ebpf.execute, ebpf.buffer.read) and the /health, /ready,
//! /metrics endpoints — checked at an OTLP receiver and with the reference
//! Prometheus text parser. Needs root.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use zerotrace_tests::{
    load::wrk,
    otlp::{Protocol, ReceivedSpan, Receiver, otel_python},
    servers::{Nginx, PythonApp, curl},
    spans::*,
    *,
};

fn agent_spans(spans: &[ReceivedSpan]) -> Vec<&ReceivedSpan> {
    spans
        .iter()
        .filter(|s| is_service(s, "zerotrace"))
        .collect()
}

fn named<'a>(spans: &'a [ReceivedSpan], name: &str) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.name == name && is_service(s, "zerotrace"))
        .collect()
}

fn children<'a>(spans: &'a [ReceivedSpan], parent: &ReceivedSpan) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.trace_id == parent.trace_id && s.parent_span_id == parent.span_id)
        .collect()
}

fn attr_f64(s: &ReceivedSpan, key: &str) -> Option<f64> {
    s.attributes.get(key)?.as_f64()
}

#[test]
fn startup_trace_shows_config_probe_loads_attaches_and_seeding() {
    if !can_trace() {
        return;
    }
    let rx = Receiver::start(Protocol::Grpc).unwrap();
    let agent = agent_for(&rx, &["--listen", "off"]);
    let spans = rx
        .wait_for(WAIT, "the startup trace", |s| {
            !named(s, "zerotrace.startup").is_empty()
        })
        .unwrap();
    // Children are queued before the root: all have arrived with it.
    let root = one(&spans, "startup root", |s| s.name == "zerotrace.startup");
    assert_eq!(root.parent_span_id, "", "{}", root.brief());
    assert_eq!(root.status, "UNSET", "{}", root.brief());
    assert_eq!(
        root.resource.get("process.pid").and_then(Value::as_i64),
        Some(i64::from(agent.pid())),
        "the resource describes the agent: {:?}",
        root.resource
    );
    assert!(root.resource.contains_key("service.version"));
    let transport = root.attr_str("zerotrace.transport").unwrap();
    assert!(["ringbuf", "perf"].contains(&transport), "{}", root.brief());
    let layer = root.attr_str("zerotrace.kernel_functions").unwrap();

    let kids = children(&spans, root);
    for phase in ["config.load", "export.start", "kernel.probe", "conn.seed"] {
        let found: Vec<_> = kids.iter().filter(|s| s.name == phase).collect();
        assert_eq!(found.len(), 1, "one {phase} span:{}", briefs(&spans));
    }
    for kid in &kids {
        assert!(
            kid.start_ns >= root.start_ns && kid.end_ns <= root.end_ns,
            "{} lies outside the start-up: {}",
            kid.brief(),
            root.brief()
        );
    }
    let probe = kids.iter().find(|s| s.name == "kernel.probe").unwrap();
    let release = run(Command::new("uname").arg("-r")).unwrap();
    assert_eq!(
        probe.attr_str("zerotrace.kernel.release"),
        Some(release.trim())
    );
    assert_eq!(
        probe
            .attributes
            .get("zerotrace.kernel.feature.syscall_tracepoints"),
        Some(&Value::Bool(true))
    );

    // One ebpf.compile per loaded program, with the verifier's instruction count.
    let compiles: Vec<_> = kids.iter().filter(|s| s.name == "ebpf.compile").collect();
    assert!(compiles.len() >= 15, "{}", briefs(&spans));
    let exit_data = compiles
        .iter()
        .find(|s| s.attr_str("ebpf.program.name") == Some("sys_exit_data"))
        .expect("sys_exit_data was loaded");
    assert_eq!(exit_data.attr_str("ebpf.program.type"), Some("tracepoint"));
    assert!(exit_data.attr_i64("ebpf.verifier.instructions").unwrap() > 50);

    // One ebpf.attach per probe, with type, target and outcome.
    let attaches: Vec<_> = kids.iter().filter(|s| s.name == "ebpf.attach").collect();
    let attach = |target: &str| {
        attaches
            .iter()
            .find(|s| s.attr_str("ebpf.attach.target") == Some(target))
            .unwrap_or_else(|| panic!("no attach span for {target}:{}", briefs(&spans)))
    };
    let read = attach("syscalls/sys_exit_read");
    assert_eq!(read.attr_str("ebpf.attach.type"), Some("tracepoint"));
    assert_eq!(read.attr_str("ebpf.attach.outcome"), Some("attached"));
    let tcp_sendmsg: Vec<_> = attaches
        .iter()
        .filter(|s| s.attr_str("ebpf.attach.target") == Some("tcp_sendmsg"))
        .collect();
    assert!(
        !tcp_sendmsg.is_empty(),
        "the kernel-function layer was tried"
    );
    if layer.starts_with("none") {
        // Neither method works here: each attempt failed with a reason and
        // a fallback, and sendfile is covered by its syscall tracepoints.
        for s in &tcp_sendmsg {
            assert_eq!(
                s.attr_str("ebpf.attach.outcome"),
                Some("failed"),
                "{}",
                s.brief()
            );
            assert_eq!(s.status, "ERROR");
            assert!(!s.status_message.is_empty());
            assert!(
                s.attr_str("ebpf.attach.fallback")
                    .is_some_and(|f| f.starts_with("falling back to"))
            );
        }
        let last = tcp_sendmsg.last().unwrap();
        assert!(
            last.attr_str("ebpf.attach.fallback")
                .unwrap()
                .contains("syscall tracepoints"),
            "{}",
            last.brief()
        );
        assert_eq!(
            attach("syscalls/sys_exit_sendfile64").attr_str("ebpf.attach.outcome"),
            Some("attached")
        );
    } else {
        assert!(
            tcp_sendmsg
                .iter()
                .any(|s| s.attr_str("ebpf.attach.outcome") == Some("attached")),
            "layer {layer}:{}",
            briefs(&spans)
        );
    }
    assert_eq!(
        root.attr_i64("zerotrace.probes.attached").unwrap() as usize,
        attaches
            .iter()
            .filter(|s| s.attr_str("ebpf.attach.outcome") == Some("attached"))
            .count()
    );
    drop(agent);
}

#[test]
fn interval_spans_report_program_costs_and_buffer_reads_after_traffic() {
    if !can_trace() {
        return;
    }
    let rx = Receiver::start(Protocol::HttpProtobuf).unwrap();
    let app = PythonApp::start().unwrap();
    let agent = agent_for(
        &rx,
        &[
            "--telemetry-interval",
            "1",
            "--listen",
            "off",
            "--program-stats",
            "on",
        ],
    );
    const REQUESTS: usize = 20;
    for i in 0..REQUESTS {
        curl(&[&format!("http://127.0.0.1:{}/api/users/{i}", app.port)]).unwrap();
    }
    let spans = rx
        .wait_for(WAIT, "interval spans covering the traffic", |s| {
            let app_spans = s
                .iter()
                .filter(|s| {
                    s.kind == "SERVER" && s.attr_i64("server.port") == Some(i64::from(app.port))
                })
                .count();
            let events: i64 = named(s, "ebpf.buffer.read")
                .iter()
                .filter_map(|b| b.attr_i64("ebpf.buffer.events"))
                .sum();
            app_spans >= REQUESTS && events >= 4 * REQUESTS as i64
        })
        .unwrap();
    drop(agent);

    let intervals = named(&spans, "zerotrace.interval");
    assert!(!intervals.is_empty());
    let busy = intervals
        .iter()
        .copied()
        .max_by_key(|i| i.attr_i64("ebpf.runs").unwrap_or(0))
        .unwrap();
    let kids = children(&spans, busy);
    let buffer = kids
        .iter()
        .find(|s| s.name == "ebpf.buffer.read")
        .expect("one buffer span per interval");
    assert!(["ringbuf", "perf"].contains(&buffer.attr_str("ebpf.transport").unwrap()));
    assert_eq!(
        buffer.attr_i64("ebpf.buffer.lost"),
        Some(0),
        "{}",
        buffer.brief()
    );
    let events = buffer.attr_i64("ebpf.buffer.events").unwrap();
    let bytes = buffer.attr_i64("ebpf.buffer.bytes").unwrap();
    assert!(
        bytes >= events * 32,
        "every record has a 32-byte header: {}",
        buffer.brief()
    );
    let largest = buffer.attr_i64("ebpf.buffer.largest_batch").unwrap();
    assert!(largest >= 1 && largest <= events, "{}", buffer.brief());
    assert!(buffer.attr_i64("ebpf.buffer.reads").unwrap() >= 1);

    let execute = |program: &str| {
        kids.iter()
            .find(|s| s.name == "ebpf.execute" && s.attr_str("ebpf.program.name") == Some(program))
            .unwrap_or_else(|| panic!("no ebpf.execute for {program}:{}", briefs(&spans)))
    };
    let exit_data = execute("sys_exit_data");
    let runs = exit_data.attr_i64("ebpf.program.runs").unwrap();
    assert!(runs >= 4, "read/write exits ran: {}", exit_data.brief());
    let avg = attr_f64(exit_data, "ebpf.program.avg_ns").unwrap();
    assert!(
        (10.0..1_000_000.0).contains(&avg),
        "ns per run is plausible: {}",
        exit_data.brief()
    );
    let time = exit_data.attr_i64("ebpf.program.run_time_ns").unwrap();
    assert!((avg * runs as f64 - time as f64).abs() <= 1.0 + runs as f64);
    // Every interval span lies within its interval.
    for kid in &kids {
        assert!(kid.start_ns >= busy.start_ns && kid.end_ns <= busy.end_ns);
    }
}

/// Sends `chunks` writes of `size` bytes over a loopback connection.
fn flood(chunks: usize, size: usize) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        while conn.read(&mut buf).unwrap_or(0) > 0 {}
    });
    let mut conn = TcpStream::connect(addr).unwrap();
    let chunk = vec![b'x'; size];
    for _ in 0..chunks {
        conn.write_all(&chunk).unwrap();
    }
    drop(conn);
    reader.join().unwrap();
}

/// `/path` of the agent's endpoints: (status, body).
fn get(port: u16, path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", "-w", "\n%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Sample name → [(labels, value)].
type Metrics = BTreeMap<String, Vec<(BTreeMap<String, String>, f64)>>;

/// Parses Prometheus text with the reference parser (prometheus_client):
/// sample name → [(labels, value)]. Panics if the text is not valid.
fn parse_prometheus(text: &str) -> Metrics {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.setdefault(s.name, []).append([s.labels, s.value])
print(json.dumps(out))
"#;
    let mut child = Command::new(otel_python().unwrap())
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "not valid Prometheus text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sample(metrics: &Metrics, name: &str, label: Option<(&str, &str)>) -> f64 {
    metrics
        .get(name)
        .unwrap_or_else(|| panic!("{name} missing from /metrics: {:?}", metrics.keys()))
        .iter()
        .find(|(labels, _)| label.is_none_or(|(k, v)| labels.get(k).map(String::as_str) == Some(v)))
        .unwrap_or_else(|| panic!("{name} has no sample with {label:?}"))
        .1
}

#[test]
fn metrics_endpoint_serves_valid_prometheus_text_and_health() {
    if !can_trace() {
        return;
    }
    let rx = Receiver::start(Protocol::Grpc).unwrap();
    let port = free_port();
    let agent = agent_for(
        &rx,
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--program-stats",
            "on",
        ],
    );
    // The agent says "tracing" once it is ready.
    assert_eq!(get(port, "/ready"), (200, "ready".into()));
    assert_eq!(get(port, "/health").0, 200);
    assert_eq!(get(port, "/nope").0, 404);
    let app = PythonApp::start().unwrap();
    for i in 0..5 {
        curl(&[&format!("http://127.0.0.1:{}/api/users/{i}", app.port)]).unwrap();
    }
    rx.wait_for(WAIT, "the app's spans exported", |s| {
        s.iter()
            .filter(|s| s.attr_i64("server.port") == Some(i64::from(app.port)))
            .count()
            >= 5
    })
    .unwrap();
    // The snapshot behind /metrics is refreshed every second.
    let deadline = Instant::now() + WAIT;
    let metrics = loop {
        let (status, text) = get(port, "/metrics");
        assert_eq!(status, 200);
        let metrics = parse_prometheus(&text);
        if sample(&metrics, "zerotrace_spans_exported_total", None) >= 5.0
            || Instant::now() > deadline
        {
            break metrics;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let transport = metrics["zerotrace_events_total"][0].0["transport"].clone();
    assert!(["ringbuf", "perf"].contains(&transport.as_str()));
    assert!(sample(&metrics, "zerotrace_events_total", None) >= 10.0);
    assert!(sample(&metrics, "zerotrace_event_bytes_total", None) >= 320.0);
    assert_eq!(sample(&metrics, "zerotrace_events_lost_total", None), 0.0);
    assert!(sample(&metrics, "zerotrace_spans_total", None) >= 5.0);
    assert!(sample(&metrics, "zerotrace_spans_exported_total", None) >= 5.0);
    assert_eq!(sample(&metrics, "zerotrace_spans_dropped_total", None), 0.0);
    assert_eq!(sample(&metrics, "zerotrace_export_errors_total", None), 0.0);
    assert!(metrics.contains_key("zerotrace_export_queue_spans"));
    assert!(metrics.contains_key("zerotrace_connections_open"));
    let runs = sample(
        &metrics,
        "zerotrace_bpf_program_runs_total",
        Some(("program", "sys_exit_data")),
    );
    let seconds = sample(
        &metrics,
        "zerotrace_bpf_program_run_seconds_total",
        Some(("program", "sys_exit_data")),
    );
    assert!(runs >= 20.0, "{runs}");
    assert!(
        seconds > 0.0 && seconds / runs < 1e-3,
        "{seconds} s over {runs} runs"
    );
    drop(agent);
}

/// A process start costs the agent no look at the process's maps for the
/// libraries it has judged before. `curl --version` maps some 40
/// libraries executable each time it starts; once they are judged, the
/// kernel's record names each file and the agent skips it: only libssl, a
/// probed library whose processes are followed, has the process looked at.
/// Fails where the record's file differs from the one maps shows.
#[test]
fn a_library_judged_before_is_not_looked_for_again_when_a_process_maps_it() {
    if !can_trace() {
        return;
    }
    let rx = Receiver::start(Protocol::Grpc).unwrap();
    let port = free_port();
    let agent = agent_for(&rx, &["--listen", &format!("127.0.0.1:{port}")]);
    let curl_version = || run(Command::new("curl").arg("--version")).unwrap();
    let mapped = || {
        let metrics = parse_prometheus(&get(port, "/metrics").1);
        let count = |action| {
            sample(
                &metrics,
                "zerotrace_tls_mapped_files_total",
                Some(("action", action)),
            )
        };
        (count("looked"), count("skipped"))
    };
    // The snapshot behind /metrics is refreshed every second.
    let settled = |enough: &dyn Fn((f64, f64)) -> bool| {
        let deadline = Instant::now() + WAIT;
        loop {
            let now = mapped();
            if enough(now) || Instant::now() > deadline {
                break now;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    // The first start has its libraries judged.
    curl_version();
    let (looked, skipped) = settled(&|(looked, _)| looked > 0.0);
    assert!(looked > 0.0, "no mapping looked at");
    const STARTS: u32 = 5;
    for _ in 0..STARTS {
        curl_version();
    }
    let floor = skipped + f64::from(STARTS * 20);
    let (looked_after, skipped_after) = settled(&|(_, skipped)| skipped >= floor);
    assert!(
        skipped_after >= floor,
        "{STARTS} starts of curl skipped {} mappings ({} looked at)",
        skipped_after - skipped,
        looked_after - looked
    );
    // Other processes on the host may map new files meanwhile.
    assert!(
        (looked_after - looked) * 4.0 <= skipped_after - skipped,
        "looked at {} mappings, skipped {}",
        looked_after - looked,
        skipped_after - skipped
    );
    drop(agent);
}

/// Run-time statistics cost every BPF program on the host two clock reads
/// per run, so they are counted only when asked: by default the interval
/// spans and /metrics carry no program figures rather than zeros. While
/// the host's sysctl counts for everyone, the running agent reports them.
#[test]
fn program_stats_are_off_unless_asked() {
    if !can_trace() {
        return;
    }
    let host_counts = || {
        std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|v| v.trim() == "1")
    };
    if host_counts() {
        eprintln!("skipped: this host counts BPF run time for every program (sysctl)");
        return;
    }
    let rx = Receiver::start(Protocol::Grpc).unwrap();
    let port = free_port();
    let agent = agent_for(
        &rx,
        &[
            "--telemetry-interval",
            "1",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ],
    );
    assert!(
        !host_counts(),
        "the agent turned the kernel's statistics on"
    );
    flood(20, 1000);
    let spans = rx
        .wait_for(WAIT, "an interval span after traffic", |s| {
            named(s, "ebpf.buffer.read")
                .iter()
                .any(|b| b.attr_i64("ebpf.buffer.events").unwrap_or(0) >= 20)
        })
        .unwrap();
    let metrics = parse_prometheus(&get(port, "/metrics").1);
    assert!(
        named(&spans, "ebpf.execute").is_empty(),
        "{}",
        briefs(&spans)
    );
    for interval in named(&spans, "zerotrace.interval") {
        assert_eq!(interval.attr_i64("ebpf.runs"), None, "{}", interval.brief());
    }
    assert!(sample(&metrics, "zerotrace_events_total", None) >= 20.0);
    assert!(
        !metrics.contains_key("zerotrace_bpf_program_runs_total"),
        "{:?}",
        metrics.keys()
    );

    // An operator (or the overhead benchmark) turns the host's counting on
    // for a while: the running agent reports it, and stops when it ends.
    struct HostCounting;
    impl Drop for HostCounting {
        fn drop(&mut self) {
            let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
        }
    }
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").unwrap();
    let counting = HostCounting;
    let runs = || {
        let m = parse_prometheus(&get(port, "/metrics").1);
        m.contains_key("zerotrace_bpf_program_runs_total").then(|| {
            sample(
                &m,
                "zerotrace_bpf_program_runs_total",
                Some(("program", "sys_exit_data")),
            )
        })
    };
    let deadline = std::time::Instant::now() + WAIT;
    let mut seen = None;
    while std::time::Instant::now() < deadline {
        flood(20, 1000);
        seen = runs().filter(|&n| n > 0.0);
        if seen.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        seen.is_some(),
        "no program runs in /metrics while sysctl kernel.bpf_stats_enabled=1"
    );
    drop(counting);
    // /metrics is refreshed once a second.
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(
        runs(),
        None,
        "program figures reported after the sysctl went off"
    );
    drop(agent);
}

#[test]
fn tiny_flooded_buffers_report_losses_in_spans_and_metrics() {
    if !can_trace() {
        return;
    }
    for transport in ["ringbuf", "perf"] {
        let rx = Receiver::start(Protocol::Grpc).unwrap();
        let port = free_port();
        let agent = agent_for(
            &rx,
            &[
                "--transport",
                transport,
                // One page: a 6000-byte payload record can never fit.
                "--buffer-size",
                "4096",
                "--telemetry-interval",
                "1",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ],
        );
        flood(2000, 6000);
        let spans = rx
            .wait_for(WAIT, "a buffer span reporting losses", |s| {
                named(s, "ebpf.buffer.read")
                    .iter()
                    .any(|b| b.attr_i64("ebpf.buffer.lost").unwrap_or(0) > 0)
            })
            .unwrap();
        let lossy: Vec<_> = named(&spans, "ebpf.buffer.read")
            .into_iter()
            .filter(|b| b.attr_i64("ebpf.buffer.lost").unwrap_or(0) > 0)
            .collect();
        let lost: i64 = lossy
            .iter()
            .map(|b| b.attr_i64("ebpf.buffer.lost").unwrap())
            .sum();
        assert!(lost >= 100, "{transport}: {}", briefs(&spans));
        for b in &lossy {
            assert_eq!(b.attr_str("ebpf.transport"), Some(transport));
            assert_eq!(b.status, "ERROR", "losses are visible: {}", b.brief());
            assert!(b.status_message.contains("events lost"));
        }
        // The agent stays responsive and /metrics counts the same losses.
        assert_eq!(get(port, "/health").0, 200);
        // /metrics is refreshed every second: it catches up with the spans.
        let deadline = Instant::now() + Duration::from_secs(10);
        let counted = loop {
            let metrics = parse_prometheus(&get(port, "/metrics").1);
            let counted = sample(
                &metrics,
                "zerotrace_events_lost_total",
                Some(("transport", transport)),
            );
            if counted >= lost as f64 || Instant::now() > deadline {
                break counted;
            }
            std::thread::sleep(Duration::from_millis(300));
        };
        assert!(
            counted >= lost as f64,
            "{transport}: metrics {counted} < spans {lost}"
        );
        assert!(agent_spans(&spans).len() > 3);
        drop(agent);
    }
}

/// Records a full buffer refused leave holes in their connections'
/// streams. The kernel tells the agent where (the next record of the
/// connection carries the lost bytes), so a request whose response was
/// lost says so (`zerotrace.response.lost`, no error) instead of taking a
/// later response: on each kept-alive connection, every server span ends
/// before the next one begins.
#[test]
fn lost_records_never_pair_a_request_with_a_later_response() {
    if !can_trace() {
        return;
    }
    // One page of ring, which a burst of a few dozen records fills; four
    // pages per CPU of perf buffer, where one page could drop every record
    // of a busy host's run, opens included.
    for (transport, size) in [("ringbuf", "4096"), ("perf", "16384")] {
        let nginx = Nginx::start(9).unwrap();
        let rx = Receiver::start(Protocol::Grpc).unwrap();
        let port = free_port();
        let agent = agent_for(
            &rx,
            &[
                "--transport",
                transport,
                "--buffer-size",
                size,
                "--listen",
                &format!("127.0.0.1:{port}"),
            ],
        );
        let load = wrk(&nginx.url("/a.txt"), 16, Duration::from_secs(3), &[]).unwrap();
        assert!(load.requests > 1000, "{load:?}");
        std::thread::sleep(Duration::from_secs(2));
        let metrics = parse_prometheus(&get(port, "/metrics").1);
        let spans = rx.spans();
        drop(agent);
        let lost = sample(
            &metrics,
            "zerotrace_events_lost_total",
            Some(("transport", transport)),
        );
        let holes = sample(&metrics, "zerotrace_stream_holes_total", None);
        assert!(lost > 0.0, "{transport}: nothing lost");
        assert!(
            holes > 0.0,
            "{transport}: {lost} records lost, no hole reported"
        );
        let workers = nginx.workers();
        let mut by_conn: BTreeMap<i64, Vec<&ReceivedSpan>> = BTreeMap::new();
        for s in &spans {
            let pid = s.resource.get("process.pid").and_then(Value::as_u64);
            if s.kind == "SERVER" && pid.is_some_and(|p| workers.contains(&(p as u32))) {
                let peer = s.attr_i64("network.peer.port").unwrap();
                by_conn.entry(peer).or_default().push(s);
            }
        }
        let (mut answered, mut unseen) = (0, 0);
        for (peer, mut list) in by_conn {
            list.retain(|s| s.attr_str("error.type") != Some("no_response"));
            list.sort_by_key(|s| s.start_ns);
            for s in &list {
                // A response that went by in a hole is no error, only unknown.
                if s.attributes.get("zerotrace.response.lost") == Some(&Value::Bool(true)) {
                    assert_eq!(s.status, "UNSET", "{}", s.brief());
                    assert_eq!(s.attr_i64("http.response.status_code"), None);
                    unseen += 1;
                    continue;
                }
                answered += 1;
                assert_eq!(
                    s.attr_i64("http.response.status_code"),
                    Some(200),
                    "{}",
                    s.brief()
                );
                // The body, where it was seen: a connection may close
                // between a response's head and its body when wrk stops, or
                // right after the body's record was lost (a close carries
                // no hole).
                let body = s.attr_i64("http.response.body.size");
                assert!(matches!(body, None | Some(333)), "{}", s.brief());
            }
            for pair in list.windows(2) {
                assert!(
                    pair[0].end_ns <= pair[1].start_ns,
                    "{transport}, connection from port {peer}: a span ends {} ns after the \
                     next one began:\n  {}\n  {}",
                    pair[0].end_ns - pair[1].start_ns,
                    pair[0].brief(),
                    pair[1].brief()
                );
            }
        }
        eprintln!(
            "{transport}: {lost} records lost, {holes} holes, {answered} answered spans, \
             {unseen} with their response unseen"
        );
        assert!(
            answered >= 100,
            "{transport}: only {answered} answered spans"
        );
    }
}

/// When start-up fails after the exporter is up, the trace backend still
/// learns why: the startup trace ends in an error naming the cause.
#[test]
fn a_failed_start_up_is_exported_with_its_reason() {
    if !can_trace() {
        return;
    }
    let report = check_report();
    if report["kernel_function_layer"].is_string() {
        eprintln!("skipped: this kernel runs a kernel-function method, so forcing one cannot fail");
        return;
    }
    let rx = Receiver::start(Protocol::HttpProtobuf).unwrap();
    let out = Command::new(agent_bin())
        .args(["run", "--kernel-functions", "kprobe", "--listen", "off"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", rx.protocol_name())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--kernel-functions kprobe"), "{stderr}");
    let spans = rx
        .wait_for(WAIT, "the failed startup trace", |s| {
            !named(s, "zerotrace.startup").is_empty()
        })
        .unwrap();
    let root = named(&spans, "zerotrace.startup")[0];
    assert_eq!(root.status, "ERROR", "{}", root.brief());
    assert!(
        root.status_message.contains("start-up failed")
            && root.status_message.contains("kernel built without kprobes"),
        "{}",
        root.brief()
    );
    // The phases that did run are there.
    let kids = children(&spans, root);
    assert!(
        kids.iter().any(|s| s.name == "kernel.probe"),
        "{}",
        briefs(&spans)
    );
}
