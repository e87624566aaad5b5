//! Who a request comes from in Kubernetes mode: a TokenReview of the bearer token it carries, or
//! the identity headers of a trusted authenticating proxy.
//!
//! Contract:
//! - Bearer tokens (the `Authorization` header, the `token` query parameter for websockets, or
//!   the `base64url.bearer.authorization.k8s.io.<token>` websocket subprotocol) are reviewed by
//!   the API server (TokenReview, with the console's own credentials, which need `create
//!   tokenreviews`). The console never uses the token itself: it acts as the reviewed user by
//!   impersonation. A review is cached for [`REVIEW_LIFETIME`] under the token's SHA-256 (the
//!   token itself is not kept); a refusal for [`REFUSAL_LIFETIME`].
//! - Identity headers are believed **only** when [`ProxyHeaders`] are configured. Then whoever
//!   can reach the console directly can claim any identity, so the console must be reachable
//!   only through that proxy (a NetworkPolicy allowing only the proxy's pods, or the proxy in the
//!   same pod on loopback), and the proxy must remove these headers from the requests it
//!   forwards before setting its own (oauth2-proxy, Pomerium and Envoy's ext_authz do).
//!   Groups come from every value of the groups header, each split at commas.
//! - Sign-in sessions: [`Authenticator::issue_session`] turns an authenticated user into a
//!   console session token (`pds1.<claims>.<HMAC-SHA256>`, base64url; the claims are the user,
//!   groups and expiry, [`SESSION_LIFETIME`] from issue). A browser keeps only that token, which
//!   the API server would not accept: no cluster credential stays in the browser (the claims are
//!   only signed, not encrypted: they name the user and groups, which the user may see). The key
//!   ([`SessionKey`]) comes from a file shared by every replica (`--session-key-file`, a mounted
//!   Secret), so any replica accepts a session another issued and sessions survive restarts;
//!   without one it is random per process (sessions end with the process and are valid at that
//!   replica only). A session keeps the groups it was issued with until it expires; RBAC still
//!   applies to them on every request.
//! - Refusals say what to send; they never echo a token.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName};
use hmac::{Hmac, Mac};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};

use crate::auth::{Refusal, presented_token};
use crate::backend::UserInfo;

/// How long a successful TokenReview is reused.
pub const REVIEW_LIFETIME: Duration = Duration::from_secs(60);
/// How long a refused token stays refused without asking again.
pub const REFUSAL_LIFETIME: Duration = Duration::from_secs(10);
/// How many reviews are kept before the cache is cleared.
const MAX_REVIEWS: usize = 10_000;
/// How long a console session token is valid.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(8 * 60 * 60);
/// The prefix of console session tokens.
const SESSION_PREFIX: &str = "pds1.";

/// Bytes of secret material a session key file must hold at least.
pub const SESSION_KEY_MIN_BYTES: usize = 32;

/// Why a session key cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum SessionKeyError {
    /// The key file cannot be read.
    #[error(
        "cannot read the session key file {path}: {source}; mount the Secret holding it (the chart creates <release>-console-session) or leave --session-key-file out for a key of this process only"
    )]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key file holds too little secret material.
    #[error(
        "the session key in {path} is {length} bytes long: use at least {SESSION_KEY_MIN_BYTES} random bytes (e.g. `head -c 48 /dev/urandom | base64 -w0`)"
    )]
    TooShort {
        /// The file.
        path: std::path::PathBuf,
        /// Its length without surrounding whitespace.
        length: usize,
    },
    /// The operating system gave no random bytes.
    #[error("cannot generate a session key: the operating system's random number generator failed ({0})")]
    Random(String),
}

/// The key console session tokens are signed with (HMAC-SHA256). Consoles with the same key accept
/// each other's sessions. `Debug` does not print it.
#[derive(Clone)]
pub struct SessionKey([u8; 32]);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("SessionKey(<redacted>)")
    }
}

impl SessionKey {
    /// A random key, for one process.
    pub fn generate() -> Result<SessionKey, SessionKeyError> {
        let mut key = [0_u8; 32];
        getrandom::fill(&mut key).map_err(|error| SessionKeyError::Random(error.to_string()))?;
        Ok(SessionKey(key))
    }

