//! The userspace hot path under criterion: decoding kernel records, the
//! protocol parsers, SQL sanitizing, and the whole way from raw records to a
//! finished span. `cargo xtask bench micro` runs this and writes
//! `bench/micro.md`; by hand: `AYA_BUILD_SKIP=1 cargo bench -p agent --bench hotpath`.
//!
//! Every benchmark declares `Throughput::Elements`: one element is one kernel
//! record (a data event, or an open/close record) in `decode` and the parser
//! groups, one SQL statement in `sql_sanitize`, and one request (all of its
//! records, to its span) in `span_build`, and one span in `export` (a batch
//! of 512 becoming one encoded OTLP request). Criterion runs on one thread, so
//! elements/s is per core. Each benchmark also counts its heap allocations
//! per iteration, and `cargo xtask bench micro` counts its instructions per
//! iteration under valgrind ([`measure`], [`counting`]): figures that, unlike
//! the times, a shared machine's load does not blur.
//!
//! The inputs are realistic messages built here byte by byte (the layouts
//! follow the recorded fixtures under `src/protocol/fixtures` and the fuzz
//! targets), fed the way the kernel reports them: one syscall per message
//! batch, whole.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    hint::black_box,
    io::Write,
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use agent_common::{ConnOpenEvent, DataEvent, Direction, EventHeader, EventKind, Role, Syscall};
use criterion::{
    BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime,
};
use zerotrace::{
    capture::decode,
    config::Config,
    export::{ExportSpan, HANDOFF_SPANS, OtlpEncoder, QueuedSpans, SpanQueue, otlp_request},
    pipeline::Replay,
    protocol::{
        db::{DbEvent, DbOptions},
        http::{HttpEvent, HttpOptions, Moment},
        session::{self, Event, Protocol, Session},
        sql::{Summaries, summarize},
    },
    trace::{TraceOptions, Tracer, parents::context::Sampler},
};

// --- allocations ------------------------------------------------------------

/// The system allocator, counting allocations per thread. How many times the
/// hot path allocates is a figure a shared machine's noise does not blur, so
/// every benchmark reports it next to its time (a thread-local count: no
/// atomic on the measured path).
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count_one() {
    ALLOCATIONS.with(|n| n.set(n.get() + 1));
}

// SAFETY: every call is passed on unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// `HOTPATH_COUNT=GROUP/BENCH:CALLS`, set by `cargo xtask bench micro` for
/// a run under valgrind: the binary only calls that benchmark's routine
/// CALLS times, then exits. Two runs that differ only in CALLS give the
/// instructions of one call, a figure the machine's load cannot move.
fn counting() -> Option<&'static (String, u64)> {
    static COUNT: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();
    COUNT
        .get_or_init(|| {
            let spec = std::env::var("HOTPATH_COUNT").ok()?;
            let (which, calls) = spec
                .rsplit_once(':')
                .unwrap_or_else(|| panic!("HOTPATH_COUNT={spec:?}: want GROUP/BENCH:CALLS"));
            let calls = calls
                .parse()
                .unwrap_or_else(|e| panic!("HOTPATH_COUNT={spec:?}: {e}"));
            Some((which.to_owned(), calls))
        })
        .as_ref()
}

/// Benchmarks `routine` in `g` (named `group`). With `HOTPATH_ALLOCATIONS`
/// set (by `cargo xtask bench micro`), first counts the heap allocations (and
/// reallocations) of one call, averaged over 1,000 calls, and appends the
/// count there as a JSON line. Under `HOTPATH_COUNT` ([`counting`]) only
/// calls it, if it is the one named.
fn measure<O>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    group: &str,
    bench: &str,
    mut routine: impl FnMut() -> O,
) {
    const CALLS: u64 = 1000;
    if let Some((which, calls)) = counting() {
        if *which == format!("{group}/{bench}") {
            for _ in 0..*calls {
                black_box(routine());
            }
            std::process::exit(0);
        }
        return;
    }
    if let Some(path) = std::env::var_os("HOTPATH_ALLOCATIONS") {
        let before = ALLOCATIONS.with(Cell::get);
        for _ in 0..CALLS {
            black_box(routine());
        }
        let per_call = (ALLOCATIONS.with(Cell::get) - before) as f64 / CALLS as f64;
        let line = format!(
            "{{\"group\":\"{group}\",\"bench\":\"{bench}\",\"allocations_per_iter\":{per_call}}}\n"
        );
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .unwrap_or_else(|e| panic!("cannot append to {}: {e}", path.to_string_lossy()));
    }
    g.bench_function(bench, |b| b.iter(&mut routine));
}

