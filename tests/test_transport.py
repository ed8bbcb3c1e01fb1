"""Calls and hand-offs ride Dask's own comms: inproc, TLS from dask.config, no listener of our own."""

from __future__ import annotations

import os

import numpy as np
import pytest
from components import Echo

import twinkle_dask as twinkle
from twinkle_dask import DeviceGroup

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _no_session_leaks():
    yield
    twinkle.shutdown()


def _comm_kinds(dask_worker):
    ext = dask_worker.extensions["twinkle"]
    return sorted(type(ch.comm).__name__ for ch in ext.caller._channels.values())


def test_in_process_cluster_calls_and_hands_off_over_inproc_comms():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, processes=False, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        twinkle.initialize("dask", client=client, groups=[DeviceGroup(name="producer", ranks=1, device_type="cpu"),
                                                          DeviceGroup(name="consumer", ranks=1, device_type="cpu")])
        session = twinkle.runtime.process_session()
        addresses = [a for p in session.placements.values() for a in p.addresses]
        assert len(addresses) == 2 and all(a.startswith("inproc://") for a in addresses), addresses

        producer = Echo(remote_group="producer")
        consumer = Echo(remote_group="consumer")
        assert producer.recv([1, 2])() == {"args": [[1, 2]], "kwargs": {}}
        big = producer.big(256 * 1024)  # stays on the producer: the consumer fetches it itself
        assert consumer.describe.options(dispatch="all")(big)() == {"type": "ndarray", "len": 32768, "values": [0.0]}
        assert sorted(type(ch.comm).__name__ for ch in session.caller._channels.values()) == ["InProc", "InProc"]
        kinds = client.run(_comm_kinds, workers=list(session.placements["consumer"].addresses))
        assert list(kinds.values()) == [["InProc"]]

        # In one process the comm hands over objects, not bytes: values must still be copies.
        sent = np.arange(2048, dtype=np.float64)  # 16 KiB: an out-of-band buffer
        got = producer.recv(sent)()["args"][0]
        assert isinstance(got, np.ndarray) and np.array_equal(got, sent)
        assert not np.shares_memory(got, sent)
        sent[0] = -1.0
        assert got[0] == 0.0


def test_tls_configured_only_through_dask_config(dask_tls_settings):
    import dask
    from distributed import LocalCluster

    with dask.config.set(dask_tls_settings):
        with LocalCluster(n_workers=2, processes=False, threads_per_worker=1, protocol="tls://",
                          dashboard_address=None) as cluster:
            assert cluster.scheduler_address.startswith("tls://")
            client = twinkle.initialize("dask", address=cluster.scheduler_address,
                                        groups=[DeviceGroup(name="producer", ranks=1, device_type="cpu"),
                                                DeviceGroup(name="consumer", ranks=1, device_type="cpu")])
            session = twinkle.runtime.process_session()
            producer = Echo(remote_group="producer")
            consumer = Echo(remote_group="consumer")
            assert producer.recv([5, 6])() == {"args": [[5, 6]], "kwargs": {}}
            big = producer.big(256 * 1024)
            described = consumer.describe.options(dispatch="all")(big)()
            assert described == {"type": "ndarray", "len": 32768, "values": [0.0]}
            channels = list(session.caller._channels.values())
            assert len(channels) == 2 and all("cipher" in ch.comm.extra_info for ch in channels)
            encrypted = client.run(
                lambda dask_worker: ["cipher" in ch.comm.extra_info
                                     for ch in dask_worker.extensions["twinkle"].caller._channels.values()],
                workers=list(session.placements["consumer"].addresses),
            )
            assert list(encrypted.values()) == [[True]]
            twinkle.shutdown()


def _listening_ports(dask_worker):
    import psutil

    own = {int(listener.listen_address.rsplit(":", 1)[1]) for listener in dask_worker.listeners}
    http = dask_worker.http_server
    if http is not None:
        own |= {int(port) for port in (s.getsockname()[1] for s in http._sockets.values())}
    conns = psutil.Process(os.getpid()).net_connections(kind="inet")
    listening = {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}
    return sorted(listening), sorted(own)


