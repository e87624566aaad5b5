//! The few `paddock serve` REST calls the benchmark times, and where a VM's files are.
//!
//! Role: a thin client over the documented API (`/openapi.json`), with the access token.
//!
//! Contract: every call returns after the full response arrived; a status other than the one
//! the API documents for success is an [`ApiError::Refused`] carrying the server's message.

use std::path::{Path, PathBuf};

/// Failures of the REST client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The HTTP exchange failed.
    #[error("the request to paddock serve failed: {0}")]
    Http(#[from] reqwest::Error),
    /// paddock serve answered with an error.
    #[error("paddock serve refused {what}: HTTP {status}: {message}")]
    Refused {
        /// Which call.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The response body.
        message: String,
    },
    /// A file of the state directory could not be read.
    #[error("cannot read {path}: {message}; is --state-dir the one paddock serve uses?")]
    StateFile {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// A client of one `paddock serve`.
pub struct Api {
    client: reqwest::Client,
    url: String,
    token: String,
}

impl Api {
    /// A client of the server at `url` (`http://127.0.0.1:PORT`) with `token`.
    pub fn new(url: &str, token: &str) -> Api {
        Api {
            client: reqwest::Client::new(),
            url: url.trim_end_matches('/').to_string(),
            token: token.to_string(),
        }
    }

    /// The websocket URL of a VM's VNC console.
    pub fn vnc_url(&self, name: &str) -> String {
        format!(
            "{}/api/v1/vms/default/{name}/vnc?token={}",
            self.url.replacen("http://", "ws://", 1),
            self.token
        )
    }

    async fn call(
        &self,
        what: &str,
        request: reqwest::RequestBuilder,
        expected: u16,
    ) -> Result<Vec<u8>, ApiError> {
        let response = request.bearer_auth(&self.token).send().await?;
        let status = response.status().as_u16();
        let body = response.bytes().await?.to_vec();
        if status != expected {
            return Err(ApiError::Refused {
                what: what.to_string(),
                status,
                message: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        Ok(body)
    }

    /// Creates a VM from a VirtualMachineApp manifest (YAML).
    pub async fn create(&self, manifest: &str) -> Result<(), ApiError> {
        let request = self
            .client
            .post(format!("{}/api/v1/vms", self.url))
            .header("Content-Type", "application/yaml")
            .body(manifest.to_string());
        self.call("the create request", request, 201).await.map(drop)
    }

    /// Takes a snapshot, with or without memory.
    pub async fn snapshot(&self, vm: &str, snapshot: &str, memory: bool) -> Result<(), ApiError> {
        let body = serde_json::json!({"name": snapshot, "memory": memory}).to_string();
        let request = self
            .client
            .post(format!("{}/api/v1/vms/default/{vm}/snapshots", self.url))
            .header("Content-Type", "application/json")
            .body(body);
        self.call("the snapshot request", request, 201).await.map(drop)
    }

    /// Restores a snapshot.
    pub async fn restore(&self, vm: &str, snapshot: &str) -> Result<(), ApiError> {
        let request = self.client.put(format!(
            "{}/api/v1/vms/default/{vm}/snapshots/{snapshot}/restore",
            self.url
        ));
        self.call("the restore request", request, 200).await.map(drop)
    }

    /// Deletes a VM and its snapshots.
    pub async fn delete(&self, vm: &str) -> Result<(), ApiError> {
        let request = self
            .client
            .delete(format!("{}/api/v1/vms/default/{vm}?force=true", self.url));
        self.call("the delete request", request, 204).await.map(drop)
    }
}

/// Where a VM's files are in the state directory of `paddock serve` (see
/// `crates/paddock-local/src/state.rs` for the layout).
pub struct VmFiles {
    /// The VM's directory.
    pub directory: PathBuf,
}

impl VmFiles {
    /// The files of VM `default/name` under `state_dir`.
    pub fn new(state_dir: &Path, name: &str) -> VmFiles {
        VmFiles {
            directory: state_dir.join("vms").join("default").join(name),
        }
    }

    /// The serial console log QEMU writes.
    pub fn console_log(&self) -> PathBuf {
        self.directory.join("console.log")
    }

    /// QEMU's VNC unix socket: in the socket directory the record names (the VM directory
    /// unless its path is too long for a socket).
    pub fn vnc_socket(&self) -> Result<PathBuf, ApiError> {
        let record_path = self.directory.join("record.json");
        let state_error = |message: String| ApiError::StateFile {
            path: record_path.clone(),
            message,
        };
        let text = std::fs::read(&record_path).map_err(|error| state_error(error.to_string()))?;
        let record: serde_json::Value =
            serde_json::from_slice(&text).map_err(|error| state_error(error.to_string()))?;
        let socket_dir = record
            .get("socket_dir")
            .or_else(|| record.get("socketDir"))
            .and_then(serde_json::Value::as_str)
            .map_or_else(|| self.directory.clone(), PathBuf::from);
        Ok(socket_dir.join("vnc.sock"))
    }
}
