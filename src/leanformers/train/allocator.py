"""glibc malloc's mmap threshold: whether freed CPU tensors go back to the OS.

glibc serves a block of at least the "mmap threshold" with its own mmap and unmaps it when freed; smaller
ones come from the heap. The threshold is dynamic by default: each freed mmapped block raises it to that
block's size, up to 32 MiB, so after the first frees a training step's activations (a few MiB each) come
from the heap, which fragments and keeps what was freed. Measured on the bench's QLoRA step (SmolLM2,
8 x 512 tokens, gradient checkpointing): peak RSS 2.7 GB with the default rule, 0.8 GB with a fixed
64 KiB threshold, at two thirds of the speed (every large tensor is a fresh mapping whose pages the kernel
zeroes on first touch). So leanformers fixes the threshold where memory comes first: FSDP ranks on CPU
(their per-step gathered weights and reduced gradients, train/distributed/strategy.py) and, for the
length of the run, QLoRA and gradient-checkpointed training on CPU (train/loop.py). Setting
MALLOC_MMAP_THRESHOLD_ in the environment is the user's choice and is left alone; it is logged either way.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

logger = logging.getLogger("leanformers.train")

MMAP_THRESHOLD = 64 * 1024  # bytes: CPU buffers from this size up are mmapped, and unmapped when freed
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
# where glibc's dynamic rule ends on 64-bit machines (DEFAULT_MMAP_THRESHOLD_MAX, and twice it for trim):
# what a run restores, since mallopt cannot turn the dynamic rule back on
_SETTLED = (32 * 1024 * 1024, 64 * 1024 * 1024)


def _mallopt():
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return None
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return None


def fix_mmap_threshold(why: str) -> bool:
    """Fix the threshold at MMAP_THRESHOLD (process-wide); True if set here."""
    mallopt = _mallopt()
    if mallopt is None or mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return False
    logger.info("%s: malloc's mmap threshold fixed at %d KiB, so that freed tensors go back to the OS (set "
                "MALLOC_MMAP_THRESHOLD_ to choose another)", why, MMAP_THRESHOLD // 1024)
    return True


@contextlib.contextmanager
def memory_first(why: str, enabled: bool = True) -> Iterator[bool]:
    """Within the block, the fixed threshold (if enabled and not the user's); after it, glibc's settled one."""
    changed = enabled and fix_mmap_threshold(why)
    try:
        yield changed
    finally:
        if changed:
            mallopt = _mallopt()
            if mallopt is not None:
                mallopt(_M_MMAP_THRESHOLD, _SETTLED[0])
                mallopt(_M_TRIM_THRESHOLD, _SETTLED[1])
