"""Property tests: dispatch then collect loses and duplicates nothing the spec does not say it should."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twinkle_dask import DeviceMesh
from twinkle_dask.collect import collect
from twinkle_dask.dispatch import dispatch
from twinkle_dask.exceptions import DispatchError

SETTINGS = settings(max_examples=150, deadline=None)

items = st.lists(st.integers(-1000, 1000), max_size=40)


@st.composite
def meshes(draw: st.DrawFn) -> DeviceMesh:
    sizes = {name: draw(st.sampled_from([None, 1, 2])) for name in ("fsdp", "pp", "cp", "tp")}
    return DeviceMesh.from_sizes(dp_size=draw(st.integers(1, 4)), **{f"{k}_size": v for k, v in sizes.items()})


def as_kind(values: list[int], kind: str):
    if kind == "list":
        return list(values)
    if kind == "ndarray":
        return np.array(values, dtype=np.int64)
    return torch.tensor(values, dtype=torch.int64)


def to_list(value) -> list[int]:
    return [int(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]


@SETTINGS
@given(data=items, n=st.integers(1, 8))
def test_slice_then_flatten_gives_back_the_list(data, n):
    pairs = dispatch("slice", n, (data,), {})
    parts = [args[0] for args, _ in pairs]
    assert [len(p) for p in parts] == sorted((len(p) for p in parts), reverse=True)  # earlier ranks take extras
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    assert collect("flatten", parts) == data


@SETTINGS
@given(data=items, mesh=meshes(), kind=st.sampled_from(["list", "ndarray", "tensor"]))
def test_slice_dp_over_collect_ranks_gives_back_the_input_once(data, mesh, kind):
    n = mesh.world_size
    value = as_kind(data, kind)
    try:
        pairs = dispatch("slice_dp", n, (value,), {}, mesh)
    except DispatchError:
        # only when some data ranks would get items and others none
        assert 0 < len(data) < mesh.data_world_size
        return
    parts = [args[0] for args, _ in pairs]
    # one replica per data shard, in data-rank order, gives the input exactly once
    by_data_rank = {}
    for rank in mesh.get_collect_ranks():
        by_data_rank.setdefault(mesh.get_data_rank_from_global_rank(rank), to_list(parts[rank]))
    assert sorted(by_data_rank) == list(range(mesh.data_world_size))
    assert [x for d in sorted(by_data_rank) for x in by_data_rank[d]] == data


@SETTINGS
@given(data=items, mesh=meshes())
def test_slice_dp_replicas_get_identical_data_and_nothing_else_repeats(data, mesh):
    n = mesh.world_size
    try:
        pairs = dispatch("slice_dp", n, (data,), {}, mesh)
    except DispatchError:
        return
    parts = [args[0] for args, _ in pairs]
    groups: dict[int, list[list[int]]] = {}
    for rank, part in enumerate(parts):
        groups.setdefault(mesh.get_data_rank_from_global_rank(rank), []).append(part)
    replicas = n // mesh.data_world_size
    for same in groups.values():
        assert len(same) == replicas and all(p == same[0] for p in same)
    flat = collect("flatten", parts)
    assert sorted(flat) == sorted(data * replicas)


@SETTINGS
@given(
    batch=st.dictionaries(st.sampled_from(["ids", "mask", "labels"]), items, min_size=1, max_size=3),
    dp=st.integers(1, 4),
)
def test_slice_dp_of_dicts_then_flatten_per_key_gives_back_the_dict(batch, dp):
    mesh = DeviceMesh.from_sizes(dp_size=dp)
    # every value needs the same length for per-key slicing to line up rows
    length = min(len(v) for v in batch.values())
    batch = {k: v[:length] for k, v in batch.items()}
    try:
        pairs = dispatch("slice_dp", dp, (batch,), {}, mesh)
    except DispatchError:
        assert 0 < length < dp
        return
    parts = [args[0] for args, _ in pairs]
    assert collect("flatten", parts) == batch


@SETTINGS
@given(results=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=8))
def test_mean_and_sum_match_numpy(results):
    assert collect("sum", results) == pytest.approx(float(np.sum(results)))
    assert collect("mean", results) == pytest.approx(float(np.mean(results)))
