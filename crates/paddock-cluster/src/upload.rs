//! Uploading a disk into a DataVolume through CDI's upload proxy, as `virtctl image-upload` does.
//!
//! Role: the one implementation behind `paddock upload` and the console's upload endpoint.
//!
//! Contract (the caller does the Kubernetes calls in this order, with these pieces):
//! 1. the disk is checked before anything is created: [`inspect_disk_file`] (qemu-img, for files)
//!    or [`sniff_disk_header`] (the first bytes of a stream) and [`check_disk`] refuse a backing
//!    file, an encrypted disk or a format CDI does not import; [`requested_size`] refuses a size
//!    that cannot hold the virtual size plus CDI's filesystem overhead;
//! 2. [`data_volume_manifest`] is created and its phase must reach `UploadReady`
//!    ([`check_phase`]);
//! 3. [`token_request_manifest`] is created; [`token_from_answer`] reads the token;
//! 4. [`send_disk`] streams the bytes in one `POST` to [`upload_url`] (CDI's proxy takes one
//!    stream per upload: it has no chunked or resumable protocol, so neither has this), calling
//!    the [`Progress`] callback with every chunk sent. It succeeds only when the proxy answered
//!    2xx *and* every byte was sent; a refusal, a timeout or a broken connection is an
//!    [`UploadError`] that says how far it got and what to do — never a silent stop at 99%;
//! 5. the DataVolume must reach `Succeeded` ([`check_phase`]); `Failed` carries CDI's message.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

/// CDI's default filesystem overhead (CDIConfig `filesystemOverhead.global`).
pub const FILESYSTEM_OVERHEAD: f64 = 0.055;
const MIB: u64 = 1 << 20;
/// How many bytes of a disk [`sniff_disk_header`] needs to recognise its format.
pub const HEADER_BYTES: usize = 512;
/// The formats CDI imports (qemu-img's names).
pub const IMPORTED_FORMATS: [&str; 6] = ["qcow2", "raw", "vmdk", "vdi", "vpc", "vhdx"];

/// A Kubernetes resource's coordinates, for callers building their own clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceName {
    /// The API group.
    pub group: &'static str,
    /// The API version.
    pub version: &'static str,
    /// The kind.
    pub kind: &'static str,
    /// The plural (the path segment and RBAC's resource name).
    pub plural: &'static str,
}

/// CDI's DataVolume.
pub const DATA_VOLUME: ResourceName = ResourceName {
    group: "cdi.kubevirt.io",
    version: "v1beta1",
    kind: "DataVolume",
    plural: "datavolumes",
};
/// CDI's UploadTokenRequest (an aggregated API served by cdi-apiserver).
pub const UPLOAD_TOKEN_REQUEST: ResourceName = ResourceName {
    group: "upload.cdi.kubevirt.io",
    version: "v1beta1",
    kind: "UploadTokenRequest",
    plural: "uploadtokenrequests",
};
/// CDI's cluster configuration (the object `config` has the proxy's URL).
pub const CDI_CONFIG: ResourceName = ResourceName {
    group: "cdi.kubevirt.io",
    version: "v1beta1",
    kind: "CDIConfig",
    plural: "cdiconfigs",
};

