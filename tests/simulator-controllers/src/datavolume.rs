//! Simulated CDI DataVolume controllers: registry import (real pull, real checks) and upload
//! (phases; the bytes arrive through [`crate::upload_proxy`]).
//!
//! Contract (after CDI v1.66's `pkg/controller/datavolume/{import,upload}-controller.go`, the import
//! controller and `cmd/cdi-importer`):
//! - `source.registry`: phase ImportScheduled, then ImportInProgress with `status.progress` ("N.NN%" of
//!   the image's blob bytes pulled, updated about twice a second), then Succeeded (`progress` "100.0%",
//!   `Ready` True, `Running` False `Completed`/"Import Complete") or Failed (`Running` False `Error`,
//!   "Unable to process data: …"). The image is pulled for real with `paddock_oci::pull` (plain HTTP
//!   for registries listed in the CDIConfig `config`'s `spec.insecureRegistries`, credentials from the
//!   `secretRef` Secret's `accessKeyId`/`secretKey`), the containerDisk layout is checked by
//!   `paddock_oci::extract_disk` and the disk by `qemu-img info` ([`crate::disk_check`]).
//! - `source.upload`: UploadScheduled, then UploadReady; the upload proxy moves it to Succeeded.
//! - `source.blank`: Succeeded at once (no file is written).
//! - other sources are marked Pending with `Running` False, reason `NotSupportedBySimulator`, once:
//!   a phase written afterwards (by a test acting as CDI's importer, e.g. ImportInProgress with a
//!   `progress`) is left alone.
//! - the disk lives at `<work_dir>/datavolumes/<namespace>/<name>-<uid>/disk.img`, named by the
//!   [`ANNOTATION_DISK_PATH`](crate::ANNOTATION_DISK_PATH) annotation. There is no PVC; `claimName`
//!   is still the DataVolume's name, as CDI reports it.
//! - if the simulator restarts during an import, the next one starts over with `restartCount` + 1 (as a
//!   restarted importer pod). A real importer pod is retried after a failure (phase stays
//!   ImportInProgress, `restartCount` grows); the simulator fails the DataVolume at the first error.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PostParams};
use kube::core::GroupVersionKind;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use paddock_api::cdi::datavolume::DataVolume;
use paddock_oci::{BlobProgress, Credentials, PullOptions, RegistryOptions};
use serde_json::{Value, json};

use crate::conditions::{
    ReconcileError, condition, conditions_of, drive, patch_status, retry_on_error, set_condition,
};
use crate::{ANNOTATION_DISK_PATH, Error};

/// State shared by the DataVolume controller and the upload proxy.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) client: Client,
    pub(crate) work_dir: PathBuf,
    /// UIDs of DataVolumes whose import or upload runs in this process.
    busy: Arc<Mutex<HashSet<String>>>,
}

impl Shared {
    pub(crate) fn new(client: Client, work_dir: PathBuf) -> Self {
        Self {
            client,
            work_dir,
            busy: Arc::default(),
        }
    }

    /// The directory holding a DataVolume's disk.
    pub(crate) fn data_volume_dir(&self, namespace: &str, name: &str, uid: &str) -> PathBuf {
        self.work_dir
            .join("datavolumes")
            .join(namespace)
            .join(format!("{name}-{uid}"))
    }

    /// Marks `uid` busy; false when it already was.
    pub(crate) fn claim(&self, uid: &str) -> bool {
        self.busy
            .lock()
            .map(|mut busy| busy.insert(uid.to_owned()))
            .unwrap_or(false)
    }

    pub(crate) fn release(&self, uid: &str) {
        if let Ok(mut busy) = self.busy.lock() {
            busy.remove(uid);
        }
    }
}

/// The CDIConfig API (cluster-scoped, no status subresource).
fn cdi_configs(client: &Client) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cdi.kubevirt.io", "v1beta1", "CDIConfig"),
        "cdiconfigs",
    );
    Api::all_with(client.clone(), &resource)
}

