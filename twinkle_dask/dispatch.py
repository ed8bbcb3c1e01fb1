"""Dispatch strategies: how one call's inputs become the inputs of N ranks.

A strategy is registered by name and turns ``(n, args, kwargs, mesh)`` into
one ``(args, kwargs)`` pair per target rank. Built in:

``'slice'``
    Every top-level ``list`` argument is split evenly by its own length,
    earlier ranks taking the extra items; everything else goes whole.
``'all'``
    Every rank gets every argument whole.
``'slice_dp'``
    Lists, torch tensors and numpy arrays are split by the mesh's data rank
    (``mesh.get_slice``); dicts are split per value, recursively; tp/pp/cp
    peers of one data rank get identical data.

Custom strategies use Twinkle's per-rank form
``f(length, i, args, kwargs, device_mesh) -> (args_i, kwargs_i)``, either
passed directly to ``remote_function(dispatch=f)`` or registered with
:func:`register_dispatch`. The built-ins also accept lazy views (see
:mod:`twinkle_dask.lazy`), so a consumer rank can slice a lazy input without
fetching it first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ._callables import call_with_mesh, mesh_convention
from ._types import tensor_type
from .exceptions import ConfigurationError, DispatchError
from .lazy import LazyView
from .mesh import DeviceMesh

__all__ = ["Dispatcher", "dispatch", "get_dispatcher", "list_dispatchers", "register_dispatch"]

Pairs = list[tuple[tuple[Any, ...], dict[str, Any]]]
Split = Callable[[int, tuple[Any, ...], dict[str, Any], "DeviceMesh | None"], Pairs]

#: Which argument positions a strategy looks into: ``'none'`` (passes
#: everything whole), ``'top'`` (top-level arguments), ``'dicts'`` (top-level
#: arguments and dict values, recursively) or ``'all'`` (anything: custom code).
Inspects = Literal["none", "top", "dicts", "all"]


@dataclass(frozen=True, slots=True)
class Dispatcher:
    """A named dispatch strategy."""

    name: str
    split: Split
    inspects: Inspects = "all"

    def __call__(
        self, n: int, args: tuple[Any, ...], kwargs: dict[str, Any], mesh: DeviceMesh | None
    ) -> Pairs:
        return self.split(n, args, kwargs, mesh)


# --------------------------------------------------------------------------- value helpers
def kind_of(value: Any) -> str:
    """The structural kind of a value or lazy view, as dispatch sees it."""
    if isinstance(value, LazyView):
        return value.kind
    if isinstance(value, list):
        return "list"
    if isinstance(value, tuple):
        return "tuple"
    if isinstance(value, dict):
        return "dict"
    if isinstance(value, np.ndarray):
        return "ndarray" if value.ndim > 0 else "other"
    tensor = tensor_type()
    if tensor is not None and isinstance(value, tensor):
        return "tensor" if value.dim() > 0 else "other"
    return "other"


def _take(value: Any, start: int, stop: int) -> Any:
    if isinstance(value, LazyView):
        return value.take(start, stop)
    return value[start:stop]


def _keys(value: Any) -> list[Any]:
    return list(value.keys())


def _item(value: Any, key: Any) -> Any:
    if isinstance(value, LazyView):
        return value.item(key)
    return value[key]


def _rebuild_dict(template: Any, items: dict[Any, Any]) -> Any:
    if isinstance(template, LazyView) or type(template) is dict:
        return items
    try:
        return type(template)(items)
    except Exception:
        return items


def _even_bounds(length: int, n: int, i: int) -> tuple[int, int]:
    k, m = divmod(length, n)
    return i * k + min(i, m), (i + 1) * k + min(i + 1, m)


def _assemble(n: int, args_parts: list[list[Any]], kwargs_parts: dict[str, list[Any]]) -> Pairs:
    return [
        (tuple(p[i] for p in args_parts), {k: v[i] for k, v in kwargs_parts.items()})
        for i in range(n)
    ]


# --------------------------------------------------------------------------- built-ins
def _split_all(n: int, args: tuple[Any, ...], kwargs: dict[str, Any], mesh: DeviceMesh | None) -> Pairs:
    return [(args, kwargs) for _ in range(n)]


def _split_slice(n: int, args: tuple[Any, ...], kwargs: dict[str, Any], mesh: DeviceMesh | None) -> Pairs:
    def parts(value: Any) -> list[Any]:
        if kind_of(value) != "list":
            return [value] * n
        length = len(value)
        return [_take(value, *_even_bounds(length, n, i)) for i in range(n)]

    return _assemble(n, [parts(a) for a in args], {k: parts(v) for k, v in kwargs.items()})


def _split_slice_dp(n: int, args: tuple[Any, ...], kwargs: dict[str, Any], mesh: DeviceMesh | None) -> Pairs:
    if mesh is None:
        raise DispatchError(
            "dispatch='slice_dp' needs a DeviceMesh to split by data rank, and this component has "
            "none: pass device_mesh=DeviceMesh.from_sizes(dp_size=...) when building it (or "
            "initialize(global_device_mesh=...)), or use dispatch='slice'"
        )
    stride = max(1, mesh.world_size // n)
    data_ranks = [mesh.get_data_rank_from_global_rank(i * stride) for i in range(n)]
    world = mesh.data_world_size

    def parts(value: Any, where: str) -> list[Any]:
        kind = kind_of(value)
        if kind in ("list", "tensor", "ndarray"):
            length = len(value)
            bounds = [mesh.get_slice(length, d) for d in data_ranks]
            sizes = [b.stop - b.start for b in bounds]
            if any(sizes) and not all(sizes):
                empty = [i for i, s in enumerate(sizes) if not s]
                raise DispatchError(
                    f"Batch too small for {n} workers: {where} has {length} item(s) but the mesh "
                    f"splits data {world} ways, so rank(s) {empty} would get no data. Pass at "
                    f"least {world} items (a multiple of {world} splits evenly)."
                )
            return [_take(value, b.start, b.stop) for b in bounds]
        if kind == "dict":
            per_key = {key: parts(_item(value, key), f"{where}[{key!r}]") for key in _keys(value)}
            return [_rebuild_dict(value, {k: v[i] for k, v in per_key.items()}) for i in range(n)]
        return [value] * n

    return _assemble(
        n,
        [parts(a, f"argument {i}") for i, a in enumerate(args)],
        {k: parts(v, f"argument {k!r}") for k, v in kwargs.items()},
    )


# --------------------------------------------------------------------------- custom
def _check_pair(fn: Callable[..., Any], i: int, out: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    name = getattr(fn, "__qualname__", repr(fn))
    if (
        not isinstance(out, (tuple, list))
        or len(out) != 2
        or not isinstance(out[0], (tuple, list))
        or not isinstance(out[1], Mapping)
    ):
        raise DispatchError(
            f"dispatch function {name} returned {type(out).__name__} {out!r:.200} for rank {i}; "
            f"it must return a pair (args, kwargs): a tuple or list of positional arguments and a "
            f"dict of keyword arguments, e.g. `return args, kwargs`"
        )
    return tuple(out[0]), dict(out[1])


def _rank_fn_dispatcher(name: str, fn: Callable[..., Any]) -> Dispatcher:
    convention = mesh_convention(fn, 4, "dispatch function", "(length, i, args, kwargs, device_mesh)")

    def split(n: int, args: tuple[Any, ...], kwargs: dict[str, Any], mesh: DeviceMesh | None) -> Pairs:
        return [_check_pair(fn, i, call_with_mesh(fn, convention, mesh, n, i, args, kwargs)) for i in range(n)]

    return Dispatcher(name, split, "all")


# --------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Dispatcher] = {
    "slice": Dispatcher("slice", _split_slice, "top"),
    "all": Dispatcher("all", _split_all, "none"),
    "slice_dp": Dispatcher("slice_dp", _split_slice_dp, "dicts"),
}
_BUILTIN = frozenset(_REGISTRY)


def register_dispatch(name: str, fn: Callable[..., Any], *, replace: bool = False) -> None:
    """Register a custom dispatch strategy under ``name``.

    Parameters
    ----------
    name : str
        The name to use as ``remote_function(dispatch=name)``.
    fn : callable
        ``fn(length, i, args, kwargs, device_mesh) -> (args_i, kwargs_i)``.
    replace : bool, default False
        Allow replacing a custom strategy of the same name.

    Raises
    ------
    ConfigurationError
        If ``name`` is taken (built-ins cannot be replaced) or ``fn`` has the
        wrong signature.

    Examples
    --------
    >>> def to_rank_zero(length, i, args, kwargs, device_mesh):
    ...     return (args, kwargs) if i == 0 else ((), {})
    >>> register_dispatch("rank_zero", to_rank_zero)  # doctest: +SKIP
    """
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"dispatch name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ConfigurationError(f"dispatch {name!r}: expected a callable, got {fn!r}")
    if name in _BUILTIN or (name in _REGISTRY and not replace):
        raise ConfigurationError(
            f"dispatch strategy {name!r} is already registered"
            + ("" if name in _BUILTIN else "; pass replace=True to replace it")
        )
    _REGISTRY[name] = _rank_fn_dispatcher(name, fn)


def list_dispatchers() -> list[str]:
    """Names of the registered dispatch strategies."""
    return sorted(_REGISTRY)


def get_dispatcher(spec: str | Callable[..., Any]) -> Dispatcher:
    """Look up a strategy by name, or wrap a callable.

    Raises
    ------
    ConfigurationError
        For an unknown name, naming the known ones.
    """
    if isinstance(spec, Dispatcher):
        return spec
    if isinstance(spec, str):
        try:
            return _REGISTRY[spec]
        except KeyError:
            raise ConfigurationError(
                f"unknown dispatch {spec!r}; valid choices are {list_dispatchers()} or a callable "
                f"f(length, i, args, kwargs, device_mesh) (register names with register_dispatch)"
            ) from None
    if callable(spec):
        return _rank_fn_dispatcher(getattr(spec, "__qualname__", "custom"), spec)
    raise ConfigurationError(
        f"dispatch must be a strategy name from {list_dispatchers()} or a callable, got {spec!r}"
    )


def dispatch(
    spec: str | Callable[..., Any] | Dispatcher,
    n: int,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    mesh: DeviceMesh | None = None,
) -> Pairs:
    """Split one call's inputs into ``n`` per-rank ``(args, kwargs)`` pairs.

    Examples
    --------
    >>> dispatch("slice", 2, ([1, 2, 3], "x"), {})
    [(([1, 2], 'x'), {}), (([3], 'x'), {})]
    """
    return get_dispatcher(spec)(n, tuple(args), dict(kwargs), mesh)
