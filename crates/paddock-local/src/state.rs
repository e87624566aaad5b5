//! The state directory: where every VM's record, disks, sockets and logs live, and how records
//! are written.
//!
//! Role: the runtime's only persistent memory. A paddock restart rebuilds everything it knows
//! from here (plus the QEMU processes still running).
//!
//! Contract:
//! - Layout: `<state>/vms/<namespace>/<name>/` holds `record.json`, `overlay.qcow2`, `seed.img`,
//!   `uefi-vars.fd`, `qemu.pid`, `qemu.log`, `console.log`; `<state>/images/sha256/<hex>` holds
//!   base images by the sha256 of their content (read-only, shared by every VM made from them).
//!   Unix sockets (`qmp.sock`, `serial.sock`, `vnc.sock`) sit in the VM directory when its path is
//!   short enough, otherwise in a short per-VM runtime directory; the choice is recorded.
//! - Records are written atomically and durably: temporary file in the same directory, fsync,
//!   rename, fsync of the directory. A crash leaves either the old or the new record.
//! - One process at a time: [`StateLock`] holds an exclusive `flock` on `<state>/paddock.lock`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use paddock_api::app::VirtualMachineApp;
use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};
use crate::qemu::Accelerator;

/// The record format this code writes; older or newer records are refused, not guessed at.
pub(crate) const RECORD_FORMAT_VERSION: u32 = 1;
/// Unix socket paths must fit `sockaddr_un.sun_path` (108 bytes with the terminating NUL).
const SOCKET_PATH_LIMIT: usize = 107;
/// The longest socket file name used (`serial.sock`).
const LONGEST_SOCKET_NAME: &str = "serial.sock";

/// A VM's identity: namespace and name, as in Kubernetes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VmId {
    /// The namespace (`default` unless the manifest says otherwise).
    pub namespace: String,
    /// The VM's name (`metadata.name`).
    pub name: String,
}

/// The namespace of a VirtualMachineApp that names none.
pub const DEFAULT_NAMESPACE: &str = "default";

impl VmId {
    /// The id `namespace/name`, checking that both are DNS labels (lowercase letters, digits, `-`).
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Result<VmId> {
        let id = VmId {
            namespace: namespace.into(),
            name: name.into(),
        };
        for (field, value) in [("metadata.namespace", &id.namespace), ("metadata.name", &id.name)] {
            if !is_dns_label(value) {
                return Err(RuntimeError::InvalidSpec {
                    message: format!(
                        "{field}: {value:?} is not a valid name: use 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
                    ),
                });
            }
        }
        Ok(id)
    }

    /// The id of a VirtualMachineApp (its namespace defaults to `default`).
    pub fn of_app(app: &VirtualMachineApp) -> Result<VmId> {
        let name = app
            .metadata
            .name
            .clone()
            .ok_or_else(|| RuntimeError::InvalidSpec {
                message: "metadata.name: a VirtualMachineApp needs a name".to_string(),
            })?;
        let namespace = app
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
        VmId::new(namespace, name)
    }
}

impl std::fmt::Display for VmId {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}/{}", self.namespace, self.name)
    }
}

fn is_dns_label(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-')
}

/// Where a VM is in its life, with KubeVirt's `printableStatus` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmPhase {
    /// No QEMU process; the VM is off.
    Stopped,
    /// QEMU is being started.
    Starting,
    /// The guest is running.
    Running,
    /// The guest's CPUs are paused; its memory stays in QEMU.
    Paused,
    /// A stop was requested and the VM has not gone yet.
    Stopping,
    /// The VM failed repeatedly; the next automatic restart waits (see `VmStatus::message`).
    CrashLoopBackOff,
    /// The VM failed and its run strategy does not restart it.
    Failed,
}

impl VmPhase {
    /// The phase's name, as shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            VmPhase::Stopped => "Stopped",
            VmPhase::Starting => "Starting",
            VmPhase::Running => "Running",
            VmPhase::Paused => "Paused",
            VmPhase::Stopping => "Stopping",
            VmPhase::CrashLoopBackOff => "CrashLoopBackOff",
            VmPhase::Failed => "Failed",
        }
    }

    /// Whether a QEMU process exists (or is being created) in this phase.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            VmPhase::Starting | VmPhase::Running | VmPhase::Paused | VmPhase::Stopping
        )
    }

    /// The closest phase of the `VirtualMachineApp` status (which has no Stopping or
    /// CrashLoopBackOff).
    pub fn app_phase(self) -> paddock_api::app::Phase {
        use paddock_api::app::Phase;
        match self {
            VmPhase::Stopped => Phase::Stopped,
            VmPhase::Starting | VmPhase::CrashLoopBackOff => Phase::Starting,
            VmPhase::Running | VmPhase::Stopping => Phase::Running,
            VmPhase::Paused => Phase::Paused,
            VmPhase::Failed => Phase::Failed,
        }
    }
}

