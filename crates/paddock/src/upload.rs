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
//!
//! The checks, manifests and the streamed `POST` are `paddock_cluster::upload`'s, shared with the
//! console's upload endpoint; this module adds the flags, the kubeconfig client and the bar.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use paddock_cluster::upload;
use serde::Serialize;
use serde_json::json;

use crate::progress::OutputFlags;

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

fn resource(name: &upload::ResourceName) -> ApiResource {
    ApiResource {
        group: name.group.to_owned(),
        version: name.version.to_owned(),
        api_version: format!("{}/{}", name.group, name.version),
        kind: name.kind.to_owned(),
        plural: name.plural.to_owned(),
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

/// The DataVolume size to ask for, checked against the disk's virtual size; errors name --size.
fn requested_size(size: Option<&str>, virtual_size: u64) -> anyhow::Result<String> {
    upload::requested_size(size, Some(virtual_size)).map_err(|error| anyhow::anyhow!("--{error}"))
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
        let status = json!({"status": object.data["status"].clone()});
        match upload::check_phase(&status, wanted) {
            upload::PhaseCheck::Reached => return Ok(object),
            upload::PhaseCheck::Failed(message) => bail!("DataVolume {name} failed: {message}"),
            upload::PhaseCheck::Waiting => {}
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "DataVolume {name} did not become {} within {} s (it is {:?}: {}); check CDI's pods and events, or raise --wait-secs",
                wanted.join(" or "),
                timeout.as_secs(),
                phase(&object),
                upload::condition_message(&status)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn upload(arguments: &UploadArgs) -> anyhow::Result<()> {
    let info = upload::inspect_disk_file(&arguments.disk).await?;
    let virtual_size = info.virtual_size.unwrap_or_default();
    let size = requested_size(arguments.size.as_deref(), virtual_size)?;
    let disk_bytes = std::fs::metadata(&arguments.disk)
        .with_context(|| format!("cannot read {}", arguments.disk.display()))?
        .len();
    let (client, namespace) = kube_client(arguments).await?;
    let http = upload_client(arguments)?;
    let wait = Duration::from_secs(arguments.wait_secs);
    let data_volumes: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &namespace, &resource(&upload::DATA_VOLUME));
    let name = &arguments.name;
    let bars = arguments.output_flags.bars();
    let proxy = match &arguments.uploadproxy_url {
        Some(url) => upload::normalize_proxy_url(url),
        None => {
            let configs: Api<DynamicObject> = Api::all_with(client.clone(), &resource(&upload::CDI_CONFIG));
            let config = configs
                .get("config")
                .await
                .context("cannot read CDIConfig config to find the upload proxy; is CDI installed? Or pass --uploadproxy-url")?;
            upload::proxy_url_from_cdi_config(&json!({"status": config.data["status"].clone()}))
                .map_err(|error| anyhow::anyhow!("{error}; or pass --uploadproxy-url"))?
        }
    };

    if arguments.no_create {
        let existing = data_volumes.get(name).await.with_context(|| {
            format!("cannot read DataVolume {name} in namespace {namespace} (--no-create)")
        })?;
        if !upload::has_upload_source(&existing.data) {
            bail!(
                "DataVolume {name} has no upload source (spec.source.upload); create one without --no-create"
            );
        }
    } else {
        let data_volume: DynamicObject = serde_json::from_value(upload::data_volume_manifest(
            &namespace,
            name,
            &size,
            arguments.storage_class.as_deref(),
        ))?;
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
        &resource(&upload::UPLOAD_TOKEN_REQUEST),
    );
    let token_request: DynamicObject =
        serde_json::from_value(upload::token_request_manifest(&namespace, name))?;
    let answer = token_requests
        .create(&PostParams::default(), &token_request)
        .await
        .context("cannot get an upload token (UploadTokenRequest); check that CDI's upload API is installed and you may create uploadtokenrequests")?;
    let token = upload::token_from_answer(&json!({"status": answer.data["status"].clone()}))?;

    let endpoint = if arguments.sync {
        upload::Endpoint::Sync
    } else {
        upload::Endpoint::Async
    };
    let url = upload::upload_url(&proxy, endpoint);
    let bar = bars.bytes("upload", disk_bytes);
    let file = tokio::fs::File::open(&arguments.disk)
        .await
        .with_context(|| format!("cannot open {}", arguments.disk.display()))?;
    let progress: upload::Progress = {
        let bar = bar.clone();
        Arc::new(move |bytes| bar.inc(bytes))
    };
    let bytes_sent = match upload::send_disk(
        &http,
        &url,
        &token,
        upload::file_stream(file),
        disk_bytes,
        progress,
    )
    .await
    {
        Ok(bytes_sent) => bytes_sent,
        Err(error) => {
            bar.abandon();
            match error {
                upload::UploadError::ProxyFailed { .. } => {
                    bail!("{error} (check --uploadproxy-url and --ca-file)")
                }
                error => bail!("upload of {}: {error}", arguments.disk.display()),
            }
        }
    };
    bar.finish_and_clear();
    bars.println("uploaded; waiting for CDI to process the disk");
    let done = wait_phase(&data_volumes, name, &["Succeeded"], wait).await?;
    let summary = UploadSummary {
        namespace: namespace.clone(),
        data_volume: name.clone(),
        format: info.format,
        virtual_size,
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
    let ca_pem = match &arguments.ca_file {
        Some(ca_file) => Some(
            std::fs::read(ca_file).with_context(|| format!("cannot read --ca-file {}", ca_file.display()))?,
        ),
        None => None,
    };
    upload::proxy_client(&upload::ProxyTrust {
        ca_pem,
        insecure: arguments.insecure,
    })
    .with_context(|| {
        arguments
            .ca_file
            .as_ref()
            .map(|file| format!("--ca-file {}", file.display()))
            .unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_hold_the_disk_and_default_to_cdis_overhead() {
        assert_eq!(requested_size(None, 1 << 30).unwrap(), "1081Mi");
        assert_eq!(requested_size(Some("2Gi"), 1 << 30).unwrap(), "2Gi");
        // The CLI's message names its flag.
        assert!(
            requested_size(Some("1Mi"), 1 << 30)
                .unwrap_err()
                .to_string()
                .starts_with("--size 1Mi")
        );
        let refused = requested_size(Some("512Mi"), 1 << 30).unwrap_err().to_string();
        assert!(
            refused.contains("smaller than the disk's virtual size"),
            "{refused}"
        );
        assert!(requested_size(Some("lots"), 1 << 30).is_err());
    }
}
