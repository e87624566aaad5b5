//! Helpers every simulated controller shares: timestamps, status patches, condition lists and the
//! kube-runtime plumbing (requeue policy, running a controller until its stream ends).

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use crate::Error;

/// The field manager of every write this crate makes.
pub(crate) const FIELD_MANAGER: &str = "paddock-kubevirt-simulator";

/// Patch parameters naming this crate as the field manager.
pub(crate) fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    }
}

/// Why one reconcile failed; the object is retried after [`RETRY`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReconcileError {
    /// The API server refused a request.
    #[error("api request failed: {0}")]
    Kube(#[from] kube::Error),
    /// Anything else (local file system, unexpected object shape).
    #[error("{0}")]
    Other(String),
}

/// How long a failed reconcile waits before it is retried.
pub(crate) const RETRY: Duration = Duration::from_secs(2);

/// Now as an RFC 3339 timestamp with second precision (`2026-01-02T03:04:05Z`), as Kubernetes writes
/// `metav1.Time`.
pub fn now() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    // Kubernetes serializes metav1.Time with second precision.
    let seconds = now.as_second();
    k8s_openapi::jiff::Timestamp::from_second(seconds)
        .unwrap_or(now)
        .to_string()
}

/// Merge-patches `status` of `name` (through the status subresource).
pub(crate) async fn patch_status<K>(api: &Api<K>, name: &str, status: Value) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + Debug,
{
    api.patch_status(name, &patch_params(), &Patch::Merge(json!({ "status": status })))
        .await
        .map(|_| ())
}

/// Merge-patches `status` of `name` through the main resource, for CRDs without a status subresource
/// (VirtualMachineInstance, CDIConfig), where virt-controller writes status with ordinary updates.
pub(crate) async fn patch_status_in_place<K>(
    api: &Api<K>,
    name: &str,
    status: Value,
) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + Debug,
{
    api.patch(name, &patch_params(), &Patch::Merge(json!({ "status": status })))
        .await
        .map(|_| ())
}

/// A condition as KubeVirt and CDI write them.
pub(crate) fn condition(kind: &str, status: bool, reason: &str, message: &str) -> Value {
    let now = now();
    json!({
        "type": kind,
        "status": if status { "True" } else { "False" },
        "reason": reason,
        "message": message,
        "lastProbeTime": null,
        "lastTransitionTime": now,
    })
}

/// A condition as KubeVirt's snapshot, restore and clone controllers write them: a reason, no
/// message, probed and changed now.
pub(crate) fn condition_without_message(kind: &str, status: bool, reason: &str) -> Value {
    let now = now();
    json!({
        "type": kind,
        "status": if status { "True" } else { "False" },
        "reason": reason,
        "lastProbeTime": now,
        "lastTransitionTime": now,
    })
}

/// Sets the `Progressing` and `Ready` conditions that KubeVirt's snapshot, restore and clone
/// controllers always write together (see [`condition_without_message`]).
pub(crate) fn set_progressing_and_ready(
    conditions: &mut Vec<Value>,
    progressing: bool,
    progressing_reason: &str,
    ready: bool,
    ready_reason: &str,
) {
    set_condition(
        conditions,
        condition_without_message("Progressing", progressing, progressing_reason),
    );
    set_condition(
        conditions,
        condition_without_message("Ready", ready, ready_reason),
    );
}

/// `length` characters drawn uniformly enough from `alphabet` (ASCII) with the operating system's
/// random source, for generated names and tokens.
pub(crate) fn random_string(alphabet: &[u8], length: usize) -> Result<String, ReconcileError> {
    let mut random = vec![0_u8; length];
    getrandom::fill(&mut random)
        .map_err(|error| ReconcileError::Other(format!("random source failed: {error}")))?;
    Ok(random
        .iter()
        .map(|byte| alphabet[usize::from(*byte) % alphabet.len()] as char)
        .collect())
}

/// The claim names of a pod-template `volumes` list: each DataVolume's name or PersistentVolumeClaim's
/// claim name, in order (there are no PVCs here: a DataVolume of the claim's name stands for one).
pub(crate) fn claim_names(volumes: Option<&Value>) -> Vec<String> {
    volumes
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|volume| {
            volume
                .pointer("/dataVolume/name")
                .or_else(|| volume.pointer("/persistentVolumeClaim/claimName"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect()
}

/// Replaces (or adds) `new` in `conditions` by type, keeping the old `lastTransitionTime` when the
/// status did not change (as the real condition managers do).
pub(crate) fn set_condition(conditions: &mut Vec<Value>, mut new: Value) {
    let kind = new.get("type").cloned();
    if let Some(old) = conditions.iter_mut().find(|old| old.get("type") == kind.as_ref()) {
        if old.get("status") == new.get("status")
            && let (Some(time), Some(object)) = (old.get("lastTransitionTime").cloned(), new.as_object_mut())
        {
            object.insert("lastTransitionTime".to_owned(), time);
        }
        *old = new;
    } else {
        conditions.push(new);
    }
}

/// The conditions of an object's status as JSON values.
pub(crate) fn conditions_of<T: serde::Serialize>(conditions: &Option<Vec<T>>) -> Vec<Value> {
    conditions
        .iter()
        .flatten()
        .filter_map(|condition| serde_json::to_value(condition).ok())
        .collect()
}

/// Whether `conditions` holds `kind` with status `True`.
pub(crate) fn has_true(conditions: &[Value], kind: &str) -> bool {
    conditions.iter().any(|condition| {
        condition.get("type").and_then(Value::as_str) == Some(kind)
            && condition.get("status").and_then(Value::as_str) == Some("True")
    })
}

/// The requeue policy for failed reconciles: retry a write conflict (the watch cache lagged) at
/// once, anything else after [`RETRY`].
pub(crate) fn retry_on_error<K, C>(_object: Arc<K>, error: &ReconcileError, _context: Arc<C>) -> Action {
    if let ReconcileError::Kube(kube::Error::Api(status)) = error
        && status.code == 409
    {
        tracing::debug!(%error, "write conflict; reconciling again");
        return Action::requeue(Duration::from_millis(100));
    }
    tracing::warn!(%error, "reconcile failed; retrying");
    Action::requeue(RETRY)
}

/// Drives a kube-runtime controller stream until it ends (which only happens when the watch cannot
/// be established any more), logging every reconcile error.
pub(crate) async fn drive<S, T, E>(controller: &'static str, stream: S) -> Result<(), Error>
where
    S: futures_util::Stream<Item = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(result) = stream.next().await {
        if let Err(error) = result {
            tracing::debug!(controller, %error, "controller event");
        }
    }
    Err(Error::Controller {
        controller,
        reason: "its watch stream ended".to_owned(),
    })
}

/// An owner reference marking `owner` as the controller of an object.
pub(crate) fn controller_reference<K: kube::Resource<DynamicType = ()>>(owner: &K) -> Value {
    json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "name": owner.meta().name,
        "uid": owner.meta().uid,
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

/// Whether `object` is controlled by the object with `uid`.
pub(crate) fn is_controlled_by(object: &impl kube::Resource, uid: Option<&str>) -> bool {
    object
        .meta()
        .owner_references
        .iter()
        .flatten()
        .any(|owner| owner.controller == Some(true) && Some(owner.uid.as_str()) == uid)
}