/// Publishes the upload proxy URL in CDIConfig `config` (creating it as cdi-operator would).
async fn publish_upload_proxy(client: &Client, address: SocketAddr) -> Result<(), kube::Error> {
    let api = cdi_configs(client);
    if api.get_opt("config").await?.is_none() {
        let config: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "cdi.kubevirt.io/v1beta1",
            "kind": "CDIConfig",
            "metadata": { "name": "config" },
            "spec": {},
        }))
        .map_err(kube::Error::SerdeError)?;
        match api.create(&PostParams::default(), &config).await {
            Ok(_) => {}
            Err(kube::Error::Api(response)) if response.code == 409 => {}
            Err(error) => return Err(error),
        }
    }
    api.patch(
        "config",
        &crate::conditions::patch_params(),
        &Patch::Merge(json!({ "status": { "uploadProxyURL": format!("https://{address}") } })),
    )
    .await?;
    Ok(())
}

/// Runs the DataVolume controller until its watch ends.
pub(crate) async fn run(shared: Shared, upload_proxy_address: SocketAddr) -> Result<(), Error> {
    publish_upload_proxy(&shared.client, upload_proxy_address)
        .await
        .map_err(|error| Error::Controller {
            controller: "cdi config",
            reason: format!("cannot publish the upload proxy URL in CDIConfig config: {error}"),
        })?;
    let controller = Controller::new(
        Api::<DataVolume>::all(shared.client.clone()),
        watcher::Config::default(),
    )
    .run(reconcile, retry_on_error, Arc::new(shared));
    drive("cdi datavolume controller", controller).await
}

fn phase(data_volume: &DataVolume) -> &str {
    data_volume
        .status
        .as_ref()
        .and_then(|status| status.phase.as_deref())
        .unwrap_or("")
}

/// A DataVolume status patch: phase, conditions (Bound, Ready, Running) and extra fields.
pub(crate) fn status_patch(
    data_volume: &DataVolume,
    phase: &str,
    ready: (bool, &str, &str),
    running: (bool, &str, &str),
) -> Value {
    let name = data_volume.name_any();
    let mut conditions = conditions_of(
        &data_volume
            .status
            .as_ref()
            .and_then(|status| status.conditions.clone()),
    );
    set_condition(
        &mut conditions,
        dv_condition("Bound", true, "Bound", &format!("PVC {name} Bound")),
    );
    set_condition(&mut conditions, dv_condition("Ready", ready.0, ready.1, ready.2));
    set_condition(
        &mut conditions,
        dv_condition("Running", running.0, running.1, running.2),
    );
    json!({
        "phase": phase,
        "claimName": name,
        "conditions": conditions,
    })
}

/// The status patch of a DataVolume whose disk is complete: Succeeded, `progress` 100%, `Ready` True
/// and `Running` False `Completed` with `message` ("Import Complete", "Upload Complete").
pub(crate) fn succeeded_status(data_volume: &DataVolume, message: &str) -> Value {
    let mut status = status_patch(
        data_volume,
        "Succeeded",
        (true, "", ""),
        (false, "Completed", message),
    );
    status["progress"] = json!("100.0%");
    status
}

/// CDI's DataVolume conditions carry `lastHeartbeatTime` instead of `lastProbeTime`.
fn dv_condition(kind: &str, status: bool, reason: &str, message: &str) -> Value {
    let mut value = condition(kind, status, reason, message);
    if let Some(object) = value.as_object_mut() {
        object.remove("lastProbeTime");
        object.insert("lastHeartbeatTime".to_owned(), json!(crate::conditions::now()));
    }
    value
}

