#!/usr/bin/env bash
# Set up .venv for sparse_lens. `bash scripts/setup.sh` for the package, `--test` adds the test tools.
# torch is installed first and pinned to 2.13.0: on a CPU machine that is the CPU build this
# machine image carries; on a GPU machine pip takes the CUDA build of the same release. A bare
# `torch` requirement with no torch installed would pull a multi-GB CUDA build onto CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
pip install -e ".${extras}"
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  # the report's browser test renders it in headless Debian chromium; without it that test skips
  timeout 600 apt-get install -y -q chromium >/dev/null 2>&1 \
    || echo "setup: could not install chromium; the headless-browser test will be skipped" >&2
fi
.venv/bin/python -c "import sparse_lens, torch, transformer_lens" \
  || { echo "setup failed: sparse_lens does not import" >&2; exit 1; }
