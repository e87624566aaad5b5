//! The containerDisk image builder: disk file -> one-layer OCI image in an image layout directory.
//!
//! Contract: see the crate docs. The disk is read exactly once; a plain sequential read is used, so
//! sparse (holey) raw files are read at full size and their holes are hashed and compressed as
//! zeros (correct, just not as fast as a SEEK_DATA/SEEK_HOLE aware reader would be).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::{
    ANNOTATION_CONTAINERD_IMAGE_NAME, ANNOTATION_REF_NAME, CONTAINERDISK_UID_GID, ENV_DEFAULT_INSTANCETYPE,
    ENV_DEFAULT_PREFERENCE, Error, LABEL_SOURCE_DIGEST, MEDIA_TYPE_CONFIG, MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST, Result,
};

/// Layer compression.
///
/// gzip is deflated in 1 MiB chunks on every core, pigz-style ([`crate::parallel_gzip`], on
/// `flate2`'s zlib-rs backend): the most widely accepted layer format, the fallback for runtimes
/// without zstd. zstd uses libzstd's multithreaded mode (`zstdmt`), always with at least one worker.
/// Both give the same bytes whatever the thread count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Uncompressed tar (`application/vnd.oci.image.layer.v1.tar`).
    None,
    /// gzip (`application/vnd.oci.image.layer.v1.tar+gzip`).
    Gzip,
    /// zstd (`application/vnd.oci.image.layer.v1.tar+zstd`).
    Zstd,
}

impl Compression {
    /// The OCI layer media type for this compression.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// An OCI platform: `os/architecture[/variant]` with Go's names (`linux/amd64`, `linux/arm64/v8`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Platform {
    /// Operating system; containerDisks are always `linux` (the launcher's OS, not the guest's).
    pub os: String,
    /// CPU architecture the disk boots on (`amd64`, `arm64`, `s390x`, ...).
    pub architecture: String,
    /// Architecture variant (`v8` for arm64), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        Self {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl Platform {
    /// The architectures KubeVirt runs VMs on (Go names).
    pub const KUBEVIRT_ARCHITECTURES: [&'static str; 3] = ["amd64", "arm64", "s390x"];

    /// Parses `os/architecture[/variant]`, e.g. `linux/arm64`.
    pub fn parse(text: &str) -> Result<Platform> {
        let bad = |reason: String| Error::InvalidPlatform {
            platform: text.to_string(),
            reason,
        };
        let parts: Vec<&str> = text.split('/').collect();
        let (os, architecture, variant) = match parts.as_slice() {
            [os, architecture] => (*os, *architecture, None),
            [os, architecture, variant] => (*os, *architecture, Some(*variant)),
            _ => return Err(bad("expected os/architecture or os/architecture/variant".into())),
        };
        if os != "linux" {
            return Err(bad(format!(
                "the os of a containerDisk image is always linux (the virt-launcher's), not {os:?}"
            )));
        }
        if !Self::KUBEVIRT_ARCHITECTURES.contains(&architecture) {
            return Err(bad(format!(
                "KubeVirt runs VMs on {}, not {architecture:?}",
                Self::KUBEVIRT_ARCHITECTURES.join(", ")
            )));
        }
        if variant.is_some_and(str::is_empty) {
            return Err(bad("the variant after the last '/' is empty".into()));
        }
        Ok(Platform {
            os: os.to_string(),
            architecture: architecture.to_string(),
            variant: variant.map(str::to_string),
        })
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(formatter, "/{variant}")?;
        }
        Ok(())
    }
}

/// Options for [`build_layout`].
#[derive(Debug, Clone)]
pub struct ImageOptions {
    /// Tag recorded as `org.opencontainers.image.ref.name` in `index.json` when no
    /// [`reference`](Self::reference) is given.
    pub tag: String,
    /// The full image reference (`registry/repository:tag`). When set, `index.json` names the image
    /// by it in `org.opencontainers.image.ref.name` and `io.containerd.image.name`, which is what
    /// Zarf `imageArchives`, podman and containerd read from an OCI archive; skopeo's
    /// `oci:DIR:REFERENCE` finds it too.
    pub reference: Option<String>,
    /// The platform of a single-platform image (`linux/amd64` by default); see
    /// [`build_index_layout`] for several.
    pub platform: Platform,
    /// Layer compression.
    pub compression: Compression,
    /// mtime of the tar entries (seconds since the epoch); 0 by default, a SOURCE_DATE_EPOCH-style
    /// input keeps builds reproducible.
    pub mtime: u64,
    /// Value for `INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE`, if any.
    pub default_instancetype: Option<String>,
    /// Value for `INSTANCETYPE_KUBEVIRT_IO_DEFAULT_PREFERENCE`, if any.
    pub default_preference: Option<String>,
    /// gzip level (0-9).
    pub gzip_level: u32,
    /// zstd level (1-19 sensible).
    pub zstd_level: i32,
    /// Compression threads (gzip and zstd); 0 means the number of available CPUs.
    pub compression_threads: u32,
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self {
            tag: "latest".into(),
            reference: None,
            platform: Platform::default(),
            compression: Compression::Zstd,
            mtime: 0,
            default_instancetype: None,
            default_preference: None,
            gzip_level: 6,
            zstd_level: 3,
            compression_threads: 0,
        }
    }
}

