//! Layouts shared by the kernel programs (`agent-ebpf`) and the agent.
//!
//! Every record the kernel sends starts with one [`EventHeader`]. All types
//! are `#[repr(C)]` with explicit padding and no `bool`, so both sides agree
//! on every byte; the agent decodes them with length checks and never trusts
//! the kernel's bytes beyond what it has checked.
#![no_std]

/// Largest payload prefix one data event can carry (`--capture-bytes` max).
pub const MAX_CAPTURE_BYTES: u32 = 32 * 1024;
/// Default payload prefix: ordinary request heads (with several KiB of
/// cookies) fit, while bulk bodies are cut short.
pub const DEFAULT_CAPTURE_BYTES: u32 = 8 * 1024;
/// Most iovec entries copied from one readv/writev/sendmsg/recvmsg.
pub const MAX_IOVECS: u32 = 8;
/// Scratch space behind the event header in the per-CPU staging buffer.
/// Larger than `MAX_CAPTURE_BYTES` so the verifier can bound masked copies.
pub const SCRATCH_PAYLOAD_BYTES: usize = 3 * MAX_CAPTURE_BYTES as usize;

/// Map names, defined once for both sides.
pub mod maps {
    pub const EVENTS_RINGBUF: &str = "EVENTS_RINGBUF";
    pub const EVENTS_PERF: &str = "EVENTS_PERF";
    pub const SOCKETS: &str = "SOCKETS";
    pub const PENDING: &str = "PENDING";
    pub const PENDING_SLOTS: &str = "PENDING_SLOTS";
    pub const TRACED_PIDS: &str = "TRACED_PIDS";
    pub const TRACED_COMMS: &str = "TRACED_COMMS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const SCRATCH: &str = "SCRATCH";
    pub const SOCK_CONNS: &str = "SOCK_CONNS";
    pub const KFUNC_ARGS: &str = "KFUNC_ARGS";
    pub const RUNTIMES: &str = "RUNTIMES";
    pub const RUNTIMES_FOLLOWED: &str = "RUNTIMES_FOLLOWED";
    pub const TLS_CALLS: &str = "TLS_CALLS";
    pub const TLS_SESSIONS: &str = "TLS_SESSIONS";
    pub const TLS_LAYOUTS: &str = "TLS_LAYOUTS";
    pub const LOST: &str = "LOST";
    pub const HOLES_WAITING: &str = "HOLES_WAITING";
}

/// Name of the read-only global holding [`KernelConfig`].
pub const CONFIG_GLOBAL: &str = "CONFIG";

/// Kind of record, first byte of every [`EventHeader`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Data = 1,
    ConnOpen = 2,
    ConnClose = 3,
    /// A runtime made a new unit of work ([`UnitEvent`]).
    Unit = 4,
    /// A process mapped a file executable (a library loaded at exec or by
    /// `dlopen`): [`MappedEvent`], `fd` is the mapped file's descriptor.
    Mapped = 5,
    /// The agent itself connected ([`ConnOpenEvent`], addresses only): the
    /// traced process at the other end (a collector, a TLS terminator in
    /// front of one) must not have the agent's exports traced.
    OwnConnect = 6,
    /// A unix stream connection became known ([`UnixOpenEvent`]); `detail`
    /// is the [`Role`], as for [`EventKind::ConnOpen`].
    UnixOpen = 7,
}

impl EventKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Data),
            2 => Some(Self::ConnOpen),
            3 => Some(Self::ConnClose),
            4 => Some(Self::Unit),
            5 => Some(Self::Mapped),
            6 => Some(Self::OwnConnect),
            7 => Some(Self::UnixOpen),
            _ => None,
        }
    }
}

/// Data direction as seen by the traced process.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The process sent the bytes (write, send*).
    Egress = 1,
    /// The process received the bytes (read, recv*).
    Ingress = 2,
}

impl Direction {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Egress),
            2 => Some(Self::Ingress),
            _ => None,
        }
    }
}

