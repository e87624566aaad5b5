//! TLS for the aggregated API server: its serving certificate, and recognising the front proxy.
//!
//! Role: kube-apiserver proxies aggregated requests over TLS, verifying the server against the
//! APIService's `caBundle` and presenting its front-proxy client certificate. This module makes the
//! serving material (a private CA plus a leaf for the Service's DNS names) and accepts connections,
//! verifying any client certificate against the front-proxy CA.
//!
//! Contract:
//! - [`ServingMaterial::generate`] makes a fresh CA and a leaf signed by it on every start and writes
//!   `ca.crt`, `tls.crt` and `tls.key` into the TLS directory (atomically, the key mode 0600); the CA
//!   is what goes into the APIService `caBundle`.
//! - [`TlsListener`] verifies a client certificate when one is presented (rustls rejects the handshake
//!   when it does not chain to the front-proxy CA) but does not require one, like a real aggregated
//!   server, which also serves unauthenticated health checks. [`Peer::front_proxy`] is true only for
//!   a verified certificate whose common name is an allowed requestheader name (any name when the
//!   list is empty, as kube-apiserver's requestheader authenticator does).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;

/// How long a client may take to finish the TLS handshake before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors from making or loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen failed.
    #[error("cannot generate the simulator's serving certificate: {0}; this is a bug in the simulator")]
    Generate(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("cannot write {path}: {source}; check that the TLS directory is writable")]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// PEM text did not parse.
    #[error("cannot parse the {what} pem: {reason}")]
    Pem {
        /// What was parsed.
        what: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("cannot configure tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built from the front-proxy CA.
    #[error("cannot verify front-proxy client certificates with the requestheader CA: {0}")]
    Verifier(String),
}

/// The serving certificate, its key and the CA that signed it, all PEM.
#[derive(Clone)]
pub struct ServingMaterial {
    /// The private CA (the APIService `caBundle`).
    pub ca_pem: String,
    /// The leaf certificate.
    pub certificate_pem: String,
    /// The leaf's private key.
    pub key_pem: String,
    /// The CA's parameters and key pair, kept to sign further leaves (the CDI upload proxy's).
    ca_params: rcgen::CertificateParams,
    ca_key_pem: String,
}

impl std::fmt::Debug for ServingMaterial {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ServingMaterial")
            .field("ca_pem", &self.ca_pem)
            .field("certificate_pem", &self.certificate_pem)
            .finish_non_exhaustive()
    }
}

impl ServingMaterial {
    /// A new CA and a leaf for `names` (DNS names or IP addresses), written into `directory`.
    pub fn generate(directory: &Path, names: &[String]) -> Result<ServingMaterial, TlsError> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "paddock-kubevirt-simulator-ca");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_certificate = ca_params.self_signed(&ca_key)?;
        let material = ServingMaterial {
            ca_pem: ca_certificate.pem(),
            certificate_pem: String::new(),
            key_pem: String::new(),
            ca_key_pem: ca_key.serialize_pem(),
            ca_params,
        };
        let (certificate_pem, key_pem) = material.issue(names)?;
        let material = ServingMaterial {
            certificate_pem,
            key_pem,
            ..material
        };
        std::fs::create_dir_all(directory).map_err(|source| TlsError::Write {
            path: directory.to_path_buf(),
            source,
        })?;
        write_atomically(&directory.join("tls.key"), &material.key_pem, 0o600)?;
        write_atomically(&directory.join("tls.crt"), &material.certificate_pem, 0o644)?;
        write_atomically(&directory.join("ca.crt"), &material.ca_pem, 0o644)?;
        Ok(material)
    }

    /// A new server leaf for `names` signed by this CA: (certificate PEM, key PEM).
    pub fn issue(&self, names: &[String]) -> Result<(String, String), TlsError> {
        let ca_key = rcgen::KeyPair::from_pem(&self.ca_key_pem)?;
        let issuer = rcgen::Issuer::new(self.ca_params.clone(), ca_key);
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(names.to_vec())?;
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().map_or("localhost", String::as_str),
        );
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyEncipherment,
        ];
        let certificate = params.signed_by(&key, &issuer)?;
        Ok((certificate.pem(), key.serialize_pem()))
    }

    /// A rustls server configuration serving this leaf, verifying client certificates (when
    /// presented) against `client_ca_pem`, speaking HTTP/1.1 (websocket upgrades need it).
    pub fn server_config(&self, client_ca_pem: &str) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(client_ca_pem.as_bytes()) {
            let certificate = certificate.map_err(|error| TlsError::Pem {
                what: "requestheader client CA",
                reason: error.to_string(),
            })?;
            roots.add(certificate)?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&provider),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|error| TlsError::Verifier(error.to_string()))?;
        let chain = CertificateDer::pem_slice_iter(self.certificate_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| TlsError::Pem {
                what: "serving certificate",
                reason: error.to_string(),
            })?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|error| TlsError::Pem {
            what: "serving key",
            reason: error.to_string(),
        })?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// Writes `contents` to `path` through a temporary file in the same directory and a rename.
fn write_atomically(path: &Path, contents: &str, mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let error = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temporary)
        .map_err(error)?;
    file.write_all(contents.as_bytes()).map_err(error)?;
    file.sync_all().map_err(error)?;
    std::fs::rename(&temporary, path).map_err(error)
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The remote address.
    pub address: SocketAddr,
    /// Whether it presented a front-proxy client certificate with an allowed name, so its
    /// `X-Remote-*` headers are to be believed.
    pub front_proxy: bool,
    /// The verified client certificate's common name, if any.
    pub common_name: Option<String>,
}

/// A TCP listener that completes the TLS handshake and classifies the peer.
pub struct TlsListener {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    allowed_names: Arc<Vec<String>>,
}

impl TlsListener {
    /// Wraps `listener`; `allowed_names` are the requestheader allowed names (empty: any).
    pub fn new(
        listener: TcpListener,
        config: rustls::ServerConfig,
        allowed_names: Vec<String>,
    ) -> TlsListener {
        TlsListener {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            allowed_names: Arc::new(allowed_names),
        }
    }

    fn classify(&self, address: SocketAddr, stream: &TlsStream<TcpStream>) -> Peer {
        let common_name = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certificates| certificates.first())
            .and_then(|certificate| common_name_of(certificate.as_ref()));
        let front_proxy = common_name.as_ref().is_some_and(|name| {
            self.allowed_names.is_empty() || self.allowed_names.iter().any(|allowed| allowed == name)
        });
        Peer {
            address,
            front_proxy,
            common_name,
        }
    }
}

/// The subject common name of a DER certificate.
fn common_name_of(der: &[u8]) -> Option<String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    certificate
        .subject()
        .iter_common_name()
        .next()
        .and_then(|attribute| attribute.as_str().ok())
        .map(str::to_string)
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, address) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let peer = self.classify(address, &tls);
                    return (tls, peer);
                }
                Ok(Err(error)) => tracing::info!(%address, %error, "tls handshake failed"),
                Err(_) => tracing::info!(%address, "tls handshake timed out"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer {
            address: self.listener.local_addr()?,
            front_proxy: false,
            common_name: None,
        })
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}
