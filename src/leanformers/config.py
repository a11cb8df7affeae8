"""ModelConfig: a dataclass whose fields are Hugging Face config.json keys.

Built from a config.json dict (old `rope_theta`/`rope_scaling` keys and the newer `rope_parameters`)
or from GGUF metadata. Anything we cannot honour raises instead of producing a silently wrong model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, UnsupportedModelError

# model_type -> family module name in leanformers.models
MODEL_TYPE_FAMILY = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "smollm": "llama",
    "smollm2": "llama",
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu",)

# Keys config.json must give: without them the model's shape is unknown.
_REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass
class ModelConfig:
    """Configuration of a Llama-family decoder, keyed like Hugging Face's config.json."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    architectures: list[str] | None = None
    # Derived, not HF keys: which projections carry a bias.
    qkv_bias: bool = field(default=False, repr=False)
    o_bias: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPE_FAMILY:
            raise UnsupportedModelError(
                f"unknown model_type {self.model_type!r}; supported: {sorted(MODEL_TYPE_FAMILY)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError("hidden_size must be divisible by num_attention_heads when head_dim is not given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise UnsupportedModelError(f"hidden_act {self.hidden_act!r} is not supported (only {SUPPORTED_ACTIVATIONS})")
        self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)
        if self.model_type == "qwen2":
            self.qkv_bias, self.o_bias = True, False
        else:
            self.qkv_bias = self.o_bias = bool(self.attention_bias)
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ConfigError("layer_types must have one entry per hidden layer")
            bad = set(self.layer_types) - {"full_attention", "sliding_attention"}
            if bad:
                raise UnsupportedModelError(f"unsupported layer_types {sorted(bad)}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            self.sliding_window = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "ModelConfig":
        """Build from a config.json dict; `source` names the file in error messages."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if "model_type" not in data:
            raise ConfigError(f"{source}: missing required key 'model_type'")
        missing = [k for k in _REQUIRED_KEYS if k not in data]
        if missing:
            raise ConfigError(f"{source}: missing required keys {missing}")
        model_type = data["model_type"]
        if model_type not in MODEL_TYPE_FAMILY:
            raise UnsupportedModelError(
                f"{source}: unknown model_type {model_type!r}; supported: {sorted(MODEL_TYPE_FAMILY)}"
            )
        names = {f.name for f in dataclasses.fields(cls) if f.repr}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs.pop("rope_theta", None)
        kwargs.pop("rope_scaling", None)
        theta, scaling = _rope_from_dict(data, source)
        kwargs["rope_theta"] = theta
        kwargs["rope_scaling"] = scaling
        if "torch_dtype" not in kwargs and isinstance(data.get("dtype"), str):
            kwargs["torch_dtype"] = data["dtype"]
        if model_type == "qwen2":
            if data.get("use_sliding_window", False) and not data.get("layer_types"):
                max_window_layers = int(data.get("max_window_layers", 0))
                n = int(data["num_hidden_layers"])
                kwargs["layer_types"] = [
                    "sliding_attention" if i >= max_window_layers else "full_attention" for i in range(n)
                ]
            elif not data.get("use_sliding_window", False):
                kwargs["sliding_window"] = None
                kwargs["layer_types"] = None
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except ConfigError as exc:
            raise type(exc)(f"{source}: {exc}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        """Read a config.json file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
        return cls.from_dict(data, source=str(path))

    # ------------------------------------------------------------------ helpers
    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    def layer_window(self, layer_idx: int) -> int | None:
        """Sliding-window size for one layer, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        if eos is None:
            return []
        return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def _rope_from_dict(data: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """Read rope settings from either the old keys or `rope_parameters`."""
    params = data.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]  # per-layer-type form; Llama family uses one
    if isinstance(params, dict):
        theta = params.get("rope_theta", data.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        if scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
    else:
        theta = data.get("rope_theta", 10000.0)
        scaling = data.get("rope_scaling")
    try:
        theta = float(theta)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: rope_theta must be a number, got {theta!r}") from None
    try:
        return theta, _normalize_rope_scaling(scaling)
    except ConfigError as exc:
        raise type(exc)(f"{source}: {exc}") from None


def _normalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be an object, got {scaling!r}")
    scaling = dict(scaling)
    rope_type = scaling.pop("type", None) or scaling.get("rope_type") or "default"
    scaling["rope_type"] = rope_type
    if rope_type == "default":
        return None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or factor <= 0 or not math.isfinite(factor):
        raise ConfigError(f"rope scaling {rope_type!r} needs a positive 'factor', got {factor!r}")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in scaling:
                raise ConfigError(f"rope scaling 'llama3' needs {key!r}")
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise ConfigError("rope scaling 'llama3' needs high_freq_factor > low_freq_factor")
    return scaling
