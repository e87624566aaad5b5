//! Running throwaway QEMU virtual machines from tests.
//!
//! Role: the smallest harness that lets a test boot a disk image, talk to its serial console and
//! stop it again, so paddock's local runtime and the test disk can be exercised for real.
//!
//! Contract:
//! - [`Qemu::locate`] finds `qemu-system-x86_64` (`PADDOCK_QEMU_BINARY` overrides the search of
//!   `PATH`) and picks the accelerator: KVM when `/dev/kvm` can be opened read-write and is a
//!   full KVM (not the paravirtual `kvm_pvm`, which cannot boot SeaBIOS/syslinux guests),
//!   otherwise TCG with a loud warning on stderr. `PADDOCK_QEMU_ACCEL=kvm|tcg|auto` forces the
//!   choice; `kvm` fails only when `/dev/kvm` cannot be opened and never falls back.
//! - A missing QEMU is an error, never a silent pass: [`require_qemu`] returns `Ok(None)` only when
//!   `PADDOCK_ALLOW_SKIP=1`, after printing a loud SKIP line.
//! - [`RunningVm`] owns the QEMU process: no window (`-display none`), a standard VGA card (so a
//!   framebuffer exists for later VNC checks), the first serial port on QEMU's stdin/stdout pipes
//!   and a QMP socket in a private scratch directory. Dropping it kills QEMU.
//! - Serial output is split into lines with carriage returns and terminal escape sequences
//!   removed; every line is echoed to stderr as `[serial] ...` so a failing test shows the
//!   console transcript. Lines are consumed in order: a wait only sees lines that arrived after
//!   the line the previous wait returned.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Environment variable overriding the path of `qemu-system-x86_64`.
pub const QEMU_BINARY_VARIABLE: &str = "PADDOCK_QEMU_BINARY";
/// Environment variable forcing the accelerator: `kvm`, `tcg` or `auto` (the default).
pub const ACCELERATOR_VARIABLE: &str = "PADDOCK_QEMU_ACCEL";
/// Environment variable that turns "QEMU is missing" from a failure into a loud skip when set to `1`.
pub const ALLOW_SKIP_VARIABLE: &str = "PADDOCK_ALLOW_SKIP";

/// How many trailing serial lines an error message quotes.
const TRANSCRIPT_TAIL_LINES: usize = 60;

