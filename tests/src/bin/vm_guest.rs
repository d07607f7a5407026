//! The check that `cargo xtask vm-test` runs inside each QEMU guest (started
//! by the initramfs's /init, as root, with /bin/zerotrace next to it).
//!
//! For every kernel-function path (fentry, kprobe) × transport (ringbuf,
//! perf), in the order `--cells` gives (`fentry/ringbuf,kprobe/perf,…`), it starts `zerotrace events --kernel-functions PATH --transport T
//! --format json`, waits for the ready line, and makes one HTTP-like exchange
//! over loopback in this process: the server reads the request with read(2),
//! writes the response head with write(2) and sends a 100000-byte body from
//! a file with sendfile(2), which only the kernel-function layer can see.
//! Then it stops the agent with SIGINT and checks its JSON lines:
//!
//! 1. an `open` event for the server side (local = the server port, remote =
//!    the client's port, role server);
//! 2. ingress data on that connection that starts with the request and adds up
//!    to exactly the request (no duplicates from the kernel-function layer);
//! 3. egress: kernel-function events (`tcp_sendmsg` / `tcp_sendpage`) that sum
//!    to exactly the body, the head once from `write`, nothing else;
//! 4. the summary reports `lost` == 0;
//! 5. a second exchange over a unix stream socket (`/tmp/zt-vm.sock`): an
//!    `open` of each end (transport unix, the server's local and the
//!    client's remote named by the socket's path) and the request and
//!    response bytes on them exactly once.
//!
//! Output, one line per cell, for the host to parse from the serial console:
//! `ZT-VMTEST kernel=<uname -r> path=<p> transport=<t> result=PASS|FAIL detail=<…>`
//! then `ZT-VMTEST done`. Before each step of a cell the guest prints
//! `ZT-VMTEST step path=<p> transport=<t> step=<name>`, so that when the
//! kernel hangs the host can say where. On a failure the agent's stderr follows as
//! `ZT-VMTEST-LOG path=<p> transport=<t> | <line>`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

const BODY_LEN: usize = 100_000;
const BODY_FILE: &str = "/tmp/zt-vm-body";
/// Names the kernel-function layer gives its data events.
const KFUNC_NAMES: &[&str] = &["tcp_sendmsg", "tcp_sendpage"];
/// What `zerotrace events` and `zerotrace run` print once attached.
const READY_PREFIXES: [&str; 2] = ["zerotrace: capturing (", "zerotrace: tracing ("];
/// The cell that runs `zerotrace run` and checks the agent's own spans.
const SELF_SPANS: &str = "self-spans";
/// The cell where two agents attach and detach the same probes at once
/// while traffic runs through the probed functions (an agent restarting
/// beside another, a rolling update): live code patching under load.
const CHURN: &str = "churn";
/// Rounds of the churn cell; the second agent starts a little later each round.
const CHURN_ROUNDS: u32 = 3;
const SPANS_FILE: &str = "/tmp/zt-vm-spans.jsonl";
/// Longest wait for one read(2) of the exchange.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

