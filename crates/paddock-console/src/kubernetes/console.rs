//! Console websockets through the API server, as the signed-in user.
//!
//! Role: the browser talks only to the console; the console opens KubeVirt's `vnc` or `console`
//! subresource websocket (`plain.kubevirt.io`) on the API server with its own credentials and the
//! user's identity in `Impersonate-*` headers, so the API server's RBAC (and then virt-api's)
//! decides, and carries the bytes both ways. No cluster credential ever reaches the browser.
//!
//! Contract: errors are answered before any byte flows — the API server's `Status` becomes a
//! [`BackendError`] (403 names the missing permission). The channel ends when either side closes.

use axum::http::{HeaderValue, StatusCode, header};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::api::KUBEVIRT_SUBPROTOCOL;
use crate::backend::{BackendError, BackendResult, ConsoleChannel, ErrorKind, Permission, UserInfo};

use super::status_error;

/// Chunks buffered between the API server's websocket and one session, each way.
const SESSION_QUEUE: usize = 256;

/// Opens the websocket at `path` on the API server as `user`; `permission` is what the API
/// server checks (named in a 403).
pub async fn connect(
    client: &kube::Client,
    path: &str,
    user: &UserInfo,
    permission: Permission,
) -> BackendResult<ConsoleChannel> {
    let mut key_bytes = [0_u8; 16];
    getrandom::fill(&mut key_bytes).map_err(|error| {
        BackendError::new(
            ErrorKind::Internal,
            format!("no randomness for a websocket key: {error}"),
        )
    })?;
    let key = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(key_bytes)
    };
    let mut request = http::Request::get(path)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .header(header::SEC_WEBSOCKET_KEY, key.as_str())
        .header(header::SEC_WEBSOCKET_PROTOCOL, KUBEVIRT_SUBPROTOCOL)
        .body(Vec::new())
        .map_err(|error| {
            BackendError::new(
                ErrorKind::Internal,
                format!("cannot build the request for {path}: {error}"),
            )
        })?;
    super::impersonate(request.headers_mut(), user)?;
    let response = client
        .send(request.map(kube::client::Body::from))
        .await
        .map_err(|error| {
            BackendError::new(
                ErrorKind::Internal,
                format!("cannot reach the Kubernetes API server for {path}: {error}; try again"),
            )
        })?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let code = response.status().as_u16();
        let body = response.into_body().collect_bytes().await.unwrap_or_default();
        let status: kube::core::Status = serde_json::from_slice(&body).unwrap_or_else(|_| {
            let mut status = kube::core::Status::failure(&String::from_utf8_lossy(&body), "");
            status.code = code;
            status
        });
        let mut status = status;
        if status.code == 0 {
            status.code = code;
        }
        return Err(status_error(&status, &permission));
    }
    let expected = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let accepted = response
        .headers()
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .is_some_and(|value| {
            value == HeaderValue::from_str(&expected).unwrap_or(HeaderValue::from_static("-"))
        });
    if !accepted {
        return Err(BackendError::new(
            ErrorKind::Internal,
            format!("the API server answered the websocket {path} with a wrong Sec-WebSocket-Accept"),
        ));
    }
    let upgraded = hyper::upgrade::on(response).await.map_err(|error| {
        BackendError::new(
            ErrorKind::Internal,
            format!("the websocket upgrade of {path} failed: {error}"),
        )
    })?;
    let socket =
        tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    Ok(bridge(socket))
}

/// A console channel over an upgraded websocket: binary frames are the bytes.
fn bridge<S>(mut socket: tokio_tungstenite::WebSocketStream<S>) -> ConsoleChannel
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (to_session, from_vm) = mpsc::channel::<Bytes>(SESSION_QUEUE);
    let (to_vm, mut from_session) = mpsc::channel::<Bytes>(SESSION_QUEUE);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                message = socket.next() => match message {
                    Some(Ok(Message::Binary(bytes))) => {
                        if to_session.send(bytes).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(Message::Text(text))) => {
                        if to_session.send(Bytes::copy_from_slice(text.as_str().as_bytes())).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Ok(_)) => {}
                    Some(Err(error)) => {
                        tracing::debug!(%error, "the API server's console websocket failed");
                        break;
                    }
                },
                bytes = from_session.recv() => match bytes {
                    Some(bytes) => {
                        if socket.send(Message::Binary(bytes)).await.is_err() {
                            break;
                        }
                    }
                    None => {
                        let _ = socket.close(None).await;
                        break;
                    }
                },
            }
        }
    });
    ConsoleChannel { from_vm, to_vm }
}
