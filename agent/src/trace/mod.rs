//! Trace: turns the records of each connection into spans. The protocol
//! parser pairs requests with responses; this stage gives each exchange
//! its place in a trace and its attributes, and queues it for export.
//!
//! Parents, most certain first (a span whose parent is ambiguous stays a
//! root rather than guess):
//! - a server span is the child of the client span at the other end of the
//!   same TCP connection when that end is on this host too;
//! - else of the caller's span named by an incoming `traceparent`;
//! - in a process whose runtime is followed (CPython), a client span is the
//!   child of the request that owns the unit of work making the call
//!   ([`parents::runtime`]), else a root;
//! - elsewhere, a client span is the child of the server request in flight
//!   on the same thread, when exactly one is; when several are (an event
//!   loop), of the one whose callback made the call and whose content it
//!   forwards, or of the only one whose content it forwards
//!   ([`parents::event_loop`]);
//! - else of the span named by its own outgoing `traceparent` (an
//!   instrumented caller).

pub mod parents;
pub mod resources;
pub mod semconv;

use std::{
    collections::VecDeque,
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

use agent_common::Direction;
use nix::time::{ClockId, clock_gettime};
use opentelemetry::{
    InstrumentationScope, Key, KeyValue, Value,
    trace::{SpanContext, SpanId, SpanKind, TraceState},
};

use self::{
    parents::{
        context::{Ids, Parent, Sampler, flags, parse_traceparent},
        event_loop::{Adjacency, Content},
        held::{self, Held, HeldSpan},
        link::{Call, LinkKey, Links, Ordered},
        runtime::{Ownership, RequestRef, UnitAt},
    },
    resources::{Resources, kubernetes},
    semconv::{
        Described, Endpoints, Side, db,
        http::{self, PathFilter, Routes},
    },
};
use crate::{
    IdMap,
    capture::EndId,
    config::{Config, HeaderRule},
    conn::{Connection, own::OwnSockets},
    export::{ExportSpan, SpanQueue, SpanRecord, agent_scope},
    pipeline::Record,
    protocol::{
        db::{DbCall, DbEvent, DbOptions},
        http::{Exchange, HttpEvent, HttpOptions, Moment, Request},
        session::{self, Event, Session, Tls},
    },
};

/// How long a request whose client went away before the answer keeps
/// owning its units: its handler usually runs on (OpenTelemetry SDKs nest
/// those calls under it too).
const ABANDONED_GRACE_NS: u64 = 10_000_000_000;
/// Most abandoned requests remembered.
const MAX_ABANDONED: usize = 4096;

/// Most requests remembered as in flight per thread or per connection.
const MAX_IN_FLIGHT: usize = 64;
/// Most threads whose server requests are remembered: an idle thread's
/// empty list is kept for its next request until there are this many.
const MAX_SERVING_THREADS: usize = 4096;
/// Most requests remembered as being served per thread (an event loop may
/// serve hundreds at once; a proxy's upstream call is matched among them).
const MAX_SERVING: usize = 1024;

/// What the tracer is configured with.
pub struct TraceOptions {
    /// Each header rule with its attribute's key, made once so that spans
    /// share it (a reference count, not a copy, per span).
    pub header_rules: Vec<(HeaderRule, Key)>,
    pub max_header_value: usize,
    /// Shared with each span's description, which outlives a borrow of self.
    pub routes: Arc<Routes>,
    pub exclude_paths: PathFilter,
    pub exclude_processes: Vec<String>,
    pub sampler: Sampler,
    pub config: Config,
    /// Pod metadata, when a Kubernetes watch runs.
    pub kubernetes: Option<kubernetes::Metadata>,
}

impl TraceOptions {
    pub fn new(config: &Config, sampler: Sampler) -> Self {
        Self {
            header_rules: config
                .http
                .headers
                .iter()
                .map(|rule| {
                    let key = Key::from(Arc::<str>::from(rule.attribute.as_str()));
                    (rule.clone(), key)
                })
                .collect(),
            max_header_value: config.http.max_header_value,
            routes: Arc::new(Routes::new(&config.http.routes)),
            exclude_paths: PathFilter::new(&config.exclude.paths),
            exclude_processes: config.exclude.processes.clone(),
            sampler,
            config: config.clone(),
            kubernetes: None,
        }
    }
}

/// Counters of the trace stage.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct TraceStats {
    pub spans: u64,
    pub spans_unsampled: u64,
    pub requests_excluded: u64,
    /// Connections whose protocol is unknown, encrypted or compressed.
    pub connections_not_traced: u64,
    /// Closed encrypted connections whose plaintext a TLS probe gave.
    pub connections_tls: u64,
    /// Closed encrypted connections without plaintext (their TLS library
    /// is not followed): nothing of them was traced.
    pub connections_tls_unread: u64,
    pub connections_ignored: u64,
    /// Records that came after lost records of their own connection (the
    /// transport refused those): a hole the parser skipped or resynced at.
    pub stream_holes: u64,
}

/// Most connections waiting to be muted between two rounds of the loop.
const MAX_MUTES: usize = 4096;

/// A connection whose bytes the tracer will never use (its protocol is
/// unknown, its process excluded, or it carries the agent's own exports):
/// the kernel may stop copying them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mute {
    pub conn_id: u64,
    pub tgid: u32,
    pub fd: i32,
    /// Its calls are still reported, without their bytes: a connection
    /// carrying exports, whose reader's next connection may forward them
    /// (see `Adjacency::connected`).
    pub blind: bool,
}

/// How a request begins, whatever its protocol.
struct Start {
    seq: u64,
    at: Moment,
    side: Side,
    /// The context the request carries itself (HTTP traceparent).
    traceparent: Option<Parent>,
    /// Tenant attributes from the request itself.
    own_tenant: Option<Arc<[KeyValue]>>,
    excluded: bool,
    /// HTTP method and path, for matching a proxy's upstream call.
    content: Option<Content>,
}

impl Start {
    fn plain(seq: u64, at: Moment, side: Side) -> Self {
        Self {
            seq,
            at,
            side,
            traceparent: None,
            own_tenant: None,
            excluded: false,
            content: None,
        }
    }
}

/// A span that has begun: its ids and what its children inherit.
#[derive(Debug, Clone)]
struct Begun {
    seq: u64,
    side: Side,
    trace_id: opentelemetry::trace::TraceId,
    span_id: SpanId,
    parent: Option<Parent>,
    sampled: bool,
    trace_state: TraceState,
    /// Tenant attributes: the request's own, else the parent's.
    tenant: Arc<[KeyValue]>,
    excluded: bool,
    /// (tgid, tid) that read a server request.
    thread: (u32, u32),
}

impl Begun {
    fn as_parent(&self) -> Parent {
        Parent {
            trace_id: self.trace_id,
            span_id: self.span_id,
            sampled: self.sampled,
            trace_state: self.trace_state.clone(),
            remote: false,
        }
    }
}

/// Per-connection state.
struct ConnTrace {
    session: Session,
    /// (local, remote), for the link keys of its requests.
    ends: (EndId, EndId),
    ignored: bool,
    /// Ignored because it carries the agent's own exports (its peer is the
    /// agent, or a proxy's callback forwarding them opened it).
    exports: bool,
    /// No data record yet: the own-connection check is made again at the
    /// first one (the kernel's report of the agent's connect may come
    /// after the peer's accept, never after its first byte).
    fresh: bool,
    begun: VecDeque<Begun>,
    last: Moment,
    /// `network.peer.address`, once known (None inside: the peer has none).
    peer: Option<Option<Arc<str>>>,
}

/// A request whose client left before the answer, still owning its units.
struct Abandoned {
    parent: Parent,
    tenant: Arc<[KeyValue]>,
    until_ns: u64,
}

/// A server request in flight on a thread: the parent of calls it makes.
struct Serving {
    conn_id: u64,
    seq: u64,
    parent: Parent,
    tenant: Arc<[KeyValue]>,
    content: Option<Content>,
}

pub struct Tracer {
    opts: TraceOptions,
    session_opts: session::Options,
    queue: SpanQueue,
    ids: Ids,
    resources: Resources,
    own: OwnSockets,
    conns: IdMap<u64, ConnTrace>,
    /// Server requests being served, per thread.
    serving: IdMap<(u32, u32), Vec<Serving>>,
    /// The two ends of local connections.
    links: Links,
    /// Root server spans waiting a moment for their client end.
    held: Held,
    /// Which request each unit of work of a followed runtime serves.
    pub ownership: Ownership,
    /// What event loops without a followed runtime do on each thread.
    adjacency: Adjacency,
    /// Server requests of followed processes whose connection closed
    /// unanswered: (conn_id, seq) → what children inherit, and until when.
    abandoned: IdMap<(u64, u64), Abandoned>,
    /// The moment (thread, time, unit) of the record being handled.
    io: Moment,
    /// Wall clock minus the monotonic clock the kernel stamps events with.
    clock_offset: Duration,
    events: Vec<Event>,
    /// The tenant of spans without one, shared: an empty `Arc<[_]>` made
    /// per span would still allocate its counts.
    no_tenant: Arc<[KeyValue]>,
    /// The last tenant a request carried, shared with the next request
    /// that carries the same values: requests come in runs of one tenant,
    /// and building the list took an allocation per request.
    last_tenant: Option<Arc<[KeyValue]>>,
    pub stats: TraceStats,
    /// Connections to mute in the kernel, taken by the loop after each round.
    pub mutes: Vec<Mute>,
}

