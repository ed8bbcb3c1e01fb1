"""Async drivers: an asynchronous client on the running loop; builds and calls are awaited, nothing blocks it."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from components import Broken, CustomError, Echo, Loader, Stepper
from distributed import Client
from distributed.utils_test import gen_cluster

import twinkle_dask as twinkle
from twinkle_dask import (
    BlockingCallError,
    CallTimeoutError,
    ComponentClosedError,
    ConfigurationError,
    ConfigurationTypeError,
    DeviceGroup,
    DeviceMesh,
    remote_class,
)
from twinkle_dask import runtime as _runtime
from twinkle_dask.testing import local_session

pytestmark = pytest.mark.timeout(120)

GROUPS = [DeviceGroup(name="model", ranks=2, device_type="cpu"), DeviceGroup(name="data", ranks=1, device_type="cpu")]
# The twinkle extension's executor threads outlive gen_cluster's in-process workers: not a leak of these tests.
CLUSTER = {"nthreads": [("127.0.0.1", 1)] * 3, "timeout": 90, "clean_kwargs": {"threads": False}}


@remote_class()
class SlowInit:
    """Takes ``seconds`` to build, so a test can watch the loop while it is built."""

    def __init__(self, seconds: float):
        time.sleep(seconds)


@pytest.fixture(autouse=True)
def _no_session_leaks():
    yield
    if _runtime.process_session() is not None:
        twinkle.shutdown()


async def _heartbeat(gaps: list[float]) -> None:
    last = time.monotonic()
    while True:
        await asyncio.sleep(0.01)
        now = time.monotonic()
        gaps.append(now - last)
        last = now


@gen_cluster(client=True, **CLUSTER)
async def test_async_driver_builds_calls_hands_off_and_shuts_down(c, s, *workers):
    gaps: list[float] = []
    beat = asyncio.ensure_future(_heartbeat(gaps))
    assert await twinkle.initialize("dask", client=c, groups=GROUPS) is c
    session = _runtime.process_session()
    assert sorted(session.placements) == ["data", "model"]

    pending = SlowInit(0.6, remote_group="model")
    assert repr(pending) == "<SlowInit being built on group 'model' (pending): await it>"
    await pending
    beat.cancel()
    assert sum(gaps) >= 0.6 and max(gaps) < 0.3, max(gaps)  # the loop kept running while __init__ ran

    model = await Echo(remote_group="model")
    meshed = await Echo(device_mesh=DeviceMesh.from_sizes(dp_size=2), remote_group="model")
    data = await Echo(remote_group="data")
    assert repr(model) == "<Echo handle group='model' ranks=2>"

    ids = await model.identity()  # dispatch='all', collect='none': one dict per rank
    assert [(i["rank"], i["world"], i["env"]["CLUSTER_NAME"]) for i in ids] == [(0, 2, "model"), (1, 2, "model")]
    assert await model.recv([1, 2, 3]) == [{"args": [[1, 2]], "kwargs": {}}, {"args": [[3]], "kwargs": {}}]
    assert await meshed.describe([0, 1, 2, 3, 4]) == [{"type": "list", "len": 3, "values": [0, 1, 2]},
                                                      {"type": "list", "len": 2, "values": [3, 4]}]
    assert await model.count() == 2  # lazy_collect=False: still an awaitable here

    # A lazy result handed on before it is done: the consumer ranks fetch their slices worker to worker.
    produced = data.produce("list")
    assert isinstance(produced, twinkle.LazyResult)
    assert await model.recv(produced) == [{"args": [[0, 1]], "kwargs": {}}, {"args": [[2, 3]], "kwargs": {}}]
    assert await produced == [0, 1, 2, 3]
    assert produced.result() == [0, 1, 2, 3]  # awaited: the cached value, no waiting
    big = data.big(256 * 1024)  # too large to come back with the reply: fetched on the loop
    summary = {"type": "ndarray", "len": 32768, "values": [0.0]}
    assert await meshed.describe.options(dispatch="all")(big) == [summary, summary]
    value = await big
    assert value.shape == (32768,) and np.array_equal(value, np.zeros(32768))

    with pytest.raises(KeyError, match="rank 1 says no"):
        await model.fail_on(1)
    with pytest.raises(CustomError, match="rank 0 says no"):
        await model.fail_on(0, "Custom")
    with pytest.raises(CallTimeoutError) as timed_out:
        await model.sleep.options(timeout=0.1)(0.5)
    assert timed_out.value.pending_ranks == (0, 1)
    with pytest.raises(ValueError, match="cannot build rank 1"):
        await Broken(remote_group="model")

    await twinkle.close_component(data)
    with pytest.raises(ComponentClosedError):
        data.produce("list")
    old_cid = model._twinkle_ref.cid
    assert await model.restart() is None  # rebuilt in place: the handle points at new instances
    assert model._twinkle_ref.cid != old_cid
    assert await model.recv([7]) == [{"args": [[7]], "kwargs": {}}, {"args": [[]], "kwargs": {}}]
    await twinkle.shutdown()
    assert _runtime.process_session() is None and session.closed
    with pytest.raises(ComponentClosedError):
        model.identity()


@gen_cluster(client=True, **CLUSTER)
async def test_blocking_calls_on_the_loop_raise_at_once(c, s, *workers):
    with pytest.raises(BlockingCallError, match="await twinkle_dask.initialize"):
        twinkle.initialize("dask", client=c, groups=GROUPS, asynchronous=False)
    assert _runtime.process_session() is None
    await twinkle.initialize("dask", client=c, groups=GROUPS)
    model = await Echo(remote_group="model")
    loader = await Loader(remote_group="data")
    r = model.sleep(0.3)
    waits = {
        "Echo.sleep(...).result()": r.result,
        "Echo.sleep(...).per_rank()": r.per_rank,
        "len(Loader handle)": lambda: len(loader),
        "iterating a Loader handle": lambda: iter(loader),
    }
    for what, call in waits.items():
        start = time.monotonic()
        with pytest.raises(BlockingCallError) as raised:
            call()
        assert time.monotonic() - start < 0.2
        assert isinstance(raised.value, RuntimeError) and raised.value.what == what
    assert str(pytest.raises(BlockingCallError, r).value) == (
        "Echo.sleep(...).result() waits, and it was called on the event loop of an async driver (an "
        "asynchronous client's loop), which would then never get to deliver what it waits for. Write "
        "`await Echo.sleep(...)` instead, or call it from another thread."
    )
    assert await r == 0.3
    assert r() == 0.3
    # Awaited on the loop while a thread waits in result(): neither blocks the other.
    big = model.big(256 * 1024)
    in_thread, on_loop = await asyncio.gather(asyncio.to_thread(big.result), big)
    assert in_thread is on_loop and np.array_equal(on_loop, np.zeros(32768))
    # A thread in result() holds the result's lock while it waits for the loop: the loop never waits on it.
    big = model.big(256 * 1024)
    held = threading.Event()

    def hold_lock():
        with big._lock:
            held.set()
            time.sleep(0.5)

    holder = asyncio.ensure_future(asyncio.to_thread(hold_lock))
    await asyncio.to_thread(held.wait)
    gaps: list[float] = []
    beat = asyncio.ensure_future(_heartbeat(gaps))
    start = time.monotonic()
    assert np.array_equal(await big, np.zeros(32768))
    waited = time.monotonic() - start
    beat.cancel()
    await holder
    assert waited >= 0.2 and max(gaps) < 0.2, (waited, max(gaps))
    # From another thread the same calls simply wait, the loop delivering their replies meanwhile.
    assert await asyncio.to_thread(len, loader) == 3
    assert len(await asyncio.to_thread(list, loader)) == 3
    assert await asyncio.to_thread(model.sleep(0.05).per_rank) == [0.05, 0.05]
    await twinkle.shutdown()


@gen_cluster(client=True, **CLUSTER)
async def test_async_for_iterates_a_handle(c, s, *workers):
    await twinkle.initialize("dask", client=c, groups=GROUPS)
    loader = await Loader(remote_group="data")
    batches = [batch async for batch in loader]  # lazy by default: each batch a LazyResult
    assert all(isinstance(b, twinkle.LazyResult) for b in batches)
    assert [await b for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    stepper = await Stepper([3, 2], remote_group="model")  # lazy_collect=False: the values; rank 1 stops first
    assert [step async for step in stepper] == [[1, 1], [2, 2]]
    assert [step async for step in stepper] == [[1, 1], [2, 2]]  # __iter__ starts it again
    with pytest.raises(TypeError, match="'Echo' object is not iterable"):
        (await Echo(remote_group="model")).__aiter__()
    await twinkle.shutdown()


def test_asynchronous_needs_a_running_loop_and_an_asynchronous_client():
    with pytest.raises(ConfigurationError, match="outside a running event loop"):
        twinkle.initialize("dask", groups=GROUPS, asynchronous=True)
    with pytest.raises(ConfigurationTypeError, match=r"^initialize: asynchronous must be True or False, got 'yes'$"):
        twinkle.initialize("dask", groups=GROUPS, asynchronous="yes")
    assert _runtime.process_session() is None

    async def with_sync_client(client):
        twinkle.initialize("dask", client=client, groups=GROUPS, asynchronous=True)

    with local_session(model=1) as client, pytest.raises(ConfigurationError, match="got the synchronous client"):
        asyncio.run(with_sync_client(client))


def test_asyncio_run_driver_on_a_local_cluster_of_its_own():
    """``asynchronous=True`` without a client: worker processes, and an asynchronous client on the driver's loop."""

    async def main():
        client = await twinkle.initialize("dask", groups=GROUPS, dashboard_address=None, asynchronous=True)
        assert isinstance(client, Client) and client.asynchronous
        model = await Echo(remote_group="model")
        data = await Echo(remote_group="data")
        ids = await model.identity()
        produced = data.produce("ndarray")
        got = await model.describe.options(dispatch="all")(produced)
        with pytest.raises(BlockingCallError):
            produced.result()
        await twinkle.shutdown()
        return [(i["rank"], i["world"]) for i in ids], len({i["pid"] for i in ids}), got, client.status

    ranks, pids, got, status = asyncio.run(main())
    assert ranks == [(0, 2), (1, 2)] and pids == 2
    assert got == [{"type": "ndarray", "len": 4, "values": [0, 1, 2, 3]}] * 2
    assert status == "closed"
    assert _runtime.process_session() is None


