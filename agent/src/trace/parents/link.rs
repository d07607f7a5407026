//! Links the two ends of a TCP connection seen on this host: the server
//! span becomes the child of the client span, whichever end the agent sees
//! first. Events of two processes can arrive out of order — perf buffers
//! are per CPU, and a write is stamped when it returns, possibly after the
//! reader already woke — so each end waits a grace period for the other
//! (and a server span that ended meanwhile is held, [`super::held`]).

use std::{collections::VecDeque, sync::Arc};

use opentelemetry::{KeyValue, trace::TraceId};

use super::context::Parent;
use crate::{IdMap, capture::EndId};

/// The client end's (local, remote): addresses, or unix sockets.
pub type LinkKey = (EndId, EndId);

/// How long one end waits for the other (kernel timestamps, ns).
const GRACE_NS: u64 = 1_000_000_000;
/// Most entries per connection.
const MAX_PER_KEY: usize = 64;
/// Most trace id aliases remembered.
const MAX_ALIASES: usize = 4096;
/// Sweep expired entries every this many calls. An emptied key stays until
/// then: a kept-alive connection then reuses its queues instead of
/// allocating and freeing them on every request.
const SWEEP_EVERY: u32 = 256;

/// Whether a connection's records carry the socket syscalls' stamps: a
/// send stamped at its enter, a receive at its exit (agent-ebpf
/// syscalls.rs). Then a request's server end read it after its client
/// began writing it and before its client had the answer. The plaintext of
/// TLS library calls is stamped otherwise: a redis-cli call over TLS had its
/// answer some 100 µs before its server's read was stamped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordered {
    Yes,
    No,
}

/// A client request, claimable by the server end for a while even after
/// its response came (the server's read may be delivered after it).
pub struct Call {
    conn_id: u64,
    seq: u64,
    /// When its first byte was written: with [`Ordered`] stamps, its
    /// server end began no earlier.
    start_ns: u64,
    parent: Parent,
    tenant: Arc<[KeyValue]>,
    claimed: bool,
    /// When its response ended: with [`Ordered`] stamps, its server end
    /// began no later.
    done_ns: Option<u64>,
}

impl Call {
    /// A client request that began at `start_ns`; `claimed` when a waiting
    /// server span already adopted it.
    pub fn new(
        conn_id: u64,
        seq: u64,
        start_ns: u64,
        parent: Parent,
        tenant: Arc<[KeyValue]>,
        claimed: bool,
    ) -> Self {
        Self {
            conn_id,
            seq,
            start_ns,
            parent,
            tenant,
            claimed,
            done_ns: None,
        }
    }
}

/// A server request that found no parent yet.
struct Waiting {
    conn_id: u64,
    seq: u64,
    began_ns: u64,
}

#[derive(Default)]
pub struct Links {
    calls: IdMap<LinkKey, VecDeque<Call>>,
    waiting: IdMap<LinkKey, VecDeque<Waiting>>,
    /// Trace ids replaced after a late link: a server span's trace joined
    /// its client's trace after the span had begun.
    aliases: IdMap<TraceId, TraceId>,
    alias_order: VecDeque<TraceId>,
    now_ns: u64,
    calls_since_sweep: u32,
}

impl Links {
    /// A server request began at `now_ns`: its parent is the oldest
    /// unclaimed call on this connection's client end; with `ordered`
    /// stamps, one that began before it and was not answered before it.
    /// Taken in order alone, one server read the agent missed (or a late
    /// delivery under load) shifted every later request on the connection
    /// to another request's call.
    pub fn claim_call(
        &mut self,
        key: LinkKey,
        now_ns: u64,
        ordered: Ordered,
    ) -> Option<(Parent, Arc<[KeyValue]>)> {
        self.tick(now_ns);
        let calls = self.calls.get_mut(&key)?;
        if ordered == Ordered::Yes {
            // Answered before this request began: a request whose server
            // end was never seen, and no later request's either.
            calls.retain(|c| c.claimed || c.done_ns.is_none_or(|done| done >= now_ns));
        }
        let i = calls
            .iter()
            .position(|c| !c.claimed && (ordered == Ordered::No || c.start_ns <= now_ns))?;
        let call = &mut calls[i];
        call.claimed = true;
        let found = (call.parent.clone(), Arc::clone(&call.tenant));
        // A call that already ended has nothing left to wait for.
        if call.done_ns.is_some() {
            calls.remove(i);
        }
        Some(found)
    }

