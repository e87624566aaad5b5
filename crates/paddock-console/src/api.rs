//! The HTTP API: routes, authentication, errors, console websockets and the event stream.
//!
//! Role: turn HTTP requests into [`Backend`] calls. Nothing here knows how VMs run.
//!
//! Contract:
//! - Routes are KubeVirt-flavoured and versioned under `/api/v1` (see the crate README and
//!   [`crate::openapi::document`], which describes exactly the routes of [`served_routes`]).
//! - Every route except `/healthz` and `/readyz` needs an authenticated caller (see
//!   [`crate::auth`]): the access token locally, a Kubernetes user in a cluster; the backend acts
//!   as that caller ([`Backend::acting_as`]). The web console's static files under `/ui/`
//!   ([`crate::ui`]) are public and not API routes.
//! - `/k8s/apis/subresources.kubevirt.io/{v1,v1alpha3}/namespaces/{ns}/virtualmachineinstances/{name}/vnc`
//!   is the VNC websocket under KubeVirt's own path, which the BafflesApplications the operator
//!   writes point at: the same session as `/api/v1/vms/{ns}/{name}/vnc`.
//! - Every error is JSON `{"code": <status>, "reason": "<kind>", "message": "<what, why, what to
//!   do>"}`: NotFound 404, AlreadyExists and InvalidTransition 409, InvalidSpec and Unsupported
//!   422, BadRequest 400, Unauthorized 401, Forbidden 403 (with `permission`: the verb, group,
//!   resource, subresource and namespace the user lacks), UnsupportedMediaType 415, Internal 500,
//!   NotImplemented 501, BadGateway 502 (a registry), Unavailable 503.
//! - Backups and restores are long-running: their POST answers 202 with an operation (and its
//!   `Location`), which `GET /api/v1/operations/{id}` shows until it has Succeeded or Failed.
//! - Console websockets (`console`, `vnc`) speak KubeVirt's protocol: subprotocol
//!   `plain.kubevirt.io`, binary frames carrying raw bytes both ways. Errors (no such VM, VM not
//!   running, no such console) are answered before the upgrade, as normal JSON errors.
//! - A refused request changes nothing (the backend guarantees it; this layer validates the
//!   request shape before calling the backend).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::{
    CloseFrame, Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
};
use axum::extract::{FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header, request::Parts};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post, put};
use futures_util::SinkExt;
use futures_util::stream::{BoxStream, StreamExt};
use paddock_api::app::VirtualMachineApp;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::Instrument;

use crate::auth::{AccessToken, Authentication, Caller, presented_token};
use crate::backend::{
    Backend, BackendError, BackupListRequest, BackupRequest, ConsoleChannel, ConsoleKind, EventView,
    OperationView, Permission, PowerAction, RestoreRequest, SnapshotRequest, VmRef,
};
use crate::metrics::{Metrics, OPENMETRICS_CONTENT_TYPE};

/// The websocket subprotocol of KubeVirt's console and VNC subresources.
pub const KUBEVIRT_SUBPROTOCOL: &str = "plain.kubevirt.io";
/// The subprotocol noVNC offers by default; accepted too, with the same meaning.
pub const BINARY_SUBPROTOCOL: &str = "binary";
/// The API's version prefix.
pub const API_PREFIX: &str = "/api/v1";

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The HTTP status code.
    pub code: u16,
    /// The kind of failure: NotFound, AlreadyExists, InvalidTransition, InvalidSpec,
    /// Unsupported, BadRequest, Unauthorized, UnsupportedMediaType, MethodNotAllowed, Internal.
    pub reason: String,
    /// What failed, why, and what to do.
    pub message: String,
}
// A 403 body also has `permission` (a [`Permission`]: the verb, group, resource, subresource and
// namespace the signed-in user lacks); it is added beside these fields when the response is made.

/// An error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    reason: &'static str,
    message: String,
    permission: Option<Box<Permission>>,
}

impl ApiError {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            reason,
            message: message.into(),
            permission: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "InvalidSpec", message)
    }
}

impl From<BackendError> for ApiError {
    fn from(error: BackendError) -> ApiError {
        ApiError {
            status: StatusCode::from_u16(error.kind.status_code())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            reason: error.kind.as_str(),
            message: error.message,
            permission: error.permission,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), message = %self.message, "request failed");
        } else {
            tracing::info!(status = self.status.as_u16(), message = %self.message, "request refused");
        }
        let body = ErrorBody {
            code: self.status.as_u16(),
            reason: self.reason.to_string(),
            message: self.message,
        };
        let mut body = serde_json::to_value(body).unwrap_or(serde_json::Value::Null);
        if let (Some(permission), Some(object)) = (self.permission, body.as_object_mut()) {
            object.insert(
                "permission".to_string(),
                serde_json::to_value(*permission).unwrap_or(serde_json::Value::Null),
            );
        }
        (self.status, Json(body)).into_response()
    }
}

