//! Simulated KubeVirt snapshot and restore controllers (`snapshot.kubevirt.io/v1beta1`).
//!
//! Contract (after KubeVirt v1.9's `pkg/storage/snapshot/{snapshot,restore}.go`):
//! - VirtualMachineSnapshot of a VirtualMachine: phase InProgress (`Progressing` True), then a
//!   VirtualMachineSnapshotContent `vmsnapshot-content-<snapshot uid>` holding the VM's metadata and spec
//!   (`spec.source.virtualMachine`) and one `volumeBackups` entry per DataVolume/PVC volume, content
//!   `status.readyToUse` true and `creationTime`; then the snapshot is Succeeded with `readyToUse`,
//!   `creationTime`, `sourceUID`, `virtualMachineSnapshotContentName`, `snapshotVolumes`, `indications`
//!   (`Online` and `NoGuestAgent` when the VM runs, `Paused` when paused) and `Ready` True
//!   (`Ready`), `Progressing` False (`Operation complete`). A missing source leaves it InProgress with
//!   `Progressing` False `Source does not exist`. No volume data is copied: there are no PVCs and no
//!   VolumeSnapshots.
//! - VirtualMachineRestore: waits for the snapshot to be ready; a running target follows
//!   `targetReadinessPolicy` (StopTarget halts it, FailImmediate fails, WaitEventually waits,
//!   WaitGracePeriod — the default — waits up to 5 minutes, then fails); then the target VM's spec is
//!   replaced by the snapshot's (a missing target is created Halted, an existing one keeps its run
//!   strategy), annotated `restore.kubevirt.io/lastRestoreUID: <restore>-<uid>`, and the restore gets
//!   `complete` true, `restoreTime`, `Ready` True / `Progressing` False `Operation complete`.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, ApiResource, DynamicObject, Patch, PostParams};
use kube::core::GroupVersionKind;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use paddock_api::kubevirt::virtualmachine::VirtualMachine;
use paddock_api::kubevirt::virtualmachineinstance::VirtualMachineInstance;
use paddock_api::kubevirt::virtualmachinerestore::VirtualMachineRestore;
use paddock_api::kubevirt::virtualmachinesnapshot::VirtualMachineSnapshot;
use serde_json::{Value, json};

use crate::Error;
use crate::conditions::{
    ReconcileError, condition_without_message, conditions_of, controller_reference, drive, has_true, now,
    patch_status, retry_on_error, set_condition, set_progressing_and_ready,
};

struct Context {
    client: Client,
}

/// The snapshot `name` when it exists and is `readyToUse`.
pub(crate) async fn ready_snapshot(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<VirtualMachineSnapshot>, kube::Error> {
    let snapshot = Api::<VirtualMachineSnapshot>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await?;
    Ok(snapshot
        .filter(|snapshot| snapshot.status.as_ref().and_then(|status| status.ready_to_use) == Some(true)))
}

/// The VirtualMachineSnapshotContent API (no typed struct in paddock-api).
pub(crate) fn snapshot_contents(client: &Client, namespace: &str) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("snapshot.kubevirt.io", "v1beta1", "VirtualMachineSnapshotContent"),
        "virtualmachinesnapshotcontents",
    );
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// Runs the snapshot controller until its watch ends.
pub(crate) async fn run_snapshots(client: Client) -> Result<(), Error> {
    let controller = Controller::new(
        Api::<VirtualMachineSnapshot>::all(client.clone()),
        watcher::Config::default(),
    )
    .run(reconcile_snapshot, retry_on_error, Arc::new(Context { client }));
    drive("snapshot controller", controller).await
}

/// Runs the restore controller until its watch ends.
pub(crate) async fn run_restores(client: Client) -> Result<(), Error> {
    let controller = Controller::new(
        Api::<VirtualMachineRestore>::all(client.clone()),
        watcher::Config::default(),
    )
    .run(reconcile_restore, retry_on_error, Arc::new(Context { client }));
    drive("restore controller", controller).await
}

/// Names of the VM's volumes backed by a DataVolume or PVC, with their claim names.
fn claim_volumes(vm: &VirtualMachine) -> Vec<(String, String)> {
    let spec = serde_json::to_value(&vm.spec.template.spec).unwrap_or_default();
    spec.get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|volume| {
            let name = volume.get("name")?.as_str()?.to_owned();
            let claim = volume
                .pointer("/dataVolume/name")
                .or_else(|| volume.pointer("/persistentVolumeClaim/claimName"))?
                .as_str()?
                .to_owned();
            Some((name, claim))
        })
        .collect()
}

