"""Starting a local cluster for the device groups, or mapping them onto an existing one.

Local: one scheduler in the driver process (bound to localhost) and one
worker *subprocess* per group rank, named ``<group>-<i>`` and tagged with the
Dask resource ``twinkle-<group>`` (with ``processes=False``: workers in the
driver process, over ``inproc://`` comms, for fast tests). Existing: group ranks are mapped onto the
cluster's workers, preferring workers already tagged for a group
(``dask worker --resources twinkle-<group>=1``) and tagging the rest.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dask.config
import psutil
from distributed import Client, Scheduler, Security, SpecCluster, Worker
from distributed.comm.addressing import parse_address, parse_host_port
from distributed.comm.registry import get_backend
from distributed.deploy.spec import ProcessInterface
from distributed.worker_memory import parse_memory_limit

from ..dashboard import TwinkleSchedulerPlugin
from ..exceptions import ClusterUnreachableError, ConfigurationError, ConfigurationTypeError
from ..mesh import ResolvedGroup
from ..runtime import GroupPlacement
from ..worker import TwinklePlugin

__all__ = [
    "ClusterConnection",
    "check_cluster_options",
    "connect_cluster",
    "resolve_memory_limit",
    "resource_name",
    "share_in_process_workers",
    "start_in_process_cluster",
    "start_local_cluster",
    "stop_local_cluster",
]

logger = logging.getLogger(__name__)


def resource_name(group: str) -> str:
    """The Dask resource that tags the workers of ``group``."""
    return f"twinkle-{group}"


def _worker_name(group: str, index: int) -> str:
    return f"{group}-{index}"


@dataclass
class ClusterConnection:
    """A client, the cluster it owns (if any), and where each group's workers are."""

    client: Client
    cluster: SpecCluster | None
    placements: dict[str, GroupPlacement]
    owns_client: bool
    zygote: Zygote | None = None
    #: A private folder holding in-memory TLS keys and certificates as files for the workers.
    tls_dir: tempfile.TemporaryDirectory[str] | None = None


def restart_delay(restarts: int) -> float:
    """Seconds before a lost worker is started again: longer with each restart, at most 5."""
    return min(5.0, 0.2 * restarts)


class WorkerProcess(ProcessInterface):
    """A Dask worker in a subprocess of the driver (``python -m twinkle_dask._deploy.launch``).

    With ``cuda=True`` the subprocess runs dask-cuda's ``CUDAWorker``: one
    worker per GPU in its CUDA_VISIBLE_DEVICES.
    """

    def __init__(self, scheduler: str, name: str, resources: dict[str, float], env: dict[str, str],
                 host: str = "127.0.0.1", cuda: bool = False, memory_limit: int = 0) -> None:
        self.scheduler = scheduler
        self.memory_limit = memory_limit
        self.worker_name = name
        self.cuda = cuda
        self.resources = resources
        self.env = env
        self.host = host
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None
        super().__init__()

    async def _spawn(self) -> None:
        cmd = [sys.executable, "-m", "twinkle_dask._deploy.launch", self.scheduler, "--name", self.worker_name,
               "--host", self.host, "--resources", json.dumps(self.resources), "--parent", str(os.getpid()),
               "--memory-limit", str(self.memory_limit)]
        if self.cuda:
            cmd.append("--cuda")
        # Its own session: Ctrl-C in the driver's terminal reaches the driver only (the worker exits
        # when the driver does: it watches its parent).
        self.process = await asyncio.create_subprocess_exec(*cmd, env=self.env, stdin=asyncio.subprocess.DEVNULL,
                                                            start_new_session=True)

    async def start(self) -> None:
        await self._spawn()
        self._watch = asyncio.get_running_loop().create_task(self._respawn_when_lost())
        await super().start()

    async def _respawn_when_lost(self) -> None:
        """Like a nanny: a worker process that dies is started again (same name, same group tag)."""
        while not self._stopping:
            proc = self.process
            if proc is None:
                return
            code = await proc.wait()
            if self._stopping:
                return
            self.restarts += 1
            logger.warning("twinkle_dask: worker %s exited with code %s; starting it again (restart %d)",
                           self.worker_name, code, self.restarts)
            await asyncio.sleep(restart_delay(self.restarts))
            if not self._stopping:
                await self._spawn()

    async def stop(self, grace: float = 5.0) -> None:
        """Ask the worker to close itself (SIGTERM), then kill it after ``grace`` seconds."""
        self._stopping = True
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def close(self) -> None:
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        proc = self.process
        if proc is not None and proc.returncode is None:
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
            except psutil.Error:
                pass
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self.process = None
        await super().close()


