//! The test harness's OTLP receivers, proven with a real exporter: the
//! OpenTelemetry Python SDK (from the venv `cargo xtask setup` installs)
//! exports a SERVER span with a CLIENT child to the in-process receiver over
//! gRPC and HTTP/protobuf, plain and gzip, and to a real rotel collector.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::json;
use zerotrace_tests::{
    can_trace,
    otlp::{Protocol, ReceivedSpan, Receiver, otel_python},
    rotel::Rotel,
    wait_timeout,
};

/// Exports `GET /items/TAG` (SERVER) with a child `SELECT items TAG` (CLIENT,
/// ERROR) for service SERVICE; exits non-zero if any export failed.
const EXPORT: &str = r#"
import sys
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode

protocol, service, tag = sys.argv[1:4]
if protocol == "grpc":
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
else:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

failures = []

class Checked(OTLPSpanExporter):
    def export(self, spans):
        result = super().export(spans)
        if result != SpanExportResult.SUCCESS:
            failures.append(result)
        return result

provider = TracerProvider(resource=Resource.create({"service.name": service}))
provider.add_span_processor(SimpleSpanProcessor(Checked(timeout=10)))
tracer = provider.get_tracer("zerotrace.tests")
with tracer.start_as_current_span(
    f"GET /items/{tag}",
    kind=SpanKind.SERVER,
    attributes={"http.request.method": "GET", "http.response.status_code": 200},
):
    with tracer.start_as_current_span(
        f"SELECT items {tag}",
        kind=SpanKind.CLIENT,
        attributes={
            "db.system.name": "postgresql",
            "db.query.text": "SELECT * FROM items WHERE id = ?",
            "x.ratio": 0.25,
            "x.cached": False,
        },
    ) as child:
        child.set_status(Status(StatusCode.ERROR, "relation does not exist"))
provider.shutdown()
if failures:
    sys.exit(f"export failed: {failures}")
print("exported")
"#;

/// Runs [`EXPORT`] against `endpoint`; `protocol` is "grpc" or "http".
fn export(endpoint: &str, protocol: &str, compression: &str, service: &str, tag: &str) {
    let python = otel_python().unwrap();
    let mut cmd = Command::new(&python);
    cmd.args(["-c", EXPORT, protocol, service, tag])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL");
    // The Python gRPC exporter refuses "none"; unset means no compression.
    match compression {
        "none" => cmd.env_remove("OTEL_EXPORTER_OTLP_COMPRESSION"),
        _ => cmd.env("OTEL_EXPORTER_OTLP_COMPRESSION", compression),
    };
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    let status = wait_timeout(&mut child, Duration::from_secs(60));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "the Python exporter ({protocol}, {compression}) to {endpoint} failed ({status:?}):\n{text}"
    );
}

