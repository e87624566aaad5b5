//! The API's views of cluster objects: a VM is its VirtualMachineApp (when paddock manages it),
//! its KubeVirt VirtualMachine and VirtualMachineInstance, and its VirtualMachineSnapshots.
//!
//! Contract: pure functions of the objects (JSON as the API server stores them, so a KubeVirt
//! version with other fields never breaks reading). Phases are KubeVirt's printable statuses; a
//! VirtualMachineApp whose VirtualMachine does not exist yet is `Provisioning`, with the app's
//! status (import progress, conditions) as the message.

use std::sync::Arc;

use kube::api::DynamicObject;
use serde_json::Value;

use crate::backend::{ConsoleView, ImportView, SnapshotView, VmStatusView, VmView};

/// The kind of paddock's app, as owner references name it.
pub const APP_KIND: &str = "VirtualMachineApp";

/// Everything the cluster holds about one VM.
#[derive(Debug, Clone, Default)]
pub struct VmObjects {
    /// The VirtualMachineApp of the same name, when there is one.
    pub app: Option<Arc<DynamicObject>>,
    /// The KubeVirt VirtualMachine.
    pub vm: Option<Arc<DynamicObject>>,
    /// Its VirtualMachineInstance (same name), while one exists.
    pub vmi: Option<Arc<DynamicObject>>,
    /// Its snapshots, oldest first.
    pub snapshots: Vec<Arc<DynamicObject>>,
}

impl VmObjects {
    /// Whether there is anything at all.
    pub fn exists(&self) -> bool {
        self.app.is_some() || self.vm.is_some()
    }

    /// The name of the VirtualMachineApp whose runStrategy rules this VM, when paddock manages it:
    /// the app of the same name, or the app named by the VM's owner reference.
    pub fn managing_app(&self) -> Option<String> {
        if let Some(vm) = &self.vm {
            return vm
                .metadata
                .owner_references
                .iter()
                .flatten()
                .find(|owner| owner.kind == APP_KIND && owner.api_version.starts_with("paddock.dev/"))
                .map(|owner| owner.name.clone());
        }
        self.app.as_ref().and_then(|app| app.metadata.name.clone())
    }

    /// The run strategy in force: the app's when paddock manages the VM, else the VM's.
    pub fn run_strategy(&self) -> String {
        if self.managing_app().is_some()
            && let Some(strategy) = self
                .app
                .as_ref()
                .and_then(|app| app.data.pointer("/spec/runStrategy"))
                .and_then(Value::as_str)
        {
            return strategy.to_string();
        }
        if self.managing_app().is_some() && self.app.is_some() {
            // The CRD's default.
            return "Always".to_string();
        }
        let Some(vm) = &self.vm else {
            return "Always".to_string();
        };
        if let Some(strategy) = vm.data.pointer("/spec/runStrategy").and_then(Value::as_str) {
            return strategy.to_string();
        }
        match vm.data.pointer("/spec/running").and_then(Value::as_bool) {
            Some(true) => "Always".to_string(),
            _ => "Halted".to_string(),
        }
    }

    /// Whether a VirtualMachineInstance exists (the VM is running, starting or stopping).
    pub fn has_instance(&self) -> bool {
        self.vmi.is_some()
    }
}

