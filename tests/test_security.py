"""TLS: initialize(address=..., security=...) against a scheduler with certificates made here."""

from __future__ import annotations

import os

import pytest
from components import Echo

import twinkle_dask as twinkle
from twinkle_dask import DeviceGroup

pytestmark = pytest.mark.timeout(120)


def test_tls_cluster_end_to_end():
    pytest.importorskip("cryptography")
    from distributed import LocalCluster, Security

    security = Security.temporary()  # a self-signed CA and certificate, in memory
    with LocalCluster(n_workers=2, processes=False, threads_per_worker=1, security=security,
                      protocol="tls://", dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        twinkle.initialize("dask", address=cluster.scheduler_address, security=security,
                           groups=[DeviceGroup(name="secure", ranks=2, device_type="cpu")])
        try:
            echo = Echo(remote_group="secure")
            assert echo.recv([1, 2, 3, 4])() == [{"args": [[1, 2]], "kwargs": {}},
                                                 {"args": [[3, 4]], "kwargs": {}}]
            session = twinkle.runtime.process_session()
            channels = list(session.caller._channels.values())
            assert channels and all(
                "cipher" in ch.comm.extra_info for ch in channels
            ), "twinkle channels must be encrypted too"
        finally:
            twinkle.shutdown()
        # In-process workers ran the component in this process; its identity must not stay behind.
        assert "WORLD_SIZE" not in os.environ and "RANK" not in os.environ


def test_tls_scheduler_without_security_is_a_clear_error():
    pytest.importorskip("cryptography")
    from distributed import LocalCluster, Security

    with LocalCluster(n_workers=1, processes=False, threads_per_worker=1, security=Security.temporary(),
                      protocol="tls://", dashboard_address=None) as cluster:
        with pytest.raises(ValueError, match="speaks TLS: pass security=distributed.Security"):
            twinkle.initialize("dask", address=cluster.scheduler_address,
                               groups=[DeviceGroup(name="g", ranks=1, device_type="cpu")])
        twinkle.shutdown()


def _worker_channels_encrypted(dask_worker):
    ext = dask_worker.extensions["twinkle"]
    return ["cipher" in ch.comm.extra_info for ch in ext.caller._channels.values()]


@pytest.mark.parametrize("make_security", ["temporary", "true"])
def test_local_cluster_with_security_speaks_tls_everywhere(make_security):
    pytest.importorskip("cryptography")
    import stat

    from distributed import Security

    from twinkle_dask.testing import local_session

    security = Security.temporary() if make_security == "temporary" else True
    with local_session(producer=2, consumer=2, security=security) as client:
        assert client.scheduler.address.startswith("tls://")
        workers = client.scheduler_info(n_workers=-1)["workers"]
        assert len(workers) == 4 and all(a.startswith("tls://") for a in workers)
        session = twinkle.runtime.process_session()
        folder = session.connection.tls_dir.name
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        assert {stat.S_IMODE(os.stat(os.path.join(folder, f)).st_mode) for f in os.listdir(folder)} == {0o600}

        producer = Echo(remote_group="producer")
        consumer = Echo(remote_group="consumer")
        assert producer.recv([1, 2, 3, 4])() == [{"args": [[1, 2]], "kwargs": {}},
                                                 {"args": [[3, 4]], "kwargs": {}}]
        big = producer.big(256 * 1024)  # kept on the producer's worker: the consumers fetch it themselves
        got = consumer.describe.options(dispatch="all")(big)()
        assert got == [{"type": "ndarray", "len": 32768, "values": [0.0]}] * 2
        driver_channels = list(session.caller._channels.values())
        assert driver_channels and all(
            "cipher" in ch.comm.extra_info for ch in driver_channels
        )
        per_worker = client.run(_worker_channels_encrypted, workers=list(session.placements["consumer"].addresses))
        assert all(flags and all(flags) for flags in per_worker.values()), per_worker
    assert not os.path.exists(folder)  # the keys are gone with the session


def test_dask_cuda_workers_of_a_local_cluster_speak_tls_too(monkeypatch):
    pytest.importorskip("cryptography")
    pytest.importorskip("dask_cuda")
    from distributed import Security

    from twinkle_dask._deploy.cluster import gpu_count
    from twinkle_dask.testing import local_session

    if gpu_count() > 0:
        pytest.skip("dask-cuda's GPU-less test switch is for machines without GPUs")
    monkeypatch.setenv("DASK_CUDA_TEST_DISABLE_DEVICE_SPECIFIC", "1")
    with local_session(DeviceGroup(name="g", ranks=2, device_type="cuda"), simulate_gpus=True,
                       security=Security.temporary()) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        assert sorted(str(w["name"]) for w in workers.values()) == ["g-0", "g-1"]
        assert client.scheduler.address.startswith("tls://")
        assert all(a.startswith("tls://") for a in workers)
        assert Echo(remote_group="g").recv([1, 2])() == [{"args": [[1]], "kwargs": {}}, {"args": [[2]], "kwargs": {}}]


def test_in_process_local_cluster_with_security_speaks_tls():
    pytest.importorskip("cryptography")
    from twinkle_dask.testing import local_session

    with local_session(producer=1, consumer=1, processes=False, security=True) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        assert client.scheduler.address.startswith("tls://127.0.0.1:")
        assert len(workers) == 2 and all(a.startswith("tls://127.0.0.1:") for a in workers)
        producer = Echo(remote_group="producer")
        consumer = Echo(remote_group="consumer")
        big = producer.big(256 * 1024)
        assert consumer.describe.options(dispatch="all")(big)() == {"type": "ndarray", "len": 32768, "values": [0.0]}
        session = twinkle.runtime.process_session()
        channels = list(session.caller._channels.values())
        assert len(channels) == 2 and all("cipher" in ch.comm.extra_info for ch in channels)
        per_worker = client.run(_worker_channels_encrypted, workers=list(session.placements["consumer"].addresses))
        assert list(per_worker.values()) == [[True]]
