//! vncdotool, a third-party Python VNC client, for tests that must show a real viewer works.
//!
//! Role: our own RFB code cannot prove that paddock's VNC consoles work for other clients, so the
//! end-to-end tests also drive `vncdo` (from PyPI's `vncdotool`) against them.
//!
//! Contract:
//! - [`install`] returns the `vncdo` executable of a virtual environment at
//!   `<cache>/vncdotool/<VERSION>` (see [`crate::paths::cache_dir`]), building it on first use with
//!   `python3 -m venv` and `pip install --require-hashes --only-binary :all:` from [`REQUIREMENTS`]:
//!   vncdotool and every dependency pinned to one version and to the sha256 of its wheels (CPython
//!   3.11 to 3.14 on x86_64 glibc Linux), so a run never builds from source and never gets
//!   different code.
//! - Parallel test binaries do not race: the check and the build run under an exclusive lock on
//!   `<cache>/vncdotool/<VERSION>.lock`. The environment is built in a temporary sibling directory
//!   and renamed into place, and it is trusted only when its `requirements.txt` equals
//!   [`REQUIREMENTS`] and `vncdo --version` runs; otherwise it is rebuilt.
//! - A virtual environment records absolute paths, so before the rename the `vncdo` launcher's
//!   interpreter line is rewritten to the final location (the interpreter itself finds its
//!   environment from its own path and needs no change).
//! - A machine that cannot install it (no `python3`, no `venv` module, no index reachable) is an
//!   error, never a silent pass: [`require_vncdotool`] returns `Ok(None)` only when
//!   `PADDOCK_ALLOW_SKIP=1`, after printing a loud SKIP line.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::paths::cache_dir;
use crate::qemu::skip_allowed;

/// The vncdotool release the tests use.
pub const VERSION: &str = "1.4.2";

/// pip requirements for [`VERSION`]: every distribution of the closure pinned, with the sha256 of
/// its wheels on PyPI (pure-Python wheels, and manylinux x86_64 wheels for CPython 3.11 to 3.14).
pub const REQUIREMENTS: &str = "\
attrs==26.1.0 \\
    --hash=sha256:c647aa4a12dfbad9333ca4e71fe62ddc36f4e63b2d260a37a8b83d2f043ac309
automat==25.4.16 \\
    --hash=sha256:04e9bce696a8d5671ee698005af6e5a9fa15354140a87f4870744604dcdd3ba1
cffi==2.1.1 \\
    --hash=sha256:34e261f78cb6ceaaa36f42f2613f4380d94d9c759a9c73c769ee6e0247364632 \\
    --hash=sha256:c1453022f490d2459a11819d83ad1d586e9ff65a12ac3e705ffebd46d3685dcf \\
    --hash=sha256:a931079504ecc49efed7744c476a5c343a92fabf66dec2db95edb1b2fdc770e2 \\
    --hash=sha256:b0431303acaea1089ad4b3e9ce4e6518193def1118d4073ca848635ee4ea2e96
constantly==23.10.4 \\
    --hash=sha256:3fd9b4d1c3dc1ec9757f3c52aef7e53ad9323dbe39f51dfd4c43853b68dfa3f9
cryptography==50.0.2 \\
    --hash=sha256:630ebfea3bf689d075f82316324ff7433dc447fe6bc1bfc76524b74b4a9567d2 \\
    --hash=sha256:4061c0079120205fb760c58acab6443e217307dcf05e3702cf970e0689972856 \\
    --hash=sha256:9dab55f57c74c3cad24c323bacbbd04be4705ba6eb0d92e920b1fc4837ed5079 \\
    --hash=sha256:ee247f5c245c9a2fe7c8e2214e295918838e44e00a45a6718451e4004219e767 \\
    --hash=sha256:f21e8a22c8605750c7af886bab299a363721264061b4ac0a30efb73cfd58efc5 \\
    --hash=sha256:1981f1db4630889b9ef7803fadef12b056f428cb6b85c27ba57b774793b6093c
hyperlink==21.0.0 \\
    --hash=sha256:e6b14c37ecb73e89c77d78cdb4c2cc8f3fb59a885c5b3f819ff4ed80f25af1b4
