//! OCI image references (`registry.example.com:5000/vms/debian:12@sha256:…`), parsed and normalised the
//! way Docker, containerd and Zarf read them: no registry means `docker.io`, a one-component Docker Hub
//! path gets `library/`, and no tag and no digest means `:latest`.

use std::fmt;

use thiserror::Error;

/// Docker Hub's canonical registry name.
pub const DOCKER_HUB: &str = "docker.io";

/// Why a string is not an image reference.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ImageReferenceError {
    /// The reference is empty.
    #[error("the image reference is empty: give one such as registry.example.com/vms/debian:12")]
    Empty,
    /// A scheme such as `docker://` was included.
    #[error("'{0}' has a scheme: write the image reference without docker:// or oci://")]
    HasScheme(String),
    /// A path component has characters OCI does not allow.
    #[error(
        "'{reference}' has an invalid repository path component '{component}': use lowercase letters, digits and single '.', '_', '__' or '-' separators"
    )]
    InvalidPath {
        /// The whole reference.
        reference: String,
        /// The offending component.
        component: String,
    },
    /// The tag is malformed.
    #[error(
        "'{reference}' has an invalid tag '{tag}': tags are up to 128 letters, digits, '_', '.' or '-', not starting with '.' or '-'"
    )]
    InvalidTag {
        /// The whole reference.
        reference: String,
        /// The offending tag.
        tag: String,
    },
    /// The digest is malformed.
    #[error("'{reference}' has an invalid digest '{digest}': expected sha256:<64 lowercase hex digits>")]
    InvalidDigest {
        /// The whole reference.
        reference: String,
        /// The offending digest.
        digest: String,
    },
}

/// A parsed, normalised image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageReference {
    /// The registry host, with port if any (`docker.io` when none was given).
    pub registry: String,
    /// The repository path within the registry, e.g. `library/debian` or `vms/debian`.
    pub repository: String,
    /// The tag, if one was given (`latest` is filled in only when neither tag nor digest was).
    pub tag: Option<String>,
    /// The digest, if one was given, e.g. `sha256:…`.
    pub digest: Option<String>,
}

impl ImageReference {
    /// Parses and normalises a reference.
    pub fn parse(reference: &str) -> Result<Self, ImageReferenceError> {
        let reference = reference.trim();
        if reference.is_empty() {
            return Err(ImageReferenceError::Empty);
        }
        if reference.contains("://") {
            return Err(ImageReferenceError::HasScheme(reference.to_owned()));
        }
        let (name_and_tag, digest) = match reference.split_once('@') {
            Some((name, digest)) => (name, Some(digest)),
            None => (reference, None),
        };
        if let Some(digest) = digest {
            validate_digest(reference, digest)?;
        }
        // The tag follows the last ':' that comes after the last '/', so a registry port is not a tag.
        let last_slash = name_and_tag.rfind('/').map_or(0, |index| index + 1);
        let (name, tag) = match name_and_tag[last_slash..].rfind(':') {
            Some(colon) => {
                let colon = last_slash + colon;
                (&name_and_tag[..colon], Some(&name_and_tag[colon + 1..]))
            }
            None => (name_and_tag, None),
        };
        if let Some(tag) = tag {
            validate_tag(reference, tag)?;
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest)) if first.contains('.') || first.contains(':') || first == "localhost" => {
                (first.to_owned(), rest.to_owned())
            }
            _ => (DOCKER_HUB.to_owned(), name.to_owned()),
        };
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB.to_owned()
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        for component in repository.split('/') {
            if !valid_path_component(component) {
                return Err(ImageReferenceError::InvalidPath {
                    reference: reference.to_owned(),
                    component: component.to_owned(),
                });
            }
        }
        let tag = match (tag, digest) {
            (None, None) => Some("latest".to_owned()),
            (tag, _) => tag.map(str::to_owned),
        };
        Ok(ImageReference {
            registry,
            repository,
            tag,
            digest: digest.map(str::to_owned),
        })
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}", self.name())?;
        if let Some(tag) = &self.tag {
            write!(formatter, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(formatter, "@{digest}")?;
        }
        Ok(())
    }
}

