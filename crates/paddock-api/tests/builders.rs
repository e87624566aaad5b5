//! Golden tests for the pure builders: each scenario is an inline VirtualMachineApp plus cluster facts;
//! the objects `desired()` returns are compared with `tests/golden/<scenario>.yaml` and validated
//! against the real KubeVirt v1.9.0 and CDI v1.66.0 CRD schemas in `../shared/schemas/` (types,
//! enums, required fields, patterns, and fields the API server would prune).
//!
//! After an intended change to the builders, regenerate with `PADDOCK_UPDATE_GOLDEN=1 cargo test` and
//! review the diff.

// Test helpers outside #[test] functions may fail loudly too; clippy's in-test allowance does not reach them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use kube::CustomResourceExt;
use paddock_api::{
    app::VirtualMachineApp,
    baffles::BafflesApplication,
    builders::{ClusterFacts, Desired, ZarfRegistry, desired},
};
use paddock_tests::{paths, schema::StructuralSchema};
use pretty_assertions::assert_eq;
use serde_json::Value;

fn app(yaml: &str) -> VirtualMachineApp {
    serde_yaml::from_str(yaml).expect("scenario YAML is a VirtualMachineApp")
}

fn plain_cluster() -> ClusterFacts {
    ClusterFacts {
        zarf: None,
        baffles_installed: true,
        console_gateway_url: "wss://paddock.example.com/".to_owned(),
        default_storage_class: None,
    }
}

fn zarf_cluster() -> ClusterFacts {
    ClusterFacts {
        zarf: Some(ZarfRegistry {
            address: "127.0.0.1:31999".to_owned(),
        }),
        default_storage_class: Some("local-path".to_owned()),
        ..plain_cluster()
    }
}

const METADATA: &str = "
apiVersion: paddock.dev/v1alpha1
kind: VirtualMachineApp
metadata:
  name: debian
  namespace: vms
  uid: 0d5c8a3e-6d8e-4c55-9a55-0c8f3b1e2a11
";

fn scenarios() -> Vec<(&'static str, VirtualMachineApp, ClusterFacts)> {
    vec![
        (
            "containerdisk-persistent",
            app(&format!(
                "{METADATA}
spec:
  displayName: Debian 12 workstation
  image: {{containerDisk: 'registry.example.com/vms/debian:12', persistent: true}}
  resources: {{cpu: 2, memory: 4Gi}}
  disk: {{size: 20Gi, storageClass: fast}}
  firmware: {{type: uefi, secureBoot: true}}
  cloudInit:
    userData: |
      #cloud-config
      hostname: debian
    sshKeys: ['ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG8m6V3xq alice@laptop']
  runStrategy: Always
  console: {{vnc: true, serial: true, baffles: {{enabled: true, category: vm}}}}
"
            )),
            plain_cluster(),
        ),
        (
            "containerdisk-zarf",
            app(&format!(
                "{METADATA}
spec:
  image: {{containerDisk: 'debian:12', persistent: true}}
  disk: {{size: 10Gi}}
  runStrategy: Halted
  console: {{vnc: true, serial: true, baffles: {{enabled: true, displayName: Debian, category: servers}}}}
"
            )),
            zarf_cluster(),
        ),
        (
            "containerdisk-ephemeral",
            app(&format!(
                "{METADATA}
spec:
  image: {{containerDisk: 'quay.io/containerdisks/fedora:40', persistent: false}}
  firmware: {{type: bios}}
  runStrategy: Manual
  console: {{vnc: false, serial: true, baffles: {{enabled: true, category: vm}}}}
"
            )),
            plain_cluster(),
        ),
        (
            "http-instancetype",
            app(&format!(
                "{METADATA}
spec:
  image:
    http: {{url: 'https://images.example.com/debian.qcow2', checksum: 'sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef'}}
    persistent: true
  resources:
    instancetype: {{name: u1.medium}}
    preference: {{name: debian, scope: namespaced}}
  disk: {{size: 30Gi}}
  cloudInit: {{userDataSecretRef: debian-userdata, networkData: 'version: 2'}}
  runStrategy: RerunOnFailure
  console: {{vnc: true, serial: false, baffles: {{enabled: false, category: vm}}}}
"
            )),
            plain_cluster(),
        ),
        (
            "datasource-clone",
            app(&format!(
                "{METADATA}
spec:
  image: {{dataSource: {{name: fedora, namespace: golden-images}}, persistent: true}}
  runStrategy: Once
  console: {{vnc: true, serial: true, baffles: {{enabled: true, category: vm}}}}
"
            )),
            ClusterFacts { baffles_installed: false, ..plain_cluster() },
        ),
        (
            "pvc-ephemeral",
            app(&format!(
                "{METADATA}
spec:
  image: {{pvc: {{name: base-disk}}, persistent: false}}
  resources: {{cpu: 1, memory: 512Mi}}
  runStrategy: Always
  console: {{vnc: true, serial: true, baffles: {{enabled: true, category: vm}}}}
"
            )),
            plain_cluster(),
        ),
        (
            "preference-digest",
            app(&format!(
                "{METADATA}
spec:
  image: {{containerDisk: 'quay.io/containerdisks/fedora:40@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef'}}
  resources: {{cpu: 4, memory: 8Gi, preference: {{name: fedora}}}}
  disk: {{size: 20Gi}}
  runStrategy: Always
  console: {{vnc: true, serial: true, baffles: {{enabled: true, category: vm}}}}
"
            )),
            plain_cluster(),
        ),
        (
            "upload",
            app(&format!(
                "{METADATA}
spec:
  image: {{upload: {{}}, persistent: true}}
  disk: {{size: 8Gi}}
  cloudInit: {{sshKeys: ['ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 bob@desk']}}
  runStrategy: Always
  console: {{vnc: true, serial: true, baffles: {{enabled: true, category: vm}}}}
"
            )),
            zarf_cluster(),
        ),
    ]
}

