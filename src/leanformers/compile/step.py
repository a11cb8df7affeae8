"""A compiled one-token decode step: static shapes, no graph breaks, cached on disk, eager fallback.

    step = compile_decode(model)                  # a DecodeStep; LanguageModel.compile() wraps it
    generate_tokens(step, prompts, ...)           # the decode loop is handed the step

Only the decode step is compiled (one graph per input signature, no graph breaks); prefill stays eager and
runs the same layer code. Shapes are static: a fixed batch size, and a cache length rounded up to a
bucket (`cache_len`), so every step of every request with the same (batch size, bucket) runs one graph.
How attention sees the cache:
- CPU ("window"): the step gets views of the first max(position)+1 cache slots, their number the graph's
  one dynamic dimension, so attention costs what the filled prefix costs, as in eager mode.
- CUDA (CUDA graphs need static shapes): attention over the whole static cache, masked by position.
On CPU the layer code switches, inside the compiled step only, to the GEMV and few-query attention of
models/ops.py, which Inductor turns into streaming C++ loops.

Disk cache (`$LEANFORMERS_CACHE/compile`, default `~/.cache/leanformers/compile`):
- On CPU each graph is compiled ahead of time into an AOTInductor package, `decode/<key>.pt2`
  (compile/aoti.py): a later process loads it and binds the model's own tensors, with no Dynamo or
  Inductor import. The key is the model's structure (config, module tree, parameter shapes/dtypes/ties),
  the input signature, the mode, the thread count (baked into the C++ loops) and the torch / leanformers
  versions and source files. A file that does not load is deleted and recompiled.
- Elsewhere (CUDA, other backends, precompile=False), or when the ahead-of-time build fails (logged),
  the step is torch.compile'd in-process (fullgraph=True).

The step owns its state: the graphs, a KV-cache pool (the same buffers are reused across requests, as
CUDA graphs need; a buffer set is handed out again only once the previous cache object is gone), and
the model's `structure_version` it was compiled for. When the model changes (quantized, fused, modules
replaced), the step notices at its next call, drops its graphs with a warning and decodes eagerly.
Failures never pass silently: no C++ compiler, a graph break or any compile error logs a warning naming
the cause, and that signature decodes eagerly (`.failure` / `.eager` say why).

Speculative decoding verifies several tokens in one forward: `verify` runs them through a second compiled
graph with a fixed number of rows (`verify_rows`, padded), built on first use and saved like the step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
import types
import weakref
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import InvalidArgumentError, UnsupportedModelError
from ..generation.decode import DecodeStep
from ..models import ops
from ..models.base import DecoderModel
from ..models.cache import KVCache
from . import aoti, inductor
from .inductor import CompileUnavailable, default_cache_dir
from .memory import move_to_huge_pages

log = logging.getLogger("leanformers.compile")
status = logging.getLogger("leanformers.status")  # slow phases, shown by the CLI on a terminal

DEFAULT_CPU_MODE = "default"  # as fast as max-autotune-no-cudagraphs on CPU, without (noisy) autotuning
DEFAULT_CUDA_MODE = "reduce-overhead"
DEFAULT_CACHE_LEN = 1024
# torch.compile's modes, and whether each uses CUDA graphs (on CUDA)
_MODES = {"default": False, "reduce-overhead": True, "max-autotune": True, "max-autotune-no-cudagraphs": False}
MAX_GRAPHS = 4  # distinct input signatures compiled per step before further ones stay eager
_POOL_SETS = 2  # buffer sets kept per cache shape (a second one serves an overlapping request)
_FORMAT = 3  # bump when the artifact key recipe changes


# ------------------------------------------------------------------------------------- what graphs compute
def step_forward(model: DecoderModel, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits (B, V) of one token per row."""
    return model(tokens, cache=cache, positions=positions)[:, -1]


