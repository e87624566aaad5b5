//! virt-api's subresources, served by the simulator and reached THROUGH kube-apiserver's aggregation
//! layer: the websockets (`plain.kubevirt.io`) reach a real QEMU running the test disk, and the
//! lifecycle calls answer with virt-api's patches and 409s.
//!
//! The VMIs are created by the simulated virt-controller from each VM's run strategy.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use paddock_tests::cluster::Cluster;
use paddock_tests::testdisk;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Generous for TCG on a busy 2-core machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const STATE_TIMEOUT: Duration = Duration::from_secs(60);

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("kubevirt.io", "v1", kind), plural)
}

struct World {
    client: kube::Client,
    namespace: String,
    vms: Api<DynamicObject>,
    vmis: Api<DynamicObject>,
}

impl World {
    fn new(client: kube::Client, namespace: &str) -> World {
        World {
            vms: Api::namespaced_with(
                client.clone(),
                namespace,
                &resource("VirtualMachine", "virtualmachines"),
            ),
            vmis: Api::namespaced_with(
                client.clone(),
                namespace,
                &resource("VirtualMachineInstance", "virtualmachineinstances"),
            ),
            namespace: namespace.to_string(),
            client,
        }
    }

    async fn create_vm(&self, name: &str, run_strategy: &str) {
        let vm: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "metadata": {"name": name},
            "spec": {
                "runStrategy": run_strategy,
                "template": {"spec": {"domain": {"devices": {}, "memory": {"guest": "256Mi"}}}},
            },
        }))
        .unwrap();
        self.vms.create(&PostParams::default(), &vm).await.unwrap();
    }

    /// Waits until `check` holds for the VMI (`None` when it does not exist); returns it.
    async fn wait_vmi(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(Option<&Value>) -> bool,
    ) -> Option<Value> {
        let deadline = Instant::now() + STATE_TIMEOUT;
        loop {
            let vmi = self
                .vmis
                .get_opt(name)
                .await
                .unwrap()
                .map(|vmi| serde_json::to_value(vmi).unwrap());
            if check(vmi.as_ref()) {
                return vmi;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for vmi {name}: {what}; last: {vmi:#?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The VMI the simulated virt-controller created for the VM, once it walked it to Running.
    async fn running_vmi(&self, name: &str) -> Value {
        self.wait_vmi(name, "phase Running", |vmi| {
            vmi.is_some_and(|vmi| vmi["status"]["phase"] == "Running")
        })
        .await
        .unwrap()
    }

    /// `PUT` a subresource through the API server: Ok(()) on 2xx, else the Status.
    async fn put(&self, resource: &str, name: &str, subresource: &str) -> Result<(), kube::core::Status> {
        let request = http::Request::put(format!(
            "/apis/subresources.kubevirt.io/v1/namespaces/{}/{resource}/{name}/{subresource}",
            self.namespace
        ))
        .header("Content-Type", "application/json")
        .body(b"{}".to_vec())
        .unwrap();
        match self.client.request_text(request).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) => Err(*status),
            Err(other) => panic!("PUT {resource}/{name}/{subresource}: {other}"),
        }
    }

    async fn run_strategy(&self, name: &str) -> String {
        let vm = self.vms.get(name).await.unwrap();
        vm.data["spec"]["runStrategy"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn subresource_path(&self, name: &str, subresource: &str) -> String {
        format!(
            "/apis/subresources.kubevirt.io/v1/namespaces/{}/virtualmachineinstances/{name}/{subresource}",
            self.namespace
        )
    }
}

fn conflict_message(name: &str, error: &str) -> String {
    format!("Operation cannot be fulfilled on virtualmachine.kubevirt.io \"{name}\": {error}")
}

/// Reads binary frames until their concatenated text contains `needle` or the timeout passes.
async fn read_until<S>(websocket: &mut S, needle: &str, timeout: Duration) -> String
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let text = String::from_utf8_lossy(&seen).into_owned();
        if text.contains(needle) {
            return text;
        }
        assert!(
            !remaining.is_zero(),
            "no {needle:?} within {timeout:?}; got:\n{text}"
        );
        match tokio::time::timeout(remaining, websocket.next()).await {
            Ok(Some(Ok(Message::Binary(bytes)))) => seen.extend_from_slice(&bytes),
            Ok(Some(Ok(Message::Text(text)))) => {
                panic!("plain.kubevirt.io sends binary frames, got text {text:?}")
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(error))) => panic!("websocket failed: {error}"),
            Ok(None) => panic!(
                "websocket closed before {needle:?}; got:\n{}",
                String::from_utf8_lossy(&seen)
            ),
            Err(_) => {}
        }
    }
}

