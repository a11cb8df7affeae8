"""Samplers: small functions over logits (B, V), applied in a fixed, documented order.

    logits -> repetition_penalty -> temperature -> top_k -> top_p -> min_p -> softmax -> draw

temperature == 0 means greedy (argmax of the penalized logits). Filters set excluded logits to -inf,
so the distribution they leave is exactly the renormalized allowed set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. Defaults: greedy."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, (int, float)) or math.isnan(t) or t < 0:
            raise InvalidArgumentError(f"temperature must be >= 0, got {t!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise InvalidArgumentError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise InvalidArgumentError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1):
            raise InvalidArgumentError(f"min_p must be in [0, 1], got {self.min_p!r}")
        rp = self.repetition_penalty
        if rp is not None and not (isinstance(rp, (int, float)) and rp > 0 and math.isfinite(rp)):
            raise InvalidArgumentError(f"repetition_penalty must be > 0, got {rp!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether a repetition penalty changes the logits (1.0 is none), so the tokens so far are needed."""
        return self.repetition_penalty not in (None, 1.0)



def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalize tokens in `history` (B, N): positive logits divided by `penalty`, negative multiplied."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = logits.gather(-1, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, history, seen)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value are kept too)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p (at least one).

    Tokens tied with the least likely kept one are kept too (as in top-k), so the set never depends on
    the order of equal logits. transformers' TopPLogitsWarper keeps only as many tied tokens as the mass
    needs, picked by sort position (the highest token ids on CPU); tests/test_sampling.py pins both.
    """
    if p >= 1.0:
        return logits
    sorted_logits = torch.sort(logits, dim=-1, descending=True).values
    probs = sorted_logits.softmax(-1)
    # A token is needed while the mass before it is < p, i.e. while its tail (itself and every less likely
    # token) is > 1 - p. The tail is summed from the least likely token up: float32 resolves small tails,
    # not masses within 6e-8 of 1 (top_p = 1 - 1e-9 must still reach past a top token of 1 - 4e-8).
    tail = probs.flip(-1).cumsum(-1).flip(-1)
    n_keep = (tail > 1.0 - p).sum(-1, keepdim=True).clamp(min=1)
    boundary = sorted_logits.gather(-1, n_keep - 1)  # the least likely logit the nucleus needs
    return logits.masked_fill(logits < boundary, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the penalty, temperature and filters in the documented order; returns float32 logits."""
    logits = logits.float()
    if params.penalized and history is not None:
        logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k:
        logits = apply_top_k(logits, params.top_k)
    if params.top_p is not None:
        logits = apply_top_p(logits, params.top_p)
    if params.min_p is not None:
        logits = apply_min_p(logits, params.min_p)
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution the sampler draws from (B, V); one-hot at the argmax when greedy."""
    logits = process_logits(logits, params, history)
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return logits.softmax(-1)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    history: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V)."""
    logits = process_logits(logits, params, history)
    if params.greedy:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class Sampler:
    """SamplingParams plus the random generator of one generation (seeded: reproducible draws)."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())

    def sample(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """Next token ids (B,) from logits (B, V)."""
        return sample(logits, self.params, self.generator, history)

    def probabilities(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        return probabilities(logits, self.params, history)

    def draw(self, probs: torch.Tensor) -> int:
        """One index drawn from a probability vector (V,)."""
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def uniform(self, n: int, device: torch.device | str) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, device=device)
