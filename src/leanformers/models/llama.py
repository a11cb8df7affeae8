"""The Llama family: Llama 2/3/3.x, SmolLM/SmolLM2, Mistral, Qwen2/Qwen2.5.

Variants are config switches (see ModelConfig): GQA/MQA via num_key_value_heads, rope scaling
(`linear`, `llama3`), q/k/v (and o) biases, MLP biases, sliding-window attention per layer,
tied or untied lm_head. Parameter names are Hugging Face's, so safetensors load without mapping.

Contract: `model(input_ids, cache=..., cache_position=..., ...) -> logits`; generation never
branches on the architecture.

    GQA with n_heads=6, n_kv_heads=2 (each K/V head serves a group of 3 query heads):
        q: h0 h1 h2 | h3 h4 h5
        k:    k0    |    k1
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..generation.kv_cache import KVCache
from .ops import decode_attention, linear, realized, rowwise


# ---------------------------------------------------------------------------------------- rope
def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in float32, with `linear` or `llama3` scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    )
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are interpolated, short ones kept, the band between blended smoothly
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_medium, blended, scaled)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B, 1, T, D)."""
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        cache_position: torch.Tensor | None,
        kv_len: int | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            qkv = linear(self.qkv_proj, x)
            q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = qkv.split([q_dim, kv_dim, kv_dim], dim=-1)
        else:
            q, k, v = linear(self.q_proj, x), linear(self.k_proj, x), linear(self.v_proj, x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if rowwise(x):
            # compiled CPU step: the new K/V once into buffers. Inlined, their rotary embedding (sin/cos)
            # was recomputed inside the cache update for every cached slot and query (a 4-token
            # verification forward of SmolLM2 took 2.1x a step instead of ~1.2x)
            q, k, v = realized(q), realized(k), realized(v)
        if cache is not None:
            k, v = cache.update(self.layer_idx, cache_position, k, v)  # (B, n_kv_heads, S, head_dim)
            if kv_len is not None:
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        if mask is not None and rowwise(x):  # compiled CPU decode step or verification (few rows)
            out = decode_attention(q, k, v, mask)
        elif mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=self.n_kv_heads != self.n_heads)
        elif T == 1 and q.dtype == torch.bfloat16 and q.device.type == "cpu":
            # torch's CPU flash kernel takes ~1 us per key for ONE bfloat16 query (5x float32's time,
            # measured torch 2.13, S = 64..2000): upcasting k/v is cheaper (speeds up bf16 and int4 decoding)
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                 enable_gqa=self.n_kv_heads != self.n_heads).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
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

    def forward(self, x, cos, sin, mask, cache, cache_position, kv_len):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_position, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        # normal_ on the meta device (nn.Embedding's own init) imports torch._dynamo: ~1.2 s per load
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if weight.device.type != "meta":
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM with HF parameter names (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.windows = sorted({layer.window for layer in self.model.layers}, key=lambda w: (w is not None, w or 0))
        # [finetune] contract flag: recompute each layer in backward instead of keeping its activations
        self.gradient_checkpointing = False

    # -------------------------------------------------------------------------------- cache
    def make_cache(self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None) -> KVCache:
        """A static KV cache for `batch_size` rows of up to `max_len` tokens."""
        p = self.model.embed_tokens.weight
        c = self.config
        return KVCache(
            c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim,
            dtype=dtype or _activation_dtype(self), device=p.device,
        )

    # -------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        cache_position: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for `input_ids` (B, T); the last `logits_to_keep` positions if > 0.

        cache / cache_position (T,): write this chunk's K/V into cache slots `cache_position` and attend
        over all slots up to them. position_ids (B, T): rotary positions (default: the slots).
        attention_mask (B, S): 1 for real tokens, 0 for padding, over cache slots (or the T tokens).
        Without a cache, equal positive values mark one sequence of a packed row (segment ids).
        """
        x = self.hidden_states(input_ids, cache=cache, cache_position=cache_position, position_ids=position_ids,
                               attention_mask=attention_mask)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.logits(x)

    # [finetune] contract split: forward = logits(hidden_states(...)), so training can compute a chunked
    # cross-entropy without materializing full-vocabulary logits for every position
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head: (B, T, hidden) after the final norm -> (B, T, vocab)."""
        return linear(self.lm_head, hidden)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        cache_position: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, hidden) after the final norm; arguments as in forward()."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D (batch, seq), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        device = input_ids.device
        if cache is not None and cache_position is None:
            raise ValueError("cache_position is required when a cache is given")
        if cache_position is None:
            slots = torch.arange(T, device=device)
        else:
            slots = cache_position
        if position_ids is None:
            position_ids = slots.unsqueeze(0).expand(B, T)
        kv_len = None
        if cache is not None and not torch.compiler.is_compiling():
            kv_len = int(slots[-1]) + 1  # eager: attend over the filled prefix only
        n_keys = kv_len if kv_len is not None else (cache.max_len if cache is not None else T)
        masks = {w: self._mask(slots, n_keys, w, attention_mask, B, T, cache is not None) for w in self.windows}

        x = self.model.embed_tokens(input_ids)
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq  # (B, T, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # (B, 1, T, head_dim)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()  # [finetune]
        for layer in self.model.layers:
            if recompute:
                x = checkpoint(layer, x, cos, sin, masks[layer.window], cache, slots, kv_len, use_reentrant=False)
            else:
                x = layer(x, cos, sin, masks[layer.window], cache, slots, kv_len)
        return self.model.norm(x)

    @staticmethod
    def _mask(slots, n_keys, window, attention_mask, B, T, cached):
        """Boolean attention mask (B or 1, 1, T, n_keys), or None when plain causal attention will do."""
        if not cached and window is None and attention_mask is None:
            return None
        key = torch.arange(n_keys, device=slots.device)
        q = slots.unsqueeze(-1)  # (T, 1)
        allowed = key <= q  # (T, S)
        if window is not None:
            allowed = allowed & (key > q - window)
        allowed = allowed.unsqueeze(0)  # (1, T, S)
        if attention_mask is not None and not cached:  # [finetune] segment ids: packed rows, padding = 0
            keys = attention_mask[:, None, :n_keys]  # (B, 1, S)
            allowed = allowed & (keys == attention_mask[:, :, None]) & (keys != 0)  # (B, T, S)
            allowed = allowed | (key == q)  # padding queries attend to themselves: finite, ignored
        elif attention_mask is not None:
            allowed = allowed & attention_mask[:, None, :n_keys].bool()
            allowed = allowed | (key == q)  # padding queries attend to themselves: finite, ignored
        return allowed.unsqueeze(1)

    # -------------------------------------------------------------------------------- speed
    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Concatenate q/k/v and gate/up weights into single linears (fewer, larger matmuls)."""
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if attn.qkv_proj is None and all(type(m) is nn.Linear for m in (attn.q_proj, attn.k_proj, attn.v_proj)):
                attn.qkv_proj = _concat_linears([attn.q_proj, attn.k_proj, attn.v_proj])
                del attn.q_proj, attn.k_proj, attn.v_proj
                attn.q_proj = attn.k_proj = attn.v_proj = None
            if mlp.gate_up_proj is None and all(type(m) is nn.Linear for m in (mlp.gate_proj, mlp.up_proj)):
                mlp.gate_up_proj = _concat_linears([mlp.gate_proj, mlp.up_proj])
                del mlp.gate_proj, mlp.up_proj
                mlp.gate_proj = mlp.up_proj = None


def _concat_linears(linears: list[nn.Linear]) -> nn.Linear:
    w = torch.cat([m.weight for m in linears], dim=0)
    has_bias = linears[0].bias is not None
    fused = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(w, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([m.bias for m in linears]), requires_grad=False)
    return fused


def _activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations flow in: the norm weights' dtype (quantized linears keep float norms)."""
    return model.model.norm.weight.dtype


def build(config: ModelConfig) -> LlamaForCausalLM:
    """An uninitialized model; call under `torch.device('meta')` and assign weights afterwards."""
    return LlamaForCausalLM(config)
