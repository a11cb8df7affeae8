"""The Gemma family: Gemma 2 (`gemma2`) and Gemma 3 text (`gemma3_text`; `gemma3` checkpoints' text model).

Both generations share the layer: RMSNorm scaling by (1 + weight), embeddings multiplied by sqrt(hidden)
(rounded to the activation dtype, as transformers does), a GELU-tanh gated MLP, norms before AND after
attention and MLP, attention scaled by query_pre_attn_scalar^-0.5, and local sliding-window layers
interleaved with global ones. They differ in switches, so one file holds both (as Llama's variants are
switches of llama.py):

    switch                     Gemma 2                        Gemma 3
    q/k RMSNorm per head       no                             yes (`qk_norm`)
    rope bases                 one (rope_theta)               global rope_theta (+ linear scaling),
                                                              local rope_local_base_freq
    layer pattern              sliding, full, sliding, ...    5 sliding then 1 full (sliding_window_pattern)
    soft-capping (tanh)        attention 50, final logits 30  none by default

    one layer:  x = x + post_attention_layernorm(attn(input_layernorm(x)))
                x = x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))

Parameter names are Hugging Face's. GGUF (llama.cpp's `gemma2` / `gemma3`): llama.cpp's converter adds 1
to every norm weight (its RMSNorm multiplies by the weight alone), undone here on load; the layer
pattern, the local rope base and the attention scale are not in the file, llama.cpp fixes them per
architecture, and so does this module.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.gguf_meta import GGUFMetadata
from ..config import check_float, check_int, rope_from_dict, short
from ..errors import ConfigError, UnsupportedModelError
from . import llama
from .base import DecoderModel
from .cache import KVCache, KVLayout
from .ops import RMSNorm, apply_rope, attend, linear, realized, rope_cos_sin, rope_inv_freq, rowwise

SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")  # all the tanh approximation
LAYER_TYPES = ("full_attention", "sliding_attention")

# transformers' class defaults: a config.json may leave any of these out (the older Hub configs of Gemma 3
# multimodal checkpoints give only a few text_config keys).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                   rope_theta=10000.0, sliding_window=4096, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                        rope_theta=1000000.0, rope_local_base_freq=10000.0, sliding_window=4096),
}
_PATTERNS = {"gemma2": 2, "gemma3_text": 6}  # every n-th layer is global (transformers' and llama.cpp's default)
ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


@dataclass
class GemmaConfig:
    """Configuration of a Gemma 2 / Gemma 3 text decoder, keyed like Hugging Face's config.json."""

    model_types: ClassVar[tuple[str, ...]] = ("gemma2", "gemma3_text")

    model_type: str = "gemma3_text"
    vocab_size: int = 262208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int | None = 4
    head_dim: int = 256
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0  # the global layers' base
    rope_scaling: dict[str, Any] | None = None  # the global layers' scaling (Gemma 3: `linear`)
    rope_local_base_freq: float | None = None  # Gemma 3's local layers' base (None: rope_theta)
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    hidden_activation: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: list[str] | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    bos_token_id: int | list[int] | None = 2
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = 0
    torch_dtype: str | None = None
    architectures: list[str] | None = None
    # Derived, not HF keys
    qk_norm: bool = field(default=True, repr=False)  # Gemma 3's per-head q/k RMSNorm
    text_of: str | None = field(default=None, repr=False)  # "gemma3": the text model of a multimodal checkpoint

    def __post_init__(self) -> None:
        if not isinstance(self.model_type, str) or self.model_type not in self.model_types:
            raise UnsupportedModelError(f"model_type {short(self.model_type)} is not one of {list(self.model_types)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "head_dim", "max_position_embeddings"):
            check_int(name, getattr(self, name))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        check_int("num_key_value_heads", self.num_key_value_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        check_float("rms_norm_eps", self.rms_norm_eps, 0.0, 1.0)
        check_float("rope_theta", self.rope_theta, 0.0, 1e12)
        if self.rope_local_base_freq is not None:
            check_float("rope_local_base_freq", self.rope_local_base_freq, 0.0, 1e12)
        check_float("query_pre_attn_scalar", self.query_pre_attn_scalar, 0.0, 1e9)
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            if getattr(self, name) is not None:
                check_float(name, getattr(self, name), 0.0, 1e9)
        for name in ("tie_word_embeddings", "attention_bias"):
            if type(getattr(self, name)) is not bool:
                raise ConfigError(f"config field {name!r} must be true or false, got {short(getattr(self, name))}")
        if self.hidden_activation not in SUPPORTED_ACTIVATIONS:
            raise UnsupportedModelError(f"hidden_activation {short(self.hidden_activation)} is not supported "
                                        f"(supported: {list(SUPPORTED_ACTIVATIONS)})")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            if rope_type != "linear":  # the only scaling Gemma checkpoints use (Gemma 3 4B+: factor 8)
                raise UnsupportedModelError(f"rope scaling {short(rope_type)} is not supported for "
                                            f"{self.model_type} (supported: 'linear')")
        if self.sliding_window is not None:
            check_int("sliding_window", self.sliding_window)
        if self.layer_types is None:
            every = _PATTERNS[self.model_type]
            self.layer_types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                                for i in range(self.num_hidden_layers)]
        if not isinstance(self.layer_types, list) or not all(isinstance(t, str) for t in self.layer_types):
            raise ConfigError(f"layer_types must be a list of strings, got {short(self.layer_types)}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise UnsupportedModelError(f"layer_types {bad} are not supported (supported: {list(LAYER_TYPES)})")
        self.qk_norm = self.model_type == "gemma3_text"
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) and name != "pad_token_id" else [value]
            if value is not None and not all(type(i) is int and 0 <= i < self.vocab_size for i in ids):
                raise ConfigError(f"config field {name!r} must be a token id in [0, {self.vocab_size}), "
                                  f"got {short(value)}")

    # ------------------------------------------------------------------ helpers (read by the layers above)
    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    def layer_window(self, layer_idx: int) -> int | None:
        """Sliding-window size of one layer, or None for a global (full attention) layer."""
        return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        if eos is None:
            return []
        return list(eos) if isinstance(eos, list) else [int(eos)]


# ---------------------------------------------------------------------------------------------- the layers
class Attention(nn.Module):
    def __init__(self, config: GemmaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.head_dim)
        h, q_dim, kv_dim = config.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(h, q_dim, bias=bias)
        self.k_proj = nn.Linear(h, kv_dim, bias=bias)
        self.v_proj = nn.Linear(h, kv_dim, bias=bias)
        self.o_proj = nn.Linear(q_dim, h, bias=bias)
        self.qkv_proj: nn.Module | None = None  # set by fuse_projections()
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, offset=1.0)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, offset=1.0)
        self.qk_norm = config.qk_norm
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.softcap = config.attn_logit_softcapping

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None, positions: torch.Tensor, kv_len: int | None) -> torch.Tensor:
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if self.qkv_proj is not None:
            q, k, v = linear(self.qkv_proj, x).split([q_dim, kv_dim, kv_dim], dim=-1)
        else:
            q, k, v = linear(self.q_proj, x), linear(self.k_proj, x), linear(self.v_proj, x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if rowwise(x):  # compiled CPU step: compute the new q/k/v once, not inside every consumer (see ops)
            q, k, v = realized(q), realized(k), realized(v)
        if cache is not None:
            k, v = cache.update(self.layer_idx, positions, k, v)  # (B, n_kv_heads, S, head_dim)
            if kv_len is not None:
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        out = attend(q, k, v, mask, scale=self.scale, softcap=self.softcap)
        return linear(self.o_proj, out.transpose(1, 2).reshape(B, T, q_dim))


class MLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.gate_up_proj: nn.Module | None = None  # set by fuse_projections()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = linear(self.gate_up_proj, x).chunk(2, dim=-1)
        else:
            gate, up = linear(self.gate_proj, x), linear(self.up_proj, x)
        return linear(self.down_proj, F.gelu(gate, approximate="tanh") * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: GemmaConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(h, eps, offset=1.0)
        self.post_attention_layernorm = RMSNorm(h, eps, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, offset=1.0)
        self.post_feedforward_layernorm = RMSNorm(h, eps, offset=1.0)
        self.window = config.layer_window(layer_idx)

    def forward(self, x, cos, sin, mask, cache, positions, kv_len):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache,
                                                             positions, kv_len))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        # normal_ on the meta device (nn.Embedding's own init) imports torch._dynamo: keep it off meta
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if weight.device.type != "meta":
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=1.0)


