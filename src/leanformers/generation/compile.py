"""A compiled one-token decode step: static shapes, no graph breaks, cached on disk, eager fallback.

    decode_fn = compile_decode(model)            # or compile_decode(lm); LanguageModel.compile() wraps it
    generate_steps(model, prompts, ..., decode_fn=decode_fn, cache_len=1024)

Only the decode step is compiled (one graph, no graph breaks, static shapes); prefill stays eager
and runs the same layer code. Shapes are static: fixed batch size, and a fixed cache length obtained by
rounding it up to a bucket (`LanguageModel.cache_bucket`), so every step of every request with the same
(batch size, cache bucket) runs one graph. How attention sees the cache:
- CPU ("window"): the step gets views of the first slot+1 cache slots, their length marked dynamic
  (the only dynamic dimension), so attention costs what the filled prefix costs, as in eager mode.
  Attending over the whole 1024-slot cache with a mask instead cost SmolLM2 30 x 0.23 ms per token in
  float32 and 30 x 1.5 ms in bfloat16 (the CPU SDPA kernel is slow in bfloat16): int4 decoding was
  then 2x slower than eager instead of 1.3x faster.
- CUDA (CUDA graphs need static shapes): attention over the whole static cache with a boolean mask
  (cheap on a GPU; gpt-fast does the same).

On CPU the layer code switches, inside the compiled step only, to the GEMV and one-query attention of
models/ops.py (broadcast-multiply + sum): Inductor turns them into streaming C++ loops that read the
weights 2-3x faster than torch's one-row matmul kernels here, and fuses attention instead of calling
SDPA per layer.

Disk cache, two layers (both under `$LEANFORMERS_CACHE/compile`, default `~/.cache/leanformers/compile`):
- On CPU, each graph is compiled ahead of time into an AOTInductor package, `decode/<key>.pt2`
  (generation/aoti.py: torch.export with the window length dynamic, Inductor's kernels plus a C++
  wrapper, no weights inside). A later process loads it with torch's C++ loader and binds the model's
  own tensors to it: no Dynamo, no Inductor import, no guards; measured on SmolLM2-135M (2 threads),
  the compile step of a warm process went from 2.5-3.0 s (a saved torch.compile artifact, which needs
  ~1 s of Dynamo/Inductor imports and Dynamo's guard set-up) to 0.13-0.16 s, and a step runs ~3%
  faster (C++ launches the kernels). A cold compile is 60-110 s.
  The key is the model's *structure* (config, module tree, parameter shapes/dtypes/ties), the input
  shapes, the mode, the thread count (baked into the C++ loops), and the torch / leanformers versions
  and source files: any change gives a new key. A file that does not load is deleted and recompiled.
  Window lengths outside a package's range (under 2, or the cache's last slot) run eagerly.
- Inductor's own caches (FX graph cache, autotuning results, built kernels), used by the compiles:
  `TORCHINDUCTOR_CACHE_DIR` is pointed there (process-wide) when something is compiled.
  Inductor's CPU vector-ISA probe (it builds and dlopens test programs in subprocesses: 1-20 s here)
  is done once and its answer recorded in `env.json`, then reused by later processes.
Elsewhere (CUDA, other backends, precompile=False), or when the ahead-of-time build fails (logged), the
step is torch.compile'd in-process ("jit", fullgraph=True, dynamic=False but for the window length).
Nothing of Dynamo or Inductor is imported until something has to be compiled.

Speculative decoding verifies k drafted tokens in one forward: `CompiledDecode.verify` runs it through a
second compiled graph with a fixed number of rows (`verify_rows`, padded; compiled on first use and saved
like the step). On CPU its matrix products keep rows as the innermost loop (models/ops.py), so the
weights stream once for all rows. Each row's matrix products are computed exactly as in a one-token step;
norms and softmax reduce in a different order for several rows, so logits agree up to float rounding.

Failures never pass silently: no C++ compiler, no Triton, a graph break or any other compile error logs
a warning naming the cause, and decoding continues eagerly (`.failure` / `.eager` say why).

The KV cache buffers of a compiled model come from a small pool (`model.make_cache` is replaced on the
instance): the same tensors are reused across requests, which CUDA graphs need (static addresses)
and which saves re-allocating the cache per request. A buffer set is handed out again only once the
previous request's cache object is gone, so overlapping generations never share buffers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..memory import move_to_huge_pages
from ..models import ops
from . import aoti
from .decode import decode_step
from .kv_cache import KVCache

log = logging.getLogger("leanformers.compile")

# CPU: "default" measured as fast as "max-autotune-no-cudagraphs" (SmolLM2-135M, 1 thread: fp32 10.6 vs
# 10.7 tok/s, bf16 13.5 vs 13.3, int4 37.0 vs 35.3, int8 24.4 vs 20.8), compiles no slower and does not
# autotune (noisy on a shared machine).
DEFAULT_CPU_MODE = "default"
DEFAULT_CUDA_MODE = "reduce-overhead"
DEFAULT_CACHE_LEN = 1024
# Compiled verification (speculative decoding) on CPU: its time in compiled one-token steps for T tokens,
# and the T used by default. Measured on SmolLM2-135M at cache position 300, 2 threads, torch 2.13
# (`python bench/verify_costs.py`, bench/results/verify_costs.md). Float32 rows reuse each weight row from
# L1 nearly for free up to ~6 rows; bfloat16 and int8 rows each redo the conversion to float32, so their
# extra rows cost more; int4 layers keep torch's int4 kernel. Default T: the best expected tokens per unit
# of time at 0.8-0.9 acceptance, (1 - a^T) / (1 - a) / cost.
VERIFY_COST = {
    "float32": {1: 1.0, 2: 1.07, 4: 1.30, 6: 1.53, 8: 2.21},
    "bfloat16": {1: 1.0, 2: 1.13, 3: 1.62, 4: 1.81, 6: 2.61, 8: 3.81},
    "int8": {1: 1.0, 2: 1.46, 3: 1.99, 4: 2.52, 6: 3.62, 8: 4.68},
    "int4": {1: 1.0, 2: 1.22, 3: 1.43, 4: 1.71, 6: 2.54, 8: 2.87},
}
VERIFY_ROWS = {"float32": 6, "bfloat16": 4, "int8": 2, "int4": 4}
# torch.compile's modes, and whether each uses CUDA graphs (on CUDA)
_MODES = {"default": False, "reduce-overhead": True, "max-autotune": True, "max-autotune-no-cudagraphs": False}
MAX_GRAPHS = 4  # distinct input signatures compiled per model before further ones stay eager
_POOL_SETS = 2  # buffer sets kept per cache shape (a second one serves an overlapping request)
_FORMAT = 2  # bump when the artifact key recipe changes
# id(model) -> its CompiledDecode, while that object lives (it holds the model, so the id stays unique).
# Not an attribute of the model: copy.deepcopy(model) must not copy compiled graphs.
_COMPILED: "weakref.WeakValueDictionary[int, CompiledDecode]" = weakref.WeakValueDictionary()


# ------------------------------------------------------------------------------------- cache dir
def default_cache_dir() -> Path:
    """`$LEANFORMERS_CACHE/compile`, else `~/.cache/leanformers/compile`."""
    root = os.environ.get("LEANFORMERS_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "leanformers"
    return base / "compile"


def configure_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """Point Inductor's on-disk caches at `cache_dir` (default: default_cache_dir()) and enable them."""
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    path = path.resolve()
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    inductor_config.autotune_local_cache = True
    functorch_config.enable_autograd_cache = True
    if previous is not None and previous != str(path):
        try:  # Inductor memoizes some paths under the old directory
            from torch._inductor.utils import clear_caches

            clear_caches()
        except Exception:  # pragma: no cover - private API moved
            pass
    return path


