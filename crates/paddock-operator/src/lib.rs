//! The paddock operator: turns VirtualMachineApps into CDI DataVolumes, KubeVirt VirtualMachines,
//! SSH-key Secrets and BafflesApplications, takes scheduled snapshots and backups, and lists annotated
//! plain VMs in Baffles.
//!
//! Role: the in-cluster half of paddock. [`run`] is the whole runtime: probes and metrics on every
//! replica, Lease-based leader election, and on the leader two kube-runtime controllers
//! ([`app_controller`], [`console_controller`]) fed by shared reflectors (one watch per kind, its
//! store read by both controllers), with a coalescing work queue and per-object exponential backoff,
//! and the backup scheduler ([`backups`]) over the VirtualMachineApp cache.
//!
//! Contract:
//! - every object paddock writes is server-side applied under the field manager `paddock`, with a
//!   controller owner reference (children disappear with their owner by garbage collection);
//! - a reconcile writes only what differs: a child is applied only when the reflector's copy is
//!   missing, was applied from another desired object or drifted ([`drift`]), the status only when
//!   it changed, Events only for transitions; so reconciles of unchanged apps (resyncs, restarts,
//!   the events of the operator's own writes) cost no writes. `paddock_operator_writes_total` counts
//!   every write request;
//! - the caches hold objects without `metadata.managedFields`, which nothing here reads;
//! - `/healthz` answers 200 while the process runs; `/readyz` answers 200 once this replica is a
//!   standby candidate or, when leading, once every cache has synced; `/metrics` is OpenMetrics
//!   ([`metrics`]);
//! - the shutdown future (SIGTERM in the binary) stops the controllers gracefully (running reconciles
//!   finish), releases the Lease and returns `Ok(())`; losing the Lease returns
//!   [`Error::Leader`] so the process restarts as a candidate.

pub mod app_controller;
pub mod backups;
pub mod console_controller;
pub mod drift;
pub mod facts;
pub mod leader;
pub mod metrics;
pub mod snapshots;
pub mod status;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};
use std::time::Duration;

use futures_util::{FutureExt as _, StreamExt as _, future};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client, Resource,
    runtime::{
        Controller, WatchStreamExt as _,
        controller::{self, Action},
        events::{Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use paddock_api::{
    app::VirtualMachineApp,
    baffles::BafflesApplication,
    builders::{BuildError, ClusterFacts, MANAGED_BY_LABEL, MANAGER},
    cdi::datavolume::DataVolume,
    kubevirt::{virtualmachine::VirtualMachine, virtualmachinesnapshot::VirtualMachineSnapshot},
};
use tokio::sync::watch;

pub use leader::LeaseTiming;
pub use metrics::Metrics;

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Watch only this namespace (`None`: every namespace).
    pub namespace: Option<String>,
    /// The base URL through which Baffles reaches VNC consoles (the paddock console gateway).
    pub console_gateway_url: String,
    /// The StorageClass for disks whose app names none (`None`: the cluster's default).
    pub default_storage_class: Option<String>,
    /// How often cluster facts (Zarf, the Baffles CRD) are rediscovered.
    pub facts_interval: Duration,
    /// The namespace of the leader Lease.
    pub lease_namespace: String,
    /// The name of the leader Lease.
    pub lease_name: String,
    /// This replica's identity in the Lease (the pod name in a cluster).
    pub identity: String,
    /// Lease timing.
    pub lease_timing: LeaseTiming,
    /// How many objects each controller reconciles at once.
    pub concurrency: u16,
    /// Where metrics are recorded; `/metrics` serves its registry.
    pub metrics: Metrics,
    /// How scheduled backups run.
    pub backups: backups::BackupSettings,
}

impl Options {
    /// Options with paddock's defaults for everything but the namespace, gateway and identity.
    pub fn new(namespace: Option<String>, console_gateway_url: &str, identity: &str) -> Options {
        Options {
            lease_namespace: namespace.clone().unwrap_or_else(|| "paddock-system".to_owned()),
            namespace,
            console_gateway_url: console_gateway_url.to_owned(),
            default_storage_class: None,
            facts_interval: Duration::from_secs(60),
            lease_name: "paddock-operator".to_owned(),
            identity: identity.to_owned(),
            lease_timing: LeaseTiming::default(),
            concurrency: 16,
            metrics: Metrics::new(),
            backups: backups::BackupSettings::default(),
        }
    }
}

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No Kubernetes client configuration was found or it does not work.
    #[error("cannot configure a Kubernetes client (in-cluster service account or KUBECONFIG): {0}")]
    Connect(kube::Error),
    /// The probe and metrics server cannot listen.
    #[error(
        "cannot listen on {address} for /healthz, /readyz and /metrics: {source}; choose another --listen address"
    )]
    Listen {
        /// The address.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Leadership was lost.
    #[error(transparent)]
    Leader(#[from] leader::LeaderError),
}

/// Why one reconcile failed (retried with per-object backoff).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The object has no namespace (it was not read from the API server).
    #[error("the object has no namespace or uid; it was not read from the API server")]
    MissingNamespace,
    /// The desired objects cannot be built.
    #[error(transparent)]
    Build(BuildError),
    /// Server-side apply of a child failed.
    #[error("cannot apply {kind} {name}: {source}")]
    Apply {
        /// The child's kind.
        kind: String,
        /// The child's name.
        name: String,
        /// The API server's answer.
        source: kube::Error,
    },
    /// Deleting a child failed.
    #[error("cannot delete {kind} {name}: {source}")]
    Delete {
        /// The child's kind.
        kind: String,
        /// The child's name.
        name: String,
        /// The API server's answer.
        source: kube::Error,
    },
    /// Writing the status failed.
    #[error("cannot write the VirtualMachineApp status: {0}")]
    Status(kube::Error),
}

