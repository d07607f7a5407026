//! Fuzzes the Redis connection parser: the input chooses the options, the
//! piece lengths, the directions and the capture gaps of the bytes it feeds.
//!
//! Input layout: one flags byte (bit 0: small limits, bit 1: connection seen
//! mid-stream, bit 2: no sanitizing), then the piece script that
//! `agent_fuzz::pieces` reads (ctl bit 7 clear: the client).
//!
//! Checked: no panic; every Call follows its Request; Request and Call seqs
//! strictly increase; Skip at most once and last; nothing after close.
#![no_main]

use std::sync::Arc;

use agent_common::Direction;
use agent_fuzz::pieces;
use libfuzzer_sys::fuzz_target;
use zerotrace::protocol::db::{DbEvent, DbOptions, Moment};
use zerotrace::protocol::redis::{RedisConn, detect};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut opts = if flags & 1 == 0 {
        DbOptions::default()
    } else {
        DbOptions {
            max_query_bytes: 5,
            max_pending: 2,
            ..DbOptions::default()
        }
    };
    opts.sanitize = flags & 4 == 0;
    let mut conn = RedisConn::new(Arc::new(opts), flags & 2 == 0);
    let mut out = Vec::new();
    let mut ts = 0u64;
    for piece in pieces(rest) {
        let dir = if piece.first_side {
            Direction::Egress
        } else {
            Direction::Ingress
        };
        if ts == 0 {
            let _ = detect(dir, piece.bytes);
        }
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
        b"*1\r\n$4\r\nPING\r\n",
        0,
        &mut out,
    );
    conn.feed(
        Direction::Ingress,
        Moment::default(),
        b"+PONG\r\n",
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
            DbEvent::Request { seq, start } => {
                assert!(
                    last_request.is_none_or(|l| *seq > l),
                    "request seqs not increasing"
                );
                last_request = Some(*seq);
                announced.push((*seq, *start));
            }
            DbEvent::Call(c) => {
                assert!(
                    last_call.is_none_or(|l| c.seq > l),
                    "call seqs not increasing"
                );
                last_call = Some(c.seq);
                assert!(
                    announced.contains(&(c.seq, c.start)),
                    "call without its request"
                );
                assert!(c.end.ts_ns >= c.start.ts_ns, "call ends before it starts");
            }
            DbEvent::Skip => {}
        }
    }
});
