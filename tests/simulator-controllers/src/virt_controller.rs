//! Simulated virt-controller: VirtualMachine run strategies → VirtualMachineInstances, the VMI phase
//! walk, `dataVolumeTemplates` → DataVolumes, and the VM status KubeVirt's VM controller writes.
//!
//! Contract (after `pkg/virt-controller/watch/vm/vm.go` of KubeVirt v1.9):
//! - `runStrategy` (or the deprecated `running`: true → Always, false → Halted): Always keeps a VMI and
//!   recreates it when it is final or a stop request names it; RerunOnFailure recreates only failed
//!   VMIs and starts when the strategy just switched to it or a start request is queued; Manual acts
//!   only on `status.stateChangeRequests` (what virt-api's start/stop write); Halted deletes the VMI
//!   (and with a start request switches `runStrategy` to Always); Once starts one VMI, never again.
//! - A VMI is created only when every DataVolume of `dataVolumeTemplates` has Succeeded; missing ones
//!   are created first, owned by the VM (so they are garbage-collected with it).
//! - VM status: `created`, `ready`, `runStrategy` (once a VMI was created), the `Ready` condition from
//!   the VMI's (or `VMINotExists`), the VMI's other conditions copied, `stateChangeRequests` trimmed
//!   once acted upon, and `printableStatus` evaluated in KubeVirt's order.
//! - A Pending VMI waits for the DataVolumes of its volumes to Succeed; a missing one gives the VMI
//!   `Synchronized` False `FailedPvcNotFound` and the VM `ErrorPvcNotFound`.
//! - VMI phases: Pending → Scheduling → Scheduled → Running, one step every [`PHASE_STEP`], with
//!   `status.nodeName` = [`SIMULATED_NODE_NAME`](crate::SIMULATED_NODE_NAME) (there are no nodes) and a
//!   `Ready` condition once Running; `spec.startStrategy: Paused` adds the `Paused` condition.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use paddock_api::cdi::datavolume::DataVolume;
use paddock_api::kubevirt::virtualmachine::VirtualMachine;
use paddock_api::kubevirt::virtualmachineinstance::VirtualMachineInstance;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::conditions::{
    ReconcileError, claim_names, condition, conditions_of, controller_reference, drive, has_true,
    is_controlled_by, now, patch_status, patch_status_in_place, retry_on_error, set_condition,
};
use crate::{Error, SIMULATED_NODE_NAME};

/// How long each simulated VMI phase lasts, so clients can observe Starting.
const PHASE_STEP: Duration = Duration::from_millis(300);

struct Context {
    client: Client,
}

/// Runs the VM and VMI controllers until their watches end.
pub(crate) async fn run(client: Client) -> Result<(), Error> {
    let context = Arc::new(Context {
        client: client.clone(),
    });
    let vm_controller = Controller::new(
        Api::<VirtualMachine>::all(client.clone()),
        watcher::Config::default(),
    );
    let vm_store = vm_controller.store();
    // A DataVolume wakes every VM whose volumes name it, as KubeVirt finds VMs by volume reference:
    // the DataVolume need not be the VM's own (paddock's operator owns it through its app).
    let vms = vm_controller
        .owns(
            Api::<VirtualMachineInstance>::all(client.clone()),
            watcher::Config::default(),
        )
        .watches(
            Api::<DataVolume>::all(client.clone()),
            watcher::Config::default(),
            move |data_volume: DataVolume| {
                let name = data_volume.name_any();
                let namespace = data_volume.namespace();
                vm_store
                    .state()
                    .into_iter()
                    .filter(|vm| vm.namespace() == namespace && volume_claims(vm).contains(&name))
                    .map(|vm| ObjectRef::from_obj(&*vm))
                    .collect::<Vec<_>>()
            },
        )
        .run(reconcile_vm, retry_on_error, context.clone());
    let vmis = Controller::new(
        Api::<VirtualMachineInstance>::all(client),
        watcher::Config::default(),
    )
    .run(reconcile_vmi, retry_on_error, context);
    tokio::select! {
        result = drive("virt-controller (virtualmachines)", vms) => result,
        result = drive("virt-controller (virtualmachineinstances)", vmis) => result,
    }
}

/// The DataVolume/PVC names the VM's volumes refer to.
fn volume_claims(vm: &VirtualMachine) -> Vec<String> {
    let template = serde_json::to_value(&vm.spec.template).unwrap_or(Value::Null);
    claim_names(template.pointer("/spec/volumes"))
}