class Zygote:
    """The driver's end of ``python -m twinkle_dask._deploy.launch --zygote``: forks CPU workers on request."""

    def __init__(self, memory_limit: int = 0) -> None:
        self.process: asyncio.subprocess.Process | None = None
        self.memory_limit = memory_limit

    async def start(self, env: dict[str, str], preload: Sequence[str]) -> None:
        # Its own session, so Ctrl-C in the driver's terminal does not reach it or its workers; it
        # exits when the driver goes away (its stdin closes), and its workers when it does.
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "twinkle_dask._deploy.launch", "--zygote", ",".join(preload),
            stdin=asyncio.subprocess.PIPE, env=env, start_new_session=True,
        )

    async def spawn(self, scheduler: str, workers: Sequence[tuple[str, dict[str, float], dict[str, str]]],
                    host: str = "127.0.0.1") -> None:
        """Fork one worker per (name, resources, env)."""
        assert self.process is not None and self.process.stdin is not None
        for name, resources, env in workers:
            argv = [scheduler, "--name", name, "--host", host, "--resources", json.dumps(resources),
                    "--memory-limit", str(self.memory_limit)]
            line = json.dumps({"op": "spawn", "name": name, "argv": argv, "env": env})
            self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()

    async def stop(self, grace: float = 5.0) -> None:
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        try:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"op": "stop", "grace": grace}).encode() + b"\n")
            await proc.stdin.drain()
            await asyncio.wait_for(proc.wait(), grace + 5)
        except (TimeoutError, ConnectionError, BrokenPipeError):
            proc.kill()
            await proc.wait()


def _preload_modules() -> list[str]:
    """Heavy modules the zygote imports once for every worker: torch if the driver uses it."""
    return [m for m in ("numpy", "torch") if m in sys.modules]


def _worker_env(group: ResolvedGroup, index: int) -> dict[str, str]:
    env = dict(os.environ)
    path = [os.getcwd() if p == "" else p for p in sys.path]
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join(path + ([existing] if existing else []))
    env["PYTHONUNBUFFERED"] = "1"
    env["CLUSTER_NAME"] = group.name
    env["TWINKLE_GROUP"] = group.name
    env["TWINKLE_GROUP_INDEX"] = str(index)
    env.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    # As Dask's nanny does before it starts a worker (one thread per BLAS/OpenMP pool, ...); forked
    # workers inherit it from the zygote, which starts with this environment. Except the nanny's
    # MALLOC_TRIM_THRESHOLD_: setting it switches off glibc's dynamic mmap threshold, so every
    # tensor buffer above 128 KiB is a fresh mmap whose pages fault in on each call (measured: a
    # 4 x 4 MiB hand-off 24 ms instead of 17 ms). Workers return freed memory by trimming after
    # results are released instead (worker.TwinkleWorker.trim_soon).
    for var, value in (dask.config.get("distributed.nanny.pre-spawn-environ") or {}).items():
        if var != "MALLOC_TRIM_THRESHOLD_":
            env[str(var)] = str(value)
    env["DASK_DISTRIBUTED__WORKER__DAEMON"] = "False"
    # As Dask's nanny hands its worker the configuration of the process that started it: settings made
    # with dask.config.set in the driver (worker preloads, twinkle-dask options) reach the workers too;
    # DASK_* variables still override them.
    try:
        env["DASK_INTERNAL_INHERIT_CONFIG"] = dask.config.serialize(dask.config.global_config)
    except (TypeError, ValueError) as exc:  # a value that is not JSON: the workers read their own
        logger.warning("the driver's Dask configuration cannot be passed to the workers: %s", exc)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def gpu_count() -> int:
    """GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else what NVML or nvidia-smi reports."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def _physical(devices: Sequence[int]) -> list[int]:
    """Group device ranks as ids in this process's CUDA_VISIBLE_DEVICES numbering.

    Devices beyond that list (simulated GPUs) keep their group numbering.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(devices)
    ids = [d.strip() for d in visible.split(",") if d.strip()]
    return [int(ids[d]) if d < len(ids) and ids[d].isdigit() else d for d in devices]


