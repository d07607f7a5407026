//! `zerotrace run`: the agent. Captures, traces and exports until stopped.
//! This is its configuration, start-up and shutdown; the loop between them
//! is the pipeline's ([`Pipeline::run`] with [`Tracing`] plugged in).

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Args;

use super::CaptureArgs;
use crate::{
    config::{
        BatchConfig, Config, ConfigError, ExporterKind, HeaderRule, KubernetesTarget, MetadataMode,
        OtlpProtocol, env,
    },
    export::{Exporter, HANDOFF_SPANS, OtlpSettings, Target},
    kernel::features,
    pipeline::{Periods, Pipeline, Tracing, stop_on_signals},
    selftrace::{
        SelfSpans,
        endpoints::{self, AgentState, Endpoints},
        startup::Startup,
    },
    trace::{TraceOptions, Tracer, parents::context::Sampler, resources::kubernetes::watch::Watch},
};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// YAML configuration file (see deploy/zerotrace.yaml).
    #[arg(long, value_name = "FILE", env = "ZEROTRACE_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    capture: CaptureArgs,
    /// Where spans go [default: otlp when an OTLP endpoint is set, else console].
    #[arg(long, value_enum, env = "ZEROTRACE_EXPORTER")]
    exporter: Option<ExporterKind>,
    /// File for the jsonl exporter.
    #[arg(long, value_name = "FILE", env = "ZEROTRACE_OUTPUT")]
    output: Option<PathBuf>,
    /// OTLP endpoint (overrides OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT).
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// OTLP protocol (overrides OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL) [default: http/protobuf].
    #[arg(long, value_enum)]
    otlp_protocol: Option<OtlpProtocol>,
    #[command(flatten)]
    otlp_tls: super::otlp::OtlpTlsArgs,
    /// Request header copied to a span attribute, HEADER=ATTRIBUTE (repeatable;
    /// replaces the defaults x-tenant-id=tenant.id, x-user-id=user.id).
    #[arg(long = "header", value_name = "HEADER=ATTRIBUTE", value_parser = HeaderRule::parse,
          env = "ZEROTRACE_HEADERS", value_delimiter = ',')]
    headers: Vec<HeaderRule>,
    /// Route pattern such as /users/{id} or /static/* (repeatable).
    #[arg(
        long = "route",
        value_name = "PATTERN",
        env = "ZEROTRACE_ROUTES",
        value_delimiter = ','
    )]
    routes: Vec<String>,
    /// URL path never traced: exact, or a prefix ending in * (repeatable).
    #[arg(
        long = "exclude-path",
        value_name = "PATH",
        env = "ZEROTRACE_EXCLUDE_PATHS",
        value_delimiter = ','
    )]
    exclude_paths: Vec<String>,
    /// Executable name whose traffic is never traced (repeatable).
    #[arg(
        long = "exclude-process",
        value_name = "NAME",
        env = "ZEROTRACE_EXCLUDE_PROCESSES",
        value_delimiter = ','
    )]
    exclude_processes: Vec<String>,
    /// Unix socket never traced, by path or @abstract name, exact or a
    /// prefix ending in `*` (repeatable; replaces the default list of
    /// system daemons' sockets).
    #[arg(
        long = "exclude-unix-socket",
        value_name = "NAME",
        env = "ZEROTRACE_EXCLUDE_UNIX_SOCKETS",
        value_delimiter = ','
    )]
    exclude_unix_sockets: Vec<String>,
    /// Seconds between statistics lines on stderr [default: 10].
    #[arg(long, env = "ZEROTRACE_STATS_INTERVAL")]
    stats_interval: Option<u64>,
    /// Seconds between the agent's interval spans (ebpf.execute, ebpf.buffer.read) [default: 60].
    #[arg(long, value_name = "SECONDS", env = "ZEROTRACE_TELEMETRY_INTERVAL")]
    telemetry_interval: Option<u64>,
    /// Export the agent's own spans: startup trace and interval spans
    /// [default: yes, except to the console].
    #[arg(long, value_name = "BOOL", env = "ZEROTRACE_SELF_SPANS")]
    self_spans: Option<bool>,
    /// Address of /health, /ready and /metrics, or "off" [default: 127.0.0.1:9464].
    #[arg(long, value_name = "ADDR", env = "ZEROTRACE_LISTEN")]
    listen: Option<String>,
    /// Pod metadata (k8s.* resource attributes) for container processes:
    /// auto = on inside a pod or with a kubeconfig [default: auto].
    #[arg(
        long,
        value_enum,
        value_name = "MODE",
        env = "ZEROTRACE_KUBERNETES_METADATA"
    )]
    kubernetes_metadata: Option<MetadataMode>,
    /// This node's name: its pods are the ones watched [default: the host name].
    #[arg(long, value_name = "NAME", env = "ZEROTRACE_NODE_NAME")]
    node_name: Option<String>,
    /// Kubeconfig file for the API server [default: the in-cluster service account].
    #[arg(long, value_name = "FILE", env = "ZEROTRACE_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
}

