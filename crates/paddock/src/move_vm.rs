//! `paddock move SOURCE DESTINATION --via REPOSITORY`: a VM moved between the local runtime and a
//! cluster (either way, or within one) as a backup restored somewhere else.
//!
//! Role: composes `paddock backup create` and `paddock backup restore` (see `backup`) and checks
//! the copy before anything happens to the source.
//!
//! Contract:
//! - SOURCE and DESTINATION are `local:[namespace/]name` or `cluster:[namespace/]name`; the
//!   namespace defaults to `default`, the destination name to the source's. The cluster is the
//!   one `--kubeconfig`/`--context` name (else `$KUBECONFIG`, `~/.kube/config`, in-cluster).
//! - Steps, in order: back the source up (a running source is snapshotted and keeps running),
//!   restore the backup at the destination with run strategy Always, verify the copy runs —
//!   locally: phase Running and, when the VM has a serial console, output from the guest on it;
//!   in a cluster: its DataVolume (`<name>-disk`) imported, VM `printableStatus` Running and VMI phase Running
//!   (the serial console is not read there) — and only then, with `--delete-source`, stop and
//!   delete the source. Any failing step stops the move with the source untouched and says what
//!   exists and what to do; the copy is never deleted automatically (it may be what the user
//!   wants to inspect).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use paddock_local::backup::{BackupOptions, NoBackupProgress, RestoreOptions, backup, restored_definition};
use paddock_local::{DEFAULT_GRACEFUL_STOP_TIMEOUT, Runtime, RuntimeOptions, VmId, VmPhase};
use paddock_oci::ImageOptions;
use paddock_oci::backup::inspect_backup;
use paddock_oci::registry::PushOptions;

use paddock_cluster::backup::ClusterApis;

use crate::backup::{ClusterFlags, ExportLink};
use crate::progress::OutputFlags;
use crate::registry_flags::RegistryFlags;

/// `paddock move`.
#[derive(Debug, Args)]
#[command(
    after_long_help = "Examples:\n  paddock move local:web cluster:vms/web --via registry.example.com/backups/web\n  \
paddock move cluster:vms/web local:web --via 127.0.0.1:5000/backups/web --insecure --delete-source"
)]
pub struct MoveArgs {
    /// The VM to move: local:[namespace/]name or cluster:[namespace/]name.
    source: String,
    /// Where it goes: local:[namespace/]name or cluster:[namespace/]name (name: the source's when
    /// only `local:` or `cluster:` is given).
    destination: String,
    /// The registry repository the backup goes through (it stays there).
    #[arg(long, value_name = "REGISTRY/REPOSITORY")]
    via: String,
    /// Once the copy runs, stop and delete the source.
    #[arg(long)]
    delete_source: bool,
    /// How long the copy may take to run (cluster: including the disk import), in seconds.
    #[arg(long, default_value_t = 600)]
    verify_timeout_secs: u64,
    /// The state directory of the local VMs (default $XDG_DATA_HOME/paddock).
    #[arg(long, env = "PADDOCK_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The qemu-system-x86_64 binary (default: found on PATH).
    #[arg(long, env = "PADDOCK_QEMU_BINARY", value_name = "PATH")]
    qemu: Option<PathBuf>,
    #[command(flatten)]
    cluster: ClusterFlags,
    /// Which link of the cluster's VirtualMachineExport to read a cluster VM's disk through.
    #[arg(long, value_enum, default_value = "external")]
    export_link: ExportLink,
    #[command(flatten)]
    registry: RegistryFlags,
    #[command(flatten)]
    output_flags: OutputFlags,
}

/// One end of a move.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Place {
    cluster: bool,
    namespace: String,
    name: Option<String>,
}

impl Place {
    fn parse(text: &str) -> anyhow::Result<Place> {
        let (backend, rest) = text.split_once(':').with_context(|| {
            format!("{text:?} names no backend: write local:[namespace/]name or cluster:[namespace/]name")
        })?;
        let cluster = match backend {
            "local" => false,
            "cluster" => true,
            other => bail!("unknown backend {other:?} in {text:?}: use local: or cluster:"),
        };
        let (namespace, name) = match rest.split_once('/') {
            Some((namespace, name)) => (namespace.to_owned(), name),
            None => ("default".to_owned(), rest),
        };
        Ok(Place {
            cluster,
            namespace,
            name: (!name.is_empty()).then(|| name.to_owned()),
        })
    }

    fn describe(&self, name: &str) -> String {
        format!(
            "{} {}/{name}",
            if self.cluster { "cluster" } else { "local" },
            self.namespace
        )
    }
}

/// Runs `paddock move`.
pub fn run(arguments: &MoveArgs) -> anyhow::Result<()> {
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    tokio.block_on(run_move(arguments))
}

