//! What /proc (and, for unix sockets, sock_diag) says about processes and
//! sockets that existed before the agent: which processes a `--pid`/`--exe`
//! selection means, and the role of connections the kernel first sees
//! mid-stream.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
};

use agent_common::Role;

use super::unix_diag;
use crate::capture::Endpoint;
use procfs::{
    net::{TcpNetEntry, TcpState},
    process::{FDTarget, Process, all_processes},
};

/// Pids a selection means now: the given pids and their descendants, plus
/// processes whose executable or command name is one of `exes`.
pub fn select_pids(pids: &[u32], exes: &[String]) -> Vec<u32> {
    let mut parent_of: HashMap<u32, u32> = HashMap::new();
    let mut selected: HashSet<u32> = pids.iter().copied().collect();
    if let Ok(procs) = all_processes() {
        for process in procs.flatten() {
            let Ok(stat) = process.stat() else { continue };
            let pid = stat.pid as u32;
            parent_of.insert(pid, stat.ppid as u32);
            if !exes.is_empty() && matches_exe(&process, &stat.comm, exes) {
                selected.insert(pid);
            }
        }
    }
    // Descendants of --pid processes (e.g. workers of a pre-forking server).
    if !pids.is_empty() {
        let roots: HashSet<u32> = pids.iter().copied().collect();
        for &pid in parent_of.keys() {
            let mut cur = pid;
            for _ in 0..64 {
                let Some(&parent) = parent_of.get(&cur) else {
                    break;
                };
                if roots.contains(&parent) {
                    selected.insert(pid);
                    break;
                }
                if parent <= 1 {
                    break;
                }
                cur = parent;
            }
        }
    }
    selected.remove(&std::process::id());
    let mut out: Vec<u32> = selected.into_iter().collect();
    out.sort_unstable();
    out
}

/// The selected processes, or every process when none is selected (the
/// agent itself left out).
pub fn selected_or_all(pids: &[u32], exes: &[String]) -> Vec<u32> {
    if !pids.is_empty() || !exes.is_empty() {
        return select_pids(pids, exes);
    }
    let own = std::process::id();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&pid| pid != own)
        .collect()
}

fn matches_exe(process: &Process, comm: &str, exes: &[String]) -> bool {
    let exe_name = process
        .exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    exes.iter().any(|want| {
        exe_name.as_deref() == Some(want.as_str())
            // comm is the first 15 bytes of the name the process was exec'd as.
            || comm == want.get(..want.len().min(15)).unwrap_or(want)
    })
}

/// Snapshot of open TCP and unix stream sockets, taken once after the
/// probes are attached.
#[derive(Debug, Default)]
pub struct Seed {
    /// (pid, fd) → the role of its connection.
    pub conns: HashMap<(u32, i32), Role>,
    /// Local addresses in LISTEN state, over all network namespaces seen.
    pub listeners: HashSet<SocketAddr>,
    /// Names of listening unix sockets (the agent's network namespace).
    pub unix_listeners: HashSet<String>,
}

impl Seed {
    /// Scans /proc: every process's socket fds, joined with the TCP tables
    /// of its network namespace (read once per namespace).
    pub fn scan() -> Self {
        let mut seed = Seed::default();
        let mut tables: HashMap<u64, HashMap<u64, TcpNetEntry>> = HashMap::new();
        // Unix sockets: which end of each connection was accepted (its
        // name is its listener's), from the kernel's sock_diag, which
        // knows peers where /proc does not.
        let unix_roles = match unix_diag::stream_sockets() {
            Ok(sockets) => {
                seed.unix_listeners = sockets
                    .iter()
                    .filter(|s| s.listening)
                    .filter_map(|s| s.name.clone())
                    .collect();
                unix_diag::roles(&sockets)
            }
            Err(e) => {
                log::info!("unix sockets not seeded ({e}); roles come from their names");
                HashMap::new()
            }
        };
        let Ok(procs) = all_processes() else {
            return seed;
        };
        let me = std::process::id() as i32;
        for process in procs.flatten() {
            if process.pid == me {
                continue;
            }
            let Ok(fds) = process.fd() else { continue };
            let sockets: Vec<(i32, u64)> = fds
                .flatten()
                .filter_map(|fd| match fd.target {
                    FDTarget::Socket(inode) => Some((fd.fd, inode)),
                    _ => None,
                })
                .collect();
            if sockets.is_empty() {
                continue;
            }
            let netns = std::fs::metadata(format!("/proc/{}/ns/net", process.pid))
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                .unwrap_or(0);
            let table = tables.entry(netns).or_insert_with(|| {
                let entries = process
                    .tcp()
                    .into_iter()
                    .flatten()
                    .chain(process.tcp6().into_iter().flatten());
                entries.map(|e| (e.inode, e)).collect()
            });
            for entry in table.values() {
                if entry.state == TcpState::Listen {
                    seed.listeners.insert(entry.local_address);
                }
            }
            for (fd, inode) in sockets {
                let role = match table.get(&inode) {
                    Some(entry) if entry.state == TcpState::Listen => continue,
                    Some(entry) => role_from_listeners(&seed.listeners, entry.local_address),
                    None => match unix_roles.get(&inode) {
                        Some(&role) => role,
                        None => continue,
                    },
                };
                seed.conns.insert((process.pid as u32, fd), role);
            }
        }
        seed
    }

