//! The simulated KubeVirt and CDI controllers (`tests/simulator-controllers`) on the real control
//! plane: the shared cluster's `kubevirt-simulator` runs them, these tests only create objects and
//! watch what the controllers write (so no second set of controllers ever runs on the cluster).
//!
//! Real parts exercised: kube-apiserver (schemas, status subresources, owner references, garbage
//! collection), Debian's docker-registry, the `paddock` CLI that packages and pushes the containerDisk,
//! `qemu-img` and `curl`.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use paddock_tests::cluster::Cluster;
use paddock_tests::registry::{Registry, RegistryAuth};
use paddock_tests::world::{
    allow_insecure_registry, api_resource, cdi_configs, data_volumes, virtual_machine_instances,
    virtual_machine_snapshots, virtual_machines,
};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(90);

fn snapshot_contents() -> ApiResource {
    api_resource(
        "snapshot.kubevirt.io",
        "v1beta1",
        "VirtualMachineSnapshotContent",
        "virtualmachinesnapshotcontents",
    )
}
fn restores() -> ApiResource {
    api_resource(
        "snapshot.kubevirt.io",
        "v1beta1",
        "VirtualMachineRestore",
        "virtualmachinerestores",
    )
}
fn exports() -> ApiResource {
    api_resource(
        "export.kubevirt.io",
        "v1beta1",
        "VirtualMachineExport",
        "virtualmachineexports",
    )
}
fn clones() -> ApiResource {
    api_resource(
        "clone.kubevirt.io",
        "v1beta1",
        "VirtualMachineClone",
        "virtualmachineclones",
    )
}

struct World {
    cluster: &'static Cluster,
    client: kube::Client,
    namespace: paddock_tests::cluster::TestNamespace,
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

    fn api(&self, resource: &ApiResource) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), self.namespace.name(), resource)
    }

    async fn create(&self, resource: &ApiResource, object: Value) -> DynamicObject {
        let object: DynamicObject = serde_json::from_value(object).unwrap();
        self.api(resource)
            .create(&PostParams::default(), &object)
            .await
            .unwrap_or_else(|error| panic!("create {:?}: {error}", object.metadata.name))
    }

    async fn get(&self, resource: &ApiResource, name: &str) -> Option<Value> {
        self.api(resource)
            .get_opt(name)
            .await
            .unwrap()
            .map(|object| serde_json::to_value(object).unwrap())
    }

    async fn merge(&self, resource: &ApiResource, name: &str, patch: Value) {
        self.api(resource)
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .unwrap();
    }

    /// Polls `name` until its `status.phase` is `phase`, returning it.
    async fn wait_phase(&self, resource: &ApiResource, name: &str, phase: &str) -> Value {
        self.wait(resource, name, phase, |object| {
            text(object, "/status/phase") == Some(phase)
        })
        .await
        .unwrap()
    }

    /// Polls until `name` is gone.
    async fn wait_deleted(&self, resource: &ApiResource, name: &str) {
        self.wait(resource, name, "deleted", |object| object.is_none())
            .await;
    }

    /// Polls `name` until its `status.phase` is one of `final_phases`, showing every state to
    /// `inspect`; returns the last state and the distinct phases seen, in order.
    async fn phases_until(
        &self,
        resource: &ApiResource,
        name: &str,
        final_phases: &[&str],
        mut inspect: impl FnMut(&Value),
    ) -> (Value, Vec<String>) {
        let deadline = Instant::now() + TIMEOUT;
        let mut phases: Vec<String> = Vec::new();
        loop {
            let object = self.get(resource, name).await.unwrap();
            inspect(&object);
            if let Some(phase) = text(Some(&object), "/status/phase")
                && phases.last().map(String::as_str) != Some(phase)
            {
                phases.push(phase.to_owned());
            }
            if phases
                .last()
                .is_some_and(|phase| final_phases.contains(&phase.as_str()))
            {
                return (object, phases);
            }
            assert!(
                Instant::now() < deadline,
                "{} {name} never reached {final_phases:?}: {object:#}",
                resource.kind
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn secrets(&self) -> Api<k8s_openapi::api::core::v1::Secret> {
        Api::namespaced(self.client.clone(), self.namespace.name())
    }

    /// Polls `name` until `done` holds for it (or for its absence), returning the last state.
    async fn wait(
        &self,
        resource: &ApiResource,
        name: &str,
        what: &str,
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
                "timed out waiting for {} {name} to be {what}; last state:\n{}",
                resource.kind,
                serde_json::to_string_pretty(&object).unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn text<'a>(object: Option<&'a Value>, pointer: &str) -> Option<&'a str> {
    object?.pointer(pointer)?.as_str()
}

fn condition<'a>(object: &'a Value, kind: &str) -> &'a Value {
    object
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|conditions| conditions.iter().find(|condition| condition["type"] == kind))
        .unwrap_or_else(|| panic!("no {kind} condition in {object:#}"))
}

