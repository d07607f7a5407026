//! AF_UNIX stream sockets and their peers, from the kernel's sock_diag.
//!
//! A Unix-socket connection has no address pair that tells its two ends
//! apart the way a TCP 4-tuple does: the accepted end carries the listener's
//! path, the connecting end usually has no name at all. What ties the two
//! ends together is the kernel's peer link, and only sock_diag exposes it:
//! `/proc/net/unix` lists inodes, paths and states but no peers. So, like
//! `ss -x`, we ask `NETLINK_SOCK_DIAG` for a dump of every AF_UNIX socket
//! (`unix_diag_req` with `UDIAG_SHOW_NAME | UDIAG_SHOW_PEER`), keep the
//! stream ones, and from names and peers tell a connection's server end
//! (named like a listener) from its client end (whose peer is a server end).
//!
//! Inodes are what `/proc/PID/fd` shows as `socket:[N]`, so a process's fd
//! can be matched to an entry here. The dump covers the network namespace
//! the netlink socket is opened in: the agent's.

use std::{
    collections::{HashMap, HashSet},
    io,
};

use agent_common::Role;
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{SOCK_STREAM, TCP_LISTEN},
    unix::{ShowFlags, StateFlags, UnixRequest, UnixResponse, nlas::UnixDiagName},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// One AF_UNIX stream socket as the kernel's sock_diag reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocket {
    /// The socket's inode (what /proc/PID/fd shows as socket:[N]).
    pub inode: u64,
    /// Its bound name: a path, or an abstract name written "@name" (its
    /// leading NUL as '@'); None when unnamed.
    pub name: Option<String>,
    /// The inode of the socket at the other end, when connected.
    pub peer: Option<u64>,
    /// A listening socket (state TCP_LISTEN = 10 in udiag_state).
    pub listening: bool,
}

/// Receive buffer for one datagram of the dump. The kernel sizes dump
/// datagrams to at most 32 KiB, so 64 KiB never truncates; a truncation
/// is still detected (MSG_TRUNC) rather than parsed as garbage.
const RECV_BUF: usize = 64 * 1024;

/// Every AF_UNIX stream socket in this network namespace. Errors are io
/// errors naming the step that failed.
pub fn stream_sockets() -> io::Result<Vec<UnixSocket>> {
    let socket = Socket::new(NETLINK_SOCK_DIAG).map_err(step("open socket"))?;
    // Talk to the kernel (port 0) only: nothing else can reach this socket.
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(step("connect"))?;
    socket.send(&request(), 0).map_err(step("send request"))?;

    let mut sockets = Vec::new();
    let mut buf = vec![0u8; RECV_BUF];
    loop {
        let n = match socket.recv(&mut &mut buf[..], libc::MSG_TRUNC) {
            Ok(n) => n,
            // A signal handler without SA_RESTART must not fail the listing.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(step("receive")(e)),
        };
        if n > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "sock_diag receive: datagram of {n} bytes truncated to {}",
                    buf.len()
                ),
            ));
        }
        if n == 0 {
            // Without this, a closed stream would spin here forever.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "sock_diag receive: dump ended without NLMSG_DONE",
            ));
        }
        if parse_datagram(&buf[..n], &mut sockets)? {
            return Ok(sockets);
        }
    }
}

/// For each connected socket's inode, which end of its connection it is:
/// [`Role::Server`] if it carries the name of a listening socket in the
/// list (an accepted socket inherits its listener's name), [`Role::Client`]
/// if its peer is such a server end, [`Role::Unknown`] otherwise (a
/// socketpair, or two unnamed ends).
pub fn roles(sockets: &[UnixSocket]) -> HashMap<u64, Role> {
    let listener_names: HashSet<&str> = sockets
        .iter()
        .filter(|s| s.listening)
        .filter_map(|s| s.name.as_deref())
        .collect();
    let connected = || sockets.iter().filter(|s| !s.listening && s.peer.is_some());
    let servers: HashSet<u64> = connected()
        .filter(|s| {
            s.name
                .as_deref()
                .is_some_and(|n| listener_names.contains(n))
        })
        .map(|s| s.inode)
        .collect();
    connected()
        .map(|s| {
            let role = if servers.contains(&s.inode) {
                Role::Server
            } else if s.peer.is_some_and(|p| servers.contains(&p)) {
                Role::Client
            } else {
                Role::Unknown
            };
            (s.inode, role)
        })
        .collect()
}

