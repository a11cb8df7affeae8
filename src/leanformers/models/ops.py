"""Matrix-vector products for compiled CPU decode steps.

A decode step multiplies one activation row by every weight matrix: a GEMV, bound by how fast the
weights stream from memory. torch's CPU GEMV for one row is far from that bound (measured here, AMD
EPYC, 2 threads, torch 2.13 + MKL: F.linear with one float32 row streamed 10 GB/s and did not use the
second thread; `_weight_int8pack_mm` 11-13 GB/s) while the machine reads 47 GB/s. Written as a
broadcast multiply and a sum over K, the same product becomes, inside a torch.compile'd graph, one
Inductor C++ loop per weight: vectorized, split over threads by output row, reading each weight once
(31 GB/s for float32, 30 GB/s of bfloat16, 21-25 GB/s of int8 with the int8->float conversion fused).

Two details matter:
- The input row is forced into its own buffer (`_materialized`). Otherwise Inductor inlines the
  producer (an RMSNorm, or silu(gate) * up) into the reduction and recomputes it for each of the N
  output rows: the tied 49152-row lm_head then took 3.4 ms instead of 1.1 ms per token in int8.
- Eager mode and other devices keep F.linear / the int8 kernel: outside a compiled graph the
  broadcast product would materialize an (N, K) temporary.

Accumulation is in float32, the result is cast to the activation dtype, as F.linear does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MAX_ROWS = 1  # decode steps of more rows (batches) keep the matmul kernels


def rowwise(x: torch.Tensor) -> bool:
    """True when `x @ W.T` should be the broadcast-sum GEMV: inside a compiled CPU graph, few rows."""
    return (torch.compiler.is_compiling() and x.device.type == "cpu"
            and x.numel() <= MAX_ROWS * x.shape[-1])


def _materialized(x: torch.Tensor) -> torch.Tensor:
    """x as float32 in a buffer of its own: as_strided makes Inductor realize it (no recompute per row)."""
    x = x.float().contiguous()
    return x.as_strided(x.shape, x.stride())


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         scale: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(x @ weight.T) * scale + bias for x (..., K) with few rows, weight (N, K) of any float/int8 dtype.

    scale (N,): per-output-row factor (int8 weights). Result in `dtype` (default x.dtype).
    """
    y = (_materialized(x).unsqueeze(-2) * weight.float()).sum(-1)
    if scale is not None:
        y = y * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype or x.dtype)


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x), through `gemv` for a plain nn.Linear inside a compiled CPU decode step."""
    if type(module) is nn.Linear and rowwise(x):
        return gemv(x, module.weight, module.bias)
    return module(x)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row over S cached keys, as reductions (inside compiled CPU steps).

    q (B, H, 1, D); k, v (B, Hkv, S, D) with H a multiple of Hkv (GQA); mask (B or 1, 1, 1, S) bool.
    Inductor fuses this into its own loops, where the SDPA op would be one external call per layer
    (~20-30 us each here) plus, for bfloat16, float32 copies of K and V. Softmax in float32.
    """
    B, H, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    qf = q.float().reshape(B, Hkv, H // Hkv, 1, D) * (1.0 / math.sqrt(D))
    scores = (qf * k.float().unsqueeze(2)).sum(-1)  # (B, Hkv, rep, S)
    scores = torch.where(mask.reshape(mask.shape[0], 1, 1, S), scores, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = (p.unsqueeze(-1) * v.float().unsqueeze(2)).sum(-2)  # (B, Hkv, rep, D)
    return out.reshape(B, H, 1, D).to(q.dtype)