async fn reconcile(data_volume: Arc<DataVolume>, shared: Arc<Shared>) -> Result<Action, ReconcileError> {
    if data_volume.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = data_volume.namespace().unwrap_or_default();
    let name = data_volume.name_any();
    let uid = data_volume.uid().unwrap_or_default();
    let api = Api::<DataVolume>::namespaced(shared.client.clone(), &namespace);
    let source = data_volume.spec.source.clone().unwrap_or_default();
    let current = phase(&data_volume).to_owned();
    if matches!(current.as_str(), "Succeeded" | "Failed") {
        return Ok(Action::await_change());
    }
    if source.registry.is_some() {
        match current.as_str() {
            "" | "Pending" => {
                let status = status_patch(&data_volume, "ImportScheduled", (false, "", ""), (false, "", ""));
                patch_status(&api, &name, status).await?;
                return Ok(Action::requeue(Duration::from_millis(200)));
            }
            _ => {
                if shared.claim(&uid) {
                    // The watch cache may lag behind an import that just finished (it releases the
                    // claim only after writing its outcome): read the current phase from the API
                    // server so a finished import is never started again.
                    let fresh = match api.get_opt(&name).await {
                        Ok(fresh) => fresh,
                        Err(error) => {
                            shared.release(&uid);
                            return Err(error.into());
                        }
                    };
                    let Some(fresh) = fresh.filter(|fresh| !matches!(phase(fresh), "Succeeded" | "Failed"))
                    else {
                        shared.release(&uid);
                        return Ok(Action::await_change());
                    };
                    let restarted = phase(&fresh) == "ImportInProgress";
                    let shared = (*shared).clone();
                    let data_volume = fresh;
                    tokio::spawn(async move {
                        import(&shared, &data_volume, restarted).await;
                        shared.release(&uid);
                    });
                }
                return Ok(Action::await_change());
            }
        }
    }
    if source.upload.is_some() {
        let next = match current.as_str() {
            "" | "Pending" => Some(("UploadScheduled", (false, "", ""), (false, "", ""))),
            "UploadScheduled" => Some(("UploadReady", (false, "", ""), (true, "Pod is running", ""))),
            _ => None,
        };
        if let Some((next, ready, running)) = next {
            patch_status(&api, &name, status_patch(&data_volume, next, ready, running)).await?;
            return Ok(Action::requeue(Duration::from_millis(200)));
        }
        return Ok(Action::await_change());
    }
    if source.blank.is_some() {
        let status = succeeded_status(&data_volume, "Import Complete");
        patch_status(&api, &name, status).await?;
        return Ok(Action::await_change());
    }
    if !current.is_empty() {
        // Said so once; a later phase was written by someone standing in for CDI's importer (a
        // test reporting progress as CDI would), which the simulator must not undo.
        return Ok(Action::await_change());
    }
    let mut status = status_patch(
        &data_volume,
        "Pending",
        (false, "", ""),
        (
            false,
            "NotSupportedBySimulator",
            "the paddock KubeVirt/CDI simulator imports only registry, upload and blank sources",
        ),
    );
    status["progress"] = json!("N/A");
    patch_status(&api, &name, status).await?;
    Ok(Action::await_change())
}

/// `host[:port]` of a `docker://` registry URL.
fn registry_host(url: &str) -> &str {
    let rest = url.strip_prefix("docker://").unwrap_or(url);
    rest.split('/').next().unwrap_or("")
}