    /// The key in `path` (e.g. a mounted Secret): any text or bytes, at least
    /// [`SESSION_KEY_MIN_BYTES`] long without surrounding whitespace, hashed into the signing key
    /// (so its encoding does not matter, and a trailing newline neither).
    pub fn from_file(path: &std::path::Path) -> Result<SessionKey, SessionKeyError> {
        let material = std::fs::read(path).map_err(|source| SessionKeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let material = material.trim_ascii();
        if material.len() < SESSION_KEY_MIN_BYTES {
            return Err(SessionKeyError::TooShort {
                path: path.to_path_buf(),
                length: material.len(),
            });
        }
        let mut hasher = Sha256::new();
        // Domain separation: the same secret used elsewhere gives an unrelated key here.
        hasher.update(b"paddock console session key v1\n");
        hasher.update(material);
        Ok(SessionKey(hasher.finalize().into()))
    }
}

/// What a session token vouches for.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SessionClaims {
    /// The user.
    user: UserInfo,
    /// Expiry, seconds since the Unix epoch.
    expires: u64,
}

/// A console session: the token to send from now on and when it expires.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    /// The console session token (`Authorization: Bearer`, or `?token=` on websockets).
    pub token: String,
    /// When it expires, seconds since the Unix epoch.
    pub expires: u64,
    /// Who it is for.
    pub user: UserInfo,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// The identity headers of an authenticating proxy in front of the console (for OIDC setups).
/// See the module documentation for what trusting them requires.
#[derive(Debug, Clone)]
pub struct ProxyHeaders {
    /// The header naming the user, e.g. `X-Forwarded-User`.
    pub user: HeaderName,
    /// The header naming the user's groups, e.g. `X-Forwarded-Groups`.
    pub groups: Option<HeaderName>,
}

impl ProxyHeaders {
    /// Proxy headers from their names, e.g. `X-Forwarded-User` and `X-Forwarded-Groups`.
    pub fn new(user: &str, groups: Option<&str>) -> Result<ProxyHeaders, String> {
        let parse = |name: &str| {
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{name:?} is not a valid HTTP header name"))
        };
        Ok(ProxyHeaders {
            user: parse(user)?,
            groups: groups.map(parse).transpose()?,
        })
    }
}

/// Authenticates Kubernetes users; see the module documentation.
pub struct Authenticator {
    client: kube::Client,
    proxy: Option<ProxyHeaders>,
    session_key: [u8; 32],
    reviews: Mutex<HashMap<[u8; 32], Review>>,
}