impl Tracer {
    pub fn new(opts: TraceOptions, queue: SpanQueue) -> Self {
        let session_opts = session::Options {
            http: Arc::new(HttpOptions {
                extra_headers: opts
                    .header_rules
                    .iter()
                    .map(|(r, _)| Arc::from(r.header.as_str()))
                    .collect(),
                max_value_bytes: opts.max_header_value,
                ..HttpOptions::default()
            }),
            db: Arc::new(DbOptions {
                sanitize: opts.config.db.sanitize_queries,
                max_query_bytes: opts.config.db.max_query_bytes,
                ..DbOptions::default()
            }),
        };
        let resources =
            Resources::new(opts.config.services.clone()).with_kubernetes(opts.kubernetes.clone());
        Self {
            opts,
            session_opts,
            queue,
            ids: Ids::default(),
            resources,
            own: OwnSockets::default(),
            conns: IdMap::default(),
            serving: IdMap::default(),
            links: Links::default(),
            held: Held::default(),
            ownership: Ownership::default(),
            adjacency: Adjacency::default(),
            abandoned: IdMap::default(),
            io: Moment::default(),
            clock_offset: clock_offset(),
            events: Vec::new(),
            no_tenant: Arc::from(Vec::new()),
            last_tenant: None,
            stats: TraceStats::default(),
            mutes: Vec::new(),
        }
    }

    pub fn on_record(&mut self, record: Record<'_>) {
        match record {
            Record::Opened(conn) => {
                let from_start = conn.seen_from_start;
                let mut forwards_exports = false;
                if from_start
                    && conn.role == agent_common::Role::Client
                    && !self.ownership.follows_at(conn.tgid, conn.opened_ns)
                {
                    forwards_exports = self
                        .adjacency
                        .connected((conn.tgid, conn.opened_by), conn.conn_id);
                }
                self.conns.remove(&conn.conn_id);
                let mut state = self.new_conn(conn, from_start);
                if forwards_exports && !state.ignored {
                    // Its far end (the collector) must not be traced either.
                    if let Some(local) = conn.local.inet() {
                        self.own.insert(local);
                    }
                    state.ignored = true;
                    state.exports = true;
                    self.stats.connections_ignored += 1;
                    self.mute(conn, true);
                }
                self.conns.insert(conn.conn_id, state);
            }
            Record::Data(Some(conn), data) => {
                if !self.conns.contains_key(&conn.conn_id) {
                    let state = self.new_conn(conn, false);
                    self.conns.insert(conn.conn_id, state);
                }
                let Some(state) = self.conns.get_mut(&conn.conn_id) else {
                    return;
                };
                let mut blind = false;
                if state.fresh {
                    state.fresh = false;
                    if !state.ignored && conn.remote.inet().is_some_and(|r| self.own.knows(r)) {
                        state.ignored = true;
                        state.exports = true;
                        self.stats.connections_ignored += 1;
                        blind = true;
                    }
                }
                if state.ignored {
                    if state.exports {
                        self.adjacency
                            .on_exports((conn.tgid, data.header.tid), conn.conn_id);
                    }
                    if blind {
                        self.mute(conn, true);
                    }
                    return;
                }
                let at = Moment {
                    ts_ns: data.header.ts_ns,
                    tid: data.header.tid,
                    unit: data.unit,
                };
                let before = std::mem::replace(&mut state.last, at);
                self.io = at;
                if self.ownership.follows_at(conn.tgid, at.ts_ns) {
                    let unit = UnitAt {
                        unit: data.unit,
                        seq: data.unit_seq,
                    };
                    self.ownership.on_io(conn.tgid, at.tid, at.ts_ns, unit);
                } else {
                    self.adjacency.on_io((conn.tgid, at.tid), conn.conn_id);
                }
                let missing = data.total_bytes.saturating_sub(data.payload.len() as u64);
                let mut events = std::mem::take(&mut self.events);
                if data.lost.any() {
                    // A hole just before these bytes; what it cuts ends at
                    // the last moment seen before it.
                    let cut = if before.ts_ns == 0 { at } else { before };
                    for (dir, bytes) in [
                        (Direction::Egress, data.lost.egress),
                        (Direction::Ingress, data.lost.ingress),
                    ] {
                        state.session.lost(dir, cut, u64::from(bytes), &mut events);
                    }
                    self.stats.stream_holes += 1;
                }
                if data.syscall.is_tls() {
                    state.session.feed_plaintext(
                        data.direction,
                        at,
                        data.payload,
                        missing,
                        &mut events,
                    );
                } else {
                    state
                        .session
                        .feed(data.direction, at, data.payload, missing, &mut events);
                }
                self.handle(conn, data.direction, &mut events);
                self.events = events;
            }
            Record::Data(None, _) => {}
            Record::Closed(conn) => {
                let Some(state) = self.conns.get_mut(&conn.conn_id) else {
                    return;
                };
                let mut events = std::mem::take(&mut self.events);
                let at = state.last;
                state.session.close(at, &mut events);
                self.handle(conn, Direction::Ingress, &mut events);
                self.events = events;
                if let Some(state) = self.conns.remove(&conn.conn_id) {
                    self.forget(conn.conn_id, state);
                }
                self.adjacency.closed(conn.conn_id);
            }
            Record::Unit(made) => {
                let h = &made.header;
                if self.ownership.is_followed(h.tgid) {
                    let (conns, abandoned) = (&self.conns, &self.abandoned);
                    let parent = UnitAt {
                        unit: made.parent,
                        seq: made.parent_seq,
                    };
                    self.ownership
                        .on_unit((h.tgid, h.tid), h.ts_ns, parent, made.unit, |r| {
                            serving_request(conns, r).is_some()
                                || abandoned
                                    .get(&(r.conn_id, r.seq))
                                    .is_some_and(|a| h.ts_ns <= a.until_ns)
                        });
                }
            }
            Record::Followed { tgid, since_ns } => self.ownership.follow(tgid, since_ns),
            Record::Unfollowed(tgid) => self.ownership.unfollow(tgid),
            Record::OwnConnect(local) => self.own.insert(local),
            Record::Evicted(conn_id) => {
                if let Some(state) = self.conns.remove(&conn_id) {
                    self.forget(conn_id, state);
                }
            }
        }
    }

    fn new_conn(&mut self, conn: &Connection, from_start: bool) -> ConnTrace {
        let exe = self.resources.exe_name(conn.tgid, &conn.comm, None);
        let excluded = self.opts.exclude_processes.iter().any(|p| p == exe)
            || [&conn.local, &conn.remote]
                .into_iter()
                .filter_map(|end| end.unix_name())
                .any(|name| self.opts.config.exclude.excludes_unix_socket(name));
        let exports = !excluded && conn.remote.inet().is_some_and(|r| self.own.is_own(r));
        let ignored = excluded || exports;
        if ignored {
            self.stats.connections_ignored += 1;
        }
        if excluded {
            self.mute(conn, false);
        } else if exports {
            // Its calls stay: a proxy's forwarding of them is known by
            // which thread reads them. Their bytes (the spans) go unread.
            self.mute(conn, true);
        }
        ConnTrace {
            session: Session::new(
                self.session_opts.clone(),
                from_start,
                (
                    conn.local.port().unwrap_or(0),
                    conn.remote.port().unwrap_or(0),
                ),
            ),
            ends: (conn.local.id(), conn.remote.id()),
            ignored,
            exports,
            fresh: true,
            begun: VecDeque::new(),
            last: Moment::default(),
            peer: None,
        }
    }

    /// Asks for `conn` to be muted in the kernel, or made `blind` (fd-less
    /// connections, seen by kernel functions only, cannot be).
    fn mute(&mut self, conn: &Connection, blind: bool) {
        if conn.fd >= 0 && self.mutes.len() < MAX_MUTES {
            self.mutes.push(Mute {
                conn_id: conn.conn_id,
                tgid: conn.tgid,
                fd: conn.fd,
                blind,
            });
        }
    }

    /// Drops what a closed connection left in flight.
    fn forget(&mut self, conn_id: u64, state: ConnTrace) {
        match state.session.tls() {
            Tls::None => {}
            Tls::Plaintext => self.stats.connections_tls += 1,
            Tls::Ciphertext => self.stats.connections_tls_unread += 1,
        }
        for begun in state.begun {
            self.unregister(conn_id, state.ends, &begun, state.last.ts_ns, false);
        }
    }

    fn handle(&mut self, conn: &Connection, dir: Direction, events: &mut Vec<Event>) {
        for event in events.drain(..) {
            match event {
                Event::Http(HttpEvent::Request(request)) => self.begin_http(conn, dir, request),
                Event::Http(HttpEvent::Exchange(exchange)) => self.finish_http(conn, exchange),
                Event::Http(HttpEvent::NotHttp) | Event::Db(DbEvent::Skip) => {
                    self.stats.connections_not_traced += 1;
                    // Encrypted ones stay: their plaintext comes through
                    // the same kernel entry.
                    let clear = self
                        .conns
                        .get(&conn.conn_id)
                        .is_some_and(|c| c.session.tls() == Tls::None);
                    if clear {
                        self.mute(conn, false);
                    }
                }
                Event::Db(DbEvent::Request { seq, start }) => {
                    let side = self.db_side(conn);
                    self.begin(conn, Start::plain(seq, start, side));
                }
                Event::Db(DbEvent::Call(call)) => self.finish_db(conn, &call),
            }
        }
    }

