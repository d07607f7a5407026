//! A collector behind TLS, for the exporter's TLS tests: a test CA with
//! server and client certificates made by the `openssl` CLI, and nginx
//! terminating TLS in front of a real rotel — HTTP/2 with `grpc_pass` for
//! OTLP/gRPC, HTTP/1.1 with `proxy_pass` for OTLP/HTTP — optionally asking
//! for a client certificate (mutual TLS).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};

use crate::{
    free_port, rotel::Rotel, run, servers::nginx_head, signal, wait_for_port, wait_timeout,
};

/// Certificates for 127.0.0.1 and localhost, in a temporary directory: a
/// CA, a server and a client certificate it signed, and a second CA that
/// signed neither.
pub struct TestPki {
    dir: tempfile::TempDir,
}

const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
";

impl TestPki {
    pub fn new() -> anyhow::Result<Self> {
        let pki = Self {
            dir: tempfile::tempdir()?,
        };
        std::fs::write(pki.path("openssl.cnf"), OPENSSL_CNF)?;
        pki.ca("ca")?;
        pki.ca("other-ca")?;
        pki.leaf("server", "127.0.0.1")?;
        pki.leaf("client", "zerotrace agent")?;
        Ok(pki)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA that signed the server and client certificates.
    pub fn ca_pem(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// A CA that signed nothing here: trusting it alone refuses the server.
    pub fn other_ca_pem(&self) -> PathBuf {
        self.path("other-ca.pem")
    }

    pub fn client_pem(&self) -> PathBuf {
        self.path("client.pem")
    }

    pub fn client_key(&self) -> PathBuf {
        self.path("client.key")
    }

    fn openssl(&self, args: &[&str]) -> anyhow::Result<()> {
        run(Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path()))
        .context("the openssl CLI (Debian package openssl)")?;
        Ok(())
    }

    fn ca(&self, name: &str) -> anyhow::Result<()> {
        let (key, pem, subject) = (
            format!("{name}.key"),
            format!("{name}.pem"),
            format!("/CN=zerotrace test {name}"),
        );
        self.openssl(&[
            "req",
            "-x509",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "30",
            "-config",
            "openssl.cnf",
            "-extensions",
            "ca",
            "-subj",
            &subject,
        ])
    }

    /// A certificate signed by `ca`, with the extensions of section `name`.
    fn leaf(&self, name: &str, common_name: &str) -> anyhow::Result<()> {
        let (key, csr, pem, subject) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("/CN={common_name}"),
        );
        self.openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-config",
            "openssl.cnf",
            "-subj",
            &subject,
        ])?;
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "30",
            "-extfile",
            "openssl.cnf",
            "-extensions",
            name,
        ])
    }
}

/// Whether the terminator asks for a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    None,
    /// `ssl_verify_client on` with the test CA.
    Required,
}

/// nginx terminating TLS with the test PKI's server certificate in front of
/// `rotel`: one port for OTLP/gRPC, one for OTLP/HTTP.
pub struct TlsTerminator {
    master: Child,
    pub grpc_port: u16,
    pub http_port: u16,
    dir: tempfile::TempDir,
}

impl TlsTerminator {
    pub fn start(pki: &TestPki, rotel: &Rotel, client_auth: ClientAuth) -> anyhow::Result<Self> {
        let port_of = |endpoint: String| -> anyhow::Result<u16> {
            let port = endpoint.rsplit(':').next().unwrap_or_default();
            port.parse()
                .with_context(|| format!("no port in {endpoint}"))
        };
        let rotel_grpc = port_of(rotel.grpc_endpoint())?;
        let rotel_http = port_of(rotel.http_endpoint())?;
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("tmp"))?;
        let (grpc_port, http_port) = (free_port(), free_port());
        let d = dir.path().display().to_string();
        let head = nginx_head(&d, 64);
        let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
        let (cert, key) = (cert.display(), key.display());
        let verify = match client_auth {
            ClientAuth::None => String::new(),
            ClientAuth::Required => format!(
                "ssl_client_certificate {};\n        ssl_verify_client on;",
                pki.ca_pem().display()
            ),
        };
        let conf = format!(
            r#"
{head}
    fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp;
    scgi_temp_path {d}/tmp;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    server {{
        listen 127.0.0.1:{grpc_port} ssl http2;
        {verify}
        location / {{
            grpc_pass grpc://127.0.0.1:{rotel_grpc};
        }}
    }}
    server {{
        listen 127.0.0.1:{http_port} ssl;
        {verify}
        location / {{
            proxy_pass http://127.0.0.1:{rotel_http};
            proxy_http_version 1.1;
        }}
    }}
}}
"#
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let master = Command::new("nginx")
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting nginx")?;
        let terminator = Self {
            master,
            grpc_port,
            http_port,
            dir,
        };
        for port in [grpc_port, http_port] {
            if let Err(e) = wait_for_port(port, Duration::from_secs(10)) {
                bail!("nginx did not start: {e}; {}", terminator.error_log());
            }
        }
        Ok(terminator)
    }

    /// "https://127.0.0.1:P" — OTLP/gRPC over TLS.
    pub fn grpc_endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.grpc_port)
    }

    /// "https://127.0.0.1:P" — OTLP/HTTP over TLS (the agent adds /v1/traces).
    pub fn http_endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.http_port)
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TlsTerminator {
    /// SIGTERM lets the master stop its worker too.
    fn drop(&mut self) {
        signal(&self.master, libc::SIGTERM);
        if wait_timeout(&mut self.master, Duration::from_secs(5)).is_none() {
            let _ = self.master.kill();
            let _ = self.master.wait();
        }
    }
}