/// Wraps an io error with the step of the exchange that failed.
fn step(what: &'static str) -> impl Fn(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("sock_diag {what}: {e}"))
}

/// The dump request: every AF_UNIX socket in any state, with its name and
/// peer. The kernel cannot filter by socket type, so that is done on the
/// answers.
fn request() -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut message = NetlinkMessage::new(
        header,
        SockDiagMessage::UnixRequest(UnixRequest {
            // A bit per state (1 << TCP_*); all bits so that unconnected
            // sockets (TCP_CLOSE) are listed too, as `ss -xa` does.
            state_flags: StateFlags::from_bits_retain(u32::MAX),
            inode: 0,
            show_flags: ShowFlags::NAME | ShowFlags::PEER,
            cookie: [0; 8],
        })
        .into(),
    );
    message.finalize();
    let mut buf = vec![0u8; message.buffer_len()];
    message.serialize(&mut buf);
    buf
}

/// Parses one datagram of the dump into `out`; true once the dump is done.
///
/// Framing errors end the listing with an error (the rest of the datagram
/// cannot be located); a well-framed message whose body does not parse is
/// one socket skipped, not the whole listing lost.
fn parse_datagram(mut rest: &[u8], out: &mut Vec<UnixSocket>) -> io::Result<bool> {
    let bad = |what: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("sock_diag parse reply: {what}"),
        )
    };
    while !rest.is_empty() {
        // Checks 16 <= nlmsg_len <= rest.len(), so the slicing below holds.
        let frame = NetlinkBuffer::new_checked(rest).map_err(|e| bad(e.to_string()))?;
        let len = frame.length() as usize;
        let message_type = frame.message_type();
        let message = &rest[..len];
        // Messages start 4-byte aligned; the last one may lack its padding.
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];

        let parsed = NetlinkMessage::<SockDiagMessage>::deserialize(message);
        match message_type {
            // By type, not by parse: a DONE with an odd body still ends the
            // dump (otherwise the next receive would block forever).
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                return match parsed.map(|m| m.payload) {
                    Ok(NetlinkPayload::Error(e)) if e.code.is_none() => Ok(true),
                    Ok(NetlinkPayload::Error(e)) => {
                        let e = e.to_io();
                        Err(io::Error::new(
                            e.kind(),
                            format!(
                                "sock_diag dump refused by the kernel (unix_diag missing?): {e}"
                            ),
                        ))
                    }
                    _ => Err(bad("malformed NLMSG_ERROR".into())),
                };
            }
            _ => {}
        }
        match parsed.map(|m| m.payload) {
            Ok(NetlinkPayload::InnerMessage(SockDiagMessage::UnixResponse(r))) => {
                out.extend(stream_socket(&r));
            }
            Ok(_) => {}
            Err(e) => log::debug!("sock_diag: skipped a message that does not parse: {e}"),
        }
    }
    Ok(false)
}

/// The socket an answer describes, when it is a stream socket.
fn stream_socket(r: &UnixResponse) -> Option<UnixSocket> {
    if r.header.kind != SOCK_STREAM {
        return None;
    }
    Some(UnixSocket {
        inode: r.header.inode.into(),
        name: r.name().map(display_name),
        // 0: the peer has no inode (a connection not accepted yet, or a
        // closed peer); no socket of the list, so no peer.
        peer: r.peer().filter(|&p| p != 0).map(u64::from),
        listening: r.header.state == TCP_LISTEN,
    })
}

