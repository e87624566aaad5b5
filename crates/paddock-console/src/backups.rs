//! Backups from the console on the local backend: backups and restores as long-running
//! operations over `paddock_local::backup`, and the backups of a registry repository.
//!
//! Role: what [`crate::local::LocalBackend`]'s backup methods do; the format and the guarantees
//! of a backup are `paddock_local::backup`'s and `paddock_oci::backup`'s, exactly as the CLI's
//! `paddock backup` uses them. The operations table and the progress folding are shared with the
//! Kubernetes backend's backups (`crate::kubernetes`), which run `paddock_cluster::backup`.
//!
//! Contract:
//! - A request is checked before any work starts, so a refusal is an error answer and nothing
//!   runs: unknown VM (404), unusable repository or reference (400), a VM that cannot be backed up
//!   (422), a registry that cannot be reached or refuses access (502), a target VM that exists
//!   (409, or with `replace` one that is not stopped: 409 saying to stop it), a backup or restore
//!   of the same VM already running (409).
//! - A started backup or restore is an [`OperationView`] in [`Operations`]: `Running` while it
//!   works, with progress, then `Succeeded` with its result or `Failed` with the reason. A backup
//!   succeeds only once its manifest is pushed, which is also when its tag starts to exist: a
//!   failed backup is never listed as complete.
//! - Registry access: plain http with `insecure`, credentials from the server user's docker
//!   config (as the CLI without `--username`). The restored VM's disk is pulled by the runtime,
//!   which uses plain http for loopback registries only.
//! - Operations live in memory: the last [`KEPT_OPERATIONS`] ended ones are kept for clients that
//!   poll late; a restart of the server forgets them (the backups stay in the registry).

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use paddock_local::backup::{
    BackupError as LocalBackupError, BackupOptions, BackupProgress, BackupReport, BackupStage,
    RestoreOptions, backup, restore, restored_definition,
};
use paddock_local::{Runtime, VmId};
use paddock_oci::ImageOptions;
use paddock_oci::backup::{
    BackupEntry, BackupError as OciBackupError, check_repository, inspect_backup, list_backups,
};
use paddock_oci::registry::{
    BlobPhase, BlobProgress, PushOptions, RegistryError, RegistryOptions, TransferProgress,
};

use crate::backend::{
    BackendError, BackendResult, BackupListRequest, BackupRequest, BackupView, ErrorKind, OperationPhase,
    OperationProgress, OperationView, RestoreRequest, VmRef,
};
use crate::local::backend_error;
use crate::time::format_rfc3339;

/// How many ended operations stay readable.
pub const KEPT_OPERATIONS: usize = 64;
/// Upload chunk size (the CLI's default): an interrupted backup resumes at the last chunk.
const CHUNK_SIZE: u64 = 256 << 20;

/// How backups from the console push, in either mode: in [`CHUNK_SIZE`] chunks with `registry`.
pub(crate) fn push_options(registry: &RegistryOptions) -> PushOptions {
    PushOptions {
        registry: registry.clone(),
        chunk_size: Some(CHUNK_SIZE),
        ..PushOptions::default()
    }
}

/// The operations of one backend, running and recently ended, oldest first.
#[derive(Debug, Default)]
pub struct Operations {
    entries: Mutex<Vec<OperationView>>,
}

