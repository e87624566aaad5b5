//! Simulated KubeVirt export controller (`export.kubevirt.io/v1beta1` VirtualMachineExport).
//!
//! Contract (after KubeVirt v1.9's `pkg/storage/export/export`): sources VirtualMachine,
//! VirtualMachineSnapshot and PersistentVolumeClaim (here: a DataVolume of that name, since no PVCs
//! exist). The token Secret is `spec.tokenSecretRef` when given (the user manages it), else a generated
//! `export-token-<name>` Secret owned by the export with a 20-character alphanumeric `token`.
//! When the source is ready (VM exists, is stopped, its DataVolumes Succeeded), the export is phase
//! Ready with `Ready` True `PodReady`, `serviceName` `virt-export-<name>`, `virtualMachineName`,
//! `ttlExpirationTime` (creation + `ttlDuration`, 2h by default) and links: internal
//! (`https://virt-export-<name>.<namespace>.svc/...`) and external
//! (`https://virt-exportproxy.simulator.invalid/api/export.kubevirt.io/v1/namespaces/<ns>/virtualmachineexports/<name>/...`),
//! each with the `all` and `auth-header-secret` manifests and per volume the `raw` (`disk.img`) and
//! `gzip` (`disk.img.gz`) formats and a `cert`. Otherwise Pending with KubeVirt's reasons
//! (`VMNotFound`, `VMNoVolumes`, `VolumesNotPopulated`, `InUse`, `VMSnapshotNotFound`, `PVCNotFound`).
//!
//! The external links are served (as KubeVirt's virt-exportproxy would, at
//! `/api/export.kubevirt.io/v1beta1/namespaces/<ns>/virtualmachineexports/<name>/volumes/<volume>/disk.img`)
//! by the upload proxy's HTTPS server, and their `cert` is that server's certificate chain:
//! [`serve_volume`] checks the `x-kubevirt-export-token` header (or query parameter) against the
//! token Secret, and streams the volume's disk (the DataVolume's imported or uploaded file) as raw.
//! `disk.img.gz` answers 501 (nothing compresses here). A snapshot's volumes are its source VM's
//! DataVolumes: the simulated snapshot copies no data, and nothing writes those files after the
//! import (the simulated virt-handler boots an overlay), so that is the snapshot's content.
//! The internal links (`*.svc`) are not served: there is no exporter pod or Service.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use paddock_api::cdi::datavolume::DataVolume;
use paddock_api::kubevirt::virtualmachine::VirtualMachine;
use paddock_api::kubevirt::virtualmachineexport::VirtualMachineExport;
use paddock_api::kubevirt::virtualmachineinstance::VirtualMachineInstance;
use serde_json::{Value, json};

use crate::conditions::{
    ReconcileError, claim_names, condition_without_message, conditions_of, controller_reference, drive,
    patch_status, random_string, retry_on_error, set_condition,
};
use crate::{Error, TlsMaterial};

/// The header (and query parameter) carrying the export token.
const TOKEN_HEADER: &str = "x-kubevirt-export-token";
/// KubeVirt's default export time to live.
const DEFAULT_TTL: Duration = Duration::from_secs(2 * 60 * 60);

struct Context {
    client: Client,
    /// `host:port` of the server that serves the external links.
    external_host: String,
    /// That server's certificate chain (PEM), the links' `cert`.
    external_certificate: String,
}

/// Runs the export controller until its watch ends; external links point at `external_host`
/// (`host:port`), whose certificate chain is `external_certificate`.
pub(crate) async fn run(
    client: Client,
    external_host: String,
    external_certificate: String,
) -> Result<(), Error> {
    let controller = Controller::new(
        Api::<VirtualMachineExport>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<Secret>::all(client.clone()), watcher::Config::default())
    .run(
        reconcile,
        retry_on_error,
        Arc::new(Context {
            client,
            external_host,
            external_certificate,
        }),
    );
    drive("export controller", controller).await
}

