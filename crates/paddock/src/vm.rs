//! `paddock vm …` and `paddock snapshot …`: the CLI verbs, as clients of `paddock serve`.
//!
//! Role: a small HTTP and websocket client of the API in `paddock-console`, with kubectl-like
//! output (tables by default, `-o yaml|json`) and virtctl-like consoles (`vm console` bridges the
//! terminal to the serial websocket, Ctrl-] leaves; `vm vnc` is a local TCP proxy to the VNC
//! websocket for any VNC viewer).
//!
//! The server is found from `--server` and `--token`, else `PADDOCK_SERVER` and `PADDOCK_TOKEN`,
//! else `<state>/serve.json` written by `paddock serve` (state directory from `--state-dir`,
//! `PADDOCK_STATE_DIR` or the default).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Subcommand, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use paddock_console::{ErrorBody, KUBEVIRT_SUBPROTOCOL, SnapshotRequest, SnapshotView, VmView};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// Ctrl-], the byte that ends `vm console` (as with virtctl and telnet).
const ESCAPE_BYTE: u8 = 0x1d;
/// The first port `vm vnc` tries (VNC display :0).
const FIRST_VNC_PORT: u16 = 5900;
/// How many ports `vm vnc` tries.
const VNC_PORT_ATTEMPTS: u16 = 100;

/// How to find `paddock serve`.
#[derive(Debug, Clone, Args)]
pub struct ServerFlags {
    /// The server's URL, e.g. http://127.0.0.1:8642 (default: from serve.json in the state
    /// directory).
    #[arg(long, env = "PADDOCK_SERVER", global = true, value_name = "URL")]
    server: Option<String>,
    /// The access token `paddock serve` printed.
    #[arg(long, env = "PADDOCK_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// The state directory whose serve.json names the server (default $XDG_DATA_HOME/paddock).
    #[arg(long, env = "PADDOCK_STATE_DIR", global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

/// Output formats of the read and write verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// A human-readable table or sentence.
    Table,
    /// YAML.
    Yaml,
    /// JSON.
    Json,
}

/// Which VM: a name, or `namespace/name`.
#[derive(Debug, Clone, Args)]
pub struct VmSelector {
    /// The VM's name, or NAMESPACE/NAME.
    name: String,
    /// The VM's namespace.
    #[arg(short = 'n', long, default_value = paddock_local::DEFAULT_NAMESPACE)]
    namespace: String,
}

impl VmSelector {
    fn path(&self) -> String {
        let (namespace, name) = self.parts();
        format!("/api/v1/vms/{namespace}/{name}")
    }

    fn parts(&self) -> (&str, &str) {
        match self.name.split_once('/') {
            Some((namespace, name)) => (namespace, name),
            None => (&self.namespace, &self.name),
        }
    }

    fn display(&self) -> String {
        let (namespace, name) = self.parts();
        format!("{namespace}/{name}")
    }
}

