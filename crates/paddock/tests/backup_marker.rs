//! A VM's data survives a backup from this machine into a cluster: a running local VM (real QEMU,
//! the paddock test disk) writes a marker file on its data partition, `paddock backup create`
//! backs it up while it runs, `paddock backup restore --dry-run` gives the VirtualMachineApp that
//! goes into the control-plane harness, the operator (the real `paddock operator`) makes the
//! DataVolume and VM, the simulated CDI imports the backup from a real docker-registry, and the
//! simulated virt-handler boots the imported disk: the marker is read back through the VMI's
//! serial console subresource, through kube-apiserver. Then back: `paddock backup create
//! --kubeconfig` backs the running cluster VM up (VirtualMachineSnapshot, VirtualMachineExport, the
//! disk downloaded through the export's external link with its token, both objects deleted
//! afterwards) and `paddock backup restore --start` boots it locally with the marker.
//!
//! Needs qemu, qemu-img, the test disk's prerequisites, docker-registry and the control-plane
//! harness; missing ones fail the test unless `PADDOCK_ALLOW_SKIP=1`.

// Helpers outside #[test] functions are not covered by clippy's allow-*-in-tests settings; in a
// test, failing loudly with the error's message is exactly the desired behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use kube::api::{Api, DynamicObject, PostParams};
use paddock_local::{AcceleratorChoice, Runtime, RuntimeOptions, VmId};
use paddock_tests::cluster::Cluster;
use paddock_tests::processes::QemuReaper;
use paddock_tests::qemu::{Accelerator, ScratchDirectory};
use paddock_tests::registry::{RegistryAuth, require_registry};
use paddock_tests::testdisk::{self, READY_BANNER};
use paddock_tests::world::{allow_insecure_registry, virtual_machine_apps, virtual_machines};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

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

/// Anything a console can be read from and written to.
trait Wire: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Wire for T {}

/// The `plain.kubevirt.io` websocket as a byte stream (binary frames both ways).
fn websocket_wire<W>(websocket: W) -> tokio::io::DuplexStream
where
    W: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
        + futures_util::Sink<Message>
        + Send
        + 'static,
{
    let (ours, theirs) = tokio::io::duplex(64 << 10);
    let (mut sink, mut stream) = websocket.split();
    let (mut reader, mut writer) = tokio::io::split(theirs);
    tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            if let Message::Binary(bytes) = message
                && writer.write_all(&bytes).await.is_err()
            {
                break;
            }
        }
    });
    tokio::spawn(async move {
        let mut buffer = [0u8; 4096];
        while let Ok(read) = reader.read(&mut buffer).await {
            if read == 0
                || sink
                    .send(Message::Binary(buffer[..read].to_vec().into()))
                    .await
                    .is_err()
            {
                break;
            }
        }
    });
    ours
}

/// A shell on a serial console (a local VM's unix socket or a VMI's `console` subresource): what
/// arrived so far, and commands whose output is framed by markers the guest shell computes (so the
/// echoed command line never matches them).
struct Console {
    wire: Box<dyn Wire>,
    seen: Vec<u8>,
    sequence: u64,
}

impl Console {
    fn new(wire: impl Wire + 'static) -> Console {
        Console {
            wire: Box::new(wire),
            seen: Vec::new(),
            sequence: 1000,
        }
    }

    async fn receive(&mut self, timeout: Duration) {
        let mut buffer = [0u8; 4096];
        if let Ok(read) = tokio::time::timeout(timeout, self.wire.read(&mut buffer)).await {
            let read = read.unwrap();
            assert!(read > 0, "the serial console closed");
            self.seen.extend_from_slice(&buffer[..read]);
        }
    }

    async fn send(&mut self, line: &str) {
        self.wire.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        self.wire.flush().await.unwrap();
    }