/// Errors from locating, starting, driving or stopping QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// No QEMU binary was found.
    #[error(
        "qemu-system-x86_64 was not found on PATH; install the Debian package qemu-system-x86 \
         (apt-get install -y --no-install-recommends qemu-system-x86), set PADDOCK_QEMU_BINARY, \
         or set PADDOCK_ALLOW_SKIP=1 to skip tests that need it"
    )]
    BinaryNotFound,
    /// `PADDOCK_QEMU_BINARY` points at something that is not an executable file.
    #[error(
        "PADDOCK_QEMU_BINARY={path} is not an executable file; point it at qemu-system-x86_64 or unset it"
    )]
    BinaryOverrideInvalid {
        /// The configured path.
        path: PathBuf,
    },
    /// UEFI was requested but no OVMF firmware is installed.
    #[error(
        "no OVMF firmware found (looked for {looked_for}); install the Debian package ovmf \
         (apt-get install -y --no-install-recommends ovmf)"
    )]
    FirmwareNotFound {
        /// The code images that were looked for.
        looked_for: String,
    },
    /// The writable copy of the UEFI variable store could not be made.
    #[error("failed to copy the OVMF variable store {source_path} to {destination}: {source}")]
    FirmwareVariables {
        /// The pristine variable store.
        source_path: PathBuf,
        /// The per-VM copy.
        destination: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `qemu-img` is needed for overlays but missing.
    #[error(
        "qemu-img was not found on PATH; install the Debian package qemu-utils \
         (apt-get install -y --no-install-recommends qemu-utils)"
    )]
    ImageToolNotFound,
    /// `PADDOCK_QEMU_ACCEL` holds an unknown value.
    #[error("PADDOCK_QEMU_ACCEL={value:?} is not understood; use kvm, tcg or auto")]
    InvalidAcceleratorSetting {
        /// The value found in the environment.
        value: String,
    },
    /// KVM was demanded with `PADDOCK_QEMU_ACCEL=kvm` but cannot be used.
    #[error(
        "PADDOCK_QEMU_ACCEL=kvm but KVM is unusable: {reason}; fix /dev/kvm access or use PADDOCK_QEMU_ACCEL=tcg"
    )]
    KvmUnavailable {
        /// Why KVM was rejected.
        reason: String,
    },
    /// A scratch directory could not be created.
    #[error(
        "failed to create scratch directory {path}: {source}; check that the temporary directory is writable"
    )]
    ScratchDirectory {
        /// The directory that could not be created.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `qemu-img create` failed.
    #[error(
        "failed to create qcow2 overlay {overlay} on {base}: {details}; check that the base image exists and qemu-img works"
    )]
    OverlayCreation {
        /// The base (backing) image.
        base: PathBuf,
        /// The overlay that was to be created.
        overlay: PathBuf,
        /// What went wrong, including qemu-img's stderr.
        details: String,
    },
    /// QEMU could not be started.
    #[error("failed to start {binary}: {source}; check that QEMU is installed and runnable")]
    Spawn {
        /// The QEMU binary.
        binary: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The serial console did not print the expected line in time.
    #[error(
        "timed out after {timeout:?} waiting for serial line {expected}; the VM is stuck or too slow \
         (under TCG raise the timeout).\n--- last serial lines ---\n{transcript}\n--- qemu stderr ---\n{qemu_stderr}"
    )]
    SerialTimeout {
        /// Description of the line that was awaited.
        expected: String,
        /// How long the wait lasted.
        timeout: Duration,
        /// The last serial lines.
        transcript: String,
        /// QEMU's own diagnostics.
        qemu_stderr: String,
    },
    /// QEMU exited (or closed the serial pipe) while a line was awaited.
    #[error(
        "qemu exited before the serial console printed {expected}; see its diagnostics below.\n\
         --- last serial lines ---\n{transcript}\n--- qemu stderr ---\n{qemu_stderr}"
    )]
    ExitedEarly {
        /// Description of the line that was awaited.
        expected: String,
        /// The last serial lines.
        transcript: String,
        /// QEMU's own diagnostics.
        qemu_stderr: String,
    },
    /// KVM failed to run the guest; QEMU stops such a guest without exiting.
    #[error(
        "kvm could not run the guest (\"KVM internal error\") while waiting for serial line {expected}; \
         this host's KVM cannot run this guest, use PADDOCK_QEMU_ACCEL=tcg.\n\
         --- last serial lines ---\n{transcript}\n--- qemu stderr ---\n{qemu_stderr}"
    )]
    AcceleratorFailure {
        /// Description of the line that was awaited.
        expected: String,
        /// The last serial lines.
        transcript: String,
        /// QEMU's own diagnostics.
        qemu_stderr: String,
    },
    /// Writing to the serial console failed.
    #[error("failed to write to the VM serial console: {source}; QEMU has probably exited")]
    SerialWrite {
        /// The underlying error.
        source: std::io::Error,
    },
    /// Waiting for or signalling the QEMU process failed.
    #[error("failed to {action} the qemu process: {source}")]
    Process {
        /// What was attempted.
        action: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// QEMU kept running after the guest was asked to power off.
    #[error(
        "qemu did not exit within {timeout:?} after the guest was asked to power off.\n\
         --- last serial lines ---\n{transcript}"
    )]
    ShutdownTimeout {
        /// How long the wait lasted.
        timeout: Duration,
        /// The last serial lines.
        transcript: String,
    },
    /// Talking to QEMU's QMP socket failed.
    #[error("qmp command {command} failed: {details}; check that qemu is still running")]
    Qmp {
        /// The QMP command.
        command: String,
        /// What went wrong.
        details: String,
    },
}

/// The CPU accelerator QEMU runs the guest with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accelerator {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulator: slow (seconds instead of fractions of one) but works anywhere.
    Tcg,
}

impl Accelerator {
    /// The name QEMU's `-accel` option takes.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }
}

/// How the disk is attached; each bus implies the machine type a KubeVirt-like VM would use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBus {
    /// virtio-blk on a q35 machine (KubeVirt's default `bus: virtio`).
    Virtio,
    /// SATA through the q35 machine's built-in AHCI controller (KubeVirt `bus: sata`).
    Sata,
    /// Legacy IDE on the i440fx (`pc`) machine's PIIX controller.
    Ide,
}

