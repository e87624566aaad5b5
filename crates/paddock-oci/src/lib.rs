//! paddock-oci: containerDisk images in OCI image layouts and OCI archives.
//!
//! Role: turn one VM disk file (qcow2 or raw) into the containerDisk image KubeVirt and CDI accept,
//! written as an OCI image layout directory (and optionally an OCI archive, usable as a Zarf
//! `imageArchives` entry); push it to a registry ([`push`]), pull one back ([`pull`]) and extract
//! its disk ([`extract_disk`]).
//!
//! Contract:
//! - exactly one layer: a tar holding directory `disk/` (mode 0555, uid/gid 107) and regular file
//!   `disk/disk.img` (mode 0444, uid/gid 107), as kubevirt/containerdisks builds it;
//! - deterministic: fixed mtime ([`ImageOptions::mtime`]), fixed entry order, no user/group names,
//!   no `created` timestamp, so the same input and options give the same manifest digest;
//! - single pass: the disk is read once, streamed through tar, compressor and three sha256 hashers
//!   (source digest, diffID, blob digest); it is never held in memory;
//! - atomic: outputs are assembled under temporary names next to the destination and renamed into
//!   place, so a failure never leaves a half-written layout or archive.
//!
//! See the crate README for media types and why zstd is the default compression.

pub mod backup;
mod extract;
mod image;
mod layout;
mod parallel_gzip;
pub mod registry;
pub mod zarf;

pub use extract::{ExtractError, ExtractedDisk, extract_disk};
pub use image::{
    BuiltImage, BuiltIndex, Compression, Descriptor, ImageOptions, NoProgress, Platform, PlatformDisk,
    Progress, build_index_layout, build_layout,
};
pub use layout::write_archive;
pub use registry::{
    BlobPhase, BlobProgress, Credentials, NoTransferProgress, PullOptions, PulledImage, PushOptions,
    PushReport, RegistryError, RegistryOptions, TransferProgress, pull, push,
};

use std::path::PathBuf;

/// Media type of an OCI image manifest.
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image index (`index.json`).
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an OCI image config.
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Annotation naming a manifest in `index.json` (the tag, or the full reference when known).
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Annotation containerd (and Zarf, first of all) reads as the full image reference in an archive.
pub const ANNOTATION_CONTAINERD_IMAGE_NAME: &str = "io.containerd.image.name";
/// Config label carrying the sha256 digest of `disk/disk.img` (the disk file the image was built from).
pub const LABEL_SOURCE_DIGEST: &str = "dev.paddock.source.digest";
/// Env var KubeVirt/CDI read as the image's default instancetype (verified in kubevirt sources).
pub const ENV_DEFAULT_INSTANCETYPE: &str = "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE";
/// Env var KubeVirt/CDI read as the image's default preference (verified in kubevirt sources).
pub const ENV_DEFAULT_PREFERENCE: &str = "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_PREFERENCE";
/// The uid and gid (qemu in KubeVirt's launcher) that own the disk in a containerDisk.
pub const CONTAINERDISK_UID_GID: u64 = 107;

/// Everything that can go wrong building an image or writing a layout or archive.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input disk could not be opened or read.
    #[error("cannot read disk image {path}: {source}; check the path and that it is a readable regular file")]
    ReadDisk {
        /// The disk path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The input is not a regular file.
    #[error("disk image {path} is not a regular file; pass a qcow2 or raw disk file")]
    NotAFile {
        /// The disk path.
        path: PathBuf,
    },
    /// The destination already exists; paddock never overwrites an output.
    #[error("output {path} already exists; remove it or choose another output path")]
    DestinationExists {
        /// The destination path.
        path: PathBuf,
    },
    /// Writing (or renaming into place) an output failed.
    #[error("cannot write {path}: {source}; check free space and permissions where the output goes")]
    Write {
        /// The path being written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Reading a layout to archive it failed.
    #[error("cannot read oci layout file {path}: {source}; check the layout directory is complete")]
    ReadLayout {
        /// The path being read.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Streaming the disk through tar/compressor failed (read or write side).
    #[error(
        "cannot build the image layer from {path}: {source}; check the disk is readable and the output has free space"
    )]
    Layer {
        /// The disk path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The tag is not usable as an OCI reference name.
    #[error(
        "invalid tag {tag:?}: {reason}; use letters, digits, '.', '_' and '-' (at most 128, not starting with '.' or '-')"
    )]
    InvalidTag {
        /// The rejected tag.
        tag: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A platform is not usable for a containerDisk.
    #[error("invalid platform {platform:?}: {reason}")]
    InvalidPlatform {
        /// The rejected platform text.
        platform: String,
        /// Why it was rejected.
        reason: String,
    },
    /// Encoding image metadata failed.
    #[error("cannot encode image metadata as json: {0}; this is a bug in paddock, please report it")]
    Json(#[from] serde_json::Error),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
