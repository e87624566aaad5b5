//! `operator-bench`: how long the paddock operator takes to converge 2,000 VirtualMachineApps and how
//! much memory it needs for it (issue 6: ≤ 30 s and ≤ 64 MiB), on the real test control plane
//! (kube-apiserver, etcd, kube-controller-manager and the KubeVirt/CDI simulator, started by
//! `paddock_tests::cluster::Cluster::shared`) with the real `paddock operator` process.
//!
//! The run, in one process and one control plane:
//! 1. anchor: the bench creates the apps in a namespace no operator watches, `--in-flight` requests
//!    at a time, and times it (what kube-apiserver needs just to store them), then deletes them;
//! 2. `paddock operator --namespace <another namespace>` starts; once it leads and its caches have
//!    synced, the bench creates the same apps there the same way and watches them until every one is
//!    converged (see [`converged`]), sampling the operator's RSS (`VmRSS` every 100 ms and the
//!    kernel's high-water mark `VmHWM`);
//! 3. steady state: a few seconds later the operator's own write counter must not have moved;
//! 4. restart: the operator is stopped (SIGTERM) and started again; the new process reconciles every
//!    app from its initial list, and the bench reports how long that takes and how many writes it
//!    sent (none expected: every child is already as desired).
//!
//! The apps boot from an ephemeral containerDisk with `runStrategy: Halted`: no DataVolume import,
//! no VMI, no QEMU (the simulator boots QEMU only for console requests), so what is measured is the
//! operator, the API server and the simulated virt-controller reporting the VMs `Stopped`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{StreamExt as _, TryStreamExt as _};
use kube::{
    Api,
    api::{DeleteParams, DynamicObject, ListParams, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};
use paddock_tests::cluster::Cluster;
use paddock_tests::world::{baffles_applications, virtual_machine_apps, virtual_machines};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(about = "Time and memory of the paddock operator converging many VirtualMachineApps")]
struct Arguments {
    /// How many VirtualMachineApps.
    #[arg(long, default_value_t = 2000)]
    apps: usize,
    /// Creation requests in flight at once (anchor and measured run alike).
    #[arg(long, default_value_t = 16)]
    in_flight: usize,
    /// The operator's `--concurrency` (reconciles at once per controller).
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Give up after this many seconds of waiting for convergence.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Skip the restart phase.
    #[arg(long)]
    no_restart: bool,
}

#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error("{0}")]
    Setup(String),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> BenchError + '_ {
    move |error| BenchError::Setup(format!("{what}: {error}"))
}

