//! Handing records to userspace over the chosen transport, with counting.

use core::{
    ffi::c_void,
    ptr::{read_volatile, write_volatile},
};

use agent_common::{
    Counter, DataEvent, Direction, MAX_CAPTURE_BYTES, SCRATCH_PAYLOAD_BYTES, Syscall,
    TRANSPORT_PERF,
};
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_CURRENT_CPU, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_smp_processor_id,
        generated::{
            bpf_perf_event_output, bpf_probe_read_user, bpf_ringbuf_output, bpf_ringbuf_query,
        },
    },
};

use crate::{
    COUNTERS, EVENTS_PERF, EVENTS_RINGBUF, HOLES_WAITING, LOST, RING_UNCHECKED, SCRATCH, config,
};

/// Staging area for a data event: too big for the BPF stack.
#[repr(C)]
pub struct Scratch {
    /// Non-zero while a program on this CPU fills the slot. Syscall
    /// tracepoints may be preempted on recent kernels, so a second program
    /// on the same CPU must not reuse the slot meanwhile. A plain load and
    /// store, not an exchange: BPF atomics with fetch need kernel 5.12 and
    /// cpu v3; the window left is two instructions.
    busy: u32,
    _pad: u32,
    pub event: DataEvent,
    pub payload: [u8; SCRATCH_PAYLOAD_BYTES],
}

/// Exclusive use of this CPU's staging slot; released on drop.
pub struct ScratchGuard {
    slot: *mut Scratch,
}

impl ScratchGuard {
    pub fn acquire() -> Option<Self> {
        // SAFETY: helper without preconditions.
        let cpu = unsafe { bpf_get_smp_processor_id() };
        let slot = SCRATCH.get_ptr_mut(cpu)?;
        // SAFETY: map value pointer, valid for the program's run.
        let busy = unsafe { &raw mut (*slot).busy };
        // SAFETY: map value pointer.
        if unsafe { read_volatile(busy) } != 0 {
            count(Counter::EventsLost, 1);
            return None;
        }
        // SAFETY: map value pointer.
        unsafe { write_volatile(busy, 1) };
        Some(Self { slot })
    }

    pub fn get(&mut self) -> &mut Scratch {
        // SAFETY: exclusive by the busy flag.
        unsafe { &mut *self.slot }
    }
}

impl Drop for ScratchGuard {
    fn drop(&mut self) {
        // SAFETY: as in `get`.
        unsafe { write_volatile(&raw mut (*self.slot).busy, 0) };
    }
}

/// Adds to a per-CPU counter.
#[inline(always)]
pub fn count(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot; a lost increment under preemption is harmless.
        unsafe { *slot += n };
    }
}

/// Sends `len` bytes at `data` as one record. `len` must be verifier-bounded
/// by the caller. Returns whether the transport accepted it.
#[inline(always)]
pub fn output<C: EbpfContext>(ctx: &C, data: *const u8, len: u64, payload: u64) -> bool {
    send(ctx, data, len, payload, false)
}

/// Like [`output`], and the reader is woken at once (ring buffer).
#[inline(always)]
fn send<C: EbpfContext>(ctx: &C, data: *const u8, len: u64, payload: u64, urgent: bool) -> bool {
    let ok = if config!(transport) == TRANSPORT_PERF {
        // SAFETY: map pointer of a perf event array; data/len bounded by caller.
        unsafe {
            bpf_perf_event_output(
                ctx.as_ptr(),
                (&raw const EVENTS_PERF).cast_mut().cast::<c_void>(),
                u64::from(BPF_F_CURRENT_CPU),
                data.cast_mut().cast::<c_void>(),
                len,
            ) == 0
        }
    } else {
        let ring = (&raw const EVENTS_RINGBUF).cast_mut().cast::<c_void>();
        // SAFETY: map pointer of a ring buffer; data/len bounded by caller.
        unsafe {
            bpf_ringbuf_output(
                ring,
                data.cast_mut().cast::<c_void>(),
                len,
                wake_flag(urgent, len),
            ) == 0
        }
    };
    count_record(ok, payload);
    ok
}

/// The ring buffer flag for a record of `len` bytes: wake the reader now
/// (`urgent`, or the ring is filling) or let it find the record later.
#[inline(always)]
fn wake_flag(urgent: bool, len: u64) -> u64 {
    let ring = (&raw const EVENTS_RINGBUF).cast_mut().cast::<c_void>();
    let wakeup = if urgent || ring_wants_reader(ring, len) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    u64::from(wakeup)
}

