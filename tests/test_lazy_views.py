"""Unit tests for twinkle_dask.lazy: Meta, plan_view and the views dispatch slices unseen.

The contract (semantics.md, "Lazy results"): a consumer rank given a lazy input gets exactly what
it would get had the driver collected the value and dispatched it with the consumer's own
dispatch and mesh, fetching only the producer shards its slice needs. Here the fetch is faked
with ``twinkle_dask._worker.resolve.extract`` over the producer results held in memory.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twinkle_dask._worker.resolve import extract
from twinkle_dask.collect import collect
from twinkle_dask.dispatch import dispatch
from twinkle_dask.exceptions import DispatchError
from twinkle_dask.lazy import (
    KEEP,
    ConcatView,
    ItemsView,
    LazySource,
    LazyView,
    Meta,
    ShardView,
    plan_view,
    replace,
)
from twinkle_dask.mesh import DeviceMesh

VIEW_COLLECTS = ("none", "first", "flatten", "last_pp", "last_pp_first")
SLICING_DISPATCHES = ("slice", "slice_dp")


# --------------------------------------------------------------------------- helpers
def source(results: list[Any], name: str, mesh: DeviceMesh | None = None) -> LazySource:
    return LazySource(cid="c", call_id=1, addresses=("a",) * len(results), collect=name, mesh=mesh, label="P.m")


def view_of(results: list[Any], name: str, mesh: DeviceMesh | None = None) -> LazyView:
    view = plan_view(source(results, name, mesh), [Meta.of(r) for r in results])
    assert view is not None, f"no view for collect={name!r} over {results!r}"
    return view


def views_in(obj: Any) -> list[LazyView]:
    found: list[LazyView] = []

    def note(x: Any) -> Any:
        if isinstance(x, LazyView):
            found.append(x)
            return x
        return KEEP

    replace(obj, note)
    return found


def requests(obj: Any) -> list[tuple]:
    """The fetch keys a consumer rank's (sliced) inputs ask for, in order."""
    return [shard.key for view in views_in(obj) for shard in view.shards()]


def materialize(obj: Any, results: list[Any]) -> Any:
    """Replace every view in ``obj`` by its value, fetching from ``results`` as a worker would."""
    fetched = {
        shard.key: extract(results[shard.index], shard.path, shard.rng)
        for view in views_in(obj)
        for shard in view.shards()
    }
    return replace(obj, lambda x: x.assemble(fetched) if isinstance(x, LazyView) else KEEP)


