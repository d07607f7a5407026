//! Syscall tracepoints: socket data, connect, accept, close.
//!
//! Record layout of `syscalls/sys_enter_*`: 8 bytes of common fields, the
//! syscall number, then each argument as 8 bytes from offset 16.
//! `syscalls/sys_exit_*`: the return value (`long ret`) at offset 16.

use agent_common::{Counter, DataEvent, EventKind, MAX_CAPTURE_BYTES, MAX_IOVECS, Role, Syscall};
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_pid_tgid, generated::bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::{
    PENDING, config,
    emit::{ScratchGuard, count, output},
    process::selected,
    runtime, socket, tls,
};

/// Marks a pending connect() rather than a data syscall.
const CONNECT: u8 = 0xff;
/// A connect() of the agent itself.
const OWN_CONNECT: u8 = 0xfe;
const EINPROGRESS: i64 = -115;
/// Masks that let the verifier bound copy offsets and sizes (see Scratch).
const OFFSET_MASK: u64 = MAX_CAPTURE_BYTES as u64 - 1;
pub(crate) const SIZE_MASK: u64 = 2 * MAX_CAPTURE_BYTES as u64 - 1;

/// Arguments of a syscall in flight, saved at enter for the exit hook.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingCall {
    fd: i32,
    syscall: u8,
    /// Non-zero when `ptr` is an iovec array of `len` entries.
    vectored: u8,
    _pad: [u8; 2],
    ptr: u64,
    len: u64,
}

/// Argument `n` of a syscall: a direct load from the tracepoint record,
/// which the verifier allows at constant, aligned offsets (`read_at` costs
/// a helper call per argument, on every traced syscall).
#[inline(always)]
fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: sys_enter records hold six 8-byte arguments from offset 16.
    unsafe { ctx.as_ptr().cast::<u8>().add(16 + 8 * n).cast::<u64>().read() }
}

#[inline(always)]
fn ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: sys_exit records hold `long ret` at offset 16.
    unsafe { ctx.as_ptr().cast::<u8>().add(16).cast::<i64>().read() }
}

/// Saves the call for the exit hook if the process is selected and the fd
/// is not known to be something other than a socket.
#[inline(always)]
fn remember(syscall: u8, fd: i32, ptr: u64, len: u64, vectored: bool) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !selected((pid_tgid >> 32) as u32) || socket::known_untraced(pid_tgid, fd) {
        return;
    }
    let call = PendingCall {
        fd,
        syscall,
        vectored: vectored as u8,
        _pad: [0; 2],
        ptr,
        len,
    };
    if PENDING.insert(&pid_tgid, &call, 0).is_err() {
        count(Counter::PendingFull, 1);
    }
}

/// For sendmsg/recvmsg: the iovec array and its length from `struct user_msghdr`.
#[inline(always)]
fn msghdr_iov(msg: u64) -> (u64, u64) {
    // SAFETY: user pointers read with the faulting-safe helper; 0 on failure.
    unsafe {
        let iov = aya_ebpf::helpers::bpf_probe_read_user((msg + 16) as *const u64).unwrap_or(0);
        let len = aya_ebpf::helpers::bpf_probe_read_user((msg + 24) as *const u64).unwrap_or(0);
        (iov, len)
    }
}

macro_rules! enter_plain {
    ($name:ident, $syscall:expr) => {
        /// Prototype: `(int fd, void *buf, size_t len, ...)`.
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            remember(
                $syscall as u8,
                arg(&ctx, 0) as i32,
                arg(&ctx, 1),
                arg(&ctx, 2),
                false,
            );
            0
        }
    };
}

macro_rules! enter_iovec {
    ($name:ident, $syscall:expr) => {
        /// Prototype: `(unsigned long fd, const struct iovec *vec, unsigned long vlen)`.
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            remember(
                $syscall as u8,
                arg(&ctx, 0) as i32,
                arg(&ctx, 1),
                arg(&ctx, 2),
                true,
            );
            0
        }
    };
}

