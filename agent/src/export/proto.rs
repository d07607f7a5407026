//! OTLP protobuf written straight from a batch of spans.
//!
//! Converting each span into opentelemetry-proto's message types first
//! (a `String` per attribute key and value, a `Vec` per id, the process's
//! resource rebuilt per batch) and then encoding them cost about 2.4 µs
//! per span, the largest single part of the agent's work per request. Here
//! each span is written once, field by field, in the order and form prost
//! gives the same message (a test holds the two byte for byte); its
//! attributes were written when the span was made
//! ([`Attributes`](super::Attributes)) and are copied as they are; a
//! process's resource is encoded once and shared by all its spans.
//!
//! Message layout (opentelemetry/proto/collector/trace/v1, trace/v1,
//! common/v1): ExportTraceServiceRequest { resource_spans = 1 };
//! ResourceSpans { resource = 1, scope_spans = 2, schema_url = 3 };
//! ScopeSpans { scope = 1, spans = 2, schema_url = 3 }; Span { trace_id =
//! 1, span_id = 2, trace_state = 3, parent_span_id = 4, name = 5, kind = 6,
//! start = 7, end = 8, attributes = 9, dropped_attributes_count = 10,
//! events = 11, dropped_events_count = 12, links = 13, dropped_links_count =
//! 14, status = 15, flags = 16 }; KeyValue { key = 1, value = 2 };
//! AnyValue { string = 1, bool = 2, int = 3, double = 4, … }; Status {
//! message = 2, code = 3 }.

use std::{
    ops::Deref,
    sync::{Arc, OnceLock},
    time::{SystemTime, UNIX_EPOCH},
};

use opentelemetry::{
    InstrumentationScope, Value,
    trace::{SpanId, SpanKind, Status, TraceState},
};
use opentelemetry_proto::{
    tonic::{
        common::v1::{AnyValue, InstrumentationScope as ProtoScope},
        resource::v1::Resource as ProtoResource,
        trace::v1::span,
    },
    transform::common::tonic::ResourceAttributesWithSchema,
};
use opentelemetry_sdk::Resource;
use prost::{
    Message,
    encoding::{WireType, encoded_len_varint},
};

use super::{ExportSpan, SpanRecord};

/// The resource of one process (or of the agent), shared by its spans,
/// with its OTLP encoding made the first time a batch needs it.
#[derive(Debug)]
pub struct ProcessResource {
    resource: Resource,
    proto: OnceLock<Box<[u8]>>,
}

impl ProcessResource {
    pub fn new(resource: Resource) -> Arc<Self> {
        Arc::new(Self {
            resource,
            proto: OnceLock::new(),
        })
    }

    /// The encoded `Resource` message.
    fn proto(&self) -> &[u8] {
        self.proto.get_or_init(|| {
            let attributes = ResourceAttributesWithSchema::from(&self.resource).attributes;
            ProtoResource {
                attributes: attributes.0,
                dropped_attributes_count: 0,
                entity_refs: Vec::new(),
            }
            .encode_to_vec()
            .into()
        })
    }
}

impl Deref for ProcessResource {
    type Target = Resource;

    fn deref(&self) -> &Resource {
        &self.resource
    }
}

/// Reused between batches: a batch's encoding allocates little once it
/// has grown.
#[derive(Default)]
pub struct Encoder {
    /// Each span's message length and times, in the order they go out:
    /// every enclosing message needs its length before its fields.
    spans: Vec<(usize, Times)>,
}

/// The spans of one resource, by scope, in order of first appearance.
struct Group<'a> {
    resource: &'a ProcessResource,
    scopes: Vec<(&'static InstrumentationScope, Vec<&'a SpanRecord>)>,
}

impl Encoder {
    /// Writes the ExportTraceServiceRequest of `batch` into `out` (cleared
    /// first).
    pub fn request(&mut self, batch: &[ExportSpan], out: &mut Vec<u8>) {
        out.clear();
        self.append_request(batch, out);
    }

