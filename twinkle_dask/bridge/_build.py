"""Building a Twinkle-decorated class in dask mode: in the driver (a handle) or in-process.

Both paths apply the rules twinkle-kit's ``remote_class`` applies in Ray mode,
in the same order, so that a component sees the arguments, the mesh and the
random streams it would see in a Ray actor:

* an ``execute='first'`` component gets a dp=1 ``twinkle.DeviceMesh``;
  a ``DataLoader`` without ``min_batch_size`` gets its ``batch_size``;
  a component that takes a mesh and got none gets ``global_device_mesh``;
  the mesh is recorded on Twinkle's ``DeviceGroup`` (for
  ``twinkle.get_device_placement()``);
* an instance built in-process (on a worker as a component rank, inside a
  component's method, or in the driver without ``remote_group``) first
  reseeds ``random``, numpy and torch from ``TWINKLE_SEED`` with Twinkle's own
  ``seed_everything``, as every Ray actor and every nested Twinkle object
  does; on a worker it exports Twinkle's worker environment and makes handles
  among its arguments collect eagerly;
* while Twinkle code runs on a worker, ``LOCAL_RANK`` is 0, as in every Ray actor;
* ``remote_group`` and ``instance_id`` never reach ``__init__``; the instance
  (or handle) gets ``remote_group`` and ``_instance_id``.

A handle also carries ``_actors``: the Dask actor futures of its ranks (see
:func:`twinkle_dask.component_actors`), which is what Twinkle's
``CheckpointEngineManager`` checks for.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ..exceptions import ConfigurationError
from ..group import ComponentHandle, component_actors
from ..mesh import is_mesh
from ..specs import ClassSpec, class_spec
from ._classes import _twinkle, ray_actor_local_rank

__all__ = ["build_remote", "init_in_process"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def _caller() -> str:
    """``file_line`` of the first frame outside twinkle and the bridge, as Twinkle's instance ids use."""
    infra_file = _twinkle().infra.__file__
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename == infra_file
                                 or os.path.dirname(frame.f_code.co_filename) == _HERE):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return ""
    return f"{frame.f_code.co_filename.replace(os.sep, '_').replace('.', '_')}_{frame.f_lineno}"


def _mesh_rules(klass: type, spec: ClassSpec, args: tuple[Any, ...], kwargs: dict[str, Any],
                remote_group: str | None) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    infra = _twinkle().infra
    mesh = next((a for a in (*args, *kwargs.values()) if is_mesh(a)), None)
    if not spec.mesh_param:
        return args, kwargs, mesh
    if spec.execute == "first":
        mesh = _twinkle().device_mesh.from_sizes(dp_size=1)
        kwargs[spec.mesh_param] = mesh
    if klass.__name__ == "DataLoader" and "min_batch_size" not in kwargs and "batch_size" in kwargs:
        kwargs["min_batch_size"] = kwargs["batch_size"]
    if remote_group and mesh is None:
        if infra._device_mesh is None:
            raise ConfigurationError(
                f"{klass.__name__}(..., remote_group={remote_group!r}) takes a DeviceMesh "
                f"({spec.mesh_param}=) and none was given; pass {spec.mesh_param}=DeviceMesh.from_sizes(...) "
                f"or twinkle.initialize(..., global_device_mesh=...)"
            )
        mesh = infra._device_mesh
        kwargs[spec.mesh_param] = mesh
    return args, kwargs, mesh


def _record_mesh(klass: type, group: str, mesh: Any) -> None:
    for device_group in _twinkle().infra._device_group or ():
        if device_group.name == group and mesh is not None:
            device_group._device_mesh[klass.__name__] = mesh


def build_remote(klass: type, args: tuple[Any, ...], kwargs: dict[str, Any], session: Any) -> Any:
    """``klass(*args, **kwargs)`` with ``remote_group``, in the driver (or a component): a handle."""
    infra = _twinkle().infra
    infra.check_unsafe(*args, **kwargs)
    spec = class_spec(klass) or ClassSpec()
    kwargs = dict(kwargs)
    instance_id = str(kwargs.pop("instance_id", "")) + _caller()
    group = kwargs["remote_group"]
    args, kwargs, mesh = _mesh_rules(klass, spec, args, kwargs, group)
    handle = session.build(klass, args, kwargs)
    _record_mesh(klass, group, mesh if mesh is not None else handle.device_mesh)
    object.__setattr__(handle, "_actors", component_actors(handle))
    object.__setattr__(handle, "_instance_id", instance_id)
    return handle


def _worker_environment() -> None:
    # What twinkle-kit exports in a Ray actor before a component's __init__.
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "true"


def init_in_process(self: Any, cls: type, init_method: Any, spec: ClassSpec, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> None:
    """Run the undecorated ``__init__`` in this process, after Twinkle's seeding and mesh rules."""
    infra = _twinkle().infra
    infra.check_unsafe(*args, **kwargs)
    kwargs = dict(kwargs)
    instance_id = str(kwargs.pop("instance_id", "")) + _caller()
    group = kwargs.pop("remote_group", None)
    args, kwargs, _ = _mesh_rules(type(self), spec, args, kwargs, group)
    seed = int(os.environ.get("TWINKLE_SEED", infra._seed))
    determinism = int(os.environ.get("TWINKLE_FULL_DETERMINISM", int(infra._full_determinism)))
    infra.framework_util.seed_everything(seed, bool(determinism))
    on_worker = bool(os.environ.get("WORKER_NAME"))
    if on_worker:
        _worker_environment()
        ray_actor_local_rank()
    if not spec.mesh_param:
        args = tuple(a for a in args if not is_mesh(a))
        kwargs = {k: v for k, v in kwargs.items() if not is_mesh(v)}
    if on_worker:
        for value in (*args, *kwargs.values()):
            if isinstance(value, ComponentHandle) or hasattr(value, "_actors"):
                # A handle given to a component collects at once there (Twinkle's _prepare_lazy_collect).
                value._lazy_collect = False
    init_method(self, *args, **kwargs)
    self.remote_group = group
    self._instance_id = instance_id
