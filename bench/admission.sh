#!/usr/bin/env bash
# bench/admission.sh — paddock's admission webhooks (issue 6): p99 latency and the server's RSS at a
# fixed request rate (targets: p99 <= 1 ms and RSS <= 20 MiB at 2,000 requests/s), measured straight
# against the webhook server by a Rust open-loop load generator in the same run. Not part of CI; run
# by hand:
#
#   bench/admission.sh                                  # 2,000 requests/s, 3 s warm-up + 20 s measured
#   PADDOCK_BENCH_RATE=4000 PADDOCK_BENCH_SECONDS=10 bench/admission.sh
#
# Environment (all optional):
#   PADDOCK_BENCH_RATE      requests per second (default 2000)
#   PADDOCK_BENCH_SECONDS   measured seconds (default 20)
#   PADDOCK_BENCH_WARMUP    warm-up seconds, not measured (default 3)
#   PADDOCK_BENCH_BUILD     1 (default) builds the release binary first; 0 uses what is there
#   PADDOCK_BENCH_PEPR_URL  a Pepr module's mutate URL doing the DataVolume mutation, to compare
#   PADDOCK_BENCH_PEPR_CA   the PEM CA of that Pepr module's serving certificate
#   PADDOCK_BENCH_PEPR_PID  the Pepr module's process id, to report its RSS
#
# See bench/README.md for what each number means and why there is no Pepr ratio by default.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RATE=${PADDOCK_BENCH_RATE:-2000}
SECONDS_MEASURED=${PADDOCK_BENCH_SECONDS:-20}
WARMUP=${PADDOCK_BENCH_WARMUP:-3}
BUILD=${PADDOCK_BENCH_BUILD:-1}
BENCH_BIN=$ROOT/target/release/admission-bench

if [[ $BUILD == 1 ]]; then
    (cd "$ROOT" && cargo build --release --locked -p paddock-bench --bin admission-bench)
fi

arguments=(--rate "$RATE" --seconds "$SECONDS_MEASURED" --warmup "$WARMUP")
if [[ -n ${PADDOCK_BENCH_PEPR_URL:-} ]]; then
    arguments+=(--pepr-url "$PADDOCK_BENCH_PEPR_URL" --pepr-ca "${PADDOCK_BENCH_PEPR_CA:?set PADDOCK_BENCH_PEPR_CA too}")
    if [[ -n ${PADDOCK_BENCH_PEPR_PID:-} ]]; then arguments+=(--pepr-pid "$PADDOCK_BENCH_PEPR_PID"); fi
fi
exec "$BENCH_BIN" "${arguments[@]}"
