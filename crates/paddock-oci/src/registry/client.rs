//! A minimal OCI distribution API client for one repository: authentication (Basic, and the
//! Bearer token flow of `WWW-Authenticate` challenges), blob HEAD/GET, upload sessions and
//! manifests.
//!
//! Contract: a request that gets http 401 with a challenge is authenticated (credentials are looked
//! up once, on the first challenge) and sent once more; the resulting `Authorization` value is then
//! sent with every later request, so a push or pull pays the token round trip once. Request bodies
//! are rebuilt for the retry (callers pass a closure), which is what lets streamed uploads survive a
//! token expiring mid-push. Errors name the registry and the request (method and path, never the
//! query, which carries upload state) and say what to do.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use base64::Engine;
use paddock_api::image_reference::ImageReference;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HeaderMap, HeaderValue, LOCATION,
    RANGE, WWW_AUTHENTICATE,
};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde::Deserialize;

use super::auth::{Challenge, ResolvedCredentials, docker_config_dir, lookup, parse_challenge};
use super::manifest::{
    MAX_MANIFEST_SIZE, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST_LIST, sha256_digest,
};
use super::{RegistryError, RegistryOptions, Result, error_chain};
use crate::{MEDIA_TYPE_INDEX, MEDIA_TYPE_MANIFEST};

/// The header registries return the digest of stored content in.
const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// What the client will do in the repository (the token scope it asks for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Read only.
    Pull,
    /// Read and write.
    Push,
    /// Delete manifests (the distribution API's `delete` action).
    Delete,
}

/// A client for one repository of one registry.
pub(crate) struct RegistryClient {
    http: reqwest::Client,
    registry: String,
    repository: String,
    /// `<scheme>://<host>/v2/`.
    api_url: String,
    /// `<scheme>://<host>/v2/<repository>/`.
    repository_url: String,
    access: Access,
    options: RegistryOptions,
    credentials: Mutex<Option<ResolvedCredentials>>,
    authorization: Mutex<Option<HeaderValue>>,
}

/// A manifest as fetched: its bytes, the media type the registry gave and the digest it claims.
pub(crate) struct FetchedManifest {
    /// The exact bytes.
    pub(crate) bytes: Vec<u8>,
    /// The `Content-Type` the registry sent, if any.
    pub(crate) content_type: Option<String>,
    /// The registry's `Docker-Content-Digest`, if any.
    pub(crate) digest_header: Option<String>,
}

impl RegistryClient {
    /// A client for the repository of `reference`.
    pub(crate) fn new(reference: &ImageReference, options: &RegistryOptions, access: Access) -> Result<Self> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("paddock/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            // No overall timeout (a blob may take hours on a slow link), but a stalled connection
            // fails instead of hanging forever.
            .read_timeout(Duration::from_secs(300))
            .build()
            .map_err(|error| RegistryError::ClientSetup(error_chain(&error)))?;
        let scheme = if options.insecure { "http" } else { "https" };
        // Docker Hub's API lives on another host than its name.
        let host = if reference.registry == paddock_api::image_reference::DOCKER_HUB {
            "registry-1.docker.io"
        } else {
            reference.registry.as_str()
        };
        Ok(RegistryClient {
            http,
            registry: reference.registry.clone(),
            repository: reference.repository.clone(),
            api_url: format!("{scheme}://{host}/v2/"),
            repository_url: format!("{scheme}://{host}/v2/{}/", reference.repository),
            access,
            options: options.clone(),
            credentials: Mutex::new(None),
            authorization: Mutex::new(None),
        })
    }

    /// The registry host, for messages.
    pub(crate) fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path.
    pub(crate) fn repository(&self) -> &str {
        &self.repository
    }

    /// `<base>/v2/<repository>/<path>`.
    fn url(&self, path: &str) -> Result<Url> {
        let text = format!("{}{path}", self.repository_url);
        Url::parse(&text).map_err(|error| RegistryError::Protocol {
            registry: self.registry.clone(),
            action: text.clone(),
            reason: format!("cannot build the request url: {error}"),
        })
    }

    /// The URL of a blob.
    pub(crate) fn blob_url(&self, digest: &str) -> Result<Url> {
        self.url(&format!("blobs/{digest}"))
    }

