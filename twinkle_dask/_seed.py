"""Seeding random, numpy and torch, without importing torch for it.

Importing torch costs a second or more per worker; a component that never
uses torch should not pay it. If torch is already imported it is seeded at
once; otherwise a one-shot import hook seeds it the moment something imports
it, so user code that imports torch inside ``__init__`` still starts from the
global seed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import random
import sys
import threading
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["seed_everything", "seed_on_import", "set_determinism"]

_pending: dict[str, Any] = {}
_lock = threading.Lock()


def _seed_torch(torch: Any, seed: int, full_determinism: bool) -> None:
    torch.manual_seed(seed)
    if full_determinism:
        _deterministic_torch(torch)


def _deterministic_torch(torch: Any) -> None:
    torch.use_deterministic_algorithms(True, warn_only=True)
    if hasattr(torch, "backends") and hasattr(torch.backends, "cudnn"):
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


class _TorchSeedFinder(importlib.abc.MetaPathFinder):
    """Seeds torch right after its first import, then removes itself."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_seed(module: ModuleType) -> None:
            exec_module(module)
            with _lock:
                args = dict(_pending)
                _pending.clear()
            if args:
                _seed_torch(module, args["seed"], args["full_determinism"])

        loader.exec_module = exec_and_seed  # type: ignore[method-assign]
        return spec


def seed_everything(seed: int, full_determinism: bool = False) -> None:
    """Seed ``random``, ``numpy`` and ``torch`` (now, or when it is imported)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "manual_seed"):
        _seed_torch(torch, seed, full_determinism)
        return
    seed_on_import(seed, full_determinism)


def set_determinism(full_determinism: bool) -> None:
    """Ask an imported torch for deterministic kernels (process-wide; see :func:`seed_on_import` otherwise)."""
    if not full_determinism:
        return
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "use_deterministic_algorithms"):
        _deterministic_torch(torch)


def seed_on_import(seed: int, full_determinism: bool = False) -> None:
    """Seed torch with ``seed`` the moment something imports it (torch not imported yet)."""
    with _lock:
        _pending.update(seed=seed, full_determinism=full_determinism)
        if not any(isinstance(f, _TorchSeedFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _TorchSeedFinder())
