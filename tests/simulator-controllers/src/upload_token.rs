//! CDI's `UploadTokenRequest` API (`upload.cdi.kubevirt.io/v1beta1`, served by cdi-apiserver in a real
//! cluster) and the upload tokens it issues.
//!
//! Contract, as CDI's apiserver and upload proxy behave: a token is a JWT with issuer `cdi-apiserver`,
//! `iat`/`nbf` now, `exp` five minutes later, and the private claims `operation: Upload`, `name`
//! (the PVC, which is the DataVolume's name), `namespace` and `resource` (`persistentvolumeclaims`);
//! the proxy accepts it with ten seconds of leeway. Different from CDI: the signature is HS256 with a
//! random key held in memory ([`UploadTokens`]), not PS256 with cdi-apiserver's RSA key, because
//! nothing outside this process verifies it.
//!
//! Authorization: the kube-apiserver authorizes `create uploadtokenrequests` for the user before it
//! proxies the request here (RBAC), and the simulator's aggregated server authenticates the
//! apiserver's front-proxy certificate; this router does not repeat CDI's SubjectAccessReview.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use paddock_api::cdi::upload::{UploadTokenRequest, UploadTokenRequestStatus};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// CDI's issuer for upload tokens.
const ISSUER: &str = "cdi-apiserver";
/// CDI's upload token lifetime.
const LIFETIME: Duration = Duration::from_secs(5 * 60);
/// CDI's upload proxy clock leeway.
const LEEWAY: u64 = 10;
/// The only operation upload tokens carry.
const OPERATION_UPLOAD: &str = "Upload";

/// The key upload tokens are signed and verified with. Clones share the key.
#[derive(Clone)]
pub struct UploadTokens {
    key: Arc<[u8; 32]>,
}

impl std::fmt::Debug for UploadTokens {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("UploadTokens(<key redacted>)")
    }
}

/// Why a token could not be issued or was refused.
#[derive(Debug, thiserror::Error)]
pub enum UploadTokenError {
    /// The operating system's random source failed.
    #[error("cannot generate the upload token key: {0}; the operating system's random source failed")]
    Random(String),
    /// The token is not a well-formed HS256 JWT.
    #[error("upload token is malformed: {0}")]
    Malformed(&'static str),
    /// The signature does not verify.
    #[error("upload token signature does not verify; request a new token with an UploadTokenRequest")]
    Signature,
    /// The token has expired or is not valid yet.
    #[error("upload token is expired or not yet valid; request a new token with an UploadTokenRequest")]
    Expired,
    /// The token is valid but not an upload token.
    #[error("token is not an upload token for a persistentvolumeclaim")]
    WrongKind,
}

/// The claims of an upload token (the standard ones and CDI's `token.Payload`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Claims {
    iss: String,
    iat: u64,
    nbf: u64,
    exp: u64,
    operation: String,
    pub(crate) name: String,
    pub(crate) namespace: String,
    resource: GroupVersionResource,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct GroupVersionResource {
    #[serde(default)]
    group: String,
    version: String,
    resource: String,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or_default()
}

impl UploadTokens {
    /// A new random key.
    pub fn generate() -> Result<Self, UploadTokenError> {
        let mut key = [0_u8; 32];
        getrandom::fill(&mut key).map_err(|error| UploadTokenError::Random(error.to_string()))?;
        Ok(Self { key: Arc::new(key) })
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC accepts keys of any length, so this cannot fail; the fallback is never taken.
        Hmac::<Sha256>::new_from_slice(self.key.as_slice())
            .unwrap_or_else(|_| Hmac::<Sha256>::new(&Default::default()))
    }

    /// A token allowing an upload to the DataVolume (PVC) `name` in `namespace` for five minutes.
    pub fn issue(&self, namespace: &str, name: &str) -> String {
        let issued = now();
        let claims = Claims {
            iss: ISSUER.to_owned(),
            iat: issued,
            nbf: issued,
            exp: issued + LIFETIME.as_secs(),
            operation: OPERATION_UPLOAD.to_owned(),
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            resource: GroupVersionResource {
                group: String::new(),
                version: "v1".to_owned(),
                resource: "persistentvolumeclaims".to_owned(),
            },
        };
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        // Serializing a struct of strings and integers cannot fail.
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let signing_input = format!("{header}.{payload}");
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signing_input}.{signature}")
    }

