//! `paddock serve` on the local runtime: open the state directory, listen on a loopback address,
//! generate and publish the access token, serve until SIGINT/SIGTERM. [`serve_kubernetes`] serves
//! the same API over a cluster instead (`paddock serve --kubeconfig`, or the console Deployment).
//!
//! Contract:
//! - Only loopback addresses unless `allow_non_loopback` (then a warning is logged).
//! - `<state>/serve.json` (`{"url", "token", "pid"}`, mode 0600, written atomically) tells the CLI
//!   where the server is; it is removed at a clean shutdown. A stale one (after `kill -9`) is
//!   overwritten by the next start.
//! - Shutdown stops accepting connections, closes console sessions with a websocket close frame,
//!   waits briefly for requests in flight and leaves every VM running; the next `serve` on the
//!   same state directory re-attaches them (see `paddock_local::Runtime::open`).

use std::future::IntoFuture;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use paddock_local::{Runtime, RuntimeOptions};
use serde::{Deserialize, Serialize};

use crate::api::Api;
use crate::auth::{AccessToken, Authentication, TokenError};
use crate::kubernetes::{KubernetesBackend, KubernetesError, KubernetesOptions, ProxyHeaders};
use crate::local::LocalBackend;

/// The file in the state directory that tells clients where the server is.
pub const SERVE_FILE: &str = "serve.json";
/// The default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8642";
/// How long requests in flight may take to finish after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of `paddock serve`.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address is not a loopback address and that was not allowed.
    #[error(
        "refusing to listen on {address}: it is reachable from other machines; use a loopback address such as 127.0.0.1:8642, or pass --listen-any if that is really wanted (the access token is then the only protection, and traffic is not encrypted)"
    )]
    NotLoopback {
        /// The address.
        address: SocketAddr,
    },
    /// The runtime could not open its state directory.
    #[error("cannot open the local runtime: {0}")]
    Runtime(#[from] paddock_local::RuntimeError),
    /// No token.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The address could not be bound.
    #[error(
        "cannot listen on {address}: {source}; choose another address with --listen (port 0 picks a free one)"
    )]
    Bind {
        /// The address.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A file operation failed.
    #[error("failed to {action} {path}: {source}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The server stopped with an error.
    #[error("the HTTP server failed: {0}")]
    Server(std::io::Error),
    /// The Kubernetes backend could not start.
    #[error(transparent)]
    Kubernetes(#[from] KubernetesError),
    /// serve.json is missing or unreadable.
    #[error(
        "no paddock serve found for the state directory {state_dir}: {details}; start one with `paddock serve --state-dir {state_dir}`, or pass --server and --token (or PADDOCK_SERVER and PADDOCK_TOKEN)"
    )]
    NotRunning {
        /// The state directory searched.
        state_dir: PathBuf,
        /// What was wrong.
        details: String,
    },
}

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Allow a non-loopback listen address.
    pub allow_non_loopback: bool,
    /// The local runtime's options (state directory, QEMU, accelerator).
    pub runtime: RuntimeOptions,
}

/// How to serve over a Kubernetes cluster.
#[derive(Debug, Clone)]
pub struct KubernetesServeOptions {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Allow a non-loopback listen address (in a pod: put TLS in front, e.g. an Ingress).
    pub allow_non_loopback: bool,
    /// The kubeconfig with the console's own credentials; inferred (in-cluster service account,
    /// `KUBECONFIG`, `~/.kube/config`) when `None`.
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context; its current context when `None`.
    pub context: Option<String>,
    /// Watch only this namespace.
    pub namespace: Option<String>,
    /// Believe these identity headers of an authenticating proxy (see
    /// [`crate::kubernetes::Authenticator`] for what that requires).
    pub proxy_headers: Option<ProxyHeaders>,
    /// CDI's upload proxy for disk uploads: its URL (CDIConfig's when `None`) and trust.
    pub upload_proxy: crate::kubernetes::UploadProxy,
    /// The key sign-in sessions are signed with, shared by every replica (so any replica accepts
    /// any replica's sessions); a key of this process only when `None`.
    pub session_key: Option<crate::kubernetes::SessionKey>,
    /// Registry credentials, plain http and the export link for backups.
    pub backup: crate::kubernetes::BackupSettings,
}

