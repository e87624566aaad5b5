//! Backups of local VMs to a registry, and restores from one.
//!
//! Role: the runtime side of `paddock backup` (the format is `paddock_oci::backup`'s): a
//! consistent copy of a VM's disk, turned into a backup image and pushed; and a VM created from
//! a backup. Everything goes through a [`Runtime`], so it needs the process that owns the state
//! directory: `paddock serve` (through its REST API) or the CLI on a state directory no server
//! holds.
//!
//! Contract:
//! - [`export_disk`] never reads a disk the guest is writing: it takes a disk-only snapshot
//!   (for a running VM at one instant, crash-consistent, through QMP; for a stopped VM offline),
//!   copies that snapshot — flattened with its base image into one qcow2 — with `qemu-img
//!   convert`, and deletes the snapshot again (also when the copy fails). The copy of an
//!   unchanged disk is byte-for-byte the same, so its layer digest is too. One export per VM runs
//!   at a time; a `paddock-backup-*` snapshot left by an export whose process was killed is
//!   deleted by the next one.
//! - [`backup`] exports, builds the backup image in `<state>/backups/<namespace>/<name>/` and
//!   pushes it: blobs the registry has are skipped, the manifest goes last, so the tag only ever
//!   names a complete backup. When a push fails, its upload sessions are kept in
//!   `…/<name>/resume/`; the next backup of the same disk content continues them instead of
//!   sending those bytes again. Scratch files are removed either way.
//! - [`restore`] creates a VM from a backup's definition whose `containerDisk` is the backup
//!   pinned by digest (`registry/repository@sha256:…`): the runtime's pull verifies every blob
//!   against it, and the restored VM's manifest says where its disk came from. With `replace`,
//!   an existing VM of that name is deleted only after the backup was pulled and verified.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use paddock_api::app::VirtualMachineApp;
use paddock_oci::ImageOptions;
use paddock_oci::backup::{
    BackupEntry, BackupError as OciBackupError, BackupInfo, backup_tag, build_backup_layout,
    portable_definition, utc_timestamp,
};
use paddock_oci::registry::{PushOptions, PushReport, RegistryError, TransferProgress, push};

use crate::error::RuntimeError;
use crate::image::{ImageSource, ImageStore, random_hex, run_tool};
use crate::qemu::QemuPrograms;
use crate::runtime::{DEFAULT_GRACEFUL_STOP_TIMEOUT, Runtime, VmInfo};
use crate::state::{VmId, VmPhase};

/// Annotation set on a restored VirtualMachineApp: the backup it was restored from, pinned.
pub const ANNOTATION_RESTORED_FROM: &str = "paddock.dev/restored-from";

/// Errors of backing up and restoring.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The runtime refused or failed (VM missing, wrong phase, snapshot, qemu-img, create).
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Building or reading the backup image failed.
    #[error(transparent)]
    Image(#[from] OciBackupError),
    /// The push failed; rerunning the backup continues its uploads.
    #[error(
        "{source}; run the backup again: finished blobs are not sent again and unfinished uploads continue"
    )]
    Push {
        /// The registry error.
        source: RegistryError,
    },
    /// A task running blocking work failed.
    #[error("the {what} task failed: {details}; this is a bug in paddock, please report it")]
    Task {
        /// What the task did.
        what: &'static str,
        /// Why it failed.
        details: String,
    },
}

/// Result alias for this module.
pub type Result<T, E = BackupError> = std::result::Result<T, E>;

/// The name prefix of the snapshots exports take (and delete again).
const SNAPSHOT_PREFIX: &str = "paddock-backup-";

/// The VMs of this process's runtimes with an export in progress, by state directory and id.
static EXPORTING: std::sync::Mutex<Vec<(PathBuf, VmId)>> = std::sync::Mutex::new(Vec::new());

/// One export per VM at a time; released on drop.
struct BackupGuard {
    key: (PathBuf, VmId),
}

