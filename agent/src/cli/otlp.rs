//! The OTLP exporter's TLS flags; each overrides its OTEL_EXPORTER_OTLP_*
//! variable, which overrides the config file's `export.tls`.

use std::path::PathBuf;

use clap::Args;

use crate::{config::OtlpTlsConfig, export::TlsSources};

#[derive(Args, Debug, Clone, Default)]
pub struct OtlpTlsArgs {
    /// PEM CA certificates an https:// collector's certificate must chain
    /// to, instead of the host's (overrides OTEL_EXPORTER_OTLP_[TRACES_]CERTIFICATE).
    #[arg(long, value_name = "FILE")]
    otlp_certificate: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (overrides …CLIENT_CERTIFICATE).
    #[arg(long, value_name = "FILE")]
    otlp_client_certificate: Option<PathBuf>,
    /// PEM private key of the client certificate (overrides …CLIENT_KEY).
    #[arg(long, value_name = "FILE")]
    otlp_client_key: Option<PathBuf>,
    /// Plaintext to a gRPC endpoint given without a scheme (overrides
    /// …INSECURE) [default: false].
    #[arg(long, value_name = "BOOL")]
    otlp_insecure: Option<bool>,
}

impl OtlpTlsArgs {
    /// These flags over the environment over the file's `export.tls`.
    pub fn over(&self, file: &OtlpTlsConfig) -> TlsSources {
        TlsSources {
            flags: OtlpTlsConfig {
                ca_file: self.otlp_certificate.clone(),
                cert_file: self.otlp_client_certificate.clone(),
                key_file: self.otlp_client_key.clone(),
                insecure: self.otlp_insecure,
            },
            file: file.clone(),
        }
    }
}
