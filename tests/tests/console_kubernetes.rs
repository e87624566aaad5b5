//! The console's Kubernetes backend (`paddock serve --kubeconfig`, the real binary) on the real
//! control plane with the KubeVirt simulator and the real paddock operator: users sign in with
//! ServiceAccount tokens (TokenRequest), the console acts as them (impersonation), so RBAC decides.
//!
//! The admin creates a VirtualMachineApp through the console, sees it Running, reads a non-blank
//! framebuffer of the simulator's real QEMU through the console's VNC websocket, takes, restores
//! and deletes a snapshot, and reaches the same screen at the URL of the BafflesApplication the
//! operator wrote. A user without RBAC gets 403s naming the missing permission and no console;
//! after a RoleBinding they can. Identity headers are believed only when the flag enables them.
//! Backups: the admin backs a VM up to a real registry from the console (snapshot/export as the
//! user, read through the simulator's export proxy), lists it and restores it under a new name; a
//! user without RBAC for virtualmachineexports (or virtualmachineapps) gets a 403 naming it.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use kube::api::{Api, DynamicObject};
use paddock_tests::cluster::{Cluster, TestNamespace};
use paddock_tests::world::{baffles_applications, paddock_binary, run};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Generous for TCG boots and simulated phases on a busy 2-core machine.
const TIMEOUT: Duration = Duration::from_secs(180);

/// A child process (console or operator) with its log, killed on drop.
struct Process {
    child: Child,
    log: PathBuf,
    _directory: tempfile::TempDir,
}

impl Process {
    fn log(&self) -> String {
        let log = std::fs::read(&self.log).unwrap_or_default();
        let start = log.len().saturating_sub(8000);
        String::from_utf8_lossy(&log[start..]).into_owned()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `paddock serve --kubeconfig <admin>` plus `extra` flags; returns it and its base URL.
fn start_console(cluster: &Cluster, extra: &[&str]) -> (Process, String) {
    let directory = tempfile::tempdir().unwrap();
    let log = directory.path().join("console.log");
    let mut child = Command::new(paddock_binary().unwrap())
        .arg("serve")
        .arg("--kubeconfig")
        .arg(cluster.admin_kubeconfig())
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", "info,paddock_console=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        let Some(Ok(line)) = lines.next() else {
            panic!(
                "paddock serve printed no URL; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        if let Some(url) = line.strip_prefix("paddock serve (kubernetes): ") {
            break url.trim().to_string();
        }
    };
    // Keep draining stdout so the console never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (
        Process {
            child,
            log,
            _directory: directory,
        },
        url,
    )
}

/// The real operator, scoped to the test's namespace, writing Baffles URLs through `console`.
fn start_operator(cluster: &Cluster, namespace: &str, console: &str) -> Process {
    let directory = tempfile::tempdir().unwrap();
    let log = directory.path().join("operator.log");
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(paddock_binary().unwrap())
        .args([
            "operator",
            "--namespace",
            namespace,
            "--lease-namespace",
            namespace,
        ])
        .args(["--identity", &format!("{namespace}-operator")])
        .args(["--console-gateway-url", &console.replacen("http://", "ws://", 1)])
        .args(["--listen", "127.0.0.1:0", "--retry-period-seconds", "1"])
        .env("KUBECONFIG", cluster.admin_kubeconfig())
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    Process {
        child,
        log,
        _directory: directory,
    }
}

/// Applies a manifest as the cluster admin.
fn kubectl_apply(cluster: &Cluster, manifest: &Value) {
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("manifest.json");
    std::fs::write(&file, serde_json::to_vec(manifest).unwrap()).unwrap();
    run(cluster.kubectl().arg("apply").arg("-f").arg(&file)).unwrap();
}

/// A ServiceAccount in `namespace` and a token for it (TokenRequest, through kubectl).
fn service_account_token(cluster: &Cluster, namespace: &str, name: &str) -> String {
    kubectl_apply(
        cluster,
        &json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}),
    );
    run(cluster.kubectl().args([
        "create",
        "token",
        name,
        "--namespace",
        namespace,
        "--duration",
        "1h",
    ]))
    .unwrap()
    .trim()
    .to_string()
}

/// An HTTP client of the console acting with one bearer token.
struct User {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl User {
    fn new(base: &str, token: &str) -> User {
        User {
            base: base.to_string(),
            token: token.to_string(),
            http: reqwest::Client::new(),
        }
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, String)>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some((content_type, body)) = body {
            request = request.header("Content-Type", content_type).body(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.request(reqwest::Method::GET, path, None).await
    }

    async fn ok(&self, method: reqwest::Method, path: &str, body: Option<(&str, String)>) -> Value {
        let (status, body) = self.request(method.clone(), path, body).await;
        assert!((200..300).contains(&status), "{method} {path}: {status} {body:#}");
        body
    }

    fn websocket_url(&self, path: &str) -> String {
        format!(
            "{}{path}?token={}",
            self.base.replacen("http://", "ws://", 1),
            self.token
        )
    }
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a `plain.kubevirt.io` websocket; Err is the refusal (status and body).
async fn open_websocket(url: &str, extra_protocol: Option<&str>) -> Result<Socket, (u16, String)> {
    let mut request = url.into_client_request().unwrap();
    let protocols = match extra_protocol {
        Some(extra) => format!("plain.kubevirt.io, {extra}"),
        None => "plain.kubevirt.io".to_string(),
    };
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", protocols.parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, response)) => {
            assert_eq!(response.headers()["Sec-WebSocket-Protocol"], "plain.kubevirt.io");
            Ok(socket)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned();
            Err((status, body))
        }
        Err(other) => panic!("websocket {url}: {other}"),
    }
}

/// The bytes of an RFB conversation over a websocket.
struct Rfb {
    socket: Socket,
    buffered: Vec<u8>,
}

impl Rfb {
    async fn read_exact(&mut self, count: usize) -> Vec<u8> {
        while self.buffered.len() < count {
            match tokio::time::timeout(TIMEOUT, self.socket.next()).await {
                Ok(Some(Ok(Message::Binary(bytes)))) => self.buffered.extend_from_slice(&bytes),
                Ok(Some(Ok(Message::Close(frame)))) => panic!("the VNC websocket closed: {frame:?}"),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(error))) => panic!("the VNC websocket failed: {error}"),
                Ok(None) => panic!("the VNC websocket ended"),
                Err(_) => panic!("no RFB data within {TIMEOUT:?}"),
            }
        }
        self.buffered.drain(..count).collect()
    }

    async fn u16(&mut self) -> u16 {
        let bytes = self.read_exact(2).await;
        u16::from_be_bytes([bytes[0], bytes[1]])
    }

    async fn u32(&mut self) -> u32 {
        let bytes = self.read_exact(4).await;
        u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.socket
            .send(Message::Binary(bytes.to_vec().into()))
            .await
            .unwrap();
    }
}