#[tokio::test]
async fn console_vnc_and_screenshot_reach_a_real_qemu_through_the_api_server() {
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let namespace = cluster.namespace("subresources-console").await.unwrap();
    let world = World::new(cluster.admin_client().await.unwrap(), namespace.name());
    world.create_vm("console", "Always").await;
    world.running_vmi("console").await;

    // The serial console first: it boots the machine, so the whole boot log, banner included, arrives.
    let (mut console, response) = cluster
        .websocket(
            &world.subresource_path("console", "console"),
            "plain.kubevirt.io",
            true,
        )
        .await
        .unwrap();
    assert_eq!(
        response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .map(|value| value.to_str().unwrap()),
        Some("plain.kubevirt.io")
    );
    read_until(&mut console, testdisk::READY_BANNER, BOOT_TIMEOUT).await;
    console
        .send(Message::Binary(b"echo paddock-$((6 * 7))\r".to_vec().into()))
        .await
        .unwrap();
    read_until(&mut console, "paddock-42", Duration::from_secs(30)).await;
    drop(console);

    // VNC: the RFB server greeting of QEMU, through kube-apiserver and the simulator.
    let (mut vnc, _) = cluster
        .websocket(
            &world.subresource_path("console", "vnc"),
            "plain.kubevirt.io",
            true,
        )
        .await
        .unwrap();
    let greeting = read_until(&mut vnc, "RFB ", Duration::from_secs(30)).await;
    assert!(greeting.starts_with("RFB 003.008\n"), "{greeting:?}");
    drop(vnc);

    // The screenshot is a PNG of a screen that shows something (the test disk prints its banner there).
    let request = http::Request::get(world.subresource_path("console", "vnc/screenshot"))
        .body(kube::client::Body::empty())
        .unwrap();
    let response = world.client.send(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "image/png");
    let png = response.into_body().collect_bytes().await.unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(png.to_vec()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    assert!(
        frame.width >= 320 && frame.height >= 200,
        "{}x{}",
        frame.width,
        frame.height
    );
    let pixels = &pixels[..frame.buffer_size()];
    let lit = pixels.iter().filter(|value| **value != 0).count();
    assert!(
        lit * 1000 > pixels.len(),
        "screenshot is blank ({lit} of {} bytes lit)",
        pixels.len()
    );

    // The non-admin user cannot open the console: kube-apiserver refuses before proxying.
    let refused = cluster
        .websocket(
            &world.subresource_path("console", "console"),
            "plain.kubevirt.io",
            false,
        )
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("403"), "{refused}");
}

