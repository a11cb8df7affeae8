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


def write_gguf_from_hf_dir(
    hf_dir: Path,
    out: Path,
    *,
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
    kquant: GGMLQuantizationType | None = None,
    arch: str = "llama",
    with_tokenizer: bool = True,
) -> Path:
    """Convert a tiny transformers checkpoint (safetensors) into a GGUF file with 2-D weights in `qtype`."""
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(f))
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    w = GGUFWriter(str(out), arch)
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
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(0)
    if with_tokenizer:
        _add_gpt2_tokenizer(w, hf_dir, cfg["vocab_size"])
    tie = cfg.get("tie_word_embeddings", False)
    for name, t in state.items():
        if tie and name == "lm_head.weight":
            continue
        a = t.float().numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            a = permute_rows(a, n_head)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            a = permute_rows(a, n_kv)
        if a.ndim == 2 and kquant is not None and a.shape[1] % 256 == 0:
            q = random_kquant_blocks(a.shape[0], a.shape[1], kquant, seed=len(name))
            w.add_tensor(gguf_name(name), q, raw_shape=q.shape, raw_dtype=kquant)
        elif a.ndim == 2 and qtype not in (GGMLQuantizationType.F32,):
            if qtype == GGMLQuantizationType.F16:
                w.add_tensor(gguf_name(name), a.astype(np.float16))
            else:
                q = quantize(a, qtype)
                w.add_tensor(gguf_name(name), q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


_KQUANT_LAYOUT = {  # block bytes, byte offsets of float16 scale fields inside a block
    GGMLQuantizationType.Q4_K: (144, (0, 2)),
    GGMLQuantizationType.Q5_K: (176, (0, 2)),
    GGMLQuantizationType.Q6_K: (210, (208,)),
}


def random_kquant_blocks(rows: int, cols: int, qtype: GGMLQuantizationType, *, seed: int = 0) -> np.ndarray:
    """Random but valid K-quant data (finite, small float16 scales); the gguf package cannot quantize K types."""
    size, scale_offsets = _KQUANT_LAYOUT[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // 256, size), dtype=np.uint8)
    for off in scale_offsets:
        d = rng.uniform(0.001, 0.01, size=blocks.shape[0]).astype(np.float16)
        blocks[:, off : off + 2] = d.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // 256 * size)


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
