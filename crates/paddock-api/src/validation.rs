//! Validation of a `VirtualMachineApp` before anything is built from it.
//!
//! The CRD's CEL rules catch most mistakes at the API server; this module repeats them (the local
//! runtime has no API server, and the admission webhook answers with these messages) and adds what CEL
//! cannot express: parsing image references, cron expressions and SSH keys. Every violation names the
//! field and says what to change; all violations are reported at once, not just the first.

use std::fmt;

use thiserror::Error;

use crate::app::{FirmwareKind, VirtualMachineApp, VirtualMachineAppSpec};
use crate::image_reference::ImageReference;
use crate::quantity::parse_quantity;

/// The longest name a VirtualMachineApp may have: its disk is named `<name>-disk`, a DNS label.
pub const MAX_NAME_LENGTH: usize = 58;

const MEBIBYTE: u128 = 1024 * 1024;
const MINIMUM_MEMORY: u128 = 16 * MEBIBYTE;
const MAXIMUM_MEMORY: u128 = 16 * 1024 * 1024 * MEBIBYTE;

/// One thing wrong with a spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The field's path, e.g. `spec.image`.
    pub field: String,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}: {}", self.field, self.message)
    }
}

/// Everything wrong with a spec.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("the VirtualMachineApp is invalid: {}", .violations.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct InvalidSpec {
    /// The violations, in field order.
    pub violations: Vec<Violation>,
}

/// Checks a whole VirtualMachineApp (its name and spec).
pub fn validate(app: &VirtualMachineApp) -> Result<(), InvalidSpec> {
    let mut violations = Vec::new();
    if let Some(name) = &app.metadata.name {
        check_name(name, &mut violations);
    }
    check_spec(&app.spec, &mut violations);
    if violations.is_empty() {
        Ok(())
    } else {
        Err(InvalidSpec { violations })
    }
}

fn violation(violations: &mut Vec<Violation>, field: &str, message: impl Into<String>) {
    violations.push(Violation {
        field: field.to_owned(),
        message: message.into(),
    });
}

fn check_name(name: &str, violations: &mut Vec<Violation>) {
    let is_label = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !is_label {
        violation(
            violations,
            "metadata.name",
            format!(
                "'{name}' is not a valid VM name: use lowercase letters, digits and '-', starting and ending with a letter or digit"
            ),
        );
    }
    if name.len() > MAX_NAME_LENGTH {
        violation(
            violations,
            "metadata.name",
            format!(
                "'{name}' is {} characters long; use at most {MAX_NAME_LENGTH} so that '<name>-disk' stays a valid DNS label",
                name.len()
            ),
        );
    }
}

fn check_spec(spec: &VirtualMachineAppSpec, violations: &mut Vec<Violation>) {
    check_image(spec, violations);
    check_resources(spec, violations);
    check_disk(spec, violations);
    check_firmware(spec, violations);
    check_cloud_init(spec, violations);
    check_snapshots(spec, violations);
    check_backup(spec, violations);
    if spec.console.baffles.category.trim().is_empty() {
        violation(
            violations,
            "spec.console.baffles.category",
            "the Baffles category is empty; leave it out for the default 'vm'",
        );
    }
}