/// Counts a record the transport took (with its payload bytes) or refused.
#[inline(always)]
fn count_record(sent: bool, payload: u64) {
    if sent {
        count(Counter::EventsSent, 1);
        count(Counter::BytesSent, payload);
    } else {
        count(Counter::EventsLost, 1);
    }
}

/// Bytes of a connection's data records that were lost and that no record
/// of it has reported yet.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Lost {
    pub egress: u32,
    pub ingress: u32,
}

/// Sends a data record of `len` bytes (`payload` of them captured bytes).
///
/// A lost data record leaves a hole in its connection's stream; unless the
/// agent knows where, it pairs the messages after the hole with the ones
/// before (a server's next response with the request whose response was
/// lost). So the bytes of refused records are kept per connection (LOST)
/// and ride along in the connection's next record that gets through.
/// Records look there only while HOLES_WAITING is set: never while nothing
/// is lost.
#[inline(always)]
pub fn output_data<C: EbpfContext>(ctx: &C, event: &mut DataEvent, len: u64, payload: u64) -> bool {
    let conn_id = event.header.conn_id;
    let reports = carry_hole(conn_id, event);
    let ok = output(ctx, (event as *const DataEvent).cast::<u8>(), len, payload);
    if !ok {
        note_lost(conn_id, event.header.detail, event.total_bytes);
    } else if reports {
        hole_reported(conn_id);
    }
    ok
}

/// Puts connection `conn_id`'s unreported hole, if any, in `event`; true
/// when there was one (see [`output_data`]). The key is the caller's copy:
/// 5.10 and 6.1 take no ring buffer memory as a map key.
#[inline(always)]
fn carry_hole(conn_id: u64, event: &mut DataEvent) -> bool {
    if !holes_waiting() {
        return false;
    }
    // SAFETY: the value is copied out at once.
    let Some(lost) = unsafe { LOST.get(&conn_id) }.copied() else {
        return false;
    };
    event.lost_egress = lost.egress;
    event.lost_ingress = lost.ingress;
    true
}

/// A record that carried connection `conn_id`'s hole went out.
#[inline(always)]
fn hole_reported(conn_id: u64) {
    // A hole another CPU adds between the look-up and here goes
    // unreported; the window is a few instructions.
    let _ = LOST.remove(&conn_id);
}

/// A data record built where the reader will find it: the record and room
/// for `N` payload bytes, reserved in the ring buffer.
#[repr(C)]
pub struct RingRecord<const N: usize> {
    event: DataEvent,
    payload: [u8; N],
}

/// Sends a data record whose payload is the `want` user bytes at `src`
/// (none when `src` is 0), copied straight into the ring buffer.
///
/// Staging the record in the CPU's scratch slot and handing it to
/// `bpf_ringbuf_output` copied every byte twice. A reservation must have a
/// size the verifier knows, so the record takes the smallest of a few
/// sizes that holds `want`; the reader goes by `captured`, not by the
/// record's length. At most four times the bytes a record needs are
/// reserved (for a small one), which the ring's wake-up threshold absorbs.
/// A record that copies nothing (`sendfile`) reserves no payload: sized by
/// the bytes it moved, a large file's took 8 KiB of ring for 64 bytes.
#[inline(always)]
pub fn ring_data(event: &DataEvent, src: u64, want: u64) -> bool {
    if src == 0 {
        ring_data_in::<0>(event, 0, 0)
    } else if want <= 128 {
        ring_data_in::<128>(event, src, want)
    } else if want <= 512 {
        ring_data_in::<512>(event, src, want)
    } else if want <= 2048 {
        ring_data_in::<2048>(event, src, want)
    } else if want <= 8192 {
        ring_data_in::<8192>(event, src, want)
    } else {
        ring_data_in::<{ MAX_CAPTURE_BYTES as usize }>(event, src, want)
    }
}

