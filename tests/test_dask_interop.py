"""Dask interop on the worker: rank futures that are the kept results themselves, Dask futures as arguments
fetched without polling, Dask client code inside component methods, and unpickling off the worker's loop."""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest
from distributed import Future
from waiting import poll

from twinkle_dask import remote_class, remote_function
from twinkle_dask._worker.extension import DATA_BYTES
from twinkle_dask._worker.store import data_key
from twinkle_dask.exceptions import DaskFutureError
from twinkle_dask.testing import local_session

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20



# --------------------------------------------------------------------------- slow unpickling (tests only)
_UNPICKLING = {"state": "idle"}


def _slow_restore(seconds):
    """What unpickling a :class:`SlowToUnpickle` runs (in the process that unpickles it)."""
    _UNPICKLING["state"] = "running"
    time.sleep(seconds)  # stands for an import (``import torch``) that unpickling triggers
    _UNPICKLING["state"] = "done"
    return SlowToUnpickle(seconds)


class SlowToUnpickle:
    """An argument that takes ``seconds`` to unpickle."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __reduce__(self):
        return _slow_restore, (self.seconds,)


def _unpickling_state():
    return _UNPICKLING["state"]


def _one():
    return 1


# --------------------------------------------------------------------------- components
@remote_class()
class Interop:
    def __init__(self):
        pass

    @remote_function(dispatch="all")
    def produce(self, n_bytes: int):
        from twinkle_dask import get_rank

        return np.full(n_bytes // 8, float(get_rank()))

    @remote_function(dispatch="all", collect="first")
    def size_of(self, x, extra=None):
        return int(np.asarray(x).size)

    @remote_function(dispatch="all", collect="first")
    def take(self, x):
        return x

    @remote_function(dispatch="all")
    def fail_on(self, rank: int):
        from twinkle_dask import get_rank

        if get_rank() == rank:
            raise KeyError(f"rank {rank} says no")
        return get_rank()

    @remote_function(dispatch="all")
    def submit_and_wait(self, x: int):
        """Submits a Dask task from the method and waits for it: ``get_client().submit(...).result()``."""
        from distributed import get_client, get_worker

        here = get_worker().address
        future = get_client().submit(_times_ten, x, workers=[here], pure=False)  # on this very worker
        return {"value": future.result(), "ran_here": future.key in get_worker().data}

    @remote_function(dispatch="all")
    def map_in_worker_client(self, n: int):
        """``with worker_client() as c:``: many tasks on this worker, gathered while the method runs."""
        from distributed import get_worker, worker_client

        here = get_worker().address
        with worker_client() as c:
            futures = c.map(_times_ten, range(n), workers=[here], pure=False)
            return c.gather(futures)

    @remote_function(dispatch="all")
    def secede_and_rejoin(self):
        from distributed import get_client, rejoin, secede

        secede()
        value = get_client().submit(_times_ten, 4, pure=False).result()
        rejoin()
        return {"value": value, "thread": threading.current_thread().name}


def _times_ten(x):
    return x * 10


@pytest.fixture(scope="module")
def client():
    with local_session(producer=2, consumer=1) as c:
        yield c


@pytest.fixture(scope="module")
def parts(client):
    return {"producer": Interop(remote_group="producer"), "consumer": Interop(remote_group="consumer")}


# --------------------------------------------------------------------------- 1: futures() are the kept results
def _copies_of(fill, size, dask_worker):
    """Keys of this worker's data store that hold an array like ``np.full(size, fill)``."""
    found = []
    for key in list(dask_worker.data.keys()):
        value = dask_worker.data[key]
        if isinstance(value, np.ndarray) and value.size == size and value.size and value[0] == fill:
            found.append(key)
    return found


def _scheduler_keys(dask_scheduler):
    return list(dask_scheduler.tasks)


def _held(keys):
    def held(dask_worker, keys=tuple(keys)):
        return sorted(k for k in keys if k in dask_worker.data)

    return held


