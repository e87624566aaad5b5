//! `paddock serve`: the REST API, consoles and events on this machine's local runtime, or, with
//! `--backend kubernetes` (implied by `--kubeconfig`), over a cluster's KubeVirt, acting as each
//! signed-in Kubernetes user.
//!
//! Prints the URL with a fresh access token at start (like Jupyter) and writes it to
//! `<state>/serve.json`, where the `vm` and `snapshot` verbs find it. Ctrl-C or SIGTERM stops the
//! server and leaves the VMs running; the next `paddock serve` re-attaches them.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use paddock_console::serve::{DEFAULT_LISTEN, ServeOptions};
use paddock_local::{AcceleratorChoice, RuntimeOptions};

/// Which accelerator VMs run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AcceleratorFlag {
    /// KVM when /dev/kvm is usable, else TCG with a warning.
    Auto,
    /// Always KVM; starting a VM fails without it.
    Kvm,
    /// Always TCG (software emulation, several times slower).
    Tcg,
}

/// Where the VMs are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendFlag {
    /// This machine, with QEMU.
    Local,
    /// A Kubernetes cluster with KubeVirt (and paddock's operator for VirtualMachineApps).
    Kubernetes,
}

/// `paddock serve` flags.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where the VMs are: `local` (the default) or `kubernetes` (implied by --kubeconfig; without
    /// it the in-cluster service account, KUBECONFIG or ~/.kube/config is used).
    #[arg(long, value_enum, default_value = "local")]
    backend: BackendFlag,
    /// The kubeconfig with the console's own credentials (Kubernetes backend). Users sign in with
    /// their own bearer tokens; the console acts as them (it needs `impersonate` on users and
    /// groups, `create` tokenreviews and subjectaccessreviews, and `list`/`watch` on the VM kinds).
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (Kubernetes backend; default: its current context).
    #[arg(long, value_name = "NAME")]
    context: Option<String>,
    /// Show only this namespace's VMs (Kubernetes backend; default: every namespace).
    #[arg(long, value_name = "NAMESPACE")]
    namespace: Option<String>,
    /// Believe this header of an authenticating proxy in front of the console as the user name,
    /// e.g. X-Forwarded-User (Kubernetes backend). Only when nothing but the proxy can reach the
    /// console and the proxy strips the header from client requests.
    #[arg(long, value_name = "HEADER")]
    auth_proxy_user_header: Option<String>,
    /// The proxy's header with the user's groups (repeated or comma-separated), e.g.
    /// X-Forwarded-Groups; needs --auth-proxy-user-header.
    #[arg(long, value_name = "HEADER", requires = "auth_proxy_user_header")]
    auth_proxy_groups_header: Option<String>,
    /// CDI's upload proxy, for disk uploads through the console (Kubernetes backend; default:
    /// CDIConfig config's status.uploadProxyURL, which the console then needs `get` on).
    #[arg(long, value_name = "URL")]
    upload_proxy_url: Option<String>,
    /// A PEM file with the CA that signed the upload proxy's certificate (added to the system's).
    #[arg(long, value_name = "FILE")]
    upload_proxy_ca_file: Option<PathBuf>,
    /// A file with the key sign-in sessions are signed with (Kubernetes backend; at least 32
    /// random bytes, e.g. a mounted Secret). Replicas given the same key accept each other's
    /// sessions; without it the key is this process's own.
    #[arg(long, env = "PADDOCK_SESSION_KEY_FILE", value_name = "FILE")]
    session_key_file: Option<PathBuf>,
    /// The directory holding the docker config.json with registry credentials for backups from
    /// the console (Kubernetes backend), e.g. a mounted kubernetes.io/dockerconfigjson Secret
    /// with its key .dockerconfigjson as config.json (default: $DOCKER_CONFIG, else ~/.docker).
    #[arg(long, value_name = "DIR")]
    registry_docker_config: Option<PathBuf>,
    /// Let backup requests ask for plain http to a registry (`"insecure": true`), e.g. a registry
    /// on loopback or for tests (Kubernetes backend; without it such requests are refused).
    #[arg(long)]
    registry_allow_insecure: bool,
    /// Which link of a VirtualMachineExport backups read the disk through (Kubernetes backend):
    /// `internal` (the export server's Service, for a console inside the cluster) or `external`
    /// (KubeVirt's export proxy, for a console outside it).
    #[arg(long, value_enum, default_value = "internal")]
    backup_export_link: crate::backup::ExportLink,
    /// Where backups from the console keep their scratch copy of a disk (Kubernetes backend;
    /// needs room for the raw disk and its compressed copy; default: the temporary directory).
    #[arg(long, value_name = "DIR")]
    backup_scratch_dir: Option<PathBuf>,
    /// Where to listen; loopback only unless --listen-any. Port 0 picks a free port.
    #[arg(long, default_value = DEFAULT_LISTEN, value_name = "ADDRESS:PORT")]
    listen: SocketAddr,
    /// Allow a non-loopback --listen address (the token is then the only protection and traffic
    /// is not encrypted).
    #[arg(long)]
    listen_any: bool,
    /// The state directory (VMs, disks, snapshots; default $XDG_DATA_HOME/paddock).
    #[arg(long, env = "PADDOCK_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The qemu-system-x86_64 binary (default: found on PATH).
    #[arg(long, env = "PADDOCK_QEMU_BINARY", value_name = "PATH")]
    qemu: Option<PathBuf>,
    /// The accelerator VMs run with.
    #[arg(long, value_enum, default_value = "auto")]
    accelerator: AcceleratorFlag,
}

