//! The VirtualMachineApp controller: dereference → validate → build → apply → status from children.
//!
//! Each reconcile reads the app and what the operator knows about the cluster, builds the desired
//! objects with [`paddock_api::builders::desired`] (pure, validating), server-side applies them under
//! the one field manager `paddock` with a controller owner reference to the app, prunes optional
//! children the app no longer wants, takes and prunes scheduled snapshots, and writes the status
//! derived from the children ([`crate::status`]) only when it changed. Users see Events for the
//! transitions ([`crate::status::user_events`]).
//!
//! No finalizer: every child carries a controller owner reference, so Kubernetes' garbage collector
//! deletes the DataVolume, VM, Secret, BafflesApplication and snapshots with the app, and nothing
//! outside the cluster needs cleaning up. Forcing ownership of applied fields makes the app the one
//! source of truth: a `runStrategy` changed on the app reaches the VM, one changed on the VM alone is
//! set back.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::{api::core::v1::Secret, jiff::Timestamp};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
    runtime::{
        controller::Action,
        events::{Event, EventType},
        reflector::ObjectRef,
    },
};
use paddock_api::{
    app::VirtualMachineApp,
    baffles::BafflesApplication,
    builders::{self, BuildError, MANAGER},
    cdi::datavolume::DataVolume,
    kubevirt::{virtualmachine::VirtualMachine, virtualmachinesnapshot::VirtualMachineSnapshot},
};
use serde::Serialize;

use crate::{
    Context, ReconcileError,
    snapshots::{self, SCHEDULED_LABEL},
    status::{self, BafflesState, Observed, SnapshotHealth},
};

/// The controller's name in metrics, logs and Events.
pub const CONTROLLER: &str = "virtualmachineapp";

/// How often an app is reconciled without any change, to repair drift nobody announced.
const RESYNC: Duration = Duration::from_secs(300);

/// Reconciles one VirtualMachineApp.
#[tracing::instrument(skip_all, fields(app = %app.name_any(), namespace = app.namespace().unwrap_or_default()))]
pub async fn reconcile(app: Arc<VirtualMachineApp>, context: Arc<Context>) -> Result<Action, ReconcileError> {
    crate::observed(
        CONTROLLER,
        app.as_ref(),
        &context,
        reconcile_inner(&app, &context),
    )
    .await
}

