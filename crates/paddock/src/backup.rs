//! `paddock backup create|list|restore`: local VMs backed up to a registry as containerDisk images
//! with their VirtualMachineApp, and restored from there (format: `paddock_oci::backup`).
//!
//! Role: the command line over `paddock_local::backup` and `paddock_oci::backup`.
//!
//! Contract:
//! - `create` and `restore` drive the local runtime directly on the state directory
//!   (`--state-dir`, `PADDOCK_STATE_DIR` or the default), holding its lock for the duration; VMs
//!   keep running before, during and after. While `paddock serve` owns the state directory they
//!   stop with an error that says so (its API has no backup endpoints yet).
//! - `list` only talks to the registry and shows complete backups only.
//! - Progress bars on standard error (not with `--json` or `--quiet`); `--json` prints the
//!   result on standard output.

use std::collections::HashMap;
use std::io::Read;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::ProgressBar;
use paddock_local::backup::{
    BackupOptions, BackupProgress, BackupStage, RestoreOptions, backup, restore, restored_definition,
};
use paddock_local::{Runtime, RuntimeError, RuntimeOptions, VmId};
use paddock_oci::ImageOptions;
use paddock_oci::backup::{BackupEntry, inspect_backup, list_backups};
use paddock_oci::registry::{
    BlobPhase, BlobProgress, Credentials, PushOptions, RegistryOptions, TransferProgress,
};
use serde::Serialize;

use crate::package::LayerCompression;
use crate::progress::{Bars, OutputFlags};
use crate::registry_flags::RegistryFlags;

/// `paddock backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(subcommand)]
    command: BackupCommand,
}

#[derive(Debug, Subcommand)]
enum BackupCommand {
    /// Back a local VM up to a registry repository, tagged `<vm>-<UTC time>`; a running VM is
    /// snapshotted first and keeps running.
    ///
    /// Example: `paddock backup create debian registry.example.com/backups/debian`
    Create(CreateArgs),
    /// List the complete backups in a registry repository.
    ///
    /// Example: `paddock backup list registry.example.com/backups/debian`
    List(ListArgs),
    /// Create a local VM from a backup (under a new name, or replacing an existing VM).
    ///
    /// Example: `paddock backup restore registry.example.com/backups/debian:debian-20261124T205000Z --name debian-copy`
    Restore(RestoreArgs),
}

/// Which local runtime to use.
#[derive(Debug, Clone, Args)]
struct LocalFlags {
    /// The state directory of the local VMs (default $XDG_DATA_HOME/paddock).
    #[arg(long, env = "PADDOCK_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The qemu-system-x86_64 binary (default: found on PATH), for VMs the runtime starts.
    #[arg(long, env = "PADDOCK_QEMU_BINARY", value_name = "PATH")]
    qemu: Option<PathBuf>,
    /// The VM's namespace.
    #[arg(short = 'n', long, default_value = paddock_local::DEFAULT_NAMESPACE)]
    namespace: String,
}

#[derive(Debug, Args)]
#[command(
    after_long_help = "Examples:\n  paddock backup create debian registry.example.com/backups/debian\n  paddock backup create web 127.0.0.1:5000/backups/web --insecure --json"
)]
struct CreateArgs {
    /// The VM to back up.
    vm: String,
    /// The repository the backup goes to: registry/repository (no tag: the backup is tagged
    /// `<vm>-<UTC time>`).
    repository: String,
    #[command(flatten)]
    local: LocalFlags,
    #[command(flatten)]
    registry: RegistryFlags,
    /// Layer compression (see `paddock package --help`).
    #[arg(long, value_enum, default_value = "zstd")]
    compression: LayerCompression,
    /// Upload chunk size in MiB; an interrupted backup resumes at the last finished chunk.
    #[arg(long, default_value_t = 256)]
    chunk_size_mib: u64,
    #[command(flatten)]
    output_flags: OutputFlags,
}

