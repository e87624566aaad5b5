//! The `vnc`, `console` and `vnc/screenshot` subresources of VirtualMachineInstances.
//!
//! Role: virt-api streams a VMI's VNC server or serial console over a websocket with subprotocol
//! `plain.kubevirt.io` (raw bytes in binary frames, both ways) and serves screenshots as PNG. Here
//! the bytes come from a real QEMU booted for the VMI on first use ([`crate::machines`]).
//!
//! Contract: the VMI is validated as virt-api validates it before anything is upgraded
//! (`vmiHasDisplay`, `validateVMIForConsole`: 400 "VMI is not running", 400 "No graphics devices are
//! present.", 409 "VMI is in failed status", ...), so failures are plain HTTP `Status` answers; the
//! websocket closes when either side closes.

use std::path::{Path as FilePath, PathBuf};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::lifecycle::{fetch_vmi, phase};
use crate::server::AppState;
use crate::status::StatusError;

/// KubeVirt's websocket subprotocol for raw VNC and serial bytes.
pub const PLAIN_SUBPROTOCOL: &str = "plain.kubevirt.io";
/// How long a fresh QEMU may take to create its sockets.
const SOCKET_WAIT: Duration = Duration::from_secs(15);

/// `vmiHasDisplay`.
fn validate_display(vmi: &Value) -> Result<(), StatusError> {
    if vmi
        .pointer("/spec/domain/devices/autoattachGraphicsDevice")
        .and_then(Value::as_bool)
        == Some(false)
    {
        return Err(StatusError::bad_request("No graphics devices are present."));
    }
    if phase(vmi) != "Running" {
        return Err(StatusError::bad_request("VMI is not running"));
    }
    Ok(())
}

/// `validateVMIForConsole`.
fn validate_console(vmi: &Value, name: &str) -> Result<(), StatusError> {
    if vmi
        .pointer("/spec/domain/devices/autoattachSerialConsole")
        .and_then(Value::as_bool)
        == Some(false)
    {
        return Err(StatusError::bad_request("No serial consoles are present."));
    }
    if phase(vmi) == "Failed" {
        return Err(StatusError::conflict(
            "virtualmachineinstance",
            name,
            "VMI is in failed status",
        ));
    }
    if phase(vmi) != "Running" {
        return Err(StatusError::bad_request("VMI is not running"));
    }
    Ok(())
}

fn uid(vmi: &Value) -> &str {
    vmi.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or("")
}

/// The disk file the simulated CDI imported (or received by upload) for the first of the VMI's
/// volumes that is a DataVolume or PVC (a PVC is a DataVolume of that name here: there are no
/// PVCs), when that file exists; `None` boots the test disk (see `machines`).
async fn volume_disk(state: &AppState, namespace: &str, vmi: &Value) -> Option<PathBuf> {
    let claims = vmi
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|volume| {
            volume
                .pointer("/dataVolume/name")
                .or_else(|| volume.pointer("/persistentVolumeClaim/claimName"))
                .and_then(Value::as_str)
        });
    let data_volumes =
        kube::Api::<paddock_api::cdi::datavolume::DataVolume>::namespaced(state.client().clone(), namespace);
    for claim in claims {
        let Ok(Some(data_volume)) = data_volumes.get_opt(claim).await else {
            continue;
        };
        let Some(path) = data_volume
            .metadata
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get(paddock_kubevirt_controllers::ANNOTATION_DISK_PATH))
        else {
            continue;
        };
        let path = PathBuf::from(path);
        if path.is_file() {
            return Some(path);
        }
    }
    None
}

/// Which socket a websocket is bridged to.
#[derive(Clone, Copy)]
enum Stream {
    Vnc,
    Serial,
}

/// `GET .../virtualmachineinstances/{name}/vnc` (websocket).
pub async fn vnc(
    State(state): State<AppState>,
    Path((namespace, name)): Path<(String, String)>,
    upgrade: WebSocketUpgrade,
) -> Response {
    open(state, namespace, name, upgrade, Stream::Vnc).await
}

