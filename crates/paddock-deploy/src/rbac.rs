//! The operator's RBAC, derived from one table: every API call the operator and its admission
//! webhooks make, with the code path that makes it.
//!
//! Contract: [`permissions`] lists exactly the (scope, group, resource, verb, name) tuples the code in
//! `paddock-operator` and `paddock-admission` needs, one row per verb with the code path that needs
//! it; [`rules`] groups them into PolicyRules without widening anything. Server-side apply needs
//! `patch` and, because an apply creates a missing object, `create`. A `create` by POST cannot be
//! limited by name (the name is not in the URL), so such rows carry no resource name. The chart binds:
//! - [`Scope::Watched`] through a ClusterRole bound cluster-wide, or with a RoleBinding in the one
//!   namespace the operator watches (`--namespace`);
//! - [`Scope::Cluster`] through a second ClusterRole bound cluster-wide (cluster-scoped objects and the
//!   Zarf state Secret, found by name in Zarf's namespace);
//! - [`Scope::Release`] through a Role in the operator's own namespace (its Lease and TLS Secret);
//! - [`Scope::Console`] through a third ClusterRole bound cluster-wide to the web console's own
//!   ServiceAccount (`paddock serve --backend kubernetes`, `console.enabled`): a second, separate
//!   table, [`console_permissions`], since the console is a different program with a different
//!   identity (it reads through shared caches and acts as each signed-in user by impersonation).

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// Where a permission applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// The namespaces whose VirtualMachineApps and VMs the operator reconciles.
    Watched,
    /// Cluster-wide (cluster-scoped resources, or a named object in another namespace).
    Cluster,
    /// The operator's own namespace.
    Release,
    /// Cluster-wide, for the web console's ServiceAccount (not the operator's).
    Console,
}

/// How a permission names its objects.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceName {
    /// Every object of the resource.
    Any,
    /// One object, by a fixed name.
    Fixed(String),
    /// One object, named by a chart value (a Helm expression such as `.Values.webhook.configurationName`).
    Value(&'static str),
}

/// One verb on one resource, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permission {
    /// Where it applies.
    pub scope: Scope,
    /// The API group (`""` for the core group).
    pub api_group: &'static str,
    /// The resource, with `/subresource` where one is called.
    pub resource: &'static str,
    /// The verb.
    pub verb: &'static str,
    /// Which objects.
    pub name: ResourceName,
    /// The code that makes the call.
    pub code_path: &'static str,
}

/// The chart value naming the webhook configurations (`--webhook-configuration-name`).
pub const WEBHOOK_CONFIGURATION_NAME_VALUE: &str = ".Values.webhook.configurationName";

/// The name of the leader Lease (`paddock operator --lease-name` default).
pub fn lease_name() -> String {
    paddock_operator::Options::new(None, "", "").lease_name
}

/// The name of the Secret holding the webhook CA and serving certificate.
pub fn webhook_tls_secret_name() -> String {
    paddock_admission::TlsOptions::new("").secret_name
}

