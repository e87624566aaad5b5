//! Pulling one platform of an image from a registry into a new OCI image layout.
//!
//! Contract: the manifest is checked against the pinned digest (or the registry's
//! `Docker-Content-Digest`); an index is resolved to the manifest of the wanted platform, which is
//! checked against the index's descriptor; every blob streams to a file while it is hashed and
//! counted, and fails the pull as soon as it grows past its size or, at the end, when its digest
//! or size differ. The layout is assembled in `.paddock-pull-*` next to the destination and renamed
//! into place only when everything checked out.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use paddock_api::image_reference::ImageReference;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::client::{Access, FetchedManifest, RegistryClient};
use super::manifest::{
    DocumentKind, RawDescriptor, RawIndex, RawManifest, digest_hex, finish_sha256, sha256_digest,
    sniff_media_type,
};
use super::{BlobPhase, BlobProgress, RegistryError, RegistryOptions, Result, TransferProgress};
use crate::{ANNOTATION_REF_NAME, Descriptor, MEDIA_TYPE_INDEX, Platform};

/// Options for [`pull`].
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Where and how to connect.
    pub registry: RegistryOptions,
    /// The platform to pull when the reference names an image index; `linux/amd64` by default.
    pub platform: Platform,
    /// How many blobs download at the same time (at least 1); 4 by default.
    pub parallel_downloads: usize,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            registry: RegistryOptions::default(),
            platform: Platform::default(),
            parallel_downloads: 4,
        }
    }
}

/// What [`pull`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// The layout directory.
    pub layout: PathBuf,
    /// The reference pulled, normalised.
    pub reference: String,
    /// Digest of the image index the reference resolved to, when it was one.
    pub index_digest: Option<String>,
    /// The platform chosen from that index.
    pub platform: Option<Platform>,
    /// The image manifest written to the layout (its digest is the image digest).
    pub manifest: Descriptor,
    /// The config blob.
    pub config: Descriptor,
    /// The layer blobs, base first.
    pub layers: Vec<Descriptor>,
    /// Bytes of blobs downloaded.
    pub bytes_downloaded: u64,
}

/// The media type of a fetched document: what the registry said when paddock knows it, else what
/// the document declares.
fn media_type_of(fetched: &FetchedManifest) -> String {
    fetched
        .content_type
        .clone()
        .filter(|content_type| DocumentKind::of_media_type(content_type).is_some())
        .or_else(|| sniff_media_type(&fetched.bytes))
        .unwrap_or_default()
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: impl FnOnce() -> String) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|source| RegistryError::Json { what: what(), source })
}

/// Downloads one blob into `blobs` (as `<hex>.partial`, renamed to `<hex>` once verified).
async fn download(
    client: &RegistryClient,
    blob: &RawDescriptor,
    blobs: &Path,
    progress: &dyn TransferProgress,
) -> Result<u64> {
    let hex = digest_hex(&blob.digest).ok_or_else(|| RegistryError::InvalidDigest {
        what: "a blob of the manifest".to_string(),
        digest: blob.digest.clone(),
    })?;
    let report = |done: u64, phase: BlobPhase| {
        progress.blob(&BlobProgress {
            digest: &blob.digest,
            media_type: &blob.media_type,
            size: blob.size,
            done,
            phase,
        })
    };
    if report(0, BlobPhase::Started).is_break() {
        return Err(RegistryError::Cancelled);
    }
    let location = format!("registry {}", client.registry());
    let size_mismatch = |actual: u64| RegistryError::SizeMismatch {
        what: "blob",
        digest: blob.digest.clone(),
        expected: blob.size,
        actual,
        location: location.clone(),
    };
    let (mut response, action) = client.get_blob(&blob.digest).await?;
    if let Some(length) = response.content_length()
        && length != blob.size
    {
        return Err(size_mismatch(length));
    }
    let partial = blobs.join(format!("{hex}.partial"));
    let write_error = |source| RegistryError::Write {
        path: partial.clone(),
        source,
    };
    let file = tokio::fs::File::create(&partial).await.map_err(write_error)?;
    let mut writer = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut done = 0u64;
    let mut last_report = Instant::now();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|error| client.stream_error(&action, error))?
    {
        done += chunk.len() as u64;
        if done > blob.size {
            return Err(size_mismatch(done));
        }
        hasher.update(&chunk);
        writer.write_all(&chunk).await.map_err(write_error)?;
        if last_report.elapsed() >= Duration::from_millis(100) {
            last_report = Instant::now();
            if let ControlFlow::Break(()) = report(done, BlobPhase::Transferring) {
                return Err(RegistryError::Cancelled);
            }
        }
    }
    if done != blob.size {
        return Err(size_mismatch(done));
    }
    let actual = finish_sha256(hasher);
    if actual != blob.digest {
        return Err(RegistryError::DigestMismatch {
            what: "blob",
            expected: blob.digest.clone(),
            actual,
            location,
        });
    }
    writer.flush().await.map_err(write_error)?;
    writer.into_inner().sync_all().await.map_err(write_error)?;
    let verified = blobs.join(hex);
    tokio::fs::rename(&partial, &verified)
        .await
        .map_err(|source| RegistryError::Write {
            path: verified,
            source,
        })?;
    // Finished is informational; a cancel now would only throw away verified work.
    let _ = report(blob.size, BlobPhase::Finished);
    Ok(blob.size)
}

