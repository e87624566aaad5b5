//! A cluster backup interrupted by a registry crash resumes: `paddock backup create --cluster`
//! backs up a VirtualMachineApp of the control-plane harness (the real `paddock operator`, the
//! simulated CDI importing an incompressible disk from a real docker-registry, the simulated
//! export proxy serving it) through a proxy in front of a real docker-registry; the registry is
//! killed between two chunks of the disk layer, started again, and the rerun continues the layer
//! at the last chunk the registry acknowledged, says so in its summary, and sends the rest only.
//! While the first attempt uploads, and after it failed, the repository lists no backup.
//!
//! Needs qemu-img, docker-registry and the control-plane harness; missing ones fail the test
//! unless `PADDOCK_ALLOW_SKIP=1`.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use paddock_oci::backup::list_backups;
use paddock_oci::registry::RegistryOptions;
use paddock_tests::cluster::Cluster;
use paddock_tests::registry::RegistryError;
use paddock_tests::registry_crash::{ChunkProxy, RestartableRegistry};
use paddock_tests::world::{allow_insecure_registry, virtual_machines};
use serde_json::{Value, json};

/// The upload chunk (`--chunk-size-mib 1`).
const CHUNK: u64 = 1 << 20;

/// Kills a child process when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(command: &mut Command) -> String {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn insecure() -> RegistryOptions {
    RegistryOptions {
        insecure: true,
        credentials: None,
        docker_config_dir: None,
    }
}

