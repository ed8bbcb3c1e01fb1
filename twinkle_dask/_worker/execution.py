"""How component code runs on a worker: one executor, one call at a time, in issue order.

A worker process is one rank of one group, and every component built on
that group lives in it, as Dask actors share their worker. What belongs to
the process is therefore shared by those components: ``os.environ``, the
random generators of ``random``, numpy and torch, ``sys.stdout``, torch's
default process group. Two threads touching that state at once give
silently wrong numbers: measured with a thread per component rank, two
colocated components issuing ``all_reduce`` while both calls were in flight
paired with each other's collectives in 42-75 % of the calls, and a method
read the neighbour's ``WORLD_SIZE`` in the middle of its own call.

So each worker has one :class:`Executor`: a single thread that runs every
``__init__`` and method of every component on the worker, one at a time, in
the order the calls arrived (the order the driver issued them). Before a job
runs, the executor makes the process look like the job's component rank:
its identity variables in ``os.environ``, its own random streams
(:class:`Streams`), its worker context and its output routing. Nothing else
changes that state while the job runs, so collectives of colocated
components can never pair with each other and ranks never diverge.

Calls made by component code (a method calling another component) are
marked *nested* by the calling worker. A nested call runs before the
driver's queued calls, and while a job waits for a call it made, its
executor runs the nested calls that arrive meanwhile (:meth:`Executor.wait`).
So a method calling a component on its own worker runs that call inline, and
two ranks of a group calling a component whose ranks sit on each other's
workers do not wait for each other forever.

Workers of an in-process cluster (``LocalCluster(processes=False)``,
``initialize(..., processes=False)``) share one process, so their executors
share it too (:meth:`Executor.share_process`): a job of any of them runs
only while no other in-process worker runs one (one process-wide lock,
released while a job waits for a call it made), with its worker's own
environment (``CUDA_VISIBLE_DEVICES``, ``TWINKLE_GPU``, ...) and identity
switched in, and its rank's random streams installed. Once a job has
ended the process's environment and random streams are the driver's again
(its reply can reach the driver a moment earlier: the reply leaves inside
the job). So component code on in-process worker ``k`` sees what it would
see in a process of its own, and so does driver code that does not run
while jobs do.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from .. import identity as _identity
from .. import reporting, runtime
from .._seed import seed_on_import

__all__ = ["Executor", "Streams", "apply_env"]


class Streams:
    """One component rank's random streams: Python ``random``, numpy's global ``RandomState``, torch CPU and CUDA.

    A rank's streams start from the session's seed when it is built and are
    swapped into the process around its own jobs only, so the numbers it
    draws are those a process of its own would draw, whatever its colocated
    neighbours build or draw. A stream not captured yet (``None``) starts
    from the seed when it is first installed: torch's, for instance, when a
    component imports torch after it was built.
    """

    __slots__ = ("cuda", "full_determinism", "np", "py", "seed", "torch")

    def __init__(self, seed: int, full_determinism: bool) -> None:
        self.seed = seed
        self.full_determinism = full_determinism
        self.py: Any = None
        self.np: Any = None
        self.torch: Any = None
        self.cuda: Any = None

    def install(self) -> None:
        """Make these streams the process's (executor thread only)."""
        if self.py is None:
            random.seed(self.seed)
        else:
            random.setstate(self.py)
        if self.np is None:
            np.random.seed(self.seed % (2**32))
        else:
            np.random.set_state(self.np)
        torch = _torch()
        if torch is None:
            seed_on_import(self.seed, self.full_determinism)
            return
        if self.torch is None:
            torch.manual_seed(self.seed)  # CPU and every CUDA device
            return
        torch.set_rng_state(self.torch)
        if _cuda_ready(torch):
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            else:
                torch.cuda.manual_seed_all(self.seed)

    def capture(self) -> None:
        """Save the process's streams as these (the rank stops being the one running)."""
        self.py = random.getstate()
        self.np = np.random.get_state()
        torch = _torch()
        if torch is not None:
            self.torch = torch.get_rng_state()
            if _cuda_ready(torch):
                self.cuda = torch.cuda.get_rng_state_all()


