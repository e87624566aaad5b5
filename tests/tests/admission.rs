//! paddock's admission webhooks (`paddock-admission`) behind the real kube-apiserver: each test serves
//! them on `https://127.0.0.1:<port>`, registers its own webhook configurations (restricted to its
//! namespace, trusting the server's own CA) and talks to the API server as a user would.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use paddock_admission::{AdmissionOptions, ConfigurationMode, HostVolumePolicy, WebhookEndpoint};
use paddock_tests::cluster::Cluster;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

fn apps() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("paddock.dev", "v1alpha1", "VirtualMachineApp"),
        "virtualmachineapps",
    )
}

fn data_volumes() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cdi.kubevirt.io", "v1beta1", "DataVolume"),
        "datavolumes",
    )
}

fn virtual_machines() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachine"),
        "virtualmachines",
    )
}

fn object(value: Value) -> DynamicObject {
    serde_json::from_value(value).unwrap()
}

fn app(name: &str, spec: Value) -> DynamicObject {
    object(json!({
        "apiVersion": "paddock.dev/v1alpha1",
        "kind": "VirtualMachineApp",
        "metadata": {"name": name},
        "spec": spec,
    }))
}

fn valid_spec() -> Value {
    json!({"image": {"containerDisk": "quay.io/containerdisks/debian:12"}, "disk": {"size": "10Gi"}})
}

fn data_volume(name: &str, registry: Value) -> DynamicObject {
    object(json!({
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": name},
        "spec": {
            "source": {"registry": registry},
            "storage": {"resources": {"requests": {"storage": "10Gi"}}},
        },
    }))
}

fn dry_run() -> PostParams {
    PostParams {
        dry_run: true,
        ..PostParams::default()
    }
}

fn api_message(error: kube::Error) -> String {
    match error {
        kube::Error::Api(status) => status.message,
        other => panic!("expected an API error status, got {other:?}"),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The options of a test server for `namespace` on `port`, its configurations restricted to
/// `namespace`.
fn test_options(client: &kube::Client, namespace: &str, port: u16) -> AdmissionOptions {
    let mut options = AdmissionOptions::new(
        client.clone(),
        WebhookEndpoint::Url(format!("https://127.0.0.1:{port}")),
        namespace,
    );
    options.listen = ([127, 0, 0, 1], port).into();
    options.configuration_name = format!("paddock-test-{namespace}");
    options.namespace_selector = LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "kubernetes.io/metadata.name".to_owned(),
            operator: "In".to_owned(),
            values: Some(vec![namespace.to_owned()]),
        }]),
        match_labels: None,
    };
    options.zarf.namespace = namespace.to_owned();
    options.zarf.poll_interval = Duration::from_millis(100);
    options
}

/// Server-side applies the configurations without a caBundle as the field manager `helm`, as the
/// chart installs them.
async fn install_configurations_as_chart(client: &kube::Client, options: &AdmissionOptions) {
    let (mutating, validating) = paddock_admission::webhook_configurations(&options.configuration_options());
    let params = PatchParams::apply("helm").force();
    let mut mutating = serde_json::to_value(&mutating).unwrap();
    mutating["apiVersion"] = json!("admissionregistration.k8s.io/v1");
    mutating["kind"] = json!("MutatingWebhookConfiguration");
    let mut validating = serde_json::to_value(&validating).unwrap();
    validating["apiVersion"] = json!("admissionregistration.k8s.io/v1");
    validating["kind"] = json!("ValidatingWebhookConfiguration");
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .patch(&options.configuration_name, &params, &Patch::Apply(&mutating))
        .await
        .unwrap();
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .patch(&options.configuration_name, &params, &Patch::Apply(&validating))
        .await
        .unwrap();
}

/// One webhook server with its own configurations, restricted to one namespace.
struct Webhook {
    client: kube::Client,
    configuration: String,
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), paddock_admission::AdmissionError>>,
}

impl Webhook {
    /// Serves the webhooks for `namespace`, which also stands in for Zarf's namespace (so a
    /// `zarf-state` Secret made by one test is seen by its server only).
    async fn start(cluster: &Cluster, namespace: &str, tweak: impl FnOnce(&mut AdmissionOptions)) -> Webhook {
        let client = cluster.admin_client().await.unwrap();
        let port = free_port();
        let mut options = test_options(&client, namespace, port);
        tweak(&mut options);
        if options.configurations == ConfigurationMode::InjectCa {
            // The chart's role: the configurations from the same builder, without a caBundle.
            install_configurations_as_chart(&client, &options).await;
        }
        let configuration = options.configuration_name.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(paddock_admission::serve(options, async move {
            let _ = stopped.await;
        }));
        let webhook = Webhook {
            client,
            configuration,
            port,
            stop: Some(stop),
            task,
        };
        webhook.wait_until_called(namespace).await;
        webhook
    }

