//! Drives the local runtime end to end with real QEMU and the paddock test disk: creating VMs from a
//! disk file and from an OCI layout, power operations, consoles, snapshots with and without memory,
//! clones, run strategies after a crash, re-attaching after a runtime restart, and deletion.
//!
//! Needs `qemu-system-x86_64`, `qemu-img`, mtools and the test disk's build prerequisites; missing
//! ones fail the tests unless `PADDOCK_ALLOW_SKIP=1`. Boots are few on purpose (TCG takes about
//! 8 s each, UEFI about 25 s): five boots are awaited to the banner, four more only briefly.
//! Every QEMU left behind is killed by a guard.

// Helpers outside #[test] functions are not covered by clippy's allow-*-in-tests settings; in a
// test, failing loudly with the error's message is exactly the desired behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use paddock_api::app::VirtualMachineApp;
use paddock_local::{
    AcceleratorChoice, ErrorKind, ExitKind, Runtime, RuntimeError, RuntimeOptions, StopOutcome, VmId,
    VmPhase, VmStatus,
};
use paddock_oci::registry::{NoTransferProgress, PushOptions, RegistryOptions};
use paddock_oci::{ImageOptions, NoProgress};
use paddock_tests::processes::{QemuReaper, process_alive};
use paddock_tests::qemu::{Accelerator, Qemu, ScratchDirectory, clean_line};
use paddock_tests::registry::{RegistryAuth, require_registry};
use paddock_tests::testdisk::{self, READY_BANNER, SHUTTING_DOWN_PREFIX};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Generous enough for TCG on a busy two-core machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
const STATUS_TIMEOUT: Duration = Duration::from_secs(60);
const GRACEFUL_TIMEOUT: Duration = Duration::from_secs(60);

fn prerequisites(test_name: &str) -> Option<(Qemu, PathBuf)> {
    // The runtime's own log lines appear in a failing test's output (RUST_LOG overrides).
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
    // The harness has already picked (and announced) the accelerator for this machine.
    options.accelerator = match qemu.accelerator() {
        Accelerator::Kvm => AcceleratorChoice::Kvm,
        Accelerator::Tcg => AcceleratorChoice::Tcg,
    };
    options
}