/// `paddock backup create <vm> <repository> --cluster …` with its scratch space in `temporary`.
fn backup_command(cluster: &Cluster, namespace: &str, repository: &str, temporary: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_paddock"));
    command
        .args([
            "backup",
            "create",
            "resume",
            repository,
            "--cluster",
            "--kubeconfig",
        ])
        .arg(cluster.admin_kubeconfig())
        .args(["-n", namespace, "--insecure", "--chunk-size-mib", "1", "--json"])
        .env("TMPDIR", temporary)
        .stdin(Stdio::null());
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_backup_interrupted_by_a_registry_crash_resumes_mid_blob() {
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let mut registry = match RestartableRegistry::start() {
        Ok(registry) => registry,
        Err(RegistryError::NotInstalled) if paddock_tests::qemu::skip_allowed() => {
            eprintln!("SKIP cluster-backup-resume: docker-registry is not installed");
            return;
        }
        Err(error) => panic!("{error}"),
    };
    let proxy = ChunkProxy::start(registry.address().to_string()).await.unwrap();
    let namespace = cluster.namespace("backup-resume").await.unwrap();
    let ns = namespace.name().to_string();
    let client = cluster.admin_client().await.unwrap();
    allow_insecure_registry(&client, registry.address(), Duration::from_secs(120))
        .await
        .unwrap();
    let scratch = tempfile::tempdir().unwrap();

    // An incompressible 16 MiB disk (so its layer has many 1 MiB chunks), packaged and pushed
    // straight to the registry for the simulated importer.
    let raw = scratch.path().join("disk.raw");
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let bytes: Vec<u8> = (0..16 << 20)
        .map(|_| {
            // xorshift64: cheap bytes that no compressor shrinks.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    std::fs::write(&raw, &bytes).unwrap();
    let disk = scratch.path().join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&disk));
    let layout = scratch.path().join("disk.oci");
    let image = format!("{}/vms/resume:1", registry.address());
    run(Command::new(env!("CARGO_BIN_EXE_paddock"))
        .arg("package")
        .arg(&disk)
        .args(["--image", &image, "--output"])
        .arg(&layout));
    run(Command::new(env!("CARGO_BIN_EXE_paddock"))
        .arg("push")
        .arg(&layout)
        .arg(&image)
        .arg("--insecure"));

    let operator_log = scratch.path().join("operator.log");
    let log = std::fs::File::create(&operator_log).unwrap();
    let _operator = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_paddock"))
            .args(["operator", "--namespace", &ns, "--lease-namespace", &ns])
            .args(["--identity", &format!("{ns}-operator")])
            .args(["--console-gateway-url", "wss://console.paddock.test"])
            .args(["--listen", "127.0.0.1:0", "--retry-period-seconds", "1"])
            .env("KUBECONFIG", cluster.admin_kubeconfig())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let manifest = scratch.path().join("app.json");
    std::fs::write(
        &manifest,
        json!({
            "apiVersion": "paddock.dev/v1alpha1",
            "kind": "VirtualMachineApp",
            "metadata": {"name": "resume", "namespace": ns},
            "spec": {
                "image": {"containerDisk": image, "persistent": true},
                "resources": {"cpu": 1, "memory": "256Mi"},
                "disk": {"size": "16Mi"},
                "runStrategy": "Halted",
            },
        })
        .to_string(),
    )
    .unwrap();
    run(cluster.kubectl().arg("apply").arg("-f").arg(&manifest));
    // A backup needs the KubeVirt VM the operator makes.
    let machines: kube::Api<kube::api::DynamicObject> =
        kube::Api::namespaced_with(client.clone(), &ns, &virtual_machines());
    let deadline = Instant::now() + Duration::from_secs(180);
    while machines.get_opt("resume").await.unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the operator made no VM:\n{}",
            std::fs::read_to_string(&operator_log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // First attempt, through the proxy: the registry dies between two chunks of the layer.
    let repository = format!("{}/backups/resume", proxy.address);
    let temporary = scratch.path().join("tmp");
    std::fs::create_dir_all(&temporary).unwrap();
    let first_log = scratch.path().join("first.log");
    let mut first = backup_command(cluster, &ns, &repository, &temporary);
    let mut attempt = KillOnDrop(
        first
            .stdout(std::fs::File::create(&first_log).unwrap())
            .stderr(std::fs::File::create(scratch.path().join("first.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut listings_during_upload = 0;
    while proxy.forwarded.load(Ordering::Relaxed) < 4 << 20 {
        assert!(
            attempt.0.try_wait().unwrap().is_none(),
            "the backup ended before the registry was killed: {}\noperator:\n{}",
            std::fs::read_to_string(scratch.path().join("first.err")).unwrap_or_default(),
            std::fs::read_to_string(&operator_log).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "the upload never started");
        if let Ok(listed) = list_backups(&repository, &insecure()).await {
            assert!(listed.is_empty(), "a backup in progress is listed: {listed:?}");
            if proxy.forwarded.load(Ordering::Relaxed) > 0 {
                listings_during_upload += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.hold_next_chunk.store(true, Ordering::SeqCst);
    while !proxy.holding.load(Ordering::SeqCst) {
        assert!(
            attempt.0.try_wait().unwrap().is_none(),
            "the backup ended before the registry was killed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    registry.kill();
    let status = attempt.0.wait().unwrap();
    let first_error = std::fs::read_to_string(scratch.path().join("first.err")).unwrap();
    assert!(!status.success(), "the first attempt succeeded: {first_error}");
    assert!(first_error.contains("cannot push the backup"), "{first_error}");
    assert!(listings_during_upload > 0);
    let first_requests = registry.requests();
    let count = |wanted: &str| {
        first_requests
            .iter()
            .filter(|(method, path, status)| {
                method == wanted && path.contains("/blobs/uploads/") && *status < 300
            })
            .count()
    };
    // Blobs smaller than a chunk went up as one PATCH and were completed with a PUT.
    let acknowledged_chunks = (count("PATCH") - count("PUT")) as u64;
    assert!(acknowledged_chunks >= 2, "{first_requests:?}");
    registry.run().unwrap();
    proxy.hold_next_chunk.store(false, Ordering::SeqCst);
    assert!(
        list_backups(&repository, &insecure()).await.unwrap().is_empty(),
        "the interrupted backup must not be listed"
    );

    // The rerun (a new export and build of the same disk): the layer continues.
    proxy.forwarded.store(0, Ordering::Relaxed);
    let summary: Value =
        serde_json::from_str(&run(&mut backup_command(cluster, &ns, &repository, &temporary))).unwrap();
    let rerun_bytes = proxy.forwarded.load(Ordering::Relaxed);
    eprintln!("rerun: {summary:#}; {rerun_bytes} bytes through the proxy");
    assert_eq!(summary["blobsResumed"], 1, "the layer continues: {summary:#}");
    assert_eq!(
        summary["bytesResumed"].as_u64().unwrap(),
        acknowledged_chunks * CHUNK,
        "it continues after the last chunk the registry acknowledged: {summary:#}"
    );
    let resumed = summary["bytesResumed"].as_u64().unwrap();
    let uploaded = summary["bytesUploaded"].as_u64().unwrap();
    assert!(
        rerun_bytes < uploaded + (1 << 20),
        "the rerun sent {rerun_bytes} bytes, {uploaded} of them blob bytes, with {resumed} resumed"
    );
    let listed = list_backups(&repository, &insecure()).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].digest, summary["digest"].as_str().unwrap());
    let sessions = temporary
        .join("paddock-cluster-backup-sessions")
        .join(&ns)
        .join("resume");
    let leftovers: Vec<_> = std::fs::read_dir(&sessions)
        .map(|entries| entries.flatten().map(|entry| entry.path()).collect())
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "finished uploads leave no sessions: {leftovers:?}"
    );
    drop(namespace);
}
