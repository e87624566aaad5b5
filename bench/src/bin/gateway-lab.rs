//! `gateway-lab`: buffer-size and copy experiments on paddock's VNC websocket gateway, for
//! deciding a fix when `bench/local.sh` reports a miss. Not a benchmark of record.
//!
//! Role: serve a recorded RFB stream (written by `local-bench` to `vnc-recording.bin`) through
//! variants of the gateway and read it with the same client as `local-bench`:
//! - `api/<bridge>-<KiB>`: paddock-console's real [`Api`] router and websocket session, over a
//!   backend whose console bridge is a copy of `crates/paddock-console/src/local.rs`'s `bridge`
//!   (`copy`: `Bytes::copy_from_slice` of a fixed read buffer, as today) or the proposed one
//!   (`split`: read into a `BytesMut`, hand over `split().freeze()`, no copy);
//! - `batch/<bridge>-<KiB>`: the same session loop with one change, feeding every chunk already
//!   queued before one flush, instead of one flush per chunk.
//!
//! Contract: prints one line per read and a table of medians with the ratio to a direct read.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use clap::Parser;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{SinkExt, StreamExt};
use paddock_api::app::VirtualMachineApp;
use paddock_bench::throughput::{Path3, Recording, ReplayServer, read_replay};
use paddock_console::{
    AccessToken, Api, Backend, BackendError, BackendResult, ConsoleChannel, ConsoleKind, ErrorKind,
    EventView, HealthCheck, PowerAction, SnapshotRequest, SnapshotView, VmRef, VmView,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// The same queue depth as paddock-console's `SESSION_QUEUE`.
const SESSION_QUEUE: usize = 256;
const TOKEN: &str = "gateway-lab-token-0123456789abcdef";
const MIB: f64 = 1024.0 * 1024.0;

/// Gateway experiments; see the module documentation.
#[derive(Debug, Parser)]
struct Arguments {
    /// The recording `local-bench` wrote (`<work>/vnc-recording.bin`, with `.handshake` beside it).
    #[arg(long)]
    recording: PathBuf,
    /// Stream per connection, MiB.
    #[arg(long, default_value_t = 1024)]
    stream_mib: u64,
    /// Timed reads per variant (after one verified warm-up).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Worker threads of the gateway's runtime (paddock serve uses one per core).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Variants, comma separated.
    #[arg(
        long,
        default_value = "api/copy-64,api/copy-256,api/split-64,api/split-256,batch/copy-64,batch/split-256"
    )]
    variants: String,
}

/// Failures of the lab.
#[derive(Debug, thiserror::Error)]
enum LabError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Throughput(#[from] paddock_bench::throughput::ThroughputError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BridgeKind {
    Copy,
    Split,
}

/// Parses `copy-64` into the bridge kind and its read buffer size.
fn parse_bridge(text: &str) -> Option<(BridgeKind, usize)> {
    let (kind, kib) = text.split_once('-')?;
    let kind = match kind {
        "copy" => BridgeKind::Copy,
        "split" => BridgeKind::Split,
        _ => return None,
    };
    Some((kind, kib.parse::<usize>().ok()? * 1024))
}

