//! TLS library probes: the plaintext of encrypted connections.
//!
//! The process hands plaintext to `SSL_write` and gets it back from
//! `SSL_read`; the socket only ever carries ciphertext. An entry probe
//! remembers the call's buffer per thread. A read's plaintext is copied by
//! the return probe, once the library says how much it moved; a write's is
//! sent at the call's first socket call, in place of that ciphertext, so
//! it is not stamped after the peer has already read and answered it.
//!
//! Which connection: the socket call the library makes inside the call
//! (the syscall exit hook notes its fd in [`TLS_CALLS`] and sends no
//! ciphertext record for it), else the one remembered for the session
//! object from an earlier call (a read served from the library's buffer
//! makes no socket call). Where the library's layout is known, the
//! session's BIO fd is read too and must agree, each time a session is
//! seen on a socket it was not remembered on; a disagreement is counted
//! and nothing is sent, because a wrong connection would mean wrong spans.
//!
//! Probes sit on the library file, so every process mapping it runs them;
//! unselected processes leave at once. OpenSSL is C with ordinary stacks,
//! so return probes (uretprobes) are safe here.

use agent_common::{
    Counter, DataEvent, EventKind, SOCKET_BLIND, Syscall, TRANSPORT_PERF, TlsLayout, TlsSessionKey,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};

use crate::{
    TLS_CALLS, TLS_LAYOUTS, TLS_SESSIONS,
    emit::{ScratchGuard, count, note_lost, output_data, ring_data},
    process::selected,
    runtime, socket,
    syscalls::{SIZE_MASK, copy_user, mark_tls},
};

/// `BIO_TYPE_DESCRIPTOR`: the BIO's `num` is a file descriptor.
const BIO_TYPE_DESCRIPTOR: u32 = 0x0100;

/// A TLS library call in flight on a thread.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsCall {
    /// The session object (`SSL *`).
    session: u64,
    buf: u64,
    /// `size_t *` the `_ex` variants store the byte count in; 0 otherwise.
    moved_at: u64,
    /// When the first socket call inside returned (0: none yet): the
    /// record's time, as for clear text. The call's own return comes later
    /// (for a write, possibly after the peer already read and answered),
    /// and the two ends of a connection are ordered by these times.
    ts_ns: u64,
    /// Bytes asked to move.
    len: u64,
    /// The socket the library used inside the call; -1 until one is seen.
    fd: i32,
    syscall: u8,
    /// A write's plaintext went out at its first socket call.
    sent: u8,
    _pad: [u8; 2],
}

/// TLS_SESSIONS value: what is remembered about one session object.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsSession {
    /// The socket it was last seen using.
    fd: i32,
    _pad: u32,
    /// Length of a write whose plaintext went out but which the library
    /// did not finish (a non-blocking socket was full): OpenSSL requires
    /// the caller to retry it with the same length, and the retry must not
    /// send the plaintext again. 0: none.
    retry_len: u64,
}

#[inline(always)]
fn enter(ctx: &ProbeContext, syscall: Syscall, ex: bool) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !selected((pid_tgid >> 32) as u32) {
        return;
    }
    let call = TlsCall {
        session: ctx.arg(0).unwrap_or(0),
        buf: ctx.arg(1).unwrap_or(0),
        moved_at: if ex { ctx.arg(3).unwrap_or(0) } else { 0 },
        ts_ns: 0,
        len: if ex {
            ctx.arg::<u64>(2).unwrap_or(0)
        } else {
            u64::from(ctx.arg::<u32>(2).unwrap_or(0))
        },
        fd: -1,
        syscall: syscall as u8,
        sent: 0,
        _pad: [0; 2],
    };
    if call.session == 0 || call.buf == 0 {
        return;
    }
    if !mark_tls(pid_tgid) || TLS_CALLS.insert(&pid_tgid, &call, 0).is_err() {
        count(Counter::TlsCallsFull, 1);
    }
}

/// `int SSL_read(SSL *ssl, void *buf, int num)`.
#[uprobe]
pub fn tls_read_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, Syscall::TlsRead, false);
    0
}

/// `int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes)`,
/// or OpenSSL's `ssl_read_internal` behind it and `SSL_read`, which has the
/// same arguments and returns 1 on success too (the agent probes it in
/// their place where it finds it).
#[uprobe]
pub fn tls_read_ex_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, Syscall::TlsRead, true);
    0
}