async fn reconcile_inner(app: &VirtualMachineApp, context: &Context) -> Result<Action, ReconcileError> {
    if app.metadata.deletion_timestamp.is_some() {
        // The garbage collector removes the children; nothing else to clean up.
        return Ok(Action::await_change());
    }
    let name = app.name_any();
    let namespace = app.namespace().ok_or(ReconcileError::MissingNamespace)?;
    let facts = context.facts.borrow().clone();
    let console_url = builders::console_url(&facts.console_gateway_url, &namespace, &name);

    let desired = match builders::desired(app, &facts) {
        Ok(desired) => desired,
        Err(BuildError::Invalid(invalid)) => {
            let observed = Observed {
                data_volume: None,
                ephemeral: false,
                virtual_machine: None,
                baffles: BafflesState::Disabled,
                console_url,
                snapshots: None,
                invalid_spec: Some(invalid.to_string()),
                now: Timestamp::now(),
            };
            write_status(app, &namespace, &observed, context).await?;
            // Nothing to retry: the next spec change triggers a reconcile.
            return Ok(Action::await_change());
        }
        Err(error @ BuildError::MissingMetadata(_)) => return Err(ReconcileError::Build(error)),
    };

    let client = &context.client;
    if let Some(data_volume) = &desired.data_volume {
        apply(
            &Api::<DataVolume>::namespaced(client.clone(), &namespace),
            data_volume,
        )
        .await?;
    }
    apply(
        &Api::<VirtualMachine>::namespaced(client.clone(), &namespace),
        &desired.virtual_machine,
    )
    .await?;
    let secrets = Api::<Secret>::namespaced(client.clone(), &namespace);
    match &desired.ssh_keys_secret {
        Some(secret) => apply(&secrets, secret).await?,
        None => {
            let secret_name = builders::ssh_keys_secret_name(&name);
            let existing = context
                .secrets
                .get(&ObjectRef::new(&secret_name).within(&namespace));
            prune(&secrets, existing.as_deref(), app).await?;
        }
    }
    let baffles_api = Api::<BafflesApplication>::namespaced(client.clone(), &namespace);
    let baffles = match &desired.baffles_application {
        Some(baffles) => {
            apply(&baffles_api, baffles).await?;
            BafflesState::Registered {
                url: baffles.spec.url.clone(),
            }
        }
        None if !facts.baffles_installed => BafflesState::NotInstalled,
        None => {
            let existing = context.baffles.get(&ObjectRef::new(&name).within(&namespace));
            prune(&baffles_api, existing.as_deref(), app).await?;
            BafflesState::Disabled
        }
    };

    let now = Timestamp::now();
    let mut requeue = RESYNC;
    let snapshot_health = match &app.spec.snapshots {
        Some(policy) => {
            let (health, next) = schedule_snapshots(app, &namespace, policy, now, context).await?;
            if let Some(next) = next {
                let until = now.duration_until(next).unsigned_abs();
                // A second late rather than early: the cron time must have passed when we look.
                requeue = requeue.min(until + Duration::from_secs(1));
            }
            Some(health)
        }
        None => None,
    };

    let data_volume = context
        .data_volumes
        .get(&ObjectRef::new(&builders::data_volume_name(&name)).within(&namespace));
    let virtual_machine = context
        .virtual_machines
        .get(&ObjectRef::new(&name).within(&namespace));
    let observed = Observed {
        data_volume: data_volume.as_deref(),
        ephemeral: desired.data_volume.is_none(),
        virtual_machine: virtual_machine.as_deref(),
        baffles,
        console_url,
        snapshots: snapshot_health,
        invalid_spec: None,
        now,
    };
    write_status(app, &namespace, &observed, context).await?;
    Ok(Action::requeue(requeue))
}

/// Server-side applies `object` under the `paddock` field manager, taking over conflicting fields.
pub(crate) async fn apply<K>(api: &Api<K>, object: &K) -> Result<(), ReconcileError>
where
    K: Resource<DynamicType = ()> + Serialize + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(object))
        .await
        .map_err(|source| ReconcileError::Apply {
            kind: K::kind(&()).into_owned(),
            name,
            source,
        })?;
    Ok(())
}

