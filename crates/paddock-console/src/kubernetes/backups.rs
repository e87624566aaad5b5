//! Backups from the console in cluster mode: backups of a VM to a registry and restores into the
//! cluster, as the signed-in user, with `paddock_cluster::backup` (what `paddock backup create
//! --cluster` and `paddock backup restore --kubeconfig` run), as the same long-running operations
//! the local backend uses ([`crate::backups::Operations`]).
//!
//! Contract:
//! - Everything that touches the cluster runs as the user: a `kube::Client` made from the
//!   console's own configuration with impersonation of the user and their groups, so RBAC decides
//!   and the audit log names the user. Before an operation starts, SubjectAccessReviews check what
//!   it will need; the first missing permission is a 403 naming it (nothing was created). A
//!   refusal during the operation fails it with the API server's words.
//! - A backup needs `get` on the VM's VirtualMachineApp, VirtualMachine and VirtualMachineInstance,
//!   `create`/`get`/`delete` virtualmachineexports, `get` secrets (the export's token) and, for a
//!   running VM, `create`/`delete` virtualmachinesnapshots. A restore needs `create`
//!   virtualmachineapps in the target namespace (and `get`/`delete` to replace one).
//! - Registry access uses the console's credentials: the docker config of
//!   [`BackupSettings::docker_config_dir`] (a mounted Secret), else the process's. Plain http
//!   (`insecure` in a request) only when [`BackupSettings::allow_insecure`] says so; otherwise a
//!   400 saying that the console's operator can allow it.
//! - Listing reads the registry with those credentials, but shows only backups of VMs in
//!   namespaces where the user may `list virtualmachines`; operations likewise show only those
//!   on VMs the user may `get`.
//! - The disk is read through [`BackupSettings::export_link`] (internal by default: the console
//!   runs in the cluster) into a scratch directory under [`BackupSettings::scratch_parent`].

use std::path::PathBuf;
use std::sync::Arc;

use kube::api::ApiResource;
use paddock_cluster::backup::{BackupError as ClusterBackupError, BackupOptions, ExportLink};
use paddock_local::VmId;
use paddock_local::backup::{RestoreOptions, restored_definition};
use paddock_oci::ImageOptions;
use paddock_oci::backup::inspect_backup;
use paddock_oci::registry::RegistryOptions;

use super::{Kind, UserBackend, permission};
use crate::backend::{
    BackendError, BackendResult, BackupListRequest, BackupRequest, BackupView, ErrorKind, OperationProgress,
    OperationView, Permission, RestoreRequest, UserInfo, VmRef,
};
use crate::backups::{
    OperationBackupProgress, backup_view, check_registry, list_with, oci_error, push_options, pushed_view,
};

/// How the console backs up in cluster mode (its flags).
#[derive(Debug, Clone, Default)]
pub struct BackupSettings {
    /// The directory holding the docker `config.json` with registry credentials (a mounted
    /// `kubernetes.io/dockerconfigjson` Secret); `$DOCKER_CONFIG`, else `~/.docker`, when `None`.
    pub docker_config_dir: Option<PathBuf>,
    /// Honour `insecure` (plain http) in requests: for a registry on loopback or a test registry.
    pub allow_insecure: bool,
    /// Which link of a VirtualMachineExport to read: internal (the export server's Service, from
    /// inside the cluster) or external (the export proxy's Ingress or Route).
    pub export_link: ExportLink,
    /// Where the scratch directories go (room for a raw disk and its compressed copy); the
    /// system's temporary directory when `None`.
    pub scratch_parent: Option<PathBuf>,
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    paddock_cluster::backup::api_resource(group, version, kind, plural)
}

fn export_resource() -> ApiResource {
    resource(
        "export.kubevirt.io",
        "v1beta1",
        "VirtualMachineExport",
        "virtualmachineexports",
    )
}

fn secret_resource() -> ApiResource {
    resource("", "v1", "Secret", "secrets")
}