impl DiskBus {
    fn machine(self) -> &'static str {
        match self {
            DiskBus::Virtio | DiskBus::Sata => "q35",
            DiskBus::Ide => "pc",
        }
    }

    fn device_argument(self) -> &'static str {
        match self {
            DiskBus::Virtio => "virtio-blk-pci,drive=disk0,bootindex=1",
            // Both machines name the first port of their built-in controller `ide.0`.
            DiskBus::Sata | DiskBus::Ide => "ide-hd,drive=disk0,bus=ide.0,bootindex=1",
        }
    }
}

/// The firmware the VM boots with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS, QEMU's default (KubeVirt's default `bios` bootloader).
    Bios,
    /// OVMF, the EDK II UEFI firmware (KubeVirt's `efi` bootloader without secure boot).
    Uefi,
}

/// OVMF code and variable-store images, most preferred first (Debian's `ovmf` package paths).
const OVMF_CANDIDATES: [(&str, &str); 2] = [
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
];

/// What to boot and how.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The qcow2 image to boot; it is opened read-write, so pass an overlay, never a shared base.
    pub disk: PathBuf,
    /// How the disk is attached.
    pub disk_bus: DiskBus,
    /// BIOS or UEFI.
    pub firmware: Firmware,
    /// Guest memory.
    pub memory_mib: u32,
    /// Further QEMU arguments, appended last.
    pub extra_arguments: Vec<OsString>,
}

impl VmConfig {
    /// A 256 MiB VM booting `disk` over virtio-blk.
    pub fn new(disk: impl Into<PathBuf>) -> Self {
        VmConfig {
            disk: disk.into(),
            disk_bus: DiskBus::Virtio,
            firmware: Firmware::Bios,
            memory_mib: 256,
            extra_arguments: Vec::new(),
        }
    }

    /// The same configuration with another disk bus.
    pub fn with_disk_bus(mut self, disk_bus: DiskBus) -> Self {
        self.disk_bus = disk_bus;
        self
    }

    /// The same configuration with other firmware.
    pub fn with_firmware(mut self, firmware: Firmware) -> Self {
        self.firmware = firmware;
        self
    }
}

/// A located QEMU installation plus the accelerator chosen for this machine.
#[derive(Debug, Clone)]
pub struct Qemu {
    binary: PathBuf,
    accelerator: Accelerator,
}

/// Whether `PADDOCK_ALLOW_SKIP=1` permits skipping tests whose prerequisites are missing.
pub fn skip_allowed() -> bool {
    std::env::var_os(ALLOW_SKIP_VARIABLE).is_some_and(|value| value == "1")
}

