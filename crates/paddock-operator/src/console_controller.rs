//! Baffles listings for plain KubeVirt VMs: a VirtualMachine annotated `paddock.dev/console: baffles`
//! that no VirtualMachineApp owns gets a BafflesApplication of the same name, owned by the VM (so it
//! goes away with the VM), pointing at the VM's VNC console through the console gateway.
//!
//! Optional annotations: `paddock.dev/display-name` (default: the VM's name) and
//! `paddock.dev/baffles-category` (default `vm`). Removing the annotation removes the listing.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api, Resource, ResourceExt,
    runtime::{controller::Action, reflector::ObjectRef},
};
use paddock_api::{
    app::VirtualMachineApp,
    baffles::{BafflesApplication, BafflesApplicationSpec},
    builders::{self, MANAGED_BY_LABEL, MANAGER},
    kubevirt::virtualmachine::VirtualMachine,
};

use crate::{
    Context, ReconcileError,
    app_controller::{ensure, prune},
};

/// The controller's name in metrics, logs and Events.
pub const CONTROLLER: &str = "console";
/// The annotation that asks for a Baffles listing, with value [`CONSOLE_BAFFLES`].
pub const CONSOLE_ANNOTATION: &str = "paddock.dev/console";
/// The value of [`CONSOLE_ANNOTATION`] that asks for a Baffles listing.
pub const CONSOLE_BAFFLES: &str = "baffles";
/// The annotation naming the VM in Baffles.
pub const DISPLAY_NAME_ANNOTATION: &str = "paddock.dev/display-name";
/// The annotation choosing the Baffles category.
pub const CATEGORY_ANNOTATION: &str = "paddock.dev/baffles-category";
/// The label naming the VM a listing belongs to.
pub const VIRTUAL_MACHINE_LABEL: &str = "paddock.dev/virtual-machine";

/// The BafflesApplication an annotated VM should have, or `None` when it should have none (not
/// annotated, or owned by a VirtualMachineApp, whose controller lists it).
pub fn desired_listing(vm: &VirtualMachine, gateway_url: &str) -> Option<BafflesApplication> {
    let annotations = vm.annotations();
    if annotations.get(CONSOLE_ANNOTATION).map(String::as_str) != Some(CONSOLE_BAFFLES) {
        return None;
    }
    let app_kind = VirtualMachineApp::kind(&());
    if vm.owner_references().iter().any(|owner| owner.kind == app_kind) {
        return None;
    }
    let name = vm.metadata.name.clone()?;
    let namespace = vm.metadata.namespace.clone()?;
    let owner = vm.controller_owner_ref(&())?;
    Some(BafflesApplication {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.clone()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_owned(), MANAGER.to_owned()),
                (VIRTUAL_MACHINE_LABEL.to_owned(), name.clone()),
            ])),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: BafflesApplicationSpec {
            display_name: annotations
                .get(DISPLAY_NAME_ANNOTATION)
                .cloned()
                .unwrap_or_else(|| name.clone()),
            url: builders::console_url(gateway_url, &namespace, &name),
            category: annotations
                .get(CATEGORY_ANNOTATION)
                .cloned()
                .unwrap_or_else(|| "vm".to_owned()),
        },
    })
}

/// Reconciles one VirtualMachine.
#[tracing::instrument(skip_all, fields(vm = %vm.name_any(), namespace = vm.namespace().unwrap_or_default()))]
pub async fn reconcile(vm: Arc<VirtualMachine>, context: Arc<Context>) -> Result<Action, ReconcileError> {
    crate::observed(CONTROLLER, vm.as_ref(), &context, reconcile_inner(&vm, &context)).await
}

async fn reconcile_inner(vm: &VirtualMachine, context: &Context) -> Result<Action, ReconcileError> {
    let facts = context.facts.borrow().clone();
    if vm.metadata.deletion_timestamp.is_some() || !facts.baffles_installed {
        return Ok(Action::await_change());
    }
    let namespace = vm.namespace().ok_or(ReconcileError::MissingNamespace)?;
    let api = Api::<BafflesApplication>::namespaced(context.client.clone(), &namespace);
    let existing = context
        .baffles
        .get(&ObjectRef::new(&vm.name_any()).within(&namespace));
    match desired_listing(vm, &facts.console_gateway_url) {
        Some(listing) => {
            ensure(&api, listing, existing.as_deref(), &context.metrics).await?;
        }
        None => prune(&api, existing.as_deref(), vm, &context.metrics).await?,
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn vm(yaml: &str) -> VirtualMachine {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn annotated_plain_vm_gets_a_listing_owned_by_it() {
        let vm = vm(r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: legacy
  namespace: ops
  uid: "42"
  annotations: {paddock.dev/console: baffles, paddock.dev/display-name: Legacy ERP}
spec: {template: {}}
"#);
        let listing = desired_listing(&vm, "wss://console.example/").unwrap();
        assert_eq!(listing.spec.display_name, "Legacy ERP");
        assert_eq!(listing.spec.category, "vm");
        assert_eq!(
            listing.spec.url,
            "wss://console.example/k8s/apis/subresources.kubevirt.io/v1/namespaces/ops/virtualmachineinstances/legacy/vnc"
        );
        let owner = &listing.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("VirtualMachine", "42")
        );
    }

    #[test]
    fn unannotated_or_app_owned_vms_get_none() {
        let plain = vm(
            "{apiVersion: kubevirt.io/v1, kind: VirtualMachine, metadata: {name: a, namespace: b, uid: '1'}, spec: {template: {}}}",
        );
        assert!(desired_listing(&plain, "wss://x").is_none());
        let owned = vm(r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: a
  namespace: b
  uid: "1"
  annotations: {paddock.dev/console: baffles}
  ownerReferences: [{apiVersion: paddock.dev/v1alpha1, kind: VirtualMachineApp, name: a, uid: "2", controller: true}]
spec: {template: {}}
"#);
        assert!(desired_listing(&owned, "wss://x").is_none());
    }
}
