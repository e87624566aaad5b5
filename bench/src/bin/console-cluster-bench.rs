//! `console-cluster-bench`: VNC throughput through the console's cluster path, as a ratio to
//! connecting to the KubeVirt simulator directly, in the same run.
//!
//! Role: the target (≥ 0.95) for what the console's proxying costs in a cluster. The
//! world is the tests' control plane with the KubeVirt simulator (`paddock_tests::cluster`): one
//! plain KubeVirt VM, Running, whose `vnc` subresource reaches the simulator's real QEMU.
//!
//! Three paths carry the same RFB conversation (full-screen, non-incremental raw updates, one at a
//! time, as a viewer asks):
//! - `simulator`: straight to the simulator's aggregated server, as kube-apiserver's aggregator
//!   opens it (front-proxy certificate, `X-Remote-User`) — the anchor;
//! - `apiserver`: through kube-apiserver (the admin's client certificate), what virtctl does;
//! - `console`: through paddock's console (in this process, the Kubernetes backend, acting as the
//!   admin by impersonation), which opens the `apiserver` path for the user.
//!
//! Contract: prints one line per timed read and the medians with both ratios. The paths run
//! interleaved (simulator, apiserver, console, repeated), so drift of the machine hits them alike.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use paddock_console::kubernetes::{KubernetesBackend, KubernetesOptions, ProxyHeaders};
use paddock_console::{Api as ConsoleApi, Authentication};
use paddock_tests::cluster::Cluster;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const MIB: f64 = 1024.0 * 1024.0;
const TIMEOUT: Duration = Duration::from_secs(180);

/// VNC throughput through the console's cluster path; see the module documentation.
#[derive(Debug, Parser)]
struct Arguments {
    /// Full-screen updates per timed read.
    #[arg(long, default_value_t = 200)]
    updates: u32,
    /// Timed reads per path (after one warm-up read each).
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

/// Failures of the bench.
#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error("{0}")]
    Setup(String),
    #[error("the RFB conversation on {path} failed: {message}")]
    Rfb { path: &'static str, message: String },
}

fn setup(what: &str) -> impl FnOnce(String) -> BenchError + '_ {
    move |details| BenchError::Setup(format!("{what}: {details}"))
}

/// Reads RFB messages out of binary websocket frames.
struct Frames<S> {
    socket: WebSocketStream<S>,
    buffer: Vec<u8>,
    position: usize,
    received: u64,
    path: &'static str,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Frames<S> {
    fn fail(&self, message: impl Into<String>) -> BenchError {
        BenchError::Rfb {
            path: self.path,
            message: message.into(),
        }
    }

    async fn take(&mut self, count: usize) -> Result<&[u8], BenchError> {
        while self.buffer.len() - self.position < count {
            let next = tokio::time::timeout(TIMEOUT, self.socket.next())
                .await
                .map_err(|_| self.fail(format!("nothing within {TIMEOUT:?}")))?;
            match next {
                Some(Ok(Message::Binary(bytes))) => {
                    self.received += bytes.len() as u64;
                    self.buffer.drain(..self.position);
                    self.position = 0;
                    self.buffer.extend_from_slice(&bytes);
                }
                Some(Ok(Message::Close(frame))) => return Err(self.fail(format!("closed: {frame:?}"))),
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(self.fail(error.to_string())),
                None => return Err(self.fail("ended")),
            }
        }
        let start = self.position;
        self.position += count;
        Ok(&self.buffer[start..start + count])
    }

