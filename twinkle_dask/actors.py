"""Components as Dask actors: what the scheduler knows about component ranks.

Calls never go through the scheduler (they travel on twinkle's own channels),
so without help the scheduler would see idle workers holding nothing, and
adaptive scaling would close them under a live component. So when a
component is built, each of its ranks is also registered as a Dask actor on
its worker: one task per rank, ``client.submit(ComponentActor, ...,
actor=True, workers=[address])``, whose instance stands for the
:class:`~twinkle_dask._worker.extension.RankHost` of that rank. For the
scheduler the worker now holds an actor, as with any Dask actor:

* ``Client.retire_workers`` refuses to retire it (actors cannot be moved);
* ``Scheduler.workers_to_close`` (and so ``cluster.adapt()``) skips it:
  :class:`ComponentWorkersPlugin` takes workers holding component actors out
  of the candidates (Dask itself only refuses to *retire* actor workers, and
  ``adapt`` would then close them anyway);
* the dashboard, ``Client.who_has`` and ``Client.has_what`` show one key per
  rank, named ``<Class>-<component id>-<rank>``.

Registration happens once per construction and costs one task per rank; the
call path never touches the scheduler. The keys are released when the
component is closed (:func:`twinkle_dask.close_component`, ``shutdown``, a
restart) or its driver's client disconnects.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

from dask.base import annotate
from distributed import Client, Future, get_client, get_worker
from distributed.diagnostics.plugin import SchedulerPlugin

__all__ = ["ANNOTATION", "ComponentActor", "ComponentWorkersPlugin", "actor_futures", "actor_key"]

logger = logging.getLogger(__name__)

#: The task annotation that marks a component actor (its value: the component id).
ANNOTATION = "twinkle-component"

_lock = threading.Lock()
#: The actor futures of the components built by this process, by component id.
_held: dict[str, list[Future[Any]]] = {}
#: Clients whose scheduler has the plugin installed.
_installed: weakref.WeakSet[Client] = weakref.WeakSet()


def actor_key(label: str, cid: str, rank: int) -> str:
    """The scheduler key of a component rank's actor."""
    return f"{label}-{cid}-{rank}"


class ComponentActor:
    """A component rank, as a Dask actor on the rank's worker.

    The instance stands for the rank's ``RankHost`` in the worker's twinkle
    extension; calls go through the component's handle, not through this
    actor. ``describe()`` says what it stands for.

    Parameters
    ----------
    cid : str
        The component id.
    label : str
        The component's class name.
    rank : int
        The rank.
    """

    def __init__(self, cid: str, label: str, rank: int) -> None:
        self.cid = cid
        self.label = label
        self.rank = rank
        self.address = str(get_worker().address)

    def _host(self) -> Any:
        ext = get_worker().extensions.get("twinkle")
        return None if ext is None else ext.hosts.get(self.cid)

    def describe(self) -> dict[str, Any]:
        """The rank this actor stands for: component, rank, group, worker, and whether it is open."""
        host = self._host()
        return {
            "component": self.label,
            "cid": self.cid,
            "rank": self.rank,
            "group": None if host is None else host.identity.group,
            "address": self.address,
            "open": host is not None and not host.closed,
        }

    def __repr__(self) -> str:
        return f"<ComponentActor {self.label} rank {self.rank} on {self.address}>"


class ComponentWorkersPlugin(SchedulerPlugin):
    """Keeps workers that hold component actors out of ``Scheduler.workers_to_close``."""

    name = "twinkle-component-workers"

    def valid_workers_downscaling(self, scheduler: Any, workers: list[Any]) -> list[Any]:
        return [ws for ws in workers if not any(ANNOTATION in ts.annotations for ts in ws.actors)]


def _client(session: Any) -> Client:
    client = getattr(session, "client", None)
    if client is None:  # component code on a worker builds a component: the worker's client
        client = get_client()
    return client


def _install(client: Client) -> None:
    with _lock:
        if client in _installed:
            return
        _installed.add(client)
    from ._keys import KeyArrivalPlugin

    try:
        client.register_plugin(ComponentWorkersPlugin(), name=ComponentWorkersPlugin.name)
        # What lets a component method take a Dask future (see twinkle_dask._keys).
        client.register_plugin(KeyArrivalPlugin(), name=KeyArrivalPlugin.name)
    except Exception as exc:  # twinkle_dask is not importable where the scheduler runs
        logger.warning("twinkle_dask: cluster.adapt() and Scheduler.workers_to_close may choose workers that "
                       "hold components (%s); install twinkle-dask where the scheduler runs", exc)


def register(session: Any, cid: str, label: str, addresses: Sequence[str]) -> list[Future[Any]]:
    """Submit one actor per rank, pinned to the rank's worker; returns their futures (not waited for)."""
    client = _client(session)
    _install(client)
    futures = []
    with annotate(**{ANNOTATION: cid}):
        for rank, address in enumerate(addresses):
            futures.append(client.submit(ComponentActor, cid, label, rank, actor=True, workers=[address],
                                         allow_other_workers=False, key=actor_key(label, cid, rank), pure=False))
    with _lock:
        _held[cid] = futures
    return futures


def settle(futures: list[Future[Any]], timeout: float) -> None:
    """Wait up to ``timeout`` s for the actors to exist.

    Until they do, the scheduler already counts them as actors of their
    workers (it does from the moment they are assigned); a worker whose
    thread is busy with a long task creates its actor when the task ends.
    """
    deadline = time.monotonic() + timeout
    for fut in futures:  # through each future's own client: the session's is not Dask's default client
        try:
            error = fut.exception(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            logger.debug("twinkle_dask: component actor %s not created within %g s", fut.key, timeout)
            continue
        except Exception as exc:  # cancelled: the component was closed meanwhile
            error = exc
        if error is not None:
            logger.warning("twinkle_dask: component actor %s failed: %s", fut.key, error)


def release(cid: str) -> None:
    """Drop the actors of component ``cid`` (the scheduler forgets them; their workers drop them)."""
    with _lock:
        futures = _held.pop(cid, [])
    for fut in futures:
        fut.release()


def release_all() -> None:
    """Drop the actors of every component this process built."""
    with _lock:
        cids = list(_held)
    for cid in cids:
        release(cid)


def actor_futures(cid: str) -> list[Future[Any]]:
    """The actor futures of component ``cid``, one per rank (empty if it was not built here)."""
    with _lock:
        return list(_held.get(cid, ()))