/// Failures of an upload step.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The disk file cannot be read.
    #[error("cannot read {path}: {source}")]
    DiskUnreadable {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The path is not a regular file.
    #[error("{0} is not a regular file; pass a disk image file")]
    NotAFile(String),
    /// The disk checks refused the disk; the message says why and what to do.
    #[error("{0}")]
    DiskRefused(String),
    /// qemu-img could not run or read the disk.
    #[error("qemu-img cannot read {path}: {details}; install qemu-utils or check the file")]
    QemuImg {
        /// The file.
        path: String,
        /// qemu-img's message.
        details: String,
    },
    /// The disk has a backing file.
    #[error(
        "{disk} has a backing file ({backing}), which CDI refuses; flatten it first with `qemu-img convert -O qcow2`"
    )]
    BackingFile {
        /// The disk.
        disk: String,
        /// The backing file's name as the header says.
        backing: String,
    },
    /// The disk is encrypted.
    #[error("{0} is encrypted, which CDI refuses; decrypt it first")]
    Encrypted(String),
    /// The format is not one CDI imports.
    #[error("{disk} is {format}, which CDI does not import; convert it with `qemu-img convert -O qcow2`")]
    UnsupportedFormat {
        /// The disk.
        disk: String,
        /// Its format.
        format: String,
    },
    /// The size is not a Kubernetes quantity.
    #[error("size {size}: {details}; write it like 10Gi or 512Mi")]
    SizeMalformed {
        /// The size given.
        size: String,
        /// Why.
        details: String,
    },
    /// The size cannot hold the disk.
    #[error(
        "size {size} ({bytes} bytes) is smaller than the disk's virtual size of {virtual_size} bytes; the upload would fail after sending everything: ask for {needed_mib}Mi or more"
    )]
    SizeTooSmall {
        /// The size given.
        size: String,
        /// It in bytes.
        bytes: u64,
        /// The disk's virtual size.
        virtual_size: u64,
        /// The smallest size that holds it with CDI's overhead, in MiB.
        needed_mib: u64,
    },
    /// CDIConfig has no upload proxy URL.
    #[error(
        "CDIConfig config has no status.uploadProxyURL; expose cdi-uploadproxy (e.g. an Ingress or kubectl port-forward) and configure its URL"
    )]
    NoProxyUrl,
    /// The UploadTokenRequest answer has no token.
    #[error("the UploadTokenRequest answer has no status.token; check CDI's cdi-apiserver")]
    NoToken,
    /// The HTTP client for the proxy could not be made.
    #[error("cannot set up the HTTP client for the upload proxy: {0}")]
    Client(String),
    /// The proxy could not be reached, timed out or the connection broke.
    #[error("{what} at {url} after {sent} of {total} bytes: {details}; {advice}")]
    ProxyFailed {
        /// What happened, e.g. "the upload proxy stopped answering (timed out)".
        what: &'static str,
        /// The URL.
        url: String,
        /// Bytes sent before it failed.
        sent: u64,
        /// Bytes of the disk.
        total: u64,
        /// The error chain.
        details: String,
        /// Whether it was a timeout (for callers choosing a status code).
        timed_out: bool,
        /// What to do.
        advice: &'static str,
    },
    /// The proxy answered with an error status.
    #[error("the upload proxy at {url} answered http {status}: {advice}{message}")]
    ProxyRefused {
        /// The URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// What it means and what to do.
        advice: &'static str,
        /// The proxy's own message, `" (…)"`, or empty.
        message: String,
    },
    /// The proxy answered before every byte was sent.
    #[error(
        "the upload proxy answered http {status} after only {sent} of {total} bytes; the upload is incomplete: upload again into a new DataVolume"
    )]
    Incomplete {
        /// The HTTP status.
        status: u16,
        /// Bytes sent.
        sent: u64,
        /// Bytes expected.
        total: u64,
    },
}

/// A disk's format and what CDI checks about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// qemu-img's format name (`qcow2`, `raw`, `vmdk`, `vdi`, `vpc`, `vhdx`, …).
    pub format: String,
    /// The virtual size in bytes, when known (always from qemu-img; from a header for qcow2 and
    /// raw only).
    pub virtual_size: Option<u64>,
    /// The backing file the disk names, if any.
    pub backing_file: Option<String>,
    /// Whether the disk is encrypted.
    pub encrypted: bool,
}

