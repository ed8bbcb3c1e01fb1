"""Remote errors: the lowest failed rank's error, original types, results and arguments that cannot travel."""

from __future__ import annotations

import collections
import time

import dask
import pytest
from components import Echo
from error_components import Abort, Failer, NoLenLoader, ShardError, nested

import twinkle_dask as twinkle
from twinkle_dask import (
    ConfigurationError,
    ConfigurationTypeError,
    DeviceGroup,
    DeviceMesh,
    RemoteError,
    SerializationError,
    remote_function,
)

pytestmark = pytest.mark.timeout(120)

REPEATS = 30


@pytest.fixture(scope="module")
def failer(cluster):
    return Failer(remote_group="model")


def raised(call, exc_type=Exception):
    """The message of the exception ``call()`` raises."""
    with pytest.raises(exc_type) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize(
    ("failing", "reverse", "expected"),
    [([0, 1, 2, 3], False, "rank 0 failed"), ([0, 1, 2, 3], True, "rank 0 failed"), ([1, 3], False, "rank 1 failed")],
    ids=["all-ranks", "all-ranks-higher-first", "ranks-1-and-3"],
)
def test_eager_call_raises_the_lowest_failed_ranks_error_every_time(failer, failing, reverse, expected):
    seen = collections.Counter(raised(lambda: failer.fail(failing, reverse), ValueError) for _ in range(REPEATS))
    assert seen == {expected: REPEATS}


@pytest.mark.parametrize(("failing", "expected"), [([0, 1, 2, 3], "rank 0 failed"), ([1, 3], "rank 1 failed")])
def test_sync_call_raises_the_lowest_failed_ranks_error_every_time(failer, failing, expected):
    seen = collections.Counter(raised(lambda: failer.fail_sync(failing), ValueError) for _ in range(REPEATS))
    assert seen == {expected: REPEATS}


def test_a_failed_rank_waits_for_lower_ranks_only_boundedly(failer):
    # Rank 0 runs long (as if blocked in a collective that rank 2 never joins): rank 2's error comes
    # after the configured wait, not after rank 0 finishes.
    with dask.config.set({"twinkle-dask.lowest-rank-wait": "0.5s"}):
        start = time.monotonic()
        message = raised(lambda: failer.fail_lazy_lower(0, 2, 4.0), ValueError)
        elapsed = time.monotonic() - start
    assert message == "rank 2 failed"
    assert 0.5 <= elapsed < 3.0


def test_a_lower_rank_that_answers_late_but_fine_does_not_hide_the_error(failer):
    assert raised(lambda: failer.fail_lazy_lower(0, 2, 0.5), ValueError) == "rank 2 failed"


def test_exception_whose_init_takes_other_arguments_keeps_its_type_and_fields(failer):
    with pytest.raises(ShardError) as info:
        failer.raise_kind("shard")()
    assert str(info.value) == "shard 3 is broken: checksum mismatch"
    assert (info.value.shard, info.value.reason) == (3, "checksum mismatch")
    notes = "\n".join(info.value.__notes__)
    assert "raised by Failer.raise_kind on rank 0 of group 'model'" in notes
    assert "raise ShardError(3, \"checksum mismatch\")" in notes  # the remote traceback


@pytest.mark.parametrize(
    ("kind", "exc_type", "check"),
    [
        ("abort", Abort, lambda e: str(e) == "stop the run"),
        ("keyboard", KeyboardInterrupt, lambda e: str(e) == "interrupted in a component"),
        ("exit", SystemExit, lambda e: e.code == 3),
    ],
)
def test_base_exceptions_arrive_typed_and_leave_the_worker_running(failer, kind, exc_type, check):
    pid = failer.ping()()
    with pytest.raises(exc_type) as info:
        failer.raise_kind(kind)()
    assert check(info.value)
    assert any("raised by Failer.raise_kind on rank 0" in n for n in info.value.__notes__)
    assert failer.ping()() == pid  # same worker process, still serving


def test_exception_of_a_module_the_driver_cannot_import_says_why(failer):
    with pytest.raises(RemoteError) as info:
        failer.raise_kind("worker_only")()
    err = info.value
    assert err.type_name.startswith("worker_only_") and err.type_name.endswith(".ThingError")
    assert err.message == "from a worker-only module"
    assert "could not be rebuilt in the driver: module 'worker_only_" in str(err)
    assert "is not importable here" in err.reason
    assert "raise _worker_only_module(twinkle.get_rank()).ThingError" in err.remote_traceback


RESULT_CASES = [
    ("loads_badly", "ValueError: refusing to load: made on the worker"),
    ("worker_only", "ModuleNotFoundError: No module named 'worker_only_"),
]


@pytest.mark.parametrize(("kind", "cause"), RESULT_CASES, ids=[c[0] for c in RESULT_CASES])
@pytest.mark.parametrize("size", [1, 20_000], ids=["inline", "fetched"])
def test_result_the_driver_cannot_load_is_a_serialization_error_lazy_and_eager_alike(failer, kind, cause, size):
    method = failer.result_kind
    eager = raised(lambda: method.options(lazy_collect=False)(kind, size), SerializationError)
    lazy = raised(lambda: method(kind, size)(), SerializationError)
    assert eager == lazy
    assert eager.startswith(
        "the result of Failer.result_kind on rank 0 of group 'model' cannot be deserialized in the driver: " + cause
    )


