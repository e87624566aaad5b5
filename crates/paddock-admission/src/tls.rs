//! The webhook server's own CA and serving certificate: issued, stored, rotated and hot-swapped.
//!
//! Why not cert-manager: the API server must trust the server through the webhook configurations'
//! `caBundle`, so whoever issues the certificate must also keep that bundle current. cert-manager
//! does this only with its CA injector, two more components in every air-gapped package, and the
//! serving Secret it writes reaches the pod through a kubelet volume refresh (up to a minute or more)
//! that the server must notice. Issuing in the operator needs nothing installed, rotates on a
//! schedule paddock controls (tested with validities of seconds), and swaps the certificate in memory
//! the moment it changes.
//!
//! Contract:
//! - The material lives in one Secret (`kubernetes.io/tls`, default `paddock-webhook-tls`): `ca.crt`
//!   and `ca.key` (the signing CA), `ca-previous.crt` (the CA it replaced, still trusted), `tls.crt`
//!   and `tls.key` (the serving certificate). Every replica reads it; whoever finds it missing or due
//!   creates or rotates it with an optimistic-concurrency write (resourceVersion), so replicas never
//!   fight: a loser re-reads the winner's material.
//! - The serving certificate is renewed when less than a third of its validity is left. The CA is
//!   renewed when less than a third of its validity is left, with an overlap: the new CA, the old one
//!   (as `ca-previous.crt`) and a serving certificate signed by the new CA are stored in one
//!   conditional write, so when several replicas find the CA due at once exactly one new CA wins and
//!   every replica adopts it. A replica that reads a CA it does not serve yet first publishes the new
//!   bundle (both CAs), keeps serving its old certificate for [`TlsOptions::ca_propagation_delay`],
//!   then switches ([`CertificateSwitch`]). The old CA stays in the bundle until the next CA rotation,
//!   so a certificate signed by either is trusted at every moment, and every replica publishes the
//!   same bundle (the Secret's), so replicas never take back each other's CA.
//! - [`CertificateSwitch`] is the rustls certificate resolver: a new handshake gets the newest
//!   certificate, established connections keep theirs, nothing is dropped.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

/// The Secret key of the signing CA's certificate.
pub const CA_CERTIFICATE_KEY: &str = "ca.crt";
/// The Secret key of the signing CA's private key.
pub const CA_PRIVATE_KEY_KEY: &str = "ca.key";
/// The Secret key of the CA the current one replaced.
pub const PREVIOUS_CA_CERTIFICATE_KEY: &str = "ca-previous.crt";
/// The Secret key of the serving certificate.
pub const SERVING_CERTIFICATE_KEY: &str = "tls.crt";
/// The Secret key of the serving certificate's private key.
pub const SERVING_PRIVATE_KEY_KEY: &str = "tls.key";

/// Certificates start this long before they are issued, so replicas and API servers whose clocks lag
/// a little still accept them.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(300);

/// Errors from issuing, loading or storing the certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen failed to generate a key or certificate.
    #[error("cannot generate the webhook certificate: {0}; this is a bug in paddock-admission")]
    Generate(#[from] rcgen::Error),
    /// A stored certificate or key did not parse.
    #[error(
        "cannot read the {what} from the TLS Secret: {reason}; delete the Secret to have it issued again"
    )]
    Parse {
        /// What was parsed.
        what: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// rustls refused the key.
    #[error("cannot use the serving certificate: {0}")]
    Rustls(#[from] rustls::Error),
    /// The Secret could not be read or written.
    #[error(
        "cannot {action} the TLS Secret {namespace}/{name}: {source}; check that the operator may get, create and update it"
    )]
    Secret {
        /// What was attempted.
        action: &'static str,
        /// The Secret's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
        /// The API error.
        source: Box<kube::Error>,
    },
    /// Other replicas kept winning the race to write the Secret.
    #[error("the TLS Secret {namespace}/{name} kept changing while it was being written; try again")]
    Contention {
        /// The Secret's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
    },
}

