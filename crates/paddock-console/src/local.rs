//! The local backend: [`Backend`] over `paddock_local::Runtime` (VMs on this machine with QEMU).
//!
//! Role: translate API calls into runtime calls, runtime records into the API's views, and the
//! runtime's unix sockets into console byte channels.
//!
//! Contract:
//! - Runtime errors keep their message; their kind maps one to one (NotFound, AlreadyExists,
//!   InvalidTransition, InvalidSpec, Unsupported, Internal).
//! - Serial console fan-out: QEMU serves its serial socket to one client at a time, so the
//!   backend keeps at most one connection per VM (a hub) while at least one session is open.
//!   Everything the guest writes goes to every session; bytes from any session go to the guest.
//!   The hub closes when its last session ends (freeing the socket for other tools) or when QEMU
//!   closes the socket (the VM stopped or crashed), which ends every session.
//! - VNC: QEMU's VNC server takes many clients, so every session gets its own connection.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::stream::{BoxStream, StreamExt};
use paddock_api::app::VirtualMachineApp;
use paddock_local::{
    DEFAULT_GRACEFUL_STOP_TIMEOUT, ExitKind, LibraryImage, Runtime, RuntimeError, SnapshotInfo, VmEvent,
    VmId, VmInfo, VmPhase, VmStatus,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc};
use tokio::task::AbortHandle;

use crate::backend::{
    Backend, BackendError, BackendResult, BackupListRequest, BackupRequest, BackupView, ConsoleChannel,
    ConsoleKind, ConsoleView, ErrorKind, EventView, HealthCheck, ImageView, LastExitView, OperationView,
    PowerAction, RestoreRequest, SnapshotRequest, SnapshotView, VmRef, VmStatusView, VmView,
};
use crate::backups::Operations;
use crate::time::format_rfc3339;

/// How many chunks of serial output a slow session may fall behind before it loses the oldest.
const SERIAL_BACKLOG_CHUNKS: usize = 1024;
/// Chunks buffered between a console connection and one websocket session, each way.
const SESSION_QUEUE: usize = 256;
/// How long opening a console retries while QEMU is still creating its socket.
const CONSOLE_CONNECT_PATIENCE: Duration = Duration::from_secs(5);
/// Read buffer for console sockets (VNC framebuffer updates are large; 256 KiB measured faster than
/// 64 KiB in `bench/local.sh`'s gateway experiments).
const READ_BUFFER_BYTES: usize = 256 * 1024;

/// [`Backend`] over the local QEMU runtime.
pub struct LocalBackend {
    runtime: Arc<Runtime>,
    /// Serial hubs by VM; weak, so a hub goes away with its last session. The async mutex also
    /// serialises hub creation, so two sessions never race for QEMU's single serial client slot.
    serial_hubs: tokio::sync::Mutex<HashMap<VmId, Weak<SerialHub>>>,
    /// Backups and restores started through the API (see [`crate::backups`]).
    operations: Arc<Operations>,
}

impl std::fmt::Debug for LocalBackend {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("LocalBackend")
            .field("state_dir", &self.runtime.state_dir())
            .finish_non_exhaustive()
    }
}

impl LocalBackend {
    /// A backend over `runtime`.
    pub fn new(runtime: Arc<Runtime>) -> LocalBackend {
        LocalBackend {
            runtime,
            serial_hubs: tokio::sync::Mutex::new(HashMap::new()),
            operations: Arc::new(Operations::new()),
        }
    }

