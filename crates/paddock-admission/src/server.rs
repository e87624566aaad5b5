//! The HTTPS server: TLS with a switchable certificate, the webhook routes, health, the certificate
//! rotation loop and the publication of the webhook configurations (whole, or only their CA bundle).
//!
//! `/readyz` (on the webhook port) answers 200 while the server is not shutting down and both webhook
//! configurations exist with every webhook's `caBundle` trusting the CA that signed the certificate
//! this replica serves: a ready replica is one the API server can call.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt as _;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_rustls::TlsAcceptor;

use crate::configuration::{Webhook, webhook_configurations_with_ca};
use crate::metrics::AdmissionMetrics;
use crate::review::{ReviewContext, review};
use crate::tls::{CertificateStore, CertificateSwitch, Material};
use crate::zarf::{ZarfDetector, ZarfState};
use crate::{AdmissionError, AdmissionOptions, ConfigurationMode};

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The field manager of fully managed configurations.
const CONFIGURATION_MANAGER: &str = "paddock-admission";
/// The field manager that only keeps `caBundle` current in configurations owned by something else.
const CA_BUNDLE_MANAGER: &str = "paddock-admission-ca";

#[derive(Clone)]
struct ServerState {
    context: ReviewContext,
    metrics: AdmissionMetrics,
    /// False once shutting down.
    ready: Arc<AtomicBool>,
    /// Whether the webhook configurations trust the CA of the certificate served.
    trusted: Arc<AtomicBool>,
}

async fn handle(State(state): State<ServerState>, webhook: Webhook, body: Bytes) -> Response {
    let started = Instant::now();
    let (response, verdict) = match review(webhook, &body, &state.context) {
        Ok(answer) => (
            ([(header::CONTENT_TYPE, "application/json")], answer.body).into_response(),
            answer.verdict.as_str(),
        ),
        Err(error) => (
            (StatusCode::BAD_REQUEST, error.to_string()).into_response(),
            "malformed",
        ),
    };
    state
        .metrics
        .record(webhook.name(), verdict, started.elapsed().as_secs_f64());
    response
}

/// Bounds the whole request, reading a slow body included.
async fn deadline(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => (
            StatusCode::REQUEST_TIMEOUT,
            "the admission request was not received in time",
        )
            .into_response(),
    }
}

fn router(state: ServerState, body_limit: usize, request_timeout: Duration) -> Router {
    let mut router = Router::new();
    for webhook in Webhook::ALL {
        router = router.route(
            webhook.path(),
            post(move |state: State<ServerState>, body: Bytes| handle(state, webhook, body)),
        );
    }
    router
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(state): State<ServerState>| async move {
                if !state.ready.load(Ordering::Relaxed) {
                    (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
                } else if !state.trusted.load(Ordering::Relaxed) {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the webhook configurations do not trust this server's CA yet",
                    )
                } else {
                    (StatusCode::OK, "ok")
                }
            }),
        )
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(request_timeout, deadline))
        .with_state(state)
}

/// How often the injector re-checks the configurations without a watch event (a safety net for a
/// missed event), and how soon it retries after an error.
const INJECTION_RESYNC: Duration = Duration::from_secs(60);
const INJECTION_RETRY: Duration = Duration::from_secs(2);

/// Publishes the CA bundle: applies the whole configurations ([`ConfigurationMode::Managed`]) or
/// injects it into configurations owned by something else ([`ConfigurationMode::InjectCa`]).
struct Publisher {
    options: AdmissionOptions,
    /// The last bundle fully applied: repeats are skipped, and an injection pass overwrites a
    /// differing `caBundle` only when this replica's bundle changed (see [`Publisher::inject`]).
    last: Mutex<Option<String>>,
    /// The bundle this replica wants published.
    bundle: std::sync::Mutex<String>,
    /// The CA that signed the certificate this replica serves: ready means the API server trusts it.
    serving_ca: std::sync::Mutex<String>,
    /// Whether both configurations exist and every webhook in them trusts [`Publisher::serving_ca`].
    injected: Arc<AtomicBool>,
    /// Wakes the injection loop (a new bundle or a new serving certificate).
    wake: tokio::sync::Notify,
}

/// A webhook's name and its `caBundle` (empty when unset).
type WebhookBundle = (String, Vec<u8>);