fn run(command: &mut Command) -> String {
    paddock_tests::world::run(command).unwrap()
}

fn paddock_binary() -> &'static Path {
    paddock_tests::world::paddock_binary().unwrap()
}

fn qemu_img(arguments: &[&str]) -> String {
    run(Command::new("qemu-img").args(arguments))
}

async fn allow_insecure(world: &World, registry: &str) {
    allow_insecure_registry(&world.client, registry, TIMEOUT)
        .await
        .unwrap();
}

/// A 1Gi DataVolume `name` filled from `source` (CDI's `spec.source`).
fn data_volume(name: &str, source: Value) -> Value {
    json!({
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": name},
        "spec": {
            "source": source,
            "storage": {"resources": {"requests": {"storage": "1Gi"}}},
        },
    })
}

fn registry_data_volume(name: &str, url: &str) -> Value {
    data_volume(name, json!({"registry": {"url": url}}))
}

/// Polls a DataVolume until Succeeded or Failed; returns it and the phases seen, checking on the way
/// that every `progress` seen is CDI's "N.NN%" and never goes down.
async fn wait_final(world: &World, name: &str) -> (Value, Vec<String>) {
    let mut last_progress = 0.0_f64;
    world
        .phases_until(&data_volumes(), name, &["Succeeded", "Failed"], |data_volume| {
            if let Some(progress) = text(Some(data_volume), "/status/progress") {
                let percent: f64 = progress
                    .strip_suffix('%')
                    .and_then(|number| number.parse().ok())
                    .unwrap_or_else(|| panic!("progress {progress:?} is not N.NN%"));
                assert!(
                    (0.0..=100.0).contains(&percent) && percent >= last_progress,
                    "progress went from {last_progress} to {progress}"
                );
                last_progress = percent;
            }
        })
        .await
}

/// Creates DataVolume `name` importing `reference` from a registry and waits until it is final, as
/// [`wait_final`].
async fn import(world: &World, name: &str, reference: &str) -> (Value, Vec<String>) {
    world
        .create(
            &data_volumes(),
            registry_data_volume(name, &format!("docker://{reference}")),
        )
        .await;
    wait_final(world, name).await
}

/// Where the simulated importer or upload put a DataVolume's disk.
fn disk_path(data_volume: &Value) -> Option<&str> {
    text(
        Some(data_volume),
        "/metadata/annotations/simulator.paddock.dev~1disk-path",
    )
}

/// Asserts that `phases` (distinct, as seen) follow `order` and hold nothing else.
fn assert_in_order(phases: &[String], order: &[&str]) {
    let positions: Vec<usize> = phases
        .iter()
        .map(|phase| {
            order
                .iter()
                .position(|known| known == phase)
                .unwrap_or_else(|| panic!("unexpected phase {phase}"))
        })
        .collect();
    assert!(
        positions.windows(2).all(|pair| pair[0] < pair[1]),
        "phases out of order: {phases:?}"
    );
}

/// `paddock package disk --image reference --output layout`.
fn package(disk: &Path, reference: &str, layout: &Path) {
    run(Command::new(paddock_binary())
        .arg("package")
        .arg(disk)
        .args(["--image", reference, "--output"])
        .arg(layout));
}

