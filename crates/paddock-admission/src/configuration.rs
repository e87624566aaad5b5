//! The MutatingWebhookConfiguration and ValidatingWebhookConfiguration that route requests to
//! [`crate::serve`].
//!
//! Contract: [`webhook_configurations`] is pure and needs no client (its input is
//! [`ConfigurationOptions`]), so the Helm chart renders its templates from the same builder the
//! self-managed operator applies. Filtering happens at the API server, so objects paddock
//! does not care about never cost a round trip: each webhook names only its resources and operations,
//! every webhook carries the base namespace selector, the Zarf webhooks skip what the Zarf agent skips
//! (`zarf.dev/agent: skip|ignore` on the namespace or the object) and the host-volume webhook matches
//! only opted-in namespaces unless the policy says everywhere.

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference, ValidatingWebhook,
    ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta};

use crate::{DENY, FailurePolicy, HOST_VOLUMES_LABEL, HostVolumePolicy};

/// The label the Zarf agent reads to leave a namespace or an object alone.
pub const ZARF_AGENT_LABEL: &str = "zarf.dev/agent";

/// How the API server reaches the webhook server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebhookEndpoint {
    /// An in-cluster Service (the production setup); the serving certificate names
    /// `<name>.<namespace>.svc`.
    Service {
        /// The Service's namespace.
        namespace: String,
        /// The Service's name.
        name: String,
        /// The Service's port.
        port: i32,
    },
    /// A base URL such as `https://127.0.0.1:8443` (tests, out-of-cluster development); the serving
    /// certificate names its host.
    Url(String),
}

impl WebhookEndpoint {
    /// The DNS names or IP addresses the serving certificate must carry.
    pub fn serving_names(&self) -> Vec<String> {
        match self {
            Self::Service { namespace, name, .. } => vec![
                format!("{name}.{namespace}.svc"),
                format!("{name}.{namespace}.svc.cluster.local"),
                format!("{name}.{namespace}"),
            ],
            Self::Url(url) => {
                let rest = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
                let authority = rest.split('/').next().unwrap_or(rest);
                let host = if let Some(bracketed) = authority.strip_prefix('[') {
                    bracketed.split(']').next().unwrap_or(bracketed)
                } else {
                    authority.rsplit_once(':').map_or(authority, |(host, _)| host)
                };
                vec![host.to_owned()]
            }
        }
    }

    fn client_config(&self, path: &str, ca_bundle: Option<&[u8]>) -> WebhookClientConfig {
        let ca_bundle = ca_bundle.map(|bundle| ByteString(bundle.to_vec()));
        match self {
            Self::Service {
                namespace,
                name,
                port,
            } => WebhookClientConfig {
                ca_bundle,
                service: Some(ServiceReference {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    path: Some(path.to_owned()),
                    port: Some(*port),
                }),
                url: None,
            },
            Self::Url(base) => WebhookClientConfig {
                ca_bundle,
                service: None,
                url: Some(format!("{}{path}", base.trim_end_matches('/'))),
            },
        }
    }
}

/// Everything the webhook configurations are built from: no client, no I/O.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigurationOptions {
    /// How the API server reaches the server: an in-cluster Service or a URL.
    pub endpoint: WebhookEndpoint,
    /// The name of both configurations (mutating and validating); default `paddock`.
    pub name: String,
    /// The failure policy of every webhook; default `Fail`.
    pub failure_policy: FailurePolicy,
    /// How long the API server waits for an answer, 1 to 30 seconds; default 5.
    pub timeout_seconds: i32,
    /// Namespaces every webhook applies to; the webhook-specific requirements are added to it.
    /// Default: all but `kube-system` and `kube-node-lease`.
    pub namespace_selector: LabelSelector,
    /// Where host-level volumes are denied.
    pub host_volume_policy: HostVolumePolicy,
}

impl ConfigurationOptions {
    /// Production defaults for a server reached through `endpoint`.
    pub fn new(endpoint: WebhookEndpoint) -> ConfigurationOptions {
        ConfigurationOptions {
            endpoint,
            name: "paddock".to_owned(),
            failure_policy: FailurePolicy::Fail,
            timeout_seconds: 5,
            namespace_selector: default_namespace_selector(),
            host_volume_policy: HostVolumePolicy::LabelledNamespaces,
        }
    }
}

