//! End-to-end: HTTP traffic of real nginx, a Python app and curl becomes
//! spans, checked where a user would look — at an OTLP receiver, a real
//! collector, the console and the jsonl file. Needs root.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::Duration,
};

use zerotrace_tests::{
    otlp::{Protocol, ReceivedSpan, Receiver},
    rotel::Rotel,
    servers::{Nginx, PythonApp, curl},
    spans::*,
    *,
};

/// Spans of one request through nginx, found by the path it carries.
struct Proxied<'a> {
    curl: &'a ReceivedSpan,
    nginx_server: &'a ReceivedSpan,
    nginx_client: &'a ReceivedSpan,
    app: &'a ReceivedSpan,
}

fn proxied<'a>(
    spans: &'a [ReceivedSpan],
    nginx: &Nginx,
    app: &PythonApp,
    path: &str,
) -> Proxied<'a> {
    let for_path = |s: &ReceivedSpan| {
        s.attr_str("url.path") == Some(path)
            || s.attr_str("url.full")
                .is_some_and(|u| u.ends_with(path) || u.contains(&format!("{path}?")))
    };
    let port = |s: &ReceivedSpan| s.attr_i64("server.port");
    let nginx_port = Some(i64::from(nginx.port));
    let app_port = Some(i64::from(app.port));
    Proxied {
        curl: one(spans, "curl client span", |s| {
            for_path(s) && s.kind == "CLIENT" && is_service(s, "curl")
        }),
        nginx_server: one(spans, "nginx server span", |s| {
            for_path(s) && s.kind == "SERVER" && port(s) == nginx_port
        }),
        nginx_client: one(spans, "nginx client span", |s| {
            for_path(s) && s.kind == "CLIENT" && is_service(s, "nginx")
        }),
        app: one(spans, "app server span", |s| {
            for_path(s) && s.kind == "SERVER" && port(s) == app_port
        }),
    }
}

fn count_for_path(spans: &[ReceivedSpan], path: &str) -> usize {
    spans
        .iter()
        .filter(|s| {
            s.attr_str("url.path") == Some(path)
                || s.attr_str("url.full").is_some_and(|u| u.contains(path))
        })
        .count()
}

#[test]
fn proxied_requests_are_one_trace_with_conventional_attributes_over_grpc() {
    if !can_trace() {
        return;
    }
    for transport in ["ringbuf", "perf"] {
        eprintln!("transport {transport}");
        proxied_requests_over(transport);
    }
}

