//! VM backups as containerDisk images: the format, building one, and listing and inspecting the
//! backups in a registry repository.
//!
//! Role: the OCI side of `paddock backup`. The runtime side (a consistent copy of a VM's disk,
//! restoring it as a VM) lives in `paddock-local`; the command line in `paddock`.
//!
//! # Format (version 1)
//!
//! A backup of VM `<name>` is one tag `<name>-<UTC time as YYYYMMDDTHHMMSSZ>` in a repository,
//! pointing at an OCI image manifest that is exactly the containerDisk `paddock package` writes
//! (one layer holding `disk/disk.img`, uid/gid 107, mode 0444; config with the source digest
//! label) for the VM's disk, flattened to one qcow2 at the moment of the backup. The VM's
//! definition travels in the manifest's annotations:
//!
//! | annotation | value |
//! | --- | --- |
//! | `dev.paddock.backup.format` | `1` |
//! | `dev.paddock.backup.vm` | `<namespace>/<name>` of the VM backed up |
//! | `dev.paddock.backup.definition` | the VirtualMachineApp as JSON (status and cluster-assigned metadata removed) |
//! | `dev.paddock.backup.disk-virtual-size` | the disk's virtual size in bytes |
//! | `org.opencontainers.image.created` | when the backup was taken, RFC 3339 UTC |
//!
//! and the layer descriptor carries KubeVirt's `io.kubevirt.disk.name` (the volume name).
//!
//! ## Why not KubeVirt v1.9's OCI export format
//!
//! KubeVirt v1.9 (VEP 256, alpha) exports a VM as an artifact of type
//! `application/vnd.kubevirt.virtualmachine.v1`: an image index over a manifest whose config blob
//! (`application/vnd.kubevirt.virtualmachine.config.v1+json`) is the VirtualMachine object and
//! whose layers are bare zstd-compressed raw disks (`application/vnd.kubevirt.disk.raw+zstd`,
//! not tar-wrapped, annotated `io.kubevirt.disk.name`). Importing such an artifact into a cluster
//! is explicitly left to a later design, and neither CDI's registry import nor a containerDisk
//! volume can read it. A paddock backup instead is an ordinary containerDisk, so:
//!
//! - restoring needs nothing new anywhere: a VirtualMachineApp (or a plain KubeVirt VM, or CDI
//!   DataVolume) whose `containerDisk` is `<repository>@<backup digest>` boots the backup, locally
//!   and in a cluster, through the paths packaging already uses and tests;
//! - a qcow2 disk stays qcow2 (only allocated clusters are stored), where KubeVirt's format is raw;
//! - skopeo, Zarf and every registry treat it as the image it is.
//!
//! The definition goes in manifest annotations, not in the image config and not in a separate
//! artifact, because: the config stays byte-for-byte what packaging the same disk gives, so an
//! unchanged disk means an unchanged config and layer and a new backup of it uploads only a
//! manifest; listing a repository's backups needs one manifest request per tag and no blob
//! downloads; and one manifest means one atomic step — a separate definition artifact (a
//! referrer; docker-registry 2.8 has no referrers API) would create a second object that can
//! exist without the first. Setting `artifactType` to KubeVirt's type is deliberately avoided:
//! KubeVirt's importer would take the config for a VirtualMachine.
//!
//! ## Completeness
//!
//! Blobs go up first, the manifest last, under the tag ([`crate::push`] does it in that order,
//! and the registry refuses a manifest whose blobs it lacks): a tag exists only for a complete
//! backup. [`list_backups`] additionally checks each listed backup's blobs, and shows only
//! complete ones.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use paddock_api::app::VirtualMachineApp;
use paddock_api::image_reference::ImageReference;
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;

use crate::registry::client::{Access, RegistryClient};
use crate::registry::manifest::{RawManifest, sha256_digest};
use crate::registry::{RegistryError, RegistryOptions};
use crate::{
    ANNOTATION_REF_NAME, BuiltImage, ImageOptions, MEDIA_TYPE_INDEX, MEDIA_TYPE_MANIFEST, Progress,
    build_layout,
};

