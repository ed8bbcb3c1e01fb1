#!/usr/bin/env bash
# GPU tests (needs a CUDA GPU and a CUDA build of torch): prints the GPUs, then runs the gpu-marked tests.
set -euo pipefail
nvidia-smi
source "$(dirname "$0")/env.sh"
cd "$(dirname "$0")/.."
timeout 900 python -m pytest -m gpu -v "$@"
