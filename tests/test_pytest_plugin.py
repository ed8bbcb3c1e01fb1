"""The pytest fixtures users get with twinkle-dask: a marker and a session factory."""

from __future__ import annotations

import pytest
from components import Echo

import twinkle_dask as twinkle

_first: dict[str, object] = {}


@pytest.mark.twinkle(tiny=2)
def test_marker_gives_a_cluster_with_those_groups(twinkle_client):
    names = sorted(str(w["name"]) for w in twinkle_client.scheduler_info(n_workers=-1)["workers"].values())
    assert names == ["tiny-0", "tiny-1"]
    assert Echo(remote_group="tiny").count() == 2
    _first["client"] = twinkle_client


@pytest.mark.twinkle(tiny=2)
def test_same_groups_share_the_cluster(twinkle_client):
    first = twinkle_client
    assert Echo(remote_group="tiny").count() == 2
    assert twinkle.runtime.process_session().client is first


def test_a_test_in_between_initializes_its_own_session():
    assert twinkle.runtime.process_session() is None  # the marker's session is parked
    client = twinkle.initialize("dask", groups=[twinkle.DeviceGroup(name="own", ranks=1, device_type="cpu")],
                                dashboard_address=None)
    try:
        assert [str(w["name"]) for w in client.scheduler_info(n_workers=-1)["workers"].values()] == ["own-0"]
        assert Echo(remote_group="own").count() == 1
    finally:
        twinkle.shutdown()


@pytest.mark.twinkle(tiny=2)
def test_the_parked_cluster_comes_back_after_it(twinkle_client):
    assert twinkle_client is _first["client"]  # the same cluster, not a new one
    assert Echo(remote_group="tiny").count() == 2


def test_session_factory(twinkle_session):
    with twinkle_session(other=1) as client:
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == 1
        assert Echo(remote_group="other").count() == 1


def test_marker_is_required(pytester):
    pytester.makepyfile("def test_x(twinkle_client):\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*needs @pytest.mark.twinkle*"])