    fn current_authorization(&self) -> Option<HeaderValue> {
        self.authorization
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Credentials for this registry, looked up once. A credential helper, if configured, runs
    /// here, briefly blocking the calling thread (helpers answer in milliseconds).
    fn resolved_credentials(&self) -> Result<ResolvedCredentials> {
        let mut cached = self.credentials.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(resolved) = cached.as_ref() {
            return Ok(resolved.clone());
        }
        let resolved = if let Some(credentials) = &self.options.credentials {
            ResolvedCredentials {
                credentials: Some(credentials.clone()),
                origin: "the credentials passed to paddock".to_string(),
            }
        } else if let Some(directory) = docker_config_dir(self.options.docker_config_dir.as_deref()) {
            lookup(&directory, &self.registry)?
        } else {
            ResolvedCredentials {
                credentials: None,
                origin: "no docker config (neither DOCKER_CONFIG nor HOME is set)".to_string(),
            }
        };
        *cached = Some(resolved.clone());
        Ok(resolved)
    }

    fn unauthorized(&self, action: &str, detail: &str) -> RegistryError {
        let resolved = self
            .credentials
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let advice = match resolved {
            Some(ResolvedCredentials {
                credentials: Some(credentials),
                origin,
            }) => format!(
                "it rejected the credentials of user {:?} from {origin}{detail}; check them (docker login {}) or pass --username/--password-stdin",
                credentials.username, self.registry
            ),
            Some(ResolvedCredentials {
                credentials: None,
                origin,
            }) => format!(
                "it needs credentials and none were found (looked in {origin}){detail}; run docker login {} or pass --username/--password-stdin",
                self.registry
            ),
            None => format!(
                "it needs credentials{detail}; check them in ~/.docker/config.json (docker login {}) or pass --username/--password-stdin",
                self.registry
            ),
        };
        RegistryError::Unauthorized {
            registry: self.registry.clone(),
            action: action.to_string(),
            advice,
        }
    }

    fn transport_error(&self, action: &str, error: reqwest::Error) -> RegistryError {
        RegistryError::Connect {
            registry: self.registry.clone(),
            action: action.to_string(),
            detail: error_chain(&error.without_url()),
            hint: if self.options.insecure {
                ""
            } else {
                "; if it serves plain http (a local docker-registry, for example) pass --insecure"
            },
        }
    }

    fn protocol_error(&self, action: &str, reason: impl Into<String>) -> RegistryError {
        RegistryError::Protocol {
            registry: self.registry.clone(),
            action: action.to_string(),
            reason: reason.into(),
        }
    }

    /// Sends a request built by `build` (called again for the retry after authenticating, so it
    /// must build the body afresh). Returns the response whatever its status, and the action
    /// text used in errors.
    pub(crate) async fn send<F>(&self, method: Method, url: &Url, build: F) -> Result<(Response, String)>
    where
        F: Fn(RequestBuilder) -> RequestBuilder,
    {
        let action = format!("{method} {}", url.path());
        let mut authenticated = false;
        loop {
            let mut request = build(self.http.request(method.clone(), url.clone()));
            if let Some(value) = self.current_authorization() {
                request = request.header(AUTHORIZATION, value);
            }
            let response = request
                .send()
                .await
                .map_err(|error| self.transport_error(&action, error))?;
            if response.status() != StatusCode::UNAUTHORIZED || authenticated {
                return Ok((response, action));
            }
            let Some(challenge) = response
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|value| value.to_str().ok())
                .and_then(parse_challenge)
            else {
                return Ok((response, action));
            };
            self.authenticate(&challenge, &action).await?;
            authenticated = true;
        }
    }

    /// Maps an unexpected status to an error carrying the registry's own message.
    pub(crate) async fn check(
        &self,
        action: &str,
        response: Response,
        expected: &[StatusCode],
    ) -> Result<Response> {
        let status = response.status();
        if expected.contains(&status) {
            return Ok(response);
        }
        let body = response.bytes().await.unwrap_or_default();
        let message = registry_message(&body);
        Err(match status {
            StatusCode::UNAUTHORIZED => self.unauthorized(action, &format!(" ({message})")),
            StatusCode::FORBIDDEN => RegistryError::Denied {
                registry: self.registry.clone(),
                action: action.to_string(),
                message,
            },
            StatusCode::NOT_FOUND => RegistryError::NotFound {
                registry: self.registry.clone(),
                action: action.to_string(),
                message,
            },
            other => RegistryError::Status {
                registry: self.registry.clone(),
                action: action.to_string(),
                status: other.as_u16(),
                message,
            },
        })
    }

