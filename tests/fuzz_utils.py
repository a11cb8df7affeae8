"""Seeded fuzzing of `leanformers.load` over hostile model files, every load in a capped worker process.

Mutants are built from pristine models (a tiny HF directory, a sharded one, a tiny Q4_1 GGUF with a chat
template, optionally the bundled SmolLM2 GGUF) by corrupting one thing: GGUF header fields and metadata,
safetensors headers, shard indexes and directory contents, config.json, tokenizer files, chat templates.
A worker process (RLIMIT_AS cap, per-load timeout enforced by the parent) loads each one and reports:

  error  a LeanformersError; it passes if its message names a file at fault
  ok     a model whose weights equal the pristine load's, bit for bit; the tokenizer then encodes a text
         and renders a chat (errors there are judged like load errors)

Anything else fails: a raw exception, wrong weights, a hang (timeout), a crash or memory blow-up (the
worker dies). Mutations that make a *valid* file with other content (swapping the offsets of two
same-shaped tensors, retyping F16 as BF16) are not generated: no reader can tell them from the real thing.

tests/test_hostile.py runs a small corpus; bench/fuzz_load.py a large one.
"""

from __future__ import annotations

import copy
import json
import os
import random
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ARCH = "llama"
HOSTILE_TEMPLATES = [
    "{{ 99999999**99999999 }}",
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}",
    "{{ 'a' * 10000000000 }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{{ 'x'|center(10000000000) }}",
    "{{ '%99999999999s' % 1 }}",
    "{{ '{:>99999999999}'.format(1) }}",
    "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ raise_exception('refused') }}",
    "{% for m in messages %}{{ m.content }",
    "{{ messages[0].content.zfill(10000000000) }}",
    "{{ (messages|tojson) * 100000000 }}",
    "{{ lipsum(100000000) }}",
    "{{ [1]|slice(1000000000)|list }}",
    "{{ range(100000)|join(' ' * 100000) }}",
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


