//! Draining the ring buffer or the per-CPU perf buffers.
//!
//! One thread polls every buffer's fd and drains whatever is ready, handing
//! each decoded record to a callback with its payload borrowed straight
//! from the mapped buffer (copied only when a perf sample wraps).

use std::{
    os::fd::{AsFd, BorrowedFd},
    time::Duration,
};

use anyhow::Context;
use aya::{
    maps::{
        Map, MapData, PerfEventArray, RingBuf,
        perf::{PerfEvent, PerfEventArrayBuffer},
    },
    util::online_cpus,
};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::event::{Event, decode};
use crate::kernel::loader::Transport;

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
    Ring(RingBuf<MapData>),
    Perf(Vec<PerfEventArrayBuffer<MapData>>),
}

pub struct Reader {
    buffers: Buffers,
    stats: ReaderStats,
    /// Most records drained in one wake-up since the last
    /// [`Reader::take_interval_largest_batch`].
    interval_largest_batch: u64,
    /// Reassembly space for perf samples that wrap around the ring's end.
    wrapped: Vec<u8>,
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
            Transport::RingBuf => Buffers::Ring(RingBuf::try_from(map).context("ring buffer map")?),
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
            wrapped: Vec::new(),
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
    /// Returns how many records were handed to `on_event`.
    pub fn poll(
        &mut self,
        timeout: Duration,
        on_event: &mut impl FnMut(Event<'_>),
    ) -> anyhow::Result<u64> {
        let fds: Vec<BorrowedFd<'_>> = match &self.buffers {
            Buffers::Ring(ring) => vec![ring.as_fd()],
            Buffers::Perf(bufs) => bufs.iter().map(AsFd::as_fd).collect(),
        };
        let mut pollfds: Vec<PollFd<'_>> = fds
            .iter()
            .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
            .collect();
        let ms = PollTimeout::from(timeout.as_millis().min(60_000) as u16);
        match poll(&mut pollfds, ms) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e).context("polling event buffers"),
        }
        drop(pollfds);
        Ok(self.drain(on_event))
    }

    /// Hands every available record to `on_event` without waiting.
    pub fn drain(&mut self, on_event: &mut impl FnMut(Event<'_>)) -> u64 {
        let Self {
            buffers,
            stats,
            wrapped,
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
                while let Some(item) = ring.next() {
                    handle(&item, stats);
                }
            }
            Buffers::Perf(bufs) => {
                for buf in bufs.iter_mut() {
                    buf.for_each(|event| match event {
                        PerfEvent::Sample { head, tail: [] } => handle(head, stats),
                        PerfEvent::Sample { head, tail } => {
                            wrapped.clear();
                            wrapped.extend_from_slice(head);
                            wrapped.extend_from_slice(tail);
                            handle(wrapped, stats);
                        }
                        PerfEvent::Lost { count } => stats.lost += count,
                    });
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
    fn perf_pages_are_powers_of_two() {
        assert_eq!(super::perf_pages(0), 1);
        assert_eq!(super::perf_pages(4096 * 3), 4);
        assert_eq!(super::perf_pages(1 << 20), 256);
    }
}