/// The name and `caBundle` of every webhook in a configuration.
fn webhook_bundles<W>(webhooks: Option<&Vec<W>>, entry: fn(&W) -> WebhookBundle) -> Vec<WebhookBundle> {
    webhooks
        .map(|webhooks| webhooks.iter().map(entry).collect())
        .unwrap_or_default()
}

fn mutating_bundles(configuration: &MutatingWebhookConfiguration) -> Vec<WebhookBundle> {
    webhook_bundles(configuration.webhooks.as_ref(), |webhook| {
        (
            webhook.name.clone(),
            webhook
                .client_config
                .ca_bundle
                .clone()
                .map(|bundle| bundle.0)
                .unwrap_or_default(),
        )
    })
}

fn validating_bundles(configuration: &ValidatingWebhookConfiguration) -> Vec<WebhookBundle> {
    webhook_bundles(configuration.webhooks.as_ref(), |webhook| {
        (
            webhook.name.clone(),
            webhook
                .client_config
                .ca_bundle
                .clone()
                .map(|bundle| bundle.0)
                .unwrap_or_default(),
        )
    })
}

/// Whether a PEM `bundle` contains the PEM certificate `ca`.
fn bundle_trusts(bundle: &[u8], ca: &str) -> bool {
    let ca = ca.trim().as_bytes();
    !ca.is_empty() && bundle.windows(ca.len()).any(|window| window == ca)
}

/// What an injection pass may overwrite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    /// Every `caBundle` that differs from this replica's bundle (the bundle changed here).
    Overwrite,
    /// Only missing or empty ones (someone reset them). A differing non-empty bundle is another
    /// replica's newer CA during a rotation, which this replica must not take back.
    Repair,
}

/// Injects `bundle` into the configuration `name` of `kind`, owning only the `caBundle` fields.
/// `None` when the configuration does not exist (it is never created); otherwise whether every
/// webhook in it now trusts `serving_ca`.
async fn inject_into<K>(
    api: &Api<K>,
    kind: &str,
    name: &str,
    bundle: &str,
    serving_ca: &str,
    pass: Pass,
    bundles: fn(&K) -> Vec<WebhookBundle>,
) -> Result<Option<bool>, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let Some(live) = api.get_opt(name).await? else {
        return Ok(None);
    };
    let mut webhooks = bundles(&live);
    let stale = webhooks.iter().any(|(_, current)| match pass {
        Pass::Overwrite => current.as_slice() != bundle.as_bytes(),
        Pass::Repair => current.is_empty(),
    });
    if stale {
        // Server-side apply of just the bundle: `webhooks` is a list keyed by `name`, so this
        // apply configuration merges into the owner's entries and owns nothing but `caBundle`. The
        // names come from the live object, so no entry is ever added; a configuration deleted
        // since the read would be created, which the API server refuses (no create permission, and
        // an entry without sideEffects or a service is invalid).
        let encoded = serde_json::to_value(k8s_openapi::ByteString(bundle.as_bytes().to_vec()))
            .map_err(kube::Error::SerdeError)?;
        let apply = serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": kind,
            "metadata": {"name": name},
            "webhooks": webhooks.iter().map(|(webhook, _)| serde_json::json!({
                "name": webhook, "clientConfig": {"caBundle": encoded}
            })).collect::<Vec<_>>(),
        });
        let applied = api
            .patch(
                name,
                &PatchParams::apply(CA_BUNDLE_MANAGER).force(),
                &Patch::Apply(&apply),
            )
            .await?;
        webhooks = bundles(&applied);
        tracing::info!(configuration = %name, %kind, webhooks = webhooks.len(), "injected the webhook CA bundle");
    }
    Ok(Some(
        webhooks
            .iter()
            .all(|(_, current)| bundle_trusts(current, serving_ca)),
    ))
}

