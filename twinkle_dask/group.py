"""Components in a device group's workers, and the handle the driver holds.

``Cls(..., remote_group='g')`` lands in :func:`create_component`: it places
one instance per chosen worker of group ``g`` (a free MASTER_PORT is taken on
rank 0's host first, so ``torch.distributed`` can rendezvous), builds them
there, and returns a handle. The handle is an instance of a subclass of
``Cls`` whose ``@remote_function`` methods forward to the ranks; other
methods raise :class:`~twinkle_dask.exceptions.NotRemoteMethodError`.
"""

from __future__ import annotations

import concurrent.futures
import html
import inspect
import logging
import time
import types
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from . import actors, progress, runtime
from ._aio import Pending, check_not_on_loop, offload, on_loop
from ._checks import check_timeout
from ._config import seconds
from ._wire.channel import connect_timeout, pack
from ._wire.errors import decode_error
from ._wire.protocol import Build, Close, FreePort, Reply
from .call import CallTarget, caller_site, invoke, prepare_inputs
from .exceptions import (
    BlockingCallError,
    CallTimeoutError,
    ComponentClosedError,
    ConfigurationError,
    NotRemoteMethodError,
    WorkerLostError,
)
from .identity import Identity, get_rank, get_world_size
from .mesh import DeviceMesh, is_mesh
from .specs import SPEC_ATTR, ClassSpec, MethodSpec, class_spec, method_spec, prepare_init_arguments

__all__ = [
    "ComponentHandle",
    "ComponentRef",
    "RemoteMethod",
    "close_component",
    "component_actors",
    "create_component",
    "restart_component",
]

logger = logging.getLogger(__name__)

_ITER_DEFAULT = MethodSpec("__iter__", dispatch="all", collect="none")
_LEN_SPEC = MethodSpec("__len__", dispatch="all", execute="first", collect="first", lazy_collect=False)


@dataclass(frozen=True, slots=True)
class ComponentRef:
    """A built component: its class, where its instances live, and its mesh."""

    cid: str
    cls: type
    group: str
    execute: str
    ranks: tuple[int, ...]
    addresses: tuple[str, ...]
    mesh: DeviceMesh | None
    session_id: str

    @property
    def label(self) -> str:
        return self.cls.__name__

    @property
    def target(self) -> CallTarget:
        return CallTarget(self.cid, self.label, self.group, self.ranks, self.addresses, self.mesh)


def peer_slice(target_size: int, rank: int, world_size: int) -> slice:
    """Twinkle's ``Platform.get_peer_index``: the ranks one of ``world_size`` creators takes."""
    rank = max(rank, 0)
    world_size = max(world_size, 1)
    if target_size < world_size:
        start = rank % target_size
        return slice(start, start + 1)
    k, m = divmod(target_size, world_size)
    return slice(rank * k + min(rank, m), (rank + 1) * k + min(rank + 1, m))


# --------------------------------------------------------------------------- creation
@dataclass(frozen=True, slots=True)
class BuildPlan:
    """Everything needed to build (and rebuild) a component's instances."""

    klass: type
    group: str
    execute: str
    indices: tuple[int, ...]
    mesh: DeviceMesh | None
    payload: Any
    has_lazy: bool
    max_restarts: int
    timeout: float | None = None

    @property
    def label(self) -> str:
        return self.klass.__name__


