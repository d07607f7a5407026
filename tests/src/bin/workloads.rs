//! Real servers under real load generators, with the agent off and on:
//! the measurements behind `cargo xtask bench overhead` and `cargo xtask
//! soak`. Prints one JSON object per run (or per sample) on stdout and
//! progress on stderr; xtask turns them into the reports under `bench/`.
//!
//! Needs root, the Debian packages `cargo xtask setup` installs (nginx,
//! PostgreSQL, MariaDB, Redis, wrk) and the test venv for the FastAPI app.
//! The agent is `$ZEROTRACE_BIN` (xtask passes the release build); the
//! `unix_pingpong` binary of this crate is expected next to this one (xtask
//! builds both).

use std::{
    collections::BTreeMap,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use zerotrace_tests::{
    Agent, agent_bin,
    db::{Mariadb, ModelsApp, Postgres, Redis},
    free_port, load,
    load::LoadResult,
    nesting,
    otlp::{Protocol, Receiver},
    servers::{Nginx, PythonApp, curl},
    stats::{
        get_raw, host_busy_seconds, metrics, metrics_text, parse_metric_by, proc_stats,
        tree_cpu_seconds,
    },
    tls::TestCa,
};

#[derive(Parser)]
#[command(about = "Overhead benchmark and soak run of the zerotrace agent on real workloads")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Each workload with the agent off and on, alternating, over rounds;
    /// one JSON line per run.
    Overhead {
        /// Rounds; each runs every workload once without and once with the agent.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
        /// Seconds of load per run.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..))]
        seconds: u64,
        /// Workloads to run [default: all].
        #[arg(long = "workload", value_enum)]
        workloads: Vec<Workload>,
        /// Records the agent's CPU profile during each traced run with
        /// `perf record -e cpu-clock` (DWARF call graphs) into
        /// DIR/WORKLOAD-ROUND.perf.data.
        #[arg(long, value_name = "DIR")]
        profile: Option<std::path::PathBuf>,
    },
    /// The nesting app under wrk on each interpreter, loop, handler kind and
    /// connection count, and nginx in front of it; one JSON line per cell
    /// with its client spans scored against their request ids, then the
    /// cost of following the runtime (agent with runtimes off and on).
    Nesting {
        /// Seconds of load per cell.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(2..))]
        seconds: u64,
        /// Interpreters (python executables) to run the app on [default:
        /// pyenv 3.9, 3.11 and 3.13 when present, and Debian's python3.11].
        #[arg(long = "interpreter")]
        interpreters: Vec<std::path::PathBuf>,
        /// Connection counts.
        #[arg(long = "connections", value_delimiter = ',', default_values_t = [1, 16, 64])]
        connections: Vec<u32>,
    },
    /// Mixed traffic for MINUTES with one agent running; one JSON line per
    /// sample of its memory, CPU time and counters.
    Soak {
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        minutes: u64,
        /// Seconds between samples.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        sample_seconds: u64,
    },
}

/// A server and the load generator that drives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// nginx (1 worker, sendfile) serving a 333-byte static file to wrk
    /// (1 thread, 32 keep-alive connections).
    Nginx,
    /// The same nginx and file over TLS (`listen … ssl`, a certificate made
    /// with the openssl CLI) to wrk over https, 32 keep-alive connections:
    /// what the TLS library probes cost.
    NginxHttps,
    /// redis-server under redis-benchmark GET (32 connections).
    Redis,
    /// The same over a Unix socket: a redis-server listening only on
    /// `unixsocket` under `redis-benchmark -s` GET (32 connections).
    RedisUnix,
    /// A protocol the agent does not know over a Unix socket: the
    /// `unix_pingpong` client and echo server (64-byte binary frames, 8
    /// connections), what muted connections cost.
    UnixUnknown,
    /// PostgreSQL under pgbench select-only (8 connections).
    Pgbench,
    /// The FastAPI app (uvicorn, 1 worker; Redis cache in front of
    /// PostgreSQL, persistent connections) under wrk, 8 connections, with
    /// an x-tenant-id header.
    Fastapi,
}

impl Workload {
    const ALL: [Workload; 7] = [
        Workload::Nginx,
        Workload::NginxHttps,
        Workload::Redis,
        Workload::RedisUnix,
        Workload::UnixUnknown,
        Workload::Pgbench,
        Workload::Fastapi,
    ];

    fn name(self) -> &'static str {
        match self {
            Workload::Nginx => "nginx",
            Workload::NginxHttps => "nginx-https",
            Workload::Redis => "redis",
            Workload::RedisUnix => "redis-unix",
            Workload::UnixUnknown => "unix-unknown",
            Workload::Pgbench => "pgbench",
            Workload::Fastapi => "fastapi",
        }
    }
}

/// Every server the workloads use, started once.
struct Servers {
    nginx: Nginx,
    /// The same server over TLS only.
    nginx_https: Nginx,
    _upstream: PythonApp,
    redis: Redis,
    /// A second redis-server, on a Unix socket only.
    redis_unix: UnixRedis,
    /// The `unix_pingpong` echo server.
    pingpong: PingPongServer,
    pg: Postgres,
    _mariadb: Mariadb,
    models: ModelsApp,
    /// `/models/{id}` of a row the app created.
    model_path: String,
    /// redis-benchmark takes a request count, not a duration: GETs per
    /// second measured in the warm-up.
    redis_rate: f64,
    /// The same for the Unix-socket server.
    redis_unix_rate: f64,
}

