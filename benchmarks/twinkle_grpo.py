"""Twinkle's own components, the GRPO control flow: the bridge against Twinkle on Ray, side by side.

Usage::

    source ci/twinkle_env.sh                      # .venv-twinkle: twinkle-kit 0.5.1, Ray 2.60, twinkle-dask
    python benchmarks/twinkle_grpo.py             # 6 GRPO steps per run, 2 runs per backend, alternating
    python benchmarks/twinkle_grpo.py --steps 3 --rounds 1

Runs ``tests/twinkle_scripts/grpo_script.py`` (the control flow of the cookbook's ``short_math_grpo.py``
on a tiny local Qwen3, CPU, with a stand-in sampler: a model group of 2 ranks, a sampler group of 2 ranks,
the checkpoint engine's weight sync every step) once per backend per round, the backends alternating so
that drifts in machine load hit both alike. Each run is a fresh process, as a user runs a script: the wall
time includes starting the cluster (Ray or Dask) and building every component. Per step: the time of one
loop iteration (batch, sync, sampling, rewards, forward/backward, optimizer step, metrics), the median over
the steps after the first. Ratio: bridge / Ray (below 1.0: the bridge is faster). Every run's results are
also checked equal to the first Ray run's, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "twinkle_scripts" / "grpo_script.py"


def _run(backend: str, steps: int, assets: pathlib.Path, out: pathlib.Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if backend == "dask":
        env.update({"DASK_TWINKLE_DASK__SIMULATE_GPUS": "true",
                    "DASK_DISTRIBUTED__WORKER__PRELOAD": '["cpu_platform"]'})
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--backend", backend, "--assets", str(assets), "--out", str(out),
         "--steps", str(steps)],
        env=env, capture_output=True, text=True, timeout=1800,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{backend} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result: dict = json.loads(out.read_text())
    return result


def _row(name: str, dask: list[float], ray: list[float], unit: str) -> str:
    d, r = statistics.median(dask), statistics.median(ray)
    return f"| {name} | {d:.2f} {unit} | {r:.2f} {unit} | {d / r:.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="GRPO steps per run (default 6)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per backend (default 2)")
    parser.add_argument("--assets", default=None, help="assets folder (default: a temporary one)")
    args = parser.parse_args()
    if args.steps < 2 or args.rounds < 1:
        raise SystemExit(f"--steps must be >= 2 and --rounds >= 1, got {args.steps} and {args.rounds}")
    with tempfile.TemporaryDirectory(prefix="twinkle-grpo-bench-") as tmp:
        assets = pathlib.Path(args.assets or tmp) / "assets"
        runs: dict[str, list[dict]] = {"dask": [], "ray": []}
        for i in range(args.rounds):
            order = ("ray", "dask") if i % 2 == 0 else ("dask", "ray")
            for backend in order:
                result = _run(backend, args.steps, assets, pathlib.Path(tmp) / f"{backend}-{i}.json")
                runs[backend].append(result)
                print(f"round {i + 1} {backend}: {result['wall_s']} s", file=sys.stderr, flush=True)
    reference = runs["ray"][0]["exact"]
    equal = all(run["exact"] == reference for backend in runs for run in runs[backend])

    def steps_of(backend: str) -> list[float]:
        return [s for run in runs[backend] for s in run["timing"]["step_s"][1:]]

    def first_of(backend: str) -> list[float]:
        return [run["timing"]["step_s"][0] for run in runs[backend]]

    def field(backend: str, key: str) -> list[float]:
        return [run[key] if key in run else run["timing"][key] for run in runs[backend]]

    print(f"GRPO control flow, {args.steps} steps, model group 2 ranks + sampler group 2 ranks (CPU), "
          f"{args.rounds} run(s) per backend; medians")
    print("| | twinkle_dask bridge | Twinkle on Ray | ratio |")
    print("|---|---|---|---|")
    print(_row("whole script (wall)", field("dask", "wall_s"), field("ray", "wall_s"), "s"))
    print(_row("start + build components", field("dask", "setup_s"), field("ray", "setup_s"), "s"))
    print(_row("first step", first_of("dask"), first_of("ray"), "s"))
    print(_row("per step (after the first)", steps_of("dask"), steps_of("ray"), "s"))
    print(f"results equal to Twinkle-on-Ray bit for bit: {'yes' if equal else 'NO'}")
    if not equal:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
