"""Keeping the C heap from holding on to freed activation memory during a long CPU encode.

glibc's malloc serves a large request with its own mapping (returned to the OS on free) only
above a threshold that it raises each time such a block is freed, up to 32 MB. After the first
batch, the model's tens-of-megabyte activations therefore come from the heap, and the heap keeps
the freed space (fragmented, not reusable for the next larger request) in the process's resident
memory. Fixing the threshold keeps each large activation in its own mapping: measured on the
giant encoder (a 1200-patch image), peak RSS ~0.1 GB lower with the same codes
(``benchmarks/encode.py --from-file``).

Only glibc has ``mallopt``; elsewhere (macOS, musl, Windows) ``bound_heap`` does nothing and says so.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import sys

#: glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD = -3).
M_MMAP_THRESHOLD = -3

#: Allocations of at least this many bytes get their own mapping. 4 MB: the activations that
#: matter (a batch's hidden layers: tens of MB) are above it, small tensors stay on the fast heap.
DEFAULT_MMAP_THRESHOLD = 4 << 20


@functools.lru_cache(maxsize=1)
def _glibc():
    """The C library if it is glibc (with mallopt), else None."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return libc


def bound_heap(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Serve allocations >= ``mmap_threshold`` bytes from their own mappings, so that freed
    activations leave resident memory at once. Process-wide and idempotent; True if applied,
    False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)))
