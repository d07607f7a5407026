//! What the database protocol parsers (PostgreSQL, MySQL/MariaDB, Redis)
//! have in common: their options, their output and how they recognise a
//! connection from its first bytes.

use std::sync::Arc;

use agent_common::Direction;

use super::sql::Summaries;

pub use super::http::Moment;

/// Limits shared by the database parsers.
#[derive(Debug, Clone)]
pub struct DbOptions {
    /// db.query.text is cut to this many bytes (on a char boundary).
    pub max_query_bytes: usize,
    /// Replace literals (SQL) and values (Redis) in db.query.text. On by
    /// default; off only when a user asks for raw statements.
    pub sanitize: bool,
    /// Most calls waiting for a response (pipelining); more are dropped
    /// and counted.
    pub max_pending: usize,
    /// Most prepared statements remembered per connection.
    pub max_statements: usize,
    /// Summaries of SQL texts seen before, shared by all connections.
    pub summaries: Arc<Summaries>,
}

impl Default for DbOptions {
    fn default() -> Self {
        Self {
            max_query_bytes: 2048,
            sanitize: true,
            max_pending: 256,
            max_statements: 256,
            summaries: Arc::default(),
        }
    }
}

/// One database call: a request and its response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DbCall {
    /// 0, 1, 2 … in request order on the connection.
    pub seq: u64,
    /// Moment of the syscall carrying the request's first byte.
    pub start: Moment,
    /// Moment of the syscall carrying the response's last byte (for a call
    /// without a response: the last moment seen).
    pub end: Moment,
    /// db.operation.name: SELECT, INSERT, GET, HSET, EXECUTE …
    pub operation: Option<String>,
    /// db.collection.name: the table of a simple statement.
    pub collection: Option<String>,
    /// db.query.text, sanitized unless configured otherwise, capped.
    pub query_text: Option<String>,
    /// db.namespace: database (SQL) or database index (Redis).
    pub namespace: Option<String>,
    /// db.response.status_code: SQLSTATE, MySQL error number, Redis error
    /// prefix (e.g. WRONGTYPE). None on success.
    pub status_code: Option<String>,
    /// The call failed (per the conventions: SQLSTATE class ≥ 02, any
    /// MySQL error, any Redis error reply).
    pub error: bool,
    /// No response came before the connection closed.
    pub unanswered: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbEvent {
    /// A request was sent/received (emitted when its first complete
    /// message is parsed); the tracer sets up context here.
    Request { seq: u64, start: Moment },
    /// The call completed.
    Call(DbCall),
    /// The connection is not (or no longer) this protocol — TLS,
    /// compression, or garbage. Emitted once; everything after is ignored.
    Skip,
}

/// What the first bytes of a connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detect {
    /// This protocol; requests flow in direction `requests`.
    Yes {
        requests: Direction,
    },
    No,
    /// Not enough bytes yet to tell.
    NeedMore,
}

/// Counters a caller can add up across connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DbCounters {
    pub resyncs: u64,
    pub dropped_calls: u64,
    pub unanswered: u64,
}
