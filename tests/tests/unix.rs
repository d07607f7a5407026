//! End-to-end: traffic over Unix domain stream sockets becomes the same
//! spans as over TCP, on both kernel transports — nginx proxying to
//! uvicorn on a socket (`proxy_pass http://unix:PATH:`), curl
//! `--unix-socket`, psql and psycopg over PostgreSQL's socket, redis-cli
//! and redis-benchmark `-s`, the mariadb client `--socket`, and a
//! connection opened before the agent started. Such spans carry
//! `network.transport` = `unix` and `server.address` = the listener's path
//! (no `server.port`); a client span's `network.peer.address` is that path
//! too, while a server span of an unnamed client has none. Two processes
//! chattering a protocol nobody knows over a `socketpair()` are left alone:
//! no spans, and the kernel stops copying their data once the agent gave
//! up on them. Bad input: a connection handed to another process with
//! SCM_RIGHTS keeps its links, a client killed mid-request leaves no
//! wrong link, 1500 short connections in a row are 1500 linked pairs and
//! leave no table behind, and a socket excluded by name is muted and
//! untraced while TCP goes on being traced. The first test checks the
//! fixtures themselves, without the agent. Needs root.

use std::{
    os::unix::fs::FileTypeExt,
    thread,
    time::{Duration, Instant},
};

use serde_json::json;
use zerotrace_tests::{
    db::{Mariadb, Postgres},
    otlp::{Protocol, ReceivedSpan, Receiver},
    servers::curl,
    spans::*,
    unix::{
        HeldConnection, RedisUds, SLOW, SocketpairChatter, UdsNginx, UvicornUds, mariadb_socket,
        mariadb_unix, pass_connection, psycopg_unix, short_connections,
    },
    *,
};

/// Every fixture of `zerotrace_tests::unix` works on this machine, over
/// Unix sockets for real.
#[test]
fn unix_fixtures_work_without_agent() {
    if !can_trace() {
        return;
    }
    // uvicorn on a socket: PythonApp's answers, plus the tenant it got.
    let app = UvicornUds::start().unwrap();
    let sock = app.socket_str();
    assert!(sock.len() < 100, "{sock}: too long for sun_path");
    let meta = std::fs::metadata(&app.socket).unwrap();
    assert!(meta.file_type().is_socket(), "{sock}");
    let direct = |args: &[&str], path: &str| -> String {
        let url = format!("http://localhost{path}");
        curl(&[&["--unix-socket", sock.as_str()], args, &[url.as_str()]].concat()).unwrap()
    };
    assert_eq!(
        direct(&[], "/api/users/42?x=1"),
        r#"{"path": "/api/users/42?x=1"}"#
    );
    assert_eq!(
        direct(&["-H", "x-tenant-id: t-uds"], "/api/users/1"),
        r#"{"path": "/api/users/1", "tenant": "t-uds"}"#
    );
    assert_eq!(
        direct(&["-o", "/dev/null", "-w", "%{http_code}"], "/api/fail"),
        "500"
    );

    // nginx (TCP) → uvicorn (socket), the tenant header forwarded.
    let nginx = UdsNginx::start(&app.socket).unwrap();
    for i in 0..3 {
        let body = curl(&[
            "-H",
            "x-tenant-id: t-uds",
            &nginx.url(&format!("/api/users/{i}")),
        ])
        .unwrap();
        assert_eq!(
            body,
            format!(r#"{{"path": "/api/users/{i}", "tenant": "t-uds"}}"#),
            "{}",
            nginx.error_log()
        );
    }

    // A connection made before, used after: keep-alive outlives uvicorn's
    // default 5 s idle timeout.
    let mut held = HeldConnection::start(&app.socket, "t-held", 2).unwrap();
    let first = held.get("/api/users/5").unwrap();
    assert_eq!(first.status, 200);
    assert!(first.same_connection, "{first:?}");
    assert_eq!(
        first.body,
        r#"{"path": "/api/users/5", "tenant": "t-held"}"#
    );
    thread::sleep(Duration::from_secs(6));
    let later = held.get("/api/users/6").unwrap();
    assert_eq!(
        (later.status, later.same_connection),
        (200, true),
        "{later:?}"
    );
    drop(held);

    // /api/slow answers after SLOW; a client killed while it waits.
    let started = Instant::now();
    assert_eq!(direct(&[], "/api/slow/1"), r#"{"path": "/api/slow/1"}"#);
    assert!(started.elapsed() >= SLOW, "{:?}", started.elapsed());
    HeldConnection::start(&app.socket, "", 0)
        .unwrap()
        .kill_during("/api/slow/2", Duration::from_millis(300))
        .unwrap();
    // One connection used by two processes in turn.
    let run = pass_connection(&app.socket, &["/api/p/1"], &["/api/p/2", "/api/p/3"]).unwrap();
    let pids: Vec<u32> = run.responses.iter().map(|r| r.0).collect();
    assert_eq!(
        pids,
        [run.first_pid, run.second_pid, run.second_pid],
        "{run:?}"
    );
    assert_ne!(run.first_pid, run.second_pid);
    assert_eq!(run.responses[2].2, r#"{"path": "/api/p/3"}"#, "{run:?}");
    // Short connections in a row.
    short_connections(&app.socket, "/api/short/", 20).unwrap();
    drop(nginx);
    drop(app);

    // PostgreSQL over its socket: psql -h DIR and psycopg host=DIR.
    let pg = Postgres::start().unwrap();
    let pg_sock = pg.socket_path();
    assert!(
        std::fs::metadata(&pg_sock).unwrap().file_type().is_socket(),
        "{}",
        pg_sock.display()
    );
    let (out, err, ok) = pg
        .psql_unix("SELECT 1;\nSELECT inet_server_addr() IS NULL;\n")
        .unwrap();
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["1", "t"],
        "over the socket"
    );
    let (_, err, ok) = pg.psql_unix("SELECT * FROM missing_table;").unwrap();
    assert!(!ok && err.contains("missing_table"), "{err}");
    let run = psycopg_unix(
        &pg,
        &[
            ("SELECT %s::int + 1, current_database()", json!([41])),
            ("SELECT inet_server_addr() IS NULL", json!([])),
        ],
    )
    .unwrap();
    assert_eq!(run.lines(), ["ssl False", "42|zt", "True"], "{run:?}");
    drop(pg);

    // Redis on a socket only.
    let redis = RedisUds::start().unwrap();
    assert_eq!(redis.cli(&["SET", "k", "v"]).unwrap().trim(), "OK");
    assert_eq!(redis.cli(&["GET", "k"]).unwrap().trim(), "v");
    let info = redis.cli(&["CLIENT", "INFO"]).unwrap();
    assert!(info.contains(&redis.socket_str()), "{info}");
    let out = redis
        .benchmark(&["-c", "1", "-P", "8", "-n", "40", "-t", "set", "-q"])
        .unwrap();
    assert!(out.contains("SET: "), "{out}");
    drop(redis);

    // MariaDB over its --socket: a socket session's host is `localhost`.
    let my = Mariadb::start().unwrap();
    assert!(
        std::fs::metadata(mariadb_socket(&my))
            .unwrap()
            .file_type()
            .is_socket()
    );
    let (out, err, ok) = mariadb_unix(
        &my,
        "SELECT 1;\n\
         SELECT HOST FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID();\n",
    )
    .unwrap();
    assert!(ok, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["1", "localhost"]);
    let (_, err, ok) = mariadb_unix(&my, "SELECT * FROM nope;").unwrap();
    assert!(!ok && err.contains("nope"), "{err}");
    drop(my);

    // Two processes on a socketpair, framing binary messages.
    let mut pair = SocketpairChatter::start().unwrap();
    assert_ne!(pair.parent_pid, pair.child_pid);
    let before = pair.frames().unwrap();
    thread::sleep(Duration::from_secs(2));
    let after = pair.frames().unwrap();
    let total = pair.stop().unwrap();
    eprintln!(
        "socketpair: {} frames in 2 s, {total} in all",
        after - before
    );
    assert!(after >= before + 1000, "{before} → {after}");
    assert!(total >= after);
}

// ------------------------------------------------------------- helpers

/// The kernel transports every case is checked on.
const TRANSPORTS: [&str; 2] = ["ringbuf", "perf"];

/// Runs `case` on each transport (skipped without root).
fn on_both_transports(case: impl Fn(&str)) {
    if !can_trace() {
        return;
    }
    for transport in TRANSPORTS {
        eprintln!("transport {transport}");
        case(transport);
    }
}

/// `zerotrace run --transport TRANSPORT ARGS` exporting to `rx`; checks
/// that the transport asked for is the one in use.
fn agent_on(rx: &Receiver, transport: &str, args: &[&str]) -> Agent {
    let agent = agent_for(rx, &[&["--transport", transport], args].concat());
    let ready = agent
        .stderr_lines
        .iter()
        .find(|l| l.contains("tracing ("))
        .cloned()
        .unwrap_or_default();
    assert!(
        ready.contains(&format!("({transport} transport")),
        "{ready}"
    );
    agent
}

/// Starts an agent on `transport`, runs `work`, waits until `done` holds
/// for its result and the spans received, stops the agent (it exports
/// what it holds: counts are final) and returns the result and every
/// span.
fn traced<T>(
    transport: &str,
    work: impl FnOnce() -> T,
    what: &str,
    done: impl Fn(&T, &[ReceivedSpan]) -> bool,
) -> (T, Vec<ReceivedSpan>) {
    traced_with(transport, &[], work, what, done)
}

/// [`traced`] with more arguments for the agent.
fn traced_with<T>(
    transport: &str,
    args: &[&str],
    work: impl FnOnce() -> T,
    what: &str,
    done: impl Fn(&T, &[ReceivedSpan]) -> bool,
) -> (T, Vec<ReceivedSpan>) {
    let rx = Receiver::start(Protocol::Grpc).unwrap();
    let agent = agent_on(&rx, transport, args);
    let out = work();
    rx.wait_for(WAIT, what, |s| done(&out, s)).unwrap();
    agent.stop().expect("zerotrace stops cleanly");
    (out, rx.spans())
}

/// The spans of this test's servers — server.address one of `sockets` or
/// server.port one of `ports` — and none of other traffic on the host.
fn ours(spans: Vec<ReceivedSpan>, sockets: &[&str], ports: &[u16]) -> Vec<ReceivedSpan> {
    spans
        .into_iter()
        .filter(|s| {
            s.attr_str("server.address")
                .is_some_and(|a| sockets.contains(&a))
                || s.attr_i64("server.port")
                    .is_some_and(|p| ports.iter().any(|&port| i64::from(port) == p))
        })
        .collect()
}

/// One line per span of the traffic (the agent's own spans left out).
fn shown(spans: &[ReceivedSpan]) -> String {
    let traffic: Vec<ReceivedSpan> = spans
        .iter()
        .filter(|s| s.service() != Some("zerotrace"))
        .cloned()
        .collect();
    briefs(&traffic)
}

/// The process a span came from.
fn pid_of(s: &ReceivedSpan) -> Option<u32> {
    s.resource
        .get("process.pid")?
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
}

/// `kind` spans of process `pid`, in order.
fn of_pid<'a>(spans: &'a [ReceivedSpan], pid: u32, kind: &str) -> Vec<&'a ReceivedSpan> {
    let mut found: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| pid_of(s) == Some(pid) && s.kind == kind)
        .collect();
    found.sort_by_key(|s| s.start_ns);
    found
}

