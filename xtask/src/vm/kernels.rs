//! The kernels of the matrix: Debian cloud kernels, by default at **pinned**
//! package versions with their SHA-256, so an upstream point release cannot
//! change what CI boots without a change here; with `--newest`, the newest
//! version Debian's archive offers, to test a new release on purpose.
//!
//! Pinned packages are fetched straight from the archive's pool and checked
//! against the pin (archive.rs). Debian keeps only a few recent kernel ABIs:
//! when a pinned file is gone, the nearest ABI of the same series that the
//! archive still lists is booted instead, and the report says so.
//!
//! Cache: `~/.cache/zerotrace/vm/kernels/<package>_<version>/` keeps the
//! vmlinuz (with its SHA-256, checked on every use), the config and
//! `uname -r`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use super::archive::{self, Apt, PoolFile};
use crate::say;
use crate::util::{Ctx, output};

/// A Debian kernel package family.
pub struct Series {
    /// `--kernel` value and table label, e.g. "6.1".
    pub name: &'static str,
    /// Which Debian ships it.
    pub debian: &'static str,
    prefix: &'static str,
    suffix: &'static str,
}

pub const SERIES: [Series; 3] = [
    // The oldest long-term kernel the "Linux ≥ 5.8" promise covers.
    Series {
        name: "5.10",
        debian: "Debian 11 (bullseye)",
        prefix: "linux-image-5.10.0-",
        suffix: "-cloud-amd64",
    },
    Series {
        name: "6.1",
        debian: "Debian 12 (bookworm)",
        prefix: "linux-image-6.1.0-",
        suffix: "-cloud-amd64",
    },
    Series {
        name: "6.12",
        debian: "Debian 12 (bookworm), its newer kernel line",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-cloud-amd64",
    },
];

/// An exact package the matrix boots by default.
pub struct Pin {
    pub series: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    pub deb: PoolFile,
}

/// The pinned kernels. To move a pin: `apt-cache show PACKAGE` (with the
/// suite in apt's sources) gives Version, Filename and SHA256; `cargo xtask
/// vm-test --newest` shows what is newest and whether it passes.
pub const PINS: &[Pin] = &[
    Pin {
        series: "5.10",
        package: "linux-image-5.10.0-46-cloud-amd64",
        version: "5.10.262-1",
        deb: PoolFile {
            pool: "debian-security/pool/updates/main/l/linux-signed-amd64/\
               linux-image-5.10.0-46-cloud-amd64_5.10.262-1_amd64.deb",
            sha256: "18d94781d1b3052e21967ac2262239e5f14fbf511d6c3e110629d7aa35340760",
        },
    },
    Pin {
        series: "6.1",
        package: "linux-image-6.1.0-57-cloud-amd64",
        version: "6.1.192-3",
        deb: PoolFile {
            pool: "debian-security/pool/updates/main/l/linux-signed-amd64/\
               linux-image-6.1.0-57-cloud-amd64_6.1.192-3_amd64.deb",
            sha256: "4fdd0172a8c3f41a97e92465b2ac1867e1c10d82d7aeed3d26ee7a5d14df1754",
        },
    },
    Pin {
        series: "6.12",
        package: "linux-image-6.12.117+deb12-cloud-amd64",
        version: "6.12.117-1~deb12u1",
        deb: PoolFile {
            pool: "debian-security/pool/updates/main/l/linux-signed-6.12-amd64/\
               linux-image-6.12.117+deb12-cloud-amd64_6.12.117-1~deb12u1_amd64.deb",
            sha256: "5195b288dec79e2981d6b84457f38b7ce7310a2d702930ec7d07209c7f78ce37",
        },
    },
];

impl Series {
    #[cfg(test)]
    fn named(name: &str) -> Option<&'static Series> {
        SERIES.iter().find(|s| s.name == name)
    }

    /// The ABI / patch number of a package of this family, e.g. 56 for
    /// linux-image-6.1.0-56-cloud-amd64.
    fn number(&self, package: &str) -> Option<u32> {
        package
            .strip_prefix(self.prefix)?
            .strip_suffix(self.suffix)?
            .parse()
            .ok()
    }

    /// The newest package of this family among `names`.
    fn newest<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Option<String> {
        names
            .into_iter()
            .filter_map(|n| Some((self.number(n.trim())?, n.trim())))
            .max_by_key(|(n, _)| *n)
            .map(|(_, name)| name.to_string())
    }

    /// The package of this family among `names` whose number is closest to
    /// `package`'s (on a tie, the newer one).
    fn nearest<'a>(
        &self,
        package: &str,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Option<String> {
        let want = i64::from(self.number(package)?);
        names
            .into_iter()
            .filter_map(|n| Some((i64::from(self.number(n.trim())?), n.trim())))
            .min_by_key(|(n, _)| ((n - want).abs(), -n))
            .map(|(_, name)| name.to_string())
    }
}

