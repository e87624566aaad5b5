//! `paddock upload`: a local disk into a cluster through CDI's upload proxy, as
//! `virtctl image-upload` does.
//!
//! Role: the command line's way to put a disk file into a DataVolume without a registry.
//!
//! Contract, in order (nothing is sent before every check passed):
//! 1. the disk is inspected with `qemu-img info`: a backing file or an encrypted disk is refused,
//!    and the DataVolume's size must hold the disk's virtual size (`--size`; by default the
//!    virtual size plus CDI's default filesystem overhead of 5.5%, rounded up to MiB);
//! 2. the DataVolume (`spec.source.upload`) is created, unless `--no-create` names an existing
//!    one, and its phase must reach `UploadReady`;
//! 3. an `UploadTokenRequest` (`upload.cdi.kubevirt.io/v1beta1`) gives a token for it;
//! 4. the disk streams in one `POST` to the proxy's `/v1beta1/upload-async` (`--sync`:
//!    `/v1beta1/upload`, which answers after CDI checked the disk), with a progress bar of the
//!    bytes sent; the proxy's URL is `--uploadproxy-url` or `CDIConfig` `config`'s
//!    `status.uploadProxyURL`;
//! 5. the DataVolume must reach `Succeeded`; `Failed` reports CDI's message. A refusal, a timeout
//!    or a dropped connection is reported with what to do — never as a silent stop at 99%.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use futures_util::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::AsyncReadExt;

use crate::progress::OutputFlags;

/// CDI's default filesystem overhead (CDIConfig `filesystemOverhead.global`).
const FILESYSTEM_OVERHEAD: f64 = 0.055;
const MIB: u64 = 1 << 20;

/// `paddock upload`.
#[derive(Debug, Args)]
#[command(
    after_long_help = "Examples:\n  paddock upload debian-12.qcow2 --name debian-disk --size 12Gi\n  \
paddock upload disk.raw --name data -n vms --uploadproxy-url https://127.0.0.1:31001 --ca-file cdi-ca.crt"
)]
pub struct UploadArgs {
    /// The disk file (qcow2, raw, vmdk, vdi, vhd or vhdx; CDI converts it).
    disk: PathBuf,
    /// The DataVolume to create (or, with --no-create, to upload into).
    #[arg(long)]
    name: String,
    /// The namespace (default: the kubeconfig context's, else `default`).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// The DataVolume's size, e.g. 10Gi (default: the disk's virtual size plus 5.5%).
    #[arg(long)]
    size: Option<String>,
    /// The StorageClass (default: the cluster's).
    #[arg(long)]
    storage_class: Option<String>,
    /// Upload into an existing DataVolume with an upload source instead of creating one.
    #[arg(long)]
    no_create: bool,
    /// The upload proxy's URL (default: CDIConfig `config`'s status.uploadProxyURL).
    #[arg(long, value_name = "URL")]
    uploadproxy_url: Option<String>,
    /// A PEM file with the CA that signed the upload proxy's certificate (added to the system's).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Do not verify the upload proxy's certificate.
    #[arg(long)]
    insecure: bool,
    /// Use `/v1beta1/upload`, which answers after CDI checked the disk, instead of `upload-async`.
    #[arg(long)]
    sync: bool,
    /// How long to wait for the DataVolume to become UploadReady and then Succeeded, in seconds.
    #[arg(long, default_value_t = 300)]
    wait_secs: u64,
    /// The kubeconfig (default: $KUBECONFIG, else ~/.kube/config, else in-cluster).
    #[arg(long, env = "KUBECONFIG", value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current context).
    #[arg(long)]
    context: Option<String>,
    #[command(flatten)]
    output_flags: OutputFlags,
}

#[derive(Deserialize)]
struct QemuImgInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename", default)]
    backing_filename: Option<String>,
    #[serde(default)]
    encrypted: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct UploadSummary {
    namespace: String,
    data_volume: String,
    format: String,
    virtual_size: u64,
    size_requested: String,
    bytes_sent: u64,
    phase: String,
}

fn resource(group: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.to_owned(),
        version: "v1beta1".to_owned(),
        api_version: format!("{group}/v1beta1"),
        kind: kind.to_owned(),
        plural: plural.to_owned(),
    }
}

/// Runs `paddock upload`.
pub fn run(arguments: &UploadArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(upload(arguments))
}

