//! Status from children: what a VirtualMachineApp's `status` says, derived only from the objects the
//! operator created for it (the CDI DataVolume, the KubeVirt VirtualMachine, the BafflesApplication) and
//! from what the operator knows about the cluster.
//!
//! Contract: [`derive_status`] is a pure function. It keeps a condition's `lastTransitionTime` from the
//! previous status while the condition's `status` stays the same, so writing the result again changes
//! nothing and a reconcile of an unchanged app does not write. [`user_events`] compares two statuses
//! and names the transitions users should see as Kubernetes Events; because it reads the transitions
//! from the persisted status, an operator restarted mid-reconcile neither loses nor repeats them.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use paddock_api::{
    app::{Phase, VirtualMachineApp, VirtualMachineAppStatus, condition},
    cdi::datavolume::DataVolume,
    kubevirt::virtualmachine::VirtualMachine,
};

/// The condition paddock reports for scheduled snapshots (only on apps with `spec.snapshots`).
pub const SNAPSHOTS_HEALTHY: &str = "SnapshotsHealthy";

/// What the operator knows about Baffles for one app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BafflesState {
    /// The BafflesApplication CRD is not installed.
    NotInstalled,
    /// The app does not want to be listed (`console.baffles.enabled: false` or `console.vnc: false`).
    Disabled,
    /// The BafflesApplication is applied with this URL.
    Registered {
        /// The URL Baffles opens.
        url: String,
    },
}

/// How the app's scheduled snapshots are doing, when it has a schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotHealth {
    /// Snapshots are taken on time; the next one is due at `next`.
    Scheduled {
        /// The next scheduled time, RFC 3339.
        next: String,
    },
    /// A snapshot failed or cannot be taken.
    Failing {
        /// A CamelCase reason.
        reason: String,
        /// What failed and what to do.
        message: String,
    },
}

/// Everything [`derive_status`] reads besides the app.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    /// The app's DataVolume, when it exists.
    pub data_volume: Option<&'a DataVolume>,
    /// Whether the app boots from an ephemeral volume and so has no DataVolume.
    pub ephemeral: bool,
    /// The app's VirtualMachine, when it exists.
    pub virtual_machine: Option<&'a VirtualMachine>,
    /// Baffles, as far as this app is concerned.
    pub baffles: BafflesState,
    /// The VNC URL through the console gateway.
    pub console_url: String,
    /// The snapshot schedule's health, when the app has one.
    pub snapshots: Option<SnapshotHealth>,
    /// Set when the spec cannot be turned into objects: the message says what to change.
    pub invalid_spec: Option<String>,
    /// The time written into conditions that change now.
    pub now: Timestamp,
}

