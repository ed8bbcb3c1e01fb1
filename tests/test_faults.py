"""Worker loss, recovery and bounded shutdown: no hangs, typed errors, nothing else broken."""

from __future__ import annotations

import os
import signal
import time

import pytest
from components import Echo, Resilient

import twinkle_dask as twinkle
from twinkle_dask.exceptions import WorkerLostError
from twinkle_dask.testing import local_session, worker_stats

pytestmark = pytest.mark.timeout(120)


def _pids(handle) -> list[int]:
    return [i["pid"] for i in handle.identity()()]


def _until_received(handle, rank: int, calls_before: int) -> None:
    """Wait until the worker of ``rank`` has received a call beyond its first ``calls_before``."""
    address = handle._twinkle_ref.addresses[rank]
    deadline = time.monotonic() + 10
    while worker_stats()[address]["calls"] <= calls_before:  # each poll is a round trip to the workers
        assert time.monotonic() < deadline, f"no call reached {address}"


def _calls(handle, rank: int) -> int:
    return worker_stats()[handle._twinkle_ref.addresses[rank]]["calls"]


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


def test_worker_killed_mid_call_fails_fast_and_names_the_rank():
    with local_session(model=2, other=1):
        echo = Echo(tag="keep", remote_group="model")
        other = Echo(remote_group="other")
        victim = _pids(echo)[1]
        before = _calls(echo, 1)
        running = echo.sleep(30)
        consumer = other.recv.options(dispatch="all")(running)
        _until_received(echo, 1, before)  # rank 1 is running it
        os.kill(victim, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerLostError) as info:
            running()
        assert time.monotonic() - start < 10
        err = info.value
        assert (err.group, err.rank) == ("model", 1) and "Echo.sleep" in str(err)
        with pytest.raises(WorkerLostError):  # the lazy result that depends on it fails too
            consumer.result(timeout=15)
        start = time.monotonic()
        with pytest.raises(WorkerLostError, match="rank 1 of group 'model'"):
            echo.count()  # later calls fail at once
        assert time.monotonic() - start < 1
        assert other.count() == 1  # other components are unaffected


def test_restart_rebuilds_with_the_original_arguments_on_a_new_worker():
    with local_session(model=2):
        echo = Echo(tag="orig", remote_group="model")
        old = _pids(echo)
        os.kill(old[0], signal.SIGKILL)
        _wait_gone(old[0])
        with pytest.raises(WorkerLostError):
            echo.count()
        echo.restart()
        ids = echo.identity()()
        assert [i["tag"] for i in ids] == ["orig", "orig"]
        assert ids[0]["pid"] != old[0] and ids[1]["pid"] == old[1]
        assert echo.count() == 2


def test_max_restarts_rebuilds_automatically_before_the_next_call():
    with local_session(model=2):
        comp = Resilient(tag="auto", remote_group="model")
        victim = _pids(comp)[1]
        before = _calls(comp, 1)
        pending = comp.sleep(30)
        _until_received(comp, 1, before)
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(WorkerLostError):
            pending()
        assert comp.count() == 2  # rebuilt first, then called
        assert [i["tag"] for i in comp.identity()()] == ["auto", "auto"]


def test_shutdown_completes_with_a_hung_worker():
    with local_session(model=2):
        echo = Echo(remote_group="model")
        victim = _pids(echo)[0]
        echo.sleep(1000)  # rank 0's thread is busy for good
        os.kill(victim, signal.SIGSTOP)  # and its process no longer answers at all
        start = time.monotonic()
        twinkle.shutdown(timeout=20)
    assert time.monotonic() - start < 30
    try:
        os.kill(victim, signal.SIGKILL)
    except ProcessLookupError:
        pass
