//! Backups through the console's API, local backend: a real runtime booting the paddock test disk
//! with QEMU, a real docker-registry on loopback, the API in process over real TCP.
//!
//! Covers: a backup of a running VM as a polled operation that ends Succeeded; the repository then
//! lists exactly that one backup, matching the annotations of its manifest in the registry; a
//! restore under a new name creates a VM that starts, and one replacing the stopped source VM
//! succeeds; the refusals (unknown VM 404, bad repository
//! 400, unreachable registry 502, existing target 409, replacing a running VM 409 saying to stop
//! it, unknown operation 404).
//!
//! Needs QEMU, qemu-img, the test disk's prerequisites and docker-registry; missing ones fail the
//! test unless `PADDOCK_ALLOW_SKIP=1`.

// Helpers outside #[test] functions are not covered by clippy's allow-*-in-tests settings; in a
// test, failing loudly with the error's message is exactly the desired behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use paddock_console::{AccessToken, Api, BackupView, ErrorBody, LocalBackend, OperationPhase, OperationView};
use paddock_local::{AcceleratorChoice, Runtime, RuntimeOptions};
use paddock_tests::qemu::{Accelerator, Qemu, ScratchDirectory, require_qemu};
use paddock_tests::registry::{RegistryAuth, require_registry};
use paddock_tests::testdisk;
use serde_json::{Value, json};

const TOKEN: &str = "test-token-backups-0123456789";

