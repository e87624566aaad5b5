//! The Kubernetes test world: a real control plane plus the KubeVirt/CDI simulator, once per test
//! binary.
//!
//! Role: integration tests of the operator and the console run against a real kube-apiserver and
//! etcd (`tests/cluster/`) with every KubeVirt, CDI, Baffles and paddock CRD installed, and against
//! `kubevirt-simulator` (`tests/simulator`), which stands in for the KubeVirt and CDI parts that
//! need nodes. `tests/README.md` says exactly what is real and what is simulated.
//!
//! Contract:
//! - [`Cluster::shared`] starts everything at most once per process: `tests/cluster/build.sh`
//!   (cached, flock-serialized), `tests/cluster/start.sh <state>`, `cargo build --locked -p
//!   paddock-kubevirt-simulator` (or the binary in `PADDOCK_KUBEVIRT_SIMULATOR`), the test disk, then
//!   the simulator, which registers its APIServices; it returns once both APIServices are
//!   `Available`. It returns `Ok(None)` after a loud SKIP line only when a prerequisite is missing
//!   (Go, openssl, curl) and `PADDOCK_ALLOW_SKIP=1`; otherwise a missing prerequisite is an error.
//! - Everything stops when the test process ends, pass or fail: a watchdog in its own process group
//!   polls the test's pid, then stops the simulator (which stops its QEMUs), kills any QEMU left
//!   under the state directory and runs `tests/cluster/stop.sh <state> --purge`
//!   (`PADDOCK_KEEP_CLUSTER=1` keeps the state directory, logs included, for inspection).
//! - [`Cluster::admin_client`] and [`Cluster::user_client`] make a new `kube::Client` per call: a
//!   client belongs to the tokio runtime that made it, and every `#[tokio::test]` has its own.
//! - [`Cluster::namespace`] creates a fresh, uniquely named namespace; dropping it deletes the
//!   namespace (in the background) unless the test is panicking, so a failure leaves it to inspect.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};

use crate::paths;
use crate::qemu::skip_allowed;

/// Environment variable naming a prebuilt `kubevirt-simulator` binary (skips the cargo build).
pub const SIMULATOR_BINARY_VARIABLE: &str = "PADDOCK_KUBEVIRT_SIMULATOR";
/// Environment variable that keeps the state directory (logs, kubeconfigs) after the tests when `1`.
pub const KEEP_VARIABLE: &str = "PADDOCK_KEEP_CLUSTER";
/// The APIServices the simulator serves.
pub const API_SERVICES: [&str; 2] = ["v1.subresources.kubevirt.io", "v1beta1.upload.cdi.kubevirt.io"];
/// How long the simulator may take to listen and register.
const SIMULATOR_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How many characters of a log an error quotes.
const LOG_TAIL_CHARACTERS: usize = 6000;

/// Errors from starting the test world or talking to it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterError {
    /// A tool the control plane needs is missing.
    #[error(
        "{tool} is not installed, so the test cluster cannot be built or started; {fix} (or set PADDOCK_ALLOW_SKIP=1 to skip tests that need it)"
    )]
    MissingTool {
        /// The tool.
        tool: &'static str,
        /// How to install it.
        fix: &'static str,
    },
    /// A script or program failed.
    #[error("{what} failed ({status}); see {log}.\n--- its last output ---\n{tail}")]
    Failed {
        /// What was run.
        what: String,
        /// Its exit status.
        status: String,
        /// The log holding its output.
        log: PathBuf,
        /// The log's tail.
        tail: String,
    },
    /// A program could not be started.
    #[error("cannot run {what}: {details}")]
    Spawn {
        /// What was run.
        what: String,
        /// Why.
        details: String,
    },
    /// The simulator did not become ready.
    #[error("kubevirt-simulator did not become ready: {reason}; see {log}.\n--- its last output ---\n{tail}")]
    SimulatorNotReady {
        /// Why.
        reason: String,
        /// Its log.
        log: PathBuf,
        /// The log's tail.
        tail: String,
    },
    /// The test disk could not be built.
    #[error("the test disk is needed by the simulator's console machines: {0}")]
    TestDisk(String),
    /// A file could not be read or written.
    #[error("cannot {action} {path}: {details}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        details: String,
    },
    /// A kube client could not be made or a request failed.
    #[error("kubernetes client: {0}")]
    Client(String),
}

