//! A minimal RFB (VNC) client over a unix socket or a websocket, for timing and for recording.
//!
//! Role: speak just enough RFB 3.8 to measure paddock's VNC path the way a viewer uses it:
//! handshake with security None, 32-bit true colour, raw encoding plus the DesktopSize
//! pseudo-encoding, and full (non-incremental) framebuffer update requests.
//!
//! Contract:
//! - [`Transport`] counts every byte it receives from the server and can record them, so the
//!   same code measures the direct socket, paddock's gateway and websockify alike.
//! - [`Session::full_update`] returns only after one complete FramebufferUpdate message.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A websocket client connection.
pub type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long one read may wait for the server.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// The RFB pseudo-encoding announcing a new framebuffer size.
const DESKTOP_SIZE_ENCODING: i32 = -223;

/// Failures of an RFB conversation.
#[derive(Debug, thiserror::Error)]
pub enum RfbError {
    /// The socket failed.
    #[error("the VNC connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The websocket failed.
    #[error("the VNC websocket failed: {0}")]
    WebSocket(#[from] Box<tungstenite::Error>),
    /// The websocket could not be opened; `status` is the HTTP status when the server answered.
    #[error("cannot open the VNC websocket {url}: {message}")]
    Connect {
        /// The URL (without its token).
        url: String,
        /// The HTTP status of a refusal.
        status: Option<u16>,
        /// Why.
        message: String,
    },
    /// The server closed the connection in the middle of a message.
    #[error("the VNC server closed the connection early (after {received} bytes)")]
    Closed {
        /// Bytes received until then.
        received: u64,
    },
    /// The server sent something this client does not understand.
    #[error("the VNC server broke the protocol: {0}")]
    Protocol(String),
    /// The server did not answer in time.
    #[error("the VNC server did not answer within {READ_TIMEOUT:?}")]
    Timeout,
}

/// The bytes of an RFB conversation.
pub enum Transport {
    /// A unix socket (QEMU's VNC socket or the replay server).
    Unix(UnixStream),
    /// A websocket carrying RFB in binary frames (paddock's gateway, websockify).
    WebSocket(Box<WebSocket>),
}

impl Transport {
    /// Connects to a unix socket.
    pub async fn unix(path: &Path) -> Result<Transport, RfbError> {
        Ok(Transport::Unix(UnixStream::connect(path).await?))
    }

    /// Opens a websocket offering `subprotocol`; `url` may carry a token, which errors omit.
    pub async fn websocket(url: &str, subprotocol: &str) -> Result<Transport, RfbError> {
        let shown = url.split('?').next().unwrap_or_default().to_string();
        let connect_error = |status: Option<u16>, message: String| RfbError::Connect {
            url: shown.clone(),
            status,
            message,
        };
        let mut request = url
            .into_client_request()
            .map_err(|error| connect_error(None, error.to_string()))?;
        let protocol =
            subprotocol
                .parse()
                .map_err(|error: tungstenite::http::header::InvalidHeaderValue| {
                    connect_error(None, error.to_string())
                })?;
        request.headers_mut().insert("Sec-WebSocket-Protocol", protocol);
        match tokio_tungstenite::connect_async(request).await {
            Ok((socket, _)) => Ok(Transport::WebSocket(Box::new(socket))),
            Err(tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                let body = response
                    .body()
                    .as_ref()
                    .map(|body| String::from_utf8_lossy(body).into_owned())
                    .unwrap_or_default();
                Err(connect_error(Some(status), format!("HTTP {status}: {body}")))
            }
            Err(error) => Err(connect_error(None, error.to_string())),
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), RfbError> {
        match self {
            Transport::Unix(stream) => stream.write_all(bytes).await?,
            Transport::WebSocket(socket) => socket
                .send(Message::Binary(Bytes::copy_from_slice(bytes)))
                .await
                .map_err(Box::new)?,
        }
        Ok(())
    }
}

/// Reads whole server messages out of a [`Transport`], counting (and optionally recording)
/// every byte received.
pub struct Reader {
    transport: Transport,
    buffer: Vec<u8>,
    position: usize,
    /// Bytes received from the server so far.
    pub received: u64,
    /// Every byte received, when recording.
    pub recording: Option<Vec<u8>>,
}

impl Reader {
    /// A reader over `transport`.
    pub fn new(transport: Transport) -> Reader {
        Reader {
            transport,
            buffer: Vec::new(),
            position: 0,
            received: 0,
            recording: None,
        }
    }

