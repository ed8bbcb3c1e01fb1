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
        """What a later call on the same worker sees of ``x``: its length and its smallest and largest value
        (without a copy of ``x``: it may be most of the worker's memory budget)."""
        return {"len": len(x), "min": float(x.min()), "max": float(x.max())}


class Opaque:
    """A value Dask counts as large (``__sizeof__``) that cannot be pickled: it can neither stay in a
    full memory budget nor go to disk."""

    def __init__(self, n_bytes: int, tag: int) -> None:
        self.n_bytes = n_bytes
        self.tag = tag

    def __sizeof__(self) -> int:
        return self.n_bytes

    def __reduce__(self):
        raise TypeError("Opaque values stay in their process")


@remote_class()
class Holder:
    """Keeps values Dask cannot spill, and small ones."""

    @remote_function(dispatch="all", collect="first")
    def opaque(self, n_bytes: int, tag: int):
        return Opaque(n_bytes, tag)

    @remote_function(dispatch="all", collect="first")
    def small(self, tag: int):
        return {"tag": tag}

    @remote_function(dispatch="all", collect="first")
    def tag_of(self, x):
        return x.tag if isinstance(x, Opaque) else x["tag"]
