//! OTLP over gRPC (tonic) or HTTP/protobuf, via opentelemetry-otlp, which
//! also reads OTEL_EXPORTER_OTLP_{,TRACES_}{ENDPOINT,HEADERS,TIMEOUT,COMPRESSION}.
//! An exporter carries one Resource, so each batch is sent per process.

use std::time::Duration;

use anyhow::Context;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SpanExporter as _;

use super::{ExportSpan, Sink, by_resource};
use crate::config::OtlpProtocol;

pub struct Otlp {
    runtime: tokio::runtime::Runtime,
    exporter: opentelemetry_otlp::SpanExporter,
    timeout: Duration,
}

impl Otlp {
    pub fn new(
        runtime: tokio::runtime::Runtime,
        endpoint: Option<String>,
        protocol: OtlpProtocol,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        // tonic needs the runtime while building its channel.
        let exporter = {
            let _guard = runtime.enter();
            let builder = opentelemetry_otlp::SpanExporter::builder();
            match protocol {
                OtlpProtocol::Grpc => {
                    let mut b = builder.with_tonic();
                    if let Some(e) = endpoint {
                        b = b.with_endpoint(e);
                    }
                    b.build()
                }
                OtlpProtocol::HttpProtobuf => {
                    let mut b = builder
                        .with_http()
                        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
                    if let Some(e) = endpoint {
                        b = b.with_endpoint(traces_url(&e));
                    }
                    b.build()
                }
            }
            .context("configuring the OTLP exporter")?
        };
        Ok(Self {
            runtime,
            exporter,
            timeout,
        })
    }
}

/// A configured base endpoint gets the signal path, as the spec asks for
/// OTEL_EXPORTER_OTLP_ENDPOINT (the library does this only for the env var).
fn traces_url(endpoint: &str) -> String {
    let trimmed = endpoint.trim_end_matches('/');
    let has_path = trimmed
        .split_once("://")
        .map_or(trimmed, |(_, rest)| rest)
        .contains('/');
    if has_path {
        endpoint.to_owned()
    } else {
        format!("{trimmed}/v1/traces")
    }
}

impl Sink for Otlp {
    fn export(&mut self, spans: Vec<ExportSpan>) -> anyhow::Result<usize> {
        let mut delivered = 0;
        let mut first_error = None;
        for (resource, group) in by_resource(spans) {
            let n = group.len();
            self.exporter.set_resource(&resource);
            let result = self.runtime.block_on(async {
                tokio::time::timeout(self.timeout, self.exporter.export(group)).await
            });
            match result {
                Ok(Ok(())) => delivered += n,
                Ok(Err(e)) => {
                    first_error.get_or_insert_with(|| anyhow::anyhow!("{e}"));
                }
                Err(_) => {
                    first_error.get_or_insert_with(|| {
                        anyhow::anyhow!("timed out after {:?}", self.timeout)
                    });
                }
            }
        }
        match first_error {
            Some(e) if delivered == 0 => Err(e),
            Some(e) => {
                log::warn!("export partly failed: {e:#}");
                Ok(delivered)
            }
            None => Ok(delivered),
        }
    }

    fn shutdown(&mut self) {
        let _guard = self.runtime.enter();
        let _ = self.exporter.shutdown_with_timeout(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base_endpoints_get_the_traces_path() {
        assert_eq!(
            super::traces_url("http://h:4318"),
            "http://h:4318/v1/traces"
        );
        assert_eq!(
            super::traces_url("http://h:4318/"),
            "http://h:4318/v1/traces"
        );
        assert_eq!(
            super::traces_url("http://h:4318/custom"),
            "http://h:4318/custom"
        );
    }
}
