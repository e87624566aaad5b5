//! The VirtualMachineApp CRD as the API server sees it: defaults, structural checks and the CEL rules
//! (`x-kubernetes-validations`, evaluated with kube's CEL engine, the same Kubernetes CEL libraries the
//! API server uses), and the same rules in `paddock_api::validation` with their messages. Each bad spec
//! is refused by both, with a message that names the field.

// Test helpers outside #[test] functions may fail loudly too; clippy's in-test allowance does not reach them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kube::{CustomResourceExt, core::cel::Validator};
use paddock_api::{app::VirtualMachineApp, validation::validate};
use paddock_tests::schema::StructuralSchema;
use serde_json::{Value, json};

fn crd_schema() -> StructuralSchema {
    StructuralSchema::from_crd_value(
        &serde_json::to_value(VirtualMachineApp::crd()).unwrap(),
        "v1alpha1",
    )
    .unwrap()
}

fn object(spec: Value) -> Value {
    json!({
        "apiVersion": "paddock.dev/v1alpha1",
        "kind": "VirtualMachineApp",
        "metadata": {"name": "web", "namespace": "vms", "uid": "6b1c1f33-0000-4000-8000-000000000001"},
        "spec": spec,
    })
}

/// The API server's verdict: structural errors plus CEL rule failures, after defaulting.
fn api_server_errors(mut value: Value) -> Vec<String> {
    let schema = crd_schema();
    schema.apply_defaults(&mut value);
    let mut errors = schema.violations(&value);
    if let Err(cel) = Validator::new().validate(schema.root(), &value, None) {
        errors.extend(cel.into_iter().map(|e| e.to_string()));
    }
    errors
}

/// paddock's own verdict (local runtime, admission webhook).
fn paddock_errors(value: &Value) -> Vec<String> {
    let mut value = value.clone();
    crd_schema().apply_defaults(&mut value);
    let app: VirtualMachineApp = serde_json::from_value(value).unwrap();
    validate(&app)
        .err()
        .map(|invalid| invalid.violations.iter().map(ToString::to_string).collect())
        .unwrap_or_default()
}

#[test]
fn defaults_make_a_minimal_app_start_by_itself() {
    let mut value = object(
        json!({"image": {"containerDisk": "registry.example.com/vms/debian:12"}, "disk": {"size": "10Gi"}}),
    );
    crd_schema().apply_defaults(&mut value);
    assert_eq!(value["spec"]["runStrategy"], "Always");
    assert_eq!(value["spec"]["image"]["persistent"], true);
    assert_eq!(
        value["spec"]["console"],
        json!({"vnc": true, "serial": true, "baffles": {"enabled": true, "category": "vm"}})
    );
    let app: VirtualMachineApp = serde_json::from_value(value.clone()).unwrap();
    // The Rust defaults and the CRD defaults agree.
    let from_rust: VirtualMachineApp = serde_json::from_value(object(
        json!({"image": {"containerDisk": "registry.example.com/vms/debian:12"}, "disk": {"size": "10Gi"}}),
    ))
    .unwrap();
    assert_eq!(app.spec, from_rust.spec);
    assert_eq!(api_server_errors(value.clone()), Vec::<String>::new());
    assert_eq!(paddock_errors(&value), Vec::<String>::new());
}

#[test]
fn a_full_app_is_accepted_by_both() {
    let value = object(json!({
        "displayName": "Web server",
        "description": "nginx on Debian",
        "image": {"containerDisk": "127.0.0.1:5000/vms/web@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"},
        "resources": {"cpu": 4, "memory": "8Gi"},
        "disk": {"size": "40Gi", "storageClass": "fast"},
        "firmware": {"type": "uefi", "secureBoot": true},
        "cloudInit": {"userData": "#cloud-config\n", "networkData": "version: 2\n",
                      "sshKeys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG8m6V3xq alice@laptop"]},
        "runStrategy": "Manual",
        "console": {"vnc": true, "serial": false, "baffles": {"enabled": true, "displayName": "Web", "category": "servers"}},
        "snapshots": {"schedule": "0 3 * * *", "keep": 3},
        "backup": {"schedule": "@daily", "keep": 14, "repository": "registry.example.com/backups/web",
                   "credentialsSecret": "backup-registry", "insecure": false, "suspend": false}
    }));
    assert_eq!(api_server_errors(value.clone()), Vec::<String>::new());
    assert_eq!(paddock_errors(&value), Vec::<String>::new());
}

/// A bad spec, the field both verdicts must name, and a phrase of the expected advice.
struct Case {
    name: &'static str,
    spec: Value,
    api_server: Option<&'static str>,
    paddock: &'static str,
}