fn check_image(spec: &VirtualMachineAppSpec, violations: &mut Vec<Violation>) {
    let image = &spec.image;
    let sources = image.sources_set();
    match sources.as_slice() {
        [] => violation(
            violations,
            "spec.image",
            "no image source is set: set one of containerDisk, http, dataSource, pvc or upload",
        ),
        [_] => {}
        many => violation(
            violations,
            "spec.image",
            format!(
                "{} image sources are set ({}): keep exactly one",
                many.len(),
                many.join(", ")
            ),
        ),
    }
    if let Some(reference) = &image.container_disk
        && let Err(error) = ImageReference::parse(reference)
    {
        violation(violations, "spec.image.containerDisk", error.to_string());
    }
    if let Some(http) = &image.http {
        if !(http.url.starts_with("http://") || http.url.starts_with("https://")) {
            violation(
                violations,
                "spec.image.http.url",
                format!("'{}' must start with http:// or https://", http.url),
            );
        }
        if let Some(checksum) = &http.checksum
            && !valid_checksum(checksum)
        {
            violation(
                violations,
                "spec.image.http.checksum",
                format!(
                    "'{checksum}' must look like sha256:<64 lowercase hex digits> (sha512, sha1 and md5 also work)"
                ),
            );
        }
    }
    if let Some(data_source) = &image.data_source
        && data_source.name.trim().is_empty()
    {
        violation(
            violations,
            "spec.image.dataSource.name",
            "the DataSource name is empty",
        );
    }
    if let Some(pvc) = &image.pvc
        && pvc.name.trim().is_empty()
    {
        violation(
            violations,
            "spec.image.pvc.name",
            "the PersistentVolumeClaim name is empty",
        );
    }
    if !image.persistent && (image.http.is_some() || image.data_source.is_some() || image.upload.is_some()) {
        violation(
            violations,
            "spec.image.persistent",
            "persistent: false works only with containerDisk or pvc images; remove it, http, dataSource and upload images are always imported into a persistent volume",
        );
    }
}