    /// A database request flows from client to server; the session knows
    /// which way that is on this connection.
    fn db_side(&self, conn: &Connection) -> Side {
        let requests = self
            .conns
            .get(&conn.conn_id)
            .and_then(|c| c.session.request_direction());
        match requests {
            Some(Direction::Ingress) => Side::Server,
            _ => Side::Client,
        }
    }

    fn begin_http(&mut self, conn: &Connection, dir: Direction, request: Arc<Request>) {
        // Requests are read by servers and written by clients.
        let side = match dir {
            Direction::Ingress => Side::Server,
            Direction::Egress => Side::Client,
        };
        let own_tenant = self.tenant_of(&request);
        self.begin(
            conn,
            Start {
                seq: request.seq,
                at: request.start,
                side,
                traceparent: request
                    .traceparent
                    .as_deref()
                    .and_then(|tp| parse_traceparent(tp, request.tracestate.as_deref())),
                own_tenant,
                excluded: self.opts.exclude_paths.excludes(&request.target),
                content: Some(Content::of(request)),
            },
        );
    }

    /// The tenant attributes `request` carries itself, shared by every
    /// span of its trace on this host; `None` without any.
    fn tenant_of(&mut self, request: &Request) -> Option<Arc<[KeyValue]>> {
        let found = || {
            self.opts.header_rules.iter().filter_map(|(rule, key)| {
                request
                    .extra
                    .iter()
                    .find(|(name, _)| **name == *rule.header)
                    .map(|(_, value)| (key, value))
            })
        };
        found().next()?;
        if let Some(last) = &self.last_tenant {
            let mut last_values = last.iter();
            let same = found().all(|(key, value)| {
                last_values.next().is_some_and(|kv| {
                    kv.key == *key
                        && matches!(&kv.value, Value::String(s) if s.as_str() == &**value)
                })
            }) && last_values.next().is_none();
            if same {
                return Some(Arc::clone(last));
            }
        }
        let mut kvs =
            found().map(|(key, value)| KeyValue::new(key.clone(), Value::from(Arc::clone(value))));
        // One allocation for the usual single tenant header.
        let tenant: Arc<[KeyValue]> = match (kvs.next(), kvs.next()) {
            (Some(only), None) => Arc::from([only]),
            (a, b) => a.into_iter().chain(b).chain(kvs).collect(),
        };
        self.last_tenant = Some(Arc::clone(&tenant));
        Some(tenant)
    }

    /// A request began: decide the span's ids and parent now, so spans
    /// that begin while it is in flight can be its children.
    fn begin(&mut self, conn: &Connection, start: Start) {
        let Start {
            seq,
            at,
            side,
            traceparent,
            own_tenant,
            excluded,
            content,
        } = start;
        let thread = (conn.tgid, at.tid);
        let now = at.ts_ns;
        let (parent, inherited) = match side {
            Side::Server => self.server_parent(conn, now, traceparent),
            // The unit that wrote the request's first bytes: a request may
            // be recognised only later (a new connection's protocol is
            // confirmed by its answer), read by another unit.
            Side::Client if self.ownership.follows_at(conn.tgid, at.ts_ns) => {
                self.owned_parent(conn.tgid, at.unit, now, traceparent)
            }
            Side::Client => {
                let adjacent = self.adjacency.adjacent(thread, conn.conn_id);
                self.client_parent(thread, traceparent, adjacent, content.as_ref())
            }
        };
        let tenant: Arc<[KeyValue]> = own_tenant
            .or(inherited)
            .unwrap_or_else(|| Arc::clone(&self.no_tenant));
        let trace_id = parent
            .as_ref()
            .map_or_else(|| self.ids.trace_id(), |p| p.trace_id);
        let sampled = self.opts.sampler.sample(trace_id, parent.as_ref());
        let mut begun = Begun {
            seq,
            side,
            trace_id,
            span_id: self.ids.span_id(),
            trace_state: parent
                .as_ref()
                .map(|p| p.trace_state.clone())
                .unwrap_or_default(),
            parent,
            sampled,
            tenant,
            excluded,
            thread,
        };
        let key = link_key(conn.local.id(), conn.remote.id(), side);
        match side {
            Side::Server if !excluded => {
                let request = RequestRef {
                    conn_id: conn.conn_id,
                    seq: begun.seq,
                };
                if self.ownership.follows_at(conn.tgid, self.io.ts_ns) {
                    self.ownership.began(conn.tgid, self.io.tid, request);
                } else {
                    self.adjacency.began((conn.tgid, self.io.tid), request);
                }
                if begun.parent.is_none() {
                    self.links.wait_for_call(key, conn.conn_id, begun.seq, now);
                }
                if self.serving.len() >= MAX_SERVING_THREADS && !self.serving.contains_key(&thread)
                {
                    self.serving.retain(|_, s| !s.is_empty());
                }
                let serving = self.serving.entry(thread).or_default();
                if serving.len() < MAX_SERVING {
                    serving.push(Serving {
                        conn_id: conn.conn_id,
                        seq: begun.seq,
                        parent: begun.as_parent(),
                        tenant: Arc::clone(&begun.tenant),
                        content,
                    });
                }
            }
            Side::Client => {
                let ordered = self.stamps(conn.conn_id);
                let adopted = self.adopt_waiting_server(key, now, ordered, &mut begun);
                self.links.add_call(
                    key,
                    Call::new(
                        conn.conn_id,
                        begun.seq,
                        now,
                        begun.as_parent(),
                        Arc::clone(&begun.tenant),
                        adopted,
                    ),
                );
            }
            Side::Server => {}
        }
        if let Some(state) = self.conns.get_mut(&conn.conn_id)
            && state.begun.len() < MAX_IN_FLIGHT
        {
            state.begun.push_back(begun);
        }
    }

    /// The server end of this client's connection was seen first and is
    /// still a root: make it this client span's child. A root client joins
    /// the server's trace; otherwise the server's trace is renamed to the
    /// client's for every span that finishes from now on.
    fn adopt_waiting_server(
        &mut self,
        key: LinkKey,
        now: u64,
        ordered: Ordered,
        client: &mut Begun,
    ) -> bool {
        let Some((conn_id, seq)) = self.links.take_waiting(key, now, ordered) else {
            return false;
        };
        let Some(server) = self
            .conns
            .get_mut(&conn_id)
            .and_then(|c| c.begun.iter_mut().find(|b| b.seq == seq))
        else {
            // The server's request is over already: its span is held.
            let Some(mut span) = self.held.take(conn_id, seq) else {
                return false;
            };
            let server_trace = span.span.span_context.trace_id();
            if client.parent.is_none() {
                client.trace_id = server_trace;
                client.sampled = true;
            } else {
                self.links.alias(server_trace, client.trace_id);
            }
            held::reparent(&mut span, client.trace_id, client.span_id);
            self.queue.push(span);
            return true;
        };
        if client.parent.is_none() {
            client.trace_id = server.trace_id;
            client.sampled = server.sampled;
        } else {
            self.links.alias(server.trace_id, client.trace_id);
        }
        server.parent = Some(client.as_parent());
        true
    }

    /// How connection `conn_id`'s records are stamped: by the socket
    /// syscalls, unless its bytes come from a TLS library.
    fn stamps(&self, conn_id: u64) -> Ordered {
        match self.conns.get(&conn_id).map(|c| c.session.tls()) {
            Some(Tls::Plaintext) => Ordered::No,
            _ => Ordered::Yes,
        }
    }

    fn server_parent(
        &mut self,
        conn: &Connection,
        now: u64,
        traceparent: Option<Parent>,
    ) -> (Option<Parent>, Option<Arc<[KeyValue]>>) {
        // The client end of this very connection, if it is on this host.
        let key = link_key(conn.local.id(), conn.remote.id(), Side::Server);
        let ordered = self.stamps(conn.conn_id);
        if let Some((parent, tenant)) = self.links.claim_call(key, now, ordered) {
            return (Some(parent), Some(tenant));
        }
        (traceparent, None)
    }

    fn client_parent(
        &self,
        thread: (u32, u32),
        traceparent: Option<Parent>,
        adjacent: Option<RequestRef>,
        content: Option<&Content>,
    ) -> (Option<Parent>, Option<Arc<[KeyValue]>>) {
        let inherit = |s: &Serving| (Some(s.parent.clone()), Some(Arc::clone(&s.tenant)));
        match self.serving.get(&thread).map(Vec::as_slice) {
            Some([only]) => inherit(only),
            // Several requests in flight on one thread (an event loop): the
            // one whose callback made the call, if the call forwards it, or
            // the only one the call forwards.
            Some(many @ [_, _, ..]) => {
                let Some(content) = content else {
                    return (None, None);
                };
                let forwards =
                    |s: &&Serving| s.content.as_ref().is_some_and(|c| c.forwarded_as(content));
                let by_adjacency = adjacent.and_then(|r| {
                    many.iter()
                        .filter(forwards)
                        .find(|s| s.conn_id == r.conn_id && s.seq == r.seq)
                });
                let mut matching = many.iter().filter(forwards);
                let by_content = match (matching.next(), matching.next()) {
                    (Some(only), None) => Some(only),
                    _ => None,
                };
                by_adjacency.or(by_content).map_or((None, None), inherit)
            }
            _ if traceparent.is_some() => (traceparent, None),
            // A thread serving nothing itself, e.g. a worker pool thread
            // running a request's blocking code (FastAPI `def` endpoints,
            // Django under ASGI): the child of the process's request when
            // exactly one is in flight in the whole process.
            _ => match self.only_request_of(thread.0) {
                Some(only) => inherit(only),
                None => (None, None),
            },
        }
    }

