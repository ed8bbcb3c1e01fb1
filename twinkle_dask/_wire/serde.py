"""Serializing call arguments and results: one pickle, Dask's serializers for the types they know.

Everything that crosses a channel is pickled once (protocol 5), in the
thread that has it: the driver's thread for arguments, the component's
executor thread for results, never a worker's event loop. Inside that
pickle, any object whose type has a registration in Dask's ``dask``
serialization family (``distributed.protocol.dask_serialize``, wherever it
sits: inside a dict, a list, an attribute) is serialized by that
registration, and its frames travel as out-of-band buffers (no copy into
the pickle stream); the receiver rebuilds it with the matching
``dask_deserialize``. So users' own registrations are honoured in call
arguments and results as in any Dask task.

Three kinds of registration are left to pickle:

- numpy arrays travel as pickle protocol 5 out-of-band buffers, which is
  what Dask's ``pickle`` family does for them (no copy either way);
- generic registrations (``register_generic``, which Dask uses for
  ``torch.nn.Module``): pickle walks the object's ``__dict__`` the same way,
  keeps shared and cyclic references, and still hands every registered
  object it meets to its Dask serializer;
- subclasses of ``torch.Tensor`` without a registration of their own (they
  keep their class through pickle).

``torch.Tensor`` gets twinkle's own registration (:func:`register_serializers`,
which replaces Dask's: that one goes through ``numpy()`` and fails for
bfloat16 and CUDA tensors). The ``dask`` family sends a tensor of any dtype
and shape (0-d, 0-size, non-contiguous) as its raw bytes, one frame, with
its ``requires_grad`` flag. A CUDA tensor stages through host memory there
and lands on the receiver's GPU when the receiver is a GPU worker
(:func:`set_cuda_landing`), on the CPU otherwise; the copy to host happens
in the serializing thread above. The ``cuda`` family
(``distributed.protocol.cuda``) sends a CUDA tensor's device memory as its
frame, so Dask messages on a comm that moves device memory (UCX, with
``"cuda"`` in its serializers) move it device to device; a call's payload
is one pickle with host frames, so there it takes the ``dask`` family's
way. Objects that plain pickle cannot handle (classes defined in
``__main__`` or in a function, lambdas) go through cloudpickle.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle
from distributed.protocol.cuda import cuda_deserialize, cuda_serialize
from distributed.protocol.serialize import ObjectDictSerializer, dask_deserialize, dask_serialize
from distributed.utils import has_keyword

from .._types import tensor_type

__all__ = ["Blob", "dumps_blob", "register_serializers", "set_cuda_landing"]

logger = logging.getLogger(__name__)

_cuda_landing = False
_torch_registered = False
_register_lock = threading.RLock()


def set_cuda_landing(enabled: bool) -> None:
    """Set up a process that serves components (called when a worker starts).

    Registers twinkle's Dask serializers (:func:`register_serializers`) and
    says whether tensors that left a GPU land on this process's GPU (GPU
    workers) or on the CPU.
    """
    global _cuda_landing
    _cuda_landing = enabled
    register_serializers()


def register_serializers() -> None:
    """Register twinkle's ``dask`` and ``cuda`` family serializers for ``torch.Tensor`` (idempotent).

    Every twinkle process registers them (the driver at ``initialize``, a
    worker when it starts, any process on first use), so tensors sent
    through Dask's own comms between them use them too. Without torch
    imported yet, they are registered when Dask first meets a torch type.
    """
    if _torch_registered:
        return
    if tensor_type() is not None:
        _register_torch()
        return
    for dispatch in (dask_serialize, dask_deserialize, cuda_serialize, cuda_deserialize):
        for toplevel in ("torch", "torchvision"):
            dispatch.register_lazy(toplevel, _register_torch)


def _register_torch() -> None:
    global _torch_registered
    with _register_lock:
        if _torch_registered:
            return
        import distributed.protocol.torch  # noqa: F401  # Dask's torch registrations first: ours replaces its Tensor one
        import torch

        dask_serialize.register(torch.Tensor, _dask_dumps_tensor)
        dask_deserialize.register(torch.Tensor, _dask_loads_tensor)
        cuda_serialize.register(torch.Tensor, _cuda_dumps_tensor)
        cuda_deserialize.register(torch.Tensor, _cuda_loads_tensor)
        _NUMPY_DTYPES.update((torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                              torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128))
        _SAME_SIZE_INTS.update({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64})
        _torch_registered = True


# --------------------------------------------------------------------------- torch.Tensor
#: dtypes numpy has, so ``numpy()`` views the tensor's bytes (filled at registration).
_NUMPY_DTYPES: set[Any] = set()
#: element size -> an integer dtype of that size, to view other dtypes' bytes through numpy.
_SAME_SIZE_INTS: dict[int, Any] = {}


def _check_plain(t: Any) -> None:
    torch = sys.modules["torch"]
    if t.layout != torch.strided or t.is_quantized or t.is_nested:
        raise NotImplementedError(f"{t.layout} tensors (quantized, nested, sparse) travel by pickle")


_DTYPE_NAMES: dict[Any, str] = {}


def _tensor_header(t: Any, device: Any) -> dict[str, Any]:
    dtype = t.dtype
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).rsplit(".", 1)[-1]
    return {"dtype": name, "shape": list(t.shape),
            "requires_grad": bool(t.requires_grad), "device": device}


def _flat_bytes(t: Any) -> Any:
    """``t``'s elements as a flat uint8 tensor on its device (a copy only if it is not contiguous)."""
    torch = sys.modules["torch"]
    return t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def _finish(t: Any, header: dict[str, Any]) -> Any:
    if header["requires_grad"] and (t.is_floating_point() or t.is_complex()):
        t.requires_grad_(True)
    return t


