//! Event-loop servers with no runtime to follow (nginx; envoy and haproxy
//! behave alike): one thread serves many requests, so "the request in
//! flight on the thread" is ambiguous. What the loop does on one thread
//! still tells which request an upstream call is for:
//!
//! - *adjacency*: the callback that completed a downstream request's head
//!   goes on to serve it — it opens the upstream connection (a connection
//!   per request), or writes the upstream request on a kept-alive one —
//!   before any other socket of the thread is touched;
//! - *content*: a proxy forwards the method and the path (or its suffix,
//!   when a location prefix is stripped), so an upstream request whose
//!   content matches exactly one downstream request in flight is its.
//!
//! Adjacency must agree with content; content alone must be unique. Anything
//! else stays a root.
//!
//! Adjacency also carries the agent's own exports through a proxy on this
//! host (a TLS terminator in front of a collector): a connection opened by
//! the callback that read from a connection carrying exports carries them
//! on, and is not traced either — or every export would make new spans.

use std::sync::Arc;

use super::runtime::RequestRef;
use crate::IdMap;
use crate::protocol::http::Request;
use crate::trace::semconv::http::path_and_query;

/// The last socket record of a thread.
#[derive(Debug, Clone, Copy, Default)]
struct LastRecord {
    conn_id: u64,
    /// The server request whose head a record on `conn_id` completed,
    /// while nothing else was touched since.
    head: Option<RequestRef>,
    /// For the record being handled: the head the previous record left,
    /// when this record is on another connection.
    handed_over: Option<RequestRef>,
    /// `conn_id` carries the agent's own exports.
    exports: bool,
}

/// Most client connections remembered as opened for a request.
const MAX_OPENED: usize = 1 << 14;
/// Most threads remembered; beyond it all are forgotten (threads of exited
/// processes linger otherwise), which only costs adjacency for a moment.
const MAX_THREADS: usize = 1 << 16;

#[derive(Default)]
pub struct Adjacency {
    threads: IdMap<(u32, u32), LastRecord>,
    /// Client connections opened by a request's callback: their first
    /// request is that request's upstream call.
    opened_for: IdMap<u64, RequestRef>,
}

impl Adjacency {
    /// A socket record on `conn_id`, before its events are handled.
    pub fn on_io(&mut self, thread: (u32, u32), conn_id: u64) {
        if self.threads.len() >= MAX_THREADS && !self.threads.contains_key(&thread) {
            self.threads.clear();
        }
        let last = self.threads.entry(thread).or_default();
        if last.conn_id == conn_id {
            last.handed_over = None;
        } else {
            last.handed_over = last.head.take();
            last.conn_id = conn_id;
        }
        last.exports = false;
    }

    /// A socket record on `conn_id`, a connection carrying the agent's own
    /// exports (not traced).
    pub fn on_exports(&mut self, thread: (u32, u32), conn_id: u64) {
        if self.threads.len() >= MAX_THREADS && !self.threads.contains_key(&thread) {
            self.threads.clear();
        }
        self.threads.insert(
            thread,
            LastRecord {
                conn_id,
                exports: true,
                ..LastRecord::default()
            },
        );
    }

    /// A server request's head was completed by the record being handled.
    pub fn began(&mut self, thread: (u32, u32), request: RequestRef) {
        if let Some(last) = self.threads.get_mut(&thread) {
            last.head = Some(request);
        }
    }

    /// The thread connected `conn_id`: if it did so in the callback that
    /// read a request's head, the connection is opened for that request.
    /// Returns whether it was opened in a callback reading the agent's
    /// exports (it carries them on).
    pub fn connected(&mut self, thread: (u32, u32), conn_id: u64) -> bool {
        let Some(last) = self.threads.get_mut(&thread) else {
            return false;
        };
        if let Some(request) = last.head.take()
            && self.opened_for.len() < MAX_OPENED
        {
            self.opened_for.insert(conn_id, request);
        }
        let exports = last.exports;
        last.conn_id = conn_id;
        last.handed_over = None;
        last.exports = false;
        exports
    }