/// The VM's run strategy, with the deprecated `running` mapped as KubeVirt does.
fn run_strategy(vm: &VirtualMachine) -> String {
    match (&vm.spec.run_strategy, vm.spec.running) {
        (Some(strategy), _) => strategy.clone(),
        (None, Some(true)) => "Always".to_owned(),
        _ => "Halted".to_owned(),
    }
}

fn vmi_phase(vmi: &VirtualMachineInstance) -> &str {
    vmi.status
        .as_ref()
        .and_then(|status| status.phase.as_deref())
        .unwrap_or("")
}

fn is_final(vmi: &VirtualMachineInstance) -> bool {
    matches!(vmi_phase(vmi), "Succeeded" | "Failed")
}

fn state_change_requests(vm: &VirtualMachine) -> Vec<Value> {
    vm.status
        .as_ref()
        .and_then(|status| status.state_change_requests.as_ref())
        .map(|requests| {
            requests
                .iter()
                .filter_map(|request| serde_json::to_value(request).ok())
                .collect()
        })
        .unwrap_or_default()
}

fn first_action(requests: &[Value]) -> Option<(&str, Option<&str>)> {
    let first = requests.first()?;
    Some((
        first.get("action")?.as_str()?,
        first.get("uid").and_then(Value::as_str),
    ))
}

fn has_stop_request_for(requests: &[Value], vmi: &VirtualMachineInstance) -> bool {
    matches!(first_action(requests), Some(("Stop", Some(uid))) if Some(uid) == vmi.metadata.uid.as_deref())
}

fn has_start_request(requests: &[Value]) -> bool {
    matches!(first_action(requests), Some(("Start", _)))
}