def _setup_cpu_isa(path: Path) -> None:
    """Reuse the vector ISA Inductor picked in an earlier process instead of re-probing it.

    Inductor checks each candidate ISA by compiling and dlopen-ing a test program in a subprocess
    (seconds on a busy machine). The first process records the winner in env.json; later ones set
    `cpp.vec_isa_ok`/`cpp.simdlen` so the same ISA is chosen without probing. Cold and warm processes
    set the same values, so Inductor's config-dependent cache keys agree.
    """
    import torch._inductor.config as inductor_config
    from torch._inductor import cpu_vec_isa

    env_file = path / "env.json"
    ident = {"torch": torch.__version__, "cxx": str(inductor_config.cpp.cxx), "machine": _machine()}
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
    _atomic_write(env_file, json.dumps({"ident": ident, "isa": str(isa), "simdlen": isa.bit_width()}).encode())


def _machine() -> str:
    import platform

    return f"{platform.machine()}-{platform.system()}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------- availability
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


# ------------------------------------------------------------------------------------- cache pool
class KVCachePool:
    """Hands out KV caches whose buffers are reused across requests (static addresses for CUDA graphs).

    A buffer set is reused only when the KVCache object that last held it has been freed, so two
    generations in flight at once never share buffers. Stale contents are harmless: every slot is
    written before it is attended to, and later slots are masked.
    """

    def __init__(self, model: nn.Module, static_addresses: bool):
        self._make = type(model).make_cache.__get__(model)  # the class's own factory
        self._static = static_addresses
        self._sets: dict[tuple, list[tuple[list[torch.Tensor], list[torch.Tensor], Any]]] = {}

    def __call__(self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None) -> KVCache:
        key = (batch_size, max_len, dtype, torch.is_inference_mode_enabled())
        sets = self._sets.setdefault(key, [])
        for i, (k, v, holder) in enumerate(sets):
            if holder() is None:
                cache = _wrap(k, v, batch_size, max_len)
                sets[i] = (k, v, weakref.ref(cache))
                return cache
        fresh = self._make(batch_size, max_len, dtype=dtype)
        if len(sets) < _POOL_SETS:
            if self._static:
                for t in fresh.k + fresh.v:
                    torch._dynamo.mark_static_address(t)
            sets.append((fresh.k, fresh.v, weakref.ref(fresh)))
        return fresh

    def clear(self) -> None:
        self._sets.clear()


