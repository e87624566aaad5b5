//! OCI archive writer: a tar of an OCI image layout directory (what `skopeo`'s `oci-archive:`
//! transport reads and what Zarf accepts as `imageArchives`).
//!
//! Contract: entries are sorted by path, directories first within their parent, with fixed mtime
//! 0, uid/gid 0, modes 0755/0644 and no user/group names, so the same layout gives the same archive
//! bytes. The archive is written to a temporary file next to the destination and renamed into place.

use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

fn collect(root: &Path, rel: &Path, out: &mut Vec<(PathBuf, bool)>) -> Result<()> {
    let dir = root.join(rel);
    let rerr = |source| Error::ReadLayout {
        path: dir.clone(),
        source,
    };
    let mut names = Vec::new();
    for entry in fs::read_dir(&dir).map_err(rerr)? {
        names.push(entry.map_err(rerr)?.file_name());
    }
    names.sort();
    for name in names {
        let rel_child = rel.join(&name);
        let meta = fs::symlink_metadata(root.join(&rel_child)).map_err(|source| Error::ReadLayout {
            path: root.join(&rel_child),
            source,
        })?;
        if meta.is_dir() {
            out.push((rel_child.clone(), true));
            collect(root, &rel_child, out)?;
        } else if meta.is_file() {
            out.push((rel_child, false));
        }
        // Anything else (symlinks, sockets) is not part of an OCI layout and is skipped.
    }
    Ok(())
}

/// Writes `layout` (an OCI image layout directory) as a deterministic tar at `dest`.
///
/// `dest` must not exist.
pub fn write_archive(layout: &Path, dest: &Path) -> Result<()> {
    if dest.symlink_metadata().is_ok() {
        return Err(Error::DestinationExists {
            path: dest.to_path_buf(),
        });
    }
    let mut entries = Vec::new();
    collect(layout, Path::new(""), &mut entries)?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let werr = |source| Error::Write {
        path: dest.to_path_buf(),
        source,
    };
    let tmp = tempfile::Builder::new()
        .prefix(".paddock-oci-")
        .suffix(".tar.partial")
        .tempfile_in(&parent)
        .map_err(werr)?;
    let mut builder = tar::Builder::new(BufWriter::with_capacity(1 << 20, tmp.as_file()));
    for (rel, is_dir) in &entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        if *is_dir {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            builder.append_data(&mut h, rel, std::io::empty()).map_err(werr)?;
        } else {
            let src = layout.join(rel);
            let f = File::open(&src).map_err(|source| Error::ReadLayout {
                path: src.clone(),
                source,
            })?;
            let len = f
                .metadata()
                .map_err(|source| Error::ReadLayout {
                    path: src.clone(),
                    source,
                })?
                .len();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(len);
            builder.append_data(&mut h, rel, f).map_err(werr)?;
        }
    }
    let buf = builder.into_inner().map_err(werr)?;
    buf.into_inner()
        .map_err(|e| werr(e.into_error()))?
        .sync_all()
        .map_err(werr)?;
    if dest.symlink_metadata().is_ok() {
        return Err(Error::DestinationExists {
            path: dest.to_path_buf(),
        });
    }
    tmp.persist_noclobber(dest).map_err(|e| werr(e.error))?;
    Ok(())
}