#[tokio::test]
async fn start_stop_restart_flip_the_run_strategy_and_conflict_like_virt_api() {
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let namespace = cluster.namespace("subresources-power").await.unwrap();
    let world = World::new(cluster.admin_client().await.unwrap(), namespace.name());
    world.create_vm("power", "Always").await;
    let first = world.running_vmi("power").await;

    let error = world.put("virtualmachines", "power", "start").await.unwrap_err();
    assert_eq!(
        (error.code, error.reason.as_str()),
        (409, "Conflict"),
        "{error:?}"
    );
    assert_eq!(error.message, conflict_message("power", "VM is already running"));

    world.put("virtualmachines", "power", "stop").await.unwrap();
    assert_eq!(world.run_strategy("power").await, "Halted");
    world.wait_vmi("power", "deleted", |vmi| vmi.is_none()).await;

    let error = world.put("virtualmachines", "power", "stop").await.unwrap_err();
    assert_eq!(error.message, conflict_message("power", "VM is not running"));
    let error = world
        .put("virtualmachines", "power", "restart")
        .await
        .unwrap_err();
    assert_eq!(
        error.message,
        conflict_message(
            "power",
            "RunStategy Halted does not support manual restart requests"
        )
    );

    world.put("virtualmachines", "power", "start").await.unwrap();
    assert_eq!(world.run_strategy("power").await, "Always");
    let second = world.running_vmi("power").await;
    assert_ne!(first["metadata"]["uid"], second["metadata"]["uid"]);

    // Restart asks virt-controller (status.stateChangeRequests) for a new VMI.
    world.put("virtualmachines", "power", "restart").await.unwrap();
    let old_uid = second["metadata"]["uid"].clone();
    world
        .wait_vmi("power", "a new VMI", |vmi| {
            vmi.is_some_and(|vmi| vmi["metadata"]["uid"] != old_uid)
        })
        .await;
    world.running_vmi("power").await;
    assert_eq!(world.run_strategy("power").await, "Always");

    let error = world
        .put("virtualmachines", "missing", "start")
        .await
        .unwrap_err();
    assert_eq!(
        (error.code, error.message.as_str()),
        (404, "virtualmachine.kubevirt.io \"missing\" not found")
    );
}

