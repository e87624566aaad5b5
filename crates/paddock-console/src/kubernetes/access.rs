//! Per-user authorization of reads from the shared caches: SubjectAccessReviews, cached briefly.
//!
//! Role: the caches are filled with the console's own credentials, so before a user sees an
//! object from them the API server is asked whether that user may (`list`/`get`) it. Actions do
//! not come here: they run as the user (impersonation) and the API server decides.
//!
//! Contract: a decision is cached for [`DECISION_LIFETIME`] per user and permission, so a list of
//! many VMs in few namespaces costs a few reviews, and a RoleBinding made or removed takes effect
//! within that time. The cache is cleared when it grows past [`MAX_DECISIONS`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::{Api, PostParams};

use crate::backend::{BackendError, BackendResult, ErrorKind, Permission, UserInfo};

/// How long an access decision is reused.
pub const DECISION_LIFETIME: Duration = Duration::from_secs(10);
/// How many decisions are kept before the cache is cleared.
const MAX_DECISIONS: usize = 10_000;

/// A decision: allowed, or denied with the reviewer's reason.
#[derive(Debug, Clone)]
struct Decision {
    allowed: bool,
    reason: String,
    at: Instant,
}

/// Asks the API server whether users may do things; see the module documentation.
pub struct AccessReviewer {
    client: kube::Client,
    decisions: Mutex<HashMap<(UserInfo, Permission), Decision>>,
}

impl AccessReviewer {
    /// A reviewer using the console's own `client` (which needs `create subjectaccessreviews`).
    pub fn new(client: kube::Client) -> AccessReviewer {
        AccessReviewer {
            client,
            decisions: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `user` may do `permission`.
    pub async fn allowed(&self, user: &UserInfo, permission: &Permission) -> BackendResult<bool> {
        Ok(self.decide(user, permission).await?.allowed)
    }

    /// Ok when `user` may do `permission`, else a 403 naming it.
    pub async fn require(&self, user: &UserInfo, permission: &Permission) -> BackendResult<()> {
        let decision = self.decide(user, permission).await?;
        if decision.allowed {
            return Ok(());
        }
        let why = if decision.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", decision.reason)
        };
        Err(BackendError::forbidden(
            permission.clone(),
            format!(
                "user \"{}\" may not {permission}{why}; ask a cluster administrator for a Role granting it (e.g. bind the kubevirt.io:view or kubevirt.io:edit ClusterRole in the namespace)",
                user.username
            ),
        ))
    }

    async fn decide(&self, user: &UserInfo, permission: &Permission) -> BackendResult<Decision> {
        let key = (user.clone(), permission.clone());
        if let Ok(decisions) = self.decisions.lock()
            && let Some(decision) = decisions.get(&key)
            && decision.at.elapsed() < DECISION_LIFETIME
        {
            return Ok(decision.clone());
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.username.clone()),
                uid: user.uid.clone(),
                groups: Some(user.groups.clone()),
                extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(permission.verb.clone()),
                    group: Some(permission.group.clone()),
                    resource: Some(permission.resource.clone()),
                    subresource: permission.subresource.clone(),
                    namespace: permission.namespace.clone(),
                    name: permission.name.clone(),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let reviews: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let answered = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|error| {
                BackendError::new(
                    ErrorKind::Internal,
                    format!(
                        "cannot ask the API server whether \"{}\" may {permission}: {error}; the console's service account needs `create subjectaccessreviews`",
                        user.username
                    ),
                )
            })?;
        let status = answered.status.unwrap_or_default();
        let decision = Decision {
            allowed: status.allowed && !status.denied.unwrap_or(false),
            reason: status.reason.or(status.evaluation_error).unwrap_or_default(),
            at: Instant::now(),
        };
        if let Ok(mut decisions) = self.decisions.lock() {
            if decisions.len() >= MAX_DECISIONS {
                decisions.clear();
            }
            decisions.insert(key, decision.clone());
        }
        Ok(decision)
    }
}
