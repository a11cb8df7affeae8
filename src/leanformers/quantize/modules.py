"""Weight-only quantized modules: Int8Linear, Int8Embedding, Int4Linear (the kernels: quantize/kernels.py).

GGUF Q4_0 / Q4_1 / Q4_K blocks map onto Int4Linear without a dequantize->requantize round trip
(`Int4Linear.from_gguf`), per group of 32 values:
    Q4_1: w = c * d + m   ->  q = c, scale = d, zero = m + 8 * d
    Q4_0: w = (c - 8) * d ->  q = c, scale = d, zero = 0
    Q4_K: w = c * (d * sc) - dmin * mn (sc, mn: the sub-block's six-bit scale and min)
                          ->  q = c, scale = d * sc, zero = 8 * d * sc - dmin * mn
The codes are copied exactly; d and m are float16 in the file. With float32 scales the effective weights
equal the exact dequantization (bit for bit for Q4_0/Q4_1; Q4_K's zero may round once in float32); with bfloat16 scales (the fast CPU path) d and m + 8d are
rounded to bfloat16, an error of at most 2^-8 * (8|d| + |m + 8d|) per element (bench/RESULTS.md gives the
measured error on SmolLM2-135M).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError
from ..models.ops import gemv, rowwise
from .kernels import (
    _INT8_KERNEL_MAX_M,
    _N_ALIGN,
    check_int4_group,
    _int4_mm,
    _int4_pack,
    _unpack_nibbles,
    int4_backend,
    int8_backend,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
)

def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class _FrozenQuantized(torch.autograd.Function):
    """y = module(x) through the quantized kernel; dx = dy @ W with W dequantized only inside backward.

    The weights are frozen (no weight gradient), but gradients must pass through to what comes before: a
    quantized lm_head or an un-adapted layer in QLoRA training. The int8/int4 kernels have no derivative,
    and the int8 layer picks its kernel by row count, so without this a backward failed or not depending on
    the number of rows (fewer than 16 in a loss chunk)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module) -> torch.Tensor:  # type: ignore[override]
        ctx.module, ctx.x_dtype = module, x.dtype
        return module(x)  # grad mode is off in here: the module's own path

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        w = ctx.module.dequantize_weight(grad.dtype)
        return (grad @ w).to(ctx.x_dtype), None


def _needs_input_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling()