/// `int SSL_write(SSL *ssl, const void *buf, int num)`.
#[uprobe]
pub fn tls_write_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, Syscall::TlsWrite, false);
    0
}

/// `int SSL_write_ex(SSL *ssl, const void *buf, size_t num, size_t *written)`,
/// or `ssl_write_internal` behind it and `SSL_write` (as for reads).
#[uprobe]
pub fn tls_write_ex_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, Syscall::TlsWrite, true);
    0
}

/// `void SSL_free(SSL *ssl)`: the session's remembered socket is forgotten,
/// so an object allocated later at the same address starts afresh.
#[uprobe]
pub fn tls_free(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let key = TlsSessionKey {
        tgid: (pid_tgid >> 32) as u32,
        _pad: 0,
        session: ctx.arg(0).unwrap_or(0),
    };
    let _ = TLS_SESSIONS.remove(&key);
    0
}

/// Return of every read and write entry above.
#[uretprobe]
pub fn tls_return(ctx: RetProbeContext) -> u32 {
    let _ = try_tls_return(&ctx);
    0
}

fn try_tls_return(ctx: &RetProbeContext) -> Result<(), ()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: copied out at once.
    let call = unsafe { TLS_CALLS.get(&pid_tgid) }.copied().ok_or(())?;
    let _ = TLS_CALLS.remove(&pid_tgid);
    let ret: i64 = i64::from(ctx.ret::<i32>());
    let moved = if call.moved_at != 0 {
        if ret == 1 {
            // SAFETY: faulting-safe user read.
            unsafe { bpf_probe_read_user(call.moved_at as *const u64) }.unwrap_or(0)
        } else {
            0
        }
    } else if ret > 0 {
        ret as u64
    } else {
        0
    };
    let tgid = (pid_tgid >> 32) as u32;
    let key = TlsSessionKey {
        tgid,
        _pad: 0,
        session: call.session,
    };
    // TLS_SESSIONS is an LRU map, where an update replaces the element
    // (a free one taken, the old one given back): written only on change.
    if call.sent != 0 {
        let known = remembered(&key);
        // A write whose plaintext went out at its socket call: remember
        // what a retry must not send again (its unfinished part).
        let session = TlsSession {
            fd: call.fd,
            _pad: 0,
            retry_len: call.len.saturating_sub(moved),
        };
        if !known.is_some_and(|k| k.fd == session.fd && k.retry_len == session.retry_len) {
            let _ = TLS_SESSIONS.insert(&key, &session, 0);
        }
        return Ok(());
    }
    if moved == 0 {
        return Ok(());
    }
    let known = remembered(&key);
    // A session already remembered on this socket needs no check: the
    // library does a descriptor BIO's socket calls on the BIO's fd, and
    // the check (four user reads) ran when the socket was first seen.
    let settled = call.fd >= 0 && known.is_some_and(|k| k.fd == call.fd && k.retry_len == 0);
    let own = if settled {
        None
    } else {
        session_fd(tgid, call.session)
    };
    let fd = if call.fd >= 0 {
        if own.is_some_and(|own| own != call.fd) {
            count(Counter::TlsSocketMismatch, 1);
            return Ok(());
        }
        if !settled {
            let session = TlsSession {
                fd: call.fd,
                _pad: 0,
                retry_len: 0,
            };
            let _ = TLS_SESSIONS.insert(&key, &session, 0);
        }
        call.fd
    } else if let Some(own) = own {
        own
    } else if let Some(known) = known {
        known.fd
    } else {
        count(Counter::TlsNoSocket, 1);
        return Ok(());
    };
    // The socket calls of the handshake registered the connection.
    let Some(conn) = socket::known(pid_tgid, fd) else {
        count(Counter::TlsNoSocket, 1);
        return Ok(());
    };
    // A blind connection's plaintext is not copied either.
    let buf = if conn.state == SOCKET_BLIND {
        0
    } else {
        call.buf
    };
    let want = if buf == 0 {
        0
    } else if moved < u64::from(crate::config!(capture_bytes)) {
        moved
    } else {
        u64::from(crate::config!(capture_bytes))
    };
    let (unit, unit_seq) = runtime::current_unit(tgid);
    // A read's bytes are stamped by its first socket call when it made one.
    let ts_ns = if call.ts_ns != 0 {
        call.ts_ns
    } else {
        // SAFETY: helper without preconditions.
        unsafe { bpf_ktime_get_ns() }
    };
    let event = DataEvent {
        header: socket::header_at(
            EventKind::Data,
            call.syscall,
            pid_tgid,
            fd,
            conn.conn_id,
            ts_ns,
        ),
        total_bytes: moved,
        unit_seq,
        unit,
        ..Default::default()
    };
    // The plaintext is one buffer: straight into the ring buffer, as a
    // clear-text receive's bytes go.
    if crate::config!(transport) != TRANSPORT_PERF {
        ring_data(&event, buf, want);
        return Ok(());
    }
    let Some(mut guard) = ScratchGuard::acquire() else {
        note_lost(conn.conn_id, call.syscall, moved);
        return Err(());
    };
    let scratch = guard.get();
    let captured = if want != 0 && copy_user(&mut scratch.payload, 0, buf, want) {
        want & SIZE_MASK
    } else {
        0
    };
    scratch.event = event;
    scratch.event.captured = captured as u32;
    let len = core::mem::size_of::<DataEvent>() as u64 + captured;
    output_data(ctx, &mut scratch.event, len, captured);
    Ok(())
}

