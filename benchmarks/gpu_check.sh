#!/usr/bin/env bash
# The single command to run on a lent GPU machine (no network; its own torch and triton):
#   bash benchmarks/gpu_check.sh
# Installs the project without dependencies and without building the CUDA extension (fast;
# gpu_check.py builds ral_kernels._C in the background for this GPU's arch, RAL_CUDA_ARCHS
# to override, and records a failed build instead of stopping), then runs the budgeted check
# (correctness, timing, profile, CUDA layout + sanitizer) and writes at most 8 files to $OUT
# (or ./gpu_check_out). Extra arguments go to gpu_check.py (e.g. --budget 420).
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
if ! RAL_SKIP_CUDA_BUILD=1 pip install --no-deps --no-build-isolation -e . > /tmp/ral_pip.log 2>&1; then
  tail -40 /tmp/ral_pip.log
  echo "pip install failed: running from the checkout (PYTHONPATH)"
  export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
fi
python benchmarks/gpu_check.py "$@"
