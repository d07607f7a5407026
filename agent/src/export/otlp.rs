//! OTLP over gRPC (tonic) or HTTP/protobuf (reqwest), plaintext or TLS. A
//! batch becomes one ExportTraceServiceRequest holding a ResourceSpans per
//! process, written straight from the spans ([`super::proto`]), and goes
//! out in one call. Settings follow the OTLP exporter specification:
//! OTEL_EXPORTER_OTLP_{,TRACES_}{ENDPOINT,HEADERS,TIMEOUT,COMPRESSION,
//! CERTIFICATE,CLIENT_CERTIFICATE,CLIENT_KEY,INSECURE}, the signal-specific
//! variable first.

use std::{io::Write, path::PathBuf, time::Duration};

use anyhow::{Context, anyhow};
use http_body_util::BodyExt;
use opentelemetry_proto::{
    tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse},
    transform::{
        common::tonic::ResourceAttributesWithSchema,
        trace::tonic::group_spans_by_resource_and_scope,
    },
};
use prost::Message;
use reqwest::header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use tonic::codegen::{
    Body, BoxFuture, Context as TaskContext, Poll, Service, StdError, http, http::StatusCode,
};

use super::{
    Attributes, ExportSpan, Sink, by_resource,
    proto::Encoder,
    tls::{ClientTls, PemFile, TlsFiles, client_refused, explain, find, plaintext_config},
};
use crate::config::{OtlpProtocol, OtlpTlsConfig};

/// Where and how spans are sent, resolved from flags, environment and file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpSettings {
    pub protocol: OtlpProtocol,
    /// The full URL; for HTTP with the signal path.
    pub endpoint: String,
    /// Sent with every request (collector credentials); never logged.
    pub headers: HeaderMap,
    pub gzip: bool,
    /// Per request (OTEL_EXPORTER_OTLP_TIMEOUT, default 10 s).
    pub timeout: Duration,
    /// `Some` for an https:// endpoint (boxed: most endpoints are not).
    pub tls: Option<Box<TlsFiles>>,
}

/// TLS settings from flags, which outrank the environment, and from the
/// config file, which it outranks.
#[derive(Debug, Clone, Default)]
pub struct TlsSources {
    pub flags: OtlpTlsConfig,
    pub file: OtlpTlsConfig,
}

