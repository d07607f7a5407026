use which::which;

/// Re-link when bpf-linker changes (e.g. rebuilt against a new nightly LLVM):
/// cargo cannot see that dependency on its own.
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
