//! The record path without a kernel: records built in memory (benchmarks,
//! tests) go the way the reader's go in [`Pipeline::step`](super::Pipeline::step),
//! through the same attribution to the same consumers, in rounds the
//! caller drives.

use std::time::Duration;

use super::{Consumer, MAX_CONNECTIONS, RecordPath, source::Batch};
use crate::conn::{ConnTable, seed::Seed};

pub struct Replay {
    pub(super) path: RecordPath,
    /// Records that did not decode.
    pub undecodable: u64,
}

impl Replay {
    pub fn new(conns: ConnTable) -> Self {
        Self {
            path: RecordPath::new(conns),
            undecodable: 0,
        }
    }

    /// One round: `records` (as the kernel writes them) as one reader
    /// batch. Returns how many were handed on.
    pub fn feed<R: AsRef<[u8]>>(&mut self, records: &[R], consumer: &mut impl Consumer) -> u64 {
        let mut batch = Batch {
            records,
            undecodable: &mut self.undecodable,
        };
        // Records in memory: nothing to wait for, nothing that can fail.
        self.path
            .round(&mut batch, Duration::ZERO, consumer)
            .unwrap_or_default()
    }
}

impl Default for Replay {
    /// An empty connection table of the agent's size.
    fn default() -> Self {
        Self::new(ConnTable::new(MAX_CONNECTIONS, Seed::default()))
    }
}
