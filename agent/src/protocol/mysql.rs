//! MySQL / MariaDB client/server protocol: a pure, incremental parser for the
//! two byte streams of one TCP connection.
//!
//! [`MysqlConn::feed`] takes the bytes of one syscall at a time, in order, in
//! either direction, and appends [`DbEvent`]s: a `Request` as soon as a
//! command packet is complete, a `Call` when its response has ended.
//!
//! Each direction is cut into packets (3-byte little-endian length, 1-byte
//! sequence number, payload; a payload of 0xffffff bytes continues in the next
//! packet). Only a bounded prefix of each logical payload is kept: 64 KiB of
//! SQL text, a few hundred bytes of anything else, 32 bytes of a row. Result
//! sets are never buffered. On top of the packets, the connection follows:
//!
//! * the handshake: the server's greeting (protocol 10) decides the roles; the
//!   client's HandshakeResponse41 gives the capabilities both agreed on and the
//!   initial database. After an SSLRequest, TLS follows: the session keeps
//!   the ciphertext away and hands on the plaintext from the TLS probes, in
//!   which the HandshakeResponse comes with sequence number 2. Agreed
//!   compression makes the connection [`DbEvent::Skip`]. Auth switch / more-data packets are
//!   passed over until the server's OK or ERR; the handshake is not a call.
//! * commands, one call each: a command is a packet with sequence number 0 in
//!   the request direction; packets with other numbers are the rest of an
//!   exchange (auth data, LOAD DATA LOCAL file contents) and are ignored.
//! * responses, walked with a small state machine per expected shape: one
//!   packet (OK / ERR / EOF / text), result sets (column count, column
//!   definitions, EOF unless CLIENT_DEPRECATE_EOF, rows, a 0xfe terminator,
//!   again while SERVER_MORE_RESULTS_EXISTS), COM_STMT_PREPARE_OK with its
//!   parameter and column definitions, and auth exchanges (COM_CHANGE_USER).
//!   MariaDB's metadata-skipping column count (MARIADB_CLIENT_CACHE_METADATA)
//!   and progress reports (ERR 0xffff) are understood.
//!
//! Naming, where the conventions leave it open:
//!
//! * COM_QUERY: operation, collection and db.query.text from
//!   [`super::sql::summarize`] (raw text, capped, when `sanitize` is off).
//! * COM_INIT_DB: operation `USE`, namespace = the database it selects; once
//!   OK'd that database is the namespace of later calls. A `USE db` sent as
//!   COM_QUERY, COM_CHANGE_USER, and a schema change reported by session
//!   tracking in any OK packet do the same.
//! * COM_STMT_PREPARE is a call (it is a round trip and fails on bad SQL):
//!   operation `PREPARE`, collection and text of the statement. Its OK maps
//!   the statement id to the statement (at most `max_statements` per
//!   connection, oldest forgotten first; COM_STMT_CLOSE forgets one).
//! * COM_STMT_EXECUTE (and MariaDB's COM_STMT_BULK_EXECUTE): operation,
//!   collection and text of the prepared statement; `EXECUTE` when it was
//!   prepared before tracing began. Statement id 0xffffffff (MariaDB: the
//!   statement prepared last, pipelined PREPARE + EXECUTE) is understood.
//!   Parameters are never read.
//! * Other commands that get a response are calls named after the command
//!   without `COM_`: `PING`, `STMT_RESET`, `STMT_FETCH` (these two carry
//!   their statement's collection and text), `FIELD_LIST` (collection: the
//!   table), `STATISTICS`, `CHANGE_USER`, `RESET_CONNECTION`, `SET_OPTION` …
//! * COM_QUIT, COM_STMT_CLOSE and COM_STMT_SEND_LONG_DATA get no response and
//!   are not calls. COM_BINLOG_DUMP(_GTID) turns the connection into a
//!   replication stream: Skip.
//! * A call's namespace is the database in effect when its response ends.
//!
//! Losing track: a capture gap (`missing`) inside a packet is skipped — its
//! length is known. A gap that hides a packet header loses that direction,
//! and so does a packet out of sequence (bytes lost without notice): client
//! packets are commands (sequence 0, a known command byte) or continue the
//! current exchange; response packets number on from their command.
//! The request direction resynchronises on a later syscall that starts with
//! a plausible command packet (sequence 0, COM_QUERY / COM_STMT_PREPARE /
//! COM_STMT_EXECUTE / COM_INIT_DB / COM_PING / COM_QUIT, sane length and
//! first bytes). The response direction, when lost, keeps the calls it was
//! answering until the client sends its next command (MySQL clients wait for
//! the whole response first): they then end, without a status, at the last
//! response syscall seen; and the first response syscall after that command
//! is taken as the start of its response if it looks like one (sequence 1, a
//! first byte that fits). Each regained direction counts a resync.
//!
//! A connection seen mid-stream (`from_start == false`) has unknown roles:
//! both directions are skipped until a syscall consists of whole, plausible
//! command packets (sequence 0, known command bytes, lengths adding up to the
//! syscall exactly); the other direction then syncs as above. Capabilities
//! are then unknown: CLIENT_DEPRECATE_EOF is learnt from the first result set.
//! After 1 MiB without such a syscall the connection is skipped.
//!
//! Nothing here panics on any input, and memory per connection is bounded: a
//! packet prefix per direction, at most `max_pending` waiting calls and
//! `max_statements` remembered statements.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use agent_common::Direction;

use super::db::{DbCall, DbCounters, DbEvent, DbOptions, Detect, Moment};

/// A payload of this length continues in the next packet.
const MAX_PACKET: u32 = 0x00ff_ffff;
/// Most SQL text read from a command (the rest is skipped; the prefix is
/// summarized).
const MAX_SQL_READ: usize = 64 * 1024;
/// Kept of a handshake packet (user, auth data and database come first).
const KEEP_HANDSHAKE: usize = 4096;
/// Kept of a response packet that may be OK / ERR / COM_STMT_PREPARE_OK.
const KEEP_RESPONSE: usize = 1024;
/// Kept of rows, column definitions and fixed-size commands.
const KEEP_SMALL: usize = 32;
/// A packet buffer that grew beyond this is released after use.
const KEEP_BUF_CAPACITY: usize = 4096;
/// Bounds of a server greeting's payload length.
const GREETING_MIN: u32 = 16;
const GREETING_MAX: u32 = 1024;
const MAX_VERSION_LEN: usize = 96;
/// Bytes of a mid-stream connection searched for a command before Skip.
const HUNT_BUDGET: u64 = 1 << 20;
/// Longest database name kept (64 characters of up to 4 bytes).
const MAX_DB_NAME: usize = 256;
/// Pipelined commands checked when hunting for the client side.
const HUNT_MAX_PACKETS: usize = 64;

// Capability flags (the MariaDB extension occupies bits 32..64).
const CLIENT_MYSQL: u64 = 1;
const CLIENT_CONNECT_WITH_DB: u64 = 1 << 3;
const CLIENT_COMPRESS: u64 = 1 << 5;
const CLIENT_PROTOCOL_41: u64 = 1 << 9;
const CLIENT_SSL: u64 = 1 << 11;
const CLIENT_SECURE_CONNECTION: u64 = 1 << 15;
const CLIENT_PLUGIN_AUTH_LENENC_DATA: u64 = 1 << 21;
const CLIENT_SESSION_TRACK: u64 = 1 << 23;
const CLIENT_DEPRECATE_EOF: u64 = 1 << 24;
const CLIENT_ZSTD_COMPRESSION: u64 = 1 << 26;
const CLIENT_QUERY_ATTRIBUTES: u64 = 1 << 27;

// Server status flags.
const SERVER_MORE_RESULTS_EXISTS: u16 = 0x0008;
const SERVER_STATUS_CURSOR_EXISTS: u16 = 0x0040;
const SERVER_SESSION_STATE_CHANGED: u16 = 0x4000;
/// Session tracker entry: the current schema changed.
const SESSION_TRACK_SCHEMA: u8 = 1;

// Commands.
const COM_QUIT: u8 = 0x01;
const COM_INIT_DB: u8 = 0x02;
const COM_QUERY: u8 = 0x03;
const COM_FIELD_LIST: u8 = 0x04;
const COM_PROCESS_INFO: u8 = 0x0a;
const COM_PING: u8 = 0x0e;
const COM_CHANGE_USER: u8 = 0x11;
const COM_BINLOG_DUMP: u8 = 0x12;
const COM_STMT_PREPARE: u8 = 0x16;
const COM_STMT_EXECUTE: u8 = 0x17;
const COM_STMT_SEND_LONG_DATA: u8 = 0x18;
const COM_STMT_CLOSE: u8 = 0x19;
const COM_STMT_RESET: u8 = 0x1a;
const COM_STMT_FETCH: u8 = 0x1c;
const COM_BINLOG_DUMP_GTID: u8 = 0x1e;
const COM_STMT_BULK_EXECUTE: u8 = 0xfa;

/// MariaDB: COM_STMT_EXECUTE of the statement prepared last.
const LAST_STATEMENT: u32 = 0xffff_ffff;

/// db.operation.name of the commands that are neither SQL nor statements.
fn command_name(cmd: u8) -> Option<&'static str> {
    Some(match cmd {
        0x00 => "SLEEP",
        0x04 => "FIELD_LIST",
        0x05 => "CREATE_DB",
        0x06 => "DROP_DB",
        0x07 => "REFRESH",
        0x08 => "SHUTDOWN",
        0x09 => "STATISTICS",
        0x0a => "PROCESS_INFO",
        0x0b => "CONNECT",
        0x0c => "PROCESS_KILL",
        0x0d => "DEBUG",
        0x0e => "PING",
        0x0f => "TIME",
        0x10 => "DELAYED_INSERT",
        0x11 => "CHANGE_USER",
        0x13 => "TABLE_DUMP",
        0x14 => "CONNECT_OUT",
        0x15 => "REGISTER_SLAVE",
        0x1a => "STMT_RESET",
        0x1b => "SET_OPTION",
        0x1c => "STMT_FETCH",
        0x1d => "DAEMON",
        0x1f => "RESET_CONNECTION",
        _ => return None,
    })
}

// --- detection ------------------------------------------------------------------

/// Recognises a server greeting (HandshakeV10) in the first bytes seen in
/// direction `dir`: a packet with sequence number 0 and a payload length of
/// 16..=1024 whose payload is protocol version 10, a NUL-terminated server
/// version of printable ASCII starting with a digit (at most 96 bytes), then
/// a connection id, 8 bytes of auth data and a zero filler (checked when
/// present). Requests then flow the other way.
pub fn detect(dir: Direction, first: &[u8]) -> Detect {
    match greeting_prefix(first) {
        Some(true) => Detect::Yes {
            requests: opposite(dir),
        },
        Some(false) => Detect::NeedMore,
        None => Detect::No,
    }
}

/// Some(true): a greeting; Some(false): a prefix of one; None: not one.
fn greeting_prefix(b: &[u8]) -> Option<bool> {
    // Payload length in GREETING_MIN..=GREETING_MAX (so its top byte is 0).
    if b.get(1).is_some_and(|&x| u32::from(x) > GREETING_MAX >> 8)
        || b.get(2).is_some_and(|&x| x != 0)
    {
        return None;
    }
    let len = if b.len() >= 3 {
        let len = u24(b);
        if !(GREETING_MIN..=GREETING_MAX).contains(&len) {
            return None;
        }
        len as usize
    } else {
        GREETING_MAX as usize
    };
    if b.get(3).is_some_and(|&s| s != 0) || b.get(4).is_some_and(|&v| v != 10) {
        return None;
    }
    let payload = b.get(4..).unwrap_or_default();
    let payload = &payload[..payload.len().min(len)];
    let version = payload.get(1..).unwrap_or_default();
    let mut vlen = 0;
    for &c in version {
        if c == 0 {
            break;
        }
        let ok = if vlen == 0 {
            c.is_ascii_digit()
        } else {
            (0x20..0x7f).contains(&c)
        };
        if !ok || vlen >= MAX_VERSION_LEN {
            return None;
        }
        vlen += 1;
    }
    // protocol, version, NUL, connection id (4), auth data (8), filler (1)
    let fixed = 1 + vlen + 1 + 4 + 8 + 1;
    if fixed > len {
        return None;
    }
    if vlen == version.len() {
        return Some(false);
    }
    if vlen == 0 {
        return None;
    }
    // The filler is checked when it was seen (callers may pass only the
    // first 64 bytes; a long version string pushes it beyond).
    match payload.get(fixed - 1) {
        None | Some(0) => Some(true),
        Some(_) => None,
    }
}

fn opposite(dir: Direction) -> Direction {
    match dir {
        Direction::Egress => Direction::Ingress,
        Direction::Ingress => Direction::Egress,
    }
}

fn index(dir: Direction) -> usize {
    match dir {
        Direction::Egress => 0,
        Direction::Ingress => 1,
    }
}

// --- small readers ------------------------------------------------------------

fn u24(b: &[u8]) -> u32 {
    u32::from(b[0]) | u32::from(b[1]) << 8 | u32::from(b[2]) << 16
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// A length-encoded integer at `*pos` (0xfb, NULL, reads as 0).
fn lenenc(b: &[u8], pos: &mut usize) -> Option<u64> {
    let first = *b.get(*pos)?;
    let width = match first {
        0..=0xfa => {
            *pos += 1;
            return Some(u64::from(first));
        }
        0xfb => {
            *pos += 1;
            return Some(0);
        }
        0xfc => 2,
        0xfd => 3,
        0xfe => 8,
        0xff => return None,
    };
    let bytes = b.get(*pos + 1..*pos + 1 + width)?;
    *pos += 1 + width;
    Some(
        bytes
            .iter()
            .rev()
            .fold(0u64, |acc, &x| acc << 8 | u64::from(x)),
    )
}

/// A length-encoded string at `*pos`.
fn lenenc_bytes<'a>(b: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let len = usize::try_from(lenenc(b, pos)?).ok()?;
    let end = pos.checked_add(len)?;
    let s = b.get(*pos..end)?;
    *pos = end;
    Some(s)
}

/// A NUL-terminated string at `*pos` (or the rest, when cut before the NUL).
fn nul_str<'a>(b: &'a [u8], pos: &mut usize) -> &'a [u8] {
    let rest = b.get(*pos..).unwrap_or_default();
    match rest.iter().position(|&c| c == 0) {
        Some(n) => {
            *pos += n + 1;
            &rest[..n]
        }
        None => {
            *pos = b.len();
            rest
        }
    }
}

/// `b` without a UTF-8 sequence cut at its end.
fn trim_partial_char(b: &[u8]) -> &[u8] {
    for back in 1..=3.min(b.len()) {
        let c = b[b.len() - back];
        if c & 0xc0 == 0x80 {
            continue;
        }
        let need = match c {
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => 1,
        };
        return if need > back { &b[..b.len() - back] } else { b };
    }
    b
}

fn text(b: &[u8]) -> Cow<'_, str> {
    super::utf8_lossy(trim_partial_char(b))
}

/// `s` cut to at most `max` bytes on a char boundary.
fn cap_str(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn db_name(b: &[u8]) -> Option<String> {
    let name = cap_str(&text(b), MAX_DB_NAME);
    (!name.is_empty()).then_some(name)
}

// --- packets and responses ----------------------------------------------------------

/// One complete logical packet (a prefix of its payload).
struct Packet<'a> {
    seq: u8,
    /// Sequence number of its last physical packet.
    last_seq: u8,
    /// Length of its first physical packet (0xffffff: more followed).
    first_len: u32,
    /// Whole logical payload length.
    len: u64,
    /// The kept prefix of the payload.
    data: &'a [u8],
    /// Bytes of the kept prefix were not captured.
    cut: bool,
    /// Moments of the syscalls carrying its first and last byte.
    start: Moment,
    end: Moment,
}

