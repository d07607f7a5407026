//! CPython 3.9 to 3.13, x86-64 release builds, on glibc.
//!
//! Per binary (once per file, cached by device and inode): the version, the
//! addresses of `_PyRuntime` and `PyContext_Type`, and the file offsets of the
//! `PyContext` allocators. Per process: the load bias, then a walk of the
//! interpreter's thread states that both finds glibc's thread-specific slot
//! offset and checks that the struct offsets below match this build.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use object::read::ReadCache;

use super::elf::{self, Callee, Elf};
use super::{Interpreter, Mapping, Memory, ProbeTarget, SymbolSource, ThreadLayout, maps};
// Also the error type of this module's `Inspector` for callers that name it here.
pub use super::NotFollowed;

/// Struct offsets of one CPython minor version (x86-64 release builds;
/// checked with gdb against each version's DWARF).
#[derive(Debug)]
struct Offsets {
    /// `_PyRuntime` → the `Py_tss_t` of the thread-state TSS key
    /// (`gilstate.autoTSSkey` before 3.12, `autoTSSkey` after).
    tss: u64,
    /// `_PyRuntime` → `interpreters.head`.
    interp_head: u64,
    /// `PyInterpreterState` → first thread state (`tstate_head`, then `threads.head`).
    tstate_head: u64,
    next: u64,
    thread_id: u64,
    context: u64,
    context_ver: u64,
    interp: u64,
}

#[rustfmt::skip]
const OFFSETS: [((u8, u8), Offsets); 5] = [
    ((3, 9),  Offsets { tss: 0x248, interp_head: 0x20,  tstate_head: 0x8,    next: 0x8, thread_id: 0xb0, context: 0xf0, context_ver: 0xf8, interp: 0x10 }),
    ((3, 10), Offsets { tss: 0x248, interp_head: 0x20,  tstate_head: 0x8,    next: 0x8, thread_id: 0xb0, context: 0xf0, context_ver: 0xf8, interp: 0x10 }),
    ((3, 11), Offsets { tss: 0x250, interp_head: 0x28,  tstate_head: 0x10,   next: 0x8, thread_id: 0x98, context: 0xe0, context_ver: 0xe8, interp: 0x10 }),
    ((3, 12), Offsets { tss: 0x608, interp_head: 0x28,  tstate_head: 0x48,   next: 0x8, thread_id: 0x88, context: 0xd0, context_ver: 0xd8, interp: 0x10 }),
    ((3, 13), Offsets { tss: 0x870, interp_head: 0x278, tstate_head: 0x1cb0, next: 0x8, thread_id: 0x98, context: 0xd0, context_ver: 0xd8, interp: 0x10 }),
];

// One TSTATE_READ-byte read must hold every thread-state field.
const _: () = {
    let mut i = 0;
    while i < OFFSETS.len() {
        let o = &OFFSETS[i].1;
        let fields = [o.next, o.thread_id, o.context, o.context_ver, o.interp];
        let mut f = 0;
        while f < fields.len() {
            assert!(fields[f] as usize + 8 <= TSTATE_READ);
            f += 1;
        }
        i += 1;
    }
};

fn offsets(version: (u8, u8)) -> Option<&'static Offsets> {
    OFFSETS.iter().find(|(v, _)| *v == version).map(|(_, o)| o)
}

/// `Py_tss_t` is `{ int _is_initialized; pthread_key_t _key; }`.
const TSS_KEY_OFF: usize = 4;
/// `PyObject.ob_type`.
const OB_TYPE: u64 = 8;
/// One read covers every thread-state field above.
const TSTATE_READ: usize = 0x100;
/// Bound on the thread-state list walk (also stops a corrupt, looping list).
const MAX_THREADS: usize = 256;
/// glibc keeps keys below 32 in `struct pthread` itself (`specific_1stblock`).
const FIRST_BLOCK_KEYS: u32 = 32;
/// Where `specific_1stblock` may sit in `struct pthread`.
const SPECIFIC_RANGE: std::ops::Range<u64> = 0x100..0x1000;
/// The thread-state walk reads a live process without its lock; a thread
/// starting or ending can make one walk inconsistent, so try again.
const ATTEMPTS: usize = 3;
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// Cached analyses before the cache starts over (each is small; this bounds a
/// host that runs many different binaries).
const MAX_BINARIES: usize = 4096;

