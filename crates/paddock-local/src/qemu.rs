//! QEMU on this machine: finding it, choosing the accelerator and firmware, building the command
//! line, starting it detached, and recognising (and killing) its processes later.
//!
//! Role: everything the runtime knows about QEMU processes that is not QMP.
//!
//! Contract:
//! - QEMU runs detached (`-daemonize`): it survives the paddock process, and paddock finds it
//!   again through its pidfile. The launch call returns once QEMU has initialised (its QMP, serial
//!   and VNC sockets listen) or failed; start-up errors are in `qemu.log`.
//! - `-no-shutdown`: when the guest powers off, QEMU stays (stopped) until paddock quits it, so a
//!   guest poweroff is never mistaken for a crash, even if paddock was not running at that moment.
//! - A pid counts as "our QEMU" only when `/proc/<pid>/cmdline` names the VM's pidfile and the
//!   process is not a zombie, so a recycled pid is never signalled.
//! - KVM is used when `/dev/kvm` opens read-write and is a full KVM (not `kvm_pvm`, which cannot
//!   boot BIOS guests); otherwise TCG, with a warning logged and kept in the VM's status.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};
use crate::state::{VmId, VmPaths};

/// The block node name of every VM's overlay (the target of snapshots).
pub(crate) const OVERLAY_NODE: &str = "overlay0";
/// How long QEMU may take to initialise before the launch counts as failed.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of `qemu.log` an error quotes.
const LOG_TAIL_BYTES: usize = 2000;
/// `qemu.log` is truncated at a start once it grew beyond this.
const LOG_ROTATE_BYTES: u64 = 1024 * 1024;

/// The CPU accelerator a VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation: works everywhere, several times slower.
    Tcg,
}

impl Accelerator {
    /// QEMU's name for it.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }
}

/// Which accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AcceleratorChoice {
    /// KVM when it is usable, TCG (with a warning) otherwise.
    #[default]
    Auto,
    /// Always KVM; starting fails when `/dev/kvm` cannot be opened.
    Kvm,
    /// Always TCG.
    Tcg,
}

/// The accelerator picked for this runtime, and why not KVM when it is TCG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AcceleratorDecision {
    pub accelerator: Accelerator,
    pub warning: Option<String>,
}

pub(crate) fn decide_accelerator(choice: AcceleratorChoice) -> Result<AcceleratorDecision> {
    match choice {
        AcceleratorChoice::Tcg => Ok(AcceleratorDecision {
            accelerator: Accelerator::Tcg,
            warning: None,
        }),
        AcceleratorChoice::Kvm => {
            kvm_device_opens().map_err(|reason| RuntimeError::Unsupported {
                message: format!("KVM was requested but {reason}; fix access to /dev/kvm or use TCG"),
            })?;
            Ok(AcceleratorDecision {
                accelerator: Accelerator::Kvm,
                warning: None,
            })
        }
        AcceleratorChoice::Auto => match kvm_device_opens().and_then(|()| kvm_runs_ordinary_guests()) {
            Ok(()) => Ok(AcceleratorDecision {
                accelerator: Accelerator::Kvm,
                warning: None,
            }),
            Err(reason) => {
                let warning = format!(
                    "KVM is not usable ({reason}); VMs run under TCG software emulation, several times slower"
                );
                tracing::warn!("{warning}");
                Ok(AcceleratorDecision {
                    accelerator: Accelerator::Tcg,
                    warning: Some(warning),
                })
            }
        },
    }
}

fn kvm_device_opens() -> std::result::Result<(), String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|error| format!("/dev/kvm cannot be opened read-write: {error}"))
}

fn kvm_runs_ordinary_guests() -> std::result::Result<(), String> {
    // kvm_pvm (a paravirtual KVM found in some sandboxes) opens fine but only runs guest kernels
    // built for it: SeaBIOS starts, then syslinux and stock kernels die with an internal error.
    let module_loaded = |name: &str| Path::new("/sys/module").join(name).exists();
    if module_loaded("kvm_pvm") && !module_loaded("kvm_intel") && !module_loaded("kvm_amd") {
        return Err("/dev/kvm is provided by kvm_pvm, which cannot run unmodified guests".to_string());
    }
    Ok(())
}

/// The QEMU programs in use.
#[derive(Debug, Clone)]
pub(crate) struct QemuPrograms {
    pub qemu: Option<PathBuf>,
    pub qemu_img: Option<PathBuf>,
}

impl QemuPrograms {
    pub(crate) fn locate(qemu_override: Option<PathBuf>) -> QemuPrograms {
        let qemu = qemu_override.or_else(|| find_on_path("qemu-system-x86_64"));
        let qemu_img = qemu
            .as_ref()
            .and_then(|qemu| qemu.parent())
            .map(|directory| directory.join("qemu-img"))
            .filter(|candidate| is_executable_file(candidate))
            .or_else(|| find_on_path("qemu-img"));
        QemuPrograms { qemu, qemu_img }
    }

