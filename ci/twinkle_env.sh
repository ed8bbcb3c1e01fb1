#!/usr/bin/env bash
# Source me: creates (once) and activates .venv-twinkle with twinkle-dask[twinkle,test] (twinkle-kit 0.5.1) and
# Ray 2.60 (Twinkle-on-Ray, the bridge's reference), for tests/test_bridge.py and tests/twinkle_scripts/.
# torch stays pinned to the 2.13.0 CPU build.
# TWINKLE_REF_VENV picks another venv folder.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TWINKLE_REF_VENV:-$root/.venv-twinkle}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
stamp="$venv/.twinkle-ref-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "${BASH_SOURCE[0]}" -nt "$stamp" ]; then
    python -m pip install --quiet --upgrade pip
    # torch first, pinned: twinkle-kit would otherwise pull a CUDA build
    python -m pip install --quiet "torch==2.13.0"
    python -m pip install --quiet -e "$root[twinkle,test]" "ray==2.60.0" "psutil==7.2.2"
    touch "$stamp"
fi
