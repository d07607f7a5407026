//! One OpenTelemetry Resource per traced process: service.name from the
//! configured rules, else OTEL_SERVICE_NAME, else (in a pod) the
//! `app.kubernetes.io/name` label, the workload's or the pod's name, else
//! the executable name; plus process.*, host.name, container.id, k8s.* and
//! OTEL_RESOURCE_ATTRIBUTES.

pub mod container;
pub mod kubernetes;

use std::sync::Arc;

use crate::{IdMap, export::ProcessResource};

use opentelemetry::KeyValue;
use opentelemetry_sdk::Resource;

use self::{
    container::ContainerRef,
    kubernetes::{ContainerMeta, Metadata},
};
use crate::config::{ServiceRule, env};

/// Most processes whose resource is remembered.
const MAX_PROCESSES: usize = 4096;

/// What the resource of one process is built from.
#[derive(Debug, Clone)]
struct Process {
    exe_name: String,
    resource: Arc<ProcessResource>,
    /// Index of the port rule that named it, if one did.
    by_port: bool,
    /// Read once from /proc/PID/cgroup.
    container: Option<ContainerRef>,
    /// The pod index's generation when a container process's pod (or
    /// container) was not in it yet: rebuilt once the index changes.
    pending: Option<u64>,
}

pub struct Resources {
    rules: Vec<ServiceRule>,
    fallback_name: Option<String>,
    extra: Vec<KeyValue>,
    host_name: String,
    kubernetes: Option<Metadata>,
    processes: IdMap<u32, Process>,
}

impl Resources {
    pub fn new(rules: Vec<ServiceRule>) -> Self {
        let extra = env("OTEL_RESOURCE_ATTRIBUTES")
            .map(|s| parse_resource_attributes(&s))
            .unwrap_or_default();
        let fallback_name = env("OTEL_SERVICE_NAME").or_else(|| {
            extra
                .iter()
                .find(|kv| kv.key.as_str() == "service.name")
                .map(|kv| kv.value.to_string())
        });
        Self {
            rules,
            fallback_name,
            extra,
            // In a pod, the host name is the pod's: the node's name (downward
            // API) names the host instead.
            host_name: env("ZEROTRACE_NODE_NAME").unwrap_or_else(host_name),
            kubernetes: None,
            processes: IdMap::default(),
        }
    }

    /// Adds pod metadata to the resources of container processes.
    pub fn with_kubernetes(mut self, metadata: Option<Metadata>) -> Self {
        if let Some(k8s) = &metadata {
            k8s.node_name().clone_into(&mut self.host_name);
        }
        self.kubernetes = metadata;
        self
    }

