//! The runtime facade: VMs from VirtualMachineApps, their power, consoles and snapshots.
//!
//! Role: the one object the server and the CLI drive (`Arc<Runtime>`). It owns the state
//! directory, keeps one supervisor task per running QEMU, applies each VM's run strategy and
//! broadcasts every change.
//!
//! Contract:
//! - Operations on one VM are serialised; operations on different VMs run concurrently.
//! - Every change of a VM's status is written to its record (atomically, durably) before it is
//!   broadcast on [`Runtime::events`].
//! - QEMU runs detached. Dropping the runtime (or the paddock process ending) leaves running VMs
//!   running; [`Runtime::open`] on the same state directory re-attaches to them (pidfile + QMP) and
//!   applies run strategies to the ones that ended meanwhile.
//! - Run strategies have KubeVirt's meaning: `Always` restarts after any end (with back-off after
//!   repeated failures) and becomes `Halted` on stop; `Halted` becomes `Always` on start;
//!   `RerunOnFailure` restarts only after a failure (QEMU killed or crashed, not a guest
//!   poweroff); `Once` and `Manual` never restart.
//! - A guest poweroff is told from a crash by QMP: QEMU runs with `-no-shutdown`, so a guest
//!   poweroff leaves a `SHUTDOWN` event (guest: true) and a stopped QEMU that paddock then quits;
//!   a QEMU that vanishes without a `SHUTDOWN` event crashed or was killed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use paddock_api::app::{FirmwareKind, RunStrategy, VirtualMachineApp};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};
use tokio::task::AbortHandle;

use crate::error::{Result, RuntimeError};
use crate::image::{ImageSource, ImageStore, LibraryImage, StoredImage};
use crate::qemu::{
    self, AcceleratorChoice, AcceleratorDecision, LaunchSpec, OVERLAY_NODE, QemuPrograms, UefiFirmware,
};
use crate::qmp::{QmpClient, QmpError, QmpEvent, RunState};
use crate::seed;
use crate::state::{
    self, DiskRecord, ExitKind, LastExit, RECORD_FORMAT_VERSION, SnapshotInfo, StateDir, StateLock, VmId,
    VmPaths, VmPhase, VmRecord, VmStatus,
};

/// How long a graceful stop waits for the guest by default before forcing it off.
pub const DEFAULT_GRACEFUL_STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How many events a subscriber may fall behind before it loses the oldest.
pub const EVENT_CAPACITY: usize = 1024;
/// How long QMP may take to answer a command.
const QMP_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting to a (new or re-attached) QEMU's QMP socket may take.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long snapshot, restore and clone jobs may take.
const JOB_TIMEOUT: Duration = Duration::from_secs(600);
/// How long QEMU may take to exit after `quit` before it is killed.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a process may linger after its QMP connection closed before it is killed.
const EXIT_AFTER_EOF_TIMEOUT: Duration = Duration::from_secs(10);
/// A VM that ran at least this long before failing starts its back-off afresh.
const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// The longest wait between automatic restarts.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Memory and CPUs when the manifest sets none (the VirtualMachineApp defaults).
const DEFAULT_MEMORY_MIB: u64 = 1024;
const DEFAULT_CPUS: u32 = 1;

/// How the runtime is set up.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// The state directory ([`state::default_state_dir`] by default).
    pub state_dir: PathBuf,
    /// `qemu-system-x86_64` to use; found on `PATH` when `None`.
    pub qemu_binary: Option<PathBuf>,
    /// KVM, TCG or automatic.
    pub accelerator: AcceleratorChoice,
    /// Where sockets go when the state directory is too deep for unix socket paths;
    /// `$XDG_RUNTIME_DIR/paddock` or `/tmp/paddock-<uid>` when `None`.
    pub short_socket_dir: Option<PathBuf>,
}

impl RuntimeOptions {
    /// Options for `state_dir` with everything else automatic.
    pub fn new(state_dir: impl Into<PathBuf>) -> RuntimeOptions {
        RuntimeOptions {
            state_dir: state_dir.into(),
            qemu_binary: None,
            accelerator: AcceleratorChoice::Auto,
            short_socket_dir: None,
        }
    }
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions::new(state::default_state_dir())
    }
}

/// What the runtime knows about one VM.
#[derive(Debug, Clone)]
pub struct VmInfo {
    /// Namespace and name.
    pub id: VmId,
    /// The manifest (with `spec.runStrategy` as start and stop changed it).
    pub app: VirtualMachineApp,
    /// The observed state.
    pub status: VmStatus,
    /// Snapshots, oldest first.
    pub snapshots: Vec<SnapshotInfo>,
    /// When the VM was created, seconds since the Unix epoch.
    pub created_at: u64,
    /// `sha256:<hex>` of the base image.
    pub base_image_digest: String,
    /// The disk's virtual size in bytes.
    pub disk_size_bytes: u64,
    /// The serial console's unix socket (one client at a time), when the console has one.
    pub serial_socket: Option<PathBuf>,
    /// The VNC server's unix socket, when the console has one.
    pub vnc_socket: Option<PathBuf>,
    /// Everything the guest wrote to its serial console since QEMU last started.
    pub console_log: PathBuf,
    /// QEMU's own messages.
    pub qemu_log: PathBuf,
}

/// A change the runtime broadcasts.
#[derive(Debug, Clone, PartialEq)]
pub enum VmEvent {
    /// A VM was created or its status changed.
    Changed {
        /// The VM.
        id: VmId,
        /// Its new status.
        status: VmStatus,
    },
    /// A VM's snapshots changed.
    SnapshotsChanged {
        /// The VM.
        id: VmId,
        /// Its snapshots now.
        snapshots: Vec<SnapshotInfo>,
    },
    /// A VM was deleted.
    Deleted {
        /// The VM.
        id: VmId,
    },
}

impl VmEvent {
    /// The VM the event is about.
    pub fn id(&self) -> &VmId {
        match self {
            VmEvent::Changed { id, .. } | VmEvent::SnapshotsChanged { id, .. } | VmEvent::Deleted { id } => {
                id
            }
        }
    }
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// The guest shut down by itself after the ACPI power button.
    GuestShutDown,
    /// The VM was switched off (force stop, or the guest did not react in time).
    Forced,
}

/// The local runtime. Share it as `Arc<Runtime>`; dropping it leaves running VMs running.
pub struct Runtime {
    inner: Arc<Inner>,
    /// Released when the runtime is dropped, so a new runtime can open the state directory.
    _lock: StateLock,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Runtime")
            .field("state_dir", &self.inner.state.root())
            .finish_non_exhaustive()
    }
}

struct Inner {
    state: StateDir,
    images: ImageStore,
    programs: QemuPrograms,
    accelerator: AcceleratorDecision,
    events: broadcast::Sender<VmEvent>,
    vms: Mutex<BTreeMap<VmId, Arc<Vm>>>,
    /// Serialises creating, cloning and deleting, so two of them never race for one name.
    naming: tokio::sync::Mutex<()>,
    /// Background tasks (supervisors, scheduled restarts), aborted when the runtime is dropped.
    tasks: Mutex<Vec<AbortHandle>>,
    shutting_down: AtomicBool,
}

struct Vm {
    id: VmId,
    paths: VmPaths,
    /// Serialises operations on this VM (user requests and automatic restarts).
    operation: tokio::sync::Mutex<()>,
    record: Mutex<VmRecord>,
    process: Mutex<Option<ProcessHandle>>,
    /// Bumped to cancel a scheduled automatic restart.
    restart_generation: AtomicU64,
    deleted: AtomicBool,
}

