"""From a resolved reference to a model with weights: read config + tensors, build on meta, assign."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Container, Mapping

import torch
from torch import nn

from .checkpoint.gguf import GGUFFile, GGUFTensor
from .checkpoint.safetensors import read_safetensors_dir
from .checkpoint.torch_bin import read_torch_bin_dir
from .errors import CheckpointError, ConfigError, InvalidArgumentError
from .files import read_json
from .models.registry import config_from_dict, family_for

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


def read_checkpoint(resolved: ResolvedModel) -> tuple[Any, Mapping[str, Any], list[Path], Any]:
    """Config, tensors (torch tensors or lazy GGUF tensors) and files of a resolved model.

    The last item is the GGUFFile for GGUF models (tokenizer metadata lives there), else None.
    The config is checked against the tensors' shapes (check_config_fits_tensors) before returning.
    """
    if resolved.kind == "gguf":
        gguf = GGUFFile(resolved.path)
        config = gguf.config()
        tensors = gguf.tensors(config)
        check_config_fits_tensors(config, tensors, config_source=str(resolved.path),
                                  weights_source="the file's tensors")
        return config, tensors, [resolved.path], gguf
    directory = resolved.path
    config_file = directory / "config.json"
    config = config_from_dict(read_json(config_file, ConfigError, "config file"), source=str(config_file))
    tensors, files = read_weights_dir(directory)
    origin = getattr(tensors, "origin", files[0])  # the index, or the single weights file
    check_config_fits_tensors(config, tensors, config_source=str(directory / "config.json"),
                              weights_source=f"the tensors of {origin.name}")
    return config, tensors, files, None


def read_weights_dir(directory: Path) -> tuple[Mapping[str, Any], list[Path]]:
    """safetensors (index or model.safetensors) first, then pytorch_model.bin (index or single file)."""
    for index, single, read in (
        ("model.safetensors.index.json", "model.safetensors", read_safetensors_dir),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", read_torch_bin_dir),
    ):
        if os.path.lexists(directory / index) or os.path.lexists(directory / single):
            return read(directory)
    others = sorted(p.name for p in directory.glob("*.safetensors")) + sorted(p.name for p in directory.glob("*.bin"))
    hint = f"; {', '.join(others[:5])} {'is' if len(others) == 1 else 'are'} not named by any index" if others else ""
    raise CheckpointError(
        f"{directory}: no weights found (looked for model.safetensors, model.safetensors.index.json, "
        f"pytorch_model.bin and pytorch_model.bin.index.json){hint}"
    )


def check_config_fits_tensors(config: Any, tensors: Mapping[str, Any], *, config_source: str,
                              weights_source: str) -> None:
    """Refuse a config whose declared sizes the checkpoint does not have, before anything is built.

    Reads only names and shapes (headers), so it costs microseconds. Without it a hostile
    `num_hidden_layers: 1000000` (or GGUF block_count) builds a million layers on the meta device, minutes
    and gigabytes, before the missing tensors are noticed. Checked: the layers present are exactly
    0..num_hidden_layers-1 (the family's `layer_of`), and the shapes the family's `expected_shapes` names
    (so vocab, hidden, intermediate, head and head_dim sizes match the file). build_model then checks every
    tensor's shape.
    """
    family = family_for(config)
    n = config.num_hidden_layers
    layer_of = {name: i for name, i in ((k, family.layer_of(k)) for k in tensors) if i is not None}
    extra = sorted(name for name, i in layer_of.items() if i >= n)
    if extra:
        raise CheckpointError(f"{config_source}: num_hidden_layers is {n}, but {weights_source} hold tensors of "
                              f"further layers, e.g. {extra[:3]}")
    missing = sorted(set(range(n)) - set(layer_of.values()))
    if missing:
        raise CheckpointError(f"{config_source}: num_hidden_layers is {n}, but {weights_source} hold no tensors "
                              f"for {len(missing)} of these layers (e.g. layers {missing[:5]})")
    for name, shape in family.expected_shapes(config).items():
        if name not in tensors:
            tie = " (tie_word_embeddings is false)" if name.endswith("lm_head.weight") else ""
            raise CheckpointError(f"{config_source}: {weights_source} lack tensor {name!r}{tie}")
        have = tuple(tensors[name].shape)
        if have != shape:
            raise CheckpointError(
                f"{config_source}: the config implies shape {list(shape)} for {name!r} (vocab_size, hidden_size, "
                f"heads, head_dim, intermediate_size), but {weights_source} hold {list(have)}"
            )


def build_model(
    config: Any,
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
    check_config_fits_tensors(config, tensors, config_source=source, weights_source="the checkpoint's tensors")
    family = family_for(config)
    with torch.device("meta"):
        model = family.build(config)
    expected = model.state_dict()
    tied_head = f"{model.output_head}.weight" if model.tied_embeddings else None
    expected.pop(tied_head, None)
    unexpected = [k for k in tensors if k not in expected and not k.endswith(_IGNORED_SUFFIXES) and k != tied_head]
    if unexpected:
        raise CheckpointError(
            f"{_file_of(tensors, unexpected[0], source)}: {len(unexpected)} tensors do not belong to a "
            f"{config.model_type} model "
            f"with this config, e.g. {sorted(unexpected)[:4]}"
        )
    missing = [k for k in expected if k not in tensors]
    if missing:
        where = getattr(tensors, "origin", None) or source
        raise CheckpointError(f"{where}: {len(missing)} tensors are missing, e.g. {missing[:4]}")
    state: dict[str, torch.Tensor] = {}
    items = list(expected.items())
    bar = _progress(items, "Loading weights", progress)
    for name, meta in bar:
        value = tensors[name]
        shape = tuple(value.shape)
        if shape != tuple(meta.shape):
            raise CheckpointError(
                f"{_file_of(tensors, name, source)}: tensor {name!r} has shape {list(shape)}, "
                f"the model expects {list(meta.shape)}"
            )
        if name in placeholders:
            t = torch.zeros((), dtype=dtype, device=device).expand(shape)
        elif isinstance(value, GGUFTensor):
            t = value.dequantize(dtype)
        else:
            if not value.is_floating_point():
                raise CheckpointError(f"{_file_of(tensors, name, source)}: tensor {name!r} has dtype {value.dtype}, "
                                      "expected a float type")
            t = value if value.dtype == dtype else value.to(dtype)
        state[name] = t.to(device) if t.device != device else t
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.to(device)  # non-persistent buffers (rope frequencies)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _file_of(tensors: Mapping[str, Any], name: str, source: str) -> str:
    """The file a tensor was read from, for error messages (GGUF tensors and checkpoint.Tensors know it)."""
    value = tensors.get(name)
    if isinstance(value, GGUFTensor) and value.source:
        return value.source
    files = getattr(tensors, "files", None)
    return str(files[name]) if files and name in files else source


def read_generation_config(directory: Path) -> dict[str, Any]:
    """generation_config.json as a dict ({} when absent)."""
    path = directory / "generation_config.json"
    if not os.path.lexists(path):
        return {}
    data = read_json(path, ConfigError, "generation config")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    eos = data.get("eos_token_id")
    if eos is not None and not (type(eos) is int or (isinstance(eos, list) and all(type(i) is int for i in eos))):
        raise ConfigError(f"{path}: eos_token_id must be an integer or a list of integers, got {eos!r:.60}")
    return data


def _progress(items: list, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor", leave=False, file=sys.stderr)