impl Operations {
    /// An empty table.
    pub fn new() -> Operations {
        Operations::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<OperationView>> {
        // A panic while holding the lock cannot leave an entry half-written (entries are replaced
        // whole), so a poisoned table is still consistent.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One operation.
    pub fn get(&self, id: &str) -> BackendResult<OperationView> {
        self.lock()
            .iter()
            .find(|operation| operation.id == id)
            .cloned()
            .ok_or_else(|| {
                BackendError::new(
                    ErrorKind::NotFound,
                    format!(
                        "no operation {id}: it never existed, or it ended long ago or before the server restarted; GET /api/v1/operations lists the known ones"
                    ),
                )
            })
    }

    /// Every operation, oldest first.
    pub fn list(&self) -> Vec<OperationView> {
        self.lock().clone()
    }

    /// Registers a new running operation on VM `vm`, unless one is running on it already.
    pub(crate) fn begin(&self, kind: &str, vm: &VmId, message: &str) -> BackendResult<OperationView> {
        let mut entries = self.lock();
        if let Some(running) = entries.iter().find(|operation| {
            operation.phase == OperationPhase::Running
                && operation.namespace == vm.namespace
                && operation.name == vm.name
        }) {
            return Err(BackendError::new(
                ErrorKind::InvalidTransition,
                format!(
                    "cannot {} virtual machine {vm} now: operation {} ({}) is still running on it; wait until it ends",
                    kind.to_lowercase().replace("backup", "back up"),
                    running.id,
                    running.kind
                ),
            ));
        }
        let operation = OperationView {
            id: operation_id(),
            kind: kind.to_string(),
            namespace: vm.namespace.clone(),
            name: vm.name.clone(),
            phase: OperationPhase::Running,
            progress: OperationProgress {
                stage: "Starting".to_string(),
                percent: Some(0),
                ..OperationProgress::default()
            },
            message: message.to_string(),
            started_at: now_rfc3339(),
            finished_at: None,
            result: None,
            backup: None,
        };
        entries.push(operation.clone());
        // Forget the oldest ended operations beyond the limit; running ones always stay.
        let ended = entries
            .iter()
            .filter(|operation| operation.phase != OperationPhase::Running)
            .count();
        let mut surplus = ended.saturating_sub(KEPT_OPERATIONS);
        entries.retain(|operation| {
            if surplus > 0 && operation.phase != OperationPhase::Running {
                surplus -= 1;
                false
            } else {
                true
            }
        });
        Ok(operation)
    }

    fn update(&self, id: &str, change: impl FnOnce(&mut OperationView)) {
        if let Some(operation) = self.lock().iter_mut().find(|operation| operation.id == id) {
            change(operation);
        }
    }

    pub(crate) fn progress(&self, id: &str, progress: OperationProgress, message: &str) {
        self.update(id, |operation| {
            operation.progress = progress;
            operation.message = message.to_string();
        });
    }

    pub(crate) fn finish(&self, id: &str, outcome: BackendResult<(String, Option<BackupView>)>) {
        self.update(id, |operation| {
            operation.finished_at = Some(now_rfc3339());
            match outcome {
                Ok((result, backup)) => {
                    operation.phase = OperationPhase::Succeeded;
                    operation.progress = OperationProgress {
                        stage: "Done".to_string(),
                        bytes_done: operation.progress.bytes_total,
                        bytes_total: operation.progress.bytes_total,
                        percent: Some(100),
                    };
                    operation.message = format!("{} done: {result}", operation.kind);
                    operation.result = Some(result);
                    operation.backup = backup;
                }
                Err(error) => {
                    operation.phase = OperationPhase::Failed;
                    operation.message = error.message;
                }
            }
        });
    }
}

fn now_rfc3339() -> String {
    format_rfc3339(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs())
            .unwrap_or(0),
    )
}

fn operation_id() -> String {
    let mut random = [0_u8; 6];
    // Without randomness the time keeps ids apart; they need to be unique, not secret.
    if getrandom::fill(&mut random).is_err() {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or(0);
        random.copy_from_slice(&nanos.to_le_bytes()[..6]);
    }
    format!(
        "op-{}",
        random
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<String>()
    )
}

pub(crate) fn registry_options(insecure: bool) -> RegistryOptions {
    RegistryOptions {
        insecure,
        credentials: None,
        docker_config_dir: None,
    }
}

/// The backend error for a registry-side failure of a backup, list or restore of `what`.
pub(crate) fn oci_error(what: &str, error: OciBackupError) -> BackendError {
    let kind = match &error {
        OciBackupError::Reference { .. } => ErrorKind::BadRequest,
        OciBackupError::NotABackup { .. } => ErrorKind::InvalidSpec,
        OciBackupError::Registry(registry) => match registry {
            RegistryError::Reference(_) => ErrorKind::BadRequest,
            RegistryError::NotFound { .. } => ErrorKind::NotFound,
            RegistryError::Credentials(_) | RegistryError::ClientSetup(_) => ErrorKind::Internal,
            _ => ErrorKind::BadGateway,
        },
        OciBackupError::Build(_) | OciBackupError::Io { .. } | OciBackupError::Json { .. } => {
            ErrorKind::Internal
        }
    };
    BackendError::new(kind, format!("{what}: {error}"))
}

fn local_backup_error(what: &str, error: LocalBackupError) -> BackendError {
    match error {
        LocalBackupError::Runtime(runtime) => {
            let mut mapped = backend_error(runtime);
            mapped.message = format!("{what}: {}", mapped.message);
            mapped
        }
        LocalBackupError::Image(oci) => oci_error(what, oci),
        LocalBackupError::Push { .. } => BackendError::new(ErrorKind::BadGateway, format!("{what}: {error}")),
        LocalBackupError::Task { .. } => BackendError::new(ErrorKind::Internal, format!("{what}: {error}")),
    }
}

pub(crate) fn backup_view(entry: &BackupEntry) -> BackupView {
    BackupView {
        reference: entry.reference.clone(),
        pinned_reference: entry.pinned_reference.clone(),
        tag: entry.tag.clone(),
        digest: entry.digest.clone(),
        size: entry.size,
        namespace: entry.info.namespace.clone(),
        name: entry.info.name.clone(),
        created_at: entry.info.created.clone(),
        disk_virtual_size: entry.info.disk_virtual_size,
        display_name: entry.info.definition.spec.display_name.clone(),
    }
}

/// The complete backups in a repository, oldest first, optionally of one VM.
pub async fn list(request: BackupListRequest) -> BackendResult<Vec<BackupView>> {
    let registry = registry_options(request.insecure);
    list_with(request, &registry).await
}

/// [`list`] with these registry options (the Kubernetes backend's credentials).
pub(crate) async fn list_with(
    request: BackupListRequest,
    registry: &RegistryOptions,
) -> BackendResult<Vec<BackupView>> {
    let mut entries = list_backups(&request.repository, registry)
        .await
        .map_err(|error| {
            oci_error(
                &format!("cannot list the backups in {}", request.repository),
                error,
            )
        })?;
    entries.retain(|entry| {
        request
            .namespace
            .as_ref()
            .is_none_or(|namespace| &entry.info.namespace == namespace)
            && request.vm.as_ref().is_none_or(|name| &entry.info.name == name)
    });
    Ok(entries.iter().map(backup_view).collect())
}

/// Checks a backup request and starts it (see the module contract).
pub async fn start_backup(
    runtime: Arc<Runtime>,
    operations: Arc<Operations>,
    vm: VmRef,
    request: BackupRequest,
) -> BackendResult<OperationView> {
    let id = VmId::new(vm.namespace.clone(), vm.name.clone()).map_err(|error| {
        BackendError::new(ErrorKind::NotFound, format!("no virtual machine {vm}: {error}"))
    })?;
    let info = runtime.get(&id).map_err(backend_error)?;
    if !info.app.spec.image.persistent {
        return Err(BackendError::new(
            ErrorKind::Unsupported,
            format!(
                "cannot back up virtual machine {id}: its disk is not persistent (spec.image.persistent: false) and is recreated from its image at every start; back up that image instead"
            ),
        ));
    }
    let what = format!("cannot back up virtual machine {id} to {}", request.repository);
    let registry = registry_options(request.insecure);
    check_registry(&what, &request.repository, &registry).await?;
    let operation = operations.begin(
        "Backup",
        &id,
        &format!("backing up {id} to {}", request.repository),
    )?;
    let options = BackupOptions {
        repository: request.repository.clone(),
        push: push_options(&registry),
        image: ImageOptions::default(),
    };
    let progress = Arc::new(OperationBackupProgress::new(
        Arc::clone(&operations),
        &operation.id,
    ));
    let operation_id = operation.id.clone();
    tokio::spawn(async move {
        let outcome = match backup(&runtime, &id, &options, progress).await {
            Ok(report) => {
                // The list reads the same manifest; a view from it matches what the list shows.
                let view = match inspect_backup(&report.reference, &registry).await {
                    Ok(entry) => backup_view(&entry),
                    Err(error) => {
                        tracing::warn!(%error, reference = %report.reference, "cannot read the new backup back");
                        report_view(&report)
                    }
                };
                tracing::info!(vm = %id, reference = %report.reference, "backup done");
                Ok((report.reference.clone(), Some(view)))
            }
            Err(error) => {
                tracing::warn!(vm = %id, %error, "backup failed");
                Err(local_backup_error(&what, error))
            }
        };
        operations.finish(&operation_id, outcome);
    });
    Ok(operation)
}

/// Checks that the registry of `repository` answers and lets these credentials push; `what` starts
/// the error message.
pub(crate) async fn check_registry(
    what: &str,
    repository: &str,
    registry: &RegistryOptions,
) -> BackendResult<()> {
    check_repository(repository, registry).await.map_err(|error| {
        let mut mapped = oci_error(what, error);
        if !registry.insecure && mapped.kind == ErrorKind::BadGateway {
            mapped
                .message
                .push_str(" (a registry that speaks plain http needs \"insecure\": true)");
        }
        mapped
    })
}

fn report_view(report: &BackupReport) -> BackupView {
    pushed_view(
        [
            &report.reference,
            &report.pinned_reference,
            &report.tag,
            &report.digest,
        ],
        &report.info,
    )
}

/// The view of a backup just pushed, from what the push reported, when the registry cannot be read
/// back (`[reference, pinned reference, tag, digest]`; the size is unknown there).
pub(crate) fn pushed_view(
    [reference, pinned_reference, tag, digest]: [&String; 4],
    info: &paddock_oci::backup::BackupInfo,
) -> BackupView {
    BackupView {
        reference: reference.clone(),
        pinned_reference: pinned_reference.clone(),
        tag: tag.clone(),
        digest: digest.clone(),
        size: 0,
        namespace: info.namespace.clone(),
        name: info.name.clone(),
        created_at: info.created.clone(),
        disk_virtual_size: info.disk_virtual_size,
        display_name: info.definition.spec.display_name.clone(),
    }
}

/// Checks a restore request and starts it (see the module contract).
pub async fn start_restore(
    runtime: Arc<Runtime>,
    operations: Arc<Operations>,
    request: RestoreRequest,
) -> BackendResult<OperationView> {
    let what = format!("cannot restore {}", request.reference);
    let entry = inspect_backup(&request.reference, &registry_options(request.insecure))
        .await
        .map_err(|error| oci_error(&what, error))?;
    let options = RestoreOptions {
        name: request.name.clone(),
        namespace: request.namespace.clone(),
        replace: request.replace,
    };
    let app = restored_definition(&entry, &options).map_err(|error| {
        let mut mapped = local_backup_error(&what, error);
        // A bad name is the request's fault, whatever the runtime calls it.
        if mapped.kind == ErrorKind::Internal {
            mapped.kind = ErrorKind::InvalidSpec;
        }
        mapped
    })?;
    let target = VmId::of_app(&app)
        .map_err(|error| BackendError::new(ErrorKind::InvalidSpec, format!("{what}: {error}")))?;
    match runtime.get(&target) {
        Ok(existing) if !request.replace => {
            return Err(BackendError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "{what}: virtual machine {target} exists ({}); choose another name, or replace it (stop it first)",
                    existing.status.phase
                ),
            ));
        }
        Ok(existing) if existing.status.phase.has_process() => {
            return Err(BackendError::new(
                ErrorKind::InvalidTransition,
                format!(
                    "{what}: virtual machine {target} is {}; stop it first, then restore again to replace it",
                    existing.status.phase
                ),
            ));
        }
        Ok(_) => {}
        Err(error) if error.kind() == paddock_local::ErrorKind::NotFound => {}
        Err(error) => return Err(backend_error(error)),
    }
    let operation = operations.begin(
        "Restore",
        &target,
        &format!("restoring {} as {target}", entry.pinned_reference),
    )?;
    operations.progress(
        &operation.id,
        OperationProgress {
            // The runtime's pull reports no progress: the bar is indeterminate until done.
            stage: "Pulling".to_string(),
            bytes_done: 0,
            bytes_total: 0,
            percent: None,
        },
        &format!(
            "pulling and verifying {} ({} bytes), then creating {target}",
            entry.pinned_reference, entry.size
        ),
    );
    let operation_id = operation.id.clone();
    let start = request.start;
    tokio::spawn(async move {
        let outcome = async {
            let mut info = restore(&runtime, &entry, &options)
                .await
                .map_err(|error| local_backup_error(&what, error))?;
            if start && !info.status.phase.has_process() {
                info = runtime.start(&info.id).await.map_err(|error| {
                    let mut mapped = backend_error(error);
                    mapped.message = format!("restored {}, but cannot start it: {}", info.id, mapped.message);
                    mapped
                })?;
            }
            tracing::info!(vm = %info.id, from = %entry.pinned_reference, "restore done");
            Ok((info.id.to_string(), None))
        }
        .await;
        if let Err(error) = &outcome {
            tracing::warn!(vm = %target, %error, "restore failed");
        }
        operations.finish(&operation_id, outcome);
    });
    Ok(operation)
}

