//! A registry that tests can crash in the middle of a push: Debian's `docker-registry` that can be
//! killed and started again on the same port and storage, with its access log on, and a TCP proxy
//! in front of it that forwards at a limited rate and can hold back the next upload chunk.
//!
//! Role: the resume tests of local and cluster backups (`crates/paddock-local/tests/backup.rs`,
//! `crates/paddock/tests/cluster_backup_resume.rs`) kill the registry between two chunks of the
//! disk layer, start it again and check that the rerun continues the layer instead of sending it
//! again. [`crate::registry::Registry`] has neither a restart nor an access log.
//!
//! Contract: [`RestartableRegistry::kill`] ends the process (what a crash does to the connection);
//! [`RestartableRegistry::run`] starts it again and waits until its port answers. Upload purging
//! is off, so an interrupted session stays resumable. [`ChunkProxy`] counts the bytes it forwards
//! to the registry (about 8 MiB/s) and, once `hold_next_chunk` is set, stops forwarding at the next
//! `PATCH` and sets `holding`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::registry::{REGISTRY_BINARY, RegistryError};

/// A docker-registry that can be killed and started again on the same port and storage.
#[derive(Debug)]
pub struct RestartableRegistry {
    directory: tempfile::TempDir,
    address: String,
    child: Option<Child>,
}

fn failed(what: &str) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |error| RegistryError::Start(format!("{what}: {error}"))
}

impl RestartableRegistry {
    /// Starts it on a free loopback port with fresh storage.
    pub fn start() -> Result<RestartableRegistry, RegistryError> {
        if !Path::new(REGISTRY_BINARY).is_file() {
            return Err(RegistryError::NotInstalled);
        }
        let directory = tempfile::Builder::new()
            .prefix("paddock-crash-registry-")
            .tempdir()
            .map_err(failed("create directory"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(failed("find a free port"))?
            .port();
        let address = format!("127.0.0.1:{port}");
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {address}\n  secret: paddock-backup-test\n",
            directory.path().join("storage").display()
        );
        std::fs::write(directory.path().join("config.yml"), config).map_err(failed("write config"))?;
        let mut registry = RestartableRegistry {
            directory,
            address,
            child: None,
        };
        registry.run()?;
        Ok(registry)
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Starts the registry (again) and waits until its port answers.
    pub fn run(&mut self) -> Result<(), RegistryError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.directory.path().join("registry.log"))
            .map_err(failed("open the log"))?;
        let child = Command::new(REGISTRY_BINARY)
            .arg("serve")
            .arg(self.directory.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(failed("share the log"))?)
            .stderr(log)
            .spawn()
            .map_err(failed("spawn docker-registry"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&self.address).is_err() {
            if Instant::now() > deadline {
                return Err(RegistryError::NotReady {
                    address: self.address.clone(),
                    seconds: 20,
                    log: self.log(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Kills the registry (as a crash would) and waits for it to end.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.directory.path().join("registry.log")).unwrap_or_default()
    }

    /// Access-log request lines (`METHOD PATH`) with their status.
    pub fn requests(&self) -> Vec<(String, String, u16)> {
        self.log()
            .lines()
            .filter_map(|line| {
                let request = line.split('"').nth(1)?;
                let mut words = request.split(' ');
                let method = words.next()?.to_string();
                let path = words.next()?.to_string();
                let status = line.split('"').nth(2)?.split_whitespace().next()?.parse().ok()?;
                Some((method, path, status))
            })
            .collect()
    }
}

impl Drop for RestartableRegistry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP proxy in front of a registry; see the module documentation.
#[derive(Debug)]
pub struct ChunkProxy {
    /// `127.0.0.1:PORT`: what clients push to.
    pub address: String,
    /// Bytes forwarded to the registry so far (a test may reset it).
    pub forwarded: Arc<AtomicU64>,
    /// Set: the next `PATCH` (an upload chunk) is held back, forever.
    pub hold_next_chunk: Arc<AtomicBool>,
    /// Set once a chunk is held back.
    pub holding: Arc<AtomicBool>,
}

impl ChunkProxy {
    /// Starts forwarding to `upstream` (`host:port`). Must run inside a tokio runtime.
    pub async fn start(upstream: String) -> Result<ChunkProxy, RegistryError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(failed("bind the proxy"))?;
        let proxy = ChunkProxy {
            address: listener
                .local_addr()
                .map_err(failed("read the proxy's address"))?
                .to_string(),
            forwarded: Arc::new(AtomicU64::new(0)),
            hold_next_chunk: Arc::new(AtomicBool::new(false)),
            holding: Arc::new(AtomicBool::new(false)),
        };
        let (forwarded, hold, holding) = (
            Arc::clone(&proxy.forwarded),
            Arc::clone(&proxy.hold_next_chunk),
            Arc::clone(&proxy.holding),
        );
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let upstream = upstream.clone();
                let (forwarded, hold, holding) =
                    (Arc::clone(&forwarded), Arc::clone(&hold), Arc::clone(&holding));
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let up = async {
                        let mut buffer = vec![0u8; 32 << 10];
                        loop {
                            let count = match client_read.read(&mut buffer).await {
                                Ok(0) | Err(_) => return,
                                Ok(count) => count,
                            };
                            // HTTP/1.1 clients wait for the answer before the next request, so a
                            // request starts a read of its own.
                            if buffer[..count].starts_with(b"PATCH ") && hold.load(Ordering::SeqCst) {
                                holding.store(true, Ordering::SeqCst);
                                std::future::pending::<()>().await;
                            }
                            if server_write.write_all(&buffer[..count]).await.is_err() {
                                return;
                            }
                            forwarded.fetch_add(count as u64, Ordering::Relaxed);
                            // About 8 MiB/s.
                            tokio::time::sleep(Duration::from_millis(4)).await;
                        }
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                    };
                    // Either side ending ends the connection, as a dying registry would.
                    tokio::select! {
                        () = up => {}
                        () = down => {}
                    }
                });
            }
        });
        Ok(proxy)
    }
}
