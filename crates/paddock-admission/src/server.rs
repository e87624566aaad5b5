//! The HTTPS server: TLS with a switchable certificate, the webhook routes, health, the certificate
//! rotation loop and the publication of the webhook configurations.

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
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use kube::api::{Api, Patch, PatchParams};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_rustls::TlsAcceptor;

use crate::configuration::{Webhook, webhook_configurations_with_ca};
use crate::metrics::AdmissionMetrics;
use crate::review::{ReviewContext, review};
use crate::tls::{CertificateStore, CertificateSwitch, Material};
use crate::zarf::{ZarfDetector, ZarfState};
use crate::{AdmissionError, AdmissionOptions};

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
    ready: Arc<AtomicBool>,
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
                if state.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
                }
            }),
        )
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(request_timeout, deadline))
        .with_state(state)
}

/// Applies the webhook configurations (or only their `caBundle`), skipping repeats of the last bundle.
struct Publisher {
    options: AdmissionOptions,
    last: Mutex<Option<String>>,
}

impl Publisher {
    async fn publish(&self, bundle: &str) -> Result<(), AdmissionError> {
        let mut last = self.last.lock().await;
        if last.as_deref() == Some(bundle) {
            return Ok(());
        }
        let (mutating, validating) = webhook_configurations_with_ca(&self.options, Some(bundle.as_bytes()));
        let name = self.options.configuration_name.clone();
        let error = |source| AdmissionError::Configuration {
            name: name.clone(),
            source: Box::new(source),
        };
        let mutating_api: Api<MutatingWebhookConfiguration> = Api::all(self.options.client.clone());
        let validating_api: Api<ValidatingWebhookConfiguration> = Api::all(self.options.client.clone());
        if self.options.manage_configurations {
            let params = PatchParams::apply(CONFIGURATION_MANAGER).force();
            let mut mutating =
                serde_json::to_value(&mutating).map_err(|source| error(kube::Error::SerdeError(source)))?;
            mutating["apiVersion"] = "admissionregistration.k8s.io/v1".into();
            mutating["kind"] = "MutatingWebhookConfiguration".into();
            let mut validating =
                serde_json::to_value(&validating).map_err(|source| error(kube::Error::SerdeError(source)))?;
            validating["apiVersion"] = "admissionregistration.k8s.io/v1".into();
            validating["kind"] = "ValidatingWebhookConfiguration".into();
            mutating_api
                .patch(&name, &params, &Patch::Apply(&mutating))
                .await
                .map_err(error)?;
            validating_api
                .patch(&name, &params, &Patch::Apply(&validating))
                .await
                .map_err(error)?;
        } else {
            // Only the bundle: the webhooks list is keyed by name, so this apply owns nothing else.
            let params = PatchParams::apply(CA_BUNDLE_MANAGER).force();
            let encoded = serde_json::to_value(k8s_openapi::ByteString(bundle.as_bytes().to_vec()))
                .map_err(|source| error(kube::Error::SerdeError(source)))?;
            let only_bundle = |kind: &str, names: Vec<String>| {
                serde_json::json!({
                    "apiVersion": "admissionregistration.k8s.io/v1",
                    "kind": kind,
                    "metadata": {"name": name},
                    "webhooks": names.iter().map(|webhook| serde_json::json!({
                        "name": webhook, "clientConfig": {"caBundle": encoded}
                    })).collect::<Vec<_>>(),
                })
            };
            let mutating_names = mutating
                .webhooks
                .unwrap_or_default()
                .into_iter()
                .map(|webhook| webhook.name)
                .collect();
            let validating_names = validating
                .webhooks
                .unwrap_or_default()
                .into_iter()
                .map(|webhook| webhook.name)
                .collect();
            mutating_api
                .patch(
                    &name,
                    &params,
                    &Patch::Apply(&only_bundle("MutatingWebhookConfiguration", mutating_names)),
                )
                .await
                .map_err(error)?;
            validating_api
                .patch(
                    &name,
                    &params,
                    &Patch::Apply(&only_bundle("ValidatingWebhookConfiguration", validating_names)),
                )
                .await
                .map_err(error)?;
        }
        *last = Some(bundle.to_owned());
        tracing::info!(configuration = %name, "published the webhook CA bundle");
        Ok(())
    }
}

/// Checks the TLS Secret every interval, rotates what is due, publishes the bundle and switches the
/// served certificate.
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
        let checked = match store.check().await {
            Ok(checked) => checked,
            Err(error) => {
                tracing::warn!(%error, "cannot check the webhook certificates; retrying");
                continue;
            }
        };
        let mut next = checked.material.clone();
        if let Some(rotated) = checked.pending_ca {
            // The new CA must be trusted before anything it signed is served.
            if let Err(error) = publisher.publish(&rotated.ca_bundle()).await {
                tracing::warn!(%error, "cannot publish the new CA; the rotation is retried");
                continue;
            }
            tokio::time::sleep(options.ca_propagation_delay).await;
            match store.finish_ca_rotation(&checked.material, rotated).await {
                Ok(stored) => {
                    tracing::info!("rotated the webhook CA");
                    next = stored;
                }
                Err(error) => tracing::warn!(%error, "cannot store the new CA; the rotation is retried"),
            }
        }
        if let Err(error) = publisher.publish(&next.ca_bundle()).await {
            tracing::warn!(%error, "cannot publish the CA bundle; retrying");
        }
        if next.serving_certificate != material.serving_certificate {
            match next.certified_key() {
                Ok(key) => {
                    switch.switch(key);
                    tracing::info!("switched to a new serving certificate");
                    material = next;
                }
                Err(error) => tracing::warn!(%error, "cannot use the new serving certificate"),
            }
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
    let publisher = Arc::new(Publisher {
        options: options.clone(),
        last: Mutex::new(None),
    });
    publisher.publish(&material.ca_bundle()).await?;
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