def rotated_devices(devices: Sequence[int], index: int, per_worker: int) -> str:
    """CUDA_VISIBLE_DEVICES of worker ``index``: its own devices first, then the group's others.

    The same rotation dask-cuda uses (``cuda_visible_devices``), by ``per_worker`` devices.
    """
    devices = list(devices)
    start = index * per_worker
    return ",".join(str(d) for d in devices[start:] + devices[:start])


def _uses_dask_cuda(group: ResolvedGroup, simulate: bool) -> bool:
    if group.gpus_per_worker != 1 or importlib.util.find_spec("dask_cuda") is None:
        return False
    # dask-cuda's own switch for running its worker code without a GPU (its test suite uses it).
    return not simulate or os.environ.get("DASK_CUDA_TEST_DISABLE_DEVICE_SPECIFIC", "0") != "0"


def _gpu_worker_specs(group: ResolvedGroup, simulate: bool) -> dict[str, Any]:
    flat = _physical([d for devs in group.devices for d in devs])
    tags = {resource_name(group.name): 1}
    if _uses_dask_cuda(group, simulate):
        env = _worker_env(group, 0)
        env.update(CUDA_VISIBLE_DEVICES=",".join(map(str, flat)), TWINKLE_GPU="1")
        n = group.num_workers
        name = group.name if n > 1 else _worker_name(group.name, 0)
        return {name: {
            "cls": WorkerProcess,
            "options": {"resources": tags, "env": env, "cuda": True},
            **({"group": [f"-{i}" for i in range(n)]} if n > 1 else {}),
        }}
    if not simulate and importlib.util.find_spec("dask_cuda") is None:
        logger.warning("twinkle_dask: dask-cuda is not installed; GPU group %r runs plain Dask workers with "
                       "CUDA_VISIBLE_DEVICES set (pip install twinkle-dask[cuda] for dask-cuda workers)",
                       group.name)
    specs = {}
    for index in range(group.num_workers):
        env = _worker_env(group, index)
        env["CUDA_VISIBLE_DEVICES"] = rotated_devices(flat, index, group.gpus_per_worker)
        env["TWINKLE_GPU"] = "simulated" if simulate else "1"
        if simulate:  # the devices are pretend: Dask must not ask NVML about them
            env["DASK_DISTRIBUTED__DIAGNOSTICS__NVML"] = "False"
        specs[_worker_name(group.name, index)] = {
            "cls": WorkerProcess, "options": {"resources": tags, "env": env},
        }
    return specs


#: What an in-process worker's executor switches into ``os.environ`` before each job (besides the
#: component's identity): what a worker process of its own would have in its environment.
IN_PROCESS_ENV = ("CUDA_VISIBLE_DEVICES", "TWINKLE_GPU", "TWINKLE_GROUP", "TWINKLE_GROUP_INDEX")


def _in_process_env(group: ResolvedGroup | None, index: int) -> dict[str, str | None]:
    """The environment of in-process worker ``index`` of ``group`` (``None``: a worker of another cluster).

    As for a worker process: the group's name and index, and for a
    (simulated) GPU group ``CUDA_VISIBLE_DEVICES`` rotated as dask-cuda does
    and ``TWINKLE_GPU=simulated``; other workers keep the driver's
    ``CUDA_VISIBLE_DEVICES``. ``None`` unsets a variable.
    """
    env: dict[str, str | None] = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                  "TWINKLE_GPU": None, "TWINKLE_GROUP": None, "TWINKLE_GROUP_INDEX": None}
    if group is None:
        return env
    env.update(TWINKLE_GROUP=group.name, TWINKLE_GROUP_INDEX=str(index))
    if group.is_gpu:
        flat = _physical([d for devs in group.devices for d in devs])
        env.update(CUDA_VISIBLE_DEVICES=rotated_devices(flat, index, group.gpus_per_worker), TWINKLE_GPU="simulated")
    return env


def share_in_process_workers(client: Client, envs: dict[str, dict[str, str | None]] | None = None) -> list[str]:
    """Make the workers of ``client`` that live in this process share it (``Executor.share_process``).

    Their component code then runs one job at a time across them, each job
    with its own worker's environment (``envs``, by worker name; the
    driver's ``CUDA_VISIBLE_DEVICES`` and no group variables for others) and
    identity. Returns the addresses of those workers.
    """
    envs = envs or {}
    addresses = set(client.scheduler_info(n_workers=-1)["workers"])
    shared = []
    for worker in list(Worker._instances):
        ext = worker.extensions.get("twinkle")
        if worker.address in addresses and ext is not None:
            ext.executor.share_process(envs.get(str(worker.name), _in_process_env(None, 0)))
            shared.append(worker.address)
    return sorted(shared)


