//! `paddock operator`: runs [`paddock_operator`] in this process until SIGTERM or Ctrl-C, and, when a
//! webhook endpoint is given, [`paddock_admission`]'s webhooks beside it.
//!
//! Thin by design: flags become [`paddock_operator::Options`] and
//! [`paddock_admission::AdmissionOptions`]; everything else lives in those crates. The controllers run
//! only on the Lease holder, the webhooks on every replica; one `/metrics` serves both. A lost leader
//! Lease exits non-zero so Kubernetes restarts the pod as a fresh candidate.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use futures_util::FutureExt as _;
use paddock_admission::{
    AdmissionMetrics, AdmissionOptions, ConfigurationMode, FailurePolicy, WebhookEndpoint,
};
use paddock_operator::{LeaseTiming, Metrics, Options};

/// What the API server does when the webhooks cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FailurePolicyFlag {
    /// Reject the request.
    Fail,
    /// Admit it unchecked.
    Ignore,
}

/// Who owns the webhook configurations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WebhookConfigurationsFlag {
    /// The operator creates and owns both configurations (server-side apply, CA bundle included);
    /// nothing deletes them when it stops. For runs outside Helm.
    Managed,
    /// Something else (the Helm chart) owns them; the operator only keeps every webhook's
    /// `caBundle` in the two configurations named --webhook-configuration-name current and never
    /// creates them. --webhook-failure-policy and --webhook-timeout-seconds are then the owner's.
    InjectCa,
}

/// `paddock operator` flags.
#[derive(Debug, Args)]
pub struct OperatorArgs {
    /// Watch only this namespace (default: every namespace).
    #[arg(long, env = "PADDOCK_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// The base URL through which Baffles reaches VNC consoles (the paddock console gateway).
    #[arg(
        long,
        env = "PADDOCK_CONSOLE_GATEWAY_URL",
        default_value = "wss://paddock-console.paddock-system.svc"
    )]
    console_gateway_url: String,
    /// The StorageClass for disks whose manifest names none (default: the cluster's default class).
    #[arg(long)]
    default_storage_class: Option<String>,
    /// Where /healthz, /readyz and /metrics are served. Port 0 picks a free port.
    #[arg(long, default_value = "0.0.0.0:8080", value_name = "ADDRESS:PORT")]
    listen: SocketAddr,
    /// The namespace of the leader Lease (default: --namespace, else paddock-system).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// The name of the leader Lease.
    #[arg(long, default_value = "paddock-operator")]
    lease_name: String,
    /// This replica's identity in the Lease; a restarted replica with the same identity takes its
    /// Lease back at once (default: the pod name, else the host name plus a random suffix).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a Lease stays valid after its last renewal.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Seconds the leader keeps trying to renew before it gives up leadership.
    #[arg(long, default_value_t = 10)]
    renew_deadline_seconds: u64,
    /// Seconds between renewals and between candidates' attempts.
    #[arg(long, default_value_t = 2)]
    retry_period_seconds: u64,
    /// Seconds between rediscoveries of Zarf and the Baffles CRD.
    #[arg(long, default_value_t = 60)]
    facts_interval_seconds: u64,
    /// How many objects each controller reconciles at once.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// How many scheduled or requested backups (`spec.backup`) run at once.
    #[arg(long, default_value_t = 1)]
    backup_concurrency: usize,
    /// Which link of a VirtualMachineExport backups read the disk through: `internal` (the export
    /// server's Service; the operator runs in the cluster) or `external` (the export proxy).
    #[arg(long, value_enum, default_value = "internal")]
    backup_export_link: crate::backup::ExportLink,
    /// Where backups put their scratch files (the raw disk and its compressed copy: room for about
    /// twice the largest disk); default the system's temporary directory.
    #[arg(long, value_name = "DIRECTORY")]
    backup_scratch_directory: Option<std::path::PathBuf>,
    /// Seconds between the backup scheduler's looks at the apps (how soon a due or requested
    /// backup starts).
    #[arg(long, default_value_t = 10)]
    backup_tick_seconds: u64,
    /// Serve the admission webhooks, reached by the API server through this Service
    /// (`<name>` in the Lease namespace, port 443).
    #[arg(long, value_name = "NAME", conflicts_with = "webhook_url")]
    webhook_service: Option<String>,
    /// Serve the admission webhooks, reached by the API server at this base URL
    /// (out-of-cluster development and tests), e.g. `https://127.0.0.1:8443`.
    #[arg(long, value_name = "URL")]
    webhook_url: Option<String>,
    /// Where the webhooks' HTTPS server listens.
    #[arg(long, default_value = "0.0.0.0:8443", value_name = "ADDRESS:PORT")]
    webhook_listen: SocketAddr,
    /// The name of the webhook configurations (mutating and validating).
    #[arg(long, default_value = "paddock")]
    webhook_configuration_name: String,
    /// Who owns the webhook configurations: `managed` (this process applies them whole; the
    /// default, for runs outside Helm) or `inject-ca` (the Helm chart owns them, so `helm uninstall`
    /// removes them; this process only injects the CA bundle; the chart passes it).
    #[arg(long, value_enum, default_value = "managed")]
    webhook_configurations: WebhookConfigurationsFlag,
    /// What the API server does when the webhooks cannot answer.
    #[arg(long, value_enum, default_value = "fail")]
    webhook_failure_policy: FailurePolicyFlag,
    /// How long the API server waits for a webhook, 1 to 30 seconds.
    #[arg(long, default_value_t = 5)]
    webhook_timeout_seconds: i32,
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "paddock-operator".to_owned());
    let mut suffix = [0_u8; 3];
    let _ = random_bytes(&mut suffix);
    format!("{host}-{:02x}{:02x}{:02x}", suffix[0], suffix[1], suffix[2])
}

