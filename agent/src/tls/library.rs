//! Telling TLS libraries apart from the files a process maps.

use std::{fs::File, path::Path};

use agent_common::TlsLayout;
use iced_x86::{Code, Decoder, DecoderOptions, Mnemonic, OpKind, Register};
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, SectionKind, read::ReadCache};

use crate::kernel::loader::{SHARED_READ, SHARED_WRITE, TLS_FUNCTIONS};

/// What one mapped file is, as far as TLS goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Library {
    /// OpenSSL's API (a libssl, or an executable with OpenSSL linked in):
    /// the probed functions it has (with their file offsets) and the
    /// version its text names.
    OpenSsl {
        functions: Vec<(&'static str, u64)>,
        version: Option<Version>,
    },
    /// A TLS library the agent does not follow, by name.
    Unsupported(&'static str),
    /// Nothing to do with TLS.
    NotTls,
}

/// A library's version as its text names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// "OpenSSL" or "LibreSSL".
    pub flavour: &'static str,
    pub number: (u32, u32, u32),
    /// The whole string, e.g. "OpenSSL 3.0.19 27 Jan 2026".
    pub text: String,
}

impl Version {
    /// Where this version keeps a session's socket (`ssl_st.rbio`,
    /// `bio_st.method`, `bio_st.num`), for the kernel's check. OpenSSL 3.2
    /// moved the connection state out of `ssl_st`: unknown layouts are zero
    /// and the kernel then relies on the socket calls inside the library.
    pub fn layout(&self) -> TlsLayout {
        let (rbio_off, bio_method_off, bio_num_off) = match (self.flavour, self.number) {
            ("OpenSSL", (1, 1, _)) => (16, 0, 48),
            ("OpenSSL", (3, 0 | 1, _)) => (16, 8, 56),
            _ => (0, 0, 0),
        };
        TlsLayout {
            rbio_off,
            bio_method_off,
            bio_num_off,
            _pad: 0,
        }
    }

    /// "OpenSSL 3.0.19".
    pub fn short(&self) -> String {
        let (a, b, c) = self.number;
        format!("{} {a}.{b}.{c}", self.flavour)
    }
}

/// TLS libraries known by file name but not followed.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("libgnutls.so", "GnuTLS"),
    ("libssl3.so", "NSS"),
    ("libnss3.so", "NSS"),
    ("libwolfssl.so", "wolfSSL"),
    ("libmbedtls.so", "Mbed TLS"),
];

