//! `admission-bench`: the latency and memory of paddock's admission webhooks at a fixed request rate
//! (issue 6: p99 ≤ 1 ms and RSS ≤ 20 MiB at 2,000 requests/s), measured straight against the webhook
//! server, without an API server in between.
//!
//! It starts the webhook server as a child process (`paddock_admission::serve_standalone`, one
//! runtime thread, its own CA, Zarf considered installed) so the child's RSS is the server's alone,
//! then an open-loop load generator sends AdmissionReviews over HTTPS/1.1 keep-alive connections at
//! the requested rate, a third each to the VirtualMachineApp defaults, the DataVolume Zarf rule and
//! the VirtualMachineApp validation, with at most `--connections` requests in flight (an API server's
//! webhook client pool). Requests are dispatched on a fixed schedule whatever the answers do (open
//! loop), and latency runs from dispatch, waiting for a free connection included, so a stalled
//! server cannot hide its queue; the dispatcher's own lag behind the schedule (tokio's timer has a
//! 1 ms resolution) is printed apart. Every answer is checked: status 200, the request's uid
//! echoed, a patch where one is expected.
//!
//! With `--pepr-url` and `--pepr-ca` it also measures a Pepr module doing the DataVolume mutation
//! (see `bench/admission.sh`) at the same rate and prints the ratio.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(about = "Admission webhook latency and RSS at a fixed request rate")]
struct Arguments {
    /// Requests per second.
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Warm-up seconds, not measured.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Requests in flight at most (connections kept open), as an API server's webhook client pool.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Serve the webhooks on this port and print the CA, then READY (used by the parent run).
    #[arg(long, hide = true)]
    serve: Option<u16>,
    /// A Pepr module's mutate URL for the DataVolume mutation, to measure at the same rate.
    #[arg(long)]
    pepr_url: Option<String>,
    /// The PEM CA of the Pepr module's serving certificate.
    #[arg(long)]
    pepr_ca: Option<std::path::PathBuf>,
    /// The Pepr module's process id, to report its RSS.
    #[arg(long)]
    pepr_pid: Option<u32>,
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
    if let Some(port) = arguments.serve {
        return serve(port);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(setup("cannot start the load generator's runtime"))?;
    runtime.block_on(run(arguments))
}

/// The child: one runtime thread, a fresh CA, Zarf installed.
fn serve(port: u16) -> Result<(), BenchError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(setup("cannot start the server's runtime"))?;
    let material = paddock_admission::tls::Material::generate(
        &paddock_admission::TlsOptions::new("bench"),
        &["127.0.0.1".to_owned()],
    )
    .map_err(setup("cannot issue the certificate"))?;
    let context = paddock_admission::review::ReviewContext {
        zarf: paddock_admission::zarf::ZarfState::fixed(Some(paddock_admission::zarf::ZarfFacts {
            registry_address: Some("127.0.0.1:31999".to_owned()),
        })),
        host_volume_policy: paddock_admission::HostVolumePolicy::LabelledNamespaces,
    };
    let http = paddock_admission::HttpOptions {
        listen: ([127, 0, 0, 1], port).into(),
        body_limit: 6 * 1024 * 1024,
        request_timeout: Duration::from_secs(5),
        metrics: paddock_admission::AdmissionMetrics::default(),
    };
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{}READY", material.ca_bundle());
    let _ = stdout.flush();
    runtime
        .block_on(paddock_admission::serve_standalone(
            http,
            &material,
            context,
            std::future::pending(),
        ))
        .map_err(setup("the server failed"))
}

fn review(kind: (&str, &str, &str), resource: &str, object: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": kind.0, "version": kind.1, "kind": kind.2},
            "resource": {"group": kind.0, "version": kind.1, "resource": resource},
            "name": object["metadata"]["name"],
            "namespace": "default",
            "operation": "CREATE",
            "userInfo": {"username": "admin", "groups": ["system:masters", "system:authenticated"]},
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

fn app() -> Value {
    json!({
        "apiVersion": "paddock.dev/v1alpha1", "kind": "VirtualMachineApp",
        "metadata": {"name": "debian", "namespace": "default", "uid": "0b3c6c1e-2f1a-4b53-9d55-3f6f7a1d2c11",
                     "creationTimestamp": "2026-01-01T00:00:00Z", "labels": {"app.kubernetes.io/part-of": "debian"}},
        "spec": {"image": {"containerDisk": "quay.io/containerdisks/debian:12", "persistent": true},
                 "disk": {"size": "10Gi"}, "runStrategy": "Always",
                 "console": {"vnc": true, "serial": true, "baffles": {"enabled": true, "category": "vm"}},
                 "cloudInit": {"userData": "#cloud-config\npackages: [nginx]\n",
                               "sshKeys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop"]},
                 "snapshots": {"schedule": "0 3 * * *", "keep": 7}}
    })
}