/// `paddock vm` arguments.
#[derive(Debug, Args)]
pub struct VmArgs {
    #[command(flatten)]
    server: ServerFlags,
    #[command(subcommand)]
    command: VmCommand,
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Create a VM from a VirtualMachineApp manifest (it starts when its runStrategy says so).
    ///
    /// Example: `paddock vm create -f examples/debian.yaml`
    Create {
        /// The manifest (YAML or JSON); `-` reads standard input.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: OutputFormat,
    },
    /// List VMs with their status.
    List {
        /// Only this namespace (default: all).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: OutputFormat,
    },
    /// Show one VM.
    Get {
        #[command(flatten)]
        vm: VmSelector,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: OutputFormat,
    },
    /// Start a stopped VM (runStrategy Halted becomes Always).
    Start(PowerFlags),
    /// Stop a VM: ACPI power button, switched off after the grace period (Always becomes Halted).
    Stop {
        #[command(flatten)]
        power: PowerFlags,
        /// Switch it off at once instead.
        #[arg(long)]
        force: bool,
        /// Seconds the guest may take to power off (default 60).
        #[arg(long, value_name = "SECONDS", conflicts_with = "force")]
        grace_period: Option<u64>,
    },
    /// Stop a VM gracefully and start it again.
    Restart {
        #[command(flatten)]
        power: PowerFlags,
        /// Seconds the guest may take to power off (default 60).
        #[arg(long, value_name = "SECONDS")]
        grace_period: Option<u64>,
    },
    /// Pause a running VM's CPUs.
    Pause(PowerFlags),
    /// Resume a paused VM.
    Unpause(PowerFlags),
    /// Delete a VM (switching it off first).
    Delete {
        #[command(flatten)]
        vm: VmSelector,
        /// Delete it even when it has snapshots (they go with it).
        #[arg(long)]
        force: bool,
    },
    /// Attach the terminal to the VM's serial console; Ctrl-] leaves.
    Console {
        #[command(flatten)]
        vm: VmSelector,
    },
    /// Proxy a local TCP port to the VM's VNC console, for any VNC viewer; Ctrl-C stops.
    Vnc {
        #[command(flatten)]
        vm: VmSelector,
        /// The local port (default: the first free one from 5900; 0 lets the system pick).
        #[arg(long)]
        port: Option<u16>,
        /// The local address to listen on.
        #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
        address: IpAddr,
    },
    /// Save a PNG of the VM's screen.
    Screenshot {
        #[command(flatten)]
        vm: VmSelector,
        /// Where to write the PNG.
        #[arg(short = 'o', long = "output", value_name = "FILE.png")]
        file: PathBuf,
    },
}

/// The VM and output format of a power verb.
#[derive(Debug, Args)]
pub struct PowerFlags {
    #[command(flatten)]
    vm: VmSelector,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: OutputFormat,
}

/// `paddock snapshot` arguments.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    server: ServerFlags,
    #[command(subcommand)]
    command: SnapshotCommand,
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Take a snapshot of a VM's disk, with --memory also of its memory (running or paused VM).
    ///
    /// Example: `paddock snapshot create debian before-upgrade --memory`
    Create {
        #[command(flatten)]
        vm: VmSelector,
        /// The snapshot's name.
        snapshot: String,
        /// Include memory and device state: restoring resumes the guest exactly there.
        #[arg(long)]
        memory: bool,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: OutputFormat,
    },
    /// List a VM's snapshots.
    List {
        #[command(flatten)]
        vm: VmSelector,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: OutputFormat,
    },
    /// Restore a snapshot (a disk-only snapshot needs a stopped VM).
    Restore {
        #[command(flatten)]
        vm: VmSelector,
        /// The snapshot's name.
        snapshot: String,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: OutputFormat,
    },
    /// Delete a snapshot.
    Delete {
        #[command(flatten)]
        vm: VmSelector,
        /// The snapshot's name.
        snapshot: String,
    },
}

/// Runs a `paddock vm` verb.
pub fn run_vm(arguments: &VmArgs) -> anyhow::Result<()> {
    block_on(async {
        let client = Client::discover(&arguments.server)?;
        match &arguments.command {
            VmCommand::Create { file, output } => create(&client, file, *output).await,
            VmCommand::List { namespace, output } => list(&client, namespace.as_deref(), *output).await,
            VmCommand::Get { vm, output } => {
                let view: VmView = client.json(reqwest::Method::GET, &vm.path(), None).await?;
                print_vms(&[view], *output)
            }
            VmCommand::Start(power) => power_action(&client, power, "start", "started", None).await,
            VmCommand::Stop {
                power, force: true, ..
            } => power_action(&client, power, "forcestop", "switched off", None).await,
            VmCommand::Stop {
                power, grace_period, ..
            } => power_action(&client, power, "stop", "stopped", *grace_period).await,
            VmCommand::Restart { power, grace_period } => {
                power_action(&client, power, "restart", "restarted", *grace_period).await
            }
            VmCommand::Pause(power) => power_action(&client, power, "pause", "paused", None).await,
            VmCommand::Unpause(power) => power_action(&client, power, "unpause", "unpaused", None).await,
            VmCommand::Delete { vm, force } => {
                let path = format!("{}?force={force}", vm.path());
                client.send(reqwest::Method::DELETE, &path, None).await?;
                println!("virtual machine {} deleted", vm.display());
                Ok(())
            }
            VmCommand::Console { vm } => console(&client, vm).await,
            VmCommand::Vnc { vm, port, address } => vnc_proxy(&client, vm, *address, *port).await,
            VmCommand::Screenshot { vm, file } => screenshot(&client, vm, file).await,
        }
    })
}

