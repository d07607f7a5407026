//! The guest's initramfs: busybox, the release `zerotrace` binary with the
//! shared libraries it links, the guest check (tests/src/bin/vm_guest.rs)
//! and an /init that runs it and powers off. Written as a newc cpio archive
//! by hand: the format is a few lines, and no cpio tool is needed.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::say;
use crate::util::Ctx;

/// A newc ("070701") cpio archive, the format the kernel unpacks as initramfs.
struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
    files: usize,
}

impl Cpio {
    fn new() -> Self {
        Self {
            out: Vec::new(),
            ino: 0,
            dirs: BTreeSet::new(),
            files: 0,
        }
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            u32::try_from(data.len()).expect("initramfs member under 4 GiB"),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).expect("short name"),
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    /// `path` (absolute or not) and its parents, once each.
    fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.dirs.insert(path.to_string());
        self.entry(path, 0o040755, &[], (0, 0));
    }

    fn parent(&mut self, path: &str) -> String {
        let path = path.trim_start_matches('/').to_string();
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        path
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        let path = self.parent(path);
        self.files += 1;
        self.entry(&path, 0o100000 | mode, data, (0, 0));
    }

    fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        let path = self.parent(path);
        self.entry(&path, 0o020000 | mode, &[], (major, minor));
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        while !self.out.len().is_multiple_of(512) {
            self.out.push(0);
        }
        self.out
    }
}

/// Absolute paths of the shared objects in `ldd` output, the dynamic loader
/// included (the vDSO is not a file).
fn ldd_paths(ldd: &str) -> Vec<String> {
    ldd.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line,
            };
            let path = path.split(" (").next().unwrap_or("").trim();
            path.starts_with('/').then(|| path.to_string())
        })
        .collect()
}

/// What `ldd binary` prints (nothing for a static binary).
pub fn ldd(ctx: &Ctx, binary: &Path) -> Result<String> {
    // A static binary makes ldd exit non-zero ("not a dynamic executable").
    let out = ctx
        .cmd("ldd")
        .arg(binary)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run ldd {}", binary.display()))?;
    if !out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("not a dynamic") {
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn shared_libraries(ctx: &Ctx, binary: &Path) -> Result<Vec<String>> {
    Ok(ldd_paths(&ldd(ctx, binary)?))
}

/// The guest's /init: mounts, loopback, the check, power off. The kernel
/// hands unknown `name=value` parameters of its command line to init as
/// environment variables: `ztcells=fentry/ringbuf,…` (the cells and their
/// order) arrives as `$ztcells`, so one initramfs serves every boot.
fn init_script() -> &'static str {
    r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t bpf bpf /sys/fs/bpf
mount -t tmpfs tmpfs /tmp
ip link set lo up
echo "ZT-VMTEST boot kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime) cpus=$(nproc)"
/bin/vm_guest ${ztcells:+--cells "$ztcells"}
echo "ZT-VMTEST guest-exit status=$? uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
echo o > /proc/sysrq-trigger
"#
}

pub fn build_initramfs(
    ctx: &Ctx,
    busybox: &Path,
    agent: &Path,
    guest: &Path,
    dest: &Path,
) -> Result<()> {
    let started = Instant::now();
    say!("vm-test", "building the initramfs…");
    let mut cpio = Cpio::new();
    for d in ["bin", "dev", "proc", "sys", "tmp", "run", "etc", "root"] {
        cpio.dir(d);
    }
    // The kernel opens /dev/console for init's stdio before /init runs.
    cpio.char_dev("/dev/console", 0o600, 5, 1);
    cpio.char_dev("/dev/null", 0o666, 1, 3);
    let read = |p: &Path| fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    cpio.file("/bin/busybox", 0o755, &read(busybox)?);
    cpio.file("/bin/zerotrace", 0o755, &read(agent)?);
    cpio.file("/bin/vm_guest", 0o755, &read(guest)?);
    let mut libs = BTreeSet::new();
    for binary in [agent, guest] {
        libs.extend(shared_libraries(ctx, binary)?);
    }
    // Each at the absolute path the binaries ask for (the loader's is baked
    // into them), with the symlinks resolved into regular files.
    for lib in &libs {
        cpio.file(lib, 0o755, &read(Path::new(lib))?);
    }
    cpio.file("/init", 0o755, init_script().as_bytes());
    cpio.file("/etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    let files = cpio.files;
    let bytes = cpio.finish();
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    fs::write(dest, &bytes).with_context(|| format!("cannot write {}", dest.display()))?;
    say!(
        "vm-test",
        "initramfs: {files} files ({}), {:.1} MiB in {:.1}s → {}",
        libs.iter().cloned().collect::<Vec<_>>().join(" "),
        bytes.len() as f64 / 1048576.0,
        started.elapsed().as_secs_f64(),
        ctx.rel(dest)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ldd_output() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            ldd_paths(ldd),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
        assert!(ldd_paths("\tstatically linked\n").is_empty());
    }

    #[test]
    fn writes_newc_cpio() {
        let mut c = Cpio::new();
        c.file("/a/b/f", 0o644, b"hello");
        let bytes = c.finish();
        assert_eq!(bytes.len() % 512, 0);
        let text = String::from_utf8_lossy(&bytes);
        // Parents first, each once, then the file, then the trailer.
        let a = text.find("a\0").unwrap();
        let ab = text.find("a/b\0").unwrap();
        let f = text.find("a/b/f\0").unwrap();
        let t = text.find("TRAILER!!!\0").unwrap();
        assert!(a < ab && ab < f && f < t);
        assert_eq!(text.matches("070701").count(), 4);
        // The file's header: mode 0100644, size 5, name size 6 ("a/b/f\0").
        let h = &text[f - 110..f];
        assert!(h.starts_with("070701"));
        assert_eq!(&h[14..22], "000081A4");
        assert_eq!(&h[54..62], "00000005");
        assert_eq!(&h[94..102], "00000006");
        // 110-byte header + 6-byte name is already 4-aligned: the data follows.
        assert_eq!(&bytes[f + 6..f + 6 + 5], b"hello");
    }
}
