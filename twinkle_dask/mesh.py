"""Device groups and device meshes.

:class:`DeviceGroup` names a set of devices (or CPU worker slots) that
components are placed on; :class:`DeviceMesh` describes how the ranks of one
component are laid out over the parallel dimensions (dp, fsdp, tp, pp, cp, ep)
and is what ``dispatch='slice_dp'`` and ``collect='last_pp'`` read.

Both follow Twinkle's model. Where Twinkle's mesh helpers divide by zero or
raise on a missing dimension, these treat a missing ``dp`` or ``pp`` dimension
as size one (see ``semantics.md``). This module is pure: numpy only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .exceptions import ConfigurationError

__all__ = ["DeviceGroup", "DeviceMesh", "ResolvedGroup", "resolve_groups"]

MESH_DIMS = ("dp", "fsdp", "tp", "pp", "cp", "ep")
_GPU_TYPES = ("cuda", "gpu")
_DEVICE_TYPES = ("cuda", "gpu", "cpu")


def _normalize_device_type(device_type: object, group: str) -> str:
    if not isinstance(device_type, str) or device_type.lower() not in _DEVICE_TYPES:
        raise ConfigurationError(
            f"DeviceGroup {group!r}: device_type {device_type!r} is not supported; "
            f"use one of {list(_DEVICE_TYPES)} (case-insensitive)"
        )
    return "cuda" if device_type.lower() in _GPU_TYPES else "cpu"


@dataclass
class DeviceGroup:
    """A named set of devices that components are placed on.

    Parameters
    ----------
    name : str
        Unique group name, used as ``remote_group=`` when building components.
    ranks : int or list of int
        For GPU groups, the device indices the group owns, or a count (an int
        count continues after the previous GPU group's last device, as in
        Twinkle). For CPU groups, the number of worker processes.
    device_type : {'cuda', 'gpu', 'cpu'}
        Case-insensitive; ``'gpu'`` is an alias of ``'cuda'``.
    gpus_per_worker : int, default 1
        GPU groups only: each worker process owns this many consecutive
        devices (``CUDA_VISIBLE_DEVICES="0,1"``). ``ranks`` must divide by it.
    visible_devices : str, optional
        GPU groups only: physical device ids (``"4,5,6,7"``) that the group's
        ranks map onto, in order, instead of the rank numbers themselves.

    Raises
    ------
    ConfigurationError
        For a bad name, device type, rank list or ``gpus_per_worker``.

    Examples
    --------
    >>> DeviceGroup(name="model", ranks=4, device_type="cpu")
    DeviceGroup(name='model', ranks=4, device_type='cpu', gpus_per_worker=1, visible_devices=None)
    """

    name: str
    ranks: int | list[int]
    device_type: str
    gpus_per_worker: int = 1
    visible_devices: str | None = None
    _device_mesh: dict[str, DeviceMesh] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigurationError(f"DeviceGroup name must be a non-empty string, got {self.name!r}")
        kind = _normalize_device_type(self.device_type, self.name)
        g = self.gpus_per_worker
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ConfigurationError(
                f"DeviceGroup {self.name!r}: gpus_per_worker must be a positive int, got {g!r}"
            )
        if kind == "cpu" and g != 1:
            raise ConfigurationError(
                f"DeviceGroup {self.name!r}: gpus_per_worker={g} applies to GPU groups only; "
                f"a CPU group has one worker per rank"
            )
        if kind == "cpu" and self.visible_devices is not None:
            raise ConfigurationError(
                f"DeviceGroup {self.name!r}: visible_devices applies to GPU groups only"
            )
        ranks = self.ranks
        if isinstance(ranks, bool) or not isinstance(ranks, (int, list, tuple, range)):
            raise ConfigurationError(
                f"DeviceGroup {self.name!r}: ranks must be an int count or a list of device "
                f"indices, got {ranks!r}"
            )
        if isinstance(ranks, int):
            if ranks < 1:
                raise ConfigurationError(
                    f"DeviceGroup {self.name!r}: ranks must be at least 1, got {ranks}"
                )
            count = ranks
        else:
            ranks = list(ranks)
            bad = [r for r in ranks if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0]
            if bad or not ranks:
                raise ConfigurationError(
                    f"DeviceGroup {self.name!r}: ranks must be a non-empty list of non-negative "
                    f"ints, got {self.ranks!r}"
                )
            dupes = sorted({int(r) for r in ranks if ranks.count(r) > 1})
            if dupes:
                raise ConfigurationError(
                    f"DeviceGroup {self.name!r}: rank(s) {dupes} listed more than once"
                )
            self.ranks = [int(r) for r in ranks]
            count = len(ranks)
        if count % g:
            raise ConfigurationError(
                f"DeviceGroup {self.name!r}: {count} ranks do not divide by "
                f"gpus_per_worker={g}; use a multiple of {g} ranks"
            )

    @property
    def is_gpu(self) -> bool:
        """Whether this is a GPU (``cuda``) group."""
        return _normalize_device_type(self.device_type, self.name) == "cuda"

    @property
    def num_ranks(self) -> int:
        """How many devices (GPU groups) or worker slots (CPU groups) the group has."""
        return self.ranks if isinstance(self.ranks, int) else len(self.ranks)

    @property
    def num_workers(self) -> int:
        """How many worker processes the group needs."""
        return self.num_ranks // self.gpus_per_worker


@dataclass(frozen=True, slots=True)
class ResolvedGroup:
    """A :class:`DeviceGroup` with its ranks made concrete.

    ``devices[w]`` are the physical device ids of worker ``w`` (empty tuples
    for CPU groups).
    """

    name: str
    device_type: str
    ranks: tuple[int, ...]
    gpus_per_worker: int
    devices: tuple[tuple[int, ...], ...]

    @property
    def num_workers(self) -> int:
        return len(self.devices)

    @property
    def is_gpu(self) -> bool:
        return self.device_type == "cuda"


def resolve_groups(groups: Iterable[DeviceGroup]) -> list[ResolvedGroup]:
    """Make the ranks of every group concrete and check the groups together.

    GPU groups given as a count continue after the previous GPU group's last
    device; GPU groups may not share a device.

    Raises
    ------
    ConfigurationError
        For duplicate names, overlapping GPU devices, or non-DeviceGroup items.
    """
    out: list[ResolvedGroup] = []
    seen_names: set[str] = set()
    owner: dict[int, str] = {}
    next_gpu = 0
    for group in groups:
        if not isinstance(group, DeviceGroup):
            raise ConfigurationError(
                f"groups must be DeviceGroup objects, got {type(group).__name__}: {group!r}"
            )
        if group.name in seen_names:
            raise ConfigurationError(f"two device groups are named {group.name!r}; names must be unique")
        seen_names.add(group.name)
        g = group.gpus_per_worker
        if not group.is_gpu:
            ranks = tuple(range(group.num_ranks))
            out.append(ResolvedGroup(group.name, "cpu", ranks, 1, tuple(() for _ in ranks)))
            continue
        if isinstance(group.ranks, int):
            ranks = tuple(range(next_gpu, next_gpu + group.ranks))
        else:
            ranks = tuple(group.ranks)
        physical = ranks
        if group.visible_devices is not None:
            ids = [p.strip() for p in str(group.visible_devices).split(",") if p.strip()]
            if len(ids) != len(ranks) or not all(p.isdigit() for p in ids):
                raise ConfigurationError(
                    f"DeviceGroup {group.name!r}: visible_devices={group.visible_devices!r} must "
                    f"list {len(ranks)} device ids, one per rank"
                )
            physical = tuple(int(p) for p in ids)
        for dev in physical:
            if dev in owner:
                raise ConfigurationError(
                    f"DeviceGroup {group.name!r}: device {dev} is already used by group "
                    f"{owner[dev]!r}; GPU groups may not overlap"
                )
            owner[dev] = group.name
        next_gpu = ranks[-1] + 1
        devices = tuple(tuple(physical[i : i + g]) for i in range(0, len(physical), g))
        out.append(ResolvedGroup(group.name, "cuda", ranks, g, devices))
    return out


def _current_rank() -> int:
    # Imported lazily: identity depends on nothing in this module.
    from .identity import get_rank

    return get_rank()


@dataclass(eq=False)
class DeviceMesh:
    """The layout of one component's ranks over named parallel dimensions.

    Parameters
    ----------
    mesh : numpy.ndarray or nested list of int
        The ranks (0 .. world_size-1 of the component), shaped by the dims.
    mesh_dim_names : tuple of str
        One name per axis of ``mesh``, drawn from dp, fsdp, tp, pp, cp, ep.
    ep_size, etp_size, vpp_size, ulysses_size : int, optional
        Sizes of parallelisms that are not mesh axes. ``ulysses_size`` divides
        the data world size (sequence-parallel ranks share data).
    sequence_parallel : bool, default False
    device_type : str, default 'cuda'

    Examples
    --------
    >>> mesh = DeviceMesh.from_sizes(dp_size=2, tp_size=2)
    >>> mesh.mesh_dim_names
    ('dp', 'tp')
    >>> [mesh.get_data_rank_from_global_rank(r) for r in range(4)]
    [0, 0, 1, 1]
    >>> mesh.get_slice(10, 1)
    slice(5, 10, None)
    """

    mesh: np.ndarray
    mesh_dim_names: tuple[str, ...] | None
    ep_size: int | None = None
    etp_size: int | None = None
    vpp_size: int | None = None
    ulysses_size: int | None = None
    sequence_parallel: bool = False
    device_type: str = "cuda"

    def __post_init__(self) -> None:
        arr = np.asarray(self.mesh)
        if arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise ConfigurationError(f"DeviceMesh.mesh must be a non-empty array of int ranks, got {self.mesh!r}")
        if arr.ndim == 0:
            arr = arr.reshape(1)
        self.mesh = arr
        names = tuple(self.mesh_dim_names) if self.mesh_dim_names is not None else None
        if names is not None:
            if len(names) != arr.ndim:
                raise ConfigurationError(
                    f"DeviceMesh: mesh_dim_names {names} has {len(names)} names but the mesh has "
                    f"{arr.ndim} dimension(s) (shape {arr.shape})"
                )
            bad = [n for n in names if n not in MESH_DIMS]
            if bad:
                raise ConfigurationError(
                    f"DeviceMesh: dimension name(s) {bad} are not supported; use names from "
                    f"{list(MESH_DIMS)} (ulysses is the ulysses_size attribute)"
                )
            if len(set(names)) != len(names):
                raise ConfigurationError(f"DeviceMesh: dimension names {names} repeat")
        self.mesh_dim_names = names
        flat = arr.flatten().tolist()
        if len(set(flat)) != len(flat) or min(flat) < 0:
            raise ConfigurationError(f"DeviceMesh: ranks must be unique non-negative ints, got {flat}")
        ulysses = self.ulysses_size or 1
        if self.data_world_size_raw % ulysses:
            raise ConfigurationError(
                f"DeviceMesh: data world size {self.data_world_size_raw} cannot be divided by "
                f"ulysses_size={ulysses}"
            )

    # ------------------------------------------------------------------ building
    @staticmethod
    def from_sizes(
        *,
        world_size: int = 1,
        dp_size: int | None = 1,
        fsdp_size: int | None = None,
        tp_size: int | None = None,
        pp_size: int | None = None,
        ulysses_size: int | None = None,
        cp_size: int | None = None,
        ep_size: int | None = None,
        etp_size: int | None = 1,
        vpp_size: int | None = None,
        device_type: str = "cuda",
        sequence_parallel: bool = False,
    ) -> DeviceMesh:
        """Build a mesh from dimension sizes, laid out in the order fsdp, pp, dp, cp, tp.

        ``dp_size=None`` infers dp from ``world_size``. A dimension left as
        ``None`` is not part of the mesh (dp is always present).

        Raises
        ------
        ConfigurationError
            When the sizes are not positive or do not multiply to ``world_size``.
        """
        sizes: dict[str, int | None] = {
            "fsdp": fsdp_size,
            "pp": pp_size,
            "dp": dp_size,
            "cp": cp_size,
            "tp": tp_size,
        }
        names: list[str] = []
        shape: list[int] = []
        for name in ("fsdp", "pp", "dp", "cp", "tp"):
            size = sizes[name]
            if size is None and name != "dp":
                continue
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
                raise ConfigurationError(f"DeviceMesh.from_sizes: {name}_size must be a positive int, got {size!r}")
            names.append(name)
            shape.append(-1 if size is None else size)
        known = int(np.prod([s for s in shape if s > 0])) if shape else 1
        if dp_size is None:
            if world_size % known:
                raise ConfigurationError(
                    f"DeviceMesh.from_sizes: world_size={world_size} does not divide by the other "
                    f"sizes (product {known}) to infer dp_size"
                )
            total = world_size
        else:
            total = known if world_size == 1 else world_size
            if total != known:
                raise ConfigurationError(
                    f"DeviceMesh.from_sizes: world_size={world_size} but the sizes "
                    f"{dict(zip(names, shape))} multiply to {known}"
                )
        return DeviceMesh(
            mesh=np.arange(total).reshape(shape),
            mesh_dim_names=tuple(names),
            ep_size=ep_size,
            etp_size=etp_size,
            vpp_size=vpp_size,
            ulysses_size=ulysses_size,
            sequence_parallel=sequence_parallel,
            device_type=device_type,
        )

    # ------------------------------------------------------------------ value semantics
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DeviceMesh):
            return NotImplemented
        return (
            self.mesh_dim_names == other.mesh_dim_names
            and self.mesh.shape == other.mesh.shape
            and bool(np.array_equal(self.mesh, other.mesh))
            and (self.ep_size, self.etp_size, self.vpp_size, self.ulysses_size)
            == (other.ep_size, other.etp_size, other.vpp_size, other.ulysses_size)
            and self.sequence_parallel == other.sequence_parallel
            and self.device_type == other.device_type
        )

    __hash__ = None  # type: ignore[assignment]

    def __getstate__(self) -> dict[str, Any]:
        # torch process groups cached by get_dim_group do not travel.
        return {k: v for k, v in self.__dict__.items() if k != "_dim_group_cache"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        dims = ", ".join(f"{n}={s}" for n, s in zip(self.mesh_dim_names or (), self.mesh.shape))
        extra = f", ulysses={self.ulysses_size}" if self.ulysses_size else ""
        return f"DeviceMesh({dims or self.mesh.shape}{extra}, world_size={self.world_size})"

    # ------------------------------------------------------------------ coordinates
    def _get_dim_index(self, dim_name: str) -> int | None:
        if not self.mesh_dim_names or dim_name not in self.mesh_dim_names:
            return None
        return self.mesh_dim_names.index(dim_name)

    def _has_dim(self, dim_name: str) -> bool:
        return self._get_dim_index(dim_name) is not None

    def has_dim(self, dim_name: str) -> bool:
        """Whether ``dim_name`` is an axis of this mesh."""
        return self._has_dim(dim_name)

    def get_dim_size(self, dim_name: str) -> int:
        """The size of axis ``dim_name``; ``ConfigurationError`` if it is not an axis."""
        idx = self._get_dim_index(dim_name)
        if idx is None:
            raise ConfigurationError(
                f"dimension {dim_name!r} is not in this mesh; it has {self.mesh_dim_names}"
            )
        return int(self.mesh.shape[idx])

    def _get_coord_for_rank(self, rank: int) -> tuple[int, ...] | None:
        coords = np.argwhere(self.mesh == rank)
        if len(coords) == 0:
            return None
        return tuple(int(c) for c in coords[0])

    def _get_coord(self) -> tuple[int, ...] | None:
        return self._get_coord_for_rank(_current_rank())

    def _get_rank_for_dim(self, dim_name: str, rank: int | None = None) -> int | None:
        idx = self._get_dim_index(dim_name)
        if idx is None:
            return None
        coord = self._get_coord() if rank is None else self._get_coord_for_rank(rank)
        return None if coord is None else coord[idx]

    def _get_world_size_for_dim(self, dim_name: str) -> int:
        idx = self._get_dim_index(dim_name)
        return 0 if idx is None else int(self.mesh.shape[idx])

    # The per-rank helpers read the current component's rank (RANK).
    @property
    def dp_rank(self) -> int | None:
        return self._get_rank_for_dim("dp")

    @property
    def fsdp_rank(self) -> int | None:
        return self._get_rank_for_dim("fsdp")

    @property
    def tp_rank(self) -> int | None:
        return self._get_rank_for_dim("tp")

    @property
    def pp_rank(self) -> int | None:
        return self._get_rank_for_dim("pp")

    @property
    def cp_rank(self) -> int | None:
        return self._get_rank_for_dim("cp")

    @property
    def ep_rank(self) -> int | None:
        return self._get_rank_for_dim("ep")

    @property
    def dp_world_size(self) -> int:
        return self._get_world_size_for_dim("dp")

    @property
    def fsdp_world_size(self) -> int:
        return self._get_world_size_for_dim("fsdp")

    @property
    def tp_world_size(self) -> int:
        return self._get_world_size_for_dim("tp")

    @property
    def pp_world_size(self) -> int:
        return self._get_world_size_for_dim("pp")

    @property
    def cp_world_size(self) -> int:
        return self._get_world_size_for_dim("cp")

    @property
    def ep_world_size(self) -> int:
        return self._get_world_size_for_dim("ep")

    @property
    def etp_world_size(self) -> int:
        if self.etp_size is not None:
            return self.etp_size
        return self.tp_world_size or 1

    @property
    def world_size(self) -> int:
        """Number of ranks in the mesh."""
        return int(self.mesh.size)

    @property
    def is_single_process(self) -> bool:
        return self.world_size == 1 and "RANK" not in os.environ

    @property
    def order(self) -> str:
        """Dimension order used by Megatron."""
        return "tp-cp-ep-dp-pp"

    # ------------------------------------------------------------------ data parallelism
    def _data_rank_of(self, coord: tuple[int, ...] | None) -> int:
        if coord is None:
            return 0
        dp_idx, fsdp_idx = self._get_dim_index("dp"), self._get_dim_index("fsdp")
        dp = coord[dp_idx] if dp_idx is not None else 0
        if fsdp_idx is not None:
            fsdp_ws = int(self.mesh.shape[fsdp_idx])
            data = dp * fsdp_ws + coord[fsdp_idx]
        else:
            data = dp
        return data // (self.ulysses_size or 1)

    @property
    def data_world_size_raw(self) -> int:
        dp = self.dp_world_size or 1
        fsdp = self.fsdp_world_size or 1
        return dp * fsdp

    @property
    def data_world_size(self) -> int:
        """How many distinct data shards the mesh consumes: dp × fsdp ÷ ulysses.

        A missing dp or fsdp dimension counts as size 1 (a mesh with no dp
        dimension has data world size 1).
        """
        return self.data_world_size_raw // (self.ulysses_size or 1)

    @property
    def data_rank(self) -> int:
        """The data shard index of the current rank (0 outside a component)."""
        return self._data_rank_of(self._get_coord())

    def get_data_rank_from_global_rank(self, global_rank: int) -> int:
        """The data shard index of ``global_rank`` (0 for a rank not in the mesh)."""
        return self._data_rank_of(self._get_coord_for_rank(int(global_rank)))

    def get_slice(self, total_length: int, rank: int | None = None) -> slice:
        """The slice of ``total_length`` items that data rank ``rank`` consumes.

        With ``k, m = divmod(total_length, data_world_size)`` data rank ``i``
        gets ``[i*k + min(i, m), (i+1)*k + min(i+1, m))``.
        """
        world = self.data_world_size
        if world == 1:
            return slice(0, total_length)
        if rank is None:
            rank = self.data_rank
        k, m = divmod(total_length, world)
        return slice(rank * k + min(rank, m), (rank + 1) * k + min(rank + 1, m))

    # ------------------------------------------------------------------ pipeline / tensor
    def get_pp_stage_ranks(self, stage: int) -> list[int]:
        """Ranks of pipeline stage ``stage`` (all ranks when there is no pp dimension)."""
        idx = self._get_dim_index("pp")
        size = 1 if idx is None else int(self.mesh.shape[idx])
        if not 0 <= stage < size:
            raise ConfigurationError(f"pipeline stage {stage} is out of range; the mesh has {size} stage(s)")
        if idx is None:
            return sorted(self.mesh.flatten().tolist())
        index: list[Any] = [slice(None)] * self.mesh.ndim
        index[idx] = stage
        return sorted(self.mesh[tuple(index)].flatten().tolist())

    def get_pp_first_ranks(self) -> list[int]:
        """Ranks of the first pipeline stage."""
        return self.get_pp_stage_ranks(0)

    def get_pp_last_ranks(self) -> list[int]:
        """Ranks of the last pipeline stage (all ranks when there is no pp dimension)."""
        return self.get_pp_stage_ranks((self.pp_world_size or 1) - 1)

    def is_pp_first_rank(self, rank: int | None = None) -> bool:
        return (_current_rank() if rank is None else rank) in self.get_pp_first_ranks()

    def is_pp_last_rank(self, rank: int | None = None) -> bool:
        return (_current_rank() if rank is None else rank) in self.get_pp_last_ranks()

    def get_collect_ranks(self) -> list[int]:
        """One rank per data replica whose output is complete.

        The ranks of the last pipeline stage whose tp and cp coordinates are 0,
        ascending: collecting their results gives every data shard exactly once.
        """
        last = set(self.get_pp_last_ranks())
        out = []
        for rank in sorted(last):
            coord = self._get_coord_for_rank(rank)
            assert coord is not None  # ranks come from the mesh itself
            if all(
                coord[i] == 0 for name in ("tp", "cp") if (i := self._get_dim_index(name)) is not None
            ):
                out.append(rank)
        return out

    def get_tp_ranks(self, rank: int | None = None) -> list[int]:
        """Ranks in the same tensor-parallel group as ``rank`` (default: current)."""
        rank = _current_rank() if rank is None else rank
        idx = self._get_dim_index("tp")
        if idx is None:
            return [rank]
        coord = self._get_coord_for_rank(rank)
        if coord is None:
            return []
        index: list[Any] = list(coord)
        index[idx] = slice(None)
        return sorted(self.mesh[tuple(index)].flatten().tolist())

    def get_tp_last_ranks(self) -> list[int]:
        """The last rank of every tensor-parallel group."""
        idx = self._get_dim_index("tp")
        if idx is None:
            return sorted(self.mesh.flatten().tolist())
        index: list[Any] = [slice(None)] * self.mesh.ndim
        index[idx] = int(self.mesh.shape[idx]) - 1
        return sorted(self.mesh[tuple(index)].flatten().tolist())

    def is_tp_last_rank(self, rank: int | None = None) -> bool:
        rank = _current_rank() if rank is None else rank
        idx = self._get_dim_index("tp")
        if idx is None:
            return True
        coord = self._get_coord_for_rank(rank)
        return coord is not None and coord[idx] == int(self.mesh.shape[idx]) - 1

    # ------------------------------------------------------------------ torch
    def to_torch_device_mesh(self) -> Any:
        """A ``torch.distributed.DeviceMesh`` with the same layout (needs torch.distributed)."""
        import torch

        return torch.distributed.DeviceMesh(  # type: ignore[attr-defined]  # not in torch.distributed.__all__
            self.device_type, self.mesh, mesh_dim_names=self.mesh_dim_names)

    def create_process_group(self, dims: Sequence[str]) -> Any:
        """The torch process group of the current rank's peers along ``dims``.

        Collective: every rank of the mesh must call it with the same ``dims``
        (torch requires every rank to create every group, in the same order).
        Groups are cached per ``dims``.
        """
        import torch.distributed as dist

        dims = tuple(dims)
        missing = [d for d in dims if not self._has_dim(d)]
        if missing:
            raise ConfigurationError(f"dimension(s) {missing} not in this mesh; it has {self.mesh_dim_names}")
        cache: dict[tuple[str, ...], Any] = self.__dict__.setdefault("_dim_group_cache", {})
        if dims in cache:
            return cache[dims]
        names = self.mesh_dim_names or ()
        keep = [i for i, n in enumerate(names) if n in dims]
        other = [i for i, n in enumerate(names) if n not in dims]
        moved = np.transpose(self.mesh, other + keep).reshape(-1, int(np.prod([self.mesh.shape[i] for i in keep])))
        me = dist.get_rank()
        mine = None
        for row in moved:
            ranks = sorted(int(r) for r in row)
            group = dist.new_group(ranks=ranks)
            if me in ranks:
                mine = group
        if mine is None:
            raise ConfigurationError(f"rank {me} is not in this mesh")
        cache[dims] = mine
        return mine

    def get_dim_group(self, dims: str | Sequence[str]) -> Any:
        """The torch process group along one or more dimensions (collective, cached)."""
        return self.create_process_group((dims,) if isinstance(dims, str) else tuple(dims))


# ----------------------------------------------------------------------------- other mesh types
#: The classes accepted wherever a DeviceMesh is (this module's, plus registered ones).
_MESH_TYPES: tuple[type, ...] = (DeviceMesh,)


def register_mesh_type(cls: type) -> None:
    """Accept instances of ``cls`` wherever a :class:`DeviceMesh` is accepted.

    For meshes of another library with the same methods (``world_size``,
    ``data_world_size``, ``get_slice``, ``get_data_rank_from_global_rank``,
    ``get_pp_last_ranks``), such as Twinkle's own ``twinkle.DeviceMesh``: a
    component's constructor then receives the object it was given, and
    dispatch and collect read it by those methods.
    """
    global _MESH_TYPES
    if not isinstance(cls, type):
        raise ConfigurationError(f"register_mesh_type expects a class, got {cls!r}")
    if cls not in _MESH_TYPES:
        _MESH_TYPES = (*_MESH_TYPES, cls)


def is_mesh(obj: object) -> bool:
    """Whether ``obj`` is a :class:`DeviceMesh` or an instance of a registered mesh type."""
    return isinstance(obj, _MESH_TYPES)
