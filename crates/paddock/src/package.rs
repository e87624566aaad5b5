//! `paddock package`: VM disks in, a containerDisk image (OCI layout, OCI archive, registry) and
//! optionally a Zarf package definition out.
//!
//! Pipeline: detect and check each input (paddock-disk: format from content, refusals, decompression,
//! OVA unpacking, conversion) → build the image (paddock-oci: one pass, hashed and compressed) →
//! write the requested destinations → generate the VirtualMachineApp (paddock-api's pure builder) →
//! optionally write the Zarf package directory and push. Every output is written under a temporary
//! name and renamed into place, so an interrupted run leaves nothing half-written.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use paddock_api::app::{FirmwareKind, RunStrategy, VirtualMachineApp};
use paddock_api::image_reference::ImageReference;
use paddock_api::packaging::{PackagedDisk, virtual_machine_app};
use paddock_api::quantity::parse_quantity;
use paddock_oci::zarf::{ZarfImageSource, ZarfPackageInput, is_zarf_name, package_config};
use paddock_oci::{
    BuiltImage, Compression, Descriptor, ImageOptions, Platform, PlatformDisk, build_index_layout,
    build_layout, write_archive,
};
use serde::Serialize;

use crate::progress::OutputFlags;
use crate::registry_flags::RegistryFlags;

/// Arguments of `paddock package`.
#[derive(Debug, Args)]
#[command(after_long_help = PACKAGE_EXAMPLES)]
pub struct PackageArgs {
    /// The VM disk: qcow2, raw, vmdk, vhd, vhdx, vdi, iso or ova, optionally gz/xz/zst-compressed.
    /// The format is read from the content, not the file name. Give several disks together with one
    /// --platform each to build a multi-architecture image.
    #[arg(required = true, value_name = "DISK")]
    pub disks: Vec<PathBuf>,

    /// The image reference to build, e.g. registry.example.com/vms/debian:12. It names the image in
    /// the layout and archive, is where --push pushes, and is what the VirtualMachineApp boots.
    /// Default: localhost/paddock/NAME:latest.
    #[arg(long, value_name = "REFERENCE")]
    pub image: Option<String>,

    /// The VM's name (a DNS label, at most 58 characters). Default: the OVF's name or the disk
    /// file's name, lower-cased.
    #[arg(long)]
    pub name: Option<String>,

    /// Write the image as an OCI image layout directory here (must not exist). Default when no
    /// other destination is given: ./NAME.oci
    #[arg(short = 'o', long, value_name = "DIR")]
    pub output: Option<PathBuf>,

    /// Also write the image as an OCI archive (a tar of the layout; skopeo's oci-archive:, Zarf's
    /// imageArchives).
    #[arg(long, value_name = "FILE")]
    pub archive: Option<PathBuf>,

    /// Push the image to its registry (--image) when it is built.
    #[arg(long)]
    pub push: bool,

    /// Write a Zarf package directory here (must not exist): zarf.yaml, the VirtualMachineApp under
    /// manifests/ and the image archive under images/; then run `zarf package create DIR`.
    #[arg(long, value_name = "DIR")]
    pub zarf: Option<PathBuf>,

    /// How the Zarf package gets the image: from the archive in the package directory (works
    /// offline) or by pulling --image from its registry during `zarf package create`.
    #[arg(long, value_enum, default_value_t = ZarfImages::Archive)]
    pub zarf_images: ZarfImages,

    /// The Zarf package name. Default: NAME.
    #[arg(long)]
    pub zarf_name: Option<String>,

    /// Write the generated VirtualMachineApp to this file too.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,

    /// Namespace of the generated VirtualMachineApp (and of the Zarf manifests).
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,

    /// The disk format inside the image: keep (a clean qcow2 or raw input as it is, everything else
    /// converted to qcow2), qcow2 or raw.
    #[arg(long, value_enum, default_value_t = DiskFormatChoice::Keep)]
    pub format: DiskFormatChoice,

    /// Compress the qcow2 inside the image (qemu-img convert -c): smaller images, a little more CPU
    /// in the guest on first reads. Implies --format qcow2.
    #[arg(long)]
    pub compress_qcow2: bool,

    /// Layer compression. zstd (default): smaller images in registries and on the wire, read by
    /// containerd >= 1.5, CRI-O and CDI >= 1.57; none: fastest to build, for runtimes without zstd;
    /// gzip: for old runtimes. See the README's "Layer compression" section.
    #[arg(long, value_enum, default_value_t = LayerCompression::Zstd)]
    pub compression: LayerCompression,

