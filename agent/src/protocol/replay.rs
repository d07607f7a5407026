//! Test support shared by the protocol parsers: fixtures recorded from real
//! servers and clients (`fixtures/PROTOCOL/NAME.{req,resp,order}`, written
//! by each directory's `record.py`), replayed as syscall schedules.

use std::sync::Arc;

use super::{
    db::{DbCall, DbEvent, DbOptions},
    http::Moment,
};

/// A moment at `ts_ns` on thread 7.
pub fn at(ts_ns: u64) -> Moment {
    Moment {
        ts_ns,
        tid: 7,
        unit: 0,
    }
}

/// Default options of the database parsers.
pub fn db_opts() -> Arc<DbOptions> {
    Arc::new(DbOptions::default())
}

/// The calls among parser events.
pub fn calls(events: &[DbEvent]) -> Vec<&DbCall> {
    events
        .iter()
        .filter_map(|e| match e {
            DbEvent::Call(c) => Some(c),
            _ => None,
        })
        .collect()
}

/// One recorded connection: each direction's bytes and the relay's reads.
pub struct Fixture {
    pub name: &'static str,
    pub req: &'static [u8],
    pub resp: &'static [u8],
    /// The relay's reads: `> LEN` (client → server) or `< LEN`.
    pub order: &'static str,
}

/// `fixture!("redis", "cli_basic")`: the files under `fixtures/redis/`.
macro_rules! fixture {
    ($protocol:literal, $name:literal) => {
        $crate::protocol::replay::Fixture {
            name: $name,
            req: include_bytes!(concat!("fixtures/", $protocol, "/", $name, ".req")),
            resp: include_bytes!(concat!("fixtures/", $protocol, "/", $name, ".resp")),
            order: include_str!(concat!("fixtures/", $protocol, "/", $name, ".order")),
        }
    };
}
pub(crate) use fixture;

/// One syscall of a schedule: direction (true = the request direction),
/// offset of its first byte in that direction's stream, length.
pub type Syscall = (bool, usize, usize);

/// The relay's reads, in the order they happened.
pub fn recorded(f: &Fixture) -> Vec<Syscall> {
    let mut offsets = [0usize; 2];
    let mut out = Vec::new();
    for line in f.order.lines() {
        let (tag, len) = line.split_once(' ').expect("order line");
        let is_req = tag == ">";
        let len: usize = len.parse().expect("order length");
        let off = &mut offsets[usize::from(!is_req)];
        out.push((is_req, *off, len));
        *off += len;
    }
    assert_eq!(
        offsets,
        [f.req.len(), f.resp.len()],
        "{}: order file",
        f.name
    );
    out
}

/// Consecutive reads in one direction merged: each direction's bytes as few
/// syscalls as the real interleaving allows.
pub fn whole(f: &Fixture) -> Vec<Syscall> {
    let mut out: Vec<Syscall> = Vec::new();
    for s in recorded(f) {
        match out.last_mut() {
            Some(last) if last.0 == s.0 => last.2 += s.2,
            _ => out.push(s),
        }
    }
    out
}

/// One byte per syscall.
pub fn bytewise(f: &Fixture) -> Vec<Syscall> {
    recorded(f)
        .into_iter()
        .flat_map(|(r, off, len)| (off..off + len).map(move |o| (r, o, 1)))
        .collect()
}

/// `whole` with the syscall holding global byte `p` split in two there.
pub fn split_at(f: &Fixture, p: usize) -> Vec<Syscall> {
    let mut out = Vec::new();
    let mut global = 0;
    for (r, off, len) in whole(f) {
        if p > global && p < global + len {
            let k = p - global;
            out.push((r, off, k));
            out.push((r, off + k, len - k));
        } else {
            out.push((r, off, len));
        }
        global += len;
    }
    out
}

/// Each syscall's moment encodes where its bytes start: tid 1 / 2 for the
/// request / response direction, ts = tid << 40 | offset.
pub fn moment(is_req: bool, off: usize) -> Moment {
    let tid = if is_req { 1 } else { 2 };
    Moment {
        ts_ns: (u64::from(tid) << 40) | off as u64,
        tid,
        unit: 0,
    }
}

/// The moment of the syscall carrying byte `off` of a direction.
pub fn moment_of(schedule: &[Syscall], is_req: bool, off: u64) -> Moment {
    let off = off as usize;
    let s = schedule
        .iter()
        .find(|s| s.0 == is_req && s.1 <= off && off < s.1 + s.2)
        .expect("byte in schedule");
    moment(is_req, s.1)
}

/// The stream offset a moment encodes.
pub fn offset(m: Moment) -> u64 {
    m.ts_ns & ((1 << 40) - 1)
}

/// xorshift64*: deterministic pseudo-random numbers without extra crates.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
