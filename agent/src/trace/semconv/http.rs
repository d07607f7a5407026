//! HTTP exchanges as spans: names, attributes and statuses per the
//! OpenTelemetry HTTP semantic conventions.

use std::borrow::Cow;

use opentelemetry::trace::Status;

use super::{ATTRIBUTE_BYTES, Described, Endpoints, Side};
use crate::{
    capture::Endpoint,
    export::Attributes,
    protocol::http::{Exchange, Request},
};

/// Methods the semantic conventions know; others are reported as `_OTHER`.
const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// The path and query of a request target, in origin or absolute form.
pub fn path_and_query(target: &str) -> (&str, Option<&str>) {
    let rest = match find_scheme_end(target) {
        // absolute-form (proxies): skip scheme and authority.
        Some(i) => {
            let after = &target[i + 3..];
            memchr::memchr(b'/', after.as_bytes()).map_or("/", |j| &after[j..])
        }
        None => target,
    };
    // The fragment goes, then the query is what follows the first '?'. One
    // pass finds whichever comes first: a '?' after a '#' is the fragment's.
    match memchr::memchr2(b'?', b'#', rest.as_bytes()) {
        Some(i) if rest.as_bytes()[i] == b'?' => {
            let query = &rest[i + 1..];
            let query = memchr::memchr(b'#', query.as_bytes()).map_or(query, |j| &query[..j]);
            (&rest[..i], Some(query))
        }
        Some(i) => (&rest[..i], None),
        None => (rest, None),
    }
}

