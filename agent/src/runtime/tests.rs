//! Against real interpreters on this machine: each test skips (with a note)
//! the interpreters that are not installed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::cpython::{Analysis, Binary, analyse_path};
use super::*;

/// (executable, file holding the runtime, version)
const PYTHONS: &[(&str, &str, (u8, u8))] = &[
    (
        "/root/.pyenv/versions/3.9.18/bin/python3.9",
        "/root/.pyenv/versions/3.9.18/lib/libpython3.9.so.1.0",
        (3, 9),
    ),
    (
        "/root/.pyenv/versions/3.10.13/bin/python3.10",
        "/root/.pyenv/versions/3.10.13/lib/libpython3.10.so.1.0",
        (3, 10),
    ),
    (
        "/root/.pyenv/versions/3.11.7/bin/python3.11",
        "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0",
        (3, 11),
    ),
    (
        "/root/.pyenv/versions/3.12.1/bin/python3.12",
        "/root/.pyenv/versions/3.12.1/lib/libpython3.12.so.1.0",
        (3, 12),
    ),
    (
        "/root/.pyenv/versions/3.13.0/bin/python3.13",
        "/root/.pyenv/versions/3.13.0/lib/libpython3.13.so.1.0",
        (3, 13),
    ),
    ("/usr/bin/python3.11", "/usr/bin/python3.11", (3, 11)),
];

/// Debian's python3.11 (non-PIE, no .symtab): its one allocator is the
/// unnamed, LTO-private `_context_alloc` at 0x6937a0, in the R E segment
/// that maps file offset 0x1f000 at 0x41f000.
const DEBIAN: &str = "/usr/bin/python3.11";
const DEBIAN_ALLOC: u64 = 0x6937a0;
const DEBIAN_ALLOC_OFFSET: u64 = 0x6937a0 - 0x41f000 + 0x1f000;

const SCRIPT: &str = "import threading,time,contextvars; contextvars.copy_context(); \
    [threading.Thread(target=time.sleep,args=(30,)).start() for _ in range(3)]; time.sleep(30)";

/// Kills and reaps the child when the test ends, passing or not.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(program: &str, args: &[&str]) -> Guard {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    Guard(child)
}

fn installed(path: &str) -> bool {
    let there = Path::new(path).exists();
    if !there {
        println!("skipped: {path} is not installed");
    }
    there
}

fn binary(path: &str) -> std::sync::Arc<Binary> {
    match analyse_path(Path::new(path)).unwrap() {
        Analysis::Runtime(Ok(b)) => b,
        other => panic!("{path}: {other:?}"),
    }
}

#[test]
fn finds_allocators_in_each_binary() {
    for &(_, lib, version) in PYTHONS {
        if !installed(lib) {
            continue;
        }
        let b = binary(lib);
        println!(
            "{lib}: {}.{} {:?} allocators at {:#x?} (file offsets {:#x?}), scan {:?}",
            b.version.0, b.version.1, b.symbols, b.allocator_addrs, b.allocators, b.scan
        );
        assert_eq!(b.version, version, "{lib}");
        assert!(!b.allocators.is_empty(), "{lib}");
        if lib == DEBIAN {
            assert_eq!(b.symbols, SymbolSource::DynsymAndCode);
            assert_eq!(b.allocator_addrs, [DEBIAN_ALLOC]);
            assert_eq!(b.allocators, [DEBIAN_ALLOC_OFFSET]);
        } else {
            assert_eq!(b.symbols, SymbolSource::Symtab, "{lib}");
        }
    }
}

/// The tiny pyenv launcher and a non-Python binary hold no runtime.
#[test]
fn other_binaries_hold_no_runtime() {
    for path in ["/bin/sleep", PYTHONS[2].0] {
        if installed(path) {
            assert!(
                matches!(analyse_path(Path::new(path)).unwrap(), Analysis::NotRuntime),
                "{path}"
            );
        }
    }
}

