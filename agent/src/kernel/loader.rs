//! Loading the embedded eBPF object and attaching its programs.
//!
//! Programs are listed in [`HOOKS`], a registry rather than a hard-coded
//! attach sequence: a hook whose tracepoint the kernel lacks is skipped with
//! a recorded reason unless it is essential.

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use agent_common::{
    CONFIG_GLOBAL, COUNTER_SLOTS, Counter, FILTER_ALL, FILTER_SELECTED, KernelConfig,
    MAX_CAPTURE_BYTES, SOCKET_BLIND, SOCKET_MUTED, SOCKET_TRACKED, SocketInfo, SocketKey,
    TRANSPORT_PERF, TRANSPORT_RINGBUF, ThreadLayout, TlsLayout, maps, ring_wake,
};
use anyhow::{Context, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray},
    programs::{
        ProgramError, ProgramInfo, RawTracePoint, TracePoint, UProbe,
        trace_point::{TracePointLink, TracePointLinkId},
        uprobe::{UProbeLink, UProbeLinkId, UProbeScope},
    },
    sys::{Stats, enable_stats},
    util::online_cpus,
};

use super::{
    btf::Btf,
    kfunc::{self, KfuncChoice, KfuncLayer},
    offsets, tracefs,
    uprobe_site::Site,
};

/// The verifier's instruction count, where the kernel reports it.
pub fn verified_instructions(info: Option<ProgramInfo>) -> Option<u32> {
    info.and_then(|i| i.verified_instruction_count())
}

/// The kernel programs, built by build.rs from agent-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/zerotrace-ebpf"));

/// Which kernel → user transport carries events.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// Ring buffer where the kernel has it (5.8+), else perf buffers.
    Auto,
    #[value(name = "ringbuf")]
    RingBuf,
    Perf,
}

/// The transport actually in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    RingBuf,
    Perf,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Self::RingBuf => "ringbuf",
            Self::Perf => "perf",
        }
    }

    pub fn resolve(choice: TransportChoice) -> Self {
        match choice {
            TransportChoice::RingBuf => Self::RingBuf,
            TransportChoice::Perf => Self::Perf,
            TransportChoice::Auto => {
                if aya::sys::is_map_supported(aya::maps::MapType::RingBuf).unwrap_or(false) {
                    Self::RingBuf
                } else {
                    Self::Perf
                }
            }
        }
    }
}

/// One tracepoint attachment of a program.
pub struct Hook {
    pub program: &'static str,
    pub category: &'static str,
    pub tracepoint: &'static str,
    /// The agent refuses to start without it.
    pub essential: bool,
    /// Attached only when the receives' arguments reach their exit hook
    /// this way; `None`: always.
    pub receives: Option<ReceiveArgs>,
}

/// How a receive's arguments reach the hook at its exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReceiveArgs {
    /// Saved per thread by an enter hook on each receive.
    #[default]
    Saved,
    /// Read from the thread's saved registers at exit (`bpf_task_pt_regs`,
    /// 5.15+, x86-64): no enter hook on receives.
    Registers,
}

impl ReceiveArgs {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Saved => "saved at enter",
            Self::Registers => "read from registers at exit",
        }
    }
}

/// Which [`ReceiveArgs`] the agent may use (a hidden flag, for side-by-side
/// measurements and tests of the fallback).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ReceiveArgsChoice {
    /// Registers where the kernel allows it, else saved.
    #[default]
    Auto,
    /// Always saved by enter hooks.
    Enter,
}

impl Hook {
    fn wanted(&self, receives: ReceiveArgs) -> bool {
        self.receives.is_none_or(|r| r == receives)
    }

    /// sendfile's tracepoints are only needed when the kernel-function layer
    /// (which sees sendfile inside the TCP send functions) is not running.
    fn covered_by_kernel_functions(&self) -> bool {
        self.tracepoint.contains("sendfile")
    }
}

const fn hook(
    program: &'static str,
    category: &'static str,
    tracepoint: &'static str,
    essential: bool,
) -> Hook {
    Hook {
        program,
        category,
        tracepoint,
        essential,
        receives: None,
    }
}

/// A receive's hook, attached only with `receives`.
const fn receive(receives: ReceiveArgs, hook: Hook) -> Hook {
    Hook {
        receives: Some(receives),
        ..hook
    }
}

/// The program that serves receives without an enter hook.
const RECEIVE_EXIT: &str = "sys_exit_receive";

