//! End-to-end: traffic inside TLS — curl, httpx and requests to nginx over
//! HTTPS, psql and psycopg with `sslmode=require`, `mariadb --ssl` and
//! PyMySQL, `redis-cli --tls` — becomes the same spans as clear-text
//! traffic, on both kernel transports, from the plaintext the OpenSSL
//! probes see; `zerotrace check` lists the libssl each process maps. The
//! first test checks the fixtures themselves, without the agent. Needs root.

use serde_json::json;
use zerotrace_tests::{
    db::{Mariadb, Postgres, Redis},
    otlp::{Protocol, ReceivedSpan, Receiver},
    servers::{Nginx, PythonApp, STATIC_FILES},
    spans::*,
    tls::{
        CLIENT_SUBJECT, HttpClient, LazyHttps, TestCa, mapped_libssl, psycopg, pymysql, python_http,
    },
    *,
};

/// Every server and client of `zerotrace_tests::tls` completes real TLS
/// sessions on this machine: clients verify the servers against the test
/// CA, and the servers refuse (or cannot understand) clear text.
#[test]
fn tls_fixtures_work_without_agent() {
    if !can_trace() {
        return;
    }
    let ca = TestCa::new().unwrap();
    let verified = run(std::process::Command::new("openssl").args([
        "verify",
        "-CAfile",
        &ca.ca_cert().to_string_lossy(),
        &ca.server_cert().to_string_lossy(),
        &ca.client_cert().to_string_lossy(),
    ]))
    .unwrap();
    assert_eq!(verified.matches(": OK").count(), 2, "{verified}");

    // nginx over HTTPS: static files and the proxied app.
    let app = PythonApp::start().unwrap();
    let nginx = Nginx::start_tls(app.port, &ca).unwrap();
    assert!(nginx.url("/").starts_with("https://127.0.0.1:"));
    let out = ca
        .curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download} %{ssl_verify_result} %{http_version}",
            &nginx.url("/b.txt"),
        ])
        .unwrap();
    assert_eq!(out, "200 4444 0 1.1", "status, size, verified, HTTP/1.1");
    let body = ca.curl(&[&nginx.url("/api/users/42")]).unwrap();
    assert_eq!(body, r#"{"path": "/api/users/42"}"#);
    let unverified = servers::curl(&["-o", "/dev/null", &nginx.url("/b.txt")]);
    assert!(
        unverified.is_err(),
        "curl trusted the test CA without --cacert"
    );
    let plain = servers::curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://127.0.0.1:{}/b.txt", nginx.port),
    ])
    .unwrap();
    assert_eq!(plain, "400", "nginx answers clear text with 400");

    let urls = [nginx.url("/a.txt"), nginx.url("/api/users/7")];
    let httpx = python_http(HttpClient::Httpx, &ca, &[("x-tenant-id", "t")], &urls).unwrap();
    assert_eq!(httpx.lines()[..2], ["200 333", "200 24"], "{httpx:?}");
    assert!(httpx.lines()[2].starts_with("tls TLSv1."), "{httpx:?}");
    let requests = python_http(HttpClient::Requests, &ca, &[], &urls).unwrap();
    assert_eq!(requests.lines(), ["200 333", "200 24"], "{requests:?}");
    drop(nginx);

    // PostgreSQL with ssl=on: psql and psycopg with sslmode=require, and
    // psql with the client certificate, verifying the server.
    let pg = Postgres::start_tls(&ca).unwrap();
    assert!(pg.url().ends_with("/zt?sslmode=require"), "{}", pg.url());
    let (out, err, ok) = pg
        .psql("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid();")
        .unwrap();
    assert!(ok, "{err}");
    assert!(out.trim().starts_with("t|TLSv1."), "{out}");
    let (ca_path, cert, key) = (
        ca.ca_cert().display().to_string(),
        ca.client_cert().display().to_string(),
        ca.client_key().display().to_string(),
    );
    let (out, err, ok) = pg
        .psql_with_env(
            "SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid();",
            &[
                ("PGSSLMODE", "verify-full"),
                ("PGSSLROOTCERT", &ca_path),
                ("PGSSLCERT", &cert),
                ("PGSSLKEY", &key),
            ],
        )
        .unwrap();
    assert!(ok, "{err}");
    assert_eq!(out.trim(), CLIENT_SUBJECT);
    let run = psycopg(
        &pg.url(),
        &[
            ("SELECT %s::int + 1, current_database()", json!([41])),
            (
                "SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                json!([]),
            ),
        ],
    )
    .unwrap();
    assert_eq!(run.lines()[..2], ["ssl True", "42|zt"], "{run:?}");
    assert!(run.lines()[2].starts_with("TLSv1."), "{run:?}");
    drop(pg);

    // MariaDB with TLS required: the mariadb client and PyMySQL.
    let my = Mariadb::start_tls(&ca).unwrap();
    let (out, err, ok) = my.mysql("SHOW SESSION STATUS LIKE 'Ssl_version';").unwrap();
    assert!(ok, "{err}");
    assert!(out.starts_with("Ssl_version\tTLSv1."), "{out}");
    let (out, _, _) = my.mysql("SELECT @@have_ssl;").unwrap();
    assert_eq!(out.trim(), "YES");
    let clear = std::process::Command::new("mariadb")
        .args([
            "--no-defaults",
            "-h",
            "127.0.0.1",
            "-P",
            &my.port.to_string(),
        ])
        .args(["-u", "root", "--skip-ssl", "zt", "-e", "SELECT 1"])
        .output()
        .unwrap();
    assert!(
        !clear.status.success(),
        "a clear-text client was let in: {}",
        String::from_utf8_lossy(&clear.stdout)
    );
    let run = pymysql(
        my.port,
        Some(&ca),
        &[("SELECT %s + 1, DATABASE()", json!([41]))],
    )
    .unwrap();
    assert!(run.lines()[0].starts_with("tls TLSv1."), "{run:?}");
    assert_eq!(run.lines()[1], "42\tzt");
    drop(my);

    // Redis on a TLS port only.
    let redis = Redis::start_tls(&ca).unwrap();
    assert_eq!(redis.cli(&["SET", "k", "v"]).unwrap().trim(), "OK");
    assert_eq!(redis.cli(&["GET", "k"]).unwrap().trim(), "v");
    let out = redis
        .benchmark(&["-c", "1", "-n", "20", "-t", "set", "-q"])
        .unwrap();
    assert!(out.contains("SET: "), "{out}");
    let clear = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &redis.port.to_string(), "PING"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&clear.stdout).contains("PONG"),
        "redis answered clear text"
    );
    drop(redis);

    // A Python process maps no libssl until it imports `ssl`.
    let nginx = Nginx::start_tls(app.port, &ca).unwrap();
    let mut lazy = LazyHttps::start(&ca, nginx.port).unwrap();
    assert!(!lazy.maps_libssl(), "{:?}", mapped_libssl(lazy.pid));
    assert_eq!(lazy.get("/a.txt").unwrap(), 200);
    let mapped = mapped_libssl(lazy.pid);
    assert!(
        mapped.iter().any(|p| p.ends_with("/libssl.so.3")),
        "{mapped:?}"
    );
}

