"""GGUF files (llama.cpp): metadata, config and tensors with HF names.

The header is parsed and validated by `gguf_header` (every count, length, type and offset checked
against the file); tensors are memory-mapped and dequantized on demand (F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K). What the metadata and tensor names mean is the family's
(models/registry.py: `config_from_gguf`, `gguf_tensor_name`, `gguf_unpermute_heads`, `gguf_value_shift`);
llama.cpp stores some architectures' q/k projections with rows permuted for its rotary layout, and some
tensors shifted (Gemma's norm weights + 1); both are undone here. Q4_0/Q4_1/Q4_K
blocks can also be handed out as codes, scales and mins (`GGUFTensor.q4_blocks`) for the int4 kernels.

Non-finite values: as a tensor is dequantized, what decides its finiteness is checked for NaN/inf: the
float16 scales (and mins) of Q8_0/Q4_0/Q4_1 blocks (1/32 of the elements; the codes are small integers),
the values of F32/F16/BF16 and K-quant tensors (one sum over memory just written). So a corrupt scale or
float weight fails with the tensor's name instead of loading a model that outputs NaN.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import CheckpointError, UnsupportedModelError
from ..files import file_size
from ..models.registry import family_for, family_for_gguf
from .gguf_header import parse_header
from .gguf_meta import GGUFMetadata

SUPPORTED_QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
Q4_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # 4-bit codes with a scale and a minimum per 32 values: exact on int4 kernels

def _unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: rows (head, half, pair) -> (head, pair, half)."""
    rows = w.shape[0]
    rest = w.shape[1:]
    # (n_head, rows/n_head/2, 2, ...) -> (n_head, 2, rows/n_head/2, ...)
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file, in HF orientation (out_features, in_features), not yet dequantized."""

    name: str
    qtype: str
    shape: tuple[int, ...]
    raw: np.ndarray
    permute_heads: int | None = None  # undo llama.cpp's rotary permutation with this many heads
    source: str = ""
    shift: float = 0.0  # what llama.cpp's converter added to every value (subtracted in float32)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize to a new torch tensor of `dtype` in HF layout."""
        try:
            t = _dequantize(self.raw, self.qtype, self.shape, self._check_finite)
            if self.permute_heads:
                t = _unpermute_rows(t, self.permute_heads)
            if self.shift:
                t = t - self.shift
        except CheckpointError:  # already names the file and the tensor
            raise
        except (ValueError, IndexError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{self.source}: tensor {self.name!r} ({self.qtype}) is corrupt: {exc}") from None
        return t.to(dtype).contiguous()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def row_sliceable(self) -> bool:
        """True when `float_rows` can read a range of rows alone (a 2-D tensor whose rows were not permuted)."""
        return len(self.shape) == 2 and not self.permute_heads

    def float_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop dequantized to float32 (HF layout), reading only their bytes: a large table is
        quantized part by part without ever holding all of it in float32 (quantize/kernels.py)."""
        if not self.row_sliceable:
            raise CheckpointError(f"{self.name}: rows of a {len(self.shape)}-D or row-permuted tensor cannot be "
                                  "read alone")
        rows = self.shape[0]
        start, stop = max(0, start), min(stop, rows)
        if self.raw.ndim == 2:  # block types: one row of blocks per weight row
            part = self.raw[start:stop]
        else:  # F32/F16/BF16: flat bytes
            per = self.raw.shape[0] // rows
            part = self.raw[start * per: stop * per]
        return dataclasses.replace(self, shape=(stop - start, self.shape[1]), raw=part).dequantize(torch.float32)

    def _check_finite(self, t: torch.Tensor, what: str) -> None:
        # A NaN or inf anywhere makes the sum non-finite; the sum is one fast reduction (torch.isfinite over
        # the whole tensor costs ~15x more). A float32 overflow of the sum is the only false alarm: recount.
        if bool(torch.isfinite(t.sum())):
            return
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise CheckpointError(f"{self.source}: tensor {self.name!r} ({self.qtype}) has {bad} non-finite {what} "
                                  "(NaN or inf): the file is corrupt")

    def q4_blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q4_0/Q4_1/Q4_K as (codes uint8 (N, K) in 0..15, scales float32 (N, K/32), mins float32 (N, K/32)).

        value = code * scale + min for every group of 32 (Q4_0: min = -8 * scale; Q4_K: each 32-value
        sub-block of a 256-value super-block has scale d * sc and min -dmin * m, sc and m six bits).
        """
        if self.qtype not in Q4_TYPES:
            raise CheckpointError(f"{self.name}: q4_blocks needs {'/'.join(Q4_TYPES)}, not {self.qtype}")
        rows, cols = self.shape
        if self.qtype == "Q4_K":
            d, m, codes = _q4_k_groups(_u8(self.raw).reshape(rows, cols // 256, 144))
            d, m, codes = d.reshape(rows, cols // 32), m.reshape(rows, cols // 32), codes.reshape(rows, cols)
        else:
            blocks = _u8(self.raw).reshape(rows, cols // 32, -1)
            d = blocks[..., :2].contiguous().view(torch.float16).float().squeeze(-1)
            if self.qtype == "Q4_0":
                m = -8.0 * d
                qs = blocks[..., 2:]
            else:
                m = blocks[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1)
                qs = blocks[..., 4:]
            codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(rows, cols)
        self._check_finite(d, "scales")
        self._check_finite(m, "minimums")
        if self.permute_heads:
            codes = _unpermute_rows(codes, self.permute_heads)
            d = _unpermute_rows(d, self.permute_heads)
            m = _unpermute_rows(m, self.permute_heads)
        return codes.contiguous(), d.contiguous(), m.contiguous()



def _q4_k_groups(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K super-blocks (..., 144 bytes) -> per-32 scales (..., 8), mins (..., 8), codes (..., 256).

    Layout (llama.cpp's block_q4_K): d, dmin float16; 12 bytes holding 8 six-bit scales and 8 six-bit mins
    (bytes 0-3: scales 0-3 in the low 6 bits, 4-7: mins 0-3 likewise, the top 2 bits of both hold bits 4-5
    of scales/mins 4-7; bytes 8-11: their low nibbles, scale low, min high); then 128 bytes of codes: 32
    bytes per 64 values, the low nibbles the first 32 (sub-block 2j), the high nibbles the next (2j + 1).
    value = d * scale * code - dmin * min.
    """
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()
    dmin = blocks[..., 2:4].contiguous().view(torch.float16).float()
    sb = blocks[..., 4:16].to(torch.int32)
    lo_sc, lo_m, nib = sb[..., 0:4], sb[..., 4:8], sb[..., 8:12]
    sc = torch.cat([lo_sc & 63, (nib & 0xF) | ((lo_sc >> 6) << 4)], dim=-1)
    mn = torch.cat([lo_m & 63, (nib >> 4) | ((lo_m >> 6) << 4)], dim=-1)
    qs = blocks[..., 16:144].reshape(*blocks.shape[:-1], 4, 32)
    codes = torch.stack([qs & 0x0F, qs >> 4], dim=-2).reshape(*blocks.shape[:-1], 256)
    return d * sc.float(), -(dmin * mn.float()), codes


def _u8(raw: np.ndarray) -> torch.Tensor:
    """A uint8 torch view of a (read-only, memory-mapped) numpy array; callers never write to it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8))


def _dequantize(raw: np.ndarray, qtype: str, shape: tuple[int, ...],
                check: Callable[[torch.Tensor, str], None] = lambda t, what: None) -> torch.Tensor:
    """float32 values of `raw`; `check(tensor, what)` sees what decides finiteness: the float16 scales (and
    mins) of Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 blocks, whose codes are small integers, else the values themselves."""
    n = int(np.prod(shape))
    if qtype in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        blocks = _u8(raw).reshape(n // 32, -1)
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        check(d, "scales")
        out = torch.empty(n // 32, 32, dtype=torch.float32)
        if qtype == "Q8_0":
            out.copy_(blocks[:, 2:].view(torch.int8))
            return out.mul_(d).reshape(shape)
        offset = 2 if qtype in ("Q4_0", "Q5_0") else 4  # Q4_1/Q5_1 store a float16 minimum after the scale
        if qtype in ("Q5_0", "Q5_1"):
            # 4 bytes of fifth bits (bit j of the little-endian word belongs to value j), then the nibbles
            qh = blocks[:, offset:offset + 4]
            high = ((qh.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1, 32) << 4
            qs = blocks[:, offset + 4:]
        else:
            high, qs = None, blocks[:, offset:]
        out[:, :16].copy_(qs & 0x0F)
        out[:, 16:].copy_(qs >> 4)
        if high is not None:
            out.add_(high)
        if qtype in ("Q4_0", "Q5_0"):
            return out.sub_(8.0 if qtype == "Q4_0" else 16.0).mul_(d).reshape(shape)
        m = blocks[:, 2:4].contiguous().view(torch.float16).float()
        check(m, "minimums")
        return out.mul_(d).add_(m).reshape(shape)
    if qtype == "F32":
        t = torch.from_numpy(np.ascontiguousarray(raw).view(np.float32).reshape(shape).copy())
    elif qtype == "F16":
        t = torch.from_numpy(np.ascontiguousarray(raw).view(np.float16).reshape(shape).astype(np.float32))
    elif qtype == "BF16":
        bits = torch.from_numpy(np.ascontiguousarray(raw).view(np.int16).reshape(shape).copy())
        t = bits.view(torch.bfloat16).float()
    else:  # K-quants: the gguf package's reference dequantizers
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        out = dequantize(np.asarray(raw), GGMLQuantizationType[qtype])
        t = torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32).reshape(shape))
    check(t, "values")
    return t


class GGUFFile:
    """A parsed, validated GGUF file: `.metadata` (plain Python values) and tensors with HF names.

    The header is checked by `gguf_header.parse_header` before anything else is read; the data
    section is memory-mapped and sliced per tensor.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = file_size(self.path, CheckpointError, "GGUF file")
        try:
            with open(self.path, "rb") as f:
                magic = f.read(4)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read GGUF file: {exc.strerror or exc}") from None
        if magic != b"GGUF":
            raise CheckpointError(f"{self.path}: not a GGUF file (bad magic {magic!r}, expected b'GGUF')")
        if size < 24:
            raise CheckpointError(f"{self.path}: truncated GGUF file ({size} bytes)")
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        header = parse_header(memoryview(self._data), self.path)
        self.metadata: dict[str, Any] = header.metadata
        self.value_types = header.value_types
        self._infos = header.tensors

    def config(self) -> Any:
        """The family's config from the GGUF metadata."""
        meta = GGUFMetadata(self.metadata, source=str(self.path))
        experts = (meta.get("expert_count", int) or 0) > 0
        return family_for_gguf(meta.arch, str(self.path), experts=experts).config_from_gguf(meta, self.tensor_names())

    def tensor_names(self) -> list[str]:
        return [info.name for info in self._infos]

    def tensors(self, config: Any) -> dict[str, GGUFTensor]:
        """All model tensors keyed by HF name (HF orientation: out_features first).

        The header already checked every tensor's byte range (gguf_header); here only the types we can
        dequantize are accepted.
        """
        arch = self.metadata.get("general.architecture")
        family = family_for(config)  # the config's family: a `llama` file with experts is Mixtral's
        out: dict[str, GGUFTensor] = {}
        for info in self._infos:
            name, shape, qtype = info.name, info.shape, info.qtype
            try:
                hf = family.gguf_tensor_name(name)
            except UnsupportedModelError as exc:
                raise UnsupportedModelError(f"{self.path}: {exc}") from None
            if hf is None:
                continue
            if qtype not in SUPPORTED_QTYPES:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} uses quantization {qtype}, "
                    f"which is not supported (supported: {', '.join(SUPPORTED_QTYPES)})"
                )
            raw = self._data[info.offset : info.offset + info.nbytes]
            if "{expert}" in hf:  # experts stacked along the first dimension: one tensor per expert
                if len(shape) != 3:
                    raise CheckpointError(f"{self.path}: tensor {name!r} stacks experts, so it must have 3 "
                                          f"dimensions, but has shape {list(shape)}")
                rows = raw.reshape(shape[0], -1)  # an expert's bytes are contiguous, whatever the type
                for e in range(shape[0]):
                    expert = hf.format(expert=e)
                    part = rows[e] if qtype in ("F32", "F16", "BF16") else rows[e].reshape(shape[1], -1)
                    heads = family.gguf_unpermute_heads(expert, config, arch)
                    out[expert] = GGUFTensor(expert, qtype, shape[1:], part, heads, str(self.path))
                continue
            if qtype not in ("F32", "F16", "BF16"):
                raw = raw.reshape(shape[0] if len(shape) > 1 else 1, -1)
            heads = family.gguf_unpermute_heads(hf, config, arch)
            shift = family.gguf_value_shift(hf, config, arch) if hasattr(family, "gguf_value_shift") else 0.0
            out[hf] = GGUFTensor(hf, qtype, shape, raw, heads, str(self.path), shift)
        return out
