//! The record path, once. Every command that handles records (`run`,
//! `events`, `bench-capture`) and the benchmarks go the same way:
//!
//! ```text
//! Source ──Input::Event──▶ Attributor ──Record──▶ Consumer
//!   │                    (connection table)     (run: tracer → export queue;
//!   └──Input::Change (followers) ───Record──▶    events: a printer; …)
//! ```
//!
//! - A [`Source`] hands on decoded kernel records. The kernel's is the
//!   capture reader together with the [`Followers`], discovery steps that
//!   change what the kernel probes for a process (runtime following) and
//!   say so with a change handed on ahead of the records it concerns. A
//!   [`Replay`] hands on records built in memory, without a kernel.
//! - The [`Attributor`] gives each kernel record its connection.
//! - A [`Consumer`] is what a command plugs in: it takes the records and
//!   does its periodic work after each round ([`Consumer::tick`]);
//!   [`Tracing`] is `zerotrace run`'s.
//! - [`Pipeline::run`] is the one loop: rounds ([`Pipeline::step`]) until
//!   stopped, then the probes are detached, what the buffers still hold is
//!   handed on, and the consumer finishes. A round is the same for every
//!   source (`RecordPath::round`), the connection table's upkeep included.

mod attribute;
mod follow;
mod replay;
mod source;
mod tracing;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use agent_common::UnitEvent;
use anyhow::Context;

pub use self::{
    attribute::Attributor,
    follow::Followers,
    replay::Replay,
    source::{Input, Source},
    tracing::{Periods, Tracing},
};
use crate::{
    capture::{Data, Reader, ReaderStats, reader::POLL_EVERY},
    conn::{ConnTable, Connection, seed::Seed},
    kernel::loader::{KernelCounters, LoadOptions, Probes, Transport},
    runtime::follow::Change,
    trace::Tracer,
};

/// Most connections the agent remembers at once.
pub const MAX_CONNECTIONS: usize = 65_536;
/// Default ring buffer size.
pub const DEFAULT_RINGBUF_BYTES: usize = 8 << 20;
/// Default perf buffer size per CPU.
pub const DEFAULT_PERF_BYTES_PER_CPU: usize = 1 << 20;

/// The default buffer size for a transport (`--buffer-size` unset).
pub fn default_buffer_bytes(transport: Transport) -> usize {
    match transport {
        Transport::RingBuf => DEFAULT_RINGBUF_BYTES,
        Transport::Perf => DEFAULT_PERF_BYTES_PER_CPU,
    }
}

