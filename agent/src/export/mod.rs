//! Export: finished spans go through a bounded queue to an exporter thread
//! that batches them (OTEL_BSP_*) and hands them to one sink — the OTLP
//! exporter, the console tree printer or the OTLP/JSON lines file. A full
//! queue drops spans and counts them; the capture path never waits.
//!
//! The tracer hands its spans over a few dozen at a time
//! ([`SpanQueue::batched`]), and at the end of every pipeline round: one
//! send per span had the two threads trading the channel's cache lines
//! for every span, 6 % of the agent's time at nginx saturation.

mod console;
mod jsonl;
mod otlp;
mod proto;
mod record;
mod tls;

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc::{Receiver, Sender, TryRecvError, channel},
    },
    thread::{JoinHandle, Thread},
    time::{Duration, Instant},
};

use anyhow::Context;
use opentelemetry_sdk::trace::SpanData;

use crate::config::{BatchConfig, OtlpProtocol};

pub use console::render_trees;
pub use otlp::{OtlpSettings, TlsSources, request as otlp_request};
pub use proto::{Encoder as OtlpEncoder, ProcessResource};
pub use record::{Attributes, ExportSpan, SpanRecord, agent_scope};
pub use tls::{PemFile, TlsFiles};

/// Where spans go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Console,
    Jsonl(PathBuf),
    Otlp(OtlpSettings),
}

impl Target {
    pub fn describe(&self) -> String {
        match self {
            Target::Console => "console".into(),
            Target::Jsonl(path) => format!("jsonl to {}", path.display()),
            Target::Otlp(otlp) => {
                let mut out = format!(
                    "otlp {} to {}",
                    match otlp.protocol {
                        OtlpProtocol::Grpc => "grpc",
                        OtlpProtocol::HttpProtobuf => "http/protobuf",
                    },
                    otlp.endpoint
                );
                if let Some(tls) = &otlp.tls {
                    out.push_str(&format!(" ({})", tls.describe()));
                }
                out
            }
        }
    }
}

/// Counters shared by the queue and the exporter thread.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub queued: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub exported: AtomicU64,
    pub failed: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ExportCounts {
    pub queued: u64,
    pub dropped_queue_full: u64,
    pub exported: u64,
    pub failed: u64,
}

impl ExportCounts {
    /// Spans queued and not yet exported or failed (in the queue or a batch).
    pub fn waiting(&self) -> u64 {
        self.queued
            .saturating_sub(self.exported)
            .saturating_sub(self.failed)
    }
}

impl ExportStats {
    pub fn snapshot(&self) -> ExportCounts {
        ExportCounts {
            queued: self.queued.load(Ordering::Relaxed),
            dropped_queue_full: self.dropped_queue_full.load(Ordering::Relaxed),
            exported: self.exported.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

/// The queue's bound and how full it is, shared by its two ends.
#[derive(Debug)]
struct Handoff {
    /// The most spans handed over and not yet taken by the exporter.
    capacity: usize,
    waiting: AtomicUsize,
}

impl Handoff {
    fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            waiting: AtomicUsize::new(0),
        })
    }
}

/// The exporter's end of the queue: spans as they were handed over, taken
/// off the queue's count.
struct Taker {
    rx: Receiver<Vec<ExportSpan>>,
    shared: Arc<Handoff>,
}

impl Taker {
    fn try_recv(&self) -> Result<Vec<ExportSpan>, TryRecvError> {
        let spans = self.rx.try_recv()?;
        self.shared
            .waiting
            .fetch_sub(spans.len(), Ordering::Relaxed);
        Ok(spans)
    }
}

/// A queue of `capacity` spans: its producer and its exporter's end.
fn queue(
    capacity: usize,
    stats: Arc<ExportStats>,
    waker: Option<Arc<Waker>>,
) -> (SpanQueue, Taker) {
    let (tx, rx) = channel();
    let shared = Handoff::new(capacity);
    let taker = Taker {
        rx,
        shared: Arc::clone(&shared),
    };
    let queue = SpanQueue {
        tx,
        stats,
        shared,
        waker,
        held: Vec::new(),
        handoff: 1,
    };
    (queue, taker)
}

