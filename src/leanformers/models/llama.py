"""The Llama family: Llama 2/3/3.x, SmolLM/SmolLM2, Mistral, Qwen2/Qwen2.5.

Variants are config switches (see ModelConfig): GQA/MQA via num_key_value_heads, rope scaling
(`linear`, `llama3`), q/k/v (and o) biases, MLP biases, sliding-window attention per layer, tied or
untied lm_head. Parameter names are Hugging Face's, so safetensors load without mapping.

    GQA with n_heads=6, n_kv_heads=2 (each K/V head serves a group of 3 query heads):
        q: h0 h1 h2 | h3 h4 h5
        k:    k0    |    k1
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .base import DecoderModel
from .cache import KVCache, KVLayout
from .ops import RMSNorm, apply_rope, attend, attention_mask, linear, realized, rope_cos_sin, rope_inv_freq, rowwise


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
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=config.mlp_bias)
        self.gate_up_proj: nn.Module | None = None  # set by fuse_projections()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = linear(self.gate_up_proj, x).chunk(2, dim=-1)
        else:
            gate, up = linear(self.gate_proj, x), linear(self.up_proj, x)
        return linear(self.down_proj, F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.window = config.layer_window(layer_idx)

    def forward(self, x, cos, sin, mask, cache, positions, kv_len):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, positions, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        # normal_ on the meta device (nn.Embedding's own init) imports torch._dynamo: keep it off meta
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if weight.device.type != "meta":
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(DecoderModel):
    """Decoder-only LM with HF parameter names (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = LlamaModel(config)
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
        positions = self.check_inputs(input_ids, cache, positions, attention_mask)
        T = input_ids.shape[1]
        kv_len = None
        if cache is not None and not torch.compiler.is_compiling():
            kv_len = int(positions.max()) + 1  # eager: attend over the filled prefix only
        n_keys = T if cache is None else (kv_len if kv_len is not None else cache.max_len)
        segments = attention_mask if cache is None else None
        masks = {w: attention_mask_for(positions, n_keys, w, segments, cache is not None) for w in self.windows}

        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        for layer in self.model.layers:
            args = (x, cos, sin, masks[layer.window], cache, positions, kv_len)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(self.lm_head, hidden)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Concatenate q/k/v and gate/up weights into single linears (fewer, larger matmuls)."""
        changed = False
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if attn.qkv_proj is None and all(type(m) is nn.Linear for m in (attn.q_proj, attn.k_proj, attn.v_proj)):
                attn.qkv_proj = _concat_linears([attn.q_proj, attn.k_proj, attn.v_proj])
                attn.q_proj = attn.k_proj = attn.v_proj = None
                changed = True
            if mlp.gate_up_proj is None and all(type(m) is nn.Linear for m in (mlp.gate_proj, mlp.up_proj)):
                mlp.gate_up_proj = _concat_linears([mlp.gate_proj, mlp.up_proj])
                mlp.gate_proj = mlp.up_proj = None
                changed = True
        if changed:
            self.structure_version += 1


def attention_mask_for(positions, n_keys, window, segments, cached):
    """The layer masks: shared across layers with the same window."""
    if segments is not None and bool((segments == 1).all()):
        segments = None  # an all-ones padding mask changes nothing
    return attention_mask(positions, n_keys, window=window, segments=segments, cached=cached)


def _concat_linears(linears: list[nn.Linear]) -> nn.Linear:
    w = torch.cat([m.weight for m in linears], dim=0)
    has_bias = linears[0].bias is not None
    fused = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(w, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([m.bias for m in linears]), requires_grad=False)
    return fused


def build(config: ModelConfig) -> LlamaForCausalLM:
    """An uninitialized model; call under `torch.device('meta')` and assign weights afterwards."""
    return LlamaForCausalLM(config)
