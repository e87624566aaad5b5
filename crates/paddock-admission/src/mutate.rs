//! Mutations, as pure functions on the object's JSON. The JSON patch in the AdmissionReview response
//! is the difference between the object before and after (see [`crate::review`]).
//!
//! VirtualMachineApp defaults ([`app_defaults`]): only what the CRD's structural schema cannot
//! default, because it depends on other fields. The schema already defaults `runStrategy`,
//! `image.persistent`, `console.*`, `firmware.type`, reference `scope` and `snapshots.keep`; this
//! module adds:
//! - `spec.displayName` ← `metadata.name` when empty, so consoles and Baffles show a name;
//! - without an instancetype, `spec.resources.cpu` ← 1 and `spec.resources.memory` ← `1Gi` where
//!   missing (the sizes paddock's builders use), so the object shows the machine it will get. The
//!   fields defaulted are listed in the annotation [`DEFAULTED_ANNOTATION`]; when a later update sets
//!   an instancetype, those defaulted values are removed again (otherwise the CRD rule "instancetype
//!   or cpu/memory, not both" would reject an update the user never made invalid).
//!
//! On UPDATE nothing changes unless the spec did: metadata-only writes (finalizers, labels) leave
//! existing objects alone.
//!
//! Zarf registry rules ([`registry_source`]): while Zarf is installed, a CDI `registry` source with a
//! `docker://` URL gets `pullMethod: node`, the choice paddock's builders make (see
//! `paddock_api::builders`): CDI then runs the image as the importer pod's container, the Zarf agent
//! rewrites that pod's image to the Zarf registry like any other pod's and the kubelet pulls it with
//! Zarf's own pull secret. Rewriting the URL instead would need paddock to copy Zarf's registry
//! credentials into every namespace as a `secretRef` Secret and keep them in sync. A source already
//! set to `node`, or pointing at the Zarf registry with its own `secretRef`, is left alone; so are
//! `imageStream` and `oci-archive://` sources. containerDisk volumes of VMs are not touched: they
//! become containers of the virt-launcher pod, which the Zarf agent rewrites itself.

use serde_json::{Map, Value, json};

/// The annotation listing the VirtualMachineApp fields this webhook defaulted (comma-separated
/// `resources.cpu`, `resources.memory`).
pub const DEFAULTED_ANNOTATION: &str = "paddock.dev/defaulted";

const DEFAULTED_CPU: &str = "resources.cpu";
const DEFAULTED_MEMORY: &str = "resources.memory";

fn is_blank(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) => true,
        Some(Value::String(text)) => text.trim().is_empty(),
        Some(_) => false,
    }
}

fn object_at<'a>(object: &'a mut Map<String, Value>, key: &str) -> Option<&'a mut Map<String, Value>> {
    let entry = object
        .entry(key.to_owned())
        .or_insert_with(|| Value::Object(Map::new()));
    if entry.is_null() {
        *entry = Value::Object(Map::new());
    }
    entry.as_object_mut()
}

