//! fd → socket: which fds are traced stream sockets (inet, unix), their
//! addresses, and the SOCKETS table that remembers the answer until close().
//!
//! The walk follows `current->files->fdt->fd[fd]->{f_inode->i_mode,
//! private_data (struct socket)->sk->__sk_common}` with offsets taken from the
//! running kernel's BTF by the agent. A unix socket's addresses are its own
//! `struct sock *` and its peer's (`unix_sock.peer`), which the agent pairs
//! as it pairs TCP 4-tuples, plus the listener's name.

use agent_common::{
    ConnCloseEvent, ConnOpenEvent, Counter, EventHeader, EventKind, Role, SOCKET_BLIND,
    SOCKET_IGNORED, SOCKET_MUTED, SOCKET_TRACKED, SockConn, SocketInfo, SocketKey, UNIX_NAME_LOCAL,
    UNIX_NAME_PEER, UNIX_PATH_MAX, UnixOpenEvent,
};
use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_comm, bpf_get_current_task, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        bpf_probe_read_kernel, generated::bpf_probe_read_kernel as probe_read_kernel_raw,
    },
};

use crate::{
    SOCK_CONNS, SOCKETS, config,
    emit::{ScratchGuard, count, forget_lost, output_record},
};

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const SOCK_STREAM: u16 = 1;
const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// What the walk found for an fd.
pub enum Walk {
    Inet(Tuple),
    /// A unix stream socket: its `struct sock *`.
    Unix(u64),
    /// Not a socket, or not a traced kind of stream socket.
    Other,
}

#[derive(Default)]
pub struct Tuple {
    /// The kernel's `struct sock *`.
    pub sk: u64,
    pub family: u16,
    pub local_port: u16,
    pub remote_port: u16,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}

#[inline(always)]
fn read<T>(base: u64, offset: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel faults safely on bad addresses.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T) }
}

/// The `struct file *` of `fd` in the current task; 0 when there is none.
/// `Err` when kernel memory could not be read.
#[inline(always)]
fn file_of(fd: i32) -> Result<u64, i32> {
    if fd < 0 {
        return Ok(0);
    }
    // SAFETY: helper without preconditions.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read(task, config!(offsets.task_files))?;
    let fdt: u64 = read(files, config!(offsets.files_fdt))?;
    let max_fds: u32 = read(fdt, config!(offsets.fdtable_max_fds))?;
    if fd as u32 >= max_fds {
        return Ok(0);
    }
    let fd_array: u64 = read(fdt, config!(offsets.fdtable_fd))?;
    read(fd_array + (fd as u64) * 8, 0)
}

/// The device (the kernel's `dev_t`) and inode of the file open as `fd`.
#[inline(always)]
pub fn file_id(fd: i32) -> Option<(u32, u64)> {
    let file = file_of(fd).ok().filter(|&f| f != 0)?;
    let inode: u64 = read(file, config!(offsets.file_inode)).ok()?;
    let ino: u64 = read(inode, config!(offsets.inode_ino)).ok()?;
    let sb: u64 = read(inode, config!(offsets.inode_sb)).ok()?;
    let dev: u32 = read(sb, config!(offsets.sb_dev)).ok()?;
    Some((dev, ino))
}

/// Looks up `fd` of the current task. `Err` when kernel memory could not be read.
#[inline(always)]
pub fn walk(fd: i32) -> Result<Walk, i32> {
    let file = file_of(fd)?;
    if file == 0 {
        return Ok(Walk::Other);
    }
    let inode: u64 = read(file, config!(offsets.file_inode))?;
    let mode: u16 = read(inode, config!(offsets.inode_mode))?;
    if mode & S_IFMT != S_IFSOCK {
        return Ok(Walk::Other);
    }
    let socket: u64 = read(file, config!(offsets.file_private_data))?;
    let sock_type: u16 = read(socket, config!(offsets.socket_type))?;
    if sock_type != SOCK_STREAM {
        return Ok(Walk::Other);
    }
    let sk: u64 = read(socket, config!(offsets.socket_sk))?;
    if sk == 0 {
        return Ok(Walk::Other);
    }
    let family: u16 = read(sk, config!(offsets.sk_family))?;
    if family == AF_UNIX {
        // No unix layout from the kernel's BTF: not captured.
        if config!(offsets.unix_peer) == 0 {
            return Ok(Walk::Other);
        }
        return Ok(Walk::Unix(sk));
    }
    Ok(match tuple_of(sk)? {
        Some(tuple) => Walk::Inet(tuple),
        None => Walk::Other,
    })
}

