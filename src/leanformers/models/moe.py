"""Sparse mixture-of-experts decoders: Mixtral (`mixtral`) and Qwen3-MoE (`qwen3_moe`).

Both are the Llama stack of models/llama.py (Mixtral: Mistral's attention, sliding window optional;
Qwen3-MoE: Qwen3's, with q/k norms) whose feed-forward is a sparse mixture of E gated-MLP experts:

    p = softmax(router(x))                    router: `mlp.gate`, a (E, hidden) linear, computed in float32
    w, e = top-k(p)                           k = num_experts_per_tok
    w = w / sum(w)                            Mixtral always; Qwen3-MoE when norm_topk_prob
    y = sum_j w_j * expert_{e_j}(x)           expert: down(silu(gate(x)) * up(x)), moe_intermediate_size wide

Qwen3-MoE layers listed in `mlp_only_layers` (or off the `decoder_sparse_step` grid) keep a dense MLP.

How the experts run, only the chosen ones read (SparseMoE):
- eagerly (prefill, decode, training): the tokens routed to each expert are gathered, the expert runs on
  them once, results are scattered back weighted; an expert no token chose is never touched. One-token
  decode therefore reads k experts' weights, not E.
- inside a compiled CPU decode step: one `torch.cond` per expert, taken when any row chose it. Static
  shapes, no graph break, and AOTInductor runs only the taken branches: again k experts' weights per
  token. Rows that did not choose an expert get weight 0 in its branch (each row is computed alone, so a
  batch gives each row what it would get alone).
- inside other compiled graphs (CUDA, where a data-dependent branch would stop CUDA graphs): every expert
  runs, weighted by the routing (w = 0 for the ones not chosen): correct, but reads all experts.

Names: transformers 5 calls the MoE block `mlp` in both (`mlp.gate`, `mlp.experts`); experts are per-expert
linears `mlp.experts.{e}.gate_proj/up_proj/down_proj` as Qwen3-MoE checkpoints store them. Mixtral
checkpoints say `block_sparse_moe.experts.{e}.w1/w3/w2` (gate/up/down) and `block_sparse_moe.gate`:
`from_hf_checkpoint` / `to_hf_checkpoint` rename them. Per-expert nn.Linear modules are what lets int8/int4
quantization (`quantizable_linears`: every expert linear, not the routers, whose top-k choice is sensitive),
GGUF Q4 exact mapping and fused gate/up work on experts like on any other linear. LoRA targets only the
attention projections (`adapter_target`): transformers keeps experts as 3-D tensors, onto which PEFT maps
the MLP projection names.
GGUF: llama.cpp's `qwen3moe` architecture, and `llama` files with `expert_count` (Mixtral), experts
stacked (`ffn_gate_exps`, ...; also the older per-expert `ffn_gate.{e}` tensors).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.gguf_meta import GGUFMetadata
from ..config import ModelConfig, check_int, short
from ..errors import ConfigError, UnsupportedModelError
from . import llama
from .llama import MLP, LlamaForCausalLM, fuse_mlp
from .ops import linear

# Mixtral's checkpoint names <-> this module tree's
_MIXTRAL_NAMES = ((".block_sparse_moe.", ".mlp."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."),
                  (".w2.", ".down_proj."))
MAX_EXPERTS = 4096


@dataclass
class MoEConfig(ModelConfig):
    """ModelConfig's keys plus the experts'. `num_local_experts` is Mixtral's key; Qwen3-MoE's `num_experts`
    is read into it."""

    model_types: ClassVar[tuple[str, ...]] = ("mixtral", "qwen3_moe")

    model_type: str = "mixtral"
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None  # an expert's width (Mixtral: intermediate_size)
    norm_topk_prob: bool = True  # renormalize the top-k weights (Mixtral: always)
    decoder_sparse_step: int = 1  # Qwen3-MoE: layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: list[int] = field(default_factory=list)  # ... and i is not listed here

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_local_experts", self.num_local_experts, MAX_EXPERTS)
        check_int("num_experts_per_tok", self.num_experts_per_tok, self.num_local_experts)
        check_int("decoder_sparse_step", self.decoder_sparse_step, self.num_hidden_layers)
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        check_int("moe_intermediate_size", self.moe_intermediate_size, 1 << 20)
        if type(self.norm_topk_prob) is not bool:
            raise ConfigError(f"config field 'norm_topk_prob' must be true or false, got {short(self.norm_topk_prob)}")
        if self.model_type == "mixtral" and not self.norm_topk_prob:
            raise ConfigError("Mixtral always renormalizes its top-k router weights (norm_topk_prob must be true)")
        if not isinstance(self.mlp_only_layers, list) or not all(
                type(i) is int and 0 <= i < self.num_hidden_layers for i in self.mlp_only_layers):
            raise ConfigError(f"config field 'mlp_only_layers' must list layer indices in [0, {self.num_hidden_layers})"
                              f", got {short(self.mlp_only_layers)}")

    def is_sparse(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has experts (else a dense MLP of intermediate_size)."""
        return layer_idx not in self.mlp_only_layers and (layer_idx + 1) % self.decoder_sparse_step == 0


