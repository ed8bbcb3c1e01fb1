"""Worker loss, recovery and bounded shutdown: no hangs, typed errors, nothing else broken."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import dask
import pytest
from components import Echo, Relay, Rendezvous, Resilient, SlowInit

import twinkle_dask as twinkle
from twinkle_dask import DeviceGroup, close_component, runtime
from twinkle_dask._wire.protocol import Close
from twinkle_dask.exceptions import CallTimeoutError, ConfigurationError, WorkerLostError, WorkerRestartError
from twinkle_dask.testing import local_session, worker_stats

pytestmark = pytest.mark.timeout(120)


def _pids(handle) -> list[int]:
    return [i["pid"] for i in handle.identity()()]


def _until_received(handle, rank: int, calls_before: int) -> None:
    """Wait until the worker of ``rank`` has received a call beyond its first ``calls_before``."""
    address = handle._twinkle_ref.addresses[rank]
    deadline = time.monotonic() + 10
    while worker_stats()[address]["calls"] <= calls_before:  # each poll is a round trip to the workers
        assert time.monotonic() < deadline, f"no call reached {address}"


def _calls(handle, rank: int) -> int:
    return worker_stats()[handle._twinkle_ref.addresses[rank]]["calls"]


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


def test_worker_killed_mid_call_fails_fast_and_names_the_rank():
    with local_session(model=2, other=1):
        echo = Echo(tag="keep", remote_group="model")
        other = Echo(remote_group="other")
        victim = _pids(echo)[1]
        before = _calls(echo, 1)
        running = echo.sleep(30)
        consumer = other.recv.options(dispatch="all")(running)
        _until_received(echo, 1, before)  # rank 1 is running it
        os.kill(victim, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerLostError) as info:
            running()
        assert time.monotonic() - start < 10
        err = info.value
        assert (err.group, err.rank) == ("model", 1) and "Echo.sleep" in str(err)
        with pytest.raises(WorkerLostError):  # the lazy result that depends on it fails too
            consumer.result(timeout=15)
        start = time.monotonic()
        with pytest.raises(WorkerLostError, match="rank 1 of group 'model'"):
            echo.count()  # later calls fail at once
        assert time.monotonic() - start < 1
        assert other.count() == 1  # other components are unaffected


def test_restart_rebuilds_with_the_original_arguments_on_a_new_worker():
    with local_session(model=2):
        echo = Echo(tag="orig", remote_group="model")
        old = _pids(echo)
        os.kill(old[0], signal.SIGKILL)
        _wait_gone(old[0])
        with pytest.raises(WorkerLostError):
            echo.count()
        echo.restart()
        ids = echo.identity()()
        assert [i["tag"] for i in ids] == ["orig", "orig"]
        assert ids[0]["pid"] != old[0] and ids[1]["pid"] == old[1]
        assert echo.count() == 2


def test_max_restarts_rebuilds_automatically_before_the_next_call():
    with local_session(model=2):
        comp = Resilient(tag="auto", remote_group="model")
        victim = _pids(comp)[1]
        before = _calls(comp, 1)
        pending = comp.sleep(30)
        _until_received(comp, 1, before)
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(WorkerLostError):
            pending()
        assert comp.count() == 2  # rebuilt first, then called
        assert [i["tag"] for i in comp.identity()()] == ["auto", "auto"]


def test_shutdown_completes_with_a_hung_worker():
    with local_session(model=2):
        echo = Echo(remote_group="model")
        victim = _pids(echo)[0]
        echo.sleep(1000)  # rank 0's thread is busy for good
        os.kill(victim, signal.SIGSTOP)  # and its process no longer answers at all
        start = time.monotonic()
        twinkle.shutdown(timeout=20)
    assert time.monotonic() - start < 30
    try:
        os.kill(victim, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- replacements, hung workers
def _workers_by_name(client) -> dict[str, str]:
    return client.run_on_scheduler(lambda dask_scheduler: {str(w.name): a for a, w in dask_scheduler.workers.items()})


def _until_replaced(client, name: str, old_address: str) -> str:
    """Wait until a worker named ``name`` joined at an address other than ``old_address``."""
    deadline = time.monotonic() + 30
    while True:
        address = _workers_by_name(client).get(name)
        if address is not None and address != old_address:
            return address
        assert time.monotonic() < deadline, f"worker {name} was not started again"


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("before", ["no component", "closed component", "component that saw the loss"])
def test_new_components_work_on_a_replaced_worker(before):
    with local_session(model=2) as client:
        old = _workers_by_name(client)
        pids = client.run(os.getpid)
        echo = None
        if before != "no component":
            echo = Echo(remote_group="model")
            assert echo.count() == 2
            if before == "closed component":
                close_component(echo)
        os.kill(pids[old["model-1"]], signal.SIGKILL)
        if before == "component that saw the loss":
            with pytest.raises(WorkerLostError):
                echo.count()
        new_address = _until_replaced(client, "model-1", old["model-1"])
        fresh = Echo(tag="fresh", remote_group="model")  # no restart() anywhere
        ids = fresh.identity()()
        assert [i["tag"] for i in ids] == ["fresh", "fresh"]
        assert ids[1]["pid"] != pids[old["model-1"]] and ids[0]["pid"] == pids[old["model-0"]]
        assert fresh._twinkle_ref.addresses == (old["model-0"], new_address)
        assert fresh.count() == 2


def test_worker_death_during_a_rendezvous_fails_every_rank_fast_and_the_group_recovers():
    with local_session(model=2) as client:
        survivor = client.run(os.getpid)[_workers_by_name(client)["model-0"]]
        start = time.monotonic()
        with pytest.raises(WorkerLostError) as info:
            Rendezvous(die_rank=1, remote_group="model")  # rank 0 sits in init_process_group
        elapsed = time.monotonic() - start
        assert elapsed < 10, f"took {elapsed:.1f} s"
        assert (info.value.group, info.value.rank, info.value.component) == ("model", 1, "Rendezvous.__init__")
        # rank 0's worker, stuck in the rendezvous, was restarted: a new process under the same name
        assert survivor not in client.run(os.getpid).values()
        again = Rendezvous(remote_group="model")  # both ranks are fresh processes: the rendezvous completes
        assert again.all_reduce(1.5)() == [3.0, 3.0]


def test_a_failed_construction_leaves_alone_a_rank_that_only_waited_its_turn():
    with local_session(model=2) as client:
        busy = Echo(tag="busy", remote_group="model")
        address = busy._twinkle_ref.addresses[0]
        pid = client.run(os.getpid)[address]
        before = _calls(busy, 0)
        running = busy.sleep.options(execute="first")(5)  # rank 0's worker is busy with this call
        _until_received(busy, 0, before)
        start = time.monotonic()
        with pytest.raises(WorkerLostError) as info:
            Rendezvous(die_rank=1, remote_group="model")  # rank 0's __init__ is queued behind the call
        assert time.monotonic() - start < 5
        assert info.value.rank == 1
        assert running() == 5  # the call finished: its worker was not restarted
        assert client.run(os.getpid)[address] == pid


def test_a_stopped_worker_fails_a_waiting_call_within_the_configured_bound():
    with local_session(model=2, other=1), dask.config.set({"twinkle-dask.worker-unresponsive-timeout": "3s"}):
        echo = Echo(remote_group="model")
        other = Echo(remote_group="other")
        victim = _pids(echo)[1]
        try:
            running = echo.sleep(0.5)
            os.kill(victim, signal.SIGSTOP)
            start = time.monotonic()
            with pytest.raises(WorkerLostError) as info:
                running()  # no timeout= given
            elapsed = time.monotonic() - start
            assert 2.5 < elapsed < 6, f"took {elapsed:.1f} s"
            err = info.value
            assert (err.group, err.rank, err.component) == ("model", 1, "Echo.sleep")
            assert "did not answer for 3 s" in str(err)
            assert other.count() == 1  # other groups carry on
        finally:
            _kill_quietly(victim)


def _set_unresponsive_timeout(value):
    dask.config.set({"twinkle-dask.worker-unresponsive-timeout": value})


def _relay_and_peer(client, unresponsive_timeout):
    """A Relay on group 'model' that has called an Echo on group 'other' (its peer), with the relay's worker
    declaring peers lost after ``unresponsive_timeout``; returns them and the peer's pid."""
    relay = Relay(remote_group="model")
    target = Echo(remote_group="other")
    assert relay.call(target, "count")() == 1
    client.run(_set_unresponsive_timeout, unresponsive_timeout, workers=list(relay._twinkle_ref.addresses))
    victim = target.identity()()["pid"]  # one rank: its result, unwrapped
    return relay, target, victim