#[tokio::test]
async fn pause_unpause_softreboot_and_migrate() {
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let namespace = cluster.namespace("subresources-pause").await.unwrap();
    let world = World::new(cluster.admin_client().await.unwrap(), namespace.name());
    world.create_vm("pausable", "Always").await;
    world.running_vmi("pausable").await;
    let vmi_conflict = |error: &str| {
        format!("Operation cannot be fulfilled on virtualmachineinstance.kubevirt.io \"pausable\": {error}")
    };

    let error = world
        .put("virtualmachineinstances", "pausable", "unpause")
        .await
        .unwrap_err();
    assert_eq!(
        (error.code, error.message.clone()),
        (409, vmi_conflict("VMI is not paused"))
    );
    world
        .put("virtualmachineinstances", "pausable", "pause")
        .await
        .unwrap();
    let paused = world
        .wait_vmi("pausable", "condition Paused", |vmi| {
            vmi.and_then(|vmi| vmi["status"]["conditions"].as_array())
                .is_some_and(|conditions| conditions.iter().any(|condition| condition["type"] == "Paused"))
        })
        .await
        .unwrap();
    let condition = paused["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|condition| condition["type"] == "Paused")
        .unwrap();
    assert_eq!(
        (condition["status"].as_str(), condition["reason"].as_str()),
        (Some("True"), Some("PausedByUser"))
    );
    let error = world
        .put("virtualmachineinstances", "pausable", "pause")
        .await
        .unwrap_err();
    assert_eq!(error.message, vmi_conflict("VMI is already paused"));
    let error = world
        .put("virtualmachineinstances", "pausable", "softreboot")
        .await
        .unwrap_err();
    assert_eq!(error.message, vmi_conflict("VMI is paused"));
    world
        .put("virtualmachineinstances", "pausable", "unpause")
        .await
        .unwrap();
    let vmi = world.vmis.get("pausable").await.unwrap();
    let still_paused = vmi.data["status"]["conditions"]
        .as_array()
        .is_some_and(|conditions| conditions.iter().any(|condition| condition["type"] == "Paused"));
    assert!(!still_paused, "{:?}", vmi.data["status"]);
    world
        .put("virtualmachineinstances", "pausable", "softreboot")
        .await
        .unwrap();

    // Migrate creates a VirtualMachineInstanceMigration, which the simulator completes.
    world.put("virtualmachines", "pausable", "migrate").await.unwrap();
    let migrations: Api<DynamicObject> = Api::namespaced_with(
        world.client.clone(),
        namespace.name(),
        &resource(
            "VirtualMachineInstanceMigration",
            "virtualmachineinstancemigrations",
        ),
    );
    let deadline = Instant::now() + STATE_TIMEOUT;
    let migration = loop {
        let list = migrations.list(&Default::default()).await.unwrap();
        if let Some(done) = list.items.into_iter().find(|migration| {
            migration.data["spec"]["vmiName"] == "pausable"
                && migration.data["status"]["phase"] == "Succeeded"
        }) {
            break done;
        }
        assert!(Instant::now() < deadline, "no Succeeded migration of pausable");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(migration.metadata.generate_name.as_deref() == Some("kubevirt-migrate-vm-"));
    let vmi = world.vmis.get("pausable").await.unwrap();
    assert_eq!(
        vmi.data["status"]["migrationState"]["completed"], true,
        "{:?}",
        vmi.data["status"]
    );
    assert_eq!(
        vmi.data["status"]["migrationState"]["migrationUid"].as_str(),
        migration.metadata.uid.as_deref()
    );
}

/// One HTTP/1.1 request straight to the simulator (not through kube-apiserver), with an optional
/// client certificate from the cluster's `pki/`; returns the status code and body, or the TLS error.
async fn direct_request(
    cluster: &Cluster,
    client_certificate: Option<&str>,
    path: &str,
    identity_headers: &str,
) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(cluster.simulator_ca()).unwrap() {
        roots.add(certificate.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client_certificate {
        Some(name) => {
            let pki = cluster.state_dir().join("pki");
            let chain = CertificateDer::pem_file_iter(pki.join(format!("{name}.crt")))
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(pki.join(format!("{name}.key"))).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", cluster.simulator_port()))
        .await
        .unwrap();
    let server_name = ServerName::try_from("virt-api.kubevirt.svc").unwrap();
    let mut tls = connector
        .connect(server_name, tcp)
        .await
        .map_err(|error| error.to_string())?;
    let request = format!(
        "PUT {path} HTTP/1.1\r\nHost: virt-api.kubevirt.svc\r\n{identity_headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(request.as_bytes())
        .await
        .map_err(|error| error.to_string())?;
    let mut response = Vec::new();
    tls.read_to_end(&mut response)
        .await
        .map_err(|error| error.to_string())?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_string();
    Ok((code, body))
}

#[tokio::test]
async fn the_simulator_trusts_only_the_front_proxy_and_asks_rbac() {
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let namespace = cluster.namespace("subresources-auth").await.unwrap();
    let path = format!(
        "/apis/subresources.kubevirt.io/v1/namespaces/{}/virtualmachines/absent/start",
        namespace.name()
    );
    let admin_headers = "X-Remote-User: paddock-admin\r\nX-Remote-Group: system:masters\r\n";
    let user_headers = "X-Remote-User: paddock-user\r\nX-Remote-Group: paddock-users\r\n";

    // Without the front-proxy certificate the identity headers are not believed.
    let (code, body) = direct_request(cluster, None, &path, admin_headers).await.unwrap();
    assert_eq!(code, 401, "{body}");
    // A certificate of another CA (the cluster CA's admin) does not even complete the handshake.
    let refused = direct_request(cluster, Some("admin"), &path, admin_headers).await;
    assert!(refused.is_err(), "{refused:?}");
    // The front proxy naming a user without RBAC rights: the SubjectAccessReview denies it.
    let (code, body) = direct_request(cluster, Some("front-proxy-client"), &path, user_headers)
        .await
        .unwrap();
    assert_eq!(code, 401, "{body}");
    // The front proxy naming the admin: authorized, so the handler answers (no such VM).
    let (code, body) = direct_request(cluster, Some("front-proxy-client"), &path, admin_headers)
        .await
        .unwrap();
    assert_eq!(code, 404, "{body}");
    assert!(
        body.contains("virtualmachine.kubevirt.io \\\"absent\\\" not found"),
        "{body}"
    );
}
