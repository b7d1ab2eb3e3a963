#!/usr/bin/env bash
# The single command to run on a lent GPU machine (no network; its own torch and triton):
#   bash benchmarks/gpu_check.sh
# Installs the project without dependencies, runs the CUDA tests and the short benchmark,
# and writes gpu_check.json / gpu_check.md to $OUT (or ./gpu_check_out).
set -euo pipefail
cd "$(dirname "$0")/.."
pip install --no-deps --no-build-isolation -e . > /tmp/ral_pip.log 2>&1 || { cat /tmp/ral_pip.log; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python benchmarks/gpu_check.py "$@"
