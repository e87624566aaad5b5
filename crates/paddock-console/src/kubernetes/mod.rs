//! The Kubernetes backend: [`Backend`] over KubeVirt (and paddock's VirtualMachineApps) in a
//! cluster, for every signed-in user with that user's rights.
//!
//! Role: what the console Deployment (or `paddock serve --kubeconfig`) runs. Reads come from
//! shared caches, writes go to the API server as the user.
//!
//! Contract:
//! - Reads: one reflector per kind (VirtualMachineApps, VirtualMachines, VirtualMachineInstances,
//!   VirtualMachineSnapshots), filled with the console's own credentials (`list`/`watch` on them);
//!   requests never list. Before a user sees a VM from them, a SubjectAccessReview asks whether
//!   the user may `get` (one VM) or `list` (a namespace's VMs) `virtualmachines.kubevirt.io`
//!   ([`access`], decisions cached briefly); `snapshots` need `list virtualmachinesnapshots`.
//! - Actions run as the user: the console's credentials plus `Impersonate-User`/`Impersonate-Group`
//!   (the console needs `impersonate` on users and groups), so RBAC decides and the API server's
//!   audit log names the user. A 403 becomes [`ErrorKind::Forbidden`] naming the permission the
//!   request needed (verb, group, resource, subresource, namespace) with the API server's message.
//! - Power: KubeVirt's subresources (`virtualmachines/{start,stop,restart,migrate}`,
//!   `virtualmachineinstances/{pause,unpause}`), except that for a VM managed by a
//!   VirtualMachineApp whose run strategy is Always, Halted or Once, start and stop edit the
//!   app's `spec.runStrategy` (virt-api would patch the VM's, which the operator owns and would
//!   set back). Force stop and a grace period also set the VMI's termination grace period.
//! - Snapshots are VirtualMachineSnapshots (disk only: `memory: true` is refused); restore stops
//!   a running VM, creates a VirtualMachineRestore, waits for it and starts the VM again; clone is
//!   a VirtualMachineClone.
//! - Consoles are KubeVirt's websockets proxied as the user ([`console`]).
//! - Backups to a registry and restores from one run as the user with `paddock_cluster::backup`,
//!   as long-running operations ([`backups`]).
//! - Events come from the reflectors: a VM's status or snapshots changing, or the VM going away;
//!   each user's stream carries only namespaces where they may list VMs.

mod access;
mod authenticator;
mod backups;
mod console;
mod upload;
mod views;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::stream::{BoxStream, StreamExt};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use paddock_api::app::VirtualMachineApp;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio::task::AbortHandle;

pub use access::{AccessReviewer, DECISION_LIFETIME};
pub use authenticator::{
    Authenticator, ProxyHeaders, REFUSAL_LIFETIME, REVIEW_LIFETIME, SESSION_KEY_MIN_BYTES, SESSION_LIFETIME,
    Session, SessionKey, SessionKeyError,
};
pub use backups::BackupSettings;
pub use upload::UploadProxy;

use crate::backend::{
    Backend, BackendError, BackendResult, BackupListRequest, BackupRequest, BackupView, ConsoleAccess,
    ConsoleAccessView, ConsoleChannel, ConsoleKind, ErrorKind, EventView, HealthCheck, OperationView,
    Permission, PowerAction, RestoreRequest, SnapshotRequest, SnapshotView, UploadRequest, UploadView,
    UserInfo, VmRef, VmStatusView, VmView,
};
use views::{VmObjects, snapshot_source, snapshot_state, snapshot_view, status_view, vm_view};

/// How many events a slow subscriber may fall behind before it gets `Lagged`.
const EVENT_BACKLOG: usize = 1024;
/// How long a request waits for the caches' first sync.
const SYNC_PATIENCE: Duration = Duration::from_secs(15);
/// How long an action waits for the caches to show its effect before answering.
const SETTLE_PATIENCE: Duration = Duration::from_secs(3);
/// How long snapshot, restore and clone operations may take.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(180);
/// How often an operation's progress is checked.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Failures setting up the backend.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    /// The kubeconfig could not be read or used.
    #[error(
        "cannot use the kubeconfig {path}: {details}; check the file, or pass --kubeconfig with a working one"
    )]
    Kubeconfig {
        /// The file.
        path: String,
        /// Why.
        details: String,
    },
    /// No configuration was found.
    #[error(
        "cannot find Kubernetes credentials: {0}; pass --kubeconfig PATH, set KUBECONFIG, or run in a pod with a service account"
    )]
    Infer(String),
    /// A client could not be made.
    #[error("cannot create a Kubernetes client: {0}")]
    Client(String),
}

/// Options of the Kubernetes backend.
#[derive(Debug, Clone, Default)]
pub struct KubernetesOptions {
    /// Watch only this namespace (the console then needs `list`/`watch` there only); every
    /// namespace when `None`.
    pub namespace: Option<String>,
    /// Where CDI's upload proxy is and how to trust it, for disk uploads.
    pub upload_proxy: UploadProxy,
    /// Registry credentials, plain http and the export link for backups.
    pub backup: BackupSettings,
}

/// The client configuration: `kubeconfig` (with `context`) when given, else inferred (in-cluster
/// service account, `KUBECONFIG`, `~/.kube/config`).
pub async fn load_config(
    kubeconfig: Option<&Path>,
    context: Option<&str>,
) -> Result<kube::Config, KubernetesError> {
    let options = kube::config::KubeConfigOptions {
        context: context.map(str::to_string),
        ..Default::default()
    };
    match kubeconfig {
        Some(path) => {
            let error = |details: String| KubernetesError::Kubeconfig {
                path: path.display().to_string(),
                details,
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| error(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| error(e.to_string()))
        }
        None if context.is_some() => kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|error| KubernetesError::Infer(error.to_string())),
        None => kube::Config::infer()
            .await
            .map_err(|error| KubernetesError::Infer(error.to_string())),
    }
}

/// The kinds the backend caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    App,
    Vm,
    Vmi,
    Snapshot,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::App, Kind::Vm, Kind::Vmi, Kind::Snapshot];

    fn resource(self) -> ApiResource {
        let (group, version, kind, plural) = match self {
            Kind::App => (
                "paddock.dev",
                "v1alpha1",
                "VirtualMachineApp",
                "virtualmachineapps",
            ),
            Kind::Vm => ("kubevirt.io", "v1", "VirtualMachine", "virtualmachines"),
            Kind::Vmi => (
                "kubevirt.io",
                "v1",
                "VirtualMachineInstance",
                "virtualmachineinstances",
            ),
            Kind::Snapshot => (
                "snapshot.kubevirt.io",
                "v1beta1",
                "VirtualMachineSnapshot",
                "virtualmachinesnapshots",
            ),
        };
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
    }

    /// Whether the console is not ready without it (KubeVirt's own kinds are; paddock's app CRD
    /// and the snapshot CRD may be missing from a cluster).
    fn required(self) -> bool {
        matches!(self, Kind::Vm | Kind::Vmi)
    }
}

/// One reflector's store and whether it has listed everything once.
struct Cache {
    kind: Kind,
    resource: ApiResource,
    store: Store<DynamicObject>,
    synced: AtomicBool,
}

/// A change seen by a reflector: the VM it concerns, or that a cache finished a (re)list.
enum Touched {
    Vm(VmRef),
    Synced,
}