/// The kernel transports every protocol is checked on.
const TRANSPORTS: [&str; 2] = ["ringbuf", "perf"];

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

/// Stops the agent with SIGINT (it exports what it holds) and returns
/// every span received: counts are final.
fn stop(agent: Agent, rx: &Receiver) -> Vec<ReceivedSpan> {
    agent.stop().expect("zerotrace stops cleanly");
    rx.spans()
}

/// The spans of this test's servers — server.port one of `ports`, as
/// clients and servers set it — and none of other traffic on the host.
fn ours(spans: Vec<ReceivedSpan>, ports: &[u16]) -> Vec<ReceivedSpan> {
    spans
        .into_iter()
        .filter(|s| {
            s.attr_i64("server.port")
                .is_some_and(|p| ports.iter().any(|&port| i64::from(port) == p))
        })
        .collect()
}

/// One line per span of the traffic (the agent's own spans left out), for
/// assertion messages.
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

fn of_pid<'a>(spans: &'a [ReceivedSpan], pid: u32, kind: &str) -> Vec<&'a ReceivedSpan> {
    let mut found: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| pid_of(s) == Some(pid) && s.kind == kind)
        .collect();
    found.sort_by_key(|s| s.start_ns);
    found
}

/// Spans whose parent is `parent`.
fn children_of<'a>(spans: &'a [ReceivedSpan], parent: &ReceivedSpan) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.parent_span_id == parent.span_id)
        .collect()
}

/// The one SERVER span linked under client span `client` (both ends on this
/// host): one trace, and exactly one server span for each client call.
fn served<'a>(spans: &'a [ReceivedSpan], client: &ReceivedSpan) -> &'a ReceivedSpan {
    let kids: Vec<&ReceivedSpan> = children_of(spans, client)
        .into_iter()
        .filter(|s| s.kind == "SERVER")
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

// ---------------------------------------------------------------- HTTPS

#[test]
fn https_requests_to_nginx_from_curl_httpx_and_requests_are_spans_on_both_transports() {
    if !can_trace() {
        return;
    }
    for transport in TRANSPORTS {
        eprintln!("transport {transport}");
        https_over(transport);
    }
}

