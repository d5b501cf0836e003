#!/usr/bin/env bash
# One command: set up .venv and run the offline demo (`ponder demo`, about 3 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh demo,kernels
exec .venv/bin/ponder demo "$@"
