"""Unit tests for twinkle_dask.collect: built-in strategies, callables, tuples, the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import twinkle_dask.collect as collect_mod
from twinkle_dask.collect import collect, concat, get_collector, list_collectors, register_collect
from twinkle_dask.exceptions import ConfigurationError
from twinkle_dask.mesh import DeviceMesh


# --------------------------------------------------------------------------- helpers
@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register strategies without leaking them into other tests."""
    monkeypatch.setattr(collect_mod, "_REGISTRY", dict(collect_mod._REGISTRY))


def pp_dp_mesh() -> DeviceMesh:
    """Ranks [[0, 1], [2, 3]] over (pp, dp): the last stage is ranks 2 and 3."""
    return DeviceMesh.from_sizes(pp_size=2, dp_size=2)


ALL_COLLECTORS = list_collectors()


# --------------------------------------------------------------------------- 'none'
@pytest.mark.parametrize(
    ("results", "expected"),
    [
        ([1, 2, 3], [1, 2, 3]),
        ([[1], [2]], [[1], [2]]),
        ([5], 5),
        ([[1, 2]], [1, 2]),
        ([None], None),
        ([{"a": 1}], {"a": 1}),
    ],
)
def test_none_returns_the_list_and_unwraps_a_single_result(results, expected):
    assert collect("none", results) == expected


def test_none_of_no_results_is_an_empty_list():
    assert collect("none", []) == []


# --------------------------------------------------------------------------- 'flatten'
@pytest.mark.parametrize(
    ("results", "expected"),
    [
        ([[1, 2], [3], []], [1, 2, 3]),
        ([["a"], ["b", "c"]], ["a", "b", "c"]),
        (["ab", "c"], "abc"),
        ([b"ab", b"c"], b"abc"),
    ],
)
def test_flatten_concatenates_sequences_into_the_same_type(results, expected):
    got = collect("flatten", results)
    assert type(got) is type(expected)
    assert got == expected


def test_flatten_of_numpy_arrays_gives_a_numpy_array():
    got = collect("flatten", [np.array([1, 2]), np.array([3])])
    assert isinstance(got, np.ndarray)
    assert got.tolist() == [1, 2, 3]


def test_flatten_of_2d_numpy_arrays_concatenates_rows():
    got = collect("flatten", [np.arange(6).reshape(2, 3), np.arange(6, 9).reshape(1, 3)])
    assert got.shape == (3, 3)
    assert got.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_flatten_of_torch_tensors_concatenates_on_dim_zero():
    got = collect("flatten", [torch.ones(2, 3), torch.zeros(1, 3)])
    assert isinstance(got, torch.Tensor)
    assert got.shape == (3, 3)
    assert got.tolist() == [[1.0] * 3, [1.0] * 3, [0.0] * 3]


def test_flatten_of_dicts_concatenates_per_key():
    got = collect(
        "flatten",
        [
            {"ids": [1, 2], "t": torch.tensor([1]), "a": np.array([1.0])},
            {"ids": [3], "t": torch.tensor([2, 3]), "a": np.array([2.0])},
        ],
    )
    assert list(got) == ["ids", "t", "a"]
    assert got["ids"] == [1, 2, 3]
    assert got["t"].tolist() == [1, 2, 3]
    assert got["a"].tolist() == [1.0, 2.0]


def test_flatten_of_scalars_raises_a_clear_type_error():
    with pytest.raises(TypeError, match="flatten"):
        collect("flatten", [1, 2])


def test_concat_joins_tuples_into_a_tuple():
    assert concat([(1, 2), (3,)]) == (1, 2, 3)


def test_concat_of_all_none_is_none():
    assert concat([None, None]) is None


def test_flatten_of_tuple_results_is_position_by_position():
    got = collect("flatten", [([1], "a"), ([2, 3], "b")])
    assert got == [[1, 2, 3], "ab"]


# --------------------------------------------------------------------------- 'mean' / 'avg' / 'sum'
@pytest.mark.parametrize("name", ["mean", "avg"])
def test_mean_and_avg_are_numpy_mean(name):
    assert collect(name, [1.0, 2.0, 6.0]) == 3.0
    assert collect(name, [np.array([1.0, 3.0]), np.array([5.0, 7.0])]) == 4.0


