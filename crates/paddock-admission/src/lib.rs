//! paddock's admission webhooks, served over HTTPS by every operator replica.
//!
//! Role: the in-cluster half of "Pepr-style" admission for VMs, in Rust. Five webhooks:
//! - mutating `virtualmachineapps.defaults.paddock.dev`: the VirtualMachineApp defaults the CRD schema
//!   cannot express (see [`mutate`]);
//! - mutating `datavolumes.zarf.paddock.dev` and `virtualmachines.zarf.paddock.dev`: while Zarf is
//!   installed (its `zarf-state` Secret exists), CDI `registry` sources pull through the node
//!   (`pullMethod: node`), so the Zarf agent's pod rewrite carries them to the Zarf registry;
//! - validating `virtualmachineapps.validate.paddock.dev`: [`paddock_api::validation`], the rules CEL
//!   cannot express, with messages that say what to change;
//! - validating `host-volumes.paddock.dev`: an opt-in policy denying host-level volumes on KubeVirt VMs.
//!
//! Contract:
//! - [`webhook_configurations`] is a pure function of the options: the configurations filter at the
//!   API server (rules, namespaceSelector, objectSelector), have `sideEffects: None`,
//!   `admissionReviewVersions: ["v1"]` and the configured failure policy and timeout.
//! - [`serve`] issues (or loads) the CA and serving certificate kept in a Secret and, by
//!   [`AdmissionOptions::configurations`], either applies the whole webhook configurations with the
//!   CA bundle ([`ConfigurationMode::Managed`]) or only keeps the `caBundle` of configurations someone
//!   else owns current ([`ConfigurationMode::InjectCa`], the Helm chart's mode); serves until
//!   `shutdown` resolves, rotates certificates before they expire and swaps them into the live
//!   server without dropping connections (see [`tls`]).
//! - Whatever a client sends, a request gets an answer (an AdmissionReview, or a 4xx/5xx status) within
//!   [`AdmissionOptions::request_timeout`]; no input makes the server panic.

pub mod configuration;
pub mod metrics;
pub mod mutate;
pub mod review;
mod server;
pub mod tls;
pub mod validate;
pub mod zarf;

use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub use configuration::{ConfigurationOptions, WebhookEndpoint, webhook_configurations};
pub use metrics::AdmissionMetrics;
pub use server::{HttpOptions, serve, serve_standalone};
pub use tls::TlsOptions;
pub use zarf::ZarfOptions;

/// The namespace label that opts a namespace into the host-volume policy (value [`DENY`]).
pub const HOST_VOLUMES_LABEL: &str = "paddock.dev/host-volumes";
/// The value of [`HOST_VOLUMES_LABEL`] that turns the policy on.
pub const DENY: &str = "deny";

/// What the API server does when a webhook cannot be reached or answers with an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Reject the request: nothing is admitted unchecked (the default).
    #[default]
    Fail,
    /// Admit the request without the webhook.
    Ignore,
}

impl FailurePolicy {
    /// The wire value (`Fail` or `Ignore`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Fail => "Fail",
            Self::Ignore => "Ignore",
        }
    }
}

/// Where the host-volume policy applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum HostVolumePolicy {
    /// Only in namespaces labelled `paddock.dev/host-volumes: deny` (the default).
    #[default]
    LabelledNamespaces,
    /// In every namespace the base namespace selector admits.
    AllNamespaces,
    /// Nowhere: the webhook is not registered.
    Off,
}

/// Who owns the two webhook configurations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ConfigurationMode {
    /// [`serve`] creates and owns them (server-side apply of the whole objects, CA bundle included);
    /// nothing deletes them when the server goes away. For runs outside Helm (development, tests).
    #[default]
    Managed,
    /// Something else (the Helm chart) creates, owns and deletes them; [`serve`] only keeps
    /// `clientConfig.caBundle` of every webhook in the two configurations named
    /// [`AdmissionOptions::configuration_name`] current, re-injecting it after a rotation and
    /// whenever someone resets it, and never creates a configuration (the cert-manager cainjector
    /// pattern).
    InjectCa,
}

