"""The decoder families beyond Llama (issue 16): Qwen3, Phi-3, GPT-2, Mixtral and Qwen3-MoE.

Each is a tiny random transformers model saved with save_pretrained (and written as GGUF as llama.cpp's
converter writes it, tests/family_gguf.py); transformers is the reference for logits, padding, sliding
windows and greedy generation, and leanformers' own plain greedy decode for compiled decode, quantization
and speculative decoding.
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

import leanformers
from leanformers.errors import UnsupportedModelError

from conftest import TINY_INIT_STD, TINY_VOCAB, write_tiny_tokenizer
from family_gguf import write_family_gguf

_COMMON = dict(vocab_size=TINY_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_LLAMA_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=256, **_COMMON)

# One tiny config per family; every one with GQA ratio 2 over 2 KV heads (GPT-2: multi-head by design).
FAMILIES: dict[str, dict] = {
    "qwen3": dict(model_type="qwen3", intermediate_size=128, head_dim=24, rms_norm_eps=1e-6, rope_theta=1e6,
                  tie_word_embeddings=False, use_sliding_window=False, **_LLAMA_SHAPE),
    "phi3": dict(model_type="phi3", intermediate_size=96, rms_norm_eps=1e-5, rope_theta=10000.0,
                 partial_rotary_factor=0.5, sliding_window=5, original_max_position_embeddings=256,
                 tie_word_embeddings=False, **_LLAMA_SHAPE),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=256, layer_norm_epsilon=1e-5,
                 **_COMMON),
    "mixtral": dict(model_type="mixtral", intermediate_size=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                    num_local_experts=4, num_experts_per_tok=2, sliding_window=5, tie_word_embeddings=False,
                    **_LLAMA_SHAPE),
    "qwen3_moe": dict(model_type="qwen3_moe", intermediate_size=96, moe_intermediate_size=32, head_dim=16,
                      rms_norm_eps=1e-6, rope_theta=1e6, num_experts=4, num_experts_per_tok=2,
                      norm_topk_prob=False, mlp_only_layers=[1], tie_word_embeddings=True, **_LLAMA_SHAPE),
}
KINDS = sorted(FAMILIES)
# the families whose architecture llama.cpp defines (all five), as its converter names them
GGUF_ARCH = {"qwen3": "qwen3", "phi3": "phi3", "gpt2": "gpt2", "mixtral": "llama", "qwen3_moe": "qwen3moe"}
WINDOWED = ("phi3", "mixtral")

PROMPTS = ["Once upon a time there was", "def add(a, b):\n    return a + b\n\ndef add(a, b):",
           "The quick brown fox jumps over the lazy dog. The quick brown"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models, many small ops: intra-op threads only add synchronization on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def save_family(kind: str, directory: Path) -> Path:
    """A random transformers model of FAMILIES[kind] (+ the tiny tokenizer) saved into `directory`."""
    import transformers

    cfg = dict(FAMILIES[kind])
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), initializer_range=TINY_INIT_STD, **cfg)
    torch.manual_seed(zlib.crc32(kind.encode()) % 1000)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random, non-trivial norms and biases so every tensor matters
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    write_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {kind: save_family(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="module")
def family_ggufs(family_dirs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families-gguf")
    return {kind: write_family_gguf(family_dirs[kind], root / f"{kind}.gguf") for kind in KINDS}


_LOADED: dict[str, leanformers.LanguageModel] = {}


def _lm(family_dirs, kind: str):
    """leanformers' float32 load of a family (cached: the tests below do not modify it)."""
    path = str(family_dirs[kind])
    if path not in _LOADED:
        _LOADED[path] = leanformers.load(path, dtype="float32", progress=False)
    return _LOADED[path]


def _fresh(path: Path):
    return leanformers.load(str(path), dtype="float32", progress=False)


def _reference(directory: Path, **kw):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kw).eval()


def _ids(batch: int = 3, length: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, TINY_VOCAB, (batch, length), generator=g)


