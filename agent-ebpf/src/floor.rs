//! The attach floor: a program that does nothing, attached by the overhead
//! benchmark to the same tracepoints as the real ones, so the report can show
//! the kernel cost of tracing as a multiple of the bare cost of being called.
//! The agent never attaches it.

use aya_ebpf::{
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};

#[tracepoint]
pub fn floor(_ctx: TracePointContext) -> u32 {
    0
}

/// The same on the raw `sys_enter`/`sys_exit` tracepoints (every syscall,
/// no trace record built per hit): what that dispatch costs by comparison.
#[raw_tracepoint]
pub fn floor_raw(_ctx: RawTracePointContext) -> i32 {
    0
}
