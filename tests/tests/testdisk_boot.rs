//! Boots the paddock test disk in QEMU and checks its contract: the banners on the serial
//! console, a usable root shell, and a data partition whose writes survive a poweroff, whichever
//! bus (virtio, SATA, IDE) the disk is attached to.
//!
//! Needs `qemu-system-x86_64` and the packages listed in `tests/testdisk/README.md`; a missing
//! QEMU fails the test unless `PADDOCK_ALLOW_SKIP=1`. `PADDOCK_QEMU_ACCEL=tcg` forces software
//! emulation.

// Helpers outside #[test] functions are not covered by clippy's allow-*-in-tests settings; in a
// test, failing loudly with the error's message is exactly the desired behaviour.
#![allow(
    clippy::panic,
    clippy::expect_used,
    reason = "integration test helpers fail the test on error"
)]

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use paddock_tests::qemu::{self, DiskBus, Firmware, Qemu, QemuError, RunningVm, ScratchDirectory, VmConfig};
use paddock_tests::testdisk::{
    self, DATA_DEVICE_PREFIX, DATA_MOUNT_FAILED_PREFIX, DATA_MOUNTED_BANNER, READY_BANNER,
};

/// Generous enough for TCG on a busy two-core CI machine (a TCG boot takes about 10 s idle).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(60);

/// QEMU and the test disk, or `None` when the test must be skipped (only with PADDOCK_ALLOW_SKIP=1).
fn prerequisites(test_name: &str) -> Option<(Qemu, PathBuf)> {
    testdisk::qemu_and_test_disk(test_name).unwrap_or_else(|error| panic!("{error}"))
}

/// Boots `overlay` on `bus` with BIOS, waits for the banners and returns the VM and its data device.
fn boot(qemu: &Qemu, scratch: &ScratchDirectory, overlay: &PathBuf, bus: DiskBus) -> (RunningVm, String) {
    let vm = qemu
        .start(&VmConfig::new(overlay).with_disk_bus(bus), scratch)
        .unwrap_or_else(|error| panic!("{error}"));
    wait_for_banners(vm, &format!("{bus:?}"))
}

