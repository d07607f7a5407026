//! Process selection: which tgids are traced, following forks and execs,
//! and the files they map executable (where library probes may belong).

use agent_common::FILTER_SELECTED;
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::tracepoint,
    programs::TracePointContext,
};

use agent_common::{EventKind, MappedEvent};

use crate::{
    TLS_CALLS, TRACED_COMMS, TRACED_PIDS, config, emit::output_urgent_record, socket, syscalls,
};

const PROT_EXEC: u64 = 4;

/// Whether the process's socket traffic is traced. The agent never traces itself.
#[inline(always)]
pub fn selected(tgid: u32) -> bool {
    if tgid == config!(agent_tgid) {
        return false;
    }
    if config!(filter_mode) != FILTER_SELECTED {
        return true;
    }
    // SAFETY: presence check only.
    unsafe { TRACED_PIDS.get(&tgid) }.is_some()
}

#[inline(always)]
fn filtering() -> bool {
    config!(filter_mode) == FILTER_SELECTED
}

/// `sched/sched_process_fork`: children of selected processes are selected.
/// The child pid's offset in the record varies by kernel; the agent reads it
/// from the tracepoint's format file.
#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    if !filtering() {
        return 0;
    }
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: presence check only.
    if unsafe { TRACED_PIDS.get(&parent) }.is_none() {
        return 0;
    }
    // SAFETY: offset from the format file; faulting-safe read.
    if let Ok(child) = unsafe { ctx.read_at::<u32>(config!(offsets.fork_child_pid) as usize) } {
        let _ = TRACED_PIDS.insert(&child, &1, 0);
    }
    0
}

/// `sched/sched_process_exec`: a process that execs a selected name is selected.
#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    if !filtering() {
        return 0;
    }
    let Ok(comm) = bpf_get_current_comm() else {
        return 0;
    };
    // SAFETY: presence check only.
    if unsafe { TRACED_COMMS.get(&comm) }.is_some() {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        let _ = TRACED_PIDS.insert(&tgid, &1, 0);
    }
    0
}

/// `sched/sched_process_exit` (every exiting thread): forget a syscall or a
/// TLS call the thread left unfinished, and a process when its last thread
/// leaves.
#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    syscalls::release(pid_tgid);
    // A thread that dies inside SSL_read never returns from it: its entry
    // must not make a later thread with the same id look inside a call.
    let _ = TLS_CALLS.remove(&pid_tgid);
    if !filtering() {
        return 0;
    }
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if tgid == tid {
        let _ = TRACED_PIDS.remove(&tgid);
    }
    0
}

/// `mmap(addr, len, prot, flags, fd, off)`: a selected process maps a file
/// executable — the dynamic loader placing a library, at exec or for a
/// `dlopen` — so the agent looks for libraries it probes (a TLS library
/// loaded after start). The record names the file, so that the agent
/// skips one it has judged already. Anonymous and non-executable mappings
/// are ignored.
#[tracepoint]
pub fn sys_enter_mmap(ctx: TracePointContext) -> u32 {
    // SAFETY: sys_enter records hold six 8-byte arguments from offset 16.
    let (prot, fd) = unsafe {
        (
            ctx.read_at::<u64>(16 + 8 * 2).unwrap_or(0),
            ctx.read_at::<i64>(16 + 8 * 4).unwrap_or(-1),
        )
    };
    if prot & PROT_EXEC == 0 || fd < 0 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if !selected((pid_tgid >> 32) as u32) {
        return 0;
    }
    let (dev, ino) = socket::file_id(fd as i32).unwrap_or((0, 0));
    let record = MappedEvent {
        header: socket::header(EventKind::Mapped, 0, pid_tgid, fd as i32, 0),
        dev,
        _pad: 0,
        ino,
    };
    // The agent probes a newly loaded TLS library before its first use.
    output_urgent_record(&ctx, &record);
    0
}
