//! Backups of cluster VMs to a registry, and restores into a cluster, in paddock's backup format
//! (`paddock_oci::backup`): shared by `paddock backup`/`paddock move`, the console's Kubernetes
//! backend and the operator's backup schedules, so a backup made by any of them is the same.
//!
//! Role: the cluster half of a backup. The caller brings a client (its own credentials, or the
//! console's impersonating the signed-in user, so RBAC decides) and a progress receiver.
//!
//! Contract of [`backup`]:
//! - The source is a VirtualMachineApp's VM, or a plain KubeVirt VirtualMachine (its definition is
//!   then derived, see [`definition_of_machine`]).
//! - A running VM is snapshotted first (VirtualMachineSnapshot `<vm>-backup-<time>`); the disk is
//!   read through a VirtualMachineExport of the snapshot (or of the stopped VM) with its token,
//!   downloaded in raw form to a scratch directory, converted to qcow2 (only allocated clusters),
//!   built into a containerDisk image and pushed (blobs the registry has are not sent again; an
//!   interrupted push resumes).
//! - The snapshot and the export are deleted afterwards, also after a failure; what cannot be
//!   deleted is reported through [`BackupProgress::message`].
//! - The backup is complete only once its manifest is pushed (the format's completeness rule), so
//!   a failure at any step leaves no listed backup behind.
//! - The push's upload sessions outlive the scratch directory: between runs they wait in
//!   `<scratch parent>/paddock-cluster-backup-sessions/<namespace>/<name>/`, so a rerun after an
//!   interrupted push (the same disk content gives the same layer) continues the layer at its last
//!   acknowledged chunk instead of sending it again.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kube::api::{ApiResource, DeleteParams, DynamicObject, PostParams};
use paddock_api::app::VirtualMachineApp;
use paddock_oci::ImageOptions;
use paddock_oci::backup::BackupInfo;
use paddock_oci::registry::{PushOptions, PushReport, TransferProgress};

/// How long a backup waits for the snapshot and then the export to be ready, and a replacing
/// restore for the old VirtualMachineApp to go.
const CLUSTER_WAIT: Duration = Duration::from_secs(600);

/// Errors of cluster backups and restores.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A Kubernetes API call failed.
    #[error("cannot {action}: {source}")]
    Kubernetes {
        /// What was attempted, with the object's name.
        action: String,
        /// The underlying error.
        source: kube::Error,
    },
    /// The VM to back up does not exist.
    #[error("there is no KubeVirt VirtualMachine {namespace}/{name}{hint}")]
    NoVirtualMachine {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// What to check.
        hint: &'static str,
    },
    /// A restore would replace a VirtualMachineApp without being asked to.
    #[error("VirtualMachineApp {namespace}/{name} exists; restore with replace or choose another name")]
    Exists {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// A snapshot or export failed, or did not become ready in time.
    #[error("{0}")]
    NotReady(String),
    /// The export's status lacks something the backup needs.
    #[error("the VirtualMachineExport {name} cannot be read: {reason}")]
    Export {
        /// The export.
        name: String,
        /// What is missing and what to do.
        reason: String,
    },
    /// Downloading the disk failed.
    #[error("cannot download the exported disk from {url}: {reason}; run the backup again")]
    Download {
        /// The export link.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// A scratch file could not be written.
    #[error("cannot {action} {path}: {source}; check free space in the temporary directory")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `qemu-img` failed or is missing.
    #[error("qemu-img convert of the exported disk failed: {0}")]
    QemuImg(String),
    /// The definition could not be carried over.
    #[error("cannot {action}: {source}")]
    Definition {
        /// What was attempted.
        action: &'static str,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// The repository is not a registry reference.
    #[error("invalid backup repository {repository:?}: {reason}")]
    Repository {
        /// What was given.
        repository: String,
        /// Why it does not parse.
        reason: String,
    },
    /// Building the image failed.
    #[error(transparent)]
    Build(#[from] paddock_oci::backup::BackupError),
    /// Pushing failed.
    #[error(
        "cannot push the backup to {reference}: {source}; run the backup again (finished blobs are not sent again)"
    )]
    Push {
        /// The backup's reference.
        reference: String,
        /// The underlying error.
        source: paddock_oci::registry::RegistryError,
    },
    /// A blocking task died.
    #[error("the {0} task failed; run the backup again")]
    Task(&'static str),
}

/// Result alias for this module.
pub type Result<T, E = BackupError> = std::result::Result<T, E>;

fn kubernetes(action: impl Into<String>) -> impl FnOnce(kube::Error) -> BackupError {
    let action = action.into();
    move |source| BackupError::Kubernetes { action, source }
}

fn not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(response) if response.code == 404)
}