impl ReconcileError {
    /// The error category in metrics.
    pub fn category(&self) -> &'static str {
        let source = match self {
            ReconcileError::MissingNamespace | ReconcileError::Build(_) => return "invalid",
            ReconcileError::Apply { source, .. }
            | ReconcileError::Delete { source, .. }
            | ReconcileError::Status(source) => source,
        };
        match source {
            kube::Error::Api(status) if status.code == 409 => "conflict",
            kube::Error::SerdeError(_) => "serialization",
            _ => "kubernetes",
        }
    }
}

/// Tracks what `paddock_operator_queue_depth` and the per-object backoff need: reconciles running and
/// objects failing (with their consecutive failure count).
#[derive(Default)]
pub(crate) struct QueueTracker {
    running: Mutex<HashMap<&'static str, HashSet<ObjectRef<kube::api::DynamicObject>>>>,
    failing: Mutex<HashMap<ObjectRef<kube::api::DynamicObject>, u32>>,
}

impl QueueTracker {
    fn depth(&self, controller: &'static str) -> usize {
        let running = self
            .running
            .lock()
            .map(|running| running.get(controller).map_or(0, HashSet::len))
            .unwrap_or(0);
        let failing = self
            .failing
            .lock()
            .map(|failing| {
                failing
                    .keys()
                    .filter(|key| key_controller(key) == controller)
                    .count()
            })
            .unwrap_or(0);
        running + failing
    }

    pub(crate) fn started(
        &self,
        controller: &'static str,
        key: &ObjectRef<kube::api::DynamicObject>,
        metrics: &Metrics,
    ) {
        if let Ok(mut running) = self.running.lock() {
            running.entry(controller).or_default().insert(key.clone());
        }
        metrics.set_queue_depth(controller, self.depth(controller));
    }

    pub(crate) fn finished(
        &self,
        controller: &'static str,
        key: &ObjectRef<kube::api::DynamicObject>,
        ok: bool,
        metrics: &Metrics,
    ) {
        if let Ok(mut running) = self.running.lock() {
            running.entry(controller).or_default().remove(key);
        }
        if let Ok(mut failing) = self.failing.lock() {
            if ok {
                failing.remove(key);
            } else {
                *failing.entry(key.clone()).or_default() += 1;
            }
        }
        metrics.set_queue_depth(controller, self.depth(controller));
    }

