"""Payloads ride Dask's serialization families: twinkle's torch.Tensor serializers, users' own registrations."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from components import Echo  # noqa: E402
from distributed.protocol import dask_deserialize, dask_serialize  # noqa: E402
from distributed.protocol.serialize import deserialize, serialize  # noqa: E402
from registered_types import Box, Tagged  # noqa: E402

from twinkle_dask._wire import serde as _serde  # noqa: E402
from twinkle_dask._wire.serde import dumps_blob, register_serializers  # noqa: E402
from twinkle_dask.testing import assert_same, local_session  # noqa: E402

pytestmark = pytest.mark.timeout(120)

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int64,
          torch.bool, torch.complex64]
SHAPES = [(), (0,), (3, 0, 2), (7,), (2, 3, 4)]
MiB = 1024 * 1024


def _sample(dtype, shape):
    n = int(np.prod(shape))
    values = torch.arange(n, dtype=torch.float64) - 3.0
    if dtype.is_complex:
        return torch.complex(values, -values).to(dtype).reshape(shape)
    return values.to(dtype).reshape(shape)


def _round_trip(value):
    return dumps_blob(value).load()


@pytest.fixture(autouse=True, scope="module")
def _registered():
    register_serializers()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_round_trip_keeps_dtype_shape_and_values(dtype, shape):
    x = _sample(dtype, shape)
    assert_same(_round_trip(x), x)
    header, frames = serialize(x, serializers=("dask",), on_error="raise")  # Dask's own comms: ours, not numpy()
    assert header["serializer"] == "dask" and header["sub-header"]["dtype"] == str(dtype).split(".")[-1]
    assert [memoryview(f).nbytes for f in frames] == [x.numel() * x.element_size()]
    assert_same(deserialize(header, frames), x)


@pytest.mark.parametrize("make", [
    lambda: torch.arange(12.0).reshape(3, 4).t(),
    lambda: torch.arange(20, dtype=torch.bfloat16)[::3],
    lambda: torch.arange(24, dtype=torch.int8).reshape(2, 3, 4).permute(2, 0, 1)[:, 1:],
    lambda: torch.complex(torch.arange(4.0), torch.ones(4)).conj(),
    lambda: torch.arange(6.0).expand(2, 6),
], ids=["transposed", "strided-bf16", "permuted-int8", "conjugate-view", "expanded"])
def test_non_contiguous_tensors_arrive_contiguous_with_the_same_values(make):
    x = make()
    got = _round_trip(x)
    assert got.is_contiguous() and not got.is_conj()
    assert_same(got, x.resolve_conj().contiguous())


def test_requires_grad_arrives_as_a_leaf_and_parameters_stay_parameters():
    w = torch.arange(3.0, requires_grad=True) * 2  # not a leaf here: arrives as one
    got = _round_trip({"w": w, "i": torch.arange(3)})
    assert got["w"].requires_grad and got["w"].is_leaf and got["w"].tolist() == [0.0, 2.0, 4.0]
    assert not got["i"].requires_grad
    p = torch.nn.Parameter(torch.ones(2, 2, dtype=torch.bfloat16))
    back = _round_trip([p])[0]
    assert type(back) is torch.nn.Parameter and back.requires_grad and back.dtype == torch.bfloat16
    assert torch.equal(back.detach(), p.detach())


def test_tensor_subclasses_sparse_tensors_and_modules_keep_their_pickle():
    class Marked(torch.Tensor):
        pass

    marked = torch.arange(3.0).as_subclass(Marked)
    sparse = torch.eye(3).to_sparse()
    module = torch.nn.Linear(2, 1)
    got = _round_trip((marked, sparse, module, module.weight))
    assert type(got[0]) is Marked and got[0].tolist() == [0.0, 1.0, 2.0]
    assert got[1].is_sparse and torch.equal(got[1].to_dense(), torch.eye(3))
    assert isinstance(got[2], torch.nn.Linear) and torch.equal(got[2].weight, module.weight)
    assert got[3] is got[2].weight  # one pickle: shared references stay shared


def test_a_large_tensor_travels_out_of_band_without_a_copy():
    x = torch.zeros(MiB, dtype=torch.float32)  # 4 MiB
    blob = dumps_blob({"batch": [x]})
    assert len(blob.frames[0]) < 512
    assert [memoryview(f).nbytes for f in blob.frames[1:]] == [4 * MiB]
    assert np.shares_memory(np.asarray(blob.frames[1]), x.numpy())  # the tensor's own memory, not a copy
    # In a message, the blob's buffers leave as the message's own frames (as the channels send them).
    frames = []

    def out_of_band(buf):
        if buf.raw().nbytes <= 4096:
            return True  # small: in the pickle stream
        frames.append(buf.raw())
        return False

    head = pickle.dumps([{"i": 1, "p": blob}], protocol=5, buffer_callback=out_of_band)
    assert len(head) < 1024 and [f.nbytes for f in frames] == [4 * MiB]
    got = pickle.loads(head, buffers=frames)[0]["p"].load()["batch"][0]
    assert got.dtype == torch.float32 and got.shape == (MiB,) and not bool(got.any())


def test_numpy_arrays_stay_on_pickle_protocol_5_out_of_band():
    a = np.arange(MiB // 8, dtype=np.float64)  # 1 MiB
    blob = dumps_blob(a)
    assert b"_dask_loads" not in blob.frames[0] and len(blob.frames[0]) < 512
    assert np.shares_memory(np.asarray(blob.frames[1]), a)
    assert_same(blob.load(), a)


def test_dasks_own_torch_format_still_loads():
    from distributed.protocol.torch import serialize_torch_Tensor

    x = torch.arange(5.0, requires_grad=True)
    header, frames = serialize_torch_Tensor(x)  # what a process without twinkle's serializer sends
    got = dask_deserialize.dispatch(torch.Tensor)(header, frames)
    assert got.requires_grad and got.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_cuda_family_declines_cpu_tensors():
    header, frames = serialize(torch.ones(2), serializers=("cuda", "dask"), on_error="raise")
    assert header["serializer"] == "dask"
    with pytest.raises(TypeError, match="Could not serialize"):
        serialize(torch.ones(2), serializers=("cuda",), on_error="raise")


def test_user_serializers_run_for_values_nested_anywhere():
    me = os.getpid()
    got = _round_trip({"a": [1, (Tagged("x"),)], "b": Box(Tagged("y"))})
    assert got["a"][1][0].value == "x" and got["a"][1][0].hops == [["dumps", me], ["loads", me]]
    assert type(got["b"]) is Box and got["b"].item.hops == [["dumps", me], ["loads", me]]


def test_a_registration_made_after_a_first_call_applies_to_the_next():
    class Late:
        def __init__(self, n):
            self.n = n

    assert _round_trip(Late(1)).n == 1  # plain pickle
    dask_serialize.register(Late)(lambda x: ({"n": x.n + 100}, []))
    dask_deserialize.register(Late)(lambda header, frames: Late(header["n"]))
    assert _round_trip(Late(1)).n == 101


def test_registration_is_idempotent_and_replaces_dasks_tensor_serializer():
    register_serializers()
    register_serializers()
    assert dask_serialize.dispatch(torch.Tensor) is _serde._dask_dumps_tensor
    assert dask_deserialize.dispatch(torch.Tensor) is _serde._dask_loads_tensor
    assert dask_serialize.dispatch(torch.nn.Parameter).__module__ == "distributed.protocol.torch"


def _bfloat16_result():
    import torch

    return torch.arange(4, dtype=torch.bfloat16) / 2


@pytest.fixture(scope="module")
def serde_cluster():
    with local_session(serde=1) as client:
        yield client


@pytest.mark.timeout(180)
def test_user_serializer_runs_in_the_driver_and_the_worker_of_a_component_call(serde_cluster):
    echo = Echo(remote_group="serde")
    worker_pid = echo.identity()()["pid"]
    me = os.getpid()
    assert worker_pid != me
    sent = {"outer": [Tagged("a"), {"deep": (1, Tagged("b"))}], "tensors": [torch.ones(2, 3, dtype=torch.bfloat16).t()]}
    back = echo.recv.options(dispatch="all", collect="first")(sent, flag=Tagged("kw"))()
    hops = [["dumps", me], ["loads", worker_pid], ["dumps", worker_pid], ["loads", me]]
    arg = back["args"][0]
    assert [arg["outer"][0].value, arg["outer"][1]["deep"][1].value, back["kwargs"]["flag"].value] == ["a", "b", "kw"]
    assert arg["outer"][0].hops == hops and arg["outer"][1]["deep"][1].hops == hops
    assert back["kwargs"]["flag"].hops == hops
    assert_same(arg["tensors"][0], torch.ones(3, 2, dtype=torch.bfloat16))


@pytest.mark.timeout(180)
def test_dask_task_results_use_twinkles_tensor_serializer(serde_cluster):
    # Dask's own torch serializer fails for bfloat16: the worker and the driver both use twinkle's.
    got = serde_cluster.submit(_bfloat16_result, pure=False).result(timeout=60)
    assert_same(got, torch.tensor([0.0, 0.5, 1.0, 1.5], dtype=torch.bfloat16))


# --------------------------------------------------------------------------- CUDA (marked gpu)
class _DeviceBuffer:
    """Device memory as a comm hands it over (rmm/numba buffers): only ``__cuda_array_interface__``."""

    def __init__(self, tensor):
        self._tensor = tensor
        self.__cuda_array_interface__ = tensor.__cuda_array_interface__


@pytest.mark.gpu
@pytest.mark.parametrize("make", [
    lambda: torch.arange(12, dtype=torch.bfloat16, device="cuda").reshape(3, 4),
    lambda: torch.tensor(2.5, device="cuda"),
    lambda: torch.empty(0, 3, dtype=torch.float16, device="cuda"),
    lambda: torch.arange(12.0, device="cuda").reshape(3, 4).t(),
    lambda: torch.arange(6, device="cuda") % 2 == 0,
    lambda: torch.arange(4.0, device="cuda").requires_grad_(True),
], ids=["bfloat16", "0-d", "0-size", "transposed", "bool", "requires-grad"])
def test_cuda_family_moves_device_memory(make):
    x = make()
    header, frames = serialize(x, serializers=("cuda", "dask"), on_error="raise")
    assert header["serializer"] == "cuda" and len(frames) == 1
    frame = frames[0]
    assert frame.device.type == "cuda" and hasattr(frame, "__cuda_array_interface__")
    if x.is_contiguous() and x.numel():
        assert frame.data_ptr() == x.data_ptr()  # no copy at all
    got = deserialize(header, frames)
    assert got.device.type == "cuda" and got.dtype == x.dtype and got.shape == x.shape
    assert got.requires_grad == x.requires_grad and torch.equal(got.detach(), x.detach())
    # What a device-memory comm (UCX) hands the receiver: a foreign buffer, used in place.
    foreign = [_DeviceBuffer(frame.clone())] if x.numel() else frames
    landed = deserialize(header, foreign)
    assert torch.equal(landed.detach(), x.detach())
    if x.numel():
        assert landed.data_ptr() == foreign[0]._tensor.data_ptr()


@pytest.mark.gpu
def test_cuda_tensor_in_a_payload_stages_through_host_and_lands_where_told():
    x = torch.arange(6, dtype=torch.bfloat16, device="cuda").reshape(2, 3)
    blob = dumps_blob({"x": x})
    assert blob.device and all(isinstance(f, memoryview) for f in blob.frames[1:])
    assert blob.load()["x"].device.type == "cpu"
    _serde.set_cuda_landing(True)
    try:
        landed = dumps_blob({"x": x}).load()["x"]
    finally:
        _serde.set_cuda_landing(False)
    assert landed.device.type == "cuda" and torch.equal(landed, x)


def test_pickled_payload_loads_in_a_fresh_process(tmp_path):
    # The receiver need not have imported torch or registered anything: the payload does it.
    import subprocess
    import sys

    path = tmp_path / "payload.pkl"
    blob = dumps_blob({"t": torch.arange(3, dtype=torch.bfloat16), "tag": Tagged("z")})
    path.write_bytes(pickle.dumps(blob, protocol=5))
    code = ("import pickle, sys; b = pickle.loads(open(sys.argv[1], 'rb').read()); v = b.load(); "
            "print(v['t'].dtype, v['t'].tolist(), v['tag'].value, len(v['tag'].hops))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["torch.bfloat16", "[0.0,", "1.0,", "2.0]", "z", "2"]
