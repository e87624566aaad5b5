#!/usr/bin/env bash
# bench/package.sh — packaging and push throughput of paddock against anchors measured in the same
# run on the same input (issue 3). Not part of CI; run by hand:
#
#   bench/package.sh                          # 4 GiB input, 3 runs per contender
#   PADDOCK_BENCH_SIZE=512M PADDOCK_BENCH_RUNS=1 bench/package.sh   # quick look
#
# Prints a table of contender, median seconds, MiB/s, peak RSS, and the ratios the issue sets targets
# for: paddock package vs `sha256sum` (the read bound, >= 0.8), vs a buildah pipeline that builds the
# same image (>= 2x, same compression), and paddock push vs `skopeo copy` into the same registry
# (>= 1.5x). See bench/README.md for what each number means.
#
# Environment (all optional):
#   PADDOCK_BENCH_SIZE          data in the input qcow2, e.g. 4G (default), 512M
#   PADDOCK_BENCH_RUNS          runs per contender; the median is reported (default 3)
#   PADDOCK_BENCH_COMPRESSIONS  packaging compressions to measure (default "none gzip zstd")
#   PADDOCK_BENCH_ANCHOR        auto (default: buildah if it works here, else skopeo) | buildah | skopeo
#   PADDOCK_BENCH_PACKAGE       1 (default) to run the packaging benchmark, 0 to skip it
#   PADDOCK_BENCH_PUSH          1 (default) to run the push benchmark, 0 to skip it
#   PADDOCK_BENCH_PUSH_COMPRESSION  compression of the layout that is pushed (default zstd, what
#                               `paddock package` writes by default; none shows the registry-bound case)
#   PADDOCK_BENCH_BUILD         all (default: example + paddock CLI) | example | none
#   PADDOCK_BENCH_SOURCES       directories whose files fill the input disk (space separated)
#   PADDOCK_CACHE_DIR           cache root; the input lives in $PADDOCK_CACHE_DIR/bench (default ~/.cache/paddock)
#   PADDOCK_BENCH_KEEP          1 to keep the work directory (outputs, logs) after the run
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE_SPEC=${PADDOCK_BENCH_SIZE:-4G}
RUNS=${PADDOCK_BENCH_RUNS:-3}
COMPRESSIONS=${PADDOCK_BENCH_COMPRESSIONS:-none gzip zstd}
ANCHOR_CHOICE=${PADDOCK_BENCH_ANCHOR:-auto}
PACKAGE=${PADDOCK_BENCH_PACKAGE:-1}
PUSH=${PADDOCK_BENCH_PUSH:-1}
PUSH_COMPRESSION=${PADDOCK_BENCH_PUSH_COMPRESSION:-zstd}
BUILD=${PADDOCK_BENCH_BUILD:-all}
SOURCES=${PADDOCK_BENCH_SOURCES:-/usr/share /usr/bin /usr/sbin /usr/lib /usr/libexec /usr/local $HOME/.rustup}
CACHE=${PADDOCK_CACHE_DIR:-$HOME/.cache/paddock}/bench

PADDOCK_BIN=$ROOT/target/release/paddock
PADDOCK_EXAMPLE=$ROOT/target/release/examples/package

# ---------------------------------------------------------------------------------------------------
# >>> The paddock commands under test. Switching to the CLI is a one-line change in each function.
# ---------------------------------------------------------------------------------------------------

# paddock_package DISK OUT_DIR COMPRESSION — writes an OCI layout of DISK to OUT_DIR.
# PACKAGER is "cli" when `paddock package` exists in the release binary, else "example".
paddock_package() {
    case $PACKAGER in
        cli) m "$PADDOCK_BIN" package "$1" --output "$2" --compression "$3" --quiet ;;
        example) m "$PADDOCK_EXAMPLE" "$1" "$2" "$3" ;;
    esac
}

# paddock_push LAYOUT REFERENCE — pushes the OCI layout LAYOUT to REFERENCE (host:port/repo:tag).
# The registry is plain HTTP on 127.0.0.1, hence --insecure. PADDOCK_PUSH_FLAGS replaces the
# default flags (e.g. PADDOCK_PUSH_FLAGS="--insecure --quiet --parallel 1").
paddock_push() {
    # shellcheck disable=SC2086 # PADDOCK_PUSH_FLAGS is a list of flags
    m "$PADDOCK_BIN" push ${PADDOCK_PUSH_FLAGS:---insecure --quiet} "$1" "$2"
}