/// Every attachment, in attach order (exits before enters, so no enter
/// record waits for an exit hook that is not there yet).
pub const HOOKS: &[Hook] = &[
    hook("sched_process_fork", "sched", "sched_process_fork", true),
    hook("sched_process_exec", "sched", "sched_process_exec", true),
    hook("sched_process_exit", "sched", "sched_process_exit", true),
    receive(
        ReceiveArgs::Saved,
        hook("sys_exit_data", "syscalls", "sys_exit_read", true),
    ),
    receive(
        ReceiveArgs::Registers,
        hook(RECEIVE_EXIT, "syscalls", "sys_exit_read", true),
    ),
    hook("sys_exit_data", "syscalls", "sys_exit_write", true),
    receive(
        ReceiveArgs::Saved,
        hook("sys_exit_data", "syscalls", "sys_exit_readv", false),
    ),
    receive(
        ReceiveArgs::Registers,
        hook(RECEIVE_EXIT, "syscalls", "sys_exit_readv", false),
    ),
    hook("sys_exit_data", "syscalls", "sys_exit_writev", false),
    hook("sys_exit_data", "syscalls", "sys_exit_sendto", false),
    receive(
        ReceiveArgs::Saved,
        hook("sys_exit_data", "syscalls", "sys_exit_recvfrom", false),
    ),
    receive(
        ReceiveArgs::Registers,
        hook(RECEIVE_EXIT, "syscalls", "sys_exit_recvfrom", false),
    ),
    hook("sys_exit_data", "syscalls", "sys_exit_sendmsg", false),
    receive(
        ReceiveArgs::Saved,
        hook("sys_exit_data", "syscalls", "sys_exit_recvmsg", false),
    ),
    receive(
        ReceiveArgs::Registers,
        hook(RECEIVE_EXIT, "syscalls", "sys_exit_recvmsg", false),
    ),
    hook("sys_exit_data", "syscalls", "sys_exit_sendfile64", false),
    hook("sys_exit_connect", "syscalls", "sys_exit_connect", true),
    hook("sys_exit_accept", "syscalls", "sys_exit_accept", false),
    hook("sys_exit_accept", "syscalls", "sys_exit_accept4", true),
    hook("sys_enter_close", "syscalls", "sys_enter_close", true),
    receive(
        ReceiveArgs::Saved,
        hook("sys_enter_read", "syscalls", "sys_enter_read", true),
    ),
    hook("sys_enter_write", "syscalls", "sys_enter_write", true),
    hook(
        "sys_enter_sendfile64",
        "syscalls",
        "sys_enter_sendfile64",
        false,
    ),
    receive(
        ReceiveArgs::Saved,
        hook("sys_enter_readv", "syscalls", "sys_enter_readv", false),
    ),
    hook("sys_enter_writev", "syscalls", "sys_enter_writev", false),
    hook("sys_enter_sendto", "syscalls", "sys_enter_sendto", false),
    receive(
        ReceiveArgs::Saved,
        hook(
            "sys_enter_recvfrom",
            "syscalls",
            "sys_enter_recvfrom",
            false,
        ),
    ),
    hook("sys_enter_sendmsg", "syscalls", "sys_enter_sendmsg", false),
    receive(
        ReceiveArgs::Saved,
        hook("sys_enter_recvmsg", "syscalls", "sys_enter_recvmsg", false),
    ),
    hook("sys_enter_connect", "syscalls", "sys_enter_connect", true),
    // Libraries loaded after start (a TLS library by dlopen) are found
    // through it; without it they are found at the process's first traffic.
    hook("sys_enter_mmap", "syscalls", "sys_enter_mmap", false),
];

/// The return probe on a runtime's unit allocators.
const UNIT_PROBE: &str = "runtime_unit_new";

/// TLS library functions probed: (function, entry program, whether the
/// shared return program [`TLS_RETURN`] goes on it too). The last two have
/// no exported symbol: where OpenSSL's reads (writes) both go through one
/// internal function with the `_ex` signature, it is found from the calls
/// and probed in place of the four public ones (`tls::library`).
pub const TLS_FUNCTIONS: &[(&str, &str, bool)] = &[
    ("SSL_read", "tls_read_enter", true),
    ("SSL_read_ex", "tls_read_ex_enter", true),
    ("SSL_write", "tls_write_enter", true),
    ("SSL_write_ex", "tls_write_ex_enter", true),
    ("SSL_free", "tls_free", false),
    (SHARED_READ, "tls_read_ex_enter", true),
    (SHARED_WRITE, "tls_write_ex_enter", true),
];
/// OpenSSL's (1.1.1 to 3.x) function behind `SSL_read` and `SSL_read_ex`.
pub const SHARED_READ: &str = "ssl_read_internal";
/// OpenSSL's function behind `SSL_write` and `SSL_write_ex`.
pub const SHARED_WRITE: &str = "ssl_write_internal";
/// The return probe of the TLS reads and writes.
const TLS_RETURN: &str = "tls_return";

/// What the caller wants captured.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub transport: TransportChoice,
    pub capture_bytes: u32,
    /// Ring buffer bytes, or perf buffer bytes per CPU.
    pub buffer_bytes: usize,
    pub pids: Vec<u32>,
    pub exes: Vec<String>,
    pub kernel_functions: KfuncChoice,
    /// Runtimes to follow (units of work for parents).
    pub runtimes: crate::runtime::follow::RuntimeChoice,
    /// Whether TLS libraries are probed for plaintext.
    pub tls: crate::tls::TlsChoice,
    /// Whether the kernel counts each program's runs and run time.
    pub program_stats: bool,
    /// Per-thread call slots in the kernel (a power of two): threads whose
    /// slot another holds use a hash map instead ([`DEFAULT_PENDING_SLOTS`]).
    pub pending_slots: u32,
    /// Whether receives may go without enter hooks ([`ReceiveArgs`]).
    pub receive_args: ReceiveArgsChoice,
}

/// Enough slots that threads seldom share one on a busy host (thread ids
/// are handed out in order); 1.8 MiB of kernel memory.
pub const DEFAULT_PENDING_SLOTS: u32 = 32_768;

/// How one program load (verification) went, for logs and the startup trace.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProgramLoad {
    pub program: String,
    /// tracepoint, kprobe, kretprobe, fexit.
    pub kind: &'static str,
    pub started: SystemTime,
    pub duration: Duration,
    pub instructions: Option<u32>,
    /// Why the kernel refused it, with the end of the verifier log.
    pub error: Option<String>,
}

