#!/usr/bin/env bash
# Make sure the real Fashion-MNIST is on this machine. It comes from the Debian package
# dataset-fashion-mnist (/usr/share/datasets/fashion-mnist); bnlab never downloads at run time.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

have_all() {
  local f
  for f in "${files[@]}"; do [ -s "$1/$f" ] || return 1; done
}

if have_all "$dir" || { [ -n "${BNLAB_DATA:-}" ] && have_all "$BNLAB_DATA"; }; then
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist) ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq dataset-fashion-mnist >/dev/null
  have_all "$dir" || { echo "dataset-fashion-mnist installed but $dir is incomplete" >&2; exit 1; }
else
  echo "Fashion-MNIST is missing. Install it with: sudo apt-get install dataset-fashion-mnist" >&2
  echo "(or point BNLAB_DATA at a folder holding the four *-ubyte.gz files)" >&2
  exit 1
fi