    /// The platform of each disk, in order: os/architecture[/variant], e.g. linux/arm64. Several
    /// build an image index.
    #[arg(long = "platform", value_name = "PLATFORM")]
    pub platforms: Vec<String>,

    /// Refuse disks whose virtual size is larger than this (a Kubernetes quantity).
    #[arg(long, default_value = "256Gi", value_name = "QUANTITY")]
    pub max_size: String,

    /// Default instancetype recorded in the image (KubeVirt's inferFromVolume reads it).
    #[arg(long)]
    pub instancetype: Option<String>,

    /// Default preference recorded in the image.
    #[arg(long)]
    pub preference: Option<String>,

    /// CPUs of the generated VirtualMachineApp (default: the OVF's, else 1).
    #[arg(long)]
    pub cpu: Option<u32>,

    /// Memory of the generated VirtualMachineApp, e.g. 2Gi (default: the OVF's, else 1Gi).
    #[arg(long, value_name = "QUANTITY")]
    pub memory: Option<String>,

    /// Firmware of the generated VirtualMachineApp (default: the OVF's, else bios).
    #[arg(long, value_enum)]
    pub firmware: Option<FirmwareChoice>,

    /// Run strategy of the generated VirtualMachineApp: Always, Halted, Manual, RerunOnFailure, Once.
    #[arg(long, value_parser = parse_run_strategy)]
    pub run_strategy: Option<RunStrategy>,

    /// The tar mtime of the layer (seconds since the epoch); SOURCE_DATE_EPOCH is honoured.
    #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0)]
    pub mtime: u64,

    /// Registry access for --push.
    #[command(flatten)]
    pub registry: RegistryFlags,

    /// Output.
    #[command(flatten)]
    pub output_flags: OutputFlags,
}

const PACKAGE_EXAMPLES: &str = "Examples:
  # A qcow2 into an OCI layout directory ./debian.oci:
  paddock package debian-12.qcow2

  # Build, push to a registry, and write the VM manifest:
  paddock package debian-12.qcow2 --image registry.example.com/vms/debian:12 --push --manifest debian.yaml

  # A Zarf package directory, then the package:
  paddock package appliance.ova --image registry.example.com/vms/appliance:1.0 --zarf ./appliance-zarf
  zarf package create ./appliance-zarf

  # A two-architecture image:
  paddock package amd64.qcow2 arm64.qcow2 --platform linux/amd64 --platform linux/arm64 \\
      --image registry.example.com/vms/tiny:1.0 --push";

/// `--zarf-images`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ZarfImages {
    /// imageArchives: the archive in the package directory.
    Archive,
    /// images: pulled from the registry by `zarf package create`.
    Registry,
}

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiskFormatChoice {
    /// Keep a clean qcow2 or raw as it is; convert everything else to qcow2.
    Keep,
    /// Always qcow2.
    Qcow2,
    /// Always raw.
    Raw,
}

/// `--compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LayerCompression {
    /// Uncompressed tar layer.
    None,
    /// gzip.
    Gzip,
    /// zstd, multithreaded.
    Zstd,
}

impl From<LayerCompression> for Compression {
    fn from(choice: LayerCompression) -> Compression {
        match choice {
            LayerCompression::None => Compression::None,
            LayerCompression::Gzip => Compression::Gzip,
            LayerCompression::Zstd => Compression::Zstd,
        }
    }
}

/// `--firmware`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FirmwareChoice {
    /// Legacy BIOS.
    Bios,
    /// UEFI.
    Uefi,
}

fn parse_run_strategy(text: &str) -> Result<RunStrategy, String> {
    RunStrategy::from_wire(text).ok_or_else(|| {
        format!(
            "unknown run strategy {text:?}; use one of {}",
            RunStrategy::ALL.map(|strategy| strategy.as_str()).join(", ")
        )
    })
}

/// What `paddock package --json` prints.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PackageReport {
    name: String,
    image: String,
    /// The digest a tag resolves to: the manifest's, or the index's for several platforms.
    digest: String,
    images: Vec<PlatformReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    layout: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    archive: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    zarf: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    manifest: Option<PathBuf>,
    pushed: bool,
    virtual_machine_app: VirtualMachineApp,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PlatformReport {
    platform: String,
    input: PathBuf,
    detected: String,
    disk_format: String,
    virtual_size: u64,
    source_digest: String,
    manifest: Descriptor,
    layer: Descriptor,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
}

