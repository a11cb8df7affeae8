"""The GPT-2 family (model_type `gpt2`: GPT-2 small to XL, DistilGPT2, and GPT-2-shaped checkpoints).

    tokens -> wte + wpe[position] (learned absolute positions)
    N x [ x = x + c_proj(attention(c_attn(LN_1(x))));  x = x + mlp.c_proj(gelu_new(c_fc(LN_2(x)))) ]
    -> LN_f -> lm_head (tied to wte)

LayerNorm with bias, multi-head attention (no GQA, no rotary embedding), a fused q|k|v projection
(`c_attn`), GELU with the tanh approximation (`gelu_new`; `activation_function` picks another), biases on
every linear. Parameter names are transformers' (`transformer.h.0.attn.c_attn.weight`); its checkpoints
store these projections as `Conv1D` weights, (in, out), and `from_hf_checkpoint` transposes them into
nn.Linear's (out, in) so that quantization, compiled GEMVs and LoRA treat them like any other linear
(`to_hf_checkpoint` transposes back for export). Old checkpoints without the `transformer.` prefix and with
the causal-mask buffers (`attn.bias`, `attn.masked_bias`) load too. GGUF (llama.cpp architecture `gpt2`)
holds the weights as (out, in) already. Refused: cross-attention (`add_cross_attention`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..checkpoint.gguf_meta import GGUFMetadata
from ..config import LIMITS, check_float, check_int, short
from ..errors import ConfigError, UnsupportedModelError
from .base import DecoderModel
from .cache import KVCache, KVLayout
from .encoder_common import ACTIVATIONS
from .ops import attend, linear, realized, rowwise

# the projections transformers keeps as Conv1D (weight (in, out))
CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # the causal mask old checkpoints saved: not weights


@dataclass
class GPT2Config:
    """GPT-2's config.json keys (transformers' names: n_embd, n_layer, n_head, n_positions, n_inner)."""

    model_type: str = "gpt2"
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False  # numerics of float16 training; attention here is float32 already
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    architectures: list[str] | None = None

    def __post_init__(self) -> None:
        if self.model_type != "gpt2":
            raise UnsupportedModelError(f"model_type {short(self.model_type)} is not GPT-2's ('gpt2')")
        for name, limit in (("vocab_size", "vocab_size"), ("n_positions", "max_position_embeddings"),
                            ("n_embd", "hidden_size"), ("n_layer", "num_hidden_layers"),
                            ("n_head", "num_attention_heads")):
            check_int(name, getattr(self, name), LIMITS[limit])
        if self.n_inner is not None:
            check_int("n_inner", self.n_inner, LIMITS["intermediate_size"])
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if not isinstance(self.activation_function, str) or self.activation_function not in ACTIVATIONS:
            raise UnsupportedModelError(f"activation_function {short(self.activation_function)} is not supported "
                                        f"(supported: {sorted(ACTIVATIONS)})")
        check_float("layer_norm_epsilon", self.layer_norm_epsilon, 0.0, 1.0)
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                     "tie_word_embeddings"):
            if type(getattr(self, name)) is not bool:
                raise ConfigError(f"config field {name!r} must be true or false, got {short(getattr(self, name))}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) and name != "pad_token_id" else [value]
            if value is not None and not all(type(i) is int and 0 <= i < self.vocab_size for i in ids):
                raise ConfigError(f"config field {name!r} must be a token id in [0, {self.vocab_size}), "
                                  f"got {short(value)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "GPT2Config":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("add_cross_attention"):
            raise UnsupportedModelError(f"{source}: GPT-2 with cross-attention (add_cross_attention) is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if "n_positions" not in data and "n_ctx" in data:  # the oldest configs
            kwargs["n_positions"] = data["n_ctx"]
        if "torch_dtype" not in kwargs and isinstance(data.get("dtype"), str):
            kwargs["torch_dtype"] = data["dtype"]
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except ConfigError as exc:
            raise type(exc)(f"{source}: {exc}") from None

    # the generic names the layers above read (transformers' GPT2Config maps them the same way)
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_key_value_heads(self) -> int:
        return self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def intermediate_size(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]


class Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.layer_idx, self.n_heads, self.head_dim = layer_idx, config.n_head, config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        scale = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        self.scale = scale / (layer_idx + 1) if config.scale_attn_by_inverse_layer_idx else scale

    def forward(self, x, mask, cache: KVCache | None, positions, kv_len):
        B, T, C = x.shape
        q, k, v = linear(self.c_attn, x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if rowwise(x):  # compiled CPU step: the new K/V once into buffers (see llama.Attention)
            q, k, v = realized(q), realized(k), realized(v)
        if cache is not None:
            k, v = cache.update(self.layer_idx, positions, k, v)  # (B, H, S, D)
            if kv_len is not None:
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        out = attend(q, k, v, mask, scale=self.scale).transpose(1, 2).reshape(B, T, C)
        return linear(self.c_proj, out)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.intermediate_size)
        self.c_proj = nn.Linear(config.intermediate_size, config.n_embd)
        self.act = ACTIVATIONS[config.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.c_proj, self.act(linear(self.c_fc, x)))


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, mask, cache, positions, kv_len):
        x = x + self.attn(self.ln_1(x), mask, cache, positions, kv_len)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        weight = torch.empty(config.vocab_size, config.n_embd)
        if weight.device.type != "meta":  # normal_ on meta imports torch._dynamo (see llama.LlamaModel)
            nn.init.normal_(weight)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd, _weight=weight)
        pos = torch.empty(config.n_positions, config.n_embd)
        if pos.device.type != "meta":
            nn.init.normal_(pos)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd, _weight=pos)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GPT2LMHeadModel(DecoderModel):
    """GPT-2 with HF parameter names (`transformer.h.0.attn.c_attn.weight`, `lm_head.weight` tied to wte)."""

    input_embedding = "transformer.wte"

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.ln_f.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.ln_f.weight.device

    def kv_layout(self) -> KVLayout:
        c = self.config
        return KVLayout(c.n_layer, c.n_head, c.head_dim)

    def hidden_states(self, input_ids: torch.Tensor, *, cache: KVCache | None = None,
                      positions: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        positions, kv_len, masks = self.attention_masks(input_ids, cache, positions, attention_mask)
        mask = masks[None]
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(positions)  # learned absolute positions, row by row
        for block in t.h:
            x = self.run_layer(block, x, mask, cache, positions, kv_len)
        return t.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(self.lm_head, hidden)

    # fuse_projections: nothing to do, c_attn holds q|k|v already


# ---------------------------------------------------------------------------------------- the family's hooks
def build(config: GPT2Config) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(config)


def config_from_dict(data: dict[str, Any], source: str) -> GPT2Config:
    return GPT2Config.from_dict(data, source=source)


_LAYER = re.compile(r"^transformer\.h\.(\d{1,9})\.")


def layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def expected_shapes(c: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Shapes in the model's (nn.Linear) layout: from_hf_checkpoint has transposed the Conv1D weights."""
    shapes = {
        "transformer.wte.weight": (c.vocab_size, c.n_embd),
        "transformer.wpe.weight": (c.n_positions, c.n_embd),
        "transformer.h.0.attn.c_attn.weight": (3 * c.n_embd, c.n_embd),
        "transformer.h.0.mlp.c_fc.weight": (c.intermediate_size, c.n_embd),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.n_embd)
    return shapes


