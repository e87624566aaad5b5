//! Pushing an OCI image layout to a registry.
//!
//! Contract (see also the module docs of `registry`): the layout's manifests are checked against
//! their digests before anything is sent; blob files are checked for size only (the registry
//! verifies each blob's digest when the upload completes, and hashing here would cost a full read
//! of every blob on the critical path). Blob order: HEAD all, upload the missing ones, then child
//! manifests by digest, then the top manifest or index under the tag.

use std::collections::BTreeMap;
use std::io;
use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use paddock_api::image_reference::ImageReference;
use reqwest::Url;
use serde::{Deserialize, Serialize};

use super::client::{Access, RegistryClient};
use super::manifest::{
    DocumentKind, MAX_MANIFEST_SIZE, RawDescriptor, RawIndex, RawManifest, digest_hex, sha256_digest,
    sniff_media_type,
};
use super::{BlobPhase, BlobProgress, RegistryError, RegistryOptions, Result, TransferProgress};
use crate::{ANNOTATION_CONTAINERD_IMAGE_NAME, ANNOTATION_REF_NAME, MEDIA_TYPE_INDEX};

/// Default upload chunk size: see the crate README ("Registry") for the measurement behind it.
pub const DEFAULT_CHUNK_SIZE: u64 = 256 << 20;

/// How much of a blob file is read per buffer, and how many buffers may wait for the socket.
const READ_BUFFER: usize = 1 << 20;
const READ_AHEAD: usize = 4;

/// Options for [`push`].
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Where and how to connect.
    pub registry: RegistryOptions,
    /// How many blobs upload at the same time (at least 1); 4 by default.
    pub parallel_uploads: usize,
    /// Upload chunk size in bytes: each blob is sent as PATCH requests of at most this many bytes,
    /// and an interrupted push resumes at the last acknowledged chunk. `None` (or 0) sends each
    /// blob in a single streamed PATCH, which cannot resume mid-blob. Default
    /// [`DEFAULT_CHUNK_SIZE`] (256 MiB).
    pub chunk_size: Option<u64>,
    /// Which image of the layout's `index.json` to push when it lists several, matched against
    /// the `org.opencontainers.image.ref.name` / `io.containerd.image.name` annotations (the
    /// whole value, or the tag after its last ':'). `None` pushes the only image, or, when all
    /// entries are platform manifests, all of them as one image index.
    pub image: Option<String>,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            registry: RegistryOptions::default(),
            parallel_uploads: 4,
            chunk_size: Some(DEFAULT_CHUNK_SIZE),
            image: None,
        }
    }
}

/// What [`push`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushReport {
    /// The reference pushed, normalised (`docker.io/library/…:tag`).
    pub reference: String,
    /// Digest of the manifest or index the tag now points at.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Blobs uploaded in this run (completely or the rest of a resumed upload).
    pub blobs_uploaded: usize,
    /// Bytes sent in this run.
    pub bytes_uploaded: u64,
    /// Blobs the registry already had.
    pub blobs_skipped: usize,
    /// Their total size.
    pub bytes_skipped: u64,
    /// Blobs whose interrupted upload was resumed.
    pub blobs_resumed: usize,
    /// Bytes of resumed uploads that the registry already had and were not sent again.
    pub bytes_resumed: u64,
    /// Manifests and indexes uploaded (always all of them; they are small).
    pub manifests_pushed: usize,
}

/// A manifest or index to upload, with its exact bytes.
#[derive(Debug, Clone)]
struct Document {
    media_type: String,
    digest: String,
    bytes: Vec<u8>,
}

/// A blob file of the layout.
#[derive(Debug, Clone)]
struct BlobFile {
    media_type: String,
    digest: String,
    size: u64,
    path: PathBuf,
}

/// Everything a push sends.
#[derive(Debug)]
struct Plan {
    root: Document,
    children: Vec<Document>,
    blobs: Vec<BlobFile>,
}

fn layout_error(layout: &Path, reason: impl Into<String>) -> RegistryError {
    RegistryError::Layout {
        path: layout.to_path_buf(),
        reason: reason.into(),
    }
}

