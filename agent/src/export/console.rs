//! The default exporter: whole traces printed as trees once no span of
//! theirs arrived for a moment.

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::Write as _,
    time::{Duration, Instant},
};

use opentelemetry::{
    Key,
    trace::{SpanId, SpanKind, Status, TraceId},
};

use super::{ExportSpan, Sink};

/// A trace is printed once it has been quiet this long…
const QUIET: Duration = Duration::from_millis(400);
/// …or has waited this long.
const MAX_WAIT: Duration = Duration::from_secs(5);
/// Most spans held back; beyond this the oldest traces print at once.
const MAX_HELD: usize = 10_000;

/// Attributes shown after each span, when present.
const SHOWN: [&str; 4] = ["url.full", "url.path", "tenant.id", "user.id"];

pub struct Console {
    traces: HashMap<TraceId, Held>,
    held: usize,
}

struct Held {
    spans: Vec<ExportSpan>,
    first: Instant,
    last: Instant,
}

impl Console {
    pub fn stdout() -> Self {
        Self {
            traces: HashMap::new(),
            held: 0,
        }
    }

    fn print(&mut self, due: impl Fn(&Held) -> bool) {
        let ready: Vec<TraceId> = self
            .traces
            .iter()
            .filter(|(_, h)| due(h))
            .map(|(id, _)| *id)
            .collect();
        if ready.is_empty() {
            return;
        }
        let mut held: Vec<Held> = ready
            .iter()
            .filter_map(|id| self.traces.remove(id))
            .collect();
        held.sort_by_key(|h| h.spans.iter().map(|s| s.span.start_time).min());
        let mut text = String::new();
        for h in held {
            self.held -= h.spans.len();
            text.push_str(&render_trees(&h.spans));
        }
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}

impl Sink for Console {
    fn export(&mut self, spans: &mut Vec<ExportSpan>) -> anyhow::Result<usize> {
        let n = spans.len();
        let now = Instant::now();
        for span in spans.drain(..) {
            let id = span.span.span_context.trace_id();
            let held = self.traces.entry(id).or_insert_with(|| Held {
                spans: Vec::new(),
                first: now,
                last: now,
            });
            held.spans.push(span);
            held.last = now;
            self.held += 1;
        }
        if self.held > MAX_HELD {
            let oldest = self.traces.values().map(|h| h.first).min();
            self.print(|h| Some(h.first) == oldest);
        }
        Ok(n)
    }

    fn tick(&mut self, last: bool) {
        let now = Instant::now();
        self.print(|h| {
            last || now.duration_since(h.last) >= QUIET || now.duration_since(h.first) >= MAX_WAIT
        });
    }
}

/// Renders the spans of one trace (or several) as indented trees.
pub fn render_trees(spans: &[ExportSpan]) -> String {
    let mut out = String::new();
    let mut by_trace: Vec<(TraceId, Vec<&ExportSpan>)> = Vec::new();
    for span in spans {
        let id = span.span.span_context.trace_id();
        match by_trace.iter_mut().find(|(t, _)| *t == id) {
            Some((_, v)) => v.push(span),
            None => by_trace.push((id, vec![span])),
        }
    }
    for (trace_id, mut spans) in by_trace {
        spans.sort_by_key(|s| s.span.start_time);
        let ids: Vec<SpanId> = spans
            .iter()
            .map(|s| s.span.span_context.span_id())
            .collect();
        let start = spans.iter().map(|s| s.span.start_time).min();
        let end = spans.iter().map(|s| s.span.end_time).max();
        let total = match (start, end) {
            (Some(s), Some(e)) => e.duration_since(s).unwrap_or_default(),
            _ => Duration::ZERO,
        };
        let _ = writeln!(
            out,
            "trace {trace_id} · {} span{} · {}",
            spans.len(),
            if spans.len() == 1 { "" } else { "s" },
            millis(total)
        );
        let roots: Vec<&ExportSpan> = spans
            .iter()
            .copied()
            .filter(|s| !ids.contains(&s.span.parent_span_id))
            .collect();
        for (i, root) in roots.iter().enumerate() {
            render(&mut out, root, &spans, "", i + 1 == roots.len(), 0);
        }
    }
    out
}

fn render(
    out: &mut String,
    span: &ExportSpan,
    all: &[&ExportSpan],
    prefix: &str,
    last: bool,
    depth: usize,
) {
    let data = &span.span;
    let service = span
        .resource
        .get(&Key::from_static_str("service.name"))
        .map(|v| v.to_string())
        .unwrap_or_default();
    let kind = match data.span_kind {
        SpanKind::Server => "SERVER",
        SpanKind::Client => "CLIENT",
        SpanKind::Producer => "PRODUCER",
        SpanKind::Consumer => "CONSUMER",
        SpanKind::Internal => "INTERNAL",
    };
    let attr = |key: &str| data.attributes.get(key).map(|v| v.to_string());
    let duration = data
        .end_time
        .duration_since(data.start_time)
        .unwrap_or_default();
    let _ = write!(
        out,
        "{prefix}{} {service} {kind} {}",
        if last { "└─" } else { "├─" },
        data.name
    );
    if let Some(code) = attr("http.response.status_code") {
        let _ = write!(out, " → {code}");
    }
    let _ = write!(out, " ({})", millis(duration));
    if let Status::Error { .. } = data.status {
        let _ = write!(
            out,
            " ERROR{}",
            attr("error.type")
                .map(|e| format!(" {e}"))
                .unwrap_or_default()
        );
    }
    for key in SHOWN {
        if let Some(v) = attr(key) {
            let _ = write!(out, " {key}={v}");
        }
    }
    if depth == 0 && data.parent_span_id != SpanId::INVALID {
        let _ = write!(out, " (parent {})", data.parent_span_id);
    }
    out.push('\n');
    let child_prefix = format!("{prefix}{}", if last { "   " } else { "│  " });
    let id = data.span_context.span_id();
    let children: Vec<&ExportSpan> = all
        .iter()
        .copied()
        .filter(|s| s.span.parent_span_id == id)
        .collect();
    // Depth is bounded by the span count; guards against a cycle of ids.
    if depth > all.len() {
        return;
    }
    for (i, child) in children.iter().enumerate() {
        render(
            out,
            child,
            all,
            &child_prefix,
            i + 1 == children.len(),
            depth + 1,
        );
    }
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}
