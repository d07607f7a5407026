//! Just enough ELF64 (little-endian) to tell a static executable from a
//! dynamic one, and to find the eBPF object embedded in the agent.
//!
//! Static means: no `PT_INTERP` program header (nothing asks the kernel to
//! start a dynamic loader) and no `DT_NEEDED` entry (no shared library is
//! required). A static-pie binary still has a `PT_DYNAMIC` segment, for its
//! own relocations, but no `DT_NEEDED` in it.

use anyhow::{Context, Result, bail};

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const ET_DYN: u16 = 3;
/// `e_machine` of eBPF objects.
const EM_BPF: u16 = 247;

/// How an executable is linked.
#[derive(Debug, PartialEq, Eq)]
pub struct Linkage {
    /// `PT_INTERP`: the dynamic loader the kernel would start.
    pub interpreter: Option<String>,
    /// `DT_NEEDED`: shared libraries the loader would have to find.
    pub needed: Vec<String>,
    /// `ET_DYN`: position-independent (static-pie when also static).
    pub pie: bool,
}

impl Linkage {
    pub fn is_static(&self) -> bool {
        self.interpreter.is_none() && self.needed.is_empty()
    }

    /// One line for progress output.
    pub fn describe(&self) -> String {
        if self.is_static() {
            let kind = if self.pie { "static-pie" } else { "static" };
            return format!("{kind}: no PT_INTERP, no DT_NEEDED");
        }
        let mut parts = Vec::new();
        if let Some(interp) = &self.interpreter {
            parts.push(format!("PT_INTERP {interp}"));
        }
        if !self.needed.is_empty() {
            parts.push(format!("DT_NEEDED {}", self.needed.join(", ")));
        }
        format!("dynamic: {}", parts.join("; "))
    }
}

fn bytes(data: &[u8], at: u64, len: u64) -> Result<&[u8]> {
    let start = usize::try_from(at)?;
    let end = start
        .checked_add(usize::try_from(len)?)
        .context("offset overflow")?;
    data.get(start..end)
        .with_context(|| format!("truncated ELF: {len} bytes at {at} past the end"))
}

fn u16_at(data: &[u8], at: u64) -> Result<u16> {
    Ok(u16::from_le_bytes(bytes(data, at, 2)?.try_into()?))
}

fn u32_at(data: &[u8], at: u64) -> Result<u32> {
    Ok(u32::from_le_bytes(bytes(data, at, 4)?.try_into()?))
}

fn u64_at(data: &[u8], at: u64) -> Result<u64> {
    Ok(u64::from_le_bytes(bytes(data, at, 8)?.try_into()?))
}

fn is_elf64_le(data: &[u8]) -> bool {
    data.starts_with(b"\x7fELF\x02\x01")
}

struct Segment {
    kind: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

/// Reads the program headers and the dynamic section of an executable.
pub fn linkage(data: &[u8]) -> Result<Linkage> {
    if !is_elf64_le(data) {
        bail!("not a 64-bit little-endian ELF file");
    }
    let pie = u16_at(data, 16)? == ET_DYN;
    let phoff = u64_at(data, 32)?;
    let phentsize = u64::from(u16_at(data, 54)?);
    let phnum = u64::from(u16_at(data, 56)?);
    let mut segments = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        segments.push(Segment {
            kind: u32_at(data, ph)?,
            offset: u64_at(data, ph + 8)?,
            vaddr: u64_at(data, ph + 16)?,
            filesz: u64_at(data, ph + 32)?,
        });
    }
    let interpreter = match segments.iter().find(|s| s.kind == PT_INTERP) {
        Some(s) => {
            let raw = bytes(data, s.offset, s.filesz)?;
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            Some(String::from_utf8_lossy(&raw[..end]).into_owned())
        }
        None => None,
    };
    let mut needed_offsets = Vec::new();
    let mut strtab = None;
    if let Some(dynamic) = segments.iter().find(|s| s.kind == PT_DYNAMIC) {
        for i in 0..dynamic.filesz / 16 {
            let at = dynamic.offset + i * 16;
            let (tag, val) = (u64_at(data, at)?, u64_at(data, at + 8)?);
            match tag {
                DT_NULL => break,
                DT_NEEDED => needed_offsets.push(val),
                DT_STRTAB => strtab = Some(val),
                _ => {}
            }
        }
    }
    // DT_STRTAB is an address; the PT_LOAD segment holding it gives the file offset.
    let strtab_offset = strtab.and_then(|addr| {
        segments
            .iter()
            .find(|s| s.kind == PT_LOAD && (s.vaddr..s.vaddr + s.filesz).contains(&addr))
            .map(|s| s.offset + (addr - s.vaddr))
    });
    let needed = needed_offsets
        .into_iter()
        .map(|off| {
            strtab_offset
                .and_then(|base| {
                    let rest = data.get(usize::try_from(base + off).ok()?..)?;
                    let end = rest.iter().position(|&b| b == 0)?;
                    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
                })
                .unwrap_or_else(|| format!("<string at {off}>"))
        })
        .collect();
    Ok(Linkage {
        interpreter,
        needed,
        pie,
    })
}

