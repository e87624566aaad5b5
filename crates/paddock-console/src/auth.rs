//! Access tokens: every request but the health probes must carry the token `paddock serve`
//! printed at start (like Jupyter: no unauthenticated access, even on 127.0.0.1, because any
//! local process or web page could otherwise drive the VMs).
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

/// The token a request presents: the bearer token of its `Authorization` header, else its
/// `token` query parameter.
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
    from_header.or_else(|| {
        query?.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            (key == "token").then(|| percent_decode(value))
        })
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
}