def test_rank_futures_are_the_kept_results_counted_once_and_freed_with_their_last_holder(client, parts):
    lazy = parts["producer"].produce(MIB)
    info = lazy._info
    size = MIB // 8
    futures = lazy.futures()
    keys = [f.key for f in futures]
    assert keys == [data_key(info.cid, r, info.call_id) for r in range(2)]
    assert [f.status for f in futures] == ["finished", "finished"]
    for rank, (f, address) in enumerate(zip(futures, info.addresses)):
        # one key holds the value on the rank's worker: the kept result, no copy made for the future
        assert client.run(_copies_of, float(rank), size, workers=[address])[address] == [f.key]
        assert client.who_has([f])[f.key] == (address,) or list(client.who_has([f])[f.key]) == [address]
        np.testing.assert_array_equal(f.result(), np.full(size, float(rank)))

    def counted(dask_scheduler, keys=tuple(keys)):
        out = {}
        for key in keys:
            ts = dask_scheduler.tasks[key]
            (ws,) = ts.who_has
            big = [t.key for t in ws.has_what if t.nbytes >= MIB]
            out[key] = {"nbytes": ts.nbytes, "big_on_worker": big, "wanted": len(ts.who_wants or ())}
        return out

    def worker_nbytes(dask_worker, keys=tuple(keys)):
        return {k: dask_worker.state.tasks[k].nbytes for k in keys if k in dask_worker.state.tasks}

    seen = client.run_on_scheduler(counted)
    on_workers = {k: v for d in client.run(worker_nbytes).values() for k, v in d.items()}
    for key in keys:
        # the scheduler counts each result once, with the size its worker counts (managed memory)
        assert seen[key]["big_on_worker"] == [key]
        assert seen[key]["nbytes"] == on_workers[key] >= size * 8
        assert seen[key]["wanted"] == 1
    del lazy
    gc.collect()
    # the futures hold the data after the LazyResult is gone
    assert sorted(k for ks in client.run(_held(keys)).values() for k in ks) == sorted(keys)
    assert [float(f.result()[0]) for f in futures] == [0.0, 1.0]
    del futures, f
    gc.collect()
    assert poll(lambda: not any(client.run(_held(keys)).values()))
    assert poll(lambda: not set(keys) & set(client.run_on_scheduler(_scheduler_keys)))


def test_a_small_result_enters_the_data_store_only_when_futures_asks(client, parts):
    lazy = parts["producer"].produce(64)
    info = lazy._info
    lazy.result()
    keys = [data_key(info.cid, r, info.call_id) for r in range(2)]
    assert 64 < DATA_BYTES
    assert not any(client.run(_held(keys)).values())  # a small result stays out of Dask's data store
    futures = lazy.futures()
    assert [f.key for f in futures] == keys
    assert sorted(k for ks in client.run(_held(keys)).values() for k in ks) == keys
    assert [f.result().tolist() for f in futures] == [[0.0] * 8, [1.0] * 8]
    # and the driver's own collect still reads the same values
    assert [a.tolist() for a in lazy()] == [[0.0] * 8, [1.0] * 8]


def test_futures_of_a_failed_rank_raise_its_error_and_the_others_their_values(client, parts):
    lazy = parts["producer"].fail_on(1)
    futures = lazy.futures()
    assert futures[0].result() == 0
    assert [f.key for f in futures] == [data_key(lazy._info.cid, r, lazy._info.call_id) for r in range(2)]
    with pytest.raises(KeyError, match="rank 1 says no"):
        futures[1].result()


# --------------------------------------------------------------------------- 2: Dask futures as arguments
def test_a_future_passed_right_after_submit_is_waited_for_without_polling(client, parts):
    consumer = parts["consumer"]
    for i in range(10):
        future = client.submit(_times_ten, i, pure=False)  # the graph may still be on its way to the scheduler
        assert consumer.take(future)() == 10 * i


def test_an_erred_future_raises_its_own_error_naming_the_key(client, parts):
    erred = client.submit(lambda: 1 / 0, pure=False)
    with pytest.raises(ZeroDivisionError) as info:
        parts["consumer"].take(erred)()
    assert erred.key in "\n".join(getattr(info.value, "__notes__", []))


