"""Component calls are recorded per rank on the scheduler and shown in the Task Stream."""

from __future__ import annotations

import time

import pytest
from components import Echo
from dask.utils import key_split
from distributed import performance_report
from distributed.diagnostics.task_stream import rectangles

from twinkle_dask.dashboard import MAX_RECORDS, CallRecord, call_records, decode, encode

pytestmark = pytest.mark.timeout(60)


def test_an_event_carries_each_name_once_and_decodes_to_the_same_calls():
    start = 1.7e9
    records = [["Policy", "forward", "model-Policy-3f9a1c2b7d", i, i % 4, start + i / 1e3, start + i / 1e3 + 5e-4,
                i % 7 != 0] for i in range(MAX_RECORDS - 1)]
    records.append(["Reference", "score", "ref-Reference-0a1b2c3d4e", 7, 0, start, start + 1, False])
    msg = encode("tcp://10.0.0.1:4321", records)
    assert decode(msg) == [CallRecord("tcp://10.0.0.1:4321", *r) for r in records]
    assert msg.count(b"forward") == 1 and msg.count(b"model-Policy-3f9a1c2b7d") == 1
    assert len(msg) <= 26 * MAX_RECORDS  # a full event: the scheduler keeps at most 1000 of them


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


def _stream(client, prefix: str, want: int) -> list[dict]:
    """The Task Stream entries whose key starts with ``prefix``, read through ``Client.get_task_stream``."""
    deadline = time.monotonic() + 10
    entries: list[dict] = []
    while time.monotonic() < deadline:
        entries = [e for e in client.get_task_stream(start=0) if e["key"].startswith(prefix)]
        if len(entries) >= want:
            break
        time.sleep(0.1)
    return entries


def test_calls_appear_in_the_task_stream_one_row_per_rank(cluster):
    echo = Echo(remote_group="model")
    echo.count()
    entries = _stream(cluster, "Echo.count-", 4)
    assert sorted(e["key"].rsplit("-", 1)[-1] for e in entries) == ["rank0", "rank1", "rank2", "rank3"]
    assert sorted(e["thread"] for e in entries) == ["Echo-rank0", "Echo-rank1", "Echo-rank2", "Echo-rank3"]
    assert sorted(e["worker"] for e in entries) == sorted(echo._twinkle_ref.addresses)
    assert {e["status"] for e in entries} == {"OK"}
    assert {e["type"] for e in entries} == {"twinkle"}
    assert {key_split(e["key"]) for e in entries} == {"Echo.count"}
    rects = rectangles(entries)
    assert set(rects["name"]) == {"Echo.count"}
    assert len(set(rects["y"])) == 4  # one Task Stream row per rank


def test_failed_calls_are_drawn_as_failed_tasks_with_their_duration(cluster):
    echo = Echo(remote_group="sampler")
    echo.sleep(0.05)()
    with pytest.raises(KeyError):
        echo.fail_on(0)()
    mine = "-" + echo._twinkle_ref.cid.rsplit("-", 1)[-1] + "-"
    failed = _stream(cluster, "Echo.fail_on" + mine, 2)
    assert {e["key"].rsplit("-", 1)[-1]: e["status"] for e in failed} == {"rank0": "error", "rank1": "OK"}
    assert rectangles([e for e in failed if e["status"] == "error"])["color"] == ["black"]
    slept = _stream(cluster, "Echo.sleep" + mine, 2)
    assert all(ss["action"] == "compute" and ss["stop"] - ss["start"] >= 0.05
               for e in slept for ss in e["startstops"])


def test_calls_appear_in_a_performance_report(cluster, tmp_path):
    filename = tmp_path / "report.html"
    with performance_report(filename=str(filename)):
        echo = Echo(remote_group="sampler")
        echo.sleep(0.01)()
        _stream(cluster, "Echo.sleep-" + echo._twinkle_ref.cid.rsplit("-", 1)[-1], 2)
    html = filename.read_text()
    assert html.count('"Echo.sleep"') >= 2  # the Task Stream's bar names, one per rank
