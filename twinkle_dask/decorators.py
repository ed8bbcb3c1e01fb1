"""``@remote_class`` and ``@remote_function``.

Both record a frozen spec on what they decorate and return it: a decorated
function is the same function, and a decorated class is the same class that
works as before when built in-process. ``@remote_class`` installs one
construction hook: ``Cls(..., remote_group='g')`` in dask mode asks the
running session for a handle on instances built in group ``g``'s workers.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar, overload

from . import runtime
from ._seed import seed_everything
from .specs import SPEC_ATTR, ClassSpec, MethodSpec, mesh_param_of, prepare_init_arguments

__all__ = ["remote_class", "remote_function"]

C = TypeVar("C", bound=type)
F = TypeVar("F", bound=Callable[..., Any])

#: Keyword arguments the construction hook consumes (never passed to ``__init__``).
CONSTRUCTION_KWARGS = ("remote_group", "instance_id")


def _install_construction_hooks(cls: type[Any]) -> None:
    original_new: Callable[..., Any] = cls.__new__
    original_init = cls.__init__

    def __new__(klass: type, *args: Any, **kwargs: Any) -> Any:
        session = runtime.current()
        group = kwargs.get("remote_group")
        if session is not None and group and session.builds_remotely(group):
            return session.build(klass, args, kwargs)
        if original_new is object.__new__:
            return object.__new__(klass)
        return original_new(klass, *args, **kwargs)

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        group = kwargs.pop("remote_group", None)
        kwargs.pop("instance_id", None)
        if group is not None:
            kwargs.pop("timeout", None)  # the construction's own bound, as for remote builds
        session = runtime.current()
        if session is not None:
            args, kwargs, _ = prepare_init_arguments(type(self), args, kwargs, session.global_mesh)
            if session.mode == "dask" and not session.in_worker:
                # Twinkle seeds the driver when it builds a component in-process in ray mode.
                seed_everything(session.seed, session.full_determinism)
        original_init(self, *args, **kwargs)
        if group is not None:
            try:
                self.remote_group = group
            except AttributeError:  # __slots__ without remote_group
                pass

    cls.__new__ = __new__  # type: ignore[assignment]
    cls.__init__ = __init__


@overload
def remote_class(execute: C) -> C: ...


@overload
def remote_class(execute: str = "all", *, max_restarts: int = 0) -> Callable[[C], C]: ...


def remote_class(execute: Any = "all", *, max_restarts: int = 0) -> Any:
    """Mark a class as a component that can be built in a device group's workers.

    Parameters
    ----------
    execute : {'all', 'first', 'peer'}, default 'all'
        ``'all'`` builds one instance per rank of the group; ``'first'`` one
        instance on the group's first rank (Datasets, DataLoaders), whose mesh
        is dp=1; ``'peer'`` the ranks picked by the creating process's own
        RANK/WORLD_SIZE.
    max_restarts : int, default 0
        How many times a component whose worker was lost is rebuilt
        automatically (with its original constructor arguments) before the
        next call; the call that met the loss still fails. 0: never, call
        ``handle.restart()`` yourself.

    Returns
    -------
    The class itself, with its spec recorded and its construction hooked:
    ``Cls(..., remote_group='g')`` in dask mode returns a handle whose
    ``@remote_function`` methods run on the group's instances. Without
    ``remote_group``, in local mode, or inside group ``g``'s own workers, the
    class is built in-process as usual.

    Raises
    ------
    ConfigurationError
        For an unknown ``execute``.

    Examples
    --------
    >>> @remote_class(execute="first")
    ... class Dataset:
    ...     def __init__(self, n):
    ...         self.n = n
    >>> Dataset(3).n
    3

    See Also
    --------
    remote_function, initialize
    """
    if isinstance(execute, type):
        return remote_class()(execute)
    spec = ClassSpec(execute=execute, max_restarts=max_restarts)

    def decorate(cls: C) -> C:
        if not isinstance(cls, type):
            raise TypeError(f"@remote_class decorates classes, got {cls!r}")
        setattr(cls, SPEC_ATTR, ClassSpec(execute=spec.execute, mesh_param=mesh_param_of(cls),
                                          max_restarts=spec.max_restarts))
        _install_construction_hooks(cls)
        return cls

    return decorate


def _is_method(fn: Any) -> bool:
    if not inspect.isfunction(fn):
        return False
    params = list(inspect.signature(fn).parameters)
    return bool(params) and params[0] == "self"


@overload
def remote_function(dispatch: F) -> F: ...


@overload
def remote_function(
    dispatch: Any = "slice",
    execute: str = "all",
    collect: Any = "none",
    sync: bool = False,
    lazy_collect: bool | None = None,
    timeout: float | None = None,
) -> Callable[[F], F]: ...


def remote_function(
    dispatch: Any = "slice",
    execute: str = "all",
    collect: Any = "none",
    sync: bool = False,
    lazy_collect: bool | None = None,
    timeout: float | None = None,
) -> Any:
    """Mark a method of a ``@remote_class`` as callable through the handle.

    Parameters
    ----------
    dispatch : {'slice', 'all', 'slice_dp'}, registered name or callable, default 'slice'
        How the inputs reach the target ranks. A callable is Twinkle's
        ``f(length, i, args, kwargs, device_mesh) -> (args_i, kwargs_i)``.
    execute : {'all', 'first'}, default 'all'
        Call every instance, or only the first with the whole input.
    collect : str or callable, default 'none'
        One of 'none', 'flatten', 'mean', 'avg', 'sum', 'first', 'last_pp',
        'last_pp_first', a registered name, or a callable
        ``f(results, device_mesh)``.
    sync : bool, default False
        Wait for every rank before returning (for collectives); errors raise
        at call time.
    lazy_collect : bool, optional
        Return a lazy result (True) or the collected value (False). None
        follows the session default; an instance's ``_lazy_collect``
        attribute overrides both.
    timeout : float, optional
        Seconds to wait for the ranks; past it, ``CallTimeoutError`` names the
        ranks that did not answer.

    Returns
    -------
    The function itself, with its spec recorded. Called on an in-process
    instance it runs as a plain method.

    Raises
    ------
    ConfigurationError
        For an unknown strategy name or bad option, when the decorator runs.

    Examples
    --------
    >>> @remote_class()
    ... class Model:
    ...     @remote_function(dispatch="slice_dp", collect="mean")
    ...     def forward(self, batch):
    ...         return sum(batch)

    See Also
    --------
    remote_class, LazyResult
    """
    if _is_method(dispatch):
        return remote_function()(dispatch)
    template = MethodSpec("<method>", dispatch, execute, collect, sync, lazy_collect, timeout)

    def decorate(fn: F) -> F:
        if not callable(fn):
            raise TypeError(f"@remote_function decorates methods, got {fn!r}")
        name = getattr(fn, "__name__", None) or "<method>"
        setattr(fn, SPEC_ATTR, dataclasses.replace(template, name=name))
        return fn

    return decorate