    /// The runtime this backend drives.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    fn view(&self, id: &VmId) -> BackendResult<VmView> {
        Ok(vm_view(&self.runtime.get(id).map_err(backend_error)?))
    }

    async fn power_action(&self, id: &VmId, action: PowerAction) -> BackendResult<VmView> {
        let runtime = &self.runtime;
        match action {
            PowerAction::Start => runtime.start(id).await.map(drop),
            PowerAction::Stop { grace_period } => runtime
                .stop(id, grace_period.unwrap_or(DEFAULT_GRACEFUL_STOP_TIMEOUT))
                .await
                .map(drop),
            PowerAction::ForceStop => runtime.force_stop(id).await,
            PowerAction::Restart { grace_period } => runtime
                .restart(id, grace_period.unwrap_or(DEFAULT_GRACEFUL_STOP_TIMEOUT))
                .await
                .map(drop),
            PowerAction::Pause => runtime.pause(id).await.map(drop),
            PowerAction::Unpause => runtime.resume(id).await.map(drop),
        }
        .map_err(backend_error)?;
        self.view(id)
    }

    async fn open(&self, id: &VmId, kind: ConsoleKind) -> BackendResult<ConsoleChannel> {
        let info = self.runtime.get(id).map_err(backend_error)?;
        let phase = info.status.phase;
        // The runtime's own errors say what to change when the VM has no such console.
        let socket = match kind {
            ConsoleKind::Serial => self.runtime.serial_socket_path(id),
            ConsoleKind::Vnc => self.runtime.vnc_socket_path(id),
        }
        .map_err(backend_error)?;
        if !matches!(phase, VmPhase::Running | VmPhase::Paused) {
            let hint = match phase {
                VmPhase::Starting | VmPhase::CrashLoopBackOff => "try again once it is running",
                VmPhase::Stopping => "it is going away; start it again once it has stopped",
                _ => "start it first",
            };
            return Err(BackendError::new(
                ErrorKind::InvalidTransition,
                format!(
                    "cannot open the {} console of virtual machine {id} while it is {phase}: {hint}",
                    kind.as_str()
                ),
            ));
        }
        match kind {
            ConsoleKind::Vnc => Ok(bridge(connect_console(id, kind, &socket).await?)),
            ConsoleKind::Serial => self.serial_session(id, &socket).await,
        }
    }

    async fn serial_session(&self, id: &VmId, socket: &Path) -> BackendResult<ConsoleChannel> {
        let mut hubs = self.serial_hubs.lock().await;
        hubs.retain(|_, hub| hub.strong_count() > 0);
        // Subscribe before checking `ended`: the hub sets `ended` before its last message, so a
        // live-looking hub is guaranteed to deliver that message to this subscriber.
        let existing = hubs.get(id).and_then(Weak::upgrade).and_then(|hub| {
            let output = hub.output.subscribe();
            (!hub.ended.load(Ordering::SeqCst)).then_some((hub, output))
        });
        let (hub, output) = match existing {
            Some(found) => found,
            None => {
                let stream = connect_console(id, ConsoleKind::Serial, socket).await?;
                let hub = SerialHub::start(id.clone(), stream);
                let output = hub.output.subscribe();
                hubs.insert(id.clone(), Arc::downgrade(&hub));
                (hub, output)
            }
        };
        drop(hubs);
        Ok(hub.session(output))
    }
}

