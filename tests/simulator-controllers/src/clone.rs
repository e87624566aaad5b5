//! Simulated KubeVirt clone controller (`clone.kubevirt.io/v1beta1` VirtualMachineClone).
//!
//! Contract (after KubeVirt v1.9's `pkg/virt-controller/watch/clone`): for a VirtualMachine source, a
//! VirtualMachineSnapshot `tmp-snapshot-<clone uid>` is created (phase SnapshotInProgress); once ready,
//! a VirtualMachineRestore `tmp-restore-<clone uid>` targets the new VM (`spec.target.name`, or
//! `<source>-clone-<5 random characters>`) with KubeVirt's patches: every interface's `macAddress`
//! replaced by `newMacAddresses[<interface>]` or emptied, the firmware `uuid` emptied (a new one is
//! derived from the new name when the VM starts), the firmware `serial` replaced by `newSMBiosSerial`
//! or emptied, labels/annotations removed as the filters say, then `spec.patches` (phase
//! RestoreInProgress). When the restore is complete the target VM exists (phase CreatingTargetVM, then
//! Succeeded with `Ready` True `Ready` / `Progressing` False `Ready`), and the temporary snapshot and
//! restore are deleted. A VirtualMachineSnapshot source is restored directly.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use paddock_api::kubevirt::virtualmachine::VirtualMachine;
use paddock_api::kubevirt::virtualmachineclone::VirtualMachineClone;
use paddock_api::kubevirt::virtualmachinerestore::VirtualMachineRestore;
use paddock_api::kubevirt::virtualmachinesnapshot::VirtualMachineSnapshot;
use serde_json::{Value, json};

use crate::Error;
use crate::conditions::{
    ReconcileError, controller_reference, drive, now, patch_status, random_string, retry_on_error,
    set_progressing_and_ready,
};

struct Context {
    client: Client,
}

/// Runs the clone controller until its watch ends.
pub(crate) async fn run(client: Client) -> Result<(), Error> {
    let controller = Controller::new(
        Api::<VirtualMachineClone>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<VirtualMachineSnapshot>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<VirtualMachineRestore>::all(client.clone()),
        watcher::Config::default(),
    )
    .run(reconcile, retry_on_error, Arc::new(Context { client }));
    drive("clone controller", controller).await
}

fn random_suffix() -> Result<String, ReconcileError> {
    // Kubernetes' rand.String alphabet: no vowels, no confusable digits.
    random_string(b"bcdfghjklmnpqrstvwxz2456789", 5)
}

/// Whether a label/annotation key survives KubeVirt's filters: `None` (no filters) keeps everything;
/// otherwise a key is kept when a filter matches it and no `!`-filter does. Filters are unanchored
/// regular expressions, `*` alone means every key (as in KubeVirt's `addRemovePatchesFromFilter`); a
/// filter that does not compile matches nothing.
fn kept(key: &str, filters: Option<&[String]>) -> bool {
    let Some(filters) = filters else { return true };
    let matches = |filter: &str| {
        let pattern = if filter == "*" { ".*" } else { filter };
        regex::Regex::new(pattern).is_ok_and(|regex| regex.is_match(key))
    };
    let included = filters
        .iter()
        .filter(|filter| !filter.starts_with('!'))
        .any(|filter| matches(filter));
    let excluded = filters
        .iter()
        .filter_map(|filter| filter.strip_prefix('!'))
        .any(matches);
    included && !excluded
}

fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// KubeVirt's clone patches for `vm`, then the user's.
fn clone_patches(vm: &VirtualMachine, clone: &Value) -> Vec<String> {
    let vm_value = serde_json::to_value(vm).unwrap_or_default();
    let spec = clone.get("spec").cloned().unwrap_or_default();
    let mut patches: Vec<Value> = Vec::new();
    let interfaces = vm_value
        .pointer("/spec/template/spec/domain/devices/interfaces")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (index, interface) in interfaces.iter().enumerate() {
        let name = interface.get("name").and_then(Value::as_str).unwrap_or("");
        let new_mac = spec
            .pointer(&format!("/newMacAddresses/{}", escape_pointer(name)))
            .and_then(Value::as_str)
            .unwrap_or("");
        patches.push(json!({
            "op": "add",
            "path": format!("/spec/template/spec/domain/devices/interfaces/{index}/macAddress"),
            "value": new_mac,
        }));
    }
    if vm_value.pointer("/spec/template/spec/domain/firmware").is_some() {
        let new_serial = spec.get("newSMBiosSerial").and_then(Value::as_str).unwrap_or("");
        patches.push(json!({
            "op": "add",
            "path": "/spec/template/spec/domain/firmware/serial",
            "value": new_serial,
        }));
        patches.push(json!({ "op": "add", "path": "/spec/template/spec/domain/firmware/uuid", "value": "" }));
    }
    let filters = |pointer: &str| -> Option<Vec<String>> {
        spec.pointer(pointer)
            .and_then(|filters| serde_json::from_value(filters.clone()).ok())
    };
    for (map_pointer, filter_pointer) in [
        ("/metadata/labels", "/labelFilters"),
        ("/metadata/annotations", "/annotationFilters"),
        ("/spec/template/metadata/labels", "/template/labelFilters"),
        (
            "/spec/template/metadata/annotations",
            "/template/annotationFilters",
        ),
    ] {
        let filters = filters(filter_pointer);
        let keys = vm_value
            .pointer(map_pointer)
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .map(|(key, _)| key)
            // The restore marker must survive (KubeVirt drops it from the annotation filtering).
            .filter(|key| key.as_str() != "restore.kubevirt.io/lastRestoreUID");
        for key in keys {
            if !kept(key, filters.as_deref()) {
                patches.push(
                    json!({ "op": "remove", "path": format!("{map_pointer}/{}", escape_pointer(key)) }),
                );
            }
        }
    }
    let mut patches: Vec<String> = patches.iter().map(Value::to_string).collect();
    patches.extend(filters("/patches").unwrap_or_default());
    patches
}

