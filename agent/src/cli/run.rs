//! `zerotrace run`: the agent. Captures, traces and exports until stopped.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use clap::Args;

use super::CaptureArgs;
use crate::{
    config::{
        BatchConfig, Config, ConfigError, ExporterKind, HeaderRule, KubernetesTarget, MetadataMode,
        OtlpProtocol, env,
    },
    export::{Exporter, OtlpSettings, Target},
    kernel::features,
    pipeline::{Pipeline, stop_on_signals},
    selftrace::{
        SelfSpans,
        endpoints::{self, AgentState, Endpoints, MetricsSnapshot, ProgramRun},
        interval::IntervalReporter,
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

/// What /metrics shows now.
fn snapshot(
    pipeline: &Pipeline,
    tracer: &Tracer,
    exporter: &Exporter,
    own: u64,
) -> MetricsSnapshot {
    let s = pipeline.stats();
    let x = exporter.counts();
    MetricsSnapshot {
        transport: s.transport,
        events: s.reader.records,
        bytes: s.reader.bytes,
        lost: s.lost(),
        spans_produced: tracer.stats.spans + own,
        spans_exported: x.exported,
        spans_dropped: x.dropped_queue_full,
        export_errors: x.failed,
        queue_depth: x.waiting(),
        connections_open: s.connections_open as u64,
        programs: pipeline
            .probes
            .program_stats()
            .into_iter()
            .map(|p| ProgramRun {
                program: p.program,
                kind: p.kind,
                run_count: p.run_count,
                run_time_ns: p.run_time_ns,
            })
            .collect(),
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
    let mut tracer = Tracer::new(options, exporter.queue());
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
    startup.annotate("zerotrace.runtimes", pipeline.runtimes.summary());
    if let Some(spans) = self_spans.as_mut() {
        startup.finish(spans, Some(&pipeline), None);
    }
    let own_spans = |s: &Option<SelfSpans>| s.as_ref().map_or(0, |s| s.produced);
    state.update(snapshot(
        &pipeline,
        &tracer,
        &exporter,
        own_spans(&self_spans),
    ));
    state.set_ready();
    eprintln!(
        "zerotrace: tracing ({} transport, kernel functions: {}, runtimes: {}, {} probes attached), exporting {}; Ctrl-C to stop",
        pipeline.transport().name(),
        pipeline.probes.kernel_functions.describe(),
        pipeline.runtimes.summary(),
        pipeline
            .probes
            .attachments
            .iter()
            .filter(|a| a.outcome.is_ok())
            .count(),
        settings.target.describe(),
    );
    let report = |p: &Pipeline, t: &Tracer, e: &Exporter| {
        let s = p.stats();
        let x = e.counts();
        log::info!(
            "{} data events, {} lost, {} connections open; {} spans ({} in flight), \
             {} exported, {} dropped, {} failed",
            s.data_events,
            s.lost(),
            s.connections_open,
            t.stats.spans,
            t.in_flight(),
            x.exported,
            x.dropped_queue_full,
            x.failed,
        );
    };
    let mut intervals = IntervalReporter::new(&pipeline);
    let stats_every = Duration::from_secs(settings.config.stats_interval.unwrap_or(10).max(1));
    let interval_every = Duration::from_secs(telemetry.interval.max(1));
    let deadline = args
        .duration
        .map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    let (mut last_report, mut last_interval, mut last_snapshot) =
        (Instant::now(), Instant::now(), Instant::now());
    while !stop.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d) {
        pipeline.step(crate::capture::reader::POLL_EVERY, &mut |r| {
            tracer.on_record(r)
        })?;
        state.heartbeat();
        if last_snapshot.elapsed() >= Duration::from_secs(1) {
            state.update(snapshot(
                &pipeline,
                &tracer,
                &exporter,
                own_spans(&self_spans),
            ));
            last_snapshot = Instant::now();
        }
        if last_interval.elapsed() >= interval_every {
            if let Some(spans) = self_spans.as_mut() {
                intervals.report(spans, &mut pipeline);
            }
            last_interval = Instant::now();
        }
        if last_report.elapsed() >= stats_every {
            report(&pipeline, &tracer, &exporter);
            last_report = Instant::now();
        }
    }
    // Detach first: nothing new arrives, and what is already in the
    // buffers still counts.
    pipeline.probes.detach();
    pipeline.step(Duration::ZERO, &mut |r| tracer.on_record(r))?;
    if let Some(spans) = self_spans.as_mut()
        && last_interval.elapsed() >= Duration::from_millis(100)
    {
        // The last, partial interval: a short run still reports its costs.
        intervals.report(spans, &mut pipeline);
    }
    report(&pipeline, &tracer, &exporter);
    drop(endpoints);
    drop(pipeline);
    drop((tracer, self_spans, watch));
    let counts = exporter.shutdown();
    eprintln!(
        "zerotrace: stopped, probes detached; {} spans exported, {} dropped, {} failed",
        counts.exported, counts.dropped_queue_full, counts.failed
    );
    Ok(ExitCode::SUCCESS)
}
