//! One connection's protocol: recognised from its first bytes, then parsed
//! by that protocol's parser. Bytes seen while deciding are replayed into
//! the chosen parser, so nothing is lost to detection.
//!
//! Encrypted connections: a socket chunk that begins with a TLS record
//! where one may begin (a connection's first bytes, or after PostgreSQL's
//! or MySQL's switch to TLS) makes the session *encrypted*: from then on
//! socket bytes are ciphertext and never reach a parser. Plaintext from the
//! TLS library probes ([`Session::feed_plaintext`]) goes on where the clear
//! text left off, so a PostgreSQL or MySQL parser continues after its
//! switch. Plaintext also marks the session encrypted, so nothing is read
//! twice.

use std::sync::Arc;

use agent_common::Direction;

use super::{
    db::{DbEvent, DbOptions, Detect},
    http::{HttpConn, HttpEvent, HttpOptions, Moment},
    mysql::{self, MysqlConn},
    postgres::{self, PostgresConn},
    redis::{self, RedisConn},
};

/// Detection looks at no more than this many bytes per direction…
const DETECT_BYTES: usize = 64;
/// …or this many syscalls, before falling back to HTTP's own detection.
const DETECT_CHUNKS: usize = 8;

/// Recognises a protocol from a connection's first bytes in a direction.
type Detector = fn(Direction, &[u8]) -> Detect;

/// The database protocols, tried in order; HTTP decides for itself.
const DETECTORS: [(Detector, Protocol); 3] = [
    (postgres::detect, Protocol::Postgres),
    (mysql::detect, Protocol::Mysql),
    (redis::detect, Protocol::Redis),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Postgres,
    Mysql,
    Redis,
}

impl Protocol {
    /// db.system.name for the database protocols.
    pub fn db_system(self) -> Option<&'static str> {
        match self {
            Protocol::Http => None,
            Protocol::Postgres => Some("postgresql"),
            Protocol::Mysql => Some("mysql"),
            Protocol::Redis => Some("redis"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Http(HttpEvent),
    Db(DbEvent),
}

#[derive(Debug, Default, Clone)]
pub struct Options {
    pub http: Arc<HttpOptions>,
    pub db: Arc<DbOptions>,
}

struct Chunk {
    dir: Direction,
    at: Moment,
    bytes: Vec<u8>,
    missing: u64,
}

enum Parser {
    Http(HttpConn),
    Postgres(PostgresConn),
    Mysql(MysqlConn),
    Redis(RedisConn),
}

enum State {
    Detecting(Vec<Chunk>),
    Parsing {
        parser: Box<Parser>,
        /// Which way requests flow (database protocols; HTTP decides itself).
        requests: Option<Direction>,
    },
}

pub struct Session {
    opts: Options,
    from_start: bool,
    /// Well-known server ports; only a hint for connections first seen
    /// mid-stream, whose first bytes say nothing.
    ports: (u16, u16),
    state: State,
    /// Reused for each parser call: no allocation per syscall.
    http_events: Vec<HttpEvent>,
    db_events: Vec<DbEvent>,
    tls: Tls,
}

/// What the session knows about encryption on its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tls {
    /// Clear text so far.
    #[default]
    None,
    /// A TLS record went by; no plaintext from a TLS library yet.
    Ciphertext,
    /// Plaintext from a TLS library is being parsed.
    Plaintext,
}

impl Session {
    /// `ports`: (local, remote), 0 where there is none (unix sockets).
    pub fn new(opts: Options, from_start: bool, ports: (u16, u16)) -> Self {
        Self {
            opts,
            from_start,
            ports,
            state: State::Detecting(Vec::new()),
            http_events: Vec::new(),
            db_events: Vec::new(),
            tls: Tls::None,
        }
    }

    /// Whether the connection is encrypted, and whether its plaintext is read.
    pub fn tls(&self) -> Tls {
        self.tls
    }

    pub fn protocol(&self) -> Option<Protocol> {
        match &self.state {
            State::Detecting(_) => None,
            State::Parsing { parser, .. } => Some(match **parser {
                Parser::Http(_) => Protocol::Http,
                Parser::Postgres(_) => Protocol::Postgres,
                Parser::Mysql(_) => Protocol::Mysql,
                Parser::Redis(_) => Protocol::Redis,
            }),
        }
    }

