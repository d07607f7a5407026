//! TLS for the end-to-end tests: a throwaway certificate authority made
//! with the `openssl` CLI, and the real TLS clients — curl, Python's httpx
//! and requests, psycopg, PyMySQL — talking to the TLS variants of the
//! servers in [`crate::servers`] and [`crate::db`] (`Nginx::start_tls`,
//! `Postgres::start_tls`, `Mariadb::start_tls`, `Redis::start_tls`).
//!
//! Every client verifies the server against the test CA (PostgreSQL's
//! `sslmode=require` alone does not verify, as users run it), so a session
//! that completes is a real TLS session with our server.
//!
//! ```no_run
//! use zerotrace_tests::{servers::{Nginx, PythonApp}, tls::{HttpClient, TestCa, python_http}};
//!
//! let ca = TestCa::new()?;
//! let app = PythonApp::start()?;
//! let nginx = Nginx::start_tls(app.port, &ca)?;
//! let body = ca.curl(&[&nginx.url("/a.txt")])?;
//! let run = python_http(HttpClient::Httpx, &ca, &[], &[nginx.url("/api/users/1")])?;
//! assert_eq!(run.lines()[0], "200 24"); // status, body bytes
//! # Ok::<(), anyhow::Error>(())
//! ```

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, ensure};
use tempfile::TempDir;

use crate::servers::curl;

/// The names the server certificate is valid for (its subjectAltName).
pub const SERVER_NAMES: &str = "IP:127.0.0.1,DNS:localhost";

/// The client certificate's subject.
pub const CLIENT_SUBJECT: &str = "/CN=zerotrace test client";

/// A certificate authority for one test: an EC P-256 CA, a server
/// certificate for 127.0.0.1 and localhost, and a client certificate, all
/// signed by the CA and valid for two days. The files live in a temporary
/// directory (mode 0700, root's) removed when this is dropped; servers
/// that run as another user get copies ([`TestCa::install_server_files`]).
pub struct TestCa {
    dir: TempDir,
}

/// A server's copies of the CA certificate, its certificate and its key
/// (mode 0600).
#[derive(Debug, Clone)]
pub struct ServerCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// Makes the CA and both certificates (≈0.1 s).
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("zt-tls-").tempdir()?;
        let ca = TestCa { dir };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        ca.openssl(
            &[
                &["req", "-x509", "-new", "-nodes", "-days", "2"],
                &ec[..],
                &["-keyout", "ca.key", "-out", "ca.crt"],
                &["-subj", "/CN=zerotrace test CA"],
                &["-addext", "basicConstraints=critical,CA:TRUE"],
                &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ]
            .concat(),
        )?;
        ca.leaf("server", "/CN=localhost", "serverAuth", Some(SERVER_NAMES))?;
        ca.leaf("client", CLIENT_SUBJECT, "clientAuth", None)?;
        Ok(ca)
    }

    /// A key and a certificate signed by the CA: `NAME.key`, `NAME.crt`.
    fn leaf(
        &self,
        name: &str,
        subject: &str,
        usage: &str,
        alt_names: Option<&str>,
    ) -> anyhow::Result<()> {
        let mut ext = format!(
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage={usage}\n\
             subjectKeyIdentifier=hash\n\
             authorityKeyIdentifier=keyid,issuer\n"
        );
        if let Some(names) = alt_names {
            ext.push_str(&format!("subjectAltName={names}\n"));
        }
        fs::write(self.path(&format!("{name}.ext")), ext)?;
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        self.openssl(&[
            "req",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            subject,
        ])?;
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &crt,
            "-extfile",
            &ext,
        ])
    }

    fn openssl(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .context("running openssl (Debian package openssl)")?;
        ensure!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA certificate (PEM) clients verify servers with.
    pub fn ca_cert(&self) -> PathBuf {
        self.path("ca.crt")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.path("server.crt")
    }

    pub fn server_key(&self) -> PathBuf {
        self.path("server.key")
    }

    /// A certificate with [`CLIENT_SUBJECT`], for client authentication.
    pub fn client_cert(&self) -> PathBuf {
        self.path("client.crt")
    }

    /// The client certificate's key (mode 0600, as libpq demands).
    pub fn client_key(&self) -> PathBuf {
        self.path("client.key")
    }

    /// Copies the CA certificate and the server's certificate and key into
    /// `dir` as `tls-ca.crt`, `tls-server.crt`, `tls-server.key` (the key
    /// mode 0600); the caller gives them to the server's user.
    pub fn install_server_files(&self, dir: &Path) -> anyhow::Result<ServerCerts> {
        let certs = ServerCerts {
            ca: dir.join("tls-ca.crt"),
            cert: dir.join("tls-server.crt"),
            key: dir.join("tls-server.key"),
        };
        fs::copy(self.ca_cert(), &certs.ca)?;
        fs::copy(self.server_cert(), &certs.cert)?;
        fs::copy(self.server_key(), &certs.key)?;
        fs::set_permissions(&certs.key, fs::Permissions::from_mode(0o600))?;
        Ok(certs)
    }

    /// curl verifying the server with this CA (`--cacert`); see
    /// [`crate::servers::curl`].
    pub fn curl(&self, args: &[&str]) -> anyhow::Result<String> {
        let ca = self.ca_cert();
        let ca = ca.to_string_lossy();
        curl(&[&["--cacert", ca.as_ref()], args].concat())
    }
}

