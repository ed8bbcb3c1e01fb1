"""Recovering a component stuck in a call: restart() restarts what cannot be stopped."""

from __future__ import annotations

import time

import pytest
from components import Echo, Resilient

from twinkle_dask import CallTimeoutError, WorkerLostError
from twinkle_dask.testing import local_session

pytestmark = pytest.mark.timeout(120)


def test_a_stuck_component_is_recovered_by_restart_and_its_neighbours_never_hang():
    with local_session(solo=1):
        stuck = Echo(tag="stuck", remote_group="solo")
        neighbour = Echo(tag="neighbour", remote_group="solo")
        resilient = Resilient(tag="resilient", remote_group="solo")
        old_pid = stuck.identity()()["pid"]
        with pytest.raises(CallTimeoutError):
            stuck.sleep.options(timeout=1.0)(3600)()
        waiting = neighbour.count.options(lazy_collect=True)()  # queued behind the stuck call
        start = time.monotonic()
        stuck.restart(timeout=60)  # the call cannot be stopped: the worker process is restarted
        assert time.monotonic() - start < 30
        assert stuck.count() == 1
        view = stuck.identity()()
        assert view["tag"] == "stuck" and view["pid"] != old_pid
        with pytest.raises(WorkerLostError):
            waiting.result(timeout=30)
        with pytest.raises(WorkerLostError):
            neighbour.count()
        assert resilient.count() == 1  # max_restarts: rebuilt on the new worker before the call
        assert resilient.identity()()["tag"] == "resilient"
