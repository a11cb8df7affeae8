"""Typed access to GGUF metadata, for the families' `config_from_gguf` (models/<family>.py).

    meta = GGUFMetadata(gguf.metadata, source="model.gguf")
    n_head = meta.get("attention.head_count", int, required=True)    # "<arch>.attention.head_count"
    bos = meta.get("tokenizer.ggml.bos_token_id", int, full=True)     # a key without the arch prefix

Every value is type-checked (an integer key must hold an integer, not a string, float or bool); ranges are
checked by the family's config, and against the tensors by loading.check_config_fits_tensors.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, UnsupportedModelError

_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", list: "an array", bool: "a boolean"}


class GGUFMetadata:
    """A GGUF file's metadata with its architecture; `get` checks each value's type."""

    def __init__(self, metadata: dict[str, Any], *, source: str):
        self.metadata, self.source = metadata, source
        arch = metadata.get("general.architecture")
        if arch is None:
            raise ConfigError(f"{source}: GGUF metadata lacks 'general.architecture'")
        if not isinstance(arch, str):
            raise ConfigError(f"{source}: GGUF metadata 'general.architecture' must be a string, got {kind(arch)}")
        self.arch = arch

    def get(self, key: str, kind_: type, default: Any = None, *, required: bool = False, full: bool = False) -> Any:
        """The value of `<arch>.<key>` (or of `key` itself with full=True), checked to be of type `kind_`."""
        name = key if full else f"{self.arch}.{key}"
        if name not in self.metadata:
            if required:
                raise ConfigError(f"{self.source}: GGUF metadata lacks required key {name!r}")
            return default
        value = self.metadata[name]
        if kind_ is int:
            ok = type(value) is int
        elif kind_ is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif kind_ is bool:
            ok = type(value) is bool
        else:
            ok = isinstance(value, kind_)
        if not ok:
            raise ConfigError(f"{self.source}: GGUF metadata {name!r} must be {_KIND_NAMES[kind_]}, got {kind(value)}")
        return value

    def unsupported(self, what: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{self.source}: GGUF architecture {self.arch!r}: {what} is not supported")


def kind(value: Any) -> str:
    """How a metadata value reads in an error message: its type and a short repr."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"
