//! Scheduled and requested backups of VirtualMachineApps (`spec.backup`) to an OCI registry, with
//! retention.
//!
//! Role: a scheduler that runs on the leader next to the controllers. Every tick it reads the apps
//! from the shared VirtualMachineApp cache and decides, with the pure [`decide`], whether a backup
//! is due (the schedule fired, or the annotation [`BACKUP_NOW_ANNOTATION`] has a value not yet acted
//! on). Due backups run as tasks, at most [`BackupSettings::concurrency`] at once, through
//! [`paddock_cluster::backup::backup`] (snapshot a running VM, export, download, push). After a
//! successful backup the VM's oldest complete backups beyond `keep` are deleted from the repository
//! ([`prune_selection`]).
//!
//! Contract:
//! - State lives in the app's status (`status.backup`, condition `BackupSucceeded`), written by
//!   server-side apply under the field manager [`FIELD_MANAGER`], separate from the app
//!   controller's, so neither removes the other's fields. `status.backup.lastScheduleTime` is the
//!   scheduled time last acted on; times missed while no operator ran are caught up with one backup
//!   (the latest missed time), never one per missed time, and never one from before the app existed.
//! - Removing `spec.backup` removes `status.backup` and the condition (an empty apply under the
//!   same field manager).
//! - A failed backup is recorded (`lastFailure`, condition False with what to do, a Warning Event)
//!   and tried again at the next scheduled time or on request, not in a loop.
//! - A registry that refuses deletes does not fail the backup: the condition stays True with reason
//!   `PruningNotPossible` and a Warning Event says so.
//! - Events: `BackupStarted`, `BackupCompleted`, `BackupFailed`, `BackupsPruned`, `BackupsNotPruned`.
//!   Metrics: `paddock_operator_backups_total{result}` and `paddock_operator_backup_duration_seconds`.
//! - An operator killed mid-backup has recorded nothing for it: the new leader runs it again (the
//!   push skips blobs the registry already has); the half-made snapshot and export carry the label
//!   `paddock.dev/backup-of` and expire (the export's TTL) or are deleted by hand.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::{
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::{Timestamp, tz::TimeZone},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        events::{Event, EventType, Recorder},
        reflector::Store,
    },
};
use paddock_api::app::{
    BACKUP_NOW_ANNOTATION, BackupFailure, BackupPolicy, BackupRecord, BackupStatus, VirtualMachineApp,
    condition::BACKUP_SUCCEEDED,
};
use paddock_cluster::backup::{BackupProgress, BackupStage, ExportLink};
use paddock_oci::registry::{BlobProgress, RegistryError, RegistryOptions, TransferProgress};

use crate::Metrics;

/// The field manager of the backup scheduler's status writes.
pub const FIELD_MANAGER: &str = "paddock-backups";

/// The key of a `kubernetes.io/dockerconfigjson` Secret's data.
const DOCKER_CONFIG_KEY: &str = ".dockerconfigjson";

/// How the scheduler runs.
#[derive(Clone, Debug)]
pub struct BackupSettings {
    /// How many backups run at the same time (at least 1). Each needs scratch space for one disk and
    /// network bandwidth to the export server and the registry.
    pub concurrency: usize,
    /// Which of a VirtualMachineExport's links backups read: the internal one (the export server's
    /// Service, reachable from the operator's pod) or the external one (through the export proxy).
    pub export_link: ExportLink,
    /// Where scratch directories go (the raw disk and its compressed copy); `None`: the system's
    /// temporary directory.
    pub scratch_directory: Option<PathBuf>,
    /// How often the scheduler looks at the apps.
    pub tick: Duration,
}

impl Default for BackupSettings {
    fn default() -> Self {
        BackupSettings {
            concurrency: 1,
            export_link: ExportLink::Internal,
            scratch_directory: None,
            tick: Duration::from_secs(10),
        }
    }
}

/// What makes a backup due.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Due {
    /// The scheduled time it is for (the latest one that passed), when the schedule fired.
    pub scheduled: Option<Timestamp>,
    /// The `paddock.dev/backup-now` value it answers, when one was requested.
    pub request: Option<String>,
}

/// What [`decide`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// A backup to run now.
    pub due: Option<Due>,
    /// The next scheduled time after now (`None` while suspended or with an unusable schedule).
    pub next: Option<Timestamp>,
    /// Why the schedule cannot be used.
    pub invalid_schedule: Option<String>,
}