fn app(name: &str, image: &str, run_strategy: &str, extra: serde_json::Value) -> VirtualMachineApp {
    let mut spec = json!({
        "image": {"containerDisk": image},
        "resources": {"cpu": 1, "memory": "256Mi"},
        "disk": {"size": "64Mi"},
        "runStrategy": run_strategy,
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    serde_json::from_value(json!({
        "apiVersion": "paddock.dev/v1alpha1",
        "kind": "VirtualMachineApp",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

fn id(name: &str) -> VmId {
    VmId::new("default", name).unwrap()
}

/// A client of a VM's serial console socket, reading clean lines.
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
                Err(error) if tokio::time::Instant::now() < deadline => {
                    eprintln!("serial {} not ready: {error}", socket.display());
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

    async fn wait_for(
        &mut self,
        description: &str,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // read_until keeps partially read bytes in `partial` when the timeout cuts it short.
            match tokio::time::timeout_at(deadline, self.reader.read_until(b'\n', &mut self.partial)).await {
                Err(_) => panic!(
                    "{}: no serial line {description} within {timeout:?}; last lines:\n{}",
                    self.label,
                    self.transcript[self.transcript.len().saturating_sub(40)..].join("\n")
                ),
                Ok(Err(error)) => panic!("{}: serial read failed: {error}", self.label),
                Ok(Ok(0)) => panic!(
                    "{}: serial console closed while waiting for {description}; last lines:\n{}",
                    self.label,
                    self.transcript[self.transcript.len().saturating_sub(40)..].join("\n")
                ),
                Ok(Ok(_)) => {
                    if self.partial.last() != Some(&b'\n') {
                        continue;
                    }
                    let line = clean_line(&self.partial);
                    self.partial.clear();
                    eprintln!("[{}] {line}", self.label);
                    self.transcript.push(line.clone());
                    if matches(&line) {
                        return line;
                    }
                }
            }
        }
    }

    async fn wait_for_line(&mut self, expected: &str, timeout: Duration) {
        self.wait_for(&format!("{expected:?}"), timeout, |line| line == expected)
            .await;
    }

    async fn send_line(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        self.writer.flush().await.unwrap();
    }

    /// Runs `command` in the guest shell; its output is framed by markers the shell computes, so
    /// the echoed command line never matches them.
    async fn run(&mut self, command: &str) -> Vec<String> {
        static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1000);
        let sequence = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (begin, end) = (format!("BEGIN-{}", sequence + 1), format!("END-{}", sequence + 1));
        self.send_line(&format!(
            "echo BEGIN-$(({sequence}+1)); {command}; echo END-$(({sequence}+1))"
        ))
        .await;
        self.wait_for_line(&begin, COMMAND_TIMEOUT).await;
        let mut output = Vec::new();
        loop {
            let line = self
                .wait_for(&format!("{end:?}"), COMMAND_TIMEOUT, |_| true)
                .await;
            if line == end {
                return output;
            }
            output.push(line);
        }
    }
}

/// The share of pixels in a PNG that are not black.
fn lit_fraction_of_png(png_bytes: &[u8]) -> f64 {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buffer = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buffer).unwrap();
    let bytes_per_pixel = frame.color_type.samples() * usize::from(frame.bit_depth as u8).div_ceil(8);
    let pixels = &buffer[..frame.buffer_size()];
    let total = pixels.len() / bytes_per_pixel;
    let lit = pixels
        .chunks_exact(bytes_per_pixel)
        .filter(|pixel| pixel.iter().take(3).any(|&value| value != 0))
        .count();
    lit as f64 / total as f64
}

fn assert_invalid_transition<T: std::fmt::Debug>(result: Result<T, RuntimeError>, what: &str) {
    match result {
        Err(error) if error.kind() == ErrorKind::InvalidTransition => {
            eprintln!("expected refusal ({what}): {error}")
        }
        other => panic!("{what}: expected InvalidTransition, got {other:?}"),
    }
}

async fn wait_status(runtime: &Runtime, vm: &VmId, condition: impl FnMut(&VmStatus) -> bool) -> VmStatus {
    runtime
        .wait_for_status(vm, STATUS_TIMEOUT, condition)
        .await
        .unwrap_or_else(|error| panic!("{error}"))
}

fn qemu_img_snapshots(overlay: &Path) -> String {
    let output = std::process::Command::new("qemu-img")
        .args(["snapshot", "-U", "-l"])
        .arg(overlay)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// No boot: what a manifest turns into on disk, and what the runtime refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_writes_seed_firmware_and_record_and_refuses_bad_requests() {
    let Some((qemu, disk)) = prerequisites("runtime-create") else {
        return;
    };
    let scratch = ScratchDirectory::new("rt-create").unwrap();
    let state_dir = scratch.path().join("state");
    let _reaper = QemuReaper {
        state_dir: state_dir.clone(),
    };
    let runtime = Runtime::open(options(&qemu, &state_dir)).await.unwrap();
    let image = format!("file:{}", disk.display());
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHnO6k8ZQfdGnBJtJ0oBZxJ4 alice@laptop";
    let created = runtime
        .create(app(
            "seeded",
            &image,
            "Manual",
            json!({"cloudInit": {"sshKeys": [key]}, "firmware": {"type": "uefi"}}),
        ))
        .await
        .unwrap();
    assert_eq!(
        created.status.phase,
        VmPhase::Stopped,
        "Manual must not start by itself"
    );
    assert_eq!(created.disk_size_bytes, 64 * 1024 * 1024);
    let vm_dir = state_dir.join("vms/default/seeded");

    // The NoCloud seed is a FAT disk labelled CIDATA with user-data and meta-data.
    let seed = vm_dir.join("seed.img");
    let listing = std::process::Command::new("mdir")
        .arg("-i")
        .arg(&seed)
        .arg("::")
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.contains("CIDATA"), "{listing}");
    let read = |name: &str| {
        let output = std::process::Command::new("mtype")
            .arg("-i")
            .arg(&seed)
            .arg(format!("::{name}"))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "mtype {name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let user_data = read("user-data");
    assert!(user_data.starts_with("#cloud-config"), "{user_data}");
    assert!(user_data.contains(key), "{user_data}");
    let meta_data: serde_json::Value = serde_json::from_str(&read("meta-data")).unwrap();
    assert_eq!(meta_data["local-hostname"], "seeded");
    assert!(meta_data["instance-id"].as_str().unwrap().starts_with("seeded-"));

    // UEFI: a private copy of the variable store; the base image is stored once by digest.
    let vars = std::fs::metadata(vm_dir.join("uefi-vars.fd")).unwrap();
    assert!(vars.len() >= 128 * 1024, "variable store of {} bytes", vars.len());
    let digest = created.base_image_digest.strip_prefix("sha256:").unwrap();
    let stored = state_dir.join("images/sha256").join(digest);
    let sha256sum = std::process::Command::new("sha256sum")
        .arg(&disk)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&sha256sum.stdout).starts_with(digest));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&stored).unwrap().permissions().mode() & 0o777,
        0o444
    );

    // The same image again is not stored twice (next to it: its record, `<hex>.json`).
    runtime
        .create(app("second", &image, "Manual", json!({})))
        .await
        .unwrap();
    let stored_images = || {
        std::fs::read_dir(state_dir.join("images/sha256"))
            .unwrap()
            .filter(|entry| {
                !entry
                    .as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".json")
            })
            .count()
    };
    assert_eq!(stored_images(), 1);
    // The image library: the stored base, where it came from, and the VMs on it.
    let library = runtime.images().await.unwrap();
    assert_eq!(library.len(), 1, "{library:?}");
    assert_eq!(library[0].digest, created.base_image_digest);
    assert_eq!(library[0].source.as_deref(), Some(image.as_str()));
    assert_eq!(library[0].format.as_deref(), Some("qcow2"));
    assert!(library[0].recorded);
    assert_eq!(library[0].size, std::fs::metadata(&disk).unwrap().len());
    assert_eq!(
        library[0]
            .used_by
            .iter()
            .map(|vm| vm.name.as_str())
            .collect::<Vec<_>>(),
        ["second", "seeded"]
    );

    // Refusals, each with the kind the server maps to a status code.
    let kind = |result: Result<paddock_local::VmInfo, RuntimeError>| result.unwrap_err().kind();
    assert_eq!(
        kind(runtime.create(app("second", &image, "Manual", json!({}))).await),
        ErrorKind::AlreadyExists
    );
    // A registry reference is pulled (a real docker-registry on loopback, plain http as docker
    // does for loopback) and lands in the store as the very same base image.
    if let Some(registry) = require_registry("runtime-create", RegistryAuth::None).unwrap() {
        let layout = scratch.path().join("pushed.oci");
        paddock_oci::build_layout(&disk, &layout, &ImageOptions::default(), &mut NoProgress).unwrap();
        let reference = format!("{}/vms/tiny:1.0", registry.address());
        paddock_oci::registry::push(
            &layout,
            &reference,
            &PushOptions {
                registry: RegistryOptions {
                    insecure: true,
                    ..RegistryOptions::default()
                },
                ..PushOptions::default()
            },
            &NoTransferProgress,
        )
        .await
        .unwrap();
        let pulled = runtime
            .create(app("pulled", &reference, "Manual", json!({})))
            .await
            .unwrap();
        assert_eq!(pulled.base_image_digest, created.base_image_digest);
        assert_eq!(stored_images(), 1);
        // The record keeps the first source; the pulled VM is one more user.
        let library = runtime.images().await.unwrap();
        assert_eq!(library[0].source.as_deref(), Some(image.as_str()));
        assert!(library[0].used_by.iter().any(|vm| vm.name == "pulled"));
        // The temporary pull layout is gone.
        assert_eq!(
            std::fs::read_dir(state_dir.join("images/pulls")).unwrap().count(),
            0
        );
        runtime.delete(&id("pulled"), false).await.unwrap();
    }
    let unreachable = runtime
        .create(app("unreachable", "127.0.0.1:9/vms/none:1", "Manual", json!({})))
        .await
        .unwrap_err();
    assert!(
        unreachable.to_string().contains("cannot pull it"),
        "{unreachable}"
    );
    assert_eq!(unreachable.kind(), ErrorKind::InvalidSpec);
    assert_eq!(
        kind(
            runtime
                .create(app(
                    "missing",
                    "file:/nonexistent/disk.qcow2",
                    "Manual",
                    json!({})
                ))
                .await
        ),
        ErrorKind::InvalidSpec
    );
    assert_eq!(
        kind(runtime.create(app("Bad_Name", &image, "Manual", json!({}))).await),
        ErrorKind::InvalidSpec
    );
    assert_eq!(
        kind(
            runtime
                .create(app("tiny", &image, "Manual", json!({"disk": {"size": "2Mi"}})))
                .await
        ),
        ErrorKind::InvalidSpec
    );
    assert!(runtime.get(&id("missing")).is_err());
    assert_eq!(
        runtime.get(&id("nobody")).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        runtime.list().len(),
        2,
        "failed creates must leave nothing behind"
    );
    let leftovers: Vec<_> = std::fs::read_dir(state_dir.join("vms/default"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers.len(), 2, "{leftovers:?}");

    // A stopped VM refuses what needs a running one, and stays as it was.
    let vm = id("seeded");
    assert_invalid_transition(runtime.pause(&vm).await, "pause a stopped VM");
    assert_invalid_transition(runtime.resume(&vm).await, "resume a stopped VM");
    assert_invalid_transition(runtime.stop(&vm, GRACEFUL_TIMEOUT).await, "stop a stopped VM");
    assert_invalid_transition(
        runtime.restart(&vm, GRACEFUL_TIMEOUT).await,
        "restart a stopped VM",
    );
    assert_invalid_transition(
        runtime.snapshot_create(&vm, "mem", true).await,
        "memory snapshot of a stopped VM",
    );
    assert_invalid_transition(runtime.screenshot(&vm).await, "screenshot of a stopped VM");
    assert_eq!(runtime.get(&vm).unwrap().status, created.status);
    assert_eq!(
        runtime
            .snapshot_create(&vm, "bad name", false)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidSpec
    );

    // One runtime per state directory; the record survives a restart of the runtime unchanged.
    let second = Runtime::open(options(&qemu, &state_dir)).await.unwrap_err();
    assert!(matches!(second, RuntimeError::StateLocked { .. }), "{second}");
    let before = runtime.get(&vm).unwrap();
    drop(runtime);
    let runtime = Runtime::open(options(&qemu, &state_dir)).await.unwrap();
    let after = runtime.get(&vm).unwrap();
    assert_eq!(
        serde_json::to_value(&after.app).unwrap(),
        serde_json::to_value(&before.app).unwrap()
    );
    assert_eq!(after.status, before.status);
    assert_eq!(after.created_at, before.created_at);
    assert_eq!(after.base_image_digest, before.base_image_digest);

    // The UEFI VM boots through OVMF, with the seed attached as a second, read-only disk.
    runtime.start(&vm).await.unwrap();
    let mut serial = Serial::connect("uefi", &runtime.serial_socket_path(&vm).unwrap()).await;
    serial.wait_for_line(READY_BANNER, BOOT_TIMEOUT).await;
    assert_eq!(serial.run("cat /sys/block/vdb/ro").await, vec!["1"]);
    runtime.force_stop(&vm).await.unwrap();
    assert_eq!(runtime.get(&vm).unwrap().status.phase, VmPhase::Stopped);
}

