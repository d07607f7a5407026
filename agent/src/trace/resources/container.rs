//! Which container a process runs in, from the text of /proc/PID/cgroup:
//! the container runtime names the process's cgroup after the container id
//! (64 hex digits), and the kubelet puts it under a cgroup named after the
//! pod UID. Pure functions over the text; [`of_process`] reads the file.
//!
//! Shapes seen in the wild (cgroup v1 lines are `ID:CONTROLLERS:PATH`, the
//! cgroup v2 line is `0::PATH`):
//!
//! - containerd/CRI, cgroupfs driver: `/kubepods/burstable/pod<uid>/<id>`
//! - containerd/CRI, systemd driver: `/kubepods.slice/kubepods-burstable.slice/
//!   kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope`
//! - CRI-O: `…/crio-<id>.scope` (`crio-conmon-<id>.scope` is its monitor, not
//!   the container)
//! - Docker: `/docker/<id>`, `/system.slice/docker-<id>.scope`
//! - podman: `…/libpod-<id>.scope`, rootless `…/libpod-<id>.scope/container`
//! - inside a cgroup namespace other processes' paths are relative to it:
//!   `0::/../../kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope`

/// The container a process runs in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerRef {
    /// 64 lowercase hex digits, as the runtime reports it (without the
    /// `containerd://` scheme Kubernetes puts in front).
    pub id: String,
    /// The pod's UID (with dashes) when the path shows one.
    pub pod_uid: Option<String>,
}

/// Reads /proc/PID/cgroup; `None` when the process is in no container (or gone).
pub fn of_process(tgid: u32) -> Option<ContainerRef> {
    let text = std::fs::read_to_string(format!("/proc/{tgid}/cgroup")).ok()?;
    parse_cgroup(&text)
}

/// The container named by the first line of a /proc/PID/cgroup text that
/// names one.
pub fn parse_cgroup(text: &str) -> Option<ContainerRef> {
    text.lines().find_map(parse_line)
}

/// One `HIERARCHY:CONTROLLERS:PATH` line.
fn parse_line(line: &str) -> Option<ContainerRef> {
    let mut fields = line.splitn(3, ':');
    let (_hierarchy, _controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
    parse_path(path.trim_end())
}

/// A cgroup path: the innermost segment that is a container wins (a
/// container can make cgroups of its own below its cgroup).
fn parse_path(path: &str) -> Option<ContainerRef> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let at = segments.iter().rposition(|s| container_id(s).is_some())?;
    let id = container_id(segments[at])?.to_owned();
    let pod_uid = segments[..at].iter().rev().find_map(|s| pod_uid(s));
    Some(ContainerRef { id, pod_uid })
}

/// Runtime prefixes before the id in systemd scope names (and CRI-O's
/// cgroupfs names).
const PREFIXES: [&str; 5] = [
    "cri-containerd-",
    "crio-",
    "docker-",
    "libpod-",
    "containerd-",
];

