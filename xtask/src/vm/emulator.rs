//! The emulator the guests run in: QEMU 10.0 from Debian 12's backports,
//! pinned and checksummed like the kernels and unpacked under the cache
//! (`~/.cache/zerotrace/vm/qemu/<version>/`); nothing is installed
//! system-wide. It runs on the shared libraries and SeaBIOS of the system's
//! own `qemu-system-x86`, which setup installs.
//!
//! Why not the system's QEMU 7.2: with one host thread per vCPU (MTTCG) it
//! can go on executing a translated block after the guest rewrote the code
//! it was translated from on another vCPU. Linux rewrites its own code
//! whenever a probe is attached or detached (ftrace call sites for
//! fentry/fexit and kprobes, static keys for tracepoints), through a
//! temporary int3: a vCPU that keeps running a stale int3 after the patch
//! finished loops in the int3 handler on 6.1 (the handler sees no int3 in
//! memory any more and retries the instruction: "soft lockup", CPU stuck in
//! `asm_exc_int3`) and oopses on 6.12 ("Oops: int3"). One gdb `stepi`,
//! which makes QEMU flush its translations, ends such a lock-up at once.
//! Under QEMU 10.0 the same stress (two agents attaching and detaching under
//! traffic) ran clean; see the README's "Kernel matrix".

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result, bail};

use super::archive::{self, PoolFile};
use crate::say;
use crate::util::Ctx;

/// The pinned QEMU: the emulator and its firmware and option ROMs.
const VERSION: &str = "10.0.2+ds-2+deb13u1~bpo12+1";
const DEBS: &[(&str, PoolFile)] = &[
    (
        "qemu-system-x86",
        PoolFile {
            pool: "debian/pool/main/q/qemu/qemu-system-x86_10.0.2+ds-2+deb13u1~bpo12+1_amd64.deb",
            sha256: "4a6b1856c8b0d7df4ff8e70249e12c473ccf8d516aadb4ae14d3d938faed0c65",
        },
    ),
    (
        "qemu-system-data",
        PoolFile {
            pool: "debian/pool/main/q/qemu/qemu-system-data_10.0.2+ds-2+deb13u1~bpo12+1_all.deb",
            sha256: "2d831088187087013b3fcbd19bdfb955b182a2d5a08f6dafa0ad1c6d2007fb4e",
        },
    ),
];
/// Where SeaBIOS (bios-256k.bin) lives: package seabios, a dependency of
/// the system's qemu-system-x86.
const SEABIOS: &str = "/usr/share/seabios";

/// A QEMU to boot guests with.
pub struct Emulator {
    pub binary: PathBuf,
    /// `-L` directories: firmware and option ROMs, searched in order.
    data_dirs: Vec<PathBuf>,
    /// "QEMU 10.0.2 (pinned)" and the like, for the report.
    pub describe: String,
}

impl Emulator {
    /// The arguments that point QEMU at its firmware.
    pub fn data_args(&self) -> Vec<OsString> {
        self.data_dirs
            .iter()
            .flat_map(|d| [OsString::from("-L"), d.clone().into_os_string()])
            .collect()
    }
}

/// The pinned QEMU, fetched and unpacked unless the cache has it; with
/// `system`, the QEMU on PATH instead (to compare, or where the pinned one
/// cannot run).
pub fn resolve(ctx: &Ctx, system: bool) -> Result<Emulator> {
    if system {
        let binary = ctx
            .which("qemu-system-x86_64")
            .context("qemu-system-x86_64 not found on PATH after installing qemu-system-x86")?;
        return Ok(Emulator {
            describe: format!("{} (system)", version(&binary)?),
            binary,
            data_dirs: Vec::new(),
        });
    }
    let dir = archive::cache_root()?.join("qemu").join(VERSION);
    let binary = dir.join("usr/bin/qemu-system-x86_64");
    let stamp = dir.join(".complete");
    if !stamp.is_file() {
        let tmp = archive::fresh_dir(&dir.with_extension("download"))?;
        let staging = archive::fresh_dir(&dir.with_extension("partial"))?;
        for (package, file) in DEBS {
            let deb = tmp.join(format!("{package}.deb"));
            archive::fetch_pinned(ctx, file, &deb).map_err(|why| {
                anyhow::anyhow!(
                    "cannot fetch the pinned {package} {VERSION} ({why}); update DEBS in \
                     xtask/src/vm/emulator.rs, or pass --system-qemu to use the system's \
                     QEMU (whose 7.2 hangs guests now and then, see the module doc)"
                )
            })?;
            crate::util::output(ctx.cmd("dpkg").arg("-x").arg(&deb).arg(&staging))
                .with_context(|| format!("dpkg -x {}", deb.display()))?;
        }
        fs::write(staging.join(".complete"), format!("{VERSION}\n"))?;
        let _ = fs::remove_dir_all(&tmp);
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::rename(&staging, &dir)
            .with_context(|| format!("cannot move QEMU into {}", dir.display()))?;
        say!("vm-test", "QEMU {VERSION} unpacked into {}", dir.display());
    }
    missing_libraries(ctx, &binary)?;
    if !Path::new(SEABIOS).join("bios-256k.bin").is_file() {
        bail!("{SEABIOS}/bios-256k.bin is missing (package seabios)");
    }
    Ok(Emulator {
        describe: format!("{} (pinned {VERSION})", version(&binary)?),
        binary,
        data_dirs: vec![dir.join("usr/share/qemu"), PathBuf::from(SEABIOS)],
    })
}

/// Fails, naming them, when the unpacked QEMU needs libraries this system
/// lacks (they come with the system's qemu-system-x86).
fn missing_libraries(ctx: &Ctx, binary: &Path) -> Result<()> {
    let missing: Vec<String> = super::initramfs::ldd(ctx, binary)?
        .lines()
        .filter(|l| l.contains("not found"))
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} needs libraries this system lacks: {} (install qemu-system-x86, whose \
             dependencies they are, or pass --system-qemu)",
            binary.display(),
            missing.join(", ")
        );
    }
    Ok(())
}

/// "QEMU 10.0.2" from `qemu-system-x86_64 --version`.
fn version(binary: &Path) -> Result<String> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or("").trim();
    // "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"
    Ok(first
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .map_or_else(|| first.to_string(), |v| format!("QEMU {v}")))
}