    /// A server request found no parent at all: let its client end adopt
    /// it if that shows up within the grace period.
    pub fn wait_for_call(&mut self, key: LinkKey, conn_id: u64, seq: u64, now_ns: u64) {
        self.tick(now_ns);
        let waiting = self.waiting.entry(key).or_default();
        if waiting.len() < MAX_PER_KEY {
            waiting.push_back(Waiting {
                conn_id,
                seq,
                began_ns: now_ns,
            });
        }
    }

    /// A client request began at `now_ns`: a server span waiting on this
    /// connection (with `ordered` stamps, one that began after it), if
    /// any, as (connection id, request seq).
    pub fn take_waiting(
        &mut self,
        key: LinkKey,
        now_ns: u64,
        ordered: Ordered,
    ) -> Option<(u64, u64)> {
        self.tick(now_ns);
        let waiting = self.waiting.get_mut(&key)?;
        // Began before this request was written: an earlier request's, whose
        // client end was never seen, and no later request's either.
        while ordered == Ordered::Yes && waiting.front().is_some_and(|w| w.began_ns < now_ns) {
            waiting.pop_front();
        }
        let w = waiting.pop_front()?;
        Some((w.conn_id, w.seq))
    }

    /// Registers a client request.
    pub fn add_call(&mut self, key: LinkKey, call: Call) {
        let calls = self.calls.entry(key).or_default();
        if calls.len() < MAX_PER_KEY {
            calls.push_back(call);
        }
    }

    /// The client request ended (or its connection closed): a claimed one
    /// goes, an unclaimed one stays claimable for the grace period.
    pub fn call_done(&mut self, key: LinkKey, conn_id: u64, seq: u64, now_ns: u64) {
        self.tick(now_ns);
        if let Some(calls) = self.calls.get_mut(&key) {
            calls.retain_mut(|c| {
                if c.conn_id != conn_id || c.seq != seq {
                    return true;
                }
                c.done_ns = Some(now_ns);
                !c.claimed
            });
        }
    }

    /// The server request ended: it no longer waits for its client.
    pub fn server_done(&mut self, key: LinkKey, conn_id: u64, seq: u64) {
        if let Some(waiting) = self.waiting.get_mut(&key) {
            waiting.retain(|w| w.conn_id != conn_id || w.seq != seq);
        }
    }

    /// Spans of trace `from` that finish from now on belong to trace `to`.
    pub fn alias(&mut self, from: TraceId, to: TraceId) {
        if from == to {
            return;
        }
        if self.alias_order.len() >= MAX_ALIASES
            && let Some(old) = self.alias_order.pop_front()
        {
            self.aliases.remove(&old);
        }
        self.aliases.insert(from, to);
        self.alias_order.push_back(from);
    }

    /// The trace id a span of trace `id` is exported with.
    pub fn trace_id(&self, id: TraceId) -> TraceId {
        self.aliases.get(&id).copied().unwrap_or(id)
    }

