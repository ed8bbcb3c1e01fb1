"""Entry point of a local-cluster worker process: ``python -m twinkle_dask._launch``.

Workers are started as plain subprocesses (not multiprocessing children), so
the driver's script is never re-imported and needs no ``__main__`` guard, and
the worker is the process's main program, free to start children of its own
(torch DataLoader workers). The worker exits when its parent, the driver,
goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from typing import Any


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m twinkle_dask._launch")
    parser.add_argument("scheduler")
    parser.add_argument("--name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--resources", default="{}")
    parser.add_argument("--parent", type=int, default=0)
    parser.add_argument("--death-timeout", type=float, default=60.0)
    parser.add_argument("--cuda", action="store_true", help="one dask-cuda worker per visible GPU")
    return parser.parse_args(argv)


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
            memory_limit=0,
            preload=["twinkle_dask.worker"],
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
        memory_limit=0,
        preload=["twinkle_dask.worker"],
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
        except (asyncio.TimeoutError, Exception):
            pass


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    try:
        asyncio.run(_run(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
