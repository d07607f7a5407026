//! Connections: the table that attributes every data event to a
//! connection with its tuple and role.

pub mod early;
pub mod own;
pub mod seed;
pub mod unix_diag;

use std::collections::VecDeque;

use agent_common::{Direction, Role};

use crate::{
    IdMap,
    capture::{Data, Endpoint, Open},
};

/// One traced connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub conn_id: u64,
    pub tgid: u32,
    pub fd: i32,
    pub role: Role,
    pub local: Endpoint,
    pub remote: Endpoint,
    pub comm: String,
    /// The thread that connected or accepted it (or first used it) and when.
    pub opened_by: u32,
    pub opened_ns: u64,
    /// The kernel saw connect/accept (not first seen mid-stream).
    pub seen_from_start: bool,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Connection {
    /// Counts the bytes a data event's syscall moved on this connection.
    /// Saturating: `total_bytes` comes from the kernel record unchecked, and
    /// a bogus one must not panic (debug) or wrap the counter (release).
    pub fn count(&mut self, data: &Data<'_>) {
        let counter = match data.direction {
            Direction::Egress => &mut self.bytes_out,
            Direction::Ingress => &mut self.bytes_in,
        };
        *counter = counter.saturating_add(data.total_bytes);
    }
}

/// Connections by id, bounded: when full, the oldest is evicted (and
/// counted), so a flood of connections that never close cannot grow it.
pub struct ConnTable {
    conns: IdMap<u64, Connection>,
    order: VecDeque<u64>,
    capacity: usize,
    seed: seed::Seed,
    pub evicted: u64,
    /// Ids evicted by the last `open`, for the stages that keep state per
    /// connection.
    pub just_evicted: Vec<u64>,
}

impl ConnTable {
    pub fn new(capacity: usize, seed: seed::Seed) -> Self {
        Self {
            conns: IdMap::default(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            seed,
            evicted: 0,
            just_evicted: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn get(&self, conn_id: u64) -> Option<&Connection> {
        self.conns.get(&conn_id)
    }

    pub fn get_mut(&mut self, conn_id: u64) -> Option<&mut Connection> {
        self.conns.get_mut(&conn_id)
    }

    /// Records a connection from a ConnOpen event, resolving an unknown
    /// role from the /proc seed. Returns the stored connection.
    pub fn open(&mut self, open: &Open) -> &Connection {
        let h = &open.header;
        let role = match open.role {
            Role::Unknown => self.seed.role_of(h.tgid, h.fd, &open.local, &open.remote),
            known => known,
        };
        self.just_evicted.clear();
        while self.conns.len() >= self.capacity {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if self.conns.remove(&oldest).is_some() {
                self.evicted += 1;
                self.just_evicted.push(oldest);
            }
        }
        // Ids of closed connections linger in `order`; compact now and then.
        if self.order.len() > 2 * self.capacity {
            let conns = &self.conns;
            self.order.retain(|id| conns.contains_key(id));
        }
        self.order.push_back(h.conn_id);
        self.conns
            .entry(h.conn_id)
            .insert_entry(Connection {
                conn_id: h.conn_id,
                tgid: h.tgid,
                fd: h.fd,
                opened_by: h.tid,
                opened_ns: h.ts_ns,
                role,
                local: open.local.clone(),
                remote: open.remote.clone(),
                comm: open.comm.clone(),
                seen_from_start: open.role != Role::Unknown,
                bytes_in: 0,
                bytes_out: 0,
            })
            .into_mut()
    }

    pub fn close(&mut self, conn_id: u64) -> Option<Connection> {
        self.conns.remove(&conn_id)
    }

    /// Removes the connections of processes that are gone: a process that
    /// exits without close(2) (most load generators, any crash) has its
    /// sockets closed by the kernel with no syscall to see. `alive` is asked
    /// once per process.
    pub fn close_exited(&mut self, alive: impl Fn(u32) -> bool) -> Vec<Connection> {
        let mut verdicts: IdMap<u32, bool> = IdMap::default();
        let gone: Vec<u64> = self
            .conns
            .values()
            .filter(|c| !*verdicts.entry(c.tgid).or_insert_with(|| alive(c.tgid)))
            .map(|c| c.conn_id)
            .collect();
        gone.iter().filter_map(|id| self.conns.remove(id)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::{EventHeader, Syscall};

    #[test]
    fn connections_of_exited_processes_are_closed() {
        let mut t = ConnTable::new(16, seed::Seed::default());
        for (conn_id, tgid) in [(1, 10), (2, 10), (3, 20), (4, 30)] {
            let mut open = open(conn_id, Role::Server);
            open.header.tgid = tgid;
            t.open(&open);
        }
        let asked = std::cell::Cell::new(0);
        let gone = t.close_exited(|tgid| {
            asked.set(asked.get() + 1);
            tgid == 20
        });
        let mut ids: Vec<u64> = gone.iter().map(|c| c.conn_id).collect();
        ids.sort_unstable();
        assert_eq!(ids, [1, 2, 4]);
        assert_eq!(asked.get(), 3, "once per process");
        assert_eq!(t.len(), 1);
        assert!(t.get(3).is_some());
    }

    /// Found by the `event` fuzz target
    /// (agent/fuzz/regressions/event/crash-count-overflow).
    #[test]
    fn byte_counts_saturate() {
        let mut table = ConnTable::new(4, seed::Seed::default());
        table.open(&open(1, Role::Client));
        let conn = table.get_mut(1).unwrap();
        let huge = Data {
            header: EventHeader::default(),
            syscall: Syscall::Write,
            direction: Direction::Egress,
            total_bytes: u64::MAX - 1,
            payload: b"",
            unit: 0,
            unit_seq: 0,
            lost: Default::default(),
        };
        conn.count(&huge);
        conn.count(&huge);
        assert_eq!((conn.bytes_out, conn.bytes_in), (u64::MAX, 0));
        conn.count(&Data {
            syscall: Syscall::Read,
            direction: Direction::Ingress,
            total_bytes: 5,
            ..huge
        });
        assert_eq!(conn.bytes_in, 5);
    }

    fn open(id: u64, role: Role) -> Open {
        Open {
            header: EventHeader {
                conn_id: id,
                tgid: 1,
                fd: id as i32,
                ..Default::default()
            },
            role,
            local: Endpoint::Inet("127.0.0.1:8080".parse().unwrap()),
            remote: Endpoint::Inet("127.0.0.1:50000".parse().unwrap()),
            comm: "x".into(),
        }
    }

    #[test]
    fn bounded_with_eviction_of_the_oldest() {
        let mut table = ConnTable::new(3, seed::Seed::default());
        for id in 1..=5 {
            table.open(&open(id, Role::Client));
        }
        assert_eq!(table.len(), 3);
        assert_eq!(table.evicted, 2);
        assert!(table.get(1).is_none() && table.get(5).is_some());
        assert!(table.close(5).is_some());
        for id in 6..1000 {
            table.open(&open(id, Role::Client));
            table.close(id);
        }
        assert!(table.order.len() <= 2 * 3 + 1);
    }

    #[test]
    fn unknown_roles_come_from_the_seed() {
        let mut seed = seed::Seed::default();
        seed.listeners.insert("127.0.0.1:8080".parse().unwrap());
        let mut table = ConnTable::new(10, seed);
        assert_eq!(table.open(&open(1, Role::Unknown)).role, Role::Server);
        assert_eq!(table.open(&open(2, Role::Client)).role, Role::Client);
    }
}
