//! The paddock operator (`paddock operator`, the real binary) on the real control plane: a
//! VirtualMachineApp for a disk packaged by `paddock package` and pushed to a real docker-registry is
//! imported by the simulated CDI, started by the simulated virt-controller and listed in Baffles;
//! `runStrategy: Halted` stops it; deleting the app lets kube-controller-manager's garbage collector
//! remove every child. Also: annotated plain VMs get a Baffles listing, scheduled snapshots are taken
//! and pruned, scheduled and requested backups are pushed to a real registry, recorded in the status
//! and Events and pruned beyond `keep` (failures and registries without deletes reported), and
//! `kill -9` of the operator twenty times during reconciles still converges with no duplicate
//! children.
//!
//! Each test runs its own operator process, scoped to the test's namespace (`--namespace`), with its
//! leader Lease there too, so tests in this binary run in parallel without seeing each other.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use paddock_tests::cluster::{Cluster, TestNamespace};
use paddock_tests::registry::{Registry, RegistryAuth};
use paddock_tests::world::{
    allow_insecure_registry, baffles_applications, data_volumes, virtual_machine_apps,
    virtual_machine_instances, virtual_machine_snapshots, virtual_machines,
};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(120);
const GATEWAY: &str = "wss://console.paddock.test";

struct World {
    cluster: &'static Cluster,
    client: kube::Client,
    namespace: TestNamespace,
}

impl World {
    async fn new(prefix: &str) -> Option<World> {
        let cluster = Cluster::shared().unwrap()?;
        let client = cluster.admin_client().await.unwrap();
        let namespace = cluster.namespace(prefix).await.unwrap();
        Some(World {
            cluster,
            client,
            namespace,
        })
    }

    /// The operator's leader Lease in this namespace, as JSON.
    async fn lease(&self) -> Value {
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(self.client.clone(), self.name());
        serde_json::to_value(leases.get("paddock-operator").await.unwrap()).unwrap()
    }

    async fn lease_holder(&self) -> Option<String> {
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(self.client.clone(), self.name());
        leases
            .get_opt("paddock-operator")
            .await
            .unwrap()
            .and_then(|lease| lease.spec?.holder_identity)
    }

    fn name(&self) -> &str {
        self.namespace.name()
    }

    fn api(&self, resource: &ApiResource) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), self.name(), resource)
    }

    async fn create(&self, resource: &ApiResource, object: Value) -> Value {
        let object: DynamicObject = serde_json::from_value(object).unwrap();
        let created = self
            .api(resource)
            .create(&PostParams::default(), &object)
            .await
            .unwrap_or_else(|error| panic!("create {:?}: {error}", object.metadata.name));
        serde_json::to_value(created).unwrap()
    }

    async fn get(&self, resource: &ApiResource, name: &str) -> Option<Value> {
        self.api(resource)
            .get_opt(name)
            .await
            .unwrap()
            .map(|object| serde_json::to_value(object).unwrap())
    }

    async fn list(&self, resource: &ApiResource, labels: &str) -> Vec<Value> {
        self.api(resource)
            .list(&ListParams::default().labels(labels))
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|object| serde_json::to_value(object).unwrap())
            .collect()
    }

    async fn merge(&self, resource: &ApiResource, name: &str, patch: Value) {
        self.api(resource)
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .unwrap();
    }

    /// Polls `name` until `done` holds for it (or for its absence), returning the last state.
    async fn wait(
        &self,
        resource: &ApiResource,
        name: &str,
        what: &str,
        operator: &Operator,
        done: impl Fn(Option<&Value>) -> bool,
    ) -> Option<Value> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let object = self.get(resource, name).await;
            if done(object.as_ref()) {
                return object;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {} {name} to be {what}; last state:\n{}\noperator log:\n{}",
                resource.kind,
                serde_json::to_string_pretty(&object).unwrap(),
                operator.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn text<'a>(object: Option<&'a Value>, pointer: &str) -> Option<&'a str> {
    object?.pointer(pointer)?.as_str()
}

fn condition<'a>(object: &'a Value, kind: &str) -> Option<&'a Value> {
    object
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|conditions| conditions.iter().find(|condition| condition["type"] == kind))
}

fn run(command: &mut Command) -> String {
    paddock_tests::world::run(command).unwrap()
}

fn paddock_binary() -> &'static Path {
    paddock_tests::world::paddock_binary().unwrap()
}

/// A `paddock operator` process scoped to one namespace; killed (SIGKILL) on drop.
struct Operator {
    child: Option<Child>,
    log: PathBuf,
    extra_arguments: Vec<String>,
    _directory: tempfile::TempDir,
}

impl Operator {
    fn start(world: &World) -> Operator {
        Operator::start_with(world, &[])
    }

    fn start_with(world: &World, extra_arguments: &[String]) -> Operator {
        let directory = tempfile::tempdir().unwrap();
        let log = directory.path().join("operator.log");
        let mut operator = Operator {
            child: None,
            log,
            extra_arguments: extra_arguments.to_vec(),
            _directory: directory,
        };
        operator.spawn(world);
        operator
    }

    fn spawn(&mut self, world: &World) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(paddock_binary())
            .args(["operator", "--namespace", world.name()])
            .args(["--lease-namespace", world.name()])
            // The same identity after every restart, as a restarted pod keeps its name: the new
            // process takes its own Lease back at once. A test may name another one.
            .args(
                if self
                    .extra_arguments
                    .iter()
                    .any(|argument| argument == "--identity")
                {
                    Vec::new()
                } else {
                    vec!["--identity".to_owned(), format!("{}-operator", world.name())]
                },
            )
            .args(["--console-gateway-url", GATEWAY])
            .args(["--listen", "127.0.0.1:0", "--retry-period-seconds", "1"])
            .args(&self.extra_arguments)
            .env("NO_COLOR", "1")
            .env("KUBECONFIG", world.cluster.admin_kubeconfig())
            .env("RUST_LOG", "info,paddock_operator=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGTERM, then waits for the exit status.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
        child.wait().unwrap()
    }