/// The progress of one backup (local or cluster), folded into its operation.
pub(crate) struct OperationBackupProgress {
    operations: Arc<Operations>,
    id: String,
    state: Mutex<ProgressState>,
}

/// The stages an operation shows, whichever backend backs up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Snapshotting and exporting (local: copying the snapshot; cluster: VirtualMachineSnapshot
    /// and VirtualMachineExport).
    Exporting,
    /// Downloading the exported disk (cluster).
    Downloading,
    /// Converting the downloaded disk to qcow2 (cluster).
    Converting,
    Compressing,
    Uploading,
}

#[derive(Debug, Default)]
struct ProgressState {
    stage: Option<Stage>,
    /// Bytes of the current download or compression, and their total (0: unknown).
    done: u64,
    total: u64,
    /// Blobs of the push by digest: (bytes done, size).
    blobs: HashMap<String, (u64, u64)>,
    /// Messages of the backup worth keeping (e.g. what could not be cleaned up).
    warnings: Vec<String>,
}

// Shares of the whole backup, in percent: the export is quick next to compressing and uploading.
const EXPORT_SHARE: u64 = 10;
const BUILD_SHARE: u64 = 50;
const PUSH_SHARE: u64 = 39;

impl OperationBackupProgress {
    /// The progress of operation `id`.
    pub(crate) fn new(operations: Arc<Operations>, id: &str) -> OperationBackupProgress {
        OperationBackupProgress {
            operations,
            id: id.to_string(),
            state: Mutex::new(ProgressState::default()),
        }
    }