fn valid_checksum(checksum: &str) -> bool {
    let Some((algorithm, hex)) = checksum.split_once(':') else {
        return false;
    };
    let expected_length = match algorithm {
        "sha256" => 64,
        "sha512" => 128,
        "sha1" => 40,
        "md5" => 32,
        _ => return false,
    };
    hex.len() == expected_length
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn check_resources(spec: &VirtualMachineAppSpec, violations: &mut Vec<Violation>) {
    let Some(resources) = &spec.resources else { return };
    if let Some(cpu) = resources.cpu
        && !(1..=512).contains(&cpu)
    {
        violation(
            violations,
            "spec.resources.cpu",
            format!("{cpu} cores is out of range: use 1 to 512"),
        );
    }
    if let Some(memory) = &resources.memory {
        match parse_quantity(&memory.0) {
            Ok(bytes) if (MINIMUM_MEMORY..=MAXIMUM_MEMORY).contains(&bytes) => {}
            Ok(_) => violation(
                violations,
                "spec.resources.memory",
                format!(
                    "'{}' is out of range: use between 16Mi and 16Ti, e.g. 2Gi",
                    memory.0
                ),
            ),
            Err(error) => violation(violations, "spec.resources.memory", error.to_string()),
        }
    }
    if resources.instancetype.is_some() && (resources.cpu.is_some() || resources.memory.is_some()) {
        violation(
            violations,
            "spec.resources",
            "set either instancetype or cpu/memory, not both: the instancetype already sets CPU and memory",
        );
    }
    for (field, reference) in [
        ("instancetype", &resources.instancetype),
        ("preference", &resources.preference),
    ] {
        if let Some(reference) = reference
            && reference.name.trim().is_empty()
        {
            violation(
                violations,
                &format!("spec.resources.{field}.name"),
                format!("the {field} name is empty"),
            );
        }
    }
}

fn check_disk(spec: &VirtualMachineAppSpec, violations: &mut Vec<Violation>) {
    let image = &spec.image;
    let imports = image.persistent
        && (image.container_disk.is_some() || image.http.is_some() || image.upload.is_some());
    let size = spec.disk.as_ref().and_then(|disk| disk.size.as_ref());
    match size {
        None if imports => violation(
            violations,
            "spec.disk.size",
            "a size is required to import the image into a persistent volume: set it to at least the image's virtual size, e.g. 10Gi",
        ),
        None => {}
        Some(size) => match parse_quantity(&size.0) {
            Ok(bytes) if bytes > MEBIBYTE => {}
            Ok(_) => violation(
                violations,
                "spec.disk.size",
                format!("'{}' is too small: use more than 1Mi, e.g. 10Gi", size.0),
            ),
            Err(error) => violation(violations, "spec.disk.size", error.to_string()),
        },
    }
}

fn check_firmware(spec: &VirtualMachineAppSpec, violations: &mut Vec<Violation>) {
    if let Some(firmware) = &spec.firmware
        && firmware.secure_boot == Some(true)
        && firmware.kind != FirmwareKind::Uefi
    {
        violation(
            violations,
            "spec.firmware.secureBoot",
            "Secure Boot needs UEFI: set firmware.type: uefi",
        );
    }
}

fn check_cloud_init(spec: &VirtualMachineAppSpec, violations: &mut Vec<Violation>) {
    let Some(cloud_init) = &spec.cloud_init else {
        return;
    };
    if cloud_init.user_data.is_some() && cloud_init.user_data_secret_ref.is_some() {
        violation(
            violations,
            "spec.cloudInit",
            "set userData or userDataSecretRef, not both",
        );
    }
    for (index, key) in cloud_init.ssh_keys.iter().enumerate() {
        if !looks_like_ssh_public_key(key) {
            violation(
                violations,
                &format!("spec.cloudInit.sshKeys[{index}]"),
                "not an OpenSSH public key: paste the whole line of your .pub file, e.g. 'ssh-ed25519 AAAAC3Nza… alice@laptop'",
            );
        }
    }
}

fn looks_like_ssh_public_key(key: &str) -> bool {
    let mut fields = key.split_whitespace();
    let (Some(kind), Some(blob)) = (fields.next(), fields.next()) else {
        return false;
    };
    let known_kind = kind.starts_with("ssh-") || kind.starts_with("ecdsa-sha2-") || kind.starts_with("sk-");
    let base64 = blob.len() >= 16
        && blob
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=');
    known_kind && base64
}

fn check_snapshots(spec: &VirtualMachineAppSpec, violations: &mut Vec<Violation>) {
    let Some(snapshots) = &spec.snapshots else { return };
    if let Err(error) = crate::schedule::parse_schedule(&snapshots.schedule) {
        violation(violations, "spec.snapshots.schedule", error.to_string());
    }
    if !(1..=1000).contains(&snapshots.keep) {
        violation(
            violations,
            "spec.snapshots.keep",
            format!(
                "{} is out of range: keep between 1 and 1000 snapshots",
                snapshots.keep
            ),
        );
    }
}

fn check_backup(spec: &VirtualMachineAppSpec, violations: &mut Vec<Violation>) {
    let Some(backup) = &spec.backup else { return };
    if let Err(error) = crate::schedule::parse_schedule(&backup.schedule) {
        violation(violations, "spec.backup.schedule", error.to_string());
    }
    if !(1..=1000).contains(&backup.keep) {
        violation(
            violations,
            "spec.backup.keep",
            format!("{} is out of range: keep between 1 and 1000 backups", backup.keep),
        );
    }
    match ImageReference::parse(&backup.repository) {
        Err(error) => violation(
            violations,
            "spec.backup.repository",
            format!("{error}: write a registry repository such as registry.example.com/backups/web"),
        ),
        Ok(reference)
            if reference.digest.is_some()
                || backup
                    .repository
                    .rsplit('/')
                    .next()
                    .is_some_and(|last| last.contains(':')) =>
        {
            violation(
                violations,
                "spec.backup.repository",
                format!(
                    "'{}' names a tag or digest: write only the repository, e.g. {}; each backup gets its own tag <vm>-<UTC time>",
                    backup.repository,
                    reference.name()
                ),
            )
        }
        Ok(_) => {}
    }
    if let Some(secret) = &backup.credentials_secret {
        let valid = !secret.is_empty()
            && secret.len() <= 253
            && secret.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !valid {
            violation(
                violations,
                "spec.backup.credentialsSecret",
                format!(
                    "'{secret}' is not a Secret name: use the name of a kubernetes.io/dockerconfigjson Secret in the VM's namespace (lowercase letters, digits, '-' and '.')"
                ),
            );
        }
    }
}