/// `kind` spans whose server.address is `socket`, in order.
fn at_socket<'a>(spans: &'a [ReceivedSpan], kind: &str, socket: &str) -> Vec<&'a ReceivedSpan> {
    let mut found: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.kind == kind && s.attr_str("server.address") == Some(socket))
        .collect();
    found.sort_by_key(|s| s.start_ns);
    found
}

fn on_port<'a>(spans: &'a [ReceivedSpan], kind: &str, port: u16) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.kind == kind && s.attr_i64("server.port") == Some(i64::from(port)))
        .collect()
}

/// The path a span's request was for: `url.path`, else the path of `url.full`.
fn path_of(s: &ReceivedSpan) -> Option<String> {
    if let Some(path) = s.attr_str("url.path") {
        return Some(path.to_owned());
    }
    let full = s.attr_str("url.full")?;
    let rest = full.split_once("://")?.1;
    let path = &rest[rest.find('/')?..];
    Some(path.split('?').next().unwrap_or(path).to_owned())
}

fn sorted_paths(spans: &[&ReceivedSpan]) -> Vec<String> {
    let mut paths: Vec<String> = spans
        .iter()
        .map(|s| path_of(s).unwrap_or_else(|| format!("<no path: {}>", s.brief())))
        .collect();
    paths.sort();
    paths
}

fn for_path(s: &ReceivedSpan, path: &str) -> bool {
    path_of(s).as_deref() == Some(path)
}

/// A span of a connection to the Unix socket `socket` from a client that
/// did not name its end: transport `unix`, the socket as server.address,
/// no ports; a client span names the server's socket as its peer, a
/// server span has no peer address.
fn assert_unix(s: &ReceivedSpan, socket: &str) {
    assert_eq!(
        s.attr_str("network.transport"),
        Some("unix"),
        "{}",
        s.brief()
    );
    assert_eq!(s.attr_str("server.address"), Some(socket), "{}", s.brief());
    assert_eq!(s.attr_i64("server.port"), None, "{}", s.brief());
    assert_eq!(s.attr_i64("network.peer.port"), None, "{}", s.brief());
    let peer = match s.kind {
        "CLIENT" => Some(socket),
        _ => None,
    };
    assert_eq!(
        s.attr_str("network.peer.address"),
        peer,
        "{}: peer",
        s.brief()
    );
}

