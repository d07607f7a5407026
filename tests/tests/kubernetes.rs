//! End-to-end: container and Kubernetes metadata on spans' resources. Real
//! HTTP servers run in cgroups named the way container runtimes name them
//! (cgroup v1 cgroupfs and cgroup v2 systemd layouts), the agent watches a
//! stand-in API server that serves recorded Kubernetes API JSON, and the
//! test checks the resources an OTLP receiver gets — through pod churn.
//! Needs root.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use serde_json::Value;
use zerotrace_tests::{
    kube_api::{KubeApi, Seen, fixture, fixtures},
    otlp::{Protocol, ReceivedSpan, Receiver},
    servers::curl,
    spans::{WAIT, briefs},
    *,
};

const NODE: &str = "zt-node-1";

fn container_id(name: &str) -> String {
    fixture("container-ids.json")[name]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A pod's UID, from the list or from the watch events.
fn pod_uid(name: &str) -> String {
    let listed = fixture("pods.json")["items"].as_array().unwrap().clone();
    let events = fs::read_to_string(fixtures().join("watch-cart-added.jsonl")).unwrap();
    let watched = events
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["object"].clone());
    listed
        .into_iter()
        .chain(watched)
        .find(|p| p["metadata"]["name"] == name)
        .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_owned))
        .unwrap()
}

/// `python3 -m http.server` started inside a cgroup (it writes its own pid
/// to cgroup.procs, then execs): its /proc/PID/cgroup names the container
/// from the first syscall on. Killed and its cgroups removed when dropped.
struct ContainerServer {
    child: Child,
    port: u16,
    leaf: PathBuf,
    /// Directories this server created, outermost first.
    created: Vec<PathBuf>,
    _cwd: tempfile::TempDir,
}

impl ContainerServer {
    /// containerd with the cgroupfs driver, cgroup v1 (pids controller):
    /// /kubepods/besteffort/pod<uid>/<id>.
    fn cgroup_v1(pod_uid: &str, id: &str) -> Self {
        Self::start(
            Path::new("/sys/fs/cgroup/pids"),
            &format!("kubepods/besteffort/pod{pod_uid}/{id}"),
        )
    }