    /// Exponential backoff for the object's consecutive failures: 1 s, 2 s, 4 s, … up to 5 minutes.
    fn backoff(&self, key: &ObjectRef<kube::api::DynamicObject>) -> Duration {
        let failures = self
            .failing
            .lock()
            .map(|failing| failing.get(key).copied().unwrap_or(1))
            .unwrap_or(1);
        let seconds = 1_u64 << failures.saturating_sub(1).min(9);
        Duration::from_secs(seconds.min(300))
    }
}

fn key_controller(key: &ObjectRef<kube::api::DynamicObject>) -> &'static str {
    if key.dyntype.kind == "VirtualMachine" {
        console_controller::CONTROLLER
    } else {
        app_controller::CONTROLLER
    }
}

/// What reconciles share.
pub struct Context {
    client: Client,
    facts: watch::Receiver<ClusterFacts>,
    data_volumes: Store<DataVolume>,
    virtual_machines: Store<VirtualMachine>,
    secrets: Store<Secret>,
    baffles: Store<BafflesApplication>,
    snapshots: Store<VirtualMachineSnapshot>,
    recorder: Recorder,
    metrics: Metrics,
    queue: QueueTracker,
    written_statuses: app_controller::WrittenStatuses,
    /// Turns true once the children's caches are filled (or waiting for them timed out).
    children_synced: watch::Receiver<bool>,
}

/// Runs one reconcile with the bookkeeping every controller shares: the queue tracker, the reconcile
/// metrics (duration, error category) and a warning when it fails (the error policy retries it).
async fn observed<K: Resource<DynamicType = ()>>(
    controller: &'static str,
    object: &K,
    context: &Context,
    reconcile: impl Future<Output = Result<Action, ReconcileError>>,
) -> Result<Action, ReconcileError> {
    let started = std::time::Instant::now();
    let key = ObjectRef::from_obj(object).erase();
    context.queue.started(controller, &key, &context.metrics);
    let outcome = reconcile.await;
    context.metrics.reconcile_finished(
        controller,
        started.elapsed(),
        outcome.as_ref().err().map(ReconcileError::category),
    );
    context
        .queue
        .finished(controller, &key, outcome.is_ok(), &context.metrics);
    if let Err(error) = &outcome {
        tracing::warn!(%error, "reconcile failed; retrying with backoff");
    }
    outcome
}

fn error_policy<K: Resource<DynamicType = ()>>(
    object: Arc<K>,
    _error: &ReconcileError,
    context: Arc<Context>,
) -> Action {
    Action::requeue(
        context
            .queue
            .backoff(&ObjectRef::from_obj(object.as_ref()).erase()),
    )
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// Shared state of the probe endpoints.
#[derive(Clone)]
struct Probes {
    ready: Arc<AtomicBool>,
    metrics: Metrics,
}

async fn serve_probes(listener: tokio::net::TcpListener, probes: Probes) {
    use axum::{Router, http::StatusCode, http::header, routing::get};
    let ready = probes.ready.clone();
    let metrics = probes.metrics.clone();
    let router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "caches are syncing")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = metrics.encode();
                async move {
                    match text {
                        Ok(text) => (
                            StatusCode::OK,
                            [(header::CONTENT_TYPE, metrics::OPENMETRICS_CONTENT_TYPE)],
                            text,
                        ),
                        Err(_) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            [(header::CONTENT_TYPE, "text/plain")],
                            "cannot encode metrics".to_owned(),
                        ),
                    }
                }
            }),
        );
    if let Err(error) = axum::serve(listener, router).await {
        tracing::error!(%error, "the probe server stopped");
    }
}

/// A client from the in-cluster service account or `KUBECONFIG`/`~/.kube/config`.
pub async fn connect() -> Result<Client, Error> {
    Client::try_default().await.map_err(Error::Connect)
}

