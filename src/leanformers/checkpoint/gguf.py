"""GGUF files (llama.cpp): metadata, config and tensors with HF names.

Tensors are read through the `gguf` package's memory-mapped reader and dequantized on demand
(F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K). llama.cpp stores the q/k projections of the
`llama` architecture with rows permuted for its rotary layout; that permutation is undone here.
Q4_0/Q4_1 blocks can also be handed out raw (`GGUFTensor.q4_blocks`) for the int4 kernels.
"""

from __future__ import annotations

import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError, UnsupportedModelError

SUPPORTED_QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")

# GGUF architecture -> HF model_type
ARCH_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_tensor_name(gguf_name: str) -> str | None:
    """Map a GGUF tensor name to the HF parameter name; None for tensors we don't use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


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
            t = _dequantize(self.raw, self.qtype, self.shape)
        except (ValueError, IndexError, TypeError) as exc:
            raise CheckpointError(f"{self.source}: tensor {self.name!r} ({self.qtype}) is corrupt: {exc}") from None
        if self.permute_heads:
            t = _unpermute_rows(t, self.permute_heads)
        return t.to(dtype).contiguous()

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


def _dequantize(raw: np.ndarray, qtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape))
    if qtype == "F32":
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.float32).reshape(shape).copy())
    if qtype == "F16":
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16).reshape(shape).astype(np.float32))
    if qtype == "BF16":
        bits = torch.from_numpy(np.ascontiguousarray(raw).view(np.int16).reshape(shape).copy())
        return bits.view(torch.bfloat16).float()
    if qtype in ("Q8_0", "Q4_0", "Q4_1"):
        blocks = _u8(raw).reshape(n // 32, -1)
        d = blocks[:, :2].contiguous().view(torch.float16).float()
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
        return out.mul_(d).add_(m).reshape(shape)
    # K-quants: the gguf package's reference dequantizers
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    out = dequantize(np.asarray(raw), GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32).reshape(shape))


# GGML tensor type ids (ggml.h) -> names; only SUPPORTED_QTYPES can be loaded, the rest are named in errors.
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
    27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
# GGUF metadata value types -> struct format (8: string, 9: array are handled separately)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}


class _Truncated(Exception):
    pass


class _Cursor:
    """Sequential little-endian reads over the file's bytes."""

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Truncated
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise _Truncated
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in _NUMPY:
                dt = np.dtype(_NUMPY[item_type])
                end = self.pos + count * dt.itemsize
                if end > len(self.buf):
                    raise _Truncated
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos = end
                return arr.tolist()
            return [self.value(item_type) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")


class GGUFFile:
    """A parsed GGUF file: `.metadata` (plain Python values) and tensors with HF names.

    Layout: magic 'GGUF', version, tensor count, metadata count, metadata key/values, tensor infos
    (name, dims, type, offset), then the aligned data block, memory-mapped here.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: GGUF file not found")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise CheckpointError(f"{self.path}: not a GGUF file (bad magic {magic!r}, expected b'GGUF')")
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        try:
            self._parse(memoryview(self._data))
        except _Truncated:
            raise CheckpointError(f"{self.path}: truncated GGUF file (header ends early)") from None
        except (ValueError, struct.error, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{self.path}: corrupt GGUF file: {exc}") from None

    def _parse(self, buf: memoryview) -> None:
        cur = _Cursor(buf)
        cur.pos = 4
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version} (expected 2 or 3)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise ValueError(f"implausible counts ({n_tensors} tensors, {n_kv} metadata entries)")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            if n_dims > 4:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
            dims = [cur.unpack("<Q") for _ in range(n_dims)]
            ggml_type, offset = cur.unpack("<I"), cur.unpack("<Q")
            infos.append((name, dims, GGML_TYPES.get(ggml_type, f"type {ggml_type}"), offset))
        alignment = int(self.metadata.get("general.alignment", 32))
        start = -(-cur.pos // alignment) * alignment
        self._infos = [(name, tuple(reversed(dims)), qtype, start + off) for name, dims, qtype, off in infos]

    def config(self) -> ModelConfig:
        """ModelConfig from the GGUF metadata."""
        return config_from_gguf_metadata(self.metadata, self.tensor_names(), source=str(self.path))

    def tensor_names(self) -> list[str]:
        return [info[0] for info in self._infos]

    def tensors(self, config: ModelConfig) -> dict[str, GGUFTensor]:
        """All model tensors keyed by HF name (HF orientation: out_features first), checked against the file."""
        arch = self.metadata.get("general.architecture")
        out: dict[str, GGUFTensor] = {}
        for name, shape, qtype, offset in self._infos:
            hf = hf_tensor_name(name)
            if hf is None:
                if name == "rope_freqs.weight":
                    raise UnsupportedModelError(f"{self.path}: GGUF rope_freqs tensors are not supported")
                continue
            if qtype not in SUPPORTED_QTYPES:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} uses quantization {qtype}, "
                    f"which is not supported (supported: {', '.join(SUPPORTED_QTYPES)})"
                )
            numel = int(np.prod(shape))
            per_block = _BLOCK_BYTES.get(qtype, (1, 0))[0]
            if shape and shape[-1] % per_block:
                raise CheckpointError(f"{self.path}: tensor {name!r} row length {shape[-1]} is not a multiple of the {qtype} block")
            nbytes = _nbytes(qtype, numel)
            if offset + nbytes > len(self._data):
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} is truncated (needs bytes {offset}..{offset + nbytes}, "
                    f"file has {len(self._data)})"
                )
            raw = self._data[offset : offset + nbytes]
            if qtype in _BLOCK_BYTES:
                raw = raw.reshape(shape[0] if len(shape) > 1 else 1, -1)
            heads = None
            if arch in ("llama", "mistral"):
                if hf.endswith("q_proj.weight") or hf.endswith("q_proj.bias"):
                    heads = config.num_attention_heads
                elif hf.endswith("k_proj.weight") or hf.endswith("k_proj.bias"):
                    heads = config.num_key_value_heads
            out[hf] = GGUFTensor(hf, qtype, shape, raw, heads, str(self.path))
        return out


_BLOCK_BYTES = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
_ELEM_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


def _nbytes(qtype: str, n: int) -> int:
    if qtype in _ELEM_BYTES:
        return n * _ELEM_BYTES[qtype]
    per, size = _BLOCK_BYTES[qtype]
    return n // per * size


def config_from_gguf_metadata(meta: dict[str, Any], tensor_names: list[str], *, source: str) -> ModelConfig:
    """Translate llama.cpp metadata keys into a ModelConfig."""
    arch = meta.get("general.architecture")
    if arch is None:
        raise ConfigError(f"{source}: GGUF metadata lacks 'general.architecture'")
    if arch not in ARCH_MODEL_TYPE:
        raise UnsupportedModelError(
            f"{source}: GGUF architecture {arch!r} is not supported (supported: {sorted(ARCH_MODEL_TYPE)})"
        )

    def get(key: str, default: Any = None, *, required: bool = False) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            if required:
                raise ConfigError(f"{source}: GGUF metadata lacks required key {full!r}")
            return default
        return meta[full]

    n_head = int(get("attention.head_count", required=True))
    hidden = int(get("embedding_length", required=True))
    vocab = get("vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ConfigError(f"{source}: GGUF metadata gives no vocab size")
        vocab = len(tokens)
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // n_head
    scaling = None
    scaling_type = get("rope.scaling.type")
    if scaling_type not in (None, "none"):
        scaling = {"rope_type": scaling_type, "factor": get("rope.scaling.factor")}
    data: dict[str, Any] = {
        "model_type": ARCH_MODEL_TYPE[arch],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "num_hidden_layers": int(get("block_count", required=True)),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "head_dim": int(head_dim),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": scaling,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": any(n.endswith("attn_output.bias") for n in tensor_names),
        "sliding_window": get("attention.sliding_window"),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    return ModelConfig.from_dict(data, source=source)
