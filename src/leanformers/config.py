"""ModelConfig: a dataclass whose fields are Hugging Face config.json keys.

The config of the Llama family (models/llama.py), and the base that other decoder families extend with
their own keys. Built from a config.json dict (old `rope_theta`/`rope_scaling` keys and the newer
`rope_parameters`) or from GGUF metadata (the family's `config_from_gguf`). Anything we cannot honour
raises instead of producing a silently wrong model. The validation helpers (`check_int`, `check_float`,
`check_bool`, `short`) are shared by every family's config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError, UnsupportedModelError
from .files import read_json

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu",)

# Keys config.json must give: without them the model's shape is unknown.
_REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")

# Upper bounds of the sizes a config may declare, checked before anything is built or allocated. They are
# generous (several times the largest public models); the real bound is what the checkpoint's tensors
# hold, checked by loading.check_config_fits_tensors before the model is built.
LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "max_position_embeddings": 1 << 24,
    "sliding_window": 1 << 24,
}
MAX_ROPE_THETA = 1e12


@dataclass
class ModelConfig:
    """Configuration of a Llama-family decoder, keyed like Hugging Face's config.json."""

    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2", "smollm", "smollm2")

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
        if not isinstance(self.model_type, str) or self.model_type not in self.model_types:
            raise UnsupportedModelError(
                f"model_type {_short(self.model_type)} is not one of {type(self).__name__}'s: {list(self.model_types)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            _check_int(name, getattr(self, name))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _check_int("num_key_value_heads", self.num_key_value_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError("hidden_size must be divisible by num_attention_heads when head_dim is not given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        _check_int("max_position_embeddings", self.max_position_embeddings)
        _check_float("rms_norm_eps", self.rms_norm_eps, 0.0, 1.0)
        _check_float("rope_theta", self.rope_theta, 0.0, MAX_ROPE_THETA)
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if type(getattr(self, name)) is not bool:
                raise ConfigError(f"config field {name!r} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise UnsupportedModelError(
                f"hidden_act {_short(self.hidden_act)} is not supported (only {SUPPORTED_ACTIVATIONS})")
        self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)
        if self.model_type == "qwen2":
            self.qkv_bias, self.o_bias = True, False
        else:
            self.qkv_bias = self.o_bias = self.attention_bias
        if self.layer_types is not None:
            if not isinstance(self.layer_types, list) or not all(isinstance(t, str) for t in self.layer_types):
                raise ConfigError(f"layer_types must be a list of strings, got {_short(self.layer_types)}")
            if len(self.layer_types) != self.num_hidden_layers:
                raise ConfigError("layer_types must have one entry per hidden layer")
            bad = set(self.layer_types) - {"full_attention", "sliding_attention"}
            if bad:
                raise UnsupportedModelError(f"unsupported layer_types {sorted(bad)}")
        if self.sliding_window is not None:
            if type(self.sliding_window) is not int:
                raise ConfigError(
                    f"config field 'sliding_window' must be an integer or null, got {_short(self.sliding_window)}")
            if self.sliding_window <= 0:
                self.sliding_window = None
            else:
                _check_int("sliding_window", self.sliding_window)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            self._check_token_ids(name)
        if self.torch_dtype is not None and not isinstance(self.torch_dtype, str):
            raise ConfigError(f"config field 'torch_dtype' must be a string, got {_short(self.torch_dtype)}")
        if self.architectures is not None and (
                not isinstance(self.architectures, list) or not all(isinstance(a, str) for a in self.architectures)):
            raise ConfigError(
                f"config field 'architectures' must be a list of strings, got {_short(self.architectures)}")

    def _check_token_ids(self, name: str) -> None:
        """A token id field: null, an id in [0, vocab_size), or (bos/eos only) a list of such ids."""
        value = getattr(self, name)
        ids = value if isinstance(value, list) and name != "pad_token_id" else [value]
        if value is None or (isinstance(value, list) and not value):
            return
        for i in ids:
            if type(i) is not int or not 0 <= i < self.vocab_size:
                raise ConfigError(f"config field {name!r} must be a token id in [0, {self.vocab_size})"
                                  f"{' or a list of them' if name != 'pad_token_id' else ''}, got {_short(value)}")

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
        if not isinstance(model_type, str) or model_type not in cls.model_types:
            raise UnsupportedModelError(
                f"{source}: model_type {_short(model_type)} is not one of {cls.__name__}'s: {list(cls.model_types)}"
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
        try:
            if model_type == "qwen2":
                kwargs.update(_qwen2_windows(data))
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except ConfigError as exc:
            raise type(exc)(f"{source}: {exc}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        """Read a config.json file (strict JSON: see files.parse_json)."""
        path = Path(path)
        return cls.from_dict(read_json(path, ConfigError, "config file"), source=str(path))

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


def _qwen2_windows(data: dict[str, Any]) -> dict[str, Any]:
    """Qwen2's use_sliding_window / max_window_layers as sliding_window + layer_types."""
    use = data.get("use_sliding_window", False)
    if type(use) is not bool:
        raise ConfigError(f"config field 'use_sliding_window' must be true or false, got {_short(use)}")
    if not use:
        return {"sliding_window": None, "layer_types": None}
    if data.get("layer_types"):
        return {}
    first = data.get("max_window_layers", 0)
    n = data["num_hidden_layers"]
    if type(first) is not int or first < 0:
        raise ConfigError(f"config field 'max_window_layers' must be a non-negative integer, got {_short(first)}")
    _check_int("num_hidden_layers", n)
    return {"layer_types": ["sliding_attention" if i >= first else "full_attention" for i in range(n)]}


def _rope_from_dict(data: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """Read rope settings from either the old keys or `rope_parameters`."""
    params = data.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters must be an object, got {_short(params)}")
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
        _check_float("rope_theta", theta, 0.0, MAX_ROPE_THETA)
        return float(theta), _normalize_rope_scaling(scaling)
    except ConfigError as exc:
        raise type(exc)(f"{source}: {exc}") from None


def _normalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be an object, got {_short(scaling)}")
    scaling = dict(scaling)
    rope_type = scaling.pop("type", None) or scaling.get("rope_type") or "default"
    if not isinstance(rope_type, str):
        raise ConfigError(f"rope type must be a string, got {_short(rope_type)}")
    scaling["rope_type"] = rope_type
    if rope_type == "default":
        return None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
    _check_float("rope_scaling.factor", scaling.get("factor"), 0.0, 1e6)
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in scaling:
                raise ConfigError(f"rope scaling 'llama3' needs {key!r}")
        _check_float("rope_scaling.low_freq_factor", scaling["low_freq_factor"], 0.0, 1e6)
        _check_float("rope_scaling.high_freq_factor", scaling["high_freq_factor"], 0.0, 1e6)
        _check_int("rope_scaling.original_max_position_embeddings", scaling["original_max_position_embeddings"],
                   LIMITS["max_position_embeddings"])
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise ConfigError("rope scaling 'llama3' needs high_freq_factor > low_freq_factor")
    return scaling


def _check_int(name: str, value: Any, limit: int | None = None) -> None:
    """A count or size: a real integer (not a bool, float or string) in [1, limit]."""
    limit = limit or LIMITS[name]
    if type(value) is not int:
        raise ConfigError(f"config field {name!r} must be a positive integer, got {_short(value)}")
    if not 1 <= value <= limit:
        raise ConfigError(f"config field {name!r} must be in [1, {limit}], got {_short(value)}")


def _check_float(name: str, value: Any, low: float, high: float) -> None:
    """A finite number (int or float, not a bool or string) with low < value <= high."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config field {name!r} must be a number, got {_short(value)}")
    try:
        ok = math.isfinite(value) and low < value <= high
    except OverflowError:  # an int too large for a float
        ok = False
    if not ok:
        raise ConfigError(f"config field {name!r} must be a finite number in ({low:g}, {high:g}], got {_short(value)}")


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int of more than sys.get_int_max_str_digits() digits
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    return text if len(text) <= 60 else text[:57] + "..."


# the validation helpers, for the families' own configs
check_int = _check_int
check_float = _check_float
short = _short
rope_from_dict = _rope_from_dict
