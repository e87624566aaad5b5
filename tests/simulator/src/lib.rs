//! The KubeVirt and CDI simulator: virt-api's aggregated subresources plus the simulated controllers
//! (`paddock-kubevirt-controllers`), run against a real kube-apiserver for integration tests. A test
//! double, never shipped; `tests/README.md` says exactly what is real and what is simulated.
//!
//! Role: [`run`] is the whole `kubevirt-simulator` process:
//! - it serves `subresources.kubevirt.io/v1` (start, stop, restart, migrate, pause, unpause,
//!   softreboot, vnc, console, vnc/screenshot; see [`lifecycle`] and [`consoles`]) and the controllers'
//!   `upload.cdi.kubevirt.io/v1beta1` over TLS on 127.0.0.1, authenticating kube-apiserver's front
//!   proxy and authorizing users with SubjectAccessReviews ([`auth`], [`server`]);
//! - with [`Options::register`] it registers both APIServices behind an `ExternalName` Service
//!   ([`registration`]), with its own CA as `caBundle` ([`tls`]);
//! - it runs the simulated controllers, completes migrations ([`migration`]) and stops the QEMU of
//!   every VMI that is gone ([`machines`]).
//!
//! Contract: once the server listens and the APIServices are applied, [`run`] writes
//! [`Options::ready_file`] (JSON: `port`, `caFile`, `pid`), then runs until SIGTERM or SIGINT, when it
//! stops every QEMU it booted and returns `Ok`. Any component failing ends it with an error.

pub mod auth;
pub mod consoles;
pub mod lifecycle;
pub mod machines;
pub mod migration;
pub mod registration;
pub mod server;
pub mod status;
pub mod tls;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::machines::Machines;
use crate::registration::ServiceReference;
use crate::tls::{Peer, ServingMaterial, TlsListener};

/// How often QEMU machines are matched against the VMIs that still run.
const REAP_INTERVAL: Duration = Duration::from_secs(2);

/// How the simulator runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The kubeconfig to act with (cluster-admin); `None`: `KUBECONFIG` or `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// Where the aggregated server listens (127.0.0.1; port 0 picks a free one).
    pub listen: SocketAddr,
    /// Where the serving CA, certificate and key are written (`ca.crt`, `tls.crt`, `tls.key`).
    pub tls_dir: PathBuf,
    /// State: `qemu/` (the local runtime's machines) and `controllers/` (imported disks).
    pub state_dir: PathBuf,
    /// The disk every VMI's console machine boots (an overlay of it; it is never written).
    pub guest_disk: PathBuf,
    /// Register the APIServices and their Service.
    pub register: bool,
    /// The Service's namespace and name (`kubevirt`/`virt-api`).
    pub service_namespace: String,
    /// See [`Options::service_namespace`].
    pub service_name: String,
    /// Written once the server is ready (see the crate documentation).
    pub ready_file: Option<PathBuf>,
}