/// Everything [`serve`] and [`webhook_configurations`] need. [`AdmissionOptions::new`] fills in
/// production defaults; the fields are public so the operator's flags can override them.
#[derive(Clone)]
pub struct AdmissionOptions {
    /// The client used to read the Zarf state, keep the TLS Secret and patch the configurations.
    pub client: kube::Client,
    /// The address the HTTPS server listens on.
    pub listen: SocketAddr,
    /// How the API server reaches the server: an in-cluster Service or a URL.
    pub endpoint: WebhookEndpoint,
    /// The name of both webhook configurations (mutating and validating); default `paddock`.
    pub configuration_name: String,
    /// The failure policy of every webhook.
    pub failure_policy: FailurePolicy,
    /// How long the API server waits for an answer, 1 to 30 seconds; default 5.
    pub timeout_seconds: i32,
    /// Namespaces every webhook applies to; the webhook-specific requirements are added to it.
    /// Default: all but `kube-system` and `kube-node-lease`.
    pub namespace_selector: LabelSelector,
    /// Where host-level volumes are denied.
    pub host_volume_policy: HostVolumePolicy,
    /// Whether [`serve`] owns the webhook configurations or only injects their CA bundle.
    /// [`ConfigurationMode::InjectCa`] ignores the fields above that shape the configurations
    /// (failure policy, timeout, selectors, endpoint path): the configurations' owner decides them.
    pub configurations: ConfigurationMode,
    /// The CA and serving certificate: where they are kept, how long they live.
    pub tls: TlsOptions,
    /// How Zarf is detected.
    pub zarf: ZarfOptions,
    /// Metrics, registered by the caller in its registry (see [`AdmissionMetrics::register`]).
    pub metrics: AdmissionMetrics,
    /// The longest request body accepted (an AdmissionReview carries the object and the old object).
    pub body_limit: usize,
    /// The longest time one request may take, reading the body included.
    pub request_timeout: Duration,
}

impl AdmissionOptions {
    /// Production defaults for an operator reached through `endpoint`, keeping its TLS Secret
    /// `paddock-webhook-tls` in `namespace`.
    pub fn new(client: kube::Client, endpoint: WebhookEndpoint, namespace: &str) -> AdmissionOptions {
        AdmissionOptions {
            client,
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            endpoint,
            configuration_name: "paddock".to_owned(),
            failure_policy: FailurePolicy::Fail,
            timeout_seconds: 5,
            namespace_selector: configuration::default_namespace_selector(),
            host_volume_policy: HostVolumePolicy::LabelledNamespaces,
            configurations: ConfigurationMode::Managed,
            tls: TlsOptions::new(namespace),
            zarf: ZarfOptions::default(),
            metrics: AdmissionMetrics::default(),
            body_limit: 6 * 1024 * 1024,
            request_timeout: Duration::from_secs(5),
        }
    }
}

impl AdmissionOptions {
    /// The client-free part of the options that [`webhook_configurations`] builds from.
    pub fn configuration_options(&self) -> ConfigurationOptions {
        ConfigurationOptions {
            endpoint: self.endpoint.clone(),
            name: self.configuration_name.clone(),
            failure_policy: self.failure_policy,
            timeout_seconds: self.timeout_seconds,
            namespace_selector: self.namespace_selector.clone(),
            host_volume_policy: self.host_volume_policy,
        }
    }
}

/// Why [`serve`] stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    /// The listening socket could not be opened.
    #[error(
        "cannot listen on {address} for the admission webhooks: {source}; check that the port is free and allowed"
    )]
    Listen {
        /// The address.
        address: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The certificates could not be issued, loaded or stored.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The webhook configurations could not be applied.
    #[error(
        "cannot apply the webhook configuration {name}: {source}; check that the operator may get and patch (and, when it manages them, create) mutatingwebhookconfigurations and validatingwebhookconfigurations of that name"
    )]
    Configuration {
        /// The configuration's name.
        name: String,
        /// The API error.
        source: Box<kube::Error>,
    },
    /// The options are inconsistent.
    #[error("invalid admission options: {0}")]
    Options(String),
}