/// Checks a fetched document against the digest it must have.
fn verify_document(bytes: &[u8], expected: &str, registry: &str) -> Result<()> {
    let actual = sha256_digest(bytes);
    if actual != expected {
        return Err(RegistryError::DigestMismatch {
            what: "manifest",
            expected: expected.to_string(),
            actual,
            location: format!("registry {registry}"),
        });
    }
    Ok(())
}

/// Pulls `reference` into a new OCI image layout at `dest` (which must not exist).
///
/// An image index is resolved to [`PullOptions::platform`]; the layout holds that platform's
/// manifest, config and layers, named in `index.json` by the reference's tag. Every manifest and
/// blob is verified (digest and size). Must run inside a tokio runtime.
pub async fn pull(
    reference: &str,
    dest: &Path,
    options: &PullOptions,
    progress: &dyn TransferProgress,
) -> Result<PulledImage> {
    let reference = ImageReference::parse(reference)?;
    if dest.symlink_metadata().is_ok() {
        return Err(RegistryError::DestinationExists {
            path: dest.to_path_buf(),
        });
    }
    let client = RegistryClient::new(&reference, &options.registry, Access::Pull)?;
    client.ping().await?;
    let registry = client.registry().to_string();

    let target = reference
        .digest
        .clone()
        .or_else(|| reference.tag.clone())
        .unwrap_or_else(|| "latest".to_string());
    let top = client.get_manifest(&target).await?;
    let top_digest = sha256_digest(&top.bytes);
    // A pinned digest is checked by definition; for a tag, the registry's claim is checked.
    let claimed = reference.digest.clone().or_else(|| {
        top.digest_header
            .clone()
            .filter(|digest| digest.starts_with("sha256:"))
    });
    if let Some(claimed) = claimed {
        verify_document(&top.bytes, &claimed, &registry)?;
    }
    let top_media_type = media_type_of(&top);

    let (manifest_bytes, manifest_descriptor, index_digest, platform) = match DocumentKind::of_media_type(
        &top_media_type,
    ) {
        Some(DocumentKind::Manifest) => {
            let descriptor = RawDescriptor {
                media_type: top_media_type.clone(),
                digest: top_digest.clone(),
                size: top.bytes.len() as u64,
                platform: None,
                annotations: BTreeMap::new(),
            };
            (top.bytes, descriptor, None, None)
        }
        Some(DocumentKind::Index) => {
            let index: RawIndex = parse_json(&top.bytes, || format!("image index of {reference}"))?;
            let chosen = index
                .manifests
                .iter()
                .filter(|entry| {
                    entry.media_type.is_empty()
                        || DocumentKind::of_media_type(&entry.media_type) == Some(DocumentKind::Manifest)
                })
                .find(|entry| {
                    entry
                        .platform
                        .as_ref()
                        .is_some_and(|platform| platform.matches(&options.platform))
                })
                .cloned()
                .ok_or_else(|| RegistryError::NoMatchingPlatform {
                    reference: reference.to_string(),
                    wanted: options.platform.to_string(),
                    available: index
                        .manifests
                        .iter()
                        .filter_map(|entry| {
                            entry
                                .platform
                                .as_ref()
                                .map(|platform| platform.to_platform().to_string())
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            if digest_hex(&chosen.digest).is_none() {
                return Err(RegistryError::InvalidDigest {
                    what: format!("the image index of {reference}"),
                    digest: chosen.digest,
                });
            }
            let fetched = client.get_manifest(&chosen.digest).await?;
            verify_document(&fetched.bytes, &chosen.digest, &registry)?;
            if fetched.bytes.len() as u64 != chosen.size {
                return Err(RegistryError::SizeMismatch {
                    what: "manifest",
                    digest: chosen.digest,
                    expected: chosen.size,
                    actual: fetched.bytes.len() as u64,
                    location: format!("registry {registry}"),
                });
            }
            let mut descriptor = chosen.clone();
            if descriptor.media_type.is_empty() {
                descriptor.media_type = media_type_of(&fetched);
            }
            let platform = chosen.platform.as_ref().map(|platform| platform.to_platform());
            (fetched.bytes, descriptor, Some(top_digest), platform)
        }
        None => {
            return Err(RegistryError::UnsupportedMediaType {
                what: format!("image {reference}"),
                media_type: top_media_type,
                reason: "paddock pulls OCI or Docker schema 2 manifests and indexes (not Docker schema 1)",
            });
        }
    };
    if DocumentKind::of_media_type(&manifest_descriptor.media_type) != Some(DocumentKind::Manifest) {
        return Err(RegistryError::UnsupportedMediaType {
            what: format!("manifest {} of {reference}", manifest_descriptor.digest),
            media_type: manifest_descriptor.media_type,
            reason: "the platform's entry must be an image manifest",
        });
    }
    let manifest: RawManifest = parse_json(&manifest_bytes, || {
        format!("manifest {} of {reference}", manifest_descriptor.digest)
    })?;
    if manifest.schema_version != 2 {
        return Err(RegistryError::UnsupportedMediaType {
            what: format!("manifest {} of {reference}", manifest_descriptor.digest),
            media_type: manifest_descriptor.media_type,
            reason: "only schemaVersion 2 manifests are supported",
        });
    }

    let parent = match dest.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let pending = tempfile::Builder::new()
        .prefix(".paddock-pull-")
        .tempdir_in(&parent)
        .map_err(|source| RegistryError::Write {
            path: parent.clone(),
            source,
        })?;
    let blobs = pending.path().join("blobs").join("sha256");
    tokio::fs::create_dir_all(&blobs)
        .await
        .map_err(|source| RegistryError::Write {
            path: blobs.clone(),
            source,
        })?;

    let mut unique: BTreeMap<&str, &RawDescriptor> = BTreeMap::new();
    for blob in std::iter::once(&manifest.config).chain(&manifest.layers) {
        unique.insert(&blob.digest, blob);
    }
    // Collected first so the stream holds futures, not a closure: a closure over borrowed
    // descriptors makes the pull future's Send bound higher-ranked, which callers cannot prove.
    let downloads: Vec<_> = unique
        .values()
        .map(|blob| download(&client, blob, &blobs, progress))
        .collect();
    let sizes: Vec<u64> = futures_util::stream::iter(downloads)
        .buffer_unordered(options.parallel_downloads.max(1))
        .try_collect()
        .await?;

    let manifest_hex =
        digest_hex(&manifest_descriptor.digest).ok_or_else(|| RegistryError::InvalidDigest {
            what: format!("the manifest of {reference}"),
            digest: manifest_descriptor.digest.clone(),
        })?;
    let write = |path: PathBuf, bytes: &[u8]| {
        std::fs::write(&path, bytes).map_err(|source| RegistryError::Write { path, source })
    };
    write(blobs.join(manifest_hex), &manifest_bytes)?;
    let mut entry = Descriptor {
        media_type: manifest_descriptor.media_type.clone(),
        digest: manifest_descriptor.digest.clone(),
        size: manifest_bytes.len() as u64,
        platform: None,
        annotations: BTreeMap::new(),
    };
    if let Some(tag) = &reference.tag {
        entry
            .annotations
            .insert(ANNOTATION_REF_NAME.to_string(), tag.clone());
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": [&entry],
    });
    let index_bytes = serde_json::to_vec(&index).map_err(|source| RegistryError::Json {
        what: "the layout's index.json".to_string(),
        source,
    })?;
    write(pending.path().join("index.json"), &index_bytes)?;
    write(
        pending.path().join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;

    // Re-check just before the rename: rename(2) would silently replace an empty directory.
    if dest.symlink_metadata().is_ok() {
        return Err(RegistryError::DestinationExists {
            path: dest.to_path_buf(),
        });
    }
    let pending_path = pending.keep();
    if let Err(source) = std::fs::rename(&pending_path, dest) {
        let _ = std::fs::remove_dir_all(&pending_path);
        return Err(RegistryError::Write {
            path: dest.to_path_buf(),
            source,
        });
    }
    entry.annotations.clear();
    Ok(PulledImage {
        layout: dest.to_path_buf(),
        reference: reference.to_string(),
        index_digest,
        platform,
        manifest: Descriptor {
            platform: platform_descriptor(&manifest_descriptor),
            ..entry
        },
        config: manifest.config.to_descriptor(),
        layers: manifest.layers.iter().map(RawDescriptor::to_descriptor).collect(),
        bytes_downloaded: sizes.iter().sum(),
    })
}

fn platform_descriptor(descriptor: &RawDescriptor) -> Option<Platform> {
    descriptor
        .platform
        .as_ref()
        .map(|platform| platform.to_platform())
}