struct Server {
    base: String,
    http: reqwest::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    async fn start(state_dir: &Path, qemu: &Qemu) -> Server {
        let mut options = RuntimeOptions::new(state_dir);
        options.qemu_binary = Some(qemu.binary().to_path_buf());
        options.accelerator = match qemu.accelerator() {
            Accelerator::Kvm => AcceleratorChoice::Kvm,
            Accelerator::Tcg => AcceleratorChoice::Tcg,
        };
        let runtime = Arc::new(Runtime::open(options).await.unwrap());
        let api = Api::new(
            Arc::new(LocalBackend::new(runtime)),
            AccessToken::from_secret(TOKEN).unwrap(),
        );
        let router = api.router();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _api = api;
            axum::serve(listener, router).await.unwrap();
        });
        Server {
            base: format!("http://{address}"),
            http: reqwest::Client::new(),
            task,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.request(reqwest::Method::GET, path).send().await.unwrap()
    }

    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.request(reqwest::Method::POST, path)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    async fn phase(&self, name: &str) -> String {
        let response = self.get(&format!("/api/v1/vms/default/{name}")).await;
        assert_eq!(response.status(), 200);
        let vm: Value = json_body(response).await;
        vm["status"]["phase"].as_str().unwrap().to_string()
    }

    async fn wait_for_phase(&self, name: &str, phase: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.phase(name).await;
            if now == phase {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} is {now}, not {phase}, after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Polls an operation until it ends; returns it and the distinct stages seen while it ran.
    async fn wait_for_operation(
        &self,
        started: &OperationView,
        timeout: Duration,
    ) -> (OperationView, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let mut stages = vec![started.progress.stage.clone()];
        let mut last_percent = 0;
        loop {
            let response = self.get(&format!("/api/v1/operations/{}", started.id)).await;
            assert_eq!(response.status(), 200);
            let operation: OperationView = json_body(response).await;
            if let Some(percent) = operation.progress.percent {
                assert!(
                    percent >= last_percent,
                    "progress went back from {last_percent} to {percent}"
                );
                last_percent = percent;
            }
            if stages.last() != Some(&operation.progress.stage) {
                stages.push(operation.progress.stage.clone());
            }
            if operation.phase != OperationPhase::Running {
                return (operation, stages);
            }
            assert!(
                Instant::now() < deadline,
                "operation still running: {operation:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn json_body<T: serde::de::DeserializeOwned>(response: reqwest::Response) -> T {
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

async fn expect_error(response: reqwest::Response, status: u16, reason: &str, needle: &str) {
    assert_eq!(response.status().as_u16(), status, "status");
    let body: ErrorBody = json_body(response).await;
    assert_eq!(body.reason, reason, "reason of {body:?}");
    assert!(
        body.message.contains(needle),
        "message {:?} should mention {needle:?}",
        body.message
    );
    eprintln!("refused as expected: {status} {reason}: {}", body.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_up_list_and_restore_through_the_api() {
    let disk = match testdisk::test_disk() {
        Ok(disk) => disk,
        Err(error) if error.is_missing_prerequisite() && paddock_tests::qemu::skip_allowed() => {
            eprintln!("SKIP console backups: {error}");
            return;
        }
        Err(error) => panic!("{error}"),
    };
    let Some(qemu) = require_qemu("console-backups").unwrap() else {
        return;
    };
    let Some(registry) = require_registry("console-backups", RegistryAuth::None).unwrap() else {
        return;
    };
    let scratch = ScratchDirectory::new("console-backups").unwrap();
    let server = Server::start(&scratch.path().join("state"), &qemu).await;
    let repository = format!("{}/backups/web", registry.address());

    let manifest = format!(
        "apiVersion: paddock.dev/v1alpha1\nkind: VirtualMachineApp\nmetadata:\n  name: web\nspec:\n  displayName: Web server\n  image:\n    containerDisk: file:{}\n  resources: {{cpu: 1, memory: 256Mi}}\n  disk: {{size: 64Mi}}\n  runStrategy: Always\n",
        disk.display()
    );
    let created = server
        .request(reqwest::Method::POST, "/api/v1/vms")
        .header(reqwest::header::CONTENT_TYPE, "application/yaml")
        .body(manifest)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    server
        .wait_for_phase("web", "Running", Duration::from_secs(60))
        .await;

    // Refusals start nothing.
    let body = json!({"repository": repository, "insecure": true});
    expect_error(
        server
            .post("/api/v1/vms/default/nothing/backups", body.clone())
            .await,
        404,
        "NotFound",
        "nothing",
    )
    .await;
    expect_error(
        server
            .post(
                "/api/v1/vms/default/web/backups",
                json!({"repository": "Not A//Reference", "insecure": true}),
            )
            .await,
        400,
        "BadRequest",
        "Not A//Reference",
    )
    .await;
    // A port nothing listens on (the registry's own port is busy, so take a fresh one and free it).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    expect_error(
        server
            .post(
                "/api/v1/vms/default/web/backups",
                json!({"repository": format!("{closed}/backups/web"), "insecure": true}),
            )
            .await,
        502,
        "BadGateway",
        "cannot reach registry",
    )
    .await;
    expect_error(
        server.get("/api/v1/operations/op-000000000000").await,
        404,
        "NotFound",
        "op-000000000000",
    )
    .await;
    let listed = server
        .get(&format!("/api/v1/backups?repository={repository}&insecure=true"))
        .await;
    assert_eq!(listed.status(), 200);
    let listed: Value = json_body(listed).await;
    assert_eq!(listed["items"], json!([]), "refused backups left nothing behind");

    // The backup of the running VM.
    let timer = Instant::now();
    let response = server.post("/api/v1/vms/default/web/backups", body.clone()).await;
    assert_eq!(response.status(), 202);
    let location = response.headers()[reqwest::header::LOCATION]
        .to_str()
        .unwrap()
        .to_string();
    let started: OperationView = json_body(response).await;
    assert_eq!(location, format!("/api/v1/operations/{}", started.id));
    assert_eq!(started.kind, "Backup");
    assert_eq!(
        (started.namespace.as_str(), started.name.as_str()),
        ("default", "web")
    );
    assert_eq!(started.phase, OperationPhase::Running);
    // A second backup of the same VM while the first runs is refused.
    expect_error(
        server.post("/api/v1/vms/default/web/backups", body.clone()).await,
        409,
        "InvalidTransition",
        &started.id,
    )
    .await;
    let (done, stages) = server
        .wait_for_operation(&started, Duration::from_secs(300))
        .await;
    let backup_time = timer.elapsed();
    assert_eq!(done.phase, OperationPhase::Succeeded, "{done:?}");
    assert_eq!(done.progress.percent, Some(100));
    assert!(done.finished_at.is_some());
    let made = done.backup.clone().expect("a succeeded backup names its backup");
    assert_eq!(done.result.as_deref(), Some(made.reference.as_str()));
    eprintln!("backup took {backup_time:?}; stages seen: {stages:?}; {made:?}");
    assert_eq!(server.phase("web").await, "Running", "the VM kept running");

    // The repository lists exactly that backup, as its manifest's annotations say.
    for path in [
        format!("/api/v1/backups?repository={repository}&insecure=true"),
        format!("/api/v1/vms/default/web/backups?repository={repository}&insecure=true"),
    ] {
        let listed = server.get(&path).await;
        assert_eq!(listed.status(), 200);
        let listed: Value = json_body(listed).await;
        let items: Vec<BackupView> = serde_json::from_value(listed["items"].clone()).unwrap();
        assert_eq!(items, vec![made.clone()], "{path}");
    }
    let none: Value = json_body(
        server
            .get(&format!(
                "/api/v1/vms/default/other/backups?repository={repository}&insecure=true"
            ))
            .await,
    )
    .await;
    assert_eq!(none["items"], json!([]));
    assert!(made.tag.starts_with("web-"));
    assert_eq!(made.reference, format!("{repository}:{}", made.tag));
    assert_eq!(made.pinned_reference, format!("{repository}@{}", made.digest));
    assert_eq!(made.display_name.as_deref(), Some("Web server"));
    assert_eq!(made.disk_virtual_size, 64 << 20);
    let raw = reqwest::Client::new()
        .get(format!(
            "http://{}/v2/backups/web/manifests/{}",
            registry.address(),
            made.tag
        ))
        .header(
            reqwest::header::ACCEPT,
            "application/vnd.oci.image.manifest.v1+json",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 200);
    let raw_bytes = raw.bytes().await.unwrap();
    let manifest: Value = serde_json::from_slice(&raw_bytes).unwrap();
    let annotations = &manifest["annotations"];
    assert_eq!(annotations["dev.paddock.backup.vm"], "default/web");
    assert_eq!(annotations["dev.paddock.backup.format"], "1");
    assert_eq!(
        annotations["org.opencontainers.image.created"],
        made.created_at.as_str()
    );
    assert_eq!(
        annotations["dev.paddock.backup.disk-virtual-size"],
        made.disk_virtual_size.to_string()
    );
    let definition: Value =
        serde_json::from_str(annotations["dev.paddock.backup.definition"].as_str().unwrap()).unwrap();
    assert_eq!(definition["spec"]["displayName"], "Web server");

    // Restore refusals: the name is taken; replacing a running VM.
    let restore = |extra: Value| {
        let mut body = json!({"reference": made.pinned_reference, "insecure": true});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    expect_error(
        server.post("/api/v1/backups/restore", restore(json!({}))).await,
        409,
        "AlreadyExists",
        "choose another name",
    )
    .await;
    expect_error(
        server
            .post("/api/v1/backups/restore", restore(json!({"replace": true})))
            .await,
        409,
        "InvalidTransition",
        "stop it first",
    )
    .await;
    expect_error(
        server
            .post(
                "/api/v1/backups/restore",
                json!({"reference": format!("{repository}:web-20000101T000000Z"), "insecure": true, "name": "x"}),
            )
            .await,
        404,
        "NotFound",
        "web-20000101T000000Z",
    )
    .await;

    // Restore under a new name: the VM exists and starts.
    let timer = Instant::now();
    let response = server
        .post("/api/v1/backups/restore", restore(json!({"name": "web-copy"})))
        .await;
    assert_eq!(response.status(), 202);
    let started: OperationView = json_body(response).await;
    assert_eq!(
        (started.kind.as_str(), started.name.as_str()),
        ("Restore", "web-copy")
    );
    let (done, stages) = server
        .wait_for_operation(&started, Duration::from_secs(300))
        .await;
    assert_eq!(done.phase, OperationPhase::Succeeded, "{done:?}");
    assert_eq!(done.result.as_deref(), Some("default/web-copy"));
    server
        .wait_for_phase("web-copy", "Running", Duration::from_secs(60))
        .await;
    let restore_time = timer.elapsed();
    eprintln!("restore (to Running) took {restore_time:?}; stages seen: {stages:?}");
    let copy: Value = json_body(server.get("/api/v1/vms/default/web-copy").await).await;
    assert_eq!(
        copy["manifest"]["spec"]["image"]["containerDisk"],
        made.pinned_reference.as_str()
    );
    assert_eq!(
        copy["manifest"]["metadata"]["annotations"]["paddock.dev/restored-from"],
        made.pinned_reference.as_str()
    );
    let operations: Value = json_body(server.get("/api/v1/operations").await).await;
    let kinds: Vec<&str> = operations["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|operation| operation["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["Backup", "Restore"]);

    // Replacing the source VM once it is stopped: it comes back from the backup, pinned.
    let stopped = server
        .request(reqwest::Method::PUT, "/api/v1/vms/default/web/forcestop")
        .send()
        .await
        .unwrap();
    assert_eq!(stopped.status(), 200);
    server
        .wait_for_phase("web", "Stopped", Duration::from_secs(60))
        .await;
    let response = server
        .post("/api/v1/backups/restore", restore(json!({"replace": true})))
        .await;
    assert_eq!(response.status(), 202);
    let started: OperationView = json_body(response).await;
    let (done, _) = server
        .wait_for_operation(&started, Duration::from_secs(300))
        .await;
    assert_eq!(done.phase, OperationPhase::Succeeded, "{done:?}");
    assert_eq!(done.result.as_deref(), Some("default/web"));
    let replaced: Value = json_body(server.get("/api/v1/vms/default/web").await).await;
    assert_eq!(
        replaced["manifest"]["spec"]["image"]["containerDisk"],
        made.pinned_reference.as_str()
    );

    for name in ["web", "web-copy"] {
        // VMs outlive the server: delete them (switched off at once) before it goes.
        let response = server
            .request(
                reqwest::Method::DELETE,
                &format!("/api/v1/vms/default/{name}?force=true"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 204, "delete {name}");
    }
}
