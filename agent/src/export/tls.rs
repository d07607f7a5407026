//! TLS to https:// collectors: rustls on the ring provider, one client
//! configuration for both transports. Trust is the CA file the settings
//! name (OTEL_EXPORTER_OTLP_CERTIFICATE …) or else the host's CA bundle; a
//! client certificate and key make it mutual TLS. Files are read once, at
//! start-up, where a bad one is a configuration error; handshake failures
//! at run time are told apart so the log says what to check.

use std::{error::Error as StdError, fmt, path::PathBuf, sync::Arc};

use rustls::{
    AlertDescription, ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};

use crate::config::ConfigError;

/// A PEM file and the setting that named it (variable, flag or file key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemFile {
    pub setting: String,
    pub path: PathBuf,
}

impl fmt::Display for PemFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.setting, self.path.display())
    }
}

/// The TLS side of an https:// endpoint as configured: paths, not contents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificates the collector's must chain to, instead of the host's.
    pub ca: Option<PemFile>,
    /// Client certificate (chain) and its key, for mutual TLS.
    pub client: Option<(PemFile, PemFile)>,
}

impl TlsFiles {
    /// What the collector's certificate must chain to, for messages.
    pub fn trust(&self) -> String {
        match &self.ca {
            Some(ca) => format!("the CA certificates of {ca}"),
            None => "the host's CA certificates".into(),
        }
    }

    pub fn describe(&self) -> String {
        let mut out = format!("TLS trusting {}", self.trust());
        if let Some((cert, _)) = &self.client {
            out.push_str(&format!(", client certificate {}", cert.path.display()));
        }
        out
    }
}

/// The client certificate, parsed, and its PEM text for tonic.
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

/// The loaded TLS client side.
pub struct ClientTls {
    roots: Arc<RootCertStore>,
    identity: Option<Identity>,
}

impl ClientTls {
    /// Reads and checks the files (or the host's CA bundle). Every failure
    /// names the setting and path at fault.
    pub fn load(files: &TlsFiles) -> Result<Self, ConfigError> {
        let roots = match &files.ca {
            Some(ca) => ca_roots(ca)?,
            None => host_roots()?,
        };
        let identity = match &files.client {
            Some((cert, key)) => Some(identity(cert, key)?),
            None => None,
        };
        let tls = Self {
            roots: Arc::new(roots),
            identity,
        };
        // Built once here: a key that does not belong to the certificate
        // is refused now, not at the first export.
        if let Err(e) = tls.rustls_config(Vec::new()) {
            return Err(ConfigError::new(match &files.client {
                Some((cert, key)) => {
                    format!("{key} does not fit the client certificate {cert}: {e}")
                }
                None => format!("the TLS client configuration: {e}"),
            }));
        }
        Ok(tls)
    }

    /// For reqwest (HTTP/protobuf): `alpn` as the transport speaks it.
    pub fn rustls_config(&self, alpn: Vec<Vec<u8>>) -> Result<ClientConfig, rustls::Error> {
        let builder = ClientConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(Arc::clone(&self.roots));
        let mut config = match &self.identity {
            Some(id) => builder.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn;
        Ok(config)
    }

    /// For tonic (gRPC): the same roots and client certificate.
    pub fn tonic_config(&self) -> tonic::transport::ClientTlsConfig {
        let config =
            tonic::transport::ClientTlsConfig::new().trust_anchors(self.roots.roots.clone());
        match &self.identity {
            Some(id) => config.identity(tonic::transport::Identity::from_pem(
                &id.cert_pem,
                &id.key_pem,
            )),
            None => config,
        }
    }
}

/// reqwest's rustls backend has no provider of its own (no aws-lc): a
/// plaintext http:// client still gets a configuration, one that trusts
/// nothing, as it never makes a TLS connection.
pub fn plaintext_config() -> ClientConfig {
    ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .expect("ring offers the default protocol versions")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth()
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(file: &PemFile) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(&file.path).map_err(|e| ConfigError::new(format!("{file}: {e}")))
}

fn certificates(file: &PemFile, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::new(format!("{file}: not a PEM file: {e}")))?;
    if certs.is_empty() {
        return Err(ConfigError::new(format!(
            "{file}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it"
        )));
    }
    Ok(certs)
}

fn ca_roots(ca: &PemFile) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in certificates(ca, &read(ca)?)?.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| ConfigError::new(format!("{ca}: certificate {}: {e}", i + 1)))?;
    }
    Ok(roots)
}

/// The host's CA bundle, where OpenSSL would look (SSL_CERT_FILE,
/// SSL_CERT_DIR, /etc/ssl/certs …). None at all is an error: no https://
/// collector could ever be trusted.
fn host_roots() -> Result<RootCertStore, ConfigError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .iter()
            .map(|e| format!("; {e}"))
            .collect::<String>();
        return Err(ConfigError::new(format!(
            "no CA certificates on this host to verify the collector with (SSL_CERT_FILE, \
             SSL_CERT_DIR, /etc/ssl/certs){why}: set OTEL_EXPORTER_OTLP_CERTIFICATE to the \
             collector's CA file, or mount the host's CA bundle"
        )));
    }
    log::debug!("OTLP TLS: {added} CA certificates from the host");
    Ok(roots)
}