/// The one SERVER span linked under client span `client` (both ends on this
/// host): one trace, and exactly one server span for each client call.
fn served<'a>(spans: &'a [ReceivedSpan], client: &ReceivedSpan) -> &'a ReceivedSpan {
    let kids: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.parent_span_id == client.span_id && s.kind == "SERVER")
        .collect();
    assert_eq!(
        kids.len(),
        1,
        "want one server span under {}:{}",
        client.brief(),
        shown(spans)
    );
    assert_eq!(kids[0].trace_id, client.trace_id);
    kids[0]
}

/// [`served`] over the Unix socket `socket`: both spans with the socket's
/// attributes ([`assert_unix`]).
fn served_over<'a>(
    spans: &'a [ReceivedSpan],
    client: &ReceivedSpan,
    socket: &str,
) -> &'a ReceivedSpan {
    assert_unix(client, socket);
    let server = served(spans, client);
    assert_unix(server, socket);
    server
}

/// The `system` CLIENT spans to `socket`, in order, after checking the
/// shape every database call over a socket has: every span at the socket
/// is a `system` span with the socket's attributes, and each call is
/// linked to its one server-side span — same name, same query text — with
/// no server span left over.
fn db_calls_over<'a>(
    spans: &'a [ReceivedSpan],
    system: &str,
    socket: &str,
) -> Vec<&'a ReceivedSpan> {
    for s in spans
        .iter()
        .filter(|s| s.attr_str("server.address") == Some(socket))
    {
        assert_eq!(
            s.attr_str("db.system.name"),
            Some(system),
            "{}:{}",
            s.brief(),
            shown(spans)
        );
    }
    let clients = at_socket(spans, "CLIENT", socket);
    for client in &clients {
        let server = served_over(spans, client, socket);
        assert_eq!(
            (server.name.as_str(), server.attr_str("db.query.text")),
            (client.name.as_str(), client.attr_str("db.query.text")),
            "{} under {}",
            server.brief(),
            client.brief()
        );
    }
    assert_eq!(
        at_socket(spans, "SERVER", socket).len(),
        clients.len(),
        "{}",
        shown(spans)
    );
    clients
}

fn query_texts(spans: &[&ReceivedSpan]) -> Vec<String> {
    spans
        .iter()
        .map(|s| s.attr_str("db.query.text").unwrap_or("<none>").to_owned())
        .collect()
}

/// The sum of every sample of `name` on the agent's /metrics, or None if
/// /metrics does not list it (or does not answer).
fn metric(port: u16, name: &str) -> Option<f64> {
    let text = curl(&[&format!("http://127.0.0.1:{port}/metrics")]).ok()?;
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if series.split('{').next() == Some(name) {
            *sum.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(f64::NAN);
        }
    }
    sum
}

/// Waits (the snapshot behind /metrics is refreshed once a second) until
/// `name` is at least `at_least`; returns its value.
fn wait_for_metric(port: u16, name: &str, at_least: f64) -> f64 {
    wait_for_metric_that(port, name, &format!("≥ {at_least}"), WAIT, |v| {
        v >= at_least
    })
}

/// Waits up to `timeout` until `name` is on /metrics with a value for
/// which `ok` holds (`want` says which, for the failure); returns it.
fn wait_for_metric_that(
    port: u16,
    name: &str,
    want: &str,
    timeout: Duration,
    ok: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let value = metric(port, name);
        if let Some(v) = value.filter(|&v| ok(v)) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{name} = {value:?}, want {want} within {timeout:?}"
        );
        thread::sleep(Duration::from_millis(300));
    }
}

/// `--listen 127.0.0.1:PORT` on a free port: the agent's /health and
/// /metrics there.
fn listening() -> (u16, [String; 2]) {
    let port = free_port();
    (port, ["--listen".into(), format!("127.0.0.1:{port}")])
}

/// The HTTP status of the agent's /health.
fn health(port: u16) -> String {
    curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://127.0.0.1:{port}/health"),
    ])
    .unwrap_or_else(|e| format!("no answer: {e}"))
}