/// The backup format version this code writes and reads.
pub const BACKUP_FORMAT_VERSION: &str = "1";
/// Annotation: the backup format version.
pub const ANNOTATION_BACKUP_FORMAT: &str = "dev.paddock.backup.format";
/// Annotation: `<namespace>/<name>` of the VM backed up.
pub const ANNOTATION_BACKUP_VM: &str = "dev.paddock.backup.vm";
/// Annotation: the VirtualMachineApp as JSON.
pub const ANNOTATION_BACKUP_DEFINITION: &str = "dev.paddock.backup.definition";
/// Annotation: the disk's virtual size in bytes.
pub const ANNOTATION_BACKUP_DISK_VIRTUAL_SIZE: &str = "dev.paddock.backup.disk-virtual-size";
/// The OCI annotation for the creation time (RFC 3339).
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";
/// KubeVirt's layer annotation naming the VM volume a disk belongs to.
pub const ANNOTATION_DISK_NAME: &str = "io.kubevirt.disk.name";
/// The volume name of the VM's one disk (as the operator names it in the KubeVirt VM).
pub const ROOT_DISK_NAME: &str = "rootdisk";

/// Errors of building, listing and inspecting backups.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Talking to the registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Building the image layout failed.
    #[error(transparent)]
    Build(#[from] crate::Error),
    /// The reference is not usable.
    #[error("invalid reference {reference:?}: {reason}")]
    Reference {
        /// What was given.
        reference: String,
        /// What is wrong and what to give instead.
        reason: String,
    },
    /// The image is not a paddock backup (or one of a format this paddock does not read).
    #[error("{reference} is not a paddock backup: {reason}")]
    NotABackup {
        /// The image.
        reference: String,
        /// What is missing or wrong.
        reason: String,
    },
    /// A layout file could not be read or written.
    #[error("cannot {action} {path}: {source}; check free space and permissions")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A document could not be encoded or decoded.
    #[error("cannot {action}: {source}")]
    Json {
        /// What was attempted.
        action: String,
        /// The underlying error.
        source: serde_json::Error,
    },
}

/// Result alias for this module.
pub type Result<T, E = BackupError> = std::result::Result<T, E>;

/// What a backup says about itself (its annotations).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupInfo {
    /// The namespace of the VM backed up.
    pub namespace: String,
    /// The name of the VM backed up.
    pub name: String,
    /// When the backup was taken, RFC 3339 UTC (`2026-11-24T20:50:00Z`).
    pub created: String,
    /// The disk's virtual size in bytes.
    pub disk_virtual_size: u64,
    /// The VM's definition.
    pub definition: VirtualMachineApp,
}

impl BackupInfo {
    /// The manifest annotations that carry this information.
    pub fn annotations(&self) -> Result<BTreeMap<String, String>> {
        let definition = serde_json::to_string(&self.definition).map_err(|source| BackupError::Json {
            action: "encode the VirtualMachineApp".to_string(),
            source,
        })?;
        Ok(BTreeMap::from([
            (
                ANNOTATION_BACKUP_FORMAT.to_string(),
                BACKUP_FORMAT_VERSION.to_string(),
            ),
            (
                ANNOTATION_BACKUP_VM.to_string(),
                format!("{}/{}", self.namespace, self.name),
            ),
            (ANNOTATION_BACKUP_DEFINITION.to_string(), definition),
            (
                ANNOTATION_BACKUP_DISK_VIRTUAL_SIZE.to_string(),
                self.disk_virtual_size.to_string(),
            ),
            (ANNOTATION_CREATED.to_string(), self.created.clone()),
        ]))
    }