    async fn u16(&mut self) -> Result<u16, BenchError> {
        let bytes = self.take(2).await?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    async fn u32(&mut self) -> Result<u32, BenchError> {
        let bytes = self.take(4).await?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), BenchError> {
        let sent = self.socket.send(Message::Binary(bytes.to_vec().into())).await;
        sent.map_err(|error| self.fail(error.to_string()))
    }
}

/// One timed read: handshake, then `updates` full-screen raw updates. Returns (bytes, seconds,
/// whether the screen showed something).
async fn timed_read<S: AsyncRead + AsyncWrite + Unpin>(
    socket: WebSocketStream<S>,
    path: &'static str,
    updates: u32,
) -> Result<(u64, f64, bool), BenchError> {
    let mut frames = Frames {
        socket,
        buffer: Vec::new(),
        position: 0,
        received: 0,
        path,
    };
    let banner = frames.take(12).await?.to_vec();
    if banner != b"RFB 003.008\n" {
        return Err(frames.fail(format!("banner {:?}", String::from_utf8_lossy(&banner))));
    }
    frames.write(b"RFB 003.008\n").await?;
    let count = usize::from(frames.take(1).await?[0]);
    if !frames.take(count).await?.contains(&1) {
        return Err(frames.fail("security type None is not offered"));
    }
    frames.write(&[1]).await?;
    if frames.u32().await? != 0 {
        return Err(frames.fail("the security handshake failed"));
    }
    frames.write(&[1]).await?;
    let width = frames.u16().await?;
    let height = frames.u16().await?;
    frames.take(16).await?;
    let name_length = frames.u32().await? as usize;
    frames.take(name_length).await?;
    frames
        .write(&[
            0, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
        ])
        .await?;
    frames.write(&[2, 0, 0, 1, 0, 0, 0, 0]).await?;
    let mut request = vec![3, 0, 0, 0, 0, 0];
    request.extend_from_slice(&width.to_be_bytes());
    request.extend_from_slice(&height.to_be_bytes());
    let started = Instant::now();
    let first_byte = frames.received;
    let mut lit = false;
    for _ in 0..updates {
        frames.write(&request).await?;
        loop {
            match frames.take(1).await?[0] {
                0 => break,
                2 => {}
                3 => {
                    frames.take(3).await?;
                    let length = frames.u32().await? as usize;
                    frames.take(length).await?;
                }
                other => return Err(frames.fail(format!("unexpected server message type {other}"))),
            }
        }
        frames.take(1).await?;
        let rectangles = frames.u16().await?;
        for _ in 0..rectangles {
            let header = frames.take(12).await?.to_vec();
            let w = usize::from(u16::from_be_bytes([header[4], header[5]]));
            let h = usize::from(u16::from_be_bytes([header[6], header[7]]));
            let pixels = frames.take(w * h * 4).await?;
            if !lit {
                lit = pixels
                    .chunks_exact(4)
                    .any(|pixel| pixel[..3].iter().any(|channel| *channel != 0));
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let _ = frames.socket.close(None).await;
    Ok((frames.received - first_byte, seconds, lit))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

async fn bench(arguments: Arguments) -> Result<(), BenchError> {
    let cluster = Cluster::shared()
        .map_err(|error| setup("the test cluster")(error.to_string()))?
        .ok_or_else(|| BenchError::Setup("the test cluster is skipped (PADDOCK_ALLOW_SKIP)".into()))?;
    let namespace = cluster
        .namespace("console-bench")
        .await
        .map_err(|error| setup("a namespace")(error.to_string()))?;
    let ns = namespace.name().to_string();
    let client = cluster
        .admin_client()
        .await
        .map_err(|error| setup("the admin client")(error.to_string()))?;
    let gvk = |kind: &str, plural: &str| {
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("kubevirt.io", "v1", kind), plural)
    };
    let vms: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &gvk("VirtualMachine", "virtualmachines"));
    let vmis: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns,
        &gvk("VirtualMachineInstance", "virtualmachineinstances"),
    );
    let vm: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": "bench"},
        "spec": {"runStrategy": "Always", "template": {"spec": {"domain": {"devices": {}, "memory": {"guest": "256Mi"}}}}},
    }))
    .map_err(|error| setup("the VM")(error.to_string()))?;
    vms.create(&PostParams::default(), &vm)
        .await
        .map_err(|error| setup("creating the VM")(error.to_string()))?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let running = vmis
            .get_opt("bench")
            .await
            .map_err(|error| setup("reading the VMI")(error.to_string()))?
            .is_some_and(|vmi| vmi.data["status"]["phase"] == "Running");
        if running {
            break;
        }
        if Instant::now() > deadline {
            return Err(BenchError::Setup("the VMI never ran".into()));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The console, in this process, trusting identity headers so the bench needs no token.
    let config = paddock_console::kubernetes::load_config(Some(&cluster.admin_kubeconfig()), None)
        .await
        .map_err(|error| setup("the kubeconfig")(error.to_string()))?;
    let backend = KubernetesBackend::start(config, KubernetesOptions::default())
        .map_err(|error| setup("the console backend")(error.to_string()))?;
    let proxy = ProxyHeaders::new("X-Remote-User", Some("X-Remote-Group")).map_err(setup("proxy headers"))?;
    let authentication = Authentication::Kubernetes(Arc::new(backend.authenticator(Some(proxy))));
    let api = ConsoleApi::with_authentication(Arc::new(backend), authentication);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|error| setup("the console's listener")(error.to_string()))?;
    let console_address = listener
        .local_addr()
        .map_err(|error| setup("the console's address")(error.to_string()))?;
    let router = api.router();
    tokio::spawn(async move { axum::serve(listener, router).await });

    let subresource =
        format!("/apis/subresources.kubevirt.io/v1/namespaces/{ns}/virtualmachineinstances/bench/vnc");
    let console_url = format!("ws://{console_address}/api/v1/vms/{ns}/bench/vnc");
    let open_console = || async {
        let mut request = console_url
            .as_str()
            .into_client_request()
            .map_err(|error| setup("the console request")(error.to_string()))?;
        let headers = request.headers_mut();
        headers.insert("Sec-WebSocket-Protocol", http_value("plain.kubevirt.io"));
        headers.insert("X-Remote-User", http_value("paddock-admin"));
        headers.insert("X-Remote-Group", http_value("system:masters"));
        tokio_tungstenite::connect_async(request)
            .await
            .map(|(socket, _)| socket)
            .map_err(|error| setup("the console websocket")(error.to_string()))
    };
    let open_simulator = || async {
        cluster
            .simulator_websocket(
                &subresource,
                "plain.kubevirt.io",
                "paddock-admin",
                &["system:masters"],
            )
            .await
            .map(|(socket, _)| socket)
            .map_err(|error| setup("the simulator websocket")(error.to_string()))
    };
    let open_apiserver = || async {
        cluster
            .websocket(&subresource, "plain.kubevirt.io", true)
            .await
            .map(|(socket, _)| socket)
            .map_err(|error| setup("the apiserver websocket")(error.to_string()))
    };

    // Boot the console machine and wait for a lit screen (the first connection boots it).
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (_, _, lit) = timed_read(open_apiserver().await?, "apiserver", 3).await?;
        if lit {
            break;
        }
        if Instant::now() > deadline {
            return Err(BenchError::Setup("the screen stayed black".into()));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut rates: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    let names = ["simulator", "apiserver", "console"];
    for run in 0..=arguments.runs {
        for (index, name) in names.iter().enumerate() {
            let (bytes, seconds, _) = match index {
                0 => timed_read(open_simulator().await?, name, arguments.updates).await?,
                1 => timed_read(open_apiserver().await?, name, arguments.updates).await?,
                _ => timed_read(open_console().await?, name, arguments.updates).await?,
            };
            let rate = bytes as f64 / MIB / seconds;
            if run == 0 {
                println!(
                    "warm-up  {name:<10} {:>8.1} MiB in {seconds:>6.2} s = {rate:>7.1} MiB/s",
                    bytes as f64 / MIB
                );
            } else {
                println!(
                    "run {run:<4} {name:<10} {:>8.1} MiB in {seconds:>6.2} s = {rate:>7.1} MiB/s",
                    bytes as f64 / MIB
                );
                if let Some(list) = rates.get_mut(index) {
                    list.push(rate);
                }
            }
        }
    }
    let [simulator, apiserver, console] = rates.map(|mut list| median(&mut list));
    println!();
    println!("median MiB/s: simulator {simulator:.1}, apiserver {apiserver:.1}, console {console:.1}");
    println!(
        "console / simulator = {:.3} (target >= 0.95); console / apiserver = {:.3}",
        console / simulator.max(f64::MIN_POSITIVE),
        console / apiserver.max(f64::MIN_POSITIVE)
    );
    drop(namespace);
    Ok(())
}

fn http_value(text: &'static str) -> tokio_tungstenite::tungstenite::http::HeaderValue {
    tokio_tungstenite::tungstenite::http::HeaderValue::from_static(text)
}

fn main() -> std::process::ExitCode {
    let arguments = Arguments::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench(arguments)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
