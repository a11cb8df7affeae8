"""model_type (config.json) and GGUF architecture -> the family module that implements it.

A family module (models/<family>.py) provides:
  build(config) -> DecoderModel            the model, uninitialized (built on the meta device by the loader)
  config_from_dict(data, source) -> config its config dataclass from config.json (HF keys), validated
  config_from_gguf(meta, tensor_names) -> config   from GGUF metadata (checkpoint.gguf_meta.GGUFMetadata)
  gguf_tensor_name(name) -> str | None     llama.cpp's tensor name -> the HF parameter name (None: not used)
  gguf_unpermute_heads(hf_name, config, arch) -> int | None   heads whose rows llama.cpp permuted for rope
  expected_shapes(config) -> {name: shape} the shapes a few tensors must have (checked before building)
  layer_of(name) -> int | None             which layer a parameter belongs to (checked before building)
Adding a family is a new file plus its entries below; nothing else learns its layout.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from ..errors import ConfigError, UnsupportedModelError

# model_type -> family module under leanformers.models
FAMILIES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "smollm": "llama",
    "smollm2": "llama",
}
# GGUF general.architecture -> family module
GGUF_FAMILIES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
}


def family(model_type: Any, source: str = "config") -> ModuleType:
    """The module implementing `model_type`; UnsupportedModelError naming the supported ones otherwise."""
    name = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if name is None:
        shown = repr(model_type) if len(repr(model_type)) <= 60 else repr(model_type)[:57] + "..."
        raise UnsupportedModelError(f"{source}: unknown model_type {shown}; supported: {sorted(FAMILIES)}")
    return importlib.import_module(f"leanformers.models.{name}")


def family_for(config: Any) -> ModuleType:
    """The module (with `build(config)` and its weight-name tables) implementing `config.model_type`."""
    return family(config.model_type)


def family_for_gguf(arch: str, source: str) -> ModuleType:
    name = GGUF_FAMILIES.get(arch)
    if name is None:
        raise UnsupportedModelError(
            f"{source}: GGUF architecture {arch!r} is not supported (supported: {sorted(GGUF_FAMILIES)})")
    return importlib.import_module(f"leanformers.models.{name}")


def config_from_dict(data: Any, *, source: str = "config") -> Any:
    """A family's config from a config.json dict; `source` names the file in error messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if "model_type" not in data:
        raise ConfigError(f"{source}: missing required key 'model_type'")
    return family(data["model_type"], source).config_from_dict(data, source)
