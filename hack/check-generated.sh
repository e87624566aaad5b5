#!/usr/bin/env bash
# Fails when the kopium-generated KubeVirt/CDI types differ from what hack/generate-types.sh generates
# now. (The CRD under deploy/ and the golden builder files are checked by their own tests:
# crates/paddock/tests/cli.rs and crates/paddock-api/tests/builders.rs.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

hack/generate-types.sh
if ! git diff --exit-code -- crates/paddock-api/src/kubevirt crates/paddock-api/src/cdi; then
  echo "check-generated: the KubeVirt/CDI types drifted from hack/generate-types.sh; commit its output" >&2
  exit 1
fi