fn to_documents(desired: &Desired) -> Vec<Value> {
    desired.to_json().unwrap()
}

fn golden_path(scenario: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{scenario}.yaml"))
}

#[test]
fn builders_match_golden_files() {
    let update = std::env::var_os("PADDOCK_UPDATE_GOLDEN").is_some();
    for (scenario, app, facts) in scenarios() {
        let desired = desired(&app, &facts).unwrap_or_else(|error| panic!("{scenario}: {error}"));
        let rendered = to_documents(&desired)
            .iter()
            .map(|document| serde_yaml::to_string(document).unwrap())
            .collect::<Vec<_>>()
            .join("---\n");
        let path = golden_path(scenario);
        if update {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &rendered).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|error| {
            panic!(
                "{scenario}: cannot read {}: {error}; run with PADDOCK_UPDATE_GOLDEN=1 to create it",
                path.display()
            )
        });
        assert_eq!(rendered, expected, "{scenario} differs from its golden file");
    }
}

#[test]
fn builders_are_deterministic() {
    for (scenario, app, facts) in scenarios() {
        assert_eq!(
            desired(&app, &facts).unwrap(),
            desired(&app, &facts).unwrap(),
            "{scenario}"
        );
    }
}

struct Schemas {
    virtual_machine: StructuralSchema,
    data_volume: StructuralSchema,
    baffles: StructuralSchema,
}

fn schemas() -> Schemas {
    let schemas = paths::schemas_dir();
    let baffles_crd = serde_json::to_value(BafflesApplication::crd()).unwrap();
    Schemas {
        virtual_machine: StructuralSchema::from_crd_file(
            &schemas.join("kubevirt-v1.9.0-crds/virtualmachines.kubevirt.io.yaml"),
            "v1",
        )
        .unwrap(),
        data_volume: StructuralSchema::from_crd_file(
            &schemas.join("cdi-v1.66.0-crds/datavolume.yaml"),
            "v1beta1",
        )
        .unwrap(),
        baffles: StructuralSchema::from_crd_value(&baffles_crd, "v1").unwrap(),
    }
}

#[test]
fn every_emitted_object_validates_against_the_real_schemas() {
    let schemas = schemas();
    for (scenario, app, facts) in scenarios() {
        let desired = desired(&app, &facts).unwrap();
        let mut checked = Vec::new();
        if let Some(data_volume) = &desired.data_volume {
            let value = serde_json::to_value(data_volume).unwrap();
            assert_eq!(value["apiVersion"], "cdi.kubevirt.io/v1beta1");
            assert_eq!(
                schemas.data_volume.violations(&value),
                Vec::<String>::new(),
                "{scenario}: DataVolume"
            );
            checked.push("DataVolume");
        }
        let value = serde_json::to_value(&desired.virtual_machine).unwrap();
        assert_eq!(value["apiVersion"], "kubevirt.io/v1");
        assert_eq!(
            schemas.virtual_machine.violations(&value),
            Vec::<String>::new(),
            "{scenario}: VirtualMachine"
        );
        checked.push("VirtualMachine");
        if let Some(baffles) = &desired.baffles_application {
            let value = serde_json::to_value(baffles).unwrap();
            assert_eq!(
                schemas.baffles.violations(&value),
                Vec::<String>::new(),
                "{scenario}: BafflesApplication"
            );
            checked.push("BafflesApplication");
        }
        assert!(!checked.is_empty());
    }
}

