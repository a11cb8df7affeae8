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
- Several rows (a small batch, or a speculative verification over k+1 tokens) are the innermost
  loop, so the weights still stream once. Measured (SmolLM2-135M's 121 matrices, float32, 2 threads):
  1 row 18.7 ms, 4 rows 21.9, 6 rows 24.8, 8 rows 37.0 (compute-bound from ~6 rows), against 51-71 ms
  for torch's matmul with 1-12 rows.

Accumulation is in float32, the result is cast to the activation dtype, as F.linear does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MAX_ROWS = 8  # more rows than this (big batches, prefill) keep the matmul kernels


def rowwise(x: torch.Tensor) -> bool:
    """True when `x @ W.T` should be the broadcast-sum GEMV: inside a compiled CPU graph, few rows."""
    return (torch.compiler.is_compiling() and x.device.type == "cpu"
            and x.numel() <= MAX_ROWS * x.shape[-1])


def realized(x: torch.Tensor) -> torch.Tensor:
    """x in a buffer of its own: as_strided makes Inductor compute it once instead of inlining it into consumers."""
    x = x.contiguous()
    return x.as_strided(x.shape, x.stride())


def _materialized(x: torch.Tensor) -> torch.Tensor:
    """x as float32 in a buffer of its own (no recompute per output row)."""
    return realized(x.float())


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         scale: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(x @ weight.T) * scale + bias for x (..., K) with few rows, weight (N, K) of any float/int8 dtype.

    scale (N,): per-output-row factor (int8 weights). Result in `dtype` (default x.dtype).
    The product is laid out (N, rows) and transposed back: Inductor's loop nest is then "for each weight
    row, for each input row, reduce over K", so a weight row is read from memory once and reused from L1
    for the other input rows, and each output element is computed exactly as with a single row (same
    loop, same order).
    """
    rows = x.shape[:-1]
    x2 = _materialized(x).reshape(-1, x.shape[-1])  # (R, K)
    y = (weight.float().unsqueeze(1) * x2.unsqueeze(0)).sum(-1)  # (N, R)
    if scale is not None:
        y = y * scale.float().unsqueeze(-1)
    if bias is not None:
        y = y + bias.float().unsqueeze(-1)
    return y.t().reshape(*rows, weight.shape[0]).to(dtype or x.dtype)


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x), through `gemv` for a plain nn.Linear inside a compiled CPU decode step."""
    if type(module) is nn.Linear and rowwise(x):
        return gemv(x, module.weight, module.bias)
    return module(x)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of a few queries per row over S cached keys, as reductions (inside compiled CPU steps).

    q (B, H, T, D); k, v (B, Hkv, S, D) with H a multiple of Hkv (GQA); mask (B or 1, 1, T, S) bool.
    Inductor fuses this into its own loops, where the SDPA op would be one external call per layer
    (~20-30 us each here) plus, for bfloat16, float32 copies of K and V. Softmax in float32. Each query
    is computed as it would be alone (masked keys add exact zeros), so T > 1 (speculative verification)
    agrees with T one-query steps.
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    qf = q.float().reshape(B, Hkv, H // Hkv, T, 1, D) * (1.0 / math.sqrt(D))
    scores = (qf * k.float()[:, :, None, None]).sum(-1)  # (B, Hkv, rep, T, S)
    scores = torch.where(mask.reshape(mask.shape[0], 1, 1, T, S), scores, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = (p.unsqueeze(-1) * v.float()[:, :, None, None]).sum(-2)  # (B, Hkv, rep, T, D)
    return out.reshape(B, H, T, D).to(q.dtype)
