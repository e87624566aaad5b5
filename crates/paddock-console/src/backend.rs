//! The one seam between the API and whatever runs the VMs.
//!
//! Role: [`Backend`] is everything the REST API, the websocket gateway and the event stream need
//! from a VM platform. [`crate::local::LocalBackend`] implements it over the local QEMU runtime,
//! [`crate::kubernetes::KubernetesBackend`] over KubeVirt in a cluster, so the API, its document
//! and the CLI do not change.
//!
//! Contract:
//! - The trait is object safe (`Arc<dyn Backend>`): methods return boxed futures and streams, so
//!   one binary can pick its backend at run time.
//! - Everything crossing the seam is a backend-neutral view ([`VmView`], [`SnapshotView`],
//!   [`EventView`]) with KubeVirt's vocabulary (printable status names, run strategies), and every
//!   failure is a [`BackendError`] whose [`ErrorKind`] decides the HTTP status.
//! - Per-user rights: the API asks [`Backend::acting_as`] for the backend of the signed-in user;
//!   backends without users (local) return `None` and are used as they are. The provided methods
//!   (`acting_as`, `migrate`, `clone_vm`) have defaults, so other implementations keep compiling.
//! - Consoles are byte channels ([`ConsoleChannel`]): raw bytes both ways, no framing, exactly
//!   what KubeVirt's `console` and `vnc` subresources carry. The channel ends when the console
//!   does (the VM stopped); dropping the sender ends the session on the backend side.

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use paddock_api::app::VirtualMachineApp;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// What kind of failure a [`BackendError`] is; decides the HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The VM, snapshot or route does not exist (404).
    NotFound,
    /// Something with that name already exists (409).
    AlreadyExists,
    /// The operation is not possible in the VM's current state (409).
    InvalidTransition,
    /// The manifest or a parameter is well-formed but invalid (422).
    InvalidSpec,
    /// The request is valid but this backend cannot do it (422).
    Unsupported,
    /// The request itself is malformed: unparsable body, wrong parameters (400).
    BadRequest,
    /// The signed-in user lacks a permission (403); the error's `permission` names it.
    Forbidden,
    /// The platform cannot answer yet (503), e.g. the cluster caches are still loading.
    Unavailable,
    /// A server this one depends on (a registry, CDI's upload proxy) cannot be reached, refused or
    /// answered badly (502).
    BadGateway,
    /// The backend does not implement this (501), e.g. uploads in local mode; the message says
    /// what to use instead.
    NotImplemented,
    /// A failure on the server's side (500).
    Internal,
    /// A service the backend relies on stopped answering (504).
    GatewayTimeout,
}

impl ErrorKind {
    /// The HTTP status code for this kind.
    pub fn status_code(self) -> u16 {
        match self {
            ErrorKind::NotFound => 404,
            ErrorKind::AlreadyExists | ErrorKind::InvalidTransition => 409,
            ErrorKind::InvalidSpec | ErrorKind::Unsupported => 422,
            ErrorKind::BadRequest => 400,
            ErrorKind::Forbidden => 403,
            ErrorKind::Unavailable => 503,
            ErrorKind::BadGateway => 502,
            ErrorKind::NotImplemented => 501,
            ErrorKind::Internal => 500,
            ErrorKind::GatewayTimeout => 504,
        }
    }

    /// The name used as `reason` in error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "NotFound",
            ErrorKind::AlreadyExists => "AlreadyExists",
            ErrorKind::InvalidTransition => "InvalidTransition",
            ErrorKind::InvalidSpec => "InvalidSpec",
            ErrorKind::Unsupported => "Unsupported",
            ErrorKind::BadRequest => "BadRequest",
            ErrorKind::Forbidden => "Forbidden",
            ErrorKind::Unavailable => "Unavailable",
            ErrorKind::BadGateway => "BadGateway",
            ErrorKind::NotImplemented => "NotImplemented",
            ErrorKind::Internal => "Internal",
            ErrorKind::GatewayTimeout => "GatewayTimeout",
        }
    }
}