class Int8Linear(nn.Module):
    """y = x @ (weight * weight_scale[:, None]).T + bias, weight int8 (N, K), weight_scale (N,).

    `weight` and `weight_scale` are (frozen) Parameters so a tied embedding can share them and
    `.to(device)` keeps the sharing. Activations are computed in weight_scale's dtype.
    """

    def __init__(self, weight: torch.Tensor | nn.Parameter, weight_scale: torch.Tensor | nn.Parameter,
                 bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise InvalidArgumentError(f"Int8Linear needs a 2-D int8 weight, got {weight.dtype} {tuple(weight.shape)}")
        if weight_scale.shape != (weight.shape[0],):
            raise InvalidArgumentError(f"weight_scale must have shape ({weight.shape[0]},), got {tuple(weight_scale.shape)}")
        self.weight = weight if isinstance(weight, nn.Parameter) else _frozen(weight)
        self.weight_scale = weight_scale if isinstance(weight_scale, nn.Parameter) else _frozen(weight_scale)
        self.bias = None if bias is None else _frozen(bias.detach().to(weight_scale.dtype))
        self.out_features, self.in_features = weight.shape
        # chosen now (not in the first forward) so a compiled graph never runs the probe
        self._device_type = weight.device.type
        self._backend = int8_backend(weight.device, self.dtype)[0] if weight.device.type != "meta" else "dequant"

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   dtype: torch.dtype = torch.bfloat16) -> "Int8Linear":
        q, scale = quantize_int8_per_channel(weight, dtype)
        return cls(q.to(weight.device), scale.to(weight.device), bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_scale.dtype

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.to(dtype) * self.weight_scale.to(dtype).unsqueeze(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _needs_input_grad(x):
            return _FrozenQuantized.apply(x, self)
        if x.device.type != self._device_type:
            self._device_type = x.device.type
            self._backend = int8_backend(x.device, self.dtype)[0]
        if rowwise(x):  # compiled CPU decode step: one streaming loop with the int8->float cast fused
            return gemv(x, self.weight, self.bias, self.weight_scale, self.dtype)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.dtype:
            x2 = x2.to(self.dtype)
        if self._backend == "kernel" and x2.shape[0] < _INT8_KERNEL_MAX_M:
            out = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, self.weight_scale)
        else:  # the per-channel scale factors out of the matmul: cast, matmul, scale the outputs
            out = F.linear(x2, self.weight.to(x2.dtype)) * self.weight_scale
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, dtype={self.dtype}"


class Int8Embedding(nn.Module):
    """Embedding lookup from per-row int8: out = weight[ids] * weight_scale[ids, None] (weight_scale's dtype)."""

    def __init__(self, weight: torch.Tensor | nn.Parameter, weight_scale: torch.Tensor | nn.Parameter):
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise InvalidArgumentError(f"Int8Embedding needs a 2-D int8 weight, got {weight.dtype} {tuple(weight.shape)}")
        self.weight = weight if isinstance(weight, nn.Parameter) else _frozen(weight)
        self.weight_scale = weight_scale if isinstance(weight_scale, nn.Parameter) else _frozen(weight_scale)
        self.num_embeddings, self.embedding_dim = weight.shape

    @classmethod
    def from_float(cls, weight: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16) -> "Int8Embedding":
        q, scale = quantize_int8_per_channel(weight, dtype)
        return cls(q.to(weight.device), scale.to(weight.device))

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_scale.dtype

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype) * self.weight_scale.to(dtype).unsqueeze(-1)

    def as_linear(self) -> Int8Linear:
        """An Int8Linear (a tied lm_head) sharing this embedding's int8 weight and scales."""
        return Int8Linear(self.weight, self.weight_scale)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input_ids, self.weight).to(self.dtype)
        return rows * F.embedding(input_ids, self.weight_scale.unsqueeze(-1))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.dtype}"


