#!/usr/bin/env bash
# Runs every check paddock has, the way CI runs them (`.ci/run` calls this script):
#   system packages → formatting → clippy (-D warnings) → generated-file drift → Rust tests
#   (unit, golden, schema, CEL, and the test disk booting under real QEMU) → web console end-to-end
#   test (Playwright + Chromium against `paddock serve`) → control-plane smoke test (real etcd +
#   kube-apiserver) → Zarf smoke test (real zarf CLI).
# Tests that need a component install and start it themselves; nothing here is skipped silently.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Built binaries (kube-apiserver, zarf) and the test disk are cached outside the checkout, so later runs
# on the same machine (a fresh CI clone included) reuse them.
export PADDOCK_CACHE_DIR=${PADDOCK_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/paddock}
# Incremental state would double the target directory's size for a single build; CI never rebuilds.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}

started=$SECONDS
step() {
  echo
  # Free disk in every step header: CI machines are small, and a full disk fails in odd places.
  echo "==> [$((SECONDS - started))s, $(df -h --output=avail . | tail -1 | tr -d ' ') free] $*"
}

step "system packages"
hack/install-deps.sh

step "formatting"
cargo fmt --all --check

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "generated files are up to date"
hack/check-generated.sh

step "Rust tests"
cargo test --workspace --locked --no-fail-fast

step "web console end-to-end (Playwright, Chromium, real QEMU; screenshots in target/web-screenshots)"
node web/tests/console.test.mjs
node web/tests/console-kubernetes.test.mjs  # the same UI against paddock serve --kubeconfig on the test cluster

step "Kubernetes control plane smoke test"
tests/cluster/smoke.sh

step "Zarf smoke test"
tests/zarf/smoke.sh

step "all checks passed in $((SECONDS - started))s"
