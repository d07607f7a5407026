//! The attach floor: a program that does nothing, attached by the overhead
//! benchmark to the same tracepoints as the real ones, so the report can show
//! the kernel cost of tracing as a multiple of the bare cost of being called.
//! The agent never attaches it.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};

#[tracepoint]
pub fn floor(_ctx: TracePointContext) -> u32 {
    0
}