/// Every permission the operator needs, with the code path that needs it.
pub fn permissions() -> Vec<Permission> {
    use ResourceName::{Any, Fixed, Value};
    use Scope::{Cluster, Release, Watched};
    let row = |scope, api_group, resource, verb, name, code_path| Permission {
        scope,
        api_group,
        resource,
        verb,
        name,
        code_path,
    };
    let (zarf_namespace, zarf_secret) = paddock_operator::facts::ZARF_STATE_SECRET;
    let admission_zarf = paddock_admission::ZarfOptions::default();
    debug_assert_eq!(
        (
            admission_zarf.namespace.as_str(),
            admission_zarf.secret_name.as_str()
        ),
        (zarf_namespace, zarf_secret)
    );
    let watch = "paddock_operator::run_controllers: the shared reflector (watcher) of";
    let apply = "paddock_operator::app_controller::ensure (server-side apply when missing or drifted; it creates a missing object) of";
    vec![
        // The VirtualMachineApp controller.
        row(
            Watched,
            "paddock.dev",
            "virtualmachineapps",
            "list",
            Any,
            "paddock_operator::run_controllers: the VirtualMachineApp watcher feeding the app controller",
        ),
        row(
            Watched,
            "paddock.dev",
            "virtualmachineapps",
            "watch",
            Any,
            "paddock_operator::run_controllers: the VirtualMachineApp watcher feeding the app controller",
        ),
        row(
            Watched,
            "paddock.dev",
            "virtualmachineapps/status",
            "patch",
            Any,
            "paddock_operator::app_controller::write_status and paddock_operator::backups::write_status (server-side apply of status; the backup part under its own field manager)",
        ),
        // Children, read through shared reflectors and written by server-side apply.
        row(Watched, "cdi.kubevirt.io", "datavolumes", "list", Any, watch),
        row(Watched, "cdi.kubevirt.io", "datavolumes", "watch", Any, watch),
        row(Watched, "cdi.kubevirt.io", "datavolumes", "patch", Any, apply),
        row(Watched, "cdi.kubevirt.io", "datavolumes", "create", Any, apply),
        row(Watched, "kubevirt.io", "virtualmachines", "list", Any, watch),
        row(Watched, "kubevirt.io", "virtualmachines", "watch", Any, watch),
        row(Watched, "kubevirt.io", "virtualmachines", "patch", Any, apply),
        row(Watched, "kubevirt.io", "virtualmachines", "create", Any, apply),
        row(
            Watched,
            "",
            "secrets",
            "list",
            Any,
            "paddock_operator::run_controllers: the reflector of paddock-managed (SSH key) Secrets; RBAC cannot limit it to the label selector",
        ),
        row(
            Watched,
            "",
            "secrets",
            "watch",
            Any,
            "paddock_operator::run_controllers: the reflector of paddock-managed (SSH key) Secrets",
        ),
        row(
            Watched,
            "",
            "secrets",
            "patch",
            Any,
            "paddock_operator::app_controller::ensure of the SSH keys Secret",
        ),
        row(
            Watched,
            "",
            "secrets",
            "create",
            Any,
            "paddock_operator::app_controller::ensure of the SSH keys Secret",
        ),
        row(
            Watched,
            "",
            "secrets",
            "delete",
            Any,
            "paddock_operator::app_controller::prune of an SSH keys Secret the app no longer asks for",
        ),
        row(
            Watched,
            "app.baffles.dev",
            "bafflesapplications",
            "list",
            Any,
            watch,
        ),
        row(
            Watched,
            "app.baffles.dev",
            "bafflesapplications",
            "watch",
            Any,
            watch,
        ),
        row(
            Watched,
            "app.baffles.dev",
            "bafflesapplications",
            "patch",
            Any,
            "app_controller::ensure and console_controller::reconcile (server-side apply of listings)",
        ),
        row(
            Watched,
            "app.baffles.dev",
            "bafflesapplications",
            "create",
            Any,
            "app_controller::ensure and console_controller::reconcile (server-side apply creates a missing listing)",
        ),
        row(
            Watched,
            "app.baffles.dev",
            "bafflesapplications",
            "delete",
            Any,
            "app_controller::prune and console_controller::reconcile (a listing no longer wanted)",
        ),
        row(
            Watched,
            "snapshot.kubevirt.io",
            "virtualmachinesnapshots",
            "list",
            Any,
            watch,
        ),
        row(
            Watched,
            "snapshot.kubevirt.io",
            "virtualmachinesnapshots",
            "watch",
            Any,
            watch,
        ),
        row(
            Watched,
            "snapshot.kubevirt.io",
            "virtualmachinesnapshots",
            "create",
            Any,
            "paddock_operator::app_controller::schedule_snapshots (a scheduled snapshot is due) and paddock_operator::backups via paddock_cluster::backup::backup (a running VM is snapshotted before its backup)",
        ),
        row(
            Watched,
            "snapshot.kubevirt.io",
            "virtualmachinesnapshots",
            "delete",
            Any,
            "paddock_operator::app_controller::schedule_snapshots (pruning beyond keep) and paddock_operator::backups via paddock_cluster::backup::backup (the backup's snapshot, afterwards)",
        ),
        // Scheduled and requested backups (paddock_operator::backups, through
        // paddock_cluster::backup::backup).
        row(
            Watched,
            "snapshot.kubevirt.io",
            "virtualmachinesnapshots",
            "get",
            Any,
            "paddock_cluster::backup::backup (waits until the backup's snapshot is readyToUse)",
        ),
        row(
            Watched,
            "export.kubevirt.io",
            "virtualmachineexports",
            "create",
            Any,
            "paddock_cluster::backup::backup (exports the VM or its snapshot to read the disk)",
        ),
        row(
            Watched,
            "export.kubevirt.io",
            "virtualmachineexports",
            "get",
            Any,
            "paddock_cluster::backup::backup (waits until the export is Ready, reads its links)",
        ),
        row(
            Watched,
            "export.kubevirt.io",
            "virtualmachineexports",
            "delete",
            Any,
            "paddock_cluster::backup::backup (deletes the export afterwards, also after a failure)",
        ),
        row(
            Watched,
            "paddock.dev",
            "virtualmachineapps",
            "get",
            Any,
            "paddock_cluster::backup::backup (the definition that travels with the backup)",
        ),
        row(
            Watched,
            "kubevirt.io",
            "virtualmachines",
            "get",
            Any,
            "paddock_cluster::backup::backup (the VM to back up)",
        ),
        row(
            Watched,
            "kubevirt.io",
            "virtualmachineinstances",
            "get",
            Any,
            "paddock_cluster::backup::backup (is the VM running, so snapshot first?)",
        ),
        row(
            Watched,
            "",
            "secrets",
            "get",
            Any,
            "paddock_cluster::backup::backup (the export's token Secret) and paddock_operator::backups::registry_access (spec.backup.credentialsSecret)",
        ),
        row(
            Watched,
            "events.k8s.io",
            "events",
            "create",
            Any,
            "paddock_operator::app_controller::publish (kube-runtime Recorder creates an Event)",
        ),
        row(
            Watched,
            "events.k8s.io",
            "events",
            "patch",
            Any,
            "paddock_operator::app_controller::publish (kube-runtime Recorder patches a repeated Event's series)",
        ),
        // Cluster facts and the webhook configurations.
        row(
            Cluster,
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "get",
            Fixed(paddock_operator::facts::BAFFLES_CRD.to_owned()),
            "paddock_operator::facts::discover (is the Baffles CRD installed?)",
        ),
        row(
            Cluster,
            "",
            "secrets",
            "get",
            Fixed(zarf_secret.to_owned()),
            "paddock_operator::facts::discover and paddock_admission::zarf::ZarfDetector::poll_once (the zarf-state Secret in Zarf's namespace)",
        ),
        row(
            Cluster,
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            "get",
            Value(WEBHOOK_CONFIGURATION_NAME_VALUE),
            "paddock_admission::serve: Publisher::inject (reads the live webhooks' names and caBundle; the chart owns the configuration)",
        ),
        row(
            Cluster,
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            "list",
            Value(WEBHOOK_CONFIGURATION_NAME_VALUE),
            "paddock_admission::serve: keep_injected (the watcher's list, limited by fieldSelector metadata.name)",
        ),
        row(
            Cluster,
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            "watch",
            Value(WEBHOOK_CONFIGURATION_NAME_VALUE),
            "paddock_admission::serve: keep_injected (re-injects the moment a caBundle is reset, watch limited by fieldSelector metadata.name)",
        ),
        row(
            Cluster,
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            "patch",
            Value(WEBHOOK_CONFIGURATION_NAME_VALUE),
            "paddock_admission::serve: Publisher::inject (server-side apply of only the caBundle fields)",
        ),
        row(
            Cluster,
            "admissionregistration.k8s.io",
            "validatingwebhookconfigurations",
            "get",
            Value(WEBHOOK_CONFIGURATION_NAME_VALUE),
            "paddock_admission::serve: Publisher::inject (reads the live webhooks' names and caBundle; the chart owns the configuration)",
        ),
        row(
            Cluster,
            "admissionregistration.k8s.io",
            "validatingwebhookconfigurations",
            "list",
            Value(WEBHOOK_CONFIGURATION_NAME_VALUE),
            "paddock_admission::serve: keep_injected (the watcher's list, limited by fieldSelector metadata.name)",
        ),
        row(
            Cluster,
            "admissionregistration.k8s.io",
            "validatingwebhookconfigurations",
            "watch",
            Value(WEBHOOK_CONFIGURATION_NAME_VALUE),
            "paddock_admission::serve: keep_injected (re-injects the moment a caBundle is reset, watch limited by fieldSelector metadata.name)",
        ),
        row(
            Cluster,
            "admissionregistration.k8s.io",
            "validatingwebhookconfigurations",
            "patch",
            Value(WEBHOOK_CONFIGURATION_NAME_VALUE),
            "paddock_admission::serve: Publisher::inject (server-side apply of only the caBundle fields)",
        ),
        // The operator's own namespace.
        row(
            Release,
            "coordination.k8s.io",
            "leases",
            "get",
            Fixed(lease_name()),
            "paddock_operator::leader::LeaderElector (read before acquiring, renewing, releasing)",
        ),
        row(
            Release,
            "coordination.k8s.io",
            "leases",
            "update",
            Fixed(lease_name()),
            "paddock_operator::leader::LeaderElector (conditional replace to acquire, renew, release)",
        ),
        row(
            Release,
            "coordination.k8s.io",
            "leases",
            "create",
            Any,
            "paddock_operator::leader::LeaderElector (the first candidate creates the Lease)",
        ),
        row(
            Release,
            "",
            "secrets",
            "get",
            Fixed(webhook_tls_secret_name()),
            "paddock_admission::tls::CertificateStore::read (the CA and serving certificate)",
        ),
        row(
            Release,
            "",
            "secrets",
            "update",
            Fixed(webhook_tls_secret_name()),
            "paddock_admission::tls::CertificateStore::write (rotation: conditional replace)",
        ),
        row(
            Release,
            "",
            "secrets",
            "create",
            Any,
            "paddock_admission::tls::CertificateStore::write (the first replica issues the CA)",
        ),
    ]
}

