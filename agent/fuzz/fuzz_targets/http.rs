//! Fuzzes the HTTP/1.x connection parser: the input chooses the options, the
//! piece lengths, the directions and the capture gaps of the bytes it feeds.
//!
//! Input layout: one flags byte (bit 0: small limits, bit 1: connection seen
//! mid-stream), then the piece script that `agent_fuzz::pieces` reads (ctl bit 7
//! clear: the side that speaks first).
#![no_main]

use std::sync::Arc;

use agent_common::Direction;
use agent_fuzz::pieces;
use libfuzzer_sys::fuzz_target;
use zerotrace::protocol::http::{Detection, HttpConn, HttpEvent, HttpOptions, Moment};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let opts = if flags & 1 == 0 {
        HttpOptions::default()
    } else {
        HttpOptions {
            max_head_bytes: 64,
            max_value_bytes: 4,
            max_pending: 2,
            ..HttpOptions::default()
        }
    };
    let mut conn = HttpConn::new(Arc::new(opts), flags & 2 == 0);
    let mut out = Vec::new();
    let mut ts = 0u64;
    for piece in pieces(rest) {
        let dir = if piece.first_side {
            Direction::Egress
        } else {
            Direction::Ingress
        };
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
        b"GET / HTTP/1.1\r\n\r\n",
        0,
        &mut out,
    );
    conn.close(Moment::default(), &mut out);
    assert_eq!(out.len(), closed_len, "events after close");

    let not_http = out.iter().filter(|e| **e == HttpEvent::NotHttp).count();
    assert!(not_http <= 1, "NotHttp twice");
    assert_eq!(not_http == 1, conn.detection() == Detection::NotHttp);
    if not_http == 1 {
        assert_eq!(
            out.last(),
            Some(&HttpEvent::NotHttp),
            "events after NotHttp"
        );
    }
    let (mut last_request, mut last_exchange) = (None, None);
    let mut announced = Vec::new();
    for event in &out {
        match event {
            HttpEvent::Request(r) => {
                assert!(
                    last_request.is_none_or(|l| r.seq > l),
                    "request seqs not increasing"
                );
                last_request = Some(r.seq);
                announced.push(r.seq);
            }
            HttpEvent::Exchange(x) => {
                let seq = x.request.seq;
                assert!(
                    last_exchange.is_none_or(|l| seq > l),
                    "exchange seqs not increasing"
                );
                last_exchange = Some(seq);
                assert!(
                    announced.contains(&seq),
                    "exchange without its request event"
                );
            }
            HttpEvent::NotHttp => {}
        }
    }
});