class GemmaForCausalLM(DecoderModel):
    """Gemma 2 / Gemma 3 text decoder with HF parameter names (`model.layers.0.pre_feedforward_layernorm.weight`)."""

    def __init__(self, config: GemmaConfig):
        super().__init__(config)
        self.model = GemmaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # rotary frequencies: global layers (rope_theta, scaled) and local ones (their own base, unscaled)
        self.register_buffer("inv_freq", rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling),
                             persistent=False)
        local = config.rope_local_base_freq
        self.local_rope = local is not None and (local != config.rope_theta or config.rope_scaling is not None)
        self.register_buffer("local_inv_freq", rope_inv_freq(config.head_dim, local) if self.local_rope else None,
                             persistent=False)
        self.windows = sorted({layer.window for layer in self.model.layers}, key=lambda w: (w is not None, w or 0))
        # sqrt(hidden) rounded to each activation dtype, as transformers multiplies (a tensor of the dtype)
        root = math.sqrt(config.hidden_size)
        self.embed_scale = {dt: float(torch.tensor(root, dtype=dt, device="cpu"))
                            for dt in (torch.float32, torch.bfloat16, torch.float16)}
        self.final_softcap = config.final_logit_softcapping

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
        x = x * self.embed_scale.get(x.dtype, math.sqrt(self.config.hidden_size))
        rope = {None: rope_cos_sin(positions, self.inv_freq, x.dtype)}
        if self.local_rope:
            rope["local"] = rope_cos_sin(positions, self.local_inv_freq, x.dtype)
        for layer in self.model.layers:
            cos, sin = rope["local" if self.local_rope and layer.window is not None else None]
            args = (x, cos, sin, masks[layer.window], cache, positions, kv_len)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(self.lm_head, hidden)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

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


