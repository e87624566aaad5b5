//! An async client for QMP, the QEMU Machine Protocol, over a unix socket.
//!
//! Role: the single channel through which the local runtime controls a running QEMU: run state,
//! power, screenshots, internal snapshots and, as a fallback, human monitor commands.
//!
//! Contract:
//! - [`QmpClient::connect`] reads the greeting, negotiates capabilities and records the QEMU
//!   version; afterwards the connection is in command mode.
//! - One client is shared by any number of concurrent callers: every request carries a unique
//!   `id`, and one reader task routes each reply to the caller that sent the request with that id.
//! - Asynchronous events are broadcast to every [`QmpClient::subscribe`]r that exists when the
//!   event arrives; a subscriber that falls behind by more than [`EVENT_CAPACITY`] events loses
//!   the oldest ones (`broadcast` lag), never the replies.
//! - Every call is bounded by a timeout; when the connection closes, pending and later calls fail
//!   with [`QmpError::ConnectionClosed`], and [`QmpClient::closed`] completes, so a supervisor
//!   learns that QEMU went away even when no command is in flight.
//! - Snapshot commands are QMP jobs: the helpers wait for the job to conclude, report its error,
//!   and dismiss it, so no concluded job lingers in QEMU.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;

/// How long a command may take by default, from sending it to its reply.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How many events a subscriber may fall behind before it loses the oldest.
pub const EVENT_CAPACITY: usize = 256;

/// Errors from talking to QEMU over QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected to.
    #[error(
        "failed to connect to the qmp socket {path}: {source}; check that qemu is running with -qmp on that path"
    )]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// QEMU answered a command with an error.
    #[error("qmp command {command} failed: {class}: {description}")]
    Command {
        /// The command that failed.
        command: String,
        /// QEMU's error class, e.g. `GenericError` or `CommandNotFound`.
        class: String,
        /// QEMU's human-readable description.
        description: String,
    },
    /// A QMP job ran but ended with an error.
    #[error("qmp job {job_id} failed: {message}")]
    Job {
        /// The job identifier.
        job_id: String,
        /// QEMU's error message for the job.
        message: String,
    },
    /// The connection closed (QEMU exited or dropped the client).
    #[error("the qmp connection closed while waiting for {waiting_for}; qemu has probably exited")]
    ConnectionClosed {
        /// What was being waited for.
        waiting_for: String,
    },
    /// Reading from or writing to the socket failed.
    #[error("failed to {action} the qmp socket: {source}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Something took longer than allowed.
    #[error("timed out after {timeout:?} waiting for {waiting_for}; qemu is stuck or too slow")]
    Timeout {
        /// What was being waited for.
        waiting_for: String,
        /// How long the wait lasted.
        timeout: Duration,
    },
    /// QEMU sent something this client does not understand.
    #[error("qmp protocol violation: {details}")]
    Protocol {
        /// What was wrong.
        details: String,
    },
}

/// The QEMU version from the greeting.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct QemuVersion {
    /// Major version.
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Micro (patch) version.
    pub micro: u64,
    /// The distribution's package version, e.g. `Debian 1:7.2+dfsg-7`.
    #[serde(default)]
    pub package: String,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// An asynchronous event QEMU sent, e.g. `STOP`, `RESUME`, `SHUTDOWN` or `JOB_STATUS_CHANGE`.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// The event name.
    pub name: String,
    /// The event's data, `Value::Null` when it has none.
    pub data: Value,
    /// When QEMU emitted it, as seconds and microseconds since the Unix epoch.
    pub timestamp: (u64, u64),
}

