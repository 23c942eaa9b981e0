"""Host (CPU) memory of a training process: keep freed blocks instead of returning them to the OS every step.

A Dr step allocates tens of MB it frees before the next step: the per-unit gradients the ghost Gram keeps for the
update (F, (n + 1) x p per layer, gram/ghost.py) and the capture's layer inputs and output gradients. glibc's malloc
serves a block of at least M_MMAP_THRESHOLD bytes (128 KiB at first, raised after frees up to 32 MiB) by mmap and
unmaps it on free, and trims a free heap top above M_TRIM_THRESHOLD: the next step then takes a page fault for every
4 KiB it touches again, which the kernel must zero. On the tiny GPT-2 at n = 16, T = 32 that was about 9,600 page
faults per Dr step (some 38 MB) against 26 for the standard step, whose blocks are smaller and reused, and a sixth of
the Dr step's time (theory/step_cost.md, section 5). `retain_freed_memory()` raises both thresholds, as PyTorch's CUDA
caching allocator keeps freed device memory: blocks below RETAIN_BYTES come from the heap and stay mapped after free.
The peak resident set is unchanged (a freed block is reused, not added to); the resident set no longer falls between
steps. The drpt command line calls it once at start on every command (cli.py); library callers may call it
themselves, or run under jemalloc or tcmalloc (LD_PRELOAD), which keep freed memory by design. Elsewhere than glibc
(macOS, musl) it does nothing and says so by its return value.

Shapes: none (process settings only).
"""

from __future__ import annotations

import ctypes
import ctypes.util

RETAIN_BYTES = 1 << 30  # 1 GiB: larger than any block of a CPU run of this package; larger blocks are still mmapped
UNMAP_BYTES = 128 * 1024  # glibc's own starting M_MMAP_THRESHOLD: every block from 128 KiB up is mmapped
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
_C_INT_MAX = 2**31 - 1  # mallopt(int param, int value)


def retain_freed_memory(limit: int = RETAIN_BYTES) -> bool:
    """Set glibc's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD to `limit` bytes; True if both were set (glibc only)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not UNMAP_BYTES <= limit <= _C_INT_MAX:
        raise ValueError(f"limit={limit!r} must be an int of at least 131072 bytes (glibc's own starting threshold) "
                         f"and at most {_C_INT_MAX} (mallopt takes a C int; ctypes would silently wrap a larger "
                         "value, 2**32 to 0, which maps every block).")
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, limit))


def unmap_freed_memory() -> bool:
    """The reverse, for a measurement of the resident set (drpt bench step's untimed memory pass): every block from
    UNMAP_BYTES up is mmapped and unmapped on free, and the heap's free blocks are returned now (malloc_trim), so the
    resident set follows the tensors. retain_freed_memory() undoes it. True if set (glibc only)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, UNMAP_BYTES))


def _glibc():
    """The C library if it has glibc's mallopt and malloc_trim, else None (macOS, musl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - AttributeError where they are missing
    except (OSError, AttributeError):
        return None
    return libc
