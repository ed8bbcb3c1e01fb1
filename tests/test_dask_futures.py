"""Futures both ways: lazy results handed to Dask, Dask futures handed to components (values asserted)."""

from __future__ import annotations

import gc
import time

import dask
import numpy as np
import pytest
from components import Echo, make_data
from dask.utils import key_split
from distributed import Future, as_completed, futures_of, progress, wait
from waiting import poll

from twinkle_dask import LazyResult
from twinkle_dask._worker.store import data_key
from twinkle_dask.testing import worker_stats

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20


def _total(name):
    return sum(s[name] for s in worker_stats().values())



@pytest.fixture(scope="module")
def parts(cluster):
    return {"producer": Echo(remote_group="model"), "consumer": Echo(remote_group="sampler")}


@pytest.fixture
def driver_gathers(cluster, monkeypatch):
    """The keys the driver's client gathers (values that come to the driver through Dask)."""
    seen = []
    real = cluster._gather

    async def spy(futures, *args, **kwargs):
        seen.extend(f.key for f in futures_of(futures))
        return await real(futures, *args, **kwargs)

    monkeypatch.setattr(cluster, "_gather", spy)
    return seen


def _arrays(lazy):
    """The per-rank results of ``producer.big``: rank r's array is full of r."""
    return [np.full(MIB // 8, float(r)) for r in range(len(lazy._info.ranks))]


def test_futures_gives_each_ranks_result_on_its_own_worker(cluster, parts):
    lazy = parts["producer"].produce("list")
    futures = lazy.futures()
    assert [type(f) for f in futures] == [Future] * 4
    assert lazy.futures() == futures  # registered once
    # no copy: each future's key is the one the kept result has in its worker's data store
    assert [f.key for f in futures] == [data_key(lazy._info.cid, r, lazy._info.call_id) for r in range(4)]
    assert {key_split(f.key) for f in futures} == {f"twinkle-{lazy._info.group}-Echo"}  # grouped on the dashboard
    assert cluster.gather(futures) == [make_data("list", r) for r in range(4)]
    who_has = cluster.who_has(futures)
    for f, address in zip(futures, lazy._info.addresses):
        assert address in who_has[f.key]


def test_registration_is_only_on_request(cluster, parts):
    before = set(cluster.who_has())
    lazy = parts["producer"].produce("list")
    assert lazy() == [make_data("list", r) for r in range(4)]
    assert set(cluster.who_has()) <= before
    assert lazy._dask is None


def test_futures_keep_the_data_after_the_lazy_result_is_gone_and_release_frees_it(cluster, parts):
    lazy = parts["producer"].big.options(collect="none")(MIB)
    expected = _arrays(lazy)
    futures = lazy.futures()
    wait(futures)
    keys = [f.key for f in futures]
    del lazy
    gc.collect()
    assert poll(lambda: _total("held") == 0), worker_stats()  # the kept results went with the LazyResult
    for f, e in zip(futures, expected):
        np.testing.assert_array_equal(f.result(), e)

    def held_keys(dask_worker, keys=tuple(keys)):
        return [k for k in keys if k in dask_worker.data]

    assert sorted(k for ks in cluster.run(held_keys).values() for k in ks) == sorted(keys)
    del futures, f
    gc.collect()
    assert poll(lambda: not any(cluster.run(held_keys).values()))
    assert not set(keys) & set(cluster.who_has())


def test_futures_of_a_call_still_running_wait_for_it_and_outlive_the_lazy_result(cluster, parts):
    lazy = parts["consumer"].sleep(0.5)
    start = time.monotonic()
    futures = lazy.futures()
    assert time.monotonic() - start >= 0.4  # waited for the call
    assert [f.status for f in futures] == ["finished", "finished"]
    del lazy
    gc.collect()
    assert cluster.gather(futures) == [0.5, 0.5]
    del futures
    gc.collect()
    assert poll(lambda: _total("held") == 0), worker_stats()


def test_submit_on_a_lazy_result_gets_the_collected_value_never_through_the_driver(cluster, parts, driver_gathers):
    lazy = parts["producer"].big.options(collect="flatten")(MIB)
    fetched = _total("fetch_bytes")
    total = cluster.submit(np.sum, lazy).result()
    assert total == sum(r * (MIB // 8) for r in range(4))
    assert cluster.submit(len, lazy).result() == 4 * (MIB // 8)
    # the collecting task fetched the ranks' results worker to worker (one rank's may be read in place),
    # each once; no rank's value reached the driver, only the small sums gathered by the driver
    moved = _total("fetch_bytes") - fetched
    assert 3 * MIB <= moved <= 4 * MIB + 4096
    assert not any(o.has_value for o in lazy._outcomes)
    assert lazy._dask.ranks is None  # no per-rank registration unless futures() is asked for
    assert lazy.key not in driver_gathers
    assert lazy.key in cluster.who_has()


def test_submit_after_futures_reads_the_rank_futures_without_any_twinkle_fetch(cluster, parts, driver_gathers):
    lazy = parts["producer"].big.options(collect="flatten")(MIB)
    rank_keys = {f.key for f in lazy.futures()}
    fetched = _total("fetch_bytes")
    assert cluster.submit(np.sum, lazy).result() == sum(r * (MIB // 8) for r in range(4))
    assert _total("fetch_bytes") == fetched  # Dask moved the rank data itself
    assert not rank_keys & set(driver_gathers) and lazy.key not in driver_gathers


def test_map_submits_one_task_per_lazy_result(cluster, parts):
    a = parts["producer"].produce.options(collect="flatten")("list")
    b = parts["consumer"].produce.options(collect="flatten")("list")
    expected = [len(sum((make_data("list", r) for r in range(n)), [])) for n in (4, 2)]
    assert cluster.gather(cluster.map(len, [a, b])) == expected


def test_delayed_on_a_lazy_result_and_nested_in_a_dict(cluster, parts, driver_gathers):
    lazy = parts["producer"].produce.options(collect="flatten")("list")
    flat = sum((make_data("list", r) for r in range(4)), [])
    assert dask.delayed(sum)(lazy).compute() == sum(flat)
    assert dask.delayed(lambda d: d["x"][::-1])({"x": lazy}).compute() == flat[::-1]
    # only the delayed calls' own results came to the driver
    assert not ({f.key for f in lazy.futures()} | {lazy.key}) & set(driver_gathers)
    assert len(driver_gathers) == 2


def test_gather_compute_wait_futures_of_as_completed_progress(cluster, parts, capsys):
    lazy = parts["producer"].produce("ndarray")
    expected = [make_data("ndarray", r) for r in range(4)]
    done, not_done = wait(lazy)
    assert done == {lazy} and not not_done
    assert futures_of(lazy) == [lazy] and futures_of({"a": [lazy]}) == [lazy]
    gathered = cluster.gather(lazy)
    assert [a.tolist() for a in gathered] == [a.tolist() for a in expected]
    assert [a.tolist() for a in cluster.gather({"k": [lazy]})["k"][0]] == [a.tolist() for a in expected]
    computed = cluster.compute(lazy)
    assert isinstance(computed, Future)
    assert [a.tolist() for a in computed.result()] == [a.tolist() for a in expected]
    assert [f is lazy for f in as_completed([lazy])] == [True]
    (computed_here,) = dask.compute(lazy)
    assert [a.tolist() for a in computed_here] == [a.tolist() for a in expected]
    persisted = cluster.persist(lazy)
    assert isinstance(persisted, Future) and persisted.key == lazy.key
    assert [a.tolist() for a in persisted.result()] == [a.tolist() for a in expected]
    progress(lazy)
    assert "100% Completed" in capsys.readouterr().out
    # the value a Dask task collected is the one the driver collects
    assert [a.tolist() for a in lazy()] == [a.tolist() for a in expected]


def test_a_failed_rank_fails_its_future_and_the_dask_tasks_fed_by_it(cluster, parts):
    lazy = parts["producer"].fail_on(2)
    futures = lazy.futures()
    assert cluster.gather(futures[:2]) == [0, 1]
    with pytest.raises(KeyError, match="rank 2 says no"):
        futures[2].result()
    with pytest.raises(KeyError, match="rank 2 says no"):
        cluster.submit(len, lazy).result()
    wait(lazy)
    assert lazy.status == "error"


def test_dask_future_nested_in_a_dict_arrives_as_its_value_fetched_by_the_worker(cluster, parts, driver_gathers):
    data_worker = runtime_addresses("data")[0]
    submitted = cluster.submit(np.arange, 10, workers=[data_worker], pure=False)
    scattered = cluster.scatter({"s": [1, 2, 3]}, workers=[data_worker])["s"]
    wait([submitted, scattered])
    fetches = _total("dask_fetches")
    got = parts["consumer"].record({"a": {"b": [submitted]}, "c": (scattered, 7)})()
    assert len(got) == 2
    for item in got:
        assert list(item) == ["a", "c"]
        np.testing.assert_array_equal(item["a"]["b"][0], np.arange(10))
        assert item["c"] == ([1, 2, 3], 7)
    # each of the two consumer ranks fetched both values from the data worker; the driver fetched none
    assert _total("dask_fetches") - fetches == 4
    assert not {submitted.key, scattered.key} & set(driver_gathers)


def test_persisted_and_lazy_dask_collections_arrive_as_their_values(cluster, parts):
    persisted = cluster.persist(dask.delayed(np.arange)(5))
    wait(futures_of(persisted))
    later = dask.delayed(sum)([1, 2, 3])
    got = parts["consumer"].record({"p": persisted, "l": [later]})()
    assert [(g["p"].tolist(), g["l"]) for g in got] == [([0, 1, 2, 3, 4], [6])] * 2


def test_copying_a_lazy_result_registers_nothing(cluster, parts):
    import copy

    lazy = parts["producer"].produce("list")
    assert copy.copy(lazy) is lazy and copy.deepcopy({"k": lazy})["k"] is lazy
    assert lazy._dask is None


def test_a_future_still_running_is_waited_for_and_held_until_the_call_ends(cluster, parts):
    consumer = parts["consumer"]
    slow = cluster.submit(lambda: (time.sleep(0.5), "late")[1], pure=False)
    key = slow.key

    def known(dask_scheduler, key=key):
        return key in dask_scheduler.tasks

    assert poll(lambda: cluster.run_on_scheduler(known))
    consumer.sleep(0.5)  # the next call waits behind this one
    lazy = consumer.record({"v": slow})
    del slow
    gc.collect()
    assert cluster.run_on_scheduler(known)  # the call holds the future
    assert lazy() == [{"v": "late"}, {"v": "late"}]
    del lazy
    gc.collect()
    assert poll(lambda: not cluster.run_on_scheduler(known))


def test_a_dask_future_inside_a_sliced_argument_is_dispatched_on_the_worker(cluster, parts):
    listed = cluster.submit(lambda: [10, 20, 30, 40], pure=False)
    got = parts["consumer"].recv.options(collect="none")(listed)()
    assert [r["args"] for r in got] == [[[10, 20]], [[30, 40]]]


def test_a_lazy_result_hidden_in_an_object_says_what_to_pass_instead(cluster, parts):
    lazy = parts["producer"].produce("list")
    with pytest.raises(TypeError, match=r"Echo\.produce") as info:
        parts["consumer"].record(Holder(lazy))
    assert "lazy.futures()" in str(info.value) and "lazy.result()" in str(info.value)


def test_an_erred_future_fails_the_call_with_its_error(cluster, parts):
    erred = cluster.submit(lambda: 1 / 0, pure=False)
    with pytest.raises(ZeroDivisionError):
        parts["consumer"].record(erred)()


class Holder:
    """An object the argument walk does not look into."""

    def __init__(self, value):
        self.value = value


def runtime_addresses(group):
    from twinkle_dask import runtime

    return list(runtime.process_session().placements[group].addresses)


def test_lazy_result_is_a_future_subclass():
    assert issubclass(LazyResult, Future)


@pytest.mark.timeout(180)
def test_readme_dask_example_runs_and_prints_what_it_says(tmp_path):
    import pathlib
    import re
    import subprocess
    import sys

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    quickstart = blocks[0].replace("twinkle.initialize('dask', groups=[",
                                   "twinkle.initialize('dask', dashboard_address=None, groups=[")
    example = next(b for b in blocks if "client.submit(" in b)
    script = tmp_path / "dask_example.py"
    script.write_text(quickstart.replace("twinkle.shutdown()", "") + "\n" + example + "\ntwinkle.shutdown()\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-2:] == ["28.0", "[[0, 1, 2, 3, 4, 5, 6, 7]]"]


def test_class_balance_weights_of_the_main_job():
    import torch

    from twinkle_dask.examples.train import class_balance_weights

    weights = class_balance_weights({"y": torch.tensor([0, 0, 1, 3])})
    assert weights.tolist() == [0.5, 0.5, 1.0, 1.0]