/// The allocator every PyContext comes from (also through its freelist
/// neighbours, which live in the same function).
const GC_NEW: &[u8] = b"_PyObject_GC_New";

/// What one interpreter binary says, independent of any process.
#[derive(Debug)]
pub(crate) struct Binary {
    pub version: (u8, u8),
    /// First PT_LOAD address rounded down to a page.
    pub load_page: u64,
    /// Link-time address of `_PyRuntime`.
    pub runtime: u64,
    /// Link-time address of `PyContext_Type`.
    pub context_type: u64,
    /// File offsets of the functions returning a new PyContext.
    pub allocators: Vec<u64>,
    /// Link-time addresses of the same functions (checked by the tests).
    #[cfg_attr(not(test), allow(dead_code))]
    pub allocator_addrs: Vec<u64>,
    pub symbols: SymbolSource,
    /// Time spent finding the allocators (printed by the tests).
    #[cfg_attr(not(test), allow(dead_code))]
    pub scan: Duration,
}

/// The analysis of one mapped file.
#[derive(Debug, Clone)]
pub(crate) enum Analysis {
    /// Does not define `_PyRuntime`.
    NotRuntime,
    Runtime(Result<Arc<Binary>, NotFollowed>),
}

/// Analyses of files by (st_dev, st_ino), so a second process on the same
/// interpreter costs only its memory reads.
#[derive(Debug, Default)]
struct Binaries {
    entries: HashMap<(u64, u64), Entry>,
}

#[derive(Debug)]
struct Entry {
    /// Size and mtime: a file rewritten in place, or a new file reusing a
    /// freed inode number, is analysed again.
    stamp: (u64, i64, i64),
    analysis: Analysis,
}

impl Binaries {
    fn get(&mut self, file: File, name: &str) -> std::io::Result<((u64, u64), Analysis)> {
        let md = file.metadata()?;
        let key = (md.dev(), md.ino());
        let stamp = (md.size(), md.mtime(), md.mtime_nsec());
        if let Some(e) = self.entries.get(&key).filter(|e| e.stamp == stamp) {
            return Ok((key, e.analysis.clone()));
        }
        let analysis = analyse(file, name);
        if self.entries.len() >= MAX_BINARIES {
            self.entries.clear();
        }
        let entry = Entry {
            stamp,
            analysis: analysis.clone(),
        };
        self.entries.insert(key, entry);
        Ok((key, analysis))
    }
}

/// Finds and checks CPython interpreters in processes, caching the
/// per-binary analysis.
#[derive(Debug, Default)]
pub struct Inspector {
    binaries: Binaries,
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

impl Inspector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `pid` runs a CPython the agent can follow, and what the
    /// kernel needs to follow it. `NotInitialised` means: try again later.
    pub fn inspect(&mut self, pid: u32) -> Result<Interpreter, NotFollowed> {
        let maps = maps(pid)?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|p| {
                p.to_string_lossy()
                    .trim_end_matches(" (deleted)")
                    .to_string()
            });
        // The runtime is in the executable (static builds, Debian's) or in a
        // libpython (--enable-shared, embedders such as uwsgi).
        let mut candidates: Vec<&str> = Vec::new();
        for m in &maps {
            let is_exe = exe.as_deref() == Some(m.path.as_str());
            if (is_exe || basename(&m.path).starts_with("libpython"))
                && !candidates.contains(&m.path.as_str())
            {
                candidates.push(&m.path);
            }
        }
        candidates.sort_by_key(|p| exe.as_deref() != Some(*p));

