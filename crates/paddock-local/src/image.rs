//! Disk images: where a VM's disk comes from, the store of base images, and `qemu-img`.
//!
//! Role: turn `spec.image.containerDisk` into a read-only base image in the store, and run the
//! `qemu-img` commands the runtime needs (overlays, offline snapshots, clones).
//!
//! Contract:
//! - `containerDisk` values: `file:<path>` (a qcow2 or raw disk file), `oci:<layout directory>`
//!   or `oci:<layout directory>:<tag>` (an OCI image layout holding a containerDisk, as
//!   `paddock package` writes it), anything else is a registry reference, pulled with
//!   `paddock_oci::registry::pull` (digests verified; credentials from the docker config; plain
//!   http only for loopback registries, as docker does) into a temporary layout and imported from
//!   there. Relative paths are taken from the current directory.
//! - The store keeps each base once, named by the sha256 of the disk's content
//!   (`images/sha256/<hex>`, mode 0444), whatever it came from; an OCI layer already unpacked is
//!   remembered by its digest (`images/layers/sha256/<hex>` holds the disk digest) and not read
//!   again. Imports write a temporary file and rename it, so the store never holds a partial
//!   image.
//! - OCI layers are verified against their digest while they are read; the disk is the first
//!   regular file under `disk/` (`disk/disk.img` in paddock's and KubeVirt's images).
//! - Next to each stored base, `images/sha256/<hex>.json` records where it first came from (the
//!   source as `file:`, `oci:` or a registry reference), its format, virtual size and when it was
//!   imported, written atomically once the import is checked. Bases stored before records existed
//!   have none; [`ImageStore::list`] derives what it can for them (size and time from the file,
//!   format and virtual size from `qemu-img info`), and the runtime adds the source from the VMs
//!   that use them.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use paddock_oci::registry::{NoTransferProgress, PullOptions, RegistryOptions, pull};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Result, RuntimeError};
use crate::state::{create_private_dir, sync_directory};

/// Where a VM's disk comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A local disk file (`file:<path>`).
    File(PathBuf),
    /// A local OCI image layout (`oci:<directory>[:tag]`).
    OciLayout {
        /// The layout directory.
        path: PathBuf,
        /// The tag (`org.opencontainers.image.ref.name`), when the layout holds several images.
        tag: Option<String>,
    },
    /// A registry reference such as `registry.example.com/vms/debian:12`.
    Registry(String),
}

impl ImageSource {
    /// Parses a `containerDisk` value.
    pub fn parse(text: &str) -> Result<ImageSource> {
        let invalid = |reason: &str| RuntimeError::Image {
            source_text: text.to_string(),
            reason: reason.to_string(),
        };
        if let Some(path) = text.strip_prefix("file:") {
            if path.is_empty() {
                return Err(invalid(
                    "file: needs a path, e.g. file:/var/lib/images/debian.qcow2",
                ));
            }
            return Ok(ImageSource::File(absolute(path)?));
        }
        if let Some(rest) = text.strip_prefix("oci:") {
            if rest.is_empty() {
                return Err(invalid(
                    "oci: needs a layout directory, e.g. oci:/tmp/debian-layout:12",
                ));
            }
            // A tag is what follows the last ':' when it holds no '/', unless the whole text
            // names an existing directory (a path may contain ':').
            if !Path::new(rest).is_dir()
                && let Some((path, tag)) = rest.rsplit_once(':')
                && !tag.contains('/')
                && !tag.is_empty()
                && !path.is_empty()
            {
                return Ok(ImageSource::OciLayout {
                    path: absolute(path)?,
                    tag: Some(tag.to_string()),
                });
            }
            return Ok(ImageSource::OciLayout {
                path: absolute(rest)?,
                tag: None,
            });
        }
        Ok(ImageSource::Registry(text.to_string()))
    }

    /// Whether the source is local (`file:` or `oci:`), i.e. not a registry reference.
    pub fn is_local(&self) -> bool {
        !matches!(self, ImageSource::Registry(_))
    }
}

