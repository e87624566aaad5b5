// Integration test helpers fail the test on error; clippy's test allowance covers only #[test]
// functions, so allow unwrap/expect/panic for the whole file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! End to end, with real parts only: the test disk → `paddock package` → push into Debian's
//! `docker-registry` on loopback → `skopeo inspect` and `skopeo copy` read it → `paddock pull` →
//! `qemu-img compare` says the pulled disk is identical → it boots under QEMU and prints the banner.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use paddock_tests::qemu::{ScratchDirectory, VmConfig};
use paddock_tests::registry::{RegistryAuth, require_registry};
use paddock_tests::testdisk::{READY_BANNER, qemu_and_test_disk};

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn paddock(arguments: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_paddock"))
        .args(arguments)
        .output()
        .unwrap();
    eprintln!(
        "$ paddock {}\n{}{}",
        arguments.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn paddock_ok(arguments: &[&str]) -> serde_json::Value {
    let output = paddock(arguments);
    assert!(output.status.success(), "paddock {arguments:?} failed");
    serde_json::from_slice(&output.stdout).unwrap()
}

fn skopeo(work: &Path, arguments: &[&str]) -> String {
    let policy = work.join("policy.json");
    std::fs::write(&policy, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#).unwrap();
    let output = Command::new("skopeo")
        .arg("--policy")
        .arg(&policy)
        .args(arguments)
        .output()
        .expect("skopeo must be installed (hack/install-deps.sh installs it)");
    assert!(
        output.status.success(),
        "skopeo {arguments:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn qemu_img_compare(left: &Path, right: &Path) -> Output {
    Command::new("qemu-img")
        .arg("compare")
        .arg(left)
        .arg(right)
        .output()
        .unwrap()
}

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn package_push_pull_boot() {
    let Some((qemu, test_disk)) = qemu_and_test_disk("package_push_pull_boot").unwrap() else {
        return;
    };
    let Some(registry) = require_registry("package_push_pull_boot", RegistryAuth::None).unwrap() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let reference = format!("{}/vms/tiny:1.0", registry.address());

    // Package and push in one go; the layout is kept for the skopeo cross-check.
    let layout = work.path().join("tiny.oci");
    let packaged = paddock_ok(&[
        "package",
        text(&test_disk),
        "--name",
        "tiny",
        "--image",
        &reference,
        "--output",
        text(&layout),
        "--push",
        "--insecure",
        "--json",
    ]);
    let digest = packaged["digest"].as_str().unwrap().to_owned();
    let layer = packaged["images"][0]["layer"]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(packaged["pushed"], true);
    assert_eq!(packaged["images"][0]["diskFormat"], "qcow2");
    assert_eq!(
        packaged["virtualMachineApp"]["spec"]["image"]["containerDisk"],
        reference
    );

    // skopeo reads what paddock pushed: same manifest digest and layer.
    let inspect: serde_json::Value = serde_json::from_str(&skopeo(
        work.path(),
        &["inspect", "--tls-verify=false", &format!("docker://{reference}")],
    ))
    .unwrap();
    assert_eq!(inspect["Digest"], digest.as_str());
    assert_eq!(inspect["Layers"], serde_json::json!([layer]));
    assert_eq!(inspect["Architecture"], "amd64");
    // dir: keeps blobs as the registry serves them (oci: may recompress an uncompressed layer).
    let copied = work.path().join("copied");
    skopeo(
        work.path(),
        &[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{reference}"),
            &format!("dir:{}", copied.display()),
        ],
    );
    assert!(
        copied.join(&layer[7..]).is_file(),
        "skopeo copied the layer unchanged"
    );

    // A second push sends nothing: every blob is already there.
    let again = paddock_ok(&["push", text(&layout), &reference, "--insecure", "--json"]);
    assert_eq!(again["blobsUploaded"], 0);
    assert_eq!(again["digest"], digest.as_str());

    // Pull the disk back; it is the same disk, and it boots.
    let pulled = work.path().join("pulled.qcow2");
    let pull = paddock_ok(&["pull", &reference, "-o", text(&pulled), "--insecure", "--json"]);
    assert_eq!(pull["digest"], digest.as_str());
    let compare = qemu_img_compare(&test_disk, &pulled);
    assert!(
        compare.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&compare.stdout),
        String::from_utf8_lossy(&compare.stderr)
    );
    assert_eq!(
        std::fs::read(&pulled).unwrap(),
        std::fs::read(&test_disk).unwrap(),
        "a clean qcow2 travels byte for byte"
    );

    let scratch = ScratchDirectory::new("package-e2e").unwrap();
    let overlay: PathBuf = scratch.path().join("overlay.qcow2");
    qemu.create_overlay(&pulled, &overlay).unwrap();
    let mut vm = qemu.start(&VmConfig::new(&overlay), &scratch).unwrap();
    vm.wait_for_line(READY_BANNER, BOOT_TIMEOUT).unwrap();
    vm.kill().unwrap();
}

#[test]
fn package_refuses_and_leaves_nothing_behind() {
    let work = tempfile::tempdir().unwrap();
    // A qcow2 whose backing file points at a host path.
    let base = work.path().join("base.qcow2");
    let child = work.path().join("child.qcow2");
    for arguments in [
        vec!["create", "-q", "-f", "qcow2", text(&base), "16M"],
        vec![
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            text(&base),
            text(&child),
        ],
    ] {
        assert!(
            Command::new("qemu-img")
                .args(&arguments)
                .status()
                .unwrap()
                .success()
        );
    }
    let output = paddock(&[
        "package",
        text(&child),
        "--output",
        text(&work.path().join("out.oci")),
    ]);
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("backing file"), "{message}");

    // Over the size limit.
    let big = work.path().join("big.qcow2");
    assert!(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", text(&big), "2T"])
            .status()
            .unwrap()
            .success()
    );
    let output = paddock(&[
        "package",
        text(&big),
        "--max-size",
        "1Ti",
        "--output",
        text(&work.path().join("big.oci")),
    ]);
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("--max-size"), "{message}");

    // Nothing but the inputs is left in the directory.
    let mut left: Vec<String> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["base.qcow2", "big.qcow2", "child.qcow2"]);
}

