//! A real OpenTelemetry collector for end-to-end tests: rotel (a Rust OTLP
//! collector from PyPI, `pip install rotel`), which `cargo xtask setup`
//! installs into [`otel_venv`]. The wheel ships the binary as
//! `lib/python3.*/site-packages/rotel/rotel-agent`; it is run in the
//! foreground with the blackhole exporter and `--debug-log traces
//! --debug-log-verbosity detailed`, which prints every received span to
//! stdout in the OpenTelemetry Collector's debug-exporter layout:
//!
//! ```text
//! ResourceSpans #0
//! Resource attributes:
//!      -> service.name: Str(svc)
//! ScopeSpans #0
//! InstrumentationScope my.scope
//! Span #0
//!     Trace ID       : 14ea2b75392fc93e8650492cb3cb7288
//!     Parent ID      : 55a7392177f2b39d
//!     ID             : 22c189c97c33eb71
//!     Name           : SELECT items
//!     Kind           : SPAN_KIND_CLIENT
//! Start time: 1795316164925103486
//! End time: 1795316164925125896
//!     Status code    : STATUS_CODE_ERROR
//!     Status message : boom
//! Attributes:
//!      -> db.system.name: Str(postgresql)
//! ```

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, PoisonError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{free_port, otlp::otel_venv};

/// A running `rotel-agent start`; killed when dropped.
pub struct Rotel {
    child: Mutex<Child>,
    grpc_port: u16,
    http_port: u16,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

/// The rotel binary inside [`otel_venv`].
pub fn rotel_agent() -> anyhow::Result<PathBuf> {
    let lib = otel_venv()?.join("lib");
    let found = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/rotel/rotel-agent"))
        .find(|p| p.is_file());
    found.with_context(|| {
        format!(
            "no {}/python3.*/site-packages/rotel/rotel-agent: run `cargo xtask setup` (it installs rotel)",
            lib.display()
        )
    })
}

impl Rotel {
    /// Starts rotel listening for OTLP gRPC and HTTP on free loopback ports,
    /// printing every received span; waits until both ports accept.
    pub fn start() -> anyhow::Result<Rotel> {
        let bin = rotel_agent()?;
        let mut last = None;
        // The free ports may be taken between probing and rotel's bind: retry.
        for _ in 0..3 {
            match Self::try_start(&bin) {
                Ok(rotel) => return Ok(rotel),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    fn try_start(bin: &Path) -> anyhow::Result<Rotel> {
        let dir = tempfile::tempdir()?;
        let (grpc_port, http_port) = (free_port(), free_port());
        let mut child = Command::new(bin)
            .arg("start")
            .arg("--otlp-grpc-endpoint")
            .arg(format!("127.0.0.1:{grpc_port}"))
            .arg("--otlp-http-endpoint")
            .arg(format!("127.0.0.1:{http_port}"))
            .args(["--exporter", "blackhole"])
            .args(["--debug-log", "traces", "--debug-log-verbosity", "detailed"])
            // Only used with --daemon, but keep them away from the shared /tmp defaults.
            .arg("--pid-file")
            .arg(dir.path().join("rotel.pid"))
            .arg("--log-file")
            .arg(dir.path().join("rotel.log"))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let log = Arc::new(Mutex::new(String::new()));
        collect(child.stdout.take().expect("piped"), Arc::clone(&log));
        collect(child.stderr.take().expect("piped"), Arc::clone(&log));
        let rotel = Rotel {
            child: Mutex::new(child),
            grpc_port,
            http_port,
            log,
            _dir: dir,
        };
        rotel.wait_until_listening(Duration::from_secs(20))?;
        Ok(rotel)
    }

    fn wait_until_listening(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let up = |port| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            if self.log().contains("Starting Rotel") && up(self.grpc_port) && up(self.http_port) {
                return Ok(());
            }
            if let Some(status) = self.exited() {
                bail!("rotel exited ({status}) while starting:\n{}", self.tail());
            }
            if Instant::now() >= deadline {
                bail!(
                    "rotel did not listen on 127.0.0.1:{} and :{} within {timeout:?}:\n{}",
                    self.grpc_port,
                    self.http_port,
                    self.tail()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// "http://127.0.0.1:P" — OTLP gRPC.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// "http://127.0.0.1:P" — OTLP HTTP (`/v1/traces`, protobuf or JSON).
    pub fn http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Everything rotel printed so far (stdout and stderr, no colours).
    pub fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The collector's process id.
    pub fn pid(&self) -> u32 {
        self.child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .id()
    }

    /// Names of the spans rotel printed so far (its `Name           : …` lines).
    pub fn span_names(&self) -> Vec<String> {
        span_names(&self.log())
    }

    /// Waits until rotel's log satisfies `pred` (e.g. contains a span name),
    /// or fails with the log's tail. Returns the whole log.
    pub fn wait_for_log(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if pred(&log) {
                return Ok(log);
            }
            if Instant::now() >= deadline {
                let state = match self.exited() {
                    Some(status) => format!("rotel exited ({status})"),
                    None => "rotel is running".to_string(),
                };
                bail!(
                    "no {what} in rotel's log within {timeout:?} ({state}; spans seen: {:?}); log tail:\n{}",
                    span_names(&log),
                    self.tail()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn exited(&self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        child.try_wait().ok().flatten()
    }

    fn tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let skip = lines.len().saturating_sub(40);
        let mut out = String::new();
        for line in &lines[skip..] {
            let _ = writeln!(out, "  rotel: {line}");
        }
        out
    }
}

impl Drop for Rotel {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(PoisonError::into_inner);
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Appends a pipe's lines to `log`, without ANSI colour sequences.
fn collect(pipe: impl Read + Send + 'static, log: Arc<Mutex<String>>) {
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let line = strip_ansi(&line);
            let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
            log.push_str(&line);
            log.push('\n');
        }
    });
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte(@..~)
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Span names in a debug-exporter log (`    Name           : GET /x`).
pub fn span_names(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| {
            let (key, value) = l.split_once(" : ")?;
            (key.trim() == "Name").then(|| value.trim_end().to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_span_names_and_strips_colours() {
        let log = "\u{1b}[2m2026-01-01T00:00:00Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m Starting Rotel.\n\
                   Span #0\n    ID             : 22c189c97c33eb71\n    Name           : SELECT items\n\
                   Span #1\n    Name           : GET /a : b\n";
        assert_eq!(span_names(log), ["SELECT items", "GET /a : b"]);
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x"),
            "2026  INFO x"
        );
    }
}
