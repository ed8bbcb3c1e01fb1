"""Component prints reach the driver with component and rank in front; metrics are kept per rank."""

from __future__ import annotations

import time

import pytest
from components import Talker

import twinkle_dask as twinkle

pytestmark = pytest.mark.timeout(60)


def test_prints_and_metrics_reach_the_driver(cluster, capfd):
    talker = Talker(remote_group="sampler")
    assert talker.speak(3)() == [3, 3]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(twinkle.get_metrics("Talker")) < 2:
        time.sleep(0.05)
    out, err = capfd.readouterr()
    for rank in (0, 1):
        assert f"(Talker rank {rank}) step 3 from rank {rank}\n" in out
        assert f"(Talker rank {rank}) no newline at the end\n" in out
        assert f"(Talker rank {rank}) to stderr\n" in err
    metrics = sorted(twinkle.get_metrics("Talker"), key=lambda r: r["rank"])
    assert [(m["rank"], m["step"], m["loss"]) for m in metrics] == [(0, 3, 0.25), (1, 3, 0.25)]
    assert all(m["component"] == "Talker" and m["time"] > 0 for m in metrics)


def test_report_in_the_driver_is_kept_too(cluster):
    twinkle.report(phase="eval", accuracy=0.9)
    assert twinkle.get_metrics()[-1]["accuracy"] == 0.9