    /// Checks a token's signature, issuer, times and kind; returns its claims.
    pub(crate) fn verify(&self, token: &str) -> Result<Claims, UploadTokenError> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(UploadTokenError::Malformed("not three dot-separated parts"));
        };
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| UploadTokenError::Malformed("signature is not base64url"))?;
        let mut mac = self.mac();
        mac.update(header.as_bytes());
        mac.update(b".");
        mac.update(payload.as_bytes());
        mac.verify_slice(&signature)
            .map_err(|_| UploadTokenError::Signature)?;
        let header: serde_json::Value = URL_SAFE_NO_PAD
            .decode(header)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or(UploadTokenError::Malformed("header is not base64url json"))?;
        if header.get("alg").and_then(|alg| alg.as_str()) != Some("HS256") {
            return Err(UploadTokenError::Malformed("algorithm is not HS256"));
        }
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or(UploadTokenError::Malformed("claims are not base64url json"))?;
        let now = now();
        if claims.exp + LEEWAY < now || claims.nbf > now + LEEWAY {
            return Err(UploadTokenError::Expired);
        }
        if claims.iss != ISSUER
            || claims.operation != OPERATION_UPLOAD
            || claims.name.is_empty()
            || claims.namespace.is_empty()
            || claims.resource.resource != "persistentvolumeclaims"
        {
            return Err(UploadTokenError::WrongKind);
        }
        Ok(claims)
    }
}

/// The `APIResourceList` of `upload.cdi.kubevirt.io/v1beta1`, for `GET /apis/upload.cdi.kubevirt.io/v1beta1`
/// (the aggregated server's discovery document, as cdi-apiserver serves it).
pub fn upload_api_resource_list() -> serde_json::Value {
    serde_json::json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": paddock_api::cdi::upload::API_VERSION,
        "resources": [{
            "name": "uploadtokenrequests",
            "singularName": "uploadtokenrequest",
            "namespaced": true,
            "kind": paddock_api::cdi::upload::KIND,
            "verbs": ["create"],
        }],
    })
}

/// The router of `upload.cdi.kubevirt.io/v1beta1`: `GET /apis/upload.cdi.kubevirt.io/v1beta1` (discovery)
/// and `POST /apis/upload.cdi.kubevirt.io/v1beta1/namespaces/{namespace}/uploadtokenrequests`, which
/// answers the posted `UploadTokenRequest` with `status.token` filled in (HTTP 200, as cdi-apiserver).
pub fn upload_token_api(tokens: UploadTokens) -> axum::Router {
    axum::Router::new()
        .route(
            "/apis/upload.cdi.kubevirt.io/v1beta1",
            axum::routing::get(|| async { Json(upload_api_resource_list()) }),
        )
        .route(
            "/apis/upload.cdi.kubevirt.io/v1beta1/namespaces/{namespace}/uploadtokenrequests",
            post(create_token),
        )
        .with_state(tokens)
}

async fn create_token(
    State(tokens): State<UploadTokens>,
    Path(namespace): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let mut request: UploadTokenRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => {
            return status_error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("cannot decode the UploadTokenRequest: {error}"),
            );
        }
    };
    if request.spec.pvc_name.is_empty() {
        return status_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "spec.pvcName is required: name the DataVolume (PVC) to upload to",
        );
    }
    request.metadata.namespace = Some(namespace.clone());
    request.status = Some(UploadTokenRequestStatus {
        token: Some(tokens.issue(&namespace, &request.spec.pvc_name)),
    });
    (StatusCode::OK, Json(request)).into_response()
}

fn status_error(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    (code, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

    use super::*;

    #[test]
    fn issued_tokens_verify_with_the_same_key_only() {
        let tokens = UploadTokens::generate().unwrap();
        let token = tokens.issue("vms", "disk");
        let claims = tokens.verify(&token).unwrap();
        assert_eq!((claims.namespace.as_str(), claims.name.as_str()), ("vms", "disk"));
        let other = UploadTokens::generate().unwrap();
        assert!(matches!(other.verify(&token), Err(UploadTokenError::Signature)));
        let mut tampered = token.clone();
        tampered.push('A');
        assert!(tokens.verify(&tampered).is_err());
    }
}