/// Runs a `paddock snapshot` verb.
pub fn run_snapshot(arguments: &SnapshotArgs) -> anyhow::Result<()> {
    block_on(async {
        let client = Client::discover(&arguments.server)?;
        match &arguments.command {
            SnapshotCommand::Create {
                vm,
                snapshot,
                memory,
                output,
            } => {
                let request = SnapshotRequest {
                    name: snapshot.clone(),
                    memory: *memory,
                };
                let body = serde_json::to_vec(&request)?;
                let created: SnapshotView = client
                    .json(
                        reqwest::Method::POST,
                        &format!("{}/snapshots", vm.path()),
                        Some(("application/json", body)),
                    )
                    .await?;
                match output {
                    OutputFormat::Table => {
                        let kind = if created.memory {
                            "with memory"
                        } else {
                            "disk only"
                        };
                        println!("snapshot {} of {} created ({kind})", created.name, vm.display());
                        Ok(())
                    }
                    other => print_structured(&created, *other),
                }
            }
            SnapshotCommand::List { vm, output } => {
                let list: ItemList<SnapshotView> = client
                    .json(reqwest::Method::GET, &format!("{}/snapshots", vm.path()), None)
                    .await?;
                print_snapshots(&list.items, *output)
            }
            SnapshotCommand::Restore { vm, snapshot, output } => {
                let view: VmView = client
                    .json(
                        reqwest::Method::PUT,
                        &format!("{}/snapshots/{snapshot}/restore", vm.path()),
                        None,
                    )
                    .await?;
                match output {
                    OutputFormat::Table => {
                        println!(
                            "snapshot {snapshot} of {} restored ({})",
                            vm.display(),
                            view.status.phase
                        );
                        Ok(())
                    }
                    other => print_structured(&view, *other),
                }
            }
            SnapshotCommand::Delete { vm, snapshot } => {
                client
                    .send(
                        reqwest::Method::DELETE,
                        &format!("{}/snapshots/{snapshot}", vm.path()),
                        None,
                    )
                    .await?;
                println!("snapshot {snapshot} of {} deleted", vm.display());
                Ok(())
            }
        }
    })
}

fn block_on<T>(future: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(future)
}

#[derive(Debug, serde::Deserialize)]
struct ItemList<T> {
    items: Vec<T>,
}

/// A client of one `paddock serve`.
struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
    /// Where the server was found, for error messages.
    origin: String,
}

