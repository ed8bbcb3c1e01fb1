"""Benchmark runner for the *real* Twinkle (twinkle-kit 0.5.1) on Ray.

This is the peer side of the side-by-side benchmark: the orchestrator starts
this script with the interpreter of the venv made by ``benchmarks/setup_peer.sh``
(``.venv-ray/bin/python benchmarks/_runner_twinkle_ray.py``) and drives it with
a line protocol:

* stdin:  one JSON object per line, ``{"op": <name>, ...params}``.
* stdout: exactly one JSON line per request, either
  ``{"ok": true, "times": [seconds, ...], ...extra}`` or
  ``{"ok": false, "error": "..."}``.

Nothing else ever reaches stdout: at startup the real stdout is kept as a
private handle for replies, and file descriptor 1 (and ``sys.stdout``) are
pointed at stderr, so Ray's logs, worker output forwarded to the driver and the
output of every child process go to stderr.

Ops (see ``OPS`` at the bottom; every timed op accepts ``"warmup"``, the number
of untimed iterations run first, default 1):

=============  =============================================  ==================================
op             params                                         reply fields besides ok/times
=============  =============================================  ==================================
startup        ranks (4)                                      init_s, component_s, import_s
setup          groups {"a": 4, "b": 4, ...}                   init_s, build_s, num_cpus, groups,
                                                              components
call_all       iters                                          -
slice_flatten  iters                                          -
pipelined      calls (1000)                                   calls
handoff        iters, mib (4)                                 rss_growth_mib, mib, checksums
train_step     iters                                          loss_first, loss_last
scaling        ranks [1, 2, 4, 8], iters                      by_ranks {"1": [...], ...}, build_s
shutdown       -                                              -
=============  =============================================  ==================================

``startup`` is only valid as the first request of a process (the orchestrator
starts one runner per startup sample). ``setup`` initializes Twinkle once with
the given CPU groups and builds the components of the other ops: on group
``a`` a 4-rank ``Bench`` (call_all, slice_flatten, pipelined, hand-off
producer) and a ``Dataset`` (``execute='first'``, i.e. one actor on a's first
slot); on group ``b`` a ``Consumer`` (hand-off) and a ``Trainer`` (train_step),
both with ``DeviceMesh.from_sizes(dp_size=<ranks of b>)``; on every group named
``s<k>`` a ``Bench`` for ``scaling``. ``scaling`` can also run in a fresh
process without ``setup``: it then initializes with groups ``s<k>`` itself.
Twinkle can be initialized once per process, so every group an op needs must
be in that one ``initialize``.

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
  4 x (all CPU ranks); see ``Runner.initialize``.
"""

import os
import sys

# --- protocol plumbing: must run before anything can print -------------------
# Keep a private, line-buffered handle on the real stdout for protocol replies
# (os.dup returns a non-inheritable fd, so Ray's child processes never hold the
# orchestrator's pipe open), then point fd 1 and sys.stdout at stderr.
_REPLY = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
os.dup2(2, 1)
sys.stdout = sys.stderr

import gc  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

_t_import = time.perf_counter()
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
import twinkle  # noqa: E402
from twinkle import DeviceGroup, DeviceMesh, Platform, remote_class, remote_function  # noqa: E402

# twinkle's package is a lazy module: touching `initialize` imports twinkle.infra.
_ = twinkle.initialize
IMPORT_S = time.perf_counter() - _t_import

MIB = 1 << 20


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


# =============================================================================
# Runner state and ops
# =============================================================================


class OpError(Exception):
    """A request that cannot be served (bad params, wrong order)."""


def _as_list(collected):
    """collect='none' unwraps a one-rank result (twinkle/infra/__init__.py:332-337)."""
    return collected if isinstance(collected, list) else [collected]


