//! `paddock upload` against the control-plane harness: the real kube-apiserver, the simulator's
//! aggregated `upload.cdi.kubevirt.io` API (UploadTokenRequest) and its HTTPS CDI upload proxy.
//! The test disk is uploaded and the disk CDI stored is compared byte for byte; a too-small
//! size is refused before anything is created; an untrusted proxy certificate, an upload into a
//! DataVolume that already has a disk, and the synchronous endpoint are covered.
//!
//! Needs the control plane (`tests/cluster`, built on first use) and the test disk; see
//! tests/README.md.

// Helpers outside #[test] functions are not covered by clippy's allow-*-in-tests settings; in a
// test, failing loudly with the error's message is exactly the desired behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output};
use std::time::Duration;

use kube::api::{Api, DynamicObject};
use paddock_tests::cluster::Cluster;
use paddock_tests::testdisk;
use paddock_tests::world::{cdi_configs, data_volumes};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_the_test_disk_through_the_simulated_cdi_upload_proxy() {
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let disk = testdisk::test_disk().unwrap_or_else(|error| panic!("{error}"));
    let namespace = cluster.namespace("upload").await.unwrap();
    let client = cluster.admin_client().await.unwrap();
    let kubeconfig = cluster.admin_kubeconfig();
    let ca = cluster.simulator_ca();
    let (kubeconfig, ca, disk_text) = (
        kubeconfig.to_str().unwrap(),
        ca.to_str().unwrap(),
        disk.to_str().unwrap(),
    );
    // The simulator publishes the proxy's URL in CDIConfig config once it runs.
    let configs: Api<DynamicObject> = Api::all_with(client.clone(), &cdi_configs());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while configs
        .get_opt("config")
        .await
        .unwrap()
        .is_none_or(|config| config.data["status"]["uploadProxyURL"].as_str().is_none())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no CDIConfig config with an upload proxy URL"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let data_volumes: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace.name(), &data_volumes());
    let common = ["--kubeconfig", kubeconfig, "-n", namespace.name()];
    let upload = |extra: &[&str]| {
        let mut arguments = vec!["upload"];
        arguments.extend(extra);
        arguments.extend(common);
        paddock(&arguments)
    };

    // A size smaller than the disk is refused before anything is created or sent.
    let refused = upload(&[
        disk_text,
        "--name",
        "too-small",
        "--size",
        "16Mi",
        "--ca-file",
        ca,
    ]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("smaller than the disk's virtual size"));
    assert!(data_volumes.get_opt("too-small").await.unwrap().is_none());

    // The upload itself: DataVolume, token, proxy, Succeeded, the same bytes stored.
    let uploaded = upload(&[disk_text, "--name", "uploaded", "--ca-file", ca, "--json"]);
    assert!(uploaded.status.success());
    let summary: serde_json::Value = serde_json::from_slice(&uploaded.stdout).unwrap();
    assert_eq!(summary["phase"], "Succeeded");
    assert_eq!(summary["format"], "qcow2");
    assert_eq!(summary["bytesSent"], std::fs::metadata(&disk).unwrap().len());
    let data_volume = data_volumes.get("uploaded").await.unwrap();
    assert_eq!(data_volume.data["status"]["phase"], "Succeeded");
    assert_eq!(
        data_volume.data["spec"]["source"]["upload"],
        serde_json::json!({})
    );
    // 48 MiB virtual plus CDI's 5.5% filesystem overhead.
    assert_eq!(
        data_volume.data["spec"]["storage"]["resources"]["requests"]["storage"],
        "51Mi"
    );
    let stored = data_volume
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get("simulator.paddock.dev/disk-path"))
        .expect("the simulator records where the upload went")
        .clone();
    assert!(
        std::fs::read(&stored).unwrap() == std::fs::read(&disk).unwrap(),
        "the stored disk differs from the uploaded one"
    );
    let compare = Command::new("qemu-img")
        .args(["compare", "-U", &stored, disk_text])
        .status()
        .unwrap();
    assert!(compare.success());

    // Uploading into a DataVolume that already holds a disk is refused with the reason.
    let again = upload(&[disk_text, "--name", "uploaded", "--no-create", "--ca-file", ca]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a disk"));

    // Without the proxy's CA the TLS failure is explained, not hidden.
    let untrusted = upload(&[disk_text, "--name", "untrusted", "--wait-secs", "30"]);
    assert!(!untrusted.status.success());
    let message = String::from_utf8_lossy(&untrusted.stderr);
    assert!(
        message.contains("upload proxy") && message.contains("--ca-file"),
        "{message}"
    );

    // The synchronous endpoint, with a raw disk.
    let scratch = tempfile::tempdir().unwrap();
    let raw = scratch.path().join("data.raw");
    std::fs::write(
        &raw,
        (0..8u32 << 20)
            .map(|index| (index % 251) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let synchronous = upload(&[
        raw.to_str().unwrap(),
        "--name",
        "raw-sync",
        "--sync",
        "--size",
        "16Mi",
        "--ca-file",
        ca,
    ]);
    assert!(synchronous.status.success());
    let data_volume = data_volumes.get("raw-sync").await.unwrap();
    assert_eq!(data_volume.data["status"]["phase"], "Succeeded");
}
