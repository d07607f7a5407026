//! Syscall tracepoints: socket data, connect, accept, close.
//!
//! A data record carries one time. Bytes sent are stamped when the syscall
//! began, bytes received when it returned: the send that feeds a receive
//! then always precedes it, even when the receiver wakes, reads and
//! returns before the sender's exit hook runs, so a server's span lies
//! within its caller's.
//!
//! A receive needs no enter hook where the kernel lends the exit hook the
//! thread's saved registers (`bpf_task_pt_regs`, 5.15+, x86-64): its
//! arguments are still there when it returns, and a receive is stamped at
//! exit anyway. Each hook avoided spares the traced thread the trace
//! event's dispatch as well as the program ([`sys_exit_receive`]). Sends
//! keep theirs: they are stamped when they begin.
//!
//! Record layout of `syscalls/sys_enter_*`: 8 bytes of common fields, the
//! syscall number, then each argument as 8 bytes from offset 16.
//! `syscalls/sys_exit_*`: the syscall number (`int`) at offset 8, the
//! return value (`long ret`) at offset 16.

use agent_common::{
    Counter, DataEvent, Direction, EventKind, MAX_CAPTURE_BYTES, MAX_IOVECS, Role, SOCKET_BLIND,
    Syscall, TRANSPORT_PERF,
};
use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{bpf_get_current_task_btf, bpf_probe_read_user, bpf_task_pt_regs},
    },
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::{
    PENDING, PENDING_SLOTS, config,
    emit::{ScratchGuard, count, note_lost, output_data, ring_data},
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
    /// Non-zero from enter to exit (the entry outlives the call, see [`save`]).
    live: u8,
    /// Non-zero once the thread has called into a TLS library ([`mark_tls`]):
    /// only then can a socket call be inside a TLS call. Kept across calls.
    tls: u8,
    ptr: u64,
    len: u64,
    /// When a send began (0 for a receive, stamped at exit).
    ts_ns: u64,
    /// The connection the enter hook found for `fd` (0: unknown yet). The
    /// syscall moves bytes of the file it resolved at entry, so this is
    /// the right one even if another thread reuses the fd meanwhile.
    conn_id: u64,
    /// Non-zero when the enter hook found the connection blind: its bytes
    /// are not copied ([`agent_common::SOCKET_BLIND`]).
    blind: u8,
}

impl PendingCall {
    #[inline(always)]
    fn new(syscall: u8, fd: i32, ptr: u64, len: u64, vectored: bool) -> Self {
        Self {
            fd,
            syscall,
            vectored: vectored as u8,
            live: 1,
            tls: 0,
            ptr,
            len,
            ts_ns: 0,
            conn_id: 0,
            blind: 0,
        }
    }
}

/// A thread's own PENDING_SLOTS entry: `owner` is the pid_tgid of the
/// thread that holds it, 0 while it is free.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingSlot {
    owner: u64,
    call: PendingCall,
}

/// Set in the PENDING key that claims a slot (`CLAIM | index`): no
/// pid_tgid has it, tgids being below 2^22.
const CLAIM: u64 = 1 << 63;

/// The slot of this thread's id, whoever holds it.
#[inline(always)]
fn slot_of(pid_tgid: u64) -> Option<(u32, *mut PendingSlot)> {
    let index = pid_tgid as u32 & config!(pending_slot_mask);
    Some((index, PENDING_SLOTS.get_ptr_mut(index)?))
}

/// This thread's entry: the slot it holds, else its PENDING entry.
///
/// A thread keeps its call in the slot of its id when it could claim it:
/// an array slot is found by the id itself, where a hash look-up (hashing
/// the key, walking the bucket) was the costliest part of the enter and
/// exit hooks after the user copy. Threads whose slot another thread holds
/// use PENDING, as every thread did before.
#[inline(always)]
fn entry(pid_tgid: u64) -> Option<*mut PendingCall> {
    if let Some((_, slot)) = slot_of(pid_tgid)
        // SAFETY: map value pointer; only the owner writes its slot, and a
        // stale read of another thread's id is never this thread's.
        && unsafe { (*slot).owner } == pid_tgid
    {
        // SAFETY: as above.
        return Some(unsafe { &raw mut (*slot).call });
    }
    PENDING.get_ptr_mut(&pid_tgid)
}