impl std::fmt::Display for VmPhase {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// How a QEMU process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExitKind {
    /// The guest powered itself off (or a graceful stop made it do so).
    GuestShutdown,
    /// A user stopped the VM (graceful stop, force stop, restart or delete).
    Stopped,
    /// QEMU ended without shutting the guest down: killed (e.g. `kill -9`), crashed, or gone
    /// while paddock was not watching.
    Crashed,
    /// QEMU was terminated by a signal from outside paddock (e.g. SIGTERM at host shutdown).
    Killed,
    /// QEMU could not be started.
    StartFailed,
}

impl ExitKind {
    /// Whether this counts as a failure for `RerunOnFailure` (and for back-off).
    pub fn is_failure(self) -> bool {
        matches!(self, ExitKind::Crashed | ExitKind::Killed | ExitKind::StartFailed)
    }
}

/// The last time a VM's QEMU process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastExit {
    /// How it ended.
    pub kind: ExitKind,
    /// When paddock noticed, in seconds since the Unix epoch.
    pub at: u64,
    /// Details for people, e.g. QEMU's shutdown reason.
    pub message: String,
}

/// The observed state of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmStatus {
    /// Where the VM is in its life.
    pub phase: VmPhase,
    /// The QEMU process id while one exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The accelerator the current (or last) QEMU process runs with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<Accelerator>,
    /// Things the user should know, e.g. that KVM is unusable and the VM runs under slow TCG.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// How the last QEMU process ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<LastExit>,
    /// How often the runtime restarted the VM by itself (run strategy), since it was created.
    #[serde(default)]
    pub restart_count: u32,
    /// Failures in a row; reset once the VM has run long enough. Drives the back-off.
    #[serde(default)]
    pub consecutive_failures: u32,
    /// When the current QEMU process started, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    /// Whether the VM has ever been started (for the `Once` strategy).
    #[serde(default)]
    pub has_run: bool,
    /// A human-readable explanation of the phase, e.g. why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl VmStatus {
    pub(crate) fn stopped() -> VmStatus {
        VmStatus {
            phase: VmPhase::Stopped,
            pid: None,
            accelerator: None,
            warnings: Vec::new(),
            last_exit: None,
            restart_count: 0,
            consecutive_failures: 0,
            started_at: None,
            has_run: false,
            message: None,
        }
    }
}

/// One snapshot of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotInfo {
    /// The snapshot's name (also the qcow2 internal snapshot tag).
    pub name: String,
    /// When it was taken, seconds since the Unix epoch.
    pub created_at: u64,
    /// Whether it holds the VM's memory and device state (restoring resumes the running guest)
    /// or only the disk (restoring needs a stopped VM, which then boots from that disk).
    pub memory: bool,
    /// The VM's phase when it was taken.
    pub taken_in_phase: VmPhase,
}

/// The VM's disk, as created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DiskRecord {
    /// The image source as written in the manifest.
    pub source: String,
    /// `sha256:<hex>` of the base image's content.
    pub base_digest: String,
    /// The base image's format, `qcow2` or `raw`.
    pub base_format: String,
    /// The base image in the image store.
    pub base_path: PathBuf,
    /// The overlay's virtual size in bytes.
    pub size_bytes: u64,
}

/// Everything the runtime keeps about one VM, as stored in `record.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct VmRecord {
    /// [`RECORD_FORMAT_VERSION`].
    pub format_version: u32,
    /// The manifest the VM was created from; `spec.runStrategy` changes with start and stop as
    /// in KubeVirt.
    pub app: VirtualMachineApp,
    /// The observed state.
    pub status: VmStatus,
    /// The disk.
    pub disk: DiskRecord,
    /// cloud-init's instance id (new for every VM, including clones, so cloud-init runs once).
    pub instance_id: String,
    /// The directory holding the VM's unix sockets.
    pub socket_dir: PathBuf,
    /// Snapshots, oldest first.
    #[serde(default)]
    pub snapshots: Vec<SnapshotInfo>,
    /// Set while a user-requested stop is in progress, so a restart of paddock finishing the stop
    /// does not mistake it for a crash.
    #[serde(default)]
    pub stop_requested: bool,
    /// When the VM was created, seconds since the Unix epoch.
    pub created_at: u64,
}

