"""The serving engine: continuous batching of many requests over one model, in one loop that owns it.

    engine = Engine(lm, max_batch_size=16, max_queue=256, max_model_len=2048)
    engine.start()                                            # the loop runs in a thread of its own
    handle = engine.submit([PromptSpec(ids, n=1)], SequenceOptions(max_tokens=64), on_output)
    handle.cancel()                                           # e.g. the client went away

KV memory: one static KVCache of max_batch_size rows x max_model_len positions, allocated at start (the
startup message says how many bytes). Each row is a slot that one sequence (one choice of a request)
holds from admission to its end; a freed row is reused as is (every position is written before it is
attended to, so stale contents are harmless).

Each iteration of the loop, at a step boundary:
1. cancelled sequences leave (their slots are free at once); waiting ones are admitted, oldest first,
   into the lowest free slots;
2. prefill, chunked: up to `prefill_chunk` prompt tokens of admitted sequences are written into their
   rows (`cache.rows(slot, slot + 1)`, the model's eager forward), so running streams wait at most one
   chunk for a newcomer; a sequence whose prompt is complete samples its first token from the prefill's
   last logits, as `lm.generate` does;
3. one batched decode step (`DecodeStep`, eager or compiled) over rows 0..hi-1, every row at its own
   position (the model contract's per-row positions). Rows that are not decoding (free, or still
   prefilling) ride along with a dummy token written at a position their own later tokens overwrite.
   A compiled step is specialized on the batch size: hi is rounded up to a bucket (1, 2, 4, 8, ...,
   max_batch_size), one graph each, compiled or loaded at start.
Each sequence then samples with its own parameters and generator (serve/sequence.py) and its text goes
through the library's TextAssembler (stop strings, UTF-8-safe pieces). Greedy tokens equal `lm.generate`
of the prompt alone: the same prefill, steps and sampler, rows never mixing.

Backpressure: at most max_batch_size sequences run and max_queue wait; `submit` beyond that raises
QueueFullError (HTTP 429). The loop never dies on a request: an exception in a step fails the sequences
of that step (their outputs say "error") and the loop goes on.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidArgumentError, LeanformersError
from ..models.cache import KVCache
from .grammar import JsonGrammars
from .metrics import Metrics
from .sequence import Output, OutputCallback, Sequence, SequenceOptions, choose_tokens, now

log = logging.getLogger("leanformers.serve")
status = logging.getLogger("leanformers.status")

DEFAULT_MAX_MODEL_LEN = 2048
DEFAULT_PREFILL_CHUNK = 256


class QueueFullError(LeanformersError):
    """The engine holds max_batch_size running and max_queue waiting sequences: try again later (HTTP 429)."""


class EngineStoppedError(LeanformersError):
    """The engine is not running (stopped, or not started)."""


@dataclass(frozen=True)
class PromptSpec:
    """One prompt of a request and how many choices to generate from it."""

    ids: list[int]
    n: int = 1


class RequestHandle:
    """The engine's side of one request: its sequences, its callback, and `cancel()`."""

    _ids = itertools.count()

    def __init__(self, engine: "Engine", on_output: OutputCallback, prompt_tokens: list[int]):
        self.id = next(self._ids)
        self.engine = engine
        self.on_output = on_output
        self.prompt_tokens = prompt_tokens  # per choice
        self.cancelled = False
        self.t_submit = now()

    def cancel(self) -> None:
        """Stop generating: the sequences leave the batch (or the queue) at the next step boundary."""
        if not self.cancelled:
            self.cancelled = True
            self.engine._wake()