fn https_over(transport: &str) {
    let ca = TestCa::new().unwrap();
    let app = PythonApp::start().unwrap();
    let nginx = Nginx::start_tls(app.port, &ca).unwrap();
    let rx = Receiver::start(Protocol::Grpc).unwrap();
    let agent = agent_on(&rx, transport, &["--route", "/api/users/{id}"]);

    // curl → nginx (TLS) → app (clear text), tenant headers inside TLS.
    ca.curl(&[
        "-o",
        "/dev/null",
        "-H",
        "x-tenant-id: acme",
        "-H",
        "x-user-id: u-7",
        &nginx.url("/api/users/42?token=s3cret"),
    ])
    .unwrap();
    // Three static files over one kept-alive TLS connection.
    let statics = ["/a.txt", "/b.txt", "/index.html"].map(|p| nginx.url(p));
    let mut args = Vec::new();
    for url in &statics {
        args.extend(["-o", "/dev/null", url.as_str()]);
    }
    ca.curl(&args).unwrap();
    ca.curl(&["-o", "/dev/null", &nginx.url("/missing.txt")])
        .unwrap();
    // Python clients, one kept-alive connection each.
    let urls = |ids: &[u32]| -> Vec<String> {
        ids.iter()
            .map(|i| nginx.url(&format!("/api/users/{i}")))
            .collect()
    };
    let httpx = python_http(
        HttpClient::Httpx,
        &ca,
        &[("x-tenant-id", "py-httpx")],
        &urls(&[101, 102, 103]),
    )
    .unwrap();
    let requests = python_http(
        HttpClient::Requests,
        &ca,
        &[("x-tenant-id", "py-requests")],
        &urls(&[201, 202]),
    )
    .unwrap();
    assert!(
        httpx.lines()[..3].iter().all(|l| l.starts_with("200 ")),
        "{httpx:?}"
    );
    assert!(
        requests.lines().iter().all(|l| l.starts_with("200 ")),
        "{requests:?}"
    );

    // 10 requests reached nginx over TLS; 6 of them went on to the app.
    let requests_made = 10;
    rx.wait_for(WAIT, "nginx's server spans and their clients'", |s| {
        on_port(s, "SERVER", nginx.port).len() >= requests_made
            && on_port(s, "CLIENT", nginx.port).len() >= requests_made
            && on_port(s, "SERVER", app.port).len() >= 6
    })
    .unwrap();
    let spans = stop(agent, &rx);
    assert_nowhere(&spans, "s3cret");
    let spans = ours(spans, &[nginx.port, app.port]);

    // N requests, N spans on each side: nothing counted twice, nothing
    // made from ciphertext.
    let mut expected: Vec<String> = [
        "/api/users/42",
        "/a.txt",
        "/b.txt",
        "/index.html",
        "/missing.txt",
        "/api/users/101",
        "/api/users/102",
        "/api/users/103",
        "/api/users/201",
        "/api/users/202",
    ]
    .map(str::to_owned)
    .to_vec();
    expected.sort();
    assert_eq!(
        sorted_paths(&on_port(&spans, "SERVER", nginx.port)),
        expected,
        "nginx's server spans:{}",
        shown(&spans)
    );
    assert_eq!(
        sorted_paths(&on_port(&spans, "CLIENT", nginx.port)),
        expected,
        "client spans to nginx:{}",
        shown(&spans)
    );
    assert_eq!(on_port(&spans, "SERVER", app.port).len(), 6);

    // One trace: curl → nginx → nginx's upstream call → the app.
    let for_path = |s: &ReceivedSpan, path: &str| path_of(s).as_deref() == Some(path);
    let curl_span = one(&spans, "curl's span", |s| {
        s.kind == "CLIENT" && is_service(s, "curl") && for_path(s, "/api/users/42")
    });
    let nginx_server = served(&spans, curl_span);
    let nginx_client = one(&spans, "nginx's upstream call", |s| {
        s.kind == "CLIENT" && for_path(s, "/api/users/42") && is_service(s, "nginx")
    });
    let app_server = served(&spans, nginx_client);
    assert_eq!(curl_span.parent_span_id, "", "curl starts the trace");
    assert_eq!(nginx_client.parent_span_id, nginx_server.span_id);
    for s in [curl_span, nginx_server, nginx_client, app_server] {
        assert_eq!(s.trace_id, curl_span.trace_id, "{}", s.brief());
        assert_eq!(s.attr_str("tenant.id"), Some("acme"), "{}", s.brief());
        assert_eq!(s.attr_str("user.id"), Some("u-7"), "{}", s.brief());
        assert_eq!(s.attr_str("http.request.method"), Some("GET"));
        assert_eq!(s.attr_i64("http.response.status_code"), Some(200));
        assert_eq!(s.attr_str("network.protocol.version"), Some("1.1"));
        assert_eq!(s.status, "UNSET", "{}", s.brief());
    }
    assert_eq!(
        nginx_server.attr_i64("server.port"),
        Some(i64::from(nginx.port))
    );
    assert_eq!(nginx_server.service(), Some("nginx"));
    assert_eq!(nginx_server.name, "GET /api/users/{id}");
    assert_eq!(nginx_server.attr_str("http.route"), Some("/api/users/{id}"));
    assert_eq!(nginx_server.attr_str("url.path"), Some("/api/users/42"));
    assert_eq!(
        nginx_server.attr_str("url.query"),
        Some("token=REDACTED"),
        "{}",
        nginx_server.brief()
    );
    assert_eq!(
        nginx_server.attr_str("url.scheme"),
        Some("https"),
        "{}",
        nginx_server.brief()
    );
    assert!(
        nginx_server
            .attr_str("user_agent.original")
            .is_some_and(|ua| ua.starts_with("curl/")),
        "{}",
        nginx_server.brief()
    );
    assert_eq!(
        curl_span.attr_str("url.full"),
        Some(nginx.url("/api/users/42?token=REDACTED").as_str()),
        "{}",
        curl_span.brief()
    );
    assert_eq!(curl_span.service(), Some("curl"));
    // The upstream leg is clear text (its host is nginx's upstream name).
    assert!(
        nginx_client
            .attr_str("url.full")
            .is_some_and(|u| u.starts_with("http://")
                && u.ends_with(&format!(":{}/api/users/42?token=REDACTED", app.port))),
        "{}",
        nginx_client.brief()
    );
    assert_eq!(app_server.attr_str("url.scheme"), Some("http"));
    assert_eq!(app_server.name, "GET /api/users/{id}");

    // Kept-alive static files: each response with its request, bodies
    // (written by SSL_write, not sendfile) of the right size.
    let static_servers: Vec<&ReceivedSpan> = STATIC_FILES
        .iter()
        .map(|(name, size)| {
            let path = format!("/{name}");
            let curl_span = one(&spans, &path, |s| {
                s.kind == "CLIENT" && is_service(s, "curl") && for_path(s, &path)
            });
            let server = served(&spans, curl_span);
            assert_eq!(server.attr_str("url.path"), Some(path.as_str()));
            assert_eq!(server.attr_i64("http.response.status_code"), Some(200));
            assert_eq!(
                server.attr_i64("http.response.body.size"),
                Some(*size as i64),
                "{}",
                server.brief()
            );
            assert_eq!(server.name, "GET");
            server
        })
        .collect();
    let peer = |s: &ReceivedSpan| s.attr_i64("network.peer.port");
    assert!(
        static_servers
            .iter()
            .all(|s| peer(s) == peer(static_servers[0])),
        "one connection:{}",
        shown(&spans)
    );

    // A 404 is the client's error, not the server's.
    let missing_client = one(&spans, "404 client span", |s| {
        s.kind == "CLIENT" && for_path(s, "/missing.txt")
    });
    assert_eq!(missing_client.status, "ERROR");
    assert_eq!(missing_client.attr_str("error.type"), Some("404"));
    let missing_server = served(&spans, missing_client);
    assert_eq!(missing_server.status, "UNSET");
    assert_eq!(
        missing_server.attr_i64("http.response.status_code"),
        Some(404)
    );

    // The Python clients: one span per request, each linked to nginx's
    // span of it, which carries the tenant header sent inside TLS.
    for (run, ids, tenant) in [
        (&httpx, &[101, 102, 103][..], "py-httpx"),
        (&requests, &[201, 202][..], "py-requests"),
    ] {
        let clients = of_pid(&spans, run.pid, "CLIENT");
        let want: Vec<String> = ids
            .iter()
            .map(|i| nginx.url(&format!("/api/users/{i}")))
            .collect();
        let got: Vec<&str> = clients
            .iter()
            .map(|s| s.attr_str("url.full").unwrap_or("?"))
            .collect();
        assert_eq!(got, want, "{tenant}:{}", shown(&spans));
        let servers: Vec<&ReceivedSpan> = clients
            .iter()
            .map(|client| {
                assert_eq!(client.attr_str("http.request.method"), Some("GET"));
                assert_eq!(client.attr_i64("http.response.status_code"), Some(200));
                assert_eq!(client.attr_i64("server.port"), Some(i64::from(nginx.port)));
                assert_eq!(client.attr_str("tenant.id"), Some(tenant));
                let server = served(&spans, client);
                assert_eq!(
                    server.attr_str("tenant.id"),
                    Some(tenant),
                    "{}",
                    server.brief()
                );
                assert_eq!(server.name, "GET /api/users/{id}");
                assert_eq!(server.attr_str("url.scheme"), Some("https"));
                assert_eq!(path_of(server), path_of(client));
                server
            })
            .collect();
        assert!(
            servers.iter().all(|s| peer(s) == peer(servers[0])),
            "{tenant}: one kept-alive connection:{}",
            shown(&spans)
        );
    }
}

