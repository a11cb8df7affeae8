"""leanformers: a lean, fast, Hugging Face-compatible transformer library for PyTorch.

    import leanformers
    lm = leanformers.load("smollm2-135m-instruct")
    print(lm.generate("Once upon a time", max_new_tokens=32).text)

Importing this package is cheap: torch and friends load on first use of `load` / `LanguageModel`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    CheckpointError,
    ConfigError,
    InvalidArgumentError,
    LeanformersError,
    ModelNotFoundError,
    TokenizerError,
    UnsupportedModelError,
    UnsupportedTaskError,
)

__version__ = "0.1.0"

__all__ = [
    "load",
    "finetune",
    "LanguageModel",
    "GenerationConfig",
    "GenerationResult",
    "ModelConfig",
    "LeanformersError",
    "ModelNotFoundError",
    "ConfigError",
    "UnsupportedModelError",
    "CheckpointError",
    "TokenizerError",
    "InvalidArgumentError",
    "UnsupportedTaskError",
    "Encoder",
    "load_encoder",
    "__version__",
]

if TYPE_CHECKING:
    from .config import ModelConfig
    from .encoder import Encoder, load_encoder
    from .generation.config import GenerationConfig
    from .generation.run import GenerationResult
    from .lm import LanguageModel, load
    from .train import finetune

_LAZY = {
    "load": "lm", "LanguageModel": "lm", "ModelConfig": "config", "GenerationConfig": "generation.config",
    "GenerationResult": "generation.run", "Encoder": "encoder", "load_encoder": "encoder", "finetune": "train",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'leanformers' has no attribute {name!r}")
