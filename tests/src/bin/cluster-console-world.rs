//! The Kubernetes test world for the web console's browser test (`web/tests/console-kubernetes.test.mjs`).
//!
//! Role: Node cannot start the control plane, the KubeVirt simulator and the operator itself, so
//! this binary does: the shared test cluster ([`Cluster::shared`]), a fresh namespace, the real
//! `paddock operator` scoped to it and two replicas of the real `paddock serve --kubeconfig`
//! (cluster admin credentials, which it uses only with impersonation; one session key file), an
//! admin ServiceAccount bound to `cluster-admin`, a ServiceAccount `alice` with no rights and a
//! ServiceAccount `bob` who may view the VMs and open their serial consoles but not their screens,
//! all with TokenRequest tokens.
//! For backups from the console: a real docker-registry on loopback (the simulated importer may
//! pull from it over plain http) holding a small blank disk packaged by `paddock package`; the
//! consoles may speak plain http to it and read exports through the simulator's export proxy.
//!
//! Contract (stdout is for the driver; logs go to stderr):
//! - When everything is up, prints one JSON line
//!   `{"url", "replicaUrl", "namespace", "adminToken", "userToken", "user", "serialUserToken",
//!   "testDisk", "backupImage", "backupRepository"}` (the last two null without docker-registry);
//!   or `{"skip": "<why>"}` and exits 0 when the cluster's prerequisites are missing and
//!   `PADDOCK_ALLOW_SKIP=1`.
//! - Then reads commands from stdin, one a line, answering each with one JSON line:
//!   `grant` binds alice to a Role that lets her view the namespace's VMs and open their screens
//!   (`{"granted": true}`), `logs` returns the console's and the operator's logs (`{"logs"}`),
//!   `import-progress <datavolume> <phase> <progress>` writes a DataVolume's `status.phase` and
//!   `status.progress` in the namespace as CDI's importer would (`{"patched": true}`; for sources
//!   the simulator does not import, such as `http`, so a test can follow an import step by step).
//! - At the end of stdin (the driver quit or died) it stops the console and the operator; the
//!   cluster's watchdog stops the rest when this process ends.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use paddock_tests::cluster::{Cluster, ClusterError};
use paddock_tests::world::{WorldError, paddock_binary, run};
use serde_json::{Value, json};

/// What went wrong while starting or driving the world.
#[derive(Debug, thiserror::Error)]
enum WorldBinaryError {
    #[error("the test cluster failed: {0}")]
    Cluster(#[from] ClusterError),
    #[error("a command failed: {0}")]
    World(#[from] WorldError),
    #[error("cannot {action}: {detail}")]
    Io { action: String, detail: String },
    #[error("paddock serve printed no URL; its log:\n{0}")]
    NoUrl(String),
    #[error("the test registry failed: {0}")]
    Registry(#[from] paddock_tests::registry::RegistryError),
}

fn io_error(action: &str) -> impl FnOnce(std::io::Error) -> WorldBinaryError + '_ {
    move |error| WorldBinaryError::Io {
        action: action.to_string(),
        detail: error.to_string(),
    }
}

/// A child process with its log file, killed on drop.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn log(&self) -> String {
        let log = std::fs::read(&self.log).unwrap_or_default();
        let start = log.len().saturating_sub(16000);
        String::from_utf8_lossy(&log[start..]).into_owned()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn main() {
    match serve_world() {
        Ok(()) => {}
        Err(error) => {
            eprintln!("cluster-console-world: {error}");
            std::process::exit(1);
        }
    }
}

fn say(value: &Value) -> Result<(), WorldBinaryError> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{value}").map_err(io_error("write to stdout"))?;
    stdout.flush().map_err(io_error("flush stdout"))
}

fn serve_world() -> Result<(), WorldBinaryError> {
    let Some(cluster) = Cluster::shared()? else {
        return say(&json!({"skip": "the Kubernetes test cluster's prerequisites are missing"}));
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_error("start a tokio runtime"))?;
    let namespace = runtime.block_on(cluster.namespace("web-console"))?;
    let ns = namespace.name().to_string();
    let directory = tempfile::tempdir().map_err(io_error("create a temporary directory"))?;

    let registry = paddock_tests::registry::require_registry(
        "web-console-backup",
        paddock_tests::registry::RegistryAuth::None,
    )?;
    let backup_image = match &registry {
        Some(registry) => Some(runtime.block_on(backup_image(cluster, registry, &directory))?),
        None => None,
    };
    // Two console replicas sharing one session key file, as the chart runs them.
    let session_key = directory.path().join("session-key");
    let mut key_bytes = [0_u8; 48];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| std::io::Read::read_exact(&mut random, &mut key_bytes))
        .map_err(io_error("generate a session key"))?;
    let key_text: String = key_bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    std::fs::write(&session_key, key_text).map_err(io_error("write the session key"))?;
    let (console, url) = start_console(cluster, &directory.path().join("console.log"), &session_key)?;
    let (replica, replica_url) = start_console(
        cluster,
        &directory.path().join("console-replica.log"),
        &session_key,
    )?;
    let operator = start_operator(cluster, &ns, &url, &directory.path().join("operator.log"))?;

