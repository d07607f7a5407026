//! An in-process OTLP trace receiver for end-to-end tests: the agent exports
//! to it (gRPC or HTTP/protobuf) and the test asserts on the spans it got.
//!
//! Each [`Receiver`] listens on its own 127.0.0.1 port, served by its own
//! thread and single-threaded tokio runtime, and stops when dropped.
//!
//! ```no_run
//! use std::time::Duration;
//! use zerotrace_tests::otlp::{Protocol, Receiver};
//!
//! let rx = Receiver::start(Protocol::Grpc)?;
//! // run the agent with OTEL_EXPORTER_OTLP_ENDPOINT=rx.endpoint()
//! //                 and OTEL_EXPORTER_OTLP_PROTOCOL=rx.protocol_name() …
//! let spans = rx.wait_for(Duration::from_secs(10), "a GET server span", |spans| {
//!     spans.iter().any(|s| s.kind == "SERVER" && s.name.starts_with("GET"))
//! })?;
//! # Ok::<(), anyhow::Error>(())
//! ```

use std::{
    collections::BTreeMap,
    convert::Infallible,
    fmt::Write as _,
    io::Read,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value},
};
use prost::Message;
use serde_json::Value;
use tokio::sync::oneshot;

mod counting;

use counting::{CountingTraceService, SpanCount};

/// The OTLP transport a [`Receiver`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `opentelemetry.proto.collector.trace.v1.TraceService/Export` over HTTP/2.
    Grpc,
    /// `POST /v1/traces`, `Content-Type: application/x-protobuf`.
    HttpProtobuf,
}

impl Protocol {
    /// The value for `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// One span as received, flattened with its resource and scope.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// 32 lower-case hex digits.
    pub trace_id: String,
    /// 16 lower-case hex digits.
    pub span_id: String,
    /// "" for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// "SERVER" | "CLIENT" | "INTERNAL" | "PRODUCER" | "CONSUMER" | "UNSPECIFIED".
    pub kind: &'static str,
    pub start_ns: u64,
    pub end_ns: u64,
    /// "UNSET" | "OK" | "ERROR".
    pub status: &'static str,
    pub status_message: String,
    /// String, int, double and bool values as JSON; arrays and key-value
    /// lists as JSON arrays and objects; bytes as a hex string.
    pub attributes: BTreeMap<String, Value>,
    pub resource: BTreeMap<String, Value>,
    /// Instrumentation scope name.
    pub scope: String,
}

impl ReceivedSpan {
    /// A string attribute.
    pub fn attr_str(&self, key: &str) -> Option<&str> {
        self.attributes.get(key)?.as_str()
    }

    /// An integer attribute.
    pub fn attr_i64(&self, key: &str) -> Option<i64> {
        self.attributes.get(key)?.as_i64()
    }

    /// The resource's `service.name`.
    pub fn service(&self) -> Option<&str> {
        self.resource.get("service.name")?.as_str()
    }

    /// One line for assertion messages:
    /// `svc SERVER "GET /x" trace=… span=… parent=… ERROR(msg) {attrs}`.
    pub fn brief(&self) -> String {
        let mut s = format!(
            "{} {} {:?} trace={} span={} parent={} {}",
            self.service().unwrap_or("?"),
            self.kind,
            self.name,
            self.trace_id,
            self.span_id,
            if self.parent_span_id.is_empty() {
                "-"
            } else {
                &self.parent_span_id
            },
            self.status,
        );
        if !self.status_message.is_empty() {
            let _ = write!(s, "({:?})", self.status_message);
        }
        let attrs: Vec<String> = self
            .attributes
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = write!(s, " {{{}}}", attrs.join(", "));
        s
    }
}

#[derive(Default)]
struct State {
    spans: Vec<ReceivedSpan>,
    /// Spans received, kept or not.
    span_count: usize,
    /// Count spans without keeping them (long benchmark runs).
    count_only: bool,
    requests: usize,
    /// What the first requests carried besides spans.
    request_log: Vec<RequestSeen>,
    errors: Vec<String>,
}

/// The headers (gRPC metadata) of one export request and how many
/// resources (processes) its spans came from.
#[derive(Debug, Clone)]
pub struct RequestSeen {
    pub headers: hyper::HeaderMap,
    pub resources: usize,
}

