//! Simulated KubeVirt and CDI controllers for integration tests against a real kube-apiserver (see
//! `tests/simulator-controllers/README.md` for what each one does and does not do compared with the
//! real controller).
//!
//! Role: the parts of KubeVirt (virt-controller, snapshot/restore/export/clone controllers) and CDI
//! (import and upload controllers, upload proxy, the `UploadTokenRequest` API) that cannot run on a
//! cluster without nodes, rewritten as a test double that reads and writes the same objects with the
//! same status transitions. Everything here is simulated: there are no pods, no PVCs and no VMs; what
//! is real is the API server these controllers talk to, the registry pulls, the containerDisk layout
//! checks and `qemu-img`'s verdict on the disks.
//!
//! Contract:
//! - [`run`] runs every controller until its future is dropped or one of them fails;
//! - [`upload_token_api`] is the `upload.cdi.kubevirt.io/v1beta1` aggregated API (mounted by the
//!   simulator's aggregated server); it signs tokens with the [`UploadTokens`] key that [`run`]'s
//!   upload proxy verifies, so both must get clones of the same [`UploadTokens`];
//! - imported and uploaded disks live under [`Options::work_dir`], keyed by namespace, name and uid; the
//!   DataVolume's [`ANNOTATION_DISK_PATH`] annotation names the file.
//!
//! Stable API (the simulator binary depends on it): [`run`], [`Options`], [`Error`], [`TlsMaterial`],
//! [`UploadTokens`], [`upload_token_api`], [`upload_api_resource_list`].

mod clone;
mod conditions;
mod datavolume;
mod disk_check;
mod export;
mod snapshot;
mod tls;
mod upload_proxy;
mod upload_token;
mod virt_controller;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use conditions::now;
pub use tls::{TlsError, TlsMaterial};
pub use upload_token::{UploadTokenError, UploadTokens, upload_api_resource_list, upload_token_api};

/// The node name written to `VirtualMachineInstance.status.nodeName`: there are no nodes here, so every
/// VMI "runs" on this made-up node.
pub const SIMULATED_NODE_NAME: &str = "paddock-simulated-node";

/// DataVolume annotation naming the file that holds the imported or uploaded disk (under
/// [`Options::work_dir`]); a real CDI writes into a PVC instead.
pub const ANNOTATION_DISK_PATH: &str = "simulator.paddock.dev/disk-path";

/// How [`run`] runs the controllers.
#[derive(Debug, Clone)]
pub struct Options {
    /// Scratch and disk storage: pulled layouts and imported/uploaded disks go under
    /// `<work_dir>/datavolumes/<namespace>/<name>-<uid>/`. Created when missing.
    pub work_dir: PathBuf,
    /// Where the CDI upload proxy listens (HTTPS). Port 0 picks a free port; the address actually
    /// bound is published as `https://<address>` in the `CDIConfig` `config`'s `status.uploadProxyURL`,
    /// where virtctl (and the tests) look for it.
    pub upload_proxy_address: SocketAddr,
    /// The upload proxy's certificate chain and key.
    pub upload_proxy_tls: TlsMaterial,
    /// The key upload tokens are signed with; give a clone to [`upload_token_api`].
    pub upload_tokens: UploadTokens,
}

/// Why the controllers stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The work directory cannot be created.
    #[error("cannot create the simulator work directory {path}: {source}; check permissions and free space")]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The upload proxy cannot listen.
    #[error(
        "cannot listen on {address} for the cdi upload proxy: {source}; choose another address or port 0"
    )]
    Listen {
        /// The address.
        address: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The upload proxy's TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A controller's watch stream ended or the API server refused a setup request.
    #[error(
        "simulated {controller} stopped: {reason}; check that the API server is reachable and the KubeVirt and CDI CRDs are installed"
    )]
    Controller {
        /// Which controller.
        controller: &'static str,
        /// Why.
        reason: String,
    },
}

/// Runs every simulated controller (virt-controller, CDI DataVolume import/upload, upload proxy,
/// snapshot, restore, export, clone) with `client` until the future is dropped or one of them fails.
///
/// `client` needs cluster-wide rights on the KubeVirt and CDI resources, Secrets and CDIConfig (the
/// admin client of the test cluster).
pub async fn run(client: kube::Client, options: Options) -> Result<(), Error> {
    std::fs::create_dir_all(&options.work_dir).map_err(|source| Error::WorkDir {
        path: options.work_dir.clone(),
        source,
    })?;
    let listener = tokio::net::TcpListener::bind(options.upload_proxy_address)
        .await
        .map_err(|source| Error::Listen {
            address: options.upload_proxy_address,
            source,
        })?;
    let upload_proxy_address = listener.local_addr().map_err(|source| Error::Listen {
        address: options.upload_proxy_address,
        source,
    })?;
    let shared = datavolume::Shared::new(client.clone(), options.work_dir.clone());
    let export_certificate = options.upload_proxy_tls.certificate_chain_pem.clone();
    tokio::select! {
        result = upload_proxy::serve(listener, options.upload_proxy_tls, options.upload_tokens, shared.clone()) => result,
        result = datavolume::run(shared, upload_proxy_address) => result,
        result = virt_controller::run(client.clone()) => result,
        result = snapshot::run_snapshots(client.clone()) => result,
        result = snapshot::run_restores(client.clone()) => result,
        result = export::run(
            client.clone(),
            upload_proxy_address.to_string(),
            export_certificate,
        ) => result,
        result = clone::run(client) => result,
    }
}
