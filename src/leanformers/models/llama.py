"""The Llama family: Llama 2/3/3.x, SmolLM/SmolLM2, Mistral, Qwen2/Qwen2.5, Qwen3.

Variants are config switches (see ModelConfig): GQA/MQA via num_key_value_heads, rope scaling
(`linear`, `llama3`), q/k/v (and o) biases, MLP biases, sliding-window attention per layer, an RMSNorm
over each query and key head before the rotary embedding (Qwen3: `q_norm`/`k_norm`), tied or untied
lm_head. Parameter names are Hugging Face's, so safetensors load without mapping. Qwen3 is a switch here,
not a file of its own: it is this file's layers plus two per-head norms, and shares every table (HF and
GGUF names, rope, windows) with Qwen2.

    GQA with n_heads=6, n_kv_heads=2 (each K/V head serves a group of 3 query heads):
        q: h0 h1 h2 | h3 h4 h5
        k:    k0    |    k1
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch import nn

from ..checkpoint.gguf_meta import GGUFMetadata
from ..config import ModelConfig
from ..errors import ConfigError, UnsupportedModelError
from .base import DecoderModel
from .cache import KVCache, KVLayout
from .ops import RMSNorm, apply_rope, attend, linear, realized, rope_cos_sin, rope_inv_freq, rowwise, silu_mul


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, q_dim, kv_dim = config.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(h, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, h, bias=config.o_bias)
        self.qkv_proj: nn.Module | None = None  # set by fuse_projections()
        if config.qk_norm:  # Qwen3: RMSNorm over each head's head_dim features, before rope
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None, positions: torch.Tensor, kv_len: int | None) -> torch.Tensor:
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = linear(self.qkv_proj, x).split([q_dim, kv_dim, kv_dim], dim=-1)
        else:
            q, k, v = linear(self.q_proj, x), linear(self.k_proj, x), linear(self.v_proj, x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if rowwise(x):
            # compiled CPU step: the new K/V once into buffers (inlined, their rotary embedding was
            # recomputed inside the cache update for every cached slot and query)
            q, k, v = realized(q), realized(k), realized(v)
        if cache is not None:
            k, v = cache.update(self.layer_idx, positions, k, v)  # (B, n_kv_heads, S, head_dim)
            if kv_len is not None:
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        out = attend(q, k, v, mask)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return linear(self.o_proj, out)


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)); `intermediate_size` overrides the config's (mixture-of-experts experts)."""

    def __init__(self, config: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        h, i = config.hidden_size, intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=config.mlp_bias)
        self.gate_up_proj: nn.Module | None = None  # set by fuse_projections()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = linear(self.gate_up_proj, x).chunk(2, dim=-1)
        else:
            gate, up = linear(self.gate_proj, x), linear(self.up_proj, x)
        return linear(self.down_proj, silu_mul(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, mlp: nn.Module | None = None):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = mlp if mlp is not None else MLP(config)  # another family's feed-forward (models/moe.py)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.window = config.layer_window(layer_idx)

    def forward(self, x, cos, sin, mask, cache, positions, kv_len):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, positions, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, make_mlp: Callable[[int], nn.Module] | None = None):
        super().__init__()
        # normal_ on the meta device (nn.Embedding's own init) imports torch._dynamo: keep it off meta
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if weight.device.type != "meta":
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(config, i, make_mlp(i) if make_mlp else None)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(DecoderModel):
    """Decoder-only LM with HF parameter names (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`).

    make_mlp(layer_idx): the feed-forward module of each layer, for a family that is this stack with another
    feed-forward (models/moe.py); default: the gated MLP.
    """

    def __init__(self, config: ModelConfig, make_mlp: Callable[[int], nn.Module] | None = None):
        super().__init__(config)
        self.model = LlamaModel(config, make_mlp)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling),
                             persistent=False)
        self.windows = sorted({layer.window for layer in self.model.layers}, key=lambda w: (w is not None, w or 0))

    # -------------------------------------------------------------------------------- contract
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
        positions, kv_len, masks = self.attention_masks(input_ids, cache, positions, attention_mask, self.windows)

        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        for layer in self.model.layers:
            x = self.run_layer(layer, x, cos, sin, masks[layer.window], cache, positions, kv_len)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(self.lm_head, hidden)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Concatenate q/k/v and gate/up weights into single linears (fewer, larger matmuls)."""
        changed = False
        for layer in self.model.layers:
            changed |= fuse_attention(layer.self_attn)
            if isinstance(layer.mlp, MLP):
                changed |= fuse_mlp(layer.mlp)
        if changed:
            self.structure_version += 1

    def fused_projections(self) -> list[str]:
        """The q/k/v and gate/up concatenations fuse_projections() made (not checkpoint tensors)."""
        return [name for name, mod in self.named_modules() if name.endswith((".qkv_proj", ".gate_up_proj"))]


def fuse_attention(attn: Attention) -> bool:
    """q/k/v into one `qkv_proj` (plain float linears only: quantized or LoRA-wrapped ones stay); True if fused."""
    if attn.qkv_proj is None and all(type(m) is nn.Linear for m in (attn.q_proj, attn.k_proj, attn.v_proj)):
        attn.qkv_proj = _concat_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        attn.q_proj = attn.k_proj = attn.v_proj = None
        return True
    return False


def fuse_mlp(mlp: MLP) -> bool:
    """gate/up into one `gate_up_proj` (plain float linears only); True if fused."""
    if mlp.gate_up_proj is None and all(type(m) is nn.Linear for m in (mlp.gate_proj, mlp.up_proj)):
        mlp.gate_up_proj = _concat_linears([mlp.gate_proj, mlp.up_proj])
        mlp.gate_proj = mlp.up_proj = None
        return True
    return False


def _concat_linears(linears: list[nn.Linear]) -> nn.Linear:
    w = torch.cat([m.weight for m in linears], dim=0)
    has_bias = linears[0].bias is not None
    fused = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(w, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([m.bias for m in linears]), requires_grad=False)
    return fused


# ---------------------------------------------------------------------------------------- the family's hooks
def build(config: ModelConfig) -> LlamaForCausalLM:
    """An uninitialized model; call under `torch.device('meta')` and assign weights afterwards."""
    return LlamaForCausalLM(config)


def config_from_dict(data: dict[str, Any], source: str) -> ModelConfig:
    return ModelConfig.from_dict(data, source=source)


_LAYER = re.compile(r"^model\.layers\.(\d{1,9})\.")


def layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes that vocab, hidden, heads, head_dim and intermediate sizes imply (checked before building)."""
    shapes = {
        "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
        "model.layers.0.self_attn.q_proj.weight": (c.num_attention_heads * c.head_dim, c.hidden_size),
        "model.layers.0.self_attn.k_proj.weight": (c.num_key_value_heads * c.head_dim, c.hidden_size),
        "model.layers.0.mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    return shapes


# GGUF (llama.cpp) names: blk.N.<layer name> and the global tensors
GGUF_LAYER_NAMES = {
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
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}  # arch -> model_type
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_tensor_name(name: str) -> str | None:
    """llama.cpp's tensor name -> the HF parameter name; None for tensors this family does not use."""
    if name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[name]
    m = _GGUF_BLOCK.match(name)
    if m and m.group(2) in GGUF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{GGUF_LAYER_NAMES[m.group(2)]}"
    if name == "rope_freqs.weight":  # llama3 rope scaling stored as a tensor
        raise UnsupportedModelError("GGUF rope_freqs tensors (llama3 rope scaling) are not supported")
    return None


def gguf_unpermute_heads(hf_name: str, config: ModelConfig, arch: str) -> int | None:
    """llama.cpp permutes the q/k rows of the `llama` (and `mistral`) architectures for its rope layout."""
    if arch not in ("llama", "mistral"):
        return None
    if ".q_proj." in hf_name:
        return config.num_attention_heads
    if ".k_proj." in hf_name:
        return config.num_key_value_heads
    return None


def config_from_gguf(meta: GGUFMetadata, tensor_names: list[str]) -> Any:
    """A ModelConfig from llama.cpp's metadata keys (a `llama` file with experts is Mixtral: see the registry)."""
    return ModelConfig.from_dict(config_from_gguf_dict(meta, tensor_names), source=meta.source)


def config_from_gguf_dict(meta: GGUFMetadata, tensor_names: list[str]) -> dict[str, Any]:
    """config.json keys from llama.cpp's metadata keys of a Llama-shaped architecture."""
    get, source = meta.get, meta.source
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
        raise ConfigError(f"{source}: GGUF metadata '{meta.arch}.rope.dimension_count' is {rope_dims}, but the head "
                          f"dimension is {head_dim} (partial rotary embeddings are not supported)")
    scaling = None
    scaling_type = get("rope.scaling.type", str)
    if scaling_type not in (None, "none"):
        scaling = {"rope_type": scaling_type, "factor": get("rope.scaling.factor", float)}
    data: dict[str, Any] = {
        "model_type": GGUF_MODEL_TYPES.get(meta.arch, meta.arch),
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
    return data


def describe(config: ModelConfig) -> dict[str, str]:
    """`leanformers info`: the attention line names the per-head q/k norms (Qwen3) and biases (Qwen2)."""
    c = config
    extras = [name for name, on in (("q/k norm", c.qk_norm), ("q/k/v bias", c.qkv_bias)) if on]
    if c.sliding_window:
        windows = {c.layer_window(i) for i in range(c.num_hidden_layers)}
        extras.append(f"sliding window {c.sliding_window}" + ("" if None not in windows else " (some layers)"))
    text = f"{c.num_attention_heads} heads, {c.num_key_value_heads} kv heads, head_dim {c.head_dim}"
    return {"attention": ", ".join([text, *extras])}
