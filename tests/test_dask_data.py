"""Kept results are Dask data: managed memory on their worker, spilled under its memory limit, read back."""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import psutil
import pytest
from data_components import Blocks, Holder

from twinkle_dask._deploy import cluster as twinkle_cluster
from twinkle_dask._worker.store import data_key
from twinkle_dask.exceptions import ComponentClosedError, SerializationError
from twinkle_dask.testing import local_session, worker_stats

pytestmark = pytest.mark.timeout(240)

MiB = 1024 * 1024


def _until(condition, what: str, limit: float = 60.0):
    """Poll ``condition()`` until it returns something truthy; fail after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} did not happen within {limit:g} s"
        time.sleep(0.05)
    return value


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def _twinkle_data(dask_worker):
    """The worker's twinkle keys: in memory, on disk, managed bytes and what was spilled."""
    data = dask_worker.data
    fast = getattr(data, "fast", data)
    slow = getattr(data, "slow", {})
    return {
        "memory": sorted(k for k in fast if str(k).startswith("twinkle-")),
        "disk": sorted(k for k in slow if str(k).startswith("twinkle-")),
        # Managed memory of twinkle's results: the component's actor key is Dask data on the worker too.
        "managed": dask_worker.state.nbytes - sum(ts.nbytes for k, ts in dask_worker.state.tasks.items()
                                                  if ts.state == "memory" and not str(k).startswith("twinkle-")),
        "spilled": int(data.spilled_total.memory) if hasattr(data, "spilled_total") else 0,
        "nbytes": {k: ts.nbytes for k, ts in dask_worker.state.tasks.items() if str(k).startswith("twinkle-")},
    }


def _scheduler_view(address, keys, dask_scheduler):
    """What the scheduler (and so the dashboard) knows of a worker's memory and of ``keys``."""
    ws = dask_scheduler.workers[address]
    memory = ws.memory
    tasks = {k: dask_scheduler.tasks.get(k) for k in keys}
    return {
        "nbytes": ws.nbytes - sum(ts.nbytes for ts in ws.has_what if not str(ts.key).startswith("twinkle-")),
        "managed": memory.managed,
        "spilled": memory.spilled,
        "keys": {k: (ts.state, sorted(w.address for w in ts.who_has or ()), ts.nbytes)
                 for k, ts in tasks.items() if ts is not None},
    }


async def _watch_status(dask_worker):
    """Start recording the longest stretch the worker spends paused (kept on the worker)."""
    watch = {"longest": 0.0, "since": None}
    dask_worker._twinkle_test_watch = watch

    async def loop():
        while dask_worker.status.name in ("running", "paused"):
            now = time.monotonic()
            if dask_worker.status.name == "paused":
                watch["since"] = watch["since"] or now
                watch["longest"] = max(watch["longest"], now - watch["since"])
            else:
                watch["since"] = None
            await asyncio.sleep(0.01)

    dask_worker._twinkle_test_watcher = asyncio.ensure_future(loop())


def _watched(dask_worker):
    return dict(dask_worker._twinkle_test_watch, status=dask_worker.status.name)