/// A record with the connection it belongs to.
pub enum Record<'a> {
    Opened(&'a Connection),
    /// `None` when the connection is unknown (its open record was lost or evicted).
    Data(Option<&'a Connection>, &'a Data<'a>),
    Closed(&'a Connection),
    /// Dropped from the full connection table (only its id is known).
    Evicted(u64),
    /// A followed runtime made a unit of work.
    Unit(&'a UnitEvent),
    /// The process's runtime is followed: its records stamped from
    /// `since_ns` on carry units.
    Followed {
        tgid: u32,
        since_ns: u64,
    },
    /// The process exited; its runtime is no longer followed.
    Unfollowed(u32),
    /// The agent connected from this address: a traced peer of it must
    /// not be traced (its traffic is the agent's exports).
    OwnConnect(std::net::SocketAddr),
}

impl From<Change> for Record<'_> {
    fn from(change: Change) -> Self {
        match change {
            Change::Followed { tgid, since_ns } => Record::Followed { tgid, since_ns },
            Change::Unfollowed(tgid) => Record::Unfollowed(tgid),
        }
    }
}

/// What a command plugs into the record path.
pub trait Consumer {
    /// Each record, in order.
    fn record(&mut self, record: Record<'_>);

    /// Periodic work, after each round of [`Pipeline::run`] (about every
    /// [`POLL_EVERY`]): look at a clock ([`Every`]), rarely more.
    fn tick(&mut self, _pipeline: &mut Pipeline) {}

    /// Once, after the last records: the probes are detached and the
    /// buffers drained.
    fn finish(&mut self, _pipeline: &mut Pipeline) {}
}

/// The tracer alone, its spans going to its queue (benchmarks, tests).
impl Consumer for Tracer {
    fn record(&mut self, record: Record<'_>) {
        self.on_record(record);
    }

    fn tick(&mut self, _pipeline: &mut Pipeline) {
        self.end_round(crate::capture::monotonic_ns());
    }

    fn finish(&mut self, _pipeline: &mut Pipeline) {
        self.end_round(u64::MAX);
    }
}

/// Drops every record: measures the path up to attribution.
pub struct Discard;

impl Consumer for Discard {
    fn record(&mut self, _: Record<'_>) {}
}

/// The clock of one kind of periodic work: due once `period` has passed
/// since it last ran.
pub struct Every {
    period: Duration,
    last: Instant,
}

impl Every {
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            last: Instant::now(),
        }
    }

    /// Whether the work is due; if so, it counts as done now.
    pub fn due(&mut self) -> bool {
        let due = self.last.elapsed() >= self.period;
        if due {
            self.last = Instant::now();
        }
        due
    }

    /// Time since the work last ran.
    pub fn elapsed(&self) -> Duration {
        self.last.elapsed()
    }
}

/// Everything the pipeline counted.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PipelineStats {
    pub transport: &'static str,
    /// How receives reach their exit hook.
    pub receives: crate::kernel::loader::ReceiveArgs,
    pub reader: ReaderStats,
    pub kernel: KernelCounters,
    pub data_events: u64,
    pub payload_bytes: u64,
    pub orphan_data_events: u64,
    pub connections_open: usize,
    pub connections_evicted: u64,
}

impl PipelineStats {
    /// All losses: refused by the transport in the kernel, or reported
    /// lost by perf.
    pub fn lost(&self) -> u64 {
        self.kernel.events_lost + self.reader.lost
    }
}

/// How seeding the connection table from /proc went.
#[derive(Clone, Copy, Debug)]
pub struct SeedReport {
    pub started: SystemTime,
    pub duration: Duration,
    pub connections: usize,
    pub listeners: usize,
}

/// How often connections of exited processes are looked for.
const REAP_EVERY: Duration = Duration::from_secs(2);

/// The record path after the source, whatever the source: each kernel
/// record to its connection, each change as it is, then the connection
/// table's upkeep.
struct RecordPath {
    attributor: Attributor,
    /// When to look next for processes that exited.
    next_reap: Instant,
}

impl RecordPath {
    fn new(conns: ConnTable) -> Self {
        Self {
            attributor: Attributor::new(conns),
            next_reap: Instant::now() + REAP_EVERY,
        }
    }

    /// One round: what `source` has within `timeout`, handed to `consumer`.
    fn round(
        &mut self,
        source: &mut impl Source,
        timeout: Duration,
        consumer: &mut impl Consumer,
    ) -> anyhow::Result<u64> {
        let Self {
            attributor,
            next_reap,
        } = self;
        let now = Instant::now();
        let n = source.poll(timeout, &mut |input| match input {
            Input::Event(event) => attributor.event(event, now, &mut |r| consumer.record(r)),
            Input::Change(change) => consumer.record(change.into()),
        })?;
        let now = Instant::now();
        attributor.expire(now, &mut |r| consumer.record(r));
        if now >= *next_reap {
            *next_reap = now + REAP_EVERY;
            let alive = |tgid| std::path::Path::new(&format!("/proc/{tgid}")).exists();
            attributor.close_exited(alive, &mut |r| consumer.record(r));
            source.reap(alive, &mut |change| consumer.record(change.into()));
        }
        Ok(n)
    }
}

/// Installs SIGINT/SIGTERM handlers that set the returned flag.
pub fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing signal handler")?;
    }
    Ok(stop)
}

/// The record path from the kernel: probes, their transport's reader, the
/// followers, and the connection table seeded from /proc.
pub struct Pipeline {
    pub probes: Probes,
    pub seeded: SeedReport,
    pub followers: Followers,
    reader: Reader,
    path: RecordPath,
}