    /// Role of a connection first seen mid-stream.
    pub fn role_of(&self, pid: u32, fd: i32, local: &Endpoint, remote: &Endpoint) -> Role {
        if let Some(&role) = self.conns.get(&(pid, fd)) {
            return role;
        }
        match local {
            Endpoint::Inet(local) => role_from_listeners(&self.listeners, *local),
            Endpoint::Unix(_) => unix_role(&self.unix_listeners, local, remote),
        }
    }
}

/// The role of a unix connection from its names: an accepted socket
/// carries its listener's name, a connecting one usually none. Unknown
/// when both or neither are named (a socketpair, a bound client).
pub fn unix_role(listeners: &HashSet<String>, local: &Endpoint, remote: &Endpoint) -> Role {
    let listening = |name: Option<&str>| name.is_some_and(|n| listeners.contains(n));
    match (local.unix_name(), remote.unix_name()) {
        (Some(_), None) => Role::Server,
        (None, Some(_)) => Role::Client,
        (l, r) if listening(l) && !listening(r) => Role::Server,
        (l, r) if listening(r) && !listening(l) => Role::Client,
        _ => Role::Unknown,
    }
}

/// A connection whose local address is a listening address was accepted.
pub fn role_from_listeners(listeners: &HashSet<SocketAddr>, local: SocketAddr) -> Role {
    let wildcard = |addr: SocketAddr| {
        listeners
            .iter()
            .any(|l| l.port() == addr.port() && l.ip().is_unspecified())
    };
    if listeners.contains(&local) || wildcard(local) {
        Role::Server
    } else {
        Role::Client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_from_listening_addresses() {
        let listeners: HashSet<SocketAddr> = [
            "127.0.0.1:6379".parse().unwrap(),
            "[::]:80".parse().unwrap(),
        ]
        .into();
        let r = |s: &str| role_from_listeners(&listeners, s.parse().unwrap());
        assert_eq!(r("127.0.0.1:6379"), Role::Server);
        assert_eq!(r("10.0.0.5:80"), Role::Server);
        assert_eq!(r("127.0.0.1:41000"), Role::Client);
    }

    #[test]
    fn unix_roles_from_names() {
        use crate::capture::UnixEnd;
        let end = |name: Option<&str>| {
            Endpoint::Unix(UnixEnd {
                sk: 1,
                ino: 1,
                name: name.map(std::sync::Arc::from),
            })
        };
        let listeners: HashSet<String> = ["/run/a.sock".to_owned()].into();
        let r = |l, p| unix_role(&listeners, &end(l), &end(p));
        assert_eq!(r(Some("/run/a.sock"), None), Role::Server);
        assert_eq!(r(None, Some("/run/a.sock")), Role::Client);
        assert_eq!(r(None, None), Role::Unknown, "socketpair");
        assert_eq!(
            r(Some("@c"), Some("/run/a.sock")),
            Role::Client,
            "bound client"
        );
        assert_eq!(r(Some("@c"), Some("@d")), Role::Unknown);
    }

    #[test]
    fn scan_sees_this_tests_own_connection() {
        use std::{
            net::{TcpListener, TcpStream},
            os::fd::AsRawFd,
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        // The scan skips the agent's own pid, which in a unit test is this
        // process; check the pieces that do not depend on it instead.
        let seed = Seed::scan();
        assert!(seed.listeners.len() <= 10_000);
        let me = std::process::id();
        assert!(!seed.conns.keys().any(|(pid, _)| *pid == me));
        assert!(seed.unix_listeners.iter().all(|n| !n.is_empty()));
        let _ = (client.as_raw_fd(), server.as_raw_fd());
    }

    #[test]
    fn selection_includes_descendants_and_exe_names() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let selected = select_pids(&[], &["sleep".to_owned()]);
        assert!(selected.contains(&child.id()));
        let parent_of_child = std::process::id();
        let selected = select_pids(&[parent_of_child], &[]);
        // Our own pid is never selected, but our child is.
        assert!(selected.contains(&child.id()) && !selected.contains(&parent_of_child));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