def test_kept_results_past_the_memory_limit_are_spilled_and_read_back_correct(monkeypatch):
    # Workers as a numpy user's script gets them (about 60 MiB each): this test process imported torch,
    # which the zygote would otherwise preload (about 200 MiB, half the limit, before any result).
    monkeypatch.setattr(twinkle_cluster, "_preload_modules", lambda: ["numpy"])
    with local_session(model=1, memory_limit="400MiB") as client:
        blocks = Blocks(remote_group="model")
        ref = blocks._twinkle_ref
        (address,) = ref.addresses
        pid = client.run(os.getpid, workers=[address])[address]
        assert client.run(_rss, workers=[address])[address] < 120 * MiB
        client.run(_watch_status, workers=[address])

        results = [blocks.make(100 * MiB, k) for k in range(3)]  # lazy: each stays on the worker
        keys = [data_key(ref.cid, 0, r._info.call_id) for r in results]
        _until(lambda: worker_stats()[address]["held"] == 3, "the three calls")

        def spilled():
            state = client.run(_twinkle_data, workers=[address])[address]
            return state if state["disk"] and len(state["memory"]) + len(state["disk"]) == 3 else None

        state = _until(spilled, "spilling the kept results")
        # Dask's memory manager moved the least recently used results to disk; all three are still Dask's.
        assert sorted(state["memory"] + state["disk"]) == sorted(keys)
        assert state["disk"][0] == keys[0]
        assert state["spilled"] >= 100 * MiB
        assert all(100 * MiB <= state["nbytes"][k] < 101 * MiB for k in keys)
        assert 300 * MiB <= state["managed"] < 302 * MiB

        # The dashboard's view: the worker's spilled memory (heartbeats) and its managed memory (the keys).
        view = _until(lambda: (v := client.run_on_scheduler(_scheduler_view, address, keys))["spilled"] >= 100 * MiB
                      and len(v["keys"]) == 3 and v, "the scheduler's view of the spilled results", 30)
        assert {k: v[:2] for k, v in view["keys"].items()} == {k: ("memory", [address]) for k in keys}
        assert view["nbytes"] == state["managed"]

        # Read back from disk: on the same worker (a later call) and through a fetch.
        assert blocks.summary(results[0]).result(timeout=60) == {"len": 100 * MiB // 8, "min": 0.0, "max": 0.0}
        for k, result in enumerate(results):
            value = result.result(timeout=60)
            assert value.shape == (100 * MiB // 8,)
            assert value.dtype == np.float64
            assert (value == 100.0 * k).all()
            del value

        watched = client.run(_watched, workers=[address])[address]
        assert watched["status"] == "running"
        assert watched["longest"] < 5.0, f"the worker stayed paused {watched['longest']:.1f} s"
        assert client.run(os.getpid, workers=[address])[address] == pid  # never killed nor restarted

        del results, result
        state = _until(lambda: (s := client.run(_twinkle_data, workers=[address])[address])["managed"] == 0 and s,
                       "releasing the spilled results")
        assert state["memory"] == state["disk"] == []


def test_managed_memory_follows_a_kept_result_and_its_release():
    with local_session(model=1) as client:
        blocks = Blocks(remote_group="model")
        ref = blocks._twinkle_ref
        (address,) = ref.addresses

        def managed() -> int:
            return int(client.run(lambda dask_worker: dask_worker.state.nbytes, workers=[address])[address])

        def heartbeat_managed() -> int:
            info = client.scheduler_info(n_workers=-1)["workers"][address]
            return int(info["metrics"]["managed_bytes"])

        before = managed()
        lazy = blocks.make(64 * MiB, 7)
        key = data_key(ref.cid, 0, lazy._info.call_id)
        _until(lambda: managed() - before >= 64 * MiB, "counting the kept result as managed memory")
        assert 64 * MiB <= managed() - before < 64 * MiB + 4096
        state = client.run(_twinkle_data, workers=[address])[address]
        assert state["memory"] == [key]
        assert state["nbytes"] == {key: managed() - before}
        # The heartbeats carry it to the scheduler; after REPORT_AFTER the scheduler knows the key itself (the
        # dashboard's "managed" memory), as data of this worker.
        _until(lambda: heartbeat_managed() >= 64 * MiB, "the heartbeat reporting the managed memory", 30)
        view = _until(lambda: (v := client.run_on_scheduler(_scheduler_view, address, [key]))["keys"] and v,
                      "the scheduler learning of the kept result", 30)
        size = managed() - before
        assert view["keys"] == {key: ("memory", [address], size)}
        assert view["nbytes"] == size
        assert worker_stats()[address]["held"] == 1

        value = lazy.result(timeout=60)
        assert (value == 700.0).all()
        del value
        del lazy
        _until(lambda: managed() == before, "releasing the kept result")
        assert client.run(_twinkle_data, workers=[address])[address]["nbytes"] == {}
        assert worker_stats()[address]["held"] == 0
        _until(lambda: heartbeat_managed() == before, "the heartbeat reporting the release", 30)
        view = client.run_on_scheduler(_scheduler_view, address, [key])
        assert view["keys"] == {}  # forgotten
        assert view["nbytes"] == 0


async def _register(cid, call_id, dask_worker):
    return await dask_worker.extensions["twinkle"].register(cid, call_id)


def _nbytes(key, dask_worker):
    return dask_worker.extensions["twinkle"].nbytes(key)


def test_register_names_the_key_and_leaves_a_registered_result_to_dask():
    with local_session(model=2) as client:
        blocks = Blocks(remote_group="model")
        ref = blocks._twinkle_ref
        lazy = blocks.make(MiB, 3)
        call_id = lazy._info.call_id
        keys = {a: client.run(_register, ref.cid, call_id, workers=[a])[a] for a in ref.addresses}
        assert keys == {a: data_key(ref.cid, rank, call_id) for rank, a in enumerate(ref.addresses)}
        assert len(set(keys.values())) == 2  # unique in the cluster: one key per rank
        sizes = {a: client.run(_nbytes, keys[a], workers=[a])[a] for a in ref.addresses}
        assert all(MiB <= n < MiB + 4096 for n in sizes.values())

        # A registered result is the scheduler's to free: twinkle's release leaves its key in place.
        del lazy
        _until(lambda: sum(s["held"] for s in worker_stats().values()) == 0, "releasing twinkle's records")
        for a in ref.addresses:
            assert client.run(_twinkle_data, workers=[a])[a]["memory"] == [keys[a]]

        # An unregistered result of the same component is freed by twinkle's release.
        other = blocks.make(MiB, 4)
        other_keys = [data_key(ref.cid, rank, other._info.call_id) for rank in range(2)]
        other.result(timeout=60)
        assert [client.run(_twinkle_data, workers=[a])[a]["memory"] for a in ref.addresses] == [
            sorted([keys[a], k]) for a, k in zip(ref.addresses, other_keys, strict=True)
        ]
        del other
        _until(lambda: all(client.run(_twinkle_data, workers=[a])[a]["memory"] == [keys[a]] for a in ref.addresses),
               "freeing the unregistered result")


def test_register_of_a_released_or_unknown_result_says_so():
    with local_session(model=1) as client:
        blocks = Blocks(remote_group="model")
        ref = blocks._twinkle_ref
        (address,) = ref.addresses
        lazy = blocks.make(1024, 1)
        call_id = lazy._info.call_id
        lazy.result(timeout=60)
        del lazy
        _until(lambda: worker_stats()[address]["held"] == 0, "releasing the result")
        with pytest.raises(LookupError, match=f"result of call {call_id} on Blocks rank 0 is no longer held"):
            client.run(_register, ref.cid, call_id, workers=[address])
        with pytest.raises(ComponentClosedError, match="component nope is not on worker"):
            client.run(_register, "nope", call_id, workers=[address])
        with pytest.raises(LookupError, match="holds no data under key 'twinkle-nope'"):
            client.run(_nbytes, "twinkle-nope", workers=[address])


def test_a_value_dask_can_neither_hold_nor_spill_stays_with_its_rank(monkeypatch):
    monkeypatch.setattr(twinkle_cluster, "_preload_modules", lambda: ["numpy"])
    with local_session(model=1, memory_limit="200MiB") as client:
        holder = Holder(remote_group="model")
        ref = holder._twinkle_ref
        (address,) = ref.addresses
        # Larger than the spill target (60 % of 200 MiB), so Dask writes it straight to disk: pickling fails.
        lazy = holder.opaque(150 * MiB, 5)
        _until(lambda: worker_stats()[address]["held"] == 1, "the call")
        key = data_key(ref.cid, 0, lazy._info.call_id)
        state = _until(lambda: (s := client.run(_twinkle_data, workers=[address])[address])["nbytes"] == {} and s,
                       "dropping the refused key")
        assert state["memory"] == state["disk"] == []
        assert holder.tag_of(lazy).result(timeout=60) == 5  # kept all the same, read by a later call
        with pytest.raises(SerializationError, match="cannot be Dask data"):
            client.run(_register, ref.cid, lazy._info.call_id, workers=[address])
        assert key not in client.run(_twinkle_data, workers=[address])[address]["nbytes"]


def test_a_small_result_stays_out_of_dask_until_it_is_registered():
    with local_session(model=1) as client:
        holder = Holder(remote_group="model")
        ref = holder._twinkle_ref
        (address,) = ref.addresses
        lazy = holder.small(9)
        assert lazy.result(timeout=60) == {"tag": 9}
        assert worker_stats()[address]["held"] == 1
        assert client.run(_twinkle_data, workers=[address])[address]["nbytes"] == {}  # travels with the reply
        key = client.run(_register, ref.cid, lazy._info.call_id, workers=[address])[address]
        assert key == data_key(ref.cid, 0, lazy._info.call_id)
        state = client.run(_twinkle_data, workers=[address])[address]
        assert state["memory"] == [key]
        assert 0 < state["nbytes"][key] < 1024
        assert holder.tag_of(lazy).result(timeout=60) == 9  # read back from the data store by a later call


def _free_keys(keys, dask_worker):
    """What the scheduler does once every future of ``keys`` is released."""
    from distributed.worker_state_machine import FreeKeysEvent

    dask_worker.handle_stimulus(FreeKeysEvent(keys=keys, stimulus_id=f"test-free-{time.time()}"))


def test_a_registered_result_freed_by_dask_is_no_longer_held():
    with local_session(model=1) as client:
        blocks = Blocks(remote_group="model")
        ref = blocks._twinkle_ref
        (address,) = ref.addresses
        lazy = blocks.make(MiB, 2)
        call_id = lazy._info.call_id
        key = client.run(_register, ref.cid, call_id, workers=[address])[address]
        assert client.run(_register, ref.cid, call_id, workers=[address])[address] == key  # again: the same key
        client.run(_free_keys, [key], workers=[address])
        assert client.run(_twinkle_data, workers=[address])[address]["nbytes"] == {}
        with pytest.raises(LookupError, match=f"no longer held: Dask released its key '{key}'"):
            client.run(_register, ref.cid, call_id, workers=[address])
        with pytest.raises(LookupError, match=f"result of call {call_id} on Blocks rank 0 is no longer held"):
            blocks.summary(lazy).result(timeout=60)
