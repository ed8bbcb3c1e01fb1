"""Shared parts of the Twinkle reference scripts: arguments, exact float encoding, the JSON result file."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any

#: Each script's JSON has ``values`` (readable floats) and ``exact`` (the same tree, floats as ``float.hex()``).
RESULT_KEYS = ('script', 'backend', 'values', 'exact', 'timing', 'wall_s')


def parse_args(description: str) -> argparse.Namespace:
    """Parse ``--backend ray|dask --assets DIR --out FILE.json [--steps N]``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--backend', choices=('ray', 'dask'), default='ray', help='Twinkle mode to run in')
    parser.add_argument('--assets', required=True, help='folder for the tiny model and dataset (built if missing)')
    parser.add_argument('--out', required=True, help='JSON file to write the recorded results to')
    parser.add_argument('--steps', type=int, default=None, help="optimizer steps (default: the script's own)")
    return parser.parse_args()


def plain(value: Any) -> Any:
    """``value`` as JSON-ready Python: tensors and numpy values become floats, ints and lists."""
    if hasattr(value, 'detach'):
        value = value.detach().cpu().numpy()
    if hasattr(value, 'tolist'):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def exact(value: Any) -> Any:
    """The tree of :func:`plain` with every float replaced by its ``float.hex()`` string (bit-exact)."""
    value = plain(value)
    if isinstance(value, dict):
        return {k: exact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [exact(v) for v in value]
    if isinstance(value, float):
        return value.hex()
    return value


def readable(value: Any) -> Any:
    """The tree of :func:`plain` with non-finite floats spelled as strings, so the file stays strict JSON."""
    value = plain(value)
    if isinstance(value, dict):
        return {k: readable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [readable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


#: Keys of ``calculate_metric`` that measure time: kept in ``values``, left out of ``exact``.
TIMING_KEYS = ('total time elapse', 'speed')


def deterministic_metric(metric: dict[str, Any]) -> dict[str, Any]:
    """``metric`` without the wall-clock entries (``TIMING_KEYS``)."""
    return {k: v for k, v in metric.items() if k not in TIMING_KEYS}


def tensor_digest(tensors: dict[str, Any]) -> dict[str, Any]:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors`` (sorted by name), and the sum of all values.

    Keys are compared as given: callers normalise names first when two sides name the same tensor differently.
    """
    import hashlib

    import torch

    digest = hashlib.sha256()
    total = 0.0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to('cpu').contiguous()
        digest.update(f'{name}|{tensor.dtype}|{tuple(tensor.shape)}|'.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        total += float(tensor.double().sum())
    return {'sha256': digest.hexdigest(), 'count': len(tensors), 'sum': total}


def write_result(path: str, script: str, backend: str, values: dict[str, Any], started: float,
                 timing: Any = None) -> dict[str, Any]:
    """Write ``{'script', 'backend', 'values', 'exact', 'timing', 'wall_s'}`` to ``path`` and return it.

    ``exact`` is ``values`` with floats as ``float.hex()``: two runs agree bit for bit when their ``exact`` trees
    are equal. ``timing`` (wall-clock measurements) and ``wall_s`` are recorded but never compared.
    """
    result = {
        'script': script,
        'backend': backend,
        'values': readable(values),
        'exact': exact(values),
        'timing': readable(timing),
        'wall_s': round(time.perf_counter() - started, 2),
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(result, f, indent=1, sort_keys=True)
        f.write('\n')
    return result
