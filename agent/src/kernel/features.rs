//! Probing what the running kernel allows: the rows of `zerotrace check`.

use std::path::Path;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{Stats, enable_stats, is_map_supported, is_program_supported},
};
use serde::Serialize;

use super::{btf::Btf, tracefs};

/// One probed capability.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: &'static str,
    pub available: bool,
    /// Whether the base capture layer cannot work without it.
    pub required: bool,
    pub detail: String,
}

/// Result of probing the kernel.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
    /// The base layer (syscall tracepoints + a transport) can run.
    pub capture_ready: bool,
    /// Which kernel-function probe method the agent would use, if any: a
    /// guess from the rows, replaced by `zerotrace check` after a real load.
    pub kernel_function_layer: Option<String>,
    /// Per process: which runtime is followed, or why not (`zerotrace check`).
    pub runtimes: Vec<crate::runtime::follow::ProcessRuntime>,
    /// TLS libraries of the running processes, and whether each is followed.
    pub tls: Vec<crate::tls::ProcessTls>,
}

impl Report {
    pub fn get(&self, name: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.name == name)
    }

    /// Required rows that are missing, for the error message.
    pub fn blockers(&self) -> Vec<&Row> {
        self.rows
            .iter()
            .filter(|r| r.required && !r.available)
            .collect()
    }
}

impl Row {
    pub fn new(name: &'static str, required: bool, result: Result<String, String>) -> Self {
        let (available, detail) = match result {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        Self {
            name,
            available,
            required,
            detail,
        }
    }
}

fn row(name: &'static str, required: bool, result: Result<String, String>) -> Row {
    Row::new(name, required, result)
}

/// A Linux capability the agent uses.
pub struct Capability {
    pub name: &'static str,
    /// Bit number from linux/capability.h.
    pub bit: u32,
    /// Whether the agent refuses to start without it.
    pub required: bool,
    pub purpose: &'static str,
}

const CAP_SYS_ADMIN: u32 = 21;

/// The least-privilege set (deploy/README.md): the required four were each
/// shown necessary by removing it; CAP_SYS_ADMIN only adds run-time stats.
pub const CAPABILITIES: [Capability; 5] = [
    Capability {
        name: "CAP_BPF",
        bit: 39,
        required: true,
        purpose: "create BPF maps and load programs",
    },
    Capability {
        name: "CAP_PERFMON",
        bit: 38,
        required: true,
        purpose: "load tracing programs and attach tracepoints and kprobes",
    },
    Capability {
        name: "CAP_SYS_PTRACE",
        bit: 19,
        required: true,
        purpose: "read other users' /proc/PID/exe and /proc/PID/fd links \
                  (executable names, connections open before the agent)",
    },
    Capability {
        name: "CAP_DAC_READ_SEARCH",
        bit: 2,
        required: true,
        purpose: "list other users' /proc/PID/fd and read tracefs",
    },
    Capability {
        name: "CAP_SYS_ADMIN",
        bit: CAP_SYS_ADMIN,
        required: false,
        purpose: "BPF run-time statistics with --program-stats on (or sysctl \
                  kernel.bpf_stats_enabled=1) \
                  and mounting tracefs where it is not mounted",
    },
];

fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// The capabilities an effective set lacks, required ones first.
pub fn missing_capabilities(effective: u64) -> Vec<&'static Capability> {
    let has = |bit: u32| effective & (1u64 << bit) != 0;
    let mut missing: Vec<&Capability> = CAPABILITIES
        .iter()
        // CAP_SYS_ADMIN stands in for BPF and PERFMON on kernels older than 5.8.
        .filter(|c| {
            let covered = has(CAP_SYS_ADMIN) && matches!(c.name, "CAP_BPF" | "CAP_PERFMON");
            !has(c.bit) && !covered
        })
        .collect();
    missing.sort_by_key(|c| !c.required);
    missing
}