paddock_push_available() {
    [[ -x $PADDOCK_BIN ]] && "$PADDOCK_BIN" push --help >/dev/null 2>&1
}

# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------

say() { printf '%s\n' "$*"; }
step() { printf '\n== %s\n' "$*"; }
die() {
    printf 'bench/package.sh: %s\n' "$*" >&2
    exit 1
}

MIB=1048576
mib() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1048576 }'; }

# Installs the Debian packages this benchmark needs when their commands are missing.
ensure_tools() {
    local -a missing=()
    local pair command package
    for pair in sha256sum:coreutils qemu-img:qemu-utils mke2fs:e2fsprogs jq:jq /usr/bin/time:time \
        curl:curl skopeo:skopeo docker-registry:docker-registry buildah:buildah tar:tar gzip:gzip \
        zstd:zstd numfmt:coreutils; do
        command=${pair%%:*} package=${pair#*:}
        command -v "$command" >/dev/null 2>&1 || missing+=("$package")
    done
    ((${#missing[@]} == 0)) && return 0
    say "installing missing Debian packages: ${missing[*]}"
    [[ $(id -u) == 0 ]] || die "not root: install them with apt-get install -y --no-install-recommends ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null ||
        { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; } ||
        die "apt-get install ${missing[*]} failed"
}

median() { # FILE of numbers -> median
    sort -g "$1" | awk '{ v[NR] = $1 } END { if (NR == 0) exit 1; if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

max_of() { sort -g "$1" | tail -n 1; }

# Reads the input once so every contender starts from the same warm page cache.
warm_input() { cat "$INPUT" >/dev/null; }

# m CMD... — runs CMD under /usr/bin/time, recording its peak RSS (KiB) in $RSS_FILE.
m() { /usr/bin/time -f '%M' -a -o "$RSS_FILE" "$@"; }

# timed NAME FUNCTION ARGS... — one timed run; appends seconds and peak RSS (KiB, max over the
# processes the run started under `m`) to $RESULTS/NAME.{secs,rss}. The run happens in a background
# subshell so `set -e` holds inside multi-step pipelines (never call timed as an `if` condition: bash
# would ignore `set -e` there). A failure prints the log and exits, or with TIMED_OPTIONAL=1 sets
# TIMED_FAILED=1 and returns.
TIMED_OPTIONAL=0
TIMED_FAILED=0
timed() {
    local name=$1 start end rc=0
    shift
    sync
    warm_input
    : >"$RSS_FILE"
    start=$(date +%s.%N)
    "$@" >"$LOGS/$name.log" 2>&1 &
    wait $! || rc=$?
    end=$(date +%s.%N)
    if ((rc != 0)); then
        tail -n 20 "$LOGS/$name.log" >&2
        if ((TIMED_OPTIONAL)); then
            say "  $name failed (exit $rc); log above and in $LOGS/$name.log"
            TIMED_FAILED=1
            return 0
        fi
        die "$name failed (exit $rc); log above and in $LOGS/$name.log"
    fi
    awk -v s="$start" -v e="$end" 'BEGIN { printf "%.3f\n", e - s }' >>"$RESULTS/$name.secs"
    grep -E '^[0-9]+$' "$RSS_FILE" | sort -g | tail -n 1 >>"$RESULTS/$name.rss" || true
    printf '  %-28s run %s: %8.2f s\n' "$name" "$(wc -l <"$RESULTS/$name.secs")" "$(tail -n 1 "$RESULTS/$name.secs")"
}

layout_manifest() { # LAYOUT -> path of the manifest blob
    local index digest
    index=$(find "$1" -name index.json -print -quit)
    digest=$(jq -r '.manifests[0].digest' "$index")
    printf '%s/blobs/sha256/%s\n' "$(dirname "$index")" "${digest#sha256:}"
}

layout_layer_size() { jq -r '.layers[0].size' "$(layout_manifest "$1")"; }

layout_bytes() { # total bytes of the blobs a push sends: layers + config + manifest
    local manifest
    manifest=$(layout_manifest "$1")
    jq -r '[.layers[].size, .config.size] | add' "$manifest" | awk -v m="$(stat -c %s "$manifest")" '{ print $1 + m }'
}

layer_listing() { # LAYOUT -> "mode uid/gid size name" of the uncompressed layer's entries
    local manifest blob
    manifest=$(layout_manifest "$1")
    blob=$(dirname "$manifest")/$(jq -r '.layers[0].digest' "$manifest" | cut -d: -f2)
    tar --numeric-owner -tvf "$blob" | awk '{ printf "%s%s %s %s %s", (NR > 1 ? "; " : ""), $1, $2, $3, $6 }'
}

# ---------------------------------------------------------------------------------------------------
# the input: a qcow2 holding an ext4 file system full of real files from this machine
# ---------------------------------------------------------------------------------------------------

make_input() {
    local budget=$1 out=$2 staging list raw used=0 files=0 source size path blocks
    staging=$(mktemp -d "$CACHE/.staging.XXXXXX")
    list=$staging.list
    raw=$staging.raw
    say "building the input (cached for later runs): ~$(mib "$budget") MiB of files from: $SOURCES"
    : >"$list"
    for source in $SOURCES; do
        [[ -d $source ]] || continue
        while IFS=$'\t' read -r -d '' size path; do
            blocks=$(((size + 4095) / 4096 * 4096))
            ((used + blocks > budget)) && continue
            printf '%s\0' "$path" >>"$list"
            used=$((used + blocks))
            files=$((files + 1))
            ((used >= budget - 65536)) && break 2
        done < <(find "$source" -xdev -path "$CACHE" -prune -o -type f -size +0 -readable -printf '%s\t%p\0' 2>/dev/null | sort -z)
    done
    ((used > budget / 2)) || die "only $(mib "$used") MiB of files found in $SOURCES; set PADDOCK_BENCH_SOURCES"
    # Hard links, not copies: the staging tree costs no space and no time.
    mkdir -p "$staging/root"
    if ! xargs -0 -a "$list" cp --parents -l -t "$staging/root" -- 2>/dev/null; then
        say "  (hard links failed, copying instead)"
        rm -rf "$staging/root" && mkdir -p "$staging/root"
        xargs -0 -a "$list" cp --parents --reflink=auto -t "$staging/root" --
    fi
    local fs_kib=$(((used * 5 / 4 + 512 * MIB) / 1024))
    mke2fs -q -F -t ext4 -L paddock-bench -N $((files * 5 / 4 + 8192)) -d "$staging/root" "$raw" "${fs_kib}k" >/dev/null
    qemu-img convert -O qcow2 "$raw" "$out.tmp"
    mv "$out.tmp" "$out"
    printf 'files=%s data_bytes=%s sources=%s\n' "$files" "$used" "$SOURCES" >"$out.info"
    rm -rf "$staging" "$list" "$raw"
}

# ---------------------------------------------------------------------------------------------------
# anchor B: an image builder that produces the same image
# ---------------------------------------------------------------------------------------------------

BUILDAH_STORAGE=() # set in main

# buildah from scratch + copy + commit, vfs storage (no daemon, no fuse-overlayfs needed).
# zstd: buildah 1.28's commit has no --compression-format, so the zstd image goes through local
# storage and `buildah push --compression-format zstd`, the way a buildah user would do it.
buildah_pipeline() { # DISK OUT COMPRESSION
    local container
    container=$(m buildah "${BUILDAH_STORAGE[@]}" from -q scratch)
    m buildah "${BUILDAH_STORAGE[@]}" copy -q --chown 107:107 --chmod 0444 "$container" "$1" /disk/disk.img
    case $3 in
        none) m buildah "${BUILDAH_STORAGE[@]}" commit -q --timestamp 0 --disable-compression "$container" "oci:$2:bench" ;;
        gzip) m buildah "${BUILDAH_STORAGE[@]}" commit -q --timestamp 0 --disable-compression=false "$container" "oci:$2:bench" ;;
        zstd)
            m buildah "${BUILDAH_STORAGE[@]}" commit -q --timestamp 0 --disable-compression "$container" bench-zstd
            m buildah "${BUILDAH_STORAGE[@]}" push -q --compression-format zstd bench-zstd "oci:$2:bench"
            ;;
    esac
}

# GNU tar (same entries, ids and modes) streamed through the hashers and the compressor into an OCI
# layout written with jq, then `skopeo copy oci:A oci:B` to normalise it.
skopeo_pipeline() { # DISK OUT COMPRESSION
    local disk=$1 out=$2 compression=$3 tmp media
    tmp=$(mktemp -d "$WORK/skopeo.XXXXXX")
    mkdir -p "$tmp/stage/disk" "$tmp/a/blobs/sha256"
    ln "$disk" "$tmp/stage/disk/disk.img" 2>/dev/null || cp --reflink=auto "$disk" "$tmp/stage/disk/disk.img"
    mkfifo "$tmp/diff.fifo" "$tmp/blob.fifo"
    sha256sum <"$tmp/diff.fifo" >"$tmp/diff.sum" &
    local diff_hasher=$!
    # a=rX: the directory gets 0555 and the (non-executable) disk 0444, as containerdisks want.
    local -a tar_command=(m tar --format=gnu --numeric-owner --owner=107 --group=107 --mode=a=rX --mtime=@0 --sort=name -C "$tmp/stage" -cf - disk)
    case $compression in
        none)
            media=application/vnd.oci.image.layer.v1.tar
            "${tar_command[@]}" | tee "$tmp/diff.fifo" >"$tmp/layer"
            wait "$diff_hasher"
            cp "$tmp/diff.sum" "$tmp/blob.sum"
            ;;
        gzip | zstd)
            sha256sum <"$tmp/blob.fifo" >"$tmp/blob.sum" &
            local blob_hasher=$!
            if [[ $compression == gzip ]]; then
                media=application/vnd.oci.image.layer.v1.tar+gzip
                "${tar_command[@]}" | tee "$tmp/diff.fifo" | m gzip -6 -n -c | tee "$tmp/blob.fifo" >"$tmp/layer"
            else
                media=application/vnd.oci.image.layer.v1.tar+zstd
                "${tar_command[@]}" | tee "$tmp/diff.fifo" | m zstd -3 -T0 -q -c | tee "$tmp/blob.fifo" >"$tmp/layer"
            fi
            wait "$diff_hasher" "$blob_hasher"
            ;;
    esac
    local diff_id blob_digest layer_size
    diff_id=$(cut -d' ' -f1 "$tmp/diff.sum")
    blob_digest=$(cut -d' ' -f1 "$tmp/blob.sum")
    layer_size=$(stat -c %s "$tmp/layer")
    mv "$tmp/layer" "$tmp/a/blobs/sha256/$blob_digest"
    jq -cn --arg d "sha256:$diff_id" '{architecture: "amd64", os: "linux", rootfs: {type: "layers", diff_ids: [$d]}}' >"$tmp/config"
    local config_digest config_size manifest_digest
    config_digest=$(sha256sum "$tmp/config" | cut -d' ' -f1)
    config_size=$(stat -c %s "$tmp/config")
    mv "$tmp/config" "$tmp/a/blobs/sha256/$config_digest"
    jq -cn --arg cd "sha256:$config_digest" --argjson cs "$config_size" --arg lm "$media" \
        --arg ld "sha256:$blob_digest" --argjson ls "$layer_size" \
        '{schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
          config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $cd, size: $cs},
          layers: [{mediaType: $lm, digest: $ld, size: $ls}]}' >"$tmp/manifest"
    manifest_digest=$(sha256sum "$tmp/manifest" | cut -d' ' -f1)
    jq -cn --arg d "sha256:$manifest_digest" --argjson s "$(stat -c %s "$tmp/manifest")" \
        '{schemaVersion: 2, manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $d, size: $s,
          annotations: {"org.opencontainers.image.ref.name": "bench"}}]}' >"$tmp/a/index.json"
    mv "$tmp/manifest" "$tmp/a/blobs/sha256/$manifest_digest"
    printf '{"imageLayoutVersion":"1.0.0"}' >"$tmp/a/oci-layout"
    local -a accept=()
    [[ $compression == none ]] && accept=(--dest-oci-accept-uncompressed-layers)
    m skopeo copy -q "${accept[@]}" "oci:$tmp/a:bench" "oci:$out:bench"
    rm -rf "$tmp"
}

