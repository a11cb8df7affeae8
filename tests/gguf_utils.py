"""Write small GGUF files from Hugging Face-style state dicts, as llama.cpp's converter lays them out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    if hf in _NAMES:
        return _NAMES[hf]
    parts = hf.split(".")
    return f"blk.{parts[2]}.{_LAYER['.'.join(parts[3:])]}"


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (the inverse of what leanformers undoes)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# llama.cpp's converter writes HF model_type -> GGUF architecture: Mistral is written as `llama` (llama.cpp
# has no `mistral` architecture; Mistral GGUFs on the Hub say `llama`), Qwen2 as `qwen2`.
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# Architectures whose q/k rows llama.cpp permutes (its "normal" rope layout); qwen2 uses the NEOX layout
# and is stored as HF has it. `mistral` is leanformers' own name for a Mistral file (see test_loading).
PERMUTED_ARCHS = ("llama", "mistral")
# GGML block length of each quantized type: a row that is not a multiple of it is stored as F16 instead,
# as llama.cpp's quantizer does for such tensors.
_BLOCK = {GGMLQuantizationType.Q8_0: 32, GGMLQuantizationType.Q4_0: 32, GGMLQuantizationType.Q4_1: 32}


def write_gguf_from_hf_dir(
    hf_dir: Path,
    out: Path,
    *,
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
    kquant: GGMLQuantizationType | None = None,
    arch: str | None = None,
    name: str | None = None,
    with_tokenizer: bool = True,
) -> Path:
    """Convert a tiny transformers checkpoint (safetensors) into a GGUF file with 2-D weights in `qtype`.

    arch: the GGUF architecture (default: what llama.cpp writes for the config's model_type, GGUF_ARCH);
    name: general.name (transformers reads a `llama` file named exactly "mistral" as a Mistral model).
    """
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = arch or GGUF_ARCH[cfg["model_type"]]
    state: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(f))
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    w = GGUFWriter(str(out), arch)
    if name is not None:
        w.add_name(name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if arch == "mistral" and cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(0)
    if with_tokenizer:
        _add_gpt2_tokenizer(w, hf_dir, cfg["vocab_size"])
    tie = cfg.get("tie_word_embeddings", False)
    for hf_name, t in state.items():
        if tie and hf_name == "lm_head.weight":
            continue
        a = t.float().numpy()
        if arch in PERMUTED_ARCHS and ("q_proj." in hf_name or "k_proj." in hf_name):
            a = permute_rows(a, n_head if "q_proj." in hf_name else n_kv)
        if a.ndim == 2 and kquant is not None and a.shape[1] % 256 == 0:
            q, _ = kquant_blocks(a.shape[0], a.shape[1], kquant, seed=len(hf_name))
            w.add_tensor(gguf_name(hf_name), q, raw_shape=q.shape, raw_dtype=kquant)
        elif a.ndim == 2 and qtype == GGMLQuantizationType.F16 or (
            a.ndim == 2 and qtype in _BLOCK and a.shape[1] % _BLOCK[qtype]
        ):
            w.add_tensor(gguf_name(hf_name), a.astype(np.float16))
        elif a.ndim == 2 and qtype != GGMLQuantizationType.F32:
            q = quantize(a, qtype)
            w.add_tensor(gguf_name(hf_name), q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(hf_name), a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# ------------------------------------------------------------------------------------------ K-quants
# Encoders written from ggml's block layouts (ggml-common.h block_q4_K / block_q5_K / block_q6_K and the
# bit packing of ggml-quants.c), independent of the gguf package: the tests build blocks from chosen
# integer codes and scales and know every value they must dequantize to. Super-blocks of 256 weights.
QK_K = 256


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float16).reshape(-1, 1).view(np.uint8)


def _pack_scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit mins per block -> the 12-byte `scales` field of Q4_K/Q5_K."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)  # low 6 bits: scales 0-3; top 2: scales 4-7 bits 4-5
    out[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)  # low nibbles of scales/mins 4-7
    return out


def encode_q4_k(d, dmin, sc, m, q) -> np.ndarray:
    """Blocks (n, 144): value[32*j + l] = d * sc[j] * q[32*j + l] - dmin * m[j]; sc, m in 0..63, q in 0..15."""
    n = q.shape[0]
    qs = np.zeros((n, 128), dtype=np.uint8)
    for pair in range(4):  # sub-blocks 2*pair (low nibbles) and 2*pair + 1 (high nibbles) share 32 bytes
        lo, hi = q[:, 64 * pair : 64 * pair + 32], q[:, 64 * pair + 32 : 64 * pair + 64]
        qs[:, 32 * pair : 32 * pair + 32] = lo | (hi << 4)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_k4(sc, m), qs], axis=1)


def encode_q5_k(d, dmin, sc, m, q) -> np.ndarray:
    """Blocks (n, 176): as Q4_K with q in 0..31; the fifth bits of sub-block j live in bit j of qh[l]."""
    n = q.shape[0]
    qh = np.zeros((n, 32), dtype=np.uint8)
    qs = np.zeros((n, 128), dtype=np.uint8)
    for pair in range(4):
        lo, hi = q[:, 64 * pair : 64 * pair + 32], q[:, 64 * pair + 32 : 64 * pair + 64]
        qs[:, 32 * pair : 32 * pair + 32] = (lo & 0xF) | ((hi & 0xF) << 4)
        qh |= ((lo >> 4) << (2 * pair)) | ((hi >> 4) << (2 * pair + 1))
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_k4(sc, m), qh, qs], axis=1)


def encode_q6_k(d, sc, q) -> np.ndarray:
    """Blocks (n, 210): value[i] = d * sc[i // 16] * (q[i] - 32); sc int8, q in 0..63."""
    n = q.shape[0]
    ql = np.zeros((n, 128), dtype=np.uint8)
    qh = np.zeros((n, 64), dtype=np.uint8)
    for half in range(2):  # 128 weights: four runs of 32 share 64 bytes of low nibbles and 32 of high bits
        r = [q[:, 128 * half + 32 * k : 128 * half + 32 * k + 32] for k in range(4)]
        ql[:, 64 * half : 64 * half + 32] = (r[0] & 0xF) | ((r[2] & 0xF) << 4)
        ql[:, 64 * half + 32 : 64 * half + 64] = (r[1] & 0xF) | ((r[3] & 0xF) << 4)
        qh[:, 32 * half : 32 * half + 32] = (r[0] >> 4) | ((r[1] >> 4) << 2) | ((r[2] >> 4) << 4) | ((r[3] >> 4) << 6)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=1)


KQUANT_BLOCK_BYTES = {GGMLQuantizationType.Q4_K: 144, GGMLQuantizationType.Q5_K: 176, GGMLQuantizationType.Q6_K: 210}


def kquant_blocks(rows: int, cols: int, qtype: GGMLQuantizationType, *, seed: int = 0,
                  dyadic: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Random K-quant data and the float64 values it encodes: (raw uint8 (rows, cols/256*bytes), values).

    dyadic: super-block scales are powers of two, so every value is exact in float32 too."""
    rng = np.random.default_rng(seed)
    n = rows * cols // QK_K

    def scale(lo: int, hi: int) -> np.ndarray:
        if dyadic:
            return np.float16(2.0) ** -rng.integers(lo, hi, size=n).astype(np.float16)
        return rng.uniform(2.0**-hi, 2.0**-lo, size=n).astype(np.float16)

    u8 = lambda top, shape: rng.integers(0, top, size=shape, dtype=np.uint8)  # noqa: E731
    if qtype == GGMLQuantizationType.Q6_K:
        d, sc, q = scale(10, 14), rng.integers(-128, 128, size=(n, 16)), u8(64, (n, QK_K))
        raw = encode_q6_k(d, sc, q)
        values = d.astype(np.float64)[:, None] * np.repeat(sc, 16, axis=1) * (q.astype(np.float64) - 32)
    else:
        top = 16 if qtype == GGMLQuantizationType.Q4_K else 32
        d, dmin, sc, m, q = scale(8, 12), scale(8, 12), u8(64, (n, 8)), u8(64, (n, 8)), u8(top, (n, QK_K))
        raw = (encode_q4_k if top == 16 else encode_q5_k)(d, dmin, sc, m, q)
        values = (d.astype(np.float64)[:, None] * np.repeat(sc, 32, axis=1) * q
                  - dmin.astype(np.float64)[:, None] * np.repeat(m, 32, axis=1))
    assert raw.shape == (n, KQUANT_BLOCK_BYTES[qtype])
    return raw.reshape(rows, -1), values.reshape(rows, cols)


def _add_gpt2_tokenizer(w: GGUFWriter, hf_dir: Path, vocab_size: int) -> None:
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [f"<unused{i}>" for i in range(vocab_size)]
    types = [1] * vocab_size
    for piece, i in vocab.items():
        if i < vocab_size:
            tokens[i] = piece
    for added in tok.get("added_tokens", []):
        types[added["id"]] = 3
    merges = tok["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