/// How the connection came to be known.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// First seen mid-stream (opened before the agent, or via dup/fd passing).
    Unknown = 0,
    /// The process connect()ed it.
    Client = 1,
    /// The process accept()ed it.
    Server = 2,
}

impl Role {
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Client,
            2 => Self::Server,
            _ => Self::Unknown,
        }
    }
}

/// The syscall that produced a data event.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syscall {
    Read = 1,
    Write = 2,
    Readv = 3,
    Writev = 4,
    Sendto = 5,
    Recvfrom = 6,
    Sendmsg = 7,
    Recvmsg = 8,
    /// Bytes sent from a file: counted, never captured.
    Sendfile = 9,
    /// Kernel-function layer: `tcp_sendmsg` outside any traced syscall
    /// (sendfile and splice on 6.5+, sendmmsg, io_uring). Counted, not copied.
    TcpSendmsg = 10,
    /// Kernel-function layer: `tcp_sendpage` (sendfile and splice before 6.5).
    TcpSendpage = 11,
    /// Plaintext a TLS library returned to the process (`SSL_read`,
    /// `SSL_read_ex`): what the socket carried as ciphertext.
    TlsRead = 12,
    /// Plaintext the process handed to a TLS library (`SSL_write`, `SSL_write_ex`).
    TlsWrite = 13,
}

impl Syscall {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Read,
            2 => Self::Write,
            3 => Self::Readv,
            4 => Self::Writev,
            5 => Self::Sendto,
            6 => Self::Recvfrom,
            7 => Self::Sendmsg,
            8 => Self::Recvmsg,
            9 => Self::Sendfile,
            10 => Self::TcpSendmsg,
            11 => Self::TcpSendpage,
            12 => Self::TlsRead,
            13 => Self::TlsWrite,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Readv => "readv",
            Self::Writev => "writev",
            Self::Sendto => "sendto",
            Self::Recvfrom => "recvfrom",
            Self::Sendmsg => "sendmsg",
            Self::Recvmsg => "recvmsg",
            Self::Sendfile => "sendfile",
            Self::TcpSendmsg => "tcp_sendmsg",
            Self::TcpSendpage => "tcp_sendpage",
            Self::TlsRead => "tls_read",
            Self::TlsWrite => "tls_write",
        }
    }

    /// Whether the bytes are plaintext from a TLS library rather than what
    /// a socket syscall moved.
    pub fn is_tls(self) -> bool {
        matches!(self, Self::TlsRead | Self::TlsWrite)
    }

    pub fn direction(self) -> Direction {
        match self {
            Self::Write
            | Self::Writev
            | Self::Sendto
            | Self::Sendmsg
            | Self::Sendfile
            | Self::TcpSendmsg
            | Self::TcpSendpage
            | Self::TlsWrite => Direction::Egress,
            Self::Read | Self::Readv | Self::Recvfrom | Self::Recvmsg | Self::TlsRead => {
                Direction::Ingress
            }
        }
    }
}

/// Common start of every record (32 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// [`EventKind`] as u8.
    pub kind: u8,
    /// Data: [`Syscall`]; ConnOpen: [`Role`]; else 0.
    pub detail: u8,
    pub _pad: [u8; 2],
    /// Process id (thread group id) in the initial pid namespace.
    pub tgid: u32,
    /// Thread id in the initial pid namespace.
    pub tid: u32,
    /// File descriptor in the process.
    pub fd: i32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC): when the syscall returned,
    /// or for data sent, when it began (so a send precedes the receive it
    /// feeds).
    pub ts_ns: u64,
    /// Unique per connection for the life of the agent.
    pub conn_id: u64,
}