/// Which of an export's links a backup reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExportLink {
    /// Through the export proxy (`status.links.external`): from outside the cluster.
    #[default]
    External,
    /// From the export server's Service (`status.links.internal`): from inside the cluster (the
    /// operator, the console).
    Internal,
}

impl ExportLink {
    fn status_key(self) -> &'static str {
        match self {
            ExportLink::External => "external",
            ExportLink::Internal => "internal",
        }
    }
}

/// An [`ApiResource`] from its parts.
pub fn api_resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.to_owned(),
        version: version.to_owned(),
        api_version: if group.is_empty() {
            version.to_owned()
        } else {
            format!("{group}/{version}")
        },
        kind: kind.to_owned(),
        plural: plural.to_owned(),
    }
}

/// A namespaced API over untyped objects.
pub type Dynamic = kube::Api<DynamicObject>;

/// The namespaced APIs a backup or restore uses.
pub struct ClusterApis {
    /// VirtualMachineApps.
    pub apps: Dynamic,
    /// KubeVirt VirtualMachines.
    pub machines: Dynamic,
    /// KubeVirt VirtualMachineInstances.
    pub instances: Dynamic,
    /// CDI DataVolumes.
    pub data_volumes: Dynamic,
    /// VirtualMachineSnapshots.
    pub snapshots: Dynamic,
    /// VirtualMachineExports.
    pub exports: Dynamic,
    /// Secrets (the export token).
    pub secrets: Dynamic,
}

impl ClusterApis {
    /// The APIs in `namespace`.
    pub fn new(client: &kube::Client, namespace: &str) -> ClusterApis {
        let api = |resource: ApiResource| Dynamic::namespaced_with(client.clone(), namespace, &resource);
        ClusterApis {
            apps: api(api_resource(
                "paddock.dev",
                "v1alpha1",
                "VirtualMachineApp",
                "virtualmachineapps",
            )),
            machines: api(api_resource(
                "kubevirt.io",
                "v1",
                "VirtualMachine",
                "virtualmachines",
            )),
            instances: api(api_resource(
                "kubevirt.io",
                "v1",
                "VirtualMachineInstance",
                "virtualmachineinstances",
            )),
            data_volumes: api(api_resource(
                "cdi.kubevirt.io",
                "v1beta1",
                "DataVolume",
                "datavolumes",
            )),
            snapshots: api(api_resource(
                "snapshot.kubevirt.io",
                "v1beta1",
                "VirtualMachineSnapshot",
                "virtualmachinesnapshots",
            )),
            exports: api(api_resource(
                "export.kubevirt.io",
                "v1beta1",
                "VirtualMachineExport",
                "virtualmachineexports",
            )),
            secrets: api(api_resource("", "v1", "Secret", "secrets")),
        }
    }
}

/// What a backup needs besides the cluster.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// `registry/repository`.
    pub repository: String,
    /// Registry access and chunking.
    pub push: PushOptions,
    /// Layer compression.
    pub image: ImageOptions,
    /// Which export link to read.
    pub link: ExportLink,
    /// Where the scratch directory goes (default: the system's temporary directory). It needs
    /// room for the raw disk and its compressed copy.
    pub scratch_parent: Option<std::path::PathBuf>,
}

/// What a backup did.
#[derive(Debug, Clone)]
pub struct BackupReport {
    /// `registry/repository:tag`.
    pub reference: String,
    /// `registry/repository@digest`, what a restore names.
    pub pinned_reference: String,
    /// The tag.
    pub tag: String,
    /// The backup's manifest digest.
    pub digest: String,
    /// The disk layer's digest.
    pub layer_digest: String,
    /// Whether the VM was running (and so was snapshotted first).
    pub running: bool,
    /// What the backup says about itself.
    pub info: BackupInfo,
    /// What the push sent and skipped.
    pub push: PushReport,
}

