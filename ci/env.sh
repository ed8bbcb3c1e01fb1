#!/usr/bin/env bash
# Source me: creates (once) and activates .venv with twinkle-dask and its test and torch extras.
# torch is pinned to the 2.13.0 CPU build unless a torch is already importable (a GPU user's own);
# TWINKLE_NO_TORCH=1 skips it. TWINKLE_VENV picks another venv folder.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TWINKLE_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
stamp="$venv/.twinkle-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    python -m pip install --quiet --upgrade pip
    if [ -z "${TWINKLE_NO_TORCH:-}" ] && ! python -c "import torch" 2>/dev/null; then
        python -m pip install --quiet "torch==2.13.0"
    fi
    python -m pip install --quiet -e "$root[test]"
    touch "$stamp"
fi