impl Backend for LocalBackend {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn readiness(&self) -> BoxFuture<'_, Vec<HealthCheck>> {
        Box::pin(async move {
            let (accelerator, warning) = self.runtime.accelerator();
            let state_dir = self.runtime.state_dir().to_path_buf();
            let mut runtime_message = format!(
                "local runtime open on {} with {}",
                state_dir.display(),
                accelerator.qemu_name()
            );
            if let Some(warning) = warning {
                runtime_message.push_str(&format!(" ({warning})"));
            }
            let writable = tokio::task::spawn_blocking(move || check_writable(&state_dir))
                .await
                .unwrap_or_else(|error| Err(format!("the check did not finish: {error}")));
            vec![
                HealthCheck {
                    name: "runtime".to_string(),
                    ok: true,
                    message: runtime_message,
                },
                match writable {
                    Ok(message) => HealthCheck {
                        name: "state-dir-writable".to_string(),
                        ok: true,
                        message,
                    },
                    Err(message) => HealthCheck {
                        name: "state-dir-writable".to_string(),
                        ok: false,
                        message,
                    },
                },
            ]
        })
    }

    fn list(&self, namespace: Option<String>) -> BoxFuture<'_, BackendResult<Vec<VmView>>> {
        Box::pin(async move {
            Ok(self
                .runtime
                .list()
                .iter()
                .filter(|info| {
                    namespace
                        .as_ref()
                        .is_none_or(|wanted| &info.id.namespace == wanted)
                })
                .map(vm_view)
                .collect())
        })
    }

    fn get(&self, vm: VmRef) -> BoxFuture<'_, BackendResult<VmView>> {
        Box::pin(async move { self.view(&vm_id(&vm)?) })
    }

    fn create(&self, app: VirtualMachineApp) -> BoxFuture<'_, BackendResult<VmView>> {
        Box::pin(async move {
            let info = self.runtime.create(app).await.map_err(backend_error)?;
            // The runtime may already have moved on (started it); show the latest.
            self.view(&info.id).or_else(|_| Ok(vm_view(&info)))
        })
    }

    fn delete(&self, vm: VmRef, force: bool) -> BoxFuture<'_, BackendResult<()>> {
        Box::pin(async move {
            let id = vm_id(&vm)?;
            self.runtime.delete(&id, force).await.map_err(backend_error)
        })
    }

    fn power(&self, vm: VmRef, action: PowerAction) -> BoxFuture<'_, BackendResult<VmView>> {
        Box::pin(async move { self.power_action(&vm_id(&vm)?, action).await })
    }

    fn snapshot_list(&self, vm: VmRef) -> BoxFuture<'_, BackendResult<Vec<SnapshotView>>> {
        Box::pin(async move {
            let snapshots = self.runtime.snapshot_list(&vm_id(&vm)?).map_err(backend_error)?;
            Ok(snapshots.iter().map(snapshot_view).collect())
        })
    }

    fn snapshot_create(
        &self,
        vm: VmRef,
        request: SnapshotRequest,
    ) -> BoxFuture<'_, BackendResult<SnapshotView>> {
        Box::pin(async move {
            let snapshot = self
                .runtime
                .snapshot_create(&vm_id(&vm)?, &request.name, request.memory)
                .await
                .map_err(backend_error)?;
            Ok(snapshot_view(&snapshot))
        })
    }

    fn snapshot_restore(&self, vm: VmRef, snapshot: String) -> BoxFuture<'_, BackendResult<VmView>> {
        Box::pin(async move {
            let id = vm_id(&vm)?;
            let taken = self
                .runtime
                .snapshot_list(&id)
                .map_err(backend_error)?
                .into_iter()
                .find(|candidate| candidate.name == snapshot);
            self.runtime
                .snapshot_restore(&id, &snapshot)
                .await
                .map_err(backend_error)?;
            // QEMU keeps the run state it had before the load (a paused VM stays paused). A
            // memory snapshot is a moment of a running (or paused) machine, so restoring it
            // brings back that run state too, as reverting does in VMware.
            if let Some(taken) = taken.filter(|taken| taken.memory) {
                let phase = self.runtime.get(&id).map_err(backend_error)?.status.phase;
                match (taken.taken_in_phase, phase) {
                    (VmPhase::Running, VmPhase::Paused) => {
                        self.runtime.resume(&id).await.map_err(backend_error)?;
                    }
                    (VmPhase::Paused, VmPhase::Running) => {
                        self.runtime.pause(&id).await.map_err(backend_error)?;
                    }
                    _ => {}
                }
            }
            self.view(&id)
        })
    }

    fn snapshot_delete(&self, vm: VmRef, snapshot: String) -> BoxFuture<'_, BackendResult<()>> {
        Box::pin(async move {
            self.runtime
                .snapshot_delete(&vm_id(&vm)?, &snapshot)
                .await
                .map_err(backend_error)
        })
    }

    fn screenshot(&self, vm: VmRef) -> BoxFuture<'_, BackendResult<Vec<u8>>> {
        Box::pin(async move { self.runtime.screenshot(&vm_id(&vm)?).await.map_err(backend_error) })
    }

    fn open_console(&self, vm: VmRef, kind: ConsoleKind) -> BoxFuture<'_, BackendResult<ConsoleChannel>> {
        Box::pin(async move { self.open(&vm_id(&vm)?, kind).await })
    }

    fn backup_create(
        &self,
        vm: VmRef,
        request: BackupRequest,
    ) -> BoxFuture<'_, BackendResult<OperationView>> {
        Box::pin(crate::backups::start_backup(
            Arc::clone(&self.runtime),
            Arc::clone(&self.operations),
            vm,
            request,
        ))
    }

    fn backup_list(&self, request: BackupListRequest) -> BoxFuture<'_, BackendResult<Vec<BackupView>>> {
        Box::pin(crate::backups::list(request))
    }

    fn backup_restore(&self, request: RestoreRequest) -> BoxFuture<'_, BackendResult<OperationView>> {
        Box::pin(crate::backups::start_restore(
            Arc::clone(&self.runtime),
            Arc::clone(&self.operations),
            request,
        ))
    }

    fn operation(&self, id: String) -> BoxFuture<'_, BackendResult<OperationView>> {
        Box::pin(async move { self.operations.get(&id) })
    }

    fn operation_list(&self) -> BoxFuture<'_, BackendResult<Vec<OperationView>>> {
        Box::pin(async move { Ok(self.operations.list()) })
    }

    fn images(&self) -> BoxFuture<'_, BackendResult<Vec<ImageView>>> {
        Box::pin(async move {
            let images = self.runtime.images().await.map_err(backend_error)?;
            Ok(images.iter().map(image_view).collect())
        })
    }

    fn events(&self) -> BoxStream<'static, EventView> {
        futures_util::stream::unfold(self.runtime.events(), |mut receiver| async move {
            match receiver.recv().await {
                Ok(event) => Some((event_view(&event), receiver)),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    Some((EventView::Lagged { missed }, receiver))
                }
                Err(broadcast::error::RecvError::Closed) => None,
            }
        })
        .boxed()
    }
}