/// Requests logged in [`Receiver::request_log`]; later ones are counted only.
const REQUEST_LOG: usize = 256;

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<State>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a request and logs its headers and resources (the first ones).
    fn seen(&self, headers: hyper::HeaderMap, resources: usize) -> MutexGuard<'_, State> {
        let mut state = self.lock();
        state.requests += 1;
        if state.request_log.len() < REQUEST_LOG {
            state.request_log.push(RequestSeen { headers, resources });
        }
        state
    }

    fn record(&self, headers: hyper::HeaderMap, request: ExportTraceServiceRequest) {
        let mut state = self.seen(headers, request.resource_spans.len());
        let spans = flatten(request);
        state.span_count += spans.len();
        state.spans.extend(spans);
    }

    /// A request of a count-only receiver.
    fn count(&self, headers: hyper::HeaderMap, request: &SpanCount) {
        let mut state = self.seen(headers, request.resource_spans.len());
        state.span_count += request.spans();
    }

    fn error(&self, what: String) {
        eprintln!("  otlp receiver: {what}");
        self.lock().errors.push(what);
    }
}

/// An OTLP trace receiver on 127.0.0.1; stops when dropped.
pub struct Receiver {
    protocol: Protocol,
    addr: SocketAddr,
    state: Shared,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Receiver {
    /// Binds 127.0.0.1:0 and serves `protocol` on a thread of its own.
    pub fn start(protocol: Protocol) -> anyhow::Result<Receiver> {
        Self::start_on(protocol, 0)
    }

    /// Like [`Receiver::start`], counting spans without keeping them, for
    /// runs that export millions ([`Receiver::span_count`]).
    pub fn start_counting(protocol: Protocol) -> anyhow::Result<Receiver> {
        Self::start_with(protocol, 0, true)
    }

    /// Like [`Receiver::start`] on a chosen port (a collector coming back).
    pub fn start_on(protocol: Protocol, port: u16) -> anyhow::Result<Receiver> {
        Self::start_with(protocol, port, false)
    }

    fn start_with(protocol: Protocol, port: u16, count_only: bool) -> anyhow::Result<Receiver> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("binding the OTLP receiver to 127.0.0.1:{port}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Shared::default();
        state.lock().count_only = count_only;
        let (shutdown, stop) = oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sink = state.clone();
        let thread = thread::Builder::new()
            .name(format!("otlp-{}-{}", protocol.name(), addr.port()))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.into()));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    match protocol {
                        Protocol::Grpc if count_only => {
                            let service = CountingTraceService(sink.clone());
                            serve_grpc(listener, service, sink, stop).await
                        }
                        Protocol::Grpc => {
                            let service = TraceServiceServer::new(GrpcSink(sink.clone()))
                                .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                                .max_decoding_message_size(64 << 20);
                            serve_grpc(listener, service, sink, stop).await
                        }
                        Protocol::HttpProtobuf => serve_http(listener, sink, stop).await,
                    }
                });
                // Dropping the runtime aborts connections still open.
            })
            .context("spawning the OTLP receiver thread")?;
        ready_rx
            .recv()
            .context("the OTLP receiver thread died while starting")?
            .context("starting the OTLP receiver's runtime")?;
        Ok(Receiver {
            protocol,
            addr,
            state,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// e.g. "http://127.0.0.1:PORT" — the value for OTEL_EXPORTER_OTLP_ENDPOINT.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// "grpc" or "http/protobuf" — the value for OTEL_EXPORTER_OTLP_PROTOCOL.
    pub fn protocol_name(&self) -> &'static str {
        self.protocol.name()
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.state.lock().spans.clone()
    }

    /// Number of spans received, kept or not.
    pub fn span_count(&self) -> usize {
        self.state.lock().span_count
    }

    /// Number of export requests received (and decoded).
    pub fn requests(&self) -> usize {
        self.state.lock().requests
    }

    /// Headers and resource counts of the first export requests.
    pub fn request_log(&self) -> Vec<RequestSeen> {
        self.state.lock().request_log.clone()
    }

    /// Requests that were refused (bad path, content type, encoding, body).
    pub fn errors(&self) -> Vec<String> {
        self.state.lock().errors.clone()
    }

    /// Waits until `pred` holds for the received spans (polling), or fails
    /// with a message listing brief descriptions of what was received.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> anyhow::Result<Vec<ReceivedSpan>> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let state = self.state.lock();
                if pred(&state.spans) {
                    return Ok(state.spans.clone());
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let state = self.state.lock();
        let mut msg = format!(
            "no {what} at the OTLP {} receiver {} within {timeout:?}; received {} spans in {} requests",
            self.protocol.name(),
            self.endpoint(),
            state.spans.len(),
            state.requests,
        );
        const SHOWN: usize = 60;
        let skip = state.spans.len().saturating_sub(SHOWN);
        if skip > 0 {
            let _ = write!(msg, " (first {skip} left out)");
        }
        for span in &state.spans[skip..] {
            let _ = write!(msg, "\n  {}", span.brief());
        }
        for error in &state.errors {
            let _ = write!(msg, "\n  refused: {error}");
        }
        bail!(msg)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How long open connections get to finish after the receiver is dropped.
const GRACE: Duration = Duration::from_millis(500);

struct GrpcSink(Shared);

#[tonic::async_trait]
impl TraceService for GrpcSink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers = request.metadata().clone().into_headers();
        self.0.record(headers, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn serve_grpc<S>(
    listener: tokio::net::TcpListener,
    service: S,
    sink: Shared,
    stop: oneshot::Receiver<()>,
) where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<tonic::body::Body>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
            Error = Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    // TCP_NODELAY as collectors set it: with Nagle, the small frames the
    // server writes back (window updates, the response) wait for the
    // client's delayed ACK, and large requests crawl.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let (grace_tx, grace_rx) = oneshot::channel::<()>();
    let signal = async move {
        let _ = stop.await;
        let _ = grace_tx.send(());
    };
    let server =
        tonic::transport::Server::builder().serve_with_incoming_shutdown(service, incoming, signal);
    tokio::select! {
        result = server => {
            if let Err(e) = result {
                sink.error(format!("gRPC server failed: {e}"));
            }
        }
        // A client that keeps its connection open must not hold up the drop.
        _ = async {
            let _ = grace_rx.await;
            tokio::time::sleep(GRACE).await;
        } => {}
    }
}

async fn serve_http(
    listener: tokio::net::TcpListener,
    sink: Shared,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let stream = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    stream
                }
                Err(e) => {
                    sink.error(format!("accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let sink = sink.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let sink = sink.clone();
                async move { Ok::<_, Infallible>(handle_http(req, &sink).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
    drop(listener);
    tokio::time::sleep(Duration::from_millis(50)).await;
}

async fn handle_http(req: Request<Incoming>, sink: &Shared) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, why: String| {
        sink.error(format!("HTTP {status}: {why}"));
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Full::new(Bytes::from(why)))
            .expect("static response parts")
    };
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let headers = req.headers().clone();
    if path != "/v1/traces" {
        return reply(StatusCode::NOT_FOUND, format!("{method} {path}: not found"));
    }
    if method != Method::POST {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} {path}: only POST"),
        );
    }
    let header_str = |name| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase()
    };
    let content_type = header_str(header::CONTENT_TYPE);
    let encoding = header_str(header::CONTENT_ENCODING);
    if content_type.split(';').next().unwrap_or("").trim() != "application/x-protobuf" {
        return reply(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content-type {content_type:?}: only application/x-protobuf"),
        );
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return reply(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
    };
    let body = match encoding.as_str() {
        "" | "identity" => body.to_vec(),
        "gzip" => {
            let mut out = Vec::new();
            if let Err(e) = flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut out) {
                return reply(StatusCode::BAD_REQUEST, format!("bad gzip body: {e}"));
            }
            out
        }
        other => {
            return reply(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("content-encoding {other:?}: only gzip"),
            );
        }
    };
    let decoded = if sink.lock().count_only {
        SpanCount::decode(&body[..]).map(|count| sink.count(headers, &count))
    } else {
        ExportTraceServiceRequest::decode(&body[..]).map(|request| sink.record(headers, request))
    };
    match decoded {
        Ok(()) => Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(Bytes::from(
                ExportTraceServiceResponse::default().encode_to_vec(),
            )))
            .expect("static response parts"),
        Err(e) => reply(
            StatusCode::BAD_REQUEST,
            format!(
                "not an ExportTraceServiceRequest ({} bytes): {e}",
                body.len()
            ),
        ),
    }
}

