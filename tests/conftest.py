from __future__ import annotations

import pytest

from twinkle_dask.testing import local_session


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def cluster():
    """A local session with groups data (1 rank), model (4 ranks) and sampler (2 ranks)."""
    with local_session(data=1, model=4, sampler=2) as client:
        yield client
pytest_plugins = ["pytester"]
