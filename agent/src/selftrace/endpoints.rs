//! The agent's HTTP endpoints: `/health` (liveness), `/ready` (readiness) and
//! `/metrics` (Prometheus text exposition format 0.0.4).
//!
//! [`serve`] binds the address and answers on a thread of its own with a
//! current-thread tokio runtime, so nothing here runs on, or waits for, the
//! run loop. The run loop only touches [`AgentState`]: an atomic store per
//! [`AgentState::heartbeat`] and a swap of the [`MetricsSnapshot`] under a
//! short lock per [`AgentState::update`]; `/metrics` clones that snapshot and
//! encodes it at scrape time.
//!
//! Clients cannot hold the server up for long: at most [`MAX_CONNECTIONS`] are
//! handled at once (more wait in the listen backlog), each must send its
//! request head within [`HEADER_READ_TIMEOUT`], each connection closes after
//! one response (no keep-alive) and is cut after [`CONNECTION_TIMEOUT`]
//! whatever it is doing, and request bodies are never read.
//!
//! A path that is not one of the three is 404; one of the three with a
//! method other than GET or HEAD is 405 with `Allow: GET, HEAD`.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, MetricEncoder, text::encode_registry,
    },
    metrics::MetricType,
    registry::Registry,
};
use tokio::sync::{Semaphore, oneshot};

/// `/health` fails once the run loop's last heartbeat is older than this.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections handled at once; further ones wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 16;
/// Time a client gets to send its whole request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time after which a connection is closed, whatever state it is in.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The `Content-Type` of the Prometheus text exposition format 0.0.4.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";
/// Read buffer per connection (hyper's minimum); bounds the request head.
const MAX_BUF_SIZE: usize = 8192;

/// What /metrics shows; the run loop replaces it about once a second.
#[derive(Clone, Debug, Default)]
pub struct MetricsSnapshot {
    /// "ringbuf" | "perf".
    pub transport: &'static str,
    /// Records read from the transport since start.
    pub events: u64,
    /// Record bytes read.
    pub bytes: u64,
    /// Events lost (kernel refused + perf-reported).
    pub lost: u64,
    pub spans_produced: u64,
    pub spans_exported: u64,
    /// Dropped because the export queue was full.
    pub spans_dropped: u64,
    /// Spans whose export failed.
    pub export_errors: u64,
    /// Spans waiting in the export queue now.
    pub queue_depth: u64,
    pub connections_open: u64,
    /// TLS plaintext the kernel did not send: no socket to tell / socket
    /// disagreement / calls map full.
    pub tls_dropped: [u64; 3],
    /// Closed encrypted connections whose plaintext was read, and not.
    pub tls_connections: u64,
    pub tls_connections_unread: u64,
    /// Connections the kernel stopped copying because the agent does not
    /// trace what they carry, and the socket calls it skipped for them.
    pub connections_muted: u64,
    pub muted_calls: u64,
    /// Records that came after lost records of their own connection.
    pub stream_holes: u64,
    /// Executable mappings after which a process's maps were read again
    /// for TLS libraries, and those of files judged before (not read).
    pub mapped_looks: [u64; 2],
    /// Per loaded eBPF program.
    pub programs: Vec<ProgramRun>,
}

/// Kernel run-time statistics of one loaded eBPF program (BPF_ENABLE_STATS).
#[derive(Clone, Debug, Default)]
pub struct ProgramRun {
    pub program: String,
    /// tracepoint | kprobe | kretprobe | fentry | fexit.
    pub kind: &'static str,
    pub run_count: u64,
    pub run_time_ns: u64,
}

/// Shared between the run loop and the server thread.
#[derive(Debug)]
pub struct AgentState {
    ready: AtomicBool,
    /// Heartbeats are stored as nanoseconds since this instant; before the
    /// first one, the state's creation counts as the last heartbeat.
    epoch: Instant,
    last_heartbeat_ns: AtomicU64,
    snapshot: Mutex<MetricsSnapshot>,
}

impl Default for AgentState {
    fn default() -> Self {
        AgentState {
            ready: AtomicBool::new(false),
            epoch: Instant::now(),
            last_heartbeat_ns: AtomicU64::new(0),
            snapshot: Mutex::new(MetricsSnapshot::default()),
        }
    }
}