impl BackupGuard {
    fn acquire(runtime: &Runtime, id: &VmId) -> Result<BackupGuard> {
        let key = (runtime.state_dir().to_path_buf(), id.clone());
        let mut exporting = EXPORTING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if exporting.contains(&key) {
            return Err(RuntimeError::InvalidTransition {
                id: id.clone(),
                operation: "back up",
                phase: "being backed up".to_string(),
                hint: "wait until the backup in progress ends".to_string(),
            }
            .into());
        }
        exporting.push(key.clone());
        Ok(BackupGuard { key })
    }
}

impl Drop for BackupGuard {
    fn drop(&mut self) {
        let mut exporting = EXPORTING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        exporting.retain(|key| *key != self.key);
    }
}

/// A consistent copy of a VM's disk.
#[derive(Debug, Clone)]
pub struct ExportedDisk {
    /// The flattened qcow2.
    pub path: PathBuf,
    /// Its virtual size in bytes.
    pub virtual_size: u64,
    /// The VM's phase when the snapshot was taken.
    pub phase: VmPhase,
    /// The VM's definition at that moment.
    pub app: VirtualMachineApp,
}

/// Copies VM `id`'s disk, as of now, into a new qcow2 `dest` (which must not exist), through a
/// temporary disk-only snapshot (see the module contract).
pub async fn export_disk(runtime: &Runtime, id: &VmId, dest: &Path) -> Result<ExportedDisk> {
    let _exclusive = BackupGuard::acquire(runtime, id)?;
    export_disk_exclusive(runtime, id, dest).await
}

/// [`export_disk`] for a caller holding the VM's [`BackupGuard`].
async fn export_disk_exclusive(runtime: &Runtime, id: &VmId, dest: &Path) -> Result<ExportedDisk> {
    let info = runtime.get(id)?;
    if !info.app.spec.image.persistent {
        return Err(RuntimeError::Unsupported {
            message: format!(
                "virtual machine {id} has a non-persistent disk (spec.image.persistent: false), recreated from its image at every start; back up that image instead"
            ),
        }
        .into());
    }
    if dest.symlink_metadata().is_ok() {
        return Err(RuntimeError::AlreadyExists { id: id.clone() }.into());
    }
    let qemu_img = QemuPrograms::locate(None).qemu_img()?.to_path_buf();
    let overlay = runtime
        .state_dir()
        .join("vms")
        .join(&id.namespace)
        .join(&id.name)
        .join("overlay.qcow2");
    // Snapshots of an export that never finished (its process was killed) are ours to remove:
    // no other export of this VM can run (the guard here, the state lock across processes).
    for stale in info
        .snapshots
        .iter()
        .filter(|snapshot| snapshot.name.starts_with(SNAPSHOT_PREFIX))
    {
        runtime.snapshot_delete(id, &stale.name).await?;
    }
    let snapshot = format!("{SNAPSHOT_PREFIX}{}", random_hex(6));
    let taken = runtime.snapshot_create(id, &snapshot, false).await?;
    let mut partial = dest.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    // -U: a running QEMU holds the overlay's write lock. Reading the snapshot is safe anyway: its
    // clusters and tables are on disk (the snapshot is synced when QMP answers) and are never
    // written in place again while the snapshot exists (qcow2 copies them on write).
    let copied = run_tool(
        &qemu_img,
        &[
            "convert".into(),
            "-q".into(),
            "-U".into(),
            "-f".into(),
            "qcow2".into(),
            "-l".into(),
            format!("snapshot.name={snapshot}").into(),
            "-O".into(),
            "qcow2".into(),
            overlay.as_os_str().to_owned(),
            partial.as_os_str().to_owned(),
        ],
    )
    .await
    .and_then(|_| {
        std::fs::rename(&partial, dest).map_err(|source| RuntimeError::io("rename into place", dest, source))
    });
    if copied.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    let deleted = runtime.snapshot_delete(id, &snapshot).await;
    copied?;
    if let Err(error) = deleted {
        // The copy is good; a leftover snapshot only costs space and shows in the list.
        tracing::warn!(vm = %id, %snapshot, %error, "cannot delete the backup snapshot; delete it by hand");
    }
    Ok(ExportedDisk {
        path: dest.to_path_buf(),
        virtual_size: info.disk_size_bytes,
        phase: taken.taken_in_phase,
        app: info.app,
    })
}

