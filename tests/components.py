"""Components used by the cluster tests (importable by the workers through PYTHONPATH)."""

from __future__ import annotations

import os
import random
import threading
import time

import numpy as np

import twinkle_dask as twinkle
from twinkle_dask import DeviceMesh, remote_class, remote_function

IDENTITY_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "CLUSTER_NAME", "WORKER_NAME")


@remote_class()
class Echo:
    """Reports what each rank received and who it is."""

    def __init__(self, tag: str = "echo", device_mesh: DeviceMesh = None, **extra):
        self.tag = tag
        self.mesh = device_mesh
        self.extra = extra
        self.log = []
        self.init_identity = self._identity()
        self.init_random = (random.random(), float(np.random.rand()))

    def _identity(self):
        return {
            "rank": twinkle.get_rank(),
            "world": twinkle.get_world_size(),
            "env": {k: os.environ.get(k) for k in IDENTITY_VARS},
            "pid": os.getpid(),
            "thread": threading.current_thread().name,
        }

    @remote_function(dispatch="all")
    def identity(self):
        return dict(self._identity(), init=self.init_identity, remote_group=getattr(self, "remote_group", None),
                    tag=self.tag, extra=self.extra, has_mesh=self.mesh is not None, init_random=self.init_random)

    @remote_function(dispatch="slice")
    def recv(self, *args, **kwargs):
        return {"args": list(args), "kwargs": kwargs}

    @remote_function(dispatch="slice_dp")
    def describe(self, x):
        """A small summary of a (large) input, so the test reads no bulk data back."""
        return {"type": type(x).__name__, "len": len(x), "values": sorted(set(np.asarray(x).tolist()))}

    @remote_function(dispatch="all", collect="flatten")
    def record(self, item, delay: float = 0.0):
        if delay:
            time.sleep(delay)
        self.log.append(item)
        return [item]

    @remote_function(dispatch="all")
    def get_log(self):
        return list(self.log)

    @remote_function(dispatch="all")
    def produce(self, kind: str, size: int = 4):
        return make_data(kind, twinkle.get_rank(), size)

    @remote_function(dispatch="all")
    def fail_on(self, rank: int, exc_type: str = "KeyError"):
        if twinkle.get_rank() == rank:
            raise {"KeyError": KeyError, "ValueError": ValueError, "Custom": CustomError}[exc_type](
                f"rank {rank} says no")
        return twinkle.get_rank()

    @remote_function(dispatch="all", collect="first")
    def sleep(self, seconds: float):
        time.sleep(seconds)
        return seconds

    @remote_function(dispatch="all", collect="sum", lazy_collect=False)
    def count(self):
        return 1

    @remote_function(dispatch="all", collect="first")
    def big(self, n_bytes: int):
        return np.full(n_bytes // 8, float(twinkle.get_rank()))

    def local_only(self):
        return "never remote"


class CustomError(Exception):
    pass


def make_data(kind: str, rank: int, size: int = 4):
    import torch

    if kind == "list":
        return [rank * 100 + j for j in range(size + rank % 2)]
    if kind == "tensor":
        return torch.arange(size * 2, dtype=torch.float32).reshape(size, 2) + 100 * rank
    if kind == "ndarray":
        return np.arange(size, dtype=np.int64) + 100 * rank
    if kind == "dict":
        return {"ids": torch.arange(size) + 100 * rank, "labels": [f"r{rank}-{j}" for j in range(size)]}
    if kind == "tuple":
        return (float(rank), [rank] * 2)
    if kind == "scalar":
        return float(rank)
    raise ValueError(kind)


@remote_class(execute="first")
class Loader:
    """A first-rank dataset with driver-side iteration."""

    def __init__(self, n_batches: int = 3, batch: int = 4, device_mesh: DeviceMesh = None):
        self.n_batches = n_batches
        self.batch = batch
        self.mesh = device_mesh

    @remote_function()
    def __len__(self):
        return self.n_batches

    @remote_function(collect="first")
    def __iter__(self):
        for i in range(self.n_batches):
            yield list(range(i * self.batch, (i + 1) * self.batch))

    @remote_function(dispatch="all", collect="first")
    def mesh_info(self):
        return (self.mesh.world_size, self.mesh.data_world_size, twinkle.get_world_size())


@remote_class()
class Stepper:
    """An all-rank iterator whose ranks run out at different times."""

    def __init__(self, lengths):
        self.lengths = lengths
        self.i = 0

    @remote_function(collect="none", lazy_collect=False)
    def __iter__(self):
        self.i = 0
        return self

    def __next__(self):
        if self.i >= self.lengths[twinkle.get_rank()]:
            raise StopIteration
        self.i += 1
        return self.i


@remote_class()
class Broken:
    def __init__(self, fail_rank: int = 1):
        if twinkle.get_rank() == fail_rank:
            raise ValueError(f"cannot build rank {fail_rank}")

    @remote_function()
    def ping(self):
        return "pong"


@remote_class()
class Gloo:
    """Joins torch.distributed with the rank's env:// identity."""

    def __init__(self, default_group: bool = True):
        import torch.distributed as dist

        self.default_group = default_group
        if default_group:
            dist.init_process_group("gloo", init_method="env://")
            self.pg = None
        else:
            # A second process group in the same worker processes, over this component's own port.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                  int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]) == 0)
            self.pg = dist.ProcessGroupGloo(store, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))

    @remote_function(dispatch="all", sync=True)
    def all_reduce(self, base: float):
        import torch
        import torch.distributed as dist

        t = torch.tensor([base + twinkle.get_rank()])
        if self.pg is None:
            dist.all_reduce(t)
        else:
            self.pg.allreduce([t]).wait()
        return float(t.item())


