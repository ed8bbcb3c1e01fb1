"""Kept results as Dask data: the worker's data store holds them, its memory manager spills them.

A lazy call keeps its result on the rank that made it until the last
:class:`~twinkle_dask.futures.LazyResult` that refers to it is gone. A value
larger than ``DATA_BYTES`` (64 KiB, what also decides that a value no longer
travels with the reply) lives in the worker's Dask data store (``worker.data``, a ``SpillBuffer`` when
the worker has a memory limit) under the key :func:`data_key` names, put there
through the worker's state machine like data a client scattered
(``UpdateDataEvent``): it counts as the worker's managed memory
(``worker.state.nbytes``, the heartbeats' ``managed_bytes``),
Dask spills it to disk past the memory target and reads it back when a fetch
or a later call on this worker needs it. A release frees the key with the
state machine's own ``FreeKeysEvent``.

The insertion sends the scheduler nothing (as with scatter). A result still
held :data:`REPORT_AFTER` seconds later is made known to the scheduler, as
data of this worker that no client wants (``Scheduler.update_data``, one
message for all such keys): the scheduler's view of the worker (its managed
memory on the dashboard, ``WorkerState.nbytes``) counts it from then on, and
forgets it when the worker frees the key. Results handed on within that time
(a hand-off) cost the scheduler nothing. Making a result the scheduler's to
free, for a ``distributed.Future`` of it, is
:meth:`~twinkle_dask._worker.extension.TwinkleWorker.register`'s job; the
store then stops reporting that key itself (:meth:`DataStore.claim`).

Puts and frees made during one turn of the worker's event loop reach the state
machine together, as one event each (results of short calls finish many to a
turn). A value the data store refuses (larger than the spill target and not
picklable, so it can neither stay in memory nor go to disk) stays with its
:class:`~twinkle_dask._worker.extension.RankOutcome`, in memory, as before.
"""

from __future__ import annotations

import asyncio
import logging
from time import time
from typing import Any, Protocol

from dask.typing import Key
from distributed.worker_state_machine import FreeKeysEvent, UpdateDataEvent

__all__ = ["REGISTER_HANDLER", "REPORT_AFTER", "DataStore", "data_key"]

logger = logging.getLogger(__name__)

#: The worker's Dask RPC handler that registers a kept result for a client
#: (``TwinkleWorker.register_for_client``; ``LazyResult.futures()`` calls it through ``client.rpc``).
REGISTER_HANDLER = "twinkle_register"

#: Seconds a kept result stays unknown to the scheduler (it is told about it 1 to 2 times this after it was kept).
REPORT_AFTER = 0.5


def data_key(cid: str, rank: int, call_id: int) -> str:
    """The Dask key of the kept result of call ``call_id`` on rank ``rank`` of component ``cid``.

    Parameters
    ----------
    cid : str
        The component's id (``ComponentRef.cid``, the ``component`` field of the wire messages).
    rank : int
        The component rank that made the result.
    call_id : int
        The call's id (the ``call_id`` of the ``Call`` message).

    Returns
    -------
    str
        ``"twinkle-<cid>-<rank>-<call_id>"``: unique in the cluster, so it can be
        registered with the scheduler as it is.
    """
    return f"twinkle-{cid}-{rank}-{call_id}"


class Stored(Protocol):
    """What the store needs of a kept result: its key, its value until stored, and whether it is."""

    key: str
    value: Any
    stored: bool