/// The shared state of every handler.
#[derive(Clone)]
struct AppState {
    backend: Arc<dyn Backend>,
    authentication: Arc<Authentication>,
    metrics: Arc<Metrics>,
    closing: watch::Receiver<bool>,
}

/// The API over one backend: builds the router and closes websocket sessions at shutdown.
pub struct Api {
    state: AppState,
    closing: watch::Sender<bool>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Api")
            .field("backend", &self.state.backend.kind())
            .finish_non_exhaustive()
    }
}

impl Api {
    /// An API over `backend`, accepting `token`.
    pub fn new(backend: Arc<dyn Backend>, token: AccessToken) -> Api {
        Api::with_authentication(backend, Authentication::Token(token))
    }

    /// An API over `backend`, authenticating callers with `authentication`.
    pub fn with_authentication(backend: Arc<dyn Backend>, authentication: Authentication) -> Api {
        let (closing, closing_receiver) = watch::channel(false);
        Api {
            state: AppState {
                backend,
                authentication: Arc::new(authentication),
                metrics: Arc::new(Metrics::new()),
                closing: closing_receiver,
            },
            closing,
        }
    }

    /// The router serving every route of [`served_routes`].
    pub fn router(&self) -> Router {
        let state = self.state.clone();
        let mut public = Router::new();
        let mut protected = Router::new();
        for route in route_table() {
            if route.public {
                public = public.route(route.path, route.handler);
            } else {
                protected = protected.route(route.path, route.handler);
            }
        }
        let protected = protected.route_layer(from_fn_with_state(state.clone(), require_token));
        Router::new()
            .merge(public)
            .merge(protected)
            .merge(crate::ui::router())
            .route_layer(from_fn_with_state(state.clone(), observe))
            .fallback(no_route)
            .method_not_allowed_fallback(method_not_allowed)
            .with_state(state)
    }

    /// Ends every console session (with a websocket close frame saying why) and every event
    /// stream; for shutdown.
    pub fn close_sessions(&self) {
        self.closing.send_replace(true);
    }
}

/// One route the API serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedRoute {
    /// The HTTP method.
    pub method: Method,
    /// The path template, in OpenAPI's `{parameter}` syntax.
    pub path: &'static str,
    /// Whether it is served without the access token.
    pub public: bool,
}

/// Every route [`Api::router`] serves.
pub fn served_routes() -> Vec<ServedRoute> {
    route_table()
        .into_iter()
        .map(|route| ServedRoute {
            method: route.method,
            path: route.path,
            public: route.public,
        })
        .collect()
}

struct RouteEntry {
    method: Method,
    path: &'static str,
    public: bool,
    handler: MethodRouter<AppState>,
}

