//! A real OCI registry for tests: Debian's `docker-registry` (CNCF distribution) on loopback.
//!
//! Role: every test that pushes or pulls talks to the same registry software Zarf runs in a
//! cluster, not to a mock. [`Registry::start`] picks a free port, writes a config into a private
//! directory (storage there too), starts the registry and waits until `/v2/` answers; dropping the
//! [`Registry`] kills it and removes the directory.
//!
//! Contract: a missing `docker-registry` is an error naming `hack/install-deps.sh`; only
//! `PADDOCK_ALLOW_SKIP=1` turns it into a loud SKIP (see [`require_registry`]). With
//! [`RegistryAuth::Basic`] the registry demands basic auth (an htpasswd file with a bcrypt hash, the
//! only kind it accepts). Upload purging is off, so an interrupted upload session stays resumable
//! for the whole test. Manifest deletes are enabled (`storage.delete.enabled`, what
//! `REGISTRY_STORAGE_DELETE_ENABLED=true` sets), as backup retention needs;
//! [`Registry::start_without_deletes`] starts one that refuses them (http 405 `UNSUPPORTED`), the
//! docker-registry default.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::qemu::skip_allowed;

/// Errors starting the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The binary is not installed.
    #[error(
        "docker-registry is not installed; run hack/install-deps.sh (apt-get install docker-registry) or set PADDOCK_ALLOW_SKIP=1 to skip"
    )]
    NotInstalled,
    /// Setting up or starting failed.
    #[error("cannot start docker-registry: {0}")]
    Start(String),
    /// It did not answer in time.
    #[error("docker-registry did not answer on {address} within {seconds} s; its log:\n{log}")]
    NotReady {
        /// host:port.
        address: String,
        /// Seconds waited.
        seconds: u64,
        /// The registry's log.
        log: String,
    },
}

/// Whether the registry asks for credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryAuth {
    /// Anyone may push and pull.
    None,
    /// Basic auth with one user.
    Basic {
        /// The username.
        username: String,
        /// The password.
        password: String,
    },
}

/// A running registry; killed on drop.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    address: String,
    directory: tempfile::TempDir,
}

/// Path of the registry binary.
pub const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";

/// Starts a registry for `test_name`, or `Ok(None)` after a loud SKIP when it is not installed and
/// `PADDOCK_ALLOW_SKIP=1`.
pub fn require_registry(test_name: &str, auth: RegistryAuth) -> Result<Option<Registry>, RegistryError> {
    match Registry::start(auth) {
        Err(RegistryError::NotInstalled) if skip_allowed() => {
            eprintln!(
                "\n!!!!!!!! SKIP {test_name}: docker-registry is not installed (skipped because PADDOCK_ALLOW_SKIP=1) !!!!!!!!\n"
            );
            Ok(None)
        }
        other => other.map(Some),
    }
}

impl Registry {
    /// Starts a registry on 127.0.0.1 with a fresh storage directory.
    pub fn start(auth: RegistryAuth) -> Result<Registry, RegistryError> {
        Self::start_with(auth, true)
    }

    /// Starts a registry like [`Registry::start`] that refuses manifest deletes.
    pub fn start_without_deletes(auth: RegistryAuth) -> Result<Registry, RegistryError> {
        Self::start_with(auth, false)
    }

    fn start_with(auth: RegistryAuth, deletes: bool) -> Result<Registry, RegistryError> {
        if !Path::new(REGISTRY_BINARY).is_file() {
            return Err(RegistryError::NotInstalled);
        }
        // The free port is learnt before the registry binds it, so another process may take it in
        // between: try a few times.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_once(&auth, deletes) {
                Err(RegistryError::NotReady { .. } | RegistryError::Start(_)) if attempt < 3 => continue,
                other => return other,
            }
        }
    }

    fn start_once(auth: &RegistryAuth, deletes: bool) -> Result<Registry, RegistryError> {
        let failed = |what: &str, error: std::io::Error| RegistryError::Start(format!("{what}: {error}"));
        let directory = tempfile::Builder::new()
            .prefix("paddock-registry-")
            .tempdir()
            .map_err(|error| failed("create directory", error))?;
        std::fs::create_dir_all(directory.path().join("storage"))
            .map_err(|error| failed("create directory", error))?;
        // Bind port 0 to learn a free port, then release it for the registry; a race with another
        // process is possible but rare, and shows as a clear NotReady error.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(|error| failed("find a free port", error))?
            .port();
        let address = format!("127.0.0.1:{port}");
        let auth_section = match auth {
            RegistryAuth::None => String::new(),
            RegistryAuth::Basic { username, password } => {
                // Cost 4, the minimum: this protects a test registry, and higher costs are slow.
                let hash = bcrypt::hash(password, 4)
                    .map_err(|error| RegistryError::Start(format!("bcrypt: {error}")))?;
                std::fs::write(directory.path().join("htpasswd"), format!("{username}:{hash}\n"))
                    .map_err(|error| failed("write htpasswd", error))?;
                format!(
                    "auth:\n  htpasswd:\n    realm: paddock-test\n    path: {}\n",
                    directory.path().join("htpasswd").display()
                )
            }
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: {deletes}\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {address}\n  secret: paddock-test-secret\n{auth_section}",
            directory.path().join("storage").display()
        );
        std::fs::write(directory.path().join("config.yml"), config)
            .map_err(|error| failed("write config", error))?;
        let log = std::fs::File::create(directory.path().join("registry.log"))
            .map_err(|error| failed("create log", error))?;
        let log_err = log.try_clone().map_err(|error| failed("clone log", error))?;
        let child = Command::new(REGISTRY_BINARY)
            .arg("serve")
            .arg(directory.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|error| failed("spawn docker-registry", error))?;
        let mut registry = Registry {
            child,
            address,
            directory,
        };
        registry.wait_ready(Duration::from_secs(20))?;
        Ok(registry)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), RegistryError> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(RegistryError::Start(format!(
                    "docker-registry exited with {status}; log:\n{}",
                    self.log()
                )));
            }
            if let Ok(mut stream) = TcpStream::connect(&self.address) {
                let request = format!("GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.address);
                let mut answer = String::new();
                if stream.write_all(request.as_bytes()).is_ok()
                    && stream.read_to_string(&mut answer).is_ok()
                    && (answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.0 401"))
                {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(RegistryError::NotReady {
            address: self.address.clone(),
            seconds: timeout.as_secs(),
            log: self.log(),
        })
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The registry's storage root (`docker/registry/v2/...` below it).
    pub fn storage(&self) -> PathBuf {
        self.directory.path().join("storage")
    }

    /// Where the registry stores the content of blob `digest` (to tamper with it in tests).
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage()
            .join("docker/registry/v2/blobs/sha256")
            .join(hex.get(..2).unwrap_or_default())
            .join(hex)
            .join("data")
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.directory.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