/// The VM's run state, QEMU's `RunState`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    /// The guest is running.
    Running,
    /// Paused by `stop` (or `-S`).
    Paused,
    /// Created with `-S` and never started.
    Prelaunch,
    /// The guest shut down and QEMU was told not to exit (`-no-shutdown`).
    Shutdown,
    /// The guest suspended to RAM.
    Suspended,
    /// Paused after a disk I/O error.
    IoError,
    /// Paused after an internal error (e.g. KVM failing to run the guest).
    InternalError,
    /// The guest panicked.
    GuestPanicked,
    /// Paused by a watchdog.
    Watchdog,
    /// Paused by the debugger.
    Debug,
    /// Restoring a snapshot.
    RestoreVm,
    /// Saving a snapshot.
    SaveVm,
    /// Waiting for an incoming migration.
    Inmigrate,
    /// Finishing an outgoing migration.
    FinishMigrate,
    /// An outgoing migration completed.
    Postmigrate,
    /// A state this client does not know by name, kept verbatim.
    Other(String),
}

impl RunState {
    /// Parses QEMU's name of a run state.
    pub fn from_qmp_name(name: &str) -> RunState {
        match name {
            "running" => RunState::Running,
            "paused" => RunState::Paused,
            "prelaunch" => RunState::Prelaunch,
            "shutdown" => RunState::Shutdown,
            "suspended" => RunState::Suspended,
            "io-error" => RunState::IoError,
            "internal-error" => RunState::InternalError,
            "guest-panicked" => RunState::GuestPanicked,
            "watchdog" => RunState::Watchdog,
            "debug" => RunState::Debug,
            "restore-vm" => RunState::RestoreVm,
            "save-vm" => RunState::SaveVm,
            "inmigrate" => RunState::Inmigrate,
            "finish-migrate" => RunState::FinishMigrate,
            "postmigrate" => RunState::Postmigrate,
            other => RunState::Other(other.to_string()),
        }
    }
}

/// One entry of `query-jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    /// The job identifier.
    pub id: String,
    /// The job kind, e.g. `snapshot-save`.
    #[serde(rename = "type")]
    pub job_type: String,
    /// The job status, e.g. `running` or `concluded`.
    pub status: String,
    /// Progress so far, in units of `total_progress`.
    pub current_progress: u64,
    /// Estimated total work.
    pub total_progress: u64,
    /// The error message when the job failed.
    #[serde(default)]
    pub error: Option<String>,
}

type ReplySender = oneshot::Sender<Result<Value, QmpError>>;

/// Replies awaited by callers, keyed by request id.
#[derive(Default)]
struct PendingReplies {
    waiting: HashMap<u64, ReplySender>,
    /// Set by the reader once the connection is gone, so new requests fail at once.
    closed: bool,
}

/// A connected QMP client. All methods take `&self`, so concurrent callers share one client
/// (by reference or in an `Arc`).
pub struct QmpClient {
    socket_path: PathBuf,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Arc<Mutex<PendingReplies>>,
    events: broadcast::Sender<QmpEvent>,
    next_id: AtomicU64,
    version: QemuVersion,
    command_timeout: Duration,
    reader: JoinHandle<()>,
    /// Becomes `true` once the reader saw the connection end.
    closed: watch::Receiver<bool>,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("QmpClient")
            .field("socket_path", &self.socket_path)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        // The reader holds the read half; stopping it closes the socket.
        self.reader.abort();
    }
}

