"""The header of a GGUF file, parsed and validated before anything is allocated from it.

Layout (little-endian): magic 'GGUF', version (u32, 2 or 3), tensor count (u64), metadata count (u64),
metadata key/values, tensor infos (name, n_dims, dims innermost first, ggml type, offset), padding to
`general.alignment` (default 32), then the data section.

Checked here, as llama.cpp's reader does or stricter, each failure naming the file and the field:
- counts, string lengths and array lengths cannot exceed what the rest of the file can hold, so a
  corrupt length fails at once instead of reserving gigabytes; arrays nest at most MAX_ARRAY_DEPTH deep;
- metadata keys are unique, valid UTF-8 and at most 65535 bytes; value types are known; booleans are 0/1;
  `general.alignment` is a u32 power of two;
- tensor names are unique and shorter than 64 bytes; 1 to 4 dimensions, each > 0; a known ggml type;
  the row length a multiple of the type's block; the byte size follows from type and shape;
- offsets are exactly where llama.cpp expects them: the first at 0, each next one right after the
  previous tensor padded to the alignment, and the file ends where the last tensor (padded or not) ends.
  So a changed type, dimension or offset, a duplicated or dropped tensor info all fail: none of them
  can be read as another tensor's bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError

# GGUF metadata value types
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 10: "<u8", 11: "<i8", 12: "<f8"}
BOOL, STRING, ARRAY, UINT32 = 7, 8, 9, 4
VALUE_TYPE_NAMES = {0: "u8", 1: "i8", 2: "u16", 3: "i16", 4: "u32", 5: "i32", 6: "f32", 7: "bool", 8: "string",
                    9: "array", 10: "u64", 11: "i64", 12: "f64"}

MAX_ARRAY_DEPTH = 8  # llama.cpp's own files use arrays of scalars and strings only
MAX_KEY_BYTES = 65535
MAX_NAME_BYTES = 63  # GGML_MAX_NAME (64) includes the terminating NUL
MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32
# minimum bytes of one entry, to bound counts by the bytes left in the file
_MIN_KV = 8 + 1 + 4 + 1  # key length, 1-byte key, value type, 1-byte value
_MIN_TENSOR_INFO = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, one dim, type, offset
_MIN_ITEM = {STRING: 8, ARRAY: 12}
_U64 = struct.Struct("<Q")


def ggml_type_traits() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, elements per block, bytes per block), from the gguf package's tables."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(t): (t.name, block, size) for t, (block, size) in GGML_QUANT_SIZES.items()}


_TYPES = ggml_type_traits()


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: shape in HF order (outermost first), absolute byte range in the file."""

    name: str
    shape: tuple[int, ...]
    qtype: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    value_types: dict[str, int]  # GGUF value type of each metadata key
    tensors: list[TensorInfo]
    alignment: int
    data_start: int


class _Bad(Exception):
    """A header problem; parse_header turns it into a CheckpointError naming the file."""