fn proxied_requests_over(transport: &str) {
    let app = PythonApp::start().unwrap();
    let nginx = Nginx::start(app.port).unwrap();
    let rx = Receiver::start(Protocol::Grpc).unwrap();
    let agent = agent_for(
        &rx,
        &["--route", "/api/users/{id}", "--transport", transport],
    );

    // Tenant headers behind 3 KiB of cookies, a secret in the query.
    let cookie = format!("Cookie: session={}", "c".repeat(3072));
    let url = nginx.url("/api/users/42?token=s3cret&page=2");
    curl(&[
        "-o",
        "/dev/null",
        "-H",
        &cookie,
        "-H",
        "x-tenant-id: acme",
        "-H",
        "x-user-id: u-7",
        &url,
    ])
    .unwrap();
    curl(&["-o", "/dev/null", &nginx.url("/api/fail")]).unwrap();
    curl(&["-o", "/dev/null", &nginx.url("/missing.txt")]).unwrap();
    curl(&["-o", "/dev/null", &nginx.url("/index.html")]).unwrap();

    let spans = rx
        .wait_for(WAIT, "spans of all four requests", |s| {
            count_for_path(s, "/api/users/42") >= 4
                && count_for_path(s, "/api/fail") >= 4
                && count_for_path(s, "/missing.txt") >= 2
                && count_for_path(s, "/index.html") >= 2
        })
        .unwrap();
    drop(agent);

    // One trace: curl → nginx → nginx's upstream call → the app.
    let p = proxied(&spans, &nginx, &app, "/api/users/42");
    let all = [p.curl, p.nginx_server, p.nginx_client, p.app];
    for s in all {
        assert_eq!(s.trace_id, p.curl.trace_id, "one trace:{}", briefs(&spans));
        assert_eq!(s.attr_str("tenant.id"), Some("acme"), "{}", s.brief());
        assert_eq!(s.attr_str("user.id"), Some("u-7"), "{}", s.brief());
        assert_eq!(s.status, "UNSET", "{}", s.brief());
        assert_eq!(s.attr_i64("http.response.status_code"), Some(200));
        assert_eq!(s.attr_str("http.request.method"), Some("GET"));
        assert_eq!(s.attr_str("network.protocol.version"), Some("1.1"));
        assert_eq!(s.attr_str("network.peer.address"), Some("127.0.0.1"));
        assert!(s.attr_i64("network.peer.port").is_some());
        assert_eq!(s.scope, "zerotrace");
        for key in ["process.pid", "process.executable.name", "host.name"] {
            assert!(
                s.resource.contains_key(key),
                "{key} missing: {:?}",
                s.resource
            );
        }
        let everything = format!("{:?} {:?}", s.attributes, s.resource);
        assert!(
            !everything.contains("ccccccccc"),
            "cookie exported: {}",
            s.brief()
        );
        assert!(
            !everything.contains("s3cret"),
            "query value exported: {}",
            s.brief()
        );
    }
    assert_eq!(p.curl.parent_span_id, "", "curl starts the trace");
    assert_eq!(p.nginx_server.parent_span_id, p.curl.span_id);
    assert_eq!(p.nginx_client.parent_span_id, p.nginx_server.span_id);
    assert_eq!(p.app.parent_span_id, p.nginx_client.span_id);
    assert_eq!(p.nginx_server.name, "GET /api/users/{id}");
    assert_eq!(p.app.name, "GET /api/users/{id}");
    assert_eq!(p.app.attr_str("http.route"), Some("/api/users/{id}"));
    assert_eq!(p.curl.name, "GET");
    assert_eq!(p.nginx_client.name, "GET");
    assert_eq!(p.nginx_server.attr_str("url.path"), Some("/api/users/42"));
    assert_eq!(
        p.nginx_server.attr_str("url.query"),
        Some("token=REDACTED&page=REDACTED")
    );
    assert_eq!(p.nginx_server.attr_str("url.scheme"), Some("http"));
    assert_eq!(p.nginx_server.attr_str("client.address"), Some("127.0.0.1"));
    assert_eq!(p.nginx_server.attr_str("server.address"), Some("127.0.0.1"));
    assert!(
        p.nginx_server
            .attr_str("user_agent.original")
            .unwrap()
            .starts_with("curl/")
    );
    assert_eq!(
        p.curl.attr_str("url.full").unwrap(),
        format!(
            "http://127.0.0.1:{}/api/users/42?token=REDACTED&page=REDACTED",
            nginx.port
        )
    );
    assert_eq!(p.curl.service(), Some("curl"));
    assert_eq!(p.nginx_server.service(), Some("nginx"));
    assert_eq!(p.nginx_server.kind, "SERVER");
    assert_eq!(p.nginx_client.kind, "CLIENT");
    // Children lie within their parents.
    assert!(p.nginx_server.start_ns >= p.curl.start_ns && p.nginx_server.end_ns <= p.curl.end_ns);
    assert!(p.app.start_ns >= p.nginx_client.start_ns && p.app.end_ns <= p.nginx_client.end_ns);

    // A 500 from the app: an error on every span of the trace.
    let f = proxied(&spans, &nginx, &app, "/api/fail");
    for s in [f.curl, f.nginx_server, f.nginx_client, f.app] {
        assert_eq!(s.status, "ERROR", "{}", s.brief());
        assert_eq!(s.attr_str("error.type"), Some("500"), "{}", s.brief());
        assert_eq!(s.trace_id, f.curl.trace_id);
    }
    assert_ne!(f.curl.trace_id, p.curl.trace_id);

    // A 404 is the client's error, not the server's.
    let missing_server = one(&spans, "404 server span", |s| {
        s.kind == "SERVER" && s.attr_str("url.path") == Some("/missing.txt")
    });
    assert_eq!(missing_server.status, "UNSET");
    assert_eq!(
        missing_server.attr_i64("http.response.status_code"),
        Some(404)
    );
    let missing_client = one(&spans, "404 client span", |s| {
        s.kind == "CLIENT"
            && s.attr_str("url.full")
                .is_some_and(|u| u.ends_with("/missing.txt"))
    });
    assert_eq!(missing_client.status, "ERROR");
    assert_eq!(missing_client.attr_str("error.type"), Some("404"));

    // A static file nginx sends with sendfile(2): the span still ends with
    // the body, and its size is right.
    let index = one(&spans, "static file server span", |s| {
        s.kind == "SERVER" && s.attr_str("url.path") == Some("/index.html")
    });
    assert_eq!(
        index.attr_i64("http.response.body.size"),
        Some(1200),
        "{}",
        index.brief()
    );
    assert_eq!(index.name, "GET");

    // Our own exports reach the receiver in this process; they must not
    // come back as spans.
    let rx_port = rx
        .endpoint()
        .rsplit(':')
        .next()
        .unwrap()
        .parse::<i64>()
        .unwrap();
    assert!(
        !spans
            .iter()
            .any(|s| s.attr_i64("server.port") == Some(rx_port)),
        "the agent traced its own exports:{}",
        briefs(&spans)
    );
}

