//! Database calls as spans, per the OpenTelemetry database semantic
//! conventions (PostgreSQL, MySQL/MariaDB, Redis).

use std::borrow::Cow;

use opentelemetry::trace::Status;

use super::{ATTRIBUTE_BYTES, Described, Endpoints, IpText, Side};
use crate::{capture::Endpoint, export::Attributes, protocol::db::DbCall};

/// Name, attributes and status of one call; `system` is db.system.name.
pub fn describe(system: &'static str, side: Side, call: &DbCall, at: Endpoints<'_>) -> Described {
    let name = span_name(system, call);
    let mut attrs = Attributes::with_capacity(ATTRIBUTE_BYTES);
    attrs.str("db.system.name", system);
    match at.server(side) {
        // A client's server is its peer, whose address is formatted already.
        Endpoint::Inet(server) => {
            match (side, &at.peer) {
                (Side::Client, Some(peer)) => attrs.str("server.address", peer),
                _ => attrs.str("server.address", IpText::of(server.ip()).as_str()),
            }
            attrs.int("server.port", i64::from(server.port()));
        }
        // A unix socket: its path (or @abstract name), without a port.
        unix => {
            if let Some(name) = unix.unix_name() {
                attrs.str("server.address", name);
            }
        }
    }
    attrs.str("network.transport", at.transport());
    if let Some(peer) = &at.peer {
        attrs.str("network.peer.address", peer);
    }
    if let Some(port) = at.remote.port() {
        attrs.int("network.peer.port", i64::from(port));
    }
    if let Some(operation) = &call.operation {
        attrs.str("db.operation.name", operation);
    }
    if let Some(namespace) = &call.namespace {
        attrs.str("db.namespace", namespace);
    }
    for (key, value) in [
        ("db.collection.name", &call.collection),
        ("db.query.text", &call.query_text),
        ("db.response.status_code", &call.status_code),
    ] {
        if let Some(v) = value {
            attrs.str(key, v);
        }
    }
    let status = if call.unanswered {
        attrs.str("error.type", "no_response");
        Status::error("no response before the connection closed")
    } else if call.error {
        attrs.str(
            "error.type",
            call.status_code.as_deref().unwrap_or("_OTHER"),
        );
        Status::error("")
    } else {
        Status::Unset
    };
    Described {
        name,
        attributes: attrs,
        status,
    }
}

/// `{operation} {collection}`, else `{operation}`, else `{namespace}`,
/// else the system, as the conventions fall back.
fn span_name(system: &'static str, call: &DbCall) -> Cow<'static, str> {
    match (&call.operation, &call.collection, &call.namespace) {
        (Some(op), Some(coll), _) => Cow::Owned(format!("{op} {coll}")),
        (Some(op), None, _) => op.clone(),
        (None, Some(coll), _) => Cow::Owned(coll.clone()),
        (None, None, Some(ns)) => Cow::Owned(ns.to_string()),
        (None, None, None) => Cow::Borrowed(system),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> Endpoints<'static> {
        let end = |s: &str| &*Box::leak(Box::new(Endpoint::Inet(s.parse().unwrap())));
        Endpoints::new(end("127.0.0.1:40000"), end("127.0.0.1:5432"), false)
    }

    #[test]
    fn unix_socket_calls_name_the_socket() {
        use crate::capture::{UnixEnd, endpoint::unix_name};
        let unix = |sk, name: &[u8]| {
            &*Box::leak(Box::new(Endpoint::Unix(UnixEnd {
                sk,
                ino: sk,
                name: unix_name(name),
            })))
        };
        let at = Endpoints::new(
            unix(1, b""),
            unix(2, b"/run/postgresql/.s.PGSQL.5432"),
            false,
        );
        let d = describe("postgresql", Side::Client, &DbCall::default(), at);
        let get = |k: &str| {
            d.attributes
                .iter()
                .find(|kv| kv.key.as_str() == k)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(get("network.transport").as_deref(), Some("unix"));
        assert_eq!(
            get("server.address").as_deref(),
            Some("/run/postgresql/.s.PGSQL.5432")
        );
        assert_eq!(get("network.peer.address"), get("server.address"));
        assert_eq!((get("server.port"), get("network.peer.port")), (None, None));
    }

    fn attr(d: &Described, key: &str) -> Option<String> {
        d.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    }

    #[test]
    fn names_attributes_and_errors() {
        let call = DbCall {
            operation: Some("SELECT".into()),
            collection: Some("models".into()),
            namespace: Some("zt".into()),
            query_text: Some("SELECT * FROM models WHERE id = ?".into()),
            ..Default::default()
        };
        let d = describe("postgresql", Side::Client, &call, at());
        assert_eq!(d.name, "SELECT models");
        assert_eq!(attr(&d, "db.system.name").as_deref(), Some("postgresql"));
        assert_eq!(attr(&d, "server.port").as_deref(), Some("5432"));
        assert_eq!(attr(&d, "db.namespace").as_deref(), Some("zt"));
        assert_eq!(d.status, Status::Unset);
        let failed = DbCall {
            operation: Some("SELECT".into()),
            status_code: Some("42P01".into()),
            error: true,
            ..Default::default()
        };
        let d = describe("postgresql", Side::Client, &failed, at());
        assert_eq!(d.name, "SELECT");
        assert_eq!(attr(&d, "error.type").as_deref(), Some("42P01"));
        assert!(matches!(d.status, Status::Error { .. }));
        let bare = describe("redis", Side::Server, &DbCall::default(), at());
        assert_eq!(bare.name, "redis");
        assert_eq!(attr(&bare, "server.port").as_deref(), Some("40000"));
        // A server names its own address, v4 or v6.
        assert_eq!(attr(&bare, "server.address").as_deref(), Some("127.0.0.1"));
        let end = |s: &str| &*Box::leak(Box::new(Endpoint::Inet(s.parse().unwrap())));
        let v6 = Endpoints::new(end("[fd00::1:2]:6379"), end("[fd00::9]:50000"), false);
        let d = describe("redis", Side::Server, &DbCall::default(), v6);
        assert_eq!(attr(&d, "server.address").as_deref(), Some("fd00::1:2"));
    }
}