#[derive(Clone)]
struct ProcessHandle {
    pid: u32,
    qmp: Arc<QmpClient>,
    /// Becomes `Some` once the supervisor has seen the process end and recorded how.
    exited: watch::Receiver<Option<ExitKind>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data is plain state that stays consistent even if a holder panicked.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Runtime {
    /// Opens (creating if needed) the state directory, re-attaches to running VMs and applies run
    /// strategies. Must be called within a tokio runtime, which then runs the supervisors.
    pub async fn open(options: RuntimeOptions) -> Result<Runtime> {
        let root = std::path::absolute(&options.state_dir)
            .map_err(|source| RuntimeError::io("resolve", &options.state_dir, source))?;
        state::create_private_dir(&root)?;
        let state_lock = StateLock::acquire(&root)?;
        let short_socket_root = options
            .short_socket_dir
            .clone()
            .unwrap_or_else(state::default_short_socket_root);
        let state = StateDir::new(root, short_socket_root);
        state::create_private_dir(&state.vms_dir())?;
        let accelerator = qemu::decide_accelerator(options.accelerator)?;
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let inner = Arc::new(Inner {
            images: ImageStore::new(state.images_dir()),
            state,
            programs: QemuPrograms::locate(options.qemu_binary.clone()),
            accelerator,
            events,
            vms: Mutex::new(BTreeMap::new()),
            naming: tokio::sync::Mutex::new(()),
            tasks: Mutex::new(Vec::new()),
            shutting_down: AtomicBool::new(false),
        });
        for id in state::list_vm_dirs(&inner.state)? {
            let directory = inner.state.vm_dir(&id);
            let record = match state::read_record(&directory.join("record.json")) {
                Ok(record) => record,
                Err(error) => {
                    // One broken record must not keep every other VM from being managed.
                    tracing::error!(vm = %id, %error, "skipping a VM whose record cannot be read");
                    continue;
                }
            };
            let paths = inner.state.paths(&id, &record.socket_dir);
            let vm = Arc::new(Vm {
                id: id.clone(),
                paths,
                operation: tokio::sync::Mutex::new(()),
                record: Mutex::new(record),
                process: Mutex::new(None),
                restart_generation: AtomicU64::new(0),
                deleted: AtomicBool::new(false),
            });
            lock(&inner.vms).insert(id, Arc::clone(&vm));
            inner.recover(&vm).await;
        }
        Ok(Runtime {
            inner,
            _lock: state_lock,
        })
    }

    /// The state directory in use.
    pub fn state_dir(&self) -> &Path {
        self.inner.state.root()
    }

    /// The accelerator VMs start with, and the warning when it is TCG for lack of KVM.
    pub fn accelerator(&self) -> (qemu::Accelerator, Option<&str>) {
        (
            self.inner.accelerator.accelerator,
            self.inner.accelerator.warning.as_deref(),
        )
    }

    /// A receiver of every change from now on.
    pub fn events(&self) -> broadcast::Receiver<VmEvent> {
        self.inner.events.subscribe()
    }

    /// Every VM, ordered by namespace and name.
    pub fn list(&self) -> Vec<VmInfo> {
        let vms: Vec<Arc<Vm>> = lock(&self.inner.vms).values().cloned().collect();
        vms.iter().map(|vm| vm.info()).collect()
    }

    /// One VM.
    pub fn get(&self, id: &VmId) -> Result<VmInfo> {
        Ok(self.inner.vm(id)?.info())
    }

    /// Creates a VM from a manifest: imports its image, creates its overlay, seed and firmware
    /// variables, writes its record and, when its run strategy says so (Always, RerunOnFailure,
    /// Once), starts it. A failed start leaves the VM created with the failure in its status.
    pub async fn create(&self, app: VirtualMachineApp) -> Result<VmInfo> {
        let inner = &self.inner;
        let plan = LocalPlan::check(&app)?;
        let id = VmId::of_app(&app)?;
        let _naming = inner.naming.lock().await;
        inner.ensure_absent(&id)?;
        let qemu_img = inner.programs.qemu_img()?.to_path_buf();
        let stored = inner
            .images
            .import(&plan.source, &plan.source_text, &qemu_img)
            .await?;
        let size_bytes = match plan.disk_size {
            None => stored.virtual_size,
            Some(size) if size < stored.virtual_size => {
                return Err(RuntimeError::InvalidSpec {
                    message: format!(
                        "spec.disk.size: {size} bytes is smaller than the image's virtual size of {} bytes; make it at least that large",
                        stored.virtual_size
                    ),
                });
            }
            // qemu-img sizes are whole 512-byte sectors.
            Some(size) => size.div_ceil(512) * 512,
        };
        let mut app = app;
        app.metadata.namespace = Some(id.namespace.clone());
        app.status = None;
        let record = VmRecord {
            format_version: RECORD_FORMAT_VERSION,
            app,
            status: VmStatus::stopped(),
            disk: DiskRecord {
                source: plan.source_text.clone(),
                base_digest: stored.digest.clone(),
                base_format: stored.format.clone(),
                base_path: stored.path.clone(),
                size_bytes,
            },
            instance_id: format!("{}-{}", id.name, crate::image::random_hex(8)),
            socket_dir: inner.state.socket_dir_for(&id),
            snapshots: Vec::new(),
            stop_requested: false,
            created_at: state::now_seconds(),
        };
        let vm = inner
            .materialise(&id, record, |staging| {
                let qemu_img = qemu_img.clone();
                let stored: StoredImage = stored.clone();
                async move {
                    crate::image::create_overlay(
                        &qemu_img,
                        &stored.path,
                        &stored.format,
                        &staging.join("overlay.qcow2"),
                        Some(size_bytes),
                    )
                    .await
                }
            })
            .await?;
        drop(_naming);
        inner.start_if_strategy_wants(&vm).await;
        Ok(vm.info())
    }

    /// Starts a stopped (or failed) VM. `Halted` becomes `Always`, as with `virtctl start`.
    pub async fn start(&self, id: &VmId) -> Result<VmInfo> {
        let vm = self.inner.vm(id)?;
        let _operation = vm.operation.lock().await;
        let phase = vm.phase();
        if !matches!(
            phase,
            VmPhase::Stopped | VmPhase::Failed | VmPhase::CrashLoopBackOff
        ) {
            return Err(vm.invalid("start", phase, "it is already running; stop it first"));
        }
        vm.cancel_scheduled_restart();
        self.inner.update(&vm, |record| {
            if record.app.spec.run_strategy == RunStrategy::Halted {
                record.app.spec.run_strategy = RunStrategy::Always;
            }
            record.status.consecutive_failures = 0;
        });
        self.inner.start_process(&vm, None, false).await?;
        Ok(vm.info())
    }

    /// Stops a VM gracefully: presses the ACPI power button and waits up to `timeout` for the
    /// guest to power off, then switches it off. `Always` becomes `Halted`, as with `virtctl stop`.
    pub async fn stop(&self, id: &VmId, timeout: Duration) -> Result<StopOutcome> {
        let vm = self.inner.vm(id)?;
        let _operation = vm.operation.lock().await;
        self.inner.stop_locked(&vm, Some(timeout), "stop", true).await
    }

    /// Switches a VM off at once (QMP `quit`, then SIGKILL). `Always` becomes `Halted`.
    pub async fn force_stop(&self, id: &VmId) -> Result<()> {
        let vm = self.inner.vm(id)?;
        let _operation = vm.operation.lock().await;
        self.inner
            .stop_locked(&vm, None, "force stop", true)
            .await
            .map(drop)
    }

    /// Stops a running VM (gracefully, forced after `timeout`) and starts it again with a new
    /// QEMU process. The run strategy is unchanged.
    pub async fn restart(&self, id: &VmId, timeout: Duration) -> Result<VmInfo> {
        let vm = self.inner.vm(id)?;
        let _operation = vm.operation.lock().await;
        let phase = vm.phase();
        if !matches!(phase, VmPhase::Running | VmPhase::Paused) {
            return Err(vm.invalid(
                "restart",
                phase,
                "only a running or paused VM restarts; start it instead",
            ));
        }
        self.inner
            .stop_locked(&vm, Some(timeout), "restart", false)
            .await?;
        self.inner.start_process(&vm, None, false).await?;
        Ok(vm.info())
    }

    /// Pauses a running VM's CPUs.
    pub async fn pause(&self, id: &VmId) -> Result<VmInfo> {
        let vm = self.inner.vm(id)?;
        let _operation = vm.operation.lock().await;
        let phase = vm.phase();
        if phase != VmPhase::Running {
            return Err(vm.invalid("pause", phase, "only a running VM can be paused"));
        }
        let process = vm.process_handle(phase, "pause")?;
        process
            .qmp
            .stop()
            .await
            .map_err(|source| vm.qmp_error("stop", source))?;
        self.inner
            .update(&vm, |record| record.status.phase = VmPhase::Paused);
        Ok(vm.info())
    }

    /// Resumes a paused VM.
    pub async fn resume(&self, id: &VmId) -> Result<VmInfo> {
        let vm = self.inner.vm(id)?;
        let _operation = vm.operation.lock().await;
        let phase = vm.phase();
        if phase != VmPhase::Paused {
            return Err(vm.invalid("resume", phase, "only a paused VM can be resumed"));
        }
        let process = vm.process_handle(phase, "resume")?;
        process
            .qmp
            .cont()
            .await
            .map_err(|source| vm.qmp_error("cont", source))?;
        self.inner.update(&vm, |record| {
            record.status.phase = VmPhase::Running;
            record.status.message = None;
        });
        Ok(vm.info())
    }

    /// Deletes a VM: switches it off and removes its directory. A VM with snapshots is kept
    /// unless `force` is set. Base images stay in the store.
    pub async fn delete(&self, id: &VmId, force: bool) -> Result<()> {
        let inner = &self.inner;
        let vm = inner.vm(id)?;
        let _naming = inner.naming.lock().await;
        let _operation = vm.operation.lock().await;
        let snapshot_count = lock(&vm.record).snapshots.len();
        if snapshot_count > 0 && !force {
            return Err(RuntimeError::HasSnapshots {
                id: id.clone(),
                count: snapshot_count,
            });
        }
        vm.cancel_scheduled_restart();
        if vm.phase().has_process() || lock(&vm.process).is_some() {
            inner.stop_locked(&vm, None, "delete", false).await?;
        }
        vm.deleted.store(true, Ordering::SeqCst);
        lock(&inner.vms).remove(id);
        let socket_dir = lock(&vm.record).socket_dir.clone();
        remove_dir_if_present(&vm.paths.directory)?;
        if socket_dir != vm.paths.directory {
            remove_dir_if_present(&socket_dir)?;
        }
        if let Some(parent) = vm.paths.directory.parent() {
            state::sync_directory(parent)?;
        }
        let _ = inner.events.send(VmEvent::Deleted { id: id.clone() });
        Ok(())
    }

    /// Creates `target` as an independent copy of `source`'s disk (a running source is copied
    /// consistently at one point in time by QEMU), with the same spec, a new cloud-init instance
    /// id and no snapshots. The clone starts if its run strategy says so.
    pub async fn clone_vm(&self, source: &VmId, target: &VmId) -> Result<VmInfo> {
        let inner = &self.inner;
        let source_vm = inner.vm(source)?;
        let _naming = inner.naming.lock().await;
        inner.ensure_absent(target)?;
        let _operation = source_vm.operation.lock().await;
        let phase = source_vm.phase();
        let source_record = lock(&source_vm.record).clone();
        let live = match phase {
            VmPhase::Running | VmPhase::Paused => Some(source_vm.process_handle(phase, "clone")?),
            VmPhase::Stopped | VmPhase::Failed | VmPhase::CrashLoopBackOff => None,
            VmPhase::Starting | VmPhase::Stopping => {
                return Err(source_vm.invalid("clone", phase, "wait until it is running or stopped"));
            }
        };
        let mut app = source_record.app.clone();
        app.metadata = Default::default();
        app.metadata.name = Some(target.name.clone());
        app.metadata.namespace = Some(target.namespace.clone());
        app.metadata.labels = source_record.app.metadata.labels.clone();
        app.metadata.annotations = source_record.app.metadata.annotations.clone();
        app.status = None;
        let record = VmRecord {
            format_version: RECORD_FORMAT_VERSION,
            app,
            status: VmStatus::stopped(),
            disk: source_record.disk.clone(),
            instance_id: format!("{}-{}", target.name, crate::image::random_hex(8)),
            socket_dir: inner.state.socket_dir_for(target),
            snapshots: Vec::new(),
            stop_requested: false,
            created_at: state::now_seconds(),
        };
        let qemu_img = inner.programs.qemu_img()?.to_path_buf();
        let source_paths = source_vm.paths.clone();
        let vm = inner
            .materialise(target, record, |staging| {
                let source_vm = Arc::clone(&source_vm);
                async move {
                    let overlay = staging.join("overlay.qcow2");
                    match live {
                        Some(process) => {
                            let job = format!("paddock-clone-{}", crate::image::random_hex(4));
                            process
                                .qmp
                                .drive_backup_top(&job, OVERLAY_NODE, &overlay, JOB_TIMEOUT)
                                .await
                                .map_err(|source| source_vm.qmp_error("drive-backup", source))?;
                        }
                        None => {
                            crate::image::copy_overlay(
                                &qemu_img,
                                &source_paths.overlay,
                                &source_record.disk.base_path,
                                &source_record.disk.base_format,
                                &overlay,
                            )
                            .await?;
                        }
                    }
                    if source_paths.uefi_vars.is_file() {
                        let target_vars = staging.join("uefi-vars.fd");
                        std::fs::copy(&source_paths.uefi_vars, &target_vars)
                            .map_err(|source| RuntimeError::io("copy", &target_vars, source))?;
                    }
                    Ok(())
                }
            })
            .await?;
        drop(_operation);
        drop(_naming);
        inner.start_if_strategy_wants(&vm).await;
        Ok(vm.info())
    }

    /// A PNG of the VM's screen (QMP `screendump`).
    pub async fn screenshot(&self, id: &VmId) -> Result<Vec<u8>> {
        let vm = self.inner.vm(id)?;
        let phase = vm.phase();
        if !lock(&vm.record).app.spec.console.vnc {
            return Err(RuntimeError::Unsupported {
                message: format!("virtual machine {id} has no screen: its spec.console.vnc is false"),
            });
        }
        if !matches!(phase, VmPhase::Running | VmPhase::Paused) {
            return Err(vm.invalid("take a screenshot of", phase, "start it first"));
        }
        let process = vm.process_handle(phase, "screenshot")?;
        let file = vm
            .paths
            .directory
            .join(format!("screendump-{}.png", crate::image::random_hex(4)));
        let result = process
            .qmp
            .screendump(&file)
            .await
            .map_err(|source| vm.qmp_error("screendump", source));
        let bytes = result
            .and_then(|()| std::fs::read(&file).map_err(|source| RuntimeError::io("read", &file, source)));
        // The file was only a way to get the bytes out of QEMU.
        let _ = std::fs::remove_file(&file);
        bytes
    }

    /// The serial console's unix socket. QEMU serves one client at a time; everything the guest
    /// writes is also in the console log.
    pub fn serial_socket_path(&self, id: &VmId) -> Result<PathBuf> {
        let info = self.get(id)?;
        info.serial_socket.ok_or_else(|| RuntimeError::Unsupported {
            message: format!("virtual machine {id} has no serial console: its spec.console.serial is false"),
        })
    }

    /// The VNC server's unix socket.
    pub fn vnc_socket_path(&self, id: &VmId) -> Result<PathBuf> {
        let info = self.get(id)?;
        info.vnc_socket.ok_or_else(|| RuntimeError::Unsupported {
            message: format!("virtual machine {id} has no VNC console: its spec.console.vnc is false"),
        })
    }

    /// Takes a snapshot. With `memory`, of a running or paused VM, including its memory and
    /// device state (restoring resumes exactly there); without, of the disk only, in any stable
    /// phase (on a running VM the disk is captured at one instant, crash-consistent).
    pub async fn snapshot_create(&self, id: &VmId, name: &str, memory: bool) -> Result<SnapshotInfo> {
        check_snapshot_name(name)?;
        let inner = &self.inner;
        let vm = inner.vm(id)?;
        let _operation = vm.operation.lock().await;
        let phase = vm.phase();
        {
            let record = lock(&vm.record);
            if !record.app.spec.image.persistent {
                return Err(RuntimeError::Unsupported {
                    message: format!(
                        "virtual machine {id} has a non-persistent disk (spec.image.persistent: false), which is recreated at every start; snapshots would not survive"
                    ),
                });
            }
            if record.snapshots.iter().any(|snapshot| snapshot.name == name) {
                return Err(RuntimeError::SnapshotExists {
                    id: id.clone(),
                    snapshot: name.to_string(),
                });
            }
        }
        match (phase, memory) {
            (VmPhase::Running | VmPhase::Paused, true) => {
                let process = vm.process_handle(phase, "snapshot")?;
                let job = format!("paddock-save-{}", crate::image::random_hex(4));
                process
                    .qmp
                    .snapshot_save(&job, name, OVERLAY_NODE, &[OVERLAY_NODE], JOB_TIMEOUT)
                    .await
                    .map_err(|source| vm.qmp_error("snapshot-save", source))?;
            }
            (VmPhase::Running | VmPhase::Paused, false) => {
                let process = vm.process_handle(phase, "snapshot")?;
                process
                    .qmp
                    .execute(
                        "blockdev-snapshot-internal-sync",
                        Some(json!({"device": OVERLAY_NODE, "name": name})),
                    )
                    .await
                    .map_err(|source| vm.qmp_error("blockdev-snapshot-internal-sync", source))?;
            }
            (VmPhase::Stopped | VmPhase::Failed, false) => {
                let qemu_img = inner.programs.qemu_img()?;
                crate::image::offline_snapshot(qemu_img, "-c", name, &vm.paths.overlay).await?;
            }
            (VmPhase::Stopped | VmPhase::Failed, true) => {
                return Err(vm.invalid(
                    "take a memory snapshot of",
                    phase,
                    "a stopped VM has no memory state; take a disk-only snapshot or start it first",
                ));
            }
            (VmPhase::Starting | VmPhase::Stopping | VmPhase::CrashLoopBackOff, _) => {
                return Err(vm.invalid("snapshot", phase, "wait until it is running or stopped"));
            }
        }
        let snapshot = SnapshotInfo {
            name: name.to_string(),
            created_at: state::now_seconds(),
            memory,
            taken_in_phase: phase,
        };
        inner.update_snapshots(&vm, |snapshots| snapshots.push(snapshot.clone()));
        Ok(snapshot)
    }

    /// The base images in the store (the image library), newest import first, each with the VMs
    /// built on it. A base stored without a record gets its source and format from the first VM
    /// (by name) that uses it, else from `qemu-img info`.
    pub async fn images(&self) -> Result<Vec<LibraryImage>> {
        let qemu_img = self.inner.programs.qemu_img().ok().map(Path::to_path_buf);
        let mut images = self.inner.images.list(qemu_img.as_deref()).await?;
        // (digest, vm, source, format), ordered by VM.
        let disks: Vec<(String, VmId, String, String)> = lock(&self.inner.vms)
            .values()
            .map(|vm| {
                let record = lock(&vm.record);
                (
                    record.disk.base_digest.clone(),
                    vm.id.clone(),
                    record.disk.source.clone(),
                    record.disk.base_format.clone(),
                )
            })
            .collect();
        for image in &mut images {
            for (digest, id, source, format) in &disks {
                if *digest != image.digest {
                    continue;
                }
                image.used_by.push(id.clone());
                if image.source.is_none() {
                    image.source = Some(source.clone());
                }
                if image.format.is_none() {
                    image.format = Some(format.clone());
                }
            }
        }
        Ok(images)
    }

    /// The VM's snapshots, oldest first.
    pub fn snapshot_list(&self, id: &VmId) -> Result<Vec<SnapshotInfo>> {
        Ok(self.get(id)?.snapshots)
    }

    /// Restores a snapshot. A memory snapshot restores a running or paused VM in place, and
    /// starts a stopped one directly in the saved state (`Halted` then becomes `Always`). A
    /// disk-only snapshot needs a stopped VM, which boots from the restored disk when started.
    pub async fn snapshot_restore(&self, id: &VmId, name: &str) -> Result<VmInfo> {
        let inner = &self.inner;
        let vm = inner.vm(id)?;
        let _operation = vm.operation.lock().await;
        let snapshot = vm.snapshot(name)?;
        let phase = vm.phase();
        match (phase, snapshot.memory) {
            (VmPhase::Running | VmPhase::Paused, true) => {
                let process = vm.process_handle(phase, "restore")?;
                let job = format!("paddock-load-{}", crate::image::random_hex(4));
                process
                    .qmp
                    .snapshot_load(&job, name, OVERLAY_NODE, &[OVERLAY_NODE], JOB_TIMEOUT)
                    .await
                    .map_err(|source| vm.qmp_error("snapshot-load", source))?;
                inner.sync_phase(&vm, &process.qmp).await;
            }
            (VmPhase::Running | VmPhase::Paused, false) => {
                return Err(vm.invalid(
                    "restore the disk-only snapshot of",
                    phase,
                    "stop the VM first: a disk cannot be swapped under a running guest",
                ));
            }
            (VmPhase::Stopped | VmPhase::Failed, false) => {
                let qemu_img = inner.programs.qemu_img()?;
                crate::image::offline_snapshot(qemu_img, "-a", name, &vm.paths.overlay).await?;
            }
            (VmPhase::Stopped | VmPhase::Failed, true) => {
                vm.cancel_scheduled_restart();
                inner.update(&vm, |record| {
                    if record.app.spec.run_strategy == RunStrategy::Halted {
                        record.app.spec.run_strategy = RunStrategy::Always;
                    }
                });
                inner.start_process(&vm, Some(name), false).await?;
            }
            (VmPhase::Starting | VmPhase::Stopping | VmPhase::CrashLoopBackOff, _) => {
                return Err(vm.invalid(
                    "restore a snapshot of",
                    phase,
                    "wait until it is running or stopped",
                ));
            }
        }
        Ok(vm.info())
    }

    /// Deletes a snapshot.
    pub async fn snapshot_delete(&self, id: &VmId, name: &str) -> Result<()> {
        let inner = &self.inner;
        let vm = inner.vm(id)?;
        let _operation = vm.operation.lock().await;
        vm.snapshot(name)?;
        let phase = vm.phase();
        match phase {
            VmPhase::Running | VmPhase::Paused => {
                let process = vm.process_handle(phase, "delete a snapshot")?;
                process
                    .qmp
                    .execute(
                        "blockdev-snapshot-delete-internal-sync",
                        Some(json!({"device": OVERLAY_NODE, "name": name})),
                    )
                    .await
                    .map_err(|source| vm.qmp_error("blockdev-snapshot-delete-internal-sync", source))?;
            }
            VmPhase::Stopped | VmPhase::Failed => {
                let qemu_img = inner.programs.qemu_img()?;
                crate::image::offline_snapshot(qemu_img, "-d", name, &vm.paths.overlay).await?;
            }
            VmPhase::Starting | VmPhase::Stopping | VmPhase::CrashLoopBackOff => {
                return Err(vm.invalid(
                    "delete a snapshot of",
                    phase,
                    "wait until it is running or stopped",
                ));
            }
        }
        inner.update_snapshots(&vm, |snapshots| {
            snapshots.retain(|snapshot| snapshot.name != name)
        });
        Ok(())
    }

    /// Waits until the VM's status satisfies `condition` (checked now and at every change) and
    /// returns it; fails when `timeout` passes first or the VM is deleted.
    pub async fn wait_for_status(
        &self,
        id: &VmId,
        timeout: Duration,
        mut condition: impl FnMut(&VmStatus) -> bool,
    ) -> Result<VmStatus> {
        let mut events = self.events();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.get(id)?.status;
            if condition(&status) {
                return Ok(status);
            }
            let received = tokio::time::timeout_at(deadline, events.recv()).await;
            match received {
                Err(_) => {
                    return Err(RuntimeError::Timeout {
                        id: id.clone(),
                        timeout,
                        phase: status.phase,
                    });
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => return Err(RuntimeError::ShuttingDown),
                // A lagged receiver just re-reads the current status above.
                Ok(_) => {}
            }
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        for task in lock(&self.inner.tasks).drain(..) {
            task.abort();
        }
        // Close the QMP connections now, so the next runtime can connect; QEMU keeps running.
        let vms: Vec<Arc<Vm>> = lock(&self.inner.vms).values().cloned().collect();
        for vm in vms {
            lock(&vm.process).take();
        }
    }
}

/// What the local runtime takes from a manifest, checked.
struct LocalPlan {
    source: ImageSource,
    source_text: String,
    disk_size: Option<u64>,
}

impl LocalPlan {
    fn check(app: &VirtualMachineApp) -> Result<LocalPlan> {
        let spec = &app.spec;
        let source_text = spec.image.container_disk.clone();
        let source = source_text.as_deref().map(ImageSource::parse).transpose()?;
        let local_source = source.as_ref().is_some_and(ImageSource::is_local);
        // The shared validation, minus what the local runtime deliberately accepts: local image
        // sources (not registry references) and a disk without a size (it gets the image's).
        if let Err(invalid) = paddock_api::validation::validate(app) {
            let no_disk_size = spec.disk.as_ref().and_then(|disk| disk.size.as_ref()).is_none();
            let accepted_locally = |field: &str| {
                (field == "spec.image.containerDisk" && local_source)
                    || (field == "spec.disk.size" && no_disk_size)
            };
            let remaining: Vec<String> = invalid
                .violations
                .iter()
                .filter(|violation| !accepted_locally(&violation.field))
                .map(ToString::to_string)
                .collect();
            if !remaining.is_empty() {
                return Err(RuntimeError::InvalidSpec {
                    message: format!("the VirtualMachineApp is invalid: {}", remaining.join("; ")),
                });
            }
        }
        let (Some(source), Some(source_text)) = (source, source_text) else {
            return Err(RuntimeError::Unsupported {
                message: format!(
                    "spec.image: the local runtime boots containerDisk images only (file:<disk>, oci:<layout>[:tag] or a registry reference), not {}",
                    spec.image.sources_set().join(", ")
                ),
            });
        };
        if let Some(resources) = &spec.resources
            && resources.instancetype.is_some()
        {
            return Err(RuntimeError::Unsupported {
                message: "spec.resources.instancetype: the local runtime has no instancetypes; set resources.cpu and resources.memory".to_string(),
            });
        }
        if let Some(cloud_init) = &spec.cloud_init {
            // Refuses what the seed cannot carry before anything is created.
            seed::seed_files(cloud_init, "check", "check")?;
        }
        let disk_size = spec
            .disk
            .as_ref()
            .and_then(|disk| disk.size.as_ref())
            .map(|size| parse_size(&size.0, "spec.disk.size"))
            .transpose()?;
        Ok(LocalPlan {
            source,
            source_text,
            disk_size,
        })
    }
}

fn parse_size(text: &str, field: &str) -> Result<u64> {
    paddock_api::quantity::parse_quantity(text)
        .map_err(|error| RuntimeError::InvalidSpec {
            message: format!("{field}: {error}"),
        })
        .and_then(|bytes| {
            u64::try_from(bytes).map_err(|_| RuntimeError::InvalidSpec {
                message: format!("{field}: {text} is too large"),
            })
        })
}

fn check_snapshot_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'))
        && !name.starts_with('.')
        // qemu-img treats an all-digit tag as a snapshot id, not a name.
        && !name.bytes().all(|byte| byte.is_ascii_digit());
    if valid {
        Ok(())
    } else {
        Err(RuntimeError::InvalidSpec {
            message: format!(
                "snapshot name {name:?} is invalid: use 1 to 64 letters, digits, '-', '_' or '.', not only digits and not starting with '.'"
            ),
        })
    }
}

fn remove_dir_if_present(directory: &Path) -> Result<()> {
    match std::fs::remove_dir_all(directory) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RuntimeError::io("remove", directory, source)),
    }
}

