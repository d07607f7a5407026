//! Attribution: each decoded kernel record gets its connection. Pure
//! bookkeeping over the connection table, no kernel, so benchmarks and
//! tests drive it with records built in memory.

use std::time::Instant;

use super::Record;
use crate::{
    capture::{Data, Event},
    conn::{ConnTable, Connection, early::EarlyQueue},
};

/// Attributes each record to its connection (opening, counting and closing
/// them in the table) and hands it on as a [`Record`].
pub struct Attributor {
    pub(super) conns: ConnTable,
    /// Data read before its connection's open record (perf reorders CPUs).
    early: EarlyQueue,
    pub(super) data_events: u64,
    pub(super) payload_bytes: u64,
    pub(super) orphans: u64,
}

/// Counts a data event on its connection and hands it on.
fn deliver(conn: &mut Connection, data: &Data<'_>, on_record: &mut impl FnMut(Record<'_>)) {
    conn.count(data);
    on_record(Record::Data(Some(conn), data));
}

impl Attributor {
    pub fn new(conns: ConnTable) -> Self {
        Self {
            conns,
            early: EarlyQueue::default(),
            data_events: 0,
            payload_bytes: 0,
            orphans: 0,
        }
    }

    /// Handles one decoded record read at `now`.
    pub fn event(
        &mut self,
        event: Event<'_>,
        now: Instant,
        on_record: &mut impl FnMut(Record<'_>),
    ) {
        let Self {
            conns,
            early,
            data_events,
            payload_bytes,
            orphans,
        } = self;
        match event {
            Event::Open(open) => {
                conns.open(&open);
                for id in std::mem::take(&mut conns.just_evicted) {
                    on_record(Record::Evicted(id));
                }
                if let Some(conn) = conns.get_mut(open.header.conn_id) {
                    on_record(Record::Opened(conn));
                    for held in early.take(open.header.conn_id) {
                        deliver(conn, &held.as_data(), on_record);
                    }
                }
            }
            Event::Data(data) => {
                *data_events += 1;
                *payload_bytes += data.payload.len() as u64;
                match conns.get_mut(data.header.conn_id) {
                    Some(conn) => deliver(conn, &data, on_record),
                    None => {
                        if !early.hold(&data, now) {
                            *orphans += 1;
                            on_record(Record::Data(None, &data));
                        }
                    }
                }
            }
            Event::Close(header) => {
                if let Some(conn) = conns.close(header.conn_id) {
                    on_record(Record::Closed(&conn));
                }
            }
            Event::Unit(unit) => on_record(Record::Unit(&unit)),
            // For the library followers only (see `Followers::observe`).
            Event::Mapped(_) => {}
            Event::OwnConnect(local, _) => on_record(Record::OwnConnect(local)),
        }
    }

    /// Closes the connections of processes for which `alive` is false
    /// (their sockets went with them, without a close(2) to see).
    pub fn close_exited(
        &mut self,
        alive: impl Fn(u32) -> bool,
        on_record: &mut impl FnMut(Record<'_>),
    ) {
        for conn in self.conns.close_exited(alive) {
            on_record(Record::Closed(&conn));
        }
    }

    /// Gives up on data that waited too long for its open record.
    pub fn expire(&mut self, now: Instant, on_record: &mut impl FnMut(Record<'_>)) {
        for held in self.early.expire(now) {
            self.orphans += 1;
            on_record(Record::Data(None, &held.as_data()));
        }
    }
}
