//! Decoding kernel records. Pure: any byte string gives an event or an
//! error, never a panic, and never reads past what the record holds.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use agent_common::{
    ConnOpenEvent, DataEvent, Direction, EventHeader, EventKind, MappedEvent, Role, Syscall,
    UNIX_NAME_LOCAL, UNIX_NAME_PEER, UNIX_PATH_MAX, UnitEvent, UnixOpenEvent,
};
use thiserror::Error;

use super::endpoint::{Endpoint, UnixEnd, unix_name};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than its {need}-byte layout")]
    Short { len: usize, need: usize },
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("unknown syscall {0}")]
    Syscall(u8),
    #[error(
        "payload length {captured} exceeds the record ({available} bytes) or the syscall's {total}"
    )]
    Payload {
        captured: u32,
        available: usize,
        total: u64,
    },
    #[error("unknown address family {0}")]
    Family(u16),
}

/// One decoded record; `Data` borrows its payload from the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    Data(Data<'a>),
    Open(Open),
    Close(EventHeader),
    /// A followed runtime made a unit of work.
    Unit(UnitEvent),
    /// The process mapped a file executable (a library, at exec or dlopen).
    Mapped(Mapped),
    /// The agent itself connected: its local address, never traced.
    OwnConnect(SocketAddr, EventHeader),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data<'a> {
    pub header: EventHeader,
    pub syscall: Syscall,
    pub direction: Direction,
    /// Bytes the syscall (or TLS library call) moved; the payload may be a
    /// prefix of them.
    pub total_bytes: u64,
    pub payload: &'a [u8],
    /// The runtime's unit running on the thread (0: not followed).
    pub unit: u64,
    /// The thread's runtime switch counter then.
    pub unit_seq: u32,
    /// Bytes of the connection's earlier records that were lost (the
    /// transport refused them), just before these, by direction.
    pub lost: Lost,
}

/// Bytes of a connection's records that the transport refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lost {
    pub egress: u32,
    pub ingress: u32,
}

impl Lost {
    pub fn any(&self) -> bool {
        self.egress != 0 || self.ingress != 0
    }
}

/// One number per device, the same from /proc/PID/maps, from `stat` and
/// from the kernel's records.
pub fn dev_number(major: u32, minor: u32) -> u64 {
    (u64::from(major) << 32) | u64::from(minor)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    pub header: EventHeader,
    /// The file, as the key /proc/PID/maps gives it (`dev_number` of its
    /// device, inode); `None` when the kernel could not read it.
    pub file: Option<(u64, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub header: EventHeader,
    pub role: Role,
    pub local: Endpoint,
    pub remote: Endpoint,
    pub comm: String,
}

impl Event<'_> {
    pub fn header(&self) -> &EventHeader {
        match self {
            Event::Data(d) => &d.header,
            Event::Open(o) => &o.header,
            Event::Close(h) => h,
            Event::Unit(u) => &u.header,
            Event::Mapped(m) => &m.header,
            Event::OwnConnect(_, h) => h,
        }
    }
}

fn read<T: Copy>(bytes: &[u8]) -> Result<T, DecodeError> {
    let need = size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Short {
            len: bytes.len(),
            need,
        });
    }
    // SAFETY: length checked; T is a repr(C) plain-data layout from
    // agent-common with no invalid bit patterns; read_unaligned tolerates any
    // alignment of the kernel buffer.
    Ok(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

fn address(family: u16, raw: [u8; 16], port: u16) -> Result<SocketAddr, DecodeError> {
    let ip = match family {
        2 => IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3])),
        10 => {
            let v6 = Ipv6Addr::from(raw);
            // Show IPv4-mapped peers of dual-stack sockets as IPv4.
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        other => return Err(DecodeError::Family(other)),
    };
    Ok(SocketAddr::new(ip, port))
}

