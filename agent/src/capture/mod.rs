//! Capture: reading the kernel's records off the transport and decoding them.

pub mod endpoint;
pub mod event;
pub mod reader;

pub use endpoint::{EndId, Endpoint, UnixEnd};
pub use event::{Data, DecodeError, Event, Open, decode};
pub use reader::{Reader, ReaderStats};
