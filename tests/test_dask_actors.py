"""Components are Dask actors in the scheduler's eyes; component code and Dask tasks use each other.

Most tests run on a plain ``distributed.LocalCluster`` (in-process workers, so
it can ``adapt``) given to ``initialize(client=...)``; the last ones use the
project's local cluster, whose workers are processes of their own.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pathlib
import random
import subprocess
import sys
import time

import pytest
from actor_components import DaskUser, Nester, call_in_task, many_keys

import twinkle_dask as twinkle
from twinkle_dask import DeviceGroup
from twinkle_dask.group import _state
from twinkle_dask.testing import local_session

pytestmark = pytest.mark.timeout(120)

TESTS = pathlib.Path(__file__).resolve().parent


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    """Poll ``condition`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def dask_cluster(n_workers: int, ranks: int, **options):
    """A LocalCluster of in-process workers, with twinkle initialized on it (group 'g' of ``ranks`` ranks)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=n_workers, processes=False, threads_per_worker=1, dashboard_address=":0",
                      **options) as cluster, Client(cluster) as client:
        twinkle.initialize("dask", client=client, groups=[DeviceGroup(name="g", ranks=ranks, device_type="cpu")])
        try:
            yield cluster, client
        finally:
            twinkle.shutdown()


def who_has(client, futures) -> dict[str, list[str]]:
    return {k: list(v) for k, v in client.who_has(futures).items()}


def scheduler_tasks(client) -> set[str]:
    return set(client.run_on_scheduler(lambda dask_scheduler: [str(k) for k in dask_scheduler.tasks]))


def scheduler_actors(client) -> dict[str, list[str]]:
    """The scheduler's actors, by worker (``WorkerState.actors``)."""
    def actors(dask_scheduler):
        return {a: sorted(str(ts.key) for ts in ws.actors) for a, ws in dask_scheduler.workers.items()}

    return client.run_on_scheduler(actors)


def worker_actors(client) -> dict[str, list[str]]:
    """The actor instances each worker holds."""
    return client.run(lambda dask_worker: sorted(str(k) for k in dask_worker.state.actors))


def test_every_rank_is_an_actor_on_its_worker_until_closed():
    with dask_cluster(3, 2) as (_, client):
        user = DaskUser(1, remote_group="g")
        ref = _state(user)
        keys = [f"DaskUser-{ref.cid}-{rank}" for rank in range(2)]
        futures = twinkle.component_actors(user)
        assert [f.key for f in futures] == keys
        assert who_has(client, futures) == {keys[0]: [ref.addresses[0]], keys[1]: [ref.addresses[1]]}
        has_what = client.has_what()
        assert [k for k in has_what[ref.addresses[0]] if k in keys] == [keys[0]]
        assert [k for k in has_what[ref.addresses[1]] if k in keys] == [keys[1]]
        idle = next(a for a in has_what if a not in ref.addresses)
        assert scheduler_actors(client) == {ref.addresses[0]: [keys[0]], ref.addresses[1]: [keys[1]], idle: []}
        states = client.run_on_scheduler(
            lambda dask_scheduler: {k: (dask_scheduler.tasks[k].state, dask_scheduler.tasks[k].actor,
                                        dask_scheduler.tasks[k].type) for k in keys})
        assert states == {k: ("memory", True, "twinkle_dask.actors.ComponentActor") for k in keys}
        assert [f.result().describe().result() for f in futures] == [
            {"component": "DaskUser", "cid": ref.cid, "rank": r, "group": "g", "address": ref.addresses[r],
             "open": True} for r in range(2)
        ]

        twinkle.close_component(user)
        assert twinkle.component_actors(user) == []
        del futures
        # The actor proxies made by f.result() above hold futures of the keys in reference cycles (their
        # ActorFutures): collected, nothing of this test holds the keys any more.
        wait_for(lambda: gc.collect() >= 0 and not scheduler_tasks(client) & set(keys),
                 what="the scheduler to forget the actors")
        wait_for(lambda: all(v == [] for v in worker_actors(client).values()), what="the workers to drop them")
        assert scheduler_actors(client) == {ref.addresses[0]: [], ref.addresses[1]: [], idle: []}


def test_retire_workers_and_workers_to_close_leave_component_workers_alone():
    with dask_cluster(3, 2) as (_, client):
        user = DaskUser(2, remote_group="g")
        held = list(_state(user).addresses)
        (idle,) = [a for a in client.scheduler_info()["workers"] if a not in held]

        def to_close(**kwargs):
            return client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.workers_to_close(**kwargs))

        assert to_close() == [idle]
        assert to_close(n=3) == [idle]
        assert to_close(target=0) == [idle]

        assert client.retire_workers(held) == {}
        assert sorted(client.scheduler_info()["workers"]) == sorted([*held, idle])
        assert user.add([1, 2])() == [3, 4, 3, 4]

        assert sorted(client.retire_workers([*held, idle])) == [idle]
        wait_for(lambda: sorted(client.scheduler_info()["workers"]) == sorted(held), what="the idle worker to retire")
        assert user.add([5])() == [7, 7]


def test_adapt_to_zero_keeps_the_component_workers():
    # Two ranks on three workers: Dask alone would keep one worker holding data and close the rest.
    with dask_cluster(3, 2) as (cluster, client):
        user = DaskUser(3, remote_group="g")
        held = sorted(_state(user).addresses)
        # Adaptive rounds run when the test says so (interval of an hour), each one complete.
        adaptive = cluster.adapt(minimum=0, maximum=3, interval="1h", wait_count=1)
        cluster.sync(adaptive.adapt)
        wait_for(lambda: sorted(client.scheduler_info()["workers"]) == held, what="adapt to close the idle worker")
        assert [entry["status"] for _, entry in adaptive.log] == ["down"]
        for _ in range(3):  # more rounds with nothing to do: the component's workers stay
            cluster.sync(adaptive.adapt)
        assert [entry["status"] for _, entry in adaptive.log] == ["down"]
        assert sorted(client.scheduler_info()["workers"]) == held
        assert user.add([10, 20])() == [13, 23, 13, 23]
        adaptive.stop()


def test_restart_and_shutdown_release_the_actor_keys():
    with dask_cluster(2, 2) as (_, client):
        user = DaskUser(0, remote_group="g")
        old = {f.key for f in twinkle.component_actors(user)}
        user.restart()
        new = {f.key for f in twinkle.component_actors(user)}
        assert len(new) == 2 and not new & old
        wait_for(lambda: not scheduler_tasks(client) & old, what="the old actors to be forgotten")
        assert scheduler_tasks(client) >= new
        assert user.add([1])() == [1, 1]

        twinkle.shutdown()  # the client is the test's: it stays, the keys go
        wait_for(lambda: not scheduler_tasks(client) & new, what="shutdown to release the actors")
        wait_for(lambda: all(v == [] for v in worker_actors(client).values()), what="the workers to drop them")


def test_a_component_built_by_component_code_is_an_actor_too():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, processes=False, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        twinkle.initialize("dask", client=client, groups=[DeviceGroup(name="outer", ranks=1, device_type="cpu"),
                                                          DeviceGroup(name="inner", ranks=1, device_type="cpu")])
        try:
            nester = Nester(remote_group="outer")
            built = nester.build("inner")()
            assert built["sums"] == [2]
            (key,) = built["keys"]
            (inner,) = twinkle.runtime.process_session().placement("inner").addresses
            assert key.startswith("DaskUser-inner-DaskUser-")
            assert scheduler_actors(client)[inner] == [key]
            assert nester.close_child()() == []
            wait_for(lambda: key not in scheduler_tasks(client), what="the inner component's actor to go")
            assert scheduler_actors(client)[inner] == []
        finally:
            twinkle.shutdown()


def test_get_client_and_get_worker_inside_component_methods():
    with dask_cluster(3, 2) as (_, client):
        user = DaskUser(5, remote_group="g")
        assert [w["worker"] for w in user.where()()] == list(_state(user).addresses)
        assert user.square_on_dask(3)() == [64, 64]


def test_a_handle_passed_into_a_dask_task_calls_its_component():
    with dask_cluster(3, 2) as (_, client):
        user = DaskUser(10, remote_group="g")
        addresses = list(_state(user).addresses)
        idle = next(a for a in client.scheduler_info()["workers"] if a not in addresses)
        for where in (idle, addresses[0]):  # another worker, and the worker of rank 0 itself
            got = client.submit(call_in_task, user, [1, 2], workers=[where], pure=False).result(timeout=60)
            assert got == {"task_worker": where, "sums": [11, 12, 11, 12], "type": "list"}
        twinkle.close_component(user)
        with pytest.raises(twinkle.ComponentClosedError, match="it was closed"):
            client.submit(call_in_task, user, [1], workers=[idle], pure=False).result(timeout=60)


@pytest.fixture(scope="module")
def processes():
    """The project's local cluster: workers are processes of their own, comms are tcp."""
    with local_session(g=2, other=1) as client:
        yield client


def test_process_workers_get_client_and_handles_in_tasks(processes):
    client = processes
    user = DaskUser(4, remote_group="g")
    addresses = list(_state(user).addresses)
    assert [w["worker"] for w in user.where()()] == addresses
    assert len({w["pid"] for w in user.where()()} | {os.getpid()}) == 3
    assert user.square_on_dask(2)() == [36, 36]
    (other,) = twinkle.runtime.process_session().placement("other").addresses
    got = client.submit(call_in_task, user, [7], workers=[other], pure=False).result(timeout=60)
    assert got == {"task_worker": other, "sums": [11, 11], "type": "list"}
    futures = twinkle.component_actors(user)
    assert who_has(client, futures) == {f"DaskUser-{_state(user).cid}-{r}": [a] for r, a in enumerate(addresses)}
    keys = {f.key for f in futures}
    del futures
    twinkle.close_component(user)
    wait_for(lambda: not scheduler_tasks(client) & keys, what="the scheduler to forget the actors")


def test_dask_traffic_on_a_worker_leaves_the_ranks_random_streams_alone(processes):
    # Every rank draws what a process of its own seeded with the session's seed (42) would draw,
    # although its actor was created and Dask tasks ran and reported back on its worker meanwhile.
    client = processes
    user = DaskUser(0, remote_group="g")
    for address in _state(user).addresses:
        client.submit(many_keys, 50, workers=[address], pure=False).result(timeout=60)
    expected = random.Random(42)
    first = [expected.random() for _ in range(3)]
    assert user.draw(3)() == [first, first]
    twinkle.close_component(user)


DRIVER = """
import os, sys
import twinkle_dask as twinkle
from twinkle_dask import DeviceGroup
from actor_components import DaskUser

twinkle.initialize("dask", address=sys.argv[1], groups=[DeviceGroup(name="g", ranks=2, device_type="cpu")])
user = DaskUser(1, remote_group="g")
assert user.add([1])() == [2, 2]
print(" ".join(f.key for f in twinkle.component_actors(user)), flush=True)
os._exit(0)  # no shutdown: the process just ends
"""


def test_actor_keys_go_when_the_driver_exits_without_shutdown():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, processes=False, threads_per_worker=1, dashboard_address=":0",
                      protocol="tcp", host="127.0.0.1") as cluster, Client(cluster) as client:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]))
        out = subprocess.run([sys.executable, "-c", DRIVER, cluster.scheduler_address], env=env, timeout=90,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        keys = set(out.stdout.split())
        assert len(keys) == 2 and all(k.startswith("DaskUser-g-DaskUser-") for k in keys)
        wait_for(lambda: not scheduler_tasks(client) & keys, what="the scheduler to forget the driver's actors")
        wait_for(lambda: all(v == [] for v in worker_actors(client).values()), what="the workers to drop them")
        hosts = client.run(lambda dask_worker: len(dask_worker.extensions["twinkle"].hosts))
        wait_for(lambda: set(client.run(lambda dask_worker: len(dask_worker.extensions["twinkle"].hosts)).values())
                 == {0}, what="the workers to close the driver's components")
        assert len(hosts) == 2