/// A first entry for this thread, holding `call`: the slot of its id when
/// it is free and this thread wins the claim, else a PENDING entry. False
/// when PENDING is full.
///
/// Two threads whose ids share a slot may find it free at once. Without
/// atomic exchanges (5.10 has none), the claim is a PENDING insert with
/// BPF_NOEXIST: the map's bucket lock lets one of them win, and the other
/// goes to PENDING. The claim stays until the holder ends
/// (`release`), so a thread claims once in its life.
#[inline(always)]
fn add_entry(pid_tgid: u64, call: &PendingCall) -> bool {
    if let Some((index, slot)) = slot_of(pid_tgid)
        // SAFETY: map value pointer.
        && unsafe { (*slot).owner } == 0
        && PENDING
            .insert(&(CLAIM | u64::from(index)), call, u64::from(BPF_NOEXIST))
            .is_ok()
    {
        // SAFETY: the claim makes the slot this thread's alone.
        unsafe {
            (*slot).call = *call;
            (*slot).owner = pid_tgid;
        }
        return true;
    }
    PENDING.insert(&pid_tgid, call, 0).is_ok()
}

/// The thread ends: its slot is freed (the owner cleared before the claim
/// goes, so no thread can hold it between) and its PENDING entry removed.
#[inline(always)]
pub(crate) fn release(pid_tgid: u64) {
    if let Some((index, slot)) = slot_of(pid_tgid)
        // SAFETY: map value pointer.
        && unsafe { (*slot).owner } == pid_tgid
    {
        // SAFETY: as above; this thread holds the slot.
        unsafe { (*slot).owner = 0 };
        let _ = PENDING.remove(&(CLAIM | u64::from(index)));
    }
    let _ = PENDING.remove(&pid_tgid);
}

/// Saves the call in this thread's entry ([`entry`]). The entry stays
/// after the call (its exit only clears `live`) and is rewritten in place
/// by the next one: a lookup and a store, where inserting and deleting an
/// entry per syscall took the bucket lock and the free list twice and was
/// the costliest part of the enter hooks. `sched_process_exit` removes it
/// with its thread ([`release`]).
#[inline(always)]
fn save(pid_tgid: u64, call: &PendingCall) {
    if let Some(entry) = entry(pid_tgid) {
        // SAFETY: map value pointer, valid for the program's run; only this
        // thread (its enter, exit and exit-of-thread hooks, and its TLS
        // probes, none of which overlap) uses its entry.
        unsafe {
            let tls = (*entry).tls;
            *entry = *call;
            (*entry).tls = tls;
        }
    } else if !add_entry(pid_tgid, call) {
        count(Counter::PendingFull, 1);
    }
}

/// Notes that this thread calls into a TLS library, so the exit of its
/// socket calls looks for the TLS call they may be inside (a look-up the
/// threads that never do are spared). False when the note could not be
/// made (PENDING full): the caller must then not trace the TLS call, or its
/// ciphertext would pass for clear text.
#[inline(always)]
pub(crate) fn mark_tls(pid_tgid: u64) -> bool {
    if let Some(entry) = entry(pid_tgid) {
        // SAFETY: as in `save`.
        unsafe { (*entry).tls = 1 };
        return true;
    }
    let mut call = PendingCall::new(0, -1, 0, 0, false);
    call.live = 0;
    call.tls = 1;
    add_entry(pid_tgid, &call)
}

/// This thread's syscall in flight, taken (its entry marked done).
#[inline(always)]
fn take(pid_tgid: u64) -> Option<PendingCall> {
    let entry = entry(pid_tgid)?;
    // SAFETY: as in `save`.
    let call = unsafe { *entry };
    if call.live == 0 {
        return None;
    }
    // SAFETY: as in `save`.
    unsafe { (*entry).live = 0 };
    Some(call)
}

/// Whether a data syscall saved by an enter hook is in flight on this thread.
#[inline(always)]
pub(crate) fn in_flight(pid_tgid: u64) -> bool {
    // SAFETY: read at once.
    entry(pid_tgid).is_some_and(|call| unsafe { (*call).live } != 0)
}

/// Argument `n` of a syscall: a direct load from the tracepoint record,
/// which the verifier allows at constant, aligned offsets (`read_at` costs
/// a helper call per argument, on every traced syscall).
#[inline(always)]
fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: sys_enter records hold six 8-byte arguments from offset 16.
    unsafe {
        ctx.as_ptr()
            .cast::<u8>()
            .add(16 + 8 * n)
            .cast::<u64>()
            .read()
    }
}

#[inline(always)]
fn ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: sys_exit records hold `long ret` at offset 16.
    unsafe { ctx.as_ptr().cast::<u8>().add(16).cast::<i64>().read() }
}