/// State shared by the backend and every user's view of it.
struct Shared {
    client: kube::Client,
    /// The console's own configuration, from which the backups' impersonating clients are made.
    config: kube::Config,
    /// Without read timeouts: console websockets may be quiet for long.
    stream_client: kube::Client,
    caches: HashMap<Kind, Arc<Cache>>,
    access: AccessReviewer,
    events: broadcast::Sender<EventView>,
    tasks: Vec<AbortHandle>,
    /// The configured upload proxy URL, if any.
    upload_proxy_url: Option<String>,
    /// The HTTP client for the upload proxy, or why it could not be made.
    upload_client: Result<reqwest::Client, String>,
    /// How backups run.
    backup: BackupSettings,
    /// Backups and restores, running and recently ended, of every user.
    operations: Arc<crate::backups::Operations>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// [`Backend`] over a Kubernetes cluster with KubeVirt; see the module documentation. This value
/// itself refuses every VM operation: the API uses [`Backend::acting_as`] for the signed-in user.
pub struct KubernetesBackend {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KubernetesBackend {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("KubernetesBackend")
            .finish_non_exhaustive()
    }
}

impl KubernetesBackend {
    /// Starts the reflectors with `config` (the console's own credentials). Must run inside a
    /// tokio runtime.
    pub fn start(
        config: kube::Config,
        options: KubernetesOptions,
    ) -> Result<KubernetesBackend, KubernetesError> {
        let client = kube::Client::try_from(config.clone())
            .map_err(|error| KubernetesError::Client(error.to_string()))?;
        let mut stream_config = config.clone();
        stream_config.read_timeout = None;
        stream_config.write_timeout = None;
        let stream_client = kube::Client::try_from(stream_config)
            .map_err(|error| KubernetesError::Client(error.to_string()))?;
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        let (touched_sender, touched) = mpsc::unbounded_channel();
        let mut caches = HashMap::new();
        let mut tasks = Vec::new();
        for kind in Kind::ALL {
            let resource = kind.resource();
            let writer = Writer::new(resource.clone());
            let cache = Arc::new(Cache {
                kind,
                resource: resource.clone(),
                store: writer.as_reader(),
                synced: AtomicBool::new(false),
            });
            let api: kube::Api<DynamicObject> = match &options.namespace {
                Some(namespace) => kube::Api::namespaced_with(client.clone(), namespace, &resource),
                None => kube::Api::all_with(client.clone(), &resource),
            };
            tasks.push(
                tokio::spawn(run_reflector(
                    Arc::clone(&cache),
                    api,
                    writer,
                    touched_sender.clone(),
                ))
                .abort_handle(),
            );
            caches.insert(kind, cache);
        }
        let caches_for_events = caches.clone();
        tasks.push(tokio::spawn(publish_changes(caches_for_events, touched, events.clone())).abort_handle());
        let upload_client = paddock_cluster::upload::proxy_client(&options.upload_proxy.trust)
            .map_err(|error| error.to_string());
        Ok(KubernetesBackend {
            shared: Arc::new(Shared {
                upload_proxy_url: options.upload_proxy.url.clone(),
                upload_client,
                config,
                backup: options.backup.clone(),
                operations: Arc::new(crate::backups::Operations::new()),
                access: AccessReviewer::new(client.clone()),
                client,
                stream_client,
                caches,
                events,
                tasks,
            }),
        })
    }

    /// An authenticator for this cluster (TokenReviews with the console's credentials), believing
    /// `proxy` headers when given (see [`authenticator`] for what that requires).
    pub fn authenticator(&self, proxy: Option<ProxyHeaders>) -> Authenticator {
        Authenticator::new(self.shared.client.clone(), proxy)
    }

    /// Like [`KubernetesBackend::authenticator`], signing sessions with `key`, which every
    /// replica shares (so a session issued by one is accepted by all).
    pub fn authenticator_with_session_key(
        &self,
        proxy: Option<ProxyHeaders>,
        key: SessionKey,
    ) -> Authenticator {
        Authenticator::with_session_key(self.shared.client.clone(), proxy, key)
    }

    fn refuse<T: Send + 'static>(&self) -> BoxFuture<'static, BackendResult<T>> {
        Box::pin(async {
            Err(BackendError::new(
                ErrorKind::Internal,
                "the Kubernetes backend acts only for a signed-in user; this is a bug in paddock",
            ))
        })
    }
}

async fn run_reflector(
    cache: Arc<Cache>,
    api: kube::Api<DynamicObject>,
    writer: Writer<DynamicObject>,
    touched: mpsc::UnboundedSender<Touched>,
) {
    let kind = cache.kind;
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(
                watcher::Event::Apply(object)
                | watcher::Event::Delete(object)
                | watcher::Event::InitApply(object),
            ) => {
                if let Some(vm) = concerned_vm(kind, &object) {
                    let _ = touched.send(Touched::Vm(vm));
                }
            }
            Ok(watcher::Event::InitDone) => {
                if !cache.synced.swap(true, Ordering::SeqCst) {
                    tracing::info!(resource = %cache.resource.plural, "cache synced");
                }
                let _ = touched.send(Touched::Synced);
            }
            Ok(watcher::Event::Init) => {}
            Err(error) => {
                tracing::warn!(resource = %cache.resource.plural, %error, "watching failed; retrying with backoff");
            }
        }
    }
}

/// The VM an object of `kind` belongs to.
fn concerned_vm(kind: Kind, object: &DynamicObject) -> Option<VmRef> {
    let namespace = object.metadata.namespace.clone()?;
    let name = match kind {
        Kind::Snapshot => snapshot_source(object)?,
        Kind::App | Kind::Vm | Kind::Vmi => object.metadata.name.clone()?,
    };
    Some(VmRef { namespace, name })
}

/// Turns reflector changes into [`EventView`]s: a VM's status or snapshots changing, or the VM
/// going away. Nothing is published before the required caches first synced (their first lists
/// are not changes).
async fn publish_changes(
    caches: HashMap<Kind, Arc<Cache>>,
    mut touched: mpsc::UnboundedReceiver<Touched>,
    events: broadcast::Sender<EventView>,
) {
    let mut last: HashMap<VmRef, (VmStatusView, Vec<SnapshotView>)> = HashMap::new();
    let mut pending: BTreeSet<(String, String)> = BTreeSet::new();
    while let Some(first) = touched.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = touched.try_recv() {
            batch.push(more);
        }
        for change in batch {
            match change {
                Touched::Vm(vm) => {
                    pending.insert((vm.namespace, vm.name));
                }
                // A relist after a watch gap emits no deletions: look at everything known again.
                Touched::Synced => {
                    pending.extend(last.keys().map(|vm| (vm.namespace.clone(), vm.name.clone())));
                }
            }
        }
        let publishing = caches
            .values()
            .filter(|cache| cache.kind.required())
            .all(|cache| cache.synced.load(Ordering::SeqCst));
        for (namespace, name) in std::mem::take(&mut pending) {
            let vm = VmRef { namespace, name };
            let objects = gather(&caches, &vm.namespace, &vm.name);
            if !objects.exists() {
                if last.remove(&vm).is_some() && publishing {
                    let _ = events.send(EventView::Deleted {
                        namespace: vm.namespace.clone(),
                        name: vm.name.clone(),
                    });
                }
                continue;
            }
            let status = status_view(&objects);
            let snapshots: Vec<SnapshotView> = objects
                .snapshots
                .iter()
                .map(|snapshot| snapshot_view(snapshot))
                .collect();
            let previous = last.get(&vm);
            if publishing {
                if previous.is_none_or(|(old, _)| *old != status) {
                    let _ = events.send(EventView::Changed {
                        namespace: vm.namespace.clone(),
                        name: vm.name.clone(),
                        status: status.clone(),
                    });
                }
                if previous.is_some_and(|(_, old)| *old != snapshots)
                    || (previous.is_none() && !snapshots.is_empty())
                {
                    let _ = events.send(EventView::SnapshotsChanged {
                        namespace: vm.namespace.clone(),
                        name: vm.name.clone(),
                        snapshots: snapshots.clone(),
                    });
                }
            }
            last.insert(vm, (status, snapshots));
        }
    }
}

