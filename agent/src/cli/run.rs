//! `zerotrace run`: the agent. Captures, traces and exports until stopped.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use clap::Args;

use super::CaptureArgs;
use crate::{
    config::{BatchConfig, Config, ConfigError, ExporterKind, HeaderRule, OtlpProtocol, env},
    export::{Exporter, Target},
    pipeline::{Pipeline, stop_on_signals},
    trace::{TraceOptions, Tracer, context::Sampler},
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
        if let Some(bytes) = self.capture.capture_bytes {
            config.capture.capture_bytes = Some(bytes);
        }
        config.validate()?;

        let env_endpoint = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
        // The library reads the environment itself; pass what outranks it
        // (a flag) or what it cannot see (the file).
        let endpoint = self.otlp_endpoint.clone().or(if env_endpoint.is_some() {
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
        if let Some(url) = endpoint
            .iter()
            .chain(&env_endpoint)
            .find(|u| u.starts_with("https:"))
        {
            return Err(ConfigError::new(format!(
                "OTLP endpoint {url}: TLS is not built into this agent yet; export over \
                 http:// to a collector on the node or a sidecar"
            )));
        }
        let has_endpoint = endpoint.is_some() || env_endpoint.is_some();
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
            ExporterKind::Otlp => Target::Otlp { endpoint, protocol },
        };
        let sampler = Sampler::from_env_or(&config.sampling)?;
        Ok(Settings {
            batch: BatchConfig::from_env()?,
            config,
            target,
            sampler,
        })
    }
}

pub fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let settings = args.settings()?;
    let stop = stop_on_signals()?;
    let exporter = Exporter::start(&settings.target, settings.batch)?;
    let mut tracer = Tracer::new(
        TraceOptions::new(&settings.config, settings.sampler),
        exporter.queue(),
    );
    let load = args.capture.load_options_over(&settings.config.capture);
    let mut pipeline = Pipeline::start(&load)?;
    eprintln!(
        "zerotrace: tracing ({} transport, kernel functions: {}, {} probes attached), exporting {}; Ctrl-C to stop",
        pipeline.transport().name(),
        pipeline.probes.kernel_functions.describe(),
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
    let interval = Duration::from_secs(settings.config.stats_interval.unwrap_or(10).max(1));
    let deadline = args
        .duration
        .map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    let mut last_report = Instant::now();
    while !stop.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d) {
        pipeline.step(Duration::from_millis(100), &mut |r| tracer.on_record(r))?;
        if last_report.elapsed() >= interval {
            report(&pipeline, &tracer, &exporter);
            last_report = Instant::now();
        }
    }
    // Whatever is already in the buffers still counts.
    pipeline.step(Duration::ZERO, &mut |r| tracer.on_record(r))?;
    report(&pipeline, &tracer, &exporter);
    drop(pipeline);
    drop(tracer);
    let counts = exporter.shutdown();
    eprintln!(
        "zerotrace: stopped, probes detached; {} spans exported, {} dropped, {} failed",
        counts.exported, counts.dropped_queue_full, counts.failed
    );
    Ok(ExitCode::SUCCESS)
}