class _Cursor:
    """Sequential little-endian reads that never run past the end of the buffer."""

    def __init__(self, buf: memoryview, pos: int = 0):
        self.buf, self.pos = buf, pos

    def left(self) -> int:
        return len(self.buf) - self.pos

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        if size > self.left():
            raise _Bad(f"truncated GGUF file: {what} runs past the end of the file")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def raw_string(self, what: str, limit: int | None = None) -> bytes:
        n = self.unpack("<Q", f"length of {what}")
        if limit is not None and n > limit:
            raise _Bad(f"{what} is {n} bytes long, more than {limit}")
        if n > self.left():
            raise _Bad(f"{what} claims {n} bytes but only {self.left()} remain in the file")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw

    def string(self, what: str) -> str:
        return self.raw_string(what).decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype], what)
        if vtype == BOOL:
            byte = self.unpack("<B", what)
            if byte > 1:
                raise _Bad(f"{what}: boolean byte {byte} is neither 0 nor 1")
            return bool(byte)
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            return self.array(what, depth)
        raise _Bad(f"{what}: unknown metadata value type {vtype}")

    def array(self, what: str, depth: int) -> list:
        if depth >= MAX_ARRAY_DEPTH:
            raise _Bad(f"{what}: arrays nested more than {MAX_ARRAY_DEPTH} deep")
        item_type = self.unpack("<I", f"item type of {what}")
        count = self.unpack("<Q", f"length of {what}")
        if item_type in _NUMPY:
            item_size = np.dtype(_NUMPY[item_type]).itemsize
        elif item_type == BOOL:
            item_size = 1
        elif item_type in _MIN_ITEM:
            item_size = _MIN_ITEM[item_type]
        else:
            raise _Bad(f"{what}: unknown array item type {item_type}")
        if count * item_size > self.left():
            raise _Bad(f"{what}: array of {count} items cannot fit in the {self.left()} bytes left in the file")
        if item_type in _NUMPY or item_type == BOOL:
            dt = np.dtype(_NUMPY.get(item_type, "<u1"))
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
            self.pos += count * item_size
            if item_type == BOOL:
                if count and int(arr.max()) > 1:
                    raise _Bad(f"{what}: boolean array holds bytes other than 0 and 1")
                arr = arr.astype(bool)
            return arr.tolist()
        if item_type == STRING:
            return self._strings(count, what)
        return [self.value(item_type, f"{what}[{i}]", depth + 1) for i in range(count)]

    def _strings(self, count: int, what: str) -> list[str]:
        """An array of strings (vocabularies: ~10^5 items), the checks of raw_string inlined for speed."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        for i in range(count):
            if end - pos < 8:
                raise _Bad(f"truncated GGUF file: {what}[{i}] runs past the end of the file")
            n = _U64.unpack_from(buf, pos)[0]
            pos += 8
            if n > end - pos:
                raise _Bad(f"{what}[{i}] claims {n} bytes but only {end - pos} remain in the file")
            out.append(str(buf[pos : pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        return out


def parse_header(buf: memoryview, path: Path) -> GGUFHeader:
    """Parse and validate the header of the GGUF file whose bytes are `buf` (see the module docstring)."""
    try:
        return _parse(buf)
    except _Bad as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _parse(buf: memoryview) -> GGUFHeader:
    cur = _Cursor(buf, 4)
    version = cur.unpack("<I", "version")
    if version not in (2, 3):
        raise _Bad(f"unsupported GGUF version {version} (expected 2 or 3)")
    n_tensors = cur.unpack("<Q", "tensor count")
    n_kv = cur.unpack("<Q", "metadata count")
    if n_kv * _MIN_KV > cur.left():
        raise _Bad(f"metadata count {n_kv} cannot fit in a file of {len(buf)} bytes")
    if n_tensors * _MIN_TENSOR_INFO > cur.left():
        raise _Bad(f"tensor count {n_tensors} cannot fit in a file of {len(buf)} bytes")
    metadata: dict[str, Any] = {}
    value_types: dict[str, int] = {}
    for i in range(n_kv):
        raw_key = cur.raw_string(f"metadata key #{i}", MAX_KEY_BYTES)
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"metadata key #{i} {raw_key[:64]!r} is not valid UTF-8") from None
        if not key:
            raise _Bad(f"metadata key #{i} is empty")
        if key in metadata:
            raise _Bad(f"duplicate metadata key {key!r}")
        vtype = cur.unpack("<I", f"value type of metadata key {key!r}")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")
        value_types[key] = vtype
    alignment = _alignment(metadata, value_types)
    infos = [_tensor_info(cur, i) for i in range(n_tensors)]
    data_start = -(-cur.pos // alignment) * alignment
    return GGUFHeader(version, metadata, value_types, _place(infos, alignment, data_start, len(buf)),
                      alignment, data_start)


def _alignment(metadata: dict[str, Any], value_types: dict[str, int]) -> int:
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    value, vtype = metadata["general.alignment"], value_types["general.alignment"]
    if vtype != UINT32:
        raise _Bad(f"metadata 'general.alignment' must be a u32, got a {VALUE_TYPE_NAMES.get(vtype, vtype)} "
                   f"({value!r})")
    if value <= 0 or value & (value - 1):
        raise _Bad(f"metadata 'general.alignment' must be a positive power of two, got {value}")
    return value


def _tensor_info(cur: _Cursor, i: int) -> tuple[str, tuple[int, ...], int, int]:
    raw = cur.raw_string(f"name of tensor #{i}", MAX_NAME_BYTES)
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad(f"name of tensor #{i} {raw!r} is not valid UTF-8") from None
    if not name:
        raise _Bad(f"tensor #{i} has an empty name")
    n_dims = cur.unpack("<I", f"dimension count of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise _Bad(f"tensor {name!r} has {n_dims} dimensions (expected 1 to {MAX_DIMS})")
    dims = tuple(cur.unpack("<Q", f"dimensions of tensor {name!r}") for _ in range(n_dims))
    if any(d <= 0 or d >= 2**63 for d in dims):
        raise _Bad(f"tensor {name!r} has invalid dimensions {list(dims)} (each must be > 0)")
    type_id = cur.unpack("<I", f"type of tensor {name!r}")
    offset = cur.unpack("<Q", f"offset of tensor {name!r}")
    return name, dims, type_id, offset


def _place(infos: list, alignment: int, data_start: int, file_size: int) -> list[TensorInfo]:
    """Check types, sizes and offsets of all tensor infos against each other and the file."""
    out: list[TensorInfo] = []
    names: set[str] = set()
    expected = 0  # where the next tensor must start, relative to the data section
    after = "at the start of the data section"
    for name, dims, type_id, offset in infos:
        if name in names:
            raise _Bad(f"duplicate tensor name {name!r}")
        names.add(name)
        if type_id not in _TYPES:
            raise _Bad(f"tensor {name!r} has unknown ggml type id {type_id}")
        qtype, block, block_bytes = _TYPES[type_id]
        if dims[0] % block:
            raise _Bad(f"tensor {name!r} ({qtype}) has row length {dims[0]}, not a multiple of the block size {block}")
        numel = 1
        for d in dims:
            numel *= d
        nbytes = numel // block * block_bytes
        if offset != expected:
            raise _Bad(f"tensor {name!r} has offset {offset}, expected {expected} {after} (each tensor must "
                       f"follow the previous one, padded to the alignment of {alignment} bytes)")
        end = data_start + offset + nbytes
        if end > file_size:
            raise _Bad(f"truncated GGUF file: tensor {name!r} ({qtype}, shape {list(reversed(dims))}) needs bytes "
                       f"{data_start + offset}..{end}, the file has {file_size}")
        out.append(TensorInfo(name, tuple(reversed(dims)), qtype, data_start + offset, nbytes))
        expected = offset + -(-nbytes // alignment) * alignment
        after = f"after tensor {name!r} ({qtype}, shape {list(reversed(dims))})"
    if out:
        last = out[-1]
        ends = (last.offset + last.nbytes, data_start + expected)
        if file_size not in ends:
            raise _Bad(f"the data section should end at byte {ends[0]} (or {ends[1]} with padding) after tensor "
                       f"{last.name!r}, but the file has {file_size} bytes; a tensor's type or shape is wrong")
    return out