async fn reconcile(clone: Arc<VirtualMachineClone>, context: Arc<Context>) -> Result<Action, ReconcileError> {
    if clone.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let clone_value = serde_json::to_value(&*clone).unwrap_or_default();
    let status = clone_value.get("status").cloned().unwrap_or_default();
    let phase = status
        .get("phase")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if matches!(phase.as_str(), "Succeeded" | "Failed") {
        return Ok(Action::await_change());
    }
    let namespace = clone.namespace().unwrap_or_default();
    let name = clone.name_any();
    let uid = clone.uid().unwrap_or_default();
    let clones = Api::<VirtualMachineClone>::namespaced(context.client.clone(), &namespace);
    let snapshots = Api::<VirtualMachineSnapshot>::namespaced(context.client.clone(), &namespace);
    let restores = Api::<VirtualMachineRestore>::namespaced(context.client.clone(), &namespace);
    let vms = Api::<VirtualMachine>::namespaced(context.client.clone(), &namespace);
    let mut conditions: Vec<Value> = status
        .get("conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let source_kind = clone_value
        .pointer("/spec/source/kind")
        .and_then(Value::as_str)
        .unwrap_or("");
    let source_name = clone_value
        .pointer("/spec/source/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();

    let pending = |reason: String| {
        let mut conditions = conditions.clone();
        set_progressing_and_ready(&mut conditions, false, "Pending", false, &reason);
        json!({ "conditions": conditions })
    };

    // The VM the clone copies (from the source VM or the source snapshot's content).
    let (source_vm, snapshot_name, temporary_snapshot) = match source_kind {
        "VirtualMachine" => {
            let Some(vm) = vms.get_opt(&source_name).await? else {
                patch_status(
                    &clones,
                    &name,
                    pending(format!("Source VM {source_name} does not exist")),
                )
                .await?;
                return Ok(Action::requeue(Duration::from_secs(2)));
            };
            (vm, format!("tmp-snapshot-{uid}"), true)
        }
        "VirtualMachineSnapshot" => {
            let Some(snapshot) = snapshots.get_opt(&source_name).await? else {
                patch_status(
                    &clones,
                    &name,
                    pending(format!("Source snapshot {source_name} does not exist")),
                )
                .await?;
                return Ok(Action::requeue(Duration::from_secs(2)));
            };
            let content_name = snapshot
                .status
                .as_ref()
                .and_then(|status| status.virtual_machine_snapshot_content_name.clone())
                .unwrap_or_default();
            let content = crate::snapshot::snapshot_contents(&context.client, &namespace)
                .get_opt(&content_name)
                .await?;
            let vm = content
                .and_then(|content| content.data.pointer("/spec/source/virtualMachine").cloned())
                .and_then(|mut vm| {
                    vm["apiVersion"] = json!("kubevirt.io/v1");
                    vm["kind"] = json!("VirtualMachine");
                    serde_json::from_value::<VirtualMachine>(vm).ok()
                });
            let Some(vm) = vm else {
                patch_status(
                    &clones,
                    &name,
                    pending(format!("Source snapshot {source_name} is not ready")),
                )
                .await?;
                return Ok(Action::requeue(Duration::from_secs(2)));
            };
            (vm, source_name.clone(), false)
        }
        other => {
            set_progressing_and_ready(
                &mut conditions,
                false,
                "Failed",
                false,
                &format!("source kind {other} is not supported"),
            );
            patch_status(
                &clones,
                &name,
                json!({ "phase": "Failed", "conditions": conditions }),
            )
            .await?;
            return Ok(Action::await_change());
        }
    };

    set_progressing_and_ready(
        &mut conditions,
        true,
        "Still processing",
        false,
        "Still processing",
    );

    if phase.is_empty() || phase == "SnapshotInProgress" {
        if temporary_snapshot && snapshots.get_opt(&snapshot_name).await?.is_none() {
            let snapshot: VirtualMachineSnapshot = serde_json::from_value(json!({
                "apiVersion": "snapshot.kubevirt.io/v1beta1",
                "kind": "VirtualMachineSnapshot",
                "metadata": {
                    "name": snapshot_name,
                    "namespace": namespace,
                    "ownerReferences": [controller_reference(&*clone)],
                },
                "spec": { "source": { "apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": source_name } },
            }))
            .map_err(|error| ReconcileError::Other(format!("cannot build the snapshot: {error}")))?;
            match snapshots.create(&PostParams::default(), &snapshot).await {
                Ok(_) => {}
                Err(kube::Error::Api(response)) if response.code == 409 => {}
                Err(error) => return Err(error.into()),
            }
        }
        let ready = snapshots
            .get_opt(&snapshot_name)
            .await?
            .and_then(|snapshot| snapshot.status)
            .and_then(|status| status.ready_to_use)
            == Some(true);
        let mut patch = json!({
            "phase": if ready { "RestoreInProgress" } else { "SnapshotInProgress" },
            "snapshotName": snapshot_name,
            "conditions": conditions,
        });
        if phase.is_empty() {
            patch["creationTime"] = json!(now());
        }
        patch_status(&clones, &name, patch).await?;
        return Ok(Action::requeue(Duration::from_millis(300)));
    }

    let restore_name = format!("tmp-restore-{uid}");
    if phase == "RestoreInProgress" {
        let restore = match restores.get_opt(&restore_name).await? {
            Some(restore) => restore,
            None => {
                let target_name = match clone_value.pointer("/spec/target/name").and_then(Value::as_str) {
                    Some(target) if !target.is_empty() => target.to_owned(),
                    _ => format!("{}-clone-{}", source_vm.name_any(), random_suffix()?),
                };
                let restore: VirtualMachineRestore = serde_json::from_value(json!({
                    "apiVersion": "snapshot.kubevirt.io/v1beta1",
                    "kind": "VirtualMachineRestore",
                    "metadata": {
                        "name": restore_name,
                        "namespace": namespace,
                        "ownerReferences": [controller_reference(&*clone)],
                    },
                    "spec": {
                        "target": { "apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": target_name },
                        "virtualMachineSnapshotName": snapshot_name,
                        "patches": clone_patches(&source_vm, &clone_value),
                    },
                }))
                .map_err(|error| ReconcileError::Other(format!("cannot build the restore: {error}")))?;
                restores.create(&PostParams::default(), &restore).await?
            }
        };
        let complete = restore.status.as_ref().and_then(|status| status.complete) == Some(true);
        let patch = json!({
            "phase": if complete { "CreatingTargetVM" } else { "RestoreInProgress" },
            "restoreName": restore_name,
            "conditions": conditions,
        });
        patch_status(&clones, &name, patch).await?;
        return Ok(Action::requeue(Duration::from_millis(300)));
    }

    // CreatingTargetVM: the restore made the VM; confirm it exists, then clean up.
    let target_name = restores
        .get_opt(&restore_name)
        .await?
        .map(|restore| restore.spec.target.name)
        .or_else(|| {
            status
                .get("targetName")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_default();
    if vms.get_opt(&target_name).await?.is_none() {
        patch_status(
            &clones,
            &name,
            json!({ "targetName": target_name, "conditions": conditions }),
        )
        .await?;
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    set_progressing_and_ready(&mut conditions, false, "Ready", true, "Ready");
    patch_status(
        &clones,
        &name,
        json!({
            "phase": "Succeeded",
            "targetName": target_name,
            "snapshotName": null,
            "restoreName": null,
            "conditions": conditions,
        }),
    )
    .await?;
    for result in [
        restores
            .delete(&restore_name, &DeleteParams::default())
            .await
            .map(|_| ()),
        if temporary_snapshot {
            snapshots
                .delete(&snapshot_name, &DeleteParams::default())
                .await
                .map(|_| ())
        } else {
            Ok(())
        },
    ] {
        match result {
            Ok(()) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => tracing::warn!(%error, clone = %name, "cannot delete a temporary clone object"),
        }
    }
    tracing::info!(clone = %name, target = %target_name, namespace, "clone succeeded");
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

    use super::*;

    #[test]
    fn filters_are_regular_expressions_and_negations_win() {
        let filters = |list: &[&str]| list.iter().map(|filter| (*filter).to_owned()).collect::<Vec<_>>();
        assert!(kept("app", None));
        assert!(!kept("app", Some(&filters(&[]))));
        assert!(kept("app", Some(&filters(&["*"]))));
        assert!(!kept("app", Some(&filters(&["!app", "*"]))));
        assert!(kept("example.com/app", Some(&filters(&["example.com/.*"]))));
        assert!(!kept("team", Some(&filters(&["^app$"]))));
        assert!(
            !kept("app", Some(&filters(&["("]))),
            "an invalid filter matches nothing"
        );
    }

    #[test]
    fn patches_renew_macs_firmware_identity_and_apply_with_json_patch() {
        let vm: VirtualMachine = serde_json::from_value(json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "metadata": {"name": "source", "labels": {"app": "a", "drop": "me"}},
            "spec": {"template": {"spec": {"domain": {
                "devices": {"interfaces": [{"name": "default", "macAddress": "02:00:00:00:00:01"}, {"name": "second"}]},
                "firmware": {"uuid": "5d307ca9-b3ef-428c-8861-06e72d69f223", "serial": "s"},
            }}}},
        }))
        .unwrap();
        let clone = json!({"spec": {
            "newMacAddresses": {"default": "02:00:00:00:00:99"},
            "labelFilters": ["*", "!drop"],
            "patches": [r#"{"op": "add", "path": "/metadata/labels/cloned", "value": "yes"}"#],
        }});
        let patches = clone_patches(&vm, &clone);
        let operations: Vec<json_patch::PatchOperation> = patches
            .iter()
            .map(|patch| serde_json::from_str(patch).unwrap())
            .collect();
        let mut document = serde_json::to_value(&vm).unwrap();
        json_patch::patch(&mut document, &operations).unwrap();
        let domain = &document["spec"]["template"]["spec"]["domain"];
        assert_eq!(
            domain["devices"]["interfaces"][0]["macAddress"],
            "02:00:00:00:00:99"
        );
        assert_eq!(domain["devices"]["interfaces"][1]["macAddress"], "");
        assert_eq!(domain["firmware"]["uuid"], "");
        assert_eq!(domain["firmware"]["serial"], "");
        assert_eq!(
            document["metadata"]["labels"],
            json!({"app": "a", "cloned": "yes"})
        );
    }
}