/// The backend error for a failed cluster backup or restore; `what` starts the message.
fn cluster_error(what: &str, namespace: &str, error: ClusterBackupError) -> BackendError {
    let message = format!("{what}: {error}");
    match error {
        ClusterBackupError::Kubernetes {
            action,
            source: kube::Error::Api(status),
        } if status.code == 403 => {
            // The library says what it attempted ("create VirtualMachineExport ns/name"); the
            // API server's details name the resource.
            let verb = match action.split_whitespace().next() {
                Some("read") => "get",
                Some(verb) => verb,
                None => "use",
            };
            let details = status.details.as_ref();
            let needed = Permission {
                verb: verb.to_string(),
                group: details.map(|details| details.group.clone()).unwrap_or_default(),
                resource: details.map(|details| details.kind.clone()).unwrap_or_default(),
                subresource: None,
                namespace: Some(namespace.to_string()),
                name: details
                    .map(|details| details.name.clone())
                    .filter(|name| !name.is_empty()),
            };
            BackendError::forbidden(
                needed.clone(),
                format!(
                    "{message}; the signed-in user lacks the permission to {needed}: ask a cluster administrator for a Role granting it"
                ),
            )
        }
        ClusterBackupError::Kubernetes {
            source: kube::Error::Api(status),
            ..
        } if status.code == 404 => BackendError::new(ErrorKind::NotFound, message),
        ClusterBackupError::NoVirtualMachine { .. } => BackendError::new(ErrorKind::NotFound, message),
        ClusterBackupError::Exists { .. } => BackendError::new(ErrorKind::AlreadyExists, message),
        ClusterBackupError::Repository { .. } => BackendError::new(ErrorKind::BadRequest, message),
        ClusterBackupError::Download { .. } | ClusterBackupError::Push { .. } => {
            BackendError::new(ErrorKind::BadGateway, message)
        }
        ClusterBackupError::Build(oci) => oci_error(what, oci),
        _ => BackendError::new(ErrorKind::Internal, message),
    }
}

impl UserBackend {
    /// A client of the API server acting as the signed-in user (impersonation of the user and
    /// their groups with the console's own credentials).
    fn user_client(&self) -> BackendResult<kube::Client> {
        let mut config = self.shared.config.clone();
        let user: &UserInfo = &self.user;
        config.auth_info.impersonate = Some(user.username.clone());
        config.auth_info.impersonate_groups = (!user.groups.is_empty()).then(|| user.groups.clone());
        kube::Client::try_from(config).map_err(|error| {
            BackendError::new(
                ErrorKind::Internal,
                format!(
                    "cannot create a Kubernetes client acting as {}: {error}",
                    user.username
                ),
            )
        })
    }

    /// The registry options for a request's `insecure`; 400 when the console does not allow it.
    fn registry(&self, insecure: bool, what: &str) -> BackendResult<RegistryOptions> {
        let settings = &self.shared.backup;
        if insecure && !settings.allow_insecure {
            return Err(BackendError::new(
                ErrorKind::BadRequest,
                format!(
                    "{what}: this console speaks https to registries only; its operator can allow plain http (a registry on loopback or for tests) with `paddock serve --registry-allow-insecure`"
                ),
            ));
        }
        Ok(RegistryOptions {
            insecure,
            credentials: None,
            docker_config_dir: settings.docker_config_dir.clone(),
        })
    }

    /// Ok when the user may do every one of `needed`, else a 403 naming the first missing one.
    async fn require_all(&self, needed: &[Permission]) -> BackendResult<()> {
        for permission in needed {
            self.shared.access.require(&self.user, permission).await?;
        }
        Ok(())
    }

    /// Whether the user may see an operation on `namespace/name`.
    async fn may_see(&self, namespace: &str, name: &str) -> bool {
        self.shared
            .access
            .allowed(
                &self.user,
                &permission("get", &Kind::Vm.resource(), None, namespace, Some(name)),
            )
            .await
            .unwrap_or(false)
    }

