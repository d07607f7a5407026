//! One OpenTelemetry Resource per traced process: service.name from the
//! configured rules, else OTEL_SERVICE_NAME, else the executable name;
//! plus process.* and host.name, and OTEL_RESOURCE_ATTRIBUTES.

use std::collections::HashMap;

use opentelemetry::KeyValue;
use opentelemetry_sdk::Resource;

use crate::config::{ServiceRule, env};

/// Most processes whose resource is remembered.
const MAX_PROCESSES: usize = 4096;

/// What the resource of one process is built from.
#[derive(Debug, Clone)]
struct Process {
    exe_name: String,
    resource: Resource,
    /// Index of the port rule that named it, if one did.
    by_port: bool,
}

pub struct Resources {
    rules: Vec<ServiceRule>,
    fallback_name: Option<String>,
    extra: Vec<KeyValue>,
    host_name: String,
    processes: HashMap<u32, Process>,
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
            host_name: host_name(),
            processes: HashMap::new(),
        }
    }

    /// The agent's own resource (service.name `zerotrace`), for its self-telemetry.
    pub fn agent(&self) -> Resource {
        let mut resource = self.build(std::process::id(), "zerotrace", "zerotrace".to_owned());
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
    pub fn of(&mut self, tgid: u32, comm: &str, server_port: Option<u16>) -> Resource {
        self.process(tgid, comm, server_port).resource.clone()
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
        let stale = match self.processes.get(&tgid) {
            None => true,
            // A port rule matched now that the process serves on the port.
            Some(p) => port_rule.is_some() && !p.by_port,
        };
        if stale {
            if self.processes.len() >= MAX_PROCESSES {
                self.processes.clear();
            }
            let exe_name = executable_name(tgid).unwrap_or_else(|| comm.to_owned());
            let (name, by_port) = self.service_name(&exe_name, server_port);
            let resource = self.build(tgid, &exe_name, name);
            self.processes.insert(
                tgid,
                Process {
                    exe_name,
                    resource,
                    by_port,
                },
            );
        }
        &self.processes[&tgid]
    }

    fn service_name(&self, exe_name: &str, server_port: Option<u16>) -> (String, bool) {
        for rule in &self.rules {
            let exe_ok = rule.exe.as_deref().is_none_or(|e| e == exe_name);
            let port_ok = rule.port.is_none_or(|p| Some(p) == server_port);
            if exe_ok && port_ok {
                return (rule.name.clone(), rule.port.is_some());
            }
        }
        let name = self
            .fallback_name
            .clone()
            .unwrap_or_else(|| exe_name.to_owned());
        (name, false)
    }

    fn build(&self, tgid: u32, exe_name: &str, service: String) -> Resource {
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
        assert_eq!(r.service_name("nginx", None), ("proxy".into(), false));
        assert_eq!(r.service_name("python3", Some(8000)), ("api".into(), true));
        let fallback = r.fallback_name.clone().unwrap_or_else(|| "python3".into());
        assert_eq!(r.service_name("python3", Some(9000)).0, fallback);
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
