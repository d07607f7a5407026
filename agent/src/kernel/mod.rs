//! Kernel side, seen from userspace: feature probing, BTF offsets, loading
//! the eBPF object and attaching its programs.

pub mod btf;
pub mod features;
pub mod kfunc;
pub mod loader;
pub mod offsets;
pub mod tracefs;
pub mod uprobe_site;