    /// Receives more bytes into the buffer; false at the end of the stream.
    async fn fill(&mut self) -> Result<bool, RfbError> {
        // Compact: what is left unread is at most a few bytes of a message header or pixel.
        self.buffer.drain(..self.position);
        self.position = 0;
        let received = match &mut self.transport {
            Transport::Unix(stream) => {
                let start = self.buffer.len();
                self.buffer.resize(start + 64 * 1024, 0);
                let read = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut self.buffer[start..]))
                    .await
                    .map_err(|_| RfbError::Timeout)?;
                let count = read?;
                self.buffer.truncate(start + count);
                if let Some(recording) = &mut self.recording {
                    recording.extend_from_slice(&self.buffer[start..]);
                }
                count
            }
            Transport::WebSocket(socket) => loop {
                let message = tokio::time::timeout(READ_TIMEOUT, socket.next())
                    .await
                    .map_err(|_| RfbError::Timeout)?;
                match message {
                    Some(Ok(Message::Binary(bytes))) => {
                        self.buffer.extend_from_slice(&bytes);
                        if let Some(recording) = &mut self.recording {
                            recording.extend_from_slice(&bytes);
                        }
                        break bytes.len();
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Ok(Message::Text(text))) => {
                        return Err(RfbError::Protocol(format!(
                            "a text frame on a binary websocket: {text:?}"
                        )));
                    }
                    Some(Ok(Message::Close(_))) | None => break 0,
                    Some(Err(error)) => return Err(Box::new(error).into()),
                }
            },
        };
        self.received += received as u64;
        Ok(received > 0)
    }

    /// The next `count` bytes.
    async fn take(&mut self, count: usize) -> Result<&[u8], RfbError> {
        while self.buffer.len() - self.position < count {
            if !self.fill().await? {
                return Err(RfbError::Closed {
                    received: self.received,
                });
            }
        }
        let start = self.position;
        self.position += count;
        Ok(&self.buffer[start..start + count])
    }

    async fn u8(&mut self) -> Result<u8, RfbError> {
        Ok(self.take(1).await?[0])
    }

