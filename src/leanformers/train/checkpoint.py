"""Training checkpoints: `out/checkpoint-STEP/`, written under a temporary name and renamed when complete.

A checkpoint holds everything an exact resume needs:
    trainable.safetensors   the trainable parameters by name (all weights for full fine-tuning, LoRA A/B for LoRA)
    adapter_config.json,    (LoRA) the same weights as a PEFT adapter, usable on its own
    adapter_model.safetensors
    optimizer.pt            optimizer state (torch.save; read back with weights_only=True)
    scheduler.pt            lr scheduler state (and the grad scaler's, for fp16-mixed)
    rng.json, rng.pt        Python / torch (CPU and CUDA) random generator states
    trainer_state.json      step, epoch, position in the data, tokens so far, data fingerprint, options; written last

`save_checkpoint` / `load_checkpoint` / `find_checkpoint` are the whole interface the loop uses, so a
sharded writer (torch.distributed.checkpoint, one shard per rank) can replace them for many processes.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

_NAME = re.compile(r"checkpoint-(\d+)")
STATE = "trainer_state.json"
WEIGHTS = "trainable.safetensors"


def checkpoint_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed into place) in `output_dir`, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _NAME.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_checkpoint(resume: bool | str | os.PathLike, output_dir: Path) -> Path:
    """The checkpoint to resume: the newest in output_dir (resume=True), or the given checkpoint/output dir."""
    where = output_dir if resume is True else Path(resume)
    if _NAME.fullmatch(where.name) and where.is_dir():
        return where  # a checkpoint named explicitly (read_state checks it is complete)
    found = checkpoint_dirs(where)
    if not found:
        raise CheckpointError(f"{where}: no checkpoint to resume (looked for checkpoint-STEP directories)")
    return found[-1][1]


def read_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (incomplete or corrupt checkpoint)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint state ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "args" not in state:
        raise CheckpointError(f"{path}: corrupt checkpoint state (no step/args)")
    return state


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(output_dir: Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: Any, state: dict[str, Any], extra_writer: Any = None,
                    save_total_limit: int | None = None) -> Path:
    """Write checkpoint-STEP atomically (temporary directory, then rename); prune to save_total_limit."""
    from safetensors.torch import save_file

    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = {n: t.contiguous() for n, t in trainable_state(model).items()}
    save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
    if extra_writer is not None:
        extra_writer(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None},
               tmp / "scheduler.pt")
    torch.save({"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, tmp / "rng.pt")
    (tmp / "rng.json").write_text(json.dumps({"python": _py_state()}))
    (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n")
    if final.exists():  # the same step saved again (e.g. after a resume): replace it
        old = output_dir / f".checkpoint-{step}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if save_total_limit:
        for _, p in checkpoint_dirs(output_dir)[:-save_total_limit]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def _py_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def load_checkpoint(ckpt: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: Any) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler, scaler and RNG states from `ckpt`; returns its trainer state."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = read_state(ckpt)
    path = ckpt / WEIGHTS
    try:
        saved = load_file(str(path))
    except (SafetensorError, OSError, FileNotFoundError) as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint's weights ({exc})") from None
    params = trainable_state(model)
    missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or extra:
        raise CheckpointError(f"{path}: the checkpoint's weights do not match this model's trainable parameters "
                              f"({len(missing)} missing, e.g. {missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]})")
    with torch.no_grad():
        for name, p in params.items():
            t = saved[name]
            if t.shape != p.shape or t.dtype != p.dtype:
                raise CheckpointError(f"{path}: {name} is {t.dtype} {list(t.shape)}, the model has "
                                      f"{p.dtype} {list(p.shape)}")
            p.copy_(t)
    for fname in ("optimizer.pt", "scheduler.pt", "rng.pt", "rng.json"):
        if not (ckpt / fname).is_file():
            raise CheckpointError(f"{ckpt / fname}: missing (incomplete or corrupt checkpoint)")
    try:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu"))
    except Exception as exc:
        raise CheckpointError(f"{ckpt / 'optimizer.pt'}: cannot restore the optimizer ({exc})") from None
    try:
        sched = torch.load(ckpt / "scheduler.pt", weights_only=True)
        scheduler.load_state_dict(sched["scheduler"])
        if scaler is not None and sched.get("scaler") is not None:
            scaler.load_state_dict(sched["scaler"])
        rng = torch.load(ckpt / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        py = json.loads((ckpt / "rng.json").read_text())["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    except Exception as exc:
        raise CheckpointError(f"{ckpt}: cannot restore the scheduler or random states ({exc})") from None
    return state
