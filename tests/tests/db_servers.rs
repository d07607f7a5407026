//! The database servers, their real clients and the Python apps of
//! `zerotrace_tests::db` work on this machine — no agent involved. The SQL
//! and Redis tracing tests build on them.

use std::time::Instant;

use zerotrace_tests::{
    can_trace,
    db::{FlaskApp, Mariadb, ModelsApp, Postgres, Redis},
    servers::curl,
};

fn timed<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> T {
    let start = Instant::now();
    let value = f().unwrap_or_else(|e| panic!("{what}: {e:#}"));
    eprintln!("  {what}: {:.0} ms", start.elapsed().as_secs_f64() * 1e3);
    value
}

#[test]
fn postgres_psql_and_pgbench() {
    if !can_trace() {
        return;
    }
    let pg = timed("postgres start", Postgres::start);
    assert!(pg.pid > 0);
    let (out, err, ok) = pg
        .psql("CREATE TABLE t (id int, v text); INSERT INTO t VALUES (1, 'a'), (2, 'b');\nSELECT id, v FROM t ORDER BY id;")
        .unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("1|a\n2|b"), "{out}");

    let (out, err, ok) = pg.psql("SELECT * FROM missing;\nSELECT 42;").unwrap();
    assert!(!ok, "a failing statement must make ok false: {out} {err}");
    assert!(err.contains("relation \"missing\" does not exist"), "{err}");
    assert!(out.contains("42"), "psql goes on after an error: {out}");

    timed("pgbench -i -s 1", || pg.pgbench(&["-i", "-s", "1", "-q"]));
    let out = timed("pgbench -t 10 -M prepared", || {
        pg.pgbench(&["-t", "10", "-c", "2", "-M", "prepared"])
    });
    assert!(
        out.contains("number of transactions actually processed: 20/20"),
        "{out}"
    );
    assert_eq!(
        pg.url(),
        format!("postgresql://postgres@127.0.0.1:{}/zt", pg.port)
    );
}

#[test]
fn mariadb_client() {
    if !can_trace() {
        return;
    }
    let my = timed("mariadb start", Mariadb::start);
    assert!(my.pid > 0);
    let (out, err, ok) = my
        .mysql("CREATE TABLE t (id INT, v TEXT); INSERT INTO t VALUES (1, 'a'), (2, 'b');\nSELECT id, v FROM t ORDER BY id;")
        .unwrap();
    assert!(ok, "{err}");
    assert_eq!(out, "1\ta\n2\tb\n");

    let (out, err, ok) = my.mysql("SELECT * FROM missing; SELECT 42;").unwrap();
    assert!(!ok, "a failing statement must make ok false: {out} {err}");
    assert!(err.contains("ERROR 1146"), "{err}");
    assert!(out.contains("42"), "--force goes on after an error: {out}");

    let (out, _, ok) = my
        .mysql("SELECT @@have_ssl, @@skip_name_resolve, DATABASE()")
        .unwrap();
    assert!(ok);
    assert_eq!(out.trim(), "DISABLED\t1\tzt", "clear text, no DNS, zt");

    // A second server starts from the cached template and is independent.
    let other = timed("mariadb start (2nd)", Mariadb::start);
    assert_ne!(other.port, my.port);
    let (out, _, _) = other.mysql("SHOW TABLES").unwrap();
    assert_eq!(out, "", "fresh server, no tables");
}

#[test]
fn redis_cli_and_benchmark() {
    if !can_trace() {
        return;
    }
    let redis = timed("redis start", Redis::start);
    assert_eq!(redis.cli(&["SET", "k", "v"]).unwrap().trim(), "OK");
    assert_eq!(redis.cli(&["GET", "k"]).unwrap().trim(), "v");
    let err = redis.cli(&["NOSUCHCMD"]).unwrap();
    assert!(err.starts_with("ERR unknown command"), "{err}");
    let out = timed("redis-benchmark", || {
        redis.benchmark(&["-P", "16", "-n", "1000", "-t", "set,get", "-q"])
    });
    assert!(out.contains("SET: ") && out.contains("GET: "), "{out}");
    let save = redis.cli(&["CONFIG", "GET", "save"]).unwrap();
    assert_eq!(save.lines().nth(1), Some(""), "no RDB snapshots: {save}");
}

