"""Loading checkpoints: parity with transformers on tiny random models and the real SmolLM2 GGUF; bad input."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import leanformers
from leanformers.errors import CheckpointError, ConfigError, LeanformersError, ModelNotFoundError, UnsupportedModelError

from conftest import TINY_CONFIGS, TINY_VOCAB, save_tiny_model
from gguf_utils import kquant_blocks, write_gguf_from_hf_dir


def _reference(directory: Path, **kw):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kw).eval()


def _ids(batch: int = 3, length: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_VOCAB, (batch, length), generator=g)


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_logits_match_transformers(tiny_models, kind):
    lm = leanformers.load(str(tiny_models[kind]), dtype="float32", progress=False)
    ref = _reference(tiny_models[kind])
    ids = _ids(length=24)  # longer than mistral's sliding window (5)
    with torch.no_grad():
        ours, theirs = lm.model(ids), ref(ids).logits
    assert ours.shape == theirs.shape == (3, 24, TINY_VOCAB)
    assert (ours - theirs).abs().max().item() <= 1e-4


def _with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_tiny_models_carry_signal(tiny_models, tmp_path, kind):
    """Parity within 1e-4 proves something only if plausible bugs move logits by far more: a rope base 50x
    wrong, KV heads served to the wrong query heads, attention that is not near-uniform, top-2 margins
    well above the tolerance (measured: rope 0.5-4, KV swap 5-8, median margin 0.17-0.28, the largest
    attention weight 2.7-5.7x uniform)."""
    lm = leanformers.load(str(tiny_models[kind]), dtype="float32", progress=False)
    cfg = json.loads((tiny_models[kind] / "config.json").read_text())
    rope = dict(cfg["rope_parameters"], rope_theta=cfg["rope_parameters"]["rope_theta"] * 50)
    wrong_rope = leanformers.load(str(_with_config(tiny_models[kind], tmp_path / "rope", rope_parameters=rope)),
                                  dtype="float32", progress=False)
    ids = _ids(length=24)
    with torch.no_grad():
        logits = lm.model(ids)
        assert (wrong_rope.model(ids) - logits).abs().max() > 0.2
        ref = _reference(tiny_models[kind], attn_implementation="eager")
        attn = ref(ids, output_attentions=True).attentions
    top2 = logits.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).median() > 0.1
    for a in attn:  # (B, H, T, T): each late query's largest weight, against uniform over the keys it sees
        late = a[..., 8:, :]
        assert (late.amax(-1) * (late > 0).sum(-1)).mean() > 2.0
    n_heads, n_kv = lm.config.num_attention_heads, lm.config.num_key_value_heads
    if kind == "linear_rope_bias":
        assert n_kv == n_heads  # the multi-head case
        return
    assert n_kv >= 2 and n_heads // n_kv >= 2
    d = lm.config.head_dim
    with torch.no_grad():  # serve the KV heads to the wrong query groups: the logits must notice
        for layer in lm.model.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                for p in (proj.weight, proj.bias):
                    if p is not None:
                        p.copy_(p.reshape(n_kv, d, *p.shape[1:]).roll(1, 0).reshape(p.shape))
        assert (lm.model(ids) - logits).abs().max() > 1.0


def test_config_variants_are_exercised(tiny_models):
    cfgs = {k: leanformers.load(str(d), progress=False).config for k, d in tiny_models.items()}
    assert cfgs["llama3"].rope_type == "llama3" and not cfgs["llama3"].tie_word_embeddings
    assert cfgs["mistral"].layer_window(0) == 5 and cfgs["mistral"].head_dim == 24
    assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].o_bias
    assert cfgs["smollm2"].tie_word_embeddings
    assert cfgs["linear_rope_bias"].rope_type == "linear" and cfgs["linear_rope_bias"].o_bias
    shards = list(tiny_models["llama3"].glob("model-*.safetensors"))
    assert len(shards) > 1 and (tiny_models["llama3"] / "model.safetensors.index.json").is_file()


def test_sliding_window_changes_the_result(tiny_models, tmp_path):
    """Guard against a mask that ignores the window: the same weights without it give other logits."""
    d = tmp_path / "nowindow"
    shutil.copytree(tiny_models["mistral"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["sliding_window"] = None
    (d / "config.json").write_text(json.dumps(cfg))
    ids = _ids(length=24)
    with torch.no_grad():
        a = leanformers.load(str(tiny_models["mistral"]), progress=False).model(ids)
        b = leanformers.load(str(d), progress=False).model(ids)
    assert torch.equal(a[:, :5], b[:, :5])
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


def test_old_style_rope_keys(tiny_models, tmp_path):
    """config.json with `rope_theta` + `rope_scaling` (transformers 4.x) loads like `rope_parameters`."""
    d = tmp_path / "old"
    shutil.copytree(tiny_models["llama3"], d)
    cfg = json.loads((d / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    cfg["rope_scaling"] = params
    (d / "config.json").write_text(json.dumps(cfg))
    ids = _ids()
    with torch.no_grad():
        a = leanformers.load(str(d), progress=False).model(ids)
        b = leanformers.load(str(tiny_models["llama3"]), progress=False).model(ids)
    assert torch.equal(a, b)


def test_dtype_choice(tiny_models, tmp_path):
    lm = leanformers.load(str(tiny_models["smollm2"]), dtype="bfloat16", progress=False)
    assert lm.dtype == torch.bfloat16 and lm.model.lm_head.weight.dtype == torch.bfloat16
    d = save_tiny_model("smollm2", tmp_path / "fp16", dtype=torch.float16)
    assert leanformers.load(str(d), progress=False).dtype == torch.bfloat16  # fp16 is slow on CPU
    assert leanformers.load(str(d), dtype="float16", progress=False).dtype == torch.float16
    with pytest.raises(leanformers.InvalidArgumentError, match="dtype"):
        leanformers.load(str(d), dtype="int3")


def test_tied_embeddings_share_memory(tiny_models):
    model = leanformers.load(str(tiny_models["smollm2"]), progress=False).model
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_safetensors_are_memory_mapped_not_copied(tiny_models):
    """float32 checkpoint loaded as float32: parameters are views of the file mapping."""
    from leanformers.checkpoint.safetensors import read_safetensors

    path = tiny_models["qwen2"] / "model.safetensors"
    tensors = read_safetensors(path)
    lm = leanformers.load(str(tiny_models["qwen2"]), dtype="float32", progress=False)
    w = lm.model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w, tensors["model.layers.0.mlp.up_proj.weight"])
    assert not w.untyped_storage().resizable()  # a frombuffer view, not an allocated copy


def test_torch_bin_checkpoint_when_no_safetensors(tiny_models, tmp_path):
    d = tmp_path / "bin"
    shutil.copytree(tiny_models["smollm2"], d)
    from safetensors.torch import load_file

    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    ids = _ids()
    with torch.no_grad():
        a = leanformers.load(str(d), progress=False).model(ids)
        b = leanformers.load(str(tiny_models["smollm2"]), progress=False).model(ids)
    assert torch.equal(a, b)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_torch_bin_refuses_pickled_code(tiny_models, tmp_path):
    d = tmp_path / "evil"
    shutil.copytree(tiny_models["smollm2"], d)
    (d / "model.safetensors").unlink()
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        leanformers.load(str(d), progress=False)


# ------------------------------------------------------------------------------------------ GGUF
@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_gguf_matches_transformers(tiny_models, tmp_path, qtype):
    """Our GGUF reader (dequantize + undo llama.cpp's q/k permutation) vs transformers on the same file."""
    g = write_gguf_from_hf_dir(tiny_models["llama3"], tmp_path / f"m-{qtype.name}.gguf", qtype=qtype)
    lm = leanformers.load(str(g), progress=False)
    ref = _reference(g.parent, gguf_file=g.name)
    ids = _ids()
    with torch.no_grad():
        assert (lm.model(ids) - ref(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind, qtype", [
    ("mistral", Q.F32), ("mistral", Q.Q8_0), ("qwen2", Q.F32), ("qwen2", Q.Q4_1), ("qwen2", Q.BF16),
    ("smollm2", Q.F32), ("smollm2", Q.F16),
])
def test_gguf_families_match_transformers(tiny_models, tmp_path, kind, qtype):
    """Each family written as llama.cpp's converter writes it, read by transformers from the same file:
    Mistral as architecture `llama` with q/k rows permuted (llama.cpp has no `mistral` architecture and
    stores no sliding window for `llama`: neither reader applies one); Qwen2 as `qwen2`, rows not permuted,
    q/k/v biases; the SmolLM2 shape with a tied head (hidden 48: rows not a multiple of a block stay F16)."""
    g = write_gguf_from_hf_dir(tiny_models[kind], tmp_path / f"{kind}-{qtype.name}.gguf", qtype=qtype)
    lm = leanformers.load(str(g), progress=False)
    ref = _reference(g.parent, gguf_file=g.name)
    expected_type = {"mistral": "llama", "qwen2": "qwen2", "smollm2": "llama"}[kind]
    assert lm.config.model_type == ref.config.model_type == expected_type
    assert lm.config.num_key_value_heads == 2 and lm.config.sliding_window is None
    ids = _ids()
    with torch.no_grad():
        ours, theirs = lm.model(ids), ref(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert lm.config.tie_word_embeddings == (kind != "mistral")


def test_gguf_mistral_architecture_matches_the_safetensors(tiny_models, tmp_path):
    """A GGUF of architecture `mistral` (not written by llama.cpp, which writes Mistral as `llama`) is read
    with llama.cpp's conventions for every Mistral architecture: q/k rows permuted, plus the sliding window
    from `mistral.attention.sliding_window`. transformers cannot read it (gguf-py has no `mistral`
    architecture), so the reference is transformers on the original safetensors; F32 is exact."""
    g = write_gguf_from_hf_dir(tiny_models["mistral"], tmp_path / "mistral.gguf", arch="mistral")
    lm = leanformers.load(str(g), progress=False)
    assert lm.config.model_type == "mistral" and lm.config.layer_window(0) == 5 and lm.config.head_dim == 24
    ids = _ids(length=24)  # beyond the window
    with torch.no_grad():
        assert (lm.model(ids) - _reference(tiny_models["mistral"])(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kquant", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_gguf_kquants_match_transformers(tmp_path, kquant):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    d = tmp_path / "hf"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    from conftest import write_tiny_tokenizer

    write_tiny_tokenizer(d)
    g = write_gguf_from_hf_dir(d, tmp_path / "k.gguf", kquant=kquant)
    lm = leanformers.load(str(g), progress=False)
    for name in ["model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight"]:
        rows, cols = lm.model.get_parameter(name).shape  # the values the writer encoded, independently of gguf
        _, values = kquant_blocks(rows, cols, kquant, seed=len(name))
        assert torch.equal(lm.model.get_parameter(name).double(), torch.from_numpy(values)), name
    ref = _reference(g.parent, gguf_file=g.name)
    ids = _ids()
    with torch.no_grad():
        ours, theirs = lm.model(ids), ref(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4 * max(1.0, theirs.abs().max().item())


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("dyadic", [True, False])
def test_kquant_blocks_dequantize_to_the_encoded_values(qtype, dyadic):
    """Blocks built from chosen codes and scales with our own encoder of ggml's layout (tests/gguf_utils.py,
    not gguf.quants): the reader must return d * scale * code - dmin * min (Q6_K: d * scale * (code - 32))."""
    from leanformers.checkpoint.gguf import GGUFTensor

    raw, values = kquant_blocks(3, 512, Q[qtype], seed=7, dyadic=dyadic)  # two super-blocks per row
    got = GGUFTensor("blk.0.ffn_down.weight", qtype, (3, 512), raw).dequantize(torch.float32)
    values = torch.from_numpy(values)
    if dyadic:  # power-of-two super-block scales: every value is exact in float32
        assert torch.equal(got.double(), values)
    else:  # float16 scales: float32 products round (a few ulp of the largest term)
        torch.testing.assert_close(got.double(), values, rtol=0, atol=2.0**-20 * float(values.abs().max()))
    assert float(got.abs().max()) > 0.1 and len(set(got.flatten().tolist())) > 200  # not trivially zero


def test_q6_k_hand_made_block():
    """One Q6_K super-block written byte by byte: weight 0 has code 40 (low nibble 8, high bits 2) and
    scale 3, weight 200 (second half, third run of 32, sub-block 12) code 5 and scale -7; d = 0.5."""
    from leanformers.checkpoint.gguf import GGUFTensor

    block = np.zeros(210, dtype=np.uint8)
    block[0] = 8  # ql[0] low nibble: weight 0
    block[128] = 2  # qh[0] bits 0-1: weight 0
    block[192] = 3  # scales[0]
    block[192 + 12] = np.int8(-7).view(np.uint8)  # scales[12]: weights 192..207
    # weight 200 = 128 + 64 + 8: second half, run 2 -> high nibble of ql[64 + 8], qh[32 + 8] bits 4-5
    block[64 + 8] = 5 << 4
    block[128 + 32 + 8] = 0 << 4
    block[208:210] = np.array([0.5], dtype=np.float16).view(np.uint8)
    got = GGUFTensor("blk.0.ffn_down.weight", "Q6_K", (1, 256), block.reshape(1, -1)).dequantize()
    assert got[0, 0].item() == 0.5 * 3 * (40 - 32)
    assert got[0, 200].item() == 0.5 * -7 * (5 - 32)
    assert got[0, 1].item() == 0.5 * 3 * (0 - 32)  # every other code is 0


@pytest.mark.slow
def test_smollm2_gguf_logits_match_transformers(lf_smollm2, hf_smollm2):
    model, tok = hf_smollm2
    texts = ["The capital of France is", "def fibonacci(n):\n    if n < 2:", "你好，世界！Hello 🤗"]
    for text in texts:
        ids = torch.tensor([tok(text).input_ids])
        with torch.no_grad():
            diff = (lf_smollm2.model(ids) - model(ids).logits).abs().max().item()
        assert diff <= 1e-3, (text, diff)
    batch = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (lf_smollm2.model(batch) - model(batch).logits).abs().max().item() <= 1e-3


# ------------------------------------------------------------------------------------------ bad input
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _load_error(path, exc_type=LeanformersError) -> str:
    with pytest.raises(exc_type) as info:
        leanformers.load(str(path), progress=False)
    return str(info.value)


def test_missing_directory(tmp_path):
    msg = _load_error(tmp_path / "nope", ModelNotFoundError)
    assert "nope" in msg


def test_config_not_json(tiny_models, tmp_path):
    d = _copy(tiny_models["smollm2"], tmp_path / "m")
    (d / "config.json").write_text("{not json")
    msg = _load_error(d, ConfigError)
    assert "config.json" in msg and "JSON" in msg


def test_config_missing_keys(tiny_models, tmp_path):
    d = _copy(tiny_models["smollm2"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    msg = _load_error(d, ConfigError)
    assert "hidden_size" in msg and "config.json" in msg


@pytest.mark.parametrize(
    "change, needle",
    [({"model_type": "gpt_neox"}, "gpt_neox"),
     ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
     ({"hidden_act": "relu2"}, "relu2")],
)
def test_unsupported_architecture_or_feature(tiny_models, tmp_path, change, needle):
    d = _copy(tiny_models["smollm2"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    msg = _load_error(d, UnsupportedModelError)
    assert needle in msg


def _corrupt_safetensors(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    if how == "header_length":
        data[:8] = struct.pack("<Q", len(data) * 10)
    elif how == "header_json":
        data[8:16] = b"\x00garbag"
    elif how == "truncated":
        data = data[: 8 + n + 100]
    elif how == "tiny":
        data = data[:5]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "how, needle",
    [("header_length", "header length"), ("header_json", "not valid JSON"), ("truncated", "out of range"),
     ("tiny", "truncated")],
)
def test_corrupt_safetensors(tiny_models, tmp_path, how, needle):
    d = _copy(tiny_models["smollm2"], tmp_path / "m")
    _corrupt_safetensors(d / "model.safetensors", how)
    msg = _load_error(d, CheckpointError)
    assert needle in msg and "model.safetensors" in msg


def test_shape_mismatch_with_model(tiny_models, tmp_path):
    d = _copy(tiny_models["smollm2"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    msg = _load_error(d, CheckpointError)
    assert "mlp" in msg and "[128, 48]" in msg and "[96, 48]" in msg


def test_dtype_mismatch_with_model(tiny_models, tmp_path):
    from leanformers.checkpoint.safetensors import read_safetensors, write_safetensors

    d = _copy(tiny_models["smollm2"], tmp_path / "m")
    tensors = {k: v.clone() for k, v in read_safetensors(d / "model.safetensors").items()}
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    write_safetensors(tensors, d / "model.safetensors")
    msg = _load_error(d, CheckpointError)
    assert "model.norm.weight" in msg and "int32" in msg


def test_missing_and_unexpected_tensors(tiny_models, tmp_path):
    from leanformers.checkpoint.safetensors import read_safetensors, write_safetensors

    d = _copy(tiny_models["smollm2"], tmp_path / "m")
    tensors = {k: v.clone() for k, v in read_safetensors(d / "model.safetensors").items()}
    tensors.pop("model.layers.1.mlp.down_proj.weight")
    write_safetensors(tensors, d / "model.safetensors")
    assert "model.layers.1.mlp.down_proj.weight" in _load_error(d, CheckpointError)
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(48, 128)
    tensors["model.layers.7.extra.weight"] = torch.zeros(2)
    write_safetensors(tensors, d / "model.safetensors")
    assert "model.layers.7.extra.weight" in _load_error(d, CheckpointError)


def test_missing_shard(tiny_models, tmp_path):
    d = _copy(tiny_models["llama3"], tmp_path / "m")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    msg = _load_error(d, CheckpointError)
    assert shard.name in msg


def test_no_weights(tiny_models, tmp_path):
    d = _copy(tiny_models["smollm2"], tmp_path / "m")
    (d / "model.safetensors").unlink()
    assert "no weights" in _load_error(d, CheckpointError)


def test_tokenizer_missing(tiny_models, tmp_path):
    d = _copy(tiny_models["smollm2"], tmp_path / "m")
    (d / "tokenizer.json").unlink()
    msg = _load_error(d, leanformers.TokenizerError)
    assert "tokenizer.json" in msg


def test_gguf_bad_magic(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGML" + b"\x00" * 100)
    msg = _load_error(p, CheckpointError)
    assert "magic" in msg and "bad.gguf" in msg


def test_gguf_truncated(tiny_models, tmp_path):
    g = write_gguf_from_hf_dir(tiny_models["smollm2"], tmp_path / "t.gguf")
    data = g.read_bytes()
    g.write_bytes(data[: len(data) - 4096])
    msg = _load_error(g, CheckpointError)
    assert "t.gguf" in msg and ("truncated" in msg or "corrupt" in msg)


def test_gguf_truncated_header(tiny_models, tmp_path):
    g = write_gguf_from_hf_dir(tiny_models["smollm2"], tmp_path / "h.gguf")
    g.write_bytes(g.read_bytes()[:200])
    msg = _load_error(g, CheckpointError)
    assert "h.gguf" in msg


def test_gguf_unsupported_quant_type(tiny_models, tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    p = tmp_path / "q2.gguf"
    w = GGUFWriter(str(p), "llama")
    for key, value in [("embedding_length", 256), ("block_count", 1), ("feed_forward_length", 512)]:
        w.add_uint32(f"llama.{key}", value)
    w.add_head_count(4)
    w.add_vocab_size(8)
    w.add_tensor("token_embd.weight", np.zeros((8, 84), dtype=np.uint8), raw_shape=(8, 84), raw_dtype=Q.Q2_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    msg = _load_error(p, CheckpointError)
    assert "Q2_K" in msg and "not supported" in msg


def test_gguf_unknown_architecture(tmp_path):
    from gguf import GGUFWriter

    p = tmp_path / "arch.gguf"
    w = GGUFWriter(str(p), "mamba")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "mamba" in _load_error(p, UnsupportedModelError)
