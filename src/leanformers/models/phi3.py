"""The Phi-3 family (model_type `phi3`: Phi-3-mini/medium 4k, and any Phi-3-shaped checkpoint without
long-context rope scaling).

A Llama-shaped decoder whose checkpoints store two projections fused: `self_attn.qkv_proj` (the query,
key and value rows stacked, in that order) and `mlp.gate_up_proj` (gate rows, then up rows):

    x -> RMSNorm -> qkv_proj -> split q | k | v -> rope on the first rotary_dim features of q, k -> attention
      -> o_proj -> + x -> RMSNorm -> gate_up_proj -> down_proj(up * silu(gate)) -> + x

Switches: GQA, a sliding window over every layer (`sliding_window`, 2047 in Phi-3-mini-4k), partial
rotary embeddings (`partial_rotary_factor`: only the first head_dim * factor features of each head
rotate), tied or untied head. Refused with a message naming them: rope scaling `longrope`/`su`/`yarn`
(the 128k-context variants: Phi-3-*-128k, Phi-3.5-mini, Phi-4-mini), whose factors switch with the
sequence length. GGUF (llama.cpp architecture `phi3`): the same fused tensors, `attn_qkv` and `ffn_up`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..checkpoint.gguf_meta import GGUFMetadata
from ..config import ModelConfig, check_float, short
from ..errors import ConfigError, UnsupportedModelError
from .base import DecoderModel
from .cache import KVCache, KVLayout
from .ops import RMSNorm, apply_rope, attend, linear, realized, rope_cos_sin, rope_inv_freq, rowwise, silu_mul

LONG_CONTEXT_ROPE = ("longrope", "su", "yarn")


@dataclass
class Phi3Config(ModelConfig):
    """Phi-3's config.json keys: ModelConfig's plus the rotary fraction and the pre-scaling context."""

    model_types: ClassVar[tuple[str, ...]] = ("phi3",)

    model_type: str = "phi3"
    partial_rotary_factor: float = 1.0
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("partial_rotary_factor", self.partial_rotary_factor, 0.0, 1.0)
        if self.rotary_dim < 2:
            raise ConfigError(f"partial_rotary_factor {self.partial_rotary_factor} leaves no rotary features of "
                              f"head_dim {self.head_dim}")
        if self.original_max_position_embeddings is not None and type(self.original_max_position_embeddings) is not int:
            raise ConfigError("config field 'original_max_position_embeddings' must be an integer, got "
                              f"{short(self.original_max_position_embeddings)}")

    @property
    def rotary_dim(self) -> int:
        """Features of each head that rotate (even), as transformers computes them."""
        return int(self.head_dim * self.partial_rotary_factor) // 2 * 2


class Attention(nn.Module):
    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.rotary_dim = config.rotary_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, q_dim + 2 * kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, positions, kv_len):
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = linear(self.qkv_proj, x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        if rowwise(x):  # compiled CPU step: the new K/V once into buffers (see llama.Attention)
            q, k, v = realized(q), realized(k), realized(v)
        if cache is not None:
            k, v = cache.update(self.layer_idx, positions, k, v)  # (B, n_kv_heads, S, head_dim)
            if kv_len is not None:
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        out = attend(q, k, v, mask).transpose(1, 2).reshape(B, T, q_dim)
        return linear(self.o_proj, out)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rotary_dim == self.head_dim:
            return apply_rope(x, cos, sin)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim:]  # only the first features rotate
        return torch.cat([apply_rope(rot, cos, sin), rest], dim=-1)


class MLP(nn.Module):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(self.gate_up_proj, x).chunk(2, dim=-1)
        return linear(self.down_proj, silu_mul(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, positions, kv_len):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, positions, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class Phi3Model(nn.Module):
    def __init__(self, config: Phi3Config):
        super().__init__()
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if weight.device.type != "meta":  # normal_ on meta imports torch._dynamo (see llama.LlamaModel)
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Phi3ForCausalLM(DecoderModel):
    """Phi-3 with HF parameter names (`model.layers.0.self_attn.qkv_proj.weight`, `lm_head.weight`)."""

    def __init__(self, config: Phi3Config):
        super().__init__(config)
        self.model = Phi3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config.rotary_dim, config.rope_theta), persistent=False)
        self.window = config.sliding_window  # every layer alike

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def kv_layout(self) -> KVLayout:
        c = self.config
        return KVLayout(c.num_hidden_layers, c.num_key_value_heads, c.head_dim)

    def hidden_states(self, input_ids: torch.Tensor, *, cache: KVCache | None = None,
                      positions: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        positions, kv_len, masks = self.attention_masks(input_ids, cache, positions, attention_mask, (self.window,))
        mask = masks[self.window]
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)  # (B, 1, T, rotary_dim)
        for layer in self.model.layers:
            x = self.run_layer(layer, x, cos, sin, mask, cache, positions, kv_len)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(self.lm_head, hidden)

    # fuse_projections: nothing to do, the checkpoint's projections are fused already (qkv_proj, gate_up_proj)


# ---------------------------------------------------------------------------------------- the family's hooks
def build(config: Phi3Config) -> Phi3ForCausalLM:
    return Phi3ForCausalLM(config)


def config_from_dict(data: dict[str, Any], source: str) -> Phi3Config:
    rope = data.get("rope_parameters") if isinstance(data.get("rope_parameters"), dict) else None
    for scaling in (rope, data.get("rope_scaling")):  # either key may carry it (older configs: rope_scaling)
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
        if isinstance(kind, str) and kind.lower() in LONG_CONTEXT_ROPE:
            raise UnsupportedModelError(
                f"{source}: Phi-3 rope scaling {kind!r} (the long-context variants: Phi-3-*-128k, Phi-3.5-mini, "
                "Phi-4-mini) is not supported: its factors switch with the sequence length; the 4k-context "
                "Phi-3 models (no rope_scaling) load")
    data = dict(data)
    if rope is not None and "partial_rotary_factor" in rope:  # transformers 5 keeps it with the rope keys
        data.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
        data["rope_parameters"] = {k: v for k, v in rope.items() if k != "partial_rotary_factor"}
    return Phi3Config.from_dict(data, source=source)


_LAYER = re.compile(r"^model\.layers\.(\d{1,9})\.")


def layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def expected_shapes(c: Phi3Config) -> dict[str, tuple[int, ...]]:
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {
        "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
        "model.layers.0.self_attn.qkv_proj.weight": (q + 2 * kv, c.hidden_size),
        "model.layers.0.self_attn.o_proj.weight": (c.hidden_size, q),
        "model.layers.0.mlp.gate_up_proj.weight": (2 * c.intermediate_size, c.hidden_size),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    return shapes


GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_up.weight": "mlp.gate_up_proj.weight",  # llama.cpp keeps Phi-3's fused gate/up under ffn_up
    "ffn_down.weight": "mlp.down_proj.weight",
}
GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_tensor_name(name: str) -> str | None:
    if name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[name]
    if name in ("rope_factors_long.weight", "rope_factors_short.weight"):
        raise UnsupportedModelError("Phi-3 rope scaling 'longrope' (rope_factors_long/short tensors: a long-context "
                                    "variant) is not supported")
    m = _GGUF_BLOCK.match(name)
    if m and m.group(2) in GGUF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{GGUF_LAYER_NAMES[m.group(2)]}"
    if m and m.group(2).startswith(("attn_q.", "attn_k.", "attn_v.")):
        raise UnsupportedModelError(f"Phi-3 GGUF with separate q/k/v tensors ({name}) is not supported; "
                                    "llama.cpp's converter writes attn_qkv")
    return None


def gguf_unpermute_heads(hf_name: str, config: Phi3Config, arch: str) -> int | None:
    return None  # llama.cpp keeps Phi-3's q/k rows as they are (NEOX rope layout)


def config_from_gguf(meta: GGUFMetadata, tensor_names: list[str]) -> Phi3Config:
    get, source = meta.get, meta.source
    n_head = get("attention.head_count", int, required=True)
    hidden = get("embedding_length", int, required=True)
    vocab = get("vocab_size", int)
    if vocab is None:
        tokens = get("tokenizer.ggml.tokens", list, full=True)
        if tokens is None:
            raise ConfigError(f"{source}: GGUF metadata gives no vocab size")
        vocab = len(tokens)
    if n_head <= 0 or hidden % n_head:
        raise ConfigError(f"{source}: GGUF metadata 'phi3.embedding_length' ({hidden}) is not a multiple of "
                          f"'phi3.attention.head_count' ({n_head})")
    head_dim = hidden // n_head
    rope_dims = get("rope.dimension_count", int, head_dim)
    scaling = get("rope.scaling.type", str)
    if scaling not in (None, "none") or "rope_factors_long.weight" in tensor_names:
        raise meta.unsupported(f"rope scaling {scaling or 'longrope'!r} (a long-context Phi-3 variant)")
    window = get("attention.sliding_window", int)
    data: dict[str, Any] = {
        "model_type": "phi3",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length", int, required=True),
        "num_hidden_layers": get("block_count", int, required=True),
        "num_attention_heads": n_head,
        "num_key_value_heads": get("attention.head_count_kv", int, n_head),
        "max_position_embeddings": get("context_length", int, 4096),
        "original_max_position_embeddings": get("rope.scaling.original_context_length", int),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", float, 1e-5),
        "rope_theta": get("rope.freq_base", float, 10000.0),
        "partial_rotary_factor": rope_dims / head_dim,
        "sliding_window": window or None,  # llama.cpp writes 0 for "none" (Phi-4)
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": get("tokenizer.ggml.bos_token_id", int, full=True),
        "eos_token_id": get("tokenizer.ggml.eos_token_id", int, full=True),
        "pad_token_id": get("tokenizer.ggml.padding_token_id", int, full=True),
    }
    return Phi3Config.from_dict(data, source=source)


def hf_config_dict(config: Phi3Config, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for an exported Phi-3 (what transformers' Phi3Config reads)."""
    return {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "original_max_position_embeddings": config.original_max_position_embeddings or config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "partial_rotary_factor": config.partial_rotary_factor, "sliding_window": config.sliding_window,
        "tie_word_embeddings": config.tie_word_embeddings, "hidden_act": config.hidden_act,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."), "attention_dropout": 0.0, "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
    }


def describe(config: Phi3Config) -> dict[str, str]:
    c = config
    text = f"{c.num_attention_heads} heads, {c.num_key_value_heads} kv heads, head_dim {c.head_dim}, fused qkv_proj"
    if c.sliding_window:
        text += f", sliding window {c.sliding_window}"
    rope = f"theta {c.rope_theta:g}, default"
    if c.rotary_dim != c.head_dim:
        rope += f", partial: {c.rotary_dim} of {c.head_dim} features rotate"
    return {"attention": text, "rope": rope,
            "layers": f"{c.num_hidden_layers}, hidden {c.hidden_size}, intermediate {c.intermediate_size} "
                      "(fused gate_up_proj)"}
