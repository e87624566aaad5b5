//! Disk uploads through the console: a DataVolume with an upload source, created as the signed-in
//! user, filled through CDI's upload proxy with the request body streamed (never held whole).
//!
//! Contract, in order (nothing is created before the checks 1–2 passed):
//! 1. SubjectAccessReviews: the user may `create datavolumes.cdi.kubevirt.io` and `create
//!    uploadtokenrequests.upload.cdi.kubevirt.io` in the namespace, else a 403 naming the first
//!    missing permission;
//! 2. the first bytes of the body are read and checked ([`paddock_cluster::upload`]: format,
//!    backing file, encryption, the size against a qcow2's or raw disk's virtual size: 422 when
//!    too small);
//! 3. the DataVolume is created as the user (409 when the name is taken), must become
//!    `UploadReady`, an UploadTokenRequest is created as the user, and the body streams to the
//!    proxy's `upload-async` with the bytes already read in front;
//! 4. the answer comes only when the proxy accepted every byte (200 with the DataVolume's
//!    [`UploadView`]); CDI then imports, which `GET …/uploads/{name}` follows to `Succeeded`.
//!
//! `dryRun` stops after step 1 (plus: the name is not taken, when the user may `get` it): a
//! browser asks it before sending gigabytes. A refusal before the upload started still reads the
//! rest of the body for a few seconds, so a client busy sending gets the answer, not a reset.
//!
//! On failure after the DataVolume was created (a broken or truncated body, the proxy refusing,
//! failing or timing out) the DataVolume is deleted as the user, so the same name can be uploaded
//! again at once; the error (502, or 504 for a timeout) carries the proxy's message and says so.
//! CDI's proxy takes one stream per upload (no chunked or resumable protocol, checked against
//! CDI v1.66's `cdi-uploadproxy`), so a disk is one request: a reverse proxy in front of the
//! console must allow request bodies of the disk's size and not time out while it streams.
//! The upload runs in its own task, so a client that disconnects midway still gets its
//! DataVolume cleaned up.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use kube::api::ApiResource;
use paddock_cluster::upload::{self, DiskInfo, DiskStream, PhaseCheck, ResourceName, UploadError};
use serde_json::{Value, json};

use super::{UserBackend, permission};
use crate::backend::{BackendError, BackendResult, ErrorKind, UploadRequest, UploadView};

/// How long the DataVolume may take to become UploadReady.
const READY_PATIENCE: Duration = Duration::from_secs(120);

/// Where the upload proxy is and how to trust it (the console's configuration).
#[derive(Debug, Clone, Default)]
pub struct UploadProxy {
    /// The proxy's URL; CDIConfig `config`'s `status.uploadProxyURL` (read with the console's
    /// own credentials) when `None`.
    pub url: Option<String>,
    /// How to trust its certificate.
    pub trust: upload::ProxyTrust,
}

fn resource(name: &ResourceName) -> ApiResource {
    ApiResource {
        group: name.group.to_string(),
        version: name.version.to_string(),
        api_version: format!("{}/{}", name.group, name.version),
        kind: name.kind.to_string(),
        plural: name.plural.to_string(),
    }
}

fn view(namespace: &str, name: &str, data_volume: &Value) -> UploadView {
    let message = upload::condition_message(data_volume);
    UploadView {
        namespace: namespace.to_string(),
        name: name.to_string(),
        phase: upload::phase(data_volume).to_string(),
        progress: upload::progress(data_volume).map(str::to_string),
        message: (message != "no message").then_some(message),
        size: data_volume["spec"]["storage"]["resources"]["requests"]["storage"]
            .as_str()
            .or_else(|| data_volume["spec"]["pvc"]["resources"]["requests"]["storage"].as_str())
            .map(str::to_string),
        format: None,
        bytes_sent: None,
    }
}

/// The backend error for a failed upload step.
fn upload_error(error: UploadError) -> BackendError {
    let kind = match &error {
        UploadError::SizeTooSmall { .. }
        | UploadError::BackingFile { .. }
        | UploadError::Encrypted(_)
        | UploadError::UnsupportedFormat { .. } => ErrorKind::InvalidSpec,
        UploadError::SizeMalformed { .. } => ErrorKind::BadRequest,
        UploadError::ProxyFailed { timed_out: true, .. } => ErrorKind::GatewayTimeout,
        UploadError::ProxyFailed { .. }
        | UploadError::ProxyRefused { .. }
        | UploadError::Incomplete { .. } => ErrorKind::BadGateway,
        _ => ErrorKind::Internal,
    };
    BackendError::new(kind, error.to_string())
}

/// How long a refused upload's body is still read, so the client gets the answer rather than a
/// connection reset while it is still sending.
const DRAIN_PATIENCE: Duration = Duration::from_secs(5);

