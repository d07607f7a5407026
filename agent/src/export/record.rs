//! The span record: what the tracer and the agent's own telemetry make,
//! and what every sink reads.
//!
//! A span's attributes are written as OTLP protobuf the moment they are
//! set ([`Attributes`]): the key and the value go straight from the
//! parser's bytes into one buffer, which the OTLP encoder copies as it is.
//! Building the SDK's `SpanData` instead meant a `KeyValue` per attribute
//! (about 900 bytes a span), reference counts taken on the tracer's thread
//! and dropped on the exporter's, and every value read again to encode it.
//! The console and jsonl sinks, which are not on the hot path, decode the
//! attributes back ([`SpanRecord::to_span_data`]).

use std::{
    borrow::Cow,
    cell::RefCell,
    fmt,
    sync::{Arc, Mutex, OnceLock},
    time::SystemTime,
};

use opentelemetry::{
    Array, InstrumentationScope, KeyValue, StringValue, Value,
    trace::{SpanContext, SpanId, SpanKind, Status},
};
use opentelemetry_proto::tonic::common::v1::{
    KeyValue as ProtoKeyValue, any_value::Value as ProtoValue,
};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use prost::Message;

use super::proto::{self, ProcessResource};

/// A finished span with the resource of the process it describes.
#[derive(Debug, Clone)]
pub struct ExportSpan {
    pub resource: Arc<ProcessResource>,
    pub span: SpanRecord,
}

/// A finished span: `SpanData`'s fields that the agent sets, with the
/// attributes already encoded.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub span_context: SpanContext,
    pub parent_span_id: SpanId,
    pub parent_span_is_remote: bool,
    pub span_kind: SpanKind,
    /// Borrowed when it is a constant (an HTTP method, a DB system).
    pub name: Cow<'static, str>,
    pub start_time: SystemTime,
    pub end_time: SystemTime,
    pub attributes: Attributes,
    pub status: Status,
    /// The agent's scopes are made once per process; spans only point at
    /// them (the encoder groups spans by scope).
    pub scope: &'static InstrumentationScope,
}

/// One of the agent's scopes, named `name` and made the first time
/// `cell` is asked for it: every span points at it.
pub fn agent_scope(
    cell: &'static OnceLock<InstrumentationScope>,
    name: &'static str,
) -> &'static InstrumentationScope {
    cell.get_or_init(|| {
        InstrumentationScope::builder(name)
            .with_version(env!("CARGO_PKG_VERSION"))
            .build()
    })
}

impl SpanRecord {
    /// The same span as the SDK's type, for the sinks that use
    /// opentelemetry-proto's conversions and for tests.
    pub fn to_span_data(&self) -> SpanData {
        SpanData {
            span_context: self.span_context.clone(),
            parent_span_id: self.parent_span_id,
            parent_span_is_remote: self.parent_span_is_remote,
            span_kind: self.span_kind.clone(),
            name: self.name.clone(),
            start_time: self.start_time,
            end_time: self.end_time,
            attributes: self.attributes.iter().collect(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: self.status.clone(),
            instrumentation_scope: self.scope.clone(),
        }
    }

    /// The record of an SDK span (tests): its scope is leaked to be
    /// `'static`; its events and links are not kept.
    #[cfg(test)]
    pub fn from_span_data(data: SpanData) -> Self {
        Self {
            span_context: data.span_context,
            parent_span_id: data.parent_span_id,
            parent_span_is_remote: data.parent_span_is_remote,
            span_kind: data.span_kind,
            name: data.name,
            start_time: data.start_time,
            end_time: data.end_time,
            attributes: data.attributes.into_iter().collect(),
            status: data.status,
            scope: Box::leak(Box::new(data.instrumentation_scope)),
        }
    }
}

/// A span's attributes as the repeated `attributes` field (9) of an OTLP
/// `Span` message: each `KeyValue` message written, tag and length
/// included, as it is set.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    encoded: Vec<u8>,
}

/// `Span.attributes`.
const FIELD: u32 = 9;

/// Attribute buffers the exporter is done with, for the next spans.
///
/// Spans are made on the pipeline's thread and freed on the exporter's, so
/// every span's buffer was a fresh allocation from an arena the other
/// thread kept filling: malloc's per-thread caches never served it, and
/// the allocation cost more than writing the attributes. The exporter
/// hands the buffers back a batch at a time ([`Attributes::recycle`]), the
/// tracer takes them all at once when its own stock runs out: one lock per
/// batch on either side.
struct Returned(Mutex<Vec<Vec<u8>>>);

/// At most this many buffers wait to be reused (about a MiB).
const RETURNED_MAX: usize = 1024;

/// A buffer grown past this many bytes is freed, not reused.
const REUSED_MAX_BYTES: usize = 4096;

impl Returned {
    const fn new() -> Self {
        Self(Mutex::new(Vec::new()))
    }

