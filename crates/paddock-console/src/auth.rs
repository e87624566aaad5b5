//! Authentication: who is calling. Every request but the health probes must be authenticated.
//!
//! Two modes ([`Authentication`]):
//! - Local: the access token `paddock serve` printed at start (like Jupyter: no unauthenticated
//!   access, even on 127.0.0.1, because any local process or web page could otherwise drive the
//!   VMs). The caller is [`Caller::TokenHolder`].
//! - Kubernetes: the caller is a Kubernetes user ([`Caller::User`]), named by a TokenReview of the
//!   bearer token they present or by an authenticating proxy's identity headers
//!   ([`crate::kubernetes::Authenticator`]); the backend then acts as that user.
//!
//! Contract:
//! - Tokens are 32 bytes from the operating system's CSPRNG, written as 64 lowercase hex digits.
//! - A request carries it as `Authorization: Bearer <token>` or, for websockets and links (a
//!   browser cannot set headers on a websocket), as the `token` query parameter.
//! - Comparison is constant time, so response timing does not reveal how much of a guess was
//!   right.

use subtle::ConstantTimeEq;

/// Bytes of randomness in a generated token.
const TOKEN_BYTES: usize = 32;

/// Errors from token handling.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The operating system gave no random bytes.
    #[error("cannot generate an access token: the operating system's random number generator failed ({0})")]
    Random(String),
    /// A token given from outside is unusable.
    #[error("the access token must be at least 16 visible ASCII characters without spaces")]
    Weak,
}

/// The secret that grants access to the API. `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(String);

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("AccessToken(<redacted>)")
    }
}

impl AccessToken {
    /// A new random token.
    pub fn generate() -> Result<AccessToken, TokenError> {
        let mut bytes = [0_u8; TOKEN_BYTES];
        getrandom::fill(&mut bytes).map_err(|error| TokenError::Random(error.to_string()))?;
        Ok(AccessToken(
            bytes.iter().map(|byte| format!("{byte:02x}")).collect(),
        ))
    }

    /// A token chosen by the caller (e.g. a test or a deployment secret); refused when short or
    /// when it holds characters that do not survive a URL or a header unescaped.
    pub fn from_secret(secret: impl Into<String>) -> Result<AccessToken, TokenError> {
        let secret = secret.into();
        let usable = secret.len() >= 16
            && secret
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~'));
        if usable {
            Ok(AccessToken(secret))
        } else {
            Err(TokenError::Weak)
        }
    }

    /// The token's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `candidate` is this token, in time independent of where they differ.
    pub fn matches(&self, candidate: &str) -> bool {
        bool::from(self.0.as_bytes().ct_eq(candidate.as_bytes()))
    }
}

/// The prefix of the websocket subprotocol that carries a bearer token (base64url, unpadded) where
/// a browser cannot set headers: Kubernetes' own convention, which KubeVirt's and Baffles' clients
/// use.
pub const BEARER_SUBPROTOCOL_PREFIX: &str = "base64url.bearer.authorization.k8s.io.";

/// Who made a request, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Whoever holds the local access token: may do everything.
    TokenHolder,
    /// A Kubernetes user; the backend acts as them.
    User(std::sync::Arc<crate::backend::UserInfo>),
}

/// How requests are authenticated.
#[derive(Clone)]
pub enum Authentication {
    /// The local access token.
    Token(AccessToken),
    /// Kubernetes users (TokenReview, or a trusted authenticating proxy).
    Kubernetes(std::sync::Arc<crate::kubernetes::Authenticator>),
}

impl std::fmt::Debug for Authentication {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Authentication::Token(_) => formatter.write_str("Authentication::Token(<redacted>)"),
            Authentication::Kubernetes(_) => formatter.write_str("Authentication::Kubernetes"),
        }
    }
}

/// Why a request was not authenticated (answered with 401).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What was wrong and what to do.
    pub message: String,
}

impl Authentication {
    /// The caller of a request with `headers` and `query`, or why it is refused.
    pub async fn authenticate(
        &self,
        headers: &axum::http::HeaderMap,
        query: Option<&str>,
    ) -> Result<Caller, Refusal> {
        match self {
            Authentication::Token(token) => match presented_token(headers, query) {
                Some(presented) if token.matches(&presented) => Ok(Caller::TokenHolder),
                Some(_) => Err(Refusal {
                    message: "the access token is wrong: use the token `paddock serve` printed at start (it is also in serve.json in its state directory; a restart makes a new one)".to_string(),
                }),
                None => Err(Refusal {
                    message: "this API needs the access token `paddock serve` printed at start: send `Authorization: Bearer <token>` or add `?token=<token>` to the URL".to_string(),
                }),
            },
            Authentication::Kubernetes(authenticator) => authenticator
                .authenticate(headers, query)
                .await
                .map(|user| Caller::User(std::sync::Arc::new(user))),
        }
    }
}