/// A chunk of socket payload. `captured` bytes of payload follow the struct.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataEvent {
    pub header: EventHeader,
    /// Bytes the syscall really moved (its return value).
    pub total_bytes: u64,
    /// Payload bytes that follow (≤ capture limit, ≤ total_bytes).
    pub captured: u32,
    /// The runtime's switch counter on this thread when the syscall
    /// returned (CPython: the thread state's `context_ver`); with `unit`,
    /// tells whether anything ran in between two moments on one thread.
    pub unit_seq: u32,
    /// The unit of work the thread was running, for processes whose runtime
    /// is followed (CPython: the `PyContext` entered); 0 when unknown.
    pub unit: u64,
    /// Bytes this connection sent before this record in records the
    /// transport refused (buffer full) and that no record reported yet: a
    /// hole in its stream just before these bytes.
    pub lost_egress: u32,
    /// The same for bytes it received.
    pub lost_ingress: u32,
}

/// A followed runtime allocated a unit of work on this thread while it ran
/// `parent`: a task's context, a copy for a worker thread's hand-off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnitEvent {
    /// `detail` is the runtime ([`RUNTIME_CPYTHON`]); `fd` and `conn_id` are 0.
    pub header: EventHeader,
    /// The unit running on the thread then (0: none yet).
    pub parent: u64,
    /// The new unit.
    pub unit: u64,
    /// The thread's switch counter then (see [`DataEvent::unit_seq`]).
    pub parent_seq: u32,
    pub _pad: u32,
}

/// Runtimes the kernel can follow ([`ThreadLayout::runtime`]).
pub const RUNTIME_CPYTHON: u32 = 1;

/// RUNTIMES value: how to find the running unit on a thread of one process.
/// CPython: `tstate = *(fsbase + specific_off + 16 * key + 8)` (glibc's
/// `pthread_getspecific` for the interpreter's thread-state key), then
/// `unit = *(tstate + unit_off)` and `seq = *(u32 *)(tstate + seq_off)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadLayout {
    pub runtime: u32,
    pub key: u32,
    pub specific_off: u32,
    pub unit_off: u32,
    pub seq_off: u32,
    pub _pad: u32,
    /// The unit objects' type (CPython: `&PyContext_Type`, at `unit + 8`):
    /// a probed return value of another type is not a new unit. 0: unchecked.
    pub unit_type: u64,
}

/// TLS_SESSIONS key: one TLS session object (OpenSSL: `SSL *`) of a process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TlsSessionKey {
    pub tgid: u32,
    pub _pad: u32,
    pub session: u64,
}

/// TLS_LAYOUTS value: where a process's TLS library keeps a session's
/// socket, to check the socket a call is attributed to. OpenSSL:
/// `bio = *(ssl + rbio_off)`; the BIO is a descriptor BIO when
/// `*(u32 *)*(bio + bio_method_off) & BIO_TYPE_DESCRIPTOR`, and then its fd
/// is `*(i32 *)(bio + bio_num_off)`. All 0: unknown layout, not checked.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsLayout {
    pub rbio_off: u32,
    pub bio_method_off: u32,
    pub bio_num_off: u32,
    pub _pad: u32,
}

/// A connection became known: connect/accept returned, or first sight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnOpenEvent {
    pub header: EventHeader,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    /// Local port, host byte order.
    pub local_port: u16,
    /// Remote port, host byte order.
    pub remote_port: u16,
    pub _pad: u16,
    /// IPv4 in the first 4 bytes, or IPv6; network byte order.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Command name of the thread that opened it.
    pub comm: [u8; 16],
}

/// Longest name of a unix socket (`sun_path`), abstract names included.
pub const UNIX_PATH_MAX: usize = 108;
/// [`UnixOpenEvent::path_owner`]: the name is this end's own…
pub const UNIX_NAME_LOCAL: u8 = 1;
/// …or its peer's (a client's view of the server it connected to).
pub const UNIX_NAME_PEER: u8 = 2;

