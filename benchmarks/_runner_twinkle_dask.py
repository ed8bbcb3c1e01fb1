"""Benchmark runner for twinkle_dask: the twin of ``_runner_twinkle_ray.py``.

The same components as there; the ops and the line protocol are
``_harness.py``'s. Only the import and the initialization differ: ``twinkle_dask.initialize('dask',
...)`` starts a local Dask cluster with one worker process per rank. The
orchestrator ``vs_twinkle_ray.py`` starts it with this project's interpreter.
"""

import time

import _harness  # before anything that could print: it keeps stdout for the protocol

_t_import = time.perf_counter()
import torch  # noqa: E402
from _timing import timed  # noqa: E402
from distributed.comm import CommClosedError, connect  # noqa: E402
from distributed.core import Status  # noqa: E402

import twinkle_dask as twinkle  # noqa: E402
from twinkle_dask import DeviceGroup, DeviceMesh, remote_class, remote_function  # noqa: E402

IMPORT_S = time.perf_counter() - _t_import

MIB = _harness.MIB


class Platform:
    """Twinkle's ``Platform.get_rank`` in twinkle_dask terms."""

    get_rank = staticmethod(twinkle.get_rank)


# =============================================================================
# Components: the same code as in _runner_twinkle_ray.py (they take **kwargs
# there because Ray checks constructor calls against the original signature).
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

        Returned as a one-element *list*, as in the Ray runner (where Twinkle's
        'flatten' would iterate a bare tensor element by element). The tensor
        is allocated once and reused, so the op measures moving data.
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

    def __init__(self, rows: int = 4 * 64, features: int = 256, num_classes: int = 10, seed: int = 0,
                 **kwargs):
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
        self.model = torch.nn.Sequential(
            torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
        )
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


def tensor_sum(shards):
    """The plain Dask task of the dask_tasks op: the exact sum of one rank's tensors."""
    return float(sum(t.sum(dtype=torch.float64).item() for t in shards))


# =============================================================================
# The floors a twinkle_dask call rides on (twinkle_dask only: op dask_floor)
# =============================================================================


class Ping:
    """A plain Dask actor: the floor of an actor method call."""

    def noop(self):
        return None


FLOOR_HANDLER = "bench_floor_stream"


def _install_floor_handler(dask_worker):
    """client.run: a handler that echoes every message on a comm it keeps (as twinkle's channels do)."""

    async def floor_stream(comm):
        try:
            while True:
                await comm.write(await comm.read())
        except CommClosedError:
            pass
        return Status.dont_reply

    dask_worker.handlers[FLOOR_HANDLER] = floor_stream


async def _open_floor_comm(address, connection_args):
    comm = await connect(address, **connection_args)
    await comm.write({"op": FLOOR_HANDLER, "reply": False})
    return comm


async def _comm_round_trips(comm, n):
    msg = {"i": 0, "x": [1, 2, 3]}
    times = []
    for i in range(n):
        msg["i"] = i
        t0 = time.perf_counter()
        await comm.write(msg)
        got = await comm.read()
        times.append(time.perf_counter() - t0)
        if got["i"] != i:
            raise _harness.OpError(f"comm round trip {i} answered {got!r}")
    return times


class DaskRunner(_harness.Runner):
    def start(self, groups):
        twinkle.initialize(
            "dask",
            seed=42,
            dashboard_address=None,
            groups=[DeviceGroup(name=n, ranks=r, device_type="cpu") for n, r in groups.items()],
        )

    def wait_ready(self, comp):
        """Components are ready when their constructor returns."""

    def close(self):
        twinkle.shutdown()

    def op_dask_tasks(self, iters, mib=4, warmup=1):
        """4 plain Dask tasks fed by a lazy 4 x ``mib`` MiB result, against the same tasks fed by
        ``client.scatter`` of the same tensors from the driver; the two alternate iteration by iteration.

        twinkle_dask only: Twinkle on Ray has no Dask tasks to feed.
        """
        from distributed import get_client

        client = get_client()
        ranks = self.need_group("a")
        producer = self.get("bench@a")
        mib = int(mib)
        numel = mib * MIB // 4
        expected = [float(numel * (k + 1)) for k in range(ranks)]
        tensors = [[torch.full((numel,), float(k + 1), dtype=torch.float32)] for k in range(ranks)]

        def lazy_fed():
            futures = producer.make_tensor(mib).futures()  # each rank's result, as Dask data where it is
            return client.gather(client.map(tensor_sum, futures, pure=False))

        def scatter_fed():
            futures = client.scatter(tensors, hash=False)  # the same tensors, from the driver
            return client.gather(client.map(tensor_sum, futures, pure=False))

        for _ in range(warmup):
            lazy_fed(), scatter_fed()
        times, scatter_times = [], []
        for i in range(2 * iters):
            first_lazy = (i // 2) % 2 == 0
            fn, out = (lazy_fed, times) if (i % 2 == 0) == first_lazy else (scatter_fed, scatter_times)
            t0 = time.perf_counter()
            got = fn()
            out.append(time.perf_counter() - t0)
            if got != expected:
                raise _harness.OpError(f"dask_tasks ({fn.__name__}) sums {got!r}, expected {expected!r}")
        return {"times": times, "scatter_times": scatter_times, "mib": mib}

    def op_dask_floor(self, iters=100, rounds=5, warmup=1):
        """A 1-rank twinkle_dask call against a plain Dask actor call and a bare comm round trip.

        All three go to the same worker (the 1-rank group ``s1``'s), in
        alternating rounds; ``iters`` samples of each.
        """
        if self.groups is None:
            self.initialize({"s1": 1})
        self.need_group("s1", 1)
        bench = self.get("bench@s1")
        session = twinkle.runtime.process_session()
        client = session.client
        address = session.placements["s1"].addresses[0]
        actor_future = client.submit(Ping, actor=True, workers=[address], allow_other_workers=False, pure=False)
        actor = actor_future.result()
        client.run(_install_floor_handler, workers=[address])
        # The comm lives on the client's event loop; each round trip is timed there.
        comm = client.sync(_open_floor_comm, address, client.connection_args)
        out = {"twinkle": [], "actor": [], "comm": []}
        per = max(1, int(iters) // int(rounds))
        try:
            for _ in range(int(rounds)):
                out["twinkle"] += timed(bench.noop, warmup, per)
                out["actor"] += timed(lambda: actor.noop().result(), warmup, per)
                out["comm"] += client.sync(_comm_round_trips, comm, warmup + per)[warmup:]
        finally:
            client.sync(comm.close)
            actor_future.release()
        return {"times": [], "by_kind": out, "worker": address,
                "direct_to_workers": bool(client.direct_to_workers)}


_harness.OPS["dask_tasks"] = DaskRunner.op_dask_tasks
_harness.OPS["dask_floor"] = DaskRunner.op_dask_floor


if __name__ == "__main__":
    classes = {"bench": Bench, "dataset": Dataset, "consumer": Consumer, "trainer": Trainer}
    _harness.serve(DaskRunner(classes, DeviceMesh, IMPORT_S))