impl AgentState {
    /// Probes attached, exporter started: `/ready` answers 200 from now on.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// The run loop is alive; call it every loop turn (an atomic store).
    ///
    /// Until the first call, the state's creation counts as the last
    /// heartbeat, so a startup that hangs longer than [`HEARTBEAT_TIMEOUT`]
    /// shows as unhealthy too; call it between startup steps that may
    /// legitimately take that long.
    pub fn heartbeat(&self) {
        let ns = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_heartbeat_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// Replaces what `/metrics` shows. Holds the lock only for the swap.
    pub fn update(&self, snapshot: MetricsSnapshot) {
        let old = std::mem::replace(&mut *self.lock_snapshot(), snapshot);
        drop(old);
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Ok while the last heartbeat is at most [`HEARTBEAT_TIMEOUT`] old at
    /// `now`, else why not.
    fn health_at(&self, now: Instant) -> Result<(), String> {
        let beat_ns = self.last_heartbeat_ns.load(Ordering::Relaxed);
        let age = now.saturating_duration_since(self.epoch + Duration::from_nanos(beat_ns));
        if age <= HEARTBEAT_TIMEOUT {
            return Ok(());
        }
        let limit = HEARTBEAT_TIMEOUT.as_secs_f64();
        let age = age.as_secs_f64();
        Err(if beat_ns == 0 {
            format!(
                "run loop not running: no heartbeat in the {age:.1} s since start (limit {limit} s)"
            )
        } else {
            format!("run loop stalled: last heartbeat {age:.1} s ago (limit {limit} s)")
        })
    }

    fn lock_snapshot(&self) -> MutexGuard<'_, MetricsSnapshot> {
        self.snapshot.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The running endpoints server; shuts it down when dropped.
#[derive(Debug)]
pub struct Endpoints {
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Endpoints {
    /// The address actually bound (the port chosen for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for Endpoints {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // The server thread leaves its accept loop at once and dropping its
        // runtime aborts the connections still open, so this is quick.
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::warn!("the endpoints server thread panicked");
        }
    }
}

/// Binds `addr` and serves on a background thread until the handle drops.
pub fn serve(addr: SocketAddr, state: Arc<AgentState>) -> anyhow::Result<Endpoints> {
    serve_with(addr, state, Limits::DEFAULT)
}

#[derive(Clone, Copy, Debug)]
struct Limits {
    max_connections: usize,
    header_read_timeout: Duration,
    connection_timeout: Duration,
}

impl Limits {
    const DEFAULT: Limits = Limits {
        max_connections: MAX_CONNECTIONS,
        header_read_timeout: HEADER_READ_TIMEOUT,
        connection_timeout: CONNECTION_TIMEOUT,
    };
}

fn serve_with(
    addr: SocketAddr,
    state: Arc<AgentState>,
    limits: Limits,
) -> anyhow::Result<Endpoints> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding the /health, /ready, /metrics server to {addr}"))?;
    listener.set_nonblocking(true)?;
    let local_addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel();
    let (started_tx, started) = std::sync::mpsc::sync_channel::<anyhow::Result<()>>(1);
    let thread = thread::Builder::new()
        .name("zt-endpoints".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = started_tx
                        .send(Err(anyhow::Error::from(e).context("building its runtime")));
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = started_tx.send(Err(
                            anyhow::Error::from(e).context("registering its listener")
                        ));
                        return;
                    }
                };
                let _ = started_tx.send(Ok(()));
                accept_loop(listener, state, limits, stopped).await;
            });
        })
        .context("spawning the endpoints server thread")?;
    let endpoints = Endpoints {
        local_addr,
        stop: Some(stop),
        thread: Some(thread),
    };
    started
        .recv()
        .context("the endpoints server thread died while starting")?
        .context("starting the endpoints server")?;
    log::debug!("serving /health, /ready, /metrics on http://{local_addr}");
    Ok(endpoints)
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    state: Arc<AgentState>,
    limits: Limits,
    mut stop: oneshot::Receiver<()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(false)
        .max_buf_size(MAX_BUF_SIZE);
    loop {
        // Take a slot first: while all are busy, new clients wait in the
        // kernel's backlog instead of costing memory here.
        let slot = tokio::select! {
            biased;
            _ = &mut stop => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // never closed
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    log::warn!("endpoints server: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let response = respond(&state, req.method(), req.uri().path(), Instant::now());
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = http.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(limits.connection_timeout, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::debug!("endpoints server: connection from {peer}: {e}"),
                Err(_) => log::debug!(
                    "endpoints server: connection from {peer} cut after {:?}",
                    limits.connection_timeout
                ),
            }
        });
    }
}