/// Where the material is kept and how long it lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsOptions {
    /// The namespace of the TLS Secret (the operator's).
    pub secret_namespace: String,
    /// The TLS Secret's name; default `paddock-webhook-tls`.
    pub secret_name: String,
    /// How long a CA is valid; default 365 days.
    pub ca_validity: Duration,
    /// How long a serving certificate is valid; default 30 days.
    pub serving_validity: Duration,
    /// How often the Secret is checked for rotation or changes by other replicas; default one minute.
    pub check_interval: Duration,
    /// How long a new CA sits in `caBundle` before a certificate signed by it is served (by each
    /// replica, from the moment it published the bundle): the time the API servers take to see the
    /// updated webhook configuration; default 10 seconds.
    pub ca_propagation_delay: Duration,
}

impl TlsOptions {
    /// Production defaults, the Secret in `namespace`.
    pub fn new(namespace: &str) -> TlsOptions {
        TlsOptions {
            secret_namespace: namespace.to_owned(),
            secret_name: "paddock-webhook-tls".to_owned(),
            ca_validity: Duration::from_secs(365 * 24 * 3600),
            serving_validity: Duration::from_secs(30 * 24 * 3600),
            check_interval: Duration::from_secs(60),
            ca_propagation_delay: Duration::from_secs(10),
        }
    }
}

/// The CA and serving certificate, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    /// The signing CA's certificate.
    pub ca_certificate: String,
    ca_private_key: String,
    /// The CA this one replaced, still trusted until the next CA rotation.
    pub previous_ca_certificate: Option<String>,
    /// The serving certificate.
    pub serving_certificate: String,
    serving_private_key: String,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Material")
            .field("ca_certificate", &self.ca_certificate)
            .field("previous_ca_certificate", &self.previous_ca_certificate)
            .field("serving_certificate", &self.serving_certificate)
            .finish_non_exhaustive()
    }
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn to_offset(time: SystemTime) -> time::OffsetDateTime {
    let seconds = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |duration| duration.as_secs());
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(seconds).unwrap_or(i64::MAX))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// The end of a PEM certificate's validity.
pub fn not_after(pem: &str) -> Result<SystemTime, TlsError> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|error| TlsError::Parse {
        what: "certificate",
        reason: error.to_string(),
    })?;
    let certificate = parsed.parse_x509().map_err(|error| TlsError::Parse {
        what: "certificate",
        reason: error.to_string(),
    })?;
    let seconds = certificate.validity().not_after.timestamp();
    Ok(UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or(0)))
}