async fn open_runtime(arguments: &MoveArgs) -> anyhow::Result<Runtime> {
    let state_dir = arguments
        .state_dir
        .clone()
        .unwrap_or_else(paddock_local::default_state_dir);
    let mut options = RuntimeOptions::new(&state_dir);
    options.qemu_binary = arguments.qemu.clone();
    Runtime::open(options).await.with_context(|| {
        format!(
            "cannot open the state directory {} (while `paddock serve` holds it, stop it first; VMs keep running)",
            state_dir.display()
        )
    })
}

async fn run_move(arguments: &MoveArgs) -> anyhow::Result<()> {
    let source = Place::parse(&arguments.source)?;
    let destination = Place::parse(&arguments.destination)?;
    let Some(source_name) = source.name.clone() else {
        bail!("the source {:?} names no VM", arguments.source);
    };
    let destination_name = destination.name.clone().unwrap_or_else(|| source_name.clone());
    if source == destination
        || (source.cluster == destination.cluster
            && source.namespace == destination.namespace
            && source_name == destination_name)
    {
        bail!("the source and the destination are the same VM");
    }
    let registry = crate::backup::registry_options(&arguments.registry)?;
    let bars = Arc::new(arguments.output_flags.bars());
    let runtime = if !source.cluster || !destination.cluster {
        Some(open_runtime(arguments).await?)
    } else {
        None
    };
    let client = if source.cluster || destination.cluster {
        Some(arguments.cluster.client().await?)
    } else {
        None
    };
    let from = source.describe(&source_name);
    let to = destination.describe(&destination_name);
    let untouched = format!("{from} is untouched");

    // 1. Backup.
    bars.println(&format!("1/4 backing up {from} to {}", arguments.via));
    let push = PushOptions {
        registry: registry.clone(),
        ..PushOptions::default()
    };
    let pinned = match (&runtime, &client, source.cluster) {
        (_, Some(client), true) => {
            let options = paddock_cluster::backup::BackupOptions {
                repository: arguments.via.clone(),
                push,
                image: ImageOptions::default(),
                link: arguments.export_link.into(),
                scratch_parent: None,
            };
            paddock_cluster::backup::backup(
                client,
                &source.namespace,
                &source_name,
                &options,
                Arc::new(paddock_cluster::backup::NoBackupProgress),
            )
            .await
            .with_context(|| format!("the backup failed; {untouched}; fix the cause and run the move again"))?
            .pinned_reference
        }
        (Some(runtime), _, false) => {
            let id = VmId::new(source.namespace.clone(), source_name.clone())?;
            let options = BackupOptions {
                repository: arguments.via.clone(),
                push,
                image: ImageOptions::default(),
            };
            backup(runtime, &id, &options, Arc::new(NoBackupProgress))
                .await
                .with_context(|| {
                    format!("the backup failed; {untouched}; fix the cause and run the move again")
                })?
                .pinned_reference
        }
        _ => bail!("internal error: no backend for the source"),
    };
    bars.println(&format!("   backup {pinned}"));

    // 2. Restore, started.
    bars.println(&format!("2/4 restoring it as {to}"));
    let entry = inspect_backup(&pinned, &registry)
        .await
        .with_context(|| format!("cannot read the backup {pinned} back; {untouched}"))?;
    let options = RestoreOptions {
        name: Some(destination_name.clone()),
        namespace: Some(destination.namespace.clone()),
        replace: false,
    };
    let mut app = restored_definition(&entry, &options)?;
    app.spec.run_strategy = paddock_api::app::RunStrategy::Always;
    let restored = match (&runtime, &client, destination.cluster) {
        (_, Some(client), true) => paddock_cluster::backup::restore(client, &app, false)
            .await
            .map_err(anyhow::Error::from),
        (Some(runtime), _, false) => runtime
            .create(app.clone())
            .await
            .map(|_| ())
            .map_err(anyhow::Error::from),
        _ => bail!("internal error: no backend for the destination"),
    };
    restored.with_context(|| {
        format!("cannot restore {pinned} as {to}; {untouched}; restore it yourself with `paddock backup restore {pinned}`")
    })?;

    // 3. Verify.
    bars.println(&format!("3/4 waiting for {to} to run"));
    let timeout = Duration::from_secs(arguments.verify_timeout_secs);
    let verified = match (&runtime, &client, destination.cluster) {
        (_, Some(client), true) => {
            verify_cluster(client, &destination.namespace, &destination_name, timeout).await
        }
        (Some(runtime), _, false) => {
            let id = VmId::new(destination.namespace.clone(), destination_name.clone())?;
            verify_local(runtime, &id, app.spec.console.serial, timeout).await
        }
        _ => bail!("internal error: no backend for the destination"),
    };
    verified.with_context(|| {
        format!("the copy {to} was created from {pinned} but does not run; {untouched}; inspect the copy, delete it, and run the move again")
    })?;

    // 4. Delete the source.
    if arguments.delete_source {
        bars.println(&format!("4/4 deleting {from}"));
        let deleted = match (&runtime, &client, source.cluster) {
            (_, Some(client), true) => delete_cluster(client, &source.namespace, &source_name).await,
            (Some(runtime), _, false) => {
                let id = VmId::new(source.namespace.clone(), source_name.clone())?;
                delete_local(runtime, &id).await
            }
            _ => bail!("internal error: no backend for the source"),
        };
        deleted.with_context(|| format!("{to} runs, but deleting {from} failed; delete it yourself"))?;
    } else {
        bars.println("4/4 keeping the source (pass --delete-source to delete it)");
    }
    if arguments.output_flags.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "source": from,
                "destination": to,
                "backup": pinned,
                "sourceDeleted": arguments.delete_source,
            }))?
        );
    } else {
        println!("moved {from} to {to} through {pinned}");
    }
    Ok(())
}

