//! Which TLS libraries are probed: found in the maps of each traced
//! process, probed once per library file, looked at again when a process
//! maps new code.

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use agent_common::TlsLayout;
use serde::Serialize;

use super::library::{self, Library, Version};
use crate::{
    IdMap,
    capture::dev_number,
    kernel::loader::{Probes, SHARED_READ, SHARED_WRITE, uprobe_attach_error},
};

/// `capture.tls`: whether TLS libraries are probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsChoice {
    /// Every TLS library the agent knows (OpenSSL 1.1 and 3, shared or
    /// linked into an executable).
    #[default]
    Auto,
    Off,
}

impl std::str::FromStr for TlsChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "openssl" => Ok(Self::Auto),
            "off" | "none" => Ok(Self::Off),
            other => Err(format!(
                "unknown TLS choice {other:?}: expected auto or off"
            )),
        }
    }
}

impl<'de> serde::Deserialize<'de> for TlsChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One TLS library in one process, for `zerotrace check` and the logs.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ProcessTls {
    pub pid: u32,
    /// e.g. "OpenSSL 3.0.19", "GnuTLS".
    pub library: String,
    /// The file as the process maps it.
    pub path: PathBuf,
    pub followed: bool,
    /// Why not, when not followed.
    pub reason: Option<String>,
}

/// What a library file turned out to be (once per file).
#[derive(Debug, Clone)]
enum FileVerdict {
    Probed(Option<Version>),
    /// OpenSSL, but the probes could not go on (reason).
    Failed(Option<Version>, String),
    Unsupported(&'static str),
    NotTls,
}

/// A process mapped new code: it is looked at again at once (the library
/// may be used within milliseconds) and once more this long after, for the
/// libraries the loader mapped after it.
const RESCAN_AGAIN_AFTER: Duration = Duration::from_millis(20);
/// Where distributions keep the shared OpenSSL: probed at start whether or
/// not a process maps it yet, so a later `dlopen` finds the probes there.
const SYSTEM_LIBRARIES: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/libssl.so.3",
    "/usr/lib/x86_64-linux-gnu/libssl.so.1.1",
    "/usr/lib64/libssl.so.3",
    "/usr/lib64/libssl.so.1.1",
    "/usr/lib/libssl.so.3",
    "/lib/libssl.so.3",
];
/// Most per-process reports kept.
const MAX_REPORTS: usize = 256;
/// Most distinct files remembered.
const MAX_FILES: usize = 16_384;

pub struct TlsFollower {
    choice: TlsChoice,
    /// By device and inode.
    files: HashMap<(u64, u64), FileVerdict>,
    /// Processes looked at.
    seen: IdMap<u32, ()>,
    /// Processes that mapped new code: when to look again, and whether
    /// that is the last look.
    rescan: IdMap<u32, (Instant, bool)>,
    /// Libraries not followed that were already named in the log.
    logged: HashMap<(u64, u64), ()>,
    /// Processes whose layout the kernel has.
    layouts: IdMap<u32, ()>,
    /// The latest verdicts, newest last (bounded).
    pub reports: Vec<ProcessTls>,
    /// Executable mappings that had the process looked at again, and
    /// those of a file judged before, which needed no look.
    pub mapped_looked: u64,
    pub mapped_skipped: u64,
}

/// One file a process maps (or one of the system's libraries).
struct MappedFile {
    file: (u64, u64),
    path: String,
    /// The process and one of its mappings of the file; `None` for a
    /// system library looked at before any process maps it.
    by: Option<MappedBy>,
}

/// Where a process maps a file: enough to open the very file it runs.
struct MappedBy {
    pid: u32,
    /// The mapping's address range as maps shows it, `start-end`.
    range: String,
    /// maps says the file was deleted.
    deleted: bool,
}

impl MappedFile {
    /// Where the agent opens the file: through the process's root, or its
    /// `map_files` entry when the file on disk is gone or replaced (a
    /// package upgrade: probes must go on the inode the process runs).
    ///
    /// It costs a `stat`, so it is asked only of a file not judged yet: a
    /// process is looked at again when it maps new code, and a `stat` of
    /// every file it maps at every look was most of what a process start
    /// cost the agent (bench/results/process-start.md).
    fn open_at(&self) -> PathBuf {
        let Some(by) = &self.by else {
            return PathBuf::from(&self.path);
        };
        let rooted = PathBuf::from(format!("/proc/{}/root{}", by.pid, self.path));
        let same = !by.deleted
            && std::fs::metadata(&rooted).is_ok_and(|md| {
                use std::os::unix::fs::MetadataExt;
                md.ino() == self.file.1
            });
        if same {
            rooted
        } else {
            PathBuf::from(format!("/proc/{}/map_files/{}", by.pid, by.range))
        }
    }
}

