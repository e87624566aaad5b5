//! Kubernetes `Status` errors, worded as virt-api words them, and raw object access.
//!
//! Role: every handler answers failures with the `metav1.Status` body the real virt-api writes
//! (`errors.NewConflict(v1.Resource("virtualmachine"), name, ...)` and friends), so clients that
//! match on reason, code or message behave the same against the simulator.
//!
//! Contract: [`StatusError`] renders as JSON with `kind: Status`, `apiVersion: v1` and the HTTP code;
//! the helpers build the same messages as `k8s.io/apimachinery/pkg/api/errors`. [`get`] and
//! [`json_patch`] talk to the API server with the simulator's (admin) client and turn its errors into
//! `StatusError`s the way virt-api does (not found stays not found, anything else is internal).

use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// The group virt-api names in its errors (`v1.Resource("virtualmachine")` is in `kubevirt.io`).
const KUBEVIRT_GROUP: &str = "kubevirt.io";

/// A failure answered with a Kubernetes `Status`.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusError {
    /// The HTTP code.
    pub code: u16,
    /// The machine-readable reason (`Conflict`, `NotFound`, ...).
    pub reason: &'static str,
    /// The human-readable message.
    pub message: String,
    /// `details`, when the reason has any.
    pub details: Option<Value>,
}

impl StatusError {
    /// `errors.NewConflict(kubevirt.io/<resource>, name, error)`.
    pub fn conflict(resource: &str, name: &str, error: impl std::fmt::Display) -> StatusError {
        StatusError {
            code: 409,
            reason: "Conflict",
            message: format!(
                "Operation cannot be fulfilled on {resource}.{KUBEVIRT_GROUP} \"{name}\": {error}"
            ),
            details: Some(json!({"name": name, "group": KUBEVIRT_GROUP, "kind": resource})),
        }
    }

    /// `errors.NewNotFound(kubevirt.io/<resource>, name)`.
    pub fn not_found(resource: &str, name: &str) -> StatusError {
        StatusError {
            code: 404,
            reason: "NotFound",
            message: format!("{resource}.{KUBEVIRT_GROUP} \"{name}\" not found"),
            details: Some(json!({"name": name, "group": KUBEVIRT_GROUP, "kind": resource})),
        }
    }

    /// `errors.NewForbidden(kubevirt.io/<resource>, name, error)`.
    pub fn forbidden(resource: &str, name: &str, error: impl std::fmt::Display) -> StatusError {
        StatusError {
            code: 403,
            reason: "Forbidden",
            message: format!("{resource}.{KUBEVIRT_GROUP} \"{name}\" is forbidden: {error}"),
            details: Some(json!({"name": name, "group": KUBEVIRT_GROUP, "kind": resource})),
        }
    }

    /// `errors.NewBadRequest(message)`.
    pub fn bad_request(message: impl Into<String>) -> StatusError {
        StatusError {
            code: 400,
            reason: "BadRequest",
            message: message.into(),
            details: None,
        }
    }

    /// `errors.NewInternalError(error)`.
    pub fn internal(error: impl std::fmt::Display) -> StatusError {
        let error = error.to_string();
        StatusError {
            code: 500,
            reason: "InternalError",
            message: format!("Internal error occurred: {error}"),
            details: Some(json!({"causes": [{"message": error}]})),
        }
    }

    /// The `Status` body.
    pub fn body(&self) -> Value {
        let mut body = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            body["details"] = details.clone();
        }
        body
    }
}

impl IntoResponse for StatusError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (code, axum::Json(self.body())).into_response()
    }
}

/// What a raw API call failed with.
#[derive(Debug)]
pub enum ApiFailure {
    /// The API server answered with a `Status` (code, message).
    Status(Box<kube::core::Status>),
    /// Anything else (transport, decoding).
    Other(kube::Error),
}

impl ApiFailure {
    fn from_kube(error: kube::Error) -> ApiFailure {
        match error {
            kube::Error::Api(status) => ApiFailure::Status(status),
            other => ApiFailure::Other(other),
        }
    }

    /// Whether the API server said 404.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ApiFailure::Status(status) if status.code == 404)
    }

    /// The message to quote.
    pub fn message(&self) -> String {
        match self {
            ApiFailure::Status(status) => status.message.clone(),
            ApiFailure::Other(error) => error.to_string(),
        }
    }
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.message())
    }
}

/// The string at `pointer` in a raw object, empty when it is missing or not a string.
pub fn text<'a>(object: &'a Value, pointer: &str) -> &'a str {
    object.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// `GET path`: the object, or `None` when it does not exist.
pub async fn get(client: &kube::Client, path: &str) -> Result<Option<Value>, ApiFailure> {
    let request = Request::get(path)
        .body(Vec::new())
        .map_err(|error| ApiFailure::Other(kube::Error::HttpError(error)))?;
    match client.request::<Value>(request).await {
        Ok(object) => Ok(Some(object)),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
        Err(error) => Err(ApiFailure::from_kube(error)),
    }
}

/// `PATCH path` with a JSON patch (`application/json-patch+json`), optionally as a dry run.
pub async fn json_patch(
    client: &kube::Client,
    path: &str,
    operations: &Value,
    dry_run: bool,
) -> Result<Value, ApiFailure> {
    send_json(
        client,
        "PATCH",
        &with_dry_run(path, dry_run),
        "application/json-patch+json",
        operations,
    )
    .await
}

/// `PATCH path` with a JSON merge patch.
pub async fn merge_patch(client: &kube::Client, path: &str, patch: &Value) -> Result<Value, ApiFailure> {
    send_json(client, "PATCH", path, "application/merge-patch+json", patch).await
}

/// `POST path` with a JSON body, optionally as a dry run.
pub async fn create(
    client: &kube::Client,
    path: &str,
    object: &Value,
    dry_run: bool,
) -> Result<Value, ApiFailure> {
    send_json(
        client,
        "POST",
        &with_dry_run(path, dry_run),
        "application/json",
        object,
    )
    .await
}

/// `PUT path` with a JSON body.
pub async fn replace(client: &kube::Client, path: &str, object: &Value) -> Result<Value, ApiFailure> {
    send_json(client, "PUT", path, "application/json", object).await
}

/// `path` with `?dryRun=All` when `dry_run` asks for it.
fn with_dry_run(path: &str, dry_run: bool) -> String {
    if dry_run {
        format!("{path}?dryRun=All")
    } else {
        path.to_string()
    }
}

async fn send_json(
    client: &kube::Client,
    method: &str,
    uri: &str,
    content_type: &str,
    body: &Value,
) -> Result<Value, ApiFailure> {
    let body = serde_json::to_vec(body).map_err(|error| ApiFailure::Other(kube::Error::SerdeError(error)))?;
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("Content-Type", content_type)
        .body(body)
        .map_err(|error| ApiFailure::Other(kube::Error::HttpError(error)))?;
    client
        .request::<Value>(request)
        .await
        .map_err(ApiFailure::from_kube)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

    use super::*;

    #[test]
    fn conflict_reads_like_apimachinery() {
        let error = StatusError::conflict("virtualmachine", "web", "VM is already running");
        assert_eq!(
            error.message,
            "Operation cannot be fulfilled on virtualmachine.kubevirt.io \"web\": VM is already running"
        );
        assert_eq!(error.body()["code"], 409);
        assert_eq!(error.body()["details"]["kind"], "virtualmachine");
    }
}
