//! Registry credentials and authentication challenges.
//!
//! Role: find the username and password for a registry the way the docker CLI does, and parse the
//! `WWW-Authenticate` challenge a registry answers http 401 with.
//!
//! Contract, in order of precedence:
//! 1. credentials the caller passes ([`RegistryOptions::credentials`], the CLI's `--username` /
//!    `--password-stdin`);
//! 2. `config.json` in [`RegistryOptions::docker_config_dir`], else `$DOCKER_CONFIG`, else
//!    `~/.docker`: `credHelpers.<registry>` (runs `docker-credential-<name> get`), then
//!    `auths.<registry>` (`auth` = base64 `user:password`, or `username` + `password`), then
//!    `credsStore` (runs `docker-credential-<name> get`);
//! 3. none: the registry is accessed anonymously.
//!
//! `auths` keys are matched by host (`https://host/v1/` and `host` are the same), and Docker Hub's
//! aliases (`docker.io`, `index.docker.io`, `registry-1.docker.io`) are one registry. Identity and
//! registry tokens (OAuth logins) are refused with a clear error rather than half supported.
//!
//! [`RegistryOptions::credentials`]: super::RegistryOptions::credentials
//! [`RegistryOptions::docker_config_dir`]: super::RegistryOptions::docker_config_dir

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use serde::Deserialize;

/// A username and password for a registry. `Debug` never prints the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The username.
    pub username: String,
    /// The password (or an access token used as a password).
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why credentials for a registry could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// `config.json` exists but cannot be read.
    #[error(
        "cannot read docker config {path}: {source}; fix its permissions or point DOCKER_CONFIG elsewhere"
    )]
    ReadConfig {
        /// The config file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON of the expected shape.
    #[error("cannot parse docker config {path}: {source}; fix the file or run docker login again")]
    ParseConfig {
        /// The config file.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// An `auths` entry is unusable.
    #[error(
        "the auths entry for {registry} in {path} is unusable: {reason}; run docker login {registry} again"
    )]
    BadEntry {
        /// The config file.
        path: PathBuf,
        /// The registry.
        registry: String,
        /// What is wrong.
        reason: String,
    },
    /// The config names a credential helper that is not installed.
    #[error(
        "the docker config names credential helper {program} for {registry}, but it is not on PATH; install it, \
         remove it from the docker config, or pass --username/--password-stdin"
    )]
    HelperMissing {
        /// The helper program (`docker-credential-<name>`).
        program: String,
        /// The registry.
        registry: String,
    },
    /// The credential helper failed.
    #[error(
        "credential helper {program} failed for {registry}: {message}; check the helper or pass --username/--password-stdin"
    )]
    HelperFailed {
        /// The helper program.
        program: String,
        /// The registry.
        registry: String,
        /// What it said (or why it could not be run).
        message: String,
    },
    /// The stored credential is an OAuth identity or registry token, which paddock does not use.
    #[error(
        "the stored credential for {registry} is an {kind}, which paddock does not support; \
         pass --username/--password-stdin (a password or personal access token)"
    )]
    UnsupportedToken {
        /// The registry.
        registry: String,
        /// `identity token` or `registry token`.
        kind: &'static str,
    },
}

/// Credentials for a registry and where they came from (quoted when the registry rejects them).
#[derive(Debug, Clone)]
pub(crate) struct ResolvedCredentials {
    /// The credentials, if any were found.
    pub(crate) credentials: Option<Credentials>,
    /// Where they came from, or where paddock looked.
    pub(crate) origin: String,
}

/// `config.json` as far as paddock reads it.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

/// The directory holding `config.json`: `explicit`, else `$DOCKER_CONFIG`, else `$HOME/.docker`.
pub(crate) fn docker_config_dir(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(directory) = explicit {
        return Some(directory.to_path_buf());
    }
    if let Some(directory) = std::env::var_os("DOCKER_CONFIG").filter(|value| !value.is_empty()) {
        return Some(PathBuf::from(directory));
    }
    std::env::var_os("HOME")
        .filter(|value| !value.is_empty())
        .map(|home| PathBuf::from(home).join(".docker"))
}

/// Docker Hub's aliases collapse to `docker.io`; other hosts are compared as written.
fn canonical_host(host: &str) -> &str {
    match host {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => "docker.io",
        other => other,
    }
}

/// The registry host an `auths` key names (`https://host:5000/v1/` -> `host:5000`).
fn key_host(key: &str) -> &str {
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = without_scheme.split('/').next().unwrap_or(without_scheme);
    canonical_host(host)
}

/// The server name credential helpers store Docker Hub under, and any other registry as itself.
fn helper_server_name(registry: &str) -> String {
    if canonical_host(registry) == "docker.io" {
        "https://index.docker.io/v1/".to_string()
    } else {
        registry.to_string()
    }
}