impl Client {
    fn discover(flags: &ServerFlags) -> anyhow::Result<Client> {
        let (base, token, origin) = match (&flags.server, &flags.token) {
            (Some(server), Some(token)) => (
                server.clone(),
                token.clone(),
                "--server/PADDOCK_SERVER".to_string(),
            ),
            (Some(_), None) => bail!(
                "--server (or PADDOCK_SERVER) needs the access token too: pass --token or set PADDOCK_TOKEN to the token `paddock serve` printed"
            ),
            (None, _) => {
                let state_dir = flags
                    .state_dir
                    .clone()
                    .unwrap_or_else(paddock_local::default_state_dir);
                let info = paddock_console::read_serve_file(&state_dir)?;
                let origin = format!(
                    "{} (pid {})",
                    paddock_console::serve_file_path(&state_dir).display(),
                    info.pid
                );
                (info.url, flags.token.clone().unwrap_or(info.token), origin)
            }
        };
        let http = reqwest::Client::builder()
            .build()
            .context("cannot set up the HTTP client")?;
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
            origin,
        })
    }

    /// Sends a request; a non-success status becomes an error with the server's message.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method.clone(), &url).bearer_auth(&self.token);
        if let Some((content_type, bytes)) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(bytes);
        }
        let response = request.send().await.with_context(|| {
            format!(
                "cannot reach paddock serve at {} (found through {}); is it running?",
                self.base, self.origin
            )
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(error) => bail!("{} ({} {})", error.message, error.code, error.reason),
            Err(_) => bail!("{method} {path} failed with {status}: {text}"),
        }
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> anyhow::Result<T> {
        let response = self.send(method.clone(), path, body).await?;
        let bytes = response
            .bytes()
            .await
            .with_context(|| format!("cannot read the answer to {method} {path}"))?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("the answer to {method} {path} is not what this paddock expects; are the CLI and server the same version?"))
    }

    /// Opens a console websocket (subprotocol plain.kubevirt.io, token in the header).
    async fn websocket(
        &self,
        path: &str,
    ) -> anyhow::Result<
        tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    > {
        let url = if let Some(rest) = self.base.strip_prefix("https://") {
            format!("wss://{rest}{path}")
        } else if let Some(rest) = self.base.strip_prefix("http://") {
            format!("ws://{rest}{path}")
        } else {
            bail!("the server URL {} is neither http:// nor https://", self.base);
        };
        let mut request = url
            .as_str()
            .into_client_request()
            .with_context(|| format!("{url} is not a websocket URL"))?;
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(KUBEVIRT_SUBPROTOCOL),
        );
        request.headers_mut().insert(
            "Authorization",
            HeaderValue::from_str(&format!("Bearer {}", self.token))
                .context("the token is not a valid header value")?,
        );
        match tokio_tungstenite::connect_async(request).await {
            Ok((socket, _)) => Ok(socket),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let body = response.body().as_deref().unwrap_or_default();
                match serde_json::from_slice::<ErrorBody>(body) {
                    Ok(error) => bail!("{} ({} {})", error.message, error.code, error.reason),
                    Err(_) => bail!(
                        "the server refused the websocket {path} with {}",
                        response.status()
                    ),
                }
            }
            Err(error) => Err(anyhow::Error::new(error).context(format!(
                "cannot open the websocket {path} at {} (found through {})",
                self.base, self.origin
            ))),
        }
    }
}

fn read_manifest_bytes(file: &Path) -> anyhow::Result<Vec<u8>> {
    if file.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("cannot read the manifest from standard input")?;
        Ok(bytes)
    } else {
        std::fs::read(file).with_context(|| format!("cannot read the manifest {}", file.display()))
    }
}

async fn create(client: &Client, file: &Path, output: OutputFormat) -> anyhow::Result<()> {
    let bytes = read_manifest_bytes(file)?;
    // The server tells YAML from JSON by Content-Type; YAML also reads JSON.
    let view: VmView = client
        .json(
            reqwest::Method::POST,
            "/api/v1/vms",
            Some(("application/yaml", bytes)),
        )
        .await
        .with_context(|| format!("cannot create the VM of {}", file.display()))?;
    match output {
        OutputFormat::Table => {
            println!(
                "virtual machine {}/{} created ({})",
                view.namespace, view.name, view.status.phase
            );
            Ok(())
        }
        other => print_structured(&view, other),
    }
}

async fn list(client: &Client, namespace: Option<&str>, output: OutputFormat) -> anyhow::Result<()> {
    let path = match namespace {
        Some(namespace) => format!("/api/v1/vms?namespace={namespace}"),
        None => "/api/v1/vms".to_string(),
    };
    let list: ItemList<VmView> = client.json(reqwest::Method::GET, &path, None).await?;
    match output {
        OutputFormat::Table if list.items.is_empty() => {
            println!("no virtual machines");
            Ok(())
        }
        OutputFormat::Table => print_vms(&list.items, output),
        // A list keeps its envelope, like kubectl's List.
        other => print_structured(&serde_json::json!({"items": list.items}), other),
    }
}

