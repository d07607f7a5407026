//! `cargo xtask install`: the release agent as a systemd service.
//!
//! Installs PREFIX/bin/zerotrace, /etc/systemd/system/zerotrace.service
//! (ExecStart pointing at that binary) and, only when they do not exist yet,
//! /etc/zerotrace/zerotrace.yaml and /etc/zerotrace/zerotrace.env: a user's
//! configuration is never overwritten. `--root DIR` stages everything under
//! DIR (like DESTDIR) and leaves the running system alone.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::say;
use crate::util::{Ctx, run};

/// Where the unit expects the binary (deploy/systemd/zerotrace.service).
const UNIT_BIN: &str = "/usr/local/bin/zerotrace";

#[derive(clap::Args)]
pub struct InstallArgs {
    /// Installation prefix of the binary (PREFIX/bin/zerotrace).
    #[arg(long, default_value = "/usr/local")]
    pub prefix: PathBuf,
    /// Stage the files under DIR instead of / (no systemctl call).
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
}

/// What goes where.
#[derive(Debug, PartialEq, Eq)]
pub enum Source {
    /// A file of the workspace or the build.
    File(PathBuf),
    /// Generated text (the unit with its ExecStart rewritten).
    Text(String),
}

/// One file to install.
#[derive(Debug, PartialEq, Eq)]
pub struct Item {
    pub source: Source,
    /// Absolute path on the target system (before `--root`).
    pub dest: PathBuf,
    pub mode: u32,
    /// false: keep an existing file (the user's configuration).
    pub overwrite: bool,
}

/// The files to install, for a workspace at `workspace`, the built binary
/// `bin`, the installation `prefix` and the unit's text.
pub fn plan(workspace: &Path, bin: &Path, prefix: &Path, unit: &str) -> Result<Vec<Item>> {
    if !prefix.is_absolute() {
        bail!("--prefix {} is not an absolute path", prefix.display());
    }
    let installed_bin = prefix.join("bin/zerotrace");
    let deploy = workspace.join("deploy");
    Ok(vec![
        Item {
            source: Source::File(bin.to_path_buf()),
            dest: installed_bin.clone(),
            mode: 0o755,
            overwrite: true,
        },
        Item {
            source: Source::Text(rewrite_exec_start(unit, &installed_bin)?),
            dest: "/etc/systemd/system/zerotrace.service".into(),
            mode: 0o644,
            overwrite: true,
        },
        Item {
            source: Source::File(deploy.join("zerotrace.yaml")),
            dest: "/etc/zerotrace/zerotrace.yaml".into(),
            mode: 0o644,
            overwrite: false,
        },
        // 0600: it may hold collector credentials (OTEL_EXPORTER_OTLP_HEADERS);
        // systemd reads it as root.
        Item {
            source: Source::File(deploy.join("systemd/zerotrace.env")),
            dest: "/etc/zerotrace/zerotrace.env".into(),
            mode: 0o600,
            overwrite: false,
        },
    ])
}

