#!/usr/bin/env bash
# Create (or reuse) .venv, install ponder with the given extras, and build the compiled kernels.
# A fresh machine gets the CPU build of torch (torch==2.13.0, from the local wheel here) so
# that pip never drags in a multi-GB CUDA build; set PONDER_TORCH to another pip spec
# (e.g. "torch" or "torch==2.5.1") to choose your own, or PONDER_TORCH=skip to keep the one
# already importable in the environment.
set -euo pipefail
extras="${1:-dev}"
cd "$(dirname "$0")/.."
python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
torch_spec="${PONDER_TORCH:-torch==2.13.0}"
if [[ "$torch_spec" != skip ]] && ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "$torch_spec"
fi
python -m pip install -q -e ".[$extras]"
# the optional C++ kernels, once per machine (a no-op when built); without them ponder runs on PyTorch ops
.venv/bin/ponder kernels build || echo "ponder: kernels not built; fast paths will use PyTorch ops"