    /// The direction database requests flow in, once known.
    pub fn request_direction(&self) -> Option<Direction> {
        match &self.state {
            State::Parsing { requests, .. } => *requests,
            State::Detecting(_) => None,
        }
    }

    /// Bytes a socket syscall moved. Ciphertext is dropped here.
    pub fn feed(
        &mut self,
        dir: Direction,
        at: Moment,
        bytes: &[u8],
        missing: u64,
        out: &mut Vec<Event>,
    ) {
        if self.tls != Tls::None {
            return;
        }
        if super::is_tls_record(bytes) && self.tls_may_start(dir) {
            self.tls = Tls::Ciphertext;
            return;
        }
        self.feed_clear(dir, at, bytes, missing, out);
    }

    /// Plaintext a TLS library moved on this connection.
    pub fn feed_plaintext(
        &mut self,
        dir: Direction,
        at: Moment,
        bytes: &[u8],
        missing: u64,
        out: &mut Vec<Event>,
    ) {
        self.tls = Tls::Plaintext;
        self.feed_clear(dir, at, bytes, missing, out);
    }

    /// Bytes in `dir` that were lost before the next ones fed (the
    /// transport refused their records): the parser skips them as it skips
    /// bytes a syscall moved beyond the capture, or loses track and hunts
    /// for the next message. `at` is the moment to end a message cut by
    /// the hole, the last one seen before it: a lower bound, so the span
    /// stays within what really happened. Lost ciphertext changes nothing.
    pub fn lost(&mut self, dir: Direction, at: Moment, bytes: u64, out: &mut Vec<Event>) {
        if bytes == 0 || self.tls == Tls::Ciphertext {
            return;
        }
        self.feed_clear(dir, at, &[], bytes, out);
    }

    /// Whether a TLS record may begin here: before any clear text in
    /// `dir`, or where the protocol agreed to switch to TLS.
    fn tls_may_start(&self, dir: Direction) -> bool {
        match &self.state {
            State::Detecting(chunks) => !chunks.iter().any(|c| c.dir == dir),
            State::Parsing { parser, .. } => match parser.as_ref() {
                Parser::Postgres(p) => p.tls_may_start(),
                Parser::Mysql(p) => p.tls_may_start(),
                Parser::Http(_) | Parser::Redis(_) => false,
            },
        }
    }

    fn feed_clear(
        &mut self,
        dir: Direction,
        at: Moment,
        bytes: &[u8],
        missing: u64,
        out: &mut Vec<Event>,
    ) {
        if let State::Detecting(chunks) = &mut self.state {
            chunks.push(Chunk {
                dir,
                at,
                bytes: bytes[..bytes.len().min(4096)].to_vec(),
                missing: missing + bytes.len().saturating_sub(4096) as u64,
            });
            let Some((parser, requests)) = self.decide() else {
                return;
            };
            let State::Detecting(chunks) = std::mem::replace(
                &mut self.state,
                State::Parsing {
                    parser: Box::new(parser),
                    requests,
                },
            ) else {
                return;
            };
            for c in chunks {
                self.feed_parser(c.dir, c.at, &c.bytes, c.missing, out);
            }
            return;
        }
        self.feed_parser(dir, at, bytes, missing, out);
    }

    pub fn close(&mut self, at: Moment, out: &mut Vec<Event>) {
        if let State::Detecting(chunks) = &self.state {
            if chunks.is_empty() {
                return;
            }
            // Too few bytes to be sure: let HTTP have the last word.
            let http = Parser::Http(HttpConn::new(Arc::clone(&self.opts.http), self.from_start));
            let State::Detecting(chunks) = std::mem::replace(
                &mut self.state,
                State::Parsing {
                    parser: Box::new(http),
                    requests: None,
                },
            ) else {
                return;
            };
            for c in chunks {
                self.feed_parser(c.dir, c.at, &c.bytes, c.missing, out);
            }
        }
        let Self {
            state,
            http_events: http,
            db_events: db,
            ..
        } = self;
        if let State::Parsing { parser, .. } = state {
            match parser.as_mut() {
                Parser::Http(p) => p.close(at, http),
                Parser::Postgres(p) => p.close(at, db),
                Parser::Mysql(p) => p.close(at, db),
                Parser::Redis(p) => p.close(at, db),
            }
        }
        self.drain_into(out);
    }