# ---------------------------------------------------------------------------------------------- GGUF bytes
def _u32(v: int) -> bytes:
    return struct.pack("<I", v)


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def _gstr(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return _u64(len(raw)) + raw


_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_value(vtype: int, value: Any) -> bytes:
    """Encode a metadata value; arrays are (item_type, [items])."""
    if vtype in _FMT:
        return struct.pack(_FMT[vtype], value)
    if vtype == 8:
        return _gstr(value)
    item_type, items = value
    return _u32(item_type) + _u64(len(items)) + b"".join(gguf_value(item_type, i) for i in items)


def _skip_value(buf: bytes, pos: int, vtype: int) -> int:
    if vtype in _FMT:
        return pos + struct.calcsize(_FMT[vtype])
    if vtype == 8:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    item_type, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item_type in _FMT:
        return pos + count * struct.calcsize(_FMT[item_type])
    for _ in range(count):
        pos = _skip_value(buf, pos, item_type)
    return pos


@dataclass
class RawGGUF:
    """A GGUF file taken apart (independently of leanformers' reader) so that any field can be rewritten."""

    version: int
    kvs: list[list]  # [key, vtype, raw value bytes]
    infos: list[list]  # [name, dims innermost first, type id, offset]
    alignment: int
    data: bytes
    spans: dict = field(default_factory=dict)  # field -> byte position, for in-place patches

    @classmethod
    def parse(cls, buf: bytes) -> "RawGGUF":
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        pos, kvs, spans = 24, [], {}
        for _ in range(n_kv):
            n = struct.unpack_from("<Q", buf, pos)[0]
            key = buf[pos + 8 : pos + 8 + n].decode()
            pos += 8 + n
            vtype = struct.unpack_from("<I", buf, pos)[0]
            end = _skip_value(buf, pos + 4, vtype)
            spans[f"kv:{key}"] = pos + 4
            kvs.append([key, vtype, buf[pos + 4 : end]])
            pos = end
        infos = []
        spans["infos_start"] = pos
        for i in range(n_tensors):
            n = struct.unpack_from("<Q", buf, pos)[0]
            name = buf[pos + 8 : pos + 8 + n].decode()
            pos += 8 + n
            n_dims = struct.unpack_from("<I", buf, pos)[0]
            dims = list(struct.unpack_from(f"<{n_dims}Q", buf, pos + 4))
            spans[f"dims:{i}"] = pos + 4
            pos += 4 + 8 * n_dims
            type_id, offset = struct.unpack_from("<IQ", buf, pos)
            spans[f"type:{i}"], spans[f"offset:{i}"] = pos, pos + 4
            pos += 12
            infos.append([name, dims, type_id, offset])
        alignment = 32
        for key, vtype, raw in kvs:
            if key == "general.alignment" and vtype == 4:
                alignment = struct.unpack("<I", raw)[0]
        start = -(-pos // alignment) * alignment
        spans["data_start"] = start
        return cls(version, kvs, infos, alignment, buf[start:], spans)

    def to_bytes(self, *, n_tensors: int | None = None, n_kv: int | None = None) -> bytes:
        head = [b"GGUF", _u32(self.version), _u64(len(self.infos) if n_tensors is None else n_tensors),
                _u64(len(self.kvs) if n_kv is None else n_kv)]
        for key, vtype, raw in self.kvs:
            head += [_gstr(key), _u32(vtype), raw]
        for name, dims, type_id, offset in self.infos:
            head += [_gstr(name), _u32(len(dims)), *(_u64(d) for d in dims), _u32(type_id), _u64(offset)]
        out = b"".join(head)
        return out + b"\0" * (-len(out) % self.alignment) + self.data

    def set_kv(self, key: str, vtype: int, raw: bytes) -> None:
        for kv in self.kvs:
            if kv[0] == key:
                kv[1], kv[2] = vtype, raw
                return
        self.kvs.append([key, vtype, raw])


# ------------------------------------------------------------------------------------------------- corpus
@dataclass
class Mutant:
    id: int
    family: str
    what: str
    path: str  # what leanformers.load gets
    base: str  # path of the pristine model the weights are compared with
    names: tuple[str, ...]  # file names an error message may name; () = the load must succeed
    cleanup: Path | None = None


class Corpus:
    """Pristine models under `work`, and the seeded mutants made from them."""

    def __init__(self, work: Path, *, hf_single: Path, hf_sharded: Path, smollm2: Path | None = None):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.hf_single, self.hf_sharded, self.smollm2 = hf_single, hf_sharded, smollm2
        self.gguf = work / "tiny.Q4_1.gguf"
        if not self.gguf.exists():
            from gguf import GGMLQuantizationType

            from gguf_utils import write_gguf_from_hf_dir

            write_gguf_from_hf_dir(hf_sharded, work / "plain.gguf", qtype=GGMLQuantizationType.Q4_1)
            raw = RawGGUF.parse((work / "plain.gguf").read_bytes())
            template = json.loads((hf_single / "tokenizer_config.json").read_text())["chat_template"]
            raw.set_kv("tokenizer.chat_template", 8, _gstr(template))
            self.gguf.write_bytes(raw.to_bytes())
        self.gguf_raw = RawGGUF.parse(self.gguf.read_bytes())
        self.smol_raw = RawGGUF.parse(_read_header(smollm2)) if smollm2 else None
        self._zeros = work / "zeros"  # stray/outside shards: the real tensor names, all zero
        if not self._zeros.exists():
            self._zeros.mkdir()
            from leanformers.checkpoint.safetensors import read_safetensors, write_safetensors

            for src in [hf_single / "model.safetensors", *sorted(hf_sharded.glob("model-*.safetensors"))]:
                zeros = {k: v.clone().zero_() for k, v in read_safetensors(src).items()}
                write_safetensors(zeros, self._zeros / src.name)
        self._next = 0

    def families(self) -> list[str]:
        return ["gguf", "safetensors", "index", "config", "tokenizer", "template"] + (["smollm2"] if self.smollm2 else [])

    def mutant(self, family: str, rng: random.Random) -> Mutant:
        """One fresh mutant of `family` on disk (under work/m<id>/)."""
        self._next += 1
        root = self.work / f"m{self._next}"
        if root.exists():
            shutil.rmtree(root)
        root.mkdir()
        make: Callable = getattr(self, f"_{family}")
        what, path, base, names = make(rng, root)
        return Mutant(self._next, family, what, str(path), str(base), tuple(names), root)

    # --- GGUF ------------------------------------------------------------------------------------------
    def _gguf(self, rng: random.Random, root: Path):
        raw = copy.deepcopy(self.gguf_raw)
        path = root / "model.gguf"
        what, data = _mutate_gguf(raw, rng)
        path.write_bytes(data)
        return what, path, self.gguf, [path.name]

    def _smollm2(self, rng: random.Random, root: Path):
        path = root / "smol.gguf"
        shutil.copyfile(self.smollm2, path)
        spans = self.smol_raw.spans
        with open(path, "r+b") as f:
            kind = rng.choice(["flip", "flip", "type", "offset", "dims", "u32"])
            if kind == "flip":  # half of the time in the tensor infos, else anywhere in the header
                low = spans["infos_start"] if rng.random() < 0.5 else 4
                positions = sorted(rng.randrange(low, spans["data_start"]) for _ in range(rng.randint(1, 4)))
                for p in positions:
                    f.seek(p)
                    f.write(bytes([rng.randrange(256)]))
                what = f"header bytes {positions} set at random"
            else:
                i = rng.randrange(len(self.smol_raw.infos))
                name, dims, type_id, offset = self.smol_raw.infos[i]
                if kind == "type":
                    new = rng.choice([t for t in (0, 1, 2, 3, 8, 12, 13, 14, 10, 99) if t != type_id])
                    f.seek(spans[f"type:{i}"])
                    f.write(_u32(new))
                    what = f"tensor {name} type {type_id} -> {new}"
                elif kind == "offset":
                    new = rng.choice([offset + 1, offset + 32, max(offset - 32, 0), 0, 2**40])
                    f.seek(spans[f"offset:{i}"])
                    f.write(_u64(new))
                    what = f"tensor {name} offset {offset} -> {new}"
                elif kind == "dims":
                    j = rng.randrange(len(dims))
                    new = rng.choice([dims[j] * 2, dims[j] + 32, 0, 2**32 - 1, 2**63])
                    f.seek(spans[f"dims:{i}"] + 8 * j)
                    f.write(_u64(new))
                    what = f"tensor {name} dim {j} {dims[j]} -> {new}"
                else:
                    keys = [k for k, vt, _ in self.smol_raw.kvs if vt == 4]
                    key = rng.choice(keys)
                    new = rng.choice([0, 1, 3, 100000, 2**31, 2**32 - 1])
                    f.seek(spans[f"kv:{key}"])
                    f.write(_u32(new))
                    what = f"metadata {key} (u32) -> {new}"
        return what, path, self.smollm2, [path.name]

    # --- safetensors -----------------------------------------------------------------------------------
    def _safetensors(self, rng: random.Random, root: Path):
        d = _copy_dir(self.hf_single, root / "m")
        path = d / "model.safetensors"
        what, data = _mutate_safetensors(path.read_bytes(), rng)
        path.write_bytes(data)
        return what, d, self.hf_single, [path.name]

    def _index(self, rng: random.Random, root: Path):
        d = _copy_dir(self.hf_sharded, root / "m")
        index = d / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        wm = data["weight_map"]
        shards = sorted(set(wm.values()))
        victim = rng.choice(sorted(wm))
        shard = wm[victim]
        outside = root / shard  # zeroed copy next to (outside) the model directory
        shutil.copyfile(self._zeros / shard, outside)
        names = [index.name, shard]
        kind = rng.choice(["dotdot", "absolute", "subdir", "symlink_out", "symlink_loop", "dir_shard", "wrong_shard",
                           "drop_entry", "missing_shard", "not_object", "bad_value", "stray", "stray_single",
                           "deep", "dup_key", "empty_name"])
        what = kind
        if kind == "dotdot":
            for k, v in wm.items():
                if v == shard:
                    wm[k] = "../" + shard
        elif kind == "absolute":
            for k, v in wm.items():
                if v == shard:
                    wm[k] = str(outside)
        elif kind == "subdir":
            (d / "sub").mkdir()
            shutil.move(d / shard, d / "sub" / shard)
            for k, v in wm.items():
                if v == shard:
                    wm[k] = "sub/" + shard
        elif kind == "symlink_out":
            (d / shard).unlink()
            os.symlink(outside, d / shard)
        elif kind == "symlink_loop":
            (d / shard).unlink()
            os.symlink(d / shard, d / shard)
        elif kind == "dir_shard":
            (d / shard).unlink()
            (d / shard).mkdir()
        elif kind == "wrong_shard":
            others = [s for s in shards if s != shard]
            wm[victim] = others[0] if others else "model-x.safetensors"
        elif kind == "drop_entry":
            del wm[victim]
        elif kind == "missing_shard":
            wm[victim] = "model-99999-of-99999.safetensors"
        elif kind == "not_object":
            data["weight_map"] = rng.choice([list(wm.items()), "x", None, 5])
        elif kind == "bad_value":
            wm[victim] = rng.choice([None, 3, True, [shard], {"f": shard}, "", ".", ".."])
        elif kind == "stray":  # a stray file with the same tensor names next to the shards
            shutil.copyfile(self._zeros / shard, d / "zz-extra.safetensors")
            return f"index: {kind}", d, self.hf_sharded, []
        elif kind == "stray_single":  # a directory without index: model.safetensors + a stray
            d = _copy_dir(self.hf_single, root / "single")
            shutil.copyfile(self._zeros / "model.safetensors", d / "zz-extra.safetensors")
            return kind, d, self.hf_single, []
        elif kind == "deep":
            wm[victim] = "@DEEP@"
            index.write_text(json.dumps(data).replace('"@DEEP@"', "[" * 3000 + "]" * 3000))
            return f"index: {kind}", d, self.hf_sharded, names
        elif kind == "dup_key":
            text = json.dumps(data)
            text = text.replace('"weight_map": {', '"weight_map": {' + json.dumps(victim) + ': "x.safetensors", ', 1)
            index.write_text(text)
            return kind, d, self.hf_sharded, names
        elif kind == "empty_name":
            wm[""] = shard
        index.write_text(json.dumps(data))
        return f"index: {what} ({victim} in {shard})", d, self.hf_sharded, names

    # --- config / tokenizer / template ----------------------------------------------------------------
    def _config(self, rng: random.Random, root: Path):
        d = _copy_dir(self.hf_single, root / "m")
        path = d / "config.json"
        what, text = _mutate_json(path.read_text(), rng, _CONFIG_VALUES)
        _write_or_replace(path, text, rng)
        return f"config: {what}", d, self.hf_single, [path.name]

    def _tokenizer(self, rng: random.Random, root: Path):
        d = _copy_dir(self.hf_single, root / "m")
        name = rng.choice(["tokenizer.json", "tokenizer_config.json", "tokenizer_config.json", "generation_config.json",
                           "special_tokens_map.json"])
        path = d / name
        if not path.exists():
            path.write_text(json.dumps({"eos_token_id": 2, "bos_token": "<|im_start|>"}))
        what, text = _mutate_json(path.read_text(), rng, _TOKENIZER_VALUES)
        _write_or_replace(path, text, rng)
        return f"{name}: {what}", d, self.hf_single, [name]

    def _template(self, rng: random.Random, root: Path):
        original = json.loads((self.hf_single / "tokenizer_config.json").read_text())["chat_template"]
        if rng.random() < 0.6:
            template = rng.choice(HOSTILE_TEMPLATES)
        else:  # the real template with a few characters changed
            chars = list(original)
            for _ in range(rng.randint(1, 4)):
                chars.insert(rng.randrange(len(chars)), rng.choice("{}%()[]'\"~*+-.|#"))
            template = "".join(chars)
        if rng.random() < 0.5:
            d = _copy_dir(self.hf_single, root / "m")
            cfg = json.loads((d / "tokenizer_config.json").read_text())
            cfg["chat_template"] = template
            (d / "tokenizer_config.json").write_text(json.dumps(cfg))
            return f"template in tokenizer_config.json: {template[:60]!r}", d, self.hf_single, ["tokenizer_config.json"]
        raw = copy.deepcopy(self.gguf_raw)
        raw.set_kv("tokenizer.chat_template", 8, _gstr(template))
        path = root / "model.gguf"
        path.write_bytes(raw.to_bytes())
        return f"template in GGUF: {template[:60]!r}", path, self.gguf, [path.name]


def _read_header(path: Path, limit: int = 8 << 20) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit)


def _copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _write_or_replace(path: Path, text: str | None, rng: random.Random) -> None:
    """Write the mutated text; None means: replace the file by something that is not a regular file."""
    if text is not None:
        path.write_text(text)
        return
    path.unlink()
    if rng.random() < 0.5:
        path.mkdir()
    else:
        os.symlink(path, path)  # a symlink loop


# ------------------------------------------------------------------------------------------------ mutators
_GGUF_META = [  # (key, type, value) written over or added to the metadata
    ("block_count", 4, 100000), ("block_count", 4, 2**32 - 1), ("block_count", 10, 2**63), ("block_count", 4, 0),
    ("block_count", 5, -1), ("block_count", 8, "abc"), ("block_count", 6, float("nan")), ("block_count", 7, True),
    ("embedding_length", 8, "abc"), ("embedding_length", 6, float("nan")), ("embedding_length", 4, 0),
    ("attention.head_count", 4, 0), ("attention.head_count", 5, -4), ("attention.head_count_kv", 4, 0),
    ("attention.head_count_kv", 4, 7), ("attention.head_count", 9, (4, [1, 2])),
    ("context_length", 4, 0), ("context_length", 5, -1), ("context_length", 10, 2**63),
    ("rope.freq_base", 6, float("nan")), ("rope.freq_base", 6, float("inf")), ("rope.freq_base", 6, 0.0),
    ("rope.freq_base", 6, -1.0), ("rope.freq_base", 8, "1e4"),
    ("attention.layer_norm_rms_epsilon", 6, float("nan")), ("attention.layer_norm_rms_epsilon", 6, -1.0),
    ("attention.layer_norm_rms_epsilon", 8, "abc"), ("rope.dimension_count", 4, 2**31),
    ("attention.key_length", 4, 2**31), ("attention.key_length", 4, 3), ("feed_forward_length", 4, 10**9),
    ("vocab_size", 4, 0), ("vocab_size", 4, 2**31), ("attention.sliding_window", 8, "x"),
    ("rope.scaling.type", 8, "yarn"), ("rope.scaling.type", 4, 1),
    ("general.architecture", 9, (8, ["llama"])), ("general.architecture", 4, 5), ("general.architecture", 8, "mamba"),
    ("general.alignment", 5, -32), ("general.alignment", 4, 0), ("general.alignment", 4, 3),
    ("general.alignment", 4, 2**31), ("general.alignment", 10, 32), ("general.alignment", 4, 64),
    ("tokenizer.ggml.bos_token_id", 8, "x"), ("tokenizer.ggml.bos_token_id", 4, 10**6),
    ("tokenizer.ggml.eos_token_id", 5, -2), ("tokenizer.ggml.add_bos_token", 8, "false"),
    ("tokenizer.ggml.tokens", 4, 7), ("tokenizer.ggml.tokens", 9, (4, [1, 2, 3])),
    ("tokenizer.ggml.token_type", 9, (5, [1])), ("tokenizer.ggml.merges", 4, 1), ("tokenizer.ggml.model", 4, 1),
    ("tokenizer.ggml.pre", 9, (8, ["x"])), ("tokenizer.chat_template", 4, 1),
]


def _mutate_gguf(raw: RawGGUF, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["meta", "meta", "meta", "info", "info", "info", "dup_info", "drop_info", "counts", "dup_key",
                       "deep", "huge_array", "huge_string", "bad_vtype", "bool", "flip", "truncate"])
    if kind == "meta":
        key, vtype, value = rng.choice(_GGUF_META)
        full = key if key.startswith(("general.", "tokenizer.")) else f"{ARCH}.{key}"
        raw.set_kv(full, vtype, gguf_value(vtype, value))
        return f"metadata {full} := {value!r:.40} (type {vtype})", raw.to_bytes()
    if kind == "info":
        i = rng.randrange(len(raw.infos))
        info = raw.infos[i]
        sub = rng.choice(["type", "offset", "dims", "n_dims", "other_offset", "name"])
        if sub == "type":
            new = rng.choice([t for t in (0, 1, 2, 3, 6, 8, 12, 14, 10, 31, 1000) if t != info[2]])
            what = f"tensor {info[0]} type {info[2]} -> {new}"
            info[2] = new
        elif sub == "offset":
            new = info[3] + rng.choice([1, 32, -32, 4096, 2**40])
            what = f"tensor {info[0]} offset {info[3]} -> {new}"
            info[3] = max(new, 0)
        elif sub == "other_offset":
            other = rng.choice(raw.infos)
            what = f"tensor {info[0]} offset -> {other[0]}'s {other[3]}"
            info[3] = other[3]
        elif sub == "dims":
            j = rng.randrange(len(info[1]))
            new = rng.choice([info[1][j] * 2, info[1][j] + 32, 0, 2**32 - 1, 2**63, info[1][j] // 2])
            what = f"tensor {info[0]} dim {j} {info[1][j]} -> {new}"
            info[1][j] = new
        elif sub == "n_dims":
            info[1] = rng.choice([[], [1] * 5, info[1] + [1]])
            what = f"tensor {info[0]} dims -> {info[1]}"
        else:
            other = rng.choice(raw.infos)
            what = f"tensor {info[0]} renamed {other[0]}"
            info[0] = other[0]
        return what, raw.to_bytes()
    if kind == "dup_info":
        i = rng.randrange(len(raw.infos))
        raw.infos.insert(i + 1, list(raw.infos[i]))
        return f"tensor info {raw.infos[i][0]} duplicated", raw.to_bytes()
    if kind == "drop_info":
        i = rng.randrange(len(raw.infos))
        name = raw.infos.pop(i)[0]
        return f"tensor info {name} dropped", raw.to_bytes()
    if kind == "counts":
        nt, nk = rng.choice([(len(raw.infos) + 1, None), (None, len(raw.kvs) + 1), (2**63, None), (None, 2**62),
                             (len(raw.infos) - 1, None), (None, 0)])
        return f"counts tensors={nt} kv={nk}", raw.to_bytes(n_tensors=nt, n_kv=nk)
    if kind == "dup_key":
        raw.kvs.append(list(rng.choice(raw.kvs)))
        return f"metadata key {raw.kvs[-1][0]} duplicated", raw.to_bytes()
    if kind == "deep":
        inner = struct.pack("<IQ", 0, 0)
        for _ in range(5000):
            inner = struct.pack("<IQ", 9, 1) + inner
        raw.set_kv("general.deep", 9, inner)
        return "array nested 5000 deep", raw.to_bytes()
    if kind == "huge_array":
        raw.set_kv("general.huge", 9, struct.pack("<IQ", rng.choice([8, 9, 10]), 2**62))
        return "array claiming 2**62 items", raw.to_bytes()
    if kind == "huge_string":
        raw.set_kv("general.name", 8, _u64(2**62) + b"x")
        return "string claiming 2**62 bytes", raw.to_bytes()
    if kind == "bad_vtype":
        raw.set_kv("general.odd", rng.choice([13, 99, 2**31]), b"\0" * 8)
        return "unknown metadata value type", raw.to_bytes()
    if kind == "bool":
        raw.set_kv("tokenizer.ggml.add_bos_token", 7, b"\x03")
        return "boolean byte 3", raw.to_bytes()
    data = bytearray(raw.to_bytes())
    header_end = len(data) - len(raw.data)
    if kind == "flip":
        positions = sorted(rng.randrange(4, header_end) for _ in range(rng.randint(1, 6)))
        for p in positions:
            data[p] = rng.randrange(256)
        return f"header bytes {positions} set at random", bytes(data)
    cut = rng.randrange(4, len(data))
    return f"truncated at {cut} of {len(data)}", bytes(data[:cut])


def _mutate_safetensors(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    kind = rng.choice(["header_len", "copy_offsets", "shift", "offset_type", "dtype", "shape", "dup_key", "remove",
                       "add", "metadata", "deep", "leading_space", "append", "truncate", "flip", "big_ints"])

    def pack(h: dict, raw_text: str | None = None) -> bytes:
        text = (raw_text if raw_text is not None else json.dumps(h)).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text + body

    if kind == "header_len":
        delta = rng.choice([-1, 1, -8, 8, 2**40])
        return f"header length {n} -> {n + delta}", struct.pack("<Q", max(n + delta, 0)) + data[8:]
    if kind == "copy_offsets":
        other = rng.choice([k for k in names if k != name] or names)
        entry["data_offsets"] = list(header[other]["data_offsets"])
        return f"{name} data_offsets copied from {other}", pack(header)
    if kind == "shift":
        delta = rng.choice([4, -2, 1, -4, 8])
        entry["data_offsets"] = [max(o + delta, 0) for o in entry["data_offsets"]]
        return f"{name} data_offsets shifted by {delta}", pack(header)
    if kind == "offset_type":
        b, e = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[False, True] if e - b == 1 else [bool(b), e], [float(b), float(e)],
                                            [str(b), e], [b], [b, e, e], [-1, e], None, "0-8"])
        return f"{name} data_offsets -> {entry['data_offsets']!r:.40}", pack(header)
    if kind == "dtype":
        entry["dtype"] = rng.choice(["F16", "BF16", "I32", "F64", ["F32"], "f32", "X", None, 5])
        return f"{name} dtype -> {entry['dtype']!r}", pack(header)
    if kind == "shape":
        s = entry["shape"]
        entry["shape"] = rng.choice([[d * 2 for d in s], s + [1], s[:-1], [], [-1] + s[1:], [True] + s[1:],
                                     [float(d) for d in s], [2**64] + s[1:], list(reversed(s)) + [2]])
        return f"{name} shape {s} -> {entry['shape']!r:.40}", pack(header)
    if kind == "dup_key":
        text = json.dumps(header)
        dup = json.dumps({name: header[rng.choice(names)]})[1:-1]
        return f"duplicate key {name}", pack(header, "{" + dup + ", " + text[1:])
    if kind == "remove":
        del header[name]
        return f"entry {name} removed", pack(header)
    if kind == "add":
        header["extra.weight"] = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
        return "an entry overlapping the first tensor added", pack(header)
    if kind == "metadata":
        header["__metadata__"] = rng.choice([{"format": 1}, ["x"], "x", {"a": {"b": 1}}])
        return f"__metadata__ -> {header['__metadata__']!r}", pack(header)
    if kind == "deep":
        return "__metadata__ nested 5000 deep", pack(header, '{"__metadata__": ' + "[" * 5000 + "]" * 5000 + ", "
                                                     + json.dumps(header)[1:])
    if kind == "leading_space":
        return "header starts with a space", pack(header, " " + json.dumps(header))
    if kind == "append":
        return "bytes appended after the data", data + b"\0" * rng.choice([1, 4, 64])
    if kind == "truncate":
        cut = rng.randrange(8, len(data))
        return f"truncated at {cut} of {len(data)}", data[:cut]
    if kind == "big_ints":
        entry["data_offsets"] = [10**30, 10**30 + 4]
        return f"{name} data_offsets 10**30", pack(header)
    out = bytearray(data)
    positions = sorted(rng.randrange(0, 8 + n) for _ in range(rng.randint(1, 4)))
    for p in positions:
        out[p] = rng.randrange(256)
    return f"header bytes {positions} set at random", bytes(out)


_BAD = [None, True, "2", 2.0, -1, 0, 10**6, 2**31, 2**63, [], {}, [1, 2], "NaN", float("nan"), float("inf"), 10**100]
_CONFIG_VALUES = {
    "num_hidden_layers": _BAD, "hidden_size": _BAD, "num_attention_heads": _BAD, "num_key_value_heads": _BAD,
    "intermediate_size": _BAD, "vocab_size": _BAD, "head_dim": _BAD + [2**31, 3], "max_position_embeddings": _BAD,
    "rope_theta": [float("nan"), float("inf"), 0, -1, "abc", True, None, []],
    "rms_norm_eps": [float("nan"), -1, "abc", 0, 5.0, True, None],
    "tie_word_embeddings": ["false", "true", 0, 1, None, []], "attention_bias": ["yes", 1, None],
    "eos_token_id": ["x", -1, 10**9, 2.0, [1, "x"], True, {}], "bos_token_id": ["x", -5, 1.5],
    "pad_token_id": ["x", 10**9], "model_type": [["llama"], 5, None, "gpt2"],
    "rope_scaling": [{"rope_type": "linear"}, {"rope_type": "linear", "factor": "2"}, {"type": 5}, [1],
                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": "a", "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}],
    "rope_parameters": [[1], "x", {"rope_type": "linear", "factor": float("nan"), "rope_theta": 1e4}],
    "hidden_act": [["silu"], 5], "sliding_window": ["x", 2.5, True], "layer_types": ["x", [1, 2, 3]],
    "torch_dtype": [5, ["float32"]], "architectures": ["LlamaForCausalLM", [5]],
}
_TOKENIZER_VALUES = {
    "model": [[], "x", 5, {"type": "BPE", "vocab": [], "merges": 5}], "added_tokens": [{}, "x", [5]],
    "pre_tokenizer": [5, [1], {"type": "Nope"}], "decoder": [[], {"type": 5}], "normalizer": ["x"],
    "bos_token": [5, [], {"content": 5}, {"x": 1}], "eos_token": [5, True], "pad_token": [[1]],
    "chat_template": [7, [{"name": 1}], {"default": "x"}, [{"name": "default"}]],
    "clean_up_tokenization_spaces": ["false", 1], "additional_special_tokens": ["x", [5], {"a": 5}],
    "extra_special_tokens": [5], "eos_token_id": ["x", True, [1, "a"], -1, 2.5], "added_tokens_decoder": [5, []],
}


def _mutate_json(text: str, rng: random.Random, values: dict[str, list]) -> tuple[str, str | None]:
    kind = rng.choice(["value", "value", "value", "value", "remove", "dup", "deep", "huge_int", "truncate", "flip",
                       "not_object", "not_file"])
    data = json.loads(text)
    if kind == "value":
        key = rng.choice(sorted(values))
        value = rng.choice(values[key])
        data[key] = value
        return f"{key} := {value!r:.60}", json.dumps(data)
    if kind == "remove":
        key = rng.choice(sorted(data))
        del data[key]
        return f"{key} removed", json.dumps(data)
    if kind == "dup":
        key = rng.choice(sorted(data))
        return f"duplicate key {key}", "{" + json.dumps({key: None})[1:-1] + ", " + json.dumps(data)[1:]
    if kind == "deep":
        key = rng.choice(sorted(data))
        return f"{key} nested 100000 deep", json.dumps(data).replace(
            json.dumps(key) + ":", json.dumps(key) + ": " + "[" * 100000 + "]" * 100000 + ", \"zz\":", 1)
    if kind == "huge_int":
        key = rng.choice(sorted(data))
        return f"{key} := a 5000-digit integer", json.dumps({**data, key: 0}).replace(
            json.dumps(key) + ": 0", json.dumps(key) + ": " + "9" * 5000, 1)
    if kind == "truncate":
        cut = rng.randrange(len(text))
        return f"truncated at {cut}", text[:cut]
    if kind == "flip":
        chars = list(text)
        for _ in range(rng.randint(1, 4)):
            chars[rng.randrange(len(chars))] = rng.choice('{}[]":,0a\\\x00\u00e9')
        return "characters changed at random", "".join(chars)
    if kind == "not_object":
        return "a JSON array", json.dumps([data])
    return "replaced by a directory or a symlink loop", None


# ------------------------------------------------------------------------------------------------- worker
_WORKER = r"""
import json, os, resource, sys, time, traceback
sys.path.insert(0, {tests!r})
import fuzz_utils
fuzz_utils.worker_main()
"""


def worker_main() -> None:
    """Read mutants (JSON lines) on stdin, load each, write one JSON result line per mutant on stdout."""
    import torch

    import leanformers
    from leanformers.errors import LeanformersError

    try:
        from leanformers import templates

        templates.TIME_LIMIT = float(os.environ.get("FUZZ_TEMPLATE_SECONDS", "1.0"))
    except ImportError:  # a source tree without bounded templates (to fuzz an older version)
        pass
    torch.set_num_threads(1)
    pristine: dict[str, dict] = {}
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but results on the pipe
    for line in sys.stdin:
        job = json.loads(line)
        t0 = time.monotonic()
        result = _judge(job, pristine, leanformers, LeanformersError, torch)
        result.update(id=job["id"], seconds=round(time.monotonic() - t0, 3),
                      maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
        out.write(json.dumps(result) + "\n")
        out.flush()


def _judge(job: dict, pristine: dict, leanformers: Any, LeanformersError: type, torch: Any) -> dict:
    import traceback

    def error_result(exc: BaseException, stage: str) -> dict:
        msg = str(exc)
        outcome = ("REFUSED" if not job["names"]  # a mutant that must load (a stray file to ignore)
                   else "error" if any(n in msg for n in job["names"]) else "UNNAMED")
        return {"outcome": outcome, "stage": stage, "error": type(exc).__name__, "message": msg[:400]}

    try:
        if job["base"] not in pristine:
            lm = leanformers.load(job["base"], dtype="float32", progress=False)
            pristine[job["base"]] = {k: v.clone() for k, v in lm.model.state_dict().items()}
        lm = leanformers.load(job["path"], dtype="float32", progress=False)
    except LeanformersError as exc:
        return error_result(exc, "load")
    except BaseException as exc:  # noqa: BLE001 - the point is to catch what should never escape
        return {"outcome": "RAW", "stage": "load", "error": type(exc).__name__, "message": str(exc)[:300],
                "trace": traceback.format_exc()[-1500:]}
    ref = pristine[job["base"]]
    state = lm.model.state_dict()
    same = state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)
    if not same:
        return {"outcome": "WRONG_WEIGHTS", "stage": "load"}
    try:
        lm.tokenizer.encode("Hello world! 123")
        lm.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    except LeanformersError as exc:
        return error_result(exc, "tokenizer")
    except BaseException as exc:  # noqa: BLE001
        return {"outcome": "RAW", "stage": "tokenizer", "error": type(exc).__name__, "message": str(exc)[:300],
                "trace": traceback.format_exc()[-1500:]}
    return {"outcome": "ok", "stage": "done"}


class Runner:
    """Feeds mutants to a worker process capped at `memory_gb` of address space, `timeout` seconds per load."""

    def __init__(self, *, memory_gb: float = 6.0, timeout: float = 60.0, src: Path | None = None):
        self.memory = int(memory_gb * 2**30)
        self.timeout = timeout
        self.env = dict(os.environ, PYTHONPATH=str(src or HERE.parent / "src"), TOKENIZERS_PARALLELISM="false",
                        OMP_NUM_THREADS="1")
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        def cap() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (self.memory, self.memory))
            os.setsid()

        return subprocess.Popen([sys.executable, "-c", _WORKER.format(tests=str(HERE))], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self.env, preexec_fn=cap,
                                text=True, bufsize=1)

    def run(self, mutant: Mutant) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        job = {"id": mutant.id, "path": mutant.path, "base": mutant.base, "names": list(mutant.names)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                return {"id": mutant.id, "outcome": "HANG", "seconds": self.timeout}
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                line = self.proc.stdout.readline()
                if not line:  # the worker died (killed at the memory cap, crashed)
                    code = self.proc.wait()
                    self.proc = None
                    return {"id": mutant.id, "outcome": "CRASH", "returncode": code}
                return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.proc = None


PASSING = ("ok", "error")


def fuzz(corpus: Corpus, *, count: int, seed: int, runner: Runner, families: list[str] | None = None,
         log: Callable[[str], None] | None = None) -> list[dict]:
    """Run `count` seeded mutants (families in turn) and return one result per mutant, with its description."""
    rng = random.Random(seed)
    families = families or corpus.families()
    results = []
    for n in range(count):
        family = families[n % len(families)]
        mutant = corpus.mutant(family, rng)
        result = runner.run(mutant)
        result.update(family=family, what=mutant.what)
        results.append(result)
        if log:
            log(f"{mutant.id:4d} {family:11s} {result['outcome']:13s} {result.get('seconds', 0):6.2f}s  {mutant.what[:70]}"
                + (f"  -> {result.get('error', '')}: {result.get('message', '')[:120]}" if result["outcome"] != "ok" else ""))
        if mutant.cleanup is not None:
            shutil.rmtree(mutant.cleanup, ignore_errors=True)
    return results