impl Pipeline {
    /// Loads and attaches the probes, seeds connections from /proc, looks
    /// at the running processes, and opens the transport.
    pub fn start(opts: &LoadOptions) -> anyhow::Result<Self> {
        crate::kernel::features::require_capabilities()?;
        let mut probes = Probes::load(opts)?;
        // Seed after attaching: a connection opened in between is seen by
        // the probes, one opened before is in /proc.
        let started = SystemTime::now();
        let clock = Instant::now();
        let seed = Seed::scan();
        let seeded = SeedReport {
            started,
            duration: clock.elapsed(),
            connections: seed.conns.len(),
            listeners: seed.listeners.len(),
        };
        let followers = Followers::start(opts, &mut probes);
        let map = probes.take_events_map()?;
        let reader = Reader::new(probes.transport, map, opts.buffer_bytes)?;
        Ok(Self {
            probes,
            seeded,
            followers,
            reader,
            path: RecordPath::new(ConnTable::new(MAX_CONNECTIONS, seed)),
        })
    }

    pub fn transport(&self) -> Transport {
        self.probes.transport
    }

    /// The loop: rounds until `stop` is set or `deadline` passes, each
    /// followed by the consumer's periodic work; then the last records and
    /// [`Consumer::finish`].
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        deadline: Option<Instant>,
        consumer: &mut impl Consumer,
    ) -> anyhow::Result<()> {
        while !stop.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d) {
            self.step(POLL_EVERY, consumer)?;
            consumer.tick(self);
        }
        // Detach first: nothing new arrives, and what is already in the
        // buffers still counts.
        self.probes.detach();
        self.step(Duration::ZERO, consumer)?;
        consumer.finish(self);
        Ok(())
    }

    /// One round: waits up to `timeout`, then hands on what the buffers hold.
    pub fn step(&mut self, timeout: Duration, consumer: &mut impl Consumer) -> anyhow::Result<u64> {
        let Self {
            probes,
            followers,
            reader,
            path,
            ..
        } = self;
        let mut kernel = source::Kernel {
            reader,
            probes,
            followers,
        };
        path.round(&mut kernel, timeout, consumer)
    }

    /// The largest reader batch since the previous call.
    pub fn take_interval_largest_batch(&mut self) -> u64 {
        self.reader.take_interval_largest_batch()
    }

    pub fn stats(&self) -> PipelineStats {
        let attributed = &self.path.attributor;
        PipelineStats {
            transport: self.probes.transport.name(),
            receives: self.probes.receives,
            reader: self.reader.stats(),
            kernel: self.probes.counters().unwrap_or_default(),
            data_events: attributed.data_events,
            payload_bytes: attributed.payload_bytes,
            orphan_data_events: attributed.orphans,
            connections_open: attributed.conns.len(),
            connections_evicted: attributed.conns.evicted,
        }
    }
}

#[cfg(test)]
mod tests {
    use agent_common::{ConnOpenEvent, DataEvent, EventHeader, EventKind, Role, Syscall};

    use super::*;

    /// The bytes of a plain-data record.
    fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: T is one of agent-common's repr(C) record layouts, whose
        // padding is explicit fields: every byte is initialized.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    const CONN: u64 = 1 << 32 | 7;

    fn header(kind: EventKind, detail: u8) -> EventHeader {
        EventHeader {
            kind: kind as u8,
            detail,
            tgid: std::process::id(),
            tid: std::process::id(),
            fd: 7,
            ts_ns: 1_000,
            conn_id: CONN,
            ..EventHeader::default()
        }
    }

    fn open() -> Vec<u8> {
        bytes_of(&ConnOpenEvent {
            header: header(EventKind::ConnOpen, Role::Server as u8),
            family: 2,
            local_port: 8080,
            remote_port: 40000,
            ..ConnOpenEvent::default()
        })
    }

    fn data(payload: &[u8]) -> Vec<u8> {
        let mut r = bytes_of(&DataEvent {
            header: header(EventKind::Data, Syscall::Read as u8),
            total_bytes: payload.len() as u64,
            captured: payload.len() as u32,
            ..DataEvent::default()
        });
        r.extend_from_slice(payload);
        r
    }

