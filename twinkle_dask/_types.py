"""Named option types and strategy protocols shared across the package."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from .mesh import DeviceMesh

__all__ = [
    "ClassExecute",
    "CollectFn",
    "CollectName",
    "CollectSpec",
    "DispatchFn",
    "DispatchName",
    "DispatchSpec",
    "Execute",
    "Mode",
    "tensor_type",
]

Mode = Literal["local", "dask"]
ClassExecute = Literal["all", "first", "peer"]
Execute = Literal["all", "first"]
DispatchName = Literal["slice", "all", "slice_dp"]
CollectName = Literal["none", "flatten", "mean", "avg", "sum", "first", "last_pp", "last_pp_first"]


class DispatchFn(Protocol):
    """Twinkle's custom dispatch: the inputs of rank ``i`` of ``length`` ranks."""

    def __call__(
        self,
        length: int,
        i: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        device_mesh: DeviceMesh | None,
    ) -> tuple[Sequence[Any], Mapping[str, Any]]: ...


class CollectFn(Protocol):
    """Twinkle's custom collect: one value from the per-rank results."""

    def __call__(self, results: list[Any], device_mesh: DeviceMesh | None) -> Any: ...


DispatchSpec = str | DispatchFn
CollectSpec = str | CollectFn


def tensor_type() -> type[Any] | None:
    """``torch.Tensor`` if torch is imported (far enough to have it), else None.

    Never imports torch. Another thread may be importing it right now, so a
    module without ``Tensor`` yet counts as not imported.
    """
    return getattr(sys.modules.get("torch"), "Tensor", None)
