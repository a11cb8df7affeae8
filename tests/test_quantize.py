"""Weight-only int8/int4 quantization: kernel conventions, exact GGUF Q4 mapping, model swap, errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import leanformers
from leanformers.quantize import kernels as Q
from leanformers.checkpoint.gguf import GGUFTensor
from leanformers.errors import InvalidArgumentError, UnsupportedModelError
from leanformers.quantize import (
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    dequantize_int4,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
    quantize_model,
)


def _rand(*shape, seed=0, scale=0.05, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale + shift


def _load(path, **kw):
    return leanformers.load(str(path), dtype="float32", progress=False, **kw)


# ------------------------------------------------------------------------------ int8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [5, 20])  # 2*5 rows: the int8 kernel; 2*20: cast-matmul-scale (prefill)
def test_int8_linear_matches_reference(dtype, rows):
    w, b = _rand(40, 96, seed=1), _rand(40, seed=2)
    x = _rand(2, rows, 96, seed=3, scale=1.0).to(dtype)
    q, s = quantize_int8_per_channel(w, dtype)
    m = Int8Linear.from_float(w, b, dtype=dtype)
    assert torch.equal(m.weight, q) and torch.equal(m.weight_scale, s) and s.dtype == dtype
    w_ref = q.double() * s.double()[:, None]
    assert torch.equal(m.dequantize_weight(torch.float64), w_ref)
    # round to nearest per row: error at most half a step (plus the scale's own rounding)
    err = (w.double() - w_ref).abs().amax(dim=1)
    assert bool((err <= s.double() * (0.5 + 2.0**-7)).all())
    out = m(x)
    assert out.shape == (2, rows, 40) and out.dtype == dtype
    ref = x.double() @ w_ref.T + b.to(dtype).double()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()


def test_int8_fallback_path_matches_kernel(monkeypatch):
    w, x = _rand(32, 64, seed=4), _rand(3, 64, seed=5, scale=1.0)
    kernel = Int8Linear.from_float(w, dtype=torch.float32)
    monkeypatch.setitem(Q._INT8_BACKENDS, ("cpu", torch.float32), ("dequant", "test"))
    fallback = Int8Linear.from_float(w, dtype=torch.float32)
    assert torch.allclose(kernel(x), fallback(x), rtol=1e-5, atol=1e-6)
    assert fallback._backend == "dequant"


def test_int8_embedding_lookup_and_shared_linear():
    w = _rand(50, 32, seed=6)
    emb = Int8Embedding.from_float(w, dtype=torch.float32)
    ids = torch.tensor([[0, 7, 49, 7]])
    assert torch.equal(emb(ids), emb.dequantize_weight()[ids])
    head = emb.as_linear()
    assert head.weight is emb.weight and head.weight_scale is emb.weight_scale
    x = _rand(2, 32, seed=7, scale=1.0)
    assert torch.allclose(head(x), x @ emb.dequantize_weight().T, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ int4
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cpu", None])  # the CPU kernel forced, and the automatic choice
def test_int4_linear_matches_reference(group, dtype, backend):
    # 40 rows: not a multiple of 16, so the CPU kernel's zero-row padding is exercised too
    w, b = _rand(40, 256, seed=group, shift=0.02), _rand(40, seed=9)
    x = _rand(3, 256, seed=10, scale=1.0).to(dtype)
    codes, scale, zero = quantize_int4_groupwise(w, group, dtype)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and scale.shape == (40, 256 // group)
    w_ref = dequantize_int4(codes, scale, zero, group)
    # asymmetric grid over [min, max] of each group: error about half a step
    step = scale.float().repeat_interleave(group, dim=1)
    assert bool(((w - w_ref).abs() <= step * 0.5 + 4e-3 * w.abs().max()).all())
    m = Int4Linear.from_float(w, b, group_size=group, dtype=dtype, backend=backend)
    # automatic: the kernel for bfloat16; dequantize+matmul for float32 (the kernel is slow there)
    assert m.backend == (backend or ("cpu" if dtype == torch.bfloat16 else "dequant"))
    # what the kernel multiplies with is the reference grid (q - 8) * scale + zero, up to one float32
    # rounding (a wrong convention would be off by whole quantization steps)
    ref64 = dequantize_int4(codes, scale, zero, group, torch.float64)
    eff = m.dequantize_weight(torch.float64)
    assert bool(((eff - ref64).abs() <= 2.0**-23 * (ref64.abs() + zero.double().abs().max())).all())
    out = m(x)
    assert out.shape == (3, 40) and out.dtype == dtype
    ref = x.double() @ w_ref.double().T + b.to(dtype).double()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_dequant_fallback_matches_kernel(dtype):
    w, x = _rand(48, 128, seed=11), _rand(2, 128, seed=12, scale=1.0).to(dtype)
    kernel = Int4Linear.from_float(w, group_size=32, dtype=dtype, backend="cpu")
    fallback = Int4Linear.from_float(w, group_size=32, dtype=dtype, backend="dequant")
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    assert torch.allclose(fallback.dequantize_weight(), kernel.dequantize_weight(), **tol)
    assert torch.allclose(fallback(x).float(), kernel(x).float(), **tol)


def test_int4_forced_fallback_via_backend_table(monkeypatch):
    w, x = _rand(48, 128, seed=11), _rand(2, 128, seed=12, scale=1.0).bfloat16()
    kernel = Int4Linear.from_float(w, group_size=32, dtype=torch.bfloat16)
    assert kernel.backend == "cpu"
    monkeypatch.setitem(Q._INT4_BACKENDS, ("cpu", torch.bfloat16), ("dequant", "test"))
    fallback = Int4Linear.from_float(w, group_size=32, dtype=torch.bfloat16)
    assert fallback.backend == "dequant"
    assert torch.allclose(fallback(x).float(), kernel(x).float(), rtol=3e-2, atol=3e-2)


def test_int4_fallback_is_logged_with_reason(caplog):
    Q._INT4_BACKENDS.pop(("meta", torch.bfloat16), None)
    with caplog.at_level(logging.WARNING, logger="leanformers.quantize"):
        backend, why = Q.int4_backend("meta", torch.bfloat16)
    assert backend == "dequant" and "meta" in why
    assert any("fallback" in r.message and "meta" in r.message for r in caplog.records)


def test_int4_refuses_other_device():
    m = Int4Linear.from_float(_rand(32, 64), group_size=32, dtype=torch.bfloat16)
    assert m.backend == "cpu"
    with pytest.raises(InvalidArgumentError, match="packed for the cpu"):
        m(torch.zeros(1, 64, dtype=torch.bfloat16, device="meta"))


# ------------------------------------------------------------------------------ GGUF Q4 exact mapping
def _gguf_tensor(qtype: str, rows=48, cols=128, heads=None, seed=13):
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    w = _rand(rows, cols, seed=seed, shift=0.01).numpy().astype(np.float32)
    raw = quantize(w, GGMLQuantizationType[qtype])
    return GGUFTensor("blk.0.attn_q.weight", qtype, (rows, cols), raw, heads)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("heads", [None, 3])
@pytest.mark.parametrize("backend", ["cpu", "dequant"])
def test_gguf_q4_maps_exactly_in_float32(qtype, heads, backend):
    t = _gguf_tensor(qtype, heads=heads)
    m = Int4Linear.from_gguf(t, dtype=torch.float32, backend=backend)
    exact = t.dequantize(torch.float32)
    assert torch.equal(m.dequantize_weight(), exact)  # bit-exact, read back through the kernel
    x = _rand(2, 128, seed=14, scale=1.0)
    assert torch.allclose(m(x), x @ exact.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [None, 2])
@pytest.mark.parametrize("backend", ["cpu", "dequant"])
def test_gguf_q4_k_maps_exactly_in_float32(heads, backend):
    """Q4_K (llama.cpp's most used 4-bit type): codes, per-32 scales d*sc and mins -dmin*m read from the
    super-blocks give every value the file encodes; the int4 layer multiplies with exactly those."""
    from gguf import GGMLQuantizationType

    from gguf_utils import kquant_blocks

    raw, values = kquant_blocks(32, 512, GGMLQuantizationType.Q4_K, seed=5)  # dyadic: exact in float32
    t = GGUFTensor("blk.0.attn_q.weight", "Q4_K", (32, 512), raw, heads)
    exact = t.dequantize(torch.float32)
    want = torch.from_numpy(values).float()
    if heads:
        from leanformers.checkpoint.gguf import _unpermute_rows

        want = _unpermute_rows(want, heads)
    assert torch.equal(exact, want)
    codes, d, mins = t.q4_blocks()
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and d.shape == (32, 16)
    regroup = (codes.float().reshape(32, 16, 32) * d.unsqueeze(-1) + mins.unsqueeze(-1)).reshape(32, 512)
    assert torch.equal(regroup, exact)
    m = Int4Linear.from_gguf(t, dtype=torch.float32, backend=backend)
    assert torch.equal(m.dequantize_weight(), exact)
    x = _rand(2, 512, seed=14, scale=1.0)
    assert torch.allclose(m(x), x @ exact.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_gguf_q4_bfloat16_scales_error_bound(qtype):
    if qtype == "Q4_K":
        from gguf import GGMLQuantizationType

        from gguf_utils import kquant_blocks

        raw = kquant_blocks(48, 256, GGMLQuantizationType.Q4_K, seed=6, dyadic=False)[0]
        t = GGUFTensor("blk.0.ffn_down.weight", "Q4_K", (48, 256), raw)
    else:
        t = _gguf_tensor(qtype)
    rows, cols = t.shape
    codes, d, mins = t.q4_blocks()
    m = Int4Linear.from_gguf(t, dtype=torch.bfloat16)
    err = (m.dequantize_weight() - t.dequantize(torch.float32)).abs().reshape(rows, cols // 32, 32).amax(-1)
    # bfloat16 keeps 8 significant bits: |dscale| <= 2^-8 |d|, |dzero| <= 2^-8 |m + 8d|, |q - 8| <= 8
    bound = (8 * d.abs() + (mins + 8 * d).abs()) * 2.0**-8 + 1e-7
    assert bool((err <= bound).all())
    assert float(err.max()) > 0  # bfloat16 scales are not exact: the docstring says so


def test_load_gguf_int4_uses_exact_blocks(tiny_models, tmp_path):
    from gguf import GGMLQuantizationType

    from gguf_utils import write_gguf_from_hf_dir
    from leanformers.checkpoint.gguf import GGUFFile

    path = write_gguf_from_hf_dir(tiny_models["llama3"], tmp_path / "q41.gguf", qtype=GGMLQuantizationType.Q4_1)
    f = GGUFFile(path)
    tensors = f.tensors(f.config())
    lm = leanformers.load(str(path), quantize="int4", dtype="float32", progress=False)
    layer = lm.model.model.layers[1]
    for name, mod in [("self_attn.q_proj", layer.self_attn.q_proj), ("self_attn.k_proj", layer.self_attn.k_proj),
                      ("mlp.down_proj", layer.mlp.down_proj)]:
        assert isinstance(mod, Int4Linear)
        exact = tensors[f"model.layers.1.{name}.weight"].dequantize(torch.float32)
        assert torch.equal(mod.dequantize_weight(), exact), name
    # untied lm_head and embedding: int8 by default
    assert isinstance(lm.model.lm_head, Int8Linear) and isinstance(lm.model.model.embed_tokens, Int8Embedding)
    ref = leanformers.load(str(path), dtype="float32", progress=False)
    ids = torch.tensor([[1, 5, 9, 40, 77, 200, 3]])
    with torch.no_grad():
        a, b = lm.model(ids), ref.model(ids)
    assert (a - b).abs().max() <= 0.02 * b.abs().max()  # only lm_head/embedding int8 differ


# ------------------------------------------------------------------------------ memory: by rows, never whole
@pytest.mark.parametrize("fn", ["int8", "int4"])
def test_quantization_by_row_chunks_equals_whole(fn, monkeypatch):
    import leanformers.quantize.kernels as kernels

    w = _rand(200, 64, seed=3)
    w[7] = 0.0  # a zero row (scale 1, codes 8 / 0)
    quant = (lambda t: kernels.quantize_int8_per_channel(t)) if fn == "int8" else \
        (lambda t: kernels.quantize_int4_groupwise(t, 32))
    whole = quant(w)
    monkeypatch.setattr(kernels, "_CHUNK_ELEMENTS", 64 * 7)  # 7 rows at a time, a ragged last chunk
    for a, b in zip(quant(w), whole):
        assert torch.equal(a, b)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q4_1", "F16", "F32"])
def test_gguf_rows_read_alone_equal_the_whole_tensor(qtype, monkeypatch):
    import leanformers.quantize.kernels as kernels

    t = _gguf_tensor(qtype, rows=50, cols=64)
    if t.raw.ndim == 1 or qtype in ("F16", "F32"):  # the loader keeps float types flat
        t.raw = t.raw.reshape(-1).view(np.uint8)
    whole = t.dequantize(torch.float32)
    assert torch.equal(t.float_rows(10, 23), whole[10:23])
    assert torch.equal(t.float_rows(45, 99), whole[45:])
    monkeypatch.setattr(kernels, "_CHUNK_ELEMENTS", 64 * 6)
    for a, b in zip(kernels.quantize_int8_per_channel(t), kernels.quantize_int8_per_channel(whole)):
        assert torch.equal(a, b)
    with pytest.raises(Exception, match="permuted"):
        _gguf_tensor(qtype, rows=48, cols=64, heads=3).float_rows(0, 4)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_load_gguf_quantized_never_holds_the_float_model(scheme, tiny_models, tmp_path, monkeypatch):
    """load(gguf, quantize=...) reads each quantized weight by row chunks as it quantizes it: the same model
    as loading in float32 and quantizing after, without the float32 model ever existing whole."""
    from gguf import GGMLQuantizationType

    import leanformers.quantize.kernels as kernels
    from gguf_utils import write_gguf_from_hf_dir
    from leanformers.checkpoint.gguf import GGUFTensor as T

    path = write_gguf_from_hf_dir(tiny_models["llama3"], tmp_path / "q8.gguf", qtype=GGMLQuantizationType.Q8_0)
    after = leanformers.load(str(path), dtype="float32", progress=False).quantize(scheme)
    largest: list[int] = []
    real = T.dequantize

    def spy(self, dtype=torch.float32):
        out = real(self, dtype)
        if not self.permute_heads:  # q/k rows permuted by llama.cpp are read whole, one matrix at a time
            largest.append(out.numel())
        return out

    monkeypatch.setattr(T, "dequantize", spy)
    monkeypatch.setattr(kernels, "_CHUNK_ELEMENTS", 512)
    lm = leanformers.load(str(path), quantize=scheme, progress=False)
    embed = lm.model.get_submodule(lm.model.input_embedding)
    assert isinstance(embed, Int8Embedding)
    floats = sum(p.numel() for n, p in lm.model.named_parameters() if p.is_floating_point())
    # every other dequantization was a chunk of rows or a small float tensor (norms): no whole matrix
    assert max(largest) <= max(512, embed.embedding_dim) and max(largest) < embed.weight.numel()
    assert floats < embed.weight.numel()
    sd_a, sd_b = after.model.state_dict(), lm.model.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    ids = torch.tensor([[1, 5, 9, 40, 77, 200, 3]])
    with torch.no_grad():
        assert torch.equal(lm.model(ids), after.model(ids))


# ------------------------------------------------------------------------------ whole models
def _dequantized_reference(path, q_lm):
    """The float32 model with every quantized weight replaced by what its quantized module multiplies with
    (`dequantize_weight()`), and the same biases: quantized == reference up to float rounding."""
    ref = _load(path)
    n = 0
    with torch.no_grad():
        for name, mod in q_lm.model.named_modules():
            if isinstance(mod, (Int8Linear, Int4Linear, Int8Embedding)):
                sub = ref.model.get_submodule(name)
                assert sub.weight.shape == mod.dequantize_weight().shape, name
                sub.weight.copy_(mod.dequantize_weight(torch.float32))
                if getattr(mod, "bias", None) is not None:
                    sub.bias.copy_(mod.bias.float())
                n += 1
    assert n > 0
    return ref


_IDS = torch.tensor([[1, 17, 99, 5, 230, 42, 8, 300, 11, 12, 13, 77, 250, 3, 90, 91]])


def _swap_checks(lm, scheme):
    layer = lm.model.model.layers[0]
    linear_type = Int8Linear if scheme == "int8" else Int4Linear
    n_q = sum(isinstance(m, linear_type) for m in lm.model.modules())
    assert n_q == 7 * lm.config.num_hidden_layers + (scheme == "int8")  # + the int8 lm_head
    assert isinstance(layer.mlp.down_proj, linear_type) and isinstance(layer.self_attn.k_proj, linear_type)
    assert isinstance(lm.model.lm_head, Int8Linear)  # int8 lm_head by default
    assert not any(type(m) is nn.Linear for m in lm.model.modules())
    if lm.config.qkv_bias:
        assert layer.self_attn.q_proj.bias is not None


QUANT_CASES = [("int8", k) for k in ["llama3", "mistral", "qwen2", "smollm2", "linear_rope_bias"]] + [
    ("int4", k) for k in ["llama3", "mistral", "qwen2", "linear_rope_bias"]  # smollm2's 48 has no int4 group
]


@pytest.mark.parametrize("scheme,kind,int4_kernel", [(s, k, False) for s, k in QUANT_CASES]
                         + [(s, k, True) for s, k in QUANT_CASES if s == "int4"])
def test_quantized_model_equals_dequantized_reference(tiny_models, monkeypatch, scheme, kind, int4_kernel):
    """float32 activations: the quantized model computes exactly the float model of its dequantized weights
    (measured max difference 2e-6..9e-6 with logits up to ~5); int4 through the CPU kernel too, not only
    dequantize+matmul (float32 normally takes the latter, it is faster there)."""
    if int4_kernel:
        monkeypatch.setitem(Q._INT4_BACKENDS, ("cpu", torch.float32), ("cpu", "forced by the test"))
    lm = _load(tiny_models[kind]).quantize(scheme, dtype=torch.float32)
    assert lm.dtype == torch.float32 and lm.model.model.norm.weight.dtype == torch.float32
    _swap_checks(lm, scheme)
    if scheme == "int4":
        assert lm.model.model.layers[0].mlp.up_proj.backend == ("cpu" if int4_kernel else "dequant")
    ref = _dequantized_reference(tiny_models[kind], lm)
    with torch.no_grad():
        out, expected, plain = lm.model(_IDS), ref.model(_IDS), _load(tiny_models[kind]).model(_IDS)
    assert (out - expected).abs().max().item() <= 5e-5
    assert (expected - plain).abs().max().item() > 1e-2  # the weights really were quantized


@pytest.mark.parametrize("scheme,kind", QUANT_CASES)
def test_quantized_bfloat16_default_within_bfloat16_noise(tiny_models, scheme, kind):
    """Default dtype (bfloat16 activations, the int4 CPU kernel): against the same float32 reference, the
    error is bfloat16 rounding, bounded by twice what running that reference itself in bfloat16 costs."""
    lm = _load(tiny_models[kind]).quantize(scheme)
    assert lm.dtype == torch.bfloat16 and lm.model.model.norm.weight.dtype == torch.bfloat16
    _swap_checks(lm, scheme)
    if scheme == "int4":
        assert lm.model.model.layers[0].mlp.up_proj.backend == "cpu"
    ref = _dequantized_reference(tiny_models[kind], lm)
    with torch.no_grad():
        out, expected = lm.model(_IDS).float(), ref.model(_IDS)
        noise = (ref.model.to(torch.bfloat16)(_IDS).float() - expected).abs().max().item()
    assert (out - expected).abs().max().item() <= 2 * noise
    r = lm.generate([1, 17, 99], max_new_tokens=8, ignore_eos=True)
    assert len(r.token_ids) == 8


def test_tied_embedding_stays_one_int8_tensor(tiny_models):
    lm = _load(tiny_models["smollm2"]).quantize("int8")
    head, emb = lm.model.lm_head, lm.model.model.embed_tokens
    assert isinstance(head, Int8Linear) and isinstance(emb, Int8Embedding)
    assert head.weight is emb.weight and head.weight_scale is emb.weight_scale
    big = [p for p in lm.model.parameters() if p.shape == (lm.config.vocab_size, lm.config.hidden_size)]
    assert len(big) == 1 and big[0].dtype == torch.int8
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        x = lm.model.model.embed_tokens(ids)
    assert torch.equal(x[0, 1], emb.dequantize_weight(x.dtype)[4])


def test_tied_embedding_int4_default_and_opt_out(tiny_models):
    lm = _load(tiny_models["qwen2"]).quantize("int4")  # qwen2 tiny is tied
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    assert lm.model.lm_head.weight.dtype == torch.int8
    lm = _load(tiny_models["qwen2"]).quantize("int8", include_lm_head=False)
    assert type(lm.model.lm_head) is nn.Linear and type(lm.model.model.embed_tokens) is nn.Embedding
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    assert lm.model.lm_head.weight.dtype == torch.bfloat16
    lm = _load(tiny_models["qwen2"]).quantize("int4", include_lm_head=True)
    assert isinstance(lm.model.lm_head, Int4Linear) and isinstance(lm.model.model.embed_tokens, Int8Embedding)


def test_quantize_after_fuse_projections(tiny_models):
    plain = _load(tiny_models["qwen2"]).quantize("int8", dtype=torch.float32)
    fused = _load(tiny_models["qwen2"])
    fused.model.fuse_projections()
    fused.quantize("int8", dtype=torch.float32)
    attn = fused.model.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, Int8Linear) and attn.qkv_proj.bias is not None
    assert isinstance(fused.model.model.layers[0].mlp.gate_up_proj, Int8Linear)
    ids = torch.tensor([[1, 2, 3, 50, 60]])
    with torch.no_grad():  # per-channel int8 quantizes every row alike, fused or not
        assert torch.allclose(plain.model(ids), fused.model(ids), rtol=1e-4, atol=1e-5)


def test_quantize_then_fuse_is_a_noop_for_quantized_layers(tiny_models):
    lm = _load(tiny_models["llama3"]).quantize("int4")
    lm.model.fuse_projections()
    assert lm.model.model.layers[0].self_attn.qkv_proj is None
    assert isinstance(lm.model.model.layers[0].self_attn.q_proj, Int4Linear)


def test_filter_fn_keeps_selected_layers_float(tiny_models):
    lm = _load(tiny_models["llama3"])
    quantize_model(lm.model, "int8", filter_fn=lambda name, m: "mlp" in name)
    layer = lm.model.model.layers[0]
    assert isinstance(layer.mlp.up_proj, Int8Linear)
    assert type(layer.self_attn.q_proj) is nn.Linear and layer.self_attn.q_proj.weight.dtype == torch.bfloat16


def test_activation_switch_is_logged(tiny_models, caplog):
    lm = _load(tiny_models["llama3"])
    with caplog.at_level(logging.INFO, logger="leanformers.quantize"):
        lm.quantize("int4")
    assert any("bfloat16" in r.message and "float32" in r.message for r in caplog.records)


# ------------------------------------------------------------------------------ bad inputs
def test_unknown_scheme_lists_valid_ones(tiny_models):
    lm = _load(tiny_models["llama3"])
    with pytest.raises(InvalidArgumentError, match="int8, int4"):
        lm.quantize("int3")
    with pytest.raises(InvalidArgumentError, match="int8, int4"):
        leanformers.load(str(tiny_models["llama3"]), quantize="fp8", progress=False)


def test_bad_group_sizes(tiny_models):
    lm = _load(tiny_models["llama3"])
    with pytest.raises(InvalidArgumentError, match="32, 64, 128, 256"):
        lm.quantize("int4", group_size=48)
    # 256 is a valid group size but does not divide hidden_size 64: the message names layer and sizes
    with pytest.raises(InvalidArgumentError, match=r"256.*64.*model\.layers\.0\.self_attn\.q_proj"):
        lm.quantize("int4", group_size=256)
    assert type(lm.model.model.layers[0].mlp.up_proj) is nn.Linear  # nothing was half-quantized
    smol = _load(tiny_models["smollm2"])  # hidden 48
    with pytest.raises(InvalidArgumentError, match="does not divide in_features 48"):
        smol.quantize("int4", group_size=32)


def test_other_bad_inputs(tiny_models):
    lm = _load(tiny_models["llama3"])
    with pytest.raises(InvalidArgumentError, match="include_lm_head"):
        lm.quantize("int8", include_lm_head="fp4")
    lm.quantize("int8")
    with pytest.raises(InvalidArgumentError, match="already quantized"):
        lm.quantize("int4")
    with pytest.raises(UnsupportedModelError):
        quantize_model(nn.Sequential(nn.ReLU()), "int8")
    with pytest.raises(InvalidArgumentError, match="group_size"):
        Int4Linear.from_float(_rand(16, 48), group_size=32)


# ------------------------------------------------------------------------------ the real model
@pytest.mark.slow
def test_smollm2_int4_exact_gguf_and_answer(smollm2_gguf):
    from leanformers.checkpoint.gguf import GGUFFile

    lm = leanformers.load(str(smollm2_gguf), quantize="int4", progress=False)
    f = GGUFFile(smollm2_gguf)
    t = f.tensors(f.config())["model.layers.3.mlp.gate_proj.weight"]
    mod = lm.model.model.layers[3].mlp.gate_proj
    assert isinstance(mod, Int4Linear) and mod.dtype == torch.bfloat16
    codes, d, m = t.q4_blocks()
    err = (mod.dequantize_weight() - t.dequantize()).abs()
    # bfloat16 scales: within the bfloat16 rounding of d and m + 8d (measured max ~1e-3 here)
    bound = ((8 * d.abs() + (m + 8 * d).abs()) * 2.0**-8).repeat_interleave(32, dim=1) + 1e-7
    assert bool((err <= bound).all())
    emb = lm.model.model.embed_tokens
    assert isinstance(emb, Int8Embedding) and lm.model.lm_head.weight is emb.weight
    r = lm.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=12)
    assert "Paris" in r.text
