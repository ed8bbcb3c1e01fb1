"""GPU groups on a machine without GPUs: the simulation gives workers exactly a GPU worker's view."""

from __future__ import annotations

import os

import pytest
from components import IDENTITY_VARS

from twinkle_dask import DeviceGroup, remote_class, remote_function
from twinkle_dask._deploy.cluster import gpu_count, rotated_devices
from twinkle_dask.exceptions import ConfigurationError
from twinkle_dask.testing import local_session

pytestmark = pytest.mark.timeout(120)


@remote_class()
class Env:
    @remote_function(dispatch="all")
    def env(self):
        return {k: os.environ.get(k) for k in (*IDENTITY_VARS, "CUDA_VISIBLE_DEVICES")}


@pytest.mark.parametrize(
    ("devices", "per_worker", "expected"),
    [
        ([0, 1, 2, 3], 1, ["0,1,2,3", "1,2,3,0", "2,3,0,1", "3,0,1,2"]),
        ([4, 5, 6, 7], 2, ["4,5,6,7", "6,7,4,5"]),
        ([3], 1, ["3"]),
    ],
)
def test_each_worker_sees_its_own_devices_first(devices, per_worker, expected):
    assert [rotated_devices(devices, i, per_worker) for i in range(len(expected))] == expected


def test_simulated_gpu_groups_get_devices_tags_and_identity():
    groups = [
        DeviceGroup(name="cpu", ranks=1, device_type="cpu"),
        DeviceGroup(name="actor", ranks=2, device_type="cuda"),
        DeviceGroup(name="ref", ranks=2, device_type="GPU"),
        DeviceGroup(name="big", ranks=4, device_type="cuda", gpus_per_worker=2),
    ]
    with local_session(*groups, simulate_gpus=True) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        names = {str(w["name"]): sorted(w["resources"]) for w in workers}
        assert names == {
            "cpu-0": ["twinkle-cpu"], "actor-0": ["twinkle-actor"], "actor-1": ["twinkle-actor"],
            "ref-0": ["twinkle-ref"], "ref-1": ["twinkle-ref"], "big-0": ["twinkle-big"], "big-1": ["twinkle-big"],
        }
        seen = {g: Env(remote_group=g).env()() for g in ("actor", "ref", "big")}
    # int counts continue after the previous GPU group: actor 0-1, ref 2-3, big 4-7
    assert [e["CUDA_VISIBLE_DEVICES"] for e in seen["actor"]] == ["0,1", "1,0"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in seen["ref"]] == ["2,3", "3,2"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in seen["big"]] == ["4,5,6,7", "6,7,4,5"]
    for group, envs in seen.items():
        for rank, env in enumerate(envs):
            assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == "2"
            assert env["LOCAL_RANK"] == "0" and env["LOCAL_WORLD_SIZE"] == "1"
            assert env["CLUSTER_NAME"] == group


@pytest.mark.skipif(gpu_count() > 0, reason="this machine has GPUs")
def test_gpu_group_without_gpus_names_the_simulation():
    with pytest.raises(ConfigurationError, match="has 0 GPU.*simulate_gpus=True"):
        with local_session(DeviceGroup(name="g", ranks=1, device_type="cuda")):
            pass


@pytest.mark.skipif(gpu_count() > 0, reason="dask-cuda's GPU-less test switch is for machines without GPUs")
def test_dask_cuda_worker_path_without_a_gpu(monkeypatch):
    pytest.importorskip("dask_cuda")
    monkeypatch.setenv("DASK_CUDA_TEST_DISABLE_DEVICE_SPECIFIC", "1")
    with local_session(DeviceGroup(name="g", ranks=2, device_type="cuda"), simulate_gpus=True) as client:
        names = sorted(str(w["name"]) for w in client.scheduler_info(n_workers=-1)["workers"].values())
        assert names == ["g-0", "g-1"]
        envs = Env(remote_group="g").env()()
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1", "1,0"]