/// What an attachment's target adds when its probe is past the entry
/// (`uprobe_site`).
fn site_note(site: Site) -> String {
    if site.skipped == 0 {
        String::new()
    } else {
        format!(" (probed at +{}, past endbr64)", site.skipped)
    }
}

/// How one attach went.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Attachment {
    pub program: &'static str,
    pub target: String,
    pub kind: &'static str,
    pub started: SystemTime,
    pub duration: Duration,
    pub outcome: Result<(), String>,
    /// Set when this attempt failed and a fallback was tried instead.
    pub fallback: Option<String>,
}

impl ProgramLoad {
    /// Times `load` and records its outcome and verified instruction count.
    pub fn measure(
        program: &str,
        kind: &'static str,
        load: impl FnOnce() -> Result<Option<u32>, ProgramError>,
    ) -> Self {
        let started = SystemTime::now();
        let clock = Instant::now();
        let result = load();
        let duration = clock.elapsed();
        let (instructions, error) = match result {
            Ok(n) => (n, None),
            Err(e) => (None, Some(load_error_text(&e))),
        };
        Self {
            program: program.to_owned(),
            kind,
            started,
            duration,
            instructions,
            error,
        }
    }
}

/// An error message with at most the last lines of the verifier log.
pub fn load_error_text(e: &ProgramError) -> String {
    const LOG_LINES: usize = 12;
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = &lines[lines.len().saturating_sub(LOG_LINES)..];
            if tail.is_empty() {
                format!("BPF_PROG_LOAD: {io_error} (no verifier output)")
            } else {
                format!("BPF_PROG_LOAD: {io_error}; verifier: {}", tail.join(" | "))
            }
        }
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
    }
}

/// Loaded and attached kernel programs. Dropping it detaches everything.
pub struct Probes {
    pub ebpf: Ebpf,
    pub transport: Transport,
    pub tracefs: PathBuf,
    pub loads: Vec<ProgramLoad>,
    pub attachments: Vec<Attachment>,
    /// The kernel-function layer in use, or why there is none.
    pub kernel_functions: KfuncLayer,
    /// How the receives' exit hook gets their arguments.
    pub receives: ReceiveArgs,
    /// Tracepoint links by program, so [`Probes::detach`] can take them.
    links: Vec<(&'static str, TracePointLinkId)>,
    /// Uprobe links (TLS libraries, runtimes) by program, likewise.
    uprobe_links: Vec<(&'static str, UProbeLinkId)>,
    /// Keeps BPF run-time statistics on while held.
    stats: Option<OwnedFd>,
}

/// Turns the kernel's run-time statistics on when asked. They are off by
/// default: while on, every BPF program on the host pays two clock reads
/// per run (about an eighth of ours at nginx saturation, where a VM's
/// clock is slow to read). Returns the holder.
fn program_stats(wanted: bool) -> Option<OwnedFd> {
    if !wanted {
        return None;
    }
    match enable_stats(Stats::RunTime) {
        Ok(fd) => Some(fd),
        Err(_) if host_counts_programs() => {
            log::info!("BPF run-time stats from sysctl kernel.bpf_stats_enabled");
            None
        }
        Err(e) => {
            log::warn!(
                "BPF run-time stats unavailable ({e}): they need CAP_SYS_ADMIN \
                 or sysctl kernel.bpf_stats_enabled=1"
            );
            None
        }
    }
}

/// How receives will reach their exit hook under `choice`: from the
/// registers when the kernel verifies [`RECEIVE_EXIT`] (it needs
/// `bpf_task_pt_regs`, 5.15+; its register layout is x86-64's), else saved
/// by enter hooks. Returns the load, when it succeeded, for the startup trace.
fn choose_receive_args(
    ebpf: &mut Ebpf,
    choice: ReceiveArgsChoice,
) -> (ReceiveArgs, Option<ProgramLoad>) {
    if choice == ReceiveArgsChoice::Enter || !cfg!(target_arch = "x86_64") {
        return (ReceiveArgs::Saved, None);
    }
    let Some(Ok(program)) = ebpf
        .program_mut(RECEIVE_EXIT)
        .map(<&mut TracePoint>::try_from)
    else {
        log::warn!(
            "program {RECEIVE_EXIT} missing from the object: receives keep their enter hooks"
        );
        return (ReceiveArgs::Saved, None);
    };
    let load = ProgramLoad::measure(RECEIVE_EXIT, "tracepoint", || {
        program.load()?;
        Ok(verified_instructions(program.info().ok()))
    });
    match &load.error {
        None => (ReceiveArgs::Registers, Some(load)),
        Some(error) => {
            log::info!(
                "receives keep their enter hooks: the kernel refused {RECEIVE_EXIT}, which \
                 reads their arguments at exit (bpf_task_pt_regs, Linux 5.15+): {}",
                error.lines().next().unwrap_or_default()
            );
            (ReceiveArgs::Saved, None)
        }
    }
}

/// Whether the host counts every program's runs (sysctl
/// `kernel.bpf_stats_enabled`), whatever the agent asked. Read each time:
/// an operator (or the overhead benchmark) may turn it on for a while.
fn host_counts_programs() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|v| v.trim() == "1")
}

impl Drop for Probes {
    fn drop(&mut self) {
        self.detach();
    }
}

