//! Interval spans: every interval, one trace `zerotrace.interval` holding an
//! `ebpf.execute` span per loaded program (runs and average ns per run in
//! the interval, from the kernel's BPF run-time statistics; trigger counts
//! for kernel-function probes) and one `ebpf.buffer.read` span for the
//! transport (events, bytes, losses, largest batch). Aggregated: never a
//! span per read.

use std::{collections::HashMap, time::SystemTime};

use opentelemetry::trace::SpanId;

use super::spans::{Draft, SelfSpans};
use crate::{
    kernel::loader::ProgramStats,
    pipeline::{Pipeline, PipelineStats},
};

/// Remembers the previous totals so each report covers one interval.
pub struct IntervalReporter {
    since: SystemTime,
    programs: HashMap<String, ProgramStats>,
    pipeline: PipelineStats,
}

/// One program's work in an interval.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgramDelta {
    pub program: String,
    pub kind: &'static str,
    pub runs: u64,
    pub run_time_ns: u64,
}

impl ProgramDelta {
    pub fn average_ns(&self) -> Option<f64> {
        (self.runs > 0).then(|| self.run_time_ns as f64 / self.runs as f64)
    }
}

/// Per-program differences between two readings of the run-time stats; a
/// program new since the first reading counts from zero.
pub fn program_deltas(
    before: &HashMap<String, ProgramStats>,
    now: &[ProgramStats],
) -> Vec<ProgramDelta> {
    now.iter()
        .map(|p| {
            let (runs, time) = before
                .get(&p.program)
                .map_or((0, 0), |b| (b.run_count, b.run_time_ns));
            ProgramDelta {
                program: p.program.clone(),
                kind: p.kind,
                runs: p.run_count.saturating_sub(runs),
                run_time_ns: p.run_time_ns.saturating_sub(time),
            }
        })
        .collect()
}

impl IntervalReporter {
    pub fn new(pipeline: &Pipeline) -> Self {
        Self {
            since: SystemTime::now(),
            programs: by_name(pipeline.probes.program_stats()),
            pipeline: pipeline.stats(),
        }
    }

    /// Queues the spans for the interval that ends now.
    pub fn report(&mut self, spans: &mut SelfSpans, pipeline: &mut Pipeline) {
        let now = SystemTime::now();
        let programs = pipeline.probes.program_stats();
        let stats = pipeline.stats();
        let largest_batch = pipeline.take_interval_largest_batch();
        let trace = spans.new_trace();
        let root_id = spans.new_span_id();
        let seconds = now
            .duration_since(self.since)
            .unwrap_or_default()
            .as_secs_f64();

        let mut total_runs = 0u64;
        let mut total_ns = 0u64;
        for delta in program_deltas(&self.programs, &programs) {
            total_runs += delta.runs;
            total_ns += delta.run_time_ns;
            spans.emit(trace, root_id, execute_span(&delta, self.since, now));
        }

        let before = &self.pipeline;
        let lost = stats.lost().saturating_sub(before.lost());
        let mut buffer = Draft::new("ebpf.buffer.read", self.since, now)
            .attr("ebpf.transport", stats.transport)
            .attr(
                "ebpf.buffer.events",
                delta(stats.reader.records, before.reader.records),
            )
            .attr(
                "ebpf.buffer.bytes",
                delta(stats.reader.bytes, before.reader.bytes),
            )
            .attr("ebpf.buffer.lost", lost as i64)
            .attr(
                "ebpf.buffer.lost_in_kernel",
                delta(stats.kernel.events_lost, before.kernel.events_lost),
            )
            .attr(
                "ebpf.buffer.reads",
                delta(stats.reader.reads, before.reader.reads),
            )
            .attr("ebpf.buffer.largest_batch", largest_batch as i64)
            .attr(
                "ebpf.buffer.decode_errors",
                delta(stats.reader.decode_errors, before.reader.decode_errors),
            );
        if lost > 0 {
            buffer = buffer.error(format!("{lost} events lost"));
        }
        spans.emit(trace, root_id, buffer);

        let mut root = Draft::new("zerotrace.interval", self.since, now)
            .attr("zerotrace.interval.seconds", seconds)
            .attr("zerotrace.connections.open", stats.connections_open as i64);
        // Without the kernel's statistics (the default) there is nothing to
        // sum: no figures rather than zeros.
        if !programs.is_empty() {
            root = root
                .attr("ebpf.runs", total_runs as i64)
                .attr("ebpf.run_time_ns", total_ns as i64);
        }
        spans.emit_with_id(trace, root_id, SpanId::INVALID, root);

        self.since = now;
        self.programs = by_name(programs);
        self.pipeline = stats;
    }
}

fn by_name(stats: Vec<ProgramStats>) -> HashMap<String, ProgramStats> {
    stats.into_iter().map(|s| (s.program.clone(), s)).collect()
}

fn delta(now: u64, before: u64) -> i64 {
    now.saturating_sub(before) as i64
}

/// `ebpf.execute`: what one program cost in the interval.
fn execute_span(d: &ProgramDelta, start: SystemTime, end: SystemTime) -> Draft {
    let mut draft = Draft::new("ebpf.execute", start, end)
        .attr("ebpf.program.name", d.program.clone())
        .attr("ebpf.program.type", d.kind)
        .attr("ebpf.program.runs", d.runs as i64)
        .attr("ebpf.program.run_time_ns", d.run_time_ns as i64);
    if let Some(avg) = d.average_ns() {
        draft = draft.attr("ebpf.program.avg_ns", avg);
    }
    if matches!(d.kind, "kprobe" | "kretprobe" | "fentry" | "fexit") {
        draft = draft.attr("ebpf.kprobe.triggers", d.runs as i64);
    }
    draft
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(program: &str, runs: u64, ns: u64) -> ProgramStats {
        ProgramStats {
            program: program.into(),
            kind: "tracepoint",
            run_count: runs,
            run_time_ns: ns,
        }
    }

    #[test]
    fn deltas_cover_one_interval() {
        let before = by_name(vec![stats("a", 10, 1000), stats("b", 5, 500)]);
        let now = [stats("a", 30, 5000), stats("b", 5, 500), stats("c", 2, 80)];
        let d = program_deltas(&before, &now);
        assert_eq!((d[0].runs, d[0].run_time_ns), (20, 4000));
        assert_eq!(d[0].average_ns(), Some(200.0));
        assert_eq!((d[1].runs, d[1].average_ns()), (0, None));
        // New since the last reading: counted from zero.
        assert_eq!((d[2].runs, d[2].run_time_ns), (2, 80));
    }

    #[test]
    fn counters_that_go_backwards_give_zero_not_garbage() {
        let before = by_name(vec![stats("a", 10, 1000)]);
        let d = program_deltas(&before, &[stats("a", 3, 10)]);
        assert_eq!((d[0].runs, d[0].run_time_ns), (0, 0));
    }
}
