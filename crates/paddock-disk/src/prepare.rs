//! The pipeline: unwrap compression and OVA layers, check the disk, then pass it through or convert it.
//!
//! Contract: [`prepare`] peels layers by content (compression → decompress; tar → OVA; anything else
//! → a disk for qemu-img), at most [`MAX_LAYERS`] deep, checks the disk ([`inspect`]'s checks plus
//! the size limit) and produces the output format asked for. Intermediate files are deleted as soon
//! as the next layer exists, so peak disk use is about two copies. Every file is created inside one
//! temporary directory that is removed on any error; a [`PreparedDisk`] keeps it alive.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::ovf::OvfHints;
use crate::qemu::{Conversion, QemuImg};
use crate::sniff::{self, Sniffed};
use crate::{Compression, DEFAULT_MAX_VIRTUAL_SIZE, Error, Result};

/// Layers (compressions, an OVA) allowed around a disk: enough for `xz → ova → gzip → vmdk`.
pub const MAX_LAYERS: usize = 3;

/// A stage of [`prepare`] that reports progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Decompressing; progress counts compressed bytes read.
    Decompress(Compression),
    /// Copying the boot disk out of an OVA; progress counts bytes of the member.
    Extract,
    /// `qemu-img convert`; progress counts bytes of the virtual size.
    Convert,
}

impl fmt::Display for Stage {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stage::Decompress(compression) => write!(formatter, "decompressing {compression}"),
            Stage::Extract => formatter.write_str("extracting the disk from the OVA"),
            Stage::Convert => formatter.write_str("converting"),
        }
    }
}

/// Receives progress: `done` of `total` for `stage`. A stage starts with `done == 0` and, when it
/// succeeds, ends with `done == total`.
pub trait Progress {
    /// Reports progress of `stage`.
    fn update(&mut self, stage: Stage, done: u64, total: u64);
}

impl<F: FnMut(Stage, u64, u64)> Progress for F {
    fn update(&mut self, stage: Stage, done: u64, total: u64) {
        self(stage, done, total)
    }
}

/// A [`Progress`] that reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn update(&mut self, _stage: Stage, _done: u64, _total: u64) {}
}

/// A disk format paddock accepts as input, named as qemu-img names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InputFormat {
    /// qcow2.
    Qcow2,
    /// raw (also what an ISO is to qemu).
    Raw,
    /// VMware vmdk, single file (monolithicSparse or streamOptimized).
    Vmdk,
    /// VHD (qemu's `vpc`).
    Vpc,
    /// VHDX.
    Vhdx,
    /// VirtualBox vdi.
    Vdi,
}

impl InputFormat {
    /// The qemu-img format name (`-f`).
    pub fn qemu_name(self) -> &'static str {
        match self {
            InputFormat::Qcow2 => "qcow2",
            InputFormat::Raw => "raw",
            InputFormat::Vmdk => "vmdk",
            InputFormat::Vpc => "vpc",
            InputFormat::Vhdx => "vhdx",
            InputFormat::Vdi => "vdi",
        }
    }

    fn from_qemu_name(name: &str) -> Option<Self> {
        Some(match name {
            "qcow2" => InputFormat::Qcow2,
            "raw" => InputFormat::Raw,
            "vmdk" => InputFormat::Vmdk,
            "vpc" => InputFormat::Vpc,
            "vhdx" => InputFormat::Vhdx,
            "vdi" => InputFormat::Vdi,
            _ => return None,
        })
    }
}

impl fmt::Display for InputFormat {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.qemu_name())
    }
}

/// qcow2 header facts of an accepted qcow2 image (backing file, data file and encryption are
/// always absent: such images are refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qcow2Details {
    /// qcow2 version: 2 (compat 0.10) or 3 (compat 1.1).
    pub version: u32,
    /// Cluster size in bytes.
    pub cluster_size: u64,
}