/// What the serial hub broadcasts to its sessions.
#[derive(Debug, Clone)]
enum HubMessage {
    Output(Bytes),
    /// QEMU closed the socket; always the last message.
    Closed,
}

/// The one connection to a VM's serial socket, shared by every session.
struct SerialHub {
    id: VmId,
    output: broadcast::Sender<HubMessage>,
    input: mpsc::Sender<Bytes>,
    ended: Arc<AtomicBool>,
    pump: AbortHandle,
}

impl Drop for SerialHub {
    fn drop(&mut self) {
        // The last session is gone: give the serial socket back.
        self.pump.abort();
        tracing::debug!(vm = %self.id, "serial console hub closed");
    }
}

impl SerialHub {
    fn start(id: VmId, stream: UnixStream) -> Arc<SerialHub> {
        let (output, _) = broadcast::channel(SERIAL_BACKLOG_CHUNKS);
        let (input, input_receiver) = mpsc::channel(SESSION_QUEUE);
        let ended = Arc::new(AtomicBool::new(false));
        let pump = tokio::spawn(serial_pump(
            id.clone(),
            stream,
            output.clone(),
            input_receiver,
            Arc::clone(&ended),
        ))
        .abort_handle();
        tracing::debug!(vm = %id, "serial console hub opened");
        Arc::new(SerialHub {
            id,
            output,
            input,
            ended,
            pump,
        })
    }

    /// A session on this hub; it holds the hub open until it ends.
    fn session(self: Arc<SerialHub>, mut output: broadcast::Receiver<HubMessage>) -> ConsoleChannel {
        let (to_session, from_vm) = mpsc::channel::<Bytes>(SESSION_QUEUE);
        let (to_vm, mut from_session) = mpsc::channel::<Bytes>(SESSION_QUEUE);
        tokio::spawn(async move {
            let hub = self;
            loop {
                tokio::select! {
                    message = output.recv() => match message {
                        Ok(HubMessage::Output(bytes)) => {
                            if to_session.send(bytes).await.is_err() {
                                break;
                            }
                        }
                        Ok(HubMessage::Closed) | Err(broadcast::error::RecvError::Closed) => break,
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            // A console that cannot keep up loses output, as a terminal would.
                            tracing::warn!(vm = %hub.id, missed, "a slow serial console session lost output");
                        }
                    },
                    bytes = from_session.recv() => match bytes {
                        Some(bytes) => {
                            if hub.input.send(bytes).await.is_err() {
                                break;
                            }
                        }
                        None => break,
                    },
                }
            }
        });
        ConsoleChannel { from_vm, to_vm }
    }
}

