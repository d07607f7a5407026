//! The consumer side of the BPF ring buffer, read in place.
//!
//! The kernel maps the ring three ways: a consumer page the reader writes
//! its position to, a producer page with the kernel's position, and the
//! data pages, mapped twice in a row so that a record wrapping past the
//! end reads as one slice. Each record is an 8-byte header (length, a busy
//! and a discard bit, a page offset) and its bytes, padded to 8.
//!
//! aya's reader publishes its position after every record. The kernel
//! reads that position on every reservation (is there room?), so each
//! record cost a cache line moved from the agent's core to the writing
//! CPU's and back. This reader publishes once per drain, or every
//! [`PUBLISH_EVERY`] bytes in a long one: at most that much of the ring
//! stays held after it was read.

use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicUsize, Ordering, fence},
};

use anyhow::{Context, bail};
use aya::maps::{Map, MapData};

/// Set while the kernel writes the record.
const BUSY_BIT: u32 = 1 << 31;
/// Set when the kernel gave the reservation up: skipped.
const DISCARD_BIT: u32 = 1 << 30;
const HEADER_BYTES: usize = 8;

/// Bytes read before the position is published in the middle of a drain
/// (an eighth of a smaller ring).
pub const PUBLISH_EVERY: usize = 64 * 1024;

/// A shared mapping, unmapped on drop.
struct Mapping {
    at: NonNull<libc::c_void>,
    len: usize,
}

impl Mapping {
    fn new(
        fd: BorrowedFd<'_>,
        len: usize,
        prot: libc::c_int,
        offset: usize,
    ) -> anyhow::Result<Self> {
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks
        // the length, protection and offset against the ring's layout.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mapping the ring buffer");
        }
        let at = NonNull::new(at).context("mapping the ring buffer: null")?;
        Ok(Self { at, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped by `new` with this length, unmapped once.
        unsafe { libc::munmap(self.at.as_ptr(), self.len) };
    }
}

pub struct Ring {
    /// Keeps the map (and so the mappings' object) alive.
    _map: MapData,
    consumer: Mapping,
    /// The producer page, then the data pages twice.
    producer: Mapping,
    page: usize,
    cursor: Cursor,
}

// SAFETY: the mappings are owned by the ring and only read (or, the
// consumer page, written) through `&mut self`.
unsafe impl Send for Ring {}

impl Ring {
    pub fn new(map: Map) -> anyhow::Result<Self> {
        let Map::RingBuf(map) = map else {
            bail!("the events map is not a ring buffer");
        };
        let size = map.info().context("ring buffer size")?.max_entries() as usize;
        if !size.is_power_of_two() {
            bail!("ring buffer of {size} bytes: not a power of two");
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let fd = map.fd().as_fd();
        let consumer = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd, page + 2 * size, libc::PROT_READ, page)?;
        // A map in use before (pinned) starts where its last reader left off.
        let pos = positions(&producer, &consumer).1.load(Ordering::Acquire);
        Ok(Self {
            _map: map,
            consumer,
            producer,
            page,
            cursor: Cursor::new(size, pos),
        })
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self._map.fd().as_fd()
    }

    /// Hands every committed record to `on_record`, in order, and returns
    /// how many. A record the kernel is still writing ends the drain: the
    /// next one starts there.
    pub fn drain(&mut self, on_record: impl FnMut(&[u8])) -> u64 {
        let Self {
            producer,
            consumer,
            page,
            cursor,
            ..
        } = self;
        // SAFETY: the data pages follow the producer page, mapped twice in
        // a row, `size` bytes each: what `Cursor::drain` asks for.
        let data = unsafe { producer.at.as_ptr().cast::<u8>().add(*page) };
        let (producer, consumer) = positions(producer, consumer);
        // SAFETY: as above; the mappings outlive the call.
        unsafe { cursor.drain(data, producer, consumer, on_record) }
    }
}

/// The kernel's `producer_pos` and `consumer_pos`: each page starts with
/// its `unsigned long`, aligned, shared with the kernel.
fn positions<'a>(
    producer: &'a Mapping,
    consumer: &'a Mapping,
) -> (&'a AtomicUsize, &'a AtomicUsize) {
    // SAFETY: both pages stay mapped while their `Mapping`s live; the
    // kernel stores `producer_pos` with release after the record header,
    // and reads `consumer_pos`, which only this reader writes.
    unsafe {
        (
            producer.at.cast::<AtomicUsize>().as_ref(),
            consumer.at.cast::<AtomicUsize>().as_ref(),
        )
    }
}

/// Where the reader is in the ring, apart from the memory it reads.
#[derive(Debug)]
struct Cursor {
    mask: usize,
    publish_every: usize,
    /// How far this reader has read.
    pos: usize,
    /// How far the kernel has been told it has read.
    published: usize,
    /// A record header made no sense: reading stopped (said once).
    broken: bool,
}

impl Cursor {
    fn new(size: usize, pos: usize) -> Self {
        Self {
            mask: size - 1,
            publish_every: PUBLISH_EVERY.min(size / 8),
            pos,
            published: pos,
            broken: false,
        }
    }

    fn publish(&mut self, consumer: &AtomicUsize) {
        if self.published != self.pos {
            // Release: the kernel may reuse the space once it sees this.
            consumer.store(self.pos, Ordering::Release);
            self.published = self.pos;
        }
    }

    /// Reads the records from `pos` up to the producer's position.
    ///
    /// # Safety
    ///
    /// `data` points at the ring's `size` data bytes followed by the same
    /// bytes again (the kernel's double mapping), valid for reads during
    /// the call.
    unsafe fn drain(
        &mut self,
        data: *const u8,
        producer: &AtomicUsize,
        consumer: &AtomicUsize,
        mut on_record: impl FnMut(&[u8]),
    ) -> u64 {
        let mut records = 0;
        if self.broken {
            return records;
        }
        let mut end = producer.load(Ordering::Acquire);
        loop {
            if self.pos == end {
                self.publish(consumer);
                // Records committed while this drain ran.
                fence(Ordering::SeqCst);
                end = producer.load(Ordering::Acquire);
                if self.pos == end {
                    break;
                }
            }
            let offset = self.pos & self.mask;
            // SAFETY: `offset` (< size) plus a header lies inside the two
            // copies of the data; headers are 8-aligned.
            let header = unsafe { &*data.add(offset).cast::<AtomicU32>() };
            // Acquire pairs with the kernel's commit (an xchg clearing BUSY).
            let word = header.load(Ordering::Acquire);
            if word & BUSY_BIT != 0 {
                break;
            }
            let len = (word & !(BUSY_BIT | DISCARD_BIT)) as usize;
            if len > self.mask + 1 - HEADER_BYTES {
                log::error!(
                    "ring buffer record of {len} bytes at {offset}: the ring is not read any more"
                );
                self.broken = true;
                break;
            }
            if word & DISCARD_BIT == 0 {
                // SAFETY: a committed record of `len` bytes after its
                // header; with the second copy, offset + 8 + len stays
                // within the 2 × size data bytes.
                let bytes =
                    unsafe { std::slice::from_raw_parts(data.add(offset + HEADER_BYTES), len) };
                on_record(bytes);
                records += 1;
            }
            self.pos += (HEADER_BYTES + len).next_multiple_of(8);
            if self.pos.wrapping_sub(self.published) >= self.publish_every {
                self.publish(consumer);
            }
        }
        self.publish(consumer);
        records
    }
}

#[cfg(test)]
mod tests;