/// The webhooks and the paths the server answers them on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Webhook {
    /// VirtualMachineApp defaults.
    AppDefaults,
    /// Zarf registry rules for DataVolumes.
    DataVolumeRegistry,
    /// Zarf registry rules for VM dataVolumeTemplates.
    VirtualMachineRegistry,
    /// VirtualMachineApp validation.
    AppValidation,
    /// The host-volume policy.
    HostVolumes,
}

impl Webhook {
    /// Every webhook.
    pub const ALL: [Webhook; 5] = [
        Self::AppDefaults,
        Self::DataVolumeRegistry,
        Self::VirtualMachineRegistry,
        Self::AppValidation,
        Self::HostVolumes,
    ];

    /// The URL path the server answers this webhook on.
    pub const fn path(self) -> &'static str {
        match self {
            Self::AppDefaults => "/mutate/virtualmachineapps",
            Self::DataVolumeRegistry => "/mutate/datavolumes",
            Self::VirtualMachineRegistry => "/mutate/virtualmachines",
            Self::AppValidation => "/validate/virtualmachineapps",
            Self::HostVolumes => "/validate/host-volumes",
        }
    }

    /// The webhook's name in its configuration (and its metrics label).
    pub const fn name(self) -> &'static str {
        match self {
            Self::AppDefaults => "virtualmachineapps.defaults.paddock.dev",
            Self::DataVolumeRegistry => "datavolumes.zarf.paddock.dev",
            Self::VirtualMachineRegistry => "virtualmachines.zarf.paddock.dev",
            Self::AppValidation => "virtualmachineapps.validate.paddock.dev",
            Self::HostVolumes => "host-volumes.paddock.dev",
        }
    }
}

/// The base namespace selector: every namespace but the control plane's own.
pub fn default_namespace_selector() -> LabelSelector {
    LabelSelector {
        match_expressions: Some(vec![requirement(
            "kubernetes.io/metadata.name",
            "NotIn",
            &["kube-system", "kube-node-lease"],
        )]),
        match_labels: None,
    }
}

fn requirement(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
    LabelSelectorRequirement {
        key: key.to_owned(),
        operator: operator.to_owned(),
        values: Some(values.iter().map(|value| (*value).to_owned()).collect()),
    }
}

fn with_requirements(base: &LabelSelector, extra: Vec<LabelSelectorRequirement>) -> LabelSelector {
    let mut selector = base.clone();
    if !extra.is_empty() {
        selector
            .match_expressions
            .get_or_insert_with(Vec::new)
            .extend(extra);
    }
    selector
}

fn zarf_agent_skip() -> LabelSelectorRequirement {
    requirement(ZARF_AGENT_LABEL, "NotIn", &["skip", "ignore"])
}

fn rule(group: &str, version: &str, resources: &[&str], operations: &[&str]) -> RuleWithOperations {
    RuleWithOperations {
        api_groups: Some(vec![group.to_owned()]),
        api_versions: Some(vec![version.to_owned()]),
        resources: Some(resources.iter().map(|resource| (*resource).to_owned()).collect()),
        operations: Some(
            operations
                .iter()
                .map(|operation| (*operation).to_owned())
                .collect(),
        ),
        scope: Some("Namespaced".to_owned()),
    }
}

/// The two webhook configurations for `options`, without a `caBundle` (see
/// [`webhook_configurations_with_ca`]).
pub fn webhook_configurations(
    options: &ConfigurationOptions,
) -> (MutatingWebhookConfiguration, ValidatingWebhookConfiguration) {
    webhook_configurations_with_ca(options, None)
}