/// Refuses to start without a required capability, naming each missing one
/// and what it is for (the loader notes the optional one's absence).
pub fn require_capabilities() -> anyhow::Result<()> {
    // Without /proc/self/status the kernel will say what is missing.
    let Some(effective) = effective_capabilities() else {
        return Ok(());
    };
    let required: Vec<String> = missing_capabilities(effective)
        .iter()
        .filter(|c| c.required)
        .map(|c| format!("{} ({})", c.name, c.purpose))
        .collect();
    if !required.is_empty() {
        anyhow::bail!(
            "missing capabilit{} {}; grant the set listed in deploy/README.md or run as root",
            if required.len() == 1 { "y" } else { "ies" },
            required.join(", ")
        );
    }
    Ok(())
}

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Parses "6.18.44-foo" into (6, 18).
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn lockdown() -> Result<String, String> {
    const PATH: &str = "/sys/kernel/security/lockdown";
    if !Path::new(PATH).exists() {
        // securityfs may simply not be mounted; try once.
        let _ = nix::mount::mount(
            Some("securityfs"),
            "/sys/kernel/security",
            Some("securityfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    match std::fs::read_to_string(PATH) {
        Ok(text) => {
            let mode = text
                .split_whitespace()
                .find(|w| w.starts_with('['))
                .map(|w| w.trim_matches(['[', ']']).to_owned())
                .unwrap_or_else(|| text.trim().to_owned());
            match mode.as_str() {
                "none" => Ok("none".into()),
                "integrity" => Ok("integrity: bpf_probe_write_user blocked (not used)".into()),
                // confidentiality blocks reading kernel memory: no fd → socket walk.
                other => Err(format!("{other}: kernel memory reads are blocked")),
            }
        }
        Err(_) => Ok("no lockdown LSM (securityfs has no lockdown file)".into()),
    }
}

fn probe_program(kind: ProgramType) -> Result<(), String> {
    match is_program_supported(kind) {
        Ok(true) => Ok(()),
        Ok(false) => Err("program type refused by the kernel".into()),
        Err(e) => Err(format!("probe failed: {e}")),
    }
}

fn probe_map(kind: MapType) -> Result<(), String> {
    match is_map_supported(kind) {
        Ok(true) => Ok(()),
        Ok(false) => Err("map type refused by the kernel".into()),
        Err(e) => Err(format!("probe failed: {e}")),
    }
}

/// Whether the kernel has the perf event source (PMU) `name`, e.g. kprobe.
pub fn event_source(name: &str) -> bool {
    Path::new("/sys/bus/event_source/devices")
        .join(name)
        .join("type")
        .exists()
}

/// Probes everything `zerotrace check` reports. Mounts tracefs if needed.
pub fn probe() -> Report {
    let mut rows = Vec::new();

    let release = kernel_release();
    let version_ok = parse_release(&release).is_some_and(|v| v >= (5, 8));
    rows.push(row(
        "kernel",
        true,
        if version_ok {
            Ok(release.clone())
        } else {
            Err(format!("{release}: need Linux 5.8 or newer"))
        },
    ));

    let btf = Btf::from_sys_fs();
    rows.push(row(
        "btf",
        true,
        match &btf {
            Ok(_) => Ok("/sys/kernel/btf/vmlinux".into()),
            Err(e) => Err(e.to_string()),
        },
    ));

    let tracefs = tracefs::ensure_mounted();
    rows.push(row(
        "tracefs",
        true,
        match &tracefs {
            Ok((p, true)) => Ok(format!("{} (mounted now)", p.display())),
            Ok((p, false)) => Ok(p.display().to_string()),
            Err(e) => Err(format!("{e:#}")),
        },
    ));

    rows.push(row("lockdown", true, lockdown()));

    rows.push(row(
        "ring buffer",
        false,
        probe_map(MapType::RingBuf).map(|()| "BPF_MAP_TYPE_RINGBUF".into()),
    ));
    rows.push(row(
        "perf event array",
        false,
        probe_map(MapType::PerfEventArray).map(|()| "BPF_MAP_TYPE_PERF_EVENT_ARRAY".into()),
    ));

    let syscalls = match (&tracefs, probe_program(ProgramType::TracePoint)) {
        (Ok((path, _)), Ok(())) => {
            if tracefs::has_tracepoint(path, "syscalls", "sys_enter_read") {
                Ok("syscalls/sys_enter_* and sys_exit_*".into())
            } else {
                Err("no syscalls/ tracepoints (CONFIG_FTRACE_SYSCALLS off)".into())
            }
        }
        (Err(_), _) => Err("tracefs unavailable".into()),
        (_, Err(e)) => Err(e),
    };
    rows.push(row("syscall tracepoints", true, syscalls));

    let kprobe = if !event_source("kprobe") {
        Err("no kprobe PMU (kernel built without CONFIG_KPROBES)".into())
    } else {
        probe_program(ProgramType::KProbe).map(|()| "kprobe PMU present".into())
    };
    let kprobe_ok = kprobe.is_ok();
    rows.push(row("kprobes", false, kprobe));

    let fentry = match &btf {
        Err(_) => Err("needs BTF".into()),
        Ok(btf) if !btf.has_func("tcp_sendmsg") => Err("tcp_sendmsg not in BTF".into()),
        Ok(_) => match is_program_supported(ProgramType::Tracing) {
            Ok(true) => {
                // Loading the type is not enough on every kernel: attach
                // needs trampolines. The probe loads with a BTF target, so a
                // kernel that refuses trampolines refuses here.
                Ok("BPF trampolines (fentry/fexit)".into())
            }
            Ok(false) => Err("tracing programs refused by the kernel".into()),
            Err(e) => Err(format!(
                "tracing programs refused: {:#}",
                anyhow::Error::from(e)
            )),
        },
    };
    let fentry_ok = fentry.is_ok();
    rows.push(row("fentry/fexit", false, fentry));

    rows.push(row(
        "uprobes",
        false,
        if event_source("uprobe") {
            Ok("uprobe PMU present".into())
        } else {
            Err("no uprobe PMU (CONFIG_UPROBE_EVENTS off)".into())
        },
    ));

    rows.push(row(
        "bpf run-time stats",
        false,
        match enable_stats(Stats::RunTime) {
            Ok(_fd) => Ok("BPF_ENABLE_STATS".into()),
            Err(e) => Err(format!("BPF_ENABLE_STATS failed: {e}")),
        },
    ));

    let caps = match effective_capabilities() {
        None => Err("cannot read CapEff from /proc/self/status".into()),
        Some(eff) => {
            let missing = missing_capabilities(eff);
            let names = |required: bool| {
                missing
                    .iter()
                    .filter(|c| c.required == required)
                    .map(|c| c.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let (required, optional) = (names(true), names(false));
            let note = if optional.is_empty() {
                String::new()
            } else {
                format!(" (optional {optional} absent: no BPF run-time stats)")
            };
            if required.is_empty() {
                Ok(format!("required set present{note}"))
            } else {
                Err(format!("missing {required}{note}"))
            }
        }
    };
    rows.push(row("capabilities", true, caps));

    let transport = rows
        .iter()
        .any(|r| matches!(r.name, "ring buffer" | "perf event array") && r.available);
    let capture_ready = transport && rows.iter().all(|r| !r.required || r.available);
    Report {
        rows,
        capture_ready,
        runtimes: Vec::new(),
        tls: Vec::new(),
        kernel_function_layer: if fentry_ok {
            Some("fentry/fexit".into())
        } else if kprobe_ok {
            Some("kprobe/kretprobe".into())
        } else {
            None
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names() {
        let names = |eff| {
            missing_capabilities(eff)
                .iter()
                .map(|c| (c.name, c.required))
                .collect::<Vec<_>>()
        };
        assert!(names(u64::MAX).is_empty());
        assert_eq!(names(0).len(), CAPABILITIES.len());
        // Required ones come first.
        assert_eq!(names(0).last(), Some(&("CAP_SYS_ADMIN", false)));
        // SYS_ADMIN alone stands in for BPF and PERFMON.
        let m = names(1 << 21);
        assert!(!m.iter().any(|(n, _)| *n == "CAP_BPF"));
        assert!(m.contains(&("CAP_SYS_PTRACE", true)));
        // The least-privilege set lacks only the optional one.
        let least = CAPABILITIES
            .iter()
            .filter(|c| c.required)
            .fold(0u64, |set, c| set | 1 << c.bit);
        assert_eq!(names(least), [("CAP_SYS_ADMIN", false)]);
    }

    #[test]
    fn releases() {
        assert_eq!(parse_release("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(parse_release("5.4.0"), Some((5, 4)));
        assert_eq!(parse_release("x"), None);
    }
}
