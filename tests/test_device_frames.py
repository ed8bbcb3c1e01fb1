"""CUDA tensors in call payloads on UCX: kept in device memory, sent as the Dask message's own frames.

These machines have no GPU and no UCX, so the plumbing is checked with CPU
tensors taking the device path (the "is this a device tensor" predicate is
patched): a blob keeps them out of its pickle, a batch for a comm that moves
device memory carries them as frames, as they are, and the receiver rebuilds
them from whatever object the comm hands over. With the switch off nothing
changes. The last test needs two GPUs and UCX.
"""

from __future__ import annotations

import asyncio
import pickle
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from distributed.comm.utils import from_frames, to_frames  # noqa: E402

from twinkle_dask._wire import channel as _channel  # noqa: E402
from twinkle_dask._wire import serde as _serde  # noqa: E402
from twinkle_dask._wire.protocol import Reply  # noqa: E402
from twinkle_dask._wire.serde import Blob, dumps_blob  # noqa: E402

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024


@pytest.fixture
def device_path(monkeypatch):
    """Device frames on, and CPU tensors treated as device tensors (as CUDA ones are on a GPU)."""
    monkeypatch.setattr(_serde, "_is_device_tensor", lambda t: t.numel() > 0)
    _serde.set_device_frames(True)
    try:
        yield
    finally:
        _serde.set_device_frames(False)


def _today_dump_batch(batch):
    """How a batch was pickled before device frames existed (the reference for "unchanged")."""
    buffers = []

    def out_of_band(buf):
        raw = buf.raw()
        if raw.nbytes <= _channel._IN_BAND:
            return True
        buffers.append(raw)
        return False

    return pickle.dumps(batch, protocol=5, buffer_callback=out_of_band), buffers


def _values():
    return {
        "w": torch.arange(256 * 1024, dtype=torch.float32),  # 1 MiB: an out-of-band buffer
        "b": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4),  # small: in band
        "a": np.arange(8192, dtype=np.int64),
        "s": "text",
    }


def test_switch_is_off_by_default_and_nothing_changes(monkeypatch):
    assert _serde.device_frames_enabled() is False
    # Even with every tensor counted as a device tensor, the off switch keeps today's path.
    monkeypatch.setattr(_serde, "_is_device_tensor", lambda t: True)
    blob = dumps_blob(_values())
    assert blob.device_frames == [] and blob.device is False
    batch = [(1, Reply(True, value=blob)), (0, Reply(True, value=dumps_blob(torch.ones(3))))]
    msg = _channel._encode(batch, False)
    head, buffers = _today_dump_batch(batch)
    assert msg.header == {"pickled-obj": head}  # byte-identical pickle, no device-frames entry
    assert [bytes(f) for f in msg.frames] == [bytes(b) for b in buffers]
    assert len(msg.frames) == 2  # the 1 MiB tensor and the array; the rest is in band
    assert _channel._dump_batch(batch)[2] == 0
    out = _channel._decode(msg)[0][1].value.load()
    assert torch.equal(out["w"], _values()["w"]) and torch.equal(out["b"], _values()["b"])


def test_address_and_comm_decide_where_device_frames_are_used(device_path):
    assert [_serde.moves_device_memory(a) for a in ("ucx://10.0.0.1:8786", "ucxx://h:1", "tcp://h:1",
                                                      "tls://h:1", "inproc://h/1/2")] == [
        True, True, False, False, False]

    class UCXX:  # the comm classes of distributed-ucxx and of Dask's own UCX module
        __module__ = "distributed_ucxx.ucxx"

    class UCX:
        __module__ = "distributed.comm.ucx"

    class TCP:
        __module__ = "distributed.comm.tcp"

    assert [_channel.can_move_device(c()) for c in (UCXX, UCX, TCP)] == [True, True, False]
    _serde.set_device_frames(False)
    assert _channel.can_move_device(UCXX()) is False


