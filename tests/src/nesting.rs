//! Nesting under concurrency: `tests/apps/nesting_app.py` under wrk, and a
//! score of its client spans against the parents its request ids say they
//! must have. Shared by the end-to-end tests and `cargo xtask bench nesting`.

use std::{
    collections::HashMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::Context;

use crate::{
    db::{Postgres, Redis, apps_dir, wait_for_health},
    free_port,
    load::{LoadResult, output, parse_wrk},
    otlp::ReceivedSpan,
};

/// How uvicorn runs the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventLoop {
    /// asyncio's default loop with h11.
    Asyncio,
    /// uvloop with httptools.
    Uvloop,
}

impl EventLoop {
    pub fn name(self) -> &'static str {
        match self {
            Self::Asyncio => "asyncio+h11",
            Self::Uvloop => "uvloop+httptools",
        }
    }

    fn uvicorn_args(self) -> [&'static str; 4] {
        match self {
            Self::Asyncio => ["--loop", "asyncio", "--http", "h11"],
            Self::Uvloop => ["--loop", "uvloop", "--http", "httptools"],
        }
    }
}

/// One uvicorn process running `nesting_app:app`; killed when dropped.
pub struct NestingApp {
    child: Child,
    pub port: u16,
    pub pid: u32,
}

impl NestingApp {
    /// Starts the app with `python` (a venv's interpreter with FastAPI,
    /// uvicorn, redis-py, psycopg, httpx and uvloop) calling `backend`.
    pub fn start(
        python: &Path,
        pg: &Postgres,
        redis: &Redis,
        backend: &str,
        event_loop: EventLoop,
    ) -> anyhow::Result<Self> {
        let port = free_port();
        let child = Command::new(python)
            .args(["-m", "uvicorn", "nesting_app:app", "--host", "127.0.0.1"])
            .args(["--port", &port.to_string(), "--workers", "1"])
            .args(event_loop.uvicorn_args())
            .args(["--log-level", "warning", "--no-access-log"])
            .current_dir(apps_dir())
            .env("PG_URL", pg.url())
            .env("REDIS_PORT", redis.port.to_string())
            .env("BACKEND", backend)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting uvicorn with {}", python.display()))?;
        let mut app = NestingApp {
            pid: child.id(),
            child,
            port,
        };
        wait_for_health(&mut app.child, port, "nesting_app")?;
        Ok(app)
    }