/// The export's `Ready` condition: KubeVirt's snapshot-style condition plus a message.
fn export_condition(status: bool, reason: &str, message: &str) -> Value {
    let mut condition = condition_without_message("Ready", status, reason);
    condition["message"] = json!(message);
    condition
}

/// A KubeVirt-style export token: 20 random alphanumerics.
fn export_token() -> Result<String, ReconcileError> {
    random_string(
        b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
        20,
    )
}

/// The source's volumes (PVC names), or the reason it is not ready.
enum Source {
    Ready {
        volumes: Vec<String>,
        vm_name: Option<String>,
    },
    NotReady {
        reason: &'static str,
        message: String,
    },
}

async fn data_volumes_populated(
    client: &Client,
    namespace: &str,
    names: &[String],
) -> Result<bool, kube::Error> {
    let api = Api::<DataVolume>::namespaced(client.clone(), namespace);
    for name in names {
        let phase = api
            .get_opt(name)
            .await?
            .and_then(|data_volume| data_volume.status.and_then(|status| status.phase));
        if phase.as_deref() != Some("Succeeded") {
            return Ok(false);
        }
    }
    Ok(true)
}

async fn resolve_source(export: &VirtualMachineExport, client: &Client) -> Result<Source, ReconcileError> {
    let namespace = export.namespace().unwrap_or_default();
    let source = &export.spec.source;
    match source.kind.as_str() {
        "VirtualMachine" => {
            let Some(vm) = Api::<VirtualMachine>::namespaced(client.clone(), &namespace)
                .get_opt(&source.name)
                .await?
            else {
                return Ok(Source::NotReady {
                    reason: "VMNotFound",
                    message: format!("Virtual Machine {namespace}/{} not found", source.name),
                });
            };
            let volumes = claim_names(
                serde_json::to_value(&vm.spec)
                    .unwrap_or_default()
                    .pointer("/template/spec/volumes"),
            );
            if volumes.is_empty() {
                return Ok(Source::NotReady {
                    reason: "VMNoVolumes",
                    message: format!("Virtual Machine {namespace}/{} has no volumes", source.name),
                });
            }
            if !data_volumes_populated(client, &namespace, &volumes).await? {
                return Ok(Source::NotReady {
                    reason: "VolumesNotPopulated",
                    message: format!(
                        "Not all volumes in the Virtual Machine {namespace}/{} are populated",
                        source.name
                    ),
                });
            }
            if Api::<VirtualMachineInstance>::namespaced(client.clone(), &namespace)
                .get_opt(&source.name)
                .await?
                .is_some()
            {
                return Ok(Source::NotReady {
                    reason: "InUse",
                    message: format!(
                        "Virtual Machine {namespace}/{} is running; stop it to export its volumes",
                        source.name
                    ),
                });
            }
            Ok(Source::Ready {
                volumes,
                vm_name: Some(source.name.clone()),
            })
        }
        "VirtualMachineSnapshot" => {
            let Some(snapshot) = crate::snapshot::ready_snapshot(client, &namespace, &source.name).await?
            else {
                return Ok(Source::NotReady {
                    reason: "VMSnapshotNotFound",
                    message: format!(
                        "VirtualMachineSnapshot {namespace}/{} not found or not ready",
                        source.name
                    ),
                });
            };
            let content_name = snapshot
                .status
                .and_then(|status| status.virtual_machine_snapshot_content_name)
                .unwrap_or_default();
            let content = crate::snapshot::snapshot_contents(client, &namespace)
                .get(&content_name)
                .await?;
            let volumes: Vec<String> = content
                .data
                .pointer("/spec/volumeBackups")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|backup| {
                    backup
                        .pointer("/persistentVolumeClaim/metadata/name")?
                        .as_str()
                        .map(str::to_owned)
                })
                .collect();
            if volumes.is_empty() {
                return Ok(Source::NotReady {
                    reason: "VMSnapshotNoVolumes",
                    message: format!(
                        "VirtualMachineSnapshot {namespace}/{} does not contain any volume snapshots",
                        source.name
                    ),
                });
            }
            let vm_name = content
                .data
                .pointer("/spec/source/virtualMachine/metadata/name")
                .and_then(Value::as_str)
                .map(str::to_owned);
            Ok(Source::Ready { volumes, vm_name })
        }
        "PersistentVolumeClaim" => {
            let names = vec![source.name.clone()];
            let exists = Api::<DataVolume>::namespaced(client.clone(), &namespace)
                .get_opt(&source.name)
                .await?
                .is_some();
            if !exists {
                return Ok(Source::NotReady {
                    reason: "PVCNotFound",
                    message: format!("pvc {namespace}/{} not found", source.name),
                });
            }
            if !data_volumes_populated(client, &namespace, &names).await? {
                return Ok(Source::NotReady {
                    reason: "VolumesNotPopulated",
                    message: format!("pvc {namespace}/{} is not populated", source.name),
                });
            }
            Ok(Source::Ready {
                volumes: names,
                vm_name: None,
            })
        }
        other => Ok(Source::NotReady {
            reason: "Unknown",
            message: format!("source kind {other} is not supported"),
        }),
    }
}

