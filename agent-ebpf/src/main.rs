//! zerotrace kernel programs.
//!
//! Syscall tracepoints see every socket read and write of selected processes;
//! the enter hook remembers the call's arguments per thread (a receive's
//! exit hook reads them from the thread's registers where the kernel allows
//! it), the exit hook copies what really moved and hands it to userspace over
//! the ring buffer or the perf event array. Kernel-function probes (fexit or
//! kprobe) add what bypasses those syscalls; probes on TLS libraries give the
//! plaintext of encrypted connections. Maps are bounded; every drop is
//! counted.
#![no_std]
#![no_main]

mod emit;
mod floor;
mod kfunc;
mod process;
mod runtime;
mod socket;
mod syscalls;
mod tls;

use agent_common::{
    KernelConfig, KernelOffsets, SockConn, SocketInfo, SocketKey, ThreadLayout, TlsLayout,
    TlsSessionKey,
};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerfEventByteArray, RingBuf},
};

/// Written by the agent before load (`EbpfLoader::set_global`).
#[unsafe(no_mangle)]
static CONFIG: KernelConfig = KernelConfig {
    agent_tgid: 0,
    capture_bytes: agent_common::DEFAULT_CAPTURE_BYTES,
    filter_mode: agent_common::FILTER_ALL,
    transport: agent_common::TRANSPORT_RINGBUF,
    ring_check_bytes: 0,
    ring_wake_bytes: 0,
    pending_slot_mask: 0,
    offsets: KernelOffsets {
        task_files: 0,
        files_fdt: 0,
        fdtable_max_fds: 0,
        fdtable_fd: 0,
        file_inode: 0,
        file_private_data: 0,
        inode_mode: 0,
        socket_type: 0,
        socket_sk: 0,
        sk_family: 0,
        sk_num: 0,
        sk_dport: 0,
        sk_daddr: 0,
        sk_rcv_saddr: 0,
        sk_v6_daddr: 0,
        sk_v6_rcv_saddr: 0,
        unix_addr: 0,
        unix_peer: 0,
        unix_address_len: 0,
        unix_address_name: 0,
        sk_socket: 0,
        socket_alloc_inode: 0,
        inode_ino: 0,
        inode_sb: 0,
        sb_dev: 0,
        fork_child_pid: 0,
        task_fsbase: 0,
    },
};

/// Reads a field of [`CONFIG`]; volatile so the compiler cannot fold the default.
#[inline(always)]
pub(crate) fn read_config<T: Copy>(field: *const T) -> T {
    // SAFETY: `field` points into the CONFIG static.
    unsafe { core::ptr::read_volatile(field) }
}

/// `config!(capture_bytes)`, `config!(offsets.task_files)`.
macro_rules! config {
    ($($field:tt)+) => {
        $crate::read_config(&raw const $crate::CONFIG.$($field)+)
    };
}
pub(crate) use config;

// Sizes here are defaults; the agent sets the real ones before load.
#[map(name = "EVENTS_RINGBUF")]
static EVENTS_RINGBUF: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

#[map(name = "EVENTS_PERF")]
static EVENTS_PERF: PerfEventByteArray = PerfEventByteArray::new(0);

/// (tgid, fd) → what the fd is; removed on close.
#[map(name = "SOCKETS")]
static SOCKETS: LruHashMap<SocketKey, SocketInfo> = LruHashMap::with_max_entries(65536, 0);

/// `struct sock *` → its traced connection, for the kernel-function layer.
#[map(name = "SOCK_CONNS")]
static SOCK_CONNS: LruHashMap<u64, SockConn> = LruHashMap::with_max_entries(65536, 0);

/// pid_tgid → `struct sock *` of a kprobed kernel function in flight.
#[map(name = "KFUNC_ARGS")]
static KFUNC_ARGS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16384, 0);