def _plan(session: Any, klass: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[BuildPlan, list[Any]]:
    kwargs = dict(kwargs)
    group = kwargs.pop("remote_group")
    kwargs.pop("instance_id", None)
    timeout = check_timeout(f"{klass.__name__}(..., remote_group={group!r})", kwargs.pop("timeout", None))
    cspec = class_spec(klass) or ClassSpec()
    place = session.placement(group)
    n_workers = len(place.addresses)
    if cspec.execute == "all":
        picked = list(range(n_workers))
    elif cspec.execute == "first":
        picked = [0]
    else:
        picked = list(range(n_workers))[peer_slice(n_workers, get_rank(), get_world_size())]
    args, kwargs, mesh = prepare_init_arguments(klass, args, kwargs, session.global_mesh)
    if cspec.execute == "first":
        if cspec.mesh_type is None:
            mesh = DeviceMesh.from_sizes(dp_size=1, device_type=place.device_type)
        else:  # the mesh class the constructor expects (a registered one, e.g. Twinkle's)
            mesh = cspec.mesh_type.from_sizes(dp_size=1)
        if cspec.mesh_param:
            args = tuple(a for a in args if not is_mesh(a))
            kwargs[cspec.mesh_param] = mesh
    n = len(picked)
    if mesh is not None and cspec.execute != "first":
        allowed = {n, n * place.gpus_per_worker}
        if mesh.world_size not in allowed:
            raise ConfigurationError(
                f"{klass.__name__}: the DeviceMesh has world size {mesh.world_size} but group "
                f"{group!r} gives it {n} rank(s); pass a mesh of {n} ranks, e.g. "
                f"DeviceMesh.from_sizes(dp_size={n})"
            )
    handle_class(klass)  # reject methods that clash with the handle before building anything
    args, kwargs, held = prepare_inputs(args, kwargs)
    payload = pack((klass, args, kwargs, session.session_info()), f"the constructor arguments of {klass.__name__}")
    plan = BuildPlan(klass, group, cspec.execute, tuple(picked), mesh, payload, bool(held), cspec.max_restarts,
                     timeout)
    return plan, held


def _build(session: Any, plan: BuildPlan, site: str | None) -> ComponentRef:
    """Build the plan's instances on the group's current workers.

    Fails as soon as one rank fails or its worker is lost (the lowest failed
    rank's error when several are known), or when ``plan.timeout`` passes;
    the other ranks are then torn down (:func:`_teardown`).
    """
    deadline = None if plan.timeout is None else time.monotonic() + plan.timeout
    live = getattr(session, "live_placement", None)
    if live is not None:  # the driver: workers started again since are found by name
        limit = None if deadline is None else max(0.0, deadline - time.monotonic())
        place = live(plan.group, limit)
    else:
        place = session.placement(plan.group)
    label, group, n = plan.label, plan.group, len(plan.indices)
    cid = f"{group}-{label}-{uuid.uuid4().hex[:10]}"
    addresses = tuple(place.addresses[i] for i in plan.indices)
    hosts = [place.hosts[i] for i in plan.indices]
    caller = session.caller
    # A request that runs no user code: Dask's connect timeout plus the liveness bound.
    answer = connect_timeout() + seconds("worker-unresponsive-timeout")
    wait = answer if deadline is None else max(0.0, min(answer, deadline - time.monotonic()))
    try:
        port_reply = caller.request_threadsafe(addresses[0], FreePort()).result(wait)
    except concurrent.futures.TimeoutError:
        raise WorkerLostError(addresses[0], group=group, rank=0, component=f"{label}.__init__",
                              reason=f"no answer within {wait:g} s") from None
    except WorkerLostError as exc:
        raise WorkerLostError(exc.address, group=group, rank=0, component=f"{label}.__init__",
                              reason=exc.reason) from None
    master_addr, master_port = hosts[0], port_reply.port
    # The scheduler learns of the ranks as actors on their workers while they are built.
    registered = actors.register(session, cid, label, addresses)
    futures = []
    for rank, address in enumerate(addresses):
        if place.is_gpu:
            local_rank, local_world = 0, 1
        else:
            local_rank = hosts[:rank].count(hosts[rank])
            local_world = hosts.count(hosts[rank])
        ident = Identity(rank, n, local_rank, local_world, master_addr, master_port, group, f"{group}-{label}-{rank}")
        # Built by component code (nested): runs before the target worker's queued calls.
        msg = Build(cid, plan.payload, ident, label, plan.has_lazy, caller.nested is not None and caller.nested())
        futures.append(caller.request_threadsafe(address, msg))
    errors = _first_failures(caller, futures, deadline, label, group, addresses, site)
    ref = ComponentRef(cid, plan.klass, group, plan.execute, tuple(range(n)), addresses, plan.mesh,
                       getattr(session, "session_id", ""))
    pending = [rank for rank, fut in enumerate(futures) if not fut.done()]
    if errors or pending:
        actors.release(cid)
        _teardown(session, ref, futures, errors)
        if errors:
            raise errors[min(errors)]
        assert plan.timeout is not None
        raise _add_note(CallTimeoutError(label, "__init__", plan.timeout, pending),
                        f"{label} was not built: every rank was closed again (ranks still in __init__ had "
                        f"their worker restarted); pass a larger timeout= to the constructor if "
                        f"__init__ needs longer")
    actors.settle(registered, answer if deadline is None else max(0.0, min(answer, deadline - time.monotonic())))
    logger.info("built %s on group %r ranks %s", label, group, list(plan.indices))
    return ref


def _add_note(exc: BaseException, note: str) -> BaseException:
    exc.add_note(note)
    return exc


def _rank_error(fut: concurrent.futures.Future[Reply], rank: int, label: str, group: str,
                address: str, site: str | None) -> BaseException | None:
    """The error of a finished construction request on ``rank``, or None if the rank was built."""
    try:
        reply = fut.result()
    except WorkerLostError as exc:
        return WorkerLostError(exc.address, group=group, rank=rank, component=f"{label}.__init__",
                               reason=exc.reason)
    except Exception as exc:
        return exc
    if reply.ok:
        return None
    return decode_error(reply.error, f"raised by {label}.__init__ on rank {rank} of group {group!r} ({address})",
                        f"called from {site}" if site else "")


_Reply = concurrent.futures.Future[Reply]


def _wait_first(caller: Any, pending: set[_Reply], timeout: float | None) -> tuple[set[_Reply], set[_Reply]]:
    """``concurrent.futures.wait(FIRST_COMPLETED)``; in component code, through the caller's ``block``.

    A component building a component waits on its worker's executor, which
    runs the calls nested meanwhile (a construction on its own worker among them).
    """
    if not caller.in_worker:
        return concurrent.futures.wait(pending, timeout, concurrent.futures.FIRST_COMPLETED)
    first: concurrent.futures.Future[None] = concurrent.futures.Future()

    def settle(_: Any) -> None:
        try:
            first.set_result(None)
        except concurrent.futures.InvalidStateError:  # another one settled it
            pass

    for fut in pending:
        fut.add_done_callback(settle)
    try:
        caller.block(first, timeout)
    except concurrent.futures.TimeoutError:
        pass
    done = {fut for fut in pending if fut.done()}
    return done, pending - done


def _first_failures(caller: Any, futures: list[concurrent.futures.Future[Reply]], deadline: float | None,
                    label: str, group: str, addresses: tuple[str, ...], site: str | None) -> dict[int, BaseException]:
    """Wait for every rank's construction; stop at the first failure or at ``deadline``.

    Returns the errors known by then, by rank (several can arrive together).
    """
    rank_of = {fut: rank for rank, fut in enumerate(futures)}
    pending = set(futures)
    errors: dict[int, BaseException] = {}
    while pending and not errors:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            break
        done, pending = _wait_first(caller, pending, remaining)
        for fut in done:
            rank = rank_of[fut]
            error = _rank_error(fut, rank, label, group, addresses[rank], site)
            if error is not None:
                errors[rank] = error
    return errors


def _teardown(session: Any, ref: ComponentRef, futures: list[concurrent.futures.Future[Reply]],
              errors: dict[int, BaseException]) -> None:
    """Drop a failed construction's instances; restart the workers of ranks still inside ``__init__``.

    A rank's thread stuck in user code (a ``torch.distributed`` rendezvous
    waiting for a rank that died) cannot be interrupted: when its worker says
    the construction is still running and it has not finished within
    ``twinkle-dask.teardown-grace``, or the worker does not confirm the close
    at all, its worker process is restarted (driver only).
    """
    caller = session.caller
    lost = {r for r, e in errors.items() if isinstance(e, WorkerLostError)}
    closes = {r: caller.request_threadsafe(a, Close(ref.cid))
              for r, a in enumerate(ref.addresses) if r not in lost}
    grace = seconds("teardown-grace")
    deadline = time.monotonic() + grace
    concurrent.futures.wait(list(closes.values()), grace)
    busy = []
    for rank, close in closes.items():
        if close.done() and isinstance(close.exception(), WorkerLostError):
            continue  # its worker is gone anyway
        confirmed = close.done() and close.exception() is None
        if confirmed and not close.result().running:
            continue  # nothing of it runs: a construction still queued there sees it closed and is skipped
        # Inside __init__ (or no answer at all): give it what is left of the grace to finish on its own.
        finished, _ = concurrent.futures.wait([futures[rank]], max(0.0, deadline - time.monotonic()))
        if confirmed and finished:
            continue
        busy.append(ref.addresses[rank])
    if not busy:
        return
    restart = getattr(session, "restart_workers", None)
    if restart is None:
        logger.warning("twinkle_dask: %s ranks on %s are still inside __init__ and cannot be stopped from "
                       "a worker; their workers stay busy until __init__ returns", ref.label, busy)
        return
    try:
        restart(busy)
    except Exception as exc:
        logger.warning("twinkle_dask: could not restart the workers %s still running %s.__init__: %s",
                       busy, ref.label, exc)
        for error in errors.values():
            error.add_note(f"the workers {busy} still running {ref.label}.__init__ could not be restarted: {exc}")


def create_component(session: Any, klass: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Build ``klass`` in a group's workers and return its handle.

    On an async driver's event loop the build waits in a thread and this
    returns an awaitable of the handle (``model = await Model(remote_group='g')``).
    """
    site = caller_site()
    plan, held = _plan(session, klass, args, kwargs)
    if on_loop(session.caller.loop):
        return Pending(f"{plan.label} being built on group {plan.group!r}",
                       offload(_finish_component, session, plan, held, site))
    return _finish_component(session, plan, held, site)


def _finish_component(session: Any, plan: BuildPlan, held: list[Any], site: str | None) -> Any:
    try:
        ref = _build(session, plan, site)
    except Exception as exc:
        if session.notify is not None:
            where = f" (called from {site})" if site else ""
            session.notify(f"{plan.label}.__init__ failed on group {plan.group!r}: "
                           f"{type(exc).__name__}: {exc}{where}")
        raise
    del held  # lazy constructor inputs were fetched: the producers may free them
    session.track(ref, plan)
    return make_handle(ref, plan.group)


def restart_component(handle: Any, timeout: float = 120.0) -> Any:
    """Rebuild a component's instances with their original constructor arguments.

    For use after a worker was lost: the group's workers are looked up again
    (a local cluster starts lost workers anew), every rank is rebuilt, and
    the handle points at the new instances. Results of earlier calls are
    gone; state the instances held must be restored by the caller (reload a
    checkpoint). Other components are not touched.

    Returns
    -------
    None, or an awaitable on an async driver's event loop
        There, ``await restart_component(handle)``.

    Raises
    ------
    ComponentClosedError
        If the component's session is gone.
    WorkerLostError, TimeoutError
        If the group's workers do not come back within ``timeout`` seconds.
    """
    ref = _state(handle)
    session = _session_for(ref, "restart")
    if on_loop(session.caller.loop):
        return Pending(f"{ref.label} being rebuilt", offload(_restart, handle, session, ref, timeout))
    _restart(handle, session, ref, timeout)
    return None


def _restart(handle: Any, session: Any, ref: ComponentRef, timeout: float) -> None:
    plan = session.plan_of(ref)
    stuck = _close_or_find_stuck(session, ref)
    actors.release(ref.cid)
    if stuck:
        # A call (or __init__) of the component is still running and cannot be stopped from outside
        # its process: restart those workers. Every component on them is lost with it.
        logger.warning("twinkle_dask: %s is still running on %s; restarting those workers", ref.label, stuck)
        session.restart_workers(stuck, timeout)
    session.live_placement(plan.group, timeout)
    new = _build(session, plan, caller_site())
    session.replace(ref, new)
    object.__setattr__(handle, "_twinkle_ref", new)


def _send_close(caller: Any, ref: ComponentRef, wait: float = 0.0) -> list[concurrent.futures.Future[Reply]]:
    # With ``wait``, a worker answers once nothing of the component runs, or after ``wait`` s.
    return [caller.request_threadsafe(a, Close(ref.cid, wait)) for a in ref.addresses]


def _close_or_find_stuck(session: Any, ref: ComponentRef) -> list[str]:
    """Close the component's ranks; return the live workers where a job of it is still running.

    Each worker is given ``twinkle-dask.teardown-grace`` for a running job to
    end; one that does not answer at all within the liveness bound counts as
    stuck too.
    """
    grace = seconds("teardown-grace")
    closes = _send_close(session.caller, ref, wait=grace)
    stuck = []
    for address, close in zip(ref.addresses, closes):
        try:
            reply = close.result(grace + seconds("worker-unresponsive-timeout") + 5.0)
        except WorkerLostError:
            continue  # gone already: nothing of it runs
        except concurrent.futures.TimeoutError:
            stuck.append(address)
            continue
        if reply.running:
            stuck.append(address)
    return stuck


def close_component(handle_or_ref: Any, timeout: float = 10.0) -> Any:
    """Destroy a component's instances on its workers; later calls raise ComponentClosedError.

    Returns None, or on an async driver's event loop an awaitable
    (``await close_component(handle)``).
    """
    ref = handle_or_ref if isinstance(handle_or_ref, ComponentRef) else _state(handle_or_ref)
    session = runtime.current()
    if session is None or session.mode != "dask":
        return None
    if on_loop(session.caller.loop):
        return Pending(f"{ref.label} closing", offload(_close, session, ref, timeout))
    _close(session, ref, timeout)
    return None


def _close(session: Any, ref: ComponentRef, timeout: float) -> None:
    futures = _send_close(session.caller, ref)
    actors.release(ref.cid)
    concurrent.futures.wait(futures, timeout=timeout)
    untrack = getattr(session, "untrack", None)
    if untrack is not None:
        untrack(ref)


def component_actors(handle: Any) -> list[Any]:
    """The Dask actor futures that stand for a component's ranks on their workers, in rank order.

    The scheduler knows every rank as an actor on its worker (so
    ``retire_workers`` and ``cluster.adapt()`` leave those workers alone);
    these are their futures: ``client.who_has(futures)`` says where the ranks
    are, and ``future.result().describe()`` asks the rank's actor about it.
    Empty for a component this process did not build, or one that was closed.

    Examples
    --------
    >>> [f.key for f in twinkle.component_actors(model)]  # doctest: +SKIP
    ['Model-model-Model-3f2a9c1b7d-0', 'Model-model-Model-3f2a9c1b7d-1']
    """
    return actors.actor_futures(_state(handle).cid)


# --------------------------------------------------------------------------- handle
def _state(handle: Any) -> ComponentRef:
    return object.__getattribute__(handle, "_twinkle_ref")


def _session_for(ref: ComponentRef, what: str) -> Any:
    session = runtime.current()
    if session is None or session.mode != "dask" or session.closed:
        raise ComponentClosedError(
            f"{ref.label}.{what}: the session that built this component was shut down; build the "
            f"component again after initialize()"
        )
    is_open = getattr(session, "is_open", None)
    if is_open is not None and not is_open(ref):
        raise ComponentClosedError(
            f"{ref.label}.{what}: the component was closed (or belongs to an earlier session); "
            f"build it again"
        )
    return session


def _lazy_for(handle: Any, spec: MethodSpec, session: Any) -> bool:
    if session.in_worker:
        return False
    inst = object.__getattribute__(handle, "__dict__")
    if "_lazy_collect" in inst:
        return bool(inst["_lazy_collect"])
    if spec.lazy_collect is not None:
        return spec.lazy_collect
    return bool(session.lazy_collect)


def _call(handle: Any, spec: MethodSpec, fn: Callable[..., Any] | None, args: tuple[Any, ...],
          kwargs: dict[str, Any], *, lazy: bool | None = None, remote_name: str | None = None) -> Any:
    ref = _state(handle)
    session = _session_for(ref, spec.name)
    if not session.in_worker and session.should_restart(ref):
        if on_loop(session.caller.loop):
            raise BlockingCallError(f"{ref.label}.{spec.name}(...) on a component whose worker was lost (it "
                                    f"rebuilds the component first)", "await handle.restart()")
        restart_component(handle)
        ref = _state(handle)
    if lazy is None:
        lazy = _lazy_for(handle, spec, session)
    return invoke(
        session.caller, ref.target, spec, fn, args, kwargs,
        lazy=lazy, notify=session.notify, closed=lambda: session.closed,
        remote_name=remote_name,
    )


class RemoteMethod:
    """A ``@remote_function`` method bound to a handle.

    Calling it runs the method on the component's ranks. ``.options(...)``
    returns a copy with per-call overrides (``dispatch``, ``execute``,
    ``collect``, ``sync``, ``lazy_collect``, ``timeout``).
    """

    __slots__ = ("_fn", "_handle", "_spec")

    def __init__(self, handle: Any, spec: MethodSpec, fn: Callable[..., Any]) -> None:
        self._handle = handle
        self._spec = spec
        self._fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _call(self._handle, self._spec, self._fn, args, kwargs)

    def options(self, **options: Any) -> RemoteMethod:
        """A copy of this method with some of its decorator options overridden for one call.

        Examples
        --------
        >>> model.forward.options(collect="first")(batch)  # doctest: +SKIP
        """
        return RemoteMethod(self._handle, self._spec.with_options(**options), self._fn)

    @property
    def __name__(self) -> str:
        return self._spec.name

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self._fn.__doc__

    def __repr__(self) -> str:
        s = self._spec
        return (f"<remote method {_state(self._handle).label}.{s.name} dispatch={s.dispatcher.name!r} "
                f"execute={s.execute!r} collect={s.collector.name!r}>")


class _RemoteMethodDescriptor:
    def __init__(self, spec: MethodSpec, fn: Callable[..., Any]) -> None:
        self.spec = spec
        self.fn = fn

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self.fn
        return RemoteMethod(obj, self.spec, self.fn)


class _LocalOnlyDescriptor:
    def __init__(self, cls_name: str, name: str, original: Any, is_method: bool) -> None:
        self.cls_name = cls_name
        self.name = name
        self.original = original
        self.is_method = is_method

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self.original
        raise NotRemoteMethodError(self.cls_name, self.name, is_method=self.is_method)


class ComponentHandle:
    """Base of every handle class: the driver's view of a component."""

    _twinkle_cls: type
    _twinkle_ref: ComponentRef

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Python calls __init__ after __new__ returned the handle; nothing to do.
        pass

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        cls = type(self)._twinkle_cls
        # A descriptor's AttributeError lands here too: tell methods from data.
        is_method = inspect.isfunction(inspect.getattr_static(cls, name, None))
        raise NotRemoteMethodError(cls.__name__, name, is_method=is_method)

    def __repr__(self) -> str:
        ref = _state(self)
        mesh = f" mesh={ref.mesh!r}" if ref.mesh is not None else ""
        return f"<{ref.label} handle group={ref.group!r} ranks={len(ref.ranks)}{mesh}>"

    def _repr_html_(self) -> str:
        ref = _state(self)
        methods = sorted(name for name, _ in _remote_methods(type(self)._twinkle_cls))
        rows = "".join(
            f"<tr><td>{r}</td><td>{html.escape(a)}</td></tr>" for r, a in zip(ref.ranks, ref.addresses)
        )
        return (
            f"<div><strong>{html.escape(ref.label)}</strong> on group <code>{html.escape(ref.group)}"
            f"</code> (execute={html.escape(ref.execute)!s}"
            + (f", {html.escape(repr(ref.mesh))}" if ref.mesh is not None else "")
            + f")<br>remote methods: {html.escape(', '.join(methods)) or '(none)'}"
            f"<table><tr><th>rank</th><th>worker</th></tr>{rows}</table></div>"
        )

    def __reduce__(self) -> Any:
        inst = object.__getattribute__(self, "__dict__")
        return (_rebuild_handle, (_state(self), inst.get("remote_group")))

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.__reduce__()

    def __bool__(self) -> bool:
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ComponentHandle) and _state(other).cid == _state(self).cid

    def __hash__(self) -> int:
        return hash(_state(self).cid)

    def __len__(self) -> int:
        cls = type(self)._twinkle_cls
        if not hasattr(cls, "__len__"):
            raise TypeError(f"object of type {cls.__name__!r} has no len()")
        session = _session_for(_state(self), "__len__")
        check_not_on_loop(session.caller.loop, f"len({cls.__name__} handle)", "await asyncio.to_thread(len, handle)")
        return int(_call(self, _LEN_SPEC, None, (), {}, lazy=False))

    def __iter__(self) -> Iterator[Any]:
        cls = type(self)._twinkle_cls
        if not hasattr(cls, "__iter__"):
            raise TypeError(f"{cls.__name__!r} object is not iterable")
        spec = method_spec(cls.__iter__) or _ITER_DEFAULT
        return _HandleIterator(self, spec)

    def __aiter__(self) -> AsyncIterator[Any]:
        """``async for batch in handle``: iteration that awaits each step (for async drivers)."""
        cls = type(self)._twinkle_cls
        if not hasattr(cls, "__iter__"):
            raise TypeError(f"{cls.__name__!r} object is not iterable")
        spec = method_spec(cls.__iter__) or _ITER_DEFAULT
        return _async_batches(self, spec)

    def restart(self, timeout: float = 120.0) -> Any:
        """Rebuild the instances with their original constructor arguments (see :func:`restart_component`).

        On an async driver's event loop: ``await handle.restart()``.
        """
        return restart_component(self, timeout)

    def __dir__(self) -> list[str]:
        names = {name for name, _ in _remote_methods(type(self)._twinkle_cls)}
        return sorted(names | {"remote_group", "device_mesh", "restart"})


class _HandleIterator:
    """Driver-side iteration: ``__next__`` on the target ranks until one is exhausted."""

    def __init__(self, handle: Any, spec: MethodSpec) -> None:
        session = _session_for(_state(handle), "__iter__")
        name = type(handle)._twinkle_cls.__name__
        check_not_on_loop(session.caller.loop, f"iterating a {name} handle",
                          "await asyncio.to_thread(list, handle)")
        self._handle = handle
        self._spec = spec
        start = MethodSpec("__iter__", dispatch="all", execute=spec.execute, collect="none",
                           timeout=spec.timeout)
        _call(handle, start, None, (), {}, lazy=False)
        self._next = MethodSpec("__next__", dispatch="all", execute=spec.execute, collect=spec.collect,
                                lazy_collect=spec.lazy_collect, timeout=spec.timeout)
        self._done = False
        self._bar = None
        if progress.enabled():
            # No total: __len__ would be one more remote call, and a loader's length may be
            # unknown or raise; the bar counts batches as they come.
            self._bar = progress.bar(None, f"{type(handle)._twinkle_cls.__name__} batches")

    def __iter__(self) -> _HandleIterator:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        session = _session_for(_state(self._handle), "__next__")
        lazy = _lazy_for(self._handle, self._next, session)
        result = _call(self._handle, self._next, None, (), {}, lazy=True, remote_name="__twinkle_next__")
        result._wait(None)
        result._raise_if_failed()
        if result._stopped():
            self._done = True
            result._release()
            if self._bar is not None:
                self._bar.close()
            raise StopIteration
        if self._bar is not None:
            self._bar.update(1)
        return result if lazy else result.result()


async def _async_batches(handle: Any, spec: MethodSpec) -> AsyncIterator[Any]:
    """What :class:`_HandleIterator` yields, each step awaited instead of waited for."""
    start = MethodSpec("__iter__", dispatch="all", execute=spec.execute, collect="none", timeout=spec.timeout)
    await _call(handle, start, None, (), {}, lazy=True)
    step = MethodSpec("__next__", dispatch="all", execute=spec.execute, collect=spec.collect,
                      lazy_collect=spec.lazy_collect, timeout=spec.timeout)
    while True:
        lazy = _lazy_for(handle, step, _session_for(_state(handle), "__next__"))
        result = _call(handle, step, None, (), {}, lazy=True, remote_name="__twinkle_next__")
        await result._settled()
        result._raise_if_failed()
        if result._stopped():
            result._release()
            return
        yield result if lazy else await result


def _rebuild_handle(ref: ComponentRef, remote_group: str | None) -> Any:
    return make_handle(ref, remote_group)


# --------------------------------------------------------------------------- handle classes
_OWN = frozenset(
    {"__init__", "__new__", "__getattr__", "__getattribute__", "__setattr__", "__delattr__",
     "__repr__", "__str__", "_repr_html_", "__reduce__", "__reduce_ex__", "__getstate__", "__setstate__",
     "__copy__", "__deepcopy__", "__bool__", "__eq__", "__ne__", "__hash__", "__len__", "__iter__", "__aiter__",
     "__next__", "__dir__", "__del__", "__init_subclass__", "__class_getitem__", "__subclasshook__",
     "__dict__", "__weakref__", "__module__", "__doc__", "__qualname__", "__slots__", "__annotations__",
     "__abstractmethods__", "_abc_impl", "__class__", "__format__", "__sizeof__", "__firstlineno__",
     "__static_attributes__", "restart", SPEC_ATTR}
)


def _user_attributes(cls: type) -> Iterator[tuple[str, Any]]:
    seen: set[str] = set()
    for base in cls.__mro__:
        if base is object:
            continue
        for name, attr in vars(base).items():
            if name not in seen:
                seen.add(name)
                yield name, attr


def _remote_methods(cls: type) -> Iterator[tuple[str, MethodSpec]]:
    for name, attr in _user_attributes(cls):
        spec = method_spec(attr) if inspect.isfunction(attr) else None
        if spec is not None and name not in _OWN:
            yield name, spec


_RESERVED = ("remote_group", "device_mesh")
_handle_classes: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()


def handle_class(cls: type) -> type:
    """The handle class for ``cls``: a subclass whose remote methods forward to the ranks."""
    cached = _handle_classes.get(cls)
    if cached is not None:
        return cached
    namespace: dict[str, Any] = {"_twinkle_cls": cls, "__doc__": cls.__doc__, "__module__": cls.__module__}
    for name, attr in _user_attributes(cls):
        if name in _OWN:
            continue
        spec = method_spec(attr) if inspect.isfunction(attr) else None
        if spec is not None:
            if name in _RESERVED:
                raise ConfigurationError(
                    f"{cls.__name__}.{name} is a @remote_function but {name!r} is an attribute of "
                    f"every handle; rename the method"
                )
            namespace[name] = _RemoteMethodDescriptor(spec, attr)
        elif inspect.isfunction(attr) or isinstance(attr, (property, types.MemberDescriptorType)):
            namespace[name] = _LocalOnlyDescriptor(cls.__name__, name, attr, inspect.isfunction(attr))
    try:
        made = types.new_class(cls.__name__, (ComponentHandle, cls), exec_body=lambda ns: ns.update(namespace))
        object.__new__(made)
    except Exception:
        made = types.new_class(cls.__name__, (ComponentHandle,), exec_body=lambda ns: ns.update(namespace))
    made.__qualname__ = cls.__qualname__
    _handle_classes[cls] = made
    return made


def make_handle(ref: ComponentRef, remote_group: str | None) -> Any:
    handle: Any = object.__new__(handle_class(ref.cls))
    object.__setattr__(handle, "_twinkle_ref", ref)
    object.__setattr__(handle, "remote_group", remote_group)
    object.__setattr__(handle, "device_mesh", ref.mesh)
    return handle
