//! OVA archives: validate every tar member, read the OVF, extract the boot disk.
//!
//! Contract: [`open`] refuses the whole archive if any member has an absolute path, a `..`
//! component, a type other than plain file or directory (symlinks, hard links, devices, fifos, GNU
//! sparse files), or if two members share a name; it refuses an OVF whose disk references are not
//! plain relative names or name files the archive does not hold. Only the boot disk (the first
//! `DiskSection` disk with a file) is extracted, under a fixed name in the work directory — member
//! names never become paths — sparsely and bounded by the expansion limit. Other disks become a
//! [`Warning::ExtraDisks`].
//!
//! When the OVA carries a manifest (`.mf`), every line must be understood and name a member the
//! archive holds, and the descriptor and the boot disk must match their checksums (the boot disk is
//! hashed as it is extracted). Members paddock does not read (extra disks, NVRAM) are not hashed:
//! reading them would only cost time for data that is not packaged.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path};

use tar::EntryType;

use crate::manifest::{Entry, Manifest, MemberHasher, check};
use crate::ovf::{OvfHints, parse_ovf};
use crate::prepare::{Progress, Stage, Warning};
use crate::sparse::SparseWriter;
use crate::{Error, Result};

/// Largest OVF descriptor paddock reads into memory; real ones are a few KiB.
const MAX_OVF_SIZE: u64 = 16 << 20;

/// Largest manifest paddock reads into memory; one line per member, so a few hundred bytes.
const MAX_MANIFEST_SIZE: u64 = 1 << 20;

/// What [`open`] found and extracted.
pub(crate) struct OpenedOva {
    /// The OVF descriptor's member name.
    pub(crate) ovf_member: String,
    /// The extracted boot disk's member name.
    pub(crate) disk_member: String,
    /// The OVF's hints.
    pub(crate) hints: OvfHints,
    /// Extra disks and similar notes.
    pub(crate) warnings: Vec<Warning>,
}

/// A regular member's data location in the archive.
#[derive(Debug, Clone, Copy)]
struct MemberData {
    position: u64,
    size: u64,
}

/// Normalises a member path to `a/b/c`, or says why it is unsafe.
fn member_name(path: &Path) -> std::result::Result<String, String> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => {
                parts.push(part.to_str().ok_or("has a name that is not UTF-8")?);
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err("has an absolute path".into()),
            Component::ParentDir => return Err("has a '..' path component".into()),
        }
    }
    Ok(parts.join("/"))
}

fn refused_type(kind: EntryType) -> String {
    match kind {
        EntryType::Symlink => "is a symbolic link".into(),
        EntryType::Link => "is a hard link".into(),
        EntryType::Char | EntryType::Block => "is a device node".into(),
        EntryType::Fifo => "is a fifo".into(),
        EntryType::GNUSparse => "is a GNU sparse file".into(),
        other => format!("has the unsupported tar entry type {:?}", other.as_byte() as char),
    }
}

/// Resolves an OVF `href` against the descriptor's directory, refusing URLs, absolute paths and `..`.
fn resolve_href(ovf_member: &str, href: &str) -> Option<String> {
    if href.is_empty() || href.contains("://") || href.contains('\\') {
        return None;
    }
    let relative = member_name(Path::new(href))
        .ok()
        .filter(|name| !name.is_empty())?;
    Some(match ovf_member.rsplit_once('/') {
        Some((directory, _)) => format!("{directory}/{relative}"),
        None => relative,
    })
}

