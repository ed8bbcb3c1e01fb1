"""initialize / shutdown, local mode, placement, notifier, and scripts without a main guard."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from components import Broken, Echo, Loader

import twinkle_dask as twinkle
from twinkle_dask import DeviceGroup, DeviceMesh, LazyResult
from twinkle_dask.exceptions import ComponentClosedError, ConfigurationError, ConfigurationTypeError
from twinkle_dask.testing import local_session

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _no_session_leaks():
    yield
    twinkle.shutdown()


@pytest.mark.parametrize(("mode", "hint"), [("ray", "use mode='dask'"), ("spark", "valid modes are")])
def test_unknown_mode_lists_the_valid_ones(mode, hint):
    with pytest.raises(ValueError, match=rf"unknown mode '{mode}'.*{hint}"):
        twinkle.initialize(mode, groups=[DeviceGroup(name="g", ranks=1, device_type="cpu")])


def test_dask_mode_needs_groups():
    with pytest.raises(ConfigurationError, match="needs groups"):
        twinkle.initialize("dask")


def test_initialize_returns_the_client_and_a_second_call_needs_shutdown():
    client = twinkle.initialize(
        "dask", groups=[DeviceGroup(name="a", ranks=1, device_type="cpu")], dashboard_address="127.0.0.1:0"
    )
    assert client.dashboard_link.startswith("http://127.0.0.1:")
    assert len(client.scheduler_info(n_workers=-1)["workers"]) == 1
    assert twinkle.initialize("dask", groups=[DeviceGroup(name="a", ranks=1, device_type="cpu")]) is client
    with pytest.raises(ConfigurationError, match="shutdown"):
        twinkle.initialize("dask", groups=[DeviceGroup(name="b", ranks=2, device_type="cpu")])
    twinkle.shutdown()
    twinkle.shutdown()  # idempotent
    with local_session(b=2) as second:
        assert second is not client
        assert len(second.scheduler_info(n_workers=-1)["workers"]) == 2


def test_workers_are_tagged_with_their_group():
    with local_session(data=1, model=2) as client:
        info = client.scheduler_info(n_workers=-1)["workers"].values()
        tags = sorted((str(w["name"]), tuple(sorted(w["resources"]))) for w in info)
        assert tags == [("data-0", ("twinkle-data",)), ("model-0", ("twinkle-model",)), ("model-1", ("twinkle-model",))]
        # a user's own task can target a group through its tag
        assert client.submit(lambda: 1, resources={"twinkle-model": 1}).result() == 1


def test_calls_after_shutdown_raise():
    with local_session(g=1):
        echo = Echo(remote_group="g")
        pending = echo.produce("scalar")
    with pytest.raises(ComponentClosedError, match="shut down"):
        echo.count()
    assert isinstance(pending, LazyResult)


def test_local_mode_builds_plain_objects_and_calls_plain_methods():
    twinkle.initialize("local")
    echo = Echo(tag="x", remote_group="whatever")
    assert type(echo) is Echo
    assert echo.remote_group == "whatever" and echo.tag == "x"
    assert echo.recv([1, 2], k=3) == {"args": [[1, 2]], "kwargs": {"k": 3}}
    assert echo.local_only() == "never remote"
    assert len(Loader(n_batches=2)) == 2
    assert list(Loader(n_batches=2, batch=1)) == [[0], [1]]


def test_without_initialize_classes_are_built_in_process():
    echo = Echo(remote_group="model")
    assert type(echo) is Echo and echo.count() == 1


def test_without_remote_group_dask_mode_builds_in_process():
    with local_session(g=1):
        echo = Echo(tag="here")
        assert type(echo) is Echo and echo.tag == "here"


def test_global_mesh_fills_the_annotated_parameter():
    mesh = DeviceMesh.from_sizes(dp_size=2)
    with local_session(pair=2, global_device_mesh=mesh):
        echo = Echo(remote_group="pair")
        assert echo.device_mesh == mesh
        assert all(i["has_mesh"] for i in echo.identity()())


def test_notifier_gets_one_message_per_failed_call():
    messages = []
    with local_session(pair=2, notifier=messages.append, name="run1"):
        echo = Echo(remote_group="pair")
        with pytest.raises(KeyError):
            echo.fail_on(1)()
        deadline = time.monotonic() + 10
        while not messages and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(messages) == 1
    assert messages[0].startswith("[run1] Echo.fail_on failed on rank(s) [1]: builtins.KeyError")


def test_device_placement_pictures_groups_and_meshes():
    with local_session(data=1, model=4):
        Echo(device_mesh=DeviceMesh.from_sizes(dp_size=2, tp_size=2), remote_group="model")
        text = twinkle.get_device_placement()
    assert "DeviceGroup: data" in text and "DeviceGroup: model" in text
    assert "DeviceMesh: Echo" in text and "dp=2 × tp=2" in text and "DP=2, TP=2" in text
    assert "<code>model</code>" in text._repr_html_()


SCRIPT = """
import twinkle_dask as twinkle
from twinkle_dask import DeviceGroup, remote_class, remote_function