/// The two webhook configurations for `options`, trusting the PEM `ca_bundle`.
pub fn webhook_configurations_with_ca(
    options: &ConfigurationOptions,
    ca_bundle: Option<&[u8]>,
) -> (MutatingWebhookConfiguration, ValidatingWebhookConfiguration) {
    let metadata = ObjectMeta {
        name: Some(options.name.clone()),
        labels: Some(
            [(
                paddock_api::builders::MANAGED_BY_LABEL.to_owned(),
                paddock_api::builders::MANAGER.to_owned(),
            )]
            .into(),
        ),
        ..ObjectMeta::default()
    };
    let mutating = |webhook: Webhook,
                    rules: Vec<RuleWithOperations>,
                    namespace_selector: LabelSelector,
                    object_selector: Option<LabelSelector>| MutatingWebhook {
        name: webhook.name().to_owned(),
        admission_review_versions: vec!["v1".to_owned()],
        client_config: options.endpoint.client_config(webhook.path(), ca_bundle),
        failure_policy: Some(options.failure_policy.as_str().to_owned()),
        match_policy: Some("Equivalent".to_owned()),
        namespace_selector: Some(namespace_selector),
        object_selector,
        // paddock's patches do not depend on other webhooks' changes, so one call is enough.
        reinvocation_policy: Some("Never".to_owned()),
        rules: Some(rules),
        side_effects: "None".to_owned(),
        timeout_seconds: Some(options.timeout_seconds),
        match_conditions: None,
    };
    let validating = |webhook: Webhook, rules: Vec<RuleWithOperations>, namespace_selector: LabelSelector| {
        ValidatingWebhook {
            name: webhook.name().to_owned(),
            admission_review_versions: vec!["v1".to_owned()],
            client_config: options.endpoint.client_config(webhook.path(), ca_bundle),
            failure_policy: Some(options.failure_policy.as_str().to_owned()),
            match_policy: Some("Equivalent".to_owned()),
            namespace_selector: Some(namespace_selector),
            object_selector: None,
            rules: Some(rules),
            side_effects: "None".to_owned(),
            timeout_seconds: Some(options.timeout_seconds),
            match_conditions: None,
        }
    };
    let base = &options.namespace_selector;
    let zarf_namespaces = with_requirements(base, vec![zarf_agent_skip()]);
    let zarf_objects = LabelSelector {
        match_expressions: Some(vec![zarf_agent_skip()]),
        match_labels: None,
    };
    let apps = |operations: &[&str]| {
        vec![rule(
            paddock_api::app::GROUP,
            paddock_api::app::VERSION,
            &["virtualmachineapps"],
            operations,
        )]
    };
    let mutating_configuration = MutatingWebhookConfiguration {
        metadata: metadata.clone(),
        webhooks: Some(vec![
            mutating(
                Webhook::AppDefaults,
                apps(&["CREATE", "UPDATE"]),
                base.clone(),
                None,
            ),
            // A DataVolume's spec cannot change after creation, so only CREATE.
            mutating(
                Webhook::DataVolumeRegistry,
                vec![rule("cdi.kubevirt.io", "*", &["datavolumes"], &["CREATE"])],
                zarf_namespaces.clone(),
                Some(zarf_objects.clone()),
            ),
            mutating(
                Webhook::VirtualMachineRegistry,
                vec![rule(
                    "kubevirt.io",
                    "*",
                    &["virtualmachines"],
                    &["CREATE", "UPDATE"],
                )],
                zarf_namespaces,
                Some(zarf_objects),
            ),
        ]),
    };
    let mut validating_webhooks = vec![validating(
        Webhook::AppValidation,
        apps(&["CREATE", "UPDATE"]),
        base.clone(),
    )];
    let host_volume_namespaces = match options.host_volume_policy {
        HostVolumePolicy::Off => None,
        HostVolumePolicy::AllNamespaces => Some(base.clone()),
        HostVolumePolicy::LabelledNamespaces => Some(with_requirements(
            base,
            vec![requirement(HOST_VOLUMES_LABEL, "In", &[DENY])],
        )),
    };
    if let Some(namespaces) = host_volume_namespaces {
        validating_webhooks.push(validating(
            Webhook::HostVolumes,
            vec![
                rule(
                    "kubevirt.io",
                    "*",
                    &[
                        "virtualmachines",
                        "virtualmachineinstances",
                        "virtualmachineinstancereplicasets",
                    ],
                    &["CREATE", "UPDATE"],
                ),
                rule(
                    "pool.kubevirt.io",
                    "*",
                    &["virtualmachinepools"],
                    &["CREATE", "UPDATE"],
                ),
            ],
            namespaces,
        ));
    }
    let validating_configuration = ValidatingWebhookConfiguration {
        metadata,
        webhooks: Some(validating_webhooks),
    };
    (mutating_configuration, validating_configuration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_endpoints_name_their_host() {
        for (url, host) in [
            ("https://127.0.0.1:8443", "127.0.0.1"),
            ("https://127.0.0.1:8443/base", "127.0.0.1"),
            ("https://[::1]:8443", "::1"),
            ("https://webhook.example.com", "webhook.example.com"),
        ] {
            assert_eq!(
                WebhookEndpoint::Url(url.to_owned()).serving_names(),
                vec![host.to_owned()]
            );
        }
    }

    fn options(policy: HostVolumePolicy) -> ConfigurationOptions {
        let mut options = ConfigurationOptions::new(WebhookEndpoint::Service {
            namespace: "paddock-system".to_owned(),
            name: "paddock-webhook".to_owned(),
            port: 443,
        });
        options.host_volume_policy = policy;
        options.failure_policy = crate::FailurePolicy::Ignore;
        options.timeout_seconds = 7;
        options
    }

    fn expressions(selector: Option<&LabelSelector>) -> Vec<(String, String, Vec<String>)> {
        selector
            .and_then(|selector| selector.match_expressions.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|requirement| {
                (
                    requirement.key,
                    requirement.operator,
                    requirement.values.unwrap_or_default(),
                )
            })
            .collect()
    }

    #[test]
    fn configurations_filter_at_the_api_server() {
        let (mutating, validating) = webhook_configurations(&options(HostVolumePolicy::LabelledNamespaces));
        let mutating = mutating.webhooks.expect("mutating webhooks");
        let validating = validating.webhooks.expect("validating webhooks");
        assert_eq!(mutating.len(), 3);
        assert_eq!(validating.len(), 2);
        for webhook in &mutating {
            assert_eq!(webhook.side_effects, "None");
            assert_eq!(webhook.admission_review_versions, vec!["v1".to_owned()]);
            assert_eq!(webhook.failure_policy.as_deref(), Some("Ignore"));
            assert_eq!(webhook.timeout_seconds, Some(7));
            let service = webhook
                .client_config
                .service
                .as_ref()
                .expect("a service client config");
            assert_eq!(service.name, "paddock-webhook");
            assert!(webhook.client_config.url.is_none());
            assert!(webhook.client_config.ca_bundle.is_none());
        }
        let zarf = mutating
            .iter()
            .find(|webhook| webhook.name == Webhook::DataVolumeRegistry.name())
            .expect("the datavolume webhook");
        let skip = (
            ZARF_AGENT_LABEL.to_owned(),
            "NotIn".to_owned(),
            vec!["skip".to_owned(), "ignore".to_owned()],
        );
        assert!(expressions(zarf.namespace_selector.as_ref()).contains(&skip));
        assert_eq!(expressions(zarf.object_selector.as_ref()), vec![skip]);
        let host = validating
            .iter()
            .find(|webhook| webhook.name == Webhook::HostVolumes.name())
            .expect("the host-volume webhook");
        assert!(expressions(host.namespace_selector.as_ref()).contains(&(
            HOST_VOLUMES_LABEL.to_owned(),
            "In".to_owned(),
            vec![DENY.to_owned()]
        )));
        for webhook in validating {
            assert_eq!(webhook.side_effects, "None");
            assert!(expressions(webhook.namespace_selector.as_ref()).contains(&(
                "kubernetes.io/metadata.name".to_owned(),
                "NotIn".to_owned(),
                vec!["kube-system".to_owned(), "kube-node-lease".to_owned()]
            )));
        }

        let (_, everywhere) = webhook_configurations(&options(HostVolumePolicy::AllNamespaces));
        let host = everywhere
            .webhooks
            .expect("validating webhooks")
            .pop()
            .expect("the host webhook");
        assert!(
            expressions(host.namespace_selector.as_ref())
                .iter()
                .all(|(key, _, _)| key != HOST_VOLUMES_LABEL)
        );
        let (_, off) = webhook_configurations(&options(HostVolumePolicy::Off));
        assert_eq!(off.webhooks.expect("validating webhooks").len(), 1);
    }

    #[test]
    fn every_path_is_distinct() {
        let mut paths: Vec<_> = Webhook::ALL.iter().map(|webhook| webhook.path()).collect();
        paths.sort_unstable();
        paths.dedup();
        assert_eq!(paths.len(), Webhook::ALL.len());
    }
}