/// A unix stream connection became known. Its two ends are told apart by
/// the kernel's `struct sock` of each: one end's `sk` is the other's
/// `peer_sk`, so the agent pairs the ends of one connection the way the
/// kernel does. Freed socks are soon reused, so each end's socket inode
/// number (never reused soon) makes the pair one connection's only. The
/// name is the listener's (an accepted socket carries it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixOpenEvent {
    pub header: EventHeader,
    /// This end's `struct sock *`.
    pub sk: u64,
    /// The other end's `struct sock *`, 0 when it has none (yet).
    pub peer_sk: u64,
    /// This end's socket inode number, and the other end's; 0 when the
    /// end has no socket (not accepted yet, or closed).
    pub ino: u64,
    pub peer_ino: u64,
    /// Bytes of `path` that are the name; 0 when neither end is named
    /// (socketpair). An abstract name starts with a NUL byte.
    pub path_len: u16,
    /// [`UNIX_NAME_LOCAL`] or [`UNIX_NAME_PEER`]; 0 without a name.
    pub path_owner: u8,
    pub _pad: [u8; 5],
    pub path: [u8; UNIX_PATH_MAX],
    /// Command name of the thread that opened it.
    pub comm: [u8; 16],
    pub _tail: [u8; 4],
}

impl Default for UnixOpenEvent {
    fn default() -> Self {
        Self {
            header: EventHeader::default(),
            sk: 0,
            peer_sk: 0,
            ino: 0,
            peer_ino: 0,
            path_len: 0,
            path_owner: 0,
            _pad: [0; 5],
            path: [0; UNIX_PATH_MAX],
            comm: [0; 16],
            _tail: [0; 4],
        }
    }
}

/// A process mapped a file executable ([`EventKind::Mapped`]), and which
/// file: the agent looks at a process's maps again only for a file it has
/// not judged yet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MappedEvent {
    pub header: EventHeader,
    /// The file's device as the kernel keeps it (`MAJOR << 20 | MINOR`),
    /// and its inode; both 0 when the kernel could not read them.
    pub dev: u32,
    pub _pad: u32,
    pub ino: u64,
}

/// The process closed the connection's fd.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnCloseEvent {
    pub header: EventHeader,
}

/// Offsets of kernel struct members, read from the running kernel's BTF by
/// the agent (aya has no CO-RE relocations for Rust eBPF).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_inode: u32,
    pub file_private_data: u32,
    pub inode_mode: u32,
    pub socket_type: u32,
    pub socket_sk: u32,
    pub sk_family: u32,
    pub sk_num: u32,
    pub sk_dport: u32,
    pub sk_daddr: u32,
    pub sk_rcv_saddr: u32,
    pub sk_v6_daddr: u32,
    pub sk_v6_rcv_saddr: u32,
    /// `unix_sock.addr` (its bound name) and `unix_sock.peer`.
    pub unix_addr: u32,
    pub unix_peer: u32,
    /// `unix_address.len` (bytes of `name`, family included) and `.name`.
    pub unix_address_len: u32,
    pub unix_address_name: u32,
    /// `sock.sk_socket`, `socket_alloc.vfs_inode` (a socket's inode
    /// follows it) and `inode.i_ino`: a unix end's inode number, and a
    /// mapped file's.
    pub sk_socket: u32,
    pub socket_alloc_inode: u32,
    pub inode_ino: u32,
    /// `inode.i_sb` and `super_block.s_dev`: a mapped file's device.
    pub inode_sb: u32,
    pub sb_dev: u32,
    /// Offset of `child_pid` in the sched_process_fork tracepoint record.
    pub fork_child_pid: u32,
    /// `task_struct.thread.fsbase`: a thread's TLS base (x86-64).
    pub task_fsbase: u32,
}

/// Filter modes for [`KernelConfig::filter_mode`].
pub const FILTER_ALL: u32 = 0;
pub const FILTER_SELECTED: u32 = 1;
/// Transports for [`KernelConfig::transport`].
pub const TRANSPORT_RINGBUF: u32 = 0;
pub const TRANSPORT_PERF: u32 = 1;