fn blob_path(layout: &Path, descriptor: &RawDescriptor, what: &str) -> Result<PathBuf> {
    let hex = digest_hex(&descriptor.digest).ok_or_else(|| RegistryError::InvalidDigest {
        what: format!("{what} in layout {}", layout.display()),
        digest: descriptor.digest.clone(),
    })?;
    Ok(layout.join("blobs").join("sha256").join(hex))
}

/// Reads a manifest or index blob and checks it against its descriptor.
fn read_document(layout: &Path, descriptor: &RawDescriptor) -> Result<Document> {
    let path = blob_path(layout, descriptor, "a manifest")?;
    if descriptor.size > MAX_MANIFEST_SIZE {
        return Err(layout_error(
            layout,
            format!(
                "manifest {} claims {} bytes; manifests are small documents",
                descriptor.digest, descriptor.size
            ),
        ));
    }
    let bytes = std::fs::read(&path).map_err(|source| RegistryError::Read {
        path: path.clone(),
        source,
    })?;
    if bytes.len() as u64 != descriptor.size {
        return Err(RegistryError::SizeMismatch {
            what: "manifest",
            digest: descriptor.digest.clone(),
            expected: descriptor.size,
            actual: bytes.len() as u64,
            location: format!("layout {}", layout.display()),
        });
    }
    let actual = sha256_digest(&bytes);
    if actual != descriptor.digest {
        return Err(RegistryError::DigestMismatch {
            what: "manifest",
            expected: descriptor.digest.clone(),
            actual,
            location: format!("layout {}", layout.display()),
        });
    }
    let media_type = if descriptor.media_type.is_empty() {
        sniff_media_type(&bytes).unwrap_or_default()
    } else {
        descriptor.media_type.clone()
    };
    Ok(Document {
        media_type,
        digest: descriptor.digest.clone(),
        bytes,
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: impl FnOnce() -> String) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|source| RegistryError::Json { what: what(), source })
}

/// Adds the config and layers of `manifest` to `blobs`, checking each file's size.
fn collect_blobs(layout: &Path, manifest: &Document, blobs: &mut BTreeMap<String, BlobFile>) -> Result<()> {
    let parsed: RawManifest = parse_json(&manifest.bytes, || {
        format!("manifest {} in {}", manifest.digest, layout.display())
    })?;
    for descriptor in std::iter::once(&parsed.config).chain(&parsed.layers) {
        let path = blob_path(layout, descriptor, "a blob of a manifest")?;
        let size = std::fs::metadata(&path)
            .map_err(|source| RegistryError::Read {
                path: path.clone(),
                source,
            })?
            .len();
        if size != descriptor.size {
            return Err(RegistryError::SizeMismatch {
                what: "blob",
                digest: descriptor.digest.clone(),
                expected: descriptor.size,
                actual: size,
                location: format!("layout {}", layout.display()),
            });
        }
        blobs.insert(
            descriptor.digest.clone(),
            BlobFile {
                media_type: descriptor.media_type.clone(),
                digest: descriptor.digest.clone(),
                size,
                path,
            },
        );
    }
    Ok(())
}

/// Whether an `index.json` entry is the image named `wanted`.
fn entry_is_named(descriptor: &RawDescriptor, wanted: &str) -> bool {
    [ANNOTATION_REF_NAME, ANNOTATION_CONTAINERD_IMAGE_NAME]
        .iter()
        .filter_map(|key| descriptor.annotations.get(*key))
        .any(|name| name == wanted || name.rsplit_once(':').is_some_and(|(_, tag)| tag == wanted))
}

