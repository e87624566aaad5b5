#!/usr/bin/env bash
# Build the real zarf CLI (the version pinned in ./go.mod) from the Go module proxy.
#
# Output: ${PADDOCK_CACHE_DIR:-<repo>/.cache}/zarf/bin/zarf
# The binary is reused while its stamp (hash of go.mod, go.sum, this script and the Go
# toolchain version) matches; otherwise it is rebuilt into a temp file and moved into place.
#
# stdout: the binary's absolute path, last line (nothing else is printed on stdout).
# stderr: go's output and timings.
#
# Environment:
#   PADDOCK_CACHE_DIR      where the built binary lives (default <repo>/.cache)
#   PADDOCK_GO_CACHE_DIR   if set, GOCACHE=$it/build and GOMODCACHE=$it/mod (default: Go's own)
#   PADDOCK_ZARF_REBUILD=1 rebuild even when the stamp matches
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${PADDOCK_CACHE_DIR:-$repo/.cache}"
out_dir="$cache/zarf/bin"
out="$out_dir/zarf"
stamp_file="$out_dir/zarf.stamp"

log() { printf 'zarf-build: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

command -v go >/dev/null 2>&1 || die "go is not on PATH (need Go >= the 'go' line of $here/go.mod)"

if [[ -n "${PADDOCK_GO_CACHE_DIR:-}" ]]; then
  export GOCACHE="$PADDOCK_GO_CACHE_DIR/build" GOMODCACHE="$PADDOCK_GO_CACHE_DIR/mod"
  mkdir -p "$GOCACHE" "$GOMODCACHE"
fi
# Never let a build edit go.mod/go.sum: they are the pinned inputs.
export GOFLAGS="-mod=readonly${GOFLAGS:+ $GOFLAGS}"
# This module alone decides the build list, whatever go.work may sit above it.
export GOWORK=off
# Zarf's release builds are static (see zarf's Makefile).
export CGO_ENABLED=0

t_start="$(now)"
mkdir -p "$out_dir"

# Serialise concurrent builds (e.g. parallel test binaries) on one lock per output dir.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$out_dir/.lock"
  flock 9
fi

cd "$here"
stamp="$(
  {
    sha256sum go.mod go.sum build.sh
    go env GOVERSION GOOS GOARCH
  } | sha256sum | cut -d' ' -f1
)"

if [[ "${PADDOCK_ZARF_REBUILD:-0}" != 1 && -x "$out" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]]; then
  log "up to date (stamp ${stamp:0:12}), reused in $(elapsed "$t_start")"
  printf '%s\n' "$out"
  exit 0
fi

# Versions come from the build list, so go.mod is the single source of truth.
modver() { go list -m -f '{{if .Replace}}{{.Replace.Version}}{{else}}{{.Version}}{{end}}' "$1"; }

t_dl="$(now)"
log "downloading modules (go mod download) ..."
go mod download github.com/zarf-dev/zarf
# Only the modules the zarf package graph needs (go mod download 'all' would also fetch
# test-only modules some of which the proxy refuses).
go list -deps -f '{{with .Module}}{{.Path}}@{{.Version}}{{end}}' github.com/zarf-dev/zarf >/dev/null
log "modules ready in $(elapsed "$t_dl")"

zarf_version="$(modver github.com/zarf-dev/zarf)"
client_go="$(modver k8s.io/client-go)" # v0.M.P -> Kubernetes v1.M.P, as zarf's Makefile does
IFS=. read -r k8s_major k8s_minor k8s_patch <<<"${client_go#v}"
k8s_version="v$((k8s_major + 1)).${k8s_minor}.${k8s_patch}"

# The -X flags of zarf's Makefile (BUILD_ARGS), minus git commit / build date.
ldflags=(
  -s -w
  -X "github.com/zarf-dev/zarf/src/config.CLIVersion=$zarf_version"
  -X "k8s.io/component-base/version.gitVersion=$k8s_version"
  -X "github.com/derailed/k9s/cmd.version=$(modver github.com/derailed/k9s)"
  -X "github.com/google/go-containerregistry/cmd/crane/cmd.Version=$(modver github.com/google/go-containerregistry)"
  -X "github.com/zarf-dev/zarf/src/cmd.syftVersion=$(modver github.com/anchore/syft)"
  -X "github.com/zarf-dev/zarf/src/cmd.archivesVersion=$(modver github.com/mholt/archives)"
  -X "helm.sh/helm/v4/internal/version.version=$(modver helm.sh/helm/v4)"
)

tmp="$(mktemp "$out_dir/.zarf.tmp.XXXXXX")"
trap 'rm -f "$tmp" "$tmp.stamp"' EXIT

t_build="$(now)"
log "building zarf $zarf_version with $(go env GOVERSION) (-p 2) ..."
go build -p 2 -trimpath -ldflags="${ldflags[*]}" -o "$tmp" github.com/zarf-dev/zarf
log "compiled in $(elapsed "$t_build")"

got="$("$tmp" version 2>/dev/null | head -n1 || true)"
[[ "$got" == "$zarf_version" ]] || die "built binary reports version '$got', expected '$zarf_version'"

chmod 0755 "$tmp"
mv -f "$tmp" "$out"
printf '%s\n' "$stamp" >"$tmp.stamp"
mv -f "$tmp.stamp" "$stamp_file"
log "built $out ($zarf_version) in $(elapsed "$t_start") total"
# One-shot machines (CI) keep only the binary: the Go caches are gigabytes they would never reuse.
if [[ "${PADDOCK_TRIM_BUILD_CACHES:-0}" == 1 ]]; then
  go clean -cache -modcache
  log "trimmed GOCACHE and GOMODCACHE (PADDOCK_TRIM_BUILD_CACHES=1)"
fi
printf '%s\n' "$out"
