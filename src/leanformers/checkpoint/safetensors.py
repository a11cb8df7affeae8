"""Safetensors files, single or sharded, memory-mapped: tensors are views of the file, not copies.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the data block. The header is held to the rules of the format's specification (as the
safetensors library's own reader does), each failure naming the file and the tensor:
- N is at most 100 MB and 8 + N fits in the file; the JSON starts with '{', is valid UTF-8, has no
  duplicate keys; `__metadata__`, if present, maps strings to strings;
- every entry has a known dtype, a shape of non-negative integers and two integer data_offsets
  (booleans and floats are refused) whose difference is exactly the shape's byte size;
- the tensors cover the data block exactly: sorted by offset, each starts where the previous one
  ends, the first at 0, the last at the end of the file. No overlap, no gap, no trailing bytes, so a
  shifted header length or a copied offset cannot make one tensor read another's bytes.

Which files belong to a model directory is decided by `model.safetensors.index.json` (its shards must
be plain file names inside the directory) or, without an index, by the single conventional
`model.safetensors`. Other *.safetensors files (adapters, strays) are ignored with a log line: a
file that happens to sort later never replaces the model's weights.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..files import confined_file, file_size, parse_json, plain_file_name, read_json

logger = logging.getLogger(__name__)

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
_MAX_HEADER = 100_000_000  # the specification's limit
_MAX_DIM = 1 << 48
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class Tensors(dict):
    """name -> tensor of a checkpoint directory, remembering for error messages the file of each tensor
    (`files`) and the file that decided which tensors there are (`origin`: the index or the single file)."""

    def __init__(self, origin: Path) -> None:
        super().__init__()
        self.origin = origin
        self.files: dict[str, Path] = {}

    def add(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        self.update(tensors)
        self.files.update(dict.fromkeys(tensors, path))


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file as zero-copy views of a private memory map."""
    path = Path(path)
    size = file_size(path, CheckpointError, "safetensors file")
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, header length missing)")
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{path}: bad safetensors header length {header_len} (file has {size} bytes)")
            raw_header = f.read(header_len)
            header = _parse_header(path, raw_header)
            data_start = 8 + header_len
            entries = _validate_layout(path, header, size - data_start)
            # ACCESS_COPY: a private, writable mapping; pages are shared with the page cache until written.
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > data_start else None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read safetensors file: {exc.strerror or exc}") from None
    tensors: dict[str, torch.Tensor] = {}
    for name, dtype, shape, begin, end in entries:
        if begin == end:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        offset = data_start + begin
        if offset % dtype.itemsize == 0:
            t = torch.frombuffer(mm, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=offset)
        else:  # misaligned data: copy rather than hand out an unaligned view
            t = torch.frombuffer(mm, dtype=torch.uint8, count=end - begin, offset=offset).clone().view(dtype)
        tensors[name] = t.view(shape)
    return tensors


def _parse_header(path: Path, raw: bytes) -> dict:
    if not raw.startswith(b"{"):
        raise CheckpointError(f"{path}: safetensors header is not valid JSON (it must start with '{{', "
                              f"starts with {raw[:8]!r})")
    header = parse_json(raw, f"{path}: safetensors header", CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header must be a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: safetensors __metadata__ must map strings to strings")
    return header


def _validate_layout(path: Path, header: dict, data_size: int) -> list[tuple[str, torch.dtype, list[int], int, int]]:
    """Check every entry, then that the entries tile the data block exactly."""
    entries = [(name, *_validate_entry(path, name, info, data_size)) for name, info in header.items()]
    expected, previous = 0, None
    for name, _, _, begin, end in sorted(entries, key=lambda e: (e[3], e[4])):
        if begin != expected:
            where = f"tensor {previous!r} ends at {expected}" if previous else "the data block starts at 0"
            kind = "overlap" if begin < expected else "a gap"
            raise CheckpointError(f"{path}: tensor {name!r} starts at data offset {begin} but {where} ({kind}; "
                                  "tensors must cover the data block exactly)")
        expected, previous = end, name
    if expected != data_size:
        raise CheckpointError(f"{path}: the tensors cover {expected} bytes of the {data_size}-byte data block "
                              "(the header length or the offsets are wrong, or bytes were appended)")
    return entries


def _validate_entry(path: Path, name: str, info: object, data_size: int) -> tuple[torch.dtype, list[int], int, int]:
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: header entry for tensor {name!r} is not an object")
    dtype_name = info.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {_short(dtype_name)}")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {_short(shape)}")
    offsets = info.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {_short(offsets)}")
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
    return dtype, shape, offsets[0], offsets[1]


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_index(index: Path, directory: Path) -> dict[str, str]:
    """The weight_map of a shard index: tensor name -> shard file name, every name a plain file name."""
    data = read_json(index, CheckpointError, "shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: invalid shard index (expected an object with a non-empty 'weight_map')")
    for tensor, shard in weight_map.items():
        if not plain_file_name(shard):
            raise CheckpointError(f"{index}: tensor {tensor!r} is listed in shard {_short(shard)}, which is not a "
                                  f"plain file name inside the model directory {directory}")
    return weight_map


def shard_path(index: Path, directory: Path, shard: str) -> Path:
    """The path of a shard an index lists, refused if it is missing or leads outside the directory."""
    try:
        return confined_file(directory, shard, CheckpointError, "shard")
    except CheckpointError as exc:
        raise CheckpointError(f"{index}: lists shard {shard!r}, which cannot be used: {exc}") from None


def read_sharded(index: Path, directory: Path, read) -> tuple[Tensors, list[Path]]:
    """Tensors of the shards an index lists; each tensor must be in the shard the index names, and no shard
    may hold tensors the index does not assign to it (the index and the shards must agree)."""
    weight_map = read_index(index, directory)
    by_shard: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(tensor)
    tensors = Tensors(index)
    files = []
    for shard in sorted(by_shard):
        path = shard_path(index, directory, shard)
        part = read(path)
        missing = sorted(by_shard[shard] - part.keys())
        if missing:
            raise CheckpointError(f"{index}: lists {len(missing)} tensors in {path.name} that it does not hold, "
                                  f"e.g. {missing[:3]}")
        extra = sorted(part.keys() - by_shard[shard])
        if extra:
            raise CheckpointError(f"{path}: holds {len(extra)} tensors that {index.name} does not assign to it, "
                                  f"e.g. {extra[:3]}")
        tensors.add(part, path)
        files.append(path)
    return tensors, files


def ignored_files(directory: Path, pattern: str, used: list[Path]) -> list[str]:
    """Names of files matching `pattern` that the model does not use (logged, never loaded)."""
    names = {p.name for p in used}
    return sorted(p.name for p in directory.glob(pattern) if p.name not in names)


def read_safetensors_dir(directory: str | Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """Tensors of the shards in `model.safetensors.index.json`, else of `model.safetensors`."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if os.path.lexists(index):
        tensors, files = read_sharded(index, directory, read_safetensors)
    else:
        files = [confined_file(directory, SINGLE_FILE, CheckpointError, "weights file")]
        tensors = Tensors(files[0])
        tensors.add(read_safetensors(files[0]), files[0])
    strays = ignored_files(directory, "*.safetensors", files)
    if strays:
        logger.warning("%s: ignoring %s: the model's weights are %s", directory, ", ".join(strays),
                       INDEX_FILE + "'s shards" if os.path.lexists(index) else SINGLE_FILE)
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
