"""The twinkle_dask side of ``vs_twinkle_ray.py``: one long-lived process running workloads on request.

Protocol: each stdin line is a JSON object ``{"op": name, ...params}``; each reply is one JSON line
on stdout, ``{"ok": true, "times": [seconds, ...], ...}`` or ``{"ok": false, "error": "..."}``.
Everything else this process prints goes to stderr. The workloads mirror
``_runner_twinkle_ray.py`` op for op; only the import differs.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

_protocol = sys.stdout
sys.stdout = sys.stderr

import psutil  # noqa: E402
import torch  # noqa: E402

import twinkle_dask as twinkle  # noqa: E402
from twinkle_dask import DeviceGroup, DeviceMesh, remote_class, remote_function  # noqa: E402

HIDDEN, FEATURES, CLASSES, PER_RANK = 256, 256, 10, 64


@remote_class()
class Worker:
    """A component with the methods the latency workloads call."""

    @remote_function(dispatch="all", collect="none", lazy_collect=False)
    def noop(self) -> None:
        return None

    @remote_function(dispatch="slice", collect="flatten", lazy_collect=False)
    def echo_slice(self, items: list[int]) -> list[int]:
        return items

    @remote_function(dispatch="all", collect="none")
    def small(self) -> int:
        return 1


@remote_class()
class Producer:
    @remote_function(dispatch="all", collect="flatten")
    def tensor(self, mib: int) -> torch.Tensor:
        n = mib * (1 << 20) // 4
        return torch.full((n,), float(twinkle.get_rank()), dtype=torch.float32)


@remote_class()
class Consumer:
    def __init__(self, device_mesh: DeviceMesh = None) -> None:
        self.mesh = device_mesh

    @remote_function(dispatch="slice_dp", collect="none")
    def checksum(self, t: torch.Tensor) -> float:
        return float(t.sum())


@remote_class(execute="first")
class Batches:
    def __init__(self, ranks: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(ranks * PER_RANK, FEATURES, generator=gen)
        self.y = torch.randint(0, CLASSES, (ranks * PER_RANK,), generator=gen)

    @remote_function(collect="first")
    def batch(self) -> dict[str, torch.Tensor]:
        return {"x": self.x, "y": self.y}


@remote_class()
class MLP:
    def __init__(self, device_mesh: DeviceMesh = None) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES)
        )
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)

    @remote_function(dispatch="slice_dp", collect="mean")
    def forward_backward(self, batch: dict[str, torch.Tensor]) -> float:
        self.opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(self.model(batch["x"]), batch["y"])
        loss.backward()
        return float(loss.item())

    @remote_function(dispatch="all")
    def step(self) -> None:
        self.opt.step()


class Runner:
    def __init__(self) -> None:
        self.started = False
        self.parts: dict[str, Any] = {}

    def _init(self, groups: dict[str, int]) -> None:
        twinkle.initialize(
            "dask",
            groups=[DeviceGroup(name=name, ranks=n, device_type="cpu") for name, n in groups.items()],
            dashboard_address=None,
        )
        self.started = True

    def startup(self, ranks: int = 4) -> dict[str, Any]:
        if self.started:
            return {"ok": False, "error": "startup must be the first op of a runner"}
        t0 = time.perf_counter()
        self._init({"a": ranks})
        t1 = time.perf_counter()
        worker = Worker(remote_group="a")
        worker.noop()
        t2 = time.perf_counter()
        self.parts["a"] = worker
        return {"ok": True, "times": [t2 - t0], "init_s": t1 - t0, "component_s": t2 - t1}

    def setup(self, groups: dict[str, int]) -> dict[str, Any]:
        if not self.started:
            self._init(groups)
        if "a" in groups:
            self.parts["a"] = Worker(remote_group="a")
            self.parts["producer"] = Producer(remote_group="a")
            self.parts["mlp"] = MLP(DeviceMesh.from_sizes(dp_size=groups["a"]), remote_group="a")
        if "b" in groups:
            self.parts["consumer"] = Consumer(DeviceMesh.from_sizes(dp_size=groups["b"]), remote_group="b")
        if "d" in groups:
            self.parts["data"] = Batches(groups.get("a", 4), remote_group="d")
        for name, n in groups.items():
            if name.startswith("s"):
                self.parts[name] = Worker(remote_group=name)
        return {"ok": True}

    @staticmethod
    def _time(fn: Any, iters: int) -> list[float]:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times

    def call_all(self, iters: int) -> dict[str, Any]:
        return {"ok": True, "times": self._time(self.parts["a"].noop, iters)}

    def slice_flatten(self, iters: int) -> dict[str, Any]:
        items = list(range(16))
        assert self.parts["a"].echo_slice(items) == items
        return {"ok": True, "times": self._time(lambda: self.parts["a"].echo_slice(items), iters)}

    def pipelined(self, calls: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        results = [self.parts["a"].small() for _ in range(calls)]
        values = [r() for r in results]
        elapsed = time.perf_counter() - t0
        assert values[-1] == [1] * len(values[-1])
        return {"ok": True, "times": [elapsed]}

    def handoff(self, iters: int, mib: int = 4) -> dict[str, Any]:
        producer, consumer = self.parts["producer"], self.parts["consumer"]
        n = mib * (1 << 20) // 4
        expected = [float(r * n) for r in range(4)]
        assert consumer.checksum(producer.tensor(mib))() == expected
        rss0 = psutil.Process().memory_info().rss
        times = self._time(lambda: consumer.checksum(producer.tensor(mib))(), iters)
        rss1 = psutil.Process().memory_info().rss
        return {"ok": True, "times": times, "rss_growth_mib": (rss1 - rss0) / (1 << 20)}

    def train_step(self, iters: int) -> dict[str, Any]:
        data, mlp = self.parts["data"], self.parts["mlp"]

        def one() -> None:
            loss = mlp.forward_backward(data.batch())
            mlp.step()
            loss()

        one()
        return {"ok": True, "times": self._time(one, iters)}

    def scaling(self, ranks: list[int], iters: int) -> dict[str, Any]:
        if not self.started:
            self.setup({f"s{n}": n for n in ranks})
        by_ranks = {}
        for n in ranks:
            worker = self.parts[f"s{n}"]
            for _ in range(5):
                worker.noop()
            by_ranks[str(n)] = self._time(worker.noop, iters)
        return {"ok": True, "by_ranks": by_ranks}


def main() -> None:
    runner = Runner()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request.pop("op")
        if op == "shutdown":
            break
        try:
            reply = getattr(runner, op)(**request)
        except Exception as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        _protocol.write(json.dumps(reply) + "\n")
        _protocol.flush()
    twinkle.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