/// What a backup is doing, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupStage {
    /// Taking a VirtualMachineSnapshot of the running VM and waiting until it is ready.
    Snapshotting,
    /// Creating the VirtualMachineExport and waiting until it is ready.
    Exporting,
    /// Downloading the disk (`total` bytes, 0 when the server does not say).
    Downloading {
        /// Bytes to download.
        total: u64,
    },
    /// Converting the raw disk to qcow2.
    Converting,
    /// Compressing and hashing the disk (`total` bytes).
    Building {
        /// Bytes of the disk.
        total: u64,
    },
    /// Uploading to the registry.
    Pushing,
}

/// Receives the progress of [`backup`]: stages, bytes within the stage, the push's blobs and
/// messages worth showing (what was created, what could not be cleaned up).
pub trait BackupProgress: TransferProgress {
    /// A stage starts.
    fn stage(&self, stage: BackupStage);
    /// `bytes` more of the current stage's total are done.
    fn advanced(&self, bytes: u64);
    /// Something the user should read.
    fn message(&self, text: &str);
}

/// A [`BackupProgress`] that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoBackupProgress;

impl TransferProgress for NoBackupProgress {
    fn blob(&self, _progress: &paddock_oci::registry::BlobProgress<'_>) -> std::ops::ControlFlow<()> {
        std::ops::ControlFlow::Continue(())
    }
}

impl BackupProgress for NoBackupProgress {
    fn stage(&self, _stage: BackupStage) {}
    fn advanced(&self, _bytes: u64) {}
    fn message(&self, _text: &str) {}
}

/// The VirtualMachineApp a plain KubeVirt VM is backed up as: its name, namespace, labels and
/// annotations, CPU cores (`domain.cpu.cores`), memory (`domain.memory.guest`, else the memory
/// request), run strategy (or `running`), and a disk of `disk_size` bytes; the image is set by the
/// restore. Everything else (devices, networks, further volumes, instancetypes, cloud-init) is not
/// carried.
pub fn definition_of_machine(machine: &DynamicObject, disk_size: u64) -> Result<VirtualMachineApp> {
    let spec = &machine.data["spec"];
    let domain = &spec["template"]["spec"]["domain"];
    let memory = domain["memory"]["guest"]
        .as_str()
        .or_else(|| domain["resources"]["requests"]["memory"].as_str());
    let run_strategy = spec["runStrategy"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| {
            if spec["running"].as_bool() == Some(true) {
                "Always".to_owned()
            } else {
                "Halted".to_owned()
            }
        });
    let mut resources = serde_json::json!({ "cpu": domain["cpu"]["cores"].as_u64().unwrap_or(1) });
    if let Some(memory) = memory {
        resources["memory"] = serde_json::json!(memory);
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "paddock.dev/v1alpha1",
        "kind": "VirtualMachineApp",
        "metadata": {
            "name": machine.metadata.name,
            "namespace": machine.metadata.namespace,
            "labels": machine.metadata.labels,
            "annotations": machine.metadata.annotations,
        },
        "spec": {
            "image": {"containerDisk": "restore-sets-this"},
            "resources": resources,
            "disk": {"size": disk_size.to_string()},
            "runStrategy": run_strategy,
        },
    }))
    .map_err(|source| BackupError::Definition {
        action: "express the KubeVirt VM as a VirtualMachineApp",
        source,
    })
}

