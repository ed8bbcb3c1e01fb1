"""GPU hand-offs and a GPU training step, against moving the same tensors through the driver.

``python benchmarks/gpu.py`` (needs a CUDA GPU and twinkle-dask[cuda]). Groups: ``gpu`` (one
dask-cuda worker on GPU 0) and ``cpu`` (one CPU worker). For CUDA tensors of 64 MiB it times:

* lazy, GPU component -> another component on the same GPU worker (read in place);
* lazy, GPU component -> CPU component (device to host, worker to worker);
* the peer: the driver collects the tensor (to its CPU) and passes the value on.

and a training step of the example MLP on the GPU. Prints medians and ratios lazy / via-driver.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from _timing import timed

import twinkle_dask as twinkle
from twinkle_dask import DeviceGroup, remote_class, remote_function

MIB = 1 << 20


@remote_class()
class Producer:
    def __init__(self) -> None:
        self.t: torch.Tensor | None = None

    @remote_function(dispatch="all", collect="first")
    def make(self, mib: int) -> torch.Tensor:
        n = mib * MIB // 4
        if self.t is None or self.t.numel() != n:
            self.t = torch.ones(n, device="cuda")
        return self.t


@remote_class()
class Consumer:
    @remote_function(dispatch="all", collect="first", lazy_collect=False)
    def checksum(self, t: torch.Tensor) -> tuple[str, float]:
        return str(t.device), float(t.sum(dtype=torch.float64))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    twinkle.initialize("dask", dashboard_address=None, groups=[
        DeviceGroup(name="gpu", ranks=1, device_type="cuda"), DeviceGroup(name="cpu", ranks=1, device_type="cpu")])
    try:
        producer = Producer(remote_group="gpu")
        on_gpu, on_cpu = Consumer(remote_group="gpu"), Consumer(remote_group="cpu")
        device, total = on_gpu.checksum(producer.make(args.mib))
        if device != "cuda:0" or total != args.mib * MIB // 4:
            raise RuntimeError(f"the GPU consumer saw a tensor on {device} summing to {total}")
        rows = []
        for label, consumer in (("GPU -> same GPU worker", on_gpu), ("GPU -> CPU worker", on_cpu)):
            lazy = timed(lambda c=consumer: c.checksum(producer.make(args.mib)), 1, args.iters)
            driver = timed(lambda c=consumer: c.checksum(producer.make(args.mib)()), 1, args.iters)
            rows.append((f"{args.mib} MiB CUDA tensor, {label}", lazy, driver))
        print(f"| workload ({torch.cuda.get_device_name(0)}) | lazy hand-off | via the driver | ratio |")
        print("|---|---|---|---|")
        for label, lazy, driver in rows:
            a, b = statistics.median(lazy), statistics.median(driver)
            print(f"| {label} | {a * 1e3:.2f} ms | {b * 1e3:.2f} ms | {a / b:.2f} |")
    finally:
        twinkle.shutdown()
    from twinkle_dask.examples.train import run

    t0 = time.perf_counter()
    losses = run(["--device", "cuda", "--ranks", "1", "--steps", "100", "--no-dashboard"])
    print(f"\ntraining example on 1 GPU: 100 steps (with start-up) in {time.perf_counter() - t0:.1f} s, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