    /// Reads the information back from a manifest's annotations.
    pub fn from_annotations(annotations: &BTreeMap<String, String>, reference: &str) -> Result<BackupInfo> {
        let not_a_backup = |reason: String| BackupError::NotABackup {
            reference: reference.to_string(),
            reason,
        };
        let field = |key: &str| {
            annotations
                .get(key)
                .ok_or_else(|| not_a_backup(format!("its manifest has no {key} annotation")))
        };
        let format = field(ANNOTATION_BACKUP_FORMAT)?;
        if format != BACKUP_FORMAT_VERSION {
            return Err(not_a_backup(format!(
                "it has backup format {format:?}; this paddock reads format {BACKUP_FORMAT_VERSION}: use a matching paddock"
            )));
        }
        let (namespace, name) = field(ANNOTATION_BACKUP_VM)?
            .split_once('/')
            .ok_or_else(|| not_a_backup(format!("{ANNOTATION_BACKUP_VM} is not <namespace>/<name>")))?;
        let definition: VirtualMachineApp = serde_json::from_str(field(ANNOTATION_BACKUP_DEFINITION)?)
            .map_err(|error| {
                not_a_backup(format!(
                    "{ANNOTATION_BACKUP_DEFINITION} is not a VirtualMachineApp: {error}"
                ))
            })?;
        let disk_virtual_size = field(ANNOTATION_BACKUP_DISK_VIRTUAL_SIZE)?
            .parse()
            .map_err(|error| not_a_backup(format!("{ANNOTATION_BACKUP_DISK_VIRTUAL_SIZE}: {error}")))?;
        Ok(BackupInfo {
            namespace: namespace.to_string(),
            name: name.to_string(),
            created: field(ANNOTATION_CREATED)?.clone(),
            disk_virtual_size,
            definition,
        })
    }
}

/// The definition as it travels in a backup: no status, no cluster-assigned metadata (uid,
/// resourceVersion, generation, creationTimestamp, managedFields, ownerReferences, finalizers),
/// as KubeVirt strips them from its exports.
pub fn portable_definition(app: &VirtualMachineApp) -> VirtualMachineApp {
    let mut app = app.clone();
    app.status = None;
    let metadata = &mut app.metadata;
    metadata.uid = None;
    metadata.resource_version = None;
    metadata.generation = None;
    metadata.creation_timestamp = None;
    metadata.deletion_timestamp = None;
    metadata.deletion_grace_period_seconds = None;
    metadata.managed_fields = None;
    metadata.owner_references = None;
    metadata.finalizers = None;
    metadata.self_link = None;
    app
}

/// A point in time as (RFC 3339 `2026-11-24T20:50:00Z`, tag form `20261124T205000Z`), UTC.
pub fn utc_timestamp(time: SystemTime) -> (String, String) {
    let seconds = time
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    let days = i64::try_from(seconds / 86_400).unwrap_or(0);
    let second_of_day = seconds % 86_400;
    let (hour, minute, second) = (second_of_day / 3600, second_of_day / 60 % 60, second_of_day % 60);
    // Howard Hinnant's days-to-civil conversion (proleptic Gregorian calendar).
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (
        format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z"),
        format!("{year:04}{month:02}{day:02}T{hour:02}{minute:02}{second:02}Z"),
    )
}

/// The tag of a backup of VM `name` taken at `created` (tag form of [`utc_timestamp`]).
pub fn backup_tag(name: &str, created_tag_form: &str) -> String {
    format!("{name}-{created_tag_form}")
}

/// Whether `tag` has the shape of a backup tag (`<name>-YYYYMMDDTHHMMSSZ`); returns the VM name.
pub fn backup_tag_vm(tag: &str) -> Option<&str> {
    let (name, time) = tag.rsplit_once('-')?;
    let bytes = time.as_bytes();
    let shaped = bytes.len() == 16
        && bytes[8] == b'T'
        && bytes[15] == b'Z'
        && bytes[..8].iter().chain(&bytes[9..15]).all(u8::is_ascii_digit);
    (shaped && !name.is_empty()).then_some(name)
}

/// What [`build_backup_layout`] produced.
#[derive(Debug, Clone)]
pub struct BuiltBackup {
    /// The containerDisk image as built (its manifest descriptor is the one before annotating).
    pub image: BuiltImage,
    /// The annotated manifest: its digest is the backup's digest.
    pub manifest_digest: String,
    /// The annotated manifest's size.
    pub manifest_size: u64,
}

