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
    print_create_summary(&summary, arguments.output_flags.json)
}

async fn run_cluster_create(arguments: &CreateArgs, registry: RegistryOptions) -> anyhow::Result<()> {
    let client = arguments.cluster.client().await?;
    let options = ClusterBackupOptions {
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
        link: arguments.export_link,
    };
    let bars = Arc::new(arguments.output_flags.bars());
    let progress = Arc::new(BackupBars {
        bars: Arc::clone(&bars),
        build: Mutex::new(None),
        blobs: Mutex::new(HashMap::new()),
    });
    let namespace = &arguments.local.namespace;
    let report = cluster_backup(&client, namespace, &arguments.vm, &options, &bars, progress)
        .await
        .with_context(|| {
            format!(
                "cannot back up {namespace}/{} from the cluster to {}",
                arguments.vm, arguments.repository
            )
        })?;
    let summary = CreateSummary {
        reference: report.reference.clone(),
        pinned_reference: report.pinned_reference.clone(),
        digest: report.digest.clone(),
        layer_digest: report.layer_digest.clone(),
        vm: format!("{namespace}/{}", arguments.vm),
        phase: if report.running { "Running" } else { "Stopped" }.to_owned(),
        created: report.info.created.clone(),
        blobs_uploaded: report.push.blobs_uploaded,
        bytes_uploaded: report.push.bytes_uploaded,
        blobs_skipped: report.push.blobs_skipped,
        bytes_skipped: report.push.bytes_skipped,
        blobs_resumed: report.push.blobs_resumed,
        bytes_resumed: report.push.bytes_resumed,
    };
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
        cluster_restore(&client, &app, arguments.replace)
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

/// How long a cluster backup waits for the snapshot and then the export to be ready.
const CLUSTER_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

fn api_resource(group: &str, version: &str, kind: &str, plural: &str) -> kube::api::ApiResource {
    kube::api::ApiResource {
        group: group.to_owned(),
        version: version.to_owned(),
        api_version: if group.is_empty() {
            version.to_owned()
        } else {
            format!("{group}/{version}")
        },
        kind: kind.to_owned(),
        plural: plural.to_owned(),
    }
}

type Dynamic = kube::Api<kube::api::DynamicObject>;

/// The namespaced APIs a cluster backup or restore uses.
pub(crate) struct ClusterApis {
    pub(crate) apps: Dynamic,
    pub(crate) machines: Dynamic,
    pub(crate) instances: Dynamic,
    pub(crate) data_volumes: Dynamic,
    snapshots: Dynamic,
    exports: Dynamic,
    secrets: Dynamic,
}

impl ClusterApis {
    /// The APIs in `namespace`.
    pub(crate) fn new(client: &kube::Client, namespace: &str) -> ClusterApis {
        let api =
            |resource: kube::api::ApiResource| Dynamic::namespaced_with(client.clone(), namespace, &resource);
        ClusterApis {
            apps: api(api_resource(
                "paddock.dev",
                "v1alpha1",
                "VirtualMachineApp",
                "virtualmachineapps",
            )),
            machines: api(api_resource(
                "kubevirt.io",
                "v1",
                "VirtualMachine",
                "virtualmachines",
            )),
            instances: api(api_resource(
                "kubevirt.io",
                "v1",
                "VirtualMachineInstance",
                "virtualmachineinstances",
            )),
            data_volumes: api(api_resource(
                "cdi.kubevirt.io",
                "v1beta1",
                "DataVolume",
                "datavolumes",
            )),
            snapshots: api(api_resource(
                "snapshot.kubevirt.io",
                "v1beta1",
                "VirtualMachineSnapshot",
                "virtualmachinesnapshots",
            )),
            exports: api(api_resource(
                "export.kubevirt.io",
                "v1beta1",
                "VirtualMachineExport",
                "virtualmachineexports",
            )),
            secrets: api(api_resource("", "v1", "Secret", "secrets")),
        }
    }
}

/// What a cluster backup needs besides the cluster.
pub(crate) struct ClusterBackupOptions {
    /// `registry/repository`.
    pub(crate) repository: String,
    /// Registry access and chunking.
    pub(crate) push: PushOptions,
    /// Layer compression.
    pub(crate) image: ImageOptions,
    /// Which export link to read.
    pub(crate) link: ExportLink,
}

/// What a cluster backup did (the local backup's report fields that apply).
pub(crate) struct ClusterBackupReport {
    pub(crate) reference: String,
    pub(crate) pinned_reference: String,
    pub(crate) digest: String,
    pub(crate) layer_digest: String,
    pub(crate) running: bool,
    pub(crate) info: paddock_oci::backup::BackupInfo,
    pub(crate) push: paddock_oci::registry::PushReport,
}

/// The VirtualMachineApp a plain KubeVirt VM is backed up as: its name, namespace, labels and
/// annotations, CPU cores (`domain.cpu.cores`), memory (`domain.memory.guest`, else the memory
/// request), run strategy (or `running`), and a disk of `disk_size` bytes; the image is set by the
/// restore. Everything else (devices, networks, further volumes, instancetypes, cloud-init) is not
/// carried.
fn definition_of_machine(
    machine: &kube::api::DynamicObject,
    disk_size: u64,
) -> anyhow::Result<paddock_api::app::VirtualMachineApp> {
    let spec = &machine.data["spec"];
    let domain = &spec["template"]["spec"]["domain"];
    let memory = domain["memory"]["guest"]
        .as_str()
        .or_else(|| domain["resources"]["requests"]["memory"].as_str());
    let run_strategy = spec["runStrategy"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| {
            if spec["running"].as_bool() == Some(true) {
                "Always".to_owned()
            } else {
                "Halted".to_owned()
            }
        });
    let mut resources = serde_json::json!({ "cpu": domain["cpu"]["cores"].as_u64().unwrap_or(1) });
    if let Some(memory) = memory {
        resources["memory"] = serde_json::json!(memory);
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "paddock.dev/v1alpha1",
        "kind": "VirtualMachineApp",
        "metadata": {
            "name": machine.metadata.name,
            "namespace": machine.metadata.namespace,
            "labels": machine.metadata.labels,
            "annotations": machine.metadata.annotations,
        },
        "spec": {
            "image": {"containerDisk": "restore-sets-this"},
            "resources": resources,
            "disk": {"size": disk_size.to_string()},
            "runStrategy": run_strategy,
        },
    }))
    .context("cannot express the KubeVirt VM as a VirtualMachineApp")
}

