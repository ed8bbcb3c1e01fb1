"""GPU groups through dask-cuda, CUDA tensors in flight, NCCL: needs a CUDA GPU (marked ``gpu``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from components import Echo, OnGPU  # noqa: E402

from twinkle_dask import DeviceGroup  # noqa: E402
from twinkle_dask.testing import local_session  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def gpu_cluster():
    with local_session(DeviceGroup(name="gpu", ranks=1, device_type="cuda"), cpu=1) as client:
        yield client


def test_gpu_group_runs_dask_cuda_workers_that_see_their_gpu(gpu_cluster):
    info = gpu_cluster.scheduler_info(n_workers=-1)["workers"].values()
    names = {str(w["name"]): sorted(w["resources"]) for w in info}
    assert names == {"gpu-0": ["twinkle-gpu"], "cpu-0": ["twinkle-cpu"]}
    view = OnGPU(remote_group="gpu").cuda_view()()
    assert view == {"available": True, "count": 1, "visible": "0", "local_rank": "0"}  # one rank: unwrapped


def test_cuda_tensor_results_come_back_to_the_driver_on_cpu(gpu_cluster):
    t = OnGPU(remote_group="gpu").make(5)()
    assert t.device.type == "cpu" and t.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_cuda_tensor_lands_on_the_consumer_gpu_and_on_cpu_elsewhere(gpu_cluster):
    producer = OnGPU(remote_group="gpu")
    lazy = producer.make(4)
    on_gpu = OnGPU(remote_group="gpu").where(lazy)()
    on_cpu = Echo(remote_group="cpu").recv.options(dispatch="all", collect="first")(lazy)()["args"][0]
    assert on_gpu == {"device": "cuda:0", "sum": 6.0}
    assert on_cpu.device.type == "cpu" and on_cpu.tolist() == [0.0, 1.0, 2.0, 3.0]
    from_driver = OnGPU(remote_group="gpu").where(torch.ones(3, device="cuda"))()
    assert from_driver == {"device": "cuda:0", "sum": 3.0}


def test_nccl_process_group_with_world_size_one(gpu_cluster):
    assert OnGPU(nccl=True, remote_group="gpu").all_reduce(2.5)() == 2.5


def test_training_example_runs_on_gpus():
    proc = subprocess.run(
        [sys.executable, "-m", "twinkle_dask.examples.train", "--device", "cuda", "--ranks", "1", "--steps", "30",
         "--no-dashboard"], capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "ranks in sync: True" in proc.stdout
