//! Which processes' runtimes are followed: inspected when the agent first
//! sees their traffic, probed once per interpreter file, forgotten at exit.

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use agent_common::{RUNTIME_CPYTHON, ThreadLayout};
use serde::Serialize;

use super::cpython::{Inspector, NotFollowed};
use crate::{IdMap, kernel::loader::Probes};

/// `capture.runtimes`: which runtimes to follow.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RuntimeChoice {
    /// Every runtime the agent knows (CPython).
    #[default]
    Auto,
    Off,
    /// Only these (names as in [`RUNTIMES`]).
    Only(Vec<String>),
}

/// Runtimes the agent can follow.
pub const RUNTIMES: &[&str] = &["cpython"];

impl std::str::FromStr for RuntimeChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "off" | "none" => Ok(Self::Off),
            list => {
                let names: Vec<String> = list
                    .split(',')
                    .map(|n| n.trim().to_ascii_lowercase())
                    .filter(|n| !n.is_empty())
                    .collect();
                match names.iter().find(|n| !RUNTIMES.contains(&n.as_str())) {
                    Some(bad) => Err(format!(
                        "unknown runtime {bad:?}: expected auto, off or a list of {}",
                        RUNTIMES.join(", ")
                    )),
                    None if names.is_empty() => Err("empty runtime list".into()),
                    None => Ok(Self::Only(names)),
                }
            }
        }
    }
}

impl<'de> serde::Deserialize<'de> for RuntimeChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Spec {
            One(String),
            List(Vec<String>),
        }
        let text = match Spec::deserialize(d)? {
            Spec::One(s) => s,
            Spec::List(list) => list.join(","),
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl RuntimeChoice {
    fn cpython(&self) -> bool {
        match self {
            Self::Auto => true,
            Self::Off => false,
            Self::Only(names) => names.iter().any(|n| n == "cpython"),
        }
    }
}

/// How following one process went, for `zerotrace check` and the logs.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessRuntime {
    pub pid: u32,
    pub runtime: &'static str,
    /// e.g. "3.11".
    pub version: Option<String>,
    /// The file the probes sit on.
    pub file: Option<PathBuf>,
    pub followed: bool,
    /// Why not, when not followed.
    pub reason: Option<String>,
}

enum State {
    Followed,
    /// Not a runtime the agent follows (or not followable); asked again
    /// after `until` in case the process exec'd or loaded an interpreter.
    Skipped {
        until: Instant,
    },
    /// The interpreter was still starting.
    Retry {
        at: Instant,
        tries: u8,
    },
}

/// How long a "not a followed runtime" verdict holds.
const SKIP_FOR: Duration = Duration::from_secs(30);
/// Retries while an interpreter initialises.
const RETRY_EVERY: Duration = Duration::from_millis(500);
const MAX_RETRIES: u8 = 20;

/// What changed for the tracer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Followed: records stamped from `since_ns` (CLOCK_MONOTONIC) on carry units.
    Followed {
        tgid: u32,
        since_ns: u64,
    },
    Unfollowed(u32),
}

pub struct Follower {
    choice: RuntimeChoice,
    inspector: Inspector,
    processes: IdMap<u32, State>,
    /// Files probed (by device and inode), or why probing failed.
    files: HashMap<(u64, u64), Result<(), String>>,
    /// The latest verdict per process, newest last (bounded).
    pub reports: Vec<ProcessRuntime>,
}

/// Most per-process reports kept.
const MAX_REPORTS: usize = 256;