#[inline(always)]
fn ring_data_in<const N: usize>(event: &DataEvent, src: u64, want: u64) -> bool {
    let conn_id = event.header.conn_id;
    let len = core::mem::size_of::<RingRecord<N>>() as u64;
    let Some(mut entry) = EVENTS_RINGBUF.reserve::<RingRecord<N>>(0) else {
        count_record(false, 0);
        note_lost(conn_id, event.header.detail, event.total_bytes);
        return false;
    };
    let record = entry.as_mut_ptr();
    // Bounded again for the verifier, through a volatile read so the
    // compiler keeps the bound it knows to hold.
    // SAFETY: a read of a local.
    let n = unsafe { read_volatile(&want) };
    let n = if n > N as u64 { N as u64 } else { n };
    let copied = src != 0
        && n != 0
        // SAFETY: the reservation holds N payload bytes and n <= N; user
        // memory read with the faulting-safe helper.
        && unsafe {
            bpf_probe_read_user(
                (&raw mut (*record).payload).cast::<c_void>(),
                n as u32,
                src as *const c_void,
            )
        } == 0;
    let captured = if copied { n } else { 0 };
    // SAFETY: the reservation is ours until submitted.
    let reports = unsafe {
        (&raw mut (*record).event).write(*event);
        (*record).event.captured = captured as u32;
        carry_hole(conn_id, &mut (*record).event)
    };
    entry.submit(wake_flag(false, len));
    count_record(true, captured);
    if reports {
        hole_reported(conn_id);
    }
    true
}

/// Whether some connection may have a hole no record reported yet.
#[inline(always)]
fn holes_waiting() -> bool {
    HOLES_WAITING
        .get(0)
        // SAFETY: a plain load of a map value.
        .is_some_and(|flag| unsafe { read_volatile(flag) } != 0)
}

/// A data record of `syscall` that moved `bytes` on `conn_id` was lost.
/// The flag is set after the entry is in, and with a plain store, so that
/// the agent's clearing of it (`Probes::clear_holes_flag`) cannot hide the
/// entry.
#[inline(always)]
pub fn note_lost(conn_id: u64, syscall: u8, bytes: u64) {
    let bytes = if bytes > u64::from(u32::MAX) {
        u32::MAX
    } else {
        bytes as u32
    };
    let egress = Syscall::from_u8(syscall).is_some_and(|s| s.direction() == Direction::Egress);
    if let Some(lost) = LOST.get_ptr_mut(&conn_id) {
        // SAFETY: map value pointer; a lost update under a race only
        // shrinks the hole reported.
        unsafe {
            if egress {
                (*lost).egress = (*lost).egress.saturating_add(bytes);
            } else {
                (*lost).ingress = (*lost).ingress.saturating_add(bytes);
            }
        }
    } else {
        let (egress, ingress) = if egress { (bytes, 0) } else { (0, bytes) };
        let _ = LOST.insert(&conn_id, &Lost { egress, ingress }, 0);
    }
    if let Some(flag) = HOLES_WAITING.get_ptr_mut(0) {
        // SAFETY: map value pointer.
        unsafe { write_volatile(flag, 1) };
    }
}

/// The connection closed: its hole, if any, is of no use any more.
#[inline(always)]
pub fn forget_lost(conn_id: u64) {
    if holes_waiting() {
        let _ = LOST.remove(&conn_id);
    }
}

/// Whether the reader should be woken for a record of `len` bytes.
///
/// Waking it on every record costs the traced thread an irq_work (in a VM,
/// an interrupt through the hypervisor) and the agent a context switch. The
/// reader drains on its own every few milliseconds, so it is woken only when
/// an eighth of the ring waits. Reading how full the ring is touches the
/// reader's position, a cache line the reader writes, and cost about a tenth
/// of this hook when done per record; each CPU looks once per
/// `ring_check_bytes` it wrote instead (`agent_common::ring_wake`).
#[inline(always)]
fn ring_wants_reader(ring: *mut c_void, len: u64) -> bool {
    let Some(unchecked) = RING_UNCHECKED.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; a lost update under preemption only moves
    // the next look by one record.
    let written = unsafe { *unchecked }.saturating_add(len as u32);
    if written < config!(ring_check_bytes) {
        // SAFETY: as above.
        unsafe { *unchecked = written };
        return false;
    }
    // SAFETY: as above.
    unsafe { *unchecked = 0 };
    // SAFETY: map pointer of a ring buffer.
    let waiting = unsafe { bpf_ringbuf_query(ring, u64::from(BPF_RB_AVAIL_DATA)) };
    waiting >= u64::from(config!(ring_wake_bytes))
}

/// Sends a fixed-size record.
#[inline(always)]
pub fn output_record<C: EbpfContext, T>(ctx: &C, record: &T) -> bool {
    output(
        ctx,
        (record as *const T).cast::<u8>(),
        core::mem::size_of::<T>() as u64,
        0,
    )
}

/// Sends a fixed-size record the agent must act on quickly (the reader is
/// woken rather than left to its next poll).
#[inline(always)]
pub fn output_urgent_record<C: EbpfContext, T>(ctx: &C, record: &T) -> bool {
    send(
        ctx,
        (record as *const T).cast::<u8>(),
        core::mem::size_of::<T>() as u64,
        0,
        true,
    )
}