fn cached(
    caches: &HashMap<Kind, Arc<Cache>>,
    kind: Kind,
    namespace: &str,
    name: &str,
) -> Option<Arc<DynamicObject>> {
    let cache = caches.get(&kind)?;
    cache
        .store
        .get(&ObjectRef::new_with(name, cache.resource.clone()).within(namespace))
}

/// Everything the caches hold about one VM.
fn gather(caches: &HashMap<Kind, Arc<Cache>>, namespace: &str, name: &str) -> VmObjects {
    let mut snapshots: Vec<Arc<DynamicObject>> = caches
        .get(&Kind::Snapshot)
        .map(|cache| cache.store.state())
        .unwrap_or_default()
        .into_iter()
        .filter(|snapshot| {
            snapshot.metadata.namespace.as_deref() == Some(namespace)
                && snapshot_source(snapshot).as_deref() == Some(name)
        })
        .collect();
    snapshots.sort_by(|a, b| {
        let key =
            |snapshot: &DynamicObject| (snapshot_view(snapshot).created_at, snapshot.metadata.name.clone());
        key(a).cmp(&key(b))
    });
    VmObjects {
        app: cached(caches, Kind::App, namespace, name),
        vm: cached(caches, Kind::Vm, namespace, name),
        vmi: cached(caches, Kind::Vmi, namespace, name),
        snapshots,
    }
}

impl Backend for KubernetesBackend {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn readiness(&self) -> BoxFuture<'_, Vec<HealthCheck>> {
        Box::pin(async move { readiness(&self.shared) })
    }

    fn list(&self, _namespace: Option<String>) -> BoxFuture<'_, BackendResult<Vec<VmView>>> {
        self.refuse()
    }
    fn get(&self, _vm: VmRef) -> BoxFuture<'_, BackendResult<VmView>> {
        self.refuse()
    }
    fn create(&self, _app: VirtualMachineApp) -> BoxFuture<'_, BackendResult<VmView>> {
        self.refuse()
    }
    fn delete(&self, _vm: VmRef, _force: bool) -> BoxFuture<'_, BackendResult<()>> {
        self.refuse()
    }
    fn power(&self, _vm: VmRef, _action: PowerAction) -> BoxFuture<'_, BackendResult<VmView>> {
        self.refuse()
    }
    fn snapshot_list(&self, _vm: VmRef) -> BoxFuture<'_, BackendResult<Vec<SnapshotView>>> {
        self.refuse()
    }
    fn snapshot_create(
        &self,
        _vm: VmRef,
        _request: SnapshotRequest,
    ) -> BoxFuture<'_, BackendResult<SnapshotView>> {
        self.refuse()
    }
    fn snapshot_restore(&self, _vm: VmRef, _snapshot: String) -> BoxFuture<'_, BackendResult<VmView>> {
        self.refuse()
    }
    fn snapshot_delete(&self, _vm: VmRef, _snapshot: String) -> BoxFuture<'_, BackendResult<()>> {
        self.refuse()
    }
    fn screenshot(&self, _vm: VmRef) -> BoxFuture<'_, BackendResult<Vec<u8>>> {
        self.refuse()
    }
    fn open_console(&self, _vm: VmRef, _kind: ConsoleKind) -> BoxFuture<'_, BackendResult<ConsoleChannel>> {
        self.refuse()
    }
    fn events(&self) -> BoxStream<'static, EventView> {
        futures_util::stream::empty().boxed()
    }

    fn acting_as(&self, user: &UserInfo) -> Option<Arc<dyn Backend>> {
        Some(Arc::new(UserBackend {
            shared: Arc::clone(&self.shared),
            user: Arc::new(user.clone()),
        }))
    }
}

fn readiness(shared: &Shared) -> Vec<HealthCheck> {
    let mut checks: Vec<HealthCheck> = Kind::ALL
        .iter()
        .filter_map(|kind| shared.caches.get(kind))
        .map(|cache| {
            let synced = cache.synced.load(Ordering::SeqCst);
            let required = cache.kind.required();
            HealthCheck {
                name: format!("cache-{}", cache.resource.plural),
                ok: synced || !required,
                message: match (synced, required) {
                    (true, _) => format!("{} listed and watched", cache.resource.plural),
                    (false, true) => format!(
                        "{} not listed yet: check that KubeVirt is installed and the console may list and watch them (see the console log)",
                        cache.resource.plural
                    ),
                    (false, false) => format!(
                        "{} not listed yet (optional: is its CRD installed, may the console list and watch it?)",
                        cache.resource.plural
                    ),
                },
            }
        })
        .collect();
    checks.sort_by(|a, b| a.name.cmp(&b.name));
    checks
}

/// Adds the `Impersonate-*` headers that make the API server treat a request as `user`'s.
fn impersonate(headers: &mut http::HeaderMap, user: &UserInfo) -> BackendResult<()> {
    let value = |text: &str| {
        http::HeaderValue::from_str(text).map_err(|_| {
            BackendError::new(
                ErrorKind::BadRequest,
                format!("the user name or group {text:?} cannot be sent in an HTTP header"),
            )
        })
    };
    headers.insert("Impersonate-User", value(&user.username)?);
    for group in &user.groups {
        headers.append("Impersonate-Group", value(group)?);
    }
    Ok(())
}

/// The backend error for an API server `Status`; `permission` is what the request needed.
fn status_error(status: &kube::core::Status, permission: &Permission) -> BackendError {
    let message = if status.message.is_empty() {
        format!(
            "the Kubernetes API server refused to {permission} ({})",
            status.code
        )
    } else {
        status.message.clone()
    };
    match status.code {
        403 => BackendError::forbidden(
            permission.clone(),
            format!(
                "{message}; the signed-in user lacks the permission to {permission}: ask a cluster administrator for a Role granting it"
            ),
        ),
        404 => BackendError::new(ErrorKind::NotFound, message),
        409 if status.reason == "AlreadyExists" => BackendError::new(ErrorKind::AlreadyExists, message),
        409 => BackendError::new(ErrorKind::InvalidTransition, message),
        400 if message.contains("not running")
            || message.contains("No graphics")
            || message.contains("No serial") =>
        {
            BackendError::new(ErrorKind::InvalidTransition, message)
        }
        400 => BackendError::new(ErrorKind::BadRequest, message),
        422 => BackendError::new(ErrorKind::InvalidSpec, message),
        401 => BackendError::new(
            ErrorKind::Internal,
            format!("the Kubernetes API server did not accept the console's own credentials: {message}"),
        ),
        _ => BackendError::new(
            ErrorKind::Internal,
            format!("the Kubernetes API server failed: {message}"),
        ),
    }
}

