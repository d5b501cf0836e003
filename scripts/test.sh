#!/usr/bin/env bash
# One command: set up .venv and run the whole test suite twice (offline, CPU): with the fast paths
# (compiled kernels, stored routes) on, then off (PONDER_FAST=0, the plain PyTorch reference).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
echo "== tests with fast paths on =="
.venv/bin/python -m pytest "$@"
echo "== tests with fast paths off (PONDER_FAST=0) =="
PONDER_FAST=0 exec .venv/bin/python -m pytest "$@"
