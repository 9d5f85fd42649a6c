#!/usr/bin/env bash
# Make a venv exactly one of the committed locks (see docs/dependencies.md), then add the project.
#   launch/install.sh cpu .venv            # CPU torch 2.13.0+cpu from $TORCH_WHEELS (default /opt/wheels)
#   launch/install.sh gpu ~/motif-venv     # the index's CUDA build of torch 2.13.0 (GPU nodes)
#   launch/install.sh gpu-fa4 ~/motif-venv # the same plus flash-attn-4 (model.flash_impl=fa4)
# pip only bootstraps uv (version and hashes from locks/bootstrap.txt); `uv pip sync` then installs
# the locked set with hashes required and removes anything else, so every machine gets the same set.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:?usage: launch/install.sh cpu|gpu|gpu-fa4 VENV}
venv=${2:?usage: launch/install.sh cpu|gpu|gpu-fa4 VENV}
python=${PYTHON:-python3}
case "$kind" in
  cpu) extra=(--find-links "${TORCH_WHEELS:-/opt/wheels}") ;;
  gpu|gpu-fa4) extra=() ;;
  *) echo "launch/install.sh: kind must be cpu, gpu or gpu-fa4, got '$kind'" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --no-deps --require-hashes -r locks/bootstrap.txt
"$venv/bin/uv" pip sync -q --python "$venv/bin/python" --require-hashes "${extra[@]}" "locks/$kind.txt"
"$venv/bin/uv" pip install -q --python "$venv/bin/python" --no-deps --no-build-isolation -e .