/// Waits until `ready` says the object is ready (`Ok(true)`) or failed (`Err`).
async fn wait_for(
    api: &Dynamic,
    name: &str,
    what: &str,
    ready: impl Fn(&DynamicObject) -> Result<bool>,
) -> Result<DynamicObject> {
    let deadline = Instant::now() + CLUSTER_WAIT;
    loop {
        let object = api
            .get_opt(name)
            .await
            .map_err(kubernetes(format!("read {what} {name}")))?;
        if let Some(object) = object {
            if ready(&object)? {
                return Ok(object);
            }
            if Instant::now() > deadline {
                return Err(BackupError::NotReady(format!(
                    "{what} {name} is not ready after {} s: {}; check the KubeVirt controllers",
                    CLUSTER_WAIT.as_secs(),
                    serde_json::to_string(&object.data["status"]).unwrap_or_default()
                )));
            }
        } else if Instant::now() > deadline {
            return Err(BackupError::NotReady(format!("{what} {name} does not exist")));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Backs up VirtualMachineApp (or KubeVirt VM) `namespace/name`: snapshot when it runs, export,
/// download the disk, build and push the backup image; the export and snapshot are deleted
/// afterwards whatever happened.
pub async fn backup(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    options: &BackupOptions,
    progress: Arc<dyn BackupProgress>,
) -> Result<BackupReport> {
    let apis = ClusterApis::new(client, namespace);
    let app = apis
        .apps
        .get_opt(name)
        .await
        .map_err(kubernetes(format!("read VirtualMachineApp {namespace}/{name}")))?;
    let machine = apis
        .machines
        .get_opt(name)
        .await
        .map_err(kubernetes(format!("read VirtualMachine {namespace}/{name}")))?;
    let Some(machine) = machine else {
        return Err(BackupError::NoVirtualMachine {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            hint: if app.is_some() {
                " (its VirtualMachineApp exists: wait until the operator created the VM)"
            } else {
                " and no VirtualMachineApp; check the name and namespace"
            },
        });
    };
    let running = apis
        .instances
        .get_opt(name)
        .await
        .map_err(kubernetes(format!(
            "read VirtualMachineInstance {namespace}/{name}"
        )))?
        .is_some();
    let (created, created_tag) = paddock_oci::backup::utc_timestamp(SystemTime::now());
    let object_name = {
        let mut object_name = format!("{name}-backup-{}", created_tag.to_lowercase());
        object_name.truncate(52);
        object_name.trim_end_matches('-').to_owned()
    };
    let mut scratch = tempfile::Builder::new();
    scratch.prefix("paddock-cluster-backup-");
    let scratch = match &options.scratch_parent {
        Some(parent) => scratch.tempdir_in(parent),
        None => scratch.tempdir(),
    }
    .map_err(|source| BackupError::Io {
        action: "create a scratch directory in",
        path: options.scratch_parent.clone().unwrap_or_else(std::env::temp_dir),
        source,
    })?;
    let names = Names {
        namespace,
        name,
        object_name: &object_name,
        created: &created,
        created_tag: &created_tag,
    };
    let result = backup_in(
        &apis,
        &names,
        (app, &machine, running),
        options,
        scratch.path(),
        progress.as_ref(),
    )
    .await;
    // Clean up whatever was created, also after a failure.
    let delete = DeleteParams::default();
    let mut leftovers = Vec::new();
    if let Err(error) = apis.exports.delete(&object_name, &delete).await
        && !not_found(&error)
    {
        leftovers.push(format!("VirtualMachineExport {namespace}/{object_name}: {error}"));
    }
    if running
        && let Err(error) = apis.snapshots.delete(&object_name, &delete).await
        && !not_found(&error)
    {
        leftovers.push(format!(
            "VirtualMachineSnapshot {namespace}/{object_name}: {error}"
        ));
    }
    if !leftovers.is_empty() {
        progress.message(&format!(
            "warning: cannot delete {}; delete it with kubectl",
            leftovers.join(", ")
        ));
    }
    result
}

/// The names one backup uses.
struct Names<'a> {
    namespace: &'a str,
    name: &'a str,
    /// The snapshot's and the export's name.
    object_name: &'a str,
    created: &'a str,
    created_tag: &'a str,
}

async fn backup_in(
    apis: &ClusterApis,
    names: &Names<'_>,
    (app, machine, running): (Option<DynamicObject>, &DynamicObject, bool),
    options: &BackupOptions,
    scratch: &Path,
    progress: &dyn BackupProgress,
) -> Result<BackupReport> {
    let Names {
        namespace,
        name,
        object_name,
        ..
    } = *names;
    let source = if running {
        progress.stage(BackupStage::Snapshotting);
        progress.message(&format!(
            "{namespace}/{name} is running: taking VirtualMachineSnapshot {object_name}"
        ));
        take_snapshot(apis, names).await?;
        serde_json::json!({"apiGroup": "snapshot.kubevirt.io", "kind": "VirtualMachineSnapshot", "name": object_name})
    } else {
        serde_json::json!({"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": name})
    };
    progress.stage(BackupStage::Exporting);
    progress.message(&format!(
        "exporting the disk (VirtualMachineExport {object_name})"
    ));
    let raw_path = scratch.join("disk.img");
    download_export(apis, names, source, options.link, &raw_path, progress).await?;
    let virtual_size = std::fs::metadata(&raw_path)
        .map_err(|source| BackupError::Io {
            action: "read",
            path: raw_path.clone(),
            source,
        })?
        .len();
    // Only allocated clusters are kept, as a local backup's flattened qcow2.
    progress.stage(BackupStage::Converting);
    let disk = scratch.join("disk.qcow2");
    let output = tokio::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw_path)
        .arg(&disk)
        .output()
        .await
        .map_err(|error| {
            BackupError::QemuImg(format!("cannot run qemu-img ({error}); install qemu-utils"))
        })?;
    if !output.status.success() {
        return Err(BackupError::QemuImg(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ));
    }
    let _ = std::fs::remove_file(&raw_path);
    let definition = match app {
        Some(app) => serde_json::to_value(&app)
            .and_then(serde_json::from_value)
            .map_err(|source| BackupError::Definition {
                action: "read the VirtualMachineApp",
                source,
            })?,
        None => definition_of_machine(machine, virtual_size)?,
    };
    let repository = paddock_api::image_reference::ImageReference::parse(&options.repository)
        .map_err(|error| BackupError::Repository {
            repository: options.repository.clone(),
            reason: error.to_string(),
        })?
        .name();
    let tag = paddock_oci::backup::backup_tag(name, names.created_tag);
    let reference = format!("{repository}:{tag}");
    let info = BackupInfo {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        created: names.created.to_owned(),
        disk_virtual_size: virtual_size,
        definition: paddock_oci::backup::portable_definition(&definition),
    };
    let image_options = ImageOptions {
        tag: tag.clone(),
        reference: Some(reference.clone()),
        ..options.image.clone()
    };
    let layout = scratch.join("layout");
    let disk_bytes = std::fs::metadata(&disk)
        .map_err(|source| BackupError::Io {
            action: "read",
            path: disk.clone(),
            source,
        })?
        .len();
    progress.stage(BackupStage::Building { total: disk_bytes });
    let built = {
        let (layout, info) = (layout.clone(), info.clone());
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let build = tokio::task::spawn_blocking(move || {
            let mut report = |bytes: u64| {
                let _ = sender.send(bytes);
            };
            paddock_oci::backup::build_backup_layout(&disk, &layout, &info, &image_options, &mut report)
        });
        while let Some(bytes) = receiver.recv().await {
            progress.advanced(bytes);
        }
        build.await.map_err(|_| BackupError::Task("image build"))??
    };
    progress.stage(BackupStage::Pushing);
    let push_options = PushOptions {
        image: None,
        ..options.push.clone()
    };
    let sessions = sessions_directory(options, namespace, name);
    paddock_oci::registry::move_upload_sessions(&sessions, &layout);
    let pushed = paddock_oci::registry::push(&layout, &reference, &push_options, progress).await;
    if pushed.is_err() {
        // Sessions of blobs now complete are gone from the layout; the others serve a rerun.
        if std::fs::create_dir_all(&sessions).is_ok() {
            paddock_oci::registry::move_upload_sessions(&layout, &sessions);
        }
    } else {
        // Nothing is left to resume: remove this VM's directory and the parents it leaves empty
        // (`remove_dir` refuses a directory another backup still uses).
        let mut directory = Some(sessions.as_path());
        for _ in 0..3 {
            match directory {
                Some(path) if std::fs::remove_dir(path).is_ok() => directory = path.parent(),
                _ => break,
            }
        }
    }
    let report = pushed.map_err(|source| BackupError::Push {
        reference: reference.clone(),
        source,
    })?;
    Ok(BackupReport {
        pinned_reference: format!("{repository}@{}", built.manifest_digest),
        reference,
        tag,
        digest: built.manifest_digest,
        layer_digest: built.image.layer.digest,
        running,
        info,
        push: report,
    })
}

/// Where the upload sessions of backups of `namespace/name` wait between runs.
fn sessions_directory(options: &BackupOptions, namespace: &str, name: &str) -> std::path::PathBuf {
    options
        .scratch_parent
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join("paddock-cluster-backup-sessions")
        .join(namespace)
        .join(name)
}

async fn take_snapshot(apis: &ClusterApis, names: &Names<'_>) -> Result<()> {
    let Names {
        namespace,
        name,
        object_name,
        ..
    } = *names;
    let snapshot: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "snapshot.kubevirt.io/v1beta1",
        "kind": "VirtualMachineSnapshot",
        "metadata": {"name": object_name, "labels": {"paddock.dev/backup-of": name}},
        "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": name}},
    }))
    .map_err(|source| BackupError::Definition {
        action: "write the VirtualMachineSnapshot",
        source,
    })?;
    apis.snapshots
        .create(&PostParams::default(), &snapshot)
        .await
        .map_err(kubernetes(format!(
            "create VirtualMachineSnapshot {namespace}/{object_name}"
        )))?;
    wait_for(&apis.snapshots, object_name, "VirtualMachineSnapshot", |object| {
        let status = &object.data["status"];
        if status["phase"] == "Failed" {
            return Err(BackupError::NotReady(format!(
                "VirtualMachineSnapshot {object_name} failed: {}",
                serde_json::to_string(&status["error"]).unwrap_or_default()
            )));
        }
        Ok(status["readyToUse"].as_bool() == Some(true))
    })
    .await?;
    Ok(())
}

