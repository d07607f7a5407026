//! Builds the eBPF object (nightly, bpfel-unknown-none) into OUT_DIR so the
//! agent can embed it. `AYA_BUILD_SKIP=1` (docs) and fuzzing builds
//! (`--cfg fuzzing`, which cargo-fuzz sets) embed an empty object instead:
//! they never load programs, and the nested eBPF build must not inherit
//! sanitizer flags.
//!
//! The nested `cargo build` runs the way aya-build runs it (`rustup run
//! nightly cargo build -Z build-std=core --target bpfel-unknown-none`, BTF
//! linked in), but its output is kept: a build script can only pass lines on
//! as `cargo:warning`, so forwarding them made hundreds of "warning: agent:
//! Compiling …" lines out of a healthy build. They are shown when the nested
//! build fails, and then in full.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

/// The eBPF crate and the binary it builds (`include_bytes!` in kernel/loader.rs).
const PACKAGE: &str = "agent-ebpf";
const BINARY: &str = "zerotrace-ebpf";
const TARGET: &str = "bpfel-unknown-none";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v == "true")
        || env::var_os("CARGO_CFG_FUZZING").is_some();
    if skip {
        std::fs::write(out_dir.join(BINARY), [])?;
        return Ok(());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent-ebpf");
    // The build-dependency on agent-ebpf covers its library; its binary's
    // sources are watched here.
    println!("cargo:rerun-if-changed={}", root.display());

    let target_dir = out_dir.join("ebpf-target");
    let mut cargo = match which_rustup() {
        Some(rustup) => {
            let mut c = Command::new(rustup);
            c.args(["run", "nightly", "cargo"]);
            c
        }
        None => Command::new("cargo"),
    };
    cargo
        .current_dir(&root)
        .args(["build", "--package", PACKAGE, "--bin", BINARY, "--release"])
        .args(["--target", TARGET, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        // Separated by 0x1f, as CARGO_ENCODED_RUSTFLAGS wants.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                &format!(
                    "--cfg=bpf_target_arch=\"{}\"",
                    env::var("CARGO_CFG_TARGET_ARCH")?
                ),
                "-Cdebuginfo=2",
                "-Clink-arg=--btf",
            ]
            .join("\x1f"),
        )
        // The outer build's compiler and wrapper are the host toolchain's.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        // A colour-coded failure is easier to read where cargo shows it.
        .env("CARGO_TERM_COLOR", "always");
    let output = cargo
        .output()
        .with_context(|| format!("cannot start the eBPF build: {cargo:?}"))?;
    if !output.status.success() {
        // cargo prints a failing build script's stderr under "--- stderr".
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        bail!(
            "building the eBPF programs ({PACKAGE}, nightly, {TARGET}) failed ({}); \
             `cargo xtask setup` installs what it needs",
            output.status
        );
    }
    let built = target_dir.join(TARGET).join("release").join(BINARY);
    std::fs::copy(&built, out_dir.join(BINARY))
        .with_context(|| format!("the eBPF build left no {}", built.display()))?;
    Ok(())
}

/// rustup from PATH, if there is one (without it the PATH's cargo must be a
/// nightly with rust-src).
fn which_rustup() -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join("rustup"))
        .find(|p| p.is_file())
}