/// A minimal RFB 3.8 client: checks the banner, handshakes (security None), asks for raw 32-bit
/// pixels and full-screen updates until one shows something or the timeout passes. Returns the
/// banner and the share of lit pixels.
async fn rfb_screen(socket: Socket) -> (String, f64) {
    let mut rfb = Rfb {
        socket,
        buffered: Vec::new(),
    };
    let banner = String::from_utf8(rfb.read_exact(12).await).unwrap();
    assert_eq!(banner, "RFB 003.008\n");
    rfb.write(b"RFB 003.008\n").await;
    let count = rfb.read_exact(1).await[0];
    assert!(count > 0, "the server offered no security type");
    let types = rfb.read_exact(count as usize).await;
    assert!(types.contains(&1), "no security type None in {types:?}");
    rfb.write(&[1]).await;
    assert_eq!(rfb.u32().await, 0, "security handshake failed");
    rfb.write(&[1]).await; // ClientInit, shared
    let width = rfb.u16().await;
    let height = rfb.u16().await;
    rfb.read_exact(16).await;
    let name_length = rfb.u32().await as usize;
    rfb.read_exact(name_length).await;
    // SetPixelFormat: 32 bpp, depth 24, little endian, true colour, 8 bits per channel.
    rfb.write(&[
        0, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
    ])
    .await;
    // SetEncodings: raw only.
    rfb.write(&[2, 0, 0, 1, 0, 0, 0, 0]).await;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let [w_high, w_low] = width.to_be_bytes();
        let [h_high, h_low] = height.to_be_bytes();
        rfb.write(&[3, 0, 0, 0, 0, 0, w_high, w_low, h_high, h_low]).await;
        let (mut lit, mut total) = (0_u64, 0_u64);
        loop {
            match rfb.read_exact(1).await[0] {
                0 => {
                    rfb.read_exact(1).await;
                    let rectangles = rfb.u16().await;
                    for _ in 0..rectangles {
                        rfb.read_exact(4).await;
                        let w = rfb.u16().await as usize;
                        let h = rfb.u16().await as usize;
                        let encoding = rfb.u32().await;
                        assert_eq!(encoding, 0, "asked for raw pixels only");
                        let pixels = rfb.read_exact(w * h * 4).await;
                        total += (w * h) as u64;
                        lit += pixels
                            .chunks_exact(4)
                            .filter(|pixel| pixel[..3].iter().any(|channel| *channel != 0))
                            .count() as u64;
                    }
                    break;
                }
                2 => {}
                3 => {
                    rfb.read_exact(3).await;
                    let length = rfb.u32().await as usize;
                    rfb.read_exact(length).await;
                }
                other => panic!("unexpected RFB server message type {other}"),
            }
        }
        let share = lit as f64 / total.max(1) as f64;
        if share > 0.001 || Instant::now() > deadline {
            return (banner, share);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Polls `check` on the VM's view until it holds; returns the view.
async fn wait_vm(
    user: &User,
    namespace: &str,
    name: &str,
    what: &str,
    logs: &[&Process],
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (status, view) = user.get(&format!("/api/v1/vms/{namespace}/{name}")).await;
        if status == 200 && check(&view) {
            return view;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = logs.iter().map(|process| process.log()).collect();
            panic!(
                "timed out waiting for {namespace}/{name}: {what}; last: {status} {view:#}\nlogs:\n{}",
                logs.join("\n-----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn manifest(namespace: &str, name: &str) -> String {
    serde_json::to_string(&json!({
        "apiVersion": "paddock.dev/v1alpha1",
        "kind": "VirtualMachineApp",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "displayName": "Console test VM",
            "image": {"containerDisk": "registry.example.com/vms/console-test:1", "persistent": false},
            "resources": {"cpu": 1, "memory": "256Mi"},
            "runStrategy": "Always",
        },
    }))
    .unwrap()
}

async fn wait_ready(base: &str, console: &Process) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Ok(response) = reqwest::get(format!("{base}/readyz")).await
            && response.status() == 200
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the console never became ready:\n{}",
            console.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_drive_vms_through_the_console_with_their_own_rights() {
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let namespace: TestNamespace = cluster.namespace("console-k8s").await.unwrap();
    let ns = namespace.name().to_string();
    let (console, base) = start_console(cluster, &[]);
    let operator = start_operator(cluster, &ns, &base);
    wait_ready(&base, &console).await;
    let logs = [&console, &operator];

    // The admin: a ServiceAccount bound to cluster-admin, signing in with a TokenRequest token.
    let admin_token = service_account_token(cluster, &ns, "console-admin");
    kubectl_apply(
        cluster,
        &json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": format!("{ns}-console-admin")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": "console-admin", "namespace": ns}],
        }),
    );
    let admin = User::new(&base, &admin_token);
    let session = admin.ok(reqwest::Method::GET, "/api/v1/session", None).await;
    assert_eq!(session["backend"], "kubernetes");
    assert_eq!(
        session["user"]["username"],
        format!("system:serviceaccount:{ns}:console-admin")
    );
    // Signing in exchanges the Kubernetes token for a console session token: what a browser keeps.
    let signed_in = admin.ok(reqwest::Method::POST, "/api/v1/session", None).await;
    let session_token = signed_in["token"].as_str().unwrap().to_string();
    assert!(session_token.starts_with("pds1."), "{signed_in:#}");
    assert_ne!(session_token, admin_token);
    let browser = User::new(&base, &session_token);
    let same = browser.ok(reqwest::Method::GET, "/api/v1/session", None).await;
    assert_eq!(same["user"]["username"], session["user"]["username"]);
    let (status, refused) = User::new(&base, "not-a-valid-token-0123456789")
        .get("/api/v1/vms")
        .await;
    assert_eq!(
        (status, refused["reason"].as_str()),
        (401, Some("Unauthorized")),
        "{refused}"
    );

    // The admin's event stream (from the console's reflectors) reports the VM coming up.
    let events = tokio::spawn({
        let url = format!("{base}/api/v1/events");
        let token = admin_token.clone();
        async move {
            let response = reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let mut stream = response.bytes_stream();
            let mut text = String::new();
            while let Some(chunk) = stream.next().await {
                text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
                if text.lines().any(|line| {
                    line.starts_with("data:")
                        && line.contains("\"name\":\"demo\"")
                        && line.contains("\"phase\":\"Running\"")
                }) {
                    break;
                }
            }
            text
        }
    });

    // Create through the console; the operator makes the KubeVirt VM, the simulator runs it.
    let created = admin
        .ok(
            reqwest::Method::POST,
            "/api/v1/vms",
            Some(("application/yaml", manifest(&ns, "demo"))),
        )
        .await;
    assert_eq!(created["name"], "demo");
    assert_eq!(created["runStrategy"], "Always");
    let running = wait_vm(&admin, &ns, "demo", "Running", &logs, |view| {
        view["status"]["phase"] == "Running"
    })
    .await;
    assert_eq!(running["displayName"], "Console test VM");
    assert_eq!(running["manifest"]["kind"], "VirtualMachineApp");
    let listed = admin
        .ok(reqwest::Method::GET, &format!("/api/v1/vms?namespace={ns}"), None)
        .await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "{listed:#}");
    let events = tokio::time::timeout(Duration::from_secs(30), events)
        .await
        .unwrap()
        .unwrap();
    assert!(events.contains("event: Changed"), "{events}");

    // VNC through the console, signed in with the session: QEMU's RFB banner and a screen that
    // shows something.
    let socket = open_websocket(
        &browser.websocket_url(&format!("/api/v1/vms/{ns}/demo/vnc")),
        None,
    )
    .await
    .unwrap();
    let (banner, lit) = rfb_screen(socket).await;
    assert_eq!(banner, "RFB 003.008\n");
    assert!(lit > 0.001, "the framebuffer is blank ({lit})");

    // Snapshot, restore (the console stops the VM, restores, starts it again), delete.
    let snapshot = admin
        .ok(
            reqwest::Method::POST,
            &format!("/api/v1/vms/{ns}/demo/snapshots"),
            Some(("application/json", json!({"name": "before-upgrade"}).to_string())),
        )
        .await;
    assert_eq!(snapshot["name"], "before-upgrade");
    assert_eq!(snapshot["takenInPhase"], "Running");
    let (status, memory) = admin
        .request(
            reqwest::Method::POST,
            &format!("/api/v1/vms/{ns}/demo/snapshots"),
            Some((
                "application/json",
                json!({"name": "with-memory", "memory": true}).to_string(),
            )),
        )
        .await;
    assert_eq!(
        (status, memory["reason"].as_str()),
        (422, Some("Unsupported")),
        "{memory}"
    );
    let restored = admin
        .ok(
            reqwest::Method::PUT,
            &format!("/api/v1/vms/{ns}/demo/snapshots/before-upgrade/restore"),
            None,
        )
        .await;
    assert_eq!(restored["runStrategy"], "Always", "{restored:#}");
    let client = cluster.admin_client().await.unwrap();
    let vms: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &paddock_tests::world::virtual_machines());
    let vm = vms.get("demo").await.unwrap();
    assert!(
        vm.metadata
            .annotations
            .as_ref()
            .is_some_and(|annotations| annotations.contains_key("restore.kubevirt.io/lastRestoreUID")),
        "the VM was not restored: {:?}",
        vm.metadata.annotations
    );
    wait_vm(&admin, &ns, "demo", "Running after the restore", &logs, |view| {
        view["status"]["phase"] == "Running"
    })
    .await;
    let (status, _) = admin
        .request(
            reqwest::Method::DELETE,
            &format!("/api/v1/vms/{ns}/demo/snapshots/before-upgrade"),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let snapshots = admin
        .ok(
            reqwest::Method::GET,
            &format!("/api/v1/vms/{ns}/demo/snapshots"),
            None,
        )
        .await;
    assert_eq!(snapshots["items"], json!([]));

    // Migrate (KubeVirt's subresource; the simulator completes the migration) and clone (a
    // VirtualMachineClone, which the simulated clone controller turns into a new VM).
    let migrated = admin
        .ok(
            reqwest::Method::PUT,
            &format!("/api/v1/vms/{ns}/demo/migrate"),
            None,
        )
        .await;
    assert_eq!(migrated["name"], "demo");
    let clone = admin
        .ok(
            reqwest::Method::POST,
            &format!("/api/v1/vms/{ns}/demo/clone"),
            Some(("application/json", json!({"name": "demo-copy"}).to_string())),
        )
        .await;
    assert_eq!(
        (clone["namespace"].as_str(), clone["name"].as_str()),
        (Some(ns.as_str()), Some("demo-copy")),
        "{clone:#}"
    );
    assert_eq!(clone["manifest"]["kind"], "VirtualMachine", "{clone:#}");

    // The BafflesApplication the operator wrote leads to the same screen, through the console.
    let listings: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &baffles_applications());
    let deadline = Instant::now() + TIMEOUT;
    let url = loop {
        if let Some(listing) = listings.get_opt("demo").await.unwrap()
            && let Some(url) = listing.data["spec"]["url"].as_str()
        {
            break url.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no BafflesApplication demo:\n{}",
            operator.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let path = url
        .strip_prefix(&base.replacen("http://", "ws://", 1))
        .unwrap_or_else(|| panic!("{url} is not under {base}"));
    assert_eq!(
        path,
        format!("/k8s/apis/subresources.kubevirt.io/v1/namespaces/{ns}/virtualmachineinstances/demo/vnc")
    );
    let (banner, _) = rfb_screen(open_websocket(&admin.websocket_url(path), None).await.unwrap()).await;
    assert_eq!(banner, "RFB 003.008\n");
    // Also KubeVirt's older version path, with the token as Kubernetes' websocket subprotocol.
    let old_path = path.replace("/v1/", "/v1alpha3/");
    let bearer = {
        use base64::Engine as _;
        format!(
            "base64url.bearer.authorization.k8s.io.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&admin_token)
        )
    };
    let socket = open_websocket(
        &format!("{}{old_path}", base.replacen("http://", "ws://", 1)),
        Some(&bearer),
    )
    .await
    .unwrap();
    let (banner, _) = rfb_screen(socket).await;
    assert_eq!(banner, "RFB 003.008\n");

    // A user without RBAC: 403s that name the missing permission, and no console.
    let alice = User::new(&base, &service_account_token(cluster, &ns, "alice"));
    let (status, body) = alice.get(&format!("/api/v1/vms/{ns}/demo")).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (403, Some("Forbidden")),
        "{body:#}"
    );
    assert_eq!(
        body["permission"],
        json!({"verb": "get", "group": "kubevirt.io", "resource": "virtualmachines", "namespace": ns, "name": "demo"}),
        "{body:#}"
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains(&format!("system:serviceaccount:{ns}:alice")),
        "{body:#}"
    );
    let (status, body) = alice.get(&format!("/api/v1/vms?namespace={ns}")).await;
    assert_eq!(status, 403, "{body:#}");
    assert_eq!(body["permission"]["verb"], "list");
    let everything = alice.ok(reqwest::Method::GET, "/api/v1/vms", None).await;
    assert_eq!(
        everything["items"],
        json!([]),
        "alice sees only what she may list"
    );
    let (status, body) = open_websocket(&alice.websocket_url(&format!("/api/v1/vms/{ns}/demo/vnc")), None)
        .await
        .map(drop)
        .unwrap_err();
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, 403, "{body:#}");
    assert_eq!(
        body["permission"],
        json!({"verb": "get", "group": "subresources.kubevirt.io", "resource": "virtualmachineinstances", "subresource": "vnc", "namespace": ns, "name": "demo"}),
        "{body:#}"
    );

    // After a RoleBinding that lets her view VMs and open their screens, she can.
    kubectl_apply(
        cluster,
        &json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "vm-viewer", "namespace": ns},
            "rules": [
                {"apiGroups": ["kubevirt.io"], "resources": ["virtualmachines", "virtualmachineinstances"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["subresources.kubevirt.io"], "resources": ["virtualmachineinstances/vnc"], "verbs": ["get"]},
                {"apiGroups": ["snapshot.kubevirt.io"], "resources": ["virtualmachinesnapshots"], "verbs": ["get", "list", "watch"]},
            ],
        }),
    );
    kubectl_apply(
        cluster,
        &json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "alice-views-vms", "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "vm-viewer"},
            "subjects": [{"kind": "ServiceAccount", "name": "alice", "namespace": ns}],
        }),
    );
    // Denials are cached for a few seconds.
    let view = wait_vm(&alice, &ns, "demo", "visible to alice", &logs, |view| {
        view["name"] == "demo"
    })
    .await;
    assert_eq!(view["status"]["phase"], "Running");
    let listed = alice.ok(reqwest::Method::GET, "/api/v1/vms", None).await;
    let names: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|vm| vm["name"].as_str())
        .collect();
    assert_eq!(names, ["demo", "demo-copy"], "{listed:#}");
    let (banner, lit) = rfb_screen(
        open_websocket(&alice.websocket_url(&format!("/api/v1/vms/{ns}/demo/vnc")), None)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(banner, "RFB 003.008\n");
    assert!(lit > 0.001, "the framebuffer is blank ({lit})");
    // Stopping edits the app's runStrategy (the operator owns the VM's), which she may not patch.
    let (status, body) = alice
        .request(reqwest::Method::PUT, &format!("/api/v1/vms/{ns}/demo/stop"), None)
        .await;
    assert_eq!(status, 403, "{body:#}");
    assert_eq!(
        body["permission"],
        json!({"verb": "patch", "group": "paddock.dev", "resource": "virtualmachineapps", "namespace": ns, "name": "demo"}),
        "{body:#}"
    );

    // The admin stops it (the app says Halted, the operator halts the VM) and deletes it.
    let stopped = admin
        .ok(reqwest::Method::PUT, &format!("/api/v1/vms/{ns}/demo/stop"), None)
        .await;
    assert_eq!(stopped["runStrategy"], "Halted");
    wait_vm(&admin, &ns, "demo", "Stopped", &logs, |view| {
        view["status"]["phase"] == "Stopped"
    })
    .await;
    let (status, body) = admin
        .request(reqwest::Method::DELETE, &format!("/api/v1/vms/{ns}/demo"), None)
        .await;
    assert_eq!(status, 204, "{body}");
    let (status, _) = admin.get(&format!("/api/v1/vms/{ns}/demo")).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_headers_are_believed_only_when_enabled() {
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let headers = [
        ("X-Forwarded-User", "paddock-admin"),
        ("X-Forwarded-Groups", "system:masters"),
    ];
    let ask = |base: String| async move {
        let mut request = reqwest::Client::new().get(format!("{base}/api/v1/session"));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (
            status,
            serde_json::from_str::<Value>(&response.text().await.unwrap()).unwrap(),
        )
    };

    let (plain, plain_base) = start_console(cluster, &[]);
    wait_ready(&plain_base, &plain).await;
    let (status, body) = ask(plain_base.clone()).await;
    assert_eq!(
        status, 401,
        "headers must not be believed without the flag: {body:#}"
    );

    let (proxied, proxied_base) = start_console(
        cluster,
        &[
            "--auth-proxy-user-header",
            "X-Forwarded-User",
            "--auth-proxy-groups-header",
            "X-Forwarded-Groups",
        ],
    );
    wait_ready(&proxied_base, &proxied).await;
    let (status, body) = ask(proxied_base.clone()).await;
    assert_eq!(status, 200, "{body:#}\n{}", proxied.log());
    assert_eq!(
        body["user"],
        json!({"username": "paddock-admin", "groups": ["system:masters"]})
    );
}

/// `POST /api/v1/namespaces/{ns}/uploads` with `disk` as a streamed body; the status and answer.
async fn upload_through_console(
    base: &str,
    token: &str,
    namespace: &str,
    query: &str,
    disk: &std::path::Path,
) -> (u16, Value) {
    let file = tokio::fs::File::open(disk).await.unwrap();
    let length = file.metadata().await.unwrap().len();
    let response = reqwest::Client::new()
        .post(format!("{base}/api/v1/namespaces/{namespace}/uploads?{query}"))
        .bearer_auth(token)
        .header("Content-Type", "application/octet-stream")
        .header("Content-Length", length)
        .body(reqwest::Body::wrap_stream(paddock_cluster::upload::file_stream(
            file,
        )))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Polls the console's upload status until the DataVolume is Succeeded; its last view.
async fn wait_upload_succeeded(user: &User, namespace: &str, name: &str, console: &Process) -> Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (status, view) = user
            .get(&format!("/api/v1/namespaces/{namespace}/uploads/{name}"))
            .await;
        assert_eq!(status, 200, "{view:#}");
        if view["phase"] == "Succeeded" {
            return view;
        }
        assert_ne!(view["phase"], "Failed", "{view:#}");
        assert!(
            Instant::now() < deadline,
            "DataVolume {name} never Succeeded: {view:#}\n{}",
            console.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A console started with the simulator's CA for its upload proxy, an admin and a user without RBAC.
async fn upload_world(cluster: &Cluster, namespace: &str) -> (Process, String, String, String) {
    let ca = cluster.simulator_ca().to_str().unwrap().to_string();
    let (console, base) = start_console(cluster, &["--upload-proxy-ca-file", &ca]);
    wait_ready(&base, &console).await;
    let admin_token = service_account_token(cluster, namespace, "upload-admin");
    kubectl_apply(
        cluster,
        &json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "upload-admin", "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
            "subjects": [{"kind": "ServiceAccount", "name": "upload-admin", "namespace": namespace}],
        }),
    );
    // `admin` does not cover CDI's kinds unless CDI's aggregated roles are installed: grant them.
    kubectl_apply(
        cluster,
        &json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "uploader", "namespace": namespace},
            "rules": [
                {"apiGroups": ["cdi.kubevirt.io"], "resources": ["datavolumes"], "verbs": ["create", "get", "list", "delete"]},
                {"apiGroups": ["upload.cdi.kubevirt.io"], "resources": ["uploadtokenrequests"], "verbs": ["create"]},
            ],
        }),
    );
    kubectl_apply(
        cluster,
        &json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "uploader", "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "uploader"},
            "subjects": [{"kind": "ServiceAccount", "name": "upload-admin", "namespace": namespace}],
        }),
    );
    let user_token = service_account_token(cluster, namespace, "no-rbac");
    (console, base, admin_token, user_token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_upload_through_the_console_as_the_user() {
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let disk = paddock_tests::testdisk::test_disk().unwrap_or_else(|error| panic!("{error}"));
    let namespace: TestNamespace = cluster.namespace("console-upload").await.unwrap();
    let ns = namespace.name().to_string();
    let (console, base, admin_token, user_token) = upload_world(cluster, &ns).await;
    let admin = User::new(&base, &admin_token);
    let data_volumes: Api<DynamicObject> = Api::namespaced_with(
        cluster.admin_client().await.unwrap(),
        &ns,
        &paddock_tests::world::data_volumes(),
    );

    // A user without RBAC: 403 naming the permission, nothing created.
    let (status, refused) = upload_through_console(&base, &user_token, &ns, "name=refused", &disk).await;
    assert_eq!(status, 403, "{refused:#}");
    assert_eq!(refused["permission"]["verb"], "create", "{refused:#}");
    assert_eq!(refused["permission"]["resource"], "datavolumes", "{refused:#}");
    assert_eq!(refused["permission"]["group"], "cdi.kubevirt.io", "{refused:#}");
    assert!(data_volumes.get_opt("refused").await.unwrap().is_none());
    let (status, dry) = User::new(&base, &user_token)
        .request(
            reqwest::Method::POST,
            &format!("/api/v1/namespaces/{ns}/uploads?name=refused&dryRun=true"),
            None,
        )
        .await;
    assert_eq!(
        (status, &dry["permission"]["resource"]),
        (403, &json!("datavolumes")),
        "{dry:#}"
    );

    // A size that cannot hold the qcow2's virtual size: 422 before anything is created.
    let (status, small) =
        upload_through_console(&base, &admin_token, &ns, "name=too-small&size=1Mi", &disk).await;
    assert_eq!(status, 422, "{small:#}");
    assert!(
        small["message"]
            .as_str()
            .unwrap()
            .contains("smaller than the disk's virtual size"),
        "{small:#}"
    );
    assert!(data_volumes.get_opt("too-small").await.unwrap().is_none());

    // The test disk: the answer comes once the proxy has every byte; then CDI imports it.
    let length = std::fs::metadata(&disk).unwrap().len();
    let started = Instant::now();
    let (status, uploaded) = upload_through_console(&base, &admin_token, &ns, "name=uploaded", &disk).await;
    assert_eq!(status, 201, "{uploaded:#}\n{}", console.log());
    assert_eq!(uploaded["bytesSent"], length, "{uploaded:#}");
    assert_eq!(uploaded["format"], "qcow2");
    let done = wait_upload_succeeded(&admin, &ns, "uploaded", &console).await;
    eprintln!(
        "console upload of {length} bytes: {:?} to Succeeded ({done})",
        started.elapsed()
    );
    let stored = data_volumes.get("uploaded").await.unwrap();
    assert_eq!(stored.data["status"]["phase"], "Succeeded");
    // The same name again: 409 (asked first or not), and the existing DataVolume is untouched.
    let (status, taken) = admin
        .request(
            reqwest::Method::POST,
            &format!("/api/v1/namespaces/{ns}/uploads?name=uploaded&dryRun=true"),
            None,
        )
        .await;
    assert_eq!(status, 409, "{taken:#}");
    let (status, free) = admin
        .request(
            reqwest::Method::POST,
            &format!("/api/v1/namespaces/{ns}/uploads?name=free&dryRun=true"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{free:#}");
    assert!(data_volumes.get_opt("free").await.unwrap().is_none());
    let (status, again) = upload_through_console(&base, &admin_token, &ns, "name=uploaded", &disk).await;
    assert_eq!(status, 409, "{again:#}");
    assert_eq!(
        data_volumes.get("uploaded").await.unwrap().data["status"]["phase"],
        "Succeeded"
    );

    // A client that disconnects midway: an error, and no DataVolume left claiming the disk.
    let bytes = std::fs::read(&disk).unwrap();
    let address = base.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "POST /api/v1/namespaces/{ns}/uploads?name=truncated HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {admin_token}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        bytes.len()
    );
    use tokio::io::AsyncWriteExt;
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&bytes[..bytes.len() / 2]).await.unwrap();
    // Let the console create the DataVolume and start streaming before the client goes away.
    let deadline = Instant::now() + TIMEOUT;
    while data_volumes.get_opt("truncated").await.unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "no DataVolume truncated\n{}",
            console.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(stream);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match data_volumes.get_opt("truncated").await.unwrap() {
            None => break,
            Some(object) => assert_ne!(
                object.data["status"]["phase"], "Succeeded",
                "a truncated upload must not succeed"
            ),
        }
        assert!(
            Instant::now() < deadline,
            "the truncated upload's DataVolume was not deleted\n{}",
            console.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The console logs why, right after deleting the DataVolume.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !console.log().contains("upload failed") {
        assert!(
            Instant::now() < deadline,
            "the console logs the failed upload:\n{}",
            console.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "truncated upload: {}",
        console
            .log()
            .lines()
            .filter(|line| line.contains("upload failed"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Throughput through the console vs `paddock upload` straight to the proxy, same disk, same run:
/// `cargo test -p paddock-tests --test console_kubernetes -- --ignored --nocapture upload_throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check; run it by name"]
async fn upload_throughput_console_vs_cli() {
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let namespace: TestNamespace = cluster.namespace("upload-bench").await.unwrap();
    let ns = namespace.name().to_string();
    let (console, base, admin_token, _) = upload_world(cluster, &ns).await;
    let admin = User::new(&base, &admin_token);
    let directory = tempfile::tempdir().unwrap();
    let disk = directory.path().join("bench.raw");
    let megabytes: usize = std::env::var("PADDOCK_UPLOAD_BENCH_MIB")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(512);
    // Incompressible bytes, so no layer can shortcut them.
    let mut content = vec![0u8; megabytes << 20];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in content.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&disk, &content).unwrap();
    drop(content);
    let length = std::fs::metadata(&disk).unwrap().len() as f64;
    let rate = |seconds: f64| length / seconds / f64::from(1 << 20);

    let started = Instant::now();
    let (status, uploaded) =
        upload_through_console(&base, &admin_token, &ns, "name=via-console", &disk).await;
    let accepted = started.elapsed().as_secs_f64();
    assert_eq!(status, 201, "{uploaded:#}");
    wait_upload_succeeded(&admin, &ns, "via-console", &console).await;
    let console_total = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let output = Command::new(paddock_binary().unwrap())
        .args([
            "upload",
            disk.to_str().unwrap(),
            "--name",
            "via-cli",
            "-n",
            &ns,
            "--quiet",
        ])
        .arg("--kubeconfig")
        .arg(cluster.admin_kubeconfig())
        .arg("--ca-file")
        .arg(cluster.simulator_ca())
        .output()
        .unwrap();
    let cli_total = started.elapsed().as_secs_f64();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!(
        "UPLOAD THROUGHPUT {megabytes} MiB raw: console {:.1} MiB/s to accepted ({accepted:.2} s), {:.1} MiB/s to Succeeded ({console_total:.2} s); paddock upload {:.1} MiB/s to Succeeded ({cli_total:.2} s)",
        rate(accepted),
        rate(console_total),
        rate(cli_total)
    );
}

/// Polls `GET /api/v1/operations/{id}` until the operation ended; returns it.
async fn wait_operation(user: &User, operation: &Value, logs: &[&Process]) -> Value {
    let id = operation["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let current = user
            .ok(reqwest::Method::GET, &format!("/api/v1/operations/{id}"), None)
            .await;
        if current["phase"] != "Running" {
            return current;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = logs.iter().map(|process| process.log()).collect();
            panic!(
                "operation {id} still runs: {current:#}\nlogs:\n{}",
                logs.join("\n-----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Backups in cluster mode: the admin backs a VM (a persistent disk imported from a real registry)
/// up from the console, sees the backup listed, restores it under a new name and finds the new
/// VirtualMachineApp pinned to the backup; a user who may read VMs but not create
/// virtualmachineexports gets a 403 naming that permission, and nothing starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_and_restores_run_through_the_console_as_the_user() {
    use paddock_tests::registry::{RegistryAuth, require_registry};
    use paddock_tests::world::{allow_insecure_registry, virtual_machine_apps};

    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let Some(registry) = require_registry("console-backup", RegistryAuth::None).unwrap() else {
        return;
    };
    let namespace: TestNamespace = cluster.namespace("console-backup").await.unwrap();
    let ns = namespace.name().to_string();
    let client = cluster.admin_client().await.unwrap();
    allow_insecure_registry(&client, registry.address(), TIMEOUT)
        .await
        .unwrap();

    // A 64 MiB disk with a marker, packaged and pushed: the VM's image.
    let directory = tempfile::tempdir().unwrap();
    let raw = directory.path().join("disk.raw");
    let mut bytes = vec![0_u8; 64 << 20];
    bytes[8 << 20..(8 << 20) + 4].copy_from_slice(&[0xa5; 4]);
    std::fs::write(&raw, &bytes).unwrap();
    let disk = directory.path().join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&disk))
    .unwrap();
    let layout = directory.path().join("disk.oci");
    let image = format!("{}/vms/source:1", registry.address());
    run(Command::new(paddock_binary().unwrap())
        .arg("package")
        .arg(&disk)
        .args(["--image", &image, "--output"])
        .arg(&layout))
    .unwrap();
    run(Command::new(paddock_binary().unwrap())
        .arg("push")
        .arg(&layout)
        .arg(&image)
        .arg("--insecure"))
    .unwrap();

    // The console reads the simulator's export proxy (it runs outside the cluster) and may speak
    // plain http to the loopback registry.
    let (console, base) = start_console(
        cluster,
        &["--registry-allow-insecure", "--backup-export-link", "external"],
    );
    let operator = start_operator(cluster, &ns, &base);
    wait_ready(&base, &console).await;
    let logs = [&console, &operator];
    let admin_token = service_account_token(cluster, &ns, "backup-admin");
    kubectl_apply(
        cluster,
        &json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": format!("{ns}-backup-admin")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": "backup-admin", "namespace": ns}],
        }),
    );
    let admin = User::new(&base, &admin_token);
    let manifest = json!({
        "apiVersion": "paddock.dev/v1alpha1",
        "kind": "VirtualMachineApp",
        "metadata": {"name": "source", "namespace": ns},
        "spec": {
            "displayName": "Backed up from the console",
            "image": {"containerDisk": image, "persistent": true},
            "resources": {"cpu": 1, "memory": "256Mi"},
            "disk": {"size": "64Mi"},
            "runStrategy": "Halted",
        },
    });
    admin
        .ok(
            reqwest::Method::POST,
            "/api/v1/vms",
            Some(("application/json", manifest.to_string())),
        )
        .await;
    wait_vm(&admin, &ns, "source", "Stopped", &logs, |view| {
        view["status"]["phase"] == "Stopped"
    })
    .await;

    // A user who may read VMs but not export them: 403 naming the missing permission.
    let reader_token = service_account_token(cluster, &ns, "reader");
    kubectl_apply(
        cluster,
        &json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "vm-reader", "namespace": ns},
            "rules": [
                {"apiGroups": ["kubevirt.io"], "resources": ["virtualmachines", "virtualmachineinstances"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["paddock.dev"], "resources": ["virtualmachineapps"], "verbs": ["get", "list", "watch"]},
            ],
        }),
    );
    kubectl_apply(
        cluster,
        &json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "vm-reader", "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "vm-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}],
        }),
    );
    let reader = User::new(&base, &reader_token);
    let repository = format!("{}/backups/source", registry.address());
    let request = json!({"repository": repository, "insecure": true}).to_string();
    let backups_path = format!("/api/v1/vms/{ns}/source/backups");
    let deadline = Instant::now() + TIMEOUT;
    let refused = loop {
        let (status, body) = reader
            .request(
                reqwest::Method::POST,
                &backups_path,
                Some(("application/json", request.clone())),
            )
            .await;
        // The RoleBinding may take a moment to reach the authorizer.
        if status == 403 && body["permission"]["resource"] == "virtualmachineexports" {
            break body;
        }
        assert!(Instant::now() < deadline, "{status} {body:#}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(refused["permission"]["verb"], "create", "{refused:#}");
    assert_eq!(
        refused["permission"]["group"], "export.kubevirt.io",
        "{refused:#}"
    );
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("may not create virtualmachineexports"),
        "{refused:#}"
    );
    assert_eq!(
        reader.ok(reqwest::Method::GET, "/api/v1/operations", None).await["items"],
        json!([]),
        "a refused backup starts no operation"
    );

    // The admin backs up: a Running operation with progress, then Succeeded with the backup.
    let (status, started) = admin
        .request(
            reqwest::Method::POST,
            &backups_path,
            Some(("application/json", request.clone())),
        )
        .await;
    assert_eq!(status, 202, "{started:#}");
    assert_eq!(started["kind"], "Backup");
    assert_eq!(started["phase"], "Running");
    let ended = wait_operation(&admin, &started, &logs).await;
    assert_eq!(ended["phase"], "Succeeded", "{ended:#}");
    let backup = ended["backup"].clone();
    assert_eq!(backup["namespace"], ns.as_str());
    assert_eq!(backup["name"], "source");
    assert_eq!(backup["displayName"], "Backed up from the console");
    assert!(
        backup["diskVirtualSize"].as_u64().unwrap() >= 64 << 20,
        "{backup:#}"
    );
    let tag = backup["tag"].as_str().unwrap().to_string();
    assert!(tag.starts_with("source-"), "{backup:#}");
    // The export and its token are gone afterwards.
    let exports: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns,
        &paddock_tests::world::api_resource(
            "export.kubevirt.io",
            "v1beta1",
            "VirtualMachineExport",
            "virtualmachineexports",
        ),
    );
    assert!(
        exports.list(&Default::default()).await.unwrap().items.is_empty(),
        "the backup's VirtualMachineExport was not deleted"
    );

    // Listed, for the admin; the reader may list VMs in the namespace and sees it too; a listing
    // query for a namespace the reader may not list is refused.
    let query = format!("repository={repository}&insecure=true");
    let listed = admin
        .ok(reqwest::Method::GET, &format!("/api/v1/backups?{query}"), None)
        .await;
    let tags: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["tag"].as_str().unwrap())
        .collect();
    assert_eq!(tags, [tag.as_str()], "{listed:#}");
    let of_vm = admin
        .ok(reqwest::Method::GET, &format!("{backups_path}?{query}"), None)
        .await;
    assert_eq!(of_vm["items"][0]["pinnedReference"], backup["pinnedReference"]);
    let (status, body) = reader
        .get(&format!("/api/v1/backups?{query}&namespace=kube-system"))
        .await;
    assert_eq!(status, 403, "{body:#}");

    // Restored under a new name: a VirtualMachineApp pinned to the backup, made as the admin.
    let restore = json!({
        "reference": backup["pinnedReference"],
        "insecure": true,
        "name": "restored",
    })
    .to_string();
    let (status, started) = admin
        .request(
            reqwest::Method::POST,
            "/api/v1/backups/restore",
            Some(("application/json", restore.clone())),
        )
        .await;
    assert_eq!(status, 202, "{started:#}");
    assert_eq!(started["kind"], "Restore");
    let ended = wait_operation(&admin, &started, &logs).await;
    assert_eq!(ended["phase"], "Succeeded", "{ended:#}");
    assert_eq!(ended["result"], format!("{ns}/restored"));
    let apps: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &virtual_machine_apps());
    let restored = apps.get("restored").await.unwrap();
    assert_eq!(
        restored.data["spec"]["image"]["containerDisk"],
        backup["pinnedReference"]
    );
    assert_eq!(restored.data["spec"]["displayName"], "Backed up from the console");
    wait_vm(&admin, &ns, "restored", "visible", &logs, |view| {
        view["name"] == "restored"
    })
    .await;
    // Restoring onto an existing name without replace is refused before anything starts.
    let (status, body) = admin
        .request(
            reqwest::Method::POST,
            "/api/v1/backups/restore",
            Some(("application/json", restore)),
        )
        .await;
    assert_eq!(status, 409, "{body:#}");
    // The reader may not create VirtualMachineApps: 403 naming that.
    let (status, body) = reader
        .request(
            reqwest::Method::POST,
            "/api/v1/backups/restore",
            Some((
                "application/json",
                json!({"reference": backup["pinnedReference"], "insecure": true, "name": "mine"}).to_string(),
            )),
        )
        .await;
    assert_eq!(status, 403, "{body:#}");
    assert_eq!(body["permission"]["resource"], "virtualmachineapps", "{body:#}");
    assert_eq!(body["permission"]["verb"], "create", "{body:#}");
    drop(registry);
}