/// A Python client that ran to completion: its pid (the spans' process.pid)
/// and what it printed.
#[derive(Debug, Clone)]
pub struct ClientRun {
    pub pid: u32,
    pub stdout: String,
}

impl ClientRun {
    pub fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }
}

/// Runs `script` with the tests' venv interpreter (Debian's python3, whose
/// `ssl` module uses the system libssl.so.3); fails on a non-zero exit.
pub fn run_python(script: &str, args: &[String]) -> anyhow::Result<ClientRun> {
    let python = crate::otlp::otel_python()?;
    let child = Command::new(&python)
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", python.display()))?;
    let pid = child.id();
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "python client failed ({}): {}{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(ClientRun { pid, stdout })
}

/// Python HTTP client libraries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpClient {
    /// `httpx.Client` (sync), HTTP/1.1.
    Httpx,
    /// `requests.Session`.
    Requests,
}

/// GETs each URL in turn over one kept-alive client with `headers`,
/// verifying the server with the CA. Prints one line per response,
/// `STATUS BODY_BYTES`, then `tls VERSION` for httpx.
const PYTHON_HTTP: &str = r#"
import json, ssl, sys
kind, ca, headers = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
urls = sys.argv[4:]
if kind == "httpx":
    import httpx
    context = ssl.create_default_context(cafile=ca)
    with httpx.Client(verify=context, headers=headers, timeout=10) as client:
        version = None
        for url in urls:
            r = client.get(url)
            stream = r.extensions.get("network_stream")
            ssl_object = stream.get_extra_info("ssl_object") if stream else None
            if ssl_object is not None:
                version = ssl_object.version()
            print(r.status_code, len(r.content), flush=True)
        print("tls", version)
else:
    import requests
    with requests.Session() as session:
        session.headers.update(headers)
        for url in urls:
            r = session.get(url, verify=ca, timeout=10)
            print(r.status_code, len(r.content), flush=True)
"#;

/// Runs `client` on `urls` (see [`PYTHON_HTTP`]'s contract above).
pub fn python_http(
    client: HttpClient,
    ca: &TestCa,
    headers: &[(&str, &str)],
    urls: &[String],
) -> anyhow::Result<ClientRun> {
    let kind = match client {
        HttpClient::Httpx => "httpx",
        HttpClient::Requests => "requests",
    };
    let headers: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).into()))
        .collect();
    let mut args = vec![
        kind.to_owned(),
        ca.ca_cert().display().to_string(),
        serde_json::Value::Object(headers).to_string(),
    ];
    args.extend(urls.iter().cloned());
    run_python(PYTHON_HTTP, &args)
}

/// psycopg 3 (its binary wheel: a bundled libpq with its own libssl) on
/// one connection: prints `ssl True|False`, then per statement its rows,
/// one `|`-joined line each.
const PSYCOPG: &str = r#"
import json, sys, time, psycopg
url, statements = sys.argv[1], json.loads(sys.argv[2])
# The import loaded psycopg's own libssl; the agent probes it within tens
# of milliseconds, as an app's start leaves it before its first query.
time.sleep(0.2)
with psycopg.connect(url, autocommit=True) as conn:
    print("ssl", conn.pgconn.ssl_in_use, flush=True)
    for sql, params in statements:
        cur = conn.execute(sql, params or None)
        if cur.description:
            for row in cur.fetchall():
                print("|".join(str(v) for v in row), flush=True)
"#;

/// Runs `(sql, params)` statements through psycopg on `url` (e.g.
/// `Postgres::url()`, which asks for `sslmode=require` on a TLS server).
/// Parameters are JSON values, bound server-side (`$1` …) as psycopg 3 does.
pub fn psycopg(url: &str, statements: &[(&str, serde_json::Value)]) -> anyhow::Result<ClientRun> {
    let list: Vec<serde_json::Value> = statements
        .iter()
        .map(|(sql, params)| serde_json::json!([sql, params]))
        .collect();
    run_python(
        PSYCOPG,
        &[url.to_owned(), serde_json::Value::Array(list).to_string()],
    )
}