/// A disk file's format and virtual size, read by `paddock_disk::inspect` (which checks the
/// header for backing files, external data files, encryption and foreign vmdk extents before
/// qemu-img opens the file, because such references can point at any path on this machine), then
/// checked with [`check_disk`]. A gzip/xz/zstd-compressed disk is refused: CDI's size check needs
/// the virtual size, which only the decompressed disk tells.
pub async fn inspect_disk_file(disk: &Path) -> Result<DiskInfo, UploadError> {
    let name = disk.display().to_string();
    let path = disk.to_owned();
    let inspection = tokio::task::spawn_blocking(move || paddock_disk::inspect(&path))
        .await
        .map_err(|error| UploadError::QemuImg {
            path: name.clone(),
            details: format!("the inspection task failed: {error}"),
        })?;
    let info = match inspection {
        Ok(paddock_disk::Inspection::Disk(info)) => DiskInfo {
            format: info.format.qemu_name().to_owned(),
            virtual_size: Some(info.virtual_size),
            backing_file: None,
            encrypted: false,
        },
        Ok(paddock_disk::Inspection::Compressed(compression)) => {
            return Err(UploadError::UnsupportedFormat {
                disk: name,
                format: format!("{compression}-compressed (decompress it first)"),
            });
        }
        Ok(paddock_disk::Inspection::Archive) => {
            return Err(UploadError::UnsupportedFormat {
                disk: name,
                format: "a tar archive (an OVA? take its disk out with `paddock package`)".to_owned(),
            });
        }
        Err(paddock_disk::Error::BackingFile { backing, .. }) => {
            return Err(UploadError::BackingFile { disk: name, backing });
        }
        Err(paddock_disk::Error::Encrypted { .. }) => return Err(UploadError::Encrypted(name)),
        Err(paddock_disk::Error::Read { source, .. }) => {
            return Err(UploadError::DiskUnreadable { path: name, source });
        }
        Err(paddock_disk::Error::NotAFile { .. }) => return Err(UploadError::NotAFile(name)),
        Err(refusal) => return Err(UploadError::DiskRefused(refusal.to_string())),
    };
    check_disk(&name, &info)?;
    Ok(info)
}

/// What the first bytes of a disk say (at least [`HEADER_BYTES`] of them, fewer only when the
/// disk is that short), `length` being the whole disk's: qcow2's header gives the virtual size,
/// backing file and encryption; VMDK, VDI, VHD and VHDX are recognised by their magic (their
/// virtual size is left to CDI); anything else is raw, whose virtual size is its length.
pub fn sniff_disk_header(header: &[u8], length: u64) -> DiskInfo {
    let big_endian_u64 = |offset: usize| {
        header
            .get(offset..offset + 8)
            .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
            .map(u64::from_be_bytes)
    };
    let big_endian_u32 = |offset: usize| {
        header
            .get(offset..offset + 4)
            .and_then(|bytes| <[u8; 4]>::try_from(bytes).ok())
            .map(u32::from_be_bytes)
    };
    let other = |format: &str| DiskInfo {
        format: format.to_owned(),
        virtual_size: None,
        backing_file: None,
        encrypted: false,
    };
    if header.starts_with(b"QFI\xfb") {
        // qcow2 header: backing_file_offset at 8, size at 24, crypt_method at 32.
        let backing_offset = big_endian_u64(8).unwrap_or(0);
        let backing_size = big_endian_u32(16).unwrap_or(0) as usize;
        let backing_file = (backing_offset != 0).then(|| {
            usize::try_from(backing_offset)
                .ok()
                .and_then(|start| header.get(start..start.saturating_add(backing_size)))
                .map(|name| String::from_utf8_lossy(name).into_owned())
                .unwrap_or_else(|| "named in the qcow2 header".to_owned())
        });
        return DiskInfo {
            format: "qcow2".to_owned(),
            virtual_size: big_endian_u64(24),
            backing_file,
            encrypted: big_endian_u32(32).unwrap_or(0) != 0,
        };
    }
    if header.starts_with(b"KDMV") || header.starts_with(b"# Disk DescriptorFile") {
        return other("vmdk");
    }
    if header.get(64..68) == Some(&[0x7f, 0x10, 0xda, 0xbe]) {
        return other("vdi");
    }
    if header.starts_with(b"vhdxfile") {
        return other("vhdx");
    }
    if header.starts_with(b"conectix") {
        return other("vpc");
    }
    DiskInfo {
        format: "raw".to_owned(),
        virtual_size: Some(length),
        backing_file: None,
        encrypted: false,
    }
}

/// Refuses what CDI would refuse: a backing file, encryption, a format it does not import.
/// `disk` names the disk in messages.
pub fn check_disk(disk: &str, info: &DiskInfo) -> Result<(), UploadError> {
    if let Some(backing) = &info.backing_file {
        return Err(UploadError::BackingFile {
            disk: disk.to_owned(),
            backing: backing.clone(),
        });
    }
    if info.encrypted {
        return Err(UploadError::Encrypted(disk.to_owned()));
    }
    if !IMPORTED_FORMATS.contains(&info.format.as_str()) {
        return Err(UploadError::UnsupportedFormat {
            disk: disk.to_owned(),
            format: info.format.clone(),
        });
    }
    Ok(())
}

