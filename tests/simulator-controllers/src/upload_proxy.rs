//! Simulated CDI upload proxy (HTTPS): `POST`/`PUT` `/v1beta1/upload` (sync) and
//! `/v1beta1/upload-async` (also the `v1alpha1` paths), `GET /healthz`.
//!
//! Contract (after CDI v1.66's `pkg/uploadproxy`): `Authorization: Bearer <token>` is required (400
//! without it or when malformed, 401 when the token does not verify or has expired); the DataVolume
//! named by the token must exist and be UploadReady within ten seconds (else 503 with the reason in the
//! body). Then the body streams to `<work_dir>/datavolumes/<namespace>/<name>-<uid>/upload.partial`; the
//! sync path answers after the disk passed the checks (200, or 400 with the refusal), the async path as
//! soon as the bytes are stored. Every origin is allowed (CORS), as CDI's proxy does.
//! Different from CDI: there is no upload server pod behind the proxy,
//! the proxy itself stores the bytes; compressed uploads and the `upload-form` paths are not supported.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use futures_util::StreamExt;
use kube::ResourceExt;
use kube::api::Api;
use paddock_api::cdi::datavolume::DataVolume;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::datavolume::Shared;
use crate::{Error, TlsMaterial, UploadTokens};

/// How long the proxy waits for a DataVolume to become UploadReady (CDI's `waitReadyTime`).
const WAIT_READY: Duration = Duration::from_secs(10);
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct ProxyState {
    tokens: UploadTokens,
    shared: Shared,
}

/// Accepted TLS connections, handshaken off the accept loop so a slow client cannot block others.
struct TlsListener {
    connections: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_address: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.connections.recv().await {
            Some(connection) => connection,
            // The accept loop ended (its listener failed for good): serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_address)
    }
}

/// Serves the upload proxy on `listener` until the future is dropped.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: TlsMaterial,
    tokens: UploadTokens,
    shared: Shared,
) -> Result<(), Error> {
    let acceptor = TlsAcceptor::from(tls.server_config()?);
    let local_address = listener.local_addr().map_err(|source| Error::Listen {
        address: SocketAddr::from(([127, 0, 0, 1], 0)),
        source,
    })?;
    let (sender, connections) = mpsc::channel(16);
    let accept_loop = tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "upload proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let sender = sender.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let _ = sender.send((stream, peer)).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%error, %peer, "upload proxy tls handshake failed"),
                    Err(_) => tracing::debug!(%peer, "upload proxy tls handshake timed out"),
                }
            });
        }
    });
    let state = ProxyState { tokens, shared };
    let router = Router::new()
        .route("/healthz", get(|| async { "OK" }))
        .route("/v1beta1/upload", any(upload))
        .route("/v1beta1/upload-async", any(upload))
        .route("/v1alpha1/upload", any(upload))
        .route("/v1alpha1/upload-async", any(upload))
        .route(
            "/api/export.kubevirt.io/v1beta1/namespaces/{namespace}/virtualmachineexports/{name}/volumes/{volume}/{file}",
            get(export_volume),
        )
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn(allow_all_origins))
        .with_state(Arc::new(state));
    let listener = TlsListener {
        connections,
        local_address,
    };
    let served = axum::serve(listener, router).await;
    accept_loop.abort();
    Err(Error::Controller {
        controller: "cdi upload proxy",
        reason: match served {
            Ok(()) => "the server stopped".to_owned(),
            Err(error) => error.to_string(),
        },
    })
}

/// The simulated virt-exportproxy: an export's volume (see `export`).
async fn export_volume(
    State(state): State<Arc<ProxyState>>,
    axum::extract::Path(target): axum::extract::Path<(String, String, String, String)>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let token = crate::export::request_token(&headers, uri.query());
    crate::export::serve_volume(&state.shared, target, token).await
}

fn text(status: StatusCode, message: impl Into<String>) -> Response {
    (status, message.into()).into_response()
}

/// The bearer token of an `Authorization` header (CDI's `(?i)^Bearer\s+([A-Za-z0-9\-\._~\+\/]+)$`).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(char::is_whitespace)?;
    let token = token.trim_start();
    let valid = scheme.eq_ignore_ascii_case("bearer")
        && !token.is_empty()
        && token
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || "-._~+/".contains(character));
    valid.then_some(token)
}