def test_readme_async_example_runs(tmp_path):
    readme = (__import__("pathlib").Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "asyncio.run(" in b)
    script = tmp_path / "async_driver.py"
    script.write_text(block)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["50", "[11, 12, 13, 14]"]


DRIVER_WITHOUT_SHUTDOWN = """
import asyncio, json, sys, time
import psutil
sys.path.insert(0, {tests!r})
from components import Echo
import twinkle_dask as twinkle
from twinkle_dask import DeviceGroup

async def main():
    await twinkle.initialize("dask", groups=[DeviceGroup(name="model", ranks=2, device_type="cpu")],
                             dashboard_address=None, asynchronous=True)
    model = await Echo(remote_group="model")
    print(json.dumps(await model.recv([1, 2])))
    print(json.dumps([p.pid for p in psutil.Process().children(recursive=True)]), flush=True)

asyncio.run(main())  # ends without twinkle_dask.shutdown(): the session is closed at exit
print(time.time(), flush=True)
"""


def test_driver_whose_loop_ends_without_shutdown_exits_and_stops_its_workers(tmp_path):
    import json
    import pathlib

    import psutil

    script = tmp_path / "driver.py"
    script.write_text(DRIVER_WITHOUT_SHUTDOWN.format(tests=str(pathlib.Path(__file__).parent)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100, cwd=tmp_path)
    exiting = time.time() - float(proc.stdout.splitlines()[2])  # from the loop's end to the process's exit
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert json.loads(lines[0]) == [{"args": [[1]], "kwargs": {}}, {"args": [[2]], "kwargs": {}}]
    children = json.loads(lines[1])
    assert len(children) >= 2  # the worker processes (and the zygote that forks them)
    assert "Await twinkle_dask.shutdown() before the loop ends" in proc.stderr
    assert exiting < 8, exiting  # no waiting on a loop that is gone (10 s per request batch)

    def running(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 10
    while any(running(p) for p in children):
        assert time.monotonic() < deadline, [p for p in children if running(p)]
        time.sleep(0.1)