/// Everything `run` needs, merged: flags > environment > file > defaults.
struct Settings {
    config: Config,
    target: Target,
    batch: BatchConfig,
    sampler: Sampler,
    /// Where pod metadata comes from; `None`: no Kubernetes at all.
    kubernetes: Option<KubernetesTarget>,
}

impl RunArgs {
    fn settings(&self) -> Result<Settings, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        let replace = |flag: &Vec<String>, file: &mut Vec<String>| {
            if !flag.is_empty() {
                *file = flag.clone();
            }
        };
        if !self.headers.is_empty() {
            config.http.headers = self.headers.clone();
        }
        replace(&self.routes, &mut config.http.routes);
        replace(&self.exclude_paths, &mut config.exclude.paths);
        replace(&self.exclude_processes, &mut config.exclude.processes);
        replace(&self.exclude_unix_sockets, &mut config.exclude.unix_sockets);
        if self.exporter.is_some() {
            config.export.exporter = self.exporter;
        }
        if self.output.is_some() {
            config.export.output = self.output.clone();
        }
        if self.stats_interval.is_some() {
            config.stats_interval = self.stats_interval;
        }
        if let Some(seconds) = self.telemetry_interval {
            config.telemetry.interval = seconds;
        }
        if self.self_spans.is_some() {
            config.telemetry.spans = self.self_spans;
        }
        if let Some(listen) = &self.listen {
            config.telemetry.listen = listen.clone();
        }
        if let Some(bytes) = self.capture.capture_bytes {
            config.capture.capture_bytes = Some(bytes);
        }
        if let Some(mode) = self.kubernetes_metadata {
            config.kubernetes.metadata = mode;
        }
        if self.node_name.is_some() {
            config.kubernetes.node_name = self.node_name.clone();
        }
        if self.kubeconfig.is_some() {
            config.kubernetes.kubeconfig = self.kubeconfig.clone();
        }
        config.validate()?;
        let kubernetes = config
            .kubernetes
            .target(env("KUBERNETES_SERVICE_HOST").is_some(), || {
                nix::unistd::gethostname().ok()?.into_string().ok()
            })?;

        let env_endpoint = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
        // A flag outranks the environment, which outranks the file.
        let explicit = self.otlp_endpoint.clone().or(if env_endpoint.is_some() {
            None
        } else {
            config.export.endpoint.clone()
        });
        let protocol = match self.otlp_protocol {
            Some(p) => p,
            None => match env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
            {
                Some(p) => OtlpProtocol::parse(&p)?,
                None => config.export.protocol.unwrap_or(OtlpProtocol::HttpProtobuf),
            },
        };
        let has_endpoint = explicit.is_some() || env_endpoint.is_some();
        let kind = config.export.exporter.unwrap_or(if has_endpoint {
            ExporterKind::Otlp
        } else {
            ExporterKind::Console
        });
        let target = match kind {
            ExporterKind::Console => Target::Console,
            ExporterKind::Jsonl => Target::Jsonl(
                config
                    .export
                    .output
                    .clone()
                    .ok_or_else(|| ConfigError::new("--exporter jsonl needs --output FILE"))?,
            ),
            ExporterKind::Otlp => Target::Otlp(
                OtlpSettings::resolve(
                    explicit.as_deref(),
                    protocol,
                    &self.otlp_tls.over(&config.export.tls),
                    env,
                )
                .map_err(ConfigError)?,
            ),
        };
        let sampler = Sampler::from_env_or(&config.sampling)?;
        Ok(Settings {
            batch: BatchConfig::from_env()?,
            config,
            target,
            sampler,
            kubernetes,
        })
    }
}

