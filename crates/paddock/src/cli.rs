//! Command-line parsing and dispatch. Each subcommand lives in its own function that returns
//! `anyhow::Result`, so every failure reaches the user as one message chain and a non-zero exit code.

use std::{
    io::{Read, Write},
    path::PathBuf,
};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use kube::CustomResourceExt;
use paddock_api::{
    app::VirtualMachineApp,
    builders::{ClusterFacts, ZarfRegistry, desired},
    validation::validate,
};

/// paddock: package, ship and operate virtual machines like containers.
#[derive(Debug, Parser)]
#[command(name = "paddock", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions paddock installs (VirtualMachineApp), as YAML.
    ///
    /// Example: `paddock crd | kubectl apply --server-side -f -`
    Crd,
    /// Check a VirtualMachineApp manifest and list everything wrong with it.
    ///
    /// Example: `paddock validate -f examples/debian.yaml`
    Validate {
        /// The manifest (YAML or JSON); `-` reads standard input.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Print the KubeVirt, CDI and Baffles objects the operator creates for a VirtualMachineApp.
    ///
    /// Example: `paddock render -f examples/debian.yaml --zarf-registry 127.0.0.1:31999`
    Render(RenderArgs),
    /// Turn a VM disk into a containerDisk image (OCI layout, archive, registry) and a
    /// VirtualMachineApp, optionally as a Zarf package directory.
    ///
    /// Example: `paddock package debian-12.qcow2 --image registry.example.com/vms/debian:12 --zarf ./debian-zarf`
    Package(Box<crate::package::PackageArgs>),
    /// Push an OCI image layout to a registry (blobs the registry has are skipped; an interrupted
    /// push resumes).
    ///
    /// Example: `paddock push debian.oci registry.example.com/vms/debian:12`
    Push(crate::registry_flags::PushArgs),
    /// Pull a containerDisk image from a registry and write its VM disk (digests verified).
    ///
    /// Example: `paddock pull registry.example.com/vms/debian:12 -o debian.qcow2`
    Pull(crate::registry_flags::PullArgs),
    /// Serve the REST API, consoles and events for VMs on this machine (QEMU/KVM), on 127.0.0.1
    /// with an access token printed at start. Ctrl-C stops it; VMs keep running.
    ///
    /// Example: `paddock serve --listen 127.0.0.1:8642`
    Serve(crate::serve::ServeArgs),
    /// Manage VMs through `paddock serve`: create, list, get, power, delete, consoles, screenshots.
    ///
    /// Example: `paddock vm create -f examples/debian.yaml && paddock vm console debian`
    Vm(crate::vm::VmArgs),
    /// Manage VM snapshots through `paddock serve`: create (optionally with memory), list,
    /// restore, delete.
    ///
    /// Example: `paddock snapshot create debian before-upgrade --memory`
    Snapshot(crate::vm::SnapshotArgs),
    /// Run the Kubernetes operator: VirtualMachineApps become DataVolumes, VirtualMachines and
    /// BafflesApplications (leader-elected; /healthz, /readyz and /metrics on --listen).
    ///
    /// Example: `paddock operator --namespace vms --console-gateway-url wss://console.example.com`
    Operator(crate::operator::OperatorArgs),
    /// Back local VMs up to a registry as containerDisk images with their VirtualMachineApp, list
    /// the complete backups, restore one as a new or replacing VM.
    ///
    /// Example: `paddock backup create debian registry.example.com/backups/debian`
    Backup(crate::backup::BackupArgs),
    /// Move a VM between the local runtime and a cluster (or within one): backup, restore, verify
    /// it runs, then (with --delete-source) delete the source.
    ///
    /// Example: `paddock move local:web cluster:vms/web --via registry.example.com/backups/web`
    Move(crate::move_vm::MoveArgs),
    /// Upload a disk file into a new DataVolume through CDI's upload proxy (what `virtctl
    /// image-upload` does), with size checks before sending and a progress bar.
    ///
    /// Example: `paddock upload debian-12.qcow2 --name debian-disk --size 12Gi`
    Upload(crate::upload::UploadArgs),
    /// Write the operator's Helm chart (CRDs, RBAC, Deployment, Services, PodDisruptionBudget) and,
    /// beside it, the operator's zarf.yaml.
    ///
    /// Example: `paddock chart --output deploy/chart`
    Chart(crate::chart::ChartArgs),
}

