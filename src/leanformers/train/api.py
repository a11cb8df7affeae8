"""`leanformers.finetune(...)`: options checked, data read, model loaded and prepared, the loop run, results saved.

    result = leanformers.finetune("smollm2-135m-instruct", data="train.jsonl", output_dir="out/",
                                  method="lora", lora_r=16, lora_alpha=32, max_steps=100)
    result.output_dir, result.steps, result.loss, result.eval_loss
    leanformers.finetune("./bert-dir", task="classification", data="labels.jsonl", output_dir="out/")

task="causal-lm" (the default) trains decoders on text; task="classification" trains an encoder's sequence
classifier (train/classification.py). Each refuses the other kind of model before anything loads.

Everything that can be checked before the model loads is: the options, the output directory (a previous
run is refused without resume/overwrite, and nothing is deleted before the model and data are ready),
the checkpoint to resume (readable, made with the same options) and the data files (JSON syntax, fields).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidArgumentError
from .args import FinetuneArgs
from .loop import TrainLoop
from .loss import causal_lm_loss
from .run import (FinetuneResult, _encoder_dir, check_output, prepare, resume_command, save_outputs,
                  start_output)

__all__ = ["finetune", "FinetuneResult"]


def finetune(model: str, *, data: str, output_dir: str, **options: Any) -> FinetuneResult:
    """Fine-tune `model` (full, LoRA or QLoRA) on `data`; see leanformers.train.args.FinetuneArgs for options.

    Under torchrun (or when resuming a sharded checkpoint) the run is spread over the processes by
    leanformers.train.distributed; otherwise it runs in this process.
    """
    names = {f.name for f in dataclasses.fields(FinetuneArgs)} - {"model", "data", "output_dir"}
    unknown = sorted(set(options) - names)
    if unknown:
        raise InvalidArgumentError(f"finetune(): unknown option(s) {unknown}; valid: {', '.join(sorted(names))}")
    args = FinetuneArgs(model=model, data=data, output_dir=output_dir, **options).check()
    from . import distributed

    if distributed.wanted(args):
        if args.task == "classification":
            raise InvalidArgumentError("task classification runs in one process; launch it without torchrun "
                                       "and without --strategy")
        return distributed.finetune_distributed(args)
    out = Path(args.output_dir)

    # ---- before the model loads: output dir, checkpoint, data; then the model and data
    ckpt = check_output(args)
    encoder_run = _encoder_run(args, out, ckpt)
    if encoder_run is not None:
        return encoder_run
    prep = prepare(args, torch.device(args.device))

    # ---- run
    start_output(args)
    loop = TrainLoop(prep.lm.model, causal_lm_loss, prep.dataset, args, prep.precision, out,
                     eval_dataset=prep.eval_set, save_extra=prep.adapter_writer(), resume_hint=resume_command(args))
    if ckpt is None:
        torch.manual_seed(args.seed)
    result = loop.run(resume_from=ckpt)

    # ---- outputs
    save_outputs(prep, out)
    return FinetuneResult(out, args.method, result.steps, result.loss, result.eval_loss, result.tokens,
                          out / "metrics.jsonl", result.checkpoint, eval_metrics=result.eval_metrics)


def _encoder_run(args: FinetuneArgs, out: Path, ckpt: Path | None) -> FinetuneResult | None:
    """Task classification: the encoder classifier's run (train/classification.py); None for a decoder's
    causal-LM run. Each task refuses the other kind of model before anything loads."""
    if args.task != "classification":
        return None
    from .classification import finetune_classification, read_classification_records

    records = read_classification_records(args.data)  # the data is checked before the model is looked up
    eval_records = read_classification_records(args.eval_data) if args.eval_data else None
    device = torch.device(args.device)
    mode = args.resolved_precision(device.type, device.type != "cuda" or torch.cuda.is_bf16_supported())
    encoder_dir, adapter = _encoder_dir(args.model)
    if adapter is not None:
        raise InvalidArgumentError(f"{args.model}: an adapter directory; task classification starts from a "
                                   "model directory (fine-tune its base, or the model the adapter was merged into)")
    if encoder_dir is None:
        raise InvalidArgumentError(
            f"task classification (--task classification) trains an encoder's classifier (BERT, RoBERTa, "
            f"XLM-RoBERTa, DistilBERT); {args.model!r} is not an encoder: fine-tune a decoder without --task")
    return finetune_classification(args, out, ckpt, encoder_dir, records, eval_records, mode)