async fn serial_pump(
    id: VmId,
    stream: UnixStream,
    output: broadcast::Sender<HubMessage>,
    mut input: mpsc::Receiver<Bytes>,
    ended: Arc<AtomicBool>,
) {
    let (mut reader, mut writer) = stream.into_split();
    let mut buffer = vec![0_u8; READ_BUFFER_BYTES];
    loop {
        tokio::select! {
            read = reader.read(&mut buffer) => match read {
                Ok(0) => break,
                Ok(count) => {
                    // No session listening is fine: the console log keeps everything.
                    let _ = output.send(HubMessage::Output(Bytes::copy_from_slice(&buffer[..count])));
                }
                Err(error) => {
                    tracing::warn!(vm = %id, %error, "reading the serial console failed");
                    break;
                }
            },
            bytes = input.recv() => match bytes {
                Some(bytes) => {
                    if let Err(error) = writer.write_all(&bytes).await {
                        tracing::warn!(vm = %id, %error, "writing to the serial console failed");
                        break;
                    }
                }
                None => break,
            },
        }
    }
    ended.store(true, Ordering::SeqCst);
    let _ = output.send(HubMessage::Closed);
}

/// Connects to a console socket, waiting briefly while QEMU creates it.
async fn connect_console(id: &VmId, kind: ConsoleKind, socket: &Path) -> BackendResult<UnixStream> {
    let deadline = tokio::time::Instant::now() + CONSOLE_CONNECT_PATIENCE;
    loop {
        match UnixStream::connect(socket).await {
            Ok(stream) => return Ok(stream),
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(vm = %id, %error, "console socket not ready yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => {
                return Err(BackendError::new(
                    ErrorKind::Internal,
                    format!(
                        "cannot connect to the {} console of virtual machine {id} at {}: {error}; check that its QEMU is running (see qemu.log)",
                        kind.as_str(),
                        socket.display()
                    ),
                ));
            }
        }
    }
}

/// A console channel over its own socket connection (VNC).
fn bridge(stream: UnixStream) -> ConsoleChannel {
    let (to_session, from_vm) = mpsc::channel::<Bytes>(SESSION_QUEUE);
    let (to_vm, mut from_session) = mpsc::channel::<Bytes>(SESSION_QUEUE);
    tokio::spawn(async move {
        let (mut reader, mut writer) = stream.into_split();
        // Each read lands in a buffer that is then handed to the session as it is (no copy).
        let mut pending = BytesMut::with_capacity(READ_BUFFER_BYTES);
        loop {
            if pending.capacity() < READ_BUFFER_BYTES / 4 {
                pending.reserve(READ_BUFFER_BYTES);
            }
            tokio::select! {
                read = reader.read_buf(&mut pending) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if to_session.send(pending.split().freeze()).await.is_err() {
                            // The session is gone, but what its client typed last may still be
                            // queued (a viewer that sends a key and disconnects): deliver it.
                            deliver_queued_input(&mut from_session, &mut writer).await;
                            break;
                        }
                    }
                },
                bytes = from_session.recv() => match bytes {
                    Some(bytes) => {
                        if writer.write_all(&bytes).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                },
            }
        }
    });
    ConsoleChannel { from_vm, to_vm }
}

/// How long a closed session's last input may take to reach the VM.
const QUEUED_INPUT_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Writes the input still queued by a session that has ended, until the session's sender is gone.
async fn deliver_queued_input(
    from_session: &mut mpsc::Receiver<Bytes>,
    writer: &mut tokio::net::unix::OwnedWriteHalf,
) {
    let delivery = async {
        while let Some(bytes) = from_session.recv().await {
            if writer.write_all(&bytes).await.is_err() {
                break;
            }
        }
    };
    if tokio::time::timeout(QUEUED_INPUT_GRACE, delivery).await.is_err() {
        tracing::debug!("a closed console session kept its input channel open; queued input dropped");
    }
}

fn check_writable(state_dir: &Path) -> Result<String, String> {
    let mut random = [0_u8; 8];
    getrandom::fill(&mut random).map_err(|error| format!("no randomness for a probe file name: {error}"))?;
    let probe: PathBuf = state_dir.join(format!(
        ".readyz-{}",
        random
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<String>()
    ));
    std::fs::write(&probe, b"probe")
        .and_then(|()| std::fs::remove_file(&probe))
        .map(|()| format!("{} is writable", state_dir.display()))
        .map_err(|error| {
            format!(
                "cannot write to the state directory {}: {error}; check its permissions and free space",
                state_dir.display()
            )
        })
}

