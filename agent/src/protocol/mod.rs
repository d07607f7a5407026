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
