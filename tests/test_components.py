"""Building components in group workers: placement, identity, meshes, handles, errors."""

from __future__ import annotations

import pytest
from components import Broken, Echo, Loader, Stepper

import twinkle_dask as twinkle
from twinkle_dask import DeviceMesh, remote_class, remote_function
from twinkle_dask.exceptions import ConfigurationError, NotRemoteMethodError

pytestmark = pytest.mark.timeout(60)


def test_all_builds_one_instance_per_rank_with_torchrun_identity(cluster):
    echo = Echo(remote_group="model")
    ids = echo.identity()()
    assert [i["rank"] for i in ids] == [0, 1, 2, 3]
    assert {i["world"] for i in ids} == {4}
    assert len({i["pid"] for i in ids}) == 4
    for r, i in enumerate(ids):
        env = i["env"]
        assert env["RANK"] == str(r) and env["WORLD_SIZE"] == "4"
        assert env["LOCAL_RANK"] == str(r) and env["LOCAL_WORLD_SIZE"] == "4"
        assert env["CLUSTER_NAME"] == "model"
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert i["init"]["env"] == env, "identity during __init__ equals identity in methods"
    assert len({i["env"]["MASTER_PORT"] for i in ids}) == 1


def test_colocated_components_get_their_own_master_port(cluster):
    a, b = Echo(remote_group="model"), Echo(remote_group="model")
    port_a = a.identity()()[0]["env"]["MASTER_PORT"]
    port_b = b.identity()()[0]["env"]["MASTER_PORT"]
    assert port_a != port_b
    # each component keeps its identity when the other ran last on the same worker
    assert [i["env"]["MASTER_PORT"] for i in a.identity()()] == [port_a] * 4


def test_first_builds_one_instance_on_rank_zero_with_dp1_mesh(cluster):
    loader = Loader(remote_group="model", device_mesh=DeviceMesh.from_sizes(dp_size=4))
    assert loader.device_mesh.world_size == 1
    assert loader.mesh_info()() == [1, 1, 1]


def test_remote_group_is_stripped_from_init_and_set_on_instance(cluster):
    echo = Echo(tag="t", remote_group="sampler", other=3)
    ids = echo.identity()()
    assert [i["remote_group"] for i in ids] == ["sampler", "sampler"]
    assert ids[0]["extra"] == {"other": 3}
    assert echo.remote_group == "sampler"


def test_handle_is_an_instance_of_the_class_and_exposes_the_mesh(cluster):
    mesh = DeviceMesh.from_sizes(dp_size=2, tp_size=2)
    echo = Echo(device_mesh=mesh, remote_group="model")
    assert isinstance(echo, Echo)
    assert echo.device_mesh == mesh
    assert all(i["has_mesh"] for i in echo.identity()())


def test_mesh_larger_than_the_group_is_rejected(cluster):
    with pytest.raises(ConfigurationError, match="world size 8.*2 rank"):
        Echo(device_mesh=DeviceMesh.from_sizes(dp_size=8), remote_group="sampler")


def test_unknown_group_lists_the_known_ones(cluster):
    with pytest.raises(ValueError, match=r"unknown remote_group 'nope'.*\['data', 'model', 'sampler'\]"):
        Echo(remote_group="nope")


def test_building_twice_from_one_line_gives_two_components(cluster):
    handles = [Echo(tag=str(i), remote_group="sampler") for i in range(2)]
    assert handles[0] != handles[1]
    assert [h.identity()()[0]["tag"] for h in handles] == ["0", "1"]


def test_init_error_raises_at_construction_with_type_and_remote_traceback(cluster):
    with pytest.raises(ValueError, match="cannot build rank 1") as info:
        Broken(fail_rank=1, remote_group="model")
    notes = "\n".join(info.value.__notes__)
    assert "Broken.__init__ on rank 1 of group 'model'" in notes
    assert "remote traceback" in notes and "raise ValueError" in notes
    assert "test_components.py" in notes


def test_every_rank_is_seeded_before_init(cluster):
    a = Echo(remote_group="model").identity()()
    b = Echo(remote_group="model").identity()()
    assert len({tuple(i["init_random"]) for i in a + b}) == 1


def test_undecorated_method_on_handle_names_the_fix(cluster):
    echo = Echo(remote_group="data")
    with pytest.raises(NotRemoteMethodError, match=r"Echo\.local_only is not a remote method.*@remote_function"):
        echo.local_only()
    with pytest.raises(AttributeError, match=r"Echo\.tag lives on the remote instances"):
        echo.tag  # noqa: B018


def test_len_is_eager_and_comes_from_rank_zero(cluster):
    loader = Loader(n_batches=7, remote_group="data")
    assert len(loader) == 7


def test_driver_iteration_follows_the_iter_collect_and_laziness(cluster):
    loader = Loader(n_batches=3, batch=2, remote_group="data")
    batches = list(loader)
    assert [b() for b in batches] == [[0, 1], [2, 3], [4, 5]]


def test_iteration_stops_when_any_rank_is_exhausted(cluster):
    stepper = Stepper([5, 2, 4, 3], remote_group="model")
    assert list(stepper) == [[1, 1, 1, 1], [2, 2, 2, 2]]


def test_handle_pickles_into_another_component(cluster):
    import pickle

    echo = Echo(remote_group="sampler")
    clone = pickle.loads(pickle.dumps(echo))
    assert clone == echo and clone.count() == 2


def test_peer_picks_the_ranks_of_the_creating_process(cluster, monkeypatch):
    @remote_class(execute="peer")
    class Peer(Echo):
        pass

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    peer = Peer(remote_group="model")
    ids = peer.identity()()
    addrs = cluster.scheduler_info(n_workers=-1)["workers"]
    names = {a: str(w["name"]) for a, w in addrs.items()}
    assert len(ids) == 2
    assert sorted(names[a] for a in twinkle.group._state(peer).addresses) == ["model-2", "model-3"]


def test_method_names_clashing_with_handle_attributes_are_rejected(cluster):
    @remote_class()
    class Clash:
        @remote_function()
        def device_mesh(self):
            return 1

    with pytest.raises(ConfigurationError, match="device_mesh"):
        Clash(remote_group="sampler")
