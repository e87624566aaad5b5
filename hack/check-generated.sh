#!/usr/bin/env bash
# Fails when the kopium-generated KubeVirt/CDI types differ from what hack/generate-types.sh generates
# now, or when the committed web console build (web/dist, embedded in the paddock binary) differs
# from what `npm ci && npm run build` in web/ builds now (the TypeScript is type-checked too).
# (The CRD under deploy/ and the golden builder files are checked by their own tests:
# crates/paddock/tests/cli.rs and crates/paddock-api/tests/builders.rs.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

hack/generate-types.sh
if ! git diff --exit-code -- crates/paddock-api/src/kubevirt crates/paddock-api/src/cdi; then
  echo "check-generated: the KubeVirt/CDI types drifted from hack/generate-types.sh; commit its output" >&2
  exit 1
fi

# The web console: dependencies exactly as locked, a type check, then a build into a scratch
# directory compared with the committed web/dist.
web_build=$(mktemp -d)
trap 'rm -rf "$web_build"' EXIT
(cd web && npm ci --no-audit --no-fund --loglevel=error && npm run --silent check && node build.mjs "$web_build")
if ! diff -r "$web_build" web/dist; then
  echo "check-generated: web/dist drifted from web/src; run 'cd web && npm ci && npm run build' and commit web/dist" >&2
  exit 1
fi

# The operator's Helm chart and zarf.yaml (`paddock chart`, built from crates/paddock-deploy):
# regenerated into a scratch directory and compared with the committed deploy/chart and deploy/zarf.yaml.
chart_build=$(mktemp -d)
trap 'rm -rf "$web_build" "$chart_build"' EXIT
cargo run --quiet --locked -p paddock -- chart --output "$chart_build/chart"
if ! diff -r "$chart_build/chart" deploy/chart || ! diff "$chart_build/zarf.yaml" deploy/zarf.yaml; then
  echo "check-generated: deploy/chart or deploy/zarf.yaml drifted from crates/paddock-deploy; run 'cargo run -p paddock -- chart --output deploy/chart' and commit both" >&2
  exit 1
fi