/// A checked, uncompressed disk image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// The file inspected.
    pub path: PathBuf,
    /// Its format, from content.
    pub format: InputFormat,
    /// vmdk create type (`monolithicSparse`, `streamOptimized`), when qemu-img reports one.
    pub subformat: Option<String>,
    /// Size of the disk as the guest sees it, in bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host file system, when qemu-img knows.
    pub actual_size: Option<u64>,
    /// Length of the file in bytes.
    pub file_size: u64,
    /// True for an ISO9660 image (qemu: raw; `CD001` at 0x8001): installer media, a cdrom.
    pub is_iso: bool,
    /// qcow2 header facts, for qcow2 images.
    pub qcow2: Option<Qcow2Details>,
}

/// What [`inspect`] found in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inspection {
    /// A compressed stream; [`prepare`] decompresses it and looks again.
    Compressed(Compression),
    /// A tar archive; [`prepare`] reads it as an OVA.
    Archive,
    /// A disk image that passed the safety checks.
    Disk(DiskInfo),
}

/// One layer of an input, outermost first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layer {
    /// A compression around the next layer.
    Compressed(Compression),
    /// An OVA; the next layer is its boot disk.
    Ova {
        /// The OVF descriptor's member name.
        ovf: String,
        /// The boot disk's member name.
        disk: String,
    },
    /// The disk itself (always the last layer).
    Disk {
        /// Its format.
        format: InputFormat,
        /// vmdk create type, when known.
        subformat: Option<String>,
        /// True for an ISO image.
        is_iso: bool,
    },
}

impl fmt::Display for Layer {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layer::Compressed(compression) => write!(formatter, "{compression}"),
            Layer::Ova { disk, .. } => write!(formatter, "ova ({disk})"),
            Layer::Disk {
                format,
                subformat,
                is_iso,
            } => {
                write!(formatter, "{format}")?;
                match (subformat, is_iso) {
                    (_, true) => formatter.write_str(" (iso)"),
                    (Some(subformat), false) => write!(formatter, " ({subformat})"),
                    (None, false) => Ok(()),
                }
            }
        }
    }
}

/// The layers detected in an input, e.g. `xz → ova (disk1.vmdk) → gzip → vmdk (streamOptimized)`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DetectedInput {
    /// Outermost first; the last one is the disk.
    pub layers: Vec<Layer>,
}

impl fmt::Display for DetectedInput {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, layer) in self.layers.iter().enumerate() {
            if index > 0 {
                formatter.write_str(" → ")?;
            }
            write!(formatter, "{layer}")?;
        }
        Ok(())
    }
}

/// The format of a prepared disk (what containerDisk images hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskFormat {
    /// qcow2.
    Qcow2,
    /// raw.
    Raw,
}

impl DiskFormat {
    /// The qemu-img format name (`-f`/`-O`).
    pub fn qemu_name(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.qemu_name())
    }
}

/// How the prepared disk is meant to be attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Media {
    /// A hard disk.
    Disk,
    /// Installer media (an ISO): attach as a cdrom.
    Cdrom,
}

/// The output format [`prepare`] produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Always convert to qcow2 (`compressed`: zlib-compressed clusters, `qemu-img convert -c`).
    Qcow2 {
        /// Compress clusters (smaller, slower to write; reads stay fast).
        compressed: bool,
    },
    /// Raw: a raw input is used as is, everything else is converted (sparse) to raw.
    Raw,
    /// qcow2 and raw inputs are used as they are — a plain input file is returned untouched, without a
    /// copy; a decompressed or extracted one is used as unpacked — and other formats are converted to
    /// (uncompressed) qcow2.
    Keep,
}

impl Default for OutputFormat {
    fn default() -> Self {
        OutputFormat::Qcow2 { compressed: false }
    }
}

/// Options of [`prepare`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareOptions {
    /// The output format.
    pub output: OutputFormat,
    /// Largest accepted virtual size in bytes (also bounds decompression, plus a small slack).
    pub max_virtual_size: u64,
    /// Where the temporary work directory is created (it holds decompressed and converted files, so
    /// it needs room for about two copies of the disk); `None`: the system temp directory. Put it on
    /// the file system of the final output to keep renames cheap.
    pub work_dir: Option<PathBuf>,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            output: OutputFormat::default(),
            max_virtual_size: DEFAULT_MAX_VIRTUAL_SIZE,
            work_dir: None,
        }
    }
}

