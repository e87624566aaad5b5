# shellcheck shell=bash
# Shared settings for tests/cluster/*.sh. Source it; do not execute it.
#
# Everything the Go toolchain writes (module downloads, build cache, the built
# binaries) lives under one cache directory, so a second run on the same
# machine is fast and `rm -rf "$PADDOCK_CACHE_DIR/cluster"` resets it all.

CLUSTER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$CLUSTER_DIR/../.." && pwd)"
CACHE_ROOT="${PADDOCK_CACHE_DIR:-$REPO_ROOT/.cache}"
CLUSTER_CACHE="$CACHE_ROOT/cluster"
# shellcheck disable=SC2034 # used by the scripts that source this file
BIN_DIR="$CLUSTER_CACHE/bin"

# The binaries this directory builds, by Go package path.
CLUSTER_TOOLS=(
	go.etcd.io/etcd/server/v3
	k8s.io/kubernetes/cmd/kube-apiserver
	k8s.io/kubernetes/cmd/kube-controller-manager
	k8s.io/kubernetes/cmd/kubectl
)

go_env() {
	export GOMODCACHE="$CLUSTER_CACHE/gomod"
	export GOCACHE="$CLUSTER_CACHE/gocache"
	# -modcacherw: module files stay writable so `rm -rf` of the cache works.
	export GOFLAGS="-modcacherw -buildvcs=false"
	# Never download another toolchain: use the Go that is installed.
	export GOTOOLCHAIN=local
	export CGO_ENABLED=0
	export GOWORK=off
}

log() { printf '[cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[cluster] ERROR: %s\n' "$*" >&2; exit 1; }

# A hash of everything that decides what gets built (the bin/.stamp).
stamp_of_inputs() {
	{
		go version
		# build.sh holds the flags (-trimpath, -ldflags, CGO_ENABLED via go_env here)
		cat "$CLUSTER_DIR/go.mod" "$CLUSTER_DIR/go.sum" "$CLUSTER_DIR/build.sh" "$CLUSTER_DIR/lib.sh"
		printf '%s\n' "${CLUSTER_TOOLS[@]}"
	} | sha256sum | cut -d' ' -f1
}

# port_in_use <port>: is some socket listening on that TCP port?
port_in_use() {
	local hex
	hex="$(printf ':%04X' "$1")"
	# Listening sockets (state 0A) on any local address, IPv4 and IPv6.
	awk -v h="$hex" '$4 == "0A" && toupper(substr($2, length($2) - 4)) == h { f = 1 } END { exit !f }' \
		/proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# free_port: a random TCP port nobody listens on. It is below the kernel's
# ephemeral range (32768+), so outgoing connections never hold it.
free_port() {
	local p
	while :; do
		p=$((20000 + RANDOM % 12000))
		port_in_use "$p" || break
	done
	echo "$p"
}