impl Follower {
    pub fn new(choice: RuntimeChoice) -> Self {
        Self {
            choice,
            inspector: Inspector::new(),
            processes: IdMap::default(),
            files: HashMap::new(),
            reports: Vec::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.choice.cpython()
    }

    /// A record of `tgid` arrived: inspect it the first time, and again
    /// while its interpreter starts or once an old verdict expires.
    pub fn observe(&mut self, tgid: u32, now: Instant, probes: &mut Probes) -> Option<Change> {
        if !self.enabled() {
            return None;
        }
        let tries = match self.processes.get(&tgid) {
            Some(State::Followed) => return None,
            Some(State::Skipped { until }) if now < *until => return None,
            Some(State::Retry { at, .. }) if now < *at => return None,
            Some(State::Retry { tries, .. }) => *tries,
            _ => 0,
        };
        let (state, report) = self.follow(tgid, tries, now, probes);
        let followed = matches!(state, State::Followed);
        self.processes.insert(tgid, state);
        if let Some(report) = report {
            if report.followed || report.reason.is_some() {
                log::info!("{}", describe(&report));
            }
            if self.reports.len() >= MAX_REPORTS {
                self.reports.remove(0);
            }
            self.reports.retain(|r| r.pid != tgid);
            self.reports.push(report);
        }
        followed.then(|| Change::Followed {
            tgid,
            since_ns: crate::capture::monotonic_ns(),
        })
    }

    fn follow(
        &mut self,
        tgid: u32,
        tries: u8,
        now: Instant,
        probes: &mut Probes,
    ) -> (State, Option<ProcessRuntime>) {
        let skipped = State::Skipped {
            until: now + SKIP_FOR,
        };
        let interp = match self.inspector.inspect(tgid) {
            Ok(interp) => interp,
            Err(NotFollowed::NotPython) => return (skipped, None),
            // A process the agent may not read (another namespace's init,
            // a hardened service) is only worth a line if it is Python.
            Err(NotFollowed::Io(_)) if !looks_like_python(tgid) => return (skipped, None),
            Err(NotFollowed::NotInitialised) if tries < MAX_RETRIES => {
                let retry = State::Retry {
                    at: now + RETRY_EVERY,
                    tries: tries + 1,
                };
                return (retry, None);
            }
            Err(e) => return (skipped, Some(not_followed(tgid, None, None, e.to_string()))),
        };
        let version = format!("{}.{}", interp.version.0, interp.version.1);
        let file = interp.probes.path.clone();
        let attached = self
            .files
            .entry(interp.probes.file)
            .or_insert_with(|| {
                probes
                    .attach_unit_probes(&interp.probes.path, &interp.probes.offsets)
                    .map_err(|e| crate::kernel::loader::uprobe_attach_error(&e))
            })
            .clone();
        if let Err(e) = attached {
            return (
                skipped,
                Some(not_followed(tgid, Some(version), Some(file), e)),
            );
        }
        let l = interp.layout;
        let layout = ThreadLayout {
            runtime: RUNTIME_CPYTHON,
            key: l.key,
            specific_off: l.specific_off,
            unit_off: l.unit_off,
            seq_off: l.seq_off,
            _pad: 0,
            unit_type: l.unit_type,
        };
        if let Err(e) = probes.follow_runtime(tgid, layout) {
            let reason = format!("{e:#}");
            return (
                skipped,
                Some(not_followed(tgid, Some(version), Some(file), reason)),
            );
        }
        let report = ProcessRuntime {
            pid: tgid,
            runtime: "cpython",
            version: Some(version),
            file: Some(file),
            followed: true,
            reason: None,
        };
        (State::Followed, Some(report))
    }

    /// Looks at every running process (at start: later ones are looked at
    /// when their traffic is first seen).
    pub fn scan(&mut self, probes: &mut Probes) -> Vec<Change> {
        if !self.enabled() {
            return Vec::new();
        }
        let now = Instant::now();
        let own = std::process::id();
        let pids: Vec<u32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|&pid| pid != own)
            .collect();
        pids.into_iter()
            .filter_map(|pid| self.observe(pid, now, probes))
            .collect()
    }

    /// What the agent says about runtimes in one line.
    pub fn summary(&self) -> String {
        if !self.enabled() {
            return "off".to_owned();
        }
        let followed = self.reports.iter().filter(|r| r.followed).count();
        let skipped = self.reports.len() - followed;
        match skipped {
            0 => format!("{followed} CPython processes followed"),
            _ => format!("{followed} CPython processes followed, {skipped} not (see the log)"),
        }
    }

    /// Forgets processes for which `alive` is false.
    pub fn reap(&mut self, alive: impl Fn(u32) -> bool, probes: &mut Probes) -> Vec<Change> {
        let mut gone = Vec::new();
        self.processes.retain(|&tgid, state| {
            if alive(tgid) {
                return true;
            }
            if matches!(state, State::Followed) {
                gone.push(tgid);
            }
            false
        });
        for &tgid in &gone {
            probes.unfollow_runtime(tgid);
        }
        gone.into_iter().map(Change::Unfollowed).collect()
    }
}

fn looks_like_python(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.contains("python"))
}

fn not_followed(
    pid: u32,
    version: Option<String>,
    file: Option<PathBuf>,
    reason: String,
) -> ProcessRuntime {
    ProcessRuntime {
        pid,
        runtime: "cpython",
        version,
        file,
        followed: false,
        reason: Some(reason),
    }
}

/// One line per process: what is followed, or why not.
pub fn describe(r: &ProcessRuntime) -> String {
    let what = match &r.version {
        Some(v) => format!("CPython {v}"),
        None => "CPython".to_owned(),
    };
    let file = r
        .file
        .as_ref()
        .map(|f| format!(" ({})", f.display()))
        .unwrap_or_default();
    match (&r.reason, r.followed) {
        (_, true) => format!(
            "pid {}: {what}{file} followed: tasks and worker hand-offs",
            r.pid
        ),
        (Some(why), false) => format!("pid {}: {what}{file} not followed: {why}", r.pid),
        (None, false) => format!("pid {}: {what}{file} not followed", r.pid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_from_flags_and_yaml() {
        assert_eq!("auto".parse(), Ok(RuntimeChoice::Auto));
        assert_eq!("off".parse(), Ok(RuntimeChoice::Off));
        assert_eq!(
            " CPython ".parse(),
            Ok(RuntimeChoice::Only(vec!["cpython".into()]))
        );
        let bad = "cpython,jvm".parse::<RuntimeChoice>().unwrap_err();
        assert!(bad.contains("\"jvm\""), "{bad}");
        let yaml: RuntimeChoice = serde_yaml_ng::from_str("[cpython]").unwrap();
        assert_eq!(yaml, RuntimeChoice::Only(vec!["cpython".into()]));
        assert!(serde_yaml_ng::from_str::<RuntimeChoice>("[node]").is_err());
        assert!(!RuntimeChoice::Off.cpython());
    }
}