fn data_volume() -> Value {
    json!({
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": "debian-disk", "namespace": "default",
                     "annotations": {"cdi.kubevirt.io/storage.bind.immediate.requested": "true"}},
        "spec": {"source": {"registry": {"url": "docker://quay.io/containerdisks/debian:12"}},
                 "storage": {"resources": {"requests": {"storage": "10Gi"}}}}
    })
}

/// One kind of request: its path, body and whether the answer must carry a patch.
struct Workload {
    name: &'static str,
    path: String,
    body: bytes::Bytes,
    patched: bool,
}

fn build_workloads() -> Result<Vec<Workload>, BenchError> {
    let encode = |value: Value| {
        serde_json::to_vec(&value)
            .map(bytes::Bytes::from)
            .map_err(setup("cannot encode"))
    };
    Ok(vec![
        Workload {
            name: "mutate VirtualMachineApp",
            path: "/mutate/virtualmachineapps".to_owned(),
            body: encode(review(
                ("paddock.dev", "v1alpha1", "VirtualMachineApp"),
                "virtualmachineapps",
                app(),
            ))?,
            patched: true,
        },
        Workload {
            name: "mutate DataVolume (Zarf)",
            path: "/mutate/datavolumes".to_owned(),
            body: encode(review(
                ("cdi.kubevirt.io", "v1beta1", "DataVolume"),
                "datavolumes",
                data_volume(),
            ))?,
            patched: true,
        },
        Workload {
            name: "validate VirtualMachineApp",
            path: "/validate/virtualmachineapps".to_owned(),
            body: encode(review(
                ("paddock.dev", "v1alpha1", "VirtualMachineApp"),
                "virtualmachineapps",
                app(),
            ))?,
            patched: false,
        },
    ])
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

/// Latencies and failures of one measured run, per workload index.
struct Measured {
    latencies: Vec<Vec<Duration>>,
    failures: Vec<String>,
    lags: Vec<Duration>,
    sent: usize,
    elapsed: Duration,
}

async fn load(
    client: reqwest::Client,
    base: &str,
    workloads: Arc<Vec<Workload>>,
    rate: u32,
    connections: usize,
    warmup: Duration,
    measured: Duration,
) -> Measured {
    let results = Arc::new(Mutex::new((
        vec![Vec::new(); workloads.len()],
        Vec::new(),
        Vec::new(),
    )));
    let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let end = started + warmup + measured;
    let measure_from = started + warmup;
    let mut sent = 0usize;
    let mut tasks = tokio::task::JoinSet::new();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(connections.max(1)));
    loop {
        let scheduled = interval.tick().await.into_std();
        if scheduled >= end {
            break;
        }
        let index = sent % workloads.len();
        sent += 1;
        let client = client.clone();
        let workloads = Arc::clone(&workloads);
        let results = Arc::clone(&results);
        let url = format!("{base}{}", workloads[index].path);
        let in_flight = Arc::clone(&in_flight);
        tasks.spawn(async move {
            let workload = &workloads[index];
            // tokio's timer has a 1 ms resolution, so ticks fire up to 1 ms after their scheduled
            // instant; latency runs from when the request is dispatched (waiting for a free
            // connection included) and the dispatch lag is reported apart.
            let dispatched = Instant::now();
            let Ok(_permit) = in_flight.acquire().await else {
                return;
            };
            let outcome = async {
                let response = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(workload.body.clone())
                    .send()
                    .await
                    .map_err(|error| error.to_string())?;
                let status = response.status();
                let body = response.bytes().await.map_err(|error| error.to_string())?;
                if status != reqwest::StatusCode::OK {
                    return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
                }
                // Cheap checks keep the load generator from becoming the bottleneck.
                let contains = |needle: &[u8]| body.windows(needle.len()).any(|window| window == needle);
                if !contains(b"705ab4f5-6393-11e8-b7cc-42010a800002") || !contains(b"\"allowed\":true") {
                    return Err(format!("unexpected answer {}", String::from_utf8_lossy(&body)));
                }
                if workload.patched != contains(b"\"patch\"") {
                    return Err(format!(
                        "patch expected: {}, got {}",
                        workload.patched,
                        String::from_utf8_lossy(&body)
                    ));
                }
                Ok(())
            }
            .await;
            let latency = dispatched.elapsed();
            let lag = dispatched.saturating_duration_since(scheduled);
            if scheduled >= measure_from
                && let Ok(mut results) = results.lock()
            {
                match outcome {
                    Ok(()) => {
                        results.0[index].push(latency);
                        results.2.push(lag);
                    }
                    Err(error) => results.1.push(format!("{}: {error}", workload.name)),
                }
            }
        });
        // Reap finished tasks now and then so the set does not grow without bound.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed().saturating_sub(warmup);
    let (latencies, failures, lags) = match Arc::try_unwrap(results) {
        Ok(results) => results.into_inner().unwrap_or_default(),
        Err(shared) => shared.lock().map(|results| results.clone()).unwrap_or_default(),
    };
    Measured {
        latencies,
        failures,
        lags,
        sent,
        elapsed,
    }
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn micros(duration: Duration) -> String {
    format!("{:.0} µs", duration.as_secs_f64() * 1e6)
}

fn print_row(name: &str, latencies: &mut [Duration]) -> Duration {
    latencies.sort_unstable();
    let p99 = percentile(latencies, 0.99);
    println!(
        "| {name} | {} | {} | {} | {} | {} | {} |",
        latencies.len(),
        micros(percentile(latencies, 0.50)),
        micros(percentile(latencies, 0.90)),
        micros(p99),
        micros(percentile(latencies, 0.999)),
        micros(latencies.last().copied().unwrap_or_default()),
    );
    p99
}

fn https_client(ca_pem: &[u8]) -> Result<reqwest::Client, BenchError> {
    let certificate = reqwest::Certificate::from_pem(ca_pem).map_err(setup("cannot read the CA"))?;
    reqwest::Client::builder()
        .tls_certs_only([certificate])
        .http1_only()
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .build()
        .map_err(setup("cannot build the client"))
}

async fn run(arguments: Arguments) -> Result<(), BenchError> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_err(setup("cannot find a free port"))?
        .port();
    let executable = std::env::current_exe().map_err(setup("cannot find this executable"))?;
    let mut child = Command::new(executable)
        .args(["--serve", &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(setup("cannot start the webhook server"))?;
    let pid = child.id();
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| BenchError::Setup("no stdout".to_owned()))?;
    let mut ca = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(setup("cannot read the server's output"))?;
        if let Some(rest) = line.strip_suffix("READY") {
            ca.push_str(rest);
            break;
        }
        ca.push_str(&line);
        ca.push('\n');
    }
    let idle_rss = {
        tokio::time::sleep(Duration::from_millis(300)).await;
        rss_kib(pid, "VmRSS:").unwrap_or(0)
    };
    let workloads = Arc::new(build_workloads()?);
    let client = https_client(ca.as_bytes())?;
    let base = format!("https://127.0.0.1:{port}");

    // Sample the server's RSS while it is under load.
    let sampling = Arc::new(Mutex::new(0u64));
    let sampler = {
        let sampling = Arc::clone(&sampling);
        tokio::spawn(async move {
            loop {
                if let (Some(rss), Ok(mut peak)) = (rss_kib(pid, "VmRSS:"), sampling.lock()) {
                    *peak = (*peak).max(rss);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let cpu_before = process_cpu_seconds(pid);
    let mut measured = load(
        client,
        &base,
        Arc::clone(&workloads),
        arguments.rate,
        arguments.connections,
        Duration::from_secs(arguments.warmup),
        Duration::from_secs(arguments.seconds),
    )
    .await;
    let cpu_used = process_cpu_seconds(pid) - cpu_before;
    sampler.abort();
    let peak_rss = sampling.lock().map(|peak| *peak).unwrap_or(0);
    let high_water = rss_kib(pid, "VmHWM:").unwrap_or(0);
    let _ = child.kill();
    let _ = child.wait();

    let measured_count: usize = measured.latencies.iter().map(Vec::len).sum();
    println!("# paddock admission webhook at {} requests/s", arguments.rate);
    println!();
    println!(
        "machine: {} cores, load average {}; server: 1 runtime thread; client: HTTPS/1.1 keep-alive, at most {} requests in flight; {} s warm-up + {} s measured",
        std::thread::available_parallelism().map_or(0, usize::from),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        arguments.connections,
        arguments.warmup,
        arguments.seconds,
    );
    println!(
        "sent {} requests, {} measured answers in {:.1} s = {:.0} answers/s; server CPU {:.0}% of one core",
        measured.sent,
        measured_count,
        measured.elapsed.as_secs_f64(),
        measured_count as f64 / measured.elapsed.as_secs_f64(),
        100.0 * cpu_used / (arguments.warmup + arguments.seconds) as f64,
    );
    println!();
    println!("| webhook | answers | p50 | p90 | p99 | p99.9 | max |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (workload, latencies) in workloads.iter().zip(measured.latencies.iter_mut()) {
        print_row(workload.name, latencies);
    }
    let mut all: Vec<Duration> = measured.latencies.concat();
    let p99 = print_row("all", &mut all);
    measured.lags.sort_unstable();
    println!(
        "(load generator dispatch lag behind the schedule, not counted above: p50 {}, p99 {})",
        micros(percentile(&measured.lags, 0.5)),
        micros(percentile(&measured.lags, 0.99))
    );
    println!();
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "server RSS: {:.1} MiB idle, {:.1} MiB peak sampled under load, {:.1} MiB high-water mark",
        mib(idle_rss),
        mib(peak_rss),
        mib(high_water)
    );
    let verdict = |pass: bool| if pass { "PASS" } else { "MISS" };
    println!();
    println!("| target | measured | |");
    println!("| --- | --- | --- |");
    println!(
        "| p99 ≤ 1 ms | {} | {} |",
        micros(p99),
        verdict(p99 <= Duration::from_millis(1))
    );
    println!(
        "| RSS ≤ 20 MiB | {:.1} MiB | {} |",
        mib(high_water),
        verdict(high_water <= 20 * 1024)
    );
    println!(
        "| errors = 0 | {} | {} |",
        measured.failures.len(),
        verdict(measured.failures.is_empty())
    );
    for failure in measured.failures.iter().take(5) {
        println!("  failure: {failure}");
    }

    if let (Some(url), Some(ca_path)) = (&arguments.pepr_url, &arguments.pepr_ca) {
        let ca = std::fs::read(ca_path).map_err(setup("cannot read the Pepr CA"))?;
        let pepr = https_client(&ca)?;
        let data_volume_only = Arc::new(
            build_workloads()?
                .into_iter()
                .filter(|workload| workload.path == "/mutate/datavolumes")
                .collect::<Vec<_>>(),
        );
        let (base, path) = url.split_at(url.find("/mutate").unwrap_or(url.len()));
        let pepr_workload = Arc::new(vec![Workload {
            name: "Pepr: mutate DataVolume",
            path: path.to_owned(),
            body: data_volume_only[0].body.clone(),
            patched: true,
        }]);
        let mut pepr_measured = load(
            pepr,
            base,
            pepr_workload,
            arguments.rate,
            arguments.connections,
            Duration::from_secs(arguments.warmup),
            Duration::from_secs(arguments.seconds),
        )
        .await;
        println!();
        println!("| webhook | answers | p50 | p90 | p99 | p99.9 | max |");
        println!("| --- | --- | --- | --- | --- | --- | --- |");
        let pepr_p99 = print_row("Pepr: mutate DataVolume", &mut pepr_measured.latencies[0]);
        let paddock_p99 = percentile(&measured.latencies[1], 0.99);
        println!(
            "Pepr errors: {}; p99 ratio Pepr / paddock (DataVolume mutation): {:.1}×",
            pepr_measured.failures.len(),
            pepr_p99.as_secs_f64() / paddock_p99.as_secs_f64().max(1e-9)
        );
        if let Some(pid) = arguments.pepr_pid {
            println!(
                "Pepr RSS: {:.1} MiB now, {:.1} MiB high-water mark",
                mib(rss_kib(pid, "VmRSS:").unwrap_or(0)),
                mib(rss_kib(pid, "VmHWM:").unwrap_or(0))
            );
        }
        for failure in pepr_measured.failures.iter().take(3) {
            println!("  failure: {failure}");
        }
    }
    Ok(())
}

/// User plus system CPU seconds of a process, from `/proc/<pid>/stat`.
fn process_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th there.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|field| field.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|field| field.parse::<f64>().ok())
            .unwrap_or(0.0);
    // USER_HZ is 100 on every Linux this runs on.
    ticks / 100.0
}
