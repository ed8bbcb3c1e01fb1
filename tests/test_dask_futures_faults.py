"""A lazy result's Dask futures when the producer's worker is lost: an error naming why, never a hang."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from components import Echo
from distributed import wait
from distributed.client import FutureCancelledError as CancelledError

from twinkle_dask.testing import local_session

pytestmark = pytest.mark.timeout(180)


def test_a_lost_producer_worker_fails_its_rank_future_instead_of_hanging():
    with local_session(model=2) as client:
        echo = Echo(remote_group="model")
        lazy = echo.produce("list")
        futures = lazy.futures()
        wait(futures)
        lost = lazy._info.addresses[1]
        pid = client.run(os.getpid)[lost]
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        # the rank future is the kept result itself: data only, lost with its worker, so Dask cancels it
        with pytest.raises(CancelledError, match=re.escape(str(futures[1].key))):
            futures[1].result(timeout=60)
        with pytest.raises(CancelledError):
            client.submit(len, futures[1], pure=False).result(timeout=60)
        elapsed = time.monotonic() - start
        print(f"rank future of a lost worker failed after {elapsed:.2f} s")
        assert elapsed < 30, f"took {elapsed:.1f} s"
        assert futures[0].result() == [0, 1, 2, 3]  # the surviving rank's data is untouched


def test_futures_after_shutdown_is_a_typed_error_saying_what_is_missing():
    from twinkle_dask.exceptions import NotInitializedError

    with local_session(model=1):
        lazy = Echo(remote_group="model").produce("list")
        assert lazy() == [0, 1, 2, 3]
    with pytest.raises(NotInitializedError, match=r"needs a Dask client.*initialize\('dask'"):
        lazy.futures()
