#!/usr/bin/env bash
# bench/local.sh — the local runtime and `paddock serve` (issue 4): create→VNC-ready time, snapshot
# and restore times of the test disk, and VNC websocket throughput as a ratio to a direct read of
# the unix socket and to websockify on the same stream. Not part of CI; run by hand:
#
#   bench/local.sh                          # 5 VM rounds, 1 GiB stream, 5 timed reads per path (~3 min)
#   PADDOCK_BENCH_QUICK=1 bench/local.sh    # 1 VM round, 256 MiB stream, 2 reads (< 1 min once built)
#
# Prints the accelerator (KVM targets cannot be judged under TCG), one line per round and per
# read, then the table: median times against the targets (<= 1.5 s to VNC-ready, <= 0.5 s per
# snapshot, under KVM) and the throughput ratios (>= 0.95 of the direct read, >= 3x websockify).
# See bench/README.md for what each number means.
#
# Environment (all optional):
#   PADDOCK_BENCH_QUICK         1 for a quick look (the defaults below shrink)
#   PADDOCK_BENCH_RUNS          VM create/snapshot/restore rounds (default 5; quick 1)
#   PADDOCK_BENCH_THROUGHPUT_RUNS  timed reads per throughput path (default 5; quick 2)
#   PADDOCK_BENCH_STREAM_MIB    replayed VNC stream per connection, MiB (default 1024; quick 256)
#   PADDOCK_BENCH_FRAMES        full updates recorded from QEMU and per live session (default 16; quick 8)
#   PADDOCK_BENCH_LAB           1 also runs gateway-lab (gateway buffer/copy experiments) on the recording
#   PADDOCK_BENCH_ACCELERATOR   auto (default: kvm when /dev/kvm is usable, else tcg) | kvm | tcg
#   PADDOCK_BENCH_BUILD         1 (default) builds the release binaries first; 0 uses what is there
#   PADDOCK_CACHE_DIR           cache root (default ~/.cache/paddock): the test disk and work files
#   PADDOCK_BENCH_KEEP          1 keeps the work directory (serve log, state directory)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=${PADDOCK_BENCH_QUICK:-0}
if [[ $QUICK == 1 ]]; then
    RUNS=${PADDOCK_BENCH_RUNS:-1} THROUGHPUT_RUNS=${PADDOCK_BENCH_THROUGHPUT_RUNS:-2}
    STREAM_MIB=${PADDOCK_BENCH_STREAM_MIB:-256} FRAMES=${PADDOCK_BENCH_FRAMES:-8}
else
    RUNS=${PADDOCK_BENCH_RUNS:-5} THROUGHPUT_RUNS=${PADDOCK_BENCH_THROUGHPUT_RUNS:-5}
    STREAM_MIB=${PADDOCK_BENCH_STREAM_MIB:-1024} FRAMES=${PADDOCK_BENCH_FRAMES:-16}
fi
ACCELERATOR=${PADDOCK_BENCH_ACCELERATOR:-auto}
BUILD=${PADDOCK_BENCH_BUILD:-1}
CACHE_ROOT=${PADDOCK_CACHE_DIR:-$HOME/.cache/paddock}
PADDOCK_BIN=$ROOT/target/release/paddock
BENCH_BIN=$ROOT/target/release/local-bench

say() { printf '%s\n' "$*"; }
step() { printf '\n== %s\n' "$*"; }
die() {
    printf 'bench/local.sh: %s\n' "$*" >&2
    exit 1
}

