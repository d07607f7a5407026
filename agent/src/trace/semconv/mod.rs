//! Semantic conventions: what a finished exchange is called and which
//! attributes it carries, per the OpenTelemetry HTTP and database
//! conventions. Each protocol family describes its own spans; the tracer
//! adds ids, parents, times and resources.

use std::{borrow::Cow, net::IpAddr, sync::Arc};

use crate::{capture::Endpoint, export::Attributes};

pub mod db;
pub mod http;

/// Whether the span describes the server or the client end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

/// The ends of the connection, from the traced process's view, whether it
/// is encrypted (its bytes came from a TLS library), and the peer's address
/// as an attribute value (formatted once per connection by the tracer).
#[derive(Debug, Clone)]
pub struct Endpoints<'a> {
    pub local: &'a Endpoint,
    pub remote: &'a Endpoint,
    pub tls: bool,
    /// `network.peer.address`: see [`peer_address`].
    pub peer: Option<Arc<str>>,
}

impl<'a> Endpoints<'a> {
    /// Formats the peer's address; the tracer passes its cached one instead.
    pub fn new(local: &'a Endpoint, remote: &'a Endpoint, tls: bool) -> Self {
        Self {
            local,
            remote,
            tls,
            peer: peer_address(remote),
        }
    }

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
}

/// `network.peer.address`: the peer's IP, or its unix socket's name when it
/// has one (a client end usually has none). Reference-counted, so the
/// spans of a connection share one copy.
pub fn peer_address(remote: &Endpoint) -> Option<Arc<str>> {
    match remote {
        Endpoint::Inet(addr) => Some(ip_text(addr.ip())),
        unix => unix.unix_name().map(Arc::<str>::from),
    }
}

/// The text form of an address, formatted on the stack and stored once.
pub fn ip_text(ip: IpAddr) -> Arc<str> {
    Arc::from(IpText::of(ip).as_str())
}

/// The text form of an address, on the stack: for an attribute written
/// once, which a stored copy would only allocate and free. IPv4, the usual
/// case, digit by digit: the formatting machinery took more than a
/// keep-alive request's parsing, once per connection.
pub struct IpText {
    // The longest form, "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255", has 45 bytes.
    buf: [u8; 64],
    len: usize,
}

impl IpText {
    pub fn of(ip: IpAddr) -> Self {
        use std::io::Write;
        let mut text = Self {
            buf: [0; 64],
            len: 0,
        };
        if let IpAddr::V4(v4) = ip {
            let (buf, len) = (&mut text.buf, &mut text.len);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[*len] = b'.';
                    *len += 1;
                }
                if octet >= 100 {
                    buf[*len] = b'0' + octet / 100;
                    *len += 1;
                }
                if octet >= 10 {
                    buf[*len] = b'0' + octet / 10 % 10;
                    *len += 1;
                }
                buf[*len] = b'0' + octet % 10;
                *len += 1;
            }
            return text;
        }
        let mut rest = &mut text.buf[..];
        // Cannot fail: the buffer holds the longest form.
        let _ = write!(rest, "{ip}");
        text.len = 64 - rest.len();
        text
    }

    pub fn as_str(&self) -> &str {
        // ASCII digits, dots, colons and hex letters.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("0.0.0.0")
    }
}

/// Room for a span's attributes, encoded: an HTTP server span's take 400
/// to 700 bytes, and growing the buffer would copy them.
pub const ATTRIBUTE_BYTES: usize = 1024;

/// A span's name, attributes and status, as a protocol describes it.
pub struct Described {
    /// Borrowed when it is a constant (an HTTP method, a DB system).
    pub name: Cow<'static, str>,
    pub attributes: Attributes,
    pub status: opentelemetry::trace::Status,
}
