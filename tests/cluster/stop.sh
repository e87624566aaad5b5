#!/usr/bin/env bash
# Stop the control plane that tests/cluster/start.sh started from <state-dir>.
#
#   tests/cluster/stop.sh <state-dir> [--purge]
#
# Stops only the processes whose pids start.sh recorded (and only if that pid
# still runs the binary it started). Logs, certificates and kubeconfigs stay
# for inspection; --purge also deletes the state directory.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

state="${1:?usage: stop.sh <state-dir> [--purge]}"
purge="${2:-}"
[[ -d "$state" ]] || die "no such state directory: $state"

# stop_one <name>: SIGTERM, up to 10s grace, then SIGKILL. Fails if it needed SIGKILL.
stop_one() {
	local name="$1" pidfile="$state/$1.pid" pid exe
	[[ -f "$pidfile" ]] || return 0
	pid="$(cat "$pidfile")"
	exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
	exe="${exe% (deleted)}" # the binary may have been rebuilt meanwhile
	if [[ "${exe##*/}" != "$name" ]]; then
		# Already gone (or the pid now belongs to something else): leave it.
		rm -f "$pidfile"
		return 0
	fi
	kill -TERM "$pid" 2>/dev/null || true
	for _ in $(seq 1 100); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	rm -f "$pidfile"
	if kill -0 "$pid" 2>/dev/null; then
		log "$name (pid $pid) ignored SIGTERM for 10s; sending SIGKILL"
		kill -KILL "$pid" 2>/dev/null || true
		return 1
	fi
	log "stopped $name (pid $pid)"
}

status=0
# The API server and the controller manager together, then the store.
stop_one kube-controller-manager &
kcm=$!
stop_one kube-apiserver || status=1
wait "$kcm" || status=1
stop_one etcd || status=1

if [[ "$purge" == --purge ]]; then
	rm -rf "$state"
fi
exit "$status"
