//! Telling TLS libraries apart from the files a process maps.

use std::{fs::File, path::Path};

use agent_common::TlsLayout;
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, read::ReadCache};

use crate::kernel::loader::TLS_FUNCTIONS;

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
    let exported: Vec<(&'static str, u64)> = TLS_FUNCTIONS
        .iter()
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
    Ok(Library::OpenSsl {
        functions: exported,
        version,
    })
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
        for f in [
            "SSL_read",
            "SSL_write",
            "SSL_read_ex",
            "SSL_write_ex",
            "SSL_free",
        ] {
            assert!(
                functions.iter().any(|&(n, _)| n == f),
                "{f} in {functions:?}"
            );
        }
        // The offsets are where `nm -D` puts the functions (a shared
        // library's text is mapped at its file offset).
        let nm = std::process::Command::new("nm")
            .args(["-D", "--defined-only"])
            .arg(dir.join("libssl.so.3"))
            .output();
        if let Ok(nm) = nm {
            let text = String::from_utf8_lossy(&nm.stdout);
            let read = text
                .lines()
                .find(|l| l.ends_with(" SSL_read") || l.contains(" SSL_read@"))
                .and_then(|l| u64::from_str_radix(l.split(' ').next()?, 16).ok())
                .expect("nm lists SSL_read");
            assert!(functions.contains(&("SSL_read", read)), "{functions:?}");
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
        assert!(functions.iter().any(|&(n, _)| n == "SSL_read"));
        assert!(functions.iter().any(|&(n, _)| n == "SSL_write"));
        assert_eq!(version.expect("node names its OpenSSL").flavour, "OpenSSL");
    }
}
