//! Fuzzes the PostgreSQL connection parser: the input chooses the options,
//! the piece lengths, the directions and the capture gaps of the bytes it
//! feeds.
//!
//! Input layout: one flags byte (bit 0: small limits, bit 1: connection seen
//! mid-stream, bit 2: raw query text, bit 3: start with a real startup and
//! authentication exchange so the input begins in the query phase, bit 4:
//! that exchange in the other direction), then the piece script that `agent_fuzz::pieces` reads (ctl bit 7
//! clear: the side that speaks first).
#![no_main]

use std::sync::Arc;

use agent_common::Direction;
use agent_fuzz::pieces;
use libfuzzer_sys::fuzz_target;
use zerotrace::protocol::db::{DbEvent, DbOptions, Moment};
use zerotrace::protocol::postgres::PostgresConn;

fn msg(t: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![t];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn startup() -> Vec<u8> {
    let body = b"\x00\x03\x00\x00user\0postgres\0database\0db\0\0";
    let mut m = (body.len() as u32 + 4).to_be_bytes().to_vec();
    m.extend_from_slice(body);
    m
}

fn auth_ok() -> Vec<u8> {
    let mut v = msg(b'R', &[0, 0, 0, 0]);
    v.extend(msg(b'S', b"server_version\x0015.18\0"));
    v.extend(msg(b'K', &[0, 0, 0, 1, 0, 0, 0, 2]));
    v.extend(msg(b'Z', b"I"));
    v
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let opts = DbOptions {
        sanitize: flags & 4 == 0,
        ..if flags & 1 == 0 {
            DbOptions::default()
        } else {
            DbOptions {
                max_query_bytes: 8,
                max_pending: 2,
                max_statements: 1,
                ..DbOptions::default()
            }
        }
    };
    let (front, back) = if flags & 16 == 0 {
        (Direction::Egress, Direction::Ingress)
    } else {
        (Direction::Ingress, Direction::Egress)
    };
    let mut conn = PostgresConn::new(Arc::new(opts), flags & 2 == 0);
    let mut out = Vec::new();
    let mut ts = 0u64;
    if flags & 8 != 0 {
        conn.feed(front, Moment { ts_ns: 0, tid: 1, unit: 0 }, &startup(), 0, &mut out);
        conn.feed(back, Moment { ts_ns: 0, tid: 1, unit: 0 }, &auth_ok(), 0, &mut out);
    }
    for piece in pieces(rest) {
        let dir = if piece.first_side { front } else { back };
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
        Direction::Egress,
        Moment::default(),
        &msg(b'Q', b"SELECT 1\0"),
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
    let mut open = Vec::new();
    for event in &out {
        match event {
            DbEvent::Request { seq, start } => {
                assert!(
                    last_request.is_none_or(|l| *seq > l),
                    "request seqs not increasing"
                );
                last_request = Some(*seq);
                open.push((*seq, *start));
            }
            DbEvent::Call(call) => {
                assert!(
                    last_call.is_none_or(|l| call.seq > l),
                    "call seqs not increasing"
                );
                last_call = Some(call.seq);
                let k = open
                    .iter()
                    .position(|(s, _)| *s == call.seq)
                    .expect("call without its request event");
                assert_eq!(open[k].1, call.start, "call start differs from its request");
                open.remove(k);
                if let Some(text) = &call.query_text {
                    assert!(text.len() <= conn_max(flags), "query text not capped");
                }
            }
            DbEvent::Skip => {}
        }
    }
    assert!(open.is_empty(), "requests without a call after close");
});

fn conn_max(flags: u8) -> usize {
    if flags & 1 == 0 {
        DbOptions::default().max_query_bytes
    } else {
        8
    }
}