/// The smallest DataVolume size in MiB that holds `virtual_size` bytes on a Filesystem volume
/// (plus the overhead CDI reserves).
pub fn minimum_size_mib(virtual_size: u64) -> u64 {
    let needed = (virtual_size as f64 * (1.0 + FILESYSTEM_OVERHEAD)).ceil() as u64;
    needed.div_ceil(MIB)
}

/// The DataVolume size to ask for: `size` checked against the disk's virtual size (when known),
/// or by default [`minimum_size_mib`] of it.
pub fn requested_size(size: Option<&str>, virtual_size: Option<u64>) -> Result<String, UploadError> {
    let needed_mib = virtual_size.map(minimum_size_mib);
    let Some(size) = size else {
        return match needed_mib {
            Some(mib) => Ok(format!("{mib}Mi")),
            None => Err(UploadError::SizeMalformed {
                size: String::new(),
                details: "no size was given and the disk's virtual size is unknown".to_owned(),
            }),
        };
    };
    let bytes = paddock_api::quantity::parse_quantity(size)
        .map_err(|error| UploadError::SizeMalformed {
            size: size.to_owned(),
            details: error.to_string(),
        })
        .and_then(|bytes| {
            u64::try_from(bytes).map_err(|_| UploadError::SizeMalformed {
                size: size.to_owned(),
                details: "too large".to_owned(),
            })
        })?;
    if let (Some(virtual_size), Some(needed_mib)) = (virtual_size, needed_mib)
        && bytes < virtual_size
    {
        return Err(UploadError::SizeTooSmall {
            size: size.to_owned(),
            bytes,
            virtual_size,
            needed_mib,
        });
    }
    Ok(size.to_owned())
}

/// The DataVolume with an upload source: `spec.source.upload` and `spec.storage` of `size`.
pub fn data_volume_manifest(namespace: &str, name: &str, size: &str, storage_class: Option<&str>) -> Value {
    let mut storage = json!({"resources": {"requests": {"storage": size}}});
    if let Some(class) = storage_class {
        storage["storageClassName"] = json!(class);
    }
    json!({
        "apiVersion": format!("{}/{}", DATA_VOLUME.group, DATA_VOLUME.version),
        "kind": DATA_VOLUME.kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"source": {"upload": {}}, "storage": storage},
    })
}

/// Whether an existing DataVolume takes uploads (`spec.source.upload`).
pub fn has_upload_source(data_volume: &Value) -> bool {
    !data_volume["spec"]["source"]["upload"].is_null()
}

/// The UploadTokenRequest for the DataVolume (its PVC has the DataVolume's name).
pub fn token_request_manifest(namespace: &str, name: &str) -> Value {
    json!({
        "apiVersion": format!("{}/{}", UPLOAD_TOKEN_REQUEST.group, UPLOAD_TOKEN_REQUEST.version),
        "kind": UPLOAD_TOKEN_REQUEST.kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"pvcName": name},
    })
}

/// The token in an UploadTokenRequest answer.
pub fn token_from_answer(answer: &Value) -> Result<String, UploadError> {
    answer["status"]["token"]
        .as_str()
        .filter(|token| !token.is_empty())
        .map(str::to_owned)
        .ok_or(UploadError::NoToken)
}

/// The proxy's URL from CDIConfig `config` (`status.uploadProxyURL`), with `https://` when it
/// names no scheme (CDI publishes a bare host name).
pub fn proxy_url_from_cdi_config(config: &Value) -> Result<String, UploadError> {
    config["status"]["uploadProxyURL"]
        .as_str()
        .filter(|url| !url.is_empty())
        .map(normalize_proxy_url)
        .ok_or(UploadError::NoProxyUrl)
}

/// A proxy URL with `https://` when it names no scheme.
pub fn normalize_proxy_url(url: &str) -> String {
    if url.contains("://") {
        url.to_owned()
    } else {
        format!("https://{url}")
    }
}

/// Which of the proxy's endpoints to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1beta1/upload-async`: answers once the bytes are stored; CDI then processes the disk.
    Async,
    /// `/v1beta1/upload`: answers after CDI checked (and converted) the disk.
    Sync,
}

