//! HTTP/1.x: a pure, incremental parser for the two byte streams of one TCP
//! connection.
//!
//! [`HttpConn::feed`] takes the bytes of one syscall at a time, in order, in
//! either direction, and appends [`HttpEvent`]s: a [`Request`] as soon as a
//! request head is complete, an [`Exchange`] when its final response is
//! complete (or when the request can no longer get one).
//!
//! Each direction is a small state machine (start → head → body) that works
//! on whatever piece of a message a syscall carries: heads are buffered (at
//! most `max_head_bytes`, and only when a head spans syscalls) and read in
//! one pass for the fields that spans and framing need, a pass that also
//! finds where a head that came whole ends; bodies are only
//! counted, never copied; chunked framing is decoded byte by byte except for
//! the chunk data, which is skipped in bulk.
//! When a direction loses track (a capture gap inside a head or chunk framing,
//! bytes that are not what HTTP allows there) it resynchronises on the next
//! syscall whose bytes start with a request line or status line.
//!
//! Nothing here panics on any input, and memory per connection is bounded:
//! one head buffer per direction, at most `max_pending` queued requests, and
//! the last request's Host, User-Agent and kept header values (capped), which
//! the next request shares when it repeats them.

use std::sync::{Arc, LazyLock};
use std::{borrow::Cow, collections::VecDeque};

use memchr::memmem;

use agent_common::Direction;

/// Non-HTTP bytes tolerated before a connection is declared [`Detection::NotHttp`]
/// while it is still undecided (mainly connections seen mid-stream).
const HUNT_BUDGET: u64 = 64 * 1024;
/// `max_head_bytes` below this are raised to it (a head must fit a start line).
const MIN_HEAD_BYTES: usize = 64;
/// A head buffer that grew beyond this is released after use.
const KEEP_BUF_CAPACITY: usize = 4096;
/// Longest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: u32 = 4096;
/// While a start line is incomplete it is re-checked on every piece up to this
/// many buffered bytes, later only when a line ends or the buffer is full.
const EAGER_CHECK: usize = 64;

/// Methods accepted in a request line (RFC 9110, RFC 5789, RFC 4918).
const METHODS: &[&str] = &[
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "CONNECT",
    "OPTIONS",
    "TRACE",
    "PATCH",
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
];
const MAX_METHOD_LEN: usize = 9;

/// Headers never kept, even when configured as extra headers.
const NEVER_KEEP: &[&str] = &[
    "cookie",
    "set-cookie",
    "authorization",
    "proxy-authorization",
];

/// Limits and the extra headers to keep. Shared by all connections.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Lower-case names of extra request headers to keep (e.g. tenant headers "x-tenant-id").
    /// `cookie`, `set-cookie`, `authorization` and `proxy-authorization` are never kept.
    /// Shared with the requests that carry them.
    pub extra_headers: Vec<Arc<str>>,
    /// A message head (start line + headers) longer than this is cut: what fits is parsed,
    /// the rest skipped. Default 16 KiB (values below 64 count as 64).
    pub max_head_bytes: usize,
    /// Kept header values and the request target are cut to this many bytes (on a char
    /// boundary). Default 256 for values; the target gets 4 * this.
    pub max_value_bytes: usize,
    /// Most requests waiting for a response (pipelining); more are dropped and counted.
    /// Default 32.
    pub max_pending: usize,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            extra_headers: vec!["x-tenant-id".into(), "x-user-id".into()],
            max_head_bytes: 16 * 1024,
            max_value_bytes: 256,
            max_pending: 32,
        }
    }
}

/// When and on which thread a syscall's bytes moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Moment {
    pub ts_ns: u64,
    pub tid: u32,
    /// The runtime's unit of work the thread ran (0: none followed).
    pub unit: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Request {
    /// 0, 1, 2 … in the order requests appear on the connection.
    pub seq: u64,
    /// As sent, e.g. "GET" (a constant for the common methods).
    pub method: Cow<'static, str>,
    /// Raw request target, e.g. "/a/b?x=1" or absolute-form, capped. Shared
    /// with `url.path` when it is a bare path.
    pub target: Arc<str>,
    /// "1.0" or "1.1".
    pub version: &'static str,
    /// The Host header, capped and split.
    pub host: Option<Authority>,
    /// Shared with the span's `user_agent.original`: no copy per span.
    pub user_agent: Option<Arc<str>>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    /// The configured extra headers that were present: (lower-case name, value), capped.
    /// Both shared: the name with the options, the value with the tenant
    /// attributes of the request's spans.
    pub extra: Vec<(Arc<str>, Arc<str>)>,
    /// Moment of the syscall that carried the first byte of the request.
    pub start: Moment,
    /// Payload bytes of the message body: the content-length, or the sum of chunk sizes.
    pub body_bytes: u64,
    /// The head was longer than max_head_bytes or was cut by a capture gap.
    pub head_truncated: bool,
}

/// A Host header (`uri-host [":" port]`, RFC 9110 §7.2) split into the name
/// and port that spans report as `server.address` and `server.port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    /// The name or address, an IPv6 address without its brackets. Shared
    /// with the spans' `server.address`.
    pub name: Arc<str>,
    /// None when the header names no port (or not a number): the server's
    /// port applies.
    pub port: Option<u16>,
}

impl Authority {
    /// `"[v6]:port"`, `"[v6]"`, `"name:port"`, `"name"`; None when empty.
    pub fn parse(host: &str) -> Option<Self> {
        let host = host.trim();
        if host.is_empty() {
            return None;
        }
        let (name, port) = if let Some(rest) = host.strip_prefix('[')
            && let Some((ip, after)) = rest.split_once(']')
        {
            (ip, after.strip_prefix(':').and_then(|p| p.parse().ok()))
        } else {
            match host.rsplit_once(':') {
                Some((name, port)) if !name.contains(':') => (name, port.parse().ok()),
                _ => (host, None),
            }
        };
        Some(Self {
            name: Arc::from(name),
            port,
        })
    }
}

/// What the last request head on a connection carried. On a keep-alive
/// connection the Host, the User-Agent and the kept (tenant) headers rarely
/// change, so a head that repeats them shares the last one's values instead
/// of copying them again. Remembering costs no allocation: the Host text is
/// kept inline (when short) and the rest are shared values.
#[derive(Debug, Default)]
struct Repeats {
    host: Option<(RawHost, Authority)>,
    /// The last request target, when short ([`Repeats::TARGET_MAX`]): an
    /// idle connection holds no more than that.
    target: Option<Arc<str>>,
    user_agent: Option<Arc<str>>,
    /// Filled from a connection's second request on: a first request is
    /// often its connection's only one, and this list is the one copy made.
    extra: Vec<(Arc<str>, Arc<str>)>,
    /// A request head was parsed on this connection before.
    not_first: bool,
}

/// A Host header's text, inline. Longer ones are not remembered.
#[derive(Debug)]
struct RawHost {
    len: u8,
    bytes: [u8; RawHost::MAX],
}

impl RawHost {
    const MAX: usize = 64;

    fn new(text: &str) -> Option<Self> {
        let mut bytes = [0; Self::MAX];
        bytes
            .get_mut(..text.len())?
            .copy_from_slice(text.as_bytes());
        Some(Self {
            len: text.len() as u8,
            bytes,
        })
    }

    fn is(&self, text: &[u8]) -> bool {
        self.bytes[..usize::from(self.len)] == *text
    }
}

impl Repeats {
    /// Longest target remembered.
    const TARGET_MAX: usize = 128;

    fn target(&mut self, raw: &[u8], limit: usize) -> Arc<str> {
        match &self.target {
            Some(last) if same_text(last, raw) => Arc::clone(last),
            _ => {
                let text = capped_text(raw, limit);
                let target = Arc::<str>::from(&*text);
                self.target = (text.len() <= Self::TARGET_MAX).then(|| Arc::clone(&target));
                target
            }
        }
    }

    fn host(&mut self, raw: &[u8], limit: usize) -> Option<Authority> {
        if let Some((last, authority)) = &self.host
            && last.is(trim(raw))
        {
            return Some(authority.clone());
        }
        let text = capped_text(raw, limit);
        let authority = Authority::parse(&text);
        self.host = RawHost::new(&text).zip(authority.clone());
        authority
    }

    fn user_agent(&mut self, raw: &[u8], limit: usize) -> Arc<str> {
        match &self.user_agent {
            Some(last) if same_text(last, raw) => Arc::clone(last),
            _ => Arc::clone(self.user_agent.insert(Arc::from(&*capped_text(raw, limit)))),
        }
    }

    /// The value of kept header `name` (as the options spell it).
    fn extra(&self, name: &str, raw: &[u8], limit: usize) -> Arc<str> {
        match self
            .extra
            .iter()
            .find(|(n, v)| **n == *name && same_text(v, raw))
        {
            Some((_, last)) => Arc::clone(last),
            None => Arc::from(&*capped_text(raw, limit)),
        }
    }
}

/// Whether `raw`, a header value or target as received, gives the text
/// `last` that an earlier one gave. A value equal to a text it produced is
/// valid UTF-8 and within the limit, so it needs no decoding to be shared.
fn same_text(last: &str, raw: &[u8]) -> bool {
    last.as_bytes() == trim(raw)
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Response {
    pub status: u16,
    pub version: &'static str,
    /// Moment of the syscall that carried the first byte of the (final, non-1xx) response.
    pub start: Moment,
    /// Moment of the syscall that carried its last byte.
    pub end: Moment,
    pub body_bytes: u64,
    pub head_truncated: bool,
}

/// A request with its response; `response` is None when the connection closed (or the
/// parser lost track) before one came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    /// Shared with the [`HttpEvent::Request`] emitted for it: no copy of the
    /// head per request.
    pub request: Arc<Request>,
    pub response: Option<Response>,
    /// Without a response because the response direction had lost track
    /// (bytes it could not frame, records the transport lost) while this
    /// request waited: it was most likely answered in what went unseen.
    /// The moment is the last one seen before that, where the span ends.
    pub response_lost: Option<Moment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpEvent {
    /// A request head was parsed (emitted as soon as the head is complete, before its
    /// body and long before the response).
    Request(Arc<Request>),
    /// A request's final response is complete (or the request ended without one).
    Exchange(Exchange),
    /// The connection is not HTTP/1.x; emitted once, after which everything is ignored.
    NotHttp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detection {
    Undecided,
    Http,
    NotHttp,
    Upgraded,
}

/// Counters a caller can add up across connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HttpCounters {
    /// Times a direction lost track of the message framing and had to resynchronise.
    pub resyncs: u64,
    /// Requests not queued because `max_pending` requests were already waiting.
    pub dropped_requests: u64,
    /// Exchanges emitted without a response.
    pub unanswered: u64,
}

/// What a direction carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Unknown,
    Requests,
    Responses,
}

/// Where a direction is in its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// At a message boundary.
    Start,
    /// Reading a head (buffered in `Side::buf` when it spans syscalls).
    Head,
    /// The head outgrew the limit; it was parsed as far as it fit and the
    /// rest is skipped up to its end.
    HeadSkip,
    /// Content-Length body bytes still to come (never 0).
    Body(u64),
    Chunked(Chunk),
    /// A response body delimited by the end of the connection.
    UntilClose,
    /// Lost track: skip until a syscall starts with a start line.
    Lost,
    /// Ignore everything (not HTTP, upgraded, closed).
    Off,
}

/// Chunked transfer coding (RFC 9112 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Chunk-size line: hex digits, then extensions (skipped) up to LF.
    Size {
        val: u64,
        digits: u8,
        ext: bool,
        len: u32,
    },
    /// Chunk data still to come (never 0).
    Data(u64),
    /// CRLF after chunk data.
    DataCr,
    DataLf,
    /// Trailer section up to an empty line.
    Trailer {
        line_start: bool,
        len: usize,
    },
}

const CHUNK_SIZE: Chunk = Chunk::Size {
    val: 0,
    digits: 0,
    ext: false,
    len: 0,
};

/// A start line, recognised on a possibly incomplete buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartLine<'a> {
    Request {
        method: &'a [u8],
        target: &'a [u8],
        minor: u8,
    },
    Response {
        status: u16,
        minor: u8,
    },
    /// The bytes so far are a prefix of a start line.
    Partial,
    No,
}