    /// containerd with the systemd driver, cgroup v2:
    /// /kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope.
    fn cgroup_v2(pod_uid: &str, id: &str) -> Self {
        let uid_ = pod_uid.replace('-', "_");
        Self::start(
            Path::new("/sys/fs/cgroup/unified"),
            &format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/cri-containerd-{id}.scope"
            ),
        )
    }

    fn start(root: &Path, relative: &str) -> Self {
        let mut created = Vec::new();
        let mut dir = root.to_path_buf();
        for part in relative.split('/') {
            dir.push(part);
            if !dir.exists() {
                fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
                created.push(dir.clone());
            }
        }
        let port = free_port();
        let cwd = tempfile::tempdir().unwrap();
        let script = format!(
            "echo $$ > {procs} && exec python3 -m http.server {port} --bind 127.0.0.1",
            procs = dir.join("cgroup.procs").display()
        );
        let child = Command::new("sh")
            .args(["-c", &script])
            .current_dir(cwd.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Self {
            child,
            port,
            leaf: dir,
            created,
            _cwd: cwd,
        };
        wait_for_port(port, Duration::from_secs(10)).unwrap();
        let cgroup = fs::read_to_string(format!("/proc/{}/cgroup", server.child.id())).unwrap();
        assert!(cgroup.contains(relative), "not in its cgroup: {cgroup}");
        server
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for ContainerServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Anything left (there should be nothing) goes back to the root.
        let root = self
            .created
            .first()
            .and_then(|d| d.parent())
            .map(Path::to_path_buf);
        if let (Ok(pids), Some(root)) = (fs::read_to_string(self.leaf.join("cgroup.procs")), root) {
            for pid in pids.lines() {
                let _ = fs::write(root.join("cgroup.procs"), pid);
            }
        }
        for dir in self.created.iter().rev() {
            for _ in 0..50 {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// The server span of one request, found by its path and port.
fn server_span<'a>(spans: &'a [ReceivedSpan], port: u16, path: &str) -> Option<&'a ReceivedSpan> {
    spans.iter().find(|s| {
        s.kind == "SERVER"
            && s.attr_i64("server.port") == Some(i64::from(port))
            && s.attr_str("url.path") == Some(path)
    })
}

fn resource(span: &ReceivedSpan, key: &str) -> Option<String> {
    span.resource.get(key)?.as_str().map(str::to_owned)
}

/// Every (key, value) is a string attribute of the span's resource.
fn assert_resource(span: &ReceivedSpan, want: &[(&str, String)]) {
    for (key, value) in want {
        assert_eq!(
            resource(span, key).as_ref(),
            Some(value),
            "{key}: {}",
            span.brief()
        );
    }
}

/// GETs a path and waits for its server span.
fn request(rx: &Receiver, server: &ContainerServer, path: &str) -> ReceivedSpan {
    let _ = curl(&[&server.url(path)]);
    let spans = rx
        .wait_for(WAIT, path, |s| server_span(s, server.port, path).is_some())
        .unwrap();
    server_span(&spans, server.port, path).unwrap().clone()
}

fn agent_env<'a>(rx: &'a Receiver, endpoint: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", rx.protocol_name()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ]
}

/// `zerotrace run` with these variables and none of the outer
/// environment's Kubernetes or service-name settings.
fn run_agent(envs: &[(&str, &str)]) -> Agent {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("run");
    for var in [
        "KUBERNETES_SERVICE_HOST",
        "KUBERNETES_SERVICE_PORT",
        "ZEROTRACE_KUBERNETES_METADATA",
        "ZEROTRACE_NODE_NAME",
        "ZEROTRACE_KUBECONFIG",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    Agent::spawn(cmd, "tracing").unwrap()
}

#[test]
fn pods_metadata_follows_the_api_server_through_pod_churn() {
    if !can_trace() {
        return;
    }
    let api = KubeApi::start(NODE).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path()).unwrap();
    let rx = Receiver::start(Protocol::HttpProtobuf).unwrap();
    let checkout_uid = pod_uid("checkout-7c9d8f6b5d-x2k4p");
    let checkout = ContainerServer::cgroup_v1(&checkout_uid, &container_id("checkout"));

    let endpoint = rx.endpoint();
    let mut envs = agent_env(&rx, &endpoint);
    let kubeconfig = kubeconfig.display().to_string();
    envs.extend([
        ("ZEROTRACE_KUBERNETES_METADATA", "on"),
        ("ZEROTRACE_KUBECONFIG", kubeconfig.as_str()),
        ("ZEROTRACE_NODE_NAME", NODE),
    ]);
    let mut agent = run_agent(&envs);
    assert!(
        api.wait_for(Duration::from_secs(20), Seen::is_watch),
        "no watch: {:?}",
        api.requests()
    );
    agent
        .wait_for_stderr("kubernetes: 4 pods", Duration::from_secs(20))
        .unwrap();

    // A listed pod: Deployment through its ReplicaSet, name from its label.
    let span = request(&rx, &checkout, "/checkout");
    let want = [
        ("container.id", container_id("checkout")),
        ("k8s.pod.name", "checkout-7c9d8f6b5d-x2k4p".to_owned()),
        ("k8s.pod.uid", checkout_uid.clone()),
        ("k8s.namespace.name", "shop".to_owned()),
        ("k8s.container.name", "checkout".to_owned()),
        ("k8s.node.name", NODE.to_owned()),
        ("k8s.replicaset.name", "checkout-7c9d8f6b5d".to_owned()),
        ("k8s.deployment.name", "checkout".to_owned()),
        ("service.name", "checkout".to_owned()),
    ];
    assert_resource(&span, &want);

    // Churn. A new pod's container serves before the API server told us
    // about the pod: container.id only.
    let cart_uid = pod_uid("cart-5f6d7c8b9-q7w8e");
    let cart = ContainerServer::cgroup_v2(&cart_uid, &container_id("cart"));
    let early = request(&rx, &cart, "/early");
    assert_eq!(resource(&early, "container.id"), Some(container_id("cart")));
    assert_eq!(resource(&early, "k8s.pod.name"), None, "{}", early.brief());

    // The watch brings the new pod (ADDED while creating, MODIFIED running)
    // and deletes the old one.
    let events = |f: &str| fs::read_to_string(fixtures().join(f)).unwrap();
    api.push_events(&events("watch-cart-added.jsonl"));
    api.push_events(&events("watch-checkout-deleted.jsonl"));
    // The next span of the same process carries the pod (index updates are
    // asynchronous: ask until one does).
    let mut late = None;
    for i in 0..40 {
        let span = request(&rx, &cart, &format!("/late-{i}"));
        if resource(&span, "k8s.container.name").is_some() {
            late = Some(span);
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    let late = late.unwrap_or_else(|| panic!("no span with the cart pod:{}", briefs(&rx.spans())));
    let want = [
        ("container.id", container_id("cart")),
        ("k8s.pod.name", "cart-5f6d7c8b9-q7w8e".to_owned()),
        ("k8s.pod.uid", cart_uid.clone()),
        ("k8s.namespace.name", "shop".to_owned()),
        ("k8s.container.name", "cart".to_owned()),
        ("k8s.node.name", NODE.to_owned()),
        ("k8s.replicaset.name", "cart-5f6d7c8b9".to_owned()),
        ("k8s.deployment.name", "cart".to_owned()),
        // No app.kubernetes.io/name label: the workload names the service.
        ("service.name", "cart".to_owned()),
    ];
    assert_resource(&late, &want);
    drop(agent.stop());

    // What the agent asked the API server for: its RBAC needs, exactly.
    let seen = api.requests();
    for s in &seen {
        eprintln!("  api server saw: {} {} {:?}", s.method, s.path, s.query);
        assert_eq!(s.method, "GET");
        assert_eq!(
            s.param("fieldSelector").is_some(),
            s.path == "/api/v1/pods",
            "{s:?}"
        );
        if s.path == "/api/v1/pods" {
            assert_eq!(s.param("fieldSelector"), Some("spec.nodeName=zt-node-1"));
        }
        assert_eq!(s.authorization.as_deref(), Some("Bearer zt-test-token"));
    }
    let paths: std::collections::BTreeSet<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(
        paths.into_iter().collect::<Vec<_>>(),
        [
            "/api/v1/pods",
            "/apis/apps/v1/namespaces/shop/replicasets/cart-5f6d7c8b9",
            "/apis/apps/v1/namespaces/shop/replicasets/checkout-7c9d8f6b5d",
            "/apis/batch/v1/namespaces/batch/jobs/report-28930140",
        ]
    );
    let list = seen
        .iter()
        .find(|s| s.path == "/api/v1/pods" && !s.is_watch())
        .unwrap();
    assert_eq!(list.param("resourceVersion"), None, "{list:?}");
    let watch = seen.iter().find(|s| s.is_watch()).unwrap();
    assert_eq!(watch.param("resourceVersion"), Some("48250"));
    assert_eq!(watch.param("allowWatchBookmarks"), Some("true"));
    // One list, one watch: the watch stayed up through the churn.
    assert_eq!(seen.iter().filter(|s| s.path == "/api/v1/pods").count(), 2);
    // Each owner was looked up once.
    assert_eq!(seen.len(), 5, "{seen:?}");
}

#[test]
fn outside_kubernetes_only_the_container_id_is_added() {
    if !can_trace() {
        return;
    }
    // An API server nobody points the agent at.
    let api = KubeApi::start(NODE).unwrap();
    let rx = Receiver::start(Protocol::HttpProtobuf).unwrap();
    let checkout = ContainerServer::cgroup_v1(
        &pod_uid("checkout-7c9d8f6b5d-x2k4p"),
        &container_id("checkout"),
    );
    let endpoint = rx.endpoint();
    let mut agent = run_agent(&agent_env(&rx, &endpoint));
    let span = request(&rx, &checkout, "/plain");
    assert_eq!(
        resource(&span, "container.id"),
        Some(container_id("checkout"))
    );
    let k8s: Vec<&String> = span
        .resource
        .keys()
        .filter(|k| k.starts_with("k8s."))
        .collect();
    assert!(k8s.is_empty(), "{}", span.brief());
    assert_eq!(
        resource(&span, "service.name")
            .as_deref()
            .map(|n| n.starts_with("python")),
        Some(true)
    );
    // A process outside any container has no container.id.
    let spans = rx.spans();
    let curl_span = spans
        .iter()
        .find(|s| s.kind == "CLIENT" && s.service() == Some("curl"))
        .unwrap_or_else(|| panic!("no curl span:{}", briefs(&spans)));
    assert_eq!(resource(curl_span, "container.id"), None);
    assert!(
        !agent.stderr_lines.iter().any(|l| l.contains("kubernetes")),
        "{:?}",
        agent.stderr_lines
    );
    let _ = agent.wait_for_stderr("never printed", Duration::from_millis(500));
    drop(agent.stop());
    assert!(api.requests().is_empty(), "{:?}", api.requests());
}

#[test]
fn an_unreachable_api_server_does_not_stop_tracing() {
    if !can_trace() {
        return;
    }
    // A kubeconfig pointing at a port nobody listens on.
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig.yaml");
    let server = format!("http://127.0.0.1:{}", free_port());
    fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: gone\n  cluster:\n    server: {server}\n\
             contexts:\n- name: gone\n  context:\n    cluster: gone\n    user: u\n\
             current-context: gone\nusers:\n- name: u\n  user:\n    token: t\n"
        ),
    )
    .unwrap();
    let rx = Receiver::start(Protocol::HttpProtobuf).unwrap();
    let checkout = ContainerServer::cgroup_v1(
        &pod_uid("checkout-7c9d8f6b5d-x2k4p"),
        &container_id("checkout"),
    );
    let endpoint = rx.endpoint();
    let mut envs = agent_env(&rx, &endpoint);
    let kubeconfig = kubeconfig.display().to_string();
    envs.extend([
        ("ZEROTRACE_KUBERNETES_METADATA", "on"),
        ("ZEROTRACE_KUBECONFIG", kubeconfig.as_str()),
        ("ZEROTRACE_NODE_NAME", NODE),
    ]);
    let mut agent = run_agent(&envs);
    agent
        .wait_for_stderr("watching pods on node", Duration::from_secs(20))
        .unwrap();
    let span = request(&rx, &checkout, "/offline");
    assert_eq!(
        resource(&span, "container.id"),
        Some(container_id("checkout"))
    );
    assert_eq!(resource(&span, "k8s.pod.name"), None);
    drop(agent.stop());
}

#[test]
fn metadata_on_without_a_cluster_is_a_configuration_error() {
    let out = Command::new(agent_bin())
        .args(["run", "--kubernetes-metadata", "on"])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("ZEROTRACE_KUBECONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("KUBERNETES_SERVICE_HOST"), "{stderr}");
}
