"""Unit tests for twinkle_dask.mesh: DeviceGroup, resolve_groups and DeviceMesh (no cluster)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twinkle_dask.exceptions import ConfigurationError
from twinkle_dask.mesh import DeviceGroup, DeviceMesh, resolve_groups


# --------------------------------------------------------------------------- helpers
def data_ranks(mesh: DeviceMesh) -> list[int]:
    return [mesh.get_data_rank_from_global_rank(r) for r in range(mesh.world_size)]


def bounds(mesh: DeviceMesh, total: int) -> list[tuple[int, int]]:
    """(start, stop) of get_slice(total, i) for every data rank i."""
    out = []
    for i in range(mesh.data_world_size):
        s = mesh.get_slice(total, i)
        out.append((s.start, s.stop))
    return out


def rank_slices(mesh: DeviceMesh, total: int) -> list[tuple[int, int]]:
    """(start, stop) of the slice every global rank consumes."""
    out = []
    for r in range(mesh.world_size):
        s = mesh.get_slice(total, mesh.get_data_rank_from_global_rank(r))
        out.append((s.start, s.stop))
    return out


def resolved(*groups: DeviceGroup) -> dict[str, tuple[int, ...]]:
    return {g.name: g.ranks for g in resolve_groups(groups)}


@pytest.fixture
def no_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)


# --------------------------------------------------------------------------- from_sizes layout
@pytest.mark.parametrize(
    ("sizes", "names", "shape"),
    [
        ({"dp_size": 4}, ("dp",), (4,)),
        ({"dp_size": 2, "tp_size": 2}, ("dp", "tp"), (2, 2)),
        ({"pp_size": 2, "dp_size": 2}, ("pp", "dp"), (2, 2)),
        ({"fsdp_size": 2, "dp_size": 2}, ("fsdp", "dp"), (2, 2)),
        ({"dp_size": 2, "cp_size": 2}, ("dp", "cp"), (2, 2)),
        ({"tp_size": 2, "cp_size": 3, "dp_size": 1, "pp_size": 2, "fsdp_size": 2},
         ("fsdp", "pp", "dp", "cp", "tp"), (2, 2, 1, 3, 2)),
    ],
)
def test_from_sizes_lays_dims_out_in_order_fsdp_pp_dp_cp_tp(sizes, names, shape):
    mesh = DeviceMesh.from_sizes(**sizes)
    assert mesh.mesh_dim_names == names
    assert mesh.mesh.shape == shape
    assert mesh.mesh.flatten().tolist() == list(range(int(np.prod(shape))))
    assert mesh.world_size == int(np.prod(shape))


def test_from_sizes_infers_dp_from_world_size_when_dp_size_is_none():
    mesh = DeviceMesh.from_sizes(world_size=8, dp_size=None, tp_size=2)
    assert mesh.mesh_dim_names == ("dp", "tp")
    assert mesh.mesh.shape == (4, 2)
    assert mesh.data_world_size == 4


@pytest.mark.parametrize(
    "sizes",
    [
        {"world_size": 6, "dp_size": 2, "tp_size": 2},
        {"world_size": 7, "dp_size": None, "tp_size": 2},
        {"dp_size": 0},
        {"dp_size": 2, "tp_size": -1},
    ],
)
def test_from_sizes_rejects_inconsistent_sizes(sizes):
    with pytest.raises(ConfigurationError):
        DeviceMesh.from_sizes(**sizes)


@pytest.mark.parametrize(
    ("mesh", "names"),
    [
        (np.arange(4).reshape(2, 2), ("dp",)),
        (np.arange(4), ("xx",)),
        (np.arange(4).reshape(2, 2), ("dp", "dp")),
        (np.array([0, 0, 1, 2]), ("dp",)),
        (np.array([0.0, 1.0]), ("dp",)),
    ],
)
def test_mesh_rejects_bad_arrays_and_dim_names(mesh, names):
    with pytest.raises(ValueError):
        DeviceMesh(mesh=mesh, mesh_dim_names=names)


# --------------------------------------------------------------------------- concrete tables
def test_dp_tp_mesh_table():
    mesh = DeviceMesh.from_sizes(dp_size=2, tp_size=2)
    assert mesh.mesh.tolist() == [[0, 1], [2, 3]]
    assert mesh.data_world_size == 2
    assert data_ranks(mesh) == [0, 0, 1, 1]
    assert rank_slices(mesh, 10) == [(0, 5), (0, 5), (5, 10), (5, 10)]
    assert rank_slices(mesh, 5) == [(0, 3), (0, 3), (3, 5), (3, 5)]
    assert mesh.get_pp_first_ranks() == [0, 1, 2, 3]
    assert mesh.get_pp_last_ranks() == [0, 1, 2, 3]
    assert mesh.get_collect_ranks() == [0, 2]
    assert mesh.get_tp_last_ranks() == [1, 3]
    assert [mesh.get_tp_ranks(r) for r in range(4)] == [[0, 1], [0, 1], [2, 3], [2, 3]]


def test_pp_dp_mesh_table():
    mesh = DeviceMesh.from_sizes(pp_size=2, dp_size=2)
    assert mesh.mesh.tolist() == [[0, 1], [2, 3]]
    assert mesh.data_world_size == 2
    assert data_ranks(mesh) == [0, 1, 0, 1]
    assert rank_slices(mesh, 10) == [(0, 5), (5, 10), (0, 5), (5, 10)]
    assert rank_slices(mesh, 3) == [(0, 2), (2, 3), (0, 2), (2, 3)]
    assert mesh.get_pp_first_ranks() == [0, 1]
    assert mesh.get_pp_last_ranks() == [2, 3]
    assert mesh.get_collect_ranks() == [2, 3]
    assert mesh.get_tp_last_ranks() == [0, 1, 2, 3]


def test_fsdp_dp_mesh_table():
    # data rank = dp * fsdp_world_size + fsdp (Twinkle's formula); fsdp is the outer dim.
    mesh = DeviceMesh.from_sizes(fsdp_size=2, dp_size=2)
    assert mesh.mesh.tolist() == [[0, 1], [2, 3]]
    assert mesh.data_world_size == 4
    assert data_ranks(mesh) == [0, 2, 1, 3]
    assert bounds(mesh, 6) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert rank_slices(mesh, 6) == [(0, 2), (4, 5), (2, 4), (5, 6)]
    assert mesh.get_collect_ranks() == [0, 1, 2, 3]


def test_pp_dp_tp_mesh_collect_ranks_are_last_stage_with_tp_zero():
    mesh = DeviceMesh.from_sizes(pp_size=2, dp_size=2, tp_size=2)
    assert mesh.mesh_dim_names == ("pp", "dp", "tp")
    assert data_ranks(mesh) == [0, 0, 1, 1, 0, 0, 1, 1]
    assert mesh.get_pp_first_ranks() == [0, 1, 2, 3]
    assert mesh.get_pp_last_ranks() == [4, 5, 6, 7]
    assert mesh.get_collect_ranks() == [4, 6]
    assert mesh.get_tp_last_ranks() == [1, 3, 5, 7]
    assert mesh.get_tp_ranks(5) == [4, 5]


def test_dp_cp_mesh_collect_ranks_have_cp_zero():
    mesh = DeviceMesh.from_sizes(dp_size=2, cp_size=2)
    assert data_ranks(mesh) == [0, 0, 1, 1]
    assert mesh.get_collect_ranks() == [0, 2]


def test_dp_cp_tp_mesh_collect_ranks_have_cp_and_tp_zero():
    mesh = DeviceMesh.from_sizes(dp_size=2, cp_size=2, tp_size=2)
    assert mesh.mesh_dim_names == ("dp", "cp", "tp")
    assert mesh.get_collect_ranks() == [0, 4]


def test_full_five_dim_mesh_data_ranks():
    mesh = DeviceMesh.from_sizes(fsdp_size=2, pp_size=2, dp_size=2, cp_size=2, tp_size=2)
    expected = []
    for r in range(32):
        fsdp, pp, dp, cp, tp = np.unravel_index(r, (2, 2, 2, 2, 2))
        expected.append(int(dp) * 2 + int(fsdp))
    assert data_ranks(mesh) == expected
    assert mesh.data_world_size == 4
    assert mesh.get_pp_last_ranks() == [r for r in range(32) if (r // 8) % 2 == 1]
    assert mesh.get_collect_ranks() == [8, 12, 24, 28]


@pytest.mark.parametrize(
    ("dp", "ulysses", "expected_ranks", "world"),
    [
        (4, 2, [0, 0, 1, 1], 2),
        (4, 4, [0, 0, 0, 0], 1),
        (6, 3, [0, 0, 0, 1, 1, 1], 2),
    ],
)
def test_ulysses_ranks_share_data(dp, ulysses, expected_ranks, world):
    mesh = DeviceMesh.from_sizes(dp_size=dp, ulysses_size=ulysses)
    assert data_ranks(mesh) == expected_ranks
    assert mesh.data_world_size == world


@pytest.mark.parametrize(("dp", "ulysses"), [(4, 3), (2, 4), (3, 2)])
def test_ulysses_size_must_divide_the_data_world_size(dp, ulysses):
    with pytest.raises(ConfigurationError, match="ulysses"):
        DeviceMesh.from_sizes(dp_size=dp, ulysses_size=ulysses)


# --------------------------------------------------------------------------- missing dims
@pytest.mark.parametrize("names", [("tp",), ("pp",), ("cp",)])
def test_mesh_without_dp_has_data_world_size_one(names):
    mesh = DeviceMesh(mesh=np.arange(4), mesh_dim_names=names)
    assert mesh.data_world_size == 1
    assert data_ranks(mesh) == [0, 0, 0, 0]
    assert mesh.get_slice(7, 0) == slice(0, 7)
    assert mesh.get_slice(7) == slice(0, 7)


def test_mesh_with_fsdp_only_splits_data_fsdp_ways_as_twinkle():
    mesh = DeviceMesh(mesh=np.arange(4), mesh_dim_names=("fsdp",))
    assert mesh.data_world_size == 4
    assert data_ranks(mesh) == [0, 1, 2, 3]


@pytest.mark.parametrize("names", [("dp",), ("tp",), ("dp", "tp")])
def test_missing_pp_dim_makes_every_rank_first_and_last_stage(names):
    mesh = DeviceMesh(mesh=np.arange(4).reshape((4,) if len(names) == 1 else (2, 2)), mesh_dim_names=names)
    assert mesh.get_pp_first_ranks() == [0, 1, 2, 3]
    assert mesh.get_pp_last_ranks() == [0, 1, 2, 3]
    assert all(mesh.is_pp_first_rank(r) and mesh.is_pp_last_rank(r) for r in range(4))
    assert mesh.pp_world_size == 0


def test_missing_tp_dim_makes_each_rank_its_own_tp_group():
    mesh = DeviceMesh.from_sizes(dp_size=3)
    assert mesh.get_tp_ranks(2) == [2]
    assert mesh.get_tp_last_ranks() == [0, 1, 2]
    assert mesh.get_collect_ranks() == [0, 1, 2]


# --------------------------------------------------------------------------- current rank
RANK_HELPERS = ("dp_rank", "tp_rank", "pp_rank", "fsdp_rank", "data_rank")


@pytest.mark.parametrize(
    ("sizes", "rank", "expected"),
    [
        # expected: (dp_rank, tp_rank, pp_rank, fsdp_rank, data_rank)
        ({"dp_size": 2, "tp_size": 2}, 3, (1, 1, None, None, 1)),
        ({"dp_size": 2, "tp_size": 2}, 1, (0, 1, None, None, 0)),
        ({"pp_size": 2, "dp_size": 2}, 2, (0, None, 1, None, 0)),
        ({"pp_size": 2, "dp_size": 2}, 1, (1, None, 0, None, 1)),
        ({"fsdp_size": 2, "dp_size": 2}, 1, (1, None, None, 0, 2)),
        ({"fsdp_size": 2, "dp_size": 2}, 2, (0, None, None, 1, 1)),
    ],
)
def test_per_rank_helpers_read_rank_env(monkeypatch, sizes, rank, expected):
    monkeypatch.setenv("RANK", str(rank))
    mesh = DeviceMesh.from_sizes(**sizes)
    assert tuple(getattr(mesh, name) for name in RANK_HELPERS) == expected


def test_get_slice_without_rank_uses_current_data_rank(monkeypatch):
    mesh = DeviceMesh.from_sizes(dp_size=2, tp_size=2)
    monkeypatch.setenv("RANK", "2")
    assert mesh.get_slice(10) == slice(5, 10)
    monkeypatch.setenv("RANK", "1")
    assert mesh.get_slice(10) == slice(0, 5)


def test_tp_helpers_default_to_current_rank(monkeypatch):
    mesh = DeviceMesh.from_sizes(dp_size=2, tp_size=2)
    monkeypatch.setenv("RANK", "3")
    assert mesh.get_tp_ranks() == [2, 3]
    assert mesh.is_tp_last_rank()
    monkeypatch.setenv("RANK", "2")
    assert not mesh.is_tp_last_rank()


def test_pp_stage_checks_default_to_current_rank(monkeypatch):
    mesh = DeviceMesh.from_sizes(pp_size=2, dp_size=2)
    monkeypatch.setenv("RANK", "0")
    assert mesh.is_pp_first_rank() and not mesh.is_pp_last_rank()
    monkeypatch.setenv("RANK", "3")
    assert mesh.is_pp_last_rank() and not mesh.is_pp_first_rank()


@pytest.mark.usefixtures("no_rank")
def test_outside_a_component_per_rank_helpers_are_none_and_data_rank_is_zero():
    mesh = DeviceMesh.from_sizes(dp_size=2, tp_size=2)
    assert mesh.dp_rank is None
    assert mesh.tp_rank is None
    assert mesh.data_rank == 0


def test_rank_not_in_mesh_has_data_rank_zero():
    mesh = DeviceMesh.from_sizes(dp_size=2)
    assert mesh.get_data_rank_from_global_rank(17) == 0


# --------------------------------------------------------------------------- get_slice formula
@pytest.mark.parametrize(
    ("world", "total", "expected"),
    [
        (2, 10, [(0, 5), (5, 10)]),
        (3, 7, [(0, 3), (3, 5), (5, 7)]),
        (4, 6, [(0, 2), (2, 4), (4, 5), (5, 6)]),
        (4, 3, [(0, 1), (1, 2), (2, 3), (3, 3)]),
        (3, 0, [(0, 0), (0, 0), (0, 0)]),
        (1, 5, [(0, 5)]),
    ],
)
def test_get_slice_gives_first_m_ranks_one_extra_item(world, total, expected):
    assert bounds(DeviceMesh.from_sizes(dp_size=world), total) == expected


@settings(max_examples=200, deadline=None)
@given(world=st.integers(1, 9), total=st.integers(0, 60))
def test_get_slice_matches_the_spec_formula_and_partitions_the_data(world, total):
    mesh = DeviceMesh.from_sizes(dp_size=world)
    k, m = divmod(total, world)
    got = bounds(mesh, total)
    assert got == [(i * k + min(i, m), (i + 1) * k + min(i + 1, m)) for i in range(world)]
    assert got[0][0] == 0 and got[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(got, got[1:]))


def test_world_size_counts_every_rank():
    assert DeviceMesh.from_sizes(pp_size=2, dp_size=3, tp_size=2).world_size == 12
    assert DeviceMesh(mesh=np.array([[5, 7], [1, 0]]), mesh_dim_names=("dp", "tp")).world_size == 4


def test_mesh_equality_is_by_value():
    assert DeviceMesh.from_sizes(dp_size=2, tp_size=2) == DeviceMesh.from_sizes(dp_size=2, tp_size=2)
    assert DeviceMesh.from_sizes(dp_size=2, tp_size=2) != DeviceMesh.from_sizes(pp_size=2, dp_size=2)


# --------------------------------------------------------------------------- DeviceGroup
@pytest.mark.parametrize(
    ("given_type", "is_gpu"),
    [("cuda", True), ("CUDA", True), ("gpu", True), ("Gpu", True), ("cpu", False), ("CPU", False)],
)
def test_device_type_is_case_insensitive(given_type, is_gpu):
    assert DeviceGroup(name="g", ranks=2, device_type=given_type).is_gpu is is_gpu


@pytest.mark.parametrize("bad", ["npu", "tpu", "", "cuda:0", None, 3])
def test_unknown_device_type_raises_listing_valid_ones(bad):
    with pytest.raises(ValueError) as info:
        DeviceGroup(name="g", ranks=2, device_type=bad)
    assert isinstance(info.value, ConfigurationError)
    msg = str(info.value)
    assert all(valid in msg for valid in ("'cuda'", "'gpu'", "'cpu'"))


@pytest.mark.parametrize(("ranks", "g"), [(3, 2), ([0, 1, 2], 2), (4, 3)])
def test_gpus_per_worker_must_divide_ranks(ranks, g):
    with pytest.raises(ConfigurationError, match="gpus_per_worker"):
        DeviceGroup(name="g", ranks=ranks, device_type="cuda", gpus_per_worker=g)


def test_gpus_per_worker_groups_consecutive_devices_per_worker():
    group = DeviceGroup(name="g", ranks=4, device_type="cuda", gpus_per_worker=2)
    assert group.num_workers == 2
    (res,) = resolve_groups([group])
    assert res.devices == ((0, 1), (2, 3))
    assert res.num_workers == 2


@pytest.mark.parametrize("ranks", [0, -1, [], [0, 0], [-1], True, "4"])
def test_bad_ranks_are_rejected(ranks):
    with pytest.raises(ConfigurationError):
        DeviceGroup(name="g", ranks=ranks, device_type="cuda")


# --------------------------------------------------------------------------- resolve_groups
def test_int_gpu_groups_continue_after_the_previous_gpu_group():
    got = resolved(
        DeviceGroup("a", 2, "cuda"),
        DeviceGroup("c", 3, "cpu"),
        DeviceGroup("b", 2, "gpu"),
    )
    assert got == {"a": (0, 1), "c": (0, 1, 2), "b": (2, 3)}


def test_int_gpu_group_continues_after_an_explicit_rank_list():
    got = resolved(DeviceGroup("a", [4, 5], "cuda"), DeviceGroup("b", 2, "cuda"))
    assert got == {"a": (4, 5), "b": (6, 7)}


def test_int_gpu_group_continues_after_the_previous_groups_last_rank_not_the_highest():
    # Twinkle's rule: a count continues after the *previous* GPU group's last rank.
    got = resolved(
        DeviceGroup("a", [4, 5], "cuda"),
        DeviceGroup("b", [0, 1], "cuda"),
        DeviceGroup("c", 2, "cuda"),
    )
    assert got == {"a": (4, 5), "b": (0, 1), "c": (2, 3)}


def test_cpu_groups_take_int_counts_and_do_not_use_gpus():
    (res,) = resolve_groups([DeviceGroup("cpu", 3, "cpu")])
    assert res.ranks == (0, 1, 2)
    assert res.devices == ((), (), ())
    assert not res.is_gpu


@pytest.mark.parametrize(
    ("first", "second", "device"),
    [([0, 1], [1, 2], 1), (2, [1, 5], 1), ([3], [2, 3], 3)],
)
def test_overlapping_gpu_groups_raise_naming_group_and_device(first, second, device):
    with pytest.raises(ValueError) as info:
        resolve_groups([DeviceGroup("a", first, "cuda"), DeviceGroup("b", second, "cuda")])
    assert isinstance(info.value, ConfigurationError)
    msg = str(info.value)
    assert "'b'" in msg
    assert f"device {device}" in msg


def test_cpu_and_gpu_groups_never_overlap():
    got = resolved(DeviceGroup("a", [0, 1], "cuda"), DeviceGroup("b", 2, "cpu"))
    assert got == {"a": (0, 1), "b": (0, 1)}


def test_duplicate_group_names_raise():
    with pytest.raises(ConfigurationError, match="'a'"):
        resolve_groups([DeviceGroup("a", 1, "cpu"), DeviceGroup("a", 1, "cuda")])


def test_visible_devices_map_ranks_onto_physical_ids():
    (res,) = resolve_groups([DeviceGroup("a", 2, "cuda", visible_devices="4,6")])
    assert res.ranks == (0, 1)
    assert res.devices == ((4,), (6,))


def test_resolve_groups_rejects_non_groups():
    with pytest.raises(ConfigurationError):
        resolve_groups([{"name": "a"}])  # type: ignore[list-item]
