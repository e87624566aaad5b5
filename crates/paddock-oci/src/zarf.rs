//! The Zarf package definition (`zarf.yaml`, ZarfPackageConfig v1alpha1) that carries a packaged VM.
//!
//! Role: a pure builder. Given where the containerDisk image is (an OCI archive in the package
//! directory, or a registry Zarf pulls from at `zarf package create` time) and the file holding the
//! generated VirtualMachineApp, it returns the package definition; the caller writes the files.
//!
//! Contract: the output validates against Zarf v0.84.0's JSON schema (checked in tests with the
//! schema from `shared/schemas`), names follow Zarf's `^[a-z0-9][a-z0-9-]*$`, and the component is
//! `required`, so deploying the package always deploys the VM. At deploy time Zarf pushes the image
//! into its in-cluster registry; the paddock operator points the VM's DataVolume at that copy.

use serde::Serialize;

/// Where `zarf package create` gets the containerDisk image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZarfImageSource {
    /// An OCI archive (`paddock package --archive`) inside the package directory: nothing is pulled,
    /// so the package builds offline. `path` is relative to the `zarf.yaml`.
    Archive {
        /// The archive path, relative to the package directory.
        path: String,
        /// The full references of the images in the archive's `index.json` to take.
        images: Vec<String>,
    },
    /// Images Zarf pulls from their registries while creating the package.
    Registry(Vec<String>),
}

/// What goes into the package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZarfPackageInput {
    /// Package name (`metadata.name`).
    pub name: String,
    /// One-line description.
    pub description: String,
    /// Package version (`metadata.version`), e.g. the image tag.
    pub version: Option<String>,
    /// Architecture of the package (`amd64`, `arm64`).
    pub architecture: String,
    /// Namespace the manifests are deployed to (Zarf creates it).
    pub namespace: String,
    /// The component's name.
    pub component: String,
    /// The containerDisk image(s).
    pub images: ZarfImageSource,
    /// Manifest files (VirtualMachineApps), relative to the package directory.
    pub manifest_files: Vec<String>,
}

/// `zarf.yaml`: a ZarfPackageConfig.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ZarfPackageConfig {
    /// Always `zarf.dev/v1alpha1`.
    #[serde(rename = "apiVersion")]
    pub api_version: &'static str,
    /// Always `ZarfPackageConfig`.
    pub kind: &'static str,
    /// Package metadata.
    pub metadata: ZarfMetadata,
    /// The package's components (one, for the VM).
    pub components: Vec<ZarfComponent>,
}

/// `metadata` of a ZarfPackageConfig.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ZarfMetadata {
    /// Package name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Architecture.
    pub architecture: String,
}

/// One component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ZarfComponent {
    /// Component name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Always deployed.
    pub required: bool,
    /// Images pulled from registries.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
    /// Images taken from OCI archives.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub image_archives: Vec<ZarfImageArchive>,
    /// Raw manifests to apply.
    pub manifests: Vec<ZarfManifest>,
}

/// An `imageArchives` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ZarfImageArchive {
    /// Archive path, relative to the package directory.
    pub path: String,
    /// Image references inside the archive.
    pub images: Vec<String>,
}

/// A `manifests` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ZarfManifest {
    /// Name of this manifest set.
    pub name: String,
    /// Namespace to deploy into.
    pub namespace: String,
    /// Files, relative to the package directory.
    pub files: Vec<String>,
}

/// A package input Zarf would refuse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ZarfError {
    /// A name does not match Zarf's pattern.
    #[error(
        "invalid zarf {what} name {name:?}: zarf needs lowercase letters, digits and '-', starting with a letter or digit; pass --zarf-name"
    )]
    InvalidName {
        /// Which name (package or component).
        what: &'static str,
        /// The rejected name.
        name: String,
    },
    /// No image or no manifest.
    #[error(
        "a zarf package for a VM needs at least one image and one manifest file; this is a bug in paddock"
    )]
    Empty,
}

/// Zarf's name pattern `^[a-z0-9][a-z0-9-]*$`.
pub fn is_zarf_name(name: &str) -> bool {
    let mut characters = name.chars();
    characters
        .next()
        .is_some_and(|first| first.is_ascii_lowercase() || first.is_ascii_digit())
        && characters
            .all(|character| character.is_ascii_lowercase() || character.is_ascii_digit() || character == '-')
}

/// Builds the package definition.
pub fn package_config(input: &ZarfPackageInput) -> Result<ZarfPackageConfig, ZarfError> {
    for (what, name) in [("package", &input.name), ("component", &input.component)] {
        if !is_zarf_name(name) {
            return Err(ZarfError::InvalidName {
                what,
                name: name.clone(),
            });
        }
    }
    let (images, image_archives) = match &input.images {
        ZarfImageSource::Archive { path, images } => (
            Vec::new(),
            vec![ZarfImageArchive {
                path: path.clone(),
                images: images.clone(),
            }],
        ),
        ZarfImageSource::Registry(images) => (images.clone(), Vec::new()),
    };
    if (images.is_empty() && image_archives.iter().all(|archive| archive.images.is_empty()))
        || input.manifest_files.is_empty()
    {
        return Err(ZarfError::Empty);
    }
    Ok(ZarfPackageConfig {
        api_version: "zarf.dev/v1alpha1",
        kind: "ZarfPackageConfig",
        metadata: ZarfMetadata {
            name: input.name.clone(),
            description: input.description.clone(),
            version: input.version.clone(),
            architecture: input.architecture.clone(),
        },
        components: vec![ZarfComponent {
            name: input.component.clone(),
            description: format!("the VM {} and its disk image", input.component),
            required: true,
            images,
            image_archives,
            manifests: vec![ZarfManifest {
                name: format!("{}-vm", input.component),
                namespace: input.namespace.clone(),
                files: input.manifest_files.clone(),
            }],
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> ZarfPackageInput {
        ZarfPackageInput {
            name: "tiny-vm".into(),
            description: "a tiny VM".into(),
            version: Some("1.0".into()),
            architecture: "amd64".into(),
            namespace: "vms".into(),
            component: "tiny".into(),
            images: ZarfImageSource::Archive {
                path: "images/tiny.tar".into(),
                images: vec!["registry.example/vms/tiny:1.0".into()],
            },
            manifest_files: vec!["manifests/tiny.yaml".into()],
        }
    }

    #[test]
    fn archive_component() {
        let config = serde_json::to_value(package_config(&input()).unwrap()).unwrap();
        assert_eq!(config["kind"], "ZarfPackageConfig");
        let component = &config["components"][0];
        assert_eq!(component["required"], true);
        assert_eq!(component["imageArchives"][0]["path"], "images/tiny.tar");
        assert!(component.get("images").is_none());
        assert_eq!(component["manifests"][0]["files"][0], "manifests/tiny.yaml");
    }

    #[test]
    fn registry_component() {
        let config = package_config(&ZarfPackageInput {
            images: ZarfImageSource::Registry(vec!["registry.example/vms/tiny:1.0".into()]),
            ..input()
        })
        .unwrap();
        assert_eq!(config.components[0].images, ["registry.example/vms/tiny:1.0"]);
        assert!(config.components[0].image_archives.is_empty());
    }

    #[test]
    fn refuses_names_zarf_refuses() {
        for bad in ["Tiny", "-tiny", "", "tiny_vm"] {
            let error = package_config(&ZarfPackageInput {
                name: bad.into(),
                ..input()
            })
            .unwrap_err();
            assert!(
                matches!(error, ZarfError::InvalidName { what: "package", .. }),
                "{bad}"
            );
        }
        assert!(is_zarf_name("0-tiny-vm"));
    }
}
