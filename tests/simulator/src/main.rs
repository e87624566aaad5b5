//! `kubevirt-simulator`: runs the simulated KubeVirt and CDI components against a real kube-apiserver
//! (see `tests/README.md`). A test double; never shipped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Serves KubeVirt's virt-api subresources (aggregated) and runs simulated KubeVirt/CDI controllers
/// against a real kube-apiserver, for paddock's integration tests.
#[derive(Debug, Parser)]
#[command(name = "kubevirt-simulator", version)]
struct Arguments {
    /// Admin kubeconfig (default: KUBECONFIG, then ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Address of the aggregated API server; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Directory for the generated serving CA, certificate and key.
    #[arg(long)]
    tls_dir: PathBuf,
    /// State directory (QEMU machines, imported disks).
    #[arg(long)]
    state_dir: PathBuf,
    /// The qcow2 disk the console machines boot (e.g. the paddock test disk).
    #[arg(long)]
    guest_disk: PathBuf,
    /// Register the APIServices v1.subresources.kubevirt.io and v1beta1.upload.cdi.kubevirt.io.
    #[arg(long)]
    register_apiservices: bool,
    /// Namespace of the Service the APIServices point at.
    #[arg(long, default_value = "kubevirt")]
    service_namespace: String,
    /// Name of that Service.
    #[arg(long, default_value = "virt-api")]
    service_name: String,
    /// File written (JSON: port, caFile, pid) once the server is ready.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let arguments = Arguments::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("kubevirt-simulator: cannot start the tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let options = paddock_kubevirt_simulator::Options {
        kubeconfig: arguments.kubeconfig,
        listen: arguments.listen,
        tls_dir: arguments.tls_dir,
        state_dir: arguments.state_dir,
        guest_disk: arguments.guest_disk,
        register: arguments.register_apiservices,
        service_namespace: arguments.service_namespace,
        service_name: arguments.service_name,
        ready_file: arguments.ready_file,
    };
    match runtime.block_on(paddock_kubevirt_simulator::run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kubevirt-simulator: {error}");
            ExitCode::FAILURE
        }
    }
}