        let mut io_error = None;
        for path in &candidates {
            let full = PathBuf::from(format!("/proc/{pid}/root{path}"));
            let file = match File::open(&full) {
                Ok(f) => f,
                Err(e) => {
                    io_error.get_or_insert(NotFollowed::Io(format!("{}: {e}", full.display())));
                    continue;
                }
            };
            let (key, analysis) = self
                .binaries
                .get(file, basename(path))
                .map_err(|e| NotFollowed::Io(format!("{}: {e}", full.display())))?;
            match analysis {
                Analysis::NotRuntime => continue,
                Analysis::Runtime(bin) => return follow(pid, &maps, path, full, key, &*bin?),
            }
        }
        if let Some(e) = io_error {
            return Err(e);
        }
        match candidates
            .iter()
            .find_map(|p| version_from_name(basename(p)))
        {
            // Pythons before 3.7 have no _PyRuntime: say which one it is.
            Some(v) if v < (3, 7) => Err(version_error(v)),
            // A launcher that has not mapped its libpython yet (just exec'd).
            Some(_) => Err(NotFollowed::NotInitialised),
            None => Err(NotFollowed::NotPython),
        }
    }
}

/// The process side: load bias, thread layout, and the probe target.
fn follow(
    pid: u32,
    maps: &[Mapping],
    path: &str,
    full: PathBuf,
    file: (u64, u64),
    bin: &Binary,
) -> Result<Interpreter, NotFollowed> {
    let start = maps
        .iter()
        .filter(|m| m.path == path && m.offset == 0)
        .map(|m| m.start)
        .min()
        .ok_or_else(|| NotFollowed::Unsupported(format!("{path} is not mapped from its start")))?;
    let bias = start.wrapping_sub(bin.load_page);
    let off = offsets(bin.version).ok_or_else(|| version_error(bin.version))?;
    let mem = Memory::new(pid);
    let mut result = thread_layout(pid, mem, bin, off, bias);
    for _ in 1..ATTEMPTS {
        match result {
            Err(NotFollowed::Unsupported(_)) => {
                std::thread::sleep(RETRY_PAUSE);
                result = thread_layout(pid, mem, bin, off, bias);
            }
            _ => break,
        }
    }
    Ok(Interpreter {
        pid,
        version: bin.version,
        layout: result?,
        probes: ProbeTarget {
            path: full,
            file,
            offsets: bin.allocators.clone(),
        },
        symbols: bin.symbols,
    })
}