def test_blob_keeps_the_device_tensor_itself_out_of_the_pickle(device_path):
    x = torch.arange(1024 * 1024, dtype=torch.float32)  # 4 MiB
    blob = dumps_blob({"x": x, "step": 3})
    assert len(blob.frames) == 1  # the pickle stream alone: no host buffer
    assert len(blob.frames[0]) < 400
    assert len(blob.device_frames) == 1 and blob.device_frames[0] is x  # the tensor itself, no copy
    assert blob.device is True and blob.nbytes == len(blob.frames[0]) + 4 * MiB
    loaded = blob.load()
    assert loaded["step"] == 3 and torch.equal(loaded["x"], x) and loaded["x"].dtype == torch.float32


def test_non_contiguous_tensor_becomes_one_contiguous_device_frame(device_path):
    base = torch.arange(6 * 8, dtype=torch.bfloat16).reshape(6, 8)
    x = base.t()[::2]  # (4, 6), not contiguous
    blob = dumps_blob(x)
    (frame,) = blob.device_frames
    assert frame.is_contiguous() and frame.shape == (4, 6) and frame.data_ptr() != base.data_ptr()
    assert torch.equal(frame, x)
    out = blob.load()
    assert out.dtype == torch.bfloat16 and out.shape == (4, 6) and torch.equal(out, x)


def test_empty_tensors_and_other_types_stay_in_the_pickle(device_path):
    value = {"e": torch.empty(0, 3), "p": torch.nn.Parameter(torch.ones(2)), "a": np.ones(4)}
    blob = dumps_blob(value)
    assert blob.device_frames == []  # empty: nothing to send; Parameter: a subclass keeps its class
    out = blob.load()
    assert out["e"].shape == (0, 3) and isinstance(out["p"], torch.nn.Parameter)


def test_encode_puts_each_blobs_device_frames_after_its_host_buffers_and_counts_them(device_path):
    a = np.arange(16384, dtype=np.int64)  # 128 KiB: a host buffer
    x = torch.arange(64 * 1024, dtype=torch.float32)
    y = torch.arange(10, dtype=torch.int64)  # 80 bytes: a device frame is never put in band
    blob = dumps_blob({"a": a, "x": x, "y": y})
    msg = _channel._encode([(7, Reply(True, value=blob))], False, True)
    assert msg.header["device-frames"] == 2
    assert len(msg.frames) == 3
    host, fx, fy = msg.frames
    assert bytes(host) == a.tobytes()
    # The device frames are the tensors' own memory, as flat bytes (what a UCX comm sends device to device).
    assert fx.dtype == torch.uint8 and fx.numel() == x.nbytes and fx.data_ptr() == x.data_ptr()
    assert fy.dtype == torch.uint8 and fy.numel() == 80 and fy.data_ptr() == y.data_ptr()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8,
                                   torch.uint8, torch.int64, torch.bool, torch.complex64])
@pytest.mark.parametrize("shape", [(), (7,), (2, 3, 4)])
def test_decode_rebuilds_equal_tensors(device_path, dtype, shape):
    n = int(np.prod(shape))
    values = torch.arange(n, dtype=torch.float64) - 3.0
    x = (torch.complex(values, -values) if dtype.is_complex else values).to(dtype).reshape(shape)
    if x.ndim == 3:
        x = x.transpose(0, 2)  # not contiguous
    if dtype.is_floating_point:
        x = x.detach().requires_grad_(True)
    msg = _channel._encode([(1, Reply(True, value=dumps_blob({"x": x})))], False, True)
    assert msg.header["device-frames"] == 1
    out = _channel._decode(msg)[0][1].value.load()["x"]
    assert out.dtype == dtype and out.shape == x.shape and torch.equal(out.detach(), x.detach())
    assert out.requires_grad is dtype.is_floating_point