/// A console channel over a unix socket: `Copy` is paddock-console's `bridge` as it is today.
fn bridge(stream: UnixStream, kind: BridgeKind, buffer_bytes: usize) -> ConsoleChannel {
    let (to_session, from_vm) = mpsc::channel::<Bytes>(SESSION_QUEUE);
    let (to_vm, mut from_session) = mpsc::channel::<Bytes>(SESSION_QUEUE);
    tokio::spawn(async move {
        let (mut reader, mut writer) = stream.into_split();
        let mut buffer = vec![0_u8; buffer_bytes];
        let mut pending = BytesMut::with_capacity(buffer_bytes);
        loop {
            let read = async {
                match kind {
                    BridgeKind::Copy => reader
                        .read(&mut buffer)
                        .await
                        .map(|count| Bytes::copy_from_slice(&buffer[..count])),
                    BridgeKind::Split => {
                        pending.reserve(buffer_bytes);
                        reader
                            .read_buf(&mut pending)
                            .await
                            .map(|_| pending.split().freeze())
                    }
                }
            };
            tokio::select! {
                read = read => match read {
                    Ok(bytes) if bytes.is_empty() => break,
                    Err(_) => break,
                    Ok(bytes) => {
                        if to_session.send(bytes).await.is_err() {
                            break;
                        }
                    }
                },
                bytes = from_session.recv() => match bytes {
                    Some(bytes) => {
                        if writer.write_all(&bytes).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                },
            }
        }
    });
    ConsoleChannel { from_vm, to_vm }
}

/// A backend with consoles only: VM `<bridge>-<KiB>` is the replay socket through that bridge.
struct LabBackend {
    socket: PathBuf,
}

fn unsupported<T: Send + 'static>() -> BoxFuture<'static, BackendResult<T>> {
    Box::pin(async {
        Err(BackendError::new(
            ErrorKind::Unsupported,
            "gateway-lab only serves consoles",
        ))
    })
}

impl Backend for LabBackend {
    fn kind(&self) -> &'static str {
        "gateway-lab"
    }
    fn readiness(&self) -> BoxFuture<'_, Vec<HealthCheck>> {
        Box::pin(async { Vec::new() })
    }
    fn list(&self, _namespace: Option<String>) -> BoxFuture<'_, BackendResult<Vec<VmView>>> {
        unsupported()
    }
    fn get(&self, _vm: VmRef) -> BoxFuture<'_, BackendResult<VmView>> {
        unsupported()
    }
    fn create(&self, _app: VirtualMachineApp) -> BoxFuture<'_, BackendResult<VmView>> {
        unsupported()
    }
    fn delete(&self, _vm: VmRef, _force: bool) -> BoxFuture<'_, BackendResult<()>> {
        unsupported()
    }
    fn power(&self, _vm: VmRef, _action: PowerAction) -> BoxFuture<'_, BackendResult<VmView>> {
        unsupported()
    }
    fn snapshot_list(&self, _vm: VmRef) -> BoxFuture<'_, BackendResult<Vec<SnapshotView>>> {
        unsupported()
    }
    fn snapshot_create(
        &self,
        _vm: VmRef,
        _request: SnapshotRequest,
    ) -> BoxFuture<'_, BackendResult<SnapshotView>> {
        unsupported()
    }
    fn snapshot_restore(&self, _vm: VmRef, _snapshot: String) -> BoxFuture<'_, BackendResult<VmView>> {
        unsupported()
    }
    fn snapshot_delete(&self, _vm: VmRef, _snapshot: String) -> BoxFuture<'_, BackendResult<()>> {
        unsupported()
    }
    fn screenshot(&self, _vm: VmRef) -> BoxFuture<'_, BackendResult<Vec<u8>>> {
        unsupported()
    }
    fn open_console(&self, vm: VmRef, _kind: ConsoleKind) -> BoxFuture<'_, BackendResult<ConsoleChannel>> {
        let socket = self.socket.clone();
        Box::pin(async move {
            let (kind, size) = parse_bridge(&vm.name).ok_or_else(|| {
                BackendError::new(ErrorKind::NotFound, format!("no bridge variant {}", vm.name))
            })?;
            let stream = UnixStream::connect(&socket)
                .await
                .map_err(|error| BackendError::new(ErrorKind::Internal, error.to_string()))?;
            Ok(bridge(stream, kind, size))
        })
    }
    fn events(&self) -> BoxStream<'static, EventView> {
        futures_util::stream::empty().boxed()
    }
}

/// The `batch/` session: paddock-console's `console_session` (VM to client direction) with
/// every queued chunk fed before one flush.
async fn batch_route(
    State(socket_path): State<Arc<PathBuf>>,
    Path(variant): Path<String>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let (kind, size) = parse_bridge(&variant).unwrap_or((BridgeKind::Copy, 64 * 1024));
    upgrade
        .protocols([paddock_console::KUBEVIRT_SUBPROTOCOL])
        .on_upgrade(move |socket| async move {
            if let Ok(stream) = UnixStream::connect(socket_path.as_path()).await {
                batch_session(socket, bridge(stream, kind, size)).await;
            }
        })
}

async fn batch_session(mut socket: WebSocket, mut channel: ConsoleChannel) {
    loop {
        tokio::select! {
            from_vm = channel.from_vm.recv() => match from_vm {
                Some(bytes) => {
                    if socket.feed(Message::Binary(bytes)).await.is_err() {
                        return;
                    }
                    while let Ok(more) = channel.from_vm.try_recv() {
                        if socket.feed(Message::Binary(more)).await.is_err() {
                            return;
                        }
                    }
                    if socket.flush().await.is_err() {
                        return;
                    }
                }
                None => {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
            },
            message = socket.recv() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    if channel.to_vm.send(bytes).await.is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                _ => return,
            },
        }
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        length if length % 2 == 1 => sorted[length / 2],
        length => (sorted[length / 2 - 1] + sorted[length / 2]) / 2.0,
    }
}

