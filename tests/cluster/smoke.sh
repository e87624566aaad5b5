#!/usr/bin/env bash
# Smoke test of the integration-test control plane: build, start, prove with
# kubectl and curl that the API server, etcd, the controller manager and the
# real KubeVirt/CDI CRD schemas behave like a cluster, then stop.
#
#   tests/cluster/smoke.sh [state-dir]
#
# Exits non-zero, naming the failed check, on any failure. The state
# directory (logs, kubeconfigs) is kept on failure and removed on success.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

state="${1:-$(mktemp -d "${TMPDIR:-/tmp}/paddock-cluster-smoke.XXXXXX")}"
passed=0
failed=0
skipped=0

cleanup() {
	local rc=$?
	if [[ -f "$state/aggregated-echo.pid" ]]; then
		kill "$(cat "$state/aggregated-echo.pid")" 2>/dev/null || true
	fi
	"$CLUSTER_DIR/stop.sh" "$state" >/dev/null 2>&1 || true
	if ((rc == 0 && failed == 0)); then
		rm -rf "$state"
	else
		log "state (logs, kubeconfigs) kept in $state"
	fi
}
trap cleanup EXIT

fail() {
	failed=$((failed + 1))
	printf 'FAIL: %s\n' "$1"
	[[ -n "${2:-}" ]] && printf '%s\n' "$2" | sed 's/^/    | /'
	return 0
}
skip() {
	skipped=$((skipped + 1))
	printf 'skip: %s\n' "$1"
}
pass() {
	passed=$((passed + 1))
	printf 'ok: %s\n' "$1"
	[[ -n "${2:-}" ]] && printf '%s\n' "$2" | sed 's/^/    | /'
	return 0
}
# eventually <seconds> <command...>
eventually() {
	local deadline=$((SECONDS + $1))
	shift
	until "$@" >/dev/null 2>&1; do
		((SECONDS < deadline)) || return 1
		sleep 0.5
	done
}

t0=$SECONDS
"$CLUSTER_DIR/build.sh" >/dev/null
t_build=$((SECONDS - t0))
t1=$SECONDS
"$CLUSTER_DIR/start.sh" "$state"
t_start=$((SECONDS - t1))
# shellcheck source=/dev/null
source "$state/cluster.env"
k=("$PADDOCK_CLUSTER_BIN/kubectl" --kubeconfig "$PADDOCK_ADMIN_KUBECONFIG")
ku=("$PADDOCK_CLUSTER_BIN/kubectl" --kubeconfig "$PADDOCK_USER_KUBECONFIG")
pki="$state/pki"
echo
echo "== smoke checks against $PADDOCK_APISERVER_URL"

# -- 1. the server is what we think it is
out="$(curl -fsS --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" "$PADDOCK_APISERVER_URL/version")"
ver="$(sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p' <<<"$out")"
if [[ "$ver" =~ ^v1\.[0-9]+\.[0-9]+$ ]]; then pass "kube-apiserver reports $ver"; else fail "/version" "$out"; fi
out="$(curl -fsS "$PADDOCK_ETCD_URL/version")"
if [[ "$out" == *'"etcdserver":"3.'* ]]; then pass "etcd reports $out"; else fail "etcd /version" "$out"; fi

# -- 2. every CRD is Established
out="$("${k[@]}" get crd -o go-template='{{range .items}}{{.metadata.name}} {{range .status.conditions}}{{if eq .type "Established"}}{{.status}}{{end}}{{end}}{{"\n"}}{{end}}')"
n_total="$(grep -c . <<<"$out" || true)"
n_est="$(grep -c ' True$' <<<"$out" || true)"
for g in kubevirt.io cdi.kubevirt.io app.baffles.dev; do
	grep -q "\.$g True$" <<<"$out" || fail "no Established CRD in group $g" "$out"
done
if ((n_total >= 16 && n_est == n_total)); then
	pass "$n_est/$n_total CRDs Established" "$out"
else
	fail "CRDs not all Established ($n_est/$n_total, expected >= 16)" "$out"
fi

