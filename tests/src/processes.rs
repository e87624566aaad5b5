//! Processes a test leaves behind: finding QEMU by the pidfiles in a paddock state directory and
//! making sure none outlives its test.
//!
//! Contract: [`QemuReaper`] kills, when dropped (pass or fail), every process named by a
//! `qemu.pid` under `<state_dir>/vms` whose command line mentions that very pidfile, so an
//! unrelated process that reused the pid is never touched.

use std::path::{Path, PathBuf};

/// Kills every QEMU a test's state directory still has when the test ends.
#[derive(Debug)]
pub struct QemuReaper {
    /// The paddock state directory (`vms/<namespace>/<name>/qemu.pid` below it).
    pub state_dir: PathBuf,
}

impl Drop for QemuReaper {
    fn drop(&mut self) {
        for pidfile in pidfiles(&self.state_dir.join("vms")) {
            let Ok(pid) = std::fs::read_to_string(&pidfile) else {
                continue;
            };
            let pid = pid.trim();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let ours = cmdline
                .split(|byte| *byte == 0)
                .any(|argument| argument == pidfile.as_os_str().as_encoded_bytes());
            if ours {
                let _ = std::process::Command::new("kill").args(["-9", pid]).status();
            }
        }
    }
}

/// Every `qemu.pid` below `directory`.
pub fn pidfiles(directory: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(directory) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(pidfiles(&path));
        } else if path.file_name().is_some_and(|name| name == "qemu.pid") {
            found.push(path);
        }
    }
    found
}

/// Whether `pid` is a live process (a zombie counts as gone).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}