def resolve_memory_limit(value: Any) -> int:
    """Bytes of memory each local worker may use (0: no limit), from what Dask's ``memory_limit`` accepts.

    ``'auto'`` (Dask's default: the machine's memory, or the cgroup's, shared
    by the cores), bytes as an int or a string (``'4GiB'``), a fraction of
    the machine's memory (``0.5``), or ``None``/``0`` for no limit.

    Raises
    ------
    ConfigurationError
        For another value (``ConfigurationTypeError``, also a ``TypeError``, for another type).
    """
    valid = ("'auto' (Dask's default), bytes (4294967296 or '4GiB'), a fraction of the machine's memory (0.5), "
             "or None/0 for no limit")
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigurationTypeError(f"initialize: memory_limit must be {valid}, got {value!r}")
    bad = isinstance(value, (int, float)) and value < 0
    parsed: int | None = None
    if not bad:
        try:
            parsed = parse_memory_limit(value, nthreads=1, logger=logger)
        except (TypeError, ValueError):
            bad = True
    if bad:
        raise ConfigurationError(f"initialize: memory_limit must be {valid}, got {value!r}")
    return parsed or 0


def _write_private(folder: str, name: str, text: str) -> str:
    path = os.path.join(folder, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


_TLS_VERSIONS = {ssl.TLSVersion.TLSv1_2: 1.2, ssl.TLSVersion.TLSv1_3: 1.3}


def check_local_security(security: Security) -> None:
    """Raise ``ConfigurationError`` if ``security`` lacks a certificate a local TLS cluster needs."""
    needed = ("tls_ca_file", "tls_scheduler_cert", "tls_worker_cert", "tls_client_cert")
    missing = [field for field in needed if not getattr(security, field)]
    if missing:
        raise ConfigurationError(
            f"initialize: security={security!r} lacks {missing} for a local TLS cluster (its scheduler, "
            f"workers and client each need a certificate signed by the CA); pass Security.temporary() or "
            f"security=True for temporary ones, or Security(tls_ca_file=..., tls_scheduler_cert=..., "
            f"tls_worker_cert=..., tls_client_cert=..., ...)"
        )


def tls_worker_env(security: Security) -> tuple[dict[str, str], tempfile.TemporaryDirectory[str] | None]:
    """Dask configuration variables that give worker processes ``security``, as Dask reads them.

    Keys and certificates held in memory (``Security.temporary()``) are written
    to a private folder (mode 0700, files 0600) that the caller removes at
    shutdown; the workers then read the files, as they would the files of a
    ``Security`` built from paths.

    Raises
    ------
    ConfigurationError
        If ``security`` lacks what a local cluster needs.
    """
    check_local_security(security)
    folder: tempfile.TemporaryDirectory[str] | None = None
    env = {"DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": str(bool(security.require_encryption))}
    fields = ("CA_FILE", "WORKER__CERT", "WORKER__KEY", "CLIENT__CERT", "CLIENT__KEY", "CIPHERS")
    for name in fields:
        value = getattr(security, "tls_" + name.lower().replace("__", "_"))  # Security's slots, e.g. tls_worker_cert
        if not value:
            continue
        if name != "CIPHERS" and "\n" in value:  # PEM text held in memory: hand it over as a private file
            if folder is None:
                folder = tempfile.TemporaryDirectory(prefix="twinkle-dask-tls-")
            value = _write_private(folder.name, name.lower().replace("__", "-").replace("_", "-") + ".pem", value)
        env[f"DASK_DISTRIBUTED__COMM__TLS__{name}"] = value
    for field, var in (("tls_min_version", "MIN_VERSION"), ("tls_max_version", "MAX_VERSION")):
        version = _TLS_VERSIONS.get(getattr(security, field))
        if version is not None:
            env[f"DASK_DISTRIBUTED__COMM__TLS__{var}"] = str(version)
    return env, folder


def start_local_cluster(
    groups: Sequence[ResolvedGroup],
    *,
    dashboard_address: str | None = "127.0.0.1:8787",
    simulate_gpus: bool = False,
    start_timeout: float = 120.0,
    security: Security | bool | None = None,
    memory_limit: int = 0,
    processes: bool = True,
) -> ClusterConnection:
    """Start a scheduler in this process and one worker subprocess per group rank.

    GPU groups run through dask-cuda (one worker per GPU, CUDA_VISIBLE_DEVICES
    rotated so each worker's own GPU is device 0); ``gpus_per_worker > 1``
    workers get their devices first. With ``simulate_gpus`` GPU groups run as
    CPU workers with exactly the environment and tags a GPU worker would get.
    With ``security`` (a ``distributed.Security``, or True for
    ``Security.temporary()``) the scheduler, the workers and every twinkle
    channel speak TLS. With ``processes=False`` the workers run in this
    process instead (see :func:`start_in_process_cluster`).
    """
    if security is True:
        security = Security.temporary()
    if not processes:
        return start_in_process_cluster(groups, dashboard_address=dashboard_address, simulate_gpus=simulate_gpus,
                                        start_timeout=start_timeout,
                                        security=security if isinstance(security, Security) else None)
    tls_env: dict[str, str] = {}
    tls_dir = None
    if isinstance(security, Security):
        tls_env, tls_dir = tls_worker_env(security)
    else:
        security = None
    gpu_groups = [g for g in groups if g.is_gpu]
    if gpu_groups and not simulate_gpus:
        have = gpu_count()
        for group in gpu_groups:
            needed = max(d for devs in group.devices for d in devs) + 1
            if needed > have:
                raise ConfigurationError(
                    f"DeviceGroup {group.name!r} asks for GPU device {needed - 1} but this machine has "
                    f"{have} GPU(s); give the group fewer or other ranks, or pass "
                    f"initialize(..., simulate_gpus=True) to run GPU groups as CPU workers (for tests)"
                )
    scheduler = {
        "cls": Scheduler,
        "options": {
            "host": "127.0.0.1",
            "port": 0,
            "dashboard": dashboard_address is not None,
            "dashboard_address": dashboard_address or ":0",
            **({"protocol": "tls://", "security": security} if security is not None else {}),
        },
    }
    workers: dict[str, Any] = {}  # dask-cuda subprocesses, managed by the SpecCluster
    forked: list[tuple[str, dict[str, float], dict[str, str]]] = []  # plain workers, forked by the zygote
    for group in groups:
        specs: dict[str, Any] = _gpu_worker_specs(group, simulate_gpus) if group.is_gpu else {
            _worker_name(group.name, index): {
                "cls": WorkerProcess,
                "options": {"resources": {resource_name(group.name): 1}, "env": _worker_env(group, index)},
            }
            for index in range(group.num_workers)
        }
        for name, spec in specs.items():
            spec["options"]["env"].update(tls_env)
            if spec["options"].get("cuda"):
                spec["options"]["memory_limit"] = memory_limit
                workers[name] = spec
            else:
                forked.append((name, spec["options"]["resources"], spec["options"]["env"]))
    total = sum(g.num_workers for g in groups)
    try:
        cluster = SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.WARNING,
                              name="twinkle-dask", asynchronous=False, security=security)
    except BaseException:
        if tls_dir is not None:
            tls_dir.cleanup()
        raise
    zygote = Zygote(memory_limit)
    try:
        if forked:
            common = {k: v for k, v in forked[0][2].items() if all(env.get(k) == v for _, _, env in forked)}
            cluster.sync(zygote.start, common, _preload_modules())
            cluster.sync(zygote.spawn, cluster.scheduler_address, forked)
        client = Client(cluster, direct_to_workers=True, set_as_default=True)
        client.wait_for_workers(total, timeout=start_timeout)
        placements = _placements_by_name(client, groups)
        _install_scheduler_plugin(client)
    except BaseException:
        stop_local_cluster(cluster, 10, zygote)
        if tls_dir is not None:
            tls_dir.cleanup()
        raise
    return ClusterConnection(client, cluster, placements, owns_client=True, zygote=zygote, tls_dir=tls_dir)