    /// The warnings the backup reported so far.
    pub(crate) fn warnings(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .warnings
            .clone()
    }

    fn publish(&self, state: &ProgressState) {
        // Nothing known yet (total 0) counts as nothing done.
        let share = |done: u64, total: u64, width: u64| {
            done.min(total)
                .saturating_mul(width)
                .checked_div(total)
                .unwrap_or(0)
        };
        let (stage, done, total, percent, message) = match state.stage {
            None | Some(Stage::Exporting) => (
                "Exporting",
                0,
                0,
                0,
                "snapshotting the disk and copying the snapshot".to_string(),
            ),
            Some(Stage::Downloading) => (
                "Downloading",
                state.done,
                state.total,
                share(state.done, state.total, EXPORT_SHARE),
                "downloading the exported disk".to_string(),
            ),
            Some(Stage::Converting) => (
                "Converting",
                0,
                0,
                EXPORT_SHARE,
                "converting the exported disk to qcow2 (allocated clusters only)".to_string(),
            ),
            Some(Stage::Compressing) => (
                "Compressing",
                state.done,
                state.total,
                EXPORT_SHARE + share(state.done, state.total, BUILD_SHARE),
                "compressing and hashing the disk copy".to_string(),
            ),
            Some(Stage::Uploading) => {
                let (done, total) = state
                    .blobs
                    .values()
                    .fold((0, 0), |(done, total), (blob_done, size)| {
                        (done + blob_done, total + size)
                    });
                (
                    "Uploading",
                    done,
                    total,
                    EXPORT_SHARE + BUILD_SHARE + share(done, total, PUSH_SHARE),
                    "uploading to the registry (blobs it has are skipped)".to_string(),
                )
            }
        };
        self.operations.progress(
            &self.id,
            OperationProgress {
                stage: stage.to_string(),
                bytes_done: done,
                bytes_total: total,
                percent: u8::try_from(percent).ok(),
            },
            &message,
        );
    }