@remote_class()
class Loading:
    """Runs a torch DataLoader with worker processes inside a component."""

    @remote_function(dispatch="all", collect="first")
    def load(self, n: int, num_workers: int):
        import torch
        from torch.utils.data import DataLoader

        loader = DataLoader(list(range(n)), batch_size=2, num_workers=num_workers)
        return torch.cat(list(loader)).tolist()


@remote_class()
class OnGPU:
    """Reports its CUDA view and moves tensors on its device."""

    def __init__(self, nccl: bool = False):
        import torch

        self.device = torch.device("cuda:0")
        self.nccl = nccl
        if nccl:
            import torch.distributed as dist

            dist.init_process_group("nccl", init_method="env://")

    @remote_function(dispatch="all")
    def cuda_view(self):
        import torch

        return {"available": torch.cuda.is_available(), "count": torch.cuda.device_count(),
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "local_rank": os.environ.get("LOCAL_RANK")}

    @remote_function(dispatch="all", collect="first")
    def make(self, n: int):
        import torch

        return torch.arange(n, dtype=torch.float32, device=self.device)

    @remote_function(dispatch="all", collect="first")
    def where(self, t):
        return {"device": str(t.device), "sum": float(t.sum())}

    @remote_function(dispatch="all", collect="first")
    def is_arange(self, t):
        """Whether ``t`` equals ``make(len(t))``, made here."""
        import torch

        return {"device": str(t.device), "dtype": str(t.dtype), "numel": t.numel(),
                "equal": bool(torch.equal(t, torch.arange(t.numel(), dtype=t.dtype, device=t.device)))}

    @remote_function(dispatch="all", collect="first")
    def all_reduce(self, value: float):
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t)
        return float(t.item())


@remote_class(max_restarts=2)
class Resilient(Echo):
    """An Echo that is rebuilt automatically after its worker dies."""


@remote_class()
class Talker:
    """Prints and reports metrics from its ranks."""

    @remote_function(dispatch="all")
    def speak(self, step: int):
        print(f"step {step} from rank {twinkle.get_rank()}")
        print("no newline at the end", end="")
        import sys

        print("to stderr", file=sys.stderr)
        twinkle.report(step=step, loss=1.0 / (step + 1))
        return step


@remote_class()
class Reducer:
    """A torch.distributed user guarded as Twinkle's models are: joins the default group once."""

    def __init__(self):
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method="env://")

    @remote_function(dispatch="all", collect="first")
    def all_reduce(self, value: float, pause: float = 0.0):
        import torch
        import torch.distributed as dist

        t = torch.tensor([value])
        if pause and twinkle.get_rank() == 0:
            time.sleep(pause)  # rank 0 arrives late: the other ranks wait inside the collective
        dist.all_reduce(t)
        return float(t.item())