# -- 3. the real KubeVirt schema rejects a wrong type
vm() { # vm <name> <extra yaml under spec.template.spec.domain> [spec-level yaml]
	cat <<EOF
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: $1
  namespace: default
spec:
  runStrategy: ${4:-Halted}
  template:
    spec:
      domain:
        devices: {}
        resources:
          requests:
            memory: 64Mi
$2
EOF
}
if out="$(vm bad-cores '        cpu:
          cores: many' | "${k[@]}" create -f - 2>&1)"; then
	fail "VirtualMachine with spec.template.spec.domain.cpu.cores: \"many\" was accepted" "$out"
elif [[ "$out" == *'spec.template.spec.domain.cpu.cores: Invalid value: "string"'*'must be of type integer'* ]]; then
	pass "wrong type rejected by the CRD schema" "$out"
else
	fail "wrong type rejected, but not with the expected schema error" "$out"
fi

if out="$("${k[@]}" create -f - 2>&1 <<'EOF'
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: no-spec
  namespace: default
EOF
)"; then
	fail "VirtualMachine without spec was accepted" "$out"
elif [[ "$out" == *'spec: Required value'* ]]; then
	pass "missing required spec rejected" "$out"
else
	fail "missing spec: unexpected error" "$out"
fi

# spec.runStrategy is a free string in KubeVirt's CRD schema (no enum): only
# virt-api's validating webhook rejects "Sometimes". Record that the CRD
# layer alone accepts it, so nobody relies on the schema for it.
if out="$(vm odd-strategy '' '' Sometimes | "${k[@]}" create -f - 2>&1)"; then
	pass "runStrategy: Sometimes passes the CRD schema (no enum there; virt-api's webhook is what rejects it)" "$out"
	"${k[@]}" delete vm odd-strategy --namespace default --wait=false >/dev/null
else
	fail "runStrategy: Sometimes was rejected by the bare CRD schema (unexpected; schema changed?)" "$out"
fi

# -- 4. unknown fields are pruned (and reported by field validation)
if out="$(vm pruned '        bogusField: 42' | "${k[@]}" create --validate=warn -f - 2>&1)"; then
	stored="$("${k[@]}" get vm pruned --namespace default -o jsonpath='{.spec.template.spec.domain}')"
	if [[ "$stored" != *bogusField* && "$stored" == *'"devices"'* ]]; then
		pass "unknown field pruned" "$out"$'\n'"stored .spec.template.spec.domain: $stored"
	else
		fail "unknown field was stored" "$stored"
	fi
else
	fail "creating a VirtualMachine with an unknown field failed" "$out"
fi
if out="$(vm strict '        bogusField: 42' | "${k[@]}" create --validate=strict -f - 2>&1)"; then
	fail "fieldValidation=Strict accepted an unknown field" "$out"
elif [[ "$out" == *'unknown field "spec.template.spec.domain.bogusField"'* ]]; then
	pass "fieldValidation=Strict rejects the unknown field" "$out"
else
	fail "fieldValidation=Strict: unexpected error" "$out"
fi

# -- 5. RBAC is enforced for a non-admin user
if out="$("${ku[@]}" get virtualmachines --namespace default 2>&1)"; then
	fail "paddock-user could list VirtualMachines" "$out"
elif [[ "$out" == *'(Forbidden)'*'User "paddock-user" cannot list resource "virtualmachines" in API group "kubevirt.io"'* ]]; then
	pass "non-admin user is forbidden" "$out"
else
	fail "non-admin user failed, but not with Forbidden" "$out"
fi
code="$(curl -sS -o /dev/null -w '%{http_code}' --cacert "$pki/ca.crt" --cert "$pki/user.crt" --key "$pki/user.key" \
	"$PADDOCK_APISERVER_URL/apis/kubevirt.io/v1/namespaces/default/virtualmachines")"
if [[ "$code" == 403 ]]; then pass "GET .../virtualmachines as paddock-user: HTTP $code"; else fail "expected HTTP 403 for paddock-user, got $code"; fi
out="$("${ku[@]}" auth whoami -o jsonpath='{.status.userInfo.username} {.status.userInfo.groups}' 2>&1 || true)"
if [[ "$out" == 'paddock-user ["paddock-users","system:authenticated"]' ]]; then pass "user.kubeconfig authenticates as $out"; else fail "user identity" "$out"; fi

