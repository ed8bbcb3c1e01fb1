"""Collect strategies: how the per-rank results of one call become one value.

Results arrive in rank order. Built in:

``'none'``            the list of per-rank results; a single result is unwrapped.
``'flatten'``         per-rank sequences concatenated into one of the same type
                      (lists, tuples, str, numpy arrays, torch tensors on dim 0;
                      dicts per key).
``'mean'``/``'avg'``  ``numpy.mean`` of the results; dicts per key of rank 0's
                      result (values that cannot be averaged stay a list).
``'sum'``             ``numpy.sum`` of the results; dicts per key likewise.
``'first'``           rank 0's result.
``'last_pp'``         the results of the mesh's last pipeline stage (a list).
``'last_pp_first'``   the first of those.

If every rank returns a tuple, the strategy is applied position by position
and a list is returned. Custom strategies are ``f(results, device_mesh)``,
passed directly or registered with :func:`register_collect`.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._callables import call_with_mesh, mesh_convention
from ._types import tensor_type
from .exceptions import ConfigurationError
from .mesh import DeviceMesh

__all__ = [
    "Collector",
    "collect",
    "concat",
    "get_collector",
    "last_stage_indices",
    "list_collectors",
    "register_collect",
]


class _Missing:
    """Stands in for a result that a collector does not read (never fetched)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<not fetched>"


MISSING: Any = _Missing()


@dataclass(frozen=True, slots=True)
class Collector:
    """A named collect strategy.

    ``needs(n, mesh)`` lists the result indices the strategy reads (``None``:
    all), so the driver and consumer ranks fetch only those.
    """

    name: str
    fn: Callable[[list[Any], DeviceMesh | None], Any]
    needs: Callable[[int, DeviceMesh | None], list[int] | None] | None = None

    def needed(self, n: int, mesh: DeviceMesh | None) -> list[int]:
        if self.needs is None:
            return list(range(n))
        picked = self.needs(n, mesh)
        return list(range(n)) if picked is None else picked

    def __call__(self, results: Sequence[Any], mesh: DeviceMesh | None = None) -> Any:
        return collect(self, results, mesh)


def collect(spec: str | Callable[..., Any] | Collector, results: Sequence[Any], mesh: DeviceMesh | None = None) -> Any:
    """Apply a collect strategy to per-rank ``results`` (position-wise for tuples).

    Examples
    --------
    >>> collect("flatten", [[1, 2], [3]])
    [1, 2, 3]
    >>> collect("first", [(1, "a"), (2, "b")])
    [1, 'a']
    """
    collector = get_collector(spec)
    results = list(results)
    if not results:
        return results
    present = [r for r in results if r is not MISSING]
    if present and isinstance(present[0], tuple):
        width = len(present[0])
        return [
            collect(collector, [MISSING if r is MISSING else r[i] for r in results], mesh)
            for i in range(width)
        ]
    return collector.fn(results, mesh)


# --------------------------------------------------------------------------- helpers
def concat(parts: Sequence[Any]) -> Any:
    """Concatenate per-rank sequences into one value of the first part's type."""
    parts = list(parts)
    if not parts:
        return []
    first = parts[0]
    if all(p is None for p in parts):
        return None
    tensor = tensor_type()
    if tensor is not None and isinstance(first, tensor):
        return sys.modules["torch"].cat(list(parts), dim=0)
    if isinstance(first, np.ndarray):
        return np.concatenate([np.asarray(p) for p in parts], axis=0)
    if isinstance(first, str):
        return "".join(parts)
    if isinstance(first, (bytes, bytearray)):
        return type(first)(b"".join(parts))
    if isinstance(first, dict):
        return {key: concat([p[key] for p in parts]) for key in first}
    if isinstance(first, list):
        return [item for part in parts for item in part]
    if isinstance(first, tuple):
        return tuple(itertools.chain.from_iterable(parts))
    try:
        iter(first)
    except TypeError:
        raise TypeError(
            f"collect='flatten' needs a sequence from every rank, got {type(first).__name__} "
            f"{first!r:.100}; return a list (or tensor/array) or use collect='none'"
        ) from None
    flat = list(itertools.chain.from_iterable(parts))
    try:
        return type(first)(flat)
    except Exception:
        return flat


def _per_key(results: list[Any], reduce: Callable[[list[Any]], Any]) -> dict[Any, Any]:
    out = {}
    for key in results[0]:
        values = [r[key] for r in results if key in r]
        try:
            out[key] = reduce(values)
        except (TypeError, ValueError):
            out[key] = values
    return out