/// The status the app should have.
pub fn derive_status(app: &VirtualMachineApp, observed: &Observed<'_>) -> VirtualMachineAppStatus {
    let previous = app
        .status
        .as_ref()
        .map(|status| status.conditions.as_slice())
        .unwrap_or_default();
    let generation = app.metadata.generation;
    let condition = |kind: &str, status: bool, reason: &str, message: String| {
        make_condition(previous, kind, status, reason, message, generation, observed.now)
    };

    if let Some(message) = &observed.invalid_spec {
        return VirtualMachineAppStatus {
            phase: Some(Phase::Failed),
            conditions: vec![condition(condition::READY, false, "InvalidSpec", message.clone())],
            import_progress: None,
            console_url: None,
            observed_generation: generation,
            backup: None,
        };
    }

    let disk = disk_state(observed);
    let vm_status = observed
        .virtual_machine
        .and_then(|vm| vm.status.as_ref())
        .and_then(|status| status.printable_status.as_deref());
    let phase = match (&disk, observed.virtual_machine, vm_status) {
        (DiskState::Failed { .. }, _, _) => Phase::Failed,
        (DiskState::Importing { .. }, _, _) => Phase::Importing,
        (_, None, _) | (_, Some(_), None) => Phase::Pending,
        (_, Some(_), Some(printable)) => phase_of(printable),
    };

    let mut conditions = Vec::new();
    let (disk_ready, disk_reason, disk_message) = match &disk {
        DiskState::Ephemeral => (
            true,
            "Ephemeral",
            "the VM boots from an ephemeral volume; nothing to import".to_owned(),
        ),
        DiskState::Missing => (
            false,
            "DataVolumeMissing",
            "the DataVolume has not been created yet".to_owned(),
        ),
        DiskState::Importing { cdi_phase, progress } => (
            false,
            "Importing",
            format!(
                "CDI is importing the disk: phase {cdi_phase}{}",
                progress.as_deref().map(|p| format!(", {p}")).unwrap_or_default()
            ),
        ),
        DiskState::Failed { message } => (false, "ImportFailed", message.clone()),
        DiskState::Imported => (true, "Imported", "the disk has been imported".to_owned()),
    };
    conditions.push(condition(
        condition::DISK_READY,
        disk_ready,
        disk_reason,
        disk_message,
    ));

    let running = phase == Phase::Running;
    let vm_message = vm_status.map_or_else(
        || "the VirtualMachine has no status yet".to_owned(),
        |printable| format!("the VirtualMachine is {printable}"),
    );
    conditions.push(if running {
        condition(condition::READY, true, "Running", "the VM is running".to_owned())
    } else {
        condition(condition::READY, false, phase_name(phase), vm_message.clone())
    });

    conditions.push(if !app.spec.console.vnc {
        condition(
            condition::CONSOLE_READY,
            false,
            "ConsoleDisabled",
            "console.vnc is false: the VM has no graphics device".to_owned(),
        )
    } else if running {
        condition(
            condition::CONSOLE_READY,
            true,
            "Running",
            format!("the VNC console is at {}", observed.console_url),
        )
    } else {
        condition(condition::CONSOLE_READY, false, "NotRunning", vm_message)
    });

    conditions.push(match &observed.baffles {
        BafflesState::NotInstalled => condition(
            condition::BAFFLES_REGISTERED,
            false,
            "BafflesNotInstalled",
            "the BafflesApplication CRD (bafflesapplications.app.baffles.dev) is not installed; paddock lists the VM once Baffles is installed (it checks periodically)".to_owned(),
        ),
        BafflesState::Disabled => condition(
            condition::BAFFLES_REGISTERED,
            false,
            "Disabled",
            "console.baffles.enabled or console.vnc is false".to_owned(),
        ),
        BafflesState::Registered { url } => condition(
            condition::BAFFLES_REGISTERED,
            true,
            "Registered",
            format!("listed in Baffles with URL {url}"),
        ),
    });

    if let Some(snapshots) = &observed.snapshots {
        conditions.push(match snapshots {
            SnapshotHealth::Scheduled { next } => condition(
                SNAPSHOTS_HEALTHY,
                true,
                "Scheduled",
                format!("the next scheduled snapshot is due at {next}"),
            ),
            SnapshotHealth::Failing { reason, message } => {
                condition(SNAPSHOTS_HEALTHY, false, reason, message.clone())
            }
        });
    }

    let import_progress = match (&disk, observed.data_volume) {
        (DiskState::Imported, Some(data_volume)) => Some(
            data_volume
                .status
                .as_ref()
                .and_then(|status| status.progress.clone())
                .filter(|progress| progress != "N/A")
                .unwrap_or_else(|| "100.0%".to_owned()),
        ),
        (DiskState::Importing { progress, .. }, _) => progress.clone(),
        (DiskState::Failed { .. }, Some(data_volume)) => data_volume
            .status
            .as_ref()
            .and_then(|status| status.progress.clone()),
        _ => None,
    };

    VirtualMachineAppStatus {
        phase: Some(phase),
        conditions,
        import_progress,
        console_url: app.spec.console.vnc.then(|| observed.console_url.clone()),
        observed_generation: generation,
        backup: None,
    }
}

enum DiskState {
    Ephemeral,
    Missing,
    Importing {
        cdi_phase: String,
        progress: Option<String>,
    },
    Failed {
        message: String,
    },
    Imported,
}

