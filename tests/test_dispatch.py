"""Unit tests for twinkle_dask.dispatch: built-in strategies, custom callables, the registry."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

import twinkle_dask.dispatch as dispatch_mod
from twinkle_dask.dispatch import dispatch, get_dispatcher, list_dispatchers, register_dispatch
from twinkle_dask.exceptions import ConfigurationError, DispatchError
from twinkle_dask.mesh import DeviceMesh


# --------------------------------------------------------------------------- helpers
def first_args(pairs) -> list:
    """The first positional argument each rank received."""
    return [args[0] for args, _ in pairs]


def as_lists(values) -> list:
    return [v.tolist() if isinstance(v, (np.ndarray, torch.Tensor)) else v for v in values]


def dp_mesh(n: int) -> DeviceMesh:
    return DeviceMesh.from_sizes(dp_size=n)


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register strategies without leaking them into other tests."""
    monkeypatch.setattr(dispatch_mod, "_REGISTRY", dict(dispatch_mod._REGISTRY))


ALL_DISPATCHERS = list_dispatchers()


# --------------------------------------------------------------------------- 'slice'
@pytest.mark.parametrize(
    ("n", "data", "expected"),
    [
        (3, list(range(7)), [[0, 1, 2], [3, 4], [5, 6]]),
        (2, list(range(4)), [[0, 1], [2, 3]]),
        (4, ["a", "b"], [["a"], ["b"], [], []]),
        (3, [], [[], [], []]),
        (1, [1, 2, 3], [[1, 2, 3]]),
    ],
)
def test_slice_splits_a_list_evenly_earlier_ranks_take_extras(n, data, expected):
    assert first_args(dispatch("slice", n, (data,), {})) == expected


def test_slice_splits_each_list_by_its_own_length_positional_and_keyword():
    pairs = dispatch("slice", 3, ([1, 2, 3, 4, 5, 6, 7], ["x", "y"]), {"k": [10, 20, 30], "s": 5})
    assert pairs == [
        (([1, 2, 3], ["x"]), {"k": [10], "s": 5}),
        (([4, 5], ["y"]), {"k": [20], "s": 5}),
        (([6, 7], []), {"k": [30], "s": 5}),
    ]


@pytest.mark.parametrize(
    "value",
    [
        (1, 2, 3, 4),
        {"a": [1, 2, 3, 4]},
        torch.arange(4),
        np.arange(4),
        "abcd",
        7,
        None,
        ((1, 2),),
    ],
    ids=["tuple", "dict", "tensor", "ndarray", "str", "int", "none", "tuple-of-tuple"],
)
def test_slice_passes_non_lists_whole_to_every_rank(value):
    pairs = dispatch("slice", 2, (value,), {"kw": value})
    for args, kwargs in pairs:
        assert args[0] is value
        assert kwargs["kw"] is value


def test_slice_does_not_split_lists_nested_in_other_arguments():
    nested = {"ids": [1, 2, 3, 4]}
    pairs = dispatch("slice", 2, ([nested, nested],), {})
    assert first_args(pairs) == [[nested], [nested]]


# --------------------------------------------------------------------------- 'all'
def test_all_gives_every_rank_every_argument_whole():
    data = [1, 2, 3]
    tensor = torch.arange(3)
    pairs = dispatch("all", 3, (data, tensor), {"k": {"x": [1]}})
    assert len(pairs) == 3
    for args, kwargs in pairs:
        assert args[0] is data and args[1] is tensor
        assert kwargs == {"k": {"x": [1]}}


# --------------------------------------------------------------------------- 'slice_dp' tables
def test_slice_dp_on_dp_tp_mesh_gives_tp_peers_identical_data():
    mesh = DeviceMesh.from_sizes(dp_size=2, tp_size=2)
    assert first_args(dispatch("slice_dp", 4, (list(range(5)),), {}, mesh)) == [
        [0, 1, 2], [0, 1, 2], [3, 4], [3, 4],
    ]


def test_slice_dp_on_pp_dp_mesh_gives_pp_peers_identical_data():
    mesh = DeviceMesh.from_sizes(pp_size=2, dp_size=2)
    assert first_args(dispatch("slice_dp", 4, (list(range(10)),), {}, mesh)) == [
        [0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 1, 2, 3, 4], [5, 6, 7, 8, 9],
    ]