/// Saves the call for the exit hook if the process is selected and the fd
/// is not known to be something other than a traced socket; a send is
/// stamped now (see the module docs).
#[inline(always)]
fn remember(syscall: Syscall, fd: i32, ptr: u64, len: u64, vectored: bool) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !selected((pid_tgid >> 32) as u32) {
        return;
    }
    let Some((conn_id, blind)) = socket::known_state(pid_tgid, fd).for_call() else {
        return;
    };
    let mut call = PendingCall::new(syscall as u8, fd, ptr, len, vectored);
    call.conn_id = conn_id;
    call.blind = blind as u8;
    if syscall.direction() == Direction::Egress {
        // SAFETY: helper without preconditions.
        call.ts_ns = unsafe { bpf_ktime_get_ns() };
    }
    save(pid_tgid, &call);
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
                $syscall,
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
                $syscall,
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
            remember($syscall, arg(&ctx, 0) as i32, iov, len, true);
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
            Syscall::Recvfrom,
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
        remember(Syscall::Recvmsg, arg(&ctx, 0) as i32, iov, len, true);
    }
    0
}

/// Prototype: `sendfile64(int out_fd, int in_fd, loff_t *offset, size_t count)`.
/// The bytes come from a file, so only their count is reported (a null
/// buffer pointer tells the exit hook to copy nothing).
#[tracepoint]
pub fn sys_enter_sendfile64(ctx: TracePointContext) -> u32 {
    remember(
        Syscall::Sendfile,
        arg(&ctx, 0) as i32,
        0,
        arg(&ctx, 3),
        false,
    );
    0
}

/// Exit of every data syscall whose enter hook saved its arguments: emits
/// what really moved.
#[tracepoint]
pub fn sys_exit_data(ctx: TracePointContext) -> u32 {
    let _ = try_sys_exit_data(&ctx);
    0
}

fn try_sys_exit_data(ctx: &TracePointContext) -> Result<(), ()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let call = take(pid_tgid).ok_or(())?;
    let moved = ret(ctx);
    if moved <= 0 || call.syscall == CONNECT || call.syscall == OWN_CONNECT {
        return Ok(());
    }
    emit(ctx, pid_tgid, &call, moved as u64)
}

/// x86-64 numbers of the receives [`sys_exit_receive`] serves.
const NR_READ: i32 = 0;
const NR_READV: i32 = 19;
const NR_RECVFROM: i32 = 45;
const NR_RECVMSG: i32 = 47;

/// The first four syscall arguments as the thread entered the kernel with
/// them: x86-64's `struct pt_regs` (di, si, dx, r10 at 112, 104, 96, 56), a
/// layout ptrace's `user_regs_struct` fixes. A syscall moving bytes does not
/// write them, so they still hold at its exit.
struct EntryArgs {
    di: u64,
    si: u64,
    dx: u64,
    r10: u64,
}

impl EntryArgs {
    #[inline(always)]
    fn of_current_thread() -> Self {
        // SAFETY: helpers without preconditions. The registers pointer is
        // typed by the kernel's BTF, so the verifier checks each load
        // against `struct pt_regs` and makes it fault-safe.
        unsafe {
            let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u64;
            Self {
                di: regs.add(14).read(),
                si: regs.add(13).read(),
                dx: regs.add(12).read(),
                r10: regs.add(7).read(),
            }
        }
    }
}

/// `syscalls/sys_exit_*`: the syscall's number.
#[inline(always)]
fn syscall_nr(ctx: &TracePointContext) -> i32 {
    // SAFETY: sys_exit records hold `int __syscall_nr` at offset 8.
    unsafe { ctx.as_ptr().cast::<u8>().add(8).cast::<i32>().read() }
}

/// Exit of a receive (read, readv, recvfrom, recvmsg) that no enter hook
/// saw: its arguments are read from the thread's saved registers. The
/// agent attaches it in place of the receives' enter hooks and their
/// [`sys_exit_data`] where the kernel allows it (see the module docs).
///
/// The fd is resolved at exit. Should another thread close it and reuse
/// its number while this call blocks, the bytes would be put on the new
/// connection; a close of a socket another thread reads is rare, and
/// servers shut it down first, which ends the read.
#[tracepoint]
pub fn sys_exit_receive(ctx: TracePointContext) -> u32 {
    let _ = try_sys_exit_receive(&ctx);
    0
}

