//! paddock-disk: the input side of `paddock package`.
//!
//! Role: take whatever VM disk a user hands us (qcow2, raw, vmdk, vhd/vhdx, vdi, iso, an OVA, or a
//! gzip/xz/zstd-compressed form of any of them) and turn it into one safe qcow2 or raw file that
//! `paddock_oci::build_layout` can put into a containerDisk image.
//!
//! Contract:
//! - formats are detected from content, never from file names: magic bytes for compression and tar
//!   (OVA), `qemu-img info` for disk formats, the ISO9660 `CD001` signature for ISOs; qemu-img is
//!   always told the detected format (`-f`) when it converts, so it never probes on its own;
//! - nothing that can reach outside the input is accepted: qcow2 backing files, external data files,
//!   encryption, multi-file vmdk descriptors and vmdk parents are refused *before* qemu-img opens
//!   the file, and tar members with absolute paths, `..` or link/device types are refused;
//! - sizes are bounded: a virtual size over [`PrepareOptions::max_virtual_size`] is refused, and
//!   decompression and extraction stop as soon as the output outgrows that limit plus a small slack;
//! - atomic: every file paddock writes lives in one temporary directory under
//!   [`PrepareOptions::work_dir`], removed on failure (and when the [`PreparedDisk`] is dropped), so a
//!   failed run leaves nothing behind;
//! - fast path: with [`OutputFormat::Keep`] a plain qcow2 or raw input that passes the checks is
//!   returned as is (no copy), so packaging stays near the speed of reading the disk once.
//!
//! See the crate README for the formats, the refusals and why.

mod decompress;
mod manifest;
mod ova;
mod ovf;
mod prepare;
mod qemu;
mod sniff;
mod sparse;

pub use ovf::{Firmware, OvfDisk, OvfHints};
pub use prepare::{
    DetectedInput, DiskFormat, DiskInfo, InputFormat, Inspection, Layer, MAX_LAYERS, Media, NoProgress,
    OutputFormat, PrepareOptions, PreparedDisk, Progress, Qcow2Details, Stage, Warning, inspect, prepare,
};

use std::fmt;
use std::path::{Path, PathBuf};

/// Default limit on a disk's virtual size (256 GiB); the CLI raises it with `--max-size`.
pub const DEFAULT_MAX_VIRTUAL_SIZE: u64 = 256 << 30;

/// A compression wrapped around an input (detected from magic bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// gzip (RFC 1952), possibly several concatenated members.
    Gzip,
    /// xz, possibly several concatenated streams.
    Xz,
    /// Zstandard, possibly several frames.
    Zstd,
}

impl fmt::Display for Compression {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
        })
    }
}

/// A byte count shown both human-readably and exactly, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
        let mut unit = 0;
        let mut whole = self.0;
        while whole >= 1024 && unit + 1 < UNITS.len() {
            whole /= 1024;
            unit += 1;
        }
        if unit == 0 {
            return write!(formatter, "{} bytes", self.0);
        }
        let scaled = self.0 as f64 / (1u64 << (10 * unit)) as f64;
        if self.0.is_multiple_of(1u64 << (10 * unit)) {
            write!(formatter, "{whole} {} ({} bytes)", UNITS[unit], self.0)
        } else {
            write!(formatter, "{scaled:.1} {} ({} bytes)", UNITS[unit], self.0)
        }
    }
}