#[test]
fn the_schema_check_catches_what_the_api_server_would_refuse() {
    // Guards the guard: a builder bug of each kind must not slip through the check above.
    let schemas = schemas();
    let (_, app, facts) = scenarios().remove(0);
    let mut value = serde_json::to_value(desired(&app, &facts).unwrap().virtual_machine).unwrap();
    value["spec"]["runStrategy"] = "Sometimes".into();
    value["spec"]["template"]["spec"]["domain"]["cpu"]["cores"] = "many".into();
    value["spec"]["template"]["spec"]["domain"]["devcies"] = serde_json::json!({});
    let violations = schemas.virtual_machine.violations(&value).join("\n");
    assert!(
        violations.contains("spec.template.spec.domain.cpu.cores: expected type integer"),
        "{violations}"
    );
    assert!(
        violations.contains("spec.template.spec.domain.devcies: unknown field"),
        "{violations}"
    );
    // KubeVirt's runStrategy is a free string in the CRD (virt-api's webhook checks it), so it is the
    // builders' own enum that guarantees a valid value.
    assert!(!violations.contains("runStrategy"), "{violations}");
}

#[test]
fn owned_children_point_at_the_app_and_carry_paddock_labels() {
    for (scenario, app, facts) in scenarios() {
        for document in to_documents(&desired(&app, &facts).unwrap()) {
            let owner = &document["metadata"]["ownerReferences"][0];
            assert_eq!(owner["kind"], "VirtualMachineApp", "{scenario}");
            assert_eq!(owner["apiVersion"], "paddock.dev/v1alpha1", "{scenario}");
            assert_eq!(owner["uid"], "0d5c8a3e-6d8e-4c55-9a55-0c8f3b1e2a11", "{scenario}");
            assert_eq!(owner["controller"], true, "{scenario}");
            assert_eq!(
                document["metadata"]["labels"]["app.kubernetes.io/managed-by"], "paddock",
                "{scenario}"
            );
            assert_eq!(document["metadata"]["namespace"], "vms", "{scenario}");
        }
    }
}

#[test]
fn the_vm_never_uses_the_deprecated_running_field() {
    for (scenario, app, facts) in scenarios() {
        let value = serde_json::to_value(desired(&app, &facts).unwrap().virtual_machine).unwrap();
        assert!(value["spec"].get("running").is_none(), "{scenario}");
        assert_eq!(
            value["spec"]["runStrategy"],
            serde_json::to_value(app.spec.run_strategy).unwrap(),
            "{scenario}"
        );
    }
}

#[test]
fn baffles_urls_lead_to_the_kubevirt_vnc_subresource() {
    let (_, app, facts) = scenarios().remove(0);
    let baffles = desired(&app, &facts).unwrap().baffles_application.unwrap();
    assert_eq!(
        baffles.spec.url,
        "wss://paddock.example.com/k8s/apis/subresources.kubevirt.io/v1/namespaces/vms/virtualmachineinstances/debian/vnc"
    );
    assert_eq!(baffles.spec.display_name, "Debian 12 workstation");
}

#[test]
fn zarf_switches_registry_imports_to_node_pulls_and_leaves_the_url() {
    let (_, app, _) = scenarios().remove(1);
    let with_zarf = desired(&app, &zarf_cluster()).unwrap().data_volume.unwrap();
    let without = desired(&app, &plain_cluster()).unwrap().data_volume.unwrap();
    let registry =
        |dv: &paddock_api::cdi::datavolume::DataVolume| dv.spec.source.clone().unwrap().registry.unwrap();
    assert_eq!(registry(&with_zarf).pull_method.as_deref(), Some("node"));
    assert_eq!(registry(&without).pull_method, None);
    assert_eq!(registry(&with_zarf).url, registry(&without).url);
    assert_eq!(
        registry(&with_zarf).url.as_deref(),
        Some("docker://docker.io/library/debian:12")
    );
}

#[test]
fn an_app_without_uid_is_refused() {
    let (_, mut app, facts) = scenarios().remove(0);
    app.metadata.uid = None;
    let error = desired(&app, &facts).unwrap_err().to_string();
    assert!(error.contains("no uid"), "{error}");
}

#[test]
fn digest_references_import_without_their_tag() {
    let (_, app, facts) = scenarios()
        .into_iter()
        .find(|(name, _, _)| *name == "preference-digest")
        .unwrap();
    let data_volume = desired(&app, &facts).unwrap().data_volume.unwrap();
    let url = data_volume.spec.source.unwrap().registry.unwrap().url.unwrap();
    assert_eq!(
        url,
        "docker://quay.io/containerdisks/fedora@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    );
}

#[test]
fn a_preference_without_instancetype_gets_sockets_and_imports_bind_immediately() {
    let (_, app, facts) = scenarios()
        .into_iter()
        .find(|(name, _, _)| *name == "preference-digest")
        .unwrap();
    let desired = desired(&app, &facts).unwrap();
    let cpu = desired
        .virtual_machine
        .spec
        .template
        .spec
        .unwrap()
        .domain
        .cpu
        .unwrap();
    assert_eq!((cpu.sockets, cpu.cores), (Some(4), None));
    let annotations = desired.data_volume.unwrap().metadata.annotations.unwrap();
    assert_eq!(
        annotations
            .get("cdi.kubevirt.io/storage.bind.immediate.requested")
            .map(String::as_str),
        Some("true")
    );
}