    /// Waits until the API server calls the mutating webhook (the configuration is applied before
    /// the server listens, and the API server picks configurations up asynchronously).
    async fn wait_until_called(&self, namespace: &str) {
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), namespace, &apps());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                !self.task.is_finished(),
                "the webhook server stopped: {:?}",
                self.task
            );
            let outcome = api.create(&dry_run(), &app("probe", valid_spec())).await;
            if let Ok(created) = &outcome
                && created.data["spec"]["displayName"] == "probe"
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the API server never called the webhook: {outcome:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The `caBundle` the API server trusts right now.
    async fn published_ca_bundle(&self) -> Vec<u8> {
        let api: Api<ValidatingWebhookConfiguration> = Api::all(self.client.clone());
        let configuration = api.get(&self.configuration).await.unwrap();
        configuration.webhooks.unwrap()[0]
            .client_config
            .ca_bundle
            .clone()
            .unwrap()
            .0
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.unwrap().unwrap();
        let mutating: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        let validating: Api<ValidatingWebhookConfiguration> = Api::all(self.client.clone());
        mutating
            .delete(&self.configuration, &DeleteParams::default())
            .await
            .unwrap();
        validating
            .delete(&self.configuration, &DeleteParams::default())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn invalid_apps_are_denied_with_the_webhooks_message() {
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let namespace = cluster.namespace("admission-deny").await.unwrap();
    let webhook = Webhook::start(cluster, namespace.name(), |_| {}).await;
    let api: Api<DynamicObject> = Api::namespaced_with(webhook.client.clone(), namespace.name(), &apps());

    // Both pass the CRD's CEL rules; only the webhook can parse a cron field or an SSH key.
    let mut spec = valid_spec();
    spec["snapshots"] = json!({"schedule": "61 * * * *"});
    spec["cloudInit"] = json!({"sshKeys": ["my laptop key"]});
    let message = api_message(
        api.create(&PostParams::default(), &app("invalid", spec))
            .await
            .unwrap_err(),
    );
    assert!(
        message.contains("admission webhook \"virtualmachineapps.validate.paddock.dev\" denied the request"),
        "{message}"
    );
    assert!(message.contains("spec.snapshots.schedule"), "{message}");
    assert!(
        message.contains(
            "spec.cloudInit.sshKeys[0]: not an OpenSSH public key: paste the whole line of your .pub file"
        ),
        "{message}"
    );

    // A valid app is admitted.
    api.create(&PostParams::default(), &app("valid", valid_spec()))
        .await
        .unwrap();
    webhook.stop().await;
}

#[tokio::test]
async fn defaults_are_applied_and_given_back_for_an_instancetype() {
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let namespace = cluster.namespace("admission-defaults").await.unwrap();
    let webhook = Webhook::start(cluster, namespace.name(), |_| {}).await;
    let api: Api<DynamicObject> = Api::namespaced_with(webhook.client.clone(), namespace.name(), &apps());

    let created = api
        .create(&PostParams::default(), &app("debian", valid_spec()))
        .await
        .unwrap();
    assert_eq!(created.data["spec"]["displayName"], "debian");
    assert_eq!(
        created.data["spec"]["resources"],
        json!({"cpu": 1, "memory": "1Gi"})
    );
    // The schema's own defaults are there too (not repeated by the webhook).
    assert_eq!(created.data["spec"]["runStrategy"], "Always");
    assert_eq!(
        created.metadata.annotations.unwrap()["paddock.dev/defaulted"],
        "resources.cpu,resources.memory"
    );

    // Switching to an instancetype would break the CRD's "instancetype or cpu/memory" rule if the
    // defaulted cpu/memory stayed; the webhook takes them back.
    let patched = api
        .patch(
            "debian",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"resources": {"instancetype": {"name": "u1.medium"}}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        patched.data["spec"]["resources"],
        json!({"instancetype": {"name": "u1.medium", "scope": "cluster"}})
    );

    // What the user set is kept.
    let mut spec = valid_spec();
    spec["displayName"] = json!("My Debian");
    spec["resources"] = json!({"cpu": 4});
    let kept = api.create(&dry_run(), &app("mine", spec)).await.unwrap();
    assert_eq!(kept.data["spec"]["displayName"], "My Debian");
    assert_eq!(kept.data["spec"]["resources"], json!({"cpu": 4, "memory": "1Gi"}));
    webhook.stop().await;
}

#[tokio::test]
async fn data_volumes_follow_the_zarf_registry_only_while_zarf_is_installed() {
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let namespace = cluster.namespace("admission-zarf").await.unwrap();
    let webhook = Webhook::start(cluster, namespace.name(), |_| {}).await;
    let client = webhook.client.clone();
    let volumes: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace.name(), &data_volumes());
    let source = json!({"url": "docker://quay.io/containerdisks/debian:12"});

    let untouched = volumes
        .create(&dry_run(), &data_volume("disk", source.clone()))
        .await
        .unwrap();
    assert_eq!(untouched.data["spec"]["source"]["registry"], source);

    // Zarf's state as `zarf init` writes it (only the part paddock reads matters).
    let state =
        json!({"registryInfo": {"address": "127.0.0.1:31999", "nodePort": 31999, "internalRegistry": true}});
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "zarf-state"},
        "stringData": {"state": state.to_string()},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), namespace.name())
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    let mutated = loop {
        let created = volumes
            .create(&dry_run(), &data_volume("disk", source.clone()))
            .await
            .unwrap();
        if created.data["spec"]["source"]["registry"]
            .get("pullMethod")
            .is_some()
        {
            break created;
        }
        assert!(
            Instant::now() < deadline,
            "the zarf-state secret was never noticed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        mutated.data["spec"]["source"]["registry"],
        json!({"url": "docker://quay.io/containerdisks/debian:12", "pullMethod": "node"})
    );

    // Already pointing at the Zarf registry with its own pull secret: left alone.
    let zarf_source = json!({"url": "docker://127.0.0.1:31999/containerdisks/debian:12-zarf-4021467769", "secretRef": "zarf-pull"});
    let kept = volumes
        .create(&dry_run(), &data_volume("zarf-disk", zarf_source.clone()))
        .await
        .unwrap();
    assert_eq!(kept.data["spec"]["source"]["registry"], zarf_source);

    // VM dataVolumeTemplates follow the same rule; containerDisk volumes are the Zarf agent's.
    let machines: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace.name(), &virtual_machines());
    let vm = object(json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "vm"},
        "spec": {
            "runStrategy": "Halted",
            "dataVolumeTemplates": [{
                "metadata": {"name": "vm-root"},
                "spec": {"source": {"registry": source}, "storage": {"resources": {"requests": {"storage": "10Gi"}}}},
            }],
            "template": {"spec": {
                "domain": {"devices": {}, "memory": {"guest": "128Mi"}},
                "volumes": [
                    {"name": "root", "dataVolume": {"name": "vm-root"}},
                    {"name": "scratch", "containerDisk": {"image": "quay.io/containerdisks/debian:12"}},
                ],
            }},
        },
    }));
    let created = machines.create(&dry_run(), &vm).await.unwrap();
    assert_eq!(
        created.data["spec"]["dataVolumeTemplates"][0]["spec"]["source"]["registry"]["pullMethod"],
        "node"
    );
    assert_eq!(
        created.data["spec"]["template"]["spec"]["volumes"][1]["containerDisk"]["image"],
        "quay.io/containerdisks/debian:12"
    );
    webhook.stop().await;
}