    let admin_token = service_account_token(cluster, &directory, &ns, "console-admin")?;
    kubectl_apply(
        cluster,
        &directory,
        &json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": format!("{ns}-console-admin")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": "console-admin", "namespace": ns}],
        }),
    )?;
    let user_token = service_account_token(cluster, &directory, &ns, "alice")?;
    let serial_user_token = service_account_token(cluster, &directory, &ns, "bob")?;
    grant_serial_only(cluster, &directory, &ns)?;
    say(&json!({
        "url": url,
        // A second console with the same session key: it accepts the first one's sessions.
        "replicaUrl": replica_url,
        "namespace": ns,
        "adminToken": admin_token,
        "userToken": user_token,
        "user": format!("system:serviceaccount:{ns}:alice"),
        // bob may view the VMs and open their serial consoles, not their screens.
        "serialUserToken": serial_user_token,
        // For the browser upload: the test disk (a qcow2), or null when it cannot be built.
        "testDisk": paddock_tests::testdisk::test_disk().ok(),
        // For backups: a persistent VM's image, and where to back it up.
        "backupImage": backup_image,
        "backupRepository": registry.as_ref().map(|registry| format!("{}/backups/web", registry.address())),
    }))?;

    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(io_error("read stdin"))?;
        match line.trim() {
            "grant" => {
                grant_viewer(cluster, &directory, &ns)?;
                say(&json!({"granted": true}))?;
            }
            "logs" => say(&json!({"logs": format!("{}\n-----\n{}", console.log(), operator.log())}))?,
            "" => {}
            command if command.starts_with("import-progress ") => {
                let words: Vec<&str> = command.split_whitespace().collect();
                let answer = match words.as_slice() {
                    [_, data_volume, phase, progress] => {
                        match runtime.block_on(report_import(cluster, &ns, data_volume, phase, progress)) {
                            Ok(()) => json!({"patched": true}),
                            Err(error) => json!({"error": error.to_string()}),
                        }
                    }
                    _ => json!({"error": "use import-progress <datavolume> <phase> <progress>"}),
                };
                say(&answer)?;
            }
            other => say(
                &json!({"error": format!("unknown command {other:?}; use grant, logs or import-progress")}),
            )?,
        }
    }
    // The ClusterRoleBinding is not in the namespace: remove it, best effort.
    let _ = run(cluster.kubectl().args([
        "delete",
        "clusterrolebinding",
        &format!("{ns}-console-admin"),
        "--ignore-not-found",
    ]));
    drop(operator);
    drop(replica);
    drop(console);
    drop(registry);
    drop(namespace);
    Ok(())
}

