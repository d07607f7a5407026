//! Builds the eBPF object (nightly, bpfel-unknown-none) into OUT_DIR so the
//! agent can embed it. `AYA_BUILD_SKIP=1` skips it (e.g. for docs).
fn main() -> anyhow::Result<()> {
    let package = aya_build::Package {
        name: "agent-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