/// `GET .../virtualmachineinstances/{name}/console` (websocket).
pub async fn console(
    State(state): State<AppState>,
    Path((namespace, name)): Path<(String, String)>,
    upgrade: WebSocketUpgrade,
) -> Response {
    open(state, namespace, name, upgrade, Stream::Serial).await
}

async fn open(
    state: AppState,
    namespace: String,
    name: String,
    upgrade: WebSocketUpgrade,
    stream: Stream,
) -> Response {
    let socket = match connect(&state, &namespace, &name, stream).await {
        Ok(socket) => socket,
        Err(error) => return error.into_response(),
    };
    upgrade
        .protocols([PLAIN_SUBPROTOCOL])
        .on_upgrade(move |websocket| bridge(websocket, socket))
}

async fn connect(
    state: &AppState,
    namespace: &str,
    name: &str,
    stream: Stream,
) -> Result<UnixStream, StatusError> {
    let vmi = fetch_vmi(state, namespace, name).await?;
    match stream {
        Stream::Vnc => validate_display(&vmi)?,
        Stream::Serial => validate_console(&vmi, name)?,
    }
    let disk = volume_disk(state, namespace, &vmi).await;
    let machines = state.machines();
    let id = machines
        .ensure(namespace, name, uid(&vmi), disk.as_deref())
        .await
        .map_err(StatusError::internal)?;
    let path = match stream {
        Stream::Vnc => machines.vnc_socket(&id),
        Stream::Serial => machines.serial_socket(&id),
    }
    .map_err(StatusError::internal)?;
    connect_with_retry(&path).await
}

async fn connect_with_retry(path: &FilePath) -> Result<UnixStream, StatusError> {
    let deadline = tokio::time::Instant::now() + SOCKET_WAIT;
    loop {
        match UnixStream::connect(path).await {
            Ok(stream) => return Ok(stream),
            Err(error) if tokio::time::Instant::now() >= deadline => {
                return Err(StatusError::internal(format!(
                    "cannot connect to the vmi's qemu socket {}: {error}",
                    path.display()
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Copies bytes between the websocket (binary frames; text frames are taken as their bytes) and
/// the unix socket until either closes.
async fn bridge(mut websocket: WebSocket, socket: UnixStream) {
    let (mut reader, mut writer) = socket.into_split();
    let mut buffer = vec![0_u8; 64 * 1024];
    loop {
        tokio::select! {
            message = websocket.recv() => {
                let bytes = match message {
                    Some(Ok(Message::Binary(bytes))) => bytes.to_vec(),
                    Some(Ok(Message::Text(text))) => text.as_bytes().to_vec(),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                };
                if writer.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            read = reader.read(&mut buffer) => {
                match read {
                    Ok(0) | Err(_) => break,
                    Ok(count) => {
                        let frame = Message::Binary(buffer[..count].to_vec().into());
                        if websocket.send(frame).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
    }
    let _ = websocket.send(Message::Close(None)).await;
}

/// `GET .../virtualmachineinstances/{name}/vnc/screenshot` (PNG).
pub async fn screenshot(
    State(state): State<AppState>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    match take_screenshot(&state, &namespace, &name).await {
        Ok(png) => (StatusCode::OK, [(header::CONTENT_TYPE, "image/png")], png).into_response(),
        Err(error) => error.into_response(),
    }
}

async fn take_screenshot(state: &AppState, namespace: &str, name: &str) -> Result<Vec<u8>, StatusError> {
    let vmi = fetch_vmi(state, namespace, name).await?;
    validate_display(&vmi)?;
    let disk = volume_disk(state, namespace, &vmi).await;
    let machines = state.machines();
    let id = machines
        .ensure(namespace, name, uid(&vmi), disk.as_deref())
        .await
        .map_err(StatusError::internal)?;
    machines.screenshot(&id).await.map_err(StatusError::internal)
}
