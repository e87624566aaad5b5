//! The API in process, over real TCP and a real local runtime, without booting a guest:
//! authentication, the OpenAPI document against the router, JSON errors for bad input (with the
//! state shown unchanged afterwards), the event stream and metrics.
//!
//! Booting tests (consoles, VNC, snapshots with memory, crashes, restarts of the server) are in
//! `crates/paddock/tests/serve_e2e.rs`, which drives the real `paddock` binary.

// Helpers outside #[test] functions are not covered by clippy's allow-*-in-tests settings; in a
// test, failing loudly with the error's message is exactly the desired behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use paddock_console::{AccessToken, Api, ErrorBody, LocalBackend, VmView, served_routes};
use paddock_local::{AcceleratorChoice, Runtime, RuntimeOptions};
use paddock_tests::qemu::{Accelerator, ScratchDirectory};
use serde_json::Value;

const TOKEN: &str = "test-token-0123456789abcdef";

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
    async fn start(state_dir: &Path, qemu: Option<&paddock_tests::qemu::Qemu>) -> Server {
        let mut options = RuntimeOptions::new(state_dir);
        if let Some(qemu) = qemu {
            options.qemu_binary = Some(qemu.binary().to_path_buf());
            options.accelerator = match qemu.accelerator() {
                Accelerator::Kvm => AcceleratorChoice::Kvm,
                Accelerator::Tcg => AcceleratorChoice::Tcg,
            };
        }
        let runtime = Arc::new(Runtime::open(options).await.unwrap());
        let api = Api::new(
            Arc::new(LocalBackend::new(runtime)),
            AccessToken::from_secret(TOKEN).unwrap(),
        );
        let router = api.router();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            // Keep the API (and its session switch) alive as long as the server runs.
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

    async fn get_json(&self, path: &str) -> Value {
        let response = self.request(reqwest::Method::GET, path).send().await.unwrap();
        assert_eq!(response.status(), 200, "GET {path}");
        json(response).await
    }

    async fn vms(&self) -> Vec<VmView> {
        serde_json::from_value(self.get_json("/api/v1/vms").await["items"].clone()).unwrap()
    }
}

/// Asserts an error response: status, JSON body with the same code, the reason, and a message
/// containing `needle`.
async fn expect_error(response: reqwest::Response, status: u16, reason: &str, needle: &str) -> ErrorBody {
    assert_eq!(response.status().as_u16(), status, "status");
    assert_eq!(
        response.headers()[reqwest::header::CONTENT_TYPE],
        "application/json"
    );
    let body: ErrorBody = json(response).await;
    assert_eq!(body.code, status);
    assert_eq!(body.reason, reason, "reason of {body:?}");
    assert!(
        body.message.contains(needle),
        "message {:?} should mention {needle:?}",
        body.message
    );
    eprintln!("refused as expected: {status} {reason}: {}", body.message);
    body
}

