#!/usr/bin/env bash
# The single command to run on a lent GPU machine (no network; its own torch and triton):
#   bash benchmarks/gpu_check.sh
# Installs the project without dependencies, which builds the CUDA extension ral_kernels._C
# for this GPU's arch (RAL_CUDA_ARCHS to override), runs the CUDA tests and the short
# benchmark, and writes gpu_check.json / gpu_check.md to $OUT (or ./gpu_check_out).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
export RAL_CUDA_ARCHS="${RAL_CUDA_ARCHS:-$(python -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())')}"
start=$(date +%s)
pip install --no-deps --no-build-isolation -v -e . > /tmp/ral_pip.log 2>&1 || { tail -80 /tmp/ral_pip.log; exit 1; }
export RAL_BUILD_SECONDS=$(( $(date +%s) - start ))
grep -E "ral_kernels: (building|skipping)" /tmp/ral_pip.log | head -2 || true
python benchmarks/gpu_check.py "$@"
