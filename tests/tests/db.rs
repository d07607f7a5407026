//! End-to-end: the PostgreSQL, MariaDB and Redis traffic of real clients
//! and of a FastAPI app becomes database spans, nested under the HTTP
//! requests that made them. Needs root.

use zerotrace_tests::{
    db::{FlaskApp, Mariadb, ModelsApp, Postgres, Redis},
    otlp::{Protocol, ReceivedSpan, Receiver},
    servers::curl,
    spans::*,
    *,
};

fn db_spans<'a>(spans: &'a [ReceivedSpan], system: &str) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.attr_str("db.system.name") == Some(system))
        .collect()
}

fn client_named<'a>(spans: &'a [ReceivedSpan], system: &str, name: &str) -> Vec<&'a ReceivedSpan> {
    db_spans(spans, system)
        .into_iter()
        .filter(|s| s.kind == "CLIENT" && s.name == name)
        .collect()
}

#[test]
fn postgres_statements_prepared_statements_and_errors() {
    if !can_trace() {
        return;
    }
    let pg = Postgres::start().unwrap();
    let rx = Receiver::start(Protocol::Grpc).unwrap();
    let agent = agent_for(&rx, &[]);
    let (_, err, ok) = pg
        .psql(
            "CREATE TABLE items (id int, secret text);\n\
             INSERT INTO items VALUES (1, 'hunter2-pg-secret');\n\
             SELECT secret FROM items WHERE id = 1;\n\
             SELEC broken;\n\
             SELECT * FROM missing_table;\n",
        )
        .unwrap();
    assert!(!ok && err.contains("missing_table"), "{err}");
    pg.pgbench(&["-i", "-s", "1", "-q"]).unwrap();
    pg.pgbench(&["-c", "1", "-t", "5", "-M", "prepared"])
        .unwrap();

    let spans = rx
        .wait_for(WAIT, "psql and pgbench spans", |s| {
            client_named(s, "postgresql", "UPDATE pgbench_accounts").len() >= 5
                && db_spans(s, "postgresql")
                    .iter()
                    .any(|x| x.attr_str("db.response.status_code") == Some("42P01"))
        })
        .unwrap();
    drop(agent);

    assert_nowhere(&spans, "hunter2-pg-secret");
    let insert = one(&spans, "psql INSERT", |s| {
        s.kind == "CLIENT" && s.name == "INSERT items" && is_service(s, "psql")
    });
    assert_eq!(insert.attr_str("db.namespace"), Some("zt"));
    assert_eq!(insert.attr_str("db.operation.name"), Some("INSERT"));
    assert_eq!(insert.attr_str("db.collection.name"), Some("items"));
    assert_eq!(insert.attr_i64("server.port"), Some(i64::from(pg.port)));
    assert_eq!(insert.status, "UNSET");
    let text = insert.attr_str("db.query.text").unwrap();
    assert!(text.starts_with("INSERT INTO items VALUES"), "{text}");
    let syntax = one(&spans, "syntax error", |s| {
        s.kind == "CLIENT" && s.attr_str("db.response.status_code") == Some("42601")
    });
    assert_eq!(syntax.status, "ERROR");
    assert_eq!(syntax.attr_str("error.type"), Some("42601"));
    let missing = one(&spans, "missing table", |s| {
        s.kind == "CLIENT" && s.attr_str("db.response.status_code") == Some("42P01")
    });
    assert_eq!(missing.status, "ERROR");
    assert_eq!(missing.name, "SELECT missing_table");
    // pgbench -M prepared: named statements executed over the extended protocol.
    let updates = client_named(&spans, "postgresql", "UPDATE pgbench_accounts");
    assert!(
        updates
            .iter()
            .all(|s| is_service(s, "pgbench") && s.status == "UNSET")
    );
    // The server is on this host: its side of the INSERT is linked.
    let backend = one(&spans, "server side of the INSERT", |s| {
        s.kind == "SERVER" && s.name == "INSERT items"
    });
    assert_eq!(backend.parent_span_id, insert.span_id, "{}", briefs(&spans));
    assert_eq!(backend.trace_id, insert.trace_id);
}