/// The single list the router is built from, so [`served_routes`] cannot drift from it.
fn route_table() -> Vec<RouteEntry> {
    fn entry(method: Method, path: &'static str, handler: MethodRouter<AppState>) -> RouteEntry {
        RouteEntry {
            method,
            path,
            public: false,
            handler,
        }
    }
    fn public(method: Method, path: &'static str, handler: MethodRouter<AppState>) -> RouteEntry {
        RouteEntry {
            method,
            path,
            public: true,
            handler,
        }
    }
    vec![
        public(Method::GET, "/healthz", get(healthz)),
        public(Method::GET, "/readyz", get(readyz)),
        entry(Method::GET, "/", get(index)),
        entry(Method::GET, "/openapi.json", get(openapi)),
        entry(Method::GET, "/metrics", get(metrics)),
        entry(Method::GET, "/api/v1/vms", get(list_vms)),
        entry(Method::POST, "/api/v1/vms", post(create_vm)),
        entry(Method::GET, "/api/v1/vms/{namespace}/{name}", get(get_vm)),
        entry(
            Method::DELETE,
            "/api/v1/vms/{namespace}/{name}",
            delete(delete_vm),
        ),
        entry(
            Method::PUT,
            "/api/v1/vms/{namespace}/{name}/start",
            power_route(|_| PowerAction::Start),
        ),
        entry(
            Method::PUT,
            "/api/v1/vms/{namespace}/{name}/stop",
            power_route(|grace_period| PowerAction::Stop { grace_period }),
        ),
        entry(
            Method::PUT,
            "/api/v1/vms/{namespace}/{name}/forcestop",
            power_route(|_| PowerAction::ForceStop),
        ),
        entry(
            Method::PUT,
            "/api/v1/vms/{namespace}/{name}/restart",
            power_route(|grace_period| PowerAction::Restart { grace_period }),
        ),
        entry(
            Method::PUT,
            "/api/v1/vms/{namespace}/{name}/pause",
            power_route(|_| PowerAction::Pause),
        ),
        entry(
            Method::PUT,
            "/api/v1/vms/{namespace}/{name}/unpause",
            power_route(|_| PowerAction::Unpause),
        ),
        entry(
            Method::GET,
            "/api/v1/vms/{namespace}/{name}/snapshots",
            get(list_snapshots),
        ),
        entry(
            Method::POST,
            "/api/v1/vms/{namespace}/{name}/snapshots",
            post(create_snapshot),
        ),
        entry(
            Method::DELETE,
            "/api/v1/vms/{namespace}/{name}/snapshots/{snapshot}",
            delete(delete_snapshot),
        ),
        entry(
            Method::PUT,
            "/api/v1/vms/{namespace}/{name}/snapshots/{snapshot}/restore",
            put(restore_snapshot),
        ),
        entry(
            Method::PUT,
            "/api/v1/vms/{namespace}/{name}/snapshot-schedule",
            put(set_snapshot_schedule),
        ),
        entry(
            Method::DELETE,
            "/api/v1/vms/{namespace}/{name}/snapshot-schedule",
            delete(clear_snapshot_schedule),
        ),
        entry(
            Method::GET,
            "/api/v1/vms/{namespace}/{name}/screenshot",
            get(screenshot),
        ),
        entry(
            Method::GET,
            "/api/v1/vms/{namespace}/{name}/console",
            get(serial_console),
        ),
        entry(
            Method::GET,
            "/api/v1/vms/{namespace}/{name}/console-access",
            get(console_access),
        ),
        entry(
            Method::GET,
            "/api/v1/vms/{namespace}/{name}/vnc",
            get(vnc_console),
        ),
        entry(
            Method::PUT,
            "/api/v1/vms/{namespace}/{name}/migrate",
            put(migrate_vm),
        ),
        entry(
            Method::POST,
            "/api/v1/vms/{namespace}/{name}/clone",
            post(clone_vm),
        ),
        entry(
            Method::GET,
            "/api/v1/vms/{namespace}/{name}/backups",
            get(list_vm_backups),
        ),
        entry(
            Method::POST,
            "/api/v1/vms/{namespace}/{name}/backups",
            post(create_backup),
        ),
        entry(Method::GET, "/api/v1/backups", get(list_backups)),
        entry(Method::POST, "/api/v1/backups/restore", post(restore_backup)),
        entry(Method::GET, "/api/v1/images", get(list_images)),
        entry(Method::GET, "/api/v1/operations", get(list_operations)),
        entry(Method::GET, "/api/v1/operations/{id}", get(get_operation)),
        entry(
            Method::POST,
            "/api/v1/namespaces/{namespace}/uploads",
            post(upload_disk),
        ),
        entry(
            Method::GET,
            "/api/v1/namespaces/{namespace}/uploads/{name}",
            get(upload_status),
        ),
        entry(Method::GET, "/api/v1/events", get(events)),
        entry(Method::GET, "/api/v1/session", get(session)),
        entry(Method::POST, "/api/v1/session", post(create_session)),
        entry(
            Method::GET,
            "/k8s/apis/subresources.kubevirt.io/v1/namespaces/{namespace}/virtualmachineinstances/{name}/vnc",
            get(vnc_console),
        ),
        entry(
            Method::GET,
            "/k8s/apis/subresources.kubevirt.io/v1alpha3/namespaces/{namespace}/virtualmachineinstances/{name}/vnc",
            get(vnc_console),
        ),
    ]
}

/// Path parameters of VM routes.
#[derive(Debug, Deserialize)]
struct VmPath {
    namespace: String,
    name: String,
}

impl From<VmPath> for VmRef {
    fn from(path: VmPath) -> VmRef {
        VmRef {
            namespace: path.namespace,
            name: path.name,
        }
    }
}

/// Path parameters of snapshot routes.
#[derive(Debug, Deserialize)]
struct SnapshotPath {
    namespace: String,
    name: String,
    snapshot: String,
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    namespace: Option<String>,
}

#[derive(Debug, Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

/// Path parameters of namespaced collection routes.
#[derive(Debug, Deserialize)]
struct NamespacePath {
    namespace: String,
}

/// Query of `POST …/uploads`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct UploadQuery {
    name: String,
    size: Option<String>,
    storage_class: Option<String>,
    #[serde(default)]
    dry_run: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CloneRequest {
    name: String,
}

