//! Real QEMU machines behind the VNC, console and screenshot subresources.
//!
//! Role: a running VMI in the simulated world is only an object; its console must still be real. The
//! first `vnc`, `console` or `vnc/screenshot` request for a running VMI boots its disk under
//! QEMU with paddock's local runtime (`paddock-local`, KVM when usable, TCG otherwise) and connects
//! the request to that QEMU's VNC or serial socket. Booting lazily keeps tests that never open a
//! console from paying a boot (several seconds under TCG on a 2-core machine).
//!
//! Contract:
//! - one QEMU per VMI uid: [`Machines::ensure`] boots it (or returns the running one); a VMI
//!   recreated under the same name (new uid) gets a fresh machine;
//! - the disk booted is the one the simulated CDI imported or received for the VMI's DataVolume or
//!   PVC (the caller finds it, see `consoles`), through an overlay so it is never written — as a
//!   real VM's disk would be its PVC, and so what a VM wrote before a backup is there after a
//!   restore; a VMI without such a disk (containerDisk, no import yet) boots the test disk;
//! - [`Machines::reap`] stops and deletes machines whose VMI is gone, has another uid or is no longer
//!   Running; [`Machines::shutdown`] stops them all (QEMU outlives its runtime otherwise);
//! - pause/resume/soft reboot reach the machine only if one was booted; without one there is
//!   nothing to do beyond the VMI status the caller writes.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use paddock_local::{Runtime, RuntimeOptions, VmId, VmPhase};

/// How long a soft reboot waits for the guest to power off before QEMU is stopped hard.
const SOFT_REBOOT_TIMEOUT: Duration = Duration::from_secs(20);

/// Errors from booting or driving a machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The local runtime failed.
    #[error("the simulator's qemu for {id}: {source}")]
    Runtime {
        /// `namespace/name`.
        id: String,
        /// The runtime's error.
        source: Box<paddock_local::RuntimeError>,
    },
    /// The local runtime could not open its state directory.
    #[error("cannot open the simulator's qemu state directory {path}: {source}")]
    Open {
        /// The state directory.
        path: PathBuf,
        /// The runtime's error.
        source: Box<paddock_local::RuntimeError>,
    },
}

impl MachineError {
    /// Wraps a runtime failure on the machine `id`.
    fn runtime(id: &VmId) -> impl Fn(paddock_local::RuntimeError) -> MachineError + Copy + '_ {
        move |source| MachineError::Runtime {
            id: id.to_string(),
            source: Box::new(source),
        }
    }
}

/// The machines booted for VMIs.
pub struct Machines {
    runtime: Runtime,
    guest_disk: PathBuf,
    /// VMI uid per booted machine; held across boots so two requests never boot the same VMI twice.
    booted: tokio::sync::Mutex<HashMap<VmId, String>>,
}

impl std::fmt::Debug for Machines {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Machines")
            .field("guest_disk", &self.guest_disk)
            .finish_non_exhaustive()
    }
}

