"""The causal-LM loss (the only code of train/ that calls into the model) and a chunked cross-entropy.

`causal_lm_loss(model, batch)` uses the model contract's `hidden_states(...)` and `logits(hidden)`:
- only positions that have a target (label != -100 one step ahead) go through the head, so prompt and
  padding positions cost no vocabulary projection;
- those rows go through the head in chunks (`chunked_cross_entropy`), so full-vocabulary float32 logits
  exist for one chunk at a time, never for every position (transformers upcasts all of them: 8 x 512
  positions x 49152 tokens x 4 bytes = 805 MB for SmolLM2, and as much again for their gradient);
- each chunk's gradient (w.r.t. its hidden rows and the head's trainable weights) is computed right away
  inside the forward and kept, so backward replays nothing: no second pass through the head.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE

CHUNK_ELEMENTS = 2**25  # logits elements per chunk (128 MiB in float32)


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over labelled positions, number of them) for one micro-batch.

    batch: input_ids, labels (HF-style, unshifted, -100 = no loss), segments (0 = padding, 1, 2, ... =
    packed examples), positions. The model contract: attention_mask carries the segment ids; None
    when every row is one unpadded sequence (plain causal attention, the fastest kernel).
    """
    ids, seg = batch["input_ids"], batch["segments"]
    mask = None if bool((seg == 1).all()) else seg
    hidden = model.hidden_states(ids, positions=batch["positions"], attention_mask=mask)  # (B, T, H)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    n = int(keep.sum())
    rows = hidden[:, :-1][keep]  # (N, H): only positions that predict a labelled token
    params = [p for p in model.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    chunk_rows = max(64, CHUNK_ELEMENTS // model.config.vocab_size)
    return chunked_cross_entropy(rows, targets[keep], model.logits, params, chunk_rows), n


def chunked_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                          params: Sequence[torch.Tensor] = (), chunk_rows: int = 1024) -> torch.Tensor:
    """sum_i CE(head(hidden[i]), targets[i]) in float32, computed `chunk_rows` rows at a time.

    params: the trainable tensors `head` may use (those it does not use get no gradient). With gradients
    enabled, the result's backward gives d/d hidden and d/d params without running the head again.
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    if not (torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in params))):
        with torch.no_grad():
            total = hidden.new_zeros((), dtype=torch.float32)
            for s in range(0, hidden.shape[0], chunk_rows):
                logits = head(hidden[s : s + chunk_rows]).float()
                total += F.cross_entropy(logits, targets[s : s + chunk_rows], reduction="sum")
            return total
    params = [p for p in params if p.requires_grad]
    return _ChunkedCE.apply(hidden, targets, head, chunk_rows, len(params), *params)


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, targets, head, chunk_rows, n_params, *params):  # type: ignore[override]
        needs_h = hidden.requires_grad
        grad_h = torch.zeros_like(hidden) if needs_h else None
        grad_p: list[torch.Tensor | None] = [None] * n_params
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.enable_grad():
            for s in range(0, hidden.shape[0], chunk_rows):
                h = hidden[s : s + chunk_rows].detach().requires_grad_(needs_h)
                loss = F.cross_entropy(head(h).float(), targets[s : s + chunk_rows], reduction="sum")
                inputs = ([h] if needs_h else []) + list(params)
                grads = torch.autograd.grad(loss, inputs, allow_unused=True)
                if needs_h:
                    grad_h[s : s + chunk_rows] = grads[0]
                    grads = grads[1:]
                for i, g in enumerate(grads):
                    if g is not None:
                        grad_p[i] = g if grad_p[i] is None else grad_p[i].add_(g)
                total += loss.detach()
        ctx.grad_h, ctx.grad_p = grad_h, grad_p
        return total

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        grad_h = ctx.grad_h * g.to(ctx.grad_h.dtype) if ctx.grad_h is not None else None
        grad_p = [None if t is None else t * g.to(t.dtype) for t in ctx.grad_p]
        ctx.grad_h = ctx.grad_p = None
        return (grad_h, None, None, None, None, *grad_p)


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """The model contract's flag: recompute each layer's activations in backward instead of storing them."""
    model.gradient_checkpointing = enabled