/// `paddock push layout reference --insecure`.
fn push_insecure(layout: &Path, reference: &str) {
    run(Command::new(paddock_binary())
        .arg("push")
        .arg(layout)
        .arg(reference)
        .arg("--insecure"));
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_import_of_a_paddock_packaged_disk_succeeds_with_full_progress() {
    let Some(world) = World::new("kvc-import").await else {
        return;
    };
    let registry = Registry::start(RegistryAuth::None).unwrap();
    allow_insecure(&world, registry.address()).await;
    let directory = tempfile::tempdir().unwrap();
    let disk = directory.path().join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "64M"]);
    let layout = directory.path().join("disk.oci");
    let reference = format!("{}/vms/disk:1", registry.address());
    package(&disk, &reference, &layout);
    push_insecure(&layout, &reference);

    let (data_volume, phases) = import(&world, "imported", &reference).await;
    assert_eq!(
        text(Some(&data_volume), "/status/phase"),
        Some("Succeeded"),
        "{data_volume:#}"
    );
    assert_eq!(text(Some(&data_volume), "/status/progress"), Some("100.0%"));
    assert_in_order(&phases, &["ImportScheduled", "ImportInProgress", "Succeeded"]);
    assert_eq!(condition(&data_volume, "Ready")["status"], "True");
    assert_eq!(condition(&data_volume, "Running")["reason"], "Completed");
    assert_eq!(data_volume["status"]["restartCount"], 0);
    // The imported disk is where the annotation says, and it is the qcow2 that was packaged.
    let path = disk_path(&data_volume).unwrap();
    let info: Value = serde_json::from_str(&qemu_img(&["info", "--output=json", path])).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 64 * 1024 * 1024);
}

