#!/usr/bin/env bash
# Start a real, loopback-only Kubernetes control plane for integration tests:
# etcd, kube-apiserver and kube-controller-manager, with every KubeVirt and
# CDI CRD from shared/schemas plus the test BafflesApplication CRD installed.
#
#   tests/cluster/start.sh <state-dir>
#
# Writes into <state-dir>:
#   admin.kubeconfig   client cert in group system:masters
#   user.kubeconfig    client cert CN=paddock-user, O=paddock-users (no RBAC bindings)
#   cluster.env        shell-sourceable: KUBECONFIG, PADDOCK_* URLs, paths, ports
#   pki/               CA, serving, front-proxy, client and service-account keys
#   logs/*.log         one log per component
#   *.pid              one pid file per component (tests/cluster/stop.sh reads them)
#
# Environment:
#   PADDOCK_CACHE_DIR            where build.sh keeps the binaries (default <repo>/.cache)
#   PADDOCK_CLUSTER_BASE_PORT    use ports BASE..BASE+3 instead of random free ones
#   PADDOCK_SHARED_DIR           the shared/ reference data (default: <repo>/../shared)
#   PADDOCK_CLUSTER_TIMEOUT      seconds to wait for each component (default 120)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

state="${1:?usage: start.sh <state-dir>}"
mkdir -p "$state"
state="$(cd "$state" && pwd)"
timeout_s="${PADDOCK_CLUSTER_TIMEOUT:-120}"
shared="${PADDOCK_SHARED_DIR:-$REPO_ROOT/../shared}"
crd_dirs=(
	"$shared/schemas/kubevirt-v1.9.0-crds"
	"$shared/schemas/cdi-v1.66.0-crds"
	"$CLUSTER_DIR/crds"
	"$REPO_ROOT/deploy/crds"
)
for d in "${crd_dirs[@]}"; do
	compgen -G "$d/*.yaml" >/dev/null || die "no CRDs in $d (set PADDOCK_SHARED_DIR to the shared/ directory)"
done
for c in openssl curl base64 flock; do
	command -v "$c" >/dev/null || die "$c is required"
done

