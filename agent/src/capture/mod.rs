//! Capture: reading the kernel's records off the transport and decoding them.

pub mod endpoint;
pub mod event;
pub mod reader;
mod ring;

pub use endpoint::{EndId, Endpoint, UnixEnd};
pub use event::{Data, DecodeError, Event, Lost, Mapped, Open, decode, dev_number};
pub use reader::{Reader, ReaderStats};

/// Now on the clock the kernel stamps records with (CLOCK_MONOTONIC, what
/// `bpf_ktime_get_ns` reads).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}
