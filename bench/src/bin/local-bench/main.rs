//! `local-bench`: the measuring half of `bench/local.sh` (issue 4): create→VNC-ready, snapshot
//! and restore times of the test disk under `paddock serve`, and VNC websocket throughput against
//! a direct unix-socket read and websockify on the same stream.
//!
//! Role: `bench/local.sh` builds, finds the test disk and starts `paddock serve`; this program
//! drives the server through its REST API and websockets, measures, and prints the report.
//! `bench/README.md` defines every number.
//!
//! Contract: it creates VMs named `bench-<n>` in namespace `default` and deletes them; while the
//! throughput is measured it moves the last VM's VNC socket aside (the `vnc.sock` path then
//! serves the replayed recording) and moves it back afterwards, also on failure.

mod api;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;

use crate::api::{Api, VmFiles};
use paddock_bench::rfb::{self, Reader, RfbError, Transport};
use paddock_bench::throughput::{self, Path3, Recording, ReplayServer, Websockify, read_replay};

/// The line the test disk prints on its serial console once booted (the same text as
/// `paddock_tests::testdisk::READY_BANNER`).
const READY_BANNER: &str = "PADDOCK TEST VM READY";
/// How long a boot may take (TCG on a busy machine is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// The subprotocol of paddock's console websockets (KubeVirt's).
const KUBEVIRT_SUBPROTOCOL: &str = "plain.kubevirt.io";
/// The subprotocol websockify speaks.
const WEBSOCKIFY_SUBPROTOCOL: &str = "binary";
const MIB: f64 = 1024.0 * 1024.0;

/// Measures paddock serve's local runtime; see bench/README.md.
#[derive(Debug, Parser)]
struct Arguments {
    /// The state directory of the running `paddock serve` (its serve.json gives URL and token).
    #[arg(long)]
    state_dir: PathBuf,
    /// The test disk (qcow2) the VMs boot.
    #[arg(long)]
    disk: PathBuf,
    /// The accelerator paddock serve uses (kvm or tcg), for the report.
    #[arg(long)]
    accelerator: String,
    /// Create/snapshot/restore rounds (one VM each); the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Timed reads per throughput path (after one untimed, verified warm-up read).
    #[arg(long, default_value_t = 5)]
    throughput_runs: usize,
    /// Size of the replayed stream per connection, MiB.
    #[arg(long, default_value_t = 1024)]
    stream_mib: u64,
    /// Full framebuffer updates recorded from QEMU (and requested per live session).
    #[arg(long, default_value_t = 32)]
    frames: usize,
    /// Memory of the benchmark VM, MiB (what a memory snapshot writes).
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// websockify to compare with; without it, that ratio is reported as missing.
    #[arg(long)]
    websockify: Option<PathBuf>,
    /// Where logs go.
    #[arg(long)]
    work_dir: PathBuf,
}