impl OtlpSettings {
    /// `explicit`: the endpoint from a flag, or from the config file when
    /// the environment names none. `env` reads a variable (empty counts as
    /// unset). Errors name the variable at fault. TLS files are only named
    /// here; the exporter reads them when it starts.
    pub fn resolve(
        explicit: Option<&str>,
        protocol: OtlpProtocol,
        tls: &TlsSources,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let either = |suffix: &str| {
            let traces = format!("OTEL_EXPORTER_OTLP_TRACES_{suffix}");
            match env(&traces) {
                Some(v) => Some((traces, v)),
                None => {
                    let general = format!("OTEL_EXPORTER_OTLP_{suffix}");
                    env(&general).map(|v| (general, v))
                }
            }
        };
        let http = protocol == OtlpProtocol::HttpProtobuf;
        let endpoint = match (explicit, env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) {
            (Some(e), _) if http => traces_url(e),
            (Some(e), _) => e.to_owned(),
            // The signal-specific variable is the whole URL.
            (None, Some(e)) => e,
            (None, None) => match env("OTEL_EXPORTER_OTLP_ENDPOINT") {
                // The general one is a base that gets the signal path.
                Some(e) if http => format!("{}/v1/traces", e.trim_end_matches('/')),
                Some(e) => e,
                None if http => "http://localhost:4318/v1/traces".into(),
                None => "http://localhost:4317".into(),
            },
        };
        let insecure = match (tls.flags.insecure, either("INSECURE")) {
            (Some(flag), _) => flag,
            (None, Some((name, v))) => match v.trim().to_ascii_lowercase().as_str() {
                "true" => true,
                "false" => false,
                _ => return Err(format!("{name}={v:?}: use true or false")),
            },
            (None, None) => tls.file.insecure.unwrap_or(false),
        };
        // A gRPC target may come without a scheme: then INSECURE chooses,
        // and TLS is the default. A scheme always wins over INSECURE.
        let endpoint = match endpoint.contains("://") {
            false if !http && insecure => format!("http://{endpoint}"),
            false if !http => format!("https://{endpoint}"),
            _ => endpoint,
        };
        let secure = endpoint.starts_with("https://");
        let valid = (secure || endpoint.starts_with("http://"))
            && endpoint
                .parse::<tonic::transport::Uri>()
                .is_ok_and(|uri| uri.host().is_some_and(|h| !h.is_empty()));
        if !valid {
            return Err(format!(
                "OTLP endpoint {endpoint:?} is not a URL like http://collector:4317 or \
                 https://collector:4317"
            ));
        }
        // Flag, then the signal's and the general variable, then the file.
        let pem = |suffix: &str,
                   (flag_name, flag): (&str, &Option<PathBuf>),
                   (key, file): (&str, &Option<PathBuf>)| {
            let (setting, path) = match (flag, either(suffix)) {
                (Some(path), _) => (flag_name.to_owned(), path.clone()),
                (None, Some((name, v))) => (name, PathBuf::from(v.trim())),
                (None, None) => (key.to_owned(), file.clone()?),
            };
            Some(PemFile { setting, path })
        };
        let (flags, conf) = (&tls.flags, &tls.file);
        let ca = pem(
            "CERTIFICATE",
            ("--otlp-certificate", &flags.ca_file),
            ("export.tls.ca_file", &conf.ca_file),
        );
        let cert = pem(
            "CLIENT_CERTIFICATE",
            ("--otlp-client-certificate", &flags.cert_file),
            ("export.tls.cert_file", &conf.cert_file),
        );
        let key = pem(
            "CLIENT_KEY",
            ("--otlp-client-key", &flags.key_file),
            ("export.tls.key_file", &conf.key_file),
        );
        let client = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(one), None) | (None, Some(one)) => {
                return Err(format!(
                    "{one}: a client certificate needs its key and a key its certificate \
                     (OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY)"
                ));
            }
        };
        let files = TlsFiles { ca, client };
        let tls = if secure {
            Some(Box::new(files))
        } else {
            if let Some(set) = files.ca.as_ref().or(files.client.as_ref().map(|c| &c.0)) {
                log::warn!(
                    "{set} is not used: the OTLP endpoint {endpoint} is plaintext (http://)"
                );
            }
            None
        };
        let mut headers = HeaderMap::new();
        // The general headers first, so the signal-specific ones replace them.
        for name in [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        ] {
            if let Some(list) = env(name) {
                for (key, value) in parse_headers(&list).map_err(|e| format!("{name}: {e}"))? {
                    headers.insert(key, value);
                }
            }
        }
        let gzip = match either("COMPRESSION") {
            None => false,
            Some((name, v)) => match v.trim().to_ascii_lowercase().as_str() {
                "gzip" => true,
                "none" => false,
                _ => return Err(format!("{name}={v:?}: use gzip or none")),
            },
        };
        let timeout = match either("TIMEOUT") {
            None => Duration::from_secs(10),
            Some((name, v)) => match v.trim().parse::<u64>() {
                Ok(ms) if ms > 0 => Duration::from_millis(ms),
                _ => return Err(format!("{name}={v:?} is not a timeout in milliseconds")),
            },
        };
        Ok(Self {
            protocol,
            endpoint,
            headers,
            gzip,
            timeout,
            tls,
        })
    }
}

/// An endpoint from a flag or the file gets the signal path when it has
/// none, as the specification asks of OTEL_EXPORTER_OTLP_ENDPOINT.
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

/// `key1=value1,key2=value2` with percent-encoded values (the W3C baggage
/// format the specification uses); keys are lowercased, as gRPC needs.
fn parse_headers(list: &str) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let mut out = Vec::new();
    for item in list.split(',').filter(|i| !i.trim().is_empty()) {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("{:?} is not key=value", item.trim()))?;
        let key = key.trim().to_ascii_lowercase();
        let name = HeaderName::from_bytes(key.as_bytes())
            .map_err(|_| format!("{key:?} is not a header name"))?;
        let decoded = percent_encoding::percent_decode_str(value.trim()).decode_utf8_lossy();
        let mut value = HeaderValue::from_str(&decoded)
            .map_err(|_| format!("the value of {key:?} is not a valid header value"))?;
        value.set_sensitive(true);
        out.push((name, value));
    }
    Ok(out)
}