fn mem_error(pid: u32, e: Errno, what: &str, addr: u64) -> NotFollowed {
    match e {
        Errno::ESRCH => NotFollowed::Io(format!("process {pid} exited")),
        Errno::EPERM => NotFollowed::Io(format!(
            "not permitted to read process {pid}'s memory (needs CAP_SYS_PTRACE)"
        )),
        _ => NotFollowed::Unsupported(format!("cannot read {what} at {addr:#x}: {e}")),
    }
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

/// Reads the TSS key and walks the thread states of the (most recent)
/// interpreter, checking each against this version's offsets, then finds
/// glibc's `specific_1stblock` offset from where the threads keep them.
fn thread_layout(
    pid: u32,
    mem: Memory,
    bin: &Binary,
    off: &Offsets,
    bias: u64,
) -> Result<ThreadLayout, NotFollowed> {
    let (major, minor) = bin.version;
    let rt = bias.wrapping_add(bin.runtime);
    let mut tss = [0u8; 8];
    mem.read(rt.wrapping_add(off.tss), &mut tss)
        .map_err(|e| mem_error(pid, e, "_PyRuntime", rt))?;
    let initialised = i32::from_le_bytes(tss[..TSS_KEY_OFF].try_into().unwrap_or_default());
    let key = u32::from_le_bytes(tss[TSS_KEY_OFF..].try_into().unwrap_or_default());
    let head = mem
        .u64(rt.wrapping_add(off.interp_head))
        .map_err(|e| mem_error(pid, e, "_PyRuntime", rt))?;
    if head == 0 {
        return Err(NotFollowed::NotInitialised);
    }
    // The key is created first thing (_PyRuntimeState_Init), before any
    // interpreter: an interpreter without it means these are not the offsets.
    if initialised != 1 {
        return Err(NotFollowed::Unsupported(format!(
            "_PyRuntime has an interpreter but no thread-state key: not the _PyRuntime layout of CPython {major}.{minor}"
        )));
    }
    if key >= FIRST_BLOCK_KEYS {
        return Err(NotFollowed::Unsupported(format!(
            "the thread-state TSS key is {key}: only keys below {FIRST_BLOCK_KEYS} are stored in the thread itself"
        )));
    }
    let context_type = bias.wrapping_add(bin.context_type);

    // thread id (struct pthread address) → its thread states
    let mut threads: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut seen = HashSet::new();
    let mut block = [0u8; TSTATE_READ];
    let mut t = mem
        .u64(head.wrapping_add(off.tstate_head))
        .map_err(|e| mem_error(pid, e, "the interpreter state", head))?;
    while t != 0 && seen.len() < MAX_THREADS {
        if !seen.insert(t) {
            return Err(NotFollowed::Unsupported(
                "the thread-state list loops".into(),
            ));
        }
        mem.read(t, &mut block)
            .map_err(|e| mem_error(pid, e, "a thread state", t))?;
        let field = |o: u64| le64(&block, o as usize);
        if field(off.interp) != head {
            return Err(NotFollowed::Unsupported(format!(
                "thread state {t:#x} does not point back to its interpreter: not the PyThreadState layout of CPython {major}.{minor}"
            )));
        }
        let context = field(off.context);
        if context != 0 {
            let ty = mem
                .u64(context.wrapping_add(OB_TYPE))
                .map_err(|e| mem_error(pid, e, "a thread's context", context))?;
            if ty != context_type {
                return Err(NotFollowed::Unsupported(format!(
                    "thread state {t:#x} holds {context:#x}, not a PyContext: not the PyThreadState layout of CPython {major}.{minor}"
                )));
            }
        }
        // 0: a thread state whose thread has not started yet (3.12+).
        if field(off.thread_id) != 0 {
            threads.entry(field(off.thread_id)).or_default().push(t);
        }
        t = field(off.next);
    }
    if threads.is_empty() {
        return Err(NotFollowed::NotInitialised);
    }
    Ok(ThreadLayout {
        key,
        specific_off: specific_offset(pid, mem, key, &threads)?,
        unit_off: off.context as u32,
        seq_off: off.context_ver as u32,
        unit_type: context_type,
    })
}

/// glibc's `offsetof(struct pthread, specific_1stblock)`, which differs
/// between glibc builds: the one offset in [`SPECIFIC_RANGE`] at which, for
/// every thread, slot `key` = `{seq, data}` holds an in-use sequence number
/// (odd) and one of that thread's thread states. A thread may own several
/// thread states (one pre-allocated for a thread it is starting); the TSS
/// holds the one it runs. A thread with no such slot anywhere is left out: a
/// thread state leaked by a thread that exited (its TSS cleared, its stack
/// perhaps unmapped) must not make the whole process unfollowable.
fn specific_offset(
    pid: u32,
    mem: Memory,
    key: u32,
    threads: &BTreeMap<u64, Vec<u64>>,
) -> Result<u32, NotFollowed> {
    let span = (SPECIFIC_RANGE.end - SPECIFIC_RANGE.start) as usize;
    let mut alive = vec![true; span / 8];
    let mut matches = vec![false; span / 8];
    let mut block = vec![0u8; span + 8];
    let first = SPECIFIC_RANGE.start + 16 * u64::from(key);
    let mut counted = 0;
    for (&thread, tstates) in threads {
        // struct pthread may end before the block does (a thread's TCB sits
        // at the top of its stack mapping): use what could be read.
        let at = thread.wrapping_add(first);
        let got = match mem.read_partial(at, &mut block) {
            Ok(n) => n,
            Err(Errno::EFAULT | Errno::EINVAL) => 0,
            Err(e) => return Err(mem_error(pid, e, "a thread's struct pthread", at)),
        };
        for (i, m) in matches.iter_mut().enumerate() {
            let at = i * 8;
            *m = at + 16 <= got
                && le64(&block, at) & 1 == 1
                && tstates.contains(&le64(&block, at + 8));
        }
        if matches.iter().any(|&m| m) {
            counted += 1;
            alive.iter_mut().zip(&matches).for_each(|(a, &m)| *a &= m);
        }
    }
    let found: Vec<u64> = alive
        .iter()
        .enumerate()
        .filter(|&(_, &a)| a && counted > 0)
        .map(|(i, _)| SPECIFIC_RANGE.start + 8 * i as u64)
        .collect();
    match found[..] {
        [o] => Ok(o as u32),
        [] => Err(NotFollowed::Unsupported(match counted {
            0 => "no thread keeps its thread state in a glibc thread-specific slot (not glibc?)"
                .into(),
            _ => "the threads disagree on where glibc keeps thread-specific data".into(),
        })),
        _ => Err(NotFollowed::Unsupported(format!(
            "{} places in struct pthread could be glibc's thread-specific slots",
            found.len()
        ))),
    }
}

fn version_error((major, minor): (u8, u8)) -> NotFollowed {
    NotFollowed::Version(format!("{major}.{minor}"))
}

/// `python3.11`, `libpython3.11.so.1.0`, `libpython3.13d.so` → (3, 11) …
pub(crate) fn version_from_name(name: &str) -> Option<(u8, u8)> {
    let rest = &name[name.find("python")? + "python".len()..];
    let (major, rest) = rest.split_once('.')?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    Some((major.parse().ok()?, rest[..digits].parse().ok()?))
}

/// The thread layout of `pid` (running `bin`, mapped from `path`) read with
/// another version's offsets: what a wrong offset table would give.
#[cfg(test)]
pub(crate) fn layout_with(
    pid: u32,
    path: &str,
    bin: &Binary,
    version: (u8, u8),
) -> Result<ThreadLayout, NotFollowed> {
    let start = maps(pid)?
        .iter()
        .filter(|m| m.path == path && m.offset == 0)
        .map(|m| m.start)
        .min()
        .ok_or(NotFollowed::NotPython)?;
    let off = offsets(version).ok_or_else(|| version_error(version))?;
    thread_layout(pid, Memory::new(pid), bin, off, start - bin.load_page)
}

/// Analyses a file by path (tests, tools).
#[cfg(test)]
pub(crate) fn analyse_path(path: &std::path::Path) -> std::io::Result<Analysis> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(analyse(File::open(path)?, &name))
}

