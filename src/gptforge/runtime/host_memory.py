"""Keeping freed host memory in the process, so that tensor buffers are reused, not re-faulted.

A training step allocates and frees the same activation buffers every time. glibc's malloc serves
large requests with ``mmap`` and gives the top of its heap back to the kernel when enough of it is
free (``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD``; both move at run time). Each buffer that comes
back from the kernel is zero-filled page by page on first touch: on a 2-core Xeon the 4-layer
128-wide GPT (nanoGPT's CPU config) spent 3.7 ms of a 24.9 ms step in those page faults
(docs/benchmarks.md). With a fixed 32 MB mmap threshold (glibc's largest) and a 1 GB trim
threshold, freed buffers stay in the heap and the next step reuses them: the process keeps the
memory of its peak step, which a training run needs again at the next step anyway.

This is what ``LD_PRELOAD`` of jemalloc or tcmalloc does for PyTorch on CPUs (Intel's and
PyTorch's CPU tuning guides), without a library to install. It is skipped where the allocator is
not glibc's, and where the user set ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` (their
choice stands).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit systems
TRIM_THRESHOLD = 1 << 30
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds high (see the module docstring); True if done."""
    if not sys.platform.startswith("linux") or any(k in os.environ for k in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and \
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.debug("host memory: mallopt thresholds %s", "set" if done else "refused")
    return done
