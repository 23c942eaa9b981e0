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
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
_C_INT_MAX = 2**31 - 1  # mallopt(int param, int value)


def retain_freed_memory(limit: int = RETAIN_BYTES) -> bool:
    """Set glibc's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD to `limit` bytes; True if both were set (glibc only)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 128 * 1024 <= limit <= _C_INT_MAX:
        raise ValueError(f"limit={limit!r} must be an int of at least 131072 bytes (glibc's own starting threshold) "
                         f"and at most {_C_INT_MAX} (mallopt takes a C int; ctypes would silently wrap a larger "
                         "value, 2**32 to 0, which maps every block).")
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (or no libc by that name): nothing to set
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))