impl Packet<'_> {
    fn first(&self) -> Option<u8> {
        self.data.first().copied()
    }

    fn is_err(&self) -> bool {
        self.first() == Some(0xff)
    }

    /// MariaDB progress report: an ERR packet with code 0xffff.
    fn is_progress(&self) -> bool {
        self.data.starts_with(&[0xff, 0xff, 0xff])
    }

    /// An EOF packet (protocol 4.1: exactly 5 bytes).
    fn is_eof5(&self) -> bool {
        self.first() == Some(0xfe) && self.len == 5
    }

    /// EOF, or OK with a 0xfe header, ending rows.
    fn is_terminator(&self) -> bool {
        self.first() == Some(0xfe) && self.first_len < MAX_PACKET
    }

    fn err_code(&self) -> Option<u16> {
        u16_at(self.data, 1)
    }
}

/// What an OK packet says (best effort on a cut prefix).
#[derive(Debug, Default)]
struct OkInfo {
    status: u16,
    schema: Option<String>,
}

/// OK packet (header 0x00 or 0xfe): affected rows, last insert id, status,
/// warnings, then with session tracking an info string and state changes.
fn parse_ok(d: &[u8], session_track: Option<bool>) -> OkInfo {
    let mut info = OkInfo::default();
    let mut p = 1;
    if lenenc(d, &mut p).is_none() || lenenc(d, &mut p).is_none() {
        return info;
    }
    let Some(status) = u16_at(d, p) else {
        return info;
    };
    info.status = status;
    p += 4;
    if status & SERVER_SESSION_STATE_CHANGED == 0 || session_track == Some(false) {
        return info;
    }
    if lenenc_bytes(d, &mut p).is_none() {
        return info;
    }
    let Some(state) = lenenc_bytes(d, &mut p) else {
        return info;
    };
    let mut q = 0;
    while q < state.len() {
        let kind = state[q];
        q += 1;
        let Some(entry) = lenenc_bytes(state, &mut q) else {
            break;
        };
        if kind == SESSION_TRACK_SCHEMA {
            let mut r = 0;
            if let Some(name) = lenenc_bytes(entry, &mut r) {
                info.schema = db_name(name);
            }
        }
    }
    info
}

/// Status flags of a packet ending rows: EOF (5 bytes) or OK with 0xfe.
fn terminator_status(pkt: &Packet<'_>, session_track: Option<bool>) -> OkInfo {
    if pkt.len == 5 {
        OkInfo {
            status: u16_at(pkt.data, 3).unwrap_or(0),
            schema: None,
        }
    } else if pkt.len < 5 {
        OkInfo::default()
    } else {
        parse_ok(pkt.data, session_track)
    }
}

/// The shape of the response a command gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// One packet: OK, ERR, EOF or a string (COM_STATISTICS).
    Simple,
    /// OK, ERR, LOCAL INFILE request or result sets.
    Results,
    /// Rows (or column definitions) up to a 0xfe terminator.
    Rows,
    /// COM_STMT_PREPARE_OK and its definitions, or ERR.
    Prepare,
    /// Auth switch / more data packets up to OK or ERR.
    Auth,
}

/// Where a response is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RState {
    Start,
    /// Column definitions still to come (never 0).
    Defs(u64),
    /// The EOF after column definitions.
    DefsEof,
    Rows,
    /// COM_STMT_PREPARE: parameter definitions still to come (never 0).
    PrepParams {
        left: u16,
        cols: u16,
    },
    PrepParamsEof {
        cols: u16,
    },
    /// Column definitions still to come (never 0).
    PrepCols {
        left: u16,
    },
    PrepColsEof,
}

/// How the response ended.
#[derive(Debug, Default)]
struct Outcome {
    error: bool,
    code: Option<u16>,
    /// A schema reported by session tracking.
    schema: Option<String>,
}

impl Outcome {
    fn ok(info: OkInfo) -> Self {
        Self {
            schema: info.schema,
            ..Self::default()
        }
    }

    fn err(pkt: &Packet<'_>) -> Self {
        Self {
            error: true,
            code: pkt.err_code(),
            ..Self::default()
        }
    }
}

enum Step {
    Continue(RState),
    End(Outcome),
    /// The call ended with its previous packet; this one is the next call's.
    EndBefore,
    /// The packet does not fit: lose the response direction.
    Lost,
}

/// What the connection learnt from the capabilities.
#[derive(Debug, Clone, Copy, Default)]
struct Caps {
    /// Capabilities both sides agreed on (when the handshake was seen).
    agreed: Option<u64>,
    /// CLIENT_DEPRECATE_EOF, agreed or learnt from a result set.
    deprecate_eof: Option<bool>,
}

impl Caps {
    fn has(&self, flag: u64) -> Option<bool> {
        self.agreed.map(|c| c & flag != 0)
    }
}

/// Advances a response by one packet.
fn response_step(
    expect: Expect,
    mut state: RState,
    pkt: &Packet<'_>,
    caps: &mut Caps,
    stmt_id: &mut Option<u32>,
) -> Step {
    let session = caps.has(CLIENT_SESSION_TRACK);
    if pkt.is_progress() {
        return Step::Continue(state);
    }
    // A packet that may have to be looked at again in the next state.
    loop {
        let next = match (expect, state) {
            (Expect::Simple, _) => match pkt.first() {
                Some(0xff) => Step::End(Outcome::err(pkt)),
                Some(0x00) => Step::End(Outcome::ok(parse_ok(pkt.data, session))),
                _ => Step::End(Outcome::default()),
            },
            (Expect::Auth, _) => match pkt.first() {
                Some(0xff) => Step::End(Outcome::err(pkt)),
                Some(0x00) => Step::End(Outcome::ok(parse_ok(pkt.data, session))),
                _ => Step::Continue(RState::Start),
            },
            (Expect::Prepare, RState::Start) => match pkt.first() {
                Some(0xff) => Step::End(Outcome::err(pkt)),
                Some(0x00) if pkt.data.len() >= 9 => {
                    *stmt_id = u32_at(pkt.data, 1);
                    let (mut cols, mut params) = (
                        u16_at(pkt.data, 5).unwrap_or(0),
                        u16_at(pkt.data, 7).unwrap_or(0),
                    );
                    // MySQL CLIENT_OPTIONAL_RESULTSET_METADATA: metadata_follows.
                    if pkt.data.get(12) == Some(&0) {
                        (cols, params) = (0, 0);
                    }
                    if params > 0 {
                        Step::Continue(RState::PrepParams { left: params, cols })
                    } else {
                        prep_cols(cols)
                    }
                }
                _ => Step::Lost,
            },
            (Expect::Prepare, RState::PrepParams { left, cols }) => {
                if pkt.is_err() {
                    Step::End(Outcome::err(pkt))
                } else if left > 1 {
                    Step::Continue(RState::PrepParams {
                        left: left - 1,
                        cols,
                    })
                } else if caps.deprecate_eof == Some(true) {
                    prep_cols(cols)
                } else {
                    Step::Continue(RState::PrepParamsEof { cols })
                }
            }
            (Expect::Prepare, RState::PrepParamsEof { cols }) => {
                if pkt.is_eof5() || caps.deprecate_eof == Some(false) {
                    caps.deprecate_eof = Some(false);
                    prep_cols(cols)
                } else {
                    // No EOF after the definitions: CLIENT_DEPRECATE_EOF.
                    caps.deprecate_eof = Some(true);
                    if cols == 0 {
                        Step::EndBefore
                    } else {
                        state = RState::PrepCols { left: cols };
                        continue;
                    }
                }
            }
            (Expect::Prepare, RState::PrepCols { left }) => {
                if pkt.is_err() {
                    Step::End(Outcome::err(pkt))
                } else if left > 1 {
                    Step::Continue(RState::PrepCols { left: left - 1 })
                } else if caps.deprecate_eof == Some(true) {
                    Step::End(Outcome::default())
                } else {
                    Step::Continue(RState::PrepColsEof)
                }
            }
            (Expect::Prepare, RState::PrepColsEof) => {
                if pkt.is_eof5() || caps.deprecate_eof == Some(false) {
                    caps.deprecate_eof = Some(false);
                    Step::End(Outcome::default())
                } else {
                    caps.deprecate_eof = Some(true);
                    Step::EndBefore
                }
            }
            (Expect::Prepare, _) => Step::Lost,
            (Expect::Results | Expect::Rows, RState::Start) => match pkt.first() {
                None => Step::Lost,
                Some(0x00) => {
                    let info = parse_ok(pkt.data, session);
                    if info.status & SERVER_MORE_RESULTS_EXISTS != 0 {
                        Step::Continue(RState::Start)
                    } else {
                        Step::End(Outcome::ok(info))
                    }
                }
                Some(0xff) => Step::End(Outcome::err(pkt)),
                // LOCAL INFILE: the client sends the file, then OK or ERR.
                Some(0xfb) => Step::Continue(RState::Start),
                Some(0xfe) => rows_end(pkt, session),
                Some(_) => {
                    let mut p = 0;
                    match lenenc(pkt.data, &mut p) {
                        Some(n) if n > 0 => {
                            // MariaDB cache metadata / MySQL optional metadata:
                            // a flag byte after the count; 0 = no definitions.
                            if pkt.data.get(p) == Some(&0) {
                                Step::Continue(after_defs(caps))
                            } else {
                                Step::Continue(RState::Defs(n))
                            }
                        }
                        _ => Step::Lost,
                    }
                }
            },
            (Expect::Results | Expect::Rows, RState::Defs(n)) => {
                if pkt.is_err() {
                    Step::End(Outcome::err(pkt))
                } else if n > 1 {
                    Step::Continue(RState::Defs(n - 1))
                } else {
                    Step::Continue(after_defs(caps))
                }
            }
            (Expect::Results | Expect::Rows, RState::DefsEof) => {
                if pkt.is_err() {
                    Step::End(Outcome::err(pkt))
                } else if pkt.is_eof5() || caps.deprecate_eof == Some(false) {
                    caps.deprecate_eof = Some(false);
                    let status = u16_at(pkt.data, 3).unwrap_or(0);
                    if status & SERVER_STATUS_CURSOR_EXISTS != 0 {
                        // A cursor: the rows come with COM_STMT_FETCH.
                        Step::End(Outcome::default())
                    } else {
                        Step::Continue(RState::Rows)
                    }
                } else {
                    caps.deprecate_eof = Some(true);
                    state = RState::Rows;
                    continue;
                }
            }
            (Expect::Results | Expect::Rows, RState::Rows) => {
                if pkt.is_terminator() {
                    rows_end(pkt, session)
                } else if pkt.is_err() {
                    Step::End(Outcome::err(pkt))
                } else {
                    Step::Continue(RState::Rows)
                }
            }
            (Expect::Results | Expect::Rows, _) => Step::Lost,
        };
        return next;
    }
}

fn after_defs(caps: &Caps) -> RState {
    if caps.deprecate_eof == Some(true) {
        RState::Rows
    } else {
        RState::DefsEof
    }
}

fn prep_cols(cols: u16) -> Step {
    if cols > 0 {
        Step::Continue(RState::PrepCols { left: cols })
    } else {
        Step::End(Outcome::default())
    }
}

fn rows_end(pkt: &Packet<'_>, session: Option<bool>) -> Step {
    let info = terminator_status(pkt, session);
    if info.status & SERVER_MORE_RESULTS_EXISTS != 0 {
        Step::Continue(RState::Start)
    } else {
        Step::End(Outcome::ok(info))
    }
}

// --- plausibility checks for (re)synchronisation ---------------------------------

fn plausible_sql_start(c: u8) -> bool {
    c.is_ascii_alphabetic()
        || c.is_ascii_whitespace()
        || matches!(c, b'(' | b'/' | b'-' | b'#' | b'{')
}

fn is_command(b: u8) -> bool {
    b <= 0x1f || b == COM_STMT_BULK_EXECUTE
}

/// `b` starts with a command packet a client plausibly sends.
fn plausible_command(b: &[u8]) -> bool {
    if b.len() < 5 || b[3] != 0 {
        return false;
    }
    let len = u24(b) as usize;
    let body = &b[5..];
    match b[4] {
        COM_QUIT | COM_PING => len == 1,
        COM_INIT_DB => {
            (2..=MAX_DB_NAME + 1).contains(&len)
                && body.iter().take(len - 1).all(|&c| c >= 0x20 && c != 0x7f)
        }
        COM_QUERY | COM_STMT_PREPARE => {
            len >= 2
                && match body.first() {
                    None => true,
                    Some(&c) if plausible_sql_start(c) => true,
                    // MySQL query attributes: no parameters, one set.
                    Some(0) => b[4] == COM_QUERY && body.get(1).is_none_or(|&c| c == 1),
                    Some(_) => false,
                }
        }
        COM_STMT_EXECUTE => {
            len >= 10
                && body.get(4).is_none_or(|&f| f & !0x0f == 0)
                && body.get(5..9).is_none_or(|n| n == [1, 0, 0, 0])
        }
        _ => false,
    }
}

/// A syscall that consists of whole command packets, the first plausible.
fn hunt_match(b: &[u8], missing: u64) -> bool {
    if !plausible_command(b) {
        return false;
    }
    let total = b.len() as u64 + missing;
    let mut off = 0u64;
    for k in 0..HUNT_MAX_PACKETS {
        let Some(rest) = b.get(off as usize..) else {
            return false;
        };
        if rest.len() < 5 || rest[3] != 0 {
            return false;
        }
        if k > 0 && !is_command(rest[4]) {
            return false;
        }
        off += 4 + u64::from(u24(rest));
        if off == total {
            return true;
        }
        if off > total || off >= b.len() as u64 {
            return false;
        }
    }
    false
}

/// `b` starts with the first packet of a response of shape `expect`.
fn plausible_response(b: &[u8], expect: Expect, seq: u8) -> bool {
    if b.len() < 5 || b[3] != seq {
        return false;
    }
    let len = u24(b);
    let first = b[4];
    match expect {
        Expect::Simple | Expect::Rows => true,
        Expect::Auth => matches!(first, 0x00 | 0x01 | 0xfe | 0xff),
        Expect::Prepare => (first == 0x00 && len >= 12) || (first == 0xff && len >= 3),
        Expect::Results => match first {
            0x00 => len >= 7,
            0xff => len >= 3,
            0xfb => true,
            0xfe => false,
            0xfc | 0xfd => len <= 10,
            _ => len <= 2,
        },
    }
}

/// The text of a COM_QUERY after MySQL query attributes, if any.
fn skip_query_attributes(d: &[u8]) -> Option<&[u8]> {
    let mut p = 0;
    let count = lenenc(d, &mut p)?;
    lenenc(d, &mut p)?;
    if count == 0 {
        return d.get(p..);
    }
    let count = usize::try_from(count).ok().filter(|&n| n <= 4096)?;
    let nulls = d.get(p..p + count.div_ceil(8))?;
    p += count.div_ceil(8);
    if *d.get(p)? != 1 {
        return None;
    }
    p += 1;
    let mut types = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        types.push(*d.get(p)?);
        p += 2;
        lenenc_bytes(d, &mut p)?;
    }
    for (k, ty) in types.into_iter().enumerate() {
        if nulls[k / 8] & (1 << (k % 8)) != 0 {
            continue;
        }
        match ty {
            0x06 => {}
            0x01 => p += 1,
            0x02 | 0x0d => p += 2,
            0x03 | 0x04 | 0x09 => p += 4,
            0x05 | 0x08 => p += 8,
            0x07 | 0x0a | 0x0b | 0x0c | 0x11 | 0x12 | 0x13 => p += 1 + usize::from(*d.get(p)?),
            _ => {
                lenenc_bytes(d, &mut p)?;
            }
        }
    }
    d.get(p..)
}