/// Boots a VM from a disk file: consoles, pause/resume, memory and disk snapshots, a live clone
/// that boots with the copied data, graceful stop, restore into a stopped VM, delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_snapshots_clone_and_delete() {
    let Some((qemu, disk)) = prerequisites("runtime-lifecycle") else {
        return;
    };
    let scratch = ScratchDirectory::new("rt-life").unwrap();
    let state_dir = scratch.path().join("state");
    let _reaper = QemuReaper {
        state_dir: state_dir.clone(),
    };
    let runtime = Runtime::open(options(&qemu, &state_dir)).await.unwrap();
    let vm = id("life");
    let image = format!("file:{}", disk.display());
    runtime
        .create(app("life", &image, "Manual", json!({})))
        .await
        .unwrap();

    let started = runtime.start(&vm).await.unwrap();
    assert_eq!(started.status.phase, VmPhase::Running);
    assert!(started.status.accelerator.is_some());
    let pid = started.status.pid.unwrap();
    assert!(process_alive(pid));
    let mut serial = Serial::connect("life", &runtime.serial_socket_path(&vm).unwrap()).await;
    serial.wait_for_line(READY_BANNER, BOOT_TIMEOUT).await;
    assert_invalid_transition(runtime.start(&vm).await, "start a running VM");
    assert_invalid_transition(runtime.resume(&vm).await, "resume a running VM");
    assert!(runtime.vnc_socket_path(&vm).unwrap().exists());

    let png = runtime.screenshot(&vm).await.unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    let lit = lit_fraction_of_png(&png);
    assert!(lit > 0.001, "the screen is blank ({lit})");

    let paused = runtime.pause(&vm).await.unwrap();
    assert_eq!(paused.status.phase, VmPhase::Paused);
    assert_invalid_transition(runtime.pause(&vm).await, "pause a paused VM");
    assert_eq!(runtime.get(&vm).unwrap().status.phase, VmPhase::Paused);
    assert_eq!(runtime.resume(&vm).await.unwrap().status.phase, VmPhase::Running);

    // State to snapshot: a file on the data disk and a shell variable (memory only).
    serial
        .run("echo first > /data/marker && sync; PADDOCK_MARK=before")
        .await;
    let snapshot = runtime.snapshot_create(&vm, "with-memory", true).await.unwrap();
    assert!(snapshot.memory);
    assert_eq!(runtime.get(&vm).unwrap().status.phase, VmPhase::Running);
    serial
        .run("echo second > /data/marker && sync; PADDOCK_MARK=after")
        .await;
    assert_eq!(serial.run("cat /data/marker").await, vec!["second"]);
    let restored = runtime.snapshot_restore(&vm, "with-memory").await.unwrap();
    assert_eq!(restored.status.phase, VmPhase::Running);
    assert_eq!(restored.status.pid, Some(pid), "a live restore keeps the process");
    assert_eq!(
        serial.run("echo mark=$PADDOCK_MARK; cat /data/marker").await,
        vec!["mark=before", "first"]
    );

    // Disk-only snapshots of a running VM are allowed; restoring one needs a stopped VM.
    runtime.snapshot_create(&vm, "disk-live", false).await.unwrap();
    assert_invalid_transition(
        runtime.snapshot_restore(&vm, "disk-live").await,
        "restore a disk-only snapshot into a running VM",
    );
    assert_eq!(runtime.get(&vm).unwrap().status.phase, VmPhase::Running);
    assert_eq!(
        runtime
            .snapshot_create(&vm, "disk-live", false)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::AlreadyExists
    );

    // A clone of the running VM is an independent copy of its disk as of now.
    let clone = id("life-clone");
    let cloned = runtime.clone_vm(&vm, &clone).await.unwrap();
    assert_eq!(
        cloned.status.phase,
        VmPhase::Stopped,
        "Manual clones wait to be started"
    );
    assert!(cloned.snapshots.is_empty());
    serial.run("echo after-clone > /data/marker && sync").await;

    // Graceful stop: the guest sees the power button and powers off.
    assert_eq!(
        runtime.stop(&vm, GRACEFUL_TIMEOUT).await.unwrap(),
        StopOutcome::GuestShutDown
    );
    serial
        .wait_for(SHUTTING_DOWN_PREFIX, BOOT_TIMEOUT, |line| {
            line.contains(SHUTTING_DOWN_PREFIX)
        })
        .await;
    let stopped = runtime.get(&vm).unwrap();
    assert_eq!(stopped.status.phase, VmPhase::Stopped);
    assert_eq!(stopped.status.last_exit.as_ref().unwrap().kind, ExitKind::Stopped);
    assert_eq!(stopped.status.pid, None);
    assert_eq!(stopped.app.spec.run_strategy.as_str(), "Manual");
    assert!(!process_alive(pid), "qemu must be gone after the stop");

    // Disk-only snapshot and restore of a stopped VM, offline.
    runtime.snapshot_create(&vm, "disk-stopped", false).await.unwrap();
    runtime.snapshot_restore(&vm, "disk-live").await.unwrap();
    let overlay = state_dir.join("vms/default/life/overlay.qcow2");
    let listed = qemu_img_snapshots(&overlay);
    for name in ["with-memory", "disk-live", "disk-stopped"] {
        assert!(listed.contains(name), "{name} missing from:\n{listed}");
    }
    runtime.snapshot_delete(&vm, "disk-stopped").await.unwrap();
    assert!(!qemu_img_snapshots(&overlay).contains("disk-stopped"));
    let names: Vec<String> = runtime
        .snapshot_list(&vm)
        .unwrap()
        .into_iter()
        .map(|snapshot| snapshot.name)
        .collect();
    assert_eq!(names, ["with-memory", "disk-live"]);

    // The clone boots with the data it was copied with, unaffected by later writes.
    runtime.start(&clone).await.unwrap();
    let mut clone_serial = Serial::connect("clone", &runtime.serial_socket_path(&clone).unwrap()).await;
    clone_serial.wait_for_line(READY_BANNER, BOOT_TIMEOUT).await;
    assert_eq!(clone_serial.run("cat /data/marker").await, vec!["first"]);

    // Restart: the guest powers off gracefully and a new QEMU boots it again.
    let clone_pid = runtime.get(&clone).unwrap().status.pid.unwrap();
    let restarted = runtime.restart(&clone, GRACEFUL_TIMEOUT).await.unwrap();
    clone_serial
        .wait_for(SHUTTING_DOWN_PREFIX, BOOT_TIMEOUT, |line| {
            line.contains(SHUTTING_DOWN_PREFIX)
        })
        .await;
    assert_eq!(restarted.status.phase, VmPhase::Running);
    assert_ne!(restarted.status.pid, Some(clone_pid));
    assert!(!process_alive(clone_pid));

    // Restoring a memory snapshot into the stopped VM starts it right in the saved state.
    let resumed = runtime.snapshot_restore(&vm, "with-memory").await.unwrap();
    assert_eq!(resumed.status.phase, VmPhase::Running);
    let mut serial = Serial::connect("life-restored", &runtime.serial_socket_path(&vm).unwrap()).await;
    assert_eq!(
        serial.run("echo mark=$PADDOCK_MARK; cat /data/marker").await,
        vec!["mark=before", "first"]
    );

    // Delete refuses while snapshots exist, unless forced (which also switches the VM off).
    let refused = runtime.delete(&vm, false).await.unwrap_err();
    assert!(
        matches!(refused, RuntimeError::HasSnapshots { count: 2, .. }),
        "{refused}"
    );
    assert_eq!(runtime.get(&vm).unwrap().status.phase, VmPhase::Running);
    let restored_pid = runtime.get(&vm).unwrap().status.pid.unwrap();
    runtime.delete(&vm, true).await.unwrap();
    assert_eq!(runtime.get(&vm).unwrap_err().kind(), ErrorKind::NotFound);
    assert!(!state_dir.join("vms/default/life").exists());
    assert!(!process_alive(restored_pid));
    let clone_pid = runtime.get(&clone).unwrap().status.pid.unwrap();
    runtime.delete(&clone, false).await.unwrap();
    assert!(!process_alive(clone_pid));
    assert!(runtime.list().is_empty());
}