def test_slice_dp_on_fsdp_dp_mesh_follows_the_data_rank():
    # data ranks are [0, 2, 1, 3]: rank 1 takes the third slice, rank 2 the second.
    mesh = DeviceMesh.from_sizes(fsdp_size=2, dp_size=2)
    assert first_args(dispatch("slice_dp", 4, (list(range(6)),), {}, mesh)) == [
        [0, 1], [4], [2, 3], [5],
    ]


def test_slice_dp_on_dp_cp_mesh_gives_cp_peers_identical_data():
    mesh = DeviceMesh.from_sizes(dp_size=2, cp_size=2)
    assert as_lists(first_args(dispatch("slice_dp", 4, (torch.arange(4),), {}, mesh))) == [
        [0, 1], [0, 1], [2, 3], [2, 3],
    ]


def test_slice_dp_with_ulysses_gives_sequence_parallel_peers_identical_data():
    mesh = DeviceMesh.from_sizes(dp_size=4, ulysses_size=2)
    assert first_args(dispatch("slice_dp", 4, (list(range(4)),), {}, mesh)) == [
        [0, 1], [0, 1], [2, 3], [2, 3],
    ]


def test_slice_dp_with_fewer_targets_than_mesh_ranks_strides_over_the_mesh():
    # stride = world_size // n = 2: target i reads data rank of global rank 2 * i.
    mesh = DeviceMesh.from_sizes(dp_size=2, tp_size=2)
    assert first_args(dispatch("slice_dp", 2, (list(range(6)),), {}, mesh)) == [[0, 1, 2], [3, 4, 5]]


def test_slice_dp_on_mesh_without_dp_passes_everything_to_every_rank():
    mesh = DeviceMesh(mesh=np.arange(2), mesh_dim_names=("tp",))
    assert first_args(dispatch("slice_dp", 2, ([1, 2, 3],), {}, mesh)) == [[1, 2, 3], [1, 2, 3]]


@pytest.mark.parametrize(
    ("make", "convert"),
    [
        (lambda xs: list(xs), lambda v: v),
        (lambda xs: torch.tensor(xs), lambda v: v.tolist()),
        (lambda xs: np.array(xs), lambda v: v.tolist()),
    ],
    ids=["list", "tensor", "ndarray"],
)
def test_slice_dp_slices_lists_tensors_and_ndarrays_keeping_their_type(make, convert):
    value = make([0, 1, 2, 3, 4, 5, 6])
    parts = first_args(dispatch("slice_dp", 3, (value,), {}, dp_mesh(3)))
    assert [type(p) for p in parts] == [type(value)] * 3
    assert [convert(p) for p in parts] == [[0, 1, 2], [3, 4], [5, 6]]


def test_slice_dp_slices_2d_arrays_along_the_first_dim():
    value = np.arange(12).reshape(4, 3)
    parts = first_args(dispatch("slice_dp", 2, (value,), {}, dp_mesh(2)))
    assert [p.tolist() for p in parts] == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]


def test_slice_dp_slices_dict_values_recursively():
    batch = {
        "ids": [10, 11, 12, 13],
        "mask": torch.tensor([1, 1, 0, 0]),
        "inner": {"pos": np.arange(4), "tag": "t"},
        "shape": (4, 2),
        "n": 4,
    }
    parts = first_args(dispatch("slice_dp", 2, (batch,), {}, dp_mesh(2)))
    assert [p["ids"] for p in parts] == [[10, 11], [12, 13]]
    assert [p["mask"].tolist() for p in parts] == [[1, 1], [0, 0]]
    assert [p["inner"]["pos"].tolist() for p in parts] == [[0, 1], [2, 3]]
    assert all(p["inner"]["tag"] == "t" and p["shape"] == (4, 2) and p["n"] == 4 for p in parts)


def test_slice_dp_keeps_dict_subclasses():
    batch = OrderedDict(ids=[1, 2])
    parts = first_args(dispatch("slice_dp", 2, (batch,), {}, dp_mesh(2)))
    assert [type(p) for p in parts] == [OrderedDict, OrderedDict]
    assert [p["ids"] for p in parts] == [[1], [2]]


@pytest.mark.parametrize(
    "value",
    [(1, 2, 3, 4), 5, "abcd", None, torch.tensor(3.0), np.float64(2.0), np.array(7)],
    ids=["tuple", "int", "str", "none", "0d-tensor", "np-scalar", "0d-ndarray"],
)
def test_slice_dp_passes_tuples_and_scalars_whole(value):
    for args, kwargs in dispatch("slice_dp", 2, (value,), {"kw": value}, dp_mesh(2)):
        assert args[0] is value
        assert kwargs["kw"] is value