/// Reads and drops what is left of a refused upload's body, for at most [`DRAIN_PATIENCE`].
async fn drain(mut body: DiskStream) {
    let _ = tokio::time::timeout(DRAIN_PATIENCE, async {
        while let Some(Ok(_)) = body.next().await {}
    })
    .await;
}

/// Reads the body until [`upload::HEADER_BYTES`] are there (or it ends): the bytes read.
async fn read_header(body: &mut DiskStream) -> BackendResult<Vec<u8>> {
    let mut header = Vec::new();
    while header.len() < upload::HEADER_BYTES {
        match body.next().await {
            Some(Ok(chunk)) => header.extend_from_slice(&chunk),
            Some(Err(error)) => {
                return Err(BackendError::new(
                    ErrorKind::BadRequest,
                    format!("reading the uploaded disk failed: {error}; upload again"),
                ));
            }
            None => break,
        }
    }
    Ok(header)
}

impl UserBackend {
    /// See the module documentation.
    pub(super) async fn upload_disk_as_user(
        &self,
        request: UploadRequest,
        mut body: DiskStream,
    ) -> BackendResult<UploadView> {
        let prepared = self.prepare(&request, &mut body).await;
        let (header, disk, size, proxy, client) = match prepared {
            Ok(Some(prepared)) => prepared,
            Ok(None) => {
                return Ok(UploadView {
                    namespace: request.namespace,
                    name: request.name,
                    phase: String::new(),
                    progress: None,
                    message: Some("dry run: the upload would be accepted".to_string()),
                    size: request.size,
                    format: None,
                    bytes_sent: None,
                });
            }
            Err(error) => {
                drain(body).await;
                return Err(error);
            }
        };
        let UploadRequest {
            namespace,
            name,
            storage_class,
            length,
            ..
        } = request;
        let data_volumes = resource(&upload::DATA_VOLUME);
        let created = self
            .create_object(
                &data_volumes,
                &namespace,
                &upload::data_volume_manifest(&namespace, &name, &size, storage_class.as_deref()),
            )
            .await
            .map_err(|mut error| {
                if error.kind == ErrorKind::AlreadyExists {
                    error.message = format!(
                        "{}; choose another DataVolume name, or delete the existing one first",
                        error.message
                    );
                }
                error
            });
        if let Err(error) = created {
            drain(body).await;
            return Err(error);
        }

        // From here on the DataVolume exists: the rest runs in its own task so it finishes (and
        // cleans up) even when the client goes away mid-upload.
        let user_backend = UserBackend {
            shared: std::sync::Arc::clone(&self.shared),
            user: std::sync::Arc::clone(&self.user),
        };
        let task = tokio::spawn(async move {
            let body: DiskStream =
                Box::pin(futures_util::stream::iter([Ok(Bytes::from(header))]).chain(body));
            let result = user_backend
                .fill(&namespace, &name, &proxy, &client, body, length)
                .await;
            match result {
                Ok(bytes_sent) => {
                    let data_volume = user_backend
                        .get_object(&data_volumes, &namespace, &name)
                        .await
                        .unwrap_or(Value::Null);
                    let mut view = view(&namespace, &name, &data_volume);
                    view.size = Some(size);
                    view.format = Some(disk.format);
                    view.bytes_sent = Some(bytes_sent);
                    Ok(view)
                }
                Err(mut error) => {
                    let cleanup = user_backend
                        .delete_object(&data_volumes, &namespace, &name, json!({}))
                        .await;
                    error.message = match cleanup {
                        Ok(()) => format!(
                            "{}; the DataVolume {namespace}/{name} was deleted, so the same name can be uploaded again",
                            error.message
                        ),
                        Err(cleanup) => format!(
                            "{}; the DataVolume {namespace}/{name} could not be deleted ({}): delete it before uploading again under that name",
                            error.message, cleanup.message
                        ),
                    };
                    tracing::warn!(%namespace, %name, message = %error.message, "upload failed");
                    Err(error)
                }
            }
        });
        task.await.map_err(|error| {
            BackendError::new(
                ErrorKind::Internal,
                format!("the upload task failed: {error}; this is a bug in paddock"),
            )
        })?
    }

