//! Kernel-function layer: TCP send functions, for traffic that never passes
//! a traced read/write syscall — sendfile and splice (page-backed, so the
//! bytes are counted rather than copied), sendmmsg, io_uring.
//!
//! The same handlers run as fexit programs where the kernel has BPF
//! trampolines and as kprobe/kretprobe pairs otherwise; the agent picks one
//! set at run time. A send made inside a data syscall the syscall layer
//! traces is left to that layer, so nothing is reported twice.

use agent_common::{DataEvent, EventKind, Syscall};
use aya_ebpf::{
    EbpfContext,
    helpers::bpf_get_current_pid_tgid,
    macros::{fexit, kprobe, kretprobe},
    programs::{FExitContext, ProbeContext, RetProbeContext},
};

use crate::{KFUNC_ARGS, emit::output_data, process::selected, socket, syscalls};

/// Reports `sent` bytes that `sk` sent outside a traced syscall.
#[inline(always)]
fn on_send<C: EbpfContext>(ctx: &C, function: Syscall, sk: u64, sent: i64) {
    if sent <= 0 || sk == 0 {
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if !selected((pid_tgid >> 32) as u32) {
        return;
    }
    if syscalls::in_flight(pid_tgid) {
        // A traced data syscall is in flight on this thread: its exit
        // hook reports these bytes (with payload).
        return;
    }
    let Some(conn) = socket::lookup_sock(ctx, pid_tgid, sk) else {
        return;
    };
    let mut event = DataEvent {
        header: socket::header(
            EventKind::Data,
            function as u8,
            pid_tgid,
            conn.fd,
            conn.conn_id,
        ),
        total_bytes: sent as u64,
        ..Default::default()
    };
    output_data(ctx, &mut event, core::mem::size_of::<DataEvent>() as u64, 0);
}

/// `int tcp_sendmsg(struct sock *sk, struct msghdr *msg, size_t size)`:
/// arguments, then the return value, in the trampoline's context.
#[fexit(function = "tcp_sendmsg")]
pub fn fexit_tcp_sendmsg(ctx: FExitContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let ret: i32 = ctx.arg(3);
    on_send(&ctx, Syscall::TcpSendmsg, sk, i64::from(ret));
    0
}

/// `int tcp_sendpage(struct sock *sk, struct page *page, int offset,
/// size_t size, int flags)` (removed in 6.5, where sendfile reaches tcp_sendmsg).
#[fexit(function = "tcp_sendpage")]
pub fn fexit_tcp_sendpage(ctx: FExitContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let ret: i32 = ctx.arg(5);
    on_send(&ctx, Syscall::TcpSendpage, sk, i64::from(ret));
    0
}

/// kprobe path: the entry remembers `sk` per thread for the return probe.
#[inline(always)]
fn remember_sock(ctx: &ProbeContext) {
    let sk: u64 = ctx.arg(0).unwrap_or(0);
    if sk != 0 {
        let _ = KFUNC_ARGS.insert(&bpf_get_current_pid_tgid(), &sk, 0);
    }
}

/// kprobe path: the return probe reports what the remembered `sk` sent.
#[inline(always)]
fn on_return(ctx: &RetProbeContext, function: Syscall) -> u32 {
    // The functions return int; the register holds it sign-extended or not.
    let ret: i64 = ctx.ret();
    on_send(ctx, function, take_sock(), i64::from(ret as i32));
    0
}

#[inline(always)]
fn take_sock() -> u64 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: copied out at once.
    let sk = unsafe { KFUNC_ARGS.get(&pid_tgid) }.copied().unwrap_or(0);
    if sk != 0 {
        let _ = KFUNC_ARGS.remove(&pid_tgid);
    }
    sk
}

/// Same prototype as [`fexit_tcp_sendmsg`].
#[kprobe]
pub fn kprobe_tcp_sendmsg(ctx: ProbeContext) -> u32 {
    remember_sock(&ctx);
    0
}

#[kretprobe]
pub fn kretprobe_tcp_sendmsg(ctx: RetProbeContext) -> u32 {
    on_return(&ctx, Syscall::TcpSendmsg)
}

/// Same prototype as [`fexit_tcp_sendpage`].
#[kprobe]
pub fn kprobe_tcp_sendpage(ctx: ProbeContext) -> u32 {
    remember_sock(&ctx);
    0
}

#[kretprobe]
pub fn kretprobe_tcp_sendpage(ctx: RetProbeContext) -> u32 {
    on_return(&ctx, Syscall::TcpSendpage)
}