enum Transport {
    Grpc(GrpcAnswers),
    Http(reqwest::Client),
}

/// An HTTP error answer without a gRPC status: a proxy or TLS terminator
/// in front of the collector refusing the request (nginx's 400 for a
/// missing client certificate, an auth proxy's 401), or the collector's
/// OTLP/HTTP receiver refusing it.
#[derive(Debug)]
struct HttpRefusal {
    status: StatusCode,
    /// The start of the body, as text (an HTML page's title).
    text: String,
    /// Seen on the gRPC transport, where the answer should have been gRPC.
    grpc: bool,
}

impl HttpRefusal {
    async fn read<B>(status: StatusCode, body: B, grpc: bool) -> Self
    where
        B: Body,
        B::Error: Into<StdError>,
    {
        // A few KiB say why; a body that never ends must not hold the export.
        let body = http_body_util::Limited::new(body, 4096);
        let text = match tokio::time::timeout(Duration::from_secs(1), body.collect()).await {
            Ok(Ok(all)) => body_text(&all.to_bytes()),
            _ => String::new(),
        };
        Self { status, text, grpc }
    }

    /// Whether it is about the client certificate (nginx: "No required SSL
    /// certificate was sent", "The SSL certificate error").
    fn about_certificate(&self) -> bool {
        matches!(self.status.as_u16(), 400 | 401 | 403 | 495 | 496)
            && self.text.to_ascii_lowercase().contains("certificate")
    }
}

impl std::fmt::Display for HttpRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}", self.status)?;
        if self.grpc {
            f.write_str(" instead of a gRPC answer")?;
        }
        if !self.text.is_empty() {
            write!(f, ": {}", self.text)?;
        }
        Ok(())
    }
}

impl std::error::Error for HttpRefusal {}

/// A body as one short line of text: an HTML page's title, or the text
/// without tags, cut to 200 bytes.
fn body_text(body: &[u8]) -> String {
    let body = String::from_utf8_lossy(body);
    let title = body
        .split_once("<title>")
        .and_then(|(_, rest)| rest.split_once("</title>"))
        .map(|(title, _)| title);
    let mut text = String::new();
    let mut in_tag = false;
    for c in title.unwrap_or(&body).chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => in_tag = false,
            _ if in_tag => {}
            c if c.is_whitespace() => {
                if !text.is_empty() && !text.ends_with(' ') {
                    text.push(' ');
                }
            }
            c => text.push(c),
        }
    }
    let mut end = text.trim_end().len().min(200);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text
}

/// The gRPC channel, with answers that are not gRPC turned into an
/// [`HttpRefusal`]: tonic would try to decode an HTML page as messages.
#[derive(Clone)]
struct GrpcAnswers(tonic::transport::Channel);

impl Service<http::Request<tonic::body::Body>> for GrpcAnswers {
    type Response = http::Response<tonic::body::Body>;
    type Error = StdError;
    type Future = BoxFuture<Self::Response, StdError>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), StdError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let answer = self.0.call(request);
        Box::pin(async move {
            let response = answer.await?;
            // gRPC answers 200, or carries its status in the headers.
            if response.status() == StatusCode::OK || response.headers().contains_key("grpc-status")
            {
                return Ok(response);
            }
            let status = response.status();
            Err(HttpRefusal::read(status, response.into_body(), true)
                .await
                .into())
        })
    }
}

pub struct Otlp {
    runtime: tokio::runtime::Runtime,
    settings: OtlpSettings,
    transport: Transport,
    encoder: Encoder,
    /// The last request's size: the next one's buffer is made about that
    /// big at once (a batch is some hundreds of KiB; grown as it is
    /// written, it would be copied again and again). It is not reused: h2
    /// still holds it while the answer is read.
    last_len: usize,
    /// The bound on one whole export (OTEL_BSP_EXPORT_TIMEOUT).
    export_timeout: Duration,
}

