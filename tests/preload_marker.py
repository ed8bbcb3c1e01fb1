"""A Dask worker preload for tests: marks the worker it ran in."""


def dask_setup(worker):
    worker.twinkle_test_preloaded = True
