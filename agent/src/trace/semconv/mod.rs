//! Semantic conventions: what a finished exchange is called and which
//! attributes it carries, per the OpenTelemetry HTTP and database
//! conventions. Each protocol family describes its own spans; the tracer
//! adds ids, parents, times and resources.

use std::net::SocketAddr;

use opentelemetry::KeyValue;

pub mod db;
pub mod http;

/// Whether the span describes the server or the client end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

/// The addresses of the connection, from the traced process's view, and
/// whether it is encrypted (its bytes came from a TLS library).
#[derive(Debug, Clone, Copy)]
pub struct Endpoints {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub tls: bool,
}

/// A span's name, attributes and status, as a protocol describes it.
pub struct Described {
    pub name: String,
    pub attributes: Vec<KeyValue>,
    pub status: opentelemetry::trace::Status,
}