/// Builds the backup image of `disk` (a flattened qcow2 or raw disk) as an OCI image layout at
/// `dest` (which must not exist): the containerDisk image with `image_options` (its `tag` and
/// `reference` name the image in `index.json`), its manifest annotated with `info`.
pub fn build_backup_layout(
    disk: &Path,
    dest: &Path,
    info: &BackupInfo,
    image_options: &ImageOptions,
    progress: &mut dyn Progress,
) -> Result<BuiltBackup> {
    let image = build_layout(disk, dest, image_options, progress)?;
    let blobs = dest.join("blobs").join("sha256");
    let old_manifest_path = blobs.join(image.manifest.digest.trim_start_matches("sha256:"));
    let manifest_bytes = std::fs::read(&old_manifest_path).map_err(|source| BackupError::Io {
        action: "read",
        path: old_manifest_path.clone(),
        source,
    })?;
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&manifest_bytes).map_err(|source| BackupError::Json {
            action: "parse the built manifest".to_string(),
            source,
        })?;
    let annotations = info.annotations()?;
    if let Some(object) = manifest.as_object_mut() {
        object.insert(
            "annotations".to_string(),
            serde_json::to_value(&annotations).map_err(|source| BackupError::Json {
                action: "encode the annotations".to_string(),
                source,
            })?,
        );
        if let Some(layer) = object
            .get_mut("layers")
            .and_then(serde_json::Value::as_array_mut)
            .and_then(|layers| layers.first_mut())
            .and_then(serde_json::Value::as_object_mut)
        {
            layer.insert(
                "annotations".to_string(),
                serde_json::json!({ ANNOTATION_DISK_NAME: ROOT_DISK_NAME }),
            );
        }
    }
    let annotated = serde_json::to_vec(&manifest).map_err(|source| BackupError::Json {
        action: "encode the manifest".to_string(),
        source,
    })?;
    let manifest_digest = sha256_digest(&annotated);
    let new_manifest_path = blobs.join(manifest_digest.trim_start_matches("sha256:"));
    write_atomically(&new_manifest_path, &annotated)?;
    let name = image_options
        .reference
        .clone()
        .unwrap_or_else(|| image_options.tag.clone());
    let mut index_entry = serde_json::json!({
        "mediaType": MEDIA_TYPE_MANIFEST,
        "digest": manifest_digest,
        "size": annotated.len(),
        "annotations": { ANNOTATION_REF_NAME: name },
    });
    if let Some(reference) = &image_options.reference
        && let Some(entry_annotations) = index_entry
            .get_mut("annotations")
            .and_then(serde_json::Value::as_object_mut)
    {
        entry_annotations.insert(
            crate::ANNOTATION_CONTAINERD_IMAGE_NAME.to_string(),
            serde_json::Value::String(reference.clone()),
        );
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": [index_entry],
    });
    let index_bytes = serde_json::to_vec(&index).map_err(|source| BackupError::Json {
        action: "encode index.json".to_string(),
        source,
    })?;
    write_atomically(&dest.join("index.json"), &index_bytes)?;
    // The unannotated manifest is no longer named by anything.
    std::fs::remove_file(&old_manifest_path).map_err(|source| BackupError::Io {
        action: "remove",
        path: old_manifest_path,
        source,
    })?;
    Ok(BuiltBackup {
        image,
        manifest_digest,
        manifest_size: annotated.len() as u64,
    })
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".partial");
    let temporary = PathBuf::from(temporary);
    std::fs::write(&temporary, bytes)
        .and_then(|()| std::fs::rename(&temporary, path))
        .map_err(|source| {
            let _ = std::fs::remove_file(&temporary);
            BackupError::Io {
                action: "write",
                path: path.to_path_buf(),
                source,
            }
        })
}

