//! The release build (`cargo xtask dist`) as a user gets it: a static binary
//! that needs nothing from the host's files, and the `FROM scratch` image
//! built on it (`cargo xtask image`). `cargo xtask test` builds both first and
//! passes their paths in ZEROTRACE_DIST_BIN and ZEROTRACE_DIST_IMAGE.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;
use zerotrace_tests::*;

/// A path `cargo xtask test` passes in `var`; a clear failure without it.
fn artifact(var: &str, made_by: &str) -> PathBuf {
    let Some(path) = std::env::var_os(var) else {
        panic!(
            "{var} is not set: run these tests through `cargo xtask test`, or run \
             `{made_by}` first and set {var} to the path it prints"
        );
    };
    let path = PathBuf::from(path);
    assert!(path.is_file(), "{var}={} does not exist", path.display());
    path
}

fn dist_bin() -> PathBuf {
    artifact("ZEROTRACE_DIST_BIN", "cargo xtask dist")
}

#[test]
fn dist_binary_is_static_and_has_the_workspace_version() {
    let bin = dist_bin();
    // What a user would look at: the program headers and the dynamic section.
    let headers = run(Command::new("readelf")
        .args(["--program-headers", "--wide"])
        .arg(&bin))
    .expect("readelf (binutils) reads the binary");
    assert!(
        !headers.contains("INTERP") && !headers.contains("program interpreter"),
        "the dist binary asks for a dynamic loader:\n{headers}"
    );
    let dynamic = run(Command::new("readelf")
        .args(["--dynamic", "--wide"])
        .arg(&bin))
    .unwrap();
    assert!(
        !dynamic.contains("(NEEDED)"),
        "the dist binary needs shared libraries:\n{dynamic}"
    );
    let version = run(Command::new(&bin).arg("--version")).unwrap();
    assert_eq!(
        version.trim(),
        format!("zerotrace {}", env!("CARGO_PKG_VERSION")),
        "--version of {}",
        bin.display()
    );
}

/// `zerotrace check` from a root that holds only the binary and fresh
/// /proc and /sys mounts (in a private mount namespace): no libc, no
/// /etc, no /dev, no tracefs mounted. It must load and verify the embedded
/// eBPF programs there.
#[test]
fn dist_binary_checks_the_kernel_from_an_empty_root() {
    let bin = dist_bin();
    if !can_trace() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    fs::copy(&bin, root.path().join("zerotrace")).unwrap();
    for dir in ["proc", "sys"] {
        fs::create_dir(root.path().join(dir)).unwrap();
    }
    let mut entries: Vec<String> = fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(entries, ["proc", "sys", "zerotrace"]);

    let in_empty_root = |args: &str| {
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "--fork", "sh", "-c"])
            .arg(format!(
                "mount -t proc proc \"$1/proc\" && mount -t sysfs sysfs \"$1/sys\" \
                 && exec chroot \"$1\" /zerotrace check {args}"
            ))
            .arg("sh")
            .arg(root.path());
        let out = c.output().expect("running unshare (util-linux)");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "zerotrace check in an empty root failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };

    let text = in_empty_root("");
    eprintln!("zerotrace check in an empty root:\n{text}");
    let programs = text
        .lines()
        .find(|l| l.starts_with("eBPF programs"))
        .unwrap_or_else(|| panic!("no eBPF programs row:\n{text}"));
    assert!(
        programs.contains(" yes ") && programs.contains("programs verified"),
        "{programs}"
    );
    assert!(text.contains("capture: ready"), "{text}");

    let report: Value = serde_json::from_str(&in_empty_root("--json")).unwrap();
    let row = |name: &str| check_row(&report, name);
    let programs = row("eBPF programs");
    assert_eq!(programs["available"], true, "{report}");
    let detail = programs["detail"].as_str().unwrap();
    let verified: u32 = detail
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{detail}"));
    assert!(
        verified > 0 && detail.contains("programs verified"),
        "{detail}"
    );
    // Nothing had tracefs mounted in that root: the agent mounted it itself.
    assert_eq!(row("tracefs")["available"], true, "{report}");
    assert_eq!(report["capture_ready"], true, "{report}");
}

/// Reads a blob of an unpacked OCI layout by its digest.
fn blob(layout: &Path, digest: &Value) -> PathBuf {
    let digest = digest.as_str().expect("digest is a string");
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    layout.join("blobs/sha256").join(hex)
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The OCI archive `cargo xtask image` writes: one layer holding exactly
/// the dist binary at /zerotrace, the entrypoint and the labels.
#[test]
fn image_holds_exactly_the_dist_binary() {
    let bin = dist_bin();
    let archive = artifact("ZEROTRACE_DIST_IMAGE", "cargo xtask image");
    let layout = tempfile::tempdir().unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(layout.path()))
    .unwrap();
    let index = json(&layout.path().join("index.json"));
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{index}");
    let manifest = json(&blob(layout.path(), &manifests[0]["digest"]));
    let config = json(&blob(layout.path(), &manifest["config"]["digest"]));

    assert_eq!(config["os"], "linux", "{config}");
    assert_eq!(config["architecture"], "amd64", "{config}");
    let run_config = &config["config"];
    assert_eq!(run_config["Entrypoint"], serde_json::json!(["/zerotrace"]));
    assert_eq!(
        run_config["Cmd"],
        serde_json::json!(["run", "--config", "/etc/zerotrace/zerotrace.yaml"])
    );
    let labels = &run_config["Labels"];
    assert_eq!(labels["org.opencontainers.image.title"], "zerotrace");
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(
        labels["org.opencontainers.image.licenses"],
        env!("CARGO_PKG_LICENSE")
    );
    for label in [
        "org.opencontainers.image.description",
        "org.opencontainers.image.source",
    ] {
        assert!(labels.get(label).is_some(), "no {label}: {labels}");
    }

    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "FROM scratch + one COPY: {manifest}");
    let layer = blob(layout.path(), &layers[0]["digest"]);
    let listing = run(Command::new("tar").arg("-tf").arg(&layer)).unwrap();
    let files: Vec<&str> = listing
        .lines()
        .map(|l| l.trim_start_matches("./"))
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(files, ["zerotrace"], "layer contents");
    let unpacked = tempfile::tempdir().unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(&layer)
        .arg("-C")
        .arg(unpacked.path()))
    .unwrap();
    let in_image = unpacked.path().join("zerotrace");
    let sha256 = |p: &Path| {
        run(Command::new("sha256sum").arg(p))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        sha256(&in_image),
        sha256(&bin),
        "/zerotrace in the image is not the dist binary"
    );
    let mode = fs::metadata(&in_image).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o111,
        0o111,
        "/zerotrace is not executable: {mode:o}"
    );
}