def _dask_dumps_tensor(t: Any) -> tuple[dict[str, Any], list[Any]]:
    """``dask`` family: the tensor's raw bytes as one host frame (a CUDA tensor is copied to host)."""
    _check_plain(t)
    header = _tensor_header(t, t.device.type)
    x = t.detach()
    if not x.is_cpu:
        x = x.cpu()  # staged through host memory, in the serializing thread
    if x.is_complex():
        x = x.resolve_conj().resolve_neg()
    if not x.is_contiguous():
        x = x.contiguous()
    if not x.numel():
        return header, [memoryview(b"")]
    if x.dtype not in _NUMPY_DTYPES:  # bfloat16, float8, ...: the same bytes as an int numpy has
        same = _SAME_SIZE_INTS.get(x.element_size())
        if same is None:
            return header, [_flat_bytes(x).numpy().data]
        x = x.view(same)
    return header, [memoryview(x.numpy()).cast("B")]


def _dask_loads_tensor(header: dict[str, Any], frames: Sequence[Any]) -> Any:
    import torch

    if "sub-header" in header:  # sent by a process that uses Dask's own torch serializer
        from distributed.protocol.torch import deserialize_torch_Tensor

        return deserialize_torch_Tensor(header, frames)
    dtype = getattr(torch, header["dtype"])
    shape = tuple(header["shape"])
    (frame,) = frames
    view = memoryview(frame)
    if view.nbytes == 0:
        t = torch.empty(shape, dtype=dtype)
    else:
        if view.readonly:
            view = memoryview(bytearray(view))
        elif view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        t = torch.frombuffer(view, dtype=dtype)
        if t.shape != shape:
            t = t.reshape(shape)
    if header["device"] == "cuda" and _cuda_landing and torch.cuda.is_available():
        t = t.to("cuda")
    return _finish(t, header)


def _cuda_dumps_tensor(t: Any) -> tuple[dict[str, Any], list[Any]]:
    """``cuda`` family: the tensor's device memory as one frame (exposes ``__cuda_array_interface__``)."""
    if t.device.type != "cuda":
        raise NotImplementedError("only CUDA tensors travel in the cuda family")
    _check_plain(t)
    return _tensor_header(t, t.device.index), [_flat_bytes(t)]


def _cuda_loads_tensor(header: dict[str, Any], frames: list[Any]) -> Any:
    import torch

    dtype = getattr(torch, header["dtype"])
    shape = tuple(header["shape"])
    (frame,) = frames
    if math.prod(shape) == 0:
        t = torch.empty(shape, dtype=dtype, device="cuda")
    elif hasattr(frame, "__cuda_array_interface__"):
        # Device memory as the comm received it (a torch tensor, an rmm/numba buffer): no copy.
        t = torch.as_tensor(frame).view(torch.uint8).reshape(-1).view(dtype).reshape(shape)
    else:  # a comm that staged the frame through host memory
        t = _dask_loads_tensor(dict(header, requires_grad=False, device="cpu"), [frame]).to("cuda")
    return _finish(t, header)


