"""The package's layers: a pure core without Dask, the wire and worker sides apart from the driver's modules."""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import pickle
import subprocess
import sys
import typing

import pytest

import twinkle_dask
from twinkle_dask._wire import protocol
from twinkle_dask._wire.channel import pack
from twinkle_dask.identity import Identity

PACKAGE = pathlib.Path(twinkle_dask.__file__).parent

#: Modules that hold the single-controller model itself: meshes, dispatch, collect, lazy views, specs.
PURE_CORE = ["mesh", "dispatch", "collect", "lazy", "specs", "decorators", "identity", "exceptions",
             "placement", "_callables", "_types", "_checks", "_seed"]

#: The driver's modules: what a worker must not need to serve calls.
DRIVER = {"call", "group", "session", "futures", "testing", "pytest_plugin"}


def test_the_pure_core_imports_nothing_from_dask():
    blocker = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('dask', 'distributed', 'tornado'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import importlib.util, types, pathlib\n"
        f"root = pathlib.Path({str(PACKAGE)!r})\n"
        # The package's __init__ pulls in the driver; load the core modules under a bare package.
        "pkg = types.ModuleType('twinkle_dask'); pkg.__path__ = [str(root)]; sys.modules['twinkle_dask'] = pkg\n"
        f"for name in {PURE_CORE!r}:\n"
        "    importlib.import_module('twinkle_dask.' + name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))\n"
    )
    out = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _top_level_imports(path: pathlib.Path) -> set[str]:
    """The package modules ``path`` imports at module level (not inside functions)."""
    tree = ast.parse(path.read_text())
    here = path.relative_to(PACKAGE).parent.parts
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
            parts = [*base, *(node.module.split(".") if node.module else [])]
            if node.module:
                found.add(".".join(parts))
            else:
                found.update(".".join([*parts, alias.name]) for alias in node.names)
    return found


@pytest.mark.parametrize("subsystem", ["_wire", "_worker"])
def test_the_wire_and_worker_sides_do_not_import_driver_modules(subsystem):
    for path in sorted((PACKAGE / subsystem).glob("*.py")):
        imported = _top_level_imports(path)
        assert not imported & DRIVER, (path.name, sorted(imported & DRIVER))


def test_the_worker_answers_every_request_type():
    from twinkle_dask.testing import local_session

    def handled(dask_worker):
        return sorted(cls.__name__ for cls in dask_worker.extensions["twinkle"].handlers)

    with local_session(model=1) as client:
        answers = client.run(handled)
    assert list(answers.values()) == [sorted(cls.__name__ for cls in typing.get_args(protocol.Request))]


def _examples():
    blob = pack({"x": [1, 2]})
    error = protocol.ErrorInfo("builtins.ValueError", "bad", "Traceback ...", exception=pack(ValueError("bad")))
    ident = Identity(1, 4, 1, 2, "10.0.0.1", 29500, "model", "model-Model-1")
    return [
        protocol.Build("model-Model-ab", blob, ident, "Model", True, nested=True),
        protocol.Call("model-Model-ab", 7, "forward", blob, True, protocol.INLINE_SMALL, False, blob, 3, True),
        protocol.Fetch("c", 7, ("key", 0), (2, 5)),
        protocol.FetchMeta("c", 7),
        protocol.Release("c", (1, 2, 3)),
        protocol.Close("c", 2.0),
        protocol.Ping(),
        protocol.Stats(),
        protocol.FreePort(),
        protocol.Reply(False, error=error),
        protocol.Reply(True, value=blob, meta=["dict", 1, ["x"], None, None, None], stop=True, device=True),
        protocol.Reply(True, stats={"calls": 3}),
        protocol.Output("Model rank 0", "stdout", "hello\n"),
        protocol.Metrics("Model", 0, 1.5, {"loss": 0.25}),
    ]


@pytest.mark.parametrize("message", _examples(), ids=lambda m: type(m).__name__)
def test_messages_cross_pickle_whole_and_stay_frozen(message):
    back = pickle.loads(pickle.dumps(message, protocol=5))
    assert type(back) is type(message)
    for name in type(message).__slots__:
        left, right = getattr(back, name), getattr(message, name)
        if name in ("payload", "value", "remote_dispatch") and right is not None:
            assert left.load() == right.load()
        elif name == "error" and right is not None:
            assert (left.type_name, left.message, left.traceback) == (right.type_name, right.message, right.traceback)
        else:
            assert left == right, name
    fields = type(message).__slots__
    if fields:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(message, fields[0], None)


def test_a_call_message_pickles_without_field_names():
    call = protocol.Call("model-Model-ab", 7, "forward", pack(1), True, protocol.INLINE_SMALL, False)
    head = pickle.dumps(call, protocol=5)
    assert b"component" not in head and b"call_id" not in head
    assert len(head) < 200