/// A disk upload into a new DataVolume (see [`Backend::upload_disk`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRequest {
    /// The namespace.
    pub namespace: String,
    /// The DataVolume to create.
    pub name: String,
    /// The DataVolume's size (a quantity such as `10Gi`); by default the disk's virtual size plus
    /// CDI's filesystem overhead.
    pub size: Option<String>,
    /// The StorageClass; the cluster's default when `None`.
    pub storage_class: Option<String>,
    /// How many bytes the body has (its Content-Length).
    pub length: u64,
    /// Only check: the user's permissions and that the name is free; nothing is created and the
    /// body is ignored (what a browser asks before sending gigabytes).
    pub dry_run: bool,
}

/// A DataVolume receiving or holding an uploaded disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UploadView {
    /// The namespace.
    pub namespace: String,
    /// The DataVolume's name.
    pub name: String,
    /// CDI's phase: `UploadScheduled`, `UploadReady`, `Succeeded`, `Failed`, …
    pub phase: String,
    /// CDI's `status.progress`, e.g. `"100.0%"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// The message of CDI's first condition that has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The requested size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// After an upload: the disk's format as its header says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// After an upload: the bytes the upload proxy accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<u64>,
}

/// Whether the signed-in user may open one console of a VM, and if not, what they lack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsoleAccess {
    /// Whether opening it is allowed.
    pub allowed: bool,
    /// When refused: the permission the user lacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permission: Option<Permission>,
    /// When refused: why, and what to ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl ConsoleAccess {
    /// Allowed.
    pub fn allowed() -> ConsoleAccess {
        ConsoleAccess {
            allowed: true,
            permission: None,
            message: None,
        }
    }

    /// Refused with a 403 (its permission and message).
    pub fn refused(error: BackendError) -> ConsoleAccess {
        ConsoleAccess {
            allowed: false,
            permission: error.permission.map(|permission| *permission),
            message: Some(error.message),
        }
    }
}

/// Which of a VM's consoles the signed-in user may open (see [`Backend::console_access`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsoleAccessView {
    /// The serial console (`virtualmachineinstances/console`).
    pub serial: ConsoleAccess,
    /// The screen (`virtualmachineinstances/vnc`, which screenshots need too).
    pub vnc: ConsoleAccess,
}

/// A base image on the machine (local mode's image library, see [`Backend::images`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageView {
    /// `sha256:<hex>` of the disk's content.
    pub digest: String,
    /// What to write as `spec.image.containerDisk` to boot it: the source it was imported from,
    /// or `file:<the stored copy>` when that is unknown.
    pub image: String,
    /// The source it was first imported from (`file:…`, `oci:…` or a registry reference), when
    /// known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// `qcow2` or `raw`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Bytes the stored copy takes.
    pub size: u64,
    /// The disk's virtual size in bytes, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_size: Option<u64>,
    /// When it was imported (RFC 3339, UTC).
    pub imported_at: String,
    /// Whether the import recorded source and format (`false`: derived later, from the file and
    /// the VMs using it).
    pub recorded: bool,
    /// The VMs built on it, as `namespace/name`.
    #[serde(default)]
    pub used_by: Vec<String>,
}

/// A failed backend operation: its kind and a message for people (what failed, why, what to do).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// What kind of failure it is.
    pub kind: ErrorKind,
    /// What failed, why, and what to do.
    pub message: String,
    /// For [`ErrorKind::Forbidden`]: the permission the user lacks.
    pub permission: Option<Box<Permission>>,
}

impl BackendError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> BackendError {
        BackendError {
            kind,
            message: message.into(),
            permission: None,
        }
    }

    /// A 403: the user lacks `permission`; `message` says so (usually the API server's words).
    pub fn forbidden(permission: Permission, message: impl Into<String>) -> BackendError {
        BackendError {
            kind: ErrorKind::Forbidden,
            message: message.into(),
            permission: Some(Box::new(permission)),
        }
    }
}

