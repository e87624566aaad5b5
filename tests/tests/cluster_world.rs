//! The test world is real: the CRDs are installed in a real kube-apiserver, which validates, prunes
//! and authorizes as a cluster does.
//!
//! Each test makes its own namespace in the shared cluster (`paddock_tests::cluster`).

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use paddock_tests::cluster::Cluster;
use serde_json::json;

fn virtual_machines() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachine"),
        "virtualmachines",
    )
}

fn virtual_machine(name: &str, cores: serde_json::Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {
            "runStrategy": "Halted",
            "template": {"spec": {
                "domain": {"cpu": {"cores": cores}, "devices": {}, "memory": {"guest": "128Mi"}},
            }},
        },
    }))
    .unwrap()
}

fn api_status(error: kube::Error) -> kube::core::Status {
    match error {
        kube::Error::Api(status) => *status,
        other => panic!("expected an API error status, got {other:?}"),
    }
}

#[tokio::test]
async fn every_crd_is_installed_and_the_simulator_is_aggregated() {
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let client = cluster.admin_client().await.unwrap();
    let definitions: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "virtualmachines.kubevirt.io",
        "virtualmachineinstances.kubevirt.io",
        "virtualmachineinstancemigrations.kubevirt.io",
        "virtualmachinesnapshots.snapshot.kubevirt.io",
        "virtualmachineinstancetypes.instancetype.kubevirt.io",
        "virtualmachineclones.clone.kubevirt.io",
        "virtualmachineexports.export.kubevirt.io",
        "datavolumes.cdi.kubevirt.io",
        "datasources.cdi.kubevirt.io",
        "cdiconfigs.cdi.kubevirt.io",
        "bafflesapplications.app.baffles.dev",
        "virtualmachineapps.paddock.dev",
    ] {
        let definition = definitions
            .get(name)
            .await
            .unwrap_or_else(|error| panic!("crd {name}: {error}"));
        let established = definition
            .status
            .and_then(|status| status.conditions)
            .unwrap_or_default()
            .into_iter()
            .any(|condition| condition.type_ == "Established" && condition.status == "True");
        assert!(established, "crd {name} is not Established");
    }
    // The aggregated API answers discovery through kube-apiserver.
    let resources = client
        .list_api_group_resources("subresources.kubevirt.io/v1")
        .await
        .unwrap();
    let names: Vec<&str> = resources
        .resources
        .iter()
        .map(|resource| resource.name.as_str())
        .collect();
    assert!(names.contains(&"virtualmachineinstances/vnc"), "{names:?}");
    assert!(names.contains(&"virtualmachines/start"), "{names:?}");
}

#[tokio::test]
async fn invalid_virtual_machines_are_rejected_and_unknown_fields_pruned() {
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let namespace = cluster.namespace("world-invalid").await.unwrap();
    let client = cluster.admin_client().await.unwrap();
    let vms: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace.name(), &virtual_machines());

    // A wrong type: the CRD's structural schema says cores is an integer.
    let status = api_status(
        vms.create(
            &PostParams::default(),
            &virtual_machine("wrong-type", json!("lots")),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(status.code, 422, "{status:?}");
    assert_eq!(status.reason, "Invalid", "{status:?}");
    assert!(
        status.message.contains("spec.template.spec.domain.cpu.cores"),
        "the rejection names the field: {}",
        status.message
    );

    // An unknown field with strict field validation is rejected ...
    let mut unknown = virtual_machine("unknown-field", json!(1));
    unknown.data["spec"]["bogusField"] = json!("x");
    let create = |validation: &str| {
        http::Request::post(format!(
            "/apis/kubevirt.io/v1/namespaces/{}/virtualmachines?fieldValidation={validation}",
            namespace.name()
        ))
        .header("Content-Type", "application/json")
        .body(serde_json::to_vec(&unknown).unwrap())
        .unwrap()
    };
    let status = api_status(client.request_text(create("Strict")).await.unwrap_err());
    assert!(
        status.message.contains("unknown field") && status.message.contains("bogusField"),
        "{status:?}"
    );
    // ... and without it, pruned: the stored object has no trace of it.
    client.request_text(create("Ignore")).await.unwrap();
    let stored = vms.get("unknown-field").await.unwrap();
    assert!(
        stored.data["spec"].get("bogusField").is_none(),
        "not pruned: {:?}",
        stored.data
    );
    assert_eq!(
        stored.data["spec"]["template"]["spec"]["domain"]["cpu"]["cores"],
        1
    );
}

#[tokio::test]
async fn the_non_admin_user_is_denied_by_rbac() {
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let namespace = cluster.namespace("world-rbac").await.unwrap();
    let admin = cluster.admin_client().await.unwrap();
    let user = cluster.user_client().await.unwrap();
    let admin_vms: Api<DynamicObject> = Api::namespaced_with(admin, namespace.name(), &virtual_machines());
    admin_vms
        .create(
            &PostParams::default(),
            &virtual_machine("owned-by-admin", json!(1)),
        )
        .await
        .unwrap();

    let user_vms: Api<DynamicObject> =
        Api::namespaced_with(user.clone(), namespace.name(), &virtual_machines());
    let status = api_status(user_vms.list(&Default::default()).await.unwrap_err());
    assert_eq!(
        (status.code, status.reason.as_str()),
        (403, "Forbidden"),
        "{status:?}"
    );
    assert!(status.message.contains("paddock-user"), "{}", status.message);
    let status = api_status(
        user_vms
            .create(&PostParams::default(), &virtual_machine("by-user", json!(1)))
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code, 403, "{status:?}");

    // The aggregated subresource is authorized too (kube-apiserver checks virtualmachines/start in
    // subresources.kubevirt.io before proxying; the simulator would check again).
    let start = http::Request::put(format!(
        "/apis/subresources.kubevirt.io/v1/namespaces/{}/virtualmachines/owned-by-admin/start",
        namespace.name()
    ))
    .body(Vec::new())
    .unwrap();
    let status = api_status(user.request_text(start).await.unwrap_err());
    assert_eq!(status.code, 403, "{status:?}");
    assert!(
        status.message.contains("virtualmachines/start"),
        "{}",
        status.message
    );
}