fn civil(at: Timestamp) -> k8s_openapi::jiff::civil::DateTime {
    at.to_zoned(TimeZone::UTC).datetime()
}

fn timestamp(at: k8s_openapi::jiff::civil::DateTime) -> Option<Timestamp> {
    at.to_zoned(TimeZone::UTC).ok().map(|zoned| zoned.timestamp())
}

/// Decides whether `app` needs a backup at `now`, from its policy, its `paddock.dev/backup-now`
/// annotation and `status` (its `status.backup`, possibly newer than the app's copy). `None` for
/// an app without `spec.backup`.
pub fn decide(app: &VirtualMachineApp, status: Option<&BackupStatus>, now: Timestamp) -> Option<Decision> {
    let policy = app.spec.backup.as_ref()?;
    let request = app
        .annotations()
        .get(BACKUP_NOW_ANNOTATION)
        .filter(|value| status.and_then(|status| status.last_request.as_ref()) != Some(*value))
        .cloned();
    let created = app
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(now, |time| time.0);
    let mut decision = Decision {
        due: None,
        next: None,
        invalid_schedule: None,
    };
    let mut scheduled = None;
    match paddock_api::schedule::parse_schedule(&policy.schedule) {
        Err(error) => decision.invalid_schedule = Some(error.to_string()),
        Ok(_) if policy.suspend => {}
        Ok(cron) => {
            let last = status
                .and_then(|status| status.last_schedule_time.as_ref())
                .map_or(created, |time| time.0.max(created));
            scheduled = cron
                .find_previous_occurrence(&civil(now), true)
                .ok()
                .and_then(timestamp)
                .filter(|due| *due > last && *due <= now);
            decision.next = cron
                .find_next_occurrence(&civil(now), false)
                .ok()
                .and_then(timestamp);
            if decision.next.is_none() {
                decision.invalid_schedule = Some(format!(
                    "backup.schedule '{}' never fires after {now}: choose a date that exists",
                    policy.schedule
                ));
            }
        }
    }
    if scheduled.is_some() || request.is_some() {
        decision.due = Some(Due { scheduled, request });
    }
    Some(decision)
}

/// A backup in the repository, as retention sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredBackup {
    /// Its tag.
    pub tag: String,
    /// Its manifest digest.
    pub digest: String,
    /// The namespace of the VM it is a backup of.
    pub namespace: String,
    /// The name of that VM.
    pub name: String,
    /// When it was taken, RFC 3339 UTC.
    pub created: String,
}

impl From<&paddock_oci::backup::BackupEntry> for StoredBackup {
    fn from(entry: &paddock_oci::backup::BackupEntry) -> Self {
        StoredBackup {
            tag: entry.tag.clone(),
            digest: entry.digest.clone(),
            namespace: entry.info.namespace.clone(),
            name: entry.info.name.clone(),
            created: entry.info.created.clone(),
        }
    }
}

/// The backups of VM `namespace/name` to delete so that `keep` remain: its oldest, by creation
/// time (then tag). Other VMs' backups in the same repository are never selected, and neither is a
/// manifest that one of the kept backups shares (deleting a manifest deletes every tag naming it).
pub fn prune_selection(
    backups: &[StoredBackup],
    namespace: &str,
    name: &str,
    keep: u32,
) -> Vec<StoredBackup> {
    let mut own: Vec<&StoredBackup> = backups
        .iter()
        .filter(|backup| backup.namespace == namespace && backup.name == name)
        .collect();
    own.sort_by(|left, right| (&left.created, &left.tag).cmp(&(&right.created, &right.tag)));
    let excess = own
        .len()
        .saturating_sub(usize::try_from(keep.max(1)).unwrap_or(usize::MAX));
    let kept: HashSet<&str> = own[excess..]
        .iter()
        .map(|backup| backup.digest.as_str())
        .collect();
    let mut seen = HashSet::new();
    own[..excess]
        .iter()
        .filter(|backup| !kept.contains(backup.digest.as_str()) && seen.insert(backup.digest.clone()))
        .map(|backup| (*backup).clone())
        .collect()
}

