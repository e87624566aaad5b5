//! The real zarf CLI for tests, built from its Go module by `tests/zarf/build.sh` and run isolated.
//!
//! Contract: [`Zarf::build`] runs the build script (a no-op when the cached binary's stamp matches,
//! minutes when it does not) and returns the binary. [`Zarf::run`] runs one zarf command with a
//! private HOME, cache, temp dir and empty config, proxies pointing nowhere and, when the machine
//! allows it, inside an empty network namespace (`unshare --net`): a package that builds there builds
//! air-gapped. A failed build is an error unless `PADDOCK_ALLOW_SKIP=1` and Go itself is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::paths::{cache_dir, repository_root};
use crate::qemu::skip_allowed;

/// Errors getting or running zarf.
#[derive(Debug, thiserror::Error)]
pub enum ZarfError {
    /// The build script failed.
    #[error("tests/zarf/build.sh failed ({status}); its output:\n{output}")]
    Build {
        /// Exit status.
        status: String,
        /// stderr of the script.
        output: String,
    },
    /// Running something failed to start.
    #[error("cannot run {what}: {source}")]
    Spawn {
        /// The command.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// A zarf binary and a private directory for its state.
#[derive(Debug)]
pub struct Zarf {
    binary: PathBuf,
    home: tempfile::TempDir,
    network_namespace: bool,
}

/// Builds (or reuses) zarf for `test_name`; `Ok(None)` after a loud SKIP only when Go is missing and
/// `PADDOCK_ALLOW_SKIP=1`.
pub fn require_zarf(test_name: &str) -> Result<Option<Zarf>, ZarfError> {
    let go_missing = Command::new("go").arg("version").output().is_err();
    if go_missing && skip_allowed() {
        eprintln!(
            "\n!!!!!!!! SKIP {test_name}: go is not installed, so zarf cannot be built (PADDOCK_ALLOW_SKIP=1) !!!!!!!!\n"
        );
        return Ok(None);
    }
    Zarf::build().map(Some)
}

impl Zarf {
    /// Builds or reuses the cached zarf binary.
    pub fn build() -> Result<Zarf, ZarfError> {
        let script = repository_root().join("tests/zarf/build.sh");
        let output = Command::new("bash")
            .arg(&script)
            .env("PADDOCK_CACHE_DIR", cache_dir())
            .output()
            .map_err(|source| ZarfError::Spawn {
                what: script.display().to_string(),
                source,
            })?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let binary = stdout.lines().last().map(PathBuf::from).unwrap_or_default();
        if !output.status.success() || !binary.is_file() {
            return Err(ZarfError::Build {
                status: output.status.to_string(),
                output: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        let home = tempfile::Builder::new()
            .prefix("paddock-zarf-")
            .tempdir()
            .map_err(|source| ZarfError::Spawn {
                what: "a temporary directory".into(),
                source,
            })?;
        let network_namespace = Command::new("unshare")
            .args(["--net", "true"])
            .output()
            .is_ok_and(|output| output.status.success());
        if !network_namespace {
            eprintln!(
                "zarf: no network namespace available here; running zarf with HOME/config/proxy isolation only"
            );
        }
        Ok(Zarf {
            binary,
            home,
            network_namespace,
        })
    }

    /// The zarf binary.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Runs `zarf ARGUMENTS... --log-format console --no-color --cache ... --tmpdir ...` isolated, in
    /// `working_directory`.
    pub fn run(&self, working_directory: &Path, arguments: &[&str]) -> Result<Output, ZarfError> {
        let home = self.home.path();
        for directory in ["home", "cache", "tmp"] {
            std::fs::create_dir_all(home.join(directory)).map_err(|source| ZarfError::Spawn {
                what: format!("mkdir {directory}"),
                source,
            })?;
        }
        let config = home.join("zarf-config.toml");
        std::fs::write(&config, "").map_err(|source| ZarfError::Spawn {
            what: "write the empty zarf config".into(),
            source,
        })?;
        let mut command = if self.network_namespace {
            let mut command = Command::new("unshare");
            command.args(["--net", "--"]).arg(&self.binary);
            command
        } else {
            Command::new(&self.binary)
        };
        command
            .args(arguments)
            .args(["--log-format", "console", "--no-color", "--cache"])
            .arg(home.join("cache"))
            .arg("--tmpdir")
            .arg(home.join("tmp"))
            .current_dir(working_directory)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", home.join("home"))
            .env("TMPDIR", home.join("tmp"))
            .env("ZARF_CONFIG", &config)
            .env("KUBECONFIG", home.join("no-such-kubeconfig"))
            .env("HTTP_PROXY", "http://127.0.0.1:9")
            .env("HTTPS_PROXY", "http://127.0.0.1:9");
        let output = command.output().map_err(|source| ZarfError::Spawn {
            what: format!("zarf {}", arguments.join(" ")),
            source,
        })?;
        eprintln!(
            "$ zarf {}\n{}{}",
            arguments.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(output)
    }
}