/// The answer to `method path` at `now`.
fn respond(state: &AgentState, method: &Method, path: &str, now: Instant) -> Response<Full<Bytes>> {
    if !matches!(path, "/health" | "/ready" | "/metrics") {
        return reply(
            StatusCode::NOT_FOUND,
            TEXT_CONTENT_TYPE,
            format!("not found: {path}"),
        );
    }
    if method != Method::GET && method != Method::HEAD {
        let mut response = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT_CONTENT_TYPE,
            format!("method {method} not allowed: only GET and HEAD"),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/health" => match state.health_at(now) {
            Ok(()) => reply(StatusCode::OK, TEXT_CONTENT_TYPE, "ok".into()),
            Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT_CONTENT_TYPE, why),
        },
        "/ready" if state.is_ready() => reply(StatusCode::OK, TEXT_CONTENT_TYPE, "ready".into()),
        "/ready" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT_CONTENT_TYPE,
            "starting".into(),
        ),
        _ => {
            let snapshot = state.lock_snapshot().clone();
            match render_metrics(snapshot) {
                Ok(text) => reply(StatusCode::OK, METRICS_CONTENT_TYPE, text),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT_CONTENT_TYPE,
                    format!("encoding the metrics failed: {e}"),
                ),
            }
        }
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `snapshot` in the Prometheus text exposition format 0.0.4.
fn render_metrics(snapshot: MetricsSnapshot) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut text = String::with_capacity(4096);
    // Not `encode`: that appends OpenMetrics' "# EOF", which 0.0.4 lacks.
    encode_registry(&mut text, &registry)?;
    Ok(text)
}

/// `name="value"` pairs of one sample.
type Labels<'a> = [(&'a str, &'a str)];