fn random_bytes(bytes: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(bytes)
}

/// Runs the operator until SIGTERM or Ctrl-C.
pub fn run(arguments: &OperatorArgs) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let mut options = Options::new(
        arguments.namespace.clone(),
        &arguments.console_gateway_url,
        &arguments.identity.clone().unwrap_or_else(default_identity),
    );
    if let Some(namespace) = &arguments.lease_namespace {
        options.lease_namespace.clone_from(namespace);
    }
    options.lease_name.clone_from(&arguments.lease_name);
    options
        .default_storage_class
        .clone_from(&arguments.default_storage_class);
    options.facts_interval = Duration::from_secs(arguments.facts_interval_seconds.max(1));
    options.concurrency = arguments.concurrency;
    options.backups = paddock_operator::backups::BackupSettings {
        concurrency: arguments.backup_concurrency.max(1),
        export_link: arguments.backup_export_link.into(),
        scratch_directory: arguments.backup_scratch_directory.clone(),
        tick: Duration::from_secs(arguments.backup_tick_seconds.max(1)),
    };
    options.lease_timing = LeaseTiming {
        lease_duration: Duration::from_secs(arguments.lease_duration_seconds.max(1)),
        renew_deadline: Duration::from_secs(arguments.renew_deadline_seconds.max(1)),
        retry_period: Duration::from_secs(arguments.retry_period_seconds.max(1)),
    };
    let endpoint = match (&arguments.webhook_service, &arguments.webhook_url) {
        (Some(name), _) => Some(WebhookEndpoint::Service {
            namespace: options.lease_namespace.clone(),
            name: name.clone(),
            port: 443,
        }),
        (None, Some(url)) => Some(WebhookEndpoint::Url(url.clone())),
        (None, None) => None,
    };
    let mut admission_metrics = AdmissionMetrics::default();
    options.metrics = Metrics::new_with(|registry| admission_metrics = AdmissionMetrics::register(registry));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let client = paddock_operator::connect().await?;
        let shutdown = shutdown_signal().shared();
        let webhooks = async {
            let Some(endpoint) = endpoint else {
                return Ok(());
            };
            let mut admission = AdmissionOptions::new(client.clone(), endpoint, &options.lease_namespace);
            admission.listen = arguments.webhook_listen;
            admission
                .configuration_name
                .clone_from(&arguments.webhook_configuration_name);
            admission.failure_policy = match arguments.webhook_failure_policy {
                FailurePolicyFlag::Fail => FailurePolicy::Fail,
                FailurePolicyFlag::Ignore => FailurePolicy::Ignore,
            };
            admission.timeout_seconds = arguments.webhook_timeout_seconds;
            admission.configurations = match arguments.webhook_configurations {
                WebhookConfigurationsFlag::Managed => ConfigurationMode::Managed,
                WebhookConfigurationsFlag::InjectCa => ConfigurationMode::InjectCa,
            };
            admission.metrics = admission_metrics;
            if let Some(namespace) = &options.namespace {
                // A namespace-scoped operator admits only its own namespace.
                admission.namespace_selector.match_labels =
                    Some([("kubernetes.io/metadata.name".to_owned(), namespace.clone())].into());
            }
            paddock_admission::serve(admission, shutdown.clone())
                .await
                .context("the admission webhooks stopped")
        };
        let controllers = async {
            paddock_operator::run(
                client.clone(),
                options.clone(),
                arguments.listen,
                shutdown.clone(),
            )
            .await
            .context("the operator stopped")
        };
        // Either failing stops the process: a replica without its webhooks or its Lease must restart.
        tokio::try_join!(webhooks, controllers)?;
        Ok(())
    })
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    eprintln!("paddock operator: shutting down");
}
