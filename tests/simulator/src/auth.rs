//! Authentication and authorization of aggregated requests, as virt-api does them.
//!
//! Role: kube-apiserver authenticates the real user and forwards the identity in `X-Remote-*`
//! headers over a connection authenticated with its front-proxy client certificate. An aggregated
//! server believes those headers only from that certificate, then asks the API server whether the
//! user may do what the path says (a `SubjectAccessReview`), so RBAC on subresources such as
//! `virtualmachines/start` holds even for clients that reach the server directly.
//!
//! Contract:
//! - [`RequestHeaderConfig::load`] reads the front-proxy CA, allowed names and header names from
//!   `kube-system/extension-apiserver-authentication`, where kube-apiserver publishes them for every
//!   aggregated server.
//! - [`attributes_for`] maps a path and method to SubjectAccessReview resource attributes exactly as
//!   virt-api's authorizer does (group, version, namespace, resource, name, subresource joined by `/`,
//!   verb from the method); paths it does not recognise need no authorization (discovery, health).
//! - [`authorize`] returns whether the user is allowed, and the reason the API server gave.

use std::collections::BTreeMap;

use axum::http::{HeaderMap, Method};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};

/// Errors from reading the requestheader configuration or asking for a review.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The ConfigMap could not be read.
    #[error(
        "cannot read configmap kube-system/extension-apiserver-authentication: {0}; is kube-apiserver running with --requestheader-client-ca-file?"
    )]
    ConfigMap(#[source] kube::Error),
    /// A key is missing or malformed.
    #[error("configmap kube-system/extension-apiserver-authentication: {key} is {problem}")]
    Key {
        /// The key.
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The SubjectAccessReview failed.
    #[error("subjectaccessreview failed: {0}")]
    Review(#[source] kube::Error),
}

/// How kube-apiserver forwards identities to aggregated servers.
#[derive(Debug, Clone)]
pub struct RequestHeaderConfig {
    /// The front-proxy CA (PEM).
    pub client_ca_pem: String,
    /// Common names allowed to act as the front proxy (empty: any certificate of the CA).
    pub allowed_names: Vec<String>,
    /// Headers naming the user.
    pub username_headers: Vec<String>,
    /// Headers naming groups.
    pub group_headers: Vec<String>,
    /// Prefixes of headers carrying extra attributes.
    pub extra_header_prefixes: Vec<String>,
}

impl RequestHeaderConfig {
    /// Reads the configuration kube-apiserver published.
    pub async fn load(client: &kube::Client) -> Result<RequestHeaderConfig, AuthError> {
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
        let config_map = config_maps
            .get("extension-apiserver-authentication")
            .await
            .map_err(AuthError::ConfigMap)?;
        let data = config_map.data.unwrap_or_default();
        let text = |key: &'static str| -> Result<String, AuthError> {
            data.get(key).cloned().ok_or(AuthError::Key {
                key,
                problem: "missing".to_string(),
            })
        };
        let list = |key: &'static str| -> Result<Vec<String>, AuthError> {
            match data.get(key) {
                None => Ok(Vec::new()),
                Some(value) => serde_json::from_str(value).map_err(|error| AuthError::Key {
                    key,
                    problem: format!("not a JSON list of strings ({error})"),
                }),
            }
        };
        Ok(RequestHeaderConfig {
            client_ca_pem: text("requestheader-client-ca-file")?,
            allowed_names: list("requestheader-allowed-names")?,
            username_headers: list("requestheader-username-headers")?,
            group_headers: list("requestheader-group-headers")?,
            extra_header_prefixes: list("requestheader-extra-headers-prefix")?,
        })
    }

    /// The user the front proxy named, if it named one.
    pub fn user(&self, headers: &HeaderMap) -> Option<User> {
        let name = self
            .username_headers
            .iter()
            .find_map(|header| headers.get(header.as_str()))
            .and_then(|value| value.to_str().ok())
            .filter(|name| !name.is_empty())?
            .to_string();
        let groups = self
            .group_headers
            .iter()
            .flat_map(|header| headers.get_all(header.as_str()))
            .filter_map(|value| value.to_str().ok())
            .map(str::to_string)
            .collect();
        let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (header, value) in headers {
            let header = header.as_str();
            for prefix in &self.extra_header_prefixes {
                if let Some(key) = header.strip_prefix(&prefix.to_ascii_lowercase())
                    && let Ok(value) = value.to_str()
                {
                    extra.entry(key.to_string()).or_default().push(value.to_string());
                }
            }
        }
        Some(User { name, groups, extra })
    }
}