/// Runs `paddock package`.
pub fn run(arguments: &PackageArgs) -> anyhow::Result<()> {
    let bars = arguments.output_flags.bars();
    let platforms = platforms(arguments)?;
    let max_size = u64::try_from(
        parse_quantity(&arguments.max_size)
            .with_context(|| format!("invalid --max-size {}", arguments.max_size))?,
    )
    .unwrap_or(u64::MAX);

    // Everything intermediate lives in one work directory next to the first output, so renames
    // into place stay on one filesystem.
    let work_parent = first_output_parent(arguments);
    fs::create_dir_all(&work_parent).with_context(|| format!("cannot create {}", work_parent.display()))?;
    let work = tempfile::Builder::new()
        .prefix(".paddock-package-")
        .tempdir_in(&work_parent)
        .with_context(|| format!("cannot create a work directory in {}", work_parent.display()))?;

    let mut prepared = Vec::with_capacity(arguments.disks.len());
    for (index, disk) in arguments.disks.iter().enumerate() {
        let scratch = work.path().join(format!("input-{index}"));
        prepared.push(crate::disk_input::prepare(
            disk, &scratch, arguments, max_size, &bars,
        )?);
    }
    let first = &prepared[0];
    let name = match &arguments.name {
        Some(name) => name.clone(),
        None => default_name(first.ovf_name.as_deref(), &arguments.disks[0])?,
    };
    let reference = match &arguments.image {
        Some(text) => ImageReference::parse(text).with_context(|| format!("invalid --image {text}"))?,
        None => ImageReference::parse(&format!("localhost/paddock/{name}:latest")).with_context(|| {
            format!("cannot make an image reference from the name {name:?}; pass --image")
        })?,
    };
    let Some(tag) = reference.tag.clone() else {
        bail!(
            "--image {reference} has no tag; give one, e.g. {}:1.0",
            reference.name()
        );
    };
    let options = ImageOptions {
        tag,
        reference: Some(reference.to_string()),
        platform: platforms[0].clone(),
        compression: arguments.compression.into(),
        mtime: arguments.mtime,
        default_instancetype: arguments.instancetype.clone(),
        default_preference: arguments.preference.clone(),
        ..ImageOptions::default()
    };

    let layout_destination = match &arguments.output {
        Some(path) => path.clone(),
        None if arguments.archive.is_none() && arguments.zarf.is_none() && !arguments.push => {
            PathBuf::from(format!("{name}.oci"))
        }
        None => work.path().join("layout"),
    };
    let keep_layout = !layout_destination.starts_with(work.path());
    for destination in [
        Some(&layout_destination),
        arguments.archive.as_ref(),
        arguments.zarf.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        if destination.symlink_metadata().is_ok() {
            bail!(
                "{} already exists; paddock never overwrites an output: remove it or choose another path",
                destination.display()
            );
        }
    }

    let total: u64 = prepared.iter().map(|disk| disk.file_size).sum();
    let bar = bars.bytes("package", total);
    let mut advance = |bytes: u64| bar.inc(bytes);
    let (digest, built): (String, Vec<BuiltImage>) = if prepared.len() == 1 {
        let image = build_layout(&first.path, &layout_destination, &options, &mut advance)
            .context("cannot build the containerDisk image")?;
        (image.manifest.digest.clone(), vec![image])
    } else {
        let disks: Vec<PlatformDisk> = prepared
            .iter()
            .zip(&platforms)
            .map(|(disk, platform)| PlatformDisk {
                disk: disk.path.clone(),
                platform: platform.clone(),
            })
            .collect();
        let index = build_index_layout(&disks, &layout_destination, &options, &mut advance)
            .context("cannot build the multi-platform containerDisk image")?;
        (index.index.digest.clone(), index.images)
    };
    bar.finish_and_clear();
    bars.println(&format!("built {reference}@{digest}"));

    let app = virtual_machine_app(&PackagedDisk {
        name: name.clone(),
        namespace: Some(arguments.namespace.clone()),
        display_name: first.ovf_name.clone(),
        image_reference: reference.to_string(),
        virtual_size_bytes: prepared.iter().map(|disk| disk.virtual_size).max().unwrap_or(0),
        cpu: arguments.cpu.or(first.cpu),
        memory_bytes: match &arguments.memory {
            Some(text) => Some(
                u64::try_from(parse_quantity(text).with_context(|| format!("invalid --memory {text}"))?)
                    .unwrap_or(u64::MAX),
            ),
            None => first.memory_bytes,
        },
        firmware: match arguments.firmware {
            Some(FirmwareChoice::Bios) => Some(FirmwareKind::Bios),
            Some(FirmwareChoice::Uefi) => Some(FirmwareKind::Uefi),
            None => first.firmware,
        },
        run_strategy: arguments.run_strategy,
    })
    .map_err(|invalid| {
        let mut message = String::from("the generated VirtualMachineApp would be invalid:");
        for violation in &invalid.violations {
            message.push_str(&format!("\n  - {violation}"));
        }
        message.push_str("\nfix it with --name, --image, --cpu, --memory or --firmware");
        anyhow::anyhow!(message)
    })?;
    let app_yaml = format!(
        "# Generated by `paddock package` for {reference}@{digest}\n{}",
        serde_yaml::to_string(&app)?
    );

    if let Some(archive) = &arguments.archive {
        write_archive(&layout_destination, archive)
            .with_context(|| format!("cannot write the archive {}", archive.display()))?;
    }
    if let Some(zarf) = &arguments.zarf {
        write_zarf_directory(
            zarf,
            &layout_destination,
            &name,
            &reference,
            &platforms,
            &app_yaml,
            arguments,
        )?;
    }
    if let Some(manifest) = &arguments.manifest {
        write_atomically(manifest, app_yaml.as_bytes())?;
    }
    if arguments.push {
        crate::registry_flags::push_layout(&layout_destination, &reference, &arguments.registry, &bars)?;
    }

    let report = PackageReport {
        name,
        image: reference.to_string(),
        digest,
        images: built
            .iter()
            .zip(&prepared)
            .zip(&arguments.disks)
            .map(|((image, disk), input)| PlatformReport {
                platform: image.platform.to_string(),
                input: input.clone(),
                detected: disk.detected.clone(),
                disk_format: disk.format.clone(),
                virtual_size: disk.virtual_size,
                source_digest: image.source_digest.clone(),
                manifest: image.manifest.clone(),
                layer: image.layer.clone(),
                warnings: disk.warnings.clone(),
            })
            .collect(),
        layout: keep_layout.then(|| layout_destination.clone()),
        archive: arguments.archive.clone(),
        zarf: arguments.zarf.clone(),
        manifest: arguments.manifest.clone(),
        pushed: arguments.push,
        virtual_machine_app: app,
    };
    if arguments.output_flags.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_summary(&report);
    }
    Ok(())
}