/// The files of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VmPaths {
    pub directory: PathBuf,
    pub record: PathBuf,
    pub overlay: PathBuf,
    pub seed: PathBuf,
    pub uefi_vars: PathBuf,
    pub pidfile: PathBuf,
    pub qemu_log: PathBuf,
    pub console_log: PathBuf,
    pub qmp_socket: PathBuf,
    pub serial_socket: PathBuf,
    pub vnc_socket: PathBuf,
}

impl VmPaths {
    pub(crate) fn new(directory: PathBuf, socket_dir: &Path) -> VmPaths {
        VmPaths {
            record: directory.join("record.json"),
            overlay: directory.join("overlay.qcow2"),
            seed: directory.join("seed.img"),
            uefi_vars: directory.join("uefi-vars.fd"),
            pidfile: directory.join("qemu.pid"),
            qemu_log: directory.join("qemu.log"),
            console_log: directory.join("console.log"),
            qmp_socket: socket_dir.join("qmp.sock"),
            serial_socket: socket_dir.join("serial.sock"),
            vnc_socket: socket_dir.join("vnc.sock"),
            directory,
        }
    }
}

/// The state directory.
#[derive(Debug, Clone)]
pub(crate) struct StateDir {
    root: PathBuf,
    /// Where sockets go when a VM directory is too deep for them.
    short_socket_root: PathBuf,
}

impl StateDir {
    pub(crate) fn new(root: PathBuf, short_socket_root: PathBuf) -> StateDir {
        StateDir {
            root,
            short_socket_root,
        }
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }

    pub(crate) fn vm_dir(&self, id: &VmId) -> PathBuf {
        self.vms_dir().join(&id.namespace).join(&id.name)
    }

    pub(crate) fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// The socket directory for a new VM: its own directory when the socket paths fit, else a
    /// short directory named by a hash of the VM directory (unique per state dir and VM).
    pub(crate) fn socket_dir_for(&self, id: &VmId) -> PathBuf {
        let vm_dir = self.vm_dir(id);
        if vm_dir.join(LONGEST_SOCKET_NAME).as_os_str().len() <= SOCKET_PATH_LIMIT {
            return vm_dir;
        }
        use sha2::Digest;
        let digest = sha2::Sha256::digest(vm_dir.as_os_str().as_encoded_bytes());
        let short: String = digest.iter().take(8).map(|byte| format!("{byte:02x}")).collect();
        self.short_socket_root.join(short)
    }

    /// The paths of a VM whose record names `socket_dir`.
    pub(crate) fn paths(&self, id: &VmId, socket_dir: &Path) -> VmPaths {
        VmPaths::new(self.vm_dir(id), socket_dir)
    }
}

/// Where sockets go when the state directory is deep: `$XDG_RUNTIME_DIR/paddock`, else
/// `/tmp/paddock-<uid>`.
pub(crate) fn default_short_socket_root() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(directory) if !directory.is_empty() => PathBuf::from(directory).join("paddock"),
        _ => PathBuf::from(format!("/tmp/paddock-{}", rustix::process::getuid().as_raw())),
    }
}

/// The default state directory: `$XDG_DATA_HOME/paddock`, else `~/.local/share/paddock`, else
/// `./.paddock` when there is no home directory.
pub fn default_state_dir() -> PathBuf {
    if let Some(directory) = std::env::var_os("XDG_DATA_HOME").filter(|value| !value.is_empty()) {
        return PathBuf::from(directory).join("paddock");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|value| !value.is_empty()) {
        return PathBuf::from(home).join(".local").join("share").join("paddock");
    }
    PathBuf::from(".paddock")
}

/// Seconds since the Unix epoch.
pub(crate) fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// Creates `directory` and its parents with mode 0700 for the leaf (it holds sockets and disks).
pub(crate) fn create_private_dir(directory: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(directory)
        .map_err(|source| RuntimeError::io("create directory", directory, source))
}

