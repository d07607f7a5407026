//! Real database servers for the SQL and Redis tests — PostgreSQL 15,
//! MariaDB 10.11, Redis 7 — each on a free 127.0.0.1 port with its files in a
//! temporary directory, plus the Python apps in `tests/apps/` that use them.
//! Everything stops when dropped, after a failed test too.
//!
//! PostgreSQL runs as user `postgres` and MariaDB as user `mysql` (both
//! refuse root); the Debian packages `postgresql`, `mariadb-server`,
//! `mariadb-client`, `redis-server` and `redis-tools` provide servers and
//! clients (`cargo xtask setup` installs them). The clients are the real
//! ones, over TCP to 127.0.0.1, so the agent sees their traffic; setup steps
//! (creating the `zt` database) use the Unix sockets instead.
//!
//! Each server also runs over TLS (`start_tls` with a [`TestCa`]): the
//! same helpers then make their clients use TLS (`sslmode=require`,
//! `mariadb --ssl`, `redis-cli --tls`).
//!
//! ```no_run
//! use zerotrace_tests::db::{Mariadb, ModelsApp, Postgres, Redis};
//!
//! let (pg, my, redis) = (Postgres::start()?, Mariadb::start()?, Redis::start()?);
//! let (out, _err, ok) = pg.psql("SELECT 1")?;
//! assert!(ok && out.trim() == "1");
//! let app = ModelsApp::start(&pg, &my, &redis)?;
//! // curl http://127.0.0.1:{app.port}/models/1 …
//! # Ok::<(), anyhow::Error>(())
//! ```