async fn reconcile_snapshot(
    snapshot: Arc<VirtualMachineSnapshot>,
    context: Arc<Context>,
) -> Result<Action, ReconcileError> {
    if snapshot.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let status = snapshot.status.clone().unwrap_or_default();
    if status.phase.as_deref() == Some("Succeeded") {
        return Ok(Action::await_change());
    }
    let namespace = snapshot.namespace().unwrap_or_default();
    let name = snapshot.name_any();
    let snapshots = Api::<VirtualMachineSnapshot>::namespaced(context.client.clone(), &namespace);
    let mut conditions = conditions_of(&status.conditions);
    let source = &snapshot.spec.source;
    let vm = if source.kind == "VirtualMachine" {
        Api::<VirtualMachine>::namespaced(context.client.clone(), &namespace)
            .get_opt(&source.name)
            .await?
    } else {
        None
    };
    let Some(vm) = vm else {
        set_progressing_and_ready(
            &mut conditions,
            false,
            "Source does not exist",
            false,
            "Not ready",
        );
        patch_status(
            &snapshots,
            &name,
            json!({ "phase": "InProgress", "readyToUse": false, "conditions": conditions }),
        )
        .await?;
        return Ok(Action::requeue(Duration::from_secs(2)));
    };
    if status.phase.is_none() {
        set_progressing_and_ready(
            &mut conditions,
            true,
            "Source locked and operation in progress",
            false,
            "Not ready",
        );
        patch_status(
            &snapshots,
            &name,
            json!({
                "phase": "InProgress",
                "readyToUse": false,
                "sourceUID": vm.metadata.uid,
                "conditions": conditions,
            }),
        )
        .await?;
        return Ok(Action::requeue(Duration::from_millis(200)));
    }

    let content_name = format!("vmsnapshot-content-{}", snapshot.uid().unwrap_or_default());
    let contents = snapshot_contents(&context.client, &namespace);
    let volumes = claim_volumes(&vm);
    let creation_time = now();
    if contents.get_opt(&content_name).await?.is_none() {
        let volume_backups: Vec<Value> = volumes
            .iter()
            .map(|(volume, claim)| {
                json!({
                    "volumeName": volume,
                    "persistentVolumeClaim": { "metadata": { "name": claim }, "spec": {} },
                    "volumeSnapshotName": format!("vmsnapshot-{}-volume-{volume}", snapshot.uid().unwrap_or_default()),
                })
            })
            .collect();
        let content: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "snapshot.kubevirt.io/v1beta1",
            "kind": "VirtualMachineSnapshotContent",
            "metadata": {
                "name": content_name,
                "namespace": namespace,
                "ownerReferences": [controller_reference(&*snapshot)],
            },
            "spec": {
                "virtualMachineSnapshotName": name,
                "source": { "virtualMachine": {
                    "metadata": {
                        "name": vm.name_any(),
                        "namespace": namespace,
                        "labels": vm.metadata.labels,
                        "annotations": vm.metadata.annotations,
                        "uid": vm.metadata.uid,
                        "generation": vm.metadata.generation,
                    },
                    "spec": vm.spec,
                }},
                "volumeBackups": volume_backups,
            },
        }))
        .map_err(|error| ReconcileError::Other(format!("cannot build the snapshot content: {error}")))?;
        match contents.create(&PostParams::default(), &content).await {
            Ok(_) => {}
            Err(kube::Error::Api(response)) if response.code == 409 => {}
            Err(error) => return Err(error.into()),
        }
        patch_status(
            &contents,
            &content_name,
            json!({ "readyToUse": true, "creationTime": creation_time }),
        )
        .await?;
    }

    let vmi = Api::<VirtualMachineInstance>::namespaced(context.client.clone(), &namespace)
        .get_opt(&vm.name_any())
        .await?;
    let mut indications: Vec<(&str, &str)> = Vec::new();
    if let Some(vmi) = &vmi {
        let vmi_conditions = conditions_of(&vmi.status.as_ref().and_then(|status| status.conditions.clone()));
        indications.push((
            "Online",
            "Snapshot taken while the VM was running. Consistency depends on guest-agent quiescing.",
        ));
        if has_true(&vmi_conditions, "Paused") {
            indications.push((
                "Paused",
                "Snapshot taken while the VM was paused. Snapshot is crash-consistent and may not be application-consistent.",
            ));
        } else {
            indications.push((
                "NoGuestAgent",
                "Guest agent was not available. Snapshot is crash-consistent and may not be application-consistent.",
            ));
        }
    }
    set_progressing_and_ready(&mut conditions, false, "Operation complete", true, "Ready");
    let mut status = json!({
        "phase": "Succeeded",
        "readyToUse": true,
        "creationTime": creation_time,
        "sourceUID": vm.metadata.uid,
        "virtualMachineSnapshotContentName": content_name,
        "snapshotVolumes": {
            "includedVolumes": volumes.iter().map(|(volume, _)| volume.clone()).collect::<Vec<_>>(),
        },
        "conditions": conditions,
    });
    if !indications.is_empty() {
        status["indications"] = json!(
            indications
                .iter()
                .map(|(indication, _)| *indication)
                .collect::<Vec<_>>()
        );
        status["sourceIndications"] = json!(
            indications
                .iter()
                .map(|(indication, message)| json!({ "indication": indication, "message": message }))
                .collect::<Vec<_>>()
        );
    }
    patch_status(&snapshots, &name, status).await?;
    tracing::info!(snapshot = %name, namespace, "snapshot succeeded");
    Ok(Action::await_change())
}