/// Deletes `existing` when the app owns it (never an object someone else made under the same name).
pub(crate) async fn prune<K, O>(api: &Api<K>, existing: Option<&K>, owner: &O) -> Result<(), ReconcileError>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    O: Resource,
{
    let Some(existing) = existing else { return Ok(()) };
    let owner_uid = owner.meta().uid.as_deref();
    let owned = existing
        .meta()
        .owner_references
        .iter()
        .flatten()
        .any(|reference| Some(reference.uid.as_str()) == owner_uid && reference.controller == Some(true));
    if !owned {
        return Ok(());
    }
    let name = existing.meta().name.clone().unwrap_or_default();
    let parameters = DeleteParams {
        preconditions: Some(Preconditions {
            uid: existing.meta().uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    match api.delete(&name, &parameters).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
        Err(source) => Err(ReconcileError::Delete {
            kind: K::kind(&()).into_owned(),
            name,
            source,
        }),
    }
}

async fn schedule_snapshots(
    app: &VirtualMachineApp,
    namespace: &str,
    policy: &paddock_api::app::SnapshotPolicy,
    now: Timestamp,
    context: &Context,
) -> Result<(SnapshotHealth, Option<Timestamp>), ReconcileError> {
    let name = app.name_any();
    let uid = app.uid().unwrap_or_default();
    let existing: Vec<snapshots::ExistingSnapshot> = context
        .snapshots
        .state()
        .iter()
        .filter(|snapshot| {
            snapshot.metadata.namespace.as_deref() == Some(namespace)
                && snapshot.labels().get(SCHEDULED_LABEL).map(String::as_str) == Some("true")
                && snapshot.owner_references().iter().any(|owner| owner.uid == uid)
        })
        .filter_map(|snapshot| snapshots::existing(snapshot))
        .collect();
    let created = app
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(now, |time| time.0);
    let plan = match snapshots::plan(&name, &policy.schedule, policy.keep, now, created, &existing) {
        Ok(plan) => plan,
        Err(error) => {
            return Ok((
                SnapshotHealth::Failing {
                    reason: "InvalidSchedule".to_owned(),
                    message: error.to_string(),
                },
                None,
            ));
        }
    };
    let api = Api::<VirtualMachineSnapshot>::namespaced(context.client.clone(), namespace);
    let mut failure = plan.failed.as_ref().map(|(snapshot, message)| SnapshotHealth::Failing {
        reason: "SnapshotFailed".to_owned(),
        message: format!(
            "scheduled snapshot {snapshot} failed: {message}; check the VM's volumes support snapshots (a VolumeSnapshotClass for their StorageClass)"
        ),
    });
    if let Some((snapshot_name, scheduled_at)) = &plan.create {
        let owner = app
            .controller_owner_ref(&())
            .ok_or(ReconcileError::MissingNamespace)?;
        let snapshot = snapshots::build_snapshot(&name, namespace, owner, snapshot_name, *scheduled_at);
        match api.create(&PostParams::default(), &snapshot).await {
            Ok(_) => {
                tracing::info!(snapshot = %snapshot_name, "took a scheduled snapshot");
                publish(
                    context,
                    app,
                    status::UserEvent {
                        warning: false,
                        reason: "SnapshotCreated",
                        action: "Snapshot",
                        note: format!("scheduled snapshot {snapshot_name} for {scheduled_at}"),
                    },
                )
                .await;
            }
            // Created before a crash or by the other replica's last reconcile: the same time, the same name.
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(error) => {
                failure = Some(SnapshotHealth::Failing {
                    reason: "SnapshotCreateFailed".to_owned(),
                    message: format!("cannot create scheduled snapshot {snapshot_name}: {error}"),
                });
            }
        }
    }
    for old in &plan.delete {
        match api.delete(old, &DeleteParams::background()).await {
            Ok(_) => tracing::info!(snapshot = %old, "pruned a scheduled snapshot beyond keep"),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(source) => {
                return Err(ReconcileError::Delete {
                    kind: "VirtualMachineSnapshot".to_owned(),
                    name: old.clone(),
                    source,
                });
            }
        }
    }
    let health = failure.unwrap_or(SnapshotHealth::Scheduled {
        next: plan.next.to_string(),
    });
    Ok((health, Some(plan.next)))
}

async fn write_status(
    app: &VirtualMachineApp,
    namespace: &str,
    observed: &Observed<'_>,
    context: &Context,
) -> Result<(), ReconcileError> {
    let desired = status::derive_status(app, observed);
    if status::unchanged(app.status.as_ref(), &desired) {
        return Ok(());
    }
    let api = Api::<VirtualMachineApp>::namespaced(context.client.clone(), namespace);
    let patch = serde_json::json!({
        "apiVersion": VirtualMachineApp::api_version(&()),
        "kind": VirtualMachineApp::kind(&()),
        "status": desired,
    });
    api.patch_status(
        &app.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(ReconcileError::Status)?;
    for event in status::user_events(app.status.as_ref(), &desired) {
        publish(context, app, event).await;
    }
    Ok(())
}

/// Publishes an Event about `app`; a failure is logged, never fatal (Events are best effort).
pub(crate) async fn publish<K: Resource<DynamicType = ()>>(
    context: &Context,
    object: &K,
    event: status::UserEvent,
) {
    let event = Event {
        type_: if event.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: event.reason.to_owned(),
        note: Some(event.note),
        action: event.action.to_owned(),
        secondary: None,
    };
    if let Err(error) = context.recorder.publish(&event, &object.object_ref(&())).await {
        tracing::warn!(%error, reason = %event.reason, "cannot publish an event");
    }
}
