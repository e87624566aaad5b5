#!/usr/bin/env bash
# Build etcd, kube-apiserver, kube-controller-manager and kubectl from the Go
# modules pinned in tests/cluster/go.mod into
#   ${PADDOCK_CACHE_DIR:-<repo>/.cache}/cluster/bin/
# and print that directory on stdout.
#
# A build is reused when its stamp (hash of go version + go.mod + go.sum +
# tool list) matches; set PADDOCK_CLUSTER_REBUILD=1 to force a rebuild.
# The Go module and build caches live next to it, so a rebuild after a
# version bump only compiles what changed.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
go_env
command -v go >/dev/null || die "go is not installed (need Go >= $(sed -n 's/^go //p' "$CLUSTER_DIR/go.mod"))"

mkdir -p "$CLUSTER_CACHE"
# One build at a time per cache directory (parallel test jobs share it).
exec 9>"$CLUSTER_CACHE/build.lock"
flock 9

stamp="$(stamp_of_inputs)"
if [[ "${PADDOCK_CLUSTER_REBUILD:-0}" != 1 && -f "$BIN_DIR/.stamp" && "$(cat "$BIN_DIR/.stamp")" == "$stamp" ]]; then
	log "binaries up to date in $BIN_DIR"
	echo "$BIN_DIR"
	exit 0
fi

cd "$CLUSTER_DIR"
t0=$SECONDS
log "downloading modules into $GOMODCACHE"
go mod download
go mod verify >/dev/null
t1=$SECONDS
log "modules ready in $((t1 - t0))s"

k8s_version="$(go list -m -f '{{.Version}}' k8s.io/kubernetes)"
[[ "$k8s_version" =~ ^v([0-9]+)\.([0-9]+)\. ]] || die "unexpected k8s.io/kubernetes version $k8s_version"
major="${BASH_REMATCH[1]}" minor="${BASH_REMATCH[2]}"
build_date="$(date -u -d "@${SOURCE_DATE_EPOCH:-0}" +%Y-%m-%dT%H:%M:%SZ)"
# What hack/lib/version.sh stamps into an official build, so /version and
# `kubectl version` report the real release instead of v0.0.0-master.
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
	ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
done

tmp="$(mktemp -d "$CLUSTER_CACHE/bin.tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
common=(-p 2 -trimpath "-ldflags=$ldflags")

for tool in "${CLUSTER_TOOLS[@]}"; do
	case "$tool" in
	go.etcd.io/etcd/server/v3) name=etcd ;;
	*) name="${tool##*/}" ;;
	esac
	ts=$SECONDS
	log "building $name ($tool)"
	go build "${common[@]}" -o "$tmp/$name" "$tool"
	log "built $name in $((SECONDS - ts))s"
done

"$tmp/kube-apiserver" --version >&2
# (not `| head -1`: etcd would die of SIGPIPE under pipefail when head exits first)
"$tmp/etcd" --version | sed -n 1p >&2
echo "$stamp" >"$tmp/.stamp"
chmod 0755 "$tmp"
# Swap the finished directory in; readers never see a half-built bin/.
if [[ -d "$BIN_DIR" ]]; then
	mv "$BIN_DIR" "$BIN_DIR.old.$$"
fi
mv "$tmp" "$BIN_DIR"
trap - EXIT
rm -rf "$BIN_DIR.old.$$"
log "build finished in $((SECONDS - t0))s (modules $((t1 - t0))s, compile $((SECONDS - t1))s)"
# One-shot machines (CI) keep only the binaries: the Go caches are ~4 GB they would never reuse.
if [[ "${PADDOCK_TRIM_BUILD_CACHES:-0}" == 1 ]]; then
	go clean -cache -modcache
	log "trimmed GOCACHE and GOMODCACHE (PADDOCK_TRIM_BUILD_CACHES=1)"
fi
echo "$BIN_DIR"