/// Failures of the benchmark.
#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error(transparent)]
    Rfb(#[from] RfbError),
    #[error(transparent)]
    Throughput(#[from] throughput::ThroughputError),
    #[error("cannot read {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Timeout(String),
    #[error("cannot move {from} to {to}: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
}

/// Times of one create/snapshot/restore round, seconds.
#[derive(Debug, Clone, Copy, Default)]
struct Lifecycle {
    create_returned: f64,
    banner: f64,
    vnc_ready: f64,
    guest_ready: f64,
    snapshot_memory: f64,
    snapshot_disk: f64,
    restore_memory: f64,
    frames_until_ready: usize,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let arguments = Arguments::parse();
    match run(&arguments).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("local-bench: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn read_file(path: &Path) -> Result<String, BenchError> {
    std::fs::read_to_string(path).map_err(|error| BenchError::File {
        path: path.to_path_buf(),
        message: error.to_string(),
    })
}

async fn run(arguments: &Arguments) -> Result<(), BenchError> {
    let serve_json = arguments.state_dir.join("serve.json");
    let serve: serde_json::Value =
        serde_json::from_str(&read_file(&serve_json)?).map_err(|error| BenchError::File {
            path: serve_json.clone(),
            message: error.to_string(),
        })?;
    let field = |name: &str| {
        serve
            .get(name)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let api = Api::new(&field("url"), &field("token"));
    let serve_pid = serve.get("pid").and_then(serde_json::Value::as_u64);

    println!(
        "\n== create → VNC-ready, snapshots, restore ({} round(s), one fresh VM each)",
        arguments.runs
    );
    println!("load average before: {}", load());
    let mut rounds = Vec::new();
    for round in 1..=arguments.runs {
        let name = format!("bench-{round}");
        let keep = round == arguments.runs;
        let times = lifecycle(arguments, &api, &name).await?;
        println!(
            "  round {round}: create returned {:.3} s, RFB banner {:.3} s, VNC-ready {:.3} s ({} full update(s)), guest booted {:.1} s; snapshot memory {:.3} s, disk {:.3} s; restore memory {:.3} s  [load {}]",
            times.create_returned,
            times.banner,
            times.vnc_ready,
            times.frames_until_ready,
            times.guest_ready,
            times.snapshot_memory,
            times.snapshot_disk,
            times.restore_memory,
            load()
        );
        rounds.push(times);
        if !keep {
            api.delete(&name).await?;
        }
    }
    let last = format!("bench-{}", arguments.runs);
    let measured = throughput_phase(arguments, &api, &last, serve_pid).await;
    api.delete(&last).await?;
    let throughput = measured?;
    report(arguments, &rounds, &throughput);
    Ok(())
}

async fn lifecycle(arguments: &Arguments, api: &Api, name: &str) -> Result<Lifecycle, BenchError> {
    let manifest = format!(
        "apiVersion: paddock.dev/v1alpha1\nkind: VirtualMachineApp\nmetadata:\n  name: {name}\nspec:\n  image:\n    containerDisk: file:{}\n  resources: {{cpu: 1, memory: {}Mi}}\n  disk: {{size: 64Mi}}\n  runStrategy: Always\n",
        arguments.disk.display(),
        arguments.memory_mib
    );
    let mut times = Lifecycle::default();
    let started = Instant::now();
    api.create(&manifest).await?;
    times.create_returned = started.elapsed().as_secs_f64();
    // The VNC websocket is refused (409) until the VM runs; a viewer retries, so does this.
    let url = api.vnc_url(name);
    let transport = loop {
        match Transport::websocket(&url, KUBEVIRT_SUBPROTOCOL).await {
            Ok(transport) => break transport,
            // Starting is worth waiting for; CrashLoopBackOff or Failed is not.
            Err(RfbError::Connect {
                status: Some(409),
                message,
                ..
            }) if message.contains("Starting") && started.elapsed() < BOOT_TIMEOUT => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(error) => return Err(error.into()),
        }
    };
    let mut reader = Reader::new(transport);
    rfb::read_banner(&mut reader).await?;
    times.banner = started.elapsed().as_secs_f64();
    let mut session = rfb::handshake(reader).await?;
    loop {
        let update = session.full_update(true).await?;
        times.frames_until_ready += 1;
        if update.complete && update.lit {
            break;
        }
        if started.elapsed() > BOOT_TIMEOUT {
            return Err(BenchError::Timeout(format!(
                "the VNC framebuffer of {name} stayed blank for {BOOT_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    times.vnc_ready = started.elapsed().as_secs_f64();
    drop(session);

    // Snapshots are of the booted guest, as a user takes them.
    let console_log = VmFiles::new(&arguments.state_dir, name).console_log();
    loop {
        if std::fs::read(&console_log)
            .map(|log| String::from_utf8_lossy(&log).contains(READY_BANNER))
            .unwrap_or(false)
        {
            break;
        }
        if started.elapsed() > BOOT_TIMEOUT {
            return Err(BenchError::Timeout(format!(
                "{name} did not print {READY_BANNER:?} in {} within {BOOT_TIMEOUT:?}",
                console_log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    times.guest_ready = started.elapsed().as_secs_f64();

    let timed = Instant::now();
    api.snapshot(name, "memory", true).await?;
    times.snapshot_memory = timed.elapsed().as_secs_f64();
    let timed = Instant::now();
    api.snapshot(name, "disk", false).await?;
    times.snapshot_disk = timed.elapsed().as_secs_f64();
    let timed = Instant::now();
    api.restore(name, "memory").await?;
    times.restore_memory = timed.elapsed().as_secs_f64();
    Ok(times)
}

/// MiB/s of every timed run of one path.
#[derive(Debug, Default, Clone)]
struct Rates {
    mib_per_second: Vec<f64>,
}

#[derive(Debug, Default)]
struct Throughput {
    width: u16,
    height: u16,
    recorded_update_bytes: u64,
    frames: usize,
    stream_bytes: u64,
    live: [Rates; 3],
    replay: [Rates; 3],
    websockify: bool,
    serve_rss_kib: Option<(u64, u64)>,
    load_during: String,
}

const PATH_NAMES: [&str; 3] = ["direct unix socket", "paddock VNC websocket", "websockify"];

/// Puts QEMU's VNC socket back where it was when dropped.
struct SocketSwap {
    socket: PathBuf,
    aside: PathBuf,
}

impl SocketSwap {
    fn new(socket: &Path) -> Result<SocketSwap, BenchError> {
        let aside = socket.with_extension("sock.qemu-bench");
        std::fs::rename(socket, &aside).map_err(|source| BenchError::Rename {
            from: socket.to_path_buf(),
            to: aside.clone(),
            source,
        })?;
        Ok(SocketSwap {
            socket: socket.to_path_buf(),
            aside,
        })
    }
}

impl Drop for SocketSwap {
    fn drop(&mut self) {
        if let Err(error) = std::fs::rename(&self.aside, &self.socket) {
            eprintln!(
                "local-bench: cannot move QEMU's VNC socket back from {} to {}: {error}",
                self.aside.display(),
                self.socket.display()
            );
        }
    }
}

fn process_memory(pid: u64) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

async fn throughput_phase(
    arguments: &Arguments,
    api: &Api,
    name: &str,
    serve_pid: Option<u64>,
) -> Result<Throughput, BenchError> {
    let socket = VmFiles::new(&arguments.state_dir, name).vnc_socket()?;
    let mut result = Throughput {
        frames: arguments.frames,
        ..Throughput::default()
    };

    // 1. Record a real session from QEMU: handshake, then full raw framebuffer updates.
    let mut reader = Reader::new(Transport::unix(&socket).await?);
    reader.recording = Some(Vec::new());
    rfb::read_banner(&mut reader).await?;
    let mut session = rfb::handshake(reader).await?;
    session.full_update(false).await?; // settles the size (a DesktopSize answer is not recorded)
    let handshake_bytes = session.handshake_bytes as usize;
    let before_updates = session.reader.received as usize;
    for _ in 0..arguments.frames {
        session.full_update(false).await?;
    }
    let recording = session.reader.recording.take().unwrap_or_default();
    result.width = session.width;
    result.height = session.height;
    drop(session);
    // Kept for bench/src/bin/gateway-lab.rs: handshake, then the updates (once).
    let saved = arguments.work_dir.join("vnc-recording.bin");
    std::fs::write(&saved, &recording)
        .and_then(|()| std::fs::write(saved.with_extension("handshake"), handshake_bytes.to_string()))
        .map_err(|error| BenchError::File {
            path: saved.clone(),
            message: error.to_string(),
        })?;
    let updates = recording[before_updates..].to_vec();
    result.recorded_update_bytes = updates.len() as u64;
    let repeat = (arguments.stream_mib * 1024 * 1024).div_ceil(updates.len().max(1) as u64);
    let recording = Recording {
        handshake: recording[..handshake_bytes].to_vec().into(),
        updates: updates.into(),
        repeat,
    };
    result.stream_bytes = recording.stream_bytes();
    println!(
        "\n== VNC throughput: {}x{} framebuffer, {} recorded full raw updates = {:.1} MiB, replayed {repeat}× = {:.0} MiB per connection",
        result.width,
        result.height,
        arguments.frames,
        result.recorded_update_bytes as f64 / MIB,
        result.stream_bytes as f64 / MIB
    );

    let websockify = match &arguments.websockify {
        Some(binary) => Some(Websockify::start(
            binary,
            &socket,
            &arguments.work_dir.join("websockify.log"),
        )?),
        None => None,
    };
    result.websockify = websockify.is_some();
    let mut paths = vec![
        Path3::Direct(socket.clone()),
        Path3::WebSocket {
            url: api.vnc_url(name),
            subprotocol: KUBEVIRT_SUBPROTOCOL,
        },
    ];
    if let Some(websockify) = &websockify {
        paths.push(Path3::WebSocket {
            url: websockify.url(),
            subprotocol: WEBSOCKIFY_SUBPROTOCOL,
        });
    }

    // 2. Live (information): the same request pattern against QEMU itself, paced by QEMU.
    println!(
        "live QEMU, {} full updates per session, request → response:",
        arguments.frames
    );
    for round in 0..=arguments.throughput_runs {
        for (index, path) in paths.iter().enumerate() {
            let started = Instant::now();
            let mut reader = Reader::new(path.connect().await?);
            rfb::read_banner(&mut reader).await?;
            let mut session = rfb::handshake(reader).await?;
            session.full_update(false).await?;
            for _ in 0..arguments.frames {
                session.full_update(false).await?;
            }
            let seconds = started.elapsed().as_secs_f64();
            let rate = session.reader.received as f64 / seconds / MIB;
            if round > 0 {
                result.live[index].mib_per_second.push(rate);
            }
            println!(
                "  {}{:<22} {:>8.1} MiB/s  ({} bytes in {seconds:.3} s)",
                if round == 0 { "warm-up " } else { "" },
                PATH_NAMES[index],
                rate,
                session.reader.received
            );
        }
    }

    // 3. Replay: the recorded stream at full speed, byte-identical on every path.
    let swap = SocketSwap::new(&socket)?;
    let replay = ReplayServer::start(&socket, recording.clone())?;
    let rss_before = serve_pid.and_then(process_memory);
    println!(
        "replayed stream, read to the end ({} timed run(s) per path after a verified warm-up; load {}):",
        arguments.throughput_runs,
        load()
    );
    for round in 0..=arguments.throughput_runs {
        // Rotate the order so no path always runs first after a pause.
        for offset in 0..paths.len() {
            let index = (round + offset) % paths.len();
            let serve_before = serve_pid.and_then(|pid| throughput::cpu_seconds(&pid.to_string()));
            let read = read_replay(PATH_NAMES[index], &paths[index], &recording, round == 0).await?;
            let serve_cpu = serve_before
                .zip(serve_pid.and_then(|pid| throughput::cpu_seconds(&pid.to_string())))
                .map(|(before, after)| after - before);
            let rate = read.bytes as f64 / read.seconds / MIB;
            if round > 0 {
                result.replay[index].mib_per_second.push(rate);
            }
            let gib = read.bytes as f64 / MIB / 1024.0;
            let per_gib =
                |cpu: Option<f64>| cpu.map_or_else(|| "?".into(), |cpu| format!("{:.2}", cpu / gib));
            println!(
                "  {}{:<22} {:>8.1} MiB/s  ({} bytes in {:.3} s; CPU s/GiB: reader {}{}{})",
                if round == 0 { "warm-up " } else { "" },
                PATH_NAMES[index],
                rate,
                read.bytes,
                read.seconds,
                per_gib(read.client_cpu),
                if index == 1 {
                    format!(", paddock serve {}", per_gib(serve_cpu))
                } else {
                    String::new()
                },
                if round == 0 { "; CRC-32 verified" } else { "" }
            );
        }
    }
    result.load_during = load();
    let rss_after = serve_pid.and_then(process_memory);
    result.serve_rss_kib = rss_before
        .zip(rss_after)
        .map(|(before, after)| (before.0, after.1));
    drop(replay);
    drop(swap);
    drop(websockify);
    Ok(result)
}

fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => None,
        length if length % 2 == 1 => Some(sorted[length / 2]),
        length => Some((sorted[length / 2 - 1] + sorted[length / 2]) / 2.0),
    }
}

/// A report row: label, which time, target in seconds.
type Row = (&'static str, fn(&Lifecycle) -> f64, Option<f64>);

fn report(arguments: &Arguments, rounds: &[Lifecycle], throughput: &Throughput) {
    let kvm = arguments.accelerator == "kvm";
    let column = |pick: fn(&Lifecycle) -> f64| rounds.iter().map(pick).collect::<Vec<_>>();
    let judge = |value: Option<f64>, target: f64| match (value, kvm) {
        (None, _) => "-".to_string(),
        (Some(_), false) => "n/a (TCG)".to_string(),
        (Some(value), true) => if value <= target { "PASS" } else { "MISS" }.to_string(),
    };
    println!("\n== results");
    if kvm {
        println!("accelerator: KVM");
    } else {
        println!("accelerator: TCG (software emulation) — /dev/kvm is not usable here.");
        println!("  !!! The boot and snapshot targets are set for KVM and CANNOT be judged on this machine;");
        println!("  !!! the times below are TCG times, shown for information and for trends only.");
    }
    println!("load average at the end: {}", load());
    println!(
        "\n{:<38} {:>9} {:>10} {:<11} all runs (s)",
        "VM lifecycle (test disk)", "median s", "target", "result"
    );
    let rows: [Row; 7] = [
        ("create request returned", |times| times.create_returned, None),
        ("create → RFB banner", |times| times.banner, None),
        ("create → VNC-ready", |times| times.vnc_ready, Some(1.5)),
        ("create → guest booted (info)", |times| times.guest_ready, None),
        (
            "snapshot with memory (running VM)",
            |times| times.snapshot_memory,
            Some(0.5),
        ),
        (
            "snapshot disk-only (running VM)",
            |times| times.snapshot_disk,
            Some(0.5),
        ),
        ("restore memory snapshot", |times| times.restore_memory, None),
    ];
    for (label, pick, target) in rows {
        let values = column(pick);
        let value = median(&values);
        println!(
            "{label:<38} {:>9} {:>10} {:<11} {}",
            value.map_or_else(|| "-".into(), |value| format!("{value:.3}")),
            target.map_or_else(|| "-".into(), |target| format!("<= {target}")),
            target.map_or_else(|| "-".into(), |target| judge(value, target)),
            values
                .iter()
                .map(|value| format!("{value:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }

    println!(
        "\n{:<38} {:>9} {:>10}  all runs (MiB/s)",
        "VNC stream throughput", "MiB/s", ""
    );
    for (kind, rates) in [
        ("replayed", &throughput.replay),
        ("live QEMU (info)", &throughput.live),
    ] {
        for (index, name) in PATH_NAMES.iter().enumerate() {
            if index == 2 && !throughput.websockify {
                println!(
                    "{:<38} {:>9}   websockify missing (apt-get install websockify)",
                    format!("{kind}: {name}"),
                    "-"
                );
                continue;
            }
            let values = &rates[index].mib_per_second;
            println!(
                "{:<38} {:>9} {:>10}  {}",
                format!("{kind}: {name}"),
                median(values).map_or_else(|| "-".into(), |value| format!("{value:.1}")),
                "",
                values
                    .iter()
                    .map(|value| format!("{value:.0}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }

    println!(
        "\n{:<46} {:>7} {:>8}  {:<6} per run (same round)",
        "ratio", "value", "target", "result"
    );
    let ratio = |label: &str, rates: &[Rates; 3], over: usize, target: Option<f64>| {
        let paddock = &rates[1].mib_per_second;
        let anchor = &rates[over].mib_per_second;
        let (Some(top), Some(bottom)) = (median(paddock), median(anchor)) else {
            println!(
                "{label:<46} {:>7} {:>8}  missing",
                "-",
                target.map_or_else(|| "-".into(), |target| format!(">= {target}"))
            );
            return;
        };
        let value = top / bottom;
        let per_run = paddock
            .iter()
            .zip(anchor)
            .map(|(top, bottom)| format!("{:.2}", top / bottom))
            .collect::<Vec<_>>()
            .join(" ");
        println!(
            "{label:<46} {value:>7.2} {:>8}  {:<6} {per_run}",
            target.map_or_else(|| "-".into(), |target| format!(">= {target}")),
            target.map_or_else(
                || "-".into(),
                |target| if value >= target { "PASS" } else { "MISS" }.to_string()
            ),
        );
    };
    ratio(
        "paddock websocket / direct unix socket",
        &throughput.replay,
        0,
        Some(0.95),
    );
    ratio("paddock websocket / websockify", &throughput.replay, 2, Some(3.0));
    ratio(
        "live: paddock websocket / direct (info)",
        &throughput.live,
        0,
        None,
    );
    ratio(
        "live: paddock websocket / websockify (info)",
        &throughput.live,
        2,
        None,
    );
    if let Some((before, peak)) = throughput.serve_rss_kib {
        println!(
            "\npaddock serve memory: RSS {:.1} MiB before the replay, peak RSS (VmHWM, whole life) {:.1} MiB after it",
            before as f64 / 1024.0,
            peak as f64 / 1024.0
        );
    }
    println!(
        "stream: {}x{} raw 32 bpp, {} full updates recorded ({:.1} MiB), {:.0} MiB per replayed connection; load during the replay: {}",
        throughput.width,
        throughput.height,
        throughput.frames,
        throughput.recorded_update_bytes as f64 / MIB,
        throughput.stream_bytes as f64 / MIB,
        throughput.load_during
    );
}