/// Something worth telling the user that did not stop packaging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Warning {
    /// The OVF lists more disks than the one packaged (paddock packages one disk per image).
    ExtraDisks {
        /// The packaged disk's member name.
        packaged: String,
        /// The others (file names, or disk ids of blank disks).
        ignored: Vec<String>,
    },
    /// The OVF describes several virtual systems; the first was used.
    MultipleVirtualSystems {
        /// How many.
        count: usize,
        /// The name of the one used.
        used: String,
    },
}

impl fmt::Display for Warning {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::ExtraDisks { packaged, ignored } => write!(
                formatter,
                "the OVF lists {} more disk(s) ({}); paddock packages one disk per image, only {packaged} is packaged: add the others as separate volumes",
                ignored.len(),
                ignored.join(", ")
            ),
            Warning::MultipleVirtualSystems { count, used } => write!(
                formatter,
                "the OVF describes {count} virtual systems; only the first ({used}) is packaged"
            ),
        }
    }
}

/// A disk ready for `paddock_oci::build_layout`.
#[derive(Debug)]
pub struct PreparedDisk {
    /// The qcow2 or raw file to package (inside `temp`, or the input itself when passed through).
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// Its virtual size in bytes.
    pub virtual_size: u64,
    /// Disk or cdrom (ISO).
    pub media: Media,
    /// The layers found in the input.
    pub detected: DetectedInput,
    /// The OVF's hints, when the input was an OVA.
    pub ovf: Option<OvfHints>,
    /// Things to tell the user.
    pub warnings: Vec<Warning>,
    /// True when `path` is the input file itself, untouched (no copy was made).
    pub passed_through: bool,
    /// The work directory holding `path` when it was produced; dropping it deletes the files.
    pub temp: Option<TempDir>,
}

/// Slack on top of the virtual size limit for files that legitimately exceed the virtual size a
/// little (qcow2 and vhd metadata, an OVA's descriptor): 1/16 of the limit, at least 16 MiB.
fn expansion_limit(max_virtual_size: u64) -> u64 {
    max_virtual_size.saturating_add((max_virtual_size / 16).max(16 << 20))
}

fn absolute_file(path: &Path) -> Result<PathBuf> {
    let read_error = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    let absolute = std::path::absolute(path).map_err(read_error)?;
    let metadata = fs::metadata(&absolute).map_err(read_error)?;
    if !metadata.is_file() {
        return Err(Error::NotAFile {
            path: path.to_path_buf(),
        });
    }
    Ok(absolute)
}

/// Inspects one file: compressed, an archive, or a disk that passes the safety checks (refusing
/// backing files, external data files, encryption, multi-file vmdk and formats paddock does not take).
/// Needs qemu-img for disks.
pub fn inspect(path: &Path) -> Result<Inspection> {
    let path = absolute_file(path)?;
    let head = sniff::read_head(&path)?;
    Ok(match sniff::sniff(&path, &head)? {
        Sniffed::Compressed(compression) => Inspection::Compressed(compression),
        Sniffed::Tar => Inspection::Archive,
        Sniffed::Disk => Inspection::Disk(inspect_disk(&QemuImg::locate()?, &path, &head)?),
    })
}

