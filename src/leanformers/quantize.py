"""Weight-only quantization as a module swap: nn.Linear -> Int8Linear / Int4Linear, nn.Embedding -> Int8Embedding.

    from leanformers.quantize import quantize_model
    quantize_model(lm.model, "int4", group_size=32)      # or lm.quantize("int4"), or load(..., quantize="int4")

Schemes
    int8  per-output-channel symmetric:  w[n, k] ~= q[n, k] * scale[n],  q in -127..127
    int4  group-wise asymmetric (groups of `group_size` along in_features):
          w[n, k] ~= (q[n, k] - 8) * scale[n, g] + zero[n, g],  q in 0..15, g = k // group_size
          i.e. `zero` is the value of the *middle* code 8, not an integer zero point.

Kernel conventions (found by experiment against a float64 reference, torch 2.13 CPU; the CUDA ones on an H200)
    torch.ops.aten._weight_int8pack_mm(x (M, K), w int8 (N, K), scales (N,)) = x @ (w * scales[:, None]).T
        x must be 2-D and contiguous, scales in x's dtype. CPU: float32/bfloat16/float16, but only
        bfloat16 is fast (float32 measured ~20-100x slower than bfloat16 on 2 cores: a scalar path).
    torch.ops.aten._convert_weight_to_int4pack_for_cpu(q int32 (N, K) in 0..15, innerKTiles) -> uint8 (N, K/2)
        (an opaque tiled layout, not plain nibble pairs; innerKTiles is ignored on CPU);
        N must be a multiple of 16 (we pad with zero rows and slice the output)
    torch.ops.aten._weight_int4pack_mm_for_cpu(x (M, K), packed, group, scales_and_zeros (K/group, N, 2))
        = x @ W.T with W[n, k] = (q[n, k] - 8) * sz[k//group, n, 0] + sz[k//group, n, 1]
        group in {32, 64, 128, 256}; x contiguous; sz in x's dtype. torch 2.13 accepts float32, float16
        and bfloat16 activations (older releases: bfloat16 only), but again only bfloat16 is fast.
    CUDA (torch 2.11, H200): torch.ops.aten._convert_weight_to_int4pack(uint8 (N, K/2) with code[2j] in
        the HIGH nibble and code[2j+1] in the low one (the other order is off by 150%), innerKTiles in
        {2, 4, 8}) -> int32 tiles, and _weight_int4pack_mm with the same (q - 8) * scale + zero
        convention and scales_and_zeros layout; bfloat16 activations only (float16/float32 raise).
        It is fast for decoding (M=1: 19 us vs 26 us dense bfloat16 for 11008x4096) but ~25x slower
        than a dense bfloat16 matmul for M=512 (prefill).
    Every backend is probed once per (device type, dtype) with a small random problem checked against
    the reference formula; a kernel that is missing, fails or disagrees is replaced by a
    dequantize-then-matmul fallback, and that is logged at WARNING with the reason (never silently).
    Where a kernel works but was measured slow (float32 on CPU; int8 on CUDA) the fallback is chosen
    on purpose and logged at INFO.

Activations: on CPU the quantized kernels are only fast with bfloat16 activations, so quantize_model
switches the model's activations (norms, biases, embeddings, KV cache) to bfloat16 by default and logs
it at INFO (on CUDA only int4 needs that); pass dtype=torch.float32 to keep float32 (then the
int8/int4 layers cast/dequantize their weights and run dense float32 matmuls: accurate, not fast).

Fused projections: call `model.fuse_projections()` BEFORE quantize_model (the fused qkv_proj /
gate_up_proj are plain nn.Linear and get quantized like any other). Fusing after quantizing is a no-op
for the quantized layers (fuse_projections only concatenates nn.Linear).

Moving devices: quantize on the device the model will run on. Int8 modules move freely; an Int4Linear's
packed weight is laid out for one device type's kernel, so it refuses to run on another one.

GGUF Q4_0 / Q4_1 (see `Int4Linear.from_gguf` and `load(..., quantize="int4")`): the file's 32-blocks map
onto the int4 kernel form without a dequantize->requantize round trip:
    Q4_1: w = c * d + m   ->  q = c, scale = d, zero = m + 8 * d
    Q4_0: w = (c - 8) * d ->  q = c, scale = d, zero = 0
The codes are copied exactly. d and m are float16 in the file. With float32 scales (float32
activations) the effective weights equal the exact dequantization bit for bit (measured on all 210
Q4_1 tensors of SmolLM2-135M: max error 0). With bfloat16 scales (the fast CPU path) d and m + 8d are
rounded to bfloat16 (8 significant bits instead of float16's 11; per element the error is at most
2^-8 * (8|d| + |m + 8d|)): measured on SmolLM2-135M the effective weights then differ from the exact
dequantization by at most 0.0215 absolute (rms 3.8e-4; weights up to 9.25), i.e. at most 4.6% of that
block's own quantization step d.
The Q8_0 embedding (tied to lm_head) is 32-block int8 with one float16 scale per block; per-channel
int8 (what _weight_int8pack_mm takes) cannot represent it exactly, so it is requantized per row
(scale = row max / 127, round to nearest): measured on SmolLM2-135M, max error 7.7e-3 and rms 1.6e-3
against the exact Q8_0 values (weight rms 0.136).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidArgumentError, UnsupportedModelError
from .models.ops import gemv, rowwise

logger = logging.getLogger(__name__)

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)
_N_ALIGN = 16  # the int4 kernels want out_features % 16 == 0 (CPU); we pad with zero rows


# ------------------------------------------------------------------------------------ reference math
def quantize_int8_per_channel(
    weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 (N, K), scale (N,) in `dtype`); w ~= q * scale[:, None].

    The scale is rounded to `dtype` first and q computed against the rounded scale, so that
    `q * scale` is exactly what the kernel multiplies with.
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=-1)
    scale = (amax / 127.0).to(dtype)
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    scale = torch.where(scale.float() > 0, scale, torch.ones_like(scale))
    q = torch.round(w / s.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4_groupwise(
    weight: torch.Tensor, group_size: int = 32, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4 in the kernels' convention.

    Returns (codes uint8 (N, K) in 0..15, scale (N, K/g), zero (N, K/g)), scale/zero in `dtype`, with
    w ~= (codes - 8) * scale + zero per group. Codes are rounded against the already-rounded scale/zero.
    """
    N, K = weight.shape
    w = weight.detach().float().reshape(N, K // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15.0).to(dtype)
    zero = (lo + 8.0 * scale.float()).to(dtype)
    s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.where(s > 0, torch.round((w - z) / safe) + 8.0, torch.full_like(w, 8.0))
    codes = codes.clamp_(0, 15).to(torch.uint8).reshape(N, K)
    return codes, scale, zero


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K) from codes (N, K) and per-group scale/zero (N, K/g): (codes - 8) * scale + zero.

    Computed in float64 and rounded once to `dtype` (the CPU kernel's fused multiply-add also rounds once).
    """
    N, K = codes.shape
    c = codes.double().reshape(N, K // group_size, group_size)
    w = (c - 8.0) * scale.double().unsqueeze(-1) + zero.double().unsqueeze(-1)
    return w.reshape(N, K).to(dtype)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> uint8 (N, K/2), code[2j] in the high nibble (the CUDA kernel's input layout)."""
    c = codes.to(torch.uint8)
    return (c[:, ::2] << 4) | c[:, 1::2]


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(packed.shape[0], -1)


# ------------------------------------------------------------------------------------ kernel probes
_INT8_BACKENDS: dict[tuple[str, torch.dtype], tuple[str, str]] = {}
_INT4_BACKENDS: dict[tuple[str, torch.dtype], tuple[str, str]] = {}
# Measured on a 2-core x86 CPU (torch 2.13): with float32 activations the int8/int4 kernels take a
# scalar path, 10-40x slower than casting/dequantizing the weight and calling a dense float32 matmul.
# On an H200 (torch 2.11) _weight_int8pack_mm was 2-250x slower than cast-matmul-scale at every
# batch size (M=1: 256 vs 148 us, M=512: 50 ms vs 0.2 ms for 11008x4096), so CUDA int8 never uses it.
_SLOW_KERNEL = {("cpu", torch.float32)}
# CPU, bfloat16, one thread, 1536x576: the int8 kernel wins for decoding (M=1: 0.06 vs 0.21 ms for
# cast-matmul-scale; the 49152x576 lm_head 5 vs 39 ms) but loses from M=16 on (M=128: 3.3 vs 1.4 ms,
# dense bfloat16 1.3 ms), so prefill-sized batches take the cast path.
_INT8_KERNEL_MAX_M = 16


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    tol = 2e-2 if out.dtype in (torch.bfloat16, torch.float16) else 1e-4
    return bool(((out.double().cpu() - ref).abs().max() <= tol * ref.abs().max()).item())


def _probe_int8(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if _weight_int8pack_mm works (and agrees with the reference) here, else why not."""
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None:
        return "torch.ops.aten._weight_int8pack_mm is not available in this torch build"
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8)
        s = torch.rand(32, generator=g) + 0.5
        x = torch.randn(3, 64, generator=g)
        out = op(x.to(device, dtype), w.to(device), s.to(device, dtype))
        ref = x.to(dtype).double() @ (w.double() * s.to(dtype).double()[:, None]).T
    except Exception as exc:  # not implemented for this device/dtype
        return f"_weight_int8pack_mm failed on {device.type}/{dtype}: {str(exc).splitlines()[0]}"
    if not _close(out, ref):
        return "_weight_int8pack_mm disagrees with the reference (unexpected convention)"
    return None


def int8_backend(device: torch.device | str, dtype: torch.dtype) -> tuple[str, str]:
    """('kernel' | 'dequant', why) for int8 matmuls on this device type and activation dtype (cached).

    'dequant' casts the int8 weight to the activation dtype, multiplies and scales the outputs
    (exact math: a per-channel scale factors out of the matmul). The choice is logged at INFO.
    """
    device = torch.device(device)
    key = (device.type, dtype)
    if key not in _INT8_BACKENDS:
        why = _probe_int8(device, dtype)
        if why is None and (key in _SLOW_KERNEL or device.type == "cuda"):
            why = f"the {device.type} int8 kernel is slow with {dtype} activations; cast-matmul-scale is faster"
        backend = "kernel" if why is None else "dequant"
        if backend == "dequant":
            logger.info("int8 on %s/%s: using cast-matmul-scale (%s)", device.type, dtype, why)
        _INT8_BACKENDS[key] = (backend, why or "_weight_int8pack_mm")
    return _INT8_BACKENDS[key]


def _int4_pack(codes: torch.Tensor, backend: str, device: torch.device) -> torch.Tensor:
    """Pack (N, K) codes for `backend`; N already padded to a multiple of _N_ALIGN for kernels."""
    if backend == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(device, torch.int32).contiguous(), 1)
    if backend == "cuda":
        K = codes.shape[1]
        tiles = 8 if K % 256 == 0 else (4 if K % 128 == 0 else 2)
        return torch.ops.aten._convert_weight_to_int4pack(_pack_nibbles(codes).to(device).contiguous(), tiles)
    return _pack_nibbles(codes).to(device)


def _int4_mm(backend: str, x: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    if backend == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)
    return torch.ops.aten._weight_int4pack_mm(x, packed, group, sz)


def _probe_int4(device: torch.device, dtype: torch.dtype) -> tuple[str | None, str | None]:
    """(kernel backend name or None, why not) for int4 on this device type and activation dtype."""
    if device.type == "cpu":
        ops, candidate = ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"), "cpu"
    elif device.type == "cuda":
        ops, candidate = ("_convert_weight_to_int4pack", "_weight_int4pack_mm"), "cuda"
    else:
        return None, f"no int4 kernel is wired up for device type {device.type!r}"
    missing = [o for o in ops if getattr(torch.ops.aten, o, None) is None]
    if missing:
        return None, f"torch.ops.aten.{missing[0]} is not available in this torch build"
    try:
        g = torch.Generator().manual_seed(0)
        N, K, G = 32, 128, 32
        codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
        scale = (torch.rand(N, K // G, generator=g) + 0.5).to(dtype)
        zero = torch.randn(N, K // G, generator=g).to(dtype)
        x = torch.randn(3, K, generator=g).to(dtype)
        sz = torch.stack([scale.T, zero.T], dim=-1).to(device).contiguous()
        out = _int4_mm(candidate, x.to(device), _int4_pack(codes, candidate, device), G, sz)
        ref = x.double() @ dequantize_int4(codes, scale, zero, G, torch.float64).T
    except Exception as exc:
        return None, f"{ops[1]} failed on {device.type}/{dtype}: {str(exc).splitlines()[0]}"
    if not _close(out, ref):
        return None, f"{ops[1]} disagrees with the reference (unexpected scale/zero convention)"
    return candidate, None


def int4_backend(device: torch.device | str, dtype: torch.dtype) -> tuple[str, str]:
    """('cpu' | 'cuda' | 'dequant', why) for int4 matmuls on this device type and activation dtype (cached).

    Without a usable kernel the dequantize-then-matmul fallback is used and that is logged at
    WARNING with the reason; where a kernel works but is slow (float32 on CPU) at INFO.
    """
    device = torch.device(device)
    key = (device.type, dtype)
    if key not in _INT4_BACKENDS:
        backend, why = _probe_int4(device, dtype)
        if backend is not None and key in _SLOW_KERNEL:
            backend = None
            why = f"the {device.type} int4 kernel is slow with {dtype} activations; dequantize+matmul is faster"
            logger.info("int4 on %s/%s: using dequantize-then-matmul (%s)", device.type, dtype, why)
        elif backend is None:
            logger.warning(
                "int4 on %s/%s: no usable int4 kernel (%s); using the dequantize-then-matmul fallback "
                "(correct but slow)", device.type, dtype, why,
            )
        _INT4_BACKENDS[key] = (backend or "dequant", why or f"{backend} kernel")
    return _INT4_BACKENDS[key]


# ------------------------------------------------------------------------------------ modules
def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


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
        if group_size not in INT4_GROUP_SIZES:
            raise InvalidArgumentError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
        if K % group_size:
            raise InvalidArgumentError(f"int4: in_features {K} is not a multiple of group_size {group_size}")
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
        if weight.shape[1] % group_size:
            raise InvalidArgumentError(
                f"int4: in_features {weight.shape[1]} is not a multiple of group_size {group_size}"
            )
        codes, scale, zero = quantize_int4_groupwise(weight, group_size, dtype)
        return cls(codes, scale, zero, bias, group_size=group_size, dtype=dtype, device=weight.device, backend=backend)

    @classmethod
    def from_gguf(cls, tensor: Any, bias: torch.Tensor | None = None, *, dtype: torch.dtype = torch.bfloat16,
                  device: torch.device | str = "cpu", backend: str | None = None) -> "Int4Linear":
        """Exact Q4_0/Q4_1 blocks (a GGUFTensor) -> Int4Linear, group 32, no requantization.

        Q4_1 w = c*d + m and Q4_0 w = (c-8)*d both become q = c, scale = d, zero = m + 8d (m = -8d for
        Q4_0, so zero = 0). Exact with float32 scales; with bfloat16 scales d and m + 8d are rounded
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


# ------------------------------------------------------------------------------------ model swap
def check_scheme(scheme: str, group_size: int = 32) -> None:
    """Validate a scheme name and (for int4) a group size; raises InvalidArgumentError."""
    if scheme not in SCHEMES:
        raise InvalidArgumentError(f"unknown quantization scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    if scheme == "int4" and (isinstance(group_size, bool) or group_size not in INT4_GROUP_SIZES):
        raise InvalidArgumentError(
            f"int4 group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {group_size!r}"
        )


def _lm_head_scheme(scheme: str, include_lm_head: bool | str | None) -> str | None:
    if include_lm_head is True:
        return scheme
    if include_lm_head is False or include_lm_head is None:
        return None
    if include_lm_head in SCHEMES:
        return include_lm_head
    raise InvalidArgumentError(
        f"include_lm_head must be True, False, 'int8' or 'int4', got {include_lm_head!r}"
    )


def _default_filter(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def _auto_dtype(device: torch.device, current: torch.dtype, scheme: str) -> torch.dtype:
    """bfloat16 on CPU (the kernels' fast path); on CUDA bfloat16 only where the int4 kernel needs it."""
    if device.type == "cpu":
        ok = (int4_backend if scheme == "int4" else int8_backend)(device, torch.bfloat16)[0] != "dequant"
        return torch.bfloat16 if ok else current
    if scheme == "int4" and int4_backend(device, current)[0] == "dequant":
        if int4_backend(device, torch.bfloat16)[0] != "dequant":
            return torch.bfloat16
    return current


def gguf_exact_int4_names(tensors: Mapping[str, Any], *, include_lm_head: bool | str = "int8",
                          tie_word_embeddings: bool = False) -> set[str]:
    """The GGUF Q4_0/Q4_1 linear weights that `quantize_model(..., "int4", group_size=32)` maps exactly."""
    head = _lm_head_scheme("int4", include_lm_head)
    out = set()
    for name, t in tensors.items():
        if getattr(t, "qtype", None) not in ("Q4_0", "Q4_1") or len(t.shape) != 2:
            continue
        if name == "model.embed_tokens.weight":
            continue
        if name == "lm_head.weight" and (head != "int4" or tie_word_embeddings):
            continue
        if name.endswith(".weight"):
            out.add(name)
    return out


def quantize_model(
    model: nn.Module,
    scheme: str,
    *,
    group_size: int = 32,
    include_lm_head: bool | str = "int8",
    dtype: torch.dtype | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    gguf_tensors: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Swap the model's linears (and embeddings) for quantized ones, in place; returns the model.

    scheme: "int8" (per-channel) or "int4" (group-wise, group_size in 32/64/128/256).
    include_lm_head: "int8" (default) quantizes lm_head and the input embedding to int8 whatever the
        scheme (int4 on a tied lm_head broke SmolLM2's answers from the first token); True uses
        `scheme` for lm_head; False keeps lm_head and embeddings in floating point. A tied
        embedding/lm_head at int8 becomes ONE shared int8 tensor (`lm_head.weight is embed_tokens.weight`).
    dtype: activation dtype afterwards; None = automatic (bfloat16 on CPU, where the kernels are only
        fast in bfloat16; on CUDA bfloat16 only if int4 needs it), logged at INFO when it changes.
    filter_fn(name, module) -> bool: which nn.Linear modules (other than lm_head) to quantize; default all.
    gguf_tensors: GGUF Q4_0/Q4_1 tensors (by HF weight name) for the exact int4 mapping; their
        modules may hold placeholder weights (see loading.build_model(placeholders=...)).
    Call after `model.fuse_projections()`, not before (fusing skips quantized layers).
    """
    check_scheme(scheme, group_size)
    head_scheme = _lm_head_scheme(scheme, include_lm_head)
    if any(isinstance(m, QUANTIZED_MODULES) for m in model.modules()):
        raise InvalidArgumentError("the model is already quantized")
    filter_fn = filter_fn or _default_filter
    gguf_tensors = dict(gguf_tensors or {})
    names = {m: n for n, m in model.named_modules()}
    lm_head = getattr(model, "lm_head", None)
    embeds = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]

    # plan (and validate everything) before touching the model
    plan: list[tuple[str, nn.Linear, str]] = []
    for name, mod in model.named_modules():
        if mod is lm_head or not isinstance(mod, nn.Linear):
            continue
        if filter_fn(name, mod):
            plan.append((name, mod, scheme))
    if isinstance(lm_head, nn.Linear) and head_scheme is not None:
        plan.append((names[lm_head], lm_head, head_scheme))
    if not plan:
        raise UnsupportedModelError("quantize: the model has no nn.Linear layers to quantize")
    for name, mod, sch in plan:
        if sch == "int4" and mod.in_features % group_size:
            raise InvalidArgumentError(
                f"int4 group_size {group_size} does not divide in_features {mod.in_features} of layer "
                f"{name!r} (weight {mod.out_features}x{mod.in_features}); choose a group size that divides it"
            )
    unknown = [n for n in gguf_tensors if n.rsplit(".", 1)[0] not in names.values()]
    if unknown:
        raise InvalidArgumentError(f"gguf_tensors names no module of this model: {unknown[:4]}")

    first = next(p for p in model.parameters() if p.is_floating_point())
    device, current = first.device, _activation_dtype(model, first.dtype)
    target = dtype if dtype is not None else _auto_dtype(device, current, scheme)
    if target not in (torch.float32, torch.bfloat16, torch.float16):
        raise InvalidArgumentError(f"quantize: activation dtype must be float32, bfloat16 or float16, not {target}")
    if target != current:
        logger.info("quantize %s: activations switch from %s to %s%s", scheme, current, target,
                    " (the quantized CPU kernels are fast only in bfloat16)" if device.type == "cpu" else "")
    if device.type == "cpu" and target != torch.bfloat16:
        logger.info("quantize %s: with %s activations on CPU the quantized layers cast/dequantize their weights "
                    "for dense matmuls (accurate; bfloat16 uses the much faster int kernels)", scheme, target)
    if scheme == "int4" or head_scheme == "int4":
        int4_backend(device, target)  # logs a fallback once, with the reason
    else:
        int8_backend(device, target)

    from .generation.compile import release

    release(model, f"the model was quantized ({scheme}) after compiling")
    # tied embedding: one int8 tensor for embedding and lm_head
    tied_embed = None
    if isinstance(lm_head, nn.Linear):
        tied_embed = next((m for _, m in embeds if m.weight is lm_head.weight), None)
    shared: Int8Embedding | None = None
    with torch.no_grad():
        if head_scheme is not None:
            for ename, emb in embeds:
                qe = Int8Embedding.from_float(emb.weight, dtype=target)
                if emb is tied_embed and head_scheme == "int8":
                    shared = qe
                _set_module(model, ename, qe)
            if tied_embed is not None and head_scheme == "int4":
                logger.info("quantize: lm_head is int4, so the tied embedding is stored separately (int8)")
        counts = {"int8": 0, "int4": 0, "int4 exact from GGUF": 0}

        def weight_of(wname: str, mod: nn.Linear) -> torch.Tensor:
            if wname in gguf_tensors:  # a placeholder in the module: dequantize the file's tensor
                return gguf_tensors.pop(wname).dequantize(torch.float32).to(device)
            return mod.weight

        for name, mod, sch in plan:
            bias = mod.bias
            wname = f"{name}.weight"
            if sch == "int4" and wname in gguf_tensors and group_size == 32:
                new = Int4Linear.from_gguf(gguf_tensors.pop(wname), bias, dtype=target, device=device)
                counts["int4 exact from GGUF"] += 1
            elif mod is lm_head and shared is not None:
                new = shared.as_linear()
                counts["int8"] += 1
            elif sch == "int4":
                new = Int4Linear.from_float(weight_of(wname, mod), bias, group_size=group_size, dtype=target)
                counts["int4"] += 1
            else:
                new = Int8Linear.from_float(weight_of(wname, mod), bias, dtype=target)
                counts["int8"] += 1
            _set_module(model, name, new)
        # GGUF tensors whose modules are not quantized after all: plain float weights
        for wname in list(gguf_tensors):
            mod = model.get_submodule(wname.rsplit(".", 1)[0])
            mod.weight = _frozen(gguf_tensors.pop(wname).dequantize(torch.float32).to(device))
        # the rest (norms, biases, float linears/embeddings) in the activation dtype
        seen: set[int] = set()
        for mod in model.modules():
            if isinstance(mod, QUANTIZED_MODULES):
                continue
            for p in mod.parameters(recurse=False):
                if id(p) not in seen and p.is_floating_point() and p.dtype != target:
                    p.data = p.data.to(target)
                seen.add(id(p))
    logger.info(
        "quantized %s: %s; lm_head %s%s; activations %s",
        scheme, ", ".join(f"{v} {k}" for k, v in counts.items() if v),
        head_scheme or "float", " (shared with the embedding)" if shared is not None else "", target,
    )
    return model


def _activation_dtype(model: nn.Module, fallback: torch.dtype) -> torch.dtype:
    norm = getattr(getattr(model, "model", None), "norm", None)
    w = getattr(norm, "weight", None)
    return w.dtype if isinstance(w, torch.Tensor) else fallback


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)