impl std::fmt::Display for ImageSource {
    /// The `containerDisk` value naming this source, with paths made absolute, so it means the
    /// same thing from any directory.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageSource::File(path) => write!(formatter, "file:{}", path.display()),
            ImageSource::OciLayout { path, tag: None } => write!(formatter, "oci:{}", path.display()),
            ImageSource::OciLayout { path, tag: Some(tag) } => {
                write!(formatter, "oci:{}:{tag}", path.display())
            }
            ImageSource::Registry(reference) => formatter.write_str(reference),
        }
    }
}

/// Whether a registry host is on this machine, where docker, skopeo and paddock speak plain http.
pub(crate) fn is_loopback_registry(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|character| character.is_ascii_digit()) => host,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

fn absolute(path: &str) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|source| RuntimeError::io("resolve", path, source))
}

/// A base image in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredImage {
    /// `sha256:<hex>` of the content.
    pub digest: String,
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
    pub virtual_size: u64,
}

/// What the store records about one base image, in `images/sha256/<hex>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImageRecord {
    /// The source it was first imported from, as a `containerDisk` value.
    source: String,
    /// `qcow2` or `raw`.
    format: String,
    /// The disk's virtual size in bytes.
    virtual_size: u64,
    /// When it was imported, in seconds since the Unix epoch.
    imported_at: u64,
}

/// A base image in the store, as [`crate::Runtime::images`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibraryImage {
    /// `sha256:<hex>` of the content.
    pub digest: String,
    /// The stored file (read-only).
    pub path: PathBuf,
    /// The source it was first imported from, as a `containerDisk` value (`file:…`, `oci:…` or a
    /// registry reference); `None` when neither a record nor a VM says.
    pub source: Option<String>,
    /// `qcow2` or `raw`; `None` when unknown (no record and `qemu-img` could not tell).
    pub format: Option<String>,
    /// Bytes the stored file takes.
    pub size: u64,
    /// The disk's virtual size in bytes, when known.
    pub virtual_size: Option<u64>,
    /// When it was imported, in seconds since the Unix epoch (the file's modification time for
    /// bases stored without a record).
    pub imported_at: u64,
    /// Whether the import recorded the source and format (`false`: derived afterwards).
    pub recorded: bool,
    /// The VMs whose disks are overlays on this base.
    pub used_by: Vec<crate::VmId>,
}