    /// Keeps the buffers of `done`, emptied, up to [`RETURNED_MAX`]; the
    /// rest, and any grown past [`REUSED_MAX_BYTES`], are freed.
    fn give(&self, done: impl Iterator<Item = Attributes>) {
        let Ok(mut returned) = self.0.lock() else {
            return;
        };
        for Attributes { mut encoded } in done {
            if returned.len() >= RETURNED_MAX {
                break;
            }
            if encoded.capacity() <= REUSED_MAX_BYTES {
                encoded.clear();
                returned.push(encoded);
            }
        }
    }

    /// Moves every kept buffer into `taken` (empty), unless the exporter
    /// is giving some back right now.
    fn take_all(&self, taken: &mut Vec<Vec<u8>>) {
        if let Ok(mut returned) = self.0.try_lock() {
            std::mem::swap(taken, &mut *returned);
        }
    }
}

static RETURNED: Returned = Returned::new();

thread_local! {
    /// The buffers this thread took from [`RETURNED`].
    static TAKEN: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

impl Attributes {
    /// Room for `bytes` of encoded attributes, so that a span's are
    /// written into one allocation: a buffer the exporter handed back
    /// when there is one.
    pub fn with_capacity(bytes: usize) -> Self {
        let reused = TAKEN.with_borrow_mut(|taken| {
            if taken.is_empty() {
                RETURNED.take_all(taken);
            }
            taken.pop()
        });
        let encoded = match reused {
            Some(buffer) if buffer.capacity() >= bytes => buffer,
            _ => Vec::with_capacity(bytes),
        };
        Self { encoded }
    }

    /// Hands the buffers of spans that went out back for the next ones.
    pub fn recycle(done: impl Iterator<Item = Attributes>) {
        RETURNED.give(done);
    }

    #[inline(always)]
    pub fn str(&mut self, key: &str, value: &str) {
        proto::string_key_value(FIELD, key, value.as_bytes(), &mut self.encoded);
    }

    /// A string value of exactly `len` bytes that `write` appends (UTF-8),
    /// for values assembled from parts, without building them first.
    #[inline]
    pub fn str_from_parts(&mut self, key: &str, len: usize, write: impl FnOnce(&mut Vec<u8>)) {
        let out = &mut self.encoded;
        proto::string_key_value_head(FIELD, key, len, out);
        let start = out.len();
        write(out);
        debug_assert_eq!(out.len() - start, len, "{key}: the length given is wrong");
    }

    #[inline(always)]
    pub fn int(&mut self, key: &str, value: i64) {
        proto::int_key_value(FIELD, key, value, &mut self.encoded);
    }

    pub fn bool(&mut self, key: &str, value: bool) {
        proto::key_value(FIELD, key, &Value::Bool(value), &mut self.encoded);
    }

    /// Any value, as the SDK types it.
    pub fn value(&mut self, key: &str, value: &Value) {
        match value {
            Value::String(s) => self.str(key, s.as_str()),
            Value::I64(n) => self.int(key, *n),
            other => proto::key_value(FIELD, key, other, &mut self.encoded),
        }
    }

    /// The `KeyValue` fields as they go on the wire.
    pub fn encoded(&self) -> &[u8] {
        &self.encoded
    }

    pub fn is_empty(&self) -> bool {
        self.encoded.is_empty()
    }

    /// The attributes decoded, in the order they were set. Not for the
    /// hot path: every call decodes them.
    pub fn iter(&self) -> impl Iterator<Item = KeyValue> + '_ {
        let mut rest = &self.encoded[..];
        std::iter::from_fn(move || {
            // Each entry: the field's key byte, the message's length, the
            // message; written by this type only, so well formed.
            let (_, after_key) = rest.split_first()?;
            let mut cursor = after_key;
            let len = prost::encoding::decode_varint(&mut cursor).ok()? as usize;
            let (message, after) = cursor.split_at_checked(len)?;
            rest = after;
            let kv = ProtoKeyValue::decode(message).ok()?;
            Some(KeyValue::new(kv.key, from_proto(kv.value?.value?)))
        })
    }

    /// The value set for `key` (the first, should it be set twice).
    pub fn get(&self, key: &str) -> Option<Value> {
        self.iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value)
    }
}

impl fmt::Debug for Attributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.iter().map(|kv| (kv.key, kv.value)))
            .finish()
    }
}

impl FromIterator<KeyValue> for Attributes {
    fn from_iter<I: IntoIterator<Item = KeyValue>>(iter: I) -> Self {
        let mut attributes = Self::default();
        for kv in iter {
            attributes.value(kv.key.as_str(), &kv.value);
        }
        attributes
    }
}

