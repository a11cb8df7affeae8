"""Sharded checkpoints: `out/checkpoint-STEP/` written by every rank with torch.distributed.checkpoint.

    .metadata, __R_0.distcp   DCP: the trainable parameters ("model.*") and AdamW state ("optimizer.*") by
                              parameter name; each rank writes its shards (FSDP) or its share of the
                              replicated tensors (DDP), in parallel
    rng-R.pt                  rank R's torch (CPU and its GPU) and Python random states
    scheduler.pt              lr scheduler (+ fp16 grad scaler) state, from rank 0
    adapter_config.json,      (LoRA) the adapter in PEFT's format, usable on its own (gathered on rank 0)
    adapter_model.safetensors
    trainer_state.json        as for one process (step, data position, options) + world_size,
                              global_batch, strategy and format; written last, by rank 0

DCP stores every tensor with its global shape and where each shard lies, so a checkpoint written by W
processes loads into any number of them, under DDP or FSDP: each rank reads the pieces it now owns.
The resume keeps the global batch (checked before the model loads), so the data position carries over.
The directory is written under a temporary name and renamed by rank 0 once every rank's files are in:
a run killed while saving leaves the previous checkpoint as the newest complete one.
The single-process format (train/checkpoint.py: weights in one file, AdamW state by parameter position,
one random stream) is not resharded: such a checkpoint resumes in one process without torchrun.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ...errors import CheckpointError
from ..checkpoint import STATE, checkpoint_dirs, read_state
from .env import Group

FORMAT = "torch.distributed.checkpoint"
METADATA = ".metadata"  # DCP's index of the shards


def is_sharded(ckpt: Path) -> bool:
    return (ckpt / METADATA).is_file()


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model": trainable parameters by name, "optimizer": AdamW state by parameter name} (views, no copies)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    weights = {k: v for k, v in get_model_state_dict(model).items() if k in trainable}
    return {"model": weights, "optimizer": get_optimizer_state_dict(model, optimizer)}


def _rng_state(group: Group) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(group.device) if group.device.type == "cuda" else None,
            "python": [version, list(internal), gauss]}


def save_sharded(group: Group, output_dir: Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, scaler: Any, state: dict[str, Any],
                 adapter_writer: Callable[[Path], None] | None = None,
                 save_total_limit: int | None = None) -> Path:
    """Write checkpoint-STEP from every rank (a collective); returns its path."""
    import torch.distributed.checkpoint as dcp

    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp-sharded"
    if group.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    group.barrier(f"starting {final.name}")
    with group.collective(f"writing {final.name}"):
        dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(tmp), process_group=group.control_group)
    torch.save(_rng_state(group), tmp / f"rng-{group.rank}.pt")
    if adapter_writer is not None:
        adapter_writer(tmp)  # gathers the LoRA weights (a collective); rank 0 writes
    if group.is_main:
        torch.save({"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None},
                   tmp / "scheduler.pt")
    group.barrier(f"finishing {final.name} (every rank's shard written)")
    if group.is_main:
        (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n")
        if final.exists():  # the same step saved again (a restart that had not passed it): replace it
            old = output_dir / f".checkpoint-{step}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        if save_total_limit:
            for _, p in checkpoint_dirs(output_dir)[:-save_total_limit]:
                shutil.rmtree(p, ignore_errors=True)
    group.barrier(f"renaming {final.name}")
    return final


def load_sharded(group: Group, ckpt: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 scaler: Any) -> dict[str, Any]:
    """Restore trainable weights, AdamW, scheduler and random states from a sharded checkpoint (a
    collective; any world size, DDP or FSDP); returns its trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    state = read_state(ckpt)
    if not is_sharded(ckpt):
        raise CheckpointError(f"{ckpt}: no {METADATA}: not a sharded (torch.distributed.checkpoint) checkpoint")
    sd = _state_dicts(model, optimizer)
    try:
        with group.collective(f"reading {ckpt}"):
            dcp.load(sd, checkpoint_id=str(ckpt), process_group=group.control_group)
    except (CheckpointException, RuntimeError, ValueError, KeyError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{ckpt}: cannot restore the sharded weights and optimizer ({first})") from None
    set_model_state_dict(model, sd["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, sd["optimizer"])
    for name in ("scheduler.pt", "rng-0.pt"):
        if not (ckpt / name).is_file():
            raise CheckpointError(f"{ckpt / name}: missing (incomplete or corrupt checkpoint)")
    # the same world size: each rank continues its own random stream; another one: rank 0's for all
    saved_world = state.get("world_size")
    rng_file = ckpt / (f"rng-{group.rank}.pt" if saved_world == group.world_size else "rng-0.pt")
    try:
        sched = torch.load(ckpt / "scheduler.pt", weights_only=True)
        scheduler.load_state_dict(sched["scheduler"])
        if scaler is not None and sched.get("scaler") is not None:
            scaler.load_state_dict(sched["scaler"])
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and group.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], group.device)
        py = rng["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    except Exception as exc:
        raise CheckpointError(f"{ckpt}: cannot restore the scheduler or random states ({exc})") from None
    return state
