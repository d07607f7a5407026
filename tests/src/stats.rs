//! What the benchmarks and fault tests read about a running agent: its
//! /metrics, and its CPU time and memory from /proc.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

/// One HTTP/1.1 GET on a fresh connection; the whole response, bytes
/// (empty when nothing answers).
pub fn get_raw(port: u16, path: &str) -> Vec<u8> {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return Vec::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return Vec::new();
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// Every sample of a Prometheus text page, summed over labels by name.
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut all = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(name) = line.split(['{', ' ']).next().filter(|n| !n.is_empty()) else {
            continue;
        };
        let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        *all.entry(name.to_owned()).or_insert(0.0) += value;
    }
    all
}

/// The samples of metric `name`, by the value of its label `label`.
pub fn parse_metric_by(text: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let key = format!("{label}=\"");
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(labels) = line.strip_prefix(name).and_then(|l| l.strip_prefix('{')) else {
            continue;
        };
        let Some(value) = labels.split_once(&key).and_then(|(_, v)| v.split_once('"')) else {
            continue;
        };
        let Some(sample) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        *out.entry(value.0.to_owned()).or_insert(0.0) += sample;
    }
    out
}

/// The body of the agent's /metrics on 127.0.0.1:`port`; empty when it
/// does not answer.
pub fn metrics_text(port: u16) -> String {
    let raw = get_raw(port, "/metrics");
    let text = String::from_utf8_lossy(&raw);
    text.split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned()
}

/// The agent's /metrics, summed over labels by name; empty when it does
/// not answer.
pub fn metrics(port: u16) -> BTreeMap<String, f64> {
    parse_metrics(&metrics_text(port))
}

/// One metric of the agent's /metrics, summed over its labels.
pub fn metric(port: u16, name: &str) -> Option<f64> {
    metrics(port).get(name).copied()
}

/// CPU time and memory of a process.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcStats {
    /// User + system time, seconds.
    pub cpu_seconds: f64,
    /// VmRSS, KiB.
    pub rss_kib: u64,
    /// VmHWM (peak resident set), KiB.
    pub peak_rss_kib: u64,
}

/// `/proc/PID/stat` times and `/proc/PID/status` memory; None once the
/// process is gone.
pub fn proc_stats(pid: u32) -> Option<ProcStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // utime and stime.
    let fields = StatFields::of(&stat)?;
    let cpu_seconds = (fields.get(14)? + fields.get(15)?) as f64 / ticks_per_second();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    Some(ProcStats {
        cpu_seconds,
        rss_kib: field("VmRSS:")?,
        peak_rss_kib: field("VmHWM:")?,
    })
}

/// User + system CPU seconds of process `root` and every process below it
/// (all their threads; a server's workers and backends are its children),
/// from /proc/PID/stat. A child that exited and was waited for is counted
/// in its parent's children's times (PostgreSQL's backends end with their
/// connections).
pub fn tree_cpu_seconds(root: u32) -> f64 {
    // pid → (parent, ticks)
    let mut procs = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(fields) = StatFields::of(&stat) else {
            continue;
        };
        // ppid, then utime and stime, then the waited-for children's
        // cutime and cstime.
        let field = |n| fields.get(n);
        let own = field(14).zip(field(15)).map(|(u, s)| u + s);
        let children = field(16).zip(field(17)).map(|(u, s)| u + s);
        if let (Some(ppid), Some(own), Some(children)) = (field(4), own, children) {
            procs.insert(pid, (ppid as u32, own + children));
        }
    }
    let below_root = |mut pid: u32| {
        // Bounded: a parent chain is short, and a cycle cannot happen in
        // one snapshot but costs nothing to guard against.
        for _ in 0..64 {
            if pid == root {
                return true;
            }
            match procs.get(&pid) {
                Some(&(parent, _)) if parent != 0 => pid = parent,
                _ => return false,
            }
        }
        false
    };
    let ticks: u64 = procs
        .iter()
        .filter(|(pid, _)| below_root(**pid))
        .map(|(_, (_, ticks))| ticks)
        .sum();
    ticks as f64 / ticks_per_second()
}

/// CPU time the whole host spent busy (every CPU, user + system + irq,
/// not idle or iowait), seconds, from /proc/stat.
pub fn host_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // user nice system idle iowait irq softirq steal (guest time is
    // already inside user).
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    busy as f64 / ticks_per_second()
}

/// The fields of a /proc/PID/stat line after the command name, which is
/// in parentheses and may hold spaces; numbered as proc(5) numbers them.
struct StatFields<'a>(Vec<&'a str>);

impl<'a> StatFields<'a> {
    fn of(stat: &'a str) -> Option<Self> {
        let rest = stat.get(stat.rfind(')')? + 2..)?;
        Some(Self(rest.split_whitespace().collect()))
    }

    /// Field `n` (state is 3, ppid 4, utime 14, …) as a number.
    fn get(&self, n: usize) -> Option<u64> {
        self.0.get(n.checked_sub(3)?)?.parse().ok()
    }
}

/// Clock ticks per second, the unit of /proc's CPU times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_over_labels() {
        let text = "# HELP x y\n# TYPE a counter\na_total 3\n\
                    b{program=\"p\"} 1.5\nb{program=\"q\"} 2\nc 1e3\nbroken line x\n";
        let m = parse_metrics(text);
        assert_eq!(m.get("a_total"), Some(&3.0));
        assert_eq!(m.get("b"), Some(&3.5));
        assert_eq!(m.get("c"), Some(&1000.0));
        assert_eq!(m.get("broken"), None);
        let by = parse_metric_by(text, "b", "program");
        assert_eq!(by.get("p"), Some(&1.5));
        assert_eq!(by.get("q"), Some(&2.0));
        assert!(parse_metric_by(text, "a_total", "program").is_empty());
    }

    #[test]
    fn own_process_stats() {
        let s = proc_stats(std::process::id()).unwrap();
        assert!(s.rss_kib > 0 && s.peak_rss_kib >= s.rss_kib, "{s:?}");
        assert!(proc_stats(u32::MAX).is_none());
        assert!(host_busy_seconds() > 0.0);
    }

    #[test]
    fn a_process_tree_counts_its_live_children_and_those_waited_for() {
        let me = std::process::id();
        let spin = || {
            std::process::Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .unwrap()
        };
        let before = tree_cpu_seconds(me);
        let mut live = spin();
        std::thread::sleep(std::time::Duration::from_millis(400));
        let during = tree_cpu_seconds(me);
        live.kill().unwrap();
        live.wait().unwrap();
        assert!(during - before >= 0.15, "a live child: {before} → {during}");
        let mut ended = spin();
        std::thread::sleep(std::time::Duration::from_millis(400));
        ended.kill().unwrap();
        ended.wait().unwrap();
        let after = tree_cpu_seconds(me);
        // Both children are gone; their time stays, in this process's
        // children's times.
        assert!(after - during >= 0.15, "waited for: {during} → {after}");
        assert_eq!(tree_cpu_seconds(u32::MAX), 0.0);
    }
}