#[test]
fn traceparent_keep_alive_pipelining_and_exclusions_over_http_protobuf() {
    if !can_trace() {
        return;
    }
    let app = PythonApp::start().unwrap();
    let nginx = Nginx::start(app.port).unwrap();
    let rx = Receiver::start(Protocol::HttpProtobuf).unwrap();
    // curl's own client spans are excluded, so the app's spans show the
    // incoming context directly.
    let agent = agent_for(
        &rx,
        &["--exclude-process", "curl", "--exclude-path", "/health"],
    );
    let app_url = |path: &str| format!("http://127.0.0.1:{}{path}", app.port);

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let tp = format!("traceparent: 00-{trace_id}-{parent_id}-01");
    curl(&[
        "-o",
        "/dev/null",
        "-H",
        &tp,
        "-H",
        "tracestate: vendor=x",
        &app_url("/api/users/tp"),
    ])
    .unwrap();
    let bad = "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01";
    curl(&["-o", "/dev/null", "-H", bad, &app_url("/api/users/bad")]).unwrap();
    curl(&["-o", "/dev/null", &app_url("/health")]).unwrap();
    // Keep-alive: three requests over one connection.
    curl(&[
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        &app_url("/api/users/1"),
        &app_url("/api/fail/2"),
        &app_url("/api/users/3"),
    ])
    .unwrap();
    // Pipelining: three requests in one write to nginx.
    let mut conn = TcpStream::connect(("127.0.0.1", nginx.port)).unwrap();
    conn.write_all(
        b"GET /a.txt HTTP/1.1\r\nHost: pipe\r\n\r\n\
          GET /nothing-here HTTP/1.1\r\nHost: pipe\r\n\r\n\
          GET /b.txt HTTP/1.1\r\nHost: pipe\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&answer)
            .matches("HTTP/1.1 ")
            .count(),
        3
    );

    let app_spans = |s: &[ReceivedSpan], path: &str| {
        s.iter()
            .filter(|x| x.kind == "SERVER" && x.attr_str("url.path") == Some(path))
            .count()
    };
    let spans = rx
        .wait_for(WAIT, "app and pipelined spans", |s| {
            [
                "/api/users/tp",
                "/api/users/bad",
                "/api/users/1",
                "/api/fail/2",
                "/api/users/3",
                "/a.txt",
                "/nothing-here",
                "/b.txt",
            ]
            .iter()
            .all(|p| app_spans(s, p) >= 1)
        })
        .unwrap();
    drop(agent);

    let server = |path: &str| {
        one(&spans, path, |s| {
            s.kind == "SERVER" && s.attr_str("url.path") == Some(path)
        })
    };
    let continued = server("/api/users/tp");
    assert_eq!(continued.trace_id, trace_id, "{}", continued.brief());
    assert_eq!(continued.parent_span_id, parent_id);
    let restarted = server("/api/users/bad");
    assert_eq!(
        restarted.parent_span_id, "",
        "malformed traceparent starts a new trace"
    );
    assert!(
        !restarted
            .trace_id
            .starts_with("4bf92f3577b34da6a3ce929d0e0e473")
    );
    assert!(
        !spans
            .iter()
            .any(|s| s.attr_str("url.path") == Some("/health")),
        "excluded path traced:{}",
        briefs(&spans)
    );
    assert!(
        !spans.iter().any(|s| is_service(s, "curl")),
        "excluded process traced"
    );

    // Keep-alive: paired in order on one connection.
    let kept: Vec<&ReceivedSpan> = ["/api/users/1", "/api/fail/2", "/api/users/3"]
        .iter()
        .map(|p| server(p))
        .collect();
    let statuses: Vec<Option<i64>> = kept
        .iter()
        .map(|s| s.attr_i64("http.response.status_code"))
        .collect();
    assert_eq!(statuses, [Some(200), Some(500), Some(200)]);
    assert_eq!(kept[1].status, "ERROR");
    assert!(
        kept.iter()
            .all(|s| s.attr_i64("network.peer.port") == kept[0].attr_i64("network.peer.port"))
    );
    assert!(kept[0].end_ns <= kept[1].start_ns && kept[1].end_ns <= kept[2].start_ns);

    // Pipelining: each response with its request.
    let piped: Vec<&ReceivedSpan> = ["/a.txt", "/nothing-here", "/b.txt"]
        .iter()
        .map(|p| server(p))
        .collect();
    let got: Vec<(Option<i64>, Option<i64>)> = piped
        .iter()
        .map(|s| {
            (
                s.attr_i64("http.response.status_code"),
                s.attr_i64("http.response.body.size"),
            )
        })
        .collect();
    assert_eq!(got[0], (Some(200), Some(333)), "{}", piped[0].brief());
    assert_eq!(got[1].0, Some(404), "{}", piped[1].brief());
    assert_eq!(got[2], (Some(200), Some(4444)), "{}", piped[2].brief());
    assert!(
        piped
            .iter()
            .all(|s| s.attr_str("server.address") == Some("pipe"))
    );
}

