"""The decode loop: prefill the prompts into a static KV cache, then rounds of a decoding strategy.

    step = DecodeStep(model)                          # or a compiled step: leanformers.compile.compile_decode
    for s in generate_tokens(step, prompts, max_new_tokens=32, sampler=Sampler(params)):
        s.tokens                                      # one new token per row

Rows are independent sequences: prompts of different lengths are right-padded, and row r decodes at its
own positions (its next token goes to cache slot len(row)). Prefill writes every prompt token and gives
the logits of each row's last one; the loop samples the first new token from them. From then on, each
round of a strategy feeds the `pending` tokens (the last emitted ones, not yet in the cache): plain
decoding one token per row, speculative decoding several tokens of one row per target forward
(leanformers.speculative). A strategy's `advance(ctx, budget)` returns the round's new tokens, each with
the raw logits that chose it; the loop owns the cache, the prefill, the first token, the bookkeeping,
logprobs and the token budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch

from ..models.base import DecoderModel
from ..models.cache import KVCache
from .sampling import Sampler

DEFAULT_PREFILL_CHUNK = 512


class DecodeStep:
    """The one-token decode step of a model, eager. Compiled steps (leanformers.compile) subclass it.

    The loop only uses this interface: `make_cache`, `cache_len` (a compiled step rounds sizes up to a
    bucket so requests share a graph), `__call__` (one token per row), and for speculative decoding
    `verify` (several tokens of one row in one forward) with `verify_rows` / `can_verify` saying when a
    verification runs compiled.
    """

    is_compiled = False
    verify_rows = 0  # the most tokens a compiled verification takes (0: verification is eager)

    def __init__(self, model: DecoderModel):
        self.model = model

    @property
    def weight_kind(self) -> str:
        return self.model.weight_kind

    def make_cache(self, batch_size: int, max_len: int) -> KVCache:
        return self.model.make_cache(batch_size, max_len)

    def cache_len(self, need: int) -> int:
        """Cache slots to allocate for `need` positions."""
        return need

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, V) for one new token per row: tokens (B, 1) at positions (B, 1)."""
        return self.model(tokens, cache=cache, positions=positions)[:, -1]

    def can_verify(self, rows: int, max_len: int, pos: int) -> bool:
        """Whether a verification of `rows` tokens at positions pos.. runs compiled."""
        return False

    def verify(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (n, V) of every token of row 0: tokens (1, n) at positions (1, n)."""
        return self.model(tokens, cache=cache, positions=positions)[0]

    def for_model(self, model: DecoderModel) -> "DecodeStep":
        """A step of the same kind for another model (a draft model)."""
        return DecodeStep(model)


@dataclass
class Step:
    """One generated token per row."""

    tokens: list[int]
    logprobs: list[float] | None = None


class DecodeContext:
    """The rows being decoded: their tokens so far, the cache, the step and the sampler."""

    def __init__(self, step: DecodeStep, prompts: list[list[int]], max_new_tokens: int, sampler: Sampler):
        self.step, self.model, self.sampler = step, step.model, sampler
        self.rows = [list(p) for p in prompts]  # prompt + emitted tokens; the last one is pending
        self.device = step.model.device
        self.max_len = step.cache_len(max(len(p) for p in prompts) + max_new_tokens)
        self.cache = step.make_cache(len(prompts), self.max_len)
        # every row's tokens so far, for a repetition penalty: (B, max_len), slots past a row's end hold its
        # first token (already in its history, so the penalty is unchanged); written a column per step
        self._history: torch.Tensor | None = None
        if sampler.params.penalized:
            self._history = torch.tensor([r + [r[0]] * (self.max_len - len(r)) for r in self.rows],
                                         device=self.device)

    def prefill(self, chunk: int = DEFAULT_PREFILL_CHUNK) -> torch.Tensor:
        """Write the prompts into the cache, `chunk` positions at a time; logits (B, V) of each row's last token."""
        lengths = [len(r) for r in self.rows]
        width = max(lengths)
        # short rows are padded with their last token: its K/V land in slots that the row's own later
        # tokens overwrite before any query of the row can attend to them
        ids = torch.tensor([r + [r[-1]] * (width - len(r)) for r in self.rows], device=self.device)
        last: list[torch.Tensor | None] = [None] * len(self.rows)
        for a in range(0, width, chunk):
            b = min(width, a + chunk)
            pos = torch.arange(a, b, device=self.device).expand(len(self.rows), b - a)
            hidden = self.model.hidden_states(ids[:, a:b], cache=self.cache, positions=pos)
            rows = [r for r, n in enumerate(lengths) if a <= n - 1 < b]  # rows whose last token is in this chunk
            if rows:
                picked = hidden[rows, [lengths[r] - 1 - a for r in rows]]  # (rows, hidden)
                for r, logits in zip(rows, self.model.logits(picked)):
                    last[r] = logits
        return torch.stack(last)  # type: ignore[arg-type]

    def pending(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's last token (B, 1) and its position (B, 1)."""
        tokens = torch.tensor([[r[-1]] for r in self.rows], device=self.device)
        positions = torch.tensor([[len(r) - 1] for r in self.rows], device=self.device)
        return tokens, positions

    def history(self) -> torch.Tensor | None:
        """(B, N) every row's tokens so far (short rows padded with their first token), when a penalty needs it."""
        if self._history is None:
            return None
        return self._history[:, :max(len(r) for r in self.rows)]

    def append(self, tokens: list[int]) -> None:
        if self._history is not None:
            slots = torch.tensor([len(r) for r in self.rows], device=self.device).unsqueeze(1)
            self._history.scatter_(1, slots, torch.tensor(tokens, device=self.device).unsqueeze(1))
        for row, t in zip(self.rows, tokens):
            row.append(t)


class Strategy(Protocol):
    """How one round turns pending tokens into new ones (plain decoding, speculative decoding)."""

    stats: dict

    def advance(self, ctx: DecodeContext, budget: int) -> list[tuple[list[int], torch.Tensor]]:
        """The round's new tokens, oldest first: (one token per row, the raw logits (B, V) it came from).
        At most `budget` of them."""
        ...

    def close(self) -> None:
        """Free what the strategy holds (a draft model's cache)."""
        ...


class PlainDecoding:
    """One decode step per round: one new token per row."""

    stats: dict = {}

    def close(self) -> None:
        pass

    def advance(self, ctx: DecodeContext, budget: int) -> list[tuple[list[int], torch.Tensor]]:
        tokens, positions = ctx.pending()
        logits = ctx.step(tokens, positions, ctx.cache)
        return [(ctx.sampler.sample(logits, ctx.history()).tolist(), logits)]


def generate_tokens(
    step: DecodeStep,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    sampler: Sampler,
    logprobs: bool = False,
    strategy: Strategy | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> Iterator[Step]:
    """Yield one Step per new token (for every row) until `max_new_tokens`; the caller decides when to stop."""
    ctx = DecodeContext(step, prompts, max_new_tokens, sampler)
    strategy = strategy if strategy is not None else PlainDecoding()
    with torch.inference_mode():
        logits = ctx.prefill(prefill_chunk)
        first = sampler.sample(logits, ctx.history()).tolist()
        lp = _logprobs(logits, first) if logprobs else None
    ctx.append(first)
    yield Step(first, lp)
    emitted = 1
    while emitted < max_new_tokens:
        with torch.inference_mode():
            new = strategy.advance(ctx, max_new_tokens - emitted)
            lps = [_logprobs(logits, tokens) for tokens, logits in new] if logprobs else [None] * len(new)
        for (tokens, _), lp in zip(new, lps):
            ctx.append(tokens)
            emitted += 1
            yield Step(tokens, lp)


def _logprobs(logits: torch.Tensor, tokens: list[int]) -> list[float]:
    """log p(token) under the raw distribution, per row."""
    idx = torch.tensor(tokens, device=logits.device).unsqueeze(-1)
    return torch.log_softmax(logits.float(), -1).gather(-1, idx).squeeze(-1).tolist()
