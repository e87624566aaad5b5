//! `paddock backup create|list|restore` as a user runs them: the real binary on a state directory
//! with a local VM (made from the paddock test disk), a real docker-registry, qemu-img to compare
//! disks. Booting restored VMs and interrupted pushes are covered in paddock-local's backup tests;
//! this one checks the command line: outputs, the lock `paddock serve` holds, and that a restored
//! VM's disk has exactly the backed-up content.
//!
//! Needs qemu-img, the test disk's prerequisites and docker-registry; missing ones fail the test
//! unless `PADDOCK_ALLOW_SKIP=1`.

// Helpers outside #[test] functions are not covered by clippy's allow-*-in-tests settings; in a
// test, failing loudly with the error's message is exactly the desired behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

use paddock_local::{Runtime, RuntimeOptions, VmId};
use paddock_tests::qemu::ScratchDirectory;
use paddock_tests::registry::{RegistryAuth, require_registry};
use paddock_tests::testdisk;

fn paddock(arguments: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_paddock"))
        .args(arguments)
        .output()
        .unwrap();
    eprintln!(
        "$ paddock {}\n{}{}",
        arguments.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn succeed(arguments: &[&str]) -> String {
    let output = paddock(arguments);
    assert!(output.status.success(), "paddock {} failed", arguments.join(" "));
    String::from_utf8(output.stdout).unwrap()
}

/// The guest-visible content of a VM's disk, flattened to raw.
fn disk_content(overlay: &Path, into: &Path) -> Vec<u8> {
    let status = Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(overlay)
        .arg(into)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::read(into).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_list_and_restore_from_the_command_line() {
    let disk = match testdisk::test_disk() {
        Ok(disk) => disk,
        Err(error) if error.is_missing_prerequisite() && paddock_tests::qemu::skip_allowed() => {
            eprintln!("SKIP backup_e2e: {error}");
            return;
        }
        Err(error) => panic!("{error}"),
    };
    let Some(registry) = require_registry("backup-e2e", RegistryAuth::None).unwrap() else {
        return;
    };
    let scratch = ScratchDirectory::new("backup-cli").unwrap();
    let state_dir = scratch.path().join("state");
    let state = state_dir.to_str().unwrap();
    let repository = format!("{}/backups/app", registry.address());

    // A stopped VM whose disk differs from its image: a file written into the overlay.
    {
        let runtime = Runtime::open(RuntimeOptions::new(&state_dir)).await.unwrap();
        let app = serde_json::from_value(serde_json::json!({
            "apiVersion": "paddock.dev/v1alpha1",
            "kind": "VirtualMachineApp",
            "metadata": {"name": "app"},
            "spec": {
                "displayName": "CLI backup",
                "image": {"containerDisk": format!("file:{}", disk.display())},
                "resources": {"cpu": 1, "memory": "256Mi"},
                "disk": {"size": "64Mi"},
                "runStrategy": "Manual",
            },
        }))
        .unwrap();
        runtime.create(app).await.unwrap();
        // While another process holds the state directory (as `paddock serve` does), the CLI says
        // so instead of waiting or failing obscurely.
        let refused = paddock(&[
            "backup",
            "create",
            "app",
            &repository,
            "--insecure",
            "--state-dir",
            state,
        ]);
        assert!(!refused.status.success());
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains("paddock serve"),
            "{}",
            String::from_utf8_lossy(&refused.stderr)
        );
    }
    let overlay = state_dir.join("vms/default/app/overlay.qcow2");
    let status = Command::new("qemu-io")
        .args(["-c", "write -P 0x5a 40M 1M"])
        .arg(&overlay)
        .status()
        .unwrap();
    assert!(status.success());

    assert!(succeed(&["backup", "list", &repository, "--insecure"]).contains("no complete backups"));
    let created: serde_json::Value = serde_json::from_str(&succeed(&[
        "backup",
        "create",
        "app",
        &repository,
        "--insecure",
        "--state-dir",
        state,
        "--json",
    ]))
    .unwrap();
    assert_eq!(created["vm"], "default/app");
    assert_eq!(created["phase"], "Stopped");
    assert_eq!(created["blobsUploaded"], 2);
    let pinned = created["pinnedReference"].as_str().unwrap().to_string();
    assert!(pinned.starts_with(&format!("{repository}@sha256:")), "{pinned}");

    let table = succeed(&["backup", "list", &repository, "--insecure"]);
    let tag = created["reference"].as_str().unwrap().rsplit(':').next().unwrap();
    assert!(
        table.contains(tag) && table.contains("default/app") && table.contains("CLI backup"),
        "{table}"
    );
    let listed: serde_json::Value = serde_json::from_str(&succeed(&[
        "backup",
        "list",
        &repository,
        "--insecure",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["digest"], created["digest"]);
    assert_eq!(
        listed[0]["info"]["definition"]["spec"]["displayName"],
        "CLI backup"
    );
    assert_eq!(
        succeed(&["backup", "list", &repository, "--insecure", "--vm", "other"]).trim(),
        "no complete backups"
    );

    let dry_run = succeed(&[
        "backup",
        "restore",
        &pinned,
        "--name",
        "copy",
        "--dry-run",
        "--insecure",
    ]);
    assert!(
        dry_run.contains("name: copy") && dry_run.contains(&pinned),
        "{dry_run}"
    );
    let restored: serde_json::Value = serde_json::from_str(&succeed(&[
        "backup",
        "restore",
        &pinned,
        "--name",
        "copy",
        "--insecure",
        "--state-dir",
        state,
        "--json",
    ]))
    .unwrap();
    assert_eq!(restored["vm"], "default/copy");
    let refused = paddock(&[
        "backup",
        "restore",
        &pinned,
        "--name",
        "copy",
        "--insecure",
        "--state-dir",
        state,
    ]);
    assert!(
        !refused.status.success(),
        "restoring over an existing VM needs --replace"
    );

    let runtime = Runtime::open(RuntimeOptions::new(&state_dir)).await.unwrap();
    let copy = runtime.get(&VmId::new("default", "copy").unwrap()).unwrap();
    assert_eq!(
        copy.app.spec.image.container_disk.as_deref(),
        Some(pinned.as_str())
    );
    assert_eq!(copy.disk_size_bytes, 64 << 20);
    drop(runtime);
    let original = disk_content(&overlay, &scratch.path().join("original.raw"));
    let copied = disk_content(
        &state_dir.join("vms/default/copy/overlay.qcow2"),
        &scratch.path().join("copy.raw"),
    );
    assert!(
        original == copied,
        "the restored disk differs from the backed-up one"
    );
    assert_eq!(&original[40 << 20..(40 << 20) + 4], &[0x5a; 4]);
}

/// Kills the operator process when the test ends, however it ends.
struct OperatorProcess(std::process::Child);

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Moving a VM from this machine into a cluster: a local VM's backup, restored as a
/// VirtualMachineApp (`backup restore --dry-run`) in the control-plane harness, is imported by the
/// simulated CDI from the registry (pinned by digest, verified) and started; the imported disk has
/// exactly the local VM's data, byte for byte (`backup_marker.rs` boots such a restore and reads a
/// marker over the serial console).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_backup_restores_into_the_cluster() {
    use kube::api::{Api, DynamicObject, PostParams};
    use paddock_tests::cluster::Cluster;
    use paddock_tests::world::{
        allow_insecure_registry, data_volumes, virtual_machine_apps, virtual_machines,
    };

    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let disk = testdisk::test_disk().unwrap_or_else(|error| panic!("{error}"));
    let Some(registry) = require_registry("backup-to-cluster", RegistryAuth::None).unwrap() else {
        return;
    };
    let scratch = ScratchDirectory::new("backup-move").unwrap();
    let state_dir = scratch.path().join("state");
    let state = state_dir.to_str().unwrap();
    let repository = format!("{}/backups/mover", registry.address());
    {
        let runtime = Runtime::open(RuntimeOptions::new(&state_dir)).await.unwrap();
        let app = serde_json::from_value(serde_json::json!({
            "apiVersion": "paddock.dev/v1alpha1",
            "kind": "VirtualMachineApp",
            "metadata": {"name": "mover"},
            "spec": {
                "displayName": "Moved VM",
                "image": {"containerDisk": format!("file:{}", disk.display())},
                "resources": {"cpu": 1, "memory": "256Mi"},
                "disk": {"size": "64Mi"},
                "runStrategy": "Halted",
            },
        }))
        .unwrap();
        runtime.create(app).await.unwrap();
    }
    let overlay = state_dir.join("vms/default/mover/overlay.qcow2");
    let status = Command::new("qemu-io")
        .args(["-c", "write -P 0xa5 20M 512k"])
        .arg(&overlay)
        .status()
        .unwrap();
    assert!(status.success());
    let created: serde_json::Value = serde_json::from_str(&succeed(&[
        "backup",
        "create",
        "mover",
        &repository,
        "--insecure",
        "--state-dir",
        state,
        "--json",
    ]))
    .unwrap();
    let pinned = created["pinnedReference"].as_str().unwrap().to_string();

    let namespace = cluster.namespace("backup-move").await.unwrap();
    let client = cluster.admin_client().await.unwrap();
    allow_insecure_registry(&client, registry.address(), std::time::Duration::from_secs(60))
        .await
        .unwrap();
    let manifest = succeed(&[
        "backup",
        "restore",
        &pinned,
        "--dry-run",
        "--insecure",
        "--to-namespace",
        namespace.name(),
    ]);
    let mut app: serde_json::Value = serde_yaml::from_str(&manifest).unwrap();
    // Started where it lands, as `paddock move` will do.
    app["spec"]["runStrategy"] = serde_json::json!("Always");
    let apps: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace.name(), &virtual_machine_apps());
    apps.create(&PostParams::default(), &serde_json::from_value(app).unwrap())
        .await
        .unwrap();
    let log = std::fs::File::create(scratch.path().join("operator.log")).unwrap();
    let _operator = OperatorProcess(
        Command::new(env!("CARGO_BIN_EXE_paddock"))
            .args([
                "operator",
                "--namespace",
                namespace.name(),
                "--lease-namespace",
                namespace.name(),
            ])
            .args(["--identity", &format!("{}-operator", namespace.name())])
            .args(["--console-gateway-url", "wss://console.paddock.test"])
            .args(["--listen", "127.0.0.1:0", "--retry-period-seconds", "1"])
            .env("KUBECONFIG", cluster.admin_kubeconfig())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );

    let data_volumes: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace.name(), &data_volumes());
    let machines: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace.name(), &virtual_machines());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    let (data_volume, machine) = loop {
        let data_volume = data_volumes.get_opt("mover-disk").await.unwrap();
        let machine = machines.get_opt("mover").await.unwrap();
        let imported = data_volume
            .as_ref()
            .is_some_and(|object| object.data["status"]["phase"] == "Succeeded");
        let running = machine
            .as_ref()
            .is_some_and(|object| object.data["status"]["printableStatus"] == "Running");
        if imported && running {
            break (data_volume.unwrap(), machine.unwrap());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not imported and running: {data_volume:?} {machine:?}\noperator log:\n{}",
            std::fs::read_to_string(scratch.path().join("operator.log")).unwrap_or_default()
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    assert_eq!(
        data_volume.data["spec"]["source"]["registry"]["url"],
        format!("docker://{pinned}")
    );
    assert_eq!(machine.metadata.name.as_deref(), Some("mover"));
    let imported = data_volume
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get("simulator.paddock.dev/disk-path"))
        .expect("the simulator records where the import went")
        .clone();
    let original = disk_content(&overlay, &scratch.path().join("local.raw"));
    let in_cluster = disk_content(Path::new(&imported), &scratch.path().join("cluster.raw"));
    assert!(
        original == in_cluster,
        "the disk imported in the cluster differs from the local VM's"
    );
    assert_eq!(&in_cluster[20 << 20..(20 << 20) + 4], &[0xa5; 4]);
}