#[test]
fn a_real_collector_receives_the_spans() {
    if !can_trace() {
        return;
    }
    let app = PythonApp::start().unwrap();
    let rotel = Rotel::start().unwrap();
    let agent = Agent::run(
        &[
            "--exporter",
            "otlp",
            "--otlp-endpoint",
            &rotel.grpc_endpoint(),
            "--otlp-protocol",
            "grpc",
        ],
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("OTEL_SERVICE_NAME", "orders-api"),
        ],
    )
    .unwrap();
    curl(&[
        "-o",
        "/dev/null",
        &format!("http://127.0.0.1:{}/api/users/7", app.port),
    ])
    .unwrap();
    let log = rotel
        .wait_for_log(WAIT, "the app's server span", |log| {
            log.contains("/api/users/7") && log.contains("SPAN_KIND_SERVER")
        })
        .unwrap();
    drop(agent);
    assert!(rotel.span_names().iter().any(|n| n == "GET"), "{log}");
    assert!(
        log.contains("orders-api"),
        "OTEL_SERVICE_NAME not applied: {log}"
    );
}

#[test]
fn otlp_headers_and_gzip_follow_the_exporter_environment() {
    if !can_trace() {
        return;
    }
    let app = PythonApp::start().unwrap();
    for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
        let rx = Receiver::start(protocol).unwrap();
        let agent = Agent::run(
            &[],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", &rx.endpoint()),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", rx.protocol_name()),
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "Authorization=Bearer%20s3cr3t,x-scope=all",
                ),
                ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-scope=traces"),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
                ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ],
        )
        .unwrap();
        let path = "/api/users/11";
        for _ in 0..3 {
            curl(&[
                "-o",
                "/dev/null",
                &format!("http://127.0.0.1:{}{path}", app.port),
            ])
            .unwrap();
        }
        let on_path = |s: &ReceivedSpan| {
            s.attr_str("url.path") == Some(path)
                || s.attr_str("url.full").is_some_and(|u| u.ends_with(path))
        };
        let spans = rx
            .wait_for(WAIT, "the app's and curl's spans", |spans| {
                let count = |kind| {
                    spans
                        .iter()
                        .filter(|s| on_path(s) && s.kind == kind)
                        .count()
                };
                count("SERVER") >= 3 && count("CLIENT") >= 3
            })
            .unwrap();
        drop(agent);
        let name = protocol.name();
        assert!(rx.errors().is_empty(), "{name}: {:?}", rx.errors());
        let log = rx.request_log();
        assert!(!log.is_empty(), "{name}");
        let encoding = match protocol {
            Protocol::Grpc => "grpc-encoding",
            Protocol::HttpProtobuf => "content-encoding",
        };
        for seen in &log {
            let header = |key: &str| seen.headers.get(key).and_then(|v| v.to_str().ok());
            assert_eq!(header("authorization"), Some("Bearer s3cr3t"), "{name}");
            assert_eq!(header("x-scope"), Some("traces"), "{name}");
            assert_eq!(header(encoding), Some("gzip"), "{name}");
        }
        // A batch is one request, whatever number of processes it covers.
        assert!(
            log.iter().any(|seen| seen.resources >= 2),
            "{name}: every request carried one resource: {log:?}{}",
            briefs(&spans)
        );
    }
}

