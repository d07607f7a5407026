//! The agent's own TCP sockets. The kernel never captures the agent's
//! traffic, but the other end of it — a collector on this host receiving
//! our exports — is a traced process; its server spans would be exported
//! again and feed on themselves. Connections whose peer is one of our
//! sockets are therefore ignored.

use std::{
    collections::HashSet,
    mem::ManuallyDrop,
    net::{SocketAddr, TcpStream},
    os::fd::FromRawFd,
    time::{Duration, Instant},
};

/// Re-reading /proc on a miss at most this often bounds the cost when many
/// loopback connections open.
const MIN_REFRESH: Duration = Duration::from_millis(50);
/// Most addresses remembered from the kernel's reports (a refresh starts over).
const MAX_REMEMBERED: usize = 4096;

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

    /// Whether `peer` is known to be ours, without looking again.
    pub fn knows(&self, peer: SocketAddr) -> bool {
        self.local.contains(&peer)
    }

    /// The kernel saw the agent connect from `local` (before the peer's
    /// first byte): exact, where a look at our fds may come too early.
    pub fn insert(&mut self, local: SocketAddr) {
        if self.local.len() >= MAX_REMEMBERED {
            self.local.clear();
            self.refreshed = None;
        }
        self.local.insert(local);
    }

    /// Asks each of our socket fds for its address: the cost follows the
    /// agent's own fds, not the host's connection count (parsing
    /// /proc/net/tcp with 20k TIME_WAIT entries 20 times a second stalled
    /// the pipeline).
    fn refresh(&mut self) {
        self.refreshed = Some(Instant::now());
        self.local.clear();
        let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
            return;
        };
        for entry in fds.flatten() {
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            if !std::fs::read_link(entry.path())
                .is_ok_and(|t| t.as_os_str().as_encoded_bytes().starts_with(b"socket:"))
            {
                continue;
            }
            // SAFETY: the fd is borrowed for one getsockname(2) and never
            // closed here (ManuallyDrop); a socket closed meanwhile just
            // gives an error.
            let socket = ManuallyDrop::new(unsafe { TcpStream::from_raw_fd(fd) });
            if let Ok(addr) = socket.local_addr() {
                self.local.insert(addr);
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
