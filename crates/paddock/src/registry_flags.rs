//! Registry access from the command line: the flags every registry command shares, `paddock push`,
//! `paddock pull`, and the progress bars of both.
//!
//! Credentials come from `--username` with `--password-stdin` (never a password flag: it would
//! land in shell history and `ps`), else from the docker config (`$DOCKER_CONFIG` or
//! `~/.docker/config.json`, credential helpers included), as docker, skopeo and crane do.

use std::collections::HashMap;
use std::io::Read;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::ProgressBar;
use paddock_api::image_reference::ImageReference;
use paddock_oci::registry::{
    BlobPhase, BlobProgress, Credentials, PullOptions, PushOptions, RegistryOptions, TransferProgress, pull,
    push,
};
use paddock_oci::{Platform, extract_disk};
use serde::Serialize;

use crate::progress::{Bars, OutputFlags};

/// How to reach a registry.
#[derive(Debug, Clone, Args)]
pub struct RegistryFlags {
    /// Use plain http instead of https, for a registry on loopback or a lab network (like skopeo's
    /// --tls-verify=false). https certificates are always verified.
    #[arg(long)]
    pub insecure: bool,

    /// Registry username; the password is read from standard input (--password-stdin).
    #[arg(long, requires = "password_stdin")]
    pub username: Option<String>,

    /// Read the registry password (or token) from standard input.
    #[arg(long, requires = "username")]
    pub password_stdin: bool,

    /// The directory holding the docker config.json to read credentials from (default:
    /// $DOCKER_CONFIG, else ~/.docker).
    #[arg(long, value_name = "DIR")]
    pub docker_config: Option<PathBuf>,
}

impl RegistryFlags {
    fn options(&self) -> anyhow::Result<RegistryOptions> {
        let credentials = match &self.username {
            Some(username) => {
                let mut password = String::new();
                std::io::stdin()
                    .read_to_string(&mut password)
                    .context("cannot read the password from standard input (--password-stdin)")?;
                let password = password.trim_end_matches(['\n', '\r']).to_owned();
                if password.is_empty() {
                    bail!(
                        "--password-stdin read an empty password; pipe the password in, e.g. `cat token | paddock ...`"
                    );
                }
                Some(Credentials {
                    username: username.clone(),
                    password,
                })
            }
            None => None,
        };
        Ok(RegistryOptions {
            insecure: self.insecure,
            credentials,
            docker_config_dir: self.docker_config.clone(),
        })
    }
}

/// Arguments of `paddock push`.
#[derive(Debug, Args)]
#[command(
    after_long_help = "Examples:\n  paddock push debian.oci registry.example.com/vms/debian:12\n  paddock push debian.oci 127.0.0.1:5000/vms/debian:12 --insecure"
)]
pub struct PushArgs {
    /// The OCI image layout directory (`paddock package --output`).
    pub layout: PathBuf,
    /// Where to push it: registry/repository:tag.
    pub reference: String,
    /// Registry access.
    #[command(flatten)]
    pub registry: RegistryFlags,
    /// Upload chunk size in MiB; 0 sends each blob in one request (which cannot resume mid-blob).
    #[arg(long, default_value_t = 256)]
    pub chunk_size_mib: u64,
    /// How many blobs upload at the same time.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Output.
    #[command(flatten)]
    pub output_flags: OutputFlags,
}

/// Arguments of `paddock pull`.
#[derive(Debug, Args)]
#[command(
    after_long_help = "Examples:\n  paddock pull registry.example.com/vms/debian:12 -o debian.qcow2\n  paddock pull 127.0.0.1:5000/vms/tiny:1.0 --insecure --layout tiny.oci -o tiny.img"
)]
pub struct PullArgs {
    /// The image: registry/repository:tag or registry/repository@sha256:...
    pub reference: String,
    /// Write the VM disk (`disk/disk.img` of the image) here.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Also keep the pulled image as an OCI image layout directory here.
    #[arg(long, value_name = "DIR")]
    pub layout: Option<PathBuf>,
    /// The platform to pull from a multi-platform image.
    #[arg(long, default_value = "linux/amd64")]
    pub platform: String,
    /// Registry access.
    #[command(flatten)]
    pub registry: RegistryFlags,
    /// Output.
    #[command(flatten)]
    pub output_flags: OutputFlags,
}

/// One progress bar per blob, created when the blob starts.
struct BlobBars<'a> {
    bars: &'a Bars,
    verb: &'static str,
    active: Mutex<HashMap<String, ProgressBar>>,
}

impl TransferProgress for BlobBars<'_> {
    fn blob(&self, progress: &BlobProgress<'_>) -> ControlFlow<()> {
        show_blob_progress(self.bars, self.verb, &self.active, progress)
    }
}

