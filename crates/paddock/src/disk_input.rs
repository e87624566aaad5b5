//! The input step of `paddock package`: one disk file through paddock-disk (detection, refusals,
//! decompression, OVA unpacking, conversion), with progress bars per stage.

use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::ProgressBar;
use paddock_api::app::FirmwareKind;
use paddock_disk::{Firmware, OutputFormat, PrepareOptions, PreparedDisk, Stage, prepare as prepare_disk};

use crate::package::{DiskFormatChoice, PackageArgs};
use crate::progress::Bars;

/// A disk ready for the image builder, and what packaging learned on the way.
pub struct Prepared {
    /// The qcow2 or raw file to put into the image.
    pub path: PathBuf,
    /// Its size in bytes (what the image builder reads).
    pub file_size: u64,
    /// Its virtual size (what the guest sees).
    pub virtual_size: u64,
    /// `qcow2` or `raw`.
    pub format: String,
    /// What was detected, outermost first (e.g. `xz → ova (disk1.vmdk) → vmdk (streamOptimized)`).
    pub detected: String,
    /// The OVF's virtual system name.
    pub ovf_name: Option<String>,
    /// The OVF's CPU count.
    pub cpu: Option<u32>,
    /// The OVF's memory.
    pub memory_bytes: Option<u64>,
    /// The OVF's firmware.
    pub firmware: Option<FirmwareKind>,
    /// Things worth telling the user.
    pub warnings: Vec<String>,
    /// Keeps converted files alive until the image is built.
    _prepared: PreparedDisk,
}

/// Runs paddock-disk on `input`, with intermediate files under `scratch`.
pub fn prepare(
    input: &Path,
    scratch: &Path,
    arguments: &PackageArgs,
    max_virtual_size: u64,
    bars: &Bars,
) -> anyhow::Result<Prepared> {
    std::fs::create_dir_all(scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
    let output = match (arguments.format, arguments.compress_qcow2) {
        (_, true) => OutputFormat::Qcow2 { compressed: true },
        (DiskFormatChoice::Keep, false) => OutputFormat::Keep,
        (DiskFormatChoice::Qcow2, false) => OutputFormat::Qcow2 { compressed: false },
        (DiskFormatChoice::Raw, false) => OutputFormat::Raw,
    };
    let options = PrepareOptions {
        output,
        max_virtual_size,
        work_dir: Some(scratch.to_path_buf()),
    };
    let mut current: Option<(Stage, ProgressBar)> = None;
    let mut progress = |stage: Stage, done: u64, total: u64| {
        if current.as_ref().is_none_or(|(shown, _)| *shown != stage) {
            if let Some((_, bar)) = current.take() {
                bar.finish_and_clear();
            }
            let label = match stage {
                Stage::Decompress(_) => "decompress",
                Stage::Extract => "extract",
                Stage::Convert => "convert",
            };
            current = Some((stage, bars.bytes(label, total)));
        }
        if let Some((_, bar)) = &current {
            bar.set_length(total);
            bar.set_position(done);
        }
    };
    let prepared = prepare_disk(input, &options, &mut progress)
        .with_context(|| format!("cannot package {}", input.display()))?;
    if let Some((_, bar)) = current.take() {
        bar.finish_and_clear();
    }
    let file_size = std::fs::metadata(&prepared.path)
        .with_context(|| format!("cannot read {}", prepared.path.display()))?
        .len();
    let detected = prepared.detected.to_string();
    bars.println(&format!(
        "{}: {detected}{}",
        input.display(),
        if prepared.passed_through {
            ", used as it is"
        } else {
            ""
        }
    ));
    let ovf = prepared.ovf.as_ref();
    Ok(Prepared {
        path: prepared.path.clone(),
        file_size,
        virtual_size: prepared.virtual_size,
        format: prepared.format.to_string(),
        detected,
        ovf_name: ovf.and_then(|hints| hints.name.clone()),
        cpu: ovf.and_then(|hints| hints.cpu_count),
        memory_bytes: ovf.and_then(|hints| hints.memory_bytes),
        firmware: ovf.map(|hints| match hints.firmware {
            Firmware::Bios => FirmwareKind::Bios,
            Firmware::Uefi => FirmwareKind::Uefi,
        }),
        warnings: prepared.warnings.iter().map(ToString::to_string).collect(),
        _prepared: prepared,
    })
}
