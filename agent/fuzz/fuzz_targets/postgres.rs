//! Fuzzes the PostgreSQL connection parser: the input chooses the options,
//! the piece lengths, the directions and the capture gaps of the bytes it
//! feeds.
//!
//! Input layout: one flags byte (bit 0: small limits, bit 1: connection seen
//! mid-stream, bit 2: raw query text, bit 3: start with a real startup and
//! authentication exchange so the input begins in the query phase, bit 4:
//! that exchange in the other direction), then records of
//! `ctl [len] [missing] bytes…` where ctl bit 7 is the direction, bit 6
//! announces a `missing` byte, bits 0..5 the piece length (0: the length is
//! the next byte × 16 + 1).
#![no_main]

use std::sync::Arc;

use agent_common::Direction;
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
    let Some((&flags, mut rest)) = data.split_first() else {
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
        conn.feed(front, Moment { ts_ns: 0, tid: 1 }, &startup(), 0, &mut out);
        conn.feed(back, Moment { ts_ns: 0, tid: 1 }, &auth_ok(), 0, &mut out);
    }
    while let Some((&ctl, mut tail)) = rest.split_first() {
        let dir = if ctl & 0x80 == 0 { front } else { back };
        let mut len = usize::from(ctl & 0x3f);
        if len == 0 {
            let Some((&b, t)) = tail.split_first() else {
                break;
            };
            len = usize::from(b) * 16 + 1;
            tail = t;
        }
        let mut missing = 0u64;
        if ctl & 0x40 != 0 {
            let Some((&m, t)) = tail.split_first() else {
                break;
            };
            missing = if m < 128 {
                u64::from(m)
            } else {
                u64::from(m) << 8
            };
            tail = t;
        }
        let (piece, t) = tail.split_at(len.min(tail.len()));
        ts += 1;
        conn.feed(dir, Moment { ts_ns: ts, tid: 1 }, piece, missing, &mut out);
        rest = t;
    }
    conn.close(
        Moment {
            ts_ns: ts + 1,
            tid: 1,
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
