//! Wires the stages: kernel probes → capture reader → connection table,
//! handing each record with its connection to a consumer until stopped.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use agent_common::UnitEvent;
use anyhow::Context;

use crate::{
    capture::{Data, Event, Reader, ReaderStats},
    conn::{ConnTable, Connection, early::EarlyQueue, seed::Seed},
    kernel::loader::{KernelCounters, LoadOptions, Probes, Transport},
    runtime::follow::{Change, Follower},
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
}

impl From<Change> for Record<'_> {
    fn from(change: Change) -> Self {
        match change {
            Change::Followed { tgid, since_ns } => Record::Followed { tgid, since_ns },
            Change::Unfollowed(tgid) => Record::Unfollowed(tgid),
        }
    }
}

/// Everything the pipeline counted.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PipelineStats {
    pub transport: &'static str,
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

pub struct Pipeline {
    pub probes: Probes,
    pub seeded: SeedReport,
    reader: Reader,
    attributor: Attributor,
    /// Processes whose runtime is followed.
    pub runtimes: Follower,
    /// Runtime changes found at start, handed on with the first records.
    pending: Vec<Change>,
    /// When to look next for connections of processes that exited.
    next_reap: Instant,
}

/// How often connections of exited processes are looked for.
const REAP_EVERY: Duration = Duration::from_secs(2);

/// The userspace stage after decoding: attributes each record to its
/// connection (opening, counting and closing them in the table) and hands
/// it on as a [`Record`]. Separate from the reader so that it can be driven
/// without a kernel (benchmarks, fuzzing).
pub struct Attributor {
    conns: ConnTable,
    /// Data read before its connection's open record (perf reorders CPUs).
    early: EarlyQueue,
    data_events: u64,
    payload_bytes: u64,
    orphans: u64,
}

/// Counts a data event on its connection and hands it on.
fn deliver(conn: &mut Connection, data: &Data<'_>, on_record: &mut impl FnMut(Record<'_>)) {
    conn.count(data);
    on_record(Record::Data(Some(conn), data));
}

impl Attributor {
    pub fn new(conns: ConnTable) -> Self {
        Self {
            conns,
            early: EarlyQueue::default(),
            data_events: 0,
            payload_bytes: 0,
            orphans: 0,
        }
    }

    /// Handles one decoded record read at `now`.
    pub fn event(
        &mut self,
        event: Event<'_>,
        now: Instant,
        on_record: &mut impl FnMut(Record<'_>),
    ) {
        let Self {
            conns,
            early,
            data_events,
            payload_bytes,
            orphans,
        } = self;
        match event {
            Event::Open(open) => {
                conns.open(&open);
                for id in std::mem::take(&mut conns.just_evicted) {
                    on_record(Record::Evicted(id));
                }
                if let Some(conn) = conns.get_mut(open.header.conn_id) {
                    on_record(Record::Opened(conn));
                    for held in early.take(open.header.conn_id) {
                        deliver(conn, &held.as_data(), on_record);
                    }
                }
            }
            Event::Data(data) => {
                *data_events += 1;
                *payload_bytes += data.payload.len() as u64;
                match conns.get_mut(data.header.conn_id) {
                    Some(conn) => deliver(conn, &data, on_record),
                    None => {
                        if !early.hold(&data, now) {
                            *orphans += 1;
                            on_record(Record::Data(None, &data));
                        }
                    }
                }
            }
            Event::Close(header) => {
                if let Some(conn) = conns.close(header.conn_id) {
                    on_record(Record::Closed(&conn));
                }
            }
            Event::Unit(unit) => on_record(Record::Unit(&unit)),
        }
    }

    /// Closes the connections of processes for which `alive` is false
    /// (their sockets went with them, without a close(2) to see).
    pub fn close_exited(
        &mut self,
        alive: impl Fn(u32) -> bool,
        on_record: &mut impl FnMut(Record<'_>),
    ) {
        for conn in self.conns.close_exited(alive) {
            on_record(Record::Closed(&conn));
        }
    }

    /// Gives up on data that waited too long for its open record.
    pub fn expire(&mut self, now: Instant, on_record: &mut impl FnMut(Record<'_>)) {
        for held in self.early.expire(now) {
            self.orphans += 1;
            on_record(Record::Data(None, &held.as_data()));
        }
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

impl Pipeline {
    /// Loads and attaches the probes, seeds connections from /proc, and
    /// opens the transport.
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
        let mut runtimes = Follower::new(opts.runtimes.clone());
        let pending = runtimes.scan(&mut probes);
        let map = probes.take_events_map()?;
        let reader = Reader::new(probes.transport, map, opts.buffer_bytes)?;
        Ok(Self {
            probes,
            seeded,
            reader,
            attributor: Attributor::new(ConnTable::new(MAX_CONNECTIONS, seed)),
            runtimes,
            pending,
            next_reap: Instant::now() + REAP_EVERY,
        })
    }

    pub fn transport(&self) -> Transport {
        self.probes.transport
    }

    /// Processes records until `stop` is set or `deadline` passes; calls
    /// `tick` about every `tick_every`.
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        deadline: Option<Instant>,
        tick_every: Duration,
        on_record: &mut impl FnMut(Record<'_>),
        tick: &mut impl FnMut(&Self),
    ) -> anyhow::Result<()> {
        let mut next_tick = Instant::now() + tick_every;
        while !stop.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d) {
            self.step(crate::capture::reader::POLL_EVERY, on_record)?;
            if Instant::now() >= next_tick {
                tick(self);
                next_tick += tick_every;
            }
        }
        // Whatever is already in the buffers still counts.
        self.step(Duration::ZERO, on_record)?;
        Ok(())
    }

    /// One wait-and-drain round.
    pub fn step(
        &mut self,
        timeout: Duration,
        on_record: &mut impl FnMut(Record<'_>),
    ) -> anyhow::Result<u64> {
        let Self {
            reader,
            attributor,
            next_reap,
            probes,
            runtimes,
            pending,
            ..
        } = self;
        for change in pending.drain(..) {
            on_record(change.into());
        }
        let now = Instant::now();
        let n = reader.poll(timeout, &mut |event| {
            // A process is inspected for a runtime to follow when its
            // traffic is first seen.
            if let Event::Data(data) = &event
                && let Some(change) = runtimes.observe(data.header.tgid, now, probes)
            {
                on_record(change.into());
            }
            attributor.event(event, now, on_record);
        })?;
        let now = Instant::now();
        attributor.expire(now, on_record);
        if now >= *next_reap {
            *next_reap = now + REAP_EVERY;
            let alive = |tgid| std::path::Path::new(&format!("/proc/{tgid}")).exists();
            attributor.close_exited(alive, on_record);
            for change in runtimes.reap(alive, probes) {
                on_record(change.into());
            }
        }
        Ok(n)
    }

    /// The largest reader batch since the previous call.
    pub fn take_interval_largest_batch(&mut self) -> u64 {
        self.reader.take_interval_largest_batch()
    }

    pub fn stats(&self) -> PipelineStats {
        PipelineStats {
            transport: self.probes.transport.name(),
            reader: self.reader.stats(),
            kernel: self.probes.counters().unwrap_or_default(),
            data_events: self.attributor.data_events,
            payload_bytes: self.attributor.payload_bytes,
            orphan_data_events: self.attributor.orphans,
            connections_open: self.attributor.conns.len(),
            connections_evicted: self.attributor.conns.evicted,
        }
    }
}