/// An encoded value back as the SDK's; the agent writes strings, integers,
/// booleans, doubles and arrays of them.
fn from_proto(value: ProtoValue) -> Value {
    match value {
        ProtoValue::StringValue(s) => Value::from(s),
        ProtoValue::BoolValue(b) => Value::Bool(b),
        ProtoValue::IntValue(n) => Value::I64(n),
        ProtoValue::DoubleValue(x) => Value::F64(x),
        ProtoValue::ArrayValue(array) => {
            let values = array.values.into_iter().filter_map(|v| v.value);
            let items: Vec<Value> = values.map(from_proto).collect();
            Value::Array(match items.first() {
                Some(Value::Bool(_)) => Array::Bool(items.iter().filter_map(as_bool).collect()),
                Some(Value::I64(_)) => Array::I64(items.iter().filter_map(as_i64).collect()),
                Some(Value::F64(_)) => Array::F64(items.iter().filter_map(as_f64).collect()),
                _ => Array::String(
                    items
                        .into_iter()
                        .map(|v| StringValue::from(v.to_string()))
                        .collect(),
                ),
            })
        }
        ProtoValue::BytesValue(b) => Value::from(String::from_utf8_lossy(&b).into_owned()),
        other => Value::from(format!("{other:?}")),
    }
}

fn as_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        _ => None,
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::I64(n) => Some(*n),
        _ => None,
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F64(x) => Some(*x),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::AnyValue;

    use super::*;

    /// What prost writes for the attribute as field 9 of a Span.
    fn prost_field(key: &str, value: Value) -> Vec<u8> {
        let kv = ProtoKeyValue {
            key: key.to_owned(),
            value: Some(AnyValue::from(value)),
            ..Default::default()
        };
        let mut out = Vec::new();
        prost::encoding::message::encode(FIELD, &kv, &mut out);
        out
    }

    #[test]
    fn returned_buffers_come_back_emptied_bounded_and_not_grown() {
        let returned = Returned::new();
        let written = |capacity: usize| {
            let mut a = Attributes {
                encoded: Vec::with_capacity(capacity),
            };
            a.str("k", "v");
            a
        };
        let mut a = written(64);
        let first = a.encoded.as_ptr();
        a.int("n", 1);
        returned.give([a, written(REUSED_MAX_BYTES + 1)].into_iter());
        let mut taken = Vec::new();
        returned.take_all(&mut taken);
        // The grown one was freed; the other is back, empty.
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].as_ptr(), first);
        assert!(taken[0].is_empty());
        let mut again = Vec::new();
        returned.take_all(&mut again);
        assert!(again.is_empty(), "taken twice");
        returned.give((0..RETURNED_MAX + 10).map(|_| written(64)));
        returned.take_all(&mut again);
        assert_eq!(again.len(), RETURNED_MAX);
    }

    #[test]
    fn attributes_are_written_as_prost_writes_them_and_read_back() {
        let long_key = "k".repeat(200);
        let long_text = "v\u{e9}".repeat(5000);
        let mut values = vec![
            Value::from(""),
            Value::from("x"),
            Value::from(long_text.clone()),
            Value::I64(0),
            Value::I64(1),
            Value::I64(-1),
            Value::I64(i64::MIN),
            Value::I64(i64::MAX),
            Value::I64(1 << 35),
            Value::Bool(true),
            Value::Bool(false),
            Value::F64(0.25),
            Value::Array(Array::String(vec!["a".into(), "".into()])),
            Value::Array(Array::I64(vec![3, -4])),
        ];
        values.push(Value::Array(Array::Bool(vec![true])));
        for key in ["", "url.path", long_key.as_str()] {
            let mut all = Attributes::default();
            let mut want = Vec::new();
            for value in &values {
                let mut one = Attributes::default();
                match value {
                    Value::String(s) => one.str(key, s.as_str()),
                    Value::I64(n) => one.int(key, *n),
                    Value::Bool(b) => one.bool(key, *b),
                    other => one.value(key, other),
                }
                let expected = prost_field(key, value.clone());
                assert_eq!(one.encoded(), expected, "{key:?} = {value:?}");
                all.value(key, value);
                want.extend(expected);
            }
            // Written in parts, the same bytes.
            let mut parts = Attributes::default();
            parts.str_from_parts(key, long_text.len(), |out| {
                out.extend_from_slice(long_text.as_bytes());
            });
            assert_eq!(
                parts.encoded(),
                prost_field(key, Value::from(long_text.clone()))
            );
            assert_eq!(all.encoded(), want);
            let back: Vec<KeyValue> = all.iter().collect();
            let expected: Vec<KeyValue> = values
                .iter()
                .map(|v| KeyValue::new(key.to_owned(), v.clone()))
                .collect();
            assert_eq!(back, expected);
        }
        let mut a = Attributes::with_capacity(8);
        a.str("http.route", "/users/{id}");
        a.int("server.port", 8080);
        assert_eq!(a.get("server.port"), Some(Value::I64(8080)));
        assert_eq!(a.get("http.route"), Some(Value::from("/users/{id}")));
        assert_eq!(a.get("missing"), None);
        assert!(Attributes::default().iter().next().is_none());
    }
}
