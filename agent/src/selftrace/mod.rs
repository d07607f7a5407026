//! The agent's own telemetry: startup and interval spans about its work
//! (service.name `zerotrace`), and the /health, /ready, /metrics endpoints.

pub mod endpoints;
pub mod interval;
mod spans;
pub mod startup;

pub use spans::SelfSpans;