/// An OCI layout whose single containerDisk layer holds `disk` as `disk/disk.img`, made with GNU tar
/// and sha256sum (paddock package refuses disks with a backing file, so it cannot build this one).
fn hand_built_layout(disk: &Path, layout: &Path) {
    let staging = layout.with_extension("staging");
    std::fs::create_dir_all(staging.join("disk")).unwrap();
    std::fs::copy(disk, staging.join("disk/disk.img")).unwrap();
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let layer = layout.join("layer.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&staging)
        .args([
            "--owner=107",
            "--group=107",
            "--numeric-owner",
            "--mode=a=rX",
            "-cf",
        ])
        .arg(&layer)
        .arg("disk"));
    let store = |path: &Path| -> (String, u64) {
        let digest = run(Command::new("sha256sum").arg(path))
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned();
        let size = std::fs::metadata(path).unwrap().len();
        std::fs::rename(path, blobs.join(&digest)).unwrap();
        (format!("sha256:{digest}"), size)
    };
    let (layer_digest, layer_size) = store(&layer);
    let config = layout.join("config.json");
    std::fs::write(
        &config,
        json!({"architecture": "amd64", "os": "linux", "config": {},
               "rootfs": {"type": "layers", "diff_ids": [layer_digest]}})
        .to_string(),
    )
    .unwrap();
    let (config_digest, config_size) = store(&config);
    let manifest = layout.join("manifest.json");
    std::fs::write(
        &manifest,
        json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
               "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
               "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}]})
        .to_string(),
    )
    .unwrap();
    let (manifest_digest, manifest_size) = store(&manifest);
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        layout.join("index.json"),
        json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
               "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                              "digest": manifest_digest, "size": manifest_size,
                              "annotations": {"org.opencontainers.image.ref.name": "1"}}]})
        .to_string(),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_import_of_a_qcow2_with_a_backing_file_fails_with_a_clear_message() {
    let Some(world) = World::new("kvc-backing").await else {
        return;
    };
    let registry = Registry::start(RegistryAuth::None).unwrap();
    allow_insecure(&world, registry.address()).await;
    let directory = tempfile::tempdir().unwrap();
    let base = directory.path().join("base.qcow2");
    let overlay = directory.path().join("overlay.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "64M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        overlay.to_str().unwrap(),
    ]);
    // paddock itself refuses such a disk: that is why the layout is built by hand.
    let refused = Command::new(paddock_binary())
        .arg("package")
        .arg(&overlay)
        .arg("--output")
        .arg(directory.path().join("refused.oci"))
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "paddock package accepted a disk with a backing file"
    );
    let layout = directory.path().join("overlay.oci");
    hand_built_layout(&overlay, &layout);
    let reference = format!("{}/vms/overlay:1", registry.address());
    push_insecure(&layout, &reference);

    let (data_volume, _) = import(&world, "overlay", &reference).await;
    assert_eq!(
        text(Some(&data_volume), "/status/phase"),
        Some("Failed"),
        "{data_volume:#}"
    );
    let running = condition(&data_volume, "Running");
    assert_eq!(running["status"], "False");
    assert_eq!(running["reason"], "Error");
    let message = running["message"].as_str().unwrap();
    assert!(message.starts_with("Unable to process data: "), "{message}");
    assert!(
        message.contains("backing file") && message.contains(base.to_str().unwrap()),
        "{message}"
    );
    assert_eq!(condition(&data_volume, "Ready")["status"], "False");
    assert!(disk_path(&data_volume).is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_through_the_proxy_with_an_upload_token_succeeds() {
    let Some(world) = World::new("kvc-upload").await else {
        return;
    };
    world
        .create(&data_volumes(), data_volume("uploaded", json!({"upload": {}})))
        .await;
    world.wait_phase(&data_volumes(), "uploaded", "UploadReady").await;

    // The token comes from the aggregated upload.cdi.kubevirt.io API, through kube-apiserver.
    let request = http::Request::post(format!(
        "/apis/upload.cdi.kubevirt.io/v1beta1/namespaces/{}/uploadtokenrequests",
        world.namespace.name()
    ))
    .header("content-type", "application/json")
    .body(
        serde_json::to_vec(&json!({
            "apiVersion": "upload.cdi.kubevirt.io/v1beta1",
            "kind": "UploadTokenRequest",
            "metadata": {"name": "uploaded"},
            "spec": {"pvcName": "uploaded"},
        }))
        .unwrap(),
    )
    .unwrap();
    let answer: Value = world.client.request(request).await.unwrap();
    let token = answer["status"]["token"].as_str().unwrap().to_owned();

    let config: Api<DynamicObject> = Api::all_with(world.client.clone(), &cdi_configs());
    let proxy = config.get("config").await.unwrap().data["status"]["uploadProxyURL"]
        .as_str()
        .unwrap()
        .to_owned();
    let directory = tempfile::tempdir().unwrap();
    let disk = directory.path().join("disk.raw");
    qemu_img(&["create", "-q", "-f", "raw", disk.to_str().unwrap(), "32M"]);
    let curl = |token: &str| {
        let mut command = Command::new("curl");
        command
            .args([
                "--silent",
                "--show-error",
                "--output",
                "/dev/null",
                "--write-out",
                "%{http_code}",
                "--cacert",
            ])
            .arg(world.cluster.simulator_ca())
            .args(["-H", &format!("Authorization: Bearer {token}"), "--data-binary"])
            .arg(format!("@{}", disk.display()))
            .arg(format!("{proxy}/v1beta1/upload"));
        run(&mut command)
    };
    assert_eq!(curl("not-a-valid-token"), "401", "a forged token must be refused");
    assert_eq!(curl(&token), "200");
    let data_volume = world.wait_phase(&data_volumes(), "uploaded", "Succeeded").await;
    assert_eq!(text(Some(&data_volume), "/status/progress"), Some("100.0%"));
    let path = disk_path(&data_volume).unwrap();
    assert_eq!(std::fs::metadata(path).unwrap().len(), 32 * 1024 * 1024);
    assert_eq!(curl(&token), "503", "a finished upload must refuse a second one");
}

fn virtual_machine(name: &str, run_strategy: &str) -> Value {
    json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "runStrategy": run_strategy,
            "template": {
                "metadata": {"labels": {"kubevirt.io/vm": name}},
                "spec": {
                    "domain": {
                        "devices": {"interfaces": [{"name": "default", "masquerade": {}, "macAddress": "02:00:00:00:00:01"}]},
                        "firmware": {"uuid": "5d307ca9-b3ef-428c-8861-06e72d69f223", "serial": "serial-1"},
                        "memory": {"guest": "128Mi"},
                    },
                    "networks": [{"name": "default", "pod": {}}],
                },
            },
        },
    })
}

