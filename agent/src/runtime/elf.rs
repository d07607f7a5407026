//! Just enough ELF (x86-64, 64-bit) for interpreter binaries: loadable
//! segments, symbols by name, dynamic relocations naming a symbol, and a
//! linear sweep of the code for "first argument = address, then call".
//!
//! The file is read through `object`'s `ReadCache`: only the headers, the
//! symbol tables, the relocations and the code sections are read, never the
//! debug info that makes up most of a libpython.

use std::cell::OnceCell;
use std::collections::{HashMap, HashSet};
use std::fs::File;

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use object::Endianness;
use object::elf::{self, FileHeader64, ProgramHeader64, Rela64, SectionHeader64, Sym64};
use object::read::ReadCache;
use object::read::elf::{FileHeader, ProgramHeader, Rela, SectionHeader, Sym};

pub(crate) type Data<'d> = &'d ReadCache<File>;

/// One PT_LOAD segment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    pub vaddr: u64,
    pub offset: u64,
    pub filesz: u64,
}

/// A defined symbol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Symbol {
    pub value: u64,
}

/// A symbol table and its string table, both read whole (one read each):
/// names are compared in memory rather than read one by one.
#[derive(Default)]
struct Table<'d> {
    syms: &'d [Sym64<Endianness>],
    strs: &'d [u8],
    index: usize,
}

#[derive(Debug)]
struct Section {
    name: Vec<u8>,
    sh_type: u32,
    flags: u64,
    addr: u64,
    offset: u64,
    size: u64,
    link: u32,
}

pub(crate) struct Elf<'d> {
    data: Data<'d>,
    endian: Endianness,
    loads: Vec<Load>,
    exec_loads: Vec<Load>,
    sections: Vec<Section>,
    dynsym: Table<'d>,
    /// Read on first use: a large binary's .symtab is not read just to
    /// learn it is not Python.
    symtab: OnceCell<Table<'d>>,
}

fn cstr(strs: &[u8], off: u32) -> &[u8] {
    let tail = strs.get(off as usize..).unwrap_or_default();
    let end = memchr::memchr(0, tail).unwrap_or(tail.len());
    &tail[..end]
}

fn err(e: object::read::Error) -> String {
    e.to_string()
}

impl<'d> Elf<'d> {
    /// Parses the headers and the symbol tables; fails on anything but a
    /// 64-bit x86-64 ELF file.
    pub fn parse(data: Data<'d>) -> Result<Self, String> {
        let header = FileHeader64::<Endianness>::parse(data).map_err(err)?;
        let endian = header.endian().map_err(err)?;
        if header.e_machine(endian) != elf::EM_X86_64 {
            return Err("not an x86-64 binary".into());
        }
        let mut loads = Vec::new();
        let mut exec_loads = Vec::new();
        for ph in header.program_headers(endian, data).map_err(err)? {
            let ph: &ProgramHeader64<Endianness> = ph;
            if ph.p_type(endian) != elf::PT_LOAD {
                continue;
            }
            let load = Load {
                vaddr: ph.p_vaddr(endian),
                offset: ph.p_offset(endian),
                filesz: ph.p_filesz(endian),
            };
            loads.push(load);
            if ph.p_flags(endian) & elf::PF_X != 0 {
                exec_loads.push(load);
            }
        }
        if loads.is_empty() {
            return Err("no loadable segment".into());
        }
        let table = header.sections(endian, data).map_err(err)?;
        let mut sections = Vec::with_capacity(table.len());
        for sh in table.iter() {
            let sh: &SectionHeader64<Endianness> = sh;
            sections.push(Section {
                name: table.section_name(endian, sh).unwrap_or_default().to_vec(),
                sh_type: sh.sh_type(endian),
                flags: sh.sh_flags(endian),
                addr: sh.sh_addr(endian),
                offset: sh.sh_offset(endian),
                size: sh.sh_size(endian),
                link: sh.sh_link(endian),
            });
        }
        let mut elf = Elf {
            data,
            endian,
            loads,
            exec_loads,
            sections,
            dynsym: Table::default(),
            symtab: OnceCell::new(),
        };
        elf.dynsym = elf.table(elf::SHT_DYNSYM);
        Ok(elf)
    }

