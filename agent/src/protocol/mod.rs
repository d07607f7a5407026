//! Application protocols: pure parsers over a connection's byte streams.
//! Each turns the bytes of both directions into request/response
//! exchanges; none ever panics on bad input.

pub mod db;
pub mod http;
pub mod mysql;
pub mod postgres;
pub mod redis;
#[cfg(test)]
mod replay;
pub mod session;
pub mod sql;

/// Whether `bytes` begin with a TLS record header: content type
/// change_cipher_spec, alert, handshake or application_data, version 3.x
/// (SSL 3.0 to TLS 1.3 records all say 3.1–3.3, some hellos 3.0), and a
/// length a record may have (at most 2^14 + 2048).
pub fn is_tls_record(bytes: &[u8]) -> bool {
    match bytes {
        [content, 3, minor, hi, lo, ..] => {
            (20..=23).contains(content)
                && *minor <= 4
                && u16::from_be_bytes([*hi, *lo]) <= (1 << 14) + 2048
                && u16::from_be_bytes([*hi, *lo]) > 0
        }
        _ => false,
    }
}