/// The position of "://" when `target` starts with a URI scheme
/// (absolute-form, as proxies get); None for origin-form ("/path?q"), even
/// when its query holds a URL.
fn find_scheme_end(target: &str) -> Option<usize> {
    let b = target.as_bytes();
    // A scheme is a letter, then letters, digits, '+', '-', '.'; the first
    // byte outside them must be the ':' of "://". Origin-form ends at '/'.
    if !b.first().is_some_and(u8::is_ascii_alphabetic) {
        return None;
    }
    let i = b
        .iter()
        .position(|c| !(c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.')))?;
    (b[i] == b':' && b[i + 1..].starts_with(b"//")).then_some(i)
}

/// Keeps query keys, replaces every value with `REDACTED`: values often
/// carry tokens and personal data. A pair's key runs up to its first '='
/// (then it had a value), else it is the whole pair.
pub fn redact_query(query: &str) -> String {
    let mut out = Vec::with_capacity(redacted_len(query));
    write_redacted(query, &mut out);
    // Whole pieces of `query` and ASCII: UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

const REDACTED: &str = "=REDACTED";

/// The length of `query` redacted. Queries are short: a byte loop to size
/// the text and one to write it cost less than splitting them into pairs,
/// and let the text go straight into a span's attributes.
fn redacted_len(query: &str) -> usize {
    let mut len = 0;
    let mut in_value = false;
    for &c in query.as_bytes() {
        match c {
            b'&' => {
                in_value = false;
                len += 1;
            }
            b'=' if !in_value => {
                in_value = true;
                len += REDACTED.len();
            }
            _ if !in_value => len += 1,
            _ => {}
        }
    }
    len
}

/// Appends `query` redacted: [`redacted_len`] bytes.
fn write_redacted(query: &str, out: &mut Vec<u8>) {
    let q = query.as_bytes();
    let mut key = 0;
    let mut in_value = false;
    for (i, &c) in q.iter().enumerate() {
        match c {
            b'&' => {
                if !in_value {
                    out.extend_from_slice(&q[key..i]);
                }
                out.push(b'&');
                in_value = false;
                key = i + 1;
            }
            b'=' if !in_value => {
                out.extend_from_slice(&q[key..i]);
                out.extend_from_slice(REDACTED.as_bytes());
                in_value = true;
            }
            _ => {}
        }
    }
    if !in_value {
        out.extend_from_slice(&q[key..]);
    }
}

/// Route patterns: `{name}` or `:name` matches one path segment, a final
/// `*` or `{*name}` matches the rest.
#[derive(Debug, Clone, Default)]
pub struct Routes(Vec<(String, Vec<String>)>);

impl Routes {
    pub fn new(patterns: &[String]) -> Self {
        Self(
            patterns
                .iter()
                .map(|p| (p.clone(), segments(p).map(str::to_owned).collect()))
                .collect(),
        )
    }

    pub fn matching(&self, path: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(_, pattern)| matches(pattern, path))
            .map(|(route, _)| route.as_str())
    }
}

fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

fn matches(pattern: &[String], path: &str) -> bool {
    let mut path = segments(path);
    for part in pattern {
        if part == "*" || part.starts_with("{*") {
            return true;
        }
        let Some(segment) = path.next() else {
            return false;
        };
        let wildcard = part.starts_with(':') || (part.starts_with('{') && part.ends_with('}'));
        if !wildcard && part != segment {
            return false;
        }
    }
    path.next().is_none()
}

/// Path exclusion rules: exact paths, or prefixes ending in `*`.
#[derive(Debug, Clone, Default)]
pub struct PathFilter(Vec<String>);

impl PathFilter {
    pub fn new(paths: &[String]) -> Self {
        Self(paths.to_vec())
    }

    pub fn excludes(&self, target: &str) -> bool {
        let (path, _) = path_and_query(target);
        self.0.iter().any(|rule| match rule.strip_suffix('*') {
            Some(prefix) => path.starts_with(prefix),
            None => path == rule,
        })
    }
}

pub fn describe(side: Side, exchange: &Exchange, at: Endpoints<'_>, routes: &Routes) -> Described {
    let request = &exchange.request;
    let (path, query) = path_and_query(&request.target);
    let query = query.filter(|q| !q.is_empty());
    let mut attrs = Attributes::with_capacity(ATTRIBUTE_BYTES);
    let method = method(request, &mut attrs);
    let scheme = if at.tls { "https" } else { "http" };
    let server = at.server(side);
    let (host, port) = authority(request, server, scheme);
    attrs.str("url.scheme", scheme);
    attrs.str("network.protocol.version", request.version);
    attrs.str("network.transport", at.transport());
    if let Some(peer) = &at.peer {
        attrs.str("network.peer.address", peer);
    }
    if let Some(port) = at.remote.port() {
        attrs.int("network.peer.port", i64::from(port));
    }
    match server {
        Endpoint::Inet(_) => {
            attrs.str("server.address", &host);
            attrs.int("server.port", i64::from(port));
        }
        // Over a unix socket the server is the socket, whatever the Host
        // header says (it is usually `localhost`).
        Endpoint::Unix(_) => attrs.str("server.address", server.unix_name().unwrap_or(&host)),
    }
    let mut route = None;
    match side {
        Side::Server => {
            attrs.str("url.path", path);
            if let Some(q) = query {
                attrs.str_from_parts("url.query", redacted_len(q), |out| {
                    write_redacted(q, out);
                });
            }
            if let Some(peer) = &at.peer {
                attrs.str("client.address", peer);
            }
            route = routes.matching(path);
            if let Some(route) = route {
                attrs.str("http.route", route);
            }
        }
        Side::Client => {
            let url = UrlFull {
                scheme,
                host: &host,
                port,
                path,
                query,
            };
            attrs.str_from_parts("url.full", url.len(), |out| url.write(out));
        }
    }
    if let Some(agent) = &request.user_agent {
        attrs.str("user_agent.original", agent);
    }
    if request.body_bytes > 0 {
        attrs.int("http.request.body.size", request.body_bytes as i64);
    }
    let mut status = Status::Unset;
    match &exchange.response {
        Some(response) => {
            attrs.int("http.response.status_code", i64::from(response.status));
            if response.body_bytes > 0 {
                attrs.int("http.response.body.size", response.body_bytes as i64);
            }
            let error = match side {
                Side::Server => response.status >= 500,
                Side::Client => response.status >= 400,
            };
            if error {
                attrs.str("error.type", &response.status.to_string());
                status = Status::error("");
            }
        }
        // The response went by in what the capture did not see: most
        // likely answered, so no error is claimed, only that it is unknown.
        None if exchange.response_lost.is_some() => {
            attrs.bool("zerotrace.response.lost", true);
        }
        None => {
            // The connection closed before a response.
            attrs.str("error.type", "no_response");
            status = Status::error("no response before the connection closed");
        }
    }
    let name = match (side, route) {
        (Side::Server, Some(route)) => {
            let mut name = String::with_capacity(method.len() + 1 + route.len());
            name.push_str(method);
            name.push(' ');
            name.push_str(route);
            Cow::Owned(name)
        }
        _ => Cow::Borrowed(method),
    };
    Described {
        name,
        attributes: attrs,
        status,
    }
}

/// `url.full`: `scheme://host:port/path?query`, IPv6 hosts in brackets,
/// the query redacted; sized first, then written straight into the span's
/// attributes.
struct UrlFull<'a> {
    scheme: &'a str,
    host: &'a str,
    port: u16,
    path: &'a str,
    query: Option<&'a str>,
}

impl UrlFull<'_> {
    fn bracket(&self) -> bool {
        self.host.contains(':')
    }

    fn len(&self) -> usize {
        self.scheme.len()
            + "://".len()
            + self.host.len()
            + if self.bracket() { 2 } else { 0 }
            + 1
            + port_digits(self.port)
            + self.path.len()
            + self.query.map_or(0, |q| 1 + redacted_len(q))
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.scheme.as_bytes());
        out.extend_from_slice(b"://");
        if self.bracket() {
            out.push(b'[');
            out.extend_from_slice(self.host.as_bytes());
            out.push(b']');
        } else {
            out.extend_from_slice(self.host.as_bytes());
        }
        out.push(b':');
        let mut digits = [0u8; 5];
        let n = port_digits(self.port);
        let mut p = self.port;
        for d in digits[..n].iter_mut().rev() {
            *d = b'0' + (p % 10) as u8;
            p /= 10;
        }
        out.extend_from_slice(&digits[..n]);
        out.extend_from_slice(self.path.as_bytes());
        if let Some(q) = self.query {
            out.push(b'?');
            write_redacted(q, out);
        }
    }
}