/// The container id a segment names: the bare id, or `<runtime>-<id>.scope`.
fn container_id(segment: &str) -> Option<&str> {
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    // Monitors named after the container they watch.
    if name.starts_with("crio-conmon-") || name.starts_with("libpod-conmon-") {
        return None;
    }
    let id = PREFIXES
        .iter()
        .find_map(|p| name.strip_prefix(p))
        .unwrap_or(name);
    is_container_id(id).then_some(id)
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The pod UID in `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_>.slice`
/// (systemd, dashes escaped as underscores); returned with dashes.
fn pod_uid(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".slice").unwrap_or(segment);
    let at = name.rfind("pod")?;
    let uid = &name[at + 3..];
    let well_formed = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-' || b == b'_',
            _ => b.is_ascii_hexdigit(),
        });
    well_formed.then(|| uid.replace('_', "-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "8f2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f809";
    const UID: &str = "6b8f6d2e-1c3a-4b5d-9e7f-0a1b2c3d4e5f";

    /// (container id, pod UID).
    type Found = Option<(String, Option<String>)>;

    fn found(text: &str) -> Found {
        parse_cgroup(text).map(|c| (c.id, c.pod_uid))
    }

    #[test]
    fn container_lines_in_the_wild() {
        let uid_ = UID.replace('-', "_");
        let with_pod = Some((ID.to_owned(), Some(UID.to_owned())));
        let without_pod = Some((ID.to_owned(), None));
        let table: Vec<(String, Found)> = vec![
            // containerd, cgroupfs driver, cgroup v1 (GKE COS, kubeadm, k3s).
            (
                format!("12:pids:/kubepods/burstable/pod{UID}/{ID}"),
                with_pod.clone(),
            ),
            (
                format!("4:memory:/kubepods/besteffort/pod{UID}/{ID}"),
                with_pod.clone(),
            ),
            // Guaranteed QoS: no QoS level in the path.
            (
                format!("3:cpu,cpuacct:/kubepods/pod{UID}/{ID}"),
                with_pod.clone(),
            ),
            // containerd, systemd driver, cgroup v2 (EKS AL2023, GKE, kubeadm).
            (
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"
                ),
                with_pod.clone(),
            ),
            (
                format!("0::/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{ID}.scope"),
                with_pod.clone(),
            ),
            // k3s on cgroup v2 (cgroupfs driver, k3s' own root).
            (
                format!("0::/kubepods/besteffort/pod{UID}/{ID}"),
                with_pod.clone(),
            ),
            // CRI-O (OpenShift): the container scope, and its monitor (not it).
            (
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/crio-{ID}.scope"
                ),
                with_pod.clone(),
            ),
            (
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/crio-conmon-{ID}.scope"
                ),
                None,
            ),
            // CRI-O, cgroupfs driver.
            (
                format!("0::/kubepods/burstable/pod{UID}/crio-{ID}"),
                with_pod.clone(),
            ),
            // Docker: cgroupfs (v1) and systemd (v2).
            (format!("11:devices:/docker/{ID}"), without_pod.clone()),
            (
                format!("0::/system.slice/docker-{ID}.scope"),
                without_pod.clone(),
            ),
            // podman: rootful, and rootless with its nested `container` cgroup.
            (
                format!("0::/machine.slice/libpod-{ID}.scope"),
                without_pod.clone(),
            ),
            (
                format!(
                    "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
                ),
                without_pod.clone(),
            ),
            (format!("0::/machine.slice/libpod-conmon-{ID}.scope"), None),
            // Seen from a DaemonSet in its own cgroup namespace.
            (
                format!("0::/../../kubepods-besteffort-pod{uid_}.slice/cri-containerd-{ID}.scope"),
                with_pod.clone(),
            ),
            // cgroup v1 named systemd hierarchy.
            (
                format!(
                    "1:name=systemd:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/cri-containerd-{ID}.scope"
                ),
                with_pod.clone(),
            ),
            // ECS / plain containerd (no pod).
            (
                format!("0::/ecs/0123456789abcdef/{ID}"),
                without_pod.clone(),
            ),
            // Not containers.
            ("0::/".to_owned(), None),
            (
                "0::/user.slice/user-1000.slice/session-3.scope".to_owned(),
                None,
            ),
            ("0::/system.slice/nginx.service".to_owned(), None),
            ("1:name=systemd:/init.scope".to_owned(), None),
            // Upper case and short ids are not runtime ids.
            (format!("0::/docker/{}", ID.to_uppercase()), None),
            (format!("0::/docker/{}", &ID[..63]), None),
            ("".to_owned(), None),
            ("garbage without colons".to_owned(), None),
        ];
        for (line, want) in table {
            assert_eq!(found(&line), want, "{line}");
        }
    }

    #[test]
    fn cgroup_v1_files_with_many_lines() {
        // A real v1 file: the container shows in every controller but the
        // unified line, which is "/" in hybrid mode.
        let text = format!(
            "12:hugetlb:/kubepods/besteffort/pod{UID}/{ID}\n\
             11:pids:/kubepods/besteffort/pod{UID}/{ID}\n\
             10:memory:/kubepods/besteffort/pod{UID}/{ID}\n\
             9:cpuset:/kubepods/besteffort/pod{UID}/{ID}\n\
             1:name=systemd:/kubepods/besteffort/pod{UID}/{ID}\n\
             0::/\n"
        );
        assert_eq!(found(&text), Some((ID.to_owned(), Some(UID.to_owned()))));
        // Only one controller moved (this host's tests do that).
        let text = format!(
            "12:hugetlb:/\n11:pids:/kubepods/besteffort/pod{UID}/{ID}\n1:name=systemd:/user.slice\n0::/user.slice\n"
        );
        assert_eq!(found(&text), Some((ID.to_owned(), Some(UID.to_owned()))));
        let host = "12:hugetlb:/\n11:pids:/user.slice/user-0.slice/session-1.scope\n0::/user.slice/user-0.slice/session-1.scope\n";
        assert_eq!(found(host), None);
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // xorshift64 with a fixed seed: the same inputs every run.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"0123456789abcdef:/-_.podscopeslicecri-containerd-crio-\n\xff\xc3";
        for _ in 0..20_000 {
            let len = (next() % 200) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    let r = next();
                    if r % 4 == 0 {
                        r as u8
                    } else {
                        alphabet[(r >> 8) as usize % alphabet.len()]
                    }
                })
                .collect();
            let _ = parse_cgroup(&String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn own_process_reads_without_error() {
        // Whatever this test runs in, reading the file works and parses.
        let _ = of_process(std::process::id());
    }
}