def start_in_process_cluster(
    groups: Sequence[ResolvedGroup],
    *,
    dashboard_address: str | None = None,
    simulate_gpus: bool = False,
    start_timeout: float = 60.0,
    security: Security | None = None,
) -> ClusterConnection:
    """Start a scheduler and one worker per group rank in this process, for fast tests.

    As ``LocalCluster(processes=False)``: the scheduler and workers talk over
    ``inproc://`` comms (``tls://`` on localhost with ``security``), workers
    are named ``<group>-<i>`` and tagged ``twinkle-<group>``. They share this
    process, so their component code runs one job at a time, each with its
    worker's own environment switched in: a (simulated) GPU worker ``k`` sees
    ``CUDA_VISIBLE_DEVICES`` rotated as dask-cuda rotates it and
    ``TWINKLE_GPU=simulated``. The workers have no memory limit (Dask would
    measure the whole process against it).

    Raises
    ------
    ConfigurationError
        For a GPU group without ``simulate_gpus`` (in-process workers share
        one CUDA context, so real GPUs cannot be split between them).
    """
    for group in groups:
        if group.is_gpu and not simulate_gpus:
            raise ConfigurationError(
                f"DeviceGroup {group.name!r} is a GPU group, and in-process workers (processes=False) share "
                f"one CUDA context; pass simulate_gpus=True to run it as CPU workers with the environment a GPU "
                f"worker would get (for tests), or processes=True for a worker process per GPU"
            )
    protocol = "tls://" if security is not None else "inproc://"
    scheduler = {
        "cls": Scheduler,
        "options": {
            "protocol": protocol,
            "dashboard": dashboard_address is not None,
            "dashboard_address": dashboard_address or ":0",
            **({"host": "127.0.0.1", "port": 0, "security": security} if security is not None else {}),
        },
    }
    workers: dict[str, Any] = {}
    envs: dict[str, dict[str, str | None]] = {}
    for group in groups:
        for index in range(group.num_workers):
            name = _worker_name(group.name, index)
            envs[name] = _in_process_env(group, index)
            workers[name] = {"cls": Worker, "options": {
                "nthreads": 1, "memory_limit": 0, "resources": {resource_name(group.name): 1},
                "plugins": {TwinklePlugin()},
                **({"host": "127.0.0.1", "security": security} if security is not None else {}),
            }}
    cluster = SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.WARNING,
                          name="twinkle-dask", asynchronous=False, security=security)
    try:
        client = Client(cluster, direct_to_workers=True, set_as_default=True)
        client.wait_for_workers(len(workers), timeout=start_timeout)
        share_in_process_workers(client, envs)
        placements = _placements_by_name(client, groups)
        _install_scheduler_plugin(client)
    except BaseException:
        cluster.close(timeout=10)
        raise
    return ClusterConnection(client, cluster, placements, owns_client=True)