def test_slice_dp_splits_keyword_arguments_too():
    pairs = dispatch("slice_dp", 2, (), {"batch": [1, 2, 3]}, dp_mesh(2))
    assert pairs == [((), {"batch": [1, 2]}), ((), {"batch": [3]})]


@pytest.mark.parametrize(
    "value",
    [
        [1, 2, 3],
        torch.arange(3),
        np.arange(3),
        {"ids": [1, 2, 3]},
        {"outer": {"t": torch.arange(3)}},
    ],
    ids=["list", "tensor", "ndarray", "dict-list", "nested-dict-tensor"],
)
@pytest.mark.parametrize("as_kwarg", [False, True])
def test_slice_dp_raises_batch_too_small_for_every_sliced_type(value, as_kwarg):
    args, kwargs = ((), {"x": value}) if as_kwarg else ((value,), {})
    with pytest.raises(ValueError, match="Batch too small for 4 workers") as info:
        dispatch("slice_dp", 4, args, kwargs, dp_mesh(4))
    assert isinstance(info.value, DispatchError)


def test_slice_dp_allows_an_empty_batch_on_every_rank():
    assert first_args(dispatch("slice_dp", 3, ([],), {}, dp_mesh(3))) == [[], [], []]


def test_slice_dp_batch_exactly_data_world_size_is_fine():
    mesh = DeviceMesh.from_sizes(dp_size=2, tp_size=2)
    assert first_args(dispatch("slice_dp", 4, ([1, 2],), {}, mesh)) == [[1], [1], [2], [2]]


def test_slice_dp_without_mesh_raises_naming_devicemesh():
    with pytest.raises(ValueError, match="DeviceMesh") as info:
        dispatch("slice_dp", 2, ([1, 2],), {}, None)
    assert isinstance(info.value, DispatchError)


# --------------------------------------------------------------------------- custom callables
def _record(seen):
    def positional(length, i, args, kwargs, device_mesh):
        seen.append((length, i, device_mesh))
        return (args[0][i],), kwargs

    def keyword_only(length, i, args, kwargs, *, device_mesh):
        seen.append((length, i, device_mesh))
        return (args[0][i],), kwargs

    def no_mesh(length, i, args, kwargs):
        seen.append((length, i, None))
        return (args[0][i],), kwargs

    def var_kw(length, i, args, kwargs, **extra):
        seen.append((length, i, extra["device_mesh"]))
        return (args[0][i],), kwargs

    def renamed(length, i, args, kwargs, mesh):
        seen.append((length, i, mesh))
        return (args[0][i],), kwargs

    return {
        "positional": positional,
        "keyword_only": keyword_only,
        "no_mesh": no_mesh,
        "var_kw": var_kw,
        "renamed": renamed,
    }


@pytest.mark.parametrize("form", ["positional", "keyword_only", "no_mesh", "var_kw", "renamed"])
def test_custom_dispatch_callable_forms_get_length_rank_args_kwargs_and_mesh(form):
    seen: list = []
    fn = _record(seen)[form]
    mesh = dp_mesh(3)
    pairs = dispatch(fn, 3, (["a", "b", "c"],), {"k": 1}, mesh)
    assert pairs == [(("a",), {"k": 1}), (("b",), {"k": 1}), (("c",), {"k": 1})]
    expected_mesh = None if form == "no_mesh" else mesh
    assert seen == [(3, 0, expected_mesh), (3, 1, expected_mesh), (3, 2, expected_mesh)]


def test_custom_dispatch_may_return_lists_for_args():
    pairs = dispatch(lambda n, i, a, k, device_mesh: ([i], {}), 2, (), {})
    assert pairs == [((0,), {}), ((1,), {})]


@pytest.mark.parametrize(
    "bad",
    [None, 5, ((1,),), ((1,), {}, {}), ({}, {}), ((1,), [("k", 1)]), "ab"],
    ids=["none", "int", "one-elem", "three-elem", "dict-args", "list-kwargs", "str"],
)
def test_custom_dispatch_wrong_return_shape_raises_naming_the_rank(bad):
    def fn(length, i, args, kwargs, device_mesh):
        return (args, kwargs) if i < 2 else bad

    with pytest.raises(DispatchError, match="rank 2"):
        dispatch(fn, 3, (1,), {}, None)