// ------------------------------------------------------------- databases

/// `system` CLIENT spans of calls to 127.0.0.1:`port`, in order.
fn db_clients<'a>(spans: &'a [ReceivedSpan], system: &str, port: u16) -> Vec<&'a ReceivedSpan> {
    let mut found: Vec<&ReceivedSpan> = on_port(spans, "CLIENT", port)
        .into_iter()
        .filter(|s| s.attr_str("db.system.name") == Some(system))
        .collect();
    found.sort_by_key(|s| s.start_ns);
    found
}

/// `system` SERVER spans of the server on `port`.
fn db_servers<'a>(spans: &'a [ReceivedSpan], system: &str, port: u16) -> Vec<&'a ReceivedSpan> {
    on_port(spans, "SERVER", port)
        .into_iter()
        .filter(|s| s.attr_str("db.system.name") == Some(system))
        .collect()
}

/// Every span of the server on `port` is a `system` span: no other
/// protocol read from its connections (ciphertext, the TLS switch).
fn assert_all_of(spans: &[ReceivedSpan], system: &str) {
    for s in spans {
        assert_eq!(
            s.attr_str("db.system.name"),
            Some(system),
            "{}:{}",
            s.brief(),
            shown(spans)
        );
    }
}

fn names(spans: &[&ReceivedSpan]) -> Vec<String> {
    spans.iter().map(|s| s.name.clone()).collect()
}

fn query_texts(spans: &[&ReceivedSpan]) -> Vec<String> {
    spans
        .iter()
        .map(|s| s.attr_str("db.query.text").unwrap_or("<none>").to_owned())
        .collect()
}

#[test]
fn postgres_over_tls_from_psql_and_psycopg_on_both_transports() {
    if !can_trace() {
        return;
    }
    for transport in TRANSPORTS {
        eprintln!("transport {transport}");
        postgres_over(transport);
    }
}

fn postgres_over(transport: &str) {
    let ca = TestCa::new().unwrap();
    let pg = Postgres::start_tls(&ca).unwrap();
    let rx = Receiver::start(Protocol::Grpc).unwrap();
    let agent = agent_on(&rx, transport, &[]);

    // psql, sslmode=require: six simple queries, one failing.
    let (_, err, ok) = pg
        .psql(
            "CREATE TABLE items (id int, secret text);\n\
             INSERT INTO items VALUES (1, 'hunter2-pg-secret');\n\
             SELECT secret FROM items WHERE id = 1;\n\
             SELECT secret FROM items WHERE id = 1;\n\
             SELECT secret FROM items WHERE id = 1;\n\
             SELECT * FROM missing_table;\n",
        )
        .unwrap();
    assert!(!ok && err.contains("missing_table"), "{err}");
    // psycopg (its own libpq and libssl), sslmode=require: parameters
    // bound server-side, and a literal.
    let py = psycopg(
        &pg.url(),
        &[
            ("SELECT secret FROM items WHERE id = %s", json!([1])),
            ("SELECT secret FROM items WHERE id = %s", json!([1])),
            ("SELECT secret FROM items WHERE id = %s", json!([1])),
            (
                "INSERT INTO items VALUES (%s, %s)",
                json!([2, "hunter3-psycopg-secret"]),
            ),
            (
                "SELECT id FROM items WHERE secret = 'hunter2-pg-secret'",
                json!([]),
            ),
        ],
    )
    .unwrap();
    assert_eq!(py.lines()[0], "ssl True", "{py:?}");

    let psql_clients = |s: &[ReceivedSpan]| -> usize {
        db_clients(s, "postgresql", pg.port)
            .iter()
            .filter(|x| is_service(x, "psql"))
            .count()
    };
    rx.wait_for(WAIT, "psql's and psycopg's spans", |s| {
        psql_clients(s) >= 6 && of_pid(s, py.pid, "CLIENT").len() >= 5
    })
    .unwrap();
    let spans = stop(agent, &rx);
    assert_nowhere(&spans, "hunter2-pg-secret");
    assert_nowhere(&spans, "hunter3-psycopg-secret");
    let spans = ours(spans, &[pg.port]);
    assert_all_of(&spans, "postgresql");

    // psql: six statements, six spans, in order.
    let psql: Vec<&ReceivedSpan> = db_clients(&spans, "postgresql", pg.port)
        .into_iter()
        .filter(|s| is_service(s, "psql"))
        .collect();
    assert_eq!(psql.len(), 6, "{}", shown(&spans));
    assert_eq!(
        names(&psql[1..]),
        [
            "INSERT items",
            "SELECT items",
            "SELECT items",
            "SELECT items",
            "SELECT missing_table"
        ],
        "{}",
        shown(&spans)
    );
    let insert = psql[1];
    assert_eq!(insert.attr_str("db.namespace"), Some("zt"));
    assert_eq!(insert.attr_str("db.operation.name"), Some("INSERT"));
    assert_eq!(insert.attr_str("db.collection.name"), Some("items"));
    assert_eq!(insert.attr_i64("server.port"), Some(i64::from(pg.port)));
    assert_eq!(insert.status, "UNSET");
    assert_eq!(
        insert.attr_str("db.query.text"),
        Some("INSERT INTO items VALUES (?, ?);"),
        "{}",
        insert.brief()
    );
    for select in &psql[2..5] {
        assert_eq!(
            select.attr_str("db.query.text"),
            Some("SELECT secret FROM items WHERE id = ?;"),
            "{}",
            select.brief()
        );
        assert_eq!(select.attr_str("db.operation.name"), Some("SELECT"));
    }
    let missing = psql[5];
    assert_eq!(missing.status, "ERROR");
    assert_eq!(missing.attr_str("db.response.status_code"), Some("42P01"));
    assert_eq!(missing.attr_str("error.type"), Some("42P01"));

    // psycopg: five statements, five spans.
    let py_spans: Vec<&ReceivedSpan> = of_pid(&spans, py.pid, "CLIENT");
    assert_eq!(
        query_texts(&py_spans),
        [
            "SELECT secret FROM items WHERE id = $1",
            "SELECT secret FROM items WHERE id = $1",
            "SELECT secret FROM items WHERE id = $1",
            "INSERT INTO items VALUES ($1, $2)",
            "SELECT id FROM items WHERE secret = ?",
        ],
        "{}",
        shown(&spans)
    );
    for s in &py_spans {
        assert_eq!(s.attr_str("db.system.name"), Some("postgresql"));
        assert_eq!(s.attr_str("db.namespace"), Some("zt"), "{}", s.brief());
        assert_eq!(s.attr_str("db.collection.name"), Some("items"));
        assert_eq!(s.status, "UNSET", "{}", s.brief());
    }
    assert_eq!(
        names(&py_spans),
        [
            "SELECT items",
            "SELECT items",
            "SELECT items",
            "INSERT items",
            "SELECT items"
        ]
    );

    // The backends are on this host: each call's server side is linked
    // to it, once; no other server spans.
    for client in psql.iter().chain(&py_spans) {
        let server = served(&spans, client);
        assert_eq!(
            server.name,
            client.name,
            "{} under {}:{}",
            server.brief(),
            client.brief(),
            shown(&spans)
        );
        assert_eq!(
            server.attr_str("db.query.text"),
            client.attr_str("db.query.text")
        );
    }
    assert_eq!(
        db_servers(&spans, "postgresql", pg.port).len(),
        11,
        "{}",
        shown(&spans)
    );
}

