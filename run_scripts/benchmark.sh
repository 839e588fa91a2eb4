#!/usr/bin/env bash
# Scan and encoder-layer CPU benchmarks; writes outputs/benchmarks/benchmark.{md,json,png}.
# Usage: bash run_scripts/benchmark.sh [--quick]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash run_scripts/setup_env.sh  # idempotent: seconds when .venv is ready, so it runs from a fresh clone
exec "$root/.venv/bin/python" run_scripts/benchmark.py "$@"
