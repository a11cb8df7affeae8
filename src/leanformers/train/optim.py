"""Optimizer, learning-rate schedule and mixed precision for the training loop.

AdamW as transformers' Trainer sets it up (betas 0.9/0.999, eps 1e-8; no weight decay on biases and norm
weights, i.e. on 1-D tensors), with torch's fused implementation where the device has it (CPU and CUDA
in torch >= 2.4), else foreach. Schedules are Trainer's: linear warmup from 0, then cosine to 0, linear
to 0, or constant; the lr of optimizer step s (0-based) is lr * factor(s).

Precision:
    fp32        float32 weights and math
    bf16-mixed  float32 master weights and optimizer; forward/backward under bfloat16 autocast
    fp16-mixed  as bf16-mixed with float16 and a GradScaler (CUDA only; refused elsewhere)
    bf16-true   bfloat16 weights, gradients and optimizer state (least memory, least precise)
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    device = params[0].device if params else torch.device("cpu")
    kw: dict[str, Any] = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, TypeError):  # a dtype or device the fused kernel does not take
            pass
    return torch.optim.AdamW(groups, foreach=True, **kw)


def lr_factor(step: int, *, schedule: str, warmup: int, total: int) -> float:
    """Trainer's schedules: the learning-rate multiplier of optimizer step `step` (0-based)."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, warmup: int,
                   total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, schedule=schedule, warmup=warmup, total=total))


class Precision:
    """Autocast context, gradient scaler and parameter dtype for one precision mode."""

    def __init__(self, mode: str, device: torch.device):
        self.mode, self.device = mode, device
        self.autocast_dtype = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}.get(mode)
        self.param_dtype = torch.bfloat16 if mode == "bf16-true" else torch.float32
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16-mixed" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor],
             max_grad_norm: float | None) -> torch.Tensor:
        """Unscale, clip (when max_grad_norm), step; returns the gradient norm before clipping."""
        params = list(params)
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else float("inf"),
                                              foreach=True)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        return norm