class Int4Linear(nn.Module):
    """y = x @ W.T + bias with W[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g], g = k // group_size.

    Buffers: `weight_packed` (the kernel's layout for the device it was built on, or plain nibbles
    for the fallback) and `scales_zeros` (K/group, N_padded, 2) in the activation dtype.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 bias: torch.Tensor | None = None, *, group_size: int = 32,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 backend: str | None = None):
        super().__init__()
        N, K = codes.shape
        check_int4_group(K, group_size)
        if scale.shape != (N, K // group_size) or zero.shape != scale.shape:
            raise InvalidArgumentError(
                f"int4: scale/zero must have shape ({N}, {K // group_size}), got {tuple(scale.shape)} / {tuple(zero.shape)}"
            )
        device = torch.device(device) if device is not None else codes.device
        self.in_features, self.out_features, self.group_size = K, N, group_size
        # backend: None = int4_backend's choice; "cpu"/"cuda" force that kernel; "dequant" the fallback
        if backend not in (None, "cpu", "cuda", "dequant"):
            raise InvalidArgumentError(f"int4 backend must be 'cpu', 'cuda', 'dequant' or None, got {backend!r}")
        self.backend = backend or int4_backend(device, dtype)[0]
        self.packed_for = device.type
        pad = (-N) % _N_ALIGN if self.backend != "dequant" else 0
        self._n_padded = N + pad
        codes = codes.to(torch.uint8)
        scale, zero = scale.to(dtype), zero.to(dtype)
        if pad:
            codes = torch.cat([codes, codes.new_full((pad, K), 8)])
            scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
            zero = torch.cat([zero, zero.new_zeros(pad, zero.shape[1])])
        self.register_buffer("weight_packed", _int4_pack(codes, self.backend, device))
        self.register_buffer("scales_zeros", torch.stack([scale.T, zero.T], dim=-1).contiguous().to(device))
        # the group size as a tensor, for the compiled CPU step's form of the kernel (see forward)
        self.register_buffer("group_size_tensor", torch.tensor(group_size, device=device), persistent=False)
        self.bias = None if bias is None else _frozen(bias.detach().to(device, dtype))

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, group_size: int = 32,
                   dtype: torch.dtype = torch.bfloat16, backend: str | None = None) -> "Int4Linear":
        check_int4_group(weight.shape[1], group_size)
        codes, scale, zero = quantize_int4_groupwise(weight, group_size, dtype)
        return cls(codes, scale, zero, bias, group_size=group_size, dtype=dtype, device=weight.device, backend=backend)

    @classmethod
    def from_gguf(cls, tensor: Any, bias: torch.Tensor | None = None, *, dtype: torch.dtype = torch.bfloat16,
                  device: torch.device | str = "cpu", backend: str | None = None) -> "Int4Linear":
        """Q4_0/Q4_1/Q4_K blocks (a GGUFTensor) -> Int4Linear, group 32, no requantization.

        Every group of 32 is w = c*d + m (Q4_0: m = -8d; Q4_K: d = d*sc, m = -dmin*mn per sub-block), which
        becomes q = c, scale = d, zero = m + 8d. Exact with float32 scales; with bfloat16 scales d and m + 8d are rounded
        to bfloat16 (see the module docstring for the measured error).
        """
        codes, d, m = tensor.q4_blocks()
        zero = m.float() + 8.0 * d.float()
        return cls(codes, d.float(), zero, bias, group_size=32, dtype=dtype, device=device, backend=backend)

    @property
    def dtype(self) -> torch.dtype:
        return self.scales_zeros.dtype

    def _check_device(self, device: torch.device) -> None:
        if self.backend != "dequant" and device.type != self.packed_for:
            raise InvalidArgumentError(
                f"this Int4Linear was packed for the {self.packed_for} kernel and cannot run on {device.type}; "
                "quantize the model after moving it (load(..., device=..., quantize=...))"
            )

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective (N, K) weight the forward multiplies with (for kernels: read back through the kernel)."""
        N, K, G = self.out_features, self.in_features, self.group_size
        if self.backend == "dequant":
            return self._dequant(self.dtype).to(dtype)
        self._check_device(self.weight_packed.device)
        # x = I reads W.T back; float32 when the kernel takes it (exact), else the activation dtype
        for d in dict.fromkeys((torch.float32, self.dtype)):
            eye = torch.eye(K, dtype=d, device=self.weight_packed.device)
            try:
                wt = _int4_mm(self.backend, eye, self.weight_packed, G, self.scales_zeros.to(d))
            except RuntimeError:  # this kernel does not take float32 activations
                continue
            return wt.T[:N].to(dtype).contiguous()
        raise InvalidArgumentError(f"cannot read the int4 weight back through the {self.backend} kernel")

    def _dequant(self, dtype: torch.dtype) -> torch.Tensor:
        """The fallback's weight: zero + (codes - 8) * scale in `dtype` (what its forward multiplies with)."""
        N, K, G = self.out_features, self.in_features, self.group_size
        codes = _unpack_nibbles(self.weight_packed).to(dtype).view(N, K // G, G)
        sz = self.scales_zeros.to(dtype)
        return torch.addcmul(sz[..., 1].T.unsqueeze(-1), codes - 8, sz[..., 0].T.unsqueeze(-1)).reshape(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _needs_input_grad(x):
            return _FrozenQuantized.apply(x, self)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.dtype:
            x2 = x2.to(self.dtype)
        if self.backend == "dequant":
            out = F.linear(x2, self._dequant(x2.dtype))
        else:
            if x.device.type != self.packed_for:
                self._check_device(x.device)
            if self.backend == "cpu" and torch.compiler.is_compiling():
                # The same CPU kernel, taking the group size as a tensor: given an int, Inductor makes
                # that tensor itself, a constant an AOTInductor package without weights cannot provide.
                out = torch.ops.quantized.int4mm_packed_weight_cpu(x2.contiguous(), self.weight_packed,
                                                                   self.group_size_tensor, self.scales_zeros)
            else:
                out = _int4_mm(self.backend, x2.contiguous(), self.weight_packed, self.group_size, self.scales_zeros)
            if self._n_padded != self.out_features:
                out = out[:, : self.out_features]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}, dtype={self.dtype}, backend={self.backend}")


QUANTIZED_MODULES = (Int8Linear, Int4Linear, Int8Embedding)
