"""``twinkle.initialize(mode='dask', ...)``, and what every worker needs for Twinkle's components.

twinkle-kit's ``initialize`` accepts only 'local' and 'ray' (a bare
``assert``), and scripts reach it through any reference: ``twinkle.initialize``,
``from twinkle import initialize`` taken before the bridge was imported,
``twinkle.infra.initialize``. So the bridge swaps the *code* of that one
function object for a call into :func:`initialize` (keeping a copy of the
original for the other modes): every reference then accepts ``'dask'``.

In dask mode :func:`initialize` sets twinkle's infra state as Twinkle's Ray
mode does (seed, determinism, lazy collect, groups, global mesh, name,
notifier, the session environment), starts twinkle_dask on the same groups
(Twinkle's ``DeviceGroup`` objects as they are; ``'GPU'`` groups run as
simulated GPU workers when ``twinkle-dask.simulate-gpus`` is set), and
registers :class:`TwinkleWorkerPlugin` with the cluster so every worker,
present and future, has the bridge installed and the same state before any
component is built there. An existing cluster is used when Dask's
``scheduler-address`` is configured (``DASK_SCHEDULER_ADDRESS``); its workers
need twinkle-kit and twinkle_dask installed, nothing else.
"""

from __future__ import annotations

import inspect
import json
import os
import types
from typing import Any

import dask
from distributed.diagnostics.plugin import WorkerPlugin

from .. import session as _session
from ..exceptions import BridgeError, ConfigurationError
from ..mesh import DeviceGroup
from ._classes import _twinkle, convert_loaded

__all__ = ["TwinkleWorkerPlugin", "check_mode_for_remote_build", "initialize", "install_initialize"]

#: The name the worker plugin is registered under (registering again replaces it).
PLUGIN_NAME = "twinkle-dask-bridge"

_original_initialize: Any = None
_called = False


def install_initialize() -> None:
    """Make twinkle's ``initialize`` (every reference to it) accept ``mode='dask'``."""
    global _original_initialize
    infra = _twinkle().infra
    fn = infra.initialize
    if _original_initialize is not None:
        return
    _original_initialize = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                                              fn.__closure__)
    _original_initialize.__kwdefaults__ = fn.__kwdefaults__
    _original_initialize.__signature__ = inspect.signature(fn)
    fn.__globals__["_twinkle_dask_bridge_initialize"] = initialize

    def trampoline(*args: Any, **kwargs: Any) -> Any:
        return _twinkle_dask_bridge_initialize(*args, **kwargs)  # type: ignore[name-defined]  # noqa: F821

    fn.__code__ = trampoline.__code__
    fn.__defaults__ = None
    fn.__kwdefaults__ = None


def initialize(*args: Any, **kwargs: Any) -> Any:
    """twinkle's ``initialize``: ``mode='dask'`` runs here, the other modes in twinkle-kit's own."""
    global _called
    bound = _original_initialize.__signature__.bind(*args, **kwargs)
    explicit = set(bound.arguments)  # what the script passed, before the defaults fill in
    bound.apply_defaults()
    options = dict(bound.arguments)
    _called = True
    if options["mode"] != "dask":
        return _original_initialize(*args, **kwargs)
    return _initialize_dask(options, explicit)


def _initialize_dask(options: dict[str, Any], explicit: set[str]) -> None:
    infra = _twinkle().infra
    groups = options["groups"]
    if not groups:
        raise ConfigurationError(
            "twinkle.initialize(mode='dask') needs groups=[DeviceGroup(name=..., ranks=..., device_type=...)], "
            "as mode='ray' does"
        )
    seed, full_determinism = options["seed"], bool(options["full_determinism"])
    name, notifier = options["name"], options["notifier"]
    # Twinkle's own infra state, as its 'ray' mode sets it.
    infra._mode = "dask"
    infra._name = name
    infra._full_determinism = full_determinism
    infra._lazy_collect = bool(options["lazy_collect"])
    infra._notifier = notifier
    if name is not None:
        os.environ["TWINKLE_NAME"] = name
    os.environ.setdefault("TWINKLE_SESSION_ID", str(os.getpid()))
    if notifier is not None and hasattr(notifier, "to_dict"):
        os.environ["TWINKLE_NOTIFIER"] = json.dumps(notifier.to_dict())
    if options["global_device_mesh"] is not None:
        infra._device_mesh = options["global_device_mesh"]
    if seed is not None:
        infra._seed = seed
    infra._device_group = list(groups)
    ours = [
        DeviceGroup(name=g.name, ranks=g.ranks, device_type=g.device_type, gpus_per_worker=g.gpus_per_worker,
                    visible_devices=g.visible_devices)
        for g in groups
    ]
    convert_loaded()
    extra: dict[str, Any] = {}
    if "nproc_per_node" in explicit:
        extra["nproc_per_node"] = options["nproc_per_node"]
    address = dask.config.get("scheduler-address", None)
    client = _session.initialize(
        "dask", groups=ours, global_device_mesh=options["global_device_mesh"],
        lazy_collect=bool(options["lazy_collect"]), seed=infra._seed, full_determinism=full_determinism, name=name,
        notifier=notifier if callable(notifier) else None, address=address, **extra,
    )
    if seed is not None:
        infra.framework_util.seed_everything(seed, full_determinism)
    plugin = TwinkleWorkerPlugin(
        seed=infra._seed, full_determinism=full_determinism, lazy_collect=bool(options["lazy_collect"]),
        environment={k: v for k, v in os.environ.items() if k.startswith("TWINKLE_")},
    )
    client.register_plugin(plugin, name=PLUGIN_NAME)
    return None


def check_mode_for_remote_build(klass: type, group: str) -> None:
    """A remote build outside dask mode: Twinkle's 'ray' mode is fine; anything else is a forgotten initialize."""
    mode = _twinkle().infra._mode
    if mode == "ray":
        return
    raise BridgeError(
        f"{klass.__name__}(..., remote_group={group!r}): twinkle_dask.bridge is imported but twinkle is in "
        f"{mode!r} mode" + ("" if _called else " (twinkle.initialize was not called)")
        + "; call twinkle.initialize(mode='dask', groups=[...]) before building components, or drop "
        "`import twinkle_dask.bridge` to run twinkle-kit's own modes"
    )


class TwinkleWorkerPlugin(WorkerPlugin):
    """Installs the bridge in a worker and gives it the driver's Twinkle state.

    Registered by ``twinkle.initialize(mode='dask')``: Dask runs it on every
    worker of the cluster, and on workers that join later, before they run
    anything of the session's.
    """

    def __init__(self, *, seed: int, full_determinism: bool, lazy_collect: bool,
                 environment: dict[str, str]) -> None:
        self.seed = seed
        self.full_determinism = full_determinism
        self.lazy_collect = lazy_collect
        self.environment = dict(environment)

    def setup(self, worker: Any) -> None:
        from . import install

        install()
        activate_worker(self.seed, self.full_determinism, self.lazy_collect, self.environment)


def activate_worker(seed: int, full_determinism: bool, lazy_collect: bool, environment: dict[str, str]) -> None:
    """Set twinkle's infra state in a worker process as a Ray actor of that session would have it."""
    infra = _twinkle().infra
    os.environ.update(environment)
    os.environ["TWINKLE_SEED"] = str(seed)
    os.environ["TWINKLE_FULL_DETERMINISM"] = str(int(full_determinism))
    infra._mode = "dask"
    infra._seed = seed
    infra._full_determinism = full_determinism
    infra._lazy_collect = lazy_collect
    convert_loaded()
