//! Configuration: a YAML file, then the environment, then flags — later
//! sources win. The file is parsed strictly: an unknown key or a bad value
//! is a [`ConfigError`], which the command line turns into exit code 2.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;
use thiserror::Error;

use crate::{
    kernel::{kfunc::KfuncChoice, loader::TransportChoice},
    trace::resources::kubernetes::watch::ApiAccess,
};

/// A configuration the agent cannot run with (exit code 2).
#[derive(Debug, Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// Everything `zerotrace run` is configured with, after merging.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub capture: CaptureConfig,
    pub http: HttpConfig,
    pub db: DbConfig,
    pub exclude: ExcludeConfig,
    /// service.name rules, first match wins; else OTEL_SERVICE_NAME, else
    /// (in a pod) its app.kubernetes.io/name label, workload or pod name,
    /// else the executable name.
    pub services: Vec<ServiceRule>,
    pub export: ExportConfig,
    pub sampling: SamplingConfig,
    /// Seconds between statistics lines on stderr.
    pub stats_interval: Option<u64>,
    pub telemetry: TelemetryConfig,
    pub kubernetes: KubernetesConfig,
}

/// Whether spans' resources get the pod metadata of container processes.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MetadataMode {
    /// On inside a pod (KUBERNETES_SERVICE_HOST set) or with a kubeconfig.
    #[default]
    Auto,
    /// Always; no way to the API server is a start-up error.
    On,
    /// Never (container.id is still added).
    Off,
}

/// Kubernetes metadata (k8s.* resource attributes) from the API server.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    pub metadata: MetadataMode,
    /// This node's name [default: ZEROTRACE_NODE_NAME, else the host name].
    pub node_name: Option<String>,
    /// A kubeconfig file [default: the in-cluster service account].
    pub kubeconfig: Option<PathBuf>,
}

/// Where pod metadata comes from, once [`KubernetesConfig::target`] decided
/// it is wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesTarget {
    pub node_name: String,
    pub access: ApiAccess,
}

impl KubernetesConfig {
    /// `None` when metadata is off, or `auto` outside a cluster without a
    /// kubeconfig; an error when it is `on` and there is no way to the API
    /// server. `in_cluster`: KUBERNETES_SERVICE_HOST is set.
    pub fn target(
        &self,
        in_cluster: bool,
        host_name: impl FnOnce() -> Option<String>,
    ) -> Result<Option<KubernetesTarget>, ConfigError> {
        let access = match (&self.kubeconfig, in_cluster) {
            (Some(path), _) => Some(ApiAccess::Kubeconfig(path.clone())),
            (None, true) => Some(ApiAccess::InCluster),
            (None, false) => None,
        };
        let access = match (self.metadata, access) {
            (MetadataMode::Off, _) | (MetadataMode::Auto, None) => return Ok(None),
            (_, Some(access)) => access,
            (MetadataMode::On, None) => {
                return Err(ConfigError::new(
                    "kubernetes.metadata is on, but there is no way to the API server: \
                     not in a pod (KUBERNETES_SERVICE_HOST unset) and no kubeconfig \
                     (kubernetes.kubeconfig, ZEROTRACE_KUBECONFIG or --kubeconfig)",
                ));
            }
        };
        let node_name = self
            .node_name
            .clone()
            .filter(|n| !n.trim().is_empty())
            .or_else(host_name)
            .ok_or_else(|| {
                ConfigError::new(
                    "kubernetes metadata needs this node's name: set kubernetes.node_name \
                     or ZEROTRACE_NODE_NAME (downward API spec.nodeName)",
                )
            })?;
        Ok(Some(KubernetesTarget {
            node_name: node_name.trim().to_owned(),
            access,
        }))
    }
}

/// The agent's own telemetry.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Export the startup trace and interval spans (service.name zerotrace)
    /// [default: yes, except to the console, where they would drown the traces].
    pub spans: Option<bool>,
    /// Seconds between interval spans (ebpf.execute, ebpf.buffer.read).
    pub interval: u64,
    /// Address of /health, /ready and /metrics, or "off".
    pub listen: String,
}

/// Default address of the agent's endpoints (loopback: a DaemonSet sets 0.0.0.0).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            spans: None,
            interval: 60,
            listen: DEFAULT_LISTEN.to_owned(),
        }
    }
}