/// What an import needs from the cluster: the insecure registries and the credentials.
async fn registry_options(
    shared: &Shared,
    namespace: &str,
    url: &str,
    secret: Option<&str>,
) -> Result<RegistryOptions, String> {
    let insecure_registries: Vec<String> = cdi_configs(&shared.client)
        .get_opt("config")
        .await
        .map_err(|error| format!("cannot read CDIConfig config: {error}"))?
        .and_then(|config| config.data.pointer("/spec/insecureRegistries").cloned())
        .and_then(|list| serde_json::from_value(list).ok())
        .unwrap_or_default();
    let host = registry_host(url);
    let credentials = match secret {
        None => None,
        Some(secret) => {
            let secret = Api::<Secret>::namespaced(shared.client.clone(), namespace)
                .get(secret)
                .await
                .map_err(|error| format!("cannot read the registry credentials Secret {secret}: {error}"))?;
            let data = secret.data.unwrap_or_default();
            let field = |key: &str| {
                data.get(key)
                    .map(|bytes| String::from_utf8_lossy(&bytes.0).into_owned())
                    .ok_or_else(|| format!("the registry credentials Secret lacks the key {key}"))
            };
            Some(Credentials {
                username: field("accessKeyId")?,
                password: field("secretKey")?,
            })
        }
    };
    Ok(RegistryOptions {
        insecure: insecure_registries.iter().any(|registry| registry == host),
        credentials,
        // Never read the host's docker config: CDI only uses the secretRef.
        docker_config_dir: Some(shared.work_dir.join("no-docker-config")),
    })
}

/// Pulls, extracts and checks one DataVolume's image, reporting progress, and writes the outcome.
async fn import(shared: &Shared, data_volume: &DataVolume, restarted: bool) {
    let namespace = data_volume.namespace().unwrap_or_default();
    let name = data_volume.name_any();
    let api = Api::<DataVolume>::namespaced(shared.client.clone(), &namespace);
    let restart_count = data_volume
        .status
        .as_ref()
        .and_then(|status| status.restart_count)
        .unwrap_or(0)
        + i32::from(restarted);
    let mut status = status_patch(
        data_volume,
        "ImportInProgress",
        (false, "", ""),
        (true, "Pod is running", ""),
    );
    status["progress"] = json!("0.00%");
    status["restartCount"] = json!(restart_count);
    if let Err(error) = patch_status(&api, &name, status).await {
        tracing::warn!(%error, data_volume = %name, "cannot mark the import in progress");
        return;
    }
    let outcome = pull_and_check(shared, data_volume, &api).await;
    // Re-read: the status changed since the watch event (progress, conditions).
    let latest = api
        .get_opt(&name)
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| data_volume.clone());
    let result = match outcome {
        Ok(disk) => {
            let annotate = api
                .patch(
                    &name,
                    &crate::conditions::patch_params(),
                    &Patch::Merge(json!({ "metadata": { "annotations": { ANNOTATION_DISK_PATH: disk.display().to_string() } } })),
                )
                .await;
            if let Err(error) = annotate {
                tracing::warn!(%error, data_volume = %name, "cannot annotate the disk path");
            }
            let status = succeeded_status(&latest, "Import Complete");
            tracing::info!(data_volume = %name, namespace, "import succeeded");
            status
        }
        Err(message) => {
            tracing::info!(data_volume = %name, namespace, %message, "import failed");
            status_patch(
                &latest,
                "Failed",
                (false, "", ""),
                (false, "Error", &format!("Unable to process data: {message}")),
            )
        }
    };
    if let Err(error) = patch_status(&api, &name, result).await {
        tracing::warn!(%error, data_volume = %name, "cannot write the import outcome");
    }
}