#[test]
fn multi_platform_image_through_the_registry() {
    let Some(registry) =
        require_registry("multi_platform_image_through_the_registry", RegistryAuth::None).unwrap()
    else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    // Two different raw disks, one per architecture; raw stays raw with --format keep.
    let mut disks = Vec::new();
    for (architecture, seed) in [("amd64", 7u8), ("arm64", 11u8)] {
        let path = work.path().join(format!("{architecture}.img"));
        let bytes: Vec<u8> = (0..4u32 << 20)
            .map(|index| (index as u8).wrapping_mul(seed) ^ (index >> 12) as u8)
            .collect();
        std::fs::write(&path, bytes).unwrap();
        disks.push(path);
    }
    let reference = format!("{}/vms/multi:2.0", registry.address());
    let packaged = paddock_ok(&[
        "package",
        text(&disks[0]),
        text(&disks[1]),
        "--platform",
        "linux/amd64",
        "--platform",
        "linux/arm64",
        "--name",
        "multi",
        "--image",
        &reference,
        // The default (zstd) is covered by the other tests; this one pushes uncompressed layers.
        "--compression",
        "none",
        "--push",
        "--insecure",
        "--json",
    ]);
    let index_digest = packaged["digest"].as_str().unwrap();
    for (position, architecture) in ["amd64", "arm64"].into_iter().enumerate() {
        let inspect: serde_json::Value = serde_json::from_str(&skopeo(
            work.path(),
            &[
                "--override-arch",
                architecture,
                "inspect",
                "--tls-verify=false",
                &format!("docker://{reference}"),
            ],
        ))
        .unwrap();
        assert_eq!(inspect["Architecture"], architecture);
        assert_eq!(inspect["Digest"], index_digest);
        assert_eq!(
            inspect["Layers"][0],
            packaged["images"][position]["layer"]["digest"]
        );

        let pulled = work.path().join(format!("pulled-{architecture}.img"));
        paddock_ok(&[
            "pull",
            &reference,
            "--platform",
            &format!("linux/{architecture}"),
            "-o",
            text(&pulled),
            "--insecure",
            "--json",
        ]);
        assert!(
            std::fs::read(&pulled).unwrap() == std::fs::read(&disks[position]).unwrap(),
            "{architecture}: the pulled disk is the one packaged for it"
        );
    }
    // A platform the image does not have is a clear error.
    let output = paddock(&[
        "pull",
        &reference,
        "--platform",
        "linux/s390x",
        "-o",
        text(&work.path().join("none.img")),
        "--insecure",
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("s390x"));
}
