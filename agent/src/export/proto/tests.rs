use std::{borrow::Cow, time::Duration};

use opentelemetry::{
    Array, KeyValue, StringValue,
    trace::{SpanContext, TraceFlags, TraceId, TraceState},
};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

use super::*;
use crate::export::otlp_request;

fn resource(service: &str) -> Arc<ProcessResource> {
    ProcessResource::new(
        Resource::builder_empty()
            .with_attributes([
                KeyValue::new("service.name", service.to_owned()),
                KeyValue::new("process.pid", 4242_i64),
                KeyValue::new("host.name", "node-1"),
            ])
            .build(),
    )
}

fn span(n: u8, scope: &InstrumentationScope) -> SpanData {
    SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes([n; 16]),
            SpanId::from_bytes([n; 8]),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: SpanKind::Server,
        name: Cow::Owned(format!("GET /items/{{id}} {n}")),
        start_time: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
        end_time: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_223_456_789),
        attributes: vec![
            KeyValue::new("http.request.method", "GET"),
            KeyValue::new("http.response.status_code", 200_i64),
            KeyValue::new("url.path", "/items/7"),
            KeyValue::new("x.empty", ""),
        ],
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: scope.clone(),
    }
}

/// Spans of every shape the agent makes, across two processes and two
/// scopes, interleaved.
pub(in crate::export) fn batch() -> Vec<ExportSpan> {
    let traced = InstrumentationScope::builder("zerotrace")
        .with_version("0.1.0")
        .build();
    let own = InstrumentationScope::builder("zerotrace.self")
        .with_version("0.1.0")
        .with_schema_url("https://opentelemetry.io/schemas/1.37.0")
        .with_attributes([KeyValue::new("a", 1_i64)])
        .build();
    let (app, db) = (resource("app"), resource("db"));
    let mut spans = Vec::new();
    for n in 0..6u8 {
        let mut s = span(n + 1, if n == 4 { &own } else { &traced });
        match n {
            1 => {
                s.parent_span_id = SpanId::from_bytes([9; 8]);
                s.parent_span_is_remote = true;
                s.span_context = SpanContext::new(
                    TraceId::from_bytes([2; 16]),
                    SpanId::from_bytes([2; 8]),
                    TraceFlags::SAMPLED,
                    false,
                    TraceState::from_key_value([("vendor", "x:1"), ("other", "y")]).unwrap(),
                );
                s.status = Status::error("connection reset");
                s.span_kind = SpanKind::Client;
            }
            2 => {
                s.status = Status::Ok;
                s.span_kind = SpanKind::Internal;
                s.attributes.extend([
                    KeyValue::new("db.flag", true),
                    KeyValue::new("ratio", 0.25),
                    KeyValue::new("negative", -3_i64),
                    KeyValue::new(
                        "list",
                        Value::Array(Array::String(vec![StringValue::from("a"), "b".into()])),
                    ),
                ]);
            }
            3 => s.status = Status::error(""),
            5 => s.name = Cow::Borrowed(""),
            _ => {}
        }
        let resource = if n % 2 == 0 { &app } else { &db };
        spans.push(ExportSpan {
            resource: Arc::clone(resource),
            span: SpanRecord::from_span_data(s),
        });
    }
    spans
}

#[test]
fn the_request_is_what_prost_writes_for_the_converted_spans() {
    let spans = batch();
    let mut out = Vec::new();
    Encoder::default().request(&spans, &mut out);
    assert_eq!(out, otlp_request(spans).encode_to_vec());
}

#[test]
fn buffers_are_reused_and_an_empty_batch_is_an_empty_request() {
    let mut encoder = Encoder::default();
    let mut out = vec![1, 2, 3];
    encoder.request(&[], &mut out);
    assert!(out.is_empty());
    let spans = batch();
    encoder.request(&spans, &mut out);
    let first = out.clone();
    encoder.request(&spans, &mut out);
    assert_eq!(out, first);
    let decoded =
        opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(
            &out[..],
        )
        .unwrap();
    assert_eq!(decoded.resource_spans.len(), 2);
    let spans: usize = decoded
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len())
        .sum();
    assert_eq!(spans, 6);
}

#[test]
fn a_request_appended_after_a_prefix_is_the_same_request() {
    let spans = batch();
    let mut whole = Vec::new();
    let mut encoder = Encoder::default();
    encoder.request(&spans, &mut whole);
    let mut framed = vec![9; 5];
    encoder.append_request(&spans, &mut framed);
    assert_eq!(framed[..5], [9; 5]);
    assert_eq!(framed[5..], whole[..]);
}