/// Where to list backups (`GET /api/v1/backups` and a VM's `backups`).
#[derive(Debug, Deserialize)]
struct BackupListQuery {
    repository: Option<String>,
    #[serde(default)]
    insecure: bool,
    namespace: Option<String>,
    vm: Option<String>,
}

impl BackupListQuery {
    fn repository(&self) -> Result<String, ApiError> {
        match self.repository.as_deref().map(str::trim) {
            Some(repository) if !repository.is_empty() => Ok(repository.to_string()),
            _ => Err(ApiError::bad_request(
                "the query needs repository=<registry/repository>, e.g. ?repository=127.0.0.1:5000/backups/web&insecure=true",
            )),
        }
    }
}

#[derive(Debug, Deserialize)]
struct OperationPath {
    id: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PowerQuery {
    grace_period_seconds: Option<u64>,
}

/// `Path` with JSON errors.
struct ApiPath<T>(T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| ApiPath(value))
            .map_err(|rejection| ApiError::bad_request(rejection.body_text()))
    }
}

/// `Query` with JSON errors.
struct ApiQuery<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| ApiQuery(value))
            .map_err(|rejection| {
                ApiError::bad_request(format!("{}; see /openapi.json", rejection.body_text()))
            })
    }
}

/// The backend acting as the request's caller (set by the authentication middleware).
struct Acting(Arc<dyn Backend>);

impl FromRequestParts<AppState> for Acting {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match parts.extensions.get::<Caller>() {
            Some(Caller::TokenHolder) => Ok(Acting(Arc::clone(&state.backend))),
            Some(Caller::User(user)) => state.backend.acting_as(user).map(Acting).ok_or_else(|| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Internal",
                    format!(
                        "the {} backend cannot act for a signed-in user; this is a bug in paddock",
                        state.backend.kind()
                    ),
                )
            }),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "the request was not authenticated; this is a bug in paddock",
            )),
        }
    }
}

async fn require_token(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    match state
        .authentication
        .authenticate(request.headers(), request.uri().query())
        .await
    {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        // A browser opening the bare address gets the web console's sign-in page, not JSON.
        Err(_) if request.uri().path() == "/" && accepts_html(request.headers()) => {
            axum::response::Redirect::to(crate::ui::UI_PATH).into_response()
        }
        Err(refusal) => unauthorized(refusal.message),
    }
}

fn accepts_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"))
}

/// The 401 response for a request that was not authenticated.
fn unauthorized(message: String) -> Response {
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized", message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"paddock\""),
    );
    response
}

/// One tracing span and one metrics sample per request. The span records the route template,
/// never the query (which may hold the token).
async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |path| path.as_str().to_string());
    let method = request.method().clone();
    let span = tracing::info_span!("request", method = %method, route = %route, path = %request.uri().path());
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    span.in_scope(|| {
        tracing::debug!(status, elapsed_ms = started.elapsed().as_millis(), "answered");
    });
    state.metrics.request(method.as_str(), &route, status);
    response
}

/// Unknown routes need the token too, so the API cannot be mapped without it.
async fn no_route(
    State(state): State<AppState>,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    let response = match state.authentication.authenticate(&headers, uri.query()).await {
        Err(refusal) => unauthorized(refusal.message),
        Ok(_) => ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!(
                "no such route: {method} {}; the API is described at /openapi.json",
                uri.path()
            ),
        )
        .into_response(),
    };
    state
        .metrics
        .request(method.as_str(), "unmatched", response.status().as_u16());
    response
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        format!(
            "{} does not accept {method}; /openapi.json lists the methods of every route",
            uri.path()
        ),
    )
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> Response {
    let checks = state.backend.readiness().await;
    let ready = !*state.closing.borrow() && checks.iter().all(|check| check.ok);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not ready" },
        "backend": state.backend.kind(),
        "checks": checks,
    });
    (status, Json(body)).into_response()
}

/// The links of the API; a browser (asking for HTML, e.g. from the URL `paddock serve` printed)
/// is sent on to the web console, signed in with the token it came with.
async fn index(State(state): State<AppState>, headers: HeaderMap, uri: axum::http::Uri) -> Response {
    if accepts_html(&headers) {
        // The token was checked already; it moves from the query into the fragment, which the
        // browser keeps to itself.
        let location = match presented_token(&HeaderMap::new(), uri.query()) {
            Some(token)
                if token
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte)) =>
            {
                format!("{}#token={token}", crate::ui::UI_PATH)
            }
            _ => crate::ui::UI_PATH.to_string(),
        };
        return axum::response::Redirect::to(&location).into_response();
    }
    Json(serde_json::json!({
        "name": "paddock",
        "version": env!("CARGO_PKG_VERSION"),
        "backend": state.backend.kind(),
        "api": API_PREFIX,
        "openapi": "/openapi.json",
        "events": "/api/v1/events",
        "metrics": "/metrics",
        "ui": crate::ui::UI_PATH,
    }))
    .into_response()
}

