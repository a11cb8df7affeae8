"""Perplexity with a sliding window: a quality gate for quantization and other speed tricks.

    from leanformers.perplexity import perplexity, perplexity_text
    r = perplexity(lm, perplexity_text())          # PerplexityResult(tokens=..., nll=..., ppl=...)

Windows of up to `context` tokens start every `stride` tokens. Every token but the first is scored
exactly once, in the first window that can score it and did not leave it to the previous one:

    tokens   0 ......... 511 512 ........ 767 768 ....... 1023
    win 0    [scores 1..511 ]
    win 1             [256 ........ context ..][scores 512..767]
    win 2                          [512 .......... ][scores 768..1023]

so each scored token after the first window sees at least `context - stride` tokens of left context.
Log-probabilities are taken in float32 whatever the model's dtype.

The shipped test text (`perplexity_text()`, package data data/perplexity.txt) is the license file of
CPython 3.11 (LICENSE.txt, copyright the Python Software Foundation and others; the PSF license
permits redistribution), 3,768 tokens with the SmolLM2 tokenizer. It is legal English with repeated
passages, so its perplexity is low; it is a fixed regression gate, not a benchmark of general text.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from importlib import resources
from typing import Any, Sequence

import torch

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class PerplexityResult:
    tokens: int  # how many tokens were scored
    nll: float  # mean negative log-likelihood per scored token (nats)
    ppl: float  # exp(nll)


def perplexity_text() -> str:
    """The fixed English evaluation text shipped with leanformers (see the module docstring)."""
    return resources.files("leanformers").joinpath("data/perplexity.txt").read_text(encoding="utf-8")



def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window over n tokens: feed ids[begin:end], score tokens first_scored..end-1."""
    out = []
    scored_to = 1  # token 0 has no left context
    begin = 0
    while scored_to < n:
        end = min(begin + context, n)
        if end > scored_to:
            out.append((begin, end, scored_to))
            scored_to = end
        begin += stride
    return out


def perplexity(
    lm: Any,
    text: str | Sequence[int],
    *,
    context: int = 512,
    stride: int = 256,
    progress: bool | None = None,
    add_special_tokens: bool = True,
) -> PerplexityResult:
    """Sliding-window perplexity of `lm` (a LanguageModel) on `text` (a string or token ids).

    context: window length in tokens (at most the model's context length); stride: how far each
    window moves (1 <= stride < context). progress: a tqdm bar on stderr (default: when it is a TTY).
    """
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise InvalidArgumentError(f"context must be an integer >= 2, got {context!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride < context:
        raise InvalidArgumentError(
            f"stride must be an integer in [1, context={context}) (each window needs left context), got {stride!r}"
        )
    limit = getattr(lm, "context_length", None)
    if limit is not None and context > limit:
        raise InvalidArgumentError(f"context {context} exceeds the model's context length {limit}")
    if isinstance(text, str):
        ids = lm.tokenizer.encode(text, add_special_tokens=add_special_tokens)
    else:
        ids = [int(i) for i in text]
    if len(ids) < 2:
        raise InvalidArgumentError(f"perplexity needs at least 2 tokens, the text has {len(ids)}")
    if progress is None:
        progress = sys.stderr.isatty()
    model = lm.model
    device = lm.device
    all_ids = torch.tensor(ids, dtype=torch.long, device=device)
    spans = windows(len(ids), context, stride)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ids) - 1, desc="Perplexity", unit="tok", file=sys.stderr, leave=False)
    total_nll = 0.0
    count = 0
    try:
        with torch.inference_mode():
            for begin, end, first in spans:
                n_scored = end - first
                # logits at positions first-1 .. end-2 predict tokens first .. end-1
                logits = model(all_ids[begin:end].unsqueeze(0), logits_to_keep=n_scored + 1)[0, :-1]
                logp = torch.log_softmax(logits.float(), dim=-1)
                target = all_ids[first:end]
                nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
                total_nll += float(nll.double().sum())
                count += n_scored
                if bar is not None:
                    bar.update(n_scored)
    finally:
        if bar is not None:
            bar.close()
    mean = total_nll / count
    return PerplexityResult(tokens=count, nll=mean, ppl=math.exp(mean))
