"""Every option is checked, before anything starts, with a typed error that quotes the bad value."""

from __future__ import annotations

import time

import dask
import psutil
import pytest
from components import Echo
from distributed import Security

import twinkle_dask as twinkle
from twinkle_dask import (
    ClusterUnreachableError,
    ConfigurationError,
    ConfigurationTypeError,
    DeviceGroup,
    TwinkleDaskError,
)
from twinkle_dask.testing import start_local

pytestmark = pytest.mark.timeout(120)

GROUPS = [DeviceGroup(name="g", ranks=1, device_type="cpu")]


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def wait_for_no_children(before: set[int], timeout: float = 15.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := children() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


BAD_INITIALIZE = [
    ({"lazy_collect": "yes"}, ConfigurationTypeError, "lazy_collect must be True or False, got 'yes'"),
    ({"full_determinism": "x"}, ConfigurationTypeError, "full_determinism must be True or False, got 'x'"),
    ({"simulate_gpus": "x"}, ConfigurationTypeError, "simulate_gpus must be True or False, got 'x'"),
    ({"seed": "x"}, ConfigurationTypeError, "seed must be an int, got 'x'"),
    ({"seed": 1.5}, ConfigurationTypeError, "seed must be an int, got 1.5"),
    ({"name": 3}, ConfigurationTypeError, "name must be None or a string, got 3"),
    ({"nproc_per_node": 0}, ConfigurationError, "nproc_per_node must be None or an int >= 1, got 0"),
    ({"nproc_per_node": "8"}, ConfigurationTypeError, "nproc_per_node must be None or an int >= 1, got '8'"),
    ({"ncpu_proc_per_node": -1}, ConfigurationError, "ncpu_proc_per_node must be None or an int >= 0, got -1"),
    ({"security": "x"}, ConfigurationTypeError, "security must be a distributed.Security (e.g. Security.temporary())"),
    ({"security": True, "address": "tcp://127.0.0.1:1"}, ConfigurationError, "security=True makes temporary"),
    ({"security": Security()}, ConfigurationError,
     "lacks ['tls_ca_file', 'tls_scheduler_cert', 'tls_worker_cert', 'tls_client_cert'] for a local TLS cluster"),
    ({"dashboard_address": "bogus"}, ConfigurationError,
     "dashboard_address 'bogus' is not valid (missing port number in address 'bogus'); pass one like '127.0.0.1:8787'"),
    ({"dashboard_address": 8787}, ConfigurationTypeError, "dashboard_address must be a string like '127.0.0.1:8787'"),
    ({"client": "x"}, ConfigurationTypeError, "client must be a distributed.Client, got 'x'"),
    ({"address": "bogus"}, ConfigurationError, "address 'bogus' is not valid (missing port number"),
    ({"address": "foo://h:1"}, ConfigurationError, "address 'foo://h:1' is not valid (unknown address scheme 'foo'"),
    ({"address": 8786}, ConfigurationTypeError, "address must be a string like 'tcp://10.0.0.1:8786', got 8786"),
    ({"global_device_mesh": "dp"}, ConfigurationError, "global_device_mesh must be a DeviceMesh, got 'dp'"),
    ({"notifier": "print"}, ConfigurationError, "notifier must be a callable taking a string, got 'print'"),
]


@pytest.mark.parametrize(("kwargs", "exc_type", "message"), BAD_INITIALIZE, ids=[str(k) for k, _, _ in BAD_INITIALIZE])
def test_initialize_rejects_bad_options_before_starting_anything(kwargs, exc_type, message):
    before = children()
    with pytest.raises(exc_type) as info:
        twinkle.initialize("dask", groups=GROUPS, **kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, TwinkleDaskError)
    if exc_type is ConfigurationTypeError:
        assert isinstance(info.value, TypeError)
    assert children() == before
    assert twinkle.runtime.process_session() is None


def test_unreachable_scheduler_is_a_typed_error_within_the_connect_timeout():
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        start = time.monotonic()
        with pytest.raises(ClusterUnreachableError) as info:
            twinkle.initialize("dask", groups=GROUPS, address="tcp://127.0.0.1:1")
        elapsed = time.monotonic() - start
    assert isinstance(info.value, ConnectionError)
    assert str(info.value).startswith("no Dask scheduler answered at 'tcp://127.0.0.1:1'")
    assert "Check the address and port" in str(info.value)
    assert elapsed < 10


@pytest.mark.parametrize("timeout", ["x", None, -5])
def test_bad_shutdown_timeout_tears_nothing_down_and_a_valid_call_then_stops_everything(timeout):
    before = children()
    start_local(g=2)
    try:
        started = children() - before
        assert len(started) >= 3  # the zygote and its two workers
        with pytest.raises(ConfigurationError) as info:
            twinkle.shutdown(timeout=timeout)
        assert f"shutdown: timeout must be a number of seconds > 0, got {timeout!r}" == str(info.value)
        assert children() - before == started
        echo = Echo(remote_group="g")
        assert echo.recv([1, 2])() == [{"args": [[1]], "kwargs": {}}, {"args": [[2]], "kwargs": {}}]
    finally:
        twinkle.shutdown(timeout=20)
    assert wait_for_no_children(before) == set()
    assert twinkle.runtime.process_session() is None
