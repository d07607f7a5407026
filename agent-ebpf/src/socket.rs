//! fd → socket: which fds are inet stream sockets, their 4-tuple, and the
//! SOCKETS table that remembers the answer until close().
//!
//! The walk follows `current->files->fdt->fd[fd]->{f_inode->i_mode,
//! private_data (struct socket)->sk->__sk_common}` with offsets taken from the
//! running kernel's BTF by the agent.

use agent_common::{
    ConnCloseEvent, ConnOpenEvent, Counter, EventHeader, EventKind, Role, SOCKET_IGNORED,
    SOCKET_TRACKED, SockConn, SocketInfo, SocketKey,
};
use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_comm, bpf_get_current_task, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
    },
};

use crate::{
    SOCK_CONNS, SOCKETS, config,
    emit::{count, output_record},
};

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const SOCK_STREAM: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// What the walk found for an fd.
pub enum Walk {
    Inet(Tuple),
    /// Not a socket, or not an inet stream socket.
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

/// Looks up `fd` of the current task. `Err` when kernel memory could not be read.
#[inline(always)]
pub fn walk(fd: i32) -> Result<Walk, i32> {
    if fd < 0 {
        return Ok(Walk::Other);
    }
    // SAFETY: helper without preconditions.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read(task, config!(offsets.task_files))?;
    let fdt: u64 = read(files, config!(offsets.files_fdt))?;
    let max_fds: u32 = read(fdt, config!(offsets.fdtable_max_fds))?;
    if fd as u32 >= max_fds {
        return Ok(Walk::Other);
    }
    let fd_array: u64 = read(fdt, config!(offsets.fdtable_fd))?;
    let file: u64 = read(fd_array + (fd as u64) * 8, 0)?;
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

pub fn header(kind: EventKind, detail: u8, pid_tgid: u64, fd: i32, conn_id: u64) -> EventHeader {
    EventHeader {
        kind: kind as u8,
        detail,
        _pad: [0; 2],
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        fd,
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
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
    let tuple = match walk(fd) {
        Ok(Walk::Inet(tuple)) => tuple,
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
    };
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
    announce(ctx, pid_tgid, fd, info.conn_id, role, &tuple);
    Some(info)
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
        Some(info) if info.state == SOCKET_TRACKED => Some(*info),
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
        Some(info) if info.state == SOCKET_TRACKED => Some(*info),
        _ => None,
    }
}

/// Whether (tgid, fd) is known not to be a traced socket.
#[inline(always)]
pub fn known_ignored(pid_tgid: u64, fd: i32) -> bool {
    let key = SocketKey {
        tgid: (pid_tgid >> 32) as u32,
        fd,
    };
    // SAFETY: the value is read at once.
    matches!(unsafe { SOCKETS.get(&key) }, Some(info) if info.state == SOCKET_IGNORED)
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
    if info.state == SOCKET_TRACKED {
        let _ = SOCK_CONNS.remove(&info.sk);
        let event = ConnCloseEvent {
            header: header(EventKind::ConnClose, 0, pid_tgid, fd, info.conn_id),
        };
        output_record(ctx, &event);
    }
}
