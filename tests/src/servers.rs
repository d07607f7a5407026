//! Real servers for the HTTP tests: nginx (static files, and a reverse
//! proxy under /api/) in front of a small Python HTTP/1.1 app; nginx also
//! over TLS ([`Nginx::start_tls`]).

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{Guard, free_port, signal, wait_for_port, wait_timeout};

/// The Python app: JSON for any GET, 500 under /api/fail, plain "ok" on
/// /health. HTTP/1.1 with keep-alive, one thread per connection.
const APP: &str = r#"
import http.server, json, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path.startswith("/api/fail"):
            code, body = 500, b'{"error":"boom"}'
        elif self.path.startswith("/health"):
            code, body = 200, b"ok"
        else:
            code, body = 200, json.dumps({"path": self.path}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#;

pub struct PythonApp {
    _guard: Guard,
    pub pid: u32,
    pub port: u16,
}

impl PythonApp {
    pub fn start() -> anyhow::Result<Self> {
        let port = free_port();
        let child = Command::new("python3")
            .args(["-c", APP, &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let pid = child.id();
        let guard = Guard(child);
        wait_for_port(port, Duration::from_secs(10))?;
        Ok(Self {
            _guard: guard,
            pid,
            port,
        })
    }
}

/// nginx with one worker: static files from `www/`, `/api/` proxied to
/// the app over HTTP/1.1 keep-alive.
pub struct Nginx {
    master: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// `https` when started with [`Nginx::start_tls`], else `http`.
    pub scheme: &'static str,
}

/// Static files nginx serves, with their sizes known to the tests.
pub const STATIC_FILES: [(&str, usize); 3] =
    [("index.html", 1200), ("a.txt", 333), ("b.txt", 4444)];

impl Nginx {
    pub fn start(upstream_port: u16) -> anyhow::Result<Self> {
        Self::start_with(upstream_port, None)
    }

    /// The master process (the worker is its child).
    pub fn pid(&self) -> u32 {
        self.master.id()
    }

    /// The same server over TLS only (`listen … ssl`, HTTP/1.1): the
    /// certificate of `ca` for 127.0.0.1; `/api/` is still proxied to the
    /// app in clear text.
    pub fn start_tls(upstream_port: u16, ca: &crate::tls::TestCa) -> anyhow::Result<Self> {
        Self::start_with(upstream_port, Some(ca))
    }

    fn start_with(upstream_port: u16, ca: Option<&crate::tls::TestCa>) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let www = dir.path().join("www");
        std::fs::create_dir_all(&www)?;
        std::fs::create_dir_all(dir.path().join("tmp"))?;
        for (name, size) in STATIC_FILES {
            std::fs::write(www.join(name), "z".repeat(size))?;
        }
        let port = free_port();
        let d = dir.path().display();
        let head = nginx_head(&d.to_string(), 256);
        let (ssl, certificates) = match ca {
            Some(ca) => {
                let certs = ca.install_server_files(dir.path())?;
                (
                    " ssl",
                    format!(
                        "ssl_certificate {};\n        ssl_certificate_key {};",
                        certs.cert.display(),
                        certs.key.display()
                    ),
                )
            }
            None => ("", String::new()),
        };
        let conf = format!(
            r#"
{head}
    fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp;
    scgi_temp_path {d}/tmp;
    # As in Debian's default nginx.conf: static bodies leave by sendfile.
    sendfile on;
    large_client_header_buffers 4 16k;
    upstream app {{
        server 127.0.0.1:{upstream_port};
        keepalive 4;
    }}
    server {{
        listen 127.0.0.1:{port}{ssl};
        {certificates}
        root {d}/www;
        location /api/ {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = Command::new("nginx")
            .args(["-c", &conf_path.to_string_lossy(), "-p"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let nginx = Self {
            master: child,
            port,
            dir,
            scheme: if ca.is_some() { "https" } else { "http" },
        };
        if let Err(e) = wait_for_port(port, Duration::from_secs(10)) {
            anyhow::bail!("nginx did not start: {e}; {}", nginx.error_log());
        }
        Ok(nginx)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://127.0.0.1:{}{path}", self.scheme, self.port)
    }

    pub fn master_pid(&self) -> u32 {
        self.master.id()
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

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

/// The start of an nginx.conf for one foreground worker whose pid, logs and
/// temporary files live in `dir`, up to the inside of its `http` block.
pub fn nginx_head(dir: &str, connections: u32) -> String {
    format!(
        "worker_processes 1;\n\
         daemon off;\n\
         pid {dir}/nginx.pid;\n\
         error_log {dir}/error.log;\n\
         events {{ worker_connections {connections}; }}\n\
         http {{\n    \
         access_log off;\n    \
         client_body_temp_path {dir}/tmp;\n    \
         proxy_temp_path {dir}/tmp;"
    )
}

/// Runs curl with `args`; returns its stdout. Fails on curl errors (HTTP
/// error statuses are not curl errors).
pub fn curl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Drop for Nginx {
    /// SIGTERM lets the master stop its worker too; SIGKILL would orphan it.
    fn drop(&mut self) {
        signal(&self.master, libc::SIGTERM);
        if wait_timeout(&mut self.master, Duration::from_secs(5)).is_none() {
            let _ = self.master.kill();
            let _ = self.master.wait();
        }
    }
}
