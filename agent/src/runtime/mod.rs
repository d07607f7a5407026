//! Interpreter runtimes: following a thread's *unit* of work inside a process.
//!
//! A unit is the `PyContext` a CPython thread is running in. asyncio runs
//! every task and every callback in its own context, and thread hand-offs
//! that copy the context (`contextvars.copy_context().run`,
//! `asyncio.to_thread`, `loop.run_in_executor` with a copied context) run in a
//! copy: so the context a thread is in says which piece of work it is doing
//! where the thread id alone does not.
//!
//! The kernel reads a thread's current unit without calling the interpreter:
//! CPython keeps each thread's `PyThreadState` under a pthread TSS key
//! (`_PyRuntime`'s autoTSSkey); glibc stores keys below 32 in the thread's own
//! `struct pthread`, which fsbase points at; the thread state holds the
//! context pointer and a counter bumped on every switch. [`inspect`] finds the
//! key, glibc's slot offset and the field offsets for one process
//! ([`ThreadLayout`]), checking them against the live thread states.
//!
//! New units are seen by return probes on the functions that allocate
//! `PyContext` objects ([`ProbeTarget`]). They are found by disassembling the
//! interpreter's code for calls made with `&PyContext_Type` as first argument.
//! The enclosing function comes from `.symtab` when there is one; without it
//! (distribution builds, where LTO also renames or inlines the allocator) it
//! is the nearest preceding function entry that the binary still tells: the
//! targets of direct calls and the exported functions.

mod cpython;
mod elf;
pub mod follow;
#[cfg(test)]
mod tests;

use std::io::IoSliceMut;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::sys::uio::{RemoteIoVec, process_vm_readv};
use nix::unistd::Pid;

pub use cpython::Inspector;

/// What the kernel needs to read "the unit running on a thread" of one process:
/// tstate = *(fsbase + specific_off + 16*key + 8)  (glibc pthread_getspecific, key < 32)
/// unit   = *(tstate + unit_off)      (PyThreadState.context, a PyContext*)
/// seq    = *(tstate + seq_off) as u32 (PyThreadState.context_ver)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadLayout {
    pub key: u32,
    pub specific_off: u32,
    pub unit_off: u32,
    pub seq_off: u32,
    /// Address of `PyContext_Type` in the process: a probed allocator's
    /// return value counts as a new unit only if it has this type.
    pub unit_type: u64,
}

/// A file to put return probes on, once per file (not per process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    /// Path usable from the agent: "/proc/<pid>/root" + mapped path (so containers work).
    pub path: PathBuf,
    /// (st_dev, st_ino) of that file: the once-per-file key.
    pub file: (u64, u64),
    /// FILE offsets (not vaddrs) of functions whose return value (rax) is a
    /// newly allocated PyContext.
    pub offsets: Vec<u64>,
}

/// How the allocators were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymbolSource {
    /// Enclosing functions from the binary's `.symtab`.
    Symtab,
    /// No `.symtab`: enclosing functions from direct call targets and `.dynsym`.
    DynsymAndCode,
}

/// A CPython process the agent can follow.
#[derive(Debug, Clone)]
pub struct Interpreter {
    pub pid: u32,
    /// (major, minor), e.g. (3, 11).
    pub version: (u8, u8),
    pub layout: ThreadLayout,
    pub probes: ProbeTarget,
    pub symbols: SymbolSource,
}

/// Why a process is not followed, in words a user reads in `zerotrace check`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotFollowed {
    #[error("not a Python process (no CPython runtime mapped)")]
    NotPython,
    #[error("Python {0} is not supported (3.9 to 3.13 are)")]
    Version(String),
    /// The interpreter has not finished starting: try again later.
    #[error("the Python interpreter is not initialised yet")]
    NotInitialised,
    #[error("this Python cannot be followed: {0}")]
    Unsupported(String),
    #[error("cannot inspect the process: {0}")]
    Io(String),
}

/// Inspects one process with a fresh cache (see [`Inspector`] to share the
/// per-binary analysis between processes).
pub fn inspect(pid: u32) -> Result<Interpreter, NotFollowed> {
    Inspector::new().inspect(pid)
}

/// One line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mapping {
    pub start: u64,
    pub offset: u64,
    pub inode: u64,
    pub path: String,
}

/// The file-backed mappings of a process.
pub(crate) fn maps(pid: u32) -> Result<Vec<Mapping>, NotFollowed> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| {
        NotFollowed::Io(match e.kind() {
            std::io::ErrorKind::NotFound => format!("process {pid} does not exist"),
            _ => format!("/proc/{pid}/maps: {e}"),
        })
    })?;
    Ok(text.lines().filter_map(parse_maps_line).collect())
}

/// `start-end perms offset dev inode path`; the path may hold spaces.
/// Anonymous and pseudo mappings ([heap], [vdso]) give None.
fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut rest = line;
    let mut field = || {
        rest = rest.trim_start();
        let end = rest.find(' ').unwrap_or(rest.len());
        let (f, r) = rest.split_at(end);
        rest = r;
        f
    };
    let range = field();
    let _perms = field();
    let offset = u64::from_str_radix(field(), 16).ok()?;
    let _dev = field();
    let inode: u64 = field().parse().ok()?;
    let path = rest.trim_start();
    if inode == 0 || !path.starts_with('/') {
        return None;
    }
    let start = u64::from_str_radix(range.split('-').next()?, 16).ok()?;
    Some(Mapping {
        start,
        offset,
        inode,
        path: path.to_string(),
    })
}

/// Reads another process's memory with process_vm_readv: no ptrace stop,
/// and a bad pointer is an error (EFAULT), never a crash.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Memory {
    pid: Pid,
}

/// Largest single read: every read here is a struct or a small block.
const MAX_READ: usize = 64 * 1024;
const PAGE: u64 = 4096;

impl Memory {
    pub fn new(pid: u32) -> Self {
        Memory {
            pid: Pid::from_raw(pid as i32),
        }
    }

    /// Reads up to `buf.len()` bytes; returns how many were read before the
    /// first unreadable page. The remote range is split at page boundaries so
    /// that a short read always stops exactly at a page.
    pub fn read_partial(&self, addr: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        if buf.is_empty() || buf.len() > MAX_READ || addr.checked_add(buf.len() as u64).is_none() {
            return Err(Errno::EINVAL);
        }
        let mut remote = Vec::with_capacity(buf.len() / PAGE as usize + 2);
        let (mut at, end) = (addr, addr + buf.len() as u64);
        while at < end {
            let next = ((at / PAGE) + 1).saturating_mul(PAGE).min(end);
            remote.push(RemoteIoVec {
                base: at as usize,
                len: (next - at) as usize,
            });
            at = next;
        }
        let mut local = [IoSliceMut::new(buf)];
        process_vm_readv(self.pid, &mut local, &remote)
    }

    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        match self.read_partial(addr, buf)? {
            n if n == buf.len() => Ok(()),
            _ => Err(Errno::EFAULT),
        }
    }

    pub fn u64(&self, addr: u64) -> Result<u64, Errno> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}