/// Locks the pending table, tolerating poisoning: the table holds only channels, which stay
/// consistent even if a holder panicked.
fn lock(pending: &Mutex<PendingReplies>) -> MutexGuard<'_, PendingReplies> {
    pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl QmpClient {
    /// Connects to the QMP socket at `socket_path`, negotiates capabilities and returns the client.
    /// Every step, and later every command, is bounded by [`DEFAULT_COMMAND_TIMEOUT`].
    pub async fn connect(socket_path: impl AsRef<Path>) -> Result<QmpClient, QmpError> {
        QmpClient::connect_with_timeout(socket_path, DEFAULT_COMMAND_TIMEOUT).await
    }

    /// Like [`QmpClient::connect`] with another timeout for connecting and for each command.
    pub async fn connect_with_timeout(
        socket_path: impl AsRef<Path>,
        command_timeout: Duration,
    ) -> Result<QmpClient, QmpError> {
        let socket_path = socket_path.as_ref().to_path_buf();
        let stream = tokio::time::timeout(command_timeout, UnixStream::connect(&socket_path))
            .await
            .map_err(|_| QmpError::Timeout {
                waiting_for: format!("a connection to {}", socket_path.display()),
                timeout: command_timeout,
            })?
            .map_err(|source| QmpError::Connect {
                path: socket_path.clone(),
                source,
            })?;
        let (read_half, write_half) = stream.into_split();
        let mut lines = BufReader::new(read_half);

        let greeting = tokio::time::timeout(command_timeout, read_message(&mut lines))
            .await
            .map_err(|_| QmpError::Timeout {
                waiting_for: "the qmp greeting".to_string(),
                timeout: command_timeout,
            })??
            .ok_or_else(|| QmpError::ConnectionClosed {
                waiting_for: "the qmp greeting".to_string(),
            })?;
        let version = parse_greeting(&greeting)?;

        let pending = Arc::new(Mutex::new(PendingReplies::default()));
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (closed_sender, closed) = watch::channel(false);
        let reader = tokio::spawn(read_loop(
            lines,
            Arc::clone(&pending),
            events.clone(),
            closed_sender,
        ));
        let client = QmpClient {
            socket_path,
            writer: tokio::sync::Mutex::new(write_half),
            pending,
            events,
            next_id: AtomicU64::new(1),
            version,
            command_timeout,
            reader,
            closed,
        };
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// The QEMU version from the greeting.
    pub fn version(&self) -> &QemuVersion {
        &self.version
    }

    /// The socket this client is connected to.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Whether the connection has ended (QEMU exited or closed it).
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Completes once the connection has ended; at once if it already has. Events that arrived
    /// before the end are delivered to subscribers before this completes.
    pub async fn closed(&self) {
        let mut closed = self.closed.clone();
        // An error means the reader is gone, which also means the connection is over.
        let _ = closed.wait_for(|closed| *closed).await;
    }

    /// A receiver of every event that arrives from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Runs `command` with optional `arguments` (a JSON object) and returns its `return` value,
    /// within the client's command timeout.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_with_timeout(command, arguments, self.command_timeout)
            .await
    }

    /// Like [`QmpClient::execute`] with an explicit timeout.
    pub async fn execute_with_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut request = json!({"execute": command, "id": id});
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');

        let (sender, receiver) = oneshot::channel();
        {
            let mut pending = lock(&self.pending);
            if pending.closed {
                return Err(QmpError::ConnectionClosed {
                    waiting_for: format!("the reply to {command}"),
                });
            }
            pending.waiting.insert(id, sender);
        }
        // Whatever happens below, a reply that never comes must not leave its entry behind.
        let forget = ForgetOnDrop {
            pending: &self.pending,
            id,
        };

        let outcome = tokio::time::timeout(timeout, async {
            {
                let mut writer = self.writer.lock().await;
                writer
                    .write_all(line.as_bytes())
                    .await
                    .map_err(|source| match source.kind() {
                        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                            QmpError::ConnectionClosed {
                                waiting_for: format!("the reply to {command}"),
                            }
                        }
                        _ => QmpError::Io {
                            action: "write to",
                            source,
                        },
                    })?;
            }
            match receiver.await {
                Ok(reply) => reply,
                // The reader dropped the sender without answering: the connection is gone.
                Err(_) => Err(QmpError::ConnectionClosed {
                    waiting_for: format!("the reply to {command}"),
                }),
            }
        })
        .await;
        drop(forget);
        match outcome {
            Err(_) => Err(QmpError::Timeout {
                waiting_for: format!("the reply to {command}"),
                timeout,
            }),
            Ok(Err(QmpError::Command {
                class, description, ..
            })) => Err(QmpError::Command {
                command: command.to_string(),
                class,
                description,
            }),
            Ok(result) => result,
        }
    }

    /// The VM's run state (`query-status`).
    pub async fn query_status(&self) -> Result<RunState, QmpError> {
        let reply = self.execute("query-status", None).await?;
        let status = reply
            .get("status")
            .and_then(Value::as_str)
            .ok_or_else(|| QmpError::Protocol {
                details: format!("query-status returned no status string: {reply}"),
            })?;
        Ok(RunState::from_qmp_name(status))
    }

    /// Pauses the guest's CPUs (`stop`); QEMU emits `STOP`.
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute("stop", None).await.map(drop)
    }

    /// Resumes a paused guest (`cont`); QEMU emits `RESUME`.
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute("cont", None).await.map(drop)
    }

    /// Presses the ACPI power button, asking the guest to shut down gracefully.
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).await.map(drop)
    }

    /// Resets the machine, like the reset button.
    pub async fn system_reset(&self) -> Result<(), QmpError> {
        self.execute("system_reset", None).await.map(drop)
    }

    /// Makes QEMU exit at once. QEMU may close the connection before or after replying, so a
    /// closed connection counts as success.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::ConnectionClosed { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Saves the primary display as a PNG at `filename`, a path QEMU's process can write.
    pub async fn screendump(&self, filename: &Path) -> Result<(), QmpError> {
        let filename = filename.to_str().ok_or_else(|| QmpError::Protocol {
            details: format!(
                "screendump path {} is not valid UTF-8, which QMP's JSON cannot carry",
                filename.display()
            ),
        })?;
        self.execute("screendump", Some(json!({"filename": filename, "format": "png"})))
            .await
            .map(drop)
    }

    /// The jobs QEMU knows about (`query-jobs`).
    pub async fn query_jobs(&self) -> Result<Vec<JobInfo>, QmpError> {
        let reply = self.execute("query-jobs", None).await?;
        serde_json::from_value(reply.clone()).map_err(|error| QmpError::Protocol {
            details: format!("query-jobs returned an unexpected shape ({error}): {reply}"),
        })
    }

    /// Saves an internal snapshot `tag` of the disks `devices` (block node names) and the VM state
    /// into `vmstate_node`, waiting up to `timeout` for the job to finish.
    pub async fn snapshot_save(
        &self,
        job_id: &str,
        tag: &str,
        vmstate_node: &str,
        devices: &[&str],
        timeout: Duration,
    ) -> Result<(), QmpError> {
        self.run_job(
            "snapshot-save",
            job_id,
            snapshot_arguments(job_id, tag, vmstate_node, devices),
            timeout,
        )
        .await
    }

    /// Restores the internal snapshot `tag` (disks `devices`, VM state from `vmstate_node`).
    pub async fn snapshot_load(
        &self,
        job_id: &str,
        tag: &str,
        vmstate_node: &str,
        devices: &[&str],
        timeout: Duration,
    ) -> Result<(), QmpError> {
        self.run_job(
            "snapshot-load",
            job_id,
            snapshot_arguments(job_id, tag, vmstate_node, devices),
            timeout,
        )
        .await
    }

    /// Deletes the internal snapshot `tag` from the disks `devices`.
    pub async fn snapshot_delete(
        &self,
        job_id: &str,
        tag: &str,
        devices: &[&str],
        timeout: Duration,
    ) -> Result<(), QmpError> {
        let arguments = json!({"job-id": job_id, "tag": tag, "devices": devices});
        self.run_job("snapshot-delete", job_id, arguments, timeout).await
    }

    /// Copies the data of block node `device` that is not in its backing chain (`sync: top`) into a
    /// new qcow2 image `target`, which QEMU creates backed by the same backing file: a consistent
    /// point-in-time copy of a running VM's overlay. Waits up to `timeout` for the job.
    pub async fn drive_backup_top(
        &self,
        job_id: &str,
        device: &str,
        target: &Path,
        timeout: Duration,
    ) -> Result<(), QmpError> {
        let target = target.to_str().ok_or_else(|| QmpError::Protocol {
            details: format!(
                "backup target {} is not valid UTF-8, which QMP's JSON cannot carry",
                target.display()
            ),
        })?;
        // auto-dismiss off: run_job reads the job's outcome before dismissing it itself.
        let arguments = json!({
            "job-id": job_id,
            "device": device,
            "target": target,
            "format": "qcow2",
            "sync": "top",
            "mode": "absolute-paths",
            "auto-dismiss": false,
        });
        self.run_job("drive-backup", job_id, arguments, timeout).await
    }

    /// Runs a human monitor (HMP) command line and returns its text output.
    pub async fn human_monitor_command(&self, command_line: &str) -> Result<String, QmpError> {
        let reply = self
            .execute(
                "human-monitor-command",
                Some(json!({"command-line": command_line})),
            )
            .await?;
        reply
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| QmpError::Protocol {
                details: format!("human-monitor-command returned a non-string: {reply}"),
            })
    }

    /// Starts a job with `command`, waits for it to conclude, reports its error and dismisses it.
    async fn run_job(
        &self,
        command: &str,
        job_id: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<(), QmpError> {
        // Subscribe before starting, or a fast job could conclude before anyone listens.
        let mut events = self.subscribe();
        self.execute(command, Some(arguments)).await?;
        let waiting_for = format!("{command} job {job_id} to conclude");
        tokio::time::timeout(timeout, async {
            loop {
                match events.recv().await {
                    Ok(event) if is_job_concluded(&event, job_id) => return Ok(()),
                    Ok(_) => {}
                    // Missed events might include ours; ask QEMU directly instead.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if self
                            .query_jobs()
                            .await?
                            .iter()
                            .any(|job| job.id == job_id && job.status == "concluded")
                        {
                            return Ok(());
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(QmpError::ConnectionClosed {
                            waiting_for: waiting_for.clone(),
                        });
                    }
                }
            }
        })
        .await
        .map_err(|_| QmpError::Timeout {
            waiting_for: waiting_for.clone(),
            timeout,
        })??;

        let failure = self
            .query_jobs()
            .await?
            .into_iter()
            .find(|job| job.id == job_id)
            .and_then(|job| job.error);
        // Dismiss even a failed job, so the id can be reused.
        self.execute("job-dismiss", Some(json!({"id": job_id}))).await?;
        match failure {
            Some(message) => Err(QmpError::Job {
                job_id: job_id.to_string(),
                message,
            }),
            None => Ok(()),
        }
    }
}

