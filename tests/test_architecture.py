"""The architecture's rules, checked: one model contract, no reaching into a family, no import cycles; and a
second, minimal family that generates, compiles, quantizes and speculates through the same code as Llama."""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import leanformers
from leanformers.compile import CompiledDecode, compile_decode
from leanformers.lm import LanguageModel
from leanformers.models import ops
from leanformers.models.base import DecoderModel
from leanformers.models.cache import KVCache, KVLayout
from leanformers.quantize import Int8Linear, quantize_model
from leanformers.tokenizer import load_tokenizer_from_dir

from conftest import write_tiny_tokenizer

SRC = Path(leanformers.__file__).parent
# Llama's module tree: only models/ may name these attributes
FAMILY_ATTRIBUTES = {"embed_tokens", "layers", "norm", "lm_head", "self_attn", "mlp", "q_proj", "k_proj", "v_proj",
                     "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj", "input_layernorm",
                     "post_attention_layernorm"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def test_no_module_outside_models_reaches_into_a_family():
    offenders = []
    for name, path in _modules().items():
        if name.startswith("leanformers.models"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in FAMILY_ATTRIBUTES:
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.Attribute) and node.attr == "model" and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "model":
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} .model.model")
    assert not offenders, "code outside models/ uses a family's attribute tree:\n" + "\n".join(offenders)


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every leanformers module `name` imports, anywhere in the file (function-level imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t.startswith("leanformers.") and not name.startswith(t + ".") and t != name:
                out.add(t)  # (a module's own parent packages are initialized first by Python: not an edge)
    return out


def test_no_import_cycles():
    mods = _modules()
    graph = {name: _imports(name, path, set(mods)) for name, path in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_layers_import_only_downwards():
    """models/ and quantize/ never import generation, compile, speculative or the LanguageModel."""
    mods = _modules()
    upper = ("leanformers.generation", "leanformers.compile", "leanformers.speculative", "leanformers.lm",
             "leanformers.cli", "leanformers.loading")
    for name, path in mods.items():
        if name.startswith(("leanformers.models", "leanformers.quantize", "leanformers.checkpoint")):
            bad = [m for m in _imports(name, path, set(mods)) if m.startswith(upper)]
            assert not bad, f"{name} imports {bad}"


# ------------------------------------------------------------------------------------- a second family
@dataclass
class ToyConfig:
    """Not Llama's config: only what the layers above read (vocab, context, EOS ids, a type name)."""

    vocab_size: int = 384
    width: int = 32
    depth: int = 2
    max_position_embeddings: int = 128
    model_type: str = "toy"

    @property
    def eos_token_ids(self) -> list[int]:
        return []


class ToyBlock(nn.Module):
    def __init__(self, c: ToyConfig, index: int):
        super().__init__()
        self.index = index
        self.pre = ops.RMSNorm(c.width, 1e-5)
        self.query = nn.Linear(c.width, c.width, bias=False)  # two heads of 16
        self.key_value = nn.Linear(c.width, 32, bias=False)  # one shared K/V head of 16 (GQA 2:1)
        self.out = nn.Linear(c.width, c.width, bias=False)
        self.ff_in = nn.Linear(c.width, 64)
        self.ff_out = nn.Linear(64, c.width)

    def forward(self, x, cos, sin, mask, cache, positions, kv_len):
        B, T, _ = x.shape
        h = self.pre(x)
        q = ops.linear(self.query, h).view(B, T, 2, 16).transpose(1, 2)
        k, v = ops.linear(self.key_value, h).view(B, T, 2, 1, 16).permute(2, 0, 3, 1, 4)
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.index, positions, k, v)
            if kv_len is not None:
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        a = ops.attend(q, k, v, mask).transpose(1, 2).reshape(B, T, -1)
        x = x + ops.linear(self.out, a)
        return x + ops.linear(self.ff_out, torch.nn.functional.gelu(ops.linear(self.ff_in, x)))


class ToyLM(DecoderModel):
    """A minimal family: its own attribute names, implementing only the contract."""

    output_head = "head"
    input_embedding = "tok"

    def __init__(self, c: ToyConfig):
        super().__init__(c)
        self.tok = nn.Embedding(c.vocab_size, c.width)
        self.blocks = nn.ModuleList(ToyBlock(c, i) for i in range(c.depth))
        self.final = ops.RMSNorm(c.width, 1e-5)
        self.head = nn.Linear(c.width, c.vocab_size, bias=False)
        self.register_buffer("inv_freq", ops.rope_inv_freq(16, 10000.0), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.final.weight.dtype

    def kv_layout(self) -> KVLayout:
        return KVLayout(self.config.depth, 1, 16)

    def hidden_states(self, input_ids, *, cache=None, positions=None, attention_mask=None):
        positions = self.check_inputs(input_ids, cache, positions, attention_mask)
        kv_len = int(positions.max()) + 1 if cache is not None and not torch.compiler.is_compiling() else None
        n_keys = input_ids.shape[1] if cache is None else (kv_len or cache.max_len)
        mask = ops.attention_mask(positions, n_keys, cached=cache is not None)
        x = self.tok(input_ids)
        cos, sin = ops.rope_cos_sin(positions, self.inv_freq, x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache, positions, kv_len)
        return self.final(x)

    def logits(self, hidden):
        return ops.linear(self.head, hidden)


@pytest.fixture()
def toy(tmp_path) -> LanguageModel:
    torch.manual_seed(0)
    model = ToyLM(ToyConfig()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.1)  # far from uniform attention and logits
            p.requires_grad_(False)
    write_tiny_tokenizer(tmp_path)
    return LanguageModel(model, load_tokenizer_from_dir(tmp_path), model.config)


def _reference_greedy(model: DecoderModel, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


PROMPT = "Once upon a time there was a little model"


def test_a_second_family_generates_like_its_own_uncached_forward(toy):
    ids = toy.tokenizer.encode(PROMPT)
    out = toy.generate(ids, max_new_tokens=16, ignore_eos=True)
    assert out.token_ids == _reference_greedy(toy.model, ids, 16)
    batch = toy.generate([PROMPT, "def add(a, b):"], max_new_tokens=8, ignore_eos=True)
    assert batch[0].token_ids == out.token_ids[:8]


def test_a_second_family_compiles(toy):
    ids = toy.tokenizer.encode(PROMPT)
    expected = toy.generate(ids, max_new_tokens=16, ignore_eos=True).token_ids
    toy.compile(backend="eager", cache_bucket=64, huge_pages=False)
    assert isinstance(toy.step, CompiledDecode) and toy.step.graphs
    before = dict(toy.step.calls)
    assert toy.generate(ids, max_new_tokens=16, ignore_eos=True).token_ids == expected
    assert toy.step.calls["eager"] == before["eager"] and toy.step.calls["compiled"] - before["compiled"] == 15


@pytest.mark.slow
def test_a_second_family_compiles_with_inductor(toy, tmp_path):
    ids = toy.tokenizer.encode(PROMPT)
    expected = toy.generate(ids, max_new_tokens=12, ignore_eos=True).token_ids
    step = compile_decode(toy.model, cache_dir=tmp_path, cache_bucket=64, huge_pages=False)
    assert [i["how"] for i in step.info.values()] == ["compiled"]  # an AOTInductor package
    toy.step = step
    before = dict(step.calls)
    assert toy.generate(ids, max_new_tokens=12, ignore_eos=True).token_ids == expected
    assert step.calls["eager"] == before["eager"] and step.calls["compiled"] - before["compiled"] == 11


def test_a_second_family_quantizes(toy):
    quantize_model(toy.model, "int8", dtype=torch.float32)
    assert toy.model.quantization == "int8" and toy.model.weight_kind == "int8"
    assert isinstance(toy.model.blocks[0].query, Int8Linear) and isinstance(toy.model.head, Int8Linear)
    assert toy.model.head.weight is not None and type(toy.model.tok).__name__ == "Int8Embedding"
    ids = toy.tokenizer.encode(PROMPT)
    assert toy.generate(ids, max_new_tokens=12, ignore_eos=True).token_ids == _reference_greedy(toy.model, ids, 12)


@pytest.mark.parametrize("draft", ["prompt-lookup", "self-int8"])
def test_a_second_family_speculates(toy, draft):
    ids = toy.tokenizer.encode(PROMPT + ". " + PROMPT + ". " + PROMPT)
    plain = toy.generate(ids, max_new_tokens=20, ignore_eos=True)
    spec = toy.generate(ids, max_new_tokens=20, ignore_eos=True, draft=draft, num_draft_tokens=3)
    assert spec.token_ids == plain.token_ids
    assert spec.stats["drafted"] > 0 and spec.stats["target_forwards"] < 20


def test_kv_cache_rows_are_independent():
    """Each row writes its own positions: the contract that batches and serving slots rely on."""
    cache = KVCache.allocate(KVLayout(1, 1, 2), 2, 4, dtype=torch.float32)
    k = torch.arange(8.0).view(2, 1, 2, 2)
    cache.update(0, torch.tensor([[0, 1], [2, 3]]), k, -k)
    assert cache.k[0][0, 0, :2].tolist() == [[0, 1], [2, 3]] and cache.k[0][0, 0, 2:].abs().sum() == 0
    assert cache.k[0][1, 0, 2:].tolist() == [[4, 5], [6, 7]] and cache.v[0][1, 0, 2:].tolist() == [[-4, -5], [-6, -7]]
    assert math.isclose(float(cache.window(3).k[0].shape[2]), 3)
