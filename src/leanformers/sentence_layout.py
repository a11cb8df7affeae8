"""The sentence-transformers directory layout, read as it is, and the pooling it describes.

    modules.json                         [{"path": "", "type": "...Transformer"}, {"path": "1_Pooling",
                                           "type": "...Pooling"}, {"path": "2_Normalize", "type": "...Normalize"}]
    sentence_bert_config.json            {"max_seq_length": 256, "do_lower_case": false}  (next to config.json)
    1_Pooling/config.json                pooling modes: old booleans (pooling_mode_mean_tokens, ...) or
                                          "pooling_mode": "mean" | [...], "include_prompt"
    config_sentence_transformers.json    {"prompts": {"query": "query: ", ...}, "default_prompt_name": ...}

Pooling modes (several are concatenated in sentence-transformers' order): cls, max, mean,
mean_sqrt_len_tokens, weightedmean, lasttoken. Means are accumulated in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, UnsupportedModelError
from .files import read_json

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# the old boolean keys, in the order sentence-transformers concatenates their outputs
_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_MODULE_KINDS = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class Pooling:
    """How token states become one vector per text (sentence-transformers' Pooling module)."""

    modes: tuple[str, ...] = ("mean",)
    include_prompt: bool = True

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor, prompt_length: int = 0) -> torch.Tensor:
        """hidden (B, T, H), mask (B, T) 1 = real token (right padding) -> (B, H * len(modes)) float32."""
        if prompt_length and not self.include_prompt:
            mask = mask.clone()
            mask[:, :prompt_length] = 0
        h = hidden.float()
        m = mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        out = []
        counts = m.sum(dim=1).clamp(min=1e-9)  # (B, 1)
        for mode in self.modes:
            if mode == "cls":
                first = mask.to(torch.int).argmax(dim=1)
                out.append(h[torch.arange(h.shape[0]), first])
            elif mode == "max":
                out.append(h.masked_fill(m == 0, float("-inf")).max(dim=1).values)
            elif mode == "mean":
                out.append((h * m).sum(dim=1) / counts)
            elif mode == "mean_sqrt_len_tokens":
                out.append((h * m).sum(dim=1) / counts.sqrt())
            elif mode == "weightedmean":
                w = m * torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype).view(1, -1, 1)
                out.append((h * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9))
            else:  # lasttoken
                last = (mask.sum(dim=1) - 1).clamp(min=0).long()
                out.append((h * m)[torch.arange(h.shape[0]), last])
        return torch.cat(out, dim=-1)


@dataclass
class SentenceLayout:
    """What a sentence-transformers directory asks for (or the defaults for a plain HF directory)."""

    model_dir: Path  # where config.json, the weights and the tokenizer are
    pooling: Pooling = field(default_factory=Pooling)
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    is_sentence_transformers: bool = False