fn print_summary(report: &PackageReport) {
    println!("image:    {}@{}", report.image, report.digest);
    for image in &report.images {
        println!(
            "disk:     {} ({}, {} as {}, virtual size {} bytes) -> layer {} ({} bytes)",
            image.input.display(),
            image.platform,
            image.detected,
            image.disk_format,
            image.virtual_size,
            image.layer.digest,
            image.layer.size
        );
        for warning in &image.warnings {
            println!("warning:  {warning}");
        }
    }
    for (label, path) in [
        ("layout:", &report.layout),
        ("archive:", &report.archive),
        ("zarf:", &report.zarf),
        ("manifest:", &report.manifest),
    ] {
        if let Some(path) = path {
            println!("{label:<9} {}", path.display());
        }
    }
    if report.pushed {
        println!("pushed:   {}", report.image);
    }
    if let Some(zarf) = &report.zarf {
        println!("next:     zarf package create {}", zarf.display());
    }
}

fn platforms(arguments: &PackageArgs) -> anyhow::Result<Vec<Platform>> {
    if arguments.platforms.is_empty() {
        if arguments.disks.len() > 1 {
            bail!(
                "{} disks given without --platform; give one --platform per disk, in the same order (e.g. --platform linux/amd64 --platform linux/arm64)",
                arguments.disks.len()
            );
        }
        return Ok(vec![Platform::default()]);
    }
    if arguments.platforms.len() != arguments.disks.len() {
        bail!(
            "{} disks but {} --platform values; give exactly one --platform per disk, in the same order",
            arguments.disks.len(),
            arguments.platforms.len()
        );
    }
    arguments
        .platforms
        .iter()
        .map(|text| Platform::parse(text).map_err(anyhow::Error::from))
        .collect()
}

