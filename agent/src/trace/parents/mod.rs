//! Parents: where each span hangs in its trace.
//!
//! - [`context`]: the W3C trace context a request carries itself, the ids
//!   the agent makes, and the sampler;
//! - [`link`]: the two ends of one local TCP connection (client span →
//!   server span);
//! - [`held`]: server spans that ended before their client end was seen,
//!   held a moment for it;
//! - [`runtime`]: which server request a client call was made for, from
//!   what the process's runtime ran at that moment;
//! - [`event_loop`]: the same for event loops without a runtime to follow
//!   (nginx), from what the loop did on the thread and what it forwarded.

pub mod context;
pub mod event_loop;
pub mod held;
pub mod link;
pub mod runtime;