#[test]
fn console_exporter_prints_trace_trees() {
    if !can_trace() {
        return;
    }
    let app = PythonApp::start().unwrap();
    let nginx = Nginx::start(app.port).unwrap();
    let mut cmd = Command::new(agent_bin());
    cmd.args(["run", "--route", "/api/users/{id}"]);
    for var in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "ZEROTRACE_EXPORTER",
    ] {
        cmd.env_remove(var);
    }
    let agent = Agent::spawn(cmd, "exporting console").unwrap();
    curl(&["-o", "/dev/null", &nginx.url("/api/users/5")]).unwrap();
    let tree = |text: &str| {
        text.contains("nginx SERVER GET /api/users/{id} → 200")
            && text.lines().any(|l| {
                l.contains("└─") && l.contains("SERVER GET /api/users/{id}") && !l.contains("nginx")
            })
    };
    let deadline = std::time::Instant::now() + WAIT;
    while !tree(&agent.stdout_text()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = agent.stdout_text();
    assert!(tree(&text), "no trace tree in:\n{text}");
    // curl → nginx → nginx upstream call → app: four levels of one tree.
    let block: Vec<&str> = text
        .split("trace ")
        .find(|b| b.contains("/api/users/{id}"))
        .unwrap()
        .lines()
        .collect();
    assert!(block[0].contains("4 spans"), "{text}");
    assert!(
        block.iter().any(|l| l.starts_with("         └─")),
        "not nested:\n{text}"
    );
}

