//! The paddock operator's Helm chart and Zarf package definition, generated from Rust.
//!
//! Role: the single source of `deploy/chart/` and `deploy/zarf.yaml`. `paddock chart --output
//! deploy/chart` writes them; CI regenerates and fails when the committed copies drift. Everything
//! that must agree with the operator's code is taken from it: the CRD from `paddock-api`, the RBAC
//! from the table in [`rbac`] (every API call of `paddock-operator` and `paddock-admission`, with its
//! code path), the web console's RBAC from the separate console table there, the Lease and TLS
//! Secret names from their crates' defaults.
//!
//! Contract: pure (no I/O); the same build returns the same bytes. [`chart::chart_files`] returns the
//! chart's files with paths relative to the chart directory, [`zarf::zarf_yaml`] the package
//! definition that sits one directory above the chart.

pub mod chart;
pub mod rbac;
pub mod template;
pub mod zarf;

pub use chart::{ChartFile, chart_files};
pub use template::TemplateError;
pub use zarf::zarf_yaml;

/// The chart's name (and the Zarf chart and release name).
pub const CHART_NAME: &str = "paddock";
/// The chart and application version: the workspace version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The namespace the Zarf package installs the operator into.
pub const NAMESPACE: &str = "paddock-system";
/// The default image repository of the operator.
pub const DEFAULT_IMAGE_REPOSITORY: &str = "registry.example.invalid/paddock/paddock";
/// The operator image archive, relative to the directory of `zarf.yaml`.
pub const IMAGE_ARCHIVE: &str = "build/paddock-operator-image.tar";
/// The port of `/healthz`, `/readyz` and `/metrics` (`paddock operator --listen`).
pub const METRICS_PORT: u16 = 8080;
/// The port of the web console (`paddock serve --backend kubernetes --listen`): its API, UI, VNC
/// gateway, `/healthz` and `/readyz`, in plain HTTP.
pub const CONSOLE_PORT: u16 = 8642;
/// The port of the HTTPS webhook server (`paddock operator --webhook-listen`).
pub const WEBHOOK_PORT: u16 = 8443;

/// The operator image the chart deploys by default and the Zarf package carries.
pub fn operator_image() -> String {
    format!("{DEFAULT_IMAGE_REPOSITORY}:{VERSION}")
}