macro_rules! enter_msg {
    ($name:ident, $syscall:expr) => {
        /// Prototype: `(int fd, struct user_msghdr *msg, unsigned int flags)`.
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            let (iov, len) = msghdr_iov(arg(&ctx, 1));
            remember($syscall as u8, arg(&ctx, 0) as i32, iov, len, true);
            0
        }
    };
}

enter_plain!(sys_enter_read, Syscall::Read);
enter_plain!(sys_enter_write, Syscall::Write);
enter_plain!(sys_enter_sendto, Syscall::Sendto);
/// `MSG_PEEK`: the bytes stay queued and a later call reads them again.
const MSG_PEEK: u64 = 2;

/// Prototype: `recvfrom(int fd, void *ubuf, size_t size, unsigned int
/// flags, ...)`. A peek is not reported: the read that follows is (nginx
/// peeks at the first byte of every connection on a TLS port).
#[tracepoint]
pub fn sys_enter_recvfrom(ctx: TracePointContext) -> u32 {
    if arg(&ctx, 3) & MSG_PEEK == 0 {
        remember(
            Syscall::Recvfrom as u8,
            arg(&ctx, 0) as i32,
            arg(&ctx, 1),
            arg(&ctx, 2),
            false,
        );
    }
    0
}
enter_iovec!(sys_enter_readv, Syscall::Readv);
enter_iovec!(sys_enter_writev, Syscall::Writev);
enter_msg!(sys_enter_sendmsg, Syscall::Sendmsg);
/// Prototype: `recvmsg(int fd, struct user_msghdr *msg, unsigned int flags)`;
/// peeks are not reported (see [`sys_enter_recvfrom`]).
#[tracepoint]
pub fn sys_enter_recvmsg(ctx: TracePointContext) -> u32 {
    if arg(&ctx, 2) & MSG_PEEK == 0 {
        let (iov, len) = msghdr_iov(arg(&ctx, 1));
        remember(Syscall::Recvmsg as u8, arg(&ctx, 0) as i32, iov, len, true);
    }
    0
}

/// Prototype: `sendfile64(int out_fd, int in_fd, loff_t *offset, size_t count)`.
/// The bytes come from a file, so only their count is reported (a null
/// buffer pointer tells the exit hook to copy nothing).
#[tracepoint]
pub fn sys_enter_sendfile64(ctx: TracePointContext) -> u32 {
    remember(
        Syscall::Sendfile as u8,
        arg(&ctx, 0) as i32,
        0,
        arg(&ctx, 3),
        false,
    );
    0
}

/// Exit of every data syscall: emits what really moved.
#[tracepoint]
pub fn sys_exit_data(ctx: TracePointContext) -> u32 {
    let _ = try_sys_exit_data(&ctx);
    0
}

fn try_sys_exit_data(ctx: &TracePointContext) -> Result<(), ()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: copied out at once.
    let call = unsafe { PENDING.get(&pid_tgid) }.copied().ok_or(())?;
    let _ = PENDING.remove(&pid_tgid);
    let moved = ret(ctx);
    if moved <= 0 || call.syscall == CONNECT || call.syscall == OWN_CONNECT {
        return Ok(());
    }
    let conn = socket::lookup(ctx, pid_tgid, call.fd).ok_or(())?;
    // Inside a TLS library call these bytes are ciphertext: a read's
    // plaintext is sent when the call returns, a write's now, in place of
    // the ciphertext, so it is not stamped after the peer's answer.
    let (syscall, moved, ptr, vectored) = match tls::inside_call(pid_tgid, call.fd) {
        tls::Inside::No => (call.syscall, moved as u64, call.ptr, call.vectored),
        tls::Inside::Ciphertext => return Ok(()),
        tls::Inside::Write { buf, len } => (Syscall::TlsWrite as u8, len, buf, 0),
    };
    let mut guard = ScratchGuard::acquire().ok_or(())?;
    let scratch = guard.get();

    let want = min(moved, u64::from(config!(capture_bytes)));
    let captured = if ptr == 0 {
        0
    } else if vectored != 0 {
        copy_iovecs(&mut scratch.payload, ptr, call.len, want)
    } else {
        copy_user(&mut scratch.payload, 0, ptr, want);
        want
    };
    let captured = captured & SIZE_MASK;
    let (unit, unit_seq) = runtime::current_unit((pid_tgid >> 32) as u32);
    scratch.event = DataEvent {
        header: socket::header(EventKind::Data, syscall, pid_tgid, call.fd, conn.conn_id),
        total_bytes: moved,
        captured: captured as u32,
        unit_seq,
        unit,
    };
    let len = core::mem::size_of::<DataEvent>() as u64 + captured;
    output(ctx, (&raw const scratch.event).cast::<u8>(), len, captured);
    Ok(())
}

