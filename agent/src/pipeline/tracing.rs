//! What `zerotrace run` plugs into the record path: the tracer, whose spans
//! go to the export queue, and the agent's reports on its own work, kept on
//! the loop's clock: the heartbeat and /metrics snapshot of the endpoints,
//! the interval spans, and the statistics line on stderr.

use std::time::Duration;

use super::{Consumer, Every, Pipeline, Record};
use crate::{
    export::Exporter,
    selftrace::{
        SelfSpans,
        endpoints::{AgentState, MetricsSnapshot, ProgramRun},
        interval::IntervalReporter,
    },
    trace::Tracer,
};

/// How often the agent reports on itself.
#[derive(Clone, Copy, Debug)]
pub struct Periods {
    /// The statistics line on stderr.
    pub stats: Duration,
    /// The interval spans (`ebpf.execute`, `ebpf.buffer.read`).
    pub telemetry: Duration,
}

/// How often /metrics is brought up to date.
const METRICS_EVERY: Duration = Duration::from_secs(1);
/// A last, partial interval shorter than this is not reported.
const MIN_LAST_INTERVAL: Duration = Duration::from_millis(100);

pub struct Tracing<'a> {
    tracer: Tracer,
    exporter: &'a Exporter,
    state: &'a AgentState,
    /// The agent's own spans, when it exports them.
    self_spans: Option<SelfSpans>,
    intervals: IntervalReporter,
    metrics_every: Every,
    intervals_every: Every,
    stats_every: Every,
    /// Connections muted in the kernel so far.
    muted: u64,
}

impl<'a> Tracing<'a> {
    /// Starts the reports' clocks and publishes the first /metrics snapshot.
    pub fn new(
        tracer: Tracer,
        exporter: &'a Exporter,
        state: &'a AgentState,
        self_spans: Option<SelfSpans>,
        pipeline: &Pipeline,
        periods: Periods,
    ) -> Self {
        let tracing = Self {
            tracer,
            exporter,
            state,
            self_spans,
            intervals: IntervalReporter::new(pipeline),
            metrics_every: Every::new(METRICS_EVERY),
            intervals_every: Every::new(periods.telemetry),
            stats_every: Every::new(periods.stats),
            muted: 0,
        };
        state.update(tracing.snapshot(pipeline));
        tracing
    }

    /// What /metrics shows now.
    fn snapshot(&self, pipeline: &Pipeline) -> MetricsSnapshot {
        let s = pipeline.stats();
        let x = self.exporter.counts();
        let own = self.self_spans.as_ref().map_or(0, |s| s.produced);
        MetricsSnapshot {
            transport: s.transport,
            events: s.reader.records,
            bytes: s.reader.bytes,
            lost: s.lost(),
            spans_produced: self.tracer.stats.spans + own,
            spans_exported: x.exported,
            spans_dropped: x.dropped_queue_full,
            export_errors: x.failed,
            queue_depth: x.waiting(),
            connections_open: s.connections_open as u64,
            tls_dropped: [
                s.kernel.tls_no_socket,
                s.kernel.tls_socket_mismatch,
                s.kernel.tls_calls_full,
            ],
            tls_connections: self.tracer.stats.connections_tls,
            tls_connections_unread: self.tracer.stats.connections_tls_unread,
            connections_muted: self.muted,
            muted_calls: s.kernel.muted_calls,
            stream_holes: self.tracer.stats.stream_holes,
            mapped_looks: {
                let tls = &pipeline.followers.tls;
                [tls.mapped_looked, tls.mapped_skipped]
            },
            programs: pipeline
                .probes
                .program_stats()
                .into_iter()
                .map(|p| ProgramRun {
                    program: p.program,
                    kind: p.kind,
                    run_count: p.run_count,
                    run_time_ns: p.run_time_ns,
                })
                .collect(),
        }
    }

    /// The statistics line.
    fn log_stats(&self, pipeline: &Pipeline) {
        let s = pipeline.stats();
        let x = self.exporter.counts();
        log::info!(
            "{} data events, {} lost, {} connections open; {} spans ({} in flight), \
             {} exported, {} dropped, {} failed",
            s.data_events,
            s.lost(),
            s.connections_open,
            self.tracer.stats.spans,
            self.tracer.in_flight(),
            x.exported,
            x.dropped_queue_full,
            x.failed,
        );
    }
}

impl Consumer for Tracing<'_> {
    fn record(&mut self, record: Record<'_>) {
        self.tracer.on_record(record);
    }

    fn tick(&mut self, pipeline: &mut Pipeline) {
        self.state.heartbeat();
        self.tracer.end_round(crate::capture::monotonic_ns());
        for m in self.tracer.mutes.drain(..) {
            if pipeline.probes.mute(m.tgid, m.fd, m.conn_id, m.blind) {
                self.muted += 1;
            }
        }
        if self.metrics_every.due() {
            self.state.update(self.snapshot(pipeline));
        }
        if self.intervals_every.due()
            && let Some(spans) = self.self_spans.as_mut()
        {
            self.intervals.report(spans, pipeline);
        }
        if self.stats_every.due() {
            self.log_stats(pipeline);
        }
    }

    fn finish(&mut self, pipeline: &mut Pipeline) {
        self.tracer.end_round(u64::MAX);
        if let Some(spans) = self.self_spans.as_mut()
            && self.intervals_every.elapsed() >= MIN_LAST_INTERVAL
        {
            // The last, partial interval: a short run still reports its costs.
            self.intervals.report(spans, pipeline);
        }
        self.log_stats(pipeline);
    }
}
