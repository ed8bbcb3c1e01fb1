"""Named option types and strategy protocols shared across the package."""

from __future__ import annotations

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