@remote_class()
class EnvWatcher:
    """Reads its identity at the start and at the end of a call that takes a while."""

    @remote_function(dispatch="all")
    def watch(self, seconds: float):
        before = {k: os.environ.get(k) for k in IDENTITY_VARS}
        time.sleep(seconds)
        after = {k: os.environ.get(k) for k in IDENTITY_VARS}
        return {"before": before, "after": after, "rank": twinkle.get_rank()}


WORKER_VARS = ("CUDA_VISIBLE_DEVICES", "TWINKLE_GPU", "TWINKLE_GROUP", "TWINKLE_GROUP_INDEX", "RANK")


@remote_class()
class WorkerEnv:
    """Reads its worker's environment in ``__init__`` and at both ends of a call that takes a while."""

    def __init__(self):
        self.at_init = {k: os.environ.get(k) for k in WORKER_VARS}

    @remote_function(dispatch="all")
    def read(self, seconds: float):
        before = {k: os.environ.get(k) for k in WORKER_VARS}
        time.sleep(seconds)
        after = {k: os.environ.get(k) for k in WORKER_VARS}
        return {"init": self.at_init, "before": before, "after": after}


@remote_class()
class Drawer:
    """Draws from every random stream of its process (random, numpy, torch)."""

    @remote_function(dispatch="all")
    def draw(self, n: int = 3):
        import torch

        return {"random": [random.random() for _ in range(n)], "numpy": np.random.rand(n).tolist(),
                "torch": torch.rand(n).tolist()}


@remote_class()
class Caller:
    """Calls another component from inside its own methods."""

    @remote_function(dispatch="all", collect="first")
    def relay(self, other, value):
        return {"got": other.recv.options(dispatch="all", collect="first")(value), "pid": os.getpid()}


@remote_class()
class Holder:
    """Takes large arguments and reports its worker's memory."""

    @remote_function(dispatch="all", collect="first")
    def take(self, array):
        return int(array.nbytes)

    @remote_function(dispatch="all", collect="first")
    def rss(self):
        import psutil

        return psutil.Process().memory_info().rss


@remote_class(execute="first")
class FirstWatcher(EnvWatcher):
    """An EnvWatcher built on the group's first rank only (a DataLoader's place)."""


@remote_class()
class Rendezvous:
    """Joins torch.distributed in ``__init__`` (gloo, env://); rank ``die_rank`` dies before joining."""

    def __init__(self, die_rank: int | None = None):
        import datetime

        import torch.distributed as dist

        if twinkle.get_rank() == die_rank:
            os._exit(1)  # the worker process dies while the other ranks wait in the rendezvous
        dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(minutes=30))

    @remote_function(dispatch="all")
    def all_reduce(self, value: float):
        import torch
        import torch.distributed as dist

        t = torch.tensor([value])
        dist.all_reduce(t)
        return float(t.item())


@remote_class()
class SlowInit:
    """An ``__init__`` that takes ``delay`` seconds."""

    def __init__(self, delay: float):
        time.sleep(delay)

    @remote_function(dispatch="all")
    def pid(self):
        return os.getpid()


@remote_class()
class Relay:
    """Calls a method of another component (handed in as a handle) from its own worker."""

    @remote_function(dispatch="all", collect="first")
    def call(self, other, method: str, *args):
        return getattr(other, method)(*args)


@remote_class()
class Builder:
    """Builds components from inside its own methods."""

    @remote_function(dispatch="all", collect="first")
    def build_and_call(self, group: str):
        echo = Echo(tag="inner", remote_group=group)
        local = not hasattr(echo, "_twinkle_ref")  # built in this process (its own group)
        return {"local": local, "count": echo.count() if not local else None,
                "tag": echo.identity()[0]["tag"] if not local else echo.tag}


@remote_class()
class Hog:
    """Holds a large allocation for a while (a runaway component)."""

    @remote_function(dispatch="all", collect="first")
    def hold(self, n_bytes: int, seconds: float):
        block = np.ones(n_bytes, dtype=np.uint8)  # touched: resident, not just reserved
        time.sleep(seconds)
        return int(block.sum())