    pub(crate) fn qemu(&self) -> Result<&Path> {
        self.qemu.as_deref().ok_or_else(|| RuntimeError::MissingProgram {
            program: "qemu-system-x86_64".to_string(),
            hint: "install the Debian package qemu-system-x86 (apt-get install -y --no-install-recommends qemu-system-x86)".to_string(),
        })
    }

    pub(crate) fn qemu_img(&self) -> Result<&Path> {
        self.qemu_img.as_deref().ok_or_else(|| RuntimeError::MissingProgram {
            program: "qemu-img".to_string(),
            hint: "install the Debian package qemu-utils (apt-get install -y --no-install-recommends qemu-utils)".to_string(),
        })
    }
}

pub(crate) fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
}

pub(crate) fn find_on_path(program: &str) -> Option<PathBuf> {
    let search_path = std::env::var_os("PATH")?;
    std::env::split_paths(&search_path)
        .map(|directory| directory.join(program))
        .find(|candidate| is_executable_file(candidate))
}

/// OVMF images (Debian's `ovmf` package).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UefiFirmware {
    pub code: PathBuf,
    pub pristine_vars: PathBuf,
    pub secure_boot: bool,
}

/// Plain UEFI: code and variable store, most preferred first.
const OVMF_CANDIDATES: [(&str, &str); 2] = [
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
];
/// Secure Boot: the SMM-enabled code and a variable store with Microsoft's keys enrolled.
const OVMF_SECURE_CANDIDATES: [(&str, &str); 2] = [
    (
        "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.ms.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE.secboot.fd",
        "/usr/share/OVMF/OVMF_VARS.ms.fd",
    ),
];

pub(crate) fn locate_uefi(secure_boot: bool) -> Result<UefiFirmware> {
    let candidates = if secure_boot {
        &OVMF_SECURE_CANDIDATES
    } else {
        &OVMF_CANDIDATES
    };
    candidates
        .iter()
        .find(|(code, vars)| Path::new(code).is_file() && Path::new(vars).is_file())
        .map(|(code, vars)| UefiFirmware {
            code: PathBuf::from(code),
            pristine_vars: PathBuf::from(vars),
            secure_boot,
        })
        .ok_or_else(|| RuntimeError::MissingProgram {
            program: format!(
                "OVMF UEFI firmware (looked for {})",
                candidates
                    .iter()
                    .map(|(code, _)| *code)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            hint: "install the Debian package ovmf (apt-get install -y --no-install-recommends ovmf)"
                .to_string(),
        })
}

/// Everything a QEMU command line is made from.
#[derive(Debug, Clone)]
pub(crate) struct LaunchSpec {
    pub id: VmId,
    pub paths: VmPaths,
    pub accelerator: Accelerator,
    pub cpus: u32,
    pub memory_mib: u64,
    pub uefi: Option<UefiFirmware>,
    pub seed: bool,
    pub vnc: bool,
    pub serial: bool,
    /// Start with the CPUs stopped (`-S`), e.g. to load a snapshot before the guest runs.
    pub paused: bool,
}

/// QEMU's option syntax separates with commas; a doubled comma is a literal one.
fn option_path(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

pub(crate) fn command_line(spec: &LaunchSpec) -> Vec<OsString> {
    let paths = &spec.paths;
    let mut arguments: Vec<String> = vec![
        "-daemonize".into(),
        "-pidfile".into(),
        paths.pidfile.to_string_lossy().into_owned(),
        "-name".into(),
        format!("{}/{}", spec.id.namespace, spec.id.name),
        "-nodefaults".into(),
        "-no-user-config".into(),
    ];
    let mut machine = format!("q35,accel={}", spec.accelerator.qemu_name());
    if spec.uefi.as_ref().is_some_and(|uefi| uefi.secure_boot) {
        machine.push_str(",smm=on");
    }
    arguments.extend(["-machine".into(), machine]);
    if spec.accelerator == Accelerator::Kvm {
        arguments.extend(["-cpu".into(), "host".into()]);
    }
    arguments.extend([
        "-smp".into(),
        spec.cpus.to_string(),
        "-m".into(),
        spec.memory_mib.to_string(),
        "-display".into(),
        "none".into(),
    ]);
    if spec.vnc {
        arguments.extend([
            "-vga".into(),
            "std".into(),
            "-vnc".into(),
            format!("unix:{}", option_path(&paths.vnc_socket)),
        ]);
    } else {
        arguments.extend(["-vga".into(), "none".into()]);
    }
    if spec.serial {
        arguments.extend([
            "-chardev".into(),
            format!(
                "socket,id=serial0,path={},server=on,wait=off,logfile={}",
                option_path(&paths.serial_socket),
                option_path(&paths.console_log)
            ),
            "-serial".into(),
            "chardev:serial0".into(),
        ]);
    }
    arguments.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", option_path(&paths.qmp_socket)),
    ]);
    if let Some(uefi) = &spec.uefi {
        if uefi.secure_boot {
            arguments.extend([
                "-global".into(),
                "driver=cfi.pflash01,property=secure,value=on".into(),
            ]);
        }
        arguments.extend([
            "-drive".into(),
            format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                option_path(&uefi.code)
            ),
            "-drive".into(),
            format!(
                "if=pflash,format=raw,unit=1,file={}",
                option_path(&paths.uefi_vars)
            ),
        ]);
    }
    arguments.extend([
        "-drive".into(),
        format!(
            "file={},format=qcow2,if=none,id=disk0,node-name={OVERLAY_NODE}",
            option_path(&paths.overlay)
        ),
        "-device".into(),
        "virtio-blk-pci,drive=disk0,bootindex=1".into(),
    ]);
    if spec.seed {
        arguments.extend([
            "-drive".into(),
            format!(
                "file={},format=raw,if=none,id=cidata,readonly=on",
                option_path(&paths.seed)
            ),
            "-device".into(),
            "virtio-blk-pci,drive=cidata".into(),
        ]);
    }
    arguments.extend([
        "-nic".into(),
        "user,model=virtio-net-pci".into(),
        "-device".into(),
        "virtio-rng-pci".into(),
        "-no-shutdown".into(),
    ]);
    if spec.paused {
        arguments.push("-S".into());
    }
    arguments.into_iter().map(OsString::from).collect()
}