/// Everything that can go wrong inspecting or preparing a disk. Each message says what failed, why,
/// and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// qemu-img is not installed or not on PATH.
    #[error(
        "qemu-img not found on PATH; paddock uses it to read and convert disk images: install it (Debian/Ubuntu: apt-get install qemu-utils; Fedora: dnf install qemu-img)"
    )]
    QemuImgNotFound,
    /// qemu-img could not be started.
    #[error(
        "cannot run {program} to {action} {path}: {source}; check that qemu-img (Debian package qemu-utils) works"
    )]
    QemuImgSpawn {
        /// The qemu-img binary.
        program: PathBuf,
        /// What paddock asked qemu-img to do.
        action: &'static str,
        /// The disk involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// qemu-img ran and failed.
    #[error(
        "qemu-img could not {action} {path}: {stderr}; the file may be damaged or not a disk image qemu-img understands"
    )]
    QemuImgFailed {
        /// What paddock asked qemu-img to do.
        action: &'static str,
        /// The disk involved.
        path: PathBuf,
        /// qemu-img's error output, trimmed.
        stderr: String,
    },
    /// qemu-img printed something paddock cannot parse.
    #[error(
        "cannot parse qemu-img's report on {path}: {source}; this qemu-img version is not supported, please report it"
    )]
    QemuImgOutput {
        /// The disk involved.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// Another process (a running VM) holds the image's lock.
    #[error(
        "disk {path} is in use by another process (qemu-img: {stderr}); shut down the VM using it first, a disk copied while its VM runs is inconsistent"
    )]
    DiskInUse {
        /// The disk involved.
        path: PathBuf,
        /// qemu-img's error output, trimmed.
        stderr: String,
    },
    /// The input (or a file paddock derived from it) could not be read.
    #[error("cannot read {path}: {source}; check the path and that it is a readable file")]
    Read {
        /// The path being read.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file in the work directory could not be written.
    #[error("cannot write {path}: {source}; check free space and permissions in the work directory")]
    Write {
        /// The path being written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The input is not a regular file.
    #[error(
        "{path} is not a regular file; pass a disk image file (qcow2, raw, vmdk, vhd, vhdx, vdi, iso or ova)"
    )]
    NotAFile {
        /// The input path.
        path: PathBuf,
    },
    /// The input is empty (virtual size 0).
    #[error("{path} is empty (virtual size 0); pass a disk image with content")]
    EmptyDisk {
        /// The input path.
        path: PathBuf,
    },
    /// A qcow2 (or vmdk) image refers to a backing (parent) image.
    #[error(
        "disk {path} has a backing file {backing:?}: KubeVirt refuses images with backing files, and the reference can point at any path on this machine; flatten it into one file first where the backing file exists: qemu-img convert -O qcow2 {path} flat.qcow2"
    )]
    BackingFile {
        /// The disk involved.
        path: PathBuf,
        /// The backing file name as recorded in the image.
        backing: String,
    },
    /// A qcow2 image keeps its data in an external data file.
    #[error(
        "qcow2 image {path} keeps its data in an external data file {data_file:?}: KubeVirt refuses such images, and the reference can point at any path on this machine; merge it into one file first: qemu-img convert -O qcow2 {path} merged.qcow2"
    )]
    ExternalDataFile {
        /// The disk involved.
        path: PathBuf,
        /// The data file name as recorded in the image, when readable.
        data_file: String,
    },
    /// A qcow2 image is encrypted.
    #[error(
        "qcow2 image {path} is encrypted ({method}): KubeVirt cannot boot encrypted qcow2 images from a containerDisk; decrypt it first: qemu-img convert --object secret,id=sec0,file=KEYFILE --image-opts driver=qcow2,file.filename={path},encrypt.key-secret=sec0 -O qcow2 decrypted.qcow2"
    )]
    Encrypted {
        /// The disk involved.
        path: PathBuf,
        /// The encryption method (aes, luks).
        method: String,
    },
    /// A vmdk is a text descriptor referring to separate extent files.
    #[error(
        "vmdk {path} is a descriptor that references separate extent files ({}): paddock reads only single-file vmdk (monolithicSparse or streamOptimized), because extent paths can point anywhere on this machine; merge it into one file first: qemu-img convert -f vmdk -O qcow2 {path} disk.qcow2", extents.join(", ")
    )]
    VmdkDescriptor {
        /// The descriptor path.
        path: PathBuf,
        /// The extent file names the descriptor lists.
        extents: Vec<String>,
    },
    /// qemu-img detected a format paddock does not accept.
    #[error(
        "disk {path} is in format {format:?}, which paddock does not package; accepted are qcow2, raw, vmdk, vpc (vhd), vhdx and vdi: convert it first with qemu-img convert -O qcow2 {path} disk.qcow2"
    )]
    UnsupportedFormat {
        /// The disk involved.
        path: PathBuf,
        /// The format qemu-img reported.
        format: String,
    },
    /// The input is a kind of file paddock recognises but does not read (bzip2, zip, an OVF XML …).
    #[error("{path} is {kind}, which paddock does not read; {hint}")]
    UnsupportedInput {
        /// The input path.
        path: PathBuf,
        /// What the file is.
        kind: &'static str,
        /// What to do instead.
        hint: &'static str,
    },
    /// The disk's virtual size is over the limit.
    #[error(
        "disk {path} has a virtual size of {}, over the limit of {}; if this disk is meant to be that large, raise the limit with --max-size", Size(*virtual_size), Size(*limit)
    )]
    TooLarge {
        /// The disk involved.
        path: PathBuf,
        /// Its virtual size in bytes.
        virtual_size: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// Decompressing or extracting produced more data than any disk under the limit can need.
    #[error(
        "{action} {path} produced more than {} and was stopped: a disk under the limit of {} cannot be that large (this may be a decompression bomb); if the disk is genuinely larger, raise the limit with --max-size", Size(*produced), Size(*limit)
    )]
    ExpandsTooLarge {
        /// What was being done (e.g. "decompressing gzip").
        action: String,
        /// The input being expanded.
        path: PathBuf,
        /// Bytes produced when paddock stopped.
        produced: u64,
        /// The virtual size limit in bytes.
        limit: u64,
    },
    /// A compressed stream is damaged or truncated.
    #[error(
        "cannot decompress {compression} data in {path}: {source}; the file is damaged or truncated, download or compress it again"
    )]
    Decompress {
        /// The compressed file.
        path: PathBuf,
        /// Its compression.
        compression: Compression,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A tar archive (OVA) cannot be read.
    #[error("cannot read tar archive {path}: {source}; the OVA is damaged or truncated, export it again")]
    Archive {
        /// The archive path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A tar member is unsafe to extract.
    #[error(
        "refusing archive {archive}: member {member:?} {reason}; an OVA holds only plain files (and directories) with relative paths, re-export it or extract the disk yourself and package that"
    )]
    UnsafeArchiveMember {
        /// The archive path.
        archive: PathBuf,
        /// The member's path as stored.
        member: String,
        /// Why it is refused.
        reason: String,
    },
    /// A tar archive holds no `.ovf` descriptor, so it is not an OVA.
    #[error(
        "{archive} is a tar archive without an .ovf descriptor, so not an OVA; extract the disk from it and package the disk file"
    )]
    NoOvf {
        /// The archive path.
        archive: PathBuf,
    },
    /// An OVF descriptor is malformed or describes something paddock cannot package.
    #[error("cannot use OVF descriptor {ovf:?} in {archive}: {reason}")]
    Ovf {
        /// The archive path.
        archive: PathBuf,
        /// The descriptor's member name.
        ovf: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// An OVA's manifest (`.mf`) cannot be read or does not match the members paddock reads.
    #[error(
        "refusing OVA {archive}: its manifest {manifest:?} {reason}; the archive is damaged or was changed after export, copy or export it again"
    )]
    OvaManifest {
        /// The archive path.
        archive: PathBuf,
        /// The manifest's member name.
        manifest: String,
        /// What does not match, or why the manifest cannot be read.
        reason: String,
    },
    /// An OVF file reference is not a plain relative name inside the archive.
    #[error(
        "refusing OVF in {archive}: file reference {href:?} is not a relative path inside the archive (URLs, absolute paths and '..' are not allowed); re-export the OVA with its disks inside"
    )]
    UnsafeOvfReference {
        /// The archive path.
        archive: PathBuf,
        /// The offending reference.
        href: String,
    },
    /// An OVF references a disk file that the archive does not contain.
    #[error(
        "OVF in {archive} references disk file {href:?}, which the archive does not contain; the OVA is incomplete, export it again"
    )]
    OvfMissingFile {
        /// The archive path.
        archive: PathBuf,
        /// The missing reference.
        href: String,
    },
    /// Layers nest too deeply (e.g. a compressed OVA inside an OVA).
    #[error(
        "{path} nests too deeply ({chain}); paddock unpacks at most three layers around a disk (like xz → ova → gzip) and one OVA: unpack it yourself first"
    )]
    TooDeep {
        /// The input path.
        path: PathBuf,
        /// The layers found so far.
        chain: String,
    },
    /// The work directory could not be created.
    #[error(
        "cannot create a work directory in {path}: {source}; pass a writable work directory with enough free space"
    )]
    WorkDir {
        /// The parent directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl Error {
    /// Replaces the error's file path when it is `from` (a temporary file) with `to` (a description
    /// of where it came from), so messages name what the user passed.
    pub(crate) fn relabel(mut self, from: &Path, to: &Path) -> Self {
        if let Some(path) = self.path_mut()
            && path == from
        {
            *path = to.to_path_buf();
        }
        self
    }

    fn path_mut(&mut self) -> Option<&mut PathBuf> {
        match self {
            Error::QemuImgSpawn { path, .. }
            | Error::QemuImgFailed { path, .. }
            | Error::QemuImgOutput { path, .. }
            | Error::DiskInUse { path, .. }
            | Error::Read { path, .. }
            | Error::Write { path, .. }
            | Error::NotAFile { path }
            | Error::EmptyDisk { path }
            | Error::BackingFile { path, .. }
            | Error::ExternalDataFile { path, .. }
            | Error::Encrypted { path, .. }
            | Error::VmdkDescriptor { path, .. }
            | Error::UnsupportedFormat { path, .. }
            | Error::UnsupportedInput { path, .. }
            | Error::TooLarge { path, .. }
            | Error::ExpandsTooLarge { path, .. }
            | Error::Decompress { path, .. }
            | Error::Archive { path, .. }
            | Error::TooDeep { path, .. } => Some(path),
            Error::UnsafeArchiveMember { archive, .. }
            | Error::NoOvf { archive }
            | Error::Ovf { archive, .. }
            | Error::UnsafeOvfReference { archive, .. }
            | Error::OvaManifest { archive, .. }
            | Error::OvfMissingFile { archive, .. } => Some(archive),
            Error::QemuImgNotFound | Error::WorkDir { .. } => None,
        }
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::Size;

    #[test]
    fn sizes_are_shown_human_and_exact() {
        assert_eq!(Size(512).to_string(), "512 bytes");
        assert_eq!(Size(2 << 40).to_string(), "2 TiB (2199023255552 bytes)");
        assert_eq!(Size(1536 << 20).to_string(), "1.5 GiB (1610612736 bytes)");
    }
}