/// Waits until the DataVolume is UploadReady, as the real proxy waits for the upload pod.
async fn wait_ready(api: &Api<DataVolume>, name: &str) -> Result<DataVolume, Response> {
    let deadline = tokio::time::Instant::now() + WAIT_READY;
    loop {
        let data_volume = match api.get_opt(name).await {
            Ok(Some(data_volume)) => data_volume,
            Ok(None) => {
                return Err(text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("rejecting Upload Request for PVC {name} that doesn't exist"),
                ));
            }
            Err(error) => return Err(text(StatusCode::SERVICE_UNAVAILABLE, error.to_string())),
        };
        let phase = data_volume
            .status
            .as_ref()
            .and_then(|status| status.phase.clone())
            .unwrap_or_default();
        if phase == "Succeeded" {
            return Err(text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("rejecting Upload Request for PVC {name} that already finished uploading"),
            ));
        }
        if data_volume
            .spec
            .source
            .as_ref()
            .and_then(|source| source.upload.as_ref())
            .is_none()
        {
            return Err(text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("rejecting Upload Request for PVC {name}: its DataVolume has no upload source"),
            ));
        }
        if phase == "UploadReady" {
            return Ok(data_volume);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("rejecting Upload Request for PVC {name}: not ready for upload (phase {phase:?})"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// CDI's proxy allows every origin (`cors.AllowAll()`), so browser consoles can upload.
async fn allow_all_origins(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let preflight = request.method() == Method::OPTIONS;
    let mut response = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    if preflight {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, PUT, OPTIONS"),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Authorization, Content-Type"),
        );
    }
    response
}

async fn upload(
    State(state): State<Arc<ProxyState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if method != Method::POST && method != Method::PUT {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let Some(token) = bearer(&headers) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let claims = match state.tokens.verify(token) {
        Ok(claims) => claims,
        Err(crate::UploadTokenError::WrongKind) => return StatusCode::BAD_REQUEST.into_response(),
        Err(error) => {
            tracing::debug!(%error, "upload token refused");
            return StatusCode::UNAUTHORIZED.into_response();
        }
    };
    let asynchronous = uri.path().ends_with("-async");
    let api = Api::<DataVolume>::namespaced(state.shared.client.clone(), &claims.namespace);
    let data_volume = match wait_ready(&api, &claims.name).await {
        Ok(data_volume) => data_volume,
        Err(response) => return response,
    };
    let uid = data_volume.uid().unwrap_or_default();
    if !state.shared.claim(&uid) {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "rejecting Upload Request for PVC {}: an upload is already in progress",
                claims.name
            ),
        );
    }
    let directory = state
        .shared
        .data_volume_dir(&claims.namespace, &data_volume.name_any(), &uid);
    let stored = store(&directory, body).await;
    let partial = match stored {
        Ok(partial) => partial,
        Err(message) => {
            state.shared.release(&uid);
            return text(StatusCode::INTERNAL_SERVER_ERROR, message);
        }
    };
    let shared = state.shared.clone();
    let finish = async move {
        let result = crate::datavolume::finish_upload(&shared, &data_volume, &partial).await;
        shared.release(&uid);
        result
    };
    if asynchronous {
        tokio::spawn(async move {
            if let Err(message) = finish.await {
                tracing::warn!(%message, "asynchronous upload refused");
            }
        });
        return StatusCode::OK.into_response();
    }
    match finish.await {
        Ok(_) => StatusCode::OK.into_response(),
        Err(message) => text(StatusCode::BAD_REQUEST, message),
    }
}

/// Streams the request body to `upload.partial` in `directory`.
async fn store(directory: &std::path::Path, body: Body) -> Result<std::path::PathBuf, String> {
    tokio::fs::create_dir_all(directory)
        .await
        .map_err(|error| format!("cannot create {}: {error}", directory.display()))?;
    let partial = directory.join("upload.partial");
    let mut file = tokio::fs::File::create(&partial)
        .await
        .map_err(|error| format!("cannot create {}: {error}", partial.display()))?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| format!("the upload was interrupted: {error}"))?;
        file.write_all(&chunk)
            .await
            .map_err(|error| format!("cannot write {}: {error}", partial.display()))?;
    }
    file.flush()
        .await
        .map_err(|error| format!("cannot write {}: {error}", partial.display()))?;
    Ok(partial)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn bearer_tokens_are_parsed_like_cdis_header_matcher() {
        assert_eq!(bearer(&headers("Bearer abc.def-_~+/")), Some("abc.def-_~+/"));
        assert_eq!(bearer(&headers("bearer   abc")), Some("abc"));
        assert_eq!(bearer(&headers("Basic abc")), None);
        assert_eq!(bearer(&headers("Bearer abc def")), None);
        assert_eq!(bearer(&headers("Bearer")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }
}