fn permission(
    verb: &str,
    resource: &ApiResource,
    subresource: Option<&str>,
    namespace: &str,
    name: Option<&str>,
) -> Permission {
    Permission {
        verb: verb.to_string(),
        group: resource.group.clone(),
        resource: resource.plural.clone(),
        subresource: subresource.map(str::to_string),
        namespace: Some(namespace.to_string()),
        name: name.map(str::to_string),
    }
}

fn collection_path(resource: &ApiResource, namespace: &str) -> String {
    let prefix = if resource.group.is_empty() {
        format!("/api/{}", resource.version)
    } else {
        format!("/apis/{}/{}", resource.group, resource.version)
    };
    format!("{prefix}/namespaces/{namespace}/{}", resource.plural)
}

/// KubeVirt's subresource API: `/apis/subresources.kubevirt.io/v1/namespaces/{ns}/{plural}/{name}/{sub}`.
fn subresource_path(plural: &str, namespace: &str, name: &str, subresource: &str) -> String {
    format!("/apis/subresources.kubevirt.io/v1/namespaces/{namespace}/{plural}/{name}/{subresource}")
}

fn subresource_permission(
    verb: &str,
    plural: &str,
    subresource: &str,
    namespace: &str,
    name: &str,
) -> Permission {
    Permission {
        verb: verb.to_string(),
        group: "subresources.kubevirt.io".to_string(),
        resource: plural.to_string(),
        subresource: Some(subresource.to_string()),
        namespace: Some(namespace.to_string()),
        name: Some(name.to_string()),
    }
}

/// The backend as one signed-in user; see the module documentation.
struct UserBackend {
    shared: Arc<Shared>,
    user: Arc<UserInfo>,
}

impl UserBackend {
    fn cache(&self, kind: Kind) -> BackendResult<&Arc<Cache>> {
        self.shared.caches.get(&kind).ok_or_else(|| {
            BackendError::new(
                ErrorKind::Internal,
                "a cache is missing; this is a bug in paddock",
            )
        })
    }