# -- 6. the test BafflesApplication CRD, with its status subresource
if out="$("${k[@]}" create -f - 2>&1 <<'EOF'
apiVersion: app.baffles.dev/v1
kind: BafflesApplication
metadata:
  name: windows10
  namespace: default
spec:
  displayName: Windows 10
  url: ws://node:30000/k8s/apis/subresources.kubevirt.io/v1alpha3/namespaces/default/virtualmachineinstances/iso-win10/vnc
  category: vm
EOF
)" && "${k[@]}" patch bafflesapplication windows10 --namespace default --subresource status --type merge \
	-p '{"status":{"seen":true}}' >/dev/null 2>&1 &&
	[[ "$("${k[@]}" get bafflesapplication windows10 --namespace default -o jsonpath='{.status.seen}')" == true ]]; then
	pass "BafflesApplication created and its status subresource written" "$out"
else
	fail "BafflesApplication create/status" "$out"
fi

# -- 6b. paddock's own VirtualMachineApp CRD: the API server compiles its CEL rules (including the cost
# budget), fills its defaults and enforces them.
if out="$("${k[@]}" create -f - -o jsonpath='{.spec.runStrategy} {.spec.image.persistent} {.spec.console.baffles.category}' 2>&1 <<'EOF'
apiVersion: paddock.dev/v1alpha1
kind: VirtualMachineApp
metadata:
  name: smoke-app
  namespace: default
spec:
  image:
    containerDisk: registry.example.com/vms/debian:12
  disk:
    size: 10Gi
EOF
)" && [[ "$out" == "Always true vm" ]]; then
	pass "VirtualMachineApp accepted with defaults filled in: $out"
else
	fail "VirtualMachineApp create/defaults" "$out"
fi
out="$("${k[@]}" create -f - 2>&1 <<'EOF' || true
apiVersion: paddock.dev/v1alpha1
kind: VirtualMachineApp
metadata:
  name: smoke-bad-app
  namespace: default
spec:
  image:
    containerDisk: registry.example.com/vms/debian:12
    upload: {}
  resources:
    cpu: 0
    memory: 4GB
  firmware:
    secureBoot: true
EOF
)"
missing=""
for expected in "set exactly one image source" "resources.cpu must be between 1 and 512" \
	"resources.memory must be a quantity of at least 16Mi" "firmware.secureBoot needs firmware.type: uefi" \
	"disk.size is required"; do
	[[ "$out" == *"$expected"* ]] || missing="$missing [$expected]"
done
if [[ -z "$missing" ]]; then
	pass "invalid VirtualMachineApp rejected by its CEL rules with paddock's messages" "$out"
else
	fail "invalid VirtualMachineApp: missing messages$missing" "$out"
fi

# -- 7. APIService aggregation through the front-proxy client cert and
# X-Remote-* headers, to a server on 127.0.0.1 behind an ExternalName Service.
if command -v python3 >/dev/null; then
	agg_port="$(free_port)"
	python3 "$CLUSTER_DIR/testdata/aggregated_echo.py" "$agg_port" "$pki/apiserver.crt" "$pki/apiserver.key" \
		"$pki/front-proxy-ca.crt" 2>"$state/logs/aggregated-echo.log" &
	echo $! >"$state/aggregated-echo.pid"
	"${k[@]}" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Service
metadata:
  name: aggregated-echo
  namespace: default
spec:
  type: ExternalName
  externalName: localhost
  ports:
  - port: $agg_port
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata:
  name: v1.sim.paddock.test
spec:
  group: sim.paddock.test
  version: v1
  groupPriorityMinimum: 1000
  versionPriority: 15
  insecureSkipTLSVerify: true
  service:
    name: aggregated-echo
    namespace: default
    port: $agg_port
