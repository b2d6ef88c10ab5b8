"""How many instances and threads an engine gets: the cores this process may really use, unless a setting says
otherwise."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def cgroup_cpu_limit(path: Path = CGROUP_CPU_MAX) -> int | None:
    """CPUs a cgroup v2 quota allows (rounded up), or None when there is no quota."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def machine_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a container's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cores, limit) if limit else cores)


def resolve_threads(threads: int) -> int:
    """`threads`, or the machine's cores for 0 (the `intra_op_threads` setting's "auto")."""
    return threads if threads > 0 else machine_cores()


@dataclass(frozen=True)
class EnginePlan:
    """How one model runs: `instances` batches in flight at once, each runtime call on `threads` cores; a batch
    that is the model's only work runs on `lone_threads` cores instead (0: no such runtime)."""

    instances: int
    threads: int
    lone_threads: int = 0


def plan_engine(
    instances: int, threads: int, *, cores: int, single_slot: bool = False, lone_threads: int = 0
) -> EnginePlan:
    """Split the machine's `cores` among a model's instances (0: choose).

    By default every core runs a batch of its own on one thread: on the 2-core CPU host, two 1-thread
    calls into one ONNX Runtime session did 1.05-1.6x the items/s of one 2-thread call (light, middle and
    heavy models, batch 1 and 8), and one session serves both, so memory does not double. A model whose
    scheduler runs one batch at a time (`single_slot`, the DDIM sampler) keeps one instance on all cores.
    Given threads and no instances: as many instances as fill the cores.

    A batch with nothing else of its model in flight, queued or on its way would leave the other instances'
    cores idle: it runs on a second runtime of `lone_threads` threads (0: the cores all instances share),
    which halves a lone request's latency on a heavy model (stem-ae encode at batch 1: 45 -> 26 ms on two
    cores). None when that is no more than one instance's threads.
    """
    if single_slot:
        return EnginePlan(1, threads or cores)
    if not instances:
        instances = max(1, cores // threads) if threads else cores
    threads = threads or max(1, cores // instances)
    lone = lone_threads or min(cores, instances * threads)
    return EnginePlan(instances, threads, lone if lone > threads else 0)
