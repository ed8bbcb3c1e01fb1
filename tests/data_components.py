"""Components whose kept results are large (for tests/test_dask_data.py)."""

from __future__ import annotations

import numpy as np

import twinkle_dask as twinkle
from twinkle_dask import remote_class, remote_function


@remote_class()
class Blocks:
    """Makes large arrays whose every element says which call (and rank) made them."""

    @remote_function(dispatch="all", collect="first")
    def make(self, n_bytes: int, k: int):
        return np.full(n_bytes // 8, float(100 * k + twinkle.get_rank()))

    @remote_function(dispatch="all", collect="first")
    def summary(self, x):
        """What a later call on the same worker sees of ``x``: its length and distinct values."""
        return {"len": len(x), "values": sorted(set(np.unique(x).tolist()))}
