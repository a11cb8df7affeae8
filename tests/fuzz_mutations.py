"""The mutations of the hostile-file fuzzer (tests/fuzz_utils.py): GGUF files taken apart and rewritten, safetensors
headers, JSON files and chat templates, each corrupted in one seeded, described way."""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass, field
from typing import Any

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


# ---------------------------------------------------------------------------------------------- GGUF bytes
def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def gguf_string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return u64(len(raw)) + raw


_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_value(vtype: int, value: Any) -> bytes:
    """Encode a metadata value; arrays are (item_type, [items])."""
    if vtype in _FMT:
        return struct.pack(_FMT[vtype], value)
    if vtype == 8:
        return gguf_string(value)
    item_type, items = value
    return u32(item_type) + u64(len(items)) + b"".join(gguf_value(item_type, i) for i in items)


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
        head = [b"GGUF", u32(self.version), u64(len(self.infos) if n_tensors is None else n_tensors),
                u64(len(self.kvs) if n_kv is None else n_kv)]
        for key, vtype, raw in self.kvs:
            head += [gguf_string(key), u32(vtype), raw]
        for name, dims, type_id, offset in self.infos:
            head += [gguf_string(name), u32(len(dims)), *(u64(d) for d in dims), u32(type_id), u64(offset)]
        out = b"".join(head)
        return out + b"\0" * (-len(out) % self.alignment) + self.data

    def set_kv(self, key: str, vtype: int, raw: bytes) -> None:
        for kv in self.kvs:
            if kv[0] == key:
                kv[1], kv[2] = vtype, raw
                return
        self.kvs.append([key, vtype, raw])


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


def mutate_gguf(raw: RawGGUF, rng: random.Random) -> tuple[str, bytes]:
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
        raw.set_kv("general.name", 8, u64(2**62) + b"x")
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


def mutate_safetensors(data: bytes, rng: random.Random) -> tuple[str, bytes]:
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
CONFIG_VALUES = {
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
TOKENIZER_VALUES = {
    "model": [[], "x", 5, {"type": "BPE", "vocab": [], "merges": 5}], "added_tokens": [{}, "x", [5]],
    "pre_tokenizer": [5, [1], {"type": "Nope"}], "decoder": [[], {"type": 5}], "normalizer": ["x"],
    "bos_token": [5, [], {"content": 5}, {"x": 1}], "eos_token": [5, True], "pad_token": [[1]],
    "chat_template": [7, [{"name": 1}], {"default": "x"}, [{"name": "default"}]],
    "clean_up_tokenization_spaces": ["false", 1], "additional_special_tokens": ["x", [5], {"a": 5}],
    "extra_special_tokens": [5], "eos_token_id": ["x", True, [1, "a"], -1, 2.5], "added_tokens_decoder": [5, []],
}


def mutate_json(text: str, rng: random.Random, values: dict[str, list]) -> tuple[str, str | None]:
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