anchor_pipeline() {
    case $ANCHOR in
        buildah) buildah_pipeline "$@" ;;
        skopeo) skopeo_pipeline "$@" ;;
    esac
}

# Checks that buildah can build an image here (vfs storage, as root, no daemon).
buildah_probe() {
    local probe
    probe=$(mktemp -d "$WORK/buildah-probe.XXXXXX")
    local -a storage=(--root "$probe/root" --runroot "$probe/run" --storage-driver vfs)
    head -c 4096 /dev/urandom >"$probe/disk"
    local container
    container=$(buildah "${storage[@]}" from -q scratch 2>"$probe/err") &&
        buildah "${storage[@]}" copy -q --chown 107:107 --chmod 0444 "$container" "$probe/disk" /disk/disk.img >/dev/null 2>>"$probe/err" &&
        buildah "${storage[@]}" commit -q --disable-compression "$container" "oci:$probe/out:bench" >/dev/null 2>>"$probe/err"
    local rc=$?
    BUILDAH_PROBE_ERROR=$(tail -n 1 "$probe/err")
    rm -rf "$probe"
    return $rc
}

# ---------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------

REGISTRY_PID=''
REGISTRY=''
REGISTRY_DIR=''

free_port() {
    local port
    for _ in $(seq 1 50); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            printf '%s\n' "$port"
            return 0
        fi
    done
    die "no free TCP port found on 127.0.0.1"
}

