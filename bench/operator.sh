#!/usr/bin/env bash
# bench/operator.sh — the paddock operator (issue 6): time for 2,000 VirtualMachineApps to converge and
# the operator's peak RSS (targets: <= 30 s and <= 64 MiB), on the real test control plane
# (kube-apiserver, etcd, kube-controller-manager, the KubeVirt/CDI simulator) with the real
# `paddock operator` process, and an anchor measured in the same run: kube-apiserver creating the same
# 2,000 apps with no operator watching. Not part of CI; run by hand:
#
#   bench/operator.sh                                  # 2,000 apps (~2 min once built)
#   PADDOCK_BENCH_APPS=500 bench/operator.sh           # a quick look
#
# Environment (all optional):
#   PADDOCK_BENCH_APPS          how many VirtualMachineApps (default 2000)
#   PADDOCK_BENCH_IN_FLIGHT     creation requests in flight (default 16)
#   PADDOCK_BENCH_CONCURRENCY   the operator's --concurrency (default 16, its default)
#   PADDOCK_BENCH_BUILD         1 (default) builds the release binaries first; 0 uses what is there
#   PADDOCK_BENCH_OPERATOR_LOG  the operator's RUST_LOG (default info)
#   PADDOCK_CACHE_DIR           where the control plane's built binaries are cached (default ~/.cache/paddock)
#
# See bench/README.md for what "converged" means and what each number is.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
APPS=${PADDOCK_BENCH_APPS:-2000}
IN_FLIGHT=${PADDOCK_BENCH_IN_FLIGHT:-16}
CONCURRENCY=${PADDOCK_BENCH_CONCURRENCY:-16}
BUILD=${PADDOCK_BENCH_BUILD:-1}
export PADDOCK_CACHE_DIR=${PADDOCK_CACHE_DIR:-$HOME/.cache/paddock}

if [[ $BUILD == 1 ]]; then
    # Release builds of everything in the loop: the operator, the simulator whose virt-controller
    # reports the VMs Stopped, and the bench.
    (cd "$ROOT" && cargo build --release --locked -p paddock --bin paddock \
        && cargo build --release --locked -p paddock-kubevirt-simulator \
        && cargo build --release --locked -p paddock-bench --bin operator-bench)
fi
export PADDOCK_BINARY=$ROOT/target/release/paddock
export PADDOCK_KUBEVIRT_SIMULATOR=$ROOT/target/release/kubevirt-simulator
for binary in "$PADDOCK_BINARY" "$PADDOCK_KUBEVIRT_SIMULATOR" "$ROOT/target/release/operator-bench"; do
    [[ -x $binary ]] || { echo "missing $binary: run with PADDOCK_BENCH_BUILD=1" >&2; exit 1; }
done
exec "$ROOT/target/release/operator-bench" --apps "$APPS" --in-flight "$IN_FLIGHT" --concurrency "$CONCURRENCY"