/// A stable firmware UUID for a VMI name. KubeVirt derives a name-based (SHA-1, version 5) UUID;
/// this one is name-based too but hashes with SHA-256, so the value differs from KubeVirt's.
fn firmware_uuid(name: &str) -> String {
    let digest = Sha256::digest(format!("paddock-simulated-firmware/{name}").as_bytes());
    let mut bytes = [0_u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x50;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// What the DataVolumes of the VM's volumes say.
#[derive(Debug, Default)]
struct DataVolumeState {
    /// Every template DataVolume has Succeeded (the VMI may start).
    templates_ready: bool,
    /// A referenced DataVolume is Failed or its importer stopped with an error.
    error: bool,
    /// A referenced DataVolume is still being populated.
    provisioning: bool,
}

async fn sync_data_volumes(vm: &VirtualMachine, client: &Client) -> Result<DataVolumeState, ReconcileError> {
    let namespace = vm.namespace().unwrap_or_default();
    let api = Api::<DataVolume>::namespaced(client.clone(), &namespace);
    let mut state = DataVolumeState {
        templates_ready: true,
        ..DataVolumeState::default()
    };
    for template in vm.spec.data_volume_templates.iter().flatten() {
        let Some(name) = template
            .metadata
            .as_ref()
            .and_then(|metadata| metadata.name.clone())
        else {
            continue;
        };
        match api.get_opt(&name).await? {
            Some(data_volume) => {
                let phase = data_volume
                    .status
                    .as_ref()
                    .and_then(|status| status.phase.as_deref());
                if phase != Some("Succeeded") {
                    state.templates_ready = false;
                }
            }
            None => {
                state.templates_ready = false;
                let metadata = template.metadata.clone().unwrap_or_default();
                let data_volume = json!({
                    "apiVersion": "cdi.kubevirt.io/v1beta1",
                    "kind": "DataVolume",
                    "metadata": {
                        "name": name,
                        "namespace": namespace,
                        "labels": metadata.labels,
                        "annotations": metadata.annotations,
                        "ownerReferences": [controller_reference(vm)],
                    },
                    "spec": template.spec,
                });
                let data_volume: DataVolume = serde_json::from_value(data_volume).map_err(|error| {
                    ReconcileError::Other(format!("cannot build DataVolume {name}: {error}"))
                })?;
                match api.create(&PostParams::default(), &data_volume).await {
                    Ok(_) => tracing::info!(vm = %vm.name_any(), data_volume = %name, "created DataVolume"),
                    Err(kube::Error::Api(response)) if response.code == 409 => {}
                    Err(error) => return Err(error.into()),
                }
            }
        }
    }
    let volumes = vm
        .spec
        .template
        .spec
        .as_ref()
        .and_then(|spec| spec.volumes.as_ref())
        .cloned()
        .unwrap_or_default();
    for volume in volumes {
        let Some(reference) = volume.data_volume else {
            continue;
        };
        let Some(data_volume) = api.get_opt(&reference.name).await? else {
            continue;
        };
        let status = data_volume.status.clone().unwrap_or_default();
        let phase = status.phase.as_deref().unwrap_or("");
        let running_error = status.conditions.iter().flatten().any(|condition| {
            condition.r#type == "Running"
                && condition.status == "False"
                && matches!(condition.reason.as_deref(), Some("Error" | "ImagePullFailed"))
        });
        if phase == "Failed" || running_error {
            state.error = true;
        } else if !matches!(phase, "Succeeded" | "PendingPopulation" | "WaitForFirstConsumer") {
            state.provisioning = true;
        }
    }
    Ok(state)
}

async fn create_vmi(vm: &VirtualMachine, client: &Client, paused: bool) -> Result<(), ReconcileError> {
    let namespace = vm.namespace().unwrap_or_default();
    let template_metadata = vm.spec.template.metadata.clone().unwrap_or_default();
    let mut spec = serde_json::to_value(&vm.spec.template.spec)
        .map_err(|error| ReconcileError::Other(format!("cannot encode the VM template: {error}")))?;
    if spec.is_null() {
        spec = json!({ "domain": {} });
    }
    if spec
        .pointer("/domain/firmware/uuid")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
        && let Some(domain) = spec.get_mut("domain").and_then(Value::as_object_mut)
    {
        let firmware = domain.entry("firmware").or_insert_with(|| json!({}));
        if let Some(firmware) = firmware.as_object_mut() {
            firmware.insert("uuid".to_owned(), json!(firmware_uuid(&vm.name_any())));
        }
    }
    if paused && let Some(spec) = spec.as_object_mut() {
        spec.insert("startStrategy".to_owned(), json!("Paused"));
    }
    let mut annotations = template_metadata.annotations.clone().unwrap_or_default();
    annotations.insert(
        "kubevirt.io/vm-generation".to_owned(),
        vm.metadata.generation.unwrap_or_default().to_string(),
    );
    let vmi = json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {
            "name": vm.name_any(),
            "namespace": namespace,
            "labels": template_metadata.labels,
            "annotations": annotations,
            "ownerReferences": [controller_reference(vm)],
        },
        "spec": spec,
    });
    let vmi: VirtualMachineInstance = serde_json::from_value(vmi)
        .map_err(|error| ReconcileError::Other(format!("cannot build the VMI: {error}")))?;
    let api = Api::<VirtualMachineInstance>::namespaced(client.clone(), &namespace);
    match api.create(&PostParams::default(), &vmi).await {
        Ok(_) => {
            tracing::info!(vm = %vm.name_any(), namespace, "started the virtual machine (created its VMI)");
            Ok(())
        }
        Err(kube::Error::Api(response)) if response.code == 409 => Ok(()),
        Err(error) => Err(error.into()),
    }
}