/// Locates QEMU for a test named `test_name`.
///
/// Returns `Ok(None)` (after printing a loud SKIP line) only when QEMU is missing and
/// `PADDOCK_ALLOW_SKIP=1`; otherwise a missing QEMU is an error, so a test cannot pass by accident.
pub fn require_qemu(test_name: &str) -> Result<Option<Qemu>, QemuError> {
    match Qemu::locate() {
        Ok(qemu) => Ok(Some(qemu)),
        Err(error @ (QemuError::BinaryNotFound | QemuError::BinaryOverrideInvalid { .. }))
            if skip_allowed() =>
        {
            eprintln!(
                "\n!!!!!!!! SKIP {test_name}: {error} (skipped because PADDOCK_ALLOW_SKIP=1) !!!!!!!!\n"
            );
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

impl Qemu {
    /// Finds `qemu-system-x86_64` and selects the accelerator (see the module documentation).
    pub fn locate() -> Result<Qemu, QemuError> {
        let binary = match std::env::var_os(QEMU_BINARY_VARIABLE) {
            Some(path) => {
                let path = PathBuf::from(path);
                if !is_executable_file(&path) {
                    return Err(QemuError::BinaryOverrideInvalid { path });
                }
                path
            }
            None => find_on_path("qemu-system-x86_64").ok_or(QemuError::BinaryNotFound)?,
        };
        Ok(Qemu {
            binary,
            accelerator: selected_accelerator()?,
        })
    }

    /// The QEMU binary in use.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The accelerator VMs are started with.
    pub fn accelerator(&self) -> Accelerator {
        self.accelerator
    }

    /// Creates a qcow2 overlay at `overlay` backed by `base`, so a test can write to a disk without
    /// touching the (shared, cached) base image.
    pub fn create_overlay(&self, base: &Path, overlay: &Path) -> Result<(), QemuError> {
        let overlay_error = |details: String| QemuError::OverlayCreation {
            base: base.to_path_buf(),
            overlay: overlay.to_path_buf(),
            details,
        };
        let image_tool = self
            .binary
            .parent()
            .map(|directory| directory.join("qemu-img"))
            .filter(|candidate| is_executable_file(candidate))
            .or_else(|| find_on_path("qemu-img"))
            .ok_or(QemuError::ImageToolNotFound)?;
        // The overlay records the backing path verbatim; a relative one would resolve against
        // the overlay's directory instead of ours.
        let base = std::path::absolute(base).map_err(|error| overlay_error(error.to_string()))?;
        let output = Command::new(&image_tool)
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&base)
            .arg(overlay)
            .output()
            .map_err(|error| overlay_error(format!("cannot run {}: {error}", image_tool.display())))?;
        if !output.status.success() {
            return Err(overlay_error(format!(
                "qemu-img {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Boots a VM. `scratch` holds the QMP socket and QEMU's stderr log and must outlive the VM.
    pub fn start(&self, config: &VmConfig, scratch: &ScratchDirectory) -> Result<RunningVm, QemuError> {
        let qmp_socket = scratch.path().join("qmp.sock");
        let stderr_log = scratch.path().join("qemu-stderr.log");
        let stderr_file =
            std::fs::File::create(&stderr_log).map_err(|source| QemuError::ScratchDirectory {
                path: stderr_log.clone(),
                source,
            })?;

        let mut drive = OsString::from("file=");
        // QEMU's option syntax uses commas as separators; doubling escapes them in the path.
        drive.push(config.disk.as_os_str().to_string_lossy().replace(',', ",,"));
        drive.push(",format=qcow2,if=none,id=disk0");
        let mut qmp = OsString::from("unix:");
        qmp.push(qmp_socket.as_os_str());
        qmp.push(",server=on,wait=off");

        let firmware_arguments = match config.firmware {
            Firmware::Bios => Vec::new(),
            Firmware::Uefi => uefi_arguments(scratch)?,
        };

        let mut command = Command::new(&self.binary);
        command
            .args(["-nodefaults", "-no-user-config", "-name", "paddock-test"])
            .args(["-machine", config.disk_bus.machine()])
            .args(["-accel", self.accelerator.qemu_name()])
            .args(["-smp", "1", "-m"])
            .arg(config.memory_mib.to_string())
            .args(["-display", "none", "-vga", "std"])
            // signal=off: a stray Ctrl-C byte on the pipe must reach the guest, not kill QEMU.
            .args([
                "-chardev",
                "stdio,id=serial0,signal=off",
                "-serial",
                "chardev:serial0",
            ])
            .arg("-qmp")
            .arg(qmp)
            .args(&firmware_arguments)
            .arg("-drive")
            .arg(drive)
            .args(["-device", config.disk_bus.device_argument()])
            // A guest panic or reboot ends the process, so tests fail fast instead of looping.
            .arg("-no-reboot")
            .args(&config.extra_arguments)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr_file));
        let mut child = command.spawn().map_err(|source| QemuError::Spawn {
            binary: self.binary.clone(),
            source,
        })?;

        let (sender, receiver) = channel();
        if let Some(mut stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                let mut buffer = [0_u8; 4096];
                loop {
                    match stdout.read(&mut buffer) {
                        Ok(0) | Err(_) => break,
                        Ok(count) => {
                            if sender.send(buffer[..count].to_vec()).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
        let stdin = child.stdin.take();
        Ok(RunningVm {
            child,
            stdin,
            serial: SerialLines::new(receiver),
            qmp_socket,
            stderr_log,
            accelerator: self.accelerator,
            started: Instant::now(),
        })
    }
}

/// Pflash arguments for OVMF, with a private copy of the variable store (the firmware writes
/// boot entries into it, and the installed one is shared and read-only).
fn uefi_arguments(scratch: &ScratchDirectory) -> Result<Vec<OsString>, QemuError> {
    let (code, variables) = OVMF_CANDIDATES
        .iter()
        .find(|(code, variables)| Path::new(code).is_file() && Path::new(variables).is_file())
        .ok_or_else(|| QemuError::FirmwareNotFound {
            looked_for: OVMF_CANDIDATES
                .iter()
                .map(|(code, _)| *code)
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let variables_copy = scratch.path().join("ovmf-vars.fd");
    std::fs::copy(variables, &variables_copy).map_err(|source| QemuError::FirmwareVariables {
        source_path: PathBuf::from(variables),
        destination: variables_copy.clone(),
        source,
    })?;
    let mut code_drive = OsString::from("if=pflash,format=raw,unit=0,readonly=on,file=");
    code_drive.push(code);
    let mut variables_drive = OsString::from("if=pflash,format=raw,unit=1,file=");
    variables_drive.push(variables_copy.as_os_str().to_string_lossy().replace(',', ",,"));
    Ok(vec![
        "-drive".into(),
        code_drive,
        "-drive".into(),
        variables_drive,
    ])
}

/// The accelerator for this process, chosen once (so the warning is printed once).
fn selected_accelerator() -> Result<Accelerator, QemuError> {
    static AUTOMATIC: OnceLock<Accelerator> = OnceLock::new();
    let requested = std::env::var(ACCELERATOR_VARIABLE).unwrap_or_default();
    match requested.as_str() {
        "kvm" => {
            kvm_device_opens().map_err(|reason| QemuError::KvmUnavailable { reason })?;
            // Forced: the caller asked for KVM, so try it even where the heuristic doubts it.
            if let Err(reason) = kvm_runs_ordinary_guests() {
                eprintln!("WARNING: PADDOCK_QEMU_ACCEL=kvm although {reason}; expect the guest to fail");
            }
            Ok(Accelerator::Kvm)
        }
        "tcg" => Ok(Accelerator::Tcg),
        "" | "auto" => Ok(*AUTOMATIC.get_or_init(automatic_accelerator)),
        _ => Err(QemuError::InvalidAcceleratorSetting { value: requested }),
    }
}

fn automatic_accelerator() -> Accelerator {
    match kvm_usability() {
        Ok(()) => Accelerator::Kvm,
        Err(reason) => {
            eprintln!(
                "\n!!!!!!!! WARNING: KVM is not usable ({reason}); falling back to TCG software emulation. \
                 VMs boot several times slower; timeouts are sized for it. !!!!!!!!\n"
            );
            Accelerator::Tcg
        }
    }
}

/// `Ok` when `/dev/kvm` can run ordinary guests, else why not.
fn kvm_usability() -> Result<(), String> {
    kvm_device_opens()?;
    kvm_runs_ordinary_guests()
}

fn kvm_device_opens() -> Result<(), String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|error| format!("cannot open /dev/kvm read-write: {error}"))
}

fn kvm_runs_ordinary_guests() -> Result<(), String> {
    // Some sandboxes expose KVM through kvm_pvm, a paravirtual flavour that boots only guest
    // kernels built for it: SeaBIOS starts, then syslinux and stock kernels die with an internal
    // error. Opening the device succeeds there, so the module has to be checked.
    let module_loaded = |name: &str| Path::new("/sys/module").join(name).exists();
    if module_loaded("kvm_pvm") && !module_loaded("kvm_intel") && !module_loaded("kvm_amd") {
        return Err("/dev/kvm is provided by kvm_pvm, which cannot run unmodified guests".to_string());
    }
    Ok(())
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let search_path = std::env::var_os("PATH")?;
    std::env::split_paths(&search_path)
        .map(|directory| directory.join(program))
        .find(|candidate| is_executable_file(candidate))
}

/// A private temporary directory, removed with its contents on drop.
#[derive(Debug)]
pub struct ScratchDirectory {
    path: PathBuf,
}

impl ScratchDirectory {
    /// Creates a fresh directory under the system temporary directory. It is kept short because
    /// it holds unix sockets, whose paths are limited to about 100 bytes.
    pub fn new(purpose: &str) -> Result<ScratchDirectory, QemuError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanoseconds = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "paddock-{purpose}-{}-{}-{nanoseconds}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path).map_err(|source| QemuError::ScratchDirectory {
            path: path.clone(),
            source,
        })?;
        Ok(ScratchDirectory { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDirectory {
    fn drop(&mut self) {
        // Best effort: a leftover directory in /tmp is harmless and must not mask a test result.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Serial console bytes turned into clean lines.
struct SerialLines {
    receiver: Receiver<Vec<u8>>,
    partial: Vec<u8>,
    unconsumed: VecDeque<String>,
    transcript: Vec<String>,
    closed: bool,
}

impl SerialLines {
    fn new(receiver: Receiver<Vec<u8>>) -> Self {
        SerialLines {
            receiver,
            partial: Vec::new(),
            unconsumed: VecDeque::new(),
            transcript: Vec::new(),
            closed: false,
        }
    }

    fn absorb(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if byte == b'\n' {
                let line = clean_line(&self.partial);
                self.partial.clear();
                eprintln!("[serial] {line}");
                self.transcript.push(line.clone());
                self.unconsumed.push_back(line);
            } else {
                self.partial.push(byte);
            }
        }
    }

    /// Returns the next line, waiting until `deadline`; `Ok(None)` means the deadline passed and
    /// `Err(())` that QEMU closed the console.
    fn next_line(&mut self, deadline: Instant) -> Result<Option<String>, ()> {
        loop {
            if let Some(line) = self.unconsumed.pop_front() {
                return Ok(Some(line));
            }
            if self.closed {
                return Err(());
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(None);
            }
            match self.receiver.recv_timeout(remaining) {
                Ok(bytes) => self.absorb(&bytes),
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => {
                    self.closed = true;
                    if !self.partial.is_empty() {
                        self.absorb(b"\n");
                    }
                }
            }
        }
    }

    fn tail(&self) -> String {
        let start = self.transcript.len().saturating_sub(TRANSCRIPT_TAIL_LINES);
        let mut tail = self.transcript[start..].join("\n");
        if !self.partial.is_empty() {
            tail.push('\n');
            tail.push_str(&clean_line(&self.partial));
        }
        tail
    }
}

/// The fraction of non-black pixels in a binary (P6, 8-bit) PPM image, or `None` if it is not one.
fn lit_fraction_of_ppm(image: &[u8]) -> Option<f64> {
    // Header: "P6", width, height, maximum value, each separated by whitespace, then one
    // whitespace byte before the pixel data. QEMU writes no comments.
    let mut fields = Vec::new();
    let mut position = 0;
    while fields.len() < 4 {
        while image.get(position)?.is_ascii_whitespace() {
            position += 1;
        }
        let start = position;
        while !image.get(position)?.is_ascii_whitespace() {
            position += 1;
        }
        fields.push(std::str::from_utf8(&image[start..position]).ok()?);
    }
    let pixels = image.get(position + 1..)?;
    let width: usize = fields[1].parse().ok()?;
    let height: usize = fields[2].parse().ok()?;
    if fields[0] != "P6" || fields[3] != "255" || width * height == 0 || pixels.len() < width * height * 3 {
        return None;
    }
    let lit = pixels[..width * height * 3]
        .chunks_exact(3)
        .filter(|pixel| pixel.iter().any(|&value| value != 0))
        .count();
    Some(lit as f64 / (width * height) as f64)
}

/// Drops carriage returns, ANSI/VT100 escape sequences and other control bytes (the busybox
/// shell queries the cursor position with `ESC [ 6 n` before each prompt).
pub fn clean_line(raw: &[u8]) -> String {
    let mut cleaned = Vec::with_capacity(raw.len());
    let mut index = 0;
    while index < raw.len() {
        let byte = raw[index];
        if byte == 0x1b {
            index += 1;
            if raw.get(index) == Some(&b'[') {
                index += 1;
                // Parameters and intermediates run until a final byte in 0x40..=0x7e.
                while index < raw.len() && !(0x40..=0x7e).contains(&raw[index]) {
                    index += 1;
                }
            }
            index += 1;
            continue;
        }
        if byte == b'\t' || byte >= 0x20 {
            cleaned.push(byte);
        }
        index += 1;
    }
    String::from_utf8_lossy(&cleaned).trim_end().to_string()
}

/// A running QEMU process; killed when dropped.
pub struct RunningVm {
    child: Child,
    stdin: Option<ChildStdin>,
    serial: SerialLines,
    qmp_socket: PathBuf,
    stderr_log: PathBuf,
    accelerator: Accelerator,
    started: Instant,
}

impl RunningVm {
    /// The accelerator this VM runs with.
    pub fn accelerator(&self) -> Accelerator {
        self.accelerator
    }

    /// Time since QEMU was started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits for the next serial line equal to `expected` (after cleaning) and returns it.
    pub fn wait_for_line(&mut self, expected: &str, timeout: Duration) -> Result<String, QemuError> {
        self.wait_for_line_matching(&format!("{expected:?}"), timeout, |line| line == expected)
    }

    /// Waits for the next serial line accepted by `matches`; `description` names it in errors.
    pub fn wait_for_line_matching(
        &mut self,
        description: &str,
        timeout: Duration,
        mut matches: impl FnMut(&str) -> bool,
    ) -> Result<String, QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            // Wake up every second while the console is quiet to look for a guest QEMU has
            // stopped but not exited from, which would otherwise cost the whole timeout.
            let slice_deadline = deadline.min(Instant::now() + Duration::from_secs(1));
            match self.serial.next_line(slice_deadline) {
                Ok(Some(line)) if matches(&line) => return Ok(line),
                Ok(Some(_)) => {}
                Ok(None) if Instant::now() < deadline => {
                    let qemu_stderr = self.qemu_stderr();
                    if qemu_stderr.contains("KVM internal error") {
                        return Err(QemuError::AcceleratorFailure {
                            expected: description.to_string(),
                            transcript: self.serial.tail(),
                            qemu_stderr,
                        });
                    }
                }
                Ok(None) => {
                    return Err(QemuError::SerialTimeout {
                        expected: description.to_string(),
                        timeout,
                        transcript: self.serial.tail(),
                        qemu_stderr: self.qemu_stderr(),
                    });
                }
                Err(()) => {
                    // Give QEMU a moment to finish writing its diagnostics before quoting them.
                    let _ = self.wait_for_exit_quietly(Duration::from_secs(2));
                    return Err(QemuError::ExitedEarly {
                        expected: description.to_string(),
                        transcript: self.serial.tail(),
                        qemu_stderr: self.qemu_stderr(),
                    });
                }
            }
        }
    }

    /// Types `line` and a newline on the serial console.
    pub fn send_line(&mut self, line: &str) -> Result<(), QemuError> {
        let stdin = self.stdin.as_mut().ok_or_else(|| QemuError::SerialWrite {
            source: std::io::Error::new(std::io::ErrorKind::BrokenPipe, "serial input already closed"),
        })?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|source| QemuError::SerialWrite { source })
    }

    /// Runs `command` in the guest shell and returns its output lines.
    ///
    /// The command's output is framed by two marker lines whose text does not appear in the
    /// echoed command line itself (they are computed by the shell), so the echo cannot be
    /// mistaken for output.
    pub fn run_command(&mut self, command: &str, timeout: Duration) -> Result<Vec<String>, QemuError> {
        static SEQUENCE: AtomicU64 = AtomicU64::new(1);
        let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let begin = format!("PADDOCK-BEGIN-{}", sequence + 1);
        let end = format!("PADDOCK-END-{}", sequence + 1);
        self.send_line(&format!(
            "echo PADDOCK-BEGIN-$(({sequence}+1)); {command}; echo PADDOCK-END-$(({sequence}+1))"
        ))?;
        self.wait_for_line(&begin, timeout)?;
        let mut output = Vec::new();
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let line = self.wait_for_line_matching(&format!("{end:?}"), remaining, |_| true)?;
            if line == end {
                return Ok(output);
            }
            output.push(line);
        }
    }

    /// Presses the ACPI power button (QMP `system_powerdown`), as KubeVirt does for a graceful stop.
    pub fn press_power_button(&mut self) -> Result<(), QemuError> {
        self.qmp_execute("system_powerdown", "")
    }

    /// Saves the VGA screen to `path` as a binary PPM (QMP `screendump`) and returns the fraction
    /// of pixels that are not black, so a test can tell a live console from a blank screen.
    pub fn screen_lit_fraction(&mut self, path: &Path) -> Result<f64, QemuError> {
        let screendump_error = |details: String| QemuError::Qmp {
            command: "screendump".to_string(),
            details,
        };
        let path = std::path::absolute(path).map_err(|error| screendump_error(error.to_string()))?;
        let escaped = path.to_string_lossy().replace('\\', "\\\\").replace('"', "\\\"");
        self.qmp_execute(
            "screendump",
            &format!(",\"arguments\":{{\"filename\":\"{escaped}\"}}"),
        )?;
        let image = std::fs::read(&path)
            .map_err(|error| screendump_error(format!("cannot read {}: {error}", path.display())))?;
        lit_fraction_of_ppm(&image)
            .ok_or_else(|| screendump_error(format!("{} is not a binary PPM", path.display())))
    }

    /// Waits for QEMU to exit on its own (after the guest powered off) and returns its status.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Result<ExitStatus, QemuError> {
        match self.wait_for_exit_quietly(timeout)? {
            Some(status) => {
                // Drain the rest of the console into the transcript for later error messages.
                while let Ok(Some(_)) = self.serial.next_line(Instant::now() + Duration::from_millis(200)) {}
                Ok(status)
            }
            None => Err(QemuError::ShutdownTimeout {
                timeout,
                transcript: self.serial.tail(),
            }),
        }
    }

    /// Kills QEMU immediately, like pulling the plug, and reaps it.
    pub fn kill(&mut self) -> Result<(), QemuError> {
        if self
            .child
            .try_wait()
            .map_err(|source| QemuError::Process {
                action: "poll",
                source,
            })?
            .is_none()
        {
            self.child.kill().map_err(|source| QemuError::Process {
                action: "kill",
                source,
            })?;
        }
        self.child.wait().map_err(|source| QemuError::Process {
            action: "reap",
            source,
        })?;
        Ok(())
    }

    fn wait_for_exit_quietly(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|source| QemuError::Process {
                action: "wait for",
                source,
            })? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn qemu_stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_else(|error| format!("(unreadable: {error})"))
    }

    /// Runs one QMP command; `arguments` is empty or a JSON fragment `,"arguments":{...}`.
    fn qmp_execute(&mut self, command: &str, arguments: &str) -> Result<(), QemuError> {
        let qmp_error = |details: String| QemuError::Qmp {
            command: command.to_string(),
            details,
        };
        let stream = UnixStream::connect(&self.qmp_socket).map_err(|error| {
            qmp_error(format!(
                "cannot connect to {}: {error}",
                self.qmp_socket.display()
            ))
        })?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|error| qmp_error(error.to_string()))?;
        let mut writer = stream.try_clone().map_err(|error| qmp_error(error.to_string()))?;
        let mut reader = BufReader::new(stream);
        // QMP: greeting, then capabilities negotiation, then the command. Events may arrive
        // between replies, so read until a line carrying "return" or "error".
        let await_reply = |reader: &mut BufReader<UnixStream>, what: &str| -> Result<(), QemuError> {
            loop {
                let mut line = String::new();
                let read = reader
                    .read_line(&mut line)
                    .map_err(|error| qmp_error(format!("reading {what}: {error}")))?;
                if read == 0 {
                    return Err(qmp_error(format!("connection closed while waiting for {what}")));
                }
                if line.contains("\"error\"") {
                    return Err(qmp_error(format!("{what} rejected: {}", line.trim())));
                }
                if line.contains("\"return\"") || (what == "greeting" && line.contains("\"QMP\"")) {
                    return Ok(());
                }
            }
        };
        await_reply(&mut reader, "greeting")?;
        for (request, what) in [
            (
                "{\"execute\":\"qmp_capabilities\"}\n".to_string(),
                "capabilities reply",
            ),
            (
                format!("{{\"execute\":\"{command}\"{arguments}}}\n"),
                "command reply",
            ),
        ] {
            writer
                .write_all(request.as_bytes())
                .map_err(|error| qmp_error(format!("sending: {error}")))?;
            await_reply(&mut reader, what)?;
        }
        Ok(())
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        // Nothing useful can be done about a failure here; the process is gone either way.
        let _ = self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::{clean_line, lit_fraction_of_ppm};

    #[test]
    fn clean_line_strips_prompt_escape_and_carriage_return() {
        assert_eq!(clean_line(b"paddock# \x1b[6necho hi\r"), "paddock# echo hi");
        assert_eq!(clean_line(b"\x1b[0;32mgreen\x1b[0m\r"), "green");
    }

    #[test]
    fn lit_fraction_counts_non_black_pixels() {
        let image = b"P6\n2 1\n255\n\x00\x00\x00\x10\x00\x00";
        assert_eq!(lit_fraction_of_ppm(image), Some(0.5));
        assert_eq!(lit_fraction_of_ppm(b"P5\n1 1\n255\n\x00"), None);
    }
}
