"""A real data-parallel training run on a local Dask cluster.

``python -m twinkle_dask.examples.train`` starts a ``data`` group (one worker)
and a ``model`` group (four workers), builds a synthetic dataset on the data
rank and a 4-rank MLP trainer whose ranks keep one model in sync by
all-reducing gradients with torch.distributed (gloo on CPU, nccl on GPUs).
Each step the dataset's batch goes lazily to the trainer, every rank fetching
only its ``slice_dp`` share from the data worker, and the mean loss comes back.
Next to the components, plain Dask computes per-sample weights: the lazy batch
is handed to an unpinned ``client.submit`` task (the batch moves worker to
worker, never through the driver), and that task's future goes into the
trainer's call, each rank fetching it peer to peer and taking its share.
``--device cuda`` puts the model group on GPUs.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import twinkle_dask as twinkle
from twinkle_dask import DeviceGroup, DeviceMesh, remote_class, remote_function

FEATURES = 16
CLASSES = 4


@remote_class(execute="first")
class SyntheticDataset:
    """Points from four Gaussian blobs, labelled by blob; batch ``i`` is the same on every run."""

    def __init__(self, batch_size: int, steps: int, seed: int = 0) -> None:
        import torch

        self.batch_size = batch_size
        self.steps = steps
        gen = torch.Generator().manual_seed(seed)
        self.centers = torch.randn(CLASSES, FEATURES, generator=gen) * 0.35
        self.seed = seed

    @remote_function(collect="first")
    def batch(self, step: int) -> dict[str, Any]:
        import torch

        gen = torch.Generator().manual_seed(self.seed * 100_003 + step)
        y = torch.randint(0, CLASSES, (self.batch_size,), generator=gen)
        x = self.centers[y] + torch.randn(self.batch_size, FEATURES, generator=gen) * 0.6
        return {"x": x, "y": y}

    @remote_function()
    def __len__(self) -> int:
        return self.steps


@remote_class()
class Trainer:
    """One data-parallel rank of an MLP classifier."""

    def __init__(self, device_mesh: DeviceMesh, lr: float = 0.05, hidden: int = 64, device: str = "cpu") -> None:
        import torch
        import torch.distributed as dist

        self.device = torch.device("cuda:0" if device == "cuda" else "cpu")
        dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method="env://")
        self.world = dist.get_world_size()
        self.mesh = device_mesh
        self.model = torch.nn.Sequential(
            torch.nn.Linear(FEATURES, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, CLASSES)
        ).to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9)

    @remote_function(dispatch="slice_dp", collect="mean")
    def forward_backward(self, batch: dict[str, Any], weights: Any = None) -> float:
        import torch
        import torch.distributed as dist

        x, y = batch["x"].to(self.device), batch["y"].to(self.device)
        if weights is None:
            loss = torch.nn.functional.cross_entropy(self.model(x), y)
        else:  # this rank's share of the per-sample weights
            per_sample = torch.nn.functional.cross_entropy(self.model(x), y, reduction="none")
            loss = (per_sample * weights.to(self.device)).mean()
        self.optimizer.zero_grad()
        loss.backward()
        for p in self.model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= self.world  # type: ignore[operator,assignment]  # backward() has set every grad
        return float(loss.item())

    @remote_function(dispatch="all")
    def step(self) -> None:
        self.optimizer.step()

    @remote_function(dispatch="all", collect="flatten", lazy_collect=False)
    def checksum(self) -> list[float]:
        return [float(sum(p.detach().double().sum().item() for p in self.model.parameters()))]


def class_balance_weights(batch: dict[str, Any]) -> Any:
    """Per-sample weights that give every class of the batch the same total weight (a plain Dask task)."""
    import torch

    y = batch["y"]
    counts = torch.bincount(y, minlength=CLASSES).clamp(min=1)
    return (len(y) / (CLASSES * counts.float()))[y]


def _progress(step: int, total: int, loss: float, started: float) -> str:
    width = 30
    done = int(width * step / total)
    rate = step / max(time.perf_counter() - started, 1e-9)
    return f"[{'#' * done}{'.' * (width - done)}] {step:>4}/{total} loss {loss:.4f} ({rate:.1f} step/s)"


def run(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(prog="python -m twinkle_dask.examples.train", description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ranks", type=int, default=4, help="ranks of the model group")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--address", default=None, help="scheduler of an existing cluster")
    parser.add_argument("--no-dashboard", action="store_true")
    args = parser.parse_args(argv)

    groups = [
        DeviceGroup(name="data", ranks=1, device_type="cpu"),
        DeviceGroup(name="model", ranks=args.ranks, device_type=args.device),
    ]
    client = twinkle.initialize(
        "dask", groups=groups, address=args.address, seed=0,
        dashboard_address=None if args.no_dashboard else "127.0.0.1:8787",
    )
    try:
        if client.dashboard_link and not args.no_dashboard:
            print(f"Dask dashboard: {client.dashboard_link}", flush=True)
        # @remote_class takes remote_group and makes the methods return LazyResults: beyond what the classes declare
        dataset = SyntheticDataset(args.batch_size, args.steps, remote_group="data")  # type: ignore[call-arg]
        mesh = DeviceMesh.from_sizes(dp_size=args.ranks, device_type=args.device)
        trainer = Trainer(mesh, lr=args.lr, device=args.device, remote_group="model")  # type: ignore[call-arg]
        print(twinkle.get_device_placement(), flush=True)
        losses: list[float] = []
        started = time.perf_counter()
        interactive = sys.stdout.isatty()
        for step in range(len(dataset)):
            batch = dataset.batch(step)
            # Plain Dask next to the components: an unpinned task fed by the lazy batch; its future
            # goes into the trainer's call and each rank fetches its share from where the task ran.
            weights = client.submit(class_balance_weights, batch)
            loss = trainer.forward_backward(batch, weights)
            trainer.step()
            losses.append(float(loss()))  # type: ignore[operator]
            line = _progress(step + 1, args.steps, losses[-1], started)
            print(("\r" + line) if interactive else line, end="" if interactive else "\n", flush=True)
        if interactive:
            print()
        sums = trainer.checksum()
        in_sync = max(sums) - min(sums) < 1e-6 * max(1.0, abs(sums[0]))
        head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10):]
        print(f"loss {sum(head) / len(head):.4f} -> {sum(tail) / len(tail):.4f}; "
              f"ranks in sync: {in_sync}; {len(losses) / (time.perf_counter() - started):.1f} steps/s")
        return losses
    finally:
        twinkle.shutdown()


def main(argv: list[str] | None = None) -> None:
    losses = run(argv)
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    if not (math.isfinite(last) and last < first):
        print(f"the loss did not fall ({first:.4f} -> {last:.4f})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