/// Phase Running and, with a serial console, output from the guest on it.
async fn verify_local(runtime: &Runtime, id: &VmId, serial: bool, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    // Run strategy Always: the runtime starts it on creation.
    loop {
        let info = runtime.get(id)?;
        if info.status.phase == VmPhase::Running {
            break;
        }
        if Instant::now() > deadline {
            bail!("{id} is {} after {} s", info.status.phase, timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if !serial {
        return Ok(());
    }
    let socket = runtime.serial_socket_path(id)?;
    let mut stream = loop {
        match tokio::net::UnixStream::connect(&socket).await {
            Ok(stream) => break stream,
            Err(error) if Instant::now() > deadline => {
                bail!("cannot open its serial console {}: {error}", socket.display())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A newline makes a guest that already printed its boot log answer (a prompt, a login).
    let _ = stream.write_all(b"\n").await;
    let mut buffer = [0u8; 1024];
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(5));
    match tokio::time::timeout(remaining, stream.read(&mut buffer)).await {
        Ok(Ok(read)) if read > 0 => Ok(()),
        _ => bail!("{id} runs but its guest printed nothing on the serial console"),
    }
}

/// The DataVolume imported, the VM Running, its VMI Running.
async fn verify_cluster(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let apis = ClusterApis::new(client, namespace);
    let deadline = Instant::now() + timeout;
    loop {
        let app = apis.apps.get_opt(name).await?;
        let machine = apis.machines.get_opt(name).await?;
        let instance = apis.instances.get_opt(name).await?;
        let machine_running = machine
            .as_ref()
            .is_some_and(|object| object.data["status"]["printableStatus"] == "Running");
        let instance_running = instance
            .as_ref()
            .is_some_and(|object| object.data["status"]["phase"] == "Running");
        let data_volume = apis.data_volumes.get_opt(&format!("{name}-disk")).await?;
        let imported = data_volume
            .as_ref()
            .is_none_or(|object| object.data["status"]["phase"] == "Succeeded");
        if imported && machine_running && instance_running {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "after {} s: VirtualMachineApp status {}, VM status {}",
                timeout.as_secs(),
                app.map(|object| object.data["status"].to_string())
                    .unwrap_or_else(|| "missing".into()),
                machine
                    .map(|object| object.data["status"]["printableStatus"].to_string())
                    .unwrap_or_else(|| "missing (is the paddock operator running?)".into())
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn delete_local(runtime: &Runtime, id: &VmId) -> anyhow::Result<()> {
    if runtime.get(id)?.status.phase.has_process() {
        runtime.stop(id, DEFAULT_GRACEFUL_STOP_TIMEOUT).await?;
    }
    runtime.delete(id, true).await?;
    Ok(())
}

/// Deletes the VirtualMachineApp (the operator's children go with it) or, for a plain VM, the VM.
async fn delete_cluster(client: &kube::Client, namespace: &str, name: &str) -> anyhow::Result<()> {
    let apis = ClusterApis::new(client, namespace);
    let params = kube::api::DeleteParams::background();
    if apis.apps.get_opt(name).await?.is_some() {
        apis.apps.delete(name, &params).await?;
    } else {
        apis.machines.delete(name, &params).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_parse() {
        assert_eq!(
            Place::parse("cluster:vms/web").unwrap(),
            Place {
                cluster: true,
                namespace: "vms".into(),
                name: Some("web".into())
            }
        );
        assert_eq!(
            Place::parse("local:").unwrap(),
            Place {
                cluster: false,
                namespace: "default".into(),
                name: None
            }
        );
        assert!(Place::parse("web").is_err());
        assert!(Place::parse("remote:web").is_err());
    }
}
