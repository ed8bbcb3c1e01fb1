"""One remote call: bind, find lazy inputs, dispatch, pack, send, return a LazyResult.

The driver does the dispatch itself when it can. Lazy inputs whose value the
dispatch strategy must look into (a lazy list that ``'slice'`` splits, a lazy
tensor or dict that ``'slice_dp'`` splits, anything a custom strategy sees)
are sent whole as :class:`~twinkle_dask.lazy.LazySource` placeholders together
with the strategy, and every consumer rank dispatches for itself, fetching
only what its share needs.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from dask.base import is_dask_collection
from distributed import Future

from ._aio import on_loop
from ._wire.caller import Caller
from ._wire.channel import pack
from ._wire.protocol import INLINE_ALL, INLINE_SMALL, Call
from .dispatch import Dispatcher
from .exceptions import ComponentClosedError, SerializationError
from .futures import CallInfo, LazyResult, _dask_client, packing
from .lazy import KEEP, DaskInput, LazySource, contains, replace
from .mesh import DeviceMesh
from .specs import MethodSpec

__all__ = ["CallTarget", "caller_site", "invoke", "prepare_inputs"]

logger = logging.getLogger(__name__)

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

@dataclass(frozen=True, slots=True)
class CallTarget:
    """Where a call goes: a component's identity as the call path needs it."""

    cid: str
    label: str
    group: str
    ranks: tuple[int, ...]
    addresses: tuple[str, ...]
    mesh: DeviceMesh | None


def caller_site() -> str | None:
    """``file:line`` of the innermost frame outside twinkle_dask."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    if frame is None:
        return None
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


@functools.lru_cache(maxsize=4096)
def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def check_arguments(fn: Callable[..., Any], label: str, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    """Raise ``TypeError`` here, not on N workers, when the arguments do not fit ``fn``."""
    sig = _signature(fn)
    if sig is None:
        return
    try:
        sig.bind(None, *args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{label}{sig}: {exc}") from None


def _is_lazy(x: Any) -> bool:
    # A Dask future (a LazyResult is one too) or a Dask collection (a persisted Delayed, ...).
    return isinstance(x, Future) or getattr(type(x), "__dask_graph__", None) is not None


def prepare_inputs(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any], list[Any]]:
    """Swap lazy results for their value (when the driver has it) or a placeholder, Dask futures for their key.

    A Dask collection (a persisted ``Delayed``, say) is computed in the
    cluster first (``client.compute``) and travels as its future's key.

    Returns the new arguments and the lazy results and futures that must stay
    alive until the call has run.
    """
    if not (contains(args, _is_lazy) or contains(kwargs, _is_lazy)):
        return args, kwargs, []
    held: list[Any] = []

    def swap(x: Any) -> Any:
        if not isinstance(x, Future):
            if not _is_lazy(x) or not is_dask_collection(x):
                return KEEP
            x = _dask_client().compute(x)  # its value, computed (a persisted one: gathered) in the cluster
        if not isinstance(x, LazyResult):
            held.append(x)  # the consumer's worker fetches it from the cluster, peer to peer
            return DaskInput(x.key)
        have, value = x._local_value()
        if have:
            return value
        held.append(x)
        return x._source()

    return replace(args, swap), replace(kwargs, swap), held


def _is_source(x: Any) -> bool:
    return isinstance(x, (LazySource, DaskInput))


def _inspected_lazy(dispatcher: Dispatcher, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a placeholder sits where the dispatch strategy looks."""
    if dispatcher.inspects == "none":
        return False
    values = [*args, *kwargs.values()]
    if dispatcher.inspects == "all":
        return any(contains(v, _is_source) for v in values)
    if any(isinstance(v, (LazySource, DaskInput)) for v in values):
        return True
    if dispatcher.inspects == "dicts":
        stack, seen = [v for v in values if isinstance(v, dict)], set()
        while stack:  # dict values, recursively (iterative: deep and self-referential dicts too)
            d = stack.pop()
            if id(d) in seen:
                continue
            seen.add(id(d))
            for x in d.values():
                if isinstance(x, (LazySource, DaskInput)):
                    return True
                if isinstance(x, dict):
                    stack.append(x)
    return False