def _greedy(lm, ids: list[int], n: int = 32, **kw) -> list[int]:
    return lm.generate(ids, max_new_tokens=n, ignore_eos=True, **kw).token_ids


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(family_dirs, kind):
    """24 tokens: beyond the sliding window (5) of Phi-3 and Mixtral."""
    lm, ref = _lm(family_dirs, kind), _reference(family_dirs[kind])
    assert lm.config.model_type == kind
    ids = _ids()
    with torch.no_grad():
        ours, theirs = lm.model(ids), ref(ids).logits
    assert ours.shape == theirs.shape == (3, 24, TINY_VOCAB)
    assert (ours - theirs).abs().max().item() <= 1e-4
    top2 = theirs.topk(2, dim=-1).values  # the tiny models carry signal: margins far above the tolerance
    assert (top2[..., 0] - top2[..., 1]).median() > 0.05


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_close_to_transformers(family_dirs, kind):
    """bfloat16 weights and activations: within bfloat16 noise of transformers in bfloat16 (measured max
    differences 0.08-0.18 against float32, logits up to ~5) and the same top-1 almost everywhere."""
    lm = leanformers.load(str(family_dirs[kind]), dtype="bfloat16", progress=False)
    ref = _reference(family_dirs[kind])
    ids = _ids()
    with torch.no_grad():
        ours, theirs = lm.model(ids).float(), ref.to(torch.bfloat16)(ids).logits.float()
    assert lm.dtype == torch.bfloat16
    assert (ours - theirs).abs().max().item() < 0.5
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.parametrize("kind", WINDOWED)
def test_sliding_window_is_applied(family_dirs, tmp_path, kind):
    """The window matters for these inputs: without it the logits past position 5 differ."""
    d = shutil.copytree(family_dirs[kind], tmp_path / kind)
    cfg = json.loads((d / "config.json").read_text())
    cfg["sliding_window"] = None
    (d / "config.json").write_text(json.dumps(cfg))
    ids = _ids(length=24)
    with torch.no_grad():
        windowed, full = _lm(family_dirs, kind).model(ids), _fresh(d).model(ids)
    assert (windowed[:, :5] - full[:, :5]).abs().max().item() <= 1e-5
    assert (windowed[:, 6:] - full[:, 6:]).abs().max().item() > 1e-2