async def use_async_client(connection: ClusterConnection) -> None:
    """Give an async driver an asynchronous client on its running loop in place of the connection's own.

    The connection's synchronous client (made for a local cluster or an
    ``address``) is closed; the new one is owned by the session and closed
    at shutdown.
    """
    old = connection.client
    new = await Client(old.scheduler.address, asynchronous=True, security=old.security,  # type: ignore[union-attr]
                       direct_to_workers=True, set_as_default=False)
    connection.client, connection.owns_client = new, True
    await asyncio.to_thread(old.close, 5)


async def _stop_workers(cluster: SpecCluster, grace: float, zygote: Zygote | None) -> None:
    procs = [w for w in cluster.workers.values() if isinstance(w, WorkerProcess)]
    stops = [w.stop(grace) for w in procs] + ([zygote.stop(grace)] if zygote is not None else [])
    await asyncio.gather(*stops, return_exceptions=True)


def stop_local_cluster(cluster: SpecCluster, timeout: float = 20.0, zygote: Zygote | None = None) -> None:
    """Stop the worker processes (each unregisters itself), then the scheduler."""
    try:
        cluster.sync(_stop_workers, cluster, min(5.0, timeout / 2), zygote, callback_timeout=timeout / 2 + 1)
    except Exception:
        logger.debug("twinkle_dask: stopping worker processes failed", exc_info=True)
    cluster.close(timeout=timeout / 2)


def _natural(name: Any) -> tuple[Any, ...]:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(name)))