/// The wait before automatic restart number `failures` (failures in a row): none for the first,
/// then 5 s doubling up to [`MAX_BACKOFF`].
fn backoff(failures: u32) -> Duration {
    if failures <= 1 {
        return Duration::ZERO;
    }
    let exponent = (failures - 2).min(16);
    Duration::from_secs(5u64.saturating_mul(1 << exponent)).min(MAX_BACKOFF)
}

/// Whether the run strategy restarts a VM whose process ended this way.
fn restarts_after(strategy: RunStrategy, kind: ExitKind) -> bool {
    match strategy {
        RunStrategy::Always => kind != ExitKind::Stopped,
        RunStrategy::RerunOnFailure => kind.is_failure(),
        RunStrategy::Once | RunStrategy::Manual | RunStrategy::Halted => false,
    }
}

/// Whether the run strategy wants a VM without a process started (at creation or when paddock
/// starts).
fn wants_running(record: &VmRecord) -> bool {
    let status = &record.status;
    match record.app.spec.run_strategy {
        RunStrategy::Always => true,
        RunStrategy::RerunOnFailure => {
            !status.has_run
                || status
                    .last_exit
                    .as_ref()
                    .is_some_and(|exit| exit.kind.is_failure())
        }
        RunStrategy::Once => !status.has_run,
        RunStrategy::Manual | RunStrategy::Halted => false,
    }
}