def test_result_nested_too_deep_is_a_serialization_error_lazy_and_eager_alike(failer):
    method = failer.result_kind
    eager = raised(lambda: method.options(lazy_collect=False)("nested", 100_000), SerializationError)
    lazy = raised(lambda: method("nested", 100_000)(), SerializationError)
    assert eager == lazy
    assert eager.startswith("cannot serialize the result of Failer.result_kind on rank 0: ")
    assert eager.endswith("Fix: it is nested too deep for pickle: pass flatter data (or raise sys.setrecursionlimit).")


def test_argument_nested_too_deep_is_a_serialization_error(failer):
    message = raised(lambda: failer.echo(nested(100_000)), SerializationError)
    assert message.startswith("cannot serialize the arguments of Failer.echo: ")
    assert "nested too deep for pickle" in message


def test_self_referential_arguments_travel_with_their_cycle(failer):
    value: list = [1]
    value.append(value)
    got = failer.echo(value)()
    assert got[0] == 1 and got[1] is got


def test_self_referential_arguments_with_lazy_results_inside(failer):
    lazy = failer.echo([7, 8])
    value: list = [lazy]
    value.append(value)
    got = failer.echo(value)()
    assert got[0] == [7, 8] and got[1] is got
    pair: list = [lazy]
    looped = (pair,)
    pair.append(looped)
    assert "a tuple that contains itself" in raised(lambda: failer.echo(looped), SerializationError)


def test_self_referential_dict_that_slice_dp_would_split_is_a_serialization_error(cluster):
    echo = Echo(device_mesh=DeviceMesh.from_sizes(dp_size=2), remote_group="sampler")
    value: dict = {"ids": [1, 2]}
    value["again"] = value
    message = raised(lambda: echo.describe(value), SerializationError)
    assert message.startswith("the arguments of Echo.describe are nested too deep (or contain themselves) for "
                              "dispatch 'slice_dp' to split them")


def test_lazy_input_a_consumer_cannot_load_is_a_serialization_error_naming_the_producer(failer):
    kept = failer.result_kind("worker_only", 20_000)  # stays on model rank 0; only that worker can load it
    consumer = Echo(remote_group="sampler")
    message = raised(lambda: consumer.recv.options(dispatch="all")(kept)(), SerializationError)
    assert message.startswith("the input produced by Failer.result_kind on rank 0 (")
    assert "cannot be deserialized on worker" in message and "No module named 'worker_only_" in message


def test_iteration_never_asks_for_the_length(cluster, capfd):
    loader = NoLenLoader(3, remote_group="data")
    with dask.config.set({"twinkle-dask.progress": True}):
        assert [batch() for batch in loader] == [[0], [1], [2]]
    err = capfd.readouterr().err
    assert "NoLenLoader batches: 0it [" in err  # a bar that counts batches, without a total


# --------------------------------------------------------------------------- options checked with a session
def test_address_and_client_together_are_rejected(cluster):
    with pytest.raises(ConfigurationError, match="pass address or client, not both"):
        twinkle.initialize("dask", groups=[DeviceGroup(name="g", ranks=1, device_type="cpu")],
                           address="tcp://127.0.0.1:1", client=cluster)


@pytest.mark.parametrize(
    ("options", "exc_type", "message"),
    [
        ({"timeout": "x"}, ConfigurationTypeError, "timeout must be a positive number of seconds or None, got 'x'"),
        ({"timeout": 0}, ConfigurationError, "timeout must be a positive number of seconds or None, got 0"),
        ({"sync": "yes"}, ConfigurationTypeError, "sync must be True or False, got 'yes'"),
        ({"lazy_collect": 1}, ConfigurationTypeError, "lazy_collect must be True, False or None, got 1"),
    ],
)
def test_method_options_are_checked_in_the_decorator_and_in_options(cluster, options, exc_type, message):
    with pytest.raises(exc_type) as info:
        remote_function(**options)
    assert str(info.value) == message
    echo = Echo(remote_group="sampler")
    with pytest.raises(exc_type) as info:
        echo.recv.options(**options)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("timeout", "exc_type", "message"),
    [("x", ConfigurationTypeError, "got 'x'"), (-1, ConfigurationError, "got -1"),
     (float("nan"), ConfigurationError, "got nan")],
)
def test_result_timeout_is_checked(cluster, timeout, exc_type, message):
    lazy = Echo(remote_group="sampler").recv([1, 2])
    for wait in (lazy.result, lazy.per_rank):
        with pytest.raises(exc_type) as info:
            wait(timeout=timeout)
        assert str(info.value).endswith(f"timeout must be None or a number of seconds >= 0, {message}")
    assert lazy.result(timeout=0 if lazy.done() else 30) == [{"args": [[1]], "kwargs": {}},
                                                             {"args": [[2]], "kwargs": {}}]
