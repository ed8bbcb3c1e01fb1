"""``initialize`` and ``shutdown``: the lifetime of a twinkle_dask session."""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import functools
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import dask
import numpy as np
import psutil

from . import actors, runtime
from . import identity as _identity
from ._aio import Pending, offload, on_loop, running_loop
from ._checks import check_bool, check_count, check_int, check_str, check_timeout
from ._config import seconds
from ._deploy.cluster import (
    IN_PROCESS_ENV,
    ClusterConnection,
    _tag_worker,
    check_cluster_options,
    connect_cluster,
    resolve_memory_limit,
    resource_name,
    start_local_cluster,
    stop_local_cluster,
    use_async_client,
)
from ._seed import seed_everything
from ._wire.caller import Caller
from ._wire.protocol import Close, Notice, Output
from ._wire.serde import cuda_usable, moves_device_memory, register_serializers, set_device_frames
from .exceptions import BlockingCallError, ConfigurationError, WorkerLostError, WorkerRestartError
from .group import BuildPlan, ComponentRef, create_component
from .mesh import DeviceGroup, DeviceMesh, is_mesh, resolve_groups
from .reporting import MetricsLog, show_output
from .runtime import GroupPlacement, LocalSession

if TYPE_CHECKING:
    from tornado.platform.asyncio import AsyncIOLoop

__all__ = ["DaskSession", "initialize", "shutdown"]

logger = logging.getLogger(__name__)

MODES = ("local", "dask")


@dataclasses.dataclass(slots=True)
class _Tracked:
    """A live component of the session: how to rebuild it, and how often it was."""

    ref: ComponentRef
    plan: BuildPlan
    restarts: int = 0