def _wrap(k: list[torch.Tensor], v: list[torch.Tensor], batch_size: int, max_len: int) -> KVCache:
    cache = KVCache.__new__(KVCache)
    cache.k, cache.v = list(k), list(v)
    cache.batch_size, cache.max_len = batch_size, max_len
    return cache


class _Window(KVCache):
    """The first W slots of a KVCache (views of its buffers); `max_len` is W, symbolic in the compiled step."""

    @property
    def max_len(self) -> int:  # type: ignore[override]
        return self.k[0].shape[2]


def _window(cache: KVCache, length: int, dynamic: bool) -> _Window:
    win = _Window.__new__(_Window)
    win.k = [t[:, :, :length] for t in cache.k]
    win.v = [t[:, :, :length] for t in cache.v]
    win.batch_size = cache.batch_size
    if dynamic:  # at trace time: one graph for every window length
        for t in win.k + win.v:
            torch._dynamo.mark_dynamic(t, 2)
    return win


# ------------------------------------------------------------------------------------- compiled step
def verify_forward(model, tokens, cache, slots, positions, mask) -> torch.Tensor:
    """Logits (T, V) of every position of row 0: tokens (1, T) written at cache slots (T,)."""
    return model(tokens, cache=cache, cache_position=slots, position_ids=positions, attention_mask=mask)[0]


_FORWARDS = {"step": decode_step, "verify": verify_forward}  # what each kind of graph computes (eagerly)


def _make_step(model: nn.Module, kind: str = "step") -> Callable[..., torch.Tensor]:
    """The function torch.compile traces: `_FORWARDS[kind]` with the model bound."""
    forward = _FORWARDS[kind]

    def step(token, cache, slot, positions, mask):
        return forward(model, token, cache, slot, positions, mask)

    return step


def pad_rows(tokens: torch.Tensor, rows: int) -> torch.Tensor:
    """tokens (1, n) padded to (1, rows) by repeating the last one (their K/V land in slots that later
    rounds overwrite before attending to them)."""
    n = tokens.shape[1]
    return tokens if n >= rows else torch.cat([tokens, tokens[:, -1:].expand(1, rows - n)], dim=1)


def _tensor_sig(t: torch.Tensor | None) -> tuple | None:
    if t is None:
        return None
    return (tuple(t.shape), t.stride(), t.dtype, t.device.type, t.is_inference())


