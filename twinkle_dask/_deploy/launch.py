"""Entry point of local-cluster worker processes: ``python -m twinkle_dask._deploy.launch``.

Workers are started as plain subprocesses (not multiprocessing children), so
the driver's script is never re-imported and needs no ``__main__`` guard, and
each worker is its process's main program, free to start children of its own
(torch DataLoader workers). A worker exits when its parent goes away.

``--zygote`` starts one process that imports the heavy modules once (Dask,
and torch when the driver uses it) and then forks a worker per request read
from stdin, so N workers start in about the time of one, share the imported
code's memory, and a worker that dies is forked again at once. GPU workers run
by dask-cuda are started as their own subprocesses instead.

The zygote is also the forked workers' nanny for memory: as Dask's nanny
does, it restarts a worker whose memory passes
``distributed.worker.memory.terminate`` (95 %) of its memory limit, so a
runaway component ends in a typed ``WorkerLostError`` and a fresh worker
instead of the machine's OOM killer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import selectors
import signal
import sys
import time
import traceback
from typing import Any


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m twinkle_dask._deploy.launch")
    parser.add_argument("scheduler")
    parser.add_argument("--name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--resources", default="{}")
    parser.add_argument("--parent", type=int, default=0)
    parser.add_argument("--death-timeout", type=float, default=60.0)
    parser.add_argument("--memory-limit", type=int, default=0, help="bytes (0: no limit)")
    parser.add_argument("--cuda", action="store_true", help="one dask-cuda worker per visible GPU")
    return parser.parse_args(argv)


def _preloads() -> list[str]:
    """twinkle's worker extension, then the preloads of Dask's configuration (``distributed.worker.preload``).

    A worker given ``preload=`` no longer reads that setting itself, so it is
    merged here: ``DASK_DISTRIBUTED__WORKER__PRELOAD`` works for the local
    cluster's workers as for any ``dask worker``.
    """
    import dask

    configured = dask.config.get("distributed.worker.preload", None) or []
    if isinstance(configured, str):
        configured = [configured]
    return ["twinkle_dask.worker", *(p for p in configured if p != "twinkle_dask.worker")]


def _make_worker(args: argparse.Namespace) -> Any:
    resources = json.loads(args.resources)
    if args.cuda:
        from dask_cuda import CUDAWorker

        return CUDAWorker(
            args.scheduler,
            name=args.name,
            host=args.host,
            nthreads=1,
            resources=" ".join(f"{k}={v}" for k, v in resources.items()),
            memory_limit=args.memory_limit,  # bytes; 0 switches the limit off
            preload=_preloads(),
            dashboard=False,
            death_timeout=args.death_timeout,
        )
    from distributed import Worker

    return Worker(
        args.scheduler,
        name=args.name,
        host=args.host,
        nthreads=1,
        resources=resources,
        memory_limit=args.memory_limit,  # bytes; 0 switches the limit off
        preload=_preloads(),
        dashboard=False,
        death_timeout=args.death_timeout,
    )


async def _run(args: argparse.Namespace) -> None:
    worker = _make_worker(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def watch_parent() -> None:
        while args.parent and os.getppid() == args.parent:
            await asyncio.sleep(1.0)
        stop.set()

    await worker
    watcher = asyncio.create_task(watch_parent())
    finished = asyncio.create_task(worker.finished())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({finished, stopped}, return_when=asyncio.FIRST_COMPLETED)
    watcher.cancel()
    # Closing races the worker's own heartbeats to a scheduler that may be closing too:
    # nothing said from here on is news.
    logging.getLogger("distributed").setLevel(logging.CRITICAL)
    if not finished.done():
        try:
            await asyncio.wait_for(worker.close(), 10)
        except Exception:  # timed out, or the scheduler went first
            pass


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    try:
        asyncio.run(_run(args))
    except KeyboardInterrupt:
        pass


# --------------------------------------------------------------------------- zygote
def _fork_worker(argv: list[str], env: dict[str, str]) -> int:
    """Fork a worker process running ``main(argv)`` with ``env``; returns its pid (in the parent)."""
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(env)
        import dask

        dask.config.refresh()  # the zygote read DASK_* variables before this worker's were set
        main([*argv, "--parent", str(os.getppid())])
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def zygote(preload: list[str]) -> None:
    """Import once, then fork workers on request; re-fork workers that die; stop on EOF."""
    import importlib

    import distributed  # noqa: F401  (the point: imported once, before forking)

    import twinkle_dask.worker  # noqa: F401
    from twinkle_dask._deploy.cluster import restart_delay

    for name in preload:
        try:
            importlib.import_module(name)
        except Exception:
            pass
    import dask
    import psutil

    terminate = dask.config.get("distributed.worker.memory.terminate")
    specs: dict[str, tuple[list[str], dict[str, str]]] = {}
    pids: dict[int, str] = {}
    limits: dict[str, int] = {}  # bytes, by worker name
    restarts: dict[str, int] = {}
    due: list[tuple[float, str]] = []
    stopping = False
    buffer = b""
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ)

    def stop_all(grace: float) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            reap()
            time.sleep(0.05)
        for pid in list(pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while pids:
            reap(block=True)

    def reap(block: bool = False) -> None:
        while pids:
            try:
                pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                pids.clear()
                return
            if pid == 0:
                return
            name = pids.pop(pid, None)
            if name is not None and not stopping:
                restarts[name] = restarts.get(name, 0) + 1
                print(f"twinkle_dask: worker {name} exited; starting it again (restart {restarts[name]})",
                      file=sys.stderr, flush=True)
                due.append((time.monotonic() + restart_delay(restarts[name]), name))
            if block:
                return

    def check_memory() -> None:
        # Dask's nanny: a worker past `terminate` of its limit is restarted (reap() starts it again).
        for pid, name in list(pids.items()):
            limit = limits.get(name, 0)
            if not limit or not terminate:
                continue
            try:
                rss = psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
            if rss > terminate * limit:
                print(f"twinkle_dask: worker {name} exceeded {terminate:.0%} memory budget "
                      f"({rss / 2**20:.0f} MiB of {limit / 2**20:.0f} MiB); restarting it",
                      file=sys.stderr, flush=True)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    while True:
        for _ in selector.select(timeout=0.2):
            data = os.read(0, 1 << 16)
            if not data:
                stopping = True
                stop_all(5.0)
                return
            buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            request = json.loads(line)
            if request["op"] == "spawn":
                specs[request["name"]] = (request["argv"], request["env"])
                argv = request["argv"]
                if "--memory-limit" in argv:
                    limits[request["name"]] = int(argv[argv.index("--memory-limit") + 1])
                pids[_fork_worker(request["argv"], request["env"])] = request["name"]
            elif request["op"] == "stop":
                stopping = True
                stop_all(float(request.get("grace", 5.0)))
                return
        check_memory()
        reap()
        now = time.monotonic()
        for when, name in [d for d in due if d[0] <= now]:
            due.remove((when, name))
            argv, env = specs[name]
            pids[_fork_worker(argv, env)] = name


if __name__ == "__main__":
    if sys.argv[1:2] == ["--zygote"]:
        zygote([m for m in (sys.argv[2] if len(sys.argv) > 2 else "").split(",") if m])
    else:
        main()