fn flatten(request: ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for rs in request.resource_spans {
        let resource = rs
            .resource
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            let scope = ss.scope.map(|s| s.name).unwrap_or_default();
            for span in ss.spans {
                let (status, status_message) = match span.status {
                    Some(s) => (status_name(s.code), s.message),
                    None => ("UNSET", String::new()),
                };
                out.push(ReceivedSpan {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name,
                    kind: kind_name(span.kind),
                    start_ns: span.start_time_unix_nano,
                    end_ns: span.end_time_unix_nano,
                    status,
                    status_message,
                    attributes: attributes(&span.attributes),
                    resource: resource.clone(),
                    scope: scope.clone(),
                });
            }
        }
    }
    out
}

fn kind_name(kind: i32) -> &'static str {
    match kind {
        1 => "INTERNAL",
        2 => "SERVER",
        3 => "CLIENT",
        4 => "PRODUCER",
        5 => "CONSUMER",
        _ => "UNSPECIFIED",
    }
}

fn status_name(code: i32) -> &'static str {
    match code {
        1 => "OK",
        2 => "ERROR",
        _ => "UNSET",
    }
}

/// Lower-case hex; "" for an empty (absent) id, as for a root's parent.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, Value> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), any_value(kv.value.as_ref())))
        .collect()
}