#[test]
fn mariadb_over_tls_from_the_mariadb_client_and_pymysql_on_both_transports() {
    if !can_trace() {
        return;
    }
    for transport in TRANSPORTS {
        eprintln!("transport {transport}");
        mariadb_over(transport);
    }
}

fn mariadb_over(transport: &str) {
    let ca = TestCa::new().unwrap();
    let my = Mariadb::start_tls(&ca).unwrap();
    let rx = Receiver::start(Protocol::HttpProtobuf).unwrap();
    let agent = agent_on(&rx, transport, &[]);

    // mariadb --ssl: seven statements, two failing.
    let (_, err, ok) = my
        .mysql(
            "CREATE TABLE t (id INT, v VARCHAR(40));\n\
             INSERT INTO t VALUES (1, 'topsecret-maria-99');\n\
             SELECT v FROM t WHERE id = 1;\n\
             SELECT v FROM t WHERE id = 1;\n\
             SELECT v FROM t WHERE id = 1;\n\
             SELEC 1;\n\
             SELECT * FROM nope;\n",
        )
        .unwrap();
    assert!(!ok && err.contains("nope"), "{err}");
    // PyMySQL with ssl={'ca': …}: it puts the parameters into the text.
    let py = pymysql(
        my.port,
        Some(&ca),
        &[
            ("SELECT v FROM t WHERE id = %s", json!([1])),
            ("SELECT v FROM t WHERE id = %s", json!([1])),
            ("SELECT v FROM t WHERE id = %s", json!([1])),
            (
                "INSERT INTO t VALUES (%s, %s)",
                json!([2, "topsecret-pymysql-77"]),
            ),
        ],
    )
    .unwrap();
    assert!(py.lines()[0].starts_with("tls TLSv1."), "{py:?}");

    let named = |s: &[ReceivedSpan], pred: &dyn Fn(&ReceivedSpan) -> bool, name: &str| {
        db_clients(s, "mysql", my.port)
            .into_iter()
            .filter(|x| pred(x) && x.name == name)
            .count()
    };
    let cli = |s: &ReceivedSpan| s.service() == Some("mariadb");
    let by_pymysql = |s: &ReceivedSpan| pid_of(s) == Some(py.pid);
    rx.wait_for(WAIT, "the mariadb client's and PyMySQL's spans", |s| {
        db_clients(s, "mysql", my.port)
            .iter()
            .any(|x| x.attr_str("db.response.status_code") == Some("1146"))
            && named(s, &by_pymysql, "INSERT t") >= 1
    })
    .unwrap();
    let spans = stop(agent, &rx);
    assert_nowhere(&spans, "topsecret-maria-99");
    assert_nowhere(&spans, "topsecret-pymysql-77");
    let spans = ours(spans, &[my.port]);
    assert_all_of(&spans, "mysql");

    // As in clear text.
    let insert = one(&spans, "the client's INSERT", |s| {
        s.kind == "CLIENT" && cli(s) && s.name == "INSERT t"
    });
    assert_eq!(insert.attr_str("db.system.name"), Some("mysql"));
    assert_eq!(insert.attr_str("db.namespace"), Some("zt"));
    assert_eq!(insert.attr_str("db.operation.name"), Some("INSERT"));
    assert_eq!(insert.attr_i64("server.port"), Some(i64::from(my.port)));
    assert_eq!(insert.status, "UNSET");
    let syntax = one(&spans, "syntax error", |s| {
        s.kind == "CLIENT" && s.attr_str("db.response.status_code") == Some("1064")
    });
    assert_eq!(syntax.status, "ERROR");
    let missing = one(&spans, "missing table", |s| {
        s.kind == "CLIENT" && s.attr_str("db.response.status_code") == Some("1146")
    });
    assert_eq!(missing.status, "ERROR");
    assert_eq!(missing.attr_str("error.type"), Some("1146"));

    // Three SELECTs each, three spans each, sanitized.
    for (who, pred) in [
        ("mariadb", &cli as &dyn Fn(&ReceivedSpan) -> bool),
        ("PyMySQL", &by_pymysql),
    ] {
        let selects: Vec<&ReceivedSpan> = db_clients(&spans, "mysql", my.port)
            .into_iter()
            .filter(|s| pred(s) && s.name == "SELECT t")
            .collect();
        assert_eq!(
            query_texts(&selects),
            ["SELECT v FROM t WHERE id = ?"; 3],
            "{who}:{}",
            shown(&spans)
        );
        for s in &selects {
            assert_eq!(s.attr_str("db.operation.name"), Some("SELECT"));
            assert_eq!(s.attr_str("db.collection.name"), Some("t"));
            assert_eq!(s.attr_str("db.namespace"), Some("zt"), "{}", s.brief());
            assert_eq!(s.status, "UNSET");
        }
    }
    assert_eq!(
        named(&spans, &by_pymysql, "INSERT t"),
        1,
        "{}",
        shown(&spans)
    );

    // mariadbd is on this host: each call's server side is linked to it.
    for client in db_clients(&spans, "mysql", my.port) {
        let server = served(&spans, client);
        assert_eq!(
            server.name,
            client.name,
            "{} under {}:{}",
            server.brief(),
            client.brief(),
            shown(&spans)
        );
    }
    assert_eq!(
        db_servers(&spans, "mysql", my.port).len(),
        db_clients(&spans, "mysql", my.port).len(),
        "{}",
        shown(&spans)
    );
}