/// How a kernel came to be booted.
#[derive(Clone, Debug, PartialEq)]
pub enum Origin {
    /// The pinned package, checksum verified.
    Pinned,
    /// `--newest`: the newest the archive offers.
    Newest,
    /// The pin could not be fetched; the nearest available ABI instead.
    Fallback { pinned: String, why: String },
}

/// An unpacked kernel ready to boot.
pub struct Kernel {
    pub series: &'static str,
    pub package: String,
    pub version: String,
    /// `uname -r` inside the guest, e.g. 6.1.0-57-cloud-amd64.
    pub release: String,
    pub vmlinuz: PathBuf,
    pub origin: Origin,
}

impl Kernel {
    /// "6.1.0-57-cloud-amd64 (6.1.192-3, pinned)" and the like.
    pub fn describe(&self) -> String {
        let how = match &self.origin {
            Origin::Pinned => "pinned".to_string(),
            Origin::Newest => "newest".to_string(),
            Origin::Fallback { pinned, .. } => format!("NOT PINNED: {pinned} unavailable"),
        };
        format!("{} ({}, {how})", self.release, self.version)
    }
}

/// Which versions to boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    Pinned,
    Newest,
}

/// The kernels to boot for `series` (all when empty), fetched and unpacked.
pub fn resolve(ctx: &Ctx, series: &[String], choice: Choice) -> Result<Vec<Kernel>> {
    let root = archive::cache_root()?;
    let kernels_dir = root.join("kernels");
    fs::create_dir_all(&kernels_dir)
        .with_context(|| format!("cannot create {}", kernels_dir.display()))?;
    let mut apt = Apt::new(ctx, root.join("apt"));
    let mut kernels = Vec::new();
    for s in SERIES
        .iter()
        .filter(|s| series.is_empty() || series.iter().any(|n| n == s.name))
    {
        let kernel = match choice {
            Choice::Newest => newest(ctx, &mut apt, s, &kernels_dir)?,
            Choice::Pinned => pinned(ctx, &mut apt, s, &kernels_dir)?,
        };
        say!(
            "vm-test",
            "kernel {}: {} — {}",
            s.name,
            kernel.describe(),
            s.debian
        );
        kernels.push(kernel);
    }
    prune(&kernels_dir, &kernels);
    // Kernels unpacked by earlier versions of this task, one directory per
    // package right under the cache root.
    if let Ok(entries) = fs::read_dir(&root) {
        for entry in entries.filter_map(|e| e.ok()) {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with("linux-image-")
            {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    Ok(kernels)
}

fn pinned(ctx: &Ctx, apt: &mut Apt, series: &'static Series, dir: &Path) -> Result<Kernel> {
    let pin = PINS
        .iter()
        .find(|p| p.series == series.name)
        .with_context(|| format!("no pinned kernel for series {}", series.name))?;
    let entry = dir.join(format!("{}_{}", pin.package, pin.version));
    if let Some(kernel) = cached(
        ctx,
        series,
        &entry,
        pin.package,
        pin.version,
        Origin::Pinned,
    ) {
        return Ok(kernel);
    }
    let started = Instant::now();
    let tmp = archive::fresh_dir(&dir.join(format!(".download-{}", pin.package)))?;
    let deb = tmp.join(format!("{}_{}.deb", pin.package, pin.version));
    let fetched = archive::fetch_pinned(ctx, &pin.deb, &deb);
    if fetched.is_ok() {
        let kernel = unpack(
            ctx,
            series,
            &deb,
            &entry,
            pin.package,
            pin.version,
            Origin::Pinned,
        )?;
        let _ = fs::remove_dir_all(&tmp);
        say!(
            "vm-test",
            "kernel {}: {} verified and unpacked in {:.1}s",
            series.name,
            pin.package,
            started.elapsed().as_secs_f64()
        );
        return Ok(kernel);
    }
    let _ = fs::remove_dir_all(&tmp);
    let why = fetched.err().unwrap_or_default();
    say!(
        "vm-test",
        "WARNING: kernel {}: the pinned {} {} cannot be fetched ({why}); looking for the nearest \
         available ABI",
        series.name,
        pin.package,
        pin.version
    );
    let available = apt.packages(series.prefix, |n| series.number(n).is_some())?;
    let names: Vec<&str> = available.iter().map(|(n, _)| n.as_str()).collect();
    let package = series
        .nearest(pin.package, names.iter().copied())
        .with_context(|| {
            format!(
                "the pinned {} is gone and the archive lists no {}N{} package",
                pin.package, series.prefix, series.suffix
            )
        })?;
    let version = available
        .iter()
        .find(|(n, _)| *n == package)
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let origin = Origin::Fallback {
        pinned: format!("{} {}", pin.package, pin.version),
        why,
    };
    say!(
        "vm-test",
        "WARNING: kernel {}: booting {package} {version} instead of the pin (not pinned: \
         update PINS in xtask/src/vm/kernels.rs)",
        series.name
    );
    fetch_with_apt(ctx, apt, series, dir, &package, &version, origin)
}

fn newest(ctx: &Ctx, apt: &mut Apt, series: &'static Series, dir: &Path) -> Result<Kernel> {
    let available = apt.packages(series.prefix, |n| series.number(n).is_some())?;
    let package = series
        .newest(available.iter().map(|(n, _)| n.as_str()))
        .with_context(|| {
            format!(
                "the archive lists no {}N{} package",
                series.prefix, series.suffix
            )
        })?;
    let version = available
        .iter()
        .find(|(n, _)| *n == package)
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    fetch_with_apt(ctx, apt, series, dir, &package, &version, Origin::Newest)
}

/// Downloads `package=version` with apt (which checks it against the signed
/// index), unless the cache has it.
fn fetch_with_apt(
    ctx: &Ctx,
    apt: &mut Apt,
    series: &'static Series,
    dir: &Path,
    package: &str,
    version: &str,
    origin: Origin,
) -> Result<Kernel> {
    let entry = dir.join(format!("{package}_{version}"));
    if let Some(kernel) = cached(ctx, series, &entry, package, version, origin.clone()) {
        return Ok(kernel);
    }
    let started = Instant::now();
    let tmp = archive::fresh_dir(&dir.join(format!(".download-{package}")))?;
    say!(
        "vm-test",
        "kernel {}: downloading {package} {version} (apt-get download)…",
        series.name
    );
    apt.download(package, version, &tmp)?;
    let deb = fs::read_dir(&tmp)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", tmp.display()))?;
    let kernel = unpack(ctx, series, &deb, &entry, package, version, origin)?;
    let _ = fs::remove_dir_all(&tmp);
    say!(
        "vm-test",
        "kernel {}: {package} unpacked in {:.1}s",
        series.name,
        started.elapsed().as_secs_f64()
    );
    Ok(kernel)
}

/// A cache entry, if complete and its vmlinuz still has the recorded SHA-256.
fn cached(
    ctx: &Ctx,
    series: &'static Series,
    entry: &Path,
    package: &str,
    version: &str,
    origin: Origin,
) -> Option<Kernel> {
    let vmlinuz = entry.join("vmlinuz");
    let release = fs::read_to_string(entry.join("release")).ok()?;
    let recorded = fs::read_to_string(entry.join("vmlinuz.sha256")).ok()?;
    if archive::sha256(ctx, &vmlinuz).ok()? != recorded.trim() {
        say!(
            "vm-test",
            "kernel {}: cached {} does not match its checksum; fetching it again",
            series.name,
            vmlinuz.display()
        );
        return None;
    }
    Some(Kernel {
        series: series.name,
        package: package.to_string(),
        version: version.to_string(),
        release: release.trim().to_string(),
        vmlinuz,
        origin,
    })
}

/// `dpkg -x` the package and keeps /boot/vmlinuz-* and its config in `entry`.
fn unpack(
    ctx: &Ctx,
    series: &'static Series,
    deb: &Path,
    entry: &Path,
    package: &str,
    version: &str,
    origin: Origin,
) -> Result<Kernel> {
    let root = deb.with_extension("root");
    output(ctx.cmd("dpkg").arg("-x").arg(deb).arg(&root))
        .with_context(|| format!("dpkg -x {}", deb.display()))?;
    let boot = root.join("boot");
    let image = fs::read_dir(&boot)
        .with_context(|| format!("{package} has no /boot"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("vmlinuz-"))
        .with_context(|| format!("{package} has no /boot/vmlinuz-*"))?;
    let release = image["vmlinuz-".len()..].to_string();
    let staging = archive::fresh_dir(&entry.with_extension("partial"))?;
    fs::copy(boot.join(&image), staging.join("vmlinuz"))?;
    let sum = archive::sha256(ctx, &staging.join("vmlinuz"))?;
    fs::write(staging.join("vmlinuz.sha256"), format!("{sum}\n"))?;
    let config = boot.join(format!("config-{release}"));
    if config.is_file() {
        fs::copy(&config, staging.join("config"))?;
    }
    fs::write(staging.join("release"), format!("{release}\n"))?;
    let _ = fs::remove_dir_all(&root);
    if entry.exists() {
        fs::remove_dir_all(entry).with_context(|| format!("cannot remove {}", entry.display()))?;
    }
    fs::rename(&staging, entry)
        .with_context(|| format!("cannot move the kernel into {}", entry.display()))?;
    Ok(Kernel {
        series: series.name,
        package: package.to_string(),
        version: version.to_string(),
        release,
        vmlinuz: entry.join("vmlinuz"),
        origin,
    })
}

/// Removes cached kernels that are neither pinned nor booted by this run.
fn prune(dir: &Path, keep: &[Kernel]) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pinned = PINS
            .iter()
            .any(|p| name == format!("{}_{}", p.package, p.version));
        let used = keep
            .iter()
            .any(|k| name == format!("{}_{}", k.package, k.version));
        if !pinned && !used {
            let _ = fs::remove_dir_all(entry.path());
            say!("vm-test", "removed the cached {name}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_newest_and_the_nearest_kernel_package() {
        let names = "linux-image-6.1.0-9-cloud-amd64\nlinux-image-6.1.0-56-cloud-amd64\n\
                     linux-image-6.1.0-56-cloud-amd64-unsigned\nlinux-image-6.1.0-55-cloud-amd64\n\
                     linux-image-6.1.0-56-cloud-amd64-dbg\nlinux-image-6.1.0-56-amd64\n";
        let s61 = Series::named("6.1").unwrap();
        assert_eq!(
            s61.newest(names.lines()).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        // The pin (57) is gone: 56 is nearest; with 55 and 59 left, 59 wins
        // the tie against… nothing: 55 is 2 away, 59 is 2 away → the newer.
        assert_eq!(
            s61.nearest("linux-image-6.1.0-57-cloud-amd64", names.lines())
                .as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        let tie = [
            "linux-image-6.1.0-55-cloud-amd64",
            "linux-image-6.1.0-59-cloud-amd64",
        ];
        assert_eq!(
            s61.nearest("linux-image-6.1.0-57-cloud-amd64", tie)
                .as_deref(),
            Some("linux-image-6.1.0-59-cloud-amd64")
        );
        let names = [
            "linux-image-6.12.99+deb12-cloud-amd64",
            "linux-image-6.12.117+deb12-cloud-amd64",
            "linux-image-6.12-cloud-amd64",
            "linux-image-6.12.117+deb12-amd64",
        ];
        let s612 = Series::named("6.12").unwrap();
        assert_eq!(
            s612.newest(names).as_deref(),
            Some("linux-image-6.12.117+deb12-cloud-amd64")
        );
        assert_eq!(s612.newest(["linux-image-6.1.0-56-cloud-amd64"]), None);
        assert_eq!(
            Series::named("5.10")
                .unwrap()
                .number("linux-image-5.10.0-46-cloud-amd64"),
            Some(46)
        );
    }

    #[test]
    fn every_series_has_one_well_formed_pin() {
        for series in &SERIES {
            let pins: Vec<&Pin> = PINS.iter().filter(|p| p.series == series.name).collect();
            assert_eq!(pins.len(), 1, "series {}", series.name);
            let pin = pins[0];
            assert!(series.number(pin.package).is_some(), "{}", pin.package);
            assert_eq!(pin.deb.sha256.len(), 64);
            assert!(pin.deb.sha256.bytes().all(|b| b.is_ascii_hexdigit()));
            assert!(
                pin.deb
                    .pool
                    .ends_with(&format!("{}_{}_amd64.deb", pin.package, pin.version)),
                "{}",
                pin.deb.pool
            );
        }
    }
}
