"""Reading files that strangers wrote: regular files only, bounded sizes, strict JSON, confined paths.

Every helper takes the error class to raise (ConfigError, CheckpointError, TokenizerError), so that a
bad file surfaces as the library's error of the right kind, naming the file, never as a raw OSError,
RecursionError or ValueError from deep inside.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import LeanformersError

MAX_JSON_BYTES = 64 * 2**20  # config, tokenizer_config, index, ... files (tokenizer.json is read by `tokenizers`)
MAX_JSON_DEPTH = 100  # no file we read nests deeper than ~5


class _DuplicateKey(Exception):
    pass


def file_size(path: Path, error: type[LeanformersError], what: str = "file") -> int:
    """Size of `path`, which must be a regular file (symlinks followed); otherwise `error` naming it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except OSError as exc:  # ELOOP (symlink loop), EACCES, ENAMETOOLONG, ...
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise error(f"{path}: {what} is {kind}")
    return st.st_size


def read_bytes(path: Path, error: type[LeanformersError], what: str = "file", *, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes."""
    size = file_size(path, error, what)
    if size > limit:
        raise error(f"{path}: {what} is {size} bytes, more than the {limit} bytes such a file may have")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if len(data) > limit:  # the file grew while we read it
        raise error(f"{path}: {what} is larger than {limit} bytes")
    return data


def read_json(path: Path, error: type[LeanformersError], what: str = "JSON file", *,
              limit: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file strictly (see parse_json)."""
    return parse_json(read_bytes(path, error, what, limit=limit), str(path), error)


def parse_json(raw: bytes | str, where: str, error: type[LeanformersError]) -> Any:
    """JSON text -> Python values; duplicate keys, nesting deeper than MAX_JSON_DEPTH, integers of more than
    4300 digits and invalid UTF-8 raise `error` naming `where`."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise error(f"{where}: duplicate key {exc.args[0]!r} in a JSON object") from None
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more digits than int() converts
        raise error(f"{where}: invalid JSON value ({exc})") from None
    if _depth_exceeds(data, MAX_JSON_DEPTH):
        raise error(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return data


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` levels (iterative: no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def plain_file_name(name: object) -> bool:
    """A bare file name: no directory part, not '.', '..', absolute or containing NUL."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\x00" not in name and os.path.basename(name) == name)


def allowed_roots(directory: Path) -> list[Path]:
    """Where the files of a model directory may really live: the directory itself and, for a snapshot of the
    Hugging Face cache (models--org--name/snapshots/<commit>), the repository's blobs folder its links point to."""
    roots = [directory.resolve()]
    if directory.parent.name == "snapshots" and directory.parent.parent.name.startswith("models--"):
        roots.append((directory.parent.parent / "blobs").resolve())
    return roots


def confined_file(directory: Path, name: str, error: type[LeanformersError], what: str) -> Path:
    """directory/name after checking that it is a regular file that really lies inside the model directory.

    A symlink may point into the Hugging Face cache's blobs (that is how the cache is laid out) but not
    elsewhere: a hostile index or directory must not make us open files outside the model.
    """
    path = directory / name
    try:
        real = path.resolve()
        roots = allowed_roots(directory)
    except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop (Python < 3.13)
        raise error(f"{path}: cannot resolve {what}: {exc}") from None
    if not any(real == root or real.is_relative_to(root) for root in roots):
        raise error(f"{path}: {what} is a link to {real}, outside the model directory {directory}; "
                    "copy the file into the directory instead")
    file_size(path, error, what)
    return path