impl Machines {
    /// Opens the local runtime in `state_dir`; machines boot `guest_disk` (through an overlay).
    pub async fn open(state_dir: &Path, guest_disk: &Path) -> Result<Machines, MachineError> {
        let runtime = Runtime::open(RuntimeOptions::new(state_dir))
            .await
            .map_err(|source| MachineError::Open {
                path: state_dir.to_path_buf(),
                source: Box::new(source),
            })?;
        // Machines left by a crashed earlier simulator on the same state directory are not ours to keep.
        for info in runtime.list() {
            let _ = runtime.delete(&info.id, true).await;
        }
        Ok(Machines {
            runtime,
            guest_disk: guest_disk.to_path_buf(),
            booted: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The machine of VMI `namespace/name` with `uid`, booted now if it is not running, from `disk`
    /// (the imported DataVolume's file) or else the test disk.
    pub async fn ensure(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        disk: Option<&Path>,
    ) -> Result<VmId, MachineError> {
        let id = VmId::new(namespace, name).map_err(|source| MachineError::Runtime {
            id: format!("{namespace}/{name}"),
            source: Box::new(source),
        })?;
        let wrap = MachineError::runtime(&id);
        let mut booted = self.booted.lock().await;
        if booted.get(&id).map(String::as_str) == Some(uid)
            && let Ok(info) = self.runtime.get(&id)
            && matches!(
                info.status.phase,
                VmPhase::Running | VmPhase::Paused | VmPhase::Starting
            )
        {
            return Ok(id);
        }
        if self.runtime.get(&id).is_ok() {
            self.runtime.delete(&id, true).await.map_err(wrap)?;
        }
        booted.remove(&id);
        let disk = disk.unwrap_or(&self.guest_disk);
        let app = serde_json::from_value(serde_json::json!({
            "apiVersion": "paddock.dev/v1alpha1",
            "kind": "VirtualMachineApp",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "image": {"containerDisk": format!("file:{}", disk.display())},
                "resources": {"cpu": 1, "memory": "256Mi"},
                // Manual: the simulated VMI decides when this machine runs, not the local runtime.
                "runStrategy": "Manual",
                "console": {"vnc": true, "serial": true},
            },
        }))
        .map_err(|error| {
            wrap(paddock_local::RuntimeError::InvalidSpec {
                message: error.to_string(),
            })
        })?;
        self.runtime.create(app).await.map_err(wrap)?;
        self.runtime.start(&id).await.map_err(wrap)?;
        booted.insert(id.clone(), uid.to_string());
        tracing::info!(vm = %id, uid, disk = %disk.display(), "booted qemu for the vmi's console");
        Ok(id)
    }

    /// The VNC server's unix socket of a booted machine.
    pub fn vnc_socket(&self, id: &VmId) -> Result<PathBuf, MachineError> {
        self.runtime
            .vnc_socket_path(id)
            .map_err(MachineError::runtime(id))
    }

    /// The serial console's unix socket of a booted machine.
    pub fn serial_socket(&self, id: &VmId) -> Result<PathBuf, MachineError> {
        self.runtime
            .serial_socket_path(id)
            .map_err(MachineError::runtime(id))
    }

    /// A PNG of the machine's screen.
    pub async fn screenshot(&self, id: &VmId) -> Result<Vec<u8>, MachineError> {
        self.runtime
            .screenshot(id)
            .await
            .map_err(MachineError::runtime(id))
    }

    async fn booted_id(&self, namespace: &str, name: &str) -> Option<VmId> {
        let id = VmId::new(namespace, name).ok()?;
        self.booted.lock().await.contains_key(&id).then_some(id)
    }

    /// The id of the VMI's machine when one was booted and is in `phase`.
    async fn booted_in_phase(&self, namespace: &str, name: &str, phase: VmPhase) -> Option<VmId> {
        let id = self.booted_id(namespace, name).await?;
        let info = self.runtime.get(&id).ok()?;
        (info.status.phase == phase).then_some(id)
    }

    /// Pauses the VMI's machine, if one was booted.
    pub async fn pause(&self, namespace: &str, name: &str) -> Result<(), MachineError> {
        let Some(id) = self.booted_in_phase(namespace, name, VmPhase::Running).await else {
            return Ok(());
        };
        self.runtime
            .pause(&id)
            .await
            .map(drop)
            .map_err(MachineError::runtime(&id))
    }

    /// Resumes the VMI's machine, if one was booted and is paused.
    pub async fn resume(&self, namespace: &str, name: &str) -> Result<(), MachineError> {
        let Some(id) = self.booted_in_phase(namespace, name, VmPhase::Paused).await else {
            return Ok(());
        };
        self.runtime
            .resume(&id)
            .await
            .map(drop)
            .map_err(MachineError::runtime(&id))
    }

    /// Reboots the VMI's machine in the background (ACPI power-off, then a fresh start), if one was
    /// booted; the request returns at once, as virt-handler's does.
    pub fn soft_reboot(self: &std::sync::Arc<Self>, namespace: &str, name: &str) {
        let machines = std::sync::Arc::clone(self);
        let (namespace, name) = (namespace.to_string(), name.to_string());
        tokio::spawn(async move {
            if let Some(id) = machines.booted_id(&namespace, &name).await
                && let Err(error) = machines.runtime.restart(&id, SOFT_REBOOT_TIMEOUT).await
            {
                tracing::warn!(vm = %id, %error, "soft reboot of the vmi's qemu failed");
            }
        });
    }

    /// Stops and deletes every machine whose VMI is not among `running` (namespace, name, uid).
    pub async fn reap(&self, running: &HashSet<(String, String, String)>) {
        let mut booted = self.booted.lock().await;
        let gone: Vec<VmId> = booted
            .iter()
            .filter(|(id, uid)| !running.contains(&(id.namespace.clone(), id.name.clone(), (*uid).clone())))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            tracing::info!(vm = %id, "the vmi is gone or stopped; stopping its qemu");
            if let Err(error) = self.runtime.delete(&id, true).await {
                tracing::warn!(vm = %id, %error, "deleting the vmi's qemu failed");
            }
            booted.remove(&id);
        }
    }

    /// Stops and deletes every machine.
    pub async fn shutdown(&self) {
        let mut booted = self.booted.lock().await;
        for info in self.runtime.list() {
            if let Err(error) = self.runtime.delete(&info.id, true).await {
                tracing::warn!(vm = %info.id, %error, "deleting qemu at shutdown failed");
            }
        }
        booted.clear();
    }
}