/// What the scheduler's tasks share.
struct Shared {
    client: Client,
    settings: BackupSettings,
    recorder: Recorder,
    metrics: Metrics,
    semaphore: Arc<tokio::sync::Semaphore>,
    /// Apps (by uid) with a backup queued or running.
    in_flight: Mutex<HashSet<String>>,
    /// What this process last wrote, by app uid: the cache may not show it yet.
    written: Mutex<HashMap<String, (BackupStatus, Condition)>>,
    /// Apps (by uid) whose backup status was cleared after `spec.backup` went.
    cleared: Mutex<HashSet<String>>,
}

impl Shared {
    fn written(&self, uid: &str) -> Option<(BackupStatus, Condition)> {
        self.written.lock().ok()?.get(uid).cloned()
    }

    /// The app's backup status and condition: what this process wrote last, else the cache's.
    fn current(&self, app: &VirtualMachineApp) -> (Option<BackupStatus>, Option<Condition>) {
        if let Some((status, condition)) = self.written(&app.uid().unwrap_or_default()) {
            return (Some(status), Some(condition));
        }
        let status = app.status.as_ref();
        (
            status.and_then(|status| status.backup.clone()),
            status.and_then(|status| {
                status
                    .conditions
                    .iter()
                    .find(|condition| condition.type_ == BACKUP_SUCCEEDED)
                    .cloned()
            }),
        )
    }
}

/// Runs the scheduler over the apps in `apps` until the task is dropped or aborted.
pub(crate) async fn run(
    client: Client,
    apps: Store<VirtualMachineApp>,
    settings: BackupSettings,
    recorder: Recorder,
    metrics: Metrics,
) {
    let shared = Arc::new(Shared {
        client,
        semaphore: Arc::new(tokio::sync::Semaphore::new(settings.concurrency.max(1))),
        settings,
        recorder,
        metrics,
        in_flight: Mutex::default(),
        written: Mutex::default(),
        cleared: Mutex::default(),
    });
    let mut interval = tokio::time::interval(shared.settings.tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Running backups are tasks of their own; they end with the scheduler.
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        interval.tick().await;
        while tasks.try_join_next().is_some() {}
        let now = Timestamp::now();
        for app in apps.state() {
            if app.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let Some(uid) = app.uid() else { continue };
            if app.spec.backup.is_none() {
                let (status, condition) = shared.current(&app);
                let cleared = shared
                    .cleared
                    .lock()
                    .map(|cleared| cleared.contains(&uid))
                    .unwrap_or(true);
                if (status.is_some() || condition.is_some()) && !cleared {
                    clear_status(&shared, &app).await;
                }
                continue;
            }
            if let Ok(mut cleared) = shared.cleared.lock() {
                cleared.remove(&uid);
            }
            if shared
                .in_flight
                .lock()
                .map(|in_flight| in_flight.contains(&uid))
                .unwrap_or(true)
            {
                continue;
            }
            let (status, condition) = shared.current(&app);
            let Some(decision) = decide(&app, status.as_ref(), now) else {
                continue;
            };
            match decision.due.clone() {
                Some(due) => {
                    if let Ok(mut in_flight) = shared.in_flight.lock() {
                        in_flight.insert(uid.clone());
                    }
                    let shared = shared.clone();
                    tasks.spawn(async move {
                        run_one(&shared, &app, due, decision.next).await;
                        if let Ok(mut in_flight) = shared.in_flight.lock() {
                            in_flight.remove(&uid);
                        }
                    });
                }
                None => {
                    let desired = idle_status(&app, status, condition.as_ref(), &decision, now);
                    if Some(&desired.0) != shared.current(&app).0.as_ref()
                        || Some(&desired.1) != condition.as_ref()
                    {
                        write_status(&shared, &app, desired).await;
                    }
                }
            }
        }
    }
}