# Installs the Debian packages this benchmark needs when their commands are missing. websockify
# is only the anchor of one ratio: without it the run goes on and says so loudly.
ensure_tools() {
    local -a missing=()
    local pair command package
    for pair in qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils websockify:websockify; do
        command=${pair%%:*} package=${pair#*:}
        command -v "$command" >/dev/null 2>&1 || missing+=("$package")
    done
    ((${#missing[@]} == 0)) && return 0
    say "installing missing Debian packages: ${missing[*]}"
    if [[ $(id -u) != 0 ]]; then
        say "!!! not root: install them with apt-get install -y --no-install-recommends ${missing[*]}"
        return 0
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null ||
        { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; } ||
        say "!!! apt-get install ${missing[*]} failed"
}

# KVM is usable when QEMU can create and reset a vCPU the way paddock starts VMs (q35, -cpu host):
# some nested setups open /dev/kvm fine and then fail there (e.g. "failed to set MSR").
kvm_usable() {
    [[ -r /dev/kvm && -w /dev/kvm ]] || return 1
    (echo quit | timeout 20 "$1" -accel kvm -machine q35 -cpu host -display none -nodefaults -no-user-config \
        -S -monitor stdio >/dev/null 2>&1) 2>/dev/null
}

SERVE_PID=''
WORK=''
cleanup() {
    if [[ -n $SERVE_PID ]]; then
        # paddock serve leaves VMs running by design; the benchmark deletes its own, and any
        # left after a failure are stopped through their pidfiles below.
        kill "$SERVE_PID" 2>/dev/null || true
        wait "$SERVE_PID" 2>/dev/null || true
    fi
    if [[ -n $WORK ]]; then
        local pidfile pid
        while IFS= read -r pidfile; do
            pid=$(cat "$pidfile" 2>/dev/null || true)
            if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; fi
        done < <(find "$WORK/state" -name qemu.pid 2>/dev/null)
        if [[ ${PADDOCK_BENCH_KEEP:-0} == 1 ]]; then say "work directory kept: $WORK"; else rm -rf "$WORK"; fi
    fi
}
trap cleanup EXIT

ensure_tools
QEMU=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 is missing: apt-get install qemu-system-x86"
WEBSOCKIFY=$(command -v websockify || true)

step "build"
if [[ $BUILD == 1 ]]; then
    (cd "$ROOT" && cargo build --release -q -p paddock -p paddock-bench) || die "cargo build --release -p paddock -p paddock-bench failed"
fi
[[ -x $PADDOCK_BIN && -x $BENCH_BIN ]] || die "$PADDOCK_BIN or $BENCH_BIN is missing; run with PADDOCK_BENCH_BUILD=1"
say "paddock $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') (+ working tree), release build"

step "test disk"
DISK=$(PADDOCK_CACHE_DIR=$CACHE_ROOT "$ROOT/tests/testdisk/build.sh" | tail -n 1)
[[ -f $DISK ]] || die "tests/testdisk/build.sh printed no disk path (got: $DISK)"
say "test disk: $DISK ($(qemu-img info --output=json "$DISK" | grep -m1 '"virtual-size"' | tr -dc 0-9 | numfmt --to=iec) virtual)"

step "accelerator"
case $ACCELERATOR in
    auto) if kvm_usable "$QEMU"; then ACCELERATOR=kvm; else ACCELERATOR=tcg; fi ;;
    kvm | tcg) ;;
    *) die "PADDOCK_BENCH_ACCELERATOR must be auto, kvm or tcg" ;;
esac
if [[ $ACCELERATOR == kvm ]]; then
    say "KVM"
else
    say "!!! TCG (software emulation): /dev/kvm is missing or not usable here ($(stat -c '%A %U:%G %n' /dev/kvm 2>&1))."
    say "!!! The create→VNC-ready (<= 1.5 s) and snapshot (<= 0.5 s) targets are KVM targets and"
    say "!!! CANNOT be judged on this machine; the throughput ratios do not depend on the accelerator."
fi

step "machine"
say "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')); $(free -g | awk '/Mem:/ { print $2 }') GiB RAM; load average $(cut -d' ' -f1-3 /proc/loadavg)"
say "kernel $(uname -r); $("$QEMU" --version | head -n 1); websockify ${WEBSOCKIFY:+$(dpkg-query -W -f '${Version}' websockify 2>/dev/null || echo '?')}${WEBSOCKIFY:-MISSING (apt-get install websockify): the websockify ratio will be missing}"
[[ -n $WEBSOCKIFY ]] || say "!!! websockify is missing: the paddock/websockify ratio cannot be measured"

step "paddock serve"
mkdir -p "$CACHE_ROOT/bench"
# A short path: QEMU's unix sockets must fit in 108 bytes and live in the VM directory.
WORK=$(mktemp -d /tmp/paddock-bench.XXXXXX)
mkdir -p "$WORK/state"
"$PADDOCK_BIN" serve --state-dir "$WORK/state" --listen 127.0.0.1:0 --accelerator "$ACCELERATOR" --qemu "$QEMU" \
    >"$WORK/serve.out" 2>"$WORK/serve.log" &
SERVE_PID=$!
for _ in $(seq 1 300); do
    [[ -s $WORK/state/serve.json ]] && grep -q 'paddock serve: ' "$WORK/serve.out" && break
    kill -0 "$SERVE_PID" 2>/dev/null || { cat "$WORK/serve.log" >&2; die "paddock serve exited at start (log above)"; }
    sleep 0.1
done
[[ -s $WORK/state/serve.json ]] || die "paddock serve wrote no serve.json within 30 s; see $WORK/serve.log"
say "paddock serve pid $SERVE_PID, state $WORK/state, log $WORK/serve.log"

step "measuring (runs $RUNS, throughput runs $THROUGHPUT_RUNS, stream $STREAM_MIB MiB, $FRAMES frames)"
"$BENCH_BIN" --state-dir "$WORK/state" --disk "$DISK" --accelerator "$ACCELERATOR" --runs "$RUNS" \
    --throughput-runs "$THROUGHPUT_RUNS" --stream-mib "$STREAM_MIB" --frames "$FRAMES" --work-dir "$WORK" \
    ${WEBSOCKIFY:+--websockify "$WEBSOCKIFY"} ||
    { grep -v 'request refused' "$WORK/serve.log" | tail -n 30 >&2; die "the measurement failed (paddock serve log above; PADDOCK_BENCH_KEEP=1 keeps it)"; }

if [[ ${PADDOCK_BENCH_LAB:-0} == 1 ]]; then
    step "gateway-lab: variants of the VNC gateway on the same recording (see bench/README.md)"
    "$ROOT/target/release/gateway-lab" --recording "$WORK/vnc-recording.bin" --stream-mib "$STREAM_MIB" \
        --runs "$THROUGHPUT_RUNS" || die "gateway-lab failed"
fi