/// Where and how to back up.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// `registry/repository` the backup goes to (tagged `<vm>-<UTC time>`).
    pub repository: String,
    /// How to push (registry access, chunk size, parallelism; `image` is ignored).
    pub push: PushOptions,
    /// Layer compression and its settings (`tag` and `reference` are set by the backup).
    pub image: ImageOptions,
}

/// What the backup is doing, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupStage {
    /// Taking the snapshot and copying the disk.
    Exporting,
    /// Compressing and hashing the disk copy (`total` bytes).
    Building {
        /// Bytes of the disk copy.
        total: u64,
    },
    /// Uploading to the registry.
    Pushing,
}

/// Receives the progress of [`backup`]: stages, disk bytes built, and the push's blobs.
pub trait BackupProgress: TransferProgress {
    /// A stage starts.
    fn stage(&self, stage: BackupStage);
    /// `bytes` more of the disk copy went into the layer.
    fn built(&self, bytes: u64);
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
    fn built(&self, _bytes: u64) {}
}

/// What [`backup`] did.
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
    /// The VM's phase when its disk was snapshotted.
    pub phase: VmPhase,
    /// What the backup says about itself.
    pub info: BackupInfo,
    /// What the push sent and skipped.
    pub push: PushReport,
}

/// Backs VM `id` up to `options.repository` (see the module contract).
pub async fn backup(
    runtime: &Runtime,
    id: &VmId,
    options: &BackupOptions,
    progress: Arc<dyn BackupProgress>,
) -> Result<BackupReport> {
    let repository = paddock_api::image_reference::ImageReference::parse(&options.repository)
        .map_err(|error| OciBackupError::Reference {
            reference: options.repository.clone(),
            reason: error.to_string(),
        })?
        .name();
    let vm_directory = runtime
        .state_dir()
        .join("backups")
        .join(&id.namespace)
        .join(&id.name);
    let _exclusive = BackupGuard::acquire(runtime, id)?;
    let resume = vm_directory.join("resume");
    crate::state::create_private_dir(&resume)?;
    // Scratch of a backup whose process was killed; no other backup of this VM runs now.
    if let Ok(entries) = std::fs::read_dir(&vm_directory) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with("run-") {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let run = vm_directory.join(format!("run-{}", random_hex(6)));
    crate::state::create_private_dir(&run)?;
    let result = backup_in(runtime, id, options, &repository, &run, &resume, progress).await;
    // Scratch only: the disk copy and the layout are rebuilt by the next run.
    let _ = std::fs::remove_dir_all(&run);
    result
}

async fn backup_in(
    runtime: &Runtime,
    id: &VmId,
    options: &BackupOptions,
    repository: &str,
    run: &Path,
    resume: &Path,
    progress: Arc<dyn BackupProgress>,
) -> Result<BackupReport> {
    progress.stage(BackupStage::Exporting);
    let now = SystemTime::now();
    let (created, created_tag) = utc_timestamp(now);
    let exported = export_disk_exclusive(runtime, id, &run.join("disk.qcow2")).await?;
    let tag = backup_tag(&id.name, &created_tag);
    let reference = format!("{repository}:{tag}");
    let info = BackupInfo {
        namespace: id.namespace.clone(),
        name: id.name.clone(),
        created,
        disk_virtual_size: exported.virtual_size,
        definition: portable_definition(&exported.app),
    };
    let image_options = ImageOptions {
        tag: tag.clone(),
        reference: Some(reference.clone()),
        ..options.image.clone()
    };
    let layout = run.join("layout");
    let disk_size = std::fs::metadata(&exported.path)
        .map_err(|source| RuntimeError::io("inspect", &exported.path, source))?
        .len();
    progress.stage(BackupStage::Building { total: disk_size });
    let built = {
        let disk = exported.path.clone();
        let layout = layout.clone();
        let info = info.clone();
        let progress = Arc::clone(&progress);
        tokio::task::spawn_blocking(move || {
            let mut report = |bytes: u64| progress.built(bytes);
            build_backup_layout(&disk, &layout, &info, &image_options, &mut report)
        })
        .await
        .map_err(|error| BackupError::Task {
            what: "image build",
            details: error.to_string(),
        })??
    };
    // The disk copy is in the layer now; free its space before the upload.
    let _ = std::fs::remove_file(&exported.path);
    paddock_oci::registry::move_upload_sessions(resume, &layout);
    progress.stage(BackupStage::Pushing);
    let push_options = PushOptions {
        image: None,
        ..options.push.clone()
    };
    let pushed = push(&layout, &reference, &push_options, progress.as_ref()).await;
    match pushed {
        Ok(report) => {
            // Sessions of blobs that are now complete are useless; others may serve a later run.
            paddock_oci::registry::move_upload_sessions(&layout, resume);
            Ok(BackupReport {
                pinned_reference: format!("{repository}@{}", built.manifest_digest),
                reference,
                tag,
                digest: built.manifest_digest,
                layer_digest: built.image.layer.digest,
                phase: exported.phase,
                info,
                push: report,
            })
        }
        Err(source) => {
            paddock_oci::registry::move_upload_sessions(&layout, resume);
            Err(BackupError::Push { source })
        }
    }
}

/// How to restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// The new VM's name; the backed-up VM's name when `None`.
    pub name: Option<String>,
    /// The new VM's namespace; the backed-up VM's when `None`.
    pub namespace: Option<String>,
    /// Replace a VM of that name if one exists (it is deleted once the backup is verified).
    pub replace: bool,
}