/// After `USE`: the database name (backquoted or bare).
fn use_target(sql: &str) -> Option<String> {
    let s = sql.trim_start();
    let head = s.get(..3)?;
    if !head.eq_ignore_ascii_case("use") {
        return None;
    }
    let rest = &s[3..];
    if !rest.starts_with(|c: char| c.is_whitespace() || c == '`') {
        return None;
    }
    let rest = rest.trim_start();
    let name = if let Some(q) = rest.strip_prefix('`') {
        let mut name = String::new();
        let mut chars = q.chars().peekable();
        loop {
            match chars.next()? {
                '`' if chars.peek() == Some(&'`') => {
                    chars.next();
                    name.push('`');
                }
                '`' => break,
                c => name.push(c),
            }
        }
        name
    } else {
        rest.split(|c: char| c.is_whitespace() || c == ';')
            .next()?
            .to_owned()
    };
    db_name(name.as_bytes())
}

// --- connection state ----------------------------------------------------------------

/// A prepared statement, as later calls report it.
#[derive(Debug, Clone, Default)]
struct Stmt {
    operation: Option<Cow<'static, str>>,
    collection: Option<String>,
    text: Option<String>,
}

/// Statement id → statement, bounded; the oldest is forgotten first.
#[derive(Debug, Default)]
struct Stmts {
    map: HashMap<u32, Stmt>,
    order: VecDeque<u32>,
}

impl Stmts {
    fn insert(&mut self, id: u32, stmt: Stmt, cap: usize) {
        if cap == 0 {
            return;
        }
        if self.map.insert(id, stmt).is_none() {
            self.order.push_back(id);
        }
        while self.map.len() > cap {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.map.remove(&old);
        }
        if self.order.len() > cap.saturating_mul(2).saturating_add(16) {
            let mut seen = HashSet::new();
            let map = &self.map;
            self.order
                .retain(|id| map.contains_key(id) && seen.insert(*id));
        }
    }

    fn get(&self, id: u32) -> Option<&Stmt> {
        self.map.get(&id)
    }

    fn remove(&mut self, id: u32) {
        self.map.remove(&id);
    }
}

/// What a successful call changes.
#[derive(Debug)]
enum OnOk {
    Nothing,
    /// COM_INIT_DB, `USE` or COM_CHANGE_USER: the database of later calls.
    Namespace(Option<Arc<str>>),
    /// COM_STMT_PREPARE: remember the statement under the id from its OK.
    Prepared(Stmt),
}

/// A call waiting for (the end of) its response.
#[derive(Debug)]
struct Call {
    seq: u64,
    start: Moment,
    operation: Option<Cow<'static, str>>,
    collection: Option<String>,
    query_text: Option<String>,
    /// The call's own namespace (USE / COM_INIT_DB / COM_CHANGE_USER).
    namespace: Option<Option<Arc<str>>>,
    on_ok: OnOk,
}

#[derive(Debug)]
struct Pending {
    /// None: dropped because `max_pending` calls were waiting (its response
    /// is still walked so that later responses stay aligned).
    call: Option<Box<Call>>,
    expect: Expect,
    state: RState,
    stmt_id: Option<u32>,
    /// Moment of the last response packet of this call so far.
    last: Option<Moment>,
    /// Sequence number the next packet of this exchange must have.
    next_seq: u8,
}