/// The status of an app without a backup due: the next time, and a condition for apps that never
/// had a backup or whose schedule cannot be used.
fn idle_status(
    app: &VirtualMachineApp,
    status: Option<BackupStatus>,
    condition: Option<&Condition>,
    decision: &Decision,
    now: Timestamp,
) -> (BackupStatus, Condition) {
    let mut status = status.unwrap_or_default();
    status.next_schedule_time = decision.next.map(Time);
    let policy = app.spec.backup.as_ref();
    let desired = match (&decision.invalid_schedule, condition) {
        (Some(message), _) => (
            "False",
            "InvalidSchedule",
            format!("{message}; fix spec.backup.schedule"),
        ),
        (None, Some(existing)) if existing.reason != "InvalidSchedule" => (
            existing.status.as_str(),
            existing.reason.as_str(),
            existing.message.clone(),
        ),
        (None, _) => match &status.last_backup {
            Some(last) => (
                "True",
                "BackupCompleted",
                format!("the last backup is {}", last.reference),
            ),
            None => (
                "Unknown",
                "NoBackupYet",
                match decision.next {
                    Some(next) if !policy.is_some_and(|policy| policy.suspend) => {
                        format!("no backup yet; the first is due at {next}")
                    }
                    _ => format!(
                        "no backup yet and the schedule is suspended; set the annotation {BACKUP_NOW_ANNOTATION} to back up now"
                    ),
                },
            ),
        },
    };
    let condition = make_condition(condition, desired.0, desired.1, desired.2, app, now);
    (status, condition)
}

fn make_condition(
    previous: Option<&Condition>,
    status: &str,
    reason: &str,
    message: String,
    app: &VirtualMachineApp,
    now: Timestamp,
) -> Condition {
    let last_transition_time = previous
        .filter(|previous| previous.status == status)
        .map_or(Time(now), |previous| previous.last_transition_time.clone());
    Condition {
        type_: BACKUP_SUCCEEDED.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: app.metadata.generation,
        last_transition_time,
    }
}

/// Runs one due backup of `app` (waiting for a free slot), then prunes and records the outcome.
async fn run_one(shared: &Shared, app: &VirtualMachineApp, due: Due, next: Option<Timestamp>) {
    let Some(policy) = app.spec.backup.clone() else {
        return;
    };
    let Ok(_permit) = shared.semaphore.clone().acquire_owned().await else {
        return;
    };
    let cause = match (&due.scheduled, &due.request) {
        (Some(at), _) => format!("scheduled for {at}"),
        (None, Some(request)) => format!("requested ({BACKUP_NOW_ANNOTATION}: {request})"),
        (None, None) => "due".to_owned(),
    };
    tracing::info!(app = %app.name_any(), namespace = app.namespace().unwrap_or_default(), %cause, "backing up");
    publish(
        shared,
        app,
        false,
        "BackupStarted",
        format!("backing up to {} ({cause})", policy.repository),
    )
    .await;
    let started = Instant::now();
    let outcome = back_up(shared, app, &policy).await;
    let elapsed = started.elapsed();
    let now = Timestamp::now();
    let (previous_status, previous_condition) = shared.current(app);
    let mut status = previous_status.unwrap_or_default();
    if due.scheduled.is_some() {
        status.last_schedule_time = due.scheduled.map(Time);
    }
    if due.request.is_some() {
        status.last_request = due.request.clone();
    }
    status.next_schedule_time = next.map(Time);
    let next_text = next.map_or_else(
        || "no scheduled backup is due (suspended)".to_owned(),
        |next| format!("the next is due at {next}"),
    );
    let condition = match outcome {
        Ok((report, registry)) => {
            shared.metrics.backup_finished("succeeded", elapsed);
            publish(
                shared,
                app,
                false,
                "BackupCompleted",
                format!(
                    "backed up to {} ({}) in {} s: {} bytes uploaded, {} blobs already in the registry",
                    report.pinned_reference,
                    report.tag,
                    elapsed.as_secs(),
                    report.push.bytes_uploaded,
                    report.push.blobs_skipped
                ),
            )
            .await;
            status.last_backup = Some(BackupRecord {
                time: Time(now),
                reference: report.pinned_reference.clone(),
                tag: report.tag.clone(),
                duration_seconds: elapsed.as_secs(),
            });
            let message = format!(
                "the last backup is {} ({}); {next_text}",
                report.pinned_reference, report.tag
            );
            match prune(shared, app, &policy, &registry).await {
                Ok(()) => make_condition(
                    previous_condition.as_ref(),
                    "True",
                    "BackupCompleted",
                    message,
                    app,
                    now,
                ),
                Err(problem) => make_condition(
                    previous_condition.as_ref(),
                    "True",
                    "PruningNotPossible",
                    format!("{message}; old backups were not pruned: {problem}"),
                    app,
                    now,
                ),
            }
        }
        Err(error) => {
            shared.metrics.backup_finished("failed", elapsed);
            tracing::warn!(app = %app.name_any(), %error, "backup failed");
            let message = format!(
                "backup to {} failed: {error}; {next_text}, or set the annotation {BACKUP_NOW_ANNOTATION} to a new value to try again now",
                policy.repository
            );
            publish(shared, app, true, "BackupFailed", message.clone()).await;
            status.last_failure = Some(BackupFailure {
                time: Time(now),
                message: message.clone(),
            });
            make_condition(
                previous_condition.as_ref(),
                "False",
                "BackupFailed",
                message,
                app,
                now,
            )
        }
    };
    write_status(shared, app, (status, condition)).await;
}