async fn openapi() -> Json<serde_json::Value> {
    Json(crate::openapi::document())
}

async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let text = state.metrics.encode().map_err(|error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal",
            format!("cannot encode the metrics: {error}"),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text).into_response())
}

async fn list_vms(
    Acting(backend): Acting,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let items = backend.list(query.namespace).await?;
    Ok(Json(serde_json::json!({ "items": items })))
}

async fn create_vm(Acting(backend): Acting, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let app = parse_manifest(&headers, &body)?;
    let view = backend.create(app).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn get_vm(Acting(backend): Acting, ApiPath(vm): ApiPath<VmPath>) -> Result<Response, ApiError> {
    Ok(Json(backend.get(vm.into()).await?).into_response())
}

async fn delete_vm(
    Acting(backend): Acting,
    ApiPath(vm): ApiPath<VmPath>,
    ApiQuery(query): ApiQuery<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    backend.delete(vm.into(), query.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn power_route(action: fn(Option<Duration>) -> PowerAction) -> MethodRouter<AppState> {
    put(
        move |Acting(backend): Acting,
              ApiPath(vm): ApiPath<VmPath>,
              ApiQuery(query): ApiQuery<PowerQuery>| async move {
            let action = action(query.grace_period_seconds.map(Duration::from_secs));
            let view = backend.power(vm.into(), action).await?;
            Ok::<_, ApiError>(Json(view))
        },
    )
}

async fn list_snapshots(
    Acting(backend): Acting,
    ApiPath(vm): ApiPath<VmPath>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let items = backend.snapshot_list(vm.into()).await?;
    Ok(Json(serde_json::json!({ "items": items })))
}

async fn create_snapshot(
    Acting(backend): Acting,
    ApiPath(vm): ApiPath<VmPath>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: SnapshotRequest = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(format!(
            "the body is not a snapshot request ({error}); send JSON like {{\"name\": \"before-upgrade\", \"memory\": true}}"
        ))
    })?;
    let snapshot = backend.snapshot_create(vm.into(), request).await?;
    Ok((StatusCode::CREATED, Json(snapshot)).into_response())
}

async fn restore_snapshot(
    Acting(backend): Acting,
    ApiPath(path): ApiPath<SnapshotPath>,
) -> Result<Response, ApiError> {
    let vm = VmRef {
        namespace: path.namespace,
        name: path.name,
    };
    Ok(Json(backend.snapshot_restore(vm, path.snapshot).await?).into_response())
}

async fn delete_snapshot(
    Acting(backend): Acting,
    ApiPath(path): ApiPath<SnapshotPath>,
) -> Result<StatusCode, ApiError> {
    let vm = VmRef {
        namespace: path.namespace,
        name: path.name,
    };
    backend.snapshot_delete(vm, path.snapshot).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn screenshot(Acting(backend): Acting, ApiPath(vm): ApiPath<VmPath>) -> Result<Response, ApiError> {
    let png = backend.screenshot(vm.into()).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        png,
    )
        .into_response())
}

async fn serial_console(
    State(state): State<AppState>,
    Acting(backend): Acting,
    ApiPath(vm): ApiPath<VmPath>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    open_console(state, backend, vm.into(), ConsoleKind::Serial, upgrade).await
}

async fn vnc_console(
    State(state): State<AppState>,
    Acting(backend): Acting,
    ApiPath(vm): ApiPath<VmPath>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    open_console(state, backend, vm.into(), ConsoleKind::Vnc, upgrade).await
}

/// Which consoles the caller may open (asked before a websocket, whose refusal a browser cannot
/// read).
async fn console_access(Acting(backend): Acting, ApiPath(vm): ApiPath<VmPath>) -> Result<Response, ApiError> {
    Ok(Json(backend.console_access(vm.into()).await?).into_response())
}

async fn migrate_vm(Acting(backend): Acting, ApiPath(vm): ApiPath<VmPath>) -> Result<Response, ApiError> {
    Ok(Json(backend.migrate(vm.into()).await?).into_response())
}

/// The body of `PUT …/snapshot-schedule`.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ScheduleRequest {
    schedule: String,
    #[serde(default)]
    keep: Option<u32>,
}

