"""The driver of ci/slurm.sh: twinkle_dask on workers that Slurm started through dask-jobqueue.

ci/slurm.sh runs a one-node Slurm (``SLURM_CONF`` points at it). This script:

1. starts a ``SLURMCluster`` whose jobs run ``dask worker --nthreads 1 --preload twinkle_dask.worker``,
   scales it to five jobs and runs the main job (``python -m twinkle_dask.examples.train``, the
   training of ci/train.sh) on them: a ``data`` group of one rank and a ``model`` group of four;
2. on the same workers (now tagged ``twinkle-data`` / ``twinkle-model``), hands a lazy result from
   the data group to the model group, each model rank fetching only its own shard;
3. cancels the job of one model worker with ``scancel`` while its rank runs a call: the call
   fails with ``WorkerLostError``; ``cluster.scale(5)`` submits a replacement job under the
   same worker name and the model group works again once it has joined;
4. a second cluster whose jobs carry the tag on their command line
   (``--resources twinkle-<group>=1``), as docs/clusters.md shows.

It prints the times it measures. The jobs are cancelled and the clusters closed at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
MIB = 1 << 20


def log(msg: str) -> None:
    print(f"[slurm] {msg}", flush=True)


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def slurm_cluster(extra: list[str]) -> Any:
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(
        queue="debug", cores=1, processes=1, memory="2GB", walltime="00:30:00",
        python=sys.executable,  # the driver's environment, which has twinkle-dask
        job_script_prologue=[f"export PYTHONPATH={HERE}"],  # the components of ci/multihost_components.py
        worker_extra_args=["--nthreads", "1", "--preload", "twinkle_dask.worker", *extra],
        scheduler_options={"host": "127.0.0.1", "dashboard_address": None},
    )


def jobs() -> list[str]:
    """The ids of the running jobs."""
    out = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i"], capture_output=True, text=True, check=True)
    return sorted(out.stdout.split(), key=int)


def main() -> None:
    import dask
    from distributed import Client

    dask.config.set({"distributed.deploy.lost-worker-timeout": "2s"})

    import twinkle_dask as twinkle
    from twinkle_dask import DeviceGroup, DeviceMesh
    from twinkle_dask.examples import train
    from twinkle_dask.exceptions import WorkerLostError
    from twinkle_dask.testing import worker_stats

    times: dict[str, float] = {}
    t = time.perf_counter()
    cluster = slurm_cluster([])
    try:
        print(cluster.job_script(), flush=True)
        cluster.scale(5)
        client = Client(cluster)
        client.wait_for_workers(5, timeout=120)
        times["jobs"] = time.perf_counter() - t
        log(f"SLURMCluster + 5 worker jobs running and joined: {times['jobs']:.2f} s; jobs {jobs()}")
        info = client.scheduler_info(n_workers=-1)["workers"]
        names = sorted(str(w["name"]) for w in info.values())
        assert names == [f"SLURMCluster-{i}" for i in range(5)], names

        # 1. the main job, as ci/train.sh runs it, on the Slurm workers
        t = time.perf_counter()
        losses = train.run(["--address", cluster.scheduler_address, "--steps", "30", "--no-dashboard"])
        times["train"] = time.perf_counter() - t
        k = len(losses) // 10
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        assert last < 0.6 * first, (first, last)
        log(f"main job on Slurm workers: 30 steps in {times['train']:.2f} s, loss {first:.3f} -> {last:.3f}")
        tags = {str(w["name"]): sorted(w["resources"]) for w in client.scheduler_info(n_workers=-1)["workers"].values()}
        assert tags == {"SLURMCluster-0": ["twinkle-data"], **{f"SLURMCluster-{i}": ["twinkle-model"]
                                                              for i in range(1, 5)}}, tags

        # 2. a lazy hand-off between the two groups on the same (now tagged) workers
        t = time.perf_counter()
        twinkle.initialize("dask", client=client, groups=[DeviceGroup(name="data", ranks=1, device_type="cpu"),
                                                          DeviceGroup(name="model", ranks=4, device_type="cpu")])
        times["init"] = time.perf_counter() - t
        from multihost_components import Node

        data = Node(remote_group="data")
        model = Node(DeviceMesh.from_sizes(dp_size=4), remote_group="model")
        lazy = data.blocks(4 * MIB, 4)  # four 4 MiB arrays on the data rank; model rank k needs array k
        wait_until(lazy.done, 30, "the data rank's blocks")
        before = {a: s["fetch_bytes"] for a, s in worker_stats().items()}
        t = time.perf_counter()
        got = model.summary(lazy)()
        times["handoff"] = time.perf_counter() - t
        after = {a: s["fetch_bytes"] for a, s in worker_stats().items()}
        assert got == [{"rank": r, "shards": [("ndarray", MIB // 2, float(r), float(r))]} for r in range(4)], got
        (data_addr,) = twinkle.group._state(data).addresses
        served = after[data_addr] - before[data_addr]
        log(f"lazy hand-off data -> model (4 x 4 MiB, one array per model rank): {times['handoff'] * 1000:.0f} ms; "
            f"the data worker served {served / MIB:.2f} MiB")
        assert 16 * MIB <= served < 16 * MIB + 256 * 1024, served

        # 3. scancel a model worker's job mid-call; a replacement job under the same name recovers the group
        model_addrs = list(twinkle.group._state(model).addresses)
        victim_addr = model_addrs[2]
        victim = str(client.scheduler_info(n_workers=-1)["workers"][victim_addr]["name"])
        calls = worker_stats()[victim_addr]["calls"]
        running = model.sleep(10)  # the other ranks are free again before the replacement joins
        wait_until(lambda: worker_stats()[victim_addr]["calls"] > calls, 20, "the call to start")
        job = str(cluster.workers[victim].job_id)
        subprocess.run(["scancel", job], check=True)
        t = time.perf_counter()
        try:
            running()
            raise AssertionError("a call on a cancelled job returned")
        except WorkerLostError as exc:
            times["scancel"] = time.perf_counter() - t
            log(f"scancel {job} ({victim}) mid-call: {type(exc).__name__} after {times['scancel']:.2f} s: "
                f"{str(exc).splitlines()[0]}")
            assert exc.group == "model" and exc.rank == 2 and exc.address == victim_addr, exc
        assert data.count() == 1  # the other group carries on
        t = time.perf_counter()
        # dask-jobqueue forgets a job whose worker left after distributed.deploy.lost-worker-timeout
        # (2 s here, set below); scale() then submits a job for the worker name it lost
        wait_until(lambda: victim not in cluster.workers, 60, "the cluster to forget the cancelled job")
        forgot = time.perf_counter() - t
        cluster.scale(5)
        wait_until(lambda: victim in {str(w["name"]) for w in client.scheduler_info(n_workers=-1)["workers"].values()},
                   90, "the replacement job's worker to join")
        joined = time.perf_counter() - t
        log(f"the cluster forgot the cancelled job after {forgot:.2f} s; the replacement job "
            f"{cluster.workers[victim].job_id}'s worker joined after {joined:.2f} s")
        model2 = Node(DeviceMesh.from_sizes(dp_size=4), remote_group="model")
        assert model2.scale(list(range(8)), 5)() == [[0, 5], [10, 15], [20, 25], [30, 35]]
        times["recover"] = time.perf_counter() - t
        new_addr = list(twinkle.group._state(model2).addresses)[2]
        assert new_addr != victim_addr
        assert str(client.scheduler_info(n_workers=-1)["workers"][new_addr]["name"]) == victim
        log(f"replacement job for {victim} joined and a new model component answered after "
            f"{times['recover']:.2f} s; jobs now {jobs()}")
        twinkle.shutdown()
        client.close()
    finally:
        twinkle.shutdown()
        cluster.close()

    # 4. workers tagged on their command line: one cluster per group when each group has its own jobs
    t = time.perf_counter()
    tagged = slurm_cluster(["--resources", "twinkle-model=1"])
    try:
        tagged.scale(2)
        client = Client(tagged)
        client.wait_for_workers(2, timeout=120)
        twinkle.initialize("dask", client=client, groups=[DeviceGroup(name="model", ranks=2, device_type="cpu")])
        from multihost_components import Node

        node = Node(remote_group="model")
        assert node.scale([1, 2, 3, 4], 2)() == [[2, 4], [6, 8]]
        times["tagged"] = time.perf_counter() - t
        log(f"SLURMCluster with --resources twinkle-model=1: 2 jobs, initialize and a call in {times['tagged']:.2f} s")
        twinkle.shutdown()
        client.close()
    finally:
        twinkle.shutdown()
        tagged.close()
    # 5. the GPU variant of docs/clusters.md: its job script (not submitted: this machine has no GPU)
    from dask_jobqueue import SLURMCluster

    with SLURMCluster(queue="gpu", cores=4, processes=4, memory="64GB", walltime="04:00:00",
                      job_extra_directives=["--gres=gpu:4"], worker_command="dask cuda worker",
                      worker_extra_args=["--nthreads", "1", "--preload", "twinkle_dask.worker"],
                      scheduler_options={"host": "127.0.0.1", "dashboard_address": None}) as gpu:
        script = gpu.job_script()
    command = script.strip().splitlines()[-1]
    log(f"GPU job script ends with: {command}")
    assert "#SBATCH --gres=gpu:4" in script and " -m dask cuda worker tcp://" in command, script
    assert "--preload twinkle_dask.worker" in command and "--nworkers" not in command, command
    log("times: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))


if __name__ == "__main__":
    main()