const GRACE_PERIOD: Duration = Duration::from_secs(5 * 60);

async fn reconcile_restore(
    restore: Arc<VirtualMachineRestore>,
    context: Arc<Context>,
) -> Result<Action, ReconcileError> {
    if restore.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let status = restore.status.clone().unwrap_or_default();
    if status.complete == Some(true) {
        return Ok(Action::await_change());
    }
    let namespace = restore.namespace().unwrap_or_default();
    let name = restore.name_any();
    let restores = Api::<VirtualMachineRestore>::namespaced(context.client.clone(), &namespace);
    let mut conditions = conditions_of(&status.conditions);
    if conditions
        .iter()
        .any(|condition| condition.get("type").and_then(Value::as_str) == Some("Failure"))
    {
        return Ok(Action::await_change());
    }
    let waiting = |conditions: &mut Vec<Value>, reason: &str| {
        set_progressing_and_ready(conditions, false, reason, false, reason);
    };
    let Some(snapshot) = ready_snapshot(
        &context.client,
        &namespace,
        &restore.spec.virtual_machine_snapshot_name,
    )
    .await?
    else {
        waiting(
            &mut conditions,
            &format!(
                "VirtualMachineSnapshot {} not ready",
                restore.spec.virtual_machine_snapshot_name
            ),
        );
        patch_status(
            &restores,
            &name,
            json!({ "complete": false, "conditions": conditions }),
        )
        .await?;
        return Ok(Action::requeue(Duration::from_secs(1)));
    };
    let content_name = snapshot
        .status
        .as_ref()
        .and_then(|status| status.virtual_machine_snapshot_content_name.clone())
        .unwrap_or_default();
    let content = snapshot_contents(&context.client, &namespace)
        .get(&content_name)
        .await?;
    let Some(source) = content.data.pointer("/spec/source/virtualMachine").cloned() else {
        return Err(ReconcileError::Other(format!(
            "snapshot content {content_name} has no virtualMachine source"
        )));
    };
    let target_name = restore.spec.target.name.clone();
    let vms = Api::<VirtualMachine>::namespaced(context.client.clone(), &namespace);
    let target = vms.get_opt(&target_name).await?;
    let vmi = Api::<VirtualMachineInstance>::namespaced(context.client.clone(), &namespace)
        .get_opt(&target_name)
        .await?;
    let restore_value = format!("{name}-{}", restore.uid().unwrap_or_default());
    let already_restored = target
        .as_ref()
        .is_some_and(|vm| vm.annotations().get("restore.kubevirt.io/lastRestoreUID") == Some(&restore_value));
    if vmi.is_some() && target.is_some() && !already_restored {
        let policy = restore
            .spec
            .target_readiness_policy
            .as_ref()
            .and_then(|policy| serde_json::to_value(policy).ok())
            .and_then(|policy| policy.as_str().map(str::to_owned))
            .unwrap_or_else(|| "WaitGracePeriod".to_owned());
        let age = restore
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|created| k8s_openapi::jiff::Timestamp::now().duration_since(created.0))
            .and_then(|age| Duration::try_from(age).ok())
            .unwrap_or_default();
        match policy.as_str() {
            "StopTarget" => {
                vms.patch(
                    &target_name,
                    &crate::conditions::patch_params(),
                    &Patch::Merge(json!({ "spec": { "runStrategy": "Halted", "running": null } })),
                )
                .await?;
                waiting(
                    &mut conditions,
                    "Automatically stopping restore target for restore operation",
                );
            }
            "FailImmediate" => {
                fail(
                    &mut conditions,
                    "Restore target VMI must be powered off before restore operation",
                );
            }
            "WaitEventually" => waiting(
                &mut conditions,
                "Waiting for target VM to be powered off. Please stop the restore target to proceed with restore",
            ),
            _ if age > GRACE_PERIOD => fail(&mut conditions, "Restore target failed to be ready within 5m0s"),
            _ => waiting(
                &mut conditions,
                "Waiting for target VM to be powered off. Please stop the restore target to proceed with restore, or the operation will fail after 5m0s",
            ),
        }
        patch_status(
            &restores,
            &name,
            json!({ "complete": false, "conditions": conditions }),
        )
        .await?;
        return Ok(Action::requeue(Duration::from_secs(1)));
    }

    if !already_restored {
        let mut spec = source.get("spec").cloned().unwrap_or_default();
        match &target {
            Some(vm) => {
                // An existing VM keeps its run strategy (or `running`) across the restore.
                if let Some(object) = spec.as_object_mut() {
                    if vm.spec.running.is_some() {
                        object.insert("running".to_owned(), json!(false));
                        object.remove("runStrategy");
                    } else {
                        object.insert(
                            "runStrategy".to_owned(),
                            json!(
                                vm.spec
                                    .run_strategy
                                    .clone()
                                    .unwrap_or_else(|| "Halted".to_owned())
                            ),
                        );
                        object.remove("running");
                    }
                }
                // A merge patch cannot remove fields absent from the snapshot; replace the spec.
                let mut replaced = serde_json::to_value(vm).map_err(|error| {
                    ReconcileError::Other(format!("cannot encode VM {target_name}: {error}"))
                })?;
                replaced["spec"] = spec;
                replaced["metadata"]["annotations"]["restore.kubevirt.io/lastRestoreUID"] =
                    json!(restore_value);
                if let Some(object) = replaced.as_object_mut() {
                    object.remove("status");
                }
                apply_patches(&mut replaced, restore.spec.patches.as_deref().unwrap_or_default())?;
                let replaced: VirtualMachine = serde_json::from_value(replaced).map_err(|error| {
                    ReconcileError::Other(format!("snapshot holds an unreadable VM spec: {error}"))
                })?;
                vms.replace(&target_name, &PostParams::default(), &replaced)
                    .await?;
            }
            None => {
                if let Some(object) = spec.as_object_mut() {
                    if object.contains_key("running") {
                        object.insert("running".to_owned(), json!(false));
                    } else {
                        object.insert("runStrategy".to_owned(), json!("Halted"));
                    }
                }
                let mut annotations = source
                    .pointer("/metadata/annotations")
                    .cloned()
                    .filter(Value::is_object)
                    .unwrap_or_else(|| json!({}));
                annotations["restore.kubevirt.io/lastRestoreUID"] = json!(restore_value);
                let mut vm = json!({
                    "apiVersion": "kubevirt.io/v1",
                    "kind": "VirtualMachine",
                    "metadata": {
                        "name": target_name,
                        "namespace": namespace,
                        "labels": source.pointer("/metadata/labels").cloned().unwrap_or_else(|| json!({})),
                        "annotations": annotations,
                    },
                    "spec": spec,
                });
                apply_patches(&mut vm, restore.spec.patches.as_deref().unwrap_or_default())?;
                let vm: VirtualMachine = serde_json::from_value(vm).map_err(|error| {
                    ReconcileError::Other(format!("snapshot holds an unreadable VM: {error}"))
                })?;
                vms.create(&PostParams::default(), &vm).await?;
            }
        }
        tracing::info!(restore = %name, target = %target_name, namespace, "restored the VM spec");
    }
    set_progressing_and_ready(
        &mut conditions,
        false,
        "Operation complete",
        true,
        "Operation complete",
    );
    patch_status(
        &restores,
        &name,
        json!({ "complete": true, "restoreTime": now(), "conditions": conditions }),
    )
    .await?;
    Ok(Action::await_change())
}

fn fail(conditions: &mut Vec<Value>, reason: &str) {
    set_progressing_and_ready(conditions, false, reason, false, reason);
    set_condition(conditions, condition_without_message("Failure", true, reason));
}

/// Applies a restore's `spec.patches` (JSON patch operations, one JSON object per string) to the VM.
fn apply_patches(vm: &mut Value, patches: &[String]) -> Result<(), ReconcileError> {
    let mut operations = Vec::new();
    for patch in patches {
        let operation: json_patch::PatchOperation = serde_json::from_str(patch).map_err(|error| {
            ReconcileError::Other(format!(
                "restore patch {patch} is not a JSON patch operation: {error}"
            ))
        })?;
        operations.push(operation);
    }
    json_patch::patch(vm, &operations)
        .map_err(|error| ReconcileError::Other(format!("cannot apply the restore patches: {error}")))
}