fn text(object: &DynamicObject, pointer: &str) -> Option<String> {
    object
        .data
        .pointer(pointer)
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// The API's view of a VM; `None` when neither an app nor a VM exists.
pub fn vm_view(namespace: &str, name: &str, objects: &VmObjects) -> Option<VmView> {
    let primary = objects.app.as_ref().or(objects.vm.as_ref())?;
    let app = objects.app.as_ref().filter(|_| objects.managing_app().is_some());
    let display_name = app.and_then(|app| text(app, "/spec/displayName")).or_else(|| {
        objects.vm.as_ref().and_then(|vm| {
            vm.metadata
                .annotations
                .as_ref()?
                .get("paddock.dev/display-name")
                .cloned()
        })
    });
    let console = match app {
        Some(app) => ConsoleView {
            vnc: app
                .data
                .pointer("/spec/console/vnc")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            serial: app
                .data
                .pointer("/spec/console/serial")
                .and_then(Value::as_bool)
                .unwrap_or(true),
        },
        None => {
            let devices = objects
                .vm
                .as_ref()
                .and_then(|vm| vm.data.pointer("/spec/template/spec/domain/devices").cloned())
                .unwrap_or(Value::Null);
            ConsoleView {
                vnc: devices["autoattachGraphicsDevice"].as_bool().unwrap_or(true),
                serial: devices["autoattachSerialConsole"].as_bool().unwrap_or(true),
            }
        }
    };
    let created_at = primary
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|time| time.0.to_string())
        .unwrap_or_default();
    let manifest = app
        .or(objects.vm.as_ref())
        .and_then(|object| serde_json::to_value(&**object).ok())
        .unwrap_or(Value::Null);
    Some(VmView {
        namespace: namespace.to_string(),
        name: name.to_string(),
        display_name,
        run_strategy: objects.run_strategy(),
        created_at,
        console,
        status: status_view(objects),
        snapshots: objects
            .snapshots
            .iter()
            .map(|snapshot| snapshot_view(snapshot))
            .collect(),
        manifest,
    })
}

/// The observed state of a VM.
pub fn status_view(objects: &VmObjects) -> VmStatusView {
    let mut status = VmStatusView {
        phase: "Provisioning".to_string(),
        pid: None,
        accelerator: None,
        started_at: None,
        restart_count: 0,
        last_exit: None,
        message: None,
        warnings: Vec::new(),
        import: None,
    };
    let app_status = objects
        .app
        .as_ref()
        .and_then(|app| app.data.get("status").cloned());
    status.import = app_status.as_ref().and_then(import_view).map(Box::new);
    match &objects.vm {
        Some(vm) => {
            status.phase = text(vm, "/status/printableStatus").unwrap_or_else(|| "Stopped".to_string());
            // The first condition that is not as it should be says why.
            status.message = vm
                .data
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|condition| {
                    let failing = condition["type"] == "Failure" && condition["status"] == "True";
                    let not_ready = condition["type"] == "Ready"
                        && condition["status"] == "False"
                        && status.phase != "Stopped";
                    failing || not_ready
                })
                .find_map(|condition| {
                    condition["message"]
                        .as_str()
                        .filter(|message| !message.is_empty())
                })
                .map(str::to_string);
        }
        None => {
            status.message = Some(match &app_status {
                Some(app_status) => match app_status["importProgress"].as_str() {
                    Some(progress) => format!("importing the disk: {progress}"),
                    None => app_status["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|condition| condition["status"] == "False")
                        .and_then(|condition| condition["message"].as_str())
                        .unwrap_or("waiting for the paddock operator to create the VirtualMachine")
                        .to_string(),
                },
                None => "waiting for the paddock operator to create the VirtualMachine".to_string(),
            });
        }
    }
    if let Some(vmi) = &objects.vmi {
        status.started_at = vmi
            .data
            .pointer("/status/phaseTransitionTimestamps")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|transition| transition["phase"] == "Running")
            .filter_map(|transition| transition["phaseTransitionTimestamp"].as_str())
            .next_back()
            .map(str::to_string);
    }
    status
}

/// The boot disk's import from the VirtualMachineApp's status: the operator's `DiskReady`
/// condition says whether CDI is importing (`Importing`) or failed (`ImportFailed`), and
/// `importProgress` carries CDI's percentage. `None` when there is nothing to follow (imported,
/// ephemeral, or no status yet).
pub fn import_view(app_status: &Value) -> Option<ImportView> {
    let disk_ready = app_status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|condition| condition["type"] == paddock_api::app::condition::DISK_READY);
    let reason = disk_ready.and_then(|condition| condition["reason"].as_str());
    let message = disk_ready
        .and_then(|condition| condition["message"].as_str())
        .filter(|message| !message.is_empty())
        .map(str::to_string);
    let progress = app_status["importProgress"]
        .as_str()
        .filter(|progress| !progress.is_empty())
        .map(str::to_string);
    let state = match reason {
        Some("ImportFailed") => "Failed",
        Some("Importing") => "Importing",
        // An older operator may report the progress without the condition.
        None if progress.is_some() => "Importing",
        _ => return None,
    };
    let percent = progress
        .as_deref()
        .and_then(|progress| progress.trim().trim_end_matches('%').trim().parse::<f64>().ok())
        .filter(|percent| percent.is_finite())
        .map(|percent| percent.clamp(0.0, 100.0));
    Some(ImportView {
        state: state.to_string(),
        progress,
        percent,
        message,
    })
}