class DaskSession:
    """The driver's session in ``mode='dask'``."""

    mode = "dask"
    in_worker = False

    def __init__(
        self,
        *,
        connection: ClusterConnection,
        groups: list[DeviceGroup],
        seed: int,
        full_determinism: bool,
        global_mesh: DeviceMesh | None,
        lazy_collect: bool,
        name: str | None,
        notifier: Callable[[str], Any] | None,
        config: tuple[Any, ...],
    ) -> None:
        self.session_id = uuid.uuid4().hex
        # Workers of an in-process cluster (processes=False) run component
        # threads in this process and export their identity and environment to os.environ.
        self._driver_env = {**_identity.snapshot_env(), **{k: os.environ.get(k) for k in IN_PROCESS_ENV}}
        self.connection = connection
        self.client = connection.client
        self.groups = groups
        self.seed = seed
        self.full_determinism = full_determinism
        self.global_mesh = global_mesh
        self.lazy_collect = lazy_collect
        self.name = name
        self.config = config
        self.closed = False
        self._components: dict[str, _Tracked] = {}  # by component id
        self.metrics_log = MetricsLog()
        io_loop = cast("AsyncIOLoop", self.client.loop)  # a running client always has its asyncio-backed loop
        self._caller = Caller(io_loop.asyncio_loop, self.client.connection_args, in_worker=False,
                              on_notice=self._on_notice)
        self._notifier = notifier
        self._notify_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.notify = self._notify if notifier is not None else None
        # What the scheduler says about workers joining and leaving (its "all" event topic).
        self._joins: dict[str, int] = {}  # add-worker events seen, by address
        self._cluster_changed = threading.Condition()
        self._previous_handler = getattr(self.client, "_event_handlers", {}).get("all")
        self.client.subscribe_topic("all", self._on_cluster_event)

    # ------------------------------------------------------------------ Session protocol
    @property
    def caller(self) -> Caller:
        return self._caller

    @property
    def placements(self) -> dict[str, GroupPlacement]:
        return self.connection.placements

    def placement(self, group: str) -> GroupPlacement:
        try:
            return self.connection.placements[group]
        except KeyError:
            raise ConfigurationError(
                f"unknown remote_group {group!r}; known groups are {sorted(self.connection.placements)}"
            ) from None

    def builds_remotely(self, group: str) -> bool:
        self.placement(group)
        return True

    def build(self, klass: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return create_component(self, klass, args, kwargs)

    def session_info(self) -> dict[str, Any]:
        return {
            "groups": dict(self.connection.placements),
            "seed": self.seed,
            "full_determinism": self.full_determinism,
            "global_mesh": self.global_mesh,
            "session_id": self.session_id,
        }

    def track(self, ref: ComponentRef, plan: BuildPlan) -> None:
        self._components[ref.cid] = _Tracked(ref, plan)
        for group in self.groups:
            if group.name == ref.group and ref.mesh is not None:
                group._device_mesh[ref.label] = ref.mesh

    def untrack(self, ref: ComponentRef) -> None:
        self._components.pop(ref.cid, None)

    def is_open(self, ref: ComponentRef) -> bool:
        return not self.closed and ref.cid in self._components

    # ------------------------------------------------------------------ recovery
    def plan_of(self, ref: ComponentRef) -> BuildPlan:
        return self._components[ref.cid].plan

    def replace(self, old: ComponentRef, new: ComponentRef) -> None:
        """The component ``old`` was rebuilt as ``new``."""
        record = self._components.pop(old.cid)
        record.ref = new
        record.restarts += 1
        self._components[new.cid] = record

    def should_restart(self, ref: ComponentRef) -> bool:
        """Whether a component lost a worker and may still be rebuilt automatically."""
        record = self._components.get(ref.cid)
        if record is None or record.restarts >= record.plan.max_restarts:
            return False
        return any(self._caller.is_lost(a) for a in ref.addresses)

    # ------------------------------------------------------------------ workers joining and leaving
    def _on_cluster_event(self, event: tuple[float, Any]) -> Any:
        """Scheduler event (client loop): a worker was removed or (re)joined."""
        msg = event[1]
        if isinstance(msg, dict):
            action, address = msg.get("action"), msg.get("worker")
            if action == "remove-worker" and isinstance(address, str):
                # Calls waiting on it fail now, not when some socket timeout expires.
                self._caller.lose(address, "the scheduler removed the worker")
                self._changed()
            elif action == "add-worker" and isinstance(address, str):
                self._joins[address] = self._joins.get(address, 0) + 1
                self._caller.joined(address)  # a new worker at an old address: connect anew
                self._changed()
        if self._previous_handler is not None:  # the user's own handler of this topic
            return self._previous_handler(event)
        return None

    def _changed(self) -> None:
        with self._cluster_changed:
            self._cluster_changed.notify_all()

    def _workers_now(self) -> dict[str, Any]:
        """The scheduler's current workers, asked now (not the client's periodic copy)."""
        scheduler: Any = self.client.scheduler  # set while the client is running
        info = self.client.sync(scheduler.identity, n_workers=-1, callback_timeout=30)
        return cast("dict[str, Any]", info["workers"])

    def _wait_for_change(self, deadline: float) -> None:
        with self._cluster_changed:
            self._cluster_changed.wait(max(0.0, min(0.5, deadline - time.monotonic())))

    def live_placement(self, group: str, timeout: float | None = None) -> GroupPlacement:
        """``group``'s placement with its workers' current addresses.

        Workers are found by name, so a worker that was started again (the
        local cluster's zygote, a nanny) is used at its new address. A worker
        that is gone or known lost is waited for, at most ``timeout`` seconds
        (default: dask config ``twinkle-dask.worker-restart-timeout``).

        Raises
        ------
        WorkerLostError
            If some worker of the group is not back in time.
        """
        old = self.placement(group)
        if not old.names:
            return old
        timeout = seconds("worker-restart-timeout") if timeout is None else timeout
        deadline = time.monotonic() + timeout
        killed: set[str] = set()
        while True:
            info = self._workers_now()
            by_name = {str(w.get("name")): a for a, w in info.items()}
            addresses = [by_name.get(name) for name in old.names]
            unusable = [i for i, a in enumerate(addresses) if a is None or self._caller.is_lost(a)]
            if not unusable:
                break
            for i in unusable:
                a = addresses[i]
                reason = getattr(self._caller.lost_reason(a), "reason", "") if a is not None else ""
                if a is not None and a not in killed and reason.startswith("did not answer"):
                    # Hung or cut off, yet still registered: start it again under its name, as a nanny
                    # does (the local cluster's launcher; an existing cluster's own nanny).
                    killed.add(a)
                    try:
                        if self.connection.cluster is not None:
                            self._kill_local_worker(a)
                        else:
                            self._restart_by_nanny(a, max(0.0, deadline - time.monotonic()))
                    except WorkerRestartError as exc:
                        logger.warning("twinkle_dask: %s", exc)
            if time.monotonic() >= deadline:
                i = unusable[0]
                a = addresses[i]
                state = ("is not connected to the scheduler" if a is None
                         else f"at {a} was lost ({getattr(self._caller.lost_reason(a), 'reason', '')})")
                raise WorkerLostError(
                    a or old.addresses[i], group=group, rank=i, component=f"worker {old.names[i]!r}",
                    reason=f"it {state} and did not come back within {timeout:g} s",
                )
            self._wait_for_change(deadline)
        new = tuple(a for a in addresses if a is not None)
        if new != old.addresses:
            if self.connection.cluster is None:
                # A worker of an existing cluster that came back lost the group tag we gave it at runtime.
                tag = resource_name(group)
                untagged = [a for a in new if tag not in (info[a].get("resources") or {})]
                if untagged:
                    self.client.run(_tag_worker, resources={tag: 1}, workers=untagged)
            hosts = tuple(info[a]["host"] for a in new)
            self.connection.placements[group] = dataclasses.replace(old, addresses=new, hosts=hosts)
            logger.info("twinkle_dask: group %r now uses workers %s", group, list(new))
        return self.connection.placements[group]

    def _restart_by_nanny(self, address: str, timeout: float) -> None:
        """Ask an existing cluster's nanny to restart the worker at ``address`` (same name, new address)."""
        try:
            self.client.restart_workers([address], timeout=timeout, raise_for_error=True)
        except ValueError as exc:  # Dask: "Restarting workers requires a nanny to be used"
            raise WorkerRestartError([address], f"{exc}; start the cluster's workers with a nanny (`dask worker`, "
                                     f"without --no-nanny) or restart it by hand") from None
        except (TimeoutError, OSError) as exc:
            raise WorkerRestartError([address], f"Dask's nanny did not restart it: {exc}") from None

    def restart_workers(self, addresses: Sequence[str], timeout: float | None = None) -> None:
        """Restart the worker processes at ``addresses`` and wait until their replacements joined.

        A rank stuck in user code (a rendezvous that never completes) cannot
        be interrupted from outside its process: restarting the process is the
        only way to free its worker. Every component on those workers is lost.
        On the local cluster the process is killed and started again under
        the same name and tags; on an existing cluster Dask's nanny restarts
        it (``Client.restart_workers``).

        Parameters
        ----------
        addresses : sequence of str
            Worker addresses.
        timeout : float, optional
            Seconds to wait for the replacements to join (default: dask config
            ``twinkle-dask.worker-restart-timeout``).

        Raises
        ------
        WorkerRestartError
            If a worker cannot be restarted (an existing cluster's worker
            without a nanny) or its replacement did not join in time.
        """
        timeout = seconds("worker-restart-timeout") if timeout is None else timeout
        deadline = time.monotonic() + timeout
        info = self._workers_now()
        names = {a: str(info[a]["name"]) for a in addresses if a in info}
        joins = {a: self._joins.get(a, 0) for a in addresses}
        if self.connection.cluster is not None:
            for address in names:
                self._kill_local_worker(address)
        elif names:
            try:
                self.client.restart_workers(list(names), timeout=timeout, raise_for_error=True)
            except ValueError as exc:  # Dask: "Restarting workers requires a nanny to be used"
                raise WorkerRestartError(list(names), f"{exc}; start the cluster's workers with a nanny "
                                         f"(`dask worker`, without --no-nanny) or restart them by hand") from None
            except TimeoutError as exc:
                raise WorkerRestartError(list(names), f"Dask's nanny did not restart them: {exc}") from None
        for address in addresses:
            self._caller.post(functools.partial(self._caller.lose, address, "the worker was restarted"))
        while True:
            info = self._workers_now()
            by_name = {str(w.get("name")): a for a, w in info.items()}
            back = {a: by_name.get(n) for a, n in names.items()}
            waiting = [a for a, now in back.items() if now is None or (now == a and self._joins.get(a, 0) <= joins[a])]
            if not waiting:
                break
            if time.monotonic() >= deadline:
                raise WorkerRestartError(waiting, f"their replacement did not join within {timeout:g} s")
            self._wait_for_change(deadline)
        for group, place in list(self.connection.placements.items()):
            if any(a in names for a in place.addresses):
                self.live_placement(group, max(0.0, deadline - time.monotonic()))

    def _kill_local_worker(self, address: str) -> None:
        """SIGKILL the process of this local cluster that serves ``address``; its launcher starts it again."""
        port = int(address.rsplit(":", 1)[1])
        for proc in psutil.Process().children(recursive=True):
            try:
                listening = any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr[1] == port
                                for c in proc.net_connections(kind="tcp"))
            except psutil.Error:
                continue
            if listening:
                logger.warning("twinkle_dask: restarting worker %s (pid %d)", address, proc.pid)
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return
        raise WorkerRestartError([address], "no process of this local cluster serves that address")

    # ------------------------------------------------------------------ what components say
    def _on_notice(self, notice: Notice) -> None:
        if isinstance(notice, Output):
            show_output(notice.who, notice.stream, notice.text)
        else:
            self.metrics_log.add({"component": notice.component, "rank": notice.rank, "time": notice.time,
                                  **notice.values})

    # ------------------------------------------------------------------ notifications
    def _notify(self, message: str) -> None:
        if self._notify_pool is None:
            self._notify_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="twinkle-notify")
        self._notify_pool.submit(self._deliver, message)

    def _deliver(self, message: str) -> None:
        prefix = f"[{self.name}] " if self.name else ""
        try:
            assert self._notifier is not None
            self._notifier(prefix + message)
        except Exception:
            logger.warning("twinkle_dask: the notifier raised", exc_info=True)

    # ------------------------------------------------------------------ shutdown
    def close(self, timeout: float = 20.0) -> None:
        if self.closed:
            return
        self.closed = True
        if not self._caller.loop.is_running():
            # An async driver's loop ended before `await twinkle_dask.shutdown()` (this runs at exit):
            # its channels and client went with it. What is left: the local cluster, if we started one.
            logger.warning("twinkle_dask: the event loop of this async driver stopped before the session was "
                           "shut down; its components were not closed. Await twinkle_dask.shutdown() before the "
                           "loop ends")
            self._components.clear()
            if self._notify_pool is not None:
                self._notify_pool.shutdown(wait=False)
            self._stop_cluster(timeout)
            return
        futures = [
            self._caller.request_threadsafe(addr, Close(record.ref.cid))
            for record in self._components.values()
            for addr in record.ref.addresses
        ]
        concurrent.futures.wait(futures, timeout=min(timeout, 10.0))
        self._components.clear()
        actors.release_all()
        try:
            if self._previous_handler is not None:
                self.client.subscribe_topic("all", self._previous_handler)
            else:
                self.client.unsubscribe_topic("all")
        except Exception:
            logger.debug("twinkle_dask: unsubscribing from cluster events failed", exc_info=True)
        try:
            self.client.sync(self._caller.aclose, callback_timeout=5)
        except Exception:
            logger.debug("twinkle_dask: closing channels timed out", exc_info=True)
        if self._notify_pool is not None:
            self._notify_pool.shutdown(wait=False)
        conn = self.connection
        if conn.owns_client:
            try:
                conn.client.close(timeout=5)
            except Exception:
                logger.debug("twinkle_dask: closing the client failed", exc_info=True)
        self._stop_cluster(timeout)

    def _stop_cluster(self, timeout: float) -> None:
        """Stop the local cluster if initialize started one; restore the driver's environment."""
        conn = self.connection
        if conn.cluster is not None:
            try:
                stop_local_cluster(conn.cluster, timeout, conn.zygote)
            except Exception:
                logger.warning("twinkle_dask: closing the local cluster failed", exc_info=True)
        if conn.tls_dir is not None:
            conn.tls_dir.cleanup()
        _identity.restore_env(self._driver_env)
        set_device_frames(False)


