"""LoRA over nn.Linear and over leanformers' quantized linears (QLoRA), in PEFT's format.

    y = base(x) + (dropout(x) @ A.T @ B.T) * (lora_alpha / r)       A: (r, in), B: (out, r), B = 0 at start

`apply_lora` swaps each target module for a `LoraLinear` that keeps the original as `base_layer`, so the
state-dict names are PEFT's (`...q_proj.lora_A.weight`); adapters are saved as `adapter_config.json` +
`adapter_model.safetensors` with PEFT's keys (`base_model.model.<module>.lora_A.weight`), which
`peft.PeftModel.from_pretrained` loads over transformers' model. Targets are matched like PEFT: a module
whose full name equals a target or ends with "." + target; "all-linear" means every linear except the
output layer (lm_head). Fused projections (qkv_proj, gate_up_proj) are never targets: training runs on
the unfused modules, and `fuse_projections()` leaves LoRA-wrapped modules alone.

Quantized bases (Int8Linear, Int4Linear) are frozen: `_FrozenQuantLinear` runs their kernel forward and, in
backward, multiplies the output gradient with the dequantized weight, rebuilt per call and dropped again,
so no float copy of a weight is kept between forward and backward.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import CheckpointError, InvalidArgumentError
from ..quantize import Int4Linear, Int8Linear

try:  # quantize.py on this branch; the quantize/ package (kernels.py) after the redesign
    from ..quantize import _int4_mm
except ImportError:  # pragma: no cover
    from ..quantize.kernels import _int4_mm

LINEAR_TYPES = (nn.Linear, Int8Linear, Int4Linear)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class _FrozenQuantLinear(torch.autograd.Function):
    """y = module(x) for a frozen quantized linear; dx = dy @ W with W dequantized only inside backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module) -> torch.Tensor:  # type: ignore[override]
        ctx.module, ctx.x_dtype = module, x.dtype
        return module(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        w = dense_weight(ctx.module, grad.dtype)
        return (grad @ w).to(ctx.x_dtype), None


def dense_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight a (quantized) linear multiplies with, in `dtype`."""
    if isinstance(module, Int8Linear):
        return module.weight.to(dtype) * module.weight_scale.to(dtype).unsqueeze(-1)
    if isinstance(module, Int4Linear):
        if module.backend == "dequant":
            return module._dequant(dtype)
        # the packed layout is the kernel's own: read W.T back through the kernel (x = identity), in the
        # kernel's fast activation dtype
        eye = torch.eye(module.in_features, dtype=module.dtype, device=module.weight_packed.device)
        wt = _int4_mm(module.backend, eye, module.weight_packed, module.group_size, module.scales_zeros)
        return wt[:, : module.out_features].T.to(dtype)
    return module.weight.to(dtype)


class LoraLinear(nn.Module):
    """A frozen linear (`base_layer`) plus a trainable low-rank update (`lora_A`, `lora_B`)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, *,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.lora_alpha, self.scaling = r, alpha, alpha / r
        device = next(t for t in [*base.parameters(), *base.buffers()]).device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.quantized = not isinstance(base, nn.Linear)
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's default: A ~ kaiming-uniform(a=sqrt(5)) (nn.Linear's init), B = 0, so training starts at the base."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized and torch.is_grad_enabled() and x.requires_grad:
            out = _FrozenQuantLinear.apply(x, self.base_layer)
        else:
            out = self.base_layer(x)
        a = self.lora_A.weight
        if x.dtype != a.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)  # under autocast the matmul casts (and keeps) one copy; no extra one here
        h = self.lora_A(self.lora_dropout(x))  # (..., r)
        if h.dtype == out.dtype:  # out + scaling * (h @ B.T) as one addmm: no separate scale and add passes
            y = torch.addmm(out.reshape(-1, self.out_features), h.reshape(-1, self.r), self.lora_B.weight.t(),
                            alpha=self.scaling)  # (autocast casts B like any matmul operand)
            return y.view(out.shape)
        return out + (self.lora_B(h) * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A (out, in), float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, quantized_base={self.quantized}"


# ------------------------------------------------------------------------------------ targets
def linear_names(model: nn.Module) -> dict[str, nn.Module]:
    """Every LoRA-able linear module by full name (the output layer included), unfused ones only."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES) and not isinstance(m, LoraLinear)
            and not _inside_lora(n)}


def _inside_lora(name: str) -> bool:
    return ".base_layer" in name or ".lora_A" in name or ".lora_B" in name


def _output_layer_names(model: nn.Module) -> set[str]:
    """The output head (the contract's `output_head`; encoders' heads are named by their family)."""
    name = getattr(model, "output_head", None)
    return {name} if isinstance(name, str) else set()


def resolve_targets(model: nn.Module, target_modules: str | Iterable[str]) -> tuple[list[str], list[str]]:
    """(full module names to wrap, the short names for adapter_config.json); errors list what exists."""
    names = linear_names(model)
    short_available = sorted({n.rsplit(".", 1)[-1] for n in names})
    if isinstance(target_modules, str):
        targets = ["all-linear"] if target_modules == "all-linear" else [t for t in target_modules.split(",") if t]
    else:
        targets = list(target_modules)
    if not targets:
        raise InvalidArgumentError(f"target_modules is empty; available: all-linear, {', '.join(short_available)}")
    fused = [n for n, m in model.named_modules() if n.endswith(("qkv_proj", "gate_up_proj")) and m is not None
             and isinstance(m, LINEAR_TYPES)]
    if fused:
        raise InvalidArgumentError("the model's projections are fused (e.g. "
                                   f"{fused[0]}); apply LoRA before fuse_projections()/compile()")
    if targets == ["all-linear"]:
        heads = _output_layer_names(model)
        chosen = [n for n in names if n not in heads]
    else:
        chosen = []
        for t in targets:
            if not isinstance(t, str) or t == "all-linear":
                raise InvalidArgumentError(f"target_modules: 'all-linear' cannot be combined with names, got {targets}")
            hits = [n for n in names if n == t or n.endswith("." + t)]
            if not hits:
                raise InvalidArgumentError(f"target_modules: no linear module named {t!r}; available: "
                                           f"all-linear, {', '.join(short_available)}")
            chosen += [h for h in hits if h not in chosen]
    short = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    return chosen, short


def check_lora_args(r: Any, alpha: Any, dropout: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise InvalidArgumentError(f"lora_r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or not math.isfinite(alpha):
        raise InvalidArgumentError(f"lora_alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise InvalidArgumentError(f"lora_dropout must be in [0, 1), got {dropout!r}")


def apply_lora(model: nn.Module, *, r: int = 16, alpha: float = 32, dropout: float = 0.0,
               target_modules: str | Iterable[str] = "all-linear", dtype: torch.dtype = torch.float32) -> list[str]:
    """Wrap the target linears in LoraLinear, in place; freeze everything else. Returns the short names."""
    check_lora_args(r, alpha, dropout)
    chosen, short = resolve_targets(model, target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        _replace(model, name, LoraLinear(model.get_submodule(name), r, alpha, dropout, dtype=dtype))
    return short


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Swap a submodule; through the model contract's replace_module where the model has it (so compiled
    steps of the old structure know they are stale)."""
    if hasattr(model, "replace_module"):
        model.replace_module(name, module)
        return
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


# ------------------------------------------------------------------------------------ PEFT files
def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT key names -> LoRA weights (contiguous copies)."""
    out = {}
    for name, mod in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = mod.lora_A.weight.detach().contiguous().clone()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = mod.lora_B.weight.detach().contiguous().clone()
    return out


def save_adapter(model: nn.Module, directory: str | Path, *, base_model: str, r: int, alpha: float,
                 dropout: float, target_modules: list[str]) -> None:
    """adapter_config.json + adapter_model.safetensors in PEFT's format."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(target_modules),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(adapter_state(model), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """adapter_config.json, checked for what leanformers can apply."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{Path(directory)}: no {ADAPTER_CONFIG} (not a LoRA adapter directory)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for key in ("use_dora", "use_rslora"):
        if cfg.get(key):
            raise CheckpointError(f"{path}: {key}=true is not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise CheckpointError(f"{path}: adapters with trained biases or modules_to_save are not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise CheckpointError(f"{path}: per-module rank_pattern/alpha_pattern is not supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise CheckpointError(f"{path}: missing {key!r}")
    return cfg


def load_adapter(model: nn.Module, directory: str | Path) -> dict[str, Any]:
    """Apply a PEFT LoRA adapter directory to `model` in place (weights in the adapter's dtype); returns its config."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise CheckpointError(f"{directory}: adapter_model.bin (pickle) is not loaded; convert it to safetensors")
        raise CheckpointError(f"{directory}: {ADAPTER_WEIGHTS} is missing")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: cannot read: {exc}") from None
    targets = cfg["target_modules"]
    try:
        apply_lora(model, r=int(cfg["r"]), alpha=cfg["lora_alpha"], dropout=0.0, target_modules=targets)
    except InvalidArgumentError as exc:
        raise CheckpointError(f"{directory / ADAPTER_CONFIG}: {exc}") from None
    expected = adapter_state(model)
    names = {_strip_adapter_name(k): v for k, v in state.items()}
    missing = [k for k in expected if k not in names]
    extra = [k for k in names if k not in expected]
    if missing or extra:
        raise CheckpointError(f"{weights}: adapter keys do not match the model ({len(missing)} missing, e.g. "
                              f"{missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]})")
    with torch.no_grad():
        for name, mod in lora_modules(model).items():
            for part in ("lora_A", "lora_B"):
                t = names[f"{PEFT_PREFIX}{name}.{part}.weight"]
                layer = getattr(mod, part)
                if t.shape != layer.weight.shape:
                    raise CheckpointError(f"{weights}: {name}.{part} has shape {list(t.shape)}, "
                                          f"expected {list(layer.weight.shape)}")
                layer.weight = nn.Parameter(t.to(layer.weight.device), requires_grad=False)
    return cfg


def _strip_adapter_name(key: str) -> str:
    """PEFT writes keys without the adapter name; tolerate `.lora_A.default.weight` too."""
    return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


# ------------------------------------------------------------------------------------ merge
@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight (W += scaling * B @ A) and unwrap; returns the count."""
    mods = lora_modules(model)
    if not mods:
        raise InvalidArgumentError("merge_adapter: the model has no LoRA adapter")
    for name, mod in mods.items():
        if mod.quantized:
            raise InvalidArgumentError(f"merge_adapter: {name} has a quantized base ({type(mod.base_layer).__name__}); "
                                       "load the base without quantize= to merge, then quantize")
    for name, mod in mods.items():
        base = mod.base_layer
        w = base.weight
        merged = (w.float() + mod.delta_weight().to(w.device)).to(w.dtype)
        base.weight = nn.Parameter(merged, requires_grad=w.requires_grad)
        _replace(model, name, base)
    return len(mods)


def unwrap_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with HF names (LoRA parts dropped, `.base_layer` removed)."""
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_A." in k or ".lora_B." in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out


def adapter_base(reference: Any) -> tuple[Any, str | None]:
    """(base reference, adapter dir) for `load(reference)`: a PEFT adapter directory (adapter_config.json,
    no config.json) loads the base its config names, with the adapter on top; anything else is unchanged."""
    try:
        path = Path(reference).expanduser()
    except TypeError:
        return reference, None
    if not (path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()):
        return reference, None
    base = read_adapter_config(path).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: no base_model_name_or_path; pass the base model and "
                              f"adapter={str(path)!r}")
    return base, str(path)
