#!/usr/bin/env bash
# Lint and type-check: ruff on the code, mypy (strict, configured in pyproject.toml) on the package.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$(dirname "$0")/.."
python -m pip install --quiet "ruff==0.17.6" "mypy==2.4.1"
ruff check twinkle_dask tests benchmarks ci
mypy
