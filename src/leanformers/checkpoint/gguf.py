"""GGUF files (llama.cpp): metadata, config and tensors with HF names.

The header is parsed and validated by `gguf_header` (every count, length, type and offset checked
against the file); tensors are memory-mapped and dequantized on demand (F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q4_K, Q5_K, Q6_K). What the metadata and tensor names mean is the family's (models/registry.py:
`config_from_gguf`, `gguf_tensor_name`, `gguf_unpermute_heads`); llama.cpp stores some architectures'
q/k projections with rows permuted for its rotary layout, and that permutation is undone here. Q4_0/Q4_1
blocks can also be handed out raw (`GGUFTensor.q4_blocks`) for the int4 kernels.

Non-finite values: as a tensor is dequantized, what decides its finiteness is checked for NaN/inf: the
float16 scales (and mins) of Q8_0/Q4_0/Q4_1 blocks (1/32 of the elements; the codes are small integers),
the values of F32/F16/BF16 and K-quant tensors (one sum over memory just written). So a corrupt scale or
float weight fails with the tensor's name instead of loading a model that outputs NaN.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import CheckpointError, UnsupportedModelError
from ..files import file_size
from ..models.registry import family_for_gguf
from .gguf_header import parse_header
from .gguf_meta import GGUFMetadata

SUPPORTED_QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")

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

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize to a new torch tensor of `dtype` in HF layout."""
        try:
            t = _dequantize(self.raw, self.qtype, self.shape, self._check_finite)
            if self.permute_heads:
                t = _unpermute_rows(t, self.permute_heads)
        except (ValueError, IndexError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{self.source}: tensor {self.name!r} ({self.qtype}) is corrupt: {exc}") from None
        return t.to(dtype).contiguous()

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
        """Q4_0/Q4_1 as (codes uint8 (N, K) in 0..15, scales float32 (N, K/32), mins float32 (N, K/32)).

        value = code * scale + min, exactly (Q4_0: min = -8 * scale).
        """
        if self.qtype not in ("Q4_0", "Q4_1"):
            raise CheckpointError(f"{self.name}: q4_blocks needs Q4_0/Q4_1, not {self.qtype}")
        rows, cols = self.shape
        blocks = _u8(self.raw).reshape(rows, cols // 32, -1)
        if self.qtype == "Q4_0":
            d = blocks[..., :2].contiguous().view(torch.float16).float().squeeze(-1)
            m = -8.0 * d
            qs = blocks[..., 2:]
        else:
            d = blocks[..., :2].contiguous().view(torch.float16).float().squeeze(-1)
            m = blocks[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1)
            qs = blocks[..., 4:]
        self._check_finite(d, "scales")
        self._check_finite(m, "minimums")
        codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(rows, cols)
        if self.permute_heads:
            codes = _unpermute_rows(codes, self.permute_heads)
            d = _unpermute_rows(d, self.permute_heads)
            m = _unpermute_rows(m, self.permute_heads)
        return codes.contiguous(), d.contiguous(), m.contiguous()


def _u8(raw: np.ndarray) -> torch.Tensor:
    """A uint8 torch view of a (read-only, memory-mapped) numpy array; callers never write to it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8))


def _dequantize(raw: np.ndarray, qtype: str, shape: tuple[int, ...],
                check: Callable[[torch.Tensor, str], None] = lambda t, what: None) -> torch.Tensor:
    """float32 values of `raw`; `check(tensor, what)` sees what decides finiteness: the float16 scales (and
    mins) of Q8_0/Q4_0/Q4_1 blocks, whose codes are small integers, else the values themselves."""
    n = int(np.prod(shape))
    if qtype in ("Q8_0", "Q4_0", "Q4_1"):
        blocks = _u8(raw).reshape(n // 32, -1)
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        check(d, "scales")
        out = torch.empty(n // 32, 32, dtype=torch.float32)
        if qtype == "Q8_0":
            out.copy_(blocks[:, 2:].view(torch.int8))
            return out.mul_(d).reshape(shape)
        qs = blocks[:, 2:] if qtype == "Q4_0" else blocks[:, 4:]
        out[:, :16].copy_(qs & 0x0F)
        out[:, 16:].copy_(qs >> 4)
        if qtype == "Q4_0":
            return out.sub_(8.0).mul_(d).reshape(shape)
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
        return family_for_gguf(meta.arch, str(self.path)).config_from_gguf(meta, self.tensor_names())

    def tensor_names(self) -> list[str]:
        return [info.name for info in self._infos]

    def tensors(self, config: Any) -> dict[str, GGUFTensor]:
        """All model tensors keyed by HF name (HF orientation: out_features first).

        The header already checked every tensor's byte range (gguf_header); here only the types we can
        dequantize are accepted.
        """
        arch = self.metadata.get("general.architecture")
        family = family_for_gguf(arch, str(self.path))
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
            if qtype not in ("F32", "F16", "BF16"):
                raw = raw.reshape(shape[0] if len(shape) > 1 else 1, -1)
            heads = family.gguf_unpermute_heads(hf, config, arch)
            out[hf] = GGUFTensor(hf, qtype, shape, raw, heads, str(self.path))
        return out
