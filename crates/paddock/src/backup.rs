//! `paddock backup create|list|restore`: local VMs backed up to a registry as containerDisk images
//! with their VirtualMachineApp, and restored from there (format: `paddock_oci::backup`).
//!
//! Role: the command line over `paddock_local::backup` and `paddock_oci::backup`.
//!
//! Contract:
//! - `create` and `restore` drive the local runtime directly on the state directory
//!   (`--state-dir`, `PADDOCK_STATE_DIR` or the default), holding its lock for the duration; VMs
//!   keep running before, during and after. While `paddock serve` owns the state directory they
//!   stop with an error that says so and names the console's backup endpoints instead.
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
use paddock_oci::registry::{BlobProgress, Credentials, PushOptions, RegistryOptions, TransferProgress};
use serde::Serialize;

use crate::package::LayerCompression;
use paddock_cluster::backup::BackupStage as ClusterBackupStage;

use crate::progress::{Bars, OutputFlags};
use crate::registry_flags::{RegistryFlags, show_blob_progress};

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
    /// The VM to back up (a VirtualMachineApp, or with --cluster also a plain KubeVirt VM).
    vm: String,
    /// The repository the backup goes to: registry/repository (no tag: the backup is tagged
    /// `<vm>-<UTC time>`).
    repository: String,
    #[command(flatten)]
    local: LocalFlags,
    #[command(flatten)]
    cluster: ClusterFlags,
    /// Which link of the cluster's VirtualMachineExport to read the disk through.
    #[arg(long, value_enum, default_value = "external")]
    export_link: ExportLink,
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
    /// Start the restored VM (run strategy Always), whatever the backed-up VM's was.
    #[arg(long)]
    start: bool,
    #[command(flatten)]
    cluster: ClusterFlags,
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
pub(crate) fn registry_options(flags: &RegistryFlags) -> anyhow::Result<RegistryOptions> {
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
            "the state directory {} is in use by a running `paddock serve`, which owns its VMs; back up and restore through it (the web console's Backups section, or POST /api/v1/vms/{{namespace}}/{{name}}/backups), or stop `paddock serve` (VMs keep running) and run this again",
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
        show_blob_progress(&self.bars, "push", &self.blobs, progress)
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
        self.advance(bytes);
    }
}

impl BackupBars {
    fn new(bars: Arc<Bars>) -> BackupBars {
        BackupBars {
            bars,
            build: Mutex::new(None),
            blobs: Mutex::new(HashMap::new()),
        }
    }

    fn advance(&self, bytes: u64) {
        if let Ok(build) = self.build.lock()
            && let Some(bar) = build.as_ref()
        {
            bar.inc(bytes);
        }
    }
}

impl paddock_cluster::backup::BackupProgress for BackupBars {
    fn stage(&self, stage: ClusterBackupStage) {
        let Ok(mut current) = self.build.lock() else {
            return;
        };
        if let Some(bar) = current.take() {
            bar.finish_and_clear();
        }
        match stage {
            ClusterBackupStage::Downloading { total } => *current = Some(self.bars.bytes("download", total)),
            ClusterBackupStage::Building { total } => *current = Some(self.bars.bytes("compress", total)),
            ClusterBackupStage::Converting => self.bars.println("converting the disk to qcow2"),
            ClusterBackupStage::Snapshotting
            | ClusterBackupStage::Exporting
            | ClusterBackupStage::Pushing => {}
        }
    }

    fn advanced(&self, bytes: u64) {
        self.advance(bytes);
    }

