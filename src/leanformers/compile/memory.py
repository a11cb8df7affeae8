"""Model weights in transparent huge pages (Linux, CPU).

Decoding one token streams every weight from memory once. With ordinary 4 KiB pages that stream
crosses a page boundary every 4 KiB (a TLB miss each time, and the hardware prefetchers stop at page
boundaries). Copied into one anonymous mapping marked MADV_HUGEPAGE, the weights sit in 2 MiB pages and
stream faster (bench/RESULTS.md, "Weights in huge pages"; `leanformers bench` modes ending in -4k keep
4 KiB pages for the A/B).

    moved = move_to_huge_pages(model)    # bytes copied; 0 where the OS offers no huge pages

`compile_decode` does this on CPU after fusing projections, before binding the weights to the compiled
step; `load(huge_pages=True)` does it at load time. Every parameter and buffer is re-pointed in place
(`set_`): identities, values, dtypes, strides, requires_grad and ties are kept. Only the bytes that
the module's tensors use are copied, so storages shared with dead tensors (a deepcopy, weights replaced
by quantized ones) are not carried along. A module whose tensors are all in huge pages already is
left alone (0 bytes); otherwise all of its tensors are packed into one new mapping (a storage per
disjoint range: tensors that did not alias before do not alias after), and a previous mapping is freed
once nothing else refers to it.
"""

from __future__ import annotations

import logging
import mmap
import sys
import weakref
from pathlib import Path

import torch
from torch import nn

from ..heap import release_free_heap

log = logging.getLogger("leanformers")

HUGE_PAGE = 2 << 20
_ALIGN = 64  # each copied range starts on a cache line
_TRIM_EVERY = 64 << 20  # hand freed heap memory back every 64 MB: keeps the copy's peak near one model
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_arenas: list[tuple[int, int, weakref.ref]] = []  # (start, end, mapping) of the mappings made here


def huge_pages_unavailable() -> str | None:
    """Why weights cannot go into transparent huge pages here, or None when they can."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return "transparent huge pages are Linux-only"
    try:
        text = _THP.read_text()
    except OSError:
        return f"the kernel has no transparent huge pages ({_THP} unreadable)"
    mode = text[text.find("[") + 1:text.find("]")] if "[" in text else text.strip()
    if mode not in ("always", "madvise"):
        return f"transparent huge pages are disabled ({_THP}: {mode})"
    return None


def in_huge_pages(t: torch.Tensor) -> bool:
    """True when the tensor's memory is in a mapping made by move_to_huge_pages."""
    return t.device.type == "cpu" and t.untyped_storage().nbytes() > 0 and _in_arena(t.untyped_storage().data_ptr())


def uses_huge_pages(module: nn.Module) -> bool:
    """True when any parameter or buffer of the module is in a mapping made by move_to_huge_pages."""
    return any(in_huge_pages(t) for t in _movable(module))


def _in_arena(ptr: int) -> bool:
    _arenas[:] = [a for a in _arenas if a[2]() is not None]
    return any(start <= ptr < end for start, end, _ in _arenas)


def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _movable(module: nn.Module) -> list[torch.Tensor]:
    """Every distinct non-empty CPU parameter and buffer of the module tree (tied ones once)."""
    seen: dict[int, torch.Tensor] = {}
    for mod in module.modules():
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if (t is not None and t.device.type == "cpu" and t.layout == torch.strided and not t.is_quantized
                    and type(t) in (torch.Tensor, nn.Parameter) and t.numel() > 0):
                seen.setdefault(id(t), t)
    return list(seen.values())


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """The byte range [start, end) of its storage that the tensor reads."""
    size = t.element_size()
    start = t.storage_offset() * size
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return start, start + (last + 1) * size


def _ranges(tensors: list[torch.Tensor]) -> list[tuple[int, int, list[torch.Tensor]]]:
    """The tensors of one storage grouped into disjoint byte ranges (overlapping views share one)."""
    spans = sorted(((*_extent(t), t) for t in tensors), key=lambda x: x[0])
    out: list[tuple[int, int, list[torch.Tensor]]] = []
    for start, end, t in spans:
        if out and start < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end), out[-1][2] + [t])
        else:
            out.append((start - start % _ALIGN, end, [t]))  # a 64-aligned start keeps every dtype aligned
    return out


def move_to_huge_pages(module: nn.Module) -> int:
    """Copy the module's CPU parameters and buffers into one huge-page mapping, in place; returns bytes copied.

    Returns 0, having changed nothing, where huge pages are unavailable (logged at debug level), when
    every tensor is in huge pages already, or when the copy would not fit comfortably in available
    memory (logged). Call before compiling: a compiled step binds the tensors it saw.
    """
    reason = huge_pages_unavailable()
    if reason is not None:
        log.debug("weights stay in ordinary pages: %s", reason)
        return 0
    tensors = _movable(module)
    if all(in_huge_pages(t) for t in tensors):
        return 0
    by_storage: dict[int, list[torch.Tensor]] = {}
    for t in tensors:
        by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    plan = []  # (start, end, tensors, offset in the new mapping); no storage references: old ones free as we go
    total = 0
    for group in by_storage.values():
        for start, end, members in _ranges(group):
            plan.append((start, end, members, total))
            total += -(-(end - start) // _ALIGN) * _ALIGN
    available = _available_bytes()
    if available is not None and total > 0.9 * available:
        log.info("weights stay in ordinary pages: copying %.1f GB into huge pages would not fit in the %.1f GB "
                 "of available memory", total / 1e9, available / 1e9)
        return 0
    mapping = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)
    _arenas.append((raw.data_ptr(), raw.data_ptr() + raw.numel(), weakref.ref(mapping)))
    base = (-raw.data_ptr()) % HUGE_PAGE  # huge pages back only 2 MiB-aligned addresses
    freed = 0
    with torch.no_grad():
        for start, end, members, at in plan:
            at += base
            old = torch.empty(0, dtype=torch.uint8).set_(members[0].untyped_storage(), start, (end - start,))
            raw[at:at + end - start].copy_(old)
            del old
            # a storage of its own per range (each keeps the mapping alive): tensors that did not overlap
            # before do not alias now; torch.cond refuses branch operands that share a storage (the
            # experts of models/moe.py in a compiled step)
            new = torch.frombuffer(mapping, dtype=torch.uint8, offset=at, count=end - start).untyped_storage()
            for t in members:  # re-pointed: the old storage is freed with its last tensor
                offset = t.storage_offset() * t.element_size() - start
                t.set_(new, offset // t.element_size(), t.shape, t.stride())
            freed += end - start
            if freed >= _TRIM_EVERY:
                release_free_heap()
                freed = 0
    release_free_heap()
    log.debug("moved %.1f MB of weights into transparent huge pages", total / 1e6)
    return total