/// Removes a request's entry from the pending table when the request ends for any reason,
/// including its future being dropped.
struct ForgetOnDrop<'client> {
    pending: &'client Mutex<PendingReplies>,
    id: u64,
}

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        lock(self.pending).waiting.remove(&self.id);
    }
}

fn is_job_concluded(event: &QmpEvent, job_id: &str) -> bool {
    event.name == "JOB_STATUS_CHANGE"
        && event.data.get("id").and_then(Value::as_str) == Some(job_id)
        && event.data.get("status").and_then(Value::as_str) == Some("concluded")
}

fn parse_greeting(greeting: &Value) -> Result<QemuVersion, QmpError> {
    let qemu_version = greeting
        .get("QMP")
        .and_then(|qmp| qmp.get("version"))
        .and_then(|version| version.get("qemu"))
        .ok_or_else(|| QmpError::Protocol {
            details: format!("expected a greeting with QMP.version.qemu, got {greeting}"),
        })?;
    let mut version: QemuVersion =
        serde_json::from_value(qemu_version.clone()).map_err(|error| QmpError::Protocol {
            details: format!("greeting version has an unexpected shape ({error}): {greeting}"),
        })?;
    if let Some(package) = greeting["QMP"]["version"]["package"].as_str() {
        version.package = package.trim().to_string();
    }
    Ok(version)
}