/// The 4-tuple of an inet `struct sock`, or `None` for other families.
#[inline(always)]
pub fn tuple_of(sk: u64) -> Result<Option<Tuple>, i32> {
    let family: u16 = read(sk, config!(offsets.sk_family))?;
    let mut tuple = Tuple {
        family,
        sk,
        ..Tuple::default()
    };
    match family {
        AF_INET => {
            let local: [u8; 4] = read(sk, config!(offsets.sk_rcv_saddr))?;
            let remote: [u8; 4] = read(sk, config!(offsets.sk_daddr))?;
            tuple.local_addr[..4].copy_from_slice(&local);
            tuple.remote_addr[..4].copy_from_slice(&remote);
        }
        AF_INET6 => {
            tuple.local_addr = read(sk, config!(offsets.sk_v6_rcv_saddr))?;
            tuple.remote_addr = read(sk, config!(offsets.sk_v6_daddr))?;
        }
        _ => return Ok(None),
    }
    // skc_num is the local port in host order, skc_dport the remote in network order.
    tuple.local_port = read(sk, config!(offsets.sk_num))?;
    tuple.remote_port = u16::from_be(read(sk, config!(offsets.sk_dport))?);
    Ok(Some(tuple))
}

/// A new id, unique for the agent's lifetime: boot-time ns with the CPU in the low bits.
#[inline(always)]
fn new_conn_id() -> u64 {
    // SAFETY: helpers without preconditions.
    let (now, cpu) = unsafe { (bpf_ktime_get_ns(), bpf_get_smp_processor_id()) };
    (now << 10) | u64::from(cpu & 0x3ff)
}

/// A record header stamped now.
#[inline(always)]
pub fn header(kind: EventKind, detail: u8, pid_tgid: u64, fd: i32, conn_id: u64) -> EventHeader {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    header_at(kind, detail, pid_tgid, fd, conn_id, now)
}

#[inline(always)]
pub fn header_at(
    kind: EventKind,
    detail: u8,
    pid_tgid: u64,
    fd: i32,
    conn_id: u64,
    ts_ns: u64,
) -> EventHeader {
    EventHeader {
        kind: kind as u8,
        detail,
        _pad: [0; 2],
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        fd,
        ts_ns,
        conn_id,
    }
}

/// Records a connection for (tgid, fd) and tells userspace about it.
/// Returns its info, or `None` when the fd is not traced.
/// Inlined: as a call, its frame on top of `sys_exit_data`'s exceeds the
/// 512-byte combined stack limit that 6.1 and 6.12 verifiers enforce.
#[inline(always)]
pub fn register<C: EbpfContext>(ctx: &C, pid_tgid: u64, fd: i32, role: Role) -> Option<SocketInfo> {
    let key = SocketKey {
        tgid: (pid_tgid >> 32) as u32,
        fd,
    };
    // A whole tuple either way (zeros for unix): 5.10's verifier refuses
    // reading stack slots a branch left unwritten, which an Option<Tuple>
    // compiles to.
    let mut tuple = Tuple::default();
    let mut unix = false;
    match walk(fd) {
        Ok(Walk::Inet(inet)) => tuple = inet,
        Ok(Walk::Unix(sk)) => {
            tuple.sk = sk;
            unix = true;
        }
        Ok(Walk::Other) => {
            let info = SocketInfo {
                state: SOCKET_IGNORED,
                ..SocketInfo::default()
            };
            if SOCKETS.insert(&key, &info, 0).is_err() {
                count(Counter::SocketsFull, 1);
            }
            return None;
        }
        Err(_) => {
            count(Counter::WalkFailed, 1);
            return None;
        }
    }
    let info = SocketInfo {
        conn_id: new_conn_id(),
        sk: tuple.sk,
        state: SOCKET_TRACKED,
        role: role as u8,
        _pad: [0; 6],
    };
    if SOCKETS.insert(&key, &info, 0).is_err() {
        count(Counter::SocketsFull, 1);
    }
    if unix {
        announce_unix(ctx, pid_tgid, fd, info.conn_id, role, tuple.sk);
    } else {
        announce(ctx, pid_tgid, fd, info.conn_id, role, &tuple);
    }
    Some(info)
}

/// The inode number of a sock's socket (`SOCK_INODE(sk->sk_socket)`), 0
/// when it has none: an end not accepted yet, or closed.
#[inline(always)]
fn inode_number(sk: u64) -> u64 {
    let socket: u64 = read(sk, config!(offsets.sk_socket)).unwrap_or(0);
    if socket == 0 {
        return 0;
    }
    read(
        socket + u64::from(config!(offsets.socket_alloc_inode)),
        config!(offsets.inode_ino),
    )
    .unwrap_or(0)
}