    fn feed_parser(
        &mut self,
        dir: Direction,
        at: Moment,
        bytes: &[u8],
        missing: u64,
        out: &mut Vec<Event>,
    ) {
        let Self {
            state,
            http_events: http,
            db_events: db,
            ..
        } = self;
        let State::Parsing { parser, .. } = state else {
            return;
        };
        match parser.as_mut() {
            Parser::Http(p) => p.feed(dir, at, bytes, missing, http),
            Parser::Postgres(p) => p.feed(dir, at, bytes, missing, db),
            Parser::Mysql(p) => p.feed(dir, at, bytes, missing, db),
            Parser::Redis(p) => p.feed(dir, at, bytes, missing, db),
        }
        self.drain_into(out);
    }

    fn drain_into(&mut self, out: &mut Vec<Event>) {
        out.extend(self.http_events.drain(..).map(Event::Http));
        out.extend(self.db_events.drain(..).map(Event::Db));
    }

    /// Picks a parser once the buffered bytes allow it.
    fn decide(&self) -> Option<(Parser, Option<Direction>)> {
        let State::Detecting(chunks) = &self.state else {
            return None;
        };
        let db = &self.opts.db;
        let mut undecided = false;
        for dir in [Direction::Egress, Direction::Ingress] {
            // Usually one piece so far: read in place, not joined byte by byte.
            let mut pieces = chunks.iter().filter(|c| c.dir == dir);
            let Some(one) = pieces.next() else {
                continue;
            };
            let joined: Vec<u8>;
            let first = match pieces.next() {
                None => &one.bytes[..one.bytes.len().min(DETECT_BYTES)],
                Some(two) => {
                    joined = [one, two]
                        .into_iter()
                        .chain(pieces)
                        .flat_map(|c| c.bytes.iter().copied())
                        .take(DETECT_BYTES)
                        .collect();
                    &joined[..]
                }
            };
            if first.is_empty() {
                continue;
            }
            for (detect, protocol) in DETECTORS {
                match detect(dir, first) {
                    Detect::Yes { requests } => {
                        return Some((self.db_parser(protocol, db, true), Some(requests)));
                    }
                    Detect::NeedMore => undecided = true,
                    Detect::No => {}
                }
            }
        }
        let buffered: usize = chunks.iter().map(|c| c.bytes.len()).sum();
        if undecided && chunks.len() < DETECT_CHUNKS && buffered < 4 * DETECT_BYTES {
            return None;
        }
        if !self.from_start {
            return Some(self.by_port());
        }
        Some((
            Parser::Http(HttpConn::new(Arc::clone(&self.opts.http), true)),
            None,
        ))
    }

    /// A connection first seen mid-stream whose first bytes are no opening
    /// message (those are recognised above: a process that inherited an
    /// accepted socket, such as a PostgreSQL backend forked by the
    /// postmaster, still starts at the beginning): the server's well-known
    /// port decides, else HTTP, which finds a request line on its own.
    fn by_port(&self) -> (Parser, Option<Direction>) {
        let db = &self.opts.db;
        let (local, remote) = self.ports;
        let port_of = |p: u16| match p {
            5432 => Some(Protocol::Postgres),
            3306 => Some(Protocol::Mysql),
            6379 => Some(Protocol::Redis),
            _ => None,
        };
        match (port_of(remote), port_of(local)) {
            (Some(protocol), _) => (self.db_parser(protocol, db, false), Some(Direction::Egress)),
            (None, Some(protocol)) => (
                self.db_parser(protocol, db, false),
                Some(Direction::Ingress),
            ),
            (None, None) => (
                Parser::Http(HttpConn::new(Arc::clone(&self.opts.http), false)),
                None,
            ),
        }
    }

