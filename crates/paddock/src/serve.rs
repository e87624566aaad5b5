//! `paddock serve`: the REST API, consoles and events on this machine's local runtime.
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

/// `paddock serve` flags.
#[derive(Debug, Args)]
pub struct ServeArgs {
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
