"""Lazy inputs: results that stay on their workers until a consumer needs them.

When a lazy result is passed into another component's method, the driver
sends a :class:`LazySource` in its place. Each consumer rank must end up with
exactly what the driver would have dispatched had it collected the value
first. For the common strategies the consumer does that without the whole
value: from the producer ranks' :class:`Meta` (kind, length, keys) it builds a
:class:`LazyView` of the collected value, lets the dispatch strategy slice the
view, and fetches only the pieces (:data:`FetchKey`) its slice covers. Where a
view cannot be built (``mean``, custom collect, tuple results) it fetches the
results the collect strategy reads and collects them itself.

Everything here is pure; the fetching happens in :mod:`twinkle_dask._worker.extension`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ._types import tensor_type
from .collect import concat, get_collector, last_stage_indices
from .exceptions import SerializationError
from .mesh import DeviceMesh

__all__ = [
    "ConcatView",
    "DaskInput",
    "FetchKey",
    "ItemsView",
    "LazySource",
    "LazyView",
    "Meta",
    "ShardView",
    "contains",
    "plan_view",
    "replace",
]

#: One piece to fetch: (component id, call id, result index, key path into the
#: result, (start, stop) or None).
FetchKey = tuple[str, int, int, tuple[Any, ...], "tuple[int, int] | None"]

_SLICEABLE = ("list", "tuple", "tensor", "ndarray", "str", "bytes")
_MAX_KEYS = 256


@dataclass(frozen=True, slots=True)
class Meta:
    """What a consumer needs to know about a result to slice it unseen.

    ``dtype`` and ``tail`` (the shape after dim 0) are recorded for tensors
    and arrays, so a flattened view is only used where concatenation would
    neither promote a dtype nor fail.
    """

    kind: str
    length: int | None = None
    keys: tuple[str, ...] | None = None
    items: tuple[Meta, ...] | None = None
    dtype: str | None = None
    tail: tuple[int, ...] | None = None

    @classmethod
    def of(cls, value: Any, depth: int = 3) -> Meta:
        """Describe ``value`` (plain dicts ``depth`` levels deep)."""
        if value is None:
            return cls("none")
        if isinstance(value, list):
            return cls("list", len(value))
        if isinstance(value, tuple):
            return cls("tuple", len(value))
        if isinstance(value, str):
            return cls("str", len(value))
        if isinstance(value, (bytes, bytearray)):
            return cls("bytes", len(value))
        if isinstance(value, np.ndarray):
            if not value.ndim:
                return cls("other")
            return cls("ndarray", len(value), dtype=str(value.dtype), tail=tuple(value.shape[1:]))
        tensor = tensor_type()
        if tensor is not None and isinstance(value, tensor):
            if not value.dim():
                return cls("other")
            return cls("tensor", int(value.shape[0]), dtype=str(value.dtype), tail=tuple(value.shape[1:]))
        if isinstance(value, dict):
            keys = tuple(value)
            if (type(value) is dict and depth > 0 and len(keys) <= _MAX_KEYS
                    and all(isinstance(k, str) for k in keys)):
                return cls("dict", len(keys), keys, tuple(cls.of(value[k], depth - 1) for k in keys))
            return cls("dict", len(keys))
        return cls("other")

    def to_wire(self) -> list[Any]:
        items = None if self.items is None else [m.to_wire() for m in self.items]
        keys = None if self.keys is None else list(self.keys)
        tail = None if self.tail is None else list(self.tail)
        return [self.kind, self.length, keys, items, self.dtype, tail]

    @classmethod
    def from_wire(cls, wire: Sequence[Any] | None) -> Meta | None:
        if wire is None:
            return None
        kind, length, keys, items, dtype, tail = wire
        return cls(
            kind,
            length,
            None if keys is None else tuple(keys),
            None if items is None else tuple(cls.from_wire(m) for m in items),  # type: ignore[misc]
            dtype,
            None if tail is None else tuple(tail),
        )

    @property
    def viewable(self) -> bool:
        """Whether a view over this value can be sliced and keyed, at every level, without fetching it."""
        if self.kind == "dict":
            return self.keys is not None and self.items is not None and all(m.viewable for m in self.items)
        return self.kind not in _SLICEABLE or self.length is not None


@dataclass(frozen=True, slots=True)
class LazySource:
    """A lazy result standing in an argument: where its per-rank results live.

    ``addresses[i]`` hosts result ``i`` of call ``call_id`` on component
    ``cid``; ``metas`` are known when the producer had finished when the
    consumer call was issued.
    """

    cid: str
    call_id: int
    addresses: tuple[str, ...]
    collect: Any
    mesh: DeviceMesh | None
    label: str
    metas: tuple[Meta | None, ...] | None = None

    def needed(self) -> list[int]:
        """The result indices the collect strategy reads."""
        return get_collector(self.collect).needed(len(self.addresses), self.mesh)


# --------------------------------------------------------------------------- views
class LazyView:
    """The collected value of a lazy input, known by shape only."""

    __slots__ = ()

    if TYPE_CHECKING:
        # Each subclass gives it as a class attribute or a property.
        @property
        def kind(self) -> str: ...

    def __len__(self) -> int:
        raise NotImplementedError

    def take(self, start: int, stop: int) -> LazyView:
        raise NotImplementedError

    def keys(self) -> list[str]:
        raise TypeError(f"a lazy {self.kind} has no keys")

    def item(self, key: Any) -> LazyView:
        raise TypeError(f"a lazy {self.kind} cannot be indexed by key")

    def shards(self) -> list[ShardView]:
        """The pieces this view is made of."""
        raise NotImplementedError

    def requests(self) -> list[FetchKey]:
        return [s.key for s in self.shards()]

    def assemble(self, fetched: Mapping[FetchKey, Any]) -> Any:
        raise NotImplementedError


def _clamp(start: int, stop: int, length: int) -> tuple[int, int]:
    start = min(max(start, 0), length)
    return start, min(max(stop, start), length)


class ShardView(LazyView):
    """One result (or a key path / range within it) on one producer rank."""

    __slots__ = ("index", "meta", "path", "rng", "src")

    def __init__(
        self,
        src: LazySource,
        index: int,
        meta: Meta,
        path: tuple[Any, ...] = (),
        rng: tuple[int, int] | None = None,
    ) -> None:
        self.src = src
        self.index = index
        self.meta = meta
        self.path = path
        self.rng = rng

    @property
    def kind(self) -> str:
        return self.meta.kind

    def __len__(self) -> int:
        if self.rng is not None:
            return self.rng[1] - self.rng[0]
        if self.meta.length is None:
            raise TypeError(f"a lazy {self.kind} has no length")
        return self.meta.length

    def take(self, start: int, stop: int) -> ShardView:
        start, stop = _clamp(start, stop, len(self))
        base = self.rng[0] if self.rng else 0
        return ShardView(self.src, self.index, self.meta, self.path, (base + start, base + stop))

    def keys(self) -> list[str]:
        if self.kind != "dict" or self.meta.keys is None:
            return super().keys()
        return list(self.meta.keys)

    def item(self, key: Any) -> ShardView:
        if self.kind != "dict" or self.meta.keys is None or self.meta.items is None:
            return cast(ShardView, super().item(key))  # the base raises TypeError
        return ShardView(self.src, self.index, self.meta.items[self.meta.keys.index(key)], (*self.path, key))

    @property
    def key(self) -> FetchKey:
        return (self.src.cid, self.src.call_id, self.index, self.path, self.rng)

    def requests(self) -> list[FetchKey]:
        return [self.key]

    def shards(self) -> list[ShardView]:
        return [self]

    def assemble(self, fetched: Mapping[FetchKey, Any]) -> Any:
        return fetched[self.key]


class ItemsView(LazyView):
    """A list whose elements are other views (``collect='none'``, ``'last_pp'``)."""

    __slots__ = ("elems",)
    kind = "list"

    def __init__(self, elems: Sequence[LazyView]) -> None:
        self.elems = tuple(elems)

    def __len__(self) -> int:
        return len(self.elems)

    def take(self, start: int, stop: int) -> ItemsView:
        return ItemsView(self.elems[start:stop])

    def shards(self) -> list[ShardView]:
        return [s for e in self.elems for s in e.shards()]

    def assemble(self, fetched: Mapping[FetchKey, Any]) -> Any:
        return [e.assemble(fetched) for e in self.elems]


class ConcatView(LazyView):
    """Results concatenated end to end (``collect='flatten'``)."""

    __slots__ = ("_kind", "pieces")

    def __init__(self, kind: str, shards: Sequence[ShardView]) -> None:
        self._kind = kind
        self.pieces = tuple(shards)

    @property
    def kind(self) -> str:
        return self._kind

    def __len__(self) -> int:
        if self._kind == "dict":
            return len(self.pieces[0])
        return sum(len(s) for s in self.pieces)

    def take(self, start: int, stop: int) -> ConcatView:
        start, stop = _clamp(start, stop, len(self))
        picked: list[ShardView] = []
        offset = 0
        for shard in self.pieces:
            size = len(shard)
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                picked.append(shard.take(lo - offset, hi - offset))
            offset += size
        if not picked:  # an empty slice of the right type: ask for zero items of shard 0
            picked.append(self.pieces[0].take(0, 0))
        return ConcatView(self._kind, picked)

    def keys(self) -> list[str]:
        return self.pieces[0].keys()

    def item(self, key: Any) -> ConcatView:
        subs = [s.item(key) for s in self.pieces]
        return ConcatView(subs[0].kind, subs)

    def shards(self) -> list[ShardView]:
        return list(self.pieces)

    def assemble(self, fetched: Mapping[FetchKey, Any]) -> Any:
        return concat([s.assemble(fetched) for s in self.pieces])


def _flatten_view(source: LazySource, metas: Sequence[Meta]) -> ConcatView | None:
    kinds = {m.kind for m in metas}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if kind == "dict":
        keys = metas[0].keys
        if keys is None or any(m.keys != keys or m.items is None for m in metas):
            return None
        for i in range(len(keys)):
            if _flatten_view(source, [m.items[i] for m in metas]) is None:  # type: ignore[index]
                return None
    elif kind not in _SLICEABLE or any(m.length is None for m in metas):
        return None
    elif len({(m.dtype, m.tail) for m in metas}) != 1:  # concatenation would promote or fail
        return None
    return ConcatView(kind, [ShardView(source, i, m) for i, m in enumerate(metas)])


def plan_view(source: LazySource, metas: Sequence[Meta | None]) -> LazyView | None:
    """A view of ``source``'s collected value, or None where only the value itself will do."""
    if not metas or any(m is None for m in metas):
        return None
    known: list[Meta] = [m for m in metas if m is not None]
    if any(m.kind == "tuple" for m in known) or not isinstance(source.collect, str):
        return None
    n = len(known)
    name = source.collect
    if name == "flatten":
        return _flatten_view(source, known)
    if name == "none":
        picked = list(range(n))
    elif name == "first":
        picked = [0]
    elif name == "last_pp":
        picked = last_stage_indices(n, source.mesh)
    elif name == "last_pp_first":
        picked = (last_stage_indices(n, source.mesh) or [0])[:1]
    else:
        return None
    if not all(known[i].viewable for i in picked):
        return None
    shards = [ShardView(source, i, known[i]) for i in picked]
    if name in ("first", "last_pp_first") or (name == "none" and n == 1):
        return shards[0]
    return ItemsView(shards)