use std::{
    ffi::CString,
    fs::File,
    io::{Read, Write},
    net::TcpStream,
    os::unix::{fs::chown, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::{
    free_port, signal,
    tls::{ServerCerts, TestCa},
    wait_timeout,
};

/// How long a server gets to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Output of a SQL client run: `(stdout, stderr, ok)`. `ok` is false when a
/// statement failed (the client goes on with the next one).
pub type SqlOutput = (String, String, bool);

/// PostgreSQL 15 on 127.0.0.1:`port`: trust authentication, superuser
/// `postgres`, database `zt`; data directory and Unix socket in `dir`.
/// fsync is off. Stopped with SIGQUIT (what `pg_ctl stop -m immediate` sends)
/// when dropped.
pub struct Postgres {
    postmaster: Child,
    pub port: u16,
    /// The postmaster; every connection gets a backend process of its own
    /// (a child of this one).
    pub pid: u32,
    /// `data/`, the socket `.s.PGSQL.<port>`, `postgres.log`.
    pub dir: TempDir,
    bin: PathBuf,
    /// With [`Postgres::start_tls`]: the server's certificate files.
    pub tls: Option<ServerCerts>,
}

impl Postgres {
    /// initdb (≈0.5 s) and start (≈0.1 s).
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(None)
    }

    /// The same server with `ssl=on` (the certificate of `ca`, which also
    /// verifies client certificates presented). [`Postgres::psql`],
    /// [`Postgres::pgbench`] and [`Postgres::url`] ask for
    /// `sslmode=require`; clear-text clients are still accepted.
    pub fn start_tls(ca: &TestCa) -> anyhow::Result<Self> {
        Self::start_with(Some(ca))
    }

    fn start_with(ca: Option<&TestCa>) -> anyhow::Result<Self> {
        let bin = pg_bin_dir()?;
        let user = SystemUser::lookup("postgres")?;
        let dir = tempfile::Builder::new().prefix("zt-pg-").tempdir()?;
        user.own(dir.path())?;
        let tls = ca
            .map(|ca| install_certs(ca, dir.path(), &user))
            .transpose()?;
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            .args(["-E", "UTF8", "--locale=C"])
            .current_dir(dir.path());
        user.apply(&mut initdb);
        check(&mut initdb, "initdb")?;

        let port = free_port();
        let log = File::create(dir.path().join("postgres.log"))?;
        let mut cmd = Command::new(bin.join("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .args(["-c", "listen_addresses=127.0.0.1", "-p", &port.to_string()])
            .arg("-k")
            .arg(dir.path())
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"]);
        if let Some(certs) = &tls {
            cmd.args(["-c", "ssl=on"])
                .arg("-c")
                .arg(format!("ssl_cert_file={}", certs.cert.display()))
                .arg("-c")
                .arg(format!("ssl_key_file={}", certs.key.display()))
                .arg("-c")
                .arg(format!("ssl_ca_file={}", certs.ca.display()));
        }
        cmd.current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        user.apply(&mut cmd);
        let postmaster = cmd.spawn().context("starting postgres")?;
        let mut pg = Postgres {
            pid: postmaster.id(),
            postmaster,
            port,
            dir,
            bin,
            tls,
        };
        // The port opens before the server takes queries: creating the
        // database (over the Unix socket) is the readiness check.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let out = pg.psql_socket("CREATE DATABASE zt")?;
            if out.status.success() {
                break;
            }
            if let Ok(Some(status)) = pg.postmaster.try_wait() {
                bail!("postgres exited ({status}): {}", pg.log());
            }
            if Instant::now() >= deadline {
                bail!(
                    "postgres did not take queries within {START_TIMEOUT:?}: {}; log: {}",
                    String::from_utf8_lossy(&out.stderr),
                    pg.log()
                );
            }
            thread::sleep(Duration::from_millis(30));
        }
        Ok(pg)
    }

    /// `postgresql://postgres@127.0.0.1:PORT/zt`, with `?sslmode=require`
    /// over TLS.
    pub fn url(&self) -> String {
        let ssl = if self.tls.is_some() {
            "?sslmode=require"
        } else {
            ""
        };
        format!("postgresql://postgres@127.0.0.1:{}/zt{ssl}", self.port)
    }

    /// `PGSSLMODE=require` over TLS.
    fn ssl_env(&self, cmd: &mut Command) {
        if self.tls.is_some() {
            cmd.env("PGSSLMODE", "require");
        }
    }

    /// Runs `sql` through the real psql over TCP (`-h 127.0.0.1 -p PORT -U
    /// postgres -d zt -X -A -t -v ON_ERROR_STOP=0`, the script on stdin, so
    /// each statement is its own simple Query). Rows come out `|`-separated,
    /// without headers. A failing statement is not an error: it makes `ok`
    /// false and psql goes on. Fails when psql cannot connect. Over TLS
    /// with `PGSSLMODE=require`.
    pub fn psql(&self, sql: &str) -> anyhow::Result<SqlOutput> {
        self.psql_with_env(sql, &[])
    }

    /// [`Postgres::psql`] with libpq environment variables (`PGSSLMODE`,
    /// `PGSSLCERT` …) over the defaults.
    pub fn psql_with_env(&self, sql: &str, envs: &[(&str, &str)]) -> anyhow::Result<SqlOutput> {
        let mut cmd = self.psql_command("127.0.0.1".as_ref());
        self.ssl_env(&mut cmd);
        cmd.envs(envs.iter().copied());
        psql_script(&mut cmd, sql)
    }

    /// [`Postgres::psql`] over the server's Unix socket instead of TCP:
    /// `-h DIR` (the socket's directory, [`Postgres::socket_path`]), the
    /// same options otherwise. Never TLS (libpq does not use it on Unix
    /// sockets).
    pub fn psql_unix(&self, sql: &str) -> anyhow::Result<SqlOutput> {
        psql_script(&mut self.psql_command(self.dir.path().as_os_str()), sql)
    }

    /// The server's Unix socket, `DIR/.s.PGSQL.PORT`.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join(format!(".s.PGSQL.{}", self.port))
    }

    /// psql to `host` (an address, or a socket directory) as `postgres`,
    /// database `zt`, reading a script from stdin.
    fn psql_command(&self, host: &std::ffi::OsStr) -> Command {
        let mut cmd = Command::new(self.bin.join("psql"));
        cmd.arg("-h")
            .arg(host)
            .args(["-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "zt", "-X", "-A", "-t"])
            .args(["-v", "ON_ERROR_STOP=0", "-f", "-"]);
        cmd
    }

    /// The real pgbench over TCP: `pgbench -h 127.0.0.1 -p PORT -U postgres
    /// ARGS zt`. Returns stdout (`-i` reports progress on stderr); fails on
    /// a non-zero exit.
    pub fn pgbench(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new(self.bin.join("pgbench"));
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres"])
            .args(args)
            .arg("zt")
            .stdin(Stdio::null());
        self.ssl_env(&mut cmd);
        Ok(texts(&check(&mut cmd, "pgbench")?).0)
    }

    /// The server log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    fn psql_socket(&self, sql: &str) -> anyhow::Result<Output> {
        Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .context("running psql")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        stop(&mut self.postmaster, libc::SIGQUIT);
    }
}

/// MariaDB 10.11 on 127.0.0.1:`port`: `root` without a password, database
/// `zt`, no TLS (clients talk clear text) unless started with
/// [`Mariadb::start_tls`], no name resolution, no binlog. Killed when
/// dropped.
pub struct Mariadb {
    server: Child,
    pub port: u16,
    /// mariadbd: one process, one thread per connection.
    pub pid: u32,
    /// `data/`, `mysqld.sock`, `error.log`.
    pub dir: TempDir,
    /// With [`Mariadb::start_tls`]: the server's certificate files.
    pub tls: Option<ServerCerts>,
}

impl Mariadb {
    /// Copies a data directory made once by mariadb-install-db (≈2.5 s,
    /// kept in the temporary directory across runs) and starts mariadbd
    /// (≈0.2 s in all).
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(None)
    }

    /// The same server with TLS (`--ssl-ca/--ssl-cert/--ssl-key` from `ca`)
    /// and `--require-secure-transport`: TCP clients must use TLS.
    /// [`Mariadb::mysql`] then runs `mariadb --ssl`, verifying the server.
    pub fn start_tls(ca: &TestCa) -> anyhow::Result<Self> {
        Self::start_with(Some(ca))
    }

    fn start_with(ca: Option<&TestCa>) -> anyhow::Result<Self> {
        let user = SystemUser::lookup("mysql")?;
        let template = mariadb_template(&user)?;
        let dir = tempfile::Builder::new().prefix("zt-mariadb-").tempdir()?;
        user.own(dir.path())?;
        let tls = ca
            .map(|ca| install_certs(ca, dir.path(), &user))
            .transpose()?;
        let ssl: Vec<String> = match &tls {
            Some(certs) => vec![
                format!("--ssl-ca={}", certs.ca.display()),
                format!("--ssl-cert={}", certs.cert.display()),
                format!("--ssl-key={}", certs.key.display()),
                "--require-secure-transport=ON".to_owned(),
            ],
            None => vec!["--skip-ssl".to_owned()],
        };
        let data = dir.path().join("data");
        check(
            Command::new("cp").arg("-a").arg(&template).arg(&data),
            "copying the MariaDB data directory",
        )?;
        let init = dir.path().join("init.sql");
        std::fs::write(&init, "CREATE DATABASE IF NOT EXISTS zt;\n")?;
        user.own(&init)?;

        let port = free_port();
        let path = |name: &str| dir.path().join(name).display().to_string();
        let server = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg("--user=mysql")
            .arg(format!("--datadir={}", data.display()))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--socket={}", path("mysqld.sock")))
            .arg(format!("--pid-file={}", path("mysqld.pid")))
            .arg(format!("--log-error={}", path("error.log")))
            .arg(format!("--init-file={}", init.display()))
            .args(["--skip-name-resolve", "--skip-log-bin"])
            .args(&ssl)
            .args(INNODB_OPTIONS)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mariadbd")?;
        let mut my = Mariadb {
            pid: server.id(),
            server,
            port,
            dir,
            tls,
        };
        // Ready once `zt` (made by the init file) answers over the socket.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let out = Command::new("mariadb")
                .arg("--no-defaults")
                .arg(format!(
                    "--socket={}",
                    my.dir.path().join("mysqld.sock").display()
                ))
                .args(["-u", "root", "zt", "-e", "SELECT 1"])
                .stdin(Stdio::null())
                .output()
                .context("running mariadb")?;
            if out.status.success() {
                break;
            }
            if let Ok(Some(status)) = my.server.try_wait() {
                bail!("mariadbd exited ({status}): {}", my.log());
            }
            if Instant::now() >= deadline {
                bail!(
                    "mariadbd did not take queries within {START_TIMEOUT:?}: {}; log: {}",
                    String::from_utf8_lossy(&out.stderr),
                    my.log()
                );
            }
            thread::sleep(Duration::from_millis(30));
        }
        Ok(my)
    }

    /// Runs `sql` through the real `mariadb` client over TCP (`-h 127.0.0.1
    /// -P PORT -u root --skip-ssl --batch --skip-column-names --force zt`, the
    /// statements on stdin). Rows come out tab-separated. A failing statement
    /// is not an error: `ok` is false and (with `--force`) the client goes on.
    /// Fails when the client cannot connect. Over TLS `--ssl --ssl-ca=CA
    /// --ssl-verify-server-cert` replaces `--skip-ssl`.
    pub fn mysql(&self, sql: &str) -> anyhow::Result<SqlOutput> {
        let mut cmd = Command::new("mariadb");
        cmd.args([
            "--no-defaults",
            "-h",
            "127.0.0.1",
            "-P",
            &self.port.to_string(),
        ])
        .args(["-u", "root"]);
        match &self.tls {
            Some(certs) => cmd
                .arg("--ssl")
                .arg(format!("--ssl-ca={}", certs.ca.display()))
                .arg("--ssl-verify-server-cert"),
            None => cmd.arg("--skip-ssl"),
        };
        cmd.args(["--batch", "--skip-column-names"])
            .args(["--force", "zt"]);
        let out = with_stdin(&mut cmd, sql)?;
        let (stdout, stderr) = texts(&out);
        // Client-side errors (CR_*, 2000–2999) mean no conversation took place.
        if stderr.contains("ERROR 20") || out.status.code().is_none() {
            bail!("mariadb failed ({}): {stderr}", out.status);
        }
        // With --force the exit status stays 0 after a failed statement.
        let ok = out.status.success() && !stderr.contains("ERROR ");
        Ok((stdout, stderr, ok))
    }

    /// The server's error log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Small and unsynced: these servers hold a few rows and die with the test.
const INNODB_OPTIONS: [&str; 4] = [
    "--innodb-log-file-size=8M",
    "--innodb-buffer-pool-size=32M",
    "--innodb-flush-log-at-trx-commit=0",
    "--innodb-doublewrite=0",
];

/// A MariaDB data directory fresh from `mariadb-install-db
/// --auth-root-authentication-method=normal` (root@localhost, root@127.0.0.1
/// and root@::1 without a password), made once per MariaDB version as
/// `$TMPDIR/zerotrace-mariadb-<version>` and copied by every
/// [`Mariadb::start`]: the install takes ≈2.5 s, a copy ≈0.05 s.
/// Concurrent first runs each build their own and one rename wins.
fn mariadb_template(user: &SystemUser) -> anyhow::Result<PathBuf> {
    let version = Command::new("mariadbd")
        .arg("--version")
        .output()
        .context("mariadbd not found: run `cargo xtask setup` (Debian package mariadb-server)")?;
    let version = String::from_utf8_lossy(&version.stdout);
    let version: String = version
        .split_whitespace()
        .skip_while(|w| *w != "Ver")
        .nth(1)
        .unwrap_or("unknown")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || ".+-".contains(*c))
        .collect();
    let tmp = std::env::temp_dir();
    let template = tmp.join(format!("zerotrace-mariadb-{version}"));
    if template.join("mysql").is_dir() {
        return Ok(template);
    }
    let build = tempfile::Builder::new()
        .prefix("zerotrace-mariadb-build-")
        .tempdir_in(&tmp)?;
    user.own(build.path())?;
    let data = build.path().join("data");
    check(
        Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg("--user=mysql")
            .arg(format!("--datadir={}", data.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .args(["--skip-name-resolve", "--skip-log-bin"])
            .args(INNODB_OPTIONS)
            .current_dir(build.path()),
        "mariadb-install-db",
    )?;
    // Loses to a concurrent run's rename harmlessly; `build` is removed.
    let _ = std::fs::rename(&data, &template);
    if !template.join("mysql").is_dir() {
        bail!("{} is not a MariaDB data directory", template.display());
    }
    Ok(template)
}

/// redis-server 7 on 127.0.0.1:`port`, no persistence (no RDB, no AOF),
/// files in `dir`. Killed when dropped.
pub struct Redis {
    server: Child,
    pub port: u16,
    pub pid: u32,
    pub dir: TempDir,
    /// With [`Redis::start_tls`]: the server's certificate files.
    pub tls: Option<ServerCerts>,
}

impl Redis {
    /// Starts redis-server (≈0.05 s).
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(None)
    }

    /// The same server speaking TLS only: `--tls-port PORT --port 0`, the
    /// certificate of `ca`, `--tls-auth-clients no`. [`Redis::cli`] and
    /// [`Redis::benchmark`] then pass `--tls --cacert CA`.
    pub fn start_tls(ca: &TestCa) -> anyhow::Result<Self> {
        Self::start_with(Some(ca))
    }

    fn start_with(ca: Option<&TestCa>) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("zt-redis-").tempdir()?;
        let port = free_port();
        let tls = ca
            .map(|ca| ca.install_server_files(dir.path()))
            .transpose()?;
        let mut server = Command::new("redis-server");
        match &tls {
            Some(certs) => server
                .args(["--bind", "127.0.0.1", "--port", "0"])
                .args(["--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(&certs.cert)
                .arg("--tls-key-file")
                .arg(&certs.key)
                .arg("--tls-ca-cert-file")
                .arg(&certs.ca)
                .args(["--tls-auth-clients", "no"]),
            None => server.args(["--bind", "127.0.0.1", "--port", &port.to_string()]),
        };
        let server = server
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
        let mut redis = Redis {
            pid: server.id(),
            server,
            port,
            dir,
            tls,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = redis.server.try_wait() {
                bail!("redis-server exited ({status}): {}", redis.log());
            }
            if Instant::now() >= deadline {
                bail!(
                    "redis-server did not listen within {START_TIMEOUT:?}: {}",
                    redis.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(redis)
    }

    /// `redis-cli -h 127.0.0.1 -p PORT ARGS`; returns stdout. Error replies
    /// are printed (`ERR …`) and are not an error; failing to connect is.
    /// Over TLS with `--tls --cacert CA`.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        self.tls_args(&mut cmd);
        cmd.args(args).stdin(Stdio::null());
        Ok(texts(&check(&mut cmd, "redis-cli")?).0)
    }

    /// `redis-benchmark -h 127.0.0.1 -p PORT ARGS`; returns stdout.
    pub fn benchmark(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new("redis-benchmark");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        self.tls_args(&mut cmd);
        cmd.args(args).stdin(Stdio::null());
        Ok(texts(&check(&mut cmd, "redis-benchmark")?).0)
    }

    /// The server log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// `--tls --cacert CA` over TLS.
    fn tls_args(&self, cmd: &mut Command) {
        if let Some(certs) = &self.tls {
            cmd.arg("--tls").arg("--cacert").arg(&certs.ca);
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// `tests/apps/models_app.py` (FastAPI) under uvicorn: one process, asyncio
/// loop, h11. Its endpoints run on the main thread (tid == `pid`), which does
/// the HTTP and all database I/O; see the module docstring there. Killed
/// when dropped.
pub struct ModelsApp {
    child: Child,
    pub port: u16,
    pub pid: u32,
}

impl ModelsApp {
    /// Starts the app against the three servers, one connection per database
    /// per request; returns once `/health` answers (≈1 s).
    pub fn start(pg: &Postgres, my: &Mariadb, redis: &Redis) -> anyhow::Result<Self> {
        Self::start_with_env(pg, my, redis, &[])
    }

    /// As [`ModelsApp::start`], with extra environment variables, e.g.
    /// `("APP_CONNECTIONS", "persistent")`: one connection per database,
    /// opened at startup and kept.
    pub fn start_with_env(
        pg: &Postgres,
        my: &Mariadb,
        redis: &Redis,
        envs: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let port = free_port();
        let mut cmd = Command::new(crate::otlp::otel_python()?);
        cmd.args(["-m", "uvicorn", "models_app:app", "--host", "127.0.0.1"])
            .args(["--port", &port.to_string(), "--workers", "1"])
            .args([
                "--loop",
                "asyncio",
                "--http",
                "h11",
                "--log-level",
                "warning",
            ])
            .current_dir(apps_dir())
            .env("PG_URL", pg.url())
            .env("MYSQL_HOST", "127.0.0.1")
            .env("MYSQL_PORT", my.port.to_string())
            .env("MYSQL_DB", "zt")
            .env("REDIS_PORT", redis.port.to_string())
            .env("APP_PORT", port.to_string())
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().context("starting uvicorn")?;
        let mut app = ModelsApp {
            pid: child.id(),
            child,
            port,
        };
        wait_for_health(&mut app.child, port, "models_app")?;
        Ok(app)
    }

    /// `http://127.0.0.1:PORT{path}`
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for ModelsApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tests/apps/flask_app.py`: Flask on werkzeug's threaded server — a new
/// thread per connection reads the request, queries PostgreSQL and writes
/// the response. `GET /models/{id}` (one SELECT), `GET /health`. Killed when
/// dropped.
pub struct FlaskApp {
    child: Child,
    pub port: u16,
    pub pid: u32,
}

impl FlaskApp {
    /// Starts the app; returns once `/health` answers.
    pub fn start(pg: &Postgres) -> anyhow::Result<Self> {
        let port = free_port();
        let child = Command::new(crate::otlp::otel_python()?)
            .arg("flask_app.py")
            .current_dir(apps_dir())
            .env("PG_URL", pg.url())
            .env("APP_PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting flask_app.py")?;
        let mut app = FlaskApp {
            pid: child.id(),
            child,
            port,
        };
        wait_for_health(&mut app.child, port, "flask_app")?;
        Ok(app)
    }

    /// `http://127.0.0.1:PORT{path}`
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for FlaskApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tests/apps/`.
pub fn apps_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("apps")
}

/// A system account the servers run as.
#[derive(Debug, Clone, Copy)]
struct SystemUser {
    uid: u32,
    gid: u32,
}

impl SystemUser {
    /// Looks `name` up in the password database.
    fn lookup(name: &str) -> anyhow::Result<Self> {
        let cname = CString::new(name)?;
        // SAFETY: getpwnam_r with a zeroed passwd and a buffer we own; the
        // result points into them and is read before they go away.
        unsafe {
            let mut pw: libc::passwd = std::mem::zeroed();
            let mut buf = vec![0 as libc::c_char; 4096];
            let mut result = std::ptr::null_mut();
            let rc = libc::getpwnam_r(
                cname.as_ptr(),
                &mut pw,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            );
            if rc != 0 || result.is_null() {
                bail!(
                    "no user {name:?}: run `cargo xtask setup` (the postgresql and \
                     mariadb-server packages create it)"
                );
            }
            Ok(SystemUser {
                uid: pw.pw_uid,
                gid: pw.pw_gid,
            })
        }
    }

    /// Makes `path` this user's.
    fn own(&self, path: &Path) -> anyhow::Result<()> {
        chown(path, Some(self.uid), Some(self.gid))
            .with_context(|| format!("chown {}", path.display()))
    }

    /// Runs `cmd` as this user (std drops the supplementary groups too).
    fn apply(&self, cmd: &mut Command) {
        cmd.uid(self.uid).gid(self.gid);
    }
}

/// The server files of `ca` in `dir`, owned by `user` (PostgreSQL refuses
/// a key readable by others or owned by someone else).
fn install_certs(ca: &TestCa, dir: &Path, user: &SystemUser) -> anyhow::Result<ServerCerts> {
    let certs = ca.install_server_files(dir)?;
    for file in [&certs.ca, &certs.cert, &certs.key] {
        user.own(file)?;
    }
    Ok(certs)
}

/// `/usr/lib/postgresql/<newest>/bin`.
fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            e.path().join("bin/postgres").is_file().then_some(major)
        })
        .max();
    match newest {
        Some(major) => Ok(root.join(major.to_string()).join("bin")),
        None => bail!(
            "no {}/*/bin/postgres: run `cargo xtask setup` (Debian package postgresql)",
            root.display()
        ),
    }
}

/// Runs `cmd` to completion; fails on a non-zero exit, quoting its output.
fn check(cmd: &mut Command, what: &str) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        let (stdout, stderr) = texts(&out);
        bail!("{what} failed ({}): {stderr}{stdout}", out.status);
    }
    Ok(out)
}

/// Runs a psql command with `sql` as its script: see [`Postgres::psql`].
fn psql_script(cmd: &mut Command, sql: &str) -> anyhow::Result<SqlOutput> {
    let out = with_stdin(cmd, sql)?;
    let (stdout, stderr) = texts(&out);
    match out.status.code() {
        Some(0) => {
            let ok = !stderr.contains("ERROR:");
            Ok((stdout, stderr, ok))
        }
        Some(1) => Ok((stdout, stderr, false)),
        _ => bail!("psql failed ({}): {stderr}", out.status),
    }
}

/// Runs `cmd` with `input` on its stdin.
fn with_stdin(cmd: &mut Command, input: &str) -> anyhow::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_owned();
    // A writer thread: the client may print before it has read everything.
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
        let _ = stdin.write_all(b"\n");
    });
    let out = child.wait_with_output()?;
    let _ = writer.join();
    Ok(out)
}

fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Sends `sig`, waits up to 5 s, then kills.
fn stop(child: &mut Child, sig: i32) {
    signal(child, sig);
    if wait_timeout(child, Duration::from_secs(5)).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Waits until `GET /health` on 127.0.0.1:`port` answers 200.
pub fn wait_for_health(child: &mut Child, port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let req = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
            let mut reply = String::new();
            if s.write_all(req.as_bytes()).is_ok()
                && s.read_to_string(&mut reply).is_ok()
                && reply.starts_with("HTTP/1.1 200")
            {
                return Ok(());
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{what} exited ({status}) before /health answered");
        }
        if Instant::now() >= deadline {
            bail!("{what}: /health did not answer 200 within {START_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}