fn disk_state(observed: &Observed<'_>) -> DiskState {
    if observed.ephemeral {
        return DiskState::Ephemeral;
    }
    let Some(data_volume) = observed.data_volume else {
        return DiskState::Missing;
    };
    let status = data_volume.status.as_ref();
    let cdi_phase = status.and_then(|s| s.phase.clone()).unwrap_or_default();
    match cdi_phase.as_str() {
        "Succeeded" => DiskState::Imported,
        "Failed" => {
            // CDI puts the importer's error in the Running condition.
            let detail = status
                .and_then(|s| s.conditions.as_ref())
                .and_then(|conditions| conditions.iter().find(|c| c.r#type == "Running"))
                .and_then(|c| c.message.clone())
                .unwrap_or_else(|| "no message from CDI".to_owned());
            DiskState::Failed {
                message: format!(
                    "the disk import failed: {detail}; fix the image or its source, then delete the DataVolume {} so paddock imports it again",
                    data_volume.metadata.name.as_deref().unwrap_or_default()
                ),
            }
        }
        _ => DiskState::Importing {
            cdi_phase: if cdi_phase.is_empty() {
                "Pending".to_owned()
            } else {
                cdi_phase
            },
            progress: status
                .and_then(|s| s.progress.clone())
                .filter(|progress| progress != "N/A"),
        },
    }
}

/// The app phase for a KubeVirt `printableStatus`.
pub fn phase_of(printable_status: &str) -> Phase {
    match printable_status {
        "Running" => Phase::Running,
        "Stopped" | "Stopping" | "Terminating" | "Halted" => Phase::Stopped,
        "Paused" => Phase::Paused,
        "Migrating" => Phase::Migrating,
        "Provisioning" | "Starting" | "WaitingForVolumeBinding" | "WaitingForReceiver" => Phase::Starting,
        "ErrorUnschedulable" | "ErrImagePull" | "ImagePullBackOff" | "ErrorPvcNotFound"
        | "DataVolumeError" | "CrashLoopBackOff" => Phase::Failed,
        _ => Phase::Pending,
    }
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Pending => "Pending",
        Phase::Importing => "Importing",
        Phase::Starting => "Starting",
        Phase::Running => "Running",
        Phase::Stopped => "Stopped",
        Phase::Paused => "Paused",
        Phase::Migrating => "Migrating",
        Phase::Failed => "Failed",
    }
}

fn make_condition(
    previous: &[Condition],
    kind: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_owned();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == kind && c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: kind.to_owned(),
        status,
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// Whether two statuses say the same thing (transition times are kept by [`derive_status`], so
/// equal means "no write needed"). The backup scheduler's part (`status.backup` and the
/// `BackupSucceeded` condition, written under its own field manager, [`crate::backups`]) is not
/// the app controller's and is left out of the comparison.
pub fn unchanged(current: Option<&VirtualMachineAppStatus>, desired: &VirtualMachineAppStatus) -> bool {
    current.map(without_backup).as_ref() == Some(&without_backup(desired))
}

/// `status` without what the backup scheduler writes.
fn without_backup(status: &VirtualMachineAppStatus) -> VirtualMachineAppStatus {
    let mut status = status.clone();
    status.backup = None;
    status
        .conditions
        .retain(|condition| condition.type_ != condition::BACKUP_SUCCEEDED);
    status
}

/// A Kubernetes Event users should see, as a transition between two statuses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserEvent {
    /// Warning (true) or Normal.
    pub warning: bool,
    /// CamelCase reason, e.g. `ImportStarted`.
    pub reason: &'static str,
    /// The action, e.g. `Import`.
    pub action: &'static str,
    /// What happened, for people.
    pub note: String,
}

fn find<'a>(status: Option<&'a VirtualMachineAppStatus>, kind: &str) -> Option<&'a Condition> {
    status?.conditions.iter().find(|c| c.type_ == kind)
}

