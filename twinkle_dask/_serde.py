"""How torch tensors travel: raw bytes, any dtype, CUDA tensors through host memory.

Dask's own torch serializer goes through ``numpy()``, which fails for bfloat16
and for CUDA tensors. Here a tensor travels as its bytes (one zero-copy frame
for a contiguous CPU tensor) with dtype, shape, grad flag and original device
in the header. A CUDA tensor is copied to host to travel; it lands on the
receiver's own GPU when the receiver is a GPU worker, and on the CPU
otherwise (the driver). Everything that is not a tensor falls through to
Dask's serializers.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from distributed.protocol.serialize import register_serialization_family

__all__ = ["SERIALIZERS", "ensure_registered", "set_cuda_landing"]

FAMILY = "twinkle"
SERIALIZERS = (FAMILY, "dask", "pickle")

_registered = False
_lock = threading.Lock()
_cuda_landing = False


def set_cuda_landing(enabled: bool) -> None:
    """Whether tensors that left a GPU land on this process's GPU (GPU workers) or on the CPU."""
    global _cuda_landing
    _cuda_landing = enabled


def _serialize(obj: Any) -> tuple[dict[str, Any], list[Any]]:
    torch = sys.modules.get("torch")
    if torch is None or type(obj) is not torch.Tensor:
        raise NotImplementedError
    if obj.is_sparse or obj.is_quantized or obj.layout != torch.strided or obj.is_nested:
        raise NotImplementedError
    header = {
        "dtype": str(obj.dtype).rsplit(".", 1)[-1],
        "shape": list(obj.shape),
        "requires_grad": bool(obj.requires_grad),
        "device": obj.device.type,
    }
    t = obj.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy()
    return header, [memoryview(data)]


def _deserialize(header: dict[str, Any], frames: list[Any]) -> Any:
    import torch

    dtype = getattr(torch, header["dtype"])
    shape = list(header["shape"])
    buf = frames[0] if frames else b""
    view = memoryview(buf)
    if view.nbytes == 0:
        t = torch.empty(shape, dtype=dtype)
    else:
        if view.readonly:
            view = memoryview(bytearray(view))
        t = torch.frombuffer(view, dtype=torch.uint8).view(dtype).reshape(shape)
    if header.get("device") == "cuda" and _cuda_landing and torch.cuda.is_available():
        t = t.to("cuda", non_blocking=False)
    if header.get("requires_grad") and (t.is_floating_point() or t.is_complex()):
        t.requires_grad_(True)
    return t


def ensure_registered() -> None:
    """Register the ``twinkle`` serialization family (once per process)."""
    global _registered
    if _registered:
        return
    with _lock:
        if not _registered:
            register_serialization_family(FAMILY, _serialize, _deserialize)
            _registered = True