/// One Kubernetes permission, as RBAC and SubjectAccessReviews spell it: what a user was refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Permission {
    /// The verb: get, list, watch, create, update, patch, delete.
    pub verb: String,
    /// The API group (`""` for the core group).
    pub group: String,
    /// The resource, e.g. `virtualmachines`.
    pub resource: String,
    /// The subresource, e.g. `start` or `vnc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subresource: Option<String>,
    /// The namespace; `None` for every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The object's name, when the request was about one object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl std::fmt::Display for Permission {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{} {}", self.verb, self.resource)?;
        if let Some(subresource) = &self.subresource {
            write!(formatter, "/{subresource}")?;
        }
        if !self.group.is_empty() {
            write!(formatter, " in API group {}", self.group)?;
        }
        match &self.namespace {
            Some(namespace) => write!(formatter, " in namespace {namespace}"),
            None => write!(formatter, " in every namespace"),
        }
    }
}

/// A signed-in Kubernetes user, as a TokenReview or an authenticating proxy names them. Backends
/// with per-user rights act as this user (see [`Backend::acting_as`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserInfo {
    /// The user name, e.g. `alice` or `system:serviceaccount:vms:alice`.
    pub username: String,
    /// The user's uid, when the authenticator gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The user's groups.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Extra attributes from the authenticator (scopes, service-account pod names).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
}

/// Result alias for backend operations.
pub type BackendResult<T> = Result<T, BackendError>;

/// A VM by namespace and name, as in a request path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VmRef {
    /// The namespace.
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl std::fmt::Display for VmRef {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}/{}", self.namespace, self.name)
    }
}

/// A VM as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmView {
    /// The namespace.
    pub namespace: String,
    /// The name.
    pub name: String,
    /// `spec.displayName`, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// The run strategy in force (start and stop change it, as in KubeVirt).
    pub run_strategy: String,
    /// When the VM was created (RFC 3339, UTC).
    pub created_at: String,
    /// Which consoles the VM has.
    pub console: ConsoleView,
    /// The observed state.
    pub status: VmStatusView,
    /// Snapshots, oldest first.
    #[serde(default)]
    pub snapshots: Vec<SnapshotView>,
    /// The VirtualMachineApp as the backend holds it.
    pub manifest: serde_json::Value,
}

/// Which consoles a VM has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleView {
    /// A serial console (the `console` websocket).
    pub serial: bool,
    /// A screen (the `vnc` websocket and screenshots).
    pub vnc: bool,
}

/// The observed state of a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmStatusView {
    /// KubeVirt's printable status: Stopped, Starting, Running, Paused, Stopping,
    /// CrashLoopBackOff, Failed.
    pub phase: String,
    /// The hypervisor process id, where the backend has one (local only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The accelerator (`kvm`, `tcg`), where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<String>,
    /// When the current run started (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// How often the platform restarted the VM by itself.
    #[serde(default)]
    pub restart_count: u32,
    /// How the last run ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<LastExitView>,
    /// Why the VM is in this phase, when there is something to say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Things the user should know (e.g. software emulation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The boot disk's import while it is under way or after it failed; absent once the disk is
    /// imported, for disks that are never imported, and on backends without imports (local).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import: Option<Box<ImportView>>,
}

/// The import of a VM's boot disk (Kubernetes: CDI's DataVolume, as the operator reports it in the
/// VirtualMachineApp's status).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportView {
    /// `Importing` while CDI copies the disk, `Failed` when the import failed.
    pub state: String,
    /// CDI's progress as it reports it, e.g. `42.50%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// The progress as a number from 0 to 100, when `progress` is a percentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// What is happening, or why the import failed and what to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// How a VM's last run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastExitView {
    /// GuestShutdown, Stopped, Crashed, Killed or StartFailed.
    pub kind: String,
    /// When it was noticed (RFC 3339, UTC).
    pub at: String,
    /// Details.
    pub message: String,
}