fn try_sys_exit_receive(ctx: &TracePointContext) -> Result<(), ()> {
    let moved = ret(ctx);
    if moved <= 0 {
        return Ok(());
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if !selected((pid_tgid >> 32) as u32) {
        return Ok(());
    }
    let args = EntryArgs::of_current_thread();
    let (syscall, ptr, len, vectored) = match syscall_nr(ctx) {
        NR_READ => (Syscall::Read, args.si, args.dx, false),
        NR_READV => (Syscall::Readv, args.si, args.dx, true),
        NR_RECVFROM if args.r10 & MSG_PEEK == 0 => (Syscall::Recvfrom, args.si, args.dx, false),
        NR_RECVMSG if args.dx & MSG_PEEK == 0 => {
            let (iov, n) = msghdr_iov(args.si);
            (Syscall::Recvmsg, iov, n, true)
        }
        _ => return Ok(()),
    };
    let fd = args.di as i32;
    let Some((conn_id, blind)) = socket::known_state(pid_tgid, fd).for_call() else {
        return Ok(());
    };
    let mut call = PendingCall::new(syscall as u8, fd, ptr, len, vectored);
    call.conn_id = conn_id;
    call.blind = blind as u8;
    // SAFETY: read at once; only this thread writes its entry.
    call.tls = entry(pid_tgid).map_or(0, |entry| unsafe { (*entry).tls });
    emit(ctx, pid_tgid, &call, moved as u64)
}

/// Emits the `moved` bytes of `call`, a data syscall that returned.
#[inline(always)]
fn emit(ctx: &TracePointContext, pid_tgid: u64, call: &PendingCall, moved: u64) -> Result<(), ()> {
    let (conn_id, blind) = if call.conn_id != 0 {
        (call.conn_id, call.blind != 0)
    } else {
        let info = socket::lookup(ctx, pid_tgid, call.fd).ok_or(())?;
        (info.conn_id, info.state == SOCKET_BLIND)
    };
    // Inside a TLS library call these bytes are ciphertext: a read's
    // plaintext is sent when the call returns, a write's now, in place of
    // the ciphertext, so it is not stamped after the peer's answer.
    let inside = if call.tls == 0 {
        tls::Inside::No
    } else {
        tls::inside_call(pid_tgid, call.fd)
    };
    let (syscall, moved, ptr, vectored) = match inside {
        tls::Inside::No => (call.syscall, moved, call.ptr, call.vectored),
        tls::Inside::Ciphertext => return Ok(()),
        // Stamped as the socket send that carries it.
        tls::Inside::Write { buf, len } => (Syscall::TlsWrite as u8, len, buf, 0),
    };
    // A blind connection's record goes without its bytes: nothing to copy
    // from (see `ring_data` and the staging copy below).
    let ptr = if blind { 0 } else { ptr };
    let want = min(moved, u64::from(config!(capture_bytes)));
    let (unit, unit_seq) = runtime::current_unit((pid_tgid >> 32) as u32);
    // SAFETY: helper without preconditions.
    let ts_ns = if call.ts_ns != 0 {
        call.ts_ns
    } else {
        unsafe { bpf_ktime_get_ns() }
    };
    let event = DataEvent {
        header: socket::header_at(EventKind::Data, syscall, pid_tgid, call.fd, conn_id, ts_ns),
        total_bytes: moved,
        unit_seq,
        unit,
        ..Default::default()
    };
    // One buffer (the common case) goes straight into the ring buffer;
    // several are gathered in the CPU's staging slot first.
    if config!(transport) != TRANSPORT_PERF
        && let Some(src) = single_buffer(ptr, vectored, call.len)
    {
        ring_data(&event, src, want);
        return Ok(());
    }
    let Some(mut guard) = ScratchGuard::acquire() else {
        note_lost(conn_id, syscall, moved);
        return Err(());
    };
    let scratch = guard.get();
    let captured = if ptr == 0 {
        0
    } else if vectored != 0 {
        copy_iovecs(&mut scratch.payload, ptr, call.len, want)
    } else {
        copy_user(&mut scratch.payload, 0, ptr, want);
        want
    };
    let captured = captured & SIZE_MASK;
    scratch.event = event;
    scratch.event.captured = captured as u32;
    let len = core::mem::size_of::<DataEvent>() as u64 + captured;
    output_data(ctx, &mut scratch.event, len, captured);
    Ok(())
}

/// The one user buffer a call moved bytes through: `ptr` itself, the base
/// of a one-entry iovec array, or 0 when nothing is to be copied
/// (sendfile). `None` for several buffers.
#[inline(always)]
fn single_buffer(ptr: u64, vectored: u8, iov_len: u64) -> Option<u64> {
    if ptr == 0 || vectored == 0 {
        return Some(ptr);
    }
    if iov_len != 1 {
        return None;
    }
    // SAFETY: user memory read with the faulting-safe helper.
    let base = unsafe { aya_ebpf::helpers::bpf_probe_read_user(ptr as *const u64) }.unwrap_or(0);
    Some(base)
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
    let tgid = (pid_tgid >> 32) as u32;
    let kind = if tgid == config!(agent_tgid) {
        OWN_CONNECT
    } else if selected(tgid) {
        CONNECT
    } else {
        return 0;
    };
    save(
        pid_tgid,
        &PendingCall::new(kind, arg(&ctx, 0) as i32, 0, 0, false),
    );
    0
}

/// A successful (or in-progress non-blocking) connect makes a client connection.
#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(call) = take(pid_tgid) else {
        return 0;
    };
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
