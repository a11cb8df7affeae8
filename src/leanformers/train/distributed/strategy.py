"""DDP or FSDP2 around the model and its loss, the `--strategy auto` rule, and full tensors for the outputs.

    strategy = choose(args, group, model, precision)      # "ddp" | "fsdp", said in the log
    wrapped, no_sync = wrap(strategy, model, causal_lm_loss, group, precision, args)
    loss_sum, n = wrapped(batch)                           # the loss function, run through the wrapper

The wrapper is a module whose forward is the loss function (`LossModule`), so DDP's and FSDP's hooks
run around exactly what the loop calls (the loss calls the model contract's `hidden_states` and `logits`
rather than `forward`). DDP keeps a full replica per rank and all-reduces gradients (bucketed, as views
of the gradients, no second copy). FSDP (`fully_shard`, FSDP2) shards every repeated block of the model
(its decoder layers) and, at the root, the rest (embeddings, final norm, head): parameters, gradients
and AdamW state are 1/world_size per rank, each block gathered only while it runs (forward, and again
in backward, also when activation checkpointing recomputes it).

`--strategy auto` picks DDP when the weights plus, for the trainable ones, gradients and two AdamW moments
take at most AUTO_FIT of the memory free to each process (the GPU's free memory; on CPU the node's available
memory over its processes), else FSDP; every rank measures, and FSDP wins if any rank does not fit.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from typing import Any, Callable

import torch
from torch import nn

from ...errors import InvalidArgumentError
from ..allocator import fix_mmap_threshold as _fix
from .env import Group

logger = logging.getLogger("leanformers.train.distributed")

AUTO_FIT = 0.8  # share of the free memory that model + gradients + optimizer state may take under DDP (the rest: activations)
GiB = 1024**3


class LossModule(nn.Module):
    """`forward(batch) = loss_fn(model, batch)`: the unit DDP and FSDP wrap (the model is `.model`)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], Any]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.loss_fn(self.model, batch)


# ------------------------------------------------------------------------------------ choosing
def check_strategy(args: Any, group: Group) -> None:
    """Refuse what the backend or the strategy cannot do (before the model loads)."""
    if args.cpu_offload:
        if args.strategy == "ddp":
            raise InvalidArgumentError("cpu_offload (--cpu-offload) offloads FSDP's shards; DDP keeps a full replica "
                                       "on each device: use --strategy fsdp (or auto)")
        if group.device.type != "cuda":
            raise InvalidArgumentError(
                f"cpu_offload (--cpu-offload) moves FSDP's sharded parameters, gradients and optimizer state from "
                f"the GPUs to CPU memory; this run is on {group.device.type} ({group.backend}), where they already "
                "are: drop --cpu-offload")


def training_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of all weights, bytes of gradients + two AdamW moments of the trainable ones)."""
    seen: set[int] = set()
    weights = state = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        n = t.numel() * t.element_size()
        weights += n
        if isinstance(t, nn.Parameter) and t.requires_grad:
            state += 3 * n
    return weights, state


def _free_bytes(group: Group, resident: int) -> int:
    """Memory this process may still use: free GPU memory + what the model would take there; on CPU the
    node's available memory over its processes (the weights, already loaded, are no longer in it)."""
    if group.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(group.device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if ":" in line}
        available = info.get("MemAvailable", info.get("MemFree", 0))
    except (OSError, ValueError, IndexError):  # not Linux
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available // max(1, group.local_world_size) + resident


def choose(args: Any, group: Group, model: nn.Module) -> str:
    """The strategy to run: args.strategy, or for auto DDP when every rank fits the model + optimizer."""
    weights, state = training_bytes(model)
    if args.strategy != "auto":
        logger.info("strategy %s (--strategy): %d processes, %s, weights %s, gradients + AdamW state %s",
                    args.strategy.upper(), group.world_size, group.backend, _size(weights), _size(state))
        return args.strategy
    if args.cpu_offload:
        logger.info("strategy auto -> FSDP (--cpu-offload shards and offloads)")
        return "fsdp"
    resident = 0 if group.device.type == "cuda" else weights
    free = _free_bytes(group, resident)
    fits = group.gather((weights + state) <= AUTO_FIT * free, "choosing the strategy (memory of every rank)")
    strategy = "ddp" if all(fits) else "fsdp"
    logger.info("strategy auto -> %s: weights %s + gradients and AdamW state %s %s %.0f%% of the "
                "%s free per process on %s%s", strategy.upper(), _size(weights), _size(state),
                "fit in" if all(fits) else "exceed", AUTO_FIT * 100, _size(free), group.device,
                "" if all(fits) else f" (ranks that do not fit: {[r for r, f in enumerate(fits) if not f]})")
    return strategy


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 2 else f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------ wrapping
def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (the elements of the outermost ModuleLists of one module type): FSDP's units."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            found.extend(module)
            inside.update(id(m) for b in module for m in b.modules())
    return found