def test_qwen3_sliding_window_layers_match_transformers(tmp_path):
    """Qwen3 with use_sliding_window: layers from max_window_layers on are windowed (transformers' layer_types),
    the ones before are not; beyond the window, in the logits and in greedy decoding with the cache."""
    FAMILIES["qwen3_window"] = dict(FAMILIES["qwen3"], use_sliding_window=True, sliding_window=5,
                                    max_window_layers=1)
    try:
        d = save_family("qwen3_window", tmp_path / "qwen3_window")
    finally:
        del FAMILIES["qwen3_window"]
    assert json.loads((d / "config.json").read_text())["layer_types"] == ["full_attention", "sliding_attention"]
    lm, ref = _fresh(d), _reference(d)
    assert [lm.config.layer_window(i) for i in range(2)] == [None, 5]
    ids = _ids()
    with torch.no_grad():
        ours, theirs = lm.model(ids), ref(ids).logits
        unwindowed = _fresh(_with_config(d, tmp_path / "full", use_sliding_window=False)).model(ids)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours - unwindowed).abs().max().item() > 1e-2
    prompt = lm.tokenizer.encode(PROMPTS[0])
    with torch.no_grad():
        ref.generation_config.eos_token_id = None
        out = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, pad_token_id=0)
    assert _greedy(lm, prompt, 24) == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_padded_batch_matches_transformers(family_dirs, kind):
    """Left-padded rows of different lengths with explicit positions, against transformers given the same
    mask and positions; padded positions are not compared."""
    lm, ref = _lm(family_dirs, kind), _reference(family_dirs[kind])
    ids = _ids(length=20, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[2, :13] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = lm.model(ids, positions=positions, attention_mask=mask)
        theirs = ref(ids, attention_mask=mask, position_ids=positions).logits
        alone = lm.model(ids[2:, 13:])  # the shortest row alone, unpadded
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4
    assert (ours[2, 13:] - alone[0]).abs().max().item() <= 1e-4


# What llama.cpp computes from its files differs from the checkpoint in two documented ways: a `llama` file
# (Mixtral) stores no sliding window, and llama.cpp always renormalizes Qwen3-MoE's top-k router weights
# (its converter writes no norm_topk_prob). The reference is transformers on the safetensors so changed.
GGUF_SEMANTICS = {"mixtral": dict(sliding_window=None), "qwen3_moe": dict(norm_topk_prob=True)}


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_matches_transformers(family_dirs, family_ggufs, tmp_path, kind):
    """The GGUF llama.cpp's converter would write (F32), read by leanformers, against transformers on the
    safetensors with llama.cpp's semantics (GGUF_SEMANTICS)."""
    lm = _fresh(family_ggufs[kind])
    assert lm.config.model_type == kind
    ids = _ids()
    ref_dir = family_dirs[kind]
    if kind in GGUF_SEMANTICS:
        ref_dir = _with_config(ref_dir, tmp_path / kind, **GGUF_SEMANTICS[kind])
        for key, value in GGUF_SEMANTICS[kind].items():
            assert getattr(lm.config, key) == value
    with torch.no_grad():
        ours, theirs = lm.model(ids), _reference(ref_dir)(ids).logits
        ours_hf = _lm(family_dirs, kind).model(ids)
    assert (ours - theirs).abs().max().item() <= 1e-4
    if kind in GGUF_SEMANTICS:  # the difference is real for these inputs (the reference is not the original)
        assert (ours - ours_hf).abs().max().item() > 1e-2


def _round_tripped(src: Path, dst: Path, qtype: Q) -> Path:
    """A copy of a checkpoint whose matrices hold what `qtype` blocks encode them as (gguf-py's quantize and
    dequantize), where family_gguf.py quantizes them (rows a multiple of 32)."""
    from gguf.quants import dequantize, quantize
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    conv1d = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
    for f in dst.glob("*.safetensors"):
        state = load_file(f)
        for name, t in state.items():
            a = t.float().numpy()
            a = a.T if name.endswith(conv1d) else a  # GPT-2's Conv1D (in, out): blocks run along `in`
            if a.ndim >= 2 and a.shape[-1] % 32 == 0:
                a = dequantize(quantize(a, qtype), qtype).reshape(a.shape)
            state[name] = torch.from_numpy((a.T if name.endswith(conv1d) else a).copy())
        save_file(state, f, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0])
@pytest.mark.parametrize("kind", KINDS)
def test_gguf_quantized_matches_transformers(family_dirs, tmp_path, kind, qtype):
    """Quantized GGUF matrices (experts stacked, Mixtral's q/k rows permuted, GPT-2's Conv1D transposed)
    read exactly: against transformers on the checkpoint whose weights went through the same blocks."""
    g = write_family_gguf(family_dirs[kind], tmp_path / f"{kind}.gguf", qtype=qtype)
    ref_dir = _round_tripped(family_dirs[kind], tmp_path / "ref", qtype)
    if kind in GGUF_SEMANTICS:
        cfg = json.loads((ref_dir / "config.json").read_text())
        (ref_dir / "config.json").write_text(json.dumps({**cfg, **GGUF_SEMANTICS[kind]}))
    ids = _ids(batch=2)
    with torch.no_grad():
        ours, theirs = _fresh(g).model(ids), _reference(ref_dir)(ids).logits
        plain = _lm(family_dirs, kind).model(ids)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours - plain).abs().max().item() > 1e-3