    /// Waits for `needle`; returns what came before it and forgets everything up to its end.
    async fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = String::from_utf8_lossy(&self.seen).into_owned();
            if let Some(position) = text.find(needle) {
                let before = text[..position].to_string();
                self.seen = text.as_bytes()[position + needle.len()..].to_vec();
                return before;
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            assert!(
                !remaining.is_zero(),
                "no {needle:?} within {timeout:?}; got:\n{text}"
            );
            self.receive(remaining.min(Duration::from_secs(1))).await;
        }
    }

    /// Like [`Console::wait_for`], `None` on timeout.
    async fn try_wait_for(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = String::from_utf8_lossy(&self.seen).into_owned();
            if let Some(position) = text.find(needle) {
                self.seen = text.as_bytes()[position + needle.len()..].to_vec();
                return Some(text[..position].to_string());
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return None;
            }
            self.receive(remaining.min(Duration::from_secs(1))).await;
        }
    }

    /// Waits until the guest shell answers (for a console opened after the boot banner).
    async fn wait_for_shell(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.send("echo shell-$((20+22))").await;
            if self
                .try_wait_for("shell-42", Duration::from_secs(5))
                .await
                .is_some()
            {
                return;
            }
            assert!(Instant::now() < deadline, "the guest shell does not answer");
        }
    }

    /// Runs `command` in the guest shell and returns its output lines.
    async fn run(&mut self, command: &str) -> Vec<String> {
        self.sequence += 1;
        let sequence = self.sequence;
        self.send(&format!(
            "echo BEGIN-$(({sequence}-1)); {command}; echo END-$(({sequence}-1))"
        ))
        .await;
        self.wait_for(&format!("BEGIN-{}\r\n", sequence - 1), COMMAND_TIMEOUT)
            .await;
        let output = self
            .wait_for(&format!("END-{}\r\n", sequence - 1), COMMAND_TIMEOUT)
            .await;
        output
            .lines()
            .map(|line| line.trim().to_string())
            .filter(|line| !line.is_empty())
            .collect()
    }
}

/// A local VM's serial socket, once QEMU created it.
async fn connect_serial(socket: &Path) -> tokio::net::UnixStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::net::UnixStream::connect(socket).await {
            Ok(stream) => return stream,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(error) => panic!("cannot connect to {}: {error}", socket.display()),
        }
    }
}

