//! Runtime ownership: which server request a client call was made for, in
//! processes whose runtime the agent follows.
//!
//! A thread of an event loop or a worker pool serves many requests; which
//! one a socket call belongs to is not in the syscall. It is in the
//! runtime: every record of a followed process carries the *unit* its
//! thread was running (CPython: the `PyContext` of the asyncio task step,
//! loop callback or worker hand-off), and the kernel reports each new unit
//! with the unit that made it. Ownership then follows the runtime's own
//! hand-offs:
//!
//! - a unit made while an owned unit runs belongs to the same request (a
//!   task's child tasks, a context copied for a worker thread);
//! - a unit made by the callback that read a request's head, before
//!   anything else ran on that thread, belongs to that request (the server
//!   framework starting the request's task, as uvicorn does);
//! - a call made while an owned unit runs is that request's child, as long
//!   as the request is still in flight.
//!
//! Anything else stays a root: a unit whose maker is unknown, a request
//! that has ended (a background task outliving it, the next pipelined
//! request started from the previous one's task), a reused address (every
//! new unit replaces what its address meant before). Feeders for other
//! runtimes (goroutines, Node.js async ids) only need to fill the same two
//! fields: the unit on each record and the new-unit events.

use crate::IdMap;

/// A server request, by its connection and its sequence number there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestRef {
    pub conn_id: u64,
    pub seq: u64,
}

/// The runtime's view of one moment on a thread: the unit running and the
/// thread's switch counter (CPython: `context_ver`, bumped by every context
/// enter and exit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnitAt {
    pub unit: u64,
    pub seq: u32,
}

/// The last socket record of a thread, for the "made by the callback that
/// read the request" rule.
#[derive(Debug, Clone, Copy)]
struct LastIo {
    ts_ns: u64,
    at: UnitAt,
    /// The server request whose head this record completed.
    began: Option<RequestRef>,
    /// More than one request began in this record (pipelining).
    ambiguous: bool,
}

/// Most (process, unit) owners remembered; beyond it new owners are not
/// recorded (their calls stay roots) until ended requests are purged.
const MAX_OWNERS: usize = 1 << 16;

/// Counters of the ownership layer.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct OwnershipStats {
    pub units_made: u64,
    /// New units that inherited a request from their maker.
    pub units_inherited: u64,
    /// New units given to the request whose head their thread just read.
    pub units_adopted: u64,
    pub owners_full: u64,
}

#[derive(Default)]
pub struct Ownership {
    /// Followed processes, and since when their records carry units.
    followed: IdMap<u32, u64>,
    owners: IdMap<(u32, u64), RequestRef>,
    last_io: IdMap<(u32, u32), LastIo>,
    pub stats: OwnershipStats,
}

impl Ownership {
    /// The process's runtime is followed: its records stamped from
    /// `since_ns` on carry units, and their calls are parented by ownership
    /// only. Records from before (the agent was still looking at the
    /// process) keep the rule for processes not followed.
    pub fn follow(&mut self, tgid: u32, since_ns: u64) {
        self.followed.insert(tgid, since_ns);
    }

    pub fn unfollow(&mut self, tgid: u32) {
        self.followed.remove(&tgid);
        self.owners.retain(|(pid, _), _| *pid != tgid);
        self.last_io.retain(|(pid, _), _| *pid != tgid);
    }

    pub fn is_followed(&self, tgid: u32) -> bool {
        self.followed.contains_key(&tgid)
    }

    /// Whether a record of `tgid` stamped `ts_ns` carries its unit.
    pub fn follows_at(&self, tgid: u32, ts_ns: u64) -> bool {
        self.followed
            .get(&tgid)
            .is_some_and(|&since| ts_ns >= since)
    }

    /// A socket record of a followed process on thread `tid`.
    pub fn on_io(&mut self, tgid: u32, tid: u32, ts_ns: u64, at: UnitAt) {
        self.last_io.insert(
            (tgid, tid),
            LastIo {
                ts_ns,
                at,
                began: None,
                ambiguous: false,
            },
        );
    }

    /// A server request began with the record just passed to [`Self::on_io`].
    pub fn began(&mut self, tgid: u32, tid: u32, request: RequestRef) {
        if let Some(io) = self.last_io.get_mut(&(tgid, tid)) {
            io.ambiguous |= io.began.is_some();
            io.began = Some(request);
        }
    }

    /// The runtime made `unit` on thread `tid` at `ts_ns` while running
    /// `parent`. `in_flight` tells whether a request has not ended yet.
    pub fn on_unit(
        &mut self,
        (tgid, tid): (u32, u32),
        ts_ns: u64,
        parent: UnitAt,
        unit: u64,
        in_flight: impl Fn(RequestRef) -> bool,
    ) {
        self.stats.units_made += 1;
        // Whatever this address meant before, it is a new unit now.
        self.owners.remove(&(tgid, unit));
        let inherited = (parent.unit != 0)
            .then(|| self.owners.get(&(tgid, parent.unit)).copied())
            .flatten()
            .filter(|r| in_flight(*r));
        let owner = match inherited {
            Some(r) => {
                self.stats.units_inherited += 1;
                Some(r)
            }
            None => self
                .made_by_request_callback(tgid, tid, ts_ns, parent)
                .filter(|r| in_flight(*r))
                .inspect(|_| self.stats.units_adopted += 1),
        };
        if let Some(request) = owner {
            if self.owners.len() >= MAX_OWNERS {
                self.owners.retain(|_, r| in_flight(*r));
            }
            if self.owners.len() < MAX_OWNERS {
                self.owners.insert((tgid, unit), request);
            } else {
                self.stats.owners_full += 1;
            }
        }
    }