/// Starts QEMU detached and returns its pid once it has initialised.
pub(crate) async fn launch(qemu: &Path, spec: &LaunchSpec) -> Result<u32> {
    let paths = &spec.paths;
    for stale in [
        &paths.pidfile,
        &paths.qmp_socket,
        &paths.serial_socket,
        &paths.vnc_socket,
    ] {
        match std::fs::remove_file(stale) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(RuntimeError::io("remove stale", stale, source)),
        }
    }
    let rotate = std::fs::metadata(&paths.qemu_log).is_ok_and(|metadata| metadata.len() > LOG_ROTATE_BYTES);
    let mut log = OpenOptions::new()
        .create(true)
        .append(!rotate)
        .write(true)
        .truncate(rotate)
        .open(&paths.qemu_log)
        .map_err(|source| RuntimeError::io("open", &paths.qemu_log, source))?;
    let arguments = command_line(spec);
    {
        use std::io::Write;
        let printable: Vec<String> = arguments
            .iter()
            .map(|argument| argument.to_string_lossy().into_owned())
            .collect();
        writeln!(
            log,
            "=== paddock starts qemu at {}: {} {}",
            crate::state::now_seconds(),
            qemu.display(),
            printable.join(" ")
        )
        .map_err(|source| RuntimeError::io("write", &paths.qemu_log, source))?;
    }
    let stderr = log
        .try_clone()
        .map_err(|source| RuntimeError::io("open", &paths.qemu_log, source))?;
    let mut command = tokio::process::Command::new(qemu);
    command
        .args(&arguments)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(log))
        .stderr(std::process::Stdio::from(stderr))
        // The launcher exits once QEMU has daemonised; the daemon itself is not our child.
        .kill_on_drop(true);
    let mut launcher = command.spawn().map_err(|source| RuntimeError::QemuStart {
        id: spec.id.clone(),
        details: format!("cannot run {}: {source}", qemu.display()),
    })?;
    let status = match tokio::time::timeout(LAUNCH_TIMEOUT, launcher.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(source)) => return Err(RuntimeError::io("wait for", qemu, source)),
        Err(_) => {
            return Err(RuntimeError::QemuStart {
                id: spec.id.clone(),
                details: format!(
                    "qemu did not finish initialising within {LAUNCH_TIMEOUT:?}\n{}",
                    log_tail(&paths.qemu_log)
                ),
            });
        }
    };
    if !status.success() {
        return Err(RuntimeError::QemuStart {
            id: spec.id.clone(),
            details: format!("qemu exited with {status}\n{}", log_tail(&paths.qemu_log)),
        });
    }
    read_pidfile(&paths.pidfile)?.ok_or_else(|| RuntimeError::QemuStart {
        id: spec.id.clone(),
        details: format!(
            "qemu reported success but wrote no pidfile {}\n{}",
            paths.pidfile.display(),
            log_tail(&paths.qemu_log)
        ),
    })
}

