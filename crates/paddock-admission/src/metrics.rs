//! Admission metrics, registered in the operator's prometheus-client registry.
//!
//! Contract: [`AdmissionMetrics::register`] adds the families to the caller's
//! [`prometheus_client::registry::Registry`] (the operator serves it on `/metrics` with its own
//! metrics); an [`AdmissionMetrics::default`] that was never registered records into families nobody
//! exports, which is what tests and benchmarks without a registry get. Cloning shares the families.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The labels of a request count: which webhook and what the answer was.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The webhook's name, e.g. `virtualmachineapps.validate.paddock.dev`.
    pub webhook: String,
    /// `allowed`, `patched`, `denied` or `malformed` (a request cut by the request timeout is not
    /// counted: it never reached a webhook).
    pub verdict: String,
}

/// The label of a latency histogram: which webhook.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabel {
    /// The webhook's name.
    pub webhook: String,
}

/// Builds histograms with buckets from 50 µs to about 1.6 s: admission answers are expected in
/// microseconds, and the API server gives up after the timeout anyway.
#[derive(Clone, Copy, Debug, Default)]
pub struct LatencyBuckets;

impl MetricConstructor<Histogram> for LatencyBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
    }
}

/// The admission metrics.
#[derive(Clone, Debug)]
pub struct AdmissionMetrics {
    requests: Family<RequestLabels, Counter>,
    durations: Family<WebhookLabel, Histogram, LatencyBuckets>,
}

impl Default for AdmissionMetrics {
    fn default() -> Self {
        AdmissionMetrics {
            requests: Family::default(),
            durations: Family::new_with_constructor(LatencyBuckets),
        }
    }
}

impl AdmissionMetrics {
    /// New families, registered in `registry` as `paddock_admission_requests_total{webhook,verdict}`
    /// and `paddock_admission_request_duration_seconds{webhook}`.
    pub fn register(registry: &mut Registry) -> AdmissionMetrics {
        let metrics = AdmissionMetrics::default();
        let sub_registry = registry.sub_registry_with_prefix("paddock_admission");
        sub_registry.register(
            "requests",
            "Admission requests answered, by webhook and verdict",
            metrics.requests.clone(),
        );
        sub_registry.register_with_unit(
            "request_duration",
            "Time from receiving an admission request to answering it, by webhook",
            prometheus_client::registry::Unit::Seconds,
            metrics.durations.clone(),
        );
        metrics
    }

    /// Records one answered request.
    pub fn record(&self, webhook: &str, verdict: &str, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                webhook: webhook.to_owned(),
                verdict: verdict.to_owned(),
            })
            .inc();
        self.durations
            .get_or_create(&WebhookLabel {
                webhook: webhook.to_owned(),
            })
            .observe(seconds);
    }

    /// How many requests `webhook` answered with `verdict` so far.
    pub fn count(&self, webhook: &str, verdict: &str) -> u64 {
        self.requests
            .get_or_create(&RequestLabels {
                webhook: webhook.to_owned(),
                verdict: verdict.to_owned(),
            })
            .get()
    }
}
