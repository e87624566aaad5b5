//! Zarf's image reference rewrite, computed the way Zarf v0.84 computes it, so paddock can predict the
//! reference an image has once `zarf package deploy` has pushed it to the Zarf registry (and the
//! reference the Zarf agent rewrites pods to).
//!
//! The rule: normalise the reference (docker.io, `library/`, `latest`); drop its registry; put the
//! Zarf registry in front; and, for tagged references, append `-zarf-<crc32>` to the tag, where the
//! checksum is the IEEE CRC-32, in decimal, of the normalised name without tag (`docker.io/library/nginx`)
//! — it keeps two images of the same path from different registries apart. Digest references keep
//! their digest and get no checksum (a digest already names one image), and a tag beside a digest is
//! dropped. A reference whose registry the target already starts with is returned unchanged, so a
//! rewrite applied twice changes nothing.

use crate::image_reference::{ImageReference, ImageReferenceError};

/// The reference of `reference` in the Zarf registry at `target` (e.g. `127.0.0.1:31999`), with Zarf's
/// checksum tag: what the Zarf agent rewrites pod images to.
pub fn zarf_image_reference(target: &str, reference: &str) -> Result<String, ImageReferenceError> {
    transform(target, reference, true)
}

/// The same without the checksum suffix: the second name `zarf package deploy` pushes every image under.
pub fn zarf_image_reference_without_checksum(
    target: &str,
    reference: &str,
) -> Result<String, ImageReferenceError> {
    transform(target, reference, false)
}

fn transform(target: &str, reference: &str, with_checksum: bool) -> Result<String, ImageReferenceError> {
    // Zarf accepts (and drops) an `oci://` scheme; other schemes are errors.
    let image = ImageReference::parse(reference.strip_prefix("oci://").unwrap_or(reference))?;
    if target.starts_with(&image.registry) {
        return Ok(reference.to_owned());
    }
    let target = target.trim_end_matches('/');
    if let Some(digest) = &image.digest {
        return Ok(format!("{target}/{}@{digest}", image.repository));
    }
    let tag = image.tag.as_deref().unwrap_or("latest");
    if with_checksum {
        let checksum = crc32fast::hash(image.name().as_bytes());
        Ok(format!("{target}/{}:{tag}-zarf-{checksum}", image.repository))
    } else {
        Ok(format!("{target}/{}:{tag}", image.repository))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Zarf v0.84.0's own test vectors (`src/pkg/transform/image_test.go`), target `gitlab.com/project`.
    const ZARF_VECTORS: &[(&str, &str, &str)] = &[
        (
            "nginx",
            "gitlab.com/project/library/nginx:latest-zarf-3793515731",
            "gitlab.com/project/library/nginx:latest",
        ),
        (
            "nginx:1.23.3",
            "gitlab.com/project/library/nginx:1.23.3-zarf-3793515731",
            "gitlab.com/project/library/nginx:1.23.3",
        ),
        (
            "zarf-dev/zarf-agent:v0.22.1",
            "gitlab.com/project/zarf-dev/zarf-agent:v0.22.1-zarf-2183797434",
            "gitlab.com/project/zarf-dev/zarf-agent:v0.22.1",
        ),
        (
            "zarf-dev/zarf-agent@sha256:84605f731c6a18194794c51e70021c671ab064654b751aa57e905bce55be13de",
            "gitlab.com/project/zarf-dev/zarf-agent@sha256:84605f731c6a18194794c51e70021c671ab064654b751aa57e905bce55be13de",
            "gitlab.com/project/zarf-dev/zarf-agent@sha256:84605f731c6a18194794c51e70021c671ab064654b751aa57e905bce55be13de",
        ),
        (
            "busybox:latest@sha256:3fbc632167424a6d997e74f52b878d7cc478225cffac6bc977eedfe51c7f4e79",
            "gitlab.com/project/library/busybox@sha256:3fbc632167424a6d997e74f52b878d7cc478225cffac6bc977eedfe51c7f4e79",
            "gitlab.com/project/library/busybox@sha256:3fbc632167424a6d997e74f52b878d7cc478225cffac6bc977eedfe51c7f4e79",
        ),
        (
            "ghcr.io/stefanprodan/podinfo:6.3.3",
            "gitlab.com/project/stefanprodan/podinfo:6.3.3-zarf-2985051089",
            "gitlab.com/project/stefanprodan/podinfo:6.3.3",
        ),
        (
            "registry1.dso.mil/ironbank/opensource/zarf-dev/zarf/zarf-agent:v0.25.0",
            "gitlab.com/project/ironbank/opensource/zarf-dev/zarf/zarf-agent:v0.25.0-zarf-1211467612",
            "gitlab.com/project/ironbank/opensource/zarf-dev/zarf/zarf-agent:v0.25.0",
        ),
        (
            "gitlab.com/project/gitea/gitea:1.19.3-rootless-zarf-3431384023",
            "gitlab.com/project/gitea/gitea:1.19.3-rootless-zarf-3431384023",
            "gitlab.com/project/gitea/gitea:1.19.3-rootless-zarf-3431384023",
        ),
        (
            "oci://10.43.130.183:5000/stefanprodan/manifests/podinfo",
            "gitlab.com/project/stefanprodan/manifests/podinfo:latest-zarf-531355090",
            "gitlab.com/project/stefanprodan/manifests/podinfo:latest",
        ),
    ];

    #[test]
    fn matches_zarfs_own_test_vectors() {
        for (input, with_checksum, without_checksum) in ZARF_VECTORS {
            assert_eq!(
                zarf_image_reference("gitlab.com/project", input).as_deref(),
                Ok(*with_checksum),
                "{input}"
            );
            assert_eq!(
                zarf_image_reference_without_checksum("gitlab.com/project", input).as_deref(),
                Ok(*without_checksum),
                "{input}"
            );
        }
    }

    /// Zarf v0.84.0's agent pod-hook vectors (`pods_test.go`), target `127.0.0.1:31999`.
    #[test]
    fn matches_the_zarf_agents_pod_rewrites() {
        let target = "127.0.0.1:31999";
        for (input, expected) in [
            ("nginx", "127.0.0.1:31999/library/nginx:latest-zarf-3793515731"),
            (
                "busybox",
                "127.0.0.1:31999/library/busybox:latest-zarf-2140033595",
            ),
            ("alpine", "127.0.0.1:31999/library/alpine:latest-zarf-1117969859"),
            (
                "quay.io/crio/artifact:v1",
                "127.0.0.1:31999/crio/artifact:v1-zarf-2568457951",
            ),
            (
                "127.0.0.1:31999/library/nginx:latest-zarf-3793515731",
                "127.0.0.1:31999/library/nginx:latest-zarf-3793515731",
            ),
            (
                "quay.io/containerdisks/fedora:40",
                "127.0.0.1:31999/containerdisks/fedora:40-zarf-4021467769",
            ),
            (
                "index.docker.io/nginx",
                "127.0.0.1:31999/library/nginx:latest-zarf-3793515731",
            ),
            (
                "docker.io/nginx:1.25",
                "127.0.0.1:31999/library/nginx:1.25-zarf-3793515731",
            ),
        ] {
            assert_eq!(
                zarf_image_reference(target, input).as_deref(),
                Ok(expected),
                "{input}"
            );
        }
    }

    #[test]
    fn refuses_what_zarf_refuses() {
        for input in [
            "i am not a ref at all",
            "http://urls.are/not/refs",
            "docker://nginx",
        ] {
            assert!(zarf_image_reference("127.0.0.1:31999", input).is_err(), "{input}");
        }
    }
}
