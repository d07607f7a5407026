//! The kernel-function layer: probes on the kernel's TCP send functions,
//! as fexit programs where the kernel has BPF trampolines, as
//! kprobe/kretprobe pairs otherwise, or not at all (the syscall
//! tracepoints then carry everything, sendfile included).
//!
//! The choice is made at run time by trying: a kernel may list tracing
//! programs as supported and still refuse to load one (trampolines off,
//! lockdown), so only a real load and attach settles it. Every attempt is
//! recorded for the startup trace, with the reason a fallback was taken.

use std::{
    path::Path,
    time::{Instant, SystemTime},
};

use anyhow::bail;
use aya::programs::{FExit, KProbe};

use super::{
    btf::Btf,
    features,
    loader::{Attachment, Probes, ProgramLoad, verified_instructions},
};

/// What the operator asked for (`--kernel-functions`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum KfuncChoice {
    /// fentry/fexit, else kprobe/kretprobe, else none.
    #[default]
    Auto,
    /// fentry/fexit only; fail if the kernel refuses them.
    Fentry,
    /// kprobe/kretprobe only; fail if the kernel has no kprobes.
    Kprobe,
    /// Syscall tracepoints only.
    Off,
}

/// A way of probing kernel functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Trampoline,
    Kprobe,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Self::Trampoline => "fentry/fexit",
            Self::Kprobe => "kprobe/kretprobe",
        }
    }
}

/// The layer in use, for `zerotrace check`, logs and the startup trace.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct KfuncLayer {
    /// "fentry/fexit" or "kprobe/kretprobe"; `None`: syscall tracepoints only.
    pub active: Option<&'static str>,
    /// Why a method was not used, one entry per method tried.
    pub notes: Vec<String>,
}

impl KfuncLayer {
    pub fn describe(&self) -> String {
        match self.active {
            Some(method) => method.to_owned(),
            None if self.notes.is_empty() => "none".to_owned(),
            None => format!("none ({})", self.notes.join("; ")),
        }
    }
}

/// A kernel function and the programs that probe it.
struct Target {
    function: &'static str,
    fexit: &'static str,
    kprobe: &'static str,
    kretprobe: &'static str,
    /// Missing on some kernels by design (not a failure of the method).
    optional: &'static str,
}

const TARGETS: &[Target] = &[
    Target {
        function: "tcp_sendmsg",
        fexit: "fexit_tcp_sendmsg",
        kprobe: "kprobe_tcp_sendmsg",
        kretprobe: "kretprobe_tcp_sendmsg",
        optional: "",
    },
    Target {
        function: "tcp_sendpage",
        fexit: "fexit_tcp_sendpage",
        kprobe: "kprobe_tcp_sendpage",
        kretprobe: "kretprobe_tcp_sendpage",
        optional: "removed in Linux 6.5, where sendfile goes through tcp_sendmsg",
    },
];

/// Tries the methods `choice` allows, in order, and keeps the first that
/// attaches to every target. A forced method that fails is an error.
pub fn attach(probes: &mut Probes, btf: &Btf, choice: KfuncChoice) -> anyhow::Result<KfuncLayer> {
    let methods: &[Method] = match choice {
        KfuncChoice::Off => {
            return Ok(KfuncLayer {
                active: None,
                notes: vec!["turned off (--kernel-functions off)".into()],
            });
        }
        KfuncChoice::Auto => &[Method::Trampoline, Method::Kprobe],
        KfuncChoice::Fentry => &[Method::Trampoline],
        KfuncChoice::Kprobe => &[Method::Kprobe],
    };
    let mut layer = KfuncLayer::default();
    for (i, &method) in methods.iter().enumerate() {
        let first_attachment = probes.attachments.len();
        match try_method(probes, btf, method) {
            Ok(()) => {
                layer.active = Some(method.name());
                log::info!("kernel-function layer: {}", method.name());
                return Ok(layer);
            }
            Err(reason) => {
                unload(probes, method);
                let next = methods.get(i + 1).map(|m| m.name());
                for attachment in &mut probes.attachments[first_attachment..] {
                    if attachment.outcome.is_err() {
                        attachment.fallback = Some(match next {
                            Some(next) => format!("falling back to {next}: {reason}"),
                            None => format!("falling back to syscall tracepoints: {reason}"),
                        });
                    }
                }
                layer.notes.push(format!("{}: {reason}", method.name()));
            }
        }
    }
    if choice != KfuncChoice::Auto {
        bail!(
            "--kernel-functions {}: this kernel cannot run it: {}",
            match choice {
                KfuncChoice::Fentry => "fentry",
                _ => "kprobe",
            },
            layer.notes.join("; ")
        );
    }
    log::warn!(
        "kernel-function layer unavailable ({}); running on syscall tracepoints",
        layer.notes.join("; ")
    );
    Ok(layer)
}