def last_stage_indices(n: int, mesh: DeviceMesh | None) -> list[int]:
    """Indices (0..n-1) of the target ranks in the mesh's last pipeline stage."""
    if mesh is None:
        return list(range(n))
    stride = max(1, mesh.world_size // n)
    last = set(mesh.get_pp_last_ranks())
    return [i for i in range(n) if any(i * stride + j in last for j in range(stride))]


def _none(results: list[Any], mesh: DeviceMesh | None) -> Any:
    return results[0] if len(results) == 1 else results


def _flatten(results: list[Any], mesh: DeviceMesh | None) -> Any:
    return concat(results)


def _mean(results: list[Any], mesh: DeviceMesh | None) -> Any:
    if isinstance(results[0], dict):
        return _per_key(results, np.mean)
    return np.mean(results)


def _sum(results: list[Any], mesh: DeviceMesh | None) -> Any:
    if isinstance(results[0], dict):
        return _per_key(results, np.sum)
    return np.sum(results)


def _first(results: list[Any], mesh: DeviceMesh | None) -> Any:
    return results[0]


def _last_pp(results: list[Any], mesh: DeviceMesh | None) -> Any:
    return [results[i] for i in last_stage_indices(len(results), mesh)]


def _last_pp_first(results: list[Any], mesh: DeviceMesh | None) -> Any:
    last = last_stage_indices(len(results), mesh)
    return results[last[0]] if last else results[0]


def _needs_first(n: int, mesh: DeviceMesh | None) -> list[int]:
    return [0]


def _needs_last_first(n: int, mesh: DeviceMesh | None) -> list[int]:
    return (last_stage_indices(n, mesh) or [0])[:1]


def _user_collector(name: str, fn: Callable[..., Any]) -> Collector:
    convention = mesh_convention(fn, 1, "collect function", "(results, device_mesh)")

    def run(results: list[Any], mesh: DeviceMesh | None) -> Any:
        return call_with_mesh(fn, convention, mesh, results)

    return Collector(name, run)


_mean_collector = Collector("mean", _mean)
_REGISTRY: dict[str, Collector] = {
    "none": Collector("none", _none),
    "flatten": Collector("flatten", _flatten),
    "mean": _mean_collector,
    "avg": _mean_collector,
    "sum": Collector("sum", _sum),
    "first": Collector("first", _first, _needs_first),
    "last_pp": Collector("last_pp", _last_pp, last_stage_indices),
    "last_pp_first": Collector("last_pp_first", _last_pp_first, _needs_last_first),
}
_BUILTIN = frozenset(_REGISTRY)


def register_collect(name: str, fn: Callable[..., Any], *, replace: bool = False) -> None:
    """Register a custom collect strategy ``fn(results, device_mesh)`` under ``name``.

    Raises
    ------
    ConfigurationError
        If ``name`` is taken (built-ins cannot be replaced) or ``fn`` has the
        wrong signature.

    Examples
    --------
    >>> register_collect("max", lambda results, device_mesh: max(results))  # doctest: +SKIP
    """
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"collect name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ConfigurationError(f"collect {name!r}: expected a callable, got {fn!r}")
    if name in _BUILTIN or (name in _REGISTRY and not replace):
        raise ConfigurationError(
            f"collect strategy {name!r} is already registered"
            + ("" if name in _BUILTIN else "; pass replace=True to replace it")
        )
    _REGISTRY[name] = _user_collector(name, fn)


def list_collectors() -> list[str]:
    """Names of the registered collect strategies."""
    return sorted(_REGISTRY)


def get_collector(spec: str | Callable[..., Any] | Collector) -> Collector:
    """Look up a strategy by name, or wrap a callable.

    Raises
    ------
    ConfigurationError
        For an unknown name, naming the known ones.
    """
    if isinstance(spec, Collector):
        return spec
    if isinstance(spec, str):
        try:
            return _REGISTRY[spec]
        except KeyError:
            raise ConfigurationError(
                f"unknown collect {spec!r}; valid choices are {list_collectors()} or a callable "
                f"f(results, device_mesh) (register names with register_collect)"
            ) from None
    if callable(spec):
        return _user_collector(getattr(spec, "__qualname__", "custom"), spec)
    raise ConfigurationError(
        f"collect must be a strategy name from {list_collectors()} or a callable, got {spec!r}"
    )