    /// Appends the ExportTraceServiceRequest of `batch` to `out`: a
    /// ResourceSpans per process, a ScopeSpans per scope in it, spans in
    /// batch order within each. Every length is worked out first (a span's
    /// is a sum, its attributes being encoded already), so each span is
    /// written once, in place.
    pub fn append_request(&mut self, batch: &[ExportSpan], out: &mut Vec<u8>) {
        let mut groups: Vec<Group<'_>> = Vec::new();
        for s in batch {
            let resource = &*s.resource;
            let scope = s.span.scope;
            let group = match groups
                .iter_mut()
                .position(|g| std::ptr::eq(g.resource, resource))
            {
                Some(i) => &mut groups[i],
                None => {
                    groups.push(Group {
                        resource,
                        scopes: Vec::new(),
                    });
                    groups.last_mut().expect("just pushed")
                }
            };
            match group
                .scopes
                .iter_mut()
                .find(|(sc, _)| std::ptr::eq(*sc, scope) || *sc == scope)
            {
                Some((_, spans)) => spans.push(&s.span),
                None => group.scopes.push((scope, vec![&s.span])),
            }
        }
        self.spans.clear();
        for g in &groups {
            for (_, spans) in &g.scopes {
                self.spans.extend(spans.iter().map(|s| {
                    let times = Times::of(s);
                    (span_len(s, times), times)
                }));
            }
        }
        let mut scopes = Vec::new();
        let mut at = 0;
        for g in &groups {
            scopes.clear();
            for (scope, spans) in &g.scopes {
                let proto = ProtoScope::from((*scope, None)).encode_to_vec();
                let schema = scope.schema_url().unwrap_or_default();
                let these = &self.spans[at..at + spans.len()];
                at += spans.len();
                let spans_len: usize = these.iter().map(|&(len, _)| field_len(len)).sum();
                let len = field_len(proto.len()) + spans_len + string_field_len(schema);
                scopes.push((proto, schema, len, spans, these));
            }
            let resource = g.resource.proto();
            let schema = g.resource.schema_url().unwrap_or_default();
            let len = field_len(resource.len())
                + scopes.iter().map(|s| field_len(s.2)).sum::<usize>()
                + string_field_len(schema);
            out.reserve(field_len(len));
            // ExportTraceServiceRequest.resource_spans
            length_delimited(1, len, out);
            message(1, resource, out);
            for (proto, scope_schema, len, spans, lens) in &scopes {
                length_delimited(2, *len, out);
                message(1, proto, out);
                for (span, &(span_len, times)) in spans.iter().zip(lens.iter()) {
                    length_delimited(2, span_len, out);
                    let start = out.len();
                    span_fields(span, times, out);
                    debug_assert_eq!(out.len() - start, span_len, "span_len disagrees");
                }
                string(3, scope_schema, out);
            }
            string(3, schema, out);
        }
    }
}

fn kind(kind: &SpanKind) -> span::SpanKind {
    match kind {
        SpanKind::Internal => span::SpanKind::Internal,
        SpanKind::Server => span::SpanKind::Server,
        SpanKind::Client => span::SpanKind::Client,
        SpanKind::Producer => span::SpanKind::Producer,
        SpanKind::Consumer => span::SpanKind::Consumer,
    }
}

fn status(status: &Status) -> (u64, &str) {
    match status {
        Status::Unset => (0, ""),
        Status::Ok => (1, ""),
        Status::Error { description } => (2, description.as_ref()),
    }
}

fn status_len(s: &Status) -> usize {
    let (code, text) = status(s);
    string_field_len(text) + varint_field_len(code)
}

/// A span's start and end in nanoseconds since the epoch, worked out once
/// for its length and its fields.
#[derive(Clone, Copy)]
struct Times {
    start: u64,
    end: u64,
}

impl Times {
    fn of(s: &SpanRecord) -> Self {
        Self {
            start: nanos(s.start_time),
            end: nanos(s.end_time),
        }
    }
}