@dataclass(frozen=True, slots=True)
class DaskInput:
    """A Dask ``Future`` standing in an argument: its key, fetched by the consumer rank's worker."""

    key: Any


# --------------------------------------------------------------------------- structures
def contains(obj: Any, predicate: Callable[[Any], bool]) -> bool:
    """Whether ``predicate`` holds for ``obj`` or anything inside its lists, tuples and dicts.

    Iterative, so arguments nested deeper than Python's recursion limit are
    walked too; a container reached twice (shared, or one that contains
    itself) is looked into once.
    """
    stack = [obj]
    seen: set[int] = set()
    while stack:
        x = stack.pop()
        if predicate(x):
            return True
        if isinstance(x, (list, tuple, dict)):
            if id(x) in seen:
                continue
            seen.add(id(x))
            stack.extend(x.values() if isinstance(x, dict) else x)
    return False


_KEEP: Any = object()


def replace(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """Rebuild ``obj`` with ``fn(x)`` substituted wherever it returns something other than ``KEEP``.

    Lists, tuples (named tuples too) and dicts are walked; their types are
    kept. A container reached twice becomes one rebuilt container reached
    twice, so lists and dicts that contain themselves keep their cycles.

    Raises
    ------
    SerializationError
        For a tuple that contains itself (through a list or dict), which
        cannot be rebuilt, or nesting deeper than Python's recursion limit.
    """
    memo: dict[int, Any] = {}
    building: set[int] = set()

    def walk(x: Any) -> Any:
        new = fn(x)
        if new is not _KEEP:
            return new
        if not isinstance(x, (list, tuple, dict)):
            return x
        key = id(x)
        if key in memo:
            return memo[key]
        if isinstance(x, list):
            out_l: list[Any] = []
            memo[key] = out_l
            out_l.extend(walk(v) for v in x)
            return out_l
        if isinstance(x, tuple):
            if key in building:
                raise SerializationError(
                    "the arguments contain a tuple that contains itself; it cannot be rebuilt with lazy "
                    "results swapped in: use a list there"
                )
            building.add(key)
            items = [walk(v) for v in x]
            building.discard(key)
            memo[key] = type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
            return memo[key]
        if type(x) is dict:
            out_d: dict[Any, Any] = {}
            memo[key] = out_d
            out_d.update((k, walk(v)) for k, v in x.items())
            return out_d
        items_d = {k: walk(v) for k, v in x.items()}
        try:
            memo[key] = type(x)(items_d)
        except Exception:
            memo[key] = items_d
        return memo[key]

    try:
        return walk(obj)
    except RecursionError:
        raise SerializationError(
            f"the arguments are nested deeper than Python's recursion limit ({sys.getrecursionlimit()}); "
            f"pass flatter data"
        ) from None


KEEP = _KEEP