/// Binds `address` for the probes and metrics, then runs as [`run_with_listener`].
pub async fn run(
    client: Client,
    options: Options,
    address: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| Error::Listen { address, source })?;
    run_with_listener(client, options, listener, shutdown).await
}

/// Runs the operator until `shutdown` completes (then returns `Ok`) or leadership is lost.
pub async fn run_with_listener(
    client: Client,
    options: Options,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let probes = Probes {
        ready: Arc::default(),
        metrics: options.metrics.clone(),
    };
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "serving /healthz, /readyz and /metrics");
    }
    let probe_server = tokio::spawn(serve_probes(listener, probes.clone()));
    let shutdown = shutdown.shared();
    // Standby replicas are ready: they have nothing to sync (and serve webhooks when wired in).
    probes.ready.store(true, Ordering::Relaxed);

    let elector = leader::LeaderElector::new(
        client.clone(),
        &options.lease_namespace,
        &options.lease_name,
        &options.identity,
        options.lease_timing.clone(),
    );
    tokio::select! {
        () = elector.acquire() => {}
        () = shutdown.clone() => {
            probe_server.abort();
            return Ok(());
        }
    }
    probes.metrics.set_leader(true);
    probes.ready.store(false, Ordering::Relaxed);

    let (stop_sender, stop_receiver) = watch::channel(false);
    let stop = {
        let mut receiver = stop_receiver.clone();
        async move {
            let _ = receiver.wait_for(|stop| *stop).await;
        }
        .shared()
    };
    let controllers = tokio::spawn(run_controllers(client, options, probes.clone(), stop));
    let outcome = tokio::select! {
        lost = elector.keep() => Err(Error::Leader(lost)),
        () = shutdown.clone() => Ok(()),
    };
    tracing::info!("stopping the controllers");
    let _ = stop_sender.send(true);
    // Running reconciles finish (bounded: after a lost Lease another replica may already act, so
    // only briefly); the controllers then stop their watches themselves.
    let grace = if outcome.is_ok() {
        SHUTDOWN_GRACE
    } else {
        Duration::from_secs(2)
    };
    let controllers_abort = controllers.abort_handle();
    if tokio::time::timeout(grace, controllers).await.is_err() {
        tracing::warn!(?grace, "reconciles did not finish in time; abandoning them");
        controllers_abort.abort();
    }
    if outcome.is_ok() {
        // Hand the Lease over at once instead of letting it expire.
        elector.release().await;
    }
    probes.metrics.set_leader(false);
    probe_server.abort();
    outcome
}

/// Aborts its task when dropped, so the helper tasks of the controllers end with them, also when the
/// controllers' own task is aborted.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The first complete list of each tracked reflector cache, as its watch stream reports it.
#[derive(Clone, Default)]
struct CacheSync {
    tracked: Arc<Mutex<Vec<TrackedCache>>>,
}

