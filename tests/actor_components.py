"""Components that use Dask from inside their methods (importable by the workers through PYTHONPATH)."""

from __future__ import annotations

import os
import random

from twinkle_dask import remote_class, remote_function


def _square(x: int) -> int:
    return x * x


def many_keys(n: int) -> dict[str, int]:
    """A result Dask sizes by sampling (a dict of more than ten keys)."""
    return {f"k{i}": i for i in range(n)}


def call_in_task(handle, values):
    """A plain Dask task that calls a component through a handle it was given."""
    from distributed import get_worker

    sums = handle.add(values)
    return {"task_worker": get_worker().address, "sums": sums, "type": type(sums).__name__}


@remote_class()
class DaskUser:
    """Reports its worker, and submits Dask tasks from its methods."""

    def __init__(self, offset: int = 0):
        self.offset = offset

    @remote_function(dispatch="all")
    def where(self):
        from distributed import get_worker

        return {"worker": get_worker().address, "pid": os.getpid()}

    @remote_function(dispatch="all")
    def square_on_dask(self, x: int):
        from distributed import get_client

        client = get_client()
        return client.submit(_square, x + self.offset, pure=False).result()

    @remote_function(dispatch="all")
    def draw(self, n: int):
        return [random.random() for _ in range(n)]

    @remote_function(dispatch="all", collect="flatten")
    def add(self, values):
        return [v + self.offset for v in values]


@remote_class()
class Nester:
    """Builds a component from inside its own methods, and closes it again."""

    @remote_function(dispatch="all", collect="first")
    def build(self, group: str):
        import twinkle_dask as twinkle

        self.child = DaskUser(1, remote_group=group)
        return {"keys": [f.key for f in twinkle.component_actors(self.child)], "sums": self.child.add([1])}

    @remote_function(dispatch="all", collect="first")
    def close_child(self):
        import twinkle_dask as twinkle

        twinkle.close_component(self.child)
        return twinkle.component_actors(self.child)