fn defaulted_fields(app: &Value) -> Vec<String> {
    app.pointer("/metadata/annotations")
        .and_then(|annotations| annotations.get(DEFAULTED_ANNOTATION))
        .and_then(Value::as_str)
        .map(|list| {
            list.split(',')
                .map(str::trim)
                .filter(|field| !field.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn set_defaulted_fields(app: &mut Value, fields: &[String]) {
    let Some(root) = app.as_object_mut() else { return };
    let Some(metadata) = object_at(root, "metadata") else {
        return;
    };
    if fields.is_empty() {
        if let Some(annotations) = metadata.get_mut("annotations").and_then(Value::as_object_mut) {
            annotations.remove(DEFAULTED_ANNOTATION);
        }
        return;
    }
    if let Some(annotations) = object_at(metadata, "annotations") {
        annotations.insert(DEFAULTED_ANNOTATION.to_owned(), Value::String(fields.join(",")));
    }
}

/// Applies the VirtualMachineApp defaults to `app` (the request's object); `old` is the stored object
/// on UPDATE.
pub fn app_defaults(app: &mut Value, old: Option<&Value>) {
    if let Some(old) = old
        && old.get("spec") == app.get("spec")
    {
        return;
    }
    let name = app
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|name| !name.is_empty())
        .map(str::to_owned);
    let mut defaulted = defaulted_fields(app);
    let before = defaulted.clone();
    let Some(spec) = app.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    if let Some(name) = name
        && is_blank(spec.get("displayName"))
    {
        spec.insert("displayName".to_owned(), Value::String(name));
    }
    let has_instancetype = !is_blank(
        spec.get("resources")
            .and_then(|resources| resources.get("instancetype")),
    );
    if has_instancetype {
        // Take back what this webhook added, as long as the user has not changed it since.
        if let Some(resources) = spec.get_mut("resources").and_then(Value::as_object_mut) {
            for (field, key, default) in [
                (
                    DEFAULTED_CPU,
                    "cpu",
                    json!(paddock_api::builders::DEFAULT_CPU_CORES),
                ),
                (
                    DEFAULTED_MEMORY,
                    "memory",
                    json!(paddock_api::builders::DEFAULT_MEMORY),
                ),
            ] {
                if defaulted.iter().any(|entry| entry == field) {
                    if resources.get(key) == Some(&default) {
                        resources.remove(key);
                    }
                    defaulted.retain(|entry| entry != field);
                }
            }
        }
    } else if let Some(resources) = object_at(spec, "resources") {
        if is_blank(resources.get("cpu")) {
            resources.insert("cpu".to_owned(), json!(paddock_api::builders::DEFAULT_CPU_CORES));
            defaulted.push(DEFAULTED_CPU.to_owned());
        }
        if is_blank(resources.get("memory")) {
            resources.insert("memory".to_owned(), json!(paddock_api::builders::DEFAULT_MEMORY));
            defaulted.push(DEFAULTED_MEMORY.to_owned());
        }
    }
    if defaulted != before {
        set_defaulted_fields(app, &defaulted);
    }
}

/// The host (and port) of a `docker://` URL.
fn registry_host(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("docker://")?;
    let (first, remainder) = rest.split_once('/')?;
    // Without a dot, colon or "localhost" the first component is a path (docker.io is implied).
    (!remainder.is_empty() && (first.contains('.') || first.contains(':') || first == "localhost"))
        .then_some(first)
}

/// Applies the Zarf registry rule to one CDI `registry` source object. Returns whether it changed.
pub fn registry_source(registry: &mut Value, zarf_registry: Option<&str>) -> bool {
    let Some(registry) = registry.as_object_mut() else {
        return false;
    };
    let Some(url) = registry.get("url").and_then(Value::as_str) else {
        return false;
    };
    if !url.starts_with("docker://") {
        return false;
    }
    if registry.get("pullMethod").and_then(Value::as_str) == Some("node") {
        return false;
    }
    let points_at_zarf = zarf_registry.is_some_and(|address| registry_host(url) == Some(address));
    if points_at_zarf && !is_blank(registry.get("secretRef")) {
        return false;
    }
    registry.insert("pullMethod".to_owned(), Value::String("node".to_owned()));
    true
}

/// Applies the Zarf registry rule to a DataVolume.
pub fn data_volume(object: &mut Value, zarf_registry: Option<&str>) {
    if let Some(registry) = object.pointer_mut("/spec/source/registry") {
        registry_source(registry, zarf_registry);
    }
}

/// Applies the Zarf registry rule to every `dataVolumeTemplates` entry of a VirtualMachine.
pub fn virtual_machine(object: &mut Value, zarf_registry: Option<&str>) {
    let Some(templates) = object
        .pointer_mut("/spec/dataVolumeTemplates")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    for template in templates {
        if let Some(registry) = template.pointer_mut("/spec/source/registry") {
            registry_source(registry, zarf_registry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(spec: Value) -> Value {
        json!({"apiVersion": "paddock.dev/v1alpha1", "kind": "VirtualMachineApp", "metadata": {"name": "debian"}, "spec": spec})
    }

    #[test]
    fn defaults_what_the_schema_cannot() {
        let mut object = app(json!({"image": {"containerDisk": "quay.io/containerdisks/debian:12"}}));
        app_defaults(&mut object, None);
        assert_eq!(object["spec"]["displayName"], "debian");
        assert_eq!(object["spec"]["resources"], json!({"cpu": 1, "memory": "1Gi"}));
        assert_eq!(
            object["metadata"]["annotations"][DEFAULTED_ANNOTATION],
            "resources.cpu,resources.memory"
        );
        let once = object.clone();
        app_defaults(&mut object, None);
        assert_eq!(object, once, "defaults are idempotent");
    }

    #[test]
    fn keeps_what_the_user_set() {
        let mut object = app(json!({"displayName": "Mine", "image": {}, "resources": {"cpu": 4}}));
        app_defaults(&mut object, None);
        assert_eq!(object["spec"]["displayName"], "Mine");
        assert_eq!(object["spec"]["resources"], json!({"cpu": 4, "memory": "1Gi"}));
        assert_eq!(
            object["metadata"]["annotations"][DEFAULTED_ANNOTATION],
            "resources.memory"
        );
    }

    #[test]
    fn an_instancetype_gets_no_cpu_or_memory_and_takes_back_defaulted_ones() {
        let mut object = app(json!({"image": {}, "resources": {"instancetype": {"name": "u1.medium"}}}));
        app_defaults(&mut object, None);
        assert_eq!(
            object["spec"]["resources"],
            json!({"instancetype": {"name": "u1.medium"}})
        );

        let mut defaulted = app(json!({"image": {}}));
        app_defaults(&mut defaulted, None);
        let old = defaulted.clone();
        defaulted["spec"]["resources"]["instancetype"] = json!({"name": "u1.large"});
        app_defaults(&mut defaulted, Some(&old));
        assert_eq!(
            defaulted["spec"]["resources"],
            json!({"instancetype": {"name": "u1.large"}})
        );
        assert!(
            defaulted["metadata"]["annotations"]
                .get(DEFAULTED_ANNOTATION)
                .is_none()
        );
    }

    #[test]
    fn metadata_only_updates_change_nothing() {
        let old = app(json!({"image": {}}));
        let mut new = old.clone();
        new["metadata"]["finalizers"] = json!(["paddock.dev/cleanup"]);
        let before = new.clone();
        app_defaults(&mut new, Some(&old));
        assert_eq!(new, before);
    }

    #[test]
    fn registry_sources_pull_through_the_node() {
        let zarf = Some("127.0.0.1:31999");
        for (source, changed) in [
            (json!({"url": "docker://quay.io/containerdisks/debian:12"}), true),
            (json!({"url": "docker://quay.io/x:1", "pullMethod": "pod"}), true),
            (
                json!({"url": "docker://quay.io/x:1", "pullMethod": "node"}),
                false,
            ),
            (
                json!({"url": "docker://127.0.0.1:31999/x:1", "secretRef": "zarf-pull"}),
                false,
            ),
            (json!({"url": "docker://127.0.0.1:31999/x:1"}), true),
            (json!({"url": "oci-archive:///disk.tar"}), false),
            (json!({"imageStream": "fedora"}), false),
            (json!("not an object"), false),
        ] {
            let mut mutated = source.clone();
            assert_eq!(registry_source(&mut mutated, zarf), changed, "{source}");
            if changed {
                assert_eq!(mutated["pullMethod"], "node");
            } else {
                assert_eq!(mutated, source);
            }
        }
    }

    #[test]
    fn virtual_machine_templates_follow_the_rule() {
        let mut vm = json!({"spec": {"dataVolumeTemplates": [
            {"spec": {"source": {"registry": {"url": "docker://quay.io/a:1"}}}},
            {"spec": {"source": {"http": {"url": "https://example.com/disk.qcow2"}}}},
        ]}});
        virtual_machine(&mut vm, None);
        assert_eq!(
            vm["spec"]["dataVolumeTemplates"][0]["spec"]["source"]["registry"]["pullMethod"],
            "node"
        );
        assert!(
            vm["spec"]["dataVolumeTemplates"][1]["spec"]["source"]["http"]
                .get("pullMethod")
                .is_none()
        );
    }
}
