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
                ch._proto.transport.get_extra_info("ssl_object") is not None for ch in channels
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