def _save_streams() -> tuple[Any, ...]:
    """The process's random streams as they are (random, numpy, torch CPU if imported)."""
    torch = _torch()
    return random.getstate(), np.random.get_state(), None if torch is None else torch.get_rng_state()


def _restore_streams(saved: tuple[Any, ...]) -> None:
    """Put back streams from :func:`_save_streams`; torch only if it was imported then."""
    py, state, torch_state = saved
    random.setstate(py)
    np.random.set_state(state)
    torch = _torch()
    if torch is not None and torch_state is not None:
        torch.set_rng_state(torch_state)


def _torch() -> Any:
    torch = sys.modules.get("torch")
    return torch if torch is not None and hasattr(torch, "get_rng_state") else None


def _cuda_ready(torch: Any) -> bool:
    cuda = getattr(torch, "cuda", None)
    return cuda is not None and bool(cuda.is_initialized())


def apply_env(env: Mapping[str, str | None]) -> None:
    """Set these variables of ``os.environ`` (``None``: unset), touching only those that differ."""
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        elif os.environ.get(key) != value:
            os.environ[key] = value


class _Process:
    """The process state an executor runs component code in: whose random streams are installed.

    Each worker process's executor has its own; the executors of in-process
    workers share one, with a lock that one job holds while it runs.
    """

    def __init__(self) -> None:
        self.active: Runner | None = None  # whose streams are installed in the process
        self.lock = threading.Lock()


_shared_process = _Process()


class Runner(Protocol):
    """What the executor runs jobs for: one component rank (``worker.RankHost``)."""

    identity: _identity.Identity
    streams: Streams
    context: Any
    closed: bool

    def run(self, job: Any) -> None:
        """Run ``job``. A job may have ``ready`` (a ``threading.Event``): set once its inputs arrived."""

    def left(self) -> None: ...

    def output(self, stream: str, text: str) -> None: ...

    def metrics(self, values: dict[str, Any]) -> None: ...