def signature(token, cache: KVCache, slot, positions, mask, kind: str = "step") -> tuple:
    """What a compiled graph is specialized on (Dynamo guards on the same properties), and which function."""
    sig = (_tensor_sig(token), _tensor_sig(slot), _tensor_sig(positions), _tensor_sig(mask),
           _tensor_sig(cache.k[0]), len(cache.k), cache.max_len, cache.batch_size)
    return sig if kind == "step" else (kind, *sig)


def _describe(exc: BaseException) -> str:
    """One line: the exception and, for wrapped ones (BackendCompilerFailed, ...), the root cause."""

    def first_line(e: BaseException) -> str:
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        return lines[0][:300] if lines else ""

    root, seen = exc, {id(exc)}
    while True:
        nxt = getattr(root, "inner_exception", None) or root.__cause__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        root = nxt
    if root is exc:
        return f"{type(exc).__name__}: {first_line(exc)}"
    return f"{type(exc).__name__}: {type(root).__name__}: {first_line(root)}"


def _source_digest(modules: set[str]) -> str:
    h = hashlib.sha256()
    for name in sorted(modules):
        mod = sys.modules.get(name)
        file = getattr(mod, "__file__", None)
        if file and os.path.isfile(file):
            h.update(name.encode())
            h.update(Path(file).read_bytes())
    return h.hexdigest()


def structure_key(model: nn.Module) -> dict[str, Any]:
    """The parts of a model that its compiled step depends on (not the weights' values)."""
    groups: dict[int, int] = {}
    tensors = []
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        gid = groups.setdefault(id(t), len(groups))
        tensors.append((name, tuple(t.shape), str(t.dtype), t.device.type, gid))
    config = getattr(model, "config", None)
    modules = {type(m).__module__ for m in model.modules()} | {KVCache.__module__, __name__, decode_step.__module__}
    from .. import __version__

    return {
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config),
        "modules": repr(model),
        "tensors": tensors,
        "source": _source_digest(modules),
        "leanformers": __version__,
        "torch": torch.__version__,
        "python": list(sys.version_info[:2]),
        "machine": _machine(),
    }


