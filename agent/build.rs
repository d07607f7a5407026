//! Builds the eBPF object (nightly, bpfel-unknown-none) into OUT_DIR so the
//! agent can embed it. `AYA_BUILD_SKIP=1` (docs) and fuzzing builds
//! (`--cfg fuzzing`, which cargo-fuzz sets) embed an empty object instead:
//! they never load programs, and the nested eBPF build must not inherit
//! sanitizer flags.
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let skip = std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v == "true")
        || std::env::var_os("CARGO_CFG_FUZZING").is_some();
    if skip {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("zerotrace-ebpf");
        std::fs::write(out, [])?;
        return Ok(());
    }
    let package = aya_build::Package {
        name: "agent-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