/// Rounds a ring buffer size to a power of two ≥ one page, as the kernel requires.
pub fn ringbuf_size(bytes: usize) -> u32 {
    let page = 4096usize;
    bytes.max(page).next_power_of_two().min(1 << 30) as u32
}

/// Raises RLIMIT_MEMLOCK for kernels before 5.11 (memcg accounting makes it moot later).
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        log::debug!("could not raise RLIMIT_MEMLOCK (fine on kernels ≥ 5.11)");
    }
}

/// Encodes a command name as the kernel stores it (15 bytes + NUL).
pub fn comm_key(name: &str) -> [u8; 16] {
    let mut key = [0u8; 16];
    for (dst, src) in key.iter_mut().zip(name.bytes().take(15)) {
        *dst = src;
    }
    key
}

impl Probes {
    pub fn load(opts: &LoadOptions) -> anyhow::Result<Self> {
        if opts.capture_bytes > MAX_CAPTURE_BYTES {
            bail!(
                "--capture-bytes {} exceeds the maximum of {MAX_CAPTURE_BYTES}",
                opts.capture_bytes
            );
        }
        // The kernel finds a thread's slot by masking its id.
        if !opts.pending_slots.is_power_of_two() {
            bail!("{} pending slots is not a power of two", opts.pending_slots);
        }
        raise_memlock();
        let (tracefs, _) = tracefs::ensure_mounted()?;
        let btf = Btf::from_sys_fs()?;
        let offsets = offsets::resolve(&btf, &tracefs)?;
        let transport = Transport::resolve(opts.transport);
        let filtered = !opts.pids.is_empty() || !opts.exes.is_empty();
        let cpus = online_cpus()
            .map_err(|(_, e)| e)
            .context("reading online CPUs")?;
        let ring_bytes = match transport {
            Transport::RingBuf => ringbuf_size(opts.buffer_bytes),
            // Unused but still created: keep it one page.
            Transport::Perf => ringbuf_size(0),
        };
        let (ring_check_bytes, ring_wake_bytes) = ring_wake(ring_bytes, cpus.len() as u32);
        let config = KernelConfig {
            agent_tgid: std::process::id(),
            capture_bytes: opts.capture_bytes,
            filter_mode: if filtered {
                FILTER_SELECTED
            } else {
                FILTER_ALL
            },
            transport: match transport {
                Transport::RingBuf => TRANSPORT_RINGBUF,
                Transport::Perf => TRANSPORT_PERF,
            },
            ring_check_bytes,
            ring_wake_bytes,
            pending_slot_mask: opts.pending_slots - 1,
            offsets,
        };
        let max_cpu = cpus.iter().copied().max().unwrap_or(0) + 1;
        let stats = program_stats(opts.program_stats);
        anyhow::ensure!(
            !OBJECT.is_empty(),
            "this build has no eBPF object (built with AYA_BUILD_SKIP or for fuzzing)"
        );
        let ebpf = EbpfLoader::new()
            .override_global(CONFIG_GLOBAL, &config, true)
            .map_max_entries(maps::EVENTS_RINGBUF, ring_bytes)
            .map_max_entries(maps::SCRATCH, max_cpu)
            .map_max_entries(maps::PENDING_SLOTS, opts.pending_slots)
            .load(OBJECT)
            .context("loading the eBPF object")?;

        let mut probes = Probes {
            ebpf,
            transport,
            tracefs,
            loads: Vec::new(),
            attachments: Vec::new(),
            kernel_functions: KfuncLayer::default(),
            receives: ReceiveArgs::Saved,
            links: Vec::new(),
            uprobe_links: Vec::new(),
            stats,
        };
        probes.select_processes(opts)?;
        let (receives, load) = choose_receive_args(&mut probes.ebpf, opts.receive_args);
        probes.receives = receives;
        probes.loads.extend(load);
        probes.attach_hooks(|hook| hook.wanted(receives) && !hook.covered_by_kernel_functions())?;
        probes.kernel_functions = kfunc::attach(&mut probes, &btf, opts.kernel_functions)?;
        if probes.kernel_functions.active.is_none() {
            probes
                .attach_hooks(|hook| hook.wanted(receives) && hook.covered_by_kernel_functions())?;
        }
        Ok(probes)
    }

    /// Detaches every tracepoint and uprobe at once. Each detach waits for
    /// the kernel's grace period (tens of ms for syscall tracepoints, which
    /// are faultable since 6.13, and for uprobes); done one after another,
    /// 26 tracepoints take ~2 s, done together they share the wait.
    pub fn detach(&mut self) {
        let started = Instant::now();
        let links: Vec<TracePointLink> = self
            .links
            .drain(..)
            .filter_map(|(name, id)| {
                let program: &mut TracePoint = self.ebpf.program_mut(name)?.try_into().ok()?;
                program.take_link(id).ok()
            })
            .collect();
        let uprobes: Vec<UProbeLink> = self
            .uprobe_links
            .drain(..)
            .filter_map(|(name, id)| {
                let program: &mut UProbe = self.ebpf.program_mut(name)?.try_into().ok()?;
                program.take_link(id).ok()
            })
            .collect();
        let count = links.len() + uprobes.len();
        std::thread::scope(|scope| {
            for link in links {
                scope.spawn(move || drop(link));
            }
            for link in uprobes {
                scope.spawn(move || drop(link));
            }
        });
        if count > 0 {
            log::debug!("{count} probes detached in {:?}", started.elapsed());
        }
    }