/// A cached review: the user, or why the token was refused, and when it was asked.
type Review = (Result<UserInfo, String>, Instant);

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Authenticator")
            .field("proxy", &self.proxy)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// An authenticator reviewing tokens with `client` (the console's own credentials) and, when
    /// `proxy` is set, believing those identity headers.
    /// Sessions are signed with a key of this process only.
    pub fn new(client: kube::Client, proxy: Option<ProxyHeaders>) -> Authenticator {
        let session_key = SessionKey::generate().map_or_else(
            |error| {
                // Without randomness no session can be trusted: an all-zero key is never used,
                // because issuing and checking refuse it.
                tracing::error!(%error, "no randomness for the session key; sign-in sessions are disabled");
                [0_u8; 32]
            },
            |key| key.0,
        );
        Authenticator {
            client,
            proxy,
            session_key,
            reviews: Mutex::new(HashMap::new()),
        }
    }

    /// Like [`Authenticator::new`], signing sessions with `key`: every console with the same key
    /// accepts them.
    pub fn with_session_key(
        client: kube::Client,
        proxy: Option<ProxyHeaders>,
        key: SessionKey,
    ) -> Authenticator {
        Authenticator {
            client,
            proxy,
            session_key: key.0,
            reviews: Mutex::new(HashMap::new()),
        }
    }

    /// The user a request comes from, or why it is refused.
    pub async fn authenticate(&self, headers: &HeaderMap, query: Option<&str>) -> Result<UserInfo, Refusal> {
        if let Some(proxy) = &self.proxy
            && let Some(user) = proxy_user(proxy, headers)
        {
            return Ok(user);
        }
        let Some(token) = presented_token(headers, query) else {
            return Err(Refusal {
                message: "sign in with a Kubernetes bearer token (e.g. `kubectl create token <service-account>` or your OIDC id token): send `Authorization: Bearer <token>`, or `?token=<token>` on websockets".to_string(),
            });
        };
        if let Some(claims) = token.strip_prefix(SESSION_PREFIX) {
            return self.check_session(claims);
        }
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Ok(reviews) = self.reviews.lock()
            && let Some((outcome, at)) = reviews.get(&key)
        {
            let lifetime = if outcome.is_ok() {
                REVIEW_LIFETIME
            } else {
                REFUSAL_LIFETIME
            };
            if at.elapsed() < lifetime {
                return outcome.clone().map_err(|message| Refusal { message });
            }
        }
        let outcome = self.review(token).await?;
        if let Ok(mut reviews) = self.reviews.lock() {
            if reviews.len() >= MAX_REVIEWS {
                reviews.clear();
            }
            reviews.insert(key, (outcome.clone(), Instant::now()));
        }
        outcome.map_err(|message| Refusal { message })
    }

    /// A console session token for `user`, valid for [`SESSION_LIFETIME`].
    pub fn issue_session(&self, user: &UserInfo) -> Result<Session, Refusal> {
        use base64::Engine as _;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let claims = SessionClaims {
            user: user.clone(),
            expires: unix_now() + SESSION_LIFETIME.as_secs(),
        };
        let encoded = engine.encode(serde_json::to_vec(&claims).map_err(|error| Refusal {
            message: format!("cannot encode the session: {error}"),
        })?);
        let signature = engine.encode(self.mac(encoded.as_bytes())?.finalize().into_bytes());
        Ok(Session {
            token: format!("{SESSION_PREFIX}{encoded}.{signature}"),
            expires: claims.expires,
            user: claims.user,
        })
    }

    fn mac(&self, claims: &[u8]) -> Result<Hmac<Sha256>, Refusal> {
        if self.session_key == [0_u8; 32] {
            return Err(Refusal {
                message: "sign-in sessions are disabled (no randomness for their key); send the Kubernetes token itself".to_string(),
            });
        }
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.session_key).map_err(|error| Refusal {
            message: format!("cannot key the session signature: {error}"),
        })?;
        mac.update(claims);
        Ok(mac)
    }

    fn check_session(&self, token: &str) -> Result<UserInfo, Refusal> {
        use base64::Engine as _;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let refused = || {
            Refusal {
            message: "the console session is not valid (it expired, or the console's session key changed): sign in again with a Kubernetes token".to_string(),
        }
        };
        let (claims, signature) = token.split_once('.').ok_or_else(refused)?;
        let signature = engine.decode(signature).map_err(|_| refused())?;
        self.mac(claims.as_bytes())?
            .verify_slice(&signature)
            .map_err(|_| refused())?;
        let claims: SessionClaims =
            serde_json::from_slice(&engine.decode(claims).map_err(|_| refused())?).map_err(|_| refused())?;
        if claims.expires <= unix_now() {
            return Err(refused());
        }
        Ok(claims.user)
    }

    /// Reviews `token`: Ok(Ok(user)), Ok(Err(why not)) when the API server refused it, Err when
    /// the review itself failed (not cached).
    async fn review(&self, token: String) -> Result<Result<UserInfo, String>, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token),
                ..TokenReviewSpec::default()
            },
            ..TokenReview::default()
        };
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let answered = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|error| Refusal {
                message: format!(
                    "cannot check the token with the Kubernetes API server: {error}; try again, and if it persists check that the console's service account may `create tokenreviews`"
                ),
            })?;
        let status = answered.status.unwrap_or_default();
        if !status.authenticated.unwrap_or(false) {
            let why = status.error.unwrap_or_else(|| "no reason given".to_string());
            return Ok(Err(format!(
                "the Kubernetes API server did not accept the token ({why}); sign in again with a valid token"
            )));
        }
        let Some(user) = status.user else {
            return Ok(Err(
                "the Kubernetes API server accepted the token but named no user".to_string(),
            ));
        };
        Ok(Ok(UserInfo {
            username: user.username.unwrap_or_default(),
            uid: user.uid.filter(|uid| !uid.is_empty()),
            groups: user.groups.unwrap_or_default(),
            extra: user.extra.unwrap_or_default().into_iter().collect(),
        }))
    }
}

