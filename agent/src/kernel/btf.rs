//! A small reader for the kernel's BTF (`/sys/kernel/btf/vmlinux`): just
//! enough to find struct member offsets and function names.
//!
//! aya's BTF types keep their look-ups private, and the BTF crates on
//! crates.io are LGPL, which a statically linked agent cannot take lightly;
//! the format is small and documented (Documentation/bpf/btf.rst), so this
//! module parses it directly. It never panics on malformed input.

use std::collections::HashMap;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("BTF data is truncated or malformed: {0}")]
    Malformed(&'static str),
    #[error("struct {0} not found in kernel BTF")]
    NoStruct(String),
    #[error("member {member} not found in struct {strukt}")]
    NoMember { strukt: String, member: String },
}

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Debug, Clone)]
enum Type {
    Composite {
        members: Vec<Member>,
    },
    /// typedef / const / volatile / restrict / type tag: refers to another type.
    Alias {
        type_id: u32,
    },
    Other,
}

/// Parsed kernel BTF.
pub struct Btf {
    strings: Vec<u8>,
    /// Index = type id - 1.
    types: Vec<Type>,
    structs: HashMap<String, u32>,
    funcs: HashMap<String, u32>,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

impl Btf {
    /// Parses the running kernel's BTF.
    pub fn from_sys_fs() -> anyhow::Result<Self> {
        const PATH: &str = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(PATH)
            .map_err(|e| anyhow::anyhow!("cannot read {PATH}: {e} (kernel built without BTF?)"))?;
        Ok(Self::parse(&data)?)
    }

    /// Parses little-endian raw BTF.
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let bad = BtfError::Malformed;
        if u16_at(data, 0).ok_or(bad("header"))? != MAGIC {
            return Err(bad("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(data, 4).ok_or(bad("header"))? as usize;
        let type_off = u32_at(data, 8).ok_or(bad("header"))? as usize;
        let type_len = u32_at(data, 12).ok_or(bad("header"))? as usize;
        let str_off = u32_at(data, 16).ok_or(bad("header"))? as usize;
        let str_len = u32_at(data, 20).ok_or(bad("header"))? as usize;
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off)?;
            data.get(start..start.checked_add(len)?)
        };
        let type_data = section(type_off, type_len).ok_or(bad("type section"))?;
        let strings = section(str_off, str_len)
            .ok_or(bad("string section"))?
            .to_vec();

        let mut btf = Btf {
            strings,
            types: Vec::new(),
            structs: HashMap::new(),
            funcs: HashMap::new(),
        };
        let mut pos = 0usize;
        while pos < type_data.len() {
            let name_off = u32_at(type_data, pos).ok_or(bad("type"))?;
            let info = u32_at(type_data, pos + 4).ok_or(bad("type"))?;
            let size_or_type = u32_at(type_data, pos + 8).ok_or(bad("type"))?;
            pos += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let id = btf.types.len() as u32 + 1;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = pos + i * 12;
                        let offset = u32_at(type_data, m + 8).ok_or(bad("member"))?;
                        members.push(Member {
                            name_off: u32_at(type_data, m).ok_or(bad("member"))?,
                            type_id: u32_at(type_data, m + 4).ok_or(bad("member"))?,
                            bit_offset: if kind_flag {
                                offset & 0xff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    pos += vlen * 12;
                    if kind == KIND_STRUCT && name_off != 0 {
                        let name = btf.string(name_off).to_owned();
                        btf.structs.entry(name).or_insert(id);
                    }
                    Type::Composite { members }
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Type::Alias {
                        type_id: size_or_type,
                    }
                }
                KIND_FUNC => {
                    let name = btf.string(name_off).to_owned();
                    btf.funcs.entry(name).or_insert(id);
                    Type::Other
                }
                KIND_INT | KIND_VAR | KIND_DECL_TAG => {
                    pos += 4;
                    Type::Other
                }
                KIND_ARRAY => {
                    pos += 12;
                    Type::Other
                }
                KIND_ENUM | KIND_FUNC_PROTO => {
                    pos += vlen * 8;
                    Type::Other
                }
                KIND_DATASEC | KIND_ENUM64 => {
                    pos += vlen * 12;
                    Type::Other
                }
                KIND_PTR | KIND_FWD | KIND_FLOAT => Type::Other,
                _ => return Err(bad("unknown type kind")),
            };
            btf.types.push(ty);
        }
        Ok(btf)
    }

    fn string(&self, off: u32) -> &str {
        let tail = self.strings.get(off as usize..).unwrap_or_default();
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        std::str::from_utf8(&tail[..end]).unwrap_or("")
    }

    fn resolve(&self, mut id: u32) -> Option<&Type> {
        // Bounded: alias chains in real BTF are short; cycles would be malformed.
        for _ in 0..32 {
            match self.types.get(id.checked_sub(1)? as usize)? {
                Type::Alias { type_id } => id = *type_id,
                other => return Some(other),
            }
        }
        None
    }

    /// Whether the kernel has a function of this name (a kprobe/fentry target).
    pub fn has_func(&self, name: &str) -> bool {
        self.funcs.contains_key(name)
    }

    /// Byte offset of `member` in `struct strukt`, searching anonymous
    /// structs and unions inside it (e.g. `sock_common.skc_daddr`).
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let id = *self
            .structs
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        self.find_member(id, member, 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NoMember {
                strukt: strukt.to_owned(),
                member: member.to_owned(),
            })
    }

    fn find_member(&self, id: u32, member: &str, depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        let Type::Composite { members } = self.resolve(id)? else {
            return None;
        };
        for m in members {
            if m.name_off != 0 && self.string(m.name_off) == member {
                return Some(m.bit_offset);
            }
        }
        members
            .iter()
            .filter(|m| m.name_off == 0)
            .find_map(|m| Some(m.bit_offset + self.find_member(m.type_id, member, depth + 1)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for data in [
            &[][..],
            &[0x9f, 0xeb],
            &[0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 255, 255, 255, 255],
        ] {
            assert!(Btf::parse(data).is_err());
        }
    }

    #[test]
    fn finds_nested_anonymous_members_in_kernel_btf() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("skipped: this kernel has no BTF");
            return;
        };
        // skc_daddr sits in an anonymous union/struct inside sock_common.
        let daddr = btf.member_offset("sock_common", "skc_daddr").unwrap();
        let rcv = btf.member_offset("sock_common", "skc_rcv_saddr").unwrap();
        assert_eq!(rcv, daddr + 4);
        assert!(btf.member_offset("task_struct", "files").unwrap() > 0);
        assert!(btf.has_func("tcp_sendmsg"));
        assert!(matches!(
            btf.member_offset("sock_common", "no_such_member"),
            Err(BtfError::NoMember { .. })
        ));
    }

    #[test]
    fn truncated_kernel_btf_never_panics() {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            return;
        };
        for cut in [30, 1000, data.len() / 2, data.len() - 1] {
            let _ = Btf::parse(&data[..cut]);
        }
    }
}