fn find<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no span {name:?}"))
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn python_sdk_to_receiver(protocol: Protocol, compression: &str) {
    if !can_trace() {
        return;
    }
    let rx = Receiver::start(protocol).unwrap();
    assert!(rx.endpoint().starts_with("http://127.0.0.1:"));
    let (py_protocol, tag) = match protocol {
        Protocol::Grpc => ("grpc", format!("grpc-{compression}")),
        Protocol::HttpProtobuf => ("http", format!("http-{compression}")),
    };
    assert_eq!(
        rx.protocol_name(),
        match protocol {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    );
    let service = format!("receiver-test-{tag}");
    export(&rx.endpoint(), py_protocol, compression, &service, &tag);

    let server_name = format!("GET /items/{tag}");
    let client_name = format!("SELECT items {tag}");
    let spans = rx
        .wait_for(Duration::from_secs(10), "server and client span", |spans| {
            spans.iter().any(|s| s.name == server_name)
                && spans.iter().any(|s| s.name == client_name)
        })
        .unwrap();
    assert_eq!(spans.len(), 2, "{spans:#?}");
    // SimpleSpanProcessor: one export request per span.
    assert_eq!(rx.requests(), 2);
    assert!(rx.errors().is_empty(), "{:?}", rx.errors());

    let server = find(&spans, &server_name);
    let client = find(&spans, &client_name);
    for s in [server, client] {
        assert!(is_hex(&s.trace_id, 32), "{}", s.brief());
        assert!(is_hex(&s.span_id, 16), "{}", s.brief());
        assert_eq!(s.service(), Some(service.as_str()));
        assert_eq!(s.resource["telemetry.sdk.language"], json!("python"));
        assert_eq!(s.scope, "zerotrace.tests");
        assert!(s.start_ns > 1_600_000_000_000_000_000 && s.start_ns <= s.end_ns);
    }
    assert_eq!(server.kind, "SERVER");
    assert_eq!(server.parent_span_id, "");
    assert_eq!(server.status, "UNSET");
    assert_eq!(server.attr_str("http.request.method"), Some("GET"));
    assert_eq!(server.attr_i64("http.response.status_code"), Some(200));

    assert_eq!(client.kind, "CLIENT");
    assert_eq!(client.trace_id, server.trace_id);
    assert_eq!(client.parent_span_id, server.span_id);
    assert_eq!(client.status, "ERROR");
    assert_eq!(client.status_message, "relation does not exist");
    assert_eq!(client.attr_str("db.system.name"), Some("postgresql"));
    assert_eq!(
        client.attr_str("db.query.text"),
        Some("SELECT * FROM items WHERE id = ?")
    );
    assert_eq!(client.attributes["x.ratio"], json!(0.25));
    assert_eq!(client.attributes["x.cached"], json!(false));
    assert_eq!(client.attr_i64("x.ratio"), None);
    assert!(server.start_ns <= client.start_ns && client.end_ns <= server.end_ns);

    // wait_for's failure names what did arrive.
    let err = rx
        .wait_for(Duration::from_millis(100), "a PRODUCER span", |spans| {
            spans.iter().any(|s| s.kind == "PRODUCER")
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no a PRODUCER span") && err.contains(&client_name) && err.contains("ERROR"),
        "{err}"
    );
}

#[test]
fn grpc_receiver_gets_python_sdk_spans() {
    python_sdk_to_receiver(Protocol::Grpc, "none");
}

#[test]
fn grpc_receiver_gets_gzip_python_sdk_spans() {
    python_sdk_to_receiver(Protocol::Grpc, "gzip");
}

#[test]
fn http_receiver_gets_python_sdk_spans() {
    python_sdk_to_receiver(Protocol::HttpProtobuf, "none");
}

#[test]
fn http_receiver_gets_gzip_python_sdk_spans() {
    python_sdk_to_receiver(Protocol::HttpProtobuf, "gzip");
}

/// One raw HTTP/1.1 request; returns the status line.
fn http_request(endpoint: &str, head: &str, body: &[u8]) -> String {
    let addr = endpoint.strip_prefix("http://").unwrap();
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "{head}\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(body).unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.lines().next().unwrap_or("").to_string()
}

#[test]
fn http_receiver_refuses_what_is_not_otlp_protobuf() {
    let rx = Receiver::start(Protocol::HttpProtobuf).unwrap();
    let ep = rx.endpoint();
    let json_post = "POST /v1/traces HTTP/1.1\r\nContent-Type: application/json";
    assert!(http_request(&ep, json_post, b"{}").contains(" 415 "));
    let garbage = "POST /v1/traces HTTP/1.1\r\nContent-Type: application/x-protobuf";
    assert!(http_request(&ep, garbage, b"\xff\xff\xff").contains(" 400 "));
    let wrong_path = "POST /v1/metrics HTTP/1.1\r\nContent-Type: application/x-protobuf";
    assert!(http_request(&ep, wrong_path, b"").contains(" 404 "));
    // An empty request is a valid ExportTraceServiceRequest with no spans.
    assert!(http_request(&ep, garbage, b"").contains(" 200 "));
    assert_eq!(rx.requests(), 1);
    assert!(rx.spans().is_empty());
    assert_eq!(rx.errors().len(), 3, "{:?}", rx.errors());
}

#[test]
fn receivers_stop_when_dropped_even_with_open_connections() {
    for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
        let rx = Receiver::start(protocol).unwrap();
        let addr = rx.endpoint().strip_prefix("http://").unwrap().to_string();
        let idle = TcpStream::connect(&addr).unwrap();
        let started = Instant::now();
        drop(rx);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{protocol:?} receiver took {:?} to stop",
            started.elapsed()
        );
        assert!(
            TcpStream::connect(&addr).is_err(),
            "{protocol:?} receiver still listening on {addr}"
        );
        drop(idle);
    }
}

#[test]
fn rotel_prints_python_sdk_spans() {
    if !can_trace() {
        return;
    }
    let rotel = Rotel::start().unwrap();
    assert!(rotel.grpc_endpoint().starts_with("http://127.0.0.1:"));
    export(
        &rotel.grpc_endpoint(),
        "grpc",
        "none",
        "rotel-test",
        "rotel-grpc",
    );
    let log = rotel
        .wait_for_log(Duration::from_secs(10), "gRPC spans", |log| {
            log.contains("Name           : SELECT items rotel-grpc")
                && log.contains("Name           : GET /items/rotel-grpc")
        })
        .unwrap();
    assert!(log.contains("service.name: Str(rotel-test)"), "{log}");
    assert!(log.contains("STATUS_CODE_ERROR"), "{log}");
    assert!(log.contains("SPAN_KIND_CLIENT"), "{log}");

    export(
        &rotel.http_endpoint(),
        "http",
        "gzip",
        "rotel-test",
        "rotel-http",
    );
    rotel
        .wait_for_log(Duration::from_secs(10), "HTTP spans", |log| {
            log.contains("Name           : GET /items/rotel-http")
        })
        .unwrap();
    let names = rotel.span_names();
    assert!(
        names.iter().any(|n| n == "SELECT items rotel-http"),
        "{names:?}"
    );

    let err = rotel
        .wait_for_log(Duration::from_millis(100), "span nope", |log| {
            log.contains("nope")
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rotel:") && err.contains("GET /items/rotel-http"),
        "{err}"
    );
}