/// The DNS names and IP addresses a PEM certificate is valid for.
fn subject_names(pem: &str) -> Result<Vec<String>, TlsError> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|error| TlsError::Parse {
        what: "certificate",
        reason: error.to_string(),
    })?;
    let certificate = parsed.parse_x509().map_err(|error| TlsError::Parse {
        what: "certificate",
        reason: error.to_string(),
    })?;
    let mut names = Vec::new();
    if let Ok(Some(extension)) = certificate.subject_alternative_name() {
        for name in &extension.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => names.push((*dns).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                    if let Ok(octets) = <[u8; 4]>::try_from(*bytes) {
                        names.push(std::net::IpAddr::from(octets).to_string());
                    } else if let Ok(octets) = <[u8; 16]>::try_from(*bytes) {
                        names.push(std::net::IpAddr::from(octets).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    Ok(names)
}

fn remaining(pem: &str) -> Result<Duration, TlsError> {
    Ok(not_after(pem)?.duration_since(now()).unwrap_or(Duration::ZERO))
}

/// A new self-signed CA valid for `validity`: (certificate PEM, key PEM).
fn issue_ca(validity: Duration) -> Result<(String, String), TlsError> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    let issued = now();
    let serial = issued
        .duration_since(UNIX_EPOCH)
        .map_or(0, |duration| duration.as_nanos());
    // A distinct subject per CA keeps the old and the new CA apart while both are in the bundle.
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("paddock-admission-ca-{serial}"),
    );
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = to_offset(issued - CLOCK_SKEW_ALLOWANCE);
    params.not_after = to_offset(issued + validity);
    let certificate = params.self_signed(&key)?;
    Ok((certificate.pem(), key.serialize_pem()))
}

/// A serving certificate for `names` signed by the CA, valid for `validity` but never past the CA.
fn issue_serving(
    ca_certificate: &str,
    ca_private_key: &str,
    names: &[String],
    validity: Duration,
) -> Result<(String, String), TlsError> {
    let ca_key = rcgen::KeyPair::from_pem(ca_private_key)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(ca_certificate, ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        names.first().map_or("paddock-admission", String::as_str),
    );
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    let issued = now();
    params.not_before = to_offset(issued - CLOCK_SKEW_ALLOWANCE);
    params.not_after = to_offset((issued + validity).min(not_after(ca_certificate)?));
    let certificate = params.signed_by(&key, &issuer)?;
    Ok((certificate.pem(), key.serialize_pem()))
}

impl Material {
    /// A fresh CA and a serving certificate for `names`.
    pub fn generate(options: &TlsOptions, names: &[String]) -> Result<Material, TlsError> {
        let (ca_certificate, ca_private_key) = issue_ca(options.ca_validity)?;
        let (serving_certificate, serving_private_key) =
            issue_serving(&ca_certificate, &ca_private_key, names, options.serving_validity)?;
        Ok(Material {
            ca_certificate,
            ca_private_key,
            previous_ca_certificate: None,
            serving_certificate,
            serving_private_key,
        })
    }

    /// The PEM bundle the API server must trust: the signing CA and the one it replaced.
    pub fn ca_bundle(&self) -> String {
        let mut bundle = self.ca_certificate.clone();
        if let Some(previous) = &self.previous_ca_certificate {
            if !bundle.ends_with('\n') {
                bundle.push('\n');
            }
            bundle.push_str(previous);
        }
        bundle
    }

    /// The serving certificate and key as rustls wants them.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        let chain = CertificateDer::pem_slice_iter(self.serving_certificate.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| TlsError::Parse {
                what: "serving certificate",
                reason: error.to_string(),
            })?;
        let key = PrivateKeyDer::from_pem_slice(self.serving_private_key.as_bytes()).map_err(|error| {
            TlsError::Parse {
                what: "serving key",
                reason: error.to_string(),
            }
        })?;
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        Ok(Arc::new(CertifiedKey::from_der(chain, key, &provider)?))
    }

    fn from_secret(secret: &Secret) -> Result<Material, TlsError> {
        let data = secret.data.as_ref();
        let text = |key: &'static str| -> Result<String, TlsError> {
            let bytes = data.and_then(|data| data.get(key)).ok_or(TlsError::Parse {
                what: key,
                reason: "the key is missing".to_owned(),
            })?;
            String::from_utf8(bytes.0.clone()).map_err(|error| TlsError::Parse {
                what: key,
                reason: error.to_string(),
            })
        };
        let material = Material {
            ca_certificate: text(CA_CERTIFICATE_KEY)?,
            ca_private_key: text(CA_PRIVATE_KEY_KEY)?,
            previous_ca_certificate: text(PREVIOUS_CA_CERTIFICATE_KEY)
                .ok()
                .filter(|pem| !pem.is_empty()),
            serving_certificate: text(SERVING_CERTIFICATE_KEY)?,
            serving_private_key: text(SERVING_PRIVATE_KEY_KEY)?,
        };
        // Everything must parse now, not at the next handshake.
        not_after(&material.ca_certificate)?;
        material.certified_key()?;
        Ok(material)
    }

    fn to_secret(&self, options: &TlsOptions, resource_version: Option<String>) -> Secret {
        let mut data = std::collections::BTreeMap::new();
        for (key, value) in [
            (CA_CERTIFICATE_KEY, Some(&self.ca_certificate)),
            (CA_PRIVATE_KEY_KEY, Some(&self.ca_private_key)),
            (PREVIOUS_CA_CERTIFICATE_KEY, self.previous_ca_certificate.as_ref()),
            (SERVING_CERTIFICATE_KEY, Some(&self.serving_certificate)),
            (SERVING_PRIVATE_KEY_KEY, Some(&self.serving_private_key)),
        ] {
            if let Some(value) = value {
                data.insert(key.to_owned(), ByteString(value.as_bytes().to_vec()));
            }
        }
        Secret {
            metadata: ObjectMeta {
                name: Some(options.secret_name.clone()),
                namespace: Some(options.secret_namespace.clone()),
                resource_version,
                labels: Some(
                    [(
                        paddock_api::builders::MANAGED_BY_LABEL.to_owned(),
                        paddock_api::builders::MANAGER.to_owned(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".to_owned()),
            data: Some(data),
            ..Secret::default()
        }
    }

    /// Whether the serving certificate must be renewed: a third of its validity left, or names that
    /// differ from `names`.
    fn serving_due(&self, options: &TlsOptions, names: &[String]) -> Result<bool, TlsError> {
        let mut wanted = names.to_vec();
        wanted.sort();
        let mut actual = subject_names(&self.serving_certificate)?;
        actual.sort();
        Ok(remaining(&self.serving_certificate)? < options.serving_validity / 3 || wanted != actual)
    }

    fn ca_due(&self, options: &TlsOptions) -> Result<bool, TlsError> {
        Ok(remaining(&self.ca_certificate)? < options.ca_validity / 3)
    }
}

/// The rustls certificate resolver that can be switched to a new certificate at any time.
#[derive(Debug)]
pub struct CertificateSwitch {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertificateSwitch {
    /// A resolver serving `key`.
    pub fn new(key: Arc<CertifiedKey>) -> CertificateSwitch {
        CertificateSwitch {
            current: RwLock::new(key),
        }
    }

    /// Serves `key` from the next handshake on.
    pub fn switch(&self, key: Arc<CertifiedKey>) {
        match self.current.write() {
            Ok(mut current) => *current = key,
            // A writer that panicked left a whole Arc behind; replacing it is still correct.
            Err(poisoned) => *poisoned.into_inner() = key,
        }
    }

    fn current(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(current) => Arc::clone(&current),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }
}

impl ResolvesServerCert for CertificateSwitch {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A rustls server configuration serving whatever `switch` holds, HTTP/2 and HTTP/1.1.
pub fn server_config(switch: Arc<CertificateSwitch>) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(switch);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Reads and writes the TLS Secret.
#[derive(Clone)]
pub struct CertificateStore {
    api: Api<Secret>,
    options: TlsOptions,
    names: Vec<String>,
}

impl CertificateStore {
    /// A store for the Secret `options` names, issuing serving certificates for `names`.
    pub fn new(client: kube::Client, options: TlsOptions, names: Vec<String>) -> CertificateStore {
        CertificateStore {
            api: Api::namespaced(client, &options.secret_namespace),
            options,
            names,
        }
    }

    fn secret_error(&self, action: &'static str, source: kube::Error) -> TlsError {
        TlsError::Secret {
            action,
            namespace: self.options.secret_namespace.clone(),
            name: self.options.secret_name.clone(),
            source: Box::new(source),
        }
    }

    async fn read(&self) -> Result<Option<(Material, Option<String>)>, TlsError> {
        let secret = self
            .api
            .get_opt(&self.options.secret_name)
            .await
            .map_err(|source| self.secret_error("read", source))?;
        let Some(secret) = secret else { return Ok(None) };
        let version = secret.metadata.resource_version.clone();
        match Material::from_secret(&secret) {
            Ok(material) => Ok(Some((material, version))),
            Err(error) => {
                tracing::warn!(%error, "the TLS Secret is unusable; issuing new material");
                let material = Material::generate(&self.options, &self.names)?;
                self.write(&material, version)
                    .await
                    .map(|written| written.map(|_| (material, None)))
            }
        }
    }

    /// Writes `material`: a create without `resource_version`, a conditional replace with it.
    /// `Ok(None)` when another replica wrote first.
    async fn write(
        &self,
        material: &Material,
        resource_version: Option<String>,
    ) -> Result<Option<()>, TlsError> {
        let secret = material.to_secret(&self.options, resource_version.clone());
        let result = if resource_version.is_some() {
            self.api
                .replace(&self.options.secret_name, &PostParams::default(), &secret)
                .await
        } else {
            self.api.create(&PostParams::default(), &secret).await
        };
        match result {
            Ok(_) => Ok(Some(())),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(None),
            Err(source) => Err(self.secret_error("write", source)),
        }
    }

    /// The stored material, issued and stored first when there is none.
    pub async fn load_or_create(&self) -> Result<Material, TlsError> {
        for _ in 0..5 {
            if let Some((material, _)) = self.read().await? {
                return Ok(material);
            }
            let material = Material::generate(&self.options, &self.names)?;
            if self.write(&material, None).await?.is_some() {
                return Ok(material);
            }
        }
        Err(TlsError::Contention {
            namespace: self.options.secret_namespace.clone(),
            name: self.options.secret_name.clone(),
        })
    }

    /// Re-reads the Secret and renews what is due, storing it at once (a conditional write: when
    /// another replica wrote first, its material is returned). A rotated CA comes back with a
    /// serving certificate signed by it: the caller publishes the new bundle and waits
    /// [`TlsOptions::ca_propagation_delay`] before serving it.
    pub async fn check(&self) -> Result<Material, TlsError> {
        let Some((stored, version)) = self.read().await? else {
            return self.load_or_create().await;
        };
        if stored.ca_due(&self.options)? {
            let (ca_certificate, ca_private_key) = issue_ca(self.options.ca_validity)?;
            let (serving_certificate, serving_private_key) = issue_serving(
                &ca_certificate,
                &ca_private_key,
                &self.names,
                self.options.serving_validity,
            )?;
            let rotated = Material {
                ca_certificate,
                ca_private_key,
                previous_ca_certificate: Some(stored.ca_certificate.clone()),
                serving_certificate,
                serving_private_key,
            };
            return match self.write(&rotated, version).await? {
                Some(()) => {
                    tracing::info!("rotated the webhook CA");
                    Ok(rotated)
                }
                // Another replica rotated first: its CA is the one everybody adopts.
                None => Ok(self.read().await?.map_or(stored, |(material, _)| material)),
            };
        }
        if stored.serving_due(&self.options, &self.names)? {
            let (serving_certificate, serving_private_key) = issue_serving(
                &stored.ca_certificate,
                &stored.ca_private_key,
                &self.names,
                self.options.serving_validity,
            )?;
            let renewed = Material {
                serving_certificate,
                serving_private_key,
                ..stored.clone()
            };
            return match self.write(&renewed, version).await? {
                Some(()) => Ok(renewed),
                // Another replica renewed first; the next check reads its material.
                None => Ok(stored),
            };
        }
        Ok(stored)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn options() -> TlsOptions {
        TlsOptions {
            ca_validity: Duration::from_secs(3600),
            serving_validity: Duration::from_secs(600),
            ..TlsOptions::new("test")
        }
    }

    #[test]
    fn generated_material_round_trips_through_the_secret() {
        let names = vec!["127.0.0.1".to_owned(), "webhook.example.svc".to_owned()];
        let material = Material::generate(&options(), &names).unwrap();
        let secret = material.to_secret(&options(), None);
        assert_eq!(Material::from_secret(&secret).unwrap(), material);
        let mut actual = subject_names(&material.serving_certificate).unwrap();
        actual.sort();
        assert_eq!(actual, names);
        assert!(!material.serving_due(&options(), &names).unwrap());
        assert!(
            material
                .serving_due(&options(), &["other.example".to_owned()])
                .unwrap()
        );
        assert!(!material.ca_due(&options()).unwrap());
    }

    #[test]
    fn serving_certificates_never_outlive_their_ca() {
        let short_ca = TlsOptions {
            ca_validity: Duration::from_secs(60),
            serving_validity: Duration::from_secs(3600),
            ..options()
        };
        let material = Material::generate(&short_ca, &["localhost".to_owned()]).unwrap();
        assert!(
            not_after(&material.serving_certificate).unwrap() <= not_after(&material.ca_certificate).unwrap()
        );
    }

    #[test]
    fn the_bundle_holds_both_cas_during_the_overlap() {
        let first = Material::generate(&options(), &["localhost".to_owned()]).unwrap();
        let second = Material {
            previous_ca_certificate: Some(first.ca_certificate.clone()),
            ..Material::generate(&options(), &["localhost".to_owned()]).unwrap()
        };
        let bundle = second.ca_bundle();
        assert_eq!(CertificateDer::pem_slice_iter(bundle.as_bytes()).count(), 2);
        assert!(bundle.contains(&first.ca_certificate));
        assert!(bundle.contains(&second.ca_certificate));
    }
}
