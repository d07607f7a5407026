//! Data that arrives before its connection's open record.
//!
//! Perf buffers are one per CPU and drained one after another, so an open
//! record written on one CPU can be read after data the same connection
//! sent from another CPU a moment later. Such data waits here (copied,
//! bounded) until the open record comes, or is given up as an orphan.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use agent_common::{Direction, EventHeader, Syscall};

use crate::capture::{Data, Lost};

/// Most data events held at once.
pub const MAX_EVENTS: usize = 1024;
/// Most payload bytes held at once.
pub const MAX_BYTES: usize = 4 << 20;
/// How long data waits for its open record.
pub const WAIT: Duration = Duration::from_millis(500);

/// An owned copy of a data event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarlyData {
    pub header: EventHeader,
    pub syscall: Syscall,
    pub direction: Direction,
    pub total_bytes: u64,
    pub payload: Vec<u8>,
    pub unit: u64,
    pub unit_seq: u32,
    pub lost: Lost,
}

impl EarlyData {
    pub fn as_data(&self) -> Data<'_> {
        Data {
            header: self.header,
            syscall: self.syscall,
            direction: self.direction,
            total_bytes: self.total_bytes,
            payload: &self.payload,
            unit: self.unit,
            unit_seq: self.unit_seq,
            lost: self.lost,
        }
    }
}

/// Data events waiting for their open record, oldest first.
#[derive(Debug, Default)]
pub struct EarlyQueue {
    waiting: VecDeque<(Instant, EarlyData)>,
    bytes: usize,
}

impl EarlyQueue {
    /// Keeps a copy of `data`; `false` when full (the caller drops it).
    pub fn hold(&mut self, data: &Data<'_>, now: Instant) -> bool {
        if self.waiting.len() >= MAX_EVENTS || self.bytes + data.payload.len() > MAX_BYTES {
            return false;
        }
        self.bytes += data.payload.len();
        self.waiting.push_back((
            now,
            EarlyData {
                header: data.header,
                syscall: data.syscall,
                direction: data.direction,
                total_bytes: data.total_bytes,
                payload: data.payload.to_vec(),
                unit: data.unit,
                unit_seq: data.unit_seq,
                lost: data.lost,
            },
        ));
        true
    }

    /// Takes the held data of `conn_id`, in arrival order.
    pub fn take(&mut self, conn_id: u64) -> Vec<EarlyData> {
        if self.waiting.is_empty() {
            return Vec::new();
        }
        let mut taken = Vec::new();
        self.waiting.retain(|(_, d)| {
            if d.header.conn_id == conn_id {
                taken.push(d.clone());
                false
            } else {
                true
            }
        });
        self.bytes -= taken.iter().map(|d| d.payload.len()).sum::<usize>();
        taken
    }

    /// Takes what has waited longer than [`WAIT`] at `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<EarlyData> {
        let mut expired = Vec::new();
        while let Some((at, _)) = self.waiting.front() {
            if now.duration_since(*at) < WAIT {
                break;
            }
            let (_, d) = self.waiting.pop_front().expect("front exists");
            self.bytes -= d.payload.len();
            expired.push(d);
        }
        expired
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(conn_id: u64, payload: &[u8]) -> Data<'_> {
        Data {
            header: EventHeader {
                conn_id,
                ..Default::default()
            },
            syscall: Syscall::Write,
            direction: Direction::Egress,
            total_bytes: payload.len() as u64,
            payload,
            unit: 0,
            unit_seq: 0,
            lost: Default::default(),
        }
    }

    #[test]
    fn held_data_is_released_in_order_to_its_connection() {
        let mut q = EarlyQueue::default();
        let now = Instant::now();
        assert!(q.hold(&data(1, b"a"), now));
        assert!(q.hold(&data(2, b"x"), now));
        assert!(q.hold(&data(1, b"b"), now));
        let one: Vec<Vec<u8>> = q.take(1).into_iter().map(|d| d.payload).collect();
        assert_eq!(one, [b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(q.len(), 1);
        assert!(q.take(1).is_empty());
        assert_eq!(q.take(2)[0].as_data().payload, b"x");
        assert!(q.is_empty() && q.bytes == 0);
    }

    #[test]
    fn data_whose_open_never_comes_expires() {
        let mut q = EarlyQueue::default();
        let start = Instant::now();
        q.hold(&data(1, b"old"), start);
        q.hold(&data(2, b"new"), start + WAIT / 2);
        assert!(q.expire(start + WAIT / 4).is_empty());
        let gone = q.expire(start + WAIT);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].header.conn_id, 1);
        assert_eq!(q.len(), 1);
        assert_eq!(q.bytes, 3);
    }

    #[test]
    fn the_queue_is_bounded_in_events_and_bytes() {
        let mut q = EarlyQueue::default();
        let now = Instant::now();
        for i in 0..MAX_EVENTS {
            assert!(q.hold(&data(i as u64, b""), now));
        }
        assert!(!q.hold(&data(0, b""), now));
        let mut q = EarlyQueue::default();
        let big = vec![0u8; MAX_BYTES];
        assert!(q.hold(&data(1, &big), now));
        assert!(!q.hold(&data(2, b"1"), now));
    }
}