/// The URL to `POST` the disk to.
pub fn upload_url(proxy: &str, endpoint: Endpoint) -> String {
    let path = match endpoint {
        Endpoint::Async => "/v1beta1/upload-async",
        Endpoint::Sync => "/v1beta1/upload",
    };
    format!("{}{path}", proxy.trim_end_matches('/'))
}

/// A DataVolume's `status.phase` (empty when it has none yet).
pub fn phase(data_volume: &Value) -> &str {
    data_volume["status"]["phase"].as_str().unwrap_or_default()
}

/// A DataVolume's `status.progress` (e.g. `"45.2%"`, `"N/A"`), when set.
pub fn progress(data_volume: &Value) -> Option<&str> {
    data_volume["status"]["progress"].as_str()
}

/// The message of the DataVolume's first condition that has one, for errors.
pub fn condition_message(data_volume: &Value) -> String {
    data_volume["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|condition| condition["message"].as_str())
        .find(|message| !message.is_empty())
        .unwrap_or("no message")
        .to_owned()
}

/// Where a DataVolume stands against the phases a caller waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PhaseCheck {
    /// It is in one of the wanted phases.
    Reached,
    /// It failed (and `Failed` was not wanted); CDI's message.
    Failed(String),
    /// Not yet.
    Waiting,
}

/// Compares a DataVolume's phase with `wanted`.
pub fn check_phase(data_volume: &Value, wanted: &[&str]) -> PhaseCheck {
    let current = phase(data_volume);
    if wanted.contains(&current) {
        PhaseCheck::Reached
    } else if current == "Failed" {
        PhaseCheck::Failed(condition_message(data_volume))
    } else {
        PhaseCheck::Waiting
    }
}

/// How the HTTP client for the upload proxy trusts it.
#[derive(Debug, Clone, Default)]
pub struct ProxyTrust {
    /// PEM certificates of CAs to trust besides the system's.
    pub ca_pem: Option<Vec<u8>>,
    /// Do not verify the proxy's certificate.
    pub insecure: bool,
}

/// How long the proxy may stay silent (not reading, not answering) before the upload fails.
pub const PROXY_READ_TIMEOUT: Duration = Duration::from_secs(300);

/// The HTTP client for the upload proxy: no overall limit (a disk may take hours), but a proxy
/// that stops reading or answering for [`PROXY_READ_TIMEOUT`] fails the upload instead of hanging
/// at 99%.
pub fn proxy_client(trust: &ProxyTrust) -> Result<reqwest::Client, UploadError> {
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("paddock/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(PROXY_READ_TIMEOUT);
    if let Some(pem) = &trust.ca_pem {
        let certificates = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|error| UploadError::Client(format!("the CA file holds no PEM certificate: {error}")))?;
        builder = builder.tls_certs_merge(certificates);
    }
    if trust.insecure {
        builder = builder.tls_danger_accept_invalid_certs(true);
    }
    builder
        .build()
        .map_err(|error| UploadError::Client(error.to_string()))
}

/// Called with the size of every chunk as it is handed to the connection.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// A stream of a disk's bytes.
pub type DiskStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static>>;

/// A file as a stream of 1 MiB chunks.
pub fn file_stream(file: tokio::fs::File) -> DiskStream {
    Box::pin(futures_util::stream::unfold(file, |mut file| async move {
        let mut buffer = vec![0u8; MIB as usize];
        match file.read(&mut buffer).await {
            Ok(0) => None,
            Ok(count) => {
                buffer.truncate(count);
                Some((Ok(Bytes::from(buffer)), file))
            }
            Err(error) => Some((Err(error), file)),
        }
    }))
}