/// The base image store under `<state>/images`.
#[derive(Debug, Clone)]
pub(crate) struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    pub(crate) fn new(root: PathBuf) -> ImageStore {
        ImageStore { root }
    }

    fn images_dir(&self) -> PathBuf {
        self.root.join("sha256")
    }

    fn layers_dir(&self) -> PathBuf {
        self.root.join("layers").join("sha256")
    }

    /// Brings the image into the store (once) and returns the stored copy.
    pub(crate) async fn import(
        &self,
        source: &ImageSource,
        text: &str,
        qemu_img: &Path,
    ) -> Result<StoredImage> {
        // A registry image is pulled into a layout in the store's directory first (async), then
        // imported like any local layout; the layout is removed afterwards.
        let origin = source.to_string();
        let pulled = match source {
            ImageSource::Registry(reference) => Some(self.pull(reference).await?),
            _ => None,
        };
        let source = match &pulled {
            Some(layout) => ImageSource::OciLayout {
                path: layout.path().join("layout"),
                tag: None,
            },
            None => source.clone(),
        };
        let store = self.clone();
        let text = text.to_string();
        let (digest, path) = tokio::task::spawn_blocking(move || store.import_blocking(&source, &text))
            .await
            .map_err(|error| RuntimeError::Image {
                source_text: String::new(),
                reason: format!("the import task failed: {error}"),
            })??;
        let info = image_info(qemu_img, &path).await?;
        if let Some(backing) = info.backing_filename {
            return Err(RuntimeError::Image {
                source_text: path.display().to_string(),
                reason: format!(
                    "the disk has a backing file ({backing}); flatten it first with qemu-img convert -O qcow2"
                ),
            });
        }
        if info.format != "qcow2" && info.format != "raw" {
            return Err(RuntimeError::Image {
                source_text: path.display().to_string(),
                reason: format!(
                    "the disk is {}, not qcow2 or raw; convert it with qemu-img convert -O qcow2",
                    info.format
                ),
            });
        }
        self.remember(&digest, origin, &info)?;
        Ok(StoredImage {
            digest,
            path,
            format: info.format,
            virtual_size: info.virtual_size,
        })
    }

    /// Records where the base `digest` came from, unless an earlier import already did: the
    /// first source is the one people recognise, and a record is never half written.
    fn remember(&self, digest: &str, source: String, info: &ImageInfo) -> Result<()> {
        let Ok(hex) = digest_hex(digest) else {
            return Ok(());
        };
        let record_path = self.images_dir().join(format!("{hex}.json"));
        // Booting a stored copy by its path (what the library offers for a base without a
        // record) says nothing about where the disk came from.
        let stored = format!("file:{}", self.images_dir().join(hex).display());
        if source == stored || read_json::<ImageRecord>(&record_path).is_ok() {
            return Ok(());
        }
        let record = ImageRecord {
            source,
            format: info.format.clone(),
            virtual_size: info.virtual_size,
            imported_at: crate::state::now_seconds(),
        };
        let bytes = serde_json::to_vec_pretty(&record).map_err(|error| RuntimeError::Image {
            source_text: record.source.clone(),
            reason: format!("cannot encode the image record: {error}"),
        })?;
        crate::state::write_atomically(&record_path, &bytes)
    }

    /// Every base in the store with what its record says, newest import first. Bases without a
    /// record get their format and virtual size from `qemu_img info` when `qemu_img` is given;
    /// `used_by` is left empty (the runtime knows the VMs).
    pub(crate) async fn list(&self, qemu_img: Option<&Path>) -> Result<Vec<LibraryImage>> {
        let directory = self.images_dir();
        let entries = match std::fs::read_dir(&directory) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(RuntimeError::io("list", &directory, source)),
        };
        let mut images = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| RuntimeError::io("list", &directory, source))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Only finished imports: temporary files start with '.', records end in .json.
            if name.len() != 64 || !name.bytes().all(|byte| byte.is_ascii_hexdigit()) {
                continue;
            }
            let path = entry.path();
            let Ok(metadata) = entry.metadata() else {
                // Removed while listing.
                continue;
            };
            if !metadata.is_file() {
                continue;
            }
            let modified = metadata
                .modified()
                .ok()
                .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |elapsed| elapsed.as_secs());
            let record = read_json::<ImageRecord>(&directory.join(format!("{name}.json"))).ok();
            let mut image = LibraryImage {
                digest: format!("sha256:{name}"),
                path,
                source: record.as_ref().map(|record| record.source.clone()),
                format: record.as_ref().map(|record| record.format.clone()),
                size: metadata.len(),
                virtual_size: record.as_ref().map(|record| record.virtual_size),
                imported_at: record.as_ref().map_or(modified, |record| record.imported_at),
                recorded: record.is_some(),
                used_by: Vec::new(),
            };
            if !image.recorded
                && let Some(qemu_img) = qemu_img
            {
                match image_info(qemu_img, &image.path).await {
                    Ok(info) => {
                        image.format = Some(info.format);
                        image.virtual_size = Some(info.virtual_size);
                    }
                    Err(error) => {
                        tracing::warn!(image = %image.path.display(), %error, "cannot inspect a stored base image");
                    }
                }
            }
            images.push(image);
        }
        images.sort_by(|left, right| {
            right
                .imported_at
                .cmp(&left.imported_at)
                .then_with(|| left.digest.cmp(&right.digest))
        });
        Ok(images)
    }

    /// Pulls `reference` (linux/amd64) into `<store>/pulls/<temporary>/layout`.
    async fn pull(&self, reference: &str) -> Result<tempfile::TempDir> {
        let failed = |reason: String| RuntimeError::Image {
            source_text: reference.to_string(),
            reason,
        };
        let parsed = paddock_api::image_reference::ImageReference::parse(reference)
            .map_err(|error| failed(error.to_string()))?;
        let pulls = self.root.join("pulls");
        create_private_dir(&pulls)?;
        let directory = tempfile::Builder::new()
            .prefix(".pull-")
            .tempdir_in(&pulls)
            .map_err(|source| RuntimeError::io("create", &pulls, source))?;
        let options = PullOptions {
            registry: RegistryOptions {
                insecure: is_loopback_registry(&parsed.registry),
                ..RegistryOptions::default()
            },
            ..PullOptions::default()
        };
        tracing::info!(%reference, "pulling the containerDisk image");
        pull(
            reference,
            &directory.path().join("layout"),
            &options,
            &NoTransferProgress,
        )
        .await
        .map_err(|error| failed(format!("cannot pull it: {error}")))?;
        Ok(directory)
    }

    fn import_blocking(&self, source: &ImageSource, text: &str) -> Result<(String, PathBuf)> {
        create_private_dir(&self.images_dir())?;
        match source {
            ImageSource::File(path) => {
                let file = File::open(path).map_err(|error| RuntimeError::Image {
                    source_text: text.to_string(),
                    reason: format!("cannot open {}: {error}", path.display()),
                })?;
                if !file.metadata().is_ok_and(|metadata| metadata.is_file()) {
                    return Err(RuntimeError::Image {
                        source_text: text.to_string(),
                        reason: format!("{} is not a regular file", path.display()),
                    });
                }
                self.store_stream(BufReader::new(file), path)
            }
            ImageSource::OciLayout { path, tag } => self.import_layout(path, tag.as_deref(), text),
            // `import` pulls registry images into a layout before it gets here.
            ImageSource::Registry(reference) => Err(RuntimeError::Image {
                source_text: text.to_string(),
                reason: format!("internal error: {reference} reached the blocking import unpulled"),
            }),
        }
    }

    /// Copies `reader` into the store, hashing on the way; returns the digest and stored path.
    fn store_stream(&self, mut reader: impl Read, origin: &Path) -> Result<(String, PathBuf)> {
        let directory = self.images_dir();
        let temporary = directory.join(format!(".import-{}-{}", std::process::id(), random_hex(6)));
        let result = (|| {
            let mut output =
                File::create(&temporary).map_err(|source| RuntimeError::io("create", &temporary, source))?;
            let mut hasher = Sha256::new();
            let mut buffer = vec![0_u8; 1 << 20];
            loop {
                let read = reader
                    .read(&mut buffer)
                    .map_err(|source| RuntimeError::io("read", origin, source))?;
                if read == 0 {
                    break;
                }
                hasher.update(&buffer[..read]);
                output
                    .write_all(&buffer[..read])
                    .map_err(|source| RuntimeError::io("write", &temporary, source))?;
            }
            output
                .sync_all()
                .map_err(|source| RuntimeError::io("sync", &temporary, source))?;
            let hex = hex(&hasher.finalize());
            let stored = directory.join(&hex);
            if stored.is_file() {
                // Same content already stored: keep the existing copy, which VMs may use.
                let _ = std::fs::remove_file(&temporary);
            } else {
                set_read_only(&temporary)?;
                std::fs::rename(&temporary, &stored)
                    .map_err(|source| RuntimeError::io("rename into place", &stored, source))?;
                sync_directory(&directory)?;
            }
            Ok((format!("sha256:{hex}"), stored))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        result
    }

    fn import_layout(&self, layout: &Path, tag: Option<&str>, text: &str) -> Result<(String, PathBuf)> {
        let invalid = |reason: String| RuntimeError::Image {
            source_text: text.to_string(),
            reason,
        };
        let index_path = layout.join("index.json");
        let index: OciIndex = read_json(&index_path).map_err(|reason| {
            invalid(format!(
                "{reason}; oci: must name an OCI image layout directory (with index.json)"
            ))
        })?;
        let manifest_descriptor = select_manifest(&index, tag).map_err(&invalid)?;
        if manifest_descriptor
            .media_type
            .as_deref()
            .is_some_and(|media_type| {
                media_type.contains("image.index") || media_type.contains("manifest.list")
            })
        {
            return Err(invalid(
                "the selected entry is an image index (multi-platform image); save a single-platform image"
                    .to_string(),
            ));
        }
        let manifest_path = blob_path(layout, &manifest_descriptor.digest).map_err(&invalid)?;
        let manifest_bytes = std::fs::read(&manifest_path)
            .map_err(|error| invalid(format!("cannot read the manifest: {error}")))?;
        verify_digest(&manifest_bytes, &manifest_descriptor.digest).map_err(&invalid)?;
        let manifest: OciManifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|error| invalid(format!("the manifest is not valid JSON: {error}")))?;
        if manifest.layers.is_empty() {
            return Err(invalid("the image has no layers, so no disk".to_string()));
        }
        // Later layers win, as in a container filesystem.
        for layer in manifest.layers.iter().rev() {
            let layer_hex = digest_hex(&layer.digest).map_err(&invalid)?;
            let remembered = self.layers_dir().join(layer_hex);
            if let Ok(disk_digest) = std::fs::read_to_string(&remembered) {
                let disk_digest = disk_digest.trim().to_string();
                if let Ok(disk_hex) = digest_hex(&disk_digest) {
                    let stored = self.images_dir().join(disk_hex);
                    if stored.is_file() {
                        return Ok((disk_digest, stored));
                    }
                }
            }
            if let Some((disk_digest, stored)) =
                self.import_layer(layout, layer).map_err(|error| match error {
                    RuntimeError::Image { reason, .. } => invalid(reason),
                    other => other,
                })?
            {
                create_private_dir(&self.layers_dir())?;
                crate::state::write_atomically(&remembered, disk_digest.as_bytes())?;
                return Ok((disk_digest, stored));
            }
        }
        Err(invalid(
            "no layer holds a disk: a containerDisk image needs a file under disk/ (disk/disk.img)"
                .to_string(),
        ))
    }

    /// Extracts the disk from one layer; `None` when the layer holds no disk.
    fn import_layer(&self, layout: &Path, layer: &OciDescriptor) -> Result<Option<(String, PathBuf)>> {
        let image_error = |reason: String| RuntimeError::Image {
            source_text: String::new(),
            reason,
        };
        let path = blob_path(layout, &layer.digest).map_err(image_error)?;
        let file = File::open(&path)
            .map_err(|error| image_error(format!("cannot open layer {}: {error}", path.display())))?;
        let mut hashing = HashingReader {
            inner: BufReader::new(file),
            hasher: Sha256::new(),
        };
        let media_type = layer.media_type.as_deref().unwrap_or("");
        let found = {
            let decompressed: Box<dyn Read + '_> =
                if media_type.ends_with("+zstd") || media_type.ends_with(".zstd") {
                    Box::new(
                        zstd::stream::read::Decoder::new(&mut hashing)
                            .map_err(|error| image_error(format!("cannot start zstd decoding: {error}")))?,
                    )
                } else if media_type.ends_with("gzip") {
                    Box::new(flate2::read::GzDecoder::new(&mut hashing))
                } else if media_type.ends_with(".tar") || media_type.is_empty() {
                    Box::new(&mut hashing)
                } else {
                    return Err(image_error(format!("unsupported layer media type {media_type}")));
                };
            let mut archive = tar::Archive::new(decompressed);
            let entries = archive
                .entries()
                .map_err(|error| image_error(format!("layer {} is not a tar: {error}", layer.digest)))?;
            let mut found = None;
            for entry in entries {
                let entry = entry
                    .map_err(|error| image_error(format!("layer {} is corrupt: {error}", layer.digest)))?;
                let entry_path = entry
                    .path()
                    .map_err(|error| image_error(format!("layer {} has a bad path: {error}", layer.digest)))?
                    .into_owned();
                let entry_path = entry_path.strip_prefix("./").unwrap_or(&entry_path).to_path_buf();
                let in_disk_dir = entry_path.parent() == Some(Path::new("disk"));
                if in_disk_dir && entry.header().entry_type().is_file() {
                    found = Some(self.store_stream(entry, &path)?);
                    break;
                }
            }
            found
        };
        // Read to the end so the digest covers the whole blob, then check it.
        std::io::copy(&mut hashing, &mut std::io::sink())
            .map_err(|error| image_error(format!("cannot read layer {}: {error}", path.display())))?;
        let actual = format!("sha256:{}", hex(&hashing.hasher.finalize()));
        if actual != layer.digest {
            return Err(image_error(format!(
                "layer {} is corrupt: its content hashes to {actual}",
                layer.digest
            )));
        }
        Ok(found)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciDescriptor {
    #[serde(default)]
    media_type: Option<String>,
    digest: String,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct OciIndex {
    #[serde(default)]
    manifests: Vec<OciDescriptor>,
}

#[derive(Deserialize)]
struct OciManifest {
    #[serde(default)]
    layers: Vec<OciDescriptor>,
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn select_manifest<'index>(
    index: &'index OciIndex,
    tag: Option<&str>,
) -> std::result::Result<&'index OciDescriptor, String> {
    let tags = || {
        index
            .manifests
            .iter()
            .filter_map(|manifest| manifest.annotations.get(REF_NAME).cloned())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match tag {
        Some(tag) => index
            .manifests
            .iter()
            .find(|manifest| manifest.annotations.get(REF_NAME).map(String::as_str) == Some(tag))
            .ok_or_else(|| format!("the layout has no image tagged {tag:?} (tags: {})", tags())),
        None => match index.manifests.as_slice() {
            [only] => Ok(only),
            [] => Err("the layout's index.json lists no image".to_string()),
            _ => Err(format!(
                "the layout holds several images; add :<tag> to choose one (tags: {})",
                tags()
            )),
        },
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> std::result::Result<T, String> {
    let bytes = std::fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|error| format!("{} is not valid: {error}", path.display()))
}

fn digest_hex(digest: &str) -> std::result::Result<&str, String> {
    digest
        .strip_prefix("sha256:")
        .filter(|hex| hex.len() == 64 && hex.bytes().all(|byte| byte.is_ascii_hexdigit()))
        .ok_or_else(|| format!("unsupported digest {digest:?}; only sha256 is supported"))
}

fn blob_path(layout: &Path, digest: &str) -> std::result::Result<PathBuf, String> {
    Ok(layout.join("blobs").join("sha256").join(digest_hex(digest)?))
}

fn verify_digest(bytes: &[u8], digest: &str) -> std::result::Result<(), String> {
    let actual = format!("sha256:{}", hex(&Sha256::digest(bytes)));
    if actual == digest {
        Ok(())
    } else {
        Err(format!(
            "blob {digest} is corrupt: its content hashes to {actual}"
        ))
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(buffer)?;
        self.hasher.update(&buffer[..read]);
        Ok(read)
    }
}

fn set_read_only(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
        .map_err(|source| RuntimeError::io("make read-only", path, source))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// `count` random bytes as hex, from the kernel's random source.
pub(crate) fn random_hex(count: usize) -> String {
    let mut bytes = vec![0_u8; count];
    let filled = File::open("/dev/urandom").and_then(|mut random| random.read_exact(&mut bytes));
    if filled.is_err() {
        // Uniqueness, not secrecy, is what callers need; time and pid give that well enough.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or(0);
        let seed = Sha256::digest(format!("{nanos}-{}", std::process::id()));
        for (byte, seeded) in bytes.iter_mut().zip(seed.iter().cycle()) {
            *byte = *seeded;
        }
    }
    hex(&bytes)
}

/// What `qemu-img info` says about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageInfo {
    pub format: String,
    pub virtual_size: u64,
    pub backing_filename: Option<String>,
}

#[derive(Deserialize)]
struct QemuImgInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename", default)]
    backing_filename: Option<String>,
}

pub(crate) async fn image_info(qemu_img: &Path, image: &Path) -> Result<ImageInfo> {
    let output = run_tool(
        qemu_img,
        &[
            "info".into(),
            "-U".into(),
            "--output=json".into(),
            image.as_os_str().to_owned(),
        ],
    )
    .await?;
    let info: QemuImgInfo = serde_json::from_str(&output).map_err(|error| RuntimeError::Tool {
        tool: qemu_img.display().to_string(),
        arguments: format!("info --output=json {}", image.display()),
        status: "unexpected output".to_string(),
        stderr: format!("{error}: {output}"),
    })?;
    Ok(ImageInfo {
        format: info.format,
        virtual_size: info.virtual_size,
        backing_filename: info.backing_filename,
    })
}

/// Creates a qcow2 overlay backed by `base`, `size` bytes large (the base's size when `None`).
pub(crate) async fn create_overlay(
    qemu_img: &Path,
    base: &Path,
    base_format: &str,
    overlay: &Path,
    size: Option<u64>,
) -> Result<()> {
    let mut arguments: Vec<std::ffi::OsString> = vec![
        "create".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-F".into(),
        base_format.into(),
        "-b".into(),
        base.as_os_str().to_owned(),
        overlay.as_os_str().to_owned(),
    ];
    if let Some(size) = size {
        arguments.push(size.to_string().into());
    }
    run_tool(qemu_img, &arguments).await.map(drop)
}

/// Runs an offline `qemu-img snapshot` operation (`-c`, `-a` or `-d`) on a stopped VM's overlay.
pub(crate) async fn offline_snapshot(qemu_img: &Path, flag: &str, name: &str, overlay: &Path) -> Result<()> {
    run_tool(
        qemu_img,
        &[
            "snapshot".into(),
            flag.into(),
            name.into(),
            overlay.as_os_str().to_owned(),
        ],
    )
    .await
    .map(drop)
}

/// Copies the top layer of `source` (a qcow2 overlay) into a new qcow2 `target` backed by the same
/// base, without the internal snapshots.
pub(crate) async fn copy_overlay(
    qemu_img: &Path,
    source: &Path,
    base: &Path,
    base_format: &str,
    target: &Path,
) -> Result<()> {
    run_tool(
        qemu_img,
        &[
            "convert".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            "-O".into(),
            "qcow2".into(),
            "-B".into(),
            base.as_os_str().to_owned(),
            "-F".into(),
            base_format.into(),
            source.as_os_str().to_owned(),
            target.as_os_str().to_owned(),
        ],
    )
    .await
    .map(drop)
}

/// Runs a tool to completion and returns its stdout; a failure carries its stderr.
pub(crate) async fn run_tool(program: &Path, arguments: &[std::ffi::OsString]) -> Result<String> {
    let output = tokio::process::Command::new(program)
        .args(arguments)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| RuntimeError::io("run", program, source))?;
    if !output.status.success() {
        return Err(RuntimeError::Tool {
            tool: program.display().to_string(),
            arguments: arguments
                .iter()
                .map(|argument| argument.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" "),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!(
            ImageSource::parse("file:/images/debian.qcow2").unwrap(),
            ImageSource::File(PathBuf::from("/images/debian.qcow2"))
        );
        assert_eq!(
            ImageSource::parse("oci:/layouts/debian:12").unwrap(),
            ImageSource::OciLayout {
                path: PathBuf::from("/layouts/debian"),
                tag: Some("12".to_string())
            }
        );
        assert_eq!(
            ImageSource::parse("oci:/layouts/debian").unwrap(),
            ImageSource::OciLayout {
                path: PathBuf::from("/layouts/debian"),
                tag: None
            }
        );
        assert_eq!(
            ImageSource::parse("quay.io/containerdisks/debian:12").unwrap(),
            ImageSource::Registry("quay.io/containerdisks/debian:12".to_string())
        );
        assert!(ImageSource::parse("file:").is_err());
        let relative = ImageSource::parse("file:disk.img").unwrap();
        assert!(matches!(relative, ImageSource::File(path) if path.is_absolute()));
    }

    #[test]
    fn loopback_registries_speak_plain_http() {
        for host in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "[::1]:5000",
            "127.3.4.5",
        ] {
            assert!(is_loopback_registry(host), "{host}");
        }
        for host in [
            "registry.example.com",
            "10.0.0.1:5000",
            "docker.io",
            "localhost.example.com",
        ] {
            assert!(!is_loopback_registry(host), "{host}");
        }
    }

    #[test]
    fn manifest_selection_by_tag() {
        let index: OciIndex = serde_json::from_str(
            r#"{"manifests":[
              {"digest":"sha256:aa","annotations":{"org.opencontainers.image.ref.name":"1"}},
              {"digest":"sha256:bb","annotations":{"org.opencontainers.image.ref.name":"2"}}]}"#,
        )
        .unwrap();
        assert_eq!(select_manifest(&index, Some("2")).unwrap().digest, "sha256:bb");
        let error = select_manifest(&index, None).err().unwrap();
        assert!(error.contains("tags: 1, 2"), "{error}");
        assert!(select_manifest(&index, Some("3")).is_err());
    }
}
