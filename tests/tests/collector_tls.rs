//! End-to-end: the agent exports to https:// collectors — nginx terminating
//! TLS in front of a real rotel, with a test CA and certificates made by
//! the openssl CLI. gRPC and HTTP/protobuf over TLS deliver spans, mutual
//! TLS works with the client certificate; a missing client certificate or
//! a CA that did not sign the collector's certificate fails every export,
//! counted in /metrics and logged as an error, while the agent runs on; a
//! bad PEM file stops the start with exit code 2. The agent's own TLS
//! exports are never traced, and a collector on this host reads them
//! without the kernel copying their bytes.

use std::{
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use zerotrace_tests::{
    Agent, agent_bin, can_trace, free_port,
    rotel::{Rotel, span_names},
    servers::{PythonApp, curl},
    spans::WAIT,
    stats::metric,
    tls_collector::{ClientAuth, TestPki, TlsTerminator},
    wait_timeout,
};

/// A traced app, and a collector behind TLS.
struct Setup {
    pki: TestPki,
    rotel: Rotel,
    terminator: TlsTerminator,
    app: PythonApp,
}

fn setup(client_auth: ClientAuth) -> Setup {
    let pki = TestPki::new().unwrap();
    let rotel = Rotel::start().unwrap();
    let terminator = TlsTerminator::start(&pki, &rotel, client_auth).unwrap();
    let app = PythonApp::start().unwrap();
    Setup {
        pki,
        rotel,
        terminator,
        app,
    }
}

impl Setup {
    /// A request the agent makes spans of.
    fn request(&self, path: &str) {
        curl(&[
            "-o",
            "/dev/null",
            &format!("http://127.0.0.1:{}{path}", self.app.port),
        ])
        .unwrap();
    }

    /// Waits until rotel printed the app's server span for `path`.
    fn delivered(&self, path: &str) {
        self.rotel
            .wait_for_log(WAIT, &format!("the server span of {path}"), |log| {
                log.contains(path) && log.contains("SPAN_KIND_SERVER")
            })
            .unwrap();
    }

    /// Whether rotel printed a span about a connection to `port`.
    fn span_on_port(&self, port: u16) -> bool {
        self.rotel
            .log()
            .contains(&format!("server.port: Int({port})"))
    }

    /// The agent's own TLS exports are never traced: no span is about a
    /// connection to the terminator (server.port), nor about nginx's
    /// HTTP/2 hop to rotel's gRPC port.
    fn assert_exports_not_traced(&self) {
        for (what, port) in [
            ("the TLS terminator's gRPC port", self.terminator.grpc_port),
            ("the TLS terminator's HTTP port", self.terminator.http_port),
            ("rotel's gRPC port", port_of(&self.rotel.grpc_endpoint())),
        ] {
            assert!(
                !self.span_on_port(port),
                "a span about {what} ({port}): the agent traced its own exports:\n{}",
                self.rotel.log()
            );
        }
    }
}

fn port_of(endpoint: &str) -> u16 {
    endpoint.rsplit(':').next().unwrap().parse().unwrap()
}

fn path_str(path: &std::path::Path) -> &str {
    path.to_str().unwrap()
}

/// Quick batches, and nothing from the environment the tests run in.
const BATCH: (&str, &str) = ("OTEL_BSP_SCHEDULE_DELAY", "200");

#[test]
fn grpc_over_tls_delivers_spans() {
    if !can_trace() {
        return;
    }
    let s = setup(ClientAuth::None);
    let ca = s.pki.ca_pem();
    let agent = Agent::run(
        &["--listen", "off"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &s.terminator.grpc_endpoint()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", path_str(&ca)),
            BATCH,
        ],
    )
    .unwrap();
    // The ready line says where spans go and what is trusted.
    let ready = &agent.stderr_lines[agent.stderr_lines.len() - 1];
    let want = format!(
        "otlp grpc to {} (TLS trusting the CA certificates of \
         OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE={})",
        s.terminator.grpc_endpoint(),
        ca.display()
    );
    assert!(ready.contains(&want), "{ready}");
    s.request("/tls/grpc/1");
    s.delivered("/tls/grpc/1");
    agent.stop().unwrap();

    // Without a CA file, the host's CA bundle: here the one SSL_CERT_FILE
    // names, as OpenSSL would read it. The endpoint has no scheme, which
    // for gRPC means TLS.
    let host = format!("127.0.0.1:{}", s.terminator.grpc_port);
    let agent = Agent::run(
        &["--listen", "off"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &host),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("SSL_CERT_FILE", path_str(&ca)),
            BATCH,
        ],
    )
    .unwrap();
    let ready = &agent.stderr_lines[agent.stderr_lines.len() - 1];
    assert!(
        ready.contains(&format!(
            "otlp grpc to https://{host} (TLS trusting the host's CA certificates)"
        )),
        "{ready}"
    );
    s.request("/tls/grpc/2");
    s.delivered("/tls/grpc/2");
    agent.stop().unwrap();
    s.assert_exports_not_traced();
}