#[test]
fn jsonl_exporter_writes_otlp_json_lines() {
    if !can_trace() {
        return;
    }
    let app = PythonApp::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("spans.jsonl");
    let agent = Agent::run(
        &["--exporter", "jsonl", "--output", &out.to_string_lossy()],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .unwrap();
    curl(&[
        "-o",
        "/dev/null",
        "-H",
        "x-tenant-id: t-9",
        &format!("http://127.0.0.1:{}/api/users/9", app.port),
    ])
    .unwrap();
    let find = || -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(&out).ok()?;
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("every line is JSON"))
            .find(|v| {
                let span = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
                span["kind"] == 2 && span.to_string().contains("/api/users/9")
            })
    };
    let deadline = std::time::Instant::now() + WAIT;
    let mut line = find();
    while line.is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        line = find();
    }
    drop(agent);
    let line = line.expect("server span in the jsonl file");
    let span = &line["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
    assert_eq!(span["traceId"].as_str().unwrap().len(), 32, "{line}");
    assert_eq!(span["spanId"].as_str().unwrap().len(), 16);
    assert_eq!(span["name"], "GET");
    let attrs = span["attributes"].to_string();
    assert!(
        attrs.contains("\"tenant.id\"") && attrs.contains("t-9"),
        "{attrs}"
    );
    assert!(
        line["resourceSpans"][0]["resource"]
            .to_string()
            .contains("service.name")
    );
    assert!(span["startTimeUnixNano"].is_string() || span["startTimeUnixNano"].is_number());
}

#[test]
fn bad_configuration_exits_with_code_2_and_names_the_problem() {
    if !can_trace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let mut cmd = Command::new(agent_bin());
        cmd.arg("run").args(args).env("ZEROTRACE_LOG", "warn");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let bad_key = dir.path().join("bad-key.yaml");
    std::fs::write(&bad_key, "http:\n  tenant_headerz: []\n").unwrap();
    let (code, err) = run(&["--config", &bad_key.to_string_lossy()], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("tenant_headerz") && err.contains("bad-key.yaml"),
        "{err}"
    );

    let bad_value = dir.path().join("bad-value.yaml");
    std::fs::write(&bad_value, "capture:\n  transport: pigeon\n").unwrap();
    let (code, err) = run(&["--config", &bad_value.to_string_lossy()], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("pigeon"), "{err}");

    let (code, err) = run(&[], &[("OTEL_TRACES_SAMPLER", "sometimes")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("sometimes"), "{err}");

    let (code, err) = run(&["--config", "/nonexistent/zerotrace.yaml"], &[]);
    assert_eq!(code, Some(2), "{err}");

    // `https://` endpoints are served; a CA file that is not there is a
    // configuration error naming the variable.
    let (code, err) = run(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem"),
        ],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("OTEL_EXPORTER_OTLP_CERTIFICATE"), "{err}");

    let collector = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9");
    let (code, err) = run(
        &[],
        &[collector, ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("OTEL_EXPORTER_OTLP_COMPRESSION"), "{err}");
    let (code, err) = run(&[], &[collector, ("OTEL_EXPORTER_OTLP_HEADERS", "api-key")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("OTEL_EXPORTER_OTLP_HEADERS"), "{err}");

    let (code, err) = run(&["--exporter", "jsonl"], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("output"), "{err}");

    // Precedence: the environment beats the file, a flag beats both.
    let file = dir.path().join("ok.yaml");
    let jsonl = dir.path().join("x.jsonl");
    std::fs::write(
        &file,
        format!(
            "export:\n  exporter: jsonl\n  output: {}\n",
            jsonl.display()
        ),
    )
    .unwrap();
    let config = file.to_string_lossy().into_owned();
    let agent = Agent::spawn(
        {
            let mut cmd = Command::new(agent_bin());
            cmd.args(["run", "--config", &config, "--duration", "1"]);
            cmd
        },
        "exporting jsonl",
    )
    .unwrap();
    drop(agent);
    let mut cmd = Command::new(agent_bin());
    cmd.args(["run", "--config", &config, "--duration", "1"])
        .env("ZEROTRACE_EXPORTER", "console");
    drop(Agent::spawn(cmd, "exporting console").unwrap());
    let mut cmd = Command::new(agent_bin());
    cmd.args([
        "run",
        "--config",
        &config,
        "--duration",
        "1",
        "--exporter",
        "otlp",
        "--otlp-endpoint",
        "http://127.0.0.1:9",
    ])
    .env("ZEROTRACE_EXPORTER", "console");
    drop(Agent::spawn(cmd, "exporting otlp").unwrap());
}