def invoke(
    caller: Caller,
    target: CallTarget,
    spec: MethodSpec,
    fn: Callable[..., Any] | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    lazy: bool,
    notify: Callable[[str], None] | None,
    closed: Callable[[], bool],
    remote_name: str | None = None,
) -> Any:
    """Run ``spec`` on ``target``'s ranks; return a LazyResult, or the value when not lazy.

    On an async driver's event loop (the caller's own loop) it always returns
    the LazyResult, without waiting: ``await`` it for the value.
    """
    if closed():
        raise ComponentClosedError(
            f"{target.label}.{spec.name}: the component was closed (or its session shut down); "
            f"build it again after initialize()"
        )
    site = caller_site()
    if fn is not None:
        check_arguments(fn, f"{target.label}.{spec.name}", args, kwargs)
    ranks, addresses = target.ranks, target.addresses
    if spec.execute == "first":
        ranks, addresses = ranks[:1], addresses[:1]
    n = len(ranks)
    args, kwargs, held = prepare_inputs(args, kwargs)
    has_sources = bool(held)
    remote_dispatch = None
    if spec.execute == "first" or n == 1 and spec.dispatcher.inspects == "none":
        pairs = [(args, kwargs)] * n
    elif has_sources and _inspected_lazy(spec.dispatcher, args, kwargs):
        pairs = [(args, kwargs)] * n
        remote_dispatch = pack((spec.dispatcher, n, target.mesh), f"dispatch {spec.dispatcher.name!r}")
    else:
        try:
            pairs = spec.dispatcher(n, args, kwargs, target.mesh)
        except RecursionError:
            raise SerializationError(
                f"the arguments of {target.label}.{spec.name} are nested too deep (or contain themselves) for "
                f"dispatch {spec.dispatcher.name!r} to split them; pass flatter data, or dispatch='all'"
            ) from None
    packed: dict[tuple[int, int], Any] = {}
    payloads = []
    what = f"the arguments of {target.label}.{spec.name}"
    packing.args = True  # a LazyResult pickled here was hidden in an object: say what to pass instead
    try:
        for pair in pairs:
            key = (id(pair[0]), id(pair[1]))  # 'all' gives every rank the same objects: pack once
            if key not in packed:
                packed[key] = pack(pair, what)
            payloads.append(packed[key])
    finally:
        packing.args = False

    keep = lazy
    inline = INLINE_SMALL if lazy else INLINE_ALL
    call_id = caller.next_call_id()
    info = CallInfo(
        cid=target.cid,
        label=target.label,
        group=target.group,
        method=spec.name,
        call_id=call_id,
        ranks=ranks,
        addresses=addresses,
        collect=spec.collect,
        collector=spec.collector,
        mesh=target.mesh,
        keep=keep,
        timeout=spec.timeout,
        site=site,
    )
    result = LazyResult._create(caller, info, held, notify)
    method = remote_name or spec.name
    msgs = []
    nested = caller.nested is not None and caller.nested()  # made by component code
    for slot, payload in enumerate(payloads):
        msgs.append(Call(target.cid, call_id, method, payload, keep, inline, has_sources,
                         remote_dispatch, slot if remote_dispatch is not None else 0, nested))

    def send() -> None:
        for slot, msg in enumerate(msgs):
            caller.request(addresses[slot], msg).add_done_callback(functools.partial(result._on_reply, slot))

    caller.post(send)
    logger.debug("%s.%s call %d sent to %d rank(s)", target.label, spec.name, call_id, n)
    if on_loop(caller.loop):
        return result  # an async driver, on the loop that delivers the replies: `await` gives the value
    if not lazy:
        return result.result()
    if spec.sync:
        result._wait(None)
        result._raise_if_failed()
    return result