    /// Waits (briefly) for the required caches' first sync.
    async fn synced(&self) -> BackendResult<()> {
        let deadline = Instant::now() + SYNC_PATIENCE;
        loop {
            let pending: Vec<String> = self
                .shared
                .caches
                .values()
                .filter(|cache| cache.kind.required() && !cache.synced.load(Ordering::SeqCst))
                .map(|cache| cache.resource.plural.clone())
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(BackendError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "the console has not listed {} from the cluster yet; try again shortly (/readyz says why)",
                        pending.join(", ")
                    ),
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn objects(&self, vm: &VmRef) -> VmObjects {
        gather(&self.shared.caches, &vm.namespace, &vm.name)
    }

    /// The VM's objects, after checking that the user may `get` it; NotFound when it does not exist.
    async fn visible(&self, vm: &VmRef) -> BackendResult<VmObjects> {
        self.synced().await?;
        let resource = Kind::Vm.resource();
        self.shared
            .access
            .require(
                &self.user,
                &permission("get", &resource, None, &vm.namespace, Some(&vm.name)),
            )
            .await?;
        let objects = self.objects(vm);
        if !objects.exists() {
            return Err(BackendError::new(
                ErrorKind::NotFound,
                format!(
                    "no virtual machine {vm}: there is neither a VirtualMachineApp nor a VirtualMachine of that name"
                ),
            ));
        }
        Ok(objects)
    }

    async fn view(&self, vm: &VmRef) -> BackendResult<VmView> {
        let objects = self.visible(vm).await?;
        let mut objects = objects;
        if !self.may_list_snapshots(&vm.namespace).await? {
            objects.snapshots.clear();
        }
        vm_view(&vm.namespace, &vm.name, &objects)
            .ok_or_else(|| BackendError::new(ErrorKind::NotFound, format!("no virtual machine {vm}")))
    }

    async fn may_list_snapshots(&self, namespace: &str) -> BackendResult<bool> {
        self.shared
            .access
            .allowed(
                &self.user,
                &permission("list", &Kind::Snapshot.resource(), None, namespace, None),
            )
            .await
    }

    /// Sends `request` as the user; `needed` is the permission it takes. Returns the body.
    async fn send(&self, mut request: http::Request<Vec<u8>>, needed: &Permission) -> BackendResult<Vec<u8>> {
        impersonate(request.headers_mut(), &self.user)?;
        let response = self
            .shared
            .client
            .send(request.map(kube::client::Body::from))
            .await
            .map_err(|error| {
                BackendError::new(
                    ErrorKind::Internal,
                    format!("cannot reach the Kubernetes API server to {needed}: {error}; try again"),
                )
            })?;
        let code = response.status().as_u16();
        let body = response.into_body().collect_bytes().await.map_err(|error| {
            BackendError::new(
                ErrorKind::Internal,
                format!("reading the API server's answer failed: {error}"),
            )
        })?;
        if (200..300).contains(&code) {
            return Ok(body.to_vec());
        }
        let mut status: kube::core::Status = serde_json::from_slice(&body)
            .unwrap_or_else(|_| kube::core::Status::failure(&String::from_utf8_lossy(&body), ""));
        if status.code == 0 {
            status.code = code;
        }
        Err(status_error(&status, needed))
    }

    async fn send_json(
        &self,
        method: http::Method,
        path: &str,
        content_type: &str,
        body: &Value,
        needed: &Permission,
    ) -> BackendResult<Value> {
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::ACCEPT, "application/json")
            .body(serde_json::to_vec(body).unwrap_or_default())
            .map_err(|error| {
                BackendError::new(
                    ErrorKind::Internal,
                    format!("cannot build the request for {path}: {error}"),
                )
            })?;
        let answer = self.send(request, needed).await?;
        Ok(serde_json::from_slice(&answer).unwrap_or(Value::Null))
    }

    async fn get_object(&self, resource: &ApiResource, namespace: &str, name: &str) -> BackendResult<Value> {
        let request = http::Request::get(format!("{}/{name}", collection_path(resource, namespace)))
            .header(http::header::ACCEPT, "application/json")
            .body(Vec::new())
            .map_err(|error| BackendError::new(ErrorKind::Internal, error.to_string()))?;
        let body = self
            .send(request, &permission("get", resource, None, namespace, Some(name)))
            .await?;
        serde_json::from_slice(&body).map_err(|error| {
            BackendError::new(
                ErrorKind::Internal,
                format!("the API server sent an unreadable object: {error}"),
            )
        })
    }

    async fn create_object(
        &self,
        resource: &ApiResource,
        namespace: &str,
        object: &Value,
    ) -> BackendResult<Value> {
        self.send_json(
            http::Method::POST,
            &collection_path(resource, namespace),
            "application/json",
            object,
            &permission("create", resource, None, namespace, None),
        )
        .await
    }

    async fn delete_object(
        &self,
        resource: &ApiResource,
        namespace: &str,
        name: &str,
        body: Value,
    ) -> BackendResult<()> {
        self.send_json(
            http::Method::DELETE,
            &format!("{}/{name}", collection_path(resource, namespace)),
            "application/json",
            &body,
            &permission("delete", resource, None, namespace, Some(name)),
        )
        .await
        .map(drop)
    }

    async fn merge_patch(
        &self,
        resource: &ApiResource,
        namespace: &str,
        name: &str,
        patch: &Value,
    ) -> BackendResult<()> {
        self.send_json(
            http::Method::PATCH,
            &format!("{}/{name}", collection_path(resource, namespace)),
            "application/merge-patch+json",
            patch,
            &permission("patch", resource, None, namespace, Some(name)),
        )
        .await
        .map(drop)
    }

    /// `PUT` a KubeVirt subresource as the user.
    async fn subresource(
        &self,
        plural: &str,
        vm: &VmRef,
        subresource: &str,
        body: Value,
    ) -> BackendResult<()> {
        self.send_json(
            http::Method::PUT,
            &subresource_path(plural, &vm.namespace, &vm.name, subresource),
            "application/json",
            &body,
            &subresource_permission("update", plural, subresource, &vm.namespace, &vm.name),
        )
        .await
        .map(drop)
    }

    /// Waits until `done` holds for the VM's cached objects, at most `patience`; whether it did.
    async fn wait_for(&self, vm: &VmRef, patience: Duration, done: impl Fn(&VmObjects) -> bool) -> bool {
        let deadline = Instant::now() + patience;
        loop {
            if done(&self.objects(vm)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn versions(objects: &VmObjects) -> [Option<String>; 3] {
        let version = |object: &Option<Arc<DynamicObject>>| {
            object
                .as_ref()
                .and_then(|object| object.metadata.resource_version.clone())
        };
        [version(&objects.app), version(&objects.vm), version(&objects.vmi)]
    }

    /// The view after an action: waits briefly for the caches to show something changed.
    async fn settled_view(&self, vm: &VmRef, before: &VmObjects) -> BackendResult<VmView> {
        let before = Self::versions(before);
        self.wait_for(vm, SETTLE_PATIENCE, |objects| Self::versions(objects) != before)
            .await;
        self.view(vm).await
    }

    async fn set_app_run_strategy(&self, vm: &VmRef, app: &str, strategy: &str) -> BackendResult<()> {
        self.merge_patch(
            &Kind::App.resource(),
            &vm.namespace,
            app,
            &json!({"spec": {"runStrategy": strategy}}),
        )
        .await
    }

    async fn set_grace_period(&self, vm: &VmRef, seconds: u64) -> BackendResult<()> {
        self.merge_patch(
            &Kind::Vmi.resource(),
            &vm.namespace,
            &vm.name,
            &json!({"spec": {"terminationGracePeriodSeconds": seconds}}),
        )
        .await
    }

    async fn power_action(&self, vm: &VmRef, action: PowerAction) -> BackendResult<VmView> {
        let objects = self.visible(vm).await?;
        let strategy = objects.run_strategy();
        // virt-api's start and stop patch the VM's runStrategy for these strategies; for a VM the
        // operator manages, that spec field is the app's.
        let app = objects
            .managing_app()
            .filter(|_| matches!(strategy.as_str(), "Always" | "Halted" | "Once"));
        if objects.vm.is_none()
            && !matches!(
                action,
                PowerAction::Start | PowerAction::Stop { .. } | PowerAction::ForceStop
            )
        {
            return Err(BackendError::new(
                ErrorKind::InvalidTransition,
                format!(
                    "virtual machine {vm} has no KubeVirt VirtualMachine yet ({}); wait until it is provisioned",
                    status_view(&objects).message.unwrap_or_default()
                ),
            ));
        }
        match action {
            PowerAction::Start => match app {
                Some(app) => {
                    if strategy == "Always" && objects.has_instance() {
                        return Err(BackendError::new(
                            ErrorKind::InvalidTransition,
                            format!("virtual machine {vm} is already running (run strategy Always)"),
                        ));
                    }
                    self.set_app_run_strategy(vm, &app, "Always").await?;
                }
                None => {
                    self.subresource("virtualmachines", vm, "start", json!({}))
                        .await?
                }
            },
            PowerAction::Stop { grace_period } => {
                self.stop(
                    vm,
                    &objects,
                    app.as_deref(),
                    grace_period.map(|grace| grace.as_secs()),
                )
                .await?;
            }
            PowerAction::ForceStop => {
                self.stop(vm, &objects, app.as_deref(), Some(0)).await?;
            }
            PowerAction::Restart { grace_period } => {
                let body = match grace_period {
                    Some(grace) => json!({"gracePeriodSeconds": grace.as_secs()}),
                    None => json!({}),
                };
                self.subresource("virtualmachines", vm, "restart", body).await?;
            }
            PowerAction::Pause => {
                self.subresource("virtualmachineinstances", vm, "pause", json!({}))
                    .await?
            }
            PowerAction::Unpause => {
                self.subresource("virtualmachineinstances", vm, "unpause", json!({}))
                    .await?
            }
        }
        self.settled_view(vm, &objects).await
    }

    async fn stop(
        &self,
        vm: &VmRef,
        objects: &VmObjects,
        app: Option<&str>,
        grace_seconds: Option<u64>,
    ) -> BackendResult<()> {
        match app {
            Some(app) => {
                if objects.run_strategy() == "Halted" && !objects.has_instance() {
                    return Err(BackendError::new(
                        ErrorKind::InvalidTransition,
                        format!("virtual machine {vm} is not running (run strategy Halted)"),
                    ));
                }
                if let Some(seconds) = grace_seconds
                    && objects.has_instance()
                {
                    self.set_grace_period(vm, seconds).await?;
                }
                self.set_app_run_strategy(vm, app, "Halted").await
            }
            None => {
                let body = match grace_seconds {
                    Some(seconds) => json!({"gracePeriod": seconds}),
                    None => json!({}),
                };
                self.subresource("virtualmachines", vm, "stop", body).await
            }
        }
    }

    async fn restore(&self, vm: &VmRef, snapshot: &str) -> BackendResult<VmView> {
        let objects = self.visible(vm).await?;
        let Some(found) = objects
            .snapshots
            .iter()
            .find(|candidate| candidate.metadata.name.as_deref() == Some(snapshot))
        else {
            return Err(BackendError::new(
                ErrorKind::NotFound,
                format!(
                    "virtual machine {vm} has no snapshot {snapshot:?}; list them with GET .../snapshots"
                ),
            ));
        };
        let (phase, ready) = snapshot_state(found);
        if !ready {
            return Err(BackendError::new(
                ErrorKind::InvalidTransition,
                format!(
                    "snapshot {snapshot:?} of {vm} is not ready to use (phase {phase:?}); wait for it to succeed"
                ),
            ));
        }
        // KubeVirt restores only a stopped VM (by default it waits for one): stop it first and
        // start it again afterwards.
        let was_running = objects.has_instance();
        if was_running {
            self.power_action(vm, PowerAction::Stop { grace_period: None })
                .await?;
            if !self
                .wait_for(vm, OPERATION_TIMEOUT, |objects| !objects.has_instance())
                .await
            {
                return Err(BackendError::new(
                    ErrorKind::Internal,
                    format!(
                        "virtual machine {vm} did not stop within {OPERATION_TIMEOUT:?} for the restore; it was asked to stop, check its events"
                    ),
                ));
            }
        }
        let resource = restore_resource();
        let created = self
            .create_object(
                &resource,
                &vm.namespace,
                &json!({
                    "apiVersion": "snapshot.kubevirt.io/v1beta1",
                    "kind": "VirtualMachineRestore",
                    "metadata": {"generateName": format!("{}-restore-", vm.name), "labels": {"app.kubernetes.io/managed-by": "paddock-console"}},
                    "spec": {
                        "target": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": vm.name},
                        "virtualMachineSnapshotName": snapshot,
                    },
                }),
            )
            .await?;
        let name = created["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let deadline = Instant::now() + OPERATION_TIMEOUT;
        loop {
            let restore = self.get_object(&resource, &vm.namespace, &name).await?;
            if restore["status"]["complete"] == true {
                break;
            }
            let failed = restore["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|condition| condition["type"] == "Failure" && condition["status"] == "True");
            if let Some(failed) = failed {
                return Err(BackendError::new(
                    ErrorKind::Internal,
                    format!(
                        "restoring {vm} from {snapshot:?} failed: {}",
                        failed["message"].as_str().unwrap_or("no reason given")
                    ),
                ));
            }
            if Instant::now() >= deadline {
                return Err(BackendError::new(
                    ErrorKind::Internal,
                    format!(
                        "restoring {vm} from {snapshot:?} did not complete within {OPERATION_TIMEOUT:?}; see VirtualMachineRestore {name}"
                    ),
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        // A finished restore is only a record; the VM now carries the restored spec.
        if let Err(error) = self
            .delete_object(&resource, &vm.namespace, &name, json!({}))
            .await
        {
            tracing::info!(%error, restore = %name, "could not delete a finished VirtualMachineRestore");
        }
        if was_running {
            let start = self.power_action(vm, PowerAction::Start).await;
            match start {
                Ok(_) => {}
                Err(error) if error.kind == ErrorKind::InvalidTransition => {}
                Err(error) => return Err(error),
            }
        }
        self.view(vm).await
    }
}

fn restore_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("snapshot.kubevirt.io", "v1beta1", "VirtualMachineRestore"),
        "virtualmachinerestores",
    )
}

fn clone_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("clone.kubevirt.io", "v1beta1", "VirtualMachineClone"),
        "virtualmachineclones",
    )
}

impl Backend for UserBackend {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn readiness(&self) -> BoxFuture<'_, Vec<HealthCheck>> {
        Box::pin(async move { readiness(&self.shared) })
    }

    fn list(&self, namespace: Option<String>) -> BoxFuture<'_, BackendResult<Vec<VmView>>> {
        Box::pin(async move {
            self.synced().await?;
            let vm_resource = Kind::Vm.resource();
            if let Some(namespace) = &namespace {
                self.shared
                    .access
                    .require(
                        &self.user,
                        &permission("list", &vm_resource, None, namespace, None),
                    )
                    .await?;
            }
            let mut keys: BTreeSet<(String, String)> = BTreeSet::new();
            for kind in [Kind::App, Kind::Vm] {
                for object in self.cache(kind)?.store.state() {
                    if let (Some(object_namespace), Some(name)) =
                        (&object.metadata.namespace, &object.metadata.name)
                        && namespace.as_ref().is_none_or(|wanted| wanted == object_namespace)
                    {
                        keys.insert((object_namespace.clone(), name.clone()));
                    }
                }
            }
            let mut may_list: HashMap<String, (bool, bool)> = HashMap::new();
            let mut views = Vec::new();
            for (object_namespace, name) in keys {
                if !may_list.contains_key(&object_namespace) {
                    let vms = self
                        .shared
                        .access
                        .allowed(
                            &self.user,
                            &permission("list", &vm_resource, None, &object_namespace, None),
                        )
                        .await?;
                    let snapshots = vms && self.may_list_snapshots(&object_namespace).await?;
                    may_list.insert(object_namespace.clone(), (vms, snapshots));
                }
                let (vms, snapshots) = may_list.get(&object_namespace).copied().unwrap_or((false, false));
                if !vms {
                    continue;
                }
                let mut objects = gather(&self.shared.caches, &object_namespace, &name);
                if !snapshots {
                    objects.snapshots.clear();
                }
                if let Some(view) = vm_view(&object_namespace, &name, &objects) {
                    views.push(view);
                }
            }
            Ok(views)
        })
    }

    fn get(&self, vm: VmRef) -> BoxFuture<'_, BackendResult<VmView>> {
        Box::pin(async move { self.view(&vm).await })
    }

    fn create(&self, app: VirtualMachineApp) -> BoxFuture<'_, BackendResult<VmView>> {
        Box::pin(async move {
            paddock_api::validation::validate(&app)
                .map_err(|error| BackendError::new(ErrorKind::InvalidSpec, error.to_string()))?;
            let Some(name) = app.metadata.name.clone() else {
                return Err(BackendError::new(
                    ErrorKind::InvalidSpec,
                    "the VirtualMachineApp needs metadata.name",
                ));
            };
            let namespace = app
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_string());
            let mut object = serde_json::to_value(&app).map_err(|error| {
                BackendError::new(
                    ErrorKind::Internal,
                    format!("cannot encode the VirtualMachineApp: {error}"),
                )
            })?;
            object["metadata"]["namespace"] = json!(namespace);
            if let Some(metadata) = object["metadata"].as_object_mut() {
                metadata.remove("resourceVersion");
                metadata.remove("uid");
            }
            if let Some(object) = object.as_object_mut() {
                object.remove("status");
            }
            self.create_object(&Kind::App.resource(), &namespace, &object)
                .await?;
            let vm = VmRef { namespace, name };
            self.wait_for(&vm, SETTLE_PATIENCE, |objects| objects.app.is_some())
                .await;
            self.view(&vm).await
        })
    }

    fn delete(&self, vm: VmRef, force: bool) -> BoxFuture<'_, BackendResult<()>> {
        Box::pin(async move {
            let objects = self.visible(&vm).await?;
            if !objects.snapshots.is_empty() && !force {
                return Err(BackendError::new(
                    ErrorKind::InvalidTransition,
                    format!(
                        "virtual machine {vm} has {} snapshot(s); delete them first, or delete with force=true to delete them too",
                        objects.snapshots.len()
                    ),
                ));
            }
            if force {
                let resource = Kind::Snapshot.resource();
                for snapshot in &objects.snapshots {
                    if let Some(name) = &snapshot.metadata.name {
                        self.delete_object(&resource, &vm.namespace, name, json!({}))
                            .await?;
                    }
                }
            }
            // Deleting the app lets the garbage collector remove the VM, its disk and listing.
            let background = json!({"propagationPolicy": "Background"});
            match objects.managing_app().filter(|_| objects.app.is_some()) {
                Some(app) => {
                    self.delete_object(&Kind::App.resource(), &vm.namespace, &app, background)
                        .await?
                }
                None => {
                    self.delete_object(&Kind::Vm.resource(), &vm.namespace, &vm.name, background)
                        .await?
                }
            }
            self.wait_for(&vm, SETTLE_PATIENCE, |objects| {
                objects.app.is_none() && objects.vm.is_none()
            })
            .await;
            Ok(())
        })
    }