#[test]
fn http_protobuf_over_tls_delivers_spans() {
    if !can_trace() {
        return;
    }
    let s = setup(ClientAuth::None);
    // This time from the config file.
    let config = s.pki.path("zerotrace.yaml");
    std::fs::write(
        &config,
        format!(
            "export:\n  exporter: otlp\n  endpoint: {}\n  protocol: http/protobuf\n  tls:\n    ca_file: {}\n",
            s.terminator.http_endpoint(),
            s.pki.ca_pem().display()
        ),
    )
    .unwrap();
    let agent = Agent::run(
        &["--config", path_str(&config), "--listen", "off"],
        &[BATCH],
    )
    .unwrap();
    let ready = &agent.stderr_lines[agent.stderr_lines.len() - 1];
    assert!(
        ready.contains(&format!(
            "otlp http/protobuf to {}/v1/traces (TLS trusting the CA certificates of export.tls.ca_file=",
            s.terminator.http_endpoint()
        )),
        "{ready}"
    );
    s.request("/tls/http/1");
    s.delivered("/tls/http/1");
    agent.stop().unwrap();
    s.assert_exports_not_traced();
}

/// nginx's onward call that forwards an OTLP/HTTP export to rotel (plain
/// HTTP/1.1) carries the agent's exports on: neither its CLIENT span nor
/// rotel's SERVER span `POST /v1/traces` may appear, or every export would
/// make two more spans through the same hop. (gRPC is forwarded as HTTP/2,
/// which is not parsed.)
#[test]
fn a_same_host_proxys_hop_to_the_collector_is_not_traced() {
    if !can_trace() {
        return;
    }
    let s = setup(ClientAuth::None);
    let agent = Agent::run(
        &[
            "--listen",
            "off",
            "--otlp-endpoint",
            &s.terminator.http_endpoint(),
            "--otlp-protocol",
            "http/protobuf",
            "--otlp-certificate",
            path_str(&s.pki.ca_pem()),
        ],
        &[BATCH],
    )
    .unwrap();
    s.request("/tls/hop/1");
    s.delivered("/tls/hop/1");
    agent.stop().unwrap();
    let port = port_of(&s.rotel.http_endpoint());
    assert!(
        !s.span_on_port(port),
        "nginx's hop to rotel's HTTP port {port} was traced:\n{}",
        s.rotel.log()
    );
}