fn links(host_and_base: &str, kind: &str, volumes: &[String], certificate: &str, manifests: bool) -> Value {
    let mut link = json!({
        "cert": certificate,
        "volumes": volumes.iter().map(|volume| json!({
            "name": volume,
            "formats": [
                { "format": "raw", "url": format!("https://{host_and_base}/volumes/{volume}/disk.img") },
                { "format": "gzip", "url": format!("https://{host_and_base}/volumes/{volume}/disk.img.gz") },
            ],
        })).collect::<Vec<_>>(),
    });
    if manifests {
        link["manifests"] = json!([
            { "type": "all", "url": format!("https://{host_and_base}/{kind}/manifests/all") },
            { "type": "auth-header-secret", "url": format!("https://{host_and_base}/{kind}/manifests/secret") },
        ]);
    }
    link
}

async fn reconcile(
    export: Arc<VirtualMachineExport>,
    context: Arc<Context>,
) -> Result<Action, ReconcileError> {
    if export.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = export.namespace().unwrap_or_default();
    let name = export.name_any();
    let exports = Api::<VirtualMachineExport>::namespaced(context.client.clone(), &namespace);
    let status = export.status.clone().unwrap_or_default();
    let mut conditions = conditions_of(&status.conditions);
    let source = resolve_source(&export, &context.client).await?;
    let (volumes, vm_name) = match source {
        Source::NotReady { reason, message } => {
            set_condition(&mut conditions, export_condition(false, reason, &message));
            patch_status(
                &exports,
                &name,
                json!({ "phase": "Pending", "conditions": conditions }),
            )
            .await?;
            return Ok(Action::requeue(Duration::from_secs(3)));
        }
        Source::Ready { volumes, vm_name } => (volumes, vm_name),
    };
    let token_secret = match &export.spec.token_secret_ref {
        Some(user_secret) => user_secret.clone(),
        None => {
            let secret_name = format!("export-token-{name}");
            let secrets = Api::<Secret>::namespaced(context.client.clone(), &namespace);
            if secrets.get_opt(&secret_name).await?.is_none() {
                let mut secret: Secret = serde_json::from_value(json!({
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {
                        "name": secret_name,
                        "namespace": namespace,
                        "ownerReferences": [controller_reference(&*export)],
                    },
                    "type": "Opaque",
                }))
                .map_err(|error| ReconcileError::Other(format!("cannot build the token secret: {error}")))?;
                secret.data = Some([("token".to_owned(), ByteString(export_token()?.into_bytes()))].into());
                match secrets.create(&PostParams::default(), &secret).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(response)) if response.code == 409 => {}
                    Err(error) => return Err(error.into()),
                }
            }
            secret_name
        }
    };
    if status.phase.as_deref() == Some("Ready")
        && status.token_secret_ref.as_deref() == Some(token_secret.as_str())
    {
        return Ok(Action::requeue(Duration::from_secs(30)));
    }
    let service_name = format!("virt-export-{name}");
    let internal_host = format!("{service_name}.{namespace}.svc");
    let certificate = TlsMaterial::self_signed(&[internal_host.as_str()])
        .map_err(|error| ReconcileError::Other(error.to_string()))?
        .certificate_chain_pem;
    let external_base = format!(
        "{}/api/export.kubevirt.io/v1beta1/namespaces/{namespace}/virtualmachineexports/{name}",
        context.external_host
    );
    let manifests = vm_name.is_some();
    let ttl = export
        .spec
        .ttl_duration
        .as_deref()
        .and_then(parse_go_duration)
        .unwrap_or(DEFAULT_TTL);
    let created = export
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|time| time.0)
        .unwrap_or_else(k8s_openapi::jiff::Timestamp::now);
    let expiration = k8s_openapi::jiff::SignedDuration::try_from(ttl)
        .ok()
        .and_then(|ttl| created.checked_add(ttl).ok())
        .map(|time| time.to_string());
    set_condition(&mut conditions, export_condition(true, "PodReady", ""));
    let mut patch = json!({
        "phase": "Ready",
        "serviceName": service_name,
        "tokenSecretRef": token_secret,
        "ttlExpirationTime": expiration,
        "links": {
            "internal": links(&internal_host, "internal", &volumes, &certificate, manifests),
            "external": links(&external_base, "external", &volumes, &context.external_certificate, manifests),
        },
        "conditions": conditions,
    });
    if let Some(vm_name) = vm_name {
        patch["virtualMachineName"] = json!(vm_name);
    }
    patch_status(&exports, &name, patch).await?;
    tracing::info!(export = %name, namespace, "export ready");
    Ok(Action::requeue(Duration::from_secs(30)))
}