/// Whether `data` embeds an eBPF ELF object (an ELF header with
/// `e_machine` = EM_BPF) after its own header: the agent's build.rs embeds
/// an empty object instead when the eBPF build is skipped.
pub fn embeds_bpf_object(data: &[u8]) -> bool {
    data.windows(20)
        .skip(1)
        .any(|w| is_elf64_le(w) && u16::from_le_bytes([w[18], w[19]]) == EM_BPF)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64: header, then program headers, then their contents.
    fn elf(e_type: u16, interp: Option<&str>, needed: &[&str]) -> Vec<u8> {
        let mut strtab = vec![0u8];
        let mut dynamic = Vec::new();
        for name in needed {
            dynamic.extend((DT_NEEDED).to_le_bytes());
            dynamic.extend((strtab.len() as u64).to_le_bytes());
            strtab.extend(name.as_bytes());
            strtab.push(0);
        }
        let interp = interp.map(|i| [i.as_bytes(), b"\0"].concat());
        let phnum = 1 + u16::from(interp.is_some()) + 1;
        let content = 64 + 56 * u64::from(phnum);
        let strtab_at = content;
        let dynamic_at = strtab_at + strtab.len() as u64;
        let dynamic_len = dynamic.len() as u64 + 32;
        dynamic.extend(DT_STRTAB.to_le_bytes());
        dynamic.extend((0x1000 + strtab_at).to_le_bytes());
        dynamic.extend([0u8; 16]);
        let interp_at = dynamic_at + dynamic_len;

        let mut out = b"\x7fELF\x02\x01\x01".to_vec();
        out.resize(16, 0);
        out.extend(e_type.to_le_bytes());
        out.extend(62u16.to_le_bytes()); // EM_X86_64
        out.resize(32, 0);
        out.extend(64u64.to_le_bytes()); // e_phoff
        out.resize(54, 0);
        out.extend(56u16.to_le_bytes());
        out.extend(phnum.to_le_bytes());
        out.resize(64, 0);
        let mut ph = |kind: u32, offset: u64, len: u64| {
            out.extend(kind.to_le_bytes());
            out.extend(0u32.to_le_bytes());
            out.extend(offset.to_le_bytes());
            out.extend((0x1000 + offset).to_le_bytes());
            out.extend((0x1000 + offset).to_le_bytes());
            out.extend(len.to_le_bytes());
            out.extend(len.to_le_bytes());
            out.extend(8u64.to_le_bytes());
        };
        ph(PT_LOAD, 0, interp_at + 64);
        ph(PT_DYNAMIC, dynamic_at, dynamic_len);
        if let Some(i) = &interp {
            ph(PT_INTERP, interp_at, i.len() as u64);
        }
        out.extend(&strtab);
        out.extend(&dynamic);
        if let Some(i) = &interp {
            out.extend(i);
        }
        out
    }

    #[test]
    fn tells_static_from_dynamic() {
        let dynamic = linkage(&elf(
            ET_DYN,
            Some("/lib64/ld-linux-x86-64.so.2"),
            &["libc.so.6"],
        ))
        .unwrap();
        assert_eq!(
            dynamic.interpreter.as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        assert_eq!(dynamic.needed, ["libc.so.6"]);
        assert!(!dynamic.is_static());
        assert_eq!(
            dynamic.describe(),
            "dynamic: PT_INTERP /lib64/ld-linux-x86-64.so.2; DT_NEEDED libc.so.6"
        );

        let static_pie = linkage(&elf(ET_DYN, None, &[])).unwrap();
        assert!(static_pie.is_static());
        assert_eq!(
            static_pie.describe(),
            "static-pie: no PT_INTERP, no DT_NEEDED"
        );

        // A library but no loader is still not static.
        assert!(
            !linkage(&elf(2, None, &["libgcc_s.so.1"]))
                .unwrap()
                .is_static()
        );
        assert!(linkage(b"#!/bin/sh\n").is_err());
        assert!(linkage(&elf(ET_DYN, None, &[])[..70]).is_err());
    }

    #[test]
    fn finds_an_embedded_bpf_object() {
        let mut host = elf(ET_DYN, None, &[]);
        assert!(!embeds_bpf_object(&host));
        let mut bpf = b"\x7fELF\x02\x01\x01".to_vec();
        bpf.resize(16, 0);
        bpf.extend(1u16.to_le_bytes()); // ET_REL
        bpf.extend(EM_BPF.to_le_bytes());
        host.extend(&bpf);
        assert!(embeds_bpf_object(&host));
    }
}
