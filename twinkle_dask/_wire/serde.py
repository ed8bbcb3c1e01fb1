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
``"cuda"`` in its serializers) move it device to device.

A call's payload moves CUDA tensors device to device too where the cluster
speaks UCX (:func:`set_device_frames`: on in a GPU worker whose address is
``ucx://`` and in a driver with a GPU whose scheduler is ``ucx://``, off
everywhere else). Then :func:`dumps_blob` keeps each (non-empty, plain)
CUDA tensor out of the pickle: the pickle holds a small rebuild call (dtype,
shape, ``requires_grad``, an index) and the blob holds the contiguous tensor
itself in ``device_frames``, no copy. When the blob crosses a channel whose
both ends can take device memory (a UCX comm, checked when the channel
opens), each device frame becomes one of the Dask message's own frames
(it exposes ``__cuda_array_interface__``, which the UCX comm sends device to
device and receives into device memory), and the receiver rebuilds the
tensor on its GPU from it without a copy. Anywhere else (a peer without a
GPU, a comm other than UCX, a blob pickled by Dask itself) the device frames
are copied to host where the blob is pickled (on a channel, in a thread, not
on the event loop) and land as above: correct, not device to device. A
tensor kept as a device frame is the component's own tensor, not a
snapshot: changing it in place before its consumers have it changes what
they get (as with a Dask task's result). With the switch off, CUDA tensors
stage through host memory in the serializing thread as described above.

Objects that plain pickle cannot handle (classes defined in ``__main__`` or
in a function, lambdas) go through cloudpickle.
"""

from __future__ import annotations

import functools
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

__all__ = ["Blob", "device_frames_enabled", "dumps_blob", "register_serializers", "set_cuda_landing",
           "set_device_frames"]

logger = logging.getLogger(__name__)

_cuda_landing = False
_device_frames = False
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


def set_device_frames(enabled: bool) -> None:
    """Say whether :func:`dumps_blob` keeps CUDA tensors in device memory (``device_frames``).

    On in processes whose cluster speaks UCX and that can use CUDA (a GPU
    worker with a ``ucx://`` address, a driver with a GPU whose scheduler is
    ``ucx://``), off everywhere else: blobs made while it is off copy CUDA
    tensors to host in the serializing thread.
    """
    global _device_frames
    _device_frames = bool(enabled)
    register_serializers()


def device_frames_enabled() -> bool:
    """Whether :func:`dumps_blob` keeps CUDA tensors in device memory (see :func:`set_device_frames`)."""
    return _device_frames


def moves_device_memory(address: str) -> bool:
    """Whether ``address`` is on a Dask transport that moves device memory (``ucx://``, ``ucxx://``)."""
    return str(address).startswith(("ucx://", "ucxx://"))


def cuda_usable() -> bool:
    """Whether this process can use a CUDA device through torch (imports torch; False without it)."""
    try:
        import torch
    except ImportError:
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver install: no GPU for this process
        return False


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
    if dumps is _dask_dumps_tensor and pickler.device_frames is not None and _is_device_tensor(obj):
        return _reduce_device_tensor(pickler, obj)
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


# --------------------------------------------------------------------------- device frames
def _is_device_tensor(t: Any) -> bool:
    """Whether ``t`` (a ``torch.Tensor``) travels as a device frame while device frames are on."""
    return bool(t.device.type == "cuda" and t.numel() > 0)


def _reduce_device_tensor(pickler: Any, t: Any) -> Any:
    """Keep ``t`` out of the pickle: the pickle gets a rebuild call, the blob the tensor itself."""
    try:
        _check_plain(t)
    except NotImplementedError:
        return NotImplemented
    x = t
    if x.is_conj() or x.is_neg() or not x.is_contiguous():
        x = x.detach().resolve_conj().resolve_neg().contiguous()  # a copy on the device, never to host
    pickler.device_tensors = True
    frames: list[Any] = pickler.device_frames
    frames.append(x)
    return _device_tensor, (_tensor_header(t, "cuda"), len(frames) - 1)


#: Per thread: ``frames`` = the device frames of the blob being loaded; ``sink`` = a batch is
#: being pickled for a comm that moves device memory.
_local = threading.local()


def _device_tensor(header: dict[str, Any], index: int) -> Any:
    """Inside :meth:`Blob.load`: the tensor kept as the blob's device frame ``index``."""
    frames = getattr(_local, "frames", None)
    if frames is None or index >= len(frames):
        raise pickle.UnpicklingError("a tensor kept in device memory is unpickled outside its Blob's load()")
    return _tensor_from_device_frame(header, frames[index])


def _tensor_from_device_frame(header: dict[str, Any], frame: Any) -> Any:
    """Rebuild a tensor from its device frame: device memory as received (no copy), or host bytes.

    A frame with ``__cuda_array_interface__`` (what a UCX comm receives into) becomes a
    tensor on this process's current GPU without a copy; a torch tensor (the blob was made
    in this process) is used as it is; host bytes (the frame was staged through host memory)
    land on this process's GPU when it is a GPU worker, on the CPU otherwise.
    """
    import torch

    dtype = getattr(torch, header["dtype"])
    shape = tuple(header["shape"])
    if isinstance(frame, torch.Tensor):
        flat = frame.detach().reshape(-1).view(torch.uint8)
    elif hasattr(frame, "__cuda_array_interface__"):
        flat = torch.as_tensor(frame, device="cuda").reshape(-1).view(torch.uint8)
    else:
        t = _dask_loads_tensor(dict(header, requires_grad=False), [frame])
        return _finish(t, header)
    return _finish(flat.view(dtype).reshape(shape), header)


class _DeviceSlot(bytearray):
    """Stands in, as an out-of-band pickle buffer, for one device frame of a blob.

    While a batch is pickled for a comm that moves device memory (see
    :func:`device_frame_sink`), the batch's ``buffer_callback`` finds the
    slot (:func:`device_frame_of`) and makes the device frame itself the
    message's frame; the receiver's unpickler hands that frame, as received,
    to :func:`_blob_with_device`.
    """

    frame: Any = None


class device_frame_sink:  # noqa: N801  # used as a context manager, like contextlib's
    """While active (in this thread), blobs pickled here hand their device frames to the pickle's buffer callback."""

    def __enter__(self) -> None:
        self._was = getattr(_local, "sink", False)
        _local.sink = True

    def __exit__(self, *exc: object) -> None:
        _local.sink = self._was


def device_frame_of(buf: pickle.PickleBuffer) -> Any:
    """The device frame ``buf`` stands in for (see :class:`_DeviceSlot`), or None for an ordinary buffer."""
    obj = buf.raw().obj
    return obj.frame if isinstance(obj, _DeviceSlot) else None


def _wire_frame(frame: Any) -> Any:
    """``frame`` as it leaves on a comm that moves device memory: flat bytes in device memory."""
    tensor = tensor_type()
    if tensor is not None and isinstance(frame, tensor):
        return _flat_bytes(frame)  # a view (detached, so it exposes __cuda_array_interface__)
    return frame  # device memory a comm received (rmm, numba): passed on as it is


def _host_frame(frame: Any) -> memoryview:
    """``frame``'s bytes in host memory (a copy from the device)."""
    tensor = tensor_type()
    if tensor is not None and isinstance(frame, tensor):
        flat = _flat_bytes(frame)
    elif hasattr(frame, "__cuda_array_interface__"):
        import torch

        flat = torch.as_tensor(frame, device="cuda").reshape(-1).view(torch.uint8)
    else:
        return memoryview(frame).cast("B") if memoryview(frame).ndim != 1 else memoryview(frame)
    return memoryview(flat.cpu().numpy()).cast("B")


def _frame_nbytes(frame: Any) -> int:
    n = getattr(frame, "nbytes", None)
    return int(n) if n is not None else memoryview(frame).nbytes


class _Pickler(pickle.Pickler):
    device_tensors = False  # set when a GPU tensor was copied to host or kept as a device frame
    device_frames: list[Any] | None = None  # CUDA tensors kept out of the pickle (device frames on)

    def reducer_override(self, obj: Any) -> Any:
        return _reduce(self, obj)


class _CloudPickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle has no type information
    device_tensors = False
    device_frames: list[Any] | None = None

    def reducer_override(self, obj: Any) -> Any:
        reduced = _reduce(self, obj)
        if reduced is NotImplemented:
            return super().reducer_override(obj)
        return reduced


def _dump(pickler_cls: type, obj: Any) -> tuple[bytes, list[Any], bool, list[Any]]:
    buffers: list[Any] = []
    f = io.BytesIO()
    pickler = pickler_cls(f, protocol=5, buffer_callback=buffers.append)
    device_frames: list[Any] = []
    if _device_frames:
        pickler.device_frames = device_frames
    pickler.dump(obj)
    return f.getvalue(), buffers, pickler.device_tensors, device_frames


class Blob:
    """A pickled value: the pickle stream and its out-of-band buffers.

    Pickled inside a message it travels as the message's own out-of-band
    frames (small ones in band), so large tensors are never copied into the
    message. :meth:`load` unpickles it. ``device`` says whether GPU tensors
    were copied to host or kept in device memory to make it (known where it
    was made, not sent). ``device_frames``: CUDA tensors kept out of the
    pickle (see :func:`set_device_frames`); after a comm that moves device
    memory, the device memory it received; after any other, host bytes.
    """

    __slots__ = ("device", "device_frames", "frames")

    def __init__(self, frames: list[Any], device: bool = False, device_frames: list[Any] | None = None) -> None:
        self.frames = frames
        self.device = device
        self.device_frames: list[Any] = device_frames if device_frames is not None else []

    def __reduce_ex__(self, protocol: Any) -> Any:
        oob = isinstance(protocol, int) and protocol >= 5
        if not self.device_frames:
            if oob:
                return _blob, tuple(pickle.PickleBuffer(f) for f in self.frames)
            return _blob, tuple(bytes(f) for f in self.frames)
        host: tuple[Any, ...]
        if oob:
            host = tuple(pickle.PickleBuffer(f) for f in self.frames)
        else:
            host = tuple(bytes(f) for f in self.frames)
        return _blob_with_device, (len(self.frames), *host, *map(functools.partial(_device_out, oob),
                                                                  self.device_frames))

    def load(self) -> Any:
        if not self.device_frames:
            return pickle.loads(self.frames[0], buffers=self.frames[1:])
        was = getattr(_local, "frames", None)
        _local.frames = self.device_frames
        try:
            return pickle.loads(self.frames[0], buffers=self.frames[1:])
        finally:
            _local.frames = was

    @property
    def nbytes(self) -> int:
        return sum(memoryview(f).nbytes for f in self.frames) + sum(map(_frame_nbytes, self.device_frames))


def _device_out(oob: bool, frame: Any) -> Any:
    """One device frame of a blob being pickled: the device memory itself into a batch
    for a comm that moves it, else its bytes copied to host."""
    if oob and getattr(_local, "sink", False):
        tensor = tensor_type()
        if (tensor is not None and isinstance(frame, tensor)) or hasattr(frame, "__cuda_array_interface__"):
            slot = _DeviceSlot()
            slot.frame = _wire_frame(frame)
            return pickle.PickleBuffer(slot)
        return pickle.PickleBuffer(memoryview(frame))  # already host bytes
    host = _host_frame(frame)
    return pickle.PickleBuffer(host) if oob else host.tobytes()


def _blob(*frames: Any) -> Blob:
    return Blob(list(frames))


def _blob_with_device(n: int, *frames: Any) -> Blob:
    return Blob(list(frames[:n]), device_frames=list(frames[n:]))


def dumps_blob(obj: Any) -> Blob:
    """Pickle ``obj`` (protocol 5; Dask-serialized objects, arrays and tensors out of band) into a :class:`Blob`.

    With device frames on (:func:`set_device_frames`), CUDA tensors stay in
    device memory, in the blob's ``device_frames``.
    """
    try:
        data, buffers, device, device_frames = _dump(_Pickler, obj)
        if b"__main__" in data:
            raise pickle.PicklingError("refers to __main__")
    except Exception:
        data, buffers, device, device_frames = _dump(_CloudPickler, obj)
    return Blob([data, *(b.raw() for b in buffers)], device, device_frames)