def test_a_component_calling_a_stopped_worker_gets_the_same_bound():
    with local_session(model=1, other=1) as client:
        relay, target, victim = _relay_and_peer(client, "3s")
        os.kill(victim, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(WorkerLostError) as info:
                relay.call(target, "count")()  # the relay's worker waits on the stopped one
            elapsed = time.monotonic() - start
            assert 2.5 < elapsed < 6, f"took {elapsed:.1f} s"
            assert (info.value.group, info.value.rank, info.value.component) == ("other", 0, "Echo.count")
            assert "did not answer for 3 s" in str(info.value)
        finally:
            _kill_quietly(victim)


def test_a_component_calls_a_peer_again_once_it_is_back_after_the_bound():
    # A peer that was cut off for a while (here: stopped, then continued) and is still registered:
    # the calling worker declared it lost, and after the same bound it connects to it anew.
    with local_session(model=1, other=1) as client:
        relay, target, victim = _relay_and_peer(client, "2s")
        os.kill(victim, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(WorkerLostError):
                relay.call(target, "count")()
        finally:
            os.kill(victim, signal.SIGCONT)
        with pytest.raises(WorkerLostError):  # at once, within the bound: the peer counts as lost
            relay.call(target, "count")()
        deadline = time.monotonic() + 20
        while True:
            try:
                count = relay.call(target, "count")()
                break
            except WorkerLostError:
                assert time.monotonic() < deadline, "the relay never called its peer again"
        # Declared lost while the call was outstanding (so after `started`), and called again no
        # sooner than the 2 s bound after that. (The driver hears of the loss a little after the
        # worker declared it, so the bound is measured from when the call went out.)
        assert time.monotonic() - started >= 2.0
        assert count == 1
        assert relay.call(target, "identity")()["pid"] == victim  # the same process, continued, not a new one


def test_a_stopped_worker_fails_a_construction_within_the_configured_bound():
    with local_session(model=2) as client, dask.config.set({"twinkle-dask.worker-unresponsive-timeout": "3s"}):
        names = _workers_by_name(client)
        victim = client.run(os.getpid)[names["model-1"]]
        os.kill(victim, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(WorkerLostError) as info:
                Echo(remote_group="model")
            elapsed = time.monotonic() - start
            assert 2.5 < elapsed < 8, f"took {elapsed:.1f} s"
            err = info.value
            assert (err.group, err.rank, err.component) == ("model", 1, "Echo.__init__")
            assert "did not answer for 3 s" in str(err)
            # The hung worker is still registered with the scheduler; building on its group again
            # has the local cluster start it anew.
            again = Echo(remote_group="model")
            assert again.count() == 2
            assert again._twinkle_ref.addresses[1] != names["model-1"]
            assert victim not in _pids(again)
        finally:
            _kill_quietly(victim)


async def _remove_worker(dask_scheduler, address):
    await dask_scheduler.remove_worker(address, stimulus_id="test", close=False)


def test_the_scheduler_removing_a_worker_fails_its_waiting_calls_at_once():
    with local_session(model=2) as client, dask.config.set({"twinkle-dask.worker-unresponsive-timeout": "60s"}):
        echo = Echo(remote_group="model")
        address = echo._twinkle_ref.addresses[1]
        victim = _pids(echo)[1]
        try:
            before = _calls(echo, 1)
            running = echo.sleep(30)
            _until_received(echo, 1, before)
            os.kill(victim, signal.SIGSTOP)  # hung: only the scheduler's word can end the wait
            start = time.monotonic()
            client.run_on_scheduler(_remove_worker, address=address)
            with pytest.raises(WorkerLostError, match="the scheduler removed the worker") as info:
                running()
            assert time.monotonic() - start < 3
            assert (info.value.group, info.value.rank) == ("model", 1)
        finally:
            _kill_quietly(victim)


def test_constructor_timeout_names_the_ranks_and_frees_the_workers():
    with local_session(model=2) as client:
        pids = set(client.run(os.getpid).values())
        start = time.monotonic()
        with pytest.raises(CallTimeoutError) as info:
            SlowInit(600, remote_group="model", timeout=2)
        assert time.monotonic() - start < 15
        err = info.value
        assert (err.component, err.method, err.pending_ranks, err.timeout) == ("SlowInit", "__init__", (0, 1), 2.0)
        quick = SlowInit(0, remote_group="model", timeout=30)  # timeout never reaches __init__
        assert set(quick.pid()()).isdisjoint(pids)  # the stuck workers were restarted


@pytest.mark.parametrize("bad", [0, -1, "soon", True])
def test_constructor_timeout_is_validated(bad):
    with local_session(model=1):
        with pytest.raises(ConfigurationError, match=rf"timeout must be None or a number of seconds > 0, got {bad!r}"):
            Echo(remote_group="model", timeout=bad)


def test_unresponsive_timeout_is_validated():
    with local_session(model=1), dask.config.set({"twinkle-dask.worker-unresponsive-timeout": "forever"}):
        with pytest.raises(ConfigurationError, match="worker-unresponsive-timeout"):
            Echo(remote_group="model")


def test_the_close_reply_says_whether_the_component_is_still_running():
    with local_session(model=1):
        caller = runtime.process_session().caller
        idle, busy = Echo(remote_group="model"), Echo(remote_group="model")
        before = _calls(busy, 0)
        busy.sleep(30)
        _until_received(busy, 0, before)
        replies = [caller.request_threadsafe(h._twinkle_ref.addresses[0], Close(h._twinkle_ref.cid)).result(10)
                   for h in (idle, busy)]
        assert [(r.ok, r.running) for r in replies] == [(True, False), (True, True)]


# --------------------------------------------------------------------------- existing clusters
def test_restart_workers_on_an_existing_cluster_goes_through_the_nanny():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        client = twinkle.initialize("dask", address=cluster.scheduler_address,
                                    groups=[DeviceGroup(name="g", ranks=2, device_type="cpu")])
        try:
            echo = Echo(remote_group="g")
            old = _pids(echo)
            address = echo._twinkle_ref.addresses[1]
            runtime.process_session().restart_workers([address])
            with pytest.raises(WorkerLostError):
                echo.count()  # its rank 1 went with the worker
            fresh = Echo(remote_group="g")  # the worker came back under its name: found again, tagged again
            assert fresh._twinkle_ref.addresses[1] != address
            pids = _pids(fresh)
            assert pids[0] == old[0] and pids[1] != old[1]
            info = client.scheduler_info(n_workers=-1)["workers"]
            assert all(info[a]["resources"].get("twinkle-g") == 1 for a in fresh._twinkle_ref.addresses)
        finally:
            twinkle.shutdown()


def test_restart_workers_without_a_nanny_is_a_typed_error():
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        twinkle.initialize("dask", address=cluster.scheduler_address,
                           groups=[DeviceGroup(name="g", ranks=1, device_type="cpu")])
        try:
            (address,) = runtime.process_session().placement("g").addresses
            with pytest.raises(WorkerRestartError, match="nanny") as info:
                runtime.process_session().restart_workers([address])
            assert info.value.addresses == (address,)
        finally:
            twinkle.shutdown()


# --------------------------------------------------------------------------- Ctrl-C
_DRIVER = """
import os, sys, time
sys.path.insert(0, {tests!r})
from components import Echo
from twinkle_dask.testing import local_session

with local_session(model=2):
    echo = Echo(tag="kept", remote_group="model")
    print("pids", *[i["pid"] for i in echo.identity()()], flush=True)
    if {die!r}:
        os.kill(os.getpid(), 9)  # the driver goes away without shutting down
    try:
        print("ready", flush=True)
        echo.sleep(3)()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    print("count", echo.count(), flush=True)
    print("tags", ",".join(i["tag"] for i in echo.identity()()), flush=True)
"""


def _driver(die: bool) -> subprocess.Popen[str]:
    script = _DRIVER.format(tests=os.path.dirname(__file__), die=die)
    # Its own process group, as a terminal's foreground job is.
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _until_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 30
    while True:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return
        assert time.monotonic() < deadline, f"worker processes {alive} outlived their driver"


def test_ctrl_c_reaches_the_driver_only():
    proc = _driver(die=False)
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()[1:]]
        assert proc.stdout.readline().strip() == "ready"
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C: the whole process group
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert out.split("\n")[:3] == ["interrupted", "count 2", "tags kept,kept"], err
    assert proc.returncode == 0, err
    _until_gone(pids)


def test_workers_exit_when_their_driver_is_killed():
    proc = _driver(die=True)
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()[1:]]
        assert len(pids) == 2
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    _until_gone(pids)
