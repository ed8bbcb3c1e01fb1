"""The runner side of the side-by-side benchmark, shared by both systems' runners.

``vs_twinkle_ray.py`` starts ``_runner_twinkle_dask.py`` with this project's
interpreter and ``_runner_twinkle_ray.py`` with the peer venv's (made by
``benchmarks/setup_peer.sh``). Each runner defines the same components (the
same user code on both systems) and a :class:`Runner` subclass that says how
its system starts, waits for components and stops; everything else, the ops
and the line protocol, lives here, so that both systems are measured by the
same code. This module needs only the standard library and psutil, which
both venvs have.

The line protocol:

* stdin:  one JSON object per line, ``{"op": <name>, ...params}``.
* stdout: exactly one JSON line per request, either
  ``{"ok": true, "times": [seconds, ...], ...extra}`` or
  ``{"ok": false, "error": "..."}``.

Nothing else ever reaches stdout: importing this module keeps the real stdout
as a private handle for replies and points file descriptor 1 (and
``sys.stdout``) at stderr, so logs, worker output forwarded to the driver and
the output of every child process go to stderr. A runner therefore imports
this module before anything that could print.

Ops (see ``OPS``; every timed op accepts ``"warmup"``, the number of untimed
iterations run first, default 1):

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
starts one runner per startup sample). ``setup`` initializes the system once
with the given CPU groups and builds the components of the other ops: on group
``a`` a 4-rank ``Bench`` (call_all, slice_flatten, pipelined, hand-off
producer) and a ``Dataset`` (``execute='first'``, i.e. one rank on a's first
slot); on group ``b`` a ``Consumer`` (hand-off) and a ``Trainer`` (train_step),
both with ``DeviceMesh.from_sizes(dp_size=<ranks of b>)``; on every group named
``s<k>`` a ``Bench`` for ``scaling``. ``scaling`` can also run in a fresh
process without ``setup``: it then initializes with groups ``s<k>`` itself.
Both systems initialize once per process, so every group an op needs must be
in that one ``initialize``.
"""

import os
import sys

# Keep a private, line-buffered handle on the real stdout for protocol replies
# (os.dup returns a non-inheritable fd, so child processes never hold the
# orchestrator's pipe open), then point fd 1 and sys.stdout at stderr.
_REPLY = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
os.dup2(2, 1)
sys.stdout = sys.stderr

import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import psutil  # noqa: E402
from _timing import timed  # noqa: E402

MIB = 1 << 20


class OpError(Exception):
    """A request that cannot be served (bad params, wrong order)."""


def as_list(collected):
    """Twinkle's collect='none' unwraps a one-rank result (twinkle/infra/__init__.py:332-337)."""
    return collected if isinstance(collected, list) else [collected]


