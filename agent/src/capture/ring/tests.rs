//! The reader on plain memory laid out as the kernel lays the ring out:
//! records of an 8-byte header and their bytes padded to 8, the data
//! twice in a row.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{BUSY_BIT, Cursor, DISCARD_BIT, HEADER_BYTES};

/// A ring of `size` bytes written as the kernel would.
struct FakeRing {
    size: usize,
    /// 2 × size bytes, 8-aligned: the data and its second copy.
    mem: *mut u8,
    words: usize,
    producer: AtomicUsize,
    consumer: AtomicUsize,
}

impl FakeRing {
    fn new(size: usize, at: usize) -> Self {
        let words = 2 * size / 8;
        let mem = Box::into_raw(vec![0u64; words].into_boxed_slice()).cast::<u8>();
        Self {
            size,
            mem,
            words,
            producer: AtomicUsize::new(at),
            consumer: AtomicUsize::new(at),
        }
    }

    /// Writes `bytes` at ring position `pos` into both copies.
    fn put(&self, pos: usize, bytes: &[u8]) {
        for (k, &b) in bytes.iter().enumerate() {
            let at = (pos + k) & (self.size - 1);
            // SAFETY: at < size, and at + size < 2 × size.
            unsafe {
                self.mem.add(at).write(b);
                self.mem.add(at + self.size).write(b);
            }
        }
    }

    /// Reserves and commits (or leaves busy, or discards) a record at the
    /// producer's position; returns where it starts.
    fn push(&self, payload: &[u8], flags: u32) -> usize {
        let pos = self.producer.load(Ordering::Relaxed);
        let mut header = [0u8; HEADER_BYTES];
        header[..4].copy_from_slice(&(payload.len() as u32 | flags).to_ne_bytes());
        self.put(pos, &header);
        self.put(pos + HEADER_BYTES, payload);
        let next = pos + (HEADER_BYTES + payload.len()).next_multiple_of(8);
        self.producer.store(next, Ordering::Release);
        pos
    }

    /// Clears the busy bit of the record at `pos` (its commit).
    fn commit(&self, pos: usize, len: usize) {
        self.put(pos, &(len as u32).to_ne_bytes());
    }

    fn drain(&self, cursor: &mut Cursor) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        // SAFETY: `mem` holds the data twice, as `drain` asks.
        let n = unsafe {
            cursor.drain(self.mem, &self.producer, &self.consumer, |r| {
                got.push(r.to_vec())
            })
        };
        assert_eq!(n as usize, got.len());
        got
    }
}

impl Drop for FakeRing {
    fn drop(&mut self) {
        // SAFETY: made by `new` from a boxed slice of `words` u64s.
        drop(unsafe {
            Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.mem.cast::<u64>(),
                self.words,
            ))
        });
    }
}

#[test]
fn reads_records_in_order_and_skips_discarded_ones() {
    let ring = FakeRing::new(4096, 0);
    let mut cursor = Cursor::new(4096, 0);
    ring.push(b"first", 0);
    ring.push(b"given up", DISCARD_BIT);
    ring.push(b"third record", 0);
    assert_eq!(ring.drain(&mut cursor), [&b"first"[..], b"third record"]);
    // Everything read is handed back to the kernel, discarded space too.
    let end = ring.producer.load(Ordering::Relaxed);
    assert_eq!(ring.consumer.load(Ordering::Relaxed), end);
    assert!(ring.drain(&mut cursor).is_empty());
}

#[test]
fn a_record_still_being_written_ends_the_drain_and_is_read_next() {
    let ring = FakeRing::new(4096, 0);
    let mut cursor = Cursor::new(4096, 0);
    ring.push(b"done", 0);
    let busy = ring.push(b"in progress", BUSY_BIT);
    ring.push(b"after it", 0);
    assert_eq!(ring.drain(&mut cursor), [b"done"]);
    // The kernel may not reuse the busy record's space yet.
    assert_eq!(ring.consumer.load(Ordering::Relaxed), busy);
    ring.commit(busy, b"in progress".len());
    assert_eq!(ring.drain(&mut cursor), [&b"in progress"[..], b"after it"]);
}

#[test]
fn a_record_that_wraps_past_the_end_reads_whole() {
    // Positions only grow; the record starts 24 bytes before the end of
    // the 256-byte data and runs 40 bytes past it.
    let start = 3 * 256 + 232;
    let ring = FakeRing::new(256, start);
    let mut cursor = Cursor::new(256, start);
    let payload: Vec<u8> = (0..64).collect();
    ring.push(&payload, 0);
    ring.push(b"next", 0);
    assert_eq!(ring.drain(&mut cursor), [payload, b"next".to_vec()]);
    assert_eq!(ring.consumer.load(Ordering::Relaxed), start + 72 + 16);
}

#[test]
fn a_long_drain_hands_space_back_as_it_goes() {
    // A 1 KiB ring publishes every 128 bytes read (an eighth of it).
    let ring = FakeRing::new(1024, 0);
    let mut cursor = Cursor::new(1024, 0);
    for k in 0..20u8 {
        ring.push(&[k; 24], 0);
    }
    let end = ring.producer.load(Ordering::Relaxed);
    let mut seen = Vec::new();
    // SAFETY: as in `FakeRing::drain`.
    let n = unsafe {
        cursor.drain(ring.mem, &ring.producer, &ring.consumer, |_| {
            seen.push(ring.consumer.load(Ordering::Relaxed));
        })
    };
    assert_eq!(n, 20);
    let mid: Vec<usize> = seen.iter().copied().filter(|&c| c > 0 && c < end).collect();
    assert!(
        !mid.is_empty() && mid.iter().all(|&c| c % 128 == 0),
        "published during the drain: {seen:?}"
    );
    assert_eq!(ring.consumer.load(Ordering::Relaxed), end);
}

#[test]
fn records_committed_during_a_drain_are_read_in_it() {
    let ring = FakeRing::new(4096, 0);
    let mut cursor = Cursor::new(4096, 0);
    ring.push(b"one", 0);
    let mut got = Vec::new();
    let mut pushed = false;
    // SAFETY: as in `FakeRing::drain`; the record written meanwhile lies
    // past the one handed out.
    let n = unsafe {
        cursor.drain(ring.mem, &ring.producer, &ring.consumer, |r| {
            got.push(r.to_vec());
            if !pushed {
                ring.push(b"two", 0);
                pushed = true;
            }
        })
    };
    assert_eq!(n, 2);
    assert_eq!(got, [b"one", b"two"]);
}

#[test]
fn a_header_that_makes_no_sense_stops_the_reader_for_good() {
    let ring = FakeRing::new(256, 0);
    let mut cursor = Cursor::new(256, 0);
    ring.push(b"fine", 0);
    // Longer than the ring can hold.
    let bad = ring.push(&[0; 8], 0);
    ring.put(bad, &300u32.to_ne_bytes());
    assert_eq!(ring.drain(&mut cursor), [b"fine"]);
    ring.push(b"later", 0);
    assert!(ring.drain(&mut cursor).is_empty());
    // What was read before the bad header stays handed back.
    assert_eq!(ring.consumer.load(Ordering::Relaxed), bad);
}
