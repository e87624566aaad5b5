//! Backups of local VMs with real QEMU, the paddock test disk and a real docker-registry:
//!
//! - a running VM writes a marker to its data disk, is backed up while it runs (snapshot, copy
//!   of the snapshot, push), the backup is listed with its definition, restored as a new VM which
//!   boots with the marker; backing up an unchanged stopped VM twice sends only a manifest;
//! - the registry is killed in the middle of a backup's upload: the backup fails, no listing
//!   ever shows it, and after the registry is back a rerun continues the interrupted upload and
//!   sends no finished blob again (counted in the registry's access log and by a proxy).
//!
//! Needs `qemu-system-x86_64`, `qemu-img`, mtools, the test disk's prerequisites and
//! `docker-registry`; missing ones fail the tests unless `PADDOCK_ALLOW_SKIP=1`.

// Helpers outside #[test] functions are not covered by clippy's allow-*-in-tests settings; in a
// test, failing loudly with the error's message is exactly the desired behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use paddock_api::app::VirtualMachineApp;
use paddock_local::backup::{
    ANNOTATION_RESTORED_FROM, BackupError, BackupOptions, NoBackupProgress, RestoreOptions, backup, restore,
};
use paddock_local::{AcceleratorChoice, Runtime, RuntimeOptions, VmId, VmPhase};
use paddock_oci::ImageOptions;
use paddock_oci::backup::{inspect_backup, list_backups};
use paddock_oci::registry::{PushOptions, RegistryOptions};
use paddock_tests::processes::QemuReaper;
use paddock_tests::qemu::{Accelerator, Qemu, ScratchDirectory, clean_line};
use paddock_tests::registry::{REGISTRY_BINARY, RegistryAuth, require_registry};
use paddock_tests::registry_crash::{ChunkProxy, RestartableRegistry};
use paddock_tests::testdisk::{self, READY_BANNER};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

fn prerequisites(test_name: &str) -> Option<(Qemu, PathBuf)> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("paddock_local=info")),
        )
        .with_ansi(false)
        .with_test_writer()
        .try_init();
    testdisk::qemu_and_test_disk(test_name).unwrap_or_else(|error| panic!("{error}"))
}

fn options(qemu: &Qemu, state_dir: &Path) -> RuntimeOptions {
    let mut options = RuntimeOptions::new(state_dir);
    options.qemu_binary = Some(qemu.binary().to_path_buf());
    options.accelerator = match qemu.accelerator() {
        Accelerator::Kvm => AcceleratorChoice::Kvm,
        Accelerator::Tcg => AcceleratorChoice::Tcg,
    };
    options
}

fn app(name: &str, image: &str) -> VirtualMachineApp {
    serde_json::from_value(json!({
        "apiVersion": "paddock.dev/v1alpha1",
        "kind": "VirtualMachineApp",
        "metadata": {"name": name, "labels": {"team": "backup-test"}},
        "spec": {
            "displayName": "Backup test VM",
            "image": {"containerDisk": image},
            "resources": {"cpu": 1, "memory": "256Mi"},
            "disk": {"size": "64Mi"},
            "runStrategy": "Manual",
        },
    }))
    .unwrap()
}

fn id(name: &str) -> VmId {
    VmId::new("default", name).unwrap()
}

fn backup_options(repository: &str, chunk_size: Option<u64>) -> BackupOptions {
    BackupOptions {
        repository: repository.to_string(),
        push: PushOptions {
            registry: RegistryOptions {
                insecure: true,
                ..RegistryOptions::default()
            },
            chunk_size,
            ..PushOptions::default()
        },
        image: ImageOptions::default(),
    }
}

fn insecure() -> RegistryOptions {
    RegistryOptions {
        insecure: true,
        ..RegistryOptions::default()
    }
}

/// A client of a VM's serial console socket (as in the runtime tests).
struct Serial {
    label: String,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    partial: Vec<u8>,
    transcript: Vec<String>,
}