/// Why the simulator stopped.
#[derive(Debug, thiserror::Error)]
pub enum SimulatorError {
    /// The kubeconfig is unusable.
    #[error("cannot build a kubernetes client from {source_description}: {reason}")]
    Client {
        /// Which kubeconfig.
        source_description: String,
        /// Why.
        reason: String,
    },
    /// Reading the requestheader configuration failed.
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    /// TLS material could not be made.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The listen address is unusable.
    #[error("cannot listen on {address}: {source}; choose another address or port 0")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The QEMU runtime could not open.
    #[error(transparent)]
    Machines(#[from] machines::MachineError),
    /// Registering the APIServices failed.
    #[error("cannot register the aggregated apis: {0}")]
    Register(String),
    /// The server stopped.
    #[error("the aggregated api server stopped: {0}")]
    Serve(std::io::Error),
    /// The simulated controllers stopped.
    #[error(transparent)]
    Controllers(#[from] Box<paddock_kubevirt_controllers::Error>),
    /// The upload token key could not be made.
    #[error(transparent)]
    UploadTokens(#[from] paddock_kubevirt_controllers::UploadTokenError),
    /// The ready file could not be written.
    #[error("cannot write the ready file {path}: {source}")]
    ReadyFile {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// A client from `kubeconfig` (or the default sources).
pub async fn client_for(kubeconfig: Option<&Path>) -> Result<kube::Client, SimulatorError> {
    let description = kubeconfig.map_or_else(
        || "the default kubeconfig".to_string(),
        |path| path.display().to_string(),
    );
    let error = |reason: String| SimulatorError::Client {
        source_description: description.clone(),
        reason,
    };
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| error(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| error(e.to_string()))?
        }
        None => kube::Config::infer().await.map_err(|e| error(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| error(e.to_string()))
}

/// Runs the simulator (see the crate documentation).
pub async fn run(options: Options) -> Result<(), SimulatorError> {
    let client = client_for(options.kubeconfig.as_deref()).await?;
    let request_header = auth::RequestHeaderConfig::load(&client).await?;
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| SimulatorError::Listen {
            address: options.listen,
            source,
        })?;
    let address = listener.local_addr().map_err(|source| SimulatorError::Listen {
        address: options.listen,
        source,
    })?;
    let service = ServiceReference {
        namespace: options.service_namespace.clone(),
        name: options.service_name.clone(),
        port: address.port(),
    };
    let names = vec![
        service.server_name(),
        format!("{}.cluster.local", service.server_name()),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ];
    let material = ServingMaterial::generate(&options.tls_dir, &names)?;
    let server_config = material.server_config(&request_header.client_ca_pem)?;
    let machines = Arc::new(Machines::open(&options.state_dir.join("qemu"), &options.guest_disk).await?);
    let upload_tokens = paddock_kubevirt_controllers::UploadTokens::generate()?;
    let (upload_certificate, upload_key) =
        material.issue(&["localhost".to_string(), "127.0.0.1".to_string()])?;
    let controller_options = paddock_kubevirt_controllers::Options {
        work_dir: options.state_dir.join("controllers"),
        upload_proxy_address: SocketAddr::from(([127, 0, 0, 1], 0)),
        upload_proxy_tls: paddock_kubevirt_controllers::TlsMaterial {
            // Leaf then CA: the export links' `cert` is this chain, and clients trust its CA.
            certificate_chain_pem: format!("{upload_certificate}{}", material.ca_pem),
            private_key_pem: upload_key,
        },
        upload_tokens: upload_tokens.clone(),
    };

    let state = server::AppState::new(client.clone(), request_header.clone(), Arc::clone(&machines));
    let app = server::router(
        state,
        paddock_kubevirt_controllers::upload_token_api(upload_tokens),
    );
    let tls_listener = TlsListener::new(listener, server_config, request_header.allowed_names.clone());
    let serve = axum::serve(tls_listener, app.into_make_service_with_connect_info::<Peer>());
    tracing::info!(%address, "serving subresources.kubevirt.io/v1 and upload.cdi.kubevirt.io/v1beta1");

    if options.register {
        registration::register(&client, &service, &material.ca_pem)
            .await
            .map_err(|error| SimulatorError::Register(error.message()))?;
        tracing::info!(service = %service.server_name(), port = service.port, "registered the apiservices");
    }
    if let Some(path) = &options.ready_file {
        write_ready_file(path, address.port(), &options.tls_dir.join("ca.crt"))?;
    }

    let outcome = tokio::select! {
        result = serve.into_future() => result.map_err(SimulatorError::Serve),
        result = paddock_kubevirt_controllers::run(client.clone(), controller_options) => {
            result.map_err(|error| SimulatorError::Controllers(Box::new(error)))
        }
        () = migration::run(client.clone()) => Ok(()),
        () = reap_machines(client.clone(), Arc::clone(&machines)) => Ok(()),
        () = termination() => {
            tracing::info!("terminating: stopping every qemu");
            Ok(())
        }
    };
    machines.shutdown().await;
    outcome
}

/// Resolves on SIGTERM or SIGINT.
async fn termination() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut terminate), Ok(mut interrupt)) => {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// Every [`REAP_INTERVAL`], stops the machines whose VMI no longer runs.
async fn reap_machines(client: kube::Client, machines: Arc<Machines>) {
    loop {
        tokio::time::sleep(REAP_INTERVAL).await;
        match status::get(&client, "/apis/kubevirt.io/v1/virtualmachineinstances").await {
            Ok(list) => {
                let running: HashSet<(String, String, String)> = list
                    .as_ref()
                    .and_then(|list| list["items"].as_array())
                    .into_iter()
                    .flatten()
                    .filter(|vmi| lifecycle::phase(vmi) == "Running")
                    .map(|vmi| {
                        let field = |pointer: &str| status::text(vmi, pointer).to_string();
                        (
                            field("/metadata/namespace"),
                            field("/metadata/name"),
                            field("/metadata/uid"),
                        )
                    })
                    .collect();
                machines.reap(&running).await;
            }
            Err(error) => tracing::warn!(%error, "listing vmis to reap machines failed"),
        }
    }
}

/// Writes the ready file atomically.
fn write_ready_file(path: &Path, port: u16, ca_file: &Path) -> Result<(), SimulatorError> {
    let error = |source| SimulatorError::ReadyFile {
        path: path.to_path_buf(),
        source,
    };
    let contents = serde_json::json!({
        "port": port,
        "caFile": ca_file,
        "pid": std::process::id(),
    });
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, contents.to_string()).map_err(error)?;
    std::fs::rename(&temporary, path).map_err(error)
}