/// Read-only configuration the agent writes into the object before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelConfig {
    /// The agent's own tgid: never traced.
    pub agent_tgid: u32,
    /// Payload prefix to copy per event, ≤ [`MAX_CAPTURE_BYTES`].
    pub capture_bytes: u32,
    /// [`FILTER_ALL`] or [`FILTER_SELECTED`] (only tgids in TRACED_PIDS).
    pub filter_mode: u32,
    /// [`TRANSPORT_RINGBUF`] or [`TRANSPORT_PERF`].
    pub transport: u32,
    /// Ring buffer: bytes a CPU hands to the ring between two looks at how
    /// full it is (0: a look per record). See [`ring_wake`].
    pub ring_check_bytes: u32,
    /// Ring buffer: how full it must be, at a look, for the reader to be woken.
    pub ring_wake_bytes: u32,
    /// PENDING_SLOTS entries less one (their count is a power of two): a
    /// thread's slot is its id masked with this.
    pub pending_slot_mask: u32,
    pub offsets: KernelOffsets,
}

/// The ring buffer's wake-up settings for a ring of `ring_bytes` on `cpus`
/// CPUs: `(ring_check_bytes, ring_wake_bytes)`.
///
/// The reader is woken when an eighth of the ring waits; otherwise it drains
/// on its own every few milliseconds. Looking at the ring's fill costs a read
/// of the reader's position, a cache line the reader writes, so each CPU looks
/// once per `ring_check_bytes` it wrote rather than per record. Between two
/// looks every CPU may add that much, so the checks together let the ring grow
/// at most a sixteenth past the mark before the reader is woken.
pub const fn ring_wake(ring_bytes: u32, cpus: u32) -> (u32, u32) {
    let wake = ring_bytes / 8;
    let cpus = if cpus == 0 { 1 } else { cpus };
    let check = ring_bytes / 16 / cpus;
    // At least a page between looks; never more than the wake mark.
    let check = if check < 4096 { 4096 } else { check };
    let check = if check > wake { wake } else { check };
    (check, wake)
}

/// Per-CPU counters in the COUNTERS map, by index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Records handed to the transport.
    EventsSent = 0,
    /// Records the transport refused (buffer full): lost.
    EventsLost = 1,
    /// Payload bytes handed to the transport.
    BytesSent = 2,
    /// Syscalls not traced because the PENDING map (one entry per thread) was full.
    PendingFull = 3,
    /// Socket-table insertions that failed.
    SocketsFull = 4,
    /// fd → socket look-ups that failed to read kernel memory.
    WalkFailed = 5,
    /// TLS plaintext whose socket could not be told (no socket call inside
    /// the library call, none remembered for the session): not sent.
    TlsNoSocket = 6,
    /// TLS plaintext whose socket call inside the library call and the
    /// session's own socket (its BIO's fd) disagree: not sent.
    TlsSocketMismatch = 7,
    /// TLS library calls dropped because the TLS_CALLS or the PENDING map was full.
    TlsCallsFull = 8,
    /// Socket syscalls not copied because the agent muted their connection
    /// (it does not trace what the connection carries).
    MutedCalls = 9,
}

/// Number of [`Counter`] slots.
pub const COUNTER_SLOTS: u32 = 12;

/// Kind of value in the SOCKETS table.
pub const SOCKET_TRACKED: u8 = 1;
/// The fd is not a traced kind of socket: remembered so it is not looked up again.
pub const SOCKET_IGNORED: u8 = 2;
/// A connection the agent muted (written by the agent): its data is no
/// longer copied, its close is still reported.
pub const SOCKET_MUTED: u8 = 3;
/// A connection whose calls the agent still wants but not their bytes
/// (written by the agent): it carries the agent's own exports, where which
/// thread reads them matters (a proxy's onward hop is known by it), not
/// what they say. Its records come with no payload.
pub const SOCKET_BLIND: u8 = 4;

/// SOCKETS value: what the kernel remembers about one (tgid, fd).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketInfo {
    pub conn_id: u64,
    /// The kernel's `struct sock *` (0 when ignored), to forget [`SockConn`] on close.
    pub sk: u64,
    pub state: u8,
    pub role: u8,
    pub _pad: [u8; 6],
}

