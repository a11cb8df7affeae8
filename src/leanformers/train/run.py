"""The pieces of one fine-tuning run, shared by the one-process run (api.py), encoder classification
(classification.py) and the distributed run (distributed/): the output directory (a previous run refused
without resume/overwrite), the checkpoint to resume, the prepared model and data, the saved outputs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import InvalidArgumentError
from .args import FinetuneArgs, check_resumable
from .checkpoint import STATE, checkpoint_dirs, find_checkpoint, read_state
from .data import Dataset, build_dataset, check_vocab, read_records
from .lora import apply_lora, save_adapter
from .loss import set_gradient_checkpointing
from .optim import Precision

logger = logging.getLogger(__name__)

RUN_FILES = ("metrics.jsonl", "finetune_args.json", "adapter_config.json", "adapter_model.safetensors",
             "config.json", "model.safetensors", "model.safetensors.index.json", "generation_config.json",
             "classifier_config.json")


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
    rank: int = 0  # this process's rank in a distributed run (torchrun); rank 0 wrote the outputs
    eval_metrics: dict[str, float] | None = None  # the last evaluation: eval_loss (+ eval_accuracy / eval_micro_f1)


@dataclass
class Prepared:
    """A run ready to train: the model (LoRA applied), its precision and the datasets."""

    args: FinetuneArgs
    lm: Any  # LanguageModel
    precision: Precision
    short_targets: list[str]  # LoRA target names for adapter_config.json ([] for full fine-tuning)
    dataset: Dataset
    eval_set: Dataset | None

    def adapter_writer(self) -> Callable[..., None] | None:
        """Writes the PEFT adapter into a directory (None for full fine-tuning); `state` (PEFT keys ->
        tensors) replaces the model's own LoRA weights, for models whose weights are sharded."""
        if self.args.method == "full":
            return None
        args, base_ref = self.args, _base_reference(self.args.model)

        def write_adapter(directory: Path, state: dict[str, torch.Tensor] | None = None) -> None:
            save_adapter(self.lm.model, directory, base_model=base_ref, r=args.lora_r, alpha=args.lora_alpha,
                         dropout=args.lora_dropout, target_modules=self.short_targets, state=state)

        return write_adapter


def check_output(args: FinetuneArgs) -> Path | None:
    """The checkpoint to resume (checked against the options), or None; refuses an output directory that
    holds a previous run unless resume/overwrite. Nothing is written."""
    out = Path(args.output_dir)
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
    return ckpt


def prepare(args: FinetuneArgs, device: torch.device, *, load_device: str | None = None) -> Prepared:
    """Read the data, load the base (on `load_device`, default args.device), make it trainable (all weights
    or LoRA), build the datasets. Nothing is written."""
    records = read_records(args.data)  # the data is checked before the model is looked up
    eval_records = read_records(args.eval_data) if args.eval_data else None
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    mode = args.resolved_precision(device.type, bf16_ok)
    if _encoder_dir(args.model)[0] is not None:
        raise InvalidArgumentError(
            f"{args.model!r} is an encoder: task {args.task} (--task {args.task}, the default) trains decoders "
            "(causal language models); for a classifier pass task='classification' (--task classification)")

    # ---- model
    lm = _load_base(args, mode, load_device or args.device)
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
    return Prepared(args, lm, precision, short_targets, dataset, eval_set)


def start_output(args: FinetuneArgs) -> None:
    """Clear a previous run (overwrite), create the output directory, record the options."""
    out = Path(args.output_dir)
    if args.overwrite:
        _clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune_args.json").write_text(json.dumps(args.to_json(), indent=2) + "\n")


def save_outputs(prep: Prepared, out: Path, *, state: dict[str, torch.Tensor] | None = None) -> None:
    """The run's result in `out`: a Hugging Face model directory (full) or a PEFT adapter (LoRA/QLoRA).
    `state` (full tensors by name) replaces the model's own weights, for models whose weights are sharded."""
    lm = prep.lm
    if prep.args.method == "full":
        from .export import save_pretrained

        source_dir = lm.source.path if lm.source is not None and lm.source.kind == "dir" else None
        save_pretrained(lm.model, lm.config, lm.tokenizer, out, source_dir=source_dir,
                        generation_config=lm.generation_config, state=state)
    else:
        prep.adapter_writer()(out, state)


def _load_base(args: FinetuneArgs, mode: str, device: str):
    """The base model in the dtype the method and precision want (frozen bases in the compute dtype)."""
    from ..lm import load

    if args.method == "qlora":
        return load(args.model, quantize=args.quantize, device=device, progress=False)
    if mode == "bf16-true" or (args.method == "lora" and mode == "bf16-mixed"):
        dtype = "bfloat16"  # a frozen LoRA base needs no float32 master copy under bfloat16 autocast
    elif args.method == "lora" and mode == "fp16-mixed":
        dtype = "float16"
    else:
        dtype = "float32"
    return load(args.model, dtype=dtype, device=device, progress=False)


def _encoder_dir(model: str) -> tuple[Path | None, str | None]:
    """(the model directory when `model` resolves to an encoder checkpoint, else None; the adapter directory
    when `model` is one)."""
    from ..encoder import is_encoder_dir
    from ..hub import resolve
    from .lora import adapter_base

    reference, adapter = adapter_base(model)
    resolved = resolve(reference, progress=False)
    return (Path(resolved.path) if resolved.kind == "dir" and is_encoder_dir(resolved.path) else None), adapter


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