def test_a_future_cancelled_while_the_call_waits_for_it_fails_the_call_quickly(client, parts):
    slow = client.submit(time.sleep, 30, pure=False)
    lazy = parts["consumer"].take(slow)
    key = slow.key

    def wanted_by(dask_scheduler, key=key):
        ts = dask_scheduler.tasks.get(key)
        return 0 if ts is None else len(ts.who_wants or ())

    assert poll(lambda: client.run_on_scheduler(wanted_by) == 2)  # the driver's client and the worker's
    start = time.monotonic()
    client.cancel(slow, force=True)
    with pytest.raises(DaskFutureError, match=r"was cancelled") as info:
        lazy.result(timeout=20)
    elapsed = time.monotonic() - start
    print(f"cancelled Dask future input failed the call after {elapsed:.2f} s")
    assert elapsed < 5
    assert key in str(info.value)
    assert isinstance(info.value, LookupError)


def _set_arrival_timeout(value):
    import dask.config

    dask.config.set({"twinkle-dask.future-arrival-timeout": value})
    return dask.config.get("twinkle-dask.future-arrival-timeout")


def test_a_future_the_scheduler_never_learns_of_fails_the_call_after_the_arrival_timeout(client, parts):
    from twinkle_dask import runtime

    address = runtime.process_session().placements["consumer"].addresses[0]
    assert client.run(_set_arrival_timeout, "1s", workers=[address])[address] == "1s"
    try:
        unknown = Future("made-up-key-that-no-graph-has", client)
        start = time.monotonic()
        with pytest.raises(DaskFutureError, match=r"made-up-key-that-no-graph-has.*unknown to the scheduler after "
                                                  r"1 s \(twinkle-dask.future-arrival-timeout\)"):
            parts["consumer"].take(unknown).result(timeout=30)
        elapsed = time.monotonic() - start
        print(f"a future unknown to the scheduler failed the call after {elapsed:.2f} s")
        assert 1.0 <= elapsed < 5
    finally:
        client.run(_set_arrival_timeout, "30s", workers=[address])


# --------------------------------------------------------------------------- 3: Dask client code in methods
def test_get_client_submit_result_inside_a_method(client, parts):
    got = parts["producer"].submit_and_wait(7)()
    assert got == [{"value": 70, "ran_here": True}] * 2


def test_worker_client_inside_a_method_gathers_tasks_on_its_own_worker(client, parts):
    got = parts["producer"].map_in_worker_client(12)()
    assert got == [[10 * i for i in range(12)]] * 2


def test_secede_and_rejoin_inside_a_method_return_at_once(client, parts):
    got = parts["producer"].secede_and_rejoin()()
    assert [g["value"] for g in got] == [40, 40]
    assert all(g["thread"].startswith("twinkle-executor") for g in got), got


# --------------------------------------------------------------------------- 4: unpickling off the loop
def test_a_slow_unpickle_of_a_lazy_call_input_leaves_the_worker_loop_answering(client, parts):
    from twinkle_dask import runtime

    # not inline and never collected by the driver: a lazy input, resolved by the consumer's worker
    lazy = parts["producer"].produce(MIB)
    consumer = parts["consumer"]
    address = runtime.process_session().placements["consumer"].addresses[0]
    assert client.run(_unpickling_state, workers=[address])[address] == "idle"
    result = consumer.size_of(lazy, SlowToUnpickle(2.0))
    assert poll(lambda: client.run(_unpickling_state, workers=[address])[address] == "running", timeout=10)
    start = time.monotonic()
    assert client.run(_one, workers=[address])[address] == 1
    answered = time.monotonic() - start
    still = client.run(_unpickling_state, workers=[address])[address]
    print(f"worker loop answered in {answered * 1000:.1f} ms while an argument was being unpickled")
    assert still == "running" and answered < 0.5
    assert result() == int(np.asarray(lazy()).size)
    assert client.run(_unpickling_state, workers=[address])[address] == "done"