# ------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_with_cache_matches_transformers_generate(family_dirs, kind):
    """32 greedy tokens with the KV cache (crossing the sliding windows) equal transformers' generate."""
    lm, ref = _lm(family_dirs, kind), _reference(family_dirs[kind])
    for prompt in PROMPTS[:2]:
        ids = lm.tokenizer.encode(prompt)
        with torch.no_grad():  # no EOS (min_new_tokens would suppress it instead: another greedy path)
            ref.generation_config.eos_token_id = None
            out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               do_sample=False, max_new_tokens=32, pad_token_id=0)
        assert out.shape[1] == len(ids) + 32
        assert _greedy(lm, ids) == out[0, len(ids):].tolist(), prompt


@pytest.mark.parametrize("kind", KINDS)
def test_batch_generation_equals_single(family_dirs, kind):
    lm = _lm(family_dirs, kind)
    batch = lm.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    for prompt, out in zip(PROMPTS, batch):
        assert out.token_ids == _greedy(lm, lm.tokenizer.encode(prompt), 16), prompt


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_lookup_speculative_equals_greedy(family_dirs, kind):
    lm = _lm(family_dirs, kind)
    for prompt in PROMPTS[1:]:
        ids = lm.tokenizer.encode(prompt)
        plain = _greedy(lm, ids)
        spec = lm.generate(ids, max_new_tokens=32, ignore_eos=True, draft="prompt-lookup", num_draft_tokens=3)
        assert spec.token_ids == plain, prompt
        assert spec.stats["drafted"] > 0


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("kind", KINDS)
def test_quantization_runs(family_dirs, kind, scheme):
    """Every quantizable linear (experts one by one; not the routers) is replaced; in float32 activations
    the quantized model computes exactly the float model of its dequantized weights; it generates."""
    from leanformers.quantize import Int4Linear, Int8Embedding, Int8Linear

    lm = _fresh(family_dirs[kind]).quantize(scheme, dtype=torch.float32)
    assert lm.model.quantization == scheme
    kinds = (Int8Linear, Int4Linear, Int8Embedding)
    quantized = {n for n, m in lm.model.named_modules() if isinstance(m, kinds)}
    linear = Int8Linear if scheme == "int8" else Int4Linear
    wanted = [n for n, _ in _fresh(family_dirs[kind]).model.quantizable_linears()]
    assert len(wanted) >= 4 * lm.config.num_hidden_layers  # attention and MLP of every layer at least
    assert all(isinstance(lm.model.get_submodule(n), linear) for n in wanted)
    assert not any(type(m) is torch.nn.Linear for n, m in lm.model.named_modules() if not n.endswith(".mlp.gate"))
    if kind in ("mixtral", "qwen3_moe"):
        assert "model.layers.0.mlp.experts.3.down_proj" in quantized
        assert type(lm.model.get_submodule("model.layers.0.mlp.gate")) is torch.nn.Linear
    ref = _fresh(family_dirs[kind])
    with torch.no_grad():
        for name in quantized:
            mod, sub = lm.model.get_submodule(name), ref.model.get_submodule(name)
            sub.weight.copy_(mod.dequantize_weight(torch.float32).reshape(sub.weight.shape))
            if getattr(mod, "bias", None) is not None:
                sub.bias.copy_(mod.bias.float())
        ids = _ids(batch=2, length=16)
        out, expected, plain = lm.model(ids), ref.model(ids), _lm(family_dirs, kind).model(ids)
    assert (out - expected).abs().max().item() <= 5e-5
    assert (expected - plain).abs().max().item() > 1e-3  # the weights really were quantized
    assert len(lm.generate(PROMPTS[0], max_new_tokens=8, ignore_eos=True).token_ids) == 8


# ------------------------------------------------------------------------------------------ cli, errors
@pytest.mark.parametrize("kind", KINDS)
def test_info_shows_the_architecture(family_dirs, family_ggufs, kind, capsys):
    from leanformers.cli import main

    for path in (family_dirs[kind], family_ggufs[kind]):
        assert main(["info", str(path)]) in (0, None)
        out = capsys.readouterr().out
        assert kind in out, out
        if kind in ("mixtral", "qwen3_moe"):
            assert "experts" in out and "4 per layer" in out and "2 chosen" in out
        if kind in WINDOWED and path.is_dir():  # (a `llama` GGUF, Mixtral's, stores no window)
            assert "window" in out and "5" in out