    /// The agent's own resource (service.name `zerotrace`), for its self-telemetry.
    pub fn agent(&self) -> Resource {
        let mut resource = self.build(
            std::process::id(),
            "zerotrace",
            "zerotrace".to_owned(),
            None,
            None,
        );
        resource = Resource::builder_empty()
            .with_attributes(
                resource
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
                    .chain([KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))]),
            )
            .build();
        resource
    }

    /// The executable name of a process (cached with its resource).
    pub fn exe_name(&mut self, tgid: u32, comm: &str, server_port: Option<u16>) -> &str {
        &self.process(tgid, comm, server_port).exe_name
    }

    /// The resource of process `tgid`; `server_port` is the local port when
    /// the span is a server span, so port rules can name the service.
    pub fn of(&mut self, tgid: u32, comm: &str, server_port: Option<u16>) -> Arc<ProcessResource> {
        Arc::clone(&self.process(tgid, comm, server_port).resource)
    }

    /// Forgets a process (it exited, or its pid may be reused).
    pub fn forget(&mut self, tgid: u32) {
        self.processes.remove(&tgid);
    }

    fn process(&mut self, tgid: u32, comm: &str, server_port: Option<u16>) -> &Process {
        let port_rule = server_port.and_then(|port| {
            self.rules
                .iter()
                .position(|r| r.port == Some(port) && r.exe.is_none())
        });
        let generation = self.kubernetes.as_ref().map(Metadata::generation);
        let stale = match self.processes.get(&tgid) {
            None => true,
            // A port rule matched now that the process serves on the port,
            // or the pod index learned something since the pod was missing.
            Some(p) => {
                (port_rule.is_some() && !p.by_port)
                    || p.pending.is_some_and(|g| Some(g) != generation)
            }
        };
        if stale {
            let known = self.processes.remove(&tgid);
            if self.processes.len() >= MAX_PROCESSES {
                self.processes.clear();
            }
            let (exe_name, container) = match known {
                Some(p) => (p.exe_name, p.container),
                None => (
                    executable_name(tgid).unwrap_or_else(|| comm.to_owned()),
                    container::of_process(tgid),
                ),
            };
            let pod = match (&self.kubernetes, &container) {
                (Some(k8s), Some(c)) => k8s.lookup(&c.id, c.pod_uid.as_deref()),
                _ => None,
            };
            let complete = pod.as_ref().is_some_and(|p| p.container_name.is_some());
            let pending = match (generation, &container) {
                (Some(g), Some(_)) if !complete => Some(g),
                _ => None,
            };
            let (name, by_port) = self.service_name(&exe_name, server_port, pod.as_ref());
            let resource = ProcessResource::new(self.build(
                tgid,
                &exe_name,
                name,
                container.as_ref(),
                pod.as_ref(),
            ));
            self.processes.insert(
                tgid,
                Process {
                    exe_name,
                    resource,
                    by_port,
                    container,
                    pending,
                },
            );
        }
        &self.processes[&tgid]
    }

    fn service_name(
        &self,
        exe_name: &str,
        server_port: Option<u16>,
        pod: Option<&ContainerMeta>,
    ) -> (String, bool) {
        for rule in &self.rules {
            let exe_ok = rule.exe.as_deref().is_none_or(|e| e == exe_name);
            let port_ok = rule.port.is_none_or(|p| Some(p) == server_port);
            if exe_ok && port_ok {
                return (rule.name.clone(), rule.port.is_some());
            }
        }
        let from_pod = pod.map(|c| {
            let p = &c.pod;
            p.app_name
                .clone()
                .or_else(|| p.workload_name.clone())
                .unwrap_or_else(|| p.name.clone())
        });
        let name = self
            .fallback_name
            .clone()
            .or(from_pod)
            .unwrap_or_else(|| exe_name.to_owned());
        (name, false)
    }

    fn build(
        &self,
        tgid: u32,
        exe_name: &str,
        service: String,
        container: Option<&ContainerRef>,
        pod: Option<&ContainerMeta>,
    ) -> Resource {
        let mut attrs: Vec<KeyValue> = self
            .extra
            .iter()
            .filter(|kv| kv.key.as_str() != "service.name")
            .cloned()
            .collect();
        attrs.extend([
            KeyValue::new("service.name", service),
            KeyValue::new("process.pid", i64::from(tgid)),
            KeyValue::new("process.executable.name", exe_name.to_owned()),
            KeyValue::new("host.name", self.host_name.clone()),
            KeyValue::new("telemetry.distro.name", "zerotrace"),
            KeyValue::new("telemetry.distro.version", env!("CARGO_PKG_VERSION")),
        ]);
        if let Some(c) = container {
            attrs.push(KeyValue::new("container.id", c.id.clone()));
        }
        if let Some(c) = pod {
            let p = &c.pod;
            let node = p
                .node_name
                .clone()
                .or_else(|| self.kubernetes.as_ref().map(|k| k.node_name().to_owned()));
            attrs.extend([
                KeyValue::new("k8s.pod.name", p.name.clone()),
                KeyValue::new("k8s.pod.uid", p.uid.clone()),
                KeyValue::new("k8s.namespace.name", p.namespace.clone()),
            ]);
            attrs.extend(node.map(|n| KeyValue::new("k8s.node.name", n)));
            attrs.extend(
                c.container_name
                    .clone()
                    .map(|n| KeyValue::new("k8s.container.name", n)),
            );
            attrs.extend(p.workload.iter().map(|(k, v)| KeyValue::new(*k, v.clone())));
        }
        Resource::builder_empty().with_attributes(attrs).build()
    }
}

