//! Server spans that ended before their client end was seen.
//!
//! The two ends of a local connection are two processes' records, and the
//! client's write is stamped when its syscall returns: a client preempted
//! right after waking its server can have its write delivered after the
//! server read, answered and finished. A server span that found no parent
//! is therefore not exported at once: it is held for a short while, and a
//! client end that shows up in that while becomes its parent
//! ([`super::link`] still matches them). Spans whose client end never
//! shows up (it is on another host, or not traced) leave as roots.

use std::collections::VecDeque;

use opentelemetry::trace::{SpanContext, SpanId, TraceId};

use super::link::LinkKey;
use crate::export::ExportSpan;

/// How long a finished root server span waits for its client end (kernel
/// time, ns): preemption between a write's wake-up and its return, with
/// room for a busy reader.
pub const HOLD_NS: u64 = 100_000_000;
/// Most spans held; past it the oldest leaves at once.
const MAX_HELD: usize = 8192;

/// A finished server span waiting for its client end.
pub struct HeldSpan {
    pub key: LinkKey,
    pub conn_id: u64,
    pub seq: u64,
    until_ns: u64,
    pub span: ExportSpan,
}

/// Held spans, oldest first.
#[derive(Default)]
pub struct Held {
    spans: VecDeque<HeldSpan>,
}

impl Held {
    /// Holds `span`, which ended at `end_ns`; the oldest held span if
    /// there was no room for both.
    pub fn hold(
        &mut self,
        key: LinkKey,
        conn_id: u64,
        seq: u64,
        end_ns: u64,
        span: ExportSpan,
    ) -> Option<HeldSpan> {
        let evicted = if self.spans.len() >= MAX_HELD {
            self.spans.pop_front()
        } else {
            None
        };
        self.spans.push_back(HeldSpan {
            key,
            conn_id,
            seq,
            until_ns: end_ns.saturating_add(HOLD_NS),
            span,
        });
        evicted
    }

    /// The held span of request `seq` on connection `conn_id`.
    pub fn take(&mut self, conn_id: u64, seq: u64) -> Option<ExportSpan> {
        // Newest first: a late client end comes soon after its server.
        let i = self
            .spans
            .iter()
            .rposition(|h| h.conn_id == conn_id && h.seq == seq)?;
        self.spans.remove(i).map(|h| h.span)
    }

    /// The next span whose wait is over at `now_ns` (all of them when
    /// `now_ns` is `u64::MAX`).
    pub fn expired(&mut self, now_ns: u64) -> Option<HeldSpan> {
        // Spans are held in the order they ended (records come merged by
        // time), so the front is the first to expire.
        if self.spans.front()?.until_ns <= now_ns {
            self.spans.pop_front()
        } else {
            None
        }
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }
}

/// Makes `span` the child of `parent` in trace `trace_id`.
pub fn reparent(span: &mut ExportSpan, trace_id: TraceId, parent: SpanId) {
    let ctx = &span.span.span_context;
    span.span.span_context = SpanContext::new(
        trace_id,
        ctx.span_id(),
        ctx.trace_flags(),
        ctx.is_remote(),
        ctx.trace_state().clone(),
    );
    span.span.parent_span_id = parent;
    span.span.parent_span_is_remote = false;
}

#[cfg(test)]
mod tests {
    use std::{borrow::Cow, time::SystemTime};

    use opentelemetry::trace::{SpanKind, Status, TraceFlags, TraceState};
    use opentelemetry_sdk::{
        Resource,
        trace::{SpanData, SpanEvents, SpanLinks},
    };

    use super::*;
    use crate::{
        capture::EndId,
        export::{ProcessResource, SpanRecord},
    };

    fn key() -> LinkKey {
        (
            EndId::Inet("127.0.0.1:40000".parse().unwrap()),
            EndId::Inet("127.0.0.1:80".parse().unwrap()),
        )
    }

    fn span(n: u8) -> ExportSpan {
        ExportSpan {
            resource: ProcessResource::new(Resource::builder_empty().build()),
            span: SpanRecord::from_span_data(SpanData {
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
                name: Cow::Borrowed("GET"),
                start_time: SystemTime::UNIX_EPOCH,
                end_time: SystemTime::UNIX_EPOCH,
                attributes: Vec::new(),
                dropped_attributes_count: 0,
                events: SpanEvents::default(),
                links: SpanLinks::default(),
                status: Status::Unset,
                instrumentation_scope: Default::default(),
            }),
        }
    }

    #[test]
    fn spans_leave_when_adopted_or_when_their_wait_is_over() {
        let mut held = Held::default();
        assert!(held.hold(key(), 1, 0, 10, span(1)).is_none());
        assert!(held.hold(key(), 2, 0, 20, span(2)).is_none());
        assert!(held.expired(10 + HOLD_NS - 1).is_none());
        let mut adopted = held.take(2, 0).unwrap();
        reparent(
            &mut adopted,
            TraceId::from_bytes([7; 16]),
            SpanId::from_bytes([7; 8]),
        );
        assert_eq!(adopted.span.parent_span_id, SpanId::from_bytes([7; 8]));
        assert_eq!(
            adopted.span.span_context.span_id(),
            SpanId::from_bytes([2; 8])
        );
        assert_eq!(
            adopted.span.span_context.trace_id(),
            TraceId::from_bytes([7; 16])
        );
        assert!(held.take(2, 0).is_none());
        let left = held.expired(10 + HOLD_NS).unwrap();
        assert_eq!(
            (left.conn_id, left.span.span.parent_span_id),
            (1, SpanId::INVALID)
        );
        assert_eq!(held.len(), 0);
    }

    #[test]
    fn held_spans_are_bounded() {
        let mut held = Held::default();
        for i in 0..MAX_HELD as u64 {
            assert!(held.hold(key(), i, 0, i, span(1)).is_none());
        }
        let evicted = held.hold(key(), u64::MAX, 0, 0, span(2)).unwrap();
        assert_eq!(evicted.conn_id, 0);
        assert_eq!(held.len(), MAX_HELD);
    }
}