class _Renamed(dict):
    """Tensors under the model's names, keeping the reader's `origin` / `files` for error messages."""

    origin: Any = None
    files: dict[str, Any]


def from_hf_checkpoint(tensors: Mapping[str, Any], config: GPT2Config) -> Mapping[str, Any]:
    """transformers' GPT-2 tensors in this model's layout: the `transformer.` prefix where a checkpoint
    lacks it, the causal-mask buffers dropped, Conv1D weights (in, out) transposed to (out, in)."""
    out = _Renamed()
    out.origin = getattr(tensors, "origin", None)
    files = getattr(tensors, "files", None) or {}
    out.files = {}
    for name, t in tensors.items():
        if name.endswith(_MASK_BUFFERS):
            continue
        new = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        if new.endswith(CONV1D_WEIGHTS) and t.dim() == 2:
            t = t.t().contiguous()
        out[new] = t
        if name in files:
            out.files[new] = files[name]
    return out


def to_hf_checkpoint(state: dict[str, torch.Tensor], config: GPT2Config) -> dict[str, torch.Tensor]:
    """This model's state dict in transformers' layout (Conv1D weights as (in, out))."""
    return {k: (v.t().contiguous() if k.endswith(CONV1D_WEIGHTS) else v) for k, v in state.items()}