/// The API's view of a VirtualMachineSnapshot. KubeVirt snapshots hold disks only, so `memory`
/// is always false; `takenInPhase` comes from the snapshot's indications (Online: the VM was
/// running).
pub fn snapshot_view(snapshot: &DynamicObject) -> SnapshotView {
    let indications: Vec<&str> = snapshot
        .data
        .pointer("/status/indications")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let taken_in_phase = if indications.contains(&"Paused") {
        "Paused"
    } else if indications.contains(&"Online") {
        "Running"
    } else {
        "Stopped"
    };
    SnapshotView {
        name: snapshot.metadata.name.clone().unwrap_or_default(),
        created_at: text(snapshot, "/status/creationTime").unwrap_or_else(|| {
            snapshot
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|time| time.0.to_string())
                .unwrap_or_default()
        }),
        memory: false,
        taken_in_phase: taken_in_phase.to_string(),
    }
}

/// The name of the VM a snapshot is of, when it is of a VirtualMachine.
pub fn snapshot_source(snapshot: &DynamicObject) -> Option<String> {
    let source = snapshot.data.pointer("/spec/source")?;
    (source["kind"] == "VirtualMachine")
        .then(|| source["name"].as_str().map(str::to_string))
        .flatten()
}

/// A snapshot's phase (`InProgress`, `Succeeded`, `Failed`), and whether it is ready to use.
pub fn snapshot_state(snapshot: &DynamicObject) -> (String, bool) {
    (
        text(snapshot, "/status/phase").unwrap_or_default(),
        snapshot
            .data
            .pointer("/status/readyToUse")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(value: Value) -> Arc<DynamicObject> {
        Arc::new(serde_json::from_value(value).unwrap())
    }

    fn app(run_strategy: &str) -> Arc<DynamicObject> {
        object(serde_json::json!({
            "apiVersion": "paddock.dev/v1alpha1", "kind": "VirtualMachineApp",
            "metadata": {"name": "demo", "namespace": "vms", "creationTimestamp": "2026-01-02T03:04:05Z"},
            "spec": {"displayName": "Demo", "image": {"containerDisk": "r.example/d:1"}, "runStrategy": run_strategy, "console": {"serial": false}},
            "status": {"importProgress": "42.00%"},
        }))
    }

    fn vm(owned: bool, run_strategy: &str, printable: &str) -> Arc<DynamicObject> {
        let owners = if owned {
            serde_json::json!([{"apiVersion": "paddock.dev/v1alpha1", "kind": "VirtualMachineApp", "name": "demo", "uid": "u1", "controller": true}])
        } else {
            serde_json::json!([])
        };
        object(serde_json::json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": "demo", "namespace": "vms", "ownerReferences": owners, "creationTimestamp": "2026-01-02T03:04:06Z"},
            "spec": {"runStrategy": run_strategy, "template": {"spec": {"domain": {"devices": {"autoattachGraphicsDevice": false}}}}},
            "status": {"printableStatus": printable},
        }))
    }

    #[test]
    fn an_app_without_its_vm_is_provisioning_with_the_import_progress() {
        let objects = VmObjects {
            app: Some(app("Halted")),
            ..VmObjects::default()
        };
        let view = vm_view("vms", "demo", &objects).unwrap();
        assert_eq!(view.status.phase, "Provisioning");
        assert_eq!(view.status.message.as_deref(), Some("importing the disk: 42.00%"));
        assert_eq!(view.run_strategy, "Halted");
        assert_eq!(view.display_name.as_deref(), Some("Demo"));
        assert!(view.console.vnc && !view.console.serial);
        assert_eq!(view.manifest["kind"], "VirtualMachineApp");
        assert_eq!(objects.managing_app().as_deref(), Some("demo"));
    }

    #[test]
    fn the_import_follows_the_disk_ready_condition_and_the_progress() {
        let importing = import_view(&serde_json::json!({
            "importProgress": "42.0%",
            "conditions": [{"type": "DiskReady", "status": "False", "reason": "Importing", "message": "CDI is importing the disk: phase ImportInProgress, 42.0%"}],
        }))
        .unwrap();
        assert_eq!(importing.state, "Importing");
        assert_eq!(importing.progress.as_deref(), Some("42.0%"));
        assert_eq!(importing.percent, Some(42.0));
        assert!(importing.message.unwrap().contains("ImportInProgress"));

        let failed = import_view(&serde_json::json!({
            "conditions": [{"type": "DiskReady", "status": "False", "reason": "ImportFailed", "message": "Unable to connect to http data source: 404"}],
        }))
        .unwrap();
        assert_eq!(failed.state, "Failed");
        assert_eq!(failed.percent, None);
        assert_eq!(
            failed.message.as_deref(),
            Some("Unable to connect to http data source: 404")
        );

        let imported = serde_json::json!({
            "importProgress": "100.0%",
            "conditions": [{"type": "DiskReady", "status": "True", "reason": "Imported", "message": "the disk has been imported"}],
        });
        assert_eq!(import_view(&imported), None);
        assert_eq!(
            import_view(&serde_json::json!({"importProgress": "N/A"}))
                .unwrap()
                .percent,
            None
        );

        // The VM view carries it whether or not the VirtualMachine exists yet.
        let objects = VmObjects {
            app: Some(app("Always")),
            vm: Some(vm(true, "Always", "Provisioning")),
            ..VmObjects::default()
        };
        let view = vm_view("vms", "demo", &objects).unwrap();
        assert_eq!(view.status.import.unwrap().percent, Some(42.0));
    }

    #[test]
    fn a_managed_vm_takes_its_run_strategy_from_the_app_and_a_plain_one_from_itself() {
        let managed = VmObjects {
            app: Some(app("Always")),
            vm: Some(vm(true, "Halted", "Stopped")),
            ..VmObjects::default()
        };
        assert_eq!(managed.run_strategy(), "Always");
        assert_eq!(managed.managing_app().as_deref(), Some("demo"));
        let view = vm_view("vms", "demo", &managed).unwrap();
        assert_eq!(view.status.phase, "Stopped");
        assert_eq!(view.created_at, "2026-01-02T03:04:05Z");

        let plain = VmObjects {
            vm: Some(vm(false, "Manual", "Running")),
            ..VmObjects::default()
        };
        assert_eq!(plain.run_strategy(), "Manual");
        assert_eq!(plain.managing_app(), None);
        let view = vm_view("vms", "demo", &plain).unwrap();
        assert_eq!(view.status.phase, "Running");
        assert!(!view.console.vnc && view.console.serial);
        assert_eq!(view.manifest["kind"], "VirtualMachine");
        assert!(vm_view("vms", "demo", &VmObjects::default()).is_none());
    }

    #[test]
    fn snapshots_say_when_and_in_which_phase_they_were_taken() {
        let snapshot = object(serde_json::json!({
            "apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineSnapshot",
            "metadata": {"name": "before", "namespace": "vms"},
            "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "demo"}},
            "status": {"phase": "Succeeded", "readyToUse": true, "creationTime": "2026-01-02T04:00:00Z", "indications": ["Online", "NoGuestAgent"]},
        }));
        assert_eq!(snapshot_source(&snapshot).as_deref(), Some("demo"));
        assert_eq!(snapshot_state(&snapshot), ("Succeeded".to_string(), true));
        let view = snapshot_view(&snapshot);
        assert_eq!(
            (
                view.name.as_str(),
                view.created_at.as_str(),
                view.memory,
                view.taken_in_phase.as_str()
            ),
            ("before", "2026-01-02T04:00:00Z", false, "Running")
        );
    }
}