/// Progress reporting: called with the number of disk bytes just processed.
pub trait Progress {
    /// `bytes` more of the disk have been read and pushed through the layer pipeline.
    fn advance(&mut self, bytes: u64);
}

impl<F: FnMut(u64)> Progress for F {
    fn advance(&mut self, bytes: u64) {
        self(bytes)
    }
}

/// A [`Progress`] that reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn advance(&mut self, _bytes: u64) {}
}

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced blob.
    pub media_type: String,
    /// `sha256:<hex>` digest of the blob.
    pub digest: String,
    /// Size of the blob in bytes.
    pub size: u64,
    /// The platform of a manifest listed in an image index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations (only used for the index entry).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// What [`build_layout`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    /// The layout directory.
    pub layout: PathBuf,
    /// The tag in `index.json`.
    pub tag: String,
    /// The platform the disk boots on.
    pub platform: Platform,
    /// The manifest descriptor (its digest is the image digest).
    pub manifest: Descriptor,
    /// The config descriptor.
    pub config: Descriptor,
    /// The layer descriptor.
    pub layer: Descriptor,
    /// sha256 of the uncompressed layer tar.
    pub diff_id: String,
    /// sha256 of the input disk file.
    pub source_digest: String,
    /// Size of the input disk file.
    pub source_size: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Manifest<'a> {
    schema_version: u32,
    media_type: &'a str,
    config: &'a Descriptor,
    layers: [&'a Descriptor; 1],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Index<'a> {
    schema_version: u32,
    media_type: &'a str,
    manifests: Vec<&'a Descriptor>,
}

#[derive(Serialize)]
struct ImageConfig<'a> {
    architecture: &'a str,
    os: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'a str>,
    config: RunConfig,
    rootfs: RootFs,
}

#[derive(Serialize)]
struct RunConfig {
    #[serde(rename = "Env", skip_serializing_if = "Vec::is_empty")]
    env: Vec<String>,
    #[serde(rename = "Labels")]
    labels: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<String>,
}