class CompiledDecode:
    """A DecodeFn (see decode.py) that runs compiled steps for `model`, eagerly for anything else.

    Each distinct input signature (batch size, cache length, mask or not, dtypes, strides) gets one
    compiled step: loaded from disk when possible, else compiled (and saved). Up to `max_graphs` of
    them; further signatures run eagerly, with a warning. A compile error logs a warning with the
    reason and that signature runs eagerly from then on.
    """

    def __init__(self, model: nn.Module, *, mode: str, backend: Any,
                 cache_dir: Path, precompile: bool, cudagraphs: bool, window: bool = False,
                 max_graphs: int = MAX_GRAPHS, verify_rows: int = 0, freezing: bool = False):
        self.model = model
        self.device = model.model.embed_tokens.weight.device
        self.freezing = freezing
        self._prepared = backend != "inductor"  # Inductor's options and caches: set up by _prepare()
        self.window = window
        self.mode = mode
        self.options: dict[str, Any] | None = None
        self.backend = backend
        self.cache_dir = cache_dir
        self.precompile = precompile
        self.cudagraphs = cudagraphs
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, Callable[..., torch.Tensor]] = {}
        self.info: dict[tuple, dict[str, Any]] = {}  # signature -> {"how": loaded|compiled|jit, "seconds": ...}
        self.eager: dict[tuple, str] = {}  # signature -> why it runs eagerly
        self.failure: str | None = None  # set when compilation is off altogether
        self._jit: dict[str, Callable[..., torch.Tensor]] = {}
        self.verify_rows = verify_rows
        self._structure: dict[str, Any] | None = None

    @property
    def is_compiled(self) -> bool:
        return bool(self.graphs)

    def __call__(self, model, token, cache, slot, positions, mask):
        return self._run("step", model, token, cache, slot, positions, mask)

    def can_verify(self, model: nn.Module, n_rows: int, max_len: int, pos: int) -> bool:
        """Whether `verify` runs `n_rows` tokens at slots pos.. through a compiled graph (else: eager)."""
        return (model is self.model and self.failure is None and 0 < n_rows <= self.verify_rows
                and pos + self.verify_rows < max_len and not any(sig[0] == "verify" for sig in self.eager))

    def verify(self, model, tokens: torch.Tensor, cache: KVCache, pos: int, positions: torch.Tensor) -> torch.Tensor:
        """Logits (n, V) for tokens (1, n) written at slots pos .. pos+n-1, through the compiled verification graph.

        Speculative decoding's verification forward: the tokens are padded to `verify_rows` (one static
        shape, `pad_rows`); on CPU each row's matrix products are computed as in a one-token step
        (models/ops.py), so the logits agree with T steps up to float rounding.
        positions: (1, >= pos + verify_rows) rotary positions of the slots, as the plain loop has them.
        Call only when can_verify(...) is True.
        """
        n, T = tokens.shape[1], self.verify_rows
        tokens = pad_rows(tokens, T)
        slots = torch.arange(pos, pos + T, device=tokens.device)
        return self._run("verify", model, tokens, cache, slots, positions[:, pos:pos + T], None)[:n]

    def _run(self, kind, model, token, cache, slot, positions, mask):
        eager = _FORWARDS[kind]
        if model is not self.model or self.failure is not None:
            return eager(model, token, cache, slot, positions, mask)
        length = int(slot[-1]) + 1 if self.window else 0
        if self.window and not aoti.MIN_WINDOW <= length < cache.max_len:  # outside the graphs' range
            return eager(model, token, cache, slot, positions, mask)
        sig = signature(token, cache, slot, positions, mask, kind)
        fn = self.graphs.get(sig)
        if fn is not None:
            try:
                if self.cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                if self.window:
                    return fn(token, _window(cache, length, False), slot, positions, mask)
                return fn(token, cache, slot, positions, mask)
            except Exception as exc:
                self._eager(sig, f"the compiled {kind} failed: {_describe(exc)}")
                return eager(model, token, cache, slot, positions, mask)
        if sig in self.eager:
            return eager(model, token, cache, slot, positions, mask)
        if len(self.graphs) >= self.max_graphs:
            self._eager(sig, f"{len(self.graphs)} input shapes are compiled already (max_graphs); "
                             "a fixed cache_bucket lets requests share one")
            return eager(model, token, cache, slot, positions, mask)
        try:
            return self._build(sig, kind, token, cache, slot, positions, mask)
        except CompileUnavailable:  # self.failure says why (warned once)
            return eager(model, token, cache, slot, positions, mask)
        except Exception as exc:
            self._eager(sig, f"compilation failed: {_describe(exc)}")
            return eager(model, token, cache, slot, positions, mask)

    # ---------------------------------------------------------------------------------- building
    def _prepare(self) -> None:
        """Inductor's setup, once, before the first compilation (loading a saved package needs none of it:
        importing torch._dynamo / torch._inductor alone takes ~1 s). Raises CompileUnavailable."""
        if self._prepared:
            return
        reason = compile_unavailable_reason(self.device)
        if reason is None:
            try:
                from torch._inductor import list_mode_options

                options = dict(list_mode_options(self.mode))
                if self.device.type == "cpu":  # the step's inputs are checked by signature(): no per-call asserts
                    options.update(size_asserts=False, alignment_asserts=False, scalar_asserts=False)
                if self.freezing:
                    options["freezing"] = True
                configure_cache(self.cache_dir)
                if self.device.type == "cpu":
                    _setup_cpu_isa(self.cache_dir)
                self.options = options
            except Exception as exc:
                reason = f"setting up Inductor failed: {_describe(exc)}"
        if reason is not None:
            self.failure = f"torch.compile is unavailable: {reason}"
            log.warning("leanformers: decoding eagerly: %s", self.failure)
            raise CompileUnavailable(self.failure)
        self._prepared = True

    def _build(self, sig: tuple, kind: str, token, cache, slot, positions, mask) -> torch.Tensor:
        t0 = time.perf_counter()
        B, S = sig[-1], sig[-2]
        what = "decode step" if kind == "step" else f"verification step ({token.shape[1]} tokens)"
        win = _window(cache, int(slot[-1]) + 1, False) if self.window else cache
        args = (token, win, slot, positions, mask)
        if self.precompile:
            path = self._artifact_path(sig)
            if path.is_file():
                try:
                    fn = aoti.AOTIStep.load(path, self.model, _FORWARDS[kind], mask is not None)
                    out = fn(*args)
                    self._done(sig, fn, "loaded", t0)
                    return out
                except Exception as exc:
                    log.info("saved %s %s unusable (%s); compiling again", what, path.name, _describe(exc))
                    path.unlink(missing_ok=True)
            self._prepare()
            log.info("compiling the %s (batch %d, cache %d); cached on disk afterwards", what, B, S)
            try:
                aoti.package(path, self.model, _FORWARDS[kind], args, S - 1 if self.window else None, self.options)
                fn = aoti.AOTIStep.load(path, self.model, _FORWARDS[kind], mask is not None)
            except Exception as exc:
                log.warning("leanformers: compiling the %s ahead of time failed (%s); using torch.compile "
                            "instead (not saved: every process compiles it again)", what, _describe(exc))
                path.unlink(missing_ok=True)
            else:
                try:
                    meta = {"signature": repr(sig), "kind": kind, "mode": self.mode, "torch": torch.__version__,
                            "threads": torch.get_num_threads(),
                            "model": self._structure.get("config") if self._structure else None}
                    _atomic_write(path.with_suffix(".json"), json.dumps(meta, default=str, indent=1).encode())
                except OSError:
                    pass
                out = fn(*args)
                self._done(sig, fn, "compiled", t0)
                return out
        self._prepare()
        if kind not in self._jit:
            self._jit[kind] = self._compiler(kind)
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        if self.window:  # the window length is the step's one dynamic dimension
            args = (token, _window(cache, int(slot[-1]) + 1, True), slot, positions, mask)
        out = self._jit[kind](*args)
        self._done(sig, self._jit[kind], "jit", t0)
        return out

    def _compiler(self, kind: str = "step"):
        kwargs: dict[str, Any] = dict(fullgraph=True, dynamic=False, backend=self.backend)
        if self.options is not None:
            kwargs["options"] = self.options
        return torch.compile(_make_step(self.model, kind), **kwargs)

    def _artifact_path(self, sig: tuple) -> Path:
        if self._structure is None:
            self._structure = structure_key(self.model)
        # Inductor bakes the thread count into its C++ loops (`omp parallel num_threads(n)`)
        blob = json.dumps({"format": _FORMAT, "structure": self._structure, "signature": repr(sig),
                           "mode": self.mode, "freezing": self.freezing, "window": self.window,
                           "threads": torch.get_num_threads()}, sort_keys=True, default=str)
        key = hashlib.sha256(blob.encode()).hexdigest()[:40]
        folder = self.cache_dir / "decode"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{key}.pt2"

    def _done(self, sig: tuple, fn, how: str, t0: float) -> None:
        self.graphs[sig] = fn
        self.info[sig] = {"how": how, "seconds": round(time.perf_counter() - t0, 2)}
        what = "decode step" if sig[0] != "verify" else "verification step"
        log.info("%s ready (%s in %.1fs): batch %d, cache %d", what, how, self.info[sig]["seconds"], sig[-1], sig[-2])

    def _eager(self, sig: tuple, why: str) -> None:
        self.graphs.pop(sig, None)
        self.eager[sig] = why
        log.warning("leanformers: decoding eagerly (batch %d, cache %d): %s", sig[-1], sig[-2], why)