/// The unit with its one `ExecStart=` running `bin` instead of [`UNIT_BIN`].
pub fn rewrite_exec_start(unit: &str, bin: &Path) -> Result<String> {
    let bin = bin
        .to_str()
        .filter(|b| !b.contains(char::is_whitespace))
        .with_context(|| format!("{} cannot go into ExecStart=", bin.display()))?;
    let mut found = 0;
    let mut out = String::with_capacity(unit.len());
    for line in unit.lines() {
        if let Some(command) = line.strip_prefix("ExecStart=") {
            found += 1;
            let Some(args) = command.strip_prefix(UNIT_BIN) else {
                bail!("ExecStart= does not start with {UNIT_BIN}: {line}");
            };
            out.push_str("ExecStart=");
            out.push_str(bin);
            out.push_str(args);
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    if found != 1 {
        bail!("the unit has {found} ExecStart= lines, expected one");
    }
    Ok(out)
}

/// `dest` under the staging root.
pub fn staged(root: &Path, dest: &Path) -> PathBuf {
    root.join(dest.strip_prefix("/").unwrap_or(dest))
}

/// Writes one item; returns false when an existing file was kept.
fn install_item(root: &Path, item: &Item) -> Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    let dest = staged(root, &item.dest);
    if !item.overwrite && dest.exists() {
        return Ok(false);
    }
    let dir = dest.parent().context("destination has no parent")?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Write next to the destination, then rename: a running binary is
    // replaced, not rewritten in place ("text file busy").
    let tmp = dir.join(format!(
        ".{}.xtask-tmp",
        dest.file_name().unwrap_or_default().to_string_lossy()
    ));
    match &item.source {
        Source::File(src) => fs::copy(src, &tmp)
            .map(drop)
            .with_context(|| format!("cannot copy {} to {}", src.display(), tmp.display()))?,
        Source::Text(text) => {
            fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?
        }
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(item.mode))?;
    fs::rename(&tmp, &dest).with_context(|| format!("cannot install {}", dest.display()))?;
    Ok(true)
}

pub fn install(ctx: &Ctx, args: &InstallArgs) -> Result<()> {
    crate::build(ctx, true)?;
    let unit_path = ctx.root.join("deploy/systemd/zerotrace.service");
    let unit = fs::read_to_string(&unit_path)
        .with_context(|| format!("cannot read {}", unit_path.display()))?;
    let items = plan(&ctx.root, &ctx.zerotrace_bin(true), &args.prefix, &unit)?;
    let root = args.root.clone().unwrap_or_else(|| "/".into());
    for item in &items {
        let shown = staged(&root, &item.dest);
        if install_item(&root, item).with_context(|| {
            format!(
                "installing {} (run as root, or stage with --root DIR)",
                shown.display()
            )
        })? {
            say!("install", "{} ({:o})", shown.display(), item.mode);
        } else {
            say!(
                "install",
                "{} exists: kept (never overwritten)",
                shown.display()
            );
        }
    }
    if args.root.is_none() && Path::new("/run/systemd/system").is_dir() {
        run(ctx.cmd("systemctl").arg("daemon-reload"))?;
        say!("install", "systemctl daemon-reload done");
    }
    println!(
        "Next: set OTEL_EXPORTER_OTLP_ENDPOINT in /etc/zerotrace/zerotrace.env, review\n\
         /etc/zerotrace/zerotrace.yaml, then\n  \
         systemctl daemon-reload && systemctl enable --now zerotrace\n  \
         systemctl status zerotrace; curl -s 127.0.0.1:9464/ready"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIT: &str = include_str!("../../deploy/systemd/zerotrace.service");

    #[test]
    fn plans_binary_unit_and_config_without_overwriting_config() {
        let items = plan(
            Path::new("/ws"),
            Path::new("/t/release/zerotrace"),
            Path::new("/opt/zt"),
            UNIT,
        )
        .unwrap();
        let rows: Vec<_> = items
            .iter()
            .map(|i| (i.dest.to_str().unwrap(), i.mode, i.overwrite))
            .collect();
        assert_eq!(
            rows,
            [
                ("/opt/zt/bin/zerotrace", 0o755, true),
                ("/etc/systemd/system/zerotrace.service", 0o644, true),
                ("/etc/zerotrace/zerotrace.yaml", 0o644, false),
                ("/etc/zerotrace/zerotrace.env", 0o600, false),
            ]
        );
        assert_eq!(items[0].source, Source::File("/t/release/zerotrace".into()));
        assert_eq!(
            items[2].source,
            Source::File("/ws/deploy/zerotrace.yaml".into())
        );
        assert_eq!(
            items[3].source,
            Source::File("/ws/deploy/systemd/zerotrace.env".into())
        );
        let Source::Text(unit) = &items[1].source else {
            panic!("the unit is generated")
        };
        assert!(unit.contains(
            "\nExecStart=/opt/zt/bin/zerotrace run --config /etc/zerotrace/zerotrace.yaml\n"
        ));
        assert!(plan(Path::new("/ws"), Path::new("/b"), Path::new("opt"), UNIT).is_err());
    }

    #[test]
    fn exec_start_rewrite() {
        // The default prefix leaves the unit as it is.
        let same = rewrite_exec_start(UNIT, Path::new(UNIT_BIN)).unwrap();
        assert_eq!(same, UNIT);
        let other = rewrite_exec_start(UNIT, Path::new("/usr/bin/zerotrace")).unwrap();
        assert_eq!(other.lines().count(), UNIT.lines().count());
        assert_eq!(
            other
                .lines()
                .filter(|l| l.starts_with("ExecStart="))
                .collect::<Vec<_>>(),
            ["ExecStart=/usr/bin/zerotrace run --config /etc/zerotrace/zerotrace.yaml"]
        );
        assert!(rewrite_exec_start(UNIT, Path::new("/my dir/zerotrace")).is_err());
        assert!(rewrite_exec_start("[Service]\n", Path::new("/b")).is_err());
        let two = format!("{UNIT}ExecStart={UNIT_BIN} check\n");
        assert!(rewrite_exec_start(&two, Path::new("/b")).is_err());
        assert!(rewrite_exec_start("ExecStart=/bin/sh -c x\n", Path::new("/b")).is_err());
    }

    #[test]
    fn installs_into_a_staging_root_and_keeps_existing_config() {
        let root = std::env::temp_dir().join(format!("xtask-install-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let src = root.join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("a"), "new").unwrap();
        let item = |dest: &str, overwrite| Item {
            source: Source::File(src.join("a")),
            dest: dest.into(),
            mode: 0o600,
            overwrite,
        };
        let stage = root.join("stage");
        assert_eq!(staged(&stage, Path::new("/etc/x")), stage.join("etc/x"));
        let kept = stage.join("etc/zerotrace/kept");
        fs::create_dir_all(kept.parent().unwrap()).unwrap();
        fs::write(&kept, "mine").unwrap();
        assert!(!install_item(&stage, &item("/etc/zerotrace/kept", false)).unwrap());
        assert_eq!(fs::read_to_string(&kept).unwrap(), "mine");
        assert!(install_item(&stage, &item("/etc/zerotrace/new", false)).unwrap());
        assert!(install_item(&stage, &item("/etc/zerotrace/kept", true)).unwrap());
        assert_eq!(fs::read_to_string(&kept).unwrap(), "new");
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&kept).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        fs::remove_dir_all(&root).unwrap();
    }
}