class SparseMoE(nn.Module):
    """The experts of one layer and their router (see the module docstring for how they run)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.normalize = config.norm_topk_prob
        # Mixtral weighs expert outputs with the float32 router weights, Qwen3-MoE with them cast to x.dtype
        self.float_weights = config.model_type == "mixtral"
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config, config.moe_intermediate_size) for _ in range(config.num_local_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router weights (N, k) and expert indices (N, k) of tokens x (N, hidden)."""
        probs = torch.softmax(linear(self.gate, x).float(), dim=-1)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights if self.float_weights else weights.to(x.dtype)), index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, hidden)
        weights, index = self.route(x)
        if not torch.compiler.is_compiling():
            out = self._dispatch(x, weights, index)
        elif x.device.type == "cpu":
            out = self._branches(x, weights, index)
        else:
            out = self._dense(x, weights, index)
        return out.view(shape)

    def _weigh(self, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (y * w).to(y.dtype)

    def _dispatch(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Eager: each chosen expert once, on the tokens that chose it."""
        out = torch.zeros_like(x)
        for e in sorted(set(index.flatten().tolist())):
            rows, slot = torch.where(index == e)
            y = self._weigh(self.experts[e](x[rows]), weights[rows, slot, None])
            out.index_add_(0, rows, y)
        return out

    def _branches(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Compiled CPU: a torch.cond per expert, run only when some row chose it."""
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            chosen = index == e  # (N, k)
            w = (weights * chosen).sum(-1, keepdim=True)  # (N, 1): the expert's weight per row, 0 if not chosen

            def run(x: torch.Tensor, w: torch.Tensor, expert: nn.Module = expert) -> torch.Tensor:
                return self._weigh(expert(x), w).reshape(-1)  # flat: both branches' outputs alike contiguous

            def skip(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return torch.zeros_like(x).reshape(-1)

            out = out + torch.cond(chosen.any(), run, skip, (x, w)).view(x.shape)
        return out

    def _dense(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Other compiled graphs: every expert, weighted by the routing (0 where not chosen)."""
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + self._weigh(expert(x), (weights * (index == e)).sum(-1, keepdim=True))
        return out


class MoEForCausalLM(LlamaForCausalLM):
    """Mixtral / Qwen3-MoE: the Llama stack with SparseMoE feed-forwards (`model.layers.0.mlp.experts.3.up_proj`)."""

    def __init__(self, config: MoEConfig):
        super().__init__(config, make_mlp=lambda i: SparseMoE(config) if config.is_sparse(i) else MLP(config))

    def quantizable_linears(self) -> Iterator[tuple[str, nn.Module]]:
        """Every linear but the head and the routers: experts are quantized one by one, so a quantized
        decode step still reads only the chosen experts; a router stays float (its top-k choice flips on
        small errors, and it is E x hidden, tiny)."""
        for name, mod in super().quantizable_linears():
            if not name.endswith(".mlp.gate"):
                yield name, mod

    def adapter_target(self, name: str) -> bool:
        """Attention projections only: transformers keeps experts as 3-D tensors, and PEFT maps the MLP
        names of these model types (gate_proj, up_proj, down_proj) onto those expert tensors, so an
        adapter on a dense layer's MLP (Qwen3-MoE mlp_only_layers) would not load there the same."""
        return ".self_attn." in name

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """q/k/v of every layer, and gate/up of every expert (and of dense MLPs)."""
        before = self.structure_version
        super().fuse_projections()
        changed = False
        for layer in self.model.layers:
            if isinstance(layer.mlp, SparseMoE):
                for expert in layer.mlp.experts:
                    changed |= fuse_mlp(expert)
        if changed and self.structure_version == before:
            self.structure_version += 1


# ---------------------------------------------------------------------------------------- the family's hooks
def build(config: MoEConfig) -> MoEForCausalLM:
    return MoEForCausalLM(config)


def config_from_dict(data: dict[str, Any], source: str) -> MoEConfig:
    data = dict(data)
    model_type = data.get("model_type")
    if model_type == "qwen3_moe":
        if "num_local_experts" not in data and "num_experts" in data:  # the Hub's key; transformers 5 writes both
            data["num_local_experts"] = data["num_experts"]
        data.setdefault("num_local_experts", 128)  # transformers' Qwen3MoeConfig defaults
        data.setdefault("num_experts_per_tok", 8)
        data.setdefault("moe_intermediate_size", 768)
        data.setdefault("norm_topk_prob", False)
        if data.get("use_sliding_window") is not True:  # Qwen3-MoE: the window applies only when switched on
            data["sliding_window"] = None
        elif type(data.get("sliding_window")) is not int:
            raise ConfigError(f"{source}: use_sliding_window is true but sliding_window is "
                              f"{short(data.get('sliding_window'))}")
        data.pop("layer_types", None)
    elif model_type == "mixtral":
        data["norm_topk_prob"] = data.get("norm_topk_prob", True)
    for key in ("mlp_only_layers",):
        if data.get(key) is None:
            data.pop(key, None)
    return MoEConfig.from_dict(data, source=source)


_LAYER = re.compile(r"^model\.layers\.(\d{1,9})\.")


def layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def expected_shapes(c: MoEConfig) -> dict[str, tuple[int, ...]]:
    shapes = llama.expected_shapes(c)
    shapes.pop("model.layers.0.mlp.gate_proj.weight", None)
    sparse = next((i for i in range(c.num_hidden_layers) if c.is_sparse(i)), None)
    if sparse is not None:
        shapes[f"model.layers.{sparse}.mlp.gate.weight"] = (c.num_local_experts, c.hidden_size)
        shapes[f"model.layers.{sparse}.mlp.experts.0.gate_proj.weight"] = (c.moe_intermediate_size, c.hidden_size)
    return shapes


class _Renamed(dict):
    """Tensors under the model's names, keeping the reader's `origin` / `files` for error messages."""

    origin: Any = None
    files: dict[str, Any]


def from_hf_checkpoint(tensors: Mapping[str, Any], config: MoEConfig) -> Mapping[str, Any]:
    """Mixtral's checkpoint names (block_sparse_moe, w1/w3/w2) as this module tree's; Qwen3-MoE's as they are."""
    if config.model_type != "mixtral":
        return tensors
    out = _Renamed()
    out.origin = getattr(tensors, "origin", None)
    files = getattr(tensors, "files", None) or {}
    out.files = {}
    for name, t in tensors.items():
        new = name
        if ".block_sparse_moe." in name:
            for old, ours in _MIXTRAL_NAMES:
                new = new.replace(old, ours)
        out[new] = t
        if name in files:
            out.files[new] = files[name]
    return out


def to_hf_checkpoint(state: dict[str, torch.Tensor], config: MoEConfig) -> dict[str, torch.Tensor]:
    if config.model_type != "mixtral":
        return state
    out = {}
    for name, t in state.items():
        if ".mlp." in name:
            for old, ours in _MIXTRAL_NAMES:
                name = name.replace(ours, old)
        out[name] = t
    return out


GGUF_EXPERT_NAMES = {  # stacked (E, out, in) -> one tensor per expert
    "ffn_gate_exps.weight": "mlp.experts.{expert}.gate_proj.weight",
    "ffn_up_exps.weight": "mlp.experts.{expert}.up_proj.weight",
    "ffn_down_exps.weight": "mlp.experts.{expert}.down_proj.weight",
}
_GGUF_SPLIT_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")  # older Mixtral files
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_tensor_name(name: str) -> str | None:
    """llama.cpp's names for Mixtral (`llama` with experts) and Qwen3-MoE (`qwen3moe`)."""
    m = _GGUF_SPLIT_EXPERT.match(name)
    if m:
        return f"model.layers.{m.group(1)}.mlp.experts.{m.group(3)}.{m.group(2)}_proj.weight"
    m = _GGUF_BLOCK.match(name)
    if m and m.group(2) == "ffn_gate_inp.weight":
        return f"model.layers.{m.group(1)}.mlp.gate.weight"
    if m and m.group(2) in GGUF_EXPERT_NAMES:
        return f"model.layers.{m.group(1)}.{GGUF_EXPERT_NAMES[m.group(2)]}"
    if m and m.group(2).startswith(("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp", "ffn_gate_inp_shexp")):
        raise UnsupportedModelError(f"shared experts ({name}, Qwen2-MoE style) are not supported")
    return llama.gguf_tensor_name(name)


def gguf_unpermute_heads(hf_name: str, config: MoEConfig, arch: str) -> int | None:
    return llama.gguf_unpermute_heads(hf_name, config, arch)  # `llama` (Mixtral) files are permuted, qwen3moe not


def config_from_gguf(meta: GGUFMetadata, tensor_names: list[str]) -> MoEConfig:
    """Mixtral from a `llama` file with `llama.expert_count`; Qwen3-MoE from `qwen3moe`."""
    base = llama.config_from_gguf_dict(meta, tensor_names)
    get, source = meta.get, meta.source
    gating = get("expert_gating_func", int)
    if gating not in (None, 1):  # llama.cpp: 1 = softmax, 2 = sigmoid
        raise meta.unsupported(f"expert_gating_func {gating} (only softmax routing)")
    if get("expert_shared_count", int) or get("expert_shared_feed_forward_length", int):
        raise meta.unsupported("shared experts")
    qwen = meta.arch == "qwen3moe"
    base.update({
        "model_type": "qwen3_moe" if qwen else "mixtral",
        "num_local_experts": get("expert_count", int, required=True),
        "num_experts_per_tok": get("expert_used_count", int, required=True),
        "moe_intermediate_size": get("expert_feed_forward_length", int) or base["intermediate_size"],
        # llama.cpp renormalizes the top-k weights of both (qwen3moe hard-codes it)
        "norm_topk_prob": get("expert_weights_norm", bool, True),
    })
    if qwen:
        base["sliding_window"] = None
    # llama.cpp's files say nothing of dense layers; a layer without a router has a dense MLP
    dense = [i for i in range(base["num_hidden_layers"]) if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names]
    if dense:
        base["mlp_only_layers"] = dense
    return MoEConfig.from_dict(base, source=source)


def hf_config_dict(config: MoEConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for an exported model: transformers' MixtralConfig / Qwen3MoeConfig keys."""
    skip = {"torch_dtype", "architectures", "rope_theta", "rope_scaling", "layer_types", "mlp_bias", "hidden_act"}
    out = {k: v for k, v in dataclasses.asdict(config).items()
           if k not in skip and k in {f.name for f in dataclasses.fields(config) if f.repr}}
    out.update(rope_theta=config.rope_theta, rope_scaling=config.rope_scaling, hidden_act=config.hidden_act,
               torch_dtype=str(dtype).removeprefix("torch."), attention_dropout=0.0)
    if config.model_type == "mixtral":
        out["architectures"] = ["MixtralForCausalLM"]
        for key in ("moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
                    "attention_bias"):
            out.pop(key)
    else:
        out["architectures"] = ["Qwen3MoeForCausalLM"]
        out["num_experts"] = out.pop("num_local_experts")
        out["use_sliding_window"] = config.sliding_window is not None
    return out


def describe(config: MoEConfig) -> dict[str, str]:
    c = config
    sparse = sum(c.is_sparse(i) for i in range(c.num_hidden_layers))
    layers = f"{c.num_hidden_layers}, hidden {c.hidden_size}"
    if sparse < c.num_hidden_layers:
        layers += f", {c.num_hidden_layers - sparse} dense (intermediate {c.intermediate_size})"
    norm = ", top-k weights renormalized" if c.norm_topk_prob else ""
    return {**llama.describe(c), "layers": layers,
            "experts": f"{c.num_local_experts} per layer in {sparse} layers, {c.num_experts_per_tok} chosen per "
                       f"token (softmax router{norm}), expert intermediate {c.moe_intermediate_size}"}