/// Reads the layout and works out what to send.
fn plan(layout: &Path, image: Option<&str>) -> Result<Plan> {
    if !layout.join("oci-layout").is_file() {
        return Err(layout_error(
            layout,
            "it has no oci-layout file; is it an OCI image layout directory?",
        ));
    }
    let index_path = layout.join("index.json");
    let index_bytes = std::fs::read(&index_path).map_err(|source| RegistryError::Read {
        path: index_path.clone(),
        source,
    })?;
    let index: RawIndex = parse_json(&index_bytes, || format!("{}", index_path.display()))?;
    let entries: Vec<&RawDescriptor> = index
        .manifests
        .iter()
        .filter(|entry| image.is_none_or(|wanted| entry_is_named(entry, wanted)))
        .collect();
    let names = || {
        index
            .manifests
            .iter()
            .filter_map(|entry| entry.annotations.get(ANNOTATION_REF_NAME).cloned())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let root = match entries.as_slice() {
        [] => {
            return Err(layout_error(
                layout,
                match image {
                    Some(wanted) => {
                        format!("index.json lists no image named {wanted:?} (it has: {})", names())
                    }
                    None => "index.json lists no image".to_string(),
                },
            ));
        }
        [only] => read_document(layout, only)?,
        several if several.iter().all(|entry| entry.platform.is_some()) => {
            // Several platform manifests side by side in index.json: push them as one image
            // index. The entries are copied as they are (annotations included).
            let all: serde_json::Value = parse_json(&index_bytes, || format!("{}", index_path.display()))?;
            let digests: Vec<&str> = several.iter().map(|entry| entry.digest.as_str()).collect();
            let manifests: Vec<serde_json::Value> = all
                .get("manifests")
                .and_then(serde_json::Value::as_array)
                .into_iter()
                .flatten()
                .filter(|entry| {
                    entry
                        .get("digest")
                        .and_then(serde_json::Value::as_str)
                        .is_some_and(|digest| digests.contains(&digest))
                })
                .cloned()
                .collect();
            let bytes = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": MEDIA_TYPE_INDEX,
                "manifests": manifests,
            }))
            .map_err(|source| RegistryError::Json {
                what: "the image index built from index.json".to_string(),
                source,
            })?;
            Document {
                media_type: MEDIA_TYPE_INDEX.to_string(),
                digest: sha256_digest(&bytes),
                bytes,
            }
        }
        several => {
            return Err(layout_error(
                layout,
                format!(
                    "index.json lists {} images; choose one by name (it has: {})",
                    several.len(),
                    names()
                ),
            ));
        }
    };

    let mut blobs = BTreeMap::new();
    let mut children = Vec::new();
    match DocumentKind::of_media_type(&root.media_type) {
        Some(DocumentKind::Manifest) => collect_blobs(layout, &root, &mut blobs)?,
        Some(DocumentKind::Index) => {
            let parsed: RawIndex = parse_json(&root.bytes, || {
                format!("image index {} in {}", root.digest, layout.display())
            })?;
            for entry in &parsed.manifests {
                let child = read_document(layout, entry)?;
                if DocumentKind::of_media_type(&child.media_type) != Some(DocumentKind::Manifest) {
                    return Err(RegistryError::UnsupportedMediaType {
                        what: format!("manifest {} listed in image index {}", child.digest, root.digest),
                        media_type: child.media_type,
                        reason: "an image index may only list image manifests here (nested indexes are not pushed)",
                    });
                }
                collect_blobs(layout, &child, &mut blobs)?;
                children.push(child);
            }
        }
        None => {
            return Err(RegistryError::UnsupportedMediaType {
                what: format!("image {} in {}", root.digest, layout.display()),
                media_type: root.media_type,
                reason: "paddock pushes OCI or Docker schema 2 image manifests and indexes",
            });
        }
    }
    Ok(Plan {
        root,
        children,
        blobs: blobs.into_values().collect(),
    })
}

/// An upload session saved between chunks, so that a later push can resume it.
#[derive(Debug, Serialize, Deserialize)]
struct UploadState {
    registry: String,
    repository: String,
    digest: String,
    size: u64,
    location: String,
    offset: u64,
}

fn state_path(layout: &Path, blob: &BlobFile) -> PathBuf {
    let hex = blob.digest.trim_start_matches("sha256:");
    layout.join(format!(".paddock-push-{hex}.json"))
}

/// Moves the saved upload sessions (`.paddock-push-<hex>.json`, see [`push`]) from one directory
/// to another, so a push from a layout rebuilt elsewhere (a backup's scratch directory) resumes
/// where an earlier one stopped. When the destination is a layout, only sessions of blobs it holds
/// move; a move that fails only costs a resume.
pub fn move_upload_sessions(from: &Path, to: &Path) {
    let Ok(entries) = std::fs::read_dir(from) else {
        return;
    };
    let to_layout = to.join("blobs").join("sha256");
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(text) = name.to_str() else {
            continue;
        };
        let Some(hex) = text
            .strip_prefix(".paddock-push-")
            .and_then(|rest| rest.strip_suffix(".json"))
        else {
            continue;
        };
        if to_layout.is_dir() && !to_layout.join(hex).is_file() {
            continue;
        }
        let _ = std::fs::rename(entry.path(), to.join(text));
    }
}