/// The length of what [`span_fields`] writes.
fn span_len(s: &SpanRecord, times: Times) -> usize {
    let ctx = &s.span_context;
    let mut len = field_len(16) + field_len(8);
    if *ctx.trace_state() != TraceState::NONE {
        len += string_field_len(&ctx.trace_state().header());
    }
    if s.parent_span_id != SpanId::INVALID {
        len += field_len(8);
    }
    len += string_field_len(&s.name);
    len += varint_field_len(kind(&s.span_kind) as u64);
    len += fixed64_field_len(times.start) + fixed64_field_len(times.end);
    len += s.attributes.encoded().len();
    len += field_len(status_len(&s.status));
    // flags: a two-byte key (field 16) and four bytes.
    len + 6
}

/// A Span message's fields. The agent's spans carry no events and no
/// links, and drop no attributes: fields 10–14 stay out, as prost leaves
/// out a zero or empty field.
fn span_fields(s: &SpanRecord, times: Times, out: &mut Vec<u8>) {
    let ctx = &s.span_context;
    bytes(1, &ctx.trace_id().to_bytes(), out);
    bytes(2, &ctx.span_id().to_bytes(), out);
    // `header()` builds a String; nearly every span has no trace state.
    if *ctx.trace_state() != TraceState::NONE {
        string(3, &ctx.trace_state().header(), out);
    }
    if s.parent_span_id != SpanId::INVALID {
        bytes(4, &s.parent_span_id.to_bytes(), out);
    }
    string(5, &s.name, out);
    varint(6, kind(&s.span_kind) as u64, out);
    fixed64(7, times.start, out);
    fixed64(8, times.end, out);
    // Field 9, encoded when the attributes were set.
    out.extend_from_slice(s.attributes.encoded());
    // Status, always present.
    let (code, text) = status(&s.status);
    length_delimited(15, status_len(&s.status), out);
    string(2, text, out);
    varint(3, code, out);
    // flags: the sampled bit, and "has is-remote" with "is remote".
    let mut flags = u32::from(ctx.trace_flags().to_u8()) | 0x100;
    if s.parent_span_is_remote {
        flags |= 0x200;
    }
    encode_key(16, WireType::ThirtyTwoBit, out);
    out.extend_from_slice(&flags.to_le_bytes());
}

/// AnyValue's length for the values written by hand (its oneof is
/// written even when empty or zero); `None` for arrays.
fn any_len(value: &Value) -> Option<usize> {
    Some(match value {
        Value::String(s) => field_len(s.as_str().len()),
        Value::Bool(_) => 2,
        Value::I64(n) => 1 + encoded_len_varint(*n as u64),
        Value::F64(_) => 9,
        _ => return None,
    })
}

/// An attribute: a KeyValue message as field `tag`, its value's length
/// worked out once.
pub(super) fn key_value(tag: u32, key: &str, value: &Value, out: &mut Vec<u8>) {
    let Some(any_len) = any_len(value) else {
        let any = AnyValue::from(value.clone()).encode_to_vec();
        length_delimited(tag, string_field_len(key) + field_len(any.len()), out);
        string(1, key, out);
        message(2, &any, out);
        return;
    };
    length_delimited(tag, string_field_len(key) + field_len(any_len), out);
    string(1, key, out);
    length_delimited(2, any_len, out);
    match value {
        Value::String(s) => message(1, s.as_str().as_bytes(), out),
        Value::Bool(b) => {
            encode_key(2, WireType::Varint, out);
            encode_varint(u64::from(*b), out);
        }
        Value::I64(n) => {
            encode_key(3, WireType::Varint, out);
            encode_varint(*n as u64, out);
        }
        Value::F64(x) => {
            encode_key(4, WireType::SixtyFourBit, out);
            out.extend_from_slice(&x.to_le_bytes());
        }
        _ => unreachable!("any_len is None for every other value"),
    }
}