#[test]
fn mariadb_statements_and_errors() {
    if !can_trace() {
        return;
    }
    let my = Mariadb::start().unwrap();
    let rx = Receiver::start(Protocol::HttpProtobuf).unwrap();
    let agent = agent_for(&rx, &[]);
    let (_, err, ok) = my
        .mysql(
            "CREATE TABLE t (id INT, v VARCHAR(40));\n\
             INSERT INTO t VALUES (1, 'topsecret-maria-99');\n\
             SELECT v FROM t WHERE id = 1;\n\
             SELEC 1;\n\
             SELECT * FROM nope;\n",
        )
        .unwrap();
    assert!(!ok && err.contains("nope"), "{err}");
    let spans = rx
        .wait_for(WAIT, "mariadb client spans", |s| {
            db_spans(s, "mysql").iter().any(|x| {
                x.kind == "CLIENT" && x.attr_str("db.response.status_code") == Some("1146")
            })
        })
        .unwrap();
    drop(agent);

    assert_nowhere(&spans, "topsecret-maria-99");
    let insert = one(&spans, "INSERT", |s| {
        s.kind == "CLIENT" && s.name == "INSERT t"
    });
    assert_eq!(insert.attr_str("db.namespace"), Some("zt"));
    assert_eq!(insert.attr_i64("server.port"), Some(i64::from(my.port)));
    assert_eq!(insert.status, "UNSET");
    let select = one(&spans, "SELECT", |s| {
        s.kind == "CLIENT" && s.name == "SELECT t"
    });
    assert!(
        select
            .attr_str("db.query.text")
            .unwrap()
            .contains("WHERE id = ?")
    );
    let syntax = one(&spans, "syntax error", |s| {
        s.kind == "CLIENT" && s.attr_str("db.response.status_code") == Some("1064")
    });
    assert_eq!(syntax.status, "ERROR");
    let missing = one(&spans, "missing table", |s| {
        s.kind == "CLIENT" && s.attr_str("db.response.status_code") == Some("1146")
    });
    assert_eq!(missing.status, "ERROR");
    assert_eq!(missing.attr_str("error.type"), Some("1146"));
}

#[test]
fn redis_commands_pipelines_and_errors() {
    if !can_trace() {
        return;
    }
    let redis = Redis::start().unwrap();
    let rx = Receiver::start(Protocol::Grpc).unwrap();
    let agent = agent_for(&rx, &[]);
    redis
        .cli(&["SET", "k1", "supersecret-redis-value"])
        .unwrap();
    redis.cli(&["GET", "k1"]).unwrap();
    let wrongtype = redis.cli(&["LPUSH", "k1", "x"]).unwrap();
    assert!(wrongtype.contains("WRONGTYPE"), "{wrongtype}");
    redis.cli(&["-n", "3", "SET", "in-db-3", "v"]).unwrap();
    redis
        .benchmark(&["-c", "1", "-P", "16", "-n", "160", "-t", "set", "-q"])
        .unwrap();
    let benchmark_sets = |s: &[ReceivedSpan]| {
        client_named(s, "redis", "SET")
            .into_iter()
            .filter(|x| is_service(x, "redis-benchmark"))
            .count()
    };
    let spans = rx
        .wait_for(WAIT, "redis spans", |s| {
            benchmark_sets(s) >= 160 && !client_named(s, "redis", "LPUSH").is_empty()
        })
        .unwrap();
    drop(agent);

    assert_nowhere(&spans, "supersecret-redis-value");
    let set = one(&spans, "SET k1", |s| {
        s.kind == "CLIENT" && s.attr_str("db.query.text") == Some("SET k1 ?")
    });
    assert_eq!(set.attr_str("db.namespace"), Some("0"));
    assert_eq!(set.attr_i64("server.port"), Some(i64::from(redis.port)));
    let lpush = one(&spans, "LPUSH", |s| s.kind == "CLIENT" && s.name == "LPUSH");
    assert_eq!(lpush.status, "ERROR");
    assert_eq!(lpush.attr_str("db.response.status_code"), Some("WRONGTYPE"));
    let db3 = one(&spans, "SET in db 3", |s| {
        s.kind == "CLIENT" && s.attr_str("db.query.text") == Some("SET in-db-3 ?")
    });
    assert_eq!(db3.attr_str("db.namespace"), Some("3"));
    // 160 pipelined SETs, 16 per write: every one paired with its reply.
    assert_eq!(benchmark_sets(&spans), 160, "{}", briefs(&spans));
    // The server side of the client's GET is linked to it.
    let get = one(&spans, "GET", |s| {
        s.kind == "CLIENT" && s.name == "GET" && is_service(s, "redis-cli")
    });
    let served = one(&spans, "server GET", |s| {
        s.kind == "SERVER" && s.parent_span_id == get.span_id
    });
    assert_eq!(served.name, "GET");
}