/// Looks at one file mapped executable. `name` is its base name; only the
/// dynamic symbols and the read-only data are read, never the whole file.
pub fn inspect(file: File, name: &str) -> Result<Library, String> {
    if let Some((_, what)) = UNSUPPORTED.iter().find(|(n, _)| name.starts_with(n)) {
        return Ok(Library::Unsupported(what));
    }
    let cache = ReadCache::new(file);
    let elf = object::File::parse(&cache).map_err(|e| e.to_string())?;
    if elf.section_by_name(".go.buildinfo").is_some() {
        return Ok(Library::Unsupported("Go crypto/tls"));
    }
    // Offsets are worked out here rather than by symbol name at attach
    // time: bundled copies (Python wheels rewritten by patchelf) have
    // section layouts a name look-up at attach time does not resolve.
    // The shared entries are only ever found from the calls: were a build
    // to export them, probing them by name as well as the public four
    // would see each call twice.
    let exported: Vec<(&'static str, u64)> = TLS_FUNCTIONS
        .iter()
        .filter(|&&(symbol, _, _)| symbol != SHARED_READ && symbol != SHARED_WRITE)
        .filter_map(|&(symbol, _, _)| {
            let sym = elf
                .dynamic_symbols()
                .find(|s| s.is_definition() && s.name() == Ok(symbol))?;
            Some((symbol, file_offset(&elf, sym.address())?))
        })
        .collect();
    let libssl = name.starts_with("libssl.so");
    if exported.is_empty() && !libssl {
        return Ok(Library::NotTls);
    }
    let version = version_in(&elf);
    if version.as_ref().is_some_and(|v| v.flavour == "BoringSSL") {
        return Ok(Library::Unsupported("BoringSSL"));
    }
    let has = |f: &str| exported.iter().any(|&(name, _)| name == f);
    if !has("SSL_read") || !has("SSL_write") {
        let names: Vec<&str> = exported.iter().map(|&(name, _)| name).collect();
        return Err(format!(
            "a TLS library without SSL_read and SSL_write (has: {})",
            if names.is_empty() {
                "none of them".to_owned()
            } else {
                names.join(", ")
            }
        ));
    }
    let functions = match shared_entries(&elf) {
        Some(shared) => exported
            .into_iter()
            .filter(|&(name, _)| !THROUGH_SHARED.contains(&name))
            .chain(shared)
            .collect(),
        None => exported,
    };
    Ok(Library::OpenSsl { functions, version })
}

/// The public functions whose calls all pass through [`SHARED_READ`] and
/// [`SHARED_WRITE`].
const THROUGH_SHARED: [&str; 4] = ["SSL_read", "SSL_read_ex", "SSL_write", "SSL_write_ex"];

/// Where OpenSSL's reads, and its writes, meet: `SSL_read` and
/// `SSL_read_ex` both call one internal function with the `_ex` signature
/// (`ssl_read_internal(ssl, buf, num, &readbytes)`, OpenSSL 1.1.1 to 3.x),
/// and the writes call `ssl_write_internal`. Probing those instead of the
/// four public functions is cheaper per call: a uprobe hit costs least
/// where the kernel can emulate the instruction probed, and the internal
/// functions begin with a `push` (emulated on recent kernels) where the
/// public ones begin with a stack adjustment the kernel must single-step,
/// a second trap (bench/results/uprobe-trap.md).
///
/// Found, not assumed. Each public pair's first call must go straight to
/// the same function of this file's code that no exported symbol names,
/// and `SSL_read` (`SSL_write`) must pass it a pointer into its own frame,
/// where the count it converts to an `int` lands. Anything else (LibreSSL,
/// a build that inlined the function) keeps the public functions probed.
fn shared_entries<'d, R: object::ReadRef<'d>>(
    elf: &object::File<'d, R>,
) -> Option<[(&'static str, u64); 2]> {
    let read = shared_callee(elf, "SSL_read", "SSL_read_ex")?;
    let write = shared_callee(elf, "SSL_write", "SSL_write_ex")?;
    if read == write {
        return None;
    }
    Some([
        (SHARED_READ, file_offset(elf, read)?),
        (SHARED_WRITE, file_offset(elf, write)?),
    ])
}

/// The function `narrow` and `ex` both call first (see [`shared_entries`]).
fn shared_callee<'d, R: object::ReadRef<'d>>(
    elf: &object::File<'d, R>,
    narrow: &str,
    ex: &str,
) -> Option<u64> {
    let (target, frame_arg) = first_call(elf, narrow)?;
    let (ex_target, _) = first_call(elf, ex)?;
    let exported = elf
        .dynamic_symbols()
        .any(|s| s.is_definition() && s.address() == target);
    let in_code = elf.sections().any(|s| {
        s.kind() == SectionKind::Text
            && s.name() == Ok(".text")
            && (s.address()..s.address() + s.size()).contains(&target)
    });
    (frame_arg && target == ex_target && !exported && in_code).then_some(target)
}

/// The target of the first call in exported function `name`, read in
/// order up to its first return, and whether the fourth argument register
/// holds an address in the caller's frame there.
fn first_call<'d, R: object::ReadRef<'d>>(
    elf: &object::File<'d, R>,
    name: &str,
) -> Option<(u64, bool)> {
    /// Far more than the wrappers need before their call.
    const LOOK: u64 = 96;
    let sym = elf
        .dynamic_symbols()
        .find(|s| s.is_definition() && s.name() == Ok(name))?;
    let at = sym.address();
    let len = if sym.size() == 0 {
        LOOK
    } else {
        sym.size().min(LOOK)
    };
    let code = elf
        .sections()
        .find(|s| (s.address()..s.address() + s.size()).contains(&at))?
        .data_range(at, len)
        .ok()??;
    first_call_in(code, at)
}

/// [`first_call`] of the machine code `code` found at address `at`.
fn first_call_in(code: &[u8], at: u64) -> Option<(u64, bool)> {
    let mut frame_arg = false;
    for i in Decoder::with_ip(64, code, at, DecoderOptions::NONE).into_iter() {
        if i.is_invalid() || i.mnemonic() == Mnemonic::Ret {
            return None;
        }
        if i.mnemonic() == Mnemonic::Call {
            return (i.code() == Code::Call_rel32_64).then(|| (i.near_branch64(), frame_arg));
        }
        if i.op0_kind() == OpKind::Register
            && matches!(
                i.op0_register(),
                Register::RCX | Register::ECX | Register::CX
            )
        {
            frame_arg = match i.code() {
                Code::Mov_rm64_r64 | Code::Mov_r64_rm64 => {
                    i.op1_kind() == OpKind::Register && i.op1_register() == Register::RSP
                }
                Code::Lea_r64_m => i.memory_base() == Register::RSP,
                _ => false,
            };
        }
    }
    None
}

/// Where the code at `vaddr` lies in the file: through the loadable
/// segment that maps it.
fn file_offset<'d, R: object::ReadRef<'d>>(elf: &object::File<'d, R>, vaddr: u64) -> Option<u64> {
    elf.segments().find_map(|seg| {
        let (offset, size) = seg.file_range();
        let start = seg.address();
        (vaddr >= start && vaddr < start + size).then(|| vaddr - start + offset)
    })
}

/// The version a file's read-only data names (libcrypto, or an executable
/// with OpenSSL linked in).
pub fn version_of(path: &Path) -> Option<Version> {
    let cache = ReadCache::new(File::open(path).ok()?);
    let elf = object::File::parse(&cache).ok()?;
    version_in(&elf)
}

fn version_in<'d, R: object::ReadRef<'d>>(elf: &object::File<'d, R>) -> Option<Version> {
    let rodata = elf.section_by_name(".rodata")?.data().ok()?;
    ["OpenSSL ", "LibreSSL ", "BoringSSL"]
        .iter()
        .find_map(|flavour| find_version(rodata, flavour))
}

/// The first "<flavour> X.Y.Z…" string in `data`.
fn find_version(data: &[u8], flavour: &'static str) -> Option<Version> {
    let name = flavour.trim_end();
    if name == "BoringSSL" {
        return memchr::memmem::find(data, b"BoringSSL\0").map(|_| Version {
            flavour: "BoringSSL",
            number: (0, 0, 0),
            text: "BoringSSL".into(),
        });
    }
    for at in memchr::memmem::find_iter(data, flavour.as_bytes()) {
        let rest = &data[at..];
        let end = memchr::memchr(0, rest).unwrap_or(rest.len()).min(80);
        let Ok(text) = std::str::from_utf8(&rest[..end]) else {
            continue;
        };
        let digits = text[flavour.len()..]
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()
            .unwrap_or("");
        let mut parts = digits.split('.').map(|p| p.parse::<u32>());
        if let (Some(Ok(a)), Some(Ok(b)), Some(Ok(c))) = (parts.next(), parts.next(), parts.next())
        {
            return Some(Version {
                flavour: name_static(name),
                number: (a, b, c),
                text: text.to_owned(),
            });
        }
    }
    None
}

fn name_static(name: &str) -> &'static str {
    match name {
        "LibreSSL" => "LibreSSL",
        _ => "OpenSSL",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_text() {
        let data = b"junk\0OpenSSL 3.0.19 27 Jan 2026\0more";
        let v = find_version(data, "OpenSSL ").unwrap();
        assert_eq!(v.number, (3, 0, 19));
        assert_eq!(v.text, "OpenSSL 3.0.19 27 Jan 2026");
        assert_eq!(v.short(), "OpenSSL 3.0.19");
        assert_eq!(v.layout().bio_num_off, 56);
        // Not a version: the word alone, or without three numbers.
        assert!(find_version(b"OpenSSL \0OpenSSL 3.x\0", "OpenSSL ").is_none());
        let old = find_version(b"OpenSSL 1.1.1w  11 Sep 2023\0", "OpenSSL ").unwrap();
        assert_eq!((old.layout().rbio_off, old.layout().bio_num_off), (16, 48));
        let new = find_version(b"OpenSSL 3.2.1 30 Jan 2024\0", "OpenSSL ").unwrap();
        assert_eq!(new.layout(), TlsLayout::default(), "3.2 layout is unknown");
        let libre = find_version(b"LibreSSL 3.8.2\0", "LibreSSL ").unwrap();
        assert_eq!(libre.flavour, "LibreSSL");
        assert_eq!(libre.layout(), TlsLayout::default());
    }

    #[test]
    fn debian_libssl_and_libcrypto() {
        let dir = Path::new("/usr/lib/x86_64-linux-gnu");
        let Ok(file) = File::open(dir.join("libssl.so.3")) else {
            eprintln!("skipped: no libssl.so.3 (apt-get install libssl3)");
            return;
        };
        let Library::OpenSsl { functions, .. } = inspect(file, "libssl.so.3").unwrap() else {
            panic!("libssl.so.3 is OpenSSL");
        };
        // Debian's OpenSSL 3.0: the reads and the writes each meet in one
        // internal function, probed in place of the public four.
        let names: Vec<&str> = functions.iter().map(|&(n, _)| n).collect();
        assert_eq!(names, ["SSL_free", SHARED_READ, SHARED_WRITE]);
        // The offsets are where `nm -D` puts SSL_free (a shared library's
        // text is mapped at its file offset) and where objdump says
        // SSL_read and SSL_write call.
        let lib = dir.join("libssl.so.3");
        let nm = std::process::Command::new("nm")
            .args(["-D", "--defined-only"])
            .arg(&lib)
            .output()
            .expect("nm (binutils)");
        let text = String::from_utf8_lossy(&nm.stdout);
        let at = |name: &str| {
            text.lines()
                .find(|l| l.ends_with(&format!(" {name}")) || l.contains(&format!(" {name}@")))
                .and_then(|l| u64::from_str_radix(l.split(' ').next()?, 16).ok())
                .unwrap_or_else(|| panic!("nm lists {name}"))
        };
        assert!(functions.contains(&("SSL_free", at("SSL_free"))));
        for (public, shared) in [("SSL_read", SHARED_READ), ("SSL_write", SHARED_WRITE)] {
            let start = at(public);
            let dump = std::process::Command::new("objdump")
                .args(["-d", "--no-show-raw-insn"])
                .arg(format!("--start-address={start:#x}"))
                .arg(format!("--stop-address={:#x}", start + 64))
                .arg(&lib)
                .output()
                .expect("objdump (binutils)");
            let dump = String::from_utf8_lossy(&dump.stdout);
            let called = dump
                .lines()
                .find_map(|l| l.split_once("\tcall ")?.1.split_whitespace().next())
                .and_then(|t| u64::from_str_radix(t, 16).ok())
                .unwrap_or_else(|| panic!("a call in {public}:\n{dump}"));
            assert!(functions.contains(&(shared, called)), "{functions:?}");
        }
        let version = version_of(&dir.join("libcrypto.so.3")).expect("libcrypto names its version");
        assert_eq!(version.flavour, "OpenSSL");
        assert_eq!(version.number.0, 3);
        // A file named like libssl without OpenSSL's functions: an error
        // that says what is missing, not a probe on the wrong code.
        let impostor = File::open(dir.join("libcrypto.so.3")).unwrap();
        let err = inspect(impostor, "libssl.so.3").unwrap_err();
        assert!(err.contains("without SSL_read and SSL_write"), "{err}");
        let libc = File::open(dir.join("libc.so.6")).unwrap();
        assert_eq!(inspect(libc, "libc.so.6").unwrap(), Library::NotTls);
        let gnutls = File::open(dir.join("libc.so.6")).unwrap();
        assert_eq!(
            inspect(gnutls, "libgnutls.so.30").unwrap(),
            Library::Unsupported("GnuTLS")
        );
    }

    /// Debian OpenSSL 3.0.19's SSL_read and SSL_read_ex, up to their call.
    const SSL_READ: &[u8] = &[
        0x48, 0x83, 0xec, 0x18, // sub $0x18,%rsp
        0x64, 0x48, 0x8b, 0x04, 0x25, 0x28, 0, 0, 0, // mov %fs:0x28,%rax
        0x48, 0x89, 0x44, 0x24, 0x08, // mov %rax,0x8(%rsp)
        0x31, 0xc0, // xor %eax,%eax
        0x85, 0xd2, // test %edx,%edx
        0x78, 0x2f, // js
        0x48, 0x89, 0xe1, // mov %rsp,%rcx
        0x48, 0x63, 0xd2, // movslq %edx,%rdx
        0xe8, 0x3d, 0xfe, 0xff, 0xff, // call 0x35290
    ];
    const SSL_READ_EX: &[u8] = &[
        0x48, 0x83, 0xec, 0x08, // sub $0x8,%rsp
        0xe8, 0xc7, 0xfd, 0xff, 0xff, // call 0x35290
    ];

    #[test]
    fn first_calls_and_their_fourth_argument() {
        assert_eq!(first_call_in(SSL_READ, 0x35430), Some((0x35290, true)));
        assert_eq!(first_call_in(SSL_READ_EX, 0x354c0), Some((0x35290, false)));
        // The frame address overwritten before the call: not passed.
        let mut clobbered = SSL_READ.to_vec();
        clobbered.splice(30..30, [0x31, 0xc9]); // xor %ecx,%ecx
        assert_eq!(first_call_in(&clobbered, 0x35430).map(|c| c.1), Some(false));
        // A return before any call, an indirect call, or no call at all:
        // nothing to follow.
        assert_eq!(first_call_in(&[0xc3, 0xe8, 0, 0, 0, 0], 0x1000), None);
        assert_eq!(first_call_in(&[0xff, 0xd0], 0x1000), None); // call *%rax
        assert_eq!(first_call_in(&SSL_READ[..27], 0x35430), None);
    }

    #[test]
    fn node_links_openssl_into_its_executable() {
        let Some(node) = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("node"))
                .find(|p| p.exists())
        }) else {
            eprintln!("skipped: no node on PATH");
            return;
        };
        let node = std::fs::canonicalize(node).unwrap();
        let library = inspect(File::open(&node).unwrap(), "node").unwrap();
        let Library::OpenSsl { functions, version } = library else {
            panic!("node exports OpenSSL: {library:?}");
        };
        // The public functions, or the internal ones they share.
        let has = |f: &str| functions.iter().any(|&(n, _)| n == f);
        assert!(has("SSL_read") || has(SHARED_READ), "{functions:?}");
        assert!(has("SSL_write") || has(SHARED_WRITE), "{functions:?}");
        assert_eq!(version.expect("node names its OpenSSL").flavour, "OpenSSL");
    }
}