def _quantized_params(model: nn.Module) -> set[nn.Parameter]:
    """Frozen non-float weights (int8 QLoRA bases): kept whole on every rank, never sharded."""
    return {p for p in model.parameters() if not p.is_floating_point()}


def wrap(strategy: str, model: nn.Module, loss_fn: Callable, group: Group, precision: Any,
         args: Any) -> tuple[nn.Module, Callable[[bool], contextlib.AbstractContextManager]]:
    """(the module the loop calls with a batch, `sync(last)`: the context of a micro-batch's backward;
    DDP all-reduces only on the last micro-batch of a step)."""
    unit = LossModule(model, loss_fn)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        unit.to(group.device)
        # no buffer broadcast before each forward (the model's buffers are constants); gradients reduced in
        # place in DDP's buckets (no second copy)
        sync_kw = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})
        ddp = DDP(unit, device_ids=[group.device] if group.device.type == "cuda" else None,
                  gradient_as_bucket_view=True, **sync_kw)

        def ddp_sync(last: bool) -> contextlib.AbstractContextManager:
            return contextlib.nullcontext() if last else ddp.no_sync()

        return ddp, ddp_sync

    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if group.device.type == "cpu":
        fix_mmap_threshold()
    mp = {"bf16-mixed": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
          "fp16-mixed": MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32),
          }.get(precision.mode, MixedPrecisionPolicy())
    offload = CPUOffloadPolicy(pin_memory=True) if args.cpu_offload else OffloadPolicy()
    ignored = _quantized_params(model)
    if ignored:
        for p in ignored:  # not moved by fully_shard: on the rank's device already (QLoRA loads there)
            p.data = p.data.to(group.device)
        for b in model.buffers():
            b.data = b.data.to(group.device)
    kw: dict[str, Any] = dict(mp_policy=mp, offload_policy=offload, ignored_params=ignored or None)
    units = blocks(model)
    if not units:
        raise InvalidArgumentError(f"strategy fsdp: {type(model).__name__} has no repeated blocks to shard")
    for block in units:
        fully_shard(block, **kw)
    fully_shard(unit, **kw)
    return unit, lambda last: contextlib.nullcontext()


def fix_mmap_threshold() -> bool:
    """FSDP's per-step gathered weights and reduced gradients go back to the OS (see train/allocator.py)."""
    return _fix("fsdp on CPU")


def inner_model(wrapped: nn.Module) -> nn.Module:
    """The model inside the wrapper (DDP's `.module`, then LossModule's `.model`)."""
    unit = getattr(wrapped, "module", wrapped)
    return unit.model


# ------------------------------------------------------------------------------------ full tensors
def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded, possibly CPU-offloaded) parameter; a collective
    for sharded ones, so every rank calls it."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t.detach()
    local = t.to_local()
    mesh_type = t.device_mesh.device_type
    if local.device.type != mesh_type:  # CPU-offloaded shard: gather over the mesh's device
        dev = torch.device(mesh_type, torch.cuda.current_device()) if mesh_type == "cuda" else torch.device(mesh_type)
        t = DTensor.from_local(local.to(dev), t.device_mesh, t.placements, run_check=False, shape=t.shape,
                               stride=t.stride())
    return t.full_tensor().detach()


def gather_trainable(model: nn.Module, group: Group) -> dict[str, torch.Tensor]:
    """Trainable parameters by name as whole CPU tensors on rank 0 ({} on the other ranks)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            with group.collective(f"gathering {name}"):
                t = full_tensor(p)
            if group.is_main:
                out[name] = t.to("cpu", copy=True)
    return out


def gather_model(model: nn.Module, group: Group) -> dict[str, torch.Tensor]:
    """The model's whole state dict on rank 0's CPU ({} on the other ranks), one tensor at a time."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    with group.collective("gathering the model's weights"):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
