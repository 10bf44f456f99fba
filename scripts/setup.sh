#!/usr/bin/env bash
# Idempotent, prompt-free setup: Debian packages the project and its tests need, a virtualenv in
# .venv, and the project installed editable with its test extras. Safe to run again and again:
# each step is skipped when it is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(fuse3 libfuse-dev pkg-config gcc python3-dev docker-registry apache2-utils tinyproxy
  skopeo umoci runc debootstrap erofs-utils fio curl zstd make git fdisk
  containerd busybox-static iproute2 util-linux qemu-system-x86 qemu-system-common cpio)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi

# Reinstall only when the dependency list changed.
stamp=.venv/.setup-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing the project (editable, with test extras)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
# The real nydus-snapshotter for the containerd end-to-end tests and bench/bench_containerd.py: built
# offline by its rig (next to the repository) into a cache outside the repo. build.sh installs the
# Go toolchain and Go library packages it needs and is a no-op once its stamp matches (0.1 s).
RIG=$(cd .. && pwd)/shared/rigs/nydus-snapshotter
SNAP_OUT=${XDG_CACHE_HOME:-$HOME/.cache}/nydus-py/nydus-snapshotter
if [ -x "$RIG/build.sh" ]; then
  if ! out=$("$RIG/build.sh" "$SNAP_OUT" 2>&1); then
    echo "$out" >&2
    echo "setup: building nydus-snapshotter failed" >&2
    exit 1
  fi
else
  echo "setup: no nydus-snapshotter rig at $RIG: the containerd tests will be skipped"
fi
echo "setup: ready (.venv)"