    fn select_processes(&mut self, opts: &LoadOptions) -> anyhow::Result<()> {
        let mut pids: BpfHashMap<_, u32, u8> = BpfHashMap::try_from(
            self.ebpf
                .map_mut(maps::TRACED_PIDS)
                .context("TRACED_PIDS map")?,
        )?;
        for pid in crate::conn::seed::select_pids(&opts.pids, &opts.exes) {
            pids.insert(pid, 1, 0)?;
        }
        let mut comms: BpfHashMap<_, [u8; 16], u8> = BpfHashMap::try_from(
            self.ebpf
                .map_mut(maps::TRACED_COMMS)
                .context("TRACED_COMMS map")?,
        )?;
        for exe in &opts.exes {
            comms.insert(comm_key(exe), 1, 0)?;
        }
        Ok(())
    }

    /// Loads (once per program) and attaches the registry's hooks that `pick` selects.
    fn attach_hooks(&mut self, pick: impl Fn(&Hook) -> bool) -> anyhow::Result<()> {
        for hook in HOOKS.iter().filter(|h| pick(h)) {
            let program: &mut TracePoint = self
                .ebpf
                .program_mut(hook.program)
                .with_context(|| format!("program {} missing from the object", hook.program))?
                .try_into()?;
            if program.fd().is_err() {
                let load = ProgramLoad::measure(hook.program, "tracepoint", || {
                    program.load()?;
                    Ok(verified_instructions(program.info().ok()))
                });
                let error = load.error.clone();
                self.loads.push(load);
                if let Some(error) = error {
                    bail!("the kernel refused program {}: {error}", hook.program);
                }
            }
            let started = SystemTime::now();
            let clock = Instant::now();
            let outcome = if tracefs::has_tracepoint(&self.tracefs, hook.category, hook.tracepoint)
            {
                program
                    .attach(hook.category, hook.tracepoint)
                    .map(|id| self.links.push((hook.program, id)))
                    .map_err(|e| e.to_string())
            } else {
                Err("tracepoint not present on this kernel".to_owned())
            };
            if let Err(reason) = &outcome {
                if hook.essential {
                    bail!(
                        "attaching {} to {}/{}: {reason}",
                        hook.program,
                        hook.category,
                        hook.tracepoint
                    );
                }
                log::warn!("skipping {}/{}: {reason}", hook.category, hook.tracepoint);
            }
            self.attachments.push(Attachment {
                program: hook.program,
                target: format!("{}/{}", hook.category, hook.tracepoint),
                kind: "tracepoint",
                started,
                duration: clock.elapsed(),
                outcome,
                fallback: None,
            });
        }
        Ok(())
    }

    /// Puts the unit probe on the return of each function at `offsets` in
    /// `file` (once per file: every process mapping it is covered, and the
    /// program ignores processes not in RUNTIMES). Loads the program first.
    pub fn attach_unit_probes(&mut self, file: &Path, offsets: &[u64]) -> anyhow::Result<()> {
        self.load_unit_probe()?;
        let program: &mut UProbe = self
            .ebpf
            .program_mut(UNIT_PROBE)
            .context("program runtime_unit_new missing from the object")?
            .try_into()?;
        for &offset in offsets {
            let site = Site::in_file(file, offset);
            let started = SystemTime::now();
            let clock = Instant::now();
            let outcome = program
                .attach(site.offset, file, UProbeScope::AllProcesses)
                .map(|id| self.uprobe_links.push((UNIT_PROBE, id)))
                .map_err(|e| load_error_text(&e));
            self.attachments.push(Attachment {
                program: UNIT_PROBE,
                target: format!("{}+{offset:#x}{}", file.display(), site_note(site)),
                kind: "uretprobe",
                started,
                duration: clock.elapsed(),
                outcome: outcome.clone(),
                fallback: None,
            });
            if let Err(e) = outcome {
                bail!("attaching to {}+{offset:#x}: {e}", file.display());
            }
        }
        Ok(())
    }

    /// Loads (verifies) the unit probe once; `zerotrace check` calls it so
    /// every kernel it runs on proves the program loads.
    pub fn load_unit_probe(&mut self) -> anyhow::Result<()> {
        let program: &mut UProbe = self
            .ebpf
            .program_mut(UNIT_PROBE)
            .context("program runtime_unit_new missing from the object")?
            .try_into()?;
        if program.fd().is_ok() {
            return Ok(());
        }
        let load = ProgramLoad::measure(UNIT_PROBE, "uretprobe", || {
            program.load()?;
            Ok(verified_instructions(program.info().ok()))
        });
        let error = load.error.clone();
        self.loads.push(load);
        match error {
            Some(error) => bail!("the kernel refused program {UNIT_PROBE}: {error}"),
            None => Ok(()),
        }
    }

    /// Loads (verifies) the TLS library programs once; `zerotrace check`
    /// calls it so every kernel it runs on proves they load.
    pub fn load_tls_probes(&mut self) -> anyhow::Result<()> {
        let names = TLS_FUNCTIONS
            .iter()
            .map(|&(_, program, _)| program)
            .chain([TLS_RETURN]);
        for name in names {
            let program: &mut UProbe = self
                .ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            if program.fd().is_ok() {
                continue;
            }
            let kind = if name == TLS_RETURN {
                "uretprobe"
            } else {
                "uprobe"
            };
            let load = ProgramLoad::measure(name, kind, || {
                program.load()?;
                Ok(verified_instructions(program.info().ok()))
            });
            let error = load.error.clone();
            self.loads.push(load);
            if let Some(error) = error {
                bail!("the kernel refused program {name}: {error}");
            }
        }
        Ok(())
    }

