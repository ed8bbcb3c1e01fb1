#!/usr/bin/env bash
# The test suite: pure unit tests and local-cluster tests (installs first). GPU tests skip without a GPU.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$(dirname "$0")/.."
timeout 900 python -m pytest "$@"
