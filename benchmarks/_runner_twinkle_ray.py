"""Benchmark runner for the *real* Twinkle (twinkle-kit 0.5.1) on Ray.

This is the peer side of the side-by-side benchmark: the orchestrator starts
this script with the interpreter of the venv made by ``benchmarks/setup_peer.sh``
(``.venv-ray/bin/python benchmarks/_runner_twinkle_ray.py``) and drives it with
a line protocol.

``_harness.py`` holds the ops and the protocol; this file, Twinkle's side: the
components (the same code as in ``_runner_twinkle_dask.py``) and how Ray and
Twinkle start, wait for actors and stop.

Twinkle behaviour worth knowing when reading the numbers (twinkle-kit 0.5.1):

* A lazy result passed to another component is sent *whole* to every consumer
  rank, which fetches all producer shards, collects them and only then slices
  (driver: ``twinkle/infra/__init__.py:761-765`` dispatches 'all' when an
  argument is lazy; worker: lines 746-755 collect and re-dispatch). So in
  ``handoff`` each of B's ranks pulls all of A's tensors (4 x ``mib`` MiB) and
  keeps one; in ``train_step`` each trainer rank receives the whole batch.
* ``collect='flatten'`` rebuilds the result with ``type(result[0])(items)``
  (``twinkle/infra/__init__.py:338-343``): on a bare tensor that iterates
  element by element (about 12 s for 4 ranks x 4 MiB here), so the hand-off
  producer returns ``[tensor]`` and the collected value is ``[t0, t1, t2, t3]``.
* The CPU resource check needs ``ray.init(num_cpus=...)`` of at least
  4 x (all CPU ranks); see ``RayRunner.start``.
"""

import time

import _harness  # before anything that could print: it keeps stdout for the protocol

_t_import = time.perf_counter()
import ray  # noqa: E402
import torch  # noqa: E402
import twinkle  # noqa: E402
from twinkle import DeviceGroup, DeviceMesh, Platform, remote_class, remote_function  # noqa: E402

# twinkle's package is a lazy module: touching `initialize` imports twinkle.infra.
_ = twinkle.initialize
IMPORT_S = time.perf_counter() - _t_import

MIB = _harness.MIB


# =============================================================================
# Components. They live in this script (__main__), so Ray pickles them by value
# into the worker processes, as it does for Twinkle users' own scripts.
#
# Every __init__ takes **kwargs: Twinkle wraps __init__ with functools.wraps
# (twinkle/infra/__init__.py:519), so Ray checks the constructor call against
# the *original* signature (ray/_common/signature.py:101) and rejects the
# `remote_group=` keyword that Twinkle passes on to the actors and only pops
# inside the worker (twinkle/infra/__init__.py:641). Twinkle's own components
# take **kwargs for the same reason.
# =============================================================================


@remote_class()
class Bench:
    """A plain N-rank component for the call-overhead ops."""

    def __init__(self, **kwargs):
        # Twinkle sets RANK/WORLD_SIZE in each actor's runtime env.
        self.rank = Platform.get_rank()
        self._tensor = None

    @remote_function(dispatch="all", collect="none", lazy_collect=False)
    def noop(self):
        """call_all / scaling: no payload, nothing returned."""
        return None

    @remote_function(dispatch="slice", collect="flatten", lazy_collect=False)
    def echo(self, items):
        """slice_flatten: each rank returns its slice; flatten rebuilds the list."""
        return items

    @remote_function(dispatch="all", collect="none", lazy_collect=True)
    def small(self, i):
        """pipelined: a small int per rank, collected lazily."""
        return i

    @remote_function(dispatch="all", collect="flatten", lazy_collect=True)
    def make_tensor(self, mib):
        """handoff producer: `mib` MiB of float32 per rank, filled with rank + 1.

        Returned as a one-element *list*: Twinkle's 'flatten' concatenates the
        per-rank lists into [t0, t1, t2, t3]. A bare tensor would be iterated
        element by element (see the module docstring: ~12 s for 4 x 4 MiB).
        The tensor is allocated once and reused, so the op measures moving
        data, not filling memory; Ray still serializes it on every call.
        """
        numel = mib * MIB // 4
        if self._tensor is None or self._tensor.numel() != numel:
            self._tensor = torch.full((numel,), float(self.rank + 1), dtype=torch.float32)
        return [self._tensor]