    /// The first symbol table of this type; empty if absent or unreadable
    /// (a broken table is treated as a missing one).
    fn table(&self, sh_type: u32) -> Table<'d> {
        let Some((index, s)) = self
            .sections
            .iter()
            .enumerate()
            .find(|(_, s)| s.sh_type == sh_type)
        else {
            return Table::default();
        };
        let syms = self
            .bytes(s.offset, s.size)
            .and_then(|b| object::pod::slice_from_all_bytes::<Sym64<Endianness>>(b).ok());
        let strs = self
            .sections
            .get(s.link as usize)
            .and_then(|l| self.bytes(l.offset, l.size));
        match (syms, strs) {
            (Some(syms), Some(strs)) => Table { syms, strs, index },
            _ => Table::default(),
        }
    }

    fn bytes(&self, offset: u64, size: u64) -> Option<&'d [u8]> {
        use object::ReadRef;
        self.data.read_bytes_at(offset, size).ok()
    }

    fn symtab(&self) -> &Table<'d> {
        self.symtab.get_or_init(|| self.table(elf::SHT_SYMTAB))
    }

    pub fn has_symtab(&self) -> bool {
        !self.symtab().syms.is_empty()
    }

    /// A symbol defined in this file's .dynsym.
    pub fn dynamic_symbol(&self, name: &str) -> Option<Symbol> {
        self.find(&self.dynsym, name)
    }

    /// A symbol defined in this file, from .dynsym, else .symtab.
    pub fn symbol(&self, name: &str) -> Option<Symbol> {
        self.dynamic_symbol(name)
            .or_else(|| self.find(self.symtab(), name))
    }

    fn find(&self, t: &Table<'d>, name: &str) -> Option<Symbol> {
        t.syms
            .iter()
            .find(|s| {
                !s.is_undefined(self.endian)
                    && s.st_value(self.endian) != 0
                    && cstr(t.strs, s.st_name(self.endian)) == name.as_bytes()
            })
            .map(|s| Symbol {
                value: s.st_value(self.endian),
            })
    }

    /// Defined function symbols of one table: (address, size, name).
    fn funcs<'a>(&'a self, t: &'a Table<'d>) -> impl Iterator<Item = (u64, u64, &'d [u8])> + 'a {
        let strs = t.strs;
        t.syms
            .iter()
            .filter(|s| s.st_type() == elf::STT_FUNC && !s.is_undefined(self.endian))
            .map(move |s| {
                (
                    s.st_value(self.endian),
                    s.st_size(self.endian),
                    cstr(strs, s.st_name(self.endian)),
                )
            })
    }

    /// Start of the .symtab function whose [value, value + size) holds `addr`.
    pub fn symtab_function_at(&self, addr: u64) -> Option<u64> {
        self.funcs(self.symtab())
            .find(|&(v, sz, _)| v <= addr && addr < v.saturating_add(sz))
            .map(|(v, _, _)| v)
    }

    /// Addresses of exported functions (.dynsym).
    pub fn dynsym_functions(&self) -> Vec<u64> {
        self.funcs(&self.dynsym).map(|(v, _, _)| v).collect()
    }

    /// Function names by address, from both tables.
    pub fn function_names(&self) -> HashMap<u64, &'d [u8]> {
        let mut names = HashMap::new();
        for t in [self.symtab(), &self.dynsym] {
            for (v, _, name) in self.funcs(t) {
                names.insert(v, name);
            }
        }
        names
    }

    /// The bytes at a link-time address, if they are in the file.
    pub fn read_vaddr(&self, vaddr: u64, len: u64) -> Option<&'d [u8]> {
        let l = self
            .loads
            .iter()
            .find(|l| l.vaddr <= vaddr && vaddr.saturating_add(len) <= l.vaddr + l.filesz)?;
        self.bytes(vaddr - l.vaddr + l.offset, len)
    }

    /// File offset of a link-time address in a loaded, file-backed range:
    /// uprobes are placed by file offset.
    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        self.loads
            .iter()
            .find(|l| l.vaddr <= vaddr && vaddr < l.vaddr + l.filesz)
            .map(|l| vaddr - l.vaddr + l.offset)
    }

    /// First PT_LOAD's address rounded down to a page: what the mapping at
    /// file offset 0 starts at, before the load bias.
    pub fn first_load_page(&self) -> u64 {
        self.loads[0].vaddr & !0xfff
    }

    /// Symbol names of the dynamic relocations that fill a slot with a
    /// symbol's address (GOT and PLT slots), by slot address.
    pub fn slot_symbols(&self) -> HashMap<u64, &'d [u8]> {
        let mut slots = HashMap::new();
        self.each_rela(|r, name| {
            let kind = r.r_type(self.endian, false);
            if matches!(
                kind,
                elf::R_X86_64_GLOB_DAT | elf::R_X86_64_JUMP_SLOT | elf::R_X86_64_64
            ) && let Some(name) = name
            {
                slots.insert(r.r_offset(self.endian), name);
            }
        });
        slots
    }

    /// Slots that hold `vaddr` (the address of symbol `name`) at run time:
    /// named by a dynamic relocation, filled by a relative one, or already
    /// holding it in the file (non-PIE GOTs the linker resolved).
    pub fn slots_holding(&self, name: &str, vaddr: u64) -> HashSet<u64> {
        let mut slots = HashSet::new();
        self.each_rela(|r, sym| {
            let at = r.r_offset(self.endian);
            match r.r_type(self.endian, false) {
                elf::R_X86_64_GLOB_DAT | elf::R_X86_64_64 if sym == Some(name.as_bytes()) => {
                    slots.insert(at);
                }
                elf::R_X86_64_RELATIVE if r.r_addend(self.endian) as u64 == vaddr => {
                    slots.insert(at);
                }
                _ => {}
            }
        });
        for s in &self.sections {
            if s.sh_type != elf::SHT_PROGBITS || !s.name.starts_with(b".got") {
                continue;
            }
            let Some(got) = self.bytes(s.offset, s.size) else {
                continue;
            };
            for (i, w) in got.chunks_exact(8).enumerate() {
                if u64::from_le_bytes(w.try_into().unwrap_or_default()) == vaddr {
                    slots.insert(s.addr + 8 * i as u64);
                }
            }
        }
        slots
    }

    /// Calls `f` with every RELA entry that refers to .dynsym (or to no
    /// symbol), and the name of its symbol if it has one.
    fn each_rela(&self, mut f: impl FnMut(&Rela64<Endianness>, Option<&'d [u8]>)) {
        for s in &self.sections {
            if s.sh_type != elf::SHT_RELA
                || (s.link as usize != self.dynsym.index && s.link != 0)
                || self.dynsym.syms.is_empty()
            {
                continue;
            }
            let Some(relas) = self
                .bytes(s.offset, s.size)
                .and_then(|b| object::pod::slice_from_all_bytes::<Rela64<Endianness>>(b).ok())
            else {
                continue;
            };
            for r in relas {
                let sym = r.r_sym(self.endian, false) as usize;
                let name = (sym != 0)
                    .then(|| self.dynsym.syms.get(sym))
                    .flatten()
                    .map(|s| cstr(self.dynsym.strs, s.st_name(self.endian)));
                f(r, name);
            }
        }
    }

    /// The code: executable sections (.init, .plt*, .text, .fini), or the
    /// executable segments of a file without section headers.
    pub fn code(&self) -> Vec<(u64, &'d [u8])> {
        let from_sections: Vec<_> = self
            .sections
            .iter()
            .filter(|s| {
                s.sh_type == elf::SHT_PROGBITS && s.flags & u64::from(elf::SHF_EXECINSTR) != 0
            })
            .filter_map(|s| Some((s.addr, self.bytes(s.offset, s.size)?)))
            .collect();
        if !from_sections.is_empty() {
            return from_sections;
        }
        self.exec_loads
            .iter()
            .filter_map(|l| Some((l.vaddr, self.bytes(l.offset, l.filesz)?)))
            .collect()
    }

    /// Whether `addr` is in a PLT section (a stub that jumps through a slot).
    pub fn in_plt(&self, addr: u64) -> bool {
        self.sections
            .iter()
            .any(|s| s.name.starts_with(b".plt") && s.addr <= addr && addr < s.addr + s.size)
    }
}