/// A path as is; an abstract name with its NULs written '@', as `ss` does
/// (the leading NUL is what makes it abstract).
fn display_name(name: &UnixDiagName) -> String {
    match name {
        UnixDiagName::Pathname(path) => path.to_string_lossy().into_owned(),
        UnixDiagName::Abstract(bytes) => {
            let mut s = String::from("@");
            s.push_str(&String::from_utf8_lossy(bytes).replace('\0', "@"));
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        os::{
            fd::{AsRawFd, RawFd},
            linux::net::SocketAddrExt,
            unix::{
                fs::MetadataExt,
                net::{self, UnixListener, UnixStream},
            },
        },
        path::PathBuf,
    };

    use super::*;

    /// The socket inode of an fd: st_ino of what /proc/self/fd/N points to.
    fn inode(fd: RawFd) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .expect("stat socket fd")
            .ino()
    }

    fn find(sockets: &[UnixSocket], inode: u64) -> &UnixSocket {
        sockets
            .iter()
            .find(|s| s.inode == inode)
            .unwrap_or_else(|| panic!("inode {inode} not listed"))
    }

    /// A socket path of this test alone, removed on drop.
    struct TempPath(PathBuf);
    impl TempPath {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "zerotrace-unix-diag-{tag}-{}.sock",
                std::process::id()
            ));
            let _ = std::fs::remove_file(&p);
            Self(p)
        }
    }
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn path_listener_accepted_and_client_ends() {
        let path = TempPath::new("path");
        let listener = UnixListener::bind(&path.0).unwrap();
        let client = UnixStream::connect(&path.0).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let (l, c, a) = (
            inode(listener.as_raw_fd()),
            inode(client.as_raw_fd()),
            inode(accepted.as_raw_fd()),
        );

        let sockets = stream_sockets().unwrap();
        let name = path.0.to_str().unwrap();

        let ls = find(&sockets, l);
        assert!(ls.listening);
        assert_eq!(ls.name.as_deref(), Some(name));
        assert_eq!(ls.peer, None);

        let acc = find(&sockets, a);
        assert!(!acc.listening);
        assert_eq!(acc.name.as_deref(), Some(name));
        assert_eq!(acc.peer, Some(c));

        let cl = find(&sockets, c);
        assert!(!cl.listening);
        assert_eq!(cl.name, None);
        assert_eq!(cl.peer, Some(a));

        let roles = roles(&sockets);
        assert_eq!(roles.get(&a), Some(&Role::Server));
        assert_eq!(roles.get(&c), Some(&Role::Client));
        // Listeners are not connections.
        assert_eq!(roles.get(&l), None);
    }

    #[test]
    fn socketpair_ends_are_unknown() {
        let (x, y) = UnixStream::pair().unwrap();
        let (xi, yi) = (inode(x.as_raw_fd()), inode(y.as_raw_fd()));

        let sockets = stream_sockets().unwrap();
        let xs = find(&sockets, xi);
        assert_eq!(
            (xs.name.as_deref(), xs.peer, xs.listening),
            (None, Some(yi), false)
        );
        assert_eq!(find(&sockets, yi).peer, Some(xi));

        let roles = roles(&sockets);
        assert_eq!(roles.get(&xi), Some(&Role::Unknown));
        assert_eq!(roles.get(&yi), Some(&Role::Unknown));
    }

    #[test]
    fn abstract_name_is_written_with_at() {
        let name = format!("zerotrace-unix-diag-test-{}", std::process::id());
        let addr = net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixListener::bind_addr(&addr).unwrap();
        let client = UnixStream::connect_addr(&addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let (l, c, a) = (
            inode(listener.as_raw_fd()),
            inode(client.as_raw_fd()),
            inode(accepted.as_raw_fd()),
        );

        let sockets = stream_sockets().unwrap();
        let at = format!("@{name}");
        assert_eq!(find(&sockets, l).name.as_deref(), Some(at.as_str()));
        assert!(find(&sockets, l).listening);
        assert_eq!(find(&sockets, a).name.as_deref(), Some(at.as_str()));

        let roles = roles(&sockets);
        assert_eq!(roles.get(&a), Some(&Role::Server));
        assert_eq!(roles.get(&c), Some(&Role::Client));
    }

    #[test]
    fn other_socket_types_are_left_out() {
        let (d, _e) = net::UnixDatagram::pair().unwrap();
        let di = inode(d.as_raw_fd());
        let sockets = stream_sockets().unwrap();
        assert!(sockets.iter().all(|s| s.inode != di));
    }

    // Hand-built netlink bytes (independent of the crate's emitters).

    fn nlmsg(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&(16 + payload.len() as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&2u16.to_ne_bytes()); // NLM_F_MULTI
        m.extend_from_slice(&[0; 8]); // seq, pid
        m.extend_from_slice(payload);
        m.resize(m.len().next_multiple_of(4), 0);
        m
    }

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&(4 + value.len() as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize(a.len().next_multiple_of(4), 0);
        a
    }

    /// A unix_diag_msg for a socket, with a name and a peer.
    fn unix_msg(kind: u8, state: u8, ino: u32, name: &[u8], peer: u32) -> Vec<u8> {
        let mut p = vec![libc::AF_UNIX as u8, kind, state, 0];
        p.extend_from_slice(&ino.to_ne_bytes());
        p.extend_from_slice(&[0; 8]); // cookie
        p.extend(nla(0, name)); // UNIX_DIAG_NAME
        p.extend(nla(2, &peer.to_ne_bytes())); // UNIX_DIAG_PEER
        nlmsg(20, &p) // SOCK_DIAG_BY_FAMILY
    }

    fn sample() -> Vec<u8> {
        let mut d = unix_msg(1, 1, 42, b"/run/x.sock\0", 43);
        d.extend(unix_msg(1, 10, 41, b"\0ab\0c", 0));
        d.extend(unix_msg(2, 1, 44, b"/dgram\0", 45)); // SOCK_DGRAM: left out
        d.extend(nlmsg(3, &0i32.to_ne_bytes())); // NLMSG_DONE
        d
    }

    #[test]
    fn parses_hand_built_dump() {
        let mut out = Vec::new();
        assert!(parse_datagram(&sample(), &mut out).unwrap());
        assert_eq!(
            out,
            vec![
                UnixSocket {
                    inode: 42,
                    name: Some("/run/x.sock".into()),
                    peer: Some(43),
                    listening: false,
                },
                UnixSocket {
                    inode: 41,
                    name: Some("@ab@c".into()),
                    peer: None,
                    listening: true,
                },
            ]
        );
    }

    #[test]
    fn kernel_error_is_an_io_error() {
        let mut payload = (-libc::ENOENT).to_ne_bytes().to_vec();
        payload.extend_from_slice(&[0; 16]); // the request's header
        let err = parse_datagram(&nlmsg(2, &payload), &mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("sock_diag"), "{err}");
    }

    #[test]
    fn malformed_input_never_panics() {
        let good = sample();
        // Every truncation.
        for n in 0..good.len() {
            let _ = parse_datagram(&good[..n], &mut Vec::new());
        }
        // Every byte set to a few odd values (lengths 0, tiny, huge; types).
        for i in 0..good.len() {
            for v in [0x00, 0x01, 0x03, 0x07, 0x7f, 0xff] {
                let mut bad = good.clone();
                bad[i] = v;
                let _ = parse_datagram(&bad, &mut Vec::new());
            }
        }
        // A message claiming less than its own header must be an error, not a loop.
        let mut short = nlmsg(20, &[]);
        short[..4].copy_from_slice(&4u32.to_ne_bytes());
        assert!(parse_datagram(&short, &mut Vec::new()).is_err());
        // A message with the right framing but a body that does not parse
        // is skipped, and the dump goes on to its end.
        let mut skipped = nlmsg(20, &[libc::AF_UNIX as u8, 1]);
        skipped.extend(nlmsg(3, &0i32.to_ne_bytes()));
        let mut out = Vec::new();
        assert!(parse_datagram(&skipped, &mut out).unwrap());
        assert!(out.is_empty());
    }
}