def _with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("kind, change, needle", [
    ("phi3", dict(rope_parameters=None, rope_scaling=dict(type="longrope", short_factor=[1.0] * 4,
                                                          long_factor=[2.0] * 4)), "longrope"),
    ("phi3", dict(rope_parameters=dict(rope_type="default", rope_theta=1e4),
                  rope_scaling=dict(type="su", short_factor=[1.0] * 4, long_factor=[2.0] * 4)), "'su'"),
    ("phi3", dict(rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 4,
                                       long_factor=[2.0] * 4)), "longrope"),
    ("gpt2", dict(add_cross_attention=True), "cross-attention"),
    ("gpt2", dict(activation_function="swish"), "activation_function"),
])
def test_unsupported_features_are_refused(family_dirs, tmp_path, kind, change, needle):
    d = _with_config(family_dirs[kind], tmp_path / kind, **change)
    with pytest.raises(UnsupportedModelError, match=needle) as info:
        _fresh(d)
    assert "config.json" in str(info.value)  # the message names the file


def test_phi3_gguf_longrope_is_refused(family_dirs, tmp_path):
    """A Phi-3 GGUF with llama.cpp's rope_factors_long/short tensors (the long-context variants)."""
    import numpy as np
    from gguf import GGUFReader, GGUFWriter

    src = GGUFReader(str(write_family_gguf(family_dirs["phi3"], tmp_path / "plain.gguf", with_tokenizer=False)))
    w = GGUFWriter(str(tmp_path / "longrope.gguf"), "phi3")
    for field in src.fields.values():
        if field.name.startswith("phi3.") or field.name == "general.file_type":
            w.add_key_value(field.name, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1
                            else None)
    w.add_vocab_size(TINY_VOCAB)
    for t in src.tensors:
        w.add_tensor(t.name, np.array(t.data).reshape(list(reversed(t.shape.tolist()))))
    w.add_tensor("rope_factors_long.weight", np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="longrope"):
        _fresh(tmp_path / "longrope.gguf")


