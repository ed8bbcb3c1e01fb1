"""twinkle_dask.bridge: Twinkle's decorated classes (twinkle-kit) on twinkle_dask.

Runs where twinkle-kit is installed (``pip install -e '.[twinkle,test]'``, CI's
twinkle environment); skipped elsewhere. The scripts under tests/bridge/ are plain
Twinkle scripts with the bridge's one added line, run as a user runs them.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

twinkle = pytest.importorskip("twinkle")
torch = pytest.importorskip("torch")

import twinkle_dask.bridge  # noqa: E402
from twinkle_dask.bridge import _probe  # noqa: E402
from twinkle_dask.exceptions import BridgeError, UnsupportedTwinkleError  # noqa: E402
from twinkle_dask.specs import class_spec, method_spec  # noqa: E402

HERE = Path(__file__).parent / "bridge"


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.pop("DASK_TWINKLE_DASK__SIMULATE_GPUS", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(HERE / "script.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=HERE, env=full_env)


def _result(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _ray_actor_draws(seed: int) -> dict:
    """What a fresh Ray actor seeded by Twinkle draws: its __init__, then two draw() calls."""
    from twinkle.utils import framework_util

    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        framework_util.seed_everything(seed, False)
        init = torch.rand(3).tolist()
        draw = float(torch.rand(1)) + random.random() + float(np.random.rand())
        draw2 = float(torch.rand(1)) + random.random() + float(np.random.rand())
        framework_util.seed_everything(seed, False)
        nested = torch.rand(2).tolist()
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
    return {"init": init, "draw": draw, "draw2": draw2, "nested": nested}


# --------------------------------------------------------------------------- install and probe
def test_install_is_idempotent_and_accepts_dask_mode():
    infra = twinkle.infra
    twinkle_dask.bridge.install()
    twinkle_dask.bridge.install()
    assert infra.initialize.__code__.co_names == ("_twinkle_dask_bridge_initialize",)
    assert infra._get_device_mesh_param_name.__twinkle_dask_bridged__ is True
    assert twinkle_dask.bridge.TESTED_VERSIONS == ("0.5.1",)


def test_version_outside_the_series_is_refused(monkeypatch):
    import twinkle.version

    monkeypatch.setattr(twinkle.version, "__version__", "0.4.0")
    with pytest.raises(UnsupportedTwinkleError) as info:
        _probe.probe()
    message = str(info.value)
    assert "twinkle-kit 0.4.0" in message and "tested: 0.5.1" in message
    assert "pip install 'twinkle-dask[twinkle]'" in message


def test_changed_decorator_internals_are_refused(monkeypatch):
    def remote_function(**options):
        def decorate(fn):
            return fn  # keeps no options and no __wrapped__: not what 0.5.x does

        return decorate

    monkeypatch.setattr(twinkle.infra, "remote_function", remote_function)
    with pytest.raises(UnsupportedTwinkleError, match="changed its remote_function wrapper"):
        _probe.probe()


# --------------------------------------------------------------------------- conversion
def test_decorated_class_gets_the_options_twinkle_declared():
    from twinkle import DeviceMesh, remote_class, remote_function

    @remote_class(execute="first")
    class Loader:
        def __init__(self, n: int, device_mesh: DeviceMesh = None):
            self.n = n

        @remote_function(dispatch="slice_dp", collect="mean", sync=True, lazy_collect=False, timeout=12.5)
        def step(self, batch):
            return len(batch)

        @remote_function()
        def plain(self):
            return self.n

    twinkle_dask.bridge.convert(Loader)
    spec = class_spec(Loader)
    assert (spec.execute, spec.mesh_param, spec.mesh_type) == ("first", "device_mesh", twinkle.DeviceMesh)
    step = method_spec(Loader.step)
    assert (step.dispatch, step.execute, step.collect, step.sync, step.lazy_collect, step.timeout) == (
        "slice_dp", "all", "mean", True, False, 12.5)
    plain = method_spec(Loader.plain)
    assert (plain.dispatch, plain.collect, plain.lazy_collect, plain.timeout) == ("slice", "none", None, None)
    # In twinkle's own local mode the class is twinkle-kit's: built and called in-process.
    assert twinkle.infra._mode == "local"
    assert Loader(3).plain() == 3 and Loader(3).step([1, 2]) == 2


def test_remote_build_without_dask_mode_is_an_error():
    from twinkle import remote_class

    @remote_class()
    class Thing:
        def __init__(self, **kwargs):
            pass

    with pytest.raises(BridgeError) as info:
        Thing(remote_group="model")
    message = str(info.value)
    assert "Thing(..., remote_group='model')" in message and "'local' mode" in message
    assert "twinkle.initialize(mode='dask', groups=[...])" in message


def test_unsupported_method_option_names_the_method():
    from twinkle import remote_class, remote_function

    @remote_class()
    class Odd:
        def __init__(self):
            pass

        @remote_function(execute="peer")
        def step(self):
            return 1

    with pytest.raises(BridgeError, match=r"Odd.step is declared with twinkle options"):
        twinkle_dask.bridge.convert(Odd)


# --------------------------------------------------------------------------- scripts on a cluster
@pytest.mark.timeout(300)
def test_twinkle_script_runs_on_the_cluster_with_ray_actor_values():
    out = _result(_run())
    expected = _ray_actor_draws(7)
    assert out["apply"] == [2.0, 4.0, 6.0]
    assert out["draw_lazy_type"] == "LazyResult"
    assert out["draw"] == expected["draw"]  # the mean of two ranks that drew the same numbers
    ranks = out["identity"]
    assert [(r["RANK"], r["WORLD_SIZE"], r["CLUSTER_NAME"], r["TWINKLE_SEED"]) for r in ranks] == [
        ("0", "2", "model", "7"), ("1", "2", "model", "7")]
    assert [r["LOCAL_RANK"] for r in ranks] == ["0", "0"]  # as every Ray actor's, on a CPU group too
    assert all(r["init_draw"] == expected["init"] for r in ranks)
    assert all(r["TOKENIZERS_PARALLELISM"] == "true" for r in ranks)
    assert all(r["dp"] == 2 and r["mesh_type"] == "twinkle.utils.device_mesh" for r in ranks)
    assert out["nested"] == expected["nested"]
    assert out["total"] == 20.0
    assert out["len"] == 5
    assert out["batches"] == [[0, 1], [2, 3], [4]]
    assert out["source_dp"] == 1  # execute='first': a dp=1 twinkle mesh, as Twinkle's Ray mode gives it
    assert out["late"] in (51, "np.int64(51)")  # 3 and 2 items: 30 + 0 + 20 + 1
    assert out["actors"] == 2 and out["handle_is_instance"] is True
    assert "DeviceGroup: model" in out["placement"] and "DeviceMesh: Scaler" in out["placement"]
    assert "DeviceMesh: Source" in out["placement"]
    assert out["twinkle_mode"] == "dask"
    # A lazy result given to a Twinkle object built in the driver arrives as its value, as on Ray.
    assert out["tally"] == ["float64", [expected["draw2"]]]  # collect='mean' gives numpy's float, as Twinkle's


@pytest.mark.timeout(120)
def test_script_without_initialize_fails_loudly():
    proc = _run("no-initialize")
    assert proc.returncode != 0
    assert "BridgeError" in proc.stderr
    assert "twinkle.initialize was not called" in proc.stderr


@pytest.mark.timeout(300)
def test_gpu_groups_need_gpus_or_the_simulate_setting():
    missing = _run(env={"BRIDGE_DEVICE_TYPE": "GPU", "DASK_TWINKLE_DASK__SIMULATE_GPUS": "false"})
    assert missing.returncode != 0
    assert "GPU" in missing.stderr and "simulate" in missing.stderr
    out = _result(_run(env={"BRIDGE_DEVICE_TYPE": "GPU", "DASK_TWINKLE_DASK__SIMULATE_GPUS": "true"}))
    ranks = out["identity"]
    assert [r["LOCAL_RANK"] for r in ranks] == ["0", "0"]  # one GPU per worker, as one per Ray actor
    assert [r["CUDA_VISIBLE_DEVICES"].split(",")[0] for r in ranks] == ["0", "1"]
    assert all(r["init_draw"] == _ray_actor_draws(7)["init"] for r in ranks)


@pytest.fixture
def plain_dask_cluster(tmp_path):
    """A ``dask scheduler`` and three plain ``dask worker``s (no preload): an existing cluster."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path]),
           "DASK_LOGGING__DISTRIBUTED": "warning"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    sched_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(sched_file)], env=env)]
    try:
        from distributed import Client

        client = Client(scheduler_file=str(sched_file), timeout=60, set_as_default=False)
        address = client.scheduler.address
        for i in range(3):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "dask", "worker", address, "--nthreads", "1", "--no-dashboard",
                 "--no-nanny", "--host", "127.0.0.1", "--name", f"plain-{i}"], env=env))
        client.wait_for_workers(3, timeout=90)
        client.close()
        yield address
    finally:
        for proc in reversed(procs):  # workers first, so none waits for a gone scheduler
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.timeout(300)
def test_twinkle_script_on_an_existing_cluster_from_dask_config(plain_dask_cluster):
    # Only Dask's own setting points the script at the cluster; the workers have no preload: the
    # worker plugin that initialize registers installs twinkle's extension and the bridge there.
    out = _result(_run(env={"DASK_SCHEDULER_ADDRESS": plain_dask_cluster}))
    expected = _ray_actor_draws(7)
    assert out["apply"] == [2.0, 4.0, 6.0]
    assert out["draw"] == expected["draw"]
    assert all(r["init_draw"] == expected["init"] for r in out["identity"])
    assert out["batches"] == [[0, 1], [2, 3], [4]]
    assert out["twinkle_mode"] == "dask"
