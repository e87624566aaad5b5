//! Test support for the registry tests: a real Debian `docker-registry` on loopback, skopeo, and
//! random disks.
//!
//! A missing docker-registry or skopeo fails the test with a pointer to `hack/install-deps.sh`;
//! only `PADDOCK_ALLOW_SKIP=1` turns that into a loud skip.

use std::path::{Path, PathBuf};
use std::process::Command;

use paddock_tests::registry::{Registry, RegistryAuth};

/// Whether docker-registry and skopeo are installed; panics when they are not, unless
/// `PADDOCK_ALLOW_SKIP=1`, in which case it prints a SKIP line and returns false.
pub fn tools_available(test: &str) -> bool {
    let missing: Vec<&str> = ["docker-registry", "skopeo"]
        .into_iter()
        .filter(|tool| Command::new(tool).arg("--version").output().is_err())
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("PADDOCK_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!(
            "!!!!! SKIP {test}: {} not installed (PADDOCK_ALLOW_SKIP=1); registry checks NOT run",
            missing.join(" and ")
        );
        return false;
    }
    panic!(
        "{} not installed: run hack/install-deps.sh (Debian packages docker-registry and skopeo), \
         or set PADDOCK_ALLOW_SKIP=1 to skip",
        missing.join(" and ")
    );
}

/// A docker-registry on 127.0.0.1 with its own storage (paddock-tests' harness); killed on drop.
pub struct TestRegistry(Registry);

impl TestRegistry {
    /// Starts an anonymous registry.
    pub fn start() -> TestRegistry {
        TestRegistry(Registry::start(RegistryAuth::None).unwrap_or_else(|error| panic!("{error}")))
    }

    /// Starts an anonymous registry that refuses manifest deletes (docker-registry's default).
    pub fn start_without_deletes() -> TestRegistry {
        TestRegistry(
            Registry::start_without_deletes(RegistryAuth::None).unwrap_or_else(|error| panic!("{error}")),
        )
    }

    /// Starts a registry that requires `user`/`password`.
    pub fn start_with_basic_auth(user: &str, password: &str) -> TestRegistry {
        let auth = RegistryAuth::Basic {
            username: user.into(),
            password: password.into(),
        };
        TestRegistry(Registry::start(auth).unwrap_or_else(|error| panic!("{error}")))
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        self.0.address().to_owned()
    }

    /// Where the registry stores the content of blob `digest`.
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        self.0.blob_data(digest)
    }
}

/// Runs skopeo and returns its stdout; panics with its stderr when it fails.
pub fn skopeo(args: &[&str]) -> String {
    let output = Command::new("skopeo").args(args).output().unwrap();
    assert!(
        output.status.success(),
        "skopeo {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Writes `size` bytes of seeded pseudo-random data (xorshift64*), which no compressor shrinks.
pub fn random_file(path: &Path, size: usize, seed: u64) {
    let mut state = seed | 1;
    let mut data = Vec::with_capacity(size + 8);
    while data.len() < size {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        data.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    data.truncate(size);
    std::fs::write(path, data).unwrap();
}