    fn close() -> Vec<u8> {
        bytes_of(&header(EventKind::ConnClose, 0))
    }

    /// Writes down what it is handed, one word a record.
    #[derive(Default)]
    struct Seen(Vec<String>);

    impl Consumer for Seen {
        fn record(&mut self, record: Record<'_>) {
            self.0.push(match record {
                Record::Opened(c) => format!("opened {:#x}", c.conn_id),
                Record::Data(Some(c), d) => format!("data {:#x} {}", c.conn_id, d.payload.len()),
                Record::Data(None, d) => format!("orphan {}", d.payload.len()),
                Record::Closed(c) => format!("closed {:#x} in {}", c.conn_id, c.bytes_in),
                Record::Evicted(id) => format!("evicted {id:#x}"),
                Record::Unit(_) => "unit".to_owned(),
                Record::Followed { tgid, .. } => format!("followed {tgid}"),
                Record::Unfollowed(tgid) => format!("unfollowed {tgid}"),
                Record::OwnConnect(local) => format!("own {local}"),
            });
        }
    }

    #[test]
    fn a_replay_attributes_records_as_the_kernel_pipeline_does() {
        let mut replay = Replay::default();
        let mut seen = Seen::default();
        // Data read before its open record (perf's per-CPU order) waits for it.
        let n = replay.feed(&[data(b"GET"), open(), data(b"ab"), close()], &mut seen);
        assert_eq!(n, 4);
        assert_eq!(
            seen.0,
            [
                "opened 0x100000007",
                "data 0x100000007 3",
                "data 0x100000007 2",
                "closed 0x100000007 in 5"
            ]
        );
        let attributed = &replay.path.attributor;
        assert_eq!((attributed.data_events, attributed.payload_bytes), (2, 5));
        assert_eq!(attributed.conns.len(), 0);
    }

    #[test]
    fn a_replay_counts_what_does_not_decode() {
        let mut replay = Replay::default();
        let mut seen = Seen::default();
        assert_eq!(replay.feed(&[vec![0xff; 3]], &mut seen), 1);
        assert_eq!(replay.undecodable, 1);
        assert!(seen.0.is_empty());
    }

    /// A source that hands on a follower's change ahead of its records, and
    /// one more change when asked to reap.
    struct Scripted {
        records: Vec<Vec<u8>>,
        reaped: bool,
    }

    impl Source for Scripted {
        fn poll(&mut self, _: Duration, each: &mut impl FnMut(Input<'_>)) -> anyhow::Result<u64> {
            each(Input::Change(Change::Followed {
                tgid: 42,
                since_ns: 1,
            }));
            for r in &self.records {
                each(Input::Event(crate::capture::decode(r)?));
            }
            Ok(self.records.len() as u64)
        }

        fn reap(&mut self, _: impl Fn(u32) -> bool + Copy, changed: &mut impl FnMut(Change)) {
            self.reaped = true;
            changed(Change::Unfollowed(42));
        }
    }

    #[test]
    fn a_round_hands_changes_on_in_order_and_reaps_on_its_clock() {
        let mut path = RecordPath::new(ConnTable::new(4, Seed::default()));
        let mut source = Scripted {
            records: vec![open()],
            reaped: false,
        };
        let mut seen = Seen::default();
        path.round(&mut source, Duration::ZERO, &mut seen).unwrap();
        assert_eq!(seen.0, ["followed 42", "opened 0x100000007"]);
        assert!(!source.reaped, "reaped before its time");

        path.next_reap = Instant::now();
        source.records.clear();
        seen.0.clear();
        path.round(&mut source, Duration::ZERO, &mut seen).unwrap();
        // This process is alive: its connection stays open.
        assert_eq!(seen.0, ["followed 42", "unfollowed 42"]);
        assert!(path.next_reap > Instant::now());
    }

    #[test]
    fn periodic_work_is_due_once_per_period() {
        let mut always = Every::new(Duration::ZERO);
        assert!(always.due());
        assert!(always.due());
        let mut hourly = Every::new(Duration::from_secs(3600));
        assert!(!hourly.due());
        assert!(hourly.elapsed() < Duration::from_secs(3600));
    }
}
