"""Colocated components: one rank's process, one call at a time, each rank's own identity and streams."""

from __future__ import annotations

import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from components import (  # noqa: E402
    Builder,
    Caller,
    Drawer,
    Echo,
    EnvWatcher,
    FirstWatcher,
    Gloo,
    Holder,
    Loader,
    Reducer,
)

from twinkle_dask import ColocationError  # noqa: E402
from twinkle_dask.testing import local_session  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def session():
    with local_session(pair=2, one=1) as client:
        yield client


def test_collectives_of_colocated_components_never_pair_with_each_other(session):
    policy = Reducer(remote_group="pair")
    reference = Reducer(remote_group="pair")
    results = []
    for _ in range(15):
        # Rank 0 of the policy arrives late; the reference's call is already on its way.
        results.append((policy.all_reduce(1.0, pause=0.05), reference.all_reduce(100.0)))
    assert [(a(), b()) for a, b in results] == [(2.0, 200.0)] * 15


def test_the_environment_is_the_running_components_for_the_whole_call(session):
    watcher = EnvWatcher(remote_group="pair")
    first = FirstWatcher(remote_group="pair")
    watching = watcher.watch(0.3)
    during = first.watch(0.0)  # issued while the watcher's call runs on rank 0
    seen = watching()
    for rank, view in enumerate(seen):
        assert view["before"] == view["after"]
        assert view["before"]["RANK"] == str(rank) and view["before"]["WORLD_SIZE"] == "2"
        assert view["before"]["CLUSTER_NAME"] == "pair"
    loader_view = during()  # one rank: the result is unwrapped
    assert loader_view["before"] == loader_view["after"]
    assert (loader_view["before"]["RANK"], loader_view["before"]["WORLD_SIZE"]) == ("0", "1")
    # each component rendezvouses on its own port; the ranks of one component share it
    assert seen[0]["before"]["MASTER_PORT"] == seen[1]["before"]["MASTER_PORT"]
    assert loader_view["before"]["MASTER_PORT"] != seen[0]["before"]["MASTER_PORT"]


def _expected_draws(seed: int, calls: int, n: int) -> dict[str, list[float]]:
    py = random.Random(seed)
    rs = np.random.RandomState(seed)
    gen = torch.Generator().manual_seed(seed)
    return {
        "random": [py.random() for _ in range(calls * n)],
        "numpy": rs.rand(calls * n).tolist(),
        "torch": [x for _ in range(calls) for x in torch.rand(n, generator=gen).tolist()],
    }


def test_each_rank_draws_what_a_process_of_its_own_would(session):
    drawer = Drawer(remote_group="pair")
    first = drawer.draw(3)()
    neighbour = Echo(remote_group="pair")  # builds (seeding) and draws in the same processes
    Loader(remote_group="pair")  # built on rank 0 only
    second = drawer.draw(3)()
    expected = _expected_draws(42, 2, 3)
    for rank in range(2):
        for stream in ("random", "numpy", "torch"):
            got = first[rank][stream] + second[rank][stream]
            assert got == pytest.approx(expected[stream], abs=0, rel=1e-7), (rank, stream)
    # The neighbour started from the seed too, not from where the drawer left the process.
    fresh = _expected_draws(42, 1, 1)
    for view in neighbour.identity()():
        assert view["init_random"] == (fresh["random"][0], fresh["numpy"][0])


def test_a_second_default_process_group_fails_at_construction_with_the_guard(session):
    gloo = Gloo(remote_group="one")
    with pytest.raises(ColocationError) as info:
        Gloo(remote_group="one")
    text = str(info.value)
    assert "Gloo.__init__ on rank 0 of group 'one'" in text
    assert "already initialized by Gloo (rank 0 of group 'one')" in text
    assert "if not dist.is_initialized()" in text
    assert isinstance(info.value, RuntimeError)
    assert "default process group twice" in "\n".join(info.value.__notes__)  # torch's own words, remotely
    assert gloo.all_reduce(1.0)() == 1.0  # the first component is unharmed


def test_a_call_to_a_component_on_the_same_worker_runs_inline(session):
    caller = Caller(remote_group="one")
    echo = Echo(remote_group="one")
    out = caller.relay(echo, 5).result(timeout=30)
    assert out["got"] == {"args": [5], "kwargs": {}}
    assert out["pid"] == echo.identity()()["pid"]


def test_arguments_are_released_when_the_call_ends(session):
    taker, checker = Holder(remote_group="one"), Holder(remote_group="one")
    before = checker.rss()()
    assert taker.take(np.ones(400 << 20, dtype=np.uint8))() == 400 << 20
    # Read by another component: nothing of the finished call is left on the worker.
    assert checker.rss()() - before < 100 << 20


def test_ranks_calling_a_component_on_each_others_workers_do_not_wait_for_each_other(session):
    caller = Caller(remote_group="pair")
    echo = Echo(remote_group="pair")  # rank 0 on the caller's rank 0 worker, rank 1 on its rank 1 worker
    out = caller.relay.options(collect="none")(echo, 7).result(timeout=30)
    assert [o["got"] for o in out] == [{"args": [7], "kwargs": {}}] * 2
    assert echo.count() == 2  # and the component's own queue carries on



def test_a_component_builds_components_in_other_groups_and_in_process_in_its_own(session):
    builder = Builder(remote_group="one")
    assert builder.build_and_call("pair").result(timeout=60) == {"local": False, "count": 2, "tag": "inner"}
    assert builder.build_and_call("one").result(timeout=60) == {"local": True, "count": None, "tag": "inner"}