class DataStore:
    """The kept results of one worker, in that worker's Dask data store.

    Parameters
    ----------
    worker : distributed.Worker
        The worker whose data store and state machine hold the results.
    loop : asyncio.AbstractEventLoop
        The worker's event loop; every method runs on it.
    """

    def __init__(self, worker: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.worker = worker
        self.loop = loop
        self._puts: dict[str, Stored] = {}
        self._frees: list[str] = []
        self._scheduled = False
        #: Stored keys the scheduler does not know yet: kept since the last report, and before that.
        self._young: set[str] = set()
        self._old: set[str] = set()
        #: Keys in the report on its way to the scheduler: freeing them waits for its answer.
        self._reporting: set[str] = set()
        self._free_after_report: list[str] = []
        #: Set when the report on its way to the scheduler has been answered (see :meth:`claim`).
        self._report_waiters: list[asyncio.Future[None]] = []
        self._report_timer: asyncio.TimerHandle | None = None

    def put(self, outcome: Stored) -> None:
        """Store ``outcome.value`` under ``outcome.key`` (at the end of this turn of the loop)."""
        self._puts[outcome.key] = outcome
        self._schedule()

    def free(self, outcome: Stored) -> None:
        """Drop the value of ``outcome`` from the data store (or from memory, where it stayed)."""
        key = outcome.key
        if self._puts.pop(key, None) is None and outcome.stored:
            self._young.discard(key)
            self._old.discard(key)
            if key in self._reporting:  # the scheduler must learn of the key before it learns that it went
                self._free_after_report.append(key)
            else:
                self._frees.append(key)
                self._schedule()
        outcome.value = None
        outcome.stored = False

    def get(self, outcome: Stored) -> Any:
        """The value of ``outcome``: read from the data store (from disk, if Dask spilled it).

        Raises
        ------
        KeyError
            Dask dropped the key (a registered result whose futures were all released).
        """
        if not outcome.stored:
            return outcome.value
        return self.worker.data[outcome.key]

    def held(self, outcome: Stored) -> bool:
        """Whether the value of ``outcome`` is in the data store now (flushing pending puts first)."""
        if outcome.key in self._puts:
            self.flush()
        return outcome.stored and outcome.key in self.worker.data

    async def claim(self, key: str) -> None:
        """Stop reporting ``key``: whoever registers it with the scheduler (with a client) does.

        Returns once no report of this store that names ``key`` is still on
        its way, so the registration reaches the scheduler after it.
        """
        self._young.discard(key)
        self._old.discard(key)
        while key in self._reporting:
            waiter: asyncio.Future[None] = self.loop.create_future()
            self._report_waiters.append(waiter)
            await waiter

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Hand the pending puts and frees to the worker's state machine now."""
        self._scheduled = False
        puts, self._puts = self._puts, {}
        frees, self._frees = self._frees, []
        events: list[Any] = []
        stamp = time()
        if frees:
            events.append(FreeKeysEvent(keys=frees, stimulus_id=f"twinkle-release-{stamp}"))
        if puts:
            data: dict[Key, object] = {key: outcome.value for key, outcome in puts.items()}
            events.append(UpdateDataEvent(data=data, stimulus_id=f"twinkle-keep-{stamp}"))
        if not events:
            return
        try:
            self.worker.handle_stimulus(*events)
        except Exception:  # the state machine refused: the values stay with their outcomes
            logger.exception("twinkle: could not hand %d kept results to the worker's data store", len(puts))
            return
        tasks = self.worker.state.tasks
        refused = []
        for key, outcome in puts.items():
            ts = tasks.get(key)
            if ts is not None and ts.state == "memory":
                outcome.value = None
                outcome.stored = True
                self._young.add(key)
            elif ts is not None:  # "error": too large for memory and not picklable for the disk
                refused.append(key)
        if self._young and self._report_timer is None:
            self._report_timer = self.loop.call_later(REPORT_AFTER, self._report)
        if refused:
            logger.warning("twinkle: %d kept results could not be spilled (not picklable); they stay in memory",
                           len(refused))
            self.worker.handle_stimulus(FreeKeysEvent(keys=refused, stimulus_id=f"twinkle-refused-{time()}"))

    def _report(self) -> None:
        """Tell the scheduler of the keys kept for a whole period since the last report."""
        self._report_timer = None
        due, self._old, self._young = self._old, self._young, set()
        if self._old:
            self._report_timer = self.loop.call_later(REPORT_AFTER, self._report)
        if not due:
            return
        tasks = self.worker.state.tasks
        nbytes = {key: int(ts.nbytes) for key in due if (ts := tasks.get(key)) is not None and ts.nbytes is not None}
        if nbytes:
            self._reporting.update(nbytes)
            self.loop.create_task(self._send_report(nbytes))

    async def _send_report(self, nbytes: dict[str, int]) -> None:
        address = self.worker.address
        try:
            await self.worker.scheduler.update_data(who_has={key: [address] for key in nbytes}, nbytes=nbytes)
        except Exception as exc:  # the scheduler is gone or the worker closing: nothing to keep in step
            logger.debug("twinkle: could not report %d kept results to the scheduler: %s", len(nbytes), exc)
        finally:
            self._reporting.difference_update(nbytes)
            waiters, self._report_waiters = self._report_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
            freed = [key for key in self._free_after_report if key in nbytes]
            if freed:
                self._free_after_report = [key for key in self._free_after_report if key not in nbytes]
                self._frees.extend(freed)
                self._schedule()
