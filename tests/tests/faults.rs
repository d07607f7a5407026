//! Faults an agent on every node must survive without hurting the traced
//! applications: kill -9, SIGTERM with spans queued, a dead collector under
//! load, a storm of short connections — and the applications' responses
//! must not change by a byte. Needs root.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use zerotrace_tests::{
    Agent, agent_bin, agent_programs_loaded, can_trace, free_port,
    otlp::{Protocol, Receiver},
    servers::{Nginx, PythonApp, STATIC_FILES},
    signal,
    spans::{WAIT, agent_for},
    stats::{ProcStats, get_raw, metric, proc_stats},
    wait_for_port, wait_timeout,
};

/// Waits up to `timeout` for the agent's programs to be gone; how long it took.
fn programs_gone_within(timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if agent_programs_loaded().is_empty() {
            return Some(start.elapsed());
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The response minus headers that differ by design between two requests.
fn stable(response: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let head: Vec<&str> = head
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("date:"))
        .collect();
    format!("{}\r\n\r\n{body}", head.join("\r\n")).into_bytes()
}

/// Keep-alive GET load on `port` from `threads` threads until `stop`;
/// counts completed requests.
fn load(
    port: u16,
    threads: usize,
    stop: &Arc<AtomicBool>,
    done: &Arc<AtomicU64>,
) -> Vec<thread::JoinHandle<()>> {
    (0..threads)
        .map(|_| {
            let (stop, done) = (Arc::clone(stop), Arc::clone(done));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(s) = TcpStream::connect(("127.0.0.1", port)) else {
                        continue;
                    };
                    let mut reader = BufReader::new(s.try_clone().unwrap());
                    let mut w = s;
                    for _ in 0..200 {
                        if stop.load(Ordering::Relaxed)
                            || w.write_all(b"GET /load HTTP/1.1\r\nHost: t\r\n\r\n")
                                .is_err()
                        {
                            break;
                        }
                        // Status line, headers, then Content-Length bytes.
                        let mut len = 0usize;
                        let mut line = String::new();
                        loop {
                            line.clear();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if let Some(v) =
                                line.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                len = v.trim().parse().unwrap();
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut body = vec![0; len];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect()
}

#[test]
fn kill_9_leaves_no_program_and_the_application_keeps_serving() {
    if !can_trace() {
        return;
    }
    let app = PythonApp::start().unwrap();
    let agent = Agent::start(&["--pid", &app.pid.to_string()]).unwrap();
    assert!(
        !agent_programs_loaded().is_empty(),
        "programs not visible while running"
    );
    let before = stable(&get_raw(app.port, "/x"));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
    drop(agent);
    // The kernel frees programs when their last fd closes, which happens
    // as the process dies: no cleanup code runs on kill -9.
    let gone = programs_gone_within(Duration::from_secs(5));
    assert!(
        gone.is_some(),
        "programs left after kill -9: {:?}",
        agent_programs_loaded()
    );
    assert_eq!(
        stable(&get_raw(app.port, "/x")),
        before,
        "the app's answer changed"
    );
}

#[test]
fn sigterm_detaches_promptly_and_flushes_queued_spans() {
    if !can_trace() {
        return;
    }
    let app = PythonApp::start().unwrap();
    let rx = Receiver::start(Protocol::Grpc).unwrap();
    let listen = free_port();
    let mut child = Command::new(agent_bin())
        .args(["run", "--pid", &app.pid.to_string()])
        .args(["--listen", &format!("127.0.0.1:{listen}")])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", rx.protocol_name())
        // Nothing is exported on schedule: only the flush at exit sends them.
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
        .env("ZEROTRACE_SELF_SPANS", "false")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
    assert!(err.any(|l| l.unwrap().contains("tracing")));
    const N: usize = 10;
    for i in 0..N {
        get_raw(app.port, &format!("/queued/{i}"));
    }
    // Wait until the agent has made the spans (they sit in its queue).
    let deadline = Instant::now() + WAIT;
    while metric(listen, "zerotrace_spans_total").unwrap_or(0.0) < N as f64 {
        assert!(Instant::now() < deadline, "spans not made");
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(rx.spans().len(), 0, "exported before the flush");
    signal(&child, libc::SIGTERM);
    let detached = programs_gone_within(Duration::from_secs(5));
    let status = wait_timeout(&mut child, Duration::from_secs(10)).expect("no exit after SIGTERM");
    assert!(status.success(), "{status}");
    let detached = detached.expect("programs left after SIGTERM");
    eprintln!("programs detached {detached:?} after SIGTERM");
    // The agent detaches all probes at once right after the signal; the
    // rest is the kernel: closing the last perf event of a syscall
    // tracepoint waits for an RCU-tasks-trace grace period (faultable
    // syscall tracepoints, 6.13+), about 1 s on this 6.18 kernel, and each
    // uprobe (the app's libssl and CPython, about 30 here) is unregistered
    // under one kernel mutex with a grace period of its own: 1–2 s more.
    assert!(
        detached < Duration::from_secs(5),
        "detached after {detached:?}"
    );
    let spans = rx.spans();
    for i in 0..N {
        let path = format!("/queued/{i}");
        assert!(
            spans.iter().any(|s| s.attr_str("url.path") == Some(&path)),
            "{path} not flushed at exit ({} spans)",
            spans.len()
        );
    }
}

#[test]
fn responses_are_byte_identical_with_and_without_the_agent() {
    if !can_trace() {
        return;
    }
    let app = PythonApp::start().unwrap();
    let nginx = Nginx::start(app.port).unwrap();
    let mut paths: Vec<String> = STATIC_FILES.iter().map(|(f, _)| format!("/{f}")).collect();
    paths.extend([
        "/api/users/7?x=1".into(),
        "/api/fail".into(),
        "/missing".into(),
    ]);
    let fetch = || -> Vec<Vec<u8>> {
        paths
            .iter()
            .map(|p| stable(&get_raw(nginx.port, p)))
            .collect()
    };
    let without = fetch();
    let rx = Receiver::start(Protocol::Grpc).unwrap();
    let agent = agent_for(&rx, &[]);
    let with = fetch();
    rx.wait_for(WAIT, "the proxied request's spans", |spans| {
        spans
            .iter()
            .any(|s| s.attr_str("url.path") == Some("/api/users/7"))
    })
    .unwrap();
    agent.stop().unwrap();
    for ((p, a), b) in paths.iter().zip(&without).zip(&with) {
        assert!(a == b, "{p}: the response changed under tracing");
    }
}

#[test]
fn ten_thousand_connections_leave_the_connection_table_bounded() {
    if !can_trace() {
        return;
    }
    let app = PythonApp::start().unwrap();
    let rx = Receiver::start(Protocol::Grpc).unwrap();
    let listen = free_port();
    let agent = agent_for(&rx, &["--listen", &format!("127.0.0.1:{listen}")]);
    let hwm_start = proc_stats(agent.pid()).unwrap().peak_rss_kib;
    const CONNECTIONS: usize = 10_000;
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let port = app.port;
            thread::spawn(move || {
                for _ in 0..CONNECTIONS / 4 {
                    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                    s.write_all(b"GET /c HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                        .unwrap();
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Closed connections leave the table; let the agent drain its buffer.
    let deadline = Instant::now() + WAIT;
    let open = loop {
        let open = metric(listen, "zerotrace_connections_open").unwrap();
        if open < 50.0 || Instant::now() > deadline {
            break open;
        }
        thread::sleep(Duration::from_millis(200));
    };
    let ProcStats {
        rss_kib: rss,
        peak_rss_kib: hwm,
        ..
    } = proc_stats(agent.pid()).unwrap();
    let events = metric(listen, "zerotrace_events_total").unwrap();
    eprintln!(
        "{CONNECTIONS} connections: {open} still open in the table, {events} events, \
         RSS {rss} KiB (peak {hwm} KiB, {hwm_start} KiB before)"
    );
    assert!(open < 50.0, "{open} connections still in the table");
    assert!(
        events >= CONNECTIONS as f64,
        "the connections were not traced"
    );
    assert!(hwm < 256 * 1024, "peak RSS {hwm} KiB");
    agent.stop().unwrap();
}

#[test]
fn a_dead_collector_under_load_costs_bounded_memory_and_export_resumes() {
    if !can_trace() {
        return;
    }
    let app = PythonApp::start().unwrap();
    // The collector's port, with nothing listening for the first minute.
    let collector = free_port();
    let endpoint = format!("http://127.0.0.1:{collector}");
    let listen = free_port();
    const QUEUE: usize = 2048;
    let agent = Agent::run(
        &[
            "--pid",
            &app.pid.to_string(),
            "--listen",
            &format!("127.0.0.1:{listen}"),
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2000"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", &QUEUE.to_string()),
        ],
    )
    .unwrap();
    let (stop, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let workers = load(app.port, 4, &stop, &done);
    let start = Instant::now();
    let mut peak = 0;
    while start.elapsed() < Duration::from_secs(60) {
        thread::sleep(Duration::from_secs(5));
        let rss = proc_stats(agent.pid()).unwrap().rss_kib;
        peak = peak.max(rss);
        eprintln!(
            "{:>3.0} s: {} requests, agent RSS {rss} KiB, dropped {:?}",
            start.elapsed().as_secs_f64(),
            done.load(Ordering::Relaxed),
            metric(listen, "zerotrace_spans_dropped_total")
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let requests = done.load(Ordering::Relaxed);
    // The snapshot behind /metrics is refreshed once a second.
    thread::sleep(Duration::from_millis(1500));
    let value = |name| metric(listen, name).unwrap();
    let made = value("zerotrace_spans_total");
    let exported = value("zerotrace_spans_exported_total");
    let dropped = value("zerotrace_spans_dropped_total");
    let failed = value("zerotrace_export_errors_total");
    let queued = value("zerotrace_export_queue_spans");
    eprintln!(
        "dead collector: {requests} requests, {made} spans made, {exported} exported, \
         {dropped} dropped (queue full), {failed} failed export, {queued} queued; peak RSS {peak} KiB"
    );
    assert!(requests > 1000, "too little load: {requests} requests");
    assert_eq!(exported, 0.0, "exported to a dead collector?");
    // Every span is accounted for: lost (counted) or still queued, give or
    // take the one batch being sent.
    assert!(failed + dropped > 0.0, "losses not counted");
    let unaccounted = made - failed - dropped - queued;
    assert!(
        (0.0..=512.0).contains(&unaccounted),
        "{unaccounted} spans neither lost, queued nor in flight"
    );
    assert!(
        queued <= QUEUE as f64,
        "queue {queued} over its cap {QUEUE}"
    );
    assert!(peak < 256 * 1024, "agent RSS peaked at {peak} KiB");

    // The collector comes back on the same port: export resumes.
    let rx = Receiver::start_on(Protocol::Grpc, collector).unwrap();
    for i in 0..5 {
        get_raw(app.port, &format!("/after/{i}"));
    }
    rx.wait_for(
        Duration::from_secs(60),
        "spans after the collector returned",
        |spans| {
            spans.iter().any(|s| {
                s.attr_str("url.path")
                    .is_some_and(|p| p.starts_with("/after/"))
            })
        },
    )
    .unwrap();
    wait_for_port(listen, Duration::from_secs(1)).unwrap();
    agent.stop().unwrap();
}