async fn delete_vmi(vmi: &VirtualMachineInstance, client: &Client) -> Result<(), ReconcileError> {
    if vmi.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    let api = Api::<VirtualMachineInstance>::namespaced(client.clone(), &vmi.namespace().unwrap_or_default());
    match api.delete(&vmi.name_any(), &DeleteParams::default()).await {
        Ok(_) => {
            tracing::info!(vmi = %vmi.name_any(), "stopped the virtual machine (deleted its VMI)");
            Ok(())
        }
        Err(kube::Error::Api(response)) if response.code == 404 => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// What the run strategy asks for (`syncRunStrategy`).
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Nothing,
    Start,
    /// Delete the VMI; `restart_after` queues a start request (RerunOnFailure after a failure).
    Stop {
        restart_after: bool,
    },
    /// Halted with a start request: switch the VM to Always.
    SwitchToAlways,
}

fn decide(
    strategy: &str,
    vmi: Option<&VirtualMachineInstance>,
    requests: &[Value],
    status_strategy: Option<&str>,
    can_start: bool,
) -> Decision {
    let stop = Decision::Stop { restart_after: false };
    match (strategy, vmi) {
        ("Always", Some(vmi)) if has_stop_request_for(requests, vmi) || is_final(vmi) => stop,
        ("Always" | "Once", None) if can_start => Decision::Start,
        ("RerunOnFailure", Some(vmi))
            if vmi.metadata.deletion_timestamp.is_none()
                && (has_stop_request_for(requests, vmi) || is_final(vmi)) =>
        {
            Decision::Stop {
                restart_after: vmi_phase(vmi) == "Failed",
            }
        }
        ("RerunOnFailure", None)
            if can_start && (has_start_request(requests) || status_strategy != Some("RerunOnFailure")) =>
        {
            Decision::Start
        }
        ("Manual", Some(vmi)) if has_stop_request_for(requests, vmi) => stop,
        ("Manual", None) if can_start && has_start_request(requests) => Decision::Start,
        ("Halted", Some(_)) => stop,
        ("Halted", None) if has_start_request(requests) => Decision::SwitchToAlways,
        _ => Decision::Nothing,
    }
}

/// What the run strategy made this reconcile do.
#[derive(Debug, Default, PartialEq, Eq)]
enum Acted {
    #[default]
    Nothing,
    Started,
    Stopped,
}

async fn reconcile_vm(vm: Arc<VirtualMachine>, context: Arc<Context>) -> Result<Action, ReconcileError> {
    let client = &context.client;
    let namespace = vm.namespace().unwrap_or_default();
    let vms = Api::<VirtualMachine>::namespaced(client.clone(), &namespace);
    let vmi = Api::<VirtualMachineInstance>::namespaced(client.clone(), &namespace)
        .get_opt(&vm.name_any())
        .await?
        .filter(|vmi| is_controlled_by(vmi, vm.metadata.uid.as_deref()));
    let deleting = vm.metadata.deletion_timestamp.is_some();
    let data_volumes = if deleting {
        DataVolumeState::default()
    } else {
        sync_data_volumes(&vm, client).await?
    };
    let strategy = run_strategy(&vm);
    let mut requests = state_change_requests(&vm);
    let status_strategy = vm.status.as_ref().and_then(|status| status.run_strategy.clone());
    let mut acted = Acted::Nothing;
    let start_paused = requests
        .first()
        .and_then(|request| request.pointer("/data/paused"))
        .and_then(Value::as_str)
        == Some("true");
    let can_start = data_volumes.templates_ready;

    let decision = if deleting {
        Decision::Nothing
    } else {
        decide(
            &strategy,
            vmi.as_ref(),
            &requests,
            status_strategy.as_deref(),
            can_start,
        )
    };
    match decision {
        Decision::Nothing => {}
        Decision::Start => {
            create_vmi(&vm, client, start_paused && has_start_request(&requests)).await?;
            acted = Acted::Started;
        }
        Decision::Stop { restart_after } => {
            if let Some(vmi) = &vmi {
                delete_vmi(vmi, client).await?;
            }
            acted = Acted::Stopped;
            if restart_after {
                requests.push(json!({ "action": "Start" }));
            }
        }
        Decision::SwitchToAlways => {
            let field = if vm.spec.run_strategy.is_some() {
                json!({ "spec": { "runStrategy": "Always" } })
            } else {
                json!({ "spec": { "running": true } })
            };
            vms.patch(
                &vm.name_any(),
                &crate::conditions::patch_params(),
                &kube::api::Patch::Merge(field),
            )
            .await?;
        }
    }

    // Re-read the VMI when this reconcile changed it, so the status reflects the new state.
    let vmi = if acted == Acted::Nothing {
        vmi
    } else {
        Api::<VirtualMachineInstance>::namespaced(client.clone(), &namespace)
            .get_opt(&vm.name_any())
            .await?
            .filter(|vmi| is_controlled_by(vmi, vm.metadata.uid.as_deref()))
    };

    // Trim the first state change request once acted upon (isTrimFirstChangeRequestNeeded).
    let original_requests = state_change_requests(&vm);
    if let Some((action, uid)) = first_action(&requests) {
        let trim = match action {
            "Stop" => match &vmi {
                None => true,
                Some(vmi) => uid.is_none() || uid != vmi.metadata.uid.as_deref(),
            },
            "Start" => vmi
                .as_ref()
                .is_some_and(|vmi| vmi.metadata.deletion_timestamp.is_none() && !is_final(vmi)),
            _ => false,
        };
        if trim {
            requests.remove(0);
        }
    }

    let created = vmi.is_some();
    let vmi_conditions = vmi
        .as_ref()
        .map(|vmi| conditions_of(&vmi.status.as_ref().and_then(|status| status.conditions.clone())))
        .unwrap_or_default();
    let ready = has_true(&vmi_conditions, "Ready");
    let mut conditions = conditions_of(&vm.status.as_ref().and_then(|status| status.conditions.clone()));
    match vmi_conditions
        .iter()
        .find(|condition| condition.get("type").and_then(Value::as_str) == Some("Ready"))
    {
        None if vmi.is_none() => set_condition(
            &mut conditions,
            condition("Ready", false, "VMINotExists", "VMI does not exist"),
        ),
        None => set_condition(
            &mut conditions,
            condition(
                "Ready",
                false,
                "VMIConditionMissing",
                "VMI is missing the Ready condition",
            ),
        ),
        Some(ready) => set_condition(&mut conditions, ready.clone()),
    }
    // Copy the VMI's other conditions; drop copied ones the VMI no longer has.
    const NOT_SYNCED: [&str; 3] = ["Ready", "Failure", "RestartRequired"];
    conditions.retain(|condition| {
        let kind = condition.get("type").and_then(Value::as_str).unwrap_or("");
        NOT_SYNCED.contains(&kind)
            || vmi_conditions
                .iter()
                .any(|vmi_condition| vmi_condition.get("type").and_then(Value::as_str) == Some(kind))
    });
    for vmi_condition in &vmi_conditions {
        let kind = vmi_condition.get("type").and_then(Value::as_str).unwrap_or("");
        if !NOT_SYNCED.contains(&kind) {
            set_condition(&mut conditions, vmi_condition.clone());
        }
    }

    let printable = printable_status(&vm, vmi.as_ref(), &data_volumes, acted, &vmi_conditions);
    let mut status = json!({
        "created": created,
        "ready": ready,
        "printableStatus": printable,
        "conditions": conditions,
    });
    if status_strategy.is_some() || created {
        status["runStrategy"] = json!(strategy);
    }
    if requests != original_requests {
        status["stateChangeRequests"] = if requests.is_empty() {
            Value::Null
        } else {
            json!(requests)
        };
    }
    let current = vm
        .status
        .as_ref()
        .and_then(|status| serde_json::to_value(status).ok())
        .unwrap_or_default();
    let changed = status
        .as_object()
        .into_iter()
        .flatten()
        .any(|(key, value)| current.get(key).unwrap_or(&Value::Null) != value);
    if changed && requests != original_requests {
        // virt-api appends state change requests concurrently: like virt-controller's UpdateStatus,
        // write the trimmed list only over the version it was computed from (409 → reconcile again).
        vms.patch_status(
            &vm.name_any(),
            &crate::conditions::patch_params(),
            &kube::api::Patch::Merge(json!({
                "metadata": { "resourceVersion": vm.metadata.resource_version },
                "status": status,
            })),
        )
        .await?;
    } else if changed {
        patch_status(&vms, &vm.name_any(), status).await?;
    }
    Ok(Action::requeue(Duration::from_secs(60)))
}

/// `printableStatus`, first match wins in KubeVirt's order.
fn printable_status(
    vm: &VirtualMachine,
    vmi: Option<&VirtualMachineInstance>,
    data_volumes: &DataVolumeState,
    acted: Acted,
    vmi_conditions: &[Value],
) -> &'static str {
    let phase = vmi.map(vmi_phase).unwrap_or("");
    let vmi_final = vmi.is_some_and(is_final);
    if vm.metadata.deletion_timestamp.is_some() {
        return "Terminating";
    }
    if let Some(vmi) = vmi
        && !vmi_final
        && (vmi.metadata.deletion_timestamp.is_some() || acted == Acted::Stopped)
    {
        return "Stopping";
    }
    let migrating = vmi
        .and_then(|vmi| vmi.status.as_ref())
        .and_then(|status| status.migration_state.as_ref())
        .is_some_and(|state| state.start_timestamp.is_some() && state.end_timestamp.is_none());
    if migrating {
        return "Migrating";
    }
    let paused = has_true(vmi_conditions, "Paused");
    if phase == "Running" {
        return if paused { "Paused" } else { "Running" };
    }
    let pvc_not_found = vmi_conditions.iter().any(|condition| {
        condition.get("type").and_then(Value::as_str) == Some("Synchronized")
            && condition.get("status").and_then(Value::as_str) == Some("False")
            && condition.get("reason").and_then(Value::as_str) == Some("FailedPvcNotFound")
    });
    if pvc_not_found {
        return "ErrorPvcNotFound";
    }
    if data_volumes.error {
        return "DataVolumeError";
    }
    if data_volumes.provisioning {
        return "Provisioning";
    }
    match vmi {
        None if acted == Acted::Started => return "Starting",
        Some(_) if matches!(phase, "" | "Pending" | "Scheduling" | "Scheduled") => return "Starting",
        _ => {}
    }
    if vmi_final || vmi.is_none() {
        return "Stopped";
    }
    "Unknown"
}