    /// Puts the TLS probes on `functions` (symbols of [`TLS_FUNCTIONS`] at
    /// their file offsets) in `file`, once per file: every process that maps it is covered, and
    /// the programs leave unselected processes at once. The return probe
    /// goes on before the entry probe, so no call is entered unseen by its
    /// return. Both go where [`Site`] says; returns the functions probed
    /// past an `endbr64`.
    pub fn attach_tls_probes(
        &mut self,
        file: &Path,
        functions: &[(&str, u64)],
    ) -> anyhow::Result<Vec<&'static str>> {
        self.load_tls_probes()?;
        let mut moved = Vec::new();
        for &(symbol, entry, returns) in TLS_FUNCTIONS {
            let Some(&(_, offset)) = functions.iter().find(|&&(name, _)| name == symbol) else {
                continue;
            };
            let site = Site::in_file(file, offset);
            if site.skipped > 0 {
                moved.push(symbol);
            }
            let programs = [(returns, TLS_RETURN, "uretprobe"), (true, entry, "uprobe")];
            for (_, program_name, kind) in programs.into_iter().filter(|p| p.0) {
                let program: &mut UProbe = self
                    .ebpf
                    .program_mut(program_name)
                    .with_context(|| format!("program {program_name} missing from the object"))?
                    .try_into()?;
                let started = SystemTime::now();
                let clock = Instant::now();
                let outcome = program
                    .attach(site.offset, file, UProbeScope::AllProcesses)
                    .map(|id| self.uprobe_links.push((program_name, id)))
                    .map_err(|e| load_error_text(&e));
                self.attachments.push(Attachment {
                    program: program_name,
                    target: format!("{}:{symbol}{}", file.display(), site_note(site)),
                    kind,
                    started,
                    duration: clock.elapsed(),
                    outcome: outcome.clone(),
                    fallback: None,
                });
                if let Err(e) = outcome {
                    bail!("attaching to {symbol} in {}: {e}", file.display());
                }
            }
        }
        Ok(moved)
    }

    /// Tells the kernel where `tgid`'s TLS library keeps a session's socket.
    pub fn follow_tls(&mut self, tgid: u32, layout: TlsLayout) -> anyhow::Result<()> {
        let mut map: BpfHashMap<_, u32, TlsLayout> = BpfHashMap::try_from(
            self.ebpf
                .map_mut(maps::TLS_LAYOUTS)
                .context("TLS_LAYOUTS map")?,
        )?;
        map.insert(tgid, layout, 0).context("TLS_LAYOUTS map full")
    }

    /// Forgets the TLS layout of a process that exited.
    pub fn unfollow_tls(&mut self, tgid: u32) {
        if let Some(map) = self.ebpf.map_mut(maps::TLS_LAYOUTS)
            && let Ok(mut map) = BpfHashMap::<_, u32, TlsLayout>::try_from(map)
        {
            let _ = map.remove(&tgid);
        }
    }

    /// Tells the kernel how to read the running unit of `tgid`'s threads.
    /// The flag goes up before the entry is in, so no entry is ever skipped.
    pub fn follow_runtime(&mut self, tgid: u32, layout: ThreadLayout) -> anyhow::Result<()> {
        self.set_runtimes_followed(true)?;
        let mut map: BpfHashMap<_, u32, ThreadLayout> =
            BpfHashMap::try_from(self.ebpf.map_mut(maps::RUNTIMES).context("RUNTIMES map")?)?;
        map.insert(tgid, layout, 0).context("RUNTIMES map full")
    }

    /// Stops reading units of a process that exited; with the last one,
    /// data records stop looking.
    pub fn unfollow_runtime(&mut self, tgid: u32) {
        let mut empty = false;
        if let Some(map) = self.ebpf.map_mut(maps::RUNTIMES)
            && let Ok(mut map) = BpfHashMap::<_, u32, ThreadLayout>::try_from(map)
        {
            let _ = map.remove(&tgid);
            empty = map.keys().next().is_none();
        }
        if empty {
            let _ = self.set_runtimes_followed(false);
        }
    }

    fn set_runtimes_followed(&mut self, on: bool) -> anyhow::Result<()> {
        let map = self
            .ebpf
            .map_mut(maps::RUNTIMES_FOLLOWED)
            .context("RUNTIMES_FOLLOWED map")?;
        Array::<_, u32>::try_from(map)?
            .set(0, u32::from(on), 0)
            .context("RUNTIMES_FOLLOWED map")
    }

    /// Takes the transport's map for a reader.
    pub fn take_events_map(&mut self) -> anyhow::Result<Map> {
        let name = match self.transport {
            Transport::RingBuf => maps::EVENTS_RINGBUF,
            Transport::Perf => maps::EVENTS_PERF,
        };
        self.ebpf
            .take_map(name)
            .with_context(|| format!("map {name} missing"))
    }

    /// Kernel-side counters, summed over CPUs.
    pub fn counters(&self) -> anyhow::Result<KernelCounters> {
        let map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map(maps::COUNTERS).context("COUNTERS map")?)?;
        let mut sums = [0u64; COUNTER_SLOTS as usize];
        for (slot, sum) in sums.iter_mut().enumerate() {
            *sum = map.get(&(slot as u32), 0)?.iter().sum();
        }
        let at = |c: Counter| sums[c as usize];
        Ok(KernelCounters {
            events_sent: at(Counter::EventsSent),
            events_lost: at(Counter::EventsLost),
            bytes_sent: at(Counter::BytesSent),
            pending_full: at(Counter::PendingFull),
            sockets_full: at(Counter::SocketsFull),
            walk_failed: at(Counter::WalkFailed),
            tls_no_socket: at(Counter::TlsNoSocket),
            tls_socket_mismatch: at(Counter::TlsSocketMismatch),
            tls_calls_full: at(Counter::TlsCallsFull),
            muted_calls: at(Counter::MutedCalls),
        })
    }

    /// Clears the kernel's flag that makes every data record look for an
    /// unreported hole of its connection, once no hole waits. Kernel
    /// programs add an entry to LOST, then set the flag: an entry added
    /// between the two looks here is seen by the second, one added after it
    /// sets the flag again; either way no hole is left unlooked-for.
    pub fn clear_holes_flag(&mut self) {
        let Some(map) = self.ebpf.map_mut(maps::HOLES_WAITING) else {
            return;
        };
        let Ok(flag) = Array::<_, u32>::try_from(map) else {
            return;
        };
        if flag.get(&0, 0).unwrap_or(0) == 0 {
            return;
        }
        let lost_empty = |ebpf: &aya::Ebpf| {
            ebpf.map(maps::LOST)
                .and_then(|m| BpfHashMap::<_, u64, [u32; 2]>::try_from(m).ok())
                .is_some_and(|m| m.keys().next().is_none())
        };
        if !lost_empty(&self.ebpf) {
            return;
        }
        let set = |ebpf: &mut aya::Ebpf, value: u32| {
            if let Some(map) = ebpf.map_mut(maps::HOLES_WAITING)
                && let Ok(mut flag) = Array::<_, u32>::try_from(map)
            {
                let _ = flag.set(0, value, 0);
            }
        };
        set(&mut self.ebpf, 0);
        if !lost_empty(&self.ebpf) {
            set(&mut self.ebpf, 1);
        }
    }

    /// Stops the kernel copying the data of connection `conn_id` on
    /// (`tgid`, `fd`); its close is still reported, and when `blind` its
    /// calls too, without their bytes. Only that connection: when the fd
    /// already holds another one, nothing changes. Returns whether it was
    /// muted.
    pub fn mute(&mut self, tgid: u32, fd: i32, conn_id: u64, blind: bool) -> bool {
        let Some(map) = self.ebpf.map_mut(maps::SOCKETS) else {
            return false;
        };
        let Ok(mut map) = BpfHashMap::<_, SocketKey, SocketInfo>::try_from(map) else {
            return false;
        };
        let key = SocketKey { tgid, fd };
        match map.get(&key, 0) {
            Ok(mut info) if info.conn_id == conn_id && info.state == SOCKET_TRACKED => {
                info.state = if blind { SOCKET_BLIND } else { SOCKET_MUTED };
                // BPF_EXIST (2): never re-creates an entry the kernel
                // removed at close in the meantime.
                map.insert(key, info, 2).is_ok()
            }
            _ => false,
        }
    }

    /// Run count and total run time per loaded program (BPF_ENABLE_STATS);
    /// none while the kernel does not count them (`--program-stats off` and
    /// the host's sysctl off). The counts cover only the time counting was on.
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        if self.stats.is_none() && !host_counts_programs() {
            return Vec::new();
        }
        self.ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                Some(ProgramStats {
                    program: name.to_owned(),
                    kind: program_kind(program),
                    run_count: info.run_count(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                })
            })
            .collect()
    }
}

