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


@pytest.fixture(scope="session")
def dask_tls_settings(tmp_path_factory):
    """``dask.config`` settings that make Dask speak TLS everywhere, with a temporary CA and certificates.

    Only Dask's own keys (``distributed.comm.require-encryption``,
    ``distributed.comm.tls.ca-file`` and the scheduler's, workers' and
    clients' cert/key files, written here): a cluster and ``initialize``
    then need no ``security=``.
    """
    pytest.importorskip("cryptography")
    from distributed import Security

    folder = tmp_path_factory.mktemp("tls")
    temporary = Security.temporary()
    files = {}
    for name in ("ca_file", "scheduler_cert", "scheduler_key", "worker_cert", "worker_key",
                 "client_cert", "client_key"):
        path = folder / f"{name}.pem"
        path.write_text(getattr(temporary, "tls_" + name))
        path.chmod(0o600)
        files[name] = str(path)
    return {
        "distributed.comm.require-encryption": True,
        "distributed.comm.tls.ca-file": files["ca_file"],
        **{f"distributed.comm.tls.{who}.{part}": files[f"{who}_{part}"]
           for who in ("scheduler", "worker", "client") for part in ("cert", "key")},
    }