fn analyse(file: File, name: &str) -> Analysis {
    let data = ReadCache::new(file);
    // Not an ELF file we read (a script, another architecture): no runtime here.
    let Ok(elf) = Elf::parse(&data) else {
        return Analysis::NotRuntime;
    };
    // .symtab only for files named like Python (a static build that exports
    // nothing): every other executable is answered from .dynsym alone.
    let runtime = match name.contains("python") {
        true => elf.symbol("_PyRuntime"),
        false => elf.dynamic_symbol("_PyRuntime"),
    };
    let Some(runtime) = runtime else {
        return Analysis::NotRuntime;
    };
    Analysis::Runtime(runtime_binary(&elf, runtime.value, name).map(Arc::new))
}

/// The version from the exported `Py_Version` (3.11+), else from the file name.
fn version(elf: &Elf<'_>, name: &str) -> Result<(u8, u8), NotFollowed> {
    let exported = elf
        .symbol("Py_Version")
        .and_then(|s| elf.read_vaddr(s.value, 4))
        .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
        .map(|hex| ((hex >> 24) as u8, (hex >> 16) as u8));
    exported.or_else(|| version_from_name(name)).ok_or_else(|| {
        NotFollowed::Unsupported(format!("cannot tell the Python version of {name}"))
    })
}

