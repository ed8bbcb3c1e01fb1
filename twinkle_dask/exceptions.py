"""Exceptions raised by twinkle_dask.

Every exception the library raises on its own account derives from
:class:`TwinkleDaskError`. Most also derive from the built-in type a Twinkle
user would catch (``ValueError``, ``TimeoutError``, ...), so ``except
ValueError`` keeps working when porting code::

    TwinkleDaskError
    ├── ConfigurationError (ValueError)      bad option, group, mesh or name
    │   ├── ConfigurationTypeError (TypeError) an option of the wrong type
    │   └── DispatchError                    inputs that cannot be dispatched
    ├── ClusterUnreachableError (ConnectionError) no scheduler at the address
    ├── NotInitializedError (RuntimeError)   no session, or a shut-down one
    ├── NotRemoteMethodError (AttributeError) undecorated method on a handle
    ├── SerializationError (TypeError)       an argument or result that cannot travel
    ├── CallTimeoutError (TimeoutError)      a call's ``timeout`` expired
    ├── WorkerLostError (RuntimeError)       a worker died or cannot be reached
    ├── WorkerRestartError (RuntimeError)    a worker could not be restarted
    ├── ComponentClosedError (RuntimeError)  a call on a closed component
    ├── ColocationError (RuntimeError)       colocated components that cannot share their process
    ├── BlockingCallError (RuntimeError)     a blocking call on an async driver's event loop
    └── RemoteError (RuntimeError)           a remote exception whose type
                                             cannot be rebuilt in the driver

Exceptions raised by user code inside a component are re-raised in the driver
with their *original* type; the remote traceback and the component, method and
rank travel with them as exception notes (``BaseException.add_note``).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BlockingCallError",
    "BridgeError",
    "CallTimeoutError",
    "ClusterUnreachableError",
    "ColocationError",
    "ComponentClosedError",
    "ConfigurationError",
    "ConfigurationTypeError",
    "DaskFutureError",
    "DispatchError",
    "NotInitializedError",
    "NotRemoteMethodError",
    "RemoteError",
    "SerializationError",
    "TwinkleDaskError",
    "UnsupportedTwinkleError",
    "WorkerLostError",
    "WorkerRestartError",
]


class TwinkleDaskError(Exception):
    """Base class of every exception raised by twinkle_dask itself."""


class ConfigurationError(TwinkleDaskError, ValueError):
    """An option, group, mesh or strategy name is not valid."""


class ConfigurationTypeError(ConfigurationError, TypeError):
    """An option has the wrong type (also a ``TypeError``)."""


class ClusterUnreachableError(TwinkleDaskError, ConnectionError):
    """No Dask scheduler answered at the given address within Dask's connect timeout."""


class DispatchError(ConfigurationError):
    """A call's inputs cannot be dispatched to the target ranks."""


class NotInitializedError(TwinkleDaskError, RuntimeError):
    """No twinkle_dask session is running (or it was shut down)."""


class NotRemoteMethodError(TwinkleDaskError, AttributeError):
    """An attribute that is not a ``@remote_function`` was read on a handle."""

    def __init__(self, cls_name: str, attr: str, *, is_method: bool) -> None:
        self.cls_name = cls_name
        self.attr = attr
        self.is_method = is_method
        super().__init__(cls_name, attr)

    def __str__(self) -> str:
        if self.is_method:
            return (
                f"{self.cls_name}.{self.attr} is not a remote method: the instances live in the "
                f"group's workers and the handle only forwards methods decorated with "
                f"@remote_function. Decorate {self.cls_name}.{self.attr} with "
                f"@remote_function(...) to call it through the handle."
            )
        return (
            f"{self.cls_name}.{self.attr} lives on the remote instances, not on the handle. "
            f"Return it from a @remote_function method to read it in the driver."
        )


class SerializationError(TwinkleDaskError, TypeError):
    """An argument or a result cannot be serialized to travel between processes."""


class CallTimeoutError(TwinkleDaskError, TimeoutError):
    """A call did not finish on every rank within its ``timeout``."""

    def __init__(
        self, component: str, method: str, timeout: float, pending_ranks: Sequence[int]
    ) -> None:
        self.component = component
        self.method = method
        self.timeout = timeout
        self.pending_ranks = tuple(pending_ranks)
        super().__init__(component, method, timeout, self.pending_ranks)

    def __str__(self) -> str:
        ranks = ", ".join(str(r) for r in self.pending_ranks)
        return (
            f"{self.component}.{self.method} did not finish within {self.timeout:g} s: "
            f"rank(s) {ranks} did not answer. The call keeps running on those ranks; raise "
            f"the timeout (remote_function(timeout=...) or .options(timeout=...)) if it is "
            f"expected to take longer."
        )