class Runner:
    def __init__(self):
        self.requests = 0  # requests received so far, this one included
        self.groups = None  # {name: ranks} once Twinkle is initialized
        self.num_cpus = None
        self.components = {}  # name -> driver-side Twinkle handle

    # ---- initialization -----------------------------------------------------

    def initialize(self, groups):
        """ray.init + twinkle.initialize with the given CPU groups; returns seconds.

        Twinkle's CPU resource check (twinkle/infra/_ray/resource_manager.py,
        lines 65-86 and 103-108) wants all CPU ranks on one node and
        node_CPUs // 4 >= ncpu_proc_per_node, so we declare
        ncpu_proc_per_node = total ranks and give Ray at least 4 logical CPUs
        per rank (16 for one 4-rank group). The actors themselves ask for 0.01
        CPU each; these are logical CPUs, not cores.
        """
        if self.groups is not None:
            raise OpError(f"Twinkle is already initialized with groups {self.groups}")
        total = sum(groups.values())
        self.num_cpus = max(16, 4 * total)
        t0 = time.perf_counter()
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
        self.groups = dict(groups)
        return time.perf_counter() - t0

    def need_group(self, name, ranks=None):
        if self.groups is None:
            raise OpError("not initialized: send 'setup' first")
        if name not in self.groups:
            raise OpError(f"group {name!r} missing from setup groups {self.groups}")
        if ranks is not None and self.groups[name] != ranks:
            raise OpError(f"group {name!r} has {self.groups[name]} ranks, this op needs {ranks}")
        return self.groups[name]

    # ---- components ---------------------------------------------------------

    def build(self, key):
        """Construct a component (asynchronous in Twinkle: Ray starts the actors)."""
        if key in self.components:
            return self.components[key]
        kind, group = key.split("@")
        ranks = self.need_group(group)
        # An explicit instance_id: Twinkle otherwise names actors after the
        # calling file:line, which would collide for two builds from one line.
        opts = dict(remote_group=group, instance_id=key)
        if kind == "bench":
            comp = Bench(**opts)
        elif kind == "dataset":
            comp = Dataset(**opts)
        elif kind == "consumer":
            comp = Consumer(device_mesh=DeviceMesh.from_sizes(dp_size=ranks), **opts)
        elif kind == "trainer":
            comp = Trainer(device_mesh=DeviceMesh.from_sizes(dp_size=ranks), **opts)
        else:
            raise OpError(f"unknown component {key!r}")
        self.components[key] = comp
        return comp

    @staticmethod
    def wait_ready(comp):
        """Block until every actor of a component has been created."""
        ray.get([actor.__ray_ready__.remote() for actor in comp._actors])

    def get(self, key):
        """A built component; builds (and waits for) it if setup did not."""
        if key not in self.components:
            self.wait_ready(self.build(key))
        return self.components[key]

    # ---- ops ----------------------------------------------------------------

    def op_startup(self, ranks=4):
        if self.requests != 1:
            raise OpError("'startup' is only valid as the first request of a runner process")
        ranks = int(ranks)
        init_s = self.initialize({"startup": ranks})
        t0 = time.perf_counter()
        comp = Bench(remote_group="startup", instance_id="bench@startup")
        comp.noop()  # first (blocking) call: waits for all actors to start
        component_s = time.perf_counter() - t0
        self.components["bench@startup"] = comp
        return {"times": [init_s + component_s], "init_s": init_s, "component_s": component_s, "import_s": IMPORT_S}

    def op_setup(self, groups):
        if not isinstance(groups, dict) or not groups:
            raise OpError("'groups' must be a non-empty object {name: ranks}")
        groups = {str(k): int(v) for k, v in groups.items()}
        t0 = time.perf_counter()
        init_s = self.initialize(groups) if self.groups is None else 0.0
        if self.groups != groups:
            raise OpError(f"already initialized with different groups {self.groups}")
        keys = []
        if "a" in groups:
            keys += ["bench@a", "dataset@a"]
        if "b" in groups:
            keys += ["consumer@b", "trainer@b"]
        keys += [f"bench@{g}" for g in groups if g[:1] == "s" and g[1:].isdigit()]
        t1 = time.perf_counter()
        comps = [self.build(k) for k in keys]  # actor creation overlaps ...
        for comp in comps:  # ... and we wait for all of them here
            self.wait_ready(comp)
        build_s = time.perf_counter() - t1
        return {
            "times": [time.perf_counter() - t0],
            "init_s": init_s,
            "build_s": build_s,
            "num_cpus": self.num_cpus,
            "groups": self.groups,
            "components": keys,
        }

    def op_call_all(self, iters, warmup=1):
        bench = self.get("bench@a")
        times = []
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            bench.noop()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return {"times": times}

    def op_slice_flatten(self, iters, warmup=1):
        bench = self.get("bench@a")
        items = list(range(16))
        times = []
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            out = bench.echo(items)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            if i == 0 and out != items:
                raise OpError(f"slice/flatten returned {out!r}, expected {items!r}")
        return {"times": times}

    def op_pipelined(self, calls=1000, warmup=1):
        bench = self.get("bench@a")
        n = self.need_group("a")
        for i in range(warmup):
            bench.small(i)()
        t0 = time.perf_counter()
        lazies = [bench.small(i) for i in range(calls)]  # issue everything first
        results = [lz() for lz in lazies]  # then collect (r() collects)
        total = time.perf_counter() - t0
        if _as_list(results[-1]) != [calls - 1] * n:
            raise OpError(f"pipelined: last result {results[-1]!r}, expected {[calls - 1] * n!r}")
        return {"times": [total], "calls": calls}

    def op_handoff(self, iters, mib=4, warmup=1):
        ranks = self.need_group("a")
        self.need_group("b", ranks)  # rank k of B consumes rank k of A
        producer, consumer = self.get("bench@a"), self.get("consumer@b")
        mib = int(mib)
        numel = mib * MIB // 4
        expected = [float(numel * (k + 1)) for k in range(ranks)]
        proc = psutil.Process()

        def one():
            shards = producer.make_tensor(mib)  # lazy: stays in Ray's object store
            # Worker to worker, never through the driver; but every B rank pulls
            # all of A's shards and keeps its own (see the module docstring).
            return _as_list(consumer.checksum(shards))

        for _ in range(warmup):
            one()
        gc.collect()
        rss0 = proc.memory_info().rss
        times, sums = [], None
        for i in range(iters):
            t0 = time.perf_counter()
            got = one()
            times.append(time.perf_counter() - t0)
            if i == 0:
                sums = got
                if got != expected:
                    raise OpError(f"handoff checksums {got!r}, expected {expected!r}")
        gc.collect()
        rss_growth = (proc.memory_info().rss - rss0) / MIB
        return {"times": times, "rss_growth_mib": rss_growth, "mib": mib, "checksums": sums}

    def op_train_step(self, iters, warmup=1):
        dataset, trainer = self.get("dataset@a"), self.get("trainer@b")
        times, losses = [], []
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            batch = dataset.get_batch()  # lazy: the batch never visits the driver
            loss = trainer.forward_backward(batch)  # lazy
            trainer.step()  # blocking; runs after forward_backward on every rank
            loss = float(loss())  # collect: mean over the dp ranks
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                losses.append(loss)
        if not all(np.isfinite(losses)):
            raise OpError(f"non-finite loss: {losses}")
        return {
            "times": times,
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
        }

    def op_scaling(self, ranks=(1, 2, 4, 8), iters=100, warmup=1):
        ranks = [int(k) for k in ranks]
        if self.groups is None:
            self.initialize({f"s{k}": k for k in ranks})
        for k in ranks:
            self.need_group(f"s{k}", k)
        # Build every size first and only then measure, so that no measurement
        # competes with other actors still starting.
        t0 = time.perf_counter()
        benches = {k: self.build(f"bench@s{k}") for k in ranks}
        for comp in benches.values():
            self.wait_ready(comp)
        build_s = time.perf_counter() - t0
        by_ranks = {}
        for k, bench in benches.items():
            times = []
            for i in range(warmup + iters):
                t1 = time.perf_counter()
                bench.noop()
                if i >= warmup:
                    times.append(time.perf_counter() - t1)
            by_ranks[str(k)] = times
        return {"times": [], "by_ranks": by_ranks, "build_s": build_s}

    def op_shutdown(self):
        return {"times": []}

    def close(self):
        if ray.is_initialized():
            ray.shutdown()


OPS = {
    "startup": Runner.op_startup,
    "setup": Runner.op_setup,
    "call_all": Runner.op_call_all,
    "slice_flatten": Runner.op_slice_flatten,
    "pipelined": Runner.op_pipelined,
    "handoff": Runner.op_handoff,
    "train_step": Runner.op_train_step,
    "scaling": Runner.op_scaling,
    "shutdown": Runner.op_shutdown,
}


def reply(obj):
    _REPLY.write(json.dumps(obj) + "\n")
    _REPLY.flush()


def main():
    # A terminated runner still runs the `finally` below, so the private Ray
    # instance (raylet, GCS, actor processes) goes away with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runner = Runner()
    try:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            runner.requests += 1
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise OpError("a request must be a JSON object")
                name = req.pop("op", None)
                if name not in OPS:
                    raise OpError(f"unknown op {name!r}; known: {sorted(OPS)}")
                result = OPS[name](runner, **req)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a reply
                traceback.print_exc(file=sys.stderr)
                reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
                continue
            reply({"ok": True, **result})
            if name == "shutdown":
                break
    finally:
        runner.close()


if __name__ == "__main__":
    main()
