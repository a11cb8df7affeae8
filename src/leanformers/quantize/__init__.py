"""Weight-only quantization as a module swap: nn.Linear -> Int8Linear / Int4Linear, nn.Embedding -> Int8Embedding.

    from leanformers.quantize import quantize_model
    quantize_model(lm.model, "int4", group_size=32)      # or lm.quantize("int4"), or load(..., quantize="int4")

The model tells which linears may be swapped (`DecoderModel.quantizable_linears`), which module is the
output head and which the input embedding; the swap goes through `DecoderModel.replace_module`, and the
scheme is recorded in `model.quantization`. Schemes and kernels: quantize/kernels.py; modules:
quantize/modules.py.

Activations: on CPU the quantized kernels are fast only with bfloat16 activations, so quantize_model
switches the model's activations (norms, biases, embeddings, KV cache) to bfloat16 by default and logs it
at INFO (on CUDA only int4 needs that); pass dtype=torch.float32 to keep float32 (then the int8/int4
layers cast/dequantize their weights for dense float32 matmuls: accurate, not fast).

Memory: weights are quantized a chunk of rows at a time (kernels._CHUNK_ELEMENTS), and `load(gguf,
quantize=...)` leaves the weights to quantize unread (`quantized_weight_names`) and hands the file's tensors
to quantize_model, which reads each by rows as it quantizes it: the float32 model never exists whole (a 7B
Q4_K_M file would need 28 GB of float32), and freed memory is handed back to the OS after.

Fused projections: call `model.fuse_projections()` BEFORE quantize_model (the fused linears are plain
nn.Linear and get quantized like any other; fusing skips quantized layers). Quantize on the device the
model will run on: an Int4Linear's packed weight is laid out for one device type's kernel.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..checkpoint.gguf import Q4_TYPES
from ..errors import InvalidArgumentError, UnsupportedModelError
from ..heap import release_free_heap
from ..models.base import DecoderModel
from .kernels import (
    INT4_GROUP_SIZES,
    SCHEMES,
    check_int4_group,
    dequantize_int4,
    int4_backend,
    int8_backend,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
)
from .modules import Int4Linear, Int8Embedding, Int8Linear

__all__ = ["SCHEMES", "INT4_GROUP_SIZES", "Int4Linear", "Int8Embedding", "Int8Linear", "QUANTIZED_MODULES",
           "check_scheme", "dequantize_int4", "gguf_exact_int4_names", "int4_backend", "int8_backend",
           "quantize_int4_groupwise", "quantize_int8_per_channel", "quantize_model", "quantized_weight_names"]

logger = logging.getLogger("leanformers.quantize")

QUANTIZED_MODULES = (Int8Linear, Int4Linear, Int8Embedding)


def check_scheme(scheme: Any, group_size: Any = 32) -> None:
    """Validate a scheme name and (for int4) a group size; raises InvalidArgumentError."""
    if scheme not in SCHEMES:
        raise InvalidArgumentError(f"unknown quantization scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    if scheme == "int4":
        check_int4_group(group_size if isinstance(group_size, int) else 0, group_size)


def _head_scheme(scheme: str, include_lm_head: bool | str | None) -> str | None:
    if include_lm_head is True:
        return scheme
    if include_lm_head is False or include_lm_head is None:
        return None
    if include_lm_head in SCHEMES:
        return include_lm_head
    raise InvalidArgumentError(f"include_lm_head must be True, False, 'int8' or 'int4', got {include_lm_head!r}")


def _auto_dtype(device: torch.device, current: torch.dtype, scheme: str) -> torch.dtype:
    """bfloat16 on CPU (the kernels' fast path); on CUDA bfloat16 only where the int4 kernel needs it."""
    if device.type == "cpu":
        ok = (int4_backend if scheme == "int4" else int8_backend)(device, torch.bfloat16)[0] != "dequant"
        return torch.bfloat16 if ok else current
    if scheme == "int4" and int4_backend(device, current)[0] == "dequant":
        if int4_backend(device, torch.bfloat16)[0] != "dequant":
            return torch.bfloat16
    return current


def gguf_exact_int4_names(model: DecoderModel, tensors: Mapping[str, Any], *,
                          include_lm_head: bool | str = "int8") -> set[str]:
    """Weights of GGUF Q4_0/Q4_1/Q4_K tensors that `quantize_model(..., "int4", group_size=32)` maps exactly.

    `model` may live on the meta device: only its module names are read.
    """
    head = _head_scheme("int4", include_lm_head)
    linears = {f"{name}.weight" for name, _ in model.quantizable_linears()}
    if head == "int4" and model.output_head is not None and not model.tied_embeddings:
        linears.add(f"{model.output_head}.weight")
    return {n for n in linears if _exact_q4(tensors.get(n))}


def quantized_weight_names(model: DecoderModel, scheme: str, *, include_lm_head: bool | str = "int8") -> set[str]:
    """The weights `quantize_model(model, scheme, include_lm_head=...)` replaces (no filter_fn).

    A loader can leave exactly these unread (placeholders) and hand their file tensors to quantize_model,
    which reads them one at a time: the model is never whole in float32. `model` may live on the meta device.
    """
    check_scheme(scheme)
    head_scheme = _head_scheme(scheme, include_lm_head)
    names = {f"{name}.weight" for name, _, _ in _plan(model, scheme, head_scheme)}
    if head_scheme is not None and isinstance(model.get_submodule(model.input_embedding), nn.Embedding):
        names.add(f"{model.input_embedding}.weight")
    if model.tied_embeddings and model.output_head is not None:
        names.discard(f"{model.output_head}.weight")  # the embedding's (one tensor in the file)
    return names


def _plan(model: DecoderModel, scheme: str, head_scheme: str | None,
          filter_fn: Callable[[str, nn.Module], bool] | None = None) -> list[tuple[str, nn.Linear, str]]:
    """(name, module, scheme) of every linear quantize_model swaps: the model's quantizable nn.Linear layers
    that filter_fn keeps, then the output head when it is quantized."""
    plan = [(name, mod, scheme) for name, mod in model.quantizable_linears()
            if type(mod) is nn.Linear and (filter_fn is None or filter_fn(name, mod))]
    head = model.get_submodule(model.output_head) if model.output_head else None
    if isinstance(head, nn.Linear) and head_scheme is not None:
        plan.append((model.output_head, head, head_scheme))
    return plan


def _exact_q4(tensor: Any) -> bool:
    return getattr(tensor, "qtype", None) in Q4_TYPES and len(tensor.shape) == 2


def quantize_model(
    model: DecoderModel,
    scheme: str,
    *,
    group_size: int = 32,
    include_lm_head: bool | str = "int8",
    dtype: torch.dtype | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    gguf_tensors: Mapping[str, Any] | None = None,
) -> DecoderModel:
    """Swap the model's linears (and embeddings) for quantized ones, in place; returns the model.

    scheme: "int8" (per-channel) or "int4" (group-wise, group_size in 32/64/128/256).
    include_lm_head: "int8" (default) quantizes the output head and the input embedding to int8 whatever
        the scheme (int4 on a tied head broke SmolLM2's answers from the first token); True uses `scheme`
        for the head; False keeps head and embeddings in floating point. A tied embedding/head at int8
        becomes ONE shared int8 tensor.
    dtype: activation dtype afterwards; None = automatic (bfloat16 on CPU, where the kernels are only fast
        in bfloat16; on CUDA bfloat16 only if int4 needs it), logged at INFO when it changes.
    filter_fn(name, module) -> bool: which of the model's quantizable linears to quantize; default all.
    gguf_tensors: GGUF tensors (by HF weight name) of weights to quantize whose modules hold placeholders
        (loading.build_model(placeholders=...); quantized_weight_names says which): each is read here, a
        range of rows at a time where it can be, so the model is never whole in float32. Q4_0/Q4_1/Q4_K ones
        map exactly onto int4 (group_size 32, no requantization).
    Any compiled decode step of the model goes stale (model.structure_version changes): compile again.
    """
    check_scheme(scheme, group_size)
    head_scheme = _head_scheme(scheme, include_lm_head)
    if not isinstance(model, DecoderModel):
        raise UnsupportedModelError(f"quantize_model needs a leanformers DecoderModel, got {type(model).__name__}")
    if model.quantization is not None or any(isinstance(m, QUANTIZED_MODULES) for m in model.modules()):
        raise InvalidArgumentError("the model is already quantized")
    gguf_tensors = dict(gguf_tensors or {})
    head_name = model.output_head
    embed_name = model.input_embedding
    embed = model.get_submodule(embed_name)
    tied = model.tied_embeddings

    # plan (and validate everything) before touching the model
    plan = _plan(model, scheme, head_scheme, filter_fn)
    if not plan:
        raise UnsupportedModelError("quantize: the model has no nn.Linear layers to quantize")
    for name, mod, sch in plan:
        if sch == "int4" and mod.in_features % group_size:
            raise InvalidArgumentError(
                f"int4 group_size {group_size} does not divide in_features {mod.in_features} of layer "
                f"{name!r}; choose a group size that divides it")
    module_names = {n for n, _ in model.named_modules()}
    unknown = [n for n in gguf_tensors if n.rsplit(".", 1)[0] not in module_names]
    if unknown:
        raise InvalidArgumentError(f"gguf_tensors names no module of this model: {unknown[:4]}")

    device, current = model.device, model.dtype
    target = dtype if dtype is not None else _auto_dtype(device, current, scheme)
    if target not in (torch.float32, torch.bfloat16, torch.float16):
        raise InvalidArgumentError(f"quantize: activation dtype must be float32, bfloat16 or float16, not {target}")
    if target != current:
        logger.info("quantize %s: activations switch from %s to %s%s", scheme, current, target,
                    " (the quantized CPU kernels are fast only in bfloat16)" if device.type == "cpu" else "")
    if device.type == "cpu" and target != torch.bfloat16:
        logger.info("quantize %s: with %s activations on CPU the quantized layers cast/dequantize their weights "
                    "for dense matmuls (accurate; bfloat16 uses the much faster int kernels)", scheme, target)
    (int4_backend if "int4" in (scheme, head_scheme) else int8_backend)(device, target)  # logs a fallback once

    shared: Int8Embedding | None = None
    counts = {"int8": 0, "int4": 0, "int4 exact from GGUF": 0}
    with torch.no_grad():
        def weight_of(wname: str, mod: nn.Module) -> Any:
            """The module's weight, or for a placeholder the file's tensor (read by rows where it can be)."""
            if wname not in gguf_tensors:
                return mod.weight
            t = gguf_tensors.pop(wname)
            if device.type == "cpu" and getattr(t, "row_sliceable", False):
                return t
            return t.dequantize(torch.float32).to(device)

        if head_scheme is not None and isinstance(embed, nn.Embedding):
            qe = Int8Embedding.from_float(weight_of(f"{embed_name}.weight", embed), dtype=target)
            if tied and head_scheme == "int8":
                shared = qe
            elif tied:
                logger.info("quantize: the output head is int4, so the tied embedding is stored separately (int8)")
            model.replace_module(embed_name, qe)

        for name, mod, sch in plan:
            wname = f"{name}.weight"
            if sch == "int4" and _exact_q4(gguf_tensors.get(wname)) and group_size == 32:
                new = Int4Linear.from_gguf(gguf_tensors.pop(wname), mod.bias, dtype=target, device=device)
                counts["int4 exact from GGUF"] += 1
            elif name == head_name and shared is not None:
                new = shared.as_linear()
                counts["int8"] += 1
            elif sch == "int4":
                new = Int4Linear.from_float(weight_of(wname, mod), mod.bias, group_size=group_size, dtype=target)
                counts["int4"] += 1
            else:
                new = Int8Linear.from_float(weight_of(wname, mod), mod.bias, dtype=target)
                counts["int8"] += 1
            model.replace_module(name, new)
        # GGUF tensors whose modules are not quantized after all: plain float weights
        for wname in list(gguf_tensors):
            mod = model.get_submodule(wname.rsplit(".", 1)[0])
            mod.weight = nn.Parameter(gguf_tensors.pop(wname).dequantize(torch.float32).to(device), requires_grad=False)
            if tied and wname == f"{embed_name}.weight" and type(model.get_submodule(head_name)) is nn.Linear:
                model.tie_weights()  # the float head shares the embedding's new weight, not the placeholder
        # the rest (norms, biases, float linears/embeddings) in the activation dtype
        seen: set[int] = set()
        for mod in model.modules():
            if isinstance(mod, QUANTIZED_MODULES):
                continue
            for p in mod.parameters(recurse=False):
                if id(p) not in seen and p.is_floating_point() and p.dtype != target:
                    p.data = p.data.to(target)
                seen.add(id(p))
    model.quantization = scheme
    if device.type == "cpu":
        release_free_heap()  # the replaced float weights' heap pages
    logger.info(
        "quantized %s: %s; output head %s%s; activations %s",
        scheme, ", ".join(f"{v} {k}" for k, v in counts.items() if v),
        head_scheme or "float", " (shared with the embedding)" if shared is not None else "", target,
    )
    return model