#[test]
fn redis_over_tls_from_redis_cli_and_redis_benchmark_on_both_transports() {
    if !can_trace() {
        return;
    }
    for transport in TRANSPORTS {
        eprintln!("transport {transport}");
        redis_over(transport);
    }
}

fn redis_over(transport: &str) {
    let ca = TestCa::new().unwrap();
    let redis = Redis::start_tls(&ca).unwrap();
    let rx = Receiver::start(Protocol::Grpc).unwrap();
    let agent = agent_on(&rx, transport, &[]);

    redis
        .cli(&["SET", "k1", "supersecret-redis-value"])
        .unwrap();
    redis.cli(&["GET", "k1"]).unwrap();
    let wrongtype = redis.cli(&["LPUSH", "k1", "x"]).unwrap();
    assert!(wrongtype.contains("WRONGTYPE"), "{wrongtype}");
    redis.cli(&["-n", "3", "SET", "in-db-3", "v"]).unwrap();
    // 40 SETs, 8 per TLS record.
    redis
        .benchmark(&["-c", "1", "-P", "8", "-n", "40", "-t", "set", "-q"])
        .unwrap();

    let clients_named = |s: &[ReceivedSpan], service: &str, name: &str| -> usize {
        db_clients(s, "redis", redis.port)
            .iter()
            .filter(|x| x.service() == Some(service) && x.name == name)
            .count()
    };
    rx.wait_for(WAIT, "redis-cli's and redis-benchmark's spans", |s| {
        clients_named(s, "redis-benchmark", "SET") >= 40
            && clients_named(s, "redis-cli", "LPUSH") >= 1
    })
    .unwrap();
    let spans = stop(agent, &rx);
    assert_nowhere(&spans, "supersecret-redis-value");
    let spans = ours(spans, &[redis.port]);
    assert_all_of(&spans, "redis");

    let set = one(&spans, "SET k1", |s| {
        s.kind == "CLIENT" && s.attr_str("db.query.text") == Some("SET k1 ?")
    });
    assert_eq!(set.attr_str("db.system.name"), Some("redis"));
    assert_eq!(set.attr_str("db.namespace"), Some("0"));
    assert_eq!(set.attr_i64("server.port"), Some(i64::from(redis.port)));
    assert_eq!(set.status, "UNSET");
    let lpush = one(&spans, "LPUSH", |s| s.kind == "CLIENT" && s.name == "LPUSH");
    assert_eq!(lpush.status, "ERROR");
    assert_eq!(lpush.attr_str("db.response.status_code"), Some("WRONGTYPE"));
    let db3 = one(&spans, "SET in db 3", |s| {
        s.kind == "CLIENT" && s.attr_str("db.query.text") == Some("SET in-db-3 ?")
    });
    assert_eq!(db3.attr_str("db.namespace"), Some("3"));
    // 40 pipelined SETs: 40 spans, each paired with its reply.
    assert_eq!(
        clients_named(&spans, "redis-benchmark", "SET"),
        40,
        "{}",
        shown(&spans)
    );
    // redis-server is on this host: each call's server side is linked.
    let get = one(&spans, "GET", |s| {
        s.kind == "CLIENT" && s.name == "GET" && is_service(s, "redis-cli")
    });
    assert_eq!(get.attr_str("db.query.text"), Some("GET k1"));
    assert_eq!(served(&spans, get).name, "GET");
    for client in db_clients(&spans, "redis", redis.port) {
        served(&spans, client);
    }
    assert_eq!(
        db_servers(&spans, "redis", redis.port).len(),
        db_clients(&spans, "redis", redis.port).len(),
        "{}",
        shown(&spans)
    );
}

// ------------------------------------------------ libssl, found and listed

/// The `tls` entries of `zerotrace check --json` for process `pid`.
fn tls_entries(report: &serde_json::Value, pid: u32) -> Vec<serde_json::Value> {
    report["tls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tls array in the check report: {report}"))
        .iter()
        .filter(|e| e["pid"] == pid)
        .cloned()
        .collect()
}

