//! Client-side operations against a KubeVirt/CDI cluster, shared by the command line (`paddock
//! upload`) and the console's Kubernetes backend, so both behave the same.
//!
//! Role: the pure parts (manifests, size rules, disk header checks, URL and answer parsing) and
//! the one piece of I/O both need in the same shape (the streamed `POST` to CDI's upload proxy).
//! Talking to the Kubernetes API stays with the callers: the CLI uses its kubeconfig, the console
//! impersonates the signed-in user, so this crate takes and returns JSON objects, not clients.

pub mod upload;
