//! Shared pieces of the tests that drive the KubeVirt/CDI world on the real control plane: the API
//! resources of the kinds they read as dynamic objects, the `paddock` binary they package and push
//! with, and CDI's insecure-registry setting that lets the simulated importer reach a loopback
//! registry.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{Value, json};
use thiserror::Error;

/// What went wrong preparing the world for a test.
#[derive(Debug, Error)]
pub enum WorldError {
    /// A command could not run or failed.
    #[error("{command} failed: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Its error or output.
        detail: String,
    },
    /// cargo built `paddock` but named no executable.
    #[error(
        "cargo reported no paddock executable; build it with `cargo build -p paddock` or set PADDOCK_BINARY"
    )]
    NoPaddockBinary,
    /// The API server refused a request.
    #[error("cannot update CDIConfig config: {0}")]
    Kube(#[from] kube::Error),
    /// The simulator never created CDI's `config` CDIConfig.
    #[error("the simulator never created CDIConfig config within {0:?}; is kubevirt-simulator running?")]
    NoCdiConfig(Duration),
}

/// An API resource by group, version, kind and plural.
pub fn api_resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// paddock's `VirtualMachineApp`.
pub fn virtual_machine_apps() -> ApiResource {
    api_resource(
        "paddock.dev",
        "v1alpha1",
        "VirtualMachineApp",
        "virtualmachineapps",
    )
}

/// KubeVirt's `VirtualMachine`.
pub fn virtual_machines() -> ApiResource {
    api_resource("kubevirt.io", "v1", "VirtualMachine", "virtualmachines")
}

/// KubeVirt's `VirtualMachineInstance`.
pub fn virtual_machine_instances() -> ApiResource {
    api_resource(
        "kubevirt.io",
        "v1",
        "VirtualMachineInstance",
        "virtualmachineinstances",
    )
}

/// KubeVirt's `VirtualMachineSnapshot`.
pub fn virtual_machine_snapshots() -> ApiResource {
    api_resource(
        "snapshot.kubevirt.io",
        "v1beta1",
        "VirtualMachineSnapshot",
        "virtualmachinesnapshots",
    )
}

/// CDI's `DataVolume`.
pub fn data_volumes() -> ApiResource {
    api_resource("cdi.kubevirt.io", "v1beta1", "DataVolume", "datavolumes")
}

/// CDI's `CDIConfig`.
pub fn cdi_configs() -> ApiResource {
    api_resource("cdi.kubevirt.io", "v1beta1", "CDIConfig", "cdiconfigs")
}

/// The test CRD `BafflesApplication`.
pub fn baffles_applications() -> ApiResource {
    api_resource(
        "app.baffles.dev",
        "v1",
        "BafflesApplication",
        "bafflesapplications",
    )
}

/// Runs a command to success and returns its standard output.
pub fn run(command: &mut Command) -> Result<String, WorldError> {
    let shown = format!("{command:?}");
    let output = command.output().map_err(|error| WorldError::Command {
        command: shown.clone(),
        detail: error.to_string(),
    })?;
    if !output.status.success() {
        return Err(WorldError::Command {
            command: shown,
            detail: format!(
                "{}\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The `paddock` CLI: `PADDOCK_BINARY`, or built once per test process with cargo (whose JSON
/// messages name the executable wherever the target directory is).
pub fn paddock_binary() -> Result<&'static Path, WorldError> {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    if let Some(path) = BINARY.get() {
        return Ok(path);
    }
    let path = match std::env::var_os("PADDOCK_BINARY") {
        Some(path) => PathBuf::from(path),
        None => {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let output = run(Command::new(cargo)
                .current_dir(crate::paths::repository_root())
                .args([
                    "build",
                    "-p",
                    "paddock",
                    "--bin",
                    "paddock",
                    "--message-format=json-render-diagnostics",
                ]))?;
            output
                .lines()
                .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                .filter(|message| {
                    message["reason"] == "compiler-artifact" && message["target"]["name"] == "paddock"
                })
                .find_map(|message| message["executable"].as_str().map(PathBuf::from))
                .ok_or(WorldError::NoPaddockBinary)?
        }
    };
    Ok(BINARY.get_or_init(|| path))
}

/// Lets the simulated importer pull from `registry` (`host:port`) over plain HTTP, through CDIConfig
/// `config`'s `spec.insecureRegistries`, keeping the entries other tests added. Waits up to
/// `timeout` for the simulator to create the CDIConfig.
pub async fn allow_insecure_registry(
    client: &kube::Client,
    registry: &str,
    timeout: Duration,
) -> Result<(), WorldError> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &cdi_configs());
    let deadline = Instant::now() + timeout;
    loop {
        let Some(mut config) = api.get_opt("config").await? else {
            if Instant::now() >= deadline {
                return Err(WorldError::NoCdiConfig(timeout));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut registries: Vec<Value> = config.data["spec"]["insecureRegistries"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if registries.contains(&json!(registry)) {
            return Ok(());
        }
        registries.push(json!(registry));
        config.data["spec"]["insecureRegistries"] = json!(registries);
        // The resourceVersion makes a concurrent edit fail with 409 instead of being lost.
        match api.replace("config", &PostParams::default(), &config).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(error) => return Err(error.into()),
        }
    }
}
