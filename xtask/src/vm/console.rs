//! The guest's serial console: the `ZT-VMTEST` lines the guest check prints,
//! and the kernel's own reports of a hang or a crash (soft lockup, RCU stall,
//! `BUG:`, Oops, panic), which fail the running cell at once instead of
//! waiting for the boot's time limit.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::mpsc;

/// Console lines the guest prints start with this.
pub const MARK: &str = "ZT-VMTEST ";
pub const LOG_MARK: &str = "ZT-VMTEST-LOG ";

/// One cell as the guest reported it.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    pub kernel: String,
    pub path: String,
    pub transport: String,
    pub pass: bool,
    pub detail: String,
}

/// What one guest printed that the host acts on.
#[derive(Debug, PartialEq)]
pub enum Guest {
    Boot(String),
    Info(String),
    Start {
        path: String,
        transport: String,
    },
    /// The guest moved on to another step of a cell (or `check` before them).
    Step {
        path: String,
        transport: String,
        step: String,
    },
    Cell(Cell),
    Log {
        path: String,
        transport: String,
        line: String,
    },
    Error(String),
    Exit(String),
    Done,
}

/// `key=value` pairs up to (not including) `detail=`, and the detail.
fn fields(s: &str) -> (BTreeMap<&str, &str>, &str) {
    let (head, detail) = match s.find("detail=") {
        Some(i) => (&s[..i], &s[i + "detail=".len()..]),
        None => (s, ""),
    };
    let map = head
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    (map, detail.trim())
}

/// Parses one console line (kernel messages may share the line).
pub fn parse_line(line: &str) -> Option<Guest> {
    if let Some(i) = line.find(LOG_MARK) {
        let rest = &line[i + LOG_MARK.len()..];
        let (head, text) = rest.split_once(" | ").unwrap_or((rest, ""));
        let (f, _) = fields(head);
        return Some(Guest::Log {
            path: f.get("path")?.to_string(),
            transport: f.get("transport")?.to_string(),
            line: text.to_string(),
        });
    }
    let rest = &line[line.find(MARK)? + MARK.len()..];
    let (word, args) = rest.split_once(' ').unwrap_or((rest, ""));
    Some(match word {
        "boot" => Guest::Boot(args.to_string()),
        "info" => Guest::Info(args.to_string()),
        "error" => Guest::Error(args.to_string()),
        "guest-exit" => Guest::Exit(args.to_string()),
        "done" => Guest::Done,
        "start" => {
            let (f, _) = fields(args);
            Guest::Start {
                path: f.get("path")?.to_string(),
                transport: f.get("transport")?.to_string(),
            }
        }
        "step" => {
            let (f, _) = fields(args);
            Guest::Step {
                path: f.get("path")?.to_string(),
                transport: f.get("transport")?.to_string(),
                step: f.get("step")?.to_string(),
            }
        }
        _ => {
            let (f, detail) = fields(rest);
            Guest::Cell(Cell {
                kernel: f.get("kernel")?.to_string(),
                path: f.get("path")?.to_string(),
                transport: f.get("transport")?.to_string(),
                pass: *f.get("result")? == "PASS",
                detail: detail.to_string(),
            })
        }
    })
}

/// The text of a kernel message: what follows the last `[ seconds.micros] `
/// stamp on the line (the guest's output may precede it on the same line).
/// Lines without a stamp are not the kernel's.
pub fn kernel_message(line: &str) -> Option<&str> {
    let mut found = None;
    let mut rest = line;
    let mut offset = 0;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        if let Some(close) = after.find("] ") {
            let stamp = after[..close].trim_start();
            let is_stamp = stamp.split_once('.').is_some_and(|(s, us)| {
                !s.is_empty()
                    && s.bytes().all(|b| b.is_ascii_digit())
                    && us.len() == 6
                    && us.bytes().all(|b| b.is_ascii_digit())
            });
            if is_stamp {
                found = Some(offset + open + 1 + close + 2);
            }
        }
        offset += open + 1;
        rest = &rest[open + 1..];
    }
    found.map(|i| &line[i..])
}

/// Kernel reports that mean the kernel hung or crashed: the run fails at
/// the first one. Warnings (`WARNING: CPU:`) are reported, not failed.
const FAULTS: &[(&str, &str)] = &[
    ("BUG: soft lockup", "soft lockup"),
    ("detected stalls on CPUs", "RCU stall"),
    ("self-detected stall on CPU", "RCU stall"),
    ("detected stall on CPU", "RCU stall"),
    ("Watchdog detected hard LOCKUP", "hard lockup"),
    ("blocked for more than", "hung task"),
    ("Kernel panic", "kernel panic"),
    ("BUG:", "kernel BUG"),
    ("Oops:", "Oops"),
    ("general protection fault", "Oops"),
    ("kernel BUG at", "kernel BUG"),
];