fn cases() -> Vec<Case> {
    let disk = json!({"size": "10Gi"});
    vec![
        Case {
            name: "no image source",
            spec: json!({"image": {}}),
            api_server: Some("exactly one image source"),
            paddock: "spec.image: no image source is set",
        },
        Case {
            name: "two image sources",
            spec: json!({"image": {"containerDisk": "a/b:1", "upload": {}}, "disk": disk}),
            api_server: Some("exactly one image source"),
            paddock: "2 image sources are set (containerDisk, upload)",
        },
        Case {
            name: "scheme in containerDisk",
            spec: json!({"image": {"containerDisk": "docker://a/b:1"}, "disk": disk}),
            api_server: Some("without a scheme like docker://"),
            paddock: "spec.image.containerDisk: 'docker://a/b:1' has a scheme",
        },
        Case {
            name: "uppercase repository",
            spec: json!({"image": {"containerDisk": "registry.example.com/VMs/debian"}, "disk": disk}),
            api_server: None,
            paddock: "invalid repository path component 'VMs'",
        },
        Case {
            name: "ftp url",
            spec: json!({"image": {"http": {"url": "ftp://x/disk.img"}}, "disk": disk}),
            api_server: Some("http.url must start with http:// or https://"),
            paddock: "spec.image.http.url",
        },
        Case {
            name: "bad checksum",
            spec: json!({"image": {"http": {"url": "https://x/disk.img", "checksum": "sha256:abc"}}, "disk": disk}),
            api_server: Some("http.checksum must look like"),
            paddock: "spec.image.http.checksum",
        },
        Case {
            name: "persistent import without size",
            spec: json!({"image": {"containerDisk": "a/b:1"}}),
            api_server: Some("disk.size is required"),
            paddock: "spec.disk.size: a size is required",
        },
        Case {
            name: "ephemeral http",
            spec: json!({"image": {"http": {"url": "https://x/disk.img"}, "persistent": false}, "disk": disk}),
            api_server: Some("image.persistent: false works only with"),
            paddock: "spec.image.persistent",
        },
        Case {
            name: "zero cores",
            spec: json!({"image": {"pvc": {"name": "d"}}, "resources": {"cpu": 0}}),
            api_server: Some("resources.cpu must be between 1 and 512"),
            paddock: "spec.resources.cpu: 0 cores is out of range",
        },
        Case {
            name: "tiny memory",
            spec: json!({"image": {"pvc": {"name": "d"}}, "resources": {"memory": "1Mi"}}),
            api_server: Some("resources.memory must be a quantity of at least 16Mi"),
            paddock: "spec.resources.memory: '1Mi' is out of range",
        },
        Case {
            name: "memory in gigabytes",
            spec: json!({"image": {"pvc": {"name": "d"}}, "resources": {"memory": "4GB"}}),
            api_server: Some("resources.memory must be a quantity"),
            paddock: "unknown suffix 'GB'",
        },
        Case {
            name: "instancetype and cpu",
            spec: json!({"image": {"pvc": {"name": "d"}}, "resources": {"cpu": 2, "instancetype": {"name": "u1.small"}}}),
            api_server: Some("set either resources.instancetype or resources.cpu/resources.memory"),
            paddock: "spec.resources: set either instancetype or cpu/memory",
        },
        Case {
            name: "tiny disk",
            spec: json!({"image": {"containerDisk": "a/b:1"}, "disk": {"size": "512Ki"}}),
            api_server: Some("disk.size must be a quantity larger than 1Mi"),
            paddock: "spec.disk.size: '512Ki' is too small",
        },
        Case {
            name: "secure boot on bios",
            spec: json!({"image": {"pvc": {"name": "d"}}, "firmware": {"secureBoot": true}}),
            api_server: Some("firmware.secureBoot needs firmware.type: uefi"),
            paddock: "spec.firmware.secureBoot: Secure Boot needs UEFI",
        },
        Case {
            name: "user data twice",
            spec: json!({"image": {"pvc": {"name": "d"}}, "cloudInit": {"userData": "#cloud-config", "userDataSecretRef": "s"}}),
            api_server: Some("set cloudInit.userData or cloudInit.userDataSecretRef, not both"),
            paddock: "spec.cloudInit: set userData or userDataSecretRef, not both",
        },
        Case {
            name: "not an ssh key",
            spec: json!({"image": {"pvc": {"name": "d"}}, "cloudInit": {"sshKeys": ["my password"]}}),
            api_server: None,
            paddock: "spec.cloudInit.sshKeys[0]: not an OpenSSH public key",
        },
        Case {
            name: "six-field schedule",
            spec: json!({"image": {"pvc": {"name": "d"}}, "snapshots": {"schedule": "0 0 3 * * *"}}),
            api_server: Some("snapshots.schedule must be a five-field cron expression"),
            paddock: "spec.snapshots.schedule: '0 0 3 * * *' is not a five-field cron schedule",
        },
        Case {
            name: "invalid minute",
            spec: json!({"image": {"pvc": {"name": "d"}}, "snapshots": {"schedule": "75 3 * * *"}}),
            api_server: None,
            paddock: "spec.snapshots.schedule: '75 3 * * *' is not a five-field cron schedule",
        },
        Case {
            name: "keep nothing",
            spec: json!({"image": {"pvc": {"name": "d"}}, "snapshots": {"schedule": "@daily", "keep": 0}}),
            api_server: Some("snapshots.keep must be between 1 and 1000"),
            paddock: "spec.snapshots.keep: 0 is out of range",
        },
        Case {
            name: "backup schedule with seconds",
            spec: json!({"image": {"pvc": {"name": "d"}}, "backup": {"schedule": "0 0 2 * * *", "repository": "r.example.com/b/web"}}),
            api_server: Some("backup.schedule must be a five-field cron expression"),
            paddock: "spec.backup.schedule: '0 0 2 * * *' is not a five-field cron schedule",
        },
        Case {
            name: "backup keeps nothing",
            spec: json!({"image": {"pvc": {"name": "d"}}, "backup": {"schedule": "@daily", "keep": 0, "repository": "r.example.com/b/web"}}),
            api_server: Some("backup.keep must be between 1 and 1000"),
            paddock: "spec.backup.keep: 0 is out of range",
        },
        Case {
            name: "backup repository with a scheme",
            spec: json!({"image": {"pvc": {"name": "d"}}, "backup": {"schedule": "@daily", "repository": "https://r.example.com/b/web"}}),
            api_server: Some("backup.repository must be a registry repository"),
            paddock: "spec.backup.repository:",
        },
        Case {
            name: "backup repository with a tag",
            spec: json!({"image": {"pvc": {"name": "d"}}, "backup": {"schedule": "@daily", "repository": "r.example.com/b/web:v1"}}),
            api_server: None,
            paddock: "spec.backup.repository: 'r.example.com/b/web:v1' names a tag or digest",
        },
        Case {
            name: "backup credentials not a secret name",
            spec: json!({"image": {"pvc": {"name": "d"}}, "backup": {"schedule": "@daily", "repository": "r.example.com/b/web", "credentialsSecret": "My Secret"}}),
            api_server: None,
            paddock: "spec.backup.credentialsSecret: 'My Secret' is not a Secret name",
        },
        Case {
            name: "unknown run strategy",
            spec: json!({"image": {"pvc": {"name": "d"}}, "runStrategy": "Sometimes"}),
            api_server: Some("\"Sometimes\" is not one of"),
            paddock: "",
        },
    ]
}