# --------------------------------------------------------------------------- the pickler
#: type -> (its dask serializer, whether it takes ``context``), or None: pickle handles it.
_Decision = tuple[Callable[..., Any], bool] | None
_decisions: dict[type, _Decision] = {}
_decided_at = -1  # size of Dask's registry when _decisions was last valid
_MISSING: Any = object()


#: Dask's Dispatch keeps its registrations in this dict (never replaced); a new registration grows it.
_LOOKUP: dict[Any, Any] = getattr(dask_serialize, "_lookup", {})


def _decide(typ: type) -> _Decision:
    if not _torch_registered and tensor_type() is not None:
        _register_torch()
    try:
        fn = dask_serialize.dispatch(typ)
    except TypeError:
        return None
    except Exception as exc:  # a lazy registration of Dask's that cannot import here
        logger.debug("twinkle: no Dask serializer for %s: %s", typ, exc)
        return None
    if getattr(fn, "__module__", None) == "distributed.protocol.numpy":
        return None  # pickle protocol 5 out of band, as Dask's pickle family
    if isinstance(getattr(fn, "__self__", None), ObjectDictSerializer):
        return None  # generic: pickle walks __dict__ and serializes what it holds the same way
    if fn is _dask_dumps_tensor and typ is not tensor_type():
        return None  # a tensor subclass keeps its class through pickle
    return fn, has_keyword(fn, "context")


def _decision(typ: type) -> _Decision:
    global _decided_at
    seen = len(_LOOKUP)
    if seen != _decided_at:  # something was registered: decide again
        _decisions.clear()
        _decided_at = seen
    decision = _decisions.get(typ, _MISSING)
    if decision is _MISSING:
        decision = _decisions[typ] = _decide(typ)
    return decision


def _frame(f: Any) -> pickle.PickleBuffer:
    if isinstance(f, pickle.PickleBuffer):
        return f
    view = memoryview(f)
    return pickle.PickleBuffer(view if view.contiguous else view.tobytes())


def _tensor_from_frames(header: dict[str, Any], *frames: Any) -> Any:
    """Rebuild a tensor sent by twinkle's own ``dask`` family serializer."""
    return _dask_loads_tensor(header, frames)


def _dask_loads(typ: type, header: Any, *frames: Any) -> Any:
    """Rebuild an object sent by its ``dask`` family serializer (as ``dask_loads`` does)."""
    if not _torch_registered and tensor_type() is not None:
        _register_torch()
    return dask_deserialize.dispatch(typ)(header, list(frames))


def _reduce(pickler: Any, obj: Any) -> Any:
    typ = type(obj)
    # Every object pickle does not handle itself passes here: the common case stays inline.
    decision = _decisions.get(typ, _MISSING) if len(_LOOKUP) == _decided_at else _MISSING
    if decision is _MISSING:
        decision = _decision(typ)
    if decision is None:
        return NotImplemented
    dumps, wants_context = decision
    try:
        header, frames = dumps(obj, context=None) if wants_context else dumps(obj)
    except NotImplementedError:
        return NotImplemented
    if dumps is _dask_dumps_tensor:  # ours: rebuilt by its own deserializer, no look-up
        if header["device"] != "cpu":
            pickler.device_tensors = True
        return _tensor_from_frames, (header, *map(_frame, frames))
    tensor = tensor_type()
    if tensor is not None and isinstance(obj, tensor) and not obj.is_cpu:
        pickler.device_tensors = True  # a registered tensor subclass (Parameter)
    return _dask_loads, (typ, header, *map(_frame, frames))


class _Pickler(pickle.Pickler):
    device_tensors = False  # set when a GPU tensor was copied to host

    def reducer_override(self, obj: Any) -> Any:
        return _reduce(self, obj)


class _CloudPickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle has no type information
    device_tensors = False

    def reducer_override(self, obj: Any) -> Any:
        reduced = _reduce(self, obj)
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
    """Pickle ``obj`` (protocol 5; Dask-serialized objects, arrays and tensors out of band) into a :class:`Blob`."""
    try:
        data, buffers, device = _dump(_Pickler, obj)
        if b"__main__" in data:
            raise pickle.PicklingError("refers to __main__")
    except Exception:
        data, buffers, device = _dump(_CloudPickler, obj)
    return Blob([data, *(b.raw() for b in buffers)], device)