/// `zerotrace check` lists each libssl `pid` maps as followed, in JSON and
/// in text (`tls pid N: OpenSSL 3.0.x (PATH) followed`).
fn assert_listed_as_followed(report: &serde_json::Value, text: &str, who: &str, pid: u32) {
    let mapped = mapped_libssl(pid);
    assert!(!mapped.is_empty(), "{who} (pid {pid}) maps no libssl");
    let entries = tls_entries(report, pid);
    for path in &mapped {
        let entry = entries
            .iter()
            .find(|e| e["path"] == path.as_str())
            .unwrap_or_else(|| panic!("{who}: {path} not listed for pid {pid}: {entries:?}"));
        assert_eq!(entry["followed"], true, "{who}: {entry}");
        let library = entry["library"].as_str().unwrap_or("");
        assert!(library.starts_with("OpenSSL"), "{who}: {entry}");
        if path.ends_with("/libssl.so.3") {
            assert!(library.starts_with("OpenSSL 3."), "{who}: {entry}");
        }
        assert!(entry.get("reason").is_some(), "{who}: {entry}");
        let line = text
            .lines()
            .find(|l| l.contains(&format!("tls pid {pid}: ")) && l.contains(path.as_str()))
            .unwrap_or_else(|| panic!("{who}: no text line for pid {pid} and {path}:\n{text}"));
        assert!(
            line.contains(&format!("tls pid {pid}: OpenSSL"))
                && line.contains(&format!("({path}) followed")),
            "{who}: {line}"
        );
    }
}