/// Waits for the data partition line and the banners; returns the VM and its data device.
fn wait_for_banners(mut vm: RunningVm, setup: &str) -> (RunningVm, String) {
    let data_line = vm
        .wait_for_line_matching("the data partition result", BOOT_TIMEOUT, |line| {
            line.starts_with(DATA_DEVICE_PREFIX) || line.starts_with(DATA_MOUNT_FAILED_PREFIX)
        })
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(
        data_line.starts_with(DATA_DEVICE_PREFIX),
        "the guest could not mount /data: {data_line}"
    );
    let device = data_line[DATA_DEVICE_PREFIX.len()..].to_string();
    vm.wait_for_line(DATA_MOUNTED_BANNER, COMMAND_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    vm.wait_for_line(READY_BANNER, COMMAND_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    eprintln!(
        "booted on {setup} to {READY_BANNER:?} in {:.1} s under {}",
        vm.uptime().as_secs_f64(),
        vm.accelerator().qemu_name()
    );
    (vm, device)
}

fn unique_marker() -> String {
    let nanoseconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!("paddock-marker-{}-{nanoseconds}", std::process::id())
}

#[test]
fn data_written_over_serial_survives_poweroff_and_bus_change() {
    let Some((qemu, disk)) = prerequisites("data_written_over_serial_survives_poweroff_and_bus_change")
    else {
        return;
    };
    let scratch = ScratchDirectory::new("testdisk-boot").unwrap_or_else(|error| panic!("{error}"));
    let overlay = scratch.path().join("disk.qcow2");
    qemu.create_overlay(&disk, &overlay)
        .unwrap_or_else(|error| panic!("{error}"));
    let marker = unique_marker();

    let (mut vm, device) = boot(&qemu, &scratch, &overlay, DiskBus::Virtio);
    assert_eq!(device, "/dev/vda2", "virtio-blk disk should appear as vda");
    let lit = vm
        .screen_lit_fraction(&scratch.path().join("screen.ppm"))
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(
        lit > 0.01,
        "the VGA console should show text, but only {lit:.4} of its pixels are lit"
    );
    let output = vm
        .run_command(
            &format!("echo {marker} > /data/marker && sync && cat /data/marker"),
            COMMAND_TIMEOUT,
        )
        .unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(output, vec![marker.clone()]);
    let job_control = vm
        .run_command("echo $-", COMMAND_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(
        job_control.first().is_some_and(|flags| flags.contains('m')),
        "the serial shell should have job control, flags: {job_control:?}"
    );
    vm.send_line("poweroff").expect("send poweroff");
    let status = vm
        .wait_for_exit(POWEROFF_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(
        status.success(),
        "QEMU should exit cleanly after the guest powers off, got {status}"
    );
    drop(vm);

    // Same overlay, other bus: the data must be on the disk, not in any guest cache.
    let (mut vm, device) = boot(&qemu, &scratch, &overlay, DiskBus::Sata);
    assert_eq!(device, "/dev/sda2", "SATA disk should appear as sda");
    let output = vm
        .run_command("cat /data/marker", COMMAND_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(
        output,
        vec![marker],
        "the marker written before poweroff must be read back"
    );
    // The ACPI power button (KubeVirt's graceful stop) must power the guest off as well.
    vm.press_power_button().unwrap_or_else(|error| panic!("{error}"));
    let status = vm
        .wait_for_exit(POWEROFF_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(
        status.success(),
        "QEMU should exit cleanly after the power button, got {status}"
    );
}

#[test]
fn boots_from_ide_and_survives_a_hard_kill() {
    let Some((qemu, disk)) = prerequisites("boots_from_ide_and_survives_a_hard_kill") else {
        return;
    };
    let scratch = ScratchDirectory::new("testdisk-ide").unwrap_or_else(|error| panic!("{error}"));
    let overlay = scratch.path().join("disk.qcow2");
    qemu.create_overlay(&disk, &overlay)
        .unwrap_or_else(|error| panic!("{error}"));
    let marker = unique_marker();

    let (mut vm, device) = boot(&qemu, &scratch, &overlay, DiskBus::Ide);
    assert_eq!(device, "/dev/sda2", "IDE disk should appear as sda");
    vm.run_command(&format!("echo {marker} > /data/marker && sync"), COMMAND_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    // Pulling the plug after sync must not lose the data (the journal covers the rest).
    vm.kill().expect("kill QEMU");
    drop(vm);

    let (mut vm, _) = boot(&qemu, &scratch, &overlay, DiskBus::Ide);
    let output = vm
        .run_command("cat /data/marker", COMMAND_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(output, vec![marker]);
}

#[test]
fn boots_under_uefi() {
    let Some((qemu, disk)) = prerequisites("boots_under_uefi") else {
        return;
    };
    let scratch = ScratchDirectory::new("testdisk-uefi").unwrap_or_else(|error| panic!("{error}"));
    let overlay = scratch.path().join("disk.qcow2");
    qemu.create_overlay(&disk, &overlay)
        .unwrap_or_else(|error| panic!("{error}"));

    let config = VmConfig::new(&overlay).with_firmware(Firmware::Uefi);
    let vm = match qemu.start(&config, &scratch) {
        Ok(vm) => vm,
        Err(error @ QemuError::FirmwareNotFound { .. }) if qemu::skip_allowed() => {
            eprintln!(
                "\n!!!!!!!! SKIP boots_under_uefi: {error} (skipped because PADDOCK_ALLOW_SKIP=1) !!!!!!!!\n"
            );
            return;
        }
        Err(error) => panic!("{error}"),
    };
    let (mut vm, device) = wait_for_banners(vm, "Virtio with UEFI");
    assert_eq!(device, "/dev/vda2");
    let output = vm
        .run_command("cat /data/README", COMMAND_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(
        output.iter().any(|line| line.contains("paddock test disk")),
        "unexpected /data/README: {output:?}"
    );
}