/// Exports `source` and downloads its disk in raw form to `raw_path`.
async fn download_export(
    apis: &ClusterApis,
    names: &Names<'_>,
    source: serde_json::Value,
    link: ExportLink,
    raw_path: &Path,
    progress: &dyn BackupProgress,
) -> Result<()> {
    let Names {
        namespace,
        name,
        object_name,
        ..
    } = *names;
    let export_error = |reason: String| BackupError::Export {
        name: format!("{namespace}/{object_name}"),
        reason,
    };
    let export: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "export.kubevirt.io/v1beta1",
        "kind": "VirtualMachineExport",
        "metadata": {"name": object_name, "labels": {"paddock.dev/backup-of": name}},
        "spec": {"source": source, "ttlDuration": "1h"},
    }))
    .map_err(|source| BackupError::Definition {
        action: "write the VirtualMachineExport",
        source,
    })?;
    apis.exports
        .create(&PostParams::default(), &export)
        .await
        .map_err(kubernetes(format!(
            "create VirtualMachineExport {namespace}/{object_name}"
        )))?;
    let export = wait_for(&apis.exports, object_name, "VirtualMachineExport", |object| {
        Ok(object.data["status"]["phase"] == "Ready")
    })
    .await?;
    let status = &export.data["status"];
    let token_secret = status["tokenSecretRef"].as_str().ok_or_else(|| {
        export_error("it is Ready but names no token secret (status.tokenSecretRef)".into())
    })?;
    let secret = apis.secrets.get(token_secret).await.map_err(kubernetes(format!(
        "read the export token Secret {namespace}/{token_secret}"
    )))?;
    let token = secret.data["data"]["token"]
        .as_str()
        .and_then(|encoded| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.decode(encoded).ok()
        })
        .and_then(|token| String::from_utf8(token).ok())
        .ok_or_else(|| {
            export_error(format!(
                "its token Secret {token_secret} has no base64 text `token`"
            ))
        })?;
    let link_kind = link.status_key();
    let link = &status["links"][link_kind];
    let volumes = link["volumes"].as_array().ok_or_else(|| {
        export_error(format!("it has no {link_kind} link; read the internal link from inside the cluster or configure KubeVirt's export proxy ingress"))
    })?;
    let preferred = format!("{name}-disk");
    let volume = volumes
        .iter()
        .find(|volume| volume["name"] == preferred.as_str())
        .or_else(|| volumes.first())
        .ok_or_else(|| export_error("it lists no volume".into()))?;
    let url = volume["formats"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|format| format["format"] == "raw")
        .and_then(|format| format["url"].as_str())
        .ok_or_else(|| export_error("it offers no raw (disk.img) format for the volume".into()))?;
    let download_error = |reason: String| BackupError::Download {
        url: url.to_owned(),
        reason,
    };
    let mut http = reqwest::Client::builder()
        .user_agent(concat!("paddock/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(300));
    if let Some(certificate) = link["cert"].as_str().filter(|text| !text.is_empty()) {
        let certificates = reqwest::Certificate::from_pem_bundle(certificate.as_bytes())
            .map_err(|error| export_error(format!("its link's cert is not PEM: {error}")))?;
        http = http.tls_certs_merge(certificates);
    }
    let http = http
        .build()
        .map_err(|error| download_error(format!("cannot set up the HTTP client: {error}")))?;
    let response = http
        .get(url)
        .header("x-kubevirt-export-token", &token)
        .send()
        .await
        .map_err(|error| download_error(error.to_string()))?;
    if !response.status().is_success() {
        let code = response.status();
        let body = response.text().await.unwrap_or_default();
        return Err(download_error(format!(
            "the export server answered {code}: {}",
            body.trim()
        )));
    }
    progress.stage(BackupStage::Downloading {
        total: response.content_length().unwrap_or(0),
    });
    let io_error = |action: &'static str| {
        move |source| BackupError::Io {
            action,
            path: raw_path.to_owned(),
            source,
        }
    };
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let mut file = tokio::fs::File::create(raw_path)
        .await
        .map_err(io_error("create"))?;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|error| download_error(format!("the download broke off: {error}")))?;
        file.write_all(&chunk).await.map_err(io_error("write"))?;
        progress.advanced(chunk.len() as u64);
    }
    file.flush().await.map_err(io_error("write"))?;
    Ok(())
}