/// `key=value,key2=value2`, values percent-decoded as the spec says;
/// malformed pairs are skipped.
pub fn parse_resource_attributes(s: &str) -> Vec<KeyValue> {
    s.split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            let (k, v) = (k.trim(), v.trim());
            (!k.is_empty()).then(|| KeyValue::new(k.to_owned(), percent_decode(v)))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The name the process was started as: the basename of /proc/PID/exe
/// (comm is cut to 15 bytes), unless argv[0] names something else — a
/// symlink such as redis-server → redis-check-rdb, or a multi-call binary.
fn executable_name(tgid: u32) -> Option<String> {
    let path = std::fs::read_link(format!("/proc/{tgid}/exe")).ok()?;
    let exe = path.file_name()?.to_string_lossy().into_owned();
    let cmdline = std::fs::read(format!("/proc/{tgid}/cmdline")).unwrap_or_default();
    Some(choose_name(exe, &cmdline))
}

fn choose_name(exe: String, cmdline: &[u8]) -> String {
    let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    let argv0 = String::from_utf8_lossy(argv0);
    // Servers rewrite their title: "redis-server 127.0.0.1:6379",
    // "nginx: worker process".
    let first = argv0
        .split(|c: char| c.is_whitespace() || c == ':')
        .next()
        .unwrap_or_default();
    let base = first.rsplit('/').next().unwrap_or_default();
    if base.is_empty() || exe.starts_with(base) {
        exe
    } else {
        base.to_owned()
    }
}

fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(r: &Resource, key: &str) -> Option<String> {
        r.get(&opentelemetry::Key::new(key.to_owned()))
            .map(|v| v.to_string())
    }

    #[test]
    fn rules_then_fallback_then_executable() {
        let rules = vec![
            ServiceRule {
                name: "proxy".into(),
                exe: Some("nginx".into()),
                port: None,
            },
            ServiceRule {
                name: "api".into(),
                exe: None,
                port: Some(8000),
            },
        ];
        let r = Resources::new(rules);
        assert_eq!(r.service_name("nginx", None, None), ("proxy".into(), false));
        assert_eq!(
            r.service_name("python3", Some(8000), None),
            ("api".into(), true)
        );
        let fallback = r.fallback_name.clone().unwrap_or_else(|| "python3".into());
        assert_eq!(r.service_name("python3", Some(9000), None).0, fallback);
    }

    fn pod(app: Option<&str>, workload: Option<&str>) -> ContainerMeta {
        use super::kubernetes::PodMeta;
        ContainerMeta {
            pod: std::sync::Arc::new(PodMeta {
                name: "web-6d4b9-x2k4p".into(),
                namespace: "shop".into(),
                uid: "1617a553-36f9-4d5e-a665-c56c040d9ce4".into(),
                node_name: Some("zt-node-1".into()),
                app_name: app.map(Into::into),
                workload: workload
                    .map(|w| vec![("k8s.deployment.name", w.to_owned())])
                    .unwrap_or_default(),
                workload_name: workload.map(Into::into),
            }),
            container_name: Some("web".into()),
        }
    }

    #[test]
    fn pods_name_services_after_rules_and_otel_service_name() {
        let rules = vec![ServiceRule {
            name: "proxy".into(),
            exe: Some("nginx".into()),
            port: None,
        }];
        let mut r = Resources::new(rules);
        r.fallback_name = None;
        let named =
            |r: &Resources, exe: &str, p: &ContainerMeta| r.service_name(exe, None, Some(p)).0;
        let both = pod(Some("storefront"), Some("web"));
        assert_eq!(named(&r, "nginx", &both), "proxy");
        assert_eq!(named(&r, "python3", &both), "storefront");
        assert_eq!(named(&r, "python3", &pod(None, Some("web"))), "web");
        assert_eq!(named(&r, "python3", &pod(None, None)), "web-6d4b9-x2k4p");
        assert_eq!(r.service_name("python3", None, None).0, "python3");
        r.fallback_name = Some("from-env".into());
        assert_eq!(named(&r, "python3", &both), "from-env");
    }

    #[test]
    fn a_container_process_is_rebuilt_when_its_pod_arrives() {
        use super::kubernetes::{Metadata, PodEntry};
        let metadata = Metadata::new("zt-node-1");
        let mut r = Resources::new(Vec::new()).with_kubernetes(Some(metadata.clone()));
        r.fallback_name = None;
        let id = "c7761e58969f7edd498186641b2021e8477e1bcd230de4cf3435242da4a40d14";
        let me = std::process::id();
        // As if /proc/PID/cgroup had named the container.
        r.processes.insert(
            me,
            Process {
                exe_name: "python3".into(),
                resource: ProcessResource::new(Resource::builder_empty().build()),
                by_port: false,
                container: Some(ContainerRef {
                    id: id.into(),
                    pod_uid: None,
                }),
                pending: Some(u64::MAX),
            },
        );
        let before = r.of(me, "python3", None);
        assert_eq!(attr(&before, "container.id").as_deref(), Some(id));
        assert_eq!(attr(&before, "k8s.pod.name"), None);
        assert_eq!(attr(&before, "service.name").as_deref(), Some("python3"));
        // Cached while the index does not change.
        assert!(Arc::ptr_eq(&r.of(me, "python3", None), &before));
        let p = pod(Some("storefront"), Some("web"));
        metadata.update(|i| {
            i.upsert(PodEntry {
                meta: p.pod.clone(),
                containers: vec![(id.into(), "web".into())],
            })
        });
        let after = r.of(me, "python3", None);
        assert_eq!(attr(&after, "service.name").as_deref(), Some("storefront"));
        assert_eq!(
            attr(&after, "k8s.pod.name").as_deref(),
            Some("web-6d4b9-x2k4p")
        );
        assert_eq!(attr(&after, "k8s.namespace.name").as_deref(), Some("shop"));
        assert_eq!(attr(&after, "k8s.container.name").as_deref(), Some("web"));
        assert_eq!(attr(&after, "k8s.node.name").as_deref(), Some("zt-node-1"));
        assert_eq!(attr(&after, "k8s.deployment.name").as_deref(), Some("web"));
        assert_eq!(attr(&after, "container.id").as_deref(), Some(id));
        // Complete now: no more rebuilds.
        assert_eq!(r.processes[&me].pending, None);
    }

    #[test]
    fn own_process_resource() {
        let mut r = Resources::new(Vec::new());
        let me = std::process::id();
        let res = r.of(me, "x", None);
        assert_eq!(attr(&res, "process.pid"), Some(me.to_string()));
        let exe = std::env::current_exe().unwrap();
        assert_eq!(
            attr(&res, "process.executable.name").as_deref(),
            exe.file_name().and_then(|n| n.to_str())
        );
        assert!(attr(&res, "host.name").is_some());
    }

    #[test]
    fn names_follow_argv0_when_the_executable_is_a_symlink_target() {
        let name = |exe: &str, cmd: &[u8]| choose_name(exe.to_owned(), cmd);
        assert_eq!(
            name("redis-check-rdb", b"redis-server 127.0.0.1:6379\0"),
            "redis-server"
        );
        assert_eq!(
            name("python3.11", b"/opt/venv/bin/python\0-m\0uvicorn\0"),
            "python3.11"
        );
        assert_eq!(name("nginx", b"nginx: worker process\0"), "nginx");
        assert_eq!(name("curl", b""), "curl");
    }

    #[test]
    fn resource_attribute_list() {
        let kvs = parse_resource_attributes("deployment.environment=prod, team=a%20b,bad,=x");
        assert_eq!(kvs.len(), 2);
        assert_eq!(kvs[1].value.to_string(), "a b");
    }
}
