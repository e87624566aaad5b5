//! The VirtualMachineApp controller: dereference → validate → build → apply → status from children.
//!
//! Each reconcile reads the app and what the operator knows about the cluster, builds the desired
//! objects with [`paddock_api::builders::desired`] (pure, validating), server-side applies those the
//! cache does not already hold as desired ([`crate::drift`]) under the one field manager `paddock`
//! with a controller owner reference to the app, prunes optional children the app no longer wants,
//! takes and prunes scheduled snapshots, and writes the status derived from the children
//! ([`crate::status`]) only when it changed. Users see Events for the transitions
//! ([`crate::status::user_events`]). A reconcile of an app whose spec and children are as desired
//! sends no request at all.
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
    Context, Metrics, ReconcileError,
    drift::{self, Decision},
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
    // Until the children's caches are filled every child would look missing and be applied again.
    let _ = context.children_synced.clone().wait_for(|synced| *synced).await;
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

    let ephemeral = desired.data_volume.is_none();
    let client = &context.client;
    let metrics = &context.metrics;
    // The children do not depend on each other (KubeVirt waits for a DataVolume or Secret the VM
    // names), so they are applied concurrently: a new app costs one round trip, not four.
    // What an apply answers is the child as stored now, fresher than the cache, which has not seen
    // the write yet: the status below is derived from it, so a new app's first status already
    // describes its children instead of reporting them missing.
    let data_volume_child = async {
        let Some(data_volume) = desired.data_volume else {
            return Ok(None);
        };
        let existing = context
            .data_volumes
            .get(&ObjectRef::new(&builders::data_volume_name(&name)).within(&namespace));
        ensure(
            &Api::<DataVolume>::namespaced(client.clone(), &namespace),
            data_volume,
            existing.as_deref(),
            metrics,
        )
        .await
    };
    let virtual_machine_child = async {
        let existing = context
            .virtual_machines
            .get(&ObjectRef::new(&name).within(&namespace));
        ensure(
            &Api::<VirtualMachine>::namespaced(client.clone(), &namespace),
            desired.virtual_machine,
            existing.as_deref(),
            metrics,
        )
        .await
    };
    let secret_child = async {
        let secrets = Api::<Secret>::namespaced(client.clone(), &namespace);
        let existing = context
            .secrets
            .get(&ObjectRef::new(&builders::ssh_keys_secret_name(&name)).within(&namespace));
        match desired.ssh_keys_secret {
            Some(secret) => ensure(&secrets, secret, existing.as_deref(), metrics)
                .await
                .map(drop),
            None => prune(&secrets, existing.as_deref(), app, metrics).await,
        }
    };
    let baffles_child = async {
        let baffles_api = Api::<BafflesApplication>::namespaced(client.clone(), &namespace);
        let existing = context.baffles.get(&ObjectRef::new(&name).within(&namespace));
        match desired.baffles_application {
            Some(baffles) => {
                let url = baffles.spec.url.clone();
                ensure(&baffles_api, baffles, existing.as_deref(), metrics).await?;
                Ok(BafflesState::Registered { url })
            }
            None if !facts.baffles_installed => Ok(BafflesState::NotInstalled),
            None => {
                prune(&baffles_api, existing.as_deref(), app, metrics).await?;
                Ok(BafflesState::Disabled)
            }
        }
    };
    let (applied_data_volume, applied_virtual_machine, (), baffles) = futures_util::future::try_join4(
        data_volume_child,
        virtual_machine_child,
        secret_child,
        baffles_child,
    )
    .await?;

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

    let data_volume = applied_data_volume.map(Arc::new).or_else(|| {
        context
            .data_volumes
            .get(&ObjectRef::new(&builders::data_volume_name(&name)).within(&namespace))
    });
    let virtual_machine = applied_virtual_machine.map(Arc::new).or_else(|| {
        context
            .virtual_machines
            .get(&ObjectRef::new(&name).within(&namespace))
    });
    let observed = Observed {
        data_volume: data_volume.as_deref(),
        ephemeral,
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

/// Server-side applies `desired`, stamped with its hash, unless `cached` (the reflector's copy of the
/// child) already is as desired ([`crate::drift::decide`]): an unchanged app costs no request.
pub(crate) async fn ensure<K>(
    api: &Api<K>,
    mut desired: K,
    cached: Option<&K>,
    metrics: &Metrics,
) -> Result<Option<K>, ReconcileError>
where
    K: Resource<DynamicType = ()> + Serialize + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let kind = K::kind(&()).into_owned();
    let name = desired.meta().name.clone().unwrap_or_default();
    let serialization = |source| ReconcileError::Apply {
        kind: kind.clone(),
        name: name.clone(),
        source: kube::Error::SerdeError(source),
    };
    drift::stamp(&mut desired).map_err(serialization)?;
    let desired_json = serde_json::to_value(&desired).map_err(serialization)?;
    let cached_json = cached
        .map(serde_json::to_value)
        .transpose()
        .map_err(serialization)?;
    match drift::decide(&desired_json, cached_json.as_ref()) {
        Decision::Skip => {
            metrics.skipped_apply(&kind);
            Ok(None)
        }
        Decision::Apply(reason) => {
            tracing::debug!(%kind, %name, %reason, "applying");
            metrics.wrote(&kind, "apply");
            apply(api, &desired).await.map(Some)
        }
    }
}