/// Shows one blob's transfer: a byte bar per blob in `active` while it moves, a line when the
/// registry already had it. Shared by every command that pushes or pulls blobs.
pub(crate) fn show_blob_progress(
    bars: &Bars,
    verb: &str,
    active: &Mutex<HashMap<String, ProgressBar>>,
    progress: &BlobProgress<'_>,
) -> ControlFlow<()> {
    let Ok(mut active) = active.lock() else {
        return ControlFlow::Continue(());
    };
    let short = progress
        .digest
        .trim_start_matches("sha256:")
        .get(..12)
        .unwrap_or(progress.digest);
    match progress.phase {
        BlobPhase::Skipped => {
            bars.println(&format!("{verb} {short}: already in the registry, skipped"));
        }
        BlobPhase::Started | BlobPhase::Transferring => {
            let bar = active
                .entry(progress.digest.to_owned())
                .or_insert_with(|| bars.bytes(verb, progress.size));
            bar.set_position(progress.done);
        }
        BlobPhase::Finished => {
            if let Some(bar) = active.remove(progress.digest) {
                bar.finish_and_clear();
            }
        }
    }
    ControlFlow::Continue(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Pushes a layout to `reference` with progress bars; returns the pushed digest.
pub fn push_layout(
    layout: &Path,
    reference: &ImageReference,
    flags: &RegistryFlags,
    bars: &Bars,
) -> anyhow::Result<paddock_oci::registry::PushReport> {
    let options = PushOptions {
        registry: flags.options()?,
        ..PushOptions::default()
    };
    push_with(layout, &reference.to_string(), &options, bars)
}

fn push_with(
    layout: &Path,
    reference: &str,
    options: &PushOptions,
    bars: &Bars,
) -> anyhow::Result<paddock_oci::registry::PushReport> {
    let progress = BlobBars {
        bars,
        verb: "push",
        active: Mutex::new(HashMap::new()),
    };
    let report = runtime()?
        .block_on(push(layout, reference, options, &progress))
        .with_context(|| format!("cannot push {} to {reference}", layout.display()))?;
    Ok(report)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PushSummary {
    reference: String,
    digest: String,
    blobs_uploaded: usize,
    bytes_uploaded: u64,
    blobs_skipped: usize,
    bytes_skipped: u64,
}

/// Runs `paddock push`.
pub fn run_push(arguments: &PushArgs) -> anyhow::Result<()> {
    let bars = arguments.output_flags.bars();
    let options = PushOptions {
        registry: arguments.registry.options()?,
        parallel_uploads: arguments.parallel.max(1),
        chunk_size: (arguments.chunk_size_mib > 0).then_some(arguments.chunk_size_mib << 20),
        image: None,
    };
    let report = push_with(&arguments.layout, &arguments.reference, &options, &bars)?;
    let summary = PushSummary {
        reference: report.reference.clone(),
        digest: report.digest.clone(),
        blobs_uploaded: report.blobs_uploaded,
        bytes_uploaded: report.bytes_uploaded,
        blobs_skipped: report.blobs_skipped,
        bytes_skipped: report.bytes_skipped,
    };
    if arguments.output_flags.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "pushed {}@{}: {} blobs uploaded ({} bytes), {} already there ({} bytes)",
            summary.reference,
            summary.digest,
            summary.blobs_uploaded,
            summary.bytes_uploaded,
            summary.blobs_skipped,
            summary.bytes_skipped
        );
    }
    Ok(())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PullSummary {
    reference: String,
    digest: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    layout: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disk: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disk_size: Option<u64>,
}

/// Runs `paddock pull`.
pub fn run_pull(arguments: &PullArgs) -> anyhow::Result<()> {
    if arguments.output.is_none() && arguments.layout.is_none() {
        bail!("say what to write: -o FILE for the VM disk, --layout DIR for the OCI image layout, or both");
    }
    for path in [arguments.output.as_ref(), arguments.layout.as_ref()]
        .into_iter()
        .flatten()
    {
        if path.symlink_metadata().is_ok() {
            bail!(
                "{} already exists; paddock never overwrites an output: remove it or choose another path",
                path.display()
            );
        }
    }
    let platform = Platform::parse(&arguments.platform)?;
    let bars = arguments.output_flags.bars();
    let progress = BlobBars {
        bars: &bars,
        verb: "pull",
        active: Mutex::new(HashMap::new()),
    };
    // Without --layout the layout is only a step on the way to the disk file.
    let scratch = match &arguments.layout {
        Some(_) => None,
        None => {
            let parent = arguments
                .output
                .as_ref()
                .and_then(|path| path.parent())
                .filter(|parent| !parent.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
            Some(
                tempfile::Builder::new()
                    .prefix(".paddock-pull-")
                    .tempdir_in(&parent)
                    .with_context(|| {
                        format!("cannot create a temporary directory in {}", parent.display())
                    })?,
            )
        }
    };
    let layout = match (&arguments.layout, &scratch) {
        (Some(layout), _) => layout.clone(),
        (None, Some(scratch)) => scratch.path().join("layout"),
        (None, None) => bail!("internal error: no layout destination"),
    };
    let options = PullOptions {
        registry: arguments.registry.options()?,
        platform,
        ..PullOptions::default()
    };
    let pulled = runtime()?
        .block_on(pull(&arguments.reference, &layout, &options, &progress))
        .with_context(|| format!("cannot pull {}", arguments.reference))?;
    let mut summary = PullSummary {
        reference: arguments.reference.clone(),
        digest: pulled
            .index_digest
            .clone()
            .unwrap_or_else(|| pulled.manifest.digest.clone()),
        layout: arguments.layout.clone(),
        disk: None,
        disk_size: None,
    };
    if let Some(output) = &arguments.output {
        let extracted = extract_disk(&layout, output).with_context(|| {
            format!(
                "cannot extract the VM disk of {} into {}",
                arguments.reference,
                output.display()
            )
        })?;
        summary.disk = Some(output.clone());
        summary.disk_size = Some(extracted.size);
    }
    if arguments.output_flags.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("pulled {}@{}", summary.reference, summary.digest);
        if let Some(disk) = &summary.disk {
            println!(
                "disk:   {} ({} bytes)",
                disk.display(),
                summary.disk_size.unwrap_or(0)
            );
        }
        if let Some(layout) = &summary.layout {
            println!("layout: {}", layout.display());
        }
    }
    Ok(())
}