/// What a call at an allocation site calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Callee {
    /// `call rel32`: a function or a PLT stub.
    Direct(u64),
    /// `call [rip+X]`: through a GOT slot (-fno-plt).
    Slot(u64),
    /// Through a register or computed memory.
    Other,
}

/// An instruction that puts the needle into the first argument register,
/// followed closely by a call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Site {
    pub at: u64,
    pub callee: Callee,
}

#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub sites: Vec<Site>,
    /// Every `call rel32` target, sorted and deduplicated: the function entries
    /// a binary without .symtab still tells.
    pub call_targets: Vec<u64>,
}

/// How many instructions may stand between loading the argument and the
/// call (other arguments, a spill).
const CALL_WINDOW: u8 = 3;

fn is_rdi(r: Register) -> bool {
    matches!(r, Register::RDI | Register::EDI)
}

/// Whether `i` puts `addr` into rdi/edi: `mov edi, imm32` (non-PIE),
/// `lea rdi, [rip+addr]` (PIE), `mov rdi, [rip+slot]` (through the GOT).
fn loads_needle(i: &Instruction, addr: u64, slots: &HashSet<u64>) -> bool {
    if i.op0_kind() != OpKind::Register || !is_rdi(i.op0_register()) {
        return false;
    }
    match i.code() {
        Code::Mov_r32_imm32 => u64::from(i.immediate32()) == addr,
        Code::Mov_rm64_imm32 => i.immediate32to64() as u64 == addr,
        Code::Mov_r64_imm64 => i.immediate64() == addr,
        Code::Lea_r64_m => i.is_ip_rel_memory_operand() && i.ip_rel_memory_address() == addr,
        Code::Mov_r64_rm64 => {
            i.is_ip_rel_memory_operand() && slots.contains(&i.ip_rel_memory_address())
        }
        _ => false,
    }
}