/// A collector on this host reads the agent's exports through traced
/// syscalls. The kernel goes on reporting those reads (a proxy's onward hop
/// is known by them, see above) but copies none of their bytes: the spans
/// would be copied once more for every hop, to be thrown away.
#[test]
fn a_same_host_collectors_reads_of_the_exports_are_not_copied() {
    if !can_trace() {
        return;
    }
    let rotel = Rotel::start().unwrap();
    let listen = free_port();
    let addr = format!("127.0.0.1:{listen}");
    let pid = rotel.pid().to_string();
    // Only rotel is traced; the agent's interval spans are the exports.
    let agent = Agent::run(
        &[
            "--listen",
            &addr,
            "--pid",
            &pid,
            "--telemetry-interval",
            "1",
            "--otlp-endpoint",
            &rotel.grpc_endpoint(),
            "--otlp-protocol",
            "grpc",
        ],
        &[BATCH],
    )
    .unwrap();
    let exports = |at_least: usize| {
        rotel
            .wait_for_log(WAIT, &format!("{at_least} interval spans"), |log| {
                span_names(log)
                    .iter()
                    .filter(|n| *n == "ebpf.buffer.read")
                    .count()
                    >= at_least
            })
            .unwrap();
        // /metrics is refreshed once a second.
        thread::sleep(Duration::from_millis(1500));
        let read = |name| metric(listen, name).unwrap_or(0.0);
        (
            read("zerotrace_events_total"),
            read("zerotrace_event_bytes_total"),
        )
    };
    // The first export may be read before the agent has told the kernel.
    let seen = rotel
        .span_names()
        .iter()
        .filter(|n| *n == "ebpf.buffer.read")
        .count();
    let (records_before, bytes_before) = exports(seen.max(2));
    let (records_after, bytes_after) = exports(seen.max(2) + 4);
    let (records, bytes) = (records_after - records_before, bytes_after - bytes_before);
    assert!(
        records >= 4.0,
        "rotel's reads of 4 exports are reported: {records} records"
    );
    // A record without payload is its header, under 128 bytes; one export
    // of an interval span with its resource is over 500.
    assert!(
        bytes / records < 128.0,
        "{bytes} bytes in {records} records: rotel's reads of the exports were copied"
    );
    assert!(metric(listen, "zerotrace_connections_muted_total").unwrap_or(0.0) >= 1.0);
    drop(agent);
}

/// Runs the agent with `args` and metrics on a free port; makes spans the
/// collector never gets; returns the first export failure it logs, after
/// checking that /metrics counts failed spans, none exported, and that the
/// agent runs on (its run loop answers /health) and stops cleanly.
fn refused(s: &Setup, args: &[&str], path: &str) -> String {
    let listen = free_port();
    let addr = format!("127.0.0.1:{listen}");
    let mut all = vec!["--listen", addr.as_str()];
    all.extend_from_slice(args);
    let mut agent = Agent::run(&all, &[BATCH]).unwrap();
    s.request(path);
    let line = agent.wait_for_stderr("export failed", WAIT).unwrap();
    // /metrics is refreshed once a second: wait for the count, not a time.
    let deadline = Instant::now() + WAIT;
    let failed = loop {
        let failed = metric(listen, "zerotrace_export_errors_total").unwrap_or(0.0);
        if failed > 0.0 || Instant::now() >= deadline {
            break failed;
        }
        thread::sleep(Duration::from_millis(200));
    };
    assert!(failed > 0.0, "failed exports not counted in /metrics");
    assert_eq!(metric(listen, "zerotrace_spans_exported_total"), Some(0.0));
    // More traffic, more failed exports: the pipeline is not stuck.
    s.request(&format!("{path}/again"));
    let health = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{addr}/health"),
    ])
    .unwrap();
    assert_eq!(health, "200", "the agent's run loop stalled");
    agent.stop().unwrap();
    assert!(
        !s.rotel.log().contains(path),
        "spans of {path} reached the collector"
    );
    line
}

#[test]
fn mutual_tls_delivers_with_the_client_certificate_and_fails_without() {
    if !can_trace() {
        return;
    }
    let s = setup(ClientAuth::Required);
    let (ca, cert, key) = (s.pki.ca_pem(), s.pki.client_pem(), s.pki.client_key());
    for (protocol, endpoint) in [
        ("grpc", s.terminator.grpc_endpoint()),
        ("http/protobuf", s.terminator.http_endpoint()),
    ] {
        eprintln!("{protocol}");
        let tls = [
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            protocol,
            "--otlp-certificate",
            path_str(&ca),
        ];
        // With the client certificate, from flags.
        let mut args = tls.to_vec();
        args.extend([
            "--listen",
            "off",
            "--otlp-client-certificate",
            path_str(&cert),
            "--otlp-client-key",
            path_str(&key),
        ]);
        let agent = Agent::run(&args, &[BATCH]).unwrap();
        let ready = &agent.stderr_lines[agent.stderr_lines.len() - 1];
        assert!(
            ready.contains(&format!("client certificate {}", cert.display())),
            "{ready}"
        );
        let path = format!("/mtls/{}/ok", protocol.replace('/', "-"));
        s.request(&path);
        s.delivered(&path);
        agent.stop().unwrap();

        // Without it, nginx refuses every export.
        let path = format!("/mtls/{}/refused", protocol.replace('/', "-"));
        let line = refused(&s, &tls, &path);
        // nginx answers HTTP 400 (it does not end the handshake): an
        // error all the same, saying what to set.
        assert!(line.contains("ERROR"), "{line}");
        assert!(
            line.contains("the collector refused the connection")
                && line.contains("No required SSL certificate was sent")
                && line.contains("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"),
            "{line}"
        );
    }
    s.assert_exports_not_traced();
}

