"""Run Twinkle's 'GPU' device groups on CPU processes, for tests only.

Twinkle has no CPU platform: a ``DeviceGroup(device_type='GPU')`` resolves to ``twinkle.utils.platforms.GPU``,
which places tensors on ``cuda:<local rank>``, initialises ``torch.distributed`` with NCCL, builds meshes on
'cuda' and syncs weights with ``NCCLCheckpointEngine``. :func:`apply` patches that class so the same scripts run
on a machine without a GPU:

* ``GPU.get_local_device`` returns ``'cpu'``, ``GPU.device_prefix`` returns ``'cpu'`` (meshes, RNG state) and
  ``GPU.device_backend`` returns ``'gloo'`` (``TransformersModel._try_init_process_group`` then calls
  ``init_process_group('gloo', init_method='env://')`` with Twinkle's RANK / WORLD_SIZE / MASTER_ADDR / PORT);
  ``GPU.get_device_rng_state`` returns ``None``. The visible-device variable stays ``CUDA_VISIBLE_DEVICES``.
* ``twinkle.checkpoint_engine.NCCLCheckpointEngine`` becomes :class:`GlooCheckpointEngine`: both users
  (``CheckpointEngineManager.decide_backend_engine`` and ``CheckpointEngineMixin._get_or_create_checkpoint_engine``)
  import that name from the package at call time.
* ``ray.init`` (when Ray is importable) gets ``num_gpus`` logical GPUs on a local start, so that Twinkle's
  ``ResourceManager`` can reserve 'GPU' bundles, and ``runtime_env={'worker_process_setup_hook':
  'cpu_platform.apply'}``, so every Ray worker process applies this patch before it runs any Twinkle code.

:func:`apply` is idempotent, imports nothing from the test suite, and also exports ``TWINKLE_TEST_CPU_PLATFORM=1``
and puts this folder on ``PYTHONPATH``: Twinkle copies the driver's environment into every Ray actor, and a
Dask worker preloads this module (``dask_setup`` calls :func:`apply`). Never import this outside tests.
"""

from __future__ import annotations

import asyncio
import functools
import os
import pickle
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from twinkle.checkpoint_engine.base import CheckpointEngine

#: Set to '1' by :func:`apply`; inherited by Ray actors through Twinkle's copy of ``os.environ``.
ENV_FLAG = 'TWINKLE_TEST_CPU_PLATFORM'
#: How many logical GPUs a local ``ray.init`` declares (``ResourceManager`` needs ``nproc_per_node`` of them).
ENV_NUM_GPUS = 'TWINKLE_TEST_CPU_NUM_GPUS'
SETUP_HOOK = 'cpu_platform.apply'
HERE = os.path.dirname(os.path.abspath(__file__))

_applied = False


def dask_setup(worker: Any) -> None:
    """Dask preload hook: ``DASK_DISTRIBUTED__WORKER__PRELOAD='["cpu_platform"]'`` patches every Dask worker."""
    apply()


def apply() -> None:
    """Patch Twinkle (and Ray's ``init``) in this process; safe to call any number of times."""
    global _applied
    if _applied:
        return
    os.environ[ENV_FLAG] = '1'
    paths = [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]
    if HERE not in paths:
        os.environ['PYTHONPATH'] = os.pathsep.join([HERE, *paths])
    _patch_platform()
    _patch_checkpoint_engine()
    _patch_ray_init()
    _applied = True


def _patch_platform() -> None:
    from twinkle.utils.platforms import GPU

    GPU.get_local_device = staticmethod(lambda idx=0, **kwargs: 'cpu')
    GPU.device_prefix = staticmethod(lambda: 'cpu')
    GPU.device_backend = staticmethod(lambda platform=None: 'gloo')
    GPU.get_device_rng_state = staticmethod(lambda: None)
    GPU.set_device_rng_state = staticmethod(lambda state: None)


def _patch_checkpoint_engine() -> None:
    import twinkle.checkpoint_engine as package

    package.NCCLCheckpointEngine = GlooCheckpointEngine


def _patch_ray_init() -> None:
    try:
        import ray
    except ImportError:
        return
    if getattr(ray.init, '_twinkle_cpu_platform', False):
        return
    original = ray.init

    @functools.wraps(original)
    def init(*args: Any, **kwargs: Any) -> Any:
        local = not args and kwargs.get('address') in (None, 'local') and not os.environ.get('RAY_ADDRESS')
        if local and kwargs.get('num_gpus') is None:
            kwargs['num_gpus'] = int(os.environ.get(ENV_NUM_GPUS, '8'))
        runtime_env = dict(kwargs.get('runtime_env') or {})
        runtime_env.setdefault('worker_process_setup_hook', SETUP_HOOK)
        kwargs['runtime_env'] = runtime_env
        return original(*args, **kwargs)

    init._twinkle_cpu_platform = True  # type: ignore[attr-defined]
    ray.init = init


@dataclass
class GlooMasterMetadata:
    """Rendezvous address of the weight-sync group, published by trainer rank 0."""

    store_host: str
    store_port: int


def _broadcast(pg: Any, tensor: Any) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    pg.broadcast([tensor], opts).wait()