/// Writes a DataVolume's import phase and progress through its status subresource, as CDI's
/// importer reports them.
async fn report_import(
    cluster: &Cluster,
    namespace: &str,
    data_volume: &str,
    phase: &str,
    progress: &str,
) -> Result<(), WorldBinaryError> {
    let client = cluster.admin_client().await?;
    let api: kube::Api<kube::api::DynamicObject> =
        kube::Api::namespaced_with(client, namespace, &paddock_tests::world::data_volumes());
    api.patch_status(
        data_volume,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"status": {"phase": phase, "progress": progress}})),
    )
    .await
    .map_err(|error| WorldBinaryError::Io {
        action: format!("patch the status of DataVolume {data_volume}"),
        detail: error.to_string(),
    })?;
    Ok(())
}

/// A blank 32 MiB disk packaged and pushed to `registry` (which the simulated importer may then
/// pull from over plain http); returns its reference.
async fn backup_image(
    cluster: &Cluster,
    registry: &paddock_tests::registry::Registry,
    directory: &tempfile::TempDir,
) -> Result<String, WorldBinaryError> {
    let client = cluster.admin_client().await?;
    paddock_tests::world::allow_insecure_registry(
        &client,
        registry.address(),
        std::time::Duration::from_secs(120),
    )
    .await?;
    let disk = directory.path().join("backup-source.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("32M"))?;
    let layout = directory.path().join("backup-source.oci");
    let reference = format!("{}/vms/backup-source:1", registry.address());
    run(Command::new(paddock_binary()?)
        .arg("package")
        .arg(&disk)
        .args(["--image", &reference, "--output"])
        .arg(&layout))?;
    run(Command::new(paddock_binary()?)
        .arg("push")
        .arg(&layout)
        .arg(&reference)
        .arg("--insecure"))?;
    Ok(reference)
}

/// `paddock serve --kubeconfig <admin>` on a free port; returns it and its base URL.
fn start_console(
    cluster: &Cluster,
    log: &std::path::Path,
    session_key: &std::path::Path,
) -> Result<(Process, String), WorldBinaryError> {
    let mut child = Command::new(paddock_binary()?)
        .arg("serve")
        .arg("--kubeconfig")
        .arg(cluster.admin_kubeconfig())
        .args(["--listen", "127.0.0.1:0"])
        // The simulator's upload proxy (URL from CDIConfig) has a certificate of the test CA.
        .arg("--upload-proxy-ca-file")
        .arg(cluster.simulator_ca())
        .arg("--session-key-file")
        .arg(session_key)
        // Backups: plain http to the loopback registry; the console runs outside the cluster, so
        // it reads exports through the (simulated) export proxy.
        .args(["--registry-allow-insecure", "--backup-export-link", "external"])
        .env("RUST_LOG", "info,paddock_console=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).map_err(io_error("create the console log"))?)
        .spawn()
        .map_err(io_error("start paddock serve"))?;
    let process_log = log.to_path_buf();
    let Some(stdout) = child.stdout.take() else {
        return Err(WorldBinaryError::NoUrl(String::new()));
    };
    let process = Process {
        child,
        log: process_log,
    };
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        let Some(Ok(line)) = lines.next() else {
            return Err(WorldBinaryError::NoUrl(process.log()));
        };
        if let Some(url) = line.strip_prefix("paddock serve (kubernetes): ") {
            break url.trim().to_string();
        }
    };
    // Keep draining stdout so the console never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok((process, url))
}

/// The real operator, scoped to the namespace, writing Baffles URLs through the console.
fn start_operator(
    cluster: &Cluster,
    namespace: &str,
    console: &str,
    log: &std::path::Path,
) -> Result<Process, WorldBinaryError> {
    let file = std::fs::File::create(log).map_err(io_error("create the operator log"))?;
    let child = Command::new(paddock_binary()?)
        .args([
            "operator",
            "--namespace",
            namespace,
            "--lease-namespace",
            namespace,
        ])
        .args(["--identity", &format!("{namespace}-operator")])
        .args(["--console-gateway-url", &console.replacen("http://", "ws://", 1)])
        .args(["--listen", "127.0.0.1:0", "--retry-period-seconds", "1"])
        .env("KUBECONFIG", cluster.admin_kubeconfig())
        .stdin(Stdio::null())
        .stdout(file.try_clone().map_err(io_error("share the operator log"))?)
        .stderr(file)
        .spawn()
        .map_err(io_error("start paddock operator"))?;
    Ok(Process {
        child,
        log: log.to_path_buf(),
    })
}

/// Applies a manifest as the cluster admin.
fn kubectl_apply(
    cluster: &Cluster,
    directory: &tempfile::TempDir,
    manifest: &Value,
) -> Result<(), WorldBinaryError> {
    let file = directory.path().join("manifest.json");
    std::fs::write(&file, manifest.to_string()).map_err(io_error("write the manifest"))?;
    run(cluster.kubectl().arg("apply").arg("-f").arg(&file))?;
    Ok(())
}

/// A ServiceAccount and a one-hour token for it (TokenRequest, through kubectl).
fn service_account_token(
    cluster: &Cluster,
    directory: &tempfile::TempDir,
    namespace: &str,
    name: &str,
) -> Result<String, WorldBinaryError> {
    kubectl_apply(
        cluster,
        directory,
        &json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}),
    )?;
    let token = run(cluster.kubectl().args([
        "create",
        "token",
        name,
        "--namespace",
        namespace,
        "--duration",
        "1h",
    ]))?;
    Ok(token.trim().to_string())
}