def wrap(value: Any, where: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if where == "positional":
        return (value, 7), {}
    if where == "keyword":
        return (), {"batch": value, "step": 7}
    return ({"batch": value, "step": 7},), {}


def input_of(results: list[Any], name: str, mesh: DeviceMesh | None = None) -> Any:
    """What a consumer dispatches over: the view, or (where none can be planned) the collected value."""
    view = plan_view(source(results, name, mesh), [Meta.of(r) for r in results])
    return view if view is not None else collect(name, results, mesh)


def lazy_pairs(d: str, n: int, results: list[Any], name: str, pmesh, cmesh, where: str = "positional"):
    args, kwargs = wrap(input_of(results, name, pmesh), where)
    return [materialize(pair, results) for pair in dispatch(d, n, args, kwargs, cmesh)]


def eager_pairs(d: str, n: int, results: list[Any], name: str, pmesh, cmesh, where: str = "positional"):
    args, kwargs = wrap(collect(name, results, pmesh), where)
    return dispatch(d, n, args, kwargs, cmesh)


def assert_same(got: Any, exp: Any, where: str = "value") -> None:
    """Exact structural equality: same types, dtypes, shapes, keys (in order) and values."""
    assert type(got) is type(exp), f"{where}: {type(got).__name__} != {type(exp).__name__}"
    if isinstance(exp, torch.Tensor):
        assert got.dtype == exp.dtype, f"{where}: dtype {got.dtype} != {exp.dtype}"
        assert got.shape == exp.shape, f"{where}: shape {tuple(got.shape)} != {tuple(exp.shape)}"
        assert torch.equal(got, exp), f"{where}: {got} != {exp}"
    elif isinstance(exp, np.ndarray):
        assert got.dtype == exp.dtype, f"{where}: dtype {got.dtype} != {exp.dtype}"
        assert got.shape == exp.shape, f"{where}: shape {got.shape} != {exp.shape}"
        assert np.array_equal(got, exp), f"{where}: {got} != {exp}"
    elif isinstance(exp, dict):
        assert list(got) == list(exp), f"{where}: keys {list(got)} != {list(exp)}"
        for key in exp:
            assert_same(got[key], exp[key], f"{where}[{key!r}]")
    elif isinstance(exp, (list, tuple)):
        assert len(got) == len(exp), f"{where}: length {len(got)} != {len(exp)}"
        for i, (g, e) in enumerate(zip(got, exp)):
            assert_same(g, e, f"{where}[{i}]")
    else:
        assert got == exp, f"{where}: {got!r} != {exp!r}"


def check_property(d: str, n: int, results: list[Any], name: str, pmesh, cmesh, where: str = "positional") -> None:
    try:
        expected = eager_pairs(d, n, results, name, pmesh, cmesh, where)
    except DispatchError:
        with pytest.raises(DispatchError):
            lazy_pairs(d, n, results, name, pmesh, cmesh, where)
        return
    assert_same(lazy_pairs(d, n, results, name, pmesh, cmesh, where), expected, "ranks")


def first_of(pairs: list) -> list:
    """The first positional argument each rank received."""
    return [args[0] for args, _ in pairs]


def fetch(index: int, path: tuple = (), rng: tuple[int, int] | None = None) -> tuple:
    return ("c", 1, index, path, rng)


# --------------------------------------------------------------------------- hypothesis data
def producer_meshes(p: int) -> list[DeviceMesh | None]:
    meshes: list[DeviceMesh | None] = [None, DeviceMesh.from_sizes(dp_size=p)]
    if p % 2 == 0:
        meshes.append(DeviceMesh.from_sizes(pp_size=2, dp_size=p // 2))
    if p == 4:
        meshes.append(DeviceMesh.from_sizes(pp_size=2, dp_size=1, tp_size=2))
    return meshes


def consumer_meshes(n: int) -> list[DeviceMesh]:
    meshes = [DeviceMesh.from_sizes(dp_size=n)]
    if n % 2 == 0:
        h = n // 2
        meshes += [
            DeviceMesh.from_sizes(dp_size=h, tp_size=2),
            DeviceMesh.from_sizes(pp_size=2, dp_size=h),
            DeviceMesh.from_sizes(fsdp_size=2, dp_size=h),
            DeviceMesh.from_sizes(dp_size=n, ulysses_size=2),
        ]
    return meshes


SEQ_KINDS = ("list", "tensor", "tensor2d", "ndarray", "str")


@st.composite
def leaf(draw: st.DrawFn, kind: str) -> Any:
    length = draw(st.integers(0, 5))
    ints = draw(st.lists(st.integers(-9, 9), min_size=length, max_size=length))
    if kind == "list":
        return ints
    if kind == "tensor":
        return torch.tensor(ints, dtype=torch.int64)
    if kind == "tensor2d":
        pairs = draw(st.lists(st.floats(-4, 4, width=32), min_size=2 * length, max_size=2 * length))
        return torch.tensor(pairs, dtype=torch.float32).reshape(length, 2)
    if kind == "ndarray":
        return np.array(ints, dtype=np.int64)
    if kind == "str":
        return "".join(chr(ord("a") + abs(i) % 5) for i in ints)
    if kind == "scalar":
        return draw(st.one_of(st.none(), st.integers(-5, 5), st.booleans()))
    raise AssertionError(kind)


@st.composite
def dict_results(draw: st.DrawFn, p: int, value_kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    """``p`` dicts with the same keys, each key holding the same kind on every rank."""
    keys = draw(st.lists(st.sampled_from(["ids", "mask", "labels", "inner"]), min_size=1, max_size=3, unique=True))
    kinds = {k: draw(st.sampled_from(value_kinds)) for k in keys}
    inner_kind = draw(st.sampled_from(value_kinds))
    out = []
    for _ in range(p):
        item: dict[str, Any] = {}
        for k in keys:
            item[k] = {"x": draw(leaf(inner_kind))} if k == "inner" else draw(leaf(kinds[k]))
        out.append(item)
    return out


@st.composite
def flatten_results(draw: st.DrawFn) -> list[Any]:
    p = draw(st.integers(1, 4))
    kind = draw(st.sampled_from((*SEQ_KINDS, "dict")))
    if kind == "dict":
        return draw(dict_results(p, SEQ_KINDS))
    return [draw(leaf(kind)) for _ in range(p)]


@st.composite
def any_results(draw: st.DrawFn) -> list[Any]:
    """Per-rank results of any kind a view can describe (kinds may differ between ranks)."""
    p = draw(st.integers(1, 4))
    if draw(st.booleans()):
        return draw(dict_results(p, (*SEQ_KINDS, "scalar")))
    return [draw(leaf(draw(st.sampled_from((*SEQ_KINDS, "scalar"))))) for _ in range(p)]


@st.composite
def scenario(draw: st.DrawFn, results_strategy: st.SearchStrategy, names: tuple[str, ...]):
    results = draw(results_strategy)
    name = draw(st.sampled_from(names))
    pmesh = draw(st.sampled_from(producer_meshes(len(results))))
    n = draw(st.integers(1, 6))
    cmesh = draw(st.sampled_from(consumer_meshes(n)))
    d = draw(st.sampled_from(SLICING_DISPATCHES))
    where = draw(st.sampled_from(("positional", "keyword", "in_dict")))
    return d, n, results, name, pmesh, cmesh, where


# --------------------------------------------------------------------------- the key property
@settings(max_examples=150, deadline=None)
@given(scenario(flatten_results(), ("flatten",)))
def test_flattened_view_dispatches_like_the_collected_value(case):
    check_property(*case)


@settings(max_examples=150, deadline=None)
@given(scenario(any_results(), ("none", "first", "last_pp", "last_pp_first")))
def test_picked_results_view_dispatches_like_the_collected_value(case):
    check_property(*case)


@settings(max_examples=60, deadline=None)
@given(scenario(flatten_results(), VIEW_COLLECTS))
def test_every_view_collect_dispatches_like_the_collected_value_for_sequences(case):
    check_property(*case)


@pytest.mark.parametrize("name", VIEW_COLLECTS)
@pytest.mark.parametrize("d", [*SLICING_DISPATCHES, "all"])
@pytest.mark.parametrize(
    "results",
    [
        [[1, 2, 3], [4, 5], [6, 7, 8]],
        [torch.arange(4), torch.arange(4, 8)],
        [np.arange(6).reshape(3, 2), np.arange(6, 10).reshape(2, 2)],
        [{"ids": [1, 2], "t": torch.tensor([1.0, 2.0])}, {"ids": [3, 4], "t": torch.tensor([3.0, 4.0])}],
        [[1, 2, 3, 4]],
    ],
    ids=["lists", "tensors", "2d-arrays", "dicts", "single-producer"],
)
def test_view_dispatch_matches_collected_value_on_concrete_inputs(name, d, results):
    for cmesh in consumer_meshes(4):
        check_property(d, 4, results, name, DeviceMesh.from_sizes(dp_size=len(results)), cmesh)


# --------------------------------------------------------------------------- shards fetched
def test_each_consumer_rank_fetches_only_its_producer_shard():
    results = [torch.arange(4 * k, 4 * k + 4) for k in range(4)]
    view = view_of(results, "flatten", DeviceMesh.from_sizes(dp_size=4))
    pairs = dispatch("slice_dp", 4, (view,), {}, DeviceMesh.from_sizes(dp_size=4))
    assert [requests(pair) for pair in pairs] == [[fetch(k, (), (0, 4))] for k in range(4)]


def test_a_slice_straddling_producers_fetches_each_overlap():
    results = [[0, 1, 2], [3, 4, 5]]
    pairs = dispatch("slice_dp", 3, (view_of(results, "flatten"),), {}, DeviceMesh.from_sizes(dp_size=3))
    assert [requests(pair) for pair in pairs] == [
        [fetch(0, (), (0, 2))],
        [fetch(0, (), (2, 3)), fetch(1, (), (0, 1))],
        [fetch(1, (), (1, 3))],
    ]
    assert [materialize(pair, results)[0][0] for pair in pairs] == [[0, 1], [2, 3], [4, 5]]


def test_tp_peers_fetch_the_same_shards():
    results = [[0, 1], [2, 3], [4, 5], [6, 7]]
    pairs = dispatch("slice_dp", 4, (view_of(results, "flatten"),), {}, DeviceMesh.from_sizes(dp_size=2, tp_size=2))
    assert [requests(pair) for pair in pairs] == [
        [fetch(0, (), (0, 2)), fetch(1, (), (0, 2))],
        [fetch(0, (), (0, 2)), fetch(1, (), (0, 2))],
        [fetch(2, (), (0, 2)), fetch(3, (), (0, 2))],
        [fetch(2, (), (0, 2)), fetch(3, (), (0, 2))],
    ]


def test_flattened_dicts_fetch_per_key_ranges():
    results = [{"ids": [0, 1], "t": torch.tensor([0, 1])}, {"ids": [2, 3], "t": torch.tensor([2, 3])}]
    pairs = dispatch("slice_dp", 2, (view_of(results, "flatten"),), {}, DeviceMesh.from_sizes(dp_size=2))
    assert [requests(pair) for pair in pairs] == [
        [fetch(0, ("ids",), (0, 2)), fetch(0, ("t",), (0, 2))],
        [fetch(1, ("ids",), (0, 2)), fetch(1, ("t",), (0, 2))],
    ]


@pytest.mark.parametrize(("name", "index"), [("first", 0), ("last_pp_first", 2)])
def test_single_result_collects_fetch_only_that_producer(name, index):
    results = [[10 * k + i for i in range(4)] for k in range(4)]
    view = view_of(results, name, DeviceMesh.from_sizes(pp_size=2, dp_size=2))
    assert isinstance(view, ShardView) and view.index == index
    pairs = dispatch("slice_dp", 2, (view,), {}, DeviceMesh.from_sizes(dp_size=2))
    assert [requests(pair) for pair in pairs] == [[fetch(index, (), (0, 2))], [fetch(index, (), (2, 4))]]
    assert [materialize(pair, results)[0][0] for pair in pairs] == [results[index][:2], results[index][2:]]


def test_last_pp_view_fetches_only_last_stage_results_a_rank_receives():
    results = ["s0", "s1", "s2", "s3"]
    view = view_of(results, "last_pp", DeviceMesh.from_sizes(pp_size=2, dp_size=2))
    assert isinstance(view, ItemsView) and len(view) == 2
    pairs = dispatch("slice", 2, (view,), {})
    assert [requests(pair) for pair in pairs] == [[fetch(2)], [fetch(3)]]
    assert [materialize(pair, results)[0][0] for pair in pairs] == [["s2"], ["s3"]]


def test_none_view_fetches_only_the_results_a_rank_receives():
    results = [{"loss": float(k)} for k in range(4)]
    pairs = dispatch("slice_dp", 2, (view_of(results, "none"),), {}, DeviceMesh.from_sizes(dp_size=2))
    assert [requests(pair) for pair in pairs] == [[fetch(0), fetch(1)], [fetch(2), fetch(3)]]


@settings(max_examples=120, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=4),
    n=st.integers(1, 6),
)
def test_flattened_slice_fetches_exactly_the_overlapping_ranges(lengths, n):
    results = [list(range(sum(lengths[:i]), sum(lengths[: i + 1]))) for i in range(len(lengths))]
    total = sum(lengths)
    mesh = DeviceMesh.from_sizes(dp_size=n)
    try:
        pairs = dispatch("slice_dp", n, (view_of(results, "flatten"),), {}, mesh)
    except DispatchError:
        assert 0 < total < n
        return
    offsets = [sum(lengths[:i]) for i in range(len(lengths))]
    for rank, pair in enumerate(pairs):
        s = mesh.get_slice(total, rank)
        expected = [
            fetch(i, (), (max(s.start, off) - off, min(s.stop, off + size) - off))
            for i, (off, size) in enumerate(zip(offsets, lengths))
            if max(s.start, off) < min(s.stop, off + size)
        ]
        if s.start == s.stop:
            expected = [fetch(0, (), (0, 0))]
        assert requests(pair) == expected
        assert materialize(pair, results)[0][0] == list(range(s.start, s.stop))


# --------------------------------------------------------------------------- plan_view shapes
@pytest.mark.parametrize(
    ("name", "results", "view_type"),
    [
        ("none", [[1], [2]], ItemsView),
        ("none", [[1, 2]], ShardView),
        ("first", [[1], [2]], ShardView),
        ("last_pp", [[1], [2]], ItemsView),
        ("last_pp_first", [[1], [2]], ShardView),
        ("flatten", [[1], [2]], ConcatView),
        ("flatten", [{"a": [1]}, {"a": [2]}], ConcatView),
    ],
)
def test_plan_view_builds_the_view_for_the_collect(name, results, view_type):
    assert type(view_of(results, name)) is view_type


@pytest.mark.parametrize(
    ("name", "results"),
    [
        ("mean", [1.0, 2.0]),
        ("sum", [1, 2]),
        ("avg", [1.0, 2.0]),
        ("none", [(1, 2), (3, 4)]),
        ("flatten", [[1], torch.tensor([2])]),
        ("flatten", [1, 2]),
        ("flatten", [{"a": [1]}, {"b": [2]}]),
        ("first", [{1: [1]}]),
    ],
    ids=["mean", "sum", "avg", "tuples", "mixed-kinds", "scalars", "different-keys", "int-keys"],
)
def test_plan_view_declines_where_only_the_value_will_do(name, results):
    assert plan_view(source(results, name), [Meta.of(r) for r in results]) is None


def test_plan_view_declines_custom_collect_and_unknown_metas():
    results = [[1], [2]]
    assert plan_view(source(results, lambda rs, device_mesh: rs), [Meta.of(r) for r in results]) is None
    assert plan_view(source(results, "flatten"), [Meta.of(results[0]), None]) is None
    assert plan_view(source(results, "flatten"), []) is None


# --------------------------------------------------------------------------- Meta
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, Meta("none")),
        ([1, 2, 3], Meta("list", 3)),
        ((1, 2), Meta("tuple", 2)),
        ("abcd", Meta("str", 4)),
        (b"ab", Meta("bytes", 2)),
        (np.zeros((5, 2)), Meta("ndarray", 5, dtype="float64", tail=(2,))),
        (np.array(3.0), Meta("other")),
        (torch.zeros(3, 4), Meta("tensor", 3, dtype="torch.float32", tail=(4,))),
        (torch.tensor(1.0), Meta("other")),
        (7, Meta("other")),
        ({"a": [1], "b": 2}, Meta("dict", 2, ("a", "b"), (Meta("list", 1), Meta("other")))),
        ({1: "x"}, Meta("dict", 1)),
    ],
)
def test_meta_of_describes_kind_length_and_keys(value, expected):
    assert Meta.of(value) == expected