GGUF_LAYER_NAMES = {
    "attn_norm.weight": "ln_1.weight", "attn_norm.bias": "ln_1.bias",
    "attn_qkv.weight": "attn.c_attn.weight", "attn_qkv.bias": "attn.c_attn.bias",
    "attn_output.weight": "attn.c_proj.weight", "attn_output.bias": "attn.c_proj.bias",
    "ffn_norm.weight": "ln_2.weight", "ffn_norm.bias": "ln_2.bias",
    "ffn_up.weight": "mlp.c_fc.weight", "ffn_up.bias": "mlp.c_fc.bias",
    "ffn_down.weight": "mlp.c_proj.weight", "ffn_down.bias": "mlp.c_proj.bias",
}
GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_tensor_name(name: str) -> str | None:
    """llama.cpp's GPT-2 tensors (its converter transposed the Conv1D weights: nn.Linear layout)."""
    if name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[name]
    m = _GGUF_BLOCK.match(name)
    if m and m.group(2) in GGUF_LAYER_NAMES:
        return f"transformer.h.{m.group(1)}.{GGUF_LAYER_NAMES[m.group(2)]}"
    return None


def gguf_unpermute_heads(hf_name: str, config: GPT2Config, arch: str) -> int | None:
    return None  # no rotary embedding, no permutation


def config_from_gguf(meta: GGUFMetadata, tensor_names: list[str]) -> GPT2Config:
    get, source = meta.get, meta.source
    vocab = get("vocab_size", int)
    if vocab is None:
        tokens = get("tokenizer.ggml.tokens", list, full=True)
        if tokens is None:
            raise ConfigError(f"{source}: GGUF metadata gives no vocab size")
        vocab = len(tokens)
    hidden = get("embedding_length", int, required=True)
    data: dict[str, Any] = {
        "vocab_size": vocab,
        "n_positions": get("context_length", int, required=True),
        "n_embd": hidden,
        "n_layer": get("block_count", int, required=True),
        "n_head": get("attention.head_count", int, required=True),
        "n_inner": get("feed_forward_length", int),
        "layer_norm_epsilon": get("attention.layer_norm_epsilon", float, 1e-5),
        # llama.cpp ties the head to token_embd when the file has no output.weight
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": get("tokenizer.ggml.bos_token_id", int, full=True),
        "eos_token_id": get("tokenizer.ggml.eos_token_id", int, full=True),
        "pad_token_id": get("tokenizer.ggml.padding_token_id", int, full=True),
    }
    return GPT2Config.from_dict(data, source=source)


def hf_config_dict(config: GPT2Config, dtype: torch.dtype) -> dict[str, Any]:
    out = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("torch_dtype", "architectures")}
    out.update(architectures=["GPT2LMHeadModel"], torch_dtype=str(dtype).removeprefix("torch."),
               attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    return out


def describe(config: GPT2Config) -> dict[str, str]:
    c = config
    return {
        "layers": f"{c.n_layer}, hidden {c.n_embd}, intermediate {c.intermediate_size} ({c.activation_function}), "
                  "LayerNorm",
        "attention": f"{c.n_head} heads, head_dim {c.head_dim}, fused c_attn (Conv1D in the checkpoint)",
        "rope": "none: learned absolute positions (wpe)",
    }