    fn with_state(&self, change: impl FnOnce(&mut ProgressState)) {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        change(&mut state);
        self.publish(&state);
    }

    fn enter(&self, stage: Stage, total: u64) {
        self.with_state(|state| {
            state.stage = Some(stage);
            state.done = 0;
            state.total = total;
        });
    }

    fn advance(&self, bytes: u64) {
        self.with_state(|state| state.done = state.done.saturating_add(bytes));
    }
}

impl TransferProgress for OperationBackupProgress {
    fn blob(&self, progress: &BlobProgress<'_>) -> ControlFlow<()> {
        self.with_state(|state| {
            let done = match progress.phase {
                BlobPhase::Skipped | BlobPhase::Finished => progress.size,
                BlobPhase::Started | BlobPhase::Transferring => progress.done,
            };
            state
                .blobs
                .insert(progress.digest.to_string(), (done, progress.size));
        });
        ControlFlow::Continue(())
    }
}

impl BackupProgress for OperationBackupProgress {
    fn stage(&self, stage: BackupStage) {
        match stage {
            BackupStage::Exporting => self.enter(Stage::Exporting, 0),
            BackupStage::Building { total } => self.enter(Stage::Compressing, total),
            BackupStage::Pushing => self.enter(Stage::Uploading, 0),
        }
    }