async fn pull_and_check(
    shared: &Shared,
    data_volume: &DataVolume,
    api: &Api<DataVolume>,
) -> Result<PathBuf, String> {
    let namespace = data_volume.namespace().unwrap_or_default();
    let name = data_volume.name_any();
    let registry = data_volume
        .spec
        .source
        .as_ref()
        .and_then(|source| source.registry.clone())
        .unwrap_or_default();
    let Some(url) = registry.url.clone() else {
        return Err(
            "source.registry.url is empty; the simulator does not resolve imageStream sources".to_owned(),
        );
    };
    let Some(reference) = url.strip_prefix("docker://") else {
        return Err(format!(
            "Invalid image name \"{url}\", unknown transport: the simulator imports docker:// registry URLs"
        ));
    };
    let directory = shared.data_volume_dir(&namespace, &name, &data_volume.uid().unwrap_or_default());
    // A previous attempt may have left files; start clean.
    let _ = tokio::fs::remove_dir_all(&directory).await;
    tokio::fs::create_dir_all(&directory)
        .await
        .map_err(|error| format!("cannot create {}: {error}", directory.display()))?;
    let options = PullOptions {
        registry: registry_options(shared, &namespace, &url, registry.secret_ref.as_deref()).await?,
        ..PullOptions::default()
    };
    let layout = directory.join("layout");
    let blobs: Arc<Mutex<BTreeMap<String, (u64, u64)>>> = Arc::default();
    let progress_blobs = blobs.clone();
    let progress = move |blob: &BlobProgress<'_>| {
        if let Ok(mut blobs) = progress_blobs.lock() {
            blobs.insert(blob.digest.to_owned(), (blob.done, blob.size));
        }
        ControlFlow::Continue(())
    };
    let reporter = {
        let api = api.clone();
        let name = name.clone();
        let blobs = blobs.clone();
        tokio::spawn(async move {
            let mut last = String::new();
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let (done, size) = blobs
                    .lock()
                    .map(|blobs| {
                        blobs
                            .values()
                            .fold((0, 0), |(done, size), blob| (done + blob.0, size + blob.1))
                    })
                    .unwrap_or_default();
                if size == 0 {
                    continue;
                }
                let percent = format!("{:.2}%", done as f64 * 100.0 / size as f64);
                if percent != last {
                    let _ = patch_status(&api, &name, json!({ "progress": percent })).await;
                    last = percent;
                }
            }
        })
    };
    let pulled = paddock_oci::pull(reference, &layout, &options, &progress).await;
    reporter.abort();
    pulled.map_err(|error| format!("Error retrieving image: {error}"))?;
    let disk = directory.join("disk.img");
    let extract_layout = layout.clone();
    let extract_disk = disk.clone();
    tokio::task::spawn_blocking(move || paddock_oci::extract_disk(&extract_layout, &extract_disk))
        .await
        .map_err(|error| format!("the extraction task failed: {error}"))?
        .map_err(|error| format!("Failed to find VM disk image file in the container image: {error}"))?;
    let _ = tokio::fs::remove_dir_all(&layout).await;
    if let Err(message) = crate::disk_check::check(&disk).await {
        let _ = tokio::fs::remove_file(&disk).await;
        return Err(message);
    }
    Ok(disk)
}

/// Moves an uploaded file into place after the checks; returns the disk path or CDI's refusal.
pub(crate) async fn finish_upload(
    shared: &Shared,
    data_volume: &DataVolume,
    partial: &Path,
) -> Result<PathBuf, String> {
    if let Err(message) = crate::disk_check::check(partial).await {
        let _ = tokio::fs::remove_file(partial).await;
        return Err(message);
    }
    let disk = partial.with_file_name("disk.img");
    tokio::fs::rename(partial, &disk)
        .await
        .map_err(|error| format!("cannot move the upload into place at {}: {error}", disk.display()))?;
    let api = Api::<DataVolume>::namespaced(
        shared.client.clone(),
        &data_volume.namespace().unwrap_or_default(),
    );
    let name = data_volume.name_any();
    api.patch(
        &name,
        &crate::conditions::patch_params(),
        &Patch::Merge(
            json!({ "metadata": { "annotations": { ANNOTATION_DISK_PATH: disk.display().to_string() } } }),
        ),
    )
    .await
    .map_err(|error| format!("cannot annotate DataVolume {name}: {error}"))?;
    let latest = api
        .get(&name)
        .await
        .map_err(|error| format!("cannot read DataVolume {name}: {error}"))?;
    let status = succeeded_status(&latest, "Upload Complete");
    patch_status(&api, &name, status)
        .await
        .map_err(|error| format!("cannot mark DataVolume {name} Succeeded: {error}"))?;
    Ok(disk)
}