/// The disk's format and virtual size, refusing what CDI would refuse.
async fn inspect_disk(disk: &std::path::Path) -> anyhow::Result<QemuImgInfo> {
    let metadata = std::fs::metadata(disk).with_context(|| format!("cannot read {}", disk.display()))?;
    if !metadata.is_file() {
        bail!("{} is not a regular file; pass a disk image file", disk.display());
    }
    let output = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(disk)
        .output()
        .await
        .context("cannot run qemu-img; install qemu-utils")?;
    if !output.status.success() {
        bail!(
            "qemu-img cannot read {}: {}",
            disk.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let info: QemuImgInfo =
        serde_json::from_slice(&output.stdout).context("qemu-img info printed unreadable json")?;
    if let Some(backing) = &info.backing_filename {
        bail!(
            "{} has a backing file ({backing}), which CDI refuses; flatten it first with `qemu-img convert -O qcow2`",
            disk.display()
        );
    }
    if info.encrypted {
        bail!(
            "{} is encrypted, which CDI refuses; decrypt it first",
            disk.display()
        );
    }
    if !["qcow2", "raw", "vmdk", "vdi", "vpc", "vhdx"].contains(&info.format.as_str()) {
        bail!(
            "{} is {}, which CDI does not import; convert it with `qemu-img convert -O qcow2`",
            disk.display(),
            info.format
        );
    }
    Ok(info)
}

/// The DataVolume size to ask for, checked against the disk's virtual size.
fn requested_size(size: Option<&str>, virtual_size: u64) -> anyhow::Result<String> {
    // What CDI needs on a Filesystem volume: the virtual size plus the overhead it reserves.
    let needed = (virtual_size as f64 * (1.0 + FILESYSTEM_OVERHEAD)).ceil() as u64;
    let Some(size) = size else {
        return Ok(format!("{}Mi", needed.div_ceil(MIB)));
    };
    let bytes = paddock_api::quantity::parse_quantity(size)
        .map_err(|error| anyhow::anyhow!("--size {size}: {error}"))?;
    let bytes = u64::try_from(bytes).map_err(|_| anyhow::anyhow!("--size {size} is too large"))?;
    if bytes < virtual_size {
        bail!(
            "--size {size} ({bytes} bytes) is smaller than the disk's virtual size of {virtual_size} bytes; the upload would fail after sending everything: pass --size {}Mi or more",
            needed.div_ceil(MIB)
        );
    }
    Ok(size.to_owned())
}

async fn kube_client(arguments: &UploadArgs) -> anyhow::Result<(kube::Client, String)> {
    let options = KubeConfigOptions {
        context: arguments.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &arguments.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .with_context(|| format!("cannot use the kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("cannot find a cluster: pass --kubeconfig or set KUBECONFIG")?,
    };
    let namespace = arguments
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config).context("cannot set up the Kubernetes client")?;
    Ok((client, namespace))
}

fn phase(object: &DynamicObject) -> String {
    object.data["status"]["phase"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The message of the DataVolume's first condition that has one, for errors.
fn condition_message(object: &DynamicObject) -> String {
    object.data["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|condition| condition["message"].as_str())
        .find(|message| !message.is_empty())
        .unwrap_or("no message")
        .to_owned()
}

/// Waits until the DataVolume is in one of `wanted` phases; `Failed` (unless wanted) is an error.
async fn wait_phase(
    api: &Api<DynamicObject>,
    name: &str,
    wanted: &[&str],
    timeout: Duration,
) -> anyhow::Result<DynamicObject> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let object = api
            .get(name)
            .await
            .with_context(|| format!("cannot read DataVolume {name}"))?;
        let current = phase(&object);
        if wanted.contains(&current.as_str()) {
            return Ok(object);
        }
        if current == "Failed" {
            bail!("DataVolume {name} failed: {}", condition_message(&object));
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "DataVolume {name} did not become {} within {} s (it is {:?}: {}); check CDI's pods and events, or raise --wait-secs",
                wanted.join(" or "),
                timeout.as_secs(),
                current,
                condition_message(&object)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn upload(arguments: &UploadArgs) -> anyhow::Result<()> {
    let info = inspect_disk(&arguments.disk).await?;
    let size = requested_size(arguments.size.as_deref(), info.virtual_size)?;
    let disk_bytes = std::fs::metadata(&arguments.disk)
        .with_context(|| format!("cannot read {}", arguments.disk.display()))?
        .len();
    let (client, namespace) = kube_client(arguments).await?;
    let http = upload_client(arguments)?;
    let wait = Duration::from_secs(arguments.wait_secs);
    let data_volumes: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &namespace,
        &resource("cdi.kubevirt.io", "DataVolume", "datavolumes"),
    );
    let name = &arguments.name;
    let bars = arguments.output_flags.bars();
    let proxy = match &arguments.uploadproxy_url {
        Some(url) => url.clone(),
        None => {
            let configs: Api<DynamicObject> = Api::all_with(
                client.clone(),
                &resource("cdi.kubevirt.io", "CDIConfig", "cdiconfigs"),
            );
            let config = configs
                .get("config")
                .await
                .context("cannot read CDIConfig config to find the upload proxy; is CDI installed? Or pass --uploadproxy-url")?;
            config.data["status"]["uploadProxyURL"]
                .as_str()
                .filter(|url| !url.is_empty())
                .map(str::to_owned)
                .context("CDIConfig config has no status.uploadProxyURL; expose cdi-uploadproxy (e.g. kubectl port-forward) and pass --uploadproxy-url")?
        }
    };
    let proxy = if proxy.contains("://") {
        proxy
    } else {
        format!("https://{proxy}")
    };

    if arguments.no_create {
        let existing = data_volumes.get(name).await.with_context(|| {
            format!("cannot read DataVolume {name} in namespace {namespace} (--no-create)")
        })?;
        if existing.data["spec"]["source"]["upload"].is_null() {
            bail!(
                "DataVolume {name} has no upload source (spec.source.upload); create one without --no-create"
            );
        }
    } else {
        let mut storage = json!({"resources": {"requests": {"storage": size}}});
        if let Some(class) = &arguments.storage_class {
            storage["storageClassName"] = json!(class);
        }
        let data_volume: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "cdi.kubevirt.io/v1beta1",
            "kind": "DataVolume",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"source": {"upload": {}}, "storage": storage},
        }))?;
        match data_volumes.create(&PostParams::default(), &data_volume).await {
            Ok(_) => bars.println(&format!("created DataVolume {namespace}/{name} ({size})")),
            Err(kube::Error::Api(status)) if status.code == 409 => bail!(
                "DataVolume {name} already exists in namespace {namespace}; delete it, choose another --name, or pass --no-create to upload into it"
            ),
            Err(error) => return Err(error).with_context(|| format!("cannot create DataVolume {name}")),
        }
    }
    bars.println("waiting for the upload server");
    let ready = wait_phase(&data_volumes, name, &["UploadReady", "Succeeded"], wait).await?;
    if phase(&ready) == "Succeeded" {
        bail!("DataVolume {name} already holds a disk (phase Succeeded); upload into a new one");
    }

    let token_requests: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &namespace,
        &resource(
            "upload.cdi.kubevirt.io",
            "UploadTokenRequest",
            "uploadtokenrequests",
        ),
    );
    let token_request: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "upload.cdi.kubevirt.io/v1beta1",
        "kind": "UploadTokenRequest",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"pvcName": name},
    }))?;
    let answer = token_requests
        .create(&PostParams::default(), &token_request)
        .await
        .context("cannot get an upload token (UploadTokenRequest); check that CDI's upload API is installed and you may create uploadtokenrequests")?;
    let token = answer.data["status"]["token"]
        .as_str()
        .context("the UploadTokenRequest answer has no status.token")?
        .to_owned();

    let path = if arguments.sync {
        "/v1beta1/upload"
    } else {
        "/v1beta1/upload-async"
    };
    let url = format!("{}{path}", proxy.trim_end_matches('/'));
    let bar = bars.bytes("upload", disk_bytes);
    let sent = Arc::new(AtomicU64::new(0));
    let file = tokio::fs::File::open(&arguments.disk)
        .await
        .with_context(|| format!("cannot open {}", arguments.disk.display()))?;
    let body = {
        let (sent, bar) = (Arc::clone(&sent), bar.clone());
        let stream = futures_util::stream::unfold(file, |mut file| async move {
            let mut buffer = vec![0u8; 1 << 20];
            match file.read(&mut buffer).await {
                Ok(0) => None,
                Ok(count) => {
                    buffer.truncate(count);
                    Some((Ok(bytes::Bytes::from(buffer)), file))
                }
                Err(error) => Some((Err(error), file)),
            }
        })
        .map(move |item: std::io::Result<bytes::Bytes>| {
            if let Ok(bytes) = &item {
                sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                bar.inc(bytes.len() as u64);
            }
            item
        });
        reqwest::Body::wrap_stream(stream)
    };
    let response = http
        .post(&url)
        .bearer_auth(&token)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .header(reqwest::header::CONTENT_LENGTH, disk_bytes)
        .body(body)
        .send()
        .await;
    let bytes_sent = sent.load(Ordering::Relaxed);
    let response = match response {
        Ok(response) => response,
        Err(error) => {
            bar.abandon();
            let what = if error.is_timeout() {
                "the upload proxy stopped answering (timed out)"
            } else if error.is_connect() {
                "cannot connect to the upload proxy"
            } else {
                "the connection to the upload proxy broke"
            };
            bail!(
                "{what} at {url} after {bytes_sent} of {disk_bytes} bytes: {}; check the proxy is reachable (--uploadproxy-url, --ca-file) and run the upload again into a new DataVolume",
                crate_error_chain(&error)
            );
        }
    };
    let status = response.status();
    let message = response.text().await.unwrap_or_default();
    if !status.is_success() {
        bar.abandon();
        let advice = match status.as_u16() {
            400 => "the proxy or CDI refused the disk or the request",
            401 | 403 => {
                "the upload token was refused (tokens expire after a few minutes): run the upload again"
            }
            413 => "the disk is larger than the proxy accepts",
            503 => "the upload server is not ready or the DataVolume already received an upload",
            504 | 502 => "the proxy timed out waiting for the upload server",
            _ => "the upload proxy refused the upload",
        };
        bail!(
            "upload of {} to {url} failed with http {}: {advice}{}",
            arguments.disk.display(),
            status.as_u16(),
            if message.trim().is_empty() {
                String::new()
            } else {
                format!(" ({})", message.trim())
            }
        );
    }
    if bytes_sent != disk_bytes {
        bail!(
            "the upload proxy answered http {} after only {bytes_sent} of {disk_bytes} bytes; the upload is incomplete: run it again into a new DataVolume",
            status.as_u16()
        );
    }
    bar.finish_and_clear();
    bars.println("uploaded; waiting for CDI to process the disk");
    let done = wait_phase(&data_volumes, name, &["Succeeded"], wait).await?;
    let summary = UploadSummary {
        namespace: namespace.clone(),
        data_volume: name.clone(),
        format: info.format,
        virtual_size: info.virtual_size,
        size_requested: size,
        bytes_sent,
        phase: phase(&done),
    };
    if arguments.output_flags.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "uploaded {} ({} bytes, {}) into DataVolume {namespace}/{name}: {}",
            arguments.disk.display(),
            summary.bytes_sent,
            summary.format,
            summary.phase
        );
    }
    Ok(())
}