/// Wakes the exporter thread once a batch's worth of spans is queued.
/// Waking it for every span cost a context switch per span on both sides.
#[derive(Debug)]
struct Waker {
    thread: Thread,
    batch: usize,
    since_wake: AtomicUsize,
}

/// The producer side: never blocks. Spans are handed over as they are
/// pushed, or, for a [batched](SpanQueue::batched) queue, once `handoff`
/// of them are held or at [`SpanQueue::flush`]. A full queue drops the
/// newest spans and counts them.
pub struct SpanQueue {
    tx: Sender<Vec<ExportSpan>>,
    stats: Arc<ExportStats>,
    shared: Arc<Handoff>,
    waker: Option<Arc<Waker>>,
    held: Vec<ExportSpan>,
    handoff: usize,
}

/// Spans a batched queue holds before it hands them over.
pub const HANDOFF_SPANS: usize = 64;

impl Clone for SpanQueue {
    /// Another producer, handing its spans over one at a time.
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            stats: Arc::clone(&self.stats),
            shared: Arc::clone(&self.shared),
            waker: self.waker.clone(),
            held: Vec::new(),
            handoff: 1,
        }
    }
}

impl SpanQueue {
    /// This queue, holding up to `handoff` spans before it hands them
    /// over: its owner must call [`SpanQueue::flush`] when it is idle.
    pub fn batched(mut self, handoff: usize) -> Self {
        self.handoff = handoff.max(1);
        self.held = Vec::with_capacity(self.handoff);
        self
    }

    pub fn push(&mut self, span: ExportSpan) {
        self.held.push(span);
        if self.held.len() >= self.handoff {
            self.flush();
        }
    }

    /// Hands over the spans held.
    pub fn flush(&mut self) {
        let n = self.held.len();
        if n == 0 {
            return;
        }
        let shared = &*self.shared;
        let before = shared.waiting.fetch_add(n, Ordering::Relaxed);
        let room = shared.capacity.saturating_sub(before).min(n);
        if room < n {
            self.dropped(n - room);
            self.held.truncate(room);
            if room == 0 {
                return;
            }
        }
        // A full hand-over takes the vector as it is; the few spans left at
        // the end of a round go in one of their own size, a small
        // allocation (a full-sized one per round cost more than the spans'
        // copy).
        let spans = if self.held.len() >= self.handoff {
            std::mem::replace(&mut self.held, Vec::with_capacity(self.handoff))
        } else {
            self.held.drain(..).collect()
        };
        if self.tx.send(spans).is_err() {
            self.dropped(room);
            return;
        }
        self.stats.queued.fetch_add(room as u64, Ordering::Relaxed);
        if let Some(w) = &self.waker
            && w.since_wake.fetch_add(room, Ordering::Relaxed) + room >= w.batch
        {
            w.since_wake.store(0, Ordering::Relaxed);
            w.thread.unpark();
        }
    }

    /// `n` spans counted in `waiting` that did not go: counted as dropped.
    fn dropped(&self, n: usize) {
        self.shared.waiting.fetch_sub(n, Ordering::Relaxed);
        self.stats
            .dropped_queue_full
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A queue of `capacity` spans whose spans land in the returned
    /// receiver (for tests and benchmarks).
    pub fn for_test(capacity: usize) -> (Self, QueuedSpans) {
        let (queue, taker) = queue(capacity, Arc::default(), None);
        let taken = QueuedSpans {
            taker,
            chunk: Default::default(),
        };
        (queue, taken)
    }
}

impl Drop for SpanQueue {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The receiving end of a test queue ([`SpanQueue::for_test`]), one span
/// at a time.
pub struct QueuedSpans {
    taker: Taker,
    chunk: std::collections::VecDeque<ExportSpan>,
}

impl QueuedSpans {
    pub fn try_recv(&mut self) -> Result<ExportSpan, TryRecvError> {
        loop {
            if let Some(span) = self.chunk.pop_front() {
                return Ok(span);
            }
            self.chunk.extend(self.taker.try_recv()?);
        }
    }