@remote_class()
class Consumer:
    """handoff consumer; takes a DeviceMesh so that 'slice_dp' can be used."""

    def __init__(self, device_mesh: DeviceMesh, **kwargs):
        # Twinkle re-dispatches a lazy input *inside the worker* using the
        # instance's `device_mesh` attribute, so the instance must keep it.
        self.device_mesh = device_mesh

    @remote_function(dispatch="slice_dp", collect="none", lazy_collect=False)
    def checksum(self, shards):
        """Rank k receives [A's rank-k tensor]; returns its sum (exact, float64)."""
        return float(sum(t.sum(dtype=torch.float64).item() for t in shards))


@remote_class(execute="first")
class Dataset:
    """A single-actor data source yielding deterministic random batches."""

    def __init__(self, rows: int = 4 * 64, features: int = 256, num_classes: int = 10, seed: int = 0, **kwargs):
        # (Not `self.classes`: cloudpickle would then try to ship the `torch.classes`
        # pseudo-module with get_batch, because the name `classes` appears in its code.)
        self.rows, self.features, self.num_classes = rows, features, num_classes
        self.gen = torch.Generator().manual_seed(seed)

    @remote_function(execute="first", dispatch="all", collect="none", lazy_collect=True)
    def get_batch(self):
        x = torch.randn(self.rows, self.features, generator=self.gen)
        labels = torch.randint(0, self.num_classes, (self.rows,), generator=self.gen)
        return {"x": x, "labels": labels}


@remote_class()
class Trainer:
    """A small data-parallel MLP: each rank trains on its dp slice of the batch.

    No gradient all-reduce: the op measures the single-controller plumbing
    (lazy batch -> slice_dp -> mean-collected loss), not collectives.
    """

    def __init__(self, device_mesh: DeviceMesh, lr: float = 0.1, seed: int = 0, **kwargs):
        self.device_mesh = device_mesh  # needed for the worker-side slice_dp
        torch.manual_seed(seed)  # identical initial weights on every rank
        self.model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr)

    @remote_function(dispatch="slice_dp", collect="mean", lazy_collect=True)
    def forward_backward(self, batch):
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(batch["x"])
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        loss.backward()
        return float(loss.item())

    @remote_function(dispatch="all", collect="none", lazy_collect=False)
    def step(self):
        self.opt.step()


class RayRunner(_harness.Runner):
    def start(self, groups):
        """ray.init + twinkle.initialize with the given CPU groups.

        Twinkle's CPU resource check (twinkle/infra/_ray/resource_manager.py,
        lines 65-86 and 103-108) wants all CPU ranks on one node and
        node_CPUs // 4 >= ncpu_proc_per_node, so we declare
        ncpu_proc_per_node = total ranks and give Ray at least 4 logical CPUs
        per rank (16 for one 4-rank group). The actors themselves ask for 0.01
        CPU each; these are logical CPUs, not cores.
        """
        total = sum(groups.values())
        self.num_cpus = max(16, 4 * total)
        # address='local': always start a private Ray instance, never attach to
        # a cluster another process may have left running.
        ray.init(num_cpus=self.num_cpus, address="local")
        twinkle.initialize(
            "ray",
            nproc_per_node=1,
            ncpu_proc_per_node=total,
            seed=42,
            groups=[DeviceGroup(name=n, ranks=r, device_type="cpu") for n, r in groups.items()],
        )

    def wait_ready(self, comp):
        """Block until every actor of a component has been created (Ray starts them asynchronously)."""
        ray.get([actor.__ray_ready__.remote() for actor in comp._actors])

    def close(self):
        if ray.is_initialized():
            ray.shutdown()


if __name__ == "__main__":
    classes = {"bench": Bench, "dataset": Dataset, "consumer": Consumer, "trainer": Trainer}
    _harness.serve(RayRunner(classes, DeviceMesh, IMPORT_S))
