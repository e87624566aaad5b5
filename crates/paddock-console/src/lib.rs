//! paddock's console server: the REST API, the serial and VNC websocket gateway and the event
//! stream, over one [`Backend`] trait with two implementations (the local QEMU runtime, and
//! KubeVirt in a cluster acting as the signed-in user), and the web console (the UI built from
//! `web/`, embedded).
//!
//! Role: what `paddock serve` runs and what the CLI's `vm` and `snapshot` verbs talk to.
//!
//! Contract:
//! - [`backend::Backend`] is the only thing the API needs from a platform; [`local::LocalBackend`]
//!   implements it over `paddock_local::Runtime`; [`kubernetes::KubernetesBackend`] over a
//!   cluster's KubeVirt, with reads from reflectors and actions as the user (impersonation).
//! - [`api::Api`] builds the axum router: KubeVirt-flavoured routes under `/api/v1`, bearer-token
//!   authentication ([`auth`]), JSON errors, websockets with the `plain.kubevirt.io` protocol,
//!   server-sent events, `/healthz`, `/readyz`, `/metrics` and `/openapi.json` ([`openapi`]).
//! - [`backups`]: backups to a registry and restores from one, as long-running operations the
//!   client polls (local backend; the Kubernetes backend answers 501 and names the CLI).
//! - [`ui`] serves the embedded web console under `/ui/` (public static files; the API calls it
//!   makes need the token like any other client's).
//! - [`serve::serve`] runs it on a loopback address with a fresh token, published in
//!   `<state>/serve.json` for the CLI.

pub mod api;
pub mod auth;
pub mod backend;
pub mod backups;
pub mod kubernetes;
pub mod local;
pub mod metrics;
pub mod openapi;
pub mod serve;
pub mod time;
pub mod ui;

pub use api::{Api, ErrorBody, KUBEVIRT_SUBPROTOCOL, ServedRoute, served_routes};
pub use auth::{AccessToken, Authentication, Caller};
pub use backend::{
    Backend, BackendError, BackendResult, BackupListRequest, BackupRequest, BackupView, ConsoleAccess,
    ConsoleAccessView, ConsoleChannel, ConsoleKind, ConsoleView, ErrorKind, EventView, HealthCheck,
    ImageView, ImportView, LastExitView, OperationPhase, OperationProgress, OperationView, Permission,
    PowerAction, RestoreRequest, SnapshotRequest, SnapshotView, UserInfo, VmRef, VmStatusView, VmView,
};
pub use kubernetes::KubernetesBackend;
pub use local::LocalBackend;
pub use serve::{
    KubernetesServeOptions, ServeError, ServeInfo, ServeOptions, read_serve_file, serve, serve_file_path,
    serve_kubernetes,
};