/// The command name up to its NUL, lossily as UTF-8.
pub fn comm_str(raw: &[u8]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// Decodes one record. Trailing bytes (perf alignment padding) are ignored.
pub fn decode(bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
    let header: EventHeader = read(bytes)?;
    match EventKind::from_u8(header.kind).ok_or(DecodeError::Kind(header.kind))? {
        EventKind::Data => {
            let data: DataEvent = read(bytes)?;
            let syscall =
                Syscall::from_u8(header.detail).ok_or(DecodeError::Syscall(header.detail))?;
            let rest = &bytes[size_of::<DataEvent>()..];
            let captured = data.captured as usize;
            if captured > rest.len() || u64::from(data.captured) > data.total_bytes {
                return Err(DecodeError::Payload {
                    captured: data.captured,
                    available: rest.len(),
                    total: data.total_bytes,
                });
            }
            Ok(Event::Data(Data {
                header,
                syscall,
                direction: syscall.direction(),
                total_bytes: data.total_bytes,
                payload: &rest[..captured],
                unit: data.unit,
                unit_seq: data.unit_seq,
                lost: Lost {
                    egress: data.lost_egress,
                    ingress: data.lost_ingress,
                },
            }))
        }
        EventKind::ConnOpen => {
            let open: ConnOpenEvent = read(bytes)?;
            Ok(Event::Open(Open {
                header,
                role: Role::from_u8(header.detail),
                local: address(open.family, open.local_addr, open.local_port)?.into(),
                remote: address(open.family, open.remote_addr, open.remote_port)?.into(),
                comm: comm_str(&open.comm),
            }))
        }
        EventKind::UnixOpen => {
            let open: UnixOpenEvent = read(bytes)?;
            let len = usize::from(open.path_len).min(UNIX_PATH_MAX);
            let name = unix_name(&open.path[..len]);
            let named = |owner: u8| name.clone().filter(|_| open.path_owner == owner);
            Ok(Event::Open(Open {
                header,
                role: Role::from_u8(header.detail),
                local: Endpoint::Unix(UnixEnd {
                    sk: open.sk,
                    ino: open.ino,
                    name: named(UNIX_NAME_LOCAL),
                }),
                remote: Endpoint::Unix(UnixEnd {
                    sk: open.peer_sk,
                    ino: open.peer_ino,
                    name: named(UNIX_NAME_PEER),
                }),
                comm: comm_str(&open.comm),
            }))
        }
        EventKind::ConnClose => Ok(Event::Close(header)),
        EventKind::Unit => Ok(Event::Unit(read(bytes)?)),
        EventKind::Mapped => {
            let mapped: MappedEvent = read(bytes)?;
            // The kernel's dev_t: 12 bits of major above 20 of minor.
            let (major, minor) = (mapped.dev >> 20, mapped.dev & 0xf_ffff);
            Ok(Event::Mapped(Mapped {
                header,
                file: (mapped.ino != 0).then(|| (dev_number(major, minor), mapped.ino)),
            }))
        }
        EventKind::OwnConnect => {
            let open: ConnOpenEvent = read(bytes)?;
            let local = address(open.family, open.local_addr, open.local_port)?;
            Ok(Event::OwnConnect(local, header))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn as_bytes<T>(v: &T) -> Vec<u8> {
        // SAFETY: test helper over repr(C) plain data.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    fn header(kind: EventKind, detail: u8) -> EventHeader {
        EventHeader {
            kind: kind as u8,
            detail,
            _pad: [0; 2],
            tgid: 100,
            tid: 101,
            fd: 7,
            ts_ns: 123,
            conn_id: 42,
        }
    }

    #[test]
    fn data_round_trip() {
        let event = DataEvent {
            header: header(EventKind::Data, Syscall::Write as u8),
            total_bytes: 10,
            captured: 5,
            ..Default::default()
        };
        let mut bytes = as_bytes(&event);
        bytes.extend_from_slice(b"hello");
        bytes.extend_from_slice(&[0, 0, 0]); // perf padding
        let Event::Data(d) = decode(&bytes).unwrap() else {
            panic!("not data")
        };
        assert_eq!(d.payload, b"hello");
        assert_eq!(d.total_bytes, 10);
        assert_eq!(d.direction, Direction::Egress);
        assert_eq!(d.header, event.header);
    }

    /// The kernel's `dev_t` (12 bits of major above 20 of minor) comes out
    /// as the key maps and `stat` give the same file.
    #[test]
    fn a_mapped_record_names_its_file_as_stat_does() {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata("/proc/self/exe").unwrap();
        let (major, minor) = (libc::major(md.dev()), libc::minor(md.dev()));
        let mut mapped = MappedEvent {
            header: header(EventKind::Mapped, 0),
            dev: major << 20 | minor,
            _pad: 0,
            ino: md.ino(),
        };
        let Event::Mapped(m) = decode(&as_bytes(&mapped)).unwrap() else {
            panic!("not a mapping")
        };
        assert_eq!(m.file, Some((dev_number(major, minor), md.ino())));
        assert_eq!(m.header.fd, 7);
        // Unread by the kernel: no file named, so the agent looks.
        mapped.ino = 0;
        let Event::Mapped(m) = decode(&as_bytes(&mapped)).unwrap() else {
            panic!("not a mapping")
        };
        assert_eq!(m.file, None);
    }

    #[test]
    fn open_round_trip_v4_and_mapped_v6() {
        let mut open = ConnOpenEvent {
            header: header(EventKind::ConnOpen, Role::Client as u8),
            family: 2,
            local_port: 5000,
            remote_port: 80,
            _pad: 0,
            local_addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            remote_addr: [10, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
        };
        let Event::Open(o) = decode(&as_bytes(&open)).unwrap() else {
            panic!()
        };
        assert_eq!(o.local.inet(), "127.0.0.1:5000".parse().ok());
        assert_eq!(o.remote.inet(), "10.1.2.3:80".parse().ok());
        assert_eq!((o.role, o.comm.as_str()), (Role::Client, "curl"));

        open.family = 10;
        open.remote_addr = Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped().octets();
        open.local_addr = Ipv6Addr::LOCALHOST.octets();
        let Event::Open(o) = decode(&as_bytes(&open)).unwrap() else {
            panic!()
        };
        assert_eq!(o.remote.inet(), "127.0.0.1:80".parse().ok());
        assert_eq!(o.local.inet(), "[::1]:5000".parse().ok());
    }

    #[test]
    fn unix_open_names_the_end_it_belongs_to() {
        let mut open = UnixOpenEvent {
            header: header(EventKind::UnixOpen, Role::Client as u8),
            sk: 0xa,
            peer_sk: 0xb,
            ino: 100,
            path_len: 9,
            path_owner: UNIX_NAME_PEER,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            ..UnixOpenEvent::default()
        };
        open.path[..9].copy_from_slice(b"/tmp/a.sk");
        let Event::Open(o) = decode(&as_bytes(&open)).unwrap() else {
            panic!()
        };
        assert_eq!(o.role, Role::Client);
        assert_eq!(
            o.local,
            Endpoint::Unix(UnixEnd {
                sk: 0xa,
                ino: 100,
                name: None
            })
        );
        assert_eq!(o.remote.unix_name(), Some("/tmp/a.sk"));
        // A server's own name; a lying length is cut at the name's size.
        open.path_owner = UNIX_NAME_LOCAL;
        open.path_len = 4000;
        let Event::Open(o) = decode(&as_bytes(&open)).unwrap() else {
            panic!()
        };
        assert_eq!(
            (o.local.unix_name(), o.remote.unix_name()),
            (Some("/tmp/a.sk"), None)
        );
        // socketpair: no name at all.
        open.path_len = 0;
        open.path_owner = 0;
        let Event::Open(o) = decode(&as_bytes(&open)).unwrap() else {
            panic!()
        };
        assert_eq!((o.local.unix_name(), o.remote.unix_name()), (None, None));
    }

    #[test]
    fn malformed_records_are_errors() {
        assert!(matches!(decode(&[]), Err(DecodeError::Short { .. })));
        assert_eq!(
            decode(&as_bytes(&header(EventKind::Data, 99))[..]).unwrap_err(),
            DecodeError::Short { len: 32, need: 64 }
        );
        let mut bad = header(EventKind::ConnClose, 0);
        bad.kind = 77;
        assert_eq!(decode(&as_bytes(&bad)), Err(DecodeError::Kind(77)));
        let lying = DataEvent {
            header: header(EventKind::Data, Syscall::Read as u8),
            total_bytes: 100,
            captured: 64,
            ..Default::default()
        };
        assert!(matches!(
            decode(&as_bytes(&lying)),
            Err(DecodeError::Payload { .. })
        ));
        let over = DataEvent {
            total_bytes: 1,
            captured: 0,
            ..lying
        };
        let mut bytes = as_bytes(&over);
        bytes[48 - 8] = 2; // captured = 2 > total 1
        bytes.extend_from_slice(b"ab");
        assert!(matches!(decode(&bytes), Err(DecodeError::Payload { .. })));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic sweep; the fuzz target covers the rest.
        let mut state = 0x2545F4914F6CDD1Du64;
        for len in 0..400usize {
            let bytes: Vec<u8> = (0..len)
                .map(|i| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    if i == 0 {
                        (state % 4) as u8
                    } else {
                        state as u8
                    }
                })
                .collect();
            let _ = decode(&bytes);
        }
    }
}
