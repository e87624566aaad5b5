//! Extracting the disk from a containerDisk image in an OCI image layout (what `paddock pull`
//! does after [`pull`](crate::pull)).
//!
//! Role: read the single layer of the layout's single image and write the disk file it carries.
//!
//! Contract:
//! - the layer is a tar, plain, gzip or zstd as its media type says (OCI and Docker names);
//! - it must have the containerDisk shape CDI and KubeVirt expect: exactly one regular file directly
//!   under `disk/`, optionally the `disk/` directory entry, and nothing else. Other files,
//!   directories, links, devices, absolute paths and `..` are refused, so a hostile image cannot
//!   write outside the destination or smuggle a second file;
//! - the disk is written to a temporary file next to `dest` and linked into place only when the
//!   whole layer was read and checked; `dest` must not exist;
//! - all-zero 4 KiB blocks are not written (the file gets holes), so a mostly empty raw disk takes
//!   little space;
//! - blob digests are not re-checked here: [`pull`](crate::pull) verified them, and a layout built
//!   locally is trusted like any local file.

use std::fs::{File, Permissions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::Descriptor;
use crate::registry::manifest::{
    DocumentKind, MAX_MANIFEST_SIZE, RawIndex, RawManifest, digest_hex, sniff_media_type,
};

/// Holes are made for all-zero runs of this granularity (the usual file system block size).
const SPARSE_BLOCK: usize = 4096;

/// What [`extract_disk`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtractedDisk {
    /// The disk file written.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// The file's name inside the image (`disk.img`, `disk.qcow2`, ...).
    pub name: String,
    /// The layer it came from.
    pub layer: Descriptor,
}

/// Why a disk could not be extracted.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// A layout file could not be read.
    #[error("cannot read {path}: {source}; check the layout directory is complete and readable")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The layout does not hold exactly one image with one layer.
    #[error("oci layout {path} does not hold one containerDisk image: {reason}")]
    Layout {
        /// The layout directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The layer's compression is not known.
    #[error("layer {digest} has media type {media_type:?}; paddock reads tar layers, plain, gzip or zstd")]
    UnsupportedLayer {
        /// The layer digest.
        digest: String,
        /// Its media type.
        media_type: String,
    },
    /// The layer is not shaped like a containerDisk.
    #[error(
        "layer {digest} is not a containerDisk: {reason}; a containerDisk layer holds exactly one regular file under disk/"
    )]
    NotAContainerDisk {
        /// The layer digest.
        digest: String,
        /// What was found.
        reason: String,
    },
    /// The layer could not be decompressed or untarred.
    #[error("cannot read layer {digest}: {source}; the blob is corrupt or truncated, pull the image again")]
    Corrupt {
        /// The layer digest.
        digest: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The disk file could not be written.
    #[error("cannot write {path}: {source}; check free space and permissions where the output goes")]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The destination exists; paddock never overwrites an output.
    #[error("output {path} already exists; remove it or choose another output path")]
    DestinationExists {
        /// The destination.
        path: PathBuf,
    },
}

