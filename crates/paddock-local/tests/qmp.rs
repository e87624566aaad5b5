//! Drives a real QEMU (booting the paddock test disk) through the QMP client: greeting and
//! version, run state with its events, concurrent commands, typed errors, screendumps and the
//! snapshot jobs.
//!
//! Needs `qemu-system-x86_64`; a missing QEMU fails unless `PADDOCK_ALLOW_SKIP=1`. Every VM runs
//! on a qcow2 overlay, so the cached test disk is never written.

// Helpers outside #[test] functions are not covered by clippy's allow-*-in-tests settings; in a
// test, failing loudly with the error's message is exactly the desired behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use paddock_local::qmp::{QmpClient, QmpError, QmpEvent, RunState};
use paddock_tests::qemu::{Qemu, RunningVm, ScratchDirectory, VmConfig};
use paddock_tests::testdisk::{self, READY_BANNER};
use tokio::sync::broadcast;

/// Generous enough for TCG on a busy two-core machine (a TCG boot takes about 10 s idle).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

/// QEMU and the test disk, or `None` when the test must be skipped (only with PADDOCK_ALLOW_SKIP=1).
fn prerequisites(test_name: &str) -> Option<(Qemu, PathBuf)> {
    testdisk::qemu_and_test_disk(test_name).unwrap_or_else(|error| panic!("{error}"))
}