impl Otlp {
    pub fn new(
        runtime: tokio::runtime::Runtime,
        settings: OtlpSettings,
        export_timeout: Duration,
    ) -> anyhow::Result<Self> {
        // Bad TLS files are configuration errors (exit code 2).
        let tls = settings.tls.as_deref().map(ClientTls::load).transpose()?;
        let transport = match settings.protocol {
            OtlpProtocol::Grpc => {
                // Connects on first use and reconnects after failures, so a
                // collector that is not up yet is not a startup error.
                let mut channel =
                    tonic::transport::Endpoint::from_shared(settings.endpoint.clone())
                        .with_context(|| format!("OTLP endpoint {}", settings.endpoint))?
                        .connect_timeout(settings.timeout)
                        .timeout(settings.timeout);
                if let Some(tls) = &tls {
                    // The handshake has the request's bound too.
                    channel = channel
                        .tls_config(tls.tonic_config().timeout(settings.timeout))
                        .with_context(|| format!("TLS to {}", settings.endpoint))?;
                }
                let channel = {
                    let _guard = runtime.enter();
                    channel.connect_lazy()
                };
                Transport::Grpc(GrpcAnswers(channel))
            }
            OtlpProtocol::HttpProtobuf => {
                let config = match &tls {
                    // HTTP/1.1 only: reqwest is built without HTTP/2.
                    Some(tls) => tls
                        .rustls_config(vec![b"http/1.1".to_vec()])
                        .with_context(|| format!("TLS to {}", settings.endpoint))?,
                    None => plaintext_config(),
                };
                Transport::Http(
                    reqwest::Client::builder()
                        .timeout(settings.timeout)
                        .tls_backend_preconfigured(config)
                        .build()
                        .context("building the OTLP HTTP client")?,
                )
            }
        };
        Ok(Self {
            runtime,
            settings,
            transport,
            encoder: Encoder::default(),
            last_len: 0,
            export_timeout,
        })
    }
}