impl Vm {
    fn phase(&self) -> VmPhase {
        lock(&self.record).status.phase
    }

    fn info(&self) -> VmInfo {
        let record = lock(&self.record);
        let console = &record.app.spec.console;
        VmInfo {
            id: self.id.clone(),
            app: record.app.clone(),
            status: record.status.clone(),
            snapshots: record.snapshots.clone(),
            created_at: record.created_at,
            base_image_digest: record.disk.base_digest.clone(),
            disk_size_bytes: record.disk.size_bytes,
            serial_socket: console.serial.then(|| self.paths.serial_socket.clone()),
            vnc_socket: console.vnc.then(|| self.paths.vnc_socket.clone()),
            console_log: self.paths.console_log.clone(),
            qemu_log: self.paths.qemu_log.clone(),
        }
    }

    fn snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        lock(&self.record)
            .snapshots
            .iter()
            .find(|snapshot| snapshot.name == name)
            .cloned()
            .ok_or_else(|| RuntimeError::SnapshotNotFound {
                id: self.id.clone(),
                snapshot: name.to_string(),
            })
    }

    fn invalid(&self, operation: &'static str, phase: VmPhase, hint: &str) -> RuntimeError {
        RuntimeError::InvalidTransition {
            id: self.id.clone(),
            operation,
            phase: phase.to_string(),
            hint: hint.to_string(),
        }
    }

    fn qmp_error(&self, action: &'static str, source: QmpError) -> RuntimeError {
        RuntimeError::Qmp {
            id: self.id.clone(),
            action,
            source: Box::new(source),
        }
    }

    fn process_handle(&self, phase: VmPhase, operation: &'static str) -> Result<ProcessHandle> {
        lock(&self.process).clone().ok_or_else(|| {
            self.invalid(
                operation,
                phase,
                "its QEMU process is gone; wait for its status to settle",
            )
        })
    }

    fn cancel_scheduled_restart(&self) {
        self.restart_generation.fetch_add(1, Ordering::SeqCst);
    }
}