/// One backup in a registry.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupEntry {
    /// `registry/repository:tag`.
    pub reference: String,
    /// `registry/repository@digest`: the exact, verifiable backup (what restores use).
    pub pinned_reference: String,
    /// The tag.
    pub tag: String,
    /// The manifest digest.
    pub digest: String,
    /// Bytes stored for it in the registry (manifest, config and disk layer; shared blobs count in
    /// every backup that uses them).
    pub size: u64,
    /// The compressed disk layer's digest (equal in two backups of an unchanged disk).
    pub layer_digest: String,
    /// What the backup says about itself.
    pub info: BackupInfo,
}

/// Splits `registry/repository[:tag|@digest]` into a reference for the repository.
fn repository_reference(repository: &str) -> Result<ImageReference> {
    ImageReference::parse(repository).map_err(|error| BackupError::Reference {
        reference: repository.to_string(),
        reason: error.to_string(),
    })
}

/// Reads the backup `reference` points at (`registry/repository:tag` or `…@sha256:…`): its
/// manifest, verified against the digest the reference pins or the registry reports.
pub async fn inspect_backup(reference: &str, options: &RegistryOptions) -> Result<BackupEntry> {
    let parsed = repository_reference(reference)?;
    let client = RegistryClient::new(&parsed, options, Access::Pull)?;
    let target = parsed
        .digest
        .clone()
        .or_else(|| parsed.tag.clone())
        .unwrap_or_else(|| "latest".to_string());
    read_entry(&client, &parsed, &target).await
}

async fn read_entry(client: &RegistryClient, parsed: &ImageReference, target: &str) -> Result<BackupEntry> {
    let fetched = client.get_manifest(target).await?;
    let digest = sha256_digest(&fetched.bytes);
    let location = format!("{}:{target}", parsed.name());
    let expected = if target.starts_with("sha256:") {
        Some(target.to_string())
    } else {
        fetched.digest_header.clone()
    };
    if let Some(expected) = expected
        && expected != digest
    {
        return Err(RegistryError::DigestMismatch {
            what: "manifest",
            expected,
            actual: digest,
            location,
        }
        .into());
    }
    let reference_text = if target.starts_with("sha256:") {
        format!("{}@{target}", parsed.name())
    } else {
        format!("{}:{target}", parsed.name())
    };
    let not_a_backup = |reason: String| BackupError::NotABackup {
        reference: reference_text.clone(),
        reason,
    };
    let value: serde_json::Value = serde_json::from_slice(&fetched.bytes)
        .map_err(|error| not_a_backup(format!("its manifest is not JSON: {error}")))?;
    let media_type = value
        .get("mediaType")
        .and_then(serde_json::Value::as_str)
        .or(fetched.content_type.as_deref())
        .unwrap_or_default()
        .to_string();
    if media_type != MEDIA_TYPE_MANIFEST {
        return Err(not_a_backup(format!(
            "it is a {media_type:?}, not an OCI image manifest"
        )));
    }
    let manifest: RawManifest = serde_json::from_value(value.clone())
        .map_err(|error| not_a_backup(format!("its manifest does not parse: {error}")))?;
    let annotations: BTreeMap<String, String> = value
        .get("annotations")
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .map_err(|error| not_a_backup(format!("its annotations are not strings: {error}")))?
        .unwrap_or_default();
    let info = BackupInfo::from_annotations(&annotations, &reference_text)?;
    let [layer] = manifest.layers.as_slice() else {
        return Err(not_a_backup(format!(
            "it has {} layers; a containerDisk has exactly one",
            manifest.layers.len()
        )));
    };
    let tag = if target.starts_with("sha256:") {
        String::new()
    } else {
        target.to_string()
    };
    Ok(BackupEntry {
        reference: reference_text.clone(),
        pinned_reference: format!("{}@{digest}", parsed.name()),
        tag,
        size: fetched.bytes.len() as u64 + manifest.config.size + layer.size,
        layer_digest: layer.digest.clone(),
        digest,
        info,
    })
}

