//! VNC stream throughput: a replay server for a recorded RFB session, websockify, and the timed
//! readers of the three paths.
//!
//! Role: make the three paths carry byte-identical streams. A real RFB session recorded from
//! QEMU's VNC socket is served by [`ReplayServer`] on a unix socket at full speed; each reader
//! connects (directly, through paddock's VNC websocket, through websockify), reads to the end
//! and reports bytes and seconds.
//!
//! Contract: the replay server sends, on every connection, the recorded handshake and then the
//! recorded framebuffer updates `repeat` times, then closes; it never reads.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::rfb::{Reader, RfbError, Transport};

/// Failures of the throughput setup.
#[derive(Debug, thiserror::Error)]
pub enum ThroughputError {
    /// A socket or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// websockify did not start listening.
    #[error(
        "websockify did not listen on 127.0.0.1:{port} within 10 s; run it by hand to see why: {command}"
    )]
    WebsockifyNotListening {
        /// Its port.
        port: u16,
        /// The command line.
        command: String,
    },
    /// A reader received a different stream than the one served.
    #[error(
        "{path} delivered {received} bytes (CRC-32 {crc:?}), expected {expected} bytes (CRC-32 {expected_crc:08x}): the stream was not carried byte for byte"
    )]
    Mismatch {
        /// The path.
        path: String,
        /// Bytes received.
        received: u64,
        /// Their checksum, when computed.
        crc: Option<u32>,
        /// Bytes served.
        expected: u64,
        /// Their checksum.
        expected_crc: u32,
    },
    /// The RFB exchange failed.
    #[error(transparent)]
    Rfb(#[from] RfbError),
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ThroughputError {
    let what = what.into();
    move |source| ThroughputError::Io { what, source }
}

/// A recorded RFB session split into its handshake and its framebuffer updates.
#[derive(Clone)]
pub struct Recording {
    /// The server's bytes up to the end of ServerInit.
    pub handshake: Arc<Vec<u8>>,
    /// The server's framebuffer updates.
    pub updates: Arc<Vec<u8>>,
    /// How many times the updates are sent per connection.
    pub repeat: u64,
}

impl Recording {
    /// Bytes one connection receives.
    pub fn stream_bytes(&self) -> u64 {
        self.handshake.len() as u64 + self.updates.len() as u64 * self.repeat
    }

    /// CRC-32 of the stream one connection receives.
    pub fn stream_crc(&self) -> u32 {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&self.handshake);
        for _ in 0..self.repeat {
            hasher.update(&self.updates);
        }
        hasher.finalize()
    }
}

/// Serves a [`Recording`] on a unix socket, one thread per connection, until dropped.
pub struct ReplayServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

impl ReplayServer {
    /// Listens on `path` (which must not exist).
    pub fn start(path: &Path, recording: Recording) -> Result<ReplayServer, ThroughputError> {
        let listener =
            UnixListener::bind(path).map_err(io_error(format!("cannot listen on {}", path.display())))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        std::thread::spawn(move || {
            for connection in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut connection) = connection else { continue };
                let recording = recording.clone();
                std::thread::spawn(move || {
                    // A reader that goes away early just ends this connection.
                    let _ = connection.write_all(&recording.handshake);
                    for _ in 0..recording.repeat {
                        if connection.write_all(&recording.updates).is_err() {
                            return;
                        }
                    }
                    // The reader closes once it has everything: closing first would let a proxy
                    // drop what it still buffers (websockify does).
                    let mut sink = [0_u8; 4096];
                    while matches!(connection.read(&mut sink), Ok(count) if count > 0) {}
                });
            }
        });
        Ok(ReplayServer {
            path: path.to_path_buf(),
            stop,
        })
    }
}

impl Drop for ReplayServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag, then take the socket away.
        let _ = std::os::unix::net::UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A running websockify forwarding 127.0.0.1:`port` to a unix socket; killed when dropped.
pub struct Websockify {
    child: Child,
    /// Its port.
    pub port: u16,
}

impl Websockify {
    /// Starts `binary --unix-target=SOCKET 127.0.0.1:PORT` on a free port and waits for it.
    pub fn start(binary: &Path, socket: &Path, log: &Path) -> Result<Websockify, ThroughputError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(io_error("cannot find a free port for websockify"))?
            .port();
        let target = format!("--unix-target={}", socket.display());
        let listen = format!("127.0.0.1:{port}");
        let command = format!("{} {target} {listen}", binary.display());
        let log_file =
            std::fs::File::create(log).map_err(io_error(format!("cannot create {}", log.display())))?;
        let child = Command::new(binary)
            .args([target.as_str(), listen.as_str()])
            .stdin(Stdio::null())
            .stdout(
                log_file
                    .try_clone()
                    .map_err(io_error("cannot duplicate the websockify log file"))?,
            )
            .stderr(log_file)
            .spawn()
            .map_err(io_error(format!("cannot start {command}")))?;
        let websockify = Websockify { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(ThroughputError::WebsockifyNotListening { port, command });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(websockify)
    }

    /// Its websocket URL.
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Websockify {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One of the three paths from the VNC socket to the client.
#[derive(Debug, Clone)]
pub enum Path3 {
    /// Reading the unix socket directly.
    Direct(PathBuf),
    /// A websocket: paddock's gateway (`plain.kubevirt.io`) or websockify (`binary`).
    WebSocket {
        /// The URL, possibly with a token.
        url: String,
        /// The subprotocol offered.
        subprotocol: &'static str,
    },
}

impl Path3 {
    /// Connects.
    pub async fn connect(&self) -> Result<Transport, RfbError> {
        match self {
            Path3::Direct(socket) => Transport::unix(socket).await,
            Path3::WebSocket { url, subprotocol } => Transport::websocket(url, subprotocol).await,
        }
    }
}

/// CPU seconds (user + system) a process or thread has used, from `/proc/<which>/stat`
/// (`<pid>`, `self`, `thread-self`); Linux counts them in ticks of 1/100 s.
pub fn cpu_seconds(which: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{which}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces: the
    // first is the state (field 3), so utime (field 14) and stime (field 15) are at 11 and 12.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// One read of a replayed stream.
#[derive(Debug, Clone, Copy)]
pub struct ReplayRead {
    /// Seconds from the connect call to the last byte.
    pub seconds: f64,
    /// Bytes received.
    pub bytes: u64,
    /// CPU seconds the reading thread used.
    pub client_cpu: Option<f64>,
}

/// Reads one replayed stream to its end through `path` (on the calling thread). With `verify`,
/// also checks the bytes' CRC-32 against the recording.
pub async fn read_replay(
    name: &str,
    path: &Path3,
    recording: &Recording,
    verify: bool,
) -> Result<ReplayRead, ThroughputError> {
    let cpu_before = cpu_seconds("thread-self");
    let started = Instant::now();
    let mut reader = Reader::new(path.connect().await?);
    let expected = recording.stream_bytes();
    let (received, crc) = reader.drain(expected, verify).await?;
    let seconds = started.elapsed().as_secs_f64();
    let client_cpu = cpu_before
        .zip(cpu_seconds("thread-self"))
        .map(|(before, after)| after - before);
    let expected_crc = if verify { recording.stream_crc() } else { 0 };
    if received != expected || (verify && crc != Some(expected_crc)) {
        return Err(ThroughputError::Mismatch {
            path: name.to_string(),
            received,
            crc,
            expected,
            expected_crc,
        });
    }
    Ok(ReplayRead {
        seconds,
        bytes: received,
        client_cpu,
    })
}
