//! Parents: where each span hangs in its trace.
//!
//! - [`context`]: the W3C trace context a request carries itself, the ids
//!   the agent makes, and the sampler;
//! - [`link`]: the two ends of one local TCP connection (client span →
//!   server span);
//! - [`runtime`]: which server request a client call was made for, from
//!   what the process's runtime ran at that moment.

pub mod context;
pub mod link;
pub mod runtime;
