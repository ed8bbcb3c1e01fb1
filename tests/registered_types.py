"""Types with users' own Dask serializers (importable by the workers through PYTHONPATH)."""

from __future__ import annotations

import os

from distributed.protocol import dask_deserialize, dask_serialize, register_generic


class Tagged:
    """A value whose Dask serializer and deserializer record where they ran."""

    def __init__(self, value: str, hops: list[list[object]] | None = None):
        self.value = value
        self.hops = hops or []


@dask_serialize.register(Tagged)
def _dumps_tagged(x: Tagged):
    return {"hops": x.hops + [["dumps", os.getpid()]]}, [x.value.encode()]


@dask_deserialize.register(Tagged)
def _loads_tagged(header, frames):
    return Tagged(bytes(frames[0]).decode(), header["hops"] + [["loads", os.getpid()]])


class Box:
    """A generic registration (``register_generic``): pickle carries it, its contents keep their serializers."""

    def __init__(self, item: object, again: object = None):
        self.item = item
        self.again = again


register_generic(Box)
