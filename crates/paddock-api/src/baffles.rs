//! `BafflesApplication` (`app.baffles.dev/v1`): how a VM becomes discoverable in
//! [Baffles](https://baffles.dev), which connects users to the VM's VNC session through the KubeVirt API.
//!
//! Shape taken from the project's seed design note ("Virtual Machines in Pepr", section *Baffles*):
//!
//! ```yaml
//! apiVersion: app.baffles.dev/v1
//! kind: BafflesApplication
//! metadata:
//!   name: windows10
//!   namespace: default
//! spec:
//!   displayName: "Windows 10"
//!   url: "ws://<NODE>:<PORT>/k8s/apis/subresources.kubevirt.io/v1alpha3/namespaces/default/virtualmachineinstances/iso-win10/vnc"
//!   category: "vm"
//! ```
//!
//! Unlike the KubeVirt and CDI types this one derives `JsonSchema`, so
//! [`BafflesApplication::crd()`](kube::CustomResourceExt::crd) yields an installable CRD: the test CRD
//! the control plane installs where Baffles itself is absent.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The spec of a `BafflesApplication`: one entry in Baffles' application list.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "app.baffles.dev",
    version = "v1",
    kind = "BafflesApplication",
    plural = "bafflesapplications",
    namespaced,
    derive = "Default",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct BafflesApplicationSpec {
    /// The name Baffles shows for the application, e.g. `Windows 10`.
    pub display_name: String,
    /// Where Baffles connects: for a VM, the websocket URL of the VMI's VNC subresource, e.g.
    /// `ws://<NODE>:<PORT>/k8s/apis/subresources.kubevirt.io/v1alpha3/namespaces/default/virtualmachineinstances/iso-win10/vnc`.
    pub url: String,
    /// The category Baffles files the application under; `vm` for virtual machines.
    pub category: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::{CustomResourceExt as _, Resource as _};

    #[test]
    fn crd_is_namespaced_app_baffles_dev_v1() {
        let crd = BafflesApplication::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("bafflesapplications.app.baffles.dev")
        );
        assert_eq!(crd.spec.group, "app.baffles.dev");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, "BafflesApplication");
        assert_eq!(crd.spec.versions.len(), 1);
        assert_eq!(crd.spec.versions[0].name, "v1");
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(
            spec["required"],
            serde_json::json!(["category", "displayName", "url"])
        );
        for field in ["displayName", "url", "category"] {
            assert_eq!(spec["properties"][field]["type"], "string", "{field}");
        }
        assert_eq!(BafflesApplication::api_version(&()), "app.baffles.dev/v1");
    }

    #[test]
    fn seed_example_round_trips() {
        let yaml = r#"
apiVersion: app.baffles.dev/v1
kind: BafflesApplication
metadata:
  name: windows10
  namespace: default
spec:
  displayName: "Windows 10"
  url: "ws://node:30000/k8s/apis/subresources.kubevirt.io/v1alpha3/namespaces/default/virtualmachineinstances/iso-win10/vnc"
  category: "vm"
"#;
        let input: serde_json::Value = serde_yaml::from_str(yaml).unwrap();
        let app: BafflesApplication = serde_json::from_value(input.clone()).unwrap();
        assert_eq!(app.spec.display_name, "Windows 10");
        assert_eq!(app.spec.category, "vm");
        assert_eq!(serde_json::to_value(&app).unwrap(), input);

        let built = BafflesApplication::new(
            "windows10",
            BafflesApplicationSpec {
                display_name: "Windows 10".into(),
                url: app.spec.url.clone(),
                category: "vm".into(),
            },
        );
        assert_eq!(built.spec, app.spec);
    }
}