    fn scope(&self) -> String {
        match self.access {
            Access::Pull => format!("repository:{}:pull", self.repository),
            Access::Push => format!("repository:{}:pull,push", self.repository),
            Access::Delete => format!("repository:{}:delete", self.repository),
        }
    }

    /// Answers a challenge: Basic with the credentials, or Bearer by fetching a token from the
    /// challenge's realm (with the credentials as Basic auth when there are any).
    async fn authenticate(&self, challenge: &Challenge, action: &str) -> Result<()> {
        let resolved = self.resolved_credentials()?;
        let value = match challenge.scheme.as_str() {
            "basic" => {
                let Some(credentials) = &resolved.credentials else {
                    return Err(self.unauthorized(action, ""));
                };
                let encoded = base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{}", credentials.username, credentials.password));
                format!("Basic {encoded}")
            }
            "bearer" => format!("Bearer {}", self.fetch_token(challenge, &resolved, action).await?),
            other => {
                return Err(self.protocol_error(
                    action,
                    format!("it asks for {other} authentication; paddock supports basic and bearer"),
                ));
            }
        };
        let mut value = HeaderValue::from_str(&value)
            .map_err(|_| self.protocol_error(action, "the credentials or token are not valid header text"))?;
        value.set_sensitive(true);
        *self.authorization.lock().unwrap_or_else(PoisonError::into_inner) = Some(value);
        Ok(())
    }

