"""initialize(address=...) against a scheduler and workers started from the ``dask`` command line."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
from components import Echo

import twinkle_dask as twinkle
from twinkle_dask import DeviceGroup
from twinkle_dask.exceptions import ConfigurationError

pytestmark = pytest.mark.timeout(180)

TESTS = pathlib.Path(__file__).resolve().parent


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), *sys.path])
    env["DASK_LOGGING__DISTRIBUTED"] = "warning"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(extra)
    return env


def _scheduler_address(sched_file, timeout: float) -> str:
    """The address in the scheduler file, once the scheduler has written all of it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return json.loads(sched_file.read_text())["address"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="module")
def cli_cluster(tmp_path_factory):
    """A `dask scheduler` and five `dask worker`s: one tagged for 'data', two fake GPU workers, two plain."""
    tmp = tmp_path_factory.mktemp("cli")
    sched_file = tmp / "scheduler.json"
    procs = [subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(sched_file)], env=_env())]
    try:
        address = _scheduler_address(sched_file, timeout=60)
        workers = [
            (["--name", "tagged", "--resources", "twinkle-data=1", "--preload", "twinkle_dask.worker"], {}),
            (["--name", "gpu-a"], {"CUDA_VISIBLE_DEVICES": "0,1"}),
            (["--name", "gpu-b"], {"CUDA_VISIBLE_DEVICES": "1,0"}),
            (["--name", "plain-0"], {}),
            (["--name", "plain-1"], {}),
        ]
        for args, env in workers:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "dask", "worker", address, "--nthreads", "1", "--no-dashboard",
                 "--no-nanny", "--host", "127.0.0.1", *args], env=_env(**env)))
        yield address
    finally:
        workers, scheduler = procs[1:], procs[0]
        for group in (workers, [scheduler]):  # workers first, so none waits for a gone scheduler
            for proc in group:
                proc.terminate()
            for proc in group:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _wait_for_workers(address: str, n: int) -> None:
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        client.wait_for_workers(n, timeout=90)


def _names(client) -> dict[str, str]:
    return {a: str(w["name"]) for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}


def test_groups_map_onto_tagged_gpu_and_plain_workers(cli_cluster):
    _wait_for_workers(cli_cluster, 5)
    groups = [
        DeviceGroup(name="data", ranks=1, device_type="cpu"),
        DeviceGroup(name="gpu", ranks=[1], device_type="cuda"),
        DeviceGroup(name="model", ranks=2, device_type="cpu"),
    ]
    client = twinkle.initialize("dask", address=cli_cluster, groups=groups)
    try:
        names = _names(client)
        placed = {g: [names[a] for a in twinkle.group._state(Echo(remote_group=g)).addresses] for g in
                  ("data", "gpu", "model")}
        assert placed == {"data": ["tagged"], "gpu": ["gpu-b"], "model": ["plain-0", "plain-1"]}
        echo = Echo(remote_group="model")
        assert echo.recv([1, 2, 3])().__len__() == 2
        tags = {str(w["name"]): sorted(w["resources"]) for w in client.scheduler_info(n_workers=-1)["workers"].values()}
        assert tags["plain-0"] == ["twinkle-model"] and tags["gpu-b"] == ["twinkle-gpu"]
    finally:
        twinkle.shutdown()
    # the cluster is not ours: it keeps running after shutdown, tags and all
    twinkle.initialize("dask", address=cli_cluster, groups=[DeviceGroup(name="model", ranks=2, device_type="cpu")])
    try:
        assert Echo(remote_group="model").count() == 2
    finally:
        twinkle.shutdown()


def test_too_few_workers_is_a_clear_error(cli_cluster):
    _wait_for_workers(cli_cluster, 5)
    with pytest.raises(ConfigurationError, match="needs 9 worker"):
        twinkle.initialize("dask", address=cli_cluster, groups=[DeviceGroup(name="huge", ranks=9, device_type="cpu")])
    twinkle.shutdown()