/// Creates the VirtualMachineApp of a restore in the cluster (replacing one of that name when
/// `replace`, after the old one and its children are gone); the operator makes its DataVolume
/// (importing the backup by digest) and VM.
pub async fn restore(client: &kube::Client, app: &VirtualMachineApp, replace: bool) -> Result<()> {
    let namespace = app
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let name = app.metadata.name.clone().unwrap_or_default();
    let apis = ClusterApis::new(client, &namespace);
    let read = || kubernetes(format!("read VirtualMachineApp {namespace}/{name}"));
    if apis.apps.get_opt(&name).await.map_err(read())?.is_some() {
        if !replace {
            return Err(BackupError::Exists { namespace, name });
        }
        apis.apps
            .delete(&name, &DeleteParams::foreground())
            .await
            .map_err(kubernetes(format!("delete VirtualMachineApp {namespace}/{name}")))?;
        let deadline = Instant::now() + CLUSTER_WAIT;
        while apis.apps.get_opt(&name).await.map_err(read())?.is_some() {
            if Instant::now() > deadline {
                return Err(BackupError::NotReady(format!(
                    "VirtualMachineApp {namespace}/{name} is still being deleted; try again later"
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let object: DynamicObject = serde_json::to_value(app)
        .and_then(serde_json::from_value)
        .map_err(|source| BackupError::Definition {
            action: "write the VirtualMachineApp",
            source,
        })?;
    apis.apps
        .create(&PostParams::default(), &object)
        .await
        .map_err(kubernetes(format!("create VirtualMachineApp {namespace}/{name}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_kubevirt_vm_becomes_a_virtual_machine_app() {
        let machine: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "metadata": {"name": "db", "namespace": "team", "labels": {"tier": "data"}, "uid": "1"},
            "spec": {
                "running": true,
                "template": {"spec": {"domain": {"cpu": {"cores": 2}, "memory": {"guest": "1Gi"}}}},
            },
        }))
        .unwrap();
        let app = definition_of_machine(&machine, 64 << 20).unwrap();
        let value = serde_json::to_value(&app).unwrap();
        assert_eq!(value["metadata"]["name"], "db");
        assert_eq!(value["metadata"]["labels"]["tier"], "data");
        assert_eq!(value["spec"]["resources"]["cpu"], 2);
        assert_eq!(value["spec"]["resources"]["memory"], "1Gi");
        assert_eq!(value["spec"]["runStrategy"], "Always");
        assert_eq!(value["spec"]["disk"]["size"], (64u64 << 20).to_string());
    }
}