impl TelemetryConfig {
    /// The endpoints' address; `None` when turned off.
    pub fn listen_addr(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        if self.listen == "off" {
            return Ok(None);
        }
        self.listen.parse().map(Some).map_err(|_| {
            ConfigError::new(format!(
                "telemetry.listen: {:?} is not an address like 127.0.0.1:9464 (or \"off\")",
                self.listen
            ))
        })
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    pub pids: Vec<u32>,
    pub exes: Vec<String>,
    pub transport: Option<TransportChoice>,
    pub capture_bytes: Option<u32>,
    pub buffer_size: Option<usize>,
    /// auto | fentry | kprobe | off.
    pub kernel_functions: Option<KfuncChoice>,
    /// auto | off | a list of runtimes to follow (cpython).
    pub runtimes: Option<crate::runtime::follow::RuntimeChoice>,
    /// auto | off: read the plaintext of TLS connections from their library.
    pub tls: Option<crate::tls::TlsChoice>,
    /// Count each eBPF program's runs and run time (kernel BPF statistics)
    /// [default: off: while on, every BPF program on the host pays two
    /// clock reads per run].
    pub program_stats: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Request headers copied to span attributes; no other header value is
    /// ever exported.
    pub headers: Vec<HeaderRule>,
    /// Exported header values are cut to this many bytes.
    pub max_header_value: usize,
    /// Route patterns such as `/users/{id}` or `/static/*`: a matching
    /// server span is named `{method} {route}` and gets http.route.
    pub routes: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            headers: vec![
                HeaderRule::new("x-tenant-id", "tenant.id"),
                HeaderRule::new("x-user-id", "user.id"),
            ],
            max_header_value: 128,
            routes: Vec::new(),
        }
    }
}

/// Database spans (PostgreSQL, MySQL/MariaDB, Redis).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DbConfig {
    /// Replace SQL literals and Redis values in db.query.text with `?`.
    /// Turning this off exports the data your applications store.
    pub sanitize_queries: bool,
    /// db.query.text is cut to this many bytes.
    pub max_query_bytes: usize,
}

impl Default for DbConfig {
    fn default() -> Self {
        Self {
            sanitize_queries: true,
            max_query_bytes: 2048,
        }
    }
}

/// Copies request header `header` into span attribute `attribute`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HeaderRule {
    pub header: String,
    pub attribute: String,
}

impl HeaderRule {
    pub fn new(header: &str, attribute: &str) -> Self {
        Self {
            header: header.to_ascii_lowercase(),
            attribute: attribute.to_owned(),
        }
    }

    /// `HEADER=ATTRIBUTE`, as given on the command line.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((h, a)) if valid_header_name(h) && !a.trim().is_empty() => {
                Ok(Self::new(h.trim(), a.trim()))
            }
            _ => Err(format!("expected HEADER=ATTRIBUTE, got {s:?}")),
        }
    }
}

fn valid_header_name(name: &str) -> bool {
    let name = name.trim();
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ExcludeConfig {
    /// URL paths never traced: exact (`/health`) or prefix (`/metrics/*`).
    pub paths: Vec<String>,
    /// Executable names whose traffic is never traced.
    pub processes: Vec<String>,
    /// Unix sockets never traced, by name: exact or prefix (`/run/dbus/*`);
    /// abstract names start with `@`. Both ends of a connection to one are
    /// left alone (a client's end carries its server's name).
    pub unix_sockets: Vec<String>,
}

/// The system daemons' unix sockets: logging (a systemd service's stdout
/// is a stream to journald), D-Bus, container runtimes, the kubelet's
/// plugin sockets, per-user session sockets. Chatter, not requests.
pub const DEFAULT_EXCLUDED_UNIX_SOCKETS: [&str; 14] = [
    "/run/systemd/*",
    "/run/dbus/*",
    "/var/run/dbus/*",
    "@/tmp/dbus-*",
    "/run/user/*",
    "/run/containerd/*",
    "@/containerd-shim/*",
    "/run/docker.sock",
    "/var/run/docker.sock",
    "/run/crio/*",
    "/var/run/crio/*",
    "/var/lib/kubelet/*",
    "/run/snapd.socket",
    "/run/snapd-snap.socket",
];

impl Default for ExcludeConfig {
    fn default() -> Self {
        Self {
            paths: Vec::new(),
            processes: Vec::new(),
            unix_sockets: DEFAULT_EXCLUDED_UNIX_SOCKETS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
        }
    }
}

impl ExcludeConfig {
    /// Whether a unix socket of this name is excluded.
    pub fn excludes_unix_socket(&self, name: &str) -> bool {
        self.unix_sockets
            .iter()
            .any(|rule| match rule.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == rule,
            })
    }
}