/// The events for the transition from `before` to `after`.
pub fn user_events(
    before: Option<&VirtualMachineAppStatus>,
    after: &VirtualMachineAppStatus,
) -> Vec<UserEvent> {
    let mut events = Vec::new();
    let reason =
        |status: Option<&VirtualMachineAppStatus>, kind: &str| find(status, kind).map(|c| c.reason.clone());
    let disk_before = reason(before, condition::DISK_READY);
    let disk_after = reason(Some(after), condition::DISK_READY);
    if disk_before != disk_after {
        let message = find(Some(after), condition::DISK_READY)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        match disk_after.as_deref() {
            Some("Importing") if disk_before.as_deref() != Some("Importing") => events.push(UserEvent {
                warning: false,
                reason: "ImportStarted",
                action: "Import",
                note: message,
            }),
            Some("Imported") => events.push(UserEvent {
                warning: false,
                reason: "ImportSucceeded",
                action: "Import",
                note: message,
            }),
            Some("ImportFailed") => events.push(UserEvent {
                warning: true,
                reason: "ImportFailed",
                action: "Import",
                note: message,
            }),
            _ => {}
        }
    }
    let phase_before = before.and_then(|s| s.phase);
    if phase_before != after.phase {
        match after.phase {
            Some(Phase::Running) => events.push(UserEvent {
                warning: false,
                reason: "VirtualMachineStarted",
                action: "Start",
                note: "the VM is running".to_owned(),
            }),
            // A VM that stops after it ran; not one created halted, which was never started.
            Some(Phase::Stopped)
                if matches!(
                    phase_before,
                    Some(Phase::Running | Phase::Starting | Phase::Paused | Phase::Migrating)
                ) =>
            {
                events.push(UserEvent {
                    warning: false,
                    reason: "VirtualMachineStopped",
                    action: "Stop",
                    note: "the VM is stopped".to_owned(),
                });
            }
            _ => {}
        }
    }
    let invalid_before = reason(before, condition::READY).as_deref() == Some("InvalidSpec");
    if let Some(ready) = find(Some(after), condition::READY)
        && ready.reason == "InvalidSpec"
        && !(invalid_before && find(before, condition::READY).map(|c| &c.message) == Some(&ready.message))
    {
        events.push(UserEvent {
            warning: true,
            reason: "InvalidSpec",
            action: "Validate",
            note: ready.message.clone(),
        });
    }
    let snapshots_before = find(before, SNAPSHOTS_HEALTHY).map(|c| (c.status.clone(), c.message.clone()));
    if let Some(snapshots) = find(Some(after), SNAPSHOTS_HEALTHY)
        && snapshots.status == "False"
        && snapshots_before != Some((snapshots.status.clone(), snapshots.message.clone()))
    {
        events.push(UserEvent {
            warning: true,
            reason: "SnapshotFailed",
            action: "Snapshot",
            note: snapshots.message.clone(),
        });
    }
    events
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn app(yaml: &str) -> VirtualMachineApp {
        serde_yaml::from_str(yaml).unwrap()
    }

    const APP: &str = r#"
apiVersion: paddock.dev/v1alpha1
kind: VirtualMachineApp
metadata: {name: debian, namespace: vms, uid: "1", generation: 3}
spec:
  image: {containerDisk: "registry.example/vms/debian:12"}
  disk: {size: 10Gi}
"#;

    fn data_volume(yaml: &str) -> DataVolume {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn vm(printable: &str) -> VirtualMachine {
        serde_yaml::from_str(&format!(
            r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata: {{name: debian, namespace: vms}}
spec: {{template: {{}}}}
status: {{printableStatus: {printable}}}
"#
        ))
        .unwrap()
    }

    fn observed<'a>(data_volume: Option<&'a DataVolume>, vm: Option<&'a VirtualMachine>) -> Observed<'a> {
        Observed {
            data_volume,
            ephemeral: false,
            virtual_machine: vm,
            baffles: BafflesState::Registered {
                url: "wss://console/vnc".to_owned(),
            },
            console_url: "wss://console/vnc".to_owned(),
            snapshots: None,
            invalid_spec: None,
            now: Timestamp::from_second(1_700_000_000).unwrap(),
        }
    }

    fn condition_of<'a>(status: &'a VirtualMachineAppStatus, kind: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == kind).unwrap()
    }

    #[test]
    fn importing_data_volume_gives_importing_with_cdi_progress() {
        let app = app(APP);
        let dv = data_volume(
            r#"
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata: {name: debian-disk}
spec: {}
status: {phase: ImportInProgress, progress: "42.50%"}
"#,
        );
        let vm = vm("Provisioning");
        let status = derive_status(&app, &observed(Some(&dv), Some(&vm)));
        assert_eq!(status.phase, Some(Phase::Importing));
        assert_eq!(status.import_progress.as_deref(), Some("42.50%"));
        assert_eq!(status.observed_generation, Some(3));
        let disk = condition_of(&status, condition::DISK_READY);
        assert_eq!(
            (disk.status.as_str(), disk.reason.as_str()),
            ("False", "Importing")
        );
        assert!(disk.message.contains("42.50%"), "{}", disk.message);
        assert_eq!(condition_of(&status, condition::READY).status, "False");
    }

    #[test]
    fn succeeded_import_and_running_vm_give_running_and_ready_console() {
        let app = app(APP);
        let dv = data_volume(
            r#"
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata: {name: debian-disk}
spec: {}
status: {phase: Succeeded, progress: "100.0%"}
"#,
        );
        let vm = vm("Running");
        let status = derive_status(&app, &observed(Some(&dv), Some(&vm)));
        assert_eq!(status.phase, Some(Phase::Running));
        assert_eq!(status.import_progress.as_deref(), Some("100.0%"));
        assert_eq!(status.console_url.as_deref(), Some("wss://console/vnc"));
        for kind in [
            condition::READY,
            condition::DISK_READY,
            condition::CONSOLE_READY,
            condition::BAFFLES_REGISTERED,
        ] {
            assert_eq!(condition_of(&status, kind).status, "True", "{kind}");
        }
    }

    #[test]
    fn failed_import_carries_cdis_message() {
        let app = app(APP);
        let dv = data_volume(
            r#"
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata: {name: debian-disk}
spec: {}
status:
  phase: Failed
  conditions:
  - {type: Running, status: "False", reason: Error, message: "Unable to process data: invalid backing file"}
"#,
        );
        let status = derive_status(&app, &observed(Some(&dv), None));
        assert_eq!(status.phase, Some(Phase::Failed));
        let disk = condition_of(&status, condition::DISK_READY);
        assert_eq!(disk.reason, "ImportFailed");
        assert!(disk.message.contains("invalid backing file"), "{}", disk.message);
        let events = user_events(None, &status);
        assert!(events.iter().any(|e| e.reason == "ImportFailed" && e.warning));
    }

    #[test]
    fn vm_printable_statuses_map_to_phases() {
        let app = app(APP);
        let dv = data_volume(
            "{apiVersion: cdi.kubevirt.io/v1beta1, kind: DataVolume, metadata: {name: d}, spec: {}, status: {phase: Succeeded}}",
        );
        for (printable, phase) in [
            ("Stopped", Phase::Stopped),
            ("Starting", Phase::Starting),
            ("Paused", Phase::Paused),
            ("Migrating", Phase::Migrating),
            ("ErrorPvcNotFound", Phase::Failed),
        ] {
            let vm = vm(printable);
            let status = derive_status(&app, &observed(Some(&dv), Some(&vm)));
            assert_eq!(status.phase, Some(phase), "{printable}");
        }
    }

    #[test]
    fn transition_time_is_kept_while_a_condition_holds() {
        let mut app = app(APP);
        let vm = vm("Stopped");
        let mut first_observed = observed(None, Some(&vm));
        first_observed.ephemeral = true;
        let first = derive_status(&app, &first_observed);
        app.status = Some(first.clone());
        let mut later = first_observed.clone();
        later.now = Timestamp::from_second(1_700_000_500).unwrap();
        let second = derive_status(&app, &later);
        assert!(unchanged(app.status.as_ref(), &second));
        // A condition that flips gets the new time.
        let running = self::vm("Running");
        later.virtual_machine = Some(&running);
        let third = derive_status(&app, &later);
        assert_eq!(
            condition_of(&third, condition::READY).last_transition_time.0,
            later.now
        );
        let events = user_events(app.status.as_ref(), &third);
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].reason, "VirtualMachineStarted");
        let stopped_again = user_events(Some(&third), &first);
        assert_eq!(stopped_again[0].reason, "VirtualMachineStopped");
    }

    #[test]
    fn a_vm_created_halted_is_not_reported_as_stopped() {
        let app = app(APP);
        let mut pending = observed(None, None);
        pending.ephemeral = true;
        let pending = derive_status(&app, &pending);
        assert_eq!(pending.phase, Some(Phase::Pending));
        let halted = vm("Stopped");
        let mut stopped = observed(None, Some(&halted));
        stopped.ephemeral = true;
        let stopped = derive_status(&app, &stopped);
        assert_eq!(stopped.phase, Some(Phase::Stopped));
        assert!(user_events(Some(&pending), &stopped).is_empty());
    }

    #[test]
    fn baffles_missing_and_invalid_spec_are_reported() {
        let app = app(APP);
        let mut missing = observed(None, None);
        missing.baffles = BafflesState::NotInstalled;
        let status = derive_status(&app, &missing);
        assert_eq!(status.phase, Some(Phase::Pending));
        let baffles = condition_of(&status, condition::BAFFLES_REGISTERED);
        assert_eq!(baffles.reason, "BafflesNotInstalled");
        let mut invalid = observed(None, None);
        invalid.invalid_spec = Some("disk.size is required".to_owned());
        let status = derive_status(&app, &invalid);
        assert_eq!(status.phase, Some(Phase::Failed));
        assert_eq!(condition_of(&status, condition::READY).reason, "InvalidSpec");
        let events = user_events(None, &status);
        assert_eq!(events[0].reason, "InvalidSpec");
        // The same invalid status again is no new event.
        assert!(user_events(Some(&status), &status).is_empty());
    }
}