/// The user named by the proxy's headers, when the user header is present and not empty.
fn proxy_user(proxy: &ProxyHeaders, headers: &HeaderMap) -> Option<UserInfo> {
    let username = headers.get(&proxy.user)?.to_str().ok()?.trim().to_string();
    if username.is_empty() {
        return None;
    }
    let groups = proxy
        .groups
        .as_ref()
        .map(|name| {
            headers
                .get_all(name)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .flat_map(|value| value.split(','))
                .map(str::trim)
                .filter(|group| !group.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    Some(UserInfo {
        username,
        uid: None,
        groups,
        extra: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[tokio::test]
    async fn sessions_are_signed_by_this_console_only() {
        let config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
        let authenticator = Authenticator::new(kube::Client::try_from(config).unwrap(), None);
        let user = UserInfo {
            username: "alice".into(),
            uid: None,
            groups: vec!["dev".into()],
            extra: Default::default(),
        };
        let session = authenticator.issue_session(&user).unwrap();
        assert!(session.token.starts_with(SESSION_PREFIX));
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {}", session.token)).unwrap(),
        );
        assert_eq!(authenticator.authenticate(&headers, None).await.unwrap(), user);
        // Another console (another key) does not accept it, nor does a changed claim.
        let config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
        let other = Authenticator::new(kube::Client::try_from(config).unwrap(), None);
        assert!(other.authenticate(&headers, None).await.is_err());
        let claims = session.token.strip_prefix(SESSION_PREFIX).unwrap();
        let (_, signature) = claims.split_once('.').unwrap();
        let forged = {
            use base64::Engine as _;
            let claims = SessionClaims {
                user: UserInfo {
                    username: "admin".into(),
                    ..user.clone()
                },
                expires: unix_now() + 60,
            };
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap())
        };
        assert!(
            authenticator
                .check_session(&format!("{forged}.{signature}"))
                .is_err()
        );
    }

    #[tokio::test]
    async fn consoles_with_the_same_key_file_accept_each_others_sessions() {
        let directory = paddock_tests::qemu::ScratchDirectory::new("session-key").unwrap();
        let key_file = directory.path().join("key");
        std::fs::write(&key_file, "dGhpcyBpcyBhIHRlc3Qga2V5IHdpdGggZW5vdWdoIGJ5dGVz\n").unwrap();
        let console = |key: SessionKey| {
            let config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
            Authenticator::with_session_key(kube::Client::try_from(config).unwrap(), None, key)
        };
        let first = console(SessionKey::from_file(&key_file).unwrap());
        let second = console(SessionKey::from_file(&key_file).unwrap());
        let user = UserInfo {
            username: "alice".into(),
            uid: None,
            groups: vec!["dev".into()],
            extra: Default::default(),
        };
        let session = first.issue_session(&user).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {}", session.token)).unwrap(),
        );
        assert_eq!(second.authenticate(&headers, None).await.unwrap(), user);
        // A different key file, or a per-process key, does not accept it.
        std::fs::write(&key_file, "another key, also long enough to be accepted here").unwrap();
        let third = console(SessionKey::from_file(&key_file).unwrap());
        assert!(third.authenticate(&headers, None).await.is_err());
        let config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
        let random = Authenticator::new(kube::Client::try_from(config).unwrap(), None);
        assert!(random.authenticate(&headers, None).await.is_err());
        // Short or missing key files are refused with what to do.
        std::fs::write(&key_file, "short\n").unwrap();
        let error = SessionKey::from_file(&key_file).unwrap_err().to_string();
        assert!(error.contains("at least 32 random bytes"), "{error}");
        let error = SessionKey::from_file(&directory.path().join("absent"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("mount the Secret"), "{error}");
        assert!(!format!("{:?}", SessionKey::generate().unwrap()).contains('['));
    }

    #[test]
    fn proxy_headers_name_the_user_and_groups() {
        let proxy = ProxyHeaders {
            user: HeaderName::from_static("x-forwarded-user"),
            groups: Some(HeaderName::from_static("x-forwarded-groups")),
        };
        let mut headers = HeaderMap::new();
        assert_eq!(proxy_user(&proxy, &headers), None);
        headers.insert("x-forwarded-user", HeaderValue::from_static(" alice "));
        headers.append("x-forwarded-groups", HeaderValue::from_static("dev, ops"));
        headers.append("x-forwarded-groups", HeaderValue::from_static("admins"));
        let user = proxy_user(&proxy, &headers).unwrap();
        assert_eq!(user.username, "alice");
        assert_eq!(user.groups, ["dev", "ops", "admins"]);
    }
}