/// Creates [`virtual_machine`] `name` with `run_strategy` and waits until it is `printable`.
async fn create_vm(world: &World, name: &str, run_strategy: &str, printable: &str) -> Value {
    world
        .create(&virtual_machines(), virtual_machine(name, run_strategy))
        .await;
    wait_printable(world, name, printable).await
}

async fn wait_printable(world: &World, name: &str, printable: &str) -> Value {
    world
        .wait(&virtual_machines(), name, printable, |object| {
            text(object, "/status/printableStatus") == Some(printable)
        })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn run_strategies_create_and_delete_virtual_machine_instances() {
    let Some(world) = World::new("kvc-runstrategy").await else {
        return;
    };
    let vm = create_vm(&world, "always", "Always", "Running").await;
    assert_eq!(vm["status"]["ready"], true);
    assert_eq!(vm["status"]["created"], true);
    assert_eq!(vm["status"]["runStrategy"], "Always");
    assert_eq!(condition(&vm, "Ready")["status"], "True");
    let vmi = world.get(&virtual_machine_instances(), "always").await.unwrap();
    assert_eq!(vmi["status"]["phase"], "Running");
    assert_eq!(vmi["status"]["nodeName"], "paddock-simulated-node");
    assert_eq!(
        vmi["metadata"]["ownerReferences"][0]["uid"],
        vm["metadata"]["uid"]
    );
    assert_eq!(vmi["metadata"]["labels"]["kubevirt.io/vm"], "always");
    assert_eq!(vmi["spec"]["domain"]["memory"]["guest"], "128Mi");
    let phases: Vec<&str> = vmi["status"]["phaseTransitionTimestamps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|transition| transition["phase"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["Pending", "Scheduling", "Scheduled", "Running"]);

    // Halted deletes the VMI and the VM reports Stopped.
    world
        .merge(
            &virtual_machines(),
            "always",
            json!({"spec": {"runStrategy": "Halted"}}),
        )
        .await;
    world.wait_deleted(&virtual_machine_instances(), "always").await;
    let vm = wait_printable(&world, "always", "Stopped").await;
    assert_eq!(vm["status"]["created"], false);
    assert_eq!(vm["status"]["ready"], false);
    assert_eq!(condition(&vm, "Ready")["reason"], "VMINotExists");

    // Manual without a start request does nothing; Once starts one instance.
    let vm = create_vm(&world, "manual", "Manual", "Stopped").await;
    assert_eq!(vm["status"]["created"], false);
    assert!(world.get(&virtual_machine_instances(), "manual").await.is_none());
    // A start request (what virt-api's start subresource writes) starts it and is then trimmed.
    world
        .api(&virtual_machines())
        .patch_status(
            "manual",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"stateChangeRequests": [{"action": "Start"}]}})),
        )
        .await
        .unwrap();
    let vm = wait_printable(&world, "manual", "Running").await;
    assert!(
        vm["status"].get("stateChangeRequests").is_none_or(Value::is_null),
        "{vm:#}"
    );

    create_vm(&world, "once", "Once", "Running").await;
    create_vm(&world, "rerun", "RerunOnFailure", "Running").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn data_volume_templates_are_created_and_the_vm_waits_for_them() {
    let Some(world) = World::new("kvc-templates").await else {
        return;
    };
    let mut vm = virtual_machine("templated", "Always");
    vm["spec"]["dataVolumeTemplates"] = json!([
        {"metadata": {"name": "templated-blank"},
         "spec": {"source": {"blank": {}}, "storage": {"resources": {"requests": {"storage": "1Gi"}}}}},
        {"metadata": {"name": "templated-upload"},
         "spec": {"source": {"upload": {}}, "storage": {"resources": {"requests": {"storage": "1Gi"}}}}},
    ]);
    vm["spec"]["template"]["spec"]["volumes"] = json!([
        {"name": "blank", "dataVolume": {"name": "templated-blank"}},
        {"name": "upload", "dataVolume": {"name": "templated-upload"}},
    ]);
    let created = world.create(&virtual_machines(), vm).await;
    // The upload never arrives, so the VM stays Provisioning and no VMI is created.
    let vm = wait_printable(&world, "templated", "Provisioning").await;
    assert_eq!(vm["status"]["created"], false);
    for name in ["templated-blank", "templated-upload"] {
        let data_volume = world.get(&data_volumes(), name).await.unwrap();
        assert_eq!(
            data_volume["metadata"]["ownerReferences"][0]["uid"].as_str(),
            created.metadata.uid.as_deref()
        );
        assert_eq!(data_volume["metadata"]["ownerReferences"][0]["controller"], true);
    }
    world
        .wait_phase(&data_volumes(), "templated-blank", "Succeeded")
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        world
            .get(&virtual_machine_instances(), "templated")
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_then_restore_brings_the_old_spec_back() {
    let Some(world) = World::new("kvc-snapshot").await else {
        return;
    };
    create_vm(&world, "origin", "Halted", "Stopped").await;
    world
        .create(
            &virtual_machine_snapshots(),
            json!({
                "apiVersion": "snapshot.kubevirt.io/v1beta1",
                "kind": "VirtualMachineSnapshot",
                "metadata": {"name": "before"},
                "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "origin"}},
            }),
        )
        .await;
    let snapshot = world
        .wait(&virtual_machine_snapshots(), "before", "ready", |object| {
            object.and_then(|object| object.pointer("/status/readyToUse")) == Some(&json!(true))
        })
        .await
        .unwrap();
    assert_eq!(snapshot["status"]["phase"], "Succeeded");
    assert!(snapshot["status"]["creationTime"].is_string());
    assert_eq!(condition(&snapshot, "Ready")["status"], "True");
    assert_eq!(
        condition(&snapshot, "Progressing")["reason"],
        "Operation complete"
    );
    let content_name = snapshot["status"]["virtualMachineSnapshotContentName"]
        .as_str()
        .unwrap();
    let content = world.get(&snapshot_contents(), content_name).await.unwrap();
    assert_eq!(content["status"]["readyToUse"], true);
    assert_eq!(
        content["spec"]["source"]["virtualMachine"]["spec"]["template"]["spec"]["domain"]["memory"]["guest"],
        "128Mi"
    );

    world
        .merge(
            &virtual_machines(),
            "origin",
            json!({"spec": {"template": {"spec": {"domain": {"memory": {"guest": "256Mi"}}}}}}),
        )
        .await;
    world
        .create(
            &restores(),
            json!({
                "apiVersion": "snapshot.kubevirt.io/v1beta1",
                "kind": "VirtualMachineRestore",
                "metadata": {"name": "back"},
                "spec": {"target": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "origin"},
                         "virtualMachineSnapshotName": "before"},
            }),
        )
        .await;
    let restore = world
        .wait(&restores(), "back", "complete", |object| {
            object.and_then(|object| object.pointer("/status/complete")) == Some(&json!(true))
        })
        .await
        .unwrap();
    assert!(restore["status"]["restoreTime"].is_string());
    assert_eq!(condition(&restore, "Ready")["status"], "True");
    let vm = world.get(&virtual_machines(), "origin").await.unwrap();
    assert_eq!(
        vm["spec"]["template"]["spec"]["domain"]["memory"]["guest"],
        "128Mi"
    );
    assert_eq!(vm["spec"]["runStrategy"], "Halted");
    assert_eq!(
        vm["metadata"]["annotations"]["restore.kubevirt.io/lastRestoreUID"],
        format!("back-{}", restore["metadata"]["uid"].as_str().unwrap())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn export_reports_links_and_a_generated_token_secret() {
    let Some(world) = World::new("kvc-export").await else {
        return;
    };
    let mut vm = virtual_machine("exported", "Halted");
    vm["spec"]["dataVolumeTemplates"] = json!([
        {"metadata": {"name": "exported-disk"},
         "spec": {"source": {"blank": {}}, "storage": {"resources": {"requests": {"storage": "1Gi"}}}}},
    ]);
    vm["spec"]["template"]["spec"]["volumes"] =
        json!([{"name": "disk", "dataVolume": {"name": "exported-disk"}}]);
    world.create(&virtual_machines(), vm).await;
    world
        .create(
            &exports(),
            json!({
                "apiVersion": "export.kubevirt.io/v1beta1",
                "kind": "VirtualMachineExport",
                "metadata": {"name": "out"},
                "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "exported"}},
            }),
        )
        .await;
    let export = world.wait_phase(&exports(), "out", "Ready").await;
    assert_eq!(condition(&export, "Ready")["reason"], "PodReady");
    assert_eq!(export["status"]["virtualMachineName"], "exported");
    for kind in ["internal", "external"] {
        let link = &export["status"]["links"][kind];
        assert!(link["cert"].as_str().unwrap().contains("BEGIN CERTIFICATE"));
        let volume = &link["volumes"][0];
        assert_eq!(volume["name"], "exported-disk");
        let formats: Vec<&str> = volume["formats"]
            .as_array()
            .unwrap()
            .iter()
            .map(|format| format["format"].as_str().unwrap())
            .collect();
        assert_eq!(formats, ["raw", "gzip"]);
        assert!(
            volume["formats"][0]["url"]
                .as_str()
                .unwrap()
                .ends_with("/volumes/exported-disk/disk.img")
        );
        let manifests: Vec<&str> = link["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|manifest| manifest["type"].as_str().unwrap())
            .collect();
        assert_eq!(manifests, ["all", "auth-header-secret"]);
    }
    assert!(
        export["status"]["links"]["internal"]["volumes"][0]["formats"][0]["url"]
            .as_str()
            .unwrap()
            .starts_with(&format!(
                "https://virt-export-out.{}.svc/",
                world.namespace.name()
            ))
    );
    let secret_name = export["status"]["tokenSecretRef"].as_str().unwrap();
    let secrets = world.secrets();
    let secret = secrets.get(secret_name).await.unwrap();
    let token = &secret.data.unwrap()["token"].0;
    assert_eq!(token.len(), 20);
    assert!(token.iter().all(u8::is_ascii_alphanumeric));
    assert_eq!(
        secret.metadata.owner_references.unwrap()[0].uid,
        export["metadata"]["uid"].as_str().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn clone_creates_a_target_vm_with_new_identity() {
    let Some(world) = World::new("kvc-clone").await else {
        return;
    };
    create_vm(&world, "source", "Halted", "Stopped").await;
    world
        .create(
            &clones(),
            json!({
                "apiVersion": "clone.kubevirt.io/v1beta1",
                "kind": "VirtualMachineClone",
                "metadata": {"name": "copy"},
                "spec": {
                    "source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "source"},
                    "target": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "copied"},
                    "newMacAddresses": {"default": "02:00:00:00:00:99"},
                },
            }),
        )
        .await;
    let (clone, phases) = world
        .phases_until(&clones(), "copy", &["Succeeded"], |_| {})
        .await;
    assert_in_order(
        &phases,
        &[
            "SnapshotInProgress",
            "RestoreInProgress",
            "CreatingTargetVM",
            "Succeeded",
        ],
    );
    assert_eq!(clone["status"]["targetName"], "copied");
    assert_eq!(condition(&clone, "Ready")["status"], "True");
    let target = world.get(&virtual_machines(), "copied").await.unwrap();
    let domain = &target["spec"]["template"]["spec"]["domain"];
    assert_eq!(
        domain["devices"]["interfaces"][0]["macAddress"],
        "02:00:00:00:00:99"
    );
    assert_eq!(domain["firmware"]["uuid"], "");
    assert_eq!(domain["firmware"]["serial"], "");
    assert_eq!(domain["memory"]["guest"], "128Mi");
    assert_eq!(target["spec"]["runStrategy"], "Halted");
    // The temporary snapshot and restore are gone, the source is untouched.
    let uid = clone["metadata"]["uid"].as_str().unwrap();
    world
        .wait_deleted(&virtual_machine_snapshots(), &format!("tmp-snapshot-{uid}"))
        .await;
    world
        .wait_deleted(&restores(), &format!("tmp-restore-{uid}"))
        .await;
    let source = world.get(&virtual_machines(), "source").await.unwrap();
    assert_eq!(
        source["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"][0]["macAddress"],
        "02:00:00:00:00:01"
    );
    // Started, the clone gets a firmware UUID of its own.
    world
        .merge(
            &virtual_machines(),
            "copied",
            json!({"spec": {"runStrategy": "Always"}}),
        )
        .await;
    wait_printable(&world, "copied", "Running").await;
    let vmi = world.get(&virtual_machine_instances(), "copied").await.unwrap();
    let uuid = vmi["spec"]["domain"]["firmware"]["uuid"].as_str().unwrap();
    assert!(
        !uuid.is_empty() && uuid != "5d307ca9-b3ef-428c-8861-06e72d69f223",
        "{uuid}"
    );
    let _ = world
        .api(&clones())
        .delete("copy", &DeleteParams::default())
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_volume_claim_is_reported_until_it_appears() {
    let Some(world) = World::new("kvc-missing").await else {
        return;
    };
    let mut vm = virtual_machine("needy", "Always");
    vm["spec"]["template"]["spec"]["volumes"] = json!([{"name": "disk", "dataVolume": {"name": "later"}}]);
    world.create(&virtual_machines(), vm).await;
    let vm = wait_printable(&world, "needy", "ErrorPvcNotFound").await;
    let synchronized = condition(&vm, "Synchronized");
    assert_eq!(synchronized["reason"], "FailedPvcNotFound");
    let message = synchronized["message"].as_str().unwrap();
    assert_eq!(
        message,
        format!(
            "PVC {}/later does not exist, waiting for it to appear",
            world.namespace.name()
        )
    );
    world
        .create(&data_volumes(), data_volume("later", json!({"blank": {}})))
        .await;
    let vm = wait_printable(&world, "needy", "Running").await;
    assert!(
        vm["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|condition| condition["type"] != "Synchronized"),
        "{vm:#}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_credentials_come_from_the_secret_ref() {
    let Some(world) = World::new("kvc-credentials").await else {
        return;
    };
    let registry = Registry::start(RegistryAuth::Basic {
        username: "puller".to_owned(),
        password: "s3cret-pass".to_owned(),
    })
    .unwrap();
    allow_insecure(&world, registry.address()).await;
    let directory = tempfile::tempdir().unwrap();
    let disk = directory.path().join("disk.raw");
    qemu_img(&["create", "-q", "-f", "raw", disk.to_str().unwrap(), "16M"]);
    let layout = directory.path().join("disk.oci");
    let reference = format!("{}/private/disk:1", registry.address());
    package(&disk, &reference, &layout);
    let mut push = Command::new(paddock_binary());
    push.arg("push")
        .arg(&layout)
        .arg(&reference)
        .args(["--insecure", "--username", "puller", "--password-stdin"])
        .arg("--docker-config")
        .arg(directory.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = push.spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"s3cret-pass").unwrap();
    let pushed = child.wait_with_output().unwrap();
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );

    // Without credentials the registry refuses the pull.
    let (anonymous, _) = import(&world, "anonymous", &reference).await;
    assert_eq!(text(Some(&anonymous), "/status/phase"), Some("Failed"));
    let message = condition(&anonymous, "Running")["message"].as_str().unwrap();
    assert!(message.contains("401"), "{message}");

    let secrets = world.secrets();
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "registry-credentials"},
        "stringData": {"accessKeyId": "puller", "secretKey": "s3cret-pass"},
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &secret).await.unwrap();
    let mut data_volume = registry_data_volume("authenticated", &format!("docker://{reference}"));
    data_volume["spec"]["source"]["registry"]["secretRef"] = json!("registry-credentials");
    world.create(&data_volumes(), data_volume).await;
    let (authenticated, _) = wait_final(&world, "authenticated").await;
    assert_eq!(
        text(Some(&authenticated), "/status/phase"),
        Some("Succeeded"),
        "{authenticated:#}"
    );
    assert_eq!(text(Some(&authenticated), "/status/progress"), Some("100.0%"));
}
