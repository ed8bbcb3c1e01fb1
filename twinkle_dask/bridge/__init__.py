"""Run Twinkle's own components (twinkle-kit) on twinkle_dask.

In a Twinkle script, add one import and write ``mode='dask'``; nothing else
changes::

    import twinkle
    import twinkle_dask.bridge  # noqa: F401
    from twinkle import DeviceGroup, DeviceMesh
    from twinkle.model import TransformersModel

    twinkle.initialize(mode='dask', groups=[DeviceGroup(name='model', ranks=2, device_type='GPU')])
    model = TransformersModel(model_id=..., device_mesh=DeviceMesh.from_sizes(dp_size=2),
                              remote_group='model')

Every class decorated with twinkle-kit's ``@remote_class`` (Twinkle's own and
the user's, in any module, decorated before or after this import) is then
built in twinkle_dask groups with the options its decorators declared, its
undecorated ``__init__`` and methods running on the workers, seeded as in a
Ray actor. What is supported and what was proven is in the README,
"Running Twinkle's own components".

Importing this module installs the bridge in the process (idempotent): it
checks the installed twinkle-kit (:data:`TESTED_VERSIONS`), makes
``twinkle.initialize`` accept ``'dask'``, registers ``twinkle.DeviceMesh`` as
a mesh type and converts the twinkle-decorated classes already loaded.
Workers get the same through a worker plugin that ``initialize`` registers.
"""

from __future__ import annotations

import threading

from ..mesh import register_mesh_type
from ._classes import convert, convert_loaded, decoration_hook, setup
from ._infra import TwinkleWorkerPlugin, install_initialize
from ._probe import SUPPORTED, TESTED_VERSIONS, probe

__all__ = ["SUPPORTED", "TESTED_VERSIONS", "TwinkleWorkerPlugin", "convert", "install"]

_lock = threading.Lock()
_installed = False


def install() -> None:
    """Install the bridge in this process (what importing this module does; idempotent).

    Raises
    ------
    UnsupportedTwinkleError
        twinkle-kit is missing, outside the supported series, or its
        decorators no longer have the shape the bridge reads.
    """
    global _installed
    with _lock:
        if _installed:
            return
        internals = probe()
        setup(internals)
        register_mesh_type(internals.device_mesh)
        infra = internals.infra
        if not getattr(infra._get_device_mesh_param_name, "__twinkle_dask_bridged__", False):
            infra._get_device_mesh_param_name = decoration_hook(infra._get_device_mesh_param_name)
        install_initialize()
        _installed = True
    convert_loaded()


install()