fn hex_digest(h: Sha256) -> String {
    let out = h.finalize();
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in out {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Checks a tag against the OCI distribution tag grammar `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
fn check_tag(tag: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidTag {
            tag: tag.to_string(),
            reason,
        })
    };
    let mut chars = tag.chars();
    match chars.next() {
        None => return bad("it is empty"),
        Some(c) if !(c.is_ascii_alphanumeric() || c == '_') => {
            return bad("it must start with a letter, digit or '_'");
        }
        _ => {}
    }
    if tag.len() > 128 {
        return bad("it is longer than 128 characters");
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return bad("it contains a character outside [A-Za-z0-9._-]");
    }
    Ok(())
}

/// A writer that hashes (when `hasher` is set) and counts everything written through it.
struct HashWriter<W> {
    inner: W,
    hasher: Option<Sha256>,
    count: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes what it reads from the disk and reports progress.
struct SourceReader<'p, R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    progress: &'p mut dyn Progress,
}

impl<R: Read> Read for SourceReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        self.progress.advance(n as u64);
        Ok(n)
    }
}

/// The compressor stage between the tar (diffID) hasher and the blob (digest) hasher.
enum Compressor<W: Write> {
    None(W),
    Gzip(crate::parallel_gzip::ParallelGzipEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Compressor<W> {
    fn new(inner: W, opts: &ImageOptions) -> io::Result<Self> {
        let threads = match opts.compression_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            n => n,
        };
        Ok(match opts.compression {
            Compression::None => Compressor::None(inner),
            Compression::Gzip => Compressor::Gzip(crate::parallel_gzip::ParallelGzipEncoder::new(
                inner,
                opts.gzip_level,
                threads as usize,
            )),
            Compression::Zstd => {
                let mut enc = zstd::stream::write::Encoder::new(inner, opts.zstd_level)?;
                // Always >= 1 worker: libzstd's output differs between 0 workers (single-threaded
                // API) and >= 1, but not between different worker counts.
                enc.multithread(threads.max(1))?;
                Compressor::Zstd(enc)
            }
        })
    }

    fn finish(self) -> io::Result<W> {
        match self {
            Compressor::None(w) => Ok(w),
            Compressor::Gzip(e) => e.finish(),
            Compressor::Zstd(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::None(w) => w.write(buf),
            Compressor::Gzip(w) => w.write(buf),
            Compressor::Zstd(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::None(w) => w.flush(),
            Compressor::Gzip(w) => w.flush(),
            Compressor::Zstd(w) => w.flush(),
        }
    }
}

fn header(path: &str, kind: tar::EntryType, mode: u32, size: u64, mtime: u64) -> io::Result<tar::Header> {
    // GNU headers: sizes above ustar's 8 GiB limit are encoded in base-256, which Go's archive/tar
    // (containers/image, containerd, go-containerregistry) reads. No uname/gname are set.
    let mut h = tar::Header::new_gnu();
    h.set_path(path)?;
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(CONTAINERDISK_UID_GID);
    h.set_gid(CONTAINERDISK_UID_GID);
    h.set_size(size);
    h.set_mtime(mtime);
    h.set_cksum();
    Ok(h)
}

/// Streams the layer into `blob_path`; returns (layer descriptor, diffID, source digest, source size).
fn write_layer(
    disk: &Path,
    blob_path: &Path,
    opts: &ImageOptions,
    progress: &mut dyn Progress,
) -> Result<(Descriptor, String, String, u64)> {
    let read_err = |source| Error::ReadDisk {
        path: disk.to_path_buf(),
        source,
    };
    let layer_err = |source| Error::Layer {
        path: disk.to_path_buf(),
        source,
    };
    let file = File::open(disk).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(Error::NotAFile {
            path: disk.to_path_buf(),
        });
    }
    let size = meta.len();
    let out = File::create(blob_path).map_err(|source| Error::Write {
        path: blob_path.to_path_buf(),
        source,
    })?;
    // Uncompressed, the blob is the tar, so its digest is the diffID: skip one of three hashes
    // (hashing is the bottleneck of that mode).
    let blob = HashWriter {
        inner: BufWriter::with_capacity(1 << 20, out),
        hasher: (opts.compression != Compression::None).then(Sha256::new),
        count: 0,
    };
    let compressor = Compressor::new(blob, opts).map_err(layer_err)?;
    let tar_stream = HashWriter {
        inner: compressor,
        hasher: Some(Sha256::new()),
        count: 0,
    };
    let mut builder = tar::Builder::new(tar_stream);
    let dir = header("disk/", tar::EntryType::Directory, 0o555, 0, opts.mtime).map_err(layer_err)?;
    builder.append(&dir, io::empty()).map_err(layer_err)?;
    let img = header("disk/disk.img", tar::EntryType::Regular, 0o444, size, opts.mtime).map_err(layer_err)?;
    let mut source = SourceReader {
        inner: io::BufReader::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        count: 0,
        progress,
    };
    // The tar builder copies exactly `size` bytes; a disk that changes size while we read it
    // makes this fail instead of producing a corrupt layer.
    builder.append(&img, &mut source).map_err(layer_err)?;
    if source.count != size {
        return Err(layer_err(io::Error::other(format!(
            "disk changed size while reading (expected {size} bytes, read {})",
            source.count
        ))));
    }
    let source_digest = hex_digest(source.hasher);
    let tar_stream = builder.into_inner().map_err(layer_err)?;
    let diff_id = tar_stream.hasher.map(hex_digest).unwrap_or_default();
    let blob = tar_stream.inner.finish().map_err(layer_err)?;
    let HashWriter { inner, hasher, count } = blob;
    let file = inner.into_inner().map_err(|e| Error::Write {
        path: blob_path.to_path_buf(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(|source| Error::Write {
        path: blob_path.to_path_buf(),
        source,
    })?;
    Ok((
        Descriptor {
            media_type: opts.compression.media_type().to_string(),
            digest: hasher.map_or_else(|| diff_id.clone(), hex_digest),
            size: count,
            platform: None,
            annotations: BTreeMap::new(),
        },
        diff_id,
        source_digest,
        size,
    ))
}

fn blob_file(blobs: &Path, digest: &str) -> PathBuf {
    blobs.join(digest.trim_start_matches("sha256:"))
}

fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    fs::write(path, data).map_err(|source| Error::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a small JSON blob into `blobs` and returns its descriptor.
fn write_json_blob(blobs: &Path, media_type: &str, data: &[u8]) -> Result<Descriptor> {
    let mut h = Sha256::new();
    h.update(data);
    let digest = hex_digest(h);
    write_file(&blob_file(blobs, &digest), data)?;
    Ok(Descriptor {
        media_type: media_type.to_string(),
        digest,
        size: data.len() as u64,
        platform: None,
        annotations: BTreeMap::new(),
    })
}

/// The blobs of one platform's image, written into a layout's `blobs/sha256`.
struct ImageBlobs {
    manifest: Descriptor,
    config: Descriptor,
    layer: Descriptor,
    diff_id: String,
    source_digest: String,
    source_size: u64,
}

/// Streams `disk` into a layer blob and writes the config and manifest blobs next to it.
fn write_image_blobs(
    disk: &Path,
    blobs: &Path,
    platform: &Platform,
    opts: &ImageOptions,
    progress: &mut dyn Progress,
) -> Result<ImageBlobs> {
    let layer_tmp = blobs.join(".layer.partial");
    let (layer, diff_id, source_digest, source_size) = write_layer(disk, &layer_tmp, opts, progress)?;
    let layer_path = blob_file(blobs, &layer.digest);
    fs::rename(&layer_tmp, &layer_path).map_err(|source| Error::Write {
        path: layer_path.clone(),
        source,
    })?;

    let mut env = Vec::new();
    if let Some(instancetype) = &opts.default_instancetype {
        env.push(format!("{ENV_DEFAULT_INSTANCETYPE}={instancetype}"));
    }
    if let Some(preference) = &opts.default_preference {
        env.push(format!("{ENV_DEFAULT_PREFERENCE}={preference}"));
    }
    let config = ImageConfig {
        architecture: &platform.architecture,
        os: &platform.os,
        variant: platform.variant.as_deref(),
        config: RunConfig {
            env,
            labels: BTreeMap::from([(LABEL_SOURCE_DIGEST.to_string(), source_digest.clone())]),
        },
        rootfs: RootFs {
            kind: "layers",
            diff_ids: vec![diff_id.clone()],
        },
    };
    let config_descriptor = write_json_blob(blobs, MEDIA_TYPE_CONFIG, &serde_json::to_vec(&config)?)?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: MEDIA_TYPE_MANIFEST,
        config: &config_descriptor,
        layers: [&layer],
    };
    let manifest_descriptor = write_json_blob(blobs, MEDIA_TYPE_MANIFEST, &serde_json::to_vec(&manifest)?)?;
    Ok(ImageBlobs {
        manifest: manifest_descriptor,
        config: config_descriptor,
        layer,
        diff_id,
        source_digest,
        source_size,
    })
}

/// A layout being assembled in a temporary directory next to its destination.
struct PendingLayout {
    directory: tempfile::TempDir,
    blobs: PathBuf,
}

impl PendingLayout {
    fn create(dest: &Path, opts: &ImageOptions) -> Result<PendingLayout> {
        check_tag(&opts.tag)?;
        if dest.symlink_metadata().is_ok() {
            return Err(Error::DestinationExists {
                path: dest.to_path_buf(),
            });
        }
        let parent = match dest.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let directory = tempfile::Builder::new()
            .prefix(".paddock-oci-")
            .tempdir_in(&parent)
            .map_err(|source| Error::Write { path: parent, source })?;
        let blobs = directory.path().join("blobs").join("sha256");
        fs::create_dir_all(&blobs).map_err(|source| Error::Write {
            path: blobs.clone(),
            source,
        })?;
        Ok(PendingLayout { directory, blobs })
    }

    /// Writes `index.json` naming `top` (a manifest or an image index) and `oci-layout`, then
    /// renames the layout into place at `dest`.
    fn finish(self, mut top: Descriptor, dest: &Path, opts: &ImageOptions) -> Result<Descriptor> {
        let name = opts.reference.clone().unwrap_or_else(|| opts.tag.clone());
        top.annotations.insert(ANNOTATION_REF_NAME.to_string(), name);
        if let Some(reference) = &opts.reference {
            top.annotations
                .insert(ANNOTATION_CONTAINERD_IMAGE_NAME.to_string(), reference.clone());
        }
        let index = Index {
            schema_version: 2,
            media_type: MEDIA_TYPE_INDEX,
            manifests: vec![&top],
        };
        write_file(
            &self.directory.path().join("index.json"),
            &serde_json::to_vec(&index)?,
        )?;
        write_file(
            &self.directory.path().join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        // Re-check just before the rename: rename(2) would silently replace an empty directory.
        if dest.symlink_metadata().is_ok() {
            return Err(Error::DestinationExists {
                path: dest.to_path_buf(),
            });
        }
        let pending = self.directory.keep();
        if let Err(source) = fs::rename(&pending, dest) {
            let _ = fs::remove_dir_all(&pending);
            return Err(Error::Write {
                path: dest.to_path_buf(),
                source,
            });
        }
        Ok(top)
    }
}

/// Builds the containerDisk image for `disk` and writes it as an OCI image layout at `dest`.
///
/// `dest` must not exist. The layout is assembled in a temporary directory next to `dest` and
/// renamed into place at the end, so `dest` either appears complete or not at all.
pub fn build_layout(
    disk: &Path,
    dest: &Path,
    opts: &ImageOptions,
    progress: &mut dyn Progress,
) -> Result<BuiltImage> {
    let pending = PendingLayout::create(dest, opts)?;
    let blobs = write_image_blobs(disk, &pending.blobs, &opts.platform, opts, progress)?;
    let manifest = pending.finish(blobs.manifest, dest, opts)?;
    Ok(BuiltImage {
        layout: dest.to_path_buf(),
        tag: opts.tag.clone(),
        platform: opts.platform.clone(),
        manifest,
        config: blobs.config,
        layer: blobs.layer,
        diff_id: blobs.diff_id,
        source_digest: blobs.source_digest,
        source_size: blobs.source_size,
    })
}

/// One platform's disk for [`build_index_layout`].
#[derive(Debug, Clone)]
pub struct PlatformDisk {
    /// The disk file (qcow2 or raw) that boots on `platform`.
    pub disk: PathBuf,
    /// The platform.
    pub platform: Platform,
}

/// What [`build_index_layout`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltIndex {
    /// The layout directory.
    pub layout: PathBuf,
    /// The tag in `index.json`.
    pub tag: String,
    /// The image index descriptor (its digest is the image digest that a tag resolves to).
    pub index: Descriptor,
    /// One image per platform, in the order given.
    pub images: Vec<BuiltImage>,
}

/// Builds a multi-platform containerDisk: one image per disk, listed with its platform in an OCI
/// image index, written as an OCI image layout at `dest` (`opts.platform` is ignored).
///
/// A VM disk boots on one architecture only, so each platform brings its own disk. Platforms must
/// be distinct; `dest` must not exist; the layout appears complete or not at all.
pub fn build_index_layout(
    disks: &[PlatformDisk],
    dest: &Path,
    opts: &ImageOptions,
    progress: &mut dyn Progress,
) -> Result<BuiltIndex> {
    if disks.is_empty() {
        return Err(Error::InvalidPlatform {
            platform: String::new(),
            reason: "an image index needs at least one disk and platform".into(),
        });
    }
    for (position, entry) in disks.iter().enumerate() {
        if disks[..position]
            .iter()
            .any(|earlier| earlier.platform == entry.platform)
        {
            return Err(Error::InvalidPlatform {
                platform: entry.platform.to_string(),
                reason: "it is given twice; give each platform one disk".into(),
            });
        }
    }
    let pending = PendingLayout::create(dest, opts)?;
    let mut built = Vec::with_capacity(disks.len());
    let mut manifests = Vec::with_capacity(disks.len());
    for entry in disks {
        let blobs = write_image_blobs(&entry.disk, &pending.blobs, &entry.platform, opts, progress)?;
        let mut listed = blobs.manifest.clone();
        listed.platform = Some(entry.platform.clone());
        manifests.push(listed);
        built.push(BuiltImage {
            layout: dest.to_path_buf(),
            tag: opts.tag.clone(),
            platform: entry.platform.clone(),
            manifest: blobs.manifest,
            config: blobs.config,
            layer: blobs.layer,
            diff_id: blobs.diff_id,
            source_digest: blobs.source_digest,
            source_size: blobs.source_size,
        });
    }
    let image_index = Index {
        schema_version: 2,
        media_type: MEDIA_TYPE_INDEX,
        manifests: manifests.iter().collect(),
    };
    let index_descriptor = write_json_blob(
        &pending.blobs,
        MEDIA_TYPE_INDEX,
        &serde_json::to_vec(&image_index)?,
    )?;
    let index = pending.finish(index_descriptor, dest, opts)?;
    Ok(BuiltIndex {
        layout: dest.to_path_buf(),
        tag: opts.tag.clone(),
        index,
        images: built,
    })
}