/// Sends the open record of a unix connection: both ends' `struct sock *`
/// and the name (this end's, else its peer's). Built in the CPU's staging
/// slot: with its 108-byte name it does not fit beside the syscall exit
/// hook's frame on the stack.
#[inline(always)]
fn announce_unix<C: EbpfContext>(
    ctx: &C,
    pid_tgid: u64,
    fd: i32,
    conn_id: u64,
    role: Role,
    sk: u64,
) {
    let Some(mut guard) = ScratchGuard::acquire() else {
        return;
    };
    let slot = guard.get().payload.as_mut_ptr().cast::<UnixOpenEvent>();
    // SAFETY: the staging slot's payload holds far more than one record and
    // is 8-byte aligned (it follows a DataEvent); exclusive by the guard.
    let record = unsafe { &mut *slot };
    record.header = header(EventKind::UnixOpen, role as u8, pid_tgid, fd, conn_id);
    record.sk = sk;
    record.peer_sk = read(sk, config!(offsets.unix_peer)).unwrap_or(0);
    record.ino = inode_number(sk);
    record.peer_ino = if record.peer_sk == 0 {
        0
    } else {
        inode_number(record.peer_sk)
    };
    record.path_len = 0;
    record.path_owner = 0;
    record._pad = [0; 5];
    record._tail = [0; 4];
    record.comm = bpf_get_current_comm().unwrap_or_default();
    let mut owner = UNIX_NAME_LOCAL;
    let mut addr: u64 = read(sk, config!(offsets.unix_addr)).unwrap_or(0);
    if addr == 0 && record.peer_sk != 0 {
        owner = UNIX_NAME_PEER;
        addr = read(record.peer_sk, config!(offsets.unix_addr)).unwrap_or(0);
    }
    if addr != 0 {
        // `len` counts the 2-byte family before the name.
        let len: u32 = read(addr, config!(offsets.unix_address_len)).unwrap_or(0);
        let n = u64::from(len).wrapping_sub(2);
        if n > 0 && n <= UNIX_PATH_MAX as u64 {
            // Masked again for the verifier, through a volatile read so the
            // compiler cannot drop the mask it knows to be redundant.
            // SAFETY: a read of a local.
            let n = unsafe { core::ptr::read_volatile(&n) } & 0x7f;
            let src = addr + u64::from(config!(offsets.unix_address_name)) + 2;
            // SAFETY: kernel memory read with the faulting-safe helper into
            // the record's name, n ≤ its size.
            let ok = unsafe {
                probe_read_kernel_raw(record.path.as_mut_ptr().cast(), n as u32, src as *const _)
            } == 0;
            if ok {
                record.path_len = n as u16;
                record.path_owner = owner;
            }
        }
    }
    let record: &UnixOpenEvent = record;
    output_record(ctx, record);
}

/// Remembers the connection under its `struct sock *` (for the
/// kernel-function layer) and sends its open record.
#[inline(always)]
fn announce<C: EbpfContext>(
    ctx: &C,
    pid_tgid: u64,
    fd: i32,
    conn_id: u64,
    role: Role,
    tuple: &Tuple,
) {
    let by_sock = SockConn {
        conn_id,
        fd,
        _pad: 0,
    };
    if SOCK_CONNS.insert(&tuple.sk, &by_sock, 0).is_err() {
        count(Counter::SocketsFull, 1);
    }
    let event = open_record(
        header(EventKind::ConnOpen, role as u8, pid_tgid, fd, conn_id),
        tuple,
        bpf_get_current_comm().unwrap_or_default(),
    );
    output_record(ctx, &event);
}

/// An open record (a connection, or one of the agent's own) for `tuple`.
#[inline(always)]
fn open_record(header: EventHeader, tuple: &Tuple, comm: [u8; 16]) -> ConnOpenEvent {
    ConnOpenEvent {
        header,
        family: tuple.family,
        local_port: tuple.local_port,
        remote_port: tuple.remote_port,
        _pad: 0,
        local_addr: tuple.local_addr,
        remote_addr: tuple.remote_addr,
        comm,
    }
}

/// Tells the agent the addresses of one of its own connections (nothing
/// is registered: its traffic is never traced).
#[inline(always)]
pub fn announce_own<C: EbpfContext>(ctx: &C, pid_tgid: u64, fd: i32) {
    let Ok(Walk::Inet(tuple)) = walk(fd) else {
        return;
    };
    let event = open_record(
        header(EventKind::OwnConnect, 0, pid_tgid, fd, 0),
        &tuple,
        [0; 16],
    );
    output_record(ctx, &event);
}