/// What is remembered for a session from earlier calls.
#[inline(always)]
fn remembered(key: &TlsSessionKey) -> Option<TlsSession> {
    // SAFETY: copied out at once.
    unsafe { TLS_SESSIONS.get(key) }.copied()
}

/// The fd of the session's read BIO when the process's library layout is
/// known and the BIO is a descriptor BIO (a socket BIO, `SSL_set_fd`).
#[inline(always)]
fn session_fd(tgid: u32, session: u64) -> Option<i32> {
    // SAFETY: copied out at once.
    let layout: TlsLayout = unsafe { TLS_LAYOUTS.get(&tgid) }.copied()?;
    if layout.bio_num_off == 0 {
        return None;
    }
    // SAFETY: faulting-safe user reads; a bad address gives an error.
    unsafe {
        let bio: u64 =
            bpf_probe_read_user((session + u64::from(layout.rbio_off)) as *const u64).ok()?;
        if bio == 0 {
            return None;
        }
        let method: u64 =
            bpf_probe_read_user((bio + u64::from(layout.bio_method_off)) as *const u64).ok()?;
        let kind: u32 = bpf_probe_read_user(method as *const u32).ok()?;
        if kind & BIO_TYPE_DESCRIPTOR == 0 {
            return None;
        }
        let fd: i32 =
            bpf_probe_read_user((bio + u64::from(layout.bio_num_off)) as *const i32).ok()?;
        (fd >= 0).then_some(fd)
    }
}

/// What a socket call that moved bytes is, seen from the TLS probes.
pub enum Inside {
    /// Not inside a TLS library call.
    No,
    /// Inside one: ciphertext, not to be sent.
    Ciphertext,
    /// The first socket call of a TLS write: its plaintext (`len` bytes at
    /// `buf`) is sent now, in place of the ciphertext.
    Write { buf: u64, len: u64 },
}

/// Called by the syscall exit hook for a traced socket that moved bytes:
/// notes the socket (and the time) for a TLS call the thread is inside.
#[inline(always)]
pub fn inside_call(pid_tgid: u64, fd: i32) -> Inside {
    let Some(call) = TLS_CALLS.get_ptr_mut(&pid_tgid) else {
        return Inside::No;
    };
    // SAFETY: map value pointer, valid for the program's run; only this
    // thread uses its own entry.
    let call = unsafe { &mut *call };
    call.fd = fd;
    if call.ts_ns != 0 {
        return Inside::Ciphertext;
    }
    // SAFETY: helper without preconditions.
    call.ts_ns = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    if call.syscall != Syscall::TlsWrite as u8 {
        return Inside::Ciphertext;
    }
    call.sent = 1;
    let key = TlsSessionKey {
        tgid: (pid_tgid >> 32) as u32,
        _pad: 0,
        session: call.session,
    };
    // SAFETY: read at once.
    if let Some(session) = unsafe { TLS_SESSIONS.get(&key) }
        && session.retry_len != 0
        && session.retry_len == call.len
    {
        return Inside::Ciphertext;
    }
    Inside::Write {
        buf: call.buf,
        len: call.len,
    }
}