@remote_class()
class Doubler:
    @remote_function(dispatch='slice', collect='flatten')
    def double(self, xs):
        return [2 * x for x in xs]

twinkle.initialize('dask', groups=[DeviceGroup(name='default', ranks=2, device_type='cpu')], dashboard_address=None)
d = Doubler(remote_group='default')
print('RESULT', d.double([1, 2, 3])())
"""


def test_a_script_without_main_guard_runs(tmp_path):
    script = tmp_path / "no_guard.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "RESULT [2, 4, 6]" in proc.stdout


def test_local_mode_gives_annotated_mesh_parameters_a_dp_mesh_as_twinkle_does(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    twinkle.initialize("local")
    echo = Echo()
    assert echo.mesh == DeviceMesh(mesh=np.arange(1), mesh_dim_names=("dp",))
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun
    twinkle.initialize("local")
    assert Echo().mesh == DeviceMesh(mesh=np.arange(2), mesh_dim_names=("dp",))
    mesh = DeviceMesh.from_sizes(dp_size=2)
    twinkle.initialize("local", global_device_mesh=mesh)
    assert Echo().mesh == mesh


def test_notifier_hears_of_failed_constructions():
    messages = []
    with local_session(pair=2, notifier=messages.append):
        with pytest.raises(ValueError):
            Broken(fail_rank=0, remote_group="pair")
        deadline = time.monotonic() + 10
        while not messages and time.monotonic() < deadline:
            time.sleep(0.01)
    assert messages and messages[0].startswith("Broken.__init__ failed on group 'pair': ValueError")


def test_processes_false_goes_only_with_a_local_cluster():
    with pytest.raises(ConfigurationError) as info:
        twinkle.initialize("dask", address="tcp://127.0.0.1:8786", processes=False,
                           groups=[DeviceGroup(name="g", ranks=1, device_type="cpu")])
    assert str(info.value) == (
        "initialize: processes=False starts a local cluster in this process, so it does not go with "
        "address='tcp://127.0.0.1:8786' or client=None; drop processes=False to use that cluster, or drop "
        "address/client to start an in-process one"
    )
    assert twinkle.runtime.process_session() is None


def test_processes_must_be_a_bool():
    with pytest.raises(ConfigurationTypeError, match=r"initialize: processes must be True or False, got 'no'"):
        twinkle.initialize("dask", processes="no", groups=[DeviceGroup(name="g", ranks=1, device_type="cpu")])


def test_in_process_gpu_groups_need_simulate_gpus():
    expected = (r"DeviceGroup 'gpu' is a GPU group, and in-process workers \(processes=False\) share one CUDA "
                r"context; pass simulate_gpus=True")
    with pytest.raises(ConfigurationError, match=expected):
        twinkle.initialize("dask", processes=False, dashboard_address=None,
                           groups=[DeviceGroup(name="gpu", ranks=1, device_type="cuda")])
    assert twinkle.runtime.process_session() is None
