//! Semantic conventions: what a finished exchange is called and which
//! attributes it carries, per the OpenTelemetry HTTP and database
//! conventions. Each protocol family describes its own spans; the tracer
//! adds ids, parents, times and resources.

use opentelemetry::KeyValue;

use crate::capture::Endpoint;

pub mod db;
pub mod http;

/// Whether the span describes the server or the client end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

/// The ends of the connection, from the traced process's view, and
/// whether it is encrypted (its bytes came from a TLS library).
#[derive(Debug, Clone, Copy)]
pub struct Endpoints<'a> {
    pub local: &'a Endpoint,
    pub remote: &'a Endpoint,
    pub tls: bool,
}

impl<'a> Endpoints<'a> {
    /// The server's end: the local one on the server side.
    pub fn server(&self, side: Side) -> &'a Endpoint {
        match side {
            Side::Server => self.local,
            Side::Client => self.remote,
        }
    }

    /// `network.transport`.
    pub fn transport(&self) -> &'static str {
        if self.local.is_unix() { "unix" } else { "tcp" }
    }

    /// `network.peer.address`: the peer's IP, or its unix socket's name
    /// when it has one (a client end usually has none).
    pub fn peer_address(&self) -> Option<String> {
        match self.remote {
            Endpoint::Inet(addr) => Some(addr.ip().to_string()),
            unix => unix.unix_name().map(str::to_owned),
        }
    }
}

/// A span's name, attributes and status, as a protocol describes it.
pub struct Described {
    pub name: String,
    pub attributes: Vec<KeyValue>,
    pub status: opentelemetry::trace::Status,
}