/// Encodes one [`MetricsSnapshot`] when scraped.
///
/// prometheus-client writes OpenMetrics text, where a counter's HELP and TYPE
/// lines name the family (`x`) and its sample gets a `_total` suffix
/// (`x_total`). In format 0.0.4 the HELP and TYPE lines must name the sample
/// itself, or Prometheus sees an untyped `x_total`. So every family here is
/// described under its full sample name, with its real type, and its samples
/// are written as plain `name{labels} value` (the library's gauge sample
/// encoding, which adds no suffix) — the 0.0.4 form for counters and gauges.
#[derive(Debug)]
struct SnapshotCollector(MetricsSnapshot);

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        use MetricType::{Counter, Gauge};
        let s = &self.0;
        let transport = [("transport", s.transport)];
        #[rustfmt::skip]
        let plain: [(&str, &str, MetricType, &Labels, u64); 12] = [
            ("zerotrace_events_total", "Records read from the kernel-to-user transport.", Counter, &transport, s.events),
            ("zerotrace_event_bytes_total", "Bytes of records read from the kernel-to-user transport.", Counter, &transport, s.bytes),
            ("zerotrace_events_lost_total", "Events lost between kernel and agent: failed buffer reserves and perf-reported losses.", Counter, &transport, s.lost),
            ("zerotrace_spans_total", "Spans produced.", Counter, &[], s.spans_produced),
            ("zerotrace_spans_exported_total", "Spans exported.", Counter, &[], s.spans_exported),
            ("zerotrace_spans_dropped_total", "Spans dropped because the export queue was full.", Counter, &[], s.spans_dropped),
            ("zerotrace_export_errors_total", "Spans whose export failed.", Counter, &[], s.export_errors),
            ("zerotrace_export_queue_spans", "Spans waiting in the export queue.", Gauge, &[], s.queue_depth),
            ("zerotrace_connections_open", "Connections being traced.", Gauge, &[], s.connections_open),
            ("zerotrace_connections_muted_total", "Connections the kernel stopped copying: their protocol is unknown, their process is excluded, or they carry the agent's own exports.", Counter, &[], s.connections_muted),
            ("zerotrace_muted_calls_total", "Socket calls of muted connections the kernel did not copy.", Counter, &[], s.muted_calls),
            ("zerotrace_stream_holes_total", "Holes in connections' streams left by lost records: the messages they cut end early or unanswered instead of pairing with later ones.", Counter, &[], s.stream_holes),
        ];
        for (name, help, kind, labels, value) in plain {
            let mut metric = describe(&mut encoder, name, help, kind)?;
            if labels.is_empty() {
                metric.encode_gauge(&value)?; // `name value`, not `name{} value`
            } else {
                metric.encode_family(&labels)?.encode_gauge(&value)?;
            }
        }
        family(
            &mut encoder,
            "zerotrace_tls_plaintext_dropped_total",
            "TLS library calls whose plaintext was not sent: no socket to tell (memory BIOs), the call's and the session's sockets disagreed, or the calls map was full.",
            Counter,
            [
                ("no_socket", s.tls_dropped[0]),
                ("socket_mismatch", s.tls_dropped[1]),
                ("calls_full", s.tls_dropped[2]),
            ]
            .into_iter()
            .map(|(reason, n)| ([("reason", reason)], n)),
        )?;
        family(
            &mut encoder,
            "zerotrace_tls_mapped_files_total",
            "Files processes mapped executable, by whether the agent read the process's maps again to look for a TLS library (skipped for a file it has judged before).",
            Counter,
            [
                ("looked", s.mapped_looks[0]),
                ("skipped", s.mapped_looks[1]),
            ]
            .into_iter()
            .map(|(action, n)| ([("action", action)], n)),
        )?;
        family(
            &mut encoder,
            "zerotrace_tls_connections_total",
            "Closed encrypted connections, by whether their plaintext was read (a TLS library not followed leaves it unread).",
            Counter,
            [
                ("read", s.tls_connections),
                ("unread", s.tls_connections_unread),
            ]
            .into_iter()
            .map(|(plaintext, n)| ([("plaintext", plaintext)], n)),
        )?;

        // One series per (program, kind): a program listed twice is summed,
        // since duplicate series would fail the whole scrape.
        let mut programs: BTreeMap<(&str, &str), (u64, u64)> = BTreeMap::new();
        for p in &s.programs {
            let (runs, ns) = programs.entry((&p.program, p.kind)).or_default();
            *runs = runs.saturating_add(p.run_count);
            *ns = ns.saturating_add(p.run_time_ns);
        }
        if programs.is_empty() {
            // Families without samples are left out, as the Go client does.
            return Ok(());
        }
        fn labels<'a>((program, kind): (&'a str, &'a str)) -> [(&'static str, &'a str); 2] {
            [("program", program), ("kind", kind)]
        }
        family(
            &mut encoder,
            "zerotrace_bpf_program_runs_total",
            "Runs of each loaded eBPF program (kernel BPF stats, counted while BPF_ENABLE_STATS is on).",
            Counter,
            programs
                .iter()
                .map(|(&key, &(runs, _))| (labels(key), runs)),
        )?;
        family(
            &mut encoder,
            "zerotrace_bpf_program_run_seconds_total",
            "Time spent running each loaded eBPF program (kernel BPF stats, counted while BPF_ENABLE_STATS is on).",
            Counter,
            programs
                .iter()
                .map(|(&key, &(_, ns))| (labels(key), ns as f64 / 1e9)),
        )
    }
}

/// The HELP and TYPE lines of `name`.
fn describe<'e>(
    encoder: &'e mut DescriptorEncoder<'_>,
    name: &'e str,
    help: &str,
    kind: MetricType,
) -> Result<MetricEncoder<'e>, std::fmt::Error> {
    // prometheus-client writes HELP text as is; 0.0.4 would need \\ and \n escaped.
    debug_assert!(
        !help.contains(['\\', '\n']),
        "HELP text of {name} needs escaping"
    );
    encoder.encode_descriptor(name, help, None, kind)
}

