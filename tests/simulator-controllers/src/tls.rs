//! TLS material for the simulated CDI upload proxy: PEM certificate chain and key, either given by the
//! caller (the simulator's own CA material) or self-signed here.

use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A PEM certificate chain (leaf first) and its PEM private key.
#[derive(Clone)]
pub struct TlsMaterial {
    /// The certificate chain, leaf first, PEM.
    pub certificate_chain_pem: String,
    /// The private key (PKCS#8, PKCS#1 or SEC1), PEM.
    pub private_key_pem: String,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TlsMaterial")
            .field("certificate_chain_pem", &self.certificate_chain_pem)
            .field("private_key_pem", &"<redacted>")
            .finish()
    }
}

/// Why TLS material could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen failed to make a self-signed certificate.
    #[error(
        "cannot generate a self-signed certificate for the upload proxy: {0}; this is a bug in the simulator"
    )]
    Generate(#[from] rcgen::Error),
    /// The PEM text does not parse.
    #[error(
        "cannot parse the upload proxy's {what} pem: {reason}; pass a PEM certificate chain and private key"
    )]
    Pem {
        /// `certificate chain` or `private key`.
        what: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// rustls refused the certificate/key pair.
    #[error("the upload proxy's certificate and key are unusable: {0}; check they belong together")]
    Rustls(#[from] rustls::Error),
}

impl TlsMaterial {
    /// A self-signed certificate for `names` (DNS names or IP addresses, e.g. `localhost`,
    /// `127.0.0.1`); clients trust it by adding [`certificate_chain_pem`](Self::certificate_chain_pem)
    /// as a root.
    pub fn self_signed(names: &[&str]) -> Result<Self, TlsError> {
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let certified = rcgen::generate_simple_self_signed(names)?;
        Ok(Self {
            certificate_chain_pem: certified.cert.pem(),
            private_key_pem: certified.signing_key.serialize_pem(),
        })
    }

    /// A rustls server configuration serving this material (HTTP/1.1 only, which is what CDI's
    /// upload clients speak).
    pub(crate) fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let chain = CertificateDer::pem_slice_iter(self.certificate_chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| TlsError::Pem {
                what: "certificate chain",
                reason: error.to_string(),
            })?;
        let key = PrivateKeyDer::from_pem_slice(self.private_key_pem.as_bytes()).map_err(|error| {
            TlsError::Pem {
                what: "private key",
                reason: error.to_string(),
            }
        })?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}