    async fn u16(&mut self) -> Result<u16, RfbError> {
        let bytes = self.take(2).await?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    async fn u32(&mut self) -> Result<u32, RfbError> {
        let bytes = self.take(4).await?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// Reads until `expected` bytes have been received in total (or the stream ends first),
    /// returning the bytes received; with `checksum`, also the CRC-32 of everything received from
    /// now on. It stops at the count rather than at the end of the stream because websockify drops
    /// the data it still holds when its target closes.
    pub async fn drain(&mut self, expected: u64, checksum: bool) -> Result<(u64, Option<u32>), RfbError> {
        let mut hasher = checksum.then(crc32fast::Hasher::new);
        if let Some(hasher) = &mut hasher {
            hasher.update(&self.buffer[self.position..]);
        }
        self.position = self.buffer.len();
        // Websocket payloads are counted where they arrive, never copied: the client must cost
        // as little as possible so the path, not the reader, is what is measured.
        if let Transport::WebSocket(socket) = &mut self.transport {
            while self.received < expected {
                let message = tokio::time::timeout(READ_TIMEOUT, socket.next())
                    .await
                    .map_err(|_| RfbError::Timeout)?;
                match message {
                    Some(Ok(Message::Binary(bytes))) => {
                        self.received += bytes.len() as u64;
                        if let Some(hasher) = &mut hasher {
                            hasher.update(&bytes);
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Err(Box::new(error).into()),
                }
            }
            return Ok((self.received, hasher.map(crc32fast::Hasher::finalize)));
        }
        while self.received < expected {
            if !self.fill().await? {
                break;
            }
            if let Some(hasher) = &mut hasher {
                hasher.update(&self.buffer[self.position..]);
            }
            self.position = self.buffer.len();
        }
        Ok((self.received, hasher.map(crc32fast::Hasher::finalize)))
    }
}

/// One full framebuffer update, as received.
#[derive(Debug, Clone, Copy)]
pub struct Update {
    /// Whether the rectangles covered the whole framebuffer (and its size did not change).
    pub complete: bool,
    /// Whether any pixel is not black.
    pub lit: bool,
}

/// An RFB session after the handshake.
pub struct Session {
    /// The message reader (byte counts, recording).
    pub reader: Reader,
    /// The framebuffer's width.
    pub width: u16,
    /// The framebuffer's height.
    pub height: u16,
    /// How many bytes the server sent up to the end of ServerInit.
    pub handshake_bytes: u64,
}

/// Reads the 12-byte protocol banner ("RFB 003.008\n"): the moment the VNC server answers.
pub async fn read_banner(reader: &mut Reader) -> Result<(), RfbError> {
    let version = reader.take(12).await?;
    if !version.starts_with(b"RFB 003.") {
        return Err(RfbError::Protocol(format!(
            "expected an RFB banner, got {:?}",
            String::from_utf8_lossy(version)
        )));
    }
    Ok(())
}

/// The rest of the handshake after [`read_banner`]: version 3.8, security None, shared
/// ClientInit, then 32-bit true colour and raw + DesktopSize encodings.
pub async fn handshake(mut reader: Reader) -> Result<Session, RfbError> {
    reader.transport.write(b"RFB 003.008\n").await?;
    let count = reader.u8().await?;
    if count == 0 {
        return Err(RfbError::Protocol("the VNC server refused the connection".into()));
    }
    let types = reader.take(usize::from(count)).await?.to_vec();
    if !types.contains(&1) {
        return Err(RfbError::Protocol(format!(
            "security type None is not offered: {types:?}"
        )));
    }
    reader.transport.write(&[1]).await?;
    if reader.u32().await? != 0 {
        return Err(RfbError::Protocol("the security handshake failed".into()));
    }
    reader.transport.write(&[1]).await?; // ClientInit: shared
    let width = reader.u16().await?;
    let height = reader.u16().await?;
    reader.take(16).await?; // the server's pixel format, replaced below
    let name_length = reader.u32().await? as usize;
    reader.take(name_length).await?;
    let handshake_bytes = reader.received - (reader.buffer.len() - reader.position) as u64;
    // SetPixelFormat: 32 bpp, depth 24, little endian, true colour, 8 bits per channel.
    reader
        .transport
        .write(&[
            0, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
        ])
        .await?;
    let mut encodings = vec![2, 0, 0, 2];
    encodings.extend_from_slice(&0_i32.to_be_bytes());
    encodings.extend_from_slice(&DESKTOP_SIZE_ENCODING.to_be_bytes());
    reader.transport.write(&encodings).await?;
    Ok(Session {
        reader,
        width,
        height,
        handshake_bytes,
    })
}

impl Session {
    /// Asks for the whole framebuffer (non-incremental) and reads the FramebufferUpdate that
    /// answers it. With `inspect`, looks at the pixels (for "lit"); otherwise only skips them.
    pub async fn full_update(&mut self, inspect: bool) -> Result<Update, RfbError> {
        let mut request = vec![3, 0, 0, 0, 0, 0];
        request.extend_from_slice(&self.width.to_be_bytes());
        request.extend_from_slice(&self.height.to_be_bytes());
        self.reader.transport.write(&request).await?;
        loop {
            match self.reader.u8().await? {
                0 => return self.read_update(inspect).await,
                2 => {} // Bell
                3 => {
                    self.reader.take(3).await?;
                    let length = self.reader.u32().await? as usize;
                    self.reader.take(length).await?;
                }
                other => {
                    return Err(RfbError::Protocol(format!(
                        "unexpected server message type {other}"
                    )));
                }
            }
        }
    }

    async fn read_update(&mut self, inspect: bool) -> Result<Update, RfbError> {
        self.reader.take(1).await?;
        let rectangles = self.reader.u16().await?;
        let (mut covered, mut lit, mut resized) = (0_u64, false, false);
        for _ in 0..rectangles {
            let header = self.reader.take(12).await?;
            let width = u16::from_be_bytes([header[4], header[5]]);
            let height = u16::from_be_bytes([header[6], header[7]]);
            let encoding = i32::from_be_bytes([header[8], header[9], header[10], header[11]]);
            match encoding {
                0 => {
                    let mut remaining = usize::from(width) * usize::from(height) * 4;
                    covered += u64::from(width) * u64::from(height);
                    // Pixels are consumed in slices so a 4 MiB rectangle is never copied whole.
                    while remaining > 0 {
                        let available = self.reader.buffer.len() - self.reader.position;
                        if available == 0 {
                            if !self.reader.fill().await? {
                                return Err(RfbError::Closed {
                                    received: self.reader.received,
                                });
                            }
                            continue;
                        }
                        let step = available.min(remaining) / 4 * 4;
                        let step = if step == 0 { 4.min(remaining) } else { step };
                        let pixels = self.reader.take(step).await?;
                        if inspect && !lit {
                            lit = pixels
                                .chunks_exact(4)
                                .any(|pixel| pixel[..3].iter().any(|&channel| channel != 0));
                        }
                        remaining -= step;
                    }
                }
                DESKTOP_SIZE_ENCODING => {
                    self.width = width;
                    self.height = height;
                    resized = true;
                }
                other => {
                    return Err(RfbError::Protocol(format!(
                        "unexpected rectangle encoding {other}: only raw and DesktopSize were asked for"
                    )));
                }
            }
        }
        let complete = !resized && covered >= u64::from(self.width) * u64::from(self.height);
        Ok(Update { complete, lit })
    }
}
