"""Decorators record metadata, check their options when they run, and keep classes usable locally."""

from __future__ import annotations

import pytest

from twinkle_dask import DeviceMesh, remote_class, remote_function
from twinkle_dask.exceptions import ConfigurationError
from twinkle_dask.specs import SPEC_ATTR, ClassSpec, MethodSpec


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dispatch": "slices"}, r"unknown dispatch 'slices'; valid choices are \['all', .*'slice', 'slice_dp'"),
        ({"collect": "average"}, r"unknown collect 'average'; valid choices are \['avg', 'first', 'flatten', "),
        ({"execute": "peer"}, r"unknown remote_function execute 'peer'; valid choices are \['all', 'first'\]"),
        ({"sync": "yes"}, "sync must be True or False"),
        ({"lazy_collect": 1}, "lazy_collect must be True, False or None"),
        ({"timeout": -1}, "timeout must be a positive number"),
        ({"dispatch": 3}, "dispatch must be a strategy name"),
    ],
)
def test_remote_function_rejects_bad_options_when_decorating(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        remote_function(**kwargs)


def test_remote_class_rejects_bad_options_when_decorating():
    with pytest.raises(ValueError, match=r"unknown remote_class execute 'last'.*\['all', 'first', 'peer'\]"):
        remote_class(execute="last")
    with pytest.raises(ConfigurationError, match="max_restarts"):
        remote_class(max_restarts=-1)


def test_custom_dispatch_with_a_wrong_signature_is_rejected():
    with pytest.raises(ConfigurationError, match=r"\(length, i, args, kwargs, device_mesh\)"):
        remote_function(dispatch=lambda x: x)


def test_decorators_return_the_same_objects_with_a_spec():
    def forward(self, x):
        return x

    decorated = remote_function(dispatch="slice_dp", collect="mean", timeout=5)(forward)
    assert decorated is forward
    spec = getattr(forward, SPEC_ATTR)
    assert isinstance(spec, MethodSpec)
    assert (spec.name, spec.dispatch, spec.collect, spec.timeout) == ("forward", "slice_dp", "mean", 5)

    class Model:
        def __init__(self, device_mesh: DeviceMesh = None, width: int = 3):
            self.width = width
            self.mesh = device_mesh

    assert remote_class(execute="first")(Model) is Model
    assert getattr(Model, SPEC_ATTR) == ClassSpec(execute="first", mesh_param="device_mesh")


def test_bare_decorator_forms():
    @remote_class
    class Plain:
        @remote_function
        def go(self):
            return "went"

    assert getattr(Plain, SPEC_ATTR).execute == "all"
    assert getattr(Plain.go, SPEC_ATTR).dispatch == "slice"
    assert Plain().go() == "went"


def test_positional_dispatch_callable_is_not_mistaken_for_a_method():
    def to_first(length, i, args, kwargs, device_mesh):
        return args, kwargs

    decorate = remote_function(to_first)
    assert callable(decorate)

    def method(self):
        return 1

    assert getattr(decorate(method), SPEC_ATTR).dispatch is to_first


def test_decorated_class_works_in_process_without_a_session():
    @remote_class()
    class Counter:
        def __init__(self, start=0):
            self.n = start

        @remote_function(collect="sum")
        def add(self, k):
            self.n += k
            return self.n

    c = Counter(5, remote_group="anything")
    assert type(c) is Counter and c.add(2) == 7 and c.remote_group == "anything"


def test_with_options_rejects_unknown_options():
    spec = MethodSpec("m")
    with pytest.raises(ConfigurationError, match=r"unknown option\(s\) \['colect'\]"):
        spec.with_options(colect="first")