idna==3.20 \\
    --hash=sha256:ab7ae7122974553370f0bdb919e1a960b2cd1bc1ef0276416d896db81c14582c
incremental==24.11.0 \\
    --hash=sha256:a34450716b1c4341fe6676a0598e88a39e04189f4dce5dc96f656e040baa10b3
packaging==26.3 \\
    --hash=sha256:d7193f7c8e4e93f444fde0262bf90af30e16fa0ad0ad44cb553c87339b23cd1c
pillow==13.0.0 \\
    --hash=sha256:a625df9a2a5597fa5e5266e01aefc82604bb85d291e3547981e863560d75da6c \\
    --hash=sha256:42d63be3af4f9b951b199b0a9d23365d37ab14687e6d77b74940432c8515c4ca \\
    --hash=sha256:5f56499c1a74d2b862beb0c33b8016f99d095858455df9d21583bbbc1c15b582 \\
    --hash=sha256:e91c2b1cbeae768c98752e67e717e283d68dae45717b41f2d91eaee648e37b7d
pycparser==3.12 \\
    --hash=sha256:a076f3f489b39b43ed13563a1dafe42447445bec2e294154ec5c57fcdda4c85e
twisted==26.10.0 \\
    --hash=sha256:3732f42af218925a0fe78d6668db55853f7fb532245a89a2669babe7d3000fa8
typing-extensions==4.16.0 \\
    --hash=sha256:481caa481374e813c1b176ada14e97f1f67a4539ce9cfeb3f350d78d6370c2e8
vncdotool==1.4.2 \\
    --hash=sha256:6512732fc191aca5c17c731e7a9e7951a36f8d95c7c48c63904eefec1616fc41
zope-interface==8.7 \\
    --hash=sha256:1613beb1fb1b4f457818c5443e985142ec9e71af391bfb26e583e0353f206792 \\
    --hash=sha256:90aef6e0a9924af18f60528895f2fc50cb634191939d65b10a96d9ced05030b5 \\
    --hash=sha256:d30ed06ef78e9e1b41a50683b7d01727a3c363143c5bda09017e33f19827afc2 \\
    --hash=sha256:6260ccc856a2c561b20341a74a8c1d9bb13916f6b52e880f336a0ddf61a1b726
";

/// The file inside the environment that records what it was built from.
const STAMP_FILE: &str = "requirements.txt";

/// Errors finding or installing vncdotool.
#[derive(Debug, thiserror::Error)]
pub enum VncdotoolError {
    /// No Python interpreter to build the environment with.
    #[error(
        "python3 was not found on PATH, so vncdotool cannot be installed; install the Debian packages \
         python3 and python3-venv (hack/install-deps.sh does), or set PADDOCK_ALLOW_SKIP=1 to skip the check"
    )]
    PythonNotFound,
    /// `python3 -m venv` failed.
    #[error(
        "python3 -m venv {path} failed ({status}): {output}; install the Debian package python3-venv \
         (hack/install-deps.sh does), or set PADDOCK_ALLOW_SKIP=1 to skip the check"
    )]
    VirtualEnvironment {
        /// The environment being created.
        path: PathBuf,
        /// Exit status.
        status: String,
        /// Its output.
        output: String,
    },
    /// pip could not install the pinned requirements.
    #[error(
        "pip install of vncdotool {version} failed ({status}): {output}; check that PyPI is reachable \
         (proxy settings) and that python3 is CPython 3.11 to 3.14 on x86_64, or set \
         PADDOCK_ALLOW_SKIP=1 to skip the check"
    )]
    PipInstall {
        /// The vncdotool version.
        version: &'static str,
        /// Exit status.
        status: String,
        /// pip's output.
        output: String,
    },
    /// The freshly built environment does not run `vncdo`.
    #[error(
        "the freshly installed {executable} does not run ({details}); remove {environment} and try again"
    )]
    Broken {
        /// The `vncdo` launcher.
        executable: PathBuf,
        /// The environment.
        environment: PathBuf,
        /// What went wrong.
        details: String,
    },
    /// A file-system step failed.
    #[error("failed to {what} {path}: {source}; check that the cache directory is writable")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl VncdotoolError {
    /// True when the machine lacks what the install needs (Python, venv, the package index), the
    /// only failures `PADDOCK_ALLOW_SKIP=1` may turn into a skip.
    fn is_missing_prerequisite(&self) -> bool {
        matches!(
            self,
            VncdotoolError::PythonNotFound
                | VncdotoolError::VirtualEnvironment { .. }
                | VncdotoolError::PipInstall { .. }
        )
    }
}

