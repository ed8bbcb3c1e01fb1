#!/usr/bin/env bash
# Twinkle's own components on the bridge: tests/test_bridge.py and the Ray-equality scripts in
# tests/twinkle_scripts/, in their own venv (.venv-twinkle: twinkle-kit pulls transformers, peft,
# modelscope, datasets and accelerate, and pins numpy<2.3).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source ci/twinkle_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python -m pytest tests/test_bridge.py tests/twinkle_scripts -p no:cacheprovider -rs "$@"
