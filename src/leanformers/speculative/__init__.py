"""Speculative decoding: drafters (speculative/drafters.py), the round and acceptance rule (speculative/strategy.py)
and the measured cost model (speculative/costs.py + costs.json).

    strategy = SpeculativeDecoding(PromptLookupDrafter())          # handed to generation.decode.generate_tokens
    strategy = SpeculativeDecoding(model_drafter(target_step, draft_step, "model:x"), num_draft_tokens=4)
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import InvalidArgumentError
from ..generation.decode import DecodeStep
from . import costs
from .drafters import ModelDrafter, PromptLookupDrafter, self_draft
from .strategy import SpeculativeDecoding

__all__ = ["ModelDrafter", "PromptLookupDrafter", "SpeculativeDecoding", "check_same_vocabulary", "model_drafter",
           "self_draft"]

logger = logging.getLogger("leanformers.speculative")


def model_drafter(target: DecodeStep, draft: DecodeStep, name: str) -> ModelDrafter:
    """A ModelDrafter for `draft`, priced against `target` with the modelled step times of speculative/costs.py."""
    compiled = target.is_compiled and draft.is_compiled and target.model.device.type == "cpu"
    t_target = costs.step_time(target.model, compiled=compiled)
    cost = min(1.0, max(0.02, costs.step_time(draft.model, compiled=compiled) / t_target))
    chunk = 1.5 * costs.step_time(draft.model, compiled=False) / t_target  # an eager forward of the draft
    return ModelDrafter(draft, name=name, cost=cost, chunk_cost=max(cost, chunk))


def check_same_vocabulary(target: Any, draft: Any) -> None:
    """Raise InvalidArgumentError unless the draft tokenizer maps every id to the same token string."""
    if target is draft:
        return
    na, nb = target.vocab_size, draft.vocab_size
    if na != nb:
        raise InvalidArgumentError(
            f"the draft model's tokenizer has {nb} tokens but the target's has {na}: speculative decoding "
            "needs a draft with the same tokenizer/vocabulary")
    va = target.backend.get_vocab(with_added_tokens=True)
    vb = draft.backend.get_vocab(with_added_tokens=True)
    if va != vb:
        ia = {i: s for s, i in va.items()}
        ib = {i: s for s, i in vb.items()}
        diff = [i for i in sorted(set(ia) | set(ib)) if ia.get(i) != ib.get(i)]
        sample = ", ".join(f"id {i}: {ia.get(i)!r} vs {ib.get(i)!r}" for i in diff[:3])
        raise InvalidArgumentError(
            f"the draft model's vocabulary differs from the target's in {len(diff)} of {na} tokens "
            f"(target vs draft: {sample}): speculative decoding needs the same tokenizer")
    if target.eos_token_ids != draft.eos_token_ids or target.bos_token_id != draft.bos_token_id:
        logger.info("draft and target tokenizers differ in special-token settings; ids are identical, continuing")