    async fn fetch_token(
        &self,
        challenge: &Challenge,
        resolved: &ResolvedCredentials,
        action: &str,
    ) -> Result<String> {
        let realm = challenge
            .parameters
            .get("realm")
            .ok_or_else(|| self.protocol_error(action, "its bearer challenge has no realm"))?;
        let mut url = Url::parse(realm).map_err(|error| {
            self.protocol_error(action, format!("its token realm {realm:?} is not a url: {error}"))
        })?;
        let scope = self.scope();
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = challenge.parameters.get("service") {
                query.append_pair("service", service);
            }
            query.append_pair("scope", &scope);
        }
        let token_action = format!(
            "GET {}{} for scope {scope}",
            url.origin().ascii_serialization(),
            url.path()
        );
        let mut request = self.http.get(url);
        if let Some(credentials) = &resolved.credentials {
            request = request.basic_auth(&credentials.username, Some(&credentials.password));
        }
        let response = request
            .send()
            .await
            .map_err(|error| self.transport_error(&token_action, error))?;
        let response = self.check(&token_action, response, &[StatusCode::OK]).await?;
        let body = response
            .bytes()
            .await
            .map_err(|error| self.transport_error(&token_action, error))?;
        #[derive(Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
        }
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|error| {
            self.protocol_error(&token_action, format!("the token answer is not json: {error}"))
        })?;
        answer
            .token
            .or(answer.access_token)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| self.protocol_error(&token_action, "the token answer has no token"))
    }

    /// Authenticates up front (GET /v2/), so parallel requests do not all meet the challenge.
    pub(crate) async fn ping(&self) -> Result<()> {
        let url = Url::parse(&self.api_url)
            .map_err(|error| self.protocol_error(&self.api_url, error.to_string()))?;
        let (response, action) = self.send(Method::GET, &url, |request| request).await?;
        // Some registries answer 404 on /v2/ behind proxies; only credentials problems matter here.
        if response.status() == StatusCode::UNAUTHORIZED {
            self.check(&action, response, &[]).await?;
        }
        Ok(())
    }

    /// Whether the repository has the blob.
    pub(crate) async fn blob_exists(&self, digest: &str) -> Result<bool> {
        let url = self.blob_url(digest)?;
        let (response, action) = self.send(Method::HEAD, &url, |request| request).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        self.check(&action, response, &[StatusCode::OK]).await?;
        Ok(true)
    }

    fn location(&self, action: &str, headers: &HeaderMap, base: &Url) -> Result<Url> {
        let location = headers
            .get(LOCATION)
            .and_then(|value| value.to_str().ok())
            .ok_or_else(|| self.protocol_error(action, "it has no Location header"))?;
        base.join(location).map_err(|error| {
            self.protocol_error(action, format!("its Location {location:?} is not a url: {error}"))
        })
    }

    /// Opens an upload session; returns its location.
    pub(crate) async fn start_upload(&self) -> Result<Url> {
        let url = self.url("blobs/uploads/")?;
        let (response, action) = self
            .send(Method::POST, &url, |request| request.header(CONTENT_LENGTH, 0))
            .await?;
        let response = self.check(&action, response, &[StatusCode::ACCEPTED]).await?;
        self.location(&action, response.headers(), &url)
    }

    /// Asks where an upload session stands. `None` when the registry no longer knows it (expired,
    /// cancelled, restarted with another secret) or its offset is ambiguous: start a new one.
    pub(crate) async fn upload_status(&self, location: &Url) -> Result<Option<(Url, u64)>> {
        let (response, action) = self.send(Method::GET, location, |request| request).await?;
        if response.status() != StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let next = self.location(&action, response.headers(), location)?;
        // Range is "0-<last byte>"; "0-0" means 0 or 1 bytes, so it cannot be resumed safely.
        Ok(range_end(response.headers())
            .filter(|end| *end > 0)
            .map(|end| (next, end + 1)))
    }

    /// Sends bytes `offset..offset + length` of an upload as one PATCH; `body` builds the request
    /// body (again, if authentication forces a retry). Returns the session's next location.
    pub(crate) async fn upload_chunk<B>(
        &self,
        location: &Url,
        offset: u64,
        length: u64,
        body: B,
    ) -> Result<Url>
    where
        B: Fn() -> reqwest::Body,
    {
        let last = offset + length.saturating_sub(1);
        let (response, action) = self
            .send(Method::PATCH, location, |request| {
                request
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, length)
                    .header(CONTENT_RANGE, format!("{offset}-{last}"))
                    .body(body())
            })
            .await?;
        let response = self.check(&action, response, &[StatusCode::ACCEPTED]).await?;
        if let Some(end) = range_end(response.headers())
            && end != last
        {
            return Err(self.protocol_error(
                &action,
                format!("after bytes {offset}-{last} it reports having bytes 0-{end}; push again to restart this blob"),
            ));
        }
        self.location(&action, response.headers(), location)
    }

    /// Completes an upload session as the blob `digest`; the registry checks the digest.
    pub(crate) async fn finish_upload(&self, location: &Url, digest: &str) -> Result<()> {
        let mut url = location.clone();
        url.query_pairs_mut().append_pair("digest", digest);
        let (response, action) = self
            .send(Method::PUT, &url, |request| request.header(CONTENT_LENGTH, 0))
            .await?;
        let response = self.check(&action, response, &[StatusCode::CREATED]).await?;
        if let Some(stored) = header_text(response.headers(), DOCKER_CONTENT_DIGEST)
            && stored != digest
        {
            return Err(RegistryError::DigestMismatch {
                what: "blob",
                expected: digest.to_string(),
                actual: stored,
                location: format!("registry {} (Docker-Content-Digest after upload)", self.registry),
            });
        }
        Ok(())
    }

    /// Uploads a manifest or index under `reference` (a tag or digest); the registry must store it
    /// under the digest of exactly these bytes.
    pub(crate) async fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<String> {
        let url = self.url(&format!("manifests/{reference}"))?;
        let body = bytes::Bytes::copy_from_slice(bytes);
        let (response, action) = self
            .send(Method::PUT, &url, |request| {
                request.header(CONTENT_TYPE, media_type).body(body.clone())
            })
            .await?;
        let response = self
            .check(&action, response, &[StatusCode::CREATED, StatusCode::OK])
            .await?;
        let digest = sha256_digest(bytes);
        if let Some(stored) = header_text(response.headers(), DOCKER_CONTENT_DIGEST)
            && stored != digest
        {
            return Err(RegistryError::DigestMismatch {
                what: "manifest",
                expected: digest,
                actual: stored,
                location: format!(
                    "registry {} (Docker-Content-Digest after PUT; it rewrote the manifest)",
                    self.registry
                ),
            });
        }
        Ok(digest)
    }

    /// Fetches a manifest or index by tag or digest, accepting the OCI and Docker schema 2 types.
    pub(crate) async fn get_manifest(&self, reference: &str) -> Result<FetchedManifest> {
        let url = self.url(&format!("manifests/{reference}"))?;
        let accept = [
            MEDIA_TYPE_MANIFEST,
            MEDIA_TYPE_INDEX,
            MEDIA_TYPE_DOCKER_MANIFEST,
            MEDIA_TYPE_DOCKER_MANIFEST_LIST,
        ]
        .join(", ");
        let (response, action) = self
            .send(Method::GET, &url, |request| {
                request.header(ACCEPT, accept.as_str())
            })
            .await?;
        let mut response = self.check(&action, response, &[StatusCode::OK]).await?;
        let content_type = header_text(response.headers(), CONTENT_TYPE.as_str())
            .map(|value| value.split(';').next().unwrap_or_default().trim().to_string());
        let digest_header = header_text(response.headers(), DOCKER_CONTENT_DIGEST);
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|error| self.transport_error(&action, error))?
        {
            bytes.extend_from_slice(&chunk);
            if bytes.len() as u64 > MAX_MANIFEST_SIZE {
                return Err(self.protocol_error(
                    &action,
                    format!(
                        "the manifest is larger than {MAX_MANIFEST_SIZE} bytes; that is not an image manifest"
                    ),
                ));
            }
        }
        Ok(FetchedManifest {
            bytes,
            content_type,
            digest_header,
        })
    }

    /// Deletes the manifest `digest` (and with it every tag naming it). A registry that does not
    /// delete (docker-registry without `storage.delete.enabled`: http 405 `UNSUPPORTED`) gives
    /// [`RegistryError::DeleteUnsupported`].
    pub(crate) async fn delete_manifest(&self, digest: &str) -> Result<()> {
        let url = self.url(&format!("manifests/{digest}"))?;
        let (response, action) = self.send(Method::DELETE, &url, |request| request).await?;
        let status = response.status();
        if status == StatusCode::ACCEPTED || status == StatusCode::OK {
            return Ok(());
        }
        if status == StatusCode::METHOD_NOT_ALLOWED {
            let body = response.bytes().await.unwrap_or_default();
            return Err(RegistryError::DeleteUnsupported {
                registry: self.registry.clone(),
                action,
                message: registry_message(&body),
            });
        }
        self.check(&action, response, &[StatusCode::ACCEPTED, StatusCode::OK])
            .await
            .map(drop)
            .map_err(|error| match error {
                RegistryError::Status { message, action, .. } if message.contains("UNSUPPORTED") => {
                    RegistryError::DeleteUnsupported {
                        registry: self.registry.clone(),
                        action,
                        message,
                    }
                }
                other => other,
            })
    }

    /// Starts downloading a blob; the caller streams and verifies the body.
    pub(crate) async fn get_blob(&self, digest: &str) -> Result<(Response, String)> {
        let url = self.blob_url(digest)?;
        let (response, action) = self.send(Method::GET, &url, |request| request).await?;
        let response = self.check(&action, response, &[StatusCode::OK]).await?;
        Ok((response, action))
    }

    /// The error for a broken download stream.
    pub(crate) fn stream_error(&self, action: &str, error: reqwest::Error) -> RegistryError {
        self.transport_error(action, error)
    }
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(|value| value.trim().to_string())
}

