//! Unix domain stream sockets for the end-to-end tests: a Python ASGI app
//! under `uvicorn --uds` with nginx in front of it (`proxy_pass
//! http://unix:PATH:`), Redis on a `unixsocket`, the real database clients
//! over the servers' sockets (`psql -h DIR`, psycopg with `host=DIR`,
//! `mariadb --socket`, `redis-cli -s`, `redis-benchmark -s`), a client
//! whose connection predates the agent (or is killed mid-request), one
//! handed to another process with SCM_RIGHTS, many short connections in a
//! row, and two processes chattering a protocol nobody knows over a
//! `socketpair()`.
//!
//! Socket paths must fit `sun_path` (108 bytes with its NUL): every socket
//! here lives in a directory made under `/tmp` (not `$TMPDIR`, which may be
//! long), e.g. `/tmp/zt-uds-AbC123/app.sock`. Those directories are made
//! traversable by everyone (0755) because nginx's worker runs as `nobody`.
//!
//! ```no_run
//! use zerotrace_tests::{servers::curl, unix::{UdsNginx, UvicornUds}};
//!
//! let app = UvicornUds::start()?;
//! let sock = app.socket_str();
//! let body = curl(&["--unix-socket", &sock, "http://localhost/api/users/1"])?;
//! assert_eq!(body, r#"{"path": "/api/users/1"}"#);
//! let nginx = UdsNginx::start(&app.socket)?;
//! let body = curl(&["-H", "x-tenant-id: t", &nginx.url("/api/users/2")])?;
//! assert_eq!(body, r#"{"path": "/api/users/2", "tenant": "t"}"#);
//! # Ok::<(), anyhow::Error>(())
//! ```

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream, process::ExitStatusExt},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use tempfile::TempDir;

use crate::{
    db::{Mariadb, Postgres, SqlOutput},
    free_port, signal,
    tls::{ClientRun, psycopg},
    wait_for_port, wait_timeout,
};

/// How long a server gets to answer on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A directory for sockets: `/tmp/zt-PREFIX-XXXXXX`, mode 0755.
pub fn socket_dir(prefix: &str) -> anyhow::Result<TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("zt-{prefix}-"))
        .tempdir_in("/tmp")?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

/// The ASGI app uvicorn serves: what [`crate::servers::PythonApp`] answers
/// — JSON `{"path": PATH?QUERY}` for any GET, 500 under /api/fail, plain
/// `ok` on /health — plus `"tenant": VALUE` in the JSON when the request
/// carried `x-tenant-id` (so a test sees what nginx forwarded). Under
/// /api/slow it answers the same JSON after [`SLOW`]. Plain ASGI, no
/// framework.
const UDS_APP: &str = r#"
import asyncio, json

async def app(scope, receive, send):
    assert scope["type"] == "http"
    while (await receive()).get("more_body"):
        pass
    path = scope["path"]
    if path.startswith("/api/slow"):
        await asyncio.sleep(1.0)
    query = scope["query_string"].decode()
    if query:
        path += "?" + query
    headers = dict(scope["headers"])
    if path.startswith("/api/fail"):
        code, body = 500, b'{"error":"boom"}'
    elif path.startswith("/health"):
        code, body = 200, b"ok"
    else:
        doc = {"path": path}
        if b"x-tenant-id" in headers:
            doc["tenant"] = headers[b"x-tenant-id"].decode()
        code, body = 200, json.dumps(doc).encode()
    await send({
        "type": "http.response.start",
        "status": code,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    })
    await send({"type": "http.response.body", "body": body})
"#;

/// How long [`UDS_APP`] takes to answer under /api/slow.
pub const SLOW: Duration = Duration::from_secs(1);

/// [`UDS_APP`] under uvicorn (the tests' venv) listening on
/// `/tmp/zt-uds-XXXXXX/app.sock` only: one process (`--workers 1`),
/// asyncio loop, h11, HTTP/1.1 keep-alive with a 600 s idle timeout (the
/// default 5 s would close a connection made before a slow agent start).
/// Killed when dropped.
pub struct UvicornUds {
    child: Child,
    /// uvicorn's process (it serves in-process with one worker).
    pub pid: u32,
    /// The listening socket (mode 0666, as uvicorn makes it).
    pub socket: PathBuf,
    pub dir: TempDir,
}

