//! Counting spans without decoding them, for benchmark runs: the receiver
//! shares the CPUs with the workload, and decoding every attribute of 100 k
//! spans a second (an allocation per string) cost the host as much as the
//! agent itself. These messages name only the fields on the way to the
//! spans; prost skips everything else, and a `Vec` of empty messages holds
//! a count, not spans.

use std::task::{Context, Poll};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use tonic::codegen::{BoxFuture, Service, http};

use super::Shared;

/// `ExportTraceServiceRequest`, down to its spans.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SpanCount {
    #[prost(message, repeated, tag = "1")]
    pub resource_spans: Vec<ResourceSpanCount>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ResourceSpanCount {
    #[prost(message, repeated, tag = "2")]
    pub scope_spans: Vec<ScopeSpanCount>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ScopeSpanCount {
    #[prost(message, repeated, tag = "2")]
    pub spans: Vec<Skipped>,
}

/// A message whose fields are all skipped.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Skipped {}

impl SpanCount {
    pub fn spans(&self) -> usize {
        self.resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum()
    }
}

const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// The OTLP gRPC trace service decoding requests as [`SpanCount`] (what
/// tonic's generated server does, with this message in place of the full
/// request).
#[derive(Clone)]
pub struct CountingTraceService(pub Shared);

impl tonic::server::NamedService for CountingTraceService {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

struct Export(Shared);

impl tonic::server::UnaryService<SpanCount> for Export {
    type Response = ExportTraceServiceResponse;
    type Future = BoxFuture<tonic::Response<Self::Response>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<SpanCount>) -> Self::Future {
        let sink = self.0.clone();
        Box::pin(async move {
            let headers = request.metadata().clone().into_headers();
            sink.count(headers, &request.into_inner());
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        })
    }
}

impl<B> Service<http::Request<B>> for CountingTraceService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let sink = self.0.clone();
        Box::pin(async move {
            if req.uri().path() != EXPORT {
                let mut response = http::Response::new(tonic::body::Body::default());
                response.headers_mut().insert(
                    tonic::Status::GRPC_STATUS,
                    (tonic::Code::Unimplemented as i32).into(),
                );
                return Ok(response);
            }
            let codec = tonic_prost::ProstCodec::<ExportTraceServiceResponse, SpanCount>::default();
            let mut accept = tonic::codec::EnabledCompressionEncodings::default();
            accept.enable(tonic::codec::CompressionEncoding::Gzip);
            let mut grpc = tonic::server::Grpc::new(codec)
                .apply_compression_config(
                    accept,
                    tonic::codec::EnabledCompressionEncodings::default(),
                )
                .apply_max_message_size_config(Some(64 << 20), None);
            Ok(grpc.unary(Export(sink), req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::{
        collector::trace::v1::ExportTraceServiceRequest,
        common::v1::{AnyValue, KeyValue, any_value},
        resource::v1::Resource,
        trace::v1::{ResourceSpans, ScopeSpans, Span},
    };
    use prost::Message;

    use super::*;

    #[test]
    fn counts_the_spans_of_a_full_request() {
        let span = |name: &str| Span {
            name: name.into(),
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            attributes: vec![KeyValue {
                key: "http.route".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue("/a/{id}".into())),
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let resource = |spans: Vec<Vec<Span>>| ResourceSpans {
            resource: Some(Resource::default()),
            scope_spans: spans
                .into_iter()
                .map(|spans| ScopeSpans {
                    spans,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let request = ExportTraceServiceRequest {
            resource_spans: vec![
                resource(vec![vec![span("a"), span("b")], vec![span("c")]]),
                resource(vec![vec![]]),
                resource(vec![vec![span("d"); 40]]),
            ],
        };
        let count = SpanCount::decode(&request.encode_to_vec()[..]).unwrap();
        assert_eq!((count.spans(), count.resource_spans.len()), (43, 3));
    }
}
