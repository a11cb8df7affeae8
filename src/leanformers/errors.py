"""The exceptions leanformers raises: one base class, one subclass per kind of problem."""

from __future__ import annotations


class LeanformersError(Exception):
    """Base class of every error leanformers raises on purpose."""


class ModelNotFoundError(LeanformersError, FileNotFoundError):
    """A model reference could not be resolved to local files."""


class ConfigError(LeanformersError, ValueError):
    """A model configuration is missing, malformed or asks for something unsupported."""


class UnsupportedModelError(ConfigError):
    """The architecture or one of its features is not implemented."""


class CheckpointError(LeanformersError, ValueError):
    """A weights file is missing, truncated, corrupt or does not fit the model."""


class TokenizerError(LeanformersError, ValueError):
    """Tokenizer files are missing or malformed, or a chat template failed."""


class InvalidArgumentError(LeanformersError, ValueError):
    """A user-supplied argument is out of range or malformed."""


class UnsupportedTaskError(InvalidArgumentError, AttributeError):
    """The model cannot do what was asked: an encoder asked to generate, a decoder asked to embed.

    Also an AttributeError, so `hasattr(encoder, "generate")` is simply False.
    """