    /// `kill -9` and reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The probe server's port, from the operator's log line that announces it.
    async fn probe_port(&self) -> u16 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let port = log
                .lines()
                .find(|line| line.contains("serving /healthz"))
                .and_then(|line| line.split("127.0.0.1:").nth(1))
                .and_then(|rest| {
                    rest.chars()
                        .take_while(char::is_ascii_digit)
                        .collect::<String>()
                        .parse()
                        .ok()
                });
            if let Some(port) = port {
                return port;
            }
            assert!(Instant::now() < deadline, "no probe address in the log:\n{log}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        let log = std::fs::read(&self.log).unwrap_or_default();
        let start = log.len().saturating_sub(6000);
        String::from_utf8_lossy(&log[start..]).into_owned()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn allow_insecure(world: &World, registry: &str) {
    allow_insecure_registry(&world.client, registry, TIMEOUT)
        .await
        .unwrap();
}

/// A 64 MiB qcow2 packaged by `paddock package` and pushed by `paddock push` to a fresh registry;
/// returns the registry (keep it alive) and the image reference.
async fn packaged_image(world: &World, directory: &Path) -> (Registry, String) {
    let registry = Registry::start(RegistryAuth::None).unwrap();
    allow_insecure(world, registry.address()).await;
    let disk = directory.join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("64M"));
    let layout = directory.join("disk.oci");
    let reference = format!("{}/vms/disk:1", registry.address());
    run(Command::new(paddock_binary())
        .arg("package")
        .arg(&disk)
        .args(["--image", &reference, "--output"])
        .arg(&layout));
    run(Command::new(paddock_binary())
        .arg("push")
        .arg(&layout)
        .arg(&reference)
        .arg("--insecure"));
    (registry, reference)
}

/// `GET path` on 127.0.0.1:`port` over plain HTTP/1.1: the status code and the body.
fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn app(name: &str, reference: &str, run_strategy: &str) -> Value {
    json!({
        "apiVersion": "paddock.dev/v1alpha1",
        "kind": "VirtualMachineApp",
        "metadata": {"name": name},
        "spec": {
            "displayName": format!("Test {name}"),
            "image": {"containerDisk": reference},
            "disk": {"size": "1Gi"},
            "resources": {"cpu": 1, "memory": "128Mi"},
            "runStrategy": run_strategy,
        },
    })
}

fn console_url(namespace: &str, name: &str) -> String {
    format!(
        "{GATEWAY}/k8s/apis/subresources.kubevirt.io/v1/namespaces/{namespace}/virtualmachineinstances/{name}/vnc"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn packaged_app_is_imported_started_listed_stopped_and_deleted() {
    let Some(world) = World::new("op-app").await else {
        return;
    };
    let directory = tempfile::tempdir().unwrap();
    let (_registry, reference) = packaged_image(&world, directory.path()).await;
    let operator = Operator::start(&world);
    world
        .create(&virtual_machine_apps(), app("web", &reference, "Always"))
        .await;

    let data_volume = world
        .wait(&data_volumes(), "web-disk", "Succeeded", &operator, |object| {
            text(object, "/status/phase") == Some("Succeeded")
        })
        .await
        .unwrap();
    assert_eq!(
        text(Some(&data_volume), "/spec/source/registry/url"),
        Some(format!("docker://{reference}").as_str())
    );
    assert_eq!(
        data_volume["metadata"]["ownerReferences"][0]["kind"],
        "VirtualMachineApp"
    );
    world
        .wait(&virtual_machines(), "web", "Running", &operator, |object| {
            text(object, "/status/printableStatus") == Some("Running")
        })
        .await;
    let app_status = world
        .wait(
            &virtual_machine_apps(),
            "web",
            "phase Running",
            &operator,
            |object| {
                text(object, "/status/phase") == Some("Running")
                    && object.and_then(|o| condition(o, "Ready")).map(|c| &c["status"])
                        == Some(&json!("True"))
            },
        )
        .await
        .unwrap();
    let progress = text(Some(&app_status), "/status/importProgress").unwrap();
    assert!(progress.starts_with("100"), "importProgress {progress}");
    assert_eq!(
        text(Some(&app_status), "/status/consoleURL"),
        Some(console_url(world.name(), "web").as_str())
    );
    assert_eq!(condition(&app_status, "DiskReady").unwrap()["reason"], "Imported");
    let listing = world
        .wait(&baffles_applications(), "web", "present", &operator, |object| {
            object.is_some()
        })
        .await
        .unwrap();
    assert_eq!(listing["spec"]["url"], console_url(world.name(), "web"));
    assert_eq!(listing["spec"]["displayName"], "Test web");
    assert_eq!(listing["spec"]["category"], "vm");
    assert_eq!(
        condition(&app_status, "BafflesRegistered").unwrap()["status"],
        "True"
    );
    // Users see the import and the start as Events on the app.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(world.client.clone(), world.name());
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let reasons: Vec<String> = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|event| event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("web"))
            .filter_map(|event| event.reason)
            .collect();
        if ["ImportSucceeded", "VirtualMachineStarted"]
            .iter()
            .all(|reason| reasons.iter().any(|seen| seen == reason))
        {
            break;
        }
        assert!(Instant::now() < deadline, "events seen: {reasons:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // runStrategy Halted on the app reaches the VM, which stops.
    world
        .merge(
            &virtual_machine_apps(),
            "web",
            json!({"spec": {"runStrategy": "Halted"}}),
        )
        .await;
    world
        .wait(&virtual_machines(), "web", "Stopped", &operator, |object| {
            text(object, "/spec/runStrategy") == Some("Halted")
                && text(object, "/status/printableStatus") == Some("Stopped")
        })
        .await;
    world
        .wait(&virtual_machine_instances(), "web", "gone", &operator, |object| {
            object.is_none()
        })
        .await;
    world
        .wait(
            &virtual_machine_apps(),
            "web",
            "phase Stopped",
            &operator,
            |object| text(object, "/status/phase") == Some("Stopped"),
        )
        .await;

    // An edit of the VM alone is set back: the app is the source of truth.
    world
        .merge(
            &virtual_machines(),
            "web",
            json!({"spec": {"runStrategy": "Always"}}),
        )
        .await;
    // Trigger: the VM change itself is a watch event for the owner.
    world
        .wait(&virtual_machines(), "web", "Halted again", &operator, |object| {
            text(object, "/spec/runStrategy") == Some("Halted")
        })
        .await;

    // Deleting the app lets the garbage collector remove every child.
    world
        .api(&virtual_machine_apps())
        .delete("web", &DeleteParams::foreground())
        .await
        .unwrap();
    for (resource, name) in [
        (virtual_machine_apps(), "web"),
        (virtual_machines(), "web"),
        (data_volumes(), "web-disk"),
        (baffles_applications(), "web"),
    ] {
        world
            .wait(&resource, name, "deleted", &operator, |object| object.is_none())
            .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn annotated_plain_vm_is_listed_in_baffles_until_the_annotation_goes() {
    let Some(world) = World::new("op-console").await else {
        return;
    };
    let operator = Operator::start(&world);
    world
        .create(
            &virtual_machines(),
            json!({
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachine",
                "metadata": {"name": "legacy", "annotations": {
                    "paddock.dev/console": "baffles",
                    "paddock.dev/display-name": "Legacy ERP",
                }},
                "spec": {"runStrategy": "Halted", "template": {"spec": {
                    "domain": {"devices": {}, "memory": {"guest": "128Mi"}},
                }}},
            }),
        )
        .await;
    let listing = world
        .wait(
            &baffles_applications(),
            "legacy",
            "present",
            &operator,
            |object| object.is_some(),
        )
        .await
        .unwrap();
    assert_eq!(listing["spec"]["displayName"], "Legacy ERP");
    assert_eq!(listing["spec"]["url"], console_url(world.name(), "legacy"));
    assert_eq!(
        listing["metadata"]["ownerReferences"][0]["kind"],
        "VirtualMachine"
    );
    world
        .merge(
            &virtual_machines(),
            "legacy",
            json!({"metadata": {"annotations": {"paddock.dev/console": null}}}),
        )
        .await;
    world
        .wait(
            &baffles_applications(),
            "legacy",
            "deleted",
            &operator,
            |object| object.is_none(),
        )
        .await;

    // The probes and metrics of the same process.
    let port = operator.probe_port().await;
    assert_eq!(http_get(port, "/healthz").0, 200);
    let deadline = Instant::now() + TIMEOUT;
    while http_get(port, "/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "never ready:\n{}", operator.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, metrics) = http_get(port, "/metrics");
    assert_eq!(status, 200);
    let lease = world.lease().await;
    assert_eq!(
        lease["spec"]["holderIdentity"],
        format!("{}-operator", world.name())
    );
    for series in [
        "paddock_operator_reconciles_total{controller=\"console\",result=\"ok\"}",
        "paddock_operator_reconcile_duration_seconds_count{controller=\"console\"}",
        "paddock_operator_queue_depth{controller=\"console\"} 0",
        "paddock_operator_leader 1",
    ] {
        assert!(metrics.contains(series), "{series} missing from\n{metrics}");
    }

    // SIGTERM: a clean exit that hands the Lease back.
    let mut operator = operator;
    let status = operator.terminate();
    assert!(status.success(), "{status:?}\n{}", operator.log());
    assert!(world.lease().await["spec"]["holderIdentity"].is_null());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_replica_takes_over_when_the_leader_dies() {
    let Some(world) = World::new("op-leader").await else {
        return;
    };
    let timing = ["--lease-duration-seconds", "3", "--renew-deadline-seconds", "2"].map(str::to_owned);
    let mut leader = Operator::start_with(&world, &timing);
    let deadline = Instant::now() + TIMEOUT;
    while world.lease_holder().await.as_deref() != Some(&format!("{}-operator", world.name())) {
        assert!(
            Instant::now() < deadline,
            "the first replica never led:\n{}",
            leader.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut standby_arguments = timing.to_vec();
    standby_arguments.extend(["--identity".to_owned(), "standby".to_owned()]);
    let standby = Operator::start_with(&world, &standby_arguments);
    let port = standby.probe_port().await;
    // The standby is ready (it would serve webhooks) but does not lead.
    assert_eq!(http_get(port, "/readyz").0, 200);
    assert!(http_get(port, "/metrics").1.contains("paddock_operator_leader 0"));
    leader.kill();
    let killed = Instant::now();
    world
        .create(
            &virtual_machine_apps(),
            app("after", "registry.paddock.test/vms/disk:1", "Halted"),
        )
        .await;
    world
        .wait(
            &virtual_machines(),
            "after",
            "created by the standby",
            &standby,
            |object| object.is_some(),
        )
        .await;
    assert_eq!(world.lease_holder().await.as_deref(), Some("standby"));
    eprintln!("standby took over and reconciled within {:?}", killed.elapsed());
    assert!(http_get(port, "/metrics").1.contains("paddock_operator_leader 1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_binary_serves_the_admission_webhooks_for_its_namespace() {
    let Some(world) = World::new("op-webhooks").await else {
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let configuration = format!("paddock-{}", world.name());
    let operator = Operator::start_with(
        &world,
        &[
            "--webhook-url".to_owned(),
            format!("https://127.0.0.1:{port}"),
            "--webhook-listen".to_owned(),
            format!("127.0.0.1:{port}"),
            "--webhook-configuration-name".to_owned(),
            configuration.clone(),
        ],
    );
    let configurations: Api<k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration> =
        Api::all(world.client.clone());
    let invalid = json!({
        "apiVersion": "paddock.dev/v1alpha1",
        "kind": "VirtualMachineApp",
        "metadata": {"name": "broken"},
        "spec": {"image": {"pvc": {"name": ""}, "persistent": false}},
    });
    let invalid: DynamicObject = serde_json::from_value(invalid).unwrap();
    // The configuration appears once the operator has its certificate; the API server may need a
    // moment more to use it, so retry until the webhook answers.
    let deadline = Instant::now() + TIMEOUT;
    let message = loop {
        let registered = configurations.get_opt(&configuration).await.unwrap().is_some();
        if registered {
            match world
                .api(&virtual_machine_apps())
                .create(&PostParams::default(), &invalid)
                .await
            {
                Err(kube::Error::Api(status)) if status.message.contains("PersistentVolumeClaim") => {
                    break status.message;
                }
                Ok(_) => {
                    world
                        .api(&virtual_machine_apps())
                        .delete("broken", &DeleteParams::default())
                        .await
                        .unwrap();
                }
                Err(_) => {}
            }
        }
        assert!(
            Instant::now() < deadline,
            "the webhook never denied the app:\n{}",
            operator.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(
        message.contains("the PersistentVolumeClaim name is empty"),
        "{message}"
    );
    // A valid app in the same namespace is admitted.
    world
        .create(
            &virtual_machine_apps(),
            app("fine", "registry.paddock.test/vms/disk:1", "Halted"),
        )
        .await;
    drop(operator);
    let mutating: Api<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration> =
        Api::all(world.client.clone());
    let _ = configurations
        .delete(&configuration, &DeleteParams::default())
        .await;
    let _ = mutating.delete(&configuration, &DeleteParams::default()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scheduled_snapshots_are_taken_on_time_and_pruned_beyond_keep() {
    let Some(world) = World::new("op-snapshots").await else {
        return;
    };
    let operator = Operator::start(&world);
    let created = world
        .create(
            &virtual_machine_apps(),
            json!({
                "apiVersion": "paddock.dev/v1alpha1",
                "kind": "VirtualMachineApp",
                "metadata": {"name": "snappy"},
                "spec": {
                    "image": {"containerDisk": "registry.paddock.test/vms/disk:1", "persistent": false},
                    "runStrategy": "Halted",
                    "snapshots": {"schedule": "* * * * *", "keep": 2},
                },
            }),
        )
        .await;
    let uid = created["metadata"]["uid"].as_str().unwrap().to_owned();
    // Three older scheduled snapshots, as an earlier run of the schedule left them.
    for (index, hours) in [3, 2, 1].into_iter().enumerate() {
        let at = k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_hours(hours);
        world
            .create(
                &virtual_machine_snapshots(),
                json!({
                    "apiVersion": "snapshot.kubevirt.io/v1beta1",
                    "kind": "VirtualMachineSnapshot",
                    "metadata": {
                        "name": format!("snappy-old-{index}"),
                        "labels": {"app.kubernetes.io/managed-by": "paddock", "paddock.dev/app": "snappy",
                                   "paddock.dev/scheduled-snapshot": "true"},
                        "annotations": {"paddock.dev/scheduled-at": at.to_string()},
                        "ownerReferences": [{"apiVersion": "paddock.dev/v1alpha1", "kind": "VirtualMachineApp",
                                             "name": "snappy", "uid": uid, "controller": true}],
                    },
                    "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "snappy"}},
                }),
            )
            .await;
    }
    // Within a minute (the schedule fires every minute) a new snapshot appears, the two oldest go.
    let deadline = Instant::now() + Duration::from_secs(100);
    let names = loop {
        let mut names: Vec<String> = world
            .list(&virtual_machine_snapshots(), "paddock.dev/app=snappy")
            .await
            .iter()
            .filter(|snapshot| snapshot["metadata"]["deletionTimestamp"].is_null())
            .map(|snapshot| snapshot["metadata"]["name"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        let fresh = names
            .iter()
            .filter(|name| !name.starts_with("snappy-old-"))
            .count();
        if fresh >= 1 && names.len() == 2 {
            break names;
        }
        assert!(
            Instant::now() < deadline,
            "snapshots: {names:?}\noperator log:\n{}",
            operator.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(names.contains(&"snappy-old-2".to_owned()), "{names:?}");
    let fresh = names
        .iter()
        .find(|name| !name.starts_with("snappy-old-"))
        .unwrap();
    assert!(fresh.starts_with("snappy-2"), "{fresh}");
    world
        .wait(
            &virtual_machine_snapshots(),
            fresh,
            "Succeeded",
            &operator,
            |object| text(object, "/status/phase") == Some("Succeeded"),
        )
        .await;
    let app_status = world
        .wait(
            &virtual_machine_apps(),
            "snappy",
            "SnapshotsHealthy",
            &operator,
            |object| {
                object
                    .and_then(|o| condition(o, "SnapshotsHealthy"))
                    .is_some_and(|c| c["status"] == "True")
            },
        )
        .await
        .unwrap();
    assert_eq!(text(Some(&app_status), "/status/phase"), Some("Stopped"));
}

/// A pseudo-random delay in `0..max_millis` (no RNG crate here: the clock's nanoseconds hashed).
fn random_millis(max_millis: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    hasher.finish() % max_millis
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_reconciles_twenty_times_converges_without_duplicates() {
    let Some(world) = World::new("op-kill").await else {
        return;
    };
    let directory = tempfile::tempdir().unwrap();
    let (_registry, reference) = packaged_image(&world, directory.path()).await;
    let mut operator = Operator::start(&world);
    const APPS: usize = 20;
    let names: Vec<String> = (0..APPS).map(|index| format!("vm{index:02}")).collect();
    for (index, name) in names.iter().enumerate() {
        let strategy = if index % 2 == 0 { "Always" } else { "Halted" };
        world
            .create(&virtual_machine_apps(), app(name, &reference, strategy))
            .await;
    }
    let started = Instant::now();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(200 + random_millis(1300))).await;
        operator.kill();
        operator.spawn(&world);
    }
    let killed_for = started.elapsed();
    let converging = Instant::now();

    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let statuses = world.list(&virtual_machine_apps(), "").await;
        let converged = statuses.len() == APPS
            && statuses.iter().all(|app| {
                let expected = if app["spec"]["runStrategy"] == "Always" {
                    "Running"
                } else {
                    "Stopped"
                };
                text(Some(app), "/status/phase") == Some(expected)
                    && text(Some(app), "/status/importProgress").is_some_and(|p| p.starts_with("100"))
            });
        if converged {
            eprintln!(
                "{APPS} apps converged {:?} after the last of 20 kills ({killed_for:?} of kills)",
                converging.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not converged after {killed_for:?} of kills: {:?}\noperator log:\n{}",
            statuses
                .iter()
                .map(|app| (app["metadata"]["name"].clone(), app["status"]["phase"].clone()))
                .collect::<Vec<_>>(),
            operator.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for resource in [data_volumes(), virtual_machines(), baffles_applications()] {
        let children = world
            .list(&resource, "app.kubernetes.io/managed-by=paddock")
            .await;
        assert_eq!(children.len(), APPS, "{} count", resource.kind);
        for name in &names {
            let owned: Vec<&Value> = children
                .iter()
                .filter(|child| child["metadata"]["labels"]["paddock.dev/app"] == json!(name))
                .collect();
            assert_eq!(owned.len(), 1, "{} of {name}", resource.kind);
            assert_eq!(
                owned[0]["metadata"]["ownerReferences"].as_array().unwrap().len(),
                1,
                "{} of {name} has one owner",
                resource.kind
            );
        }
    }
    // Halted apps have no VMI; running ones exactly one.
    let instances = world.list(&virtual_machine_instances(), "").await;
    assert_eq!(instances.len(), APPS / 2);
}

/// The sum of the operator's `family` samples whose labels contain `labels`, from `/metrics`.
fn metric_sum(port: u16, family: &str, labels: &str) -> f64 {
    http_get(port, "/metrics")
        .1
        .lines()
        .filter(|line| line.starts_with(family) && line.contains(labels))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn writes(port: u16) -> f64 {
    metric_sum(port, "paddock_operator_writes_total", "")
}

fn app_reconciles(port: u16) -> f64 {
    metric_sum(
        port,
        "paddock_operator_reconciles_total",
        "controller=\"virtualmachineapp\"",
    )
}

/// Waits until the operator has sent no write for `quiet` (the reconciles its own writes trigger are
/// done), returning the write count.
async fn settled_writes(port: u16, quiet: Duration, operator: &Operator) -> f64 {
    let deadline = Instant::now() + TIMEOUT;
    let mut last = writes(port);
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = writes(port);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the operator never stopped writing:\n{}",
            operator.log()
        );
    }
}

/// The parts of a child a write would change: its resourceVersion and managedFields.
fn write_marks(object: &Value) -> (Value, Value) {
    (
        object["metadata"]["resourceVersion"].clone(),
        object["metadata"]["managedFields"].clone(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unchanged_app_costs_no_writes_and_a_changed_or_edited_child_is_repaired() {
    let Some(world) = World::new("op-writes").await else {
        return;
    };
    let operator = Operator::start(&world);
    world
        .create(
            &virtual_machine_apps(),
            json!({
                "apiVersion": "paddock.dev/v1alpha1",
                "kind": "VirtualMachineApp",
                "metadata": {"name": "quiet"},
                "spec": {
                    "displayName": "Quiet",
                    "image": {"containerDisk": "registry.paddock.test/vms/disk:1", "persistent": false},
                    "cloudInit": {"sshKeys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop"]},
                    "runStrategy": "Halted",
                },
            }),
        )
        .await;
    world
        .wait(
            &virtual_machine_apps(),
            "quiet",
            "Stopped and listed",
            &operator,
            |object| {
                text(object, "/status/phase") == Some("Stopped")
                    && object
                        .and_then(|o| condition(o, "BafflesRegistered"))
                        .is_some_and(|c| c["status"] == "True")
            },
        )
        .await;
    let port = operator.probe_port().await;
    let secrets = kube::api::ApiResource::erase::<k8s_openapi::api::core::v1::Secret>(&());
    let children = [
        (virtual_machines(), "quiet"),
        (baffles_applications(), "quiet"),
        (secrets, "quiet-ssh-keys"),
    ];
    let writes_before = settled_writes(port, Duration::from_secs(3), &operator).await;
    let mut marks_before = Vec::new();
    for (resource, name) in &children {
        let child = world.get(resource, name).await.unwrap();
        assert!(
            child["metadata"]["annotations"]["paddock.dev/desired-hash"].is_string(),
            "{} {name} carries the hash of what was applied",
            resource.kind
        );
        marks_before.push(write_marks(&child));
    }

    // A forced requeue of the unchanged app (an annotation is a watch event, not a spec change):
    // the app is reconciled, nothing is written.
    let reconciles_before = app_reconciles(port);
    let skipped_before = metric_sum(port, "paddock_operator_applies_skipped_total", "");
    world
        .merge(
            &virtual_machine_apps(),
            "quiet",
            json!({"metadata": {"annotations": {"test.paddock.dev/poke": "1"}}}),
        )
        .await;
    let deadline = Instant::now() + TIMEOUT;
    while app_reconciles(port) <= reconciles_before {
        assert!(
            Instant::now() < deadline,
            "no reconcile after the poke:\n{}",
            operator.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give any write that reconcile would send the time to be counted.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        writes(port),
        writes_before,
        "an unchanged app was written:\n{}",
        operator.log()
    );
    assert!(
        metric_sum(port, "paddock_operator_applies_skipped_total", "") >= skipped_before + 3.0,
        "the VM, the listing and the Secret were checked and skipped"
    );
    for ((resource, name), before) in children.iter().zip(&marks_before) {
        let child = world.get(resource, name).await.unwrap();
        assert_eq!(
            &write_marks(&child),
            before,
            "{} {name} was written",
            resource.kind
        );
    }

    // A changed spec reaches the children it concerns.
    world
        .merge(
            &virtual_machine_apps(),
            "quiet",
            json!({"spec": {"displayName": "Quieter"}}),
        )
        .await;
    world
        .wait(&baffles_applications(), "quiet", "renamed", &operator, |object| {
            text(object, "/spec/displayName") == Some("Quieter")
        })
        .await;
    world
        .wait(&virtual_machines(), "quiet", "renamed", &operator, |object| {
            text(object, "/metadata/annotations/paddock.dev~1display-name") == Some("Quieter")
        })
        .await;
    assert!(writes(port) > writes_before);

    // One edited by someone else is set back.
    world
        .merge(
            &baffles_applications(),
            "quiet",
            json!({"spec": {"url": "wss://somewhere.else/vnc"}}),
        )
        .await;
    world
        .wait(
            &baffles_applications(),
            "quiet",
            "repaired",
            &operator,
            |object| text(object, "/spec/url") == Some(console_url(world.name(), "quiet").as_str()),
        )
        .await;
}

/// A deleted child is created again at once: the children's shared reflector streams dispatch
/// no deletions, so the operator maps a deleted child to its owning app itself.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_child_is_created_again() {
    let Some(world) = World::new("op-deleted").await else {
        return;
    };
    let operator = Operator::start(&world);
    world
        .create(
            &virtual_machine_apps(),
            app("quiet", "registry.paddock.test/vms/disk:1", "Halted"),
        )
        .await;
    for resource in [baffles_applications(), virtual_machines()] {
        let child = world
            .wait(&resource, "quiet", "present", &operator, |object| {
                object.is_some()
            })
            .await
            .unwrap();
        world
            .api(&resource)
            .delete("quiet", &DeleteParams::default())
            .await
            .unwrap();
        let started = Instant::now();
        world
            .wait(&resource, "quiet", "re-created", &operator, |object| {
                object.is_some_and(|o| o["metadata"]["uid"] != child["metadata"]["uid"])
            })
            .await;
        // Far below the periodic reconcile (minutes): the deletion itself triggered it.
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{} re-created only after {:?}",
            resource.kind,
            started.elapsed()
        );
    }
}

/// Pushes a complete paddock backup of VM `namespace/name` taken at `created` (RFC 3339) to
/// `repository`, as an earlier run of a schedule (or `paddock backup create`) left it.
async fn seed_backup(directory: &Path, repository: &str, namespace: &str, name: &str, created: &str) {
    let disk = directory.join(format!("seed-{name}-{created}.qcow2"));
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("16M"));
    let definition: paddock_api::app::VirtualMachineApp = serde_json::from_value(json!({
        "apiVersion": "paddock.dev/v1alpha1",
        "kind": "VirtualMachineApp",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"image": {"containerDisk": "restore-sets-this"}, "disk": {"size": "1Gi"}},
    }))
    .unwrap();
    let tag_form: String = created.chars().filter(|c| *c != '-' && *c != ':').collect();
    let tag = paddock_oci::backup::backup_tag(name, &tag_form);
    let info = paddock_oci::backup::BackupInfo {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        created: created.to_owned(),
        disk_virtual_size: 16 << 20,
        definition,
    };
    let layout = directory.join(format!("seed-{tag}.oci"));
    let reference = format!("{repository}:{tag}");
    let options = paddock_oci::ImageOptions {
        tag: tag.clone(),
        reference: Some(reference.clone()),
        ..paddock_oci::ImageOptions::default()
    };
    paddock_oci::backup::build_backup_layout(&disk, &layout, &info, &options, &mut paddock_oci::NoProgress)
        .unwrap();
    paddock_oci::push(
        &layout,
        &reference,
        &paddock_oci::PushOptions {
            registry: registry_options(directory),
            ..paddock_oci::PushOptions::default()
        },
        &paddock_oci::NoTransferProgress,
    )
    .await
    .unwrap();
}

/// Plain HTTP to a loopback registry, with an empty docker config (never the machine's own).
fn registry_options(directory: &Path) -> paddock_oci::RegistryOptions {
    let config = directory.join("docker-config");
    std::fs::create_dir_all(&config).unwrap();
    paddock_oci::RegistryOptions {
        insecure: true,
        credentials: None,
        docker_config_dir: Some(config),
    }
}

/// `(tag, namespace/name)` of the complete backups in `repository`, oldest first.
async fn backups_in(directory: &Path, repository: &str) -> Vec<(String, String)> {
    paddock_oci::backup::list_backups(repository, &registry_options(directory))
        .await
        .unwrap()
        .into_iter()
        .map(|entry| (entry.tag, format!("{}/{}", entry.info.namespace, entry.info.name)))
        .collect()
}

/// `(type, reason, note)` of the Events about `name`, oldest first.
async fn events_about(world: &World, name: &str) -> Vec<(String, String, String)> {
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(world.client.clone(), world.name());
    let mut listed: Vec<_> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|event| {
            event
                .regarding
                .as_ref()
                .and_then(|regarding| regarding.name.as_deref())
                == Some(name)
        })
        .collect();
    listed.sort_by_key(|event| event.metadata.creation_timestamp.clone().map(|time| time.0));
    listed
        .into_iter()
        .map(|event| {
            (
                event.type_.unwrap_or_default(),
                event.reason.unwrap_or_default(),
                event.note.unwrap_or_default(),
            )
        })
        .collect()
}

/// Waits (up to `timeout`) until the app's status satisfies `done`.
async fn wait_for_app(
    world: &World,
    name: &str,
    what: &str,
    operator: &Operator,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let app = world.get(&virtual_machine_apps(), name).await.unwrap();
        if done(&app) {
            return app;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; app:\n{}\noperator log:\n{}",
            serde_json::to_string_pretty(&app).unwrap(),
            operator.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A halted app with `backup` whose disk is imported (so the export can read it).
async fn imported_app_with_backup(
    world: &World,
    name: &str,
    reference: &str,
    backup: Value,
    operator: &Operator,
) {
    let mut object = app(name, reference, "Halted");
    object["spec"]["backup"] = backup;
    world.create(&virtual_machine_apps(), object).await;
    world
        .wait(
            &data_volumes(),
            &format!("{name}-disk"),
            "Succeeded",
            operator,
            |dv| text(dv, "/status/phase") == Some("Succeeded"),
        )
        .await;
}

fn backup_operator_arguments(scratch: &Path) -> Vec<String> {
    vec![
        // The simulator serves only the export proxy's (external) links.
        "--backup-export-link".to_owned(),
        "external".to_owned(),
        "--backup-tick-seconds".to_owned(),
        "1".to_owned(),
        "--backup-scratch-directory".to_owned(),
        scratch.display().to_string(),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn scheduled_backups_are_pushed_on_time_recorded_and_pruned_beyond_keep() {
    let Some(world) = World::new("op-backups").await else {
        return;
    };
    let directory = tempfile::tempdir().unwrap();
    let (registry, reference) = packaged_image(&world, directory.path()).await;
    let repository = format!("{}/backups/{}", registry.address(), world.name());
    // Two older backups of this VM and one of another VM in the same repository.
    seed_backup(
        directory.path(),
        &repository,
        world.name(),
        "saved",
        "2026-01-01T02:00:00Z",
    )
    .await;
    seed_backup(
        directory.path(),
        &repository,
        world.name(),
        "saved",
        "2026-01-02T02:00:00Z",
    )
    .await;
    seed_backup(
        directory.path(),
        &repository,
        world.name(),
        "other",
        "2025-12-01T02:00:00Z",
    )
    .await;
    let scratch = tempfile::tempdir().unwrap();
    let operator = Operator::start_with(&world, &backup_operator_arguments(scratch.path()));
    imported_app_with_backup(
        &world,
        "saved",
        &reference,
        json!({"schedule": "* * * * *", "keep": 2, "repository": repository, "insecure": true}),
        &operator,
    )
    .await;
    let created = world.get(&virtual_machine_apps(), "saved").await.unwrap();
    let created_at: k8s_openapi::jiff::Timestamp = text(Some(&created), "/metadata/creationTimestamp")
        .unwrap()
        .parse()
        .unwrap();

    // The schedule fires every minute: within a minute (and the backup's time) the first backup is
    // recorded, for the first minute after the app existed.
    let app = wait_for_app(
        &world,
        "saved",
        "a scheduled backup",
        &operator,
        Duration::from_secs(180),
        |app| app.pointer("/status/backup/lastBackup/reference").is_some(),
    )
    .await;
    let status = &app["status"]["backup"];
    let scheduled: k8s_openapi::jiff::Timestamp =
        status["lastScheduleTime"].as_str().unwrap().parse().unwrap();
    assert!(scheduled > created_at, "{status}");
    assert_eq!(scheduled.as_second() % 60, 0, "{status}");
    let next: k8s_openapi::jiff::Timestamp = status["nextScheduleTime"].as_str().unwrap().parse().unwrap();
    assert!(next > scheduled && next.as_second() % 60 == 0, "{status}");
    let pinned = status["lastBackup"]["reference"].as_str().unwrap().to_owned();
    assert!(pinned.starts_with(&format!("{repository}@sha256:")), "{pinned}");
    let condition = condition(&app, "BackupSucceeded").unwrap();
    assert_eq!(condition["status"], "True", "{condition}");
    assert_eq!(condition["reason"], "BackupCompleted", "{condition}");
    assert!(
        condition["message"].as_str().unwrap().contains(&pinned),
        "{condition}"
    );

    // Retention: keep 2 of this VM's backups (the older seeded one went), the other VM's stay.
    let listed = backups_in(directory.path(), &repository).await;
    let own: Vec<&str> = listed
        .iter()
        .filter(|(_, vm)| vm.ends_with("/saved"))
        .map(|(tag, _)| tag.as_str())
        .collect();
    let last_tag = status["lastBackup"]["tag"].as_str().unwrap();
    assert_eq!(own, ["saved-20260102T020000Z", last_tag], "{listed:?}");
    assert!(
        listed.iter().any(|(tag, _)| tag == "other-20251201T020000Z"),
        "{listed:?}"
    );
    let pulled = paddock_oci::backup::inspect_backup(&pinned, &registry_options(directory.path()))
        .await
        .unwrap();
    assert_eq!(pulled.info.name, "saved");
    assert_eq!(pulled.info.definition.spec.backup.as_ref().unwrap().keep, 2);

    let events = events_about(&world, "saved").await;
    let reasons: Vec<&str> = events.iter().map(|(_, reason, _)| reason.as_str()).collect();
    for expected in ["BackupStarted", "BackupCompleted", "BackupsPruned"] {
        assert!(reasons.contains(&expected), "{events:?}");
    }
    let pruned = events
        .iter()
        .find(|(_, reason, _)| reason == "BackupsPruned")
        .unwrap();
    assert!(pruned.2.contains("saved-20260101T020000Z"), "{pruned:?}");

    // "Back up now", with the schedule suspended (so no scheduled backup interferes): a new
    // annotation value gives one more backup at once; the oldest goes again.
    world
        .merge(
            &virtual_machine_apps(),
            "saved",
            json!({"spec": {"backup": {"suspend": true}},
                   "metadata": {"annotations": {"paddock.dev/backup-now": "first"}}}),
        )
        .await;
    let app = wait_for_app(
        &world,
        "saved",
        "the requested backup",
        &operator,
        TIMEOUT,
        |app| app.pointer("/status/backup/lastRequest").and_then(Value::as_str) == Some("first"),
    )
    .await;
    let requested = app["status"]["backup"]["lastBackup"]["tag"].as_str().unwrap();
    assert_ne!(requested, last_tag);
    let listed = backups_in(directory.path(), &repository).await;
    let own: Vec<&str> = listed
        .iter()
        .filter(|(_, vm)| vm.ends_with("/saved"))
        .map(|(tag, _)| tag.as_str())
        .collect();
    assert_eq!(own.len(), 2, "{listed:?}");
    assert_eq!(own.last(), Some(&requested), "{listed:?}");
    assert!(
        app.pointer("/status/backup/nextScheduleTime").is_none(),
        "suspended: {app}"
    );

    let port = operator.probe_port().await;
    assert!(
        metric_sum(port, "paddock_operator_backups_total", "result=\"succeeded\"") >= 2.0,
        "{}",
        http_get(port, "/metrics").1
    );
    assert!(metric_sum(port, "paddock_operator_backup_duration_seconds_count", "") >= 2.0);
    // Nothing is left behind: the exports and scratch directories are gone.
    let exports = world
        .api(&paddock_tests::world::api_resource(
            "export.kubevirt.io",
            "v1beta1",
            "VirtualMachineExport",
            "virtualmachineexports",
        ))
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(exports.items.is_empty(), "{:?}", exports.items);
    assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_backup_registry_and_one_without_deletes_are_reported() {
    let Some(world) = World::new("op-backup-fail").await else {
        return;
    };
    let directory = tempfile::tempdir().unwrap();
    let (_registry, reference) = packaged_image(&world, directory.path()).await;
    // Nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let scratch = tempfile::tempdir().unwrap();
    let operator = Operator::start_with(&world, &backup_operator_arguments(scratch.path()));
    let dead_repository = format!("{closed}/backups/broken");
    imported_app_with_backup(
        &world,
        "fragile",
        &reference,
        json!({"schedule": "0 3 1 1 *", "keep": 1, "repository": dead_repository, "insecure": true}),
        &operator,
    )
    .await;
    // Before any backup: Unknown, with the next time.
    let app = wait_for_app(
        &world,
        "fragile",
        "the first-backup condition",
        &operator,
        TIMEOUT,
        |app| condition(app, "BackupSucceeded").is_some(),
    )
    .await;
    assert_eq!(
        condition(&app, "BackupSucceeded").unwrap()["reason"],
        "NoBackupYet"
    );
    assert!(app.pointer("/status/backup/nextScheduleTime").is_some(), "{app}");

    world
        .merge(
            &virtual_machine_apps(),
            "fragile",
            json!({"metadata": {"annotations": {"paddock.dev/backup-now": "1"}}}),
        )
        .await;
    let app = wait_for_app(
        &world,
        "fragile",
        "the failed backup",
        &operator,
        TIMEOUT,
        |app| app.pointer("/status/backup/lastRequest").and_then(Value::as_str) == Some("1"),
    )
    .await;
    let condition_value = condition(&app, "BackupSucceeded").unwrap();
    assert_eq!(condition_value["status"], "False", "{condition_value}");
    assert_eq!(condition_value["reason"], "BackupFailed", "{condition_value}");
    let message = condition_value["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("cannot reach registry {closed}")),
        "{message}"
    );
    assert!(message.contains("paddock.dev/backup-now"), "{message}");
    assert_eq!(app["status"]["backup"]["lastFailure"]["message"], message);
    assert!(app.pointer("/status/backup/lastBackup").is_none(), "{app}");
    let events = events_about(&world, "fragile").await;
    assert!(
        events
            .iter()
            .any(|(kind, reason, note)| kind == "Warning" && reason == "BackupFailed" && note == message),
        "{events:?}"
    );
    // The app controller's own conditions are untouched by the backup scheduler's, and vice versa.
    assert!(condition(&app, "DiskReady").is_some(), "{app}");

    // A registry that refuses deletes: the backup succeeds, pruning is reported as not possible.
    let refusing = Registry::start_without_deletes(RegistryAuth::None).unwrap();
    let repository = format!("{}/backups/fragile", refusing.address());
    seed_backup(
        directory.path(),
        &repository,
        world.name(),
        "fragile",
        "2026-01-01T02:00:00Z",
    )
    .await;
    world
        .merge(
            &virtual_machine_apps(),
            "fragile",
            json!({"spec": {"backup": {"repository": repository}},
                   "metadata": {"annotations": {"paddock.dev/backup-now": "2"}}}),
        )
        .await;
    let app = wait_for_app(
        &world,
        "fragile",
        "the backup without pruning",
        &operator,
        TIMEOUT,
        |app| app.pointer("/status/backup/lastRequest").and_then(Value::as_str) == Some("2"),
    )
    .await;
    let condition_value = condition(&app, "BackupSucceeded").unwrap();
    assert_eq!(condition_value["status"], "True", "{condition_value}");
    assert_eq!(
        condition_value["reason"], "PruningNotPossible",
        "{condition_value}"
    );
    assert!(
        condition_value["message"]
            .as_str()
            .unwrap()
            .contains("REGISTRY_STORAGE_DELETE_ENABLED=true"),
        "{condition_value}"
    );
    assert_eq!(backups_in(directory.path(), &repository).await.len(), 2);
    // The earlier failure stays on record.
    assert!(app.pointer("/status/backup/lastFailure").is_some(), "{app}");
    let events = events_about(&world, "fragile").await;
    assert!(
        events
            .iter()
            .any(|(kind, reason, _)| kind == "Warning" && reason == "BackupsNotPruned"),
        "{events:?}"
    );

    // Without a policy the backup status and condition go; the app controller's conditions stay.
    world
        .merge(
            &virtual_machine_apps(),
            "fragile",
            json!({"spec": {"backup": null}}),
        )
        .await;
    let app = wait_for_app(
        &world,
        "fragile",
        "the backup status to go",
        &operator,
        TIMEOUT,
        |app| app.pointer("/status/backup").is_none() && condition(app, "BackupSucceeded").is_none(),
    )
    .await;
    assert!(condition(&app, "DiskReady").is_some(), "{app}");
}