async fn power_action(
    client: &Client,
    power: &PowerFlags,
    action: &str,
    done: &str,
    grace_period: Option<u64>,
) -> anyhow::Result<()> {
    let mut path = format!("{}/{action}", power.vm.path());
    if let Some(seconds) = grace_period {
        path.push_str(&format!("?gracePeriodSeconds={seconds}"));
    }
    let view: VmView = client.json(reqwest::Method::PUT, &path, None).await?;
    match power.output {
        OutputFormat::Table => {
            println!(
                "virtual machine {} {done} ({})",
                power.vm.display(),
                view.status.phase
            );
            Ok(())
        }
        other => print_structured(&view, other),
    }
}

async fn screenshot(client: &Client, vm: &VmSelector, file: &Path) -> anyhow::Result<()> {
    let response = client
        .send(reqwest::Method::GET, &format!("{}/screenshot", vm.path()), None)
        .await?;
    let png = response.bytes().await.context("cannot read the screenshot")?;
    write_atomically(file, &png)?;
    println!(
        "screenshot of {} written to {} ({} bytes)",
        vm.display(),
        file.display(),
        png.len()
    );
    Ok(())
}

fn write_atomically(file: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let directory = match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut temporary = tempfile::NamedTempFile::new_in(directory)
        .with_context(|| format!("cannot create a temporary file in {}", directory.display()))?;
    temporary
        .write_all(bytes)
        .and_then(|()| temporary.as_file().sync_all())
        .with_context(|| format!("cannot write {}", file.display()))?;
    temporary
        .persist(file)
        .with_context(|| format!("cannot move the screenshot into place at {}", file.display()))?;
    Ok(())
}

/// Puts the terminal in raw mode while alive (only when standard input is a terminal).
struct RawTerminal {
    saved: Option<rustix::termios::Termios>,
}

impl RawTerminal {
    fn enter() -> anyhow::Result<RawTerminal> {
        let stdin = std::io::stdin();
        if !rustix::termios::isatty(&stdin) {
            return Ok(RawTerminal { saved: None });
        }
        let saved = rustix::termios::tcgetattr(&stdin).context("cannot read the terminal settings")?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw)
            .context("cannot switch the terminal to raw mode")?;
        Ok(RawTerminal { saved: Some(saved) })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ =
                rustix::termios::tcsetattr(std::io::stdin(), rustix::termios::OptionalActions::Now, saved);
        }
    }
}

/// What the standard-input thread reports.
enum Keyboard {
    Bytes(Bytes),
    /// Ctrl-] or the end of input.
    Leave,
}