EOF
	if "${k[@]}" wait --for condition=Available --timeout 60s apiservice/v1.sim.paddock.test >/dev/null 2>&1 &&
		out="$("${k[@]}" get --raw /apis/sim.paddock.test/v1/whoami 2>&1)" &&
		[[ "$out" == *'\"proxyClientCN\": \"front-proxy-client\"'*'\"user\": \"paddock-admin\"'* ]]; then
		pass "APIService aggregation: request proxied with the front-proxy client cert and X-Remote-User" "$out"
	else
		fail "APIService aggregation" "$out"$'\n'"$("${k[@]}" get apiservice v1.sim.paddock.test -o yaml 2>&1 | tail -n 12)"
	fi
	if out="$("${ku[@]}" get --raw /apis/sim.paddock.test/v1/whoami 2>&1)"; then
		fail "paddock-user reached the aggregated API without RBAC" "$out"
	else
		pass "aggregated API is RBAC-protected for paddock-user" "$out"
	fi
	"${k[@]}" delete apiservice v1.sim.paddock.test >/dev/null
	kill "$(cat "$state/aggregated-echo.pid")" 2>/dev/null || true
	rm -f "$state/aggregated-echo.pid"
else
	skip "APIService aggregation (python3 not installed)"
fi

# -- 8. kube-controller-manager: garbage collector and namespace controller
"${k[@]}" create namespace smoke-gc >/dev/null
owner_uid="$("${k[@]}" create configmap owner --namespace smoke-gc -o jsonpath='{.metadata.uid}')"
"${k[@]}" create -f - >/dev/null <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: child
  namespace: smoke-gc
  ownerReferences:
  - apiVersion: v1
    kind: ConfigMap
    name: owner
    uid: $owner_uid
EOF
"${k[@]}" delete configmap owner --namespace smoke-gc >/dev/null
t_gc=$SECONDS
if eventually 60 bash -c "! '${k[0]}' --kubeconfig '$PADDOCK_ADMIN_KUBECONFIG' get configmap child --namespace smoke-gc"; then
	pass "garbage collector deleted the owner-referenced child in $((SECONDS - t_gc))s"
else
	fail "garbage collector did not delete the child ConfigMap within 60s"
fi
"${k[@]}" delete namespace smoke-gc --wait=false >/dev/null
t_ns=$SECONDS
if eventually 60 bash -c "! '${k[0]}' --kubeconfig '$PADDOCK_ADMIN_KUBECONFIG' get namespace smoke-gc"; then
	pass "namespace controller finished deleting namespace smoke-gc in $((SECONDS - t_ns))s"
else
	fail "namespace smoke-gc was not deleted within 60s" "$("${k[@]}" get namespace smoke-gc -o yaml 2>&1)"
fi
if out="$("${k[@]}" create token default --namespace default 2>&1)" && [[ "$out" == ey* ]]; then
	pass "service-account token issued (TokenRequest, signed with the service-account key)"
else
	fail "kubectl create token" "$out"
fi

# -- 9. every listening socket of the three processes is on loopback
for name in etcd kube-apiserver kube-controller-manager; do
	pid="$(cat "$state/$name.pid")"
	inodes="$(find "/proc/$pid/fd" -lname 'socket:*' -printf '%l\n' 2>/dev/null | tr -dc '0-9\n' | sort -u)"
	# local_address and inode of every listening (0A) TCP socket
	socks="$(awk '$4 == "0A" { print $10, $2 }' /proc/net/tcp /proc/net/tcp6 | LC_ALL=C sort -k1,1 | LC_ALL=C join - <(LC_ALL=C sort <<<"$inodes") | cut -d' ' -f2)"
	bad="$(grep -vE '^(0100007F|00000000000000000000000001000000):' <<<"$socks" || true)"
	ports_of="$(cut -d: -f2 <<<"$socks" | while read -r h; do [[ -n "$h" ]] && printf '%d ' "0x$h"; done)"
	if [[ -z "$socks" ]]; then
		fail "$name has no listening socket"
	elif [[ -n "$bad" ]]; then
		fail "$name listens beyond loopback" "$bad"
	else
		pass "$name listens on loopback only (ports ${ports_of% })"
	fi
done

# -- 10. stop
t_stop=$SECONDS
"$CLUSTER_DIR/stop.sh" "$state"
sleep 0.2
if compgen -G "$state/*.pid" >/dev/null; then fail "pid files left after stop.sh"; else pass "stopped in $((SECONDS - t_stop))s"; fi

echo
echo "timings: build check ${t_build}s, start-to-ready ${t_start}s"
echo "cluster-smoke: $passed passed, $failed failed, $skipped skipped"
((failed == 0)) || exit 1