/// Looks up credentials for `registry` (as written in an image reference, e.g. `127.0.0.1:5000`
/// or `docker.io`) in the docker config directory `directory`. Blocking: it may run a helper.
pub(crate) fn lookup(directory: &Path, registry: &str) -> Result<ResolvedCredentials, CredentialsError> {
    let path = directory.join("config.json");
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(ResolvedCredentials {
                credentials: None,
                origin: format!("{} (not found)", path.display()),
            });
        }
        Err(source) => return Err(CredentialsError::ReadConfig { path, source }),
    };
    let config: DockerConfig =
        serde_json::from_slice(&text).map_err(|source| CredentialsError::ParseConfig {
            path: path.clone(),
            source,
        })?;
    let host = canonical_host(registry);

    if let Some(helper) = config
        .cred_helpers
        .iter()
        .find_map(|(key, helper)| (key_host(key) == host).then_some(helper))
    {
        return run_helper(helper, registry);
    }
    if let Some(entry) = config
        .auths
        .iter()
        .find_map(|(key, entry)| (key_host(key) == host).then_some(entry))
    {
        let bad = |reason: &str| CredentialsError::BadEntry {
            path: path.clone(),
            registry: registry.to_string(),
            reason: reason.to_string(),
        };
        if entry
            .identitytoken
            .as_deref()
            .is_some_and(|token| !token.is_empty())
        {
            return Err(CredentialsError::UnsupportedToken {
                registry: registry.to_string(),
                kind: "identity token",
            });
        }
        if entry
            .registrytoken
            .as_deref()
            .is_some_and(|token| !token.is_empty())
        {
            return Err(CredentialsError::UnsupportedToken {
                registry: registry.to_string(),
                kind: "registry token",
            });
        }
        let credentials = match (&entry.auth, &entry.username, &entry.password) {
            (Some(auth), _, _) if !auth.is_empty() => {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|_| bad("its auth field is not base64"))?;
                let decoded =
                    String::from_utf8(decoded).map_err(|_| bad("its auth field is not utf-8 text"))?;
                let (username, password) = decoded
                    .split_once(':')
                    .ok_or_else(|| bad("its auth field does not decode to username:password"))?;
                Some(Credentials {
                    username: username.to_string(),
                    password: password.to_string(),
                })
            }
            (_, Some(username), Some(password)) => Some(Credentials {
                username: username.clone(),
                password: password.clone(),
            }),
            // An empty entry is what docker writes next to a credsStore; fall through to it.
            _ => None,
        };
        if let Some(credentials) = credentials {
            return Ok(ResolvedCredentials {
                credentials: Some(credentials),
                origin: format!("{} (auths)", path.display()),
            });
        }
    }
    if let Some(store) = config.creds_store.as_deref().filter(|store| !store.is_empty()) {
        return run_helper(store, registry);
    }
    Ok(ResolvedCredentials {
        credentials: None,
        origin: format!("{} (no entry for {registry})", path.display()),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperAnswer {
    username: String,
    secret: String,
}

/// Runs `docker-credential-<helper> get` with the server name on stdin (the docker credential
/// helper protocol). "credentials not found" is not an error: the registry is then anonymous.
fn run_helper(helper: &str, registry: &str) -> Result<ResolvedCredentials, CredentialsError> {
    let program = format!("docker-credential-{helper}");
    let failed = |message: String| CredentialsError::HelperFailed {
        program: program.clone(),
        registry: registry.to_string(),
        message,
    };
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                CredentialsError::HelperMissing {
                    program: program.clone(),
                    registry: registry.to_string(),
                }
            } else {
                failed(error.to_string())
            }
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(helper_server_name(registry).as_bytes())
            .map_err(|error| failed(format!("cannot write to it: {error}")))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|error| failed(error.to_string()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let said = format!(
            "{}{}",
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        if said.to_ascii_lowercase().contains("credentials not found") {
            return Ok(ResolvedCredentials {
                credentials: None,
                origin: format!("{program} (no credentials stored for {registry})"),
            });
        }
        return Err(failed(format!("it exited with {}: {said}", output.status)));
    }
    let answer: HelperAnswer = serde_json::from_str(&stdout)
        .map_err(|error| failed(format!("its answer is not the expected json: {error}")))?;
    if answer.username == "<token>" {
        return Err(CredentialsError::UnsupportedToken {
            registry: registry.to_string(),
            kind: "identity token",
        });
    }
    Ok(ResolvedCredentials {
        credentials: Some(Credentials {
            username: answer.username,
            password: answer.secret,
        }),
        origin: program,
    })
}

/// A parsed `WWW-Authenticate` challenge: the scheme (lowercase) and its parameters (keys
/// lowercase).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Challenge {
    /// `basic` or `bearer`.
    pub(crate) scheme: String,
    /// `realm`, `service`, `scope`, ...
    pub(crate) parameters: BTreeMap<String, String>,
}

/// Parses the first challenge of a `WWW-Authenticate` value such as
/// `Bearer realm="https://auth.example/token",service="registry",scope="repository:a/b:pull,push"`
/// (quoted values may contain commas).
pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(char::is_whitespace).unwrap_or((header, ""));
    if scheme.is_empty() {
        return None;
    }
    let mut parameters = BTreeMap::new();
    let mut characters = rest.chars().peekable();
    loop {
        while characters.next_if(|c| c.is_whitespace() || *c == ',').is_some() {}
        let mut key = String::new();
        while let Some(c) = characters.next_if(|c| *c != '=' && *c != ',' && !c.is_whitespace()) {
            key.push(c);
        }
        if key.is_empty() {
            break;
        }
        while characters.next_if(|c| c.is_whitespace()).is_some() {}
        if characters.next_if_eq(&'=').is_none() {
            // A second challenge starts here ("Basic realm=..., Bearer ..."); keep the first.
            break;
        }
        while characters.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if characters.next_if_eq(&'"').is_some() {
            while let Some(c) = characters.next() {
                match c {
                    '\\' => value.extend(characters.next()),
                    '"' => break,
                    other => value.push(other),
                }
            }
        } else {
            while let Some(c) = characters.next_if(|c| *c != ',') {
                value.push(c);
            }
            value = value.trim().to_string();
        }
        parameters.insert(key.to_ascii_lowercase(), value);
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        parameters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges_with_commas_in_quotes() {
        let challenge = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/debian:pull,push""#,
        )
        .unwrap();
        assert_eq!(challenge.scheme, "bearer");
        assert_eq!(challenge.parameters["realm"], "https://auth.docker.io/token");
        assert_eq!(challenge.parameters["service"], "registry.docker.io");
        assert_eq!(
            challenge.parameters["scope"],
            "repository:library/debian:pull,push"
        );
        let basic = parse_challenge(r#"Basic realm="basic-realm""#).unwrap();
        assert_eq!(basic.scheme, "basic");
        assert_eq!(basic.parameters["realm"], "basic-realm");
        assert_eq!(parse_challenge("").map(|c| c.scheme), None);
    }

    #[test]
    fn matches_auths_keys_by_host_and_docker_hub_aliases() {
        assert_eq!(key_host("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(key_host("registry-1.docker.io"), "docker.io");
        assert_eq!(key_host("http://127.0.0.1:5000"), "127.0.0.1:5000");
        assert_eq!(key_host("quay.io/some/path"), "quay.io");
        assert_eq!(helper_server_name("docker.io"), "https://index.docker.io/v1/");
        assert_eq!(helper_server_name("quay.io"), "quay.io");
    }

    #[test]
    fn reads_auths_entries_and_refuses_broken_ones() {
        let directory = tempfile::tempdir().unwrap();
        let encoded = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        std::fs::write(
            directory.path().join("config.json"),
            format!(
                r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{encoded}"}},
                   "127.0.0.1:5000":{{"username":"bob","password":"pw"}},
                   "broken.example":{{"auth":"not base64!"}},
                   "oauth.example":{{"identitytoken":"xyz"}}}}}}"#
            ),
        )
        .unwrap();
        let hub = lookup(directory.path(), "docker.io")
            .unwrap()
            .credentials
            .unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("alice", "s3cr:et")
        );
        let local = lookup(directory.path(), "127.0.0.1:5000")
            .unwrap()
            .credentials
            .unwrap();
        assert_eq!(local.username, "bob");
        assert!(
            lookup(directory.path(), "other.example")
                .unwrap()
                .credentials
                .is_none()
        );
        assert!(matches!(
            lookup(directory.path(), "broken.example"),
            Err(CredentialsError::BadEntry { .. })
        ));
        assert!(matches!(
            lookup(directory.path(), "oauth.example"),
            Err(CredentialsError::UnsupportedToken { .. })
        ));
        assert!(!format!("{hub:?}").contains("s3cr"));
    }

    #[test]
    fn a_missing_credential_helper_is_a_clear_error() {
        let directory = tempfile::tempdir().unwrap();
        std::fs::write(
            directory.path().join("config.json"),
            r#"{"credHelpers":{"quay.io":"paddock-test-no-such-helper"}}"#,
        )
        .unwrap();
        let error = lookup(directory.path(), "quay.io").unwrap_err();
        assert!(matches!(error, CredentialsError::HelperMissing { .. }), "{error}");
        assert!(
            error
                .to_string()
                .contains("docker-credential-paddock-test-no-such-helper")
        );
    }

    #[test]
    fn a_missing_config_means_anonymous() {
        let directory = tempfile::tempdir().unwrap();
        assert!(lookup(directory.path(), "quay.io").unwrap().credentials.is_none());
    }
}
