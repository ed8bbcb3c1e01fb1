"""Progress bars appear for long waits and driver-side iteration when enabled, and not otherwise."""

from __future__ import annotations

import dask
import pytest
from components import Echo, Loader

from twinkle_dask import progress

pytestmark = pytest.mark.timeout(60)


def test_auto_is_off_when_stderr_is_not_a_terminal():
    with dask.config.set({"twinkle-dask.progress": "auto"}):
        assert progress.enabled() is False  # pytest captures stderr: no terminal
    with dask.config.set({"twinkle-dask.progress": True}):
        assert progress.enabled() is True


def test_a_long_wait_shows_a_bar_of_ranks(cluster, capfd):
    echo = Echo(remote_group="sampler")
    with dask.config.set({"twinkle-dask.progress": True, "twinkle-dask.progress-after": 0.05}):
        assert echo.sleep(0.6)() == 0.6
    err = capfd.readouterr().err
    assert "Echo.sleep" in err and "/2" in err


def test_quick_calls_and_disabled_progress_print_nothing(cluster, capfd):
    echo = Echo(remote_group="sampler")
    with dask.config.set({"twinkle-dask.progress": False, "twinkle-dask.progress-after": 0.0}):
        echo.sleep(0.3)()
    with dask.config.set({"twinkle-dask.progress": True}):
        echo.count()
    assert "Echo" not in capfd.readouterr().err


def test_iteration_shows_a_bar_of_batches(cluster, capfd):
    loader = Loader(n_batches=3, remote_group="data")
    with dask.config.set({"twinkle-dask.progress": True}):
        assert len(list(loader)) == 3
    err = capfd.readouterr().err
    assert "Loader batches: 0it [" in err and "/3" not in err  # counts batches; no total: __len__ is not called
