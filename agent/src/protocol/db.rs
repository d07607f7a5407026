//! What the database protocol parsers (PostgreSQL, MySQL/MariaDB, Redis)
//! have in common: their options, their output and how they recognise a
//! connection from its first bytes.

use std::{
    borrow::Cow,
    collections::HashSet,
    sync::{Arc, LazyLock, Mutex},
};

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
    /// db.operation.name: SELECT, INSERT, GET, HSET, EXECUTE … A constant
    /// (see [`operation_name`]), so that the span's name and this attribute
    /// share it rather than copy it per call.
    pub operation: Option<Cow<'static, str>>,
    /// db.collection.name: the table of a simple statement.
    pub collection: Option<String>,
    /// db.query.text, sanitized unless configured otherwise, capped.
    pub query_text: Option<String>,
    /// db.namespace: database (SQL) or database index (Redis). Shared with
    /// the connection, which keeps it for its calls.
    pub namespace: Option<Arc<str>>,
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

/// Distinct operation names kept as constants.
const MAX_OPERATION_NAMES: usize = 1024;
/// Longer names are not kept.
const MAX_OPERATION_NAME_BYTES: usize = 64;

/// The operation names kept so far. Global, not per thread: what a static
/// holds stays reachable, so leak checkers (the fuzz targets run under
/// LeakSanitizer) do not report the kept names at exit. The lock is taken
/// by the pipeline thread alone, uncontended.
static KNOWN_OPERATIONS: LazyLock<Mutex<KeptNames>> =
    LazyLock::new(|| Mutex::new(KeptNames::new(MAX_OPERATION_NAMES)));

/// Names kept for the process's lifetime, at most `max` of them.
struct KeptNames {
    names: HashSet<&'static str, foldhash::fast::RandomState>,
    max: usize,
}

impl KeptNames {
    fn new(max: usize) -> Self {
        Self {
            names: HashSet::default(),
            max,
        }
    }

    fn get(&mut self, name: &str) -> Cow<'static, str> {
        if let Some(&kept) = self.names.get(name) {
            return Cow::Borrowed(kept);
        }
        if name.len() > MAX_OPERATION_NAME_BYTES || self.names.len() >= self.max {
            return Cow::Owned(name.to_owned());
        }
        let kept: &'static str = Box::leak(name.into());
        self.names.insert(kept);
        Cow::Borrowed(kept)
    }
}

/// An operation name the protocol does not list (a Redis command, `CLIENT
/// SETNAME` …) as a constant: each call of it then names its span and sets
/// `db.operation.name` without a copy. The first [`MAX_OPERATION_NAMES`]
/// distinct names are kept for the agent's lifetime (at most 64 KiB; real
/// workloads use tens); past that, or for a name longer than
/// [`MAX_OPERATION_NAME_BYTES`], the name is copied per call.
pub fn operation_name(name: &str) -> Cow<'static, str> {
    match KNOWN_OPERATIONS.lock() {
        Ok(mut kept) => kept.get(name),
        Err(_) => Cow::Owned(name.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_names_are_kept_once_and_bounded() {
        let first = operation_name("XAUTOCLAIM");
        let again = operation_name("XAUTOCLAIM");
        let (Cow::Borrowed(a), Cow::Borrowed(b)) = (&first, &again) else {
            panic!("a short name is kept: {first:?} {again:?}");
        };
        assert!(std::ptr::eq(*a, *b), "one copy for every call");
        let long = "X".repeat(MAX_OPERATION_NAME_BYTES + 1);
        assert_eq!(operation_name(&long), Cow::<str>::Owned(long.clone()));
        assert!(matches!(operation_name(&long), Cow::Owned(_)));
        // Past the bound, names are copied per call instead of kept.
        let mut kept = KeptNames::new(2);
        assert!(matches!(kept.get("A"), Cow::Borrowed("A")));
        assert!(matches!(kept.get("B"), Cow::Borrowed("B")));
        assert!(matches!(kept.get("C"), Cow::Owned(c) if c == "C"));
        assert!(matches!(kept.get("A"), Cow::Borrowed("A")));
        assert_eq!(kept.names.len(), 2);
    }
}