/// Checks a schedule as the VirtualMachineApp's CRD does (five cron fields or an `@` macro, keep
/// 1 to 1000), so the user gets a 422 that says what to write rather than the API server's rule.
fn snapshot_policy(request: ScheduleRequest) -> Result<paddock_api::app::SnapshotPolicy, ApiError> {
    let schedule = request.schedule.split_whitespace().collect::<Vec<_>>().join(" ");
    let fields = schedule.split(' ').filter(|field| !field.is_empty()).count();
    let macro_form = schedule.starts_with('@') && fields == 1;
    if schedule.len() > 128 || !(fields == 5 || macro_form) {
        return Err(BackendError::new(
            crate::backend::ErrorKind::InvalidSpec,
            format!(
                "invalid snapshot schedule {:?}: write a five-field cron expression in UTC such as '0 3 * * *' (minute hour day-of-month month day-of-week) or a macro such as @daily",
                request.schedule
            ),
        )
        .into());
    }
    let keep = request.keep.unwrap_or(7);
    if !(1..=1000).contains(&keep) {
        return Err(BackendError::new(
            crate::backend::ErrorKind::InvalidSpec,
            format!("invalid snapshot schedule: keep is {keep}; keep between 1 and 1000 snapshots"),
        )
        .into());
    }
    Ok(paddock_api::app::SnapshotPolicy { schedule, keep })
}

async fn set_snapshot_schedule(
    Acting(backend): Acting,
    ApiPath(vm): ApiPath<VmPath>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: ScheduleRequest = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(format!(
            "the body is not a snapshot schedule ({error}); send JSON like {{\"schedule\": \"0 3 * * *\", \"keep\": 7}}"
        ))
    })?;
    let policy = snapshot_policy(request)?;
    Ok(Json(backend.set_snapshot_schedule(vm.into(), Some(policy)).await?).into_response())
}

async fn clear_snapshot_schedule(
    Acting(backend): Acting,
    ApiPath(vm): ApiPath<VmPath>,
) -> Result<Response, ApiError> {
    Ok(Json(backend.set_snapshot_schedule(vm.into(), None).await?).into_response())
}

async fn clone_vm(
    Acting(backend): Acting,
    ApiPath(vm): ApiPath<VmPath>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: CloneRequest = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(format!(
            "the body is not a clone request ({error}); send JSON like {{\"name\": \"debian-copy\"}}"
        ))
    })?;
    let clone = backend.clone_vm(vm.into(), request.name).await?;
    Ok((StatusCode::CREATED, Json(backend.get(clone).await?)).into_response())
}

async fn create_backup(
    Acting(backend): Acting,
    ApiPath(vm): ApiPath<VmPath>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: BackupRequest = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(format!(
            "the body is not a backup request ({error}); send JSON like {{\"repository\": \"127.0.0.1:5000/backups/web\", \"insecure\": true}}"
        ))
    })?;
    if request.repository.trim().is_empty() {
        return Err(ApiError::bad_request(
            "the backup request has an empty repository; give registry/repository, e.g. 127.0.0.1:5000/backups/web",
        ));
    }
    let operation = backend.backup_create(vm.into(), request).await?;
    Ok(operation_accepted(&operation))
}

/// 202 with the operation and where to poll it.
fn operation_accepted(operation: &OperationView) -> Response {
    let mut response = (StatusCode::ACCEPTED, Json(operation)).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("{API_PREFIX}/operations/{}", operation.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

async fn list_backups(
    Acting(backend): Acting,
    ApiQuery(query): ApiQuery<BackupListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request = BackupListRequest {
        repository: query.repository()?,
        insecure: query.insecure,
        namespace: query.namespace,
        vm: query.vm,
    };
    let items = backend.backup_list(request).await?;
    Ok(Json(serde_json::json!({ "items": items })))
}

async fn list_vm_backups(
    Acting(backend): Acting,
    ApiPath(vm): ApiPath<VmPath>,
    ApiQuery(query): ApiQuery<BackupListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request = BackupListRequest {
        repository: query.repository()?,
        insecure: query.insecure,
        namespace: Some(vm.namespace),
        vm: Some(vm.name),
    };
    let items = backend.backup_list(request).await?;
    Ok(Json(serde_json::json!({ "items": items })))
}

async fn restore_backup(Acting(backend): Acting, body: Bytes) -> Result<Response, ApiError> {
    let request: RestoreRequest = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(format!(
            "the body is not a restore request ({error}); send JSON like {{\"reference\": \"127.0.0.1:5000/backups/web@sha256:…\", \"insecure\": true, \"name\": \"web-copy\"}}"
        ))
    })?;
    let operation = backend.backup_restore(request).await?;
    Ok(operation_accepted(&operation))
}

/// The image library: the base images on the machine (local mode).
async fn list_images(Acting(backend): Acting) -> Result<Json<serde_json::Value>, ApiError> {
    let items = backend.images().await?;
    Ok(Json(serde_json::json!({ "items": items })))
}

