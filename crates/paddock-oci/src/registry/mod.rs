//! Registry push and pull: OCI image layouts to and from an OCI distribution registry
//! (docker-registry, Zarf's registry, Harbor, quay.io, ...).
//!
//! Role: [`push`] uploads an OCI image layout (as [`build_layout`](crate::build_layout) or
//! [`build_index_layout`](crate::build_index_layout) write it) under a reference; [`pull`] downloads
//! one platform of an image into a new OCI image layout, verified. Both speak the OCI distribution
//! API directly over `reqwest` (rustls, system roots); see the crate README ("Registry") for why
//! not `oci-client`.
//!
//! Contract:
//! - push: every blob is checked with HEAD first and skipped when the repository has it; missing
//!   blobs upload in parallel ([`PushOptions::parallel_uploads`]), each read from its file as a
//!   stream (memory does not grow with blob size), in PATCH chunks of [`PushOptions::chunk_size`];
//!   then the manifests, then the index, tagged with the reference's tag. The registry's
//!   `Docker-Content-Digest` must equal the digest of the bytes pushed.
//! - resume: after each acknowledged chunk the upload session is saved in
//!   `<layout>/.paddock-push-<hex>.json`; the next push of the same blob to the same repository asks
//!   the registry for the session's offset and sends only the rest. A blob the registry already
//!   has is never sent again.
//! - pull: manifests and blobs are verified against their digests and sizes while streaming; a
//!   mismatch fails the pull and nothing is left at the destination (the layout is assembled in a
//!   temporary directory next to it and renamed into place).
//! - the functions are async and need a tokio runtime (file reads run on its blocking pool).

mod auth;
pub(crate) mod client;
pub(crate) mod manifest;
mod pull;
mod push;

use std::ops::ControlFlow;
use std::path::PathBuf;

pub use auth::{Credentials, CredentialsError};
pub use pull::{PullOptions, PulledImage, pull};
pub use push::{DEFAULT_CHUNK_SIZE, PushOptions, PushReport, move_upload_sessions, push};

/// How to reach and authenticate to a registry.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Speak plain http instead of https (a local docker-registry, a test registry), like skopeo's
    /// `--dest-tls-verify=false`. With https, certificates are always verified.
    pub insecure: bool,
    /// Credentials to use; when `None` they are looked up in the docker config.
    pub credentials: Option<Credentials>,
    /// The directory holding the docker `config.json`; `None` means `$DOCKER_CONFIG`, else
    /// `~/.docker`.
    pub docker_config_dir: Option<PathBuf>,
}

/// What is happening to one blob; see [`BlobProgress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobPhase {
    /// The registry already has the blob; nothing is sent.
    Skipped,
    /// The transfer starts (at `done`, which is non-zero when an interrupted upload resumes).
    Started,
    /// Bytes are moving; `done` grows.
    Transferring,
    /// The blob is complete and verified.
    Finished,
}

/// Progress of one blob of a push or pull.
#[derive(Debug, Clone, Copy)]
pub struct BlobProgress<'a> {
    /// The blob's digest.
    pub digest: &'a str,
    /// The blob's media type.
    pub media_type: &'a str,
    /// The blob's size in bytes.
    pub size: u64,
    /// Bytes of the blob transferred or already present at the destination.
    pub done: u64,
    /// What is happening.
    pub phase: BlobPhase,
}

