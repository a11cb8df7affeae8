"""Inductor's setup for compiling decode steps: availability, options, cache directory, CPU vector ISA.

Nothing here is imported until something has to be compiled: loading a saved AOTInductor package needs
none of Dynamo or Inductor. Inductor's on-disk caches go to leanformers' cache directory for the duration
of a build only (`scoped_cache_dir`: TORCHINDUCTOR_CACHE_DIR is set and restored, as torch's own
temporary_cache_dir does), so the process environment is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import torch


def default_cache_dir() -> Path:
    """`$LEANFORMERS_CACHE/compile`, else `~/.cache/leanformers/compile`."""
    root = os.environ.get("LEANFORMERS_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "leanformers"
    return base / "compile"


@contextlib.contextmanager
def scoped_cache_dir(path: Path) -> Iterator[None]:
    """Inductor's caches (FX graphs, autotuning, built kernels) under `path` while compiling; restored after."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    path.mkdir(parents=True, exist_ok=True)
    with temporary_cache_dir(str(path.resolve())), \
            inductor_config.patch(fx_graph_cache=True, autotune_local_cache=True), \
            functorch_config.patch(enable_autograd_cache=True):
        yield


def inductor_options(mode: str, device: torch.device, freezing: bool) -> dict[str, Any]:
    """Inductor options for `mode`, with the per-call input asserts off on CPU (inputs are checked by signature)."""
    from torch._inductor import list_mode_options

    options = dict(list_mode_options(mode))
    if device.type == "cpu":
        options.update(size_asserts=False, alignment_asserts=False, scalar_asserts=False)
    if freezing:
        options["freezing"] = True
    return options


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def machine() -> str:
    import platform

    return f"{platform.machine()}-{platform.system()}"


def setup_cpu_isa(path: Path) -> None:
    """Reuse the vector ISA Inductor picked in an earlier process instead of re-probing it.

    Inductor checks each candidate ISA by compiling and dlopen-ing a test program in a subprocess
    (seconds on a busy machine). The first process records the winner in env.json; later ones set
    `cpp.vec_isa_ok`/`cpp.simdlen` so the same ISA is chosen without probing. Cold and warm processes
    set the same values, so Inductor's config-dependent cache keys agree.
    """
    import torch._inductor.config as inductor_config
    from torch._inductor import cpu_vec_isa

    env_file = path / "env.json"
    ident = {"torch": torch.__version__, "cxx": str(inductor_config.cpp.cxx), "machine": machine()}
    try:
        env = json.loads(env_file.read_text())
    except (OSError, ValueError):
        env = {}
    if env.get("ident") == ident and env.get("isa"):
        inductor_config.cpp.vec_isa_ok = True
        inductor_config.cpp.simdlen = env["simdlen"]
        cpu_vec_isa.valid_vec_isa_list.cache_clear()
        if str(cpu_vec_isa.pick_vec_isa()) == env["isa"]:
            return
        inductor_config.cpp.vec_isa_ok = None  # this machine differs: probe after all
        inductor_config.cpp.simdlen = None
        cpu_vec_isa.valid_vec_isa_list.cache_clear()
    isa = cpu_vec_isa.pick_vec_isa()
    if not isa:
        return
    inductor_config.cpp.vec_isa_ok = True
    inductor_config.cpp.simdlen = isa.bit_width()
    atomic_write(env_file, json.dumps({"ident": ident, "isa": str(isa), "simdlen": isa.bit_width()}).encode())


class CompileUnavailable(RuntimeError):
    """Compilation cannot work here (no C++ compiler, no Triton, ...); CompiledDecode.failure says why."""


def compile_unavailable_reason(device: torch.device) -> str | None:
    """Why torch.compile (Inductor) cannot work here, or None when it should."""
    try:
        import torch._dynamo as dynamo
    except Exception as exc:  # pragma: no cover - broken install
        return f"torch._dynamo cannot be imported ({exc})"
    if not dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {sys.version_info.major}.{sys.version_info.minor} in this torch"
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton

            if not has_triton():
                return "Triton is not installed (pip install triton)"
        except Exception as exc:  # pragma: no cover
            return f"cannot check for Triton ({exc})"
        return None
    if device.type == "cpu":
        import torch._inductor.config as inductor_config

        cxx = inductor_config.cpp.cxx
        names = [str(c) for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c] or ["g++"]
        if not any(shutil.which(c) for c in names):
            return f"no C++ compiler found (looked for {', '.join(names)}; install g++ or set CXX)"
        return None
    return None
