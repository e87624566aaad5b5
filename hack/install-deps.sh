#!/usr/bin/env bash
# Installs the system packages paddock's tests use, from Debian's archive. Idempotent: packages that
# are already installed are skipped, and apt is not touched at all when nothing is missing.
# Run as root (CI and the developers' machines are root); otherwise it prints the apt command to run.
set -euo pipefail

packages=(
  # the local runtime and the test disk
  qemu-system-x86 qemu-utils ovmf
  linux-image-amd64 busybox-static syslinux syslinux-common syslinux-efi mtools e2fsprogs fdisk cpio
  # images and registries
  skopeo docker-registry xz-utils zstd
  # the operator image the Zarf package test builds (deploy/build-image.sh)
  buildah
  # the Kubernetes control plane for integration tests (etcd and kube-apiserver are built from Go modules)
  openssl curl python3
  # vncdotool, the third-party VNC client the end-to-end tests drive, installs into a venv
  python3-venv
  # the web console: its build (node, npm) and its Playwright test's browser
  nodejs chromium
)
# npm comes with nodejs from NodeSource, but is a separate package in Debian.
if ! command -v npm >/dev/null; then
  packages+=(npm)
fi

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} system packages present"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages: ${missing[*]}" >&2
  echo "install-deps: run as root: apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
