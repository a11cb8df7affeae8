"""LanguageModel: a model, its tokenizer and config, with generate / stream / chat."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .hub import ResolvedModel, resolve
from .loading import build_model, default_dtype, parse_dtype, read_checkpoint, read_generation_config
from .tokenizer import Tokenizer, load_tokenizer_from_dir, load_tokenizer_from_gguf


class LanguageModel:
    """A loaded causal LM: `.model` (logits = model(input_ids)), `.tokenizer`, `.config`."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        config: ModelConfig,
        *,
        source: ResolvedModel | None = None,
        files: list[Path] | None = None,
        generation_config: dict[str, Any] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.source = source
        self.files = files or []
        self.generation_config = generation_config or {}

    @property
    def device(self) -> torch.device:
        return self.model.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.norm.weight.dtype

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: tokenizer, generation_config.json and config, deduplicated."""
        ids: list[int] = []
        gen_eos = self.generation_config.get("eos_token_id")
        gen_eos = gen_eos if isinstance(gen_eos, list) else ([gen_eos] if gen_eos is not None else [])
        for i in [*self.tokenizer.eos_token_ids, *gen_eos, *self.config.eos_token_ids]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
        return ids

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    def __repr__(self) -> str:
        ref = self.source.reference if self.source else "?"
        return f"LanguageModel({ref!r}, {self.config.model_type}, {self.dtype}, {self.device})"


def load(
    reference: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    offline: bool | None = None,
    progress: bool | None = None,
) -> LanguageModel:
    """Load a model and its tokenizer from a reference: an alias, an HF directory, `org/name[@rev]` or a .gguf file.

    dtype: float32, bfloat16 or float16; default: the checkpoint's (bfloat16 instead of float16 on CPU,
    float32 for GGUF). progress: show progress bars (default: when stderr is a terminal).
    """
    if progress is None:
        progress = sys.stderr.isatty()
    device = torch.device(device)
    wanted = parse_dtype(dtype)
    resolved = resolve(reference, revision=revision, offline=offline, progress=progress)
    config, tensors, files, gguf = read_checkpoint(resolved)
    if gguf is not None:
        tokenizer = load_tokenizer_from_gguf(gguf)
        generation_config: dict[str, Any] = {}
    else:
        tokenizer = load_tokenizer_from_dir(resolved.path)
        generation_config = read_generation_config(resolved.path)
    dtype_ = wanted or default_dtype(None if gguf is not None else config.torch_dtype, device)
    model = build_model(config, tensors, dtype=dtype_, device=device, source=str(resolved.path), progress=progress)
    return LanguageModel(
        model, tokenizer, config, source=resolved, files=files, generation_config=generation_config
    )