/// `curl --unix-socket SOCKET http://localhost{path}`, checking that the
/// body is [`UvicornUds`]'s answer for `path`.
fn curl_over(socket: &str, path: &str) {
    let url = format!("http://localhost{path}");
    let body = curl(&["--unix-socket", socket, &url]).unwrap();
    assert_eq!(body, format!(r#"{{"path": "{path}"}}"#));
}

// ---------------------------------------------------------------- HTTP

#[test]
fn nginx_to_uvicorn_and_curl_to_uvicorn_over_a_unix_socket_on_both_transports() {
    on_both_transports(http_over);
}

fn http_over(transport: &str) {
    let app = UvicornUds::start().unwrap();
    let nginx = UdsNginx::start(&app.socket).unwrap();
    let sock = app.socket_str();
    let proxied = ["/api/users/1", "/api/users/2", "/api/users/3"];
    let direct = ["/api/direct/1", "/api/direct/2"];

    let ((), spans) = traced(
        transport,
        || {
            // curl → nginx over TCP → uvicorn over the socket.
            for path in proxied {
                let body = curl(&["-H", "x-tenant-id: t-uds", &nginx.url(path)]).unwrap();
                assert_eq!(body, format!(r#"{{"path": "{path}", "tenant": "t-uds"}}"#));
            }
            // curl --unix-socket → uvicorn.
            for path in direct {
                let url = format!("http://localhost{path}");
                let body =
                    curl(&["--unix-socket", &sock, "-H", "x-tenant-id: t-direct", &url]).unwrap();
                assert_eq!(
                    body,
                    format!(r#"{{"path": "{path}", "tenant": "t-direct"}}"#)
                );
            }
        },
        "nginx's and curl's calls over the socket and uvicorn's spans",
        |(), s| {
            at_socket(s, "SERVER", &sock).len() >= 5
                && at_socket(s, "CLIENT", &sock).len() >= 5
                && on_port(s, "SERVER", nginx.port).len() >= 3
        },
    );
    let spans = ours(spans, &[&sock], &[nginx.port]);

    // N requests, N spans on each side of the socket.
    let mut all: Vec<String> = proxied
        .iter()
        .chain(&direct)
        .map(|p| p.to_string())
        .collect();
    all.sort();
    let app_servers = at_socket(&spans, "SERVER", &sock);
    assert_eq!(
        sorted_paths(&app_servers),
        all,
        "uvicorn's spans:{}",
        shown(&spans)
    );
    assert!(
        app_servers.iter().all(|s| pid_of(s) == Some(app.pid)),
        "{}",
        shown(&spans)
    );
    let clients = at_socket(&spans, "CLIENT", &sock);
    assert_eq!(sorted_paths(&clients), all, "{}", shown(&spans));
    assert_eq!(
        on_port(&spans, "SERVER", nginx.port).len(),
        proxied.len(),
        "{}",
        shown(&spans)
    );

    // One trace per proxied request: curl → nginx → nginx's call over the
    // socket → uvicorn, the tenant on every span.
    let mut traces = Vec::new();
    for path in proxied {
        let curl_span = one(&spans, "curl's span to nginx", |s| {
            s.kind == "CLIENT" && is_service(s, "curl") && for_path(s, path)
        });
        let nginx_server = served(&spans, curl_span);
        let nginx_client = one(&spans, "nginx's call over the socket", |s| {
            s.kind == "CLIENT" && is_service(s, "nginx") && for_path(s, path)
        });
        assert_eq!(
            nginx_client.parent_span_id,
            nginx_server.span_id,
            "{}",
            shown(&spans)
        );
        let app_server = served_over(&spans, nginx_client, &sock);
        assert_eq!(curl_span.parent_span_id, "", "curl starts the trace");
        for s in [curl_span, nginx_server, nginx_client, app_server] {
            assert_eq!(s.trace_id, curl_span.trace_id, "{}", s.brief());
            assert_eq!(s.attr_str("tenant.id"), Some("t-uds"), "{}", s.brief());
            assert_eq!(s.attr_str("http.request.method"), Some("GET"));
            assert_eq!(s.attr_i64("http.response.status_code"), Some(200));
            assert_eq!(s.status, "UNSET", "{}", s.brief());
        }
        assert_eq!(
            nginx_server.attr_i64("server.port"),
            Some(i64::from(nginx.port))
        );
        assert_eq!(
            nginx_server.attr_str("network.transport"),
            Some("tcp"),
            "{}",
            nginx_server.brief()
        );
        assert_eq!(app_server.attr_str("url.path"), Some(path));
        traces.push(curl_span.trace_id.clone());
    }
    traces.sort();
    traces.dedup();
    assert_eq!(traces.len(), proxied.len(), "one trace per request");

    // curl --unix-socket: its span, linked to uvicorn's.
    for path in direct {
        let curl_span = one(&spans, "curl's span over the socket", |s| {
            s.kind == "CLIENT" && is_service(s, "curl") && for_path(s, path)
        });
        // The Host header curl sends is `localhost`; the port is HTTP's.
        assert_eq!(
            curl_span.attr_str("url.full"),
            Some(format!("http://localhost:80{path}").as_str()),
            "{}",
            curl_span.brief()
        );
        assert_eq!(curl_span.parent_span_id, "", "curl starts the trace");
        let server = served_over(&spans, curl_span, &sock);
        assert_eq!(pid_of(server), Some(app.pid));
        assert_eq!(server.attr_str("url.path"), Some(path));
        for s in [curl_span, server] {
            assert_eq!(s.attr_str("tenant.id"), Some("t-direct"), "{}", s.brief());
            assert_eq!(s.attr_i64("http.response.status_code"), Some(200));
        }
    }
}

/// A connection opened (and used once) before the agent started: its
/// requests afterwards are spans on both ends, linked, over the socket.
#[test]
fn a_unix_connection_opened_before_the_agent_started_is_traced_on_both_transports() {
    on_both_transports(held_over);
}

fn held_over(transport: &str) {
    let app = UvicornUds::start().unwrap();
    let sock = app.socket_str();
    let mut held = HeldConnection::start(&app.socket, "t-held", 1).unwrap();
    let paths = ["/api/held/1", "/api/held/2", "/api/held/3", "/api/held/4"];

    let (pid, spans) = traced(
        transport,
        || {
            for path in paths {
                let r = held.get(path).unwrap();
                assert_eq!((r.status, r.same_connection), (200, true), "{r:?}");
            }
            held.pid
        },
        "the held connection's spans",
        |&pid, s| of_pid(s, pid, "CLIENT").len() >= 4 && at_socket(s, "SERVER", &sock).len() >= 4,
    );
    let spans = ours(spans, &[&sock], &[]);

    let clients = of_pid(&spans, pid, "CLIENT");
    let got: Vec<Option<&str>> = clients.iter().map(|s| s.attr_str("url.full")).collect();
    let want: Vec<String> = paths
        .iter()
        .map(|p| format!("http://localhost:80{p}"))
        .collect();
    assert_eq!(
        got,
        want.iter().map(|u| Some(u.as_str())).collect::<Vec<_>>(),
        "{}",
        shown(&spans)
    );
    for (client, path) in clients.iter().zip(paths) {
        let server = served_over(&spans, client, &sock);
        assert_eq!(pid_of(server), Some(app.pid));
        assert_eq!(server.attr_str("url.path"), Some(path));
        for s in [*client, server] {
            assert_eq!(s.attr_str("tenant.id"), Some("t-held"), "{}", s.brief());
            assert_eq!(s.attr_i64("http.response.status_code"), Some(200));
        }
    }
    // Only the requests made after the start; nothing counted twice.
    assert_eq!(
        at_socket(&spans, "SERVER", &sock).len(),
        paths.len(),
        "{}",
        shown(&spans)
    );
    assert_eq!(
        at_socket(&spans, "CLIENT", &sock).len(),
        paths.len(),
        "{}",
        shown(&spans)
    );
}

// ------------------------------------------------------------- databases

#[test]
fn postgres_over_its_unix_socket_from_psql_and_psycopg_on_both_transports() {
    on_both_transports(postgres_over);
}

fn postgres_over(transport: &str) {
    let pg = Postgres::start().unwrap();
    let sock = pg.socket_path().display().to_string();
    let psql_count = |s: &[ReceivedSpan]| {
        at_socket(s, "CLIENT", &sock)
            .iter()
            .filter(|x| is_service(x, "psql"))
            .count()
    };

    let (py, spans) = traced(
        transport,
        || {
            let (out, err, ok) = pg
                .psql_unix(
                    "CREATE TABLE items (id int, secret text);\n\
                     INSERT INTO items VALUES (1, 'secret-literal-insert');\n\
                     SELECT 'secret-literal';\n\
                     SELECT secret FROM items WHERE id = 1;\n\
                     SELECT * FROM missing_table;\n",
                )
                .unwrap();
            assert!(!ok && err.contains("missing_table"), "{err}");
            assert!(out.contains("secret-literal-insert"), "{out}");
            let py = psycopg_unix(
                &pg,
                &[
                    ("SELECT secret FROM items WHERE id = %s", json!([1])),
                    ("SELECT 'secret-literal-psycopg'", json!([])),
                ],
            )
            .unwrap();
            assert_eq!(
                py.lines(),
                [
                    "ssl False",
                    "secret-literal-insert",
                    "secret-literal-psycopg"
                ]
            );
            py
        },
        "psql's and psycopg's spans over the socket",
        |py, s| psql_count(s) >= 5 && of_pid(s, py.pid, "CLIENT").len() >= 2,
    );
    assert_nowhere(&spans, "secret-literal");
    let spans = ours(spans, &[&sock], &[]);
    let calls = db_calls_over(&spans, "postgresql", &sock);

    // psql: five statements, five spans, in order.
    let psql: Vec<&ReceivedSpan> = calls
        .iter()
        .copied()
        .filter(|s| is_service(s, "psql"))
        .collect();
    assert_eq!(psql.len(), 5, "{}", shown(&spans));
    assert_eq!(
        query_texts(&psql[1..]),
        [
            "INSERT INTO items VALUES (?, ?);",
            "SELECT ?;",
            "SELECT secret FROM items WHERE id = ?;",
            "SELECT * FROM missing_table;",
        ],
        "{}",
        shown(&spans)
    );
    assert_eq!(psql[1].name, "INSERT items");
    assert_eq!(psql[2].attr_str("db.operation.name"), Some("SELECT"));
    assert_eq!(psql[3].name, "SELECT items");
    let missing = psql[4];
    assert_eq!(missing.status, "ERROR");
    assert_eq!(missing.attr_str("db.response.status_code"), Some("42P01"));
    for s in &psql[..4] {
        assert_eq!(s.status, "UNSET", "{}", s.brief());
    }

    // psycopg: two statements, two spans.
    let py_spans = of_pid(&spans, py.pid, "CLIENT");
    assert_eq!(
        query_texts(&py_spans),
        ["SELECT secret FROM items WHERE id = $1", "SELECT ?"],
        "{}",
        shown(&spans)
    );
    assert_eq!(
        calls.len(),
        psql.len() + py_spans.len(),
        "{}",
        shown(&spans)
    );
    for s in &calls {
        assert_eq!(s.attr_str("db.namespace"), Some("zt"), "{}", s.brief());
    }
}

#[test]
fn redis_over_a_unix_socket_from_redis_cli_and_redis_benchmark_on_both_transports() {
    on_both_transports(redis_over);
}

fn redis_over(transport: &str) {
    let redis = RedisUds::start().unwrap();
    let sock = redis.socket_str();
    let named = |s: &[ReceivedSpan], service: &str, name: &str| -> usize {
        at_socket(s, "CLIENT", &sock)
            .iter()
            .filter(|x| x.service() == Some(service) && x.name == name)
            .count()
    };

    let ((), spans) = traced(
        transport,
        || {
            let set = redis.cli(&["SET", "k", "secret-redis-value"]).unwrap();
            assert_eq!(set.trim(), "OK");
            let get = redis.cli(&["GET", "k"]).unwrap();
            assert_eq!(get.trim(), "secret-redis-value");
            // 40 SETs, 8 per write.
            redis
                .benchmark(&["-c", "1", "-P", "8", "-n", "40", "-t", "set", "-q"])
                .unwrap();
        },
        "redis-cli's and redis-benchmark's spans over the socket",
        |(), s| named(s, "redis-benchmark", "SET") >= 40 && named(s, "redis-cli", "GET") >= 1,
    );
    assert_nowhere(&spans, "secret-redis-value");
    let spans = ours(spans, &[&sock], &[]);
    let calls = db_calls_over(&spans, "redis", &sock);

    let set = one(&spans, "redis-cli's SET", |s| {
        s.kind == "CLIENT" && is_service(s, "redis-cli") && s.name == "SET"
    });
    assert_eq!(set.attr_str("db.query.text"), Some("SET k ?"));
    assert_eq!(set.attr_str("db.namespace"), Some("0"));
    assert_eq!(set.status, "UNSET");
    let get = one(&spans, "redis-cli's GET", |s| {
        s.kind == "CLIENT" && is_service(s, "redis-cli") && s.name == "GET"
    });
    assert_eq!(get.attr_str("db.query.text"), Some("GET k"));
    // 40 pipelined SETs: 40 spans, each paired with its reply.
    assert_eq!(
        named(&spans, "redis-benchmark", "SET"),
        40,
        "{}",
        shown(&spans)
    );
    assert!(
        calls.iter().all(|s| s.status == "UNSET"),
        "{}",
        shown(&spans)
    );
}

#[test]
fn mariadb_over_its_socket_from_the_mariadb_client_on_both_transports() {
    on_both_transports(mariadb_over);
}

fn mariadb_over(transport: &str) {
    let my = Mariadb::start().unwrap();
    let sock = mariadb_socket(&my).display().to_string();
    let has_error = |s: &[ReceivedSpan], code: &str| {
        at_socket(s, "CLIENT", &sock)
            .iter()
            .any(|x| x.attr_str("db.response.status_code") == Some(code))
    };

    let ((), spans) = traced(
        transport,
        || {
            let (out, err, ok) = mariadb_unix(
                &my,
                "CREATE TABLE t (id INT, v VARCHAR(40));\n\
                 INSERT INTO t VALUES (1, 'secret-literal-maria');\n\
                 SELECT 1;\n\
                 SELECT v FROM t WHERE id = 1;\n\
                 SELECT * FROM nope;\n",
            )
            .unwrap();
            assert!(!ok && err.contains("nope"), "{err}");
            assert!(out.contains("secret-literal-maria"), "{out}");
        },
        "the mariadb client's spans over the socket",
        |(), s| has_error(s, "1146"),
    );
    assert_nowhere(&spans, "secret-literal-maria");
    let spans = ours(spans, &[&sock], &[]);
    let calls = db_calls_over(&spans, "mysql", &sock);
    assert!(
        calls.iter().all(|s| s.service() == Some("mariadb")),
        "{}",
        shown(&spans)
    );

    let insert = one(&spans, "the INSERT", |s| {
        s.kind == "CLIENT" && s.name == "INSERT t"
    });
    assert_eq!(insert.attr_str("db.namespace"), Some("zt"));
    assert_eq!(
        insert.attr_str("db.query.text"),
        Some("INSERT INTO t VALUES (?, ?)")
    );
    assert_eq!(insert.status, "UNSET");
    let one_select = one(&spans, "SELECT 1", |s| {
        s.kind == "CLIENT" && s.attr_str("db.query.text") == Some("SELECT ?")
    });
    assert_eq!(one_select.attr_str("db.operation.name"), Some("SELECT"));
    let select = one(&spans, "the SELECT of t", |s| {
        s.kind == "CLIENT" && s.name == "SELECT t"
    });
    assert_eq!(
        select.attr_str("db.query.text"),
        Some("SELECT v FROM t WHERE id = ?")
    );
    let missing = one(&spans, "the missing table", |s| {
        s.kind == "CLIENT" && s.attr_str("db.response.status_code") == Some("1146")
    });
    assert_eq!(missing.status, "ERROR");
    assert_eq!(missing.attr_str("error.type"), Some("1146"));
}

// ------------------------------------------- a protocol nobody knows

/// Two processes exchanging binary frames over a socketpair: the agent
/// looks, gives up, and has the kernel stop copying their data — no span,
/// a muted connection in /metrics, and kernel events that stop growing
/// while the frames go on.
#[test]
fn an_unknown_protocol_over_a_socketpair_is_muted_on_both_transports() {
    on_both_transports(socketpair_over);
}

fn socketpair_over(transport: &str) {
    let rx = Receiver::start(Protocol::Grpc).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let agent = agent_on(&rx, transport, &["--listen", &listen]);
    // Sockets of excluded system daemons are muted too: count from here.
    // (/metrics is a snapshot refreshed once a second.)
    thread::sleep(Duration::from_millis(1200));
    let muted_before = wait_for_metric(port, "zerotrace_connections_muted_total", 0.0);
    let mut pair = SocketpairChatter::start().unwrap();
    let (parent, child) = (pair.parent_pid, pair.child_pid);

    let muted = wait_for_metric(
        port,
        "zerotrace_connections_muted_total",
        muted_before + 1.0,
    ) - muted_before;
    // Events already in the buffer when the agent gave up are read (and
    // counted) a moment later: let them drain before measuring.
    thread::sleep(Duration::from_secs(2));
    let events_total = |when: &str| {
        metric(port, "zerotrace_events_total")
            .unwrap_or_else(|| panic!("no zerotrace_events_total {when}"))
    };
    let (events_before, frames_before) = (events_total("before"), pair.frames().unwrap());
    thread::sleep(Duration::from_secs(4));
    // /metrics is a snapshot refreshed once a second: wait for a fresh one.
    thread::sleep(Duration::from_millis(1200));
    let frames_after = pair.frames().unwrap();
    let events_after = events_total("after");
    let total = pair.stop().unwrap();
    let (frames, events) = (frames_after - frames_before, events_after - events_before);
    eprintln!(
        "socketpair: {total} frames in all, {frames} while measured; \
         {events} kernel events host-wide meanwhile; {muted} connection(s) muted since it started"
    );

    agent.stop().expect("zerotrace stops cleanly");
    let spans = rx.spans();
    let theirs: Vec<ReceivedSpan> = spans
        .iter()
        .filter(|s| pid_of(s).is_some_and(|p| p == parent || p == child))
        .cloned()
        .collect();
    assert!(theirs.is_empty(), "spans of the pair:{}", briefs(&theirs));
    assert!(
        frames >= 1000,
        "the pair barely talked: {frames} frames while measured"
    );
    // Each frame is one write and two reads: traced, that would be about
    // three events per frame.
    assert!(
        events * 10.0 < frames as f64,
        "{events} kernel events while the pair exchanged {frames} frames: not muted"
    );
}

// ------------------------------------------------------------ bad input

/// A client connection handed to another process with SCM_RIGHTS (its
/// opener closes its own descriptor): the requests each process makes on
/// it are CLIENT spans of that process, each the parent of the server span
/// of the same request — the connection's ends are the same sockets
/// whichever descriptor is used.
#[test]
fn passed_socket_keeps_its_links() {
    on_both_transports(passed_over);
}

fn passed_over(transport: &str) {
    let app = UvicornUds::start().unwrap();
    let sock = app.socket_str();
    let first = ["/api/passed/1", "/api/passed/2"];
    let second = ["/api/passed/3", "/api/passed/4", "/api/passed/5"];

    let (run, spans) = traced(
        transport,
        || pass_connection(&app.socket, &first, &second).unwrap(),
        "both processes' spans over the passed connection",
        |_, s| at_socket(s, "CLIENT", &sock).len() >= 5 && at_socket(s, "SERVER", &sock).len() >= 5,
    );
    // Five answers on one connection, two to the opener, three to the
    // process it went to.
    let answered = |pid: u32, paths: &[&str]| {
        paths
            .iter()
            .map(|p| (pid, 200, format!(r#"{{"path": "{p}"}}"#)))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        run.responses,
        [
            answered(run.first_pid, &first),
            answered(run.second_pid, &second)
        ]
        .concat()
    );
    assert_ne!(run.first_pid, run.second_pid);
    let spans = ours(spans, &[&sock], &[]);

    let all: Vec<String> = first.iter().chain(&second).map(|p| p.to_string()).collect();
    let servers = at_socket(&spans, "SERVER", &sock);
    assert_eq!(sorted_paths(&servers), all, "{}", shown(&spans));
    assert!(
        servers.iter().all(|s| pid_of(s) == Some(app.pid)),
        "{}",
        shown(&spans)
    );
    let clients = at_socket(&spans, "CLIENT", &sock);
    assert_eq!(sorted_paths(&clients), all, "{}", shown(&spans));
    for (pid, paths) in [(run.first_pid, &first[..]), (run.second_pid, &second[..])] {
        let theirs = of_pid(&spans, pid, "CLIENT");
        assert_eq!(
            sorted_paths(&theirs),
            paths,
            "CLIENT spans of pid {pid}:{}",
            shown(&spans)
        );
        for client in theirs {
            let server = served_over(&spans, client, &sock);
            assert_eq!(path_of(server), path_of(client), "{}", shown(&spans));
            for s in [client, server] {
                assert_eq!(
                    s.attr_i64("http.response.status_code"),
                    Some(200),
                    "{}",
                    s.brief()
                );
            }
        }
    }
    // Each server span's parent is the client span of its own request.
    for server in &servers {
        let parent = one(&spans, "the server span's parent", |s| {
            s.span_id == server.parent_span_id
        });
        assert_eq!(
            (parent.kind, path_of(parent)),
            ("CLIENT", path_of(server)),
            "{} under {}",
            server.brief(),
            parent.brief()
        );
    }
}

/// A client killed (SIGKILL) while the server still works on its request:
/// the agent goes on, requests on later connections are linked to their
/// own clients, and nothing but the dead request's own server span (if
/// any) hangs under the dead client's spans — a later connection whose
/// socket reuses the dead one's memory must not inherit its call.
#[test]
fn peer_exiting_mid_request_is_no_wrong_link() {
    on_both_transports(killed_over);
}

fn killed_over(transport: &str) {
    let app = UvicornUds::start().unwrap();
    let sock = app.socket_str();
    let (port, listen) = listening();
    let slow = "/api/slow/killed";
    let after = [
        "/api/after/1",
        "/api/after/2",
        "/api/after/3",
        "/api/after/4",
        "/api/after/5",
    ];

    let (killed, all) = traced_with(
        transport,
        &[listen[0].as_str(), listen[1].as_str()],
        || {
            let held = HeldConnection::start(&app.socket, "", 0).unwrap();
            let pid = held.pid;
            held.kill_during(slow, Duration::from_millis(300)).unwrap();
            // While uvicorn still works on the dead client's request …
            for path in &after[..3] {
                curl_over(&sock, path);
            }
            // … and once it gave up on it.
            thread::sleep(SLOW);
            for path in &after[3..] {
                curl_over(&sock, path);
            }
            assert_eq!(health(port), "200", "the agent's run loop stalled");
            pid
        },
        "the later requests' spans over the socket",
        |_, s| {
            after.iter().all(|p| {
                at_socket(s, "SERVER", &sock).iter().any(|x| for_path(x, p))
                    && at_socket(s, "CLIENT", &sock).iter().any(|x| for_path(x, p))
            })
        },
    );
    let spans = ours(all.clone(), &[&sock], &[]);
    let dead: Vec<ReceivedSpan> = all
        .iter()
        .filter(|s| pid_of(s) == Some(killed))
        .cloned()
        .collect();
    eprintln!("the killed client's spans:{}", briefs(&dead));

    for path in after {
        let client = one(&spans, "curl's span over the socket", |s| {
            s.kind == "CLIENT" && is_service(s, "curl") && for_path(s, path)
        });
        assert_eq!(client.parent_span_id, "", "curl starts the trace");
        let server = served_over(&spans, client, &sock);
        assert_eq!(pid_of(server), Some(app.pid));
        assert_eq!(server.attr_str("url.path"), Some(path));
        assert_eq!(server.attr_i64("http.response.status_code"), Some(200));
    }
    // The dead client made one request: at most one span, of that request.
    assert!(dead.len() <= 1, "{}", shown(&all));
    for s in &dead {
        assert_eq!(
            (s.kind, path_of(s).as_deref()),
            ("CLIENT", Some(slow)),
            "{}",
            s.brief()
        );
    }
    // Under it: its own server span, if any, and nothing else, anywhere.
    for s in all
        .iter()
        .filter(|s| dead.iter().any(|d| d.span_id == s.parent_span_id))
    {
        assert!(
            s.kind == "SERVER" && pid_of(s) == Some(app.pid) && for_path(s, slow),
            "under the dead client's request: {}:{}",
            s.brief(),
            shown(&all)
        );
    }
    // The dead request's server span, if any: under the dead client or a
    // root; one server span per request, no more.
    let servers = at_socket(&spans, "SERVER", &sock);
    let slow_servers: Vec<&&ReceivedSpan> = servers.iter().filter(|s| for_path(s, slow)).collect();
    assert!(slow_servers.len() <= 1, "{}", shown(&spans));
    for s in slow_servers {
        eprintln!("the dead request's server span: {}", s.brief());
        assert!(
            s.parent_span_id.is_empty() || dead.iter().any(|d| d.span_id == s.parent_span_id),
            "{}:{}",
            s.brief(),
            shown(&all)
        );
    }
    assert!(
        servers.len() <= after.len() + 1,
        "uvicorn's spans:{}",
        shown(&spans)
    );
}

/// 1500 connections in a row, one request each: every request is a
/// client and a server span, linked, and the agent's connection table
/// shrinks back once they are closed. On the ring buffer; perf buffers in
/// [`many_short_connections_are_bounded_on_perf_buffers`].
#[test]
fn many_short_connections_are_bounded() {
    if can_trace() {
        short_over("ringbuf");
    }
}

/// [`many_short_connections_are_bounded`] on perf buffers, whose per-CPU
/// buffers deliver a client's write after its server's whole exchange
/// more often.
#[test]
fn many_short_connections_are_bounded_on_perf_buffers() {
    if can_trace() {
        short_over("perf");
    }
}

fn short_over(transport: &str) {
    const N: usize = 1500;
    /// Connections the agent may still hold after the burst.
    const OPEN_AFTER: f64 = 50.0;
    const SPANS: &str = "zerotrace_spans_total";
    const LOST: &str = "zerotrace_events_lost_total";
    let app = UvicornUds::start().unwrap();
    let sock = app.socket_str();
    let (port, listen) = listening();
    // Only uvicorn and this test's children (the client): the count of
    // open connections is theirs, whatever else runs on the host.
    let (server, tests) = (app.pid.to_string(), std::process::id().to_string());

    let ((pid, caught_up, lost), spans) = traced_with(
        transport,
        &[
            listen[0].as_str(),
            listen[1].as_str(),
            "--pid",
            &server,
            "--pid",
            &tests,
        ],
        || {
            // /metrics is a snapshot refreshed once a second.
            thread::sleep(Duration::from_millis(1200));
            let spans_before = wait_for_metric(port, SPANS, 0.0);
            let lost_before = metric(port, LOST).unwrap_or_default();
            let started = Instant::now();
            let pid = short_connections(&app.socket, "/api/short/", N).unwrap();
            let took = started.elapsed();
            // A snapshot taken once the agent made the burst's spans (if
            // it ever does: the counts are checked below) …
            let want = spans_before + 2.0 * N as f64;
            let deadline = Instant::now() + WAIT;
            let mut spans = metric(port, SPANS).unwrap_or_default();
            while spans < want && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(300));
                spans = metric(port, SPANS).unwrap_or_default();
            }
            let caught_up = spans >= want;
            let made = started.elapsed();
            // … and, a few seconds later at most, a small table.
            let open = wait_for_metric_that(
                port,
                "zerotrace_connections_open",
                &format!("< {OPEN_AFTER}"),
                Duration::from_secs(5),
                |v| v < OPEN_AFTER,
            );
            let lost = metric(port, LOST).unwrap_or_default() - lost_before;
            eprintln!(
                "{N} connections in {took:?}; the agent made {} spans by {made:?}, \
                 lost {lost} events, and had {open} connections open {:?} after the start",
                spans - spans_before,
                started.elapsed()
            );
            (pid, caught_up, lost)
        },
        "every short connection's spans",
        |&(pid, caught_up, _), s| {
            !caught_up
                || (of_pid(s, pid, "CLIENT").len() >= N && at_socket(s, "SERVER", &sock).len() >= N)
        },
    );
    let spans = ours(spans, &[&sock], &[]);
    let clients = of_pid(&spans, pid, "CLIENT");
    let servers = at_socket(&spans, "SERVER", &sock);
    let mut want: Vec<String> = (0..N).map(|i| format!("/api/short/{i}")).collect();
    want.sort();
    let missing = |got: &[&ReceivedSpan]| {
        let paths = sorted_paths(got);
        want.iter()
            .filter(|p| paths.binary_search(p).is_err())
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        (clients.len(), servers.len()),
        (N, N),
        "(client, server) spans over the socket; {lost} events lost meanwhile; \
         the agent made them all: {caught_up}; \
         requests without a client span: {:?}; without a server span: {:?}",
        missing(&clients),
        missing(&servers),
    );
    assert!(sorted_paths(&clients) == want, "the client spans' paths");
    assert!(sorted_paths(&servers) == want, "the server spans' paths");
    // No server span left a root: each one listed with its client's
    // times (ns from the client span's start) to show which end was late.
    let roots: Vec<String> = servers
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .map(|s| {
            let path = path_of(s).unwrap_or_default();
            let times = clients
                .iter()
                .find(|c| path_of(c).as_deref() == Some(path.as_str()))
                .map(|c| {
                    let at = |ns: u64| ns as i128 - c.start_ns as i128;
                    format!(
                        "client 0..{}, server {}..{}",
                        at(c.end_ns),
                        at(s.start_ns),
                        at(s.end_ns)
                    )
                })
                .unwrap_or_default();
            format!("{path} ({times})")
        })
        .collect();
    assert!(
        roots.is_empty(),
        "{} of {N} server spans left roots: {roots:?}",
        roots.len()
    );
    // Each client span the parent of the server span of its own request
    // (N distinct parents for N server spans: every server span linked).
    for client in &clients {
        let server = served_over(&spans, client, &sock);
        assert_eq!(
            path_of(server),
            path_of(client),
            "{} under {}",
            server.brief(),
            client.brief()
        );
        assert_eq!(pid_of(server), Some(app.pid), "{}", server.brief());
    }
}

/// `--exclude-unix-socket '/tmp/zt-uds-*'`: requests over the fixture's
/// socket are no spans on either end — the five curl makes on one connection
/// (paced by `--rate`, so that it lives long enough for the agent to act:
/// both its ends are muted in the kernel, which then stops copying their
/// calls), and three on connections of their own, mostly closed before
/// the agent's mute can reach them; in the same run, curl → nginx over TCP is traced as
/// usual — though nginx passes the request on over the excluded socket,
/// untraced. The exclusion is per socket, not per process.
#[test]
fn excluded_unix_socket_is_muted_and_untraced() {
    on_both_transports(excluded_over);
}

fn excluded_over(transport: &str) {
    const MUTED: &str = "zerotrace_connections_muted_total";
    const MUTED_CALLS: &str = "zerotrace_muted_calls_total";
    let excluded = "/tmp/zt-uds-*";
    let app = UvicornUds::start().unwrap();
    let nginx = UdsNginx::start(&app.socket).unwrap();
    let sock = app.socket_str();
    assert!(
        sock.starts_with(excluded.trim_end_matches('*')),
        "{sock}: not under {excluded}"
    );
    let kept = [
        "/api/excluded/1",
        "/api/excluded/2",
        "/api/excluded/3",
        "/api/excluded/4",
        "/api/excluded/5",
    ];
    let short = [
        "/api/excluded/once/1",
        "/api/excluded/once/2",
        "/api/excluded/once/3",
    ];
    let proxied = "/api/proxied/1";
    let (port, listen) = listening();
    // Only uvicorn and this test's children (nginx, curl): what is muted
    // is theirs, whatever else runs on the host.
    let (server, tests) = (app.pid.to_string(), std::process::id().to_string());

    let ((muted, muted_calls), all) = traced_with(
        transport,
        &[
            listen[0].as_str(),
            listen[1].as_str(),
            "--pid",
            &server,
            "--pid",
            &tests,
            "--exclude-unix-socket",
            excluded,
        ],
        || {
            // /metrics is a snapshot refreshed once a second.
            thread::sleep(Duration::from_millis(1200));
            let before = wait_for_metric(port, MUTED, 0.0);
            let calls_before = wait_for_metric(port, MUTED_CALLS, 0.0);
            // One connection, five requests in about a second.
            let urls: Vec<String> = kept
                .iter()
                .map(|p| format!("http://localhost{p}"))
                .collect();
            let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
            let body =
                curl(&[&["--unix-socket", &sock, "--rate", "4/s"], &urls[..]].concat()).unwrap();
            let want: String = kept
                .iter()
                .map(|p| format!(r#"{{"path": "{p}"}}"#))
                .collect();
            assert_eq!(body, want);
            // Both of its ends.
            let muted = wait_for_metric(port, MUTED, before + 2.0) - before;
            let muted_calls = wait_for_metric(port, MUTED_CALLS, calls_before + 1.0) - calls_before;
            for path in short {
                curl_over(&sock, path);
            }
            let body = curl(&[&nginx.url(proxied)]).unwrap();
            assert_eq!(body, format!(r#"{{"path": "{proxied}"}}"#));
            (muted, muted_calls)
        },
        "curl's and nginx's spans over TCP",
        |_, s| {
            !on_port(s, "CLIENT", nginx.port).is_empty()
                && !on_port(s, "SERVER", nginx.port).is_empty()
        },
    );
    eprintln!(
        "{muted} connection ends muted, {muted_calls} of their calls not copied, \
         after {} requests on one connection over the excluded socket",
        kept.len()
    );

    // Nothing over the excluded socket, from either end or anyone.
    let over = ours(all.clone(), &[&sock], &[]);
    assert!(over.is_empty(), "over {sock}:{}", briefs(&over));
    let leaked: Vec<ReceivedSpan> = all
        .iter()
        .filter(|s| {
            pid_of(s) == Some(app.pid)
                || (is_service(s, "nginx") && s.kind == "CLIENT")
                || path_of(s).is_some_and(|p| p.starts_with("/api/excluded/"))
        })
        .cloned()
        .collect();
    assert!(
        leaked.is_empty(),
        "spans of the excluded socket's traffic:{}",
        briefs(&leaked)
    );

    // TCP still traced: curl → nginx, linked.
    let spans = ours(all, &[], &[nginx.port]);
    let curl_span = one(&spans, "curl's span to nginx", |s| {
        s.kind == "CLIENT" && is_service(s, "curl") && for_path(s, proxied)
    });
    let nginx_server = served(&spans, curl_span);
    assert_eq!(nginx_server.attr_str("url.path"), Some(proxied));
    assert_eq!(
        nginx_server.attr_str("network.transport"),
        Some("tcp"),
        "{}",
        nginx_server.brief()
    );
    assert_eq!(
        nginx_server.attr_i64("http.response.status_code"),
        Some(200)
    );
    assert_eq!(
        on_port(&spans, "SERVER", nginx.port).len(),
        1,
        "{}",
        shown(&spans)
    );
}