/// The attach floor for the overhead benchmark: the object's empty `floor`
/// program on every registry tracepoint this kernel has (those the agent
/// attaches when no kernel-function layer runs), with run-time statistics
/// on. Detached when dropped.
pub struct Floor {
    ebpf: Ebpf,
    name: &'static str,
    _stats: Option<OwnedFd>,
}

/// The empty programs in the object.
const FLOOR: &str = "floor";
const FLOOR_RAW: &str = "floor_raw";

impl Floor {
    /// `raw`: the empty program on the raw `sys_enter` and `sys_exit`
    /// tracepoints instead (every syscall of every process).
    /// `receives`: as the agent would run ([`ReceiveArgs`]), so the floor
    /// is called where the agent's programs would be.
    /// `stats`: turn the kernel's run-time statistics on for as long as the
    /// floor is attached; without, [`Floor::stats`] counts only while
    /// something else has them on (`sysctl kernel.bpf_stats_enabled`), so a
    /// caller can measure throughput without their cost.
    pub fn attach(raw: bool, receives: ReceiveArgsChoice, stats: bool) -> anyhow::Result<Self> {
        raise_memlock();
        let (tracefs, _) = tracefs::ensure_mounted()?;
        anyhow::ensure!(
            !OBJECT.is_empty(),
            "this build has no eBPF object (built with AYA_BUILD_SKIP or for fuzzing)"
        );
        let stats = stats
            .then(|| {
                enable_stats(Stats::RunTime)
                    .context("BPF run-time statistics (they need CAP_SYS_ADMIN)")
            })
            .transpose()?;
        let mut ebpf = EbpfLoader::new()
            .load(OBJECT)
            .context("loading the eBPF object")?;
        if raw {
            let program: &mut RawTracePoint = ebpf
                .program_mut(FLOOR_RAW)
                .context("program floor_raw missing from the object")?
                .try_into()?;
            program.load().context("loading the floor_raw program")?;
            for tracepoint in ["sys_enter", "sys_exit"] {
                program
                    .attach(tracepoint)
                    .with_context(|| format!("attaching floor_raw to {tracepoint}"))?;
            }
            log::info!("floor program attached to the raw sys_enter and sys_exit");
            return Ok(Self {
                ebpf,
                name: FLOOR_RAW,
                _stats: stats,
            });
        }
        let (receives, _) = choose_receive_args(&mut ebpf, receives);
        let program: &mut TracePoint = ebpf
            .program_mut(FLOOR)
            .context("program floor missing from the object")?
            .try_into()?;
        program.load().context("loading the floor program")?;
        let mut attached = 0;
        for hook in HOOKS.iter().filter(|hook| hook.wanted(receives)) {
            if tracefs::has_tracepoint(&tracefs, hook.category, hook.tracepoint) {
                program
                    .attach(hook.category, hook.tracepoint)
                    .with_context(|| format!("attaching floor to {}", hook.tracepoint))?;
                attached += 1;
            }
        }
        log::info!(
            "floor program attached to {attached} tracepoints (receives' arguments {})",
            receives.as_str()
        );
        Ok(Self {
            ebpf,
            name: FLOOR,
            _stats: stats,
        })
    }

