"""From a resolved reference to a model with weights: read config + tensors, build on meta, assign."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Container, Mapping

import torch
from torch import nn

from .checkpoint.gguf import GGUFFile, GGUFTensor
from .checkpoint.safetensors import read_safetensors_dir
from .checkpoint.torch_bin import read_torch_bin_dir
from .config import ModelConfig
from .errors import CheckpointError, ConfigError, InvalidArgumentError
from .models.registry import family_for

if TYPE_CHECKING:
    from .hub import ResolvedModel

DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'bfloat16' / torch.bfloat16 / None -> torch dtype (None means: choose automatically)."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPE_NAMES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.lower().removeprefix("torch.")]
    raise InvalidArgumentError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")


def default_dtype(checkpoint_dtype: str | None, device: torch.device) -> torch.dtype:
    """The checkpoint's dtype; on CPU bfloat16 instead of float16 (float16 matmuls are slow there)."""
    dtype = DTYPE_NAMES.get(str(checkpoint_dtype or "float32").removeprefix("torch."), torch.float32)
    if dtype == torch.float16 and device.type == "cpu":
        return torch.bfloat16
    return dtype


def read_checkpoint(resolved: ResolvedModel) -> tuple[ModelConfig, Mapping[str, Any], list[Path], Any]:
    """Config, tensors (torch tensors or lazy GGUF tensors) and files of a resolved model.

    The last item is the GGUFFile for GGUF models (tokenizer metadata lives there), else None.
    """
    if resolved.kind == "gguf":
        gguf = GGUFFile(resolved.path)
        config = gguf.config()
        return config, gguf.tensors(config), [resolved.path], gguf
    directory = resolved.path
    config = ModelConfig.from_json_file(directory / "config.json")
    if any(directory.glob("*.safetensors")):
        tensors, files = read_safetensors_dir(directory)
    elif any(directory.glob("pytorch_model*.bin")):
        tensors, files = read_torch_bin_dir(directory)
    else:
        raise CheckpointError(f"{directory}: no weights found (looked for *.safetensors and pytorch_model*.bin)")
    return config, tensors, files, None


def build_model(
    config: ModelConfig,
    tensors: Mapping[str, Any],
    *,
    dtype: torch.dtype,
    device: torch.device,
    source: str,
    progress: bool = False,
    placeholders: Container[str] = (),
) -> nn.Module:
    """Build the family's model on the meta device and assign the checkpoint tensors to it.

    placeholders: tensor names that are NOT read; they get a zero-memory stand-in of the right
    shape (an expanded scalar) and the caller must replace their modules (quantize_model does,
    for GGUF Q4 weights mapped exactly onto int4 kernels).
    """
    family = family_for(config)
    with torch.device("meta"):
        model = family.build(config)
    expected = model.state_dict()
    tied_head = f"{model.output_head}.weight" if model.tied_embeddings else None
    expected.pop(tied_head, None)
    unexpected = [k for k in tensors if k not in expected and not k.endswith(_IGNORED_SUFFIXES) and k != tied_head]
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} tensors do not belong to a {config.model_type} model "
            f"with this config, e.g. {sorted(unexpected)[:4]}"
        )
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensors are missing, e.g. {missing[:4]}")
    state: dict[str, torch.Tensor] = {}
    items = list(expected.items())
    bar = _progress(items, "Loading weights", progress)
    for name, meta in bar:
        value = tensors[name]
        shape = tuple(value.shape)
        if shape != tuple(meta.shape):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {list(shape)}, the model expects {list(meta.shape)}"
            )
        if name in placeholders:
            t = torch.zeros((), dtype=dtype, device=device).expand(shape)
        elif isinstance(value, GGUFTensor):
            t = value.dequantize(dtype)
        else:
            if not value.is_floating_point():
                raise CheckpointError(f"{source}: tensor {name!r} has dtype {value.dtype}, expected a float type")
            t = value if value.dtype == dtype else value.to(dtype)
        state[name] = t.to(device) if t.device != device else t
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.to(device)  # non-persistent buffers (rope frequencies)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def read_generation_config(directory: Path) -> dict[str, Any]:
    """generation_config.json as a dict ({} when absent)."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _progress(items: list, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor", leave=False, file=sys.stderr)