/// A string attribute as field `tag`: the fast path of [`key_value`].
#[inline(always)]
pub(super) fn string_key_value(tag: u32, key: &str, value: &[u8], out: &mut Vec<u8>) {
    string_key_value_head(tag, key, value.len(), out);
    out.extend_from_slice(value);
}

/// A string attribute as field `tag`, up to its value's bytes (`len` of
/// them), which the caller appends. Inlined, so that a constant key's
/// length and bytes are known where it is written.
#[inline(always)]
pub(super) fn string_key_value_head(tag: u32, key: &str, len: usize, out: &mut Vec<u8>) {
    // AnyValue.string_value is written even when empty (it is a oneof).
    let any_len = field_len(len);
    key_value_head(
        tag,
        key,
        field_len(any_len) - len,
        len,
        out,
        #[inline(always)]
        |head| {
            head.length_delimited(2, any_len);
            head.length_delimited(1, len);
        },
    );
}

/// An integer attribute as field `tag`.
#[inline(always)]
pub(super) fn int_key_value(tag: u32, key: &str, value: i64, out: &mut Vec<u8>) {
    let any_len = 1 + encoded_len_varint(value as u64);
    key_value_head(
        tag,
        key,
        field_len(any_len),
        0,
        out,
        #[inline(always)]
        |head| {
            head.length_delimited(2, any_len);
            head.key(3, WireType::Varint);
            head.varint(value as u64);
        },
    );
}

/// A KeyValue message as field `tag`: its key, then `value_head_len`
/// bytes that `value_head` writes, then `rest` bytes the caller appends.
///
/// Everything before the rest is written straight into room reserved past
/// the end, the length then set to what was written. Inlined, a constant
/// key's bytes are a copy of a known size (a few moves), where a copy of a
/// size known only at run time was a `memcpy` call apiece. The head was
/// once put together on the stack and copied out as one block: reading
/// back those fresh byte-wise stores as 16-byte words stalled on every
/// load, which made the heads a tenth of the agent's time at nginx
/// saturation.
#[inline(always)]
fn key_value_head(
    tag: u32,
    key: &str,
    value_head_len: usize,
    rest: usize,
    out: &mut Vec<u8>,
    value_head: impl FnOnce(&mut Head),
) {
    let kv_len = string_field_len(key) + value_head_len + rest;
    // The outer key and length, the key's key and length: at most 1 + 5 + 1 + 5.
    if key.len() + 12 + value_head_len > HEAD_BYTES {
        return long_key_value_head(tag, key, kv_len, out, value_head);
    }
    let mut head = Head::at_end(out, rest);
    head.length_delimited(tag, kv_len);
    if !key.is_empty() {
        head.length_delimited(1, key.len());
        head.extend(key.as_bytes());
    }
    let before = head.len;
    value_head(&mut head);
    debug_assert_eq!(
        head.len - before,
        value_head_len,
        "{key}: value head length"
    );
    head.commit(out);
}

/// [`key_value_head`] for a key too long for [`HEAD_BYTES`].
#[cold]
fn long_key_value_head(
    tag: u32,
    key: &str,
    kv_len: usize,
    out: &mut Vec<u8>,
    value_head: impl FnOnce(&mut Head),
) {
    length_delimited(tag, kv_len, out);
    string(1, key, out);
    let mut head = Head::at_end(out, 0);
    value_head(&mut head);
    head.commit(out);
}

/// The most bytes of an attribute before its value written through a
/// [`Head`]; the longest key written this way is that less 12 and its
/// value's head (at most 12).
const HEAD_BYTES: usize = 96;

/// Fields' keys and lengths (and a short key), written into a Vec's spare
/// capacity, [`HEAD_BYTES`] of which it reserves.
struct Head {
    /// The Vec's end when the head was started.
    at: *mut u8,
    len: usize,
}