def test_meta_of_describes_dicts_three_levels_deep():
    meta = Meta.of({"a": {"b": {"c": {"d": [1]}}}})
    assert meta.keys == ("a",)
    assert meta.items[0].keys == ("b",)
    assert meta.items[0].items[0].keys == ("c",)
    assert meta.items[0].items[0].items[0] == Meta("dict", 1)
    assert not meta.viewable, "a dict described only in part cannot be sliced unseen"


def test_meta_of_leaves_dict_subclasses_undescribed():
    assert Meta.of(OrderedDict(a=[1])) == Meta("dict", 1)


@pytest.mark.parametrize("value", [None, [1, 2], {"a": {"b": [1, 2]}, "c": "xy"}, torch.zeros(2), 5])
def test_meta_round_trips_through_the_wire(value):
    meta = Meta.of(value)
    assert Meta.from_wire(meta.to_wire()) == meta


# --------------------------------------------------------------------------- spec violations
@pytest.mark.parametrize(
    "results",
    [
        [np.array([1, 2, 3, 4]), np.array([])],
        [torch.tensor([1, 2]), torch.tensor([0.5, 1.5])],
    ],
    ids=["ndarray-int-and-empty-float", "tensor-int-and-float"],
)
def test_flattened_view_of_mixed_dtypes_gives_the_promoted_dtype_like_the_collected_value(results):
    # collect('flatten') concatenates with dtype promotion (float64 / float32); each rank's
    # slice of the collected value has that dtype, whatever producer shard it came from.
    # No view is planned for such shards: the consumer collects the whole value.
    assert plan_view(source(results, "flatten"), [Meta.of(r) for r in results]) is None
    mesh = DeviceMesh.from_sizes(dp_size=2)
    expected = eager_pairs("slice_dp", 2, results, "flatten", None, mesh)
    assert_same(lazy_pairs("slice_dp", 2, results, "flatten", None, mesh), expected, "ranks")