/// Streams `length` bytes of `body` to the proxy's `url` with the upload `token`. Returns the
/// bytes sent once the proxy answered 2xx after receiving all of them; see [`UploadError`] for
/// everything else (a body that ends early or fails is a broken connection, never a success).
pub async fn send_disk(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: DiskStream,
    length: u64,
    progress: Progress,
) -> Result<u64, UploadError> {
    let sent = Arc::new(AtomicU64::new(0));
    let body_failed = Arc::new(AtomicBool::new(false));
    let counted = {
        let (sent, body_failed) = (Arc::clone(&sent), Arc::clone(&body_failed));
        body.map(move |item| {
            match &item {
                Ok(bytes) => {
                    sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    progress(bytes.len() as u64);
                }
                Err(_) => body_failed.store(true, Ordering::Relaxed),
            }
            item
        })
    };
    let response = client
        .post(url)
        .bearer_auth(token)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .header(reqwest::header::CONTENT_LENGTH, length)
        .body(reqwest::Body::wrap_stream(counted))
        .send()
        .await;
    let bytes_sent = sent.load(Ordering::Relaxed);
    let response = match response {
        Ok(response) => response,
        Err(error) => {
            let timed_out = error.is_timeout();
            let proxy_advice = "check that the upload proxy is reachable and trusted, then upload again into a new DataVolume";
            let (what, advice) = if timed_out {
                ("the upload proxy stopped answering (timed out)", proxy_advice)
            } else if error.is_connect() {
                ("cannot connect to the upload proxy", proxy_advice)
            } else if body_failed.load(Ordering::Relaxed) {
                (
                    "the disk's bytes stopped arriving (the sender went away or the file could not be read)",
                    "the upload is incomplete: upload again into a new DataVolume",
                )
            } else {
                ("the connection to the upload proxy broke", proxy_advice)
            };
            return Err(UploadError::ProxyFailed {
                what,
                url: url.to_owned(),
                sent: bytes_sent,
                total: length,
                details: paddock_oci::registry::error_chain(&error),
                timed_out,
                advice,
            });
        }
    };
    let status = response.status();
    let message = response.text().await.unwrap_or_default();
    if !status.is_success() {
        return Err(refusal(url, status.as_u16(), &message));
    }
    if bytes_sent != length {
        return Err(UploadError::Incomplete {
            status: status.as_u16(),
            sent: bytes_sent,
            total: length,
        });
    }
    Ok(bytes_sent)
}