#[tokio::test]
async fn host_volumes_are_denied_where_the_namespace_opts_in() {
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let namespace = cluster.namespace("admission-host").await.unwrap();
    let webhook = Webhook::start(cluster, namespace.name(), |options| {
        options.host_volume_policy = HostVolumePolicy::LabelledNamespaces;
    })
    .await;
    let machines: Api<DynamicObject> =
        Api::namespaced_with(webhook.client.clone(), namespace.name(), &virtual_machines());
    let vm = object(json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "host"},
        "spec": {
            "runStrategy": "Halted",
            "template": {"spec": {
                "domain": {"devices": {}, "memory": {"guest": "128Mi"}},
                "volumes": [{"name": "data", "hostDisk": {"path": "/var/lib/data.img", "type": "DiskOrCreate", "capacity": "1Gi"}}],
            }},
        },
    }));

    // Not opted in: admitted.
    machines.create(&dry_run(), &vm).await.unwrap();

    let namespaces: Api<Namespace> = Api::all(webhook.client.clone());
    namespaces
        .patch(
            namespace.name(),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"paddock.dev/host-volumes": "deny"}}})),
        )
        .await
        .unwrap();
    // The API server matches namespaceSelectors against its namespace cache: wait for the label.
    let deadline = Instant::now() + Duration::from_secs(10);
    let message = loop {
        match machines.create(&dry_run(), &vm).await {
            Err(error) => break api_message(error),
            Ok(_) => {
                assert!(Instant::now() < deadline, "the opt-in label was never honoured");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(
        message.contains("admission webhook \"host-volumes.paddock.dev\" denied the request"),
        "{message}"
    );
    assert!(
        message.contains("spec.template.spec.volumes[0] (\"data\") is a hostDisk at '/var/lib/data.img'"),
        "{message}"
    );
    assert!(message.contains("persistentVolumeClaim instead"), "{message}");
    webhook.stop().await;
}

/// A fresh TLS handshake with the server, trusting only `ca_bundle`: the leaf's DER on success.
async fn handshake(port: u16, ca_bundle: &[u8]) -> Result<Vec<u8>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(ca_bundle) {
        roots
            .add(certificate.map_err(|error| error.to_string())?)
            .map_err(|error| error.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|error| error.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector
        .connect(name, stream)
        .await
        .map_err(|error| error.to_string())?;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|error| error.to_string())?;
    let mut response = Vec::new();
    tls.read_to_end(&mut response)
        .await
        .map_err(|error| error.to_string())?;
    if !response.starts_with(b"HTTP/1.1 200") {
        return Err(String::from_utf8_lossy(&response).into_owned());
    }
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    Ok(leaf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_dropping_requests() {
    rotate_under_load("admission-rotation", ConfigurationMode::Managed).await;
}

/// The chart's mode: the configurations are someone else's (applied without a caBundle); two
/// replicas share the TLS Secret and only inject the bundle, through CA rotations, without one
/// taking back the other's newer CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_ca_bundles_follow_rotation_across_replicas() {
    rotate_under_load("admission-inject", ConfigurationMode::InjectCa).await;
}

fn fast_rotation(options: &mut AdmissionOptions) {
    options.tls.serving_validity = Duration::from_secs(4);
    options.tls.ca_validity = Duration::from_secs(12);
    options.tls.check_interval = Duration::from_millis(200);
    options.tls.ca_propagation_delay = Duration::from_secs(1);
}

async fn rotate_under_load(prefix: &str, mode: ConfigurationMode) {
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let namespace = cluster.namespace(prefix).await.unwrap();
    let webhook = Arc::new(
        Webhook::start(cluster, namespace.name(), |options| {
            fast_rotation(options);
            options.configurations = mode;
        })
        .await,
    );
    // In the chart's mode, a second replica (called by nobody, injecting like the first).
    let second = if mode == ConfigurationMode::InjectCa {
        let mut options = test_options(&webhook.client, namespace.name(), free_port());
        fast_rotation(&mut options);
        options.configurations = mode;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(paddock_admission::serve(options, async move {
            let _ = stopped.await;
        }));
        Some((stop, task))
    } else {
        None
    };
    let run_for = Duration::from_secs(28);
    let started = Instant::now();
    let requests = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));

    // Through the API server: dry-run creates of a valid and an invalid app, both must get the
    // webhooks' answers (defaults applied, or the validation message), never a call failure.
    let mut workers = Vec::new();
    for worker in 0..2 {
        let api: Api<DynamicObject> = Api::namespaced_with(webhook.client.clone(), namespace.name(), &apps());
        let requests = Arc::clone(&requests);
        let failures = Arc::clone(&failures);
        workers.push(tokio::spawn(async move {
            let mut iteration = 0usize;
            while started.elapsed() < run_for {
                iteration += 1;
                let name = format!("hammer-{worker}-{iteration}");
                let outcome = if iteration.is_multiple_of(2) {
                    match api.create(&dry_run(), &app(&name, valid_spec())).await {
                        Ok(created) if created.data["spec"]["displayName"] == name.as_str() => Ok(()),
                        Ok(created) => Err(format!("not defaulted: {:?}", created.data)),
                        Err(error) => Err(error.to_string()),
                    }
                } else {
                    let mut spec = valid_spec();
                    spec["cloudInit"] = json!({"sshKeys": ["not a key"]});
                    match api.create(&dry_run(), &app(&name, spec)).await {
                        Err(kube::Error::Api(status))
                            if status.message.contains("not an OpenSSH public key") =>
                        {
                            Ok(())
                        }
                        other => Err(format!("expected the webhook's denial, got {other:?}")),
                    }
                };
                requests.fetch_add(1, Ordering::Relaxed);
                if let Err(failure) = outcome {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("{:?}: {failure}", started.elapsed()));
                }
            }
        }));
    }

    // Directly: a fresh handshake every 100 ms, trusting only the caBundle published at that
    // moment, so every certificate the server ever serves is checked against what the API server
    // would trust, whether or not the API server happens to open a new connection.
    let mut leaves = BTreeSet::new();
    let mut bundles = BTreeSet::new();
    let mut handshake_failures = Vec::new();
    while started.elapsed() < run_for {
        let bundle = webhook.published_ca_bundle().await;
        match handshake(webhook.port, &bundle).await {
            Ok(leaf) => {
                leaves.insert(leaf);
            }
            Err(error) => handshake_failures.push(format!("{:?}: {error}", started.elapsed())),
        }
        bundles.insert(bundle);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for worker in workers {
        worker.await.unwrap();
    }

    let failures = failures.lock().unwrap().clone();
    let requests = requests.load(Ordering::Relaxed);
    eprintln!(
        "{requests} requests through the API server, {} serving certificates and {} CA bundles seen over {run_for:?}",
        leaves.len(),
        bundles.len()
    );
    assert!(failures.is_empty(), "requests failed: {failures:#?}");
    assert!(
        handshake_failures.is_empty(),
        "handshakes failed: {handshake_failures:#?}"
    );
    assert!(requests > 50, "only {requests} requests were made");
    // 28 s with 4 s certificates renewed at a third left, and a 12 s CA renewed likewise.
    assert!(
        leaves.len() >= 6,
        "only {} serving certificates were served",
        leaves.len()
    );
    assert!(
        bundles.len() >= 3,
        "only {} CA bundles were published",
        bundles.len()
    );
    if let Some((stop, task)) = second {
        let _ = stop.send(());
        task.await.unwrap().unwrap();
    }
    Arc::into_inner(webhook).unwrap().stop().await;
}

#[tokio::test]
async fn malformed_and_oversized_bodies_get_errors_not_crashes() {
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let namespace = cluster.namespace("admission-malformed").await.unwrap();
    let webhook = Webhook::start(cluster, namespace.name(), |options| {
        options.body_limit = 64 * 1024;
        options.request_timeout = Duration::from_secs(2);
    })
    .await;
    let bundle = webhook.published_ca_bundle().await;
    let port = webhook.port;
    let post = |path: &'static str, body: Vec<u8>, declared_length: usize| {
        let bundle = bundle.clone();
        async move {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            for certificate in CertificateDer::pem_slice_iter(&bundle) {
                roots.add(certificate.unwrap()).unwrap();
            }
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(
                    rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
                    stream,
                )
                .await
                .unwrap();
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {declared_length}\r\nConnection: close\r\n\r\n"
            );
            tls.write_all(head.as_bytes()).await.unwrap();
            // A peer that stops mid-write (a slow or oversized body) is fine.
            let _ = tls.write_all(&body).await;
            let mut response = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut response))
                .await
                .expect("the server must answer or close within its request timeout");
            String::from_utf8_lossy(&response).into_owned()
        }
    };

    let garbage = post("/validate/virtualmachineapps", b"{\"request\": [".to_vec(), 13).await;
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    let oversized = post("/mutate/virtualmachineapps", vec![b' '; 200 * 1024], 200 * 1024).await;
    assert!(oversized.starts_with("HTTP/1.1 413"), "{oversized}");
    let started = Instant::now();
    let slow = post("/mutate/datavolumes", b"{".to_vec(), 1000).await;
    assert!(slow.starts_with("HTTP/1.1 408"), "{slow}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // And the server still answers the API server.
    let api: Api<DynamicObject> = Api::namespaced_with(webhook.client.clone(), namespace.name(), &apps());
    let created = api.create(&dry_run(), &app("after", valid_spec())).await.unwrap();
    assert_eq!(created.data["spec"]["displayName"], "after");
    webhook.stop().await;
}