    /// `http://127.0.0.1:PORT{path}`
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for NestingApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// wrk on `base` + `/{handler}/{id}` with a fresh id per request (unique
/// across wrk's connections: a random prefix per run, then a counter).
pub fn wrk_with_ids(
    base: &str,
    handler: &str,
    connections: u32,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    let script = std::env::temp_dir().join(format!("zt-nesting-{}.lua", std::process::id()));
    std::fs::write(
        &script,
        format!(
            "math.randomseed(os.time())\n\
             local n = math.random(1, 900000) * 1000\n\
             request = function()\n  n = n + 1\n  \
             return wrk.format(\"GET\", \"/{handler}/\" .. n)\nend\n"
        ),
    )?;
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", &format!("-c{connections}")])
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("--latency")
        .arg("-s")
        .arg(&script)
        .arg(base);
    let text = output(&mut cmd, "wrk");
    let _ = std::fs::remove_file(&script);
    let text = text?;
    parse_wrk(&text).with_context(|| format!("reading wrk's output:\n{text}"))
}

/// How the client spans of one process nested.
#[derive(Debug, Clone, Default)]
pub struct Score {
    /// Client spans made for a request (they carry a request id).
    pub client_spans: u64,
    /// Children of the server span of their own request.
    pub right: u64,
    pub root: u64,
    /// Children of anything else.
    pub wrong: u64,
    /// Up to five wrong ones, for the report.
    pub wrong_examples: Vec<String>,
    /// Up to three roots, for the report.
    pub root_examples: Vec<String>,
}

impl Score {
    pub fn right_share(&self) -> f64 {
        if self.client_spans == 0 {
            0.0
        } else {
            self.right as f64 / self.client_spans as f64
        }
    }
}

/// The request id a span names: `/async/ID`, `/sync/ID` or `/backend/ID`
/// in its URL, `rid:ID` in a Redis command, `AS rID` in SQL.
pub fn request_id(span: &ReceivedSpan) -> Option<u64> {
    let text = ["url.full", "url.path", "db.query.text"]
        .iter()
        .find_map(|k| span.attr_str(k))?;
    for marker in ["/async/", "/sync/", "/backend/", "rid:", " AS r", " as r"] {
        if let Some(i) = text.find(marker) {
            let digits: String = text[i + marker.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if let Ok(id) = digits.parse() {
                return Some(id);
            }
        }
    }
    None
}

/// A span without a response seen (none came, or it went by unseen) has
/// no known end: its place within its parent cannot be judged.
fn unknown_end(span: &ReceivedSpan) -> bool {
    span.attr_str("error.type") == Some("no_response")
        || span.attributes.get("zerotrace.response.lost") == Some(&serde_json::Value::Bool(true))
}

fn pid_of(span: &ReceivedSpan) -> Option<u64> {
    span.resource.get("process.pid")?.as_u64()
}

/// Scores the CLIENT spans of the processes `pids` made for their
/// `/{handler}/ID` requests: right when the parent is the same process's
/// SERVER span of the same id.
pub fn score(spans: &[ReceivedSpan], pids: &[u32], handler: &str) -> Score {
    let by_id: HashMap<&str, &ReceivedSpan> =
        spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let prefix = format!("/{handler}/");
    let ours =
        |s: &ReceivedSpan| pid_of(s).is_some_and(|p| pids.iter().any(|&x| u64::from(x) == p));
    let handled: std::collections::HashSet<u64> = spans
        .iter()
        .filter(|s| s.kind == "SERVER" && ours(s))
        .filter(|s| {
            s.attr_str("url.path")
                .is_some_and(|p| p.starts_with(&prefix))
        })
        .filter_map(request_id)
        .collect();
    let mut score = Score::default();
    for span in spans {
        if span.kind != "CLIENT" || !ours(span) {
            continue;
        }
        let Some(id) = request_id(span).filter(|id| handled.contains(id)) else {
            continue;
        };
        score.client_spans += 1;
        if span.parent_span_id.is_empty() {
            score.root += 1;
            if score.root_examples.len() < 3 {
                score.root_examples.push(span.brief());
            }
            continue;
        }
        let parent = by_id.get(span.parent_span_id.as_str());
        let right = parent.is_some_and(|p| {
            p.kind == "SERVER" && pid_of(p) == pid_of(span) && request_id(p) == Some(id)
        });
        if right {
            score.right += 1;
        } else {
            score.wrong += 1;
            if score.wrong_examples.len() < 5 {
                let mut line = span.brief();
                match parent {
                    Some(p) => {
                        let _ = write!(line, "\n    parent: {}", p.brief());
                    }
                    None => line.push_str("\n    parent: not received"),
                }
                score.wrong_examples.push(line);
            }
        }
    }
    score
}

/// SERVER spans whose parent is an answered CLIENT span of another process
/// (a link made across processes), and how many of them do not lie within
/// their parent. Their times come from two processes' syscalls: a send
/// must be stamped before the receive it feeds for the child to fit. Pairs
/// where either side saw no response are left out: a client that gave up
/// may well end before the server does, and a span without a response
/// ends at its connection's last record.
#[derive(Debug, Default)]
pub struct Containment {
    pub linked: u64,
    pub outside: u64,
    /// Up to five that stick out, for the report.
    pub examples: Vec<String>,
}

pub fn containment(spans: &[ReceivedSpan]) -> Containment {
    let by_id: HashMap<&str, &ReceivedSpan> =
        spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let mut found = Containment::default();
    for span in spans.iter().filter(|s| s.kind == "SERVER") {
        let Some(parent) = by_id.get(span.parent_span_id.as_str()) else {
            continue;
        };
        if parent.kind != "CLIENT"
            || pid_of(parent) == pid_of(span)
            || unknown_end(parent)
            || unknown_end(span)
        {
            continue;
        }
        found.linked += 1;
        if span.start_ns < parent.start_ns || span.end_ns > parent.end_ns {
            found.outside += 1;
            if found.examples.len() < 5 {
                found.examples.push(format!(
                    "{}\n    starts {} ns after, ends {} ns before its parent {}",
                    span.brief(),
                    span.start_ns as i64 - parent.start_ns as i64,
                    parent.end_ns as i64 - span.end_ns as i64,
                    parent.brief()
                ));
            }
        }
    }
    found
}

/// The nesting app's interpreters: a venv per interpreter under
/// `~/.cache/zerotrace/venv-nesting-NAME`, made with `python -m venv` and
/// the app's packages (the tests' OTel venv serves Debian's python3).
pub fn venv_python(interpreter: &Path) -> anyhow::Result<PathBuf> {
    let name: String = interpreter
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let venv = PathBuf::from(home).join(format!(".cache/zerotrace/venv-nesting{name}"));
    let python = venv.join("bin/python");
    let stamp = venv.join(".zerotrace-nesting");
    if stamp.is_file() {
        return Ok(python);
    }
    let run = |cmd: &mut Command, what: &str| -> anyhow::Result<()> {
        let out = cmd.output().with_context(|| what.to_owned())?;
        anyhow::ensure!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    run(
        Command::new(interpreter)
            .args(["-m", "venv", "--clear"])
            .arg(&venv),
        "making the nesting venv",
    )?;
    run(
        Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(APP_PACKAGES),
        "installing the nesting app's packages",
    )?;
    std::fs::write(&stamp, APP_PACKAGES.join("\n"))?;
    Ok(python)
}

/// What the nesting app runs on.
pub const APP_PACKAGES: &[&str] = &[
    "fastapi>=0.115",
    "uvicorn>=0.34",
    "psycopg[binary]>=3.2",
    "redis>=5.2",
    "httpx>=0.28",
    "uvloop>=0.21",
    "httptools>=0.6",
];

/// nginx as a reverse proxy in front of `upstream_port`: one worker, every
/// path proxied over HTTP/1.1; `keepalive` idle upstream connections kept
/// (0: a new upstream connection per request). Stopped when dropped.
pub struct Proxy {
    master: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Proxy {
    pub fn start(upstream_port: u16, keepalive: u32) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let d = dir.path().display();
        let (keep, version, connection) = if keepalive > 0 {
            (format!("keepalive {keepalive};"), "1.1", "\"\"")
        } else {
            (String::new(), "1.0", "close")
        };
        let head = crate::servers::nginx_head(&d.to_string(), 1024);
        let conf = format!(
            r#"
{head}
    upstream app {{
        server 127.0.0.1:{upstream_port};
        {keep}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version {version};
            proxy_set_header Connection {connection};
        }}
    }}
}}
"#
        );
        std::fs::create_dir_all(dir.path().join("tmp"))?;
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let master = Command::new("nginx")
            .args(["-c", &conf_path.to_string_lossy(), "-p"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting nginx")?;
        crate::wait_for_port(port, Duration::from_secs(10))?;
        Ok(Self {
            master,
            port,
            _dir: dir,
        })
    }

    /// The worker processes (children of the master).
    pub fn workers(&self) -> Vec<u32> {
        let pid = self.master.id();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// `http://127.0.0.1:PORT{path}`
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        crate::signal(&self.master, libc::SIGQUIT);
        let _ = crate::wait_timeout(&mut self.master, Duration::from_secs(5));
        let _ = self.master.kill();
        let _ = self.master.wait();
    }
}