fn vm_id(vm: &VmRef) -> BackendResult<VmId> {
    VmId::new(vm.namespace.clone(), vm.name.clone())
        .map_err(|error| BackendError::new(ErrorKind::NotFound, format!("no virtual machine {vm}: {error}")))
}

/// The backend error for a runtime error, keeping its message.
pub fn backend_error(error: RuntimeError) -> BackendError {
    let kind = match error.kind() {
        paddock_local::ErrorKind::NotFound => ErrorKind::NotFound,
        paddock_local::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
        paddock_local::ErrorKind::InvalidTransition => ErrorKind::InvalidTransition,
        paddock_local::ErrorKind::InvalidSpec => ErrorKind::InvalidSpec,
        paddock_local::ErrorKind::Unsupported => ErrorKind::Unsupported,
        paddock_local::ErrorKind::Internal => ErrorKind::Internal,
    };
    BackendError::new(kind, error.to_string())
}

fn vm_view(info: &VmInfo) -> VmView {
    let spec = &info.app.spec;
    VmView {
        namespace: info.id.namespace.clone(),
        name: info.id.name.clone(),
        display_name: spec.display_name.clone(),
        run_strategy: spec.run_strategy.as_str().to_string(),
        created_at: format_rfc3339(info.created_at),
        console: ConsoleView {
            serial: spec.console.serial,
            vnc: spec.console.vnc,
        },
        status: status_view(&info.status),
        snapshots: info.snapshots.iter().map(snapshot_view).collect(),
        manifest: serde_json::to_value(&info.app).unwrap_or(serde_json::Value::Null),
    }
}

fn status_view(status: &VmStatus) -> VmStatusView {
    VmStatusView {
        phase: status.phase.as_str().to_string(),
        pid: status.pid,
        accelerator: status
            .accelerator
            .map(|accelerator| accelerator.qemu_name().to_string()),
        started_at: status.started_at.map(format_rfc3339),
        restart_count: status.restart_count,
        last_exit: status.last_exit.as_ref().map(|exit| LastExitView {
            kind: exit_kind_name(exit.kind).to_string(),
            at: format_rfc3339(exit.at),
            message: exit.message.clone(),
        }),
        message: status.message.clone(),
        warnings: status.warnings.clone(),
        // Local disks are converted before the VM is created; there is no import to follow.
        import: None,
    }
}

fn exit_kind_name(kind: ExitKind) -> &'static str {
    match kind {
        ExitKind::GuestShutdown => "GuestShutdown",
        ExitKind::Stopped => "Stopped",
        ExitKind::Crashed => "Crashed",
        ExitKind::Killed => "Killed",
        ExitKind::StartFailed => "StartFailed",
    }
}

fn image_view(image: &LibraryImage) -> ImageView {
    ImageView {
        digest: image.digest.clone(),
        // The stored copy boots the same disk when the source is unknown (or gone).
        image: image
            .source
            .clone()
            .unwrap_or_else(|| format!("file:{}", image.path.display())),
        source: image.source.clone(),
        format: image.format.clone(),
        size: image.size,
        virtual_size: image.virtual_size,
        imported_at: format_rfc3339(image.imported_at),
        recorded: image.recorded,
        used_by: image.used_by.iter().map(ToString::to_string).collect(),
    }
}

fn snapshot_view(snapshot: &SnapshotInfo) -> SnapshotView {
    SnapshotView {
        name: snapshot.name.clone(),
        created_at: format_rfc3339(snapshot.created_at),
        memory: snapshot.memory,
        taken_in_phase: snapshot.taken_in_phase.as_str().to_string(),
    }
}

fn event_view(event: &VmEvent) -> EventView {
    match event {
        VmEvent::Changed { id, status } => EventView::Changed {
            namespace: id.namespace.clone(),
            name: id.name.clone(),
            status: status_view(status),
        },
        VmEvent::SnapshotsChanged { id, snapshots } => EventView::SnapshotsChanged {
            namespace: id.namespace.clone(),
            name: id.name.clone(),
            snapshots: snapshots.iter().map(snapshot_view).collect(),
        },
        VmEvent::Deleted { id } => EventView::Deleted {
            namespace: id.namespace.clone(),
            name: id.name.clone(),
        },
    }
}