/// The decimal digits of a port.
fn port_digits(port: u16) -> usize {
    match port {
        0..10 => 1,
        10..100 => 2,
        100..1000 => 3,
        1000..10000 => 4,
        _ => 5,
    }
}

/// Adds the method attributes; returns the name to use in the span name.
fn method(request: &Request, attrs: &mut Attributes) -> &'static str {
    if let Some(known) = KNOWN_METHODS.iter().find(|m| **m == request.method) {
        attrs.str("http.request.method", known);
        known
    } else {
        attrs.str("http.request.method", "_OTHER");
        attrs.str("http.request.method_original", &request.method);
        "HTTP"
    }
}

/// `server.address` and `server.port`: from the Host header when there is
/// one, else the server end's address (`localhost` and the scheme's port
/// for a unix socket).
fn authority<'r>(request: &'r Request, server: &Endpoint, scheme: &str) -> (Cow<'r, str>, u16) {
    let server_port = match server {
        Endpoint::Inet(addr) => addr.port(),
        Endpoint::Unix(_) if scheme == "https" => 443,
        Endpoint::Unix(_) => 80,
    };
    match &request.host {
        Some(host) => (Cow::Borrowed(&*host.name), host.port.unwrap_or(server_port)),
        // Formatted only without a Host header: most requests have one.
        None => {
            let server_host = match server {
                Endpoint::Inet(addr) => Cow::Owned(addr.ip().to_string()),
                Endpoint::Unix(_) => Cow::Borrowed("localhost"),
            };
            (server_host, server_port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::http::{Authority, Response};
    use opentelemetry::Value;
    use std::sync::Arc;

    fn exchange(method: &str, target: &str, status: Option<u16>) -> Exchange {
        Exchange {
            response_lost: None,
            request: Arc::new(Request {
                method: method.to_owned().into(),
                target: target.into(),
                version: "1.1",
                host: Authority::parse("shop.example:8080"),
                user_agent: Some("curl/7.88.1".into()),
                ..Default::default()
            }),
            response: status.map(|status| Response {
                status,
                version: "1.1",
                ..Default::default()
            }),
        }
    }

    fn at() -> Endpoints<'static> {
        let end = |s: &str| &*Box::leak(Box::new(Endpoint::Inet(s.parse().unwrap())));
        Endpoints::new(end("127.0.0.1:8080"), end("127.0.0.1:50123"), false)
    }

    #[test]
    fn unix_socket_exchanges_name_the_socket() {
        use crate::capture::{UnixEnd, endpoint::unix_name};
        let unix = |sk, name: &[u8]| {
            &*Box::leak(Box::new(Endpoint::Unix(UnixEnd {
                sk,
                ino: sk,
                name: unix_name(name),
            })))
        };
        let mut ex = exchange("GET", "/x?q=1", Some(200));
        Arc::make_mut(&mut ex.request).host = Authority::parse("localhost");
        let client = Endpoints::new(unix(1, b""), unix(2, b"/tmp/app.sock"), false);
        let d = describe(Side::Client, &ex, client, &Routes::default());
        let get = |d: &Described, k: &str| attr(d, k).map(|v| v.to_string());
        assert_eq!(get(&d, "network.transport").as_deref(), Some("unix"));
        assert_eq!(get(&d, "server.address").as_deref(), Some("/tmp/app.sock"));
        assert_eq!(
            get(&d, "network.peer.address").as_deref(),
            Some("/tmp/app.sock")
        );
        assert_eq!(
            get(&d, "url.full").as_deref(),
            Some("http://localhost:80/x?q=REDACTED")
        );
        assert_eq!(
            (get(&d, "server.port"), get(&d, "network.peer.port")),
            (None, None)
        );
        // The server's side: its own name; an unnamed client has no address.
        let server = Endpoints::new(unix(2, b"/tmp/app.sock"), unix(1, b""), false);
        let d = describe(Side::Server, &ex, server, &Routes::default());
        assert_eq!(get(&d, "server.address").as_deref(), Some("/tmp/app.sock"));
        assert_eq!(get(&d, "network.peer.address"), None);
        assert_eq!(get(&d, "client.address"), None);
    }

    fn attr(span: &Described, key: &str) -> Option<Value> {
        span.attributes.get(key)
    }

    /// A bare path is the whole target; a path cut from a longer target
    /// stops at its query. A request without a Host header names the
    /// server by its address.
    #[test]
    fn paths_and_server_addresses_come_from_the_request() {
        let ex = exchange("GET", "/users/7", Some(200));
        let d = describe(Side::Server, &ex, at(), &Routes::default());
        assert_eq!(attr(&d, "url.path").unwrap().as_str(), "/users/7");
        assert_eq!(attr(&d, "server.address").unwrap().as_str(), "shop.example");
        assert_eq!(attr(&d, "server.port"), Some(Value::I64(8080)));
        assert_eq!(attr(&d, "url.query"), None);

        let mut ex = exchange("GET", "/users/7?x=1", Some(200));
        Arc::make_mut(&mut ex.request).host = None;
        let d = describe(Side::Server, &ex, at(), &Routes::default());
        assert_eq!(attr(&d, "url.path").unwrap().as_str(), "/users/7");
        assert_eq!(attr(&d, "url.query").unwrap().as_str(), "x=REDACTED");
        assert_eq!(attr(&d, "server.address").unwrap().as_str(), "127.0.0.1");
        let d = describe(Side::Client, &ex, at(), &Routes::default());
        assert_eq!(
            attr(&d, "url.full").unwrap().as_str(),
            "http://127.0.0.1:50123/users/7?x=REDACTED"
        );
    }

    #[test]
    fn server_span_follows_the_conventions() {
        let routes = Routes::new(&["/users/{id}".into(), "/static/*".into()]);
        let span = describe(
            Side::Server,
            &exchange("GET", "/users/42?token=secret&x", Some(503)),
            at(),
            &routes,
        );
        assert_eq!(span.name, "GET /users/{id}");
        assert_eq!(attr(&span, "http.route").unwrap().as_str(), "/users/{id}");
        assert_eq!(attr(&span, "url.path").unwrap().as_str(), "/users/42");
        assert_eq!(
            attr(&span, "url.query").unwrap().as_str(),
            "token=REDACTED&x"
        );
        assert_eq!(
            attr(&span, "server.address").unwrap().as_str(),
            "shop.example"
        );
        assert_eq!(attr(&span, "server.port"), Some(Value::I64(8080)));
        assert_eq!(attr(&span, "client.address").unwrap().as_str(), "127.0.0.1");
        assert_eq!(attr(&span, "network.peer.port"), Some(Value::I64(50123)));
        assert_eq!(attr(&span, "error.type").unwrap().as_str(), "503");
        assert!(matches!(span.status, Status::Error { .. }));
        let ok = describe(
            Side::Server,
            &exchange("GET", "/x", Some(404)),
            at(),
            &routes,
        );
        assert_eq!(ok.name, "GET");
        assert_eq!(ok.status, Status::Unset);
        assert!(attr(&ok, "error.type").is_none());
        let nested = describe(
            Side::Server,
            &exchange("GET", "/static/a/b.css", Some(200)),
            at(),
            &routes,
        );
        assert_eq!(nested.name, "GET /static/*");
    }

    #[test]
    fn client_4xx_is_an_error_and_unknown_methods_are_other() {
        let span = describe(
            Side::Client,
            &exchange("GET", "/a?b=c", Some(404)),
            at(),
            &Routes::default(),
        );
        assert!(matches!(span.status, Status::Error { .. }));
        assert_eq!(
            attr(&span, "url.full").unwrap().as_str(),
            "http://shop.example:8080/a?b=REDACTED"
        );
        let other = describe(
            Side::Client,
            &exchange("PROPFIND", "/", Some(207)),
            at(),
            &Routes::default(),
        );
        assert_eq!(other.name, "HTTP");
        assert_eq!(
            attr(&other, "http.request.method").unwrap().as_str(),
            "_OTHER"
        );
        let none = describe(
            Side::Client,
            &exchange("GET", "/", None),
            at(),
            &Routes::default(),
        );
        assert_eq!(attr(&none, "error.type").unwrap().as_str(), "no_response");
    }

    #[test]
    fn query_redaction_and_target_edge_cases() {
        for (query, want) in [
            ("a=1", "a=REDACTED"),
            ("a", "a"),
            ("a=1&b&c=", "a=REDACTED&b&c=REDACTED"),
            ("&&a==b&", "&&a=REDACTED&"),
            ("=x", "=REDACTED"),
            ("k=\u{e9}t\u{e9}&\u{e9}=1", "k=REDACTED&\u{e9}=REDACTED"),
        ] {
            let got = redact_query(query);
            assert_eq!(got, want, "{query:?}");
            assert_eq!(got.capacity(), got.len(), "{query:?}");
        }
        // A URL in the query of an origin-form target is not an authority.
        assert_eq!(
            path_and_query("/r?to=http://x/y#f?g"),
            ("/r", Some("to=http://x/y"))
        );
        assert_eq!(path_and_query("a:b:/c?://d/e"), ("a:b:/c", Some("://d/e")));
        assert_eq!(path_and_query("http://h:80/p?q"), ("/p", Some("q")));
        assert_eq!(path_and_query("svn+ssh://h"), ("/", None));
        assert_eq!(path_and_query("1http://h/p"), ("1http://h/p", None));
        assert_eq!(path_and_query("/p?q#f"), ("/p", Some("q")));
        assert_eq!(path_and_query("/p:"), ("/p:", None));
        assert_eq!(path_and_query(""), ("", None));
        let url_full = |scheme, host, port, path, query| {
            let url = UrlFull {
                scheme,
                host,
                port,
                path,
                query,
            };
            let mut out = Vec::new();
            url.write(&mut out);
            assert_eq!(out.len(), url.len());
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            url_full("http", "::1", 8, "/p", Some("q=1")),
            "http://[::1]:8/p?q=REDACTED"
        );
        assert_eq!(url_full("https", "h", 65535, "", None), "https://h:65535");
        assert_eq!(url_full("http", "h", 0, "/", None), "http://h:0/");
        for port in [9, 10, 99, 100, 999, 1000, 9999, 10000] {
            assert_eq!(
                url_full("http", "h", port, "", None),
                format!("http://h:{port}")
            );
        }
        for ip in [
            "127.0.0.1",
            "0.0.0.0",
            "10.9.99.100",
            "255.255.255.255",
            "192.168.1.50",
            "::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(&*super::super::ip_text(ip), ip.to_string());
        }
        for o in 0..=255u8 {
            let ip = std::net::IpAddr::from([o, 255 - o, o / 3, o % 10]);
            assert_eq!(&*super::super::ip_text(ip), ip.to_string());
        }
    }

    #[test]
    fn targets_and_filters() {
        assert_eq!(path_and_query("http://h:1/p/q?x=1"), ("/p/q", Some("x=1")));
        assert_eq!(path_and_query("http://h"), ("/", None));
        assert_eq!(path_and_query("/a#frag"), ("/a", None));
        let filter = PathFilter::new(&["/health".into(), "/metrics*".into()]);
        assert!(filter.excludes("/health?full=1"));
        assert!(filter.excludes("/metrics/x"));
        assert!(!filter.excludes("/healthz"));
        assert!(Routes::new(&["/a/{b}".into()]).matching("/a/b/c").is_none());
    }
}