/// A tracked cache's resource and whether its first list is complete.
type TrackedCache = (&'static str, watch::Receiver<bool>);

impl CacheSync {
    /// Tracks `resource`: the returned observer of its watch stream marks it synced at the first
    /// `InitDone` and logs watch errors.
    fn observer<K>(
        &self,
        resource: &'static str,
    ) -> impl FnMut(&Result<watcher::Event<K>, watcher::Error>) + use<K> {
        let (sender, receiver) = watch::channel(false);
        if let Ok(mut tracked) = self.tracked.lock() {
            tracked.push((resource, receiver));
        }
        let mut observe = watch_error_logger(resource);
        move |event| {
            if let Ok(watcher::Event::InitDone) = event {
                sender.send_replace(true);
            }
            observe(event);
        }
    }

    /// [`CacheSync::observer`] as a `for_each` step that ends a reflector stream's pipeline.
    fn track<K>(
        &self,
        resource: &'static str,
    ) -> impl FnMut(Result<watcher::Event<K>, watcher::Error>) -> future::Ready<()> + use<K> {
        let mut observe = self.observer(resource);
        move |event| {
            observe(&event);
            future::ready(())
        }
    }

    /// Waits until the tracked caches named in `resources` have synced; warns, naming the
    /// resource, while one takes longer than [`SYNC_WARNING_AFTER`], so a stuck watch shows in the
    /// log, not only as an unready pod. Returns early when a watch stream ended (the controllers
    /// are stopping).
    async fn wait_for(&self, resources: &[&'static str]) {
        let receivers: Vec<_> = match self.tracked.lock() {
            Ok(tracked) => tracked
                .iter()
                .filter(|(resource, _)| resources.contains(resource))
                .cloned()
                .collect(),
            Err(_) => return,
        };
        for (resource, mut receiver) in receivers {
            loop {
                match tokio::time::timeout(SYNC_WARNING_AFTER, receiver.wait_for(|synced| *synced)).await {
                    Ok(Ok(_)) => break,
                    Ok(Err(_)) => return,
                    Err(_) => tracing::warn!(resource, "cache not synced yet; is the watch failing?"),
                }
            }
            tracing::debug!(resource, "cache synced");
        }
    }
}

/// Sends the owning VirtualMachineApp of every deleted child to the app controller. The shared
/// reflector streams dispatch no deletions to the controllers that own them, so without this a
/// deleted child would be re-created only at the next periodic reconcile.
fn owner_of_deleted_child<K: Resource>(
    sender: tokio::sync::mpsc::UnboundedSender<ObjectRef<VirtualMachineApp>>,
) -> impl FnMut(&Result<watcher::Event<K>, watcher::Error>) {
    move |event| {
        let Ok(watcher::Event::Delete(child)) = event else {
            return;
        };
        let metadata = child.meta();
        let owner = metadata.owner_references.iter().flatten().find(|owner| {
            owner.controller == Some(true)
                && owner.kind == VirtualMachineApp::kind(&())
                && owner.api_version == VirtualMachineApp::api_version(&())
        });
        if let (Some(owner), Some(namespace)) = (owner, &metadata.namespace) {
            let _ = sender.send(ObjectRef::new(&owner.name).within(namespace));
        }
    }
}

/// Logs a reflector stream's watch errors (the watcher retries them with backoff; without this a
/// failing watch would be silent).
fn watch_error_logger<K>(resource: &'static str) -> impl FnMut(&Result<watcher::Event<K>, watcher::Error>) {
    move |event| {
        if let Err(error) = event {
            tracing::warn!(resource, %error, "watch failed; retrying with backoff");
        }
    }
}

/// How long a cache may take to sync before [`CacheSync::wait_for`] warns.
const SYNC_WARNING_AFTER: Duration = Duration::from_secs(15);

/// How long app reconciles wait for the children's caches before they run anyway.
const CHILD_CACHE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a graceful shutdown waits for running reconciles.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Drops `metadata.managedFields` before an object enters a cache: nothing here reads them, and they
/// are often the largest part of a small object (every manager's field set, for every child).
fn without_managed_fields<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// Objects per page of a watch's initial list. kube-runtime's default (500) holds a whole page's
/// response body and its decoded objects at once, for each of the six caches listing together at
/// start; with 2,000 apps that put the restart's RSS peak 20 MiB above the steady state. Smaller
/// pages cost a few more list requests at start and nothing afterwards.
const LIST_PAGE_SIZE: u32 = 100;

/// Every object of a kind.
fn listed() -> watcher::Config {
    watcher::Config::default().page_size(LIST_PAGE_SIZE)
}

/// The objects paddock manages (its label).
fn managed() -> watcher::Config {
    listed().labels(&format!("{MANAGED_BY_LABEL}={MANAGER}"))
}

async fn run_controllers(
    client: Client,
    options: Options,
    probes: Probes,
    stop: impl Future<Output = ()> + Send + Sync + Clone + 'static,
) {
    let namespace = options.namespace.as_deref();
    let initial = facts::discover(
        &client,
        &options.console_gateway_url,
        &ClusterFacts {
            default_storage_class: options.default_storage_class.clone(),
            ..ClusterFacts::default()
        },
    )
    .await;
    tracing::info!(
        zarf = initial.zarf.is_some(),
        baffles = initial.baffles_installed,
        "discovered cluster facts"
    );
    let (facts_sender, facts_receiver) = watch::channel(initial);
    let _facts_task = AbortOnDrop(tokio::spawn(facts::run(
        client.clone(),
        options.console_gateway_url.clone(),
        options.facts_interval,
        facts_sender,
    )));

    const BUFFER: usize = 1024;
    let (data_volumes, dv_writer) = reflector::store_shared::<DataVolume>(BUFFER);
    let (virtual_machines, vm_writer) = reflector::store_shared::<VirtualMachine>(BUFFER);
    let (secrets, secret_writer) = reflector::store_shared::<Secret>(BUFFER);
    let (baffles, baffles_writer) = reflector::store_shared::<BafflesApplication>(BUFFER);
    let (snapshots, snapshot_writer) = reflector::store_shared::<VirtualMachineSnapshot>(BUFFER);
    let subscribers = (
        dv_writer.subscribe(),
        vm_writer.subscribe(),
        vm_writer.subscribe(),
        secret_writer.subscribe(),
        baffles_writer.subscribe(),
        baffles_writer.subscribe(),
        snapshot_writer.subscribe(),
    );
    let (
        Some(dv_events),
        Some(vm_events_app),
        Some(vm_events_console),
        Some(secret_events),
        Some(baffles_events_app),
        Some(baffles_events_console),
        Some(snapshot_events),
    ) = subscribers
    else {
        tracing::error!("shared reflector stores refused subscribers; this is a bug");
        return;
    };

    // Readiness comes from the reflector streams themselves (their first InitDone), not from
    // `Store::wait_until_ready`: a store's readiness future wakes only its latest waiter, and the
    // controllers already wait on their stores, so a second waiter could starve one of them.
    let synced = CacheSync::default();
    let (deleted_children, deleted_children_receiver) =
        tokio::sync::mpsc::unbounded_channel::<ObjectRef<VirtualMachineApp>>();
    let reflectors = future::join5(
        watcher(api::<DataVolume>(&client, namespace), managed())
            .default_backoff()
            .modify(without_managed_fields)
            .reflect_shared(dv_writer)
            .inspect(owner_of_deleted_child(deleted_children.clone()))
            .for_each(synced.track("datavolumes")),
        watcher(api::<VirtualMachine>(&client, namespace), listed())
            .default_backoff()
            .modify(without_managed_fields)
            .reflect_shared(vm_writer)
            .inspect(owner_of_deleted_child(deleted_children.clone()))
            .for_each(synced.track("virtualmachines")),
        watcher(api::<Secret>(&client, namespace), managed())
            .default_backoff()
            .modify(without_managed_fields)
            .reflect_shared(secret_writer)
            .inspect(owner_of_deleted_child(deleted_children.clone()))
            .for_each(synced.track("secrets")),
        watcher(api::<BafflesApplication>(&client, namespace), managed())
            .default_backoff()
            .modify(without_managed_fields)
            .reflect_shared(baffles_writer)
            .inspect(owner_of_deleted_child(deleted_children.clone()))
            .for_each(synced.track("bafflesapplications")),
        watcher(api::<VirtualMachineSnapshot>(&client, namespace), managed())
            .default_backoff()
            .modify(without_managed_fields)
            .reflect_shared(snapshot_writer)
            .inspect(owner_of_deleted_child(deleted_children.clone()))
            .for_each(synced.track("virtualmachinesnapshots")),
    );
    let _reflectors = AbortOnDrop(tokio::spawn(reflectors.map(|_| ())));

    // App reconciles that started before the children's caches are filled would find every child
    // missing and apply it again: they wait for this gate (bounded, so a watch that cannot start
    // does not stop the operator; the Baffles cache only when its CRD exists, else it never fills).
    let (children_gate, children_synced) = watch::channel(false);
    let _children_gate = {
        let synced = synced.clone();
        let baffles_installed = facts_receiver.borrow().baffles_installed;
        AbortOnDrop(tokio::spawn(async move {
            let mut children = vec![
                "datavolumes",
                "virtualmachines",
                "secrets",
                "virtualmachinesnapshots",
            ];
            if baffles_installed {
                children.push("bafflesapplications");
            }
            if tokio::time::timeout(CHILD_CACHE_TIMEOUT, synced.wait_for(&children))
                .await
                .is_err()
            {
                tracing::warn!(
                    timeout = ?CHILD_CACHE_TIMEOUT,
                    "the children's caches did not fill in time; reconciling anyway"
                );
            }
            children_gate.send_replace(true);
        }))
    };

    let context = Arc::new(Context {
        client: client.clone(),
        facts: facts_receiver.clone(),
        data_volumes: data_volumes.clone(),
        virtual_machines: virtual_machines.clone(),
        secrets: secrets.clone(),
        baffles,
        snapshots: snapshots.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "paddock-operator".to_owned(),
                instance: Some(options.identity.clone()),
            },
        ),
        metrics: probes.metrics.clone(),
        queue: QueueTracker::default(),
        written_statuses: app_controller::WrittenStatuses::default(),
        children_synced,
    });
    let config = controller::Config::default().concurrency(options.concurrency);
    let facts_changed = {
        let receiver = facts_receiver.clone();
        futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.changed().await.ok().map(|()| ((), receiver))
        })
    };
    let (apps, apps_writer) = reflector::store::<VirtualMachineApp>();
    let _backups = AbortOnDrop(tokio::spawn(backups::run(
        client.clone(),
        apps.clone(),
        options.backups.clone(),
        context.recorder.clone(),
        probes.metrics.clone(),
    )));
    let app_events = watcher(api::<VirtualMachineApp>(&client, namespace), listed())
        .default_backoff()
        .modify(without_managed_fields)
        .reflect(apps_writer)
        .inspect(synced.observer("virtualmachineapps"))
        .applied_objects();
    let app_controller = Controller::for_stream(app_events, apps)
        .with_config(config.clone())
        .owns_shared_stream(dv_events)
        .owns_shared_stream(vm_events_app)
        .owns_shared_stream(secret_events)
        .owns_shared_stream(baffles_events_app)
        .owns_shared_stream(snapshot_events)
        .reconcile_all_on(facts_changed)
        .reconcile_on(futures_util::stream::unfold(
            deleted_children_receiver,
            |mut receiver| async move { receiver.recv().await.map(|owner| (owner, receiver)) },
        ));
    let app_controller = app_controller
        .graceful_shutdown_on(stop.clone())
        .run(app_controller::reconcile, error_policy, context.clone())
        .for_each(|outcome| async move {
            if let Err(error) = outcome {
                tracing::debug!(%error, "virtualmachineapp controller event");
            }
        });
    let console_controller = Controller::for_shared_stream(vm_events_console, virtual_machines.clone())
        .with_config(config)
        .owns_shared_stream(baffles_events_console)
        .graceful_shutdown_on(stop.clone())
        .run(console_controller::reconcile, error_policy, context.clone())
        .for_each(|outcome| async move {
            if let Err(error) = outcome {
                tracing::debug!(%error, "console controller event");
            }
        });

    let readiness = {
        let ready = probes.ready.clone();
        async move {
            synced
                .wait_for(&[
                    "virtualmachineapps",
                    "datavolumes",
                    "virtualmachines",
                    "secrets",
                    "virtualmachinesnapshots",
                ])
                .await;
            tracing::info!("caches synced; ready");
            ready.store(true, Ordering::Relaxed);
        }
    };
    let _readiness = AbortOnDrop(tokio::spawn(readiness));
    future::join(app_controller, console_controller).await;
}