/// Receives [`BlobProgress`] reports, from several blobs concurrently, at most about ten times a
/// second per blob while bytes move.
///
/// Returning `ControlFlow::Break(())` cancels the transfer with [`RegistryError::Cancelled`]: a
/// chunked upload stops after the chunk in flight, so the next push resumes from there; a
/// single-request upload or a download stops at once.
pub trait TransferProgress: Send + Sync {
    /// One blob's progress.
    fn blob(&self, progress: &BlobProgress<'_>) -> ControlFlow<()>;
}

impl<F: Fn(&BlobProgress<'_>) -> ControlFlow<()> + Send + Sync> TransferProgress for F {
    fn blob(&self, progress: &BlobProgress<'_>) -> ControlFlow<()> {
        self(progress)
    }
}

/// A [`TransferProgress`] that ignores reports and never cancels.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoTransferProgress;

impl TransferProgress for NoTransferProgress {
    fn blob(&self, _progress: &BlobProgress<'_>) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

/// Everything that can go wrong talking to a registry, pushing a layout or writing a pulled one.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The image reference does not parse.
    #[error("invalid image reference: {0}")]
    Reference(#[from] paddock_api::image_reference::ImageReferenceError),
    /// Credentials could not be read.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    /// The http client could not be built (TLS setup).
    #[error(
        "cannot set up the http client: {0}; this is a bug in paddock or a broken TLS setup, please report it"
    )]
    ClientSetup(String),
    /// The registry could not be reached or the connection broke.
    #[error(
        "cannot reach registry {registry} for {action}: {detail}; check the address and that the registry is running{hint}"
    )]
    Connect {
        /// The registry host.
        registry: String,
        /// The request, e.g. `PATCH /v2/vms/debian/blobs/uploads/…`.
        action: String,
        /// The transport error and its causes.
        detail: String,
        /// Advice that depends on the options (e.g. `--insecure`).
        hint: &'static str,
    },
    /// The registry wants (other) credentials.
    #[error("registry {registry} answered http 401 to {action}: {advice}")]
    Unauthorized {
        /// The registry host.
        registry: String,
        /// The request.
        action: String,
        /// What to do, naming where the credentials came from.
        advice: String,
    },
    /// The credentials are valid but lack the permission.
    #[error(
        "registry {registry} answered http 403 to {action} ({message}): the account may not access this repository; \
         check its permissions or use other credentials"
    )]
    Denied {
        /// The registry host.
        registry: String,
        /// The request.
        action: String,
        /// The registry's error message.
        message: String,
    },
    /// The repository, tag, digest or upload does not exist.
    #[error(
        "registry {registry} answered http 404 to {action} ({message}): check the repository name, tag or digest"
    )]
    NotFound {
        /// The registry host.
        registry: String,
        /// The request.
        action: String,
        /// The registry's error message.
        message: String,
    },
    /// Any other unexpected status.
    #[error("registry {registry} answered http {status} to {action}: {message}")]
    Status {
        /// The registry host.
        registry: String,
        /// The request.
        action: String,
        /// The http status.
        status: u16,
        /// The registry's error message.
        message: String,
    },
    /// The registry's answer does not follow the distribution API.
    #[error("registry {registry} sent an unusable answer to {action}: {reason}")]
    Protocol {
        /// The registry host.
        registry: String,
        /// The request.
        action: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Content does not hash to its digest.
    #[error(
        "{what} {expected} from {location} has digest {actual}: the content is corrupt (in storage or in transit) \
         and was not used; check {location} and try again"
    )]
    DigestMismatch {
        /// `blob`, `manifest`, ...
        what: &'static str,
        /// The digest it should have.
        expected: String,
        /// The digest it has.
        actual: String,
        /// Where it came from.
        location: String,
    },
    /// Content has another size than its descriptor says.
    #[error(
        "{what} {digest} has {actual} bytes in {location}, its descriptor says {expected}: the content is corrupt or truncated; it was not used"
    )]
    SizeMismatch {
        /// `blob`, `manifest`, ...
        what: &'static str,
        /// The digest.
        digest: String,
        /// The size the descriptor gives.
        expected: u64,
        /// The size found (for a download: at least this many bytes).
        actual: u64,
        /// Where it came from.
        location: String,
    },
    /// A digest is malformed or not sha256.
    #[error(
        "{what} names digest {digest:?}, which paddock does not handle: it supports sha256:<64 lowercase hex> digests"
    )]
    InvalidDigest {
        /// Where the digest was found.
        what: String,
        /// The digest.
        digest: String,
    },
    /// A document has a media type paddock cannot handle.
    #[error("{what} has media type {media_type:?}: {reason}")]
    UnsupportedMediaType {
        /// Which document.
        what: String,
        /// Its media type.
        media_type: String,
        /// Why it is not handled and what to do.
        reason: &'static str,
    },
    /// The image index has no manifest for the wanted platform.
    #[error("{reference} has no image for platform {wanted}; it has {available}: choose one of those")]
    NoMatchingPlatform {
        /// The image.
        reference: String,
        /// The platform asked for.
        wanted: String,
        /// The platforms listed.
        available: String,
    },
    /// The OCI layout to push is incomplete or inconsistent.
    #[error("oci layout {path} cannot be pushed: {reason}")]
    Layout {
        /// The layout directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A layout file could not be read.
    #[error("cannot read {path}: {source}; check the layout directory is complete and readable")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An output could not be written.
    #[error("cannot write {path}: {source}; check free space and permissions where the output goes")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The destination of a pull exists; paddock never overwrites an output.
    #[error("output {path} already exists; remove it or choose another output path")]
    DestinationExists {
        /// The destination.
        path: PathBuf,
    },
    /// A JSON document could not be parsed.
    #[error("cannot parse {what}: {source}")]
    Json {
        /// Which document.
        what: String,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The registry does not delete manifests.
    #[error(
        "registry {registry} does not delete manifests (it answered {action} with {message}): old backups cannot be pruned there; \
         enable deletes (docker-registry: REGISTRY_STORAGE_DELETE_ENABLED=true) or delete them with the registry's own tools"
    )]
    DeleteUnsupported {
        /// The registry host.
        registry: String,
        /// The request.
        action: String,
        /// The registry's error message.
        message: String,
    },
    /// The progress callback asked to stop.
    #[error("the transfer was cancelled; run the same command again to resume where it stopped")]
    Cancelled,
}

/// Deletes the manifest `digest` (`sha256:…`) from `repository` (`registry/repository`; a tag or
/// digest in it is ignored): every tag naming that manifest goes with it; blobs stay until the
/// registry's garbage collection. A registry that refuses deletes gives
/// [`RegistryError::DeleteUnsupported`]; a manifest that is already gone gives
/// [`RegistryError::NotFound`].
pub async fn delete_manifest(repository: &str, digest: &str, options: &RegistryOptions) -> Result<()> {
    let reference = paddock_api::image_reference::ImageReference::parse(repository)?;
    if manifest::digest_hex(digest).is_none() {
        return Err(RegistryError::InvalidDigest {
            what: format!("the manifest to delete from {}", reference.name()),
            digest: digest.to_string(),
        });
    }
    let client = client::RegistryClient::new(&reference, options, client::Access::Delete)?;
    client.delete_manifest(digest).await
}

/// Result alias for registry operations.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// `error` and its sources, joined with `": "` (reqwest's own message alone says little); a
/// cause already contained in the text so far is not repeated.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
