"""Twinkle components decorated BEFORE ``twinkle_dask.bridge`` is imported (the script imports this first).

Plain Twinkle code: twinkle-kit's own decorators, nothing of twinkle_dask.
"""

import os
import random

import numpy as np
import torch
from twinkle import DeviceMesh, remote_class, remote_function


@remote_class()
class Scaler:
    """A component with a mesh: its draws and its mesh are what the test checks."""

    def __init__(self, scale: float, device_mesh: DeviceMesh = None, **kwargs):
        self.scale = scale
        self.init_draw = torch.rand(3).tolist()
        self.mesh = device_mesh

    @remote_function(dispatch='slice_dp', collect='flatten')
    def apply(self, xs):
        return [x * self.scale for x in xs]

    @remote_function(collect='mean', lazy_collect=True, timeout=30)
    def draw(self):
        return float(torch.rand(1)) + random.random() + float(np.random.rand())

    @remote_function(dispatch='all')
    def identity(self):
        keys = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'CLUSTER_NAME', 'TWINKLE_SEED', 'TOKENIZERS_PARALLELISM',
                'CUDA_VISIBLE_DEVICES')
        return {k: os.environ.get(k) for k in keys} | {'init_draw': self.init_draw,
                                                         'dp': self.mesh.data_world_size,
                                                         'mesh_type': type(self.mesh).__module__}

    @remote_function(dispatch='all', collect='first')
    def nested_draw(self):
        # A Twinkle object built inside a component reseeds from TWINKLE_SEED, as in a Ray actor.
        helper = Helper()
        return helper.draw

    @remote_function(dispatch='all', collect='first', lazy_collect=False)
    def total(self, values):
        return sum(values)


@remote_class(execute='first')
class Source:
    def __init__(self, n: int, device_mesh: DeviceMesh = None, **kwargs):
        self.n = n
        self.mesh = device_mesh
        self.items = list(range(n))

    @remote_function()
    def __len__(self):
        return self.n

    @remote_function()
    def __iter__(self):
        for i in range(0, self.n, 2):
            yield self.items[i:i + 2]

    @remote_function(dispatch='all', collect='first')
    def mesh_size(self):
        return self.mesh.data_world_size


@remote_class()
class Helper:
    def __init__(self):
        self.draw = torch.rand(2).tolist()


@remote_class()
class Tally:
    """Built in the driver (no remote_group): a lazy result given to its method arrives collected."""

    def __init__(self):
        self.seen = []

    @remote_function()
    def add(self, value):
        self.seen.append(value)
        return type(value).__name__
