#!/usr/bin/env bash
# Creates (or refreshes) .venv with a CPU torch and the three kvcomp packages installed editable.
# Idempotent: re-installs only when a pyproject changed. Used by `make demo` and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
stamp=$VENV/.kvcomp-stamp
want=$(cat pyproject.toml packages/*/pyproject.toml tools/venv.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "[kvcomp] setting up $VENV (CPU torch, triton, transformers, the three kvcomp packages)" >&2
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip 2>&1 | grep -v "is ignored" || true
# torch first and pinned to the CPU build (a plain `torch` would pull a multi-GB CUDA build)
$PIP install "torch==${KVCOMP_TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "is ignored" || true
$PIP install "triton>=3.0" "transformers>=5.0" "accelerate>=1.0" "gguf>=0.10" "matplotlib>=3.5" \
    "setuptools>=77" pytest hypothesis ruff build 2>&1 | grep -v "is ignored" || true
$PIP install -e packages/kvcomp-core -e packages/kvcomp-qwen -e packages/kvcomp-deepseek \
    2>&1 | grep -v "is ignored" || true
$VENV/bin/python -c "import torch, kvcomp, kvcomp_qwen, kvcomp_deepseek" 
echo "$want" > "$stamp"