/// The complete paddock backups in `repository` (`registry/repository`; a tag or digest in it is
/// ignored), oldest first. Tags that do not look like backups, images that are not paddock
/// backups, and backups whose blobs the registry lacks are left out.
pub async fn list_backups(repository: &str, options: &RegistryOptions) -> Result<Vec<BackupEntry>> {
    let parsed = repository_reference(repository)?;
    let client = RegistryClient::new(&parsed, options, Access::Pull)?;
    let tags = match list_tags(&client).await {
        Ok(tags) => tags,
        // A repository nothing was pushed to has no tags (docker-registry answers 404).
        Err(RegistryError::NotFound { .. }) => Vec::new(),
        Err(error) => return Err(error.into()),
    };
    let mut entries = Vec::new();
    for tag in tags.iter().filter(|tag| backup_tag_vm(tag).is_some()) {
        let entry = match read_entry(&client, &parsed, tag).await {
            Ok(entry) => entry,
            Err(BackupError::NotABackup { .. }) => continue,
            // Deleted between listing and reading.
            Err(BackupError::Registry(RegistryError::NotFound { .. })) => continue,
            Err(error) => return Err(error),
        };
        let fetched = client.get_manifest(&entry.digest).await?;
        let manifest: RawManifest =
            serde_json::from_slice(&fetched.bytes).map_err(|source| BackupError::Json {
                action: format!("parse the manifest of {}", entry.reference),
                source,
            })?;
        let mut complete = true;
        for blob in std::iter::once(&manifest.config).chain(&manifest.layers) {
            if !client.blob_exists(&blob.digest).await? {
                complete = false;
                break;
            }
        }
        if complete {
            entries.push(entry);
        }
    }
    entries.sort_by(|left, right| (&left.info.created, &left.tag).cmp(&(&right.info.created, &right.tag)));
    Ok(entries)
}