impl Pending {
    /// Only an optional EOF is still to come (CLIENT_DEPRECATE_EOF unknown).
    fn in_tail(&self) -> bool {
        matches!(
            self.state,
            RState::PrepColsEof | RState::PrepParamsEof { cols: 0 }
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// At or inside a packet header (`Side::hdr_len` bytes of it seen).
    Header,
    /// Inside a payload (`Side::left` bytes to go).
    Payload,
    /// Lost track of the packet boundaries.
    Lost,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// From the start: waiting for the server greeting.
    Greeting,
    /// Mid-stream (or no greeting): looking for the client's commands.
    Hunting,
    /// Greeting seen; `client_seen`: the handshake response too.
    Handshake {
        client_seen: bool,
    },
    Ready,
    /// Skipped or closed: everything is ignored.
    Off,
}

/// The packet framing of one direction.
#[derive(Debug)]
struct Side {
    frame: Frame,
    hdr: [u8; 4],
    hdr_len: u8,
    /// Moment of the syscall carrying the first byte of the current header.
    hdr_at: Moment,
    /// Bytes of the current physical packet still to come.
    left: u32,
    /// Length of the current physical packet.
    cur_len: u32,
    /// The next physical packet continues the current logical one.
    cont: bool,
    seq: u8,
    /// Sequence number of the current physical packet.
    last_seq: u8,
    first_len: u32,
    total: u64,
    buf: Vec<u8>,
    keep: usize,
    keep_set: bool,
    cut: bool,
    start: Moment,
    /// Framing was lost after having been in sync (a resync counts).
    lost_sync: bool,
}

impl Side {
    fn new(frame: Frame) -> Self {
        Self {
            frame,
            hdr: [0; 4],
            hdr_len: 0,
            hdr_at: Moment::default(),
            left: 0,
            cur_len: 0,
            cont: false,
            seq: 0,
            last_seq: 0,
            first_len: 0,
            total: 0,
            buf: Vec::new(),
            keep: 0,
            keep_set: false,
            cut: false,
            start: Moment::default(),
            lost_sync: false,
        }
    }

    fn at_boundary(&self) -> bool {
        self.frame == Frame::Header && self.hdr_len == 0 && !self.cont
    }

    fn sync(&mut self) {
        self.frame = Frame::Header;
        self.hdr_len = 0;
        self.cont = false;
        self.buf.clear();
    }

    fn reset_buf(&mut self) {
        if self.buf.capacity() > KEEP_BUF_CAPACITY {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
    }
}

/// The MySQL/MariaDB parser state of one connection.
pub struct MysqlConn {
    opts: Arc<DbOptions>,
    phase: Phase,
    /// Index of the request direction (0 = Egress, 1 = Ingress), once known.
    req: Option<usize>,
    sides: [Side; 2],
    caps: Caps,
    pending: VecDeque<Pending>,
    stmts: Stmts,
    /// The statement of the last COM_STMT_PREPARE sent.
    last_prepared: Option<Stmt>,
    namespace: Option<Arc<str>>,
    next_seq: u64,
    counters: DbCounters,
    hunted: u64,
    /// The response direction lost track; `limbo`: moment of the last
    /// response syscall since (the waiting calls may have ended there).
    resp_lost: bool,
    limbo: Option<Moment>,
    /// Try to sync the response direction at its next syscall.
    resp_await: bool,
    last_seen: Moment,
    /// The client sent an SSLRequest: TLS follows.
    tls: bool,
}

impl std::fmt::Debug for MysqlConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlConn")
            .field("phase", &self.phase)
            .field("req", &self.req)
            .field("egress", &self.sides[0].frame)
            .field("ingress", &self.sides[1].frame)
            .field("pending", &self.pending.len())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl MysqlConn {
    /// `from_start`: the connection was seen from its first byte, so the
    /// server greeting comes first. Otherwise the client side is found by
    /// its commands (see the module documentation).
    pub fn new(opts: Arc<DbOptions>, from_start: bool) -> Self {
        let (phase, frame) = if from_start {
            (Phase::Greeting, Frame::Header)
        } else {
            (Phase::Hunting, Frame::Lost)
        };
        Self {
            opts,
            phase,
            req: None,
            sides: [Side::new(frame), Side::new(frame)],
            caps: Caps::default(),
            pending: VecDeque::new(),
            stmts: Stmts::default(),
            last_prepared: None,
            namespace: None,
            next_seq: 0,
            counters: DbCounters::default(),
            hunted: 0,
            resp_lost: !from_start,
            limbo: None,
            resp_await: false,
            last_seen: Moment::default(),
            tls: false,
        }
    }

    /// Whether a TLS record may come next: the client asked for TLS.
    pub fn tls_may_start(&self) -> bool {
        self.tls && self.phase != Phase::Off
    }

    /// One syscall's bytes. `bytes` is what was captured; `missing` further
    /// bytes of the same syscall followed and were not captured.
    pub fn feed(
        &mut self,
        dir: Direction,
        at: Moment,
        bytes: &[u8],
        missing: u64,
        out: &mut Vec<DbEvent>,
    ) {
        if self.phase == Phase::Off {
            return;
        }
        let side = &self.sides[index(dir)];
        if self.tls
            && self.phase == (Phase::Handshake { client_seen: false })
            && side.frame == Frame::Header
            && side.hdr_len == 0
            && bytes.first() == Some(&0x16)
        {
            // A TLS handshake record where a packet would begin (no
            // packet of the handshake is 22 bytes long).
            // Ciphertext after the SSLRequest that no session kept away:
            // nothing of this connection can be read.
            self.skip(out);
            return;
        }
        self.last_seen = at;
        let i = index(dir);
        self.syscall_start(i, at, bytes, missing, out);
        let mut data = bytes;
        while !data.is_empty() && self.phase != Phase::Off && self.sides[i].frame != Frame::Lost {
            let n = self.step(i, at, data, out).min(data.len());
            data = &data[n..];
        }
        if self.phase == Phase::Off {
            return;
        }
        if self.sides[i].frame == Frame::Lost {
            if Some(i) != self.req && self.req.is_some() {
                self.limbo = Some(at);
            }
        } else if missing > 0 {
            self.gap(i, at, missing, out);
        }
    }

    /// The connection closed: calls still waiting end unanswered (end = the
    /// last moment seen), except those whose response was lost in a capture
    /// gap, which end at the last response syscall seen.
    pub fn close(&mut self, at: Moment, out: &mut Vec<DbEvent>) {
        // Calls end at the moment of their last byte, not at the close.
        let _ = at;
        if self.phase == Phase::Off {
            return;
        }
        while let Some(p) = self.pending.pop_front() {
            let tail = p.in_tail();
            let Some(call) = p.call else {
                continue;
            };
            let (end, unanswered) = match (tail, p.last, self.limbo) {
                (true, Some(last), _) => (last, false),
                (_, _, Some(limbo)) if self.resp_lost => (limbo, false),
                _ => {
                    self.counters.unanswered += 1;
                    (self.last_seen, true)
                }
            };
            self.emit(*call, end, Outcome::default(), unanswered, out);
        }
        self.shut();
    }

    pub fn counters(&self) -> DbCounters {
        self.counters
    }

    fn resp(&self) -> Option<usize> {
        self.req.map(|r| 1 - r)
    }

    // --- framing ---------------------------------------------------------------

    /// Checks made where a syscall starts: hunting, resynchronisation.
    fn syscall_start(
        &mut self,
        i: usize,
        at: Moment,
        bytes: &[u8],
        missing: u64,
        out: &mut Vec<DbEvent>,
    ) {
        if self.phase == Phase::Hunting {
            if hunt_match(bytes, missing) {
                self.req = Some(i);
                self.phase = Phase::Ready;
                self.sides[i].sync();
                self.sides[1 - i].frame = Frame::Lost;
                self.resp_lost = true;
                self.limbo = None;
                self.resp_await = true;
            } else {
                self.hunted = self.hunted.saturating_add(bytes.len() as u64 + missing);
                if self.hunted > HUNT_BUDGET {
                    self.skip(out);
                }
            }
            return;
        }
        if self.sides[i].frame != Frame::Lost || self.req.is_none() {
            return;
        }
        if Some(i) == self.req {
            if plausible_command(bytes) {
                self.resynced(i);
            }
        } else if self.resp_await {
            self.resp_await = false;
            let fits = self.pending.front().is_some_and(|p| {
                p.last.is_none() && plausible_response(bytes, p.expect, p.next_seq)
            });
            if fits {
                self.resynced(i);
                self.resp_lost = false;
                self.limbo = None;
            } else {
                self.limbo = Some(at);
            }
        }
    }

    fn resynced(&mut self, i: usize) {
        let side = &mut self.sides[i];
        side.sync();
        if side.lost_sync {
            side.lost_sync = false;
            self.counters.resyncs += 1;
        }
    }

    /// Consumes a prefix of `data` (at most the rest of a header or payload).
    fn step(&mut self, i: usize, at: Moment, data: &[u8], out: &mut Vec<DbEvent>) -> usize {
        match self.sides[i].frame {
            Frame::Lost => data.len(),
            Frame::Header => {
                let side = &mut self.sides[i];
                if side.hdr_len == 0 {
                    side.hdr_at = at;
                }
                let have = usize::from(side.hdr_len);
                let k = (4 - have).min(data.len());
                side.hdr[have..have + k].copy_from_slice(&data[..k]);
                side.hdr_len += k as u8;
                if side.hdr_len == 4 {
                    self.header_done(i, at, out);
                }
                k
            }
            Frame::Payload => {
                if !self.sides[i].keep_set {
                    if self.phase == Phase::Greeting && data[0] != 10 {
                        self.hunt_instead();
                        return data.len();
                    }
                    let side = &self.sides[i];
                    let command = Some(i) == self.req && side.seq == 0 && !side.cont;
                    if command && self.phase == Phase::Ready && !is_command(data[0]) {
                        self.lose(i, at);
                        return data.len();
                    }
                    let keep = self.keep_for(i, data[0]);
                    let side = &mut self.sides[i];
                    side.keep = keep;
                    side.keep_set = true;
                }
                let side = &mut self.sides[i];
                let k = (side.left as usize).min(data.len());
                let room = side.keep.saturating_sub(side.buf.len()).min(k);
                side.buf.extend_from_slice(&data[..room]);
                side.left -= k as u32;
                if side.left == 0 {
                    self.physical_done(i, at, out);
                }
                k
            }
        }
    }

    fn header_done(&mut self, i: usize, at: Moment, out: &mut Vec<DbEvent>) {
        let side = &mut self.sides[i];
        let len = u24(&side.hdr);
        let seq = side.hdr[3];
        side.hdr_len = 0;
        if !side.cont {
            side.seq = seq;
            side.first_len = len;
            side.total = 0;
            side.reset_buf();
            side.keep = 0;
            side.keep_set = false;
            side.cut = false;
            side.start = side.hdr_at;
        }
        let in_order = if side.cont {
            seq == side.last_seq.wrapping_add(1)
        } else {
            self.seq_fits(i, seq)
        };
        let side = &mut self.sides[i];
        side.last_seq = seq;
        side.cur_len = len;
        side.left = len;
        side.total = side.total.saturating_add(u64::from(len));
        side.frame = Frame::Payload;
        let greeting_len_ok = seq == 0 && (GREETING_MIN..=GREETING_MAX).contains(&len);
        if self.phase == Phase::Greeting && !greeting_len_ok {
            self.hunt_instead();
            return;
        }
        if !in_order {
            // Bytes went missing unnoticed (or this is not MySQL).
            side.cont = false;
            self.lose(i, at);
            return;
        }
        if len == 0 {
            self.physical_done(i, at, out);
        }
    }

    /// A new packet with sequence number `seq` may start on side `i`: client
    /// packets are commands (0) or continue the current exchange (auth data,
    /// LOCAL INFILE contents); response packets number on from the exchange.
    fn seq_fits(&self, i: usize, seq: u8) -> bool {
        if self.phase != Phase::Ready || self.req.is_none() {
            return true;
        }
        let front = self.pending.front();
        if Some(i) == self.req {
            seq == 0 || front.is_some_and(|p| p.next_seq == seq)
        } else {
            front.is_none_or(|p| p.next_seq == seq)
        }
    }

    fn physical_done(&mut self, i: usize, at: Moment, out: &mut Vec<DbEvent>) {
        let side = &mut self.sides[i];
        side.frame = Frame::Header;
        side.cont = side.cur_len == MAX_PACKET;
        if !side.cont {
            self.dispatch(i, at, out);
        }
    }

    /// Hands the complete logical packet of side `i` to the protocol logic.
    fn dispatch(&mut self, i: usize, at: Moment, out: &mut Vec<DbEvent>) {
        let mut buf = std::mem::take(&mut self.sides[i].buf);
        let side = &self.sides[i];
        let pkt = Packet {
            seq: side.seq,
            last_seq: side.last_seq,
            first_len: side.first_len,
            len: side.total,
            data: &buf,
            cut: side.cut || !side.keep_set && side.total > 0,
            start: side.start,
            end: at,
        };
        self.on_packet(i, &pkt, out);
        if buf.capacity() > KEEP_BUF_CAPACITY {
            buf = Vec::new();
        } else {
            buf.clear();
        }
        self.sides[i].buf = buf;
    }

    /// `missing` bytes of side `i` were not captured after the last byte fed.
    fn gap(&mut self, i: usize, at: Moment, missing: u64, out: &mut Vec<DbEvent>) {
        let side = &mut self.sides[i];
        match side.frame {
            Frame::Lost => {}
            Frame::Payload => {
                if !side.keep_set || side.buf.len() < side.keep {
                    side.cut = true;
                }
                let left = u64::from(side.left);
                if missing < left {
                    side.left -= missing as u32;
                    return;
                }
                side.left = 0;
                self.physical_done(i, at, out);
                if missing > left && self.phase != Phase::Off {
                    self.lose_partial(i, at, out);
                }
            }
            Frame::Header => self.lose_partial(i, at, out),
        }
    }

    /// Loses side `i`; a logical packet cut short by it is still handed on.
    fn lose_partial(&mut self, i: usize, at: Moment, out: &mut Vec<DbEvent>) {
        if self.sides[i].cont {
            self.sides[i].cut = true;
            self.dispatch(i, at, out);
        }
        if self.phase != Phase::Off {
            self.lose(i, at);
        }
    }

    fn lose(&mut self, i: usize, at: Moment) {
        let side = &mut self.sides[i];
        side.frame = Frame::Lost;
        side.hdr_len = 0;
        side.cont = false;
        side.reset_buf();
        side.lost_sync = true;
        match self.phase {
            Phase::Greeting => self.hunt_instead(),
            Phase::Hunting | Phase::Off => {}
            Phase::Handshake { .. } | Phase::Ready => {
                if Some(i) != self.req {
                    self.resp_lost = true;
                    self.resp_await = false;
                    self.limbo = Some(at);
                }
            }
        }
    }

    /// No greeting after all: look for the client's commands instead.
    fn hunt_instead(&mut self) {
        self.phase = Phase::Hunting;
        self.req = None;
        for side in &mut self.sides {
            side.frame = Frame::Lost;
            side.hdr_len = 0;
            side.cont = false;
            side.reset_buf();
            side.lost_sync = false;
        }
        self.resp_lost = true;
    }

    /// How much of a logical payload starting with `first` to keep.
    fn keep_for(&self, i: usize, first: u8) -> usize {
        let side = &self.sides[i];
        match self.phase {
            Phase::Greeting => KEEP_RESPONSE,
            Phase::Handshake { client_seen: false } if Some(i) == self.req => KEEP_HANDSHAKE,
            _ if Some(i) == self.req => {
                if side.seq != 0 {
                    0
                } else {
                    match first {
                        COM_QUERY | COM_STMT_PREPARE => MAX_SQL_READ + 1,
                        COM_INIT_DB | COM_FIELD_LIST => KEEP_RESPONSE,
                        COM_CHANGE_USER => KEEP_HANDSHAKE,
                        _ => KEEP_SMALL,
                    }
                }
            }
            _ => match self.pending.front().map(|p| p.state) {
                Some(
                    RState::Rows
                    | RState::Defs(_)
                    | RState::PrepParams { .. }
                    | RState::PrepCols { .. },
                ) => KEEP_SMALL,
                _ => KEEP_RESPONSE,
            },
        }
    }

    // --- protocol -------------------------------------------------------------

    fn on_packet(&mut self, i: usize, pkt: &Packet<'_>, out: &mut Vec<DbEvent>) {
        match self.phase {
            Phase::Greeting => self.on_greeting(i, pkt),
            Phase::Handshake { .. } | Phase::Ready => {
                if Some(i) == self.req {
                    self.on_request(pkt, out);
                } else {
                    self.on_response(pkt, out);
                }
            }
            Phase::Hunting | Phase::Off => {}
        }
    }

    fn on_greeting(&mut self, i: usize, pkt: &Packet<'_>) {
        match parse_greeting(pkt.data) {
            Some(server) => {
                self.req = Some(1 - i);
                self.phase = Phase::Handshake { client_seen: false };
                self.caps.agreed = Some(server);
                self.resp_lost = false;
            }
            None => self.hunt_instead(),
        }
    }

    fn on_request(&mut self, pkt: &Packet<'_>, out: &mut Vec<DbEvent>) {
        if self.phase == (Phase::Handshake { client_seen: false }) {
            self.phase = Phase::Handshake { client_seen: true };
            if pkt.seq == 1 || (self.tls && pkt.seq == 2) {
                self.client_hello(pkt, out);
                return;
            }
            self.caps = Caps::default();
        }
        if pkt.seq == 0 {
            self.command(pkt, out);
        } else if let Some(front) = self.pending.front_mut() {
            // Auth data or LOCAL INFILE contents: the server numbers on.
            front.next_seq = pkt.last_seq.wrapping_add(1);
        }
    }

    /// HandshakeResponse41 (or 320, or an SSLRequest).
    fn client_hello(&mut self, pkt: &Packet<'_>, out: &mut Vec<DbEvent>) {
        let server = self.caps.agreed.unwrap_or(0);
        let d = pkt.data;
        let Some(lo) = u16_at(d, 0) else {
            self.caps = Caps::default();
            return;
        };
        let mut client = u64::from(lo);
        if client & CLIENT_PROTOCOL_41 != 0 {
            let Some(caps) = u32_at(d, 0) else {
                self.caps = Caps::default();
                return;
            };
            client = u64::from(caps);
            if client & CLIENT_MYSQL == 0 {
                client |= u64::from(u32_at(d, 28).unwrap_or(0)) << 32;
            }
        }
        if client & CLIENT_SSL != 0 && !self.tls {
            // An SSLRequest: the real response follows over TLS.
            self.tls = true;
            self.phase = Phase::Handshake { client_seen: false };
            return;
        }
        let agreed = server & client;
        if agreed & (CLIENT_COMPRESS | CLIENT_ZSTD_COMPRESSION) != 0 {
            self.skip(out);
            return;
        }
        self.caps = Caps {
            agreed: Some(agreed),
            deprecate_eof: Some(agreed & CLIENT_DEPRECATE_EOF != 0),
        };
        if client & CLIENT_PROTOCOL_41 == 0 || client & CLIENT_CONNECT_WITH_DB == 0 {
            return;
        }
        let mut p = 32;
        nul_str(d, &mut p);
        if client & CLIENT_PLUGIN_AUTH_LENENC_DATA != 0 {
            if lenenc_bytes(d, &mut p).is_none() {
                return;
            }
        } else if client & CLIENT_SECURE_CONNECTION != 0 {
            let Some(&n) = d.get(p) else {
                return;
            };
            p += 1 + usize::from(n);
        } else {
            nul_str(d, &mut p);
        }
        let Some(rest) = d.get(p..) else {
            return;
        };
        let mut q = 0;
        let db = nul_str(rest, &mut q);
        // A database cut by the capture limit is not trusted.
        if q <= db.len() && pkt.cut {
            return;
        }
        self.namespace = db_name(db).map(Arc::from);
    }

    /// A packet with sequence number 0 from the client.
    fn command(&mut self, pkt: &Packet<'_>, out: &mut Vec<DbEvent>) {
        let req = self.req.unwrap_or(0);
        let Some(&cmd) = pkt.data.first() else {
            self.lose(req, pkt.end);
            return;
        };
        if matches!(self.phase, Phase::Handshake { .. }) {
            self.phase = Phase::Ready;
        }
        if self.resp_lost {
            // The client sends a command once it has read the response.
            if let Some(limbo) = self.limbo.take() {
                while let Some(p) = self.pending.pop_front() {
                    if let Some(call) = p.call {
                        self.emit(*call, limbo, Outcome::default(), false, out);
                    }
                }
            }
            self.resp_await = true;
        } else {
            self.settle_tail(out);
        }
        let body = &pkt.data[1..];
        let (expect, call) = match cmd {
            COM_QUIT | COM_STMT_SEND_LONG_DATA => return,
            COM_STMT_CLOSE => {
                if let Some(id) = u32_at(body, 0) {
                    self.stmts.remove(id);
                }
                return;
            }
            COM_BINLOG_DUMP | COM_BINLOG_DUMP_GTID => {
                self.skip(out);
                return;
            }
            COM_QUERY => (Expect::Results, self.query_call(pkt, body)),
            COM_STMT_PREPARE => {
                let (stmt, _) = self.statement(body);
                self.last_prepared = Some(stmt.clone());
                let call = Call {
                    operation: Some(Cow::Borrowed("PREPARE")),
                    collection: stmt.collection.clone(),
                    query_text: stmt.text.clone(),
                    on_ok: OnOk::Prepared(stmt),
                    ..new_call(pkt)
                };
                (Expect::Prepare, call)
            }
            COM_STMT_EXECUTE | COM_STMT_BULK_EXECUTE => {
                let stmt = self.statement_of(body);
                let call = Call {
                    operation: Some(stmt.operation.unwrap_or(Cow::Borrowed("EXECUTE"))),
                    collection: stmt.collection,
                    query_text: stmt.text,
                    ..new_call(pkt)
                };
                (Expect::Results, call)
            }
            COM_STMT_RESET | COM_STMT_FETCH => {
                let stmt = self.statement_of(body);
                let call = Call {
                    operation: command_name(cmd).map(Cow::Borrowed),
                    collection: stmt.collection,
                    query_text: stmt.text,
                    ..new_call(pkt)
                };
                let expect = if cmd == COM_STMT_FETCH {
                    Expect::Rows
                } else {
                    Expect::Simple
                };
                (expect, call)
            }
            COM_INIT_DB => {
                let db = if pkt.cut { None } else { db_name(body) }.map(Arc::from);
                let call = Call {
                    operation: Some(Cow::Borrowed("USE")),
                    namespace: Some(db.clone()),
                    on_ok: OnOk::Namespace(db),
                    ..new_call(pkt)
                };
                (Expect::Simple, call)
            }
            COM_FIELD_LIST => {
                let mut p = 0;
                let table = nul_str(body, &mut p);
                let call = Call {
                    operation: command_name(cmd).map(Cow::Borrowed),
                    collection: db_name(table),
                    ..new_call(pkt)
                };
                (Expect::Rows, call)
            }
            COM_PROCESS_INFO => {
                let call = Call {
                    operation: command_name(cmd).map(Cow::Borrowed),
                    ..new_call(pkt)
                };
                (Expect::Results, call)
            }
            COM_CHANGE_USER => {
                let db =
                    change_user_db(body, self.caps.has(CLIENT_SECURE_CONNECTION) != Some(false))
                        .map(Arc::from);
                let call = Call {
                    operation: command_name(cmd).map(Cow::Borrowed),
                    namespace: Some(db.clone()),
                    on_ok: OnOk::Namespace(db),
                    ..new_call(pkt)
                };
                (Expect::Auth, call)
            }
            0x00..=0x1f => {
                let call = Call {
                    operation: command_name(cmd).map(Cow::Borrowed),
                    ..new_call(pkt)
                };
                (Expect::Simple, call)
            }
            _ => {
                // Not a command: the framing cannot be trusted.
                self.lose(req, pkt.end);
                return;
            }
        };
        self.push(expect, call, pkt.last_seq, out);
    }

    fn query_call(&self, pkt: &Packet<'_>, body: &[u8]) -> Call {
        let sql = match self.caps.has(CLIENT_QUERY_ATTRIBUTES) {
            Some(true) => skip_query_attributes(body),
            Some(false) => Some(body),
            None => Some(body.strip_prefix(&[0, 1]).unwrap_or(body)),
        };
        let (stmt, target) = match sql {
            Some(sql) => self.statement(sql),
            None => (Stmt::default(), None),
        };
        let mut call = Call {
            operation: stmt.operation,
            collection: stmt.collection,
            query_text: stmt.text,
            ..new_call(pkt)
        };
        if let Some(db) = target {
            let db: Arc<str> = Arc::from(db);
            call.namespace = Some(Some(Arc::clone(&db)));
            call.on_ok = OnOk::Namespace(Some(db));
        }
        call
    }

    /// Summarizes SQL text; also returns the database of a `USE`.
    fn statement(&self, sql: &[u8]) -> (Stmt, Option<String>) {
        let sql = &sql[..sql.len().min(MAX_SQL_READ)];
        let sql = text(sql);
        if sql.trim().is_empty() {
            return (Stmt::default(), None);
        }
        let summary = self
            .opts
            .summaries
            .summarize(&sql, self.opts.max_query_bytes);
        let query_text = if self.opts.sanitize {
            summary.sanitized.clone()
        } else {
            cap_str(&sql, self.opts.max_query_bytes)
        };
        let target = if summary.operation == Some("USE") {
            use_target(&sql)
        } else {
            None
        };
        let stmt = Stmt {
            operation: summary.operation.map(Cow::Borrowed),
            collection: summary.collection.clone(),
            text: (!query_text.is_empty()).then_some(query_text),
        };
        (stmt, target)
    }

    /// The statement a COM_STMT_* command names (by the id after its command byte).
    fn statement_of(&self, body: &[u8]) -> Stmt {
        match u32_at(body, 0) {
            Some(LAST_STATEMENT) => self.last_prepared.clone().unwrap_or_default(),
            Some(id) => self.stmts.get(id).cloned().unwrap_or_default(),
            None => Stmt::default(),
        }
    }

    fn push(&mut self, expect: Expect, mut call: Call, last_seq: u8, out: &mut Vec<DbEvent>) {
        let state = if expect == Expect::Rows {
            RState::Rows
        } else {
            RState::Start
        };
        let max = self.opts.max_pending.max(1);
        let waiting = self.pending.iter().filter(|p| p.call.is_some()).count();
        let call = if waiting >= max {
            self.counters.dropped_calls += 1;
            if self.pending.len() >= max.saturating_mul(2).saturating_add(16) {
                // No responses come: give up on the waiting calls and pair
                // again from the next response that looks like one.
                self.flush_unanswered(out);
                if let Some(resp) = self.resp() {
                    let at = self.last_seen;
                    self.lose(resp, at);
                    self.limbo = None;
                    self.resp_await = true;
                }
                return;
            }
            None
        } else {
            call.seq = self.next_seq;
            self.next_seq += 1;
            out.push(DbEvent::Request {
                seq: call.seq,
                start: call.start,
            });
            Some(Box::new(call))
        };
        self.pending.push_back(Pending {
            call,
            expect,
            state,
            stmt_id: None,
            last: None,
            next_seq: last_seq.wrapping_add(1),
        });
    }

    /// A new command while the front call waits only for an optional EOF
    /// (CLIENT_DEPRECATE_EOF unknown): that call ended with its last packet.
    fn settle_tail(&mut self, out: &mut Vec<DbEvent>) {
        let at_boundary = self.resp().is_some_and(|r| self.sides[r].at_boundary());
        let Some(front) = self.pending.front() else {
            return;
        };
        if !(at_boundary && front.in_tail() && self.caps.deprecate_eof.is_none()) {
            return;
        }
        let end = front.last.unwrap_or(self.last_seen);
        self.caps.deprecate_eof = Some(true);
        self.complete_front(Outcome::default(), end, out);
    }

    fn on_response(&mut self, pkt: &Packet<'_>, out: &mut Vec<DbEvent>) {
        if self.pending.is_empty() {
            if matches!(self.phase, Phase::Handshake { .. }) {
                match pkt.first() {
                    Some(0x00) => {
                        let info = parse_ok(pkt.data, self.caps.has(CLIENT_SESSION_TRACK));
                        if let Some(schema) = info.schema {
                            self.namespace = Some(Arc::from(schema));
                        }
                        self.phase = Phase::Ready;
                    }
                    Some(0xff) => self.phase = Phase::Ready,
                    _ => {}
                }
            }
            return;
        }
        loop {
            let Some(front) = self.pending.front_mut() else {
                return;
            };
            let step = response_step(
                front.expect,
                front.state,
                pkt,
                &mut self.caps,
                &mut front.stmt_id,
            );
            match step {
                Step::Continue(state) => {
                    front.state = state;
                    front.last = Some(pkt.end);
                    front.next_seq = pkt.last_seq.wrapping_add(1);
                    return;
                }
                Step::End(outcome) => {
                    self.complete_front(outcome, pkt.end, out);
                    return;
                }
                Step::EndBefore => {
                    let end = front.last.unwrap_or(pkt.end);
                    self.complete_front(Outcome::default(), end, out);
                }
                Step::Lost => {
                    if let Some(resp) = self.resp() {
                        self.lose(resp, pkt.end);
                    }
                    return;
                }
            }
        }
    }

    fn complete_front(&mut self, outcome: Outcome, end: Moment, out: &mut Vec<DbEvent>) {
        let Some(p) = self.pending.pop_front() else {
            return;
        };
        if let Some(mut call) = p.call {
            if !outcome.error {
                match std::mem::replace(&mut call.on_ok, OnOk::Nothing) {
                    OnOk::Nothing => {}
                    OnOk::Namespace(db) => self.namespace = db,
                    OnOk::Prepared(stmt) => {
                        if let Some(id) = p.stmt_id {
                            self.stmts.insert(id, stmt, self.opts.max_statements);
                        }
                    }
                }
            }
            let schema = outcome.schema.clone();
            self.emit(*call, end, outcome, false, out);
            if schema.is_some() {
                self.namespace = schema.map(Arc::from);
            }
        } else if outcome.schema.is_some() {
            self.namespace = outcome.schema.map(Arc::from);
        }
    }

    fn emit(
        &mut self,
        call: Call,
        end: Moment,
        outcome: Outcome,
        unanswered: bool,
        out: &mut Vec<DbEvent>,
    ) {
        let namespace = match call.namespace {
            Some(own) => own,
            None => self.namespace.clone(),
        };
        out.push(DbEvent::Call(DbCall {
            seq: call.seq,
            start: call.start,
            end,
            operation: call.operation,
            collection: call.collection,
            query_text: call.query_text,
            namespace,
            status_code: outcome.code.map(|c| c.to_string()),
            error: outcome.error,
            unanswered,
        }));
    }

    /// Not (or no longer) MySQL: waiting calls end unanswered, then Skip.
    fn skip(&mut self, out: &mut Vec<DbEvent>) {
        self.flush_unanswered(out);
        out.push(DbEvent::Skip);
        self.shut();
    }

    /// Every waiting call ends without a response.
    fn flush_unanswered(&mut self, out: &mut Vec<DbEvent>) {
        while let Some(p) = self.pending.pop_front() {
            if let Some(call) = p.call {
                self.counters.unanswered += 1;
                let end = self.last_seen;
                self.emit(*call, end, Outcome::default(), true, out);
            }
        }
    }

    fn shut(&mut self) {
        self.phase = Phase::Off;
        self.pending = VecDeque::new();
        self.stmts = Stmts::default();
        self.last_prepared = None;
        for side in &mut self.sides {
            side.frame = Frame::Lost;
            side.buf = Vec::new();
        }
    }
}

fn new_call(pkt: &Packet<'_>) -> Call {
    Call {
        seq: 0,
        start: pkt.start,
        operation: None,
        collection: None,
        query_text: None,
        namespace: None,
        on_ok: OnOk::Nothing,
    }
}

/// Server capabilities from a HandshakeV10 payload.
fn parse_greeting(d: &[u8]) -> Option<u64> {
    if d.first() != Some(&10) {
        return None;
    }
    let mut p = 1;
    let version = nul_str(d, &mut p);
    if version.is_empty()
        || version.len() > MAX_VERSION_LEN
        || p > d.len()
        || !version[0].is_ascii_digit()
    {
        return None;
    }
    if !version.iter().all(|&c| (0x20..0x7f).contains(&c)) {
        return None;
    }
    // connection id (4), auth data (8), filler (1)
    p += 13;
    if d.get(p - 1) != Some(&0) {
        return None;
    }
    let lo = u16_at(d, p)?;
    let mut caps = u64::from(lo);
    // charset (1), status (2), capabilities high (2)
    if let Some(hi) = u16_at(d, p + 5) {
        caps |= u64::from(hi) << 16;
        if caps & CLIENT_MYSQL == 0 {
            // auth data length (1), filler (6), MariaDB capabilities (4)
            caps |= u64::from(u32_at(d, p + 14).unwrap_or(0)) << 32;
        }
    }
    Some(caps)
}

/// The database a COM_CHANGE_USER switches to.
fn change_user_db(body: &[u8], secure: bool) -> Option<String> {
    let mut p = 0;
    nul_str(body, &mut p);
    if secure {
        let n = *body.get(p)?;
        p += 1 + usize::from(n);
    } else {
        nul_str(body, &mut p);
    }
    let rest = body.get(p..)?;
    let mut q = 0;
    let db = nul_str(rest, &mut q);
    if q <= db.len() {
        return None;
    }
    db_name(db)
}

#[cfg(test)]
mod tests {
    use super::super::replay::*;
    use super::*;

    const E: Direction = Direction::Egress;
    const I: Direction = Direction::Ingress;

    fn requests(events: &[DbEvent]) -> Vec<(u64, Moment)> {
        events
            .iter()
            .filter_map(|e| match e {
                DbEvent::Request { seq, start } => Some((*seq, *start)),
                _ => None,
            })
            .collect()
    }

    fn skips(events: &[DbEvent]) -> usize {
        events.iter().filter(|e| **e == DbEvent::Skip).count()
    }

    /// Every Call follows its Request, seqs increase, nothing after Skip.
    fn check_invariants(events: &[DbEvent]) {
        let mut announced = Vec::new();
        let mut last_call = None;
        let mut skipped = false;
        for e in events {
            assert!(!skipped, "event after Skip: {events:?}");
            match e {
                DbEvent::Request { seq, .. } => {
                    assert!(announced.last().is_none_or(|l| seq > l), "request seqs");
                    announced.push(*seq);
                }
                DbEvent::Call(c) => {
                    assert!(announced.contains(&c.seq), "call without request");
                    assert!(last_call.is_none_or(|l| c.seq > l), "call seqs");
                    last_call = Some(c.seq);
                }
                DbEvent::Skip => skipped = true,
            }
        }
    }

    // --- recorded fixtures --------------------------------------------------

    /// The SQL a call reports (its collection and text come from it).
    #[derive(Clone, Copy)]
    enum Sql {
        None,
        Text(&'static str),
        /// The text of the command packet starting with these bytes.
        Prefix(&'static [u8]),
    }

    #[derive(Clone, Copy)]
    struct Want {
        /// None: the operation sql::summarize gives for the SQL.
        op: Option<&'static str>,
        sql: Sql,
        collection: Option<&'static str>,
        ns: Option<&'static str>,
        status: Option<&'static str>,
    }

    const fn q(sql: &'static str, ns: Option<&'static str>, status: Option<&'static str>) -> Want {
        Want {
            op: None,
            sql: Sql::Text(sql),
            collection: None,
            ns,
            status,
        }
    }

    const fn op(
        op: &'static str,
        sql: Option<&'static str>,
        ns: Option<&'static str>,
        status: Option<&'static str>,
    ) -> Want {
        Want {
            op: Some(op),
            sql: match sql {
                Some(s) => Sql::Text(s),
                None => Sql::None,
            },
            collection: None,
            ns,
            status,
        }
    }

    /// An execute-like call: the statement's own operation.
    const fn ex(sql: &'static str, ns: Option<&'static str>, status: Option<&'static str>) -> Want {
        q(sql, ns, status)
    }

    const ZTDB: Option<&str> = Some("ztdb");
    const OTHER: Option<&str> = Some("ztother");

    struct Case {
        f: Fixture,
        wants: Vec<Want>,
        skip: bool,
    }

    fn cases() -> Vec<Case> {
        const SEL: &str = "SELECT id, name, price FROM items WHERE id = ?";
        const CUR: &str = "SELECT id, name FROM items WHERE id > ? ORDER BY id";
        let case = |f, wants| Case {
            f,
            wants,
            skip: false,
        };
        vec![
            case(
                fixture!("mysql", "cli_queries"),
                vec![
                    q(
                        "SELECT id, name, price FROM items WHERE id < 20 ORDER BY id",
                        ZTDB,
                        None,
                    ),
                    q(
                        "INSERT INTO items (id, name, price) VALUES (9001, 'O''Reilly', 3.50)",
                        ZTDB,
                        None,
                    ),
                    q(
                        "UPDATE items SET price = price + 1 WHERE id = 3",
                        ZTDB,
                        None,
                    ),
                    q("SELEC 1", ZTDB, Some("1064")),
                    q("SELECT * FROM missing_table", ZTDB, Some("1146")),
                    q("DELETE FROM items WHERE id = 9001", ZTDB, None),
                ],
            ),
            case(
                fixture!("mysql", "cli_use_multi"),
                vec![
                    q("SELECT DATABASE()", None, None),
                    op("USE", None, ZTDB, None),
                    q("SELECT DATABASE()", ZTDB, None),
                    q(
                        "SELECT 1 AS one; SELECT name FROM items WHERE id = 2",
                        ZTDB,
                        None,
                    ),
                    q("CALL two_results(3)", ZTDB, None),
                    q("SELECT DATABASE()", ZTDB, None),
                    op("USE", None, Some("no_such_db"), Some("1044")),
                    q("SELECT DATABASE()", ZTDB, None),
                    op("USE", None, OTHER, None),
                    q("SELECT body FROM notes ORDER BY id", OTHER, None),
                ],
            ),
            case(fixture!("mysql", "cli_auth_fail"), vec![]),
            Case {
                f: fixture!("mysql", "cli_compress"),
                wants: vec![],
                skip: true,
            },
            Case {
                f: fixture!("mysql", "cli_ssl"),
                wants: vec![],
                skip: true,
            },
            case(
                fixture!("mysql", "admin_ping_status"),
                vec![
                    op("PING", None, None, None),
                    op("STATISTICS", None, None, None),
                ],
            ),
            case(
                fixture!("mysql", "pymysql_params"),
                vec![
                    q("SET NAMES utf8mb4", ZTDB, None),
                    q(
                        "SELECT id, name FROM items WHERE id BETWEEN 10 AND 14 ORDER BY id",
                        ZTDB,
                        None,
                    ),
                    q(
                        "INSERT INTO items (id, name, price) VALUES (9100, 'secret \\'name\\'', 9.99e0)",
                        ZTDB,
                        None,
                    ),
                    q(
                        "INSERT INTO items (id, name, price) VALUES (9100, 'dup', 1)",
                        ZTDB,
                        Some("1062"),
                    ),
                    q(
                        "SELECT 1; SELECT 2; UPDATE items SET price = 0 WHERE id = 9100",
                        ZTDB,
                        None,
                    ),
                    q(
                        "LOAD DATA LOCAL INFILE '/tmp/zt-load.csv' INTO TABLE loaded FIELDS TERMINATED BY ','",
                        ZTDB,
                        None,
                    ),
                    q("USE ztother", OTHER, None),
                    q("SELECT body FROM notes WHERE id = 2", OTHER, None),
                ],
            ),
            case(
                fixture!("mysql", "pymysql_big"),
                vec![
                    q("SET NAMES utf8mb4", ZTDB, None),
                    q("SELECT id, name, price FROM items ORDER BY id", ZTDB, None),
                    Want {
                        sql: Sql::Prefix(b"\x03INSERT INTO items (id, name, price) VALUES (20000"),
                        ..q("", ZTDB, None)
                    },
                    q("SELECT COUNT(*) FROM items", ZTDB, None),
                    q("DELETE FROM items WHERE id >= 20000", ZTDB, None),
                ],
            ),
            case(
                fixture!("mysql", "connector_prepared"),
                vec![
                    q(
                        "SET NAMES 'utf8mb4' COLLATE 'utf8mb4_general_ci'",
                        ZTDB,
                        None,
                    ),
                    q("SET @@session.autocommit = ON", ZTDB, None),
                    op("PING", None, ZTDB, None),
                    op("PREPARE", Some(SEL), ZTDB, None),
                    op("STMT_RESET", Some(SEL), ZTDB, None),
                    ex(SEL, ZTDB, None),
                    op("STMT_RESET", Some(SEL), ZTDB, None),
                    ex(SEL, ZTDB, None),
                    op(
                        "PREPARE",
                        Some("INSERT INTO items (id, name, price) VALUES (?, ?, ?)"),
                        ZTDB,
                        None,
                    ),
                    op(
                        "STMT_RESET",
                        Some("INSERT INTO items (id, name, price) VALUES (?, ?, ?)"),
                        ZTDB,
                        None,
                    ),
                    ex(
                        "INSERT INTO items (id, name, price) VALUES (?, ?, ?)",
                        ZTDB,
                        None,
                    ),
                    op(
                        "STMT_RESET",
                        Some("INSERT INTO items (id, name, price) VALUES (?, ?, ?)"),
                        ZTDB,
                        None,
                    ),
                    ex(
                        "INSERT INTO items (id, name, price) VALUES (?, ?, ?)",
                        ZTDB,
                        Some("1062"),
                    ),
                    op("PREPARE", Some("SELEKT ?"), ZTDB, Some("1064")),
                    op(
                        "PREPARE",
                        Some("DELETE FROM items WHERE id = ?"),
                        ZTDB,
                        None,
                    ),
                    op(
                        "STMT_RESET",
                        Some("DELETE FROM items WHERE id = ?"),
                        ZTDB,
                        None,
                    ),
                    ex("DELETE FROM items WHERE id = ?", ZTDB, None),
                ],
            ),
            case(
                fixture!("mysql", "raw_deprecate_eof"),
                vec![
                    q(
                        "SELECT id, name FROM items WHERE id <= 3 ORDER BY id",
                        ZTDB,
                        None,
                    ),
                    q("SELECT id FROM items WHERE id < 0", ZTDB, None),
                    q(
                        "SELECT 1 AS a; UPDATE items SET price = price WHERE id = 1; SELECT 2 AS b",
                        ZTDB,
                        None,
                    ),
                    Want {
                        collection: Some("items"),
                        ..op("FIELD_LIST", None, ZTDB, None)
                    },
                    op("PREPARE", Some(CUR), ZTDB, None),
                    ex(CUR, ZTDB, None),
                    op("STMT_FETCH", Some(CUR), ZTDB, None),
                    op("STMT_FETCH", Some(CUR), ZTDB, None),
                    op("STMT_RESET", Some(CUR), ZTDB, None),
                    op(
                        "PREPARE",
                        Some("UPDATE items SET name = ? WHERE id = 10"),
                        ZTDB,
                        None,
                    ),
                    ex("UPDATE items SET name = ? WHERE id = 10", ZTDB, None),
                    op("SET_OPTION", None, ZTDB, None),
                    q("SELECT 1; SELECT 2", ZTDB, Some("1064")),
                    q("INSERT INTO items VALUES (1, 'dup', 0)", ZTDB, Some("1062")),
                ],
            ),
            case(
                fixture!("mysql", "mariadb_connector"),
                vec![
                    q("SELECT id, name FROM items WHERE id < 4", ZTDB, None),
                    q("SELECT id, name FROM items WHERE id < 6", ZTDB, None),
                    op(
                        "PREPARE",
                        Some("INSERT INTO loaded (id, label) VALUES (?, ?)"),
                        ZTDB,
                        None,
                    ),
                    ex("INSERT INTO loaded (id, label) VALUES (?, ?)", ZTDB, None),
                    q("SELECT * FROM nowhere WHERE id = 1", ZTDB, Some("1146")),
                    q("SELECT 42", ZTDB, None),
                    op("PING", None, ZTDB, None),
                    op("RESET_CONNECTION", None, ZTDB, None),
                    op("CHANGE_USER", None, OTHER, None),
                    q("SELECT body FROM notes WHERE id = 1", OTHER, None),
                ],
            ),
            case(
                fixture!("mysql", "mariadb_binary"),
                vec![
                    op("PREPARE", Some(SEL), ZTDB, None),
                    ex(SEL, ZTDB, None),
                    op("PREPARE", Some(SEL), ZTDB, None),
                    ex(SEL, ZTDB, None),
                    op("PREPARE", Some(SEL), ZTDB, None),
                    ex(SEL, ZTDB, None),
                    op(
                        "PREPARE",
                        Some("SELECT nope FROM items WHERE id = ?"),
                        ZTDB,
                        Some("1054"),
                    ),
                    ex("SELECT nope FROM items WHERE id = ?", ZTDB, Some("1243")),
                    op(
                        "PREPARE",
                        Some("UPDATE items SET price = ? WHERE id = ?"),
                        ZTDB,
                        None,
                    ),
                    ex("UPDATE items SET price = ? WHERE id = ?", ZTDB, None),
                ],
            ),
        ]
    }

    /// The SQL text a want refers to.
    fn want_sql(f: &Fixture, w: &Want) -> Option<String> {
        match w.sql {
            Sql::None => None,
            Sql::Text(s) => Some(s.to_owned()),
            Sql::Prefix(prefix) => {
                let at = find(f.req, prefix).expect("prefix in fixture");
                let len = u24(&f.req[at - 4..]) as usize;
                let body = &f.req[at + 1..at + len];
                Some(text(&body[..body.len().min(MAX_SQL_READ)]).into_owned())
            }
        }
    }

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    /// Plays a schedule; `cap`: bytes captured per syscall (the rest is `missing`).
    fn play_with(
        f: &Fixture,
        schedule: &[Syscall],
        req_dir: Direction,
        opts: Arc<DbOptions>,
        from_start: bool,
        cap: usize,
    ) -> (Vec<DbEvent>, MysqlConn) {
        let resp_dir = opposite(req_dir);
        let mut conn = MysqlConn::new(opts, from_start);
        let mut out = Vec::new();
        for &(is_req, off, len) in schedule {
            let (dir, stream) = if is_req {
                (req_dir, f.req)
            } else {
                (resp_dir, f.resp)
            };
            let taken = len.min(cap);
            conn.feed(
                dir,
                moment(is_req, off),
                &stream[off..off + taken],
                (len - taken) as u64,
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
        check_invariants(&out);
        (out, conn)
    }

    fn play(f: &Fixture, schedule: &[Syscall], req_dir: Direction) -> (Vec<DbEvent>, MysqlConn) {
        play_with(f, schedule, req_dir, db_opts(), true, usize::MAX)
    }

    /// Packet boundaries of a clean stream.
    fn boundaries(stream: &[u8]) -> Vec<usize> {
        let mut out = vec![0];
        let mut at = 0;
        while at + 4 <= stream.len() {
            at += 4 + u24(&stream[at..]) as usize;
            out.push(at);
        }
        out
    }

    /// (request start, response end) offsets per call.
    type Positions = Vec<(u64, u64)>;

    /// What each call of a case must report.
    struct Expected {
        op: Option<String>,
        collection: Option<String>,
        text: Option<String>,
    }

    fn expectations(case: &Case) -> Vec<Expected> {
        case.wants
            .iter()
            .map(|w| {
                let summary = want_sql(&case.f, w).map(|s| {
                    crate::protocol::sql::summarize(&s, DbOptions::default().max_query_bytes)
                });
                Expected {
                    op: match w.op {
                        Some(op) => Some(op.to_owned()),
                        None => summary
                            .as_ref()
                            .and_then(|s| s.operation.map(str::to_owned)),
                    },
                    collection: match w.collection {
                        Some(coll) => Some(coll.to_owned()),
                        None => summary.as_ref().and_then(|s| s.collection.clone()),
                    },
                    text: summary.map(|s| s.sanitized).filter(|s| !s.is_empty()),
                }
            })
            .collect()
    }

    fn check_case(
        case: &Case,
        expected: &[Expected],
        schedule: &[Syscall],
        req_dir: Direction,
        positions: Option<&Positions>,
    ) -> Positions {
        let f = &case.f;
        let ctx = format!("{} ({req_dir:?}, {} syscalls)", f.name, schedule.len());
        let (events, conn) = play(f, schedule, req_dir);
        let cs = calls(&events);
        let rs = requests(&events);
        assert_eq!(cs.len(), case.wants.len(), "{ctx}: calls {events:#?}");
        assert_eq!(rs.len(), case.wants.len(), "{ctx}: requests");
        assert_eq!(skips(&events), usize::from(case.skip), "{ctx}: skip");
        if case.skip {
            assert_eq!(events.last(), Some(&DbEvent::Skip), "{ctx}");
        }
        assert_eq!(conn.counters(), DbCounters::default(), "{ctx}");
        if positions.is_none() {
            let dump = format!("{events:?}");
            assert!(!dump.contains("zt-secret-pw"), "{ctx}: password leaked");
        }
        let mut found = Vec::new();
        for (k, ((c, w), x)) in cs.iter().zip(&case.wants).zip(expected).enumerate() {
            assert_eq!(c.seq, k as u64, "{ctx}");
            assert_eq!(
                c.operation.as_deref(),
                x.op.as_deref(),
                "{ctx}: #{k} operation"
            );
            assert_eq!(c.collection, x.collection, "{ctx}: #{k} collection");
            assert_eq!(c.query_text, x.text, "{ctx}: #{k} text");
            assert_eq!(c.namespace.as_deref(), w.ns, "{ctx}: #{k} namespace");
            assert_eq!(c.status_code.as_deref(), w.status, "{ctx}: #{k} status");
            assert_eq!(c.error, w.status.is_some(), "{ctx}: #{k} error");
            assert!(!c.unanswered, "{ctx}: #{k} unanswered");
            // The Request came first, with the same start.
            let r = rs.iter().find(|r| r.0 == c.seq).expect("request");
            assert_eq!(r.1, c.start, "{ctx}");
            let ri = events
                .iter()
                .position(|e| matches!(e, DbEvent::Request { seq, .. } if *seq == c.seq));
            let ci = events
                .iter()
                .position(|e| matches!(e, DbEvent::Call(x) if x.seq == c.seq));
            assert!(ri < ci, "{ctx}: #{k} order");
            assert_eq!((c.start.tid, c.end.tid), (1, 2), "{ctx}: #{k} moments");
            let pos = (offset(c.start), offset(c.end));
            if let Some(positions) = positions {
                let (s, e) = positions[k];
                assert_eq!(c.start, moment_of(schedule, true, s), "{ctx}: #{k} start");
                assert_eq!(c.end, moment_of(schedule, false, e), "{ctx}: #{k} end");
            }
            found.push(pos);
        }
        found
    }

    /// The positions of the byte-per-syscall run, checked against the bytes:
    /// a call starts at a command packet and ends at the last byte of a
    /// packet followed by the next response's first packet (or the end).
    fn check_positions(case: &Case, positions: &Positions) {
        let f = &case.f;
        let resp_bounds = boundaries(f.resp);
        for (k, (&(s, e), w)) in positions.iter().zip(&case.wants).enumerate() {
            let (s, e) = (s as usize, e as usize);
            assert_eq!(f.req[s + 3], 0, "{}: #{k} starts at a command", f.name);
            if let Some(sql) = want_sql(f, w).filter(|_| matches!(w.op, None | Some("PREPARE"))) {
                let head = &sql.as_bytes()[..sql.len().min(32)];
                if matches!(f.req[s + 4], COM_QUERY | COM_STMT_PREPARE) {
                    assert!(
                        f.req[s + 5..].starts_with(head),
                        "{}: #{k} text at {s}",
                        f.name
                    );
                }
            }
            assert!(
                resp_bounds.contains(&(e + 1)),
                "{}: #{k} ends a packet",
                f.name
            );
            assert!(
                e + 1 == f.resp.len() || f.resp[e + 4] == 1,
                "{}: #{k} next packet starts a response",
                f.name
            );
        }
    }

    #[test]
    fn fixtures_whole_split_and_bytewise() {
        for case in cases() {
            let f = &case.f;
            let x = expectations(&case);
            for req_dir in [E, I] {
                let positions = check_case(&case, &x, &bytewise(f), req_dir, None);
                check_positions(&case, &positions);
                check_case(&case, &x, &whole(f), req_dir, Some(&positions));
                check_case(&case, &x, &recorded(f), req_dir, Some(&positions));
                let total = f.req.len() + f.resp.len();
                // Every position of small fixtures; the first 256 bytes and
                // 150 more positions of big ones.
                let (head, stride) = if total <= 4096 {
                    (total, 1)
                } else {
                    (256, total / 150)
                };
                for p in (1..total).filter(|&p| p < head || p % stride == 0) {
                    check_case(&case, &x, &split_at(f, p), req_dir, Some(&positions));
                }
            }
        }
    }

    #[test]
    fn fixture_details() {
        // Passwords and auth data never show; the database of the handshake does.
        let case = &cases()[0];
        let (events, _) = play(&case.f, &whole(&case.f), E);
        assert_eq!(calls(&events)[0].operation.as_deref(), Some("SELECT"));
        // The big INSERT: text read up to 64 KiB, db.query.text capped.
        let f = fixture!("mysql", "pymysql_big");
        let (events, _) = play(&f, &whole(&f), E);
        let insert = calls(&events)[2];
        assert_eq!(insert.operation.as_deref(), Some("INSERT"));
        assert!(
            insert
                .query_text
                .as_ref()
                .is_some_and(|t| t.len() <= DbOptions::default().max_query_bytes)
        );
        // Raw text when sanitizing is off, capped on a char boundary.
        let raw = Arc::new(DbOptions {
            sanitize: false,
            max_query_bytes: 20,
            ..DbOptions::default()
        });
        let f = fixture!("mysql", "pymysql_params");
        let (events, _) = play_with(&f, &whole(&f), E, raw, true, usize::MAX);
        let cs = calls(&events);
        assert_eq!(cs[1].query_text.as_deref(), Some("SELECT id, name FROM"));
        assert_eq!(cs[3].query_text.as_deref(), Some("INSERT INTO items (i"));
    }

    // --- capture gaps and mid-stream connections ---------------------------------

    /// The calls of a run, for comparison across runs: everything but text.
    fn shape(
        c: &DbCall,
    ) -> (
        u64,
        Option<String>,
        Option<String>,
        Option<String>,
        bool,
        Moment,
        Moment,
    ) {
        (
            c.seq,
            c.operation.as_deref().map(str::to_owned),
            c.namespace.as_deref().map(str::to_owned),
            c.status_code.clone(),
            c.error,
            c.start,
            c.end,
        )
    }

    #[test]
    fn capture_limit_keeps_calls_and_moments() {
        for case in cases() {
            let f = &case.f;
            let schedule = recorded(f);
            let (full, _) = play(f, &schedule, E);
            for cap in [8192, 4096, 1024] {
                let (cut, conn) = play_with(f, &schedule, E, db_opts(), true, cap);
                let ctx = format!("{} cap {cap}", f.name);
                let a: Vec<_> = calls(&full).into_iter().map(shape).collect();
                let b: Vec<_> = calls(&cut).into_iter().map(shape).collect();
                assert_eq!(a, b, "{ctx}");
                assert_eq!(skips(&full), skips(&cut), "{ctx}");
                assert_eq!(conn.counters().unanswered, 0, "{ctx}");
            }
        }
    }

    #[test]
    fn gap_in_big_result_resyncs() {
        let f = fixture!("mysql", "pymysql_big");
        // The 18 KiB result set arrives in one syscall of which 1000 bytes are captured.
        let schedule = whole(&f);
        let (full, _) = play(&f, &schedule, I);
        let (cut, conn) = play_with(&f, &schedule, I, db_opts(), true, 1000);
        let a: Vec<_> = calls(&full).into_iter().map(shape).collect();
        let b: Vec<_> = calls(&cut).into_iter().map(shape).collect();
        assert_eq!(a, b);
        assert!(conn.counters().resyncs >= 1, "{:?}", conn.counters());
    }

    #[test]
    fn lost_request_side_resyncs_on_next_command() {
        // Drop the request direction's bytes of one command: its call is never
        // seen, the next ones are.
        let f = fixture!("mysql", "cli_queries");
        let schedule = whole(&f);
        let mut conn = MysqlConn::new(db_opts(), true);
        let mut out = Vec::new();
        let mut dropped = false;
        for &(is_req, off, len) in &schedule {
            let (dir, stream) = if is_req { (E, f.req) } else { (I, f.resp) };
            let bytes = &stream[off..off + len];
            if is_req && bytes.get(4) == Some(&COM_QUERY) && find(bytes, b"UPDATE").is_some() {
                // Header and command byte lost, the rest captured.
                conn.feed(dir, moment(is_req, off), &bytes[5..], 0, &mut out);
                dropped = true;
                continue;
            }
            if is_req && off == 0 {
                conn.feed(dir, moment(is_req, off), bytes, 0, &mut out);
                continue;
            }
            conn.feed(dir, moment(is_req, off), bytes, 0, &mut out);
        }
        conn.close(at(u64::MAX), &mut out);
        assert!(dropped);
        check_invariants(&out);
        let cs = calls(&out);
        let statuses: Vec<_> = cs.iter().map(|c| c.status_code.clone()).collect();
        assert_eq!(
            statuses,
            vec![None, None, Some("1064".into()), Some("1146".into()), None]
        );
        assert!(cs.iter().all(|c| !c.unanswered));
    }

    #[test]
    fn mid_stream_connections_find_the_client() {
        for case in cases()
            .into_iter()
            .filter(|c| !c.skip && !c.wants.is_empty())
        {
            let f = &case.f;
            let schedule = recorded(f);
            for req_dir in [E, I] {
                let (full, _) = play(f, &schedule, req_dir);
                let full = calls(&full);
                // Start tracing at each request syscall after the handshake.
                let starts: Vec<usize> = (0..schedule.len())
                    .filter(|&k| schedule[k].0 && schedule[k].1 > 0)
                    .collect();
                for &k in starts.iter().take(6) {
                    let (events, conn) =
                        play_with(f, &schedule[k..], req_dir, db_opts(), false, usize::MAX);
                    let cs = calls(&events);
                    let ctx = format!("{} from syscall {k} ({req_dir:?})", f.name);
                    assert_eq!(skips(&events), 0, "{ctx}");
                    assert_eq!(conn.counters().resyncs, 0, "{ctx}");
                    // Every call seen matches the same call of the full run.
                    let first = full
                        .iter()
                        .position(|c| c.start == cs.first().map_or(Moment::default(), |c| c.start));
                    let Some(first) = first else {
                        assert!(cs.is_empty(), "{ctx}: {cs:#?}");
                        continue;
                    };
                    assert_eq!(cs.len(), full.len() - first, "{ctx}");
                    for (a, b) in cs.iter().zip(&full[first..]) {
                        assert_eq!(
                            (&a.status_code, a.error, a.start, a.end),
                            (&b.status_code, b.error, b.start, b.end),
                            "{ctx}"
                        );
                        // Statements prepared before tracing are unknown.
                        let unknown_stmt = a.operation.as_deref() == Some("EXECUTE")
                            || a.operation.as_deref() == Some("STMT_RESET")
                                && a.query_text.is_none();
                        if !unknown_stmt {
                            assert_eq!(a.operation, b.operation, "{ctx}");
                        }
                        if a.namespace.is_some() {
                            assert_eq!(a.namespace, b.namespace, "{ctx}");
                        }
                    }
                }
            }
        }
    }

    // --- synthetic traffic -------------------------------------------------------

    fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = len.to_le_bytes()[..3].to_vec();
        out.push(seq);
        out.extend_from_slice(payload);
        out
    }

    /// A HandshakeV10 payload with these capabilities (MariaDB style when
    /// CLIENT_MYSQL is unset).
    fn greeting(caps: u64) -> Vec<u8> {
        let mut p = vec![10];
        p.extend_from_slice(b"5.5.5-10.11.19-MariaDB\0");
        p.extend_from_slice(&7u32.to_le_bytes());
        p.extend_from_slice(b"abcdefgh\0");
        p.extend_from_slice(&(caps as u16).to_le_bytes());
        p.push(45);
        p.extend_from_slice(&2u16.to_le_bytes());
        p.extend_from_slice(&((caps >> 16) as u16).to_le_bytes());
        p.push(21);
        p.extend_from_slice(&[0; 6]);
        p.extend_from_slice(&((caps >> 32) as u32).to_le_bytes());
        p.extend_from_slice(b"ijklmnopqrst\0mysql_native_password\0");
        packet(0, &p)
    }

    fn hello(caps: u64, db: Option<&str>) -> Vec<u8> {
        let mut caps = caps | CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION;
        if db.is_some() {
            caps |= CLIENT_CONNECT_WITH_DB;
        }
        let mut p = (caps as u32).to_le_bytes().to_vec();
        p.extend_from_slice(&(1u32 << 24).to_le_bytes());
        p.push(45);
        p.extend_from_slice(&[0; 19]);
        p.extend_from_slice(&((caps >> 32) as u32).to_le_bytes());
        p.extend_from_slice(b"zt\0\x14");
        p.extend_from_slice(&[0x55; 20]);
        if let Some(db) = db {
            p.extend_from_slice(db.as_bytes());
            p.push(0);
        }
        p.extend_from_slice(b"mysql_native_password\0");
        packet(1, &p)
    }

    const OK: &[u8] = &[0, 0, 0, 2, 0, 0, 0];
    const BASE_CAPS: u64 = CLIENT_PROTOCOL_41
        | CLIENT_SECURE_CONNECTION
        | CLIENT_CONNECT_WITH_DB
        | (1 << 16)
        | (1 << 17);

    /// A connection after its handshake: (conn, events).
    fn connected(caps: u64, o: Arc<DbOptions>) -> (MysqlConn, Vec<DbEvent>) {
        let mut conn = MysqlConn::new(o, true);
        let mut out = Vec::new();
        conn.feed(I, at(1), &greeting(caps), 0, &mut out);
        conn.feed(E, at(2), &hello(caps, Some("ztdb")), 0, &mut out);
        conn.feed(I, at(3), &packet(2, OK), 0, &mut out);
        assert!(out.is_empty());
        (conn, out)
    }

    fn query(sql: &str) -> Vec<u8> {
        let mut p = vec![COM_QUERY];
        p.extend_from_slice(sql.as_bytes());
        packet(0, &p)
    }

    fn coldef() -> Vec<u8> {
        let mut p = Vec::new();
        for s in ["def", "ztdb", "t", "t", "c", "c"] {
            p.push(s.len() as u8);
            p.extend_from_slice(s.as_bytes());
        }
        p.extend_from_slice(&[0x0c, 0x21, 0, 0, 1, 0, 0, 0xfd, 0, 0, 0, 0, 0]);
        p
    }

    #[test]
    fn multi_packet_payloads_never_derail() {
        let (mut conn, mut out) = connected(BASE_CAPS, db_opts());
        // A 16 MiB + 10 byte COM_QUERY: two packets.
        let mut sql = vec![COM_QUERY];
        sql.extend_from_slice(b"SELECT '");
        sql.resize(MAX_PACKET as usize + 8, b'x');
        sql.extend_from_slice(b"'");
        let mut bytes = packet(0, &sql[..MAX_PACKET as usize]);
        bytes.extend(packet(1, &sql[MAX_PACKET as usize..]));
        conn.feed(E, at(10), &bytes, 0, &mut out);
        assert_eq!(requests(&out), vec![(0, at(10))]);
        // Result: 1 column, a 16 MiB row starting with 0xfe (an 8-byte
        // length), its continuation starting with 0xfe too, then EOF.
        let mut resp = packet(2, &[1]);
        resp.extend(packet(3, &coldef()));
        resp.extend(packet(4, &[0xfe, 0, 0, 2, 0]));
        let mut row = vec![0xfe];
        row.extend_from_slice(&(MAX_PACKET as u64 + 3).to_le_bytes());
        row.resize(MAX_PACKET as usize, b'y');
        resp.extend(packet(5, &row));
        resp.extend(packet(
            6,
            &[
                0xfe, b'y', b'y', b'y', b'y', b'y', b'y', b'y', b'y', b'y', b'y', b'y',
            ],
        ));
        // In pieces, the first one ending right after the 0xfe.
        let cut = 4 + 1 + 4 + coldef().len() + 4 + 5 + 4 + 1;
        conn.feed(I, at(11), &resp[..cut], 0, &mut out);
        conn.feed(I, at(12), &resp[cut..], 0, &mut out);
        assert!(calls(&out).is_empty(), "{out:?}");
        conn.feed(I, at(13), &packet(7, &[0xfe, 0, 0, 2, 0]), 0, &mut out);
        let cs = calls(&out);
        assert_eq!(cs.len(), 1);
        assert_eq!(
            (cs[0].start, cs[0].end, cs[0].error),
            (at(10), at(13), false)
        );
        assert_eq!(cs[0].operation.as_deref(), Some("SELECT"));
        assert_eq!(conn.counters(), DbCounters::default());
    }

    #[test]
    fn gaps_inside_packets_are_skipped() {
        let (mut conn, mut out) = connected(BASE_CAPS, db_opts());
        // A 20 KiB statement of which 100 bytes are captured.
        let mut sql = b"INSERT INTO t VALUES ('".to_vec();
        sql.resize(20_000, b'z');
        let bytes = query(std::str::from_utf8(&sql).unwrap_or_default());
        conn.feed(
            E,
            at(10),
            &bytes[..100],
            (bytes.len() - 100) as u64,
            &mut out,
        );
        assert_eq!(requests(&out).len(), 1);
        // The OK: header in one syscall, body lost, then the next command.
        conn.feed(I, at(11), &packet(1, OK)[..4], OK.len() as u64, &mut out);
        // What the response was is unknown until the client moves on.
        assert!(calls(&out).is_empty());
        conn.feed(E, at(12), &query("SELECT 1"), 0, &mut out);
        let cs = calls(&out);
        assert_eq!(cs.len(), 1);
        assert_eq!(
            (cs[0].end, cs[0].error, cs[0].status_code.as_deref()),
            (at(11), false, None)
        );
        conn.feed(
            I,
            at(13),
            &packet(1, &[0xff, 0x7a, 0x04, b'#', b'4', b'2', b'S', b'0', b'2']),
            0,
            &mut out,
        );
        let cs = calls(&out);
        assert_eq!(cs[1].status_code.as_deref(), Some("1146"));
        assert_eq!(cs[1].end, at(13));
        assert_eq!(conn.counters().resyncs, 1);
    }

    #[test]
    fn lost_response_ends_at_last_response_syscall() {
        let (mut conn, mut out) = connected(BASE_CAPS, db_opts());
        conn.feed(E, at(10), &query("SELECT c FROM t"), 0, &mut out);
        let mut resp = packet(1, &[1]);
        resp.extend(packet(2, &coldef()));
        resp.extend(packet(3, &[0xfe, 0, 0, 2, 0]));
        for k in 0..100u8 {
            resp.extend(packet(4 + k, &[3, b'a', b'b', b'c']));
        }
        resp.extend(packet(104, &[0xfe, 0, 0, 2, 0]));
        // 50 bytes captured of the first syscall, the rest in a second one.
        let half = resp.len() / 2;
        conn.feed(I, at(11), &resp[..50], (half - 50) as u64, &mut out);
        conn.feed(I, at(12), &resp[half..], 0, &mut out);
        assert!(calls(&out).is_empty());
        // The next command ends it, at the last response syscall.
        conn.feed(E, at(13), &query("SELECT 2"), 0, &mut out);
        let cs = calls(&out);
        assert_eq!(cs.len(), 1);
        assert_eq!(
            (cs[0].end, cs[0].error, cs[0].unanswered),
            (at(12), false, false)
        );
        // The response to the next command is parsed again.
        conn.feed(I, at(14), &packet(1, OK), 0, &mut out);
        let cs = calls(&out);
        assert_eq!((cs.len(), cs[1].end), (2, at(14)));
        assert_eq!(conn.counters().resyncs, 1);
    }

    #[test]
    fn handshake_variants() {
        // SSLRequest: TLS follows; the session drops the ciphertext and the
        // plaintext goes on with the HandshakeResponse numbered 2.
        let mut conn = MysqlConn::new(db_opts(), true);
        let mut out = Vec::new();
        conn.feed(I, at(1), &greeting(BASE_CAPS | CLIENT_SSL), 0, &mut out);
        let mut ssl = ((BASE_CAPS | CLIENT_SSL) as u32).to_le_bytes().to_vec();
        ssl.resize(32, 0);
        conn.feed(E, at(2), &packet(1, &ssl), 0, &mut out);
        assert!(conn.tls_may_start());
        let mut over_tls = hello(BASE_CAPS | CLIENT_SSL, Some("shop"));
        over_tls[3] = 2;
        conn.feed(E, at(3), &over_tls, 0, &mut out);
        conn.feed(I, at(4), &packet(3, OK), 0, &mut out);
        conn.feed(E, at(5), &query("SELECT 1"), 0, &mut out);
        conn.feed(I, at(6), &packet(1, OK), 0, &mut out);
        conn.close(at(7), &mut out);
        let cs = calls(&out);
        assert_eq!(cs.len(), 1, "{out:?}");
        assert_eq!(cs[0].namespace.as_deref(), Some("shop"));

        // Compression agreed: Skip. Offered by one side only: fine.
        for (server, client, skip) in [
            (CLIENT_COMPRESS, CLIENT_COMPRESS, true),
            (CLIENT_COMPRESS, 0, false),
            (0, CLIENT_COMPRESS, false),
            (CLIENT_ZSTD_COMPRESSION, CLIENT_ZSTD_COMPRESSION, true),
        ] {
            let mut conn = MysqlConn::new(db_opts(), true);
            let mut out = Vec::new();
            conn.feed(I, at(1), &greeting(BASE_CAPS | server), 0, &mut out);
            conn.feed(E, at(2), &hello(BASE_CAPS | client, None), 0, &mut out);
            conn.feed(I, at(3), &packet(2, OK), 0, &mut out);
            conn.feed(E, at(4), &query("SELECT 1"), 0, &mut out);
            conn.feed(I, at(5), &packet(1, OK), 0, &mut out);
            assert_eq!(skips(&out), usize::from(skip));
            assert_eq!(calls(&out).len(), usize::from(!skip));
        }

        // Auth switch and more-data packets before the OK; the database of the
        // handshake is the namespace.
        let mut conn = MysqlConn::new(db_opts(), true);
        let mut out = Vec::new();
        conn.feed(I, at(1), &greeting(BASE_CAPS), 0, &mut out);
        conn.feed(E, at(2), &hello(BASE_CAPS, Some("shop")), 0, &mut out);
        conn.feed(
            I,
            at(3),
            &packet(2, b"\xfemysql_native_password\0abcdefghijklmnopqrst\0"),
            0,
            &mut out,
        );
        conn.feed(E, at(4), &packet(3, &[0x42; 20]), 0, &mut out);
        conn.feed(I, at(5), &packet(4, &[0x01, 0x03]), 0, &mut out);
        conn.feed(I, at(6), &packet(5, OK), 0, &mut out);
        conn.feed(E, at(7), &query("SELECT 1"), 0, &mut out);
        conn.feed(I, at(8), &packet(1, OK), 0, &mut out);
        let cs = calls(&out);
        assert_eq!(cs.len(), 1);
        assert_eq!(
            (cs[0].namespace.as_deref(), cs[0].start, cs[0].end),
            (Some("shop"), at(7), at(8))
        );
    }

    #[test]
    fn use_statement_and_session_tracking_change_the_namespace() {
        let (mut conn, mut out) = connected(BASE_CAPS | CLIENT_SESSION_TRACK, db_opts());
        conn.feed(E, at(10), &query("use `my``db`"), 0, &mut out);
        conn.feed(I, at(11), &packet(1, OK), 0, &mut out);
        conn.feed(E, at(12), &query("SELECT 1"), 0, &mut out);
        conn.feed(I, at(13), &packet(1, OK), 0, &mut out);
        // A schema change reported by session tracking (e.g. in a procedure).
        conn.feed(E, at(14), &query("CALL switch_db()"), 0, &mut out);
        conn.feed(
            I,
            at(15),
            &packet(1, b"\x00\x00\x00\x02\x40\x00\x00\x00\x07\x01\x05\x04shop"),
            0,
            &mut out,
        );
        conn.feed(E, at(16), &query("SELECT 2"), 0, &mut out);
        conn.feed(I, at(17), &packet(1, OK), 0, &mut out);
        let ns: Vec<_> = calls(&out)
            .iter()
            .map(|c| c.namespace.as_deref().map(str::to_owned))
            .collect();
        let s = |x: &str| Some(x.to_owned());
        assert_eq!(ns, vec![s("my`db"), s("my`db"), s("my`db"), s("shop")]);
    }

    #[test]
    fn query_attributes_are_skipped() {
        let caps = BASE_CAPS | CLIENT_QUERY_ATTRIBUTES | CLIENT_MYSQL;
        let (mut conn, mut out) = connected(caps, db_opts());
        // No attributes.
        conn.feed(
            E,
            at(10),
            &packet(0, b"\x03\x00\x01SELECT a FROM t"),
            0,
            &mut out,
        );
        conn.feed(I, at(11), &packet(1, OK), 0, &mut out);
        // One attribute: a string named "ts".
        conn.feed(
            E,
            at(12),
            &packet(0, b"\x03\x01\x01\x00\x01\xfe\x00\x02ts\x03abcDELETE FROM t"),
            0,
            &mut out,
        );
        conn.feed(I, at(13), &packet(1, OK), 0, &mut out);
        let ops: Vec<_> = calls(&out)
            .iter()
            .map(|c| c.operation.as_deref().map(str::to_owned))
            .collect();
        assert_eq!(
            ops,
            vec![Some("SELECT".to_owned()), Some("DELETE".to_owned())]
        );
    }

    #[test]
    fn progress_reports_and_local_infile() {
        let (mut conn, mut out) = connected(BASE_CAPS, db_opts());
        conn.feed(E, at(10), &query("ALTER TABLE t ADD c INT"), 0, &mut out);
        conn.feed(
            I,
            at(11),
            &packet(1, b"\xff\xff\xff\x01\x02\x00\x10\x00\x00\x05stage"),
            0,
            &mut out,
        );
        assert!(calls(&out).is_empty());
        conn.feed(I, at(12), &packet(2, OK), 0, &mut out);
        conn.feed(
            E,
            at(13),
            &query("LOAD DATA LOCAL INFILE 'f' INTO TABLE t"),
            0,
            &mut out,
        );
        conn.feed(I, at(14), &packet(1, b"\xfbf"), 0, &mut out);
        // The file: packets with sequence numbers 2, 3 (they are not commands).
        let mut file = packet(2, b"\x03\x17abc");
        file.extend(packet(3, b""));
        conn.feed(E, at(15), &file, 0, &mut out);
        conn.feed(I, at(16), &packet(4, OK), 0, &mut out);
        let cs = calls(&out);
        assert_eq!(cs.len(), 2);
        assert_eq!((cs[0].end, cs[1].end), (at(12), at(16)));
        assert_eq!(requests(&out).len(), 2);
    }

    #[test]
    fn statements_are_bounded_and_forgotten() {
        let o = Arc::new(DbOptions {
            max_statements: 2,
            ..DbOptions::default()
        });
        let (mut conn, mut out) = connected(BASE_CAPS, o);
        let mut t = 10;
        let mut exchange =
            |conn: &mut MysqlConn, out: &mut Vec<DbEvent>, req: Vec<u8>, resp: Vec<u8>| {
                conn.feed(E, at(t), &req, 0, out);
                if !resp.is_empty() {
                    conn.feed(I, at(t + 1), &resp, 0, out);
                }
                t += 2;
            };
        for (id, sql) in [
            (1u32, "SELECT a FROM t1"),
            (2, "UPDATE t2 SET a = ?"),
            (3, "DELETE FROM t3"),
        ] {
            let mut p = vec![COM_STMT_PREPARE];
            p.extend_from_slice(sql.as_bytes());
            let mut okp = vec![0];
            okp.extend_from_slice(&id.to_le_bytes());
            okp.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
            exchange(&mut conn, &mut out, packet(0, &p), packet(1, &okp));
        }
        let execute = |id: u32| {
            let mut p = vec![COM_STMT_EXECUTE];
            p.extend_from_slice(&id.to_le_bytes());
            p.extend_from_slice(&[0, 1, 0, 0, 0]);
            packet(0, &p)
        };
        // Statement 1 was forgotten (max 2), 2 and 3 are known; then 3 is closed.
        exchange(&mut conn, &mut out, execute(1), packet(1, OK));
        exchange(&mut conn, &mut out, execute(2), packet(1, OK));
        exchange(&mut conn, &mut out, execute(3), packet(1, OK));
        let mut close = vec![COM_STMT_CLOSE];
        close.extend_from_slice(&3u32.to_le_bytes());
        exchange(&mut conn, &mut out, packet(0, &close), Vec::new());
        exchange(&mut conn, &mut out, execute(3), packet(1, OK));
        let ops: Vec<_> = calls(&out)
            .iter()
            .skip(3)
            .map(|c| c.operation.as_deref().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(ops, vec!["EXECUTE", "UPDATE", "DELETE", "EXECUTE"]);
        assert!(calls(&out).iter().all(|c| c.status_code.is_none()));
        // Parameters are never exported.
        assert!(!format!("{out:?}").contains("t2 SET a = 1"));
    }

    #[test]
    fn max_pending_overflow_is_counted_and_pairing_stays_aligned() {
        let o = Arc::new(DbOptions {
            max_pending: 2,
            ..DbOptions::default()
        });
        let (mut conn, mut out) = connected(BASE_CAPS, o);
        let mut pipelined = Vec::new();
        for k in 0..4 {
            pipelined.extend(query(&format!("SELECT {k}")));
        }
        conn.feed(E, at(10), &pipelined, 0, &mut out);
        assert_eq!(requests(&out).len(), 2);
        let err = packet(1, b"\xff\x28\x04#42000oops");
        let responses = [packet(1, OK), packet(1, OK), packet(1, OK), err];
        for (k, r) in responses.iter().enumerate() {
            conn.feed(I, at(11 + k as u64), r, 0, &mut out);
        }
        conn.feed(E, at(20), &query("SELECT 9"), 0, &mut out);
        conn.feed(
            I,
            at(21),
            &packet(1, b"\xff\x28\x04#42000oops"),
            0,
            &mut out,
        );
        let cs = calls(&out);
        assert_eq!(cs.len(), 3);
        assert_eq!(
            cs.iter().map(|c| c.end).collect::<Vec<_>>(),
            vec![at(11), at(12), at(21)]
        );
        assert_eq!(cs[2].status_code.as_deref(), Some("1064"));
        assert_eq!(conn.counters().dropped_calls, 2);
    }

    #[test]
    fn close_reports_unanswered_calls() {
        let (mut conn, mut out) = connected(BASE_CAPS, db_opts());
        conn.feed(E, at(10), &query("SELECT SLEEP(100)"), 0, &mut out);
        conn.feed(E, at(11), &packet(0, &[COM_QUIT]), 0, &mut out);
        conn.close(at(99), &mut out);
        let cs = calls(&out);
        assert_eq!(cs.len(), 1);
        assert!(cs[0].unanswered);
        assert_eq!(cs[0].end, at(11));
        assert_eq!(conn.counters().unanswered, 1);
        // Nothing after close.
        let n = out.len();
        conn.feed(E, at(100), &query("SELECT 1"), 0, &mut out);
        conn.close(at(101), &mut out);
        assert_eq!(out.len(), n);
    }

    #[test]
    fn deprecate_eof_is_learnt_mid_stream() {
        // A prepare whose trailing EOF may or may not come: without
        // CLIENT_DEPRECATE_EOF known, the next command settles it.
        let f = fixture!("mysql", "raw_deprecate_eof");
        let schedule = recorded(&f);
        let k = schedule
            .iter()
            .position(|s| s.0 && f.req[s.1 + 4] == COM_STMT_PREPARE)
            .expect("prepare");
        let (events, conn) = play_with(&f, &schedule[k..], E, db_opts(), false, usize::MAX);
        let cs = calls(&events);
        let (full, _) = play(&f, &schedule, E);
        let full = calls(&full);
        let first = full
            .iter()
            .position(|c| c.start == cs[0].start)
            .expect("same call");
        assert_eq!(cs.len(), full.len() - first);
        for (a, b) in cs.iter().zip(&full[first..]) {
            assert_eq!(
                (&a.operation, &a.status_code, a.end),
                (&b.operation, &b.status_code, b.end)
            );
        }
        assert_eq!(conn.caps.deprecate_eof, Some(true));
    }

    // --- detection -----------------------------------------------------------

    #[test]
    fn detection() {
        for case in cases() {
            let greeting = case.f.resp;
            assert_eq!(
                detect(I, greeting),
                Detect::Yes { requests: E },
                "{}",
                case.f.name
            );
            assert_eq!(detect(E, &greeting[..104]), Detect::Yes { requests: I });
            // NeedMore up to the end of the version string, then Yes (the
            // session layer looks at 64 bytes at most).
            let nul = 5 + find(&greeting[5..], b"\0").expect("version end");
            for n in 0..=nul {
                assert_eq!(
                    detect(I, &greeting[..n]),
                    Detect::NeedMore,
                    "{} prefix {n}",
                    case.f.name
                );
            }
            for n in nul + 1..=64 {
                assert_eq!(detect(I, &greeting[..n]), Detect::Yes { requests: E });
            }
            assert_eq!(
                detect(E, case.f.req),
                Detect::No,
                "{} client bytes",
                case.f.name
            );
        }
        let others: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n",
            b"POST /api HTTP/1.1\r\n",
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n",
            b"+OK\r\n",
            b"-ERR unknown command\r\n",
            b"$5\r\nhello\r\n",
            b":1\r\n",
            b"PING\r\n",
            // PostgreSQL: SSLRequest, StartupMessage, GSSENCRequest, an
            // authentication request, ErrorResponse.
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
            b"\x00\x00\x00\x54\x00\x03\x00\x00user\x00postgres\x00database\x00db\x00\x00",
            b"\x00\x00\x00\x08\x04\xd2\x16\x30",
            b"R\x00\x00\x00\x08\x00\x00\x00\x00",
            b"E\x00\x00\x00\x50SFATAL\x00",
            b"NOTICE",
            // TLS ClientHello / ServerHello.
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03",
            // MySQL-ish but not a greeting: wrong seq, protocol 9, version
            // not starting with a digit, non-printable version.
            b"\x4a\x00\x00\x01\x0a5.7.1\x00",
            b"\x4a\x00\x00\x00\x095.7.1\x00",
            b"\x4a\x00\x00\x00\x0aMySQL\x00",
            b"\x4a\x00\x00\x00\x0a5.7\x01\x00",
            b"\x08\x00\x00\x00\x0a5.7.1\x00\x00",
            &[0; 64],
            &[0xff; 64],
        ];
        for b in others {
            assert_eq!(detect(E, b), Detect::No, "{b:?}");
            assert_eq!(detect(I, b), Detect::No, "{b:?}");
        }
    }

    #[test]
    fn non_mysql_traffic_is_skipped_or_ignored() {
        // From the start: HTTP instead of a greeting → hunting, then Skip
        // after the budget; never a call.
        let mut conn = MysqlConn::new(db_opts(), true);
        let mut out = Vec::new();
        let http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(100);
        for k in 0..500 {
            conn.feed(if k % 2 == 0 { E } else { I }, at(k), &http, 0, &mut out);
        }
        assert_eq!(out, vec![DbEvent::Skip]);
    }

    // --- garbage -----------------------------------------------------------

    /// Feeds `bytes` in random pieces, directions and gaps.
    fn chaos(
        rng: &mut Rng,
        req: &[u8],
        resp: &[u8],
        o: Arc<DbOptions>,
        from_start: bool,
    ) -> Vec<DbEvent> {
        let mut conn = MysqlConn::new(o, from_start);
        let mut out = Vec::new();
        let (mut a, mut b) = (0, 0);
        let mut t = 0;
        while a < req.len() || b < resp.len() {
            t += 1;
            let use_req = b >= resp.len() || (a < req.len() && rng.below(2) == 0);
            let (stream, pos, dir) = if use_req {
                (req, &mut a, E)
            } else {
                (resp, &mut b, I)
            };
            let n = (1 + rng.below(64) as usize).min(stream.len() - *pos);
            let missing = if rng.below(10) == 0 {
                rng.below(300)
            } else {
                0
            };
            conn.feed(dir, at(t), &stream[*pos..*pos + n], missing, &mut out);
            *pos += n + (missing as usize).min(stream.len() - *pos - n);
        }
        conn.close(at(t + 1), &mut out);
        check_invariants(&out);
        out
    }

    fn small_opts() -> Arc<DbOptions> {
        Arc::new(DbOptions {
            max_query_bytes: 8,
            sanitize: false,
            max_pending: 2,
            max_statements: 1,
            ..DbOptions::default()
        })
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..300 {
            let n = rng.below(3000) as usize;
            let req: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            let resp: Vec<u8> = (0..rng.below(3000)).map(|_| rng.next() as u8).collect();
            let o = if round % 2 == 0 {
                db_opts()
            } else {
                small_opts()
            };
            chaos(&mut rng, &req, &resp, o, round % 3 != 0);
        }
    }

    #[test]
    fn mysql_like_noise_never_panics() {
        // Packets with plausible headers and random payloads of interesting bytes.
        let mut rng = Rng(42);
        let interesting = [
            0x00, 0x01, 0x02, 0x03, 0x0a, 0x16, 0x17, 0x19, 0x1c, 0xfa, 0xfb, 0xfc, 0xfd, 0xfe,
            0xff,
        ];
        for round in 0..400 {
            let mut streams = [
                greeting(BASE_CAPS | (rng.next() & 0x0fff_ffff)),
                hello(BASE_CAPS, Some("db")),
            ];
            for _ in 0..60 {
                let side = rng.below(2) as usize;
                let len = match rng.below(8) {
                    0 => MAX_PACKET as usize,
                    1 => 0,
                    _ => rng.below(40) as usize,
                };
                let seq = if rng.below(3) == 0 {
                    0
                } else {
                    rng.below(5) as u8
                };
                let mut p = (len as u32).to_le_bytes()[..3].to_vec();
                p.push(seq);
                let body = len.min(40);
                for _ in 0..body {
                    p.push(if rng.below(2) == 0 {
                        interesting[rng.below(interesting.len() as u64) as usize]
                    } else {
                        rng.next() as u8
                    });
                }
                streams[side].extend(p);
            }
            let o = if round % 2 == 0 {
                db_opts()
            } else {
                small_opts()
            };
            let [resp, req] = &streams;
            chaos(&mut rng, req, resp, o, round % 4 != 0);
        }
    }

    #[test]
    fn mutated_fixtures_never_panic() {
        let mut rng = Rng(7);
        for case in cases() {
            for _ in 0..40 {
                let mut req = case.f.req.to_vec();
                let mut resp = case.f.resp.to_vec();
                for _ in 0..1 + rng.below(8) {
                    let s = if rng.below(2) == 0 {
                        &mut req
                    } else {
                        &mut resp
                    };
                    if s.is_empty() {
                        continue;
                    }
                    let k = rng.below(s.len() as u64) as usize;
                    match rng.below(3) {
                        0 => s[k] = rng.next() as u8,
                        1 => {
                            s.remove(k);
                        }
                        _ => s.insert(k, rng.next() as u8),
                    }
                }
                chaos(&mut rng, &req, &resp, db_opts(), true);
                chaos(&mut rng, &req, &resp, small_opts(), false);
            }
        }
    }
}