fn valid_path_component(component: &str) -> bool {
    // [a-z0-9]+ joined by '.', '_', '__' or any run of '-'.
    let bytes = component.as_bytes();
    if bytes.is_empty() || !is_alphanumeric(bytes[0]) || !is_alphanumeric(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        if is_alphanumeric(byte) {
            index += 1;
            continue;
        }
        let separator_start = index;
        while index < bytes.len() && !is_alphanumeric(bytes[index]) {
            index += 1;
        }
        let separator = &component[separator_start..index];
        let allowed =
            separator == "." || separator == "_" || separator == "__" || separator.bytes().all(|b| b == b'-');
        if !allowed {
            return false;
        }
    }
    true
}

fn is_alphanumeric(byte: u8) -> bool {
    byte.is_ascii_lowercase() || byte.is_ascii_digit()
}

fn validate_tag(reference: &str, tag: &str) -> Result<(), ImageReferenceError> {
    let valid = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(ImageReferenceError::InvalidTag {
            reference: reference.to_owned(),
            tag: tag.to_owned(),
        })
    }
}

fn validate_digest(reference: &str, digest: &str) -> Result<(), ImageReferenceError> {
    let valid = match digest.split_once(':') {
        Some(("sha256", hex)) => {
            hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        }
        Some(("sha512", hex)) => {
            hex.len() == 128
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        }
        _ => false,
    };
    if valid {
        Ok(())
    } else {
        Err(ImageReferenceError::InvalidDigest {
            reference: reference.to_owned(),
            digest: digest.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parse(reference: &str) -> ImageReference {
        ImageReference::parse(reference).unwrap()
    }

    #[test]
    fn normalises_docker_hub_references() {
        assert_eq!(parse("nginx").to_string(), "docker.io/library/nginx:latest");
        assert_eq!(parse("nginx:1.25").to_string(), "docker.io/library/nginx:1.25");
        assert_eq!(
            parse("defenseunicorns/zarf:v1").to_string(),
            "docker.io/defenseunicorns/zarf:v1"
        );
        assert_eq!(
            parse("index.docker.io/library/alpine").to_string(),
            "docker.io/library/alpine:latest"
        );
    }

    #[test]
    fn keeps_registry_ports_apart_from_tags() {
        let reference = parse("127.0.0.1:5000/vms/debian");
        assert_eq!(reference.registry, "127.0.0.1:5000");
        assert_eq!(reference.repository, "vms/debian");
        assert_eq!(reference.tag.as_deref(), Some("latest"));
        assert_eq!(parse("localhost/vm:1").registry, "localhost");
    }

    #[test]
    fn keeps_digests_and_adds_no_tag_to_them() {
        let reference = parse(&format!("quay.io/containerdisks/fedora@{DIGEST}"));
        assert_eq!(reference.tag, None);
        assert_eq!(reference.digest.as_deref(), Some(DIGEST));
        let both = parse(&format!("quay.io/containerdisks/fedora:40@{DIGEST}"));
        assert_eq!(both.tag.as_deref(), Some("40"));
        assert_eq!(
            both.to_string(),
            format!("quay.io/containerdisks/fedora:40@{DIGEST}")
        );
    }

    #[test]
    fn rejects_malformed_references_with_advice() {
        assert_eq!(ImageReference::parse(" "), Err(ImageReferenceError::Empty));
        assert!(matches!(
            ImageReference::parse("docker://nginx"),
            Err(ImageReferenceError::HasScheme(_))
        ));
        assert!(matches!(
            ImageReference::parse("quay.io/Fedora:40"),
            Err(ImageReferenceError::InvalidPath { .. })
        ));
        assert!(matches!(
            ImageReference::parse("quay.io/fedora:-40"),
            Err(ImageReferenceError::InvalidTag { .. })
        ));
        assert!(matches!(
            ImageReference::parse("quay.io/fedora@sha256:abc"),
            Err(ImageReferenceError::InvalidDigest { .. })
        ));
    }
}