class Executor:
    """The single thread that runs the component code of one worker.

    Parameters
    ----------
    name : str
        The thread's name.
    """

    def __init__(self, name: str) -> None:
        self._cond = threading.Condition()
        self._queue: deque[tuple[Runner, Any] | Callable[[], None]] = deque()
        self._nested: deque[tuple[Runner, Any]] = deque()
        #: The component ranks whose jobs are running, outermost first (nested calls push).
        self.running: list[Runner] = []
        self._process = _Process()
        #: The worker's own environment, switched in before each job (``None``: unset the
        #: variable); ``None`` for a worker with a process of its own (see :meth:`share_process`).
        self.env: dict[str, str | None] | None = None
        self._holds = False  # executor thread: whether it holds the shared process's lock
        self._saved: dict[str, str | None] = {}  # the shared process's environment while no job ran
        self._saved_streams: tuple[Any, ...] = ()  # and its random streams
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ any thread
    def submit(self, runner: Runner, job: Any, *, nested: bool = False) -> None:
        """Queue ``job`` for ``runner``; nested jobs (made by component code) go first."""
        with self._cond:
            (self._nested if nested else self._queue).append((runner, job))
            self._cond.notify_all()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the executor thread, in order with the queued jobs."""
        with self._cond:
            self._queue.append(fn)
            self._cond.notify_all()

    def on_thread(self) -> bool:
        """Whether the calling thread is this executor's (component code is running)."""
        return threading.current_thread() is self._thread

    def is_running(self, runner: Runner) -> bool:
        """Whether a job of ``runner`` is running now (also one waiting for a call it made)."""
        return runner in self.running

    def forget(self, runner: Runner) -> None:
        """``runner`` is gone: its streams no longer own the process's (executor thread)."""
        if self._process.active is runner:
            self._process.active = None

    def share_process(self, env: Mapping[str, str | None]) -> None:
        """This worker shares its process with other workers (an in-process cluster).

        From now on its jobs run one at a time with those of every other
        executor that shares the process, each with its own worker's ``env``
        (and identity) switched into ``os.environ``. Call it before the
        worker's first job.

        Parameters
        ----------
        env : mapping of str to str or None
            The worker's own environment variables (``None``: unset), e.g.
            its ``CUDA_VISIBLE_DEVICES``.
        """
        self.env = dict(env)
        self._process = _shared_process

    # ------------------------------------------------------------------ executor thread
    def _main(self) -> None:
        while True:  # a daemon thread: it ends with its worker process
            with self._cond:
                while not (self._nested or self._queue):
                    self._cond.wait()
                item = self._nested.popleft() if self._nested else self._queue.popleft()
            if callable(item):
                item()  # bookkeeping, not component code: it leaves the process's state alone
            else:
                self._run(*item)
            del item  # nothing of a finished job stays alive until the next one arrives

    def _take(self) -> None:
        """Wait for the shared process; keep its environment and random streams while no job runs (the driver's)."""
        assert self.env is not None
        self._process.lock.acquire()
        self._holds = True
        self._saved = {k: os.environ.get(k) for k in (*_identity.ENV_VARS, *self.env)}
        self._saved_streams = _save_streams()

    def _give(self) -> None:
        """Put the process's environment and streams back as they were before the job; let another worker run."""
        process = self._process
        if process.active is not None:
            process.active.streams.capture()
            process.active = None
        _restore_streams(self._saved_streams)
        apply_env(self._saved)
        self._holds = False
        process.lock.release()

    def _exclusive(self) -> Any:
        """The shared process's lock, for an executor that shares it; otherwise nothing to take."""
        if self.env is None:
            return contextlib.nullcontext()
        return _Holding(self)

    def _run(self, runner: Runner, job: Any) -> None:
        ready = getattr(job, "ready", None)
        if ready is not None and self.env is not None:
            ready.wait()  # inputs may come from a job of another in-process worker: wait without the lock
        with self._exclusive():
            outer = self.running[-1] if self.running else None
            self._enter(runner)
            self.running.append(runner)
            try:
                runner.run(job)
            finally:
                self.running.pop()
                if runner not in self.running:
                    runner.left()
                if outer is not None:
                    self._enter(outer)

    def _enter(self, runner: Runner) -> None:
        # Process-wide state is switched here only, on the one thread that runs component code (of
        # this worker, or of every in-process worker while it holds the shared lock).
        process = self._process
        if process.active is not runner:
            if process.active is not None:
                process.active.streams.capture()
            runner.streams.install()
            process.active = runner
        if self.env is not None:
            apply_env(self.env)
        _identity.enter(runner.identity)
        runtime.enter_worker_context(runner.context)
        reporting.bind(runner)

    def wait(self, fut: concurrent.futures.Future[Any], timeout: float | None) -> None:
        """Block until ``fut`` is done; on the executor thread, run nested calls meanwhile.

        Raises
        ------
        concurrent.futures.TimeoutError
            If ``fut`` is not done within ``timeout`` seconds.
        """
        if not self.on_thread():
            done, _ = concurrent.futures.wait([fut], timeout)
            if not done:
                raise concurrent.futures.TimeoutError
            return

        def wake(_: Any) -> None:
            with self._cond:
                self._cond.notify_all()

        fut.add_done_callback(wake)
        deadline = None if timeout is None else time.monotonic() + timeout
        held = self._holds
        if held:  # other in-process workers run their jobs (perhaps the one awaited) meanwhile
            self._give()
        try:
            while True:
                with self._cond:
                    while not fut.done() and not self._nested:
                        remaining = None if deadline is None else deadline - time.monotonic()
                        if remaining is not None and remaining <= 0:
                            raise concurrent.futures.TimeoutError
                        self._cond.wait(remaining)
                    if fut.done():
                        return
                    item = self._nested.popleft()
                self._run(*item)
                del item
        finally:
            if held:
                self._take()
                if self.running:
                    self._enter(self.running[-1])


class _Holding:
    """An executor's turn in the process it shares (see :meth:`Executor.share_process`)."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor

    def __enter__(self) -> None:
        self.executor._take()

    def __exit__(self, *exc: object) -> None:
        self.executor._give()