def test_several_blobs_in_one_batch_keep_their_own_frames_in_order(device_path):
    tensors = [torch.full((1000 * (i + 1),), float(i)) for i in range(3)]
    arrays = [np.full(1024 * (i + 1), i, dtype=np.int64) for i in range(3)]
    batch = [(i + 1, Reply(True, value=dumps_blob({"t": t, "a": a, "i": i})))
             for i, (t, a) in enumerate(zip(tensors, arrays, strict=True))]
    msg = _channel._encode(batch, False, True)
    assert msg.header["device-frames"] == 3
    kinds = ["device" if isinstance(f, torch.Tensor) else "host" for f in msg.frames]
    assert kinds == ["host", "device", "host", "device", "host", "device"]
    assert [f.data_ptr() for f in msg.frames[1::2]] == [t.data_ptr() for t in tensors]
    out = _channel._decode(msg)
    assert [rid for rid, _ in out] == [1, 2, 3]
    for i, (_, reply) in enumerate(out):
        value = reply.value.load()
        assert value["i"] == i and torch.equal(value["t"], tensors[i]) and np.array_equal(value["a"], arrays[i])


def test_dasks_own_framing_hands_device_frames_to_their_blobs(device_path):
    # What a comm does with the message: Dask's to_frames/from_frames, frames passed as objects.
    x = torch.arange(3 * 1024, dtype=torch.bfloat16).reshape(3, 1024)
    blob = dumps_blob({"x": x})
    msg = _channel._encode([(1, Reply(True, value=blob))], False, True)

    async def through_dask():
        frames = await to_frames(msg, serializers=("pickle",), on_error="raise", allow_offload=False)
        assert sum(1 for f in frames if isinstance(f, torch.Tensor)) == 1
        return await from_frames(frames, deserialize=True, deserializers=("pickle",), allow_offload=False)

    batch = asyncio.run(through_dask())
    received = batch[0][1].value
    assert isinstance(received, Blob) and len(received.device_frames) == 1
    assert received.device_frames[0].data_ptr() == x.data_ptr()  # the object the comm handed over
    assert torch.equal(received.load()["x"], x)


def test_comms_without_device_support_get_host_copies(device_path):
    x = torch.arange(64 * 1024, dtype=torch.bfloat16)
    y = torch.arange(5, dtype=torch.float64)
    batch = [(1, Reply(True, value=dumps_blob({"x": x, "y": y})))]
    # TLS, in-process: Dask's comm with host frames (copied: the in-process case).
    msg = _channel._encode(batch, True, False)
    assert "device-frames" not in msg.header
    assert len(msg.frames) == 1 and isinstance(msg.frames[0], bytearray)
    assert bytes(msg.frames[0]) == x.view(torch.int16).numpy().tobytes()
    out = _channel._decode(msg)[0][1].value.load()
    assert torch.equal(out["x"], x) and torch.equal(out["y"], y) and out["x"].device.type == "cpu"
    # TCP taken over: the socket's own framing, host frames only.
    head, buffers, count = _channel._dump_batch(batch)
    assert count == 0 and len(buffers) == 1 and not isinstance(buffers[0], torch.Tensor)
    out = pickle.loads(head, buffers=buffers)[0][1].value.load()
    assert torch.equal(out["x"], x) and torch.equal(out["y"], y)


class _RecordingComm:
    """A comm that moves host memory only and keeps what is written to it."""

    peer_address = "tls://127.0.0.1:1"

    def __init__(self):
        self.written = []

    async def write(self, msg, serializers=None, on_error=None):
        await asyncio.sleep(0)
        self.written.append(msg)
        return 0

    def abort(self):
        pass


def test_host_copies_for_a_comm_without_device_support_are_made_off_the_event_loop(device_path, monkeypatch):
    copied_on = []
    host_frame = _serde._host_frame

    def recording_host_frame(frame):
        copied_on.append(threading.get_ident())
        return host_frame(frame)

    monkeypatch.setattr(_serde, "_host_frame", recording_host_frame)
    x = torch.arange(64 * 1024, dtype=torch.float32)

    async def main():
        comm = _RecordingComm()
        stream = _channel._Stream(comm, lambda exc: None)
        stream.push((1, Reply(True, value=dumps_blob({"x": x}))))
        await asyncio.sleep(0)  # the flush: the copy goes to a thread, the write waits for it
        assert stream._writing is not None and comm.written == []
        stream.push((2, Reply(True, value=dumps_blob("after"))))  # queued behind it, in order
        deadline = asyncio.get_running_loop().time() + 10
        while len(comm.written) < 2 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        return threading.get_ident(), comm.written

    loop_thread, written = asyncio.run(main())
    assert len(copied_on) == 1 and copied_on[0] != loop_thread
    assert [len(_channel._decode(m)) for m in written] == [1, 1]
    first, second = (_channel._decode(m)[0] for m in written)
    assert first[0] == 1 and torch.equal(first[1].value.load()["x"], x)
    assert second[0] == 2 and second[1].value.load() == "after"
    assert "device-frames" not in written[0].header