async fn console(client: &Client, vm: &VmSelector) -> anyhow::Result<()> {
    let mut socket = client.websocket(&format!("{}/console", vm.path())).await?;
    eprintln!(
        "Connected to the serial console of {}. The escape sequence is ^]",
        vm.display()
    );
    let (keys, mut keyboard) = tokio::sync::mpsc::channel::<Keyboard>(64);
    // A plain thread, not a tokio task: a blocked read of standard input must not keep the
    // process alive after the console ends.
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buffer = [0_u8; 1024];
        loop {
            let count = match stdin.read(&mut buffer) {
                Ok(0) | Err(_) => {
                    let _ = keys.blocking_send(Keyboard::Leave);
                    return;
                }
                Ok(count) => count,
            };
            let chunk = &buffer[..count];
            if let Some(position) = chunk.iter().position(|byte| *byte == ESCAPE_BYTE) {
                if position > 0 {
                    let _ = keys.blocking_send(Keyboard::Bytes(Bytes::copy_from_slice(&chunk[..position])));
                }
                let _ = keys.blocking_send(Keyboard::Leave);
                return;
            }
            if keys
                .blocking_send(Keyboard::Bytes(Bytes::copy_from_slice(chunk)))
                .is_err()
            {
                return;
            }
        }
    });
    let terminal = RawTerminal::enter()?;
    let mut stdout = tokio::io::stdout();
    let ending = loop {
        tokio::select! {
            message = socket.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    stdout.write_all(&bytes).await.context("cannot write to standard output")?;
                    stdout.flush().await.context("cannot write to standard output")?;
                }
                Some(Ok(Message::Text(text))) => {
                    stdout.write_all(text.as_bytes()).await.context("cannot write to standard output")?;
                    stdout.flush().await.context("cannot write to standard output")?;
                }
                Some(Ok(Message::Close(frame))) => {
                    break frame.map_or_else(|| "the server closed the console".to_string(), |frame| frame.reason.to_string());
                }
                Some(Ok(_)) => {}
                None => break "the connection ended".to_string(),
                Some(Err(error)) => break format!("the connection failed: {error}"),
            },
            key = keyboard.recv() => match key {
                Some(Keyboard::Bytes(bytes)) => {
                    if let Err(error) = socket.send(Message::Binary(bytes)).await {
                        break format!("the connection failed: {error}");
                    }
                }
                Some(Keyboard::Leave) | None => {
                    let _ = socket.close(None).await;
                    break "left".to_string();
                }
            },
        }
    };
    drop(terminal);
    eprintln!("\r\nconsole of {} closed: {ending}", vm.display());
    Ok(())
}

async fn vnc_proxy(
    client: &Client,
    vm: &VmSelector,
    address: IpAddr,
    port: Option<u16>,
) -> anyhow::Result<()> {
    // Fail early, with the server's reason, when the VM has no VNC console or is not running.
    let probe = client.websocket(&format!("{}/vnc", vm.path())).await?;
    drop(probe);
    let listener = match port {
        Some(port) => tokio::net::TcpListener::bind(SocketAddr::new(address, port))
            .await
            .with_context(|| format!("cannot listen on {address}:{port}"))?,
        None => {
            let mut bound = None;
            for port in FIRST_VNC_PORT..FIRST_VNC_PORT + VNC_PORT_ATTEMPTS {
                if let Ok(listener) = tokio::net::TcpListener::bind(SocketAddr::new(address, port)).await {
                    bound = Some(listener);
                    break;
                }
            }
            bound.with_context(|| {
                format!(
                    "no free port between {FIRST_VNC_PORT} and {}; choose one with --port",
                    FIRST_VNC_PORT + VNC_PORT_ATTEMPTS - 1
                )
            })?
        }
    };
    let local = listener.local_addr().context("cannot read the proxy's address")?;
    println!("VNC proxy for {} listening on {local}", vm.display());
    println!(
        "connect a VNC viewer to it, e.g. `vncviewer {}::{}` or `remote-viewer vnc://{local}`; Ctrl-C stops the proxy",
        local.ip(),
        local.port()
    );
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = accepted.context("cannot accept a VNC connection")?;
                let socket = match client.websocket(&format!("{}/vnc", vm.path())).await {
                    Ok(socket) => socket,
                    Err(error) => {
                        eprintln!("cannot open the VNC console for {peer}: {error:#}");
                        continue;
                    }
                };
                eprintln!("VNC viewer {peer} connected");
                tokio::spawn(async move {
                    let ending = bridge_tcp(stream, socket).await;
                    eprintln!("VNC viewer {peer} disconnected: {ending}");
                });
            }
            _ = tokio::signal::ctrl_c() => {
                println!("VNC proxy stopped");
                return Ok(());
            }
        }
    }
}