fn read_state(path: &Path) -> Option<UploadState> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Saves the session (temp file + rename). Failures are ignored on purpose: resuming is an
/// optimisation, and a read-only layout must still push.
fn save_state(path: &Path, state: &UploadState) {
    let Ok(bytes) = serde_json::to_vec(state) else {
        return;
    };
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".partial");
    let temporary = PathBuf::from(temporary);
    if std::fs::write(&temporary, bytes).is_ok() && std::fs::rename(&temporary, path).is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
}

/// A request body streaming bytes `offset..offset + length` of `path`, read on the blocking pool
/// a buffer ahead of the socket. `sent` counts bytes handed to the connection; once `abort` is
/// set the body fails, which aborts the request.
fn file_body(
    path: PathBuf,
    offset: u64,
    length: u64,
    sent: Arc<AtomicU64>,
    abort: Arc<AtomicBool>,
) -> reqwest::Body {
    sent.store(0, Ordering::Relaxed);
    let (sender, receiver) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(READ_AHEAD);
    tokio::task::spawn_blocking(move || {
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(error) => {
                let _ = sender.blocking_send(Err(error));
                return;
            }
        };
        let end = offset + length;
        let mut position = offset;
        while position < end {
            let wanted = usize::try_from(end - position)
                .unwrap_or(READ_BUFFER)
                .min(READ_BUFFER);
            let mut buffer = BytesMut::zeroed(wanted);
            let item = match file.read_at(&mut buffer, position) {
                Ok(0) => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} is shorter than its descriptor says", path.display()),
                )),
                Ok(read) => {
                    buffer.truncate(read);
                    position += read as u64;
                    Ok(buffer.freeze())
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => Err(error),
            };
            let failed = item.is_err();
            // A closed channel means the request is gone (finished, failed or dropped): stop.
            if sender.blocking_send(item).is_err() || failed {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    })
    .map(move |item| {
        if abort.load(Ordering::Relaxed) {
            return Err(io::Error::other("cancelled"));
        }
        if let Ok(bytes) = &item {
            sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        item
    });
    reqwest::Body::wrap_stream(stream)
}

/// What uploading one blob did.
struct Uploaded {
    sent: u64,
    resumed_from: u64,
}

/// Shared by the parallel uploads of one push.
struct UploadContext<'a> {
    client: &'a RegistryClient,
    layout: &'a Path,
    chunk_size: Option<u64>,
    progress: &'a dyn TransferProgress,
    /// Set once the progress callback asked to stop; every upload stops at its next chance.
    stop: AtomicBool,
}

