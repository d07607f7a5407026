//! Shared pieces of the end-to-end tests: the agent binary as a child
//! process, real servers on loopback, and waiting for them.
//!
//! The tests need root and a kernel with BTF. As a normal user they skip
//! with a message, except under CI=true, where skipping is a failure.

pub mod db;
pub mod kube_api;
pub mod load;
pub mod nesting;
pub mod otlp;
pub mod rotel;
pub mod servers;
pub mod spans;
pub mod stats;
pub mod tls;
pub mod tls_collector;
pub mod unix;

use std::{
    io::{BufRead, BufReader, Read},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::Value;

/// Whether eBPF tests can run; prints why not and panics under CI.
pub fn can_trace() -> bool {
    // SAFETY: trivial libc call.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(
            std::env::var("CI").is_err(),
            "the end-to-end tests must run as root in CI"
        );
        eprintln!("skipped: needs root (run `cargo xtask test`)");
    }
    root
}

/// `zerotrace check --json`, parsed; panics with its stderr if it fails.
pub fn check_report() -> Value {
    let out = Command::new(agent_bin())
        .args(["check", "--json"])
        .output()
        .expect("running zerotrace check");
    assert!(
        out.status.success(),
        "check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("check --json prints JSON")
}

/// One row of a `zerotrace check --json` report, by name.
pub fn check_row(report: &Value, name: &str) -> Value {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no row {name}: {report}"))
}

/// Names of the agent's programs that bpftool lists as loaded (bpftool cuts
/// names to 15 bytes); any left after the agent is gone were leaked.
pub fn agent_programs_loaded() -> Vec<String> {
    let out = run(Command::new("bpftool").args(["prog", "list", "--json"]))
        .expect("bpftool (apt-get install bpftool)");
    let progs: Vec<Value> = serde_json::from_str(&out).unwrap();
    progs
        .iter()
        .filter_map(|p| p["name"].as_str())
        .filter(|n| {
            [
                "sys_exit_data",
                "sys_exit_receive",
                "sys_enter_read",
                "sched_process_for",
                "sys_enter_close",
            ]
            .iter()
            .any(|o| n.starts_with(o))
        })
        .map(str::to_owned)
        .collect()
}

/// The agent binary: $ZEROTRACE_BIN (set by `cargo xtask test`) or target/debug.
pub fn agent_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("ZEROTRACE_BIN") {
        return path.into();
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/zerotrace");
    assert!(
        path.exists(),
        "{} missing: run `cargo xtask test` or `cargo build -p agent`",
        path.display()
    );
    path
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts connections on 127.0.0.1:port.
pub fn wait_for_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listening on port {port} after {timeout:?}")
}

/// Sends SIGINT (or another signal) to a child.
pub fn signal(child: &Child, sig: i32) {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// Waits for a child to exit, up to `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A child process killed when dropped.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `zerotrace events --format json` running in the background.
pub struct Agent {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
    /// Every stdout line, JSON or not.
    text: Arc<Mutex<Vec<String>>>,
    stdout: Option<thread::JoinHandle<()>>,
    stderr: mpsc::Receiver<String>,
    pub stderr_lines: Vec<String>,
}

impl Agent {
    /// Starts the agent with `args` after `events --format json` and waits
    /// until it reports that it is capturing.
    pub fn start(args: &[&str]) -> anyhow::Result<Self> {
        let mut cmd = Command::new(agent_bin());
        cmd.args(["events", "--format", "json"]).args(args);
        Self::spawn(cmd, "capturing")
    }

    /// Starts `zerotrace run ARGS` with extra environment variables and
    /// waits until it reports that it is tracing.
    pub fn run(args: &[&str], envs: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut cmd = Command::new(agent_bin());
        cmd.arg("run").args(args);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Self::spawn(cmd, "tracing")
    }

    /// Spawns the agent and waits for `ready` on its stderr.
    pub fn spawn(mut cmd: Command, ready: &str) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting zerotrace")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let text = Arc::new(Mutex::new(Vec::new()));
        let out = BufReader::new(child.stdout.take().unwrap());
        let (sink, text_sink) = (Arc::clone(&lines), Arc::clone(&text));
        let stdout = thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    sink.lock().unwrap().push(v);
                }
                text_sink.lock().unwrap().push(line);
            }
        });
        let (tx, stderr) = mpsc::channel();
        let err = BufReader::new(child.stderr.take().unwrap());
        thread::spawn(move || {
            for line in err.lines().map_while(Result::ok) {
                eprintln!("  agent: {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut agent = Agent {
            child,
            lines,
            text,
            stdout: Some(stdout),
            stderr,
            stderr_lines: Vec::new(),
        };
        agent.wait_for_stderr(ready, Duration::from_secs(60))?;
        Ok(agent)
    }

    /// Waits for a stderr line containing `needle`; returns it.
    pub fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        if let Some(line) = self.stderr_lines.iter().find(|l| l.contains(needle)) {
            return Ok(line.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.stderr_lines.push(line.clone());
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(_) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        bail!(
                            "zerotrace exited ({status}) before printing {needle:?}: {:?}",
                            self.stderr_lines
                        );
                    }
                    bail!(
                        "zerotrace did not print {needle:?} within {timeout:?}: {:?}",
                        self.stderr_lines
                    );
                }
            }
        }
    }

    /// Every stdout line so far, joined.
    pub fn stdout_text(&self) -> String {
        self.text.lock().unwrap().join("\n")
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Records received so far.
    pub fn records(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for the records received so far.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&[Value]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if pred(&self.lines.lock().unwrap()) {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Stops the agent with SIGINT; returns every record, the summary last.
    pub fn stop(mut self) -> anyhow::Result<Vec<Value>> {
        signal(&self.child, libc::SIGINT);
        let status = wait_timeout(&mut self.child, Duration::from_secs(10))
            .context("zerotrace did not exit within 10 s of SIGINT")?;
        if let Some(h) = self.stdout.take() {
            let _ = h.join();
        }
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(200)) {
            self.stderr_lines.push(line);
        }
        if !status.success() {
            bail!("zerotrace exited with {status}: {:?}", self.stderr_lines);
        }
        Ok(self.records())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Data records of one process, in order.
pub fn data_of(records: &[Value], pid: u32) -> Vec<&Value> {
    records
        .iter()
        .filter(|r| r["type"] == "data" && r["pid"] == pid)
        .collect()
}

/// Decodes a record's `payload_hex`.
pub fn payload(record: &Value) -> Vec<u8> {
    let hex = record["payload_hex"].as_str().unwrap_or("");
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

/// Concatenated payload of the given records in one direction.
pub fn stream(records: &[&Value], direction: &str) -> Vec<u8> {
    records
        .iter()
        .filter(|r| r["direction"] == direction)
        .flat_map(|r| payload(r))
        .collect()
}

/// The summary record `events --format json` prints last.
pub fn summary(records: &[Value]) -> &Value {
    records
        .iter()
        .rev()
        .find(|r| r["type"] == "summary")
        .expect("no summary record")
}

/// Runs a command to completion, returning stdout; fails on a bad status.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Reads a child's whole stdout.
pub fn read_all(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(out) = child.stdout.as_mut() {
        let _ = out.read_to_string(&mut s);
    }
    s
}

/// One line per record without payloads, for assertion messages.
pub fn brief(records: &[Value]) -> String {
    records
        .iter()
        .map(|r| {
            format!(
                "{} pid={} {} {} {} -> {} {} B",
                r["type"], r["pid"], r["role"], r["direction"], r["local"], r["remote"], r["bytes"]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `python3 -c script` with piped stdin and stdout.
pub fn spawn_python(script: &str) -> Child {
    Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3")
}