/// SOCK_CONNS value: the traced connection behind a `struct sock *`, for
/// the kernel-function layer, which sees sockets rather than fds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockConn {
    pub conn_id: u64,
    /// The fd it was registered under, or -1 when first seen by a kernel function.
    pub fd: i32,
    pub _pad: u32,
}

/// SOCKETS key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SocketKey {
    pub tgid: u32,
    pub fd: i32,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are repr(C) plain data with explicit padding.
    unsafe impl aya::Pod for KernelConfig {}
    unsafe impl aya::Pod for KernelOffsets {}
    unsafe impl aya::Pod for SocketInfo {}
    unsafe impl aya::Pod for SocketKey {}
    unsafe impl aya::Pod for SockConn {}
    unsafe impl aya::Pod for ThreadLayout {}
    unsafe impl aya::Pod for TlsLayout {}
    unsafe impl aya::Pod for TlsSessionKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn ring_wake_marks_leave_the_ring_room_on_any_cpu_count() {
        let ring = 8 << 20;
        assert_eq!(ring_wake(ring, 2), (256 << 10, 1 << 20));
        for cpus in [1, 2, 8, 64, 512, 4096] {
            let (check, wake) = ring_wake(ring, cpus);
            assert_eq!(wake, ring / 8);
            // Every CPU between two looks: at most a sixteenth of the ring,
            // or a page each where that is less.
            assert!(
                u64::from(check) * u64::from(cpus)
                    <= (u64::from(ring) / 16).max(4096 * u64::from(cpus))
            );
            assert!(check >= 4096);
        }
        // A one-page ring (the perf transport's unused one) still bounds.
        assert_eq!(ring_wake(4096, 2), (512, 512));
    }

    #[test]
    fn layouts_have_fixed_sizes() {
        assert_eq!(size_of::<EventHeader>(), 32);
        assert_eq!(size_of::<DataEvent>(), 64);
        assert_eq!(size_of::<UnitEvent>(), 56);
        assert_eq!(size_of::<ThreadLayout>(), 32);
        assert_eq!(size_of::<TlsLayout>(), 16);
        assert_eq!(size_of::<TlsSessionKey>(), 16);
        assert_eq!(size_of::<ConnOpenEvent>(), 32 + 8 + 48);
        assert_eq!(size_of::<ConnCloseEvent>(), 32);
        assert_eq!(size_of::<MappedEvent>(), 32 + 16);
        assert_eq!(size_of::<UnixOpenEvent>(), 32 + 40 + 108 + 20);
        assert_eq!(size_of::<SocketKey>(), 8);
        assert_eq!(size_of::<SocketInfo>(), 24);
        assert_eq!(size_of::<SockConn>(), 16);
        assert_eq!(size_of::<KernelConfig>(), 28 + 27 * 4);
    }

    #[test]
    fn enums_round_trip() {
        for k in [
            EventKind::Data,
            EventKind::ConnOpen,
            EventKind::ConnClose,
            EventKind::Unit,
            EventKind::Mapped,
            EventKind::OwnConnect,
            EventKind::UnixOpen,
        ] {
            assert_eq!(EventKind::from_u8(k as u8), Some(k));
        }
        assert_eq!(EventKind::from_u8(0), None);
        for s in 1..=13u8 {
            assert_eq!(Syscall::from_u8(s).map(|s| s as u8), Some(s));
        }
        assert_eq!(Syscall::from_u8(14), None);
        assert!(Syscall::TlsRead.is_tls() && !Syscall::Read.is_tls());
        assert_eq!(Syscall::TlsRead.direction(), Direction::Ingress);
        assert_eq!(Syscall::TlsWrite.direction(), Direction::Egress);
        assert_eq!(Syscall::TcpSendpage.direction(), Direction::Egress);
        assert_eq!(Syscall::Sendfile.direction(), Direction::Egress);
        assert_eq!(Role::from_u8(2), Role::Server);
        assert_eq!(Role::from_u8(77), Role::Unknown);
    }
}