#[derive(Debug, Args)]
struct RenderArgs {
    /// The manifest (YAML or JSON); `-` reads standard input.
    #[arg(short = 'f', long = "filename")]
    file: PathBuf,
    /// Render as if Zarf were installed with its registry at this address.
    #[arg(long, value_name = "HOST:PORT")]
    zarf_registry: Option<String>,
    /// Render as if the Baffles CRD were installed.
    #[arg(long)]
    baffles: bool,
    /// The base URL through which Baffles reaches VNC consoles.
    #[arg(long, default_value = "wss://paddock-console.paddock-system.svc")]
    console_gateway_url: String,
    /// The StorageClass for disks whose manifest names none.
    #[arg(long)]
    default_storage_class: Option<String>,
}

/// Parses the command line, runs the subcommand and turns its outcome into an exit code.
pub fn run() -> std::process::ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Crd => print_crds(),
        Command::Validate { file } => validate_manifest(&file),
        Command::Render(arguments) => render(&arguments),
        Command::Package(arguments) => crate::package::run(&arguments),
        Command::Push(arguments) => crate::registry_flags::run_push(&arguments),
        Command::Pull(arguments) => crate::registry_flags::run_pull(&arguments),
        Command::Serve(arguments) => crate::serve::run(&arguments),
        Command::Vm(arguments) => crate::vm::run_vm(&arguments),
        Command::Snapshot(arguments) => crate::vm::run_snapshot(&arguments),
        Command::Operator(arguments) => crate::operator::run(&arguments),
        Command::Backup(arguments) => crate::backup::run(&arguments),
        Command::Move(arguments) => crate::move_vm::run(&arguments),
        Command::Upload(arguments) => crate::upload::run(&arguments),
        Command::Chart(arguments) => crate::chart::run(&arguments),
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn print_crds() -> anyhow::Result<()> {
    let crd = VirtualMachineApp::crd();
    let mut yaml =
        String::from("# Generated by `paddock crd`; do not edit. CI checks this copy for drift.\n");
    yaml.push_str(&serde_yaml::to_string(&crd)?);
    std::io::stdout().lock().write_all(yaml.as_bytes())?;
    Ok(())
}

fn read_manifest(file: &PathBuf) -> anyhow::Result<VirtualMachineApp> {
    let text = if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the manifest from standard input")?;
        text
    } else {
        std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the manifest {}", file.display()))?
    };
    let app: VirtualMachineApp = serde_yaml::from_str(&text).with_context(|| {
        format!(
            "{} is not a VirtualMachineApp (apiVersion: paddock.dev/v1alpha1, kind: VirtualMachineApp)",
            file.display()
        )
    })?;
    Ok(app)
}

fn validate_manifest(file: &PathBuf) -> anyhow::Result<()> {
    let app = read_manifest(file)?;
    if let Err(invalid) = validate(&app) {
        let mut message = format!("{} is invalid:", file.display());
        for violation in &invalid.violations {
            message.push_str(&format!("\n  - {violation}"));
        }
        anyhow::bail!(message);
    }
    println!(
        "{}: valid",
        app.metadata.name.as_deref().unwrap_or("VirtualMachineApp")
    );
    Ok(())
}

fn render(arguments: &RenderArgs) -> anyhow::Result<()> {
    let mut app = read_manifest(&arguments.file)?;
    // A manifest on disk has not been through the API server yet; give it what the server would.
    app.metadata.namespace.get_or_insert_with(|| "default".to_owned());
    app.metadata
        .uid
        .get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".to_owned());
    let facts = ClusterFacts {
        zarf: arguments
            .zarf_registry
            .clone()
            .map(|address| ZarfRegistry { address }),
        baffles_installed: arguments.baffles,
        console_gateway_url: arguments.console_gateway_url.clone(),
        default_storage_class: arguments.default_storage_class.clone(),
    };
    let desired = desired(&app, &facts)?;
    let documents = desired
        .to_json()?
        .iter()
        .map(serde_yaml::to_string)
        .collect::<Result<Vec<_>, _>>()?;
    std::io::stdout()
        .lock()
        .write_all(documents.join("---\n").as_bytes())?;
    Ok(())
}