    /// A followed runtime's call: the child of the request owning the unit
    /// that made it, while that request is in flight; else a root (or its
    /// own traceparent).
    fn owned_parent(
        &self,
        tgid: u32,
        unit: u64,
        now: u64,
        traceparent: Option<Parent>,
    ) -> (Option<Parent>, Option<Arc<[KeyValue]>>) {
        let Some(r) = self.ownership.owner_of(tgid, unit) else {
            return (traceparent, None);
        };
        if let Some(b) = serving_request(&self.conns, r) {
            return (Some(b.as_parent()), Some(Arc::clone(&b.tenant)));
        }
        match self.abandoned.get(&(r.conn_id, r.seq)) {
            Some(a) if now <= a.until_ns => (Some(a.parent.clone()), Some(Arc::clone(&a.tenant))),
            _ => (traceparent, None),
        }
    }

    /// The one server request in flight in process `tgid`, if exactly one is.
    fn only_request_of(&self, tgid: u32) -> Option<&Serving> {
        let mut found = None;
        for ((pid, _), serving) in &self.serving {
            if *pid != tgid {
                continue;
            }
            match (found, serving.as_slice()) {
                (None, [only]) => found = Some(only),
                (_, []) => {}
                _ => return None,
            }
        }
        found
    }

    /// A request is over (answered, or its connection gone at `now`).
    fn unregister(
        &mut self,
        conn_id: u64,
        (local, remote): (EndId, EndId),
        begun: &Begun,
        now: u64,
        held: bool,
    ) {
        let key = link_key(local, remote, begun.side);
        match begun.side {
            Side::Server => {
                if let Some(serving) = self.serving.get_mut(&begun.thread) {
                    // Kept when empty: the thread's next request reuses it.
                    serving.retain(|s| !(s.conn_id == conn_id && s.seq == begun.seq));
                }
                // A held span still waits for its client end.
                if !held {
                    self.links.server_done(key, conn_id, begun.seq);
                }
            }
            Side::Client => self.links.call_done(key, conn_id, begun.seq, now),
        }
    }

    fn finish_http(&mut self, conn: &Connection, exchange: Exchange) {
        let start_ns = exchange.request.start.ts_ns;
        let end_ns = exchange
            .response
            .as_ref()
            .map(|r| r.end.ts_ns)
            .or(exchange.response_lost.map(|at| at.ts_ns));
        let at = self.endpoints(conn);
        self.finish(
            conn,
            exchange.request.seq,
            start_ns,
            end_ns,
            |side, routes| http::describe(side, &exchange, at, routes),
        );
    }

    fn finish_db(&mut self, conn: &Connection, call: &DbCall) {
        let Some(system) = self
            .conns
            .get(&conn.conn_id)
            .and_then(|c| c.session.protocol())
            .and_then(|p| p.db_system())
        else {
            return;
        };
        let at = self.endpoints(conn);
        let end_ns = (!call.unanswered).then_some(call.end.ts_ns);
        let seq = call.seq;
        let start_ns = call.start.ts_ns;
        self.finish(conn, seq, start_ns, end_ns, |side, _| {
            db::describe(system, side, call, at)
        });
    }

    /// The connection's ends for its spans' attributes, with the peer's
    /// address formatted once per connection.
    fn endpoints<'c>(&mut self, conn: &'c Connection) -> Endpoints<'c> {
        let Some(state) = self.conns.get_mut(&conn.conn_id) else {
            return Endpoints::new(&conn.local, &conn.remote, false);
        };
        Endpoints {
            local: &conn.local,
            remote: &conn.remote,
            tls: state.session.tls() == Tls::Plaintext,
            peer: state
                .peer
                .get_or_insert_with(|| semconv::peer_address(&conn.remote))
                .clone(),
        }
    }

    /// A request's span is complete: `describe` names it for its side
    /// (with the configured HTTP routes at hand: a clone of their `Arc`
    /// per span, for the borrow, was an atomic add and subtract apiece).
    fn finish(
        &mut self,
        conn: &Connection,
        seq: u64,
        start_ns: u64,
        end_ns: Option<u64>,
        describe: impl FnOnce(Side, &Routes) -> Described,
    ) {
        let addrs = (conn.local.id(), conn.remote.id());
        let Some(state) = self.conns.get_mut(&conn.conn_id) else {
            return;
        };
        // Begun entries older than this one lost their response (the
        // parser resynchronised); drop them.
        let mut stale = Vec::new();
        while state.begun.front().is_some_and(|b| b.seq < seq) {
            stale.extend(state.begun.pop_front());
        }
        let unanswered = end_ns.is_none();
        let end_ns = end_ns.unwrap_or(state.last.ts_ns).max(start_ns);
        let Some(begun) = state.begun.pop_front_if(|b| b.seq == seq) else {
            for b in &stale {
                self.unregister(conn.conn_id, addrs, b, end_ns, false);
            }
            return;
        };
        // A root server span of a connection whose client end may still
        // be delivered: held a moment for it (see [`held`]).
        let hold = begun.side == Side::Server
            && begun.parent.is_none()
            && !begun.excluded
            && begun.sampled;
        for b in &stale {
            self.unregister(conn.conn_id, addrs, b, end_ns, false);
        }
        self.unregister(conn.conn_id, addrs, &begun, end_ns, hold);
        self.release_held(end_ns);
        if unanswered && begun.side == Side::Server && self.ownership.is_followed(conn.tgid) {
            self.abandon(conn.conn_id, &begun, end_ns);
        }
        if begun.excluded {
            self.stats.requests_excluded += 1;
            return;
        }
        if !begun.sampled {
            self.stats.spans_unsampled += 1;
            return;
        }
        let described = describe(begun.side, &self.opts.routes);
        let mut attributes = described.attributes;
        for kv in begun.tenant.iter() {
            attributes.value(kv.key.as_str(), &kv.value);
        }
        let (kind, server_port) = match begun.side {
            Side::Server => (SpanKind::Server, conn.local.port()),
            Side::Client => (SpanKind::Client, None),
        };
        let resource = self.resources.of(conn.tgid, &conn.comm, server_port);
        let span = SpanRecord {
            span_context: SpanContext::new(
                self.links.trace_id(begun.trace_id),
                begun.span_id,
                flags(true),
                false,
                begun.trace_state.clone(),
            ),
            parent_span_id: begun.parent.as_ref().map_or(SpanId::INVALID, |p| p.span_id),
            parent_span_is_remote: begun.parent.as_ref().is_some_and(|p| p.remote),
            span_kind: kind,
            name: described.name,
            start_time: self.wall_time(start_ns),
            end_time: self.wall_time(end_ns),
            attributes,
            status: described.status,
            scope: scope(),
        };
        self.stats.spans += 1;
        let span = ExportSpan { resource, span };
        if hold {
            let key = link_key(addrs.0, addrs.1, Side::Server);
            if let Some(oldest) = self.held.hold(key, conn.conn_id, begun.seq, end_ns, span) {
                self.leave(oldest);
            }
        } else {
            self.queue.push(span);
        }
    }

    /// Hands the finished spans over to the exporter (see
    /// [`SpanQueue::batched`]).
    pub fn flush_spans(&mut self) {
        self.queue.flush();
    }

    /// The end of a round of records: held spans due by `now_ns` are
    /// released ([`Tracer::release_held`]) and every finished span is
    /// handed over.
    pub fn end_round(&mut self, now_ns: u64) {
        self.release_held(now_ns);
        self.flush_spans();
    }

    /// Held server spans whose client end did not show up by `now_ns`
    /// (kernel time) leave as roots; `u64::MAX` releases them all.
    pub fn release_held(&mut self, now_ns: u64) {
        while let Some(h) = self.held.expired(now_ns) {
            self.leave(h);
        }
    }

    fn leave(&mut self, h: HeldSpan) {
        self.links.server_done(h.key, h.conn_id, h.seq);
        self.queue.push(h.span);
    }

    /// The client went away before the answer: the request keeps owning
    /// its units for a while.
    fn abandon(&mut self, conn_id: u64, begun: &Begun, end_ns: u64) {
        if self.abandoned.len() >= MAX_ABANDONED {
            self.abandoned.retain(|_, a| a.until_ns >= end_ns);
        }
        if self.abandoned.len() < MAX_ABANDONED {
            let owner = Abandoned {
                parent: begun.as_parent(),
                tenant: Arc::clone(&begun.tenant),
                until_ns: end_ns.saturating_add(ABANDONED_GRACE_NS),
            };
            self.abandoned.insert((conn_id, begun.seq), owner);
        }
    }

    fn wall_time(&self, monotonic_ns: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + self.clock_offset + Duration::from_nanos(monotonic_ns)
    }

    /// Requests waiting for a response, over all connections, and server
    /// spans held for their client end.
    pub fn in_flight(&self) -> usize {
        self.conns.values().map(|c| c.begun.len()).sum::<usize>() + self.held.len()
    }
}

/// The server request `r`, if it is still in flight.
fn serving_request(conns: &IdMap<u64, ConnTrace>, r: RequestRef) -> Option<&Begun> {
    conns
        .get(&r.conn_id)?
        .begun
        .iter()
        .find(|b| b.seq == r.seq && b.side == Side::Server)
}

