//! Fuzzes the kernel-record decoder (`capture::decode`) and the connection
//! bookkeeping that follows it in the pipeline (`ConnTable`, `EarlyQueue`):
//! pure code, no kernel.
//!
//! Input layout: one flags byte (bits 0..2: connection-table capacity - 1),
//! then records of `len_lo len_hi bytes…` (little-endian u16 length; the last
//! record may be cut short), each decoded as one record off the buffer.
#![no_main]

use std::time::{Duration, Instant};

use agent_common::MappedEvent;
use libfuzzer_sys::fuzz_target;
use zerotrace::capture::{DecodeError, Event, decode};
use zerotrace::conn::{ConnTable, early::EarlyQueue, seed::Seed};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let capacity = usize::from(flags & 7) + 1;
    let mut conns = ConnTable::new(capacity, Seed::default());
    let mut early = EarlyQueue::default();
    let start = Instant::now();
    let mut step = 0u64;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let (record, tail) = rest[2..].split_at(len.min(rest.len() - 2));
        rest = tail;
        step += 1;
        let now = start + Duration::from_millis(step * 100);
        match decode(record) {
            Ok(Event::Open(open)) => {
                let conn = conns.open(&open);
                assert_eq!(conn.conn_id, open.header.conn_id);
                assert!(conns.len() <= capacity, "table over capacity");
                for id in std::mem::take(&mut conns.just_evicted) {
                    assert!(conns.get(id).is_none() || id == open.header.conn_id);
                }
                let conn = conns
                    .get_mut(open.header.conn_id)
                    .expect("just opened connection");
                for held in early.take(open.header.conn_id) {
                    let d = held.as_data();
                    assert_eq!(d.header.conn_id, open.header.conn_id);
                    conn.count(&d);
                }
            }
            Ok(Event::Data(d)) => {
                assert!(d.payload.len() as u64 <= d.total_bytes);
                assert!(d.payload.len() <= record.len());
                match conns.get_mut(d.header.conn_id) {
                    Some(conn) => conn.count(&d),
                    None => {
                        early.hold(&d, now);
                    }
                }
            }
            Ok(Event::Close(header)) => {
                if let Some(conn) = conns.close(header.conn_id) {
                    assert_eq!(conn.conn_id, header.conn_id);
                }
            }
            // A runtime's new unit: a fixed-size record, nothing to own.
            Ok(Event::Unit(unit)) => {
                assert!(std::mem::size_of_val(&unit) <= record.len());
            }
            // A file mapped executable: a fixed-size record naming the
            // file, or no file when the kernel could not read its inode.
            Ok(Event::Mapped(mapped)) => {
                assert!(std::mem::size_of::<MappedEvent>() <= record.len());
                assert!(mapped.file.is_none_or(|(_, ino)| ino != 0));
            }
            Ok(Event::OwnConnect(_, header)) => {
                assert!(std::mem::size_of_val(&header) <= record.len());
            }
            Err(DecodeError::Short { len, need }) => assert!(len < need),
            Err(_) => {}
        }
        for held in early.expire(now) {
            let _ = held.as_data();
        }
    }
});
