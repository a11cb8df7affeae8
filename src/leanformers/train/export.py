"""Write a fine-tuned model as a Hugging Face directory that transformers and leanformers both load.

config.json is written from leanformers' ModelConfig (so a GGUF base gets one too), the weights as
model.safetensors (sharded with model.safetensors.index.json above `max_shard_size`), the tokenizer as the
source directory's files or, for a GGUF base, tokenizer.json written from the tokenizers backend plus a
tokenizer_config.json with the special tokens and chat template, and generation_config.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .lora import unwrap_state_dict

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json")
DEFAULT_MAX_SHARD = 5 * 1024**3


def config_dict(config: Any, dtype: torch.dtype) -> dict[str, Any]:
    """HF config.json keys from a ModelConfig."""
    model_type = config.model_type if config.model_type in ARCHITECTURES else "llama"
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling,
        "tie_word_embeddings": config.tie_word_embeddings, "hidden_act": config.hidden_act,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."), "attention_dropout": 0.0,
    }
    if model_type == "qwen2":
        out["use_sliding_window"] = config.sliding_window is not None and config.layer_types is not None
        out["sliding_window"] = config.sliding_window
        if config.layer_types is not None:
            out["layer_types"] = config.layer_types
            out["max_window_layers"] = config.layer_types.index("sliding_attention") \
                if "sliding_attention" in config.layer_types else config.num_hidden_layers
    else:
        out["attention_bias"] = config.attention_bias
        out["mlp_bias"] = config.mlp_bias
        if model_type == "mistral":
            out["sliding_window"] = config.sliding_window
        elif config.sliding_window is not None:
            out["sliding_window"] = config.sliding_window
    return out


def save_weights(state: dict[str, torch.Tensor], directory: Path, max_shard_size: int = DEFAULT_MAX_SHARD) -> list[Path]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous()
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return [directory / "model.safetensors"]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        files.append(directory / fname)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return files


def save_tokenizer(tokenizer: Any, directory: Path, source_dir: Path | None, max_length: int) -> None:
    """Copy the source directory's tokenizer files, or write them from the tokenizer (GGUF bases)."""
    if source_dir is not None and (source_dir / "tokenizer.json").is_file():
        for name in TOKENIZER_FILES:
            if (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, directory / name)
        return
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                           "model_max_length": max_length}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        cfg[key] = getattr(tokenizer, key)
    if tokenizer.chat_template is not None:
        cfg["chat_template"] = tokenizer.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def save_pretrained(model: nn.Module, config: Any, tokenizer: Any, directory: str | Path, *,
                    source_dir: Path | None = None, generation_config: dict[str, Any] | None = None,
                    max_shard_size: int | None = None) -> Path:
    """A Hugging Face model directory of `model` (LoRA wrappers, if any, are read through to their base)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = unwrap_state_dict(model)
    if config.tie_word_embeddings and getattr(model, "output_head", None):
        state.pop(f"{model.output_head}.weight", None)  # a tied head is not stored: HF ties it on load
    dtype = next(iter(state.values())).dtype
    (directory / "config.json").write_text(json.dumps(config_dict(config, dtype), indent=2) + "\n")
    save_weights(state, directory, max_shard_size or DEFAULT_MAX_SHARD)
    save_tokenizer(tokenizer, directory, source_dir, config.max_position_embeddings)
    gen = dict(generation_config or {})
    if not gen:
        eos = tokenizer.eos_token_ids or config.eos_token_ids
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return directory