/// Serves /health, /ready and /metrics; a busy port is a warning, not a failure.
fn start_endpoints(settings: &Settings, state: &Arc<AgentState>) -> Option<Endpoints> {
    let addr = settings.config.telemetry.listen_addr().ok().flatten()?;
    match endpoints::serve(addr, Arc::clone(state)) {
        Ok(served) => {
            log::info!(
                "/health, /ready and /metrics on http://{}",
                served.local_addr()
            );
            Some(served)
        }
        Err(e) => {
            log::warn!("agent endpoints not served: {e:#}");
            None
        }
    }
}

pub fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let mut startup = Startup::begin();
    let settings = startup.phase("config.load", || args.settings())?;
    startup.annotate(
        "zerotrace.config.file",
        args.config
            .as_ref()
            .map_or("none".to_owned(), |p| p.display().to_string()),
    );
    let stop = stop_on_signals()?;
    // Nothing Kubernetes starts unless metadata is wanted and reachable.
    let watch = match &settings.kubernetes {
        Some(k8s) => Some(startup.phase("kubernetes.start", || {
            Watch::start(&k8s.access, &k8s.node_name)
                .map_err(|e| ConfigError::new(format!("kubernetes metadata: {e:#}")))
        })?),
        None => None,
    };
    if let Some(k8s) = &settings.kubernetes {
        log::info!(
            "kubernetes metadata: watching the pods of node {} through {}",
            k8s.node_name,
            k8s.access.describe()
        );
        startup.annotate("zerotrace.kubernetes.node", k8s.node_name.clone());
    }
    let exporter = startup.phase("export.start", || {
        Exporter::start(&settings.target, settings.batch)
    })?;
    startup.annotate("zerotrace.exporter", settings.target.describe());
    let state = Arc::new(AgentState::default());
    let endpoints = start_endpoints(&settings, &state);
    let telemetry = &settings.config.telemetry;
    let mut self_spans = telemetry
        .spans
        .unwrap_or(settings.target != Target::Console)
        .then(|| SelfSpans::new(exporter.queue()));
    let features = startup.phase("kernel.probe", || {
        Ok::<_, std::convert::Infallible>(features::probe())
    })?;
    startup.annotate_features(&features);

    let mut options = TraceOptions::new(&settings.config, settings.sampler);
    options.kubernetes = watch.as_ref().map(Watch::metadata);
    // Handed over at the end of each pipeline round (the tick's flush).
    let tracer = Tracer::new(options, exporter.queue().batched(HANDOFF_SPANS));
    let load = args.capture.load_options_over(&settings.config.capture);
    let mut pipeline = match Pipeline::start(&load) {
        Ok(pipeline) => pipeline,
        Err(e) => {
            // The exporter is up: tell the trace backend why, then stop.
            if let Some(spans) = self_spans.as_mut() {
                startup.finish(spans, None, Some(&e));
            }
            drop((self_spans, tracer));
            exporter.shutdown();
            return Err(e);
        }
    };
    startup.annotate("zerotrace.runtimes", pipeline.followers.runtimes.summary());
    startup.annotate("zerotrace.tls", pipeline.followers.tls.summary());
    if let Some(spans) = self_spans.as_mut() {
        startup.finish(spans, Some(&pipeline), None);
    }
    let periods = Periods {
        stats: Duration::from_secs(settings.config.stats_interval.unwrap_or(10).max(1)),
        telemetry: Duration::from_secs(telemetry.interval.max(1)),
    };
    let mut tracing = Tracing::new(tracer, &exporter, &state, self_spans, &pipeline, periods);
    state.set_ready();
    eprintln!(
        "zerotrace: tracing ({} transport, kernel functions: {}, runtimes: {}, tls: {}, {} probes attached), exporting {}; Ctrl-C to stop",
        pipeline.transport().name(),
        pipeline.probes.kernel_functions.describe(),
        pipeline.followers.runtimes.summary(),
        pipeline.followers.tls.summary(),
        pipeline
            .probes
            .attachments
            .iter()
            .filter(|a| a.outcome.is_ok())
            .count(),
        settings.target.describe(),
    );
    let deadline = args
        .duration
        .map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    pipeline.run(&stop, deadline, &mut tracing)?;
    drop(endpoints);
    drop(pipeline);
    drop((tracing, watch));
    let counts = exporter.shutdown();
    eprintln!(
        "zerotrace: stopped, probes detached; {} spans exported, {} dropped, {} failed",
        counts.exported, counts.dropped_queue_full, counts.failed
    );
    Ok(ExitCode::SUCCESS)
}