async fn list_operations(Acting(backend): Acting) -> Result<Json<serde_json::Value>, ApiError> {
    let items = backend.operation_list().await?;
    Ok(Json(serde_json::json!({ "items": items })))
}

async fn get_operation(
    Acting(backend): Acting,
    ApiPath(path): ApiPath<OperationPath>,
) -> Result<Json<OperationView>, ApiError> {
    Ok(Json(backend.operation(path.id).await?))
}

/// Streams the body (a disk) into a new DataVolume; answers once the upload proxy took it all.
async fn upload_disk(
    Acting(backend): Acting,
    ApiPath(path): ApiPath<NamespacePath>,
    ApiQuery(query): ApiQuery<UploadQuery>,
    request: Request,
) -> Result<Response, ApiError> {
    let length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
        .or(query.dry_run.then_some(0))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::LENGTH_REQUIRED,
                "LengthRequired",
                "an upload needs its Content-Length (the disk's size in bytes): send the disk file as the body, not chunked",
            )
        })?;
    let body: paddock_cluster::upload::DiskStream = Box::pin(
        request
            .into_body()
            .into_data_stream()
            .map(|chunk| chunk.map_err(std::io::Error::other)),
    );
    let upload = crate::backend::UploadRequest {
        namespace: path.namespace,
        name: query.name,
        size: query.size.filter(|size| !size.is_empty()),
        storage_class: query.storage_class.filter(|class| !class.is_empty()),
        length,
        dry_run: query.dry_run,
    };
    let view = backend.upload_disk(upload, body).await?;
    let status = if query.dry_run {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(view)).into_response())
}

/// An uploaded DataVolume's phase and progress.
async fn upload_status(
    Acting(backend): Acting,
    ApiPath(path): ApiPath<VmPath>,
) -> Result<Response, ApiError> {
    Ok(Json(backend.upload_status(path.namespace, path.name).await?).into_response())
}

/// Who the caller is, as the server sees them: what a sign-in page checks a token with.
async fn session(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Json<serde_json::Value> {
    let user = match caller {
        Caller::TokenHolder => serde_json::json!({"username": crate::auth::TOKEN_HOLDER, "groups": []}),
        Caller::User(user) => serde_json::to_value(&*user).unwrap_or(serde_json::Value::Null),
    };
    Json(serde_json::json!({"backend": state.backend.kind(), "user": user}))
}

/// Signs in: exchanges the credential the request was authenticated with for a console session
/// token, so a browser need not keep a Kubernetes token.
async fn create_session(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Result<Response, ApiError> {
    let session = state
        .authentication
        .issue_session(&caller)
        .map_err(|refusal| ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized", refusal.message))?;
    Ok((StatusCode::CREATED, Json(session)).into_response())
}

async fn open_console(
    state: AppState,
    backend: Arc<dyn Backend>,
    vm: VmRef,
    kind: ConsoleKind,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let upgrade = upgrade.map_err(|rejection| {
        ApiError::bad_request(format!(
            "{}: this route is a websocket; connect with a websocket client using the subprotocol {KUBEVIRT_SUBPROTOCOL}",
            rejection.body_text()
        ))
    })?;
    // Open the console first, so a VM that is not running gets a clear HTTP error instead of a
    // websocket that closes at once.
    let channel = backend.open_console(vm.clone(), kind).await?;
    Ok(upgrade
        .protocols([KUBEVIRT_SUBPROTOCOL, BINARY_SUBPROTOCOL])
        .on_upgrade(move |socket| {
            let span = tracing::info_span!("console", console = kind.as_str(), vm = %vm);
            console_session(state, socket, channel, kind).instrument(span)
        }))
}

async fn console_session(
    state: AppState,
    mut socket: WebSocket,
    mut channel: ConsoleChannel,
    kind: ConsoleKind,
) {
    state.metrics.session_opened(kind.as_str());
    tracing::info!("console session opened");
    let mut closing = state.closing.clone();
    let close = |reason: &'static str, code: u16| {
        Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }))
    };
    let ending = loop {
        if *closing.borrow_and_update() {
            let _ = socket.send(close("paddock serve is shutting down", 1001)).await;
            break "server shutdown";
        }
        tokio::select! {
            from_vm = channel.from_vm.recv() => match from_vm {
                Some(bytes) => {
                    // Whatever else the VM already sent goes out with it, in one flush.
                    let mut batch = socket.feed(Message::Binary(bytes)).await;
                    while batch.is_ok() {
                        match channel.from_vm.try_recv() {
                            Ok(more) => batch = socket.feed(Message::Binary(more)).await,
                            Err(_) => break,
                        }
                    }
                    if batch.is_err() || socket.flush().await.is_err() {
                        // The client cannot read any more, but frames it sent before leaving
                        // (a key press, then disconnect) may still be buffered: forward them.
                        forward_remaining_input(&mut socket, &channel).await;
                        break "client gone";
                    }
                }
                None => {
                    let _ = socket.send(close("the console closed: the VM stopped or restarted", 1000)).await;
                    break "console closed";
                }
            },
            message = socket.recv() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    if channel.to_vm.send(bytes).await.is_err() {
                        break "console closed";
                    }
                }
                // KubeVirt's protocol is binary; text is taken as its UTF-8 bytes for tools
                // that cannot send binary frames.
                Some(Ok(Message::Text(text))) => {
                    if channel.to_vm.send(Bytes::copy_from_slice(text.as_str().as_bytes())).await.is_err() {
                        break "console closed";
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | None => break "client closed",
                Some(Err(error)) => {
                    tracing::debug!(%error, "websocket failed");
                    break "client error";
                }
            },
            _ = closing.changed() => {}
        }
    };
    state.metrics.session_closed(kind.as_str());
    tracing::info!(ending, "console session closed");
}