/// Serves `file` (`disk.img` or `disk.img.gz`) of `volume` of export `namespace/name` to a client
/// presenting `token` (see the module contract).
pub(crate) async fn serve_volume(
    shared: &crate::datavolume::Shared,
    (namespace, name, volume, file): (String, String, String, String),
    token: Option<String>,
) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let refuse = |status: StatusCode, message: String| (status, message).into_response();
    let exports = Api::<VirtualMachineExport>::namespaced(shared.client.clone(), &namespace);
    let export = match exports.get_opt(&name).await {
        Ok(Some(export)) => export,
        Ok(None) => {
            return refuse(
                StatusCode::NOT_FOUND,
                format!("export {namespace}/{name} not found"),
            );
        }
        Err(error) => return refuse(StatusCode::BAD_GATEWAY, error.to_string()),
    };
    let status = export.status.clone().unwrap_or_default();
    if status.phase.as_deref() != Some("Ready") {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("export {name} is not ready"),
        );
    }
    let secret_name = status.token_secret_ref.clone().unwrap_or_default();
    let secret = Api::<Secret>::namespaced(shared.client.clone(), &namespace)
        .get_opt(&secret_name)
        .await
        .ok()
        .flatten();
    let expected = secret
        .and_then(|secret| secret.data)
        .and_then(|data| data.get("token").cloned())
        .map(|token| token.0);
    match (expected, token) {
        (Some(expected), Some(token)) if expected == token.as_bytes() => {}
        _ => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "invalid or missing export token".to_owned(),
            );
        }
    }
    let exported = serde_json::to_value(&status.links)
        .unwrap_or_default()
        .pointer("/external/volumes")
        .and_then(Value::as_array)
        .is_some_and(|volumes| volumes.iter().any(|entry| entry["name"] == volume.as_str()));
    if !exported {
        return refuse(
            StatusCode::NOT_FOUND,
            format!("volume {volume} is not in export {name}"),
        );
    }
    if file == "disk.img.gz" {
        return refuse(
            StatusCode::NOT_IMPLEMENTED,
            "the simulator serves disk.img only".to_owned(),
        );
    }
    if file != "disk.img" {
        return refuse(StatusCode::NOT_FOUND, format!("no {file}"));
    }
    let disk = Api::<DataVolume>::namespaced(shared.client.clone(), &namespace)
        .get_opt(&volume)
        .await
        .ok()
        .flatten()
        .and_then(|data_volume| {
            data_volume
                .annotations()
                .get(crate::ANNOTATION_DISK_PATH)
                .cloned()
        });
    let Some(disk) = disk else {
        return refuse(StatusCode::NOT_FOUND, format!("volume {volume} has no disk"));
    };
    // The exporter serves the PVC's raw content; the imported file may be qcow2.
    let directory = shared.work_dir.join("exports");
    let raw = directory.join(format!("{namespace}-{name}-{volume}-{}.raw", random_suffix()));
    let converted = match tokio::fs::create_dir_all(&directory).await {
        Ok(()) => tokio::process::Command::new("qemu-img")
            .args(["convert", "-U", "-O", "raw"])
            .arg(&disk)
            .arg(&raw)
            .output()
            .await
            .map_err(|error| error.to_string())
            .and_then(|output| {
                if output.status.success() {
                    Ok(())
                } else {
                    Err(String::from_utf8_lossy(&output.stderr).into_owned())
                }
            }),
        Err(error) => Err(error.to_string()),
    };
    if let Err(error) = converted {
        let _ = std::fs::remove_file(&raw);
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read the disk: {error}"),
        );
    }
    let file = match tokio::fs::File::open(&raw).await {
        Ok(file) => file,
        Err(error) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
    };
    let length = file.metadata().await.map(|metadata| metadata.len()).unwrap_or(0);
    // Unlinked now: the open file stays readable and nothing is left behind.
    let _ = std::fs::remove_file(&raw);
    let stream = futures_util::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buffer = vec![0u8; 1 << 20];
        match file.read(&mut buffer).await {
            Ok(0) => None,
            Ok(read) => {
                buffer.truncate(read);
                Some((Ok::<_, std::io::Error>(buffer), file))
            }
            Err(error) => Some((Err(error), file)),
        }
    });
    (
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/octet-stream".to_owned(),
            ),
            (axum::http::header::CONTENT_LENGTH, length.to_string()),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