/// Loads and attaches `method`'s programs for every target. On error, what
/// was attached stays recorded; the caller unloads it.
fn try_method(probes: &mut Probes, btf: &Btf, method: Method) -> Result<(), String> {
    if method == Method::Kprobe && !kprobes_available() {
        let reason = "kernel built without kprobes (no kprobe PMU, no kprobe_events)".to_owned();
        record(
            probes,
            TARGETS[0].kprobe,
            TARGETS[0].function,
            "kprobe",
            Err(reason.clone()),
        );
        return Err(reason);
    }
    // aya's own BTF handle is what FExit::load wants; parsed once per attempt.
    let aya_btf = match method {
        Method::Trampoline => {
            Some(aya::Btf::from_sys_fs().map_err(|e| format!("reading BTF: {e}"))?)
        }
        Method::Kprobe => None,
    };
    for target in TARGETS {
        if !btf.has_func(target.function) {
            if target.optional.is_empty() {
                return Err(format!("{} is not in this kernel's BTF", target.function));
            }
            let program = match method {
                Method::Trampoline => target.fexit,
                Method::Kprobe => target.kprobe,
            };
            let kind = match method {
                Method::Trampoline => "fexit",
                Method::Kprobe => "kprobe",
            };
            record(
                probes,
                program,
                target.function,
                kind,
                Err(format!("not in this kernel: {}", target.optional)),
            );
            continue;
        }
        match &aya_btf {
            Some(aya_btf) => attach_fexit(probes, target, aya_btf)?,
            None => {
                attach_kprobe(probes, target.kretprobe, target.function, "kretprobe")?;
                attach_kprobe(probes, target.kprobe, target.function, "kprobe")?;
            }
        }
    }
    Ok(())
}

fn attach_fexit(probes: &mut Probes, target: &Target, btf: &aya::Btf) -> Result<(), String> {
    let program: &mut FExit = program_mut(probes, target.fexit)?;
    let load = ProgramLoad::measure(target.fexit, "fexit", || {
        program.load(target.function, btf)?;
        Ok(verified_instructions(program.info().ok()))
    });
    let refused = load.error.clone();
    probes.loads.push(load);
    if let Some(error) = refused {
        record(
            probes,
            target.fexit,
            target.function,
            "fexit",
            Err(error.clone()),
        );
        return Err(format!("fexit program refused: {error}"));
    }
    let program: &mut FExit = program_mut(probes, target.fexit)?;
    let (outcome, timing) = timed(|| program.attach().map(|_| ()));
    record_timed(
        probes,
        target.fexit,
        target.function,
        "fexit",
        outcome.clone(),
        timing,
    );
    outcome.map_err(|e| format!("attaching fexit to {}: {e}", target.function))
}

fn attach_kprobe(
    probes: &mut Probes,
    name: &'static str,
    function: &'static str,
    kind: &'static str,
) -> Result<(), String> {
    let program: &mut KProbe = program_mut(probes, name)?;
    let load = ProgramLoad::measure(name, kind, || {
        program.load()?;
        Ok(verified_instructions(program.info().ok()))
    });
    let refused = load.error.clone();
    probes.loads.push(load);
    if let Some(error) = refused {
        record(probes, name, function, kind, Err(error.clone()));
        return Err(format!("{kind} program refused: {error}"));
    }
    let program: &mut KProbe = program_mut(probes, name)?;
    let (outcome, timing) = timed(|| program.attach(function, 0).map(|_| ()));
    record_timed(probes, name, function, kind, outcome.clone(), timing);
    outcome.map_err(|e| format!("attaching {kind} to {function}: {e}"))
}

fn program_mut<'a, T>(probes: &'a mut Probes, name: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    let program = probes
        .ebpf
        .program_mut(name)
        .ok_or_else(|| format!("program {name} missing from the object"))?;
    program
        .try_into()
        .map_err(|_| format!("program {name} has an unexpected type"))
}

/// Runs an attach, returning its outcome as text and when it ran.
fn timed(
    attach: impl FnOnce() -> Result<(), aya::programs::ProgramError>,
) -> (Result<(), String>, (SystemTime, std::time::Duration)) {
    let started = SystemTime::now();
    let clock = Instant::now();
    let outcome = attach().map_err(|e| super::loader::load_error_text(&e));
    (outcome, (started, clock.elapsed()))
}

fn record(
    probes: &mut Probes,
    program: &'static str,
    function: &'static str,
    kind: &'static str,
    outcome: Result<(), String>,
) {
    record_timed(
        probes,
        program,
        function,
        kind,
        outcome,
        (SystemTime::now(), std::time::Duration::ZERO),
    );
}

fn record_timed(
    probes: &mut Probes,
    program: &'static str,
    function: &'static str,
    kind: &'static str,
    outcome: Result<(), String>,
    (started, duration): (SystemTime, std::time::Duration),
) {
    probes.attachments.push(Attachment {
        program,
        target: function.to_owned(),
        kind,
        started,
        duration,
        outcome,
        fallback: None,
    });
}

/// Unloads (and so detaches) whatever `method` loaded.
fn unload(probes: &mut Probes, method: Method) {
    for target in TARGETS {
        match method {
            Method::Trampoline => {
                if let Ok(p) = program_mut::<FExit>(probes, target.fexit) {
                    let _ = p.unload();
                }
            }
            Method::Kprobe => {
                for name in [target.kprobe, target.kretprobe] {
                    if let Ok(p) = program_mut::<KProbe>(probes, name) {
                        let _ = p.unload();
                    }
                }
            }
        }
    }
}

/// Whether the kernel can attach kprobes at all (CONFIG_KPROBES).
pub fn kprobes_available() -> bool {
    features::event_source("kprobe")
        || ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .any(|t| Path::new(t).join("kprobe_events").exists())
}

/// Names of the kernel-function programs (for the registry test).
pub fn program_names() -> impl Iterator<Item = &'static str> {
    TARGETS
        .iter()
        .flat_map(|t| [t.fexit, t.kprobe, t.kretprobe])
}