/// The scope of the spans of traced processes.
fn scope() -> &'static InstrumentationScope {
    static SCOPE: OnceLock<InstrumentationScope> = OnceLock::new();
    agent_scope(&SCOPE, "zerotrace")
}

/// Links are keyed by the client end's (local, remote).
fn link_key(local: EndId, remote: EndId, side: Side) -> LinkKey {
    match side {
        Side::Client => (local, remote.as_server()),
        Side::Server => (remote, local.as_server()),
    }
}

/// Wall clock minus CLOCK_MONOTONIC (what bpf_ktime_get_ns returns).
fn clock_offset() -> Duration {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let mono = clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(Duration::from)
        .unwrap_or_default();
    now.saturating_sub(mono)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{Data, Lost};
    use crate::export::QueuedSpans;
    use agent_common::{EventHeader, Role, Syscall};

    const SERVER: &str = "127.0.0.1:8080";

    fn tracer() -> (Tracer, QueuedSpans) {
        let (queue, rx) = SpanQueue::for_test(100);
        let opts = TraceOptions::new(&Config::default(), Sampler::default());
        (Tracer::new(opts, queue), rx)
    }

    /// Every span so far, held ones released (as at the agent's exit).
    fn exported(t: &mut Tracer, rx: &mut QueuedSpans) -> Vec<ExportSpan> {
        t.release_held(u64::MAX);
        rx.try_iter().collect()
    }

    fn conn(id: u64, role: Role, local: &str, remote: &str) -> Connection {
        Connection {
            conn_id: id,
            tgid: 10,
            fd: id as i32,
            opened_by: 0,
            opened_ns: 0,
            role,
            local: crate::capture::Endpoint::Inet(local.parse().unwrap()),
            remote: crate::capture::Endpoint::Inet(remote.parse().unwrap()),
            comm: "app".into(),
            seen_from_start: true,
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    fn data(t: &mut Tracer, c: &Connection, tid: u32, ts: u64, syscall: Syscall, bytes: &[u8]) {
        record(t, c, (tid, ts), syscall, UnitAt::default(), bytes);
    }

    /// A data record on `c` by thread `tid` at `ts`, made while `unit` ran.
    fn record(
        t: &mut Tracer,
        c: &Connection,
        (tid, ts): (u32, u64),
        syscall: Syscall,
        unit: UnitAt,
        bytes: &[u8],
    ) {
        record_after(t, c, (tid, ts), syscall, unit, bytes, Lost::default());
    }

    /// [`record`], reporting that `lost` bytes of `c` went missing before it.
    fn record_after(
        t: &mut Tracer,
        c: &Connection,
        (tid, ts): (u32, u64),
        syscall: Syscall,
        unit: UnitAt,
        bytes: &[u8],
        lost: Lost,
    ) {
        let d = Data {
            header: EventHeader {
                tgid: c.tgid,
                tid,
                ts_ns: ts,
                conn_id: c.conn_id,
                ..Default::default()
            },
            syscall,
            direction: syscall.direction(),
            total_bytes: bytes.len() as u64,
            payload: bytes,
            unit: unit.unit,
            unit_seq: unit.seq,
            lost,
        };
        t.on_record(Record::Data(Some(c), &d));
    }

    const REQ: &[u8] = b"GET /x HTTP/1.1\r\nHost: a\r\nx-tenant-id: t1\r\n\r\n";
    const CALL: &[u8] = b"GET /y HTTP/1.1\r\nHost: b\r\n\r\n";
    const RESP: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

    /// Serves `n` requests on thread 11 (read, not yet answered); then thread
    /// `call_tid` makes a client call; returns the client span.
    fn call_while_serving(n: u64, call_tid: u32) -> (Vec<ExportSpan>, ExportSpan) {
        let (mut t, mut rx) = tracer();
        let servers: Vec<Connection> = (0..n)
            .map(|i| {
                conn(
                    i + 1,
                    Role::Server,
                    SERVER,
                    &format!("127.0.0.1:{}", 40000 + i),
                )
            })
            .collect();
        for s in &servers {
            t.on_record(Record::Opened(s));
            data(&mut t, s, 11, 100, Syscall::Read, REQ);
        }
        let client = conn(99, Role::Client, "127.0.0.1:50000", "10.0.0.9:5432");
        t.on_record(Record::Opened(&client));
        data(&mut t, &client, call_tid, 200, Syscall::Write, CALL);
        data(&mut t, &client, call_tid, 300, Syscall::Read, RESP);
        let call = rx.try_recv().expect("client span");
        for s in &servers {
            data(&mut t, s, 11, 400, Syscall::Write, RESP);
        }
        (exported(&mut t, &mut rx), call)
    }

    /// A server's read of `bytes` at `ts` on thread 11, after `egress`
    /// bytes of the connection were lost.
    fn read_after_hole(t: &mut Tracer, c: &Connection, ts: u64, bytes: &[u8], egress: u32) {
        let hole = Lost { egress, ingress: 0 };
        let at = (11, ts);
        record_after(t, c, at, Syscall::Read, UnitAt::default(), bytes, hole);
    }

    /// An attribute's value as text.
    fn attr(x: &ExportSpan, key: &str) -> Option<String> {
        let kv = x.span.attributes.iter().find(|kv| kv.key.as_str() == key);
        kv.map(|kv| kv.value.to_string())
    }

    fn nanos(t: std::time::SystemTime) -> u64 {
        t.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    }

    /// Each request's span carries its own tenant, across connections and
    /// on one kept connection, whether it repeats the last one's, changes
    /// it or carries none; repeated tenants share one list.
    #[test]
    fn each_request_keeps_its_own_tenant() {
        let (mut t, mut rx) = tracer();
        let a = conn(1, Role::Server, SERVER, "127.0.0.1:40001");
        let b = conn(2, Role::Server, SERVER, "127.0.0.1:40002");
        t.on_record(Record::Opened(&a));
        t.on_record(Record::Opened(&b));
        let tenants = [
            (&a, Some("t1")),
            (&a, Some("t1")),
            (&b, Some("t1")),
            (&a, Some("t2")),
            (&a, None),
            (&b, Some("t1")),
            (&b, Some("t22")),
        ];
        let mut ts = 100;
        for (c, tenant) in tenants {
            let req = match tenant {
                Some(id) => format!("GET /x HTTP/1.1\r\nHost: a\r\nx-tenant-id: {id}\r\n\r\n"),
                None => "GET /x HTTP/1.1\r\nHost: a\r\n\r\n".to_string(),
            };
            data(&mut t, c, 11, ts, Syscall::Read, req.as_bytes());
            data(&mut t, c, 11, ts + 10, Syscall::Write, RESP);
            ts += 100;
        }
        let spans = exported(&mut t, &mut rx);
        let got: Vec<Option<String>> = spans.iter().map(|s| attr(s, "tenant.id")).collect();
        let want: Vec<Option<String>> = tenants
            .iter()
            .map(|(_, id)| id.map(str::to_string))
            .collect();
        assert_eq!(got, want);

        let with = |id: &str| Request {
            extra: vec![(Arc::from("x-tenant-id"), Arc::from(id))],
            ..Request::default()
        };
        let first = t.tenant_of(&with("t3")).unwrap();
        let again = t.tenant_of(&with("t3")).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "a repeated tenant is shared");
        let other = t.tenant_of(&with("t4")).unwrap();
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(other[0].value.as_str(), "t4");
        assert!(t.tenant_of(&Request::default()).is_none());
    }

    /// A response the transport lost does not give the request before it
    /// the next one's end: the record after the hole says it is there.
    #[test]
    fn a_lost_response_leaves_its_request_unanswered_not_paired_with_the_next() {
        let resp_b: &[u8] = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n";
        let (mut t, mut rx) = tracer();
        let s = conn(1, Role::Server, SERVER, "127.0.0.1:40000");
        t.on_record(Record::Opened(&s));
        data(
            &mut t,
            &s,
            11,
            100,
            Syscall::Read,
            b"GET /a HTTP/1.1\r\n\r\n",
        );
        // The response to /a (RESP, written at 200) was lost.
        read_after_hole(
            &mut t,
            &s,
            300,
            b"GET /b HTTP/1.1\r\n\r\n",
            RESP.len() as u32,
        );
        data(&mut t, &s, 11, 400, Syscall::Write, resp_b);
        let spans = exported(&mut t, &mut rx);
        let path = |p: &str| {
            spans
                .iter()
                .find(|x| attr(x, "url.path").as_deref() == Some(p))
        };
        let (a, b) = (
            path("/a").expect("span of /a"),
            path("/b").expect("span of /b"),
        );
        let status = |x: &ExportSpan| attr(x, "http.response.status_code");
        assert_eq!(status(a), None, "{:?}", a.span);
        assert_eq!(status(b).as_deref(), Some("201"), "{:?}", b.span);
        // Not an error of the application: the response went unseen.
        assert!(attr(a, "zerotrace.response.lost").is_some(), "{:?}", a.span);
        assert!(attr(a, "error.type").is_none(), "{:?}", a.span);
        assert_eq!(a.span.status, opentelemetry::trace::Status::Unset);
        // It ends where the capture last saw the connection before the
        // hole (its own request), not at the next response.
        assert!(a.span.end_time < b.span.start_time, "{:?}", a.span);
        assert_eq!(t.stats.stream_holes, 1);
    }

    /// A response whose body was lost ends at the last moment seen before
    /// the hole, and the next exchange pairs as usual.
    #[test]
    fn a_hole_in_a_body_ends_the_response_before_it() {
        let (mut t, mut rx) = tracer();
        let s = conn(1, Role::Server, SERVER, "127.0.0.1:40000");
        t.on_record(Record::Opened(&s));
        data(
            &mut t,
            &s,
            11,
            100,
            Syscall::Read,
            b"GET /a HTTP/1.1\r\n\r\n",
        );
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n";
        data(&mut t, &s, 11, 200, Syscall::Write, head);
        // The body's record (10 bytes, at 250) was lost.
        read_after_hole(&mut t, &s, 900, b"GET /b HTTP/1.1\r\n\r\n", 10);
        data(&mut t, &s, 11, 1000, Syscall::Write, RESP);
        let spans = exported(&mut t, &mut rx);
        assert_eq!(spans.len(), 2, "{spans:?}");
        let took = |x: &ExportSpan| nanos(x.span.end_time) - nanos(x.span.start_time);
        // Durations: /a ran 100..200 (not 100..900), /b 900..1000.
        assert_eq!(took(&spans[0]), 100, "{spans:?}");
        assert_eq!(took(&spans[1]), 100, "{spans:?}");
    }

    #[test]
    fn idle_threads_lists_are_bounded_and_busy_ones_survive() {
        let (mut t, mut rx) = tracer();
        let busy = conn(1, Role::Server, SERVER, "127.0.0.1:40000");
        t.on_record(Record::Opened(&busy));
        data(&mut t, &busy, 11, 100, Syscall::Read, REQ);
        // Requests served and answered, each on a thread of its own: their
        // emptied lists stay until there are too many.
        let other = conn(2, Role::Server, SERVER, "127.0.0.1:40001");
        t.on_record(Record::Opened(&other));
        for k in 0..MAX_SERVING_THREADS as u64 + 10 {
            let tid = 1000 + k as u32;
            data(&mut t, &other, tid, 200 + 2 * k, Syscall::Read, REQ);
            data(&mut t, &other, tid, 201 + 2 * k, Syscall::Write, RESP);
            while rx.try_recv().is_ok() {}
        }
        assert!(
            t.serving.len() <= MAX_SERVING_THREADS,
            "{}",
            t.serving.len()
        );
        // The busy thread's request is still its calls' parent.
        let client = conn(99, Role::Client, "127.0.0.1:50000", "10.0.0.9:5432");
        t.on_record(Record::Opened(&client));
        data(&mut t, &client, 11, 100_000, Syscall::Write, CALL);
        data(&mut t, &client, 11, 100_001, Syscall::Read, RESP);
        let call = rx.try_recv().expect("client span");
        assert_ne!(call.span.parent_span_id, SpanId::INVALID);
    }

    #[test]
    fn a_call_during_one_request_on_the_thread_is_its_child() {
        let (servers, call) = call_while_serving(1, 11);
        let server = &servers[0].span;
        assert_eq!(call.span.span_kind, SpanKind::Client);
        assert_eq!(call.span.parent_span_id, server.span_context.span_id());
        assert_eq!(
            call.span.span_context.trace_id(),
            server.span_context.trace_id()
        );
        // Tenant attributes flow down to the child.
        assert!(attr(&call, "tenant.id").is_some());
    }

    #[test]
    fn ambiguous_calls_stay_roots() {
        let (_, on_event_loop) = call_while_serving(2, 11);
        assert_eq!(on_event_loop.span.parent_span_id, SpanId::INVALID);
        let (_, other_thread) = call_while_serving(2, 12);
        assert_eq!(other_thread.span.parent_span_id, SpanId::INVALID);
    }

    #[test]
    fn a_worker_thread_call_during_the_processs_only_request_is_its_child() {
        let (servers, call) = call_while_serving(1, 12);
        assert_eq!(
            call.span.parent_span_id,
            servers[0].span.span_context.span_id()
        );
    }

    /// A record of a followed process: `unit` is the runtime unit running.
    fn unit_data(t: &mut Tracer, c: &Connection, tid: u32, ts: u64, unit: UnitAt, bytes: &[u8]) {
        // Servers read requests and write responses; clients the reverse.
        let syscall = if bytes.starts_with(b"HTTP/") == (c.role == Role::Server) {
            Syscall::Write
        } else {
            Syscall::Read
        };
        record(t, c, (tid, ts), syscall, unit, bytes);
    }

    fn made(t: &mut Tracer, tid: u32, ts: u64, parent: UnitAt, unit: u64) {
        let event = agent_common::UnitEvent {
            header: EventHeader {
                tgid: 10,
                tid,
                ts_ns: ts,
                ..Default::default()
            },
            parent: parent.unit,
            unit,
            parent_seq: parent.seq,
            _pad: 0,
        };
        t.on_record(Record::Unit(&event));
    }

    /// A tracer for which process 10's runtime is followed from the start.
    fn followed_tracer() -> (Tracer, QueuedSpans) {
        let (mut t, rx) = tracer();
        t.on_record(Record::Followed {
            tgid: 10,
            since_ns: 0,
        });
        (t, rx)
    }

    fn at(unit: u64, seq: u32) -> UnitAt {
        UnitAt { unit, seq }
    }

    #[test]
    fn a_followed_event_loop_nests_each_call_under_its_own_request() {
        let (mut t, mut rx) = followed_tracer();
        let (loop_tid, worker) = (10, 11);
        let a = conn(1, Role::Server, SERVER, "127.0.0.1:40001");
        let b = conn(2, Role::Server, SERVER, "127.0.0.1:40002");
        let db = conn(3, Role::Client, "127.0.0.1:50000", "10.0.0.9:80");
        let db2 = conn(4, Role::Client, "127.0.0.1:50001", "10.0.0.9:80");
        for c in [&a, &b, &db, &db2] {
            t.on_record(Record::Opened(c));
        }
        // Both requests are read on the loop thread, each in its
        // transport's context; each callback starts the request's task.
        unit_data(&mut t, &a, loop_tid, 100, at(0xa0, 1), REQ);
        made(&mut t, loop_tid, 101, at(0xa0, 1), 0xa1);
        unit_data(&mut t, &b, loop_tid, 110, at(0xb0, 3), REQ);
        made(&mut t, loop_tid, 111, at(0xb0, 3), 0xb1);
        // B's task hands work to a worker thread with a copied context.
        made(&mut t, loop_tid, 115, at(0xb1, 5), 0xb2);
        // A's task calls out on the loop; B's copy calls out on the worker.
        unit_data(&mut t, &db, loop_tid, 120, at(0xa1, 7), CALL);
        unit_data(&mut t, &db2, worker, 121, at(0xb2, 1), CALL);
        unit_data(&mut t, &db, loop_tid, 130, at(0xa1, 9), RESP);
        unit_data(&mut t, &db2, worker, 131, at(0xb2, 1), RESP);
        // A call from a unit nobody owns (a background task): a root.
        unit_data(&mut t, &db, loop_tid, 135, at(0xe0, 11), CALL);
        unit_data(&mut t, &db, loop_tid, 136, at(0xe0, 11), RESP);
        unit_data(&mut t, &a, loop_tid, 140, at(0xa1, 13), RESP);
        unit_data(&mut t, &b, loop_tid, 150, at(0xb1, 15), RESP);
        // After A ended, its task's calls are roots.
        unit_data(&mut t, &db, loop_tid, 160, at(0xa1, 17), CALL);
        unit_data(&mut t, &db, loop_tid, 170, at(0xa1, 17), RESP);
        let spans: Vec<SpanRecord> = exported(&mut t, &mut rx)
            .into_iter()
            .map(|s| s.span)
            .collect();
        // The servers' spans, roots, were held for their client end.
        let [call_a, call_b, background, late, server_a, server_b] = &spans[..] else {
            panic!("{spans:#?}")
        };
        assert_eq!(call_a.parent_span_id, server_a.span_context.span_id());
        assert_eq!(call_b.parent_span_id, server_b.span_context.span_id());
        assert_eq!(background.parent_span_id, SpanId::INVALID);
        assert_eq!(late.parent_span_id, SpanId::INVALID);
        assert_eq!(t.ownership.stats.units_adopted, 2);
        assert_eq!(t.ownership.stats.units_inherited, 1);
    }

    #[test]
    fn a_request_whose_client_left_keeps_its_calls_for_a_while() {
        let (mut t, mut rx) = followed_tracer();
        let a = conn(1, Role::Server, SERVER, "127.0.0.1:40001");
        let db = conn(3, Role::Client, "127.0.0.1:50000", "10.0.0.9:80");
        t.on_record(Record::Opened(&a));
        t.on_record(Record::Opened(&db));
        unit_data(&mut t, &a, 10, 100, at(0xa0, 1), REQ);
        made(&mut t, 10, 101, at(0xa0, 1), 0xa1);
        // The client hangs up; the handler goes on with its calls.
        t.on_record(Record::Closed(&a));
        unit_data(&mut t, &db, 10, 200, at(0xa1, 3), CALL);
        unit_data(&mut t, &db, 10, 210, at(0xa1, 3), RESP);
        // Long after, its task's calls are roots.
        let late = 101 + ABANDONED_GRACE_NS + 1000;
        unit_data(&mut t, &db, 10, late, at(0xa1, 5), CALL);
        unit_data(&mut t, &db, 10, late + 10, at(0xa1, 5), RESP);
        let spans: Vec<SpanRecord> = exported(&mut t, &mut rx)
            .into_iter()
            .map(|s| s.span)
            .collect();
        // The server's span, a root, was held for its client end until
        // the late call's time.
        let [call, server, late] = &spans[..] else {
            panic!("{spans:#?}")
        };
        assert_eq!(call.parent_span_id, server.span_context.span_id());
        assert_eq!(late.parent_span_id, SpanId::INVALID);
    }

    /// nginx: two requests in flight on one worker thread; each callback
    /// that reads a head opens its upstream connection, whose request is
    /// written later, after the other request's I/O.
    #[test]
    fn a_proxy_loop_nests_each_upstream_call_under_its_downstream_request() {
        let (mut t, mut rx) = tracer();
        let worker = 10;
        let req = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").into_bytes();
        let d1 = conn(1, Role::Server, SERVER, "127.0.0.1:40001");
        let d2 = conn(2, Role::Server, SERVER, "127.0.0.1:40002");
        let up = |id, port: u16| Connection {
            opened_by: worker,
            ..conn(
                id,
                Role::Client,
                &format!("127.0.0.1:{port}"),
                "127.0.0.1:9000",
            )
        };
        let (u1, u2, u3) = (up(11, 50001), up(12, 50002), up(13, 50003));
        t.on_record(Record::Opened(&d1));
        t.on_record(Record::Opened(&d2));
        data(&mut t, &d1, worker, 100, Syscall::Read, &req("/a/1"));
        t.on_record(Record::Opened(&u1));
        data(&mut t, &d2, worker, 110, Syscall::Read, &req("/a/2"));
        t.on_record(Record::Opened(&u2));
        // The connects complete: the requests go out, in the other order.
        data(&mut t, &u2, worker, 120, Syscall::Write, &req("/a/2"));
        data(&mut t, &u1, worker, 121, Syscall::Write, &req("/a/1"));
        // A connection opened by a callback that read nothing, carrying a
        // request both downstream requests could have made: a root.
        t.on_record(Record::Opened(&u3));
        data(&mut t, &u3, worker, 122, Syscall::Write, &req("/a"));
        for (c, ts) in [(&u1, 130), (&u2, 131), (&u3, 132)] {
            data(&mut t, c, worker, ts, Syscall::Read, RESP);
        }
        data(&mut t, &d1, worker, 140, Syscall::Write, RESP);
        data(&mut t, &d2, worker, 141, Syscall::Write, RESP);
        let spans: Vec<SpanRecord> = exported(&mut t, &mut rx)
            .into_iter()
            .map(|s| s.span)
            .collect();
        let [c1, c2, c3, s1, s2] = &spans[..] else {
            panic!("{spans:#?}")
        };
        assert_eq!(c1.parent_span_id, s1.span_context.span_id());
        assert_eq!(c2.parent_span_id, s2.span_context.span_id());
        assert_eq!(c3.parent_span_id, SpanId::INVALID);
    }

    #[test]
    fn both_ends_of_a_local_connection_are_linked() {
        let (mut t, mut rx) = tracer();
        // Another process: the client end (curl) is not the server (nginx).
        let client = Connection {
            tgid: 20,
            ..conn(1, Role::Client, "127.0.0.1:40000", SERVER)
        };
        let server = conn(2, Role::Server, SERVER, "127.0.0.1:40000");
        t.on_record(Record::Opened(&client));
        t.on_record(Record::Opened(&server));
        for ts in [0, 1000] {
            data(&mut t, &client, 5, ts + 1, Syscall::Write, CALL);
            data(&mut t, &server, 6, ts + 2, Syscall::Read, CALL);
            data(&mut t, &server, 6, ts + 3, Syscall::Write, RESP);
            data(&mut t, &client, 5, ts + 4, Syscall::Read, RESP);
        }
        let spans: Vec<ExportSpan> = exported(&mut t, &mut rx);
        assert_eq!(spans.len(), 4);
        for pair in spans.chunks(2) {
            let (server, client) = (&pair[0].span, &pair[1].span);
            assert_eq!(server.span_kind, SpanKind::Server);
            assert_eq!(server.parent_span_id, client.span_context.span_id());
            assert_eq!(
                server.span_context.trace_id(),
                client.span_context.trace_id()
            );
        }
        assert_ne!(
            spans[0].span.span_context.trace_id(),
            spans[2].span.span_context.trace_id()
        );
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn a_client_end_delivered_late_still_becomes_the_parent() {
        let (mut t, mut rx) = tracer();
        // Another process: the client end (curl) is not the server (nginx).
        let client = Connection {
            tgid: 20,
            ..conn(1, Role::Client, "127.0.0.1:40000", SERVER)
        };
        let server = conn(2, Role::Server, SERVER, "127.0.0.1:40000");
        let upstream = conn(3, Role::Client, "127.0.0.1:41000", "10.1.1.1:80");
        t.on_record(Record::Opened(&client));
        t.on_record(Record::Opened(&server));
        t.on_record(Record::Opened(&upstream));
        // The server's read and its own upstream call arrive before the
        // client's write (another CPU's perf buffer).
        data(&mut t, &server, 6, 2, Syscall::Read, CALL);
        data(&mut t, &upstream, 6, 3, Syscall::Write, CALL);
        data(&mut t, &client, 5, 1, Syscall::Write, CALL);
        data(&mut t, &upstream, 6, 4, Syscall::Read, RESP);
        data(&mut t, &server, 6, 5, Syscall::Write, RESP);
        data(&mut t, &client, 5, 6, Syscall::Read, RESP);
        let spans: Vec<SpanRecord> = exported(&mut t, &mut rx)
            .into_iter()
            .map(|s| s.span)
            .collect();
        let [up, srv, cli] = &spans[..] else {
            panic!("{spans:?}")
        };
        assert_eq!(cli.parent_span_id, SpanId::INVALID);
        assert_eq!(srv.parent_span_id, cli.span_context.span_id());
        assert_eq!(up.parent_span_id, srv.span_context.span_id());
        let trace = cli.span_context.trace_id();
        assert!([up, srv].iter().all(|s| s.span_context.trace_id() == trace));
    }

    #[test]
    fn a_client_end_delivered_after_its_server_finished_still_becomes_the_parent() {
        let (mut t, mut rx) = tracer();
        let client = Connection {
            tgid: 20,
            ..conn(1, Role::Client, "127.0.0.1:40000", SERVER)
        };
        let server = conn(2, Role::Server, SERVER, "127.0.0.1:40000");
        let other = conn(3, Role::Server, SERVER, "10.9.9.9:40000");
        for c in [&client, &server, &other] {
            t.on_record(Record::Opened(c));
        }
        // The client was preempted between waking the server and its
        // write's return: the server's whole exchange comes first.
        data(&mut t, &server, 6, 2, Syscall::Read, CALL);
        data(&mut t, &server, 6, 3, Syscall::Write, RESP);
        data(&mut t, &other, 6, 4, Syscall::Read, CALL);
        data(&mut t, &other, 6, 5, Syscall::Write, RESP);
        assert!(rx.try_recv().is_err(), "root server spans are held");
        data(&mut t, &client, 5, 1, Syscall::Write, CALL);
        let srv = rx.try_recv().expect("adopted: released at once").span;
        data(&mut t, &client, 5, 6, Syscall::Read, RESP);
        let cli = rx.try_recv().expect("client span").span;
        assert_eq!(cli.parent_span_id, SpanId::INVALID);
        assert_eq!(srv.parent_span_id, cli.span_context.span_id());
        assert_eq!(srv.span_context.trace_id(), cli.span_context.trace_id());
        // A server span whose client never shows up leaves as a root once
        // its wait is over, and nothing is left behind.
        assert!(rx.try_recv().is_err());
        t.release_held(5 + held::HOLD_NS);
        let lone = rx.try_recv().expect("released").span;
        assert_eq!(lone.parent_span_id, SpanId::INVALID);
        assert_eq!(t.in_flight(), 0);
        assert!(t.links.is_empty());
    }

    #[test]
    fn a_late_client_end_with_its_own_parent_moves_the_held_span_into_its_trace() {
        let (mut t, mut rx) = tracer();
        // A proxy: its server request from outside, its upstream call to a
        // local server whose exchange is delivered before the call's write.
        let front = conn(1, Role::Server, "127.0.0.1:8080", "10.9.9.9:40000");
        let upstream = conn(2, Role::Client, "127.0.0.1:41000", SERVER);
        let backend = Connection {
            tgid: 30,
            ..conn(3, Role::Server, SERVER, "127.0.0.1:41000")
        };
        for c in [&front, &upstream, &backend] {
            t.on_record(Record::Opened(c));
        }
        data(&mut t, &front, 6, 1, Syscall::Read, CALL);
        data(&mut t, &backend, 9, 3, Syscall::Read, CALL);
        data(&mut t, &backend, 9, 4, Syscall::Write, RESP);
        data(&mut t, &upstream, 6, 2, Syscall::Write, CALL);
        data(&mut t, &upstream, 6, 5, Syscall::Read, RESP);
        data(&mut t, &front, 6, 6, Syscall::Write, RESP);
        let spans: Vec<SpanRecord> = exported(&mut t, &mut rx)
            .into_iter()
            .map(|s| s.span)
            .collect();
        let [back, up, fr] = &spans[..] else {
            panic!("{spans:#?}")
        };
        assert_eq!(up.parent_span_id, fr.span_context.span_id());
        assert_eq!(back.parent_span_id, up.span_context.span_id());
        let trace = fr.span_context.trace_id();
        assert!(
            [back, up]
                .iter()
                .all(|s| s.span_context.trace_id() == trace)
        );
    }

    fn unix_conn(
        id: u64,
        tgid: u32,
        role: Role,
        (local, remote): (u64, u64),
        name: Option<&str>,
    ) -> Connection {
        use crate::capture::{Endpoint, UnixEnd};
        let named = |yes: bool| name.filter(|_| yes).map(Arc::from);
        // Inode numbers: the sock's, times ten, unless given above 0xffff.
        let ino = |sk: u64| if sk > 0xffff { sk & 0xffff } else { sk * 10 };
        let sk = |sk: u64| if sk > 0xffff { sk >> 16 } else { sk };
        Connection {
            tgid,
            local: Endpoint::Unix(UnixEnd {
                sk: sk(local),
                ino: ino(local),
                name: named(role == Role::Server),
            }),
            remote: Endpoint::Unix(UnixEnd {
                sk: sk(remote),
                ino: ino(remote),
                name: named(role == Role::Client),
            }),
            ..conn(id, role, SERVER, "127.0.0.1:1")
        }
    }

    #[test]
    fn unix_ends_link_by_their_sockets_only() {
        let (mut t, mut rx) = tracer();
        let path = Some("/run/app.sock");
        // Two connections to one socket: each client links to its own
        // server end, whatever the order the records come in.
        let c1 = unix_conn(1, 20, Role::Client, (0xa1, 0xb1), path);
        let c2 = unix_conn(2, 21, Role::Client, (0xa2, 0xb2), path);
        let s1 = unix_conn(3, 30, Role::Server, (0xb1, 0xa1), path);
        let s2 = unix_conn(4, 30, Role::Server, (0xb2, 0xa2), path);
        for c in [&c1, &c2, &s1, &s2] {
            t.on_record(Record::Opened(c));
        }
        data(&mut t, &c2, 21, 1, Syscall::Write, REQ);
        data(&mut t, &c1, 20, 2, Syscall::Write, CALL);
        data(&mut t, &s1, 31, 3, Syscall::Read, CALL);
        data(&mut t, &s2, 32, 4, Syscall::Read, REQ);
        data(&mut t, &s2, 32, 5, Syscall::Write, RESP);
        data(&mut t, &s1, 31, 6, Syscall::Write, RESP);
        data(&mut t, &c1, 20, 7, Syscall::Read, RESP);
        data(&mut t, &c2, 21, 8, Syscall::Read, RESP);
        let spans: Vec<ExportSpan> = exported(&mut t, &mut rx);
        assert_eq!(spans.len(), 4);
        let by_path = |p: &str| {
            spans
                .iter()
                .find(|s| {
                    s.span.attributes.iter().any(|kv| {
                        kv.key.as_str()
                            == if s.span.span_kind == SpanKind::Server {
                                "url.path"
                            } else {
                                "url.full"
                            }
                            && kv.value.as_str().ends_with(p)
                    }) && s.span.span_kind == SpanKind::Server
                })
                .unwrap()
        };
        let client_of = |tgid_path: &str| {
            spans
                .iter()
                .find(|s| {
                    s.span.span_kind == SpanKind::Client
                        && s.span.attributes.iter().any(|kv| {
                            kv.key.as_str() == "url.full" && kv.value.as_str().ends_with(tgid_path)
                        })
                })
                .unwrap()
        };
        for p in ["/x", "/y"] {
            let (server, client) = (by_path(p), client_of(p));
            assert_eq!(
                server.span.parent_span_id,
                client.span.span_context.span_id(),
                "{p}"
            );
            assert_eq!(attr(server, "network.transport").as_deref(), Some("unix"));
            assert_eq!(
                attr(server, "server.address").as_deref(),
                Some("/run/app.sock")
            );
            assert_eq!(
                attr(client, "server.address").as_deref(),
                Some("/run/app.sock")
            );
        }
    }

    #[test]
    fn connections_not_traced_are_muted_once_and_tls_ones_never() {
        let (mut t, _rx) = tracer();
        let unknown = conn(1, Role::Client, "127.0.0.1:40000", SERVER);
        t.on_record(Record::Opened(&unknown));
        data(&mut t, &unknown, 5, 1, Syscall::Write, &[0xfe; 64]);
        data(&mut t, &unknown, 5, 2, Syscall::Write, &[0xfe; 64]);
        assert_eq!(
            t.mutes,
            [Mute {
                conn_id: 1,
                tgid: 10,
                fd: 1,
                blind: false,
            }]
        );
        // Encrypted: its plaintext would come through the same kernel
        // entry, so it stays.
        t.mutes.clear();
        let tls = conn(2, Role::Client, "127.0.0.1:40001", SERVER);
        t.on_record(Record::Opened(&tls));
        data(
            &mut t,
            &tls,
            5,
            3,
            Syscall::Write,
            &[0x16, 3, 1, 0, 5, 1, 2, 3, 4, 5],
        );
        data(&mut t, &tls, 5, 4, Syscall::TlsWrite, &[0xfe; 64]);
        assert!(t.mutes.is_empty(), "{:?}", t.mutes);
        // An excluded system socket: muted at once, both ends.
        let journal = unix_conn(
            3,
            10,
            Role::Client,
            (1, 2),
            Some("/run/systemd/journal/stdout"),
        );
        t.on_record(Record::Opened(&journal));
        assert_eq!(t.mutes.len(), 1);
        let app = unix_conn(4, 10, Role::Client, (3, 4), Some("/tmp/app.sock"));
        t.on_record(Record::Opened(&app));
        data(&mut t, &app, 5, 5, Syscall::Write, REQ);
        assert_eq!(t.mutes.len(), 1, "HTTP over a unix socket is traced");
    }

    /// A collector on this host reading the agent's exports: its calls
    /// stay (a proxy's onward hop is known by them), their bytes are not
    /// copied — whether the agent's connect was known at the accept or only
    /// at the first byte.
    #[test]
    fn a_connection_carrying_the_exports_is_made_blind_once() {
        let (mut t, mut rx) = tracer();
        t.own.insert("127.0.0.1:50000".parse().unwrap());
        let known = conn(1, Role::Server, "127.0.0.1:4317", "127.0.0.1:50000");
        t.on_record(Record::Opened(&known));
        data(&mut t, &known, 5, 1, Syscall::Read, REQ);
        data(&mut t, &known, 5, 2, Syscall::Write, RESP);
        let blind = |c: &Connection| Mute {
            conn_id: c.conn_id,
            tgid: c.tgid,
            fd: c.fd,
            blind: true,
        };
        assert_eq!(t.mutes, [blind(&known)]);
        t.mutes.clear();
        let later = conn(2, Role::Server, "127.0.0.1:4317", "127.0.0.1:50001");
        t.on_record(Record::Opened(&later));
        assert!(t.mutes.is_empty(), "{:?}", t.mutes);
        t.own.insert("127.0.0.1:50001".parse().unwrap());
        data(&mut t, &later, 5, 3, Syscall::Read, REQ);
        data(&mut t, &later, 5, 4, Syscall::Write, RESP);
        assert_eq!(t.mutes, [blind(&later)]);
        let spans = exported(&mut t, &mut rx);
        assert!(spans.is_empty(), "the exports are not traced: {spans:?}");
    }

    #[test]
    fn a_reused_unix_sock_is_not_the_earlier_connection() {
        let (mut t, mut rx) = tracer();
        let path = Some("/run/app.sock");
        // (sock << 16) | inode: the second connection gets both socks of
        // the first back (the kernel reuses freed ones), with new inodes.
        let (a, b) = ((1 << 16) | 11, (2 << 16) | 21);
        let (a2, b2) = ((1 << 16) | 12, (2 << 16) | 22);
        // The first: a call whose server end never reads it (not traced).
        let first = unix_conn(1, 20, Role::Client, (a, b), path);
        t.on_record(Record::Opened(&first));
        data(&mut t, &first, 20, 1, Syscall::Write, CALL);
        data(&mut t, &first, 20, 2, Syscall::Read, RESP);
        t.on_record(Record::Closed(&first));
        // The second: its server's read (at 4) arrives before its client's
        // write (at 3).
        let client = unix_conn(2, 20, Role::Client, (a2, b2), path);
        let server = unix_conn(3, 30, Role::Server, (b2, a2), path);
        t.on_record(Record::Opened(&client));
        t.on_record(Record::Opened(&server));
        data(&mut t, &server, 31, 4, Syscall::Read, REQ);
        data(&mut t, &client, 20, 3, Syscall::Write, REQ);
        data(&mut t, &server, 31, 5, Syscall::Write, RESP);
        data(&mut t, &client, 20, 6, Syscall::Read, RESP);
        let spans: Vec<SpanRecord> = exported(&mut t, &mut rx)
            .into_iter()
            .map(|s| s.span)
            .collect();
        let [old, srv, cli] = &spans[..] else {
            panic!("{spans:?}")
        };
        assert_eq!(old.span_kind, SpanKind::Client);
        assert_eq!(srv.parent_span_id, cli.span_context.span_id());
        assert_ne!(srv.parent_span_id, old.span_context.span_id());
    }
}
