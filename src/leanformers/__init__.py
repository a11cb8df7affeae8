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
)

__version__ = "0.1.0"

__all__ = [
    "load",
    "finetune",
    "LanguageModel",
    "ModelConfig",
    "LeanformersError",
    "ModelNotFoundError",
    "ConfigError",
    "UnsupportedModelError",
    "CheckpointError",
    "TokenizerError",
    "InvalidArgumentError",
    "__version__",
]

if TYPE_CHECKING:
    from .config import ModelConfig
    from .lm import LanguageModel, load
    from .train import finetune


def __getattr__(name: str) -> Any:
    if name in ("load", "LanguageModel"):
        from . import lm

        return getattr(lm, name)
    if name == "finetune":  # [finetune]
        from .train import finetune

        return finetune
    if name == "ModelConfig":
        from .config import ModelConfig

        return ModelConfig
    raise AttributeError(f"module 'leanformers' has no attribute {name!r}")