/// Boots a VM from an OCI layout with runStrategy Always in a deep state directory: the runtime
/// is dropped and re-opened while the VM runs (re-attach), QEMU is killed (restart), the VM is
/// force-stopped (Always becomes Halted) and started again (Halted becomes Always).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_restarts_after_a_crash_and_survives_a_runtime_restart() {
    let Some((qemu, disk)) = prerequisites("runtime-always") else {
        return;
    };
    let scratch = ScratchDirectory::new("rt-always").unwrap();
    let layout = scratch.path().join("layout");
    let image_options = paddock_oci::ImageOptions {
        tag: "test".to_string(),
        ..paddock_oci::ImageOptions::default()
    };
    paddock_oci::build_layout(&disk, &layout, &image_options, &mut paddock_oci::NoProgress).unwrap();
    // Deep enough that sockets cannot live in the VM directory.
    let state_dir = scratch
        .path()
        .join("a-state-directory-nested-deeply".repeat(3))
        .join("state");
    let _reaper = QemuReaper {
        state_dir: state_dir.clone(),
    };
    let mut runtime_options = options(&qemu, &state_dir);
    runtime_options.short_socket_dir = Some(scratch.path().join("run"));
    let runtime = Runtime::open(runtime_options.clone()).await.unwrap();
    let vm = id("always");
    let created = runtime
        .create(app(
            "always",
            &format!("oci:{}:test", layout.display()),
            "Always",
            json!({}),
        ))
        .await
        .unwrap();
    assert_eq!(
        created.status.phase,
        VmPhase::Running,
        "Always starts at creation"
    );
    let serial_socket = runtime.serial_socket_path(&vm).unwrap();
    assert!(
        serial_socket.starts_with(scratch.path().join("run")),
        "{}",
        serial_socket.display()
    );
    assert!(serial_socket.as_os_str().len() < 108);
    let mut serial = Serial::connect("always", &serial_socket).await;
    serial.wait_for_line(READY_BANNER, BOOT_TIMEOUT).await;
    let sha256sum = std::process::Command::new("sha256sum")
        .arg(&disk)
        .output()
        .unwrap();
    let digest = created.base_image_digest.strip_prefix("sha256:").unwrap();
    assert!(
        String::from_utf8_lossy(&sha256sum.stdout).starts_with(digest),
        "stored by content digest"
    );

    // A paddock restart: the VM keeps running and the new runtime re-attaches to it.
    let pid = created.status.pid.unwrap();
    drop(runtime);
    assert!(process_alive(pid), "qemu must outlive the runtime");
    serial.run("PADDOCK_MARK=kept").await;
    let runtime = Runtime::open(runtime_options.clone()).await.unwrap();
    let attached = runtime.get(&vm).unwrap();
    assert_eq!(attached.status.phase, VmPhase::Running);
    assert_eq!(attached.status.pid, Some(pid));
    assert_eq!(runtime.pause(&vm).await.unwrap().status.phase, VmPhase::Paused);
    assert_eq!(runtime.resume(&vm).await.unwrap().status.phase, VmPhase::Running);
    assert_eq!(serial.run("echo mark=$PADDOCK_MARK").await, vec!["mark=kept"]);

    // kill -9: no shutdown event, so a crash; Always starts a new QEMU.
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let restarted = wait_status(&runtime, &vm, |status| {
        status.phase == VmPhase::Running && status.pid.is_some_and(|new_pid| new_pid != pid)
    })
    .await;
    let last_exit = restarted.last_exit.clone().unwrap();
    assert_eq!(last_exit.kind, ExitKind::Crashed, "{last_exit:?}");
    assert!(restarted.restart_count >= 1);
    let mut serial = Serial::connect("always-restarted", &serial_socket).await;
    serial.wait_for_line(READY_BANNER, BOOT_TIMEOUT).await;

    // A guest poweroff is not a failure, but Always restarts after it too.
    let crashed_pid = restarted.pid.unwrap();
    serial.send_line("poweroff").await;
    let rebooted = wait_status(&runtime, &vm, |status| {
        status.phase == VmPhase::Running && status.pid.is_some_and(|new_pid| new_pid != crashed_pid)
    })
    .await;
    assert_eq!(rebooted.last_exit.as_ref().unwrap().kind, ExitKind::GuestShutdown);
    assert_eq!(rebooted.consecutive_failures, 0);

    // QEMU dying while no runtime watches is found out by the next runtime, which restarts it.
    let unwatched_pid = rebooted.pid.unwrap();
    drop(runtime);
    let killed = std::process::Command::new("kill")
        .args(["-9", &unwatched_pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    while process_alive(unwatched_pid) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let runtime = Runtime::open(runtime_options.clone()).await.unwrap();
    let recovered = wait_status(&runtime, &vm, |status| {
        status.phase == VmPhase::Running && status.pid.is_some_and(|new_pid| new_pid != unwatched_pid)
    })
    .await;
    let last_exit = recovered.last_exit.clone().unwrap();
    assert_eq!(last_exit.kind, ExitKind::Crashed);
    assert!(last_exit.message.contains("not running"), "{last_exit:?}");

    // Force stop: off at once, Always becomes Halted (virtctl stop), and nothing restarts it.
    let new_pid = recovered.pid.unwrap();
    runtime.force_stop(&vm).await.unwrap();
    let stopped = runtime.get(&vm).unwrap();
    assert_eq!(stopped.status.phase, VmPhase::Stopped);
    assert_eq!(stopped.app.spec.run_strategy.as_str(), "Halted");
    assert!(!process_alive(new_pid));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(runtime.get(&vm).unwrap().status.phase, VmPhase::Stopped);

    // A restart of the runtime keeps a Halted VM stopped; start makes it Always again.
    drop(runtime);
    let runtime = Runtime::open(runtime_options).await.unwrap();
    assert_eq!(runtime.get(&vm).unwrap().status.phase, VmPhase::Stopped);
    let started = runtime.start(&vm).await.unwrap();
    assert_eq!(started.app.spec.run_strategy.as_str(), "Always");
    assert_eq!(started.status.phase, VmPhase::Running);
    runtime.delete(&vm, false).await.unwrap();
    assert!(!process_alive(started.status.pid.unwrap()));
}