    /// Checks a backup request and starts it (see the module contract).
    pub(super) async fn backup_as_user(
        &self,
        vm: VmRef,
        request: BackupRequest,
    ) -> BackendResult<OperationView> {
        let objects = self.visible(&vm).await?;
        let running = objects.vmi.is_some();
        let what = format!("cannot back up virtual machine {vm} to {}", request.repository);
        let registry = self.registry(request.insecure, &what)?;
        let (namespace, name) = (vm.namespace.as_str(), vm.name.as_str());
        // What makes a backup first (the export), then what it reads; the first one missing is
        // the one a 403 names.
        let mut needed = vec![
            permission("create", &export_resource(), None, namespace, None),
            permission("get", &export_resource(), None, namespace, None),
            permission("delete", &export_resource(), None, namespace, None),
            permission("get", &secret_resource(), None, namespace, None),
        ];
        if running {
            needed.push(permission(
                "create",
                &Kind::Snapshot.resource(),
                None,
                namespace,
                None,
            ));
            needed.push(permission(
                "delete",
                &Kind::Snapshot.resource(),
                None,
                namespace,
                None,
            ));
        }
        needed.push(permission(
            "get",
            &Kind::App.resource(),
            None,
            namespace,
            Some(name),
        ));
        needed.push(permission(
            "get",
            &Kind::Vmi.resource(),
            None,
            namespace,
            Some(name),
        ));
        self.require_all(&needed).await?;
        check_registry(&what, &request.repository, &registry).await?;
        let client = self.user_client()?;
        let operations = Arc::clone(&self.shared.operations);
        let id = VmId {
            namespace: vm.namespace.clone(),
            name: vm.name.clone(),
        };
        let operation = operations.begin(
            "Backup",
            &id,
            &format!("backing up {vm} to {}", request.repository),
        )?;
        let settings = &self.shared.backup;
        let options = BackupOptions {
            repository: request.repository.clone(),
            push: push_options(&registry),
            image: ImageOptions::default(),
            link: settings.export_link,
            scratch_parent: settings.scratch_parent.clone(),
        };
        let progress = Arc::new(OperationBackupProgress::new(
            Arc::clone(&operations),
            &operation.id,
        ));
        let operation_id = operation.id.clone();
        let user = self.user.username.clone();
        tokio::spawn(async move {
            let result = paddock_cluster::backup::backup(
                &client,
                &id.namespace,
                &id.name,
                &options,
                Arc::clone(&progress) as Arc<dyn paddock_cluster::backup::BackupProgress>,
            )
            .await;
            let warnings = progress.warnings();
            let outcome = match result {
                Ok(report) => {
                    let view = match inspect_backup(&report.reference, &registry).await {
                        Ok(entry) => backup_view(&entry),
                        Err(error) => {
                            tracing::warn!(%error, reference = %report.reference, "cannot read the new backup back");
                            pushed_view(
                                [
                                    &report.reference,
                                    &report.pinned_reference,
                                    &report.tag,
                                    &report.digest,
                                ],
                                &report.info,
                            )
                        }
                    };
                    tracing::info!(vm = %id, %user, reference = %report.reference, "backup done");
                    let mut result = report.reference.clone();
                    if !warnings.is_empty() {
                        result = format!("{result} ({})", warnings.join("; "));
                    }
                    Ok((result, Some(view)))
                }
                Err(error) => {
                    tracing::warn!(vm = %id, %user, %error, "backup failed");
                    let mut mapped = cluster_error(&what, &id.namespace, error);
                    for warning in warnings {
                        mapped.message = format!("{}; {warning}", mapped.message);
                    }
                    Err(mapped)
                }
            };
            operations.finish(&operation_id, outcome);
        });
        Ok(operation)
    }

    /// The complete backups in a repository of VMs in namespaces where the user may list VMs.
    pub(super) async fn backup_list_as_user(
        &self,
        request: BackupListRequest,
    ) -> BackendResult<Vec<BackupView>> {
        let what = format!("cannot list the backups in {}", request.repository);
        let registry = self.registry(request.insecure, &what)?;
        if let Some(namespace) = &request.namespace {
            self.shared
                .access
                .require(
                    &self.user,
                    &permission("list", &Kind::Vm.resource(), None, namespace, None),
                )
                .await?;
        }
        let entries = list_with(request, &registry).await?;
        let mut visible = Vec::with_capacity(entries.len());
        for entry in entries {
            if self
                .shared
                .access
                .allowed(
                    &self.user,
                    &permission("list", &Kind::Vm.resource(), None, &entry.namespace, None),
                )
                .await?
            {
                visible.push(entry);
            }
        }
        Ok(visible)
    }

    /// Checks a restore request and starts it (see the module contract).
    pub(super) async fn restore_as_user(&self, request: RestoreRequest) -> BackendResult<OperationView> {
        let what = format!("cannot restore {}", request.reference);
        let registry = self.registry(request.insecure, &what)?;
        let entry = inspect_backup(&request.reference, &registry)
            .await
            .map_err(|error| oci_error(&what, error))?;
        let options = RestoreOptions {
            name: request.name.clone(),
            namespace: request.namespace.clone(),
            replace: request.replace,
        };
        let mut app = restored_definition(&entry, &options)
            .map_err(|error| BackendError::new(ErrorKind::InvalidSpec, format!("{what}: {error}")))?;
        if request.start {
            app.spec.run_strategy = paddock_api::app::RunStrategy::Always;
        }
        let target = VmId::of_app(&app)
            .map_err(|error| BackendError::new(ErrorKind::InvalidSpec, format!("{what}: {error}")))?;
        let (namespace, name) = (target.namespace.as_str(), target.name.as_str());
        let app_resource = Kind::App.resource();
        let mut needed = vec![
            permission("get", &app_resource, None, namespace, Some(name)),
            permission("create", &app_resource, None, namespace, None),
        ];
        if request.replace {
            needed.push(permission("delete", &app_resource, None, namespace, Some(name)));
        }
        self.require_all(&needed).await?;
        self.synced().await?;
        let target_ref = VmRef {
            namespace: target.namespace.clone(),
            name: target.name.clone(),
        };
        let existing = self.objects(&target_ref);
        if existing.exists() && !request.replace {
            return Err(BackendError::new(
                ErrorKind::AlreadyExists,
                format!("{what}: virtual machine {target} exists; choose another name, or replace it"),
            ));
        }
        let client = self.user_client()?;
        let operations = Arc::clone(&self.shared.operations);
        let operation = operations.begin(
            "Restore",
            &target,
            &format!("restoring {} as {target}", entry.pinned_reference),
        )?;
        operations.progress(
            &operation.id,
            OperationProgress {
                stage: "Creating".to_string(),
                bytes_done: 0,
                bytes_total: 0,
                percent: None,
            },
            &format!(
                "creating VirtualMachineApp {target} from {}; the cluster then imports the disk",
                entry.pinned_reference
            ),
        );
        let operation_id = operation.id.clone();
        let replace = request.replace;
        let user = self.user.username.clone();
        tokio::spawn(async move {
            let outcome = paddock_cluster::backup::restore(&client, &app, replace)
                .await
                .map(|()| {
                    tracing::info!(vm = %target, %user, from = %entry.pinned_reference, "restore done");
                    (target.to_string(), None)
                })
                .map_err(|error| {
                    tracing::warn!(vm = %target, %user, %error, "restore failed");
                    cluster_error(&what, &target.namespace, error)
                });
            operations.finish(&operation_id, outcome);
        });
        Ok(operation)
    }

