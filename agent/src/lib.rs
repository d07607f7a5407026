//! zerotrace: an eBPF zero-code tracing agent.
//!
//! The data flows kernel → capture → conn → (protocol → trace → export):
//! [`kernel`] probes features and loads the programs, [`capture`] reads and
//! decodes their records, [`conn`] attributes them to connections, and
//! [`pipeline`] wires those stages for the commands in [`cli`].

pub mod capture;
pub mod cli;
pub mod conn;
pub mod kernel;
pub mod pipeline;
pub mod protocol;