/// Why a backup failed, for status and Events.
#[derive(Debug, thiserror::Error)]
enum BackupRunError {
    /// The credentials Secret cannot be used.
    #[error("{0}")]
    Credentials(String),
    /// A scratch file could not be written.
    #[error("cannot prepare the registry credentials in {path}: {source}; check the scratch directory")]
    Scratch {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The repository cannot take a backup.
    #[error("the registry cannot be used: {0}")]
    Repository(paddock_oci::backup::BackupError),
    /// The backup itself failed.
    #[error(transparent)]
    Backup(#[from] paddock_cluster::backup::BackupError),
}

/// Registry access for one backup: the options, and the directory holding the docker config made
/// from the credentials Secret (removed on drop).
struct RegistryAccess {
    options: RegistryOptions,
    _config: tempfile::TempDir,
}

/// Reads the credentials Secret (when there is one) into a private docker config directory, so the
/// registry client looks credentials up exactly as `paddock push` does; without one the directory
/// is empty and the registry is used anonymously (never the operator's own `~/.docker`).
async fn registry_access(
    shared: &Shared,
    namespace: &str,
    policy: &BackupPolicy,
) -> Result<RegistryAccess, BackupRunError> {
    let mut builder = tempfile::Builder::new();
    builder.prefix("paddock-backup-credentials-");
    let parent = shared
        .settings
        .scratch_directory
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    let directory = builder
        .tempdir_in(&parent)
        .map_err(|source| BackupRunError::Scratch {
            path: parent.clone(),
            source,
        })?;
    if let Some(secret_name) = &policy.credentials_secret {
        let secret = Api::<Secret>::namespaced(shared.client.clone(), namespace)
            .get_opt(secret_name)
            .await
            .map_err(|error| {
                BackupRunError::Credentials(format!(
                    "cannot read the credentials Secret {namespace}/{secret_name}: {error}"
                ))
            })?
            .ok_or_else(|| {
                BackupRunError::Credentials(format!(
                    "the credentials Secret {namespace}/{secret_name} does not exist; create it with kubectl create secret docker-registry {secret_name} -n {namespace} --docker-server=… or fix spec.backup.credentialsSecret"
                ))
            })?;
        let config = secret
            .data
            .as_ref()
            .and_then(|data| data.get(DOCKER_CONFIG_KEY))
            .ok_or_else(|| {
                BackupRunError::Credentials(format!(
                    "the credentials Secret {namespace}/{secret_name} has no {DOCKER_CONFIG_KEY} key; it must be of type kubernetes.io/dockerconfigjson (kubectl create secret docker-registry)"
                ))
            })?;
        serde_json::from_slice::<serde_json::Value>(&config.0).map_err(|error| {
            BackupRunError::Credentials(format!(
                "the {DOCKER_CONFIG_KEY} of Secret {namespace}/{secret_name} is not JSON: {error}"
            ))
        })?;
        let path = directory.path().join("config.json");
        std::fs::write(&path, &config.0).map_err(|source| BackupRunError::Scratch { path, source })?;
    }
    Ok(RegistryAccess {
        options: RegistryOptions {
            insecure: policy.insecure,
            credentials: None,
            docker_config_dir: Some(directory.path().to_owned()),
        },
        _config: directory,
    })
}

async fn back_up(
    shared: &Shared,
    app: &VirtualMachineApp,
    policy: &BackupPolicy,
) -> Result<(paddock_cluster::backup::BackupReport, RegistryAccess), BackupRunError> {
    let namespace = app.namespace().unwrap_or_default();
    let name = app.name_any();
    let access = registry_access(shared, &namespace, policy).await?;
    // One request before minutes of snapshot and export: a wrong address or credentials fail now.
    paddock_oci::backup::check_repository(&policy.repository, &access.options)
        .await
        .map_err(BackupRunError::Repository)?;
    let options = paddock_cluster::backup::BackupOptions {
        repository: policy.repository.clone(),
        push: paddock_oci::PushOptions {
            registry: access.options.clone(),
            ..paddock_oci::PushOptions::default()
        },
        image: paddock_oci::ImageOptions::default(),
        link: shared.settings.export_link,
        scratch_parent: shared.settings.scratch_directory.clone(),
    };
    let progress = Arc::new(LogProgress {
        app: format!("{namespace}/{name}"),
    });
    let report =
        paddock_cluster::backup::backup(&shared.client, &namespace, &name, &options, progress).await?;
    Ok((report, access))
}

/// Deletes this VM's backups beyond `keep`; `Err` says why pruning is not possible (the backup
/// itself stands).
async fn prune(
    shared: &Shared,
    app: &VirtualMachineApp,
    policy: &BackupPolicy,
    access: &RegistryAccess,
) -> Result<(), String> {
    let namespace = app.namespace().unwrap_or_default();
    let name = app.name_any();
    let listed = match paddock_oci::backup::list_backups(&policy.repository, &access.options).await {
        Ok(listed) => listed,
        Err(error) => {
            let problem = format!("cannot list the backups in {}: {error}", policy.repository);
            publish(shared, app, true, "BackupsNotPruned", problem.clone()).await;
            return Err(problem);
        }
    };
    let stored: Vec<StoredBackup> = listed.iter().map(StoredBackup::from).collect();
    let selected = prune_selection(&stored, &namespace, &name, policy.keep);
    let mut deleted = Vec::new();
    for backup in &selected {
        match paddock_oci::registry::delete_manifest(&policy.repository, &backup.digest, &access.options)
            .await
        {
            Ok(()) | Err(RegistryError::NotFound { .. }) => deleted.push(backup.tag.clone()),
            Err(error) => {
                let unsupported = matches!(error, RegistryError::DeleteUnsupported { .. });
                let problem = if unsupported {
                    format!(
                        "pruning is not possible in this registry: {error}; {} backups of this VM are kept instead of {}",
                        stored
                            .iter()
                            .filter(|b| b.namespace == namespace && b.name == name)
                            .count(),
                        policy.keep
                    )
                } else {
                    format!("cannot delete backup {}: {error}", backup.tag)
                };
                if !deleted.is_empty() {
                    publish_pruned(shared, app, policy, &deleted).await;
                }
                publish(shared, app, true, "BackupsNotPruned", problem.clone()).await;
                return Err(problem);
            }
        }
    }
    if !deleted.is_empty() {
        publish_pruned(shared, app, policy, &deleted).await;
    }
    Ok(())
}

async fn publish_pruned(shared: &Shared, app: &VirtualMachineApp, policy: &BackupPolicy, deleted: &[String]) {
    tracing::info!(app = %app.name_any(), ?deleted, "pruned backups beyond keep");
    publish(
        shared,
        app,
        false,
        "BackupsPruned",
        format!(
            "deleted {} backup(s) beyond keep {} from {}: {}",
            deleted.len(),
            policy.keep,
            policy.repository,
            deleted.join(", ")
        ),
    )
    .await;
}

/// Server-side applies `status.backup` and the `BackupSucceeded` condition under
/// [`FIELD_MANAGER`]; a failure is logged (the next tick or backup writes again).
async fn write_status(
    shared: &Shared,
    app: &VirtualMachineApp,
    (status, condition): (BackupStatus, Condition),
) {
    let fields = serde_json::json!({
        "backup": status,
        "conditions": [condition],
    });
    match apply_status(shared, app, fields).await {
        Ok(_) => {
            if let (Some(uid), Ok(mut written)) = (app.uid(), shared.written.lock()) {
                written.insert(uid, (status, condition));
            }
        }
        Err(error) => tracing::warn!(app = %app.name_any(), %error, "cannot write the backup status"),
    }
}

/// Removes `status.backup` and the `BackupSucceeded` condition of an app whose `spec.backup` is
/// gone: an apply of nothing under [`FIELD_MANAGER`] drops every field it owned.
async fn clear_status(shared: &Shared, app: &VirtualMachineApp) {
    let Some(uid) = app.uid() else { return };
    if shared
        .in_flight
        .lock()
        .map(|in_flight| in_flight.contains(&uid))
        .unwrap_or(true)
    {
        return;
    }
    match apply_status(shared, app, serde_json::json!({})).await {
        Ok(_) => {
            if let Ok(mut written) = shared.written.lock() {
                written.remove(&uid);
            }
            // Fields another manager wrote stay; do not apply again for them every tick.
            if let Ok(mut cleared) = shared.cleared.lock() {
                cleared.insert(uid);
            }
        }
        Err(error) => tracing::warn!(app = %app.name_any(), %error, "cannot clear the backup status"),
    }
}

/// Server-side applies `fields` as the app's status under [`FIELD_MANAGER`]: the fields this
/// manager owned and `fields` lacks are dropped.
async fn apply_status(
    shared: &Shared,
    app: &VirtualMachineApp,
    fields: serde_json::Value,
) -> Result<VirtualMachineApp, kube::Error> {
    let api =
        Api::<VirtualMachineApp>::namespaced(shared.client.clone(), &app.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": VirtualMachineApp::api_version(&()),
        "kind": VirtualMachineApp::kind(&()),
        "status": fields,
    });
    shared
        .metrics
        .wrote(VirtualMachineApp::kind(&()).as_ref(), "status");
    api.patch_status(
        &app.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
}

/// Publishes an Event about `app` (best effort: a failure is logged).
async fn publish(shared: &Shared, app: &VirtualMachineApp, warning: bool, reason: &str, note: String) {
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_owned(),
        note: Some(note),
        action: "Backup".to_owned(),
        secondary: None,
    };
    shared.metrics.wrote("Event", "event");
    if let Err(error) = shared.recorder.publish(&event, &app.object_ref(&())).await {
        tracing::warn!(%error, %reason, "cannot publish an event");
    }
}

/// Logs a backup's stages and messages.
struct LogProgress {
    app: String,
}

impl TransferProgress for LogProgress {
    fn blob(&self, _progress: &BlobProgress<'_>) -> std::ops::ControlFlow<()> {
        std::ops::ControlFlow::Continue(())
    }
}

impl BackupProgress for LogProgress {
    fn stage(&self, stage: BackupStage) {
        tracing::debug!(app = %self.app, ?stage, "backup stage");
    }