/// `zerotrace check`'s text output.
fn check_text() -> String {
    let out = std::process::Command::new(agent_bin())
        .arg("check")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn check_lists_the_libssl_of_running_curl_nginx_and_python_as_followed() {
    if !can_trace() {
        return;
    }
    let ca = TestCa::new().unwrap();
    // Nothing is proxied here: the upstream port is never used.
    let nginx = Nginx::start_tls(free_port(), &ca).unwrap();
    // curl in the middle of a request nobody answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}/", silent.local_addr().unwrap());
    let curl = Guard(
        std::process::Command::new("curl")
            .args(["-sS", "--max-time", "60", &silent_url])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (_held, _) = silent.accept().unwrap();
    // Python with `ssl` (the system libssl) and psycopg (its wheel's own
    // libssl, loaded with its libpq) imported, waiting.
    let mut python = Guard(
        std::process::Command::new(otlp::otel_python().unwrap())
            .args([
                "-c",
                "import ssl, sys, psycopg\nprint('ready', flush=True)\nsys.stdin.read()",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(python.0.stdout.as_mut().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "ready");
    let python_pid = python.0.id();
    let libraries = mapped_libssl(python_pid);
    assert!(
        libraries
            .iter()
            .any(|p| p.contains("/psycopg_binary.libs/libssl")),
        "psycopg's own libssl is not mapped: {libraries:?}"
    );

    let report = check_report();
    let text = check_text();
    let workers = nginx.workers();
    assert!(!workers.is_empty());
    assert_listed_as_followed(&report, &text, "curl", curl.0.id());
    assert_listed_as_followed(&report, &text, "nginx master", nginx.master_pid());
    for worker in workers {
        assert_listed_as_followed(&report, &text, "nginx worker", worker);
    }
    assert_listed_as_followed(&report, &text, "python with psycopg", python_pid);
}

#[test]
fn python_that_loads_libssl_after_the_agent_started_is_followed() {
    if !can_trace() {
        return;
    }
    let ca = TestCa::new().unwrap();
    let nginx = Nginx::start_tls(free_port(), &ca).unwrap();
    let mut lazy = LazyHttps::start(&ca, nginx.port).unwrap();
    assert!(
        !lazy.maps_libssl(),
        "the client maps libssl before importing ssl: {:?}",
        mapped_libssl(lazy.pid)
    );
    let rx = Receiver::start(Protocol::Grpc).unwrap();
    let agent = agent_for(&rx, &[]);
    assert!(
        !lazy.maps_libssl(),
        "libssl appeared before the first request"
    );

    // The first request imports ssl (dlopen of libssl.so.3). The agent
    // attaches to the new library by itself: retry for up to ~10 s until
    // a request of this process becomes a span.
    let pid = lazy.pid;
    let has_span = |s: &[ReceivedSpan]| !of_pid(s, pid, "CLIENT").is_empty();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut requests = 0;
    loop {
        assert_eq!(lazy.get("/a.txt").unwrap(), 200);
        requests += 1;
        if requests == 1 {
            let mapped = mapped_libssl(lazy.pid);
            assert!(
                mapped.iter().any(|p| p.ends_with("/libssl.so.3")),
                "{mapped:?}"
            );
        }
        let seen = rx
            .wait_for(std::time::Duration::from_millis(500), "", has_span)
            .is_ok();
        if seen || std::time::Instant::now() >= deadline {
            break;
        }
    }
    let report = check_report();
    let spans = stop(agent, &rx);

    let clients = of_pid(&spans, lazy.pid, "CLIENT");
    assert!(
        !clients.is_empty(),
        "no span of the {requests} requests of pid {} after it loaded libssl:{}",
        lazy.pid,
        shown(&spans)
    );
    assert!(clients.len() <= requests, "{}", shown(&spans));
    for client in &clients {
        assert_eq!(
            client.attr_str("url.full"),
            Some(nginx.url("/a.txt").as_str()),
            "{}",
            client.brief()
        );
        assert_eq!(client.attr_str("http.request.method"), Some("GET"));
        assert_eq!(client.attr_i64("http.response.status_code"), Some(200));
        let server = served(&spans, client);
        assert_eq!(server.attr_str("url.path"), Some("/a.txt"));
        assert_eq!(server.attr_i64("http.response.body.size"), Some(333));
    }
    // And `zerotrace check` lists the library it loaded late.
    let entries = tls_entries(&report, lazy.pid);
    assert!(
        entries.iter().any(|e| e["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("/libssl.so.3"))
            && e["followed"] == true),
        "{entries:?}"
    );
}

/// A process runs a libssl that was replaced on disk after it loaded it (a
/// package upgrade under a running service): the agent probes the file the
/// process really maps, through its `/proc/PID/map_files` entry.
#[test]
fn a_libssl_replaced_on_disk_is_probed_through_the_process_mapping() {
    if !can_trace() {
        return;
    }
    let ca = TestCa::new().unwrap();
    let nginx = Nginx::start_tls(free_port(), &ca).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("libssl.so.3");
    std::fs::copy("/usr/lib/x86_64-linux-gnu/libssl.so.3", &copy).unwrap();
    let lib_dir = dir.path().display().to_string();
    let mut client =
        LazyHttps::start_with_env(&ca, nginx.port, &[("LD_LIBRARY_PATH", &lib_dir)]).unwrap();
    // Loads the copy (the first request imports ssl).
    assert_eq!(client.get("/a.txt").unwrap(), 200);
    let mapped = mapped_libssl(client.pid);
    assert!(
        mapped.iter().any(|p| p.starts_with(&lib_dir)),
        "the client runs the copy: {mapped:?}"
    );
    // Replaced on disk: a new file under the old name, the old one gone.
    let fresh = dir.path().join("libssl.so.3.new");
    std::fs::copy("/usr/lib/x86_64-linux-gnu/libssl.so.3", &fresh).unwrap();
    std::fs::rename(&fresh, &copy).unwrap();

    let rx = Receiver::start(Protocol::Grpc).unwrap();
    let agent = agent_for(&rx, &[]);
    let pid = client.pid;
    for _ in 0..3 {
        assert_eq!(client.get("/b.txt").unwrap(), 200);
    }
    rx.wait_for(WAIT, "the client's spans", |s| {
        of_pid(s, pid, "CLIENT").len() >= 3
    })
    .unwrap();
    let report = check_report();
    let spans = stop(agent, &rx);
    let clients = of_pid(&spans, pid, "CLIENT");
    assert_eq!(clients.len(), 3, "{}", shown(&spans));
    for c in &clients {
        assert_eq!(c.attr_str("url.full"), Some(nginx.url("/b.txt").as_str()));
        assert_eq!(
            served(&spans, c).attr_i64("http.response.body.size"),
            Some(4444)
        );
    }
    let entries = tls_entries(&report, pid);
    assert!(
        entries.iter().any(
            |e| e["path"].as_str().is_some_and(|p| p.starts_with(&lib_dir))
                && e["followed"] == true
        ),
        "{entries:?}"
    );
}

/// Where OpenSSL was built with control-flow protection (Ubuntu, Fedora,
/// RHEL 9), every probed function begins with `endbr64`, which the kernel
/// can only single-step. The agent puts the probes of `ssl_read_internal`
/// and `ssl_write_internal` on the `push` after it (emulated, one trap
/// instead of two), and the entry and return programs still read the
/// arguments and the result: each request is one span with its status,
/// and the server's span of it its body size. The library is Ubuntu
/// 22.04's libssl3 (`cargo xtask setup` fetches it), loaded through
/// `LD_LIBRARY_PATH`.
#[test]
fn a_cet_built_libssl_is_probed_past_endbr64_and_still_traced() {
    if !can_trace() {
        return;
    }
    let lib_dir = cet_libssl_dir();
    let lib = format!("{lib_dir}/libssl.so.3");
    let ca = TestCa::new().unwrap();
    let nginx = Nginx::start_tls(free_port(), &ca).unwrap();
    let rx = Receiver::start(Protocol::Grpc).unwrap();
    let mut agent = agent_for(&rx, &[]);
    let mut client =
        LazyHttps::start_with_env(&ca, nginx.port, &[("LD_LIBRARY_PATH", &lib_dir)]).unwrap();
    // The first request loads the library; the agent probes it when it is
    // mapped.
    assert_eq!(client.get("/index.html").unwrap(), 200);
    assert!(
        mapped_libssl(client.pid).contains(&lib),
        "the client does not run {lib}: {:?}",
        mapped_libssl(client.pid)
    );
    let line = agent
        .wait_for_stderr(&format!("probed in {lib} "), WAIT)
        .unwrap();
    assert!(
        line.contains("probed past endbr64: ssl_read_internal, ssl_write_internal"),
        "{line}"
    );
    // The probes are in: every request from now on is a span.
    let asked = [
        ("/a.txt", 200_u16, 333_i64),
        ("/missing.txt", 404, 0),
        ("/b.txt", 200, 4444),
        ("/a.txt", 200, 333),
    ];
    for (path, status, _) in asked {
        assert_eq!(client.get(path).unwrap(), status, "{path}");
    }
    let pid = client.pid;
    let index = nginx.url("/index.html");
    let after_load = |s: &ReceivedSpan| s.attr_str("url.full") != Some(index.as_str());
    rx.wait_for(WAIT, "the client's spans", |s| {
        of_pid(s, pid, "CLIENT")
            .into_iter()
            .filter(|c| after_load(c))
            .count()
            >= asked.len()
    })
    .unwrap();
    let spans = stop(agent, &rx);
    let mut clients: Vec<&ReceivedSpan> = of_pid(&spans, pid, "CLIENT")
        .into_iter()
        .filter(|c| after_load(c))
        .collect();
    assert_eq!(clients.len(), asked.len(), "{}", shown(&spans));
    clients.sort_by_key(|c| c.start_ns);
    for (client, (path, status, size)) in clients.iter().zip(asked) {
        assert_eq!(client.attr_str("url.full"), Some(nginx.url(path).as_str()));
        assert_eq!(client.attr_str("http.request.method"), Some("GET"));
        assert_eq!(
            client.attr_i64("http.response.status_code"),
            Some(i64::from(status)),
            "{}",
            client.brief()
        );
        let server = served(&spans, client);
        assert_eq!(server.attr_str("url.path"), Some(path));
        if status == 200 {
            assert_eq!(server.attr_i64("http.response.body.size"), Some(size));
        }
    }
}

/// The CET-built libssl `cargo xtask setup` unpacked.
fn cet_libssl_dir() -> String {
    let dir = std::env::var("ZEROTRACE_CET_LIBSSL").unwrap_or_else(|_| {
        format!(
            "{}/.cache/zerotrace/cet-libssl/lib",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    assert!(
        std::path::Path::new(&dir).join("libssl.so.3").is_file(),
        "no CET-built libssl in {dir}: run `cargo xtask setup`"
    );
    dir
}
