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

/// `bytes` as text, invalid sequences replaced: borrowed when they are
/// valid UTF-8, as protocol text nearly always is. Checked first the fast
/// way (a word at a time); `String::from_utf8_lossy` walks even a valid
/// text byte by byte.
pub fn utf8_lossy(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    #[test]
    fn utf8_lossy_is_the_lossy_decoding_borrowed_when_valid() {
        for bytes in [
            &b""[..],
            b"SELECT 1",
            "GET cl\u{e9}".as_bytes(),
            b"GET \xff\xfekey",
            b"cut \xe2\x82",
            b"\xc3\x28 mixed \xf0\x9f\x92\x96",
        ] {
            let got = utf8_lossy(bytes);
            assert_eq!(got, String::from_utf8_lossy(bytes), "{bytes:?}");
            assert_eq!(
                matches!(got, Cow::Borrowed(_)),
                std::str::from_utf8(bytes).is_ok(),
                "{bytes:?}"
            );
        }
    }
}