fn first_output_parent(arguments: &PackageArgs) -> PathBuf {
    let candidates = [
        arguments.output.as_ref(),
        arguments.zarf.as_ref(),
        arguments.archive.as_ref(),
    ];
    candidates
        .into_iter()
        .flatten()
        .next()
        .and_then(|path| path.parent())
        .filter(|parent| !parent.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// A DNS-label name from an OVF name or a file name: lower-case, runs of other characters become
/// '-', trimmed, at most 58 characters (the VirtualMachineApp limit).
fn default_name(ovf_name: Option<&str>, disk: &Path) -> anyhow::Result<String> {
    let source = match ovf_name {
        Some(name) => name.to_owned(),
        None => {
            let file = disk
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default();
            // Drop every extension (disk.qcow2.gz -> disk).
            file.split('.').next().unwrap_or_default().to_owned()
        }
    };
    let mut name = String::new();
    for character in source.chars().flat_map(char::to_lowercase) {
        if character.is_ascii_lowercase() || character.is_ascii_digit() {
            name.push(character);
        } else if !name.ends_with('-') {
            name.push('-');
        }
    }
    let name: String = name.trim_matches('-').chars().take(58).collect();
    let name = name.trim_end_matches('-').to_owned();
    if name.is_empty() || !name.starts_with(|character: char| character.is_ascii_lowercase()) {
        bail!("cannot derive a VM name from {source:?}; pass --name (a DNS label such as my-vm)");
    }
    Ok(name)
}

fn write_zarf_directory(
    destination: &Path,
    layout: &Path,
    name: &str,
    reference: &ImageReference,
    platforms: &[Platform],
    app_yaml: &str,
    arguments: &PackageArgs,
) -> anyhow::Result<()> {
    let package_name = arguments.zarf_name.clone().unwrap_or_else(|| name.to_owned());
    if !is_zarf_name(&package_name) {
        bail!(
            "{package_name:?} is not a valid zarf package name (lowercase letters, digits and '-'); pass --zarf-name"
        );
    }
    let parent = match destination.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let pending = tempfile::Builder::new()
        .prefix(".paddock-zarf-")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a temporary directory in {}", parent.display()))?;
    let manifest_file = format!("manifests/{name}.yaml");
    let images = match arguments.zarf_images {
        ZarfImages::Archive => {
            let archive = format!("images/{name}.oci.tar");
            fs::create_dir_all(pending.path().join("images"))?;
            write_archive(layout, &pending.path().join(&archive))
                .context("cannot write the image archive for the zarf package")?;
            ZarfImageSource::Archive {
                path: archive,
                images: vec![reference.to_string()],
            }
        }
        ZarfImages::Registry => ZarfImageSource::Registry(vec![reference.to_string()]),
    };
    let config = package_config(&ZarfPackageInput {
        name: package_name,
        description: format!("the virtual machine {name}, packaged by paddock"),
        version: reference.tag.clone(),
        architecture: platforms[0].architecture.clone(),
        namespace: arguments.namespace.clone(),
        component: name.to_owned(),
        images,
        manifest_files: vec![manifest_file.clone()],
    })?;
    fs::create_dir_all(pending.path().join("manifests"))?;
    fs::write(pending.path().join(&manifest_file), app_yaml)?;
    let zarf_yaml = format!(
        "# Generated by `paddock package`; build the package with `zarf package create .`\n{}",
        serde_yaml::to_string(&config)?
    );
    fs::write(pending.path().join("zarf.yaml"), zarf_yaml)?;
    if destination.symlink_metadata().is_ok() {
        bail!(
            "{} already exists; remove it or choose another --zarf directory",
            destination.display()
        );
    }
    let kept = pending.keep();
    if let Err(error) = fs::rename(&kept, destination) {
        let _ = fs::remove_dir_all(&kept);
        return Err(error)
            .with_context(|| format!("cannot move the zarf package into {}", destination.display()));
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut file = tempfile::NamedTempFile::new_in(&parent)
        .with_context(|| format!("cannot create a temporary file in {}", parent.display()))?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(path)
        .map_err(|error| error.error)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_files_and_ovf() {
        assert_eq!(
            default_name(None, Path::new("/x/Debian-12.qcow2.xz")).unwrap(),
            "debian-12"
        );
        assert_eq!(
            default_name(Some("My Appliance (v2)"), Path::new("a.ova")).unwrap(),
            "my-appliance-v2"
        );
        assert!(default_name(None, Path::new("/x/___.raw")).is_err());
        assert!(default_name(None, Path::new("/x/7zip.raw")).is_err());
        assert_eq!(
            default_name(Some(&"a".repeat(80)), Path::new("x")).unwrap().len(),
            58
        );
    }
}
