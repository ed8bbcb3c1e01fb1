"""pytest fixtures for testing components against a real local cluster.

Installed with twinkle-dask (entry point ``pytest11``), nothing to configure::

    import pytest

    @pytest.mark.twinkle(model=4, data=1)
    def test_forward(twinkle_client):
        model = Model(remote_group="model")
        assert model.forward([1, 2, 3, 4])() == [2, 4, 6, 8]

    def test_other(twinkle_session):
        with twinkle_session(model=2):          # or start one explicitly
            ...

``@pytest.mark.twinkle(*groups, **cpu_groups)`` names CPU groups
(``name=ranks``), takes other groups as ``DeviceGroup`` arguments and, as
keywords that are not ints, options of ``initialize``. ``processes=False``
runs the workers in the test process over ``inproc://`` comms (starts in
tens of milliseconds); with ``simulate_gpus=True`` GPU groups run there as
CPU workers, each worker's component code seeing its own rotated
``CUDA_VISIBLE_DEVICES`` as under dask-cuda::

    @pytest.mark.twinkle(DeviceGroup(name="model", ranks=4, device_type="cuda"),
                         data=1, processes=False, simulate_gpus=True)
    def test_placement(twinkle_client):
        ...

Tests of one module that
ask for the same groups share one cluster; it is shut down when the groups
change and at the end of the module, so each group of tests pays the start-up
once. Between tests it is parked: a test in between may call
``twinkle_dask.initialize(...)`` itself.
This module imports nothing heavy until a fixture is used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

__all__ = ["twinkle_client", "twinkle_session"]


class _Shared:
    """The one local session the fixtures keep between tests.

    It is the process's session only while a test that asked for it runs;
    between tests it is parked, so another test may call ``initialize()``
    itself (on another cluster, or with ``client=``) and the next test that
    asks for the same groups gets the parked session back.
    """

    key: tuple[Any, ...] | None = None
    session: Any = None

    @classmethod
    def get(cls, groups: tuple[Any, ...], options: dict[str, Any]) -> Any:
        from twinkle_dask import runtime
        from twinkle_dask.testing import start_local

        key = tuple(repr(g) for g in groups) + tuple(sorted((k, repr(v)) for k, v in options.items()))
        if cls.key == key and cls.session is not None and not cls.session.closed:
            runtime.set_process_session(cls.session)
            return cls.session.client
        cls.close()
        client = start_local(*groups, **options)
        cls.session = runtime.process_session()
        cls.key = key
        return client

    @classmethod
    def park(cls) -> None:
        from twinkle_dask import runtime

        if cls.session is not None and runtime.process_session() is cls.session:
            runtime.set_process_session(None)

    @classmethod
    def close(cls) -> None:
        from twinkle_dask import runtime

        session, cls.session, cls.key = cls.session, None, None
        if session is None:
            return
        if runtime.process_session() is session:
            runtime.set_process_session(None)
        session.close()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "twinkle(*groups, **cpu_groups): run the test with a local twinkle_dask cluster of these "
        "groups (DeviceGroup arguments, name=ranks for CPU groups; other keywords go to initialize, e.g. "
        "processes=False for an in-process cluster)"
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _Shared.close()


@pytest.fixture(scope="module", autouse=True)
def _twinkle_module_cleanup() -> Iterator[None]:
    yield
    _Shared.close()


@pytest.fixture
def twinkle_client(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The Dask client of a local session with the groups of ``@pytest.mark.twinkle(...)``."""
    from twinkle_dask.mesh import DeviceGroup

    marker = request.node.get_closest_marker("twinkle")
    if marker is None or not (marker.args or marker.kwargs):
        raise pytest.UsageError(
            "twinkle_client needs @pytest.mark.twinkle(group=ranks, ...) on the test, e.g. "
            "@pytest.mark.twinkle(model=4)"
        )
    bad = [g for g in marker.args if not isinstance(g, DeviceGroup)]
    if bad:
        raise pytest.UsageError(
            f"@pytest.mark.twinkle takes groups as DeviceGroup(...) arguments or name=ranks keywords, got "
            f"{bad[0]!r}; e.g. @pytest.mark.twinkle(DeviceGroup(name='model', ranks=4, device_type='cuda'), "
            f"simulate_gpus=True)"
        )
    yield _Shared.get(tuple(marker.args), dict(marker.kwargs))
    _Shared.park()


@pytest.fixture
def twinkle_session() -> Iterator[Any]:
    """A factory: ``with twinkle_session(model=4) as client:`` runs a local session for the block.

    It takes what the marker takes: ``twinkle_session(DeviceGroup(...), data=1, processes=False)``.
    """

    @contextlib.contextmanager
    def start(*groups: Any, **options: Any) -> Iterator[Any]:
        try:
            yield _Shared.get(groups, options)
        finally:
            _Shared.park()

    yield start
