#!/usr/bin/env bash
# The main job: a real data-parallel training run on a local Dask cluster (installs first).
set -euo pipefail
source "$(dirname "$0")/env.sh"
python -m twinkle_dask.examples.train "$@"