#[test]
fn every_bad_spec_is_refused_with_a_message_that_says_what_to_change() {
    for case in cases() {
        let value = object(case.spec.clone());
        let api_server = api_server_errors(value.clone()).join("\n");
        match case.api_server {
            Some(expected) => assert!(
                api_server.contains(expected),
                "{}: API server said {api_server:?}",
                case.name
            ),
            // Rules CEL cannot express fall to paddock's webhook.
            None => assert_eq!(api_server, "", "{}", case.name),
        }
        if case.paddock.is_empty() {
            // The value cannot even be deserialised; serde's message names the variants.
            let mut defaulted = value.clone();
            crd_schema().apply_defaults(&mut defaulted);
            let error = serde_json::from_value::<VirtualMachineApp>(defaulted)
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("unknown variant `Sometimes`") && error.contains("Always"),
                "{error}"
            );
            continue;
        }
        let paddock = paddock_errors(&value).join("\n");
        assert!(
            paddock.contains(case.paddock),
            "{}: paddock said {paddock:?}",
            case.name
        );
    }
}

#[test]
fn names_that_would_break_the_disk_name_are_refused() {
    let mut value = object(json!({"image": {"pvc": {"name": "d"}}}));
    value["metadata"]["name"] = json!("a".repeat(59));
    assert!(
        api_server_errors(value.clone())
            .join("\n")
            .contains("metadata.name must be at most 58 characters")
    );
    assert!(paddock_errors(&value).join("\n").contains("use at most 58"));
    value["metadata"]["name"] = json!("Web_Server");
    assert!(paddock_errors(&value).join("\n").contains("not a valid VM name"));
}

#[test]
fn all_violations_are_reported_at_once() {
    let value = object(json!({"image": {}, "resources": {"cpu": 0}, "firmware": {"secureBoot": true}}));
    let errors = paddock_errors(&value);
    assert_eq!(errors.len(), 3, "{errors:?}");
}
