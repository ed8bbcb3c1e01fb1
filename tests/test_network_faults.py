"""A worker cut off from the network: its calls fail within the configured bound, other groups carry on.

The cut is real: the worker runs in its own Linux network namespace, joined to
this one by a veth pair with addresses in a private range that exist only on
those two interfaces, and the test takes the link down mid-call. It needs root
and ``ip``; without them it is skipped. Everything it creates is removed by
fixture finalizers, also when the test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import dask
import pytest
from components import Echo
from distributed import Client

import twinkle_dask as twinkle
from twinkle_dask import DeviceGroup
from twinkle_dask.exceptions import WorkerLostError
from twinkle_dask.testing import worker_stats

pytestmark = pytest.mark.timeout(120)

IP = shutil.which("ip") or "/usr/sbin/ip"
TESTS = os.path.dirname(os.path.abspath(__file__))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IP, *args], capture_output=True, text=True, check=check, timeout=20)


class Netns:
    """A network namespace linked to this one by a veth pair: ``outer`` here, ``inner`` there."""

    def __init__(self) -> None:
        tag = os.getpid() % 10000
        self.name = f"twinkle-cut-{tag}"
        self.outer_dev, self.inner_dev = f"tdo{tag}", f"tdi{tag}"
        subnet = 10 + tag % 240
        self.outer, self.inner = f"10.213.{subnet}.1", f"10.213.{subnet}.2"

    def create(self) -> None:
        _ip("netns", "add", self.name)
        _ip("link", "add", self.outer_dev, "type", "veth", "peer", "name", self.inner_dev)
        _ip("link", "set", self.inner_dev, "netns", self.name)
        _ip("addr", "add", f"{self.outer}/24", "dev", self.outer_dev)
        _ip("link", "set", self.outer_dev, "up")
        self.run_ip("addr", "add", f"{self.inner}/24", "dev", self.inner_dev)
        self.run_ip("link", "set", self.inner_dev, "up")
        self.run_ip("link", "set", "lo", "up")

    def run_ip(self, *args: str) -> None:
        _ip("netns", "exec", self.name, IP, *args)

    def cut(self) -> None:
        """Take the link down on the namespace's side: nothing crosses it any more."""
        self.run_ip("link", "set", self.inner_dev, "down")

    def restore(self) -> None:
        """Bring the link back up."""
        self.run_ip("link", "set", self.inner_dev, "up")

    def remove(self) -> None:
        _ip("netns", "del", self.name, check=False)  # takes the inner end, and with it the pair
        _ip("link", "del", self.outer_dev, check=False)


def _spawn(argv: list[str], procs: list[subprocess.Popen[bytes]]) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
               DASK_LOGGING__DISTRIBUTED="error")
    procs.append(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True))


def _wait_for_file(path: str, procs: list[subprocess.Popen[bytes]]) -> str:
    deadline = time.monotonic() + 30
    while True:
        try:
            with open(path) as f:
                return str(json.load(f)["address"])
        except (OSError, ValueError, KeyError):
            pass
        assert all(p.poll() is None for p in procs), "the scheduler exited"
        assert time.monotonic() < deadline, "the scheduler did not start"


@pytest.fixture
def split_cluster(tmp_path, request) -> Iterator[Netns]:
    """A scheduler here, a worker of group 'cut' in a namespace and one of group 'ok' here; a session on them.

    Parametrized indirectly with True, the worker in the namespace runs under a nanny.
    """
    nanny = bool(getattr(request, "param", False))
    if os.geteuid() != 0 or not os.path.exists(IP):
        pytest.skip("network namespaces need root and the `ip` command")
    ns = Netns()
    try:
        ns.create()
    except (subprocess.CalledProcessError, OSError) as exc:
        ns.remove()
        pytest.skip(f"cannot create a network namespace here: {getattr(exc, 'stderr', '') or exc}")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        file = str(tmp_path / "scheduler.json")
        _spawn([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", ns.outer, "--port", "0",
                "--no-dashboard", "--scheduler-file", file], procs)
        address = _wait_for_file(file, procs)
        worker = [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-nanny",
                  "--no-dashboard", "--preload", "twinkle_dask.worker"]
        cut_worker = [a for a in worker if not (nanny and a == "--no-nanny")]
        _spawn([IP, "netns", "exec", ns.name, *cut_worker, "--host", ns.inner, "--name", "cut-0",
                "--resources", "twinkle-cut=1"], procs)
        _spawn([*worker, "--host", "127.0.0.1", "--name", "ok-0", "--resources", "twinkle-ok=1"], procs)
        with Client(address, set_as_default=False) as probe:
            probe.wait_for_workers(2, timeout=60)
        twinkle.initialize("dask", address=address, groups=[
            DeviceGroup(name="cut", ranks=1, device_type="cpu"), DeviceGroup(name="ok", ranks=1, device_type="cpu")])
        yield ns
    finally:
        twinkle.shutdown(timeout=10)
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
        ns.remove()


def _sleep_on(cut, address):
    """Start a long call on ``cut``; return it once the worker at ``address`` has received it."""
    before = worker_stats()[address]["calls"]
    running = cut.sleep(60)
    deadline = time.monotonic() + 10
    while worker_stats()[address]["calls"] == before:
        assert time.monotonic() < deadline, "the call did not reach the worker"
    return running


def test_a_worker_cut_off_from_the_network_fails_its_calls_within_the_bound(split_cluster):
    cut = Echo(tag="cut", remote_group="cut")
    ok = Echo(tag="ok", remote_group="ok")
    (address,) = cut._twinkle_ref.addresses
    assert address.startswith(f"tcp://{split_cluster.inner}:")
    with dask.config.set({"twinkle-dask.worker-unresponsive-timeout": "3s"}):
        running = _sleep_on(cut, address)
        split_cluster.cut()
        start = time.monotonic()
        with pytest.raises(WorkerLostError) as info:
            running()
        elapsed = time.monotonic() - start
    assert elapsed < 6, f"took {elapsed:.1f} s"
    err = info.value
    assert (err.group, err.rank, err.component, err.address) == ("cut", 0, "Echo.sleep", address)
    assert "did not answer for 3 s" in str(err)
    assert ok.count() == 1  # the other group carries on
    assert ok.identity()()["tag"] == "ok"  # one rank: its result, unwrapped


@pytest.mark.parametrize("split_cluster", [True], indirect=True)
def test_a_worker_back_on_the_network_is_restarted_by_its_nanny_for_new_components(split_cluster):
    cut = Echo(tag="cut", remote_group="cut")
    (address,) = cut._twinkle_ref.addresses
    with dask.config.set({"twinkle-dask.worker-unresponsive-timeout": "3s"}):
        running = _sleep_on(cut, address)
        split_cluster.cut()
        with pytest.raises(WorkerLostError):
            running()
        split_cluster.restore()
        # still registered with the scheduler, but declared lost: its nanny starts it again under its name
        again = Echo(tag="again", remote_group="cut")
    (new,) = again._twinkle_ref.addresses
    assert new != address and new.startswith(f"tcp://{split_cluster.inner}:")
    assert again.identity()()["tag"] == "again"
    with pytest.raises(WorkerLostError):  # the old component went with the old process
        cut.count()
