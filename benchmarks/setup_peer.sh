#!/usr/bin/env bash
# Create the "peer" environment for the side-by-side benchmark: the real Twinkle
# (twinkle-kit on Ray), in its own virtualenv, because twinkle-kit pins numpy<2.3
# and must not share an environment with twinkle_dask.
#
#   benchmarks/setup_peer.sh            # -> <repo>/.venv-ray
#   TWINKLE_RAY_VENV=/some/dir benchmarks/setup_peer.sh
#
# Idempotent: an existing venv that already has the pinned versions is left
# alone; otherwise pip brings it to the pins. Prints nothing on success.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TWINKLE_RAY_VENV:-$REPO_ROOT/.venv-ray}"

# Pinned versions of everything the runner (benchmarks/_runner_twinkle_ray.py) imports.
# torch==2.13.0 resolves to a CPU build available locally; an unpinned torch would
# pull a multi-GB CUDA build.
PINS=(
  "twinkle-kit==0.5.1"
  "ray==2.60.0"
  "torch==2.13.0"
  "psutil==7.2.2"
)

# Keep the default venv location out of git.
GITIGNORE="$REPO_ROOT/.gitignore"
if ! grep -qxF '.venv-ray/' "$GITIGNORE" 2>/dev/null; then
  # Start on a new line if the file does not end with one, then append the entry.
  if [[ -s "$GITIGNORE" && -n "$(tail -c1 "$GITIGNORE")" ]]; then echo >> "$GITIGNORE"; fi
  echo '.venv-ray/' >> "$GITIGNORE"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi

# Fast path: all pins already satisfied -> nothing to do.
if "$VENV/bin/python" - "${PINS[@]}" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        got = version(name)
    except PackageNotFoundError:
        sys.exit(1)
    # Local version labels (torch "2.13.0+cpu") count as the pinned release.
    if got.split("+")[0] != want:
        sys.exit(1)
PY
then
  exit 0
fi

# -q -q hides progress; errors still reach stderr and fail the script.
"$VENV/bin/python" -m pip install -q -q --disable-pip-version-check "${PINS[@]}"