# A fresh docker-registry (empty storage, new port) so no contender finds blobs left by another.
start_registry() {
    local dir port attempt
    dir=$(mktemp -d "$WORK/registry.XXXXXX")
    REGISTRY_DIR=$dir
    # A free port can be taken by another process before the registry binds it: try a few.
    for attempt in 1 2 3 4 5; do
        port=$(free_port)
        cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
EOF
        docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 &
        REGISTRY_PID=$!
        REGISTRY=127.0.0.1:$port
        for _ in $(seq 1 100); do
            curl -fsS -o /dev/null "http://$REGISTRY/v2/" 2>/dev/null && return 0
            kill -0 "$REGISTRY_PID" 2>/dev/null || break
            sleep 0.1
        done
        grep -q "address already in use" "$dir/log" || break
        say "docker-registry: port $port was taken (attempt $attempt), trying another"
    done
    cat "$dir/log" >&2
    die "docker-registry did not start on $REGISTRY"
}

stop_registry() {
    if [[ -n $REGISTRY_PID ]]; then
        kill "$REGISTRY_PID" 2>/dev/null || true
        wait "$REGISTRY_PID" 2>/dev/null || true
        REGISTRY_PID=''
    fi
    # Each registry holds a full copy of the image; keep only one on disk at a time.
    if [[ -n $REGISTRY_DIR ]]; then
        rm -rf "$REGISTRY_DIR"
        REGISTRY_DIR=''
    fi
}