/// Where a running server is: the contents of `serve.json`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServeInfo {
    /// The base URL, e.g. `http://127.0.0.1:8642`.
    pub url: String,
    /// The access token.
    pub token: String,
    /// The server's process id.
    pub pid: u32,
}

impl std::fmt::Debug for ServeInfo {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ServeInfo")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .field("pid", &self.pid)
            .finish()
    }
}

impl ServeInfo {
    /// The URL to open in a browser, token included (like Jupyter's).
    pub fn login_url(&self) -> String {
        format!("{}/?token={}", self.url, self.token)
    }
}

/// `serve.json` in `state_dir`.
pub fn serve_file_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SERVE_FILE)
}

/// Reads `serve.json` from `state_dir`.
pub fn read_serve_file(state_dir: &Path) -> Result<ServeInfo, ServeError> {
    let path = serve_file_path(state_dir);
    let not_running = |details: String| ServeError::NotRunning {
        state_dir: state_dir.to_path_buf(),
        details,
    };
    let text = std::fs::read(&path)
        .map_err(|error| not_running(format!("cannot read {}: {error}", path.display())))?;
    serde_json::from_slice(&text)
        .map_err(|error| not_running(format!("{} is not valid: {error}", path.display())))
}

/// Runs the server until SIGINT or SIGTERM. `on_ready` is called once it listens and
/// `serve.json` is written.
pub async fn serve(options: ServeOptions, on_ready: impl FnOnce(&ServeInfo)) -> Result<(), ServeError> {
    check_listen_address(options.listen, options.allow_non_loopback)?;
    let runtime = Arc::new(Runtime::open(options.runtime.clone()).await?);
    // The runtime has already warned when KVM is unusable.
    let (accelerator, _) = runtime.accelerator();
    tracing::info!(
        state_dir = %runtime.state_dir().display(),
        accelerator = accelerator.qemu_name(),
        vms = runtime.list().len(),
        "local runtime open"
    );
    let token = AccessToken::generate()?;
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| ServeError::Bind {
            address: options.listen,
            source,
        })?;
    let address = listener.local_addr().map_err(|source| ServeError::Bind {
        address: options.listen,
        source,
    })?;
    let info = ServeInfo {
        url: format!("http://{address}"),
        token: token.as_str().to_string(),
        pid: std::process::id(),
    };
    let serve_file = serve_file_path(runtime.state_dir());
    write_private_file(&serve_file, &serde_json::to_vec_pretty(&info).unwrap_or_default())?;
    let api = Api::new(Arc::new(LocalBackend::new(Arc::clone(&runtime))), token);
    on_ready(&info);
    tracing::info!(url = %info.url, "serving the paddock API");
    let result = run_until_signal(listener, &api, "running VMs keep running").await;
    // Only remove the file if it is still ours (a second server may have replaced it).
    if read_serve_file(runtime.state_dir()).is_ok_and(|current| current.pid == info.pid) {
        let _ = std::fs::remove_file(&serve_file);
    }
    drop(runtime);
    result
}

