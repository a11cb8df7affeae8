"""Write the tiny Qwen3, Phi-3, GPT-2, Mixtral and Qwen3-MoE checkpoints as GGUF, as llama.cpp's converter
(convert_hf_to_gguf.py) lays them out: its tensor names (gguf-py's tensor_mapping), metadata keys, the
q/k row permutation of `llama`-architecture files (Mixtral), GPT-2's Conv1D weights transposed, experts
stacked into one (E, out, in) tensor per projection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from gguf_utils import _add_gpt2_tokenizer, permute_rows

# HF model_type -> the GGUF architecture llama.cpp writes
ARCH = {"qwen3": "qwen3", "phi3": "phi3", "gpt2": "gpt2", "mixtral": "llama", "qwen3_moe": "qwen3moe"}

_LLAMA_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.gate_up_proj.weight": "ffn_up.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight", "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
}
_LLAMA_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
_GPT2_LAYER = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
_GPT2_GLOBAL = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
                "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}
# expert projection (Qwen3-MoE name, Mixtral name) -> the stacked GGUF tensor
_EXPERTS = {("gate_proj", "w1"): "ffn_gate_exps.weight", ("up_proj", "w3"): "ffn_up_exps.weight",
            ("down_proj", "w2"): "ffn_down_exps.weight"}


def _tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(f))
    return {k: v.float().numpy() for k, v in state.items()}


def _gguf_names(cfg: dict, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GGUF name -> array (HF orientation, experts stacked), as llama.cpp's converter writes them."""
    mt = cfg["model_type"]
    out: dict[str, np.ndarray] = {}
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for name, a in state.items():
        if mt == "gpt2":
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            if name in _GPT2_GLOBAL:
                out[_GPT2_GLOBAL[name]] = a
                continue
            if name == "lm_head.weight":
                out["output.weight"] = a
                continue
            parts = name.split(".")  # transformer.h.N.<module>.<weight|bias>
            module, kind = ".".join(parts[3:-1]), parts[-1]
            if kind == "weight" and module in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                a = a.T  # Conv1D (in, out) -> (out, in)
            out[f"blk.{parts[2]}.{_GPT2_LAYER[module]}.{kind}"] = np.ascontiguousarray(a)
            continue
        if name in _LLAMA_GLOBAL:
            out[_LLAMA_GLOBAL[name]] = a
            continue
        parts = name.split(".")  # model.layers.N.<rest>
        layer, rest = int(parts[2]), ".".join(parts[3:])
        if ".experts." in rest:  # ...experts.E.<proj>.weight
            e, proj = int(parts[-3]), parts[-2]
            key = next(v for k, v in _EXPERTS.items() if proj in k)
            experts.setdefault((layer, key), {})[e] = a
            continue
        if mt == "mixtral" and ("q_proj." in rest or "k_proj." in rest):
            n_head = cfg["num_attention_heads"] if "q_proj." in rest else cfg["num_key_value_heads"]
            a = permute_rows(a, n_head)
        out[f"blk.{layer}.{_LLAMA_LAYER[rest]}"] = a
    for (layer, key), parts in experts.items():
        out[f"blk.{layer}.{key}"] = np.stack([parts[e] for e in sorted(parts)])
    return out


def write_family_gguf(hf_dir: Path, out: Path, *, qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
                      with_tokenizer: bool = True) -> Path:
    """A GGUF file of a tiny transformers checkpoint; matrices (and expert stacks) in `qtype` where their rows
    are a multiple of the block, F32 otherwise."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    mt = cfg["model_type"]
    arch = ARCH[mt]
    w = GGUFWriter(str(out), arch)
    if mt == "gpt2":
        w.add_block_count(cfg["n_layer"])
        w.add_context_length(cfg["n_positions"])
        w.add_embedding_length(cfg["n_embd"])
        w.add_feed_forward_length(cfg.get("n_inner") or 4 * cfg["n_embd"])
        w.add_head_count(cfg["n_head"])
        w.add_layer_norm_eps(cfg["layer_norm_epsilon"])
    else:
        n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
        rope = cfg.get("rope_parameters") or {}
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_embedding_length(cfg["hidden_size"])
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_block_count(cfg["num_hidden_layers"])
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        if mt == "phi3":
            rot = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
            w.add_rope_dimension_count(int(rot * cfg["hidden_size"]) // n_head)
            w.add_rope_scaling_orig_ctx_len(cfg["original_max_position_embeddings"])
            w.add_sliding_window(cfg.get("sliding_window") or 0)
        else:
            w.add_rope_dimension_count(head_dim)
            if "head_dim" in cfg:
                w.add_key_length(head_dim)
                w.add_value_length(head_dim)
        if mt in ("mixtral", "qwen3_moe"):
            w.add_expert_count(cfg.get("num_local_experts") or cfg["num_experts"])
            w.add_expert_used_count(cfg["num_experts_per_tok"])
        if mt == "qwen3_moe":
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(0)
    if with_tokenizer:
        _add_gpt2_tokenizer(w, hf_dir, cfg["vocab_size"])
    tie = cfg.get("tie_word_embeddings", mt == "gpt2")
    for name, a in _gguf_names(cfg, _tensors(hf_dir)).items():
        if tie and name == "output.weight":
            continue
        a = a.astype(np.float32)
        if a.ndim >= 2 and qtype != GGMLQuantizationType.F32 and a.shape[-1] % 32 == 0:
            q = quantize(a, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