/// Whether the VMI's DataVolume and PVC volumes can be used.
enum VolumesReady {
    Yes,
    /// A DataVolume exists but has not Succeeded yet.
    Waiting,
    /// A volume's claim does not exist (KubeVirt's `FailedPvcNotFound` message).
    Missing(String),
}

/// Checks the VMI's claim volumes as virt-controller's VMI controller does before it creates the
/// launcher pod. There are no PVCs here: a DataVolume of the claim's name stands for the PVC.
async fn volumes_ready(
    vmi: &VirtualMachineInstance,
    client: &Client,
) -> Result<VolumesReady, ReconcileError> {
    let namespace = vmi.namespace().unwrap_or_default();
    let api = Api::<DataVolume>::namespaced(client.clone(), &namespace);
    let spec = serde_json::to_value(&vmi.spec).unwrap_or_default();
    for claim in claim_names(spec.get("volumes")) {
        match api.get_opt(&claim).await? {
            None => {
                return Ok(VolumesReady::Missing(format!(
                    "PVC {namespace}/{claim} does not exist, waiting for it to appear"
                )));
            }
            Some(data_volume) => {
                let phase = data_volume.status.and_then(|status| status.phase);
                if phase.as_deref() != Some("Succeeded") {
                    return Ok(VolumesReady::Waiting);
                }
            }
        }
    }
    Ok(VolumesReady::Yes)
}