def _check_groups(groups: Any) -> list[DeviceGroup]:
    if groups is None:
        raise ConfigurationError(
            "initialize('dask') needs groups=[DeviceGroup(name=..., ranks=..., device_type=...)]"
        )
    if isinstance(groups, DeviceGroup):
        groups = [groups]
    groups = list(groups)
    if not groups:
        raise ConfigurationError("initialize('dask') needs at least one DeviceGroup")
    return groups


def initialize(
    mode: str = "local",
    *,
    groups: Sequence[DeviceGroup] | None = None,
    global_device_mesh: DeviceMesh | None = None,
    lazy_collect: bool = True,
    seed: int = 42,
    full_determinism: bool = False,
    name: str | None = None,
    notifier: Callable[[str], Any] | None = None,
    address: str | None = None,
    client: Any = None,
    nproc_per_node: int | None = None,
    ncpu_proc_per_node: int | None = None,
    dashboard_address: str | None = "127.0.0.1:8787",
    security: Any = None,
    simulate_gpus: bool | None = None,
    memory_limit: Any = "auto",
    processes: bool = True,
    asynchronous: bool | None = None,
) -> Any:
    """Start twinkle_dask, in-process (``'local'``) or on a Dask cluster (``'dask'``).

    Parameters
    ----------
    mode : {'local', 'dask'}, default 'local'
        ``'local'``: decorated classes are plain objects, methods plain calls.
        ``'dask'``: components are built in the groups' workers.
    groups : list of DeviceGroup
        Required for ``'dask'``. Without ``address``/``client`` a local cluster
        is started with one worker process per group rank.
    global_device_mesh : DeviceMesh, optional
        The mesh given to components whose ``__init__`` takes a ``DeviceMesh``
        and got none.
    lazy_collect : bool, default True
        Whether remote calls return lazy results by default.
    seed : int, default 42
        Seeds the driver now and every component rank before ``__init__``.
    full_determinism : bool, default False
        Also ask torch for deterministic kernels.
    name : str, optional
        A name for this run, prefixed to notifier messages.
    notifier : callable, optional
        Called with one message per failed call.
    address : str, optional
        The scheduler of an existing cluster to use.
    client : distributed.Client, optional
        An existing client to use (not closed at shutdown).
    nproc_per_node : int, optional
        GPUs per host of an existing cluster, to map GPU group ranks to hosts
        (default: the most GPU workers seen on one host).
    ncpu_proc_per_node : int, optional
        Accepted for Twinkle compatibility; the groups decide the workers.
    dashboard_address : str or None, default '127.0.0.1:8787'
        Where the local cluster serves the Dask dashboard (None: no dashboard).
    security : distributed.Security or True, optional
        TLS settings. With ``address``: for connecting to a secured
        scheduler. For the local cluster: its scheduler, workers and every
        twinkle channel speak TLS with these certificates (``True`` or
        ``Security.temporary()``: a temporary self-signed set, kept in a
        private folder removed at shutdown).
    simulate_gpus : bool, optional
        Run GPU groups of the local cluster as CPU workers that get exactly
        the CUDA_VISIBLE_DEVICES, tags and identity a GPU worker would get
        (for testing placement on a machine without GPUs). Without it, a GPU
        group on a machine without enough GPUs is an error. Default: the
        ``twinkle-dask.simulate-gpus`` setting of ``dask.config`` (false
        unless set, e.g. ``DASK_TWINKLE_DASK__SIMULATE_GPUS=true``).
    memory_limit : int, str, float or None, default 'auto'
        Memory each worker of the local cluster may use, as Dask's
        ``memory_limit``: ``'auto'`` (the machine's memory shared by its
        cores), bytes (``4294967296`` or ``'4GiB'``), a fraction of the
        machine's memory (``0.5``), or ``None``/``0`` for no limit. Dask's
        memory manager spills and pauses the worker near it. Ignored for
        existing clusters (their workers have their own).
    processes : bool, default True
        Whether the local cluster's workers run in processes of their own.
        ``False``: in this process, over ``inproc://`` comms, as
        ``LocalCluster(processes=False)`` (fast to start, for tests); their
        component code runs one job at a time, each with its own worker's
        environment and identity in ``os.environ`` (GPU groups need
        ``simulate_gpus=True``); no memory limit.
    asynchronous : bool, optional
        Start an async driver: ``initialize`` returns an awaitable of the
        client, and afterwards builds and calls return awaitables on the
        running event loop (see the README's "Async drivers"). Default: True
        when ``client`` is an asynchronous client used on its own loop
        (``await Client(asynchronous=True)``). ``True`` without ``client``
        must be called inside a running loop; the session then talks to the
        cluster through an asynchronous client of its own on that loop.

    Returns
    -------
    distributed.Client or None
        The client in ``'dask'`` mode (its notebook repr links the dashboard);
        for an async driver an awaitable of it.

    Raises
    ------
    ConfigurationError
        For an unknown mode, missing or invalid groups, an option out of
        range, or a second ``initialize`` with other settings before
        ``shutdown()``. Every option is checked before anything starts.
    ConfigurationTypeError
        For an option of the wrong type (also a ``TypeError``).
    ClusterUnreachableError
        If no scheduler answers at ``address`` within Dask's connect timeout
        (``distributed.comm.timeouts.connect``).
    BlockingCallError
        For ``asynchronous=False`` on the loop of an asynchronous client.

    Examples
    --------
    >>> import twinkle_dask as twinkle
    >>> from twinkle_dask import DeviceGroup
    >>> twinkle.initialize('dask', groups=[DeviceGroup(name='default', ranks=4, device_type='cpu')])  # doctest: +SKIP
    <Client: 'tcp://127.0.0.1:...' processes=4 threads=4>

    In a coroutine, with an asynchronous client:

    >>> client = await Client(cluster, asynchronous=True)  # doctest: +SKIP
    >>> await twinkle.initialize('dask', client=client, groups=[...])  # doctest: +SKIP
    """
    # Every option is checked before anything starts (a process, a connection, the seeding).
    if mode not in MODES:
        hint = " (twinkle_dask runs Twinkle's 'ray' mode on Dask: use mode='dask')" if mode == "ray" else ""
        raise ConfigurationError(f"unknown mode {mode!r}; valid modes are {list(MODES)}{hint}")
    if global_device_mesh is not None and not is_mesh(global_device_mesh):
        raise ConfigurationError(f"global_device_mesh must be a DeviceMesh, got {global_device_mesh!r}")
    if notifier is not None and not callable(notifier):
        raise ConfigurationError(f"notifier must be a callable taking a string, got {notifier!r}")
    where = "initialize"
    check_bool(where, "lazy_collect", lazy_collect)
    seed = check_int(where, "seed", seed)
    check_bool(where, "full_determinism", full_determinism)
    check_str(where, "name", name)
    if simulate_gpus is None:
        simulate_gpus = dask.config.get("twinkle-dask.simulate-gpus", False)
        check_bool("dask.config twinkle-dask", "simulate-gpus", simulate_gpus)
    check_bool(where, "simulate_gpus", simulate_gpus)
    check_bool(where, "processes", processes)
    nproc_per_node = check_count(where, "nproc_per_node", nproc_per_node)
    check_count(where, "ncpu_proc_per_node", ncpu_proc_per_node, minimum=0)
    if asynchronous is not None:
        check_bool(where, "asynchronous", asynchronous)
    if mode == "dask":
        check_cluster_options(address=address, client=client, security=security,
                              dashboard_address=dashboard_address)
        memory_bytes = resolve_memory_limit(memory_limit)
        if not processes and (address is not None or client is not None):
            raise ConfigurationError(
                f"initialize: processes=False starts a local cluster in this process, so it does not go with "
                f"address={address!r} or client={client!r}; drop processes=False to use that cluster, or drop "
                f"address/client to start an in-process one"
            )
        asynchronous = _check_asynchronous(asynchronous, client)
    current = runtime.process_session()
    if mode == "local":
        if isinstance(current, DaskSession) and not current.closed:
            raise ConfigurationError(
                "twinkle_dask is already initialized in 'dask' mode; call twinkle_dask.shutdown() "
                "before initialize('local')"
            )
        local_groups = list(groups) if groups is not None else []
        seed_everything(seed, full_determinism)
        if global_device_mesh is None:
            # As Twinkle's local mode: a dp mesh over this process's WORLD_SIZE (torchrun).
            world = int(os.environ.get("WORLD_SIZE") or 1)
            global_device_mesh = DeviceMesh(mesh=np.arange(world), mesh_dim_names=("dp",))
        runtime.set_process_session(LocalSession(
            seed=seed, full_determinism=full_determinism, global_mesh=global_device_mesh,
            lazy_collect=lazy_collect, groups=local_groups,
        ))
        return None

    device_groups = _check_groups(groups)
    resolved = resolve_groups(device_groups)
    config = (tuple((g.name, g.num_ranks, g.device_type.lower(), g.gpus_per_worker) for g in device_groups),
              address, id(client), simulate_gpus, memory_bytes, processes)
    if isinstance(current, DaskSession) and not current.closed:
        if current.config == config:
            current.seed, current.lazy_collect = seed, lazy_collect
            current.global_mesh, current.full_determinism = global_device_mesh, full_determinism
            return current.client
        raise ConfigurationError(
            f"twinkle_dask is already initialized with groups {[g.name for g in current.groups]}; call "
            f"twinkle_dask.shutdown() first to start again with other groups"
        )
    seed_everything(seed, full_determinism)
    register_serializers()  # tensors between this driver and the workers, on Dask's comms too
    connect = functools.partial(
        _connect, resolved, address=address, client=client, security=security, nproc_per_node=nproc_per_node,
        dashboard_address=dashboard_address, simulate_gpus=simulate_gpus, memory_limit=memory_bytes,
        processes=processes,
    )
    start = functools.partial(
        _start_session, groups=device_groups, seed=seed, full_determinism=full_determinism,
        global_mesh=global_device_mesh, lazy_collect=lazy_collect, name=name, notifier=notifier, config=config,
    )
    if asynchronous:
        return Pending("twinkle_dask session starting", _start_async(connect, start))
    return start(connect())