class GlooCheckpointEngine(CheckpointEngine):
    """Weight sync from trainer rank 0 to the sampler ranks over a private gloo group (CPU tensors).

    Same contract as ``twinkle.checkpoint_engine.NCCLCheckpointEngine``: the manager sets ``is_master`` and calls
    ``prepare``, ``build_topology``, ``init_process_group``, ``send_weights`` / ``receive_weights`` (async) and
    ``finalize``. Rank 0 packs every tensor of one sync into a single byte buffer and broadcasts three messages:
    a header (metadata length, buffer length), the pickled metadata (name, shape, dtype, offset per tensor) and
    the buffer. The group is a raw ``ProcessGroupGloo`` on its own ``TCPStore`` (not registered with
    ``torch.distributed``), kept for later syncs unless ``rebuild_group`` is true.
    """

    def __init__(self, bucket_size: int = 0, rebuild_group: bool = False, **kwargs: Any) -> None:
        self.bucket_size = bucket_size
        self.rebuild_group = rebuild_group
        self.is_master = False
        self.rank: int | None = None
        self.world_size: int | None = None
        self._metadata: GlooMasterMetadata | None = None
        self._store: Any = None
        self._pg: Any = None

    def prepare(self) -> GlooMasterMetadata | None:
        if not self.is_master:
            return None
        if self._metadata is None:
            from twinkle.utils import find_free_port, find_node_ip

            self._metadata = GlooMasterMetadata(store_host=find_node_ip(), store_port=find_free_port())
        return self._metadata

    @classmethod
    def build_topology(cls, trainer_world_size: int, rollout_world_size: int,
                       metadata: list[Any]) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        master_metadata = metadata[0]
        world_size = rollout_world_size + 1
        trainer_kwargs = {
            'rank': [0] + [-1] * (trainer_world_size - 1),
            'world_size': [world_size] * trainer_world_size,
            'master_metadata': [master_metadata] * trainer_world_size,
        }
        rollout_kwargs = {
            'rank': list(range(1, rollout_world_size + 1)),
            'world_size': [world_size] * rollout_world_size,
            'master_metadata': [master_metadata] * rollout_world_size,
        }
        return trainer_kwargs, rollout_kwargs

    def init_process_group(self, rank: int, world_size: int, master_metadata: GlooMasterMetadata) -> None:
        import torch
        import torch.distributed as dist

        if rank < 0:
            self.rank, self.world_size = rank, world_size
            return
        if self._pg is not None and not self.rebuild_group:
            return
        self.rank, self.world_size = rank, world_size
        self._store = dist.TCPStore(
            host_name=master_metadata.store_host,
            port=master_metadata.store_port,
            world_size=world_size,
            is_master=rank == 0,
            wait_for_workers=True,
            timeout=timedelta(seconds=300),
        )
        self._pg = dist.ProcessGroupGloo(self._store, rank, world_size, timedelta(seconds=300))
        _broadcast(self._pg, torch.zeros(1, dtype=torch.int32))

    def finalize(self) -> None:
        if self.rebuild_group:
            self._pg = None
            self._store = None
            self._metadata = None
            self.rank = None
            self.world_size = None

    async def send_weights(self, weights: Generator[tuple[str, Any], None, None]) -> None:
        import torch

        assert self.rank is not None and self.rank <= 0, f'only trainer ranks send weights, this is rank {self.rank}'
        if self.rank < 0:
            for _ in weights:
                pass
            return
        meta, chunks, offset = [], [], 0
        with torch.no_grad():
            for name, tensor in weights:
                data = tensor.detach().to('cpu').contiguous()
                meta.append((name, tuple(data.shape), str(data.dtype).removeprefix('torch.'), offset))
                chunks.append(data.reshape(-1).view(torch.uint8).clone())
                offset += data.nbytes
        buffer = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8)
        meta_bytes = torch.frombuffer(bytearray(pickle.dumps(meta)), dtype=torch.uint8)
        await asyncio.to_thread(self._broadcast_all, meta_bytes, buffer)

    def _broadcast_all(self, meta_bytes: Any, buffer: Any) -> None:
        import torch

        _broadcast(self._pg, torch.tensor([meta_bytes.numel(), buffer.numel()], dtype=torch.int64))
        _broadcast(self._pg, meta_bytes)
        _broadcast(self._pg, buffer)

    def _receive_all(self) -> tuple[list[tuple[str, tuple[int, ...], str, int]], Any]:
        import torch

        header = torch.zeros(2, dtype=torch.int64)
        _broadcast(self._pg, header)
        meta_bytes = torch.zeros(int(header[0]), dtype=torch.uint8)
        _broadcast(self._pg, meta_bytes)
        buffer = torch.zeros(int(header[1]), dtype=torch.uint8)
        _broadcast(self._pg, buffer)
        return pickle.loads(meta_bytes.numpy().tobytes()), buffer

    async def receive_weights(self) -> AsyncGenerator[tuple[str, Any], None]:
        import torch

        assert self.rank is not None and self.rank > 0, f'only sampler ranks receive weights, this is rank {self.rank}'
        meta, buffer = await asyncio.to_thread(self._receive_all)
        for name, shape, dtype_name, offset in meta:
            dtype = getattr(torch, dtype_name)
            size = dtype.itemsize * int(torch.Size(shape).numel())
            # A copy: a slice at an offset that is no multiple of the item size cannot be viewed as ``dtype``.
            yield name, buffer[offset:offset + size].clone().view(dtype).view(shape)