/// Arguments of the data syscall in flight on a thread, in the slot of its
/// id (thread id modulo the slot count, `CONFIG.pending_slot_mask`) when
/// it holds that slot: found without a hash look-up. Each is claimed by one
/// thread, rewritten in place by each of its calls (`syscalls::save`) and
/// freed by `sched_process_exit` when the thread ends. The agent sets the
/// count (a power of two).
#[map(name = "PENDING_SLOTS")]
static PENDING_SLOTS: Array<syscalls::PendingSlot> = Array::with_max_entries(1, 0);

/// pid_tgid → the same for a thread whose slot another thread holds; and
/// one entry per held slot, its claim (`syscalls::add_entry`). Either way
/// one entry per thread that made a traced syscall or called a TLS
/// library, removed by `sched_process_exit`: bounded by the host's live
/// threads. A plain preallocated hash, not an LRU one, whose list upkeep
/// cost more than the rest of the enter hook; a thread that finds it full
/// is not traced, and counted (PendingFull).
#[map(name = "PENDING")]
static PENDING: HashMap<u64, syscalls::PendingCall> = HashMap::with_max_entries(65536, 0);

/// tgid → how to read the running unit of its threads (followed runtimes).
#[map(name = "RUNTIMES")]
static RUNTIMES: HashMap<u32, ThreadLayout> = HashMap::with_max_entries(4096, 0);

/// Slot 0 is non-zero while RUNTIMES may hold an entry, so that data
/// records of hosts with no followed runtime skip the look-up. Set by the
/// agent before it adds an entry, cleared when it removes the last.
#[map(name = "RUNTIMES_FOLLOWED")]
static RUNTIMES_FOLLOWED: Array<u32> = Array::with_max_entries(1, 0);

/// pid_tgid → a TLS library read or write in flight on that thread. A
/// plain hash, not an LRU one (whose inserts and removals take list locks):
/// each thread has at most one entry, which its return probe or its exit
/// (`sched_process_exit`) removes.
#[map(name = "TLS_CALLS")]
static TLS_CALLS: HashMap<u64, tls::TlsCall> = HashMap::with_max_entries(16384, 0);

/// (tgid, TLS session object) → its socket and unfinished write.
#[map(name = "TLS_SESSIONS")]
static TLS_SESSIONS: LruHashMap<TlsSessionKey, tls::TlsSession> =
    LruHashMap::with_max_entries(65536, 0);

/// tgid → where its TLS library keeps a session's socket (for the check).
#[map(name = "TLS_LAYOUTS")]
static TLS_LAYOUTS: HashMap<u32, TlsLayout> = HashMap::with_max_entries(16384, 0);

/// Selected processes (when CONFIG.filter_mode is FILTER_SELECTED).
#[map(name = "TRACED_PIDS")]
static TRACED_PIDS: LruHashMap<u32, u8> = LruHashMap::with_max_entries(16384, 0);

/// Command names whose exec selects the process (`--exe`).
#[map(name = "TRACED_COMMS")]
static TRACED_COMMS: HashMap<[u8; 16], u8> = HashMap::with_max_entries(64, 0);

/// conn_id → bytes of its data records the transport refused, until a
/// record of it reports them (see `emit::output_data`).
#[map(name = "LOST")]
static LOST: LruHashMap<u64, emit::Lost> = LruHashMap::with_max_entries(16384, 0);

/// Slot 0 is non-zero while LOST may hold an entry: records look there
/// only then. Set by the kernel with each entry; cleared by the agent when
/// it finds LOST empty.
#[map(name = "HOLES_WAITING")]
static HOLES_WAITING: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(agent_common::COUNTER_SLOTS, 0);

/// Bytes each CPU has handed to the ring buffer since it last looked at how
/// full the ring is (see `emit::ring_wants_reader`).
#[map(name = "RING_UNCHECKED")]
static RING_UNCHECKED: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// One staging slot per CPU (index = CPU id); per-CPU arrays cap values at 32 KiB.
#[map(name = "SCRATCH")]
static SCRATCH: Array<emit::Scratch> = Array::with_max_entries(1, 0);

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