/// The traced connection behind a `struct sock *`, registering it (without
/// an fd) when no syscall has shown it yet. `None` for non-inet sockets.
#[inline(always)]
pub fn lookup_sock<C: EbpfContext>(ctx: &C, pid_tgid: u64, sk: u64) -> Option<SockConn> {
    // SAFETY: the value is copied out at once.
    if let Some(conn) = unsafe { SOCK_CONNS.get(&sk) } {
        return Some(*conn);
    }
    let tuple = match tuple_of(sk) {
        Ok(Some(tuple)) => tuple,
        Ok(None) => return None,
        Err(_) => {
            count(Counter::WalkFailed, 1);
            return None;
        }
    };
    let conn_id = new_conn_id();
    announce(ctx, pid_tgid, -1, conn_id, Role::Unknown, &tuple);
    Some(SockConn {
        conn_id,
        fd: -1,
        _pad: 0,
    })
}

/// The traced connection behind (tgid, fd), registering it on first sight.
#[inline(always)]
pub fn lookup<C: EbpfContext>(ctx: &C, pid_tgid: u64, fd: i32) -> Option<SocketInfo> {
    let key = SocketKey {
        tgid: (pid_tgid >> 32) as u32,
        fd,
    };
    // SAFETY: the value is copied out at once.
    match unsafe { SOCKETS.get(&key) } {
        Some(info) if reported(info.state) => Some(*info),
        Some(_) => None,
        None => register(ctx, pid_tgid, fd, Role::Unknown),
    }
}

/// The traced connection behind (tgid, fd) if a syscall already showed it
/// (no registration: for probes whose stack cannot hold one).
#[inline(always)]
pub fn known(pid_tgid: u64, fd: i32) -> Option<SocketInfo> {
    let key = SocketKey {
        tgid: (pid_tgid >> 32) as u32,
        fd,
    };
    // SAFETY: the value is copied out at once.
    match unsafe { SOCKETS.get(&key) } {
        Some(info) if reported(info.state) => Some(*info),
        _ => None,
    }
}

/// Whether the calls of a socket in `state` are reported: a traced
/// connection's, or a blind one's (without their bytes).
#[inline(always)]
pub fn reported(state: u8) -> bool {
    state == SOCKET_TRACKED || state == SOCKET_BLIND
}

/// What SOCKETS already says of an fd.
#[derive(Clone, Copy)]
pub enum Known {
    /// A traced connection.
    Tracked(u64),
    /// A traced connection whose bytes are not copied ([`SOCKET_BLIND`]).
    Blind(u64),
    /// Needs no copying: not a traced socket, or a connection the agent
    /// muted (counted).
    Untraced,
    /// Not seen yet.
    Unknown,
}

#[inline(always)]
pub fn known_state(pid_tgid: u64, fd: i32) -> Known {
    let key = SocketKey {
        tgid: (pid_tgid >> 32) as u32,
        fd,
    };
    // SAFETY: the value is read at once.
    match unsafe { SOCKETS.get(&key) } {
        Some(info) if info.state == SOCKET_TRACKED => Known::Tracked(info.conn_id),
        Some(info) if info.state == SOCKET_BLIND => Known::Blind(info.conn_id),
        Some(info) if info.state == SOCKET_MUTED => {
            count(Counter::MutedCalls, 1);
            Known::Untraced
        }
        Some(_) => Known::Untraced,
        None => Known::Unknown,
    }
}

impl Known {
    /// For a data call's hooks: `None` when it needs no record,
    /// else the connection (0: not known yet) and whether it is blind.
    #[inline(always)]
    pub fn for_call(self) -> Option<(u64, bool)> {
        match self {
            Known::Tracked(conn_id) => Some((conn_id, false)),
            Known::Blind(conn_id) => Some((conn_id, true)),
            Known::Unknown => Some((0, false)),
            Known::Untraced => None,
        }
    }
}

/// close(fd): forget the fd; tell userspace if it was a traced connection.
pub fn forget<C: EbpfContext>(ctx: &C, pid_tgid: u64, fd: i32) {
    let key = SocketKey {
        tgid: (pid_tgid >> 32) as u32,
        fd,
    };
    // SAFETY: the value is copied out at once.
    let Some(info) = (unsafe { SOCKETS.get(&key) }).copied() else {
        return;
    };
    let _ = SOCKETS.remove(&key);
    if reported(info.state) || info.state == SOCKET_MUTED {
        let _ = SOCK_CONNS.remove(&info.sk);
        forget_lost(info.conn_id);
        let event = ConnCloseEvent {
            header: header(EventKind::ConnClose, 0, pid_tgid, fd, info.conn_id),
        };
        output_record(ctx, &event);
    }
}
