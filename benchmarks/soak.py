"""Soak: many calls with payloads, lazy results dropped and handed on; memory must stay flat.

``python benchmarks/soak.py --calls 10000`` runs a 4-rank producer group and a 2-rank consumer
group through rounds of: an eager call with a 64 KiB list payload, a lazy call whose result is
dropped unread, a lazy 256 KiB tensor result handed to the consumers (slice_dp), and a collected
reduction. It samples the RSS of the driver (which also hosts the scheduler) and of every worker,
and the number of results the workers still hold, and prints them per tenth of the run.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import psutil
import torch

import twinkle_dask as twinkle
from twinkle_dask import DeviceGroup, DeviceMesh, remote_class, remote_function
from twinkle_dask.testing import worker_stats


@remote_class()
class Producer:
    @remote_function(dispatch="slice", collect="flatten", lazy_collect=False)
    def echo(self, items: list) -> list:
        return items

    @remote_function(dispatch="all")
    def tensor(self, n: int) -> list[torch.Tensor]:
        return [torch.full((n,), float(twinkle.get_rank()))]


@remote_class()
class Consumer:
    def __init__(self, device_mesh: DeviceMesh = None):
        self.mesh = device_mesh

    @remote_function(dispatch="slice_dp", collect="sum")
    def total(self, parts: list) -> float:
        return float(sum(t.sum() for t in parts))


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / (1 << 20)


def _python_objects() -> int:
    gc.collect()
    return len(gc.get_objects())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=10_000, help="calls in all (4 per round)")
    args = parser.parse_args(argv)
    client = twinkle.initialize("dask", dashboard_address=None, groups=[
        DeviceGroup(name="p", ranks=4, device_type="cpu"), DeviceGroup(name="c", ranks=2, device_type="cpu")])
    try:
        producer = Producer(remote_group="p")
        consumer = Consumer(DeviceMesh.from_sizes(dp_size=2), remote_group="c")
        worker_pids = [proc.pid for proc in psutil.Process().children(recursive=True)]
        payload = list(range(64 * 1024 // 8))
        rounds = args.calls // 4
        samples = []
        started = time.perf_counter()
        for r in range(rounds):
            assert producer.echo(payload) == payload
            producer.tensor(1024)  # dropped unread: must be freed on the workers
            total = consumer.total(producer.tensor.options(collect="flatten")(64 * 1024))
            if r % max(1, rounds // 10) == 0 or r == rounds - 1:
                assert total() == float(64 * 1024 * (0 + 1 + 2 + 3))
                gc.collect()
                held = sum(s["held"] for s in worker_stats().values())
                workers = sum(rss_mib(p) for p in worker_pids if psutil.pid_exists(p))
                objects = sum(client.run(_python_objects).values())
                samples.append((4 * (r + 1), rss_mib(os.getpid()), workers, held, objects))
            else:
                total()
        elapsed = time.perf_counter() - started
        print("| calls | driver+scheduler RSS MiB | workers RSS MiB (sum) | results held | worker Python objects |")
        print("|---|---|---|---|---|")
        for calls, drv, wrk, held, objects in samples:
            print(f"| {calls} | {drv:.1f} | {wrk:.1f} | {held} | {objects} |")
        first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
        print(f"\n{4 * rounds} calls in {elapsed:.1f} s; growth after warm-up: driver {last[1] - first[1]:+.1f} MiB, "
              f"workers {last[2] - first[2]:+.1f} MiB, worker Python objects {last[4] - first[4]:+d}")
    finally:
        twinkle.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
