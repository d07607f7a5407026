//! Building the agent's own spans and queueing them for export.

use std::{
    borrow::Cow,
    sync::{Arc, OnceLock},
    time::SystemTime,
};

use opentelemetry::{
    InstrumentationScope, KeyValue,
    trace::{SpanContext, SpanId, SpanKind, Status, TraceId, TraceState},
};

use crate::{
    export::{ExportSpan, ProcessResource, SpanQueue, SpanRecord, agent_scope},
    trace::{
        parents::context::{Ids, flags},
        resources::Resources,
    },
};

/// A span before it gets its ids.
#[derive(Debug, Clone)]
pub struct Draft {
    pub name: &'static str,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<KeyValue>,
    pub status: Status,
}

impl Draft {
    pub fn new(name: &'static str, start: SystemTime, end: SystemTime) -> Self {
        Self {
            name,
            start,
            end: end.max(start),
            attributes: Vec::new(),
            status: Status::Unset,
        }
    }

    pub fn attr(
        mut self,
        key: impl Into<opentelemetry::Key>,
        value: impl Into<opentelemetry::Value>,
    ) -> Self {
        self.attributes.push(KeyValue::new(key, value));
        self
    }

    pub fn error(mut self, description: impl Into<Cow<'static, str>>) -> Self {
        self.status = Status::error(description);
        self
    }
}

/// Where the agent's spans go: the same queue as traced services' spans,
/// under the agent's own resource. Never sampled away.
pub struct SelfSpans {
    resource: Arc<ProcessResource>,
    scope: &'static InstrumentationScope,
    ids: Ids,
    queue: SpanQueue,
    /// Spans produced so far.
    pub produced: u64,
}

impl SelfSpans {
    pub fn new(queue: SpanQueue) -> Self {
        Self {
            resource: ProcessResource::new(Resources::new(Vec::new()).agent()),
            scope: scope(),
            ids: Ids::default(),
            queue,
            produced: 0,
        }
    }

    pub fn new_trace(&self) -> TraceId {
        self.ids.trace_id()
    }

    pub fn new_span_id(&self) -> SpanId {
        self.ids.span_id()
    }

    /// Queues `draft` as span `id` of `trace`, child of `parent`
    /// (`SpanId::INVALID` for a root).
    pub fn emit_with_id(&mut self, trace: TraceId, id: SpanId, parent: SpanId, draft: Draft) {
        let span = SpanRecord {
            span_context: SpanContext::new(trace, id, flags(true), false, TraceState::default()),
            parent_span_id: parent,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: Cow::Borrowed(draft.name),
            start_time: draft.start,
            end_time: draft.end,
            attributes: draft.attributes.into_iter().collect(),
            status: draft.status,
            scope: self.scope,
        };
        self.produced += 1;
        self.queue.push(ExportSpan {
            resource: Arc::clone(&self.resource),
            span,
        });
    }

    /// Queues a child of `parent` and returns its id.
    pub fn emit(&mut self, trace: TraceId, parent: SpanId, draft: Draft) -> SpanId {
        let id = self.new_span_id();
        self.emit_with_id(trace, id, parent, draft);
        id
    }
}

/// The scope of the agent's own spans.
fn scope() -> &'static InstrumentationScope {
    static SCOPE: OnceLock<InstrumentationScope> = OnceLock::new();
    agent_scope(&SCOPE, "zerotrace.selftrace")
}
