//! `UploadTokenRequest` (`upload.cdi.kubevirt.io/v1beta1`), hand-written.
//!
//! This kind is not a CRD: CDI's upload API server serves it as an aggregated API, and it is create-only
//! (`POST /apis/upload.cdi.kubevirt.io/v1beta1/namespaces/{namespace}/uploadtokenrequests`). The server
//! answers the POST with the same object, `status.token` filled in: a JWT for the
//! `Authorization: Bearer` header of an upload to the `cdi-uploadproxy`.
//!
//! The fields follow the `v1beta1.UploadTokenRequest`, `v1beta1.UploadTokenRequestSpec` and
//! `v1beta1.UploadTokenRequestStatus` definitions of CDI v1.66.0's OpenAPI document
//! (`schemas/cdi-v1.66.0-swagger.json` in the shared reference data).
//!
//! [`UploadTokenRequest`] implements `k8s_openapi::Resource` and `k8s_openapi::Metadata`, so kube's
//! blanket impl makes it a [`kube::Resource`] and `kube::Api::<UploadTokenRequest>::namespaced(..)
//! .create(..)` works.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// The API group of [`UploadTokenRequest`].
pub const GROUP: &str = "upload.cdi.kubevirt.io";
/// The API version of [`UploadTokenRequest`].
pub const VERSION: &str = "v1beta1";
/// `apiVersion` of [`UploadTokenRequest`].
pub const API_VERSION: &str = "upload.cdi.kubevirt.io/v1beta1";
/// `kind` of [`UploadTokenRequest`].
pub const KIND: &str = "UploadTokenRequest";

/// UploadTokenRequest is the CR used to initiate a CDI upload.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct UploadTokenRequest {
    /// Always [`API_VERSION`].
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    /// Always [`KIND`].
    pub kind: String,
    /// Standard object metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec contains the parameters of the request.
    #[serde(default)]
    pub spec: UploadTokenRequestSpec,
    /// Status contains the status of the request; filled in by the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<UploadTokenRequestStatus>,
}

/// UploadTokenRequestSpec defines the parameters of the token request.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct UploadTokenRequestSpec {
    /// PvcName is the name of the PVC to upload to.
    #[serde(rename = "pvcName", default)]
    pub pvc_name: String,
}

/// UploadTokenRequestStatus stores the status of a token request.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct UploadTokenRequestStatus {
    /// Token is a JWT token to be inserted in the "Authentication Bearer header".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl UploadTokenRequest {
    /// A request named `name` for an upload to the PVC `pvc_name` (namespace left to the `kube::Api`).
    pub fn new(name: &str, pvc_name: &str) -> Self {
        Self {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            spec: UploadTokenRequestSpec {
                pvc_name: pvc_name.to_owned(),
            },
            ..Self::default()
        }
    }

    /// The token the server issued, if any.
    pub fn token(&self) -> Option<&str> {
        self.status.as_ref()?.token.as_deref()
    }
}

impl Default for UploadTokenRequest {
    fn default() -> Self {
        Self {
            api_version: API_VERSION.to_owned(),
            kind: KIND.to_owned(),
            metadata: ObjectMeta::default(),
            spec: UploadTokenRequestSpec::default(),
            status: None,
        }
    }
}

impl k8s_openapi::Resource for UploadTokenRequest {
    const API_VERSION: &'static str = API_VERSION;
    const GROUP: &'static str = GROUP;
    const KIND: &'static str = KIND;
    const VERSION: &'static str = VERSION;
    const URL_PATH_SEGMENT: &'static str = "uploadtokenrequests";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for UploadTokenRequest {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource as _;

    #[test]
    fn resource_identity_matches_the_cdi_api() {
        assert_eq!(
            UploadTokenRequest::api_version(&()),
            "upload.cdi.kubevirt.io/v1beta1"
        );
        assert_eq!(UploadTokenRequest::kind(&()), "UploadTokenRequest");
        assert_eq!(UploadTokenRequest::plural(&()), "uploadtokenrequests");
        assert_eq!(UploadTokenRequest::group(&()), "upload.cdi.kubevirt.io");
        let url = UploadTokenRequest::url_path(&(), Some("vms"));
        assert_eq!(
            url,
            "/apis/upload.cdi.kubevirt.io/v1beta1/namespaces/vms/uploadtokenrequests"
        );
    }

    #[test]
    fn serializes_a_request_and_reads_the_token_back() {
        let request = UploadTokenRequest::new("upload-disk", "disk-pvc");
        let json = serde_json::to_value(&request).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "apiVersion": "upload.cdi.kubevirt.io/v1beta1",
                "kind": "UploadTokenRequest",
                "metadata": {"name": "upload-disk"},
                "spec": {"pvcName": "disk-pvc"},
            })
        );

        let answer: UploadTokenRequest = serde_json::from_value(serde_json::json!({
            "apiVersion": "upload.cdi.kubevirt.io/v1beta1",
            "kind": "UploadTokenRequest",
            "metadata": {"name": "upload-disk", "namespace": "vms", "creationTimestamp": null},
            "spec": {"pvcName": "disk-pvc"},
            "status": {"token": "eyJhbGciOi.jwt"},
        }))
        .unwrap();
        assert_eq!(answer.token(), Some("eyJhbGciOi.jwt"));
        assert_eq!(request.token(), None);
    }
}