def _check_asynchronous(asynchronous: bool | None, client: Any) -> bool:
    """Whether ``initialize`` starts an async driver (see its ``asynchronous`` parameter)."""
    loop = running_loop()
    client_async = client is not None and loop is not None and on_loop(client.loop.asyncio_loop)
    if asynchronous is None:
        return client_async
    if asynchronous and loop is None:
        raise ConfigurationError(
            "initialize(..., asynchronous=True) was called outside a running event loop; await it inside a "
            "coroutine (`client = await twinkle_dask.initialize('dask', ..., asynchronous=True)`), or drop "
            "asynchronous=True for a synchronous driver"
        )
    if asynchronous and client is not None and not client_async:
        raise ConfigurationError(
            f"initialize(..., asynchronous=True) got the synchronous client {client!r}; pass an asynchronous "
            f"one (`client = await Client(..., asynchronous=True)`), or drop asynchronous=True"
        )
    if not asynchronous and client_async:
        raise BlockingCallError("initialize(..., asynchronous=False) with an asynchronous client on its loop",
                                "await twinkle_dask.initialize('dask', client=client, ...)")
    return asynchronous


def _connect(resolved: Any, *, address: str | None, client: Any, security: Any, nproc_per_node: int | None,
             dashboard_address: str | None, simulate_gpus: bool, memory_limit: int,
             processes: bool) -> ClusterConnection:
    """Reach the cluster (blocking): the existing one, or a local one started now."""
    if address is not None or client is not None:
        return connect_cluster(resolved, address=address, client=client, security=security,
                               nproc_per_node=nproc_per_node)
    return start_local_cluster(resolved, dashboard_address=dashboard_address, simulate_gpus=simulate_gpus,
                               security=security, memory_limit=memory_limit, processes=processes)