fn runtime_binary(elf: &Elf<'_>, runtime: u64, name: &str) -> Result<Binary, NotFollowed> {
    let version = version(elf, name)?;
    if offsets(version).is_none() {
        return Err(version_error(version));
    }
    let context_type = elf
        .symbol("PyContext_Type")
        .ok_or_else(|| NotFollowed::Unsupported(format!("{name} does not export PyContext_Type")))?
        .value;
    let started = Instant::now();
    let (allocator_addrs, symbols) = allocators(elf, context_type)?;
    let allocators = allocator_addrs
        .iter()
        .map(|&a| {
            elf.file_offset(a).ok_or_else(|| {
                NotFollowed::Unsupported(format!("allocator {a:#x} is outside the file's segments"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let scan = started.elapsed();
    log::debug!(
        "{name}: CPython {}.{}, PyContext allocators at {allocator_addrs:#x?} ({symbols:?}), found in {scan:?}",
        version.0,
        version.1
    );
    Ok(Binary {
        version,
        load_page: elf.first_load_page(),
        runtime,
        context_type,
        allocators,
        allocator_addrs,
        symbols,
        scan,
    })
}

/// The functions that return a new PyContext: those enclosing a call with
/// `&PyContext_Type` as first argument to `_PyObject_GC_New` or to a function
/// without a name (an LTO-private allocator). Calls to other named functions
/// with that argument (`PyType_Ready(&PyContext_Type)`) are not allocations.
fn allocators(elf: &Elf<'_>, context_type: u64) -> Result<(Vec<u64>, SymbolSource), NotFollowed> {
    let slots = elf.slots_holding("PyContext_Type", context_type);
    let code = elf.code();
    let scan = elf::scan(&code, context_type, &slots);
    let slot_names = elf.slot_symbols();
    let names = elf.function_names();
    let callee_name = |c: Callee| -> Option<&[u8]> {
        match c {
            Callee::Direct(a) => names.get(&a).copied().or_else(|| {
                elf.in_plt(a)
                    .then(|| elf::plt_slot(elf, a))
                    .flatten()
                    .and_then(|s| slot_names.get(&s).copied())
            }),
            Callee::Slot(s) => slot_names.get(&s).copied(),
            Callee::Other => None,
        }
    };
    let sites: Vec<u64> = scan
        .sites
        .iter()
        .filter(|s| callee_name(s.callee).is_none_or(|n| n == GC_NEW))
        .map(|s| s.at)
        .collect();
    if sites.is_empty() {
        return Err(NotFollowed::Unsupported(
            "no PyContext allocation found".into(),
        ));
    }

    let mut source = if elf.has_symtab() {
        SymbolSource::Symtab
    } else {
        SymbolSource::DynsymAndCode
    };
    let mut entries: Option<Vec<u64>> = None;
    let mut functions = Vec::with_capacity(sites.len());
    for site in sites {
        if let Some(f) = elf.symtab_function_at(site) {
            functions.push(f);
            continue;
        }
        source = SymbolSource::DynsymAndCode;
        // Function entries the binary still tells without .symtab.
        let entries = entries.get_or_insert_with(|| {
            let mut e = scan.call_targets.clone();
            e.extend(elf.dynsym_functions());
            e.sort_unstable();
            e.dedup();
            e
        });
        let f = match entries.partition_point(|&e| e <= site) {
            0 => {
                return Err(NotFollowed::Unsupported(format!(
                    "no function entry before the PyContext allocation at {site:#x}"
                )));
            }
            n => entries[n - 1],
        };
        functions.push(f);
    }
    functions.sort_unstable();
    functions.dedup();
    Ok((functions, source))
}