def _placements_by_name(client: Client, groups: Sequence[ResolvedGroup]) -> dict[str, GroupPlacement]:
    info = client.scheduler_info(n_workers=-1)["workers"]
    by_name = {str(w["name"]): (addr, w) for addr, w in info.items()}
    out = {}
    for group in groups:
        chosen = [by_name[_worker_name(group.name, i)] for i in range(group.num_workers)]
        out[group.name] = GroupPlacement(
            group.name, group.device_type, tuple(a for a, _ in chosen), tuple(w["host"] for _, w in chosen),
            group.devices, group.gpus_per_worker, tuple(str(w["name"]) for _, w in chosen),
        )
    return out


async def _tag_worker(dask_worker: Any, resources: dict[str, float]) -> None:
    await dask_worker.set_resources(**{**dask_worker.state.total_resources, **resources})


def _install_scheduler_plugin(client: Client) -> None:
    try:
        client.register_plugin(TwinkleSchedulerPlugin(), name=TwinkleSchedulerPlugin.name)
    except Exception as exc:  # twinkle_dask is not importable where the scheduler runs
        logger.warning("twinkle_dask: component calls will not show on the dashboard's Task Stream (%s); "
                       "install twinkle-dask where the scheduler runs", exc)


def _check_address(name: str, value: Any, example: str, *, scheduler: bool) -> None:
    if not isinstance(value, str):
        raise ConfigurationTypeError(f"initialize: {name} must be a string like {example!r}, got {value!r}")
    try:
        scheme, location = parse_address(value) if scheduler else ("tcp", value)
        get_backend(scheme)
        if scheme in ("tcp", "tls"):
            parse_host_port(location)
    except ValueError as exc:
        raise ConfigurationError(
            f"initialize: {name} {value!r} is not valid ({exc}); pass one like {example!r}"
        ) from None


def check_cluster_options(*, address: Any, client: Any, security: Any, dashboard_address: Any) -> None:
    """Check ``initialize``'s cluster options before anything is started or connected.

    Raises
    ------
    ConfigurationTypeError
        For an option of the wrong type.
    ConfigurationError
        For an address that cannot be parsed or conflicting options.
    """
    if address is not None:
        _check_address("address", address, "tcp://10.0.0.1:8786", scheduler=True)
    if client is not None and not isinstance(client, Client):
        raise ConfigurationTypeError(
            f"initialize: client must be a distributed.Client, got {client!r}; pass client=Client(...), "
            f"or address='tcp://host:8786' to connect to a scheduler"
        )
    if address is not None and client is not None:
        raise ConfigurationError(
            f"initialize: pass address or client, not both (got address={address!r} and client={client!r})"
        )
    if security is not None and security is not True and not isinstance(security, Security):
        raise ConfigurationTypeError(
            f"initialize: security must be a distributed.Security (e.g. Security.temporary()), True for a "
            f"temporary one, or None, got {security!r}"
        )
    if security is True and (address is not None or client is not None):
        raise ConfigurationError(
            "initialize: security=True makes temporary certificates for a local cluster; to connect to an "
            "existing cluster pass distributed.Security(tls_ca_file=..., tls_client_cert=..., tls_client_key=...)"
        )
    if isinstance(security, Security) and address is None and client is None:
        check_local_security(security)
    if dashboard_address is not None:
        _check_address("dashboard_address", dashboard_address, "127.0.0.1:8787", scheduler=False)


def connect_cluster(
    groups: Sequence[ResolvedGroup],
    *,
    address: str | None = None,
    client: Client | None = None,
    security: Any = None,
    nproc_per_node: int | None = None,
) -> ClusterConnection:
    """Map the groups onto the workers of an existing cluster."""
    owns = client is None
    if client is None:
        if security is None:
            security = Security()  # what dask.config says (distributed.comm.tls.*, require-encryption)
        if str(address).startswith("tls://") and security.get_connection_args("client").get("ssl_context") is None:
            raise ConfigurationError(
                f"the scheduler at {address} speaks TLS: pass security=distributed.Security(tls_ca_file=..., "
                f"tls_client_cert=..., tls_client_key=..., require_encryption=True) to initialize(), or set "
                f"distributed.comm.tls.ca-file and distributed.comm.tls.client.cert/key in dask.config"
            )
        try:
            client = Client(address, security=security, direct_to_workers=True, set_as_default=False)
        except OSError as exc:  # Dask's connect timeout passed (distributed.comm.timeouts.connect)
            raise ClusterUnreachableError(
                f"no Dask scheduler answered at {address!r} ({exc}). Check the address and port, that the "
                f"scheduler runs (`dask scheduler`) and that this machine can reach it; or omit address to "
                f"start a local cluster"
            ) from exc
    try:
        try:
            client.register_plugin(TwinklePlugin(), name=TwinklePlugin.name)
        except Exception as exc:
            raise ConfigurationError(
                f"could not install the twinkle extension on the cluster's workers ({exc}); install "
                f"twinkle-dask where the workers run, or start them with --preload twinkle_dask.worker"
            ) from exc
        share_in_process_workers(client)  # those of LocalCluster(processes=False), if any
        placements = map_groups(client, groups, nproc_per_node)
        _install_scheduler_plugin(client)
    except BaseException:
        if owns:
            client.close()
        raise
    return ClusterConnection(client, None, placements, owns_client=owns)