/// PyMySQL to 127.0.0.1:PORT as root, database `zt`, over TLS (`ssl={'ca':
/// CA}`: verified against the CA) when given a CA: prints `tls VERSION`
/// (`None` in clear text), then per statement its rows, tab-joined.
/// PyMySQL interpolates parameters itself: the server sees literals.
const PYMYSQL: &str = r#"
import json, sys, pymysql
port, ca, statements = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
conn = pymysql.connect(host="127.0.0.1", port=port, user="root", database="zt",
                       ssl={"ca": ca} if ca else None, autocommit=True)
print("tls", conn._sock.version() if hasattr(conn._sock, "version") else None, flush=True)
with conn.cursor() as cur:
    for sql, params in statements:
        cur.execute(sql, params or None)
        for row in cur.fetchall():
            print("\t".join(str(v) for v in row), flush=True)
conn.close()
"#;

/// Runs `(sql, params)` statements through PyMySQL, over TLS with `ca`.
pub fn pymysql(
    port: u16,
    ca: Option<&TestCa>,
    statements: &[(&str, serde_json::Value)],
) -> anyhow::Result<ClientRun> {
    let list: Vec<serde_json::Value> = statements
        .iter()
        .map(|(sql, params)| serde_json::json!([sql, params]))
        .collect();
    run_python(
        PYMYSQL,
        &[
            port.to_string(),
            ca.map(|ca| ca.ca_cert().display().to_string())
                .unwrap_or_default(),
            serde_json::Value::Array(list).to_string(),
        ],
    )
}

/// A Python process that has not imported `ssl` yet (no libssl mapped)
/// and makes one HTTPS GET per line on its stdin — importing `ssl` and
/// `http.client` at the first — printing the status. Prints `ready` first.
const LAZY_HTTPS: &str = r#"
import sys
print("ready", flush=True)
for line in sys.stdin:
    import http.client, ssl
    context = ssl.create_default_context(cafile=sys.argv[1])
    conn = http.client.HTTPSConnection("127.0.0.1", int(sys.argv[2]), context=context, timeout=10)
    conn.request("GET", line.strip())
    response = conn.getresponse()
    response.read()
    conn.close()
    print(response.status, flush=True)
"#;

/// A running [`LAZY_HTTPS`] process; killed when dropped.
pub struct LazyHttps {
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    pub pid: u32,
}

impl LazyHttps {
    /// Starts it against 127.0.0.1:`port`; returns once it printed `ready`.
    pub fn start(ca: &TestCa, port: u16) -> anyhow::Result<Self> {
        Self::start_with_env(ca, port, &[])
    }

    /// As [`LazyHttps::start`], with extra environment variables (e.g.
    /// `LD_LIBRARY_PATH` to load a copy of libssl).
    pub fn start_with_env(ca: &TestCa, port: u16, envs: &[(&str, &str)]) -> anyhow::Result<Self> {
        use std::io::BufRead;
        let python = crate::otlp::otel_python()?;
        let mut child = Command::new(&python)
            .envs(envs.iter().copied())
            .arg("-c")
            .arg(LAZY_HTTPS)
            .arg(ca.ca_cert())
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", python.display()))?;
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let pid = child.id();
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let mut lazy = LazyHttps { child, stdout, pid };
        if line.trim() != "ready" {
            let _ = lazy.child.kill();
            anyhow::bail!("the lazy HTTPS client did not start: {line:?}");
        }
        Ok(lazy)
    }

    /// Makes one GET of `path`; returns the status.
    pub fn get(&mut self, path: &str) -> anyhow::Result<u16> {
        use std::io::{BufRead, Write};
        let stdin = self.child.stdin.as_mut().expect("piped");
        writeln!(stdin, "{path}")?;
        stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        line.trim()
            .parse()
            .with_context(|| format!("the lazy HTTPS client printed {line:?}"))
    }

    /// Whether the process maps a libssl now.
    pub fn maps_libssl(&self) -> bool {
        !mapped_libssl(self.pid).is_empty()
    }
}

impl Drop for LazyHttps {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The libssl files process `pid` maps (paths from /proc/PID/maps, each once).
pub fn mapped_libssl(pid: u32) -> Vec<String> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut found: Vec<String> = Vec::new();
    for path in maps.lines().filter_map(|l| l.split_whitespace().nth(5)) {
        let file = path.rsplit('/').next().unwrap_or("");
        if file.starts_with("libssl") && !found.iter().any(|f| f == path) {
            found.push(path.to_owned());
        }
    }
    found
}
