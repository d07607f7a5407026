//! Debian's archive, as the kernel matrix uses it: files from its pool,
//! pinned by SHA-256 (kernels, the emulator), and apt on a private state
//! directory for what is not pinned (`--newest`, a pin the archive dropped).
//! The host's apt configuration is neither needed nor touched.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::say;
use crate::util::{Ctx, output};

/// The Debian archive (`$ZEROTRACE_DEBIAN_MIRROR` overrides it).
const MIRROR: &str = "http://deb.debian.org";
/// Signs every Debian suite used here (package debian-archive-keyring).
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The suites the private apt reads: Debian 12 with its security updates
/// and backports, Debian 11 with its security updates.
const SUITES: &[(&str, &str)] = &[
    ("debian", "bookworm"),
    ("debian-security", "bookworm-security"),
    ("debian", "bookworm-backports"),
    ("debian", "bullseye"),
    ("debian-security", "bullseye-security"),
];

/// A file in the archive's pool, pinned by its SHA-256 (from the suite's
/// Packages index: `apt-cache show PACKAGE` prints Filename and SHA256).
pub struct PoolFile {
    /// Path under the mirror, e.g. `debian-security/pool/updates/main/…`.
    pub pool: &'static str,
    pub sha256: &'static str,
}

/// Downloads `file` to `dest` and checks its SHA-256: from its pool path,
/// then from the main archive's pool (where a point release copies a
/// security upload). Why it failed, otherwise.
pub fn fetch_pinned(ctx: &Ctx, file: &PoolFile, dest: &Path) -> Result<(), String> {
    let mirror = mirror();
    let urls = [
        format!("{mirror}/{}", file.pool),
        format!(
            "{mirror}/{}",
            file.pool
                .replacen("debian-security/pool/updates/", "debian/pool/", 1)
        ),
    ];
    let mut why = Vec::new();
    for url in urls
        .iter()
        .take(if file.pool.starts_with("debian-security/") {
            2
        } else {
            1
        })
    {
        say!("vm-test", "downloading {url}…");
        match curl(ctx, url, dest).and_then(|()| sha256(ctx, dest)) {
            Ok(sum) if sum == file.sha256 => return Ok(()),
            Ok(sum) => why.push(format!("{url}: SHA-256 {sum}, pinned {}", file.sha256)),
            Err(e) => why.push(format!("{url}: {e:#}")),
        }
    }
    Err(why.join("; "))
}

pub fn cache_root() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache/zerotrace/vm"))
}

fn mirror() -> String {
    std::env::var("ZEROTRACE_DEBIAN_MIRROR")
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| MIRROR.to_string())
        .trim_end_matches('/')
        .to_string()
}

pub fn fresh_dir(dir: &Path) -> Result<PathBuf> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir.to_path_buf())
}

fn curl(ctx: &Ctx, url: &str, dest: &Path) -> Result<()> {
    output(
        ctx.cmd("curl")
            .args(["-fsSL", "--retry", "3", "--connect-timeout", "20", "-o"])
            .arg(dest)
            .arg(url),
    )
    .map(drop)
}

pub fn sha256(ctx: &Ctx, file: &Path) -> Result<String> {
    let out = output(ctx.cmd("sha256sum").arg(file))?;
    out.split_whitespace()
        .next()
        .map(str::to_string)
        .context("sha256sum printed nothing")
}

/// apt on a private state directory: the Debian suites in [`SUITES`],
/// signed by Debian's archive keyring, package lists under the cache.
pub struct Apt<'a> {
    ctx: &'a Ctx,
    dir: PathBuf,
    updated: bool,
}

impl<'a> Apt<'a> {
    pub fn new(ctx: &'a Ctx, dir: PathBuf) -> Self {
        Self {
            ctx,
            dir,
            updated: false,
        }
    }

