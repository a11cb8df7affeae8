"""Drafters: what proposes the tokens a speculative round verifies.

- `PromptLookupDrafter`: copies what followed the most recent earlier occurrence of the text's last n-gram
  (deterministic: q is one-hot);
- `ModelDrafter`: a smaller or quantized model with its own KV cache, run through a DecodeStep (eager or
  compiled), sampling with the round's SamplingParams;
- `self_draft(model, scheme)`: the target's own weights quantized to int4/int8, as a draft model.

A drafter's interface: `start(prompt, max_len)`, `propose(seq, k_for, sampler, history_needed) ->
(tokens, q or None, key)`, `cost` (per drafted token, in target steps), `catch_up_cost(seq_len)`, `max_k`,
`forwards`, `name`, `close()`.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import torch

from ..compile.memory import move_to_huge_pages, uses_huge_pages
from ..errors import InvalidArgumentError, LeanformersError
from ..generation.decode import DecodeStep
from ..generation.sampling import Sampler, process_logits
from ..models.base import DecoderModel
from ..models.cache import KVCache

logger = logging.getLogger("leanformers.speculative")

# A model drafter feeds up to this many unseen tokens one at a time through its (compiled) step; more
# go through one eager forward
ONE_BY_ONE = 4


class PromptLookupDrafter:
    """Propose the tokens that followed the most recent earlier occurrence of the text's last n-gram.

    n goes from `max_ngram` down to `min_ngram`; the first n with a match wins. Among the occurrences of
    that n-gram, the one that continues the previous proposal's source wins (copying a passage keeps
    copying from the same place even when the n-gram also occurs elsewhere; +5% speed on the benchmark's
    input-grounded prompts), else the most recent one. The n-grams are indexed incrementally (a dict per
    n: n-gram -> starts with at least one following token), so a lookup costs a few dict probes. A
    continuation that runs into the end of the text keeps copying from its own proposal (like an LZ77
    back-reference), so a repeating pattern yields k tokens, not fewer.
    """

    name = "prompt-lookup"
    cost = 0.0  # per drafted token, relative to one target forward
    max_k = 24

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not (1 <= min_ngram <= max_ngram):
            raise InvalidArgumentError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.forwards = 0

    def catch_up_cost(self, seq_len: int) -> float:
        return 0.0  # nothing to feed: the lookup reads the text itself

    def start(self, prompt: list[int], max_len: int) -> None:
        self._index: list[dict[tuple[int, ...], list[int]]] = [{} for _ in range(self.max_ngram + 1)]
        self._indexed = 0  # n-grams whose last token lies before this position (and is followed by one) are indexed
        self._last: tuple[int, int] | None = None  # (source position, text length) of the last proposal
        self.forwards = 0

    def _extend_index(self, seq: list[int]) -> None:
        # every n-gram seq[i:i+n] with i + n <= len(seq) - 1 (at least one token follows it), visited by the
        # position j = i + n - 1 of its last token: each call adds the n-grams that the new tokens complete
        # (indexing by start position would miss an n-gram that started before the text had grown enough)
        end = len(seq) - 1
        for j in range(self._indexed, end):
            for n in range(self.min_ngram, self.max_ngram + 1):
                i = j - n + 1
                if i < 0:
                    break
                self._index[n].setdefault(tuple(seq[i:j + 1]), []).append(i)
        self._indexed = max(self._indexed, end)

    def propose(self, seq: list[int], k_for: Callable[[Any], int], sampler: Sampler, history_needed: bool):
        """(tokens, None, n): the proposal, q (None: deterministic), and the match length as the adaptive-k key."""
        self._extend_index(seq)
        # where the previous proposal's source continues, aligned with the end of the text
        follow = self._last[0] + len(seq) - self._last[1] if self._last is not None else None
        self._last = None
        for n in range(min(self.max_ngram, len(seq) - 1), self.min_ngram - 1, -1):
            starts = self._index[n].get(tuple(seq[-n:]))
            if not starts:
                continue
            start = starts[-1]
            if follow is not None and start != follow - n and follow - n in starts[-64:]:
                start = follow - n
            k = k_for(n)  # longer matches earn longer proposals (acceptance is tracked per n)
            src = start + n
            self._last = (src, len(seq))
            out: list[int] = []
            for j in range(k):
                pos = src + j
                out.append(seq[pos] if pos < len(seq) else out[pos - len(seq)])
            return out, None, n
        return [], None, None

    def close(self) -> None:
        pass


class ModelDrafter:
    """A smaller (or quantized) causal LM with its own static KV cache, run through `step`."""

    max_k = 12

    def __init__(self, step: DecodeStep, *, name: str, cost: float, chunk_cost: float | None = None):
        self.step = step
        self.model = step.model
        self.name = name
        self.cost = cost
        # feeding more than a few unseen tokens runs one eager forward: its cost in target steps
        self.chunk_cost = 1.5 * cost if chunk_cost is None else chunk_cost
        self.forwards = 0
        self.cache: KVCache | None = None

    def start(self, prompt: list[int], max_len: int) -> None:
        with torch.inference_mode(False):  # as the plain loop makes them, so a compiled step shares its graph
            self.cache = self.step.make_cache(1, self.step.cache_len(max_len))
        self.fed: list[int] = []  # tokens whose K/V sit in slots 0 .. len-1 of the draft cache
        self.forwards = 0

    def catch_up_cost(self, seq_len: int) -> float:
        """Cost (target steps) of feeding the tokens the draft has not seen before it can draft again."""
        unseen = max(1, seq_len - len(self.fed))
        return unseen * self.cost if self.step.is_compiled and unseen <= ONE_BY_ONE else self.chunk_cost

    def _feed(self, tokens: list[int], start: int) -> torch.Tensor:
        """Write `tokens` at positions start.. into the draft cache; logits (V,) after the last one."""
        dev = self.model.device
        if self.step.is_compiled and len(tokens) <= ONE_BY_ONE:
            for j, t in enumerate(tokens):  # the compiled one-token step, one token at a time
                logits = self.step(torch.tensor([[t]], device=dev), torch.tensor([[start + j]], device=dev),
                                   self.cache)[0]
                self.forwards += 1
            return logits
        self.forwards += 1
        pos = torch.arange(start, start + len(tokens), device=dev).unsqueeze(0)
        return self.model(torch.tensor([tokens], device=dev), cache=self.cache, positions=pos, logits_to_keep=1)[0, -1]

    def propose(self, seq: list[int], k_for: Callable[[Any], int], sampler: Sampler, history_needed: bool):
        """(tokens, q (k, V) or None when greedy, None): k tokens sampled from the draft model."""
        k = k_for(None)
        if k <= 0:
            return [], None, None  # the unseen tokens are fed next time
        # the longest prefix of seq already in the draft cache (rejected drafts after it get overwritten)
        fed = self.fed
        limit = min(len(fed), len(seq) - 1)
        c = next((i for i in range(limit) if fed[i] != seq[i]), limit)
        logits = self._feed(seq[c:], c)
        fed[c:] = seq[c:]
        tokens: list[int] = []
        qs: list[torch.Tensor] = []
        hist = torch.tensor([seq], device=logits.device) if history_needed else None
        params = sampler.params
        for i in range(k):
            if params.greedy:
                x = int(process_logits(logits[None], params, hist).argmax(-1))
            else:
                q = sampler.probabilities(logits[None], hist)[0]
                x = sampler.draw(q)
                qs.append(q)
            tokens.append(x)
            if i + 1 < k:
                logits = self._feed([x], len(fed))
                fed.append(x)
                if hist is not None:
                    hist = torch.cat([hist, hist.new_tensor([[x]])], dim=1)
        return tokens, (torch.stack(qs) if qs else None), None

    def close(self) -> None:
        self.cache = None


def self_draft(model: DecoderModel, scheme: str) -> DecoderModel:
    """A copy of `model` with its linears quantized to `scheme` ("int4" falls back to "int8" where int4 has
    no kernel); output head and embedding stay in floating point (higher acceptance at about the same
    cost). Weights in huge pages stay there (repacked: only what the draft uses)."""
    from ..quantize import int4_backend, quantize_model

    if model.quantization:
        raise InvalidArgumentError(
            f"draft='self-{scheme}': the target is already {model.quantization}-quantized; use a smaller draft "
            "model or draft='prompt-lookup'")
    used = scheme
    if scheme == "int4" and int4_backend(model.device, torch.bfloat16)[0] == "dequant" \
            and int4_backend(model.device, model.dtype)[0] == "dequant":
        logger.warning("draft='self-int4': no int4 kernel on %s (%s); drafting with int8 instead",
                       model.device.type, int4_backend(model.device, model.dtype)[1])
        used = "int8"
    try:
        draft = quantize_model(copy.deepcopy(model), used, include_lm_head=False)
    except (LeanformersError, NotImplementedError, RuntimeError) as exc:
        if used != "int4":
            raise
        logger.warning("draft='self-int4': int4 quantization failed (%s); drafting with int8 instead", exc)
        draft = quantize_model(copy.deepcopy(model), "int8", include_lm_head=False)
    draft.eval()
    if uses_huge_pages(model):  # the deepcopy shares one copy of the target's mapping: keep only what the draft uses
        move_to_huge_pages(draft)
    return draft
