"""GGUF files (llama.cpp): metadata, config and tensors with HF names.

The header is parsed and validated by `gguf_header` (every count, length, type and offset checked
against the file); tensors are memory-mapped and dequantized on demand (F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q4_K, Q5_K, Q6_K). llama.cpp stores the q/k projections of the `llama` architecture with rows
permuted for its rotary layout; that permutation is undone here. Q4_0/Q4_1 blocks can also be handed
out raw (`GGUFTensor.q4_blocks`) for the int4 kernels.

Non-finite values: as a tensor is dequantized, what decides its finiteness is checked for NaN/inf: the
float16 scales (and mins) of Q8_0/Q4_0/Q4_1 blocks (1/32 of the elements; the codes are small integers),
the values of F32/F16/BF16 and K-quant tensors (one sum over memory just written). So a corrupt scale or
float weight fails with the tensor's name instead of loading a model that outputs NaN.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError, UnsupportedModelError
from ..files import file_size
from .gguf_header import parse_header

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

    def config(self) -> ModelConfig:
        """ModelConfig from the GGUF metadata."""
        return config_from_gguf_metadata(self.metadata, self.tensor_names(), source=str(self.path))

    def tensor_names(self) -> list[str]:
        return [info.name for info in self._infos]

    def tensors(self, config: ModelConfig) -> dict[str, GGUFTensor]:
        """All model tensors keyed by HF name (HF orientation: out_features first).

        The header already checked every tensor's byte range (gguf_header); here only the types we can
        dequantize are accepted.
        """
        arch = self.metadata.get("general.architecture")
        out: dict[str, GGUFTensor] = {}
        for info in self._infos:
            name, shape, qtype = info.name, info.shape, info.qtype
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
            raw = self._data[info.offset : info.offset + info.nbytes]
            if qtype not in ("F32", "F16", "BF16"):
                raw = raw.reshape(shape[0] if len(shape) > 1 else 1, -1)
            heads = None
            if arch in ("llama", "mistral"):
                if hf.endswith("q_proj.weight") or hf.endswith("q_proj.bias"):
                    heads = config.num_attention_heads
                elif hf.endswith("k_proj.weight") or hf.endswith("k_proj.bias"):
                    heads = config.num_key_value_heads
            out[hf] = GGUFTensor(hf, qtype, shape, raw, heads, str(self.path))
        return out


def config_from_gguf_metadata(meta: dict[str, Any], tensor_names: list[str], *, source: str) -> ModelConfig:
    """Translate llama.cpp metadata keys into a ModelConfig.

    Every value is type-checked here (an integer key must hold an integer, not a string, float or bool);
    ranges are checked by ModelConfig, against the tensors by loading.check_config_fits_tensors.
    """
    arch = meta.get("general.architecture")
    if arch is None:
        raise ConfigError(f"{source}: GGUF metadata lacks 'general.architecture'")
    if not isinstance(arch, str):
        raise ConfigError(f"{source}: GGUF metadata 'general.architecture' must be a string, got {_kind(arch)}")
    if arch not in ARCH_MODEL_TYPE:
        raise UnsupportedModelError(
            f"{source}: GGUF architecture {arch!r} is not supported (supported: {sorted(ARCH_MODEL_TYPE)})"
        )

    def get(key: str, kind: type, default: Any = None, *, required: bool = False, full: bool = False) -> Any:
        name = key if full else f"{arch}.{key}"
        if name not in meta:
            if required:
                raise ConfigError(f"{source}: GGUF metadata lacks required key {name!r}")
            return default
        value = meta[name]
        if kind is int:
            ok = type(value) is int
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise ConfigError(f"{source}: GGUF metadata {name!r} must be {_KIND_NAMES[kind]}, got {_kind(value)}")
        return value

    n_head = get("attention.head_count", int, required=True)
    hidden = get("embedding_length", int, required=True)
    vocab = get("vocab_size", int)
    if vocab is None:
        tokens = get("tokenizer.ggml.tokens", list, full=True)
        if tokens is None:
            raise ConfigError(f"{source}: GGUF metadata gives no vocab size")
        vocab = len(tokens)
    head_dim = get("attention.key_length", int)
    rope_dims = get("rope.dimension_count", int)
    if head_dim is None:
        head_dim = rope_dims
    if head_dim is None and n_head > 0 and hidden % n_head == 0:
        head_dim = hidden // n_head
    if rope_dims is not None and rope_dims != head_dim:  # llama.cpp refuses these architectures' files likewise
        raise ConfigError(f"{source}: GGUF metadata '{arch}.rope.dimension_count' is {rope_dims}, but the head "
                          f"dimension is {head_dim} (partial rotary embeddings are not supported)")
    scaling = None
    scaling_type = get("rope.scaling.type", str)
    if scaling_type not in (None, "none"):
        scaling = {"rope_type": scaling_type, "factor": get("rope.scaling.factor", float)}
    data: dict[str, Any] = {
        "model_type": ARCH_MODEL_TYPE[arch],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length", int, required=True),
        "num_hidden_layers": get("block_count", int, required=True),
        "num_attention_heads": n_head,
        "num_key_value_heads": get("attention.head_count_kv", int, n_head),
        "head_dim": head_dim,
        "max_position_embeddings": get("context_length", int, 2048),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", float, 1e-5),
        "rope_theta": get("rope.freq_base", float, 10000.0),
        "rope_scaling": scaling,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": any(n.endswith("attn_output.bias") for n in tensor_names),
        "sliding_window": get("attention.sliding_window", int),
        "bos_token_id": get("tokenizer.ggml.bos_token_id", int, full=True),
        "eos_token_id": get("tokenizer.ggml.eos_token_id", int, full=True),
        "pad_token_id": get("tokenizer.ggml.padding_token_id", int, full=True),
    }
    return ModelConfig.from_dict(data, source=source)


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", list: "an array"}


def _kind(value: Any) -> str:
    """How a metadata value reads in an error message: its type and a short repr."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"
