"""Safetensors files, single or sharded, memory-mapped: tensors are views of the file, not copies.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the data block. Every field is validated so that a corrupt file gives a message naming the
file and the tensor, never a raw struct/JSON error.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

from ..errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file as zero-copy views of a private memory map."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path}: safetensors file not found") from None
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, header length missing)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, _MAX_HEADER):
            raise CheckpointError(
                f"{path}: bad safetensors header length {header_len} (file has {size} bytes)"
            )
        raw_header = f.read(header_len)
        try:
            header = json.loads(raw_header)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: safetensors header must be a JSON object")
        header.pop("__metadata__", None)
        data_start = 8 + header_len
        data_size = size - data_start
        # ACCESS_COPY: a private, writable mapping; pages are shared with the page cache until written.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        dtype, shape, (begin, end) = _validate_entry(path, name, info, data_size)
        numel = 1
        for d in shape:
            numel *= d
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        offset = data_start + begin
        if offset % dtype.itemsize == 0:
            t = torch.frombuffer(mm, dtype=dtype, count=numel, offset=offset)
        else:  # misaligned data: copy rather than hand out an unaligned view
            t = torch.frombuffer(mm, dtype=torch.uint8, count=end - begin, offset=offset).clone().view(dtype)
        tensors[name] = t.view(shape)
    return tensors


def _validate_entry(path: Path, name: str, info: object, data_size: int):
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: header entry for tensor {name!r} is not an object")
    dtype_name = info.get("dtype")
    if dtype_name not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name!r}")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    offsets = info.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    dtype = DTYPES[dtype_name]
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * dtype.itemsize:
        raise CheckpointError(
            f"{path}: tensor {name!r} byte range {offsets} does not match shape {shape} and dtype {dtype_name}"
        )
    if offsets[1] > data_size:
        raise CheckpointError(
            f"{path}: tensor {name!r} data offsets {offsets} are out of range (data block has {data_size} bytes;"
            " the file is truncated or corrupt)"
        )
    return dtype, shape, offsets


def read_safetensors_dir(directory: str | Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """Tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{index}: invalid shard index ({exc})") from None
        files = sorted({directory / f for f in weight_map.values()})
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index}: lists shard {file.name!r}, which is missing")
            tensors.update(read_safetensors(file))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{index}: tensors listed in the index are missing from the shards: {missing[:5]}")
        return tensors, files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no .safetensors files")
    tensors = {}
    for file in files:
        tensors.update(read_safetensors(file))
    return tensors, files


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write tensors in safetensors format (used by tests and tools)."""
    names = {v: k for k, v in DTYPES.items()}
    header: dict[str, object] = {}
    offset = 0
    blobs = []
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)