#[test]
fn version_from_file_names() {
    use super::cpython::version_from_name as v;
    assert_eq!(v("python3.11"), Some((3, 11)));
    assert_eq!(v("libpython3.9.so.1.0"), Some((3, 9)));
    assert_eq!(v("libpython3.13d.so"), Some((3, 13)));
    assert_eq!(v("python2.7"), Some((2, 7)));
    assert_eq!(v("python3"), None);
    assert_eq!(v("uwsgi"), None);
}

#[test]
fn maps_lines() {
    let m = parse_maps_line("7f1c2a000000-7f1c2a010000 r-xp 00001000 08:01 1234   /usr/lib/a b.so")
        .unwrap();
    assert_eq!(
        (m.start, m.offset, m.inode, m.path.as_str()),
        (0x7f1c2a000000, 0x1000, 1234, "/usr/lib/a b.so")
    );
    assert_eq!(
        parse_maps_line("7ffd000-7ffe000 rw-p 00000000 00:00 0   [stack]"),
        None
    );
    assert_eq!(parse_maps_line("garbage"), None);
}

/// The fsbase of one thread of a child, through a ptrace interrupt: the
/// kernel's own view of the register the layout starts from.
fn fs_base(tid: i32) -> Option<u64> {
    // SAFETY: plain ptrace calls on a child thread; `regs` is a local the
    // kernel fills; the thread is always detached again.
    unsafe {
        if libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) != 0 {
            return None;
        }
        libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0);
        let mut status = 0;
        libc::waitpid(tid, &mut status, libc::__WALL);
        let mut regs: libc::user_regs_struct = std::mem::zeroed();
        let ok = libc::ptrace(libc::PTRACE_GETREGS, tid, 0, &mut regs as *mut _) == 0;
        libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0);
        ok.then_some(regs.fs_base)
    }
}

fn tasks(pid: u32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Polls until the interpreter is followed and its three threads run.
fn wait_followed(inspector: &mut Inspector, pid: u32) -> Interpreter {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = inspector.inspect(pid);
        match r {
            Ok(i) if tasks(pid).len() >= 4 => return i,
            Ok(_) | Err(NotFollowed::NotPython | NotFollowed::NotInitialised)
                if Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => panic!("pid {pid}: {other:?}"),
        }
    }
}

#[test]
fn follows_real_interpreters() {
    let mut inspector = Inspector::new();
    let mut specific = Vec::new();
    for &(exe, lib, version) in PYTHONS {
        if !installed(exe) {
            continue;
        }
        let child = spawn(exe, &["-c", SCRIPT]);
        let pid = child.0.id();
        let i = wait_followed(&mut inspector, pid);
        println!("{exe}: {i:?}");
        assert_eq!(i.pid, pid);
        assert_eq!(i.version, version, "{exe}");
        assert!(i.layout.key < 32, "{exe}");
        assert!(!i.probes.offsets.is_empty(), "{exe}");
        specific.push(i.layout.specific_off);

        // The probe target is the runtime file, seen through the process's root.
        assert_eq!(
            i.probes.path,
            PathBuf::from(format!("/proc/{pid}/root{lib}"))
        );
        let md = std::fs::metadata(&i.probes.path).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(i.probes.file, (md.dev(), md.ino()));
        let b = binary(lib);
        assert_eq!(i.probes.offsets, b.allocators);
        assert_eq!(i.symbols, b.symbols);
        if exe == DEBIAN {
            assert_eq!(i.probes.offsets, [DEBIAN_ALLOC_OFFSET]);
        }

        // Follow the layout the way the kernel will, from each thread's fsbase.
        let start = maps(pid)
            .unwrap()
            .into_iter()
            .filter(|m| m.path == lib && m.offset == 0)
            .map(|m| m.start)
            .min()
            .unwrap();
        let context_type = start - b.load_page + b.context_type;
        let mem = Memory::new(pid);
        let l = i.layout;
        for tid in tasks(pid) {
            let fs = fs_base(tid).unwrap_or_else(|| panic!("{exe}: ptrace {tid}"));
            let tstate = mem
                .u64(fs + u64::from(l.specific_off) + 16 * u64::from(l.key) + 8)
                .unwrap();
            assert_ne!(tstate, 0, "{exe}: thread {tid} has no thread state");
            let unit = mem.u64(tstate + u64::from(l.unit_off)).unwrap();
            let mut seq = [0u8; 4];
            mem.read(tstate + u64::from(l.seq_off), &mut seq).unwrap();
            if tid as u32 == pid {
                // copy_context() gave the main thread its context.
                assert_ne!(unit, 0, "{exe}: main thread has no context");
            }
            if unit != 0 {
                assert_eq!(
                    mem.u64(unit + 8).unwrap(),
                    context_type,
                    "{exe}: thread {tid}"
                );
            }
        }

        // A second process on the same file reuses the analysis.
        let again = inspector.inspect(pid).unwrap();
        assert_eq!(again.probes, i.probes);
        assert_eq!(again.layout, i.layout);
    }
    println!("specific_off: {specific:#x?}");
    assert!(
        specific.windows(2).all(|w| w[0] == w[1]),
        "one glibc, one offset: {specific:#x?}"
    );
}