for pidfile in "$state"/*.pid; do
	[[ -f "$pidfile" ]] || continue
	if kill -0 "$(cat "$pidfile")" 2>/dev/null; then
		die "a control plane is already running from $state ($(basename "$pidfile")); run stop.sh first"
	fi
	rm -f "$pidfile"
done

t_start=$SECONDS
bin="$("$CLUSTER_DIR/build.sh")"
t_built=$SECONDS
kubectl=("$bin/kubectl" --kubeconfig "$state/admin.kubeconfig")

# ---------------------------------------------------------------- ports
ports=()
if [[ -n "${PADDOCK_CLUSTER_BASE_PORT:-}" ]]; then
	for i in 0 1 2 3; do
		p=$((PADDOCK_CLUSTER_BASE_PORT + i))
		port_in_use "$p" && die "port $p (PADDOCK_CLUSTER_BASE_PORT+$i) is in use"
		ports+=("$p")
	done
else
	while ((${#ports[@]} < 4)); do
		p="$(free_port)"
		[[ " ${ports[*]} " == *" $p "* ]] && continue
		ports+=("$p")
	done
fi
etcd_port="${ports[0]}" etcd_peer_port="${ports[1]}" api_port="${ports[2]}" kcm_port="${ports[3]}"
api_url="https://127.0.0.1:$api_port"
etcd_url="http://127.0.0.1:$etcd_port"

# ---------------------------------------------------------------- stop on failure
started_ok=0
on_exit() {
	local rc=$?
	((started_ok)) && return
	log "start failed (exit $rc); stopping what was started. Logs in $state/logs:"
	for f in "$state"/logs/*.log; do
		[[ -f "$f" ]] || continue
		printf -- '--- last lines of %s\n' "$f" >&2
		tail -n 15 "$f" >&2
	done
	"$CLUSTER_DIR/stop.sh" "$state" >&2 || true
}
trap on_exit EXIT

# ---------------------------------------------------------------- certificates
# Every start is a new, empty cluster: nothing from an earlier run survives.
pki="$state/pki"
rm -rf "$pki" "$state/logs" "$state/etcd-data" "$state/controller-manager-certs" \
	"$state/cluster.env" "$state"/*.kubeconfig
mkdir -p "$pki" "$state/logs"
chmod 700 "$pki"
t_pki=$SECONDS

cat >"$pki/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = @alt_names
[v3_client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[alt_names]
DNS.1 = localhost
DNS.2 = kubernetes
DNS.3 = kubernetes.default
DNS.4 = kubernetes.default.svc
DNS.5 = kubernetes.default.svc.cluster.local
IP.1 = 127.0.0.1
IP.2 = ::1
EOF

ec_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
serial() { echo "0x1$(openssl rand -hex 15)"; }
# new_ca <name> <CN>
new_ca() {
	ec_key "$pki/$1.key"
	openssl req -x509 -new -config "$pki/openssl.cnf" -extensions v3_ca -key "$pki/$1.key" \
		-subj "/CN=$2" -days 3650 -set_serial "$(serial)" -out "$pki/$1.crt"
}
# new_cert <name> <ca> <v3_server|v3_client> <subject>
new_cert() {
	ec_key "$pki/$1.key"
	openssl req -new -config "$pki/openssl.cnf" -key "$pki/$1.key" -subj "$4" -out "$pki/$1.csr"
	openssl x509 -req -in "$pki/$1.csr" -CA "$pki/$2.crt" -CAkey "$pki/$2.key" -set_serial "$(serial)" \
		-days 3650 -extfile "$pki/openssl.cnf" -extensions "$3" -out "$pki/$1.crt" 2>/dev/null
	rm -f "$pki/$1.csr"
}

new_ca ca "paddock-test-cluster-ca"
new_cert apiserver ca v3_server "/CN=kube-apiserver"
new_cert admin ca v3_client "/O=system:masters/CN=paddock-admin"
new_cert user ca v3_client "/O=paddock-users/CN=paddock-user"
new_cert controller-manager ca v3_client "/CN=system:kube-controller-manager"
new_ca front-proxy-ca "paddock-test-front-proxy-ca"
new_cert front-proxy-client front-proxy-ca v3_client "/CN=front-proxy-client"
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key" 2>/dev/null
openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"
log "certificates generated in $((SECONDS - t_pki))s"

# write_kubeconfig <file> <user> <cert-name>
write_kubeconfig() {
	cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: paddock-test
  cluster:
    server: $api_url
    certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(base64 -w0 "$pki/$3.crt")
    client-key-data: $(base64 -w0 "$pki/$3.key")
contexts:
- name: $2@paddock-test
  context:
    cluster: paddock-test
    user: $2
    namespace: default
current-context: $2@paddock-test
EOF
	chmod 600 "$1"
}
write_kubeconfig "$state/admin.kubeconfig" paddock-admin admin
write_kubeconfig "$state/user.kubeconfig" paddock-user user
write_kubeconfig "$state/controller-manager.kubeconfig" system:kube-controller-manager controller-manager

# ---------------------------------------------------------------- processes
# launch <name> <command...>: own session (so a terminal's ^C or a test
# runner's process-group kill does not reach it), output to logs/<name>.log.
launch() {
	local name="$1"
	shift
	setsid "$@" </dev/null >"$state/logs/$name.log" 2>&1 &
	echo $! >"$state/$name.pid"
	log "started $name (pid $!)"
}
# wait_for <what> <pid-name> <command...>: poll until the command succeeds.
wait_for() {
	local what="$1" name="$2" deadline=$((SECONDS + timeout_s))
	shift 2
	until "$@" >/dev/null 2>&1; do
		kill -0 "$(cat "$state/$name.pid")" 2>/dev/null || die "$name exited while waiting for $what"
		((SECONDS < deadline)) || die "timed out after ${timeout_s}s waiting for $what"
		sleep 0.2
	done
}
curl_admin=(curl -fsS --max-time 5 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key")

t_etcd=$SECONDS
launch etcd "$bin/etcd" \
	--name paddock-test \
	--data-dir "$state/etcd-data" \
	--listen-client-urls "$etcd_url" \
	--advertise-client-urls "$etcd_url" \
	--listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
	--initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
	--initial-cluster "paddock-test=http://127.0.0.1:$etcd_peer_port" \
	--initial-cluster-state new \
	--unsafe-no-fsync \
	--log-level warn
wait_for "etcd /health" etcd bash -c "curl -fsS --max-time 2 '$etcd_url/health' | grep -q '\"health\":\"true\"'"
log "etcd ready at $etcd_url in $((SECONDS - t_etcd))s"

t_api=$SECONDS
# Aggregation: the apiserver proxies APIService requests with the
# front-proxy client cert and X-Remote-* headers. --enable-aggregator-routing
# stays off on purpose: with it the apiserver resolves a Service through its
# EndpointSlices, which may not hold loopback addresses; without it, an
# APIService can point at an ExternalName Service named "localhost" and reach
# an aggregated server listening on 127.0.0.1 (see README.md).
launch kube-apiserver "$bin/kube-apiserver" \
	--etcd-servers "$etcd_url" \
	--bind-address 127.0.0.1 \
	--advertise-address 127.0.0.1 \
	--secure-port "$api_port" \
	--tls-cert-file "$pki/apiserver.crt" \
	--tls-private-key-file "$pki/apiserver.key" \
	--client-ca-file "$pki/ca.crt" \
	--authorization-mode Node,RBAC \
	--service-account-issuer https://kubernetes.default.svc.cluster.local \
	--service-account-key-file "$pki/sa.pub" \
	--service-account-signing-key-file "$pki/sa.key" \
	--service-cluster-ip-range 10.96.0.0/16 \
	--endpoint-reconciler-type none \
	--requestheader-client-ca-file "$pki/front-proxy-ca.crt" \
	--requestheader-allowed-names front-proxy-client \
	--requestheader-username-headers X-Remote-User \
	--requestheader-group-headers X-Remote-Group \
	--requestheader-extra-headers-prefix X-Remote-Extra- \
	--proxy-client-cert-file "$pki/front-proxy-client.crt" \
	--proxy-client-key-file "$pki/front-proxy-client.key" \
	--allow-privileged=true \
	--profiling=false \
	--v=1
wait_for "kube-apiserver /readyz" kube-apiserver "${curl_admin[@]}" "$api_url/readyz"
log "kube-apiserver ready at $api_url in $((SECONDS - t_api))s"

t_kcm=$SECONDS
launch kube-controller-manager "$bin/kube-controller-manager" \
	--kubeconfig "$state/controller-manager.kubeconfig" \
	--authentication-kubeconfig "$state/controller-manager.kubeconfig" \
	--authorization-kubeconfig "$state/controller-manager.kubeconfig" \
	--bind-address 127.0.0.1 \
	--secure-port "$kcm_port" \
	--cert-dir "$state/controller-manager-certs" \
	--leader-elect=false \
	--use-service-account-credentials=true \
	--service-account-private-key-file "$pki/sa.key" \
	--root-ca-file "$pki/ca.crt" \
	--cluster-signing-cert-file "$pki/ca.crt" \
	--cluster-signing-key-file "$pki/ca.key" \
	--profiling=false \
	--v=1

t_crd=$SECONDS
crd_args=()
for d in "${crd_dirs[@]}"; do crd_args+=(-f "$d"); done
# Server-side apply: the KubeVirt CRDs are too large for the
# last-applied-configuration annotation that client-side apply writes.
"${kubectl[@]}" apply --server-side --force-conflicts --field-manager paddock-test-cluster "${crd_args[@]}" >"$state/logs/crd-apply.log"
n_crds="$(grep -c 'serverside-applied' "$state/logs/crd-apply.log" || true)"
"${kubectl[@]}" wait --for condition=Established --timeout "${timeout_s}s" "${crd_args[@]}" >>"$state/logs/crd-apply.log"
log "$n_crds CRDs applied and Established in $((SECONDS - t_crd))s"

wait_for "kube-controller-manager /healthz" kube-controller-manager \
	curl -fsSk --max-time 2 "https://127.0.0.1:$kcm_port/healthz"
# The serviceaccount controller creating default/default shows the
# controllers are actually running against this apiserver.
wait_for "ServiceAccount default/default (created by kube-controller-manager)" kube-controller-manager \
	"${kubectl[@]}" get serviceaccount default --namespace default
log "kube-controller-manager ready in $((SECONDS - t_kcm))s"

cat >"$state/cluster.env" <<EOF
# Written by tests/cluster/start.sh; source it.
export KUBECONFIG='$state/admin.kubeconfig'
export PADDOCK_CLUSTER_STATE='$state'
export PADDOCK_ADMIN_KUBECONFIG='$state/admin.kubeconfig'
export PADDOCK_USER_KUBECONFIG='$state/user.kubeconfig'
export PADDOCK_APISERVER_URL='$api_url'
export PADDOCK_ETCD_URL='$etcd_url'
export PADDOCK_CLUSTER_BIN='$bin'
export PADDOCK_CLUSTER_CA='$pki/ca.crt'
export PADDOCK_FRONT_PROXY_CA='$pki/front-proxy-ca.crt'
export PADDOCK_FRONT_PROXY_CLIENT_CERT='$pki/front-proxy-client.crt'
export PADDOCK_FRONT_PROXY_CLIENT_KEY='$pki/front-proxy-client.key'
export PADDOCK_CONTROLLER_MANAGER_PORT='$kcm_port'
EOF

started_ok=1
log "control plane up at $api_url: start-to-ready $((SECONDS - t_built))s (+$((t_built - t_start))s build check); source $state/cluster.env"
