"""Decode graphs compiled ahead of time: an AOTInductor package per graph, run from C++ with the model's weights.

`package()` exports one decode (or verification) forward with torch.export, the window length of the
KV cache as its one dynamic dimension, and builds it with AOTInductor into a .pt2 package: Inductor's
kernels plus a C++ wrapper that calls them, without the weights. `AOTIStep.load()` opens the package
with torch's C++ loader (`torch._C._aoti.AOTIModelPackageLoader`) and hands it the model's own
parameter and buffer tensors as user-managed constants (no copy: they stay shared with the model).

Why: a saved torch.compile artifact needs torch._dynamo and torch._inductor at load time (seconds of
imports and guard set-up; bench/RESULTS.md), while the package loads in milliseconds and its C++ wrapper
launches the hundreds of kernels of a step with less overhead than Python does. Loading executes the
package's native code: the cache directory must be writable by its owner only, like any build cache.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.cache import KVCache

MIN_WINDOW = 2  # window lengths a package accepts: MIN_WINDOW .. cache length - 1


class _Flat(nn.Module):
    """`forward(model, tokens, positions, cache)` over flat tensor inputs (tokens, positions, *k, *v), for torch.export."""

    def __init__(self, model: nn.Module, forward: Any):
        super().__init__()
        self.model = model
        self.forward_fn = forward

    def forward(self, tokens, positions, *kv):
        n = len(kv) // 2
        return self.forward_fn(self.model, tokens, positions, KVCache(list(kv[:n]), list(kv[n:])))


@contextlib.contextmanager
def _quiet():
    """Silence torch's own deprecation noise (LeafSpec) from inside export and Inductor."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        yield


def _flat_inputs(tokens, positions, cache) -> list[torch.Tensor]:
    return [tokens, positions, *cache.k, *cache.v]


def package(path: Path, model: nn.Module, forward: Any, args: tuple, max_window: int | None,
            options: dict[str, Any] | None) -> None:
    """Export `forward(model, *args)` and build it into an AOTInductor package at `path` (no weights inside).

    args: (tokens, positions, cache) as the decode loop passes them. max_window: the cache holds views of
    its first slots, their number dynamic in MIN_WINDOW .. max_window; None: a static cache.
    """
    import torch._inductor

    tokens, positions, cache = args
    flat = _Flat(model, forward)
    inputs = _flat_inputs(tokens, positions, cache)
    kv_dims: Any = None
    if max_window is not None:
        kv_dims = {2: torch.export.Dim("window", min=MIN_WINDOW, max=max_window)}
    dynamic = (None, None, tuple(kv_dims for _ in range(len(inputs) - 2)))
    with torch.no_grad(), _quiet():
        program = torch.export.export(flat, tuple(inputs), dynamic_shapes=dynamic, strict=False)
    configs = dict(options or {})
    configs["aot_inductor.package_constants_in_so"] = False
    # every tensor the graph reads from the model stays a named constant that load() binds; otherwise a
    # 0-d buffer (e.g. Int4Linear's group size) is inlined as a scalar, and where a kernel needs it as a
    # tensor Inductor makes an anonymous constant that a package without weights cannot hold
    configs["always_keep_tensor_constants"] = True
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")  # another process may build the same key
    try:
        with _quiet():
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=configs)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


class AOTIStep:
    """A loaded package: called like a compiled step, `(tokens, positions, cache) -> logits`."""

    def __init__(self, loader: Any, path: Path):
        self.loader = loader
        self.path = path

    @classmethod
    def load(cls, path: Path, model: nn.Module, forward: Any) -> "AOTIStep":
        """Open the package at `path` and bind `model`'s tensors to it (shared, not copied)."""
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        flat = _Flat(model, forward)
        tensors = dict(flat.named_parameters(remove_duplicate=False))
        tensors.update(flat.named_buffers(remove_duplicate=False))
        names = loader.get_constant_fqns()
        missing = [n for n in names if n not in tensors]
        if missing:
            raise RuntimeError(f"the package expects tensors the model does not have: {missing[:3]}")
        loader.load_constants({n: tensors[n].detach() for n in names}, False, True, True)
        return cls(loader, path)

    def __call__(self, tokens, positions, cache) -> torch.Tensor:
        return self.loader.run(_flat_inputs(tokens, positions, cache))[0]
