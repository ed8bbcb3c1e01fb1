"""torch inside components: torch.distributed rendezvous, tensors, DataLoader worker processes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from components import Echo, Gloo, Loading  # noqa: E402

from twinkle_dask import DeviceMesh  # noqa: E402
from twinkle_dask.testing import assert_same  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def gloo(cluster):
    # The default process group is per process: one such component per worker.
    return Gloo(remote_group="model")


def test_init_process_group_env_and_all_reduce(gloo):
    # ranks add 0..3 to the base: 4 * base + 6 on every rank
    assert gloo.all_reduce(1.0)() == [10.0] * 4


def test_colocated_component_rendezvous_on_its_own_port(gloo):
    second = Gloo(default_group=False, remote_group="model")
    assert second.all_reduce(2.0)() == [14.0] * 4
    assert gloo.all_reduce(0.0)() == [6.0] * 4


def test_dataloader_worker_processes_start_inside_a_component(cluster):
    loading = Loading(remote_group="sampler")
    assert loading.load(6, 2)() == [0, 1, 2, 3, 4, 5]


def test_tensors_travel_both_ways_with_dtype_and_grad_flag(cluster):
    echo = Echo(device_mesh=DeviceMesh.from_sizes(dp_size=2), remote_group="sampler")
    x = torch.arange(8, dtype=torch.bfloat16).reshape(4, 2)
    per = echo.recv.options(dispatch="slice_dp")(x).per_rank()
    assert_same(per[0]["args"][0], x[:2])
    assert_same(per[1]["args"][0], x[2:])
    w = torch.ones(3, requires_grad=True)
    back = echo.recv.options(dispatch="all", collect="first")(w)()["args"][0]
    assert back.requires_grad and torch.equal(back.detach(), w.detach())