/// Validates the OVA at `archive`, parses its OVF and extracts the boot disk into the new file
/// `output`, stopping past `limit` bytes.
pub(crate) fn open(
    archive: &Path,
    output: &Path,
    limit: u64,
    max_virtual_size: u64,
    progress: &mut dyn Progress,
) -> Result<OpenedOva> {
    let archive_error = |source| Error::Archive {
        path: archive.to_path_buf(),
        source,
    };
    let unsafe_member = |member: String, reason: String| Error::UnsafeArchiveMember {
        archive: archive.to_path_buf(),
        member,
        reason,
    };
    let file = File::open(archive).map_err(|source| Error::Read {
        path: archive.to_path_buf(),
        source,
    })?;
    let mut tar = tar::Archive::new(file);
    let mut members: HashMap<String, MemberData> = HashMap::new();
    let mut ovf: Option<(String, String)> = None;
    let mut manifest: Option<(String, String)> = None;
    for entry in tar.entries_with_seek().map_err(archive_error)? {
        let mut entry = entry.map_err(archive_error)?;
        let raw_path = entry.path().map_err(archive_error)?.into_owned();
        let shown = raw_path.display().to_string();
        let name = member_name(&raw_path).map_err(|reason| unsafe_member(shown.clone(), reason))?;
        match entry.header().entry_type() {
            EntryType::Regular | EntryType::Continuous if !name.is_empty() => {}
            EntryType::Regular | EntryType::Continuous => {
                return Err(unsafe_member(shown, "is a file with an empty path".into()));
            }
            // "./" (empty once normalised) is the usual first entry of `tar -C dir -cf x.ova .`.
            EntryType::Directory | EntryType::XGlobalHeader => continue,
            other => return Err(unsafe_member(shown, refused_type(other))),
        }
        let data = MemberData {
            position: entry.raw_file_position(),
            size: entry.size(),
        };
        if members.insert(name.clone(), data).is_some() {
            return Err(unsafe_member(
                shown,
                "appears twice, so which copy is meant is ambiguous".into(),
            ));
        }
        if name.to_ascii_lowercase().ends_with(".ovf") {
            if let Some((first, _)) = &ovf {
                return Err(Error::Ovf {
                    archive: archive.to_path_buf(),
                    ovf: first.clone(),
                    reason: format!(
                        "the archive holds a second descriptor {name:?}; paddock packages one VM per OVA"
                    ),
                });
            }
            if data.size > MAX_OVF_SIZE {
                return Err(Error::Ovf {
                    archive: archive.to_path_buf(),
                    ovf: name,
                    reason: format!("it is {} bytes, too large for an OVF descriptor", data.size),
                });
            }
            let mut text = String::new();
            entry
                .by_ref()
                .take(MAX_OVF_SIZE)
                .read_to_string(&mut text)
                .map_err(archive_error)?;
            ovf = Some((name, text));
        } else if name.to_ascii_lowercase().ends_with(".mf") {
            let refuse = |reason: String| Error::OvaManifest {
                archive: archive.to_path_buf(),
                manifest: name.clone(),
                reason,
            };
            if manifest.is_some() {
                return Err(refuse(
                    "is the archive's second manifest; an OVA carries one".into(),
                ));
            }
            if data.size > MAX_MANIFEST_SIZE {
                return Err(refuse(format!(
                    "is {} bytes, too large for a manifest",
                    data.size
                )));
            }
            let mut text = String::new();
            entry
                .by_ref()
                .take(MAX_MANIFEST_SIZE)
                .read_to_string(&mut text)
                .map_err(|error| refuse(format!("cannot be read as text: {error}")))?;
            manifest = Some((name, text));
        }
    }
    let Some((ovf_member, text)) = ovf else {
        return Err(Error::NoOvf {
            archive: archive.to_path_buf(),
        });
    };
    let ovf_error = |reason: String| Error::Ovf {
        archive: archive.to_path_buf(),
        ovf: ovf_member.clone(),
        reason,
    };
    let hints = parse_ovf(&text).map_err(ovf_error)?;

    // Every disk's file must be a safe name that the archive holds, even the ones not packaged.
    let mut disk_files = Vec::new();
    for disk in &hints.disks {
        let Some(href) = &disk.file else { continue };
        let member = resolve_href(&ovf_member, href).ok_or_else(|| Error::UnsafeOvfReference {
            archive: archive.to_path_buf(),
            href: href.clone(),
        })?;
        let data = *members.get(&member).ok_or_else(|| Error::OvfMissingFile {
            archive: archive.to_path_buf(),
            href: href.clone(),
        })?;
        disk_files.push((member, data));
    }
    let Some((disk_member, data)) = disk_files.first().cloned() else {
        return Err(ovf_error(
            "its DiskSection lists no disk stored in a file, so there is nothing to package".into(),
        ));
    };

    let disk_checksum = match &manifest {
        Some((manifest_member, manifest_text)) => verify_manifest(
            archive,
            manifest_member,
            manifest_text,
            &members,
            (&ovf_member, &text),
            &disk_member,
        )?,
        None => None,
    };

    let mut warnings = Vec::new();
    if hints.disks.len() > 1 {
        let boot = hints.disks.iter().position(|disk| disk.file.is_some());
        let ignored = hints
            .disks
            .iter()
            .enumerate()
            .filter(|(index, _)| Some(*index) != boot)
            .map(|(_, disk)| match &disk.file {
                Some(href) => href.clone(),
                None => format!("{} (a blank disk)", disk.disk_id),
            })
            .collect();
        warnings.push(Warning::ExtraDisks {
            packaged: disk_member.clone(),
            ignored,
        });
    }
    if hints.virtual_systems > 1 {
        warnings.push(Warning::MultipleVirtualSystems {
            count: hints.virtual_systems,
            used: hints.name.clone().unwrap_or_default(),
        });
    }

    let disk_hash = extract(
        archive,
        &disk_member,
        data,
        output,
        limit,
        max_virtual_size,
        disk_checksum.as_ref().map(|(_, entry)| entry.algorithm),
        progress,
    )?;
    if let (Some((manifest_member, entry)), Some(actual)) = (&disk_checksum, disk_hash) {
        check(entry, &actual).map_err(|reason| Error::OvaManifest {
            archive: archive.to_path_buf(),
            manifest: manifest_member.clone(),
            reason,
        })?;
    }
    Ok(OpenedOva {
        ovf_member,
        disk_member,
        hints,
        warnings,
    })
}

