//! Reading the JSON documents of images (manifests, image indexes, descriptors) and digests.
//!
//! Role: shared by push, pull and extract. The documents are parsed only as far as paddock needs
//! them (descriptors, platforms); the bytes pushed or stored are always the original bytes, so
//! digests never change. OCI and Docker schema 2 media types are both accepted; Docker schema 1 is
//! not (registries stopped serving it; containerDisks never used it).
//!
//! Contract: a digest is only ever used as a file name after [`digest_hex`] accepted it, so a
//! malicious manifest cannot point a blob path outside `blobs/sha256/`.

use std::collections::BTreeMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::{Descriptor, MEDIA_TYPE_INDEX, MEDIA_TYPE_MANIFEST, Platform};

/// Docker schema 2 image manifest.
pub(crate) const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema 2 manifest list (the Docker image index).
pub(crate) const MEDIA_TYPE_DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";

/// Manifests and indexes are small; anything larger than this is refused instead of buffered.
pub(crate) const MAX_MANIFEST_SIZE: u64 = 4 << 20;

/// What a manifest-like document is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DocumentKind {
    /// An image manifest (config + layers).
    Manifest,
    /// An image index (a list of manifests, one per platform).
    Index,
}

impl DocumentKind {
    /// The kind for a media type, if paddock handles it.
    pub(crate) fn of_media_type(media_type: &str) -> Option<DocumentKind> {
        match media_type {
            MEDIA_TYPE_MANIFEST | MEDIA_TYPE_DOCKER_MANIFEST => Some(DocumentKind::Manifest),
            MEDIA_TYPE_INDEX | MEDIA_TYPE_DOCKER_MANIFEST_LIST => Some(DocumentKind::Index),
            _ => None,
        }
    }
}

/// A descriptor as found in a manifest, an index or `index.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RawDescriptor {
    /// Media type; some writers omit it in `index.json`.
    #[serde(default)]
    pub(crate) media_type: String,
    /// `algorithm:hex`.
    pub(crate) digest: String,
    /// Size in bytes.
    pub(crate) size: u64,
    /// Platform of a manifest in an index.
    #[serde(default)]
    pub(crate) platform: Option<RawPlatform>,
    /// Annotations.
    #[serde(default)]
    pub(crate) annotations: BTreeMap<String, String>,
}

impl RawDescriptor {
    /// The crate's public descriptor type for this one.
    pub(crate) fn to_descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
            platform: self.platform.as_ref().map(RawPlatform::to_platform),
            annotations: self.annotations.clone(),
        }
    }
}

/// A platform as found in an index.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RawPlatform {
    /// Operating system.
    #[serde(default)]
    pub(crate) os: String,
    /// Architecture.
    #[serde(default)]
    pub(crate) architecture: String,
    /// Variant, if any.
    #[serde(default)]
    pub(crate) variant: Option<String>,
}

impl RawPlatform {
    /// The crate's public platform type.
    pub(crate) fn to_platform(&self) -> Platform {
        Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone(),
        }
    }

    /// Whether this entry serves `wanted`: os and architecture equal, and the variant equal when
    /// `wanted` names one (no variant asked means any variant, as containerd matches).
    pub(crate) fn matches(&self, wanted: &Platform) -> bool {
        self.os == wanted.os
            && self.architecture == wanted.architecture
            && (wanted.variant.is_none() || self.variant == wanted.variant)
    }
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RawManifest {
    /// Always 2.
    pub(crate) schema_version: u32,
    /// The config blob.
    pub(crate) config: RawDescriptor,
    /// The layer blobs, base first.
    #[serde(default)]
    pub(crate) layers: Vec<RawDescriptor>,
}

/// An image index (OCI index, Docker manifest list, or a layout's `index.json`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RawIndex {
    /// The listed manifests.
    #[serde(default)]
    pub(crate) manifests: Vec<RawDescriptor>,
}

/// Only the `mediaType` field, to classify a document whose descriptor does not say.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MediaTypeField {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
}

/// The media type a document declares, or the one its shape implies (`manifests` means an index).
pub(crate) fn sniff_media_type(bytes: &[u8]) -> Option<String> {
    let fields: MediaTypeField = serde_json::from_slice(bytes).ok()?;
    match (fields.media_type, fields.manifests) {
        (Some(media_type), _) => Some(media_type),
        (None, Some(_)) => Some(MEDIA_TYPE_INDEX.to_string()),
        (None, None) => Some(MEDIA_TYPE_MANIFEST.to_string()),
    }
}

/// `sha256:<hex>` of `bytes`.
pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    finish_sha256(Sha256::new_with_prefix(bytes))
}

/// `sha256:<hex>` of what `hasher` has seen.
pub(crate) fn finish_sha256(hasher: Sha256) -> String {
    let digest = hasher.finalize();
    let mut text = String::with_capacity(7 + 64);
    text.push_str("sha256:");
    for byte in digest {
        text.push(char::from(b"0123456789abcdef"[usize::from(byte >> 4)]));
        text.push(char::from(b"0123456789abcdef"[usize::from(byte & 0xf)]));
    }
    text
}

/// The hex part of a `sha256:<64 lowercase hex>` digest, or `None` for anything else.
pub(crate) fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    let valid = hex.len() == 64
        && hex
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte));
    valid.then_some(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_validated_before_use_as_file_names() {
        let good = sha256_digest(b"x");
        assert_eq!(digest_hex(&good).map(str::len), Some(64));
        assert_eq!(digest_hex("sha256:../../etc/passwd"), None);
        assert_eq!(digest_hex(&good.to_uppercase()), None);
        assert_eq!(digest_hex(&good.replace("sha256", "sha512")), None);
    }

    #[test]
    fn sniffs_documents_without_media_type() {
        assert_eq!(
            sniff_media_type(br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(),
            Some(MEDIA_TYPE_INDEX)
        );
        assert_eq!(
            sniff_media_type(br#"{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#)
                .as_deref(),
            Some(MEDIA_TYPE_DOCKER_MANIFEST)
        );
    }

    #[test]
    fn platform_matching_ignores_variant_only_when_none_is_asked() {
        let arm = RawPlatform {
            os: "linux".into(),
            architecture: "arm64".into(),
            variant: Some("v8".into()),
        };
        let mut wanted = Platform {
            os: "linux".into(),
            architecture: "arm64".into(),
            variant: None,
        };
        assert!(arm.matches(&wanted));
        wanted.variant = Some("v7".into());
        assert!(!arm.matches(&wanted));
    }
}