#[test]
fn a_collector_certificate_from_another_ca_fails_every_export_and_the_agent_runs_on() {
    if !can_trace() {
        return;
    }
    let s = setup(ClientAuth::None);
    let other = s.pki.other_ca_pem();
    for (protocol, endpoint) in [
        ("grpc", s.terminator.grpc_endpoint()),
        ("http/protobuf", s.terminator.http_endpoint()),
    ] {
        eprintln!("{protocol}");
        let path = format!("/wrong-ca/{}", protocol.replace('/', "-"));
        let line = refused(
            &s,
            &[
                "--otlp-endpoint",
                &endpoint,
                "--otlp-protocol",
                protocol,
                "--otlp-certificate",
                path_str(&other),
            ],
            &path,
        );
        // An error, saying what failed and what to check.
        assert!(line.contains("ERROR"), "{line}");
        assert!(
            line.contains("the collector's certificate is not trusted")
                && line.contains("UnknownIssuer")
                && line.contains(&format!("--otlp-certificate={}", other.display())),
            "{line}"
        );
    }
    s.assert_exports_not_traced();
}

/// `zerotrace run ARGS` with `envs`, expected to stop at start-up; returns
/// its exit code and stderr.
fn start_fails(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("run")
        .args(["--listen", "off", "--duration", "5"])
        .args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(30));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (
        status.and_then(|s| s.code()),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_tls_files_are_configuration_errors() {
    let pki = TestPki::new().unwrap();
    let garbage = pki.path("openssl.cnf");
    let missing = pki.path("missing.pem");
    let (ca, ca_key, client) = (pki.ca_pem(), pki.path("ca.key"), pki.client_pem());
    let (garbage, missing) = (path_str(&garbage), path_str(&missing));
    let (ca, ca_key, client) = (path_str(&ca), path_str(&ca_key), path_str(&client));
    // Flags, environment, and what stderr must say.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], String);
    let cases: [Case; 5] = [
        (
            &["--otlp-certificate", missing],
            &[],
            format!("--otlp-certificate={missing}: No such file"),
        ),
        (
            &[],
            &[("OTEL_EXPORTER_OTLP_CERTIFICATE", garbage)],
            format!("OTEL_EXPORTER_OTLP_CERTIFICATE={garbage}: no PEM certificate"),
        ),
        (
            &[],
            &[("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", client)],
            "a client certificate needs its key".into(),
        ),
        // No CA file, and no CA bundle where the host's should be.
        (
            &[],
            &[("SSL_CERT_FILE", missing), ("SSL_CERT_DIR", missing)],
            "no CA certificates on this host".into(),
        ),
        // The CA's key does not belong to the client certificate.
        (
            &[
                "--otlp-certificate",
                ca,
                "--otlp-client-certificate",
                client,
            ],
            &[("OTEL_EXPORTER_OTLP_CLIENT_KEY", ca_key)],
            format!("OTEL_EXPORTER_OTLP_CLIENT_KEY={ca_key} does not fit the client certificate"),
        ),
    ];
    for (args, envs, says) in cases {
        let mut all = vec![
            "--otlp-endpoint",
            "https://127.0.0.1:4317",
            "--otlp-protocol",
            "grpc",
        ];
        all.extend(args);
        let (code, stderr) = start_fails(&all, envs);
        assert_eq!(code, Some(2), "{all:?} {envs:?}: {stderr}");
        assert!(
            stderr.contains("configuration error") && stderr.contains(&says),
            "{all:?} {envs:?}: want {says:?} in {stderr}"
        );
    }
}