/// One snapshot of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotView {
    /// The snapshot's name.
    pub name: String,
    /// When it was taken (RFC 3339, UTC).
    pub created_at: String,
    /// Whether it holds memory and device state (restoring resumes the running guest) or only
    /// the disk.
    pub memory: bool,
    /// The VM's phase when it was taken.
    pub taken_in_phase: String,
}

/// A request to take a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The snapshot's name: 1 to 64 letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// Include memory and device state (the VM must be running or paused).
    #[serde(default)]
    pub memory: bool,
}

/// A request to back a VM up to a registry repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackupRequest {
    /// `registry/repository` (no tag: the backup is tagged `<vm>-<UTC time>`).
    pub repository: String,
    /// Speak plain http to the registry (a local docker-registry).
    #[serde(default)]
    pub insecure: bool,
}

/// Where to list backups, and optionally of which VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupListRequest {
    /// `registry/repository` (a tag or digest in it is ignored).
    pub repository: String,
    /// Speak plain http to the registry.
    #[serde(default)]
    pub insecure: bool,
    /// Only backups of VMs in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Only backups of VMs of this name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
}

/// One complete backup in a registry, from its manifest's `dev.paddock.backup.*` annotations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupView {
    /// `registry/repository:tag`.
    pub reference: String,
    /// `registry/repository@sha256:…`: the exact backup, what a restore names.
    pub pinned_reference: String,
    /// The tag, `<vm>-<UTC time>`.
    pub tag: String,
    /// The manifest digest.
    pub digest: String,
    /// Bytes stored in the registry (manifest, config and disk layer).
    pub size: u64,
    /// The namespace of the VM backed up.
    pub namespace: String,
    /// The name of the VM backed up.
    pub name: String,
    /// When it was taken (RFC 3339, UTC).
    pub created_at: String,
    /// The disk's virtual size in bytes.
    pub disk_virtual_size: u64,
    /// The backed-up VM's display name, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
}

/// A request to create a VM from a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RestoreRequest {
    /// The backup: `registry/repository:tag` or `registry/repository@sha256:…`.
    pub reference: String,
    /// Speak plain http to the registry.
    #[serde(default)]
    pub insecure: bool,
    /// The new VM's name; the backed-up VM's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The new VM's namespace; the backed-up VM's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Replace the VM of that name, which must be stopped.
    #[serde(default)]
    pub replace: bool,
    /// Start the restored VM, whatever the backed-up VM's run strategy was.
    #[serde(default)]
    pub start: bool,
}

/// How far a long-running operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperationPhase {
    /// Still at work.
    Running,
    /// Done; `result` says what it made.
    Succeeded,
    /// Ended without result; `message` says why and what to do.
    Failed,
}

/// Progress of an operation: bytes of its current stage and an overall percentage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationProgress {
    /// What it is doing: `Exporting`, `Compressing`, `Uploading`, `Pulling`, `Creating`, `Done`.
    pub stage: String,
    /// Bytes of the current stage done.
    pub bytes_done: u64,
    /// Bytes of the current stage in all; 0 when unknown.
    pub bytes_total: u64,
    /// 0 to 100 over the whole operation; absent when it cannot be estimated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
}

/// A long-running operation (a backup or a restore) the API started and the client polls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationView {
    /// Its id, for `GET /api/v1/operations/{id}`.
    pub id: String,
    /// `Backup` or `Restore`.
    pub kind: String,
    /// The VM's namespace (backed up, or created by the restore).
    pub namespace: String,
    /// The VM's name (backed up, or created by the restore).
    pub name: String,
    /// Running, Succeeded or Failed.
    pub phase: OperationPhase,
    /// How far it is.
    pub progress: OperationProgress,
    /// What it is doing, or why it failed and what to do.
    pub message: String,
    /// When it started (RFC 3339, UTC).
    pub started_at: String,
    /// When it ended (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Once succeeded: the backup's `registry/repository:tag`, or the restored VM's
    /// `namespace/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// Once a backup succeeded: the backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupView>,
}