/// The HTTP client for the upload proxy: its CA added, or verification off with --insecure.
fn upload_client(arguments: &UploadArgs) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("paddock/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(30))
        // No overall limit (a disk may take hours), but a proxy that stops reading or answering
        // fails the upload instead of hanging at 99%.
        .read_timeout(Duration::from_secs(300));
    if let Some(ca_file) = &arguments.ca_file {
        let pem =
            std::fs::read(ca_file).with_context(|| format!("cannot read --ca-file {}", ca_file.display()))?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("--ca-file {} holds no PEM certificate", ca_file.display()))?;
        builder = builder.tls_certs_merge(certificates);
    }
    if arguments.insecure {
        builder = builder.tls_danger_accept_invalid_certs(true);
    }
    builder
        .build()
        .context("cannot set up the HTTP client for the upload proxy")
}

/// An error and its sources, joined with `": "`.
fn crate_error_chain(error: &dyn std::error::Error) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_hold_the_disk_and_default_to_cdis_overhead() {
        assert_eq!(requested_size(None, 1 << 30).unwrap(), "1081Mi");
        assert_eq!(requested_size(Some("2Gi"), 1 << 30).unwrap(), "2Gi");
        let refused = requested_size(Some("512Mi"), 1 << 30).unwrap_err().to_string();
        assert!(
            refused.contains("smaller than the disk's virtual size"),
            "{refused}"
        );
        assert!(requested_size(Some("lots"), 1 << 30).is_err());
    }
}
