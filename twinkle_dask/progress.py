"""Progress bars for long waits and driver-side iteration, where someone is watching.

``dask.config`` ``twinkle-dask.progress``: ``"auto"`` (default) shows bars in a
notebook or when stderr is a terminal, never in a CI log or a redirected file;
``true``/``false`` force them on or off. A wait shows its bar only once it has
lasted ``twinkle-dask.progress-after`` seconds (default 1), so quick calls
never pay for one.
"""

from __future__ import annotations

import sys
from typing import Any

import dask

__all__ = ["bar", "enabled", "threshold"]


def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    shell = get() if get is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def enabled() -> bool:
    """Whether progress bars are shown, per ``twinkle-dask.progress``."""
    setting = dask.config.get("twinkle-dask.progress", "auto")
    if isinstance(setting, str) and setting.lower() == "auto":
        if _in_notebook():
            return True
        isatty = getattr(sys.stderr, "isatty", None)
        return bool(isatty and isatty())
    if isinstance(setting, str):
        return setting.lower() in ("true", "on", "yes", "1")
    return bool(setting)


def threshold() -> float:
    return float(dask.config.get("twinkle-dask.progress-after", 1.0))


def bar(total: int | None, desc: str) -> Any:
    """A tqdm bar (notebook widget or terminal), or None if tqdm is missing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