def compile_decode(
    lm_or_model: Any,
    *,
    mode: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 1,
    cache_len: int | None = None,
    warmup: bool = True,
    precompile: bool | None = None,
    freezing: bool = False,
    fuse: bool = True,
    window: bool | None = None,
    backend: Any = "inductor",
    max_graphs: int = MAX_GRAPHS,
    verify_rows: int | None = None,
    speculative: bool = False,
    huge_pages: bool = True,
) -> CompiledDecode:
    """Compile the one-token decode step of a model (or of a LanguageModel); returns a DecodeFn.

    mode: torch.compile mode; default "default" on CPU (see DEFAULT_CPU_MODE), "reduce-overhead"
        (CUDA graphs) on CUDA.
    cache_dir: where compiled artifacts persist (default: default_cache_dir()).
    warmup: compile (or load) now for `batch_size` rows and a `cache_len`-slot cache (default 1024,
        capped at the context length), so the first request does not wait for it.
    precompile: compile each graph ahead of time into an AOTInductor package and load it from disk in
        later processes (no Dynamo at all on a warm start); default: on CPU only (CUDA graphs are set
        up by torch.compile's runtime).
    freezing: Inductor freezing (weights as constants). Off: it measured slower here, keeps a second
        (prepacked) copy of the weights, and its graphs cannot be saved.
    fuse: fuse q/k/v and gate/up projections first (model.fuse_projections()).
    window: attend over the filled slots only (the step gets views of the first slot+1 cache slots,
        with that length dynamic: one graph for all of them) instead of over the whole static cache
        with a mask. Default: on, except with CUDA graphs (they need static shapes; attention over
        the whole cache is cheap on a GPU). On CPU, whole-cache attention cost e.g. 30 x 0.23 ms
        (float32) / 30 x 1.5 ms (bfloat16) per token for a 1024-slot SmolLM2 cache.
    backend: a torch.compile backend (tests pass a failing one).
    verify_rows: tokens per compiled speculative verification (`CompiledDecode.verify`; saved like the
        step); 0 = verification stays eager. Default: `default_verify_rows` on CPU, 0 elsewhere.
    speculative: with warmup, also compile (or load) the verification graph now; otherwise it is built
        by the first speculative request (draft=...).
    huge_pages: on CPU, copy the weights (after fusing) into transparent huge pages before the step binds
        them (leanformers.memory: 11-53% faster decoding here); a no-op where they are already.

    Never raises for a compile problem: it logs a warning with the reason and the returned function
    decodes eagerly (`.failure` or `.eager` say why, `.is_compiled` is False).
    """
    model = lm_or_model if isinstance(lm_or_model, nn.Module) else lm_or_model.model
    device = model.model.embed_tokens.weight.device
    if fuse and hasattr(model, "fuse_projections"):
        model.fuse_projections()
    if mode is None:
        mode = DEFAULT_CUDA_MODE if device.type == "cuda" else DEFAULT_CPU_MODE
    if mode not in _MODES:
        raise InvalidArgumentError(f"unknown compile mode {mode!r}; choose one of {', '.join(sorted(_MODES))}")
    inductor = backend == "inductor"
    cudagraphs = inductor and device.type == "cuda" and _MODES[mode]
    if precompile is None:
        precompile = device.type == "cpu" and inductor and not freezing
    precompile = precompile and hasattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader")
    if window is None:
        window = not cudagraphs
    if verify_rows is None:
        verify_rows = default_verify_rows(model) if window and device.type == "cpu" else 0
    if not isinstance(verify_rows, int) or isinstance(verify_rows, bool) or not 0 <= verify_rows <= ops.MAX_ROWS:
        raise InvalidArgumentError(f"verify_rows must be an integer in [0, {ops.MAX_ROWS}], got {verify_rows!r}")
    path = Path(cache_dir).expanduser().resolve() if cache_dir is not None else default_cache_dir()
    if huge_pages and device.type == "cpu":  # arguments checked; before any graph binds the weights
        move_to_huge_pages(model)
    # Inductor is set up (~1 s of imports) only when something must be compiled: see CompiledDecode._prepare
    fn = CompiledDecode(model, mode=mode, backend=backend, cache_dir=path, precompile=precompile,
                        cudagraphs=cudagraphs, window=window, max_graphs=max_graphs, verify_rows=verify_rows,
                        freezing=freezing)
    pool = KVCachePool(model, static_addresses=device.type == "cuda")
    model.make_cache = pool  # instance attribute: prefill and decode share the pooled buffers
    _COMPILED[id(model)] = fn  # so that changing the model (quantize_model) retires it: see release()
    if warmup:
        context = getattr(model.config, "max_position_embeddings", None) or DEFAULT_CACHE_LEN
        warm_up(fn, batch_size=batch_size, cache_len=min(cache_len or DEFAULT_CACHE_LEN, context))
        if speculative and fn.graphs:
            warm_up_verify(fn, cache_len=min(cache_len or DEFAULT_CACHE_LEN, context))
        if not fn.graphs and fn.failure is None:
            fn.failure = next(iter(fn.eager.values()), "compilation failed")
        if fn.failure is not None:  # nothing compiled: the model decodes as before
            _detach(model)
    return fn


