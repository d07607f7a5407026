//! zerotrace: an eBPF zero-code tracing agent.
//!
//! The data flows kernel → capture → conn → protocol → trace → export:
//! [`kernel`] probes features and loads the programs, [`capture`] reads and
//! decodes their records, [`conn`] attributes them to connections,
//! [`protocol`] parses their bytes into request/response exchanges,
//! [`trace`] makes those spans with parents and attributes, and [`export`]
//! sends them on. [`pipeline`] wires the capture stages for the commands
//! in [`cli`]; [`config`] merges file, environment and flags; [`selftrace`]
//! reports on the agent's own work (spans, /health, /metrics).

pub mod capture;
pub mod cli;
pub mod config;
pub mod conn;
pub mod export;
pub mod kernel;
pub mod pipeline;
pub mod protocol;
pub mod runtime;
pub mod selftrace;
pub mod tls;
pub mod trace;

/// Maps keyed by ids the kernel or the system assigns (connection ids, pids,
/// tids), never by values from traffic: a fast hash with a per-process
/// random seed. Maps keyed by traffic (addresses, names, trace ids) keep the
/// standard DoS-resistant hasher.
pub type IdMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