def test_sum_is_numpy_sum():
    assert collect("sum", [1, 2, 3]) == 6
    assert collect("sum", [np.array([1, 2]), np.array([3, 4])]) == 10


@pytest.mark.parametrize(("name", "reduce"), [("mean", np.mean), ("avg", np.mean), ("sum", np.sum)])
def test_dict_results_are_reduced_per_key_of_the_first_result(name, reduce):
    results = [
        {"loss": 1.0, "acc": 0.5, "name": "a", "only_first": 4.0},
        {"loss": 3.0, "acc": 1.0, "name": "b", "extra": 9.0},
    ]
    got = collect(name, results)
    assert list(got) == ["loss", "acc", "name", "only_first"]
    assert got["loss"] == reduce([1.0, 3.0])
    assert got["acc"] == reduce([0.5, 1.0])
    assert got["only_first"] == 4.0
    assert "extra" not in got


@pytest.mark.parametrize("name", ["mean", "avg", "sum"])
@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["a", "b"], ["a", "b"]),
        ([None, None], [None, None]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
    ids=["str", "none", "ragged"],
)
def test_values_that_cannot_be_reduced_are_kept_as_a_list(name, values, expected):
    got = collect(name, [{"v": values[0], "x": 1.0}, {"v": values[1], "x": 3.0}])
    assert got["v"] == expected


# --------------------------------------------------------------------------- 'first' / pipeline
def test_first_returns_rank_zeros_result():
    assert collect("first", [{"a": 1}, {"a": 2}]) == {"a": 1}
    assert collect("first", [[1], [2]], pp_dp_mesh()) == [1]


def test_last_pp_returns_the_last_stage_results_as_a_list():
    assert collect("last_pp", ["r0", "r1", "r2", "r3"], pp_dp_mesh()) == ["r2", "r3"]


def test_last_pp_first_returns_the_first_last_stage_result():
    assert collect("last_pp_first", ["r0", "r1", "r2", "r3"], pp_dp_mesh()) == "r2"


def test_last_pp_on_pp_dp_tp_mesh():
    mesh = DeviceMesh.from_sizes(pp_size=2, dp_size=2, tp_size=2)
    results = [f"r{i}" for i in range(8)]
    assert collect("last_pp", results, mesh) == ["r4", "r5", "r6", "r7"]
    assert collect("last_pp_first", results, mesh) == "r4"


@pytest.mark.parametrize("mesh", [None, DeviceMesh.from_sizes(dp_size=3)], ids=["no-mesh", "no-pp-dim"])
def test_last_pp_without_pipeline_stages_is_every_result(mesh):
    assert collect("last_pp", [1, 2, 3], mesh) == [1, 2, 3]
    assert collect("last_pp_first", [1, 2, 3], mesh) == 1


def test_last_pp_of_a_single_last_stage_rank_is_still_a_list():
    mesh = DeviceMesh.from_sizes(pp_size=2, dp_size=1)
    assert collect("last_pp", ["a", "b"], mesh) == ["b"]


# --------------------------------------------------------------------------- tuples
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("none", [[1, 2], ["a", "b"]]),
        ("first", [1, "a"]),
        ("flatten", None),
    ],
)
def test_tuple_results_are_collected_position_by_position_into_a_list(name, expected):
    results = [(1, "a"), (2, "b")]
    if expected is None:  # flatten: positions of ints cannot be flattened
        with pytest.raises(TypeError):
            collect(name, results)
        return
    got = collect(name, results)
    assert type(got) is list
    assert got == expected


def test_tuple_results_with_mean_average_each_position():
    assert collect("mean", [(1.0, 10.0), (3.0, 30.0)]) == [2.0, 20.0]


def test_tuple_results_with_last_pp_use_the_mesh_per_position():
    results = [(i, f"s{i}") for i in range(4)]
    assert collect("last_pp", results, pp_dp_mesh()) == [[2, 3], ["s2", "s3"]]


def test_a_single_tuple_result_is_also_split_into_a_list():
    assert collect("none", [(1, 2)]) == [1, 2]


