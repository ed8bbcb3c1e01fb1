#!/usr/bin/env bash
# dask-cuda's worker code on a machine without GPUs: its own test switch
# (DASK_CUDA_TEST_DISABLE_DEVICE_SPECIFIC=1) with an explicit CUDA_VISIBLE_DEVICES.
# A separate venv: dask-cuda pins an older dask through rapids-dask-dependency, so it is
# installed without that pin, beside the same dask the main suite tests.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export TWINKLE_VENV="${TWINKLE_CUDA_VENV:-$root/.venv-cuda}" TWINKLE_NO_TORCH=1
source "$root/ci/env.sh"
stamp="$TWINKLE_VENV/.dask-cuda-installed"
if [ ! -f "$stamp" ]; then
    python -m pip install --quiet --no-deps "dask-cuda==26.10.0"
    python -m pip install --quiet "nvidia-ml-py==13.615.71" "cuda-core==1.2.2" "cuda-bindings==13.5.0" "pandas>=2"
    touch "$stamp"
fi
cd "$root"
timeout 600 python -m pytest tests/test_gpu_placement.py "$@"