/// A change, as the event stream carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum EventView {
    /// A VM was created or its status changed.
    Changed {
        /// The namespace.
        namespace: String,
        /// The name.
        name: String,
        /// Its new status.
        status: VmStatusView,
    },
    /// A VM's snapshots changed.
    SnapshotsChanged {
        /// The namespace.
        namespace: String,
        /// The name.
        name: String,
        /// Its snapshots now.
        snapshots: Vec<SnapshotView>,
    },
    /// A VM was deleted.
    Deleted {
        /// The namespace.
        namespace: String,
        /// The name.
        name: String,
    },
    /// The subscriber fell behind and missed events; list again to resynchronise.
    Lagged {
        /// How many events were missed.
        missed: u64,
    },
}

/// A power action (KubeVirt's `start`, `stop`, `restart`, `pause`, `unpause` subresources, plus
/// `forcestop`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    /// Start a stopped VM.
    Start,
    /// Stop gracefully (ACPI power button), forced after the grace period.
    Stop {
        /// How long the guest may take; the backend's default when `None`.
        grace_period: Option<std::time::Duration>,
    },
    /// Switch off at once.
    ForceStop,
    /// Stop gracefully and start again.
    Restart {
        /// How long the guest may take to stop; the backend's default when `None`.
        grace_period: Option<std::time::Duration>,
    },
    /// Pause the CPUs.
    Pause,
    /// Resume paused CPUs.
    Unpause,
}

/// Which console a byte channel is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleKind {
    /// The first serial port.
    Serial,
    /// The VNC server of the VM's screen.
    Vnc,
}

impl ConsoleKind {
    /// `serial` or `vnc`, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ConsoleKind::Serial => "serial",
            ConsoleKind::Vnc => "vnc",
        }
    }
}

/// An open console: raw bytes from and to the VM.
#[derive(Debug)]
pub struct ConsoleChannel {
    /// Bytes from the VM; `None` from `recv` when the console closed.
    pub from_vm: mpsc::Receiver<Bytes>,
    /// Bytes to the VM; drop it to end the session.
    pub to_vm: mpsc::Sender<Bytes>,
}

/// One readiness check: what was checked and whether it passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// What was checked, e.g. `state-dir-writable`.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// Details, in particular why it failed.
    pub message: String,
}

