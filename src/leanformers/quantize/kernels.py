"""Weight-only quantization math and the torch kernels that run it, each probed once against a reference.

Schemes
    int8  per-output-channel symmetric:  w[n, k] ~= q[n, k] * scale[n],  q in -127..127
    int4  group-wise asymmetric (groups of `group_size` along in_features):
          w[n, k] ~= (q[n, k] - 8) * scale[n, g] + zero[n, g],  q in 0..15, g = k // group_size
          i.e. `zero` is the value of the *middle* code 8, not an integer zero point.

Kernel conventions (found by experiment against a float64 reference, torch 2.13 on CPU and on CUDA)
    torch.ops.aten._weight_int8pack_mm(x (M, K), w int8 (N, K), scales (N,)) = x @ (w * scales[:, None]).T
        x must be 2-D and contiguous, scales in x's dtype; on CPU only bfloat16 takes a fast path.
    torch.ops.aten._convert_weight_to_int4pack_for_cpu(q int32 (N, K) in 0..15, innerKTiles) -> uint8 (N, K/2)
        (an opaque tiled layout; innerKTiles is ignored on CPU); N must be a multiple of 16 (padded here).
    torch.ops.aten._weight_int4pack_mm_for_cpu(x (M, K), packed, group, scales_and_zeros (K/group, N, 2))
        = x @ W.T with W[n, k] = (q[n, k] - 8) * sz[k//group, n, 0] + sz[k//group, n, 1]
        group in {32, 64, 128, 256}; x contiguous; sz in x's dtype; fast only with bfloat16 activations.
    CUDA: torch.ops.aten._convert_weight_to_int4pack(uint8 (N, K/2) with code[2j] in the HIGH nibble,
        innerKTiles in {2, 4, 8}) and _weight_int4pack_mm with the same convention; bfloat16 activations only.
Every backend is probed once per (device type, dtype) with a small random problem checked against the
reference formula; a kernel that is missing, fails or disagrees is replaced by a dequantize-then-matmul
fallback, logged at WARNING with the reason (never silently). Where a kernel works but is slow (float32
activations on CPU; int8 on CUDA; measurements in bench/RESULTS.md) the fallback is chosen on purpose and
logged at INFO.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import InvalidArgumentError

logger = logging.getLogger("leanformers.quantize")

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)
_N_ALIGN = 16  # the int4 kernels want out_features % 16 == 0 (CPU); we pad with zero rows


def check_int4_group(in_features: int, group_size: int) -> None:
    """An int4 group size must be one the kernels take and divide the input width."""
    if isinstance(group_size, bool) or group_size not in INT4_GROUP_SIZES:
        raise InvalidArgumentError(
            f"int4 group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {group_size!r}")
    if in_features % group_size:
        raise InvalidArgumentError(f"int4: in_features {in_features} is not a multiple of group_size {group_size}")

# ------------------------------------------------------------------------------------ reference math
# Rows quantized at a time: the float temporaries of one chunk stay near 16 MB, so quantizing a large
# embedding (Gemma 3's 262,144 x 640 table) adds little more than its int8 result to the peak memory.
_CHUNK_ELEMENTS = 1 << 22


def _row_step(row_len: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, row_len))


def _float_rows(weight: Any, start: int, stop: int) -> torch.Tensor:
    """float32 rows of a weight: a tensor, or a checkpoint tensor that reads a range of rows alone
    (`float_rows(start, stop)`, e.g. checkpoint.gguf.GGUFTensor), so a file's table is never whole in float."""
    if isinstance(weight, torch.Tensor):
        return weight[start:stop].detach().float()
    return weight.float_rows(start, stop)


def quantize_int8_per_channel(
    weight: Any, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 (N, K), scale (N,) in `dtype`); w ~= q * scale[:, None].

    The scale is rounded to `dtype` first and q computed against the rounded scale, so that
    `q * scale` is exactly what the kernel multiplies with. `weight` is a 2-D tensor or a checkpoint tensor
    with `float_rows` (see _float_rows). Rows are done in chunks (the result does not depend on the chunking:
    every step is per row).
    """
    N, K = weight.shape
    q = torch.empty((N, K), dtype=torch.int8, device=weight.device)
    scale = torch.empty((N,), dtype=dtype, device=weight.device)
    step = _row_step(K)
    for i in range(0, N, step):
        w = _float_rows(weight, i, i + step)
        sc = (w.abs().amax(dim=-1) / 127.0).to(dtype)
        s = sc.float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        scale[i:i + step] = torch.where(sc.float() > 0, sc, torch.ones_like(sc))
        q[i:i + step] = torch.round(w / s.unsqueeze(-1)).clamp_(-127, 127)
    return q, scale


def quantize_int4_groupwise(
    weight: Any, group_size: int = 32, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4 in the kernels' convention.

    Returns (codes uint8 (N, K) in 0..15, scale (N, K/g), zero (N, K/g)), scale/zero in `dtype`, with
    w ~= (codes - 8) * scale + zero per group. Codes are rounded against the already-rounded scale/zero.
    `weight` as for quantize_int8_per_channel; rows are done in chunks (every step is per group, so the
    result does not depend on the chunking).
    """
    N, K = weight.shape
    G = K // group_size
    codes = torch.empty((N, K), dtype=torch.uint8, device=weight.device)
    scale = torch.empty((N, G), dtype=dtype, device=weight.device)
    zero = torch.empty((N, G), dtype=dtype, device=weight.device)
    step = _row_step(K)
    for i in range(0, N, step):
        w = _float_rows(weight, i, i + step)
        w = w.reshape(w.shape[0], G, group_size)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        sc = ((hi - lo) / 15.0).to(dtype)
        ze = (lo + 8.0 * sc.float()).to(dtype)
        s, z = sc.float().unsqueeze(-1), ze.float().unsqueeze(-1)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        c = torch.where(s > 0, torch.round((w - z) / safe) + 8.0, torch.full_like(w, 8.0))
        codes[i:i + step] = c.clamp_(0, 15).reshape(w.shape[0], K)
        scale[i:i + step], zero[i:i + step] = sc, ze
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
# With float32 activations the CPU int8/int4 kernels take a scalar path, and on CUDA _weight_int8pack_mm
# loses to cast-matmul-scale at every batch size (bench/RESULTS.md, "Quantized kernels").
_SLOW_KERNEL = {("cpu", torch.float32)}
# CPU bfloat16: the int8 kernel wins for decoding but loses to cast-matmul from M=16 rows on (prefill)
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