impl Authentication {
    /// A session for `caller` (`POST /api/v1/session`): in Kubernetes mode a console session
    /// token that stands for the user (see [`crate::kubernetes::Authenticator::issue_session`]);
    /// locally the access token itself, which is all there is.
    pub fn issue_session(&self, caller: &Caller) -> Result<serde_json::Value, Refusal> {
        match (self, caller) {
            (Authentication::Token(token), _) => Ok(serde_json::json!({
                "token": token.as_str(),
                "user": {"username": TOKEN_HOLDER, "groups": []},
            })),
            (Authentication::Kubernetes(authenticator), Caller::User(user)) => {
                serde_json::to_value(authenticator.issue_session(user)?).map_err(|error| Refusal {
                    message: format!("cannot encode the session: {error}"),
                })
            }
            (Authentication::Kubernetes(_), Caller::TokenHolder) => Err(Refusal {
                message: "sign in with a Kubernetes token".to_string(),
            }),
        }
    }
}

/// How the holder of the local access token is named.
pub const TOKEN_HOLDER: &str = "paddock-serve-token-holder";

/// The token a request presents: the bearer token of its `Authorization` header, else its
/// `token` query parameter, else a `base64url.bearer.authorization.k8s.io.<token>` websocket
/// subprotocol.
pub fn presented_token(headers: &axum::http::HeaderMap, query: Option<&str>) -> Option<String> {
    let from_header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, token) = value.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_string())
        });
    from_header
        .or_else(|| {
            query?.split('&').find_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                (key == "token").then(|| percent_decode(value))
            })
        })
        .or_else(|| subprotocol_token(headers))
}

/// The bearer token of a `base64url.bearer.authorization.k8s.io.<token>` websocket subprotocol.
fn subprotocol_token(headers: &axum::http::HeaderMap) -> Option<String> {
    use base64::Engine as _;
    headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find_map(|protocol| {
            let encoded = protocol.trim().strip_prefix(BEARER_SUBPROTOCOL_PREFIX)?;
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(encoded.trim_end_matches('='))
                .ok()?;
            String::from_utf8(bytes).ok()
        })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let hex = |offset: usize| {
            bytes
                .get(index + offset)
                .and_then(|byte| char::from(*byte).to_digit(16))
        };
        match (bytes[index], hex(1), hex(2)) {
            (b'%', Some(high), Some(low)) => {
                decoded.push(u8::try_from(high * 16 + low).unwrap_or(b'?'));
                index += 3;
            }
            (b'+', _, _) => {
                decoded.push(b' ');
                index += 1;
            }
            (byte, _, _) => {
                decoded.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue, header::AUTHORIZATION};

    #[test]
    fn generated_tokens_are_long_random_hex() {
        let first = AccessToken::generate().unwrap();
        let second = AccessToken::generate().unwrap();
        assert_eq!(first.as_str().len(), 64);
        assert!(first.as_str().bytes().all(|byte| byte.is_ascii_hexdigit()));
        assert_ne!(first, second);
        assert!(!format!("{first:?}").contains(first.as_str()));
    }

    #[test]
    fn matching_is_exact() {
        let token = AccessToken::from_secret("0123456789abcdef-token").unwrap();
        assert!(token.matches("0123456789abcdef-token"));
        assert!(!token.matches("0123456789abcdef-toke"));
        assert!(!token.matches("0123456789abcdef-tokeN"));
        assert!(!token.matches(""));
        assert!(AccessToken::from_secret("short").is_err());
        assert!(AccessToken::from_secret("has spaces in it, long").is_err());
    }

    #[test]
    fn tokens_come_from_header_or_query() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            presented_token(&headers, Some("a=1&token=abc%2Dd")),
            Some("abc-d".into())
        );
        assert_eq!(presented_token(&headers, Some("tokens=x")), None);
        assert_eq!(presented_token(&headers, None), None);
        headers.insert(AUTHORIZATION, HeaderValue::from_static("bearer  xyz "));
        assert_eq!(presented_token(&headers, Some("token=abc")), Some("xyz".into()));
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Basic xyz"));
        assert_eq!(presented_token(&headers, Some("token=abc")), Some("abc".into()));
    }

    #[test]
    fn tokens_come_from_the_kubernetes_websocket_subprotocol() {
        let mut headers = HeaderMap::new();
        // base64url("secret-token") without padding.
        headers.insert(
            axum::http::header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(
                "plain.kubevirt.io, base64url.bearer.authorization.k8s.io.c2VjcmV0LXRva2Vu",
            ),
        );
        assert_eq!(presented_token(&headers, None), Some("secret-token".into()));
    }
}