#[derive(Debug, Args)]
struct ListArgs {
    /// The repository: registry/repository.
    repository: String,
    /// Only backups of this VM.
    #[arg(long)]
    vm: Option<String>,
    #[command(flatten)]
    registry: RegistryFlags,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: ListFormat,
}

/// `backup list -o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ListFormat {
    /// One line per backup.
    Table,
    /// JSON, with each backup's VirtualMachineApp.
    Json,
    /// YAML, with each backup's VirtualMachineApp.
    Yaml,
}

#[derive(Debug, Args)]
#[command(
    after_long_help = "The backup's disk is pulled by the runtime, pinned by digest and verified; \
credentials for that pull come from the docker config, plain http is used for loopback registries.\n\n\
Examples:\n  paddock backup restore registry.example.com/backups/debian:debian-20261124T205000Z --name debian-copy\n  \
paddock backup restore 127.0.0.1:5000/backups/web@sha256:… --replace"
)]
struct RestoreArgs {
    /// The backup: registry/repository:tag or registry/repository@sha256:….
    reference: String,
    /// The new VM's name (default: the backed-up VM's).
    #[arg(long)]
    name: Option<String>,
    /// The new VM's namespace (default: the backed-up VM's).
    #[arg(long = "to-namespace", value_name = "NAMESPACE")]
    namespace: Option<String>,
    /// Replace the VM of that name if it exists (deleted, with its snapshots, once the backup is
    /// pulled and verified).
    #[arg(long)]
    replace: bool,
    /// Only print the VirtualMachineApp the restore would create.
    #[arg(long)]
    dry_run: bool,
    /// The state directory of the local VMs (default $XDG_DATA_HOME/paddock).
    #[arg(long, env = "PADDOCK_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The qemu-system-x86_64 binary (default: found on PATH).
    #[arg(long, env = "PADDOCK_QEMU_BINARY", value_name = "PATH")]
    qemu: Option<PathBuf>,
    #[command(flatten)]
    registry: RegistryFlags,
    #[command(flatten)]
    output_flags: OutputFlags,
}

/// Runs `paddock backup …`.
pub fn run(arguments: &BackupArgs) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match &arguments.command {
        BackupCommand::Create(arguments) => tokio.block_on(run_create(arguments)),
        BackupCommand::List(arguments) => tokio.block_on(run_list(arguments)),
        BackupCommand::Restore(arguments) => tokio.block_on(run_restore(arguments)),
    }
}

/// The registry options of `flags` (the password is read from standard input when asked for).
fn registry_options(flags: &RegistryFlags) -> anyhow::Result<RegistryOptions> {
    let credentials = match &flags.username {
        Some(username) => {
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .context("cannot read the password from standard input (--password-stdin)")?;
            let password = password.trim_end_matches(['\n', '\r']).to_owned();
            if password.is_empty() {
                bail!("--password-stdin read an empty password; pipe the password in");
            }
            Some(Credentials {
                username: username.clone(),
                password,
            })
        }
        None => None,
    };
    Ok(RegistryOptions {
        insecure: flags.insecure,
        credentials,
        docker_config_dir: flags.docker_config.clone(),
    })
}

/// Opens the local runtime on the state directory, explaining a state directory `paddock serve`
/// holds.
async fn open_runtime(state_dir: Option<&PathBuf>, qemu: Option<&PathBuf>) -> anyhow::Result<Runtime> {
    let state_dir = state_dir
        .cloned()
        .unwrap_or_else(paddock_local::default_state_dir);
    let mut options = RuntimeOptions::new(&state_dir);
    options.qemu_binary = qemu.cloned();
    match Runtime::open(options).await {
        Ok(runtime) => Ok(runtime),
        Err(RuntimeError::StateLocked { .. }) => bail!(
            "the state directory {} is in use by a running `paddock serve`, which owns its VMs; its API has no backup endpoints yet: stop `paddock serve` (VMs keep running) and run this again",
            state_dir.display()
        ),
        Err(error) => {
            Err(error).with_context(|| format!("cannot open the state directory {}", state_dir.display()))
        }
    }
}