/// Names the service of processes running `exe` and/or serving on `port`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceRule {
    pub name: String,
    pub exe: Option<String>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ExporterKind {
    /// Readable trace trees on stdout.
    Console,
    /// OTLP to a collector (OTEL_EXPORTER_OTLP_*).
    Otlp,
    /// One OTLP/JSON span per line to --output.
    Jsonl,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, clap::ValueEnum)]
pub enum OtlpProtocol {
    #[serde(rename = "grpc")]
    #[value(name = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

impl OtlpProtocol {
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        match s.trim() {
            "grpc" => Ok(Self::Grpc),
            "http/protobuf" => Ok(Self::HttpProtobuf),
            other => Err(ConfigError::new(format!(
                "unsupported OTLP protocol {other:?} (use grpc or http/protobuf)"
            ))),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// Default: otlp when an endpoint is configured, else console.
    pub exporter: Option<ExporterKind>,
    /// File for the jsonl exporter.
    pub output: Option<PathBuf>,
    /// OTLP endpoint when OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT is unset.
    pub endpoint: Option<String>,
    /// OTLP protocol when OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL is unset.
    pub protocol: Option<OtlpProtocol>,
    /// TLS to the collector, each key used when its OTEL_EXPORTER_OTLP_*
    /// variable is unset.
    pub tls: OtlpTlsConfig,
}

/// TLS to an https:// collector; the keys of OpenTelemetry's declarative
/// configuration (`tls` of an OTLP exporter).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpTlsConfig {
    /// PEM CA certificates the collector's certificate must chain to,
    /// instead of the host's (OTEL_EXPORTER_OTLP_CERTIFICATE).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (…_CLIENT_CERTIFICATE).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (…_CLIENT_KEY).
    pub key_file: Option<PathBuf>,
    /// Plaintext to a gRPC endpoint given without a scheme (…_INSECURE).
    pub insecure: Option<bool>,
}

/// Sampling when OTEL_TRACES_SAMPLER is unset.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    pub sampler: Option<String>,
    pub ratio: Option<f64>,
}

impl Config {
    /// Reads and strictly parses a YAML file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(format!("reading {}: {e}", path.display())))?;
        Self::from_yaml(&text).map_err(|e| ConfigError::new(format!("{}: {}", path.display(), e.0)))
    }

    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let config: Self =
            serde_yaml_ng::from_str(text).map_err(|e| ConfigError::new(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.telemetry.listen_addr()?;
        if self.telemetry.interval == 0 {
            return Err(ConfigError::new(
                "telemetry.interval must be at least 1 second",
            ));
        }
        if let Some(bytes) = self.capture.capture_bytes
            && bytes > agent_common::MAX_CAPTURE_BYTES
        {
            return Err(ConfigError::new(format!(
                "capture.capture_bytes {bytes} is above the maximum {}",
                agent_common::MAX_CAPTURE_BYTES
            )));
        }
        for rule in &self.http.headers {
            if !valid_header_name(&rule.header) || rule.attribute.trim().is_empty() {
                return Err(ConfigError::new(format!(
                    "http.headers: invalid rule {:?} → {:?}",
                    rule.header, rule.attribute
                )));
            }
        }
        for route in &self.http.routes {
            if !route.starts_with('/') {
                return Err(ConfigError::new(format!(
                    "http.routes: {route:?} must start with /"
                )));
            }
        }
        for path in &self.exclude.paths {
            if !path.starts_with('/') {
                return Err(ConfigError::new(format!(
                    "exclude.paths: {path:?} must start with /"
                )));
            }
        }
        for name in &self.exclude.unix_sockets {
            if !(name.starts_with('/') || name.starts_with('@')) {
                return Err(ConfigError::new(format!(
                    "exclude.unix_sockets: {name:?} must be a path (/…) or an abstract name (@…)"
                )));
            }
        }
        for rule in &self.services {
            if rule.name.trim().is_empty() || (rule.exe.is_none() && rule.port.is_none()) {
                return Err(ConfigError::new(format!(
                    "services: rule {:?} needs a name and an exe or a port",
                    rule.name
                )));
            }
        }
        if let Some(ratio) = self.sampling.ratio
            && !(0.0..=1.0).contains(&ratio)
        {
            return Err(ConfigError::new(format!(
                "sampling.ratio {ratio} must be between 0 and 1"
            )));
        }
        if self.export.exporter == Some(ExporterKind::Jsonl) && self.export.output.is_none() {
            return Err(ConfigError::new("the jsonl exporter needs an output file"));
        }
        Ok(())
    }
}