/// What kind of kernel fault a console line reports, if any.
pub fn fault_kind(line: &str) -> Option<&'static str> {
    let message = kernel_message(line)?;
    FAULTS
        .iter()
        .find(|(needle, _)| message.contains(needle))
        .map(|(_, kind)| *kind)
}

/// Whether a console line is a kernel warning (`WARNING: CPU: …`).
pub fn is_warning(line: &str) -> bool {
    kernel_message(line).is_some_and(|m| m.starts_with("WARNING: "))
}

/// A console line without terminal control sequences (SeaBIOS clears the
/// screen; the kernel may print CRs).
pub fn printable(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ parameters final-byte; otherwise ESC + one char.
                if chars.next_if_eq(&'[').is_some() {
                    while chars.next().is_some_and(|c| !('@'..='~').contains(&c)) {}
                } else {
                    chars.next();
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Sends each line of `pipe` (control sequences removed, lossy UTF-8) with `prefix`.
pub fn read_lines(mut pipe: Box<dyn Read + Send>, prefix: &str, tx: &mpsc::Sender<String>) {
    let mut pending = Vec::new();
    let mut buf = [0u8; 8192];
    let send = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        let _ = tx.send(format!("{prefix}{}", printable(&text)));
    };
    loop {
        match pipe.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=i).collect();
                    send(&line);
                }
            }
        }
    }
    if !pending.is_empty() {
        send(&pending);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_guest_lines() {
        let l = "[   12.3] random: ZT-VMTEST kernel=6.1.0-56-cloud-amd64 path=kprobe \
                 transport=perf result=FAIL detail=no open event with local=1 (3.0s)";
        assert_eq!(
            parse_line(l),
            Some(Guest::Cell(Cell {
                kernel: "6.1.0-56-cloud-amd64".into(),
                path: "kprobe".into(),
                transport: "perf".into(),
                pass: false,
                detail: "no open event with local=1 (3.0s)".into(),
            }))
        );
        assert_eq!(
            parse_line("ZT-VMTEST-LOG path=fentry transport=ringbuf | zerotrace: error: x | y"),
            Some(Guest::Log {
                path: "fentry".into(),
                transport: "ringbuf".into(),
                line: "zerotrace: error: x | y".into()
            })
        );
        assert_eq!(
            parse_line("ZT-VMTEST start path=fentry transport=perf"),
            Some(Guest::Start {
                path: "fentry".into(),
                transport: "perf".into()
            })
        );
        assert_eq!(
            parse_line("ZT-VMTEST step path=fentry transport=perf step=traffic"),
            Some(Guest::Step {
                path: "fentry".into(),
                transport: "perf".into(),
                step: "traffic".into()
            })
        );
        assert_eq!(parse_line("ZT-VMTEST done"), Some(Guest::Done));
        assert_eq!(
            printable("\x1bc\x1b[?7l\x1b[2JZT-VMTEST done\r\n"),
            "ZT-VMTEST done"
        );
        assert_eq!(parse_line("Run /init as init process"), None);
        assert_eq!(parse_line("ZT-VMTEST kernel=x path=y"), None);
    }

    #[test]
    fn recognizes_kernel_faults() {
        let cases = [
            (
                "[   36.555980] watchdog: BUG: soft lockup - CPU#0 stuck for 27s! [zerotrace:145]",
                Some("soft lockup"),
            ),
            (
                "[   60.100000] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
                Some("RCU stall"),
            ),
            (
                "[   60.100000] rcu: INFO: rcu_preempt self-detected stall on CPU",
                Some("RCU stall"),
            ),
            (
                "[    9.000001] BUG: kernel NULL pointer dereference, address: 0000000000000008",
                Some("kernel BUG"),
            ),
            (
                "[    9.000001] Oops: 0000 [#1] PREEMPT SMP NOPTI",
                Some("Oops"),
            ),
            (
                "[  150.000000] INFO: task zerotrace:131 blocked for more than 120 seconds.",
                Some("hung task"),
            ),
            // Guest output with a kernel message appended on the same line.
            ("ZT-VMTEST start path=x transport=y[   36.5] nope", None),
            (
                "ZT-VMTEST start[   36.555980] watchdog: BUG: soft lockup - CPU#1",
                Some("soft lockup"),
            ),
            // The agent's own words, relayed by the guest, are not the kernel's.
            (
                "ZT-VMTEST-LOG path=fentry transport=perf | zerotrace: BUG: in the parser",
                None,
            ),
            ("[    1.000000] Run /init as init process", None),
        ];
        for (line, want) in cases {
            assert_eq!(fault_kind(line), want, "{line}");
        }
        assert!(is_warning(
            "[    5.123456] WARNING: CPU: 1 PID: 145 at kernel/bpf/trampoline.c:123 x+0x1/0x2"
        ));
        assert!(!is_warning("[    5.123456] zerotrace WARNING: nothing"));
    }
}
