//! Sources: where the record path's input comes from. The kernel source is
//! the capture reader with the followers; a replay hands on records built
//! in memory. Both hand on the same [`Input`], so everything after them is
//! one path.

use std::time::{Duration, Instant};

use super::follow::Followers;
use crate::{
    capture::{Event, Reader, decode},
    kernel::loader::Probes,
    runtime::follow::Change,
};

/// What a source hands on.
pub enum Input<'a> {
    /// A decoded kernel record, still to be attributed to its connection.
    Event(Event<'a>),
    /// What a follower changed: goes to the consumer as it is.
    Change(Change),
}

/// Where the record path's input comes from.
pub trait Source {
    /// Waits up to `timeout` for records and hands each on, in order.
    /// Returns how many kernel records were read.
    fn poll(&mut self, timeout: Duration, each: &mut impl FnMut(Input<'_>)) -> anyhow::Result<u64>;

    /// Forgets processes for which `alive` is false (every few seconds).
    fn reap(&mut self, alive: impl Fn(u32) -> bool + Copy, changed: &mut impl FnMut(Change));
}

/// The kernel's records (through the transport's buffers) with the
/// followers' changes; borrowed from the [`Pipeline`](super::Pipeline) for
/// one round.
pub(super) struct Kernel<'a> {
    pub reader: &'a mut Reader,
    pub probes: &'a mut Probes,
    pub followers: &'a mut Followers,
}

impl Source for Kernel<'_> {
    fn poll(&mut self, timeout: Duration, each: &mut impl FnMut(Input<'_>)) -> anyhow::Result<u64> {
        let Self {
            reader,
            probes,
            followers,
        } = self;
        followers.take_found_at_start(&mut |change| each(Input::Change(change)));
        let now = Instant::now();
        let read = reader.poll(timeout, &mut |event| {
            followers.observe(&event, now, probes, &mut |change| {
                each(Input::Change(change));
            });
            each(Input::Event(event));
        })?;
        followers.after_poll(Instant::now(), probes);
        Ok(read)
    }

    fn reap(&mut self, alive: impl Fn(u32) -> bool + Copy, changed: &mut impl FnMut(Change)) {
        self.followers.reap(alive, self.probes, changed);
        self.probes.clear_holes_flag();
    }
}

/// Records as the kernel writes them, handed on as one reader batch; no
/// followers (there is no kernel to change).
pub(super) struct Batch<'a, R> {
    pub records: &'a [R],
    /// Records that did not decode, counted as the reader counts them.
    pub undecodable: &'a mut u64,
}

impl<R: AsRef<[u8]>> Source for Batch<'_, R> {
    fn poll(&mut self, _: Duration, each: &mut impl FnMut(Input<'_>)) -> anyhow::Result<u64> {
        for record in self.records {
            match decode(record.as_ref()) {
                Ok(event) => each(Input::Event(event)),
                Err(_) => *self.undecodable += 1,
            }
        }
        Ok(self.records.len() as u64)
    }

    fn reap(&mut self, _: impl Fn(u32) -> bool + Copy, _: &mut impl FnMut(Change)) {}
}
