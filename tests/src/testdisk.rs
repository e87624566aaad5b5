//! The paddock test disk: a tiny bootable qcow2 built by `tests/testdisk/build.sh`.
//!
//! Role: give every test that needs a real guest the same small, fast-booting disk.
//!
//! Contract:
//! - [`test_disk`] runs the build script at most once per process and returns the path of the
//!   cached image (`<cache dir>/testdisk/paddock-test.qcow2`). The script itself skips the work
//!   when the cached disk is up to date, so this is cheap after the first run on a machine.
//! - The returned image is shared by every test and every run: never boot it directly. Boot a
//!   qcow2 overlay instead ([`crate::qemu::Qemu::create_overlay`]).
//! - The guest's serial protocol is described by the constants below and in
//!   `tests/testdisk/README.md`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::paths;

/// Printed on the serial console and the VGA screen once the guest is fully up (after the data
/// partition has been handled); a root shell follows on the serial console.
pub const READY_BANNER: &str = "PADDOCK TEST VM READY";
/// Printed once the data partition is mounted read-write at `/data` (before [`READY_BANNER`]).
pub const DATA_MOUNTED_BANNER: &str = "PADDOCK DATA MOUNTED";
/// Prefix of the line printed instead of [`DATA_MOUNTED_BANNER`] when `/data` could not be mounted.
pub const DATA_MOUNT_FAILED_PREFIX: &str = "PADDOCK DATA MOUNT FAILED";
/// Prefix of the line naming the block device of the data partition (`/dev/vda2`, `/dev/sda2`).
pub const DATA_DEVICE_PREFIX: &str = "PADDOCK DATA DEVICE ";
/// Prefix of the line printed when the guest starts a clean poweroff or reboot.
pub const SHUTTING_DOWN_PREFIX: &str = "PADDOCK SHUTTING DOWN";
/// The serial shell's prompt (it has no trailing newline).
pub const SHELL_PROMPT: &str = "paddock# ";
/// Where the guest mounts its writable data partition.
pub const DATA_MOUNT_POINT: &str = "/data";

/// The exit status with which `build.sh` reports a missing Debian package.
const MISSING_PREREQUISITE_STATUS: i32 = 3;
/// How much of the script's stderr an error quotes.
const STDERR_TAIL_CHARACTERS: usize = 4000;

/// Errors from building the test disk. Cloneable because the result of the single build is
/// handed to every caller in the process.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TestDiskError {
    /// The build script could not be started.
    #[error(
        "failed to run the test disk build script {script}: {details}; check that bash is installed and the script exists"
    )]
    Spawn {
        /// The script.
        script: PathBuf,
        /// The underlying error.
        details: String,
    },
    /// A Debian package the build needs is not installed.
    #[error("the test disk cannot be built because packages are missing:\n{details}")]
    MissingPrerequisites {
        /// The script's explanation, naming the packages and the install command.
        details: String,
    },
    /// The script failed.
    #[error(
        "the test disk build script {script} failed ({status}); run it by hand to see why.\n--- its stderr ---\n{stderr}"
    )]
    BuildFailed {
        /// The script.
        script: PathBuf,
        /// Its exit status.
        status: String,
        /// The tail of its stderr.
        stderr: String,
    },
    /// The script succeeded but its last stdout line is not an existing file.
    #[error(
        "the test disk build script reported {reported:?} as the disk, but no such file exists; the script is broken"
    )]
    MissingOutput {
        /// The last line of the script's stdout.
        reported: String,
    },
}

impl TestDiskError {
    /// True when the build failed only because Debian packages are missing, which
    /// `PADDOCK_ALLOW_SKIP=1` may turn into a skip.
    pub fn is_missing_prerequisite(&self) -> bool {
        matches!(self, TestDiskError::MissingPrerequisites { .. })
    }
}

/// The build script.
pub fn build_script() -> PathBuf {
    paths::repository_root()
        .join("tests")
        .join("testdisk")
        .join("build.sh")
}

/// Builds the test disk if needed (once per process) and returns the path of the cached image.
pub fn test_disk() -> Result<PathBuf, TestDiskError> {
    static BUILT: OnceLock<Result<PathBuf, TestDiskError>> = OnceLock::new();
    BUILT.get_or_init(|| build(&build_script())).clone()
}

fn build(script: &Path) -> Result<PathBuf, TestDiskError> {
    let started = std::time::Instant::now();
    let output = Command::new("bash")
        .arg(script)
        // Pass the directory explicitly so the script and paths::cache_dir() can never disagree.
        .env("PADDOCK_CACHE_DIR", paths::cache_dir())
        .output()
        .map_err(|error| TestDiskError::Spawn {
            script: script.to_path_buf(),
            details: error.to_string(),
        })?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.code() == Some(MISSING_PREREQUISITE_STATUS) {
        return Err(TestDiskError::MissingPrerequisites {
            details: stderr.trim().to_string(),
        });
    }
    if !output.status.success() {
        let tail_start = stderr.len().saturating_sub(STDERR_TAIL_CHARACTERS);
        let tail_start = (tail_start..stderr.len())
            .find(|&index| stderr.is_char_boundary(index))
            .unwrap_or(0);
        return Err(TestDiskError::BuildFailed {
            script: script.to_path_buf(),
            status: output.status.to_string(),
            stderr: stderr[tail_start..].trim().to_string(),
        });
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let reported = stdout
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string();
    let disk = PathBuf::from(&reported);
    if reported.is_empty() || !disk.is_file() {
        return Err(TestDiskError::MissingOutput { reported });
    }
    eprintln!(
        "test disk ready in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        disk.display()
    );
    Ok(disk)
}

/// Why an end-to-end test cannot get QEMU and the test disk.
#[derive(Debug, thiserror::Error)]
pub enum PrerequisiteError {
    /// QEMU is missing or unusable.
    #[error(transparent)]
    Qemu(#[from] crate::qemu::QemuError),
    /// The test disk could not be built.
    #[error(transparent)]
    TestDisk(#[from] TestDiskError),
}

/// QEMU and the test disk for an end-to-end test. `Ok(None)` only when a prerequisite is missing and
/// `PADDOCK_ALLOW_SKIP=1` is set, after a loud SKIP line; any other failure is an error, so a test
/// never passes silently without the real components.
pub fn qemu_and_test_disk(
    test_name: &str,
) -> Result<Option<(crate::qemu::Qemu, PathBuf)>, PrerequisiteError> {
    let Some(qemu) = crate::qemu::require_qemu(test_name)? else {
        return Ok(None);
    };
    match test_disk() {
        Ok(disk) => Ok(Some((qemu, disk))),
        Err(error) if error.is_missing_prerequisite() && crate::qemu::skip_allowed() => {
            eprintln!(
                "\n!!!!!!!! SKIP {test_name}: {error} (skipped because PADDOCK_ALLOW_SKIP=1) !!!!!!!!\n"
            );
            Ok(None)
        }
        Err(error) => Err(error.into()),
    }
}
