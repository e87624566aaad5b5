//! The aggregated API server: routes, discovery, and the front-proxy/RBAC filter in front of them.
//!
//! Role: serves `subresources.kubevirt.io/v1` (virt-api's subresources) and mounts the simulated
//! controllers' `upload.cdi.kubevirt.io/v1beta1` router, behind the same filter virt-api has.
//!
//! Contract:
//! - discovery (`/`, `/apis`, `/apis/<group>`, `/apis/<group>/<version>`), `/openapi/v2`,
//!   `/openapi/v3`, `/version` and `/healthz` need no authentication, as in virt-api;
//! - every other request must come over a connection authenticated with the front-proxy client
//!   certificate (else 401) and name a user in the requestheader headers (else 401); then a
//!   SubjectAccessReview for the path's resource attributes must allow it, else 401 with the
//!   reviewer's reason (what virt-api answers; through kube-apiserver the request never gets here,
//!   since the apiserver's own authorization already answers 403).

use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde_json::{Value, json};

use crate::auth::{self, RequestHeaderConfig};
use crate::machines::Machines;
use crate::tls::Peer;
use crate::{consoles, lifecycle};

/// The subresource API group virt-api serves.
pub const SUBRESOURCE_GROUP: &str = "subresources.kubevirt.io";
/// Its version.
pub const SUBRESOURCE_VERSION: &str = "v1";

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    client: kube::Client,
    request_header: RequestHeaderConfig,
    machines: Arc<Machines>,
}

impl AppState {
    /// The state of a server acting with `client` (cluster-admin).
    pub fn new(
        client: kube::Client,
        request_header: RequestHeaderConfig,
        machines: Arc<Machines>,
    ) -> AppState {
        AppState {
            inner: Arc::new(Inner {
                client,
                request_header,
                machines,
            }),
        }
    }

    /// The simulator's own (admin) client.
    pub fn client(&self) -> &kube::Client {
        &self.inner.client
    }

    /// The QEMU machines behind the consoles.
    pub fn machines(&self) -> &Arc<Machines> {
        &self.inner.machines
    }
}

/// The router: the subresources, `extra` (the CDI upload token API), discovery, and the filter.
pub fn router(state: AppState, extra: Router) -> Router {
    let vms = format!(
        "/apis/{SUBRESOURCE_GROUP}/{SUBRESOURCE_VERSION}/namespaces/{{namespace}}/virtualmachines/{{name}}"
    );
    let vmis = format!(
        "/apis/{SUBRESOURCE_GROUP}/{SUBRESOURCE_VERSION}/namespaces/{{namespace}}/virtualmachineinstances/{{name}}"
    );
    let subresources = Router::new()
        .route(&format!("{vms}/start"), put(lifecycle::start))
        .route(&format!("{vms}/stop"), put(lifecycle::stop))
        .route(&format!("{vms}/restart"), put(lifecycle::restart))
        .route(&format!("{vms}/migrate"), put(lifecycle::migrate))
        .route(&format!("{vmis}/pause"), put(lifecycle::pause))
        .route(&format!("{vmis}/unpause"), put(lifecycle::unpause))
        .route(&format!("{vmis}/softreboot"), put(lifecycle::soft_reboot))
        .route(&format!("{vmis}/vnc"), get(consoles::vnc))
        .route(&format!("{vmis}/console"), get(consoles::console))
        .route(&format!("{vmis}/vnc/screenshot"), get(consoles::screenshot))
        .with_state(state.clone());
    Router::new()
        .route("/", get(root_paths))
        .route("/healthz", get(|| async { "ok" }))
        .route("/version", get(version))
        .route("/apis", get(group_list))
        .route(
            &format!("/apis/{SUBRESOURCE_GROUP}"),
            get(|| async { axum::Json(subresource_group()) }),
        )
        .route(
            &format!("/apis/{SUBRESOURCE_GROUP}/{SUBRESOURCE_VERSION}"),
            get(|| async { axum::Json(subresource_list()) }),
        )
        .route(
            &format!("/apis/{SUBRESOURCE_GROUP}/{SUBRESOURCE_VERSION}/version"),
            get(version),
        )
        .route(
            &format!("/apis/{SUBRESOURCE_GROUP}/{SUBRESOURCE_VERSION}/healthz"),
            get(|| async { "ok" }),
        )
        .route(
            "/apis/upload.cdi.kubevirt.io",
            get(|| async { axum::Json(upload_group()) }),
        )
        .route("/openapi/v2", get(openapi_v2))
        .route("/openapi/v3", get(|| async { axum::Json(json!({"paths": {}})) }))
        .merge(subresources)
        .merge(extra)
        .layer(axum::middleware::from_fn_with_state(state, authorize))
}