/// The last byte of a `Range: 0-<last>` (or `bytes=0-<last>`) header.
fn range_end(headers: &HeaderMap) -> Option<u64> {
    let text = header_text(headers, RANGE.as_str())?;
    let (_, end) = text.rsplit_once('-')?;
    end.trim().parse().ok()
}

/// The distribution API's `{"errors":[{"code":…,"message":…}]}`, or the start of the body.
fn registry_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    if let Ok(errors) = serde_json::from_slice::<Errors>(body)
        && !errors.errors.is_empty()
    {
        return errors
            .errors
            .iter()
            .map(|entry| format!("{} {}", entry.code, entry.message).trim().to_string())
            .collect::<Vec<_>>()
            .join("; ");
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "no error message".to_string()
    } else {
        text.chars().take(300).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_registry_error_bodies() {
        assert_eq!(
            registry_message(br#"{"errors":[{"code":"DIGEST_INVALID","message":"provided digest did not match uploaded content"}]}"#),
            "DIGEST_INVALID provided digest did not match uploaded content"
        );
        assert_eq!(registry_message(b""), "no error message");
        assert_eq!(registry_message(b"  gateway timeout \n"), "gateway timeout");
    }

    #[test]
    fn reads_range_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(RANGE, HeaderValue::from_static("0-1048575"));
        assert_eq!(range_end(&headers), Some(1_048_575));
        headers.insert(RANGE, HeaderValue::from_static("bytes=0-9"));
        assert_eq!(range_end(&headers), Some(9));
        headers.insert(RANGE, HeaderValue::from_static("nonsense"));
        assert_eq!(range_end(&headers), None);
    }
}