    /// One operation, when it concerns a VM the user may `get`.
    pub(super) async fn operation_as_user(&self, id: &str) -> BackendResult<OperationView> {
        let operation = self.shared.operations.get(id)?;
        if self.may_see(&operation.namespace, &operation.name).await {
            Ok(operation)
        } else {
            // Not 403: whether an id exists is not the user's business.
            Err(BackendError::new(
                ErrorKind::NotFound,
                format!("no operation {id} on a virtual machine you may read"),
            ))
        }
    }

    /// The operations on VMs the user may `get`, oldest first.
    pub(super) async fn operation_list_as_user(&self) -> BackendResult<Vec<OperationView>> {
        let mut visible = Vec::new();
        for operation in self.shared.operations.list() {
            if self.may_see(&operation.namespace, &operation.name).await {
                visible.push(operation);
            }
        }
        Ok(visible)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn api_error(code: u16, details: serde_json::Value) -> kube::Error {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "status": "Failure",
            "code": code,
            "reason": "Forbidden",
            "message": "virtualmachineexports.export.kubevirt.io is forbidden: User \"bob\" cannot create resource \"virtualmachineexports\"",
            "details": details,
        }))
        .unwrap();
        kube::Error::Api(Box::new(status))
    }

    #[test]
    fn a_refusal_during_a_backup_names_the_permission_from_the_api_server() {
        let error = cluster_error(
            "cannot back up virtual machine vms/web",
            "vms",
            ClusterBackupError::Kubernetes {
                action: "create VirtualMachineExport vms/web-backup-1".to_string(),
                source: api_error(
                    403,
                    serde_json::json!({"group": "export.kubevirt.io", "kind": "virtualmachineexports"}),
                ),
            },
        );
        assert_eq!(error.kind, ErrorKind::Forbidden);
        let needed = error.permission.as_deref().unwrap();
        assert_eq!(
            (
                needed.verb.as_str(),
                needed.group.as_str(),
                needed.resource.as_str()
            ),
            ("create", "export.kubevirt.io", "virtualmachineexports")
        );
        assert_eq!(needed.namespace.as_deref(), Some("vms"));
        assert!(
            error.message.contains("cannot create resource"),
            "{}",
            error.message
        );
        assert!(
            error
                .message
                .starts_with("cannot back up virtual machine vms/web: ")
        );
    }

    #[test]
    fn other_failures_keep_their_kind() {
        let missing = cluster_error(
            "cannot back up",
            "vms",
            ClusterBackupError::NoVirtualMachine {
                namespace: "vms".to_string(),
                name: "web".to_string(),
                hint: "",
            },
        );
        assert_eq!(missing.kind, ErrorKind::NotFound);
        let exists = cluster_error(
            "cannot restore",
            "vms",
            ClusterBackupError::Exists {
                namespace: "vms".to_string(),
                name: "web".to_string(),
            },
        );
        assert_eq!(exists.kind, ErrorKind::AlreadyExists);
        let download = cluster_error(
            "cannot back up",
            "vms",
            ClusterBackupError::Download {
                url: "https://export".to_string(),
                reason: "reset".to_string(),
            },
        );
        assert_eq!(download.kind, ErrorKind::BadGateway);
    }
}