def _concat_linears(linears: list[nn.Linear]) -> nn.Linear:
    w = torch.cat([m.weight for m in linears], dim=0)
    has_bias = linears[0].bias is not None
    fused = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(w, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([m.bias for m in linears]), requires_grad=False)
    return fused


# ---------------------------------------------------------------------------------------- the family's hooks
def build(config: GemmaConfig) -> GemmaForCausalLM:
    """An uninitialized model; call under `torch.device('meta')` and assign weights afterwards."""
    return GemmaForCausalLM(config)


def config_from_dict(data: dict[str, Any], source: str) -> GemmaConfig:
    """A GemmaConfig from config.json: `gemma2`, `gemma3_text`, or `gemma3` (its text_config).

    Keys a file leaves out take transformers' class defaults for its model_type. Features this module does
    not implement are refused by name (bidirectional attention, rope types other than linear).
    """
    text_of = None
    if data.get("model_type") == "gemma3":
        text = data.get("text_config")
        if text is None:
            text = {}
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: text_config must be an object, got {short(text)}")
        text_of = "gemma3"
        outer = data
        data = {"model_type": "gemma3_text", **{k: v for k, v in text.items() if k != "model_type"}}
        for key in ("torch_dtype", "dtype", "bos_token_id", "eos_token_id", "pad_token_id"):
            if key in outer and key not in data:
                data[key] = outer[key]
        # the head is tied (or not) by the outer model: transformers saves no lm_head when the outer key says so
        data["tie_word_embeddings"] = outer.get("tie_word_embeddings", data.get("tie_word_embeddings", True))
    model_type = data.get("model_type")
    if model_type not in _DEFAULTS:
        raise UnsupportedModelError(f"{source}: model_type {short(model_type)} is not a Gemma 2/3 model")
    if data.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{source}: use_bidirectional_attention (EmbeddingGemma's bidirectional "
                                    "attention) is not supported")
    if "hidden_activation" not in data and isinstance(data.get("hidden_act"), str):
        data = {**data, "hidden_activation": data["hidden_act"]}  # older Gemma 2 configs name it so
    names = {f.name for f in dataclasses.fields(GemmaConfig) if f.repr}
    kwargs = {k: v for k, v in data.items() if k in names}
    for key, value in _DEFAULTS[model_type].items():
        kwargs.setdefault(key, value)
    try:
        kwargs.update(_rope_settings(data, model_type, source))
        if "layer_types" not in data or data["layer_types"] is None:
            pattern = data.get("sliding_window_pattern", data.get("_sliding_window_pattern"))
            if pattern is not None:
                kwargs["layer_types"] = _layer_types_from_pattern(pattern, kwargs["num_hidden_layers"])
        if "torch_dtype" not in kwargs and isinstance(data.get("dtype"), str):
            kwargs["torch_dtype"] = data["dtype"]
        config = GemmaConfig(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except ConfigError as exc:
        raise type(exc)(f"{source}: {exc}") from None
    config.text_of = text_of
    return config


def _rope_settings(data: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """rope_theta / rope_scaling (global layers) and rope_local_base_freq, from either the old keys or
    transformers 5's `rope_parameters` (per layer type for Gemma 3)."""
    params = data.get("rope_parameters")
    out: dict[str, Any] = {}
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        theta, scaling = rope_from_dict({"rope_parameters": params["full_attention"]}, source)
        local = params.get("sliding_attention")
        if local is not None:
            if not isinstance(local, dict):
                raise ConfigError(f"rope_parameters.sliding_attention must be an object, got {short(local)}")
            if local.get("rope_type", local.get("type", "default")) != "default":
                raise UnsupportedModelError(f"rope scaling {short(local.get('rope_type'))} of the sliding-window "
                                            "layers is not supported")
            out["rope_local_base_freq"] = local.get("rope_theta", _DEFAULTS[model_type].get("rope_local_base_freq"))
    else:
        fallback = {"rope_theta": data.get("rope_theta", _DEFAULTS[model_type]["rope_theta"]), **data}
        theta, scaling = rope_from_dict(fallback, source)
    out["rope_theta"], out["rope_scaling"] = theta, scaling
    if model_type == "gemma2":
        out["rope_local_base_freq"] = None  # one base for every layer
    return out


def _layer_types_from_pattern(pattern: Any, n_layers: Any) -> list[str]:
    """Every `pattern`-th layer global, the others sliding-window (transformers' `sliding_window_pattern`)."""
    if type(pattern) is not int or pattern < 1:
        raise ConfigError(f"sliding_window_pattern must be a positive integer, got {short(pattern)}")
    check_int("num_hidden_layers", n_layers)
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]


def hf_config_dict(config: GemmaConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for a fine-tuned model (train/export.py): transformers 5 keys, read back by both libraries."""
    rope_full = {"rope_type": config.rope_type, "rope_theta": config.rope_theta,
                 **{k: v for k, v in (config.rope_scaling or {}).items() if k != "rope_type"}}
    if config.model_type == "gemma3_text":
        local = config.rope_local_base_freq if config.rope_local_base_freq is not None else config.rope_theta
        rope: dict[str, Any] = {"full_attention": rope_full,
                                "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    else:
        rope = rope_full
    return {
        "architectures": [ARCHITECTURES[config.model_type]], "model_type": config.model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps, "rope_parameters": rope, "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias, "hidden_activation": config.hidden_activation,
        "query_pre_attn_scalar": config.query_pre_attn_scalar, "sliding_window": config.sliding_window,
        "layer_types": list(config.layer_types), "final_logit_softcapping": config.final_logit_softcapping,
        "attn_logit_softcapping": config.attn_logit_softcapping, "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."), "attention_dropout": 0.0,
    }


# the checkpoint layout (model.layers.N..., q/k/gate shapes) is the Llama family's: its checks apply as they are
layer_of = llama.layer_of
expected_shapes = llama.expected_shapes


# Gemma3ForConditionalGeneration checkpoints: the text model's tensors under the language model's prefix
# (transformers 4 and 5 spell it differently); the vision tower and projector are not used.
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
_VISION_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")


def checkpoint_tensor_name(name: str, config: GemmaConfig) -> str | None:
    """A checkpoint's tensor name -> this model's (None: not used). Only `gemma3` multimodal checkpoints
    need it: their text model is read, their vision tower and projector are left out."""
    if config.text_of != "gemma3":
        return name
    for old, new in _TEXT_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    if name.startswith(_VISION_PREFIXES):
        return None
    return name


# GGUF (llama.cpp) names: blk.N.<layer name> and the global tensors
GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_MODEL_TYPES = {"gemma2": "gemma2", "gemma3": "gemma3_text"}
# llama.cpp's 27B variants scale attention by (hidden / heads)^-0.5 instead of head_dim^-0.5; it tells them
# by their layer count (Gemma 2 27B: 46 layers, Gemma 3 27B: 62), and so must we: the file has no key for it.
_GGUF_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_tensor_name(name: str) -> str | None:
    """llama.cpp's tensor name -> the HF parameter name; None for tensors this family does not use."""
    if name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[name]
    m = _GGUF_BLOCK.match(name)
    if m and m.group(2) in GGUF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{GGUF_LAYER_NAMES[m.group(2)]}"
    if name == "rope_freqs.weight":
        raise UnsupportedModelError("GGUF rope_freqs tensors (per-dimension rope factors) are not supported")
    return None


def gguf_unpermute_heads(hf_name: str, config: GemmaConfig, arch: str) -> int | None:
    """Gemma files keep q/k rows in HF order (llama.cpp's NEOX rope layout): nothing to undo."""
    return None


def gguf_value_shift(hf_name: str, config: GemmaConfig, arch: str) -> float:
    """What llama.cpp's converter added to a tensor: 1 to every norm weight (its RMSNorm has no `1 +`)."""
    return 1.0 if hf_name.endswith("norm.weight") else 0.0


def config_from_gguf(meta: GGUFMetadata, tensor_names: list[str]) -> GemmaConfig:
    """A GemmaConfig from llama.cpp's metadata keys, with the settings llama.cpp fixes per architecture."""
    get, arch = meta.get, meta.arch
    n_head = get("attention.head_count", int, required=True)
    hidden = get("embedding_length", int, required=True)
    n_layers = get("block_count", int, required=True)
    vocab = get("vocab_size", int)
    if vocab is None:
        tokens = get("tokenizer.ggml.tokens", list, full=True)
        if tokens is None:
            raise ConfigError(f"{meta.source}: GGUF metadata gives no vocab size")
        vocab = len(tokens)
    head_dim = get("attention.key_length", int)
    if head_dim is None and n_head > 0 and hidden % n_head == 0:
        head_dim = hidden // n_head
    value_dim = get("attention.value_length", int, head_dim)
    rope_dims = get("rope.dimension_count", int, head_dim)
    if value_dim != head_dim or rope_dims != head_dim:
        raise meta.unsupported(f"value_length {value_dim} / rope.dimension_count {rope_dims} different from the "
                               f"key length {head_dim}")
    model_type = GGUF_MODEL_TYPES[arch]
    scaling = None
    scaling_type = get("rope.scaling.type", str)
    if scaling_type not in (None, "none"):
        scaling = {"rope_type": scaling_type, "factor": get("rope.scaling.factor", float)}
    scalar = hidden // n_head if n_layers == _GGUF_27B_LAYERS[arch] else head_dim
    data: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length", int, required=True),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": get("attention.head_count_kv", int, n_head),
        "head_dim": head_dim,
        "max_position_embeddings": get("context_length", int, _DEFAULTS[model_type]["max_position_embeddings"]),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", float, 1e-6),
        "rope_theta": get("rope.freq_base", float, _DEFAULTS[model_type]["rope_theta"]),
        "rope_scaling": scaling,
        "query_pre_attn_scalar": scalar,
        "sliding_window": get("attention.sliding_window", int, 4096),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": any(n.endswith("attn_output.bias") for n in tensor_names),
        "final_logit_softcapping": get("final_logit_softcapping", float,
                                       30.0 if arch == "gemma2" else None),
        "attn_logit_softcapping": get("attn_logit_softcapping", float, 50.0 if arch == "gemma2" else None),
        "bos_token_id": get("tokenizer.ggml.bos_token_id", int, full=True),
        "eos_token_id": get("tokenizer.ggml.eos_token_id", int, full=True),
        "pad_token_id": get("tokenizer.ggml.padding_token_id", int, full=True),
    }
    if arch == "gemma3":
        data["rope_local_base_freq"] = get("rope.freq_base_swa", float, 10000.0)
    data["layer_types"] = _gguf_layer_types(meta, n_layers, _PATTERNS[model_type])
    try:
        return GemmaConfig(**data)
    except ConfigError as exc:
        raise type(exc)(f"{meta.source}: {exc}") from None


def _gguf_layer_types(meta: GGUFMetadata, n_layers: int, default_every: int) -> list[str]:
    """`<arch>.attention.sliding_window_pattern`: an integer n (every n-th layer global) or one boolean per
    layer (true: sliding window); absent: llama.cpp's fixed pattern for the architecture."""
    key = f"{meta.arch}.attention.sliding_window_pattern"
    pattern = meta.metadata.get(key, default_every)
    check_int("num_hidden_layers", n_layers)
    if type(pattern) is int and pattern >= 1:
        return _layer_types_from_pattern(pattern, n_layers)
    if isinstance(pattern, list) and len(pattern) == n_layers and all(type(p) is bool for p in pattern):
        return ["sliding_attention" if p else "full_attention" for p in pattern]
    raise ConfigError(f"{meta.source}: GGUF metadata {key!r} must be a positive integer or {n_layers} booleans, "
                      f"got {short(pattern)}")


__all__ = ["GemmaConfig", "GemmaForCausalLM", "build", "config_from_dict", "config_from_gguf",
           "expected_shapes", "gguf_tensor_name", "gguf_unpermute_heads", "gguf_value_shift", "hf_config_dict",
           "layer_of", "checkpoint_tensor_name"]


def describe(config: GemmaConfig) -> dict[str, str]:
    """`leanformers info` lines beyond the Llama-shaped ones: the layer pattern, rope bases and soft-capping."""
    c = config
    n_local = c.layer_types.count("sliding_attention")
    out = {"layer pattern": f"{n_local} sliding-window ({c.sliding_window}) and "
                            f"{c.num_hidden_layers - n_local} global layers"}
    if c.rope_local_base_freq is not None:
        out["rope (local)"] = f"theta {c.rope_local_base_freq:g}"
    caps = [f"{n} {v:g}" for n, v in (("attention", c.attn_logit_softcapping),
                                      ("final logits", c.final_logit_softcapping)) if v is not None]
    if caps:
        out["soft-capping"] = ", ".join(caps)
    return out
