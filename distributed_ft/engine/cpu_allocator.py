"""On CPU, keep freed memory in the process for the next step instead of giving it back to the OS.

PyTorch has no caching allocator on CPU: every tensor is a malloc. glibc's malloc serves large blocks from
fresh mmaps and gives the top of its heap back once it is free, so a step whose tensor sizes differ from the
last step's (padding-free rows change length every step) faults in new pages for most of its activations and
gradients: on 2 cores that cost a padding-free step on lognormal lengths an eighth to a quarter of its
time. Three mallopt settings make glibc keep what it has (the effect jemalloc or tcmalloc give when
preloaded): blocks up to 32 MiB (glibc's own ceiling for its adaptive mmap threshold) come from the heap, the
heap top is not given back below 2 GiB free, and the heap grows 64 MiB at a time. Larger blocks, unless free
heap serves them, are still mapped and returned at once: kept in the heap, the different sizes of a large
model's logits and activations fragment it (the peak RSS of a 128k-vocabulary step rose by half).

Left alone where the user chose: MALLOC_* tunables in the environment, or another allocator preloaded.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 2 ** 31 - 1, M_TOP_PAD: 64 << 20}


def users_choice() -> str | None:
    """The allocator settings the user made for this process (environment tunables, a preloaded malloc), or None."""
    chosen = sorted(key for key in os.environ if key.startswith("MALLOC_") or key.startswith("GLIBC_TUNABLES"))
    preloaded = os.environ.get("LD_PRELOAD", "")
    if chosen:
        return ", ".join(chosen)
    return f"LD_PRELOAD {preloaded}" if "malloc" in preloaded else None


@functools.cache
def keep_freed_memory() -> str:
    """Make glibc's malloc keep freed memory for reuse, once per process; returns what was done, for the run log."""
    if not sys.platform.startswith("linux"):
        return "the system allocator as it is (not Linux)"
    chosen = users_choice()
    if chosen:
        return f"the allocator as set ({chosen})"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return "the system allocator as it is (no glibc mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not all(mallopt(param, value) == 1 for param, value in SETTINGS.items()):
        return "the system allocator as it is (glibc refused the mallopt settings)"
    return (f"freed memory kept for reuse (glibc mallopt: blocks up to {SETTINGS[M_MMAP_THRESHOLD] >> 20} MiB "
            "from a heap never trimmed)")