/// Kills the operator process when the test ends, however it ends.
struct OperatorProcess(std::process::Child);

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_operator(cluster: &Cluster, namespace: &str, log: &Path) -> OperatorProcess {
    let log = std::fs::File::create(log).unwrap();
    OperatorProcess(
        Command::new(env!("CARGO_BIN_EXE_paddock"))
            .args([
                "operator",
                "--namespace",
                namespace,
                "--lease-namespace",
                namespace,
            ])
            .args(["--identity", &format!("{namespace}-operator")])
            .args(["--console-gateway-url", "wss://console.paddock.test"])
            .args(["--listen", "127.0.0.1:0", "--retry-period-seconds", "1"])
            .env("KUBECONFIG", cluster.admin_kubeconfig())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marker_written_locally_is_there_after_a_restore_into_the_cluster() {
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let Some((qemu, disk)) = testdisk::qemu_and_test_disk("backup-marker").unwrap() else {
        return;
    };
    let Some(registry) = require_registry("backup-marker", RegistryAuth::None).unwrap() else {
        return;
    };
    let scratch = ScratchDirectory::new("backup-marker").unwrap();
    let state_dir = scratch.path().join("state");
    let state = state_dir.to_str().unwrap();
    let _reaper = QemuReaper {
        state_dir: state_dir.clone(),
    };
    let repository = format!("{}/backups/marked", registry.address());
    let marker = format!("marker-{}-{}", std::process::id(), registry.address().len());

    // A running local VM writes the marker; the runtime is closed again (the VM keeps running) so
    // the command line can open the state directory.
    {
        let mut options = RuntimeOptions::new(&state_dir);
        options.qemu_binary = Some(qemu.binary().to_path_buf());
        options.accelerator = match qemu.accelerator() {
            Accelerator::Kvm => AcceleratorChoice::Kvm,
            Accelerator::Tcg => AcceleratorChoice::Tcg,
        };
        let runtime = Runtime::open(options).await.unwrap();
        let app = serde_json::from_value(serde_json::json!({
            "apiVersion": "paddock.dev/v1alpha1",
            "kind": "VirtualMachineApp",
            "metadata": {"name": "marked"},
            "spec": {
                "displayName": "Marked VM",
                "image": {"containerDisk": format!("file:{}", disk.display())},
                "resources": {"cpu": 1, "memory": "256Mi"},
                "disk": {"size": "64Mi"},
                "runStrategy": "Manual",
                "console": {"serial": true},
            },
        }))
        .unwrap();
        let id = VmId::new("default", "marked").unwrap();
        runtime.create(app).await.unwrap();
        runtime.start(&id).await.unwrap();
        let socket = runtime.serial_socket_path(&id).unwrap();
        let mut console = Console::new(connect_serial(&socket).await);
        console.wait_for(READY_BANNER, BOOT_TIMEOUT).await;
        console
            .run(&format!("echo {marker} > /data/marker && sync"))
            .await;
        assert_eq!(console.run("cat /data/marker").await, vec![marker.clone()]);
    }
    let created: serde_json::Value = serde_json::from_str(&succeed(&[
        "backup",
        "create",
        "marked",
        &repository,
        "--insecure",
        "--state-dir",
        state,
        "--json",
    ]))
    .unwrap();
    assert_eq!(created["phase"], "Running", "backed up while it runs");
    let pinned = created["pinnedReference"].as_str().unwrap().to_string();

    let namespace = cluster.namespace("backup-marker").await.unwrap();
    let client = cluster.admin_client().await.unwrap();
    allow_insecure_registry(&client, registry.address(), Duration::from_secs(60))
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
    app["spec"]["runStrategy"] = serde_json::json!("Always");
    let apps: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace.name(), &virtual_machine_apps());
    apps.create(&PostParams::default(), &serde_json::from_value(app).unwrap())
        .await
        .unwrap();
    let operator_log = scratch.path().join("operator.log");
    let _operator = start_operator(cluster, namespace.name(), &operator_log);
    let machines: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace.name(), &virtual_machines());
    let deadline = Instant::now() + Duration::from_secs(180);
    let data_volumes: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        namespace.name(),
        &paddock_tests::world::data_volumes(),
    );
    loop {
        let machine = machines.get_opt("marked").await.unwrap();
        let imported = data_volumes
            .get_opt("marked-disk")
            .await
            .unwrap()
            .is_some_and(|object| object.data["status"]["phase"] == "Succeeded");
        if imported
            && machine
                .as_ref()
                .is_some_and(|object| object.data["status"]["printableStatus"] == "Running")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restored VM is not running: {machine:?}\noperator log:\n{}",
            std::fs::read_to_string(&operator_log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let path = format!(
        "/apis/subresources.kubevirt.io/v1/namespaces/{}/virtualmachineinstances/marked/console",
        namespace.name()
    );
    let (websocket, _) = cluster.websocket(&path, "plain.kubevirt.io", true).await.unwrap();
    let mut console = Console::new(websocket_wire(websocket));
    let boot_log = console.wait_for(READY_BANNER, BOOT_TIMEOUT).await;
    assert_eq!(
        console.run("cat /data/marker").await,
        vec![marker.clone()],
        "the restored VM in the cluster has the marker its local original wrote; its boot log:\n{boot_log}"
    );
    drop(console);

    // And back: the running cluster VM is backed up (snapshot, export, download through the
    // export proxy with the token) and restored locally under a new name.
    let kubeconfig = cluster.admin_kubeconfig();
    let from_cluster: serde_json::Value = serde_json::from_str(&succeed(&[
        "backup",
        "create",
        "marked",
        &repository,
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--namespace",
        namespace.name(),
        "--insecure",
        "--json",
    ]))
    .unwrap();
    assert_eq!(from_cluster["phase"], "Running", "snapshotted while it runs");
    assert_eq!(from_cluster["vm"], format!("{}/marked", namespace.name()));
    let snapshots: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        namespace.name(),
        &paddock_tests::world::virtual_machine_snapshots(),
    );
    let exports: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        namespace.name(),
        &paddock_tests::world::api_resource(
            "export.kubevirt.io",
            "v1beta1",
            "VirtualMachineExport",
            "virtualmachineexports",
        ),
    );
    assert!(
        exports.list(&Default::default()).await.unwrap().items.is_empty(),
        "the export is deleted after the backup"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !snapshots
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the snapshot is deleted after the backup"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let pinned_from_cluster = from_cluster["pinnedReference"].as_str().unwrap();
    let restored: serde_json::Value = serde_json::from_str(&succeed(&[
        "backup",
        "restore",
        pinned_from_cluster,
        "--name",
        "back",
        "--to-namespace",
        "default",
        "--start",
        "--insecure",
        "--state-dir",
        state,
        "--json",
    ]))
    .unwrap();
    assert_eq!(restored["vm"], "default/back");
    let runtime = Runtime::open(RuntimeOptions::new(&state_dir)).await.unwrap();
    let back = VmId::new("default", "back").unwrap();
    let socket = runtime.serial_socket_path(&back).unwrap();
    drop(runtime);
    let mut console = Console::new(connect_serial(&socket).await);
    console.wait_for(READY_BANNER, BOOT_TIMEOUT).await;
    assert_eq!(
        console.run("cat /data/marker").await,
        vec![marker],
        "the VM restored locally from the cluster's backup has the marker"
    );
}