#[inline(always)]
fn min(a: u64, b: u64) -> u64 {
    if a < b { a } else { b }
}

/// Copies `n` user bytes from `src` to `payload[offset..]` (bounded by masks).
#[inline(always)]
pub(crate) fn copy_user(payload: &mut [u8], offset: u64, src: u64, n: u64) -> bool {
    let offset = offset & OFFSET_MASK;
    let n = n & SIZE_MASK;
    // SAFETY: offset + n < payload.len() by the masks and SCRATCH_PAYLOAD_BYTES.
    unsafe {
        bpf_probe_read_user(
            payload.as_mut_ptr().add(offset as usize).cast(),
            n as u32,
            src as *const _,
        ) == 0
    }
}

/// Copies up to `want` bytes from an iovec array; returns bytes copied.
#[inline(always)]
fn copy_iovecs(payload: &mut [u8], iov: u64, iov_len: u64, want: u64) -> u64 {
    let mut done = 0u64;
    for i in 0..MAX_IOVECS as u64 {
        if i >= iov_len || done >= want {
            break;
        }
        // SAFETY: user memory read with the faulting-safe helper.
        let Ok(entry) =
            (unsafe { aya_ebpf::helpers::bpf_probe_read_user((iov + i * 16) as *const [u64; 2]) })
        else {
            break;
        };
        let n = min(entry[1], want - done);
        if !copy_user(payload, done, entry[0], n) {
            break;
        }
        done += n;
    }
    done
}

/// Prototype: `connect(int fd, struct sockaddr *uservaddr, int addrlen)`.
/// The agent's own connects are remembered too (never its traffic), so
/// their addresses can be told to the agent.
#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == config!(agent_tgid) {
        let call = PendingCall {
            fd: arg(&ctx, 0) as i32,
            syscall: OWN_CONNECT,
            vectored: 0,
            _pad: [0; 2],
            ptr: 0,
            len: 0,
        };
        let _ = PENDING.insert(&pid_tgid, &call, 0);
        return 0;
    }
    remember(CONNECT, arg(&ctx, 0) as i32, 0, 0, false);
    0
}

/// A successful (or in-progress non-blocking) connect makes a client connection.
#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: copied out at once.
    let Some(call) = (unsafe { PENDING.get(&pid_tgid) }).copied() else {
        return 0;
    };
    let _ = PENDING.remove(&pid_tgid);
    let r = ret(&ctx);
    if r != 0 && r != EINPROGRESS {
        return 0;
    }
    if call.syscall == CONNECT {
        socket::register(&ctx, pid_tgid, call.fd, Role::Client);
    } else if call.syscall == OWN_CONNECT {
        socket::announce_own(&ctx, pid_tgid, call.fd);
    }
    0
}

/// accept/accept4 return the new fd: a server connection.
#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let fd = ret(&ctx);
    if fd >= 0 && selected((pid_tgid >> 32) as u32) {
        socket::register(&ctx, pid_tgid, fd as i32, Role::Server);
    }
    0
}

/// Prototype: `close(unsigned int fd)`.
#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if selected((pid_tgid >> 32) as u32) {
        socket::forget(&ctx, pid_tgid, arg(&ctx, 0) as i32);
    }
    0
}
