"""The C allocator's one setting the service makes: how many glibc malloc arenas its threads may use.

glibc gives threads that allocate at once arenas of their own (up to 8 per core) and keeps what a thread
frees in that thread's arena. ONNX Runtime allocates each run's buffers on the thread that calls it (no
memory arena: `cpu_mem_arena`), so every engine worker, lone-batch session and codec thread would keep
its own peak. Capped at 2 (`malloc_arenas`; glibc's documented M_ARENA_MAX), the default store's peak
RSS over the benchmark was 1128 / 1156 MB against 1282 / 1299 MB uncapped, at throughput within the
host's noise (two interleaved runs each). An operator's MALLOC_ARENA_MAX wins; other C libraries are
left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas for threads created from now on; False when nothing was changed (0, an
    operator's MALLOC_ARENA_MAX, or a C library without glibc's `mallopt`)."""
    if arenas <= 0 or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    changed = bool(mallopt(M_ARENA_MAX, arenas))
    if changed:
        log.debug("glibc malloc arenas capped at %d", arenas)
    return changed