impl TlsFollower {
    pub fn new(choice: TlsChoice) -> Self {
        Self {
            choice,
            files: HashMap::new(),
            seen: IdMap::default(),
            rescan: IdMap::default(),
            logged: HashMap::new(),
            layouts: IdMap::default(),
            reports: Vec::new(),
            mapped_looked: 0,
            mapped_skipped: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.choice == TlsChoice::Auto
    }

    /// Looks at every process in `pids` (at start). With `system` (every
    /// process is traced), the system's OpenSSL is probed first whether or
    /// not a process maps it yet; with a selection it is not, since a probe
    /// on a shared file makes every process that calls it trap, traced or not.
    pub fn scan(&mut self, pids: impl IntoIterator<Item = u32>, system: bool, probes: &mut Probes) {
        if !self.enabled() {
            return;
        }
        for path in SYSTEM_LIBRARIES.iter().filter(|_| system) {
            let Ok(md) = std::fs::metadata(path) else {
                continue;
            };
            use std::os::unix::fs::MetadataExt;
            let file = (
                dev_number(libc::major(md.dev()), libc::minor(md.dev())),
                md.ino(),
            );
            if self.files.contains_key(&file) {
                continue;
            }
            let m = MappedFile {
                file,
                path: (*path).to_owned(),
                by: None,
            };
            let beside = [MappedFile {
                file: (0, 0),
                path: path.replace("libssl", "libcrypto"),
                by: None,
            }];
            let verdict = self.judge(0, &m, &beside, probes);
            self.files.insert(file, verdict);
        }
        let own = std::process::id();
        for pid in pids.into_iter().filter(|&p| p != own) {
            self.look(pid, probes);
        }
    }

    /// A record of `tgid` arrived: look at it the first time.
    pub fn observe(&mut self, tgid: u32, probes: &mut Probes) {
        if self.enabled() && !self.seen.contains_key(&tgid) {
            self.look(tgid, probes);
        }
    }

    /// `tgid` mapped `file` executable: look again at once, and once more
    /// a little later; unless the file is one already judged not to be a
    /// TLS library. A process maps most of its libraries at exec, each a
    /// record, and a look reads all its maps: looking again for every one
    /// made an exec of `curl` (some 40 libraries) cost the agent a few
    /// milliseconds. A file the kernel could not name is looked for.
    pub fn mapped(&mut self, tgid: u32, file: Option<(u64, u64)>, now: Instant) {
        if !self.enabled() {
            return;
        }
        if let Some(file) = file
            && matches!(self.files.get(&file), Some(FileVerdict::NotTls))
        {
            self.mapped_skipped += 1;
            return;
        }
        self.mapped_looked += 1;
        self.rescan.insert(tgid, (now, false));
    }

    /// Looks again at the processes that mapped new code.
    pub fn poll(&mut self, now: Instant, probes: &mut Probes) {
        if self.rescan.is_empty() {
            return;
        }
        let due: Vec<(u32, bool)> = self
            .rescan
            .iter()
            .filter(|&(_, (at, _))| *at <= now)
            .map(|(&pid, &(_, last))| (pid, last))
            .collect();
        for (pid, last) in due {
            if last {
                self.rescan.remove(&pid);
            } else {
                self.rescan.insert(pid, (now + RESCAN_AGAIN_AFTER, true));
            }
            self.look(pid, probes);
        }
    }

    /// Forgets processes for which `alive` is false.
    pub fn reap(&mut self, alive: impl Fn(u32) -> bool, probes: &mut Probes) {
        self.seen.retain(|&pid, ()| alive(pid));
        self.rescan.retain(|&pid, _| alive(pid));
        let gone: Vec<u32> = self
            .layouts
            .keys()
            .copied()
            .filter(|&p| !alive(p))
            .collect();
        for pid in gone {
            self.layouts.remove(&pid);
            probes.unfollow_tls(pid);
        }
    }

    /// What the agent says about TLS in one line.
    pub fn summary(&self) -> String {
        if !self.enabled() {
            return "off".to_owned();
        }
        let not = self.reports.iter().filter(|r| !r.followed).count();
        // Named from the probed files, not from the bounded per-process
        // reports, which may no longer hold the process that mapped one.
        let probed: Vec<&Option<Version>> = self
            .files
            .values()
            .filter_map(|v| match v {
                FileVerdict::Probed(version) => Some(version),
                _ => None,
            })
            .collect();
        let names: std::collections::BTreeSet<String> =
            probed.iter().map(|v| name_of(v.as_ref())).collect();
        let names = names.into_iter().collect::<Vec<_>>().join(", ");
        let mut line = match probed.len() {
            0 => "no TLS library probed yet".to_owned(),
            1 => format!("1 TLS library file probed ({names})"),
            n => format!("{n} TLS library files probed ({names})"),
        };
        if not > 0 {
            line.push_str(&format!(
                ", {not} process libraries not followed (see the log)"
            ));
        }
        line
    }

    fn look(&mut self, pid: u32, probes: &mut Probes) {
        self.seen.insert(pid, ());
        let Ok(mut maps) = file_maps(pid) else {
            return;
        };
        // TLS libraries by name first: a library just loaded is probed
        // before the other new files are read.
        maps.sort_by_key(|m| {
            let name = basename(&m.path);
            !(name.contains("ssl") || name.contains("tls"))
        });
        let mut layout: Option<TlsLayout> = None;
        let mut conflicting = false;
        for m in &maps {
            let verdict = match self.files.get(&m.file) {
                Some(v) => v.clone(),
                None => {
                    let v = self.judge(pid, m, &maps, probes);
                    if self.files.len() >= MAX_FILES {
                        self.files
                            .retain(|_, v| matches!(v, FileVerdict::Probed(_)));
                    }
                    self.files.insert(m.file, v.clone());
                    v
                }
            };
            let report = match verdict {
                FileVerdict::NotTls => continue,
                FileVerdict::Probed(version) => {
                    let this = version.as_ref().map(Version::layout).unwrap_or_default();
                    conflicting |= layout.is_some_and(|l| l != this);
                    layout = Some(this);
                    ProcessTls {
                        pid,
                        library: name_of(version.as_ref()),
                        path: m.path.clone().into(),
                        followed: true,
                        reason: None,
                    }
                }
                FileVerdict::Failed(version, reason) => ProcessTls {
                    pid,
                    library: name_of(version.as_ref()),
                    path: m.path.clone().into(),
                    followed: false,
                    reason: Some(reason),
                },
                FileVerdict::Unsupported(what) => ProcessTls {
                    pid,
                    library: what.to_owned(),
                    path: m.path.clone().into(),
                    followed: false,
                    reason: Some(format!("{what} is not followed (OpenSSL only)")),
                },
            };
            if !report.followed && self.logged.insert(m.file, ()).is_none() {
                log::info!(
                    "tls: {} ({}) mapped by pid {pid}{}: not followed: {}",
                    report.library,
                    report.path.display(),
                    if self.logged.len() > 1 {
                        ""
                    } else {
                        " and maybe others"
                    },
                    report.reason.as_deref().unwrap_or("")
                );
            }
            self.report(report);
        }
        if let Some(layout) = layout {
            // Two OpenSSL builds in one process: their sessions differ, so
            // the kernel relies on the socket calls alone.
            let layout = if conflicting {
                TlsLayout::default()
            } else {
                layout
            };
            match probes.follow_tls(pid, layout) {
                Ok(()) => {
                    self.layouts.insert(pid, ());
                }
                Err(e) => log::warn!("tls pid {pid}: {e:#}"),
            }
        }
    }

    /// Inspects a file the first time any process maps it, probing it when
    /// it is OpenSSL.
    fn judge(
        &self,
        pid: u32,
        m: &MappedFile,
        maps: &[MappedFile],
        probes: &mut Probes,
    ) -> FileVerdict {
        let name = basename(&m.path);
        let open_at = m.open_at();
        // Only regular files: opening a mapped device (a GPU, a shared
        // memory driver) could reach its driver.
        if !std::fs::metadata(&open_at).is_ok_and(|md| md.is_file()) {
            return FileVerdict::NotTls;
        }
        let file = match std::fs::File::open(&open_at) {
            Ok(f) => f,
            Err(e) => {
                // Most maps are ordinary libraries: only a TLS name is worth a line.
                return if name.starts_with("libssl.so") {
                    FileVerdict::Failed(None, format!("{}: {e}", open_at.display()))
                } else {
                    FileVerdict::NotTls
                };
            }
        };
        match library::inspect(file, name) {
            Ok(Library::NotTls) => FileVerdict::NotTls,
            Ok(Library::Unsupported(what)) => FileVerdict::Unsupported(what),
            Err(e) if name.starts_with("libssl.so") => FileVerdict::Failed(None, e),
            Err(_) => FileVerdict::NotTls,
            Ok(Library::OpenSsl { functions, version }) => {
                // Probes first: a library just loaded may be used within
                // milliseconds; its version only refines the report.
                let clock = Instant::now();
                let attached = probes.attach_tls_probes(&open_at, &functions);
                let took = clock.elapsed();
                // A shared libssl names its version in the libcrypto next to it.
                let version = version.or_else(|| {
                    maps.iter()
                        .find(|c| basename(&c.path).starts_with("libcrypto"))
                        .and_then(|c| library::version_of(&c.open_at()))
                });
                match attached {
                    Ok(moved) => {
                        log::info!(
                            "tls: {} probed in {} ({}, {took:.1?}): {}{}",
                            name_of(version.as_ref()),
                            m.path,
                            if pid == 0 {
                                "the system's, before any process maps it".to_owned()
                            } else {
                                format!("first mapped by pid {pid}")
                            },
                            probed_names(&functions),
                            past_endbr64(&moved)
                        );
                        FileVerdict::Probed(version)
                    }
                    Err(e) => FileVerdict::Failed(version, uprobe_attach_error(&e)),
                }
            }
        }
    }

    fn report(&mut self, report: ProcessTls) {
        if !report.followed && !self.reports.contains(&report) {
            log::debug!("tls {}", describe(&report));
        }
        self.reports
            .retain(|r| !(r.pid == report.pid && r.path == report.path));
        if self.reports.len() >= MAX_REPORTS {
            self.reports.remove(0);
        }
        self.reports.push(report);
    }
}

/// The probed functions for the log, saying which public ones an internal
/// one stands for.
fn probed_names(functions: &[(&str, u64)]) -> String {
    functions
        .iter()
        .map(|&(name, _)| match name {
            SHARED_READ => format!("{name} (for SSL_read, SSL_read_ex)"),
            SHARED_WRITE => format!("{name} (for SSL_write, SSL_write_ex)"),
            _ => name.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The log's note of the functions probed past their `endbr64`
/// (`kernel::uprobe_site`): a cheaper trap on CET builds.
fn past_endbr64(moved: &[&str]) -> String {
    if moved.is_empty() {
        String::new()
    } else {
        format!("; probed past endbr64: {}", moved.join(", "))
    }
}

fn name_of(version: Option<&Version>) -> String {
    version.map_or_else(|| "OpenSSL".to_owned(), Version::short)
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The distinct files `pid` maps.
fn file_maps(pid: u32) -> std::io::Result<Vec<MappedFile>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut out: Vec<MappedFile> = Vec::new();
    for line in text.lines() {
        // start-end perms offset dev inode, then blanks and the path
        // (which may hold blanks itself).
        let mut fields = line.splitn(6, ' ');
        let (Some(range), Some(_perms), Some(_), Some(dev), Some(inode), Some(path)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        let path = path.trim_start();
        // Not only executable mappings: the loader maps a library's first
        // segment read-only and its code just after, and the mmap record
        // that brings the agent here comes before that code mapping.
        if !path.starts_with('/') {
            continue;
        }
        let Ok(inode) = inode.parse::<u64>() else {
            continue;
        };
        let dev = parse_dev(dev);
        if inode == 0 || out.iter().any(|m| m.file == (dev, inode)) {
            continue;
        }
        let (path, deleted) = match path.strip_suffix(" (deleted)") {
            Some(p) => (p, true),
            None => (path, false),
        };
        out.push(MappedFile {
            file: (dev, inode),
            path: path.to_owned(),
            by: Some(MappedBy {
                pid,
                range: range.to_owned(),
                deleted,
            }),
        });
    }
    Ok(out)
}

/// "fd:01" (as /proc/PID/maps shows it) → the number [`dev_number`] gives.
fn parse_dev(dev: &str) -> u64 {
    let (major, minor) = dev.split_once(':').unwrap_or((dev, "0"));
    let major = u32::from_str_radix(major, 16).unwrap_or(0);
    let minor = u32::from_str_radix(minor, 16).unwrap_or(0);
    dev_number(major, minor)
}

/// One line per process library: followed, or why not.
pub fn describe(r: &ProcessTls) -> String {
    match (&r.reason, r.followed) {
        (_, true) => format!(
            "pid {}: {} ({}) followed",
            r.pid,
            r.library,
            r.path.display()
        ),
        (Some(why), false) => format!(
            "pid {}: {} ({}) not followed: {why}",
            r.pid,
            r.library,
            r.path.display()
        ),
        (None, false) => format!(
            "pid {}: {} ({}) not followed",
            r.pid,
            r.library,
            r.path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse() {
        assert_eq!("auto".parse(), Ok(TlsChoice::Auto));
        assert_eq!(" OFF ".parse(), Ok(TlsChoice::Off));
        let bad = "gnutls".parse::<TlsChoice>().unwrap_err();
        assert!(bad.contains("\"gnutls\""), "{bad}");
        let yaml: TlsChoice = serde_yaml_ng::from_str("off").unwrap();
        assert_eq!(yaml, TlsChoice::Off);
    }

    /// A mapping of a file judged not to be a TLS library needs no look at
    /// the process; any other does: a new file, a probed library (the
    /// process must be followed), or a file the kernel could not name.
    #[test]
    fn only_a_file_not_judged_not_tls_has_the_process_looked_at() {
        let mut follower = TlsFollower::new(TlsChoice::Auto);
        let now = Instant::now();
        follower.files.insert((1, 2), FileVerdict::NotTls);
        follower.files.insert((1, 4), FileVerdict::Probed(None));
        follower.mapped(7, Some((1, 2)), now);
        assert!(follower.rescan.is_empty());
        for (pid, file) in [(8, Some((1, 3))), (9, Some((1, 4))), (10, None)] {
            follower.mapped(pid, file, now);
            assert!(follower.rescan.contains_key(&pid), "pid {pid}");
        }
        assert_eq!((follower.mapped_looked, follower.mapped_skipped), (3, 1));
        let mut off = TlsFollower::new(TlsChoice::Off);
        off.mapped(11, Some((1, 3)), now);
        assert!(off.rescan.is_empty());
    }

    /// The line names what was probed even when no per-process report of
    /// it is left (they are bounded; a short-lived client's goes first).
    #[test]
    fn summary_names_the_probed_files() {
        let mut follower = TlsFollower::new(TlsChoice::Auto);
        assert_eq!(follower.summary(), "no TLS library probed yet");
        let version = |minor| Version {
            flavour: "OpenSSL",
            number: (3, minor, 1),
            text: String::new(),
        };
        follower
            .files
            .insert((1, 1), FileVerdict::Probed(Some(version(5))));
        assert_eq!(
            follower.summary(),
            "1 TLS library file probed (OpenSSL 3.5.1)"
        );
        follower
            .files
            .insert((1, 2), FileVerdict::Probed(Some(version(0))));
        follower.files.insert((1, 3), FileVerdict::Probed(None));
        follower.files.insert((1, 4), FileVerdict::NotTls);
        assert_eq!(
            follower.summary(),
            "3 TLS library files probed (OpenSSL, OpenSSL 3.0.1, OpenSSL 3.5.1)"
        );
        assert_eq!(TlsFollower::new(TlsChoice::Off).summary(), "off");
    }

    #[test]
    fn own_maps_list_libc_once() {
        let maps = file_maps(std::process::id()).unwrap();
        let libc: Vec<&MappedFile> = maps
            .iter()
            .filter(|m| basename(&m.path).starts_with("libc.so"))
            .collect();
        assert_eq!(libc.len(), 1, "one entry per file");
        let open_at = libc[0].open_at();
        assert!(open_at.starts_with("/proc"), "{open_at:?}");
        assert!(open_at.exists());
        assert_eq!(parse_dev("fd:01"), (0xfd << 32) | 1);
        // The same file by stat: the same key, so it is probed once.
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(&open_at).unwrap();
        let by_stat = dev_number(libc::major(md.dev()), libc::minor(md.dev()));
        assert_eq!((by_stat, md.ino()), libc[0].file);
    }
}
