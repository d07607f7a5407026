//! Process helpers shared by the tasks: the environment children see (PATH with
//! `~/.cargo/bin`), root detection, running through `sudo -E`, and errors that
//! carry a child's exit code back to `main`.

use std::env;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{Context, Result, bail};

/// Prints one progress line to stderr, prefixed with the task name.
#[macro_export]
macro_rules! say {
    ($task:literal, $($arg:tt)*) => {
        eprintln!(concat!("[", $task, "] {}"), format_args!($($arg)*))
    };
}

/// A child process failed; `main` exits with its code.
#[derive(Debug)]
pub struct ChildFailed {
    pub what: String,
    pub status: ExitStatus,
}

impl ChildFailed {
    /// The exit code to hand on: the child's own, or 128 + signal.
    pub fn code(&self) -> i32 {
        use std::os::unix::process::ExitStatusExt;
        match (self.status.code(), self.status.signal()) {
            (Some(code), _) => code,
            (None, Some(sig)) => 128 + sig,
            (None, None) => 1,
        }
    }
}

impl fmt::Display for ChildFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` failed ({})", self.what, self.status)
    }
}

impl std::error::Error for ChildFailed {}

/// What every task needs to know about where it runs.
pub struct Ctx {
    /// Workspace root (the parent of `xtask/`).
    pub root: PathBuf,
    /// `$CARGO_HOME`, default `~/.cargo`.
    pub cargo_home: PathBuf,
    /// PATH for children: the caller's, with `$CARGO_HOME/bin` added when missing.
    pub path: OsString,
    /// True when `$CARGO_HOME/bin` had to be added to PATH.
    pub path_fixed: bool,
    /// The cargo that runs us (`$CARGO`), else `cargo` from PATH.
    pub cargo: OsString,
    /// Effective uid is 0.
    pub is_root: bool,
}

impl Ctx {
    pub fn new() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent directory")?
            .to_path_buf();
        let home = env::var_os("HOME").map(PathBuf::from);
        let cargo_home = match env::var_os("CARGO_HOME") {
            Some(h) if !h.is_empty() => PathBuf::from(h),
            _ => home
                .context("neither CARGO_HOME nor HOME is set")?
                .join(".cargo"),
        };
        let cargo_bin = cargo_home.join("bin");
        let old_path = env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = env::split_paths(&old_path).collect();
        let path_fixed = !dirs.iter().any(|d| d == &cargo_bin);
        if path_fixed {
            dirs.insert(0, cargo_bin);
        }
        let path = env::join_paths(dirs).context("PATH contains an invalid entry")?;
        let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let is_root = euid_is_root();
        Ok(Self {
            root,
            cargo_home,
            path,
            path_fixed,
            cargo,
            is_root,
        })
    }

    /// A command that sees our PATH and starts in the workspace root.
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("PATH", &self.path).current_dir(&self.root);
        c
    }

    /// `cargo ARGS` with the cargo that runs xtask, without the CARGO_PKG_*
    /// and CARGO_MANIFEST_* variables `cargo run` gave xtask: build scripts
    /// (ring's) watch them, and inheriting xtask's values would rebuild
    /// them whenever plain cargo and xtask alternate.
    pub fn cargo(&self) -> Command {
        let mut c = self.cmd(&self.cargo);
        for (key, _) in env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_MANIFEST_")
                || key == "CARGO_CRATE_NAME"
                || key == "CARGO_PRIMARY_PACKAGE"
                || key.starts_with("CARGO_BIN_")
            {
                c.env_remove(&*key);
            }
        }
        c
    }

    /// Looks `name` up in our PATH.
    pub fn which(&self, name: &str) -> Option<PathBuf> {
        env::split_paths(&self.path)
            .map(|d| d.join(name))
            .find(|p| is_executable(p))
    }

    /// `program` as root: directly when we are root, else through `sudo -E`.
    pub fn as_root(&self, program: impl AsRef<OsStr>, why: &str) -> Result<Command> {
        if self.is_root {
            return Ok(self.cmd(program));
        }
        self.require_sudo(why)?;
        let mut c = self.cmd("sudo");
        c.arg("-E").arg(program);
        Ok(c)
    }

    /// Fails with a clear message when we are not root and have no sudo.
    pub fn require_sudo(&self, why: &str) -> Result<()> {
        if self.which("sudo").is_none() {
            bail!("{why} needs root: run this as root (sudo is not installed)");
        }
        Ok(())
    }

    /// `target/` of this workspace (`$CARGO_TARGET_DIR` respected).
    pub fn target_dir(&self) -> PathBuf {
        match env::var_os("CARGO_TARGET_DIR") {
            Some(d) if !d.is_empty() => self.root.join(d),
            _ => self.root.join("target"),
        }
    }

    /// The agent binary for a profile.
    pub fn zerotrace_bin(&self, release: bool) -> PathBuf {
        let profile = if release { "release" } else { "debug" };
        self.target_dir().join(profile).join("zerotrace")
    }

    /// Shows `path` relative to the workspace root when it is inside it.
    pub fn rel<'a>(&self, path: &'a Path) -> std::path::Display<'a> {
        path.strip_prefix(&self.root).unwrap_or(path).display()
    }
}

fn euid_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .stderr(Stdio::null())
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The command line, for messages.
pub fn describe(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs with inherited stdio; a non-zero exit is a [`ChildFailed`].
pub fn run(c: &mut Command) -> Result<()> {
    let what = describe(c);
    let status = c
        .status()
        .with_context(|| format!("cannot start `{what}`"))?;
    if !status.success() {
        return Err(ChildFailed { what, status }.into());
    }
    Ok(())
}

/// Runs and returns stdout; a non-zero exit is an error that quotes stderr.
pub fn output(c: &mut Command) -> Result<String> {
    let what = describe(c);
    let out = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{what}`"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!("`{what}` failed ({}): {}", out.status, stderr.trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Replaces this process with `c`, so signals and the exit code pass straight
/// through. Returns only on failure.
pub fn exec(c: &mut Command) -> anyhow::Error {
    let what = describe(c);
    let err = c.exec();
    anyhow::Error::new(err).context(format!("cannot start `{what}`"))
}