/// Progress bars of a backup: one for building the layer, one per uploading blob.
struct BackupBars {
    bars: Arc<Bars>,
    build: Mutex<Option<ProgressBar>>,
    blobs: Mutex<HashMap<String, ProgressBar>>,
}

impl TransferProgress for BackupBars {
    fn blob(&self, progress: &BlobProgress<'_>) -> ControlFlow<()> {
        let Ok(mut active) = self.blobs.lock() else {
            return ControlFlow::Continue(());
        };
        let short = progress
            .digest
            .trim_start_matches("sha256:")
            .get(..12)
            .unwrap_or(progress.digest);
        match progress.phase {
            BlobPhase::Skipped => self
                .bars
                .println(&format!("push {short}: already in the registry, skipped")),
            BlobPhase::Started | BlobPhase::Transferring => {
                active
                    .entry(progress.digest.to_owned())
                    .or_insert_with(|| self.bars.bytes("push", progress.size))
                    .set_position(progress.done);
            }
            BlobPhase::Finished => {
                if let Some(bar) = active.remove(progress.digest) {
                    bar.finish_and_clear();
                }
            }
        }
        ControlFlow::Continue(())
    }
}

impl BackupProgress for BackupBars {
    fn stage(&self, stage: BackupStage) {
        let Ok(mut build) = self.build.lock() else {
            return;
        };
        if let Some(bar) = build.take() {
            bar.finish_and_clear();
        }
        match stage {
            BackupStage::Exporting => self
                .bars
                .println("snapshotting the disk and copying the snapshot"),
            BackupStage::Building { total } => *build = Some(self.bars.bytes("compress", total)),
            BackupStage::Pushing => {}
        }
    }