def default_verify_rows(model: nn.Module) -> int:
    """Tokens per compiled verification forward on CPU (the pending token + up to rows - 1 drafts).

    Rows are the innermost loop of each weight's reduction (models/ops.py): extra rows reuse weights
    from L1, until the arithmetic costs more than streaming the weights. VERIFY_ROWS records where that
    happens for SmolLM2-135M on 2 threads (see VERIFY_COST). At least 2.
    """
    return VERIFY_ROWS[weight_kind(model)]  # (rows = 1 would verify no draft at all)


def weight_kind(model: nn.Module) -> str:
    """"int4", "int8" (quantized linears), else the activation dtype: "float32" or "bfloat16" (any 16-bit)."""
    kinds = {type(m).__name__ for m in model.modules()}
    if "Int4Linear" in kinds:
        return "int4"
    if "Int8Linear" in kinds:
        return "int8"
    norm = getattr(getattr(model, "model", None), "norm", None)
    dtype = norm.weight.dtype if norm is not None else next(model.parameters()).dtype
    return "float32" if dtype == torch.float32 else "bfloat16"


def verify_cost(model: nn.Module, rows: int) -> float:
    """A compiled verification forward over `rows` tokens, in compiled one-token steps (VERIFY_COST, fixed:
    never timed at run time, so seeded runs stay reproducible; linear between and beyond the measured T)."""
    table = VERIFY_COST[weight_kind(model)]
    if rows in table:
        return table[rows]
    ts = sorted(table)
    lo = max([t for t in ts if t < rows], default=ts[0])
    hi = min([t for t in ts if t > rows], default=None)
    if hi is None:  # beyond the table: the last slope
        lo, hi = ts[-2], ts[-1]
    return table[lo] + (rows - lo) * (table[hi] - table[lo]) / (hi - lo)