/// Writes `contents` to `path` atomically and durably (temp file, fsync, rename, fsync dir).
pub(crate) fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    let directory = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = directory.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temporary)
            .map_err(|source| RuntimeError::io("create", &temporary, source))?;
        file.write_all(contents)
            .and_then(|()| file.sync_all())
            .map_err(|source| RuntimeError::io("write", &temporary, source))?;
        std::fs::rename(&temporary, path)
            .map_err(|source| RuntimeError::io("rename into place", path, source))?;
        sync_directory(directory)
    })();
    if result.is_err() {
        // Best effort: the temporary file is garbage now; the error above is what matters.
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

/// Makes a rename or creation in `directory` durable.
pub(crate) fn sync_directory(directory: &Path) -> Result<()> {
    File::open(directory)
        .and_then(|handle| handle.sync_all())
        .map_err(|source| RuntimeError::io("sync directory", directory, source))
}

/// Writes a record atomically.
pub(crate) fn write_record(path: &Path, record: &VmRecord) -> Result<()> {
    let mut json = serde_json::to_vec_pretty(record).map_err(|error| RuntimeError::CorruptRecord {
        path: path.to_path_buf(),
        details: format!("cannot encode: {error}"),
    })?;
    json.push(b'\n');
    write_atomically(path, &json)
}

/// Reads a record.
pub(crate) fn read_record(path: &Path) -> Result<VmRecord> {
    let bytes = std::fs::read(path).map_err(|source| RuntimeError::io("read", path, source))?;
    let record: VmRecord = serde_json::from_slice(&bytes).map_err(|error| RuntimeError::CorruptRecord {
        path: path.to_path_buf(),
        details: error.to_string(),
    })?;
    if record.format_version != RECORD_FORMAT_VERSION {
        return Err(RuntimeError::CorruptRecord {
            path: path.to_path_buf(),
            details: format!(
                "format version {} is not {RECORD_FORMAT_VERSION}, the one this paddock understands",
                record.format_version
            ),
        });
    }
    Ok(record)
}

/// An exclusive lock on a state directory, released when dropped (or when the process ends).
#[derive(Debug)]
pub(crate) struct StateLock {
    _file: File,
}

impl StateLock {
    pub(crate) fn acquire(root: &Path) -> Result<StateLock> {
        let path = root.join("paddock.lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| RuntimeError::io("open", &path, source))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(StateLock { _file: file }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(RuntimeError::StateLocked {
                path: root.to_path_buf(),
            }),
            Err(errno) => Err(RuntimeError::io("lock", &path, errno.into())),
        }
    }
}

/// Lists the VM directories (`vms/<namespace>/<name>`) that hold a record.
pub(crate) fn list_vm_dirs(state: &StateDir) -> Result<Vec<VmId>> {
    let mut ids = Vec::new();
    let vms = state.vms_dir();
    let namespaces = match std::fs::read_dir(&vms) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(ids),
        Err(source) => return Err(RuntimeError::io("list", &vms, source)),
    };
    for namespace in namespaces {
        let namespace = namespace.map_err(|source| RuntimeError::io("list", &vms, source))?;
        let namespace_path = namespace.path();
        if !namespace_path.is_dir() {
            continue;
        }
        let names = std::fs::read_dir(&namespace_path)
            .map_err(|source| RuntimeError::io("list", &namespace_path, source))?;
        for name in names {
            let name = name.map_err(|source| RuntimeError::io("list", &namespace_path, source))?;
            if !name.path().join("record.json").is_file() {
                continue;
            }
            let (Some(namespace), Some(name)) = (
                namespace.file_name().to_str().map(str::to_string),
                name.file_name().to_str().map(str::to_string),
            ) else {
                continue;
            };
            if let Ok(id) = VmId::new(namespace, name) {
                ids.push(id);
            }
        }
    }
    ids.sort();
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_dns_labels() {
        assert!(VmId::new("default", "web-1").is_ok());
        assert!(VmId::new("default", "Web").is_err());
        assert!(VmId::new("default", "../etc").is_err());
        assert!(VmId::new("", "web").is_err());
        assert_eq!(VmId::new("team", "db").unwrap().to_string(), "team/db");
    }

    #[test]
    fn deep_state_dirs_move_sockets_to_a_short_directory() {
        let shallow = StateDir::new(PathBuf::from("/var/lib/paddock"), PathBuf::from("/run/paddock"));
        let id = VmId::new("default", "vm").unwrap();
        assert_eq!(shallow.socket_dir_for(&id), shallow.vm_dir(&id));
        let deep = StateDir::new(
            PathBuf::from(format!("/{}", "d".repeat(120))),
            PathBuf::from("/run/p"),
        );
        let socket_dir = deep.socket_dir_for(&id);
        assert!(socket_dir.starts_with("/run/p"), "{}", socket_dir.display());
        assert!(socket_dir.join(LONGEST_SOCKET_NAME).as_os_str().len() <= SOCKET_PATH_LIMIT);
        let other = VmId::new("default", "other").unwrap();
        assert_ne!(deep.socket_dir_for(&other), socket_dir);
    }

    #[test]
    fn atomic_write_replaces_the_whole_file() {
        let directory = std::env::temp_dir().join(format!("paddock-state-test-{}", std::process::id()));
        create_private_dir(&directory).unwrap();
        let path = directory.join("record.json");
        write_atomically(&path, b"first version, longer").unwrap();
        write_atomically(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let leftovers: Vec<_> = std::fs::read_dir(&directory)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .filter(|name| name != "record.json")
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
