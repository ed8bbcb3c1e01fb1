"""twinkle_dask against Twinkle on Ray, side by side, in one invocation.

Usage::

    bash benchmarks/setup_peer.sh             # once: .venv-ray with twinkle-kit 0.5.1 and ray 2.60.0
    python benchmarks/vs_twinkle_ray.py       # the full run (about 10 minutes on 2 cores)
    python benchmarks/vs_twinkle_ray.py --quick --no-peer   # smoke: twinkle_dask only, a few iterations

Each system runs in its own long-lived runner process (``_runner_twinkle_dask.py`` with this
interpreter, ``_runner_twinkle_ray.py`` with the peer venv's), driven over a line protocol. The
workloads alternate between the systems repetition by repetition (the first system alternates
too), so drifts in machine load hit both alike. Startup is measured in fresh runner processes.
The table gives medians with the 25th-75th percentile spread and the ratio
twinkle_dask / Twinkle-Ray (below 1.0: twinkle_dask is faster). Its last two rows
hold twinkle_dask against Dask itself, on the worker of a 1-rank group, in
alternating rounds in the same process: a 1-rank call against a plain Dask
actor call and against a bare ``distributed.comm`` round trip, the floor of
the comm a call rides (ratio: twinkle_dask / that baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
DASK_RUNNER = HERE / "_runner_twinkle_dask.py"
RAY_RUNNER = HERE / "_runner_twinkle_ray.py"

#: workload -> (op, params per repetition, how to read the times, target ratio)
WORKLOADS: dict[str, dict[str, Any]] = {
    "call_all": {"label": "4-rank call, dispatch='all', collect='none'", "target": 1.0},
    "slice_flatten": {"label": "4-rank call, slice of 16, collect='flatten'", "target": 1.0},
    "pipelined": {"label": "1,000 lazy calls issued, then collected", "target": 1.0},
    "handoff": {"label": "hand-off 4 x 4 MiB tensors A -> B (slice_dp)", "target": 0.5},
    "train_step": {"label": "training step (dataset -> 4-rank MLP, mean loss)", "target": 0.8},
}


class Runner:
    """One runner process, spoken to over stdin/stdout."""

    def __init__(self, name: str, python: str, script: pathlib.Path) -> None:
        self.name = name
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [python, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL if not os.environ.get("BENCH_VERBOSE") else None,
            text=True, env=env, cwd=ROOT,
        )

    def ask(self, op: str, **params: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **params}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} runner exited (code {self.proc.poll()}) during {op!r}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"{self.name} {op} failed: {reply.get('error')}")
        return reply

    def close(self) -> None:
        try:
            self.ask("shutdown")
        except Exception:
            pass
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _q(values: list[float], q: float) -> float:
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def _fmt(seconds: list[float]) -> str:
    if not seconds:
        return "-"
    scale, unit = (1e3, "ms") if statistics.median(seconds) < 1 else (1.0, "s")
    med = statistics.median(seconds) * scale
    return f"{med:.3g} {unit} [{_q(seconds, 0.25) * scale:.3g}-{_q(seconds, 0.75) * scale:.3g}]"


def _ratio(a: list[float], b: list[float]) -> float | None:
    if not a or not b:
        return None
    return statistics.median(a) / statistics.median(b)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few iterations of everything (smoke test)")
    parser.add_argument("--no-peer", action="store_true", help="run twinkle_dask only")
    parser.add_argument("--reps", type=int, default=None, help="alternating repetitions per workload")
    parser.add_argument("--ray-python", default=str(ROOT / ".venv-ray" / "bin" / "python"))
    parser.add_argument("--json", default=None, help="also write the raw times here")
    args = parser.parse_args(argv)

    quick = args.quick
    reps = args.reps or (2 if quick else 6)
    iters = {"call_all": 20 if quick else 150, "slice_flatten": 20 if quick else 150, "pipelined": 1,
             "handoff": 2 if quick else 8, "train_step": 3 if quick else 25, "dask_tasks": 2 if quick else 8}
    startup_samples = 1 if quick else 3
    scaling_iters = 10 if quick else 100
    systems = [("twinkle_dask", sys.executable, DASK_RUNNER)]
    if not args.no_peer:
        if not pathlib.Path(args.ray_python).exists():
            print(f"peer interpreter {args.ray_python} not found: run `bash benchmarks/setup_peer.sh` "
                  f"first, or pass --no-peer", file=sys.stderr)
            return 2
        systems.append(("Twinkle-Ray", args.ray_python, RAY_RUNNER))
    names = [s[0] for s in systems]
    times: dict[str, dict[str, list[float]]] = {w: {n: [] for n in names} for w in WORKLOADS}
    extra: dict[str, dict[str, Any]] = {n: {} for n in names}
    dask_tasks: dict[str, list[float]] = {"lazy": [], "scatter": []}
    started = time.perf_counter()

    def order(rep: int) -> list[tuple[str, str, pathlib.Path]]:
        return systems if rep % 2 == 0 else systems[::-1]

    # ---------------------------------------------------------------- steady-state workloads
    print(f"# starting runners: {', '.join(names)}", file=sys.stderr)
    runners = {n: Runner(n, py, script) for n, py, script in systems}
    try:
        for name, runner in runners.items():
            reply = runner.ask("setup", groups={"a": 4, "b": 4})
            print(f"# {name}: setup {reply['times'][0]:.1f} s", file=sys.stderr)
        # twinkle_dask only (Twinkle on Ray has no Dask tasks): lazy result vs client.scatter feeding 4 tasks
        for _ in range(reps):
            reply = runners[names[0]].ask("dask_tasks", iters=iters["dask_tasks"], mib=4)
            dask_tasks["lazy"].extend(reply["times"])
            dask_tasks["scatter"].extend(reply["scatter_times"])
        print(f"# dask_tasks done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        for workload in WORKLOADS:
            for rep in range(reps):
                for name, _, _ in order(rep):
                    params: dict[str, Any] = {}
                    if workload == "pipelined":
                        params = {"calls": 1000}
                    elif workload == "handoff":
                        params = {"iters": iters[workload], "mib": 4}
                    else:
                        params = {"iters": iters[workload]}
                    reply = runners[name].ask(workload, **params)
                    times[workload][name].extend(reply["times"])
                    if workload == "handoff":
                        extra[name].setdefault("rss_growth_mib", []).append(reply["rss_growth_mib"])
            print(f"# {workload} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    finally:
        for runner in runners.values():
            runner.close()

    # ---------------------------------------------------------------- scaling 1 -> 8 ranks
    scaling: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    runners = {n: Runner(n, py, script) for n, py, script in systems}
    try:
        for rep in range(max(2, reps // 2)):
            for name, _, _ in order(rep):
                reply = runners[name].ask("scaling", ranks=[1, 2, 4, 8], iters=scaling_iters)
                for k, v in reply["by_ranks"].items():
                    scaling[name].setdefault(k, []).extend(v)
        print(f"# scaling done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        # The floors of a call, in the same process and on the same 1-rank group's worker.
        floor = runners[names[0]].ask("dask_floor", iters=scaling_iters * max(2, reps // 2), rounds=5)["by_kind"]
        print(f"# dask floors done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    finally:
        for runner in runners.values():
            runner.close()

    # ---------------------------------------------------------------- startup (fresh processes)
    startup: dict[str, list[float]] = {n: [] for n in names}
    for sample in range(startup_samples):
        for name, py, script in order(sample):
            runner = Runner(name, py, script)
            try:
                reply = runner.ask("startup", ranks=4)
                startup[name].append(reply["times"][0])
            finally:
                runner.close()
    print(f"# startup done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    # ---------------------------------------------------------------- table
    base, peer = names[0], (names[1] if len(names) > 1 else None)
    rows = []
    for workload, spec in WORKLOADS.items():
        rows.append((spec["label"], times[workload][base], times[workload].get(peer, []) if peer else [],
                     spec["target"]))
    rows.append(("startup: initialize + first 4-rank component", startup[base],
                 startup.get(peer, []) if peer else [], 0.25))
    for k in ("1", "2", "4", "8"):
        rows.append((f"call cost, {k}-rank group", scaling[base].get(k, []),
                     scaling[peer].get(k, []) if peer else [], 1.0))
    # Against Dask itself (second column: the Dask baseline, not the peer).
    rows.append(("1-rank call vs a plain Dask actor call (right: `actor.noop().result()`, same worker)",
                 floor["twinkle"], floor["actor"], 1.0))
    rows.append(("1-rank call vs a bare `distributed.comm` round trip (right: write + read on one comm)",
                 floor["twinkle"], floor["comm"], None))
    header = f"| workload | {base} | {peer or '(no peer)'} | ratio | target |"
    print(header)
    print("|---|---|---|---|---|")
    failures = 0
    for label, a, b, target in rows:
        ratio = _ratio(a, b)
        verdict = "" if ratio is None or target is None else (" ok" if ratio <= target else " MISSED")
        failures += verdict == " MISSED"
        ratio_s = "-" if ratio is None else f"{ratio:.2f}{verdict}"
        target_s = "-" if target is None else f"<= {target}"
        print(f"| {label} | {_fmt(a)} | {_fmt(b)} | {ratio_s} | {target_s} |")
    ratio = _ratio(dask_tasks["lazy"], dask_tasks["scatter"])
    for label, a in (("4 Dask tasks fed by a lazy 4 x 4 MiB result (futures())", dask_tasks["lazy"]),
                     ("the same tasks fed by client.scatter of the tensors", dask_tasks["scatter"])):
        print(f"| {label} | {_fmt(a)} | - | - | |")
    print()
    print("Dask tasks fed by a lazy result / by client.scatter (twinkle_dask only; Twinkle on Ray has no "
          "Dask tasks, hence '-'): " + ("-" if ratio is None else f"{ratio:.2f}") + "  (target: <= 1.0)")
    rss = {n: statistics.median(extra[n]["rss_growth_mib"]) for n in names if extra[n].get("rss_growth_mib")}
    print()
    print("driver RSS growth over the hand-offs (MiB, median per repetition): "
          + ", ".join(f"{n} {v:+.1f}" for n, v in rss.items()) + "  (target for twinkle_dask: < 20)")
    print(f"# medians [25th-75th percentile]; {reps} alternating repetitions; "
          f"{os.cpu_count()} cores; {time.perf_counter() - started:.0f} s in all")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"times": times, "scaling": scaling, "startup": startup, "extra": extra, "dask_tasks": dask_tasks,
             "dask_floor": floor},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