/// Installs (or reuses) vncdotool for `test_name` and returns the path of `vncdo`; `Ok(None)` after
/// a loud SKIP line only when the machine cannot install it and `PADDOCK_ALLOW_SKIP=1`.
pub fn require_vncdotool(test_name: &str) -> Result<Option<PathBuf>, VncdotoolError> {
    match install() {
        Ok(executable) => Ok(Some(executable)),
        Err(error) if error.is_missing_prerequisite() && skip_allowed() => {
            eprintln!(
                "\n!!!!!!!! SKIP {test_name} (vncdotool part): {error} (skipped because PADDOCK_ALLOW_SKIP=1) !!!!!!!!\n"
            );
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

/// Returns the path of `vncdo` from the cached environment, building the environment first when it
/// is missing, stale or broken.
pub fn install() -> Result<PathBuf, VncdotoolError> {
    let parent = cache_dir().join("vncdotool");
    std::fs::create_dir_all(&parent).map_err(|source| VncdotoolError::Io {
        what: "create",
        path: parent.clone(),
        source,
    })?;
    let lock_path = parent.join(format!("{VERSION}.lock"));
    let lock = File::create(&lock_path).map_err(|source| VncdotoolError::Io {
        what: "create the lock file",
        path: lock_path.clone(),
        source,
    })?;
    // Held until `lock` is dropped at the end of this function: one builder at a time, and no
    // reader sees a half-replaced environment.
    lock.lock().map_err(|source| VncdotoolError::Io {
        what: "lock",
        path: lock_path.clone(),
        source,
    })?;
    let environment = parent.join(VERSION);
    let executable = environment.join("bin").join("vncdo");
    if is_current(&environment) && version_output(&executable).is_ok() {
        return Ok(executable);
    }
    eprintln!(
        "vncdotool: installing {VERSION} into {} (pinned wheels from PyPI)",
        environment.display()
    );
    let started = std::time::Instant::now();
    build(&parent, &environment)?;
    version_output(&executable).map_err(|details| VncdotoolError::Broken {
        executable: executable.clone(),
        environment: environment.clone(),
        details,
    })?;
    eprintln!(
        "vncdotool: installed {VERSION} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    drop(lock);
    Ok(executable)
}

/// Whether `environment` was built from exactly [`REQUIREMENTS`].
fn is_current(environment: &Path) -> bool {
    std::fs::read_to_string(environment.join(STAMP_FILE)).is_ok_and(|recorded| recorded == REQUIREMENTS)
}

/// Runs `vncdo --version` and checks it names [`VERSION`].
fn version_output(executable: &Path) -> Result<(), String> {
    let output = Command::new(executable)
        .arg("--version")
        .output()
        .map_err(|error| format!("cannot run it: {error}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() && text.contains(VERSION) {
        Ok(())
    } else {
        Err(format!(
            "`vncdo --version` said {:?} ({})",
            text.trim(),
            output.status
        ))
    }
}

/// Builds the environment in a temporary sibling of `environment` and renames it into place.
fn build(parent: &Path, environment: &Path) -> Result<(), VncdotoolError> {
    let python = which("python3").ok_or(VncdotoolError::PythonNotFound)?;
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{VERSION}-build-"))
        .tempdir_in(parent)
        .map_err(|source| VncdotoolError::Io {
            what: "create a build directory in",
            path: parent.to_path_buf(),
            source,
        })?;
    let staging_path = staging.path().to_path_buf();
    let created = run(Command::new(&python).arg("-m").arg("venv").arg(&staging_path))?;
    if !created.status.success() {
        return Err(VncdotoolError::VirtualEnvironment {
            path: staging_path,
            status: created.status.to_string(),
            output: combined(&created),
        });
    }
    let requirements = staging_path.join("requirements.in");
    write_file(&requirements, REQUIREMENTS.as_bytes())?;
    let installed = run(Command::new(staging_path.join("bin").join("python"))
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
        .args(["--require-hashes", "--only-binary", ":all:", "--no-input"])
        .arg("--requirement")
        .arg(&requirements))?;
    if !installed.status.success() {
        return Err(VncdotoolError::PipInstall {
            version: VERSION,
            status: installed.status.to_string(),
            output: combined(&installed),
        });
    }
    point_launcher_at(&staging_path.join("bin").join("vncdo"), environment)?;
    write_file(&staging_path.join(STAMP_FILE), REQUIREMENTS.as_bytes())?;
    if environment.exists() {
        std::fs::remove_dir_all(environment).map_err(|source| VncdotoolError::Io {
            what: "remove the stale environment",
            path: environment.to_path_buf(),
            source,
        })?;
    }
    std::fs::rename(&staging_path, environment).map_err(|source| VncdotoolError::Io {
        what: "move the new environment into place at",
        path: environment.to_path_buf(),
        source,
    })?;
    // Renamed away: nothing left for the guard to remove.
    let _ = staging.keep();
    Ok(())
}

/// Rewrites the first line of the pip-generated `launcher` so it runs the interpreter of the
/// environment at its final location. `/bin/sh` re-executes the interpreter, as pip itself does for
/// long paths, so any path length or character works.
fn point_launcher_at(launcher: &Path, environment: &Path) -> Result<(), VncdotoolError> {
    let script = std::fs::read_to_string(launcher).map_err(|source| VncdotoolError::Io {
        what: "read",
        path: launcher.to_path_buf(),
        source,
    })?;
    let body = script.split_once('\n').map_or("", |(_, body)| body);
    let interpreter = environment.join("bin").join("python");
    let quoted = format!("'{}'", interpreter.display().to_string().replace('\'', r"'\''"));
    let rewritten = format!("#!/bin/sh\n'''exec' {quoted} \"$0\" \"$@\"\n' '''\n{body}");
    write_file(launcher, rewritten.as_bytes())?;
    std::fs::set_permissions(launcher, std::fs::Permissions::from_mode(0o755)).map_err(|source| {
        VncdotoolError::Io {
            what: "make executable",
            path: launcher.to_path_buf(),
            source,
        }
    })
}

/// Writes `path` through a temporary file in the same directory and a rename.
fn write_file(path: &Path, contents: &[u8]) -> Result<(), VncdotoolError> {
    let directory = path.parent().unwrap_or(Path::new("."));
    let failed = |what, source| VncdotoolError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let mut temporary = tempfile::NamedTempFile::new_in(directory)
        .map_err(|source| failed("create a temporary file for", source))?;
    temporary
        .write_all(contents)
        .map_err(|source| failed("write", source))?;
    temporary
        .persist(path)
        .map_err(|error| failed("rename into place", error.error))?;
    Ok(())
}

fn run(command: &mut Command) -> Result<Output, VncdotoolError> {
    let program = PathBuf::from(command.get_program());
    command.output().map_err(|source| VncdotoolError::Io {
        what: "run",
        path: program,
        source,
    })
}

fn combined(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
    .trim()
    .to_string()
}

fn which(program: &str) -> Option<PathBuf> {
    let search_path = std::env::var_os("PATH")?;
    std::env::split_paths(&search_path)
        .map(|directory| directory.join(program))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    /// Several installers at once (as parallel test binaries do) all get the same working `vncdo`.
    #[test]
    fn concurrent_installs_share_one_working_environment() {
        let Some(expected) = require_vncdotool("concurrent_installs_share_one_working_environment")
            .unwrap_or_else(|error| panic!("{error}"))
        else {
            return;
        };
        let installers: Vec<_> = (0..3).map(|_| std::thread::spawn(install)).collect();
        for installer in installers {
            let executable = installer
                .join()
                .unwrap()
                .unwrap_or_else(|error| panic!("{error}"));
            assert_eq!(executable, expected);
        }
        version_output(&expected).unwrap();
        assert!(is_current(expected.parent().unwrap().parent().unwrap()));
        let leftovers: Vec<_> = std::fs::read_dir(cache_dir().join("vncdotool"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains("-build-"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "build directories left behind: {leftovers:?}"
        );
    }
}
