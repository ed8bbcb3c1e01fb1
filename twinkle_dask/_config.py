"""twinkle_dask's settings in ``dask.config``, under the ``twinkle-dask`` namespace.

The defaults live in ``twinkle-dask.yaml`` next to this module and are
registered with :func:`dask.config.update_defaults` when the package is
imported; users override them as any Dask setting (``dask.config.set``, a YAML
file in ``~/.config/dask``, or ``DASK_TWINKLE_DASK__WORKER_UNRESPONSIVE_TIMEOUT=20s``).
Values are read when they are used, never cached.
"""

from __future__ import annotations

import os

import dask.config
import yaml
from dask.utils import parse_timedelta

from .exceptions import ConfigurationError

__all__ = ["seconds"]

_FILE = os.path.join(os.path.dirname(__file__), "twinkle-dask.yaml")

with open(_FILE) as f:
    _DEFAULTS = yaml.safe_load(f)

dask.config.update_defaults(_DEFAULTS)


def seconds(key: str) -> float:
    """The setting ``twinkle-dask.<key>`` in seconds (``'10s'``, ``'2 minutes'`` or a number).

    Raises
    ------
    ConfigurationError
        If the value is not a duration.
    """
    value = dask.config.get(f"twinkle-dask.{key}")
    try:
        parsed = parse_timedelta(value, default="seconds")
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigurationError(
            f"dask config twinkle-dask.{key} = {value!r} is not a duration; give seconds or a string "
            f"such as '10s' or '2 minutes' ({exc})"
        ) from None
    if parsed is None or parsed < 0:
        raise ConfigurationError(f"dask config twinkle-dask.{key} = {value!r} must be a duration >= 0")
    return float(parsed)