/// The safety checks and `qemu-img info` of one uncompressed disk.
fn inspect_disk(qemu_img: &QemuImg, path: &Path, head: &[u8]) -> Result<DiskInfo> {
    // Header checks first: qemu-img must never open an image that names another file.
    let qcow2 = sniff::precheck(path, head)?;
    let info = qemu_img.info(path)?;
    let format = InputFormat::from_qemu_name(&info.format).ok_or_else(|| Error::UnsupportedFormat {
        path: path.to_path_buf(),
        format: info.format.clone(),
    })?;
    // Second line of defence, from qemu-img's own reading of the top image.
    if let Some(backing) = info.backing_filename {
        return Err(Error::BackingFile {
            path: path.to_path_buf(),
            backing,
        });
    }
    let data = info
        .format_specific
        .map(|specific| specific.data)
        .unwrap_or_default();
    if let Some(data_file) = data.get("data-file").and_then(|value| value.as_str()) {
        return Err(Error::ExternalDataFile {
            path: path.to_path_buf(),
            data_file: data_file.to_string(),
        });
    }
    if info.encrypted == Some(true) {
        let method = data
            .pointer("/encrypt/format")
            .and_then(|value| value.as_str())
            .unwrap_or("unknown method");
        return Err(Error::Encrypted {
            path: path.to_path_buf(),
            method: method.to_string(),
        });
    }
    let mut subformat = None;
    if format == InputFormat::Vmdk {
        subformat = data
            .get("create-type")
            .and_then(|value| value.as_str())
            .map(str::to_string);
        // A single-file vmdk's only extent is the file itself.
        let own_name = path.to_string_lossy();
        let foreign: Vec<String> = data
            .get("extents")
            .and_then(|value| value.as_array())
            .into_iter()
            .flatten()
            .filter_map(|extent| extent.get("filename").and_then(|value| value.as_str()))
            .filter(|name| *name != own_name)
            .map(str::to_string)
            .collect();
        if !foreign.is_empty() {
            return Err(Error::VmdkDescriptor {
                path: path.to_path_buf(),
                extents: foreign,
            });
        }
    }
    if info.virtual_size == 0 {
        return Err(Error::EmptyDisk {
            path: path.to_path_buf(),
        });
    }
    let file_size = fs::metadata(path)
        .map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    Ok(DiskInfo {
        path: path.to_path_buf(),
        format,
        subformat,
        virtual_size: info.virtual_size,
        actual_size: info.actual_size,
        file_size,
        is_iso: format == InputFormat::Raw && sniff::is_iso9660(head),
        qcow2: qcow2.map(|header| Qcow2Details {
            version: header.version,
            cluster_size: header.cluster_size,
        }),
    })
}

