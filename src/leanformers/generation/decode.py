"""The decode loop: prefill the prompts into a static KV cache, then one-token steps.

Batches of prompts with different lengths are left-padded; every row gets its own rotary positions
and a key mask hides the padding, so a row decodes exactly as it would alone (up to float rounding).

The one-token step is a pure function of (token, slot, positions, cache) with static shapes
(`decode_step`), so it can be swapped for a compiled version without touching the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
from torch import nn

from ..errors import InvalidArgumentError
from .kv_cache import KVCache
from .sampling import SamplingParams, sample

DEFAULT_PREFILL_CHUNK = 512


class DecodeFn(Protocol):
    def __call__(
        self, model: nn.Module, token: torch.Tensor, cache: KVCache, slot: torch.Tensor,
        positions: torch.Tensor, mask: torch.Tensor | None,
    ) -> torch.Tensor: ...


def decode_step(
    model: nn.Module,
    token: torch.Tensor,
    cache: KVCache,
    slot: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Logits (B, V) for one new token per row: token (B, 1), slot (1,), positions (B, 1)."""
    logits = model(token, cache=cache, cache_position=slot, position_ids=positions, attention_mask=mask)
    return logits[:, -1]


@dataclass
class Batch:
    """Left-padded prompts and the per-row bookkeeping the loop needs."""

    ids: torch.Tensor  # (B, L) prompt tokens, left-padded
    pad: torch.Tensor  # (B,) number of pad slots on the left of each row
    mask: torch.Tensor | None  # (B, max_len) 1 = real token; None when no row is padded
    positions: torch.Tensor  # (B, max_len) rotary position of each slot

    @classmethod
    def from_prompts(cls, prompts: list[list[int]], max_len: int, device: torch.device) -> "Batch":
        L = max(len(p) for p in prompts)
        pad = torch.tensor([L - len(p) for p in prompts], device=device)
        # pads repeat the row's first token: harmless for the repetition penalty, masked for attention
        rows = [[p[0]] * (L - len(p)) + list(p) for p in prompts]
        ids = torch.tensor(rows, dtype=torch.long, device=device)
        slots = torch.arange(max_len, device=device)
        mask = None
        if int(pad.max()) > 0:
            mask = slots.unsqueeze(0) >= pad.unsqueeze(1)
        positions = (slots.unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0)
        return cls(ids, pad, mask, positions)


@dataclass
class Step:
    """One generated token per row."""

    tokens: list[int]
    logprobs: list[float] | None = None


def prefill(
    model: nn.Module,
    batch: Batch,
    cache: KVCache,
    *,
    chunk: int = DEFAULT_PREFILL_CHUNK,
) -> torch.Tensor:
    """Run the prompts through the model in chunks, filling the cache; returns last-position logits (B, V)."""
    L = batch.ids.shape[1]
    logits = None
    for start in range(0, L, chunk):
        end = min(L, start + chunk)
        logits = model(
            batch.ids[:, start:end],
            cache=cache,
            cache_position=torch.arange(start, end, device=batch.ids.device),
            position_ids=batch.positions[:, start:end],
            attention_mask=batch.mask,
            logits_to_keep=1,
        )
    return logits[:, -1]


def generate_steps(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    params: SamplingParams,
    logprobs: bool = False,
    decode_fn: DecodeFn = decode_step,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    on_prefill_done: Callable[[], None] | None = None,
    cache_len: int | None = None,
) -> Iterator[Step]:
    """Yield one Step per new token (for every row) until `max_new_tokens`; the caller decides when to stop.

    cache_len: size of the static cache (default: exactly prompt + max_new_tokens); a fixed, larger
    size lets a compiled decode step be reused across requests.
    """
    if max_new_tokens <= 0:
        raise InvalidArgumentError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    device = model.model.embed_tokens.weight.device
    L = max(len(p) for p in prompts)
    max_len = max(L + max_new_tokens, cache_len or 0)
    batch = Batch.from_prompts(prompts, max_len, device)
    cache = model.make_cache(len(prompts), max_len)
    generator = params.make_generator(device)
    history = batch.ids
    with torch.inference_mode():
        logits = prefill(model, batch, cache, chunk=prefill_chunk)
        if on_prefill_done is not None:
            on_prefill_done()
        for i in range(max_new_tokens):
            token = sample(logits, params, generator, history if params.repetition_penalty else None)
            lp = None
            if logprobs:
                lp = torch.log_softmax(logits.float(), -1).gather(-1, token.unsqueeze(-1)).squeeze(-1).tolist()
            yield Step(token.tolist(), lp)
            if i + 1 == max_new_tokens:
                break
            if params.repetition_penalty:
                history = torch.cat([history, token.unsqueeze(-1)], dim=1)
            slot = L + i
            logits = decode_fn(
                model,
                token.unsqueeze(-1),
                cache,
                torch.tensor([slot], device=device),
                batch.positions[:, slot : slot + 1],
                batch.mask,
            )
