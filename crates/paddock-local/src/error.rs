//! The errors of the local runtime.
//!
//! Role: one error type for every [`crate::Runtime`] operation, detailed enough for a person to act
//! on, and classified by [`RuntimeError::kind`] so the REST server can map it to a status code
//! (NotFound → 404, AlreadyExists/InvalidTransition/HasSnapshots → 409, InvalidSpec/Unsupported →
//! 422, everything else → 500).

use std::path::PathBuf;

use crate::qmp::QmpError;
use crate::state::VmId;

/// What kind of failure an error is, for callers that map errors to protocol codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The VM or snapshot does not exist.
    NotFound,
    /// Something with that name already exists.
    AlreadyExists,
    /// The operation is not possible in the VM's current state (or while it has snapshots).
    InvalidTransition,
    /// The VirtualMachineApp or a request parameter is invalid.
    InvalidSpec,
    /// The request is valid but this runtime cannot do it (yet).
    Unsupported,
    /// A failure on this machine: QEMU, tools, files.
    Internal,
}

/// Errors from the local runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No VM with that id.
    #[error("no virtual machine {id}; list the VMs to see which exist")]
    NotFound {
        /// The VM that was asked for.
        id: VmId,
    },
    /// No snapshot with that name.
    #[error("virtual machine {id} has no snapshot {snapshot:?}; list its snapshots to see which exist")]
    SnapshotNotFound {
        /// The VM.
        id: VmId,
        /// The snapshot that was asked for.
        snapshot: String,
    },
    /// A VM with that id exists already.
    #[error("virtual machine {id} already exists; delete it first or choose another name")]
    AlreadyExists {
        /// The VM.
        id: VmId,
    },
    /// A snapshot with that name exists already.
    #[error("virtual machine {id} already has a snapshot {snapshot:?}; delete it or choose another name")]
    SnapshotExists {
        /// The VM.
        id: VmId,
        /// The snapshot name.
        snapshot: String,
    },
    /// The operation does not make sense in the VM's current phase.
    #[error("cannot {operation} virtual machine {id} while it is {phase}: {hint}")]
    InvalidTransition {
        /// The VM.
        id: VmId,
        /// What was requested, e.g. `pause`.
        operation: &'static str,
        /// The VM's phase when the request came.
        phase: String,
        /// What to do instead.
        hint: String,
    },
    /// Deleting a VM that still has snapshots needs `force`.
    #[error("virtual machine {id} has {count} snapshot(s); delete them first or delete the VM with force")]
    HasSnapshots {
        /// The VM.
        id: VmId,
        /// How many snapshots it has.
        count: usize,
    },
    /// The VirtualMachineApp or a parameter is invalid.
    #[error("{message}")]
    InvalidSpec {
        /// Every problem, with the field and what to change.
        message: String,
    },
    /// The image source cannot be used.
    #[error("cannot use the image {source_text:?}: {reason}")]
    Image {
        /// The `containerDisk` value.
        source_text: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The runtime cannot do this (yet).
    #[error("{message}")]
    Unsupported {
        /// What is not supported and what to do instead.
        message: String,
    },
    /// Another paddock process uses the state directory.
    #[error(
        "the state directory {path} is in use by another paddock process; stop it or use another --state-dir"
    )]
    StateLocked {
        /// The state directory.
        path: PathBuf,
    },
    /// A required program is missing.
    #[error("{program} was not found; {hint}")]
    MissingProgram {
        /// The program, e.g. `qemu-img`.
        program: String,
        /// How to install it.
        hint: String,
    },
    /// An external tool (qemu-img, mtools) failed.
    #[error("{tool} {arguments} failed ({status}): {stderr}")]
    Tool {
        /// The program.
        tool: String,
        /// Its arguments, for the reader to re-run it.
        arguments: String,
        /// How it ended.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// QEMU did not start.
    #[error("qemu failed to start virtual machine {id}: {details}")]
    QemuStart {
        /// The VM.
        id: VmId,
        /// What went wrong, with the tail of QEMU's log.
        details: String,
    },
    /// Talking to QEMU failed.
    #[error("qmp {action} for virtual machine {id} failed: {source}")]
    Qmp {
        /// The VM.
        id: VmId,
        /// What was attempted.
        action: &'static str,
        /// The underlying error (boxed: it is large and rare).
        source: Box<QmpError>,
    },
    /// A file operation failed.
    #[error("failed to {action} {path}: {source}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A record in the state directory is unreadable.
    #[error("the record {path} is corrupt ({details}); move it away to let paddock start without that VM")]
    CorruptRecord {
        /// The record file.
        path: PathBuf,
        /// What is wrong.
        details: String,
    },
    /// A wait for a VM's status ran out of time.
    #[error("virtual machine {id} did not reach the expected state within {timeout:?}; it is {phase}")]
    Timeout {
        /// The VM.
        id: VmId,
        /// How long the wait lasted.
        timeout: std::time::Duration,
        /// Its phase when the wait ended.
        phase: crate::state::VmPhase,
    },
    /// The runtime was shut down while the operation ran.
    #[error("the runtime is shutting down")]
    ShuttingDown,
}

impl RuntimeError {
    /// The kind of failure, for mapping to protocol codes.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RuntimeError::NotFound { .. } | RuntimeError::SnapshotNotFound { .. } => ErrorKind::NotFound,
            RuntimeError::AlreadyExists { .. } | RuntimeError::SnapshotExists { .. } => {
                ErrorKind::AlreadyExists
            }
            RuntimeError::InvalidTransition { .. } | RuntimeError::HasSnapshots { .. } => {
                ErrorKind::InvalidTransition
            }
            RuntimeError::InvalidSpec { .. } | RuntimeError::Image { .. } => ErrorKind::InvalidSpec,
            RuntimeError::Unsupported { .. } => ErrorKind::Unsupported,
            RuntimeError::StateLocked { .. }
            | RuntimeError::MissingProgram { .. }
            | RuntimeError::Tool { .. }
            | RuntimeError::QemuStart { .. }
            | RuntimeError::Qmp { .. }
            | RuntimeError::Io { .. }
            | RuntimeError::CorruptRecord { .. }
            | RuntimeError::Timeout { .. }
            | RuntimeError::ShuttingDown => ErrorKind::Internal,
        }
    }

    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Result alias for the runtime.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
