#!/usr/bin/env bash
# Smoke test of the zarf CLI built by ./build.sh:
#   1. build (or reuse) zarf and check `zarf version` is the version pinned in go.mod;
#   2. `zarf package create` a tiny package (one component, one manifests entry holding a
#      ConfigMap; no images, so no registry is involved) into a temp dir;
#   3. `zarf package inspect definition` the resulting .tar.zst and check the component is in it;
#   4. unpack it with `zarf tools archiver decompress` and check the ConfigMap is inside.
#
# zarf is isolated from the machine: HOME, its cache, its tmpdir and its config file
# (ZARF_CONFIG) all point into the temp dir, KUBECONFIG points at nothing, and when possible
# (root, util-linux unshare) it runs in a fresh network namespace with no interfaces up, so
# any attempt to reach the network fails instead of silently succeeding. Zarf v0.84.0 has no
# update check or telemetry; the netns proves that for these commands.
#
# Environment: see build.sh (PADDOCK_CACHE_DIR, PADDOCK_GO_CACHE_DIR);
#   PADDOCK_ZARF_SMOKE_KEEP=1 keeps the temp dir; PADDOCK_ZARF_SMOKE_NETNS=0 skips the netns.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

fail() { printf 'zarf-smoke: FAIL: %s\n' "$*" >&2; exit 1; }
say() { printf 'zarf-smoke: %s\n' "$*" >&2; }

zarf="$("$here/build.sh" | tail -n1)" || fail "build.sh failed (see its output above)"
[[ -x "$zarf" ]] || fail "build.sh did not produce an executable: '$zarf'"
# The pinned version, read straight from go.mod (no module graph loading, so no network).
want_version="$(awk '$1 == "github.com/zarf-dev/zarf" && $2 ~ /^v/ { print $2; exit }' "$here/go.mod")"
[[ -n "$want_version" ]] || fail "cannot find the github.com/zarf-dev/zarf requirement in $here/go.mod"

work="$(mktemp -d "${TMPDIR:-/tmp}/paddock-zarf-smoke.XXXXXX")"
if [[ "${PADDOCK_ZARF_SMOKE_KEEP:-0}" == 1 ]]; then
  say "keeping $work"
else
  trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$work/home" "$work/cache" "$work/tmp" "$work/src" "$work/out"
: >"$work/zarf-config.toml" # an explicit, empty config: nothing from ~/.zarf or ./ is picked up

isolated_env=(
  env -i
  PATH="/usr/local/bin:/usr/bin:/bin"
  HOME="$work/home"
  TMPDIR="$work/tmp"
  ZARF_CONFIG="$work/zarf-config.toml"
  KUBECONFIG="$work/no-such-kubeconfig"
  # If something did try the network outside a netns, make it fail fast rather than leak out.
  HTTP_PROXY="http://127.0.0.1:9" HTTPS_PROXY="http://127.0.0.1:9" NO_PROXY=""
)
netns=()
if [[ "${PADDOCK_ZARF_SMOKE_NETNS:-1}" == 1 ]] && command -v unshare >/dev/null 2>&1 \
  && unshare --net true 2>/dev/null; then
  netns=(unshare --net)
  say "running zarf in an empty network namespace (no network at all)"
else
  say "network namespace disabled or unavailable; running zarf with HOME/config/proxy isolation only"
fi

# run NAME ARGS...: run zarf isolated, logging to $work/NAME.log; on failure show the log.
run() {
  local name="$1"
  shift
  if ! (cd "$work" && "${netns[@]}" "${isolated_env[@]}" "$zarf" "$@") >"$work/$name.out" 2>"$work/$name.err"; then
    say "--- zarf $* (stdout) ---"
    cat "$work/$name.out" >&2
    say "--- zarf $* (stderr) ---"
    cat "$work/$name.err" >&2
    fail "zarf $1 $2 failed"
  fi
}

# 1. version
run version version
got_version="$(head -n1 "$work/version.out")"
[[ "$got_version" == "$want_version" ]] || fail "zarf version printed '$got_version', expected '$want_version'"
say "zarf version: $got_version"

# 2. package create
component="paddock-smoke-configmap"
cat >"$work/src/zarf.yaml" <<EOF
kind: ZarfPackageConfig
metadata:
  name: paddock-smoke
  description: paddock smoke test package (a single ConfigMap, no images)
  version: 0.0.1
components:
  - name: $component
    required: true
    manifests:
      - name: smoke-configmap
        namespace: paddock-smoke
        files:
          - configmap.yaml
EOF
cat >"$work/src/configmap.yaml" <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata:
  name: paddock-smoke
  namespace: paddock-smoke
data:
  hello: paddock
EOF

common=(--log-format console --no-color --cache "$work/cache" --tmpdir "$work/tmp")
run create package create "$work/src" --confirm --skip-sbom --output "$work/out" "${common[@]}"

shopt -s nullglob
pkgs=("$work"/out/zarf-package-paddock-smoke-*.tar.zst)
shopt -u nullglob
[[ ${#pkgs[@]} -eq 1 ]] || fail "expected one zarf-package-paddock-smoke-*.tar.zst in $work/out, found: $(ls -A "$work/out")"
pkg="${pkgs[0]}"
[[ -s "$pkg" ]] || fail "$pkg is empty"
say "created $(basename "$pkg") ($(stat -c %s "$pkg") bytes)"

# 3. inspect definition
run inspect package inspect definition "$pkg" "${common[@]}"
grep -Eq "^[[:space:]-]*name: $component\$" "$work/inspect.out" \
  || { cat "$work/inspect.out" >&2; fail "component '$component' not found in 'zarf package inspect definition' output"; }
grep -q "configmap.yaml" "$work/inspect.out" \
  || { cat "$work/inspect.out" >&2; fail "manifest file configmap.yaml not found in the package definition"; }

# 4. the ConfigMap itself is in the package (zarf's own archiver, so no zstd binary is needed)
run decompress tools archiver decompress "$pkg" "$work/unpacked" --unarchive-all "${common[@]}"
manifest="$(find "$work/unpacked/components/$component/manifests" -name '*.yaml' -type f 2>/dev/null | head -n1)"
[[ -n "$manifest" ]] || fail "no manifest under components/$component/manifests in the unpacked package"
if ! grep -q '^kind: ConfigMap$' "$manifest" || ! grep -q 'hello: paddock' "$manifest"; then
  cat "$manifest" >&2
  fail "the packaged manifest is not the smoke ConfigMap"
fi
say "packaged manifest: ${manifest#"$work/unpacked/"}"

say "--- zarf package inspect definition $(basename "$pkg") ---"
cat "$work/inspect.out" >&2
say "OK: zarf $got_version created and inspected a package with component '$component'"