    fn power(&self, vm: VmRef, action: PowerAction) -> BoxFuture<'_, BackendResult<VmView>> {
        Box::pin(async move { self.power_action(&vm, action).await })
    }

    fn snapshot_list(&self, vm: VmRef) -> BoxFuture<'_, BackendResult<Vec<SnapshotView>>> {
        Box::pin(async move {
            let objects = self.visible(&vm).await?;
            self.shared
                .access
                .require(
                    &self.user,
                    &permission("list", &Kind::Snapshot.resource(), None, &vm.namespace, None),
                )
                .await?;
            Ok(objects
                .snapshots
                .iter()
                .map(|snapshot| snapshot_view(snapshot))
                .collect())
        })
    }

    fn snapshot_create(
        &self,
        vm: VmRef,
        request: SnapshotRequest,
    ) -> BoxFuture<'_, BackendResult<SnapshotView>> {
        Box::pin(async move {
            if request.memory {
                return Err(BackendError::new(
                    ErrorKind::Unsupported,
                    "KubeVirt snapshots hold the disks only, not memory: take the snapshot with memory: false",
                ));
            }
            let objects = self.visible(&vm).await?;
            if objects.vm.is_none() {
                return Err(BackendError::new(
                    ErrorKind::InvalidTransition,
                    format!(
                        "virtual machine {vm} has no KubeVirt VirtualMachine yet; wait until it is provisioned"
                    ),
                ));
            }
            self.create_object(
                &Kind::Snapshot.resource(),
                &vm.namespace,
                &json!({
                    "apiVersion": "snapshot.kubevirt.io/v1beta1",
                    "kind": "VirtualMachineSnapshot",
                    "metadata": {"name": request.name, "labels": {"app.kubernetes.io/managed-by": "paddock-console"}},
                    "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": vm.name}},
                }),
            )
            .await?;
            let name = request.name.clone();
            let deadline = Instant::now() + OPERATION_TIMEOUT;
            loop {
                let objects = self.objects(&vm);
                if let Some(snapshot) = objects
                    .snapshots
                    .iter()
                    .find(|snapshot| snapshot.metadata.name.as_deref() == Some(name.as_str()))
                {
                    let (phase, ready) = snapshot_state(snapshot);
                    if ready {
                        return Ok(snapshot_view(snapshot));
                    }
                    if phase == "Failed" {
                        return Err(BackendError::new(
                            ErrorKind::Internal,
                            format!(
                                "snapshot {name:?} of {vm} failed: {}",
                                snapshot
                                    .data
                                    .pointer("/status/error/message")
                                    .and_then(Value::as_str)
                                    .unwrap_or("no reason given")
                            ),
                        ));
                    }
                }
                if Instant::now() >= deadline {
                    return Err(BackendError::new(
                        ErrorKind::Internal,
                        format!(
                            "snapshot {name:?} of {vm} was created but is not ready after {OPERATION_TIMEOUT:?}; check the VirtualMachineSnapshot's status"
                        ),
                    ));
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        })
    }

    fn snapshot_restore(&self, vm: VmRef, snapshot: String) -> BoxFuture<'_, BackendResult<VmView>> {
        Box::pin(async move { self.restore(&vm, &snapshot).await })
    }

    fn snapshot_delete(&self, vm: VmRef, snapshot: String) -> BoxFuture<'_, BackendResult<()>> {
        Box::pin(async move {
            let objects = self.visible(&vm).await?;
            if !objects
                .snapshots
                .iter()
                .any(|candidate| candidate.metadata.name.as_deref() == Some(snapshot.as_str()))
            {
                return Err(BackendError::new(
                    ErrorKind::NotFound,
                    format!("virtual machine {vm} has no snapshot {snapshot:?}"),
                ));
            }
            self.delete_object(&Kind::Snapshot.resource(), &vm.namespace, &snapshot, json!({}))
                .await?;
            self.wait_for(&vm, SETTLE_PATIENCE, |objects| {
                !objects
                    .snapshots
                    .iter()
                    .any(|candidate| candidate.metadata.name.as_deref() == Some(snapshot.as_str()))
            })
            .await;
            Ok(())
        })
    }

    fn screenshot(&self, vm: VmRef) -> BoxFuture<'_, BackendResult<Vec<u8>>> {
        Box::pin(async move {
            let request = http::Request::get(subresource_path(
                "virtualmachineinstances",
                &vm.namespace,
                &vm.name,
                "vnc/screenshot",
            ))
            .body(Vec::new())
            .map_err(|error| BackendError::new(ErrorKind::Internal, error.to_string()))?;
            self.send(
                request,
                &subresource_permission("get", "virtualmachineinstances", "vnc", &vm.namespace, &vm.name),
            )
            .await
        })
    }

    fn console_access(&self, vm: VmRef) -> BoxFuture<'_, BackendResult<ConsoleAccessView>> {
        Box::pin(async move {
            // Each console is its own subresource with its own RBAC rule: review both, so a
            // user allowed one learns exactly what the other needs.
            let review = |subresource: &'static str| {
                let permission = subresource_permission(
                    "get",
                    "virtualmachineinstances",
                    subresource,
                    &vm.namespace,
                    &vm.name,
                );
                async move {
                    match self.shared.access.require(&self.user, &permission).await {
                        Ok(()) => Ok(ConsoleAccess::allowed()),
                        Err(error) if error.kind == ErrorKind::Forbidden => Ok(ConsoleAccess::refused(error)),
                        Err(error) => Err(error),
                    }
                }
            };
            let (serial, vnc) = futures_util::future::join(review("console"), review("vnc")).await;
            Ok(ConsoleAccessView {
                serial: serial?,
                vnc: vnc?,
            })
        })
    }

    fn open_console(&self, vm: VmRef, kind: ConsoleKind) -> BoxFuture<'_, BackendResult<ConsoleChannel>> {
        Box::pin(async move {
            let subresource = match kind {
                ConsoleKind::Serial => "console",
                ConsoleKind::Vnc => "vnc",
            };
            console::connect(
                &self.shared.stream_client,
                &subresource_path("virtualmachineinstances", &vm.namespace, &vm.name, subresource),
                &self.user,
                subresource_permission(
                    "get",
                    "virtualmachineinstances",
                    subresource,
                    &vm.namespace,
                    &vm.name,
                ),
            )
            .await
        })
    }

    fn events(&self) -> BoxStream<'static, EventView> {
        let shared = Arc::clone(&self.shared);
        let user = Arc::clone(&self.user);
        let receiver = self.shared.events.subscribe();
        futures_util::stream::unfold(
            (receiver, shared, user),
            |(mut receiver, shared, user)| async move {
                loop {
                    let event = match receiver.recv().await {
                        Ok(event) => event,
                        Err(broadcast::error::RecvError::Lagged(missed)) => EventView::Lagged { missed },
                        Err(broadcast::error::RecvError::Closed) => return None,
                    };
                    let namespace = match &event {
                        EventView::Changed { namespace, .. }
                        | EventView::SnapshotsChanged { namespace, .. }
                        | EventView::Deleted { namespace, .. } => Some(namespace.clone()),
                        EventView::Lagged { .. } => None,
                    };
                    let visible = match namespace {
                        None => true,
                        Some(namespace) => shared
                            .access
                            .allowed(
                                &user,
                                &permission("list", &Kind::Vm.resource(), None, &namespace, None),
                            )
                            .await
                            .unwrap_or(false),
                    };
                    if visible {
                        return Some((event, (receiver, shared, user)));
                    }
                }
            },
        )
        .boxed()
    }

    fn acting_as(&self, user: &UserInfo) -> Option<Arc<dyn Backend>> {
        Some(Arc::new(UserBackend {
            shared: Arc::clone(&self.shared),
            user: Arc::new(user.clone()),
        }))
    }

    fn migrate(&self, vm: VmRef) -> BoxFuture<'_, BackendResult<VmView>> {
        Box::pin(async move {
            let objects = self.visible(&vm).await?;
            self.subresource("virtualmachines", &vm, "migrate", json!({}))
                .await?;
            self.settled_view(&vm, &objects).await
        })
    }

    fn set_snapshot_schedule(
        &self,
        vm: VmRef,
        policy: Option<paddock_api::app::SnapshotPolicy>,
    ) -> BoxFuture<'_, BackendResult<VmView>> {
        Box::pin(async move {
            let objects = self.visible(&vm).await?;
            let Some(app) = objects.managing_app() else {
                return Err(BackendError::new(
                    ErrorKind::Unsupported,
                    format!(
                        "cannot schedule snapshots of virtual machine {vm}: it is not managed by a VirtualMachineApp, and only the paddock operator runs schedules; take snapshots on request instead"
                    ),
                ));
            };
            // A merge patch with null removes the field: clearing means no scheduled snapshots.
            let snapshots = match &policy {
                Some(policy) => serde_json::to_value(policy).map_err(|error| {
                    BackendError::new(
                        ErrorKind::Internal,
                        format!("cannot encode the snapshot schedule: {error}"),
                    )
                })?,
                None => Value::Null,
            };
            self.merge_patch(
                &Kind::App.resource(),
                &vm.namespace,
                &app,
                &json!({"spec": {"snapshots": snapshots}}),
            )
            .await?;
            self.settled_view(&vm, &objects).await
        })
    }

    fn upload_disk(
        &self,
        request: UploadRequest,
        body: paddock_cluster::upload::DiskStream,
    ) -> BoxFuture<'_, BackendResult<UploadView>> {
        Box::pin(self.upload_disk_as_user(request, body))
    }

    fn upload_status(&self, namespace: String, name: String) -> BoxFuture<'_, BackendResult<UploadView>> {
        Box::pin(async move { self.upload_status_as_user(&namespace, &name).await })
    }

    fn backup_create(
        &self,
        vm: VmRef,
        request: BackupRequest,
    ) -> BoxFuture<'_, BackendResult<OperationView>> {
        Box::pin(self.backup_as_user(vm, request))
    }

    fn backup_list(&self, request: BackupListRequest) -> BoxFuture<'_, BackendResult<Vec<BackupView>>> {
        Box::pin(self.backup_list_as_user(request))
    }

    fn backup_restore(&self, request: RestoreRequest) -> BoxFuture<'_, BackendResult<OperationView>> {
        Box::pin(self.restore_as_user(request))
    }

    fn operation(&self, id: String) -> BoxFuture<'_, BackendResult<OperationView>> {
        Box::pin(async move { self.operation_as_user(&id).await })
    }

    fn operation_list(&self) -> BoxFuture<'_, BackendResult<Vec<OperationView>>> {
        Box::pin(self.operation_list_as_user())
    }

    fn clone_vm(&self, vm: VmRef, target: String) -> BoxFuture<'_, BackendResult<VmRef>> {
        Box::pin(async move {
            let objects = self.visible(&vm).await?;
            if objects.vm.is_none() {
                return Err(BackendError::new(
                    ErrorKind::InvalidTransition,
                    format!(
                        "virtual machine {vm} has no KubeVirt VirtualMachine yet; wait until it is provisioned"
                    ),
                ));
            }
            let resource = clone_resource();
            let created = self
                .create_object(
                    &resource,
                    &vm.namespace,
                    &json!({
                        "apiVersion": "clone.kubevirt.io/v1beta1",
                        "kind": "VirtualMachineClone",
                        "metadata": {"generateName": format!("{}-clone-", vm.name), "labels": {"app.kubernetes.io/managed-by": "paddock-console"}},
                        "spec": {
                            "source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": vm.name},
                            "target": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": target},
                        },
                    }),
                )
                .await?;
            let name = created["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let deadline = Instant::now() + OPERATION_TIMEOUT;
            loop {
                let clone = self.get_object(&resource, &vm.namespace, &name).await?;
                match clone["status"]["phase"].as_str() {
                    Some("Succeeded") => break,
                    Some("Failed") => {
                        return Err(BackendError::new(
                            ErrorKind::Internal,
                            format!("cloning {vm} into {target:?} failed; see VirtualMachineClone {name}"),
                        ));
                    }
                    _ => {}
                }
                if Instant::now() >= deadline {
                    return Err(BackendError::new(
                        ErrorKind::Internal,
                        format!(
                            "cloning {vm} into {target:?} did not finish within {OPERATION_TIMEOUT:?}; see VirtualMachineClone {name}"
                        ),
                    ));
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            let clone = VmRef {
                namespace: vm.namespace.clone(),
                name: target,
            };
            self.wait_for(&clone, SETTLE_PATIENCE, |objects| objects.vm.is_some())
                .await;
            Ok(clone)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_server_refusals_keep_their_words_and_name_the_permission() {
        let needed = subresource_permission("update", "virtualmachines", "start", "vms", "demo");
        let mut status = kube::core::Status::failure(
            "virtualmachines.subresources.kubevirt.io \"demo\" is forbidden: User \"alice\" cannot update resource \"virtualmachines/start\"",
            "Forbidden",
        );
        status.code = 403;
        let error = status_error(&status, &needed);
        assert_eq!(error.kind, ErrorKind::Forbidden);
        assert_eq!(error.permission.as_deref(), Some(&needed));
        assert!(
            error
                .message
                .starts_with("virtualmachines.subresources.kubevirt.io \"demo\" is forbidden")
        );
        assert!(
            error.message.contains(
                "update virtualmachines/start in API group subresources.kubevirt.io in namespace vms"
            )
        );

        for (code, reason, message, kind) in [
            (404, "NotFound", "not found", ErrorKind::NotFound),
            (409, "AlreadyExists", "exists", ErrorKind::AlreadyExists),
            (
                409,
                "Conflict",
                "VM is already running",
                ErrorKind::InvalidTransition,
            ),
            (
                400,
                "BadRequest",
                "VMI is not running",
                ErrorKind::InvalidTransition,
            ),
            (422, "Invalid", "spec.x: Invalid value", ErrorKind::InvalidSpec),
            (500, "InternalError", "boom", ErrorKind::Internal),
        ] {
            let mut status = kube::core::Status::failure(message, reason);
            status.code = code;
            let error = status_error(&status, &needed);
            assert_eq!(
                (error.kind, error.permission.is_none()),
                (kind, true),
                "{code} {message}"
            );
            assert!(error.message.contains(message));
        }
    }

    #[test]
    fn impersonation_names_the_user_and_every_group() {
        let mut headers = http::HeaderMap::new();
        let user = UserInfo {
            username: "system:serviceaccount:vms:alice".into(),
            uid: Some("u1".into()),
            groups: vec!["system:serviceaccounts".into(), "system:authenticated".into()],
            extra: Default::default(),
        };
        impersonate(&mut headers, &user).unwrap();
        assert_eq!(headers["Impersonate-User"], "system:serviceaccount:vms:alice");
        let groups: Vec<_> = headers.get_all("Impersonate-Group").iter().collect();
        assert_eq!(groups, ["system:serviceaccounts", "system:authenticated"]);
    }
}