#[test]
fn models_app_reads_through_the_cache_and_audits() {
    if !can_trace() {
        return;
    }
    let (pg, my, redis) = timed("three servers", || {
        Ok((Postgres::start()?, Mariadb::start()?, Redis::start()?))
    });
    let app = timed("models app", || ModelsApp::start(&pg, &my, &redis));
    assert_eq!(curl(&[&app.url("/health")]).unwrap(), "ok");

    // POST with a tenant: a row in PostgreSQL, an audit row in MariaDB.
    let created = curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-H",
        "x-tenant-id: acme",
        "-d",
        r#"{"name":"resnet"}"#,
        &app.url("/models"),
    ])
    .unwrap();
    let id = serde_json::from_str::<serde_json::Value>(&created).unwrap()["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("no id in {created}"));
    let (rows, _, _) = pg
        .psql(&format!("SELECT name, tenant FROM models WHERE id = {id}"))
        .unwrap();
    assert_eq!(rows.trim(), "resnet|acme");
    let (audit, _, _) = my
        .mysql(&format!(
            "SELECT action, tenant FROM audit WHERE model_id = {id}"
        ))
        .unwrap();
    assert_eq!(audit, "create\tacme\n");

    // GET: a miss reads PostgreSQL and fills the cache, then a hit.
    let key = format!("model:{id}");
    assert_eq!(redis.cli(&["EXISTS", &key]).unwrap().trim(), "0");
    let path = format!("/models/{id}");
    let first = curl(&[&app.url(&path)]).unwrap();
    assert!(first.contains(r#""source":"db""#), "{first}");
    assert!(first.contains(r#""tenant":"acme""#), "{first}");
    let ttl: i64 = redis.cli(&["TTL", &key]).unwrap().trim().parse().unwrap();
    assert!((1..=60).contains(&ttl), "cached with EX 60: ttl {ttl}");
    let second = curl(&[&app.url(&path)]).unwrap();
    assert!(second.contains(r#""source":"cache""#), "{second}");

    let missing = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &app.url("/models/999999"),
    ]);
    assert_eq!(missing.unwrap(), "404");
    drop(app);

    // The same app with connections opened at startup and kept.
    let app = timed("models app (persistent)", || {
        ModelsApp::start_with_env(&pg, &my, &redis, &[("APP_CONNECTIONS", "persistent")])
    });
    for _ in 0..6 {
        let body = curl(&[&app.url(&path)]).unwrap();
        assert!(body.contains(r#""source":"cache""#), "{body}");
    }
    redis.cli(&["DEL", &key]).unwrap();
    for _ in 0..6 {
        redis.cli(&["DEL", &key]).unwrap();
        let body = curl(&[&app.url(&path)]).unwrap();
        assert!(body.contains(r#""source":"db""#), "{body}");
    }
    let created = curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"name":"bert"}"#,
        &app.url("/models"),
    ])
    .unwrap();
    assert!(created.contains(r#""id":"#), "{created}");
    let (audit, _, _) = my
        .mysql("SELECT COUNT(*), COUNT(tenant) FROM audit")
        .unwrap();
    assert_eq!(audit, "2\t1\n", "no x-tenant-id → NULL tenant");

    // Flask on a threaded server, same table.
    let flask = timed("flask app", || FlaskApp::start(&pg));
    let body = curl(&[&flask.url(&path)]).unwrap();
    assert!(body.contains(r#""name":"resnet""#), "{body}");
    let missing = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &flask.url("/models/999999"),
    ]);
    assert_eq!(missing.unwrap(), "404");
}