# ------------------------------------------------------------------------------------------ experts
class _ExpertLog:
    """Forward hooks on every expert and router of a MoE model: which experts ran, on how many rows, and
    which ones the routers chose."""

    def __init__(self, model):
        self.ran: list[tuple[int, int, int]] = []  # (layer, expert, rows)
        self.chosen: list[tuple[int, set[int]]] = []  # (layer, experts the router picked for its tokens)
        self.handles = []
        k = model.config.num_experts_per_tok
        for i, layer in enumerate(model.model.layers):
            moe = layer.mlp
            if not hasattr(moe, "experts"):
                continue
            for e, expert in enumerate(moe.experts):
                self.handles.append(expert.register_forward_hook(
                    lambda m, args, out, i=i, e=e: self.ran.append((i, e, args[0].shape[0]))))
            self.handles.append(moe.gate.register_forward_hook(
                lambda m, args, out, i=i: self.chosen.append((i, set(out.topk(k, -1).indices.flatten().tolist())))))

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_moe_decode_runs_only_the_chosen_experts(family_dirs, kind):
    """Each one-token decode step runs exactly the k experts its router chose per sparse layer (each once,
    on that one row), never the others; a batched step runs the union of its rows' choices, each expert on
    exactly the rows that chose it."""
    from leanformers.generation.decode import DecodeStep

    lm = _lm(family_dirs, kind)
    cfg = lm.config
    k, n_sparse = cfg.num_experts_per_tok, sum(cfg.is_sparse(i) for i in range(cfg.num_hidden_layers))
    assert 0 < n_sparse and k < cfg.num_local_experts
    step = DecodeStep(lm.model)
    ids = lm.tokenizer.encode(PROMPTS[0])
    cache = step.make_cache(2, 64)
    with torch.no_grad():
        lm.model(torch.tensor([ids, ids]), cache=cache, positions=torch.arange(len(ids)).expand(2, -1))
    log = _ExpertLog(lm.model)
    try:
        used: set[tuple[int, int]] = set()
        for t, token in enumerate(_ids(batch=1, length=12, seed=5)[0].tolist()):  # one row, varied tokens
            log.ran.clear(), log.chosen.clear()
            with torch.no_grad():
                step(torch.tensor([[token]]), torch.tensor([[len(ids) + t]]), cache.rows(0, 1))
            assert len(log.chosen) == n_sparse
            for layer, chosen in log.chosen:
                ran = {e for i, e, _ in log.ran if i == layer}
                assert ran == chosen and len(chosen) == k
            assert sorted(rows for *_, rows in log.ran) == [1] * (k * n_sparse)
            used |= {(i, e) for i, e, _ in log.ran}
        assert len(used) > k * n_sparse  # the choice changes from token to token: the counting sees it
        # two rows at once
        log.ran.clear(), log.chosen.clear()
        tokens = torch.tensor([[ids[-1]], [ids[-2]]])
        pos = torch.tensor([[len(ids)], [len(ids)]])
        with torch.no_grad():
            step(tokens, pos, cache)
        for layer, chosen in log.chosen:
            assert {e for i, e, _ in log.ran if i == layer} == chosen
        assert sum(rows for *_, rows in log.ran) == 2 * k * n_sparse
        assert len({(i, e) for i, e, _ in log.ran}) == len(log.ran)  # each expert once per step
    finally:
        log.close()


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_moe_batch_rows_are_independent(family_dirs, kind):
    """A row's logits do not depend on which experts the other rows chose (prefill of a batch vs alone)."""
    lm = _lm(family_dirs, kind)
    ids = _ids(batch=4, length=12, seed=3)
    with torch.no_grad():
        batch = lm.model(ids)
        for b in range(4):
            assert (batch[b] - lm.model(ids[b:b + 1])[0]).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------ compiled
@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_decode_equals_eager(family_dirs, tmp_path_factory, kind):
    """Inductor-compiled one-token steps (AOTInductor on CPU; MoE: a torch.cond per expert) give the eager
    greedy tokens, every step through the compiled graph."""
    from leanformers.compile import CompiledDecode

    lm = _fresh(family_dirs[kind])
    lm.compile(cache_bucket=64, cache_dir=tmp_path_factory.mktemp(f"compile-{kind}"), mode="default")
    step = lm.step
    assert isinstance(step, CompiledDecode) and step.is_compiled and step.failure is None, step.failure
    ids = lm.tokenizer.encode(PROMPTS[0])
    before = dict(step.calls)
    out = _greedy(lm, ids, 24)
    assert step.calls["eager"] == before["eager"], step.eager
    assert step.calls["compiled"] - before["compiled"] == 23
    assert [v["how"] for v in step.info.values()] == ["compiled"]  # one ahead-of-time package, no fallback
    assert out == _greedy(_lm(family_dirs, kind), ids, 24)
    if kind in ("mixtral", "qwen3_moe"):  # two rows choosing different experts in one compiled step
        batch = lm.generate(PROMPTS[:2], max_new_tokens=12, ignore_eos=True)
        assert step.calls["eager"] == before["eager"], step.eager
        eager = _lm(family_dirs, kind).generate(PROMPTS[:2], max_new_tokens=12, ignore_eos=True)
        assert [o.token_ids for o in batch] == [o.token_ids for o in eager]


@pytest.mark.parametrize("kind", KINDS)
def test_export_from_gguf_loads_in_transformers(family_ggufs, tmp_path, kind):
    """A model read from GGUF, saved as a Hugging Face directory (the family's config keys and checkpoint
    names: Mixtral's block_sparse_moe, GPT-2's Conv1D), is read by transformers with the same logits."""
    from leanformers.train.export import save_pretrained

    lm = _fresh(family_ggufs[kind])
    out = save_pretrained(lm.model, lm.config, lm.tokenizer, tmp_path / "hf")
    ref = _reference(out)
    assert ref.config.model_type == kind
    ids = _ids()
    with torch.no_grad():
        assert (lm.model(ids) - ref(ids).logits).abs().max().item() <= 1e-4