    fn advanced(&self, _bytes: u64) {}

    fn message(&self, text: &str) {
        tracing::info!(app = %self.app, "{text}");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn app(yaml: &str) -> VirtualMachineApp {
        serde_yaml::from_str(yaml).unwrap()
    }

    const DAILY: &str = r#"
apiVersion: paddock.dev/v1alpha1
kind: VirtualMachineApp
metadata:
  name: web
  namespace: team
  uid: "1"
  creationTimestamp: "2026-01-01T03:30:00Z"
spec:
  image: {containerDisk: registry.example.com/vms/web:1}
  backup:
    schedule: "0 2 * * *"
    repository: registry.example.com/backups/web
"#;

    #[test]
    fn the_first_backup_waits_for_the_first_time_after_the_app_existed() {
        let app = app(DAILY);
        assert_eq!(app.spec.backup.as_ref().unwrap().keep, 7);
        let decision = decide(&app, None, at("2026-01-01T12:00:00Z")).unwrap();
        assert_eq!(decision.due, None);
        assert_eq!(decision.next, Some(at("2026-01-02T02:00:00Z")));
        let decision = decide(&app, None, at("2026-01-02T02:00:03Z")).unwrap();
        assert_eq!(
            decision.due,
            Some(Due {
                scheduled: Some(at("2026-01-02T02:00:00Z")),
                request: None
            })
        );
        assert_eq!(decision.next, Some(at("2026-01-03T02:00:00Z")));
    }

    #[test]
    fn missed_times_give_one_backup_for_the_latest_and_a_taken_time_is_not_repeated() {
        let app = app(DAILY);
        let status: BackupStatus =
            serde_yaml::from_str("lastScheduleTime: \"2026-01-02T02:00:00Z\"").unwrap();
        // Down for three days: one backup, for the latest missed time.
        let decision = decide(&app, Some(&status), at("2026-01-05T10:00:00Z")).unwrap();
        assert_eq!(decision.due.unwrap().scheduled, Some(at("2026-01-05T02:00:00Z")));
        let status: BackupStatus =
            serde_yaml::from_str("lastScheduleTime: \"2026-01-05T02:00:00Z\"").unwrap();
        let decision = decide(&app, Some(&status), at("2026-01-05T10:00:00Z")).unwrap();
        assert_eq!(decision.due, None);
    }

    #[test]
    fn the_annotation_requests_a_backup_once_per_value_also_while_suspended() {
        let mut app = app(&DAILY.replace("    repository:", "    suspend: true\n    repository:"));
        let now = at("2026-01-05T10:00:00Z");
        let decision = decide(&app, None, now).unwrap();
        assert_eq!((decision.due.clone(), decision.next), (None, None));
        app.metadata.annotations = Some([(BACKUP_NOW_ANNOTATION.to_owned(), "a".to_owned())].into());
        let due = decide(&app, None, now).unwrap().due.unwrap();
        assert_eq!((due.scheduled, due.request.as_deref()), (None, Some("a")));
        let handled: BackupStatus = serde_yaml::from_str("lastRequest: a").unwrap();
        assert_eq!(decide(&app, Some(&handled), now).unwrap().due, None);
    }

    #[test]
    fn a_bad_schedule_is_reported_and_requests_still_work() {
        let mut app = app(&DAILY.replace("0 2 * * *", "every night"));
        let decision = decide(&app, None, at("2026-01-05T10:00:00Z")).unwrap();
        assert!(decision.invalid_schedule.unwrap().contains("five-field"));
        assert_eq!(decision.due, None);
        app.metadata.annotations = Some([(BACKUP_NOW_ANNOTATION.to_owned(), "x".to_owned())].into());
        assert!(
            decide(&app, None, at("2026-01-05T10:00:00Z"))
                .unwrap()
                .due
                .is_some()
        );
        let without: VirtualMachineApp = serde_yaml::from_str(&DAILY.replace(
            "  backup:\n    schedule: \"0 2 * * *\"\n    repository: registry.example.com/backups/web\n",
            "",
        ))
        .unwrap();
        assert_eq!(decide(&without, None, at("2026-01-05T10:00:00Z")), None);
    }

    const STORED: &str = r#"
- {tag: web-20260103T020000Z, digest: "sha256:03", namespace: team, name: web, created: "2026-01-03T02:00:00Z"}
- {tag: web-20260101T020000Z, digest: "sha256:01", namespace: team, name: web, created: "2026-01-01T02:00:00Z"}
- {tag: db-20260101T020000Z, digest: "sha256:d1", namespace: team, name: db, created: "2025-12-01T02:00:00Z"}
- {tag: web-20260102T020000Z, digest: "sha256:02", namespace: team, name: web, created: "2026-01-02T02:00:00Z"}
- {tag: web-20251201T020000Z, digest: "sha256:e1", namespace: other, name: web, created: "2025-12-01T02:00:00Z"}
- {tag: web-20260104T020000Z, digest: "sha256:04", namespace: team, name: web, created: "2026-01-04T02:00:00Z"}
"#;

    #[test]
    fn retention_deletes_only_this_vms_oldest_beyond_keep() {
        let stored: Vec<StoredBackup> = serde_yaml::from_str(STORED).unwrap();
        let tags = |keep| {
            prune_selection(&stored, "team", "web", keep)
                .into_iter()
                .map(|backup| backup.tag)
                .collect::<Vec<_>>()
        };
        assert_eq!(tags(2), ["web-20260101T020000Z", "web-20260102T020000Z"]);
        assert_eq!(tags(3), ["web-20260101T020000Z"]);
        assert!(tags(4).is_empty());
        assert!(tags(100).is_empty());
        // keep 0 is refused by validation; it would never delete the newest.
        assert_eq!(tags(0).len(), 3);
    }

    #[test]
    fn retention_never_deletes_a_manifest_a_kept_backup_shares() {
        let mut stored: Vec<StoredBackup> = serde_yaml::from_str(STORED).unwrap();
        for backup in &mut stored {
            if backup.tag == "web-20260101T020000Z" {
                backup.digest = "sha256:04".to_owned();
            }
        }
        let selected = prune_selection(&stored, "team", "web", 2);
        assert_eq!(
            selected.iter().map(|b| b.tag.as_str()).collect::<Vec<_>>(),
            ["web-20260102T020000Z"]
        );
    }
}