/// `paddock move` both ways: a running local VM with a marker moves into the cluster (source
/// deleted once the copy runs), a move whose registry is unreachable fails and leaves its source
/// untouched, and the cluster VM moves back to this machine under a new name with its marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paddock_move_goes_to_the_cluster_and_back() {
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let Some((qemu, disk)) = testdisk::qemu_and_test_disk("move").unwrap() else {
        return;
    };
    let Some(registry) = require_registry("move", RegistryAuth::None).unwrap() else {
        return;
    };
    let scratch = ScratchDirectory::new("move").unwrap();
    let state_dir = scratch.path().join("state");
    let state = state_dir.to_str().unwrap();
    let _reaper = QemuReaper {
        state_dir: state_dir.clone(),
    };
    let repository = format!("{}/moves/traveller", registry.address());
    let marker = format!("travelled-{}", std::process::id());
    {
        let mut options = RuntimeOptions::new(&state_dir);
        options.qemu_binary = Some(qemu.binary().to_path_buf());
        options.accelerator = match qemu.accelerator() {
            Accelerator::Kvm => AcceleratorChoice::Kvm,
            Accelerator::Tcg => AcceleratorChoice::Tcg,
        };
        let runtime = Runtime::open(options).await.unwrap();
        let app = serde_json::from_value(serde_json::json!({
            "apiVersion": "paddock.dev/v1alpha1",
            "kind": "VirtualMachineApp",
            "metadata": {"name": "traveller"},
            "spec": {
                "image": {"containerDisk": format!("file:{}", disk.display())},
                "resources": {"cpu": 1, "memory": "256Mi"},
                "disk": {"size": "64Mi"},
                "runStrategy": "Always",
                "console": {"serial": true},
            },
        }))
        .unwrap();
        runtime.create(app).await.unwrap();
        let id = VmId::new("default", "traveller").unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while runtime.get(&id).unwrap().status.phase != paddock_local::VmPhase::Running {
            assert!(Instant::now() < deadline, "runStrategy Always starts the VM");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut console = Console::new(connect_serial(&runtime.serial_socket_path(&id).unwrap()).await);
        console.wait_for(READY_BANNER, BOOT_TIMEOUT).await;
        console
            .run(&format!("echo {marker} > /data/marker && sync"))
            .await;
    }
    let namespace = cluster.namespace("move").await.unwrap();
    let client = cluster.admin_client().await.unwrap();
    allow_insecure_registry(&client, registry.address(), Duration::from_secs(60))
        .await
        .unwrap();
    let _operator = start_operator(cluster, namespace.name(), &scratch.path().join("operator.log"));
    let kubeconfig = cluster.admin_kubeconfig();
    let kubeconfig = kubeconfig.to_str().unwrap();
    let in_cluster = format!("cluster:{}/traveller", namespace.name());

    let moved: serde_json::Value = serde_json::from_str(&succeed(&[
        "move",
        "local:traveller",
        &in_cluster,
        "--via",
        &repository,
        "--insecure",
        "--kubeconfig",
        kubeconfig,
        "--state-dir",
        state,
        "--delete-source",
        "--json",
    ]))
    .unwrap();
    assert_eq!(moved["sourceDeleted"], true);
    let runtime = Runtime::open(RuntimeOptions::new(&state_dir)).await.unwrap();
    assert!(
        runtime.get(&VmId::new("default", "traveller").unwrap()).is_err(),
        "the local source is deleted once the copy runs"
    );
    drop(runtime);
    let path = format!(
        "/apis/subresources.kubevirt.io/v1/namespaces/{}/virtualmachineinstances/traveller/console",
        namespace.name()
    );
    let (websocket, _) = cluster.websocket(&path, "plain.kubevirt.io", true).await.unwrap();
    let mut console = Console::new(websocket_wire(websocket));
    console.wait_for(READY_BANNER, BOOT_TIMEOUT).await;
    assert_eq!(console.run("cat /data/marker").await, vec![marker.clone()]);
    drop(console);

    // A move that cannot push fails at its first step and leaves the source as it was.
    let failed = paddock(&[
        "move",
        &in_cluster,
        "local:nowhere",
        "--via",
        "127.0.0.1:1/unreachable",
        "--insecure",
        "--kubeconfig",
        kubeconfig,
        "--state-dir",
        state,
        "--delete-source",
    ]);
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("is untouched"), "{stderr}");
    let apps: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace.name(), &virtual_machine_apps());
    assert!(apps.get_opt("traveller").await.unwrap().is_some());
    let machines: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace.name(), &virtual_machines());
    assert_eq!(
        machines.get("traveller").await.unwrap().data["status"]["printableStatus"],
        "Running"
    );

    succeed(&[
        "move",
        &in_cluster,
        "local:back",
        "--via",
        &repository,
        "--insecure",
        "--kubeconfig",
        kubeconfig,
        "--state-dir",
        state,
        "--delete-source",
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while apps.get_opt("traveller").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the cluster source is deleted");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let runtime = Runtime::open(RuntimeOptions::new(&state_dir)).await.unwrap();
    let back = VmId::new("default", "back").unwrap();
    assert_eq!(
        runtime.get(&back).unwrap().status.phase,
        paddock_local::VmPhase::Running
    );
    let socket = runtime.serial_socket_path(&back).unwrap();
    drop(runtime);
    let mut console = Console::new(connect_serial(&socket).await);
    // `move` already read the guest's first output: wait for its shell instead of the banner.
    console.wait_for_shell(BOOT_TIMEOUT).await;
    assert_eq!(console.run("cat /data/marker").await, vec![marker]);
}