/// The last lines of `qemu.log`, for error messages.
pub(crate) fn log_tail(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(LOG_TAIL_BYTES);
            format!(
                "--- end of {} ---\n{}",
                path.display(),
                String::from_utf8_lossy(&bytes[start..]).trim_end()
            )
        }
        Err(error) => format!("({} is unreadable: {error})", path.display()),
    }
}

/// The pid in a pidfile; `None` when there is no pidfile.
pub(crate) fn read_pidfile(path: &Path) -> Result<Option<u32>> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| RuntimeError::CorruptRecord {
                path: path.to_path_buf(),
                details: format!("{:?} is not a process id", text.trim()),
            }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RuntimeError::io("read", path, source)),
    }
}

/// Whether `pid` is a live (not zombie) QEMU of the VM whose pidfile is `pidfile`.
pub(crate) fn is_our_qemu(pid: u32, pidfile: &Path) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
        return false;
    };
    let names_pidfile = cmdline
        .split(|byte| *byte == 0)
        .any(|argument| argument == pidfile.as_os_str().as_encoded_bytes());
    names_pidfile && !is_zombie(&proc_dir)
}

fn is_zombie(proc_dir: &Path) -> bool {
    // /proc/<pid>/stat: "pid (comm) state ..."; comm may contain spaces and parentheses, so the
    // state is the first field after the last ')'.
    std::fs::read_to_string(proc_dir.join("stat")).map_or(true, |stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X")
    })
}

/// Sends SIGKILL to `pid` if it is still the VM's QEMU.
pub(crate) fn kill_our_qemu(pid: u32, pidfile: &Path) {
    if !is_our_qemu(pid, pidfile) {
        return;
    }
    let Some(pid_value) = rustix::process::Pid::from_raw(pid as i32) else {
        return;
    };
    if let Err(error) = rustix::process::kill_process(pid_value, rustix::process::Signal::KILL) {
        tracing::warn!(pid, %error, "failed to kill qemu");
    }
}

/// Waits until `pid` is no longer the VM's QEMU; false when it still is after `timeout`.
pub(crate) async fn wait_for_exit(pid: u32, pidfile: &Path, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !is_our_qemu(pid, pidfile) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::VmPaths;

    fn spec(uefi: Option<UefiFirmware>) -> LaunchSpec {
        LaunchSpec {
            id: VmId::new("default", "web").unwrap(),
            paths: VmPaths::new(PathBuf::from("/state/vms/default/web"), Path::new("/run/p,1")),
            accelerator: Accelerator::Tcg,
            cpus: 2,
            memory_mib: 512,
            uefi,
            seed: true,
            vnc: true,
            serial: true,
            paused: false,
        }
    }

    #[test]
    fn command_line_has_detached_sockets_and_disks() {
        let arguments: Vec<String> = command_line(&spec(None))
            .into_iter()
            .map(|argument| argument.into_string().unwrap())
            .collect();
        let joined = arguments.join(" ");
        assert!(
            joined.contains("-daemonize -pidfile /state/vms/default/web/qemu.pid"),
            "{joined}"
        );
        assert!(joined.contains("-machine q35,accel=tcg"), "{joined}");
        assert!(
            joined.contains("-qmp unix:/run/p,,1/qmp.sock,server=on,wait=off"),
            "{joined}"
        );
        assert!(joined.contains("-vnc unix:/run/p,,1/vnc.sock"), "{joined}");
        assert!(
            joined.contains("logfile=/state/vms/default/web/console.log"),
            "{joined}"
        );
        assert!(joined.contains("node-name=overlay0"), "{joined}");
        assert!(joined.contains("id=cidata,readonly=on"), "{joined}");
        assert!(joined.contains("-no-shutdown"), "{joined}");
        assert!(!joined.contains("pflash"), "{joined}");
        assert!(!arguments.contains(&"-S".to_string()));
    }

    #[test]
    fn secure_boot_needs_smm_and_secure_flash() {
        let uefi = UefiFirmware {
            code: PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"),
            pristine_vars: PathBuf::from("/usr/share/OVMF/OVMF_VARS_4M.ms.fd"),
            secure_boot: true,
        };
        let joined = command_line(&spec(Some(uefi)))
            .into_iter()
            .map(|argument| argument.into_string().unwrap())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(joined.contains("q35,accel=tcg,smm=on"), "{joined}");
        assert!(
            joined.contains("cfi.pflash01,property=secure,value=on"),
            "{joined}"
        );
        assert!(
            joined.contains("unit=1,file=/state/vms/default/web/uefi-vars.fd"),
            "{joined}"
        );
    }

    #[test]
    fn this_process_is_not_mistaken_for_a_vm() {
        assert!(!is_our_qemu(std::process::id(), Path::new("/nowhere/qemu.pid")));
        assert!(!is_our_qemu(u32::MAX - 1, Path::new("/nowhere/qemu.pid")));
    }
}
