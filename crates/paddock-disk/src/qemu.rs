//! The qemu-img runner: locate the binary, `info` a single image, `convert` with progress.
//!
//! Contract:
//! - paths are passed to qemu-img made absolute, because qemu-img treats a leading `json:` or a
//!   `proto:` prefix before the first `/` as options or a protocol, not as a file name;
//! - `info` inspects the top image only (qemu-img opens it with no backing chain; `--backing-chain`
//!   is never used) and without `-U`: a disk locked by a running VM is refused, not read torn;
//! - `convert` always names the source format (`-f`), so qemu-img never probes, and writes out of
//!   order with 8 coroutines (`-W -m 8`), which was 1.2-1.7x faster than in-order for compressed qcow2
//!   output on 2 cores and equal otherwise; `-p` progress is parsed and reported.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

use crate::prepare::{Progress, Stage};
use crate::{Error, Result};

/// A located qemu-img binary.
#[derive(Debug, Clone)]
pub(crate) struct QemuImg {
    program: PathBuf,
}

/// One `qemu-img convert` run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conversion<'a> {
    pub(crate) input: &'a Path,
    pub(crate) input_format: &'static str,
    pub(crate) output: &'a Path,
    pub(crate) output_format: &'static str,
    /// qcow2 cluster compression (`-c`).
    pub(crate) compressed: bool,
    /// For progress: qemu-img reports percentages, paddock reports bytes.
    pub(crate) virtual_size: u64,
}

/// The parts of `qemu-img info --output=json` paddock uses.
#[derive(Debug, Deserialize)]
pub(crate) struct QemuInfo {
    pub(crate) format: String,
    #[serde(rename = "virtual-size")]
    pub(crate) virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    pub(crate) actual_size: Option<u64>,
    #[serde(rename = "backing-filename", default)]
    pub(crate) backing_filename: Option<String>,
    #[serde(default)]
    pub(crate) encrypted: Option<bool>,
    #[serde(rename = "format-specific", default)]
    pub(crate) format_specific: Option<FormatSpecific>,
}

/// `format-specific` of `qemu-img info`: a type tag and free-form data.
#[derive(Debug, Deserialize)]
pub(crate) struct FormatSpecific {
    #[serde(default)]
    pub(crate) data: serde_json::Value,
}

impl QemuImg {
    /// Finds qemu-img on PATH.
    pub(crate) fn locate() -> Result<Self> {
        Self::locate_in(std::env::var_os("PATH"))
    }

    fn locate_in(path_variable: Option<OsString>) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let path_variable = path_variable.ok_or(Error::QemuImgNotFound)?;
        std::env::split_paths(&path_variable)
            .map(|directory| directory.join("qemu-img"))
            .find(|candidate| {
                std::fs::metadata(candidate)
                    .is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
            })
            .map(|program| QemuImg { program })
            .ok_or(Error::QemuImgNotFound)
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        // Stable, English messages: they are shown to users and matched for the lock error.
        command.env("LC_ALL", "C").stdin(Stdio::null());
        command
    }

    /// `qemu-img info --output=json PATH`: the format is probed from content, the top image only.
    pub(crate) fn info(&self, path: &Path) -> Result<QemuInfo> {
        let output = self
            .command()
            .args(["info", "--output=json"])
            .arg(path)
            .output()
            .map_err(|source| self.spawn_error("inspect", path, source))?;
        if !output.status.success() {
            return Err(failure("inspect", path, &output.stderr));
        }
        serde_json::from_slice(&output.stdout).map_err(|source| Error::QemuImgOutput {
            path: path.to_path_buf(),
            source,
        })
    }

    /// `qemu-img convert -p -f FORMAT -O OUTPUT_FORMAT [-c] -W -m 8 INPUT OUTPUT`, reporting
    /// [`Stage::Convert`] progress in bytes of the virtual size.
    pub(crate) fn convert(&self, job: &Conversion<'_>, progress: &mut dyn Progress) -> Result<()> {
        let Conversion {
            input,
            input_format,
            output,
            output_format,
            compressed,
            virtual_size,
        } = *job;
        let mut command = self.command();
        command.args(["convert", "-p", "-f", input_format, "-O", output_format]);
        if compressed {
            command.arg("-c");
        }
        command
            .args(["-W", "-m", "8"])
            .arg(input)
            .arg(output)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .map_err(|source| self.spawn_error("convert", input, source))?;
        // Drain stderr on a thread so a chatty qemu-img cannot block on a full pipe while we read
        // progress from stdout.
        let stderr_reader = child.stderr.take().map(|mut stderr| {
            std::thread::spawn(move || {
                let mut text = Vec::new();
                let _ = stderr.read_to_end(&mut text);
                text
            })
        });
        progress.update(Stage::Convert, 0, virtual_size);
        if let Some(mut stdout) = child.stdout.take() {
            let mut pending = String::new();
            let mut buffer = [0u8; 4096];
            while let Ok(read) = stdout.read(&mut buffer) {
                if read == 0 {
                    break;
                }
                pending.push_str(&String::from_utf8_lossy(&buffer[..read]));
                // qemu-img ends each report with '\r'; keep an unfinished report for the next read.
                while let Some(end) = pending.find(['\r', '\n']) {
                    if let Some(percent) = parse_progress(&pending[..end]) {
                        let done = (virtual_size as f64 * percent / 100.0) as u64;
                        progress.update(Stage::Convert, done.min(virtual_size), virtual_size);
                    }
                    pending.drain(..=end);
                }
            }
        }
        let status = child
            .wait()
            .map_err(|source| self.spawn_error("convert", input, source))?;
        let stderr = stderr_reader
            .and_then(|handle| handle.join().ok())
            .unwrap_or_default();
        if !status.success() {
            return Err(failure("convert", input, &stderr));
        }
        progress.update(Stage::Convert, virtual_size, virtual_size);
        Ok(())
    }

    fn spawn_error(&self, action: &'static str, path: &Path, source: std::io::Error) -> Error {
        Error::QemuImgSpawn {
            program: self.program.clone(),
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Maps a qemu-img failure to an error; a lock conflict means a running VM owns the disk.
fn failure(action: &'static str, path: &Path, stderr: &[u8]) -> Error {
    let stderr = String::from_utf8_lossy(stderr).trim().replace('\n', "; ");
    if stderr.contains("Failed to get") && stderr.contains("lock") {
        return Error::DiskInUse {
            path: path.to_path_buf(),
            stderr,
        };
    }
    Error::QemuImgFailed {
        action,
        path: path.to_path_buf(),
        stderr,
    }
}

/// Parses one `-p` report, `    (12.34/100%)`, into a percentage.
fn parse_progress(report: &str) -> Option<f64> {
    let start = report.find('(')?;
    let end = report[start..].find("/100%)")?;
    report[start + 1..start + end].trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::{QemuImg, parse_progress};
    use crate::Error;

    #[test]
    fn progress_reports_parse() {
        assert_eq!(parse_progress("    (12.34/100%)"), Some(12.34));
        assert_eq!(parse_progress("    (100.00/100%)"), Some(100.0));
        assert_eq!(parse_progress("garbage"), None);
    }

    #[test]
    fn missing_qemu_img_names_the_package() {
        let empty = tempfile::tempdir().unwrap();
        let error = QemuImg::locate_in(Some(empty.path().as_os_str().to_owned())).unwrap_err();
        assert!(matches!(error, Error::QemuImgNotFound));
        assert!(error.to_string().contains("qemu-utils"), "{error}");
    }
}