fn layout_error(layout: &Path, reason: impl Into<String>) -> ExtractError {
    ExtractError::Layout {
        path: layout.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_small(layout: &Path, path: &Path) -> Result<Vec<u8>, ExtractError> {
    let file = File::open(path).map_err(|source| ExtractError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_MANIFEST_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| ExtractError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > MAX_MANIFEST_SIZE {
        return Err(layout_error(
            layout,
            format!("{} is too large for a manifest", path.display()),
        ));
    }
    Ok(bytes)
}

fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf, ExtractError> {
    let hex = digest_hex(digest).ok_or_else(|| {
        layout_error(
            layout,
            format!("digest {digest:?} is not sha256:<64 lowercase hex>"),
        )
    })?;
    Ok(layout.join("blobs").join("sha256").join(hex))
}

/// The single layer of the layout's single image manifest.
fn single_layer(layout: &Path) -> Result<Descriptor, ExtractError> {
    let index_path = layout.join("index.json");
    let index: RawIndex = serde_json::from_slice(&read_small(layout, &index_path)?)
        .map_err(|error| layout_error(layout, format!("index.json is not an image index: {error}")))?;
    let [entry] = index.manifests.as_slice() else {
        return Err(layout_error(
            layout,
            format!(
                "index.json lists {} images, expected exactly one",
                index.manifests.len()
            ),
        ));
    };
    let manifest_bytes = read_small(layout, &blob_path(layout, &entry.digest)?)?;
    let media_type = if entry.media_type.is_empty() {
        sniff_media_type(&manifest_bytes).unwrap_or_default()
    } else {
        entry.media_type.clone()
    };
    if DocumentKind::of_media_type(&media_type) != Some(DocumentKind::Manifest) {
        return Err(layout_error(
            layout,
            format!(
                "index.json names a {media_type:?}, not an image manifest; pull or build a single platform"
            ),
        ));
    }
    let manifest: RawManifest = serde_json::from_slice(&manifest_bytes).map_err(|error| {
        layout_error(
            layout,
            format!("manifest {} does not parse: {error}", entry.digest),
        )
    })?;
    let [layer] = manifest.layers.as_slice() else {
        return Err(layout_error(
            layout,
            format!(
                "the manifest has {} layers; a containerDisk has exactly one",
                manifest.layers.len()
            ),
        ));
    };
    Ok(layer.to_descriptor())
}

/// `path` with leading `./` removed, or why it is refused.
fn clean_entry_path(raw: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(raw).map_err(|_| {
        format!(
            "entry {:?} has a name that is not utf-8",
            String::from_utf8_lossy(raw)
        )
    })?;
    let path = Path::new(text);
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("entry {text:?} is an absolute path"));
            }
            Component::ParentDir => return Err(format!("entry {text:?} contains '..'")),
        }
    }
    Ok(parts.join("/"))
}