@pytest.mark.parametrize(
    ("name", "results", "pmesh"),
    [
        ("first", [{"a": {"b": {"c": [1, 2, 3, 4]}}}, {"a": {"b": {"c": []}}}], None),
        ("first", [{"a": {"b": {"c": {"d": [1, 2, 3, 4]}}}}], None),
        ("none", [{"a": {"b": {"c": [1, 2, 3, 4]}}}], None),
        ("last_pp_first", [{"a": {"b": {"c": []}}}, {"a": {"b": {"c": [1, 2, 3, 4]}}}],
         DeviceMesh.from_sizes(pp_size=2, dp_size=1)),
    ],
)
def test_three_level_dict_view_slices_like_the_collected_value(name, results, pmesh):
    # slice_dp recurses into every dict level, described by Meta or not.
    mesh = DeviceMesh.from_sizes(dp_size=2)
    expected = eager_pairs("slice_dp", 2, results, name, pmesh, mesh)
    if "d" not in str(results):
        assert_same(first_of(expected), [{"a": {"b": {"c": [1, 2]}}}, {"a": {"b": {"c": [3, 4]}}}])
    assert_same(lazy_pairs("slice_dp", 2, results, name, pmesh, mesh), expected, "ranks")


def test_view_of_a_dict_subclass_keeps_its_type_under_slice_dp():
    results = [OrderedDict(ids=[1, 2, 3, 4])]
    mesh = DeviceMesh.from_sizes(dp_size=2)
    expected = eager_pairs("slice_dp", 2, results, "first", None, mesh)
    assert [type(v) for v in first_of(expected)] == [OrderedDict, OrderedDict]
    assert_same(lazy_pairs("slice_dp", 2, results, "first", None, mesh), expected, "ranks")

