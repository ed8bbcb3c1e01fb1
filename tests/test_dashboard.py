"""Component calls are recorded per rank on the scheduler and shown in the Task Stream."""

from __future__ import annotations

import time

import pytest
from components import Echo

from twinkle_dask.dashboard import call_records

pytestmark = pytest.mark.timeout(60)


def _events(client, want: int) -> list:
    deadline = time.monotonic() + 10
    calls: list = []
    while time.monotonic() < deadline:
        calls = call_records(client)
        if len(calls) >= want:
            break
        time.sleep(0.1)
    return calls


def test_calls_are_recorded_per_rank_with_component_method_and_duration(cluster):
    echo = Echo(remote_group="sampler")
    echo.sleep(0.05)()
    with pytest.raises(KeyError):
        echo.fail_on(1)()
    cid = echo._twinkle_ref.cid
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        mine = [c for c in _events(cluster, 6) if c.cid == cid]
        if len(mine) >= 6:
            break
        time.sleep(0.1)
    by = {(c.method, c.rank): c for c in mine}
    assert set(by) == {("__init__", 0), ("__init__", 1), ("sleep", 0), ("sleep", 1), ("fail_on", 0), ("fail_on", 1)}
    assert all(by["sleep", r].duration >= 0.05 for r in (0, 1))
    assert by["fail_on", 1].ok is False and by["fail_on", 0].ok is True
    assert {c.component for c in mine} == {"Echo"}


def test_calls_appear_in_the_task_stream(cluster):
    echo = Echo(remote_group="model")
    echo.count()
    _events(cluster, 4)

    def stream(dask_scheduler):
        plugin = dask_scheduler.plugins.get("task-stream")
        return [] if plugin is None else [e["key"] for e in plugin.buffer]

    deadline = time.monotonic() + 10
    keys: list = []
    while time.monotonic() < deadline:
        keys = [k for k in cluster.run_on_scheduler(stream) if k.startswith("Echo.count-")]
        if len(keys) >= 4:
            break
        time.sleep(0.1)
    assert sorted(k.rsplit("-", 1)[-1] for k in keys[-4:]) == ["rank0", "rank1", "rank2", "rank3"]
