//! tracefs: where it is, mounting it when missing, and tracepoint formats.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The tracefs mount point, if tracefs is mounted.
pub fn find() -> Option<PathBuf> {
    CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
}

/// Finds tracefs, mounting it at /sys/kernel/tracing when it is missing.
/// Returns the path and whether this call mounted it.
pub fn ensure_mounted() -> anyhow::Result<(PathBuf, bool)> {
    if let Some(path) = find() {
        return Ok((path, false));
    }
    let target = Path::new(CANDIDATES[0]);
    nix::mount::mount(
        Some("tracefs"),
        target,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| {
        format!(
            "tracefs is not mounted and mounting it at {} failed",
            target.display()
        )
    })?;
    match find() {
        Some(path) => Ok((path, true)),
        None => bail!(
            "mounted tracefs at {} but it has no events/",
            target.display()
        ),
    }
}

/// Whether `category/name` exists as a tracepoint.
pub fn has_tracepoint(tracefs: &Path, category: &str, name: &str) -> bool {
    tracefs.join("events").join(category).join(name).is_dir()
}

/// Byte offset of `field` in the tracepoint's record, from its `format` file.
pub fn field_offset(
    tracefs: &Path,
    category: &str,
    name: &str,
    field: &str,
) -> anyhow::Result<u32> {
    let path = tracefs
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_field_offset(&text, field)
        .with_context(|| format!("field {field} not found in {}", path.display()))
}

/// Pure part of [`field_offset`]: finds `field:<type> <field>;\toffset:N;`.
pub fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let name = decl.rsplit([' ', '*']).next()?;
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        rest.trim()
            .strip_prefix("offset:")?
            .split(';')
            .next()?
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORK_6_18: &str = "name: sched_process_fork\nID: 366\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\
\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\
\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;\n\
\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";

    const FORK_6_1: &str = "format:\n\
\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
\tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;\n\
\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\
\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";

    #[test]
    fn reads_offsets_from_both_fork_layouts() {
        assert_eq!(parse_field_offset(FORK_6_18, "child_pid"), Some(20));
        assert_eq!(parse_field_offset(FORK_6_1, "child_pid"), Some(44));
        assert_eq!(parse_field_offset(FORK_6_1, "child_comm"), Some(28));
        assert_eq!(parse_field_offset(FORK_6_1, "nope"), None);
        assert_eq!(parse_field_offset("field:", "x"), None);
    }
}