    fn built(&self, bytes: u64) {
        self.advance(bytes);
    }
}

impl paddock_cluster::backup::BackupProgress for OperationBackupProgress {
    fn stage(&self, stage: paddock_cluster::backup::BackupStage) {
        use paddock_cluster::backup::BackupStage as ClusterStage;
        match stage {
            ClusterStage::Snapshotting | ClusterStage::Exporting => self.enter(Stage::Exporting, 0),
            ClusterStage::Downloading { total } => self.enter(Stage::Downloading, total),
            ClusterStage::Converting => self.enter(Stage::Converting, 0),
            ClusterStage::Building { total } => self.enter(Stage::Compressing, total),
            ClusterStage::Pushing => self.enter(Stage::Uploading, 0),
        }
    }

    fn advanced(&self, bytes: u64) {
        self.advance(bytes);
    }

    fn message(&self, text: &str) {
        tracing::info!(operation = %self.id, "{text}");
        if text.starts_with("warning:") {
            self.with_state(|state| state.warnings.push(text.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use paddock_cluster::backup::BackupStage as ClusterStage;

    #[test]
    fn a_cluster_backup_moves_its_operation_forward_stage_by_stage() {
        let operations = Arc::new(Operations::new());
        let vm = VmId {
            namespace: "vms".to_string(),
            name: "web".to_string(),
        };
        let operation = operations.begin("Backup", &vm, "backing up").unwrap();
        let folded = OperationBackupProgress::new(Arc::clone(&operations), &operation.id);
        // The cluster's progress trait (the local one has a `stage` too).
        let progress: &dyn paddock_cluster::backup::BackupProgress = &folded;
        let seen = || operations.get(&operation.id).unwrap().progress;
        let mut percents = Vec::new();
        progress.stage(ClusterStage::Snapshotting);
        percents.push(seen());
        progress.stage(ClusterStage::Downloading { total: 100 });
        progress.advanced(50);
        let downloading = seen();
        assert_eq!(
            (
                downloading.stage.as_str(),
                downloading.bytes_done,
                downloading.bytes_total
            ),
            ("Downloading", 50, 100)
        );
        percents.push(downloading);
        progress.stage(ClusterStage::Converting);
        percents.push(seen());
        progress.stage(ClusterStage::Building { total: 10 });
        progress.advanced(10);
        percents.push(seen());
        progress.stage(ClusterStage::Pushing);
        percents.push(seen());
        let values: Vec<u8> = percents
            .iter()
            .map(|progress| progress.percent.unwrap())
            .collect();
        assert!(values.windows(2).all(|pair| pair[0] <= pair[1]), "{values:?}");
        assert!(values[0] < values[values.len() - 1], "{values:?}");
        // Warnings are kept for the result; other messages only go to the log.
        progress.message("exporting the disk");
        progress.message("warning: cannot delete VirtualMachineExport vms/x; delete it with kubectl");
        assert_eq!(folded.warnings().len(), 1);
    }
}