/// Every permission the web console's Kubernetes backend (`paddock_console::kubernetes`) needs with
/// its own credentials, all [`Scope::Console`], with the code path that needs it. What a user does
/// through the console runs as that user (impersonation), so RBAC of the user decides it and it is
/// not listed here.
pub fn console_permissions() -> Vec<Permission> {
    let row = |api_group, resource, verb, code_path| Permission {
        scope: Scope::Console,
        api_group,
        resource,
        verb,
        name: ResourceName::Any,
        code_path,
    };
    let reflector = "paddock_console::kubernetes::KubernetesBackend::start: run_reflector (watcher list, then watch) filling the shared cache of";
    vec![
        row("paddock.dev", "virtualmachineapps", "list", reflector),
        row("paddock.dev", "virtualmachineapps", "watch", reflector),
        row("kubevirt.io", "virtualmachines", "list", reflector),
        row("kubevirt.io", "virtualmachines", "watch", reflector),
        row("kubevirt.io", "virtualmachineinstances", "list", reflector),
        row("kubevirt.io", "virtualmachineinstances", "watch", reflector),
        row(
            "snapshot.kubevirt.io",
            "virtualmachinesnapshots",
            "list",
            reflector,
        ),
        row(
            "snapshot.kubevirt.io",
            "virtualmachinesnapshots",
            "watch",
            reflector,
        ),
        row(
            "authentication.k8s.io",
            "tokenreviews",
            "create",
            "paddock_console::kubernetes::authenticator::Authenticator (a TokenReview of each new bearer token)",
        ),
        row(
            "authorization.k8s.io",
            "subjectaccessreviews",
            "create",
            "paddock_console::kubernetes::access::AccessReviewer (may this user get/list what the shared cache holds?)",
        ),
        row(
            "",
            "users",
            "impersonate",
            "paddock_console::kubernetes::impersonate (Impersonate-User on every action and console websocket)",
        ),
        row(
            "",
            "groups",
            "impersonate",
            "paddock_console::kubernetes::impersonate (one Impersonate-Group per group of the user)",
        ),
        Permission {
            scope: Scope::Console,
            api_group: "cdi.kubevirt.io",
            resource: "cdiconfigs",
            verb: "get",
            name: ResourceName::Fixed("config".to_owned()),
            code_path: "paddock_console::kubernetes::upload (CDIConfig config's status.uploadProxyURL: where browser uploads go, unless --upload-proxy-url)",
        },
        row(
            "",
            "serviceaccounts",
            "impersonate",
            "paddock_console::kubernetes::impersonate (Impersonate-User of a system:serviceaccount:… user, which the API server authorizes as impersonate on serviceaccounts)",
        ),
    ]
}

