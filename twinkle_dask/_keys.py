"""Waiting for a Dask key to reach the scheduler, without polling: what lets a component take a Dask future.

A ``distributed.Future`` passed to a component method travels to the
consumer rank's worker as its key, on twinkle's own channel, while the graph
that made the key may still be on its way to the scheduler on the driver
client's stream. Before the worker's client can ask for the key's value
(``Client.gather``), the scheduler must know the key. :class:`KeyArrivalPlugin`,
a scheduler plugin installed with the component actors' plugin, answers the
scheduler RPC ``twinkle_desire_key(key, client, seconds)``: at once when the
scheduler knows the key, else when a graph with it arrives
(``SchedulerPlugin.update_graph``), or ``False`` after ``seconds``. Before it
answers, it makes ``client`` want the key (``Scheduler.client_desires_keys``,
what a client's own ``client-desires-keys`` message does), so the key stays
until that client releases its future, and the client hears when it is in
memory, erred or cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

__all__ = ["DESIRE_HANDLER", "KeyArrivalPlugin"]

logger = logging.getLogger(__name__)

#: The scheduler RPC handler that :class:`KeyArrivalPlugin` adds.
DESIRE_HANDLER = "twinkle_desire_key"


class KeyArrivalPlugin(SchedulerPlugin):
    """Adds the scheduler handler ``twinkle_desire_key``: wait for a key, then make a client want it."""

    name = "twinkle-key-arrival"
    #: Registered once per scheduler: a second client's registration must not orphan the waiting workers.
    idempotent = True

    def __init__(self) -> None:
        self.scheduler: Any = None
        self._waiters: dict[Any, list[asyncio.Future[None]]] = {}

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        scheduler.handlers[DESIRE_HANDLER] = self.desire_key

    def update_graph(self, scheduler: Any, *, keys: Any = (), tasks: Any = (), **kwargs: Any) -> None:
        if not self._waiters:
            return
        known = scheduler.tasks
        for key in [k for k in self._waiters if k in known]:
            for fut in self._waiters.pop(key):
                if not fut.done():
                    fut.set_result(None)

    async def desire_key(self, key: Any, client: str, seconds: float) -> bool:
        """Make ``client`` want ``key`` once the scheduler knows it; ``False`` if it did not within ``seconds``."""
        scheduler = self.scheduler
        if key not in scheduler.tasks:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(key, []).append(fut)
            try:
                await asyncio.wait_for(fut, seconds)
            except TimeoutError:
                return False
            finally:
                waiting = self._waiters.get(key)
                if waiting is not None and fut in waiting:
                    waiting.remove(fut)
                    if not waiting:
                        del self._waiters[key]
        scheduler.client_desires_keys(keys=[key], client=client)
        return True
