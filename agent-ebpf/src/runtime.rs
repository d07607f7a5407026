//! Runtime probes: which unit of work a thread of a followed process runs.
//!
//! For CPython the unit is the `PyContext` the thread has entered: each
//! asyncio task step, each event-loop callback and each context-copying
//! hand-off to a worker thread runs in its own. The thread's current one is
//! read at the moment it matters (a socket syscall, a new unit) rather than
//! tracked through enter/exit probes: two user reads from the thread's TLS
//! block, so nothing can be missed or reordered.

use agent_common::{EventKind, RUNTIME_CPYTHON, ThreadLayout, UnitEvent};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_user,
    },
    macros::uretprobe,
    programs::RetProbeContext,
};

use crate::{RUNTIMES, RUNTIMES_FOLLOWED, config, emit::output_record, socket};

/// The unit the current thread runs and its switch counter; (0, 0) when
/// the process is not followed or the read fails.
#[inline(always)]
pub fn current_unit(tgid: u32) -> (u64, u32) {
    let followed = RUNTIMES_FOLLOWED
        .get(0)
        // SAFETY: a plain load of a map value.
        .is_some_and(|flag| unsafe { core::ptr::read_volatile(flag) } != 0);
    if !followed {
        return (0, 0);
    }
    // SAFETY: copied out at once.
    match unsafe { RUNTIMES.get(&tgid) } {
        Some(layout) => read_unit(*layout).unwrap_or((0, 0)),
        None => (0, 0),
    }
}

#[inline(always)]
fn read_unit(layout: ThreadLayout) -> Option<(u64, u32)> {
    if layout.runtime != RUNTIME_CPYTHON || layout.key >= 32 {
        return None;
    }
    // SAFETY: helper without preconditions; the task pointer is only read
    // through the faulting-safe kernel read.
    let task = unsafe { bpf_get_current_task() };
    let fsbase_at = task + u64::from(config!(offsets.task_fsbase));
    // SAFETY: faulting-safe read of the current task.
    let fsbase: u64 = unsafe { bpf_probe_read_kernel(fsbase_at as *const u64) }.ok()?;
    if fsbase == 0 {
        return None;
    }
    // glibc's pthread_getspecific for a first-level key: {seq, data} pairs.
    let slot = fsbase + u64::from(layout.specific_off) + 16 * u64::from(layout.key) + 8;
    // SAFETY: faulting-safe user reads; a wrong address gives an error.
    let tstate: u64 = unsafe { bpf_probe_read_user(slot as *const u64) }.ok()?;
    if tstate == 0 {
        return None;
    }
    let unit_at = tstate + u64::from(layout.unit_off);
    // Every CPython the agent knows keeps the counter right after the
    // context: one read for both, where each user read is a helper call
    // with its own checks (this runs on every data record of the process).
    if layout.seq_off == layout.unit_off + 8 {
        // SAFETY: as above.
        let [unit, seq]: [u64; 2] =
            unsafe { bpf_probe_read_user(unit_at as *const [u64; 2]) }.ok()?;
        return Some((unit, seq as u32));
    }
    // SAFETY: as above.
    let unit: u64 = unsafe { bpf_probe_read_user(unit_at as *const u64) }.ok()?;
    // SAFETY: as above.
    let seq: u64 =
        unsafe { bpf_probe_read_user((tstate + u64::from(layout.seq_off)) as *const u64) }.ok()?;
    Some((unit, seq as u32))
}

/// Return of a function that allocates a unit (CPython: every function that
/// makes a `PyContext`); the new unit is the return value.
#[uretprobe]
pub fn runtime_unit_new(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // The probe sits on a file every process of that interpreter maps.
    // SAFETY: copied out at once.
    let Some(layout) = (unsafe { RUNTIMES.get(&tgid) }).copied() else {
        return 0;
    };
    let unit: u64 = ctx.ret();
    if unit == 0 {
        return 0;
    }
    // The allocator was found by disassembly: make sure what it returned
    // is a unit (its type object at offset 8) before reporting it.
    if layout.unit_type != 0 {
        // SAFETY: faulting-safe user read.
        let ty: u64 = unsafe { bpf_probe_read_user((unit + 8) as *const u64) }.unwrap_or(0);
        if ty != layout.unit_type {
            return 0;
        }
    }
    let (parent, parent_seq) = read_unit(layout).unwrap_or((0, 0));
    let event = UnitEvent {
        header: socket::header(EventKind::Unit, layout.runtime as u8, pid_tgid, 0, 0),
        parent,
        unit,
        parent_seq,
        _pad: 0,
    };
    output_record(&ctx, &event);
    0
}