/// Waits until `ready` says the object is ready (`Ok(true)`) or failed (`Err`).
async fn wait_for(
    api: &Dynamic,
    name: &str,
    what: &str,
    ready: impl Fn(&kube::api::DynamicObject) -> anyhow::Result<bool>,
) -> anyhow::Result<kube::api::DynamicObject> {
    let deadline = std::time::Instant::now() + CLUSTER_WAIT;
    loop {
        let object = api
            .get_opt(name)
            .await
            .with_context(|| format!("cannot read {what} {name}"))?;
        if let Some(object) = object {
            if ready(&object)? {
                return Ok(object);
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "{what} {name} is not ready after {} s: {}; check the KubeVirt controllers",
                    CLUSTER_WAIT.as_secs(),
                    serde_json::to_string(&object.data["status"]).unwrap_or_default()
                );
            }
        } else if std::time::Instant::now() > deadline {
            bail!("{what} {name} does not exist");
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Backs up VirtualMachineApp (or KubeVirt VM) `namespace/name`: snapshot when it runs, export,
/// download the disk, build and push the backup image; the export and snapshot are deleted
/// afterwards whatever happened.
pub(crate) async fn cluster_backup(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    options: &ClusterBackupOptions,
    bars: &Bars,
    progress: Arc<dyn TransferProgress>,
) -> anyhow::Result<ClusterBackupReport> {
    let apis = ClusterApis::new(client, namespace);
    let app = apis
        .apps
        .get_opt(name)
        .await
        .with_context(|| format!("cannot read VirtualMachineApp {namespace}/{name}"))?;
    let machine = apis
        .machines
        .get_opt(name)
        .await
        .with_context(|| format!("cannot read VirtualMachine {namespace}/{name}"))?;
    let Some(machine) = machine else {
        bail!(
            "there is no KubeVirt VirtualMachine {namespace}/{name}{}; check the name and --namespace",
            if app.is_some() {
                " (its VirtualMachineApp exists: wait until the operator created the VM)"
            } else {
                " and no VirtualMachineApp"
            }
        );
    };
    let running = apis
        .instances
        .get_opt(name)
        .await
        .with_context(|| format!("cannot read VirtualMachineInstance {namespace}/{name}"))?
        .is_some();
    let (created, created_tag) = paddock_oci::backup::utc_timestamp(std::time::SystemTime::now());
    let object_name = {
        let mut object_name = format!("{name}-backup-{}", created_tag.to_lowercase());
        object_name.truncate(52);
        object_name.trim_end_matches('-').to_owned()
    };
    let scratch = tempfile::Builder::new()
        .prefix("paddock-cluster-backup-")
        .tempdir()
        .context("cannot create a scratch directory for the disk")?;
    let result = cluster_backup_in(
        &apis,
        (namespace, name, &object_name, &created, &created_tag),
        (app, &machine, running),
        options,
        scratch.path(),
        bars,
        progress,
    )
    .await;
    // Clean up whatever was created, also after a failure.
    let delete = kube::api::DeleteParams::default();
    let mut leftovers = Vec::new();
    if let Err(error) = apis.exports.delete(&object_name, &delete).await
        && !matches!(&error, kube::Error::Api(response) if response.code == 404)
    {
        leftovers.push(format!("VirtualMachineExport {namespace}/{object_name}: {error}"));
    }
    if running
        && let Err(error) = apis.snapshots.delete(&object_name, &delete).await
        && !matches!(&error, kube::Error::Api(response) if response.code == 404)
    {
        leftovers.push(format!(
            "VirtualMachineSnapshot {namespace}/{object_name}: {error}"
        ));
    }
    if !leftovers.is_empty() {
        bars.println(&format!(
            "warning: cannot delete {}; delete it with kubectl",
            leftovers.join(", ")
        ));
    }
    result
}

async fn cluster_backup_in(
    apis: &ClusterApis,
    (namespace, name, object_name, created, created_tag): (&str, &str, &str, &str, &str),
    (app, machine, running): (Option<kube::api::DynamicObject>, &kube::api::DynamicObject, bool),
    options: &ClusterBackupOptions,
    scratch: &std::path::Path,
    bars: &Bars,
    progress: Arc<dyn TransferProgress>,
) -> anyhow::Result<ClusterBackupReport> {
    let post = kube::api::PostParams::default();
    let source = if running {
        bars.println(&format!(
            "{namespace}/{name} is running: taking VirtualMachineSnapshot {object_name}"
        ));
        let snapshot: kube::api::DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "snapshot.kubevirt.io/v1beta1",
            "kind": "VirtualMachineSnapshot",
            "metadata": {"name": object_name, "labels": {"paddock.dev/backup-of": name}},
            "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": name}},
        }))?;
        apis.snapshots
            .create(&post, &snapshot)
            .await
            .with_context(|| format!("cannot create VirtualMachineSnapshot {namespace}/{object_name}"))?;
        wait_for(&apis.snapshots, object_name, "VirtualMachineSnapshot", |object| {
            let status = &object.data["status"];
            if status["phase"] == "Failed" {
                bail!(
                    "VirtualMachineSnapshot {object_name} failed: {}",
                    serde_json::to_string(&status["error"]).unwrap_or_default()
                );
            }
            Ok(status["readyToUse"].as_bool() == Some(true))
        })
        .await?;
        serde_json::json!({"apiGroup": "snapshot.kubevirt.io", "kind": "VirtualMachineSnapshot", "name": object_name})
    } else {
        serde_json::json!({"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": name})
    };
    bars.println(&format!(
        "exporting the disk (VirtualMachineExport {object_name})"
    ));
    let export: kube::api::DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "export.kubevirt.io/v1beta1",
        "kind": "VirtualMachineExport",
        "metadata": {"name": object_name, "labels": {"paddock.dev/backup-of": name}},
        "spec": {"source": source, "ttlDuration": "1h"},
    }))?;
    apis.exports
        .create(&post, &export)
        .await
        .with_context(|| format!("cannot create VirtualMachineExport {namespace}/{object_name}"))?;
    let export = wait_for(&apis.exports, object_name, "VirtualMachineExport", |object| {
        Ok(object.data["status"]["phase"] == "Ready")
    })
    .await?;
    let status = &export.data["status"];
    let token_secret = status["tokenSecretRef"]
        .as_str()
        .context("the export is Ready but names no token secret (status.tokenSecretRef)")?;
    let secret = apis
        .secrets
        .get(token_secret)
        .await
        .with_context(|| format!("cannot read the export token Secret {namespace}/{token_secret}"))?;
    let token = secret.data["data"]["token"]
        .as_str()
        .context("the export token Secret has no `token`")
        .and_then(|encoded| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .context("the export token is not base64")
        })?;
    let token = String::from_utf8(token).context("the export token is not text")?;
    let link_kind = match options.link {
        ExportLink::External => "external",
        ExportLink::Internal => "internal",
    };
    let link = &status["links"][link_kind];
    let volumes = link["volumes"].as_array().with_context(|| {
        format!("the export has no {link_kind} link; try --export-link internal (from inside the cluster) or configure KubeVirt's export proxy ingress")
    })?;
    let preferred = format!("{name}-disk");
    let volume = volumes
        .iter()
        .find(|volume| volume["name"] == preferred.as_str())
        .or_else(|| volumes.first())
        .context("the export lists no volume")?;
    let url = volume["formats"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|format| format["format"] == "raw")
        .and_then(|format| format["url"].as_str())
        .context("the export offers no raw (disk.img) format for the volume")?;
    let mut http = reqwest::Client::builder()
        .user_agent(concat!("paddock/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(std::time::Duration::from_secs(30))
        .read_timeout(std::time::Duration::from_secs(300));
    if let Some(certificate) = link["cert"].as_str().filter(|text| !text.is_empty()) {
        let certificates = reqwest::Certificate::from_pem_bundle(certificate.as_bytes())
            .context("the export link's cert is not PEM")?;
        http = http.tls_certs_merge(certificates);
    }
    let http = http
        .build()
        .context("cannot set up the HTTP client for the export")?;
    let response = http
        .get(url)
        .header("x-kubevirt-export-token", &token)
        .send()
        .await
        .with_context(|| format!("cannot download {url}"))?;
    if !response.status().is_success() {
        let code = response.status();
        let body = response.text().await.unwrap_or_default();
        bail!("the export server answered {code} for {url}: {}", body.trim());
    }
    let raw_path = scratch.join("disk.img");
    let bar = bars.bytes("download", response.content_length().unwrap_or(0));
    {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        let mut file = tokio::fs::File::create(&raw_path)
            .await
            .with_context(|| format!("cannot create {}", raw_path.display()))?;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.with_context(|| format!("the download of {url} broke off; run the backup again"))?;
            file.write_all(&chunk)
                .await
                .with_context(|| format!("cannot write {}; check free space", raw_path.display()))?;
            bar.inc(chunk.len() as u64);
        }
        file.flush().await?;
    }
    bar.finish_and_clear();
    let virtual_size = std::fs::metadata(&raw_path)?.len();
    // Only allocated clusters are kept, as a local backup's flattened qcow2.
    let disk = scratch.join("disk.qcow2");
    let output = tokio::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw_path)
        .arg(&disk)
        .output()
        .await
        .context("cannot run qemu-img; install qemu-utils")?;
    if !output.status.success() {
        bail!(
            "qemu-img convert of the exported disk failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let _ = std::fs::remove_file(&raw_path);
    let definition = match app {
        Some(app) => serde_json::from_value(serde_json::to_value(&app)?)
            .context("the VirtualMachineApp does not parse")?,
        None => definition_of_machine(machine, virtual_size)?,
    };
    let repository = paddock_api::image_reference::ImageReference::parse(&options.repository)
        .with_context(|| format!("invalid repository {}", options.repository))?
        .name();
    let tag = paddock_oci::backup::backup_tag(name, created_tag);
    let reference = format!("{repository}:{tag}");
    let info = paddock_oci::backup::BackupInfo {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        created: created.to_owned(),
        disk_virtual_size: virtual_size,
        definition: paddock_oci::backup::portable_definition(&definition),
    };
    let image_options = ImageOptions {
        tag: tag.clone(),
        reference: Some(reference.clone()),
        ..options.image.clone()
    };
    let layout = scratch.join("layout");
    let disk_bytes = std::fs::metadata(&disk)?.len();
    let build_bar = bars.bytes("compress", disk_bytes);
    let built = {
        let (layout, info, build_bar) = (layout.clone(), info.clone(), build_bar.clone());
        tokio::task::spawn_blocking(move || {
            let mut report = |bytes: u64| build_bar.inc(bytes);
            paddock_oci::backup::build_backup_layout(&disk, &layout, &info, &image_options, &mut report)
        })
        .await
        .context("the image build task failed")??
    };
    build_bar.finish_and_clear();
    let push_options = PushOptions {
        image: None,
        ..options.push.clone()
    };
    let report = paddock_oci::registry::push(&layout, &reference, &push_options, progress.as_ref())
        .await
        .with_context(|| format!("cannot push the backup to {reference}; run the backup again"))?;
    Ok(ClusterBackupReport {
        pinned_reference: format!("{repository}@{}", built.manifest_digest),
        reference,
        digest: built.manifest_digest,
        layer_digest: built.image.layer.digest,
        running,
        info,
        push: report,
    })
}

/// Creates the VirtualMachineApp of a restore in the cluster (replacing one of that name when
/// `replace`); the operator makes its DataVolume (importing the backup by digest) and VM.
pub(crate) async fn cluster_restore(
    client: &kube::Client,
    app: &paddock_api::app::VirtualMachineApp,
    replace: bool,
) -> anyhow::Result<()> {
    let namespace = app
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let name = app.metadata.name.clone().unwrap_or_default();
    let apis = ClusterApis::new(client, &namespace);
    if apis
        .apps
        .get_opt(&name)
        .await
        .with_context(|| format!("cannot read VirtualMachineApp {namespace}/{name}"))?
        .is_some()
    {
        if !replace {
            bail!("VirtualMachineApp {namespace}/{name} exists; pass --replace or choose another --name");
        }
        apis.apps
            .delete(&name, &kube::api::DeleteParams::foreground())
            .await
            .with_context(|| format!("cannot delete VirtualMachineApp {namespace}/{name}"))?;
        let deadline = std::time::Instant::now() + CLUSTER_WAIT;
        while apis.apps.get_opt(&name).await?.is_some() {
            if std::time::Instant::now() > deadline {
                bail!("VirtualMachineApp {namespace}/{name} is still being deleted; try again later");
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }
    let object: kube::api::DynamicObject = serde_json::from_value(serde_json::to_value(app)?)?;
    apis.apps
        .create(&kube::api::PostParams::default(), &object)
        .await
        .with_context(|| format!("cannot create VirtualMachineApp {namespace}/{name}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_kubevirt_vm_becomes_a_virtual_machine_app() {
        let machine: kube::api::DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "metadata": {"name": "db", "namespace": "team", "labels": {"tier": "data"}, "uid": "1"},
            "spec": {
                "running": true,
                "template": {"spec": {"domain": {"cpu": {"cores": 2}, "memory": {"guest": "1Gi"}}}},
            },
        }))
        .unwrap();
        let app = definition_of_machine(&machine, 64 << 20).unwrap();
        let value = serde_json::to_value(&app).unwrap();
        assert_eq!(value["metadata"]["name"], "db");
        assert_eq!(value["metadata"]["labels"]["tier"], "data");
        assert_eq!(value["spec"]["resources"]["cpu"], 2);
        assert_eq!(value["spec"]["resources"]["memory"], "1Gi");
        assert_eq!(value["spec"]["runStrategy"], "Always");
        assert_eq!(value["spec"]["disk"]["size"], (64u64 << 20).to_string());
    }
}