    fn db_parser(&self, protocol: Protocol, db: &Arc<DbOptions>, from_start: bool) -> Parser {
        let db = Arc::clone(db);
        match protocol {
            Protocol::Postgres => Parser::Postgres(PostgresConn::new(db, from_start)),
            Protocol::Mysql => Parser::Mysql(MysqlConn::new(db, from_start)),
            Protocol::Redis => Parser::Redis(RedisConn::new(db, from_start)),
            Protocol::Http => Parser::Http(HttpConn::new(Arc::clone(&self.opts.http), from_start)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::http::Exchange;

    fn session(from_start: bool, remote: &str) -> Session {
        let remote: std::net::SocketAddr = remote.parse().unwrap();
        Session::new(Options::default(), from_start, (40000, remote.port()))
    }

    fn feed(s: &mut Session, dir: Direction, bytes: &[u8]) -> Vec<Event> {
        let mut out = Vec::new();
        s.feed(dir, Moment::default(), bytes, 0, &mut out);
        out
    }

    #[test]
    fn http_is_recognised_and_nothing_is_lost_to_detection() {
        let mut s = session(true, "127.0.0.1:8080");
        let events = feed(
            &mut s,
            Direction::Egress,
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        );
        assert_eq!(s.protocol(), Some(Protocol::Http));
        assert!(matches!(events[..], [Event::Http(HttpEvent::Request(_))]));
        let events = feed(
            &mut s,
            Direction::Ingress,
            b"HTTP/1.1 204 No Content\r\n\r\n",
        );
        assert!(matches!(events[..], [Event::Http(HttpEvent::Exchange(_))]));
    }

    #[test]
    fn garbage_ends_as_not_http() {
        let mut s = session(true, "127.0.0.1:9999");
        let mut events = feed(
            &mut s,
            Direction::Egress,
            &[0xde, 0xad, 0xbe, 0xef, 0, 1, 2],
        );
        for _ in 0..DETECT_CHUNKS {
            events.extend(feed(&mut s, Direction::Egress, &[0xff; 3]));
        }
        assert_eq!(s.protocol(), Some(Protocol::Http));
        assert!(events.contains(&Event::Http(HttpEvent::NotHttp)));
    }

    const CLIENT_HELLO: &[u8] = b"\x16\x03\x01\x00\xf8\x01\x00\x00\xf4\x03\x03";
    const APP_DATA: &[u8] = b"\x17\x03\x03\x00\x20\xaa\xbb";

    fn plain(s: &mut Session, dir: Direction, bytes: &[u8]) -> Vec<Event> {
        let mut out = Vec::new();
        s.feed_plaintext(dir, Moment::default(), bytes, 0, &mut out);
        out
    }

    #[test]
    fn https_ciphertext_is_dropped_and_plaintext_parsed() {
        let mut s = session(true, "127.0.0.1:443");
        assert!(feed(&mut s, Direction::Egress, CLIENT_HELLO).is_empty());
        assert_eq!(s.tls(), Tls::Ciphertext);
        assert_eq!(s.protocol(), None, "no protocol from ciphertext");
        let events = plain(
            &mut s,
            Direction::Egress,
            b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n",
        );
        assert!(matches!(events[..], [Event::Http(HttpEvent::Request(_))]));
        // Ciphertext the kernel sent after all (outside a library call).
        assert!(feed(&mut s, Direction::Ingress, APP_DATA).is_empty());
        let events = plain(
            &mut s,
            Direction::Ingress,
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        );
        assert!(matches!(events[..], [Event::Http(HttpEvent::Exchange(_))]));
        assert_eq!(s.tls(), Tls::Plaintext);
    }

    #[test]
    fn encrypted_without_plaintext_yields_nothing() {
        let mut s = session(true, "127.0.0.1:443");
        let mut events = feed(&mut s, Direction::Egress, CLIENT_HELLO);
        events.extend(feed(
            &mut s,
            Direction::Ingress,
            b"\x16\x03\x03\x00\x7a\x02",
        ));
        events.extend(feed(&mut s, Direction::Egress, APP_DATA));
        let mut out = Vec::new();
        s.close(Moment::default(), &mut out);
        events.extend(out);
        assert!(events.is_empty(), "{events:?}");
        assert_eq!(s.tls(), Tls::Ciphertext);
    }

    #[test]
    fn postgres_switches_to_tls_and_goes_on_in_plaintext() {
        let mut s = session(true, "127.0.0.1:5432");
        let ssl_request = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        feed(&mut s, Direction::Egress, &ssl_request);
        feed(&mut s, Direction::Ingress, b"S");
        assert_eq!(s.protocol(), Some(Protocol::Postgres));
        feed(&mut s, Direction::Egress, CLIENT_HELLO);
        assert_eq!(s.tls(), Tls::Ciphertext);
        let mut startup = Vec::new();
        let body = b"\0\x03\0\0user\0u\0database\0shop\0\0";
        startup.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        startup.extend_from_slice(body);
        plain(&mut s, Direction::Egress, &startup);
        let ready = b"Z\0\0\0\x05I";
        let auth_ok = b"R\0\0\0\x08\0\0\0\0";
        plain(&mut s, Direction::Ingress, &[&auth_ok[..], ready].concat());
        let events = plain(&mut s, Direction::Egress, b"Q\0\0\0\x0dSELECT 1\0");
        assert!(
            matches!(events[..], [Event::Db(DbEvent::Request { .. })]),
            "{events:?}"
        );
        let complete = b"C\0\0\0\x0dSELECT 1\0";
        let events = plain(&mut s, Direction::Ingress, &[&complete[..], ready].concat());
        let [Event::Db(DbEvent::Call(call))] = &events[..] else {
            panic!("one call: {events:?}");
        };
        assert_eq!(call.namespace.as_deref(), Some("shop"));
    }

    #[test]
    fn garbage_or_truncated_plaintext_is_not_a_span() {
        let mut s = session(true, "127.0.0.1:443");
        feed(&mut s, Direction::Egress, CLIENT_HELLO);
        let mut events = plain(&mut s, Direction::Egress, &[0x00, 0xff, 0x13, 0x37, 0x42]);
        for _ in 0..DETECT_CHUNKS {
            events.extend(plain(&mut s, Direction::Egress, b"\xfe\xed"));
        }
        assert!(
            events.contains(&Event::Http(HttpEvent::NotHttp)),
            "{events:?}"
        );
        // A request cut short by the connection's end: reported unanswered
        // (an error span), no response made up.
        let mut s = session(true, "127.0.0.1:443");
        feed(&mut s, Direction::Egress, CLIENT_HELLO);
        let mut events = plain(&mut s, Direction::Egress, b"GET /x HTTP/1.1\r\nHo");
        let mut out = Vec::new();
        s.close(Moment::default(), &mut out);
        events.extend(out);
        let exchanges: Vec<&Exchange> = events
            .iter()
            .filter_map(|e| match e {
                Event::Http(HttpEvent::Exchange(x)) => Some(x),
                _ => None,
            })
            .collect();
        assert_eq!(exchanges.len(), 1, "{events:?}");
        assert!(exchanges[0].response.is_none() && exchanges[0].request.head_truncated);
    }

    #[test]
    fn tls_looking_bytes_inside_clear_text_are_clear_text() {
        let mut s = session(true, "127.0.0.1:8080");
        feed(
            &mut s,
            Direction::Egress,
            b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n",
        );
        // A body chunk that happens to start like a TLS record.
        feed(&mut s, Direction::Egress, CLIENT_HELLO);
        assert_eq!(s.tls(), Tls::None);
        let events = feed(
            &mut s,
            Direction::Ingress,
            b"HTTP/1.1 204 No Content\r\n\r\n",
        );
        assert!(matches!(events[..], [Event::Http(HttpEvent::Exchange(_))]));
    }

    #[test]
    fn mid_stream_connections_go_by_well_known_port() {
        let mut s = session(false, "127.0.0.1:6379");
        feed(&mut s, Direction::Egress, b"*1\r\n$4\r\nPING\r\n");
        assert_eq!(s.protocol(), Some(Protocol::Redis));
        assert_eq!(s.request_direction(), Some(Direction::Egress));
        let mut s = session(false, "127.0.0.1:51000");
        feed(&mut s, Direction::Ingress, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(s.protocol(), Some(Protocol::Http));
    }
}
