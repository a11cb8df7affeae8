"""From token steps to results: prompt fitting, stopping rules, text assembly, streaming, stats.

    run = GenerationRun(step, tokenizer, prompts, config, eos_ids=[2])
    for piece in run: ...            # row 0's text, as it becomes final
    run.results                      # one GenerationResult per prompt (runs to the end if not iterated)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from ..errors import InvalidArgumentError
from .config import GenerationConfig
from .decode import DEFAULT_PREFILL_CHUNK, DecodeStep, PlainDecoding, Strategy, generate_tokens
from .sampling import Sampler
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
    stop_reason: str | None = None  # "eos" | "stop string" | "max_new_tokens" | "context"

    def __str__(self) -> str:
        return self.text


def fit_prompt(ids: list[int], max_new_tokens: int, context: int, *, truncate: bool) -> tuple[list[int], int]:
    """Check a prompt against the context window; returns (prompt ids, new-token budget)."""
    if not ids:
        raise InvalidArgumentError("the prompt is empty")
    if len(ids) >= context:
        if not truncate:
            raise InvalidArgumentError(
                f"the prompt has {len(ids)} tokens but the context window is {context} tokens; "
                "shorten it or pass truncate=True (--truncate) to keep its end"
            )
        ids = ids[-max(1, context - max_new_tokens):]
    return ids, min(max_new_tokens, context - len(ids))


class GenerationRun:
    """One generation over a batch of prompts: iterate for row 0's text pieces; `.results` at the end."""

    def __init__(self, step: DecodeStep, tokenizer: Any, prompts: list[list[int]], config: GenerationConfig, *,
                 eos_ids: Sequence[int], context: int, strategy: Strategy | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        fitted = [fit_prompt(p, config.max_new_tokens, context, truncate=config.truncate) for p in prompts]
        self.prompts = [p for p, _ in fitted]
        self.budget = min(b for _, b in fitted)
        self.config = config
        self.step, self.tokenizer = step, tokenizer
        self.strategy: Strategy = strategy if strategy is not None else PlainDecoding()
        self.eos = set() if config.ignore_eos else set(eos_ids)
        self.prefill_chunk = prefill_chunk
        self._results: list[GenerationResult] | None = None
        self._pieces = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    @property
    def results(self) -> list[GenerationResult]:
        if self._results is None:
            for _ in self._pieces:
                pass
        assert self._results is not None
        return self._results

    def _run(self) -> Iterator[str]:
        n, cfg = len(self.prompts), self.config
        assemblers = [TextAssembler(self.tokenizer, cfg.stop) for _ in range(n)]
        tokens: list[list[int]] = [[] for _ in range(n)]
        lps: list[list[float]] = [[] for _ in range(n)]
        reasons: list[str | None] = [None] * n
        t0 = time.perf_counter()
        t_first: float | None = None
        sampler = Sampler(cfg.sampling, self.step.model.device)
        steps = generate_tokens(self.step, self.prompts, max_new_tokens=self.budget, sampler=sampler,
                                logprobs=cfg.logprobs, strategy=self.strategy, prefill_chunk=self.prefill_chunk)
        try:
            for step in steps:
                if t_first is None:
                    t_first = time.perf_counter()
                for row, tok in enumerate(step.tokens):
                    if reasons[row] is not None:
                        continue
                    tokens[row].append(tok)
                    if step.logprobs is not None:
                        lps[row].append(step.logprobs[row])
                    if tok in self.eos:
                        reasons[row] = "eos"
                        continue
                    piece = assemblers[row].push(tok)
                    if assemblers[row].stopped:
                        reasons[row] = "stop string"
                    if row == 0 and piece:
                        yield piece
                if all(r is not None for r in reasons):
                    break
        finally:
            steps.close()
            self.strategy.close()
        tail = assemblers[0].finish()
        if tail:
            yield tail
        for a in assemblers[1:]:
            a.finish()
        t_end = time.perf_counter()
        t_first = t_first or t_end
        new = sum(len(t) for t in tokens)
        decode_s = t_end - t_first
        stats = dict(self.strategy.stats)
        stats.update(
            prefill_s=t_first - t0,  # time to the first new token: prefill plus its step
            decode_s=decode_s,
            prompt_tokens=sum(len(p) for p in self.prompts),
            new_tokens=new,
            decode_tokens_per_s=(new - n) / decode_s if decode_s > 0 and new > n else 0.0,
        )
        results = []
        for row in range(n):
            reason = reasons[row]
            if reason is None:
                reason = "max_new_tokens" if self.budget == cfg.max_new_tokens else "context"
            results.append(GenerationResult(
                text=assemblers[row].text, token_ids=tokens[row],
                finish_reason="stop" if reason in ("eos", "stop string") else "length",
                prompt_tokens=len(self.prompts[row]), logprobs=lps[row] if cfg.logprobs else None,
                stats=dict(stats), stop_reason=reason,
            ))
        self._results = results