impl StartLine<'_> {
    fn is_request(&self) -> bool {
        matches!(self, StartLine::Request { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TransferCoding {
    None,
    Chunked,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ContentLength {
    None,
    Len(u64),
    Invalid,
}

#[derive(Debug)]
enum HeadKind {
    /// Made shared from the start: the event and the pending queue share it
    /// without a move out of a box.
    Request(Arc<Request>),
    Response {
        status: u16,
        version: &'static str,
    },
}

/// A parsed head with what it says about framing.
#[derive(Debug)]
struct Head {
    kind: HeadKind,
    te: TransferCoding,
    cl: ContentLength,
}

/// A queued request, or a run of requests dropped because the queue was full
/// (kept as a count so that FIFO pairing stays aligned).
#[derive(Debug)]
enum Slot {
    Req(Arc<Request>),
    Dropped(u64),
}

#[derive(Debug)]
struct Side {
    role: Role,
    phase: Phase,
    /// Head bytes of the current message when its head spans syscalls.
    buf: Vec<u8>,
    /// End-of-head matcher: 0 = inside a line, 1 = after LF, 2 = after LF CR.
    eoh: u8,
    /// The start line of the current head was recognised.
    start_ok: bool,
    /// The current head began while hunting for a start line (after lost sync).
    tentative: bool,
    /// Moment of the first byte of the current message.
    first: Moment,
    /// Moment of the last syscall on this direction.
    last: Moment,
    /// A head cut at the limit, waiting for its end.
    stashed: Option<Head>,
    /// Requests: seq of the request whose body is being read.
    body_of: Option<u64>,
    /// Responses: the final response being read and the request it answers.
    /// Inline, not boxed: a box per response was an allocation per exchange.
    cur: Option<(Arc<Request>, Response)>,
}

impl Side {
    fn new(phase: Phase) -> Self {
        Self {
            role: Role::Unknown,
            phase,
            buf: Vec::new(),
            eoh: 0,
            start_ok: false,
            tentative: false,
            first: Moment::default(),
            last: Moment::default(),
            stashed: None,
            body_of: None,
            cur: None,
        }
    }

    fn begin(&mut self, at: Moment, tentative: bool) {
        self.phase = Phase::Head;
        self.buf.clear();
        self.eoh = 0;
        self.start_ok = false;
        self.tentative = tentative;
        self.first = at;
        self.stashed = None;
    }

    fn reset_buf(&mut self) {
        if self.buf.capacity() > KEEP_BUF_CAPACITY {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
    }
}

/// The HTTP/1.x parser state of one connection.
pub struct HttpConn {
    opts: Arc<HttpOptions>,
    detection: Detection,
    /// Indexed by direction: 0 = Egress, 1 = Ingress.
    sides: [Side; 2],
    pending: VecDeque<Slot>,
    /// Number of `Slot::Req` in `pending`.
    queued: usize,
    /// Requests at the front of `pending` whose responses may have passed while the
    /// response direction had lost track; they end unanswered when it resyncs.
    stale: u64,
    /// The last moment seen before the response direction skipped bytes.
    stale_at: Moment,
    next_seq: u64,
    counters: HttpCounters,
    undecided_bytes: u64,
    closed: bool,
    repeats: Repeats,
}

impl std::fmt::Debug for HttpConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConn")
            .field("detection", &self.detection)
            .field("egress", &self.sides[0].phase)
            .field("ingress", &self.sides[1].phase)
            .field("queued", &self.queued)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

fn index(dir: Direction) -> usize {
    match dir {
        Direction::Egress => 0,
        Direction::Ingress => 1,
    }
}

impl HttpConn {
    /// `from_start`: true when the connection was seen from its first byte (we saw
    /// connect/accept); false for a connection already open when tracing began (then
    /// bytes are skipped until a syscall's bytes start with a request line, and only a
    /// budget of 64 KiB of non-matching bytes is tolerated before NotHttp).
    pub fn new(opts: Arc<HttpOptions>, from_start: bool) -> Self {
        let phase = if from_start {
            Phase::Start
        } else {
            Phase::Lost
        };
        Self {
            opts,
            detection: Detection::Undecided,
            sides: [Side::new(phase), Side::new(phase)],
            pending: VecDeque::new(),
            queued: 0,
            stale: 0,
            stale_at: Moment::default(),
            next_seq: 0,
            counters: HttpCounters::default(),
            undecided_bytes: 0,
            closed: false,
            repeats: Repeats::default(),
        }
    }

    /// One syscall's bytes. `bytes` is what was captured; `missing` further bytes of the
    /// same syscall followed and were not captured. Events are appended to `out`.
    pub fn feed(
        &mut self,
        dir: Direction,
        at: Moment,
        bytes: &[u8],
        missing: u64,
        out: &mut Vec<HttpEvent>,
    ) {
        if self.off() {
            return;
        }
        let i = index(dir);
        self.sides[i].last = at;
        if self.detection == Detection::Undecided {
            self.undecided_bytes = self.undecided_bytes.saturating_add(bytes.len() as u64);
        }
        let mut data = bytes;
        let mut first = true;
        while !data.is_empty() && !self.off() {
            let n = self.step(i, at, data, first, out).min(data.len());
            first = false;
            data = &data[n..];
        }
        if missing > 0 && !self.off() {
            self.gap(i, at, missing, out);
        }
        if self.detection == Detection::Undecided && self.undecided_bytes > HUNT_BUDGET {
            self.not_http(out);
        }
    }

    /// The connection closed at `at`: a response delimited by close completes (end = the
    /// moment of its last byte), then every request still waiting gets an Exchange with
    /// `response: None` (counted as unanswered).
    pub fn close(&mut self, at: Moment, out: &mut Vec<HttpEvent>) {
        // Messages end at the moment of their last byte, not at the close.
        let _ = at;
        if self.off() {
            return;
        }
        // Responses first, so that a request cut mid-head is queued behind them.
        let order = if self.sides[0].role == Role::Responses {
            [0, 1]
        } else {
            [1, 0]
        };
        for i in order {
            if matches!(self.sides[i].phase, Phase::Head | Phase::HeadSkip) {
                self.finish_cut_head(i, self.sides[i].last, out);
            }
            if self.off() {
                return;
            }
            let last = self.sides[i].last;
            if let Some(cur) = self.sides[i].cur.take() {
                let (request, mut response) = cur;
                response.end = last;
                out.push(HttpEvent::Exchange(Exchange {
                    request,
                    response: Some(response),
                    response_lost: None,
                }));
            }
        }
        self.flush_pending(out);
        self.closed = true;
        for side in &mut self.sides {
            side.phase = Phase::Off;
            side.buf = Vec::new();
            side.stashed = None;
        }
    }

    pub fn detection(&self) -> Detection {
        self.detection
    }

    pub fn counters(&self) -> HttpCounters {
        self.counters
    }

    fn off(&self) -> bool {
        self.closed || matches!(self.detection, Detection::NotHttp | Detection::Upgraded)
    }

    fn max_head(&self) -> usize {
        self.opts.max_head_bytes.max(MIN_HEAD_BYTES)
    }

    /// Consumes a prefix of `data` (possibly empty when only the phase changed).
    fn step(
        &mut self,
        i: usize,
        at: Moment,
        data: &[u8],
        first: bool,
        out: &mut Vec<HttpEvent>,
    ) -> usize {
        match self.sides[i].phase {
            Phase::Off => data.len(),
            Phase::Lost => {
                let side = &mut self.sides[i];
                if first && classify(data, side.role) != StartLine::No {
                    side.begin(at, true);
                    0
                } else {
                    self.skipped(i, at);
                    data.len()
                }
            }
            Phase::Start => {
                // RFC 9112 §2.2: empty lines before a request line are ignored.
                let skip = data
                    .iter()
                    .take_while(|&&b| b == b'\r' || b == b'\n')
                    .count();
                if skip < data.len() {
                    self.sides[i].begin(at, false);
                }
                skip
            }
            Phase::Head => self.step_head(i, at, data, out),
            Phase::HeadSkip => {
                let side = &mut self.sides[i];
                let (n, found) = scan_eoh(&mut side.eoh, data);
                if found {
                    match side.stashed.take() {
                        Some(head) => self.finish_head(i, at, head, true, out),
                        None => self.lose_sync(i, at, out),
                    }
                }
                n
            }
            Phase::Body(rem) => {
                let k = rem.min(data.len() as u64);
                self.add_body(i, k);
                if k == rem {
                    self.end_message(i, at, out);
                } else {
                    self.sides[i].phase = Phase::Body(rem - k);
                }
                k as usize
            }
            Phase::Chunked(state) => self.step_chunked(i, at, state, data, out),
            Phase::UntilClose => {
                self.add_body(i, data.len() as u64);
                data.len()
            }
        }
    }

    fn step_head(&mut self, i: usize, at: Moment, data: &[u8], out: &mut Vec<HttpEvent>) -> usize {
        let max = self.max_head();
        // The whole head is in this syscall (nearly always): parse it in
        // place, finding its end on the way.
        if self.sides[i].buf.is_empty()
            && self.sides[i].eoh == 0
            && let Some(n) = self.whole_head(i, at, &data[..data.len().min(max)], out)
        {
            return n;
        }
        let side = &mut self.sides[i];
        let (n, found) = scan_eoh(&mut side.eoh, data);

        // Not a head [`whole_head`] takes, but whole all the same.
        if side.buf.is_empty() && found && n <= max {
            let head_bytes = &data[..n];
            let line = classify(head_bytes, side.role);
            if !matches!(line, StartLine::Request { .. } | StartLine::Response { .. }) {
                self.bad_start(i, at, out);
                return data.len();
            }
            self.decided(i, line.is_request());
            self.resynced(i, out);
            match parse_head(
                head_bytes,
                line,
                self.sides[i].role,
                &self.opts,
                &mut self.repeats,
            ) {
                Some((head, _)) => self.finish_head(i, at, head, false, out),
                None => self.lose_sync(i, at, out),
            }
            return n;
        }

        let room = max.saturating_sub(side.buf.len());
        let take = n.min(room);
        side.buf.extend_from_slice(&data[..take]);
        let overflow = take < n;
        let full = side.buf.len() >= max;
        if !side.start_ok {
            let check = side.buf.len() <= EAGER_CHECK
                || found
                || overflow
                || full
                || memchr::memchr(b'\n', &data[..take]).is_some();
            if check {
                match classify(&side.buf, side.role) {
                    line @ (StartLine::Request { .. } | StartLine::Response { .. }) => {
                        let is_request = line.is_request();
                        side.start_ok = true;
                        self.decided(i, is_request);
                        self.resynced(i, out);
                    }
                    StartLine::Partial if !(found || overflow || full) => {}
                    _ => {
                        self.bad_start(i, at, out);
                        return data.len();
                    }
                }
            }
        }
        if found || overflow {
            let head = self.parse_buffered(i, overflow);
            let side = &mut self.sides[i];
            match head {
                Some(head) if found => self.finish_head(i, at, head, overflow, out),
                Some(head) => {
                    side.stashed = Some(head);
                    side.phase = Phase::HeadSkip;
                }
                None => self.lose_sync(i, at, out),
            }
        }
        n
    }

    /// Parses a head that starts `data` and ends in it, in one walk over
    /// its lines (a separate search for its end first cost as much as the
    /// parse). Returns the bytes it took, or `None`, having changed nothing
    /// but the value caches, when `data` does not hold a whole head with a
    /// start line: [`scan_eoh`] and the buffer take over.
    fn whole_head(
        &mut self,
        i: usize,
        at: Moment,
        data: &[u8],
        out: &mut Vec<HttpEvent>,
    ) -> Option<usize> {
        let line = classify(data, self.sides[i].role);
        let role = match (self.sides[i].role, &line) {
            (Role::Unknown, StartLine::Request { .. }) => Role::Requests,
            (Role::Unknown, StartLine::Response { .. }) => Role::Responses,
            (Role::Unknown, _) => return None,
            (role, _) => role,
        };
        // A start line of the other side's kind, or no end of head: the
        // slower path decides, as it always did.
        let Some((head, Some(n))) = parse_head(data, line, role, &self.opts, &mut self.repeats)
        else {
            return None;
        };
        self.decided(i, role == Role::Requests);
        self.resynced(i, out);
        self.finish_head(i, at, head, false, out);
        Some(n)
    }

    /// Parses the buffered head; `cut` when it did not fit (parse whole lines only).
    fn parse_buffered(&mut self, i: usize, cut: bool) -> Option<Head> {
        let opts = Arc::clone(&self.opts);
        let side = &mut self.sides[i];
        if cut {
            let keep = side
                .buf
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1);
            side.buf.truncate(keep);
            side.buf.extend_from_slice(b"\r\n");
        }
        let line = classify(&side.buf, side.role);
        let head =
            parse_head(&side.buf, line, side.role, &opts, &mut self.repeats).map(|(head, _)| head);
        side.reset_buf();
        head
    }

    /// A head was cut (capture gap or close): finish what it says, if it says anything.
    fn finish_cut_head(&mut self, i: usize, at: Moment, out: &mut Vec<HttpEvent>) {
        let side = &mut self.sides[i];
        let head = match side.phase {
            Phase::HeadSkip => side.stashed.take(),
            Phase::Head if side.start_ok => self.parse_buffered(i, true),
            _ => None,
        };
        match head {
            Some(head) => self.finish_head(i, at, head, true, out),
            None => {
                let side = &mut self.sides[i];
                side.reset_buf();
                side.phase = Phase::Lost;
            }
        }
    }

    /// The start line of the current head cannot be one.
    fn bad_start(&mut self, i: usize, at: Moment, out: &mut Vec<HttpEvent>) {
        let side = &mut self.sides[i];
        if side.tentative {
            side.reset_buf();
            side.phase = Phase::Lost;
            self.skipped(i, at);
        } else if self.detection == Detection::Undecided {
            self.not_http(out);
        } else {
            self.lose_sync(i, at, out);
        }
    }

    /// A start line was recognised on side `i`: the first one decides the roles.
    fn decided(&mut self, i: usize, is_request: bool) {
        if self.sides[i].role != Role::Unknown {
            return;
        }
        let (mine, other) = if is_request {
            (Role::Requests, Role::Responses)
        } else {
            (Role::Responses, Role::Requests)
        };
        self.sides[i].role = mine;
        self.sides[1 - i].role = other;
        self.detection = Detection::Http;
    }

    fn finish_head(
        &mut self,
        i: usize,
        at: Moment,
        head: Head,
        truncated: bool,
        out: &mut Vec<HttpEvent>,
    ) {
        match head.kind {
            HeadKind::Request(req) => {
                self.finish_request(i, at, req, head.te, head.cl, truncated, out)
            }
            HeadKind::Response { status, version } => {
                self.finish_response(i, at, status, version, head.te, head.cl, truncated, out)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_request(
        &mut self,
        i: usize,
        at: Moment,
        mut req: Arc<Request>,
        te: TransferCoding,
        cl: ContentLength,
        truncated: bool,
        out: &mut Vec<HttpEvent>,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        {
            let req = Arc::get_mut(&mut req).expect("a new head is not shared yet");
            req.seq = seq;
            req.start = self.sides[i].first;
            req.head_truncated = truncated;
        }
        if self.queued >= self.opts.max_pending {
            self.counters.dropped_requests += 1;
            match self.pending.back_mut() {
                Some(Slot::Dropped(n)) => *n += 1,
                _ => self.pending.push_back(Slot::Dropped(1)),
            }
            self.sides[i].body_of = None;
        } else {
            out.push(HttpEvent::Request(Arc::clone(&req)));
            self.pending.push_back(Slot::Req(req));
            self.queued += 1;
            self.sides[i].body_of = Some(seq);
        }
        let side = &mut self.sides[i];
        side.phase = match (te, cl) {
            (TransferCoding::Chunked, _) => Phase::Chunked(CHUNK_SIZE),
            (TransferCoding::Other, _) | (_, ContentLength::Invalid) => {
                // A request body whose length cannot be known (RFC 9112 §6.3).
                self.lose_sync(i, at, out);
                return;
            }
            (TransferCoding::None, ContentLength::Len(n)) if n > 0 => Phase::Body(n),
            _ => Phase::Start,
        };
        if side.phase == Phase::Start {
            side.body_of = None;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_response(
        &mut self,
        i: usize,
        at: Moment,
        status: u16,
        version: &'static str,
        te: TransferCoding,
        cl: ContentLength,
        truncated: bool,
        out: &mut Vec<HttpEvent>,
    ) {
        if (100..200).contains(&status) && status != 101 {
            // Interim response: no body, the final one is still to come.
            self.sides[i].phase = Phase::Start;
            return;
        }
        let request = match self.pending.front_mut() {
            Some(Slot::Req(_)) => match self.pending.pop_front() {
                Some(Slot::Req(req)) => {
                    self.queued -= 1;
                    Some(req)
                }
                _ => None,
            },
            Some(Slot::Dropped(n)) => {
                *n -= 1;
                if *n == 0 {
                    self.pending.pop_front();
                }
                None
            }
            None => None,
        };
        let response = Response {
            status,
            version,
            start: self.sides[i].first,
            end: at,
            body_bytes: 0,
            head_truncated: truncated,
        };
        let method = request.as_ref().map_or("", |r| &*r.method);
        let upgrade = status == 101 || (method == "CONNECT" && (200..300).contains(&status));
        let no_body = method == "HEAD" || status == 204 || status == 304;
        self.sides[i].cur = request.map(|req| (req, response));
        if upgrade {
            self.end_message(i, at, out);
            self.upgrade(out);
            return;
        }
        let side = &mut self.sides[i];
        side.phase = if no_body {
            Phase::Start
        } else {
            match (te, cl) {
                (TransferCoding::Chunked, _) => Phase::Chunked(CHUNK_SIZE),
                (TransferCoding::None, ContentLength::Len(0)) => Phase::Start,
                (TransferCoding::None, ContentLength::Len(n)) => Phase::Body(n),
                _ => Phase::UntilClose,
            }
        };
        if side.phase == Phase::Start {
            self.end_message(i, at, out);
        }
    }

    /// The current message of side `i` ended with a byte carried at `at`.
    fn end_message(&mut self, i: usize, at: Moment, out: &mut Vec<HttpEvent>) {
        let side = &mut self.sides[i];
        side.phase = Phase::Start;
        side.body_of = None;
        if let Some(cur) = side.cur.take() {
            let (request, mut response) = cur;
            response.end = at;
            out.push(HttpEvent::Exchange(Exchange {
                request,
                response: Some(response),
                response_lost: None,
            }));
        }
    }

    /// Counts `k` body bytes of side `i`'s current message.
    fn add_body(&mut self, i: usize, k: u64) {
        if k == 0 {
            return;
        }
        let side = &mut self.sides[i];
        if let Some(cur) = side.cur.as_mut() {
            cur.1.body_bytes = cur.1.body_bytes.saturating_add(k);
            return;
        }
        let Some(seq) = side.body_of else { return };
        // The request is still queued, or already answered early and held by the
        // response direction.
        for slot in self.pending.iter_mut().rev() {
            if let Slot::Req(req) = slot
                && req.seq == seq
            {
                // Copies the head only while its HttpEvent::Request is
                // still unread, i.e. when head and body came in one call.
                let req = Arc::make_mut(req);
                req.body_bytes = req.body_bytes.saturating_add(k);
                return;
            }
        }
        if let Some(cur) = self.sides[1 - i].cur.as_mut()
            && cur.0.seq == seq
        {
            let req = Arc::make_mut(&mut cur.0);
            req.body_bytes = req.body_bytes.saturating_add(k);
        }
    }

    fn step_chunked(
        &mut self,
        i: usize,
        at: Moment,
        mut state: Chunk,
        data: &[u8],
        out: &mut Vec<HttpEvent>,
    ) -> usize {
        let max_trailer = self.max_head();
        let mut pos = 0;
        let mut body = 0u64;
        while pos < data.len() {
            if let Chunk::Data(rem) = state {
                let k = rem.min((data.len() - pos) as u64);
                pos += k as usize;
                body += k;
                state = if k == rem {
                    Chunk::DataCr
                } else {
                    Chunk::Data(rem - k)
                };
                continue;
            }
            let b = data[pos];
            pos += 1;
            let next = match state {
                Chunk::Size {
                    val,
                    digits,
                    ext,
                    len,
                } => {
                    if len >= MAX_CHUNK_LINE {
                        None
                    } else if b == b'\n' {
                        match (digits, val) {
                            (0, _) => None,
                            (_, 0) => Some(Chunk::Trailer {
                                line_start: true,
                                len: 0,
                            }),
                            (_, n) => Some(Chunk::Data(n)),
                        }
                    } else if ext {
                        Some(Chunk::Size {
                            val,
                            digits,
                            ext,
                            len: len + 1,
                        })
                    } else if let Some(d) = hex_value(b) {
                        if digits >= 16 {
                            None
                        } else {
                            let val = (val << 4) | u64::from(d);
                            Some(Chunk::Size {
                                val,
                                digits: digits + 1,
                                ext,
                                len: len + 1,
                            })
                        }
                    } else if digits == 0 {
                        None
                    } else {
                        // Whitespace, ';' extensions or CR: skipped up to LF.
                        Some(Chunk::Size {
                            val,
                            digits,
                            ext: true,
                            len: len + 1,
                        })
                    }
                }
                Chunk::DataCr => match b {
                    b'\r' => Some(Chunk::DataLf),
                    b'\n' => Some(CHUNK_SIZE),
                    _ => None,
                },
                Chunk::DataLf => (b == b'\n').then_some(CHUNK_SIZE),
                Chunk::Trailer { line_start, len } => {
                    if b == b'\n' && line_start {
                        self.add_body(i, body);
                        self.end_message(i, at, out);
                        return pos;
                    }
                    let line_start = match b {
                        b'\n' => true,
                        b'\r' => line_start,
                        _ => false,
                    };
                    (len < max_trailer).then_some(Chunk::Trailer {
                        line_start,
                        len: len + 1,
                    })
                }
                Chunk::Data(_) => Some(state),
            };
            match next {
                Some(s) => state = s,
                None => {
                    self.add_body(i, body);
                    self.lose_sync(i, at, out);
                    return data.len();
                }
            }
        }
        self.add_body(i, body);
        self.sides[i].phase = Phase::Chunked(state);
        pos
    }

    /// `missing` bytes of side `i` were not captured.
    fn gap(&mut self, i: usize, at: Moment, missing: u64, out: &mut Vec<HttpEvent>) {
        match self.sides[i].phase {
            Phase::Off => {}
            Phase::Lost => self.skipped(i, at),
            // Bytes we never saw: a close-delimited body just counts them.
            Phase::UntilClose => self.add_body(i, missing),
            Phase::Start => self.lose_sync(i, at, out),
            Phase::Head | Phase::HeadSkip => {
                let side = &self.sides[i];
                if side.phase == Phase::Head && !side.start_ok {
                    // Not even the start line was seen whole.
                    if side.tentative || self.detection == Detection::Undecided {
                        let side = &mut self.sides[i];
                        side.reset_buf();
                        side.phase = Phase::Lost;
                    } else {
                        self.lose_sync(i, at, out);
                    }
                    return;
                }
                self.finish_cut_head(i, at, out);
                if !self.off() {
                    self.lose_sync(i, at, out);
                }
            }
            Phase::Body(rem) => {
                let k = rem.min(missing);
                self.add_body(i, k);
                if k == rem {
                    self.end_message(i, at, out);
                    if missing > k {
                        // The next message started in the bytes we did not see.
                        self.lose_sync(i, at, out);
                    }
                } else {
                    self.sides[i].phase = Phase::Body(rem - k);
                }
            }
            Phase::Chunked(Chunk::Data(rem)) if missing <= rem => {
                self.add_body(i, missing);
                self.sides[i].phase = Phase::Chunked(if missing == rem {
                    Chunk::DataCr
                } else {
                    Chunk::Data(rem - missing)
                });
            }
            Phase::Chunked(state) => {
                if let Chunk::Data(rem) = state {
                    self.add_body(i, rem);
                }
                self.lose_sync(i, at, out);
            }
        }
    }

    /// Side `i` lost track of the framing: finish its response, if any, with what is
    /// known, then hunt for the next start line.
    fn lose_sync(&mut self, i: usize, at: Moment, out: &mut Vec<HttpEvent>) {
        let side = &mut self.sides[i];
        if let Some(cur) = side.cur.take() {
            let (request, mut response) = cur;
            response.end = at;
            out.push(HttpEvent::Exchange(Exchange {
                request,
                response: Some(response),
                response_lost: None,
            }));
        } else {
            // Lost at the start of a response (or before one could be read): it
            // answered a queued request.
            self.skipped(i, at);
        }
        let side = &mut self.sides[i];
        side.phase = Phase::Lost;
        side.body_of = None;
        side.stashed = None;
        side.reset_buf();
        if self.detection == Detection::Http {
            self.counters.resyncs += 1;
        }
    }

    /// Response bytes of side `i` went by unread: every request queued now may have
    /// been answered by them.
    fn skipped(&mut self, i: usize, at: Moment) {
        if self.sides[i].role == Role::Responses {
            self.stale_at = at;
            self.stale = self
                .pending
                .iter()
                .map(|slot| match slot {
                    Slot::Req(_) => 1,
                    Slot::Dropped(n) => *n,
                })
                .sum();
        }
    }

    /// Side `i` recognised a start line: if it was hunting for it, the requests
    /// whose responses it may have skipped end unanswered, so that the responses
    /// that follow pair with the requests they answer.
    fn resynced(&mut self, i: usize, out: &mut Vec<HttpEvent>) {
        if !self.sides[i].tentative || self.sides[i].role != Role::Responses {
            return;
        }
        while self.stale > 0 {
            match self.pending.front_mut() {
                Some(Slot::Dropped(n)) => {
                    let k = (*n).min(self.stale);
                    *n -= k;
                    self.stale -= k;
                    if *n == 0 {
                        self.pending.pop_front();
                    }
                }
                Some(Slot::Req(_)) => {
                    if let Some(Slot::Req(request)) = self.pending.pop_front() {
                        self.queued -= 1;
                        self.counters.unanswered += 1;
                        let lost = self.lost_end(&request);
                        out.push(HttpEvent::Exchange(Exchange {
                            request,
                            response: None,
                            response_lost: Some(lost),
                        }));
                    }
                    self.stale -= 1;
                }
                None => self.stale = 0,
            }
        }
    }

    /// Ends every waiting request unanswered; those whose responses may have
    /// gone by unseen (`stale`) say so.
    fn flush_pending(&mut self, out: &mut Vec<HttpEvent>) {
        let mut stale = std::mem::take(&mut self.stale);
        while let Some(slot) = self.pending.pop_front() {
            match slot {
                Slot::Req(request) => {
                    self.counters.unanswered += 1;
                    let lost = (stale > 0).then(|| self.lost_end(&request));
                    out.push(HttpEvent::Exchange(Exchange {
                        request,
                        response: None,
                        response_lost: lost,
                    }));
                    stale = stale.saturating_sub(1);
                }
                Slot::Dropped(n) => stale = stale.saturating_sub(n),
            }
        }
        self.queued = 0;
    }

    /// Where a request whose response went unseen ends; never before its
    /// own start. Called with `request` just taken from `pending`.
    ///
    /// The true end is unknown, so the bound is chosen to keep the trace
    /// tree whole. A server's request ends at the last moment seen before
    /// the skip, but not after the next request began: early, within its
    /// caller's span. A client's call ends when its next call began, or at
    /// the last moment seen on the connection: late, around what it called.
    fn lost_end(&self, request: &Request) -> Moment {
        let next = self.pending.iter().find_map(|slot| match slot {
            Slot::Req(next) => Some(next.start),
            Slot::Dropped(_) => None,
        });
        let client = self.sides[index(Direction::Egress)].role == Role::Requests;
        let end = if client {
            next.unwrap_or_else(|| {
                let [a, b] = &self.sides;
                if a.last.ts_ns >= b.last.ts_ns {
                    a.last
                } else {
                    b.last
                }
            })
        } else {
            match next {
                Some(next) if next.ts_ns < self.stale_at.ts_ns => next,
                _ => self.stale_at,
            }
        };
        if end.ts_ns < request.start.ts_ns {
            request.start
        } else {
            end
        }
    }

    fn not_http(&mut self, out: &mut Vec<HttpEvent>) {
        self.detection = Detection::NotHttp;
        out.push(HttpEvent::NotHttp);
        self.shut();
    }

    fn upgrade(&mut self, out: &mut Vec<HttpEvent>) {
        self.flush_pending(out);
        self.detection = Detection::Upgraded;
        self.shut();
    }

    fn shut(&mut self) {
        self.pending.clear();
        self.queued = 0;
        self.stale = 0;
        for side in &mut self.sides {
            side.phase = Phase::Off;
            side.buf = Vec::new();
            side.stashed = None;
            side.cur = None;
            side.body_of = None;
        }
    }
}

/// Where a head that comes in pieces ends: the empty line after a line
/// feed, CRLF or bare LF. Built once, and one vector search each over a
/// whole piece: a search per line paid its set-up for every header.
static EMPTY_CRLF_LINE: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\n\r\n"));
static EMPTY_LF_LINE: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\n\n"));

/// Advances the end-of-head matcher (CRLF CRLF, also bare LF LF) over `data`.
/// Returns the bytes consumed and whether the head ended (at the last of them).
/// `state` carries what the last piece ended with: 1 a line feed, 2 a line
/// feed and a CR, 0 anything else.
fn scan_eoh(state: &mut u8, data: &[u8]) -> (usize, bool) {
    let mut s = *state;
    let mut k = 0;
    // The first bytes may complete an empty line the last piece began.
    while s != 0 && k < data.len() {
        let b = data[k];
        k += 1;
        s = match (b, s) {
            (b'\n', _) => {
                *state = 0;
                return (k, true);
            }
            (b'\r', 1) => 2,
            _ => 0,
        };
    }
    let rest = &data[k..];
    if rest.is_empty() {
        *state = s;
        return (data.len(), false);
    }
    let crlf = EMPTY_CRLF_LINE.find(rest).map(|p| p + 3);
    // A bare-LF empty line ends the head first only if it lies before.
    let lf = EMPTY_LF_LINE
        .find(&rest[..crlf.unwrap_or(rest.len())])
        .map(|p| p + 2);
    if let Some(end) = lf.or(crlf) {
        *state = 0;
        return (k + end, true);
    }
    *state = match rest {
        [.., b'\n'] => 1,
        [.., b'\n', b'\r'] => 2,
        _ => 0,
    };
    (data.len(), false)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Request-target bytes: visible ASCII and obs-text (any byte from 0x80).
fn is_target_byte(b: u8) -> bool {
    matches!(b, b'!'..=0x7e | 0x80..=0xff)
}

/// Recognises a start line the side may carry at the start of `b`.
fn classify(b: &[u8], role: Role) -> StartLine<'_> {
    let req = if role == Role::Responses {
        StartLine::No
    } else {
        request_line(b)
    };
    if let StartLine::Request { .. } = req {
        return req;
    }
    let resp = if role == Role::Requests {
        StartLine::No
    } else {
        status_line(b)
    };
    if let StartLine::Response { .. } = resp {
        return resp;
    }
    if req == StartLine::Partial || resp == StartLine::Partial {
        StartLine::Partial
    } else {
        StartLine::No
    }
}

/// `method SP request-target SP HTTP/1.x CRLF` (RFC 9112 §3).
fn request_line(b: &[u8]) -> StartLine<'_> {
    let Some(sp) = b.iter().take(MAX_METHOD_LEN + 1).position(|&c| c == b' ') else {
        let prefix =
            b.len() <= MAX_METHOD_LEN && METHODS.iter().any(|m| m.as_bytes().starts_with(b));
        return if prefix {
            StartLine::Partial
        } else {
            StartLine::No
        };
    };
    let method = &b[..sp];
    if !METHODS.iter().any(|m| m.as_bytes() == method) {
        return StartLine::No;
    }
    let rest = &b[sp + 1..];
    let t = rest
        .iter()
        .position(|&c| !is_target_byte(c))
        .unwrap_or(rest.len());
    if t == rest.len() {
        return StartLine::Partial;
    }
    if t == 0 || rest[t] != b' ' {
        return StartLine::No;
    }
    match version_eol(&rest[t + 1..]) {
        Ok(Some(minor)) => StartLine::Request {
            method,
            target: &rest[..t],
            minor,
        },
        Ok(None) => StartLine::Partial,
        Err(()) => StartLine::No,
    }
}

/// `HTTP/1.x CRLF` (or bare LF); Ok(None) while incomplete.
fn version_eol(b: &[u8]) -> Result<Option<u8>, ()> {
    let minor = match http_version(b)? {
        Some(minor) => minor,
        None => return Ok(None),
    };
    match (b.get(8), b.get(9)) {
        (None, _) | (Some(b'\r'), None) => Ok(None),
        (Some(b'\n'), _) | (Some(b'\r'), Some(b'\n')) => Ok(Some(minor)),
        _ => Err(()),
    }
}

/// `HTTP/1.0` or `HTTP/1.1` at the start of `b`; Ok(None) while incomplete.
fn http_version(b: &[u8]) -> Result<Option<u8>, ()> {
    const V: &[u8] = b"HTTP/1.";
    let n = b.len().min(V.len());
    if b[..n] != V[..n] {
        return Err(());
    }
    match b.get(7) {
        None => Ok(None),
        Some(b'0') => Ok(Some(0)),
        Some(b'1') => Ok(Some(1)),
        Some(_) => Err(()),
    }
}

/// `HTTP/1.x SP 3DIGIT [SP reason] CRLF` (RFC 9112 §4).
fn status_line(b: &[u8]) -> StartLine<'_> {
    let minor = match http_version(b) {
        Ok(Some(minor)) => minor,
        Ok(None) => return StartLine::Partial,
        Err(()) => return StartLine::No,
    };
    match b.get(8) {
        None => return StartLine::Partial,
        Some(b' ') => {}
        Some(_) => return StartLine::No,
    }
    let mut status = 0u16;
    for k in 9..12 {
        match b.get(k) {
            None => return StartLine::Partial,
            Some(d) if d.is_ascii_digit() => status = status * 10 + u16::from(d - b'0'),
            Some(_) => return StartLine::No,
        }
    }
    let done = StartLine::Response { status, minor };
    match (b.get(12), b.get(13)) {
        (None, _) | (Some(b'\r'), None) => StartLine::Partial,
        (Some(b'\n'), _) | (Some(b'\r'), Some(b'\n')) => done,
        (Some(b' '), _) => {
            if memchr::memchr(b'\n', &b[13..]).is_some() {
                done
            } else {
                StartLine::Partial
            }
        }
        _ => StartLine::No,
    }
}

fn version_str(minor: u8) -> &'static str {
    if minor == 0 { "1.0" } else { "1.1" }
}

/// Parses a complete head (ending with its empty line, or cut after a
/// whole line) for a side with `role`: `line` is its start line as
/// [`classify`] recognised it, then come the header fields [`fields`] finds.
///
/// One pass that keeps only what the spans and the framing need. A
/// validating parser that recorded every field (httparse) took a third of
/// the work of a keep-alive span, and the heads it refused (a stray CR, a
/// non-UTF-8 target) needed a second, lenient pass anyway: what a head's
/// start line and fields say is all that counts here.
fn parse_head(
    b: &[u8],
    line: StartLine<'_>,
    role: Role,
    opts: &HttpOptions,
    repeats: &mut Repeats,
) -> Option<(Head, Option<usize>)> {
    let mut fields = Fields::of(b, role);
    let head = match line {
        StartLine::Request {
            method,
            target,
            minor,
        } if role == Role::Requests => {
            build_request(method, target, minor, &mut fields, opts, repeats)
        }
        StartLine::Response { status, minor } if role == Role::Responses => {
            build_response(status, minor, &mut fields)
        }
        _ => return None,
    };
    Some((head, fields.end))
}

/// The `(name, value)` header fields of a head, the start line skipped,
/// up to the empty line that ends it. A line continuing the one before
/// (obsolete folding), or without a colon, is not a field. A request
/// field's name must end at its colon (RFC 9112 §5.1: a server rejects
/// `Host : x`, so it names no host); a response's may be followed by
/// blanks. Values keep their surrounding blanks: their readers trim.
struct Fields<'a> {
    rest: &'a [u8],
    /// Bytes of the whole head.
    whole: usize,
    role: Role,
    /// Where the head ends (after its empty line), once that is reached;
    /// `None` while the bytes ran out first.
    end: Option<usize>,
}

impl<'a> Fields<'a> {
    fn of(b: &'a [u8], role: Role) -> Self {
        let rest = match memchr::memchr(b'\n', b) {
            Some(eol) => &b[eol + 1..],
            None => &[][..],
        };
        Self {
            rest,
            whole: b.len(),
            role,
            end: None,
        }
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = (&'a [u8], &'a [u8]);

    // Inlined into the loops that walk a head: it runs once per line.
    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (line, ended) = match find_byte::<b'\n'>(self.rest) {
                Some(eol) => {
                    let line = &self.rest[..eol];
                    self.rest = &self.rest[eol + 1..];
                    (line, true)
                }
                None => (std::mem::take(&mut self.rest), false),
            };
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                if ended {
                    self.end = Some(self.whole - self.rest.len());
                }
                self.rest = &[];
                return None;
            }
            if matches!(line[0], b' ' | b'\t') {
                continue;
            }
            let Some(colon) = find_byte::<b':'>(line) else {
                continue;
            };
            let name = match self.role {
                Role::Responses => trim_end(&line[..colon]),
                _ => &line[..colon],
            };
            return Some((name, &line[colon + 1..]));
        }
    }
}

/// Where the first `B` of `bytes` is, eight bytes at a time: header
/// lines and names are short, so a vector search's set-up costs more than
/// it saves. A byte loop for the colon was the largest part of walking a
/// head's fields, and `memchr`, set up anew for each line's end, a third of
/// what was left.
#[inline(always)]
fn find_byte<const B: u8>(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let wanted = u64::from_ne_bytes([B; 8]);
    let mut words = bytes.chunks_exact(8);
    let mut at = 0;
    for word in &mut words {
        let mut eight = [0; 8];
        eight.copy_from_slice(word);
        // A zero byte where a `B` was; borrows can mark bytes after the
        // first zero, never before it, so the lowest mark is exact.
        let x = u64::from_le_bytes(eight) ^ wanted;
        let marks = x.wrapping_sub(ONES) & !x & HIGHS;
        if marks != 0 {
            return Some(at + marks.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&c| c == B)
        .map(|p| at + p)
}

fn build_request<'a>(
    method: &[u8],
    target: &[u8],
    minor: u8,
    fields: &mut Fields<'a>,
    opts: &HttpOptions,
    repeats: &mut Repeats,
) -> Head {
    let cap = opts.max_value_bytes;
    let mut req = Request {
        method: match METHODS.iter().find(|m| m.as_bytes() == method) {
            Some(known) => Cow::Borrowed(*known),
            None => Cow::Owned(String::from_utf8_lossy(method).into_owned()),
        },
        target: repeats.target(target, cap.saturating_mul(4)),
        version: version_str(minor),
        ..Request::default()
    };
    let mut te = TransferCoding::None;
    let mut cl = ContentLength::None;
    let mut seen_host = false;
    for (name, value) in fields {
        if name.eq_ignore_ascii_case(b"user-agent") {
            if req.user_agent.is_none() {
                req.user_agent = Some(repeats.user_agent(value, cap));
            }
        } else if name.eq_ignore_ascii_case(b"host") {
            // The first Host header counts, even an empty one.
            if !seen_host {
                seen_host = true;
                req.host = repeats.host(value, cap);
            }
        } else if name.eq_ignore_ascii_case(b"traceparent") {
            if req.traceparent.is_none() {
                req.traceparent = Some(capped(value, cap));
            }
        } else if name.eq_ignore_ascii_case(b"tracestate") {
            if req.tracestate.is_none() {
                req.tracestate = Some(capped(value, cap));
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            cl = merge_content_length(cl, value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te = transfer_coding(te, value);
        }
        if let Some(extra) = opts
            .extra_headers
            .iter()
            .find(|x| name.eq_ignore_ascii_case(x.as_bytes()))
            && !NEVER_KEEP.iter().any(|n| extra.eq_ignore_ascii_case(n))
            && !req.extra.iter().any(|(n, _)| n.eq_ignore_ascii_case(extra))
        {
            let name = if extra.bytes().any(|b| b.is_ascii_uppercase()) {
                Arc::from(extra.to_ascii_lowercase())
            } else {
                Arc::clone(extra)
            };
            let value = repeats.extra(&name, value, cap);
            req.extra.push((name, value));
        }
    }
    if repeats.not_first {
        repeats.extra.clone_from(&req.extra);
    }
    repeats.not_first = true;
    Head {
        kind: HeadKind::Request(Arc::new(req)),
        te,
        cl,
    }
}

fn build_response(status: u16, minor: u8, fields: &mut Fields<'_>) -> Head {
    let mut te = TransferCoding::None;
    let mut cl = ContentLength::None;
    for (name, value) in fields {
        if name.eq_ignore_ascii_case(b"content-length") {
            cl = merge_content_length(cl, value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te = transfer_coding(te, value);
        }
    }
    Head {
        kind: HeadKind::Response {
            status,
            version: version_str(minor),
        },
        te,
        cl,
    }
}

/// Content-Length, possibly repeated or a list: all values must agree (RFC 9112 §6.3).
fn merge_content_length(cur: ContentLength, value: &[u8]) -> ContentLength {
    let mut cur = cur;
    for part in value.split(|&c| c == b',') {
        let part = trim(part);
        let parsed = (!part.is_empty() && part.len() <= 19 && part.iter().all(u8::is_ascii_digit))
            .then(|| part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')));
        cur = match (cur, parsed) {
            (ContentLength::None, Some(n)) => ContentLength::Len(n),
            (ContentLength::Len(m), Some(n)) if m == n => cur,
            _ => ContentLength::Invalid,
        };
    }
    cur
}

/// The final transfer coding decides: chunked or something else.
fn transfer_coding(cur: TransferCoding, value: &[u8]) -> TransferCoding {
    match value
        .split(|&c| c == b',')
        .map(trim)
        .rfind(|t| !t.is_empty())
    {
        Some(last) if last.eq_ignore_ascii_case(b"chunked") => TransferCoding::Chunked,
        Some(_) => TransferCoding::Other,
        None => cur,
    }
}

/// Without the blanks (spaces, tabs) at either end.
fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|&c| c != b' ' && c != b'\t')
        .unwrap_or(b.len());
    trim_end(&b[start..])
}

/// Without the blanks at the end.
fn trim_end(b: &[u8]) -> &[u8] {
    let end = b
        .iter()
        .rposition(|&c| c != b' ' && c != b'\t')
        .map_or(0, |p| p + 1);
    &b[..end]
}

/// Trimmed, lossily decoded, cut to at most `limit` bytes on a char boundary.
fn capped(value: &[u8], limit: usize) -> String {
    capped_text(value, limit).into_owned()
}

/// [`capped`], borrowed from `value` when it is valid UTF-8 (nearly every
/// header), so that the caller makes the one copy it keeps.
fn capped_text(value: &[u8], limit: usize) -> Cow<'_, str> {
    let value = trim(value);
    // Lossy decoding only grows the text, so `limit + 3` input bytes always cover
    // `limit` output bytes, and a char cut at that end lies beyond the limit.
    let value = &value[..value.len().min(limit.saturating_add(3))];
    let text = super::utf8_lossy(value);
    let mut end = limit.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    match text {
        Cow::Borrowed(text) => Cow::Borrowed(&text[..end]),
        Cow::Owned(mut text) => {
            text.truncate(end);
            Cow::Owned(text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::replay::*;
    use super::*;

    #[test]
    fn find_byte_finds_the_first_as_a_byte_loop_does() {
        // Every length up to four words, the byte (or none) at every place,
        // over bytes that differ from it by one bit or by a borrow.
        fn check<const B: u8>(fillers: [u8; 6]) {
            for len in 0..33 {
                for first in (0..len).map(Some).chain([None]) {
                    for filler in fillers {
                        let mut line = vec![filler; len];
                        if let Some(at) = first {
                            line[at] = B;
                            // A second one after the first must not win.
                            if at + 3 < len {
                                line[at + 3] = B;
                            }
                        }
                        let expected = line.iter().position(|&c| c == B);
                        assert_eq!(find_byte::<B>(&line), expected, "{line:?}");
                    }
                }
            }
        }
        check::<b':'>([b'9', b';', b'\xba', b'\0', b'x', b'\n']);
        check::<b'\n'>([b'\x0b', b'\x08', b'\x8a', b'\0', b'\r', b'\t']);
    }

    /// The end of a head found byte by byte, for [`scan_eoh`] to agree with.
    fn eoh_bytewise(state: &mut u8, data: &[u8]) -> (usize, bool) {
        for (k, &b) in data.iter().enumerate() {
            *state = match (b, *state) {
                (b'\n', 1 | 2) => {
                    *state = 0;
                    return (k + 1, true);
                }
                (b'\n', _) => 1,
                (b'\r', 1) => 2,
                _ => 0,
            };
        }
        (data.len(), false)
    }

    #[test]
    fn end_of_head_search_agrees_with_a_bytewise_scan() {
        // Short strings of the bytes that matter, cut into two pieces at
        // every point: the searches must find the same end and carry the
        // same state across the cut.
        let alphabet = [b'a', b'\r', b'\n', b':'];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 12) as usize;
            let text: Vec<u8> = (0..len)
                .map(|i| alphabet[((seed >> (8 + 2 * i)) & 3) as usize])
                .collect();
            for cut in 0..=len {
                let (mut fast, mut slow) = (0, 0);
                for piece in [&text[..cut], &text[cut..]] {
                    let found = scan_eoh(&mut fast, piece);
                    assert_eq!(
                        found,
                        eoh_bytewise(&mut slow, piece),
                        "{text:?} cut at {cut}"
                    );
                    assert_eq!(fast, slow, "state after {text:?} cut at {cut}");
                    if found.1 {
                        break;
                    }
                }
            }
        }
    }

    // --- helpers ------------------------------------------------------------

    /// A request's kept extra headers, as owned text.
    fn extra(req: &Request) -> Vec<(String, String)> {
        req.extra
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn opts() -> Arc<HttpOptions> {
        Arc::new(HttpOptions::default())
    }

    fn exchanges(events: &[HttpEvent]) -> Vec<&Exchange> {
        events
            .iter()
            .filter_map(|e| match e {
                HttpEvent::Exchange(x) => Some(x),
                _ => None,
            })
            .collect()
    }

    fn requests(events: &[HttpEvent]) -> Vec<&Request> {
        events
            .iter()
            .filter_map(|e| match e {
                HttpEvent::Request(r) => Some(&**r),
                _ => None,
            })
            .collect()
    }

    /// Feeds `pieces` (direction, bytes, missing) at increasing moments, then closes.
    fn run(conn: &mut HttpConn, pieces: &[(Direction, &[u8], u64)]) -> Vec<HttpEvent> {
        let mut out = Vec::new();
        for (k, (dir, bytes, missing)) in pieces.iter().enumerate() {
            conn.feed(*dir, at(k as u64 + 1), bytes, *missing, &mut out);
        }
        conn.close(at(1_000_000), &mut out);
        out
    }

    const E: Direction = Direction::Egress;
    const I: Direction = Direction::Ingress;

    // --- recorded fixtures --------------------------------------------------

    struct Want {
        method: &'static str,
        target: &'static str,
        status: u16,
        req_body: u64,
        resp_body: u64,
    }

    const fn want(
        method: &'static str,
        target: &'static str,
        status: u16,
        req_body: u64,
        resp_body: u64,
    ) -> Want {
        Want {
            method,
            target,
            status,
            req_body,
            resp_body,
        }
    }

    fn fixtures() -> Vec<(Fixture, Vec<Want>)> {
        vec![
            (
                fixture!("http", "nginx_get_keepalive"),
                vec![
                    want("GET", "/hello.txt", 200, 0, 17),
                    want("GET", "/data.bin", 200, 0, 20000),
                ],
            ),
            (
                fixture!("http", "nginx_tenant_cookie"),
                vec![want("GET", "/hello.txt?q=1", 200, 0, 17)],
            ),
            (
                fixture!("http", "nginx_head"),
                vec![want("HEAD", "/data.bin", 200, 0, 0)],
            ),
            (
                fixture!("http", "nginx_304"),
                vec![want("GET", "/hello.txt", 304, 0, 0)],
            ),
            (
                fixture!("http", "nginx_404"),
                vec![want("GET", "/missing.txt", 404, 0, 153)],
            ),
            (
                fixture!("http", "nginx_204"),
                vec![want("GET", "/empty", 204, 0, 0)],
            ),
            (
                fixture!("http", "nginx_gzip_chunked"),
                vec![want("GET", "/big.txt", 200, 0, 5308)],
            ),
            (
                fixture!("http", "nginx_pipelined"),
                vec![
                    want("GET", "/hello.txt", 200, 0, 17),
                    want("HEAD", "/data.bin", 200, 0, 0),
                    want("GET", "/nope", 404, 0, 153),
                ],
            ),
            (
                fixture!("http", "python_chunked_trailer"),
                vec![want("GET", "/chunked", 200, 0, 2126)],
            ),
            (
                fixture!("http", "python_expect_100"),
                vec![want("POST", "/upload", 201, 10000, 18)],
            ),
            (
                fixture!("http", "python_post_chunked"),
                vec![want("POST", "/upload", 201, 10000, 18)],
            ),
            (
                fixture!("http", "python_close_delimited"),
                vec![want("GET", "/stream", 200, 0, 165)],
            ),
            (
                fixture!("http", "python_upgrade_h2c"),
                vec![want("GET", "/upgrade", 101, 0, 0)],
            ),
        ]
    }

    fn play(f: &Fixture, schedule: &[Syscall], req_dir: Direction) -> (Vec<HttpEvent>, HttpConn) {
        let resp_dir = if req_dir == E { I } else { E };
        let mut conn = HttpConn::new(opts(), true);
        let mut out = Vec::new();
        for &(is_req, off, len) in schedule {
            let (dir, stream) = if is_req {
                (req_dir, f.req)
            } else {
                (resp_dir, f.resp)
            };
            conn.feed(
                dir,
                moment(is_req, off),
                &stream[off..off + len],
                0,
                &mut out,
            );
        }
        conn.close(
            Moment {
                ts_ns: u64::MAX,
                tid: 0,
                unit: 0,
            },
            &mut out,
        );
        (out, conn)
    }

    /// Message positions found by the byte-per-syscall run: request start, final
    /// response start, response end (offsets in their streams).
    type Positions = Vec<(u64, u64, u64)>;

    fn check_fixture(
        f: &Fixture,
        wants: &[Want],
        schedule: &[Syscall],
        req_dir: Direction,
        positions: Option<&Positions>,
    ) -> Positions {
        let ctx = format!("{} ({req_dir:?}, {} syscalls)", f.name, schedule.len());
        let (events, conn) = play(f, schedule, req_dir);
        let xs = exchanges(&events);
        let rs = requests(&events);
        assert_eq!(xs.len(), wants.len(), "{ctx}: exchanges {events:#?}");
        assert_eq!(rs.len(), wants.len(), "{ctx}: requests");
        assert!(!events.contains(&HttpEvent::NotHttp), "{ctx}");
        let upgraded = wants.iter().any(|w| w.status == 101);
        let expect_detection = if upgraded {
            Detection::Upgraded
        } else {
            Detection::Http
        };
        assert_eq!(conn.detection(), expect_detection, "{ctx}");
        assert_eq!(conn.counters(), HttpCounters::default(), "{ctx}");
        let dump = format!("{events:?}").to_ascii_lowercase();
        assert!(!dump.contains("cookie"), "{ctx}: a cookie leaked: {dump}");
        let mut found = Vec::new();
        for (k, ((x, r), w)) in xs.iter().zip(&rs).zip(wants).enumerate() {
            let req = &x.request;
            let resp = x
                .response
                .as_ref()
                .unwrap_or_else(|| panic!("{ctx}: #{k} unanswered"));
            assert_eq!(req.seq, k as u64, "{ctx}");
            assert_eq!(req.method, w.method, "{ctx}");
            assert_eq!(&*req.target, w.target, "{ctx}");
            assert_eq!(req.version, "1.1", "{ctx}");
            assert!(
                req.host.as_ref().is_some_and(|h| &*h.name == "127.0.0.1"),
                "{ctx}"
            );
            assert!(req.user_agent.is_some(), "{ctx}");
            assert!(!req.head_truncated && !resp.head_truncated, "{ctx}");
            assert_eq!(req.body_bytes, w.req_body, "{ctx}: request body #{k}");
            assert_eq!(resp.status, w.status, "{ctx}");
            assert_eq!(resp.body_bytes, w.resp_body, "{ctx}: response body #{k}");
            // The Request event came first and announced the same request.
            assert_eq!(r.seq, req.seq, "{ctx}");
            assert_eq!(
                (&r.method, &r.target, r.start),
                (&req.method, &req.target, req.start)
            );
            // Moments: the syscall carrying the first / last byte.
            assert_eq!(req.start.tid, 1, "{ctx}");
            assert_eq!((resp.start.tid, resp.end.tid), (2, 2), "{ctx}");
            let pos = (offset(req.start), offset(resp.start), offset(resp.end));
            if let Some(positions) = positions {
                let (q, s, e) = positions[k];
                assert_eq!(
                    req.start,
                    moment_of(schedule, true, q),
                    "{ctx}: request start #{k}"
                );
                assert_eq!(
                    resp.start,
                    moment_of(schedule, false, s),
                    "{ctx}: response start #{k}"
                );
                assert_eq!(
                    resp.end,
                    moment_of(schedule, false, e),
                    "{ctx}: response end #{k}"
                );
            }
            found.push(pos);
        }
        found
    }

    /// The positions from the byte-per-syscall run, checked against the bytes.
    fn check_positions(f: &Fixture, wants: &[Want], positions: &Positions) {
        for (k, (&(q, s, e), w)) in positions.iter().zip(wants).enumerate() {
            let (q, s, e) = (q as usize, s as usize, e as usize);
            let line = format!("{} {} HTTP/1.1\r\n", w.method, w.target);
            assert!(
                f.req[q..].starts_with(line.as_bytes()),
                "{}: request #{k} at {q}",
                f.name
            );
            let status = format!(" {} ", w.status);
            assert!(
                f.resp[s..].starts_with(b"HTTP/1."),
                "{}: response #{k} at {s}",
                f.name
            );
            assert_eq!(&f.resp[s + 8..s + 13], status.as_bytes(), "{}", f.name);
            match positions.get(k + 1) {
                Some(next) => assert_eq!(e + 1, next.1 as usize, "{}: #{k} end", f.name),
                None if w.status == 101 => assert!(f.resp[..=e].ends_with(b"\r\n\r\n")),
                None => assert_eq!(e + 1, f.resp.len(), "{}: last end", f.name),
            }
        }
    }

    #[test]
    fn fixtures_whole_split_and_bytewise() {
        for (f, wants) in fixtures() {
            for req_dir in [E, I] {
                let positions = check_fixture(&f, &wants, &bytewise(&f), req_dir, None);
                check_positions(&f, &wants, &positions);
                check_fixture(&f, &wants, &whole(&f), req_dir, Some(&positions));
                check_fixture(&f, &wants, &recorded(&f), req_dir, Some(&positions));
                let total = f.req.len() + f.resp.len();
                for p in 1..total {
                    check_fixture(&f, &wants, &split_at(&f, p), req_dir, Some(&positions));
                }
            }
        }
    }

    #[test]
    fn fixture_details() {
        let (events, _) = play(
            &fixture!("http", "nginx_tenant_cookie"),
            &whole(&fixture!("http", "nginx_tenant_cookie")),
            I,
        );
        let req = &exchanges(&events)[0].request;
        assert_eq!(
            extra(req),
            vec![
                ("x-tenant-id".to_owned(), "acme".to_owned()),
                ("x-user-id".to_owned(), "u1".to_owned())
            ]
        );
        assert_eq!(
            req.traceparent.as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(req.tracestate, None);
        assert_eq!(req.user_agent.as_deref(), Some("curl/7.88.1"));
        // The cookie is 3 KiB long and precedes the tenant headers.
        let cookie_at =
            find(fixture!("http", "nginx_tenant_cookie").req, b"Cookie:").expect("cookie");
        let tenant_at =
            find(fixture!("http", "nginx_tenant_cookie").req, b"x-tenant-id").expect("tenant");
        assert!(tenant_at - cookie_at > 3072);

        let f = fixture!("http", "python_close_delimited");
        let (events, _) = play(&f, &whole(&f), E);
        assert_eq!(
            exchanges(&events)[0].response.as_ref().map(|r| r.version),
            Some("1.0")
        );
    }

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    // --- detection and garbage -------------------------------------------------

    fn detect(first: &[u8], dir: Direction, from_start: bool) -> (Detection, Vec<HttpEvent>) {
        let mut conn = HttpConn::new(opts(), from_start);
        let mut out = Vec::new();
        conn.feed(dir, at(1), first, 0, &mut out);
        (conn.detection(), out)
    }

    #[test]
    fn other_protocols_are_not_http() {
        let tls_hello: &[u8] = &[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ];
        let pg_startup: &[u8] =
            b"\x00\x00\x00\x29\x00\x03\x00\x00user\x00postgres\x00database\x00db\x00\x00";
        let mysql_greeting: &[u8] = b"\x4a\x00\x00\x00\x0a8.0.36\x00\x08\x00\x00\x00";
        let cases: &[&[u8]] = &[
            b"*1\r\n$4\r\nPING\r\n",
            b"GET key\r\n",
            b"GET key value\r\n",
            b"FOO / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n",
            b"get / HTTP/1.1\r\n",
            tls_hello,
            pg_startup,
            mysql_greeting,
        ];
        for case in cases {
            for dir in [E, I] {
                let (d, out) = detect(case, dir, true);
                assert_eq!(d, Detection::NotHttp, "{:?}", String::from_utf8_lossy(case));
                assert_eq!(out, vec![HttpEvent::NotHttp]);
            }
        }
    }

    #[test]
    fn prefixes_stay_undecided_until_decided() {
        for prefix in [
            &b"G"[..],
            b"GE",
            b"GET",
            b"GET ",
            b"GET /a",
            b"GET /a HTTP/1.",
            b"HTTP/1.1 2",
            b"\r\n",
        ] {
            let (d, out) = detect(prefix, E, true);
            assert_eq!(
                d,
                Detection::Undecided,
                "{:?}",
                String::from_utf8_lossy(prefix)
            );
            assert!(out.is_empty());
        }
        // Completed into a request line: HTTP. Completed into something else: not.
        let mut conn = HttpConn::new(opts(), true);
        let mut out = Vec::new();
        conn.feed(I, at(1), b"GE", 0, &mut out);
        conn.feed(I, at(2), b"T /a HTTP/1.1\r", 0, &mut out);
        assert_eq!(conn.detection(), Detection::Undecided);
        conn.feed(I, at(3), b"\nHost: x\r\n\r\n", 0, &mut out);
        assert_eq!(conn.detection(), Detection::Http);
        assert_eq!(requests(&out).len(), 1);
        assert_eq!(requests(&out)[0].start, at(1));

        let mut conn = HttpConn::new(opts(), true);
        conn.feed(E, at(1), b"GE", 0, &mut out);
        conn.feed(E, at(2), b"T mykey\r\n", 0, &mut out);
        assert_eq!(conn.detection(), Detection::NotHttp);

        // A never-ending request line is bounded.
        let mut conn = HttpConn::new(opts(), true);
        let mut out = Vec::new();
        conn.feed(E, at(1), b"GET /", 0, &mut out);
        for k in 0..20_000 {
            conn.feed(E, at(k), b"aaaa", 0, &mut out);
            assert!(conn.sides[0].buf.len() <= conn.max_head());
        }
        assert_eq!(conn.detection(), Detection::NotHttp);
        assert_eq!(out, vec![HttpEvent::NotHttp]);
    }

    #[test]
    fn mid_stream_connection_hunts_for_a_request_line() {
        let mut conn = HttpConn::new(opts(), false);
        let out = run(
            &mut conn,
            &[
                // The tail of a body and a response to a request we never saw.
                (I, b"...tail of an old request body", 0),
                (E, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 0),
                (I, b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n", 0),
                (
                    E,
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nno!",
                    0,
                ),
            ],
        );
        let xs = exchanges(&out);
        assert_eq!(xs.len(), 1, "{out:#?}");
        assert_eq!(&*xs[0].request.target, "/next");
        assert_eq!(xs[0].request.seq, 0);
        assert_eq!(
            xs[0].response.as_ref().map(|r| (r.status, r.body_bytes)),
            Some((404, 3))
        );
        assert_eq!(conn.detection(), Detection::Http);

        // Binary traffic mid-stream: NotHttp after the budget.
        let mut conn = HttpConn::new(opts(), false);
        let mut out = Vec::new();
        let chunk = [0x17u8; 1000];
        for k in 0..70 {
            conn.feed(if k % 2 == 0 { E } else { I }, at(k), &chunk, 0, &mut out);
        }
        assert_eq!(conn.detection(), Detection::NotHttp);
        assert_eq!(out, vec![HttpEvent::NotHttp]);
    }

    /// Feeds `bytes` in random pieces, directions and gaps; checks the invariants.
    fn chaos(rng: &mut Rng, bytes: &[u8], opts: Arc<HttpOptions>) -> Vec<HttpEvent> {
        let mut conn = HttpConn::new(Arc::clone(&opts), rng.below(2) == 0);
        let mut out = Vec::new();
        let mut rest = bytes;
        let mut k = 0;
        while !rest.is_empty() {
            let n = (1 + rng.below(64) as usize).min(rest.len());
            let dir = if rng.below(3) == 0 { I } else { E };
            let missing = if rng.below(8) == 0 { rng.below(100) } else { 0 };
            conn.feed(dir, at(k), &rest[..n], missing, &mut out);
            rest = &rest[n..];
            k += 1;
            for side in &conn.sides {
                assert!(side.buf.len() <= opts.max_head_bytes.max(MIN_HEAD_BYTES) + 2);
                assert!(side.buf.capacity() <= 2 * opts.max_head_bytes.max(MIN_HEAD_BYTES) + 64);
            }
            assert!(conn.queued <= opts.max_pending);
            assert!(conn.pending.len() <= 2 * opts.max_pending + 1);
        }
        conn.close(at(k), &mut out);
        check_invariants(&out);
        out
    }

    fn check_invariants(out: &[HttpEvent]) {
        let not_http = out.iter().filter(|e| **e == HttpEvent::NotHttp).count();
        assert!(not_http <= 1);
        if not_http == 1 {
            assert_eq!(out.last(), Some(&HttpEvent::NotHttp));
        }
        let mut last_req = None;
        let mut last_x = None;
        let mut announced = Vec::new();
        for e in out {
            match e {
                HttpEvent::Request(r) => {
                    assert!(last_req.is_none_or(|l| r.seq > l));
                    last_req = Some(r.seq);
                    announced.push(r.seq);
                }
                HttpEvent::Exchange(x) => {
                    assert!(last_x.is_none_or(|l| x.request.seq > l));
                    last_x = Some(x.request.seq);
                    assert!(announced.contains(&x.request.seq));
                }
                HttpEvent::NotHttp => {}
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let small = Arc::new(HttpOptions {
            max_head_bytes: 100,
            max_value_bytes: 8,
            max_pending: 2,
            ..HttpOptions::default()
        });
        for seed in 1..400u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let len = rng.below(4000) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let out = chaos(&mut rng, &bytes, opts());
            assert!(exchanges(&out).is_empty());
            chaos(&mut rng, &bytes, Arc::clone(&small));
        }
    }

    #[test]
    fn http_like_noise_never_panics() {
        // Random sequences of HTTP fragments: plausible enough to get deep into the
        // state machine.
        let atoms: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\n",
            b"HEAD /x HTTP/1.0\r\n",
            b"POST /p HTTP/1.1\r\n",
            b"CONNECT h:443 HTTP/1.1\r\n",
            b"HTTP/1.1 200 OK\r\n",
            b"HTTP/1.1 100 Continue\r\n",
            b"HTTP/1.1 101 Switching\r\n",
            b"HTTP/1.0 204 \r\n",
            b"HTTP/1.1 304 Not Modified\r\n",
            b"Content-Length: 5\r\n",
            b"Content-Length: 99999999999999999999\r\n",
            b"Content-Length: 3, 4\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"Transfer-Encoding: gzip\r\n",
            b"x-tenant-id: \xff\xfe\r\n",
            b"Host: h\r\n",
            b"\r\n",
            b"\n",
            b"5\r\nhello\r\n",
            b"0\r\n\r\n",
            b"5;ext=1\r\n",
            b"ffffffffffffffffff\r\n",
            b"Trailer: x\r\n",
            b"abc",
            b"\x00\x01\x02",
        ];
        let small = Arc::new(HttpOptions {
            max_head_bytes: 64,
            max_pending: 3,
            ..HttpOptions::default()
        });
        for seed in 1..3000u64 {
            let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
            let mut bytes = Vec::new();
            for _ in 0..rng.below(40) {
                bytes.extend_from_slice(atoms[rng.below(atoms.len() as u64) as usize]);
            }
            chaos(
                &mut rng,
                &bytes,
                if seed % 3 == 0 {
                    Arc::clone(&small)
                } else {
                    opts()
                },
            );
        }
    }

    #[test]
    fn mutated_fixtures_never_panic() {
        for (f, _) in fixtures() {
            for seed in 1..40u64 {
                let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
                let mut req = f.req[..f.req.len().min(4000)].to_vec();
                let mut resp = f.resp[..f.resp.len().min(4000)].to_vec();
                for _ in 0..rng.below(6) {
                    let (buf, r) = if rng.below(2) == 0 {
                        (&mut req, rng.next())
                    } else {
                        (&mut resp, rng.next())
                    };
                    if !buf.is_empty() {
                        let k = (r % buf.len() as u64) as usize;
                        buf[k] = rng.next() as u8;
                    }
                }
                let mut conn = HttpConn::new(opts(), true);
                let mut out = Vec::new();
                let (mut a, mut b) = (&req[..], &resp[..]);
                let mut k = 0;
                while !a.is_empty() || !b.is_empty() {
                    let n = 1 + rng.below(300) as usize;
                    if !a.is_empty() && (b.is_empty() || rng.below(2) == 0) {
                        let n = n.min(a.len());
                        conn.feed(E, at(k), &a[..n], 0, &mut out);
                        a = &a[n..];
                    } else {
                        let n = n.min(b.len());
                        conn.feed(I, at(k), &b[..n], 0, &mut out);
                        b = &b[n..];
                    }
                    k += 1;
                }
                conn.close(at(k), &mut out);
                check_invariants(&out);
            }
        }
    }

    // --- capture gaps ----------------------------------------------------------

    const REQ: &[u8] = b"GET /a HTTP/1.1\r\nHost: h\r\nx-tenant-id: t1\r\n\r\n";

    #[test]
    fn gap_in_content_length_body_still_pairs() {
        let mut conn = HttpConn::new(opts(), true);
        let out = run(
            &mut conn,
            &[
                (E, REQ, 0),
                (
                    I,
                    b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nabc",
                    40_000,
                ),
                (I, b"more", 59_993),
                (E, b"GET /b HTTP/1.1\r\n\r\n", 0),
                (I, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 0),
            ],
        );
        let xs = exchanges(&out);
        assert_eq!(xs.len(), 2);
        let r0 = xs[0].response.as_ref().expect("response");
        assert_eq!(
            (r0.status, r0.body_bytes, r0.start, r0.end),
            (200, 100_000, at(2), at(3))
        );
        assert_eq!(&*xs[1].request.target, "/b");
        assert_eq!(xs[1].response.as_ref().map(|r| r.body_bytes), Some(2));
        assert_eq!(conn.counters(), HttpCounters::default());
    }

    #[test]
    fn gap_in_request_head_resyncs_on_next_request() {
        let mut conn = HttpConn::new(opts(), true);
        let out = run(
            &mut conn,
            &[
                (E, REQ, 0),
                (I, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 0),
                // Head cut by the capture size: "GET /two ... Host: h" and 300 more bytes.
                (
                    E,
                    b"GET /two HTTP/1.1\r\nHost: h\r\nx-tenant-id: t2\r\nCookie: abc",
                    300,
                ),
                (E, b"and the rest of it\r\n\r\n", 0),
                (I, b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", 0),
                (E, b"GET /three HTTP/1.1\r\n\r\n", 0),
                (I, b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n", 0),
            ],
        );
        let xs = exchanges(&out);
        let got: Vec<_> = xs
            .iter()
            .map(|x| {
                (
                    x.request.seq,
                    &*x.request.target,
                    x.request.head_truncated,
                    x.response.as_ref().map(|r| r.status),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (0, "/a", false, Some(200)),
                (1, "/two", true, Some(201)),
                (2, "/three", false, Some(202))
            ]
        );
        // What was seen of the cut head is kept.
        assert_eq!(
            extra(&xs[1].request),
            vec![("x-tenant-id".to_owned(), "t2".to_owned())]
        );
        assert_eq!(conn.counters().resyncs, 1);

        // Cut before the request line was even complete: nothing to report for it.
        let mut conn = HttpConn::new(opts(), true);
        let out = run(
            &mut conn,
            &[
                (E, REQ, 0),
                (I, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 0),
                (E, b"GET /tw", 300),
                (E, b"GET /three HTTP/1.1\r\n\r\n", 0),
                (I, b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n", 0),
            ],
        );
        let got: Vec<_> = exchanges(&out)
            .iter()
            .map(|x| (x.request.seq, x.request.target.to_string()))
            .collect();
        assert_eq!(got, vec![(0, "/a".to_owned()), (1, "/three".to_owned())]);
    }

    #[test]
    fn gap_in_response_head_or_chunk_framing_finishes_and_resyncs() {
        let mut conn = HttpConn::new(opts(), true);
        let out = run(
            &mut conn,
            &[
                (E, REQ, 0),
                (
                    I,
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3\r",
                    5000,
                ),
                (I, b"xyz\r\n0\r\n\r\n", 0), // stale bytes of the lost response
                (E, b"GET /b HTTP/1.1\r\n\r\n", 0),
                (I, b"HTTP/1.1 500 Oops\r\nContent-Length: 1\r\n\r\n!", 0),
            ],
        );
        let xs = exchanges(&out);
        assert_eq!(xs.len(), 2);
        let r0 = xs[0]
            .response
            .as_ref()
            .expect("finished with what was seen");
        assert_eq!((r0.status, r0.body_bytes, r0.end), (200, 5, at(2)));
        assert_eq!(xs[1].response.as_ref().map(|r| r.status), Some(500));
        assert_eq!(conn.counters().resyncs, 1);

        // A gap inside chunk data is harmless.
        let mut conn = HttpConn::new(opts(), true);
        let out = run(
            &mut conn,
            &[
                (E, REQ, 0),
                (
                    I,
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\nab",
                    4092,
                ),
                (I, b"cd\r\n0\r\n\r\n", 0),
            ],
        );
        let xs = exchanges(&out);
        assert_eq!(
            xs[0].response.as_ref().map(|r| (r.body_bytes, r.end)),
            Some((4096, at(3)))
        );
        assert_eq!(conn.counters().resyncs, 0);

        // A response head cut by the capture: status known, exchange finished.
        let mut conn = HttpConn::new(opts(), true);
        let out = run(
            &mut conn,
            &[
                (E, REQ, 0),
                (I, b"HTTP/1.1 403 Forbidden\r\nServer: x\r\nCont", 10_000),
            ],
        );
        let r0 = exchanges(&out)[0].response.clone().expect("response");
        assert_eq!((r0.status, r0.head_truncated), (403, true));
    }

    #[test]
    fn lost_responses_do_not_shift_pairing() {
        // The response direction loses track (garbage instead of a status line): the
        // request it may have answered ends unanswered when it resyncs, instead of
        // taking the next request's response.
        let mut conn = HttpConn::new(opts(), true);
        let out = run(
            &mut conn,
            &[
                (E, REQ, 0),
                (I, b"\x00garbage", 0),
                (E, b"GET /b HTTP/1.1\r\n\r\n", 0),
                (I, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 0),
            ],
        );
        let got: Vec<_> = exchanges(&out)
            .iter()
            .map(|x| (x.request.target.to_string(), x.response.is_some()))
            .collect();
        assert_eq!(got, vec![("/a".to_owned(), false), ("/b".to_owned(), true)]);
        assert_eq!(conn.counters().unanswered, 1);
        // /a's response went by unseen. On this client end, /a ends late,
        // when /b began (moment 3), around whatever /a called.
        let lost: Vec<_> = exchanges(&out)
            .iter()
            .map(|x| x.response_lost.map(|m| m.ts_ns))
            .collect();
        assert_eq!(lost, vec![Some(3), None]);
        // On a server's end it ends early, at the last moment seen before
        // the skip (the garbage, moment 2), within its caller's span.
        let mut conn = HttpConn::new(opts(), true);
        let out = run(
            &mut conn,
            &[
                (I, REQ, 0),
                (E, b"\x00garbage", 0),
                (I, b"GET /b HTTP/1.1\r\n\r\n", 0),
                (E, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 0),
            ],
        );
        let lost: Vec<_> = exchanges(&out)
            .iter()
            .map(|x| x.response_lost.map(|m| m.ts_ns))
            .collect();
        assert_eq!(lost, vec![Some(2), None]);

        // Mid-stream with pipelining: nothing was skipped after the requests were
        // queued, so both pair.
        let mut conn = HttpConn::new(opts(), false);
        let out = run(
            &mut conn,
            &[
                (I, b"old response bytes", 0),
                (E, b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n", 0),
                (
                    I,
                    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 201 OK\r\n\r\n",
                    0,
                ),
            ],
        );
        let got: Vec<_> = exchanges(&out)
            .iter()
            .map(|x| {
                (
                    x.request.target.to_string(),
                    x.response.as_ref().map(|r| r.status),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![("/a".to_owned(), Some(200)), ("/b".to_owned(), Some(201))]
        );

        // Pipelined, and the response direction loses its start: both requests may
        // have been answered in what was missed.
        let mut conn = HttpConn::new(opts(), true);
        let out = run(
            &mut conn,
            &[
                (E, b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n", 0),
                (I, b"", 5000),
                (I, b"...\r\n", 0),
                (E, b"GET /c HTTP/1.1\r\n\r\n", 0),
                (I, b"HTTP/1.1 202 OK\r\nContent-Length: 0\r\n\r\n", 0),
            ],
        );
        let got: Vec<_> = exchanges(&out)
            .iter()
            .map(|x| {
                (
                    x.request.target.to_string(),
                    x.response.as_ref().map(|r| r.status),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("/a".to_owned(), None),
                ("/b".to_owned(), None),
                ("/c".to_owned(), Some(202))
            ]
        );
    }

    // --- limits ----------------------------------------------------------------

    #[test]
    fn max_pending_overflow_is_counted_and_pairing_stays_aligned() {
        let o = Arc::new(HttpOptions {
            max_pending: 2,
            ..HttpOptions::default()
        });
        let mut conn = HttpConn::new(o, true);
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let out = run(
            &mut conn,
            &[
                (E, b"GET /0 HTTP/1.1\r\n\r\nGET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n", 0),
                (I, ok, 0),
                (E, b"GET /4 HTTP/1.1\r\n\r\n", 0),
                (I, ok, 0),
                (I, ok, 0),
                (I, ok, 0),
                (I, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", 0),
            ],
        );
        assert_eq!(conn.counters().dropped_requests, 2);
        let got: Vec<_> = exchanges(&out)
            .iter()
            .map(|x| (x.request.seq, x.response.as_ref().map(|r| r.status)))
            .collect();
        assert_eq!(got, vec![(0, Some(200)), (1, Some(200)), (4, Some(404))]);
        assert_eq!(
            requests(&out).iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![0, 1, 4]
        );
    }

    #[test]
    fn long_head_is_cut_but_headers_within_the_limit_are_found() {
        let o = Arc::new(HttpOptions {
            max_head_bytes: 1024,
            ..HttpOptions::default()
        });
        let cookie = format!("Cookie: {}\r\n", "c".repeat(3000));
        let head = format!(
            "POST /up HTTP/1.1\r\nHost: h\r\nx-tenant-id: acme\r\nContent-Length: 4\r\n{cookie}x-user-id: late\r\n\r\nbody"
        );
        let resp = format!("HTTP/1.1 200 OK\r\n{cookie}Content-Length: 2\r\n\r\nok");
        for piece in [1usize, 7, 100, 5000] {
            let mut conn = HttpConn::new(Arc::clone(&o), true);
            let mut pieces: Vec<(Direction, &[u8], u64)> =
                head.as_bytes().chunks(piece).map(|c| (E, c, 0)).collect();
            pieces.extend(resp.as_bytes().chunks(piece).map(|c| (I, c, 0)));
            let out = run(&mut conn, &pieces);
            let xs = exchanges(&out);
            assert_eq!(xs.len(), 1, "piece {piece}: {out:#?}");
            let req = &xs[0].request;
            assert!(req.head_truncated);
            assert_eq!(
                extra(req),
                vec![("x-tenant-id".to_owned(), "acme".to_owned())]
            );
            assert_eq!(req.body_bytes, 4);
            let r = xs[0].response.as_ref().expect("response");
            // The response's Content-Length came after the limit: delimited by close.
            assert!(r.head_truncated);
            assert_eq!(r.body_bytes, 2);
            for side in &conn.sides {
                assert!(side.buf.capacity() <= 4096);
            }
            assert!(!format!("{out:?}").contains("ccc"));
        }

        // With the default limit the tenant header after 3 KiB of cookies is found.
        let head = format!("GET / HTTP/1.1\r\n{cookie}x-tenant-id: acme\r\n\r\n");
        let mut conn = HttpConn::new(opts(), true);
        let out = run(&mut conn, &[(E, head.as_bytes(), 0)]);
        let req = requests(&out)[0];
        assert_eq!(
            extra(req),
            vec![("x-tenant-id".to_owned(), "acme".to_owned())]
        );
        assert!(!req.head_truncated);
    }

    #[test]
    fn values_are_trimmed_capped_and_never_secret() {
        let o = Arc::new(HttpOptions {
            max_value_bytes: 5,
            extra_headers: vec![
                "x-tenant-id".into(),
                "Cookie".into(),
                "authorization".into(),
                "X-Bin".into(),
            ],
            ..HttpOptions::default()
        });
        let mut conn = HttpConn::new(o, true);
        let out = run(
            &mut conn,
            &[(
                E,
                b"GET /0123456789abcdefghijklmnopqrstuvwxyz HTTP/1.1\r\nUser-Agent:  h\xc3\xa9h\xc3\xa9h  \r\n\
                  X-TENANT-ID: \t t\r\nx-tenant-id: second\r\nCookie: secret\r\nAuthorization: Bearer secret\r\n\
                  x-bin: \xff\xfeab\r\nHost: example.com:8080\r\n\r\n",
                0,
            )],
        );
        let req = requests(&out)[0];
        assert_eq!(&*req.target, "/0123456789abcdefghi"); // 4 * 5 bytes
        assert_eq!(req.user_agent.as_deref(), Some("h\u{e9}h")); // 4 of 5 bytes: char boundary
        assert_eq!(req.host.as_ref().map(|h| &*h.name), Some("examp"));
        assert_eq!(
            extra(req),
            vec![
                ("x-tenant-id".to_owned(), "t".to_owned()),
                ("x-bin".to_owned(), "\u{fffd}".to_owned())
            ]
        );
        assert!(!format!("{out:?}").contains("secret"));
    }

    #[test]
    fn host_headers_split_into_name_and_port() {
        let split = |h: &str| Authority::parse(h).map(|a| (a.name.to_string(), a.port));
        let some = |n: &str, p: Option<u16>| Some((n.to_owned(), p));
        assert_eq!(split("shop.example:8080"), some("shop.example", Some(8080)));
        assert_eq!(split(" shop.example "), some("shop.example", None));
        assert_eq!(split("[::1]:8443"), some("::1", Some(8443)));
        assert_eq!(split("[::1]"), some("::1", None));
        // A bare IPv6 address has no port; a port that is not a number is none.
        assert_eq!(split("::1"), some("::1", None));
        assert_eq!(split("h:http"), some("h", None));
        assert_eq!(split("h:99999"), some("h", None));
        assert_eq!(split(""), None);
        assert_eq!(split(" \t"), None);
    }

    /// On a keep-alive connection a head that repeats the last one's Host,
    /// User-Agent and kept headers shares their values; one that changes
    /// them gets its own, never the last one's.
    #[test]
    fn repeated_header_values_are_shared_and_changed_ones_are_not() {
        let mut conn = HttpConn::new(opts(), true);
        let head = |host: &str, ua: &str, tenant: &str| {
            format!(
                "GET /r HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {ua}\r\nx-tenant-id: {tenant}\r\n\r\n"
            )
        };
        let ok: &[u8] = b"HTTP/1.1 204 No Content\r\n\r\n";
        let same = head("h:1", "ua/1", "acme");
        let changed = head("h:2", "ua/2", "globex");
        let bare = "GET /r HTTP/1.1\r\n\r\n";
        let mut pieces = Vec::new();
        for h in [&same, &same, &same, &changed] {
            pieces.extend([(E, h.as_bytes(), 0), (I, ok, 0)]);
        }
        pieces.extend([(E, bare.as_bytes(), 0), (I, ok, 0)]);
        let out = run(&mut conn, &pieces);
        let reqs = requests(&out);
        assert_eq!(reqs.len(), 5);
        let host = |r: &Request| r.host.clone().expect("a Host header");
        let ua = |r: &Request| r.user_agent.clone().expect("a User-Agent");
        let tenant = |r: &Request| Arc::clone(&r.extra[0].1);
        assert!(Arc::ptr_eq(&host(reqs[0]).name, &host(reqs[1]).name));
        assert!(Arc::ptr_eq(&ua(reqs[0]), &ua(reqs[1])));
        // Kept headers are remembered from a connection's second request on.
        assert!(Arc::ptr_eq(&tenant(reqs[1]), &tenant(reqs[2])));
        assert_eq!((&*host(reqs[2]).name, host(reqs[2]).port), ("h", Some(1)));
        assert_eq!((&*host(reqs[3]).name, host(reqs[3]).port), ("h", Some(2)));
        assert_eq!(&*ua(reqs[3]), "ua/2");
        assert_eq!(&*tenant(reqs[3]), "globex");
        // A head without them has none, whatever came before.
        assert_eq!(reqs[4].host, None);
        assert_eq!(reqs[4].user_agent, None);
        assert!(reqs[4].extra.is_empty());
    }

    /// A repeated target is shared; a changed one is its own; a long one
    /// is never remembered, so an idle connection holds at most a short one.
    #[test]
    fn repeated_targets_are_shared_and_long_ones_are_not_kept() {
        let mut conn = HttpConn::new(opts(), true);
        let long = format!("/{}", "x".repeat(Repeats::TARGET_MAX));
        let ok: &[u8] = b"HTTP/1.1 204 No Content\r\n\r\n";
        let heads: Vec<String> = ["/a", "/a", "/b", &long, &long]
            .iter()
            .map(|t| format!("GET {t} HTTP/1.1\r\nHost: h\r\n\r\n"))
            .collect();
        let mut pieces = Vec::new();
        for h in &heads {
            pieces.extend([(E, h.as_bytes(), 0), (I, ok, 0)]);
        }
        let out = run(&mut conn, &pieces);
        let reqs = requests(&out);
        let targets: Vec<&str> = reqs.iter().map(|r| &*r.target).collect();
        assert_eq!(targets, ["/a", "/a", "/b", &long, &long]);
        assert!(Arc::ptr_eq(&reqs[0].target, &reqs[1].target));
        assert!(!Arc::ptr_eq(&reqs[3].target, &reqs[4].target));
        assert!(conn.repeats.target.is_none());
    }

    // --- framing and pairing ------------------------------------------------------

    #[test]
    fn connect_2xx_upgrades() {
        let mut conn = HttpConn::new(opts(), true);
        let out = run(
            &mut conn,
            &[
                (
                    E,
                    b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
                    0,
                ),
                (
                    I,
                    b"HTTP/1.1 200 Connection Established\r\n\r\n\x16\x03\x03",
                    0,
                ),
                (E, b"\x16\x03\x01\x02\x00GET / HTTP/1.1\r\n\r\n", 0),
                (I, b"HTTP/1.1 200 OK\r\n\r\n", 0),
            ],
        );
        assert_eq!(conn.detection(), Detection::Upgraded);
        let xs = exchanges(&out);
        assert_eq!(xs.len(), 1);
        assert_eq!(
            xs[0].response.as_ref().map(|r| (r.status, r.end)),
            Some((200, at(2)))
        );
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn close_completes_close_delimited_and_reports_unanswered() {
        let mut conn = HttpConn::new(opts(), true);
        let mut out = Vec::new();
        conn.feed(
            E,
            at(1),
            b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
            0,
            &mut out,
        );
        conn.feed(I, at(2), b"HTTP/1.0 200 OK\r\n\r\npart one", 0, &mut out);
        conn.feed(I, at(3), b"part two", 1000, &mut out);
        conn.close(at(9), &mut out);
        let xs = exchanges(&out);
        assert_eq!(xs.len(), 2);
        let r = xs[0].response.as_ref().expect("response");
        assert_eq!((r.body_bytes, r.start, r.end), (16 + 1000, at(2), at(3)));
        assert_eq!(&*xs[1].request.target, "/b");
        assert_eq!(xs[1].response, None);
        assert_eq!(conn.counters().unanswered, 1);
        // Nothing after close.
        conn.feed(E, at(10), REQ, 0, &mut out);
        conn.close(at(11), &mut out);
        assert_eq!(exchanges(&out).len(), 2);
    }

    #[test]
    fn response_direction_first_and_bare_lf() {
        // A status line seen first decides the roles too (response skipped: no request).
        let mut conn = HttpConn::new(opts(), true);
        let out = run(
            &mut conn,
            &[
                (I, b"HTTP/1.1 408 Request Timeout\nContent-Length: 0\n\n", 0),
                (E, b"GET /lf HTTP/1.0\nHost: h\n\n", 0),
                (I, b"HTTP/1.0 200 OK\nContent-Length: 2\n\nok", 0),
            ],
        );
        let xs = exchanges(&out);
        assert_eq!(xs.len(), 1);
        assert_eq!(xs[0].request.version, "1.0");
        assert_eq!(xs[0].request.host.as_ref().map(|h| &*h.name), Some("h"));
        assert_eq!(
            xs[0].response.as_ref().map(|r| (r.status, r.body_bytes)),
            Some((200, 2))
        );
    }

    #[test]
    fn chunked_request_with_extensions_trailers_and_early_response() {
        let mut conn = HttpConn::new(opts(), true);
        let out = run(
            &mut conn,
            &[
                (
                    E,
                    b"PUT /c HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4;a=b\r\nwiki\r\n",
                    0,
                ),
                // The server answers before the body ends (e.g. 413): the request body
                // still counts into the exchange it is held by until it is emitted.
                (I, b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n", 0),
                (E, b"5  \r\npedia\r\n0\r\nExpires: never\r\n\r\n", 0),
                (E, b"DELETE /d HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 0),
                (I, b"HTTP/1.1 204 No Content\r\n\r\n", 0),
            ],
        );
        let xs = exchanges(&out);
        let got: Vec<_> = xs
            .iter()
            .map(|x| {
                (
                    &*x.request.method,
                    x.request.body_bytes,
                    x.response.as_ref().map(|r| r.status),
                )
            })
            .collect();
        assert_eq!(got, vec![("PUT", 4, Some(413)), ("DELETE", 2, Some(204))]);
        assert_eq!(conn.counters(), HttpCounters::default());
    }

    #[test]
    fn bad_request_framing_resyncs() {
        let mut conn = HttpConn::new(opts(), true);
        let out = run(
            &mut conn,
            &[
                (
                    E,
                    b"POST /x HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
                    0,
                ),
                (
                    I,
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    0,
                ),
            ],
        );
        let xs = exchanges(&out);
        assert_eq!(xs[0].response.as_ref().map(|r| r.status), Some(400));
        assert_eq!(conn.counters().resyncs, 1);
    }

    #[test]
    fn non_utf8_target_is_read_lossily() {
        let mut conn = HttpConn::new(opts(), true);
        let out = run(
            &mut conn,
            &[(
                E,
                b"GET /caf\xe9 HTTP/1.1\r\nHost: h\r\nBad Header\r\nContent-Length: 1\r\n\r\nx",
                0,
            )],
        );
        let req = &exchanges(&out)[0].request;
        assert_eq!(&*req.target, "/caf\u{fffd}");
        assert_eq!(req.host.as_ref().map(|h| &*h.name), Some("h"));
        assert_eq!(req.body_bytes, 1);
    }

    #[test]
    fn blanks_before_a_colon_end_a_request_field_not_a_response_one() {
        let mut conn = HttpConn::new(opts(), true);
        let out = run(
            &mut conn,
            &[
                (E, b"GET / HTTP/1.1\r\nHost : evil\r\nhost: good\r\n\r\n", 0),
                (I, b"HTTP/1.1 200 OK\r\nContent-Length : 3\r\n\r\nabc", 0),
                (E, b"GET /next HTTP/1.1\r\nHost: good\r\n\r\n", 0),
                (I, b"HTTP/1.1 204 No Content\r\n\r\n", 0),
            ],
        );
        // The length framed the first body, so the second exchange stands apart.
        let xs = exchanges(&out);
        assert_eq!(xs.len(), 2, "{out:?}");
        assert_eq!(xs[0].request.host.as_ref().map(|h| &*h.name), Some("good"));
        assert_eq!(xs[0].response.as_ref().map(|r| r.body_bytes), Some(3));
        assert_eq!(xs[1].response.as_ref().map(|r| r.status), Some(204));
    }
}