    /// The request an upstream request begun in the record being handled
    /// (on `conn_id`) is adjacent to, if any. A connection's "opened for"
    /// counts for its first request only.
    pub fn adjacent(&mut self, thread: (u32, u32), conn_id: u64) -> Option<RequestRef> {
        if let Some(request) = self.opened_for.remove(&conn_id) {
            return Some(request);
        }
        self.threads.get(&thread)?.handed_over
    }

    pub fn closed(&mut self, conn_id: u64) {
        self.opened_for.remove(&conn_id);
    }
}

/// What a downstream request forwarded upstream keeps: its method and path,
/// read from the request head it shares with the parser (nothing copied).
#[derive(Debug, Clone)]
pub struct Content(Arc<Request>);

impl Content {
    pub fn of(request: Arc<Request>) -> Self {
        Self(request)
    }

    #[cfg(test)]
    pub fn new(method: &str, target: &str) -> Self {
        Self(Arc::new(Request {
            method: method.to_owned().into(),
            target: target.into(),
            ..Default::default()
        }))
    }

    fn path(&self) -> &str {
        path_and_query(&self.0.target).0
    }

    /// Whether `upstream` can be this request forwarded: the same method and
    /// the same path, or one a suffix of the other at a segment boundary
    /// (a location prefix added or stripped).
    pub fn forwarded_as(&self, upstream: &Content) -> bool {
        if self.0.method != upstream.0.method {
            return false;
        }
        let (a, b) = (self.path(), upstream.path());
        if a == b {
            return true;
        }
        let (long, short) = if a.len() > b.len() { (a, b) } else { (b, a) };
        short.len() > 1 && short.starts_with('/') && long.ends_with(short)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: (u32, u32) = (5, 5);
    const R1: RequestRef = RequestRef { conn_id: 1, seq: 0 };

    #[test]
    fn a_connection_opened_while_forwarding_exports_carries_them() {
        let mut a = Adjacency::default();
        a.on_exports(T, 1);
        assert!(a.connected(T, 2), "opened in the export's callback");
        // Anything else in between: no longer the export's callback.
        a.on_exports(T, 1);
        a.on_io(T, 3);
        assert!(!a.connected(T, 4));
        assert!(!a.connected((9, 9), 5), "another thread");
    }

    #[test]
    fn an_upstream_write_right_after_the_head_is_adjacent() {
        let mut a = Adjacency::default();
        a.on_io(T, 1);
        a.began(T, R1);
        a.on_io(T, 9);
        assert_eq!(a.adjacent(T, 9), Some(R1));
        // Anything else in between breaks it.
        a.on_io(T, 1);
        a.began(T, R1);
        a.on_io(T, 2);
        a.on_io(T, 9);
        assert_eq!(a.adjacent(T, 9), None);
    }

    #[test]
    fn a_connection_opened_by_the_heads_callback_serves_it_once() {
        let mut a = Adjacency::default();
        a.on_io(T, 1);
        a.began(T, R1);
        a.connected(T, 9);
        // Other requests' I/O happens before the connect completes.
        a.on_io(T, 2);
        a.on_io(T, 9);
        assert_eq!(a.adjacent(T, 9), Some(R1));
        assert_eq!(a.adjacent(T, 9), None);
        // A connect by a later callback is nobody's.
        a.on_io(T, 3);
        a.connected(T, 10);
        assert_eq!(a.adjacent(T, 10), None);
    }

    #[test]
    fn content_matches_forwarded_paths() {
        let down = Content::new("GET", "/api/users/7");
        assert!(down.forwarded_as(&Content::new("GET", "/api/users/7")));
        assert!(down.forwarded_as(&Content::new("GET", "/users/7")));
        assert!(!down.forwarded_as(&Content::new("POST", "/api/users/7")));
        assert!(!down.forwarded_as(&Content::new("GET", "/users/8")));
        assert!(!down.forwarded_as(&Content::new("GET", "/")));
    }
}