/// The batch as opentelemetry-proto's request, converted from the spans it
/// owns: what [`Encoder`] writes, for tests and benchmarks to compare.
pub fn request(spans: Vec<ExportSpan>) -> ExportTraceServiceRequest {
    let resource_spans = by_resource(spans)
        .into_iter()
        .flat_map(|(resource, group)| {
            group_spans_by_resource_and_scope(
                group,
                &ResourceAttributesWithSchema::from(&**resource),
            )
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}

/// Sends one request; returns the spans the collector rejected. For gRPC,
/// `body` starts with [`GRPC_PREFIX`] bytes of room for the message's
/// prefix.
async fn send(
    transport: &mut Transport,
    settings: &OtlpSettings,
    mut body: Vec<u8>,
) -> anyhow::Result<i64> {
    let response = match transport {
        Transport::Grpc(channel) => grpc_export(channel, settings, body).await?,
        Transport::Http(client) => {
            let mut req = client
                .post(&settings.endpoint)
                .headers(settings.headers.clone())
                .header(CONTENT_TYPE, "application/x-protobuf");
            if settings.gzip {
                body = gzip(&[], &body)?;
                req = req.header(CONTENT_ENCODING, "gzip");
            }
            let resp = req
                .body(body)
                .send()
                .await
                .map_err(|e| failure(&e, settings).unwrap_or_else(|| e.into()))?;
            let status = resp.status();
            if !status.is_success() {
                let refusal = HttpRefusal::read(status, reqwest::Body::from(resp), false).await;
                return Err(failure(&refusal, settings).unwrap_or_else(|| refusal.into()));
            }
            let bytes = resp.bytes().await?;
            // An empty or undecodable body on success is full success.
            ExportTraceServiceResponse::decode(bytes).unwrap_or_default()
        }
    };
    let rejected = response.partial_success.map_or(0, |p| {
        if p.rejected_spans > 0 || !p.error_message.is_empty() {
            log::warn!(
                "the collector rejected {} spans: {}",
                p.rejected_spans,
                p.error_message
            );
        }
        p.rejected_spans.max(0)
    });
    Ok(rejected)
}

/// `prefix`, then `body` gzipped (fast level: the agent shares the CPUs
/// with what it traces).
fn gzip(prefix: &[u8], body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(prefix.len() + body.len() / 4);
    out.extend_from_slice(prefix);
    let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
    gz.write_all(body)?;
    gz.finish()
}

/// The gRPC method of a trace export.
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// A gRPC message's prefix: the compressed flag and a 4-byte length.
pub const GRPC_PREFIX: usize = 5;

/// One unary gRPC call with the request's bytes as they are. tonic's
/// codec would copy a batch of some hundreds of KiB into its own buffer,
/// growing it as it goes; here the encoded request, behind its prefix, is
/// the HTTP/2 body, which h2 sends from where it lies.
async fn grpc_export(
    channel: &mut GrpcAnswers,
    settings: &OtlpSettings,
    mut framed: Vec<u8>,
) -> anyhow::Result<ExportTraceServiceResponse> {
    if settings.gzip {
        // The prefix's flag says compressed; its length is set below.
        framed = gzip(&[1, 0, 0, 0, 0], &framed[GRPC_PREFIX..])?;
    }
    let len = u32::try_from(framed.len() - GRPC_PREFIX).context("a request over 4 GiB")?;
    framed[1..GRPC_PREFIX].copy_from_slice(&len.to_be_bytes());
    let body = http_body_util::Full::new(prost::bytes::Bytes::from(framed));
    let mut request = http::Request::new(tonic::body::Body::new(body));
    *request.method_mut() = http::Method::POST;
    // The channel adds the endpoint's scheme and authority.
    *request.uri_mut() = http::Uri::from_static(EXPORT_PATH);
    *request.version_mut() = http::Version::HTTP_2;
    let headers = request.headers_mut();
    headers.clone_from(&settings.headers);
    headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    if settings.gzip {
        headers.insert("grpc-encoding", HeaderValue::from_static("gzip"));
    }
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| {
            failure(&*e, settings).unwrap_or_else(|| anyhow!("gRPC channel not ready: {e}"))
        })?;
    let response = channel
        .call(request)
        .await
        .map_err(|e| failure(&*e, settings).unwrap_or_else(|| anyhow!("{e}")))?;
    // A trailers-only answer carries its status in the headers.
    let early = tonic::Status::from_header_map(response.headers());
    let answer = response
        .into_body()
        .collect()
        .await
        .map_err(|e| anyhow!("reading the gRPC answer: {e}"))?;
    let status = early
        .or_else(|| answer.trailers().and_then(tonic::Status::from_header_map))
        .ok_or_else(|| anyhow!("the gRPC answer has no grpc-status"))?;
    if status.code() != tonic::Code::Ok {
        return Err(failure(&status, settings)
            .unwrap_or_else(|| anyhow!("gRPC status {:?}: {}", status.code(), status.message())));
    }
    let bytes = answer.to_bytes();
    // An answer without a message, or one that does not decode, is full
    // success: the status said so.
    let message = bytes
        .get(GRPC_PREFIX..)
        .filter(|_| bytes[0] == 0)
        .and_then(|rest| {
            let len = u32::from_be_bytes(bytes[1..GRPC_PREFIX].try_into().ok()?) as usize;
            rest.get(..len)
        })
        .unwrap_or_default();
    Ok(ExportTraceServiceResponse::decode(message).unwrap_or_default())
}

/// A failed request said in terms of the settings to check: a TLS
/// handshake failure, or an HTTP refusal (about the client certificate,
/// with TLS, is a TLS failure too). `None`: nothing better to say than the
/// error itself.
fn failure(
    err: &(dyn std::error::Error + 'static),
    settings: &OtlpSettings,
) -> Option<anyhow::Error> {
    if let Some(tls) = &settings.tls
        && let Some(failed) = explain(err, tls)
    {
        return Some(failed.into());
    }
    let refusal = find::<HttpRefusal>(err)?;
    Some(match &settings.tls {
        Some(tls) if refusal.about_certificate() => {
            client_refused(tls, &refusal.to_string()).into()
        }
        _ => anyhow!("{refusal}"),
    })
}

impl Sink for Otlp {
    fn export(&mut self, spans: &mut Vec<ExportSpan>) -> anyhow::Result<usize> {
        let n = spans.len();
        let mut body = Vec::with_capacity(self.last_len.max(n * 400) + GRPC_PREFIX);
        if let Transport::Grpc(_) = self.transport {
            body.extend_from_slice(&[0; GRPC_PREFIX]);
        }
        self.encoder.append_request(spans, &mut body);
        self.last_len = body.len() + body.len() / 16;
        Attributes::recycle(spans.drain(..).map(|s| s.span.attributes));
        let Self {
            runtime,
            settings,
            transport,
            export_timeout,
            ..
        } = self;
        let result = runtime.block_on(async {
            tokio::time::timeout(*export_timeout, send(transport, settings, body)).await
        });
        match result {
            Ok(Ok(rejected)) => Ok(n.saturating_sub(rejected as usize)),
            Ok(Err(e)) => Err(e.context(format!("exporting to {}", settings.endpoint))),
            Err(_) => Err(anyhow!(
                "exporting to {}: timed out after {export_timeout:?}",
                settings.endpoint
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(
        explicit: Option<&str>,
        protocol: OtlpProtocol,
        vars: &[(&str, &str)],
    ) -> Result<OtlpSettings, String> {
        resolve_tls(explicit, protocol, &TlsSources::default(), vars)
    }

    fn resolve_tls(
        explicit: Option<&str>,
        protocol: OtlpProtocol,
        tls: &TlsSources,
        vars: &[(&str, &str)],
    ) -> Result<OtlpSettings, String> {
        OtlpSettings::resolve(explicit, protocol, tls, |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn endpoints_follow_the_specification() {
        let http = OtlpProtocol::HttpProtobuf;
        let grpc = OtlpProtocol::Grpc;
        let endpoint =
            |explicit, protocol, vars| resolve(explicit, protocol, vars).unwrap().endpoint;
        assert_eq!(endpoint(None, http, &[]), "http://localhost:4318/v1/traces");
        assert_eq!(endpoint(None, grpc, &[]), "http://localhost:4317");
        // The general variable is a base; the signal one is used as it is.
        let base = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/otlp/")];
        assert_eq!(endpoint(None, http, &base), "http://c:4318/otlp/v1/traces");
        assert_eq!(endpoint(None, grpc, &base), "http://c:4318/otlp/");
        let both = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:9/x"),
        ];
        assert_eq!(endpoint(None, http, &both), "http://t:9/x");
        // A flag gets the path only when it has none.
        assert_eq!(
            endpoint(Some("http://h:4318"), http, &both),
            "http://h:4318/v1/traces"
        );
        assert_eq!(
            endpoint(Some("http://h:4318/"), http, &[]),
            "http://h:4318/v1/traces"
        );
        assert_eq!(
            endpoint(Some("http://h:4318/custom"), http, &[]),
            "http://h:4318/custom"
        );
        assert_eq!(
            endpoint(Some("http://h:4317"), grpc, &both),
            "http://h:4317"
        );
        for bad in ["http://", "http://bad host:4317", "ftp://c:4317"] {
            let err = resolve(Some(bad), grpc, &[]).unwrap_err();
            assert!(err.contains("http://collector:4317"), "{bad}: {err}");
        }
        // HTTP needs a URL; only a gRPC target may lack the scheme.
        let err = resolve(Some("collector:4318"), http, &[]).unwrap_err();
        assert!(err.contains("https://collector:4317"), "{err}");
    }

    #[test]
    fn https_and_insecure_follow_the_specification() {
        let (http, grpc) = (OtlpProtocol::HttpProtobuf, OtlpProtocol::Grpc);
        let s = resolve(
            None,
            grpc,
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4317")],
        )
        .unwrap();
        assert_eq!(s.endpoint, "https://c:4317");
        assert_eq!(s.tls, Some(Box::default()));
        let s = resolve(Some("https://c:4318"), http, &[]).unwrap();
        assert_eq!(s.endpoint, "https://c:4318/v1/traces");
        assert!(s.tls.is_some());
        assert_eq!(resolve(None, grpc, &[]).unwrap().tls, None);

        // Without a scheme, a gRPC target is TLS unless INSECURE is true.
        let bare = ("OTEL_EXPORTER_OTLP_ENDPOINT", "c:4317");
        let s = resolve(None, grpc, &[bare]).unwrap();
        assert_eq!(s.endpoint, "https://c:4317");
        assert!(s.tls.is_some());
        for (insecure, endpoint) in [("TRUE", "http://c:4317"), ("false", "https://c:4317")] {
            let vars = [bare, ("OTEL_EXPORTER_OTLP_INSECURE", insecure)];
            assert_eq!(resolve(None, grpc, &vars).unwrap().endpoint, endpoint);
        }
        // The signal's variable first; a scheme outranks INSECURE.
        let vars = [
            bare,
            ("OTEL_EXPORTER_OTLP_INSECURE", "false"),
            ("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "true"),
        ];
        assert_eq!(
            resolve(None, grpc, &vars).unwrap().endpoint,
            "http://c:4317"
        );
        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4317"),
            ("OTEL_EXPORTER_OTLP_INSECURE", "true"),
        ];
        assert!(resolve(None, grpc, &vars).unwrap().tls.is_some());
        let err = resolve(None, grpc, &[bare, ("OTEL_EXPORTER_OTLP_INSECURE", "yes")]).unwrap_err();
        assert!(
            err.starts_with("OTEL_EXPORTER_OTLP_INSECURE=\"yes\""),
            "{err}"
        );
        // Flag over environment over file.
        let mut sources = TlsSources::default();
        sources.file.insecure = Some(true);
        let s = resolve_tls(Some("c:4317"), grpc, &sources, &[]).unwrap();
        assert_eq!(s.endpoint, "http://c:4317");
        let vars = [("OTEL_EXPORTER_OTLP_INSECURE", "false")];
        let s = resolve_tls(Some("c:4317"), grpc, &sources, &vars).unwrap();
        assert_eq!(s.endpoint, "https://c:4317");
        sources.flags.insecure = Some(true);
        let s = resolve_tls(Some("c:4317"), grpc, &sources, &vars).unwrap();
        assert_eq!(s.endpoint, "http://c:4317");
    }

    #[test]
    fn tls_files_come_from_flags_then_environment_then_file() {
        let grpc = OtlpProtocol::Grpc;
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4317");
        let mut sources = TlsSources::default();
        sources.file.ca_file = Some("/file/ca.pem".into());
        sources.file.cert_file = Some("/file/client.pem".into());
        sources.file.key_file = Some("/file/client.key".into());
        let files = |sources: &TlsSources, vars: &[(&str, &str)]| {
            let mut all = vec![endpoint];
            all.extend_from_slice(vars);
            resolve_tls(None, grpc, sources, &all).unwrap().tls.unwrap()
        };
        let f = files(&sources, &[]);
        assert_eq!(
            f.ca.as_ref().unwrap().to_string(),
            "export.tls.ca_file=/file/ca.pem"
        );
        let (cert, key) = f.client.unwrap();
        assert_eq!(cert.to_string(), "export.tls.cert_file=/file/client.pem");
        assert_eq!(key.to_string(), "export.tls.key_file=/file/client.key");

        let vars = [
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/env/ca.pem"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                "/env/traces-ca.pem",
            ),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/env/client.key"),
        ];
        let f = files(&sources, &vars);
        assert_eq!(
            f.ca.as_ref().unwrap().to_string(),
            "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE=/env/traces-ca.pem"
        );
        let (cert, key) = f.client.unwrap();
        assert_eq!(cert.setting, "export.tls.cert_file");
        assert_eq!(
            key.to_string(),
            "OTEL_EXPORTER_OTLP_CLIENT_KEY=/env/client.key"
        );

        sources.flags.ca_file = Some("/flag/ca.pem".into());
        let f = files(&sources, &vars);
        assert_eq!(f.ca.unwrap().to_string(), "--otlp-certificate=/flag/ca.pem");

        // Half a client identity is an error.
        let err = resolve(
            None,
            grpc,
            &[
                endpoint,
                ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/c.pem"),
            ],
        )
        .unwrap_err();
        assert!(
            err.starts_with("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE=/c.pem")
                && err.contains("CLIENT_KEY"),
            "{err}"
        );
        // A plaintext endpoint does not use them.
        let s = resolve(
            None,
            grpc,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/env/ca.pem"),
            ],
        )
        .unwrap();
        assert_eq!(s.tls, None);
    }

    #[test]
    fn refusals_say_what_the_server_said() {
        let nginx = "<html>\r\n<head><title>400 No required SSL certificate was sent</title></head>\r\n\
                     <body>\r\n<center><h1>400 Bad Request</h1></center>\r\n</body></html>";
        assert_eq!(
            body_text(nginx.as_bytes()),
            "400 No required SSL certificate was sent"
        );
        assert_eq!(body_text(b"  <p>quota\n exceeded</p>\n"), "quota exceeded");
        assert_eq!(body_text("é".repeat(150).as_bytes()).len(), 200);
        let refusal = |status: u16, text: &str, grpc| HttpRefusal {
            status: StatusCode::from_u16(status).unwrap(),
            text: text.into(),
            grpc,
        };
        let r = refusal(400, "400 No required SSL certificate was sent", true);
        assert!(r.about_certificate());
        assert_eq!(
            r.to_string(),
            "HTTP 400 Bad Request instead of a gRPC answer: 400 No required SSL certificate was sent"
        );
        assert!(!refusal(401, "missing token", false).about_certificate());
        assert_eq!(
            refusal(503, "", false).to_string(),
            "HTTP 503 Service Unavailable"
        );

        // With TLS, a refusal about the client certificate is a TLS failure.
        let settings = |endpoint| {
            resolve(
                None,
                OtlpProtocol::Grpc,
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)],
            )
            .unwrap()
        };
        let tls = failure(&r, &settings("https://c:4317")).unwrap();
        assert!(
            tls.downcast_ref::<crate::export::tls::TlsFailure>()
                .is_some(),
            "{tls}"
        );
        assert!(
            tls.to_string().contains("OTEL_EXPORTER_OTLP_CLIENT_KEY"),
            "{tls}"
        );
        let plain = failure(&r, &settings("http://c:4317")).unwrap();
        assert!(
            plain
                .downcast_ref::<crate::export::tls::TlsFailure>()
                .is_none()
        );
        assert_eq!(plain.to_string(), r.to_string());
    }

    #[test]
    fn headers_are_decoded_and_the_signal_variable_wins() {
        let s = resolve(
            None,
            OtlpProtocol::Grpc,
            &[
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "Authorization=Bearer%20abc%3D%3D , x-scope=general,",
                ),
                ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-scope=traces"),
            ],
        )
        .unwrap();
        assert_eq!(s.headers.len(), 2);
        assert_eq!(s.headers["authorization"], "Bearer abc==");
        assert!(s.headers["authorization"].is_sensitive());
        assert_eq!(s.headers["x-scope"], "traces");
        // Credentials never reach logs through Debug.
        assert!(!format!("{s:?}").contains("abc"), "{s:?}");

        for bad in ["novalue", "bad key=1", "k=line%0Abreak"] {
            let err = resolve(
                None,
                OtlpProtocol::Grpc,
                &[("OTEL_EXPORTER_OTLP_HEADERS", bad)],
            )
            .unwrap_err();
            assert!(
                err.starts_with("OTEL_EXPORTER_OTLP_HEADERS: "),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn compression_and_timeout_are_checked() {
        let grpc = OtlpProtocol::Grpc;
        let s = resolve(None, grpc, &[]).unwrap();
        assert!(!s.gzip);
        assert_eq!(s.timeout, Duration::from_secs(10));
        let s = resolve(
            None,
            grpc,
            &[
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
                ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "GZIP"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ],
        )
        .unwrap();
        assert!(s.gzip);
        assert_eq!(s.timeout, Duration::from_millis(2500));
        let err = resolve(
            None,
            grpc,
            &[("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "zstd")],
        )
        .unwrap_err();
        assert!(
            err.contains("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION"),
            "{err}"
        );
        let err = resolve(None, grpc, &[("OTEL_EXPORTER_OTLP_TIMEOUT", "10s")]).unwrap_err();
        assert!(err.contains("OTEL_EXPORTER_OTLP_TIMEOUT"), "{err}");
    }
}