    /// Runs and run time of the floor program so far.
    pub fn stats(&self) -> anyhow::Result<ProgramStats> {
        let program = self
            .ebpf
            .program(self.name)
            .with_context(|| format!("program {} missing from the object", self.name))?;
        let info = program.info()?;
        Ok(ProgramStats {
            program: self.name.to_owned(),
            kind: program_kind(program),
            run_count: info.run_count(),
            run_time_ns: info.run_time().as_nanos() as u64,
        })
    }
}

/// Why a probe on user-space code could not be attached, with what to do
/// when the kernel refused it for want of a capability: kernels since 6.16
/// (and the stable updates of older lines) take `CAP_SYS_ADMIN` for
/// uprobes again, where `CAP_PERFMON` used to be enough.
pub fn uprobe_attach_error(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    if text.contains("os error 13") {
        format!(
            "{text}: this kernel lets only CAP_SYS_ADMIN attach probes to user-space code \
             (grant it to the agent for TLS plaintext and runtime following)"
        )
    } else {
        text
    }
}

/// The attach type of a program, as the startup trace and metrics name it.
fn program_kind(program: &aya::programs::Program) -> &'static str {
    use aya::programs::{ProbeKind, Program};
    match program {
        Program::TracePoint(_) => "tracepoint",
        Program::RawTracePoint(_) => "raw_tracepoint",
        Program::KProbe(p) if matches!(p.kind(), ProbeKind::Return) => "kretprobe",
        Program::KProbe(_) => "kprobe",
        Program::FEntry(_) => "fentry",
        Program::FExit(_) => "fexit",
        Program::UProbe(_) => "uprobe",
        _ => "other",
    }
}

/// Kernel-side counters (see `agent_common::Counter`).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct KernelCounters {
    pub events_sent: u64,
    pub events_lost: u64,
    pub bytes_sent: u64,
    pub pending_full: u64,
    pub sockets_full: u64,
    pub walk_failed: u64,
    /// TLS plaintext not sent: its socket could not be told.
    pub tls_no_socket: u64,
    /// TLS plaintext not sent: the socket call and the session's own
    /// socket disagreed.
    pub tls_socket_mismatch: u64,
    /// TLS library calls not followed: the TLS_CALLS or PENDING map was full.
    pub tls_calls_full: u64,
    /// Socket calls of muted connections, not copied.
    pub muted_calls: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ProgramStats {
    pub program: String,
    pub kind: &'static str,
    pub run_count: u64,
    pub run_time_ns: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ringbuf_sizes_are_pages_powers_of_two() {
        assert_eq!(ringbuf_size(0), 4096);
        assert_eq!(ringbuf_size(5000), 8192);
        assert_eq!(ringbuf_size(16 << 20), 16 << 20);
    }

    #[test]
    fn comm_keys_truncate_like_the_kernel() {
        assert_eq!(&comm_key("curl")[..5], b"curl\0");
        let long = comm_key("a-very-long-executable-name");
        assert_eq!(&long[..15], b"a-very-long-exe");
        assert_eq!(long[15], 0);
    }

    #[test]
    fn every_program_in_the_registry_exists_in_the_object() {
        if OBJECT.is_empty() {
            eprintln!("skipped: built without the eBPF object (AYA_BUILD_SKIP)");
            return;
        }
        // Program names are ELF symbols of the embedded object.
        let names = HOOKS
            .iter()
            .map(|h| h.program)
            .chain(kfunc::program_names())
            .chain(TLS_FUNCTIONS.iter().map(|&(_, program, _)| program))
            .chain([TLS_RETURN]);
        for name in names {
            let name = name.as_bytes();
            assert!(
                OBJECT.windows(name.len()).any(|w| w == name),
                "{} not in object",
                String::from_utf8_lossy(name)
            );
        }
    }
}