/// The body of `response` as JSON (reqwest's own `json` needs a feature the workspace leaves off).
async fn json<T: serde::de::DeserializeOwned>(response: reqwest::Response) -> T {
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

fn scratch(purpose: &str) -> (ScratchDirectory, PathBuf) {
    let scratch = ScratchDirectory::new(purpose).unwrap();
    let state = scratch.path().join("state");
    (scratch, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_but_the_probes_needs_the_token() {
    let (_scratch, state) = scratch("api-auth");
    let server = Server::start(&state, None).await;
    let anonymous = reqwest::Client::new();

    for path in [
        "/api/v1/vms",
        "/openapi.json",
        "/metrics",
        "/",
        "/api/v1/events",
        "/no/such/route",
    ] {
        let response = anonymous
            .get(format!("{}{path}", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.headers()[reqwest::header::WWW_AUTHENTICATE],
            "Bearer realm=\"paddock\""
        );
        expect_error(response, 401, "Unauthorized", "access token").await;
    }
    let wrong = anonymous
        .get(format!("{}/api/v1/vms", server.base))
        .bearer_auth("test-token-0123456789abcdeF")
        .send()
        .await
        .unwrap();
    expect_error(wrong, 401, "Unauthorized", "wrong").await;
    let wrong_query = anonymous
        .get(format!("{}/api/v1/vms?token=nope", server.base))
        .send()
        .await
        .unwrap();
    expect_error(wrong_query, 401, "Unauthorized", "wrong").await;

    // The token as a query parameter (what browsers use for websockets) works as well.
    let by_query = anonymous
        .get(format!("{}/api/v1/vms?token={TOKEN}", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(by_query.status(), 200);
    assert_eq!(
        server.get_json("/api/v1/vms").await["items"],
        serde_json::json!([])
    );

    // The probes answer anyone and say nothing secret.
    let health = anonymous
        .get(format!("{}/healthz", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready = anonymous
        .get(format!("{}/readyz", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let ready: Value = json(ready).await;
    assert_eq!(ready["status"], "ready");
    let checks = ready["checks"].as_array().unwrap();
    assert!(checks.iter().all(|check| check["ok"] == true), "{checks:?}");
    assert!(checks.iter().any(|check| check["name"] == "state-dir-writable"));

    // Readiness reflects the state directory: make it unwritable and the probe says so.
    // (root ignores permissions, so this part only runs as another user.)
    if rustix_like_is_root() {
        eprintln!("running as root: skipping the unwritable-state-directory readiness check");
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o500)).unwrap();
        let not_ready = anonymous
            .get(format!("{}/readyz", server.base))
            .send()
            .await
            .unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(not_ready.status(), 503);
    }
}

fn rustix_like_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find(|line| line.starts_with("Uid:"))
            .and_then(|line| line.split_whitespace().nth(2))
            == Some("0")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_exactly_the_served_routes() {
    let (_scratch, state) = scratch("api-openapi");
    let server = Server::start(&state, None).await;
    let document = server.get_json("/openapi.json").await;
    assert_eq!(document["openapi"], "3.0.3");
    let paths = document["paths"].as_object().unwrap();

    let served: BTreeSet<(String, String)> = served_routes()
        .iter()
        .map(|route| (route.method.as_str().to_lowercase(), route.path.to_string()))
        .collect();
    let documented: BTreeSet<(String, String)> = paths
        .iter()
        .flat_map(|(path, operations)| {
            operations
                .as_object()
                .unwrap()
                .keys()
                .map(move |method| (method.clone(), path.clone()))
        })
        .collect();
    assert_eq!(served, documented, "routes served vs documented");

    // Every documented operation answers as a route (not the fallback, not 405), and every
    // public one answers without the token.
    for (method, path) in &documented {
        let concrete = path
            .replace("{namespace}", "default")
            .replace("{name}", "absent")
            .replace("{snapshot}", "absent");
        let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let response = server.request(method.clone(), &concrete).send().await.unwrap();
        let status = response.status().as_u16();
        assert_ne!(status, 405, "{method} {path}");
        if concrete.ends_with("/console") || concrete.ends_with("/vnc") {
            // Not a websocket request: refused with a hint, by the route itself.
            expect_error(response, 400, "BadRequest", "websocket").await;
            continue;
        }
        if path == "/api/v1/events" {
            assert_eq!(status, 200);
            assert_eq!(
                response.headers()[reqwest::header::CONTENT_TYPE],
                "text/event-stream"
            );
            continue;
        }
        let body = response.text().await.unwrap();
        assert!(!body.contains("no such route"), "{method} {path}: {body}");
        let operation = &paths[path.as_str()][method.as_str().to_lowercase()];
        let documented_statuses: Vec<&String> = operation["responses"].as_object().unwrap().keys().collect();
        assert!(
            documented_statuses
                .iter()
                .any(|code| code.as_str() == status.to_string()),
            "{method} {path} answered {status}, which its responses ({documented_statuses:?}) do not list"
        );
    }
    let public: BTreeSet<&str> = served_routes()
        .iter()
        .filter(|route| route.public)
        .map(|route| route.path)
        .collect();
    assert_eq!(public, BTreeSet::from(["/healthz", "/readyz"]));
    for path in &public {
        assert_eq!(paths[*path]["get"]["security"], serde_json::json!([]));
    }

    // Every $ref points at something that exists.
    let mut references = Vec::new();
    collect_references(&document, &mut references);
    assert!(!references.is_empty());
    for reference in references {
        let pointer = reference.strip_prefix('#').unwrap();
        assert!(document.pointer(pointer).is_some(), "dangling $ref {reference}");
    }
}

fn collect_references(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(object) => {
            for (key, child) in object {
                if key == "$ref" {
                    found.push(child.as_str().unwrap().to_string());
                } else {
                    collect_references(child, found);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|child| collect_references(child, found)),
        _ => {}
    }
}

fn manifest(name: &str, image: &str) -> String {
    format!(
        "apiVersion: paddock.dev/v1alpha1\nkind: VirtualMachineApp\nmetadata:\n  name: {name}\nspec:\n  image:\n    containerDisk: {image}\n  resources: {{cpu: 1, memory: 256Mi}}\n  runStrategy: Halted\n"
    )
}

/// Reads server-sent events until `count` named events arrived.
async fn read_events(
    response: &mut reqwest::Response,
    count: usize,
    buffer: &mut String,
) -> Vec<(String, Value)> {
    let mut events = Vec::new();
    while events.len() < count {
        if let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let name = block
                .lines()
                .find_map(|line| line.strip_prefix("event: "))
                .map(str::to_string);
            let data = block.lines().find_map(|line| line.strip_prefix("data: "));
            if let (Some(name), Some(data)) = (name, data) {
                events.push((name, serde_json::from_str(data).unwrap()));
            }
            continue;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(30), response.chunk())
            .await
            .expect("no event within 30 s")
            .unwrap()
            .expect("the event stream ended");
        buffer.push_str(&String::from_utf8_lossy(&chunk));
    }
    events
}

/// Bad requests get clear 4xx errors and change nothing; uses qemu-img and the test disk but
/// boots nothing (the VM stays Halted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_clearly_and_changes_nothing() {
    let Some((qemu, disk)) = paddock_tests::testdisk::qemu_and_test_disk("console-api-bad-input").unwrap()
    else {
        return;
    };
    let (_scratch, state) = scratch("api-bad");
    let server = Server::start(&state, Some(&qemu)).await;
    let image = format!("file:{}", disk.display());
    let mut events = server
        .request(reqwest::Method::GET, "/api/v1/events")
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    let mut event_buffer = String::new();

    let post = |body: String, content_type: &'static str| {
        server
            .request(reqwest::Method::POST, "/api/v1/vms")
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body)
    };
    let created = post(manifest("quiet", &image), "application/yaml")
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let created: VmView = json(created).await;
    assert_eq!(
        (created.namespace.as_str(), created.name.as_str()),
        ("default", "quiet")
    );
    assert_eq!(created.status.phase, "Stopped");
    let first = read_events(&mut events, 1, &mut event_buffer).await;
    assert_eq!(first[0].0, "Changed");
    assert_eq!(first[0].1["name"], "quiet");

    // Create: malformed, wrong kind, schema mismatch, invalid spec, missing disk, duplicate.
    expect_error(
        post("a: [b".into(), "application/yaml").send().await.unwrap(),
        400,
        "BadRequest",
        "not valid YAML",
    )
    .await;
    expect_error(
        post(manifest("x", &image), "application/json")
            .send()
            .await
            .unwrap(),
        400,
        "BadRequest",
        "not valid JSON",
    )
    .await;
    expect_error(
        post("- just\n- a list\n".into(), "application/yaml")
            .send()
            .await
            .unwrap(),
        400,
        "BadRequest",
        "one VirtualMachineApp",
    )
    .await;
    expect_error(
        post("   \n".into(), "application/yaml").send().await.unwrap(),
        400,
        "BadRequest",
        "empty",
    )
    .await;
    expect_error(
        post(manifest("x", &image), "application/x-www-form-urlencoded")
            .send()
            .await
            .unwrap(),
        415,
        "UnsupportedMediaType",
        "application/yaml",
    )
    .await;
    let wrong_kind = manifest("x", &image).replace("kind: VirtualMachineApp", "kind: VirtualMachine");
    expect_error(
        post(wrong_kind, "application/yaml").send().await.unwrap(),
        422,
        "InvalidSpec",
        "kind: VirtualMachine",
    )
    .await;
    let no_image = "apiVersion: paddock.dev/v1alpha1\nkind: VirtualMachineApp\nmetadata: {name: x}\nspec: {runStrategy: Halted}\n";
    expect_error(
        post(no_image.into(), "application/yaml").send().await.unwrap(),
        422,
        "InvalidSpec",
        "image",
    )
    .await;
    let bad_memory = manifest("x", &image).replace("memory: 256Mi", "memory: lots");
    expect_error(
        post(bad_memory, "application/yaml").send().await.unwrap(),
        422,
        "InvalidSpec",
        "memory",
    )
    .await;
    let bad_name = manifest("Not_A_Name", &image);
    expect_error(
        post(bad_name, "application/yaml").send().await.unwrap(),
        422,
        "InvalidSpec",
        "metadata.name",
    )
    .await;
    let missing_disk = manifest("x", "file:/nonexistent/paddock-missing.qcow2");
    expect_error(
        post(missing_disk, "application/yaml").send().await.unwrap(),
        422,
        "InvalidSpec",
        "/nonexistent/paddock-missing.qcow2",
    )
    .await;
    expect_error(
        post(manifest("quiet", &image), "application/yaml")
            .send()
            .await
            .unwrap(),
        409,
        "AlreadyExists",
        "already exists",
    )
    .await;
    // JSON works as well as YAML (and the duplicate check sees it).
    let as_json =
        serde_json::to_string(&serde_yaml::from_str::<Value>(&manifest("quiet", &image)).unwrap()).unwrap();
    expect_error(
        post(as_json, "application/json").send().await.unwrap(),
        409,
        "AlreadyExists",
        "quiet",
    )
    .await;

    // Unknown VM.
    for (method, path) in [
        (reqwest::Method::GET, "/api/v1/vms/default/ghost"),
        (reqwest::Method::DELETE, "/api/v1/vms/default/ghost"),
        (reqwest::Method::PUT, "/api/v1/vms/default/ghost/start"),
        (reqwest::Method::GET, "/api/v1/vms/other/quiet/snapshots"),
        (reqwest::Method::GET, "/api/v1/vms/default/Ghost"),
    ] {
        expect_error(
            server.request(method, path).send().await.unwrap(),
            404,
            "NotFound",
            "no virtual machine",
        )
        .await;
    }

    // Invalid transitions of a stopped VM.
    for action in ["pause", "unpause", "stop", "forcestop", "restart"] {
        let response = server
            .request(
                reqwest::Method::PUT,
                &format!("/api/v1/vms/default/quiet/{action}"),
            )
            .send()
            .await
            .unwrap();
        expect_error(response, 409, "InvalidTransition", "Stopped").await;
    }
    expect_error(
        server
            .request(reqwest::Method::GET, "/api/v1/vms/default/quiet/screenshot")
            .send()
            .await
            .unwrap(),
        409,
        "InvalidTransition",
        "start it first",
    )
    .await;
    let bad_grace = server
        .request(
            reqwest::Method::PUT,
            "/api/v1/vms/default/quiet/stop?gracePeriodSeconds=soon",
        )
        .send()
        .await
        .unwrap();
    expect_error(bad_grace, 400, "BadRequest", "gracePeriodSeconds").await;
    // A websocket to the console of a stopped VM is refused before the upgrade, as JSON.
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "{}/api/v1/vms/default/quiet/console?token={TOKEN}",
            server.base.replace("http://", "ws://")
        ))
        .unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "plain.kubevirt.io".parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 409);
            let body: ErrorBody = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            assert!(body.message.contains("start it first"), "{body:?}");
        }
        other => panic!("expected a 409 refusal, got {other:?}"),
    }

    // Snapshots: a disk-only one of a stopped VM works; the rest is refused.
    let snapshot = |body: &'static str| {
        server
            .request(reqwest::Method::POST, "/api/v1/vms/default/quiet/snapshots")
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
    };
    let taken = snapshot(r#"{"name": "disk1"}"#).send().await.unwrap();
    assert_eq!(taken.status(), 201);
    expect_error(
        snapshot(r#"{"name": "mem", "memory": true}"#)
            .send()
            .await
            .unwrap(),
        409,
        "InvalidTransition",
        "memory",
    )
    .await;
    expect_error(
        snapshot(r#"{"name": "disk1"}"#).send().await.unwrap(),
        409,
        "AlreadyExists",
        "disk1",
    )
    .await;
    expect_error(
        snapshot(r#"{"name": "bad name"}"#).send().await.unwrap(),
        422,
        "InvalidSpec",
        "snapshot name",
    )
    .await;
    expect_error(
        snapshot(r#"{"nam": "typo"}"#).send().await.unwrap(),
        400,
        "BadRequest",
        "snapshot request",
    )
    .await;
    expect_error(
        snapshot("not json").send().await.unwrap(),
        400,
        "BadRequest",
        "snapshot request",
    )
    .await;
    expect_error(
        server
            .request(
                reqwest::Method::PUT,
                "/api/v1/vms/default/quiet/snapshots/absent/restore",
            )
            .send()
            .await
            .unwrap(),
        404,
        "NotFound",
        "absent",
    )
    .await;
    expect_error(
        server
            .request(
                reqwest::Method::DELETE,
                "/api/v1/vms/default/quiet/snapshots/absent",
            )
            .send()
            .await
            .unwrap(),
        404,
        "NotFound",
        "absent",
    )
    .await;
    expect_error(
        server
            .request(reqwest::Method::DELETE, "/api/v1/vms/default/quiet")
            .send()
            .await
            .unwrap(),
        409,
        "InvalidTransition",
        "snapshot",
    )
    .await;

    // Nothing changed: one VM, still stopped and Halted, with exactly the one snapshot.
    let vms = server.vms().await;
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].status.phase, "Stopped");
    assert_eq!(vms[0].run_strategy, "Halted");
    assert_eq!(
        vms[0]
            .snapshots
            .iter()
            .map(|snapshot| snapshot.name.as_str())
            .collect::<Vec<_>>(),
        ["disk1"]
    );
    assert!(!state.join("vms/default/x").exists());

    // Forced delete works; the events saw the snapshot and the deletion.
    let deleted = server
        .request(reqwest::Method::DELETE, "/api/v1/vms/default/quiet?force=true")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    expect_error(
        server
            .request(reqwest::Method::GET, "/api/v1/vms/default/quiet")
            .send()
            .await
            .unwrap(),
        404,
        "NotFound",
        "quiet",
    )
    .await;
    let mut seen = Vec::new();
    while !seen.iter().any(|(name, _): &(String, Value)| name == "Deleted") {
        seen.extend(read_events(&mut events, 1, &mut event_buffer).await);
    }
    assert!(
        seen.iter()
            .any(|(name, event)| name == "SnapshotsChanged" && event["snapshots"][0]["name"] == "disk1")
    );
    assert_eq!(
        seen.last().unwrap().1,
        serde_json::json!({"type": "Deleted", "namespace": "default", "name": "quiet"})
    );

    // Metrics counted the refusals by route template.
    let metrics = server
        .request(reqwest::Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"paddock_http_requests_total{method="POST",route="/api/v1/vms",status="422"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"paddock_http_requests_total{method="PUT",route="/api/v1/vms/{namespace}/{name}/pause",status="409"}"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_console_is_public_static_content_with_a_strict_policy() {
    let (_scratch, state) = scratch("api-ui");
    let server = Server::start(&state, None).await;
    let anonymous = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let get = |path: &str, accept: &str| {
        anonymous
            .get(format!("{}{path}", server.base))
            .header(reqwest::header::ACCEPT, accept)
            .send()
    };

    // Every embedded file is served without the token, with the policy and its content type.
    for name in paddock_console::ui::asset_names() {
        let response = get(&format!("/ui/{name}"), "*/*").await.unwrap();
        assert_eq!(response.status(), 200, "{name}");
        let headers = response.headers().clone();
        assert_eq!(
            headers[reqwest::header::CONTENT_SECURITY_POLICY],
            paddock_console::ui::CONTENT_SECURITY_POLICY
        );
        assert_eq!(headers[reqwest::header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(headers[reqwest::header::REFERRER_POLICY], "no-referrer");
        let content_type = headers[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_string();
        let body = response.bytes().await.unwrap();
        assert!(!body.is_empty(), "{name} is empty");
        let expected_type = match name.rsplit('.').next().unwrap() {
            "html" => "text/html",
            "js" => "text/javascript",
            "css" => "text/css",
            "svg" => "image/svg+xml",
            _ => "text/plain",
        };
        assert!(content_type.starts_with(expected_type), "{name}: {content_type}");
    }
    let index = get("/ui/", "text/html").await.unwrap();
    assert_eq!(index.status(), 200);
    let html = index.text().await.unwrap();
    assert!(
        html.contains("src=\"app.js\"") && html.contains("href=\"app.css\""),
        "{html}"
    );
    // No inline script: the policy would refuse it.
    assert!(!html.contains("<script>"), "{html}");

    // The policy allows nothing from other origins, no inline script, no eval, no framing.
    let policy = paddock_console::ui::CONTENT_SECURITY_POLICY;
    for directive in [
        "default-src 'none'",
        "script-src 'self';",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(policy.contains(directive), "{policy} lacks {directive}");
    }
    assert!(!policy.contains("unsafe") && !policy.contains("http"), "{policy}");

    // Unknown files are JSON 404s; /ui goes to /ui/.
    expect_error(
        get("/ui/nothing.js", "*/*").await.unwrap(),
        404,
        "NotFound",
        "no file nothing.js",
    )
    .await;
    let redirect = get("/ui", "text/html").await.unwrap();
    assert!(redirect.status().is_redirection());
    assert_eq!(redirect.headers()[reqwest::header::LOCATION], "/ui/");

    // A browser at the bare address lands on the console: on the sign-in page without a token,
    // signed in (token in the fragment, never in a request) with the right one; an API client
    // still gets JSON, and a wrong token is still refused.
    let bare = get("/", "text/html,application/xhtml+xml").await.unwrap();
    assert_eq!(bare.headers()[reqwest::header::LOCATION], "/ui/");
    let signed_in = get(&format!("/?token={TOKEN}"), "text/html").await.unwrap();
    assert_eq!(
        signed_in.headers()[reqwest::header::LOCATION],
        format!("/ui/#token={TOKEN}")
    );
    expect_error(
        get("/?token=wrong-token-0123456789", "application/json")
            .await
            .unwrap(),
        401,
        "Unauthorized",
        "wrong",
    )
    .await;
    let links = server.get_json("/").await;
    assert_eq!(links["ui"], "/ui/");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_for_cluster_mode() {
    let (_scratch, state) = scratch("api-upload");
    let server = Server::start(&state, None).await;
    let response = server
        .request(
            reqwest::Method::POST,
            "/api/v1/namespaces/default/uploads?name=disk",
        )
        .header("Content-Type", "application/octet-stream")
        .body(vec![0u8; 4096])
        .send()
        .await
        .unwrap();
    expect_error(
        response,
        501,
        "NotImplemented",
        "in local mode use a disk path or registry image",
    )
    .await;
    let response = server
        .request(reqwest::Method::GET, "/api/v1/namespaces/default/uploads/disk")
        .send()
        .await
        .unwrap();
    expect_error(response, 501, "NotImplemented", "upload is for cluster mode").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_schedules_are_checked_and_run_in_cluster_mode() {
    let (_scratch, state) = scratch("api-schedule");
    let server = Server::start(&state, None).await;
    let path = "/api/v1/vms/default/any/snapshot-schedule";
    let put = |body: &'static str| {
        server
            .request(reqwest::Method::PUT, path)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
    };
    // The schedule is checked before any backend sees it, so every backend answers alike.
    expect_error(
        put(r#"{"schedule": "every night"}"#).await.unwrap(),
        422,
        "InvalidSpec",
        "five-field cron expression",
    )
    .await;
    expect_error(
        put(r#"{"schedule": "0 3 * * *", "keep": 0}"#).await.unwrap(),
        422,
        "InvalidSpec",
        "between 1 and 1000",
    )
    .await;
    expect_error(
        put(r#"{"cron": "0 3 * * *"}"#).await.unwrap(),
        400,
        "BadRequest",
        "not a snapshot schedule",
    )
    .await;
    // A valid schedule (or clearing one) needs the operator: the local backend says so.
    expect_error(
        put(r#"{"schedule": "@daily", "keep": 3}"#).await.unwrap(),
        501,
        "NotImplemented",
        "schedules run in cluster mode",
    )
    .await;
    let response = server
        .request(reqwest::Method::DELETE, path)
        .send()
        .await
        .unwrap();
    expect_error(response, 501, "NotImplemented", "schedules run in cluster mode").await;
}

/// `qemu-img info` of `path` as JSON (the real tool, as the runtime runs it).
fn qemu_img_info(path: &Path) -> Value {
    let output = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .unwrap();
    assert!(output.status.success(), "qemu-img info {}", path.display());
    serde_json::from_slice(&output.stdout).unwrap()
}

fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(std::fs::read(path).unwrap());
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_library_lists_the_disks_stored_on_the_machine() {
    let Some((qemu, disk)) = paddock_tests::testdisk::qemu_and_test_disk("console-api-images").unwrap()
    else {
        return;
    };
    let (scratch, state) = scratch("api-images");
    let server = Server::start(&state, Some(&qemu)).await;
    let images = |value: Value| value["items"].as_array().unwrap().clone();
    assert!(
        images(server.get_json("/api/v1/images").await).is_empty(),
        "a new machine has no images"
    );

    // Creating a VM imports its disk: the library then names the source, format and sizes.
    let image = format!("file:{}", disk.display());
    let created = server
        .request(reqwest::Method::POST, "/api/v1/vms")
        .header(reqwest::header::CONTENT_TYPE, "application/yaml")
        .body(manifest("library", &image))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let listed = images(server.get_json("/api/v1/images").await);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let test_disk = &listed[0];
    let hex = sha256_hex(&disk);
    let info = qemu_img_info(&disk);
    assert_eq!(test_disk["digest"], format!("sha256:{hex}"));
    assert_eq!(test_disk["source"], image.as_str());
    assert_eq!(
        test_disk["image"],
        image.as_str(),
        "the wizard boots the source again"
    );
    assert_eq!(test_disk["format"], info["format"]);
    assert_eq!(test_disk["virtualSize"], info["virtual-size"]);
    assert_eq!(test_disk["size"], std::fs::metadata(&disk).unwrap().len());
    assert_eq!(test_disk["recorded"], true);
    assert_eq!(test_disk["usedBy"], serde_json::json!(["default/library"]));
    let imported_at = test_disk["importedAt"].as_str().unwrap();
    assert!(
        imported_at.len() == 20 && imported_at.ends_with('Z') && imported_at.starts_with("20"),
        "RFC 3339 UTC: {imported_at}"
    );
    // The record sits next to the stored disk and is complete JSON.
    let record: Value =
        serde_json::from_slice(&std::fs::read(state.join(format!("images/sha256/{hex}.json"))).unwrap())
            .unwrap();
    assert_eq!(record["source"], image.as_str());

    // A base stored before records existed (a raw disk here): listed with what can be derived.
    let raw = scratch.path().join("old.raw");
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&raw)
        .arg("2M")
        .status()
        .unwrap();
    assert!(status.success());
    let old_hex = sha256_hex(&raw);
    let stored = state.join(format!("images/sha256/{old_hex}"));
    std::fs::copy(&raw, &stored).unwrap();
    let listed = images(server.get_json("/api/v1/images").await);
    assert_eq!(listed.len(), 2, "{listed:?}");
    let old = listed
        .iter()
        .find(|entry| entry["digest"] == format!("sha256:{old_hex}"))
        .unwrap();
    assert_eq!(old["recorded"], false);
    assert_eq!(old["format"], "raw", "qemu-img tells the format");
    assert_eq!(old["virtualSize"], 2 * 1024 * 1024);
    assert!(
        old.get("source").is_none(),
        "no record and no VM: the source is unknown"
    );
    let stored_image = format!("file:{}", stored.display());
    assert_eq!(
        old["image"],
        stored_image.as_str(),
        "the stored copy is what boots it"
    );
    assert_eq!(old["usedBy"], serde_json::json!([]));

    // Booting the offered value imports nothing new, and the VM is then listed as a user.
    let created = server
        .request(reqwest::Method::POST, "/api/v1/vms")
        .header(reqwest::header::CONTENT_TYPE, "application/yaml")
        .body(manifest("from-library", &stored_image))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let listed = images(server.get_json("/api/v1/images").await);
    assert_eq!(listed.len(), 2, "the same content is stored once: {listed:?}");
    let old = listed
        .iter()
        .find(|entry| entry["digest"] == format!("sha256:{old_hex}"))
        .unwrap();
    assert_eq!(old["usedBy"], serde_json::json!(["default/from-library"]));
    assert_eq!(
        old["recorded"], false,
        "a store path is no source worth recording"
    );

    // Deleting the VMs keeps the images in the library.
    for name in ["library", "from-library"] {
        let deleted = server
            .request(reqwest::Method::DELETE, &format!("/api/v1/vms/default/{name}"))
            .send()
            .await
            .unwrap();
        assert_eq!(deleted.status(), 204);
    }
    let listed = images(server.get_json("/api/v1/images").await);
    assert_eq!(listed.len(), 2);
    assert!(
        listed
            .iter()
            .all(|entry| entry["usedBy"] == serde_json::json!([]))
    );
}