impl Head {
    /// Starts a head at `out`'s end, with room for it and `rest` bytes
    /// after it; `out` must not change until [`Head::commit`].
    #[inline(always)]
    fn at_end(out: &mut Vec<u8>, rest: usize) -> Self {
        out.reserve(HEAD_BYTES + rest);
        Self {
            // SAFETY: `len` is within the allocation (at most its end).
            at: unsafe { out.as_mut_ptr().add(out.len()) },
            len: 0,
        }
    }

    /// Makes the bytes written part of `out`.
    #[inline(always)]
    fn commit(self, out: &mut Vec<u8>) {
        // SAFETY: the `self.len` bytes after the old end were written, and
        // are within the capacity reserved (asserted in `put`).
        unsafe { out.set_len(out.len() + self.len) };
    }

    #[inline(always)]
    fn put(&mut self, byte: u8) {
        assert!(self.len < HEAD_BYTES);
        // SAFETY: within the HEAD_BYTES of spare capacity (asserted).
        unsafe { self.at.add(self.len).write(byte) };
        self.len += 1;
    }

    #[inline(always)]
    fn extend(&mut self, bytes: &[u8]) {
        assert!(self.len + bytes.len() <= HEAD_BYTES);
        // SAFETY: within the spare capacity (asserted); a Vec's spare
        // capacity never overlaps a borrowed slice.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.at.add(self.len), bytes.len());
        }
        self.len += bytes.len();
    }

    /// At most 10 bytes.
    #[inline(always)]
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.put((v as u8) | 0x80);
            v >>= 7;
        }
        self.put(v as u8);
    }

    /// A field's key, for tags under 16 (one byte).
    #[inline(always)]
    fn key(&mut self, tag: u32, wire_type: WireType) {
        debug_assert!(tag < 16);
        self.put((tag << 3 | wire_type as u32) as u8);
    }

    #[inline(always)]
    fn length_delimited(&mut self, tag: u32, len: usize) {
        self.key(tag, WireType::LengthDelimited);
        self.varint(len as u64);
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The encoded length of a length-delimited field of `len` bytes whose tag
/// is under 16 (one key byte).
fn field_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

/// A varint field's length (tag under 16), none when zero.
fn varint_field_len(v: u64) -> usize {
    if v == 0 { 0 } else { 1 + encoded_len_varint(v) }
}

/// A fixed64 field's length, none when zero.
fn fixed64_field_len(v: u64) -> usize {
    if v == 0 { 0 } else { 9 }
}

/// A string field's length, none when empty (proto3 leaves it out).
fn string_field_len(s: &str) -> usize {
    if s.is_empty() { 0 } else { field_len(s.len()) }
}

/// A varint, pushed byte by byte into the Vec: prost's `encode_varint`
/// goes through `BufMut::put_u8`, a one-byte `extend_from_slice` per byte,
/// which was a tenth of the encoder's time.
#[inline]
fn encode_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A field's key (tag and wire type).
#[inline]
fn encode_key(tag: u32, wire_type: WireType, out: &mut Vec<u8>) {
    encode_varint(u64::from(tag << 3 | wire_type as u32), out);
}

fn length_delimited(tag: u32, len: usize, out: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(len as u64, out);
}

fn message(tag: u32, body: &[u8], out: &mut Vec<u8>) {
    length_delimited(tag, body.len(), out);
    out.extend_from_slice(body);
}

fn bytes(tag: u32, b: &[u8], out: &mut Vec<u8>) {
    if !b.is_empty() {
        message(tag, b, out);
    }
}

fn string(tag: u32, s: &str, out: &mut Vec<u8>) {
    bytes(tag, s.as_bytes(), out);
}

fn varint(tag: u32, v: u64, out: &mut Vec<u8>) {
    if v != 0 {
        encode_key(tag, WireType::Varint, out);
        encode_varint(v, out);
    }
}

fn fixed64(tag: u32, v: u64, out: &mut Vec<u8>) {
    if v != 0 {
        encode_key(tag, WireType::SixtyFourBit, out);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
pub(super) mod tests;