    fn options(&self) -> Vec<String> {
        let d = self.dir.display();
        // apt drops to `_apt` to download, which cannot write under a
        // user's home: download as whoever runs this.
        let user = if self.ctx.is_root {
            "root".to_string()
        } else {
            std::env::var("USER").unwrap_or_else(|_| "root".into())
        };
        vec![
            format!("Dir::Etc::SourceList={d}/sources.list"),
            format!("Dir::Etc::SourceParts={d}/sources.list.d"),
            format!("Dir::State::Lists={d}/lists"),
            format!("Dir::Cache={d}/cache"),
            format!("APT::Sandbox::User={user}"),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect()
    }

    /// Writes the sources and fetches the package lists, once per run.
    fn update(&mut self) -> Result<()> {
        if self.updated {
            return Ok(());
        }
        if !Path::new(KEYRING).is_file() {
            bail!("{KEYRING} is missing (package debian-archive-keyring)");
        }
        for sub in ["sources.list.d", "lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(self.dir.join(sub))?;
        }
        let mirror = mirror();
        let sources: String = SUITES
            .iter()
            .map(|(archive, suite)| {
                format!("deb [signed-by={KEYRING}] {mirror}/{archive} {suite} main\n")
            })
            .collect();
        fs::write(self.dir.join("sources.list"), sources)?;
        let started = Instant::now();
        say!(
            "vm-test",
            "apt-get update (Debian 11 and 12 package lists, private to the cache)…"
        );
        output(
            self.ctx
                .cmd("apt-get")
                .args(self.options())
                .args(["update", "-q"]),
        )
        .context("apt-get update of the kernel sources")?;
        say!(
            "vm-test",
            "package lists updated in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        self.updated = true;
        Ok(())
    }

    /// (package, highest version) of every package whose name starts with
    /// `prefix` and passes `keep`.
    pub fn packages(
        &mut self,
        prefix: &str,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Vec<(String, String)>> {
        self.update()?;
        let names = output(
            self.ctx
                .cmd("apt-cache")
                .args(self.options())
                .args(["pkgnames", prefix]),
        )?;
        let names: Vec<&str> = names.lines().map(str::trim).filter(|n| keep(n)).collect();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let madison = output(
            self.ctx
                .cmd("apt-cache")
                .args(self.options())
                .arg("madison")
                .args(&names),
        )?;
        Ok(madison_versions(&madison))
    }

    /// `apt-get download package=version` into `into` (apt checks it
    /// against the signed index).
    pub fn download(&mut self, package: &str, version: &str, into: &Path) -> Result<()> {
        self.update()?;
        output(
            self.ctx
                .cmd("apt-get")
                .args(self.options())
                .args(["download", "-q"])
                .arg(format!("{package}={version}"))
                .current_dir(into),
        )
        .map(drop)
        .with_context(|| format!("apt-get download {package}={version}"))
    }
}

/// (package, version) pairs from `apt-cache madison` (one per line:
/// `package | version | source`), the first (highest) version of each.
fn madison_versions(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let mut parts = line.split('|').map(str::trim);
        let (Some(package), Some(version)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !package.is_empty() && !out.iter().any(|(p, _)| p == package) {
            out.push((package.to_string(), version.to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_madison() {
        let text = " linux-image-6.1.0-57-cloud-amd64 | 6.1.192-3 | http://deb.debian.org/debian-security bookworm-security/main amd64 Packages\n\
                     linux-image-6.1.0-50-cloud-amd64 | 6.1.176-1 | http://deb.debian.org/debian bookworm/main amd64 Packages\n\
                     linux-image-6.1.0-50-cloud-amd64 | 6.1.176-1 | http://deb.debian.org/debian-security bookworm-security/main amd64 Packages\n";
        assert_eq!(
            madison_versions(text),
            [
                (
                    "linux-image-6.1.0-57-cloud-amd64".into(),
                    "6.1.192-3".into()
                ),
                (
                    "linux-image-6.1.0-50-cloud-amd64".into(),
                    "6.1.176-1".into()
                )
            ]
        );
    }
}
