"""`pytorch_model*.bin` checkpoints, read only with `torch.load(weights_only=True)` (never unpickling code)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from ..errors import CheckpointError


def read_torch_bin_dir(directory: str | Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """Tensors of `pytorch_model.bin` or of the shards in `pytorch_model.bin.index.json`."""
    directory = Path(directory)
    index = directory / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{index}: invalid shard index ({exc})") from None
        files = sorted({directory / f for f in weight_map.values()})
    else:
        files = sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{directory}: no pytorch_model*.bin files")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(read_torch_bin(file))
    return tensors, files


def read_torch_bin(path: str | Path) -> dict[str, torch.Tensor]:
    """One .bin file; anything but a dict of tensors is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused to load (weights_only=True): {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # zip/pickle corruption surfaces as RuntimeError, EOFError, ...
        raise CheckpointError(f"{path}: corrupt PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return state
