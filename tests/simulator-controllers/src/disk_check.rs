//! CDI's checks on an imported or uploaded disk, with the real `qemu-img info --output=json`: the
//! format must be qcow2 or raw (what a containerDisk may carry) and a qcow2 must have no backing file,
//! no external data file and no encryption.

use std::path::Path;

use serde_json::Value;

/// Checks `disk`; on refusal returns the message CDI's importer would end with (the part after
/// "Unable to process data: ").
pub(crate) async fn check(disk: &Path) -> Result<String, String> {
    let output = tokio::process::Command::new("qemu-img")
        .arg("info")
        .arg("--output=json")
        .arg(disk)
        .output()
        .await
        .map_err(|error| {
            format!(
                "cannot run qemu-img info on {}: {error}; install qemu-utils",
                disk.display()
            )
        })?;
    if !output.status.success() {
        return Err(format!(
            "qemu-img info {} failed: {}",
            disk.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let info: Value = serde_json::from_slice(&output.stdout)
        .map_err(|error| format!("qemu-img info printed unreadable json: {error}"))?;
    let format = info.get("format").and_then(Value::as_str).unwrap_or("");
    if !matches!(format, "qcow2" | "raw") {
        return Err(format!(
            "Invalid format {format} for image {}: a containerDisk holds a qcow2 or raw disk",
            disk.display()
        ));
    }
    if let Some(backing) = info.get("backing-filename").and_then(Value::as_str) {
        return Err(format!(
            "Image {} is invalid because it has invalid backing file {backing}: a containerDisk must be self-contained; \
             flatten it with qemu-img convert -O qcow2 before packaging",
            disk.display()
        ));
    }
    if let Some(data_file) = info
        .pointer("/format-specific/data/data-file")
        .and_then(Value::as_str)
    {
        return Err(format!(
            "Image {} is invalid because it has an external data file {data_file}; convert it to a self-contained qcow2",
            disk.display()
        ));
    }
    if info.get("encrypted").and_then(Value::as_bool) == Some(true) {
        return Err(format!(
            "Image {} is encrypted, which CDI cannot import",
            disk.display()
        ));
    }
    Ok(format.to_owned())
}