/// Waits until something accepts connections on the Unix socket `path`,
/// or `server` exits.
fn wait_for_socket(path: &Path, server: &mut Child, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(path).is_err() {
        if let Ok(Some(status)) = server.try_wait() {
            bail!("{what} exited ({status})");
        }
        if Instant::now() >= deadline {
            bail!("{what} did not listen on {} within 30 s", path.display());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A temporary directory under /tmp for a Unix socket (whose path must
/// stay short: 107 bytes at most).
fn socket_dir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp")?)
}

/// redis-server 7 listening on a Unix socket only (`port 0`, `unixsocket`,
/// `unixsocketperm 777`); killed when dropped.
struct UnixRedis {
    server: Child,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl UnixRedis {
    fn start() -> anyhow::Result<Self> {
        let dir = socket_dir("zt-ru-")?;
        let socket = dir.path().join("redis.sock");
        let mut server = Command::new("redis-server")
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
        let up = wait_for_socket(&socket, &mut server, "redis-server (unixsocket)");
        let redis = UnixRedis {
            server,
            socket,
            dir,
        };
        up.with_context(|| format!("its log: {}", redis.log()))?;
        Ok(redis)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// `TOOL -s SOCKET ARGS` (redis-cli, redis-benchmark); returns stdout.
    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new(tool);
        cmd.arg("-s")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null());
        load::output(&mut cmd, tool)
    }

    /// `redis-benchmark -s SOCKET -t get -c CONNECTIONS -n REQUESTS --csv`:
    /// the `redis` row's load over the Unix socket.
    fn benchmark(&self, connections: u32, requests: u64) -> anyhow::Result<LoadResult> {
        let text = self.run(
            "redis-benchmark",
            &[
                "-t",
                "get",
                "-c",
                &connections.to_string(),
                "-n",
                &requests.to_string(),
                "--csv",
            ],
        )?;
        let r = load::parse_redis_csv(&text).with_context(|| format!("reading:\n{text}"))?;
        Ok(LoadResult {
            requests,
            seconds: requests as f64 / r.rps,
            p50_ms: r.p50_ms,
            p99_ms: r.p99_ms,
            errors: 0,
        })
    }
}

impl Drop for UnixRedis {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// The `unix_pingpong` binary next to this one.
fn pingpong_bin() -> anyhow::Result<PathBuf> {
    let bin = std::env::current_exe()?.with_file_name("unix_pingpong");
    anyhow::ensure!(
        bin.is_file(),
        "{} missing: `cargo build --release -p zerotrace-tests --bin unix_pingpong` (xtask builds it)",
        bin.display()
    );
    Ok(bin)
}

/// `unix_pingpong server SOCKET`: the echo server of the `unix-unknown`
/// workload; killed when dropped.
struct PingPongServer {
    server: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

/// Connections of the `unix-unknown` workload.
const PINGPONG_CONNECTIONS: u32 = 8;

impl PingPongServer {
    fn start() -> anyhow::Result<Self> {
        let dir = socket_dir("zt-pp-")?;
        let socket = dir.path().join("pingpong.sock");
        let mut server = Command::new(pingpong_bin()?)
            .arg("server")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting unix_pingpong server")?;
        let up = wait_for_socket(&socket, &mut server, "unix_pingpong server");
        let pp = PingPongServer {
            server,
            socket,
            _dir: dir,
        };
        up?;
        Ok(pp)
    }

    /// `unix_pingpong client SOCKET --connections N --seconds S`: round
    /// trips as requests.
    fn load(&self, connections: u32, duration: Duration) -> anyhow::Result<LoadResult> {
        let mut cmd = Command::new(pingpong_bin()?);
        cmd.arg("client")
            .arg(&self.socket)
            .args(["--connections", &connections.to_string()])
            .args(["--seconds", &duration.as_secs_f64().to_string()])
            .stdin(Stdio::null());
        let text = load::output(&mut cmd, "unix_pingpong client")?;
        let v: Value = serde_json::from_str(text.trim())
            .with_context(|| format!("reading unix_pingpong's output {text:?}"))?;
        let num = |k: &str| {
            v[k].as_f64()
                .with_context(|| format!("no {k:?} in unix_pingpong's output {text:?}"))
        };
        Ok(LoadResult {
            requests: num("requests")? as u64,
            seconds: num("seconds")?,
            p50_ms: num("p50_ms")?,
            p99_ms: num("p99_ms")?,
            errors: num("errors")? as u64,
        })
    }
}

impl Drop for PingPongServer {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

const TENANT: &str = "x-tenant-id: bench";

impl Servers {
    fn start() -> anyhow::Result<Self> {
        eprintln!(
            "[workloads] starting nginx, Redis (TCP and Unix socket), the unix_pingpong echo server, PostgreSQL, MariaDB and the FastAPI app…"
        );
        let upstream = PythonApp::start()?;
        let nginx = Nginx::start(upstream.port)?;
        // nginx keeps its own copies of the certificate and key.
        let nginx_https = Nginx::start_tls(upstream.port, &TestCa::new()?)?;
        let redis = Redis::start()?;
        let redis_unix = UnixRedis::start()?;
        let pingpong = PingPongServer::start()?;
        let pg = Postgres::start()?;
        let mariadb = Mariadb::start()?;
        let models =
            ModelsApp::start_with_env(&pg, &mariadb, &redis, &[("APP_CONNECTIONS", "persistent")])?;
        load::pgbench_init(&pg, 1)?;
        redis.cli(&["SET", "key:__rand_int__", "value"])?;
        redis_unix.run("redis-cli", &["SET", "key:__rand_int__", "value"])?;
        let created = curl(&[
            "-X",
            "POST",
            "-H",
            TENANT,
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"name":"bench"}"#,
            &models.url("/models"),
        ])?;
        let id = serde_json::from_str::<Value>(&created)
            .ok()
            .and_then(|v| v["id"].as_i64())
            .with_context(|| format!("POST /models answered {created:?}"))?;
        let mut servers = Servers {
            nginx,
            nginx_https,
            _upstream: upstream,
            redis,
            redis_unix,
            pingpong,
            pg,
            _mariadb: mariadb,
            models,
            model_path: format!("/models/{id}"),
            redis_rate: 0.0,
            redis_unix_rate: 0.0,
        };
        let warm = load::redis_benchmark(&servers.redis, 32, 20_000)?;
        servers.redis_rate = warm.rate();
        let warm = servers.redis_unix.benchmark(32, 20_000)?;
        servers.redis_unix_rate = warm.rate();
        Ok(servers)
    }

    /// Runs `workload` for about `seconds`, measuring the host's and the
    /// server's CPU time over the run.
    fn measured_load(&self, workload: Workload, seconds: u64) -> anyhow::Result<Measured> {
        let server = self.server_pid(workload);
        let busy = host_busy_seconds();
        let served = tree_cpu_seconds(server);
        let load = self.load(workload, seconds)?;
        Ok(Measured {
            server_cpu_seconds: tree_cpu_seconds(server) - served,
            host_busy_seconds: host_busy_seconds() - busy,
            load,
        })
    }

    /// The process (with its children) that serves `workload`: the traced
    /// application, whose own threads run the programs of its syscalls.
    fn server_pid(&self, workload: Workload) -> u32 {
        match workload {
            Workload::Nginx => self.nginx.pid(),
            Workload::NginxHttps => self.nginx_https.pid(),
            Workload::Redis => self.redis.pid,
            Workload::RedisUnix => self.redis_unix.server.id(),
            Workload::UnixUnknown => self.pingpong.server.id(),
            Workload::Pgbench => self.pg.pid,
            Workload::Fastapi => self.models.pid,
        }
    }

    /// Runs `workload` for about `seconds`.
    fn load(&self, workload: Workload, seconds: u64) -> anyhow::Result<LoadResult> {
        let d = Duration::from_secs(seconds);
        match workload {
            Workload::Nginx => load::wrk(&self.nginx.url("/a.txt"), 32, d, &[]),
            Workload::NginxHttps => load::wrk(&self.nginx_https.url("/a.txt"), 32, d, &[]),
            Workload::Redis => {
                let n = (self.redis_rate * seconds as f64).max(10_000.0) as u64;
                load::redis_benchmark(&self.redis, 32, n)
            }
            Workload::RedisUnix => {
                let n = (self.redis_unix_rate * seconds as f64).max(10_000.0) as u64;
                self.redis_unix.benchmark(32, n)
            }
            Workload::UnixUnknown => self.pingpong.load(PINGPONG_CONNECTIONS, d),
            Workload::Pgbench => load::pgbench(&self.pg, 8, d),
            Workload::Fastapi => load::wrk(&self.models.url(&self.model_path), 8, d, &[TENANT]),
        }
    }
}

/// `zerotrace run` exporting over OTLP/gRPC to `rx` with its /metrics on a
/// free port; otherwise the defaults a user gets (the kernel's run-time
/// statistics off, unless ZEROTRACE_PROGRAM_STATS says otherwise).
fn start_agent(rx: &Receiver) -> anyhow::Result<(Agent, u16)> {
    let listen = free_port();
    let mut cmd = Command::new(agent_bin());
    cmd.args(["run", "--listen", &format!("127.0.0.1:{listen}")])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", rx.protocol_name());
    let agent = Agent::spawn(cmd, "tracing")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while metrics(listen).is_empty() {
        if Instant::now() > deadline {
            bail!("the agent's /metrics on port {listen} did not answer");
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok((agent, listen))
}

/// The host-wide switch of the kernel's BPF run-time statistics.
const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns the kernel's run-time statistics on for every program while held
/// (the agent reads the sysctl each time it reports), and back to what
/// they were when dropped. Held only around the kernel window, so the
/// throughput, latency and agent CPU of a traced run are the defaults'.
struct HostProgramStats {
    before: String,
}

impl HostProgramStats {
    fn on() -> anyhow::Result<Self> {
        let before = std::fs::read_to_string(BPF_STATS_SYSCTL)
            .with_context(|| format!("reading {BPF_STATS_SYSCTL}"))?;
        std::fs::write(BPF_STATS_SYSCTL, "1")
            .with_context(|| format!("turning on {BPF_STATS_SYSCTL} (needs root)"))?;
        Ok(Self { before })
    }
}

impl Drop for HostProgramStats {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(BPF_STATS_SYSCTL, self.before.trim()) {
            eprintln!("[workloads] could not restore {BPF_STATS_SYSCTL}: {e}");
        }
    }
}

/// Seconds of the kernel window after each traced run.
const KERNEL_WINDOW_SECONDS: u64 = 4;

/// /metrics is a snapshot refreshed once a second: wait for a fresh one.
fn fresh_metrics(port: u16) -> BTreeMap<String, f64> {
    thread::sleep(Duration::from_millis(1100));
    metrics(port)
}

/// Kernel run time of each program (seconds) from a fresh /metrics.
fn program_seconds(port: u16) -> BTreeMap<String, f64> {
    thread::sleep(Duration::from_millis(1100));
    parse_metric_by(
        &metrics_text(port),
        "zerotrace_bpf_program_run_seconds_total",
        "program",
    )
}

/// Runs of each program from a fresh /metrics.
fn program_runs(port: u16) -> BTreeMap<String, f64> {
    thread::sleep(Duration::from_millis(1100));
    parse_metric_by(
        &metrics_text(port),
        "zerotrace_bpf_program_runs_total",
        "program",
    )
}

/// Waits (up to 15 s) until the agent has exported what it queued and its
/// counters stand still, so its CPU time covers all the work of a run.
fn drain(port: u16) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = fresh_metrics(port);
    loop {
        let now = fresh_metrics(port);
        let settled = now
            .get("zerotrace_export_queue_spans")
            .copied()
            .unwrap_or(0.0)
            == 0.0
            && now.get("zerotrace_spans_total") == last.get("zerotrace_spans_total")
            && now.get("zerotrace_events_total") == last.get("zerotrace_events_total");
        if settled || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

fn delta(after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>, name: &str) -> f64 {
    after.get(name).copied().unwrap_or(0.0) - before.get(name).copied().unwrap_or(0.0)
}

/// A load and the CPU time spent while it ran.
struct Measured {
    load: LoadResult,
    /// Every CPU's busy time.
    host_busy_seconds: f64,
    /// The serving processes' own user + system time.
    server_cpu_seconds: f64,
}

fn load_fields(m: &Measured) -> Value {
    let r = &m.load;
    let per_request = |seconds: f64| {
        if r.requests > 0 {
            seconds * 1e6 / r.requests as f64
        } else {
            0.0
        }
    };
    json!({
        "host_cpu_us_per_request": per_request(m.host_busy_seconds),
        "server_cpu_us_per_request": per_request(m.server_cpu_seconds),
        "requests": r.requests,
        "seconds": r.seconds,
        "rps": r.rate(),
        "p50_ms": r.p50_ms,
        "p99_ms": r.p99_ms,
        "errors": r.errors,
    })
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// One run with the agent: started before, measured around the load,
/// drained; then a short second load with the kernel's run-time
/// statistics on (the kernel columns: they cost every program run two
/// clock reads, so the first load runs without them, as the agent's
/// defaults do); stopped after.
fn traced_run(
    servers: &Servers,
    rx: &Receiver,
    workload: Workload,
    seconds: u64,
    profile: Option<&std::path::Path>,
) -> anyhow::Result<Value> {
    let received_before = rx.span_count();
    let (agent, port) = start_agent(rx)?;
    let pid = agent.pid();
    let m0 = fresh_metrics(port);
    let p0 = proc_stats(pid).context("agent gone")?;
    let recording = profile
        .map(|file| record_profile(pid, file, seconds))
        .transpose()?;
    let measured = servers.measured_load(workload, seconds)?;
    if let Some(mut perf) = recording {
        let status = perf.wait()?;
        anyhow::ensure!(status.success(), "perf record failed: {status}");
    }
    let result = &measured.load;
    let m2 = drain(port);
    let p1 = proc_stats(pid).context("agent gone")?;

    // The kernel window: the same load, shorter, statistics on.
    let window = kernel_window(servers, workload, port)?;
    let m3 = drain(port);
    agent.stop()?;
    // What the window made is not the run's.
    let received =
        (rx.span_count() - received_before)
            .saturating_sub(delta(&m3, &m2, "zerotrace_spans_total") as usize);
    let per_request = |v: f64| {
        if result.requests > 0 {
            v / result.requests as f64
        } else {
            0.0
        }
    };
    Ok(merge(
        merge(
            load_fields(&measured),
            json!({
                "agent_cpu_seconds": p1.cpu_seconds - p0.cpu_seconds,
                "agent_cpu_us_per_request": per_request((p1.cpu_seconds - p0.cpu_seconds) * 1e6),
                "agent_peak_rss_kib": p1.peak_rss_kib,
                "events": delta(&m2, &m0, "zerotrace_events_total"),
                "events_lost": delta(&m2, &m0, "zerotrace_events_lost_total"),
                "spans_made": delta(&m2, &m0, "zerotrace_spans_total"),
                "spans_dropped": delta(&m2, &m0, "zerotrace_spans_dropped_total"),
                "spans_received": received,
            }),
        ),
        window,
    ))
}

/// The kernel columns of a traced run: run time of each program per
/// request over a [`KERNEL_WINDOW_SECONDS`] load with the host's run-time
/// statistics on (or the agent's own, when ZEROTRACE_PROGRAM_STATS turned
/// them on for the whole run).
fn kernel_window(servers: &Servers, workload: Workload, port: u16) -> anyhow::Result<Value> {
    let _stats = match std::env::var_os("ZEROTRACE_PROGRAM_STATS") {
        Some(_) => None,
        None => Some(HostProgramStats::on()?),
    };
    let k0 = program_seconds(port);
    let r0 = program_runs(port);
    let load = servers.measured_load(workload, KERNEL_WINDOW_SECONDS)?.load;
    let k1 = program_seconds(port);
    let r1 = program_runs(port);
    let requests = load.requests.max(1) as f64;
    let seconds: f64 = k1.keys().map(|p| delta(&k1, &k0, p)).sum();
    let runs: f64 = r1.keys().map(|p| delta(&r1, &r0, p)).sum();
    anyhow::ensure!(
        runs > 0.0,
        "no program runs counted in the kernel window: are BPF run-time statistics available?"
    );
    // Where the kernel time went: ns per request by program.
    let by_program: BTreeMap<&String, f64> = k1
        .keys()
        .map(|p| (p, delta(&k1, &k0, p) * 1e9 / requests))
        .filter(|(_, ns)| *ns > 0.0)
        .collect();
    Ok(json!({
        "kernel_ns_per_request": seconds * 1e9 / requests,
        "kernel_ns_per_request_by_program": by_program,
        "kernel_window_requests": load.requests,
        "bpf_runs": runs,
        "bpf_run_seconds": seconds,
    }))
}

/// Run-time statistics for the kernel columns (off by default in the
/// agent), unless ZEROTRACE_PROGRAM_STATS says otherwise: an environment
/// variable, not the flag, so an older agent (`--agent`) runs unchanged.
fn program_stats(cmd: &mut Command) {
    if std::env::var_os("ZEROTRACE_PROGRAM_STATS").is_none() {
        cmd.env("ZEROTRACE_PROGRAM_STATS", "on");
    }
}

/// One run with the floor (`zerotrace bench-floor`: an empty program on
/// the agent's tracepoints) instead of the agent: the bare cost of being
/// called on every traced syscall. As with the agent, the load runs
/// without run-time statistics (its throughput is the floor's own) and a
/// [`KERNEL_WINDOW_SECONDS`] load with them on gives the ns per request.
/// An agent from before `--no-stats` keeps them on throughout.
fn floor_run(servers: &Servers, workload: Workload, seconds: u64) -> anyhow::Result<Value> {
    let (mut floor, stats_throughout) = match Floor::start(false) {
        Ok(floor) => (floor, false),
        Err(e) => {
            eprintln!("[workloads] bench-floor --no-stats: {e:#}; statistics on throughout");
            (Floor::start(true)?, true)
        }
    };
    let measured = servers.measured_load(workload, seconds)?;
    let (window, (runs, ns)) = {
        let _stats = (!stats_throughout).then(HostProgramStats::on).transpose()?;
        let before = floor.read()?;
        let window = servers.measured_load(workload, KERNEL_WINDOW_SECONDS)?.load;
        let after = floor.read()?;
        (window, (after.0 - before.0, after.1 - before.1))
    };
    drop(floor);
    let requests = window.requests.max(1) as f64;
    Ok(merge(
        load_fields(&measured),
        json!({
            "kernel_ns_per_request": ns / requests,
            "kernel_window_requests": window.requests,
            "bpf_runs": runs,
            "bpf_run_seconds": ns / 1e9,
            "floor_stats_throughout": stats_throughout,
        }),
    ))
}

/// A running `zerotrace bench-floor`: each [`Floor::read`] asks it for the
/// floor program's runs and run time so far.
struct Floor {
    child: std::process::Child,
    input: Option<std::process::ChildStdin>,
    output: std::io::BufReader<std::process::ChildStdout>,
}

impl Floor {
    /// Starts it and waits until every tracepoint is attached (its first
    /// line); `stats`: with the statistics on for its whole life.
    fn start(stats: bool) -> anyhow::Result<Self> {
        let mut cmd = Command::new(agent_bin());
        cmd.arg("bench-floor");
        if !stats {
            cmd.arg("--no-stats");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting zerotrace bench-floor")?;
        let input = child.stdin.take();
        let output = std::io::BufReader::new(child.stdout.take().context("bench-floor stdout")?);
        let mut floor = Self {
            child,
            input,
            output,
        };
        floor.line()?;
        Ok(floor)
    }

    /// Runs and run-time ns so far.
    fn read(&mut self) -> anyhow::Result<(f64, f64)> {
        use std::io::Write;
        writeln!(self.input.as_mut().context("bench-floor stdin")?)?;
        self.line()
    }

    fn line(&mut self) -> anyhow::Result<(f64, f64)> {
        use std::io::BufRead;
        let mut line = String::new();
        self.output.read_line(&mut line)?;
        let v: Value = serde_json::from_str(line.trim())
            .with_context(|| format!("bench-floor said {line:?}"))?;
        Ok((
            v["runs"].as_f64().unwrap_or(0.0),
            v["run_ns"].as_f64().unwrap_or(0.0),
        ))
    }
}

/// Detaches it: end of input.
impl Drop for Floor {
    fn drop(&mut self) {
        drop(self.input.take());
        let _ = self.child.wait();
    }
}

/// `perf record` of process `pid` for `seconds` into `file`: the
/// software clock (hardware counters are not always there), DWARF call
/// graphs (release builds keep no frame pointers).
fn record_profile(
    pid: u32,
    file: &std::path::Path,
    seconds: u64,
) -> anyhow::Result<std::process::Child> {
    Command::new("perf")
        .args(["record", "--quiet", "-e", "cpu-clock", "-F", "499"])
        .args(["--call-graph", "dwarf,16384", "-p", &pid.to_string(), "-o"])
        .arg(file)
        .args(["--", "sleep", &seconds.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("cannot run perf (is it installed? `cargo xtask setup`)")
}

fn overhead(
    rounds: u32,
    seconds: u64,
    workloads: &[Workload],
    profile: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let servers = Servers::start()?;
    let rx = Receiver::start_counting(Protocol::Grpc)?;
    eprintln!("[workloads] warm-up: every workload for 2 s without the agent");
    for &w in workloads {
        servers.load(w, 2)?;
    }
    for round in 1..=rounds {
        for &w in workloads {
            // Alternate which mode goes first so drift over the run (CPU
            // frequency, caches, other tenants) does not favour one.
            let mut modes = if round % 2 == 1 {
                vec!["off", "floor", "on"]
            } else {
                vec!["on", "floor", "off"]
            };
            // A profile is of the agent; the floor run would only add time.
            if profile.is_some() {
                modes.retain(|m| *m != "floor");
            }
            for mode in modes {
                eprintln!(
                    "[workloads] round {round}/{rounds}: {} with the agent {mode}, {seconds} s…",
                    w.name()
                );
                let fields = match mode {
                    "on" => {
                        let file =
                            profile.map(|dir| dir.join(format!("{}-{round}.perf.data", w.name())));
                        traced_run(&servers, &rx, w, seconds, file.as_deref())?
                    }
                    "floor" => floor_run(&servers, w, seconds)?,
                    _ => load_fields(&servers.measured_load(w, seconds)?),
                };
                let line = merge(
                    json!({"workload": w.name(), "round": round, "mode": mode}),
                    fields,
                );
                println!("{line}");
            }
        }
    }
    Ok(())
}

/// Opens `n` short connections to nginx, one request each.
fn short_connections(servers: &Servers, n: usize) -> u64 {
    (0..n)
        .filter(|_| !get_raw(servers.nginx.port, "/index.html").is_empty())
        .count() as u64
}

fn soak(minutes: u64, sample_seconds: u64) -> anyhow::Result<()> {
    let servers = Servers::start()?;
    let rx = Receiver::start_counting(Protocol::Grpc)?;
    let (agent, port) = start_agent(&rx)?;
    let pid = agent.pid();
    let requests = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let start = Instant::now();
    let end = start + Duration::from_secs(minutes * 60);
    eprintln!(
        "[workloads] soak: {minutes} min of mixed traffic, a sample every {sample_seconds} s"
    );
    let traffic = || -> anyhow::Result<()> {
        while Instant::now() < end {
            for w in Workload::ALL {
                let r = match w {
                    // Moderate load: fewer connections than the overhead runs.
                    Workload::Nginx => {
                        load::wrk(&servers.nginx.url("/a.txt"), 4, Duration::from_secs(3), &[])?
                    }
                    // Not part of the soak's mix.
                    Workload::NginxHttps | Workload::RedisUnix | Workload::UnixUnknown => {
                        continue;
                    }
                    Workload::Redis => load::redis_benchmark(&servers.redis, 4, 5_000)?,
                    Workload::Pgbench => load::pgbench(&servers.pg, 2, Duration::from_secs(3))?,
                    Workload::Fastapi => load::wrk(
                        &servers.models.url(&servers.model_path),
                        2,
                        Duration::from_secs(3),
                        &[TENANT],
                    )?,
                };
                requests.fetch_add(r.requests, Ordering::Relaxed);
            }
            // Connection churn: new sockets every cycle.
            requests.fetch_add(short_connections(&servers, 200), Ordering::Relaxed);
        }
        Ok(())
    };
    let sampler = || {
        let mut next = start;
        while !done.load(Ordering::Relaxed) {
            if Instant::now() >= next {
                next += Duration::from_secs(sample_seconds);
                let (Some(p), m) = (proc_stats(pid), metrics(port)) else {
                    eprintln!("[workloads] the agent is gone");
                    return;
                };
                let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
                let line = json!({
                    "t_s": start.elapsed().as_secs_f64(),
                    "rss_kib": p.rss_kib,
                    "peak_rss_kib": p.peak_rss_kib,
                    "cpu_seconds": p.cpu_seconds,
                    "requests": requests.load(Ordering::Relaxed),
                    "connections_open": get("zerotrace_connections_open"),
                    "events": get("zerotrace_events_total"),
                    "events_lost": get("zerotrace_events_lost_total"),
                    "spans_made": get("zerotrace_spans_total"),
                    "spans_dropped": get("zerotrace_spans_dropped_total"),
                    "export_queue_spans": get("zerotrace_export_queue_spans"),
                    "spans_received": rx.span_count(),
                });
                println!("{line}");
            }
            thread::sleep(Duration::from_millis(200));
        }
    };
    let outcome = thread::scope(|s| {
        let sampling = s.spawn(sampler);
        let r = traffic();
        done.store(true, Ordering::Relaxed);
        let _ = sampling.join();
        r
    });
    agent.stop()?;
    outcome
}

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(
        // SAFETY: trivial libc call.
        unsafe { libc::geteuid() } == 0,
        "needs root (the agent loads eBPF programs); run `cargo xtask bench overhead`"
    );
    for tool in ["wrk", "redis-benchmark", "nginx"] {
        anyhow::ensure!(
            load::installed(tool),
            "{tool} is not installed: run `cargo xtask setup`"
        );
    }
    match Cli::parse().cmd {
        Cmd::Overhead {
            rounds,
            seconds,
            workloads,
            profile,
        } => {
            let workloads = if workloads.is_empty() {
                Workload::ALL.to_vec()
            } else {
                workloads
            };
            overhead(rounds, seconds, &workloads, profile.as_deref())
        }
        Cmd::Soak {
            minutes,
            sample_seconds,
        } => soak(minutes, sample_seconds),
        Cmd::Nesting {
            seconds,
            interpreters,
            connections,
        } => nesting(seconds, interpreters, &connections),
    }
}

/// Debian's interpreter and the pyenv ones the issue names, where present.
fn default_interpreters() -> Vec<std::path::PathBuf> {
    let mut found = vec![std::path::PathBuf::from("/usr/bin/python3.11")];
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let versions = std::path::Path::new(&home).join(".pyenv/versions");
    for minor in ["3.9", "3.11", "3.13"] {
        let Ok(dir) = std::fs::read_dir(&versions) else {
            break;
        };
        let mut candidates: Vec<_> = dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{minor}.")))
            })
            .collect();
        candidates.sort();
        if let Some(dir) = candidates.pop() {
            found.push(dir.join(format!("bin/python{minor}")));
        }
    }
    found.retain(|p| p.is_file());
    found
}

/// The venv's python for `interpreter`: the test venv for Debian's own,
/// else a nesting venv made once per interpreter.
fn app_python(interpreter: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    if interpreter.starts_with("/usr/bin") {
        return zerotrace_tests::otlp::otel_python();
    }
    nesting::venv_python(interpreter)
}

/// Spans received since `t0_ns` (wall clock, ns).
fn spans_since(rx: &Receiver, t0_ns: u64) -> Vec<zerotrace_tests::otlp::ReceivedSpan> {
    let mut spans = rx.spans();
    spans.retain(|s| s.start_ns >= t0_ns);
    spans
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Runs wrk for one cell and scores the spans it produced.
fn nesting_cell(
    rx: &Receiver,
    url: &str,
    handler: &str,
    pids: &[u32],
    connections: u32,
    seconds: u64,
) -> anyhow::Result<Value> {
    let t0 = now_ns();
    let load = nesting::wrk_with_ids(url, handler, connections, Duration::from_secs(seconds))?;
    // Let the last spans arrive: the exporter batches every 200 ms.
    let mut last = 0;
    for _ in 0..20 {
        thread::sleep(Duration::from_millis(500));
        let n = rx.span_count();
        if n == last {
            break;
        }
        last = n;
    }
    let score = nesting::score(&spans_since(rx, t0), pids, handler);
    Ok(json!({
        "handler": handler,
        "connections": connections,
        "requests": load.requests,
        "rps": load.rate(),
        "errors": load.errors,
        "client_spans": score.client_spans,
        "right": score.right,
        "root": score.root,
        "wrong": score.wrong,
        "wrong_examples": score.wrong_examples,
        "root_examples": score.root_examples,
    }))
}

fn nesting(
    seconds: u64,
    interpreters: Vec<std::path::PathBuf>,
    connections: &[u32],
) -> anyhow::Result<()> {
    let interpreters = if interpreters.is_empty() {
        default_interpreters()
    } else {
        interpreters
    };
    anyhow::ensure!(!interpreters.is_empty(), "no interpreter found");
    let redis = Redis::start()?;
    let pg = Postgres::start()?;
    let rx = Receiver::start(Protocol::Grpc)?;
    let debian = zerotrace_tests::otlp::otel_python()?;
    // Debian's interpreter on uvloop, calling nothing: the HTTP backend
    // every app calls, and the app behind nginx.
    let plain_app = || {
        nesting::NestingApp::start(
            &debian,
            &pg,
            &redis,
            "http://127.0.0.1:9",
            nesting::EventLoop::Uvloop,
        )
    };
    let backend = plain_app()?;
    let agent = Agent::run(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &rx.endpoint()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", rx.protocol_name()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    )?;
    for interpreter in &interpreters {
        let python = app_python(interpreter)?;
        for event_loop in [nesting::EventLoop::Asyncio, nesting::EventLoop::Uvloop] {
            eprintln!(
                "[workloads] nesting: {} with {}",
                interpreter.display(),
                event_loop.name()
            );
            let app =
                nesting::NestingApp::start(&python, &pg, &redis, &backend.url(""), event_loop)?;
            // Warm up: pools, worker threads, the agent's first look.
            nesting::wrk_with_ids(&app.url(""), "async", 4, Duration::from_secs(1))?;
            nesting::wrk_with_ids(&app.url(""), "sync", 4, Duration::from_secs(1))?;
            for &c in connections {
                for handler in ["async", "sync"] {
                    let cell = nesting_cell(&rx, &app.url(""), handler, &[app.pid], c, seconds)?;
                    let line = merge(
                        json!({
                            "kind": "app",
                            "interpreter": interpreter.display().to_string(),
                            "loop": event_loop.name(),
                        }),
                        cell,
                    );
                    println!("{line}");
                }
            }
        }
    }
    // nginx in front of the app: a new upstream connection per request,
    // and kept-alive ones.
    let app = plain_app()?;
    for keepalive in [0, 32] {
        eprintln!("[workloads] nesting: nginx, upstream keepalive {keepalive}");
        let proxy = nesting::Proxy::start(app.port, keepalive)?;
        nesting::wrk_with_ids(&proxy.url(""), "backend", 4, Duration::from_secs(1))?;
        for &c in connections {
            let cell = nesting_cell(&rx, &proxy.url(""), "backend", &proxy.workers(), c, seconds)?;
            let line = merge(json!({"kind": "nginx", "keepalive": keepalive}), cell);
            println!("{line}");
        }
    }
    drop(agent);
    nesting_cost(&debian, &pg, &redis, &backend, seconds)
}

/// What following the runtime costs: the app under the same load with the
/// agent's runtimes off and on, alternating over three rounds.
fn nesting_cost(
    python: &std::path::Path,
    pg: &Postgres,
    redis: &Redis,
    backend: &nesting::NestingApp,
    seconds: u64,
) -> anyhow::Result<()> {
    let app = nesting::NestingApp::start(
        python,
        pg,
        redis,
        &backend.url(""),
        nesting::EventLoop::Asyncio,
    )?;
    let rx = Receiver::start_counting(Protocol::Grpc)?;
    nesting::wrk_with_ids(&app.url(""), "async", 16, Duration::from_secs(2))?;
    for round in 1..=3 {
        let modes = if round % 2 == 1 {
            ["off", "auto"]
        } else {
            ["auto", "off"]
        };
        for runtimes in modes {
            eprintln!("[workloads] nesting cost: round {round}, runtimes {runtimes}");
            let listen = free_port();
            let mut cmd = Command::new(agent_bin());
            cmd.args(["run", "--listen", &format!("127.0.0.1:{listen}")])
                .args(["--runtimes", runtimes])
                .env("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint())
                .env("OTEL_EXPORTER_OTLP_PROTOCOL", rx.protocol_name());
            program_stats(&mut cmd);
            let agent = Agent::spawn(cmd, "tracing")?;
            // A first request makes the agent look at the app.
            nesting::wrk_with_ids(&app.url(""), "async", 2, Duration::from_secs(1))?;
            let k0 = program_seconds(listen);
            let r0 = program_runs(listen);
            let p0 = proc_stats(agent.pid()).context("agent gone")?;
            let a0 = proc_stats(app.pid).context("app gone")?;
            let load =
                nesting::wrk_with_ids(&app.url(""), "async", 16, Duration::from_secs(seconds))?;
            let k1 = program_seconds(listen);
            let r1 = program_runs(listen);
            let p1 = proc_stats(agent.pid()).context("agent gone")?;
            let a1 = proc_stats(app.pid).context("app gone")?;
            let m = drain(listen);
            agent.stop()?;
            let per_request = |v: f64| {
                if load.requests > 0 {
                    v / load.requests as f64
                } else {
                    0.0
                }
            };
            let unit_ns = k1.get("runtime_unit_new").unwrap_or(&0.0)
                - k0.get("runtime_unit_new").unwrap_or(&0.0);
            // Both data exit hooks read the unit.
            let exit_ns: f64 = ["sys_exit_data", "sys_exit_receive"]
                .iter()
                .map(|p| k1.get(*p).unwrap_or(&0.0) - k0.get(*p).unwrap_or(&0.0))
                .sum();
            println!(
                "{}",
                json!({
                    "kind": "cost",
                    "round": round,
                    "runtimes": runtimes,
                    "requests": load.requests,
                    "rps": load.rate(),
                    "app_cpu_us_per_request": per_request((a1.cpu_seconds - a0.cpu_seconds) * 1e6),
                    "agent_cpu_us_per_request": per_request((p1.cpu_seconds - p0.cpu_seconds) * 1e6),
                    "unit_probe_ns_per_request": per_request(unit_ns * 1e9),
                    "unit_probe_runs_per_request": per_request(
                        r1.get("runtime_unit_new").unwrap_or(&0.0)
                            - r0.get("runtime_unit_new").unwrap_or(&0.0)
                    ),
                    "sys_exit_data_ns_per_request": per_request(exit_ns * 1e9),
                    "spans": m.get("zerotrace_spans_total").copied().unwrap_or(0.0),
                })
            );
        }
    }
    Ok(())
}