/// The VirtualMachineApp a restore of `entry` creates (see the module contract).
pub fn restored_definition(entry: &BackupEntry, options: &RestoreOptions) -> Result<VirtualMachineApp> {
    let mut app = portable_definition(&entry.info.definition);
    let name = options.name.clone().unwrap_or_else(|| entry.info.name.clone());
    let namespace = options
        .namespace
        .clone()
        .unwrap_or_else(|| entry.info.namespace.clone());
    VmId::new(namespace.clone(), name.clone())?;
    app.metadata.name = Some(name);
    app.metadata.namespace = Some(namespace);
    app.spec.image.container_disk = Some(entry.pinned_reference.clone());
    app.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(
            ANNOTATION_RESTORED_FROM.to_string(),
            entry.pinned_reference.clone(),
        );
    Ok(app)
}

/// Creates a VM from backup `entry` (as [`paddock_oci::backup::inspect_backup`] read it); it
/// starts if its run strategy says so.
pub async fn restore(runtime: &Runtime, entry: &BackupEntry, options: &RestoreOptions) -> Result<VmInfo> {
    let app = restored_definition(entry, options)?;
    let id = VmId::of_app(&app)?;
    match runtime.get(&id) {
        Ok(existing) if options.replace => {
            // Pull and verify first, into the image store the new VM then uses: a backup that
            // cannot be restored must not cost the VM it would replace.
            let qemu_img = QemuPrograms::locate(None).qemu_img()?.to_path_buf();
            let store = ImageStore::new(runtime.state_dir().join("images"));
            store
                .import(
                    &ImageSource::Registry(entry.pinned_reference.clone()),
                    &entry.pinned_reference,
                    &qemu_img,
                )
                .await?;
            if existing.status.phase.has_process() {
                let _ = runtime.stop(&id, DEFAULT_GRACEFUL_STOP_TIMEOUT).await;
            }
            runtime.delete(&id, true).await?;
        }
        Ok(_) => return Err(RuntimeError::AlreadyExists { id }.into()),
        Err(error) if error.kind() == crate::ErrorKind::NotFound => {}
        Err(error) => return Err(error.into()),
    }
    Ok(runtime.create(app).await?)
}
