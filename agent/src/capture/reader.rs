//! Draining the ring buffer or the per-CPU perf buffers.
//!
//! One thread waits on the ring buffer's fd, or naps between looks at the
//! perf buffers, and drains whatever is ready, handing each decoded record
//! to a callback: ring buffer records with their payload borrowed straight
//! from the mapped buffer; perf samples copied out and merged across CPUs by
//! timestamp first.

use std::time::Duration;

use anyhow::Context;
use aya::{
    maps::{
        Map, MapData, PerfEventArray,
        perf::{PerfEvent, PerfEventArrayBuffer},
    },
    util::online_cpus,
};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::{
    event::{Event, decode},
    ring::Ring,
};
use crate::kernel::loader::Transport;

/// How often the agent drains the buffers when nothing wakes it: the
/// longest a record waits in a ring buffer that no CPU has yet found an
/// eighth full (agent-ebpf emit.rs `ring_wants_reader`).
pub const POLL_EVERY: Duration = Duration::from_millis(10);

/// How long the reader naps between drains of the perf buffers. aya opens
/// them to signal every sample (`wakeup_events` 1), so waiting on their fds
/// woke this thread once per record: a context switch per traced syscall,
/// which cost more than everything else per request together. A nap's
/// records fit many times over in a CPU's buffer (1 MiB by default, some
/// 25 ms at nginx saturation here).
pub const PERF_NAP: Duration = Duration::from_millis(2);

/// What a reader has seen. Kernel-side losses are counted separately
/// (`KernelCounters`); `lost` here is what perf reported as dropped.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ReaderStats {
    pub records: u64,
    pub bytes: u64,
    pub lost: u64,
    pub decode_errors: u64,
    /// Most records drained in one wake-up.
    pub largest_batch: u64,
    /// Wake-ups that found records.
    pub reads: u64,
}

enum Buffers {
    Ring(Ring),
    Perf(Vec<PerfEventArrayBuffer<MapData>>),
}

pub struct Reader {
    buffers: Buffers,
    stats: ReaderStats,
    /// Most records drained in one wake-up since the last
    /// [`Reader::take_interval_largest_batch`].
    interval_largest_batch: u64,
    /// Perf samples of one wake-up, copied out to be merged across CPUs.
    merged: Vec<u8>,
    /// (timestamp, offset, length) of each sample in `merged`.
    order: Vec<(u64, usize, usize)>,
}