/// The error for a proxy's non-2xx answer, with what it means.
pub fn refusal(url: &str, status: u16, message: &str) -> UploadError {
    let advice = match status {
        400 => "the proxy or CDI refused the disk or the request",
        401 | 403 => "the upload token was refused (tokens expire after a few minutes): upload again",
        413 => "the disk is larger than the proxy (or a proxy in front of it) accepts",
        503 => "the upload server is not ready or the DataVolume already received an upload",
        502 | 504 => "the proxy timed out waiting for the upload server",
        _ => "the upload proxy refused the upload",
    };
    UploadError::ProxyRefused {
        url: url.to_owned(),
        status,
        advice,
        message: if message.trim().is_empty() {
            String::new()
        } else {
            format!(" ({})", message.trim())
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

    use super::*;

    #[test]
    fn sizes_hold_the_disk_and_default_to_cdis_overhead() {
        assert_eq!(requested_size(None, Some(1 << 30)).unwrap(), "1081Mi");
        assert_eq!(requested_size(Some("2Gi"), Some(1 << 30)).unwrap(), "2Gi");
        let refused = requested_size(Some("512Mi"), Some(1 << 30))
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("smaller than the disk's virtual size") && refused.contains("1081Mi"),
            "{refused}"
        );
        assert!(requested_size(Some("lots"), Some(1 << 30)).is_err());
        assert_eq!(requested_size(Some("1Mi"), None).unwrap(), "1Mi");
        assert!(requested_size(None, None).is_err());
    }

    fn qcow2_header(size: u64, backing: Option<&str>, crypt: u32) -> Vec<u8> {
        let mut header = vec![0u8; HEADER_BYTES];
        header[..4].copy_from_slice(b"QFI\xfb");
        header[4..8].copy_from_slice(&3u32.to_be_bytes());
        if let Some(name) = backing {
            header[8..16].copy_from_slice(&200u64.to_be_bytes());
            header[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            header[200..200 + name.len()].copy_from_slice(name.as_bytes());
        }
        header[24..32].copy_from_slice(&size.to_be_bytes());
        header[32..36].copy_from_slice(&crypt.to_be_bytes());
        header
    }

    #[test]
    fn headers_give_format_virtual_size_and_refusals() {
        let plain = sniff_disk_header(&qcow2_header(5 << 30, None, 0), 1 << 20);
        assert_eq!(plain.format, "qcow2");
        assert_eq!(plain.virtual_size, Some(5 << 30));
        check_disk("d", &plain).unwrap();
        let backed = sniff_disk_header(&qcow2_header(1 << 30, Some("base.qcow2"), 0), 1 << 20);
        assert_eq!(backed.backing_file.as_deref(), Some("base.qcow2"));
        assert!(
            check_disk("d", &backed)
                .unwrap_err()
                .to_string()
                .contains("backing file")
        );
        let encrypted = sniff_disk_header(&qcow2_header(1 << 30, None, 1), 1 << 20);
        assert!(
            check_disk("d", &encrypted)
                .unwrap_err()
                .to_string()
                .contains("encrypted")
        );
        let raw = sniff_disk_header(&[0u8; HEADER_BYTES], 3 << 20);
        assert_eq!((raw.format.as_str(), raw.virtual_size), ("raw", Some(3 << 20)));
        assert_eq!(sniff_disk_header(b"vhdxfile....", 100).format, "vhdx");
    }

    #[tokio::test]
    async fn qemu_img_and_the_header_agree_on_a_real_qcow2() {
        let directory = std::env::temp_dir().join(format!("paddock-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let disk = directory.join("disk.qcow2");
        let created = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&disk)
            .arg("64M")
            .status()
            .unwrap();
        assert!(created.success());
        let from_qemu_img = inspect_disk_file(&disk).await.unwrap();
        let bytes = std::fs::read(&disk).unwrap();
        let from_header = sniff_disk_header(&bytes[..HEADER_BYTES], bytes.len() as u64);
        assert_eq!(from_qemu_img, from_header);
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[tokio::test]
    async fn disks_that_cdi_refuses_are_refused_before_any_upload() {
        let directory = tempfile::tempdir().unwrap();
        let base = directory.path().join("base.qcow2");
        let overlay = directory.path().join("overlay.qcow2");
        let create = |arguments: &[&str]| {
            let status = std::process::Command::new("qemu-img")
                .args(arguments)
                .status()
                .unwrap();
            assert!(status.success());
        };
        create(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "16M"]);
        create(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            overlay.to_str().unwrap(),
        ]);
        let error = inspect_disk_file(&overlay).await.unwrap_err();
        assert!(
            matches!(&error, UploadError::BackingFile { backing, .. } if backing.ends_with("base.qcow2")),
            "{error}"
        );
        let compressed = directory.path().join("disk.img.gz");
        let mut encoder = flate2::write::GzEncoder::new(
            std::fs::File::create(&compressed).unwrap(),
            flate2::Compression::fast(),
        );
        std::io::Write::write_all(&mut encoder, &[0u8; 1 << 20]).unwrap();
        encoder.finish().unwrap();
        let error = inspect_disk_file(&compressed).await.unwrap_err();
        assert!(error.to_string().contains("decompress it first"), "{error}");
        let error = inspect_disk_file(directory.path()).await.unwrap_err();
        assert!(
            matches!(error, UploadError::NotAFile(_) | UploadError::DiskRefused(_)),
            "{error}"
        );
    }

    #[test]
    fn manifests_and_answers() {
        let data_volume = data_volume_manifest("vms", "disk", "2Gi", Some("fast"));
        assert_eq!(data_volume["spec"]["storage"]["storageClassName"], "fast");
        assert!(has_upload_source(&data_volume));
        assert_eq!(token_request_manifest("vms", "disk")["spec"]["pvcName"], "disk");
        assert_eq!(
            proxy_url_from_cdi_config(&json!({"status": {"uploadProxyURL": "proxy.example"}})).unwrap(),
            "https://proxy.example"
        );
        assert!(proxy_url_from_cdi_config(&json!({})).is_err());
        assert_eq!(
            upload_url("https://p/", Endpoint::Async),
            "https://p/v1beta1/upload-async"
        );
        let failed =
            json!({"status": {"phase": "Failed", "conditions": [{"message": ""}, {"message": "bad disk"}]}});
        assert_eq!(
            check_phase(&failed, &["Succeeded"]),
            PhaseCheck::Failed("bad disk".into())
        );
        assert_eq!(check_phase(&failed, &["Failed"]), PhaseCheck::Reached);
        assert_eq!(check_phase(&json!({}), &["Succeeded"]), PhaseCheck::Waiting);
        assert!(refusal("u", 504, "").to_string().contains("timed out"));
    }
}