    pub fn try_iter(&mut self) -> impl Iterator<Item = ExportSpan> + '_ {
        std::iter::from_fn(|| self.try_recv().ok())
    }
}

/// One destination for batches of spans.
trait Sink: Send {
    /// Exports a batch and empties `spans`, whose capacity the next batch
    /// reuses; returns how many spans were delivered.
    fn export(&mut self, spans: &mut Vec<ExportSpan>) -> anyhow::Result<usize>;
    /// Called about every 100 ms and at the end (`last`), for sinks that
    /// hold spans back (the console waits for whole traces).
    fn tick(&mut self, _last: bool) {}
    fn shutdown(&mut self) {}
}

/// The exporter thread and its queue.
pub struct Exporter {
    queue: Option<SpanQueue>,
    stats: Arc<ExportStats>,
    thread: Option<JoinHandle<()>>,
}

impl Exporter {
    /// Builds the sink (a bad endpoint fails here) and starts the thread.
    pub fn start(target: &Target, batch: BatchConfig) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the exporter runtime")?;
        let sink: Box<dyn Sink> = match target {
            Target::Console => Box::new(console::Console::stdout()),
            Target::Jsonl(path) => Box::new(jsonl::Jsonl::create(path)?),
            Target::Otlp(settings) => Box::new(otlp::Otlp::new(
                runtime,
                settings.clone(),
                batch.export_timeout,
            )?),
        };
        let stats = Arc::new(ExportStats::default());
        let thread_stats = Arc::clone(&stats);
        let batch_size = batch.max_export_batch_size.max(1);
        let (mut queue, taker) = queue(batch.max_queue_size, Arc::clone(&stats), None);
        let thread = std::thread::Builder::new()
            .name("zerotrace-export".into())
            .spawn(move || run(taker, sink, batch, &thread_stats))
            .context("starting the exporter thread")?;
        queue.waker = Some(Arc::new(Waker {
            thread: thread.thread().clone(),
            batch: batch_size,
            since_wake: AtomicUsize::new(0),
        }));
        Ok(Self {
            queue: Some(queue),
            stats,
            thread: Some(thread),
        })
    }

    pub fn queue(&self) -> SpanQueue {
        self.queue.clone().expect("the queue lives until shutdown")
    }

    pub fn counts(&self) -> ExportCounts {
        self.stats.snapshot()
    }

    /// Exports what is queued and stops the thread.
    pub fn shutdown(mut self) -> ExportCounts {
        // The thread ends once every sender is gone; the caller must have
        // dropped its clones.
        self.queue = None;
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
        self.stats.snapshot()
    }
}

