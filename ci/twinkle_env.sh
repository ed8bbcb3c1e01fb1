#!/usr/bin/env bash
# Source me: creates (once) and activates .venv-twinkle with Twinkle 0.5.1 on Ray 2.60 and twinkle-dask (test
# extras), for the Twinkle reference scripts in tests/twinkle/. torch stays pinned to the 2.13.0 CPU build.
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
    python -m pip install --quiet "torch==2.13.0" "twinkle-kit==0.5.1" "ray==2.60.0" "psutil==7.2.2"
    python -m pip install --quiet -e "$root[test]"
    touch "$stamp"
fi