    fn built(&self, bytes: u64) {
        if let Ok(build) = self.build.lock()
            && let Some(bar) = build.as_ref()
        {
            bar.inc(bytes);
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CreateSummary {
    reference: String,
    pinned_reference: String,
    digest: String,
    layer_digest: String,
    vm: String,
    phase: String,
    created: String,
    blobs_uploaded: usize,
    bytes_uploaded: u64,
    blobs_skipped: usize,
    bytes_skipped: u64,
    blobs_resumed: usize,
    bytes_resumed: u64,
}

async fn run_create(arguments: &CreateArgs) -> anyhow::Result<()> {
    let id = VmId::new(arguments.local.namespace.clone(), arguments.vm.clone())?;
    let registry = registry_options(&arguments.registry)?;
    let runtime = open_runtime(arguments.local.state_dir.as_ref(), arguments.local.qemu.as_ref()).await?;
    let options = BackupOptions {
        repository: arguments.repository.clone(),
        push: PushOptions {
            registry,
            chunk_size: (arguments.chunk_size_mib > 0).then_some(arguments.chunk_size_mib << 20),
            ..PushOptions::default()
        },
        image: ImageOptions {
            compression: arguments.compression.into(),
            ..ImageOptions::default()
        },
    };
    let progress = Arc::new(BackupBars {
        bars: Arc::new(arguments.output_flags.bars()),
        build: Mutex::new(None),
        blobs: Mutex::new(HashMap::new()),
    });
    let report = backup(&runtime, &id, &options, progress)
        .await
        .with_context(|| format!("cannot back up virtual machine {id} to {}", arguments.repository))?;
    let summary = CreateSummary {
        reference: report.reference.clone(),
        pinned_reference: report.pinned_reference.clone(),
        digest: report.digest.clone(),
        layer_digest: report.layer_digest.clone(),
        vm: id.to_string(),
        phase: report.phase.to_string(),
        created: report.info.created.clone(),
        blobs_uploaded: report.push.blobs_uploaded,
        bytes_uploaded: report.push.bytes_uploaded,
        blobs_skipped: report.push.blobs_skipped,
        bytes_skipped: report.push.bytes_skipped,
        blobs_resumed: report.push.blobs_resumed,
        bytes_resumed: report.push.bytes_resumed,
    };
    if arguments.output_flags.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "backed up {} ({}) as {}",
            summary.vm, summary.phase, summary.reference
        );
        println!(
            "  restore with: paddock backup restore {}",
            summary.pinned_reference
        );
        println!(
            "  {} blobs uploaded ({} bytes, {} resumed), {} already there ({} bytes)",
            summary.blobs_uploaded,
            summary.bytes_uploaded,
            summary.blobs_resumed,
            summary.blobs_skipped,
            summary.bytes_skipped
        );
    }
    Ok(())
}

async fn run_list(arguments: &ListArgs) -> anyhow::Result<()> {
    let registry = registry_options(&arguments.registry)?;
    let mut entries = list_backups(&arguments.repository, &registry)
        .await
        .with_context(|| format!("cannot list the backups in {}", arguments.repository))?;
    if let Some(vm) = &arguments.vm {
        entries.retain(|entry| &entry.info.name == vm);
    }
    match arguments.output {
        ListFormat::Json => println!("{}", serde_json::to_string_pretty(&entries)?),
        ListFormat::Yaml => print!("{}", serde_yaml::to_string(&entries)?),
        ListFormat::Table => print_table(&entries),
    }
    Ok(())
}

fn print_table(entries: &[BackupEntry]) {
    if entries.is_empty() {
        println!("no complete backups");
        return;
    }
    let rows: Vec<[String; 5]> = entries
        .iter()
        .map(|entry| {
            [
                entry.tag.clone(),
                format!("{}/{}", entry.info.namespace, entry.info.name),
                entry.info.created.clone(),
                human_bytes(entry.size),
                entry
                    .info
                    .definition
                    .spec
                    .display_name
                    .clone()
                    .unwrap_or_default(),
            ]
        })
        .collect();
    let header = ["TAG", "VM", "CREATED", "SIZE", "DISPLAY NAME"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: [&str; 5]| {
        let mut text = String::new();
        for (cell, width) in cells.iter().zip(widths) {
            text.push_str(&format!("{cell:<width$}   "));
        }
        println!("{}", text.trim_end());
    };
    line(header);
    for row in &rows {
        line([&row[0], &row[1], &row[2], &row[3], &row[4]]);
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RestoreSummary {
    vm: String,
    restored_from: String,
    phase: String,
    replaced: bool,
}

async fn run_restore(arguments: &RestoreArgs) -> anyhow::Result<()> {
    let registry = registry_options(&arguments.registry)?;
    let entry = inspect_backup(&arguments.reference, &registry)
        .await
        .with_context(|| format!("cannot read the backup {}", arguments.reference))?;
    let options = RestoreOptions {
        name: arguments.name.clone(),
        namespace: arguments.namespace.clone(),
        replace: arguments.replace,
    };
    if arguments.dry_run {
        let app = restored_definition(&entry, &options)?;
        print!("{}", serde_yaml::to_string(&app)?);
        return Ok(());
    }
    let runtime = open_runtime(arguments.state_dir.as_ref(), arguments.qemu.as_ref()).await?;
    let bars = arguments.output_flags.bars();
    bars.println(&format!(
        "restoring {} (taken {} from {}/{})",
        entry.pinned_reference, entry.info.created, entry.info.namespace, entry.info.name
    ));
    let info = restore(&runtime, &entry, &options)
        .await
        .with_context(|| format!("cannot restore {}", entry.pinned_reference))?;
    let summary = RestoreSummary {
        vm: info.id.to_string(),
        restored_from: entry.pinned_reference.clone(),
        phase: info.status.phase.to_string(),
        replaced: arguments.replace,
    };
    if arguments.output_flags.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "restored {} from {} ({})",
            summary.vm, summary.restored_from, summary.phase
        );
    }
    Ok(())
}