/// Serves the API over a Kubernetes cluster until SIGINT or SIGTERM: users sign in with their
/// Kubernetes bearer tokens (or come through a trusted authenticating proxy) and the console acts
/// as them. `on_ready` gets the base URL once it listens.
pub async fn serve_kubernetes(
    options: KubernetesServeOptions,
    on_ready: impl FnOnce(&str),
) -> Result<(), ServeError> {
    check_listen_address(options.listen, options.allow_non_loopback)?;
    let config =
        crate::kubernetes::load_config(options.kubeconfig.as_deref(), options.context.as_deref()).await?;
    tracing::info!(cluster = %config.cluster_url, namespace = ?options.namespace, "connecting to the cluster");
    let backend = KubernetesBackend::start(
        config,
        KubernetesOptions {
            namespace: options.namespace.clone(),
            upload_proxy: options.upload_proxy.clone(),
            backup: options.backup.clone(),
        },
    )?;
    if options.proxy_headers.is_some() {
        tracing::warn!(
            "believing the identity headers of an authenticating proxy: make sure only that proxy can reach this console and that it strips those headers from client requests"
        );
    }
    let authenticator = match options.session_key.clone() {
        Some(key) => backend.authenticator_with_session_key(options.proxy_headers.clone(), key),
        None => {
            tracing::info!(
                "sign-in sessions are signed with a key of this process: they end when it does and other replicas refuse them (give --session-key-file to share one)"
            );
            backend.authenticator(options.proxy_headers.clone())
        }
    };
    let authentication = Authentication::Kubernetes(Arc::new(authenticator));
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| ServeError::Bind {
            address: options.listen,
            source,
        })?;
    let address = listener.local_addr().map_err(|source| ServeError::Bind {
        address: options.listen,
        source,
    })?;
    let api = Api::with_authentication(Arc::new(backend), authentication);
    let url = format!("http://{address}");
    on_ready(&url);
    tracing::info!(%url, "serving the paddock API over the cluster");
    run_until_signal(listener, &api, "the cluster's VMs are not affected").await
}

fn check_listen_address(address: SocketAddr, allow_non_loopback: bool) -> Result<(), ServeError> {
    if !address.ip().is_loopback() {
        if !allow_non_loopback {
            return Err(ServeError::NotLoopback { address });
        }
        tracing::warn!(
            %address,
            "listening on a non-loopback address: anyone who can reach it and has a valid token controls the VMs, and traffic is not encrypted"
        );
    }
    Ok(())
}

/// Serves `api` on `listener` until SIGINT or SIGTERM, then closes console sessions and drains.
async fn run_until_signal(
    listener: tokio::net::TcpListener,
    api: &Api,
    what_stays: &'static str,
) -> Result<(), ServeError> {
    let router = api.router();
    let (signalled, mut signal_received) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let reason = wait_for_signal().await;
        tracing::info!("{reason}: shutting down; {what_stays}");
        signalled.send_replace(true);
    });
    let mut graceful_signal = signal_received.clone();
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        let _ = graceful_signal.wait_for(|signalled| *signalled).await;
    });
    let result = tokio::select! {
        result = server.into_future() => result.map_err(ServeError::Server),
        () = async {
            let _ = signal_received.wait_for(|signalled| *signalled).await;
            api.close_sessions();
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        } => {
            tracing::warn!("requests still in flight after {DRAIN_TIMEOUT:?}; leaving them");
            Ok(())
        }
    };
    api.close_sessions();
    result
}

async fn wait_for_signal() -> &'static str {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM; only Ctrl-C stops the server");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        () = terminate => "terminated",
    }
}

/// Writes `contents` to `path` atomically, readable by the owner only.
fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), ServeError> {
    let io = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| ServeError::Io { action, path, source }
    };
    let directory = path.parent().unwrap_or(Path::new("."));
    let temporary = directory.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|name| name.to_str()).unwrap_or("serve"),
        std::process::id()
    ));
    // A leftover from a crash might have other permissions; `mode` applies only to new files.
    let _ = std::fs::remove_file(&temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(io("create", &temporary))?;
    file.write_all(contents).map_err(io("write", &temporary))?;
    file.sync_all().map_err(io("sync", &temporary))?;
    drop(file);
    std::fs::rename(&temporary, path).map_err(io("rename into place", path))?;
    std::fs::File::open(directory)
        .and_then(|directory| directory.sync_all())
        .map_err(io("sync", directory))?;
    Ok(())
}