impl Publisher {
    fn new(options: AdmissionOptions, material: &Material) -> Publisher {
        Publisher {
            options,
            last: Mutex::new(None),
            bundle: std::sync::Mutex::new(material.ca_bundle()),
            serving_ca: std::sync::Mutex::new(material.ca_certificate.clone()),
            injected: Arc::new(AtomicBool::new(false)),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn error(&self, source: kube::Error) -> AdmissionError {
        AdmissionError::Configuration {
            name: self.options.configuration_name.clone(),
            source: Box::new(source),
        }
    }

    fn set_serving_ca(&self, ca: &str) {
        match self.serving_ca.lock() {
            Ok(mut current) => ca.clone_into(&mut current),
            Err(poisoned) => ca.clone_into(&mut poisoned.into_inner()),
        }
        self.wake.notify_one();
    }

    fn current(mutex: &std::sync::Mutex<String>) -> String {
        match mutex.lock() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    async fn publish(&self, bundle: &str) -> Result<(), AdmissionError> {
        match self.bundle.lock() {
            Ok(mut current) => bundle.clone_into(&mut current),
            Err(poisoned) => bundle.clone_into(&mut poisoned.into_inner()),
        }
        match self.options.configurations {
            ConfigurationMode::Managed => self.apply_whole(bundle).await,
            // Synchronously, so a rotation goes on only once the new CA is published.
            ConfigurationMode::InjectCa => self.inject().await.map(|_| ()),
        }
    }

    /// Applies both whole configurations with `bundle`, as their owner.
    async fn apply_whole(&self, bundle: &str) -> Result<(), AdmissionError> {
        let mut last = self.last.lock().await;
        if last.as_deref() == Some(bundle) {
            return Ok(());
        }
        let (mutating, validating) =
            webhook_configurations_with_ca(&self.options.configuration_options(), Some(bundle.as_bytes()));
        let name = self.options.configuration_name.clone();
        let mutating_api: Api<MutatingWebhookConfiguration> = Api::all(self.options.client.clone());
        let validating_api: Api<ValidatingWebhookConfiguration> = Api::all(self.options.client.clone());
        let params = PatchParams::apply(CONFIGURATION_MANAGER).force();
        let mut mutating =
            serde_json::to_value(&mutating).map_err(|source| self.error(kube::Error::SerdeError(source)))?;
        mutating["apiVersion"] = "admissionregistration.k8s.io/v1".into();
        mutating["kind"] = "MutatingWebhookConfiguration".into();
        let mut validating = serde_json::to_value(&validating)
            .map_err(|source| self.error(kube::Error::SerdeError(source)))?;
        validating["apiVersion"] = "admissionregistration.k8s.io/v1".into();
        validating["kind"] = "ValidatingWebhookConfiguration".into();
        mutating_api
            .patch(&name, &params, &Patch::Apply(&mutating))
            .await
            .map_err(|source| self.error(source))?;
        validating_api
            .patch(&name, &params, &Patch::Apply(&validating))
            .await
            .map_err(|source| self.error(source))?;
        *last = Some(bundle.to_owned());
        self.injected.store(true, Ordering::Relaxed);
        tracing::info!(configuration = %name, "published the webhook CA bundle");
        Ok(())
    }

    /// One injection pass over both configurations; returns whether both exist and trust the
    /// serving CA (also stored in [`Publisher::injected`]).
    async fn inject(&self) -> Result<bool, AdmissionError> {
        let mut last = self.last.lock().await;
        let bundle = Self::current(&self.bundle);
        let serving_ca = Self::current(&self.serving_ca);
        let pass = if last.as_deref() == Some(bundle.as_str()) {
            Pass::Repair
        } else {
            Pass::Overwrite
        };
        let name = &self.options.configuration_name;
        let mutating_api: Api<MutatingWebhookConfiguration> = Api::all(self.options.client.clone());
        let validating_api: Api<ValidatingWebhookConfiguration> = Api::all(self.options.client.clone());
        let outcome = async {
            let mutating = inject_into(
                &mutating_api,
                "MutatingWebhookConfiguration",
                name,
                &bundle,
                &serving_ca,
                pass,
                mutating_bundles,
            )
            .await?;
            let validating = inject_into(
                &validating_api,
                "ValidatingWebhookConfiguration",
                name,
                &bundle,
                &serving_ca,
                pass,
                validating_bundles,
            )
            .await?;
            Ok::<_, kube::Error>((mutating, validating))
        }
        .await;
        let (mutating, validating) = match outcome {
            Ok(found) => found,
            Err(source) => {
                self.injected.store(false, Ordering::Relaxed);
                return Err(self.error(source));
            }
        };
        let trusted = matches!((mutating, validating), (Some(true), Some(true)));
        if mutating.is_some() && validating.is_some() {
            // Both were brought to this bundle: later passes only repair resets.
            *last = Some(bundle);
        }
        let was = self.injected.swap(trusted, Ordering::Relaxed);
        if was != trusted {
            if trusted {
                tracing::info!(configuration = %name, "the webhook configurations trust this replica's CA; ready");
            } else {
                tracing::warn!(
                    configuration = %name,
                    mutating_found = mutating.is_some(),
                    validating_found = validating.is_some(),
                    "the webhook configurations do not (yet) trust this replica's CA; not ready"
                );
            }
        }
        Ok(trusted)
    }
}

/// [`ConfigurationMode::InjectCa`]: re-injects whenever either configuration changes (a watch
/// limited to the one name), when this replica's bundle or certificate changes, and once every
/// [`INJECTION_RESYNC`] in case an event was missed.
async fn keep_injected(publisher: Arc<Publisher>) {
    let fields = format!("metadata.name={}", publisher.options.configuration_name);
    let config = || kube::runtime::watcher::Config::default().fields(&fields);
    let client = publisher.options.client.clone();
    let mutating = kube::runtime::watcher(Api::<MutatingWebhookConfiguration>::all(client.clone()), config())
        .default_backoff()
        .map(|_| ());
    let validating = kube::runtime::watcher(Api::<ValidatingWebhookConfiguration>::all(client), config())
        .default_backoff()
        .map(|_| ());
    let mut changes = std::pin::pin!(futures_util::stream::select(mutating, validating));
    loop {
        let wait = match publisher.inject().await {
            Ok(_) => INJECTION_RESYNC,
            Err(error) => {
                tracing::warn!(%error, "cannot inject the webhook CA bundle; retrying");
                INJECTION_RETRY
            }
        };
        tokio::select! {
            Some(()) = changes.next() => {}
            () = publisher.wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Checks the TLS Secret every interval, renews what is due, publishes the bundle and switches the
/// served certificate: at once when only the serving certificate changed, after
/// [`crate::TlsOptions::ca_propagation_delay`] when it is signed by a CA the bundle did not hold
/// before (whoever rotated it, this replica or another).
async fn rotate(
    store: CertificateStore,
    publisher: Arc<Publisher>,
    switch: Arc<CertificateSwitch>,
    mut material: Material,
) {
    let options = publisher.options.tls.clone();
    let mut interval = tokio::time::interval(options.check_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        interval.tick().await;
        let next = match store.check().await {
            Ok(next) => next,
            Err(error) => {
                tracing::warn!(%error, "cannot check the webhook certificates; retrying");
                continue;
            }
        };
        if let Err(error) = publisher.publish(&next.ca_bundle()).await {
            // Serving a certificate of a CA the API server may not trust yet would fail calls.
            tracing::warn!(%error, "cannot publish the CA bundle; retrying");
            continue;
        }
        if next.serving_certificate == material.serving_certificate {
            continue;
        }
        if next.ca_certificate != material.ca_certificate {
            // The new CA must be trusted before anything it signed is served.
            tokio::time::sleep(options.ca_propagation_delay).await;
        }
        match next.certified_key() {
            Ok(key) => {
                switch.switch(key);
                publisher.set_serving_ca(&next.ca_certificate);
                tracing::info!("switched to a new serving certificate");
                material = next;
            }
            Err(error) => tracing::warn!(%error, "cannot use the new serving certificate"),
        }
    }
}

/// Serves the admission webhooks until `shutdown` resolves, then lets requests in flight finish
/// (within the request timeout).
pub async fn serve(
    options: AdmissionOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdmissionError> {
    if !(1..=30).contains(&options.timeout_seconds) {
        return Err(AdmissionError::Options(format!(
            "timeout_seconds is {}; the API server accepts 1 to 30",
            options.timeout_seconds
        )));
    }
    let store = CertificateStore::new(
        options.client.clone(),
        options.tls.clone(),
        options.endpoint.serving_names(),
    );
    let material = store.load_or_create().await?;
    let publisher = Arc::new(Publisher::new(options.clone(), &material));
    let injection_task = match options.configurations {
        // Without its configurations nothing calls the server: failing here restarts the pod.
        ConfigurationMode::Managed => {
            publisher.publish(&material.ca_bundle()).await?;
            None
        }
        // The chart may create the configurations after the pod starts: wait for them, unready.
        ConfigurationMode::InjectCa => Some(tokio::spawn(keep_injected(Arc::clone(&publisher)))),
    };
    let switch = Arc::new(CertificateSwitch::new(material.certified_key()?));
    let acceptor = TlsAcceptor::from(Arc::new(crate::tls::server_config(Arc::clone(&switch))?));
    let listener = TcpListener::bind(options.listen)
        .await
        .map_err(|source| AdmissionError::Listen {
            address: options.listen,
            source,
        })?;

    let zarf = ZarfState::default();
    let detector = ZarfDetector::new(options.client.clone(), options.zarf.clone(), zarf.clone());
    detector.poll_once().await;
    let detector_task = tokio::spawn(detector.run());
    let rotation_task = tokio::spawn(rotate(store, Arc::clone(&publisher), switch, material));

    let state = ServerState {
        context: ReviewContext {
            zarf,
            host_volume_policy: options.host_volume_policy,
        },
        metrics: options.metrics.clone(),
        ready: Arc::new(AtomicBool::new(true)),
        trusted: Arc::clone(&publisher.injected),
    };
    tracing::info!(address = %options.listen, "serving admission webhooks");
    run_https(
        listener,
        acceptor,
        state,
        options.body_limit,
        options.request_timeout,
        shutdown,
    )
    .await;
    detector_task.abort();
    rotation_task.abort();
    if let Some(task) = injection_task {
        task.abort();
    }
    Ok(())
}

/// What the HTTPS server needs besides its certificate, for [`serve_standalone`].
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// The address to listen on.
    pub listen: SocketAddr,
    /// The longest request body accepted.
    pub body_limit: usize,
    /// The longest time one request may take.
    pub request_timeout: Duration,
    /// Where requests are counted.
    pub metrics: AdmissionMetrics,
}

/// Serves the webhooks with a fixed certificate and context and no Kubernetes at all: no Secret, no
/// configurations, no Zarf polling. For benchmarks and for running the webhooks outside a cluster.
pub async fn serve_standalone(
    http: HttpOptions,
    material: &Material,
    context: ReviewContext,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdmissionError> {
    let switch = Arc::new(CertificateSwitch::new(material.certified_key()?));
    let acceptor = TlsAcceptor::from(Arc::new(crate::tls::server_config(switch)?));
    let listener = TcpListener::bind(http.listen)
        .await
        .map_err(|source| AdmissionError::Listen {
            address: http.listen,
            source,
        })?;
    let state = ServerState {
        context,
        metrics: http.metrics,
        ready: Arc::new(AtomicBool::new(true)),
        trusted: Arc::new(AtomicBool::new(true)),
    };
    run_https(
        listener,
        acceptor,
        state,
        http.body_limit,
        http.request_timeout,
        shutdown,
    )
    .await;
    Ok(())
}

/// Accepts TLS connections until `shutdown`, then drains them within the request timeout.
async fn run_https(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: ServerState,
    body_limit: usize,
    request_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let ready = Arc::clone(&state.ready);
    let service = TowerToHyperService::new(router(state, body_limit, request_timeout));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(request_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();

    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Latency matters more than batching for small admission messages.
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = service.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await else {
                return;
            };
            let connection = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%error, "admission connection ended with an error");
            }
        });
    }

    ready.store(false, Ordering::Relaxed);
    drop(listener);
    let drain = request_timeout + Duration::from_secs(1);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!("admission connections still open after {drain:?}; closing them");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::TlsOptions;

    #[test]
    fn a_bundle_trusts_exactly_the_cas_it_holds() {
        let options = TlsOptions::new("test");
        let names = ["localhost".to_owned()];
        let first = Material::generate(&options, &names).unwrap();
        let second = Material::generate(&options, &names).unwrap();
        let both = format!("{}{}", second.ca_certificate, first.ca_certificate);
        assert!(bundle_trusts(both.as_bytes(), &first.ca_certificate));
        assert!(bundle_trusts(both.as_bytes(), &second.ca_certificate));
        assert!(!bundle_trusts(
            second.ca_certificate.as_bytes(),
            &first.ca_certificate
        ));
        // An unset caBundle (what a reset leaves) trusts nothing, and nothing trusts an empty CA.
        assert!(!bundle_trusts(b"", &first.ca_certificate));
        assert!(!bundle_trusts(both.as_bytes(), "  \n"));
    }
}