/// A Role that lets bob view the namespace's VMs and open their serial consoles
/// (`virtualmachineinstances/console`) but not their screens, and bob's RoleBinding to it.
fn grant_serial_only(
    cluster: &Cluster,
    directory: &tempfile::TempDir,
    namespace: &str,
) -> Result<(), WorldBinaryError> {
    kubectl_apply(
        cluster,
        directory,
        &json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "vm-serial-console", "namespace": namespace},
            "rules": [
                {"apiGroups": ["kubevirt.io"], "resources": ["virtualmachines", "virtualmachineinstances"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["subresources.kubevirt.io"], "resources": ["virtualmachineinstances/console"], "verbs": ["get"]},
                {"apiGroups": ["snapshot.kubevirt.io"], "resources": ["virtualmachinesnapshots"], "verbs": ["get", "list", "watch"]},
            ],
        }),
    )?;
    kubectl_apply(
        cluster,
        directory,
        &json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "bob-uses-serial-consoles", "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "vm-serial-console"},
            "subjects": [{"kind": "ServiceAccount", "name": "bob", "namespace": namespace}],
        }),
    )
}

/// The Role a VM viewer needs (VMs, their snapshots, the VNC screen) and alice's RoleBinding to it.
fn grant_viewer(
    cluster: &Cluster,
    directory: &tempfile::TempDir,
    namespace: &str,
) -> Result<(), WorldBinaryError> {
    kubectl_apply(
        cluster,
        directory,
        &json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "vm-viewer", "namespace": namespace},
            "rules": [
                {"apiGroups": ["kubevirt.io"], "resources": ["virtualmachines", "virtualmachineinstances"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["subresources.kubevirt.io"], "resources": ["virtualmachineinstances/vnc"], "verbs": ["get"]},
                {"apiGroups": ["snapshot.kubevirt.io"], "resources": ["virtualmachinesnapshots"], "verbs": ["get", "list", "watch"]},
            ],
        }),
    )?;
    kubectl_apply(
        cluster,
        directory,
        &json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "alice-views-vms", "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "vm-viewer"},
            "subjects": [{"kind": "ServiceAccount", "name": "alice", "namespace": namespace}],
        }),
    )
}