fn run(taker: Taker, mut sink: Box<dyn Sink>, batch: BatchConfig, stats: &ExportStats) {
    let tick = Duration::from_millis(100);
    let mut pending: Vec<ExportSpan> = Vec::with_capacity(batch.max_export_batch_size);
    let mut due = Instant::now() + batch.scheduled_delay;
    let mut errors = 0u64;
    let mut flush = |pending: &mut Vec<ExportSpan>, sink: &mut Box<dyn Sink>| {
        if pending.is_empty() {
            return;
        }
        let n = pending.len() as u64;
        let result = sink.export(pending);
        pending.clear();
        match result {
            Ok(done) => {
                stats.exported.fetch_add(done as u64, Ordering::Relaxed);
                stats
                    .failed
                    .fetch_add(n.saturating_sub(done as u64), Ordering::Relaxed);
            }
            Err(e) => {
                stats.failed.fetch_add(n, Ordering::Relaxed);
                errors += 1;
                // The first failure and then every 100th: a dead collector
                // must not flood the log. A TLS failure is a setting to
                // fix, not a collector that is down: an error.
                if errors % 100 == 1 {
                    let level = match e.downcast_ref::<tls::TlsFailure>() {
                        Some(_) => log::Level::Error,
                        None => log::Level::Warn,
                    };
                    log::log!(level, "export failed ({errors} failures so far): {e:#}");
                }
            }
        }
    };
    loop {
        // Sleeps until the batch is due, the next tick, or the queue wakes
        // us with a full batch (or a shutdown); then takes what is queued.
        std::thread::park_timeout(due.saturating_duration_since(Instant::now()).min(tick));
        let mut gone = false;
        loop {
            match taker.try_recv() {
                Ok(spans) => {
                    for span in spans {
                        pending.push(span);
                        if pending.len() >= batch.max_export_batch_size {
                            flush(&mut pending, &mut sink);
                            due = Instant::now() + batch.scheduled_delay;
                        }
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    gone = true;
                    break;
                }
            }
        }
        if gone {
            break;
        }
        if Instant::now() >= due {
            flush(&mut pending, &mut sink);
            due = Instant::now() + batch.scheduled_delay;
        }
        sink.tick(false);
    }
    flush(&mut pending, &mut sink);
    sink.tick(true);
    sink.shutdown();
}

/// Groups spans by resource (one per process), keeping their order within
/// each group.
fn by_resource(spans: Vec<ExportSpan>) -> Vec<(Arc<ProcessResource>, Vec<SpanData>)> {
    let mut groups: Vec<(Arc<ProcessResource>, Vec<SpanData>)> = Vec::new();
    for ExportSpan { resource, span } in spans {
        let span = span.to_span_data();
        match groups.iter_mut().find(|(r, _)| Arc::ptr_eq(r, &resource)) {
            Some((_, group)) => group.push(span),
            None => groups.push((resource, vec![span])),
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` spans of every shape.
    fn spans(n: usize) -> Vec<ExportSpan> {
        proto::tests::batch().into_iter().cycle().take(n).collect()
    }

    fn counts(queue: &SpanQueue) -> ExportCounts {
        queue.stats.snapshot()
    }

    /// The bound is in spans, whatever the hand-over: a full queue drops
    /// the newest spans and counts them, and taking spans off makes room.
    #[test]
    fn a_full_queue_drops_the_newest_spans_and_counts_them() {
        let (queue, mut taken) = SpanQueue::for_test(80);
        // A clone hands over one span at a time.
        let mut queue_of_one = queue.clone();
        let mut queue = queue.batched(64);
        let sent = spans(100);
        let names: Vec<_> = sent.iter().map(|s| s.span.name.clone()).collect();
        for span in sent {
            queue.push(span);
        }
        // 64 handed over when held, 36 at the flush, of which 16 fit.
        assert_eq!(
            (counts(&queue).queued, counts(&queue).dropped_queue_full),
            (64, 0)
        );
        queue.flush();
        assert_eq!(
            (counts(&queue).queued, counts(&queue).dropped_queue_full),
            (80, 20)
        );
        queue_of_one.push(spans(1).remove(0));
        assert_eq!(counts(&queue).dropped_queue_full, 21, "still full");

        let got: Vec<_> = taken.try_iter().map(|s| s.span.name).collect();
        assert_eq!(got, names[..80], "the oldest spans, in order");
        queue_of_one.push(spans(1).remove(0));
        queue.push(spans(1).remove(0));
        queue.flush();
        assert_eq!(
            (counts(&queue).queued, counts(&queue).dropped_queue_full),
            (82, 21)
        );
        assert_eq!(taken.try_iter().count(), 2);
    }

    /// A batched queue hands over what it holds when dropped.
    #[test]
    fn a_dropped_queue_hands_over_what_it_holds() {
        let (queue, mut taken) = SpanQueue::for_test(100);
        let mut queue = queue.batched(64);
        for span in spans(10) {
            queue.push(span);
        }
        assert_eq!(taken.try_iter().count(), 0, "held");
        drop(queue);
        assert_eq!(taken.try_iter().count(), 10);
    }
}
