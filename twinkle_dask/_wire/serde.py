"""Serializing call arguments and results: pickle protocol 5, tensors and arrays out of band.

Everything that crosses a channel is pickled once, in the thread that has
it: the driver's thread for arguments, the component's thread for results.
numpy arrays travel as out-of-band buffers (no copy); torch tensors of any
dtype, anywhere inside the object, are reduced to their raw bytes as an
out-of-band buffer too (Dask's own torch serializer goes through ``numpy()``
and fails for bfloat16 and CUDA tensors). A CUDA tensor is copied to host to
travel and lands on the receiver's GPU when the receiver is a GPU worker, on
the CPU otherwise (the driver). Objects that plain pickle cannot handle
(classes defined in ``__main__`` or in a function, lambdas) go through
cloudpickle.
"""

from __future__ import annotations

import io
import pickle
import sys
from typing import Any

import cloudpickle

from .._types import tensor_type

__all__ = ["Blob", "dumps_blob", "set_cuda_landing"]

_cuda_landing = False


def set_cuda_landing(enabled: bool) -> None:
    """Whether tensors that left a GPU land on this process's GPU (GPU workers) or on the CPU."""
    global _cuda_landing
    _cuda_landing = enabled


def _rebuild_tensor(buf: Any, dtype: str, shape: tuple[int, ...], requires_grad: bool, device: str) -> Any:
    import torch

    view = memoryview(buf)
    if view.nbytes == 0:
        t = torch.empty(shape, dtype=getattr(torch, dtype))
    else:
        if view.readonly:
            view = memoryview(bytearray(view))
        t = torch.frombuffer(view, dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape)
    if device == "cuda" and _cuda_landing and torch.cuda.is_available():
        t = t.to("cuda")
    if requires_grad and (t.is_floating_point() or t.is_complex()):
        t.requires_grad_(True)
    return t


def _reduce_tensor(pickler: Any, obj: Any) -> Any:
    tensor = tensor_type()
    if tensor is None or type(obj) is not tensor:
        return NotImplemented
    torch = sys.modules["torch"]
    if obj.is_sparse or obj.is_quantized or obj.layout != torch.strided or obj.is_nested:
        return NotImplemented
    t = obj.detach()
    if t.device.type != "cpu":
        pickler.device_tensors = True
        t = t.cpu()
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    dtype = str(obj.dtype).rsplit(".", 1)[-1]
    return _rebuild_tensor, (pickle.PickleBuffer(data), dtype, tuple(obj.shape), bool(obj.requires_grad),
                             obj.device.type)


class _Pickler(pickle.Pickler):
    device_tensors = False  # set when a GPU tensor was copied to host

    def reducer_override(self, obj: Any) -> Any:
        return _reduce_tensor(self, obj)


class _CloudPickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle has no type information
    device_tensors = False

    def reducer_override(self, obj: Any) -> Any:
        reduced = _reduce_tensor(self, obj)
        if reduced is NotImplemented:
            return super().reducer_override(obj)
        return reduced


def _dump(pickler_cls: type, obj: Any) -> tuple[bytes, list[Any], bool]:
    buffers: list[Any] = []
    f = io.BytesIO()
    pickler = pickler_cls(f, protocol=5, buffer_callback=buffers.append)
    pickler.dump(obj)
    return f.getvalue(), buffers, pickler.device_tensors


class Blob:
    """A pickled value: the pickle stream and its out-of-band buffers.

    Pickled inside a message it travels as the message's own out-of-band
    frames (small ones in band), so large tensors are never copied into the
    message. :meth:`load` unpickles it. ``device`` says whether GPU tensors
    were copied to host to make it (known where it was made, not sent).
    """

    __slots__ = ("device", "frames")

    def __init__(self, frames: list[Any], device: bool = False) -> None:
        self.frames = frames
        self.device = device

    def __reduce_ex__(self, protocol: Any) -> Any:
        if isinstance(protocol, int) and protocol >= 5:
            return _blob, tuple(pickle.PickleBuffer(f) for f in self.frames)
        return _blob, tuple(bytes(f) for f in self.frames)

    def load(self) -> Any:
        return pickle.loads(self.frames[0], buffers=self.frames[1:])

    @property
    def nbytes(self) -> int:
        return sum(memoryview(f).nbytes for f in self.frames)


def _blob(*frames: Any) -> Blob:
    return Blob(list(frames))


def dumps_blob(obj: Any) -> Blob:
    """Pickle ``obj`` (protocol 5; arrays and tensors out of band) into a :class:`Blob`."""
    try:
        data, buffers, device = _dump(_Pickler, obj)
        if b"__main__" in data:
            raise pickle.PicklingError("refers to __main__")
    except Exception:
        data, buffers, device = _dump(_CloudPickler, obj)
    return Blob([data, *(b.raw() for b in buffers)], device)