    fn message(&self, text: &str) {
        self.bars.println(text);
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

impl CreateSummary {
    /// The summary of a backup: `[reference, pinned reference, digest, layer digest]`, the VM, its
    /// phase when backed up, when, and what the push did.
    fn new(
        [reference, pinned_reference, digest, layer_digest]: [&String; 4],
        vm: String,
        phase: String,
        created: &str,
        push: &paddock_oci::registry::PushReport,
    ) -> CreateSummary {
        CreateSummary {
            reference: reference.clone(),
            pinned_reference: pinned_reference.clone(),
            digest: digest.clone(),
            layer_digest: layer_digest.clone(),
            vm,
            phase,
            created: created.to_owned(),
            blobs_uploaded: push.blobs_uploaded,
            bytes_uploaded: push.bytes_uploaded,
            blobs_skipped: push.blobs_skipped,
            bytes_skipped: push.bytes_skipped,
            blobs_resumed: push.blobs_resumed,
            bytes_resumed: push.bytes_resumed,
        }
    }
}

async fn run_create(arguments: &CreateArgs) -> anyhow::Result<()> {
    let id = VmId::new(arguments.local.namespace.clone(), arguments.vm.clone())?;
    let registry = registry_options(&arguments.registry)?;
    if arguments.cluster.enabled() {
        return run_cluster_create(arguments, registry).await;
    }
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
    let progress = Arc::new(BackupBars::new(Arc::new(arguments.output_flags.bars())));
    let report = backup(&runtime, &id, &options, progress)
        .await
        .with_context(|| format!("cannot back up virtual machine {id} to {}", arguments.repository))?;
    let summary = CreateSummary::new(
        [
            &report.reference,
            &report.pinned_reference,
            &report.digest,
            &report.layer_digest,
        ],
        id.to_string(),
        report.phase.to_string(),
        &report.info.created,
        &report.push,
    );
    print_create_summary(&summary, arguments.output_flags.json)
}

async fn run_cluster_create(arguments: &CreateArgs, registry: RegistryOptions) -> anyhow::Result<()> {
    let client = arguments.cluster.client().await?;
    let options = paddock_cluster::backup::BackupOptions {
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
        link: arguments.export_link.into(),
        scratch_parent: None,
    };
    let progress = Arc::new(BackupBars::new(Arc::new(arguments.output_flags.bars())));
    let namespace = &arguments.local.namespace;
    let report = paddock_cluster::backup::backup(&client, namespace, &arguments.vm, &options, progress)
        .await
        .with_context(|| {
            format!(
                "cannot back up {namespace}/{} from the cluster to {}",
                arguments.vm, arguments.repository
            )
        })?;
    let summary = CreateSummary::new(
        [
            &report.reference,
            &report.pinned_reference,
            &report.digest,
            &report.layer_digest,
        ],
        format!("{namespace}/{}", arguments.vm),
        if report.running { "Running" } else { "Stopped" }.to_owned(),
        &report.info.created,
        &report.push,
    );
    print_create_summary(&summary, arguments.output_flags.json)
}

fn print_create_summary(summary: &CreateSummary, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(summary)?);
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
    let mut app = restored_definition(&entry, &options)?;
    if arguments.start {
        app.spec.run_strategy = paddock_api::app::RunStrategy::Always;
    }
    if arguments.dry_run {
        print!("{}", serde_yaml::to_string(&app)?);
        return Ok(());
    }
    if arguments.cluster.enabled() {
        let client = arguments.cluster.client().await?;
        paddock_cluster::backup::restore(&client, &app, arguments.replace)
            .await
            .with_context(|| format!("cannot restore {}", entry.pinned_reference))?;
        let summary = RestoreSummary {
            vm: format!(
                "{}/{}",
                app.metadata.namespace.clone().unwrap_or_default(),
                app.metadata.name.clone().unwrap_or_default()
            ),
            restored_from: entry.pinned_reference.clone(),
            phase: "Created".to_owned(),
            replaced: arguments.replace,
        };
        if arguments.output_flags.json {
            println!("{}", serde_json::to_string_pretty(&summary)?);
        } else {
            println!(
                "created VirtualMachineApp {} from {}; the cluster imports the disk and starts it per its run strategy",
                summary.vm, summary.restored_from
            );
        }
        return Ok(());
    }
    let runtime = open_runtime(arguments.state_dir.as_ref(), arguments.qemu.as_ref()).await?;
    let bars = arguments.output_flags.bars();
    bars.println(&format!(
        "restoring {} (taken {} from {}/{})",
        entry.pinned_reference, entry.info.created, entry.info.namespace, entry.info.name
    ));
    let mut info = restore(&runtime, &entry, &options)
        .await
        .with_context(|| format!("cannot restore {}", entry.pinned_reference))?;
    if arguments.start && !info.status.phase.has_process() {
        info = runtime
            .start(&info.id)
            .await
            .with_context(|| format!("restored {}, but cannot start it", info.id))?;
    }
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

// ---------------------------------------------------------------------------------------------
// Cluster backups and restores.
// ---------------------------------------------------------------------------------------------

/// Which cluster a backup or restore acts on; without `--cluster` or `--kubeconfig` it acts on
/// the local runtime.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct ClusterFlags {
    /// Act on a Kubernetes cluster with KubeVirt (the current kubeconfig's) instead of the local
    /// runtime.
    #[arg(long)]
    pub(crate) cluster: bool,
    /// The kubeconfig of the cluster (implies --cluster; default: $KUBECONFIG, else ~/.kube/config,
    /// else in-cluster).
    #[arg(long, value_name = "FILE")]
    pub(crate) kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current context).
    #[arg(long)]
    pub(crate) context: Option<String>,
}

impl ClusterFlags {
    /// Whether these flags name a cluster.
    pub(crate) fn enabled(&self) -> bool {
        self.cluster || self.kubeconfig.is_some()
    }

    /// A client for the cluster.
    pub(crate) async fn client(&self) -> anyhow::Result<kube::Client> {
        let options = kube::config::KubeConfigOptions {
            context: self.context.clone(),
            ..kube::config::KubeConfigOptions::default()
        };
        let config = match &self.kubeconfig {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("cannot read the kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .with_context(|| format!("cannot use the kubeconfig {}", path.display()))?
            }
            None if self.context.is_some() => kube::Config::from_kubeconfig(&options)
                .await
                .context("cannot use the kubeconfig context given with --context")?,
            None => kube::Config::infer()
                .await
                .context("cannot find a cluster: pass --kubeconfig or set KUBECONFIG")?,
        };
        kube::Client::try_from(config).context("cannot set up the Kubernetes client")
    }
}

/// Which of an export's links a cluster backup reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub(crate) enum ExportLink {
    /// Through the export proxy (`status.links.external`): from outside the cluster.
    #[default]
    External,
    /// From the export server's Service (`status.links.internal`): from inside the cluster.
    Internal,
}

impl From<ExportLink> for paddock_cluster::backup::ExportLink {
    fn from(link: ExportLink) -> Self {
        match link {
            ExportLink::External => paddock_cluster::backup::ExportLink::External,
            ExportLink::Internal => paddock_cluster::backup::ExportLink::Internal,
        }
    }
}