/// Checks that `repository` can take a backup now: the registry answers (over https, or http
/// with `insecure`) and grants push access. One tag-list request, so a caller can refuse a backup
/// before spending minutes on the disk copy. A repository nothing was pushed to yet is fine.
pub async fn check_repository(repository: &str, options: &RegistryOptions) -> Result<()> {
    let parsed = repository_reference(repository)?;
    let client = RegistryClient::new(&parsed, options, Access::Push)?;
    match list_tags(&client).await {
        Ok(_) | Err(RegistryError::NotFound { .. }) => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Every tag of the repository, following `Link` pagination.
async fn list_tags(client: &RegistryClient) -> Result<Vec<String>, RegistryError> {
    #[derive(serde::Deserialize)]
    struct TagList {
        #[serde(default)]
        tags: Option<Vec<String>>,
    }
    // `<base>/v2/<repository>/tags/list`, from the blob URL the client knows how to build.
    let blob_url = client.blob_url("sha256:0")?;
    let mut url = blob_url
        .join("../tags/list")
        .map_err(|error| RegistryError::Protocol {
            registry: client.registry().to_string(),
            action: "list tags".to_string(),
            reason: format!("cannot build the tags url: {error}"),
        })?;
    let mut tags = Vec::new();
    loop {
        let (response, action) = client.send(Method::GET, &url, |request| request).await?;
        let response = client.check(&action, response, &[StatusCode::OK]).await?;
        let next = response
            .headers()
            .get(reqwest::header::LINK)
            .and_then(|value| value.to_str().ok())
            .and_then(|link| next_link(link, &url));
        let body = response
            .bytes()
            .await
            .map_err(|error| client.stream_error(&action, error))?;
        let page: TagList = serde_json::from_slice(&body).map_err(|source| RegistryError::Json {
            what: format!("the answer to {action}"),
            source,
        })?;
        tags.extend(page.tags.unwrap_or_default());
        match next {
            Some(next) => url = next,
            None => return Ok(tags),
        }
    }
}

/// The `rel="next"` target of a `Link` header, resolved against `base`.
fn next_link(link: &str, base: &Url) -> Option<Url> {
    link.split(',').find_map(|part| {
        let (target, parameters) = part.split_once(';')?;
        if !parameters.contains("rel=\"next\"") && !parameters.contains("rel=next") {
            return None;
        }
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        base.join(target).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_civil_time() {
        let at = |seconds: u64| utc_timestamp(UNIX_EPOCH + std::time::Duration::from_secs(seconds));
        assert_eq!(at(0).0, "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400).0, "2000-02-29T00:00:00Z");
        assert_eq!(
            at(1_795_553_400),
            ("2026-11-24T20:50:00Z".to_string(), "20261124T205000Z".to_string())
        );
    }

    #[test]
    fn backup_tags_are_recognised() {
        let tag = backup_tag("web-1", "20261124T205000Z");
        assert_eq!(tag, "web-1-20261124T205000Z");
        assert_eq!(backup_tag_vm(&tag), Some("web-1"));
        assert_eq!(backup_tag_vm("latest"), None);
        assert_eq!(backup_tag_vm("web-20261124T2050Z"), None);
        assert_eq!(backup_tag_vm("-20261124T205000Z"), None);
    }

    #[test]
    fn next_links_resolve_against_the_request() {
        let base = Url::parse("http://127.0.0.1:5000/v2/vms/tags/list").unwrap();
        let next = next_link("</v2/vms/tags/list?last=a&n=2>; rel=\"next\"", &base).unwrap();
        assert_eq!(next.as_str(), "http://127.0.0.1:5000/v2/vms/tags/list?last=a&n=2");
        assert!(next_link("</x>; rel=\"prev\"", &base).is_none());
    }

    #[test]
    fn a_built_backup_is_a_containerdisk_with_the_definition_in_its_manifest() {
        let directory = tempfile::tempdir().unwrap();
        let disk = directory.path().join("disk.raw");
        std::fs::write(&disk, vec![3u8; 70_000]).unwrap();
        let definition: VirtualMachineApp = serde_json::from_value(serde_json::json!({
            "apiVersion": "paddock.dev/v1alpha1",
            "kind": "VirtualMachineApp",
            "metadata": {"name": "web", "namespace": "team", "uid": "1234"},
            "spec": {"image": {"containerDisk": "file:/x.qcow2"}},
        }))
        .unwrap();
        let info = BackupInfo {
            namespace: "team".into(),
            name: "web".into(),
            created: "2026-11-24T20:50:00Z".into(),
            disk_virtual_size: 70_000,
            definition: portable_definition(&definition),
        };
        let options = ImageOptions {
            tag: "web-20261124T205000Z".into(),
            ..ImageOptions::default()
        };
        let plain = build_layout(
            &disk,
            &directory.path().join("plain"),
            &options,
            &mut crate::NoProgress,
        )
        .unwrap();
        let layout = directory.path().join("backup");
        let built = build_backup_layout(&disk, &layout, &info, &options, &mut crate::NoProgress).unwrap();
        // Same layer and config as packaging the disk; only the manifest differs.
        assert_eq!(built.image.layer, plain.layer);
        assert_eq!(built.image.config, plain.config);
        assert_ne!(built.manifest_digest, plain.manifest.digest);
        let manifest_path = layout
            .join("blobs/sha256")
            .join(built.manifest_digest.trim_start_matches("sha256:"));
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
        let annotations: BTreeMap<String, String> =
            serde_json::from_value(manifest["annotations"].clone()).unwrap();
        let read = BackupInfo::from_annotations(&annotations, "test").unwrap();
        assert_eq!(
            serde_json::to_value(&read).unwrap(),
            serde_json::to_value(&info).unwrap()
        );
        assert_eq!(read.definition.metadata.uid, None);
        assert_eq!(
            manifest["layers"][0]["annotations"][ANNOTATION_DISK_NAME],
            ROOT_DISK_NAME
        );
        // The layout extracts like any containerDisk, and names only the annotated manifest.
        let extracted = crate::extract_disk(&layout, &directory.path().join("out.raw")).unwrap();
        assert_eq!(
            std::fs::read(extracted.path).unwrap(),
            std::fs::read(&disk).unwrap()
        );
        assert!(
            !layout
                .join("blobs/sha256")
                .join(plain.manifest.digest.trim_start_matches("sha256:"))
                .exists()
        );
    }
}