/// Everything the API needs from a VM platform. See the module documentation.
pub trait Backend: Send + Sync + 'static {
    /// A short name for the backend, e.g. `local`.
    fn kind(&self) -> &'static str;
    /// Readiness checks (for `/readyz`).
    fn readiness(&self) -> BoxFuture<'_, Vec<HealthCheck>>;
    /// Every VM, optionally of one namespace, ordered by namespace and name.
    fn list(&self, namespace: Option<String>) -> BoxFuture<'_, BackendResult<Vec<VmView>>>;
    /// One VM.
    fn get(&self, vm: VmRef) -> BoxFuture<'_, BackendResult<VmView>>;
    /// Creates a VM from a manifest (and starts it when its run strategy says so).
    fn create(&self, app: VirtualMachineApp) -> BoxFuture<'_, BackendResult<VmView>>;
    /// Deletes a VM; with snapshots only when `force`.
    fn delete(&self, vm: VmRef, force: bool) -> BoxFuture<'_, BackendResult<()>>;
    /// Applies a power action and returns the VM afterwards.
    fn power(&self, vm: VmRef, action: PowerAction) -> BoxFuture<'_, BackendResult<VmView>>;
    /// The VM's snapshots, oldest first.
    fn snapshot_list(&self, vm: VmRef) -> BoxFuture<'_, BackendResult<Vec<SnapshotView>>>;
    /// Takes a snapshot.
    fn snapshot_create(
        &self,
        vm: VmRef,
        request: SnapshotRequest,
    ) -> BoxFuture<'_, BackendResult<SnapshotView>>;
    /// Restores a snapshot and returns the VM afterwards.
    fn snapshot_restore(&self, vm: VmRef, snapshot: String) -> BoxFuture<'_, BackendResult<VmView>>;
    /// Deletes a snapshot.
    fn snapshot_delete(&self, vm: VmRef, snapshot: String) -> BoxFuture<'_, BackendResult<()>>;
    /// A PNG of the VM's screen.
    fn screenshot(&self, vm: VmRef) -> BoxFuture<'_, BackendResult<Vec<u8>>>;
    /// Opens a console. Fails (before any byte flows) when the VM has no such console or is not
    /// running.
    fn open_console(&self, vm: VmRef, kind: ConsoleKind) -> BoxFuture<'_, BackendResult<ConsoleChannel>>;
    /// Every change from now on.
    fn events(&self) -> BoxStream<'static, EventView>;

    /// This backend acting as `user`: every read and action of the returned backend happens with
    /// that user's rights. `None` (the default) for backends without per-user rights, where the
    /// access token grants everything (local).
    fn acting_as(&self, user: &UserInfo) -> Option<std::sync::Arc<dyn Backend>> {
        let _ = user;
        None
    }

    /// Moves a running VM to another node (KubeVirt's `migrate`); unsupported by default.
    fn migrate(&self, vm: VmRef) -> BoxFuture<'_, BackendResult<VmView>> {
        Box::pin(async move {
            Err(BackendError::new(
                ErrorKind::Unsupported,
                format!(
                    "cannot migrate virtual machine {vm}: this backend ({}) runs VMs on one machine only",
                    self.kind()
                ),
            ))
        })
    }

    /// Sets (`Some`) or clears (`None`) the VM's snapshot schedule, the VirtualMachineApp's
    /// `spec.snapshots` that the operator runs; the policy is validated by the caller. Not
    /// implemented by default: schedules need the cluster's operator.
    fn set_snapshot_schedule(
        &self,
        vm: VmRef,
        policy: Option<paddock_api::app::SnapshotPolicy>,
    ) -> BoxFuture<'_, BackendResult<VmView>> {
        let _ = policy;
        Box::pin(async move {
            Err(BackendError::new(
                ErrorKind::NotImplemented,
                format!(
                    "cannot schedule snapshots of virtual machine {vm}: schedules run in cluster mode (the paddock operator runs them); this backend ({}) takes snapshots on request only",
                    self.kind()
                ),
            ))
        })
    }

    /// Starts backing `vm` up to a registry; returns the running operation. Fails at once (before
    /// any work) for an unknown VM, a bad repository or a registry that cannot be reached. Not
    /// implemented by default.
    fn backup_create(
        &self,
        vm: VmRef,
        request: BackupRequest,
    ) -> BoxFuture<'_, BackendResult<OperationView>> {
        let _ = (vm, request);
        Box::pin(async move { Err(backups_not_implemented(self.kind(), "back up")) })
    }

    /// The complete backups in a repository, oldest first. Not implemented by default.
    fn backup_list(&self, request: BackupListRequest) -> BoxFuture<'_, BackendResult<Vec<BackupView>>> {
        let _ = request;
        Box::pin(async move { Err(backups_not_implemented(self.kind(), "list")) })
    }

    /// Starts creating a VM from a backup; returns the running operation. Fails at once when the
    /// backup cannot be read or the target VM exists (without `replace`) or is not stopped (with
    /// it). Not implemented by default.
    fn backup_restore(&self, request: RestoreRequest) -> BoxFuture<'_, BackendResult<OperationView>> {
        let _ = request;
        Box::pin(async move { Err(backups_not_implemented(self.kind(), "restore")) })
    }

    /// One operation this backend started (kept for a while after it ended).
    fn operation(&self, id: String) -> BoxFuture<'_, BackendResult<OperationView>> {
        Box::pin(async move {
            Err(BackendError::new(
                ErrorKind::NotFound,
                format!(
                    "no operation {id}: this backend ({}) runs no operations",
                    self.kind()
                ),
            ))
        })
    }

    /// Creates the DataVolume `request` names with an upload source and streams `body` (the disk,
    /// `request.length` bytes) through CDI's upload proxy; answers once the proxy accepted every
    /// byte. Not implemented by default (501).
    fn upload_disk(
        &self,
        request: UploadRequest,
        body: paddock_cluster::upload::DiskStream,
    ) -> BoxFuture<'_, BackendResult<UploadView>> {
        let _ = (request, body);
        Box::pin(async move {
            Err(BackendError::new(
                ErrorKind::NotImplemented,
                format!(
                    "upload is for cluster mode (this backend is {}); in local mode use a disk path or registry image in the create wizard",
                    self.kind()
                ),
            ))
        })
    }

    /// The operations this backend started, running ones and recently ended ones, oldest first.
    fn operation_list(&self) -> BoxFuture<'_, BackendResult<Vec<OperationView>>> {
        Box::pin(async move { Ok(Vec::new()) })
    }

    /// The DataVolume `name` in `namespace` as an [`UploadView`] (its import phase and progress).
    /// Not implemented by default (501).
    fn upload_status(&self, namespace: String, name: String) -> BoxFuture<'_, BackendResult<UploadView>> {
        let _ = (namespace, name);
        Box::pin(async move {
            Err(BackendError::new(
                ErrorKind::NotImplemented,
                format!(
                    "upload is for cluster mode (this backend is {}); in local mode use a disk path or registry image in the create wizard",
                    self.kind()
                ),
            ))
        })
    }

    /// Which consoles of `vm` the user may open, each checked on its own, so a page can explain a
    /// refused one before connecting (a browser cannot read why a websocket upgrade failed). By
    /// default both, once the VM is found: backends without per-user rights grant everything.
    fn console_access(&self, vm: VmRef) -> BoxFuture<'_, BackendResult<ConsoleAccessView>> {
        Box::pin(async move {
            self.get(vm).await?;
            Ok(ConsoleAccessView {
                serial: ConsoleAccess::allowed(),
                vnc: ConsoleAccess::allowed(),
            })
        })
    }

    /// The base images already on the machine (the create wizard's image library), newest
    /// first. Not implemented by default (501): in a cluster, images come from registries and
    /// uploaded disks.
    fn images(&self) -> BoxFuture<'_, BackendResult<Vec<ImageView>>> {
        Box::pin(async move {
            Err(BackendError::new(
                ErrorKind::NotImplemented,
                format!(
                    "the image library is not available in cluster mode (this backend is {}): it lists the disks stored on the machine running paddock serve; in a cluster give a registry reference or upload a disk",
                    self.kind()
                ),
            ))
        })
    }

    /// Clones a VM into a new VM named `target` (KubeVirt's VirtualMachineClone); unsupported by
    /// default. Returns the clone's namespace and name once it exists.
    fn clone_vm(&self, vm: VmRef, target: String) -> BoxFuture<'_, BackendResult<VmRef>> {
        let _ = target;
        Box::pin(async move {
            Err(BackendError::new(
                ErrorKind::Unsupported,
                format!(
                    "cannot clone virtual machine {vm}: this backend ({}) does not clone; take a snapshot instead",
                    self.kind()
                ),
            ))
        })
    }
}

/// The error of the backup methods of a backend that does not implement them.
fn backups_not_implemented(kind: &str, verb: &str) -> BackendError {
    BackendError::new(
        ErrorKind::NotImplemented,
        format!(
            "cannot {verb} backups from the console with the {kind} backend: it does not implement backups; use `paddock backup create|list|restore`"
        ),
    )
}