    /// The request whose head the thread's last socket record completed,
    /// if the new unit was made in that same callback: no other socket call
    /// since, and at most one context switch (a loop entering the
    /// transport's context to hand it the bytes), none when the unit is
    /// the one that read. A later callback needs at least two switches (the
    /// reader's exit and its own enter), so it cannot be mistaken for it.
    fn made_by_request_callback(
        &self,
        tgid: u32,
        tid: u32,
        ts_ns: u64,
        parent: UnitAt,
    ) -> Option<RequestRef> {
        let io = self.last_io.get(&(tgid, tid))?;
        if io.ambiguous || io.ts_ns > ts_ns {
            return None;
        }
        let switches = parent.seq.wrapping_sub(io.at.seq);
        let same_callback = match switches {
            0 => parent.unit == io.at.unit,
            1 => true,
            _ => false,
        };
        same_callback.then_some(io.began).flatten()
    }

    /// The request the unit belongs to, if known.
    pub fn owner_of(&self, tgid: u32, unit: u64) -> Option<RequestRef> {
        if unit == 0 {
            return None;
        }
        self.owners.get(&(tgid, unit)).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PID: u32 = 7;
    const LOOP: u32 = 7;
    const R1: RequestRef = RequestRef { conn_id: 1, seq: 0 };
    const R2: RequestRef = RequestRef { conn_id: 2, seq: 0 };

    fn at(unit: u64, seq: u32) -> UnitAt {
        UnitAt { unit, seq }
    }

    fn followed() -> Ownership {
        let mut o = Ownership::default();
        o.follow(PID, 0);
        o
    }

    #[test]
    fn a_task_made_by_the_reading_callback_and_its_children_belong_to_the_request() {
        let mut o = followed();
        // Default loop: the read runs inside the transport's context 0xa0.
        o.on_io(PID, LOOP, 10, at(0xa0, 5));
        o.began(PID, LOOP, R1);
        o.on_unit((PID, LOOP), 11, at(0xa0, 5), 0xb0, |_| true);
        assert_eq!(o.owner_of(PID, 0xb0), Some(R1));
        // The task's child (gather) and a copy for a worker thread.
        o.on_unit((PID, LOOP), 12, at(0xb0, 9), 0xc0, |_| true);
        o.on_unit((PID, LOOP), 13, at(0xc0, 11), 0xd0, |_| true);
        assert_eq!(o.owner_of(PID, 0xd0), Some(R1));
    }

    #[test]
    fn uvloop_reads_outside_the_context_then_enters_it_once() {
        let mut o = followed();
        o.on_io(PID, LOOP, 10, at(0x10, 5));
        o.began(PID, LOOP, R1);
        o.on_unit((PID, LOOP), 11, at(0xa0, 6), 0xb0, |_| true);
        assert_eq!(o.owner_of(PID, 0xb0), Some(R1));
    }

    #[test]
    fn a_later_callback_is_not_the_reading_one() {
        let mut o = followed();
        o.on_io(PID, LOOP, 10, at(0xa0, 5));
        o.began(PID, LOOP, R1);
        // The reader exited (6) and a timer callback entered its own (7).
        o.on_unit((PID, LOOP), 11, at(0xe0, 7), 0xb0, |_| true);
        assert_eq!(o.owner_of(PID, 0xb0), None);
        // Same counter but another unit: not the reading callback either.
        o.on_unit((PID, LOOP), 12, at(0xe0, 5), 0xb1, |_| true);
        assert_eq!(o.owner_of(PID, 0xb1), None);
    }

    #[test]
    fn pipelined_requests_and_other_threads_are_not_guessed() {
        let mut o = followed();
        o.on_io(PID, LOOP, 10, at(0xa0, 5));
        o.began(PID, LOOP, R1);
        o.began(PID, LOOP, R2);
        o.on_unit((PID, LOOP), 11, at(0xa0, 5), 0xb0, |_| true);
        assert_eq!(o.owner_of(PID, 0xb0), None);
        // A unit made on another thread has no reading callback.
        o.on_io(PID, LOOP, 20, at(0xa0, 5));
        o.began(PID, LOOP, R1);
        o.on_unit((PID, 99), 21, at(0xa0, 5), 0xb2, |_| true);
        assert_eq!(o.owner_of(PID, 0xb2), None);
    }

    #[test]
    fn ended_requests_and_reused_addresses_own_nothing() {
        let mut o = followed();
        o.on_io(PID, LOOP, 10, at(0xa0, 5));
        o.began(PID, LOOP, R1);
        o.on_unit((PID, LOOP), 11, at(0xa0, 5), 0xb0, |_| true);
        // The request ended: a unit its task makes now (a background task,
        // the next pipelined request) is nobody's.
        o.on_unit((PID, LOOP), 30, at(0xb0, 9), 0xc0, |r| r != R1);
        assert_eq!(o.owner_of(PID, 0xc0), None);
        // 0xb0 freed and made again by an unowned unit: no longer R1's.
        o.on_unit((PID, 50), 40, at(0xf0, 1), 0xb0, |_| true);
        assert_eq!(o.owner_of(PID, 0xb0), None);
    }

    #[test]
    fn unfollowing_forgets_the_process() {
        let mut o = followed();
        o.on_io(PID, LOOP, 10, at(0xa0, 5));
        o.began(PID, LOOP, R1);
        o.on_unit((PID, LOOP), 11, at(0xa0, 5), 0xb0, |_| true);
        o.unfollow(PID);
        assert!(!o.is_followed(PID));
        assert_eq!(o.owner_of(PID, 0xb0), None);
    }
}