fn identity(cert: &PemFile, key: &PemFile) -> Result<Identity, ConfigError> {
    let cert_pem = read(cert)?;
    let chain = certificates(cert, &cert_pem)?;
    let key_pem = read(key)?;
    let parsed = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        ConfigError::new(format!(
            "{key}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it: {e}"
        ))
    })?;
    Ok(Identity {
        chain,
        key: parsed,
        cert_pem,
        key_pem,
    })
}

/// An export that failed in the TLS handshake: a setting to fix, not a
/// collector that is down, so it is logged as an error.
#[derive(Debug)]
pub struct TlsFailure(String);

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for TlsFailure {}

/// The rustls error somewhere in `err`'s chain, said in terms of `files`;
/// `None` when the failure is not about TLS.
pub fn explain(err: &(dyn StdError + 'static), files: &TlsFiles) -> Option<TlsFailure> {
    let tls = find::<rustls::Error>(err)?;
    Some(match tls {
        rustls::Error::InvalidCertificate(_) => TlsFailure(format!(
            "TLS: the collector's certificate is not trusted ({tls}); it must chain to {}",
            files.trust()
        )),
        rustls::Error::AlertReceived(alert) if refuses_client(*alert) => {
            client_refused(files, &tls.to_string())
        }
        rustls::Error::InvalidMessage(_) => TlsFailure(format!(
            "TLS: {tls}: is the collector serving TLS on this port?"
        )),
        other => TlsFailure(format!("TLS: {other}")),
    })
}

/// The collector (or a TLS terminator before it: nginx answers HTTP 400)
/// refused the client certificate, or its absence; `why` is what it said.
pub fn client_refused(files: &TlsFiles, why: &str) -> TlsFailure {
    TlsFailure(match &files.client {
        Some((cert, _)) => {
            format!("TLS: the collector refused the client certificate {cert} ({why})")
        }
        None => format!(
            "TLS: the collector refused the connection ({why}); it may want a client \
             certificate: set OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and \
             OTEL_EXPORTER_OTLP_CLIENT_KEY"
        ),
    })
}

/// Alerts a server sends about the client's certificate, or its absence.
fn refuses_client(alert: AlertDescription) -> bool {
    matches!(
        alert,
        AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
            | AlertDescription::HandshakeFailure
    )
}

/// The first `T` in the source chain. An io::Error's source() skips the
/// error it wraps (where tokio-rustls puts the rustls one), so look inside.
pub fn find<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        next = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => e.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem(setting: &str, path: impl Into<PathBuf>) -> PemFile {
        PemFile {
            setting: setting.into(),
            path: path.into(),
        }
    }

    #[test]
    fn bad_files_name_the_setting_and_the_path() {
        let dir = std::env::temp_dir().join(format!("zerotrace-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let garbage = dir.join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let broken = dir.join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let missing = dir.join("missing.pem");
        let load = |ca: &PathBuf| {
            ClientTls::load(&TlsFiles {
                ca: Some(pem("OTEL_EXPORTER_OTLP_CERTIFICATE", ca)),
                client: None,
            })
            .err()
            .expect("a bad CA file is refused")
            .0
        };
        for (path, says) in [
            (&missing, "No such file"),
            (&garbage, "no PEM certificate"),
            (&broken, "certificate 1"),
        ] {
            let err = load(path);
            assert!(
                err.starts_with(&format!(
                    "OTEL_EXPORTER_OTLP_CERTIFICATE={}",
                    path.display()
                )) && err.contains(says),
                "{err}"
            );
        }
        let err = identity(
            &pem("--otlp-client-certificate", &garbage),
            &pem("--otlp-client-key", &missing),
        )
        .err()
        .unwrap()
        .0;
        assert!(err.starts_with("--otlp-client-certificate="), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn handshake_errors_are_found_inside_io_errors() {
        let files = TlsFiles {
            ca: Some(pem("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/ca.pem")),
            client: None,
        };
        let untrusted = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, untrusted);
        let wrapped = anyhow::Error::new(io).context("error trying to connect");
        let e = explain(wrapped.as_ref(), &files).unwrap().to_string();
        assert!(
            e.contains("not trusted") && e.contains("OTEL_EXPORTER_OTLP_CERTIFICATE=/etc/ca.pem"),
            "{e}"
        );

        let refused = rustls::Error::AlertReceived(AlertDescription::CertificateRequired);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, refused);
        let e = explain(&io, &files).unwrap().to_string();
        assert!(e.contains("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"), "{e}");

        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(explain(&plain, &files).is_none());
    }
}
