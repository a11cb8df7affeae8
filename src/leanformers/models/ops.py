"""Layers shared by the model families, and the matrix-vector products of compiled CPU decode steps.

Shared layers: RMSNorm, rotary embeddings (`rope_inv_freq`, `rope_cos_sin`, `apply_rope`), the attention
mask (`attention_mask`) and attention itself (`attend`), so a family file holds only what is its own.

Compiled CPU decoding multiplies one activation row by every weight matrix: a GEMV, bound by how fast the
weights stream from memory. torch's one-row CPU matmul is far from that bound (bench/RESULTS.md, "Why the
compiled step is fast"), while a broadcast multiply and a sum over K becomes, inside a torch.compile'd
graph, one Inductor C++ loop per weight: vectorized, split over threads by output row, reading each
weight once. Two details matter:
- The input row is forced into its own buffer (`realized`). Otherwise Inductor inlines the producer (an
  RMSNorm, or silu(gate) * up) into the reduction and recomputes it for each of the N output rows.
- Eager mode and other devices keep F.linear / the int8 kernel: outside a compiled graph the broadcast
  product would materialize an (N, K) temporary.
Several rows (a small batch, or a speculative verification over k+1 tokens) are the innermost loop, so the
weights still stream once. Accumulation is in float32, the result is cast to the activation dtype, as
F.linear does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 8  # more rows than this (big batches, prefill) keep the matmul kernels


def rowwise(x: torch.Tensor) -> bool:
    """True when `x @ W.T` should be the broadcast-sum GEMV: inside a compiled CPU graph, few rows."""
    return (torch.compiler.is_compiling() and x.device.type == "cpu"
            and x.numel() <= MAX_ROWS * x.shape[-1])


def realized(x: torch.Tensor) -> torch.Tensor:
    """x in a buffer of its own: as_strided makes Inductor compute it once instead of inlining it into consumers."""
    x = x.contiguous()
    # the contiguous strides from the shape, not x.stride(): inside a torch.cond branch being exported
    # (mixture-of-experts decode steps) Dynamo cannot hand out a tensor's symbolic strides
    strides, step = [], 1
    for n in reversed(x.shape):
        strides.append(step)
        step = step * n
    return x.as_strided(x.shape, tuple(reversed(strides)))


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


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention of a few queries per row over S cached keys, as reductions (inside compiled CPU steps).

    q (B, H, T, D); k, v (B, Hkv, S, D) with H a multiple of Hkv (GQA); mask (B or 1, 1, T, S) bool.
    Inductor fuses this into its own loops, where the SDPA op would be one external call per layer plus,
    for bfloat16, float32 copies of K and V. Softmax in float32; softcap: tanh soft-capping of the scaled
    scores (Gemma 2). Each query is computed as it would be alone (masked keys add exact zeros), so T > 1
    (speculative verification) agrees with T one-query steps.
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    qf = q.float().reshape(B, Hkv, H // Hkv, T, 1, D) * (scale if scale is not None else 1.0 / math.sqrt(D))
    scores = (qf * k.float()[:, :, None, None]).sum(-1)  # (B, Hkv, rep, T, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = torch.where(mask.reshape(mask.shape[0], 1, 1, T, S), scores, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = (p.unsqueeze(-1) * v.float()[:, :, None, None]).sum(-2)  # (B, Hkv, rep, T, D)
    return out.reshape(B, H, T, D).to(q.dtype)


# ------------------------------------------------------------------------------------- shared layers
class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32; `offset` = 1 for families that store weight - 1 (Gemma)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _saves_for_training(x, self.weight):
            return _RMSNorm.apply(x, self.weight, self.eps, self.offset)
        return _rms_norm(x, self.weight, self.eps, self.offset)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (x * (offset + weight.float())).to(dtype)
    return weight * x.to(dtype)


def _saves_for_training(*xs: torch.Tensor) -> bool:
    """True when autograd records this op (training) outside a compiled graph: the memory-lean functions
    below apply. Inference and compiled graphs (Inductor fuses and frees on its own) keep the plain ops."""
    return (torch.is_grad_enabled() and any(x.requires_grad for x in xs)
            and not torch.compiler.is_compiling())


class _RMSNorm(torch.autograd.Function):
    """RMSNorm that keeps only its input for backward (and recomputes the per-row rms).

    Autograd through the eager ops also keeps x / rms(x) in float32 (and its copy in the activation dtype),
    each as large as the input: with two norms per layer that is about a fifth of a Llama layer's saved
    activations in fp32 training. The forward values are those of the eager ops; gradients equal theirs to
    float32 rounding: d_x = r * (d_xn - xn * mean(d_xn * xn)), with xn = x * r, r = rsqrt(mean(x^2) + eps).
    """

    @staticmethod
    def forward(ctx, x, weight, eps, offset):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.offset = eps, offset
        return _rms_norm(x, weight, eps, offset)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + ctx.eps)
        xn = xf * r
        if ctx.offset:
            d_xn = g.float() * (ctx.offset + weight.float())
            d_w = (g.float() * xn) if ctx.needs_input_grad[1] else None
        else:
            d_xn = (g * weight).float()
            d_w = (g * xn.to(x.dtype)) if ctx.needs_input_grad[1] else None
        if d_w is not None:
            d_w = d_w.reshape(-1, d_w.shape[-1]).sum(0).to(weight.dtype)
        d_x = None
        if ctx.needs_input_grad[0]:
            d_x = (r * (d_xn - xn * (d_xn * xn).mean(-1, keepdim=True))).to(x.dtype)
        return d_x, d_w, None, None


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up keeping only gate and up for backward; autograd through the two eager ops also keeps
    silu(gate), as wide as the MLP (a sixth of a Llama layer's saved activations in fp32 training). The
    backward is the eager ops' own (mul's, then aten.silu_backward), so values and gradients are the same
    bit for bit; silu(gate) is recomputed once."""

    @staticmethod
    def forward(ctx, gate, up):  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        d_gate = d_up = None
        if ctx.needs_input_grad[1]:
            d_up = g * F.silu(gate)
        if ctx.needs_input_grad[0]:
            d_gate = torch.ops.aten.silu_backward(g * up, gate)
        return d_gate, d_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the SwiGLU product of Llama-style MLPs (memory-lean under training, see _SiluMul)."""
    if _saves_for_training(gate, up) and gate.dtype == up.dtype:
        return _SiluMul.apply(gate, up)
    return F.silu(gate) * up


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in float32, with `linear` or `llama3` scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    scaling = scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are interpolated, short ones kept, the band between blended smoothly
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_medium, blended, scaled)
    return inv_freq


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, 1, T, head_dim) for positions (B, T), in `dtype`."""
    freqs = positions.unsqueeze(-1).float() * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # (B, 1, T, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by cos/sin (B, 1, T, D): the two halves of the head are the pair components."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attention_mask(positions: torch.Tensor, n_keys: int, *, window: int | None = None,
                   segments: torch.Tensor | None = None, cached: bool = True) -> torch.Tensor | None:
    """Boolean mask (B, 1, T, n_keys) of which keys each query sees, or None for plain causal attention.

    positions (B, T): each query's position; keys are cache slots 0..n_keys-1 (cached) or the T tokens
    themselves. A query sees keys at positions <= its own, within `window` if given. segments (B, T), only
    without a cache: 0 = padding, equal positive ids = one sequence (packed rows attend within their
    segment); a padding query sees itself only, so its (ignored) output stays finite.
    """
    if not cached and window is None and segments is None:
        return None
    q = positions.unsqueeze(-1)  # (B, T, 1)
    if cached:
        key = torch.arange(n_keys, device=positions.device)  # (S,)
    else:
        key = positions.unsqueeze(1)  # (B, 1, T): key j sits at position positions[b, j]
    allowed = key <= q
    if window is not None:
        allowed = allowed & (key > q - window)
    if segments is not None:
        same = segments.unsqueeze(-1) == segments.unsqueeze(1)  # (B, T, T)
        causal = torch.arange(n_keys, device=positions.device)
        order = causal.unsqueeze(0) <= causal.unsqueeze(1)  # token order, whatever the positions
        allowed = allowed & same & (segments != 0).unsqueeze(1) & order
        allowed = allowed | torch.eye(n_keys, dtype=torch.bool, device=positions.device)
    return allowed.unsqueeze(1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
           scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for q (B, H, T, D), k/v (B, Hkv, S, D) with H a multiple of Hkv (GQA).

    mask (B or 1, 1, T, S) bool or None (causal). Inside a compiled CPU graph with few query rows this is
    `decode_attention` (Inductor fuses it); elsewhere torch's SDPA. softcap: tanh soft-capping of the
    scaled scores (Gemma 2), which SDPA cannot do: computed explicitly (in the compiled step as well).
    """
    gqa = k.shape[1] != q.shape[1]
    if mask is not None and torch.compiler.is_compiling() and q.device.type == "cpu" \
            and q.shape[0] * q.shape[2] <= MAX_ROWS:  # a compiled CPU decode step or verification
        return decode_attention(q, k, v, mask, scale=scale, softcap=softcap)
    if softcap is not None:
        return _explicit_attention(q, k, v, mask, scale, softcap)
    if mask is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale,
                                                                enable_gqa=gqa)
    if q.shape[2] == 1 and q.dtype == torch.bfloat16 and q.device.type == "cpu":
        # torch's CPU kernel is slow for ONE bfloat16 query (bench/RESULTS.md): upcasting k/v is cheaper
        return torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=mask, scale=scale, enable_gqa=gqa).to(q.dtype)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _explicit_attention(q, k, v, mask, scale, softcap) -> torch.Tensor:
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    qf = q.float().reshape(B, Hkv, H // Hkv, T, D)
    scores = torch.einsum("bgrtd,bgsd->bgrts", qf, k.float()) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = torch.ones(1, 1, T, S, dtype=torch.bool, device=q.device).tril(S - T)  # causal
    scores = scores.masked_fill(~mask.reshape(mask.shape[0], 1, 1, T, S), float("-inf"))
    out = torch.einsum("bgrts,bgsd->bgrtd", scores.softmax(-1), v.float())
    return out.reshape(B, H, T, D).to(q.dtype)