    /// Entries on both maps, for tests and bounds checks.
    pub fn len(&self) -> usize {
        self.calls.values().map(VecDeque::len).sum::<usize>()
            + self.waiting.values().map(VecDeque::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn tick(&mut self, now_ns: u64) {
        self.now_ns = self.now_ns.max(now_ns);
        self.calls_since_sweep += 1;
        if self.calls_since_sweep < SWEEP_EVERY {
            return;
        }
        self.calls_since_sweep = 0;
        let horizon = self.now_ns.saturating_sub(GRACE_NS);
        self.calls.retain(|_, calls| {
            calls.retain(|c| c.done_ns.is_none_or(|done| done >= horizon));
            !calls.is_empty()
        });
        self.waiting.retain(|_, waiting| {
            waiting.retain(|w| w.began_ns >= horizon);
            !waiting.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::SpanId;

    fn key() -> LinkKey {
        (
            EndId::Inet("127.0.0.1:40000".parse().unwrap()),
            EndId::Inet("127.0.0.1:80".parse().unwrap()),
        )
    }

    /// Call `seq` on connection `conn_id`, begun at `seq` × 10.
    fn call(conn_id: u64, seq: u64, n: u8) -> Call {
        Call::new(conn_id, seq, seq * 10, parent(n), Arc::from(vec![]), false)
    }

    fn parent(n: u8) -> Parent {
        Parent {
            trace_id: TraceId::from_bytes([n; 16]),
            span_id: SpanId::from_bytes([n; 8]),
            sampled: true,
            trace_state: Default::default(),
            remote: false,
        }
    }

    #[test]
    fn calls_are_claimed_in_order_and_linger_after_they_end() {
        let mut links = Links::default();
        links.add_call(key(), call(1, 0, 1));
        links.add_call(key(), call(1, 1, 2));
        // The first call's response (ending at 10) was delivered before the
        // server's read (at 9) of its request.
        links.call_done(key(), 1, 0, 10);
        assert_eq!(
            links.claim_call(key(), 9, Ordered::Yes).unwrap().0,
            parent(1)
        );
        assert_eq!(
            links.claim_call(key(), 12, Ordered::Yes).unwrap().0,
            parent(2)
        );
        assert!(links.claim_call(key(), 13, Ordered::Yes).is_none());
        links.call_done(key(), 1, 1, 14);
        assert!(links.is_empty(), "claimed calls go when they end");
    }

    #[test]
    fn a_call_answered_before_a_server_request_began_is_not_its_parent() {
        let mut links = Links::default();
        // Call 0's server read was never seen: nothing claimed it.
        links.add_call(key(), call(1, 0, 1));
        links.call_done(key(), 1, 0, 10);
        links.add_call(key(), call(1, 1, 2));
        // The read of call 1's request, after call 0 was answered.
        assert_eq!(
            links.claim_call(key(), 20, Ordered::Yes).unwrap().0,
            parent(2)
        );
        links.call_done(key(), 1, 1, 30);
        links.add_call(key(), call(1, 2, 3));
        assert_eq!(
            links.claim_call(key(), 40, Ordered::Yes).unwrap().0,
            parent(3)
        );
        // Only call 2 can still be claimed, and it was.
        assert!(links.claim_call(key(), 41, Ordered::Yes).is_none());
    }

    #[test]
    fn a_request_is_not_linked_to_a_call_begun_after_it() {
        let mut links = Links::default();
        // A server request that began at 5, before the only call (at 10):
        // its own call was never seen.
        links.add_call(key(), call(1, 1, 1));
        assert!(links.claim_call(key(), 5, Ordered::Yes).is_none());
        assert_eq!(
            links.claim_call(key(), 15, Ordered::Yes).unwrap().0,
            parent(1)
        );
        // A server request waiting since 20 is not adopted by a call begun
        // at 30; one that began at 35 is.
        links.wait_for_call(key(), 2, 0, 20);
        assert!(links.take_waiting(key(), 30, Ordered::Yes).is_none());
        links.wait_for_call(key(), 2, 1, 35);
        assert_eq!(links.take_waiting(key(), 30, Ordered::Yes), Some((2, 1)));
    }

    #[test]
    fn without_ordered_stamps_calls_are_claimed_in_order() {
        let mut links = Links::default();
        // Over TLS a call can look answered before its server's read.
        links.add_call(key(), call(1, 1, 1));
        links.call_done(key(), 1, 1, 20);
        assert_eq!(
            links.claim_call(key(), 25, Ordered::No).unwrap().0,
            parent(1)
        );
    }

    #[test]
    fn expired_entries_are_swept() {
        let mut links = Links::default();
        links.add_call(key(), call(1, 0, 1));
        links.call_done(key(), 1, 0, 1);
        links.wait_for_call(key(), 2, 0, 1);
        for i in 0..SWEEP_EVERY {
            links.alias(TraceId::from_bytes([9; 16]), TraceId::from_bytes([8; 16]));
            links.tick(GRACE_NS * 3 + u64::from(i));
        }
        assert!(links.is_empty());
        assert_eq!(
            links.trace_id(TraceId::from_bytes([9; 16])),
            TraceId::from_bytes([8; 16])
        );
    }
}
