"""Memory on the workers: a memory limit for Dask's memory manager, and freed memory back to the system."""

from __future__ import annotations

import logging
import time

import psutil
import pytest
from components import Echo
from distributed import system
from distributed.worker_memory import parse_memory_limit

import twinkle_dask as twinkle
from twinkle_dask.exceptions import ConfigurationError
from twinkle_dask.testing import local_session, worker_stats

pytestmark = pytest.mark.timeout(180)

MiB = 1024 * 1024


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


@pytest.mark.parametrize(
    ("asked", "expected"),
    [
        ("2GiB", 2 * 1024**3),
        (1_500_000_000, 1_500_000_000),
        (0.25, int(0.25 * system.MEMORY_LIMIT)),
        ("auto", parse_memory_limit("auto", 1, logger=logging.getLogger(__name__))),
        (None, 0),
        (0, 0),
    ],
)
def test_local_workers_run_under_the_memory_limit_asked(asked, expected):
    with local_session(model=2, memory_limit=asked) as client:
        info = client.scheduler_info(n_workers=-1)["workers"]
        assert sorted((w["name"], w["memory_limit"] or 0) for w in info.values()) == [
            ("model-0", expected), ("model-1", expected)
        ]


def test_the_default_memory_limit_is_dasks_automatic_one():
    with local_session(model=1) as client:
        (worker,) = client.scheduler_info(n_workers=-1)["workers"].values()
        assert worker["memory_limit"] == parse_memory_limit("auto", 1, logger=logging.getLogger(__name__))
        assert 0 < worker["memory_limit"] <= system.MEMORY_LIMIT


@pytest.mark.parametrize("bad", ["lots", -1, [4], True])
def test_memory_limit_is_validated_before_anything_starts(bad):
    with pytest.raises(ConfigurationError, match=r"memory_limit must be 'auto'.*, got "):
        twinkle.initialize("dask", groups=[twinkle.DeviceGroup(name="g", ranks=1, device_type="cpu")],
                           memory_limit=bad)


def test_memory_freed_on_a_worker_goes_back_to_the_system():
    with local_session(model=1) as client:
        echo = Echo(remote_group="model")
        (address,) = echo._twinkle_ref.addresses

        def rss() -> int:
            return int(client.run(_rss, workers=[address])[address])

        def until_released() -> None:
            deadline = time.monotonic() + 30
            while worker_stats()[address]["held"]:
                assert time.monotonic() < deadline, "results were not released"

        warm = [echo.big(256 * 1024) for _ in range(200)]
        warm[-1].result()
        del warm
        until_released()
        base = rss()
        results = [echo.big(256 * 1024) for _ in range(3000)]
        results[-1].result()  # calls run in order: all 3,000 results are held now
        assert worker_stats()[address]["held"] == 3000
        assert rss() - base > 500 * MiB  # they were really there
        del results
        until_released()
        deadline = time.monotonic() + 30
        while (grown := rss() - base) >= 32 * MiB:  # without the trim after releases: 65 MiB stay
            assert time.monotonic() < deadline, f"the worker stayed {grown / MiB:.0f} MiB above its baseline"


def test_a_worker_past_the_terminate_threshold_is_restarted_and_the_call_fails_typed():
    from components import Hog

    from twinkle_dask.exceptions import WorkerLostError

    with local_session(model=1, memory_limit="400MiB"):
        hog = Hog(remote_group="model")
        start = time.monotonic()
        with pytest.raises(WorkerLostError, match="group 'model'"):
            hog.hold(450 * MiB, 60).result(timeout=30)
        assert time.monotonic() - start < 15
        assert Echo(remote_group="model").count() == 1  # the group works again on the restarted worker
