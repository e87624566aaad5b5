//! Validations, as pure functions on the object's JSON: `Ok(())` admits, `Err(message)` denies with
//! a message that says what to change.
//!
//! - [`app`]: [`paddock_api::validation::validate`], the rules the CRD's CEL cannot express (image
//!   references, cron schedules, SSH keys, …), all violations at once.
//! - [`host_volumes`]: the host-volume policy. A KubeVirt `hostDisk` volume is a file on the node's
//!   filesystem (KubeVirt's hostPath): a VM using one reads and writes the node directly. A
//!   `persistentVolumeClaim` bound to a hostPath PersistentVolume is not visible here; restrict
//!   those with StorageClasses and PersistentVolume RBAC.
//!
//! Neither blocks objects on their way out: an object being deleted is admitted, and on UPDATE an
//! unchanged spec (or, for host volumes, a volume the object already had) is admitted, so turning the
//! policy on or tightening validation never traps existing objects (finalizers can still be removed).

use serde_json::Value;

fn being_deleted(object: &Value) -> bool {
    object
        .pointer("/metadata/deletionTimestamp")
        .is_some_and(|timestamp| !timestamp.is_null())
}

/// Validates a VirtualMachineApp; `old` is the stored object on UPDATE.
pub fn app(object: &Value, old: Option<&Value>) -> Result<(), String> {
    if being_deleted(object) {
        return Ok(());
    }
    if let Some(old) = old
        && old.get("spec") == object.get("spec")
    {
        return Ok(());
    }
    let app: paddock_api::app::VirtualMachineApp = serde_json::from_value(object.clone()).map_err(|error| {
        format!("cannot read the VirtualMachineApp: {error}; check the spec against `kubectl explain virtualmachineapp.spec`")
    })?;
    paddock_api::validation::validate(&app).map_err(|invalid| invalid.to_string())
}

/// The volume kinds the policy denies.
pub const HOST_VOLUME_KINDS: [&str; 1] = ["hostDisk"];

/// Where a kind keeps its VM volumes.
fn volumes_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "VirtualMachine" | "VirtualMachineInstanceReplicaSet" => Some("/spec/template/spec/volumes"),
        "VirtualMachineInstance" => Some("/spec/volumes"),
        "VirtualMachinePool" => Some("/spec/virtualMachineTemplate/spec/template/spec/volumes"),
        _ => None,
    }
}

/// Denies host-level volumes in a KubeVirt object of `kind` that `old` (on UPDATE) did not have.
/// `scope` finishes the message's first sentence, e.g. "in namespace x".
pub fn host_volumes(kind: &str, object: &Value, old: Option<&Value>, scope: &str) -> Result<(), String> {
    if being_deleted(object) {
        return Ok(());
    }
    let Some(pointer) = volumes_pointer(kind) else {
        return Ok(());
    };
    let Some(volumes) = object.pointer(pointer).and_then(Value::as_array) else {
        return Ok(());
    };
    let existing = old.and_then(|old| old.pointer(pointer)).and_then(Value::as_array);
    let field = pointer.trim_start_matches('/').replace('/', ".");
    let mut offending = Vec::new();
    for (index, volume) in volumes.iter().enumerate() {
        for host_kind in HOST_VOLUME_KINDS {
            let Some(source) = volume.get(host_kind) else {
                continue;
            };
            if existing.is_some_and(|existing| existing.contains(volume)) {
                continue;
            }
            let name = volume.get("name").and_then(Value::as_str).unwrap_or("");
            let path = source.get("path").and_then(Value::as_str).unwrap_or("");
            offending.push(format!(
                "{field}[{index}] (\"{name}\") is a {host_kind} at '{path}'"
            ));
        }
    }
    if offending.is_empty() {
        return Ok(());
    }
    Err(format!(
        "host-level volumes are not allowed {scope}: {}; store the data in a DataVolume or a persistentVolumeClaim instead",
        offending.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn invalid_apps_are_denied_with_every_violation() {
        let object = json!({"apiVersion": "paddock.dev/v1alpha1", "kind": "VirtualMachineApp",
            "metadata": {"name": "debian"},
            "spec": {"image": {"containerDisk": "Not A Reference"}, "snapshots": {"schedule": "99 * * * *"}}});
        let message = app(&object, None).unwrap_err();
        assert!(message.contains("spec.image.containerDisk"), "{message}");
        assert!(message.contains("spec.snapshots.schedule"), "{message}");
        assert!(message.contains("spec.disk.size"), "{message}");
    }

    #[test]
    fn unchanged_or_deleted_apps_are_admitted() {
        let object = json!({"metadata": {"name": "x"}, "spec": {"image": {}}});
        assert!(app(&object, None).is_err());
        assert_eq!(app(&object, Some(&object)), Ok(()));
        let mut deleted = object.clone();
        deleted["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        assert_eq!(app(&deleted, None), Ok(()));
    }

    #[test]
    fn host_disks_are_denied_unless_already_there() {
        let vm = json!({"spec": {"template": {"spec": {"volumes": [
            {"name": "root", "dataVolume": {"name": "root"}},
            {"name": "data", "hostDisk": {"path": "/var/lib/data.img", "type": "DiskOrCreate"}},
        ]}}}});
        let message = host_volumes("VirtualMachine", &vm, None, "in namespace a").unwrap_err();
        assert!(
            message.contains("spec.template.spec.volumes[1] (\"data\") is a hostDisk at '/var/lib/data.img'"),
            "{message}"
        );
        assert_eq!(host_volumes("VirtualMachine", &vm, Some(&vm), "here"), Ok(()));
        let vmi = json!({"spec": {"volumes": [{"name": "d", "hostDisk": {"path": "/x"}}]}});
        assert!(host_volumes("VirtualMachineInstance", &vmi, None, "here").is_err());
        assert_eq!(host_volumes("DataVolume", &vmi, None, "here"), Ok(()));
    }
}