impl UploadContext<'_> {
    fn report(&self, blob: &BlobFile, done: u64, phase: BlobPhase) {
        if self.stop.load(Ordering::Relaxed) {
            return;
        }
        let flow = self.progress.blob(&BlobProgress {
            digest: &blob.digest,
            media_type: &blob.media_type,
            size: blob.size,
            done,
            phase,
        });
        if let ControlFlow::Break(()) = flow {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    /// Finds a saved session of this blob that the registry still has.
    async fn resumable_session(&self, blob: &BlobFile, state_file: &Path) -> Result<Option<(Url, u64)>> {
        let Some(saved) = read_state(state_file) else {
            return Ok(None);
        };
        if saved.registry != self.client.registry()
            || saved.repository != self.client.repository()
            || saved.digest != blob.digest
            || saved.size != blob.size
        {
            return Ok(None);
        }
        let Ok(location) = Url::parse(&saved.location) else {
            return Ok(None);
        };
        Ok(self
            .client
            .upload_status(&location)
            .await?
            .filter(|(_, offset)| *offset <= blob.size))
    }

    async fn upload(&self, blob: &BlobFile) -> Result<Uploaded> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(RegistryError::Cancelled);
        }
        let state_file = state_path(self.layout, blob);
        let (mut location, mut offset) = match self.resumable_session(blob, &state_file).await? {
            Some(session) => session,
            None => (self.client.start_upload().await?, 0),
        };
        let resumed_from = offset;
        let mut state = UploadState {
            registry: self.client.registry().to_string(),
            repository: self.client.repository().to_string(),
            digest: blob.digest.clone(),
            size: blob.size,
            location: location.to_string(),
            offset,
        };
        save_state(&state_file, &state);
        self.report(blob, offset, BlobPhase::Started);

        let single_request = matches!(self.chunk_size, None | Some(0));
        let chunk_size = self.chunk_size.filter(|size| *size > 0).unwrap_or(u64::MAX);
        let mut sent = 0;
        while offset < blob.size {
            let length = chunk_size.min(blob.size - offset);
            let counter = Arc::new(AtomicU64::new(0));
            let abort = Arc::new(AtomicBool::new(false));
            let result = {
                let request = self.client.upload_chunk(&location, offset, length, || {
                    file_body(blob.path.clone(), offset, length, counter.clone(), abort.clone())
                });
                let mut request = std::pin::pin!(request);
                let mut ticker = tokio::time::interval(Duration::from_millis(100));
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tokio::select! {
                        result = &mut request => break result,
                        _ = ticker.tick() => {
                            self.report(blob, offset + counter.load(Ordering::Relaxed), BlobPhase::Transferring);
                            // A single request cannot stop at a resumable point: abort it now.
                            if single_request && self.stop.load(Ordering::Relaxed) {
                                abort.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                }
            };
            location = match result {
                Ok(next) => next,
                Err(_) if abort.load(Ordering::Relaxed) => return Err(RegistryError::Cancelled),
                Err(error) => return Err(error),
            };
            offset += length;
            sent += length;
            state.location = location.to_string();
            state.offset = offset;
            save_state(&state_file, &state);
            self.report(blob, offset, BlobPhase::Transferring);
            if offset < blob.size && self.stop.load(Ordering::Relaxed) {
                return Err(RegistryError::Cancelled);
            }
        }
        self.client.finish_upload(&location, &blob.digest).await?;
        let _ = std::fs::remove_file(&state_file);
        self.report(blob, blob.size, BlobPhase::Finished);
        Ok(Uploaded { sent, resumed_from })
    }
}

/// Pushes the OCI image layout at `layout` to `reference` (`registry/repository:tag`; a Docker Hub
/// short name such as `debian:12` means `docker.io/library/debian:12`).
///
/// Blobs the repository already has are skipped; the others upload in parallel and in chunks (see
/// [`PushOptions`]); then the manifests and the index go up. A reference that pins a digest must
/// name the layout's image. Returns what was sent and skipped. Must run inside a tokio runtime.
pub async fn push(
    layout: &Path,
    reference: &str,
    options: &PushOptions,
    progress: &dyn TransferProgress,
) -> Result<PushReport> {
    let reference = ImageReference::parse(reference)?;
    let plan = plan(layout, options.image.as_deref())?;
    if let Some(pinned) = &reference.digest
        && *pinned != plan.root.digest
    {
        return Err(layout_error(
            layout,
            format!(
                "the reference pins digest {pinned}, but the layout's image is {}",
                plan.root.digest
            ),
        ));
    }
    let client = RegistryClient::new(&reference, &options.registry, Access::Push)?;
    client.ping().await?;
    let parallel = options.parallel_uploads.max(1);

    let present: Vec<Result<bool>> = futures_util::stream::iter(
        plan.blobs
            .iter()
            .map(|blob| client.blob_exists(&blob.digest))
            .collect::<Vec<_>>(),
    )
    .buffered(parallel)
    .collect()
    .await;
    let context = UploadContext {
        client: &client,
        layout,
        chunk_size: options.chunk_size,
        progress,
        stop: AtomicBool::new(false),
    };
    let mut report = PushReport {
        reference: reference.to_string(),
        digest: plan.root.digest.clone(),
        media_type: plan.root.media_type.clone(),
        blobs_uploaded: 0,
        bytes_uploaded: 0,
        blobs_skipped: 0,
        bytes_skipped: 0,
        blobs_resumed: 0,
        bytes_resumed: 0,
        manifests_pushed: 0,
    };
    let mut missing = Vec::new();
    for (blob, present) in plan.blobs.iter().zip(present) {
        if present? {
            report.blobs_skipped += 1;
            report.bytes_skipped += blob.size;
            let _ = std::fs::remove_file(state_path(layout, blob));
            context.report(blob, blob.size, BlobPhase::Skipped);
        } else {
            missing.push(blob);
        }
    }

    // Every upload runs to its own end (a cancelled one stops at a chunk boundary), so that one
    // failure does not throw away the others' progress; the first real error wins.
    let outcomes: Vec<Result<Uploaded>> = futures_util::stream::iter(
        missing
            .into_iter()
            .map(|blob| context.upload(blob))
            .collect::<Vec<_>>(),
    )
    .buffer_unordered(parallel)
    .collect()
    .await;
    let mut first_error = None;
    for outcome in outcomes {
        match outcome {
            Ok(uploaded) => {
                report.blobs_uploaded += 1;
                report.bytes_uploaded += uploaded.sent;
                if uploaded.resumed_from > 0 {
                    report.blobs_resumed += 1;
                    report.bytes_resumed += uploaded.resumed_from;
                }
            }
            Err(RegistryError::Cancelled) => {
                first_error.get_or_insert(RegistryError::Cancelled);
            }
            Err(error) => {
                if matches!(first_error, None | Some(RegistryError::Cancelled)) {
                    first_error = Some(error);
                }
            }
        }
    }
    if let Some(error) = first_error {
        return Err(error);
    }

    for child in &plan.children {
        client
            .put_manifest(&child.digest, &child.media_type, &child.bytes)
            .await?;
        report.manifests_pushed += 1;
    }
    let target = reference.tag.clone().unwrap_or_else(|| plan.root.digest.clone());
    client
        .put_manifest(&target, &plan.root.media_type, &plan.root.bytes)
        .await?;
    report.manifests_pushed += 1;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Compression, ImageOptions, NoProgress, build_layout};

    #[test]
    fn upload_sessions_move_into_a_layout_only_for_its_blobs() {
        let directory = tempfile::tempdir().unwrap();
        let resume = directory.path().join("resume");
        let layout = directory.path().join("layout");
        std::fs::create_dir_all(&resume).unwrap();
        std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
        std::fs::write(layout.join("blobs/sha256/aaaa"), b"blob").unwrap();
        for name in [".paddock-push-aaaa.json", ".paddock-push-bbbb.json", "unrelated"] {
            std::fs::write(resume.join(name), b"{}").unwrap();
        }
        move_upload_sessions(&resume, &layout);
        assert!(layout.join(".paddock-push-aaaa.json").is_file());
        assert!(
            !layout.join(".paddock-push-bbbb.json").exists(),
            "not a blob of this layout"
        );
        assert!(resume.join(".paddock-push-bbbb.json").is_file());
        assert!(resume.join("unrelated").is_file());
        // Back to the resume directory: everything that is a session goes.
        move_upload_sessions(&layout, &resume);
        assert!(resume.join(".paddock-push-aaaa.json").is_file());
        assert!(!layout.join(".paddock-push-aaaa.json").exists());
    }

    #[test]
    fn plans_a_built_layout_and_refuses_a_tampered_manifest() {
        let directory = tempfile::tempdir().unwrap();
        let disk = directory.path().join("disk.raw");
        std::fs::write(&disk, vec![7u8; 100_000]).unwrap();
        let layout = directory.path().join("layout");
        let options = ImageOptions {
            compression: Compression::None,
            ..ImageOptions::default()
        };
        let built = build_layout(&disk, &layout, &options, &mut NoProgress).unwrap();
        let planned = plan(&layout, None).unwrap();
        assert_eq!(planned.root.digest, built.manifest.digest);
        assert!(planned.children.is_empty());
        let digests: Vec<&str> = planned.blobs.iter().map(|blob| blob.digest.as_str()).collect();
        assert!(digests.contains(&built.layer.digest.as_str()));
        assert!(digests.contains(&built.config.digest.as_str()));
        assert!(matches!(
            plan(&layout, Some("no-such-tag")),
            Err(RegistryError::Layout { .. })
        ));
        assert!(plan(&layout, Some(&options.tag)).is_ok());

        let manifest_file = layout
            .join("blobs/sha256")
            .join(built.manifest.digest.trim_start_matches("sha256:"));
        let mut bytes = std::fs::read(&manifest_file).unwrap();
        bytes[0] = b' ';
        std::fs::write(&manifest_file, bytes).unwrap();
        assert!(matches!(
            plan(&layout, None),
            Err(RegistryError::DigestMismatch { .. })
        ));
    }
}
