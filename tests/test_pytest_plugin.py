"""The pytest fixtures users get with twinkle-dask: a marker and a session factory.

The tests that run pytest inside pytest (``pytester``) come last: the inner
run closes the fixtures' shared session when it ends.
"""

from __future__ import annotations

import os

import pytest
from components import Echo

import twinkle_dask as twinkle

_first: dict[str, object] = {}


@pytest.mark.twinkle(tiny=2)
def test_marker_gives_a_cluster_with_those_groups(twinkle_client):
    names = sorted(str(w["name"]) for w in twinkle_client.scheduler_info(n_workers=-1)["workers"].values())
    assert names == ["tiny-0", "tiny-1"]
    assert Echo(remote_group="tiny").count() == 2
    _first["client"] = twinkle_client


@pytest.mark.twinkle(tiny=2)
def test_same_groups_share_the_cluster(twinkle_client):
    first = twinkle_client
    assert Echo(remote_group="tiny").count() == 2
    assert twinkle.runtime.process_session().client is first


def test_a_test_in_between_initializes_its_own_session():
    assert twinkle.runtime.process_session() is None  # the marker's session is parked
    client = twinkle.initialize("dask", groups=[twinkle.DeviceGroup(name="own", ranks=1, device_type="cpu")],
                                dashboard_address=None)
    try:
        assert [str(w["name"]) for w in client.scheduler_info(n_workers=-1)["workers"].values()] == ["own-0"]
        assert Echo(remote_group="own").count() == 1
    finally:
        twinkle.shutdown()


@pytest.mark.twinkle(tiny=2)
def test_the_parked_cluster_comes_back_after_it(twinkle_client):
    assert twinkle_client is _first["client"]  # the same cluster, not a new one
    assert Echo(remote_group="tiny").count() == 2


@pytest.mark.twinkle(tiny=2, processes=False)
def test_marker_option_runs_the_workers_in_this_process(twinkle_client):
    workers = twinkle_client.scheduler_info(n_workers=-1)["workers"]
    assert sorted(str(w["name"]) for w in workers.values()) == ["tiny-0", "tiny-1"]
    assert all(a.startswith("inproc://") for a in workers), sorted(workers)
    identities = Echo(remote_group="tiny").identity()()
    assert [(i["pid"], i["rank"], i["env"]["RANK"], i["env"]["WORLD_SIZE"], i["env"]["CLUSTER_NAME"])
            for i in identities] == [(os.getpid(), 0, "0", "2", "tiny"), (os.getpid(), 1, "1", "2", "tiny")]


def test_session_factory(twinkle_session):
    with twinkle_session(other=1) as client:
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == 1
        assert Echo(remote_group="other").count() == 1


def test_marker_is_required(pytester):
    pytester.makepyfile("def test_x(twinkle_client):\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*needs @pytest.mark.twinkle*"])


def test_marker_takes_only_device_groups_as_arguments(pytester):
    pytester.makepyfile("import pytest\n"
                        "@pytest.mark.twinkle('model', tiny=1)\n"
                        "def test_x(twinkle_client):\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*takes groups as DeviceGroup(...) arguments or name=ranks keywords, got 'model'*"])


def test_a_marked_test_then_one_that_initializes_with_its_own_client(pytester):
    pytester.makepyfile(test_own_client="""
        import pytest
        from components import Echo
        from distributed import Client, LocalCluster

        import twinkle_dask as twinkle
        from twinkle_dask import DeviceGroup

        first = {}

        @pytest.mark.twinkle(tiny=2, processes=False)
        def test_marked(twinkle_client):
            first["client"] = twinkle_client
            assert Echo(remote_group="tiny").count() == 2

        def test_own_client():
            assert twinkle.runtime.process_session() is None
            with LocalCluster(n_workers=2, processes=False, threads_per_worker=1,
                              dashboard_address=":0") as cluster, Client(cluster) as client:
                assert twinkle.initialize("dask", client=client,
                                          groups=[DeviceGroup(name="own", ranks=2, device_type="cpu")]) is client
                try:
                    identities = Echo(remote_group="own").identity()()
                    assert [(i["env"]["CLUSTER_NAME"], i["env"]["RANK"]) for i in identities] == [("own", "0"),
                                                                                                  ("own", "1")]
                finally:
                    twinkle.shutdown()

        @pytest.mark.twinkle(tiny=2, processes=False)
        def test_marked_again(twinkle_client):
            assert twinkle_client is first["client"]
            assert Echo(remote_group="tiny").count() == 2
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_in_process_workers_of_simulated_gpu_groups_see_their_rotated_devices(pytester, monkeypatch):
    # As dask-cuda's LocalCUDACluster: worker k sees its own GPU(s) first, then the group's others.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("TWINKLE_GPU", raising=False)
    pytester.makepyfile(test_simulated="""
        import os

        import pytest
        from components import WorkerEnv

        from twinkle_dask import DeviceGroup
        from twinkle_dask._worker import execution as _execution

        GROUPS = (DeviceGroup(name="gpu", ranks=4, device_type="cuda"),
                  DeviceGroup(name="pair", ranks=4, device_type="cuda", gpus_per_worker=2))

        def seen(group, seconds=0.05):
            # While one rank sleeps, the other workers' calls are waiting to run in this same process.
            reads = WorkerEnv(remote_group=group).read(seconds)()
            assert all(r["init"] == r["before"] == r["after"] for r in reads), reads
            return [tuple(r["before"].values()) for r in reads]

        @pytest.mark.twinkle(*GROUPS, cpu=2, processes=False, simulate_gpus=True)
        def test_rotated(twinkle_client):
            assert all(a.startswith("inproc://") for a in twinkle_client.scheduler_info(n_workers=-1)["workers"])
            assert seen("gpu") == [("0,1,2,3", "simulated", "gpu", "0", "0"),
                                   ("1,2,3,0", "simulated", "gpu", "1", "1"),
                                   ("2,3,0,1", "simulated", "gpu", "2", "2"),
                                   ("3,0,1,2", "simulated", "gpu", "3", "3")]
            # The second GPU group has the next four devices; two per worker.
            assert seen("pair") == [("4,5,6,7", "simulated", "pair", "0", "0"),
                                    ("6,7,4,5", "simulated", "pair", "1", "1")]
            assert seen("cpu") == [(None, None, "cpu", "0", "0"), (None, None, "cpu", "1", "1")]
            # Between jobs the process's environment is the driver's again, whatever ran last (a reply
            # can arrive a moment before its executor put it back; the shared lock is free once it has).
            with _execution._shared_process.lock:
                pass
            assert [os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "TWINKLE_GPU", "TWINKLE_GROUP", "RANK")] == \\
                [None, None, None, None]
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