/// virt-api's authorization filter (see the module documentation).
async fn authorize(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    request: Request,
    next: Next,
) -> Response {
    let Some(attributes) = auth::attributes_for(request.uri().path(), request.method()) else {
        return next.run(request).await;
    };
    if !peer.front_proxy {
        tracing::info!(peer = %peer.address, common_name = ?peer.common_name, path = request.uri().path(), "refused: not the front proxy");
        return (StatusCode::UNAUTHORIZED, "request is not authenticated").into_response();
    }
    let Some(user) = state.inner.request_header.user(request.headers()) else {
        return (StatusCode::UNAUTHORIZED, "no user name in the request headers").into_response();
    };
    match auth::authorize(state.client(), &user, attributes).await {
        Ok((true, _)) => next.run(request).await,
        Ok((false, reason)) => (StatusCode::UNAUTHORIZED, reason).into_response(),
        Err(error) => {
            tracing::error!(%error, "internal error during auth request");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn root_paths() -> axum::Json<Value> {
    axum::Json(json!({"paths": [
        "/apis",
        "/openapi/v2",
        format!("/apis/{SUBRESOURCE_GROUP}"),
        format!("/apis/{SUBRESOURCE_GROUP}/{SUBRESOURCE_VERSION}"),
        "/apis/upload.cdi.kubevirt.io",
        "/apis/upload.cdi.kubevirt.io/v1beta1",
    ]}))
}

async fn version() -> axum::Json<Value> {
    axum::Json(json!({
        "gitVersion": "v1.9.0-paddock-simulator",
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "",
        "goVersion": "",
        "compiler": "rustc",
        "platform": "linux/amd64",
    }))
}

fn subresource_group() -> Value {
    let group_version = format!("{SUBRESOURCE_GROUP}/{SUBRESOURCE_VERSION}");
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": SUBRESOURCE_GROUP,
        "versions": [{"groupVersion": group_version, "version": SUBRESOURCE_VERSION}],
        "preferredVersion": {"groupVersion": group_version, "version": SUBRESOURCE_VERSION},
    })
}

fn upload_group() -> Value {
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": "upload.cdi.kubevirt.io",
        "versions": [{"groupVersion": "upload.cdi.kubevirt.io/v1beta1", "version": "v1beta1"}],
        "preferredVersion": {"groupVersion": "upload.cdi.kubevirt.io/v1beta1", "version": "v1beta1"},
    })
}

async fn group_list() -> axum::Json<Value> {
    axum::Json(
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [subresource_group(), upload_group()]}),
    )
}

/// The subresources this simulator serves, listed as virt-api lists them (name and namespaced only).
fn subresource_list() -> Value {
    let names = [
        "virtualmachineinstances/vnc",
        "virtualmachineinstances/vnc/screenshot",
        "virtualmachineinstances/console",
        "virtualmachineinstances/pause",
        "virtualmachineinstances/unpause",
        "virtualmachineinstances/softreboot",
        "virtualmachines/start",
        "virtualmachines/stop",
        "virtualmachines/restart",
        "virtualmachines/migrate",
    ];
    let resources: Vec<Value> = names
        .iter()
        .map(|name| json!({"name": name, "singularName": "", "namespaced": true, "kind": "", "verbs": []}))
        .collect();
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{SUBRESOURCE_GROUP}/{SUBRESOURCE_VERSION}"),
        "resources": resources,
    })
}

async fn openapi_v2() -> axum::Json<Value> {
    axum::Json(json!({
        "swagger": "2.0",
        "info": {"title": "KubeVirt API (paddock simulator)", "version": "v1.9.0-paddock-simulator"},
        "paths": {},
        "definitions": {},
    }))
}