fn main() -> Result<(), BenchError> {
    let arguments = Arguments::parse();
    let started = Instant::now();
    let cluster = Cluster::shared()
        .map_err(setup("cannot start the test control plane"))?
        .ok_or_else(|| BenchError::Setup("the test control plane was skipped".to_owned()))?;
    println!(
        "control plane up in {:.1} s (state in {})",
        started.elapsed().as_secs_f64(),
        cluster.state_dir().display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(setup("cannot start the bench's runtime"))?;
    runtime.block_on(run(cluster, arguments))
}

fn app(index: usize) -> Value {
    json!({
        "apiVersion": "paddock.dev/v1alpha1",
        "kind": "VirtualMachineApp",
        "metadata": {"name": format!("app-{index:05}")},
        "spec": {
            "displayName": format!("Bench app {index}"),
            "image": {"containerDisk": "registry.bench.invalid/vms/disk:1", "persistent": false},
            "resources": {"cpu": 1, "memory": "128Mi"},
            "runStrategy": "Halted",
        },
    })
}

/// Whether an app's status says its children exist and are as the app wants: the status is of the
/// current generation, the phase is `Stopped` (the VirtualMachine exists and the simulated
/// virt-controller reports it Stopped, as `runStrategy: Halted` asks), `DiskReady` is True (the
/// ephemeral boot volume needs no import) and `BafflesRegistered` is True (the BafflesApplication
/// was applied).
fn converged(app: &DynamicObject) -> bool {
    let status = &app.data["status"];
    let condition_true = |kind: &str| {
        status["conditions"].as_array().is_some_and(|conditions| {
            conditions
                .iter()
                .any(|condition| condition["type"] == kind && condition["status"] == "True")
        })
    };
    status["observedGeneration"].as_i64().is_some()
        && status["observedGeneration"].as_i64() == app.metadata.generation
        && status["phase"] == "Stopped"
        && condition_true("DiskReady")
        && condition_true("BafflesRegistered")
}

/// Creates `count` apps in `api`'s namespace, `in_flight` at a time; returns how long it took.
async fn create_apps(
    api: &Api<DynamicObject>,
    count: usize,
    in_flight: usize,
) -> Result<Duration, BenchError> {
    let started = Instant::now();
    futures_util::stream::iter(0..count)
        .map(|index| async move {
            let object: DynamicObject =
                serde_json::from_value(app(index)).map_err(setup("cannot build an app"))?;
            api.create(&PostParams::default(), &object)
                .await
                .map_err(setup("cannot create an app"))
        })
        .buffer_unordered(in_flight.max(1))
        .try_for_each(|_| async { Ok(()) })
        .await?;
    Ok(started.elapsed())
}

fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|line| line.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// User plus system CPU seconds of a process, from `/proc/<pid>/stat` (USER_HZ = 100).
fn process_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|field| field.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// A `paddock operator` process scoped to one namespace, with its log in a file; killed on drop.
struct Operator {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Operator {
    fn start(
        cluster: &Cluster,
        namespace: &str,
        concurrency: u16,
        log: &Path,
    ) -> Result<Operator, BenchError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(setup("cannot find a free port"))?
            .port();
        let binary = paddock_tests::world::paddock_binary().map_err(setup("cannot find paddock"))?;
        let output = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(setup("cannot open the operator log"))?;
        let errors = output
            .try_clone()
            .map_err(setup("cannot open the operator log"))?;
        let child = Command::new(binary)
            .args([
                "operator",
                "--namespace",
                namespace,
                "--lease-namespace",
                namespace,
            ])
            .args(["--identity", "operator-bench", "--retry-period-seconds", "1"])
            .args(["--console-gateway-url", "wss://console.bench.invalid"])
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("KUBECONFIG", cluster.admin_kubeconfig())
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("PADDOCK_BENCH_OPERATOR_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(errors)
            .spawn()
            .map_err(setup("cannot start paddock operator"))?;
        Ok(Operator {
            child,
            port,
            log: log.to_owned(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn metrics(&self) -> Option<String> {
        let response = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.port))
            .await
            .ok()?;
        response.text().await.ok()
    }

    /// Waits until this process leads and its caches have synced (`/readyz` on a leader).
    async fn wait_leading(&self, timeout: Duration) -> Result<(), BenchError> {
        let deadline = Instant::now() + timeout;
        loop {
            let leading = self
                .metrics()
                .await
                .is_some_and(|metrics| metrics.contains("paddock_operator_leader 1"));
            let ready = reqwest::get(format!("http://127.0.0.1:{}/readyz", self.port))
                .await
                .is_ok_and(|response| response.status().is_success());
            if leading && ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Setup(format!(
                    "the operator did not lead and sync within {timeout:?}; its threads (name: kernel wait channel): {}; log:\n{}",
                    self.threads(),
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Each thread's name and kernel wait channel, to tell a stalled process from an idle one.
    fn threads(&self) -> String {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return String::new();
        };
        tasks
            .filter_map(Result::ok)
            .map(|task| {
                let read = |file: &str| {
                    std::fs::read_to_string(task.path().join(file))
                        .unwrap_or_default()
                        .trim()
                        .to_owned()
                };
                format!("{}: {}", read("comm"), read("wchan"))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read(&self.log).unwrap_or_default();
        let start = log.len().saturating_sub(4000);
        String::from_utf8_lossy(&log[start..]).into_owned()
    }

    /// SIGTERM, then waits for the exit.
    fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sum of every sample of `family` (a counter's `_total` series) whose labels contain `labels`.
fn metric_sum(metrics: &str, family: &str, labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(family) && line.contains(labels))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>()
        // An empty sum is -0.0, printed "-0".
        + 0.0
}

/// Samples a process's `VmRSS` every 100 ms on its own thread; the peak seen so far, in KiB.
struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_peak, thread_stop) = (Arc::clone(&peak), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !thread_stop.load(Ordering::Relaxed) {
                if let Some(rss) = rss_kib(pid, "VmRSS:") {
                    thread_peak.fetch_max(rss, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        RssSampler { peak, stop }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

async fn run(cluster: &'static Cluster, arguments: Arguments) -> Result<(), BenchError> {
    let client = cluster
        .admin_client()
        .await
        .map_err(setup("cannot connect to the control plane"))?;
    let count = arguments.apps;
    let timeout = Duration::from_secs(arguments.timeout);
    // PADDOCK_BENCH_KEEP=1 keeps the operator's log for inspection.
    let work_directory = tempfile::tempdir().map_err(setup("cannot create a work directory"))?;
    let (work, _work_guard) = if std::env::var_os("PADDOCK_BENCH_KEEP").is_some_and(|keep| keep == "1") {
        (work_directory.keep(), None)
    } else {
        (work_directory.path().to_owned(), Some(work_directory))
    };

    // 1. The anchor: the same creations with no operator watching.
    let anchor_namespace = cluster
        .namespace("bench-anchor")
        .await
        .map_err(setup("cannot create the anchor namespace"))?;
    let anchor_api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), anchor_namespace.name(), &virtual_machine_apps());
    let anchor = create_apps(&anchor_api, count, arguments.in_flight).await?;
    println!(
        "anchor: kube-apiserver created {count} VirtualMachineApps in {:.2} s ({:.0}/s), {} in flight",
        anchor.as_secs_f64(),
        count as f64 / anchor.as_secs_f64(),
        arguments.in_flight
    );
    anchor_api
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .map_err(setup("cannot delete the anchor's apps"))?;
    let deadline = Instant::now() + timeout;
    while !anchor_api
        .list(&ListParams::default().limit(1))
        .await
        .map_err(setup("cannot list the anchor's apps"))?
        .items
        .is_empty()
    {
        if Instant::now() > deadline {
            return Err(BenchError::Setup(
                "the anchor's apps were never deleted".to_owned(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // 2. The operator converging the same apps.
    let namespace = cluster
        .namespace("bench-operator")
        .await
        .map_err(setup("cannot create the operator's namespace"))?;
    let log = work.join("operator.log");
    println!("operator log: {}", log.display());
    let mut operator = Operator::start(cluster, namespace.name(), arguments.concurrency, &log)?;
    operator.wait_leading(Duration::from_secs(60)).await?;
    let idle_rss = rss_kib(operator.pid(), "VmRSS:").unwrap_or(0);
    let sampler = RssSampler::start(operator.pid());
    let cpu_before = process_cpu_seconds(operator.pid());
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace.name(), &virtual_machine_apps());

    // Watch before creating so no status is missed.
    let (ready_sender, ready_receiver) = tokio::sync::oneshot::channel::<()>();
    let watch = {
        let api = api.clone();
        tokio::spawn(async move {
            let mut converged_apps = std::collections::HashSet::new();
            let mut ready = Some(ready_sender);
            let stream = watcher(api, watcher::Config::default()).default_backoff();
            futures_util::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::InitDone) => {
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(());
                        }
                    }
                    Ok(watcher::Event::Apply(app) | watcher::Event::InitApply(app)) => {
                        let name = app.metadata.name.clone().unwrap_or_default();
                        if converged(&app) {
                            converged_apps.insert(name);
                        } else {
                            converged_apps.remove(&name);
                        }
                        if converged_apps.len() >= count {
                            return Some(Instant::now());
                        }
                    }
                    Ok(_) => {}
                    Err(error) => eprintln!("watch error (retrying): {error}"),
                }
            }
            None
        })
    };
    let _ = ready_receiver.await;
    let started = Instant::now();
    let created = create_apps(&api, count, arguments.in_flight).await?;
    println!(
        "operator run: created {count} apps in {:.2} s while the operator reconciled",
        created.as_secs_f64()
    );
    let converged_at = match tokio::time::timeout(timeout, watch).await {
        Ok(Ok(Some(at))) => at,
        _ => {
            return Err(BenchError::Setup(format!(
                "not every app converged within {timeout:?}; operator log tail:\n{}",
                operator.log_tail()
            )));
        }
    };
    let convergence = converged_at.duration_since(started);
    let cpu_used = process_cpu_seconds(operator.pid()) - cpu_before;
    let high_water = rss_kib(operator.pid(), "VmHWM:").unwrap_or(0);
    let sampled_peak = sampler.peak();
    drop(sampler);
    let metrics = operator.metrics().await.unwrap_or_default();
    let writes = metric_sum(&metrics, "paddock_operator_writes_total", "");
    let applies = metric_sum(&metrics, "paddock_operator_writes_total", "operation=\"apply\"");
    let statuses = metric_sum(&metrics, "paddock_operator_writes_total", "operation=\"status\"");
    let skipped = metric_sum(&metrics, "paddock_operator_applies_skipped_total", "");
    let reconciles = metric_sum(
        &metrics,
        "paddock_operator_reconciles_total",
        "controller=\"virtualmachineapp\"",
    );

    // Every app has exactly its children.
    let selector = ListParams::default().labels("app.kubernetes.io/managed-by=paddock");
    let vms = Api::<DynamicObject>::namespaced_with(client.clone(), namespace.name(), &virtual_machines())
        .list_metadata(&selector)
        .await
        .map_err(setup("cannot list the VMs"))?
        .items
        .len();
    let listings =
        Api::<DynamicObject>::namespaced_with(client.clone(), namespace.name(), &baffles_applications())
            .list_metadata(&selector)
            .await
            .map_err(setup("cannot list the BafflesApplications"))?
            .items
            .len();

    // 3. Steady state: nothing changes, so nothing is written.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let steady_metrics = operator.metrics().await.unwrap_or_default();
    let steady_writes = metric_sum(&steady_metrics, "paddock_operator_writes_total", "") - writes;
    let steady_high_water = rss_kib(operator.pid(), "VmHWM:").unwrap_or(0);

    // 4. Restart: a new process reconciles every app from its initial list.
    let restart = if arguments.no_restart {
        None
    } else {
        operator.terminate();
        let restarted_at = Instant::now();
        let operator = Operator::start(cluster, namespace.name(), arguments.concurrency, &log)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let metrics = operator.metrics().await.unwrap_or_default();
            let reconciled = metric_sum(
                &metrics,
                "paddock_operator_reconciles_total",
                "controller=\"virtualmachineapp\"",
            );
            if reconciled >= count as f64 {
                let elapsed = restarted_at.elapsed();
                let writes = metric_sum(&metrics, "paddock_operator_writes_total", "");
                let high_water = rss_kib(operator.pid(), "VmHWM:").unwrap_or(0);
                break Some((elapsed, reconciled, writes, high_water));
            }
            if Instant::now() > deadline {
                eprintln!(
                    "the restarted operator did not reconcile every app within {timeout:?}; log tail:\n{}",
                    operator.log_tail()
                );
                let writes = metric_sum(&metrics, "paddock_operator_writes_total", "");
                let high_water = rss_kib(operator.pid(), "VmHWM:").unwrap_or(0);
                break Some((restarted_at.elapsed(), reconciled, writes, high_water));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };

    let load = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    println!();
    println!("# paddock operator: {count} VirtualMachineApps to convergence");
    println!();
    println!(
        "machine: {} cores, load average {load}; operator --concurrency {}; apps: ephemeral containerDisk, runStrategy Halted, Baffles listing",
        std::thread::available_parallelism().map_or(0, usize::from),
        arguments.concurrency
    );
    println!(
        "operator: {reconciles:.0} app reconciles, {writes:.0} writes ({applies:.0} applies, {statuses:.0} status patches, {:.0} other) = {:.2} writes per app, {skipped:.0} applies skipped as already desired; CPU {cpu_used:.1} s",
        writes - applies - statuses,
        writes / count as f64,
    );
    let breakdown: Vec<&str> = metrics
        .lines()
        .filter(|line| line.starts_with("paddock_operator_writes_total{"))
        .map(|line| line.trim_start_matches("paddock_operator_writes_total"))
        .collect();
    println!("writes by kind and operation: {}", breakdown.join(", "));
    println!("children: {vms} VirtualMachines, {listings} BafflesApplications");
    println!(
        "RSS: {:.1} MiB idle before the apps, {:.1} MiB peak sampled, {:.1} MiB high-water mark at convergence, {:.1} MiB after 5 s of steady state",
        mib(idle_rss),
        mib(sampled_peak),
        mib(high_water),
        mib(steady_high_water)
    );
    println!("steady state: {steady_writes:.0} writes in the 5 s after convergence");
    if let Some((elapsed, reconciled, writes, high_water)) = restart {
        println!(
            "restart: a new operator process reconciled {reconciled:.0} times (every app once at least when ≥ {count}) {:.2} s after the old one stopped, with {writes:.0} writes; its RSS high-water mark {:.1} MiB",
            elapsed.as_secs_f64(),
            mib(high_water)
        );
    }
    println!();
    println!("| measure | value |");
    println!("| --- | --- |");
    println!(
        "| anchor: kube-apiserver creates {count} apps | {:.2} s |",
        anchor.as_secs_f64()
    );
    println!(
        "| operator: creation start → every app converged | {:.2} s |",
        convergence.as_secs_f64()
    );
    println!(
        "| ratio convergence / anchor | {:.2}× |",
        convergence.as_secs_f64() / anchor.as_secs_f64().max(1e-9)
    );
    println!();
    println!("| target | measured | |");
    println!("| --- | --- | --- |");
    println!(
        "| {count} apps converge ≤ 30 s | {:.2} s | {} |",
        convergence.as_secs_f64(),
        verdict(convergence <= Duration::from_secs(30))
    );
    let peak = high_water.max(steady_high_water);
    println!(
        "| operator RSS ≤ 64 MiB | {:.1} MiB | {} |",
        mib(peak),
        verdict(peak <= 64 * 1024)
    );
    println!(
        "| every app has one VM and one listing | {vms} / {listings} | {} |",
        verdict(vms == count && listings == count)
    );
    println!(
        "| no writes in steady state | {steady_writes:.0} | {} |",
        verdict(steady_writes == 0.0)
    );
    if let Some((_, _, writes, _)) = restart {
        println!(
            "| no writes after a restart | {writes:.0} | {} |",
            verdict(writes == 0.0)
        );
    }
    Ok(())
}
