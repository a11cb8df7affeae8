"""Turning requests into results: prompt validation, stopping rules, text assembly, streaming, stats."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from ..errors import InvalidArgumentError
from .decode import DEFAULT_PREFILL_CHUNK, generate_steps
from .sampling import SamplingParams
from .text import TextAssembler


@dataclass
class GenerationResult:
    """One generated sequence. token_ids are the new tokens only (an EOS that ended it included)."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) | "length" (max_new_tokens or context full)
    prompt_tokens: int
    logprobs: list[float] | None = None  # log p(token) under the model's raw distribution
    stats: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.text


def fit_prompt(ids: list[int], max_new_tokens: int, context: int, *, truncate: bool) -> tuple[list[int], int]:
    """Check a prompt against the context window; returns (prompt ids, new-token budget)."""
    if not ids:
        raise InvalidArgumentError("the prompt is empty")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise InvalidArgumentError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if len(ids) >= context:
        if not truncate:
            raise InvalidArgumentError(
                f"the prompt has {len(ids)} tokens but the context window is {context} tokens; "
                "shorten it or pass truncate=True (--truncate) to keep its end"
            )
        keep = max(1, context - max_new_tokens)
        ids = ids[-keep:]
    return ids, min(max_new_tokens, context - len(ids))


def run_generation(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    params: SamplingParams,
    eos_ids: Sequence[int],
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    logprobs: bool = False,
    decode_fn=None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    results: list[GenerationResult] | None = None,
    steps_factory=None,
    cache_len: int | None = None,
) -> Iterator[str]:
    """Generate for every prompt; yields the text pieces of row 0 as they become final.

    The finished GenerationResults are appended to `results` (in prompt order) when the loop ends.
    `steps_factory` replaces the plain decode loop (speculative decoding plugs in there).
    """
    eos = set() if ignore_eos else set(eos_ids)
    n = len(prompts)
    assemblers = [TextAssembler(tokenizer, stop) for _ in range(n)]
    tokens: list[list[int]] = [[] for _ in range(n)]
    lps: list[list[float]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    t0 = time.perf_counter()
    t_first: list[float] = []
    kwargs = dict(max_new_tokens=max_new_tokens, params=params, logprobs=logprobs, prefill_chunk=prefill_chunk,
                  cache_len=cache_len)
    if decode_fn is not None:
        kwargs["decode_fn"] = decode_fn
    steps = (steps_factory or generate_steps)(model, prompts, on_prefill_done=lambda: t_first.append(time.perf_counter()), **kwargs)
    stats: dict[str, Any] = {}
    try:
        for step in steps:
            for row, tok in enumerate(step.tokens):
                if reasons[row] is not None:
                    continue
                tokens[row].append(tok)
                if logprobs and step.logprobs is not None:
                    lps[row].append(step.logprobs[row])
                if tok in eos:
                    reasons[row] = "stop"
                    continue
                piece = assemblers[row].push(tok)
                if assemblers[row].stopped:
                    reasons[row] = "stop"
                if row == 0 and piece:
                    yield piece
            if all(r is not None for r in reasons):
                break
    finally:
        stats.update(getattr(steps, "stats", {}) or {})
        close = getattr(steps, "close", None)
        if close is not None:
            close()
    tail = assemblers[0].finish()
    if tail:
        yield tail
    for a in assemblers[1:]:
        a.finish()
    t_end = time.perf_counter()
    prefill_s = (t_first[0] - t0) if t_first else 0.0
    decode_s = t_end - (t_first[0] if t_first else t0)
    new = sum(len(t) for t in tokens)
    stats.update(
        prefill_s=prefill_s,
        decode_s=decode_s,
        prompt_tokens=sum(len(p) for p in prompts),
        new_tokens=new,
        decode_tokens_per_s=(new - n) / decode_s if decode_s > 0 and new > n else 0.0,
    )
    if results is not None:
        for row in range(n):
            results.append(
                GenerationResult(
                    text=assemblers[row].text,
                    token_ids=tokens[row],
                    finish_reason=reasons[row] or "length",
                    prompt_tokens=len(prompts[row]),
                    logprobs=lps[row] if logprobs else None,
                    stats=dict(stats),
                )
            )