class WorkerLostError(TwinkleDaskError, RuntimeError):
    """The worker hosting a rank died or cannot be reached."""

    def __init__(
        self,
        address: str,
        *,
        group: str | None = None,
        rank: int | None = None,
        component: str | None = None,
        reason: str = "",
    ) -> None:
        self.address = address
        self.group = group
        self.rank = rank
        self.component = component
        self.reason = reason
        super().__init__(address, group, rank, component, reason)

    def __str__(self) -> str:
        what = self.component or "a component"
        if self.rank is not None:
            what += f" on rank {self.rank}"
        if self.group is not None:
            what += f" of group {self.group!r}"
        tail = f" ({self.reason})" if self.reason else ""
        return (
            f"{what} failed: the worker at {self.address} was lost{tail}. Calls on this component "
            f"fail until it is rebuilt on a live worker."
        )


class WorkerRestartError(TwinkleDaskError, RuntimeError):
    """Worker processes could not be restarted, or their replacements did not join.

    Attributes
    ----------
    addresses : tuple of str
        The workers concerned.
    reason : str
        Why.
    """

    def __init__(self, addresses: Sequence[str], reason: str) -> None:
        self.addresses = tuple(addresses)
        self.reason = reason
        super().__init__(self.addresses, reason)

    def __str__(self) -> str:
        return f"could not restart worker(s) {list(self.addresses)}: {self.reason}"


class ComponentClosedError(TwinkleDaskError, RuntimeError):
    """A call was made on a component that was closed or whose session ended."""


class DaskFutureError(TwinkleDaskError, LookupError):
    """A Dask future passed to a component method has no value to give: cancelled, lost or unknown to the scheduler.

    (A future whose task failed raises that task's own error instead.)
    """


class ColocationError(TwinkleDaskError, RuntimeError):
    """A component cannot share its rank's process with the components already built there.

    Raised at construction when a component initializes torch.distributed's
    default process group in a worker where a colocated component already did.
    """

    def __init__(self, component: str, rank: int, group: str, owner: str | None) -> None:
        self.component = component
        self.rank = rank
        self.group = group
        self.owner = owner
        super().__init__(component, rank, group, owner)

    def __str__(self) -> str:
        owner = f" by {self.owner}" if self.owner else ""
        return (
            f"{self.component}.__init__ on rank {self.rank} of group {self.group!r} called "
            f"torch.distributed.init_process_group, but this rank's default process group was "
            f"already initialized{owner}. The components of a group share their rank's process, "
            f"and with it torch.distributed's default process group. Guard the call: "
            f"`if not dist.is_initialized(): dist.init_process_group(...)` (the group is then "
            f"shared, as the ranks and world size are the same), or build the component in a "
            f"group of its own."
        )


class BridgeError(TwinkleDaskError, RuntimeError):
    """A Twinkle script cannot run on twinkle_dask as written (see :mod:`twinkle_dask.bridge`)."""


class UnsupportedTwinkleError(BridgeError, ImportError):
    """The installed twinkle-kit is not one the bridge was built and tested against."""


class BlockingCallError(TwinkleDaskError, RuntimeError):
    """A call that waits was made on the event loop an async driver's calls run on.

    With an asynchronous client (``Client(asynchronous=True)``) the replies of
    the driver's calls arrive on the running event loop itself: waiting for
    one there would never end. Such calls raise this at once instead.

    Attributes
    ----------
    what : str
        The call that would have waited.
    instead : str
        What to write instead.
    """

    def __init__(self, what: str, instead: str) -> None:
        self.what = what
        self.instead = instead
        super().__init__(what, instead)

    def __str__(self) -> str:
        return (
            f"{self.what} waits, and it was called on the event loop of an async driver (an asynchronous "
            f"client's loop), which would then never get to deliver what it waits for. Write "
            f"`{self.instead}` instead, or call it from another thread."
        )


class RemoteError(TwinkleDaskError, RuntimeError):
    """A remote exception whose original type could not be rebuilt in the driver.

    Attributes
    ----------
    type_name : str
        The qualified name of the original exception type.
    remote_traceback : str
        The traceback text captured on the worker.
    reason : str
        Why the original type could not be rebuilt here.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "", reason: str = "") -> None:
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        self.reason = reason
        super().__init__(type_name, message, remote_traceback, reason)

    def __str__(self) -> str:
        text = f"{self.type_name}: {self.message}"
        if self.reason:
            short = self.type_name.rsplit(".", 1)[-1]
            text += f" ({short} could not be rebuilt in the driver: {self.reason})"
        return text