/// `EventHeader::ts_ns` of a raw record (bytes 16..24), 0 when too short.
fn timestamp(record: &[u8]) -> u64 {
    record
        .get(16..24)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// Pages per CPU for perf buffers: a power of two covering `bytes`.
pub fn perf_pages(bytes: usize) -> usize {
    (bytes / 4096).max(1).next_power_of_two()
}

impl Reader {
    /// Opens the transport's buffers. `buffer_bytes` sizes each perf buffer
    /// (the ring buffer was sized at load).
    pub fn new(transport: Transport, map: Map, buffer_bytes: usize) -> anyhow::Result<Self> {
        let buffers = match transport {
            Transport::RingBuf => Buffers::Ring(Ring::new(map).context("ring buffer map")?),
            Transport::Perf => {
                let mut array = PerfEventArray::try_from(map).context("perf event array map")?;
                let cpus = online_cpus()
                    .map_err(|(_, e)| e)
                    .context("reading online CPUs")?;
                let pages = perf_pages(buffer_bytes);
                let buffers = cpus
                    .into_iter()
                    .map(|cpu| array.open(cpu, Some(pages)))
                    .collect::<Result<Vec<_>, _>>()
                    .context("opening perf buffers")?;
                Buffers::Perf(buffers)
            }
        };
        Ok(Self {
            buffers,
            stats: ReaderStats::default(),
            interval_largest_batch: 0,
            merged: Vec::new(),
            order: Vec::new(),
        })
    }

    pub fn stats(&self) -> ReaderStats {
        self.stats
    }

    /// The largest batch since the previous call (for interval reports).
    pub fn take_interval_largest_batch(&mut self) -> u64 {
        std::mem::take(&mut self.interval_largest_batch)
    }

    /// Waits up to `timeout` for records, then drains every ready buffer.
    /// The ring buffer wakes the reader only when a CPU's periodic look finds
    /// it an eighth full (agent-ebpf emit.rs), so callers poll with
    /// [`POLL_EVERY`]. The perf buffers are not waited on but drained every
    /// [`PERF_NAP`].
    /// Returns how many records were handed to `on_event`.
    pub fn poll(
        &mut self,
        timeout: Duration,
        on_event: &mut impl FnMut(Event<'_>),
    ) -> anyhow::Result<u64> {
        match &self.buffers {
            Buffers::Ring(ring) => {
                let mut pollfds = [PollFd::new(ring.as_fd(), PollFlags::POLLIN)];
                let ms = PollTimeout::from(timeout.as_millis().min(60_000) as u16);
                match poll(&mut pollfds, ms) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e).context("polling event buffers"),
                }
            }
            Buffers::Perf(_) => std::thread::sleep(timeout.min(PERF_NAP)),
        }
        Ok(self.drain(on_event))
    }

    /// Hands every available record to `on_event` without waiting.
    pub fn drain(&mut self, on_event: &mut impl FnMut(Event<'_>)) -> u64 {
        let Self {
            buffers,
            stats,
            merged,
            order,
            ..
        } = self;
        let mut batch = 0u64;
        let mut handle = |bytes: &[u8], stats: &mut ReaderStats| {
            batch += 1;
            stats.records += 1;
            stats.bytes += bytes.len() as u64;
            match decode(bytes) {
                Ok(event) => on_event(event),
                Err(e) => {
                    stats.decode_errors += 1;
                    log::debug!("undecodable record: {e}");
                }
            }
        };
        match buffers {
            Buffers::Ring(ring) => {
                ring.drain(|record| handle(record, stats));
            }
            Buffers::Perf(bufs) => {
                // One buffer per CPU: a thread that migrated between two
                // syscalls left its records in two buffers. Merge what this
                // wake-up found by kernel timestamp, so each connection's
                // records arrive in the order they happened.
                merged.clear();
                order.clear();
                for buf in bufs.iter_mut() {
                    buf.for_each(|event| match event {
                        PerfEvent::Sample { head, tail } => {
                            let start = merged.len();
                            merged.extend_from_slice(head);
                            merged.extend_from_slice(tail);
                            let record = &merged[start..];
                            order.push((timestamp(record), start, record.len()));
                        }
                        PerfEvent::Lost { count } => stats.lost += count,
                    });
                }
                order.sort_by_key(|&(ts, _, _)| ts);
                for &(_, start, len) in order.iter() {
                    handle(&merged[start..start + len], stats);
                }
            }
        }
        stats.largest_batch = stats.largest_batch.max(batch);
        if batch > 0 {
            stats.reads += 1;
        }
        self.interval_largest_batch = self.interval_largest_batch.max(batch);
        batch
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn record_timestamps_come_from_the_header() {
        let header = agent_common::EventHeader {
            ts_ns: 0x0102_0304_0506_0708,
            ..Default::default()
        };
        // SAFETY: EventHeader is repr(C) plain data.
        let bytes: [u8; 32] = unsafe { std::mem::transmute(header) };
        assert_eq!(super::timestamp(&bytes), 0x0102_0304_0506_0708);
        assert_eq!(super::timestamp(&bytes[..20]), 0);
    }

    #[test]
    fn perf_pages_are_powers_of_two() {
        assert_eq!(super::perf_pages(0), 1);
        assert_eq!(super::perf_pages(4096 * 3), 4);
        assert_eq!(super::perf_pages(1 << 20), 256);
    }
}
