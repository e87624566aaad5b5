//! The cloud-init NoCloud seed: a small VFAT disk labelled `CIDATA` holding `user-data`,
//! `meta-data` and, when given, `network-config`.
//!
//! Role: hand `spec.cloudInit` to the guest the way KubeVirt's `cloudInitNoCloud` volume does.
//!
//! Contract:
//! - `user-data` is `cloudInit.userData` verbatim; without it, a `#cloud-config` document whose
//!   `ssh_authorized_keys` lists `cloudInit.sshKeys`. When user data is given, the SSH keys go to
//!   `meta-data` as `public-keys` instead, which cloud-init installs for the default user too, so
//!   the user's document is never rewritten.
//! - `meta-data` has `instance-id` (new for every VM and clone, so first-boot configuration runs
//!   once per VM) and `local-hostname` (the VM's name).
//! - Built with mtools (`mformat`, `mcopy`), no root and no loop devices; written to a temporary
//!   file and renamed into place.

use std::path::{Path, PathBuf};

use paddock_api::app::CloudInitSpec;
use serde_json::json;

use crate::error::{Result, RuntimeError};
use crate::image::run_tool;
use crate::qemu::find_on_path;

/// The files of a NoCloud seed, in the order they are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedFiles {
    /// The `user-data` file.
    pub user_data: String,
    /// The `meta-data` file (JSON, which is YAML).
    pub meta_data: String,
    /// The `network-config` file, when network data was given.
    pub network_config: Option<String>,
}

/// Builds the seed's files from the manifest's cloud-init section.
pub fn seed_files(cloud_init: &CloudInitSpec, instance_id: &str, hostname: &str) -> Result<SeedFiles> {
    if cloud_init.user_data_secret_ref.is_some() {
        return Err(RuntimeError::Unsupported {
            message: "spec.cloudInit.userDataSecretRef: the local runtime has no Kubernetes secrets; put the user data in cloudInit.userData".to_string(),
        });
    }
    let mut meta_data = json!({"instance-id": instance_id, "local-hostname": hostname});
    let user_data = match &cloud_init.user_data {
        Some(user_data) => {
            if !cloud_init.ssh_keys.is_empty() {
                meta_data["public-keys"] = json!(cloud_init.ssh_keys);
            }
            user_data.clone()
        }
        None => {
            let mut document = String::from("#cloud-config\n");
            if !cloud_init.ssh_keys.is_empty() {
                document.push_str("ssh_authorized_keys:\n");
                for key in &cloud_init.ssh_keys {
                    // A JSON string is a valid YAML scalar, so keys need no further escaping.
                    document.push_str(&format!("  - {}\n", json!(key.trim())));
                }
            }
            document
        }
    };
    let mut meta_data =
        serde_json::to_string_pretty(&meta_data).map_err(|error| RuntimeError::InvalidSpec {
            message: format!("spec.cloudInit: cannot encode the meta-data: {error}"),
        })?;
    meta_data.push('\n');
    Ok(SeedFiles {
        user_data,
        meta_data,
        network_config: cloud_init.network_data.clone(),
    })
}