def _visible_devices() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def _first_device(visible: str | None) -> int | None:
    first = (visible or "").split(",")[0].strip()
    return int(first) if first.isdigit() else None


def map_groups(client: Client, groups: Sequence[ResolvedGroup], nproc_per_node: int | None = None
               ) -> dict[str, GroupPlacement]:
    """Choose (and tag) the workers of each group on an existing cluster.

    Workers already tagged ``twinkle-<group>`` are used first. CPU groups then
    take untagged workers without GPUs in (host, name) order. GPU groups take
    untagged GPU workers by host and device index: group device ``d`` is
    device ``d % nproc_per_node`` (the first entry of the worker's
    CUDA_VISIBLE_DEVICES) on the ``d // nproc_per_node``-th host.
    """
    info = client.scheduler_info(n_workers=-1)["workers"]
    visible = client.run(_visible_devices)
    device = {addr: _first_device(visible.get(addr)) for addr in info}
    order = sorted(info, key=lambda a: (info[a]["host"], _natural(info[a].get("name", a))))
    tagged: dict[str, list[str]] = {}
    free: list[str] = []
    for addr in order:
        tags = [r for r in (info[addr].get("resources") or {}) if r.startswith("twinkle-")]
        for tag in tags:
            tagged.setdefault(tag[len("twinkle-"):], []).append(addr)
        if not tags:
            free.append(addr)
    hosts = sorted({info[a]["host"] for a in info if device[a] is not None})
    per_node = nproc_per_node or max(
        [sum(1 for a in info if info[a]["host"] == h and device[a] is not None) for h in hosts] or [1]
    )
    out: dict[str, GroupPlacement] = {}
    for group in groups:
        chosen = list(tagged.get(group.name, []))[: group.num_workers]
        if group.is_gpu:
            chosen.sort(key=lambda a: (info[a]["host"], device[a] if device[a] is not None else -1))
        missing = group.num_workers - len(chosen)
        if missing and group.is_gpu:
            for w in range(len(chosen), group.num_workers):
                want = group.devices[w][0]
                node, local = divmod(want, per_node)
                match = [a for a in free if node < len(hosts) and info[a]["host"] == hosts[node] and device[a] == local]
                if not match:
                    raise ConfigurationError(
                        f"group {group.name!r} needs a worker for GPU {want} (device {local} on host "
                        f"{node} of {len(hosts)} with GPU workers) and the cluster has none free; start "
                        f"`dask cuda worker` there, or tag one with `--resources {resource_name(group.name)}=1`"
                    )
                chosen.append(match[0])
                free.remove(match[0])
        elif missing:
            cpu_free = [a for a in free if device[a] is None] or free
            if len(cpu_free) < missing:
                raise ConfigurationError(
                    f"group {group.name!r} needs {group.num_workers} worker(s) but the cluster has "
                    f"{len(chosen)} tagged for it and {len(cpu_free)} untagged left; start more workers, "
                    f"or tag them with `dask worker --resources {resource_name(group.name)}=1`"
                )
            take = cpu_free[:missing]
            chosen += take
            free = [a for a in free if a not in take]
        new = [a for a in chosen if a not in tagged.get(group.name, [])]
        if new:
            client.run(_tag_worker, resources={resource_name(group.name): 1}, workers=new)
        out[group.name] = GroupPlacement(
            group.name, group.device_type, tuple(chosen), tuple(info[a]["host"] for a in chosen),
            group.devices, group.gpus_per_worker, tuple(str(info[a].get("name", a)) for a in chosen),
        )
    return out
