#!/usr/bin/env bash
# Builds the paddock operator image as an OCI archive, the file deploy/zarf.yaml's `imageArchives`
# names, from a built `paddock` binary, Debian's `qemu-img` and the shared libraries they link (ldd) —
# no base image, no
# registry, no network. The image reference inside the archive is the one zarf.yaml lists (the chart's
# default image), so Zarf finds it there and, after `zarf package deploy`, its agent rewrites the
# operator pods to the copy in the Zarf registry.
#
# usage: deploy/build-image.sh [BINARY] [ARCHIVE]
#   BINARY   the paddock binary (default: target/release/paddock; build it with
#            `cargo build --release -p paddock`)
#   ARCHIVE  where the OCI archive goes (default: deploy/build/paddock-operator-image.tar)
#
# Needs buildah (Debian: apt-get install buildah); as root it uses a private vfs store in a
# temporary directory, so the machine's container storage is left alone.
set -euo pipefail
deploy=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
binary=${1:-$deploy/../target/release/paddock}
archive=${2:-$deploy/build/paddock-operator-image.tar}
if [[ ! -x "$binary" ]]; then
  echo "build-image: $binary is not an executable; run 'cargo build --release -p paddock' or pass the binary" >&2
  exit 1
fi
if ! command -v buildah >/dev/null; then
  echo "build-image: buildah is missing; install it (apt-get install buildah)" >&2
  exit 1
fi
# The reference: the one image zarf.yaml's imageArchives entry lists.
reference=$(awk '/imageArchives:/ {in_archives=1} in_archives && /^ *- [a-z0-9.-]+\/.*:/ {print $2; exit}' "$deploy/zarf.yaml")
if [[ -z "$reference" ]]; then
  echo "build-image: cannot find the image reference under imageArchives in $deploy/zarf.yaml" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs rm --all >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
rootfs="$work/rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/tmp"
# Every library a program loads, at the path the dynamic loader looks for it (symlinks resolved).
copy_libraries() {
  ldd "$1" | awk '/=> \// {print $3} /^\t\/.*\(0x/ {print $1}' | while read -r library; do
    mkdir -p "$rootfs$(dirname "$library")"
    cp -L "$library" "$rootfs$library"
  done
}
cp -L "$binary" "$rootfs/usr/local/bin/paddock"
copy_libraries "$binary"
# qemu-img: backups (the operator's schedules, the console's backup pages) convert the exported raw
# disk to qcow2 with it, as `paddock backup` does on a workstation.
qemu_img=$(command -v qemu-img || true)
if [[ -z "$qemu_img" ]]; then
  echo "build-image: qemu-img is missing; install it (apt-get install qemu-utils): backups in the cluster need it" >&2
  exit 1
fi
cp -L "$qemu_img" "$rootfs/usr/local/bin/qemu-img"
copy_libraries "$qemu_img"
chmod 0755 "$rootfs/usr/local/bin/paddock" "$rootfs/usr/local/bin/qemu-img"
chmod 1777 "$rootfs/tmp"

buildah=(buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs)
container=$("${buildah[@]}" from --quiet scratch)
"${buildah[@]}" copy --quiet "$container" "$rootfs" / >/dev/null
# A numeric non-root user: the chart's runAsNonRoot can verify it without /etc/passwd.
"${buildah[@]}" config \
  --os linux --arch amd64 \
  --user 65532:65532 \
  --entrypoint '["/usr/local/bin/paddock"]' --cmd '' \
  --port 8080 --port 8443 \
  --label org.opencontainers.image.title=paddock \
  --label "org.opencontainers.image.version=${reference##*:}" \
  "$container"
mkdir -p "$(dirname "$archive")"
partial="$archive.partial"
rm -f "$partial"
"${buildah[@]}" commit --quiet --format oci --timestamp 0 "$container" "oci-archive:$partial:$reference" >/dev/null
mv "$partial" "$archive"
echo "build-image: wrote $reference to $archive ($(du -h "$archive" | cut -f1))" >&2