/// Writes the seed image to `destination`.
pub(crate) async fn write_seed(files: &SeedFiles, destination: &Path) -> Result<()> {
    let missing = |program: &str| {
        RuntimeError::MissingProgram {
        program: program.to_string(),
        hint: "install the Debian package mtools (apt-get install -y --no-install-recommends mtools); it builds the cloud-init seed".to_string(),
    }
    };
    let mformat = find_on_path("mformat").ok_or_else(|| missing("mformat"))?;
    let mcopy = find_on_path("mcopy").ok_or_else(|| missing("mcopy"))?;
    let directory = destination.parent().unwrap_or_else(|| Path::new("."));
    let staging = directory.join(format!(".seed-{}", crate::image::random_hex(6)));
    let result = async {
        crate::state::create_private_dir(&staging)?;
        let mut contents: Vec<(&str, &str)> =
            vec![("user-data", &files.user_data), ("meta-data", &files.meta_data)];
        if let Some(network_config) = &files.network_config {
            contents.push(("network-config", network_config));
        }
        let total: usize = contents.iter().map(|(_, text)| text.len()).sum();
        // Room for the files plus FAT overhead, in whole MiB, at least 1 MiB.
        let mebibytes = total.div_ceil(1024 * 1024) + 1;
        let image = staging.join("seed.img");
        let file =
            std::fs::File::create(&image).map_err(|source| RuntimeError::io("create", &image, source))?;
        file.set_len((mebibytes * 1024 * 1024) as u64)
            .map_err(|source| RuntimeError::io("size", &image, source))?;
        drop(file);
        let sectors = mebibytes * 2048;
        run_tool(
            &mformat,
            &[
                "-i".into(),
                image.as_os_str().to_owned(),
                "-v".into(),
                "CIDATA".into(),
                "-T".into(),
                sectors.to_string().into(),
                "-h".into(),
                "2".into(),
                "-s".into(),
                "32".into(),
                "::".into(),
            ],
        )
        .await?;
        for (name, text) in &contents {
            let local: PathBuf = staging.join(name);
            std::fs::write(&local, text).map_err(|source| RuntimeError::io("write", &local, source))?;
            run_tool(
                &mcopy,
                &[
                    "-i".into(),
                    image.as_os_str().to_owned(),
                    local.as_os_str().to_owned(),
                    format!("::{name}").into(),
                ],
            )
            .await?;
        }
        std::fs::File::open(&image)
            .and_then(|handle| handle.sync_all())
            .map_err(|source| RuntimeError::io("sync", &image, source))?;
        std::fs::rename(&image, destination)
            .map_err(|source| RuntimeError::io("rename into place", destination, source))?;
        crate::state::sync_directory(directory)
    }
    .await;
    // Best effort: the staging directory only held copies.
    let _ = std::fs::remove_dir_all(&staging);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ alice@laptop";

    #[test]
    fn keys_without_user_data_become_cloud_config() {
        let spec = CloudInitSpec {
            ssh_keys: vec![KEY.to_string()],
            ..CloudInitSpec::default()
        };
        let files = seed_files(&spec, "vm-1234", "web").unwrap();
        assert!(
            files.user_data.starts_with("#cloud-config\n"),
            "{}",
            files.user_data
        );
        assert!(
            files
                .user_data
                .contains(&format!("ssh_authorized_keys:\n  - \"{KEY}\"")),
            "{}",
            files.user_data
        );
        let meta: serde_json::Value = serde_json::from_str(&files.meta_data).unwrap();
        assert_eq!(meta["instance-id"], "vm-1234");
        assert_eq!(meta["local-hostname"], "web");
        assert!(meta.get("public-keys").is_none());
        assert_eq!(files.network_config, None);
    }

    #[test]
    fn user_data_is_kept_and_keys_go_to_meta_data() {
        let spec = CloudInitSpec {
            user_data: Some("#!/bin/sh\necho hello\n".to_string()),
            ssh_keys: vec![KEY.to_string()],
            network_data: Some("version: 2\n".to_string()),
            ..CloudInitSpec::default()
        };
        let files = seed_files(&spec, "id", "host").unwrap();
        assert_eq!(files.user_data, "#!/bin/sh\necho hello\n");
        let meta: serde_json::Value = serde_json::from_str(&files.meta_data).unwrap();
        assert_eq!(meta["public-keys"][0], KEY);
        assert_eq!(files.network_config.as_deref(), Some("version: 2\n"));
    }

    #[test]
    fn secret_references_are_refused() {
        let spec = CloudInitSpec {
            user_data_secret_ref: Some("my-secret".to_string()),
            ..CloudInitSpec::default()
        };
        assert!(matches!(
            seed_files(&spec, "id", "host"),
            Err(RuntimeError::Unsupported { .. })
        ));
    }
}
