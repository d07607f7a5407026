//! The startup trace: one root span for the agent's start-up, with a child
//! per phase (configuration, exporter, kernel probe, connection seeding),
//! per program load (`ebpf.compile`: verification time, instruction count,
//! verifier log on failure) and per probe attach (type, target, outcome,
//! fallback reason).

use std::time::{Instant, SystemTime};

use opentelemetry::trace::SpanId;

use super::spans::{Draft, SelfSpans};
use crate::{
    kernel::{
        features::Report,
        loader::{Attachment, ProgramLoad},
    },
    pipeline::Pipeline,
};

/// Phases timed so far; turned into spans by [`Startup::finish`].
pub struct Startup {
    started: SystemTime,
    phases: Vec<Draft>,
}

impl Default for Startup {
    fn default() -> Self {
        Self::begin()
    }
}

impl Startup {
    pub fn begin() -> Self {
        Self {
            started: SystemTime::now(),
            phases: Vec::new(),
        }
    }

    /// Times `run` as the phase `name`; an `Err` marks the phase failed.
    pub fn phase<T, E: std::fmt::Display>(
        &mut self,
        name: &'static str,
        run: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let start = SystemTime::now();
        let clock = Instant::now();
        let result = run();
        let mut draft = Draft::new(name, start, start + clock.elapsed());
        if let Err(e) = &result {
            draft = draft.error(format!("{e:#}"));
        }
        self.phases.push(draft);
        result
    }

    /// Adds an attribute to the phase timed last.
    pub fn annotate(
        &mut self,
        key: impl Into<opentelemetry::Key>,
        value: impl Into<opentelemetry::Value>,
    ) {
        if let Some(last) = self.phases.pop() {
            self.phases.push(last.attr(key, value));
        }
    }

    /// Records the kernel feature probe's rows on the phase timed last.
    pub fn annotate_features(&mut self, report: &Report) {
        for row in &report.rows {
            let key = format!("zerotrace.kernel.feature.{}", slug(row.name));
            self.annotate(key, row.available);
        }
        if let Some(kernel) = report.get("kernel") {
            self.annotate("zerotrace.kernel.release", kernel.detail.clone());
        }
    }

    /// Queues the startup trace. `pipeline` is `None` when start-up failed
    /// with `failure` (the trace then says why, if the exporter is up).
    pub fn finish(
        self,
        spans: &mut SelfSpans,
        pipeline: Option<&Pipeline>,
        failure: Option<&anyhow::Error>,
    ) {
        let trace = spans.new_trace();
        let root_id = spans.new_span_id();
        let mut root = Draft::new("zerotrace.startup", self.started, SystemTime::now())
            .attr("zerotrace.version", env!("CARGO_PKG_VERSION"));
        if let Some(e) = failure {
            root = root.error(format!("start-up failed: {e:#}"));
        }
        for phase in self.phases {
            spans.emit(trace, root_id, phase);
        }
        if let Some(pipeline) = pipeline {
            let probes = &pipeline.probes;
            root = root
                .attr("zerotrace.transport", probes.transport.name())
                .attr(
                    "zerotrace.kernel_functions",
                    probes.kernel_functions.describe(),
                )
                .attr("zerotrace.programs.loaded", probes.loads.len() as i64)
                .attr(
                    "zerotrace.probes.attached",
                    probes
                        .attachments
                        .iter()
                        .filter(|a| a.outcome.is_ok())
                        .count() as i64,
                );
            for load in &probes.loads {
                spans.emit(trace, root_id, compile_span(load));
            }
            for attachment in &probes.attachments {
                spans.emit(trace, root_id, attach_span(attachment));
            }
            let seeded = &pipeline.seeded;
            spans.emit(
                trace,
                root_id,
                Draft::new(
                    "conn.seed",
                    seeded.started,
                    seeded.started + seeded.duration,
                )
                .attr("zerotrace.seed.connections", seeded.connections as i64)
                .attr("zerotrace.seed.listeners", seeded.listeners as i64),
            );
        }
        spans.emit_with_id(trace, root_id, SpanId::INVALID, root);
    }
}

/// `ebpf.compile`: loading one program, which is where the verifier runs.
fn compile_span(load: &ProgramLoad) -> Draft {
    let mut draft = Draft::new("ebpf.compile", load.started, load.started + load.duration)
        .attr("ebpf.program.name", load.program.clone())
        .attr("ebpf.program.type", load.kind);
    if let Some(n) = load.instructions {
        draft = draft.attr("ebpf.verifier.instructions", i64::from(n));
    }
    if let Some(error) = &load.error {
        draft = draft
            .attr("ebpf.verifier.log", error.clone())
            .error(format!("the kernel refused {}", load.program));
    }
    draft
}

/// `ebpf.attach`: one probe on one target.
fn attach_span(a: &Attachment) -> Draft {
    let draft = Draft::new("ebpf.attach", a.started, a.started + a.duration)
        .attr("ebpf.program.name", a.program)
        .attr("ebpf.attach.type", a.kind)
        .attr("ebpf.attach.target", a.target.clone());
    match (&a.outcome, &a.fallback) {
        (Ok(()), _) => draft.attr("ebpf.attach.outcome", "attached"),
        (Err(reason), Some(fallback)) => draft
            .attr("ebpf.attach.outcome", "failed")
            .attr("ebpf.attach.fallback", fallback.clone())
            .error(reason.clone()),
        (Err(reason), None) => draft
            .attr("ebpf.attach.outcome", "skipped")
            .attr("ebpf.attach.reason", reason.clone()),
    }
}

/// "ring buffer" → "ring_buffer", "fentry/fexit" → "fentry_fexit".
fn slug(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_attribute_safe() {
        assert_eq!(slug("ring buffer"), "ring_buffer");
        assert_eq!(slug("fentry/fexit"), "fentry_fexit");
        assert_eq!(slug("eBPF programs"), "ebpf_programs");
    }
}