def test_a_blob_pickled_outside_a_batch_copies_its_device_frames_to_host(device_path):
    x = torch.arange(1000, dtype=torch.int32)
    blob = dumps_blob([x])
    for protocol in (4, 5):  # Dask spilling or sending a kept result pickles blobs itself
        copy = pickle.loads(pickle.dumps(blob, protocol=protocol))
        assert len(copy.device_frames) == 1 and not isinstance(copy.device_frames[0], torch.Tensor)
        assert bytes(copy.device_frames[0]) == x.numpy().tobytes()
        assert torch.equal(copy.load()[0], x)


def test_a_device_tensor_outside_its_blob_is_an_error(device_path):
    blob = dumps_blob(torch.ones(4))
    with pytest.raises(pickle.UnpicklingError, match="outside its Blob"):
        pickle.loads(blob.frames[0])


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_cuda_result_moves_device_to_device_between_gpu_workers_on_ucx():
    why = "UCX comms need ucxx and distributed-ucxx (pip install distributed-ucxx-cu12)"
    pytest.importorskip("ucxx", reason=why)
    pytest.importorskip("distributed_ucxx", reason=why)
    dask_cuda = pytest.importorskip("dask_cuda", reason="GPU workers on UCX come from dask-cuda")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs: one producer worker, one consumer worker")
    from components import OnGPU

    import twinkle_dask as twinkle
    from twinkle_dask import DeviceGroup

    with dask_cuda.LocalCUDACluster(protocol="ucx", CUDA_VISIBLE_DEVICES="0,1", dashboard_address=":0") as cluster:
        assert cluster.scheduler_address.startswith(("ucx://", "ucxx://"))
        twinkle.initialize("dask", address=cluster.scheduler_address,
                           groups=[DeviceGroup(name="producer", ranks=1, device_type="cuda"),
                                   DeviceGroup(name="consumer", ranks=1, device_type="cuda")])
        try:
            session = twinkle.runtime.process_session()
            producer = OnGPU(remote_group="producer")
            consumer = OnGPU(remote_group="consumer")
            n = 16 * MiB  # float32: 64 MiB
            lazy = producer.make(n)
            assert consumer.is_arange(lazy)() == {"device": "cuda:0", "dtype": "torch.float32", "numel": n,
                                                 "equal": True}

            def channels(dask_worker):
                ext = dask_worker.extensions["twinkle"]
                return [(ch.comm.peer_address.split("://")[0], ch.moves_device)
                        for ch in ext.caller._channels.values()]

            consumer_addr = session.placements["consumer"].addresses[0]
            producer_addr = session.placements["producer"].addresses[0]
            # The consumer fetched the result from the producer on a channel that moves device memory.
            seen = session.client.run(channels, workers=[consumer_addr])[consumer_addr]
            assert seen and all(scheme in ("ucx", "ucxx") and moves is True for scheme, moves in seen), seen
            # The driver's own channels: device frames only if the driver has a GPU (it does here).
            assert {ch.moves_device for ch in session.caller._channels.values()} == {True}
            # A CUDA result collected by the driver arrives in its device memory, equal.
            t = producer.make(1024)()
            assert t.device.type == "cuda" and torch.equal(t, torch.arange(1024, dtype=torch.float32,
                                                                           device=t.device))
            assert producer_addr != consumer_addr
        finally:
            twinkle.shutdown()