struct Opts {
    agent: String,
    /// (path, transport) in the order they run; transport `self-spans` is
    /// `zerotrace run` with its own spans.
    cells: Vec<(String, String)>,
    /// How long the agent may take to load and attach (TCG is slow).
    ready_timeout: Duration,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        agent: "/bin/zerotrace".into(),
        cells: ["fentry", "kprobe"]
            .iter()
            .flat_map(|p| {
                ["ringbuf", "perf", SELF_SPANS, CHURN]
                    .iter()
                    .map(move |t| (p.to_string(), t.to_string()))
            })
            .collect(),
        ready_timeout: Duration::from_secs(60),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--agent" => o.agent = value()?,
            "--cells" => {
                o.cells = value()?
                    .split(',')
                    .map(|c| {
                        c.split_once('/')
                            .map(|(p, t)| (p.to_string(), t.to_string()))
                            .ok_or(format!("bad cell {c:?} (want PATH/TRANSPORT)"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--ready-timeout" => {
                let s = value()?;
                let secs: u64 = s.parse().map_err(|_| format!("bad --ready-timeout {s}"))?;
                o.ready_timeout = Duration::from_secs(secs);
            }
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok(o)
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            println!("ZT-VMTEST error {e}");
            println!("ZT-VMTEST done");
            std::process::exit(2);
        }
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    println!(
        "ZT-VMTEST info kernel={kernel} {}",
        check_report(&opts.agent)
    );
    if let Err(e) = write_body() {
        println!("ZT-VMTEST error cannot write {BODY_FILE}: {e}");
    }
    for (path, transport) in &opts.cells {
        println!("ZT-VMTEST start path={path} transport={transport}");
        let started = Instant::now();
        let (result, stderr) = run_cell(&opts, path, transport);
        let secs = started.elapsed().as_secs_f64();
        let (verdict, detail) = match &result {
            Ok(d) => ("PASS", format!("{d} ({secs:.1}s)")),
            Err(d) => ("FAIL", format!("{d} ({secs:.1}s)")),
        };
        println!(
            "ZT-VMTEST kernel={kernel} path={path} transport={transport} result={verdict} detail={}",
            one_line(&detail)
        );
        if result.is_err() {
            for line in &stderr {
                println!("ZT-VMTEST-LOG path={path} transport={transport} | {line}");
            }
        }
        let _ = std::io::stdout().flush();
    }
    println!("ZT-VMTEST done");
}

/// `kernel_function_layer` from `zerotrace check --json`, on one line.
fn check_report(agent: &str) -> String {
    let out = match Command::new(agent).args(["check", "--json"]).output() {
        Ok(o) => o,
        Err(e) => return format!("check=error:cannot-start:{e}"),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    match serde_json::from_str::<Value>(&text) {
        Ok(v) => {
            let mut parts = vec![format!(
                "kernel_function_layer={}",
                v.get("kernel_function_layer").unwrap_or(&Value::Null)
            )];
            // The rows that explain a missing layer or a refused program.
            let rows = v.get("rows").and_then(Value::as_array);
            for row in rows.into_iter().flatten() {
                let name = str_field(row, "name");
                let available = row.get("available").and_then(Value::as_bool);
                if available == Some(false)
                    || matches!(name, "eBPF programs" | "kernel-function layer")
                {
                    parts.push(format!(
                        "[{name}: {}{}]",
                        if available == Some(true) { "yes" } else { "no" },
                        match str_field(row, "detail") {
                            "" => String::new(),
                            d => format!(", {}", one_line(d)),
                        }
                    ));
                }
            }
            parts.join(" ")
        }
        Err(_) => format!(
            "check=error:{}:{}",
            out.status,
            one_line(&String::from_utf8_lossy(&out.stderr))
        ),
    }
}

/// Tells the host which step of a cell runs now (flushed: the kernel may
/// hang the next moment).
fn step(path: &str, transport: &str, name: &str) {
    println!("ZT-VMTEST step path={path} transport={transport} step={name}");
    let _ = std::io::stdout().flush();
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn write_body() -> std::io::Result<()> {
    let body: Vec<u8> = (0..BODY_LEN).map(|i| (i % 251) as u8).collect();
    std::fs::write(BODY_FILE, body)
}

/// The agent as a child: its stderr lines as they come, its stdout at the end.
struct Agent {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    ready: mpsc::Receiver<String>,
    stdout: Option<thread::JoinHandle<Vec<String>>>,
}

impl Agent {
    fn start(opts: &Opts, path: &str, transport: &str) -> Result<Agent, String> {
        let mut c = Command::new(&opts.agent);
        if transport == SELF_SPANS {
            // The jsonl exporter appends: start from an empty file.
            let _ = std::fs::remove_file(SPANS_FILE);
            c.args(["run", "--kernel-functions", path])
                .args(["--exporter", "jsonl", "--output", SPANS_FILE])
                .args(["--telemetry-interval", "1", "--listen", "off"])
                .args(["--self-spans", "true", "--duration", "60"])
                .args(["--program-stats", "on"]);
        } else {
            c.args(["events", "--kernel-functions", path]).args([
                "--transport",
                transport,
                "--format",
                "json",
                "--duration",
                "60",
            ]);
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", opts.agent))?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready) = mpsc::channel();
        let err_pipe = child.stderr.take().expect("piped stderr");
        let lines = Arc::clone(&stderr);
        thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines() {
                let Ok(line) = line else { break };
                if READY_PREFIXES.iter().any(|p| line.starts_with(p)) {
                    let _ = ready_tx.send(line.clone());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let out_pipe = child.stdout.take().expect("piped stdout");
        let stdout = thread::spawn(move || {
            BufReader::new(out_pipe)
                .lines()
                .map_while(Result::ok)
                .collect()
        });
        Ok(Agent {
            child,
            stderr,
            ready,
            stdout: Some(stdout),
        })
    }

    /// The ready line, or why it did not come.
    fn wait_ready(&mut self, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.ready.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => return Ok(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().map(|s| s.to_string());
                    return Err(format!(
                        "agent exited before its ready line ({})",
                        status.unwrap_or_else(|e| e.to_string())
                    ));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Give the stderr reader a moment to pass on a last line.
                if let Ok(line) = self.ready.recv_timeout(Duration::from_millis(500)) {
                    return Ok(line);
                }
                return Err(format!("agent exited before its ready line ({status})"));
            }
            if Instant::now() >= deadline {
                return Err(format!("no ready line within {}s", timeout.as_secs()));
            }
        }
    }

    /// SIGINT, then the stdout lines once it has exited (SIGKILL after 30 s).
    fn stop(&mut self) -> Result<Vec<String>, String> {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(100)),
                Ok(None) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err("agent did not exit within 30s of SIGINT (killed)".into());
                }
                Err(e) => return Err(format!("waiting for the agent: {e}")),
            }
        };
        let lines = self
            .stdout
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        if !status.success() {
            return Err(format!("agent exited with {status} after SIGINT"));
        }
        Ok(lines)
    }

    fn stderr_lines(&self) -> Vec<String> {
        // The reader thread may still be draining; a short grace period.
        thread::sleep(Duration::from_millis(100));
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn run_cell(opts: &Opts, path: &str, transport: &str) -> (Result<String, String>, Vec<String>) {
    if transport == CHURN {
        return churn_cell(opts, path);
    }
    let mut agent = match Agent::start(opts, path, transport) {
        Ok(a) => a,
        Err(e) => return (Err(e), Vec::new()),
    };
    let result = cell_checks(&mut agent, opts, path, transport);
    if result.is_err() {
        let _ = agent.child.kill();
        let _ = agent.child.wait();
    }
    (result, agent.stderr_lines())
}

/// Runs `cmd` to its end (killed after `limit`): its status and stderr lines.
fn run_with_limit(mut cmd: Command, limit: Duration) -> Result<(String, Vec<String>), String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let pipe = child.stderr.take().expect("piped stderr");
    let reader = thread::spawn(move || {
        BufReader::new(pipe)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{cmd:?} still running after {}s (killed)",
                    limit.as_secs()
                ));
            }
            Err(e) => return Err(format!("waiting for {cmd:?}: {e}")),
        }
    };
    let stderr = reader.join().unwrap_or_default();
    if !status.success() {
        return Err(format!("{cmd:?} exited with {status}"));
    }
    Ok((status.to_string(), stderr))
}

/// Two agents attach and detach the same kernel-function probes at once,
/// [`CHURN_ROUNDS`] times, while a thread keeps making exchanges whose
/// bodies go through the probed TCP send functions and another keeps
/// starting short-lived processes. Every agent must
/// succeed and every round must see exchanges complete: the kernel keeps
/// serving the probed functions while their code is patched.
fn churn_cell(opts: &Opts, path: &str) -> (Result<String, String>, Vec<String>) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let exchanges = Arc::new(AtomicU64::new(0));
    let failure = Arc::new(Mutex::new(None::<String>));
    let load = {
        let (stop, exchanges, failure) = (stop.clone(), exchanges.clone(), failure.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match traffic("/vm-churn") {
                    Ok(_) => {
                        exchanges.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failure.lock().unwrap().get_or_insert(e);
                        break;
                    }
                }
            }
        })
    };
    // Short-lived processes meanwhile: fork, exec and exit run through the
    // process tracepoints whose static keys the agents switch on and off.
    let spawned = Arc::new(AtomicU64::new(0));
    let spawner = {
        let (stop, spawned) = (stop.clone(), spawned.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match Command::new("true").stdin(Stdio::null()).status() {
                    Ok(_) => spawned.fetch_add(1, Ordering::Relaxed),
                    Err(_) => break,
                };
            }
        })
    };
    let mut logs = Vec::new();
    let mut result = Ok(());
    let mut per_round = Vec::new();
    for round in 1..=CHURN_ROUNDS {
        step(path, CHURN, &format!("round-{round}"));
        let before = exchanges.load(Ordering::Relaxed);
        let mut events = Command::new(&opts.agent);
        events.args(["events", "--kernel-functions", path, "--duration", "1"]);
        let first = thread::spawn(move || run_with_limit(events, Duration::from_secs(90)));
        // The second agent attaches while the first is attaching, running
        // or detaching, a little later each round.
        thread::sleep(Duration::from_millis(u64::from(round - 1) * 400));
        let mut check = Command::new(&opts.agent);
        check.args(["check", "--json"]);
        let second = run_with_limit(check, Duration::from_secs(90));
        let first = first
            .join()
            .unwrap_or_else(|_| Err("agent thread panicked".into()));
        // Exchanges go on for a moment after both agents are gone.
        thread::sleep(Duration::from_millis(300));
        let made = exchanges.load(Ordering::Relaxed) - before;
        per_round.push(made.to_string());
        for (name, outcome) in [("events", first), ("check", second)] {
            match outcome {
                Ok((_, lines)) => logs.extend(lines.into_iter().map(|l| format!("{name}: {l}"))),
                Err(e) => {
                    result = result.and(Err(format!("round {round}: {name}: {e}")));
                }
            }
        }
        if made == 0 {
            result = result.and(Err(format!(
                "round {round}: no exchange completed while the agents attached and detached"
            )));
        }
        if result.is_err() {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = load.join();
    let _ = spawner.join();
    if let Some(e) = failure.lock().unwrap().take() {
        result = result.and(Err(format!("traffic failed: {e}")));
    }
    let detail = result.map(|()| {
        format!(
            "{CHURN_ROUNDS} rounds of `events --kernel-functions {path}` and `check` attaching and \
             detaching at once; exchanges per round: {}; {} processes started meanwhile",
            per_round.join(","),
            spawned.load(Ordering::Relaxed)
        )
    });
    (detail, logs)
}

/// `zerotrace run` with the jsonl exporter, one exchange, then the agent's
/// own spans: the startup trace shows the forced method attached (and
/// sendfile's tracepoints left out), and an `ebpf.execute` span counts
/// the kernel-function probe's triggers.
fn self_spans_checks(agent: &mut Agent, path: &str, ready_secs: f64) -> Result<String, String> {
    step(path, SELF_SPANS, "traffic");
    traffic(&format!("/vm-{path}-spans"))?;
    // At least one full interval after the traffic.
    step(path, SELF_SPANS, "drain");
    thread::sleep(Duration::from_millis(2500));
    step(path, SELF_SPANS, "detach");
    agent.stop()?;
    step(path, SELF_SPANS, "verify");
    let text = std::fs::read_to_string(SPANS_FILE).map_err(|e| format!("{SPANS_FILE}: {e}"))?;
    let mut spans = Vec::new();
    for line in text.lines() {
        let v: Value =
            serde_json::from_str(line).map_err(|e| format!("jsonl line is not JSON ({e})"))?;
        spans.extend(otlp_json_spans(&v));
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let detail = verify_self_spans(&spans, path, reports_verified_instructions(&kernel))?;
    Ok(format!("{detail} ready={ready_secs:.1}s"))
}

/// A span from OTLP/JSON: its name and attributes as strings.
struct JsonSpan {
    name: String,
    attrs: BTreeMap<String, String>,
}

/// Every span of one ExportTraceServiceRequest in OTLP/JSON.
fn otlp_json_spans(request: &Value) -> Vec<JsonSpan> {
    let array = |v: &Value, k: &str| {
        v.get(k)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for rs in array(request, "resourceSpans") {
        for ss in array(&rs, "scopeSpans") {
            for span in array(&ss, "spans") {
                let attrs = array(&span, "attributes")
                    .iter()
                    .filter_map(|kv| {
                        let key = kv.get("key")?.as_str()?.to_string();
                        let value = kv.get("value")?.as_object()?.values().next()?;
                        let value = match value {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        Some((key, value))
                    })
                    .collect();
                out.push(JsonSpan {
                    name: str_field(&span, "name").to_string(),
                    attrs,
                });
            }
        }
    }
    out
}

/// Whether a kernel of this release fills `bpf_prog_info.verified_insns`
/// (Linux 5.16 and later).
fn reports_verified_instructions(osrelease: &str) -> bool {
    let mut parts = osrelease
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (5, 16)
}

/// How a kernel of this release lets the agent's receives reach their exit
/// hook: from the registers from 5.15 on (`bpf_task_pt_regs`), saved by
/// enter hooks before.
fn expected_receives(osrelease: &str) -> &'static str {
    let mut parts = osrelease
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) >= (5, 15) {
        "registers"
    } else {
        "saved"
    }
}

fn verify_self_spans(
    spans: &[JsonSpan],
    path: &str,
    verified_instructions: bool,
) -> Result<String, String> {
    let attr = |s: &JsonSpan, k: &str| s.attrs.get(k).cloned().unwrap_or_default();
    let (method, types, prefix): (&str, &[&str], &str) = match path {
        "fentry" => ("fentry/fexit", &["fexit"], "fexit_tcp_send"),
        _ => (
            "kprobe/kretprobe",
            &["kprobe", "kretprobe"],
            "kprobe_tcp_send",
        ),
    };
    let root = spans
        .iter()
        .find(|s| s.name == "zerotrace.startup")
        .ok_or("no zerotrace.startup span")?;
    if attr(root, "zerotrace.kernel_functions") != method {
        return Err(format!(
            "startup says kernel functions {:?}, want {method}",
            attr(root, "zerotrace.kernel_functions")
        ));
    }
    let attaches: Vec<&JsonSpan> = spans.iter().filter(|s| s.name == "ebpf.attach").collect();
    for kind in types {
        let attached = attaches.iter().any(|s| {
            attr(s, "ebpf.attach.target") == "tcp_sendmsg"
                && attr(s, "ebpf.attach.type") == *kind
                && attr(s, "ebpf.attach.outcome") == "attached"
        });
        if !attached {
            return Err(format!(
                "no attached {kind} on tcp_sendmsg in the startup trace"
            ));
        }
    }
    if attaches.iter().any(|s| {
        attr(s, "ebpf.attach.target").contains("sendfile")
            && attr(s, "ebpf.attach.outcome") == "attached"
    }) {
        return Err("sendfile tracepoints attached although the kernel-function layer runs".into());
    }
    // Before 5.16 the kernel does not report the verifier's count: the span
    // must be there, without the attribute.
    let compiled = spans.iter().any(|s| {
        s.name == "ebpf.compile"
            && attr(s, "ebpf.program.name").starts_with(prefix)
            && match attr(s, "ebpf.verifier.instructions").parse::<u64>() {
                Ok(n) => n > 0,
                Err(_) => !verified_instructions,
            }
    });
    if !compiled {
        return Err(format!(
            "no ebpf.compile span for {prefix}*{}",
            if verified_instructions {
                " with instructions"
            } else {
                ""
            }
        ));
    }
    let triggers: u64 = spans
        .iter()
        .filter(|s| s.name == "ebpf.execute" && attr(s, "ebpf.program.name").starts_with(prefix))
        .filter_map(|s| attr(s, "ebpf.kprobe.triggers").parse::<u64>().ok())
        .sum();
    if triggers == 0 {
        return Err(format!("no ebpf.execute span counts triggers of {prefix}*"));
    }
    Ok(format!(
        "startup: {method} attached, sendfile tracepoints left out; {prefix}* triggers={triggers} \
         ({} spans)",
        spans.len()
    ))
}

fn cell_checks(
    agent: &mut Agent,
    opts: &Opts,
    path: &str,
    transport: &str,
) -> Result<String, String> {
    let started = Instant::now();
    step(path, transport, "attach");
    let ready = agent.wait_ready(opts.ready_timeout)?;
    let ready_secs = started.elapsed().as_secs_f64();
    if transport == SELF_SPANS {
        return self_spans_checks(agent, path, ready_secs);
    }
    if !ready.contains(&format!("{transport} transport")) {
        return Err(format!("ready line names another transport: {ready}"));
    }
    if !ready.contains(path) {
        return Err(format!(
            "ready line does not name the {path} layer: {ready}"
        ));
    }
    step(path, transport, "traffic");
    let traffic = traffic(&format!("/vm-{path}-{transport}"))?;
    step(path, transport, "unix traffic");
    let unix = unix_traffic(&format!("/vm-{path}-{transport}-unix"))?;
    // Let the agent read what the kernel has queued before it is stopped.
    step(path, transport, "drain");
    thread::sleep(Duration::from_secs(2));
    step(path, transport, "detach");
    let lines = agent.stop()?;
    step(path, transport, "verify");
    let mut events = Vec::with_capacity(lines.len());
    for line in &lines {
        let v: Value = serde_json::from_str(line)
            .map_err(|e| format!("stdout line is not JSON ({e}): {line:.200}"))?;
        events.push(v);
    }
    let mut detail = verify(&events, &traffic)?;
    detail.push_str(&verify_unix(&events, &unix)?);
    detail.push_str(&format!(" ready={ready_secs:.1}s"));
    Ok(detail)
}

/// What one exchange sent, from the guest's point of view.
struct Traffic {
    /// "127.0.0.1:PORT" of the listening socket.
    server: String,
    /// "127.0.0.1:PORT" of the client socket.
    client: String,
    request: Vec<u8>,
    head: Vec<u8>,
}

/// The error of a failed call, or `None` when it was only interrupted (a
/// socket with a receive timeout returns EINTR instead of restarting).
fn failed(call: &str) -> Option<String> {
    let err = std::io::Error::last_os_error();
    (err.kind() != std::io::ErrorKind::Interrupted).then(|| format!("{call}: {err}"))
}

fn sys_write_all(fd: i32, mut buf: &[u8]) -> Result<(), String> {
    while !buf.is_empty() {
        // SAFETY: buf is a valid slice for its length.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n == 0 {
            return Err("write(2) wrote nothing".into());
        }
        if n < 0 {
            match failed("write(2)") {
                Some(e) => return Err(e),
                None => continue,
            }
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

fn sys_read(fd: i32, buf: &mut [u8]) -> Result<usize, String> {
    loop {
        // SAFETY: buf is a valid mutable slice for its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        if let Some(e) = failed("read(2)") {
            return Err(e);
        }
    }
}

/// One request/response over loopback: read(2)/write(2)/sendfile(2) on the
/// server side, write(2)/read(2) on the client side.
fn traffic(target: &str) -> Result<Traffic, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let server = listener
        .local_addr()
        .map_err(|e| e.to_string())?
        .to_string();
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {BODY_LEN}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    let server_head = head.clone();
    let server_thread = thread::spawn(move || -> Result<Vec<u8>, String> {
        let (conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        // read(2) honours SO_RCVTIMEO: a lost client fails the cell, not the run.
        let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
        let fd = conn.as_raw_fd();
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = sys_read(fd, &mut buf)?;
            if n == 0 {
                return Err("client closed before the end of the request".into());
            }
            request.extend_from_slice(&buf[..n]);
        }
        sys_write_all(fd, &server_head)?;
        let file = std::fs::File::open(BODY_FILE).map_err(|e| format!("{BODY_FILE}: {e}"))?;
        let mut offset: libc::off_t = 0;
        let mut sent = 0usize;
        while sent < BODY_LEN {
            // SAFETY: both fds are open; offset is a valid off_t.
            let n = unsafe { libc::sendfile(fd, file.as_raw_fd(), &mut offset, BODY_LEN - sent) };
            if n == 0 {
                return Err(format!("sendfile(2) sent nothing after {sent} bytes"));
            }
            if n < 0 {
                match failed(&format!("sendfile(2) after {sent} bytes")) {
                    Some(e) => return Err(e),
                    None => continue,
                }
            }
            sent += n as usize;
        }
        drop(conn);
        Ok(request)
    });

    let client_result = (|| -> Result<(String, Vec<u8>, usize), String> {
        let stream = TcpStream::connect(&server).map_err(|e| format!("connect {server}: {e}"))?;
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let client = stream.local_addr().map_err(|e| e.to_string())?.to_string();
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: {server}\r\nUser-Agent: zerotrace-vm-guest\r\nAccept: */*\r\n\r\n"
        )
        .into_bytes();
        let fd = stream.as_raw_fd();
        sys_write_all(fd, &request)?;
        let mut received = 0usize;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = sys_read(fd, &mut buf)?;
            if n == 0 {
                break;
            }
            received += n;
        }
        Ok((client, request, received))
    })();
    // Without a client the server may wait in accept() for ever: leave it.
    let (client, request, received) = client_result?;
    let server_result = server_thread
        .join()
        .map_err(|_| "server thread panicked".to_string())?;
    let seen_request = server_result?;
    if seen_request != request {
        return Err("the server read something other than the request".into());
    }
    if received != head.len() + BODY_LEN {
        return Err(format!(
            "the client received {received} bytes, expected {}",
            head.len() + BODY_LEN
        ));
    }
    Ok(Traffic {
        server,
        client,
        request,
        head,
    })
}

/// One request and response over a unix stream socket.
struct UnixTraffic {
    path: String,
    request: Vec<u8>,
    response: Vec<u8>,
}

const UNIX_PATH: &str = "/tmp/zt-vm.sock";

fn unix_traffic(target: &str) -> Result<UnixTraffic, String> {
    let _ = std::fs::remove_file(UNIX_PATH);
    let listener = UnixListener::bind(UNIX_PATH).map_err(|e| format!("bind {UNIX_PATH}: {e}"))?;
    let request = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n").into_bytes();
    let response = b"HTTP/1.1 204 No Content\r\n\r\n".to_vec();
    let answer = response.clone();
    let want = request.len();
    let server = thread::spawn(move || -> Result<Vec<u8>, String> {
        let (conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
        let fd = conn.as_raw_fd();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while seen.len() < want {
            let n = sys_read(fd, &mut buf)?;
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        sys_write_all(fd, &answer)?;
        Ok(seen)
    });
    let client = (|| -> Result<Vec<u8>, String> {
        let stream = UnixStream::connect(UNIX_PATH).map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let fd = stream.as_raw_fd();
        sys_write_all(fd, &request)?;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.len() < response.len() {
            let n = sys_read(fd, &mut buf)?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        Ok(got)
    })()?;
    let seen = server
        .join()
        .map_err(|_| "unix server thread panicked".to_string())??;
    let _ = std::fs::remove_file(UNIX_PATH);
    if seen != request || client != response {
        return Err("the unix exchange moved other bytes than it sent".into());
    }
    Ok(UnixTraffic {
        path: UNIX_PATH.to_owned(),
        request,
        response,
    })
}

/// Check 5: both ends of the unix exchange, each byte once.
fn verify_unix(events: &[Value], t: &UnixTraffic) -> Result<String, String> {
    let name = format!("unix:{}", t.path);
    let kind = |v: &Value, k: &str| str_field(v, "type") == k;
    let mut detail = String::new();
    for (role, end, ingress, egress) in [
        ("server", "local", &t.request, &t.response),
        ("client", "remote", &t.response, &t.request),
    ] {
        let open = events
            .iter()
            .find(|v| {
                kind(v, "open")
                    && str_field(v, "transport") == "unix"
                    && str_field(v, end) == name
                    && str_field(v, "role") == role
            })
            .ok_or_else(|| format!("no unix open event of the {role} with {end}={name}"))?;
        let conn_id = open.get("conn_id").cloned().unwrap_or(Value::Null);
        let moved = |direction: &str| -> (u64, Vec<u8>) {
            let on: Vec<&Value> = events
                .iter()
                .filter(|v| {
                    kind(v, "data")
                        && v.get("conn_id") == Some(&conn_id)
                        && str_field(v, "direction") == direction
                })
                .collect();
            (
                on.iter().map(|v| u64_field(v, "bytes")).sum(),
                on.iter()
                    .flat_map(|v| unhex(str_field(v, "payload_hex")))
                    .collect(),
            )
        };
        for (direction, want) in [("ingress", ingress), ("egress", egress)] {
            let (bytes, payload) = moved(direction);
            if bytes != want.len() as u64 || &payload != want {
                return Err(format!(
                    "unix {role}: {direction} {bytes} bytes ({:?}), expected {} once",
                    String::from_utf8_lossy(&payload[..payload.len().min(40)]),
                    want.len()
                ));
            }
        }
        detail.push_str(&format!(" unix-{role}=ok"));
    }
    Ok(detail)
}

fn unhex(s: &str) -> Vec<u8> {
    s.as_bytes()
        .chunks(2)
        .filter_map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect()
}

fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn u64_field(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// Checks 1–4 over the agent's JSON lines; the counts on success.
fn verify(events: &[Value], t: &Traffic) -> Result<String, String> {
    let kind = |v: &Value, k: &str| str_field(v, "type") == k;

    // (1) The server side's connection.
    let open = events
        .iter()
        .find(|v| {
            kind(v, "open")
                && str_field(v, "local") == t.server
                && str_field(v, "remote") == t.client
        })
        .ok_or_else(|| {
            let opens: Vec<String> = events
                .iter()
                .filter(|v| kind(v, "open"))
                .map(|v| format!("{}>{}", str_field(v, "local"), str_field(v, "remote")))
                .collect();
            format!(
                "no open event with local={} remote={} (opens seen: [{}]; {} lines)",
                t.server,
                t.client,
                opens.join(" "),
                events.len()
            )
        })?;
    if str_field(open, "role") != "server" {
        return Err(format!(
            "open event for {} has role {:?}, expected server",
            t.server,
            str_field(open, "role")
        ));
    }
    let conn_id = open.get("conn_id").cloned().unwrap_or(Value::Null);
    let on_conn = |v: &Value| {
        (str_field(v, "local") == t.server && str_field(v, "remote") == t.client)
            || (!conn_id.is_null() && v.get("conn_id") == Some(&conn_id))
    };
    let data: Vec<&Value> = events
        .iter()
        .filter(|v| kind(v, "data") && on_conn(v))
        .collect();
    let is_kfunc = |v: &Value| KFUNC_NAMES.contains(&str_field(v, "syscall"));

    // Per (direction, name): events and bytes, for the detail line.
    let mut by_name: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for v in &data {
        let e = by_name
            .entry((
                str_field(v, "direction").to_string(),
                str_field(v, "syscall").to_string(),
            ))
            .or_default();
        e.0 += 1;
        e.1 += u64_field(v, "bytes");
    }
    let breakdown = by_name
        .iter()
        .map(|((dir, name), (n, bytes))| format!("{dir}:{name}={bytes}B/{n}ev"))
        .collect::<Vec<_>>()
        .join(",");

    // (2) Ingress: the request, from the syscall layer, exactly once.
    let ingress: Vec<&&Value> = data
        .iter()
        .filter(|v| str_field(v, "direction") == "ingress")
        .collect();
    let request_seen: Vec<u8> = ingress
        .iter()
        .filter(|v| !is_kfunc(v))
        .flat_map(|v| unhex(str_field(v, "payload_hex")))
        .collect();
    if !request_seen.starts_with(&t.request) {
        return Err(format!(
            "ingress payload on the server connection does not start with the request \
             (got {} bytes: {:?}); events: {breakdown}",
            request_seen.len(),
            String::from_utf8_lossy(&request_seen[..request_seen.len().min(60)])
        ));
    }
    let ingress_bytes: u64 = ingress.iter().map(|v| u64_field(v, "bytes")).sum();
    if ingress_bytes != t.request.len() as u64 {
        return Err(format!(
            "ingress on the server connection sums to {ingress_bytes} bytes, the request is {} \
             (duplicated or missing); events: {breakdown}",
            t.request.len()
        ));
    }

    // (3) Egress: the head once from write(2), the body from the kernel-function layer.
    let egress: Vec<&&Value> = data
        .iter()
        .filter(|v| str_field(v, "direction") == "egress")
        .collect();
    let writes: Vec<&&&Value> = egress
        .iter()
        .filter(|v| str_field(v, "syscall") == "write")
        .collect();
    let write_bytes: u64 = writes.iter().map(|v| u64_field(v, "bytes")).sum();
    let write_payload: Vec<u8> = writes
        .iter()
        .flat_map(|v| unhex(str_field(v, "payload_hex")))
        .collect();
    if write_bytes != t.head.len() as u64 || write_payload != t.head {
        return Err(format!(
            "the response head ({} bytes, one write(2)) was reported by `write` as {write_bytes} bytes \
             in {} events (payload {} bytes{}); events: {breakdown}",
            t.head.len(),
            writes.len(),
            write_payload.len(),
            if write_payload == t.head {
                ", matches"
            } else {
                ", differs"
            }
        ));
    }
    let kfunc: Vec<&&&Value> = egress.iter().filter(|v| is_kfunc(v)).collect();
    let kfunc_bytes: u64 = kfunc.iter().map(|v| u64_field(v, "bytes")).sum();
    let egress_bytes: u64 = egress.iter().map(|v| u64_field(v, "bytes")).sum();
    if kfunc.is_empty() {
        return Err(format!(
            "no kernel-function egress events (tcp_sendmsg/tcp_sendpage) on the server \
             connection: the sendfile body was not seen; events: {breakdown}"
        ));
    }
    if kfunc_bytes != BODY_LEN as u64 {
        return Err(format!(
            "kernel-function egress events sum to {kfunc_bytes} bytes, the sendfile body is \
             {BODY_LEN}; events: {breakdown}"
        ));
    }
    if egress_bytes != (t.head.len() + BODY_LEN) as u64 {
        return Err(format!(
            "egress on the server connection sums to {egress_bytes} bytes, head + body is {} \
             (reported twice?); events: {breakdown}",
            t.head.len() + BODY_LEN
        ));
    }

    // (4) Nothing lost.
    let summary = events
        .iter()
        .rev()
        .find(|v| kind(v, "summary"))
        .ok_or("no summary line at exit")?;
    let lost = summary.get("lost").and_then(Value::as_u64);
    if lost != Some(0) {
        return Err(format!(
            "summary lost = {}; summary: {summary}",
            lost.map_or("missing".to_string(), |n| n.to_string())
        ));
    }
    // (5) How receives reached their exit hook, as this kernel allows.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let expected = expected_receives(release.trim());
    let receives = summary.get("receives").and_then(Value::as_str);
    if receives != Some(expected) {
        return Err(format!(
            "receives' arguments {receives:?} on {}, expected {expected:?}; summary: {summary}",
            release.trim()
        ));
    }
    Ok(format!(
        "conn={}>{} events={breakdown} lost=0 receives={expected}",
        t.server, t.client
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SERVER: &str = "127.0.0.1:4000";
    const CLIENT: &str = "127.0.0.1:5000";

    fn traffic() -> Traffic {
        Traffic {
            server: SERVER.into(),
            client: CLIENT.into(),
            request: b"GET /vm HTTP/1.1\r\n\r\n".to_vec(),
            head: b"HTTP/1.1 200 OK\r\n\r\n".to_vec(),
        }
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn data(syscall: &str, direction: &str, bytes: usize, payload: &[u8]) -> Value {
        json!({"type": "data", "conn_id": 7, "syscall": syscall, "direction": direction,
               "bytes": bytes, "captured": payload.len(), "payload_hex": hex(payload),
               "local": SERVER, "remote": CLIENT, "role": "server"})
    }

    /// What a correct agent reports on 6.1: tcp_sendpage per page.
    fn good() -> Vec<Value> {
        let t = traffic();
        let mut v = vec![
            json!({"type": "open", "conn_id": 7, "role": "server", "local": SERVER, "remote": CLIENT}),
            // The client's side of the same connection must not be mistaken for it.
            json!({"type": "open", "conn_id": 8, "role": "client", "local": CLIENT, "remote": SERVER}),
            data("read", "ingress", t.request.len(), &t.request),
            data("write", "egress", t.head.len(), &t.head),
        ];
        for _ in 0..24 {
            v.push(data("tcp_sendpage", "egress", 4096, &[]));
        }
        v.push(data("tcp_sendpage", "egress", BODY_LEN - 24 * 4096, &[]));
        v.push(json!({"type": "summary", "lost": 0, "receives": this_kernels_receives()}));
        v
    }

    fn this_kernels_receives() -> &'static str {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        expected_receives(release.trim())
    }

    #[test]
    fn knows_which_kernels_read_receives_at_exit() {
        assert_eq!(expected_receives("5.10.0-46-cloud-amd64"), "saved");
        assert_eq!(expected_receives("5.14.21"), "saved");
        assert_eq!(expected_receives("5.15.0-1-amd64"), "registers");
        assert_eq!(expected_receives("6.1.0-57-cloud-amd64"), "registers");
        assert_eq!(expected_receives("6.12.117+deb12-cloud-amd64"), "registers");
    }

    #[test]
    fn the_wrong_receive_mode_fails() {
        let mut events = good();
        let wrong = if this_kernels_receives() == "saved" {
            "registers"
        } else {
            "saved"
        };
        events.last_mut().unwrap()["receives"] = wrong.into();
        let err = verify(&events, &traffic()).unwrap_err();
        assert!(err.contains("receives' arguments"), "{err}");
    }

    #[test]
    fn knows_which_kernels_count_verified_instructions() {
        assert!(!reports_verified_instructions("5.10.0-46-cloud-amd64"));
        assert!(!reports_verified_instructions("5.15.0-1-amd64"));
        assert!(reports_verified_instructions("5.16.0"));
        assert!(reports_verified_instructions("6.1.0-57-cloud-amd64"));
        assert!(reports_verified_instructions("6.12.117+deb12-cloud-amd64"));
    }

    #[test]
    fn a_correct_report_passes() {
        let detail = verify(&good(), &traffic()).unwrap();
        assert!(
            detail.contains("egress:tcp_sendpage=100000B/25ev"),
            "{detail}"
        );
    }

    #[test]
    fn no_kernel_function_events_fail() {
        let events: Vec<Value> = good()
            .into_iter()
            .filter(|v| str_field(v, "syscall") != "tcp_sendpage")
            .collect();
        let err = verify(&events, &traffic()).unwrap_err();
        assert!(err.contains("no kernel-function egress events"), "{err}");
    }

    #[test]
    fn duplicates_and_gaps_fail() {
        let t = traffic();
        // The head reported by tcp_sendmsg too.
        let mut events = good();
        events.insert(4, data("tcp_sendmsg", "egress", t.head.len(), &[]));
        let err = verify(&events, &t).unwrap_err();
        assert!(
            err.contains("kernel-function egress events sum to"),
            "{err}"
        );
        // The body also reported by the syscall layer's sendfile.
        let mut events = good();
        events.insert(4, data("sendfile", "egress", BODY_LEN, &[]));
        let err = verify(&events, &t).unwrap_err();
        assert!(
            err.contains("egress on the server connection sums to"),
            "{err}"
        );
        // The head written twice.
        let mut events = good();
        events.insert(4, data("write", "egress", t.head.len(), &t.head));
        assert!(verify(&events, &t).unwrap_err().contains("response head"));
        // A page missing.
        let mut events = good();
        events.remove(5);
        assert!(verify(&events, &t).unwrap_err().contains("sum to 95904"));
        // The request duplicated by a kernel-function probe.
        let mut events = good();
        events.insert(3, data("tcp_recvmsg", "ingress", t.request.len(), &[]));
        assert!(verify(&events, &t).unwrap_err().contains("ingress"));
    }

    #[test]
    fn open_summary_and_losses_are_checked() {
        let t = traffic();
        let events: Vec<Value> = good().into_iter().skip(1).collect();
        assert!(verify(&events, &t).unwrap_err().contains("no open event"));
        let mut events = good();
        events[0]["role"] = "unknown".into();
        assert!(verify(&events, &t).unwrap_err().contains("role"));
        let mut events = good();
        events.pop();
        assert!(verify(&events, &t).unwrap_err().contains("no summary"));
        events.push(json!({"type": "summary", "lost": 3}));
        assert!(verify(&events, &t).unwrap_err().contains("lost = 3"));
    }
}