/// Checks the manifest against the archive: every line understood and naming a member, the
/// descriptor's checksum right. Returns the manifest line for the boot disk, checked after extraction.
fn verify_manifest(
    archive: &Path,
    manifest_member: &str,
    manifest_text: &str,
    members: &HashMap<String, MemberData>,
    (ovf_member, ovf_text): (&str, &str),
    disk_member: &str,
) -> Result<Option<(String, Entry)>> {
    let refuse = |reason: String| Error::OvaManifest {
        archive: archive.to_path_buf(),
        manifest: manifest_member.to_string(),
        reason,
    };
    let parsed =
        Manifest::parse(manifest_text).map_err(|reason| refuse(format!("cannot be read: {reason}")))?;
    let mut disk = None;
    for entry in parsed.entries {
        let member = resolve_href(manifest_member, &entry.file)
            .filter(|member| members.contains_key(member))
            .ok_or_else(|| {
                refuse(format!(
                    "lists {:?}, which is not a member of the archive",
                    entry.file
                ))
            })?;
        if member == ovf_member {
            let mut hasher = MemberHasher::new(entry.algorithm);
            hasher.update(ovf_text.as_bytes());
            check(&entry, &hasher.finish()).map_err(refuse)?;
        } else if member == disk_member {
            disk = Some((manifest_member.to_string(), entry));
        }
    }
    Ok(disk)
}

/// Copies one member's bytes into a new sparse file; with `hash`, returns their digest.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename the arguments
fn extract(
    archive: &Path,
    member: &str,
    data: MemberData,
    output: &Path,
    limit: u64,
    max_virtual_size: u64,
    hash: Option<crate::manifest::Algorithm>,
    progress: &mut dyn Progress,
) -> Result<Option<String>> {
    let mut hasher = hash.map(MemberHasher::new);
    if data.size > limit {
        return Err(Error::ExpandsTooLarge {
            action: format!("extracting {member} from"),
            path: archive.to_path_buf(),
            produced: data.size,
            limit: max_virtual_size,
        });
    }
    let read_error = |source| Error::Read {
        path: archive.to_path_buf(),
        source,
    };
    let write_error = |source| Error::Write {
        path: output.to_path_buf(),
        source,
    };
    let mut file = File::open(archive).map_err(read_error)?;
    file.seek(SeekFrom::Start(data.position)).map_err(read_error)?;
    let mut reader = file.take(data.size);
    let mut writer = SparseWriter::new(File::create_new(output).map_err(write_error)?);
    let mut buffer = vec![0u8; 1 << 20];
    progress.update(Stage::Extract, 0, data.size);
    loop {
        let read = reader.read(&mut buffer).map_err(read_error)?;
        if read == 0 {
            break;
        }
        if let Some(hasher) = hasher.as_mut() {
            hasher.update(&buffer[..read]);
        }
        writer.write(&buffer[..read]).map_err(write_error)?;
        progress.update(Stage::Extract, writer.accepted(), data.size);
    }
    let length = writer.finish().map_err(write_error)?;
    if length != data.size {
        return Err(Error::Archive {
            path: archive.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("member {member} is truncated ({length} of {} bytes)", data.size),
            ),
        });
    }
    Ok(hasher.map(MemberHasher::finish))
}

#[cfg(test)]
mod tests {
    use super::{member_name, resolve_href};
    use std::path::Path;

    #[test]
    fn member_names_are_normalised_or_refused() {
        assert_eq!(member_name(Path::new("./a/b.vmdk")).unwrap(), "a/b.vmdk");
        assert!(
            member_name(Path::new("/etc/passwd"))
                .unwrap_err()
                .contains("absolute")
        );
        assert!(member_name(Path::new("a/../../b")).unwrap_err().contains(".."));
    }

    #[test]
    fn hrefs_resolve_inside_the_archive_only() {
        assert_eq!(
            resolve_href("vm.ovf", "disk1.vmdk").as_deref(),
            Some("disk1.vmdk")
        );
        assert_eq!(
            resolve_href("dir/vm.ovf", "disk1.vmdk").as_deref(),
            Some("dir/disk1.vmdk")
        );
        assert_eq!(resolve_href("vm.ovf", "../disk1.vmdk"), None);
        assert_eq!(resolve_href("vm.ovf", "/etc/shadow"), None);
        assert_eq!(resolve_href("vm.ovf", "http://example.invalid/disk.vmdk"), None);
    }
}