skopeo_push() { # LAYOUT REFERENCE
    # --preserve-digests: otherwise skopeo gzips uncompressed layers on the way to a registry and
    # would push a different image than paddock does.
    m skopeo copy -q --preserve-digests --dest-tls-verify=false "oci:$1:$PUSH_REF_NAME" "docker://$2"
}

# The rawest push: each blob in one monolithic `curl -T` PUT (POST for an upload URL, then PUT with
# ?digest=), then the manifest. What a client can reach against this registry on this machine.
curl_push() { # LAYOUT REFERENCE(host:port/repo:tag)
    local layout=$1 registry=${2%%/*} rest=${2#*/} manifest digest location
    local repository=${rest%:*} tag=${rest##*:}
    manifest=$(layout_manifest "$layout")
    for digest in $(jq -r '.config.digest, .layers[].digest' "$manifest"); do
        location=$(curl -fsS -X POST -D - -o /dev/null "http://$registry/v2/$repository/blobs/uploads/" |
            tr -d '\r' | awk 'tolower($1) == "location:" { print $2 }')
        if [[ $location == /* ]]; then location=http://$registry$location; fi
        if [[ $location == *\?* ]]; then location+="&digest=$digest"; else location+="?digest=$digest"; fi
        m curl -fsS -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' \
            -T "$(dirname "$manifest")/${digest#sha256:}" "$location"
    done
    m curl -fsS -o /dev/null -X PUT -H "Content-Type: $(jq -r '.mediaType' "$manifest")" \
        --data-binary "@$manifest" "http://$registry/v2/$repository/manifests/$tag"
}

# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------

cleanup() {
    stop_registry
    if [[ -n ${WORK:-} && -d $WORK ]]; then
        if [[ ${PADDOCK_BENCH_KEEP:-0} == 1 ]]; then say "work directory kept: $WORK"; else rm -rf "$WORK"; fi
    fi
}
trap cleanup EXIT

ensure_tools
SIZE=$(numfmt --from=iec "$SIZE_SPEC") || die "PADDOCK_BENCH_SIZE=$SIZE_SPEC is not a size like 4G or 512M"
mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/run.XXXXXX")
LOGS=$WORK/logs RESULTS=$WORK/results RSS_FILE=$WORK/rss
mkdir -p "$LOGS" "$RESULTS"
BUILDAH_STORAGE=(--root "$WORK/buildah/root" --runroot "$WORK/buildah/run" --storage-driver vfs)

step "build"
case $BUILD in
    all | example)
        (cd "$ROOT" && cargo build --release -q -p paddock-oci --example package) || die "cargo build of the package example failed"
        if [[ $BUILD == all ]]; then
            (cd "$ROOT" && cargo build --release -q -p paddock) 2>"$LOGS/build-paddock.log" ||
                say "warning: cargo build --release -p paddock failed (see $LOGS/build-paddock.log); using the example"
        fi
        ;;
    none) ;;
    *) die "PADDOCK_BENCH_BUILD must be all, example or none" ;;
esac
if [[ -x $PADDOCK_BIN ]] && "$PADDOCK_BIN" package --help >/dev/null 2>&1; then
    PACKAGER=cli
    PACKAGER_DESCRIPTION="target/release/paddock package FILE --output DIR --compression C --quiet"
else
    PACKAGER=example
    PACKAGER_DESCRIPTION="target/release/examples/package FILE DIR C (paddock-oci example; the CLI has no 'package' yet)"
    [[ -x $PADDOCK_EXAMPLE ]] || die "$PADDOCK_EXAMPLE missing; run with PADDOCK_BENCH_BUILD=example"
fi

step "input"
INPUT=$CACHE/disk-$SIZE.qcow2
# Peak use: the input (plus its raw image while it is built), and during a run the buildah storage
# copy, the output layout and (zstd) a committed image, or the push layout plus one registry.
NEED=$((SIZE * 4 + 2 * 1024 * MIB))
FREE=$(($(df --output=avail -B1 "$CACHE" | tail -n 1)))
((FREE >= NEED)) || die "$CACHE has $(mib "$FREE") MiB free; this run needs about $(mib "$NEED") MiB (4x PADDOCK_BENCH_SIZE + 2 GiB)"
if [[ -f $INPUT ]]; then
    say "cached: $INPUT"
else
    make_input "$SIZE" "$INPUT"
fi
INPUT_BYTES=$(stat -c %s "$INPUT")
INFO=$(cat "$INPUT.info" 2>/dev/null || true)
say "input: $INPUT"
say "  qcow2 file $(mib "$INPUT_BYTES") MiB ($INPUT_BYTES bytes), virtual $(qemu-img info --output=json "$INPUT" | jq -r '."virtual-size"' | numfmt --to=iec); ext4 of real files: $INFO"

step "anchor B"
case $ANCHOR_CHOICE in
    auto)
        if buildah_probe; then
            ANCHOR=buildah ANCHOR_WHY="buildah works here (root, vfs storage)"
        else
            ANCHOR=skopeo ANCHOR_WHY="buildah cannot build here: ${BUILDAH_PROBE_ERROR:-unknown error}"
        fi
        ;;
    buildah | skopeo) ANCHOR=$ANCHOR_CHOICE ANCHOR_WHY="chosen with PADDOCK_BENCH_ANCHOR" ;;
    *) die "PADDOCK_BENCH_ANCHOR must be auto, buildah or skopeo" ;;
esac
case $ANCHOR in
    buildah) ANCHOR_DESCRIPTION="buildah $(buildah --version | cut -d' ' -f3) --storage-driver vfs: from scratch; copy --chown 107:107 --chmod 0444 FILE /disk/disk.img; commit oci:DIR (zstd: commit + push --compression-format zstd)" ;;
    skopeo) ANCHOR_DESCRIPTION="GNU tar (107:107, a=rX, mtime 0) | tee sha256sum | gzip -6 / zstd -3 -T0 | tee sha256sum > blob; jq config+manifest; skopeo copy oci:A oci:B" ;;
esac
say "anchor B pipeline: $ANCHOR ($ANCHOR_WHY)"
say "  $ANCHOR_DESCRIPTION"

step "machine"
say "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')); $(free -g | awk '/Mem:/ { print $2 }') GiB RAM; load average $(cut -d' ' -f1-3 /proc/loadavg)"
say "kernel $(uname -r); paddock $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') (+ working tree); $(sha256sum --version | head -n1); skopeo $(skopeo --version | cut -d' ' -f3); $(docker-registry --version | cut -d' ' -f2-)"
say "page cache: all warm. The input is read once (cat > /dev/null) before every run, so every"
say "contender reads it from memory; outputs go to $CACHE on the same disk and are fsynced by"
say "paddock and by containers/image; sync runs (untimed) before every run; outputs are removed (untimed)"
say "after every run. Contenders are interleaved run by run so background load hits all of them alike."

((PACKAGE)) && step "packaging ($RUNS run(s) each, median reported)"
((PACKAGE)) && for run in $(seq 1 "$RUNS"); do
    timed "sha256sum" m sha256sum "$INPUT"
    timed "read" m dd if="$INPUT" of=/dev/null bs=1M status=none
    rm -f "$WORK/copy"
    timed "copy" m dd if="$INPUT" of="$WORK/copy" bs=1M conv=fsync status=none
    rm -f "$WORK/copy"
    for compression in $COMPRESSIONS; do
        out=$WORK/out/paddock-$compression
        rm -rf "$out" && mkdir -p "$WORK/out"
        timed "paddock-$compression" paddock_package "$INPUT" "$out" "$compression"
        layout_layer_size "$out" >"$RESULTS/paddock-$compression.layer"
        [[ $run == 1 && $compression == none ]] && layer_listing "$out" >"$RESULTS/paddock-listing"
        rm -rf "$out"

        out=$WORK/out/$ANCHOR-$compression
        rm -rf "$out" "$WORK/buildah"
        timed "$ANCHOR-$compression" anchor_pipeline "$INPUT" "$out" "$compression"
        layout_layer_size "$out" >"$RESULTS/$ANCHOR-$compression.layer"
        [[ $run == 1 && $compression == none ]] && layer_listing "$out" >"$RESULTS/anchor-listing"
        rm -rf "$out" "$WORK/buildah"
    done
done

if [[ -f $RESULTS/paddock-listing ]]; then
    say "same image? layer entries (mode uid/gid size name):"
    say "  paddock:  $(cat "$RESULTS/paddock-listing")"
    say "  $ANCHOR: $(cat "$RESULTS/anchor-listing")"
fi

PUSH_NOTE=''
if [[ $PUSH == 1 ]]; then
    step "push ($RUNS run(s) each, median reported; a fresh docker-registry per run and contender)"
    PUSH_LAYOUT=$WORK/push-layout
    paddock_package "$INPUT" "$PUSH_LAYOUT" "$PUSH_COMPRESSION" >"$LOGS/push-layout.log" 2>&1
    PUSH_REF_NAME=$(jq -r '.manifests[0].annotations["org.opencontainers.image.ref.name"] // empty' "$(find "$PUSH_LAYOUT" -name index.json -print -quit)")
    [[ -n $PUSH_REF_NAME ]] || die "the pushed layout's index.json has no ref.name annotation"
    PUSH_BYTES=$(layout_bytes "$PUSH_LAYOUT")
    say "pushed image: the paddock layout with compression $PUSH_COMPRESSION, $(mib "$PUSH_BYTES") MiB of blobs, ref.name $PUSH_REF_NAME, pushed as tag bench"
    if paddock_push_available; then
        PADDOCK_PUSH=1
    else
        PADDOCK_PUSH=0
        PUSH_NOTE="paddock push: not available yet ($PADDOCK_BIN has no 'push' subcommand)"
        say "$PUSH_NOTE"
    fi
    for run in $(seq 1 "$RUNS"); do
        start_registry
        timed "curl-push" curl_push "$PUSH_LAYOUT" "$REGISTRY/bench/curl-$run:bench"
        stop_registry
        start_registry
        timed "skopeo-push" skopeo_push "$PUSH_LAYOUT" "$REGISTRY/bench/skopeo-$run:bench"
        timed "skopeo-push-again" skopeo_push "$PUSH_LAYOUT" "$REGISTRY/bench/skopeo-$run:bench"
        stop_registry
        if ((PADDOCK_PUSH)); then
            start_registry
            TIMED_OPTIONAL=1 TIMED_FAILED=0
            timed "paddock-push" paddock_push "$PUSH_LAYOUT" "$REGISTRY/bench/paddock-$run:bench"
            ((TIMED_FAILED)) || timed "paddock-push-again" paddock_push "$PUSH_LAYOUT" "$REGISTRY/bench/paddock-$run:bench"
            TIMED_OPTIONAL=0
            stop_registry
            if ((TIMED_FAILED)); then
                PADDOCK_PUSH=0
                PUSH_NOTE="paddock push: failed (see $LOGS/paddock-push.log; set PADDOCK_PUSH_FLAGS or edit paddock_push)"
            fi
        fi
    done
    rm -rf "$PUSH_LAYOUT"
fi

# ---------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------

secs() { median "$RESULTS/$1.secs"; }
rate() { awk -v b="$2" -v s="$(secs "$1")" 'BEGIN { if (b == 0) print "-"; else printf "%.0f", b / s / 1048576 }'; }

step "results: input $(mib "$INPUT_BYTES") MiB qcow2, $RUNS run(s), median wall time, warm page cache"
printf '%-30s %9s %9s %10s %12s  %s\n' contender seconds MiB/s "peak RSS" "layer MiB" "all runs (s)"
row() { # NAME LABEL BYTES
    [[ -f $RESULTS/$1.secs ]] || return 0
    local rss layer='-'
    rss=$(max_of "$RESULTS/$1.rss" 2>/dev/null || echo 0)
    [[ -f $RESULTS/$1.layer ]] && layer=$(mib "$(cat "$RESULTS/$1.layer")")
    printf '%-30s %9.2f %9s %7s MiB %12s  %s\n' "$2" "$(secs "$1")" "$(rate "$1" "$3")" \
        "$(awk -v k="${rss:-0}" 'BEGIN { printf "%.1f", k / 1024 }')" "$layer" "$(paste -sd' ' "$RESULTS/$1.secs")"
}
row sha256sum "sha256sum (anchor A)" "$INPUT_BYTES"
row read "dd of=/dev/null (info)" "$INPUT_BYTES"
row copy "dd bs=1M conv=fsync (info)" "$INPUT_BYTES"
for compression in $COMPRESSIONS; do
    row "paddock-$compression" "paddock package $compression" "$INPUT_BYTES"
    row "$ANCHOR-$compression" "$ANCHOR $compression (anchor B)" "$INPUT_BYTES"
done
if [[ $PUSH == 1 ]]; then
    row curl-push "curl PUT per blob (info)" "$PUSH_BYTES"
    row skopeo-push "skopeo copy push" "$PUSH_BYTES"
    row skopeo-push-again "skopeo copy push, blobs exist" 0
    row paddock-push "paddock push" "$PUSH_BYTES"
    row paddock-push-again "paddock push, blobs exist" 0
fi
say "(MiB/s = input bytes / seconds for packaging; bytes of blobs pushed / seconds for push)"

step "ratios against the anchors (same run, same input)"
printf '%-46s %7s %8s  %-6s %s\n' comparison ratio target result "per run (same round)"
# ratio = median seconds(SLOW) / median seconds(FAST) = throughput(FAST) / throughput(SLOW); the
# per-run column pairs the runs of one round (measured minutes apart) to show how noisy it is.
ratio() { # LABEL FAST SLOW TARGET
    local value verdict='-' target='-' per_run
    [[ -f $RESULTS/$2.secs && -f $RESULTS/$3.secs ]] || return 0
    value=$(awk -v f="$(secs "$2")" -v s="$(secs "$3")" 'BEGIN { printf "%.2f", s / f }')
    per_run=$(paste "$RESULTS/$2.secs" "$RESULTS/$3.secs" | awk 'NF == 2 { printf "%s%.2f", (NR > 1 ? " " : ""), $2 / $1 }')
    if [[ $4 != - ]]; then
        target=">= $4"
        verdict=$(awk -v v="$value" -v t="$4" 'BEGIN { print (v >= t) ? "PASS" : "MISS" }')
    fi
    printf '%-46s %7s %8s  %-6s %s\n' "$1" "$value" "$target" "$verdict" "$per_run"
}
for compression in $COMPRESSIONS; do
    ratio "paddock package $compression / sha256sum" "paddock-$compression" sha256sum 0.8
done
for compression in $COMPRESSIONS; do
    ratio "paddock package $compression / dd copy (info)" "paddock-$compression" copy -
done
for compression in $COMPRESSIONS; do
    ratio "paddock package $compression / $ANCHOR $compression" "paddock-$compression" "$ANCHOR-$compression" 2
done
if [[ $PUSH == 1 ]]; then
    if [[ -f $RESULTS/paddock-push.secs ]]; then
        ratio "paddock push / skopeo copy" paddock-push skopeo-push 1.5
        ratio "paddock push / curl PUT per blob (info)" paddock-push curl-push -
    else
        printf '%-46s %7s %8s  %s\n' "paddock push / skopeo copy" - ">= 1.5" "${PUSH_NOTE:-paddock push: not available yet}"
    fi
fi
say "paddock: $PACKAGER_DESCRIPTION"
say "anchor B: $ANCHOR — $ANCHOR_WHY"
