//! The ends of a connection: an IP address and port, or a unix socket.
//!
//! A unix stream connection has no addresses of its own. What names its
//! two ends is the kernel's `struct sock` of each (one end's peer is the
//! other end), so that is what the agent pairs them by, as it pairs TCP
//! ends by their 4-tuples. A freed `struct sock` is soon reused by the next
//! connection, so the client end's socket inode number, which is not,
//! goes with it: two connections one after the other never share a pair.
//! The name users know a unix socket by is the path (or abstract name) its
//! listener was bound to; an accepted socket carries it, a connecting one
//! usually has none.

use std::{fmt, net::SocketAddr, sync::Arc};

/// One end of a traced connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Inet(SocketAddr),
    Unix(UnixEnd),
}

/// One end of a unix stream connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UnixEnd {
    /// The kernel's `struct sock *` of this end; 0 when unknown (a peer
    /// that is gone). Only ever compared, never shown.
    pub sk: u64,
    /// Its socket's inode number; 0 when not told (a server end not yet
    /// accepted, a client end already closed).
    pub ino: u64,
    /// Its bound name as far as the record tells: a path, or an abstract
    /// name written `@name`. `None` when unnamed or not told.
    pub name: Option<Arc<str>>,
}

/// What identifies one end when the two ends of a connection are paired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndId {
    Inet(SocketAddr),
    /// `struct sock *` and inode number.
    Unix(u64, u64),
}

impl EndId {
    /// As a server end in a pairing: its sock alone. Its inode number is
    /// unknown to a client that connected before the accept, and the
    /// client end's inode already makes the pair unique.
    pub fn as_server(self) -> Self {
        match self {
            EndId::Unix(sk, _) => EndId::Unix(sk, 0),
            inet => inet,
        }
    }
}

impl Endpoint {
    /// The IP address and port, for inet ends.
    pub fn inet(&self) -> Option<SocketAddr> {
        match self {
            Endpoint::Inet(addr) => Some(*addr),
            Endpoint::Unix(_) => None,
        }
    }

    /// The port of an inet end.
    pub fn port(&self) -> Option<u16> {
        self.inet().map(|a| a.port())
    }

    /// The unix socket's name, for named unix ends.
    pub fn unix_name(&self) -> Option<&str> {
        match self {
            Endpoint::Unix(end) => end.name.as_deref(),
            Endpoint::Inet(_) => None,
        }
    }

    pub fn is_unix(&self) -> bool {
        matches!(self, Endpoint::Unix(_))
    }

    /// What pairs this end with the other end's view of it: the address,
    /// or the kernel socket (names are not told on both sides alike).
    pub fn id(&self) -> EndId {
        match self {
            Endpoint::Inet(addr) => EndId::Inet(*addr),
            Endpoint::Unix(end) => EndId::Unix(end.sk, end.ino),
        }
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        Endpoint::Inet(addr)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Inet(addr) => addr.fmt(f),
            Endpoint::Unix(UnixEnd { name: Some(n), .. }) => write!(f, "unix:{n}"),
            Endpoint::Unix(UnixEnd { name: None, .. }) => f.write_str("unix:(unnamed)"),
        }
    }
}

/// A unix socket name as the kernel keeps it (`sun_path`, `len` bytes):
/// a path up to its first NUL, or, when it starts with NUL, an abstract
/// name shown with `@` as `ss` does. `None` when empty.
pub fn unix_name(raw: &[u8]) -> Option<Arc<str>> {
    let name = match raw.split_first() {
        None => return None,
        Some((0, rest)) => {
            if rest.is_empty() {
                return None;
            }
            format!("@{}", String::from_utf8_lossy(rest))
        }
        Some(_) => {
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            String::from_utf8_lossy(&raw[..end]).into_owned()
        }
    };
    Some(Arc::from(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_paths_and_abstract_names() {
        assert_eq!(
            unix_name(b"/run/app.sock\0").as_deref(),
            Some("/run/app.sock")
        );
        assert_eq!(unix_name(b"/tmp/x").as_deref(), Some("/tmp/x"));
        assert_eq!(unix_name(b"\0bus\0x").as_deref(), Some("@bus\0x"));
        assert_eq!(unix_name(b""), None);
        assert_eq!(unix_name(b"\0"), None);
    }

    #[test]
    fn unix_ends_pair_by_socket_not_name() {
        let end = |sk, ino, name: Option<&[u8]>| {
            Endpoint::Unix(UnixEnd {
                sk,
                ino,
                name: name.and_then(unix_name),
            })
        };
        let named = end(7, 70, Some(b"/s"));
        assert_eq!(named.id(), end(7, 70, None).id());
        assert_ne!(named.id(), end(8, 70, None).id());
        // The same sock reused by a later connection is another end…
        assert_ne!(named.id(), end(7, 71, None).id());
        // …except as a server, which a client may know before its inode.
        assert_eq!(named.id().as_server(), end(7, 0, None).id().as_server());
        assert_eq!(named.to_string(), "unix:/s");
        assert_eq!(named.port(), None);
        let inet: Endpoint = "127.0.0.1:80".parse::<SocketAddr>().unwrap().into();
        assert_eq!(
            (inet.port(), inet.to_string().as_str()),
            (Some(80), "127.0.0.1:80")
        );
    }
}
