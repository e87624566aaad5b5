#!/usr/bin/env bash
# Fails when a generated file differs from what the code generates now: the CRD under deploy/ and the
# kopium-generated KubeVirt/CDI types. (Golden builder files are checked by their own test.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

status=0
crd=deploy/crds/virtualmachineapps.paddock.dev.yaml
if ! cargo run --quiet --locked -p paddock -- crd | diff -u "$crd" - ; then
  echo "check-generated: $crd drifted; regenerate: cargo run -p paddock -- crd > $crd" >&2
  status=1
fi

hack/generate-types.sh
if ! git diff --exit-code -- crates/paddock-api/src/kubevirt crates/paddock-api/src/cdi; then
  echo "check-generated: the KubeVirt/CDI types drifted from hack/generate-types.sh; commit its output" >&2
  status=1
fi
exit $status