def _detach(model: nn.Module) -> CompiledDecode | None:
    """Unhook the compiled step's registry entry and KV-cache pool from `model`; the step, if there was one."""
    model.__dict__.pop("make_cache", None)
    return _COMPILED.pop(id(model), None)


def release(model: nn.Module, why: str) -> None:
    """Retire the compiled decode step of `model`, if any, because `why` (the model changed under it).

    Its graphs are bound to the model's tensors and check no guards, so they must not see a changed model: the step
    decodes eagerly from then on, and the KV-cache pool (buffers of the old dtype) is removed.
    """
    fn = _detach(model)
    if fn is None or fn.model is not model:
        return
    fn.graphs.clear()
    fn.failure = why
    log.warning("leanformers: %s: the compiled decode step is dropped; compile again", why)


def warm_up_verify(fn: CompiledDecode, *, cache_len: int = DEFAULT_CACHE_LEN) -> float:
    """Compile (or load) the speculative verification graph, with the inputs speculative decoding gives it."""
    t0 = time.perf_counter()
    if not fn.verify_rows or fn.failure is not None:
        return 0.0
    model = fn.model
    device = model.model.embed_tokens.weight.device
    with torch.inference_mode(False):  # as SpeculativeSteps makes them
        cache = model.make_cache(1, cache_len)
        positions = torch.arange(cache_len, device=device).unsqueeze(0)
    with torch.inference_mode():
        tokens = torch.zeros(1, fn.verify_rows, dtype=torch.long, device=device)
        pos = max(0, min(16, cache_len - fn.verify_rows - 1))  # a window longer than the rows (as in use)
        if fn.can_verify(model, fn.verify_rows, cache_len, pos):
            fn.verify(model, tokens, cache, pos, positions)
    return time.perf_counter() - t0


def warm_up(fn: CompiledDecode, *, batch_size: int = 1, cache_len: int = DEFAULT_CACHE_LEN) -> float:
    """Compile (or load) the step for this shape by running a tiny generation through the real loop.

    Going through generate_steps gives the compiled step exactly the inputs real requests give it
    (inference-mode flags, strides of the position slices), so requests hit the same graph.
    """
    from .decode import generate_steps
    from .sampling import SamplingParams

    t0 = time.perf_counter()
    steps = 4 if fn.cudagraphs else 2  # CUDA graphs: warm-up run, recording, replay
    prompts = [[0]] * batch_size
    for _ in generate_steps(fn.model, prompts, max_new_tokens=steps, params=SamplingParams(),
                            decode_fn=fn, cache_len=cache_len):
        pass
    return time.perf_counter() - t0
