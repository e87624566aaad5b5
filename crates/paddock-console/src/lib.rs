//! paddock's console server: the REST API, the serial and VNC websocket gateway and the event
//! stream, over one [`Backend`] trait with two implementations (the local QEMU runtime now,
//! KubeVirt later), and the web console (the UI built from `web/`, embedded).
//!
//! Role: what `paddock serve` runs and what the CLI's `vm` and `snapshot` verbs talk to.
//!
//! Contract:
//! - [`backend::Backend`] is the only thing the API needs from a platform; [`local::LocalBackend`]
//!   implements it over `paddock_local::Runtime`.
//! - [`api::Api`] builds the axum router: KubeVirt-flavoured routes under `/api/v1`, bearer-token
//!   authentication ([`auth`]), JSON errors, websockets with the `plain.kubevirt.io` protocol,
//!   server-sent events, `/healthz`, `/readyz`, `/metrics` and `/openapi.json` ([`openapi`]).
//! - [`ui`] serves the embedded web console under `/ui/` (public static files; the API calls it
//!   makes need the token like any other client's).
//! - [`serve::serve`] runs it on a loopback address with a fresh token, published in
//!   `<state>/serve.json` for the CLI.

pub mod api;
pub mod auth;
pub mod backend;
pub mod local;
pub mod metrics;
pub mod openapi;
pub mod serve;
pub mod time;
pub mod ui;

pub use api::{Api, ErrorBody, KUBEVIRT_SUBPROTOCOL, ServedRoute, served_routes};
pub use auth::AccessToken;
pub use backend::{
    Backend, BackendError, BackendResult, ConsoleChannel, ConsoleKind, ConsoleView, ErrorKind, EventView,
    HealthCheck, LastExitView, PowerAction, SnapshotRequest, SnapshotView, VmRef, VmStatusView, VmView,
};
pub use local::LocalBackend;
pub use serve::{ServeError, ServeInfo, ServeOptions, read_serve_file, serve, serve_file_path};