class Runner:
    """The ops, over the hooks a system's runner supplies.

    Parameters
    ----------
    classes : dict
        The component classes: ``bench``, ``dataset``, ``consumer``, ``trainer``.
    device_mesh : type
        The system's ``DeviceMesh`` (``from_sizes(dp_size=...)``).
    import_s : float
        Seconds the runner spent importing the system, reported by ``startup``.
    """

    def __init__(self, classes, device_mesh, import_s):
        self.classes = classes
        self.device_mesh = device_mesh
        self.import_s = import_s
        self.requests = 0  # requests received so far, this one included
        self.groups = None  # {name: ranks} once the system is initialized
        self.num_cpus = None  # Ray's logical CPUs, where the system has them
        self.components = {}  # name -> driver-side handle

    # ---- hooks ----------------------------------------------------------------

    def start(self, groups):
        """Initialize the system with CPU groups ``{name: ranks}``."""
        raise NotImplementedError

    def wait_ready(self, comp):
        """Block until every rank of ``comp`` has been constructed."""
        raise NotImplementedError

    def close(self):
        """Stop the system and everything it started."""
        raise NotImplementedError

    # ---- initialization and components ---------------------------------------

    def initialize(self, groups):
        """Start the system with the given CPU groups; returns seconds."""
        if self.groups is not None:
            raise OpError(f"already initialized with groups {self.groups}")
        t0 = time.perf_counter()
        self.start(groups)
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

    def build(self, key):
        """Construct component ``kind@group`` (the system may still be starting its ranks)."""
        if key in self.components:
            return self.components[key]
        kind, group = key.split("@")
        ranks = self.need_group(group)
        if kind not in self.classes:
            raise OpError(f"unknown component {key!r}; kinds: {sorted(self.classes)}")
        # An explicit instance_id: Twinkle otherwise names actors after the
        # calling file:line, which would collide for two builds from one line.
        opts = dict(remote_group=group, instance_id=key)
        if kind in ("consumer", "trainer"):
            opts["device_mesh"] = self.device_mesh.from_sizes(dp_size=ranks)
        comp = self.classes[kind](**opts)
        self.components[key] = comp
        return comp

    def get(self, key):
        """A built component; builds (and waits for) it if setup did not."""
        if key not in self.components:
            self.wait_ready(self.build(key))
        return self.components[key]

    # ---- ops ------------------------------------------------------------------

    def op_startup(self, ranks=4):
        if self.requests != 1:
            raise OpError("'startup' is only valid as the first request of a runner process")
        ranks = int(ranks)
        init_s = self.initialize({"startup": ranks})
        t0 = time.perf_counter()
        comp = self.classes["bench"](remote_group="startup", instance_id="bench@startup")
        comp.noop()  # first (blocking) call: waits for all ranks to start
        component_s = time.perf_counter() - t0
        self.components["bench@startup"] = comp
        return {"times": [init_s + component_s], "init_s": init_s,
                "component_s": component_s, "import_s": self.import_s}

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
        comps = [self.build(k) for k in keys]  # construction overlaps ...
        for comp in comps:  # ... and we wait for all of them here
            self.wait_ready(comp)
        build_s = time.perf_counter() - t1
        return {"times": [time.perf_counter() - t0], "init_s": init_s, "build_s": build_s,
                "num_cpus": self.num_cpus, "groups": self.groups, "components": keys}

    def op_call_all(self, iters, warmup=1):
        bench = self.get("bench@a")
        return {"times": timed(bench.noop, warmup, iters)}

    def op_slice_flatten(self, iters, warmup=1):
        bench = self.get("bench@a")
        items = list(range(16))
        out = bench.echo(items)
        if out != items:
            raise OpError(f"slice/flatten returned {out!r}, expected {items!r}")
        return {"times": timed(lambda: bench.echo(items), warmup, iters)}

    def op_pipelined(self, calls=1000, warmup=1):
        bench = self.get("bench@a")
        n = self.need_group("a")
        for i in range(warmup):
            bench.small(i)()
        t0 = time.perf_counter()
        lazies = [bench.small(i) for i in range(calls)]  # issue everything first
        results = [lz() for lz in lazies]  # then collect (r() collects)
        total = time.perf_counter() - t0
        if as_list(results[-1]) != [calls - 1] * n:
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
            shards = producer.make_tensor(mib)  # lazy: stays with the producer ranks
            return as_list(consumer.checksum(shards))  # B pulls it, never through the driver

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
        if not all(math.isfinite(x) for x in losses):
            raise OpError(f"non-finite loss: {losses}")
        return {"times": times, "loss_first": losses[0] if losses else None,
                "loss_last": losses[-1] if losses else None}

    def op_scaling(self, ranks=(1, 2, 4, 8), iters=100, warmup=1):
        ranks = [int(k) for k in ranks]
        if self.groups is None:
            self.initialize({f"s{k}": k for k in ranks})
        for k in ranks:
            self.need_group(f"s{k}", k)
        # Build every size first and only then measure, so that no measurement
        # competes with other ranks still starting.
        t0 = time.perf_counter()
        benches = {k: self.build(f"bench@s{k}") for k in ranks}
        for comp in benches.values():
            self.wait_ready(comp)
        build_s = time.perf_counter() - t0
        by_ranks = {str(k): timed(bench.noop, warmup, iters) for k, bench in benches.items()}
        return {"times": [], "by_ranks": by_ranks, "build_s": build_s}

    def op_shutdown(self):
        return {"times": []}


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


def serve(runner):
    """Answer requests from stdin until 'shutdown' or end of input, then close the system."""
    # A terminated runner still runs the `finally` below, so the system's
    # processes (local cluster, or raylet, GCS and actors) go away with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
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