impl Inner {
    fn vm(&self, id: &VmId) -> Result<Arc<Vm>> {
        lock(&self.vms)
            .get(id)
            .cloned()
            .ok_or_else(|| RuntimeError::NotFound { id: id.clone() })
    }

    fn ensure_absent(&self, id: &VmId) -> Result<()> {
        if lock(&self.vms).contains_key(id) || self.state.vm_dir(id).exists() {
            return Err(RuntimeError::AlreadyExists { id: id.clone() });
        }
        Ok(())
    }

    fn register_task(&self, handle: AbortHandle) {
        let mut tasks = lock(&self.tasks);
        tasks.retain(|task| !task.is_finished());
        tasks.push(handle);
    }

    /// Builds a new VM's directory under a temporary name (`fill` adds the overlay and
    /// firmware variables; the seed and record are added here) and renames it into place.
    async fn materialise<F, Fut>(&self, id: &VmId, record: VmRecord, fill: F) -> Result<Arc<Vm>>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let namespace_dir = self.state.vms_dir().join(&id.namespace);
        state::create_private_dir(&namespace_dir)?;
        let staging = namespace_dir.join(format!(".creating-{}-{}", id.name, crate::image::random_hex(4)));
        state::create_private_dir(&staging)?;
        let result = async {
            fill(staging.clone()).await?;
            let spec = &record.app.spec;
            if let Some(cloud_init) = &spec.cloud_init {
                let files = seed::seed_files(cloud_init, &record.instance_id, &id.name)?;
                seed::write_seed(&files, &staging.join("seed.img")).await?;
            }
            let uefi_vars = staging.join("uefi-vars.fd");
            if let Some(firmware) = &spec.firmware
                && firmware.kind == FirmwareKind::Uefi
                && !uefi_vars.exists()
            {
                let uefi = qemu::locate_uefi(firmware.secure_boot == Some(true))?;
                std::fs::copy(&uefi.pristine_vars, &uefi_vars).map_err(|source| {
                    RuntimeError::io("copy the UEFI variable store to", &uefi_vars, source)
                })?;
            }
            state::write_record(&staging.join("record.json"), &record)?;
            let final_dir = self.state.vm_dir(id);
            std::fs::rename(&staging, &final_dir)
                .map_err(|source| RuntimeError::io("rename into place", &final_dir, source))?;
            state::sync_directory(&namespace_dir)
        }
        .await;
        if let Err(error) = result {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(error);
        }
        let paths = self.state.paths(id, &record.socket_dir);
        let status = record.status.clone();
        let vm = Arc::new(Vm {
            id: id.clone(),
            paths,
            operation: tokio::sync::Mutex::new(()),
            record: Mutex::new(record),
            process: Mutex::new(None),
            restart_generation: AtomicU64::new(0),
            deleted: AtomicBool::new(false),
        });
        lock(&self.vms).insert(id.clone(), Arc::clone(&vm));
        let _ = self.events.send(VmEvent::Changed {
            id: id.clone(),
            status,
        });
        Ok(vm)
    }

    /// Applies `change` to the record, persists it and broadcasts the status if it changed.
    fn update(&self, vm: &Vm, change: impl FnOnce(&mut VmRecord)) {
        let status = {
            let mut record = lock(&vm.record);
            let before = record.status.clone();
            change(&mut record);
            if !vm.deleted.load(Ordering::SeqCst)
                && let Err(error) = state::write_record(&vm.paths.record, &record)
            {
                // The in-memory state stays authoritative for this process; the next write retries.
                tracing::error!(vm = %vm.id, %error, "failed to write the VM record");
            }
            (record.status != before).then(|| record.status.clone())
        };
        if let Some(status) = status {
            let _ = self.events.send(VmEvent::Changed {
                id: vm.id.clone(),
                status,
            });
        }
    }

    fn update_snapshots(&self, vm: &Vm, change: impl FnOnce(&mut Vec<SnapshotInfo>)) {
        let mut snapshots = Vec::new();
        self.update(vm, |record| {
            change(&mut record.snapshots);
            snapshots = record.snapshots.clone();
        });
        let _ = self.events.send(VmEvent::SnapshotsChanged {
            id: vm.id.clone(),
            snapshots,
        });
    }

    /// After loading a record: re-attach to its QEMU, or account for the QEMU that ended while
    /// paddock was away, then apply the run strategy.
    async fn recover(self: &Arc<Self>, vm: &Arc<Vm>) {
        let (pid, phase, stop_requested) = {
            let record = lock(&vm.record);
            (record.status.pid, record.status.phase, record.stop_requested)
        };
        let live_pid = pid
            .or_else(|| qemu::read_pidfile(&vm.paths.pidfile).ok().flatten())
            .filter(|pid| qemu::is_our_qemu(*pid, &vm.paths.pidfile));
        if let Some(pid) = live_pid {
            match self.attach(vm, pid).await {
                Ok(process) => {
                    tracing::info!(vm = %vm.id, pid, "re-attached to running qemu");
                    if stop_requested {
                        // A stop was under way when paddock ended; finish it.
                        let _ = process.qmp.quit().await;
                    }
                    return;
                }
                Err(error) => {
                    tracing::error!(vm = %vm.id, pid, %error, "qemu runs but cannot be re-attached; killing it");
                    qemu::kill_our_qemu(pid, &vm.paths.pidfile);
                    qemu::wait_for_exit(pid, &vm.paths.pidfile, QUIT_TIMEOUT).await;
                }
            }
        }
        if phase.has_process() {
            let (kind, message) = if stop_requested {
                (ExitKind::Stopped, "stopped by request".to_string())
            } else {
                (
                    ExitKind::Crashed,
                    "qemu ended while paddock was not running, without the guest shutting down".to_string(),
                )
            };
            self.record_exit(vm, kind, message, None);
            return;
        }
        if phase == VmPhase::CrashLoopBackOff {
            self.schedule_restart(vm);
            return;
        }
        self.start_if_strategy_wants(vm).await;
    }

    async fn start_if_strategy_wants(self: &Arc<Self>, vm: &Arc<Vm>) {
        let wanted = {
            let record = lock(&vm.record);
            wants_running(&record) && !record.status.phase.has_process()
        };
        if !wanted {
            return;
        }
        let _operation = vm.operation.lock().await;
        if vm.phase().has_process() {
            return;
        }
        if let Err(error) = self.start_process(vm, None, true).await {
            tracing::error!(vm = %vm.id, %error, "automatic start failed");
        }
    }

    /// Starts QEMU for a VM (the caller holds its operation lock). With `restore`, QEMU starts
    /// paused, loads that memory snapshot and then runs. A failed `automatic` start is retried as
    /// the run strategy says; a failed requested start only reports.
    async fn start_process(
        self: &Arc<Self>,
        vm: &Arc<Vm>,
        restore: Option<&str>,
        automatic: bool,
    ) -> Result<()> {
        let retry = if automatic { None } else { Some(false) };
        let qemu_binary = self.programs.qemu()?.to_path_buf();
        let record = lock(&vm.record).clone();
        let spec = &record.app.spec;
        let resources = spec.resources.clone().unwrap_or_default();
        let memory_mib = match &resources.memory {
            Some(memory) => parse_size(&memory.0, "spec.resources.memory")?.div_ceil(1024 * 1024),
            None => DEFAULT_MEMORY_MIB,
        };
        let uefi: Option<UefiFirmware> = match &spec.firmware {
            Some(firmware) if firmware.kind == FirmwareKind::Uefi => {
                let uefi = qemu::locate_uefi(firmware.secure_boot == Some(true))?;
                if !vm.paths.uefi_vars.exists() {
                    std::fs::copy(&uefi.pristine_vars, &vm.paths.uefi_vars).map_err(|source| {
                        RuntimeError::io("copy the UEFI variable store to", &vm.paths.uefi_vars, source)
                    })?;
                }
                Some(uefi)
            }
            _ => None,
        };
        state::create_private_dir(&record.socket_dir)?;
        if !spec.image.persistent {
            // A non-persistent disk starts from the image every time, as a containerDisk does.
            let qemu_img = self.programs.qemu_img()?;
            let _ = std::fs::remove_file(&vm.paths.overlay);
            crate::image::create_overlay(
                qemu_img,
                &record.disk.base_path,
                &record.disk.base_format,
                &vm.paths.overlay,
                Some(record.disk.size_bytes),
            )
            .await?;
        }
        let launch = LaunchSpec {
            id: vm.id.clone(),
            paths: vm.paths.clone(),
            accelerator: self.accelerator.accelerator,
            cpus: resources.cpu.unwrap_or(DEFAULT_CPUS),
            memory_mib,
            uefi,
            seed: vm.paths.seed.is_file(),
            vnc: spec.console.vnc,
            serial: spec.console.serial,
            paused: restore.is_some(),
        };
        let accelerator = self.accelerator.clone();
        self.update(vm, |record| {
            let status = &mut record.status;
            status.phase = VmPhase::Starting;
            status.message = None;
            status.has_run = true;
            status.accelerator = Some(accelerator.accelerator);
            status.warnings = accelerator.warning.clone().into_iter().collect();
            record.stop_requested = false;
        });
        let pid = match qemu::launch(&qemu_binary, &launch).await {
            Ok(pid) => pid,
            Err(error) => {
                self.record_exit(vm, ExitKind::StartFailed, error.to_string(), retry);
                return Err(error);
            }
        };
        self.update(vm, |record| {
            record.status.pid = Some(pid);
            record.status.started_at = Some(state::now_seconds());
        });
        let process = match self.attach(vm, pid).await {
            Ok(process) => process,
            Err(error) => {
                qemu::kill_our_qemu(pid, &vm.paths.pidfile);
                qemu::wait_for_exit(pid, &vm.paths.pidfile, QUIT_TIMEOUT).await;
                self.update(vm, |record| record.status.pid = None);
                self.record_exit(vm, ExitKind::StartFailed, error.to_string(), retry);
                return Err(error);
            }
        };
        if let Some(tag) = restore {
            let job = format!("paddock-load-{}", crate::image::random_hex(4));
            let loaded = async {
                process
                    .qmp
                    .snapshot_load(&job, tag, OVERLAY_NODE, &[OVERLAY_NODE], JOB_TIMEOUT)
                    .await
                    .map_err(|source| vm.qmp_error("snapshot-load", source))?;
                process
                    .qmp
                    .cont()
                    .await
                    .map_err(|source| vm.qmp_error("cont", source))
            }
            .await;
            if let Err(error) = loaded {
                // A half-restored guest must not run: switch it off and report.
                self.update(vm, |record| record.stop_requested = true);
                let _ = process.qmp.quit().await;
                wait_exited(&process, QUIT_TIMEOUT).await;
                return Err(error);
            }
            self.sync_phase(vm, &process.qmp).await;
        }
        Ok(())
    }

    /// Connects to a VM's QEMU, starts its supervisor and syncs its phase.
    async fn attach(self: &Arc<Self>, vm: &Arc<Vm>, pid: u32) -> Result<ProcessHandle> {
        let qmp = Arc::new(
            connect_qmp(&vm.paths.qmp_socket)
                .await
                .map_err(|source| vm.qmp_error("connect", source))?,
        );
        let (exited_sender, exited) = watch::channel(None);
        let events = qmp.subscribe();
        let process = ProcessHandle {
            pid,
            qmp: Arc::clone(&qmp),
            exited,
        };
        *lock(&vm.process) = Some(process.clone());
        self.update(vm, |record| {
            record.status.pid = Some(pid);
            if record.status.started_at.is_none() {
                record.status.started_at = Some(state::now_seconds());
            }
        });
        let supervisor = tokio::spawn(supervise(
            Arc::clone(self),
            Arc::clone(vm),
            Arc::clone(&qmp),
            events,
            pid,
            exited_sender,
        ));
        self.register_task(supervisor.abort_handle());
        self.sync_phase(vm, &qmp).await;
        Ok(process)
    }

    /// Sets the phase from QEMU's run state.
    async fn sync_phase(&self, vm: &Vm, qmp: &QmpClient) {
        let state = match qmp.query_status().await {
            Ok(state) => state,
            // The connection ending is handled by the supervisor.
            Err(_) => return,
        };
        let (phase, message) = match state {
            RunState::Running | RunState::Suspended => (VmPhase::Running, None),
            RunState::Paused => (VmPhase::Paused, None),
            RunState::IoError => (
                VmPhase::Paused,
                Some("paused after a disk I/O error (disk full?)".to_string()),
            ),
            RunState::InternalError => (
                VmPhase::Paused,
                Some("paused after an internal error of the accelerator; see qemu.log".to_string()),
            ),
            RunState::GuestPanicked => (VmPhase::Paused, Some("the guest panicked".to_string())),
            RunState::Watchdog => (VmPhase::Paused, Some("paused by the guest watchdog".to_string())),
            RunState::Shutdown => {
                // The guest powered off (QEMU stays because of -no-shutdown): let QEMU go; the
                // supervisor records the exit when the connection closes.
                let _ = qmp.quit().await;
                return;
            }
            _ => return,
        };
        self.update(vm, |record| {
            if record.status.phase != VmPhase::Stopping {
                record.status.phase = phase;
                record.status.message = message;
            }
        });
    }

    /// Stops a VM (the caller holds its operation lock). `timeout` `None` forces at once.
    /// `user_stop` applies KubeVirt's strategy change (Always → Halted).
    async fn stop_locked(
        self: &Arc<Self>,
        vm: &Arc<Vm>,
        timeout: Option<Duration>,
        operation: &'static str,
        user_stop: bool,
    ) -> Result<StopOutcome> {
        let phase = vm.phase();
        let process = lock(&vm.process).clone();
        vm.cancel_scheduled_restart();
        let halt = |record: &mut VmRecord| {
            if user_stop && record.app.spec.run_strategy == RunStrategy::Always {
                record.app.spec.run_strategy = RunStrategy::Halted;
            }
        };
        let Some(process) = process else {
            if phase == VmPhase::CrashLoopBackOff {
                // Nothing runs; the pending automatic restart is what gets stopped.
                self.update(vm, |record| {
                    halt(record);
                    record.status.phase = VmPhase::Stopped;
                    record.status.message = Some("stopped by request while waiting to restart".to_string());
                });
                return Ok(StopOutcome::Forced);
            }
            return Err(vm.invalid(operation, phase, "it is not running"));
        };
        self.update(vm, |record| {
            halt(record);
            record.stop_requested = true;
            record.status.phase = VmPhase::Stopping;
        });
        let mut outcome = StopOutcome::Forced;
        if let Some(timeout) = timeout {
            if phase == VmPhase::Paused {
                // A paused guest cannot react to the power button.
                let _ = process.qmp.cont().await;
            }
            match process.qmp.system_powerdown().await {
                Ok(()) => {
                    if wait_exited(&process, timeout).await.is_some() {
                        outcome = StopOutcome::GuestShutDown;
                    }
                }
                Err(error) => tracing::warn!(vm = %vm.id, %error, "power button failed; forcing the stop"),
            }
        }
        if outcome == StopOutcome::Forced {
            let _ = process.qmp.quit().await;
            if wait_exited(&process, QUIT_TIMEOUT).await.is_none() {
                qemu::kill_our_qemu(process.pid, &vm.paths.pidfile);
                if wait_exited(&process, QUIT_TIMEOUT).await.is_none() {
                    return Err(RuntimeError::QemuStart {
                        id: vm.id.clone(),
                        details: format!("qemu (pid {}) does not exit even after SIGKILL", process.pid),
                    });
                }
            }
        }
        Ok(outcome)
    }

    /// Records how a process ended, updates the phase and applies the run strategy.
    /// `restart` overrides the strategy's decision (`Some(false)`: never restart from here).
    fn record_exit(self: &Arc<Self>, vm: &Arc<Vm>, kind: ExitKind, message: String, restart: Option<bool>) {
        let mut schedule = false;
        self.update(vm, |record| {
            let ran_for = record
                .status
                .started_at
                .map(|started| state::now_seconds().saturating_sub(started))
                .unwrap_or(0);
            let status = &mut record.status;
            if kind.is_failure() {
                status.consecutive_failures =
                    if ran_for >= HEALTHY_RUN.as_secs() && kind != ExitKind::StartFailed {
                        1
                    } else {
                        status.consecutive_failures.saturating_add(1)
                    };
            } else {
                status.consecutive_failures = 0;
            }
            status.pid = None;
            status.started_at = None;
            status.last_exit = Some(LastExit {
                kind,
                at: state::now_seconds(),
                message: message.clone(),
            });
            let wanted = restart.unwrap_or_else(|| restarts_after(record.app.spec.run_strategy, kind));
            record.stop_requested = false;
            let status = &mut record.status;
            if wanted {
                schedule = true;
                let delay = backoff(status.consecutive_failures);
                if delay.is_zero() {
                    status.phase = VmPhase::Starting;
                    status.message = Some(format!("restarting after: {message}"));
                } else {
                    status.phase = VmPhase::CrashLoopBackOff;
                    status.message = Some(format!(
                        "{} failures in a row; restarting in {} s after: {message}",
                        status.consecutive_failures,
                        delay.as_secs()
                    ));
                }
            } else if kind.is_failure() {
                status.phase = VmPhase::Failed;
                status.message = Some(message.clone());
            } else {
                status.phase = VmPhase::Stopped;
                status.message = None;
            }
        });
        if schedule {
            self.schedule_restart(vm);
        }
    }

    /// Restarts the VM after its back-off, unless something else happens to it first.
    fn schedule_restart(self: &Arc<Self>, vm: &Arc<Vm>) {
        if self.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        let generation = vm.restart_generation.fetch_add(1, Ordering::SeqCst) + 1;
        let failures = lock(&vm.record).status.consecutive_failures;
        let delay = backoff(failures);
        let inner = Arc::clone(self);
        let vm = Arc::clone(vm);
        let task = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _operation = vm.operation.lock().await;
            let still_wanted = vm.restart_generation.load(Ordering::SeqCst) == generation
                && !vm.deleted.load(Ordering::SeqCst)
                && !inner.shutting_down.load(Ordering::SeqCst)
                && lock(&vm.process).is_none()
                && matches!(vm.phase(), VmPhase::Starting | VmPhase::CrashLoopBackOff);
            if !still_wanted {
                return;
            }
            inner.update(&vm, |record| {
                record.status.restart_count = record.status.restart_count.saturating_add(1)
            });
            if let Err(error) = inner.start_process(&vm, None, true).await {
                tracing::error!(vm = %vm.id, %error, "automatic restart failed");
            }
        });
        self.register_task(task.abort_handle());
    }
}