/// How long the frames a departed client sent last may take to arrive.
const REMAINING_INPUT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Forwards the input frames still readable from a client whose side can no longer be written.
async fn forward_remaining_input(socket: &mut WebSocket, channel: &ConsoleChannel) {
    let forward = async {
        while let Some(Ok(message)) = socket.recv().await {
            let bytes = match message {
                Message::Binary(bytes) => bytes,
                Message::Text(text) => Bytes::copy_from_slice(text.as_str().as_bytes()),
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            if channel.to_vm.send(bytes).await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(REMAINING_INPUT_GRACE, forward).await;
}

async fn events(State(state): State<AppState>, Acting(backend): Acting) -> Response {
    let mut closing = state.closing.clone();
    let stop = async move {
        let _ = closing.wait_for(|closing| *closing).await;
    };
    let stream: BoxStream<'static, Result<Event, Infallible>> = backend
        .events()
        .map(|event| Ok(sse_event(&event)))
        .take_until(stop)
        .boxed();
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

fn sse_event(event: &EventView) -> Event {
    let name = match event {
        EventView::Changed { .. } => "Changed",
        EventView::SnapshotsChanged { .. } => "SnapshotsChanged",
        EventView::Deleted { .. } => "Deleted",
        EventView::Lagged { .. } => "Lagged",
    };
    match serde_json::to_string(event) {
        Ok(json) => Event::default().event(name).data(json),
        Err(error) => Event::default().comment(format!("an event could not be encoded: {error}")),
    }
}

/// The manifest in a create request: YAML or JSON by `Content-Type` (YAML when absent, which
/// also reads JSON). Malformed text is 400; a well-formed document that is not a valid
/// VirtualMachineApp is 422.
fn parse_manifest(headers: &HeaderMap, body: &[u8]) -> Result<VirtualMachineApp, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| {
            value
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        });
    let json = match content_type.as_deref() {
        None
        | Some("application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml" | "text/plain") => {
            false
        }
        Some("application/json") => true,
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!(
                    "cannot read a {other} body; send the VirtualMachineApp as application/yaml or application/json"
                ),
            ));
        }
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "the request body is empty; send a VirtualMachineApp manifest as YAML or JSON",
        ));
    }
    let value: serde_json::Value = if json {
        serde_json::from_slice(body)
            .map_err(|error| ApiError::bad_request(format!("the body is not valid JSON: {error}")))?
    } else {
        serde_yaml::from_slice(body)
            .map_err(|error| ApiError::bad_request(format!("the body is not valid YAML: {error}")))?
    };
    let Some(object) = value.as_object() else {
        return Err(ApiError::bad_request(
            "the body must be one VirtualMachineApp object (apiVersion: paddock.dev/v1alpha1, kind: VirtualMachineApp)",
        ));
    };
    let api_version = object.get("apiVersion").and_then(|value| value.as_str());
    let kind = object.get("kind").and_then(|value| value.as_str());
    let expected_version = format!("{}/{}", paddock_api::app::GROUP, paddock_api::app::VERSION);
    if api_version != Some(expected_version.as_str()) || kind != Some("VirtualMachineApp") {
        return Err(ApiError::invalid(format!(
            "expected apiVersion: {expected_version} and kind: VirtualMachineApp, got apiVersion: {} and kind: {}",
            api_version.unwrap_or("<missing>"),
            kind.unwrap_or("<missing>")
        )));
    }
    serde_json::from_value(value).map_err(|error| {
        ApiError::invalid(format!(
            "the VirtualMachineApp does not match its schema: {error}; `paddock validate -f FILE` explains every field"
        ))
    })
}