/// Server-side applies `object` under the `paddock` field manager, taking over conflicting fields;
/// returns the object as the API server stored it.
async fn apply<K>(api: &Api<K>, object: &K) -> Result<K, ReconcileError>
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
        })
}

/// Deletes `existing` when the app owns it (never an object someone else made under the same name).
pub(crate) async fn prune<K, O>(
    api: &Api<K>,
    existing: Option<&K>,
    owner: &O,
    metrics: &Metrics,
) -> Result<(), ReconcileError>
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
    metrics.wrote(&K::kind(&()), "delete");
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
        context.metrics.wrote("VirtualMachineSnapshot", "create");
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
        context.metrics.wrote("VirtualMachineSnapshot", "delete");
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
    // While the cache still holds the app from before this process's last status write, compare with
    // what was written instead: the stale copy would make the same status look changed and be
    // written again (with new transition times).
    let written;
    let current = match context.written_statuses.behind_cache(app) {
        Some(status) => {
            written = VirtualMachineApp {
                status: Some(status),
                ..app.clone()
            };
            &written
        }
        None => app,
    };
    let desired = status::derive_status(current, observed);
    if status::unchanged(current.status.as_ref(), &desired) {
        return Ok(());
    }
    let api = Api::<VirtualMachineApp>::namespaced(context.client.clone(), namespace);
    context
        .metrics
        .wrote(VirtualMachineApp::kind(&()).as_ref(), "status");
    let patch = serde_json::json!({
        "apiVersion": VirtualMachineApp::api_version(&()),
        "kind": VirtualMachineApp::kind(&()),
        "status": desired,
    });
    let updated = api
        .patch_status(
            &app.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(ReconcileError::Status)?;
    context
        .written_statuses
        .record(app, updated.metadata.resource_version, desired.clone());
    for event in status::user_events(current.status.as_ref(), &desired) {
        publish(context, app, event).await;
    }
    Ok(())
}

/// How long a written status stands in for the cached one at most: the cache lags by milliseconds;
/// bounded so that a status someone else wrote meanwhile is repaired by the next reconcile after it.
const WRITTEN_STATUS_WINDOW: Duration = Duration::from_secs(10);

/// The statuses this process wrote that the cache may not show yet, by namespace and name.
#[derive(Default)]
pub(crate) struct WrittenStatuses(
    std::sync::Mutex<std::collections::HashMap<(String, String), WrittenStatus>>,
);

struct WrittenStatus {
    resource_version: Option<String>,
    status: paddock_api::app::VirtualMachineAppStatus,
    at: std::time::Instant,
}

impl WrittenStatuses {
    fn key(app: &VirtualMachineApp) -> (String, String) {
        (app.namespace().unwrap_or_default(), app.name_any())
    }

    /// The status last written for `app` while the cached `app` is not the version that write
    /// produced (and the write is recent); `None` once the cache has caught up (the entry is dropped).
    fn behind_cache(&self, app: &VirtualMachineApp) -> Option<paddock_api::app::VirtualMachineAppStatus> {
        let mut written = self.0.lock().ok()?;
        let key = Self::key(app);
        let entry = written.get(&key)?;
        if entry.resource_version == app.metadata.resource_version
            || entry.at.elapsed() > WRITTEN_STATUS_WINDOW
        {
            written.remove(&key);
            return None;
        }
        Some(entry.status.clone())
    }

    fn record(
        &self,
        app: &VirtualMachineApp,
        resource_version: Option<String>,
        status: paddock_api::app::VirtualMachineAppStatus,
    ) {
        if let Ok(mut written) = self.0.lock() {
            // Entries of apps deleted before the cache caught up would stay: drop the expired ones.
            if written.len() > 1024 {
                written.retain(|_, entry| entry.at.elapsed() <= WRITTEN_STATUS_WINDOW);
            }
            written.insert(
                Self::key(app),
                WrittenStatus {
                    resource_version,
                    status,
                    at: std::time::Instant::now(),
                },
            );
        }
    }
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
    context.metrics.wrote("Event", "event");
    if let Err(error) = context.recorder.publish(&event, &object.object_ref(&())).await {
        tracing::warn!(%error, reason = %event.reason, "cannot publish an event");
    }
}