async fn bridge_tcp(
    mut stream: tokio::net::TcpStream,
    mut socket: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
) -> String {
    let mut buffer = vec![0_u8; 64 * 1024];
    loop {
        tokio::select! {
            read = stream.read(&mut buffer) => match read {
                Ok(0) => {
                    let _ = socket.close(None).await;
                    return "the viewer closed the connection".to_string();
                }
                Ok(count) => {
                    if let Err(error) = socket.send(Message::Binary(Bytes::copy_from_slice(&buffer[..count]))).await {
                        return format!("the websocket failed: {error}");
                    }
                }
                Err(error) => return format!("reading from the viewer failed: {error}"),
            },
            message = socket.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    if let Err(error) = stream.write_all(&bytes).await {
                        // A viewer that sends a key and disconnects must not lose the key.
                        forward_remaining_input(&mut stream, &mut socket, &mut buffer).await;
                        return format!("writing to the viewer failed: {error}");
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    return frame.map_or_else(|| "the server closed the console".to_string(), |frame| frame.reason.to_string());
                }
                Some(Ok(_)) => {}
                None => return "the server connection ended".to_string(),
                Some(Err(error)) => return format!("the websocket failed: {error}"),
            },
        }
    }
}

/// Sends what a departed viewer wrote before leaving to the VM, then closes the websocket.
async fn forward_remaining_input(
    stream: &mut tokio::net::TcpStream,
    socket: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    buffer: &mut [u8],
) {
    let forward = async {
        while let Ok(count @ 1..) = stream.read(buffer).await {
            if socket
                .send(Message::Binary(Bytes::copy_from_slice(&buffer[..count])))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = socket.close(None).await;
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), forward).await;
}

fn print_structured<T: Serialize>(value: &T, output: OutputFormat) -> anyhow::Result<()> {
    let text = match output {
        OutputFormat::Json => {
            let mut text = serde_json::to_string_pretty(value)?;
            text.push('\n');
            text
        }
        OutputFormat::Yaml | OutputFormat::Table => serde_yaml::to_string(value)?,
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .context("cannot write to standard output")
}

fn print_vms(vms: &[VmView], output: OutputFormat) -> anyhow::Result<()> {
    match output {
        OutputFormat::Table => {
            let now = now_seconds();
            let rows: Vec<Vec<String>> = vms
                .iter()
                .map(|vm| {
                    vec![
                        vm.namespace.clone(),
                        vm.name.clone(),
                        vm.status.phase.clone(),
                        vm.run_strategy.clone(),
                        vm.status.restart_count.to_string(),
                        vm.snapshots.len().to_string(),
                        age(&vm.created_at, now),
                    ]
                })
                .collect();
            print_table(
                &[
                    "NAMESPACE",
                    "NAME",
                    "PHASE",
                    "RUN STRATEGY",
                    "RESTARTS",
                    "SNAPSHOTS",
                    "AGE",
                ],
                &rows,
            );
            for vm in vms {
                if let Some(message) = &vm.status.message {
                    println!("{}/{}: {message}", vm.namespace, vm.name);
                }
            }
            Ok(())
        }
        // One VM prints as itself, like `kubectl get NAME -o yaml`.
        other => match vms {
            [single] => print_structured(single, other),
            many => print_structured(&many, other),
        },
    }
}

fn print_snapshots(snapshots: &[SnapshotView], output: OutputFormat) -> anyhow::Result<()> {
    match output {
        OutputFormat::Table if snapshots.is_empty() => {
            println!("no snapshots");
            Ok(())
        }
        OutputFormat::Table => {
            let now = now_seconds();
            let rows: Vec<Vec<String>> = snapshots
                .iter()
                .map(|snapshot| {
                    vec![
                        snapshot.name.clone(),
                        if snapshot.memory { "yes" } else { "no" }.to_string(),
                        snapshot.taken_in_phase.clone(),
                        age(&snapshot.created_at, now),
                    ]
                })
                .collect();
            print_table(&["NAME", "MEMORY", "TAKEN WHEN", "AGE"], &rows);
            Ok(())
        }
        other => print_structured(&serde_json::json!({"items": snapshots}), other),
    }
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|header| header.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (index, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if index + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}   "));
            }
        }
        println!("{}", text.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn now_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

fn age(timestamp: &str, now: u64) -> String {
    paddock_console::time::parse_rfc3339(timestamp).map_or_else(
        || "?".to_string(),
        |then| paddock_console::time::short_age(now.saturating_sub(then)),
    )
}
