"""The local cluster's workers get the driver's Dask configuration, as a Dask nanny's workers do."""

from __future__ import annotations

import dask
import pytest

from twinkle_dask.testing import local_session


@pytest.mark.timeout(120)
def test_workers_inherit_the_drivers_config_and_run_its_preloads():
    settings = {"distributed.worker.preload": ["preload_marker"], "twinkle-dask.test-setting": "from the driver"}
    with dask.config.set(settings), local_session(g=2) as client:
        preloaded = client.run(lambda dask_worker: getattr(dask_worker, "twinkle_test_preloaded", False))
        setting = client.run(lambda: dask.config.get("twinkle-dask.test-setting", None))
        extensions = client.run(lambda dask_worker: "twinkle" in dask_worker.extensions)
    assert sorted(preloaded.values()) == [True, True]
    assert sorted(setting.values()) == ["from the driver", "from the driver"]
    assert sorted(extensions.values()) == [True, True]  # twinkle's own preload still runs first