impl UvicornUds {
    /// Starts uvicorn; returns once `/health` answers over the socket (≈1 s).
    pub fn start() -> anyhow::Result<Self> {
        let dir = socket_dir("uds")?;
        std::fs::write(dir.path().join("uds_app.py"), UDS_APP)?;
        let socket = dir.path().join("app.sock");
        let mut cmd = Command::new(crate::otlp::otel_python()?);
        cmd.args(["-m", "uvicorn", "uds_app:app", "--app-dir"])
            .arg(dir.path())
            .arg("--uds")
            .arg(&socket)
            .args(["--workers", "1", "--loop", "asyncio", "--http", "h11"])
            .args(["--lifespan", "off", "--timeout-keep-alive", "600"])
            .args(["--log-level", "warning"])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().context("starting uvicorn --uds")?;
        let mut app = UvicornUds {
            pid: child.id(),
            child,
            socket,
            dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(reply) = http_over_unix(&app.socket, "/health")
                && reply.starts_with("HTTP/1.1 200")
            {
                return Ok(app);
            }
            if let Ok(Some(status)) = app.child.try_wait() {
                bail!("uvicorn --uds exited ({status}) before /health answered");
            }
            if Instant::now() >= deadline {
                bail!("uvicorn --uds: /health did not answer within {START_TIMEOUT:?}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The socket path as a string (for curl's `--unix-socket`).
    pub fn socket_str(&self) -> String {
        self.socket.display().to_string()
    }
}

impl Drop for UvicornUds {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `GET path` over a fresh connection to the Unix socket `socket`
/// (`Connection: close`); the whole reply, headers and body.
pub fn http_over_unix(socket: &Path, path: &str) -> anyhow::Result<String> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok(reply)
}

/// nginx with one worker listening on 127.0.0.1:`port` (TCP) and proxying
/// every request to a Unix socket: `proxy_pass http://unix:PATH:;` with
/// HTTP/1.1, no upstream keep-alive pool (a new Unix connection per
/// request, as the usual configuration does). The worker runs as `nobody`:
/// the socket's directory must be traversable and the socket writable by
/// it (true of [`UvicornUds`]). Stopped with SIGTERM when dropped.
pub struct UdsNginx {
    master: Child,
    pub port: u16,
    pub dir: TempDir,
}

impl UdsNginx {
    pub fn start(upstream: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("zt-nginx-uds-").tempdir()?;
        std::fs::create_dir_all(dir.path().join("tmp"))?;
        let port = free_port();
        let d = dir.path().display().to_string();
        let head = crate::servers::nginx_head(&d, 256);
        let upstream = upstream.display();
        let conf = format!(
            r#"
{head}
    fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp;
    scgi_temp_path {d}/tmp;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://unix:{upstream}:;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let master = Command::new("nginx")
            .args(["-c", &conf_path.to_string_lossy(), "-p"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting nginx")?;
        let nginx = UdsNginx { master, port, dir };
        if let Err(e) = wait_for_port(port, Duration::from_secs(10)) {
            bail!("nginx did not start: {e}; {}", nginx.error_log());
        }
        Ok(nginx)
    }

    /// `http://127.0.0.1:PORT{path}`
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn master_pid(&self) -> u32 {
        self.master.id()
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for UdsNginx {
    /// SIGTERM lets the master stop its worker too.
    fn drop(&mut self) {
        signal(&self.master, libc::SIGTERM);
        if wait_timeout(&mut self.master, Duration::from_secs(5)).is_none() {
            let _ = self.master.kill();
            let _ = self.master.wait();
        }
    }
}

// ------------------------------------------------------------- databases

/// libpq's connection string for `pg`'s Unix socket: `host=DIR port=PORT
/// user=postgres dbname=zt` (a host starting with `/` is a socket
/// directory).
pub fn pg_unix_conninfo(pg: &Postgres) -> String {
    format!(
        "host={} port={} user=postgres dbname=zt",
        pg.dir.path().display(),
        pg.port
    )
}

/// [`crate::tls::psycopg`] over `pg`'s Unix socket ([`pg_unix_conninfo`]):
/// prints `ssl False`, then each statement's rows.
pub fn psycopg_unix(
    pg: &Postgres,
    statements: &[(&str, serde_json::Value)],
) -> anyhow::Result<ClientRun> {
    psycopg(&pg_unix_conninfo(pg), statements)
}

/// MariaDB's Unix socket, `DIR/mysqld.sock` (its `--socket`).
pub fn mariadb_socket(my: &Mariadb) -> PathBuf {
    my.dir.path().join("mysqld.sock")
}

/// The real `mariadb` client over the server's socket: `mariadb
/// --no-defaults --socket=S -u root --batch --skip-column-names --force zt`,
/// the statements on stdin (no `-h`: host `localhost` means the socket).
/// Same contract as [`Mariadb::mysql`]: `ok` is false when a statement
/// failed; failing to connect is an error.
pub fn mariadb_unix(my: &Mariadb, sql: &str) -> anyhow::Result<SqlOutput> {
    let mut cmd = Command::new("mariadb");
    cmd.arg("--no-defaults")
        .arg(format!("--socket={}", mariadb_socket(my).display()))
        .args([
            "-u",
            "root",
            "--batch",
            "--skip-column-names",
            "--force",
            "zt",
        ]);
    let out = with_stdin(&mut cmd, sql)?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    if stderr.contains("ERROR 20") || out.status.code().is_none() {
        bail!("mariadb failed ({}): {stderr}", out.status);
    }
    let ok = out.status.success() && !stderr.contains("ERROR ");
    Ok((stdout, stderr, ok))
}

/// Runs `cmd` with `input` (and a newline) on its stdin.
fn with_stdin(cmd: &mut Command, input: &str) -> anyhow::Result<std::process::Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = format!("{input}\n");
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = child.wait_with_output()?;
    let _ = writer.join();
    Ok(out)
}

/// redis-server 7 on a Unix socket only (`--port 0 --unixsocket
/// /tmp/zt-redis-uds-XXXXXX/redis.sock --unixsocketperm 777`), no
/// persistence. Killed when dropped.
pub struct RedisUds {
    server: Child,
    pub pid: u32,
    pub socket: PathBuf,
    pub dir: TempDir,
}

impl RedisUds {
    /// Starts redis-server; returns once it answers PING on the socket.
    pub fn start() -> anyhow::Result<Self> {
        let dir = socket_dir("redis-uds")?;
        let socket = dir.path().join("redis.sock");
        let server = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args(["--unixsocketperm", "777"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(dir.path().join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting redis-server (Debian package redis-server)")?;
        let mut redis = RedisUds {
            pid: server.id(),
            server,
            socket,
            dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if redis.ping().is_ok_and(|r| r.starts_with("+PONG")) {
                return Ok(redis);
            }
            if let Ok(Some(status)) = redis.server.try_wait() {
                bail!("redis-server exited ({status}): {}", redis.log());
            }
            if Instant::now() >= deadline {
                bail!(
                    "redis-server did not answer on {} within {START_TIMEOUT:?}: {}",
                    redis.socket.display(),
                    redis.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping(&self) -> anyhow::Result<String> {
        let mut s = UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"PING\r\n")?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// `redis-cli -s SOCKET ARGS`; returns stdout. Error replies are printed
    /// (`ERR …`) and are not an error; failing to connect is.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        self.tool("redis-cli", args)
    }

    /// `redis-benchmark -s SOCKET ARGS`; returns stdout.
    pub fn benchmark(&self, args: &[&str]) -> anyhow::Result<String> {
        self.tool("redis-benchmark", args)
    }

    fn tool(&self, tool: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(tool)
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {tool} (Debian package redis-tools)"))?;
        ensure!(
            out.status.success(),
            "{tool} {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The socket path as a string (span attributes carry it so).
    pub fn socket_str(&self) -> String {
        self.socket.display().to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }
}

impl Drop for RedisUds {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

// ------------------------------------- a connection older than the agent

/// Connects to a Unix socket at once, makes `BEFORE` GETs (`/api/before/I`)
/// on that connection, prints `ready`, then makes one GET per stdin line
/// (the line is the target) on the same connection, printing
/// `STATUS same|new BODY` — `new` if http.client had to reconnect.
/// Every request carries `x-tenant-id: TENANT` unless TENANT is empty.
const HELD_CONNECTION: &str = r#"
import http.client, socket, sys
path, tenant, before = sys.argv[1], sys.argv[2], int(sys.argv[3])
headers = {"x-tenant-id": tenant} if tenant else {}

class UnixConnection(http.client.HTTPConnection):
    def __init__(self):
        super().__init__("localhost", timeout=10)

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(path)
        self.sock = s

conn = UnixConnection()
conn.connect()
first = conn.sock

def get(target):
    conn.request("GET", target, headers=headers)
    response = conn.getresponse()
    body = response.read().decode()
    return response.status, ("same" if conn.sock is first else "new"), body

for i in range(before):
    get(f"/api/before/{i}")
print("ready", flush=True)
for line in sys.stdin:
    status, same, body = get(line.strip())
    print(status, same, body, flush=True)
"#;

/// A Python client (the tests' venv) holding one HTTP/1.1 keep-alive
/// connection to a Unix socket, opened when it starts — typically before
/// the agent — and used for every [`HeldConnection::get`] afterwards (a
/// pooled connection). Killed when dropped.
pub struct HeldConnection {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub pid: u32,
}

/// One response on a [`HeldConnection`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldResponse {
    pub status: u16,
    /// Still the connection opened at the start.
    pub same_connection: bool,
    pub body: String,
}

impl HeldConnection {
    /// Connects to `socket` and makes `before` requests on the connection
    /// (`GET /api/before/0` …); returns once that is done. `tenant` ("" for
    /// none) goes into every request's `x-tenant-id`.
    pub fn start(socket: &Path, tenant: &str, before: usize) -> anyhow::Result<Self> {
        let python = crate::otlp::otel_python()?;
        let mut child = Command::new(&python)
            .arg("-c")
            .arg(HELD_CONNECTION)
            .arg(socket)
            .arg(tenant)
            .arg(before.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", python.display()))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut held = HeldConnection {
            pid: child.id(),
            child,
            stdin,
            stdout,
        };
        let line = held.line()?;
        if line != "ready" {
            bail!("the held-connection client did not start: {line:?}");
        }
        Ok(held)
    }

    fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        Ok(line.trim_end().to_owned())
    }

    /// One GET of `target` on the held connection.
    pub fn get(&mut self, target: &str) -> anyhow::Result<HeldResponse> {
        writeln!(self.stdin, "{target}")?;
        self.stdin.flush()?;
        let line = self.line()?;
        let mut parts = line.splitn(3, ' ');
        let (Some(status), Some(same), Some(body)) = (parts.next(), parts.next(), parts.next())
        else {
            bail!("the held-connection client printed {line:?}");
        };
        Ok(HeldResponse {
            status: status
                .parse()
                .with_context(|| format!("status in {line:?}"))?,
            same_connection: same == "same",
            body: body.to_owned(),
        })
    }

    /// Sends `GET target` on the held connection and kills the client
    /// (SIGKILL) `after` later, before the answer: `target` must take
    /// longer than that to answer (/api/slow, [`SLOW`]). Fails if the answer
    /// came first or the client had died by itself.
    pub fn kill_during(mut self, target: &str, after: Duration) -> anyhow::Result<()> {
        writeln!(self.stdin, "{target}")?;
        self.stdin.flush()?;
        thread::sleep(after);
        self.child.kill()?;
        let status = self.child.wait()?;
        ensure!(
            status.signal() == Some(libc::SIGKILL),
            "the held-connection client was not killed mid-request: {status}"
        );
        let line = self.line()?;
        ensure!(
            line.is_empty(),
            "the held-connection client got its answer before it was killed: {line:?}"
        );
        Ok(())
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------- a connection passed to another process

/// Connects to a Unix socket (argv 1) and makes one keep-alive GET per
/// target of argv 2 (comma-separated) on that connection; then starts a
/// receiver process, hands it the connection over a socketpair with
/// SCM_RIGHTS (`socket.send_fds`), closes its own copy and waits for the
/// receiver, which makes one GET per target of argv 3 on the connection it
/// got. Each GET prints `PID STATUS BODY` (the process that made it); the
/// last line is `done RECEIVER_PID EXIT_CODE`.
const PASSED_CONNECTION: &str = r#"
import http.client, os, socket, subprocess, sys
path, first, second = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")

RECEIVER = r'''
import http.client, os, socket, sys
control = socket.socket(fileno=int(sys.argv[1]))
_, fds, _, _ = socket.recv_fds(control, 16, 1)
assert len(fds) == 1, fds
conn = http.client.HTTPConnection("localhost", timeout=10)
conn.sock = socket.socket(fileno=fds[0])
assert conn.sock.family == socket.AF_UNIX
for target in sys.argv[2:]:
    conn.request("GET", target)
    response = conn.getresponse()
    print(os.getpid(), response.status, response.read().decode(), flush=True)
'''

s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
conn = http.client.HTTPConnection("localhost", timeout=10)
conn.sock = s
for target in first:
    conn.request("GET", target)
    response = conn.getresponse()
    print(os.getpid(), response.status, response.read().decode(), flush=True)
mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(theirs.fileno()), *second],
                            pass_fds=[theirs.fileno()])
theirs.close()
socket.send_fds(mine, [b"c"], [s.fileno()])
conn.sock = None
s.close()
code = receiver.wait(timeout=60)
print("done", receiver.pid, code, flush=True)
"#;

/// What [`pass_connection`] saw.
#[derive(Debug, Clone)]
pub struct PassedRun {
    /// The process that opened the connection.
    pub first_pid: u32,
    /// The process it handed the connection to.
    pub second_pid: u32,
    /// Each GET as (the pid that made it, status, body), in order.
    pub responses: Vec<(u32, u16, String)>,
}

/// One HTTP/1.1 connection to the Unix socket `socket`, used by two
/// processes in turn (the tests' venv Python): the one that opened it
/// GETs each of `first`, then passes it to another process with
/// SCM_RIGHTS and closes its own descriptor; that one GETs each of
/// `second` on the same connection ([`PASSED_CONNECTION`]). Returns once
/// both are done.
pub fn pass_connection(
    socket: &Path,
    first: &[&str],
    second: &[&str],
) -> anyhow::Result<PassedRun> {
    let python = crate::otlp::otel_python()?;
    let child = Command::new(&python)
        .arg("-c")
        .arg(PASSED_CONNECTION)
        .arg(socket)
        .arg(first.join(","))
        .arg(second.join(","))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", python.display()))?;
    let first_pid = child.id();
    let out = child.wait_with_output()?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    ensure!(
        out.status.success(),
        "the passed-connection client failed ({}): {stdout}{stderr}",
        out.status
    );
    let mut responses = Vec::new();
    let mut second_pid = None;
    for line in stdout.lines() {
        let mut parts = line.splitn(3, ' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("done"), Some(pid), Some("0")) => second_pid = pid.parse().ok(),
            (Some(pid), Some(status), Some(body)) => responses.push((
                pid.parse().with_context(|| format!("pid in {line:?}"))?,
                status
                    .parse()
                    .with_context(|| format!("status in {line:?}"))?,
                body.to_owned(),
            )),
            _ => bail!("the passed-connection client printed {line:?}: {stderr}"),
        }
    }
    let second_pid =
        second_pid.with_context(|| format!("the receiver did not finish: {stdout}{stderr}"))?;
    Ok(PassedRun {
        first_pid,
        second_pid,
        responses,
    })
}

// ------------------------------------------------ many short connections

/// For I in 0..N (argv 3): connects to the Unix socket of argv 1, sends
/// `GET PREFIX{I}` (argv 2) with `Connection: close`, reads the reply to
/// the end and closes. Prints the status line of each reply that is not a
/// 200, then `done N BAD`.
const SHORT_CONNECTIONS: &str = r#"
import socket, sys
path, prefix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
bad = 0
for i in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    s.sendall(f"GET {prefix}{i} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    reply = b""
    while chunk := s.recv(65536):
        reply += chunk
    s.close()
    if not reply.startswith(b"HTTP/1.1 200 "):
        bad += 1
        print(i, reply.split(b"\r\n", 1)[0].decode(errors="replace"), flush=True)
print("done", n, bad, flush=True)
"#;

/// GETs of `{prefix}0` … `{prefix}{n-1}` to the Unix socket `socket`, each
/// on a connection of its own, one after the other, from one Python
/// process (the tests' venv, [`SHORT_CONNECTIONS`]); returns that
/// process's pid once every reply was a 200.
pub fn short_connections(socket: &Path, prefix: &str, n: usize) -> anyhow::Result<u32> {
    let python = crate::otlp::otel_python()?;
    let child = Command::new(&python)
        .arg("-c")
        .arg(SHORT_CONNECTIONS)
        .arg(socket)
        .arg(prefix)
        .arg(n.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", python.display()))?;
    let pid = child.id();
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && stdout.ends_with(&format!("done {n} 0\n")),
        "the short-connection client ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(pid)
}

// --------------------------------------- a protocol nobody knows, paired

/// A parent and a child (started with `pass_fds`) on the two ends of a
/// `socketpair(AF_UNIX, SOCK_STREAM)`: the parent sends a frame, the child
/// answers with one, over and over. A frame is 8 bytes of header — the
/// magic `fe ed 5a 54` ("\xfe\xedZT") and the payload length as 4 bytes
/// big-endian — and 64…1024 random bytes; each frame is one `send`, read
/// as two `recv`s (header, payload) and more if short. Nothing about it
/// looks like HTTP, PostgreSQL, MySQL or Redis. It pauses 1 ms every 100
/// round trips so that it does not hog a core.
///
/// The parent prints `ready CHILD_PID`; for each stdin line it prints
/// `frames N` (frames both ends sent so far); at stdin's end it stops,
/// prints `frames N` once more and waits for the child, which exits when
/// its end reads EOF.
const SOCKETPAIR: &str = r#"
import random, socket, struct, subprocess, sys, threading, time
MAGIC = b"\xfe\xedZT"
CHILD = r'''
import random, socket, struct, sys
MAGIC = b"\xfe\xedZT"
s = socket.socket(fileno=int(sys.argv[1]))
def exactly(n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            sys.exit(0)
        buf += chunk
    return buf
while True:
    head = exactly(8)
    assert head[:4] == MAGIC, head
    exactly(struct.unpack(">I", head[4:])[0])
    n = random.randint(64, 1024)
    s.sendall(MAGIC + struct.pack(">I", n) + random.randbytes(n))
'''
mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
child = subprocess.Popen([sys.executable, "-c", CHILD, str(theirs.fileno())],
                         pass_fds=[theirs.fileno()])
theirs.close()
frames = 0
stop = threading.Event()

def control():
    for _ in sys.stdin:
        print("frames", frames, flush=True)
    stop.set()

def exactly(n):
    buf = b""
    while len(buf) < n:
        chunk = mine.recv(n - len(buf))
        if not chunk:
            raise SystemExit("the child closed its end")
        buf += chunk
    return buf

threading.Thread(target=control, daemon=True).start()
print("ready", child.pid, flush=True)
rounds = 0
while not stop.is_set():
    n = random.randint(64, 1024)
    mine.sendall(MAGIC + struct.pack(">I", n) + random.randbytes(n))
    head = exactly(8)
    assert head[:4] == MAGIC, head
    exactly(struct.unpack(">I", head[4:])[0])
    frames += 2
    rounds += 1
    if rounds % 100 == 0:
        time.sleep(0.001)
mine.close()
child.wait(timeout=10)
print("frames", frames, flush=True)
"#;

/// Two Python processes exchanging binary frames over a socketpair (see
/// [`SOCKETPAIR`]) until stopped or dropped.
pub struct SocketpairChatter {
    parent: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// The process that made the pair.
    pub parent_pid: u32,
    /// The process it passed one end to.
    pub child_pid: u32,
}

impl SocketpairChatter {
    /// Starts both processes; returns once they are exchanging frames.
    pub fn start() -> anyhow::Result<Self> {
        let python = crate::otlp::otel_python()?;
        let mut parent = Command::new(&python)
            .args(["-c", SOCKETPAIR])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", python.display()))?;
        let stdin = parent.stdin.take();
        let mut stdout = BufReader::new(parent.stdout.take().expect("piped"));
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let parent_pid = parent.id();
        let child_pid = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok());
        let mut chatter = SocketpairChatter {
            parent,
            stdin,
            stdout,
            parent_pid,
            child_pid: child_pid.unwrap_or(0),
        };
        if child_pid.is_none() {
            bail!("the socketpair parent did not start: {line:?}");
        }
        chatter.wait_for_frames(2, Duration::from_secs(10))?;
        Ok(chatter)
    }

    fn wait_for_frames(&mut self, at_least: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.frames()? < at_least {
            if Instant::now() >= deadline {
                bail!("the socketpair exchanged no frames within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Frames both ends sent so far.
    pub fn frames(&mut self) -> anyhow::Result<u64> {
        let stdin = self.stdin.as_mut().context("already stopped")?;
        writeln!(stdin)?;
        stdin.flush()?;
        self.read_frames()
    }

    fn read_frames(&mut self) -> anyhow::Result<u64> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        line.trim()
            .strip_prefix("frames ")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("the socketpair parent printed {line:?}"))
    }

    /// Stops both processes; returns the frames exchanged in all.
    pub fn stop(mut self) -> anyhow::Result<u64> {
        drop(self.stdin.take());
        let frames = self.read_frames()?;
        let status = wait_timeout(&mut self.parent, Duration::from_secs(15))
            .context("the socketpair parent did not exit")?;
        ensure!(status.success(), "the socketpair parent failed: {status}");
        Ok(frames)
    }
}

impl Drop for SocketpairChatter {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if wait_timeout(&mut self.parent, Duration::from_secs(5)).is_none() {
            let _ = self.parent.kill();
            let _ = self.parent.wait();
        }
        // The child exits by itself: the parent's end closes with the
        // parent, and the child reads EOF.
    }
}
