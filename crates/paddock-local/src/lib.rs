//! The local runtime: paddock VMs on this machine with QEMU (KVM when usable, TCG otherwise),
//! from the same `VirtualMachineApp` manifest the operator deploys to KubeVirt.
//!
//! Role: what `paddock serve` and the CLI drive when there is no cluster.
//!
//! Contract:
//! - [`Runtime`] is the facade: create, list, get, start, stop, force stop, restart, pause,
//!   resume, delete, clone, screenshot, console sockets, snapshots and a broadcast of changes.
//!   Errors carry an [`ErrorKind`] for mapping to protocol codes.
//! - Everything lives in a state directory (see [`state`] and the crate README); QEMU processes
//!   survive the runtime and are re-attached by the next one.
//! - [`qmp`] is the async QMP client every QEMU is driven through.

pub mod backup;
pub mod error;
pub mod image;
pub mod qemu;
pub mod qmp;
pub mod runtime;
pub mod seed;
pub mod state;

pub use error::{ErrorKind, Result, RuntimeError};
pub use image::{ImageSource, LibraryImage};
pub use qemu::{Accelerator, AcceleratorChoice};
pub use runtime::{DEFAULT_GRACEFUL_STOP_TIMEOUT, Runtime, RuntimeOptions, StopOutcome, VmEvent, VmInfo};
pub use state::{
    DEFAULT_NAMESPACE, ExitKind, LastExit, SnapshotInfo, VmId, VmPhase, VmStatus, default_state_dir,
};