class _BranchCounter:
    """A torch.compile backend that runs Dynamo's graph as is, checks that expert weights are read only
    inside torch.cond branches, and counts how many expert branches were taken (the true ones)."""

    def __init__(self):
        self.taken = 0
        self.conds = 0

    def __call__(self, gm, example_inputs):
        conds = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.cond]
        self.conds += len(conds)
        for node in gm.graph.nodes:
            if node.op == "placeholder" and "_experts_modules_" in node.name:
                assert node.users and all(u.target is torch.ops.higher_order.cond for u in node.users), node.name
        for node in conds:  # node.args[1]: the get_attr of the true branch's GraphModule
            getattr(gm, node.args[1].target).register_forward_pre_hook(lambda *_: self._take())
        return gm.forward

    def _take(self) -> None:
        self.taken += 1


@pytest.mark.slow  # Dynamo traces the whole step (no Inductor): ~25 s each
@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_moe_compiled_step_takes_only_the_chosen_experts(family_dirs, kind):
    """In a compiled CPU decode step each expert sits behind its own torch.cond (its weights are read
    nowhere else), and a one-row step takes exactly k branches per sparse layer; tokens equal eager."""
    from leanformers.compile import compile_decode

    lm = _fresh(family_dirs[kind])
    cfg = lm.config
    k, n_sparse = cfg.num_experts_per_tok, sum(cfg.is_sparse(i) for i in range(cfg.num_hidden_layers))
    backend = _BranchCounter()
    lm.step = compile_decode(lm.model, backend=backend, cache_bucket=64, precompile=False, warmup=False)
    ids = lm.tokenizer.encode(PROMPTS[0])
    out = _greedy(lm, ids, 12)
    assert lm.step.is_compiled and lm.step.calls["compiled"] == 11 and lm.step.calls["eager"] == 0
    assert backend.conds == cfg.num_local_experts * n_sparse  # one graph
    assert backend.taken == 11 * k * n_sparse
    assert out == _greedy(_lm(family_dirs, kind), ids, 12)


# ------------------------------------------------------------------------------------------ adapters
@pytest.mark.parametrize("kind", KINDS)
def test_lora_adapter_matches_peft(family_dirs, tmp_path, kind):
    """LoRA on every linear an adapter may name (MoE: not the experts, which transformers keeps as 3-D
    tensors), saved in PEFT's format: PEFT on the transformers model gives the same logits."""
    from peft import PeftModel

    from leanformers.train.lora import apply_lora, lora_modules, save_adapter

    lm = _fresh(family_dirs[kind])
    short = apply_lora(lm.model, r=4, alpha=8)
    wrapped = sorted(lora_modules(lm.model))
    if kind in ("mixtral", "qwen3_moe"):  # attention only, also Qwen3-MoE's dense layer 1 (see adapter_target)
        assert short == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert len(wrapped) >= 2 * lm.config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in lora_modules(lm.model).values():  # B is zero at init: make the adapter change something
            mod.lora_B.weight.copy_(0.1 * torch.randn(mod.lora_B.weight.shape, generator=g))
    save_adapter(lm.model, tmp_path / "adapter", base_model=str(family_dirs[kind]), r=4, alpha=8, dropout=0.0,
                 target_modules=short)
    ref = PeftModel.from_pretrained(_reference(family_dirs[kind]), str(tmp_path / "adapter")).eval()
    ids = _ids()
    with torch.no_grad():
        ours, theirs = lm.model(ids), ref(input_ids=ids).logits
        base = _lm(family_dirs, kind).model(ids)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours - base).abs().max().item() > 1e-2
