"""Where a call's time goes: the driver's CPU per 4-rank call, by subsystem, under cProfile.

Usage::

    python benchmarks/profile_call.py            # 3,000 calls on a local 4-worker cluster
    python benchmarks/profile_call.py --ranks 1 --calls 5000

Prints the wall time per call, the driver's CPU per call (all threads: the
caller's thread and the Dask client's event loop, where channels live) and how
that CPU splits between the project's own code (by module), pickle, the event
loop and thread hand-offs. The workers' side is the difference between wall
time and the driver's share (each worker parses, runs and replies).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import resource
import sys
import threading
import time

import twinkle_dask as twinkle
from twinkle_dask import DeviceGroup, remote_class, remote_function


@remote_class()
class Target:
    @remote_function(dispatch="all", collect="none", lazy_collect=False)
    def noop(self):
        return None


WAITING = ("acquire", "poll", "select", "wait")


def _bucket(filename: str, function: str) -> str:
    if filename == "~":  # C functions: name them, and set the waiting apart
        if any(f"'{w}'" in function or f".{w}" in function for w in WAITING):
            return "WAITING"
        return function.replace("<built-in method ", "").replace("<method ", "").rstrip(">")
    if "twinkle_dask" in filename:
        tail = filename.split("twinkle_dask/", 1)[1]
        return "twinkle_dask/" + tail
    for name in ("asyncio", "selectors", "threading", "concurrent", "pickle", "copyreg", "tornado", "distributed"):
        if f"/{name}" in filename:
            return name
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    twinkle.initialize("dask", groups=[DeviceGroup(name="g", ranks=args.ranks, device_type="cpu")])
    try:
        target = Target(remote_group="g")
        for _ in range(300):
            target.noop()
        profiles = []

        def loop_profiler() -> None:  # profile the event loop thread too
            profile = cProfile.Profile()
            profiles.append(profile)
            sys.setprofile(None)
            profile.enable()

        session = twinkle.runtime.process_session()
        loop = session.caller.loop
        done = threading.Event()
        loop.call_soon_threadsafe(lambda: (loop_profiler(), done.set()))
        done.wait(10)
        main_profile = cProfile.Profile()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        main_profile.enable()
        for _ in range(args.calls):
            target.noop()
        main_profile.disable()
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        stopped = threading.Event()
        loop.call_soon_threadsafe(lambda: (profiles[0].disable(), stopped.set()))
        stopped.wait(10)
    finally:
        twinkle.shutdown()
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    per = 1e3 / args.calls
    print(f"{args.ranks}-rank call: {wall * per:.3f} ms wall, driver CPU {cpu * per:.3f} ms "
          f"({(cpu1.ru_stime - cpu0.ru_stime) * per:.3f} ms of it in the kernel); under cProfile")
    for title, profile in (("caller's thread", main_profile), ("event loop thread", profiles[0])):
        stats = pstats.Stats(profile)
        buckets: collections.Counter[str] = collections.Counter()
        for (filename, _, function), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
            buckets[_bucket(filename, function)] += tottime
        waiting = buckets.pop("WAITING", 0.0)
        total = sum(buckets.values())
        print(f"\n{title}: {total * per:.3f} ms of work per call under the profiler "
              f"(and {waiting * per:.3f} ms waiting)")
        for name, t in buckets.most_common(10):
            print(f"  {name:<45} {t * per:7.3f} ms  {100 * t / total:5.1f}%")


if __name__ == "__main__":
    main()
