//! TLS libraries: the plaintext of encrypted connections.
//!
//! An encrypted connection's socket carries only ciphertext, but the
//! process hands its plaintext to a TLS library and gets it back from one.
//! Probes on OpenSSL's `SSL_read`/`SSL_write` (and the `_ex` variants) give
//! that plaintext as data records of the connection, so the protocol
//! parsers, nesting and linking work on it unchanged (kernel side:
//! `agent-ebpf/src/tls.rs`). Where the library's code shows the four going
//! through two internal functions, those are probed instead: a cheaper
//! trap per call (`library::shared_entries`).
//!
//! Probes go on library *files*, once each: a shared `libssl.so.3` serves
//! every process that maps it, now or later; OpenSSL linked into an
//! executable (Node.js) is found by the functions that executable exports.
//! Files are found in the maps of each traced process, at start, at the
//! process's first traffic, and again whenever it maps new code (exec,
//! `dlopen` — Python's `ssl` module loads libssl only when imported).
//!
//! Where the version is known, the kernel also checks that the socket a
//! call used is the session's own ([`library::Version::layout`]).

pub mod follow;
mod library;

pub use follow::{ProcessTls, TlsChoice, TlsFollower, describe};