/// Reads an environment variable; empty counts as unset.
pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Reads a numeric environment variable, rejecting garbage.
pub fn env_number<T: std::str::FromStr>(name: &str) -> Result<Option<T>, ConfigError> {
    env(name)
        .map(|v| {
            v.trim()
                .parse()
                .map_err(|_| ConfigError::new(format!("{name}={v:?} is not a valid number")))
        })
        .transpose()
}

/// Spans queued for export by default: four times an SDK's 2048. An SDK
/// queues one process's spans; the agent queues a whole host's, and at
/// 100 k spans/s 2048 spans last 20 ms — less than the exporter thread can
/// be kept off a busy host's CPUs, so bursts were dropped with the collector
/// keeping up. Still bounded: with a dead collector the queue fills and
/// further spans are dropped and counted.
pub const DEFAULT_MAX_QUEUE_SIZE: usize = 8192;

/// OTEL_BSP_*: the span queue and batching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    pub max_queue_size: usize,
    pub scheduled_delay: Duration,
    pub max_export_batch_size: usize,
    pub export_timeout: Duration,
}

impl BatchConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        let ms = |name: &str, default: u64| -> Result<Duration, ConfigError> {
            Ok(Duration::from_millis(env_number(name)?.unwrap_or(default)))
        };
        let max_queue_size =
            env_number("OTEL_BSP_MAX_QUEUE_SIZE")?.unwrap_or(DEFAULT_MAX_QUEUE_SIZE);
        let max_export_batch_size =
            env_number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")?.unwrap_or(512usize);
        if max_queue_size == 0 || max_export_batch_size == 0 {
            return Err(ConfigError::new(
                "OTEL_BSP_MAX_QUEUE_SIZE and OTEL_BSP_MAX_EXPORT_BATCH_SIZE must be above 0",
            ));
        }
        Ok(Self {
            max_queue_size,
            scheduled_delay: ms("OTEL_BSP_SCHEDULE_DELAY", 5000)?,
            max_export_batch_size: max_export_batch_size.min(max_queue_size),
            export_timeout: ms("OTEL_BSP_EXPORT_TIMEOUT", 30_000)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_daemon_sockets_are_excluded_by_default() {
        let c = Config::default();
        for name in [
            "/run/systemd/journal/stdout",
            "/run/dbus/system_bus_socket",
            "@/tmp/dbus-Xy12",
            "/run/containerd/containerd.sock",
        ] {
            assert!(c.exclude.excludes_unix_socket(name), "{name}");
        }
        assert!(!c.exclude.excludes_unix_socket("/run/app/uvicorn.sock"));
        assert!(
            !c.exclude
                .excludes_unix_socket("/var/run/postgresql/.s.PGSQL.5432")
        );
        // A list given in the file replaces the defaults.
        let c = Config::from_yaml("exclude:\n  unix_sockets: [/tmp/a.sock]\n").unwrap();
        assert!(c.exclude.excludes_unix_socket("/tmp/a.sock"));
        assert!(!c.exclude.excludes_unix_socket("/run/systemd/notify"));
    }

    #[test]
    fn empty_file_is_the_defaults() {
        let c = Config::from_yaml("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(
            c.http.headers[0],
            HeaderRule::new("x-tenant-id", "tenant.id")
        );
    }

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../../deploy/zerotrace.yaml");
        let c = Config::from_yaml(text).unwrap();
        assert!(!c.exclude.paths.is_empty());
        assert!(!c.services.is_empty());
        assert_eq!(
            c.capture.runtimes,
            Some(crate::runtime::follow::RuntimeChoice::Auto)
        );
        let listed = Config::from_yaml("capture:\n  runtimes: [cpython]\n").unwrap();
        assert_eq!(
            listed.capture.runtimes,
            Some(crate::runtime::follow::RuntimeChoice::Only(vec![
                "cpython".into()
            ]))
        );
        let tls = Config::from_yaml("capture:\n  tls: off\n").unwrap();
        assert_eq!(tls.capture.tls, Some(crate::tls::TlsChoice::Off));
        let bad = Config::from_yaml("capture:\n  tls: gnutls\n").unwrap_err();
        assert!(bad.to_string().contains("gnutls"), "{bad}");
        let bad = Config::from_yaml("capture:\n  runtimes: [jvm]\n").unwrap_err();
        assert!(bad.0.contains("jvm"), "{bad}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let unknown = Config::from_yaml("http:\n  headerz: []\n").unwrap_err();
        assert!(unknown.0.contains("headerz"), "{unknown}");
        let bad = Config::from_yaml("capture:\n  transport: carrier-pigeon\n").unwrap_err();
        assert!(bad.0.contains("carrier-pigeon"), "{bad}");
        let big = Config::from_yaml("capture:\n  capture_bytes: 100000\n").unwrap_err();
        assert!(big.0.contains("maximum"), "{big}");
        let ratio = Config::from_yaml("sampling:\n  ratio: 2\n").unwrap_err();
        assert!(ratio.0.contains("between"), "{ratio}");
        assert!(Config::from_yaml("services:\n  - name: x\n").is_err());
        assert!(Config::from_yaml("exclude:\n  paths: [health]\n").is_err());
        assert!(Config::from_yaml("exclude:\n  unix_sockets: [run/x]\n").is_err());
    }

    #[test]
    fn kubernetes_metadata_is_off_outside_a_cluster_unless_asked() {
        let host = || Some("host-1".to_owned());
        let c = Config::from_yaml("").unwrap().kubernetes;
        assert_eq!(c.metadata, MetadataMode::Auto);
        assert_eq!(c.target(false, host).unwrap(), None);
        let inside = c.target(true, host).unwrap().unwrap();
        assert_eq!(inside.access, ApiAccess::InCluster);
        assert_eq!(inside.node_name, "host-1");

        let on = Config::from_yaml("kubernetes:\n  metadata: on\n")
            .unwrap()
            .kubernetes;
        assert_eq!(on.metadata, MetadataMode::On);
        let err = on.target(false, host).unwrap_err();
        assert!(err.0.contains("KUBERNETES_SERVICE_HOST"), "{err}");

        let off = Config::from_yaml("kubernetes:\n  metadata: off\n")
            .unwrap()
            .kubernetes;
        assert_eq!(off.target(true, host).unwrap(), None);

        let file = Config::from_yaml(
            "kubernetes:\n  metadata: on\n  node_name: node-a\n  kubeconfig: /etc/kube.yaml\n",
        )
        .unwrap()
        .kubernetes;
        let t = file.target(false, || None).unwrap().unwrap();
        assert_eq!(t.node_name, "node-a");
        assert_eq!(t.access, ApiAccess::Kubeconfig("/etc/kube.yaml".into()));
        // auto with a kubeconfig: the user pointed us at a cluster.
        let auto = KubernetesConfig {
            kubeconfig: Some("/k".into()),
            ..KubernetesConfig::default()
        };
        assert!(auto.target(false, host).unwrap().is_some());
        assert!(auto.target(false, || None).is_err());

        assert!(Config::from_yaml("kubernetes:\n  metadata: maybe\n").is_err());
        assert!(Config::from_yaml("kubernetes:\n  nodename: x\n").is_err());
    }

    #[test]
    fn otlp_tls_keys() {
        let c = Config::from_yaml(
            "export:\n  endpoint: https://c:4317\n  tls:\n    ca_file: /etc/ca.pem\n    \
             cert_file: /etc/c.pem\n    key_file: /etc/c.key\n    insecure: false\n",
        )
        .unwrap();
        assert_eq!(c.export.tls.ca_file, Some("/etc/ca.pem".into()));
        assert_eq!(c.export.tls.key_file, Some("/etc/c.key".into()));
        assert_eq!(c.export.tls.insecure, Some(false));
        let unknown = Config::from_yaml("export:\n  tls:\n    ca: /x\n").unwrap_err();
        assert!(unknown.0.contains("ca"), "{unknown}");
        assert!(Config::from_yaml("export:\n  tls:\n    insecure: maybe\n").is_err());
    }

    #[test]
    fn header_rules_from_flags() {
        assert_eq!(
            HeaderRule::parse("X-Org=org.id").unwrap(),
            HeaderRule::new("x-org", "org.id")
        );
        assert!(HeaderRule::parse("x-org").is_err());
        assert!(HeaderRule::parse("bad header=a").is_err());
    }
}