impl Serial {
    async fn connect(label: &str, socket: &Path) -> Serial {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(stream) => break stream,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => panic!("cannot connect to {}: {error}", socket.display()),
            }
        };
        let (reader, writer) = stream.into_split();
        Serial {
            label: label.to_string(),
            reader: BufReader::new(reader),
            writer,
            partial: Vec::new(),
            transcript: Vec::new(),
        }
    }

    async fn wait_for_line(&mut self, expected: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.reader.read_until(b'\n', &mut self.partial)).await {
                Err(_) => panic!(
                    "{}: no serial line {expected:?} within {timeout:?}; last lines:\n{}",
                    self.label,
                    self.transcript[self.transcript.len().saturating_sub(40)..].join("\n")
                ),
                Ok(Err(error)) => panic!("{}: serial read failed: {error}", self.label),
                Ok(Ok(0)) => panic!("{}: serial console closed", self.label),
                Ok(Ok(_)) => {
                    if self.partial.last() != Some(&b'\n') {
                        continue;
                    }
                    let line = clean_line(&self.partial);
                    self.partial.clear();
                    eprintln!("[{}] {line}", self.label);
                    self.transcript.push(line.clone());
                    if line == expected {
                        return;
                    }
                }
            }
        }
    }

    /// Runs `command` in the guest shell and returns its output lines.
    async fn run(&mut self, command: &str) -> Vec<String> {
        static SEQUENCE: AtomicU64 = AtomicU64::new(5000);
        let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let (begin, end) = (format!("BEGIN-{}", sequence + 1), format!("END-{}", sequence + 1));
        self.writer
            .write_all(
                format!("echo BEGIN-$(({sequence}+1)); {command}; echo END-$(({sequence}+1))\n").as_bytes(),
            )
            .await
            .unwrap();
        self.wait_for_line(&begin, COMMAND_TIMEOUT).await;
        let mut output = Vec::new();
        loop {
            let deadline = tokio::time::Instant::now() + COMMAND_TIMEOUT;
            let read =
                tokio::time::timeout_at(deadline, self.reader.read_until(b'\n', &mut self.partial)).await;
            match read {
                Ok(Ok(count)) if count > 0 => {}
                other => panic!("{}: no {end:?}: {other:?}", self.label),
            }
            if self.partial.last() != Some(&b'\n') {
                continue;
            }
            let line = clean_line(&self.partial);
            self.partial.clear();
            eprintln!("[{}] {line}", self.label);
            if line == end {
                return output;
            }
            output.push(line);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_vm_is_backed_up_listed_and_restored_with_its_data() {
    let Some((qemu, disk)) = prerequisites("backup-restore") else {
        return;
    };
    let Some(registry) = require_registry("backup-restore", RegistryAuth::None).unwrap() else {
        return;
    };
    let scratch = ScratchDirectory::new("backup").unwrap();
    let state_dir = scratch.path().join("state");
    let _reaper = QemuReaper {
        state_dir: state_dir.clone(),
    };
    let runtime = Runtime::open(options(&qemu, &state_dir)).await.unwrap();
    let repository = format!("{}/backups/web", registry.address());
    let source = id("web");
    runtime
        .create(app("web", &format!("file:{}", disk.display())))
        .await
        .unwrap();
    runtime.start(&source).await.unwrap();
    let mut serial = Serial::connect("web", &runtime.serial_socket_path(&source).unwrap()).await;
    serial.wait_for_line(READY_BANNER, BOOT_TIMEOUT).await;
    let marker = format!("marker-{}", std::process::id());
    serial.run(&format!("echo {marker} > /data/marker && sync")).await;

    let report = backup(
        &runtime,
        &source,
        &backup_options(&repository, None),
        Arc::new(NoBackupProgress),
    )
    .await
    .unwrap();
    assert_eq!(report.phase, VmPhase::Running);
    assert!(report.tag.starts_with("web-"), "{}", report.tag);
    assert_eq!(report.push.blobs_uploaded, 2, "config and layer");
    let after = runtime.get(&source).unwrap();
    assert_eq!(after.status.phase, VmPhase::Running, "the VM keeps running");
    assert!(
        after.snapshots.is_empty(),
        "the backup snapshot is gone: {:?}",
        after.snapshots
    );
    // The guest kept working during the backup, and writes after it are not in it.
    serial.run("echo later > /data/marker && sync").await;

    let listed = list_backups(&repository, &insecure()).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let entry = &listed[0];
    assert_eq!(entry.digest, report.digest);
    assert_eq!(entry.tag, report.tag);
    assert_eq!(entry.info.name, "web");
    assert_eq!(entry.info.disk_virtual_size, 64 << 20);
    assert_eq!(
        entry.info.definition.spec.display_name.as_deref(),
        Some("Backup test VM")
    );
    assert!(entry.size > 1 << 20, "{}", entry.size);
    // Any containerDisk tool reads it: skopeo sees the image and its annotations.
    let skopeo = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{}", entry.reference))
        .output()
        .unwrap();
    assert!(
        skopeo.status.success(),
        "{}",
        String::from_utf8_lossy(&skopeo.stderr)
    );
    let raw: serde_json::Value = serde_json::from_slice(&skopeo.stdout).unwrap();
    assert_eq!(raw["annotations"]["dev.paddock.backup.vm"], "default/web");

    // Restore under a new name: the runtime pulls the backup pinned by digest.
    let inspected = inspect_backup(&entry.reference, &insecure()).await.unwrap();
    assert_eq!(inspected.digest, entry.digest);
    let restored = restore(
        &runtime,
        &inspected,
        &RestoreOptions {
            name: Some("web-restored".into()),
            ..RestoreOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(restored.id, id("web-restored"));
    assert_eq!(
        restored.app.spec.image.container_disk.as_deref(),
        Some(entry.pinned_reference.as_str())
    );
    assert_eq!(
        restored
            .app
            .metadata
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get(ANNOTATION_RESTORED_FROM))
            .map(String::as_str),
        Some(entry.pinned_reference.as_str())
    );
    assert_eq!(
        restored.app.metadata.labels.as_ref().unwrap()["team"],
        "backup-test"
    );
    // Restoring onto an existing VM needs --replace.
    let refused = restore(&runtime, &inspected, &RestoreOptions::default()).await;
    assert!(matches!(refused, Err(BackupError::Runtime(_))), "{refused:?}");

    runtime.force_stop(&source).await.unwrap();
    let restored_id = id("web-restored");
    runtime.start(&restored_id).await.unwrap();
    let mut restored_serial =
        Serial::connect("restored", &runtime.serial_socket_path(&restored_id).unwrap()).await;
    restored_serial.wait_for_line(READY_BANNER, BOOT_TIMEOUT).await;
    assert_eq!(
        restored_serial.run("cat /data/marker").await,
        vec![marker.clone()]
    );
    runtime.force_stop(&restored_id).await.unwrap();

    // Two backups of an unchanged, stopped disk: the second sends only its manifest. A snapshot
    // left by a backup whose process was killed is cleaned up by the next one.
    runtime
        .snapshot_create(&source, "paddock-backup-killed", false)
        .await
        .unwrap();
    let first = backup(
        &runtime,
        &source,
        &backup_options(&repository, None),
        Arc::new(NoBackupProgress),
    )
    .await
    .unwrap();
    assert_eq!(first.phase, VmPhase::Stopped);
    assert!(runtime.get(&source).unwrap().snapshots.is_empty());
    // Tags have one-second resolution.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = backup(
        &runtime,
        &source,
        &backup_options(&repository, None),
        Arc::new(NoBackupProgress),
    )
    .await
    .unwrap();
    assert_eq!(second.layer_digest, first.layer_digest);
    assert_ne!(second.tag, first.tag);
    assert_eq!(second.push.blobs_uploaded, 0, "{:?}", second.push);
    assert_eq!(second.push.blobs_skipped, 2, "{:?}", second.push);
    assert_eq!(list_backups(&repository, &insecure()).await.unwrap().len(), 3);

    // Replacing restores the backup's data over the VM's current data.
    let replaced = restore(
        &runtime,
        &inspected,
        &RestoreOptions {
            replace: true,
            ..RestoreOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(replaced.id, source);
    runtime.start(&source).await.unwrap();
    let mut serial = Serial::connect("web-replaced", &runtime.serial_socket_path(&source).unwrap()).await;
    serial.wait_for_line(READY_BANNER, BOOT_TIMEOUT).await;
    assert_eq!(serial.run("cat /data/marker").await, vec![marker]);
    runtime.force_stop(&source).await.unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(state_dir.join("backups/default/web"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .filter(|name| name != "resume")
        .collect();
    assert!(leftovers.is_empty(), "scratch left behind: {leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_interrupted_by_a_registry_crash_resumes_and_is_never_listed_half_done() {
    let Some((qemu, disk)) = prerequisites("backup-interrupted") else {
        return;
    };
    if !Path::new(REGISTRY_BINARY).is_file() {
        assert!(
            paddock_tests::qemu::skip_allowed(),
            "docker-registry is not installed; run hack/install-deps.sh or set PADDOCK_ALLOW_SKIP=1"
        );
        eprintln!("SKIP backup-interrupted: docker-registry is not installed");
        return;
    }
    let scratch = ScratchDirectory::new("backup-kill").unwrap();
    let state_dir = scratch.path().join("state");
    let _reaper = QemuReaper {
        state_dir: state_dir.clone(),
    };
    let runtime = Runtime::open(options(&qemu, &state_dir)).await.unwrap();
    let vm = id("db");
    runtime
        .create(app("db", &format!("file:{}", disk.display())))
        .await
        .unwrap();
    let mut registry = RestartableRegistry::start().unwrap();
    let proxy = ChunkProxy::start(registry.address().to_string()).await.unwrap();
    let forwarded = Arc::clone(&proxy.forwarded);
    let repository = format!("{}/backups/db", proxy.address);
    let chunk = 1u64 << 20;

    // First attempt: the registry dies once 4 MiB of the upload went through, between two chunks
    // (killed in the middle of a chunk, distribution drops the session: that blob starts over).
    let runtime = Arc::new(runtime);
    let attempt = {
        let runtime = Arc::clone(&runtime);
        let (vm, options) = (vm.clone(), backup_options(&repository, Some(chunk)));
        tokio::spawn(async move { backup(&runtime, &vm, &options, Arc::new(NoBackupProgress)).await })
    };
    let mut listings_during_upload = 0;
    while forwarded.load(Ordering::Relaxed) < 4 << 20 {
        assert!(
            !attempt.is_finished(),
            "the backup ended before the registry was killed"
        );
        if let Ok(listed) = list_backups(&repository, &insecure()).await {
            assert!(listed.is_empty(), "a backup in progress is listed: {listed:?}");
            listings_during_upload += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.hold_next_chunk.store(true, Ordering::SeqCst);
    while !proxy.holding.load(Ordering::SeqCst) {
        assert!(
            !attempt.is_finished(),
            "the backup ended before the registry was killed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    registry.kill();
    let failed = attempt.await.unwrap();
    assert!(matches!(failed, Err(BackupError::Push { .. })), "{failed:?}");
    eprintln!("first attempt failed as expected: {}", failed.unwrap_err());
    assert!(listings_during_upload > 0);
    let requests_before = registry.requests().len();
    let first_requests = registry.requests();
    let count = |wanted: &str, path_part: &str| {
        first_requests
            .iter()
            .filter(|(method, path, status)| method == wanted && path.contains(path_part) && *status < 300)
            .count()
    };
    // Each blob smaller than a chunk (the config) went up as one PATCH and was completed.
    let acknowledged_chunks = count("PATCH", "/blobs/uploads/") - count("PUT", "/blobs/uploads/");
    assert!(acknowledged_chunks >= 2, "{:?}", registry.requests());
    registry.run().unwrap();
    proxy.hold_next_chunk.store(false, Ordering::SeqCst);
    assert!(
        list_backups(&repository, &insecure()).await.unwrap().is_empty(),
        "the interrupted backup must not be listed"
    );

    // The rerun: finished blobs are skipped, the interrupted layer continues.
    forwarded.store(0, Ordering::Relaxed);
    let report = backup(
        &runtime,
        &vm,
        &backup_options(&repository, Some(chunk)),
        Arc::new(NoBackupProgress),
    )
    .await
    .unwrap();
    let rerun_bytes = forwarded.load(Ordering::Relaxed);
    eprintln!("rerun: {:?}; {rerun_bytes} bytes through the proxy", report.push);
    assert_eq!(
        report.push.blobs_skipped, 1,
        "the config finished in the first attempt"
    );
    assert_eq!(report.push.blobs_resumed, 1, "the layer continues");
    assert_eq!(
        report.push.bytes_resumed,
        acknowledged_chunks as u64 * chunk,
        "it continues after the last chunk the registry acknowledged: {:?}",
        report.push
    );
    let layer_size = report.push.bytes_resumed + report.push.bytes_uploaded;
    assert!(
        rerun_bytes < layer_size - report.push.bytes_resumed + (1 << 20),
        "the rerun sent {rerun_bytes} bytes for a {layer_size}-byte layer of which {} were already there",
        report.push.bytes_resumed
    );
    // Every blob was completed once over both attempts.
    let requests = registry.requests();
    let completions: Vec<&(String, String, u16)> = requests
        .iter()
        .filter(|(method, path, _)| method == "PUT" && path.contains("/blobs/uploads/"))
        .collect();
    assert_eq!(
        completions.len(),
        2,
        "config and layer, once each: {completions:?}"
    );
    let rerun_patches = requests[requests_before..]
        .iter()
        .filter(|(method, _, _)| method == "PATCH")
        .count() as u64;
    assert!(
        rerun_patches <= layer_size.div_ceil(chunk) - (report.push.bytes_resumed / chunk) + 1,
        "{rerun_patches} chunks sent again"
    );

    let listed = list_backups(&repository, &insecure()).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].digest, report.digest);
    let leftovers: Vec<_> = std::fs::read_dir(state_dir.join("backups/default/db/resume"))
        .unwrap()
        .collect();
    assert!(
        leftovers.is_empty(),
        "finished uploads leave no sessions: {leftovers:?}"
    );
}