#[test]
fn fastapi_requests_nest_their_sql_and_redis_calls_with_tenants() {
    if !can_trace() {
        return;
    }
    let pg = Postgres::start().unwrap();
    let my = Mariadb::start().unwrap();
    let redis = Redis::start().unwrap();
    let app = ModelsApp::start(&pg, &my, &redis).unwrap();
    let rx = Receiver::start(Protocol::Grpc).unwrap();
    let agent = agent_for(&rx, &["--route", "/models/{id}"]);
    let tenant = ["-H", "x-tenant-id: acme", "-H", "x-user-id: u-42"];
    let created = curl(
        &[
            &tenant[..],
            &[
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"name":"m-secret-name"}"#,
            ],
            &[&app.url("/models")],
        ]
        .concat(),
    )
    .unwrap();
    let id: serde_json::Value = serde_json::from_str(&created).unwrap();
    let id = id["id"].as_i64().unwrap();
    let url = app.url(&format!("/models/{id}"));
    let miss = curl(&[&tenant[..], &[url.as_str()]].concat()).unwrap();
    let hit = curl(&[&tenant[..], &[url.as_str()]].concat()).unwrap();
    assert!(
        miss.contains("\"db\"") && hit.contains("\"cache\""),
        "{miss} {hit}"
    );

    let servers = |s: &[ReceivedSpan]| {
        s.iter()
            .filter(|x| {
                x.kind == "SERVER" && x.attr_i64("server.port") == Some(i64::from(app.port))
            })
            .count()
    };
    let spans = rx
        .wait_for(WAIT, "the app's three requests and their calls", |s| {
            servers(s) >= 3
                && s.iter()
                    .filter(|x| x.kind == "CLIENT" && is_service(x, "curl"))
                    .count()
                    >= 3
                && db_spans(s, "redis").len() >= 6
                && !db_spans(s, "mysql").is_empty()
        })
        .unwrap();
    drop(agent);
    assert_nowhere(&spans, "m-secret-name");

    let app_server = |method: &str, n: usize| -> &ReceivedSpan {
        let mut found: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| {
                s.kind == "SERVER"
                    && s.attr_i64("server.port") == Some(i64::from(app.port))
                    && s.attr_str("http.request.method") == Some(method)
            })
            .collect();
        found.sort_by_key(|s| s.start_ns);
        found
            .get(n)
            .copied()
            .unwrap_or_else(|| panic!("no {method} #{n}:{}", briefs(&spans)))
    };
    let children = |parent: &ReceivedSpan| -> Vec<String> {
        let mut kids: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| s.parent_span_id == parent.span_id && s.kind == "CLIENT")
            .collect();
        kids.sort_by_key(|s| s.start_ns);
        for k in &kids {
            assert_eq!(k.trace_id, parent.trace_id, "{}", k.brief());
            assert_eq!(
                k.attr_str("tenant.id"),
                Some("acme"),
                "tenant not inherited: {}",
                k.brief()
            );
            assert_eq!(k.attr_str("user.id"), Some("u-42"), "{}", k.brief());
        }
        kids.iter()
            .map(|k| format!("{} {}", k.attr_str("db.system.name").unwrap_or("?"), k.name))
            .collect()
    };

    // POST /models: PostgreSQL insert, then the MariaDB audit row.
    let post = app_server("POST", 0);
    assert_eq!(post.attr_str("tenant.id"), Some("acme"));
    let post_calls = children(post);
    assert!(
        post_calls.contains(&"postgresql INSERT models".to_owned()),
        "{post_calls:?}{}",
        briefs(&spans)
    );
    assert!(
        post_calls.contains(&"mysql INSERT audit".to_owned()),
        "{post_calls:?}"
    );
    let pg_pos = post_calls
        .iter()
        .position(|c| c == "postgresql INSERT models");
    let my_pos = post_calls.iter().position(|c| c == "mysql INSERT audit");
    assert!(pg_pos < my_pos, "{post_calls:?}");

    // GET on a cache miss: Redis, PostgreSQL, Redis; on a hit: Redis only.
    let get_miss = app_server("GET", 0);
    assert_eq!(get_miss.name, "GET /models/{id}");
    let miss_calls = children(get_miss);
    assert_eq!(
        miss_calls
            .iter()
            .filter(|c| c.starts_with("redis"))
            .cloned()
            .collect::<Vec<_>>(),
        ["redis GET", "redis SET"],
        "{miss_calls:?}"
    );
    assert!(
        miss_calls.contains(&"postgresql SELECT models".to_owned()),
        "{miss_calls:?}"
    );
    let get_hit = app_server("GET", 1);
    assert_eq!(children(get_hit), ["redis GET"]);

    // curl → app server → app's Redis call → redis-server: one trace.
    let curl_span = one(&spans, "curl's GET on the hit", |s| {
        s.kind == "CLIENT" && s.span_id == get_hit.parent_span_id
    });
    assert!(is_service(curl_span, "curl"));
    let redis_get = spans
        .iter()
        .find(|s| s.parent_span_id == get_hit.span_id)
        .unwrap();
    let redis_server = one(&spans, "redis-server's side of the hit", |s| {
        s.kind == "SERVER" && s.parent_span_id == redis_get.span_id
    });
    assert_eq!(redis_server.trace_id, curl_span.trace_id);
}