/// A user as the front proxy forwarded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The user name.
    pub name: String,
    /// Its groups.
    pub groups: Vec<String>,
    /// Extra attributes.
    pub extra: BTreeMap<String, Vec<String>>,
}

/// The SubjectAccessReview attributes for a request, or `None` when the path needs no authorization.
///
/// `/apis/<group>/<version>/namespaces/<namespace>/<resource>[/<name>[/<subresource>...]]`.
pub fn attributes_for(path: &str, method: &Method) -> Option<ResourceAttributes> {
    let parts: Vec<&str> = path.split('/').collect();
    // ["", "apis", group, version, "namespaces", namespace, resource, name?, subresource...]
    if parts.len() < 7 || parts[1] != "apis" || parts[4] != "namespaces" {
        return None;
    }
    let name = parts.get(7).copied().unwrap_or("");
    let subresource = if parts.len() > 8 {
        parts[8..].join("/")
    } else {
        String::new()
    };
    let verb = match *method {
        Method::POST => "create",
        Method::GET | Method::HEAD if name.is_empty() => "list",
        Method::GET | Method::HEAD => "get",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if name.is_empty() => "deletecollection",
        Method::DELETE => "delete",
        _ => "unknown",
    };
    let optional = |value: &str| (!value.is_empty()).then(|| value.to_string());
    Some(ResourceAttributes {
        group: Some(parts[2].to_string()),
        version: Some(parts[3].to_string()),
        namespace: Some(parts[5].to_string()),
        resource: Some(parts[6].to_string()),
        name: optional(name),
        subresource: optional(&subresource),
        verb: Some(verb.to_string()),
        ..ResourceAttributes::default()
    })
}

/// Asks the API server whether `user` may do `attributes`: (allowed, reason).
pub async fn authorize(
    client: &kube::Client,
    user: &User,
    attributes: ResourceAttributes,
) -> Result<(bool, String), AuthError> {
    let reviews: Api<SubjectAccessReview> = Api::all(client.clone());
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.name.clone()),
            groups: Some(user.groups.clone()),
            extra: Some(user.extra.clone()),
            resource_attributes: Some(attributes),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let answer = reviews
        .create(&PostParams::default(), &review)
        .await
        .map_err(AuthError::Review)?;
    let status = answer.status.unwrap_or_default();
    Ok((status.allowed, status.reason.unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

    use super::*;

    #[test]
    fn subresource_paths_map_like_virt_api() {
        let attributes = attributes_for(
            "/apis/subresources.kubevirt.io/v1/namespaces/team/virtualmachines/web/start",
            &Method::PUT,
        )
        .unwrap();
        assert_eq!(attributes.verb.as_deref(), Some("update"));
        assert_eq!(attributes.group.as_deref(), Some("subresources.kubevirt.io"));
        assert_eq!(attributes.resource.as_deref(), Some("virtualmachines"));
        assert_eq!(attributes.subresource.as_deref(), Some("start"));
        assert_eq!(attributes.name.as_deref(), Some("web"));
        let screenshot = attributes_for(
            "/apis/subresources.kubevirt.io/v1/namespaces/team/virtualmachineinstances/web/vnc/screenshot",
            &Method::GET,
        )
        .unwrap();
        assert_eq!(screenshot.subresource.as_deref(), Some("vnc/screenshot"));
        assert_eq!(screenshot.verb.as_deref(), Some("get"));
        let tokens = attributes_for(
            "/apis/upload.cdi.kubevirt.io/v1beta1/namespaces/team/uploadtokenrequests",
            &Method::POST,
        )
        .unwrap();
        assert_eq!(tokens.verb.as_deref(), Some("create"));
        assert_eq!(tokens.name, None);
        assert!(attributes_for("/apis/subresources.kubevirt.io/v1", &Method::GET).is_none());
        assert!(attributes_for("/healthz", &Method::GET).is_none());
    }
}
