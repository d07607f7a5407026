//! The agent's own TCP sockets. The kernel never captures the agent's
//! traffic, but the other end of it — a collector on this host receiving
//! our exports — is a traced process; its server spans would be exported
//! again and feed on themselves. Connections whose peer is one of our
//! sockets are therefore ignored.

use std::{
    collections::HashSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use procfs::process::{FDTarget, Process};

/// Re-reading /proc on a miss at most this often bounds the cost when many
/// loopback connections open.
const MIN_REFRESH: Duration = Duration::from_millis(50);

#[derive(Debug, Default)]
pub struct OwnSockets {
    local: HashSet<SocketAddr>,
    refreshed: Option<Instant>,
}

impl OwnSockets {
    /// Whether `peer` is the local address of one of the agent's sockets.
    pub fn is_own(&mut self, peer: SocketAddr) -> bool {
        if peer.ip().is_unspecified() || peer.ip().is_multicast() {
            return false;
        }
        if self.local.contains(&peer) {
            return true;
        }
        if self.refreshed.is_none_or(|t| t.elapsed() >= MIN_REFRESH) {
            self.refresh();
        }
        self.local.contains(&peer)
    }

    fn refresh(&mut self) {
        self.refreshed = Some(Instant::now());
        self.local.clear();
        let Ok(me) = Process::myself() else { return };
        let inodes: HashSet<u64> = me
            .fd()
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|fd| match fd.target {
                FDTarget::Socket(inode) => Some(inode),
                _ => None,
            })
            .collect();
        let entries = me
            .tcp()
            .into_iter()
            .flatten()
            .chain(me.tcp6().into_iter().flatten());
        for entry in entries {
            if inodes.contains(&entry.inode) {
                self.local.insert(entry.local_address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_socket_of_this_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let mut own = OwnSockets::default();
        assert!(own.is_own(client.local_addr().unwrap()));
        assert!(!own.is_own("127.0.0.1:1".parse().unwrap()));
    }
}
