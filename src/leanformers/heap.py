"""Handing freed CPU memory back to the operating system (glibc).

glibc keeps freed blocks below its mmap threshold in the process heap for reuse, so after a phase that
frees much (quantizing a model, copying weights into huge pages) the process's resident memory stays at
its peak although little is live. `malloc_trim(0)` returns the free pages of the heap; elsewhere than
glibc this does nothing. (Training's allocator policy, the mmap threshold, is train/allocator.py.)
"""

from __future__ import annotations

import ctypes
from typing import Any

_malloc_trim: Any = None


def release_free_heap() -> None:
    """Return the heap's free pages to the OS (glibc's malloc_trim(0)); a no-op without glibc."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)