def test_workers_listen_only_on_dasks_own_ports():
    pytest.importorskip("psutil")
    from twinkle_dask.testing import local_session

    with local_session(producer=1, consumer=1) as client:
        producer = Echo(remote_group="producer")
        consumer = Echo(remote_group="consumer")
        big = producer.big(256 * 1024)
        assert consumer.describe.options(dispatch="all")(big)() == {"type": "ndarray", "len": 32768, "values": [0.0]}
        ports = client.run(_listening_ports)
        assert len(ports) == 2
        for address, (listening, own) in ports.items():
            assert int(address.rsplit(":", 1)[1]) in own
            assert listening == own, (address, listening, own)


def _transports(dask_worker):
    ext = dask_worker.extensions["twinkle"]
    return sorted((type(ch.comm).__name__, ch.transport) for ch in ext.caller._channels.values())


def _set_take(take):
    import dask

    dask.config.set({"twinkle-dask.comm.take-tcp-socket": take})  # this worker process's setting


@pytest.mark.parametrize("take", [True, False])
def test_tcp_channels_run_the_socket_dask_connected_unless_configured_not_to(take):
    import dask

    from twinkle_dask.testing import local_session

    with dask.config.set({"twinkle-dask.comm.take-tcp-socket": take}), \
            local_session(producer=1, consumer=1) as client:
        session = twinkle.runtime.process_session()
        client.run(_set_take, take)
        producer = Echo(remote_group="producer")
        consumer = Echo(remote_group="consumer")
        assert producer.recv([3, 4])() == {"args": [[3, 4]], "kwargs": {}}
        big = producer.big(4 * 1024 * 1024)  # 4 MiB: large frames on the stream
        assert consumer.describe.options(dispatch="all")(big)() == {"type": "ndarray", "len": 524288, "values": [0.0]}
        expected = "socket" if take else "comm"
        assert sorted((type(ch.comm).__name__, ch.transport) for ch in session.caller._channels.values()) == [
            ("TCP", expected), ("TCP", expected)]
        kinds = client.run(_transports, workers=list(session.placements["consumer"].addresses))
        assert list(kinds.values()) == [[("TCP", expected)]]
        # Many calls in flight on one channel come back in order with their own values.
        lazies = [producer.recv.options(lazy_collect=True)(i) for i in range(200)]
        assert [lazy()["args"][0] for lazy in lazies] == list(range(200))


def test_ucx_cluster_calls_and_hands_off_over_ucx_comms():
    why = "UCX comms need ucxx and distributed-ucxx (pip install distributed-ucxx-cu12)"
    pytest.importorskip("ucxx", reason=why)
    pytest.importorskip("distributed_ucxx", reason=why)
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, processes=False, threads_per_worker=1, protocol="ucx://",
                      dashboard_address=":0") as cluster:
        assert cluster.scheduler_address.startswith("ucx://")
        twinkle.initialize("dask", address=cluster.scheduler_address,
                           groups=[DeviceGroup(name="producer", ranks=1, device_type="cpu"),
                                   DeviceGroup(name="consumer", ranks=1, device_type="cpu")])
        session = twinkle.runtime.process_session()
        producer = Echo(remote_group="producer")
        consumer = Echo(remote_group="consumer")
        assert producer.recv([7, 8])() == {"args": [[7, 8]], "kwargs": {}}
        big = producer.big(256 * 1024)  # stays on the producer: the consumer fetches it over UCX itself
        assert consumer.describe.options(dispatch="all")(big)() == {"type": "ndarray", "len": 32768, "values": [0.0]}
        peers = [ch.comm.peer_address for ch in session.caller._channels.values()]
        assert len(peers) == 2 and all(p.startswith("ucx://") for p in peers), peers
        twinkle.shutdown()