// --- messages ---------------------------------------------------------------

/// An HTTP/1.1 GET as a browser or service client sends it: nine headers,
/// among them the tenant header the tracer copies and a W3C traceparent.
const HTTP_REQUEST: &[u8] = b"GET /api/v1/orders/48213?include=items&currency=EUR HTTP/1.1\r\n\
Host: orders.shop.internal:8080\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36\r\n\
Accept: application/json\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Accept-Language: en-US,en;q=0.9\r\n\
Connection: keep-alive\r\n\
x-tenant-id: acme-corp\r\n\
x-request-id: 7f3c9a2e-1b4d-4e8f-9a6b-2c5d8e1f0a3b\r\n\
traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\
\r\n";

/// Its 200 response with a small JSON body, head and body in one write.
fn http_response() -> Vec<u8> {
    let body = br#"{"id":48213,"status":"shipped","currency":"EUR","total":129.99,"items":[{"sku":"A-1001","qty":2,"price":39.5},{"sku":"B-2002","qty":1,"price":50.99}],"customer":{"id":5512,"name":"Jane Doe"},"updated_at":"2024-05-01T12:34:56Z"}"#;
    let mut r = format!(
        "HTTP/1.1 200 OK\r\n\
         Server: nginx/1.25.4\r\n\
         Date: Wed, 01 May 2024 12:34:56 GMT\r\n\
         Content-Type: application/json; charset=utf-8\r\n\
         Content-Length: {}\r\n\
         Connection: keep-alive\r\n\
         Cache-Control: no-store\r\n\
         \r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// PostgreSQL frontend/backend message: type, length, body.
fn pg(t: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![t];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// StartupMessage (protocol 3.0) and the server's AuthenticationOk …
/// ReadyForQuery: what a connection starts with.
fn pg_handshake() -> (Vec<u8>, Vec<u8>) {
    let body = b"\x00\x03\x00\x00user\0app\0database\0shop\0application_name\0orders\0\0";
    let mut startup = (body.len() as u32 + 4).to_be_bytes().to_vec();
    startup.extend_from_slice(body);
    let mut ok = pg(b'R', &[0, 0, 0, 0]);
    ok.extend(pg(b'S', b"server_version\x0015.18\0"));
    ok.extend(pg(b'S', b"client_encoding\0UTF8\0"));
    ok.extend(pg(b'K', &[0, 0, 0, 1, 0, 0, 0, 2]));
    ok.extend(pg(b'Z', b"I"));
    (startup, ok)
}

/// One extended-protocol query as libpq/pgbench batch it: Parse (unnamed
/// statement) / Bind (one text parameter) / Describe portal / Execute / Sync;
/// and the response: ParseComplete, BindComplete, RowDescription, one
/// DataRow, CommandComplete, ReadyForQuery.
fn pg_exchange() -> (Vec<u8>, Vec<u8>) {
    let mut req = pg(
        b'P',
        b"\0SELECT abalance FROM pgbench_accounts WHERE aid = $1\0\0\0",
    );
    req.extend(pg(b'B', b"\0\0\0\0\0\x01\0\0\0\x0520322\0\x01\0\0"));
    req.extend(pg(b'D', b"P\0"));
    req.extend(pg(b'E', b"\0\0\0\0\0"));
    req.extend(pg(b'S', b""));
    let mut resp = pg(b'1', b"");
    resp.extend(pg(b'2', b""));
    resp.extend(pg(
        b'T',
        b"\x00\x01abalance\0\x00\x00\x40\x18\x00\x03\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00",
    ));
    resp.extend(pg(b'D', b"\x00\x01\x00\x00\x00\x044557"));
    resp.extend(pg(b'C', b"SELECT 1\0"));
    resp.extend(pg(b'Z', b"I"));
    (req, resp)
}

/// MySQL packet: 3-byte length, sequence id, payload.
fn my(seq: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_le_bytes()[..3].to_vec();
    out.push(seq);
    out.extend_from_slice(payload);
    out
}

/// Greeting, HandshakeResponse41 (database "shop") and OK, in the order
/// (server, client, server).
fn my_handshake() -> [Vec<u8>; 3] {
    // PROTOCOL_41, SECURE_CONNECTION, CONNECT_WITH_DB, MULTI_STATEMENTS,
    // MULTI_RESULTS, PS_MULTI_RESULTS, PLUGIN_AUTH, SESSION_TRACK.
    let caps: u32 = 0x0200 | 0x8000 | 0x0008 | 1 << 16 | 1 << 17 | 1 << 18 | 1 << 19 | 1 << 23;
    let mut g = vec![10];
    g.extend_from_slice(b"8.0.36\0\x01\x00\x00\x00abcdefgh\0");
    g.extend_from_slice(&(caps as u16).to_le_bytes());
    g.extend_from_slice(&[45, 2, 0]);
    g.extend_from_slice(&((caps >> 16) as u16).to_le_bytes());
    g.extend_from_slice(&[21, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    g.extend_from_slice(b"ijklmnopqrst\0mysql_native_password\0");
    let mut h = caps.to_le_bytes().to_vec();
    h.extend_from_slice(&[0, 0, 0, 1, 45]);
    h.extend_from_slice(&[0; 23]);
    h.extend_from_slice(b"app\0\x14");
    h.extend_from_slice(&[0x55; 20]);
    h.extend_from_slice(b"shop\0mysql_native_password\0");
    [my(0, &g), my(1, &h), my(2, &[0, 0, 0, 2, 0, 0, 0])]
}

/// A COM_QUERY and its result set: 3 columns, 10 rows, EOF-terminated.
fn my_exchange() -> (Vec<u8>, Vec<u8>) {
    let mut q = vec![3];
    q.extend_from_slice(
        b"SELECT id, name, email FROM customers WHERE tenant_id = 'acme-corp' AND active = 1 ORDER BY id LIMIT 10",
    );
    let req = my(0, &q);
    let mut seq = 1u8;
    let mut packet = |payload: &[u8], out: &mut Vec<u8>| {
        out.extend(my(seq, payload));
        seq += 1;
    };
    let mut resp = Vec::new();
    packet(&[3], &mut resp);
    for (name, kind) in [("id", 0x08), ("name", 0xfd), ("email", 0xfd)] {
        let mut c = Vec::new();
        for s in ["def", "shop", "customers", "customers", name, name] {
            c.push(s.len() as u8);
            c.extend_from_slice(s.as_bytes());
        }
        c.extend_from_slice(&[0x0c, 0x21, 0, 0, 1, 0, 0, kind, 0, 0, 0, 0, 0]);
        packet(&c, &mut resp);
    }
    packet(&[0xfe, 0, 0, 0x22, 0], &mut resp);
    for i in 0..10 {
        let mut row = Vec::new();
        for field in [
            format!("{}", 1000 + i),
            format!("Customer {i}"),
            format!("customer{i}@example.com"),
        ] {
            row.push(field.len() as u8);
            row.extend_from_slice(field.as_bytes());
        }
        packet(&row, &mut resp);
    }
    packet(&[0xfe, 0, 0, 0x22, 0], &mut resp);
    (req, resp)
}

/// A RESP array command as clients send it.
fn resp_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    out
}

const SESSION_VALUE: &str = r#"{"user":5512,"cart":["A-1001","B-2002"],"exp":1714567890}"#;

/// SET with an expiry and its +OK, GET and its bulk reply: four syscalls.
fn redis_exchange() -> [(Direction, Vec<u8>); 4] {
    let key = "session:7f3c9a2e1b4d4e8f";
    let mut bulk = format!("${}\r\n", SESSION_VALUE.len()).into_bytes();
    bulk.extend_from_slice(SESSION_VALUE.as_bytes());
    bulk.extend_from_slice(b"\r\n");
    [
        (
            Direction::Egress,
            resp_command(&["SET", key, SESSION_VALUE, "EX", "3600"]),
        ),
        (Direction::Ingress, b"+OK\r\n".to_vec()),
        (Direction::Egress, resp_command(&["GET", key])),
        (Direction::Ingress, bulk),
    ]
}

// --- kernel records -----------------------------------------------------------

/// The bytes of a plain-data record.
fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: T is one of agent-common's repr(C) record layouts, whose
    // padding is explicit fields: every byte is initialized.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

/// Builds records as the kernel programs write them.
struct Records {
    tgid: u32,
    tid: u32,
    fd: i32,
    conn_id: u64,
}

impl Records {
    /// Records of this process (thread `tgid + tid_offset`) on socket `fd`,
    /// so resources come from /proc as for any traced process.
    fn of_this_process(tid_offset: u32, fd: i32) -> Self {
        let tgid = std::process::id();
        Self {
            tgid,
            tid: tgid + tid_offset,
            fd,
            conn_id: 1 << 32 | fd as u64,
        }
    }

    fn header(&self, kind: EventKind, detail: u8, ts_ns: u64) -> EventHeader {
        EventHeader {
            kind: kind as u8,
            detail,
            _pad: [0; 2],
            tgid: self.tgid,
            tid: self.tid,
            fd: self.fd,
            ts_ns,
            conn_id: self.conn_id,
        }
    }

    fn data(&self, syscall: Syscall, ts_ns: u64, payload: &[u8]) -> Vec<u8> {
        let mut r = bytes_of(&DataEvent {
            header: self.header(EventKind::Data, syscall as u8, ts_ns),
            total_bytes: payload.len() as u64,
            captured: payload.len() as u32,
            ..DataEvent::default()
        });
        r.extend_from_slice(payload);
        // Ring buffer records are 8-byte aligned.
        r.resize(r.len().next_multiple_of(8), 0);
        r
    }

    fn open(&self, role: Role, local: SocketAddr, remote: SocketAddr, ts_ns: u64) -> Vec<u8> {
        let v4 = |a: SocketAddr| match a {
            SocketAddr::V4(a) => {
                let mut raw = [0u8; 16];
                raw[..4].copy_from_slice(&a.ip().octets());
                raw
            }
            SocketAddr::V6(a) => a.ip().octets(),
        };
        let mut comm = [0u8; 16];
        comm[..10].copy_from_slice(b"api-server");
        bytes_of(&ConnOpenEvent {
            header: self.header(EventKind::ConnOpen, role as u8, ts_ns),
            family: if local.is_ipv4() { 2 } else { 10 },
            local_port: local.port(),
            remote_port: remote.port(),
            _pad: 0,
            local_addr: v4(local),
            remote_addr: v4(remote),
            comm,
        })
    }

    fn close(&self, ts_ns: u64) -> Vec<u8> {
        bytes_of(&self.header(EventKind::ConnClose, 0, ts_ns))
    }
}

const SERVER: &str = "10.0.0.5:8080";
const CLIENT: &str = "10.0.0.7:51234";
const REDIS: &str = "10.0.0.9:6379";
const REDIS_CLIENT: &str = "10.0.0.5:40312";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// The records of one keep-alive HTTP exchange read by a server: the
/// request read, the response written.
fn http_server_records(r: &Records) -> [Vec<u8>; 2] {
    [
        r.data(Syscall::Read, 2_000, HTTP_REQUEST),
        r.data(Syscall::Write, 2_000_000, &http_response()),
    ]
}

// --- benchmarks ---------------------------------------------------------------

/// A group with the short timings that keep the whole run near a minute.
fn group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    g
}

fn bench_decode(c: &mut Criterion) {
    let http = Records {
        tgid: 4242,
        tid: 4243,
        fd: 12,
        conn_id: 0x1_0000_000c,
    };
    let (pg_req, pg_resp) = pg_exchange();
    let (my_req, my_resp) = my_exchange();
    let mut data: Vec<Vec<u8>> = http_server_records(&http).into();
    for (syscall, payload) in [
        (Syscall::Sendto, pg_req),
        (Syscall::Recvfrom, pg_resp),
        (Syscall::Write, my_req),
        (Syscall::Read, my_resp),
    ] {
        data.push(http.data(syscall, 3_000, &payload));
    }
    for (dir, payload) in redis_exchange() {
        let syscall = match dir {
            Direction::Egress => Syscall::Write,
            Direction::Ingress => Syscall::Read,
        };
        data.push(http.data(syscall, 4_000, &payload));
    }
    let open_close = [
        http.open(Role::Server, addr(SERVER), addr(CLIENT), 1_000),
        http.close(5_000),
    ];
    let mut g = group(c, "decode");
    for (name, records) in [("data", &data[..]), ("open_close", &open_close[..])] {
        for r in records {
            decode(r).expect("valid record");
        }
        g.throughput(Throughput::Elements(records.len() as u64));
        measure(&mut g, "decode", name, || {
            for r in records {
                let _ = black_box(decode(black_box(r)));
            }
        });
    }
    g.finish();
}

/// The session options the tracer gives each connection by default.
fn session_options() -> session::Options {
    session::Options {
        http: Arc::new(HttpOptions::default()),
        db: Arc::new(DbOptions::default()),
    }
}

/// A session fed its opening bytes until it has recognised `protocol`.
fn session_for(
    protocol: Protocol,
    remote: &str,
    opening: &[(Direction, Vec<u8>)],
) -> (Session, Vec<Event>) {
    let mut s = Session::new(session_options(), true, (40000, addr(remote).port()));
    let mut out = Vec::new();
    for (dir, bytes) in opening {
        s.feed(*dir, Moment::default(), bytes, 0, &mut out);
    }
    assert_eq!(s.protocol(), Some(protocol), "not recognised");
    out.clear();
    (s, out)
}

/// Benchmarks feeding `exchange` (one request and its response, syscall by
/// syscall) into a session already past detection and handshake; checks
/// first that each round ends in one completed call or exchange.
fn bench_session(
    c: &mut Criterion,
    group_name: &str,
    bench: &str,
    (mut session, mut out): (Session, Vec<Event>),
    exchange: &[(Direction, Vec<u8>)],
) {
    let calls_per_round = |out: &[Event]| {
        out.iter()
            .filter(|e| {
                matches!(
                    e,
                    Event::Http(HttpEvent::Exchange(_)) | Event::Db(DbEvent::Call(_))
                )
            })
            .count()
    };
    let requests = exchange.iter().filter(|(d, _)| *d == exchange[0].0).count();
    for _ in 0..2 {
        for (dir, bytes) in exchange {
            session.feed(*dir, Moment::default(), bytes, 0, &mut out);
        }
        assert_eq!(
            calls_per_round(&out),
            requests,
            "{group_name}/{bench}: {out:?}"
        );
        out.clear();
    }
    let mut g = group(c, group_name);
    g.throughput(Throughput::Elements(exchange.len() as u64));
    measure(&mut g, group_name, bench, || {
        for (dir, bytes) in exchange {
            session.feed(*dir, Moment::default(), black_box(bytes), 0, &mut out);
        }
        black_box(&out);
        out.clear();
    });
    g.finish();
}

fn bench_http(c: &mut Criterion) {
    // A server: reads the request, writes the response.
    let exchange = [
        (Direction::Ingress, HTTP_REQUEST.to_vec()),
        (Direction::Egress, http_response()),
    ];
    let session = session_for(Protocol::Http, CLIENT, &exchange[..1]);
    // The detection round's request is pending: answer it first.
    let (mut s, mut out) = session;
    s.feed(
        Direction::Egress,
        Moment::default(),
        &exchange[1].1,
        0,
        &mut out,
    );
    out.clear();
    bench_session(c, "http", "get_200", (s, out), &exchange);
}

fn bench_postgres(c: &mut Criterion) {
    let (startup, ok) = pg_handshake();
    let session = session_for(
        Protocol::Postgres,
        "10.0.0.8:5432",
        &[(Direction::Egress, startup), (Direction::Ingress, ok)],
    );
    let (req, resp) = pg_exchange();
    let exchange = [(Direction::Egress, req), (Direction::Ingress, resp)];
    bench_session(c, "postgres", "extended_select", session, &exchange);
}

fn bench_mysql(c: &mut Criterion) {
    let [greeting, hello, ok] = my_handshake();
    let session = session_for(
        Protocol::Mysql,
        "10.0.0.8:3306",
        &[
            (Direction::Ingress, greeting),
            (Direction::Egress, hello),
            (Direction::Ingress, ok),
        ],
    );
    let (req, resp) = my_exchange();
    let exchange = [(Direction::Egress, req), (Direction::Ingress, resp)];
    bench_session(c, "mysql", "query_10_rows", session, &exchange);
}

fn bench_redis(c: &mut Criterion) {
    let exchange = redis_exchange();
    let (mut s, mut out) = session_for(Protocol::Redis, REDIS, &exchange[..1]);
    for (dir, bytes) in &exchange[1..] {
        s.feed(*dir, Moment::default(), bytes, 0, &mut out);
    }
    out.clear();
    bench_session(c, "redis", "set_get", (s, out), &exchange);
}

fn bench_sql(c: &mut Criterion) {
    let statements = [
        (
            "select",
            "SELECT u.id, u.name, u.email, o.total FROM users u JOIN orders o ON o.user_id = u.id \
             WHERE u.tenant_id = 'acme-corp' AND o.created_at > '2024-01-01 00:00:00' \
             AND o.status IN (1, 2, 3) AND o.total >= 99.95 ORDER BY o.created_at DESC LIMIT 50",
        ),
        (
            "insert",
            "INSERT INTO orders (id, customer_id, amount, currency, note, created_at) VALUES \
             (98234, 5512, 129.99, 'EUR', 'gift wrap, deliver after 5pm', '2024-05-01 12:34:56')",
        ),
    ];
    let max = DbOptions::default().max_query_bytes;
    let mut g = group(c, "sql_sanitize");
    g.throughput(Throughput::Elements(1));
    for (name, sql) in statements {
        let s = summarize(sql, max);
        assert!(
            !s.sanitized.contains("acme") && !s.sanitized.contains("5512"),
            "{s:?}"
        );
        measure(&mut g, "sql_sanitize", name, || {
            summarize(black_box(sql), max)
        });
    }
    // A repeated text (a prepared or parameterized statement): summarized
    // once, then read from the shared summaries.
    let summaries = Summaries::default();
    let (_, select) = statements[0];
    measure(&mut g, "sql_sanitize", "select_repeated", || {
        summaries.summarize(black_box(select), max)
    });
    g.finish();
}

/// The record path after the reader, as `zerotrace run` takes it: a
/// replay of the records (the same rounds as the kernel's, attribution
/// included) hands them to the tracer, whose spans go to the export queue;
/// the receiver stands in for the exporter thread.
struct Stages {
    replay: Replay,
    tracer: Tracer,
    spans: QueuedSpans,
}

impl Stages {
    fn new() -> Self {
        let (queue, spans) = SpanQueue::for_test(4096);
        let queue = queue.batched(HANDOFF_SPANS);
        let opts = TraceOptions::new(&Config::default(), Sampler::default());
        Self {
            replay: Replay::default(),
            tracer: Tracer::new(opts, queue),
            spans,
        }
    }

    /// Hands `records` on as one reader batch, then the spans to the
    /// queue, as the pipeline's round does.
    fn feed(&mut self, records: &[Vec<u8>]) {
        self.replay.feed(records, &mut self.tracer);
        self.tracer.flush_spans();
    }

    /// `feed`, then takes the spans off the queue; returns how many.
    fn run(&mut self, records: &[Vec<u8>]) -> usize {
        self.feed(records);
        self.spans.try_iter().map(black_box).count()
    }

    /// `feed`, checking that exactly `n` spans came out, each with
    /// `attribute`.
    fn check(&mut self, records: &[Vec<u8>], n: usize, attribute: &str) {
        self.feed(records);
        assert_eq!(self.replay.undecodable, 0, "undecodable records");
        let spans: Vec<ExportSpan> = self.spans.try_iter().collect();
        assert_eq!(spans.len(), n, "{spans:?}");
        for s in &spans {
            let has = |key: &str| s.span.attributes.iter().any(|kv| kv.key.as_str() == key);
            assert!(has(attribute), "no {attribute}: {s:?}");
        }
    }
}

fn bench_span_build(c: &mut Criterion) {
    let server = Records::of_this_process(0, 12);
    let open = server.open(Role::Server, addr(SERVER), addr(CLIENT), 1_000);
    let [request, response] = http_server_records(&server);
    let close = server.close(3_000_000);

    let mut g = group(c, "span_build");
    g.throughput(Throughput::Elements(1));

    // A keep-alive connection: the request's two data records.
    let mut path = Stages::new();
    assert_eq!(path.run(std::slice::from_ref(&open)), 0);
    let exchange = [request.clone(), response.clone()];
    path.check(&exchange, 1, "tenant.id");
    measure(&mut g, "span_build", "http_keepalive", || {
        path.run(&exchange)
    });

    // A connection per request: open, request, response, close.
    let mut path = Stages::new();
    let whole = [open, request, response, close];
    path.check(&whole, 1, "http.response.status_code");
    measure(&mut g, "span_build", "http_connection", || path.run(&whole));

    // A Redis client on a kept connection: SET and GET, two client spans.
    let client = Records::of_this_process(1, 13);
    let mut path = Stages::new();
    let opened = client.open(Role::Client, addr(REDIS_CLIENT), addr(REDIS), 1_000);
    assert_eq!(path.run(&[opened]), 0);
    let records: Vec<Vec<u8>> = redis_exchange()
        .iter()
        .enumerate()
        .map(|(i, (dir, bytes))| {
            let syscall = match dir {
                Direction::Egress => Syscall::Write,
                Direction::Ingress => Syscall::Read,
            };
            client.data(syscall, 10_000 + i as u64 * 50_000, bytes)
        })
        .collect();
    path.check(&records, 2, "db.query.text");
    g.throughput(Throughput::Elements(2));
    measure(&mut g, "span_build", "redis_set_get", || path.run(&records));
    g.finish();
}

fn bench_export(c: &mut Criterion) {
    // A batch as the exporter takes it off the queue: 512 HTTP server spans.
    let server = Records::of_this_process(0, 14);
    let mut path = Stages::new();
    assert_eq!(
        path.run(&[server.open(Role::Server, addr(SERVER), addr(CLIENT), 1_000)]),
        0
    );
    let exchange = http_server_records(&server);
    let mut batch = Vec::with_capacity(BATCH);
    while batch.len() < BATCH {
        path.feed(&exchange);
        batch.extend(path.spans.try_iter());
    }
    batch.truncate(BATCH);

    let mut g = group(c, "export");
    g.throughput(Throughput::Elements(BATCH as u64));
    // What the exporter does: the request written straight from the
    // batch, into a buffer sized for it.
    let mut encoder = OtlpEncoder::default();
    measure(&mut g, "export", "otlp_encode", || {
        let mut out = Vec::with_capacity(BATCH * 400);
        encoder.request(&batch, &mut out);
        out
    });
    // Before: converted to opentelemetry-proto's messages, then encoded.
    // The batch moves into the request, so each iteration gets its own copy
    // (made outside the timing, so this one is timed only: a count of its
    // instructions would include the copy).
    if counting().is_none() {
        g.bench_function("otlp_convert_then_encode", |b| {
            b.iter_batched(
                || batch.clone(),
                |spans| prost::Message::encode_to_vec(&otlp_request(spans)),
                criterion::BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

/// OTEL_BSP_MAX_EXPORT_BATCH_SIZE's default.
const BATCH: usize = 512;

criterion_group!(
    benches,
    bench_decode,
    bench_http,
    bench_postgres,
    bench_mysql,
    bench_redis,
    bench_sql,
    bench_span_build,
    bench_export
);
criterion_main!(benches);