/// Writes `reader` to `file`, leaving holes for all-zero blocks; returns the bytes copied.
fn copy_sparse(reader: &mut impl Read, file: &File) -> io::Result<u64> {
    let mut buffer = vec![0u8; 1 << 20];
    let mut position = 0u64;
    loop {
        // Fill the buffer as far as the reader goes, so blocks stay aligned to the file offset.
        let mut filled = 0;
        while filled < buffer.len() {
            match reader.read(&mut buffer[filled..]) {
                Ok(0) => break,
                Ok(read) => filled += read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        if filled == 0 {
            break;
        }
        let data = &buffer[..filled];
        let mut start = 0;
        while start < filled {
            let is_zero = |block: &[u8]| block.iter().fold(0u8, |acc, byte| acc | byte) == 0;
            let zero = is_zero(&data[start..(start + SPARSE_BLOCK).min(filled)]);
            let mut end = (start + SPARSE_BLOCK).min(filled);
            while end < filled && is_zero(&data[end..(end + SPARSE_BLOCK).min(filled)]) == zero {
                end = (end + SPARSE_BLOCK).min(filled);
            }
            if !zero {
                file.write_all_at(&data[start..end], position + start as u64)?;
            }
            start = end;
        }
        position += filled as u64;
    }
    // Gives the file its full length when it ends in a hole.
    file.set_len(position)?;
    Ok(position)
}

/// Extracts the disk of the containerDisk image in the OCI image layout `layout` to `dest`.
///
/// The layout must hold one image manifest with one layer (as [`pull`](crate::pull) and
/// [`build_layout`](crate::build_layout) write it); see the module docs for the checks. `dest` must
/// not exist; it appears complete or not at all, with mode 0644.
pub fn extract_disk(layout: &Path, dest: &Path) -> Result<ExtractedDisk, ExtractError> {
    if dest.symlink_metadata().is_ok() {
        return Err(ExtractError::DestinationExists {
            path: dest.to_path_buf(),
        });
    }
    let layer = single_layer(layout)?;
    let blob = blob_path(layout, &layer.digest)?;
    let file = File::open(&blob).map_err(|source| ExtractError::Read {
        path: blob.clone(),
        source,
    })?;
    let buffered = BufReader::with_capacity(1 << 20, file);
    let corrupt = |source| ExtractError::Corrupt {
        digest: layer.digest.clone(),
        source,
    };
    let stream: Box<dyn Read> = match layer.media_type.as_str() {
        "application/vnd.oci.image.layer.v1.tar" | "application/vnd.docker.image.rootfs.diff.tar" => {
            Box::new(buffered)
        }
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => {
            Box::new(flate2::read::MultiGzDecoder::new(buffered))
        }
        "application/vnd.oci.image.layer.v1.tar+zstd" => {
            Box::new(zstd::stream::read::Decoder::with_buffer(buffered).map_err(corrupt)?)
        }
        other => {
            return Err(ExtractError::UnsupportedLayer {
                digest: layer.digest.clone(),
                media_type: other.to_string(),
            });
        }
    };

    let parent = match dest.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let write_error = |source| ExtractError::Write {
        path: dest.to_path_buf(),
        source,
    };
    let not_a_disk = |reason: String| ExtractError::NotAContainerDisk {
        digest: layer.digest.clone(),
        reason,
    };
    let mut archive = tar::Archive::new(stream);
    let mut found: Option<(String, u64, tempfile::NamedTempFile)> = None;
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            continue;
        }
        let name = clean_entry_path(&entry.path_bytes()).map_err(not_a_disk)?;
        if kind.is_dir() {
            if name == "disk" || name.is_empty() {
                continue;
            }
            return Err(not_a_disk(format!("it has a directory {name:?}")));
        }
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            return Err(not_a_disk(format!(
                "entry {name:?} is a {kind:?}, not a regular file"
            )));
        }
        let Some(file_name) = name
            .strip_prefix("disk/")
            .filter(|rest| !rest.is_empty() && !rest.contains('/'))
        else {
            return Err(not_a_disk(format!("it has a file {name:?} outside disk/")));
        };
        if let Some((first, _, _)) = &found {
            return Err(not_a_disk(format!(
                "it has two files under disk/: {first:?} and {file_name:?}"
            )));
        }
        let temporary = tempfile::Builder::new()
            .prefix(".paddock-disk-")
            .suffix(".partial")
            .permissions(Permissions::from_mode(0o644))
            .tempfile_in(&parent)
            .map_err(write_error)?;
        let size = copy_sparse(&mut entry, temporary.as_file()).map_err(|error| {
            // Reads fail with the decoder's or tar's error; writes with the file system's.
            if error.kind() == io::ErrorKind::InvalidData || error.kind() == io::ErrorKind::UnexpectedEof {
                corrupt(error)
            } else {
                write_error(error)
            }
        })?;
        found = Some((file_name.to_string(), size, temporary));
    }
    let Some((name, size, temporary)) = found else {
        return Err(not_a_disk("it has no file under disk/".to_string()));
    };
    temporary.as_file().sync_all().map_err(write_error)?;
    temporary.persist_noclobber(dest).map_err(|error| {
        if error.error.kind() == io::ErrorKind::AlreadyExists {
            ExtractError::DestinationExists {
                path: dest.to_path_buf(),
            }
        } else {
            write_error(error.error)
        }
    })?;
    Ok(ExtractedDisk {
        path: dest.to_path_buf(),
        size,
        name,
        layer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths_are_cleaned_or_refused() {
        assert_eq!(
            clean_entry_path(b"./disk/disk.img").as_deref(),
            Ok("disk/disk.img")
        );
        assert_eq!(clean_entry_path(b"disk/").as_deref(), Ok("disk"));
        assert!(clean_entry_path(b"/disk/disk.img").is_err());
        assert!(clean_entry_path(b"disk/../../etc/passwd").is_err());
    }

    #[test]
    fn sparse_copy_keeps_bytes_and_makes_holes() {
        let directory = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; 8 << 20];
        data[5000] = 1;
        data[(6 << 20) + 7] = 9;
        data.extend_from_slice(&[0u8; 3000]);
        let path = directory.path().join("out");
        let file = File::create(&path).unwrap();
        let copied = copy_sparse(&mut &data[..], &file).unwrap();
        drop(file);
        assert_eq!(copied, data.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), data);
        let metadata = std::fs::metadata(&path).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(
            metadata.blocks() * 512 < 1 << 20,
            "expected holes, {} blocks",
            metadata.blocks()
        );
    }
}
