"""`leanformers.finetune(...)`: options checked, data read, model loaded and prepared, the loop run, results saved.

    result = leanformers.finetune("smollm2-135m-instruct", data="train.jsonl", output_dir="out/",
                                  method="lora", lora_r=16, lora_alpha=32, max_steps=100)
    result.output_dir, result.steps, result.loss, result.eval_loss

Everything that can be checked before the model loads is: the options, the output directory (a previous
run is refused without resume/overwrite, and nothing is deleted before the model and data are ready),
the checkpoint to resume (readable, made with the same options) and the data files (JSON syntax, fields).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidArgumentError
from .args import FinetuneArgs, check_resumable
from .checkpoint import STATE, checkpoint_dirs, find_checkpoint, read_state
from .data import build_dataset, check_vocab, read_records
from .lora import apply_lora, save_adapter
from .loop import TrainLoop
from .loss import causal_lm_loss, set_gradient_checkpointing
from .optim import Precision

logger = logging.getLogger(__name__)

RUN_FILES = ("metrics.jsonl", "finetune_args.json", "adapter_config.json", "adapter_model.safetensors",
             "config.json", "model.safetensors", "model.safetensors.index.json", "generation_config.json")


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced."""

    output_dir: Path
    method: str
    steps: int  # optimizer steps done in total (resumed runs included)
    loss: float | None  # training loss of the last step
    eval_loss: float | None  # last evaluation loss (None without eval data)
    tokens: int  # non-padding tokens trained on
    metrics: Path  # metrics.jsonl
    checkpoint: Path | None = None  # the newest checkpoint written or resumed from


def finetune(model: str, *, data: str, output_dir: str, **options: Any) -> FinetuneResult:
    """Fine-tune `model` (full, LoRA or QLoRA) on `data`; see leanformers.train.args.FinetuneArgs for options."""
    names = {f.name for f in dataclasses.fields(FinetuneArgs)} - {"model", "data", "output_dir"}
    unknown = sorted(set(options) - names)
    if unknown:
        raise InvalidArgumentError(f"finetune(): unknown option(s) {unknown}; valid: {', '.join(sorted(names))}")
    args = FinetuneArgs(model=model, data=data, output_dir=output_dir, **options).check()
    out = Path(args.output_dir)

    # ---- before the model loads: output dir, checkpoint, data
    ckpt = None
    if args.resume:
        ckpt = find_checkpoint(args.resume, out)
        check_resumable(read_state(ckpt)["args"], args, str(ckpt / STATE))
    else:
        previous = _previous_run(out)
        if previous and not args.overwrite:
            raise InvalidArgumentError(
                f"{out}: holds a previous run ({', '.join(previous[:4])}); pass resume=True (--resume) to continue "
                "it or overwrite=True (--overwrite) to replace it")
    records = read_records(args.data)
    eval_records = read_records(args.eval_data) if args.eval_data else None
    device = torch.device(args.device)
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    mode = args.resolved_precision(device.type, bf16_ok)

    # ---- model
    lm = _load_base(args, mode)
    precision = Precision(mode, device)
    if mode != args.precision:
        logger.info("precision: %s", mode)
    short_targets: list[str] = []
    torch.manual_seed(args.seed)
    if args.method == "full":
        for p in lm.model.parameters():
            p.requires_grad_(True)
    else:
        short_targets = apply_lora(lm.model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                   target_modules=args.target_modules, dtype=precision.param_dtype)
    set_gradient_checkpointing(lm.model, args.grad_checkpointing)

    dataset = build_dataset(args.data, lm.tokenizer, seq_len=args.seq_len, packing=args.packing,
                            batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed,
                            truncate=args.truncate, records=records)
    check_vocab(dataset, lm.config.vocab_size, args.data)
    eval_set = None
    if eval_records is not None:
        eval_set = build_dataset(args.eval_data, lm.tokenizer, seq_len=args.seq_len, packing=False,
                                 batch_size=args.batch_size, grad_accum=1, seed=args.seed, truncate=True,
                                 records=eval_records)
        check_vocab(eval_set, lm.config.vocab_size, args.eval_data)

    # ---- run
    if args.overwrite:
        _clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune_args.json").write_text(json.dumps(args.to_json(), indent=2) + "\n")
    base_ref = _base_reference(args.model)

    def write_adapter(directory: Path) -> None:
        save_adapter(lm.model, directory, base_model=base_ref, r=args.lora_r, alpha=args.lora_alpha,
                     dropout=args.lora_dropout, target_modules=short_targets)

    loop = TrainLoop(lm.model, causal_lm_loss, dataset, args, precision, out, eval_dataset=eval_set,
                     save_extra=write_adapter if args.method != "full" else None, resume_hint=resume_command(args))
    if ckpt is None:
        torch.manual_seed(args.seed)
    result = loop.run(resume_from=ckpt)

    # ---- outputs
    if args.method == "full":
        from .export import save_pretrained

        source_dir = lm.source.path if lm.source is not None and lm.source.kind == "dir" else None
        save_pretrained(lm.model, lm.config, lm.tokenizer, out, source_dir=source_dir,
                        generation_config=lm.generation_config)
    else:
        write_adapter(out)
    return FinetuneResult(out, args.method, result.steps, result.loss, result.eval_loss, result.tokens,
                          out / "metrics.jsonl", result.checkpoint)


def _load_base(args: FinetuneArgs, mode: str):
    """The base model in the dtype the method and precision want (frozen bases in the compute dtype)."""
    from ..lm import load

    if args.method == "qlora":
        return load(args.model, quantize=args.quantize, device=args.device, progress=False)
    if mode == "bf16-true" or (args.method == "lora" and mode == "bf16-mixed"):
        dtype = "bfloat16"  # a frozen LoRA base needs no float32 master copy under bfloat16 autocast
    elif args.method == "lora" and mode == "fp16-mixed":
        dtype = "float16"
    else:
        dtype = "float32"
    return load(args.model, dtype=dtype, device=args.device, progress=False)


def _previous_run(out: Path) -> list[str]:
    if not out.is_dir():
        return []
    found = [n for n in RUN_FILES if (out / n).exists()]
    return found + [p.name for _, p in checkpoint_dirs(out)]


def _clear_run(out: Path) -> None:
    """Remove a previous run's files (only names a run writes)."""
    if not out.is_dir():
        return
    for n in RUN_FILES:
        (out / n).unlink(missing_ok=True)
    for p in out.glob("model-*-of-*.safetensors"):
        p.unlink()
    for _, p in checkpoint_dirs(out):
        shutil.rmtree(p)
    shutil.rmtree(out / "runs", ignore_errors=True)


def _base_reference(model: str) -> str:
    """What adapter_config.json records as the base: an absolute path for local files, else the reference."""
    p = Path(str(model)).expanduser()
    return str(p.resolve()) if p.exists() else str(model)


def resume_command(args: FinetuneArgs) -> str:
    """The CLI command that continues this run (every option that differs from its default, plus --resume)."""
    defaults = FinetuneArgs(model="", data="", output_dir="")
    parts = ["leanformers", "finetune", "-m", str(args.model), "--data", str(args.data), "--output",
             str(args.output_dir)]
    for f in dataclasses.fields(FinetuneArgs):
        name = f.name
        if name in ("model", "data", "output_dir", "resume", "overwrite", "callback", "progress"):
            continue
        value = getattr(args, name)
        if value == getattr(defaults, name) or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else ("--no-truncate" if name == "truncate" else ""))
        elif isinstance(value, list):
            parts += [flag, ",".join(value)]
        else:
            parts += [flag, str(value)]
    return shlex.join([p for p in parts if p] + ["--resume"])
