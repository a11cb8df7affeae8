"""model_type -> family module: one file per family, variants are config switches."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..config import MODEL_TYPE_FAMILY, ModelConfig
from ..errors import UnsupportedModelError


def family_for(config: ModelConfig) -> ModuleType:
    """The module (with `build(config)` and its weight-name conventions) implementing `config.model_type`."""
    name = MODEL_TYPE_FAMILY.get(config.model_type)
    if name is None:
        raise UnsupportedModelError(f"unknown model_type {config.model_type!r}; supported: {sorted(MODEL_TYPE_FAMILY)}")
    return importlib.import_module(f"leanformers.models.{name}")