def batch_buckets(max_batch_size: int) -> list[int]:
    """Batch sizes a compiled step is built for: powers of two below max_batch_size, and max_batch_size."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch_size]


class Engine:
    """Continuous batching over one LanguageModel's DecodeStep; see the module docstring."""

    def __init__(self, lm: Any, *, max_batch_size: int = 16, max_queue: int = 256, max_model_len: int | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, metrics: Metrics | None = None):
        for name, value, low in (("max_batch_size", max_batch_size, 1), ("max_queue", max_queue, 0),
                                 ("prefill_chunk", prefill_chunk, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidArgumentError(f"{name} must be an integer >= {low}, got {value!r}")
        context = lm.context_length
        if max_model_len is None:
            max_model_len = min(context, DEFAULT_MAX_MODEL_LEN)
        if not isinstance(max_model_len, int) or isinstance(max_model_len, bool) or not 2 <= max_model_len <= context:
            raise InvalidArgumentError(f"max_model_len must be an integer in [2, {context}] (the model's context), "
                                       f"got {max_model_len!r}")
        self.lm, self.model, self.step, self.tokenizer = lm, lm.model, lm.step, lm.tokenizer
        self.eos_ids = lm.eos_token_ids
        self.vocab_size = lm.config.vocab_size
        self.device = self.model.device
        self.max_batch_size, self.max_queue, self.max_model_len = max_batch_size, max_queue, max_model_len
        self.prefill_chunk = prefill_chunk
        self.metrics = metrics or Metrics()
        self.buckets = batch_buckets(max_batch_size) if self.step.is_compiled else list(range(1, max_batch_size + 1))
        # the KV memory: one row per slot, allocated once (outside inference mode, as the decode loop makes it)
        self.cache: KVCache = self.step.make_cache(max_batch_size, max_model_len)
        self._views = {b: self.cache.rows(0, b) for b in sorted(set(self.buckets))}
        self._rows = [self.cache.rows(s, s + 1) for s in range(max_batch_size)]
        self._free = list(range(max_batch_size))  # a heap: the lowest free slot first
        self._waiting: deque[Sequence] = deque()
        self._prefilling: list[Sequence] = []
        self._decoding: list[Sequence] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0  # decode steps run (tests and stats)
        self.metrics.set_kv(self.cache.nbytes, max_batch_size, max_model_len)
        self.grammars = JsonGrammars(self.tokenizer, self.eos_ids, self.vocab_size)

    # ------------------------------------------------------------------------------ public
    def describe_memory(self) -> str:
        """One line: what the KV cache reserved."""
        layout = self.model.kv_layout()
        per_token = self.cache.nbytes // (self.max_batch_size * self.max_model_len)
        return (f"reserved {self.cache.nbytes / 2**20:.1f} MiB ({self.cache.nbytes} bytes) of KV cache: "
                f"{self.max_batch_size} sequence slots x {self.max_model_len} tokens x {per_token} bytes per token "
                f"({layout.n_layers} layers x 2 x {layout.n_kv_heads} KV heads x {layout.head_dim}, "
                f"{str(self.cache.dtype).removeprefix('torch.')})")

    def start(self) -> "Engine":
        """Warm up the decode step (compiled graphs are built or loaded now) and start the loop thread."""
        if self._thread is not None:
            return self
        self.warm_up()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="leanformers-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop; unfinished requests get an "error" output."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def warm_up(self) -> None:
        """One decode step per batch bucket (a compiled step builds or loads its graphs), and a tiny prefill."""
        t0 = time.perf_counter()
        sizes = self.buckets if self.step.is_compiled else [1, self.max_batch_size]
        with torch.inference_mode():
            for b in sizes:
                tokens = torch.zeros(b, 1, dtype=torch.long, device=self.device)
                positions = torch.ones(b, 1, dtype=torch.long, device=self.device)  # a window of 2 slots
                self.step(tokens, positions, self._views[b] if b in self._views else self.cache.rows(0, b))
            self.model.hidden_states(torch.zeros(1, 2, dtype=torch.long, device=self.device), cache=self._rows[0],
                                     positions=torch.arange(2, device=self.device).unsqueeze(0))
        log.info("decode step warmed up for batch sizes %s in %.1fs", sizes, time.perf_counter() - t0)

    def submit(self, prompts: list[PromptSpec], options: SequenceOptions, on_output: OutputCallback) -> RequestHandle:
        """Queue a request: choice i*n + j is the j-th of prompt i. `on_output(list[Output])` is called from
        the engine thread with each step's outputs. Raises QueueFullError beyond capacity,
        InvalidArgumentError for a prompt that does not fit the context."""
        if not self.alive:
            raise EngineStoppedError("the engine is not running")
        for p in prompts:
            if not p.ids:
                raise InvalidArgumentError("the prompt is empty")
            if len(p.ids) >= self.max_model_len:
                raise InvalidArgumentError(f"the prompt has {len(p.ids)} tokens but the context is "
                                           f"{self.max_model_len} tokens (prompt + completion)")
        total = sum(p.n for p in prompts)
        handle = RequestHandle(self, on_output, [len(p.ids) for p in prompts for _ in range(p.n)])
        seqs = []
        index = 0
        for p in prompts:
            for j in range(p.n):
                seqs.append(Sequence(handle, index, p.ids, options, seed_offset=j, tokenizer=self.tokenizer,
                                     eos_ids=self.eos_ids, max_len=self.max_model_len, vocab_size=self.vocab_size,
                                     device=self.device, grammars=self.grammars))
                index += 1
        with self._cv:
            running = self.max_batch_size - len(self._free)
            if running + len(self._waiting) + total > self.max_batch_size + self.max_queue:
                self.metrics.rejected.inc()
                raise QueueFullError(f"the server is at capacity ({self.max_batch_size} running, "
                                     f"{len(self._waiting)} waiting of at most {self.max_queue}); retry later")
            self._waiting.extend(seqs)
            self.metrics.waiting.set(len(self._waiting))
            self._cv.notify_all()
        return handle

    def counts(self) -> tuple[int, int]:
        """(running, waiting) sequences."""
        with self._cv:
            return self.max_batch_size - len(self._free), len(self._waiting)

    # ------------------------------------------------------------------------------ the loop
    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stopping and not (self._waiting or self._prefilling or self._decoding):
                        self._cv.wait()
                    if self._stopping:
                        break
                try:
                    self._iteration()
                except Exception as exc:  # a bug or the machine (out of memory): fail what was running, go on
                    log.exception("engine step failed")
                    self._fail(self._prefilling + self._decoding, f"{type(exc).__name__}: {exc}")
        self._fail(self._prefilling + self._decoding + list(self._waiting), "the server is shutting down")
        self._waiting.clear()

    def _iteration(self) -> None:
        outputs: dict[RequestHandle, list[Output]] = {}
        self._retire_cancelled()
        self._admit()
        budget = self.prefill_chunk if self._decoding else 4 * self.prefill_chunk
        for seq in list(self._prefilling):
            if budget <= 0:
                break
            try:
                budget -= self._prefill(seq, budget, outputs)
            except Exception as exc:
                log.exception("prefill failed")
                self._fail([seq], f"{type(exc).__name__}: {exc}")
        if self._decoding:
            self._decode(outputs)
        self._deliver(outputs)
        self.metrics.running.set(self.max_batch_size - len(self._free))

    def _retire_cancelled(self) -> None:
        for group in (self._prefilling, self._decoding):
            for seq in [s for s in group if s.handle.cancelled]:
                group.remove(seq)
                self._release(seq)
                self.metrics.cancelled.inc()
        if any(s.handle.cancelled for s in self._waiting):
            with self._cv:
                kept = [s for s in self._waiting if not s.handle.cancelled]
                self.metrics.cancelled.inc(len(self._waiting) - len(kept))
                self._waiting = deque(kept)

    def _admit(self) -> None:
        with self._cv:
            while self._waiting and self._free:
                seq = self._waiting.popleft()
                seq.slot = heapq.heappop(self._free)
                self._prefilling.append(seq)
            self.metrics.waiting.set(len(self._waiting))

    def _release(self, seq: Sequence) -> None:
        if seq.slot is not None:
            with self._cv:
                heapq.heappush(self._free, seq.slot)
            seq.slot = None

    def _prefill(self, seq: Sequence, budget: int, outputs: dict) -> int:
        """Write up to `budget` more prompt tokens of `seq` into its row; at the end, its first token."""
        a = seq.cached
        b = min(seq.n_prompt, a + budget)
        ids = torch.tensor([seq.ids[a:b]], device=self.device)
        positions = torch.arange(a, b, device=self.device).unsqueeze(0)
        hidden = self.model.hidden_states(ids, cache=self._rows[seq.slot], positions=positions)
        seq.cached = b
        if b == seq.n_prompt:
            self._prefilling.remove(seq)
            self.metrics.prompt_tokens.inc(seq.n_prompt)
            logits = self.model.logits(hidden[:, -1])  # (1, V): the prompt's last token
            self._emit([seq], logits, outputs)
        return b - a

    def _decode(self, outputs: dict) -> None:
        seqs = self._decoding
        hi = max(s.slot for s in seqs) + 1
        b = next(size for size in self.buckets if size >= hi)
        tokens = [0] * b
        positions = [0] * b  # free rows: position 0, rewritten by their next prompt
        for s in self._prefilling:
            if s.slot < b:
                positions[s.slot] = s.cached  # the next prompt position: the next prefill chunk rewrites it
        for s in seqs:
            tokens[s.slot] = s.ids[-1]
            positions[s.slot] = len(s.ids) - 1
        tok = torch.tensor(tokens, device=self.device).unsqueeze(1)
        pos = torch.tensor(positions, device=self.device).unsqueeze(1)
        try:
            logits = self.step(tok, pos, self._views[b] if b in self._views else self.cache.rows(0, b))
        except Exception as exc:
            log.exception("decode step failed")
            self._fail(list(seqs), f"{type(exc).__name__}: {exc}")
            return
        self.steps += 1
        self.metrics.decode_steps.inc()
        rows = [s.slot for s in seqs]
        self._emit(list(seqs), logits[rows] if rows != list(range(b)) else logits, outputs)

    def _emit(self, seqs: list[Sequence], logits: torch.Tensor, outputs: dict) -> None:
        """Choose each sequence's next token; record it, the latency metrics and the outputs; retire finished ones."""
        chosen = choose_tokens(seqs, logits)
        t = now()
        for seq, (token, lp) in zip(seqs, chosen):
            if seq.generated == 0:
                self.metrics.ttft.observe(t - seq.handle.t_submit)
                self._decoding.append(seq)
            else:
                self.metrics.itl.observe(t - seq.t_last)
            out = seq.accept(token, lp, t)
            self.metrics.generation_tokens.inc()
            outputs.setdefault(seq.handle, []).append(out)
            if seq.finished:
                self._decoding.remove(seq)
                self._release(seq)
                self.metrics.finished(out.finish_reason or "stop")

    def _fail(self, seqs: list[Sequence], message: str) -> None:
        outputs: dict[RequestHandle, list[Output]] = {}
        for seq in seqs:
            for group in (self._prefilling, self._decoding):
                if seq in group:
                    group.remove(seq)
            self._release(seq)
            seq.finished = True
            self.metrics.finished("error")
            outputs.setdefault(seq.handle, []).append(Output(seq.index, "", [], None, "error", message))
        self._deliver(outputs)

    def _deliver(self, outputs: dict[RequestHandle, list[Output]]) -> None:
        for handle, outs in outputs.items():
            if handle.cancelled:
                continue
            try:
                handle.on_output(outs)
            except Exception:  # a callback's problem (a closed event loop) must not stop the engine
                log.exception("delivering outputs failed")