def verify_forward(model: DecoderModel, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits (T, V) of every token of row 0."""
    return model(tokens, cache=cache, positions=positions)[0]


_FORWARDS = {"step": step_forward, "verify": verify_forward}


# ------------------------------------------------------------------------------------- cache pool
class KVCachePool:
    """Hands out KV caches whose buffers are reused across requests (static addresses for CUDA graphs).

    A buffer set is reused only when the KVCache object that last held it has been freed, so two
    generations in flight at once never share buffers. Stale contents are harmless: every position is
    written before it is attended to.
    """

    def __init__(self, model: DecoderModel, static_addresses: bool):
        self.model = model
        self._static = static_addresses
        self._sets: dict[tuple, list[tuple[list[torch.Tensor], list[torch.Tensor], Any]]] = {}

    def __call__(self, batch_size: int, max_len: int) -> KVCache:
        key = (batch_size, max_len, self.model.dtype, torch.is_inference_mode_enabled())
        sets = self._sets.setdefault(key, [])
        for i, (k, v, holder) in enumerate(sets):
            if holder() is None:
                cache = KVCache(list(k), list(v))
                sets[i] = (k, v, weakref.ref(cache))
                return cache
        fresh = self.model.make_cache(batch_size, max_len)
        if len(sets) < _POOL_SETS:
            if self._static:
                for t in fresh.k + fresh.v:
                    torch._dynamo.mark_static_address(t)
            sets.append((fresh.k, fresh.v, weakref.ref(fresh)))
        return fresh


# ------------------------------------------------------------------------------------- keys
def _tensor_sig(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.stride(), t.dtype, t.device.type, t.is_inference())


def signature(kind: str, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> tuple:
    """What a compiled graph is specialized on (Dynamo guards on the same properties), and which function."""
    return (kind, _tensor_sig(tokens), _tensor_sig(positions), _tensor_sig(cache.k[0]), len(cache.k),
            cache.max_len, cache.batch_size)


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
        file = getattr(sys.modules.get(name), "__file__", None)
        if file and os.path.isfile(file):
            h.update(name.encode())
            h.update(Path(file).read_bytes())
    return h.hexdigest()


def structure_key(model: DecoderModel) -> dict[str, Any]:
    """The parts of a model that its compiled step depends on (not the weights' values)."""
    groups: dict[int, int] = {}
    tensors = []
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        gid = groups.setdefault(id(t), len(groups))
        tensors.append((name, tuple(t.shape), str(t.dtype), t.device.type, gid))
    config = model.config
    modules = {type(m).__module__ for m in model.modules()} | {KVCache.__module__, ops.__name__, __name__}
    from .. import __version__

    return {
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config),
        "modules": repr(model),
        "tensors": tensors,
        "source": _source_digest(modules),
        "leanformers": __version__,
        "torch": torch.__version__,
        "python": list(sys.version_info[:2]),
        "machine": inductor.machine(),
    }


# ------------------------------------------------------------------------------------- the step
class CompiledDecode(DecodeStep):
    """A DecodeStep that runs compiled graphs for its model, eagerly for anything it cannot compile.

    Each distinct input signature (batch size, cache length, dtypes, strides) gets one compiled graph:
    loaded from disk when possible, else compiled (and saved). Up to `max_graphs` of them; further
    signatures run eagerly, with a warning. A compile error logs a warning with the reason and that
    signature runs eagerly from then on.
    """

    def __init__(self, model: DecoderModel, *, mode: str, backend: Any, cache_dir: Path, precompile: bool,
                 cudagraphs: bool, window: bool, max_graphs: int = MAX_GRAPHS, verify_rows: int = 0,
                 freezing: bool = False, cache_bucket: int = DEFAULT_CACHE_LEN):
        super().__init__(model)
        self.device = model.device
        self.mode, self.backend, self.cache_dir = mode, backend, cache_dir
        self.precompile, self.cudagraphs, self.window, self.freezing = precompile, cudagraphs, window, freezing
        self.max_graphs, self.verify_rows, self.cache_bucket = max_graphs, verify_rows, cache_bucket
        self.graphs: dict[tuple, Callable[..., torch.Tensor]] = {}
        self.info: dict[tuple, dict[str, Any]] = {}  # signature -> {"how": loaded|compiled|jit, "seconds": ...}
        self.eager: dict[tuple, str] = {}  # signature -> why it runs eagerly
        self.failure: str | None = None  # set when compilation is off altogether
        self.calls = {"compiled": 0, "eager": 0}  # how the step's calls ran (tests and stats read this)
        self._options: dict[str, Any] | None = None  # Inductor's options: set up by _prepare()
        self._jit: dict[tuple, Callable[..., torch.Tensor]] = {}  # signature -> its torch.compile'd function
        self._structure: dict[str, Any] | None = None
        self._version = model.structure_version
        self._pool = KVCachePool(model, static_addresses=self.device.type == "cuda")

    # ------------------------------------------------------------------------------ DecodeStep
    @property
    def is_compiled(self) -> bool:  # type: ignore[override]
        """True while the step runs (or will build on first use) compiled graphs; False once it fell back."""
        return self.failure is None and self.model.structure_version == self._version

    def make_cache(self, batch_size: int, max_len: int) -> KVCache:
        return self._pool(batch_size, max_len)

    def cache_len(self, need: int) -> int:
        context = getattr(self.model.config, "max_position_embeddings", None) or need
        size = -(-need // self.cache_bucket) * self.cache_bucket
        return min(size, max(need, context))

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self._run("step", tokens, positions, cache)

    def can_verify(self, rows: int, max_len: int, pos: int) -> bool:
        return (self._usable() and 0 < rows <= self.verify_rows and pos + self.verify_rows < max_len
                and not any(sig[0] == "verify" for sig in self.eager))

    def verify(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (n, V) of tokens (1, n): through the compiled verification graph (padded to verify_rows)
        when `can_verify`, else eagerly. Each row's matrix products are computed as in a one-token step."""
        n, pos = tokens.shape[1], int(positions[0, 0])
        if not self.can_verify(n, cache.max_len, pos):
            return super().verify(tokens, positions, cache)
        T = self.verify_rows
        if n < T:
            tokens = torch.cat([tokens, tokens[:, -1:].expand(1, T - n)], dim=1)
        positions = torch.arange(pos, pos + T, device=tokens.device).unsqueeze(0)
        return self._run("verify", tokens, positions, cache)[:n]

    def for_model(self, model: DecoderModel) -> "CompiledDecode":
        """A compiled step for another model (a draft), with the same options; its graphs build on first use."""
        return CompiledDecode(model, mode=self.mode, backend=self.backend, cache_dir=self.cache_dir,
                              precompile=self.precompile, cudagraphs=self.cudagraphs, window=self.window,
                              max_graphs=self.max_graphs, freezing=self.freezing, cache_bucket=self.cache_bucket)

    # ------------------------------------------------------------------------------ running
    def _usable(self) -> bool:
        if self.failure is not None:
            return False
        if self.model.structure_version != self._version:  # quantized / fused / modules swapped since
            self._retire("the model changed after compiling (quantized, fused or modules replaced)")
            return False
        return True

    def _retire(self, why: str) -> None:
        self.graphs.clear()
        self._pool = KVCachePool(self.model, static_addresses=self.device.type == "cuda")
        self.failure = why
        log.warning("leanformers: %s: the compiled decode step is dropped, decoding eagerly; compile again", why)

    def _eager_forward(self, kind: str, tokens, positions, cache) -> torch.Tensor:
        self.calls["eager"] += 1
        return _FORWARDS[kind](self.model, tokens, positions, cache)

    def _run(self, kind: str, tokens, positions, cache) -> torch.Tensor:
        if not self._usable():
            return self._eager_forward(kind, tokens, positions, cache)
        length = int(positions.max()) + 1 if self.window else 0
        if self.window and not aoti.MIN_WINDOW <= length < cache.max_len:  # outside the graphs' range
            return self._eager_forward(kind, tokens, positions, cache)
        sig = signature(kind, tokens, positions, cache)
        fn = self.graphs.get(sig)
        if fn is not None:
            try:
                if self.cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                out = fn(tokens, positions, cache.window(length) if self.window else cache)
                self.calls["compiled"] += 1
                return out
            except Exception as exc:
                self._eager_sig(sig, f"the compiled {kind} failed: {_describe(exc)}")
                return self._eager_forward(kind, tokens, positions, cache)
        if sig in self.eager:
            return self._eager_forward(kind, tokens, positions, cache)
        if len(self.graphs) >= self.max_graphs:
            self._eager_sig(sig, f"{len(self.graphs)} input shapes are compiled already (max_graphs); "
                                 "a fixed cache bucket lets requests share one")
            return self._eager_forward(kind, tokens, positions, cache)
        try:
            out = self._build(sig, kind, tokens, positions, cache, length)
            self.calls["compiled"] += 1
            return out
        except CompileUnavailable:  # self.failure says why (warned once)
            return self._eager_forward(kind, tokens, positions, cache)
        except Exception as exc:
            self._eager_sig(sig, f"compilation failed: {_describe(exc)}")
            return self._eager_forward(kind, tokens, positions, cache)

    # ------------------------------------------------------------------------------ building
    def _prepare(self) -> None:
        """Inductor's setup, once, before the first compilation (loading a saved package needs none of it).
        Raises CompileUnavailable."""
        if self._options is not None or self.backend != "inductor":
            return
        reason = inductor.compile_unavailable_reason(self.device)
        if reason is None:
            try:
                self._options = inductor.inductor_options(self.mode, self.device, self.freezing)
                if self.device.type == "cpu":
                    self.cache_dir.mkdir(parents=True, exist_ok=True)
                    inductor.setup_cpu_isa(self.cache_dir)
            except Exception as exc:
                reason = f"setting up Inductor failed: {_describe(exc)}"
        if reason is not None:
            self.failure = f"torch.compile is unavailable: {reason}"
            log.warning("leanformers: decoding eagerly: %s", self.failure)
            raise CompileUnavailable(self.failure)

    def _build(self, sig: tuple, kind: str, tokens, positions, cache: KVCache, length: int) -> torch.Tensor:
        t0 = time.perf_counter()
        B, S = cache.batch_size, cache.max_len
        what = "decode step" if kind == "step" else f"verification step ({tokens.shape[1]} tokens)"
        args = (tokens, positions, cache.window(length) if self.window else cache)
        if self.precompile:
            path = self._artifact_path(sig)
            if path.is_file():
                try:
                    fn = aoti.AOTIStep.load(path, self.model, _FORWARDS[kind])
                    out = fn(*args)
                    self._done(sig, fn, "loaded", t0)
                    return out
                except Exception as exc:
                    log.info("saved %s %s unusable (%s); compiling again", what, path.name, _describe(exc))
                    path.unlink(missing_ok=True)
            self._prepare()
            status.info("compiling the %s (batch %d, cache %d): a minute or two the first time, then cached in %s",
                        what, B, S, self.cache_dir)
            try:
                with inductor.scoped_cache_dir(self.cache_dir):
                    aoti.package(path, self.model, _FORWARDS[kind], args, S - 1 if self.window else None,
                                 self._options)
                fn = aoti.AOTIStep.load(path, self.model, _FORWARDS[kind])
            except Exception as exc:
                log.warning("leanformers: compiling the %s ahead of time failed (%s); using torch.compile "
                            "instead (not saved: every process compiles it again)", what, _describe(exc))
                path.unlink(missing_ok=True)
            else:
                meta = {"signature": repr(sig), "kind": kind, "mode": self.mode, "torch": torch.__version__,
                        "threads": torch.get_num_threads()}
                try:
                    inductor.atomic_write(path.with_suffix(".json"), json.dumps(meta, default=str, indent=1).encode())
                except OSError:
                    pass
                out = fn(*args)
                self._done(sig, fn, "compiled", t0)
                return out
        self._prepare()
        if sig not in self._jit:
            self._jit[sig] = self._compiler(kind)
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        if self.window:  # the window length is the step's one dynamic dimension
            win = args[2]
            for t in win.k + win.v:
                torch._dynamo.mark_dynamic(t, 2)
        with inductor.scoped_cache_dir(self.cache_dir):
            out = self._jit[sig](*args)
        self._done(sig, self._jit[sig], "jit", t0)
        return out

    def _compiler(self, kind: str) -> Callable[..., torch.Tensor]:
        kwargs: dict[str, Any] = dict(fullgraph=True, dynamic=False, backend=self.backend)
        if self._options is not None:
            kwargs["options"] = self._options
        forward, model = _FORWARDS[kind], self.model

        def step(tokens, positions, cache):
            return forward(model, tokens, positions, cache)

        # A code object of its own: Dynamo keeps compiled graphs, and counts recompilations against its
        # limit (8), per code object. Shared by every step of every model in the process, the 9th graph
        # fell back to eager, and the graphs of dropped models stayed alive in the shared cache.
        step = types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__, step.__defaults__,
                                  step.__closure__)
        return torch.compile(step, **kwargs)

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
        what = "decode step" if sig[0] == "step" else "verification step"
        log.info("%s ready (%s in %.1fs): batch %d, cache %d", what, how, self.info[sig]["seconds"], sig[-1], sig[-2])

    def _eager_sig(self, sig: tuple, why: str) -> None:
        self.graphs.pop(sig, None)
        self.eager[sig] = why
        log.warning("leanformers: decoding eagerly (batch %d, cache %d): %s", sig[-1], sig[-2], why)


# ------------------------------------------------------------------------------------- entry point
def compile_decode(
    model: DecoderModel,
    *,
    mode: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_bucket: int = DEFAULT_CACHE_LEN,
    batch_size: int = 1,
    warmup: bool = True,
    precompile: bool | None = None,
    freezing: bool = False,
    fuse: bool = True,
    window: bool | None = None,
    backend: Any = "inductor",
    max_graphs: int = MAX_GRAPHS,
    verify_rows: int = 0,
    speculative: bool = False,
    huge_pages: bool = True,
) -> CompiledDecode:
    """Compile the one-token decode step of `model`; returns a CompiledDecode (a DecodeStep).

    mode: torch.compile mode; default "default" on CPU, "reduce-overhead" (CUDA graphs) on CUDA.
    cache_dir: where compiled artifacts persist (default: default_cache_dir()).
    cache_bucket: KV cache sizes are rounded up to a multiple of it (capped at the context length) so
        requests share one graph.
    warmup: compile (or load) now for `batch_size` rows and one cache bucket, so the first request does
        not wait.
    precompile: compile each graph ahead of time into an AOTInductor package and load it from disk in
        later processes; default: on CPU (CUDA graphs are set up by torch.compile's runtime).
    freezing: Inductor freezing (weights as constants): slower here, a second copy of the weights, not savable.
    fuse: fuse q/k/v and gate/up projections first (model.fuse_projections()).
    window: attend over the filled slots only (views of the first slots, that length dynamic) instead of
        the whole static cache; default: on, except with CUDA graphs.
    backend: a torch.compile backend (tests pass "eager" or a failing one).
    verify_rows: tokens per compiled speculative verification (0: verification stays eager).
    speculative: with warmup, also compile (or load) the verification graph now (else on first use).
    huge_pages: on CPU, copy the weights (after fusing) into transparent huge pages before the step binds
        them (compile/memory.py); a no-op where they are already.

    Never raises for a compile problem: it logs a warning with the reason and the step decodes eagerly
    (`.failure` or `.eager` say why, `.is_compiled` is False).
    """
    if not isinstance(model, DecoderModel):
        raise UnsupportedModelError(f"compile_decode needs a leanformers DecoderModel, got {type(model).__name__}")
    device = model.device
    if mode is None:
        mode = DEFAULT_CUDA_MODE if device.type == "cuda" else DEFAULT_CPU_MODE
    if mode not in _MODES:
        raise InvalidArgumentError(f"unknown compile mode {mode!r}; choose one of {', '.join(sorted(_MODES))}")
    if not isinstance(verify_rows, int) or isinstance(verify_rows, bool) or not 0 <= verify_rows <= ops.MAX_ROWS:
        raise InvalidArgumentError(f"verify_rows must be an integer in [0, {ops.MAX_ROWS}], got {verify_rows!r}")
    if not isinstance(cache_bucket, int) or isinstance(cache_bucket, bool) or cache_bucket < 2:
        raise InvalidArgumentError(f"cache_bucket must be an integer >= 2, got {cache_bucket!r}")
    inductor_backend = backend == "inductor"
    cudagraphs = inductor_backend and device.type == "cuda" and _MODES[mode]
    if precompile is None:
        precompile = device.type == "cpu" and inductor_backend and not freezing
    precompile = precompile and hasattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader")
    if window is None:
        window = not cudagraphs
    if fuse:
        model.fuse_projections()
    if huge_pages and device.type == "cpu":  # arguments checked; before any graph binds the weights
        move_to_huge_pages(model)
    path = Path(cache_dir).expanduser().resolve() if cache_dir is not None else default_cache_dir()
    step = CompiledDecode(model, mode=mode, backend=backend, cache_dir=path, precompile=precompile,
                          cudagraphs=cudagraphs, window=window, max_graphs=max_graphs, verify_rows=verify_rows,
                          freezing=freezing, cache_bucket=cache_bucket)
    if warmup:
        warm_up(step, batch_size=batch_size)
        if speculative and verify_rows and step.graphs:
            warm_up_verify(step)
        if not step.graphs and step.failure is None:
            step.failure = next(iter(step.eager.values()), "compilation failed")
    return step


def warm_up(step: CompiledDecode, *, batch_size: int = 1) -> None:
    """Compile (or load) the step for one cache bucket by running a tiny generation through the real loop,
    so that requests give it exactly the same inputs (inference-mode flags, strides)."""
    from ..generation.decode import generate_tokens
    from ..generation.sampling import Sampler, SamplingParams

    n = 4 if step.cudagraphs else 2  # CUDA graphs: warm-up run, recording, replay
    for _ in generate_tokens(step, [[0]] * batch_size, max_new_tokens=n + 1, sampler=Sampler(SamplingParams())):
        pass


def warm_up_verify(step: CompiledDecode) -> None:
    """Compile (or load) the verification graph, with the inputs speculative decoding gives it."""
    if not step.verify_rows or step.failure is not None:
        return
    dev = step.device
    with torch.inference_mode(False):  # caches are made outside inference mode, as the loop makes them
        cache = step.make_cache(1, step.cache_len(2))
    with torch.inference_mode():
        pos = max(0, min(16, cache.max_len - step.verify_rows - 1))  # a window longer than the rows (as in use)
        tokens = torch.zeros(1, step.verify_rows, dtype=torch.long, device=dev)
        positions = torch.arange(pos, pos + step.verify_rows, device=dev).unsqueeze(0)
        step.verify(tokens, positions, cache)