/// Walks a VMI through Pending → Scheduling → Scheduled → Running.
async fn reconcile_vmi(
    vmi: Arc<VirtualMachineInstance>,
    context: Arc<Context>,
) -> Result<Action, ReconcileError> {
    if vmi.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let api = Api::<VirtualMachineInstance>::namespaced(
        context.client.clone(),
        &vmi.namespace().unwrap_or_default(),
    );
    let status = vmi.status.clone().unwrap_or_default();
    let mut conditions = conditions_of(&status.conditions);
    let mut transitions: Vec<Value> = status
        .phase_transition_timestamps
        .iter()
        .flatten()
        .filter_map(|transition| serde_json::to_value(transition).ok())
        .collect();
    if status.phase.as_deref() == Some("Pending") {
        match volumes_ready(&vmi, &context.client).await? {
            VolumesReady::Yes => {
                let before = conditions.len();
                conditions.retain(|condition| {
                    condition.get("type").and_then(Value::as_str) != Some("Synchronized")
                });
                if conditions.len() != before {
                    patch_status_in_place(&api, &vmi.name_any(), json!({ "conditions": conditions })).await?;
                }
            }
            VolumesReady::Waiting => return Ok(Action::requeue(Duration::from_secs(1))),
            VolumesReady::Missing(message) => {
                set_condition(
                    &mut conditions,
                    condition("Synchronized", false, "FailedPvcNotFound", &message),
                );
                patch_status_in_place(&api, &vmi.name_any(), json!({ "conditions": conditions })).await?;
                return Ok(Action::requeue(Duration::from_secs(2)));
            }
        }
    }
    let next = match status.phase.as_deref().unwrap_or("") {
        "" => "Pending",
        "Pending" => "Scheduling",
        "Scheduling" => "Scheduled",
        "Scheduled" => "Running",
        _ => return Ok(Action::await_change()),
    };
    transitions.push(json!({ "phase": next, "phaseTransitionTimestamp": now() }));
    let mut patch = json!({ "phase": next, "phaseTransitionTimestamps": transitions });
    match next {
        "Scheduling" => {
            set_condition(&mut conditions, condition("PodScheduled", true, "", ""));
            set_condition(
                &mut conditions,
                condition(
                    "Ready",
                    false,
                    "GuestNotRunning",
                    "Guest VM is not reported as running",
                ),
            );
        }
        "Scheduled" => {
            patch["nodeName"] = json!(SIMULATED_NODE_NAME);
        }
        "Running" => {
            patch["nodeName"] = json!(SIMULATED_NODE_NAME);
            set_condition(&mut conditions, condition("Ready", true, "", ""));
            set_condition(&mut conditions, condition("LiveMigratable", true, "", ""));
            if vmi.spec.start_strategy.as_deref() == Some("Paused") {
                set_condition(
                    &mut conditions,
                    condition("Paused", true, "PausedByUser", "VMI was paused by user"),
                );
            }
        }
        _ => {}
    }
    if !conditions.is_empty() {
        patch["conditions"] = json!(conditions);
    }
    patch_status_in_place(&api, &vmi.name_any(), patch).await?;
    Ok(Action::requeue(PHASE_STEP))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

    use super::*;

    fn vmi(phase: &str, uid: &str) -> VirtualMachineInstance {
        serde_json::from_value(json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {"name": "vm", "uid": uid},
            "spec": {"domain": {"devices": {}}},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    #[test]
    fn run_strategies_decide_like_sync_run_strategy() {
        let running = vmi("Running", "a");
        let failed = vmi("Failed", "a");
        let succeeded = vmi("Succeeded", "a");
        let none: &[Value] = &[];
        let start = [json!({"action": "Start"})];
        let stop_a = [json!({"action": "Stop", "uid": "a"})];
        let stop_b = [json!({"action": "Stop", "uid": "b"})];
        let stop = Decision::Stop { restart_after: false };

        assert_eq!(decide("Always", None, none, None, true), Decision::Start);
        assert_eq!(
            decide("Always", None, none, None, false),
            Decision::Nothing,
            "waits for DataVolumes"
        );
        assert_eq!(
            decide("Always", Some(&running), none, None, true),
            Decision::Nothing
        );
        assert_eq!(
            decide("Always", Some(&running), &stop_a, None, true),
            stop,
            "restart"
        );
        assert_eq!(
            decide("Always", Some(&running), &stop_b, None, true),
            Decision::Nothing
        );
        assert_eq!(decide("Always", Some(&succeeded), none, None, true), stop);

        assert_eq!(decide("Halted", Some(&running), none, None, true), stop);
        assert_eq!(decide("Halted", None, none, None, true), Decision::Nothing);
        assert_eq!(
            decide("Halted", None, &start, None, true),
            Decision::SwitchToAlways
        );

        assert_eq!(decide("Manual", None, none, None, true), Decision::Nothing);
        assert_eq!(decide("Manual", None, &start, None, true), Decision::Start);
        assert_eq!(decide("Manual", Some(&running), &stop_a, None, true), stop);

        assert_eq!(decide("Once", None, none, Some("Once"), true), Decision::Start);
        assert_eq!(
            decide("Once", Some(&succeeded), none, Some("Once"), true),
            Decision::Nothing
        );

        assert_eq!(
            decide(
                "RerunOnFailure",
                Some(&failed),
                none,
                Some("RerunOnFailure"),
                true
            ),
            Decision::Stop { restart_after: true }
        );
        assert_eq!(
            decide(
                "RerunOnFailure",
                Some(&succeeded),
                none,
                Some("RerunOnFailure"),
                true
            ),
            stop
        );
        assert_eq!(
            decide("RerunOnFailure", None, none, Some("RerunOnFailure"), true),
            Decision::Nothing
        );
        assert_eq!(
            decide("RerunOnFailure", None, none, Some("Halted"), true),
            Decision::Start
        );
        assert_eq!(
            decide("RerunOnFailure", None, &start, Some("RerunOnFailure"), true),
            Decision::Start
        );
    }

    #[test]
    fn firmware_uuids_are_stable_version_5_shaped_and_name_specific() {
        let uuid = firmware_uuid("debian");
        assert_eq!(uuid, firmware_uuid("debian"));
        assert_ne!(uuid, firmware_uuid("debian-clone"));
        let groups: Vec<&str> = uuid.split('-').collect();
        assert_eq!(
            groups.iter().map(|group| group.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(groups[2].starts_with('5'));
        assert!(matches!(groups[3].chars().next(), Some('8' | '9' | 'a' | 'b')));
    }
}
