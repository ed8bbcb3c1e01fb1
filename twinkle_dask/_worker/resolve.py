"""Worker side of lazy inputs: turning placeholders into values, fetching only what is needed.

A consumer rank receives its arguments with :class:`~twinkle_dask.lazy.LazySource`
placeholders in them. :meth:`Resolver.materialize` replaces each with the
collected value, fetching from the producer ranks the results that the
collect strategy reads. When the consumer must dispatch for itself
(:meth:`Resolver.remote_dispatch`), placeholders the strategy looks into
become :class:`~twinkle_dask.lazy.LazyView` objects first, so slicing needs
only metadata and the fetch asks each producer rank for just its overlap.
Producers on the same worker are read in place, without serialization.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from .._wire.channel import unpack
from .._wire.errors import add_note, decode_error
from .._wire.protocol import Fetch, FetchMeta, Reply
from ..collect import MISSING, collect
from ..dispatch import Dispatcher
from ..exceptions import SerializationError
from ..lazy import KEEP, DaskInput, FetchKey, LazySource, LazyView, Meta, ShardView, plan_view, replace
from ..mesh import DeviceMesh

__all__ = ["Resolver", "extract"]


def extract(value: Any, path: tuple[Any, ...] | list[Any], rng: tuple[int, int] | list[int] | None) -> Any:
    """The part of a stored result that a fetch asks for."""
    for key in path:
        value = value[key]
    if rng is not None:
        value = value[rng[0] : rng[1]]
    return value


LocalRead = Callable[[str, int, int, tuple[Any, ...], Any], Awaitable[Any]]
SendRequest = Callable[[str, Fetch | FetchMeta], Awaitable[Reply]]
DaskValue = Callable[[Any], Awaitable[Any]]


class Resolver:
    """Resolves the lazy inputs of one call.

    Parameters
    ----------
    address : str
        This worker's address (producers here are read in place).
    request : coroutine function
        ``request(address, msg) -> reply`` over a channel.
    read_local : coroutine function
        ``read_local(cid, call_id, index, path, rng) -> value`` for producers here.
    dask_value : coroutine function, optional
        ``dask_value(key) -> value``: the value of a Dask future's key
        (:class:`~twinkle_dask.lazy.DaskInput`), fetched by this worker.
    unpack : coroutine function, optional
        ``unpack(packed) -> value``: unpickles a fetched result off the event
        loop (in-line :func:`~twinkle_dask._wire.channel.unpack` without it).
    """

    def __init__(self, address: str, request: SendRequest, read_local: LocalRead,
                 dask_value: DaskValue | None = None, unpack: DaskValue | None = None) -> None:
        self.address = address
        self.request = request
        self.read_local = read_local
        self.dask_value = dask_value
        self.unpack = unpack
        self._cache: dict[Any, asyncio.Future[Any]] = {}

    # ------------------------------------------------------------------ fetching
    async def _fetch(self, src: LazySource, index: int, path: tuple[Any, ...], rng: Any) -> Any:
        address = src.addresses[index]
        if address == self.address:
            return await self.read_local(src.cid, src.call_id, index, path, rng)
        msg = Fetch(src.cid, src.call_id, tuple(path), None if rng is None else (int(rng[0]), int(rng[1])))
        reply = await self.request(address, msg)
        if not reply.ok:
            raise decode_error(reply.error, f"input produced by {src.label} on rank {index} ({address})")
        try:
            return unpack(reply.value) if self.unpack is None else await self.unpack(reply.value)
        except Exception as exc:
            raise SerializationError(
                f"the input produced by {src.label} on rank {index} ({address}) cannot be deserialized on "
                f"worker {self.address}: {type(exc).__name__}: {exc}. Return plain data (built-in types, numpy "
                f"arrays, tensors) or objects of classes every worker can import."
            ) from exc

    def _once(self, key: Any, make: Callable[[], Awaitable[Any]]) -> asyncio.Future[Any]:
        fut = self._cache.get(key)
        if fut is None:
            fut = asyncio.ensure_future(make())
            self._cache[key] = fut
        return fut

    def fetch(self, src: LazySource, index: int, path: tuple[Any, ...] = (), rng: Any = None) -> asyncio.Future[Any]:
        key = (src.cid, src.call_id, index, tuple(path), None if rng is None else tuple(rng))
        return self._once(("f", *key), lambda: self._fetch(src, index, tuple(path), rng))

    async def _meta(self, src: LazySource, index: int) -> Meta | None:
        address = src.addresses[index]
        reply = await self.request(address, FetchMeta(src.cid, src.call_id))
        if not reply.ok:
            raise decode_error(reply.error, f"input produced by {src.label} on rank {index} ({address})")
        return Meta.from_wire(reply.meta)

    def metas(self, src: LazySource) -> asyncio.Future[list[Meta | None]]:
        """Every producer rank's Meta, once each has finished; raises the first rank's failure.

        A consumer depends on every rank of its producer, as the driver's own
        collect does: a failed rank fails the consumer even when the collect
        strategy reads other ranks only.
        """

        async def make() -> list[Meta | None]:
            if src.metas is not None and all(m is not None for m in src.metas):
                return list(src.metas)
            return list(await asyncio.gather(*(self._meta(src, i) for i in range(len(src.addresses)))))

        return self._once(("m", src.cid, src.call_id), make)

    async def whole(self, src: LazySource) -> Any:
        """The collected value of ``src``, from the results its collect strategy reads."""

        async def make() -> Any:
            needed = src.needed()
            values, _ = await asyncio.gather(
                asyncio.gather(*(self.fetch(src, i) for i in needed)), self.metas(src)
            )
            results = [MISSING] * len(src.addresses)
            for i, v in zip(needed, values):
                results[i] = v
            try:
                return collect(src.collect, results, src.mesh)
            except Exception as exc:
                raise add_note(exc, f"while collecting the lazy input produced by {src.label}") from None

        return await self._once(("w", src.cid, src.call_id), make)

    def dask(self, ref: DaskInput) -> asyncio.Future[Any]:
        """The value of a Dask future in the arguments (once per key)."""
        fetch = self.dask_value
        if fetch is None:
            raise RuntimeError("this resolver cannot fetch Dask data")
        return self._once(("d", ref.key), lambda: fetch(ref.key))

    # ------------------------------------------------------------------ structures
    async def materialize(self, obj: Any) -> Any:
        """Replace every placeholder and view in ``obj`` with its value."""
        found: list[Any] = []

        def note(x: Any) -> Any:
            if isinstance(x, (LazySource, LazyView, DaskInput)):
                found.append(x)
                return x
            return KEEP

        replace(obj, note)
        if not found:
            return obj
        shards: dict[FetchKey, ShardView] = {}
        sources: dict[tuple[str, int], LazySource] = {}
        refs: dict[Any, DaskInput] = {}
        for x in found:
            if isinstance(x, LazySource):
                sources[(x.cid, x.call_id)] = x
            elif isinstance(x, DaskInput):
                refs[x.key] = x
            else:
                for shard in x.shards():
                    shards[shard.key] = shard
        keys = list(shards)
        fetched_values = await asyncio.gather(
            *(self.fetch(s.src, s.index, s.path, s.rng) for s in shards.values())
        )
        fetched = dict(zip(keys, fetched_values))
        wholes = dict(zip(sources, await asyncio.gather(*(self.whole(s) for s in sources.values()))))
        dask_values = dict(zip(refs, await asyncio.gather(*(self.dask(r) for r in refs.values()))))

        def fill(x: Any) -> Any:
            if isinstance(x, LazySource):
                return wholes[(x.cid, x.call_id)]
            if isinstance(x, DaskInput):
                return dask_values[x.key]
            if isinstance(x, LazyView):
                return x.assemble(fetched)
            return KEEP

        return replace(obj, fill)

    async def _view_or_value(self, src: LazySource) -> Any:
        view = plan_view(src, await self.metas(src))
        return view if view is not None else await self.whole(src)

    async def remote_dispatch(
        self,
        dispatcher: Dispatcher,
        n: int,
        index: int,
        mesh: DeviceMesh | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Dispatch on this rank: this rank's share of ``(args, kwargs)``, materialized."""
        if dispatcher.inspects == "all":
            args, kwargs = await self.materialize((args, kwargs))
        else:
            async def top(v: Any) -> Any:
                if isinstance(v, LazySource):
                    return await self._view_or_value(v)
                if isinstance(v, DaskInput):
                    return await self.dask(v)
                if dispatcher.inspects == "dicts" and isinstance(v, dict):
                    items = await asyncio.gather(*(top(x) for x in v.values()))
                    new = dict(zip(v.keys(), items))
                    return new if type(v) is dict else type(v)(new)
                return v

            args = tuple(await asyncio.gather(*(top(a) for a in args)))
            values = await asyncio.gather(*(top(v) for v in kwargs.values()))
            kwargs = dict(zip(kwargs.keys(), values))
        mine = dispatcher(n, args, kwargs, mesh)[index]
        return await self.materialize(mine)