/// HELP and TYPE for `name`, then one `name{labels} value` line per sample.
fn family<L: EncodeLabelSet, V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, V)>,
) -> std::fmt::Result {
    let mut metric = describe(encoder, name, help, kind)?;
    for (labels, value) in samples {
        metric.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{HashMap, HashSet},
        io::{Read, Write},
        net::{Ipv4Addr, TcpStream},
    };

    use super::*;

    fn localhost() -> SocketAddr {
        (Ipv4Addr::LOCALHOST, 0).into()
    }

    fn start() -> (Arc<AgentState>, Endpoints) {
        let state = Arc::new(AgentState::default());
        let endpoints = serve(localhost(), state.clone()).expect("serve on 127.0.0.1:0");
        (state, endpoints)
    }

    #[derive(Debug)]
    struct Reply {
        status: u16,
        headers: HashMap<String, String>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> &str {
            self.headers.get(name).map_or("", String::as_str)
        }
    }

    /// One request over a fresh connection; the server closes it after the
    /// response, so the reply is everything up to EOF.
    fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"
        )
        .unwrap();
        let mut raw = String::new();
        stream
            .read_to_string(&mut raw)
            .expect("read the reply to EOF");
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .expect("a complete response head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers = lines
            .map(|line| {
                let (name, value) = line.split_once(':').expect("a header line");
                (name.to_ascii_lowercase(), value.trim().to_string())
            })
            .collect();
        Reply {
            status,
            headers,
            body: body.to_string(),
        }
    }

    fn get(addr: SocketAddr, path: &str) -> Reply {
        request(addr, "GET", path)
    }

    #[test]
    fn ready_is_503_starting_until_set_ready() {
        let (state, server) = start();
        let before = get(server.local_addr(), "/ready");
        assert_eq!((before.status, before.body.as_str()), (503, "starting"));
        state.set_ready();
        let after = get(server.local_addr(), "/ready");
        assert_eq!((after.status, after.body.as_str()), (200, "ready"));
        assert_eq!(after.header("content-type"), TEXT_CONTENT_TYPE);
    }

    #[test]
    fn health_is_ok_while_the_heartbeat_is_fresh() {
        let (state, server) = start();
        // Before the first heartbeat, the state's creation counts as one.
        let first = get(server.local_addr(), "/health");
        assert_eq!((first.status, first.body.as_str()), (200, "ok"));
        state.heartbeat();
        let second = get(server.local_addr(), "/health");
        assert_eq!((second.status, second.body.as_str()), (200, "ok"));
    }

    #[test]
    fn health_is_503_with_a_reason_once_the_heartbeat_is_stale() {
        let state = AgentState::default();
        let late = Instant::now() + HEARTBEAT_TIMEOUT + Duration::from_secs(1);
        let never = respond(&state, &Method::GET, "/health", late);
        assert_eq!(never.status(), StatusCode::SERVICE_UNAVAILABLE);
        let why = state.health_at(late).unwrap_err();
        assert!(
            why.contains("no heartbeat") && why.contains("limit 30 s"),
            "{why}"
        );

        state.heartbeat();
        assert_eq!(state.health_at(Instant::now()), Ok(()));
        let why = state
            .health_at(Instant::now() + HEARTBEAT_TIMEOUT * 2)
            .unwrap_err();
        assert!(
            why.starts_with("run loop stalled: last heartbeat 6"),
            "{why}"
        );
    }

    #[test]
    fn unknown_paths_are_404_and_other_methods_405() {
        let (_state, server) = start();
        let addr = server.local_addr();
        for path in ["/", "/nope", "/metrics/", "/healthz"] {
            assert_eq!(get(addr, path).status, 404, "GET {path}");
        }
        assert_eq!(request(addr, "POST", "/nope").status, 404);
        for (method, path) in [
            ("POST", "/metrics"),
            ("PUT", "/ready"),
            ("DELETE", "/health"),
        ] {
            let reply = request(addr, method, path);
            assert_eq!(reply.status, 405, "{method} {path}");
            assert_eq!(reply.header("allow"), "GET, HEAD");
        }
        // HEAD: GET's headers, no body; a query string does not matter.
        let head = request(addr, "HEAD", "/metrics");
        assert_eq!(head.status, 200);
        assert_eq!(head.header("content-type"), METRICS_CONTENT_TYPE);
        assert_eq!(head.body, "");
        assert_eq!(get(addr, "/ready?verbose=1").status, 503);
    }

    fn example_snapshot() -> MetricsSnapshot {
        MetricsSnapshot {
            transport: "ringbuf",
            events: 1001,
            bytes: 1002,
            lost: 1003,
            spans_produced: 1004,
            spans_exported: 1005,
            spans_dropped: 1006,
            export_errors: 1007,
            queue_depth: 1008,
            connections_open: 1009,
            tls_dropped: [1010, 1011, 1012],
            tls_connections: 1013,
            tls_connections_unread: 1014,
            connections_muted: 1015,
            muted_calls: 1016,
            stream_holes: 1017,
            mapped_looks: [1018, 1019],
            programs: vec![
                ProgramRun {
                    program: "sys_exit_read".into(),
                    kind: "tracepoint",
                    run_count: 2001,
                    run_time_ns: 1_500_000_000,
                },
                ProgramRun {
                    program: r#"odd "name" \ here"#.into(),
                    kind: "fentry",
                    run_count: 2002,
                    run_time_ns: 2_500,
                },
                // Listed twice: summed into one series.
                ProgramRun {
                    program: "sys_exit_read".into(),
                    kind: "tracepoint",
                    run_count: 1,
                    run_time_ns: 500_000_000,
                },
            ],
        }
    }

    #[test]
    fn metrics_show_the_updated_snapshot() {
        let (state, server) = start();
        state.update(example_snapshot());
        let reply = get(server.local_addr(), "/metrics");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), METRICS_CONTENT_TYPE);
        let text = &reply.body;
        let samples = check_exposition(text).unwrap_or_else(|e| panic!("{e}\n{text}"));

        let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
            let labels: Vec<(String, String)> = labels
                .iter()
                .map(|&(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let found: Vec<f64> = samples
                .iter()
                .filter(|s| s.name == name && s.labels == labels)
                .map(|s| s.value)
                .collect();
            assert_eq!(found.len(), 1, "{name} {labels:?} in\n{text}");
            found[0]
        };
        let transport = [("transport", "ringbuf")];
        assert_eq!(value("zerotrace_events_total", &transport), 1001.0);
        assert_eq!(value("zerotrace_event_bytes_total", &transport), 1002.0);
        assert_eq!(value("zerotrace_events_lost_total", &transport), 1003.0);
        assert_eq!(value("zerotrace_spans_total", &[]), 1004.0);
        assert_eq!(value("zerotrace_spans_exported_total", &[]), 1005.0);
        assert_eq!(value("zerotrace_spans_dropped_total", &[]), 1006.0);
        assert_eq!(value("zerotrace_export_errors_total", &[]), 1007.0);
        assert_eq!(value("zerotrace_export_queue_spans", &[]), 1008.0);
        assert_eq!(value("zerotrace_connections_open", &[]), 1009.0);
        let reason = |r| [("reason", r)];
        assert_eq!(
            value(
                "zerotrace_tls_plaintext_dropped_total",
                &reason("no_socket")
            ),
            1010.0
        );
        assert_eq!(
            value(
                "zerotrace_tls_plaintext_dropped_total",
                &reason("socket_mismatch")
            ),
            1011.0
        );
        assert_eq!(
            value(
                "zerotrace_tls_plaintext_dropped_total",
                &reason("calls_full")
            ),
            1012.0
        );
        let plaintext = |p| [("plaintext", p)];
        assert_eq!(
            value("zerotrace_tls_connections_total", &plaintext("read")),
            1013.0
        );
        assert_eq!(
            value("zerotrace_tls_connections_total", &plaintext("unread")),
            1014.0
        );

        assert_eq!(value("zerotrace_connections_muted_total", &[]), 1015.0);
        assert_eq!(value("zerotrace_muted_calls_total", &[]), 1016.0);
        assert_eq!(value("zerotrace_stream_holes_total", &[]), 1017.0);
        let action = |a| [("action", a)];
        assert_eq!(
            value("zerotrace_tls_mapped_files_total", &action("looked")),
            1018.0
        );
        assert_eq!(
            value("zerotrace_tls_mapped_files_total", &action("skipped")),
            1019.0
        );

        let read = [("program", "sys_exit_read"), ("kind", "tracepoint")];
        let odd = [("program", r#"odd "name" \ here"#), ("kind", "fentry")];
        assert_eq!(value("zerotrace_bpf_program_runs_total", &read), 2002.0);
        assert_eq!(value("zerotrace_bpf_program_runs_total", &odd), 2002.0);
        assert_eq!(value("zerotrace_bpf_program_run_seconds_total", &read), 2.0);
        assert_eq!(
            value("zerotrace_bpf_program_run_seconds_total", &odd),
            2.5e-6
        );
        // The escaping on the wire, byte for byte.
        assert!(
            text.contains(r#"zerotrace_bpf_program_runs_total{program="odd \"name\" \\ here",kind="fentry"} 2002"#),
            "{text}"
        );
        assert!(!text.contains("nanoseconds"), "{text}");
        assert!(!text.contains("# EOF") && !text.contains("{}"), "{text}");
        assert_eq!(samples.len(), 23, "{text}");

        // A new snapshot replaces the old one.
        state.update(MetricsSnapshot {
            transport: "perf",
            events: 7,
            ..MetricsSnapshot::default()
        });
        let text = get(server.local_addr(), "/metrics").body;
        assert!(
            text.contains("zerotrace_events_total{transport=\"perf\"} 7\n"),
            "{text}"
        );
        assert!(!text.contains("ringbuf"), "{text}");
    }

    #[test]
    fn every_snapshot_renders_a_valid_exposition() {
        let empty = render_metrics(MetricsSnapshot::default()).unwrap();
        let samples = check_exposition(&empty).unwrap_or_else(|e| panic!("{e}\n{empty}"));
        assert_eq!(samples.len(), 19, "{empty}");
        assert!(
            !empty.contains("bpf_program"),
            "no programs, no program families:\n{empty}"
        );

        let mut odd = example_snapshot();
        odd.programs.push(ProgramRun {
            program: "new\nline, {braces}=\"x\"\\".into(),
            kind: "kretprobe",
            run_count: u64::MAX,
            run_time_ns: u64::MAX,
        });
        let text = render_metrics(odd).unwrap();
        let samples = check_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let odd: Vec<&Sample> = samples
            .iter()
            .filter(|s| {
                s.labels
                    .first()
                    .is_some_and(|(_, v)| v == "new\nline, {braces}=\"x\"\\")
            })
            .collect();
        assert_eq!(odd.len(), 2, "{text}");
        assert_eq!(odd[0].value, u64::MAX as f64);
        assert_eq!(odd[1].value, u64::MAX as f64 / 1e9);
    }

    #[test]
    fn a_stalled_client_only_delays_others_until_its_header_timeout() {
        let limits = Limits {
            max_connections: 1,
            header_read_timeout: Duration::from_millis(200),
            connection_timeout: Duration::from_secs(5),
        };
        let state = Arc::new(AgentState::default());
        let server = serve_with(localhost(), state, limits).unwrap();
        // Takes the only slot and sends half a request head, then nothing.
        let mut stalled = TcpStream::connect(server.local_addr()).unwrap();
        stalled
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x")
            .unwrap();
        let started = Instant::now();
        let reply = get(server.local_addr(), "/health");
        assert_eq!(reply.status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        // The stalled connection was closed (hyper answers 408 or just closes).
        stalled
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        let _ = stalled.read_to_end(&mut rest);
        let rest = String::from_utf8_lossy(&rest);
        assert!(
            rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
            "{rest}"
        );
    }

    #[test]
    fn dropping_the_handle_stops_the_server_and_frees_the_port() {
        let (_state, server) = start();
        let addr = server.local_addr();
        assert_eq!(get(addr, "/health").status, 200);
        drop(server);
        assert!(
            TcpStream::connect(addr).is_err(),
            "still listening on {addr}"
        );
        // The port can be bound again at once.
        let again = serve(addr, Arc::new(AgentState::default())).expect("rebind");
        assert_eq!(get(again.local_addr(), "/health").status, 200);
    }

    #[test]
    fn a_busy_address_is_an_error() {
        let (_state, server) = start();
        let err = serve(server.local_addr(), Arc::new(AgentState::default())).unwrap_err();
        assert!(format!("{err:#}").contains("binding"), "{err:#}");
    }

    /// One parsed sample line.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: Vec<(String, String)>,
        value: f64,
    }

    /// Checks `text` against the text exposition format 0.0.4 as Prometheus
    /// reads it, and our naming rules; returns the samples.
    ///
    /// Every line ends in '\n'; `# HELP name text` and `# TYPE name
    /// counter|gauge` come once per name, before its first sample; a family's
    /// samples are contiguous; counters end in `_total` and gauges do not;
    /// each sample is `name{label="value",…} value` with `\\`, `\"` and `\n`
    /// the only escapes.
    fn check_exposition(text: &str) -> Result<Vec<Sample>, String> {
        if !text.ends_with('\n') {
            return Err("the text does not end in a newline".into());
        }
        let mut helps = HashSet::new();
        let mut types = HashMap::new();
        let mut done = HashSet::new(); // families whose samples are over
        let mut current: Option<String> = None;
        let mut samples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let at = |what: &str| format!("line {}: {what}: {line:?}", i + 1);
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest
                    .split_once(' ')
                    .ok_or_else(|| at("HELP without text"))?;
                check_metric_name(name).map_err(|e| at(&e))?;
                if help.is_empty() || !helps.insert(name.to_string()) {
                    return Err(at("empty or repeated HELP"));
                }
                if done.contains(name) || current.as_deref() == Some(name) {
                    return Err(at("HELP after samples"));
                }
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest
                    .split_once(' ')
                    .ok_or_else(|| at("TYPE without type"))?;
                check_metric_name(name).map_err(|e| at(&e))?;
                match kind {
                    "counter" if !name.ends_with("_total") => {
                        return Err(at("counter not named *_total"));
                    }
                    "gauge" if name.ends_with("_total") => return Err(at("gauge named *_total")),
                    "counter" | "gauge" => {}
                    _ => return Err(at("unexpected type")),
                }
                if types.insert(name.to_string(), kind).is_some() {
                    return Err(at("repeated TYPE"));
                }
                if done.contains(name) || current.as_deref() == Some(name) {
                    return Err(at("TYPE after samples"));
                }
            } else if line.starts_with('#') {
                return Err(at("a comment other than HELP or TYPE"));
            } else {
                let sample = parse_sample(line).map_err(|e| at(&e))?;
                if !helps.contains(&sample.name) || !types.contains_key(sample.name.as_str()) {
                    return Err(at("sample without HELP and TYPE before it"));
                }
                if current.as_deref() != Some(sample.name.as_str()) {
                    if done.contains(&sample.name) {
                        return Err(at("family's samples are not contiguous"));
                    }
                    if let Some(previous) = current.replace(sample.name.clone()) {
                        done.insert(previous);
                    }
                }
                let series: Vec<&str> = sample.labels.iter().map(|(k, _)| k.as_str()).collect();
                if series.iter().collect::<HashSet<_>>().len() != series.len() {
                    return Err(at("repeated label name"));
                }
                samples.push(sample);
            }
        }
        Ok(samples)
    }

    fn check_metric_name(name: &str) -> Result<(), String> {
        let mut chars = name.chars();
        let ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        if ok {
            Ok(())
        } else {
            Err(format!("bad metric name {name:?}"))
        }
    }

    fn parse_sample(line: &str) -> Result<Sample, String> {
        let name_end = line.find(['{', ' ']).ok_or("no value")?;
        let name = &line[..name_end];
        check_metric_name(name)?;
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(mut inner) = rest.strip_prefix('{') {
            loop {
                if let Some(after) = inner.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let (key, after) = inner.split_once("=\"").ok_or("label without =\"")?;
                let mut k = key.chars();
                let key_ok = k
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && k.all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !key_ok {
                    return Err(format!("bad label name {key:?}"));
                }
                let mut value = String::new();
                let mut chars = after.char_indices();
                let end = loop {
                    match chars.next().ok_or("unterminated label value")? {
                        (i, '"') => break i,
                        (_, '\\') => match chars.next().ok_or("dangling backslash")?.1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            other => return Err(format!("bad escape \\{other}")),
                        },
                        (_, c) => value.push(c),
                    }
                };
                labels.push((key.to_string(), value));
                inner = &after[end + 1..];
                if let Some(after) = inner.strip_prefix(',') {
                    inner = after;
                    if inner.starts_with('}') {
                        return Err("trailing comma in labels".into());
                    }
                } else if !inner.starts_with('}') {
                    return Err("labels not separated by ','".into());
                }
            }
        }
        let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v if !v.is_empty()
                && v.bytes()
                    .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b)) =>
            {
                v.parse().map_err(|e| format!("bad value {v:?}: {e}"))?
            }
            v => return Err(format!("bad value {v:?}")),
        };
        Ok(Sample {
            name: name.to_string(),
            labels,
            value,
        })
    }
}
