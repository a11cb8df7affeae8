"""`pytorch_model*.bin` checkpoints, read only with `torch.load(weights_only=True)` (never unpickling code).

Which files belong to the model: the shards of `pytorch_model.bin.index.json` (plain file names inside
the directory) or the single `pytorch_model.bin`, as for safetensors. Both torch.save formats load: the
zip format (torch >= 1.6) memory-mapped, the legacy one (a bare pickle stream) read into memory,
since torch can only memory-map the zip format.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..files import confined_file, file_size
from .safetensors import Tensors, ignored_files, read_sharded

logger = logging.getLogger(__name__)

SINGLE_FILE = "pytorch_model.bin"
INDEX_FILE = "pytorch_model.bin.index.json"


def read_torch_bin_dir(directory: str | Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """Tensors of the shards in `pytorch_model.bin.index.json`, else of `pytorch_model.bin`."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if os.path.lexists(index):
        tensors, files = read_sharded(index, directory, read_torch_bin)
    else:
        files = [confined_file(directory, SINGLE_FILE, CheckpointError, "weights file")]
        tensors = Tensors(files[0])
        tensors.add(read_torch_bin(files[0]), files[0])
    strays = ignored_files(directory, "pytorch_model*.bin", files)
    if strays:
        logger.warning("%s: ignoring %s: not part of the model's weights", directory, ", ".join(strays))
    return tensors, files


def read_torch_bin(path: str | Path) -> dict[str, torch.Tensor]:
    """One .bin file; anything but a dict of str -> tensor is refused."""
    path = Path(path)
    file_size(path, CheckpointError, "checkpoint file")
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint file: {exc.strerror or exc}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused to load (weights_only=True): {str(exc).splitlines()[0]}") from None
    except MemoryError:
        raise CheckpointError(f"{path}: corrupt PyTorch checkpoint (it asks for more memory than there is)") from None
    except Exception as exc:  # zip/pickle corruption surfaces as RuntimeError, EOFError, ...
        first = (str(exc).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: corrupt PyTorch checkpoint ({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}: expected a dict of tensors keyed by name")
    return state