/// The running test world.
#[derive(Debug)]
pub struct Cluster {
    state_dir: PathBuf,
    bin_dir: PathBuf,
    apiserver_port: u16,
    simulator_port: u16,
    simulator_ca: PathBuf,
}

impl Cluster {
    /// The shared world of this test process, started on first use (see the module documentation).
    pub fn shared() -> Result<Option<&'static Cluster>, ClusterError> {
        static SHARED: OnceLock<Result<Option<Cluster>, ClusterError>> = OnceLock::new();
        match SHARED.get_or_init(start) {
            Ok(cluster) => Ok(cluster.as_ref()),
            Err(error) => Err(error.clone()),
        }
    }

    /// The state directory (`cluster.env`, kubeconfigs, `pki/`, `logs/`, `simulator/`).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The kubeconfig of `paddock-admin` (group `system:masters`).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.state_dir.join("admin.kubeconfig")
    }

    /// The kubeconfig of `paddock-user` (group `paddock-users`, no RBAC bindings).
    pub fn user_kubeconfig(&self) -> PathBuf {
        self.state_dir.join("user.kubeconfig")
    }

    /// `https://127.0.0.1:<port>` of kube-apiserver.
    pub fn apiserver_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.apiserver_port)
    }

    /// The port the simulator's aggregated server listens on (127.0.0.1).
    pub fn simulator_port(&self) -> u16 {
        self.simulator_port
    }

    /// The CA of the simulator's serving and upload-proxy certificates (PEM file).
    pub fn simulator_ca(&self) -> &Path {
        &self.simulator_ca
    }

    /// `kubectl` acting as the admin.
    pub fn kubectl(&self) -> Command {
        let mut command = Command::new(self.bin_dir.join("kubectl"));
        command.arg("--kubeconfig").arg(self.admin_kubeconfig());
        command
    }

    /// A new client acting as the admin.
    pub async fn admin_client(&self) -> Result<kube::Client, ClusterError> {
        client_from(&self.admin_kubeconfig()).await
    }

    /// A new client acting as the non-admin user.
    pub async fn user_client(&self) -> Result<kube::Client, ClusterError> {
        client_from(&self.user_kubeconfig()).await
    }

    /// A fresh namespace named `<prefix>-<unique suffix>`.
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace, ClusterError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanoseconds = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.subsec_nanos());
        let suffix = format!("{:x}{:x}", COUNTER.fetch_add(1, Ordering::Relaxed), nanoseconds);
        let prefix: String = prefix
            .to_ascii_lowercase()
            .chars()
            .map(|character| {
                if character.is_ascii_alphanumeric() {
                    character
                } else {
                    '-'
                }
            })
            .take(63 - suffix.len() - 1)
            .collect();
        let name = format!("{}-{suffix}", prefix.trim_matches('-'));
        let namespaces: Api<Namespace> = Api::all(self.admin_client().await?);
        let mut namespace = Namespace::default();
        namespace.metadata.name = Some(name.clone());
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .map_err(|error| ClusterError::Client(format!("cannot create namespace {name}: {error}")))?;
        Ok(TestNamespace {
            name,
            kubectl: self.bin_dir.join("kubectl"),
            kubeconfig: self.admin_kubeconfig(),
        })
    }

    /// A websocket to `path` (e.g. `/apis/subresources.kubevirt.io/v1/.../vnc`) through
    /// kube-apiserver, authenticated with the admin's (`admin: true`) or the user's client
    /// certificate, offering `protocol` as the websocket subprotocol.
    pub async fn websocket(
        &self,
        path: &str,
        protocol: &str,
        admin: bool,
    ) -> Result<
        (
            tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
            tokio_tungstenite::tungstenite::handshake::client::Response,
        ),
        tokio_tungstenite::tungstenite::Error,
    > {
        use tokio_tungstenite::tungstenite::Error as WsError;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let io_error = |details: String| WsError::Io(std::io::Error::other(details));
        let identity = if admin { "admin" } else { "user" };
        let config = self
            .client_tls(identity)
            .map_err(|error| io_error(error.to_string()))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.apiserver_port)).await?;
        let server_name = tokio_rustls::rustls::pki_types::ServerName::IpAddress(
            std::net::IpAddr::from([127, 0, 0, 1]).into(),
        );
        let tls = connector.connect(server_name, tcp).await?;
        let mut request = format!("wss://127.0.0.1:{}{path}", self.apiserver_port).into_client_request()?;
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            protocol
                .parse()
                .map_err(|_| io_error(format!("invalid websocket protocol {protocol:?}")))?,
        );
        tokio_tungstenite::client_async(request, tls).await
    }

    /// A websocket to `path` straight at the simulator's aggregated server (not through
    /// kube-apiserver), as kube-apiserver's aggregator would open it: the front-proxy client
    /// certificate, `user` and `groups` in `X-Remote-User`/`X-Remote-Group`, `protocol` as the
    /// subprotocol. For measuring what the API server's hop costs.
    pub async fn simulator_websocket(
        &self,
        path: &str,
        protocol: &str,
        user: &str,
        groups: &[&str],
    ) -> Result<
        (
            tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
            tokio_tungstenite::tungstenite::handshake::client::Response,
        ),
        tokio_tungstenite::tungstenite::Error,
    > {
        use tokio_rustls::rustls::pki_types::ServerName;
        use tokio_tungstenite::tungstenite::Error as WsError;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let io_error = |details: String| WsError::Io(std::io::Error::other(details));
        let config = self
            .client_tls_with("front-proxy-client", &self.simulator_ca)
            .map_err(|error| io_error(error.to_string()))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.simulator_port)).await?;
        let server_name =
            ServerName::try_from("virt-api.kubevirt.svc").map_err(|error| io_error(error.to_string()))?;
        let tls = connector.connect(server_name, tcp).await?;
        let mut request =
            format!("wss://virt-api.kubevirt.svc:{}{path}", self.simulator_port).into_client_request()?;
        let headers = request.headers_mut();
        let value = |text: &str| {
            text.parse()
                .map_err(|_| io_error(format!("invalid header value {text:?}")))
        };
        headers.insert("Sec-WebSocket-Protocol", value(protocol)?);
        headers.insert("X-Remote-User", value(user)?);
        for group in groups {
            headers.append("X-Remote-Group", value(group)?);
        }
        tokio_tungstenite::client_async(request, tls).await
    }

    /// A rustls client configuration trusting the cluster CA with `pki/<identity>.crt|key`.
    fn client_tls(&self, identity: &str) -> Result<tokio_rustls::rustls::ClientConfig, ClusterError> {
        self.client_tls_with(identity, &self.state_dir.join("pki").join("ca.crt"))
    }

    /// A rustls client configuration trusting `ca_path` with `pki/<identity>.crt|key`.
    fn client_tls_with(
        &self,
        identity: &str,
        ca_path: &Path,
    ) -> Result<tokio_rustls::rustls::ClientConfig, ClusterError> {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let pki = self.state_dir.join("pki");
        let read_error = |path: &Path, details: String| ClusterError::Io {
            action: "read",
            path: path.to_path_buf(),
            details,
        };
        let mut roots = rustls::RootCertStore::empty();
        for certificate in
            CertificateDer::pem_file_iter(ca_path).map_err(|e| read_error(ca_path, e.to_string()))?
        {
            let certificate = certificate.map_err(|e| read_error(ca_path, e.to_string()))?;
            roots
                .add(certificate)
                .map_err(|e| read_error(ca_path, e.to_string()))?;
        }
        let certificate_path = pki.join(format!("{identity}.crt"));
        let key_path = pki.join(format!("{identity}.key"));
        let chain = CertificateDer::pem_file_iter(&certificate_path)
            .map_err(|e| read_error(&certificate_path, e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| read_error(&certificate_path, e.to_string()))?;
        let key =
            PrivateKeyDer::from_pem_file(&key_path).map_err(|e| read_error(&key_path, e.to_string()))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClusterError::Client(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| ClusterError::Client(e.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// A namespace made for one test; deleted on drop unless the test panicked.
#[derive(Debug)]
pub struct TestNamespace {
    name: String,
    kubectl: PathBuf,
    kubeconfig: PathBuf,
}

impl TestNamespace {
    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keeping namespace {} for inspection (the test failed)", self.name);
            return;
        }
        // Best effort and in the background: the watchdog purges the whole cluster anyway.
        let _ = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args([
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

async fn client_from(kubeconfig: &Path) -> Result<kube::Client, ClusterError> {
    let error = |details: String| ClusterError::Client(format!("{}: {details}", kubeconfig.display()));
    let config = kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| error(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(config, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(|e| error(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| error(e.to_string()))
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|search_path| {
        std::env::split_paths(&search_path).any(|directory| directory.join(program).is_file())
    })
}

/// The last `LOG_TAIL_CHARACTERS` of a file.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(LOG_TAIL_CHARACTERS);
    let start = (start..text.len())
        .find(|index| text.is_char_boundary(*index))
        .unwrap_or(0);
    text[start..].to_string()
}

fn create_log(path: &Path) -> Result<std::fs::File, ClusterError> {
    std::fs::File::create(path).map_err(|error| ClusterError::Io {
        action: "create",
        path: path.to_path_buf(),
        details: error.to_string(),
    })
}

/// Runs `command` with stdout captured and stderr into `log`; returns stdout.
fn run_logged(what: &str, mut command: Command, log: &Path) -> Result<String, ClusterError> {
    let stderr = create_log(log)?;
    eprintln!("[cluster] running {what} (log: {})", log.display());
    let output = command
        .stdin(Stdio::null())
        .stderr(Stdio::from(stderr))
        .output()
        .map_err(|error| ClusterError::Spawn {
            what: what.to_string(),
            details: error.to_string(),
        })?;
    if !output.status.success() {
        return Err(ClusterError::Failed {
            what: what.to_string(),
            status: output.status.to_string(),
            log: log.to_path_buf(),
            tail: tail(log),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn start() -> Result<Option<Cluster>, ClusterError> {
    for (tool, fix) in [
        ("go", "install Go >= 1.25 (hack/install-deps.sh does)"),
        ("openssl", "apt-get install -y openssl"),
        ("curl", "apt-get install -y curl"),
    ] {
        if !on_path(tool) {
            let error = ClusterError::MissingTool { tool, fix };
            if skip_allowed() {
                eprintln!("\n!!!!!!!! SKIP tests needing the Kubernetes test cluster: {error} !!!!!!!!\n");
                return Ok(None);
            }
            return Err(error);
        }
    }
    let started = Instant::now();
    let repository = paths::repository_root();
    let cluster_dir = repository.join("tests").join("cluster");
    let cache_dir = paths::cache_dir();
    let state_dir = std::env::temp_dir().join(format!(
        "paddock-cluster-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.subsec_nanos())
    ));
    let logs = state_dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|error| ClusterError::Io {
        action: "create",
        path: logs.clone(),
        details: error.to_string(),
    })?;
    // The watchdog first: from here on, whatever is started is also stopped.
    spawn_watchdog(&state_dir, &cluster_dir)?;

    let mut build = Command::new("bash");
    build
        .arg(cluster_dir.join("build.sh"))
        .env("PADDOCK_CACHE_DIR", &cache_dir);
    let bin_dir = PathBuf::from(
        run_logged("tests/cluster/build.sh", build, &state_dir.join("build.log"))?
            .lines()
            .last()
            .unwrap_or_default()
            .trim(),
    );

    let mut start_script = Command::new("bash");
    start_script
        .arg(cluster_dir.join("start.sh"))
        .arg(&state_dir)
        .env("PADDOCK_CACHE_DIR", &cache_dir);
    // start.sh recreates logs/; its own output goes beside it.
    run_logged(
        "tests/cluster/start.sh",
        start_script,
        &state_dir.join("start.log"),
    )?;
    let apiserver_port = read_apiserver_port(&state_dir)?;

    let simulator = simulator_binary(&repository, &state_dir)?;
    let guest_disk =
        crate::testdisk::test_disk().map_err(|error| ClusterError::TestDisk(error.to_string()))?;
    let simulator_dir = state_dir.join("simulator");
    let ready_file = simulator_dir.join("ready.json");
    let simulator_log = state_dir.join("logs").join("kubevirt-simulator.log");
    std::fs::create_dir_all(&simulator_dir).map_err(|error| ClusterError::Io {
        action: "create",
        path: simulator_dir.clone(),
        details: error.to_string(),
    })?;
    let log = create_log(&simulator_log)?;
    let log_copy = log.try_clone().map_err(|error| ClusterError::Io {
        action: "duplicate",
        path: simulator_log.clone(),
        details: error.to_string(),
    })?;
    let mut child = Command::new(&simulator)
        .arg("--kubeconfig")
        .arg(state_dir.join("admin.kubeconfig"))
        .arg("--tls-dir")
        .arg(simulator_dir.join("tls"))
        .arg("--state-dir")
        .arg(&simulator_dir)
        .arg("--guest-disk")
        .arg(&guest_disk)
        .arg("--ready-file")
        .arg(&ready_file)
        .arg("--register-apiservices")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_copy))
        .stderr(Stdio::from(log))
        // Its own process group: a Ctrl-C to the test run reaches the watchdog's cleanup, not it.
        .process_group(0)
        .spawn()
        .map_err(|error| ClusterError::Spawn {
            what: simulator.display().to_string(),
            details: error.to_string(),
        })?;
    let pid_file = state_dir.join("kubevirt-simulator.pid");
    std::fs::write(&pid_file, child.id().to_string()).map_err(|error| ClusterError::Io {
        action: "write",
        path: pid_file,
        details: error.to_string(),
    })?;
    let not_ready = |reason: String| ClusterError::SimulatorNotReady {
        reason,
        log: simulator_log.clone(),
        tail: tail(&simulator_log),
    };
    let deadline = Instant::now() + SIMULATOR_READY_TIMEOUT;
    let ready: serde_json::Value = loop {
        if let Ok(text) = std::fs::read_to_string(&ready_file)
            && let Ok(ready) = serde_json::from_str(&text)
        {
            break ready;
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(not_ready(format!("it exited ({status})")));
        }
        if Instant::now() > deadline {
            return Err(not_ready(format!(
                "no {} after {SIMULATOR_READY_TIMEOUT:?}",
                ready_file.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let cluster = Cluster {
        simulator_port: ready["port"]
            .as_u64()
            .and_then(|port| u16::try_from(port).ok())
            .unwrap_or(0),
        simulator_ca: PathBuf::from(ready["caFile"].as_str().unwrap_or_default()),
        state_dir: state_dir.clone(),
        bin_dir,
        apiserver_port,
    };
    let mut wait = cluster.kubectl();
    wait.args(["wait", "--for", "condition=Available", "--timeout", "120s"]);
    for name in API_SERVICES {
        wait.arg(format!("apiservice/{name}"));
    }
    run_logged(
        "kubectl wait for the simulator's APIServices",
        wait,
        &logs.join("apiservice-wait.log"),
    )
    .map_err(|error| not_ready(error.to_string()))?;
    eprintln!(
        "[cluster] control plane and kubevirt-simulator up in {:.1}s; state in {}",
        started.elapsed().as_secs_f64(),
        state_dir.display()
    );
    Ok(Some(cluster))
}

fn read_apiserver_port(state_dir: &Path) -> Result<u16, ClusterError> {
    let env_file = state_dir.join("cluster.env");
    let file = std::fs::File::open(&env_file).map_err(|error| ClusterError::Io {
        action: "read",
        path: env_file.clone(),
        details: error.to_string(),
    })?;
    BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            let url = line
                .strip_prefix("export PADDOCK_APISERVER_URL='")?
                .strip_suffix('\'')?;
            url.rsplit_once(':')?.1.parse().ok()
        })
        .ok_or_else(|| ClusterError::Io {
            action: "find PADDOCK_APISERVER_URL in",
            path: env_file,
            details: "no such line".to_string(),
        })
}

/// The simulator binary: `PADDOCK_KUBEVIRT_SIMULATOR`, or built now with cargo, whose JSON messages
/// name the executable wherever the target directory is.
fn simulator_binary(repository: &Path, state_dir: &Path) -> Result<PathBuf, ClusterError> {
    if let Some(path) = std::env::var_os(SIMULATOR_BINARY_VARIABLE) {
        return Ok(PathBuf::from(path));
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build.current_dir(repository).args([
        "build",
        "--locked",
        "-p",
        "paddock-kubevirt-simulator",
        "--bin",
        "kubevirt-simulator",
        "--message-format=json-render-diagnostics",
    ]);
    let output = run_logged(
        "cargo build -p paddock-kubevirt-simulator",
        build,
        &state_dir.join("simulator-build.log"),
    )?;
    output
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| {
            message["reason"] == "compiler-artifact" && message["target"]["name"] == "kubevirt-simulator"
        })
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| ClusterError::Spawn {
            what: "cargo build -p paddock-kubevirt-simulator".to_string(),
            details: "cargo reported no kubevirt-simulator executable".to_string(),
        })
}

/// The watchdog: waits for this process to end, then stops the simulator, its QEMUs and the control
/// plane. It runs in its own process group so a Ctrl-C of the test run does not kill it first.
fn spawn_watchdog(state_dir: &Path, cluster_dir: &Path) -> Result<(), ClusterError> {
    const SCRIPT: &str = r#"
test_pid=$1 state=$2 cluster_dir=$3 keep=$4
while kill -0 "$test_pid" 2>/dev/null; do sleep 0.5; done
if [[ -f "$state/kubevirt-simulator.pid" ]]; then
  pid=$(cat "$state/kubevirt-simulator.pid")
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
  if [[ "${exe% (deleted)}" == */kubevirt-simulator ]]; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
fi
# QEMU that outlived the simulator: only processes whose command line names their own pidfile.
while IFS= read -r -d '' pidfile; do
  pid=$(cat "$pidfile" 2>/dev/null || true)
  [[ -n "$pid" ]] || continue
  if tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$pidfile"; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
done < <(find "$state" -name qemu.pid -print0 2>/dev/null)
if [[ -f "$state/cluster.env" || -f "$state/kube-apiserver.pid" ]]; then
  if [[ "$keep" == 1 ]]; then "$cluster_dir/stop.sh" "$state"; else "$cluster_dir/stop.sh" "$state" --purge; fi
elif [[ "$keep" != 1 ]]; then
  rm -rf "$state"
fi
"#;
    let keep = std::env::var(KEEP_VARIABLE).unwrap_or_default();
    Command::new("bash")
        .arg("-c")
        .arg(SCRIPT)
        .arg("paddock-cluster-watchdog")
        .arg(std::process::id().to_string())
        .arg(state_dir)
        .arg(cluster_dir)
        .arg(keep)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map(drop)
        .map_err(|error| ClusterError::Spawn {
            what: "the cluster watchdog (bash)".to_string(),
            details: error.to_string(),
        })
}
