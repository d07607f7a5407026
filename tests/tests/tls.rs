//! End-to-end: traffic inside TLS — curl, httpx and requests to nginx over
//! HTTPS, psql and psycopg with `sslmode=require`, `mariadb --ssl` and
//! PyMySQL, `redis-cli --tls` — becomes the same spans as clear-text
//! traffic, on both kernel transports, from the plaintext the OpenSSL
//! probes see; `zerotrace check` lists the libssl each process maps. The
//! first test checks the fixtures themselves, without the agent. Needs root.

use serde_json::json;
use zerotrace_tests::{
    db::{Mariadb, Postgres, Redis},
    servers::{Nginx, PythonApp},
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
    let run = pymysql(my.port, &ca, &[("SELECT %s + 1, DATABASE()", json!([41]))]).unwrap();
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
