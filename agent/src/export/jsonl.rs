//! OTLP/JSON lines: each span as one ExportTraceServiceRequest object per
//! line (lowerCamelCase keys, hex ids), the encoding the OpenTelemetry
//! Collector's file exporter writes, so its tools can read the file.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::Path,
};

use anyhow::Context;
use opentelemetry_proto::{
    tonic::collector::trace::v1::ExportTraceServiceRequest,
    transform::{
        common::tonic::ResourceAttributesWithSchema,
        trace::tonic::group_spans_by_resource_and_scope,
    },
};

use super::{ExportSpan, Sink};

pub struct Jsonl {
    out: BufWriter<File>,
}

impl Jsonl {
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {} for the jsonl exporter", path.display()))?;
        Ok(Self {
            out: BufWriter::new(file),
        })
    }
}

/// The OTLP/JSON line for one span.
pub fn encode(span: &ExportSpan) -> anyhow::Result<String> {
    let resource = ResourceAttributesWithSchema::from(&**span.resource);
    let request = ExportTraceServiceRequest {
        resource_spans: group_spans_by_resource_and_scope(
            vec![span.span.to_span_data()],
            &resource,
        ),
    };
    Ok(serde_json::to_string(&request)?)
}

impl Sink for Jsonl {
    fn export(&mut self, spans: &mut Vec<ExportSpan>) -> anyhow::Result<usize> {
        for span in spans.iter() {
            let line = encode(span)?;
            writeln!(self.out, "{line}")?;
        }
        // Flushed per batch, so a reader tailing the file sees whole lines.
        self.out.flush()?;
        let n = spans.len();
        spans.clear();
        Ok(n)
    }

    fn shutdown(&mut self) {
        let _ = self.out.flush();
    }
}