/// Boots the test disk on a fresh overlay; returns the VM, its scratch directory and QMP socket.
fn start_vm(test_name: &str) -> Option<(RunningVm, ScratchDirectory, PathBuf)> {
    let (qemu, disk) = prerequisites(test_name)?;
    let scratch = ScratchDirectory::new(test_name).unwrap();
    let overlay = scratch.path().join("overlay.qcow2");
    qemu.create_overlay(&disk, &overlay).unwrap();
    let vm = qemu.start(&VmConfig::new(&overlay), &scratch).unwrap();
    let socket = scratch.path().join("qmp.sock");
    Some((vm, scratch, socket))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Connects, retrying while QEMU has not created the socket yet.
async fn connect(socket: &Path) -> QmpClient {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match QmpClient::connect(socket).await {
            Ok(client) => return client,
            Err(QmpError::Connect { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("{error}"),
        }
    }
}

async fn next_event_named(events: &mut broadcast::Receiver<QmpEvent>, name: &str) -> QmpEvent {
    tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            let event = events.recv().await.unwrap();
            if event.name == name {
                return event;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {name} event within {EVENT_TIMEOUT:?}"))
}

#[test]
fn missing_socket_gives_a_connect_error_naming_the_path() {
    let scratch = ScratchDirectory::new("qmp-missing-socket").unwrap();
    let socket = scratch.path().join("nobody-listens.sock");
    let error = runtime()
        .block_on(QmpClient::connect(&socket))
        .expect_err("connecting to a missing socket must fail");
    assert!(matches!(error, QmpError::Connect { .. }), "{error:?}");
    assert!(
        error.to_string().contains(&socket.display().to_string()),
        "{error}"
    );
}

#[test]
fn controls_a_running_vm() {
    let Some((_vm, scratch, socket)) = start_vm("qmp-control") else {
        return;
    };
    runtime().block_on(async {
        let client = connect(&socket).await;
        let version = client.version();
        assert!(version.major >= 6, "unexpected QEMU version {version}");
        assert_eq!(client.query_status().await.unwrap(), RunState::Running);

        let mut events = client.subscribe();
        client.stop().await.unwrap();
        next_event_named(&mut events, "STOP").await;
        assert_eq!(client.query_status().await.unwrap(), RunState::Paused);
        client.cont().await.unwrap();
        let resume = next_event_named(&mut events, "RESUME").await;
        assert!(resume.timestamp.0 > 0, "{resume:?}");
        assert_eq!(client.query_status().await.unwrap(), RunState::Running);

        // Both requests are in flight at once on the one connection; each gets its own reply.
        let (status, name) = tokio::join!(
            client.execute("query-status", None),
            client.execute("query-name", None),
        );
        assert_eq!(status.unwrap()["status"], "running");
        assert_eq!(name.unwrap()["name"], "paddock-test");

        match client.execute("no-such-command", None).await {
            Err(QmpError::Command { command, class, .. }) => {
                assert_eq!(class, "CommandNotFound");
                assert_eq!(command, "no-such-command");
            }
            other => panic!("expected CommandNotFound, got {other:?}"),
        }

        let screenshot = scratch.path().join("screen.png");
        client.screendump(&screenshot).await.unwrap();
        let image = std::fs::read(&screenshot).unwrap();
        assert!(image.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG signature");
        assert!(image.len() > 300, "PNG suspiciously small: {} bytes", image.len());

        let info = client.human_monitor_command("info status").await.unwrap();
        assert!(info.contains("running"), "{info}");
        assert!(client.query_jobs().await.unwrap().is_empty());

        client.quit().await.unwrap();
        match client.query_status().await {
            Err(QmpError::ConnectionClosed { .. }) => {}
            other => panic!("expected a closed connection after quit, got {other:?}"),
        }
    });
}

#[test]
fn snapshot_save_load_delete_round_trip() {
    let Some((mut vm, _scratch, socket)) = start_vm("qmp-snapshot") else {
        return;
    };
    vm.wait_for_line(READY_BANNER, BOOT_TIMEOUT).unwrap();
    vm.run_command("PADDOCK_MARK=before", COMMAND_TIMEOUT).unwrap();

    let runtime = runtime();
    let client = runtime.block_on(connect(&socket));
    let node = runtime.block_on(async {
        let block = client.execute("query-block", None).await.unwrap();
        let disk = block
            .as_array()
            .unwrap()
            .iter()
            .find(|entry| entry["device"] == "disk0")
            .unwrap_or_else(|| panic!("no disk0 in {block}"));
        let node = disk["inserted"]["node-name"].as_str().unwrap().to_string();
        client
            .snapshot_save("save", "paddock-test", &node, &[&node], SNAPSHOT_TIMEOUT)
            .await
            .unwrap();
        let snapshots = client.human_monitor_command("info snapshots").await.unwrap();
        assert!(snapshots.contains("paddock-test"), "{snapshots}");
        assert!(client.query_jobs().await.unwrap().is_empty(), "job not dismissed");
        assert_eq!(client.query_status().await.unwrap(), RunState::Running);
        node
    });

    vm.run_command("PADDOCK_MARK=after", COMMAND_TIMEOUT).unwrap();

    runtime.block_on(async {
        client
            .snapshot_load("load", "paddock-test", &node, &[&node], SNAPSHOT_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(client.query_status().await.unwrap(), RunState::Running);
    });

    // The guest's shell is back in the state it had when the snapshot was taken.
    let output = vm
        .run_command("echo mark=$PADDOCK_MARK", COMMAND_TIMEOUT)
        .unwrap();
    assert_eq!(output, vec!["mark=before".to_string()]);

    runtime.block_on(async {
        client
            .snapshot_delete("delete", "paddock-test", &[&node], SNAPSHOT_TIMEOUT)
            .await
            .unwrap();
        let snapshots = client.human_monitor_command("info snapshots").await.unwrap();
        assert!(!snapshots.contains("paddock-test"), "{snapshots}");

        // A failing job reports QEMU's error and is still dismissed.
        let error = client
            .snapshot_load("load-missing", "paddock-test", &node, &[&node], SNAPSHOT_TIMEOUT)
            .await
            .expect_err("loading a deleted snapshot must fail");
        assert!(matches!(error, QmpError::Job { .. }), "{error:?}");
        eprintln!("expected job failure: {error}");
        assert!(client.query_jobs().await.unwrap().is_empty());
    });
}
