//! HTTP exchanges as spans: names, attributes and statuses per the
//! OpenTelemetry HTTP semantic conventions.

use std::{borrow::Cow, sync::Arc};

use opentelemetry::{KeyValue, StringValue, Value, trace::Status};

use super::{Described, Endpoints, Side};
use crate::{
    capture::Endpoint,
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
    const REDACTED: &str = "=REDACTED";
    // Two byte loops, one to size the text and one to write it: queries are
    // short, and splitting them into pairs cost a search per separator. The
    // exact length lets the text be built in one allocation that the
    // attribute keeps as it is (a spare capacity would be shrunk, a copy).
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
    let mut out = String::with_capacity(len);
    let mut key = 0;
    in_value = false;
    for (i, &c) in query.as_bytes().iter().enumerate() {
        match c {
            b'&' => {
                if !in_value {
                    out.push_str(&query[key..i]);
                }
                out.push('&');
                in_value = false;
                key = i + 1;
            }
            b'=' if !in_value => {
                out.push_str(&query[key..i]);
                out.push_str(REDACTED);
                in_value = true;
            }
            _ => {}
        }
    }
    if !in_value {
        out.push_str(&query[key..]);
    }
    out
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
    let mut attrs = Vec::with_capacity(16);
    let method = method(request, &mut attrs);
    let scheme = if at.tls { "https" } else { "http" };
    let server = at.server(side);
    let (host, port) = authority(request, server, scheme);
    let peer = at.peer.clone();
    attrs.push(KeyValue::new("url.scheme", scheme));
    attrs.push(KeyValue::new("network.protocol.version", request.version));
    attrs.push(KeyValue::new("network.transport", at.transport()));
    if let Some(peer) = &peer {
        attrs.push(KeyValue::new("network.peer.address", peer.clone()));
    }
    if let Some(port) = at.remote.port() {
        attrs.push(KeyValue::new("network.peer.port", i64::from(port)));
    }
    let query = query.filter(|q| !q.is_empty()).map(redact_query);
    let url_full = match side {
        Side::Server => None,
        Side::Client => Some(url_full(
            scheme,
            host.as_str(),
            port,
            path,
            query.as_deref(),
        )),
    };
    match server {
        Endpoint::Inet(_) => {
            attrs.push(KeyValue::new("server.address", host));
            attrs.push(KeyValue::new("server.port", i64::from(port)));
        }
        // Over a unix socket the server is the socket, whatever the Host
        // header says (it is usually `localhost`).
        Endpoint::Unix(_) => {
            let address = server
                .unix_name()
                .map_or(host, |name| StringValue::from(name.to_owned()));
            attrs.push(KeyValue::new("server.address", address));
        }
    }
    let mut route = None;
    match side {
        Side::Server => {
            // A bare path (the usual origin-form target) is the target itself.
            let url_path = if std::ptr::eq(path, &*request.target) {
                Value::from(Arc::clone(&request.target))
            } else {
                Value::from(path.to_owned())
            };
            attrs.push(KeyValue::new("url.path", url_path));
            if let Some(q) = query {
                attrs.push(KeyValue::new("url.query", q));
            }
            if let Some(peer) = peer {
                attrs.push(KeyValue::new("client.address", peer));
            }
            route = routes.matching(path);
            if let Some(route) = route {
                attrs.push(KeyValue::new("http.route", route.to_owned()));
            }
        }
        Side::Client => {
            if let Some(url) = url_full {
                attrs.push(KeyValue::new("url.full", url));
            }
        }
    }
    if let Some(agent) = &request.user_agent {
        attrs.push(KeyValue::new(
            "user_agent.original",
            Value::from(Arc::clone(agent)),
        ));
    }
    if request.body_bytes > 0 {
        attrs.push(KeyValue::new(
            "http.request.body.size",
            request.body_bytes as i64,
        ));
    }
    let mut status = Status::Unset;
    match &exchange.response {
        Some(response) => {
            attrs.push(KeyValue::new(
                "http.response.status_code",
                i64::from(response.status),
            ));
            if response.body_bytes > 0 {
                attrs.push(KeyValue::new(
                    "http.response.body.size",
                    response.body_bytes as i64,
                ));
            }
            let error = match side {
                Side::Server => response.status >= 500,
                Side::Client => response.status >= 400,
            };
            if error {
                attrs.push(KeyValue::new("error.type", response.status.to_string()));
                status = Status::error("");
            }
        }
        // The response went by in what the capture did not see: most
        // likely answered, so no error is claimed, only that it is unknown.
        None if exchange.response_lost.is_some() => {
            attrs.push(KeyValue::new("zerotrace.response.lost", true));
        }
        None => {
            // The connection closed before a response.
            attrs.push(KeyValue::new("error.type", "no_response"));
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

/// `scheme://host:port/path?query`, IPv6 hosts in brackets, built in one
/// allocation of the exact size.
fn url_full(scheme: &str, host: &str, port: u16, path: &str, query: Option<&str>) -> String {
    let bracket = host.contains(':');
    let mut digits = [0u8; 5];
    let mut n = digits.len();
    let mut p = port;
    loop {
        n -= 1;
        digits[n] = b'0' + (p % 10) as u8;
        p /= 10;
        if p == 0 {
            break;
        }
    }
    // ASCII digits.
    let port = std::str::from_utf8(&digits[n..]).unwrap_or("0");
    let len = scheme.len()
        + "://".len()
        + host.len()
        + if bracket { 2 } else { 0 }
        + 1
        + port.len()
        + path.len()
        + query.map_or(0, |q| 1 + q.len());
    let mut url = String::with_capacity(len);
    url.push_str(scheme);
    url.push_str("://");
    if bracket {
        url.push('[');
        url.push_str(host);
        url.push(']');
    } else {
        url.push_str(host);
    }
    url.push(':');
    url.push_str(port);
    url.push_str(path);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    url
}

/// Adds the method attributes; returns the name to use in the span name.
fn method(request: &Request, attrs: &mut Vec<KeyValue>) -> &'static str {
    if let Some(known) = KNOWN_METHODS.iter().find(|m| **m == request.method) {
        attrs.push(KeyValue::new("http.request.method", *known));
        known
    } else {
        attrs.push(KeyValue::new("http.request.method", "_OTHER"));
        attrs.push(KeyValue::new(
            "http.request.method_original",
            request.method.to_string(),
        ));
        "HTTP"
    }
}

/// `server.address` and `server.port`: from the Host header when there is
/// one (its name shared, not copied), else the server end's address
/// (`localhost` and the scheme's port for a unix socket).
fn authority(request: &Request, server: &Endpoint, scheme: &str) -> (StringValue, u16) {
    let server_port = match server {
        Endpoint::Inet(addr) => addr.port(),
        Endpoint::Unix(_) if scheme == "https" => 443,
        Endpoint::Unix(_) => 80,
    };
    match &request.host {
        Some(host) => (
            StringValue::from(Arc::clone(&host.name)),
            host.port.unwrap_or(server_port),
        ),
        // Formatted only without a Host header: most requests have one.
        None => {
            let server_host = match server {
                Endpoint::Inet(addr) => StringValue::from(addr.ip().to_string()),
                Endpoint::Unix(_) => StringValue::from("localhost"),
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

    fn attr<'a>(span: &'a Described, key: &str) -> Option<&'a Value> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    /// `url.path` of a bare path and `server.address` from a Host header
    /// are the request's own text, not copies; a path cut from a longer
    /// target is its own, and right.
    #[test]
    fn bare_paths_and_host_names_are_shared_not_copied() {
        let shared = |v: Option<&Value>, text: &Arc<str>| match v {
            Some(Value::String(s)) => std::ptr::eq(s.as_str(), &**text),
            _ => false,
        };
        let ex = exchange("GET", "/users/7", Some(200));
        let d = describe(Side::Server, &ex, at(), &Routes::default());
        assert!(shared(attr(&d, "url.path"), &ex.request.target));
        let host = &ex.request.host.as_ref().unwrap().name;
        assert!(shared(attr(&d, "server.address"), host));
        assert_eq!(attr(&d, "server.address").unwrap().as_str(), "shop.example");
        assert_eq!(attr(&d, "server.port"), Some(&Value::I64(8080)));

        let ex = exchange("GET", "/users/7?x=1", Some(200));
        let d = describe(Side::Server, &ex, at(), &Routes::default());
        assert!(!shared(attr(&d, "url.path"), &ex.request.target));
        assert_eq!(attr(&d, "url.path").unwrap().as_str(), "/users/7");
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
        assert_eq!(attr(&span, "server.port"), Some(&Value::I64(8080)));
        assert_eq!(attr(&span, "client.address").unwrap().as_str(), "127.0.0.1");
        assert_eq!(attr(&span, "network.peer.port"), Some(&Value::I64(50123)));
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
        let url = url_full("http", "::1", 8, "/p", Some("q"));
        assert_eq!(url, "http://[::1]:8/p?q");
        assert_eq!(url.capacity(), url.len());
        assert_eq!(url_full("https", "h", 65535, "", None), "https://h:65535");
        assert_eq!(url_full("http", "h", 0, "/", None), "http://h:0/");
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
