//! Kernel struct offsets for the programs, read from BTF and tracefs.

use std::path::Path;

use agent_common::KernelOffsets;
use anyhow::Context;

use super::{btf::Btf, tracefs};

/// Resolves every offset the kernel programs need on the running kernel.
pub fn resolve(btf: &Btf, tracefs: &Path) -> anyhow::Result<KernelOffsets> {
    let m = |s: &str, f: &str| {
        btf.member_offset(s, f)
            .with_context(|| format!("kernel BTF lacks {s}.{f}"))
    };
    Ok(KernelOffsets {
        task_files: m("task_struct", "files")?,
        files_fdt: m("files_struct", "fdt")?,
        fdtable_max_fds: m("fdtable", "max_fds")?,
        fdtable_fd: m("fdtable", "fd")?,
        file_inode: m("file", "f_inode")?,
        file_private_data: m("file", "private_data")?,
        inode_mode: m("inode", "i_mode")?,
        inode_ino: m("inode", "i_ino")?,
        inode_sb: m("inode", "i_sb")?,
        sb_dev: m("super_block", "s_dev")?,
        socket_type: m("socket", "type")?,
        socket_sk: m("socket", "sk")?,
        // struct sock starts with struct sock_common (__sk_common).
        sk_family: m("sock_common", "skc_family")?,
        sk_num: m("sock_common", "skc_num")?,
        sk_dport: m("sock_common", "skc_dport")?,
        sk_daddr: m("sock_common", "skc_daddr")?,
        sk_rcv_saddr: m("sock_common", "skc_rcv_saddr")?,
        sk_v6_daddr: m("sock_common", "skc_v6_daddr")?,
        sk_v6_rcv_saddr: m("sock_common", "skc_v6_rcv_saddr")?,
        fork_child_pid: tracefs::field_offset(tracefs, "sched", "sched_process_fork", "child_pid")?,
        task_fsbase: m("task_struct", "thread")? + m("thread_struct", "fsbase")?,
        ..unix_offsets(btf)
    })
}

/// Offsets of the unix socket structs, or zeros — which leave unix sockets
/// uncaptured — where the kernel's BTF lacks them (unix sockets built as a
/// module carry their types in the module's BTF).
fn unix_offsets(btf: &Btf) -> KernelOffsets {
    let m = |s: &str, f: &str| btf.member_offset(s, f);
    let found = (|| {
        Ok::<_, super::btf::BtfError>(KernelOffsets {
            unix_addr: m("unix_sock", "addr")?,
            unix_peer: m("unix_sock", "peer")?,
            unix_address_len: m("unix_address", "len")?,
            unix_address_name: m("unix_address", "name")?,
            sk_socket: m("sock", "sk_socket")?,
            socket_alloc_inode: m("socket_alloc", "vfs_inode")?,
            ..KernelOffsets::default()
        })
    })();
    found.unwrap_or_else(|e| {
        log::warn!("unix sockets not captured: the kernel's BTF lacks their layout ({e})");
        KernelOffsets::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_on_this_kernel() {
        let (Ok(btf), Some(tracefs)) = (Btf::from_sys_fs(), tracefs::find()) else {
            eprintln!("skipped: no BTF or tracefs here");
            return;
        };
        let o = resolve(&btf, &tracefs).unwrap();
        assert_eq!(
            o.sk_family, 16,
            "skc_family sits after two 4-byte addrs and hash"
        );
        assert!(o.sk_v6_daddr > o.sk_daddr);
        assert!(o.fork_child_pid > 8);
        assert!(o.unix_peer > o.unix_addr && o.unix_address_name > o.unix_address_len);
    }
}