/// Whether `i` overwrites rdi with something else (the pending argument is lost).
fn clobbers_rdi(i: &Instruction) -> bool {
    i.op0_kind() == OpKind::Register
        && matches!(
            i.op0_register(),
            Register::RDI | Register::EDI | Register::DI | Register::DIL
        )
        && matches!(
            i.mnemonic(),
            Mnemonic::Mov
                | Mnemonic::Lea
                | Mnemonic::Movzx
                | Mnemonic::Movsxd
                | Mnemonic::Pop
                | Mnemonic::Xor
        )
}

fn callee(i: &Instruction) -> Callee {
    match i.code() {
        Code::Call_rel32_64 => Callee::Direct(i.near_branch64()),
        Code::Call_rm64 if i.is_ip_rel_memory_operand() => Callee::Slot(i.ip_rel_memory_address()),
        _ => Callee::Other,
    }
}

/// Linear sweep over the code (compilers keep jump tables out of .text, so
/// the sweep stays in step): finds every site that loads `addr` (directly or
/// from one of `slots`) into the first argument and calls within
/// [`CALL_WINDOW`] instructions, and collects every direct call target.
pub(crate) fn scan(code: &[(u64, &[u8])], addr: u64, slots: &HashSet<u64>) -> Scan {
    let mut out = Scan::default();
    let mut i = Instruction::default();
    for &(ip, bytes) in code {
        let mut d = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
        // (site address, instructions left to see its call)
        let mut pending: Option<(u64, u8)> = None;
        while d.can_decode() {
            d.decode_out(&mut i);
            let is_call = i.mnemonic() == Mnemonic::Call;
            if is_call && i.code() == Code::Call_rel32_64 {
                out.call_targets.push(i.near_branch64());
            }
            if let Some((at, left)) = pending {
                pending = if is_call {
                    out.sites.push(Site {
                        at,
                        callee: callee(&i),
                    });
                    None
                } else if left <= 1 || clobbers_rdi(&i) || i.mnemonic() == Mnemonic::Ret {
                    None
                } else {
                    Some((at, left - 1))
                };
            }
            if loads_needle(&i, addr, slots) {
                pending = Some((i.ip(), CALL_WINDOW));
            }
        }
    }
    out.call_targets.sort_unstable();
    out.call_targets.dedup();
    out
}

/// The slot a PLT stub jumps through: `[endbr64;] [bnd] jmp [rip+slot]`.
pub(crate) fn plt_slot(elf: &Elf<'_>, stub: u64) -> Option<u64> {
    let bytes = elf.read_vaddr(stub, 16)?;
    let mut d = Decoder::with_ip(64, bytes, stub, DecoderOptions::NONE);
    for _ in 0..2 {
        let i = d.decode();
        match i.code() {
            Code::Endbr64 => continue,
            Code::Jmp_rm64 if i.is_ip_rel_memory_operand() => {
                return Some(i.ip_rel_memory_address());
            }
            _ => return None,
        }
    }
    None
}