fn main() -> std::process::ExitCode {
    let arguments = Arguments::parse();
    match run(&arguments) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gateway-lab: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(arguments: &Arguments) -> Result<(), LabError> {
    let read = |path: PathBuf| std::fs::read(&path).map_err(|source| LabError::Read { path, source });
    let bytes = read(arguments.recording.clone())?;
    let handshake_text = read(arguments.recording.with_extension("handshake"))?;
    let handshake = String::from_utf8_lossy(&handshake_text)
        .trim()
        .parse::<usize>()
        .map_err(|error| LabError::Setup(format!("bad handshake length: {error}")))?
        .min(bytes.len());
    let updates = bytes[handshake..].to_vec();
    let recording = Recording {
        handshake: Arc::new(bytes[..handshake].to_vec()),
        repeat: (arguments.stream_mib * 1024 * 1024).div_ceil(updates.len().max(1) as u64),
        updates: Arc::new(updates),
    };
    let socket = std::env::temp_dir().join(format!("gateway-lab-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let _replay = ReplayServer::start(&socket, recording.clone())?;

    // The gateway: its own multi-threaded runtime, as in paddock serve.
    let gateway = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(arguments.workers)
        .enable_all()
        .build()
        .map_err(|error| LabError::Setup(format!("cannot start the gateway runtime: {error}")))?;
    let token = AccessToken::from_secret(TOKEN).map_err(|error| LabError::Setup(error.to_string()))?;
    let api = Api::new(
        Arc::new(LabBackend {
            socket: socket.clone(),
        }),
        token,
    );
    let router = api.router().merge(
        axum::Router::new()
            .route("/lab/batch/{variant}", axum::routing::get(batch_route))
            .with_state(Arc::new(socket.clone())),
    );
    let address: SocketAddr = gateway.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|error| LabError::Setup(format!("cannot listen: {error}")))?;
        let address = listener
            .local_addr()
            .map_err(|error| LabError::Setup(error.to_string()))?;
        tokio::spawn(async move { axum::serve(listener, router).await });
        Ok::<_, LabError>(address)
    })?;

    let mut paths = vec![("direct unix socket".to_string(), Path3::Direct(socket.clone()))];
    for variant in arguments.variants.split(',').map(str::trim) {
        let url = match variant.split_once('/') {
            Some(("api", bridge)) => format!("ws://{address}/api/v1/vms/default/{bridge}/vnc?token={TOKEN}"),
            Some(("batch", bridge)) => format!("ws://{address}/lab/batch/{bridge}"),
            _ => return Err(LabError::Setup(format!("unknown variant {variant}"))),
        };
        paths.push((
            variant.to_string(),
            Path3::WebSocket {
                url,
                subprotocol: paddock_console::KUBEVIRT_SUBPROTOCOL,
            },
        ));
    }
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| LabError::Setup(format!("cannot start the client runtime: {error}")))?;
    println!(
        "gateway-lab: {:.0} MiB per connection, {} gateway worker(s), load {}",
        recording.stream_bytes() as f64 / MIB,
        arguments.workers,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let mut rates = vec![Vec::new(); paths.len()];
    let mut gateway_cpu = vec![Vec::new(); paths.len()];
    client.block_on(async {
        for round in 0..=arguments.runs {
            for offset in 0..paths.len() {
                let index = (round + offset) % paths.len();
                let (name, path) = &paths[index];
                let before = paddock_bench::throughput::cpu_seconds("self");
                let started = Instant::now();
                let read = read_replay(name, path, &recording, round == 0).await?;
                let elapsed = started.elapsed().as_secs_f64();
                // Process CPU minus the reader's own thread: the gateway and the replay writer.
                let others = before
                    .zip(paddock_bench::throughput::cpu_seconds("self"))
                    .zip(read.client_cpu)
                    .map(|((before, after), client)| (after - before - client) / elapsed);
                let rate = read.bytes as f64 / read.seconds / MIB;
                if round > 0 {
                    rates[index].push(rate);
                    if let Some(others) = others {
                        gateway_cpu[index].push(others);
                    }
                }
                println!(
                    "  {}{name:<18} {rate:>8.1} MiB/s  (gateway + writer CPU {:.2} cores, reader {:.2} s)",
                    if round == 0 { "warm-up " } else { "" },
                    others.unwrap_or(f64::NAN),
                    read.client_cpu.unwrap_or(f64::NAN)
                );
            }
        }
        Ok::<_, LabError>(())
    })?;
    let direct = median(&rates[0]);
    println!(
        "\n{:<20} {:>9} {:>9} {:>12}",
        "variant", "MiB/s", "/ direct", "gw+writer cores"
    );
    for (index, (name, _)) in paths.iter().enumerate() {
        println!(
            "{name:<20} {:>9.1} {:>9.2} {:>12.2}",
            median(&rates[index]),
            median(&rates[index]) / direct,
            median(&gateway_cpu[index])
        );
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