/// Reads one JSON message (QMP sends one per line); `None` at end of stream.
async fn read_message(lines: &mut BufReader<OwnedReadHalf>) -> Result<Option<Value>, QmpError> {
    let mut line = String::new();
    loop {
        line.clear();
        let read = lines.read_line(&mut line).await.map_err(|source| QmpError::Io {
            action: "read from",
            source,
        })?;
        if read == 0 {
            return Ok(None);
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    serde_json::from_str(&line)
        .map(Some)
        .map_err(|error| QmpError::Protocol {
            details: format!("received invalid JSON ({error}): {}", line.trim()),
        })
}

/// Routes replies to their callers and broadcasts events until the connection ends, then fails
/// every pending request.
async fn read_loop(
    mut lines: BufReader<OwnedReadHalf>,
    pending: Arc<Mutex<PendingReplies>>,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Sender<bool>,
) {
    let ending = loop {
        let message = match read_message(&mut lines).await {
            Ok(Some(message)) => message,
            // QEMU exiting may reset the socket instead of closing it cleanly; either way the
            // connection is simply gone.
            Ok(None) | Err(QmpError::Io { .. }) => break None,
            Err(error) => break Some(error),
        };
        if let Some(name) = message.get("event").and_then(Value::as_str) {
            let timestamp = (
                message["timestamp"]["seconds"].as_u64().unwrap_or(0),
                message["timestamp"]["microseconds"].as_u64().unwrap_or(0),
            );
            // No subscribers is normal; the event is simply not wanted.
            let _ = events.send(QmpEvent {
                name: name.to_string(),
                data: message.get("data").cloned().unwrap_or(Value::Null),
                timestamp,
            });
            continue;
        }
        // A reply without our id (e.g. to a request QEMU could not parse) has no caller to go to.
        let Some(id) = message.get("id").and_then(Value::as_u64) else {
            continue;
        };
        let reply = if let Some(value) = message.get("return") {
            Ok(value.clone())
        } else if let Some(error) = message.get("error") {
            Err(QmpError::Command {
                command: String::new(),
                class: error["class"].as_str().unwrap_or("unknown").to_string(),
                description: error["desc"].as_str().unwrap_or("").to_string(),
            })
        } else {
            Err(QmpError::Protocol {
                details: format!("reply has neither return nor error: {message}"),
            })
        };
        if let Some(sender) = lock(&pending).waiting.remove(&id) {
            // The caller may have timed out and gone; then nobody needs the reply.
            let _ = sender.send(reply);
        }
    };
    let mut pending = lock(&pending);
    pending.closed = true;
    // Nobody watching is fine: the flag is also kept for later `closed()` calls.
    closed.send_replace(true);
    for (_, sender) in pending.waiting.drain() {
        let _ = sender.send(Err(match &ending {
            Some(error) => QmpError::Protocol {
                details: format!("the connection failed: {error}"),
            },
            None => QmpError::ConnectionClosed {
                waiting_for: "a reply".to_string(),
            },
        }));
    }
}

/// The arguments `snapshot-save` and `snapshot-load` share.
fn snapshot_arguments(job_id: &str, tag: &str, vmstate_node: &str, devices: &[&str]) -> serde_json::Value {
    json!({"job-id": job_id, "tag": tag, "vmstate": vmstate_node, "devices": devices})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_gives_the_version() {
        let greeting = json!({"QMP": {"version": {"qemu": {"micro": 1, "minor": 2, "major": 7},
            "package": " Debian 1:7.2 "}, "capabilities": ["oob"]}});
        let version = parse_greeting(&greeting).unwrap();
        assert_eq!(version.to_string(), "7.2.1");
        assert_eq!(version.package, "Debian 1:7.2");
        assert!(matches!(
            parse_greeting(&json!({"return": {}})),
            Err(QmpError::Protocol { .. })
        ));
    }

    #[test]
    fn run_state_names() {
        assert_eq!(RunState::from_qmp_name("paused"), RunState::Paused);
        assert_eq!(
            RunState::from_qmp_name("colo"),
            RunState::Other("colo".to_string())
        );
    }
}