def read_layout(directory: Path) -> SentenceLayout:
    """The layout of `directory`: modules.json and friends when present, else a plain HF model (mean pooling)."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return SentenceLayout(model_dir=directory)
    modules = _read_json(modules_file)
    if not isinstance(modules, list) or not modules:
        raise ConfigError(f"{modules_file}: expected a non-empty list of modules")
    layout = SentenceLayout(model_dir=directory, is_sentence_transformers=True)
    seen: list[str] = []
    for n, module in enumerate(modules):
        if not isinstance(module, dict) or not isinstance(module.get("type"), str):
            raise ConfigError(f"{modules_file}: entry {n} must be an object with a string 'type'")
        kind = module["type"].rsplit(".", 1)[-1]
        if not module["type"].startswith("sentence_transformers.") or kind not in _MODULE_KINDS:
            raise UnsupportedModelError(
                f"{modules_file}: module {n} is {module['type']!r}; supported modules: "
                f"{', '.join(_MODULE_KINDS)} (in that order)")
        path = module.get("path", "")
        if not isinstance(path, str) or Path(path).is_absolute() or ".." in Path(path).parts:
            raise ConfigError(f"{modules_file}: module {n} has an invalid path {path!r}")
        if kind == "Transformer":
            layout.model_dir = directory / path
        elif kind == "Pooling":
            layout.pooling = read_pooling(directory / path / "config.json")
        else:
            layout.normalize = True
        seen.append(kind)
    if seen[0] != "Transformer" or seen.count("Transformer") != 1 or seen.count("Pooling") > 1 \
            or seen[1:] != sorted(seen[1:], key=_MODULE_KINDS.index):
        raise UnsupportedModelError(f"{modules_file}: modules {seen} are not Transformer, then Pooling, then Normalize")
    if "Pooling" not in seen:
        raise UnsupportedModelError(f"{modules_file}: no Pooling module: token embeddings alone are not supported")
    _read_sentence_bert_config(layout)
    _read_prompts(layout, directory / "config_sentence_transformers.json")
    return layout


def read_pooling(path: Path) -> Pooling:
    """A Pooling module's config.json (old boolean keys or `pooling_mode`)."""
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    for key, value in cfg.items():
        if key.startswith("pooling_mode_") and key not in _LEGACY_KEYS and value:
            raise ConfigError(f"{path}: unknown pooling mode {key!r}; known modes: {', '.join(POOLING_MODES)}")
    if "pooling_mode" in cfg:
        value = cfg["pooling_mode"]
        modes = [value] if isinstance(value, str) else value
        if not isinstance(modes, list) or not modes or not all(isinstance(m, str) for m in modes):
            raise ConfigError(f"{path}: pooling_mode must be a mode name or a list of them, got {value!r}")
        for mode in modes:
            if mode not in POOLING_MODES:
                raise ConfigError(f"{path}: unknown pooling mode {mode!r}; known modes: {', '.join(POOLING_MODES)}")
    else:
        for key, mode in _LEGACY_KEYS.items():
            if not isinstance(cfg.get(key, False), bool):
                raise ConfigError(f"{path}: {key} must be true or false, got {cfg[key]!r}")
        modes = [mode for key, mode in _LEGACY_KEYS.items() if cfg.get(key, False)] or ["mean"]
    include_prompt = cfg.get("include_prompt", True)
    if not isinstance(include_prompt, bool):
        raise ConfigError(f"{path}: include_prompt must be true or false, got {include_prompt!r}")
    return Pooling(tuple(modes), include_prompt)


def pooling_dimension_key(path: Path) -> int | None:
    """The embedding width a Pooling config declares (word_embedding_dimension / embedding_dimension)."""
    cfg = _read_json(path)
    value = cfg.get("embedding_dimension", cfg.get("word_embedding_dimension")) if isinstance(cfg, dict) else None
    return value if isinstance(value, int) else None


def _read_sentence_bert_config(layout: SentenceLayout) -> None:
    path = layout.model_dir / "sentence_bert_config.json"
    if not path.is_file():
        return
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    max_len = cfg.get("max_seq_length")
    if max_len is not None and (not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1):
        raise ConfigError(f"{path}: max_seq_length must be a positive integer, got {max_len!r}")
    lower = cfg.get("do_lower_case", False)
    if not isinstance(lower, bool):
        raise ConfigError(f"{path}: do_lower_case must be true or false, got {lower!r}")
    layout.max_seq_length, layout.do_lower_case = max_len, lower


def _read_prompts(layout: SentenceLayout, path: Path) -> None:
    if not path.is_file():
        return
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    prompts = cfg.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise ConfigError(f"{path}: prompts must be an object of name -> prompt text")
    default = cfg.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ConfigError(f"{path}: default_prompt_name {default!r} is not one of the prompts {sorted(prompts)}")
    layout.prompts, layout.default_prompt_name = dict(prompts), default


def _read_json(path: Path) -> Any:
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    return read_json(path, ConfigError, "sentence-transformers file")