/// The PolicyRules of `scope`: one rule per (group, resource name), its resources and verbs sorted.
/// Names that are chart values become Helm expressions (`{{ .Values… }}`) through `name_value`.
pub fn rules(scope: Scope, name_value: &mut dyn FnMut(&'static str) -> Value) -> Vec<Value> {
    // (group, name) → resource → verbs; a rule lists resources that share exactly the same verbs.
    let mut grouped: BTreeMap<(&str, ResourceName), BTreeMap<&str, Vec<&str>>> = BTreeMap::new();
    for permission in permissions()
        .into_iter()
        .chain(console_permissions())
        .filter(|p| p.scope == scope)
    {
        let verbs = grouped
            .entry((permission.api_group, permission.name))
            .or_default()
            .entry(permission.resource)
            .or_default();
        if !verbs.contains(&permission.verb) {
            verbs.push(permission.verb);
        }
    }
    let mut rules = Vec::new();
    for ((group, name), resources) in grouped {
        let mut by_verbs: BTreeMap<Vec<&str>, Vec<&str>> = BTreeMap::new();
        for (resource, mut verbs) in resources {
            verbs.sort_unstable();
            by_verbs.entry(verbs).or_default().push(resource);
        }
        for (verbs, resources) in by_verbs {
            let mut rule = json!({
                "apiGroups": [group],
                "resources": resources,
                "verbs": verbs,
            });
            match &name {
                ResourceName::Any => {}
                ResourceName::Fixed(fixed) => rule["resourceNames"] = json!([fixed]),
                ResourceName::Value(expression) => rule["resourceNames"] = json!([name_value(expression)]),
            }
            rules.push(rule);
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn release_rules_are_the_lease_and_the_tls_secret() {
        let rules = rules(Scope::Release, &mut |_| Value::Null);
        let expected: Vec<Value> = serde_yaml::from_str(
            r#"
- {apiGroups: [""], resources: [secrets], verbs: [create]}
- {apiGroups: [""], resources: [secrets], verbs: [get, update], resourceNames: [paddock-webhook-tls]}
- {apiGroups: [coordination.k8s.io], resources: [leases], verbs: [create]}
- {apiGroups: [coordination.k8s.io], resources: [leases], verbs: [get, update], resourceNames: [paddock-operator]}
"#,
        )
        .unwrap();
        assert_eq!(rules, expected);
    }

    #[test]
    fn every_permission_is_in_exactly_one_rule_and_nothing_else_is() {
        for scope in [Scope::Watched, Scope::Cluster, Scope::Release, Scope::Console] {
            let rules = rules(scope, &mut |expression| Value::String(expression.to_owned()));
            let mut granted = Vec::new();
            for rule in &rules {
                for resource in rule["resources"].as_array().unwrap() {
                    for verb in rule["verbs"].as_array().unwrap() {
                        granted.push((
                            rule["apiGroups"][0].as_str().unwrap().to_owned(),
                            resource.as_str().unwrap().to_owned(),
                            verb.as_str().unwrap().to_owned(),
                            rule.get("resourceNames").map(Value::to_string),
                        ));
                    }
                }
            }
            let mut wanted: Vec<_> = permissions()
                .into_iter()
                .chain(console_permissions())
                .filter(|permission| permission.scope == scope)
                .map(|permission| {
                    let names = match permission.name {
                        ResourceName::Any => None,
                        ResourceName::Fixed(name) => Some(json!([name]).to_string()),
                        ResourceName::Value(expression) => Some(json!([expression]).to_string()),
                    };
                    (
                        permission.api_group.to_owned(),
                        permission.resource.to_owned(),
                        permission.verb.to_owned(),
                        names,
                    )
                })
                .collect();
            granted.sort();
            wanted.sort();
            assert_eq!(granted, wanted, "{scope:?}");
        }
    }

    #[test]
    fn the_console_table_is_reads_reviews_and_impersonation_only() {
        // Reads: the shared caches, and CDIConfig `config` alone (to find CDI's upload proxy).
        let console = console_permissions();
        let rules = rules(Scope::Console, &mut |_| Value::Null);
        let expected: Vec<Value> = serde_yaml::from_str(
            r#"
- {apiGroups: [""], resources: [groups, serviceaccounts, users], verbs: [impersonate]}
- {apiGroups: [authentication.k8s.io], resources: [tokenreviews], verbs: [create]}
- {apiGroups: [authorization.k8s.io], resources: [subjectaccessreviews], verbs: [create]}
- {apiGroups: [cdi.kubevirt.io], resourceNames: [config], resources: [cdiconfigs], verbs: [get]}
- {apiGroups: [kubevirt.io], resources: [virtualmachineinstances, virtualmachines], verbs: [list, watch]}
- {apiGroups: [paddock.dev], resources: [virtualmachineapps], verbs: [list, watch]}
- {apiGroups: [snapshot.kubevirt.io], resources: [virtualmachinesnapshots], verbs: [list, watch]}
"#,
        )
        .unwrap();
        assert_eq!(rules, expected);
        for permission in &console {
            assert_eq!(permission.scope, Scope::Console);
            assert!(!permission.code_path.is_empty());
            // Never the operator's table: the console writes nothing with its own credentials.
            assert!(!permissions().contains(permission), "{permission:?}");
        }
        assert!(
            permissions()
                .iter()
                .all(|permission| permission.scope != Scope::Console)
        );
    }

    #[test]
    fn the_table_is_narrow() {
        let permissions = permissions();
        for permission in &permissions {
            assert!(!permission.code_path.is_empty());
            assert!(
                !["*", "escalate", "bind", "impersonate", "deletecollection"].contains(&permission.verb),
                "{permission:?}"
            );
            assert!(!permission.resource.contains('*') && !permission.api_group.contains('*'));
            // A POST create has no name in its URL, so a name-limited create would never match.
            if permission.verb == "create" {
                assert_eq!(permission.name, ResourceName::Any, "{permission:?}");
            }
            // The chart owns the webhook configurations; the operator only injects their CA bundle.
            if permission.resource.ends_with("webhookconfigurations") {
                assert!(
                    ["get", "list", "watch", "patch"].contains(&permission.verb),
                    "{permission:?}"
                );
                assert!(
                    matches!(permission.name, ResourceName::Value(_)),
                    "{permission:?}"
                );
            }
        }
        // No duplicates.
        for (index, permission) in permissions.iter().enumerate() {
            assert!(
                !permissions[index + 1..].contains(permission),
                "{permission:?} is listed twice"
            );
        }
        // The operator never reads or writes arbitrary Secrets outside the watched namespaces.
        assert!(
            permissions
                .iter()
                .all(|permission| permission.scope != Scope::Cluster
                    || permission.resource != "secrets"
                    || permission.name != ResourceName::Any)
        );
    }
}