#[test]
fn threaded_flask_and_concurrent_fastapi_requests_never_nest_wrongly() {
    if !can_trace() {
        return;
    }
    let pg = Postgres::start().unwrap();
    let my = Mariadb::start().unwrap();
    let redis = Redis::start().unwrap();
    let app = ModelsApp::start(&pg, &my, &redis).unwrap();
    let flask = FlaskApp::start(&pg).unwrap();
    let rx = Receiver::start(Protocol::Grpc).unwrap();
    let agent = agent_for(&rx, &[]);

    // Flask: a thread per connection reads the request and queries.
    let flask_paths: Vec<String> = (1..=3)
        .map(|i| flask.url(&format!("/models/{i}")))
        .collect();
    // FastAPI: ten requests at once for five models (misses, then hits).
    let app_paths: Vec<String> = (1..=10)
        .map(|i| app.url(&format!("/models/{}", 1 + i % 5)))
        .collect();
    let mut args: Vec<&str> = vec![
        "--parallel",
        "--parallel-max",
        "10",
        "-H",
        "x-tenant-id: t-par",
    ];
    for url in flask_paths.iter().chain(&app_paths) {
        args.extend(["-o", "/dev/null", url.as_str()]);
    }
    // Models exist, created one by one (their spans are not under test here).
    for i in 1..=5 {
        curl(&[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            &format!(r#"{{"name":"m{i}"}}"#),
            &app.url("/models"),
        ])
        .unwrap();
    }
    curl(&args).unwrap();

    let gets = |s: &[ReceivedSpan]| {
        s.iter()
            .filter(|x| x.kind == "SERVER" && x.attr_str("http.request.method") == Some("GET"))
            .count()
    };
    rx.wait_for(WAIT, "13 GET server spans and their calls", |s| {
        gets(s) >= 13
    })
    .unwrap();
    // Give late database spans a moment.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let spans = rx.spans();
    drop(agent);

    let by_id = |id: &str| spans.iter().find(|s| s.span_id == id);
    let mut nested = 0;
    for call in spans
        .iter()
        .filter(|s| s.kind == "CLIENT" && s.attr_str("db.system.name").is_some())
    {
        let Some(parent) = by_id(&call.parent_span_id) else {
            continue;
        };
        if parent.kind != "SERVER" || parent.attr_str("http.request.method").is_none() {
            continue;
        }
        nested += 1;
        // A call nested under a request must be that request's: same
        // process, and the model id it looks up is the one in the path.
        assert_eq!(
            call.resource.get("process.pid"),
            parent.resource.get("process.pid")
        );
        let path = parent.attr_str("url.path").unwrap_or("");
        if let Some(key) = call
            .attr_str("db.query.text")
            .and_then(|q| q.strip_prefix("GET model:"))
        {
            assert_eq!(
                format!("/models/{key}"),
                path,
                "{} under {}",
                call.brief(),
                parent.brief()
            );
        }
    }
    // Flask's three queries are always nested (one request per thread).
    let flask_selects = spans
        .iter()
        .filter(|s| {
            s.kind == "CLIENT"
                && s.name == "SELECT models"
                && s.resource.get("process.pid") == Some(&serde_json::json!(flask.pid))
        })
        .collect::<Vec<_>>();
    assert_eq!(flask_selects.len(), 3, "{}", briefs(&spans));
    for s in flask_selects {
        let parent = by_id(&s.parent_span_id)
            .unwrap_or_else(|| panic!("flask query not nested: {}", s.brief()));
        assert_eq!(parent.kind, "SERVER");
        assert_eq!(s.attr_str("tenant.id"), Some("t-par"));
    }
    assert!(nested >= 3, "{}", briefs(&spans));
}