def _start_session(connection: ClusterConnection, **options: Any) -> Any:
    """Make ``connection``'s session the process's session; return its client."""
    session = DaskSession(connection=connection, **options)
    # On UCX, a driver with a GPU sends and receives CUDA tensors device to device.
    address = str(getattr(connection.client.scheduler, "address", "") or "")
    set_device_frames(moves_device_memory(address) and cuda_usable())
    runtime.set_process_session(session)
    _register_atexit()
    logger.info("twinkle_dask session started: groups %s", [g.name for g in session.groups])
    return connection.client


async def _start_async(connect: Callable[[], ClusterConnection], start: Callable[[ClusterConnection], Any]) -> Any:
    """``initialize`` for an async driver: the blocking connect runs in a thread, off the loop."""
    connection = await offload(connect)
    if not on_loop(cast("AsyncIOLoop", connection.client.loop).asyncio_loop):  # our own sync client, on its own loop
        await use_async_client(connection)
    return start(connection)


_atexit_registered = False


def _register_atexit() -> None:
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(shutdown)
        _atexit_registered = True


def shutdown(timeout: float = 30.0) -> Any:
    """Close the session: destroy the components, and stop the local cluster if initialize started one.

    Safe to call more than once; completes within about ``timeout`` seconds
    even if a worker hangs.

    Parameters
    ----------
    timeout : float, default 30
        Seconds to allow for closing the components and the local cluster.

    Returns
    -------
    None, or an awaitable for an async driver
        On the loop of an async driver's session: ``await twinkle_dask.shutdown()``
        (the closing starts at once, awaited or not).

    Raises
    ------
    ConfigurationError
        If ``timeout`` is not a positive number (checked before anything is closed).
    """
    check_timeout("shutdown", timeout, optional=False)
    session = runtime.process_session()
    runtime.set_process_session(None)
    if isinstance(session, DaskSession):
        if on_loop(session.caller.loop):
            return Pending("twinkle_dask shutdown", offload(session.close, timeout))
        session.close(timeout)
    return None