    /// Steps 1–2 of the contract, and what the upload needs: the header read, the disk's
    /// description, the size, the proxy's URL and client. `None` for a dry run that passed.
    #[allow(clippy::type_complexity)] // a private tuple read once by the caller
    async fn prepare(
        &self,
        request: &UploadRequest,
        body: &mut DiskStream,
    ) -> BackendResult<Option<(Vec<u8>, DiskInfo, String, String, reqwest::Client)>> {
        let namespace = &request.namespace;
        let data_volumes = resource(&upload::DATA_VOLUME);
        let token_requests = resource(&upload::UPLOAD_TOKEN_REQUEST);
        for needed in [&data_volumes, &token_requests] {
            self.shared
                .access
                .require(&self.user, &permission("create", needed, None, namespace, None))
                .await?;
        }
        if request.dry_run {
            if let Some(size) = &request.size {
                upload::requested_size(Some(size), None).map_err(upload_error)?;
            }
            // A taken name is worth knowing before sending gigabytes; without `get` the create
            // will say so later.
            return match self.get_object(&data_volumes, namespace, &request.name).await {
                Ok(_) => Err(BackendError::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "DataVolume {namespace}/{} already exists; choose another DataVolume name, or delete the existing one first",
                        request.name
                    ),
                )),
                Err(_) => Ok(None),
            };
        }
        if request.length == 0 {
            return Err(BackendError::new(
                ErrorKind::BadRequest,
                "the upload has no bytes: send the disk as the body with its Content-Length",
            ));
        }
        let header = read_header(body).await?;
        let disk: DiskInfo = upload::sniff_disk_header(&header, request.length);
        upload::check_disk("the uploaded disk", &disk).map_err(upload_error)?;
        let size =
            upload::requested_size(request.size.as_deref(), disk.virtual_size).map_err(upload_error)?;
        let proxy = self.proxy_url().await?;
        let client = self.shared.upload_client.clone().map_err(|message| {
            BackendError::new(
                ErrorKind::Internal,
                format!(
                    "the console cannot talk to the upload proxy: {message}; check its upload proxy CA option"
                ),
            )
        })?;
        Ok(Some((header, disk, size, proxy, client)))
    }

    /// Waits for UploadReady, gets a token as the user and streams the disk; the bytes sent.
    async fn fill(
        &self,
        namespace: &str,
        name: &str,
        proxy: &str,
        client: &reqwest::Client,
        body: DiskStream,
        length: u64,
    ) -> BackendResult<u64> {
        let data_volumes = resource(&upload::DATA_VOLUME);
        let deadline = tokio::time::Instant::now() + READY_PATIENCE;
        loop {
            let data_volume = self.get_object(&data_volumes, namespace, name).await?;
            match upload::check_phase(&data_volume, &["UploadReady"]) {
                PhaseCheck::Reached => break,
                PhaseCheck::Failed(message) => {
                    return Err(BackendError::new(
                        ErrorKind::BadGateway,
                        format!("DataVolume {namespace}/{name} failed before the upload: {message}"),
                    ));
                }
                PhaseCheck::Waiting => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(BackendError::new(
                    ErrorKind::GatewayTimeout,
                    format!(
                        "DataVolume {namespace}/{name} did not become UploadReady within {} s (it is {:?}: {}); check CDI's upload server pod and the PVC's events",
                        READY_PATIENCE.as_secs(),
                        upload::phase(&data_volume),
                        upload::condition_message(&data_volume)
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let answer = self
            .create_object(
                &resource(&upload::UPLOAD_TOKEN_REQUEST),
                namespace,
                &upload::token_request_manifest(namespace, name),
            )
            .await?;
        let token = upload::token_from_answer(&answer).map_err(upload_error)?;
        let url = upload::upload_url(proxy, upload::Endpoint::Async);
        upload::send_disk(client, &url, &token, body, length, std::sync::Arc::new(|_| {}))
            .await
            .map_err(upload_error)
    }

    /// The proxy's URL: configured, else CDIConfig `config` read with the console's credentials.
    async fn proxy_url(&self) -> BackendResult<String> {
        if let Some(url) = &self.shared.upload_proxy_url {
            return Ok(upload::normalize_proxy_url(url));
        }
        let configs: kube::Api<kube::api::DynamicObject> =
            kube::Api::all_with(self.shared.client.clone(), &resource(&upload::CDI_CONFIG));
        let config = configs.get("config").await.map_err(|error| {
            BackendError::new(
                ErrorKind::Internal,
                format!(
                    "the console cannot read CDIConfig config to find CDI's upload proxy: {error}; install CDI, grant the console `get cdiconfigs.cdi.kubevirt.io`, or start it with --upload-proxy-url"
                ),
            )
        })?;
        upload::proxy_url_from_cdi_config(&json!({"status": config.data["status"].clone()})).map_err(
            |error| {
                BackendError::new(
                    ErrorKind::Internal,
                    format!("{error}; or start the console with --upload-proxy-url"),
                )
            },
        )
    }

    /// The DataVolume as an [`UploadView`], read as the user.
    pub(super) async fn upload_status_as_user(
        &self,
        namespace: &str,
        name: &str,
    ) -> BackendResult<UploadView> {
        let data_volume = self
            .get_object(&resource(&upload::DATA_VOLUME), namespace, name)
            .await?;
        Ok(view(namespace, name, &data_volume))
    }
}
