"""Keep freed memory in the process on CPU runs, so large activations are not re-faulted.

glibc's malloc serves every allocation above its mmap threshold (at most 32 MiB by default)
with a fresh ``mmap`` and unmaps it on ``free``, and returns free memory at the top of the heap
to the kernel beyond its trim threshold (128 KiB by default). A real-size forward allocates
such blocks in every layer (an 8-image ViT-H/14 MLP activation is 42 MiB), so each forward pays
the kernel to map and zero them again. With both thresholds at 1 GiB the blocks stay in the
heap and are reused, as under jemalloc or tcmalloc. Measured on 2 CPUs, one 8-image ViT-H/14
image-tower forward: 11.1 s (2.7 s of it system time) before, 9.4 s (0.1 s) after.

Only glibc exposes ``mallopt``; elsewhere this is a no-op. The cost: freed blocks stay with the
process, so its resident size stays near its peak (a scoring run's peak is its steady state);
over ViT-B/16 forwards of 3 to 8 images it settled after the second batch, 60 MiB above the
untuned run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 30  # blocks up to 1 GiB come from the heap and are reused
TRIM_THRESHOLD_BYTES = 1 << 30  # free memory at the top of the heap is kept up to 1 GiB
FALLBACK_MMAP_THRESHOLD_BYTES = 32 << 20  # the most older glibc versions accept

_applied: bool | None = None


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]  # int mallopt(int param, int value)
    libc.mallopt.restype = ctypes.c_int
    return libc


def reuse_freed_memory() -> bool:
    """Tune glibc's malloc (once per process) to keep large freed blocks for reuse.

    Returns True when the process runs with the tuned thresholds. Call it before CPU forwards
    of large models; forked DataLoader workers inherit the setting."""
    global _applied
    if _applied is not None:
        return _applied
    libc = _glibc()
    if libc is None:
        _applied = False
        return False
    mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) or libc.mallopt(M_MMAP_THRESHOLD, FALLBACK_MMAP_THRESHOLD_BYTES)
    trim_ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    _applied = bool(mmap_ok and trim_ok)
    logger.debug("malloc thresholds for reuse of freed memory: %s", "set" if _applied else "refused")
    return _applied