#[test]
fn other_processes_give_clean_errors() {
    let sleep = spawn("sleep", &["30"]);
    // Give it time to exec (before that it is a copy of this test binary).
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(inspect(sleep.0.id()).err(), Some(NotFollowed::NotPython));

    // Exited and reaped: gone from /proc.
    let mut done = Command::new("true").spawn().unwrap();
    let pid = done.id();
    done.wait().unwrap();
    assert!(
        matches!(inspect(pid), Err(NotFollowed::Io(_))),
        "{:?}",
        inspect(pid)
    );

    // Starting: every answer on the way is a clean one.
    for &(exe, _, _) in PYTHONS {
        if !installed(exe) {
            continue;
        }
        let child = spawn(exe, &["-c", SCRIPT]);
        let mut inspector = Inspector::new();
        let deadline = Instant::now() + Duration::from_millis(300);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            let r = inspector.inspect(child.0.id()).map(|i| i.version);
            if seen.last() != Some(&r) {
                seen.push(r.clone());
            }
            match r {
                Ok(_) | Err(NotFollowed::NotPython | NotFollowed::NotInitialised) => {}
                Err(e) => panic!("{exe} while starting: {e}"),
            }
        }
        println!("{exe} while starting: {seen:?}");
    }
}

/// Every process on this machine (kernel threads, this test, whatever runs):
/// an answer each, never a panic.
#[test]
fn every_process_gets_an_answer() {
    let mut inspector = Inspector::new();
    let mut answers = std::collections::BTreeMap::<String, usize>::new();
    for pid in std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
    {
        let kind = match inspector.inspect(pid) {
            Ok(i) => format!("Ok {}.{}", i.version.0, i.version.1),
            Err(e) => format!("{e:?}")
                .split('(')
                .next()
                .unwrap_or_default()
                .to_owned(),
        };
        *answers.entry(kind).or_default() += 1;
    }
    println!("{answers:?}");
    assert!(answers.contains_key("NotPython"));
}

/// The checks on the live thread states catch a wrong offset table: each
/// interpreter read with every other version's offsets is refused.
#[test]
fn wrong_offsets_are_refused() {
    for &(exe, lib, version) in PYTHONS {
        if !installed(exe) {
            continue;
        }
        let child = spawn(exe, &["-c", SCRIPT]);
        let pid = child.0.id();
        wait_followed(&mut Inspector::new(), pid);
        let b = binary(lib);
        for &(_, _, other) in PYTHONS {
            let r = super::cpython::layout_with(pid, lib, &b, other);
            println!("{exe} read as {other:?}: {r:?}");
            match other == version {
                true => assert!(r.is_ok(), "{exe}: {r:?}"),
                // 3.9 and 3.10 share one layout.
                false
                    if [version, other] == [(3, 9), (3, 10)]
                        || [version, other] == [(3, 10), (3, 9)] =>
                {
                    assert!(r.is_ok(), "{exe} as {other:?}: {r:?}")
                }
                false => assert!(
                    matches!(
                        r,
                        Err(NotFollowed::Unsupported(_) | NotFollowed::NotInitialised)
                    ),
                    "{exe} read as {other:?}: {r:?}"
                ),
            }
        }
    }
}
