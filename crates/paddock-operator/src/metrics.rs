//! Prometheus metrics of the operator, served at `/metrics` in the OpenMetrics text format.
//!
//! Contract:
//! - `paddock_operator_reconciles_total{controller,result}` (`result`: `ok` or `error`);
//! - `paddock_operator_reconcile_duration_seconds{controller}` (histogram);
//! - `paddock_operator_reconcile_errors_total{controller,category}` (`category`: `kubernetes`
//!   for API errors, `conflict` for server-side apply conflicts, `invalid` for specs that cannot be
//!   built, `serialization`);
//! - `paddock_operator_queue_depth{controller}`: objects whose reconcile is running or waiting for a
//!   retry after an error. kube-runtime's scheduler does not expose its queue, so objects triggered
//!   but not yet started are not counted; a growing value still shows a controller falling behind;
//! - `paddock_operator_writes_total{kind,operation}`: every request that writes to the API server
//!   (`operation`: `apply`, `create`, `delete`, `status`, `event`), so "an unchanged app costs no
//!   writes" can be checked from outside;
//! - `paddock_operator_applies_skipped_total{kind}`: children found as desired in the cache, so not
//!   applied ([`crate::drift`]);
//! - `paddock_operator_leader` (1 while this replica leads).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::encode`]'s output.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    controller: String,
    result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    kind: String,
    operation: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    controller: String,
    category: String,
}

/// The operator's metrics; clones share the same series.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    reconciles: Family<ResultLabels, Counter>,
    durations: Family<ControllerLabels, Histogram>,
    errors: Family<ErrorLabels, Counter>,
    queue_depth: Family<ControllerLabels, Gauge>,
    writes: Family<WriteLabels, Counter>,
    skipped: Family<KindLabels, Counter>,
    leader: Gauge,
    backups: Family<BackupLabels, Counter>,
    backup_durations: Family<BackupLabels, Histogram>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackupLabels {
    result: String,
}

fn backup_histogram() -> Histogram {
    Histogram::new([
        1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0,
    ])
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
}

impl Metrics {
    /// Empty metrics, registered.
    pub fn new() -> Metrics {
        Metrics::new_with(|_| ())
    }

    /// Empty metrics, registered, with `register` adding other series (the admission webhooks') to
    /// the same registry, so one `/metrics` serves them all.
    pub fn new_with(register: impl FnOnce(&mut Registry)) -> Metrics {
        let mut registry = Registry::default();
        register(&mut registry);
        let reconciles = Family::<ResultLabels, Counter>::default();
        let durations = Family::<ControllerLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        let queue_depth = Family::<ControllerLabels, Gauge>::default();
        let writes = Family::<WriteLabels, Counter>::default();
        let skipped = Family::<KindLabels, Counter>::default();
        let leader = Gauge::default();
        let backups = Family::<BackupLabels, Counter>::default();
        let backup_durations =
            Family::<BackupLabels, Histogram>::new_with_constructor(backup_histogram as fn() -> Histogram);
        registry.register(
            "paddock_operator_backups",
            "Scheduled and requested backups by result (succeeded, failed)",
            backups.clone(),
        );
        registry.register(
            "paddock_operator_backup_duration_seconds",
            "How long backups take (snapshot, export, download, push), by result",
            backup_durations.clone(),
        );
        registry.register(
            "paddock_operator_reconciles",
            "Reconciles by controller and result",
            reconciles.clone(),
        );
        registry.register(
            "paddock_operator_reconcile_duration_seconds",
            "How long reconciles take, by controller",
            durations.clone(),
        );
        registry.register(
            "paddock_operator_reconcile_errors",
            "Failed reconciles by controller and error category",
            errors.clone(),
        );
        registry.register(
            "paddock_operator_queue_depth",
            "Objects being reconciled or waiting for a retry, by controller",
            queue_depth.clone(),
        );
        registry.register(
            "paddock_operator_writes",
            "Requests that write to the API server, by kind and operation",
            writes.clone(),
        );
        registry.register(
            "paddock_operator_applies_skipped",
            "Children found as desired in the cache and not applied, by kind",
            skipped.clone(),
        );
        registry.register(
            "paddock_operator_leader",
            "1 while this replica is the leader",
            leader.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            reconciles,
            durations,
            errors,
            queue_depth,
            writes,
            skipped,
            leader,
            backups,
            backup_durations,
        }
    }

    /// A backup ended with `result` (`succeeded` or `failed`) after `elapsed`.
    pub fn backup_finished(&self, result: &str, elapsed: Duration) {
        let labels = BackupLabels {
            result: result.to_owned(),
        };
        self.backups.get_or_create(&labels).inc();
        self.backup_durations
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// A reconcile of `controller` ended after `elapsed`; `error_category` is set when it failed.
    pub fn reconcile_finished(&self, controller: &str, elapsed: Duration, error_category: Option<&str>) {
        let labels = ControllerLabels {
            controller: controller.to_owned(),
        };
        self.durations
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        self.reconciles
            .get_or_create(&ResultLabels {
                controller: controller.to_owned(),
                result: if error_category.is_some() { "error" } else { "ok" }.to_owned(),
            })
            .inc();
        if let Some(category) = error_category {
            self.errors
                .get_or_create(&ErrorLabels {
                    controller: controller.to_owned(),
                    category: category.to_owned(),
                })
                .inc();
        }
    }

    /// Sets the number of objects of `controller` being reconciled or waiting for a retry.
    pub fn set_queue_depth(&self, controller: &str, depth: usize) {
        self.queue_depth
            .get_or_create(&ControllerLabels {
                controller: controller.to_owned(),
            })
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    /// A request that writes `kind` (`operation`: `apply`, `create`, `delete`, `status`, `event`) was sent.
    pub fn wrote(&self, kind: &str, operation: &str) {
        self.writes
            .get_or_create(&WriteLabels {
                kind: kind.to_owned(),
                operation: operation.to_owned(),
            })
            .inc();
    }

    /// A `kind` child was found as desired and not applied.
    pub fn skipped_apply(&self, kind: &str) {
        self.skipped
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}