/// Waits for the supervisor to record the process's end; `None` on timeout.
async fn wait_exited(process: &ProcessHandle, timeout: Duration) -> Option<ExitKind> {
    let mut exited = process.exited.clone();
    let waited = tokio::time::timeout(timeout, exited.wait_for(Option::is_some)).await;
    match waited {
        Ok(Ok(kind)) => *kind,
        // The supervisor is gone (runtime shutting down): the process may still run.
        Ok(Err(_)) | Err(_) => None,
    }
}

async fn connect_qmp(socket: &Path) -> Result<QmpClient, QmpError> {
    let deadline = tokio::time::Instant::now() + QMP_CONNECT_TIMEOUT;
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        match QmpClient::connect_with_timeout(socket, remaining.min(QMP_COMMAND_TIMEOUT)).await {
            Ok(client) => return Ok(client),
            // QEMU serves one QMP client at a time; a previous runtime's connection may still be
            // closing, so the greeting can be late or the connection refused for a moment.
            Err(
                error @ (QmpError::Connect { .. }
                | QmpError::Timeout { .. }
                | QmpError::ConnectionClosed { .. }),
            ) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(%error, "qmp not ready yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// QEMU's reason for a `SHUTDOWN` event.
struct ShutdownSeen {
    guest: bool,
    reason: String,
}

/// Watches one QEMU process until it ends, keeping the phase in sync, then records the end.
async fn supervise(
    inner: Arc<Inner>,
    vm: Arc<Vm>,
    qmp: Arc<QmpClient>,
    mut events: broadcast::Receiver<QmpEvent>,
    pid: u32,
    exited: watch::Sender<Option<ExitKind>>,
) {
    let mut shutdown: Option<ShutdownSeen> = None;
    loop {
        tokio::select! {
            biased;
            event = events.recv() => match event {
                Ok(event) => handle_event(&inner, &vm, &qmp, &event, &mut shutdown).await,
                Err(broadcast::error::RecvError::Lagged(_)) => inner.sync_phase(&vm, &qmp).await,
                Err(broadcast::error::RecvError::Closed) => break,
            },
            () = qmp.closed() => {
                // Events that arrived just before the end are still queued.
                while let Ok(event) = events.try_recv() {
                    if event.name == "SHUTDOWN" && shutdown.is_none() {
                        shutdown = Some(shutdown_seen(&event));
                    }
                }
                break;
            }
        }
    }
    drop(qmp);
    if !qemu::wait_for_exit(pid, &vm.paths.pidfile, EXIT_AFTER_EOF_TIMEOUT).await {
        tracing::warn!(vm = %vm.id, pid, "qemu closed its monitor but did not exit; killing it");
        qemu::kill_our_qemu(pid, &vm.paths.pidfile);
        qemu::wait_for_exit(pid, &vm.paths.pidfile, QUIT_TIMEOUT).await;
    }
    let stop_requested = lock(&vm.record).stop_requested;
    let (kind, message) = classify_exit(stop_requested, shutdown.as_ref());
    tracing::info!(vm = %vm.id, pid, ?kind, %message, "qemu ended");
    {
        let mut process = lock(&vm.process);
        if process.as_ref().is_some_and(|process| process.pid == pid) {
            *process = None;
        }
    }
    if !vm.deleted.load(Ordering::SeqCst) && !inner.shutting_down.load(Ordering::SeqCst) {
        inner.record_exit(&vm, kind, message, None);
    }
    exited.send_replace(Some(kind));
}

fn shutdown_seen(event: &QmpEvent) -> ShutdownSeen {
    ShutdownSeen {
        guest: event.data.get("guest").and_then(Value::as_bool).unwrap_or(false),
        reason: event
            .data
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string(),
    }
}

async fn handle_event(
    inner: &Inner,
    vm: &Vm,
    qmp: &QmpClient,
    event: &QmpEvent,
    shutdown: &mut Option<ShutdownSeen>,
) {
    match event.name.as_str() {
        // The first shutdown is the one that counts: quitting QEMU after a guest poweroff makes
        // QEMU report a second one (host-qmp-quit).
        "SHUTDOWN" if shutdown.is_none() => {
            let seen = shutdown_seen(event);
            tracing::info!(vm = %vm.id, guest = seen.guest, reason = %seen.reason, "qemu reports a shutdown");
            let guest_initiated = seen.guest;
            *shutdown = Some(seen);
            if guest_initiated {
                // -no-shutdown keeps QEMU around after a guest poweroff; the VM is off now.
                inner.update(vm, |record| record.status.phase = VmPhase::Stopping);
                let _ = qmp.quit().await;
            }
        }
        "STOP" | "RESUME" => inner.sync_phase(vm, qmp).await,
        "RESET" => tracing::info!(vm = %vm.id, data = %event.data, "the guest reset"),
        _ => {}
    }
}

/// How a process ended, from whether a stop was requested and QEMU's last shutdown event.
fn classify_exit(stop_requested: bool, shutdown: Option<&ShutdownSeen>) -> (ExitKind, String) {
    if stop_requested {
        let how = match shutdown {
            Some(seen) if seen.guest => "the guest shut down".to_string(),
            Some(seen) => format!("qemu shut down ({})", seen.reason),
            None => "qemu was killed".to_string(),
        };
        return (ExitKind::Stopped, format!("stopped by request: {how}"));
    }
    match shutdown {
        Some(seen) if seen.reason == "guest-panic" => (ExitKind::Crashed, "the guest panicked".to_string()),
        Some(seen) if seen.guest => (
            ExitKind::GuestShutdown,
            format!("the guest powered off ({})", seen.reason),
        ),
        Some(seen) if seen.reason == "host-signal" => (
            ExitKind::Killed,
            "qemu was terminated by a signal from outside paddock".to_string(),
        ),
        Some(seen) => (ExitKind::Stopped, format!("qemu shut down ({})", seen.reason)),
        None => (
            ExitKind::Crashed,
            "qemu ended without the guest shutting down (killed or crashed); see qemu.log".to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies_restart_as_kubevirt_does() {
        use ExitKind::*;
        use RunStrategy::*;
        for kind in [GuestShutdown, Crashed, Killed, StartFailed] {
            assert!(restarts_after(Always, kind), "{kind:?}");
        }
        assert!(!restarts_after(Always, Stopped));
        assert!(restarts_after(RerunOnFailure, Crashed));
        assert!(restarts_after(RerunOnFailure, Killed));
        assert!(!restarts_after(RerunOnFailure, GuestShutdown));
        assert!(!restarts_after(RerunOnFailure, Stopped));
        for strategy in [Once, Manual, Halted] {
            for kind in [GuestShutdown, Crashed, Killed, StartFailed, Stopped] {
                assert!(!restarts_after(strategy, kind), "{strategy:?} {kind:?}");
            }
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_secs(5));
        assert_eq!(backoff(3), Duration::from_secs(10));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }

    #[test]
    fn exits_are_classified_from_shutdown_events() {
        let seen = |guest: bool, reason: &str| ShutdownSeen {
            guest,
            reason: reason.to_string(),
        };
        assert_eq!(classify_exit(false, None).0, ExitKind::Crashed);
        assert_eq!(
            classify_exit(false, Some(&seen(true, "guest-shutdown"))).0,
            ExitKind::GuestShutdown
        );
        assert_eq!(
            classify_exit(false, Some(&seen(false, "host-signal"))).0,
            ExitKind::Killed
        );
        assert_eq!(
            classify_exit(false, Some(&seen(true, "guest-panic"))).0,
            ExitKind::Crashed
        );
        assert_eq!(classify_exit(true, None).0, ExitKind::Stopped);
        assert_eq!(
            classify_exit(true, Some(&seen(true, "guest-shutdown"))).0,
            ExitKind::Stopped
        );
    }

    /// The server shares the runtime across tasks and awaits its futures in spawned handlers.
    #[allow(dead_code, clippy::let_underscore_future)]
    fn runtime_and_its_futures_are_send(
        runtime: &'static Runtime,
        id: &'static VmId,
        app: VirtualMachineApp,
    ) {
        fn send_and_sync<T: Send + Sync>() {}
        fn send<T: Send>(_: T) {}
        send_and_sync::<Runtime>();
        send(runtime.create(app));
        send(runtime.start(id));
        send(runtime.stop(id, Duration::ZERO));
        send(runtime.force_stop(id));
        send(runtime.restart(id, Duration::ZERO));
        send(runtime.pause(id));
        send(runtime.resume(id));
        send(runtime.delete(id, false));
        send(runtime.clone_vm(id, id));
        send(runtime.screenshot(id));
        send(runtime.snapshot_create(id, "name", true));
        send(runtime.snapshot_restore(id, "name"));
        send(runtime.snapshot_delete(id, "name"));
        send(runtime.wait_for_status(id, Duration::ZERO, |_| true));
        send(Runtime::open(RuntimeOptions::default()));
    }

    #[test]
    fn snapshot_names() {
        assert!(check_snapshot_name("before-upgrade_1.2").is_ok());
        assert!(check_snapshot_name("").is_err());
        assert!(check_snapshot_name("12").is_err());
        assert!(check_snapshot_name("a b").is_err());
        assert!(check_snapshot_name(".hidden").is_err());
        assert!(check_snapshot_name(&"x".repeat(65)).is_err());
    }
}
