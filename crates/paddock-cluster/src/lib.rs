//! Client-side operations against a KubeVirt/CDI cluster, shared by the command line, the
//! console's Kubernetes backend and the operator, so all of them behave the same.
//!
//! Role:
//! - [`upload`]: the pure parts of an upload (manifests, size rules, disk header checks, URL and
//!   answer parsing) and the streamed `POST` to CDI's upload proxy. It takes and returns JSON
//!   objects, because the console talks to the API server with its own impersonating requests.
//! - [`backup`]: backups of cluster VMs to a registry and restores into a cluster, through a
//!   `kube::Client` the caller sets up (its kubeconfig, the operator's service account, or the
//!   console's client impersonating the signed-in user).

pub mod backup;
pub mod upload;
