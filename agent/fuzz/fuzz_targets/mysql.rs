//! Fuzzes the MySQL/MariaDB connection parser: the input chooses the options,
//! the piece lengths, the directions and the capture gaps of the bytes it
//! feeds.
//!
//! Input layout: one flags byte (bit 0: small limits, bit 1: connection seen
//! mid-stream, bit 2: start after a canned handshake, so that the input is
//! commands and responses; bit 3: the canned handshake agrees on
//! CLIENT_DEPRECATE_EOF), then the piece script that `agent_fuzz::pieces`
//! reads (ctl bit 7 clear: client → server).
#![no_main]

use std::sync::Arc;

use agent_common::Direction;
use agent_fuzz::pieces;
use libfuzzer_sys::fuzz_target;
use zerotrace::protocol::db::{DbEvent, DbOptions, Moment};
use zerotrace::protocol::mysql::MysqlConn;

const CLIENT: Direction = Direction::Egress;
const SERVER: Direction = Direction::Ingress;

fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_le_bytes()[..3].to_vec();
    out.push(seq);
    out.extend_from_slice(payload);
    out
}

/// Greeting, HandshakeResponse41 (database "db") and OK.
fn handshake(deprecate_eof: bool) -> [(Direction, Vec<u8>); 3] {
    // PROTOCOL_41, SECURE_CONNECTION, CONNECT_WITH_DB, MULTI_STATEMENTS,
    // MULTI_RESULTS, PS_MULTI_RESULTS, PLUGIN_AUTH, SESSION_TRACK.
    let mut caps: u32 = 0x0200 | 0x8000 | 0x0008 | 1 << 16 | 1 << 17 | 1 << 18 | 1 << 19 | 1 << 23;
    if deprecate_eof {
        caps |= 1 << 24;
    }
    let mut g = vec![10];
    g.extend_from_slice(b"10.11.0-MariaDB\0\x01\x00\x00\x00abcdefgh\0");
    g.extend_from_slice(&(caps as u16).to_le_bytes());
    g.extend_from_slice(&[45, 2, 0]);
    g.extend_from_slice(&((caps >> 16) as u16).to_le_bytes());
    g.extend_from_slice(&[21, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]);
    g.extend_from_slice(b"ijklmnopqrst\0mysql_native_password\0");
    let mut h = caps.to_le_bytes().to_vec();
    h.extend_from_slice(&[0, 0, 0, 1, 45]);
    h.extend_from_slice(&[0; 19]);
    h.extend_from_slice(&[0x10, 0, 0, 0]);
    h.extend_from_slice(b"u\0\x14");
    h.extend_from_slice(&[0x55; 20]);
    h.extend_from_slice(b"db\0mysql_native_password\0");
    [
        (SERVER, packet(0, &g)),
        (CLIENT, packet(1, &h)),
        (SERVER, packet(2, &[0, 0, 0, 2, 0, 0, 0])),
    ]
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let opts = if flags & 1 == 0 {
        DbOptions::default()
    } else {
        DbOptions {
            max_query_bytes: 8,
            sanitize: false,
            max_pending: 2,
            max_statements: 1,
            ..DbOptions::default()
        }
    };
    let mut conn = MysqlConn::new(Arc::new(opts), flags & 2 == 0);
    let mut out = Vec::new();
    let mut ts = 0u64;
    if flags & 4 != 0 {
        for (dir, bytes) in handshake(flags & 8 != 0) {
            ts += 1;
            conn.feed(dir, Moment { ts_ns: ts, tid: 1, unit: 0 }, &bytes, 0, &mut out);
        }
    }
    for piece in pieces(rest) {
        let dir = if piece.first_side { CLIENT } else { SERVER };
        ts += 1;
        conn.feed(
            dir,
            Moment { ts_ns: ts, tid: 1, unit: 0 },
            piece.bytes,
            piece.missing,
            &mut out,
        );
    }
    conn.close(
        Moment {
            ts_ns: ts + 1,
            tid: 1,
unit: 0,
        },
        &mut out,
    );
    let closed_len = out.len();
    conn.feed(
        CLIENT,
        Moment::default(),
        b"\x09\x00\x00\x00\x03SELECT 1",
        0,
        &mut out,
    );
    conn.close(Moment::default(), &mut out);
    assert_eq!(out.len(), closed_len, "events after close");

    let skips = out.iter().filter(|e| **e == DbEvent::Skip).count();
    assert!(skips <= 1, "Skip twice");
    if skips == 1 {
        assert_eq!(out.last(), Some(&DbEvent::Skip), "events after Skip");
    }
    let (mut last_request, mut last_call) = (None, None);
    let mut announced = Vec::new();
    for event in &out {
        match event {
            DbEvent::Request { seq, .. } => {
                assert!(
                    last_request.is_none_or(|l| *seq > l),
                    "request seqs not increasing"
                );
                last_request = Some(*seq);
                announced.push(*seq);
            }
            DbEvent::Call(call) => {
                assert!(
                    last_call.is_none_or(|l| call.seq > l),
                    "call seqs not increasing"
                );
                last_call = Some(call.seq);
                assert!(announced.contains(&call.seq), "call without its request");
                if let Some(text) = &call.query_text {
                    assert!(text.len() <= 64 * 1024);
                }
            }
            DbEvent::Skip => {}
        }
    }
    // Every announced request ends in exactly one call (close flushes).
    let calls = out.iter().filter(|e| matches!(e, DbEvent::Call(_))).count();
    assert_eq!(calls, announced.len(), "requests without a call");
});