# --------------------------------------------------------------------------- callables
def test_custom_collect_gets_results_and_mesh_positionally():
    seen = []

    def fn(results, device_mesh):
        seen.append(device_mesh)
        return max(results)

    mesh = pp_dp_mesh()
    assert collect(fn, [3, 9, 1, 4], mesh) == 9
    assert seen == [mesh]


def test_custom_collect_gets_mesh_as_keyword_only():
    def fn(results, *, device_mesh):
        return (sum(results), device_mesh)

    mesh = pp_dp_mesh()
    assert collect(fn, [1, 2], mesh) == (3, mesh)


def test_custom_collect_without_mesh_parameter():
    assert collect(lambda results: sorted(results), [3, 1, 2]) == [1, 2, 3]


def test_custom_collect_is_applied_per_tuple_position():
    assert collect(lambda results, device_mesh: sum(results), [(1, 10), (2, 20)]) == [3, 30]


def test_custom_collect_with_no_parameters_is_rejected():
    with pytest.raises(ConfigurationError):
        get_collector(lambda: None)


# --------------------------------------------------------------------------- registry
def test_builtin_collectors_are_registered():
    assert set(list_collectors()) >= {"none", "flatten", "mean", "avg", "sum", "first", "last_pp", "last_pp_first"}


def test_avg_is_an_alias_of_mean():
    assert get_collector("avg") is get_collector("mean")


@pytest.mark.parametrize("name", ["", "max", "Mean", "last-pp"])
def test_unknown_collect_name_raises_listing_valid_ones(name):
    with pytest.raises(ValueError) as info:
        get_collector(name)
    assert isinstance(info.value, ConfigurationError)
    msg = str(info.value)
    assert repr(name) in msg
    assert all(repr(valid) in msg for valid in list_collectors())


@pytest.mark.parametrize("name", ["none", "flatten", "mean", "avg", "sum", "first", "last_pp", "last_pp_first"])
@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.usefixtures("clean_registry")
def test_builtin_collectors_cannot_be_replaced(name, replace):
    before = get_collector(name)
    with pytest.raises(ConfigurationError, match=name):
        register_collect(name, lambda results, device_mesh: None, replace=replace)
    assert get_collector(name) is before


@pytest.mark.usefixtures("clean_registry")
def test_registered_collect_is_usable_by_name_and_listed():
    register_collect("max", lambda results, device_mesh: max(results))
    assert "max" in list_collectors()
    assert collect("max", [3, 7, 5]) == 7


@pytest.mark.usefixtures("clean_registry")
def test_registering_a_custom_collect_twice_needs_replace():
    register_collect("pick", lambda results, device_mesh: results[0])
    with pytest.raises(ConfigurationError, match="replace=True"):
        register_collect("pick", lambda results, device_mesh: results[-1])
    register_collect("pick", lambda results, device_mesh: results[-1], replace=True)
    assert collect("pick", [1, 2]) == 2


@pytest.mark.usefixtures("clean_registry")
@pytest.mark.parametrize("fn", [None, 3, "first"])
def test_register_collect_requires_a_callable(fn):
    with pytest.raises(ConfigurationError):
        register_collect("mine", fn)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- every strategy
@pytest.mark.parametrize("name", ALL_COLLECTORS)
def test_every_collector_returns_an_empty_list_for_no_results(name):
    assert collect(name, []) == []


@pytest.mark.parametrize("name", ALL_COLLECTORS)
def test_every_collector_applies_itself_per_tuple_position(name):
    mesh = pp_dp_mesh()
    left = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]
    right = [[10.0], [20.0], [30.0], [40.0]]
    results = list(zip(left, right))
    got = collect(name, results, mesh)
    assert type(got) is list
    assert len(got) == 2
    for position, part in zip(got, (left, right)):
        expected = collect(name, part, mesh)
        assert type(position) is type(expected)
        assert np.array_equal(np.asarray(position, dtype=object), np.asarray(expected, dtype=object))


@pytest.mark.parametrize("name", ALL_COLLECTORS)
def test_every_collector_is_callable_through_get_collector(name):
    collector = get_collector(name)
    assert collector([[1], [2]], None) == collect(name, [[1], [2]], None)