/// Runs the server until Ctrl-C or SIGTERM.
pub fn run(arguments: &ServeArgs) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    if arguments.backend == BackendFlag::Kubernetes || arguments.kubeconfig.is_some() {
        return run_kubernetes(arguments);
    }
    let mut runtime = RuntimeOptions::new(
        arguments
            .state_dir
            .clone()
            .unwrap_or_else(paddock_local::default_state_dir),
    );
    runtime.qemu_binary = arguments.qemu.clone();
    runtime.accelerator = match arguments.accelerator {
        AcceleratorFlag::Auto => AcceleratorChoice::Auto,
        AcceleratorFlag::Kvm => AcceleratorChoice::Kvm,
        AcceleratorFlag::Tcg => AcceleratorChoice::Tcg,
    };
    let options = ServeOptions {
        listen: arguments.listen,
        allow_non_loopback: arguments.listen_any,
        runtime,
    };
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    tokio.block_on(paddock_console::serve(options, |info| {
        println!("paddock serve: {}", info.login_url());
        println!("  web console: {}", paddock_console::ui::console_url(info));
        println!(
            "  the vm and snapshot commands find this server through serve.json in the state directory;"
        );
        println!(
            "  other clients: PADDOCK_SERVER={} PADDOCK_TOKEN=<the token above>",
            info.url
        );
        println!("  API document: {}/openapi.json", info.url);
    }))?;
    Ok(())
}

fn run_kubernetes(arguments: &ServeArgs) -> anyhow::Result<()> {
    let proxy_headers = arguments
        .auth_proxy_user_header
        .as_deref()
        .map(|user| {
            paddock_console::kubernetes::ProxyHeaders::new(
                user,
                arguments.auth_proxy_groups_header.as_deref(),
            )
            .map_err(anyhow::Error::msg)
        })
        .transpose()?;
    let session_key = arguments
        .session_key_file
        .as_deref()
        .map(paddock_console::kubernetes::SessionKey::from_file)
        .transpose()?;
    let options =
        paddock_console::KubernetesServeOptions {
            listen: arguments.listen,
            allow_non_loopback: arguments.listen_any,
            kubeconfig: arguments.kubeconfig.clone(),
            context: arguments.context.clone(),
            namespace: arguments.namespace.clone(),
            proxy_headers,
            upload_proxy: paddock_console::kubernetes::UploadProxy {
                url: arguments.upload_proxy_url.clone(),
                trust: paddock_cluster::upload::ProxyTrust {
                    ca_pem: match &arguments.upload_proxy_ca_file {
                        Some(file) => Some(std::fs::read(file).with_context(|| {
                            format!("cannot read --upload-proxy-ca-file {}", file.display())
                        })?),
                        None => None,
                    },
                    insecure: false,
                },
            },
            session_key,
            backup: paddock_console::kubernetes::BackupSettings {
                docker_config_dir: arguments.registry_docker_config.clone(),
                allow_insecure: arguments.registry_allow_insecure,
                export_link: arguments.backup_export_link.into(),
                scratch_parent: arguments.backup_scratch_dir.clone(),
            },
        };
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    tokio.block_on(paddock_console::serve_kubernetes(options, |url| {
        println!("paddock serve (kubernetes): {url}");
        println!("  sign in with a Kubernetes bearer token: Authorization: Bearer <token> (or ?token= on websockets)");
        println!("  Baffles VNC path: {url}/k8s/apis/subresources.kubevirt.io/v1/namespaces/<ns>/virtualmachineinstances/<name>/vnc");
        println!("  API document: {url}/openapi.json");
    }))?;
    Ok(())
}