fn any_value(value: Option<&AnyValue>) -> Value {
    use any_value::Value as V;
    match value.and_then(|v| v.value.as_ref()) {
        None | Some(V::StringValueStrindex(_)) => Value::Null,
        Some(V::StringValue(s)) => Value::from(s.as_str()),
        Some(V::BoolValue(b)) => Value::from(*b),
        Some(V::IntValue(i)) => Value::from(*i),
        // NaN and infinities have no JSON form: null.
        Some(V::DoubleValue(d)) => Value::from(*d),
        Some(V::BytesValue(b)) => Value::from(hex(b)),
        Some(V::ArrayValue(a)) => a.values.iter().map(|v| any_value(Some(v))).collect(),
        Some(V::KvlistValue(kv)) => Value::Object(attributes(&kv.values).into_iter().collect()),
    }
}

/// Where `cargo xtask setup` puts the Python virtual environment with the
/// OpenTelemetry SDK, its OTLP exporters (gRPC, HTTP) and rotel:
/// `$ZEROTRACE_VENV` (set by `cargo xtask test`), else
/// `$HOME/.cache/zerotrace/venv-otel`. Fails, naming the fix, when it is missing.
pub fn otel_venv() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("ZEROTRACE_VENV") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => std::env::var_os("HOME")
            .map(PathBuf::from)
            .context("neither ZEROTRACE_VENV nor HOME is set")?
            .join(".cache/zerotrace/venv-otel"),
    };
    if !dir.join("bin/python").is_file() {
        bail!(
            "{}/bin/python is missing: run `cargo xtask setup` (it installs the \
             OpenTelemetry Python SDK, its OTLP exporters and rotel there)",
            dir.display()
        );
    }
    Ok(dir)
}

/// The Python interpreter of [`otel_venv`].
pub fn otel_python() -> anyhow::Result<PathBuf> {
    Ok(otel_venv()?.join("bin/python"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::{
        common::v1::{ArrayValue, InstrumentationScope},
        resource::v1::Resource,
        trace::v1::{ResourceSpans, ScopeSpans, Span, Status},
    };

    fn kv(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    #[test]
    fn flattens_spans_with_resource_and_scope() {
        use any_value::Value as V;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", V::StringValue("svc".into()))],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "zerotrace".into(),
                        ..Default::default()
                    }),
                    spans: vec![Span {
                        trace_id: vec![0xab; 16],
                        span_id: vec![1, 2, 3, 4, 5, 6, 7, 8],
                        name: "GET /".into(),
                        kind: 2,
                        start_time_unix_nano: 5,
                        end_time_unix_nano: 9,
                        attributes: vec![
                            kv("s", V::StringValue("x".into())),
                            kv("i", V::IntValue(-3)),
                            kv("d", V::DoubleValue(0.5)),
                            kv("b", V::BoolValue(true)),
                            kv("raw", V::BytesValue(vec![0, 255])),
                            kv(
                                "a",
                                V::ArrayValue(ArrayValue {
                                    values: vec![AnyValue {
                                        value: Some(V::IntValue(1)),
                                    }],
                                }),
                            ),
                        ],
                        status: Some(Status {
                            message: "boom".into(),
                            code: 2,
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let spans = flatten(request);
        assert_eq!(spans.len(), 1);
        let s = &spans[0];
        assert_eq!(s.trace_id, "ab".repeat(16));
        assert_eq!(s.span_id, "0102030405060708");
        assert_eq!(s.parent_span_id, "");
        assert_eq!(
            (s.kind, s.status, s.status_message.as_str()),
            ("SERVER", "ERROR", "boom")
        );
        assert_eq!((s.start_ns, s.end_ns), (5, 9));
        assert_eq!(s.service(), Some("svc"));
        assert_eq!(s.scope, "zerotrace");
        assert_eq!(s.attr_str("s"), Some("x"));
        assert_eq!(s.attr_i64("i"), Some(-3));
        assert_eq!(s.attributes["d"], serde_json::json!(0.5));
        assert_eq!(s.attributes["b"], serde_json::json!(true));
        assert_eq!(s.attributes["raw"], serde_json::json!("00ff"));
        assert_eq!(s.attributes["a"], serde_json::json!([1]));
        assert!(s.brief().contains("svc SERVER \"GET /\""), "{}", s.brief());
    }
}
