"""twinkle_dask: Twinkle's single-controller ``@remote_class`` / ``@remote_function`` on Dask.

Port Twinkle code by changing the import and the mode::

    import twinkle_dask as twinkle
    from twinkle_dask import DeviceGroup, remote_class, remote_function

    twinkle.initialize('dask', groups=[DeviceGroup(name='default', ranks=4, device_type='cpu')])
"""

from __future__ import annotations

from . import _config  # noqa: F401  (registers the twinkle-dask defaults with dask.config)
from .collect import register_collect
from .decorators import remote_class, remote_function
from .dispatch import register_dispatch
from .exceptions import (
    BlockingCallError,
    CallTimeoutError,
    ClusterUnreachableError,
    ColocationError,
    ComponentClosedError,
    ConfigurationError,
    ConfigurationTypeError,
    DispatchError,
    NotInitializedError,
    NotRemoteMethodError,
    RemoteError,
    SerializationError,
    TwinkleDaskError,
    WorkerLostError,
    WorkerRestartError,
)
from .futures import LazyResult
from .group import close_component, component_actors, restart_component
from .identity import get_local_rank, get_rank, get_world_size, is_master
from .mesh import DeviceGroup, DeviceMesh
from .placement import dispatch_picture, get_device_placement
from .reporting import get_metrics, report
from .session import initialize, shutdown
from .specs import USE_DEFAULT

__version__ = "0.1.0"

__all__ = [
    "USE_DEFAULT",
    "BlockingCallError",
    "CallTimeoutError",
    "ClusterUnreachableError",
    "ColocationError",
    "ComponentClosedError",
    "ConfigurationError",
    "ConfigurationTypeError",
    "DeviceGroup",
    "DeviceMesh",
    "DispatchError",
    "LazyResult",
    "NotInitializedError",
    "NotRemoteMethodError",
    "RemoteError",
    "SerializationError",
    "TwinkleDaskError",
    "WorkerLostError",
    "WorkerRestartError",
    "close_component",
    "component_actors",
    "dispatch_picture",
    "get_device_placement",
    "get_local_rank",
    "get_metrics",
    "get_rank",
    "get_world_size",
    "initialize",
    "is_master",
    "register_collect",
    "register_dispatch",
    "remote_class",
    "remote_function",
    "report",
    "restart_component",
    "shutdown",
]
