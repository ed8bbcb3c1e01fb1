"""Remote calls end to end: dispatch, execute, collect, sync, laziness, timeouts and errors."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from components import CustomError, Echo

import twinkle_dask as twinkle
from twinkle_dask import DeviceMesh, LazyResult
from twinkle_dask.exceptions import CallTimeoutError, DispatchError, SerializationError
from twinkle_dask.testing import assert_same

pytestmark = pytest.mark.timeout(60)

MESHES = {
    "dp4": DeviceMesh.from_sizes(dp_size=4),
    "dp2_tp2": DeviceMesh.from_sizes(dp_size=2, tp_size=2),
    "pp2_dp2": DeviceMesh.from_sizes(pp_size=2, dp_size=2),
    "fsdp2_dp2": DeviceMesh.from_sizes(fsdp_size=2, dp_size=2),
}

# rank -> items of range(10) under slice_dp, written out from get_slice's rule
SLICE_DP_10 = {
    "dp4": [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]],
    "dp2_tp2": [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [5, 6, 7, 8, 9]],
    "pp2_dp2": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]],
    "fsdp2_dp2": [[0, 1, 2], [6, 7], [3, 4, 5], [8, 9]],
}


@pytest.fixture(scope="module")
def echoes(cluster):
    return {name: Echo(device_mesh=mesh, remote_group="model") for name, mesh in MESHES.items()}


def received(result: LazyResult) -> list:
    return [r["args"][0] for r in result.per_rank()]


@pytest.mark.parametrize("mesh", list(MESHES))
def test_slice_dp_splits_lists_by_data_rank(echoes, mesh):
    got = received(echoes[mesh].recv.options(dispatch="slice_dp")(list(range(10))))
    assert got == SLICE_DP_10[mesh]


@pytest.mark.parametrize("mesh", list(MESHES))
def test_slice_dp_splits_tensors_arrays_and_dicts_alike(echoes, mesh):
    import torch

    batch = {"ids": torch.arange(10), "arr": np.arange(10), "meta": {"tags": list(range(10))}, "name": "b"}
    got = received(echoes[mesh].recv.options(dispatch="slice_dp")(batch))
    for rank, want in enumerate(SLICE_DP_10[mesh]):
        assert_same(got[rank], {"ids": torch.tensor(want), "arr": np.array(want), "meta": {"tags": want}, "name": "b"})


def test_slice_splits_every_top_level_list_by_its_own_length(echoes):
    res = echoes["dp4"].recv([1, 2, 3, 4, 5], (1, 2), [9], key=["a", "b", "c", "d", "e", "f"], whole={"x": [1]})
    per = res.per_rank()
    assert [p["args"] for p in per] == [[[1, 2], (1, 2), [9]], [[3], (1, 2), []], [[4], (1, 2), []], [[5], (1, 2), []]]
    assert [p["kwargs"]["key"] for p in per] == [["a", "b"], ["c", "d"], ["e"], ["f"]]
    assert all(p["kwargs"]["whole"] == {"x": [1]} for p in per)


def test_all_gives_every_rank_everything(echoes):
    per = echoes["dp4"].recv.options(dispatch="all")([1, 2, 3]).per_rank()
    assert [p["args"] for p in per] == [[[1, 2, 3]]] * 4


def test_custom_dispatch_callable_gets_length_rank_and_mesh(echoes):
    def to_dp_rank(length, i, args, kwargs, device_mesh):
        return (args[0][device_mesh.get_data_rank_from_global_rank(i)], length), {}

    per = echoes["dp2_tp2"].recv.options(dispatch=to_dp_rank)(["a", "b"]).per_rank()
    assert [p["args"] for p in per] == [["a", 4], ["a", 4], ["b", 4], ["b", 4]]


def test_registered_dispatch_and_collect_names(echoes):
    twinkle.register_dispatch("reverse_test", lambda length, i, args, kwargs, device_mesh: ((length - 1 - i,), {}))
    twinkle.register_collect("maximum_test", lambda results, device_mesh: max(r["args"][0] for r in results))
    res = echoes["dp4"].recv.options(dispatch="reverse_test")()
    assert [p["args"][0] for p in res.per_rank()] == [3, 2, 1, 0]
    assert echoes["dp4"].recv.options(dispatch="reverse_test", collect="maximum_test")()() == 3


def test_batch_too_small_is_rejected_before_submitting(echoes):
    with pytest.raises(DispatchError, match="Batch too small for 4 workers"):
        echoes["dp4"].recv.options(dispatch="slice_dp")([1, 2])


def test_slice_dp_without_mesh_names_the_fix(cluster):
    echo = Echo(remote_group="sampler")
    with pytest.raises(ValueError, match="slice_dp.*DeviceMesh"):
        echo.recv.options(dispatch="slice_dp")([1, 2])


def test_execute_first_runs_rank_zero_with_the_whole_input(echoes):
    res = echoes["dp4"].recv.options(dispatch="slice_dp", execute="first")(list(range(10)))
    assert res() == {"args": [list(range(10))], "kwargs": {}}
    assert len(res.per_rank()) == 1


@pytest.mark.parametrize(
    ("collect", "expected"),
    [
        ("none", [0.0, 1.0, 2.0, 3.0]),
        ("mean", 1.5),
        ("avg", 1.5),
        ("sum", 6.0),
        ("first", 0.0),
    ],
)
def test_collect_scalars(echoes, collect, expected):
    assert echoes["dp4"].produce.options(collect=collect)("scalar")() == expected


def test_collect_flatten_concatenates_per_type(echoes):
    import torch

    echo = echoes["dp4"]
    assert echo.produce.options(collect="flatten")("list", 2)() == [0, 1, 100, 101, 102, 200, 201, 300, 301, 302]
    assert_same(echo.produce.options(collect="flatten")("ndarray", 2)(), np.array([0, 1, 100, 101, 200, 201, 300, 301]))
    t = echo.produce.options(collect="flatten")("tensor", 1)()
    assert_same(t, torch.tensor([[0.0, 1.0], [100.0, 101.0], [200.0, 201.0], [300.0, 301.0]]))


def test_collect_last_pp_reads_the_last_stage(echoes):
    echo = echoes["pp2_dp2"]
    assert echo.produce.options(collect="last_pp")("scalar")() == [2.0, 3.0]
    assert echo.produce.options(collect="last_pp_first")("scalar")() == 2.0


def test_collect_mean_of_dicts_is_per_key(echoes):
    res = echoes["dp4"].identity.options(collect="mean")()
    value = res()
    assert value["rank"] == 1.5 and value["world"] == 4.0
    assert value["tag"] == ["echo"] * 4


def test_tuple_results_are_collected_position_by_position(echoes):
    assert echoes["dp4"].produce.options(collect="sum")("tuple")() == [6.0, 12]
    by_position = echoes["dp4"].produce.options(collect="none")("tuple")()
    assert by_position == [[0.0, 1.0, 2.0, 3.0], [[0, 0], [1, 1], [2, 2], [3, 3]]]


def test_custom_collect_callable_gets_the_mesh(echoes):
    def pick(results, device_mesh):
        return [results[r] for r in device_mesh.get_pp_first_ranks()]

    assert echoes["pp2_dp2"].produce.options(collect=pick)("scalar")() == [0.0, 1.0]


def test_lazy_result_is_callable_cached_and_awaitable(echoes):
    res = echoes["dp4"].produce.options(collect="sum")("scalar")
    assert isinstance(res, LazyResult)
    assert res.result(timeout=30) == 6.0
    assert res() == 6.0 and res.done()

    async def main():
        return await echoes["dp4"].produce.options(collect="first")("scalar")

    assert asyncio.run(main()) == 0.0


def test_lazy_collect_priority_instance_then_method_then_global(cluster):
    echo = Echo(remote_group="sampler")
    assert echo.count() == 2  # method lazy_collect=False beats the global True
    assert isinstance(echo.produce("scalar"), LazyResult)  # global default
    assert echo.produce.options(lazy_collect=False)("scalar") == [0.0, 1.0]
    echo._lazy_collect = False  # the instance attribute beats both
    assert echo.produce("scalar") == [0.0, 1.0]
    echo._lazy_collect = True
    assert isinstance(echo.count(), LazyResult)


def test_sync_waits_and_raises_at_call_time(echoes):
    start = time.perf_counter()
    res = echoes["dp4"].sleep.options(sync=True)(0.3)
    assert res.done() and time.perf_counter() - start >= 0.3
    with pytest.raises(KeyError):
        echoes["dp4"].fail_on.options(sync=True)(2)


def test_timeout_names_the_ranks_that_did_not_answer(echoes):
    res = echoes["dp4"].sleep.options(timeout=0.2)(1.0)
    with pytest.raises(CallTimeoutError, match=r"Echo.sleep did not finish within 0.2 s: rank\(s\) 0, 1, 2, 3") as info:
        res()
    assert isinstance(info.value, TimeoutError)
    assert info.value.pending_ranks == (0, 1, 2, 3)
    assert res.result(timeout=10) == 1.0


def test_remote_error_keeps_type_message_and_names_rank_and_call_site(echoes):
    with pytest.raises(KeyError, match="rank 2 says no") as info:
        echoes["dp4"].fail_on(2)()
    notes = "\n".join(info.value.__notes__)
    assert "Echo.fail_on on rank 2 of group 'model'" in notes
    assert "test_calls.py:" in notes
    assert "remote traceback" in notes and "fail_on" in notes


def test_user_exception_types_are_rebuilt(echoes):
    with pytest.raises(CustomError, match="rank 0 says no"):
        echoes["dp4"].fail_on(0, "Custom")()


def test_a_failed_call_does_not_poison_later_calls(echoes):
    bad = echoes["dp4"].fail_on(1)
    assert echoes["dp4"].produce.options(collect="sum")("scalar")() == 6.0
    with pytest.raises(KeyError):
        bad()


def test_arguments_are_bound_in_the_driver(echoes):
    with pytest.raises(TypeError, match="Echo.sleep"):
        echoes["dp4"].sleep(1, 2, 3)


def test_unpicklable_arguments_fail_at_the_call_site(echoes):
    import threading

    with pytest.raises(SerializationError, match="arguments of Echo.recv"):
        echoes["dp4"].recv(threading.Lock())


def test_order_is_kept_per_component(echoes):
    echo = echoes["dp4"]
    for i in range(50):
        echo.record(i, delay=0.001 if i % 7 == 0 else 0.0)
    assert echo.get_log()() == [list(range(50))] * 4