def test_custom_dispatch_with_too_few_parameters_is_rejected():
    with pytest.raises(ConfigurationError, match="device_mesh"):
        get_dispatcher(lambda length, i, args: ((), {}))


# --------------------------------------------------------------------------- registry
def test_builtin_dispatchers_are_registered():
    assert {"slice", "all", "slice_dp"} <= set(list_dispatchers())


@pytest.mark.parametrize("name", ["", "nope", "Slice", "slice-dp"])
def test_unknown_dispatch_name_raises_listing_valid_ones(name):
    with pytest.raises(ValueError) as info:
        get_dispatcher(name)
    assert isinstance(info.value, ConfigurationError)
    msg = str(info.value)
    assert repr(name) in msg
    assert all(repr(valid) in msg for valid in list_dispatchers())


def test_non_callable_non_name_dispatch_is_rejected():
    with pytest.raises(ConfigurationError):
        get_dispatcher(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["slice", "all", "slice_dp"])
@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.usefixtures("clean_registry")
def test_builtin_dispatchers_cannot_be_replaced(name, replace):
    before = get_dispatcher(name)
    with pytest.raises(ConfigurationError, match=name):
        register_dispatch(name, lambda length, i, args, kwargs, device_mesh: (args, kwargs), replace=replace)
    assert get_dispatcher(name) is before


@pytest.mark.usefixtures("clean_registry")
def test_registered_dispatch_is_usable_by_name_and_listed():
    def to_rank_zero(length, i, args, kwargs, device_mesh):
        return (args, kwargs) if i == 0 else ((), {})

    register_dispatch("rank_zero", to_rank_zero)
    assert "rank_zero" in list_dispatchers()
    assert dispatch("rank_zero", 3, (1, 2), {"k": 3}) == [((1, 2), {"k": 3}), ((), {}), ((), {})]


@pytest.mark.usefixtures("clean_registry")
def test_registering_a_custom_name_twice_needs_replace():
    register_dispatch("mine", lambda length, i, args, kwargs, device_mesh: (args, kwargs))
    with pytest.raises(ConfigurationError, match="replace=True"):
        register_dispatch("mine", lambda length, i, args, kwargs, device_mesh: ((), {}))
    register_dispatch("mine", lambda length, i, args, kwargs, device_mesh: ((), {}), replace=True)
    assert dispatch("mine", 2, (1,), {}) == [((), {}), ((), {})]


@pytest.mark.usefixtures("clean_registry")
@pytest.mark.parametrize("fn", [None, 3, "slice"])
def test_register_dispatch_requires_a_callable(fn):
    with pytest.raises(ConfigurationError):
        register_dispatch("mine", fn)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- every strategy
@pytest.mark.parametrize("name", ALL_DISPATCHERS)
@pytest.mark.parametrize("n", [1, 2, 4])
def test_every_dispatcher_returns_one_pair_per_rank_with_the_same_signature(name, n):
    pairs = dispatch(name, n, ([1, 2, 3, 4, 5, 6, 7, 8], "x", 3), {"a": 1, "b": [9, 8, 7, 6]}, dp_mesh(n))
    assert len(pairs) == n
    for args, kwargs in pairs:
        assert isinstance(args, tuple) and len(args) == 3
        assert isinstance(kwargs, dict) and set(kwargs) == {"a", "b"}


@pytest.mark.parametrize("name", ALL_DISPATCHERS)
def test_every_dispatcher_passes_scalars_and_tuples_whole(name):
    pairs = dispatch(name, 3, (5, "s", (1, 2)), {"k": None}, dp_mesh(3))
    assert pairs == [((5, "s", (1, 2)), {"k": None})] * 3


@pytest.mark.parametrize("name", ALL_DISPATCHERS)
def test_with_one_rank_every_dispatcher_passes_the_inputs_whole(name):
    value = [1, 2, 3]
    tensor = torch.arange(3)
    ((args, kwargs),) = dispatch(name, 1, (value, tensor), {"d": {"x": [1, 2]}}, dp_mesh(1))
    assert args[0] == value
    assert torch.equal(args[1], tensor)
    assert kwargs == {"d": {"x": [1, 2]}}


@pytest.mark.parametrize("name", ALL_DISPATCHERS)
def test_every_dispatcher_covers_a_divisible_list_exactly_once_or_whole(name):
    data = list(range(12))
    parts = first_args(dispatch(name, 4, (data,), {}, dp_mesh(4)))
    flat = [x for p in parts for x in p]
    assert flat == data or all(p == data for p in parts)