fn random_suffix() -> String {
    random_string(b"0123456789abcdef", 8).unwrap_or_default()
}

/// The export token of a request: the `x-kubevirt-export-token` header, else the query parameter.
pub(crate) fn request_token(headers: &axum::http::HeaderMap, query: Option<&str>) -> Option<String> {
    headers
        .get(TOKEN_HEADER)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            query?.split('&').find_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                (key == TOKEN_HEADER).then(|| value.to_owned())
            })
        })
}

/// Parses the Go durations `ttlDuration` uses (`2h`, `30m`, `1h30m`, `90s`).
fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut total = 0_u64;
    let mut number = String::new();
    for character in text.chars() {
        if character.is_ascii_digit() {
            number.push(character);
            continue;
        }
        let value: u64 = number.parse().ok()?;
        number.clear();
        total += value
            * match character {
                'h' => 3600,
                'm' => 60,
                's' => 1,
                _ => return None,
            };
    }
    number.is_empty().then_some(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

    use super::*;

    #[test]
    fn go_durations_parse_and_tokens_are_alphanumeric() {
        assert_eq!(parse_go_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_go_duration("1h30m15s"), Some(Duration::from_secs(5415)));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration("5d"), None);
        let token = export_token().unwrap();
        assert_eq!(token.len(), 20);
        assert!(token.chars().all(|character| character.is_ascii_alphanumeric()));
        assert_ne!(token, export_token().unwrap());
    }

    #[test]
    fn the_export_token_comes_from_the_header_or_the_query() {
        let mut headers = axum::http::HeaderMap::new();
        assert_eq!(
            request_token(&headers, Some("a=b&x-kubevirt-export-token=q")).as_deref(),
            Some("q")
        );
        assert_eq!(request_token(&headers, Some("a=b")), None);
        headers.insert(TOKEN_HEADER, axum::http::HeaderValue::from_static("h"));
        assert_eq!(
            request_token(&headers, Some("x-kubevirt-export-token=q")).as_deref(),
            Some("h")
        );
    }
}
