"""Calls, lazy hand-offs and errors on each kind of cluster, with the same exact values.

``processes``: the default local cluster (a worker process per rank, TCP).
``inproc``: ``initialize(processes=False)``, workers in this process over ``inproc://`` comms.
``tls``: ``LocalCluster(processes=False, protocol='tls://')`` configured only through ``dask.config``
(``distributed.comm.require-encryption`` and ``distributed.comm.tls.*``), joined with ``initialize(address=...)``.
Each kind is started once for the module.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from components import Echo
from error_components import Failer

import twinkle_dask as twinkle
from twinkle_dask import DeviceGroup, DeviceMesh
from twinkle_dask.testing import local_session, worker_stats

pytestmark = pytest.mark.timeout(120)

GROUPS = {"producer": 2, "consumer": 2}


@dataclass
class Cluster:
    kind: str
    client: Any
    dask_cluster: Any  # the SpecCluster/LocalCluster object whose scheduler runs in this process
    ports_before: set[int]  # what this process listened on before the cluster started


def _listening_ports_of_this_process() -> set[int]:
    import psutil

    return {c.laddr.port for c in psutil.Process(os.getpid()).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def _dask_ports(server: Any) -> set[int]:
    """The TCP ports a Dask server (scheduler or worker) says it listens on: its comms and its HTTP server."""
    ports = {int(listener.listen_address.rsplit(":", 1)[1]) for listener in server.listeners
             if listener.listen_address.startswith(("tcp://", "tls://"))}
    http = getattr(server, "http_server", None)
    if http is not None:
        ports |= {int(s.getsockname()[1]) for s in http._sockets.values()}
    return ports


@pytest.fixture(scope="module", params=["processes", "inproc", "tls"])
def matrix(request):
    kind = request.param
    before = _listening_ports_of_this_process()
    groups = [DeviceGroup(name=name, ranks=n, device_type="cpu") for name, n in GROUPS.items()]
    if kind in ("processes", "inproc"):
        with local_session(*groups, processes=kind == "processes") as client:
            yield Cluster(kind, client, twinkle.runtime.process_session().connection.cluster, before)
        return
    import dask
    from distributed import LocalCluster

    with dask.config.set(request.getfixturevalue("dask_tls_settings")):
        with LocalCluster(n_workers=4, processes=False, threads_per_worker=1, protocol="tls://",
                          dashboard_address=":0") as cluster:  # a free port: None would mean 8787
            client = twinkle.initialize("dask", address=cluster.scheduler_address, groups=groups)
            try:
                yield Cluster(kind, client, cluster, before)
            finally:
                twinkle.shutdown()


@pytest.fixture(scope="module")
def echoes(matrix):
    return Echo(remote_group="producer"), Echo(remote_group="consumer")


def test_addresses_and_channels_speak_the_kinds_protocol(matrix, echoes):
    workers = matrix.client.scheduler_info(n_workers=-1)["workers"]
    scheme = {"processes": "tcp://", "inproc": "inproc://", "tls": "tls://"}[matrix.kind]
    assert len(workers) == 4 and all(a.startswith(scheme) for a in workers), sorted(workers)
    assert [e.count() for e in echoes] == [2, 2]
    channels = list(twinkle.runtime.process_session().caller._channels.values())
    comm = {"processes": "TCP", "inproc": "InProc", "tls": "TLS"}[matrix.kind]
    assert [type(ch.comm).__name__ for ch in channels] == [comm] * 4
    if matrix.kind == "tls":
        assert all("cipher" in ch.comm.extra_info for ch in channels)


def test_dispatch_all_runs_every_rank_with_its_identity(matrix, echoes):
    _, consumer = echoes
    got = consumer.identity()()
    assert [(i["rank"], i["world"], i["env"]["RANK"], i["env"]["WORLD_SIZE"], i["env"]["CLUSTER_NAME"])
            for i in got] == [(0, 2, "0", "2", "consumer"), (1, 2, "1", "2", "consumer")]
    assert [i["init"]["env"]["RANK"] for i in got] == ["0", "1"]


def test_components_and_the_driver_keep_their_own_random_streams(matrix):
    def draw():
        return random.random(), float(np.random.rand())

    random.seed(42)
    np.random.seed(42)
    seeded = draw()  # what a rank draws first: every rank starts from the session's seed
    random.seed(7)
    np.random.seed(7)
    expected = [draw(), draw()]
    random.seed(7)
    np.random.seed(7)
    first = draw()
    views = Echo(remote_group="consumer").identity()()  # __init__ draws on each rank (in this process for inproc)
    assert [tuple(v["init_random"]) for v in views] == [seeded, seeded]
    _until_in_process_jobs_gave_the_process_back()
    assert [first, draw()] == expected  # the driver's streams went on where it left them


def test_slice_call_splits_the_arguments(matrix, echoes):
    producer, _ = echoes
    assert producer.recv([1, 2, 3, 4], scale=3)() == [{"args": [[1, 2]], "kwargs": {"scale": 3}},
                                                      {"args": [[3, 4]], "kwargs": {"scale": 3}}]


def test_mesh_call_slices_by_data_rank(matrix):
    echo = Echo(device_mesh=DeviceMesh.from_sizes(dp_size=2), remote_group="consumer")
    assert echo.describe(list(range(5)))() == [{"type": "list", "len": 3, "values": [0, 1, 2]},
                                               {"type": "list", "len": 2, "values": [3, 4]}]


def test_lazy_hand_off_between_groups_is_fetched_from_the_producers_worker(matrix, echoes):
    producer, consumer = echoes
    session = twinkle.runtime.process_session()
    source = session.placements["producer"].addresses[0]  # collect='first': rank 0 holds the value
    before = worker_stats()
    big = producer.big(256 * 1024)
    assert consumer.describe.options(dispatch="all")(big)() == [{"type": "ndarray", "len": 32768, "values": [0.0]}] * 2
    after = worker_stats()
    fetched = {a: (after[a]["fetches"] - before[a]["fetches"], after[a]["fetch_bytes"] - before[a]["fetch_bytes"])
               for a in after}
    fetches, nbytes = fetched.pop(source)
    assert fetches == 2 and 2 * 256 * 1024 <= nbytes < 2 * 256 * 1024 + 4096, (fetches, nbytes)  # once by each rank
    assert set(fetched.values()) == {(0, 0)}, fetched


def test_component_error_arrives_with_its_type_and_the_lowest_failed_ranks_message(matrix):
    failer = Failer(remote_group="producer")
    for failing, reverse, expected in (([0, 1], True, "rank 0 failed"), ([1], False, "rank 1 failed")):
        with pytest.raises(ValueError) as info:
            failer.fail(failing, reverse)
        assert str(info.value) == expected
        assert any(f"raised by Failer.fail on {expected.split(' failed')[0]} of group 'producer'" in note
                   for note in info.value.__notes__), info.value.__notes__
    assert failer.fail([]) == [0, 1]


def test_nothing_listens_that_dask_does_not_report(matrix):
    pytest.importorskip("psutil")
    cluster = matrix.dask_cluster
    in_process = [w for w in cluster.workers.values() if hasattr(w, "listeners")]  # Worker objects, not processes
    own = _dask_ports(cluster.scheduler)
    for worker in in_process:
        own |= _dask_ports(worker)
    assert _listening_ports_of_this_process() - matrix.ports_before == own
    if matrix.kind == "inproc":  # the comms listen in memory; only Dask's HTTP servers (/health, ...) use ports
        assert len(in_process) == 4
        assert all(listener.listen_address.startswith("inproc://")
                   for server in (cluster.scheduler, *in_process) for listener in server.listeners)
    if matrix.kind == "processes":
        assert in_process == []
        ports = matrix.client.run(_worker_ports)
        assert len(ports) == 4
        for address, (listening, reported) in ports.items():
            assert int(address.rsplit(":", 1)[1]) in reported
            assert listening == reported, (address, listening, reported)


def _until_in_process_jobs_gave_the_process_back():
    # A rank's reply can reach the driver a moment before its executor has put the driver's streams
    # and environment back; the shared lock is free once it has.
    from twinkle_dask._worker import execution as _execution

    with _execution._shared_process.lock:
        pass


def _worker_ports(dask_worker):
    return sorted(_listening_ports_of_this_process()), sorted(_dask_ports(dask_worker))