/// Turns `input` into a safe qcow2 or raw disk (see the module docs and [`OutputFormat`]).
///
/// Errors name the input; for a refusal inside a layer (a compressed or OVA-packed disk) the path
/// reads `INPUT (unpacked: LAYERS)`. On error nothing is left in the work directory.
pub fn prepare(input: &Path, options: &PrepareOptions, progress: &mut dyn Progress) -> Result<PreparedDisk> {
    let qemu_img = QemuImg::locate()?;
    let input = absolute_file(input)?;
    let work_parent = options.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = tempfile::Builder::new()
        .prefix(".paddock-disk-")
        .tempdir_in(&work_parent)
        .map_err(|source| Error::WorkDir {
            path: work_parent.clone(),
            source,
        })?;
    let limit = expansion_limit(options.max_virtual_size);

    let mut layers: Vec<Layer> = Vec::new();
    let mut current = input.clone();
    let mut ovf = None;
    let mut warnings = Vec::new();
    // Errors about a derived file name the input and the layers, not a temp file about to vanish.
    let shown = |layers: &[Layer]| -> PathBuf {
        if layers.is_empty() {
            input.clone()
        } else {
            let chain = DetectedInput {
                layers: layers.to_vec(),
            };
            PathBuf::from(format!("{} (unpacked: {chain})", input.display()))
        }
    };
    let info = loop {
        let head = sniff::read_head(&current)?;
        let sniffed =
            sniff::sniff(&current, &head).map_err(|error| error.relabel(&current, &shown(&layers)))?;
        if sniffed != Sniffed::Disk && layers.len() >= MAX_LAYERS {
            return Err(Error::TooDeep {
                path: input.clone(),
                chain: DetectedInput { layers }.to_string(),
            });
        }
        let next = work.path().join(format!("layer-{}", layers.len()));
        match sniffed {
            Sniffed::Compressed(compression) => {
                crate::decompress::decompress(
                    &current,
                    compression,
                    &next,
                    limit,
                    options.max_virtual_size,
                    progress,
                )
                .map_err(|error| error.relabel(&current, &shown(&layers)))?;
                layers.push(Layer::Compressed(compression));
            }
            Sniffed::Tar => {
                if ovf.is_some() {
                    return Err(Error::TooDeep {
                        path: input.clone(),
                        chain: format!("{} → tar", DetectedInput { layers }),
                    });
                }
                let opened = crate::ova::open(&current, &next, limit, options.max_virtual_size, progress)
                    .map_err(|error| error.relabel(&current, &shown(&layers)))?;
                layers.push(Layer::Ova {
                    ovf: opened.ovf_member,
                    disk: opened.disk_member,
                });
                ovf = Some(opened.hints);
                warnings.extend(opened.warnings);
            }
            Sniffed::Disk => {
                break inspect_disk(&qemu_img, &current, &head)
                    .map_err(|error| error.relabel(&current, &shown(&layers)))?;
            }
        }
        // The previous derived file is no longer needed; free its space before the next step.
        if current != input {
            let _ = fs::remove_file(&current);
        }
        current = next;
    };
    let derived = current != input;

    if info.virtual_size > options.max_virtual_size {
        return Err(Error::TooLarge {
            path: shown(&layers),
            virtual_size: info.virtual_size,
            limit: options.max_virtual_size,
        });
    }
    layers.push(Layer::Disk {
        format: info.format,
        subformat: info.subformat.clone(),
        is_iso: info.is_iso,
    });
    let detected = DetectedInput { layers };

    // ISOs are installer media: packaged byte for byte as raw, whatever the requested output.
    let (format, convert) = match (info.is_iso, options.output, info.format) {
        (true, _, _) => (DiskFormat::Raw, None),
        (false, OutputFormat::Keep, InputFormat::Qcow2) => (DiskFormat::Qcow2, None),
        (false, OutputFormat::Keep | OutputFormat::Raw, InputFormat::Raw) => (DiskFormat::Raw, None),
        (false, OutputFormat::Keep, _) => (DiskFormat::Qcow2, Some(false)),
        (false, OutputFormat::Raw, _) => (DiskFormat::Raw, Some(false)),
        (false, OutputFormat::Qcow2 { compressed }, _) => (DiskFormat::Qcow2, Some(compressed)),
    };
    let output = work.path().join(format!("disk.{format}"));
    let (path, passed_through) = match convert {
        None if !derived => (input.clone(), true),
        None => {
            fs::rename(&current, &output).map_err(|source| Error::Write {
                path: output.clone(),
                source,
            })?;
            (output, false)
        }
        Some(compressed) => {
            let job = Conversion {
                input: &current,
                input_format: info.format.qemu_name(),
                output: &output,
                output_format: format.qemu_name(),
                compressed,
                virtual_size: info.virtual_size,
            };
            qemu_img.convert(&job, progress).map_err(|error| {
                error.relabel(&current, &shown(&detected.layers[..detected.layers.len() - 1]))
            })?;
            if derived {
                let _ = fs::remove_file(&current);
            }
            (output, false)
        }
    };
    Ok(PreparedDisk {
        path,
        format,
        virtual_size: info.virtual_size,
        media: if info.is_iso { Media::Cdrom } else { Media::Disk },
        detected,
        ovf,
        warnings,
        passed_through,
        // A pass-through needs no work directory; dropping it here removes the empty directory.
        temp: (!passed_through).then_some(work),
    })
}

#[cfg(test)]
mod tests {
    use super::expansion_limit;

    #[test]
    fn the_expansion_slack_is_small_but_not_tiny() {
        assert_eq!(expansion_limit(10 << 20), 26 << 20);
        assert_eq!(expansion_limit(256 << 30), (256 << 30) + (16 << 30));
        assert_eq!(expansion_limit(u64::MAX), u64::MAX);
    }
}
