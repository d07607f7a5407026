//! Where in a function its uprobes go: past a CET `endbr64` when the
//! instruction after it is one the kernel emulates.
//!
//! A uprobe swaps the probed instruction for a breakpoint. When a thread
//! hits it, the kernel runs the programs and then has to carry out the
//! instruction it replaced: it emulates a few (register pushes, jumps,
//! calls, nops) and runs any other from a copy in a single step, a second
//! trap that in a VM costs more than the hit itself (about 5.5 µs against
//! 2.4 µs here, `bench/results/uprobe-trap.md`).
//!
//! Distributions built with control-flow protection (`-fcf-protection`:
//! Ubuntu, Fedora, RHEL 9 and their derivatives) begin every function
//! that may be called through a pointer with `endbr64`, which is not
//! emulated. `endbr64` touches no register, flag or memory, so the next
//! instruction sees the function's entry state: the arguments in their
//! registers and the return address on top of the stack. Entry and return
//! probes work there as at the entry. The probe moves only where that next
//! instruction is a push the kernel emulates (every kernel the agent
//! supports does, `push_setup_xol_ops`); anywhere else both places pay the
//! single step, and the entry stays.

use std::{io, os::unix::fs::FileExt, path::Path};

/// `endbr64`.
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// Where a probe for a function goes: `skipped` bytes past its entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Site {
    /// The file offset to probe.
    pub offset: u64,
    /// Bytes skipped past the entry: 0, or 4 for an `endbr64`.
    pub skipped: u64,
}

impl Site {
    /// The site for a function whose code at file offset `entry` begins
    /// with `code` (its first bytes; too few to hold the instruction after
    /// an `endbr64` leave it at the entry).
    pub fn of(entry: u64, code: &[u8]) -> Self {
        let skipped = match code {
            [a, b, c, d, rest @ ..] if [*a, *b, *c, *d] == ENDBR64 && emulated_push(rest) => 4,
            _ => 0,
        };
        Self {
            offset: entry + skipped,
            skipped,
        }
    }

    /// The site for the function at file offset `entry` of `file`, read
    /// from the file. A file that cannot be read there keeps the entry:
    /// the attach that follows reports what is wrong with it.
    pub fn in_file(file: &Path, entry: u64) -> Self {
        let read = || -> io::Result<[u8; 6]> {
            let mut code = [0; 6];
            std::fs::File::open(file)?.read_exact_at(&mut code, entry)?;
            Ok(code)
        };
        match read() {
            Ok(code) => Self::of(entry, &code),
            Err(_) => Self::of(entry, &[]),
        }
    }
}

/// Whether `code` begins with a push of a 64-bit register: `50+r`, or
/// `41 50+r` for r8 to r15 (the only REX prefix the kernel emulates).
fn emulated_push(code: &[u8]) -> bool {
    let push = |op: u8| (0x50..=0x57).contains(&op);
    match code {
        [0x41, op, ..] => push(*op),
        [op, ..] => push(*op),
        [] => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endbr64_then_a_push_moves_the_probe_past_it() {
        // Ubuntu 22.04's libssl, ssl_read_internal: endbr64; push %r12.
        let ubuntu = [0xf3, 0x0f, 0x1e, 0xfa, 0x41, 0x54, 0x48, 0x83];
        assert_eq!(
            Site::of(0x32b00, &ubuntu),
            Site {
                offset: 0x32b04,
                skipped: 4
            }
        );
        // endbr64; push %rbp.
        let rbp = [0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48];
        assert_eq!(Site::of(0x1000, &rbp).offset, 0x1004);
        for r in 0x50..=0x57 {
            assert_eq!(Site::of(0, &[0xf3, 0x0f, 0x1e, 0xfa, r, 0]).skipped, 4);
            assert_eq!(Site::of(0, &[0xf3, 0x0f, 0x1e, 0xfa, 0x41, r]).skipped, 4);
        }
    }

    #[test]
    fn the_probe_stays_at_the_entry_otherwise() {
        let cases: [(&str, &[u8]); 8] = [
            // Debian's libssl, ssl_read_internal: push %r12, no endbr64.
            (
                "push without endbr64",
                &[0x41, 0x54, 0x48, 0x83, 0xec, 0x50],
            ),
            // Ubuntu's SSL_read: endbr64; sub $0x18,%rsp (stepped anyway).
            ("endbr64; sub", &[0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x83]),
            // endbr64; test %rdi,%rdi (SSL_free).
            ("endbr64; test", &[0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x85]),
            // push %rax with a REX.W prefix is not what the kernel emulates.
            ("endbr64; rex.w push", &[0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x50]),
            (
                "endbr64; rex.b other",
                &[0xf3, 0x0f, 0x1e, 0xfa, 0x41, 0x89],
            ),
            ("endbr64 alone", &[0xf3, 0x0f, 0x1e, 0xfa]),
            ("endbr32", &[0xf3, 0x0f, 0x1e, 0xfb, 0x55, 0x48]),
            ("nothing read", &[]),
        ];
        for (what, code) in cases {
            assert_eq!(
                Site::of(0x40, code),
                Site {
                    offset: 0x40,
                    skipped: 0
                },
                "{what}"
            );
        }
    }

    #[test]
    fn a_site_is_read_from_the_file_and_an_unreadable_one_stays() {
        let dir = std::env::temp_dir().join(format!("zerotrace-site-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lib.so");
        let mut bytes = vec![0xcc; 64];
        bytes[32..38].copy_from_slice(&[0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48]);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(Site::in_file(&path, 32).offset, 36);
        assert_eq!(Site::in_file(&path, 0).offset, 0);
        // Past the end, and a file that is not there.
        assert_eq!(Site::in_file(&path, 60).offset, 60);
        assert_eq!(Site::in_file(&dir.join("gone"), 32).offset, 32);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
